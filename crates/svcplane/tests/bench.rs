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
            "--churn",
            "3s",
        ])
        .output()
        .expect("run svcplane bench sync");
    let stdout = succeeded(&out);
    assert!(
        stdout.contains("50 ClusterIP services × 3 endpoints"),
        "{stdout}"
    );
    assert!(
        stdout.contains("completed its first (full) sync"),
        "{stdout}"
    );
    let after = |label: &str| after(&stdout, label);
    assert!(number_after(after("RSS after it: "), "") > 0.0, "{stdout}");
    // Each line carries measured percentiles: numbers of milliseconds, not "no data".
    for line in [
        "file written → rules in the kernel: ",
        "(network programming): ",
        "the sync alone (render + apply + conntrack): ",
        "to the sync's end (every thread): ",
    ] {
        let rest = after(line);
        let (p50, p99) = (number_after(rest, "p50"), number_after(rest, "p99"));
        assert!(p50 > 0.0 && p99 >= p50, "{line}{rest}");
    }
    // The churn soak: a change per second for 3 s, every one synced, none failed.
    let changes = number_after(after("== churn done: "), "");
    assert!(changes >= 2.0, "{stdout}");
    let rss = after("RSS: after the first sync ");
    assert!(number_after(rss, "") > 0.0, "{rss}");
    assert!(number_after(rss, "at the end") > 0.0, "{rss}");
    assert!(
        number_after(after("the sync alone: "), "p99") > 0.0,
        "{stdout}"
    );
    assert_eq!(
        after("failed syncs (the proxy's metrics): "),
        "0; changes not in the kernel within 30s: 0",
        "{stdout}"
    );
}

/// The same bench from the fake API server: the proxy lists it through a kubeconfig and
/// each round's slice, applied to the server, reaches the kernel.
#[test]
fn bench_sync_from_the_api_source() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_svcplane"))
        .args(["bench", "sync", "--source", "api", "--services", "50"])
        .args(["--endpoints", "3", "--rounds", "3"])
        .output()
        .expect("run svcplane bench sync --source api");
    let stdout = succeeded(&out);
    let after = |label: &str| after(&stdout, label);
    assert!(
        after("50 ClusterIP services × 3 endpoints ").starts_with("served by the fake"),
        "{stdout}"
    );
    let lists = after("one list each (HTTP/1.0 from the namespace): ");
    assert!(number_after(lists, "services") >= 0.0, "{lists}");
    assert!(number_after(lists, "endpointslices") >= 0.0, "{lists}");
    assert!(
        stdout.contains("listed the API and completed its first (full) sync"),
        "{stdout}"
    );
    assert!(number_after(after("RSS after it: "), "") > 0.0, "{stdout}");
    // Each resource was watched after its list, within the time to the first sync.
    let first = number_after(after("completed its first (full) sync in "), "");
    let listed = after("lists answered, read and converted (the proxy's first watch of each) ");
    let done = number_after(listed, "");
    assert!(done > 0.0 && done <= first, "{stdout}");
    for resource in ["services", "endpointslices", "nodes"] {
        assert!(number_after(listed, resource) <= done, "{listed}");
    }
    let rest = after("object applied to the API server → rules in the kernel: ");
    let (p50, p99) = (number_after(rest, "p50"), number_after(rest, "p99"));
    assert!(p50 > 0.0 && p99 >= p50, "{rest}");
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

/// The command's stdout, once it exited successfully (else both outputs in the panic).
fn succeeded(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The rest of the first line of `stdout` that contains `label`, after it.
fn after<'a>(stdout: &'a str, label: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.split_once(label).map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no {label:?} in:\n{stdout}"))
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
            "40",
            "--target-endpoints",
            "1,3",
            "--requests",
            "60",
        ])
        .args(["--endpoints", "2", "--proxy-arg=--sync-period=2h"])
        .args(["--", "--masquerade-all"])
        .output()
        .expect("run svcplane bench datapath");
    let stdout = succeeded(&out);
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
    // Three endpoints: the pod on 8080..8082, each one answering (or the command fails).
    assert!(
        stdout.contains(":8080..8082 (3 endpoints: the pod on 3 ports)"),
        "{stdout}"
    );
    for target in [1, 3] {
        let prefix = format!(
            "nftables --sync-period=2h --masquerade-all 40 svc, target {target} endpoint(s): "
        );
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

/// `svcplane bench` at a tiny size: every series of every mode this binary implements on
/// one virtual cluster, and the results as CSV, JSON and SVG with a row (a point) per
/// (series, number of Services). A mode this kernel cannot run is listed as skipped.
#[test]
fn bench_runs_every_mode_and_writes_csv_json_and_svg() {
    use std::collections::BTreeSet;
    use svcplane_dataplane::ProxyMode;
    if skip_unless_root(&["ip", "nft", "iptables-restore", "timeout"]) {
        return;
    }
    let out_dir = tempfile::tempdir().expect("an output directory");
    // A deadline: a hung bench fails the test instead of stalling the suite (SIGTERM
    // makes the bench tear its cluster down).
    let out = Command::new("timeout")
        .args(["--kill-after=20", "240"])
        .arg(env!("CARGO_BIN_EXE_svcplane"))
        .args(["bench", "--services", "1,50", "--requests", "40"])
        .args(["--changes", "2", "--out"])
        .arg(out_dir.path())
        .output()
        .expect("run svcplane bench");
    let stdout = succeeded(&out);
    let read = |name: &str| {
        std::fs::read_to_string(out_dir.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{stdout}"))
    };

    // What must have run: every flavour of every mode this kernel supports.
    let mut expected = BTreeSet::new();
    let mut unsupported = BTreeSet::new();
    for mode in ProxyMode::ALL {
        for flavour in mode.flavours() {
            if mode.kernel_support().is_ok() {
                for services in [1, 50] {
                    expected.insert((flavour.name.to_owned(), services));
                }
            } else {
                unsupported.insert(flavour.name.to_owned());
            }
        }
    }
    assert!(
        expected.contains(&("iptables-linear".to_owned(), 50)),
        "{expected:?}"
    );

    let csv = read("bench.csv");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("a header").split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no column {name} in {header:?}"))
    };
    let mut from_csv = BTreeSet::new();
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), header.len(), "{line}");
        let services: u32 = cells[col("services")].parse().expect("services");
        from_csv.insert((cells[col("series")].to_owned(), services));
        // Every measurement is there and positive (a ClusterIP that did not reach the pod
        // fails the bench: every request must be answered).
        for name in [
            "via_p50_us",
            "via_p99_us",
            "direct_p50_us",
            "ratio_p50",
            "rps_via",
            "rps_direct",
            "full_sync_s",
            "change_p50_ms",
            "change_sync_p50_ms",
            "rss_mib",
        ] {
            let v: f64 = cells[col(name)]
                .parse()
                .unwrap_or_else(|_| panic!("{name} in {line}"));
            assert!(v > 0.0 && v.is_finite(), "{name} in {line}");
        }
    }
    assert_eq!(from_csv, expected, "{csv}");

    let json: serde_json::Value = serde_json::from_str(&read("bench.json")).expect("JSON");
    let results = json["results"].as_array().expect("results");
    let from_json: BTreeSet<(String, u32)> = results
        .iter()
        .map(|r| {
            let series = r["series"].as_str().expect("series").to_owned();
            let services = r["services"].as_u64().expect("services");
            (series, u32::try_from(services).expect("u32"))
        })
        .collect();
    assert_eq!(from_json, expected);
    assert_eq!(results.len(), expected.len());
    let skipped: BTreeSet<String> = json["skipped"]
        .as_array()
        .expect("skipped")
        .iter()
        .map(|s| s["series"].as_str().expect("series").to_owned())
        .collect();
    assert_eq!(skipped, unsupported);
    for series in &unsupported {
        assert!(
            stdout.contains(&format!("== {series}: skipped: this kernel cannot run it")),
            "{stdout}"
        );
    }

    let svg = read("bench.svg");
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<svg").count(), 1);
    let series: BTreeSet<&str> = expected.iter().map(|(s, _)| s.as_str()).collect();
    for name in &series {
        // A line in each panel (ClusterIP ÷ pod IP, ÷ node without rules, sync time),
        // each through both sizes.
        let lines: Vec<&str> = svg
            .lines()
            .filter(|l| l.contains(&format!("data-series=\"{name}\"")))
            .collect();
        assert_eq!(lines.len(), 3, "{name}: {svg}");
        for line in lines {
            let points = line
                .split("points=\"")
                .nth(1)
                .and_then(|p| p.split('"').next())
                .unwrap_or_default();
            assert_eq!(points.split_whitespace().count(), 2, "{line}");
        }
    }

    // The terminal table (after the per-run lines): a row per run.
    let (_, table) = stdout
        .split_once("\nseries ")
        .unwrap_or_else(|| panic!("no table in:\n{stdout}"));
    for (series, services) in &expected {
        assert!(
            table.lines().any(|l| {
                let mut cells = l.split_whitespace();
                cells.next() == Some(series.as_str())
                    && cells.next() == Some(services.to_string().as_str())
            }),
            "no table row for {series} {services}:\n{stdout}"
        );
    }
}

#[test]
fn bench_rejects_an_unknown_mode() {
    let out = Command::new(env!("CARGO_BIN_EXE_svcplane"))
        .args(["bench", "--modes", "nftables,userspace"])
        .output()
        .expect("run svcplane bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--modes userspace: no such series") && stderr.contains("iptables-linear"),
        "{stderr}"
    );
}
