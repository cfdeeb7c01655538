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
