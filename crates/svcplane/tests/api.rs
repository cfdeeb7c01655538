//! `svcplane proxy --kubeconfig` against the test kit's fake API server (root): the fake
//! listens inside node-a's namespace, the proxy there watches it and programs the
//! kernel; an EndpointSlice MODIFIED through the API moves the traffic, and the API
//! going away leaves the rules (and the traffic) in place.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use svcplane_testkit::{
    Cluster, FakeApiServer, PodSpec, in_netns, metric_value, parse_echo, skip_unless_root,
    wait_until,
};

/// Per-request timeout and how long a broken test waits: not speed assertions.
const T: Duration = Duration::from_secs(3);
const PATIENCE: Duration = Duration::from_secs(20);
const CLUSTER_IP: &str = "10.96.3.1";

fn service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP], "ipFamilies": ["IPv4"],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

fn slice(ip: &str, node: &str, trigger: Option<SystemTime>) -> Value {
    let mut s = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "nodeName": node}],
    });
    if let Some(t) = trigger {
        s["metadata"]["annotations"] = json!({
            "endpoints.kubernetes.io/last-change-trigger-time":
                humantime::format_rfc3339_seconds(t).to_string(),
        });
    }
    s
}

fn node(name: &str, ip: std::net::Ipv4Addr) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]},
    })
}

#[test]
fn proxy_follows_the_api_and_keeps_rules_when_it_goes_away() {
    if skip_unless_root(&["ip", "nft", "sysctl"]) {
        return;
    }
    let cluster = Cluster::builder()
        .node("node-a", "zone-a")
        .node("node-b", "zone-b")
        .pod(PodSpec::new("client-a", "node-a"))
        .pod(PodSpec::new("web-a", "node-a").tcp(&[8080]))
        .pod(PodSpec::new("web-b", "node-b").tcp(&[8080]))
        .build()
        .expect("virtual cluster");
    let node_a = cluster.node("node-a").expect("node-a");
    let web_a = cluster.pod("web-a").expect("web-a").ipv4();
    let web_b = cluster.pod("web-b").expect("web-b").ipv4();

    // The fake API server's socket lives in node-a's namespace, where the proxy runs.
    let listener = in_netns(node_a.netns().name(), || {
        std::net::TcpListener::bind("127.0.0.1:0")
    })
    .expect("enter node-a")
    .expect("bind in node-a");
    let server = FakeApiServer::serve(listener).expect("fake API server");
    server.apply(node("node-a", node_a.ipv4())).unwrap();
    server.apply(service()).unwrap();
    server
        .apply(slice(&web_a.to_string(), "node-a", None))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();

    let proxy = cluster
        .run_proxy(
            env!("CARGO_BIN_EXE_svcplane"),
            "node-a",
            std::path::Path::new(""),
            &["--kubeconfig", kubeconfig.to_str().unwrap()],
        )
        .expect("svcplane proxy --kubeconfig on node-a");
    let client = cluster.pod("client-a").expect("client-a");
    let dst = format!("{CLUSTER_IP}:80").parse().unwrap();
    let answered_by = || {
        cluster
            .tcp_request(client, dst, T)
            .ok()
            .and_then(|r| parse_echo(&r).ok())
            .map(|e| e.pod)
    };
    assert_eq!(
        answered_by(),
        Some(web_a.into()),
        "the Service from the API"
    );

    // MODIFIED through the API: the endpoint moves to node-b's pod. Its trigger time is
    // 100 s ago, so the latency metric shows it was measured from the annotation.
    let triggered = SystemTime::now() - Duration::from_secs(100);
    server
        .apply(slice(&web_b.to_string(), "node-b", Some(triggered)))
        .unwrap();
    assert!(
        wait_until(PATIENCE, || answered_by() == Some(web_b.into())),
        "traffic did not move to web-b"
    );
    let metrics = proxy.metrics().expect("metrics");
    let latency_sum = metric_value(
        &metrics,
        "kubeproxy_network_programming_duration_seconds_sum",
    )
    .unwrap();
    assert!(
        latency_sum >= 100.0,
        "latency not measured from the trigger time: {latency_sum}"
    );

    // The API goes away: errors are counted and shown, the rules stay, traffic flows.
    server.set_available(false);
    let errors = || {
        proxy
            .metrics()
            .ok()
            .and_then(|t| {
                metric_value(
                    &t,
                    "svcplane_source_watch_errors_total{resource=\"endpointslices\"}",
                )
            })
            .unwrap_or(0.0)
    };
    assert!(
        wait_until(PATIENCE, || errors() >= 1.0),
        "watch errors not counted"
    );
    let (code, body) = proxy.get("/healthz").expect("healthz");
    assert_eq!(
        code, 200,
        "an unreachable API does not fail healthz: {body}"
    );
    let health: Value = serde_json::from_str(&body).expect("healthz JSON");
    assert_eq!(health["source"]["kind"], "kubernetes-api");
    assert_eq!(health["source"]["healthy"], false, "{body}");
    for _ in 0..5 {
        assert_eq!(
            answered_by(),
            Some(web_b.into()),
            "rules kept without the API"
        );
    }
    drop(server);
    assert_eq!(
        answered_by(),
        Some(web_b.into()),
        "rules kept without the API"
    );
    let nft = node_a
        .netns()
        .command("nft", &["list", "map", "ip", "svcplane", "service-ips"])
        .output()
        .expect("nft");
    assert!(
        String::from_utf8_lossy(&nft.stdout).contains(CLUSTER_IP),
        "service-ips lost its entry"
    );
}
