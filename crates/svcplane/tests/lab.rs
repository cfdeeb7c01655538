//! `svcplane lab`, the entry point of `make lab`, end to end: its transcript names the
//! pods that answered each Service path, and it leaves no namespace behind, also when
//! interrupted with Ctrl-C. Without root it renders only.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use svcplane_testkit::skip_unless_root;

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cluster")
}

fn lab() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_svcplane"));
    cmd.arg("lab")
        .arg("--manifests")
        .arg(example_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Namespaces whose name carries `pid` (the test kit names every one `svk-...-<pid>-<n>`).
fn namespaces_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let tag = format!("-{pid}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with("svk-") && name.contains(&tag))
        .map(str::to_string)
        .collect()
}

/// The result line printed under the probe line that starts with `head`.
fn result_of<'a>(transcript: &'a str, head: &str) -> &'a str {
    let mut lines = transcript.lines();
    while let Some(line) = lines.next() {
        if line.trim_start().starts_with(head) {
            return lines.next().unwrap_or("");
        }
    }
    panic!("no probe {head:?} in the transcript:\n{transcript}");
}

#[test]
fn lab_transcript_names_the_answering_pods() {
    if skip_unless_root(&["ip", "nft", "sysctl"]) {
        return;
    }
    let child = lab().spawn().expect("run svcplane lab");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for svcplane lab");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    // The render part comes first.
    assert!(stdout.starts_with("== svcplane render"), "{stdout}");
    assert!(
        stdout.contains("add element ip svcplane service-ips"),
        "{stdout}"
    );

    // ClusterIP from a pod: both ready web pods answer; not-Ready web-3 never does, and
    // the pod's own address is what they see.
    let web = result_of(
        &stdout,
        "ok demo/web ClusterIP 10.96.0.10:80/tcp from shop-1",
    );
    assert!(web.contains("web-1 ×") && web.contains("web-2 ×"), "{web}");
    assert!(!web.contains("web-3"), "{web}");
    assert!(web.ends_with("source seen: shop-1"), "{web}");
    let web6 = result_of(&stdout, "ok demo/web ClusterIP [fd00:96::10]:80/tcp");
    assert!(
        web6.contains("web-1 ×") && web6.contains("web-2 ×"),
        "{web6}"
    );

    // NodePort with eTP Local from the external client: only node-a's shop pod, and the
    // client's own address arrives.
    let shop = result_of(
        &stdout,
        "ok demo/shop NodePort 10.0.0.11:30080/tcp from client",
    );
    assert!(shop.contains("answered by shop-1 ×10;"), "{shop}");
    assert!(shop.ends_with("source seen: client"), "{shop}");

    // eTP Cluster through a LoadBalancer IP: masqueraded to node-a.
    let store = result_of(
        &stdout,
        "ok demo/store LoadBalancer 192.0.2.100:80/tcp from client@",
    );
    assert!(store.ends_with("source seen: node-a"), "{store}");

    // Endpoints of a hand-written EndpointSlice, on both nodes.
    let resolver = result_of(&stdout, "ok demo/resolver externalIP 198.51.100.53:53/udp");
    assert!(
        resolver.contains("resolver-node-a ×") && resolver.contains("resolver-node-b ×"),
        "{resolver}"
    );
    assert!(!stdout.contains("   !! "), "{stdout}");

    // The invalid object, as the proxy reported and counted it.
    assert!(
        stdout.contains("the proxy reported:")
            && stdout.contains("Service demo/broken: spec.ports[0].port"),
        "{stdout}"
    );
    assert!(
        stdout.contains("svcplane_invalid_objects_total 1"),
        "{stdout}"
    );

    assert!(
        stdout.contains("== torn down: no namespace of this lab is left"),
        "{stdout}"
    );
    assert_eq!(namespaces_of(pid), Vec::<String>::new());
}

#[test]
fn lab_tears_down_on_ctrl_c() {
    if skip_unless_root(&["ip", "nft", "sysctl"]) {
        return;
    }
    // Its own process group, so the "Ctrl-C" reaches the lab and the proxy it runs, as
    // a terminal's would.
    let mut child = lab().process_group(0).spawn().expect("run svcplane lab");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut transcript = String::new();
    loop {
        let mut line = String::new();
        let n = stdout.read_line(&mut line).expect("read the transcript");
        transcript += &line;
        assert!(
            n > 0,
            "the lab ended before its cluster was up:\n{transcript}"
        );
        if line.starts_with("== live") {
            break;
        }
    }
    assert!(
        !namespaces_of(pid).is_empty(),
        "the cluster should be up now"
    );
    let status = Command::new("kill")
        .args(["-s", "INT", "--", &format!("-{pid}")])
        .status()
        .expect("kill");
    assert!(status.success());
    stdout
        .read_to_string(&mut transcript)
        .expect("read the transcript");
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr).expect("read stderr");
    }
    let status = child.wait().expect("wait for svcplane lab");
    assert!(
        !status.success(),
        "an interrupted lab must fail:\n{transcript}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        transcript.contains("== torn down: no namespace of this lab is left"),
        "{transcript}"
    );
    assert_eq!(namespaces_of(pid), Vec::<String>::new());
}

#[test]
fn lab_without_root_renders_only() {
    let mut cmd = lab();
    if svcplane_testkit::is_root() {
        // Run it as nobody: the same binary, without the privileges.
        let Ok(setpriv) = which("setpriv") else {
            eprintln!("SKIP: setpriv (util-linux) is needed to run the lab without root");
            return;
        };
        let mut as_nobody = Command::new(setpriv);
        as_nobody
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_svcplane"))
            .arg("lab")
            .arg("--manifests")
            .arg(example_dir())
            .stdin(Stdio::null());
        cmd = as_nobody;
    }
    let out = cmd.output().expect("run svcplane lab");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("Permission denied") {
        eprintln!("SKIP: nobody cannot read the build or the example here: {stderr}");
        return;
    }
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Service demo/broken"), "{stdout}");
    assert!(stdout.contains("service-ips"), "{stdout}");
    assert!(stdout.contains("needs root"), "{stdout}");
    assert!(!stdout.contains("== live"), "{stdout}");
}

fn which(tool: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .ok_or(())
}

// ---- `svcplane lab` on examples/lab: the DNS → VIP → Pod walk, every mode ----

fn lab_example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/lab")
}

/// `svcplane lab --manifests DIR ARGS` (wait for it with [`finish`]).
fn walk(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_svcplane"));
    cmd.arg("lab")
        .arg("--manifests")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// How long a lab run may take before the test kills it and fails (it takes seconds).
const LAB_DEADLINE: std::time::Duration = std::time::Duration::from_secs(180);

/// Its output once it exits; killed and failed after [`LAB_DEADLINE`] (a hung lab fails
/// the test instead of stalling the suite).
fn finish(mut child: std::process::Child) -> std::process::Output {
    // Read by threads, so a full pipe never blocks the lab (whichever the caller took).
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut v);
            }
            v
        })
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = std::time::Instant::now() + LAB_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for svcplane lab") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("svcplane lab still running after {LAB_DEADLINE:?}; killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// What a lab run by `pid` could leave behind besides namespaces: its pods' resolv.conf
/// files, eBPF pins and cgroups (the test kit's scratch mounts).
fn other_leftovers(pid: u32) -> Vec<String> {
    let tag = format!("-{pid}-");
    let mut left = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("svk-") && name.contains(&tag) {
                left.push(format!("/etc/netns/{name}"));
            }
        }
    }
    if let Ok((bpffs, cgroup2)) = svcplane_testkit::bpf_test_mounts() {
        let pins = bpffs.join(format!("lab-{pid}"));
        if pins.exists() {
            left.push(pins.display().to_string());
        }
        for e in std::fs::read_dir(cgroup2).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("svcp-lab-{pid}-")) {
                left.push(name);
            }
        }
    }
    left
}

#[test]
fn lab_walks_examples_lab_in_every_mode_and_leaves_nothing() {
    if skip_unless_root(&["ip", "nft", "sysctl", "dig"]) {
        return;
    }
    let child = walk(&lab_example_dir(), &["--json"])
        .spawn()
        .expect("run svcplane lab");
    let pid = child.id();
    let out = finish(child);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("--json is JSON");
    let modes = report["modes"].as_array().expect("modes");
    let names: Vec<&str> = modes.iter().filter_map(|m| m["mode"].as_str()).collect();
    let all: Vec<&str> = svcplane_dataplane::ProxyMode::ALL
        .iter()
        .map(|m| m.as_str())
        .collect();
    assert_eq!(names, all, "every mode the binary has");
    for m in modes {
        let mode = m["mode"].as_str().unwrap_or_default();
        if let Some(why) = m["skipped"].as_str() {
            // Only a kernel without IPVS may skip a mode, and it says where it runs.
            assert_eq!(mode, "ipvs", "{why}");
            assert!(why.contains("make test-ipvs"), "{why}");
            continue;
        }
        assert!(m["error"].is_null(), "{mode}: {}", m["error"]);
        let hops = m["hops"].as_array().expect("hops");
        assert_eq!(hops.len(), 5, "{mode}: {hops:?}");
        for hop in hops {
            assert_ne!(hop["ok"], false, "{mode}: {hop}");
        }
        let text = |i: usize| hops[i]["lines"].to_string();
        // DNS: the short name and the FQDN give the allocated ClusterIP, the headless
        // name the three Pods, the ExternalName its CNAME.
        assert!(text(0).contains("✓ web → A 10.96."), "{mode}: {}", text(0));
        assert!(
            text(0).contains("✓ docs → CNAME kubernetes.io"),
            "{}",
            text(0)
        );
        // The NodePort hop ran (in eBPF mode through its north-south table).
        assert_eq!(hops[3]["ok"], true, "{mode}: {}", text(3));
        assert!(m["change_to_kernel_s"].as_f64().is_some(), "{mode}: {m}");
        assert!(
            m["latency_cluster_ip_p50_us"].as_f64().is_some(),
            "{mode}: {m}"
        );
    }
    assert_eq!(report["left_behind"], serde_json::json!([]));
    assert!(stderr.contains("== side by side"), "{stderr}");
    assert_eq!(namespaces_of(pid), Vec::<String>::new());
    assert_eq!(other_leftovers(pid), Vec::<String>::new());
}

#[test]
fn lab_exits_non_zero_when_a_hop_goes_otherwise() {
    if skip_unless_root(&["ip", "nft", "sysctl", "dig"]) {
        return;
    }
    // The Service's targetPort points where no container listens: the requests to its
    // name are refused, which is not what the walk predicts.
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(lab_example_dir()).expect("examples/lab") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let text = text.replace("targetPort: 8080", "targetPort: 8081");
        std::fs::write(dir.path().join(path.file_name().expect("name")), text).expect("write");
    }
    let child = walk(dir.path(), &["--proxy-mode", "nftables"])
        .spawn()
        .expect("run svcplane lab");
    let pid = child.id();
    let out = finish(child);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("!! 30 requests to the name"), "{stdout}");
    assert!(stderr.contains("did not behave as predicted"), "{stderr}");
    assert!(stdout.contains("== torn down"), "{stdout}");
    assert_eq!(namespaces_of(pid), Vec::<String>::new());
    assert_eq!(other_leftovers(pid), Vec::<String>::new());
}

#[test]
fn lab_walk_tears_down_on_ctrl_c() {
    if skip_unless_root(&["ip", "nft", "sysctl", "dig"]) {
        return;
    }
    // eBPF mode: the most to tear down (cgroup and pins besides namespaces).
    let mut child = walk(&lab_example_dir(), &["--proxy-mode", "ebpf", "--keep"])
        .process_group(0)
        .spawn()
        .expect("run svcplane lab");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut transcript = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no --keep line ({e}):\n{transcript}"));
        transcript += &line;
        transcript.push('\n');
        if line.starts_with("-- --keep") {
            break;
        }
    }
    assert!(!namespaces_of(pid).is_empty(), "the cluster should be up");
    // The whole group, as a terminal's Ctrl-C: the lab and the proxy it runs.
    let status = Command::new("kill")
        .args(["-s", "INT", "--", &format!("-{pid}")])
        .status()
        .expect("kill");
    assert!(status.success());
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(60)) {
        transcript += &line;
        transcript.push('\n');
    }
    let _ = reader.join();
    let out = finish(child);
    let status = out.status;
    assert!(
        !status.success(),
        "an interrupted lab must fail:\n{transcript}"
    );
    assert!(
        transcript.contains("== torn down: no namespace"),
        "{transcript}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    assert_eq!(namespaces_of(pid), Vec::<String>::new());
    assert_eq!(other_leftovers(pid), Vec::<String>::new());
}
