//! `svcplane trace` as a user runs it (no root, no kernel): from the Kubernetes API's
//! initial lists (the test kit's fake API server) and its errors. What it says about
//! each Service path is checked against the scenario table's traffic in `traffic.rs`
//! (`the_table::trace_agrees_with_the_traffic_of_every_cell`).

use std::process::{Command, Output};

use serde_json::{Value, json};
use svcplane_testkit::FakeApiServer;

/// `svcplane trace ARGS`, bounded by `timeout` so a stuck run fails instead of hanging.
fn trace(args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_svcplane"))
        .arg("trace")
        .args(args)
        .output()
        .expect("run svcplane trace")
}

#[test]
fn traces_from_the_apis_initial_lists() {
    let server = FakeApiServer::start().expect("fake API server");
    server
        .apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "demo", "resourceVersion": "1"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
        }))
        .expect("service");
    server
        .apply(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "node-a",
                           "conditions": {"ready": true}}]
        }))
        .expect("slice");
    server
        .apply(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.11"}]}
        }))
        .expect("node");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let kubeconfig = kubeconfig.to_str().expect("utf-8");

    let out = trace(&[
        "--kubeconfig",
        kubeconfig,
        "--node",
        "node-a",
        "--json",
        "web.demo.svc.cluster.local",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let t = &report["traces"][0];
    assert_eq!(report["addresses"], json!(["10.96.0.10"]), "{report:#}");
    assert_eq!(t["service"], "demo/web:http/TCP", "{report:#}");
    assert_eq!(t["outcome"], "forward");
    assert_eq!(t["endpoints"][0]["ip"], "10.244.1.5");
    assert_eq!(t["endpoints"][0]["port"], 8080);
    assert_eq!(t["endpoints"][0]["local"], true);
    assert!(
        t["kernel"]
            .as_array()
            .is_some_and(|k| k.iter().any(|l| l["matches"] == true)),
        "{t:#}"
    );
}

#[test]
fn says_what_is_not_there() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/cluster");
    let base = ["--manifests", examples, "--node", "node-a"];
    let fails = |extra: &[&str], want: &str| {
        let out = trace(&[&base[..], extra].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
    };
    fails(
        &["--to", "10.1.2.3:80"],
        "no Service at 10.1.2.3:80/TCP on node node-a",
    );
    fails(&["nope.demo.svc.cluster.local"], "NXDOMAIN");
    fails(&["example.com"], "not a name of the cluster domain");
    fails(
        &["--to", "10.96.0.10:80", "--proto", "icmp"],
        "unknown protocol",
    );
}
