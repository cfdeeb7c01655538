//! `svcplane render` end to end: the bundled example, invalid and hostile input, and
//! (as root) the kernel's own check of the generated nftables script.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use svcplane_testkit::{Netns, skip_unless_root};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cluster")
}

fn render(dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svcplane"))
        .args([
            "render",
            "--proxy-mode",
            "nftables",
            "--hostname-override",
            "node-a",
        ])
        .arg("--manifests")
        .arg(dir)
        .args(extra)
        .output()
        .expect("run svcplane")
}

fn render_example() -> (String, String) {
    let out = render(
        &example_dir(),
        &["--cluster-cidr", "10.244.0.0/16,fd00:244::/32"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "render failed: {stderr}");
    (stdout, stderr)
}

#[test]
fn example_renders_both_families_and_reports_the_invalid_object() {
    let (script, stderr) = render_example();
    assert!(script.contains("table ip svcplane"), "{script}");
    assert!(script.contains("table ip6 svcplane"), "{script}");
    // The invalid Service is named with its field, and skipped.
    assert!(stderr.contains("demo/broken"), "{stderr}");
    assert!(stderr.contains("spec.ports[0].port"), "{stderr}");
    assert!(stderr.contains("70000"), "{stderr}");
    assert!(
        !script.contains("10.96.0.99"),
        "invalid service must not be programmed"
    );
    // Every other service is there: ClusterIPs of both families, the NodePort, the LB IP.
    for needle in [
        "10.96.0.10",
        "fd00:96::10",
        "10.96.0.20",
        "30080",
        "192.0.2.100",
        "203.0.113.0/24",
        "198.51.100.53",
        "10.96.0.80",
    ] {
        assert!(script.contains(needle), "missing {needle} in script");
    }
    // Endpoints derived from Pods by the standalone controller (web-1 on node-a, web-2 on
    // node-b); not-ready web-3 left out while ready endpoints exist.
    assert!(script.contains("10.244.1.10"));
    assert!(script.contains("10.244.2.10"));
    assert!(!script.contains("10.244.2.11"));
    // Topology hints: node-a is in zone-a, so only the zone-a endpoint of `zonal` is used.
    assert!(script.contains("10.244.1.70"));
    assert!(!script.contains("10.244.2.70"));
    // Terminating fallback: only the serving terminating endpoint of `draining`.
    assert!(script.contains("10.244.1.60"));
    assert!(!script.contains("10.244.2.60"));
}

#[test]
fn render_is_deterministic() {
    let (a, _) = render_example();
    let (b, _) = render_example();
    assert_eq!(a, b);
}

#[test]
fn hostile_names_never_reach_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("evil.yaml"),
        r#"
apiVersion: v1
kind: Service
metadata: {name: "evil\"; flush ruleset; #", namespace: demo}
spec:
  clusterIP: 10.96.1.1
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: fine, namespace: demo}
spec:
  clusterIP: 10.96.1.2
  ports: [{name: "x}\ndelete table ip svcplane", port: 81}, {name: ok, port: 82}]
---
apiVersion: v1
kind: Service
metadata: {name: good, namespace: demo}
spec:
  clusterIP: 10.96.1.3
  ports: [{port: 83}]
"#,
    )
    .unwrap();
    let out = render(dir.path(), &[]);
    let script = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The API server rejects such objects whole; so does svcplane.
    assert!(!script.contains("flush ruleset"), "{script}");
    assert!(!script.contains("evil"), "{script}");
    assert!(!script.contains("10.96.1.1"), "{script}");
    assert!(!script.contains("10.96.1.2"), "{script}");
    assert!(stderr.contains("metadata.name"), "{stderr}");
    assert!(stderr.contains("spec.ports[0].name"), "{stderr}");
    assert!(
        script.contains("10.96.1.3"),
        "the valid service is still programmed"
    );
}

/// The node-port range is the API server's `--service-node-port-range` (many clusters
/// widen it); kube-proxy programs whatever nodePort a Service carries, and so does svcplane.
#[test]
fn node_ports_outside_the_default_range_are_programmed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("wide.yaml"),
        r#"
apiVersion: v1
kind: Service
metadata: {name: wide, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.2.1
  externalIPs: [198.51.100.7, not-an-ip]
  ports:
  - {name: a, port: 80, nodePort: 3001}
  - {name: b, port: 81, nodePort: 80}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: wide-1, namespace: demo, labels: {kubernetes.io/service-name: wide}}
addressType: IPv4
ports: [{name: a, port: 8080}, {name: b, port: 8081}]
endpoints: [{addresses: [10.244.1.9]}]
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.2.2
  ports: [{port: 80, nodePort: 70000}]
"#,
    )
    .unwrap();
    let out = render(dir.path(), &[]);
    let script = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The bad externalIP costs itself only, reported by object, field and value.
    assert!(
        stderr.contains(
            "Service demo/wide: spec.externalIPs[1]: invalid value \"not-an-ip\": must be a valid IP address; ignored, the rest of the object is used"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 invalid object(s) skipped, 1 value(s) ignored"),
        "{stderr}"
    );
    // The Service is there whole: its nodePorts, ClusterIP and externalIP.
    for needle in [
        "tcp . 3001 : goto nodeport-",
        "tcp . 80 : goto nodeport-",
        "10.96.2.1 . tcp . 80 : goto service-",
        "198.51.100.7 . tcp . 81 : goto external-",
    ] {
        assert!(script.contains(needle), "missing {needle:?} in {script}");
    }
    // A nodePort that is no port at all is still an invalid object.
    assert!(
        stderr.contains(
            "Service demo/broken: spec.ports[0].nodePort: invalid value \"70000\": must be between 1 and 65535"
        ),
        "{stderr}"
    );
    assert!(!script.contains("10.96.2.2"), "{script}");
}

#[test]
fn missing_manifests_dir_is_a_clear_error() {
    let out = render(Path::new("/nonexistent/svcplane-manifests"), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/svcplane-manifests"),
        "{stderr}"
    );
}

#[test]
fn kernel_accepts_the_example_script() {
    if skip_unless_root(&["nft", "ip"]) {
        return;
    }
    let (script, _) = render_example();
    let ns = Netns::new("svcplane-render").expect("create netns");
    let check = ns
        .run_with_input("nft", &["-c", "-f", "-"], &script)
        .unwrap();
    assert!(
        check.status.success(),
        "nft -c rejected the script: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn node_name_comes_from_node_name_env_when_no_override() {
    let manifests = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/cluster");
    let run = |env: Option<&str>, args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_svcplane"));
        cmd.args(["render", "--manifests", manifests]).args(args);
        cmd.env_remove("NODE_NAME");
        if let Some(name) = env {
            cmd.env("NODE_NAME", name);
        }
        cmd.output().expect("run svcplane")
    };
    // An invalid $NODE_NAME is refused, which proves it was read...
    let out = run(Some("Not_A_Node!"), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"not_a_node!\""), "{stderr}");
    // ...and --hostname-override wins over it.
    let out = run(Some("Not_A_Node!"), &["--hostname-override", "node-a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(Some("node-b"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// examples/lab is written as kubectl writes it (no clusterIP, no nodePort): with
/// `--service-cluster-ip-range` the ClusterIPs and the nodePort are allocated, the same on
/// every run; without, each such Service is reported naming the flag and skipped.
#[test]
fn manifests_without_cluster_ips_render_with_allocated_ones() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/lab");
    let ranges = ["--service-cluster-ip-range", "10.96.0.0/16"];
    let out = render(&dir, &ranges);
    let script = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // No Pods in the directory: both ClusterIPs (inside the range) and the allocated
    // nodePort (inside the default node-port range) are rejected, as without endpoints.
    let vips: Vec<&str> = script
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("10.96.") && l.contains(". tcp . 80 : goto reject-chain"))
        .collect();
    assert_eq!(vips.len(), 2, "{script}");
    let node_port: u16 = script
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("tcp . ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no nodePort element:\n{script}"));
    assert!((30000..=32767).contains(&node_port), "{node_port}");
    assert_eq!(
        String::from_utf8_lossy(&render(&dir, &ranges).stdout),
        script,
        "a second run allocates the same"
    );

    let out = render(&dir, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Service lab/web: spec.clusterIP")
            && stderr.contains("--service-cluster-ip-range"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("goto reject-chain"));
}
