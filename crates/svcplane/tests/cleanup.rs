//! `svcplane cleanup --kube-proxy` for real (as root, in a scratch network namespace):
//! a node as kube-proxy leaves it (nftables tables; iptables chains with jumps from the
//! built-in chains, over both iptables backends and both families) is cleaned, and
//! everything that is not kube-proxy's stays.

use svcplane_testkit::{Netns, run_checked, skip_unless_root};

/// kube-proxy's iptables mode, abridged, plus kubelet's and a CNI's own chains.
const NAT_V4: &str = r#"*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
:KUBE-SEP-6E7XQMQ4RAYOWTTM - [0:0]
:KUBE-EXT-ABCDEF - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A CNI-HOSTPORT-DNAT -p tcp --dport 8080 -j RETURN
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p tcp -m tcp --dport 30080 -j KUBE-EXT-ABCDEF
-A KUBE-SVC-TCOU7JCQXEZGVUNU -j KUBE-SEP-6E7XQMQ4RAYOWTTM
-A KUBE-SEP-6E7XQMQ4RAYOWTTM -s 10.244.0.5/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-6E7XQMQ4RAYOWTTM -p udp -m udp -j DNAT --to-destination 10.244.0.5:53
COMMIT
"#;

const FILTER_V4: &str = r#"*filter
:KUBE-FORWARD - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
:MY-CHAIN - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -m conntrack --ctstate NEW -j KUBE-PROXY-FIREWALL
-A INPUT -j KUBE-FIREWALL
-A INPUT -j MY-CHAIN
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP
-A MY-CHAIN -p tcp --dport 22 -j ACCEPT
COMMIT
"#;

const NAT_V6: &str = r#"*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-V6 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d fd00:96::a/128 -p tcp -m tcp --dport 80 -j KUBE-SVC-V6
COMMIT
"#;

/// kube-proxy's nftables mode (two tables) and someone else's table.
const NFT: &str = "
table ip kube-proxy {
    chain nat-prerouting {
        type nat hook prerouting priority dstnat
    }
}
table ip6 kube-proxy {
    chain nat-prerouting {
        type nat hook prerouting priority dstnat
    }
}
table ip svcplane {
    chain services {
    }
}
table inet unrelated {
    chain input {
        type filter hook input priority 0
        tcp dport 22 accept
    }
}
";

fn restore(ns: &Netns, tool: &str, rules: &str) {
    let out = ns
        .run_with_input(tool, &["--noflush"], rules)
        .expect("run restore");
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn save(ns: &Netns, tool: &str) -> String {
    let out = run_checked(&mut ns.command(tool, &[])).expect("save");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has_tool(tool: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(tool).exists())
}

/// No kube-proxy chain, jump or table is left; everything else still is.
fn assert_clean(ns: &Netns, v4_save: &str, v6_save: Option<&str>) {
    let v4 = save(ns, v4_save);
    for gone in [
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-NODEPORTS",
        "KUBE-SVC-",
        "KUBE-SEP-",
        "KUBE-EXT-",
        "KUBE-FORWARD",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-PROXY-FIREWALL",
    ] {
        assert!(!v4.contains(gone), "{v4_save}: {gone} is left:\n{v4}");
    }
    for kept in [
        ":CNI-HOSTPORT-DNAT",
        "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
        "-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 8080 -j RETURN",
        ":KUBE-FIREWALL",
        "-A INPUT -j KUBE-FIREWALL",
        "-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP",
        "-A INPUT -j MY-CHAIN",
        "-A MY-CHAIN -p tcp -m tcp --dport 22 -j ACCEPT",
    ] {
        assert!(v4.contains(kept), "{v4_save}: {kept:?} was removed:\n{v4}");
    }
    if let Some(v6_save) = v6_save {
        let v6 = save(ns, v6_save);
        assert!(!v6.contains("KUBE-"), "{v6_save}: left:\n{v6}");
        assert!(v6.contains("*nat"), "{v6}");
    }
}

#[test]
fn cleanup_kube_proxy_removes_its_rules_and_nothing_else() {
    if skip_unless_root(&["nft", "ip", "iptables-nft-restore", "ip6tables-nft-restore"]) {
        return;
    }
    let ns = Netns::new("svcplane-kpclean").expect("netns");
    restore(&ns, "iptables-nft-restore", NAT_V4);
    restore(&ns, "iptables-nft-restore", FILTER_V4);
    restore(&ns, "ip6tables-nft-restore", NAT_V6);
    let out = ns.run_with_input("nft", &["-f", "-"], NFT).expect("nft");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // kube-proxy may have run on the legacy backend: cover it when the node has it.
    let legacy = has_tool("iptables-legacy-restore");
    if legacy {
        restore(&ns, "iptables-legacy-restore", NAT_V4);
        restore(&ns, "iptables-legacy-restore", FILTER_V4);
    } else {
        eprintln!("note: iptables-legacy-restore not installed; only the nft backend is checked");
    }
    // The fixture really is in place (else the test proves nothing).
    assert!(save(&ns, "iptables-nft-save").contains("-j KUBE-SVC-TCOU7JCQXEZGVUNU"));

    for round in ["first", "second (nothing left: still succeeds)"] {
        let out = ns
            .command(env!("CARGO_BIN_EXE_svcplane"), &["cleanup", "--kube-proxy"])
            .output()
            .expect("run svcplane");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{round} run failed: {stderr}");
        assert_clean(&ns, "iptables-nft-save", Some("ip6tables-nft-save"));
        if legacy {
            assert_clean(&ns, "iptables-legacy-save", None);
        }
        let listed = run_checked(&mut ns.command("nft", &["list", "tables"])).expect("nft list");
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(!listed.contains("kube-proxy"), "{listed}");
        assert!(listed.contains("table inet unrelated"), "{listed}");
        // svcplane's own rules are not kube-proxy's: the init container must keep them.
        assert!(listed.contains("table ip svcplane"), "{listed}");
        if round == "first" {
            assert!(stderr.contains("table ip kube-proxy"), "{stderr}");
        }
    }
}

#[test]
fn cleanup_flag_is_svcplanes_cleanup_as_kube_proxys_is() {
    if skip_unless_root(&["nft", "ip"]) {
        return;
    }
    let ns = Netns::new("svcplane-cleanupflag").expect("netns");
    let tables = "table ip svcplane {\n}\ntable ip6 svcplane {\n}\ntable ip kube-proxy {\n}\n";
    for args in [&["--cleanup"][..], &["proxy", "--cleanup"]] {
        let out = ns.run_with_input("nft", &["-f", "-"], tables).expect("nft");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = ns
            .command(env!("CARGO_BIN_EXE_svcplane"), args)
            .output()
            .expect("run svcplane");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = run_checked(&mut ns.command("nft", &["list", "tables"])).expect("nft list");
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(!listed.contains("svcplane"), "{args:?} left: {listed}");
        // `--cleanup` removes svcplane's rules only; kube-proxy's are `cleanup --kube-proxy`.
        assert!(listed.contains("table ip kube-proxy"), "{args:?}: {listed}");
    }
}
