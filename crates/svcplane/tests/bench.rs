//! `svcplane bench sync` end to end at a small size: it programs a scratch namespace
//! through the real proxy and reports each measured step from the proxy's own metrics.

use std::process::Command;

use svcplane_testkit::skip_unless_root;

#[test]
fn bench_sync_reports_the_path_from_file_to_kernel() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_svcplane"))
        .args([
            "bench",
            "sync",
            "--services",
            "50",
            "--endpoints",
            "3",
            "--rounds",
            "3",
        ])
        .output()
        .expect("run svcplane bench sync");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("50 ClusterIP services × 3 endpoints"),
        "{stdout}"
    );
    assert!(
        stdout.contains("completed its first (full) sync"),
        "{stdout}"
    );
    // Each line carries a measured median: a number of milliseconds, not "no data".
    for line in [
        "file written → rules in the kernel: ",
        "(network programming): ",
        "the sync alone (render + apply + conntrack): ",
    ] {
        let rest = stdout
            .lines()
            .find_map(|l| l.split_once(line).map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no {line:?} in:\n{stdout}"));
        let median: f64 = rest
            .split(" ms")
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no median in {rest:?}"));
        assert!(median > 0.0, "{line}{rest}");
    }
}

#[test]
fn bench_sync_rejects_nonsense_sizes() {
    let out = Command::new(env!("CARGO_BIN_EXE_svcplane"))
        .args(["bench", "sync", "--services", "0"])
        .output()
        .expect("run svcplane bench sync");
    assert!(!out.status.success());
    if svcplane_testkit::is_root() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--services must be"), "{stderr}");
    }
}

/// The number before `unit` right after `label` in `line`, e.g. `p50 41 µs`.
fn number_after(line: &str, label: &str) -> f64 {
    let rest = line
        .split_once(label)
        .unwrap_or_else(|| panic!("no {label:?} in {line:?}"))
        .1;
    rest.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in {line:?}"))
}

/// `svcplane bench datapath` at a tiny size: a virtual cluster, the real proxy, and
/// requests from a pod through the ClusterIP that sorts last and straight to the pod. A
/// ClusterIP that does not reach the pod fails the command (every request must be answered).
#[test]
fn bench_datapath_measures_the_clusterip_beside_the_pod_ip() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_svcplane"))
        .args([
            "bench",
            "datapath",
            "--services",
            "5,40",
            "--requests",
            "60",
        ])
        .args(["--endpoints", "2", "--proxy-arg=--sync-period=2h"])
        .args(["--", "--masquerade-all"])
        .output()
        .expect("run svcplane bench datapath");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The measured service is the one that sorts last, and it is the pod's.
    assert!(
        stdout.contains("measured: bench/svc-000039 10.96.0.40:80 → "),
        "{stdout}"
    );
    // Both proxy arguments reached the proxy (which became ready with them), and the
    // bench's own --sync-period default gave way to the one given.
    assert!(
        stdout.contains(
            "svcplane proxy --proxy-mode nftables --sync-period=2h --masquerade-all: ready"
        ),
        "{stdout}"
    );
    for services in [5, 40] {
        let prefix = format!("nftables --sync-period=2h --masquerade-all {services} svc: ");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{stdout}"));
        let (via, direct) = line.split_once(" | direct ").expect("two paths");
        for (part, label) in [(via, "p50"), (via, "p99"), (direct, "p50"), (direct, "p99")] {
            assert!(number_after(part, label) > 0.0, "{line}");
        }
        let ratio = number_after(line, "ratio p50");
        assert!(ratio.is_finite() && ratio > 0.0, "{line}");
        assert!(number_after(line, "full sync") > 0.0, "{line}");
        // Below it, the reference measured in the same rounds: pod to pod on a node
        // without rules.
        let reference = stdout
            .lines()
            .skip_while(|l| *l != line)
            .nth(1)
            .unwrap_or_default();
        assert!(
            reference.contains("reference, pod to pod on a node without rules: "),
            "{stdout}"
        );
        assert!(number_after(reference, "p50") > 0.0, "{reference}");
        assert!(
            number_after(reference, "via ClusterIP ÷ that: p50") > 0.0,
            "{reference}"
        );
    }
    assert!(stdout.contains("== summary"), "{stdout}");
}

#[test]
fn bench_datapath_shows_why_the_proxy_did_not_start() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_svcplane"))
        .args(["bench", "datapath", "--services", "3", "--requests", "5"])
        .args(["--", "--no-such-flag"])
        .output()
        .expect("run svcplane bench datapath");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("exited before it was ready"), "{stderr}");
    // The proxy's own complaint, from its log.
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

#[test]
fn bench_datapath_rejects_nonsense_sizes() {
    for args in [
        &["--services", "0"][..],
        &["--services", "10,600000"],
        &["--requests", "0"],
        &["--endpoints", "0"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_svcplane"))
            .args(["bench", "datapath"])
            .args(args)
            .output()
            .expect("run svcplane bench datapath");
        assert!(!out.status.success(), "{args:?}");
        if svcplane_testkit::is_root() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("must be"), "{args:?}: {stderr}");
        }
    }
}

/// Ctrl-C in the middle of a measurement stops it and tears the virtual cluster down.
#[test]
fn bench_datapath_interrupted_leaves_no_namespace() {
    use std::io::{BufRead, BufReader};
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_svcplane"))
        .args([
            "bench",
            "datapath",
            "--services",
            "10",
            "--requests",
            "100000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run svcplane bench datapath");
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped");
    // The proxy is ready: the measurement starts now (and lasts far longer than this test).
    // Kept open to the end: a closed pipe would fail the bench's next print.
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    let ready = lines.any(|line| line.contains(": ready (read the manifests"));
    assert!(ready, "the bench never got its proxy ready");
    let ours = || -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.contains(&format!("-{pid}-")))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(!ours().is_empty(), "the cluster's namespaces should exist");
    let killed = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = child.wait_with_output().expect("wait for the bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(ours(), Vec::<String>::new(), "namespaces left behind");
    drop(lines);
}
