//! What differs between modes, in one place: the tools a mode needs on the node, and how
//! to wreck its rules the way an administrator or a firewall reload would. A new mode
//! adds its arm here; scenarios never match on the mode themselves.

use svcplane_testkit::run_checked;

use crate::env::Env;

/// Tools the mode's proxy (and [`wreck_rules`]) runs, besides `ip` and `sysctl`.
pub fn tools(mode: &str) -> &'static [&'static str] {
    match mode {
        "nftables" => &["nft"],
        "iptables" => &[
            "iptables",
            "ip6tables",
            "iptables-restore",
            "ip6tables-restore",
            "iptables-save",
            "ip6tables-save",
        ],
        other => panic!("no tools listed for mode {other}: add them in traffic/modes.rs"),
    }
}

/// Remove everything the mode programmed on node-a, behind the proxy's back, and check
/// it is gone: the proxy must notice on its own and put it back.
pub fn wreck_rules(env: &Env) {
    let node = env.cluster.node("node-a").expect("node");
    let run = |program: &str, args: &[&str]| {
        run_checked(&mut node.netns().command(program, args))
            .unwrap_or_else(|e| panic!("{program} {args:?} on node-a: {e}"))
    };
    match env.cell.mode {
        "nftables" => {
            run("nft", &["flush", "ruleset"]);
            let out = run("nft", &["list", "tables"]);
            let left = String::from_utf8_lossy(&out.stdout);
            assert!(!left.contains("svcplane"), "nft flush ruleset left: {left}");
        }
        "iptables" => {
            // A firewall reload: every rule and every non-builtin chain of the tables
            // kube-proxy's iptables mode uses, both families.
            for program in ["iptables", "ip6tables"] {
                for table in ["mangle", "nat", "filter"] {
                    run(program, &["-t", table, "-F"]);
                    run(program, &["-t", table, "-X"]);
                }
                let out = run(&format!("{program}-save"), &[]);
                let left = String::from_utf8_lossy(&out.stdout);
                assert!(
                    !left.contains("SVCP-"),
                    "{program} flush left svcplane's chains:\n{left}"
                );
            }
        }
        other => panic!("no way to wreck mode {other}'s rules: add it in traffic/modes.rs"),
    }
}
