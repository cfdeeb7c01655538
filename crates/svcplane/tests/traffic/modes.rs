//! What differs between modes, in one place: the tools a mode needs on the node, and how
//! to wreck its rules the way an administrator or a firewall reload would. A new mode
//! adds its arm here; scenarios never match on the mode themselves.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use svcplane_testkit::{Cgroup, bpf_test_mounts, run_checked};

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
        "ipvs" => &["nft"],
        // Startup removes the other modes' leftovers with nft (none here, per namespace).
        "ebpf" => &["nft"],
        other => panic!("no tools listed for mode {other}: add them in traffic/modes.rs"),
    }
}

/// Why this machine cannot run the mode at all (its kernel lacks a feature), or `None`.
/// The cells then print `SKIP` with this reason; `make test-ipvs` runs the ipvs cells in
/// a VM whose kernel has IPVS.
pub fn unavailable(mode: &str) -> Option<String> {
    match mode {
        "ipvs" => {
            for module in ["ip_vs", "dummy"] {
                let _ = std::process::Command::new("modprobe")
                    .arg(module)
                    .stderr(std::process::Stdio::null())
                    .status();
            }
            (!std::path::Path::new("/proc/net/ip_vs").exists()).then(|| {
                "this kernel has no IPVS (modprobe ip_vs failed, no /proc/net/ip_vs); \
                 `make test-ipvs` runs the ipvs cells in a VM with Debian's kernel"
                    .to_string()
            })
        }
        _ => None,
    }
}

/// Remove everything the mode programmed on node-a, behind the proxy's back: the proxy
/// must notice on its own and put it back. Each command's success is checked, not the
/// absence afterwards: at `--sync-period 1s` the proxy may already have repaired it (seen
/// under load). The scenario proves the wreck was noticed: the full-sync count rises.
pub fn wreck_rules(env: &Env) {
    let node = env.cluster.node("node-a").expect("node");
    let run = |program: &str, args: &[&str]| {
        run_checked(&mut node.netns().command(program, args))
            .unwrap_or_else(|e| panic!("{program} {args:?} on node-a: {e}"))
    };
    match env.cell.mode {
        "nftables" => {
            run("nft", &["flush", "ruleset"]);
        }
        "iptables" => {
            // A firewall reload: every rule and every non-builtin chain of the tables
            // kube-proxy's iptables mode uses, both families.
            for program in ["iptables", "ip6tables"] {
                for table in ["mangle", "nat", "filter"] {
                    run(program, &["-t", table, "-F"]);
                    run(program, &["-t", table, "-X"]);
                }
            }
        }
        "ipvs" => {
            // The dummy interface (and with it the service addresses) and the filter
            // tables; the virtual servers stay, unreachable without their addresses.
            run("ip", &["link", "del", "svcplane-ipvs0"]);
            run("nft", &["flush", "ruleset"]);
        }
        "ebpf" => {
            // Unpin the programs' links and the maps: the periodic check finds the pins
            // gone and runs a full sync that puts them back (the scenario asserts it).
            // And the north-south nftables table, as nftables mode's.
            let hooks = env.hooks("node-a").expect("node-a's eBPF hooks");
            std::fs::remove_dir_all(&hooks.pins)
                .unwrap_or_else(|e| panic!("remove {}: {e}", hooks.pins.display()));
            run("nft", &["flush", "ruleset"]);
        }
        other => panic!("no way to wreck mode {other}'s rules: add it in traffic/modes.rs"),
    }
}

/// A node's eBPF-mode scratch: its proxy attaches the socket load balancer to a cgroup of
/// its own and pins under a directory of its own (parallel cells never share them), and
/// the cell's requests from that node and its pods run inside the cgroup
/// ([`svcplane_testkit::in_cgroup`]): that is where the socket-LB sees them.
#[derive(Debug)]
pub struct NodeHooks {
    pub cgroup: Cgroup,
    pub pins: PathBuf,
}

static PINS: AtomicUsize = AtomicUsize::new(0);

impl NodeHooks {
    /// The hooks of `mode`'s proxy on a node: `Some` for ebpf only.
    pub fn for_mode(mode: &str) -> Option<NodeHooks> {
        if mode != "ebpf" {
            return None;
        }
        let cgroup = Cgroup::new("svcp-traffic").expect("scratch cgroup");
        let (bpffs, _) = bpf_test_mounts().expect("bpffs");
        let pins = bpffs.join(format!(
            "traffic-{}-{}",
            std::process::id(),
            PINS.fetch_add(1, Ordering::Relaxed)
        ));
        Some(NodeHooks { cgroup, pins })
    }

    /// The `svcplane proxy` flags naming them.
    pub fn proxy_args(&self) -> Vec<String> {
        let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
        vec![
            "--bpf-pin-path".into(),
            path(&self.pins),
            "--cgroup-path".into(),
            path(self.cgroup.path()),
        ]
    }
}

impl Drop for NodeHooks {
    fn drop(&mut self) {
        // The proxies are stopped by now; their pins outlive them by design.
        let _ = run_checked(
            std::process::Command::new(env!("CARGO_BIN_EXE_svcplane"))
                .args(["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-path"])
                .arg(&self.pins),
        );
    }
}
