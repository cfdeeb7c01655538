//! `svcplane cleanup --kube-proxy`: remove what kube-proxy left on a node, so that
//! svcplane can take over without two sets of Service rules fighting.
//!
//! - nftables mode: the `ip kube-proxy` and `ip6 kube-proxy` tables, in one `nft -f`
//!   transaction.
//! - iptables (and IPVS) mode: kube-proxy's chains in the nat, filter and mangle
//!   tables, and every rule elsewhere that jumps to them (PREROUTING, OUTPUT, ...), for
//!   IPv4 and IPv6 and for both the nft and the legacy iptables backends; one
//!   `iptables-restore --noflush` transaction per table, as kube-proxy's own cleanup.
//!   Kubelet's chains (KUBE-FIREWALL, KUBE-MARK-DROP, KUBE-KUBELET-CANARY) stay.
//! - IPVS (generic netlink and rtnetlink, where the kernel has IPVS): the virtual
//!   servers on kube-ipvs0's addresses and, unless svcplane's IPVS mode runs here, on the
//!   node's addresses (NodePorts); the kube-ipvs0 dummy interface; kube-proxy's `KUBE-*`
//!   ipsets when `ipset` is installed. (kube-proxy itself flushes every virtual server;
//!   svcplane's own stay, and those in `--ipvs-exclude-cidrs`.)
//!
//! svcplane's own rules are never touched here, so this is safe to run on every
//! start (the DaemonSet's init container does).

use std::io::Write;
use std::process::{Command, Stdio};

/// kube-proxy's chains by exact name (iptables and IPVS modes).
const OWNED_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    // IPVS mode.
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
];

/// kube-proxy's per-service and per-endpoint chains, by prefix.
const OWNED_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-XLB-",
    "KUBE-EXT-",
];

const TABLES: &[&str] = &["nat", "filter", "mangle"];

/// Whether kube-proxy created (and so owns) the chain `name`.
pub fn is_kube_proxy_chain(name: &str) -> bool {
    OWNED_CHAINS.contains(&name) || OWNED_PREFIXES.iter().any(|p| name.starts_with(p))
}

#[derive(Debug, thiserror::Error)]
pub enum KubeProxyCleanupError {
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        source: std::io::Error,
    },
    #[error("{tool} failed: {stderr}")]
    Failed { tool: String, stderr: String },
}

/// What a cleanup did: each line is for the operator's log.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub removed: Vec<String>,
    pub skipped: Vec<String>,
    pub errors: Vec<KubeProxyCleanupError>,
}

/// Removes kube-proxy's nftables tables, iptables chains and IPVS services (but those
/// on addresses in `ipvs_exclude`). Every part is attempted even when an earlier one
/// fails; the failures are in the report.
pub fn cleanup_kube_proxy(ipvs_exclude: &[ipnet::IpNet]) -> CleanupReport {
    let mut report = CleanupReport::default();
    cleanup_nftables(&mut report);
    for variant in iptables_variants() {
        for table in TABLES {
            cleanup_iptables_table(&variant, table, &mut report);
        }
    }
    cleanup_ipvs(ipvs_exclude, &mut report);
    report
}

fn cleanup_nftables(report: &mut CleanupReport) {
    if !tool_exists("nft") {
        report.skipped.push("nftables: nft is not installed".into());
        return;
    }
    let listed = match run("nft", &["list", "tables"], None) {
        Ok(out) => out,
        Err(e) => {
            report.errors.push(e);
            return;
        }
    };
    let present: Vec<&str> = ["ip", "ip6"]
        .into_iter()
        .filter(|family| {
            let wanted = format!("table {family} kube-proxy");
            listed.lines().any(|l| l.trim() == wanted)
        })
        .collect();
    if present.is_empty() {
        return;
    }
    let script: String = present
        .iter()
        .map(|family| format!("delete table {family} kube-proxy\n"))
        .collect();
    match run("nft", &["-f", "-"], Some(&script)) {
        Ok(_) => report.removed.extend(
            present
                .iter()
                .map(|family| format!("nftables: table {family} kube-proxy")),
        ),
        Err(e) => report.errors.push(e),
    }
}

/// One iptables binary pair for one family and backend.
#[derive(Debug, Clone)]
struct IptablesVariant {
    save: &'static str,
    restore: &'static str,
    /// Legacy only: /proc/net/ip{,6}_tables_names lists the tables in use, so
    /// absent tables are skipped without making the kernel load anything.
    legacy_names: Option<&'static str>,
}

fn iptables_variants() -> Vec<IptablesVariant> {
    let mut variants = Vec::new();
    for (nft, legacy, plain, names) in [
        (
            ("iptables-nft-save", "iptables-nft-restore"),
            ("iptables-legacy-save", "iptables-legacy-restore"),
            ("iptables-save", "iptables-restore"),
            "/proc/net/ip_tables_names",
        ),
        (
            ("ip6tables-nft-save", "ip6tables-nft-restore"),
            ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
            ("ip6tables-save", "ip6tables-restore"),
            "/proc/net/ip6_tables_names",
        ),
    ] {
        // kube-proxy may have used either backend (its image picks one at start), so
        // both are cleaned when both exist; else whatever `iptables` is.
        let mut found = false;
        if tool_exists(nft.0) && tool_exists(nft.1) {
            variants.push(IptablesVariant {
                save: nft.0,
                restore: nft.1,
                legacy_names: None,
            });
            found = true;
        }
        if tool_exists(legacy.0) && tool_exists(legacy.1) {
            variants.push(IptablesVariant {
                save: legacy.0,
                restore: legacy.1,
                legacy_names: Some(names),
            });
            found = true;
        }
        if !found && tool_exists(plain.0) && tool_exists(plain.1) {
            variants.push(IptablesVariant {
                save: plain.0,
                restore: plain.1,
                legacy_names: None,
            });
        }
    }
    variants
}

fn cleanup_iptables_table(variant: &IptablesVariant, table: &str, report: &mut CleanupReport) {
    if let Some(names) = variant.legacy_names {
        let in_use = std::fs::read_to_string(names).unwrap_or_default();
        if !in_use.lines().any(|l| l.trim() == table) {
            return;
        }
    }
    let saved = match run(variant.save, &["-t", table], None) {
        Ok(out) => out,
        // A table that does not exist is nothing to clean.
        Err(KubeProxyCleanupError::Failed { stderr, .. })
            if stderr.contains("does not exist") || stderr.contains("Table does not exist") =>
        {
            return;
        }
        Err(e) => {
            report.errors.push(e);
            return;
        }
    };
    let Some(plan) = plan_iptables_cleanup(&saved, table) else {
        return;
    };
    match run(
        variant.restore,
        &["--noflush", "-w", "5"],
        Some(&plan.script),
    ) {
        Ok(_) => report.removed.push(format!(
            "{}: table {table}: {} chain(s), {} jump(s) from other chains",
            variant.restore,
            plan.chains.len(),
            plan.jumps
        )),
        Err(e) => report.errors.push(e),
    }
}

/// The `iptables-restore --noflush` input that removes kube-proxy's chains from one
/// table, computed from that table's `iptables-save` output.
#[derive(Debug, Clone, PartialEq)]
pub struct IptablesPlan {
    pub script: String,
    /// kube-proxy's chains found (flushed, then deleted).
    pub chains: Vec<String>,
    /// Rules in other chains that jump (or goto) to one of them, deleted first.
    pub jumps: usize,
}

/// `None` when the table holds nothing of kube-proxy's.
pub fn plan_iptables_cleanup(saved: &str, table: &str) -> Option<IptablesPlan> {
    plan_iptables_cleanup_with(saved, table, is_kube_proxy_chain)
}

/// The same for the chains `owned` says are the cleaner's (svcplane's iptables mode
/// removes its own `SVCP-` chains this way).
pub fn plan_iptables_cleanup_with(
    saved: &str,
    table: &str,
    owned: impl Fn(&str) -> bool,
) -> Option<IptablesPlan> {
    let mut chains = Vec::new();
    let mut deletes = Vec::new();
    let mut in_table = false;
    for line in saved.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            in_table = name == table;
            continue;
        }
        if !in_table {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next()
                && owned(name)
            {
                chains.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let words = split_words(rule);
            let Some(chain) = words.first() else { continue };
            if owned(chain) {
                continue; // goes with its chain
            }
            if rule_target(&words).is_some_and(&owned) {
                deletes.push(format!("-D {rule}\n"));
            }
        }
    }
    if chains.is_empty() {
        return None;
    }
    let mut script = format!("*{table}\n");
    // With --noflush, declaring an existing chain flushes it: rules between
    // kube-proxy's chains go first, so each can then be deleted.
    for chain in &chains {
        script.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for delete in &deletes {
        script.push_str(delete);
    }
    for chain in &chains {
        script.push_str(&format!("-X {chain}\n"));
    }
    script.push_str("COMMIT\n");
    Some(IptablesPlan {
        script,
        chains,
        jumps: deletes.len(),
    })
}

/// The `-j`/`-g` target of a rule's words.
fn rule_target(words: &[String]) -> Option<&str> {
    words
        .windows(2)
        .find(|w| matches!(w[0].as_str(), "-j" | "--jump" | "-g" | "--goto"))
        .map(|w| w[1].as_str())
}

/// Splits an iptables-save rule into words, keeping double-quoted strings (comments)
/// whole so that text inside a comment is never taken for a target.
fn split_words(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

fn cleanup_ipvs(exclude: &[ipnet::IpNet], report: &mut CleanupReport) {
    let mut ipvs = match crate::ipvs::genl::Ipvs::open(None) {
        Ok(i) => i,
        Err(_) => {
            report
                .skipped
                .push("IPVS: this kernel has no IPVS, nothing to remove".into());
            return;
        }
    };
    let mut links = match crate::ipvs::link::Links::open(None) {
        Ok(l) => l,
        Err(e) => {
            report
                .skipped
                .push(format!("IPVS: no rtnetlink socket: {e}"));
            return;
        }
    };
    let on = |links: &mut crate::ipvs::link::Links, name: &str| -> Vec<std::net::IpAddr> {
        match links.index(name) {
            Ok(Some(i)) => links.addresses(i).unwrap_or_default(),
            _ => Vec::new(),
        }
    };
    let kube: Vec<std::net::IpAddr> = on(&mut links, "kube-ipvs0");
    let ours_present = matches!(links.index(crate::ipvs::DUMMY), Ok(Some(_)));
    // kube-proxy's virtual servers: on kube-ipvs0's addresses, and its NodePorts on the
    // node's other addresses, unless svcplane's IPVS mode runs here (then those may be
    // svcplane's own; its next full sync takes over the ones it wants).
    let mut addrs: std::collections::BTreeSet<std::net::IpAddr> = kube.into_iter().collect();
    if !ours_present && let Ok(local) = crate::conntrack::local_addresses(None) {
        addrs.extend(local);
    }
    match ipvs.services() {
        Ok(list) => {
            let mut n = 0;
            for vs in list.iter().filter(|v| {
                addrs.contains(&v.key.addr) && !crate::ipvs::plan::excluded(exclude, &v.key.addr)
            }) {
                match ipvs.send(&crate::ipvs::genl::Request::del_service(&vs.key)) {
                    Ok(()) => n += 1,
                    Err(e) => report.errors.push(KubeProxyCleanupError::Failed {
                        tool: "IPVS (generic netlink)".into(),
                        stderr: format!("deleting virtual server {:?}: {e}", vs.key),
                    }),
                }
            }
            if n > 0 {
                report.removed.push(format!("IPVS: {n} virtual server(s)"));
            }
        }
        Err(e) => report.errors.push(KubeProxyCleanupError::Failed {
            tool: "IPVS (generic netlink)".into(),
            stderr: format!("listing virtual servers: {e}"),
        }),
    }
    match links.delete("kube-ipvs0") {
        Ok(true) => report.removed.push("IPVS: interface kube-ipvs0".into()),
        Ok(false) => {}
        Err(e) => report.errors.push(KubeProxyCleanupError::Failed {
            tool: "rtnetlink".into(),
            stderr: format!("deleting kube-ipvs0: {e}"),
        }),
    }
    // kube-proxy's ipsets (KUBE-CLUSTER-IP, KUBE-LOOP-BACK, ...), unused once its chains
    // are gone.
    if tool_exists("ipset")
        && let Ok(names) = run("ipset", &["list", "-n"], None)
    {
        for name in names
            .lines()
            .map(str::trim)
            .filter(|n| n.starts_with("KUBE-"))
        {
            match run("ipset", &["destroy", name], None) {
                Ok(_) => report.removed.push(format!("ipset {name}")),
                Err(e) => report.errors.push(e),
            }
        }
    }
}

fn tool_exists(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(tool).is_file())
}

fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, KubeProxyCleanupError> {
    let spawn_err = |source| KubeProxyCleanupError::Spawn {
        tool: tool.to_string(),
        source,
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(KubeProxyCleanupError::Failed {
            tool: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED_NAT: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:KUBE-MARK-DROP - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABCDEF - [0:0]
:KUBE-SEP-123456 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A CNI-HOSTPORT-DNAT -m comment --comment "not a -j KUBE-SERVICES jump" -j RETURN
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j KUBE-SVC-ABCDEF
-A KUBE-SVC-ABCDEF -j KUBE-SEP-123456
-A KUBE-SEP-123456 -p tcp -j DNAT --to-destination 10.0.0.1:6443
COMMIT
"#;

    #[test]
    fn plans_one_transaction_removing_kube_proxy_chains_and_jumps() {
        let plan = plan_iptables_cleanup(SAVED_NAT, "nat").expect("something to remove");
        assert_eq!(
            plan.chains,
            [
                "KUBE-MARK-MASQ",
                "KUBE-POSTROUTING",
                "KUBE-SERVICES",
                "KUBE-SVC-ABCDEF",
                "KUBE-SEP-123456"
            ]
        );
        assert_eq!(plan.jumps, 3);
        let expected = "*nat
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABCDEF - [0:0]
:KUBE-SEP-123456 - [0:0]
-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-D OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-X KUBE-MARK-MASQ
-X KUBE-POSTROUTING
-X KUBE-SERVICES
-X KUBE-SVC-ABCDEF
-X KUBE-SEP-123456
COMMIT
";
        assert_eq!(plan.script, expected);
    }

    #[test]
    fn nothing_to_do_without_kube_proxy_chains() {
        let saved = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        assert_eq!(plan_iptables_cleanup(saved, "filter"), None);
        // Only the named table is looked at.
        assert_eq!(plan_iptables_cleanup(SAVED_NAT, "filter"), None);
    }

    #[test]
    fn ownership_leaves_kubelet_and_others_alone() {
        for ours in [
            "KUBE-SERVICES",
            "KUBE-SVC-X",
            "KUBE-EXT-Y",
            "KUBE-PROXY-FIREWALL",
        ] {
            assert!(is_kube_proxy_chain(ours), "{ours}");
        }
        for theirs in [
            "KUBE-FIREWALL",
            "KUBE-MARK-DROP",
            "KUBE-KUBELET-CANARY",
            "CNI-X",
            "KUBE",
        ] {
            assert!(!is_kube_proxy_chain(theirs), "{theirs}");
        }
    }

    #[test]
    fn words_keep_quoted_comments_whole() {
        let words =
            split_words(r#"X -m comment --comment "a \"q\" -j KUBE-SERVICES" -g KUBE-FW-1"#);
        assert_eq!(rule_target(&words), Some("KUBE-FW-1"));
        assert_eq!(words[4], r#"a "q" -j KUBE-SERVICES"#);
    }
}
