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
