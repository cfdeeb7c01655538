//! `svcplane proxy --kubeconfig` against the test kit's fake API server (root): the fake
//! listens inside node-a's namespace, the proxy there watches it and programs the
//! kernel; an EndpointSlice MODIFIED through the API moves the traffic, and the API
//! going away leaves the rules (and the traffic) in place. And the bootstrap case: a
//! proxy reaching the API only through the `kubernetes` Service's ClusterIP is stuck on
//! a node without Service rules, while deploy/'s configuration (the real address) works.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use svcplane_testkit::{
    Cluster, FakeApiServer, PodSpec, ProxyLaunch, http_get, in_netns, metric_value, parse_echo,
    skip_unless_root, wait_until,
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

/// The `kubernetes` Service's ClusterIP in the bootstrap test (what KUBERNETES_SERVICE_HOST
/// says in every Pod).
const API_CLUSTER_IP: &str = "10.96.0.1";
/// What svcplane logs when its API address is a ClusterIP it must program itself.
const CLUSTER_IP_WARNING: &str = "$KUBERNETES_SERVICE_HOST, the `kubernetes` Service's ClusterIP";

/// `default/kubernetes` as the API server publishes it: ClusterIP :443 to the API
/// server's real address.
fn kubernetes_service(api: std::net::SocketAddr) -> [Value; 2] {
    [
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": API_CLUSTER_IP, "clusterIPs": [API_CLUSTER_IP],
                     "ipFamilies": ["IPv4"],
                     "ports": [{"name": "https", "port": 443, "targetPort": api.port()}]},
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": api.port(), "protocol": "TCP"}],
            "endpoints": [{"addresses": [api.ip().to_string()], "conditions": {"ready": true}}],
        }),
    ]
}

#[test]
fn a_proxy_that_reaches_the_api_only_through_a_cluster_ip_it_programs_is_stuck() {
    if skip_unless_root(&["ip", "nft", "sysctl", "ss"]) {
        return;
    }
    let cluster = Cluster::builder()
        .node("node-a", "zone-a")
        .node("node-b", "zone-b")
        .pod(PodSpec::new("client-a", "node-a"))
        .pod(PodSpec::new("web-a", "node-a").tcp(&[8080]))
        .build()
        .expect("virtual cluster");
    let node_a = cluster.node("node-a").expect("node-a");
    let node_b = cluster.node("node-b").expect("node-b");
    let client = cluster.pod("client-a").expect("client-a");
    let web_a = cluster.pod("web-a").expect("web-a").ipv4();

    // The API server at a real address of the cluster (node-b's, as a control-plane
    // node), fronted by the `kubernetes` Service.
    let listener = in_netns(node_b.netns().name(), || {
        std::net::TcpListener::bind((node_b.ipv4(), 0))
    })
    .expect("enter node-b")
    .expect("bind in node-b");
    let server = FakeApiServer::serve(listener).expect("fake API server");
    server.apply(node("node-a", node_a.ipv4())).unwrap();
    for object in kubernetes_service(server.addr()) {
        server.apply(object).unwrap();
    }
    server.apply(service()).unwrap();
    server
        .apply(slice(&web_a.to_string(), "node-a", None))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let via_cluster_ip = dir.path().join("in-cluster.kubeconfig");
    let api_cluster_ip = format!("http://{API_CLUSTER_IP}:443");
    server
        .write_kubeconfig_via(&via_cluster_ip, &api_cluster_ip)
        .unwrap();
    let real = dir.path().join("real-address.kubeconfig");
    server.write_kubeconfig(&real).unwrap();
    // What the DaemonSet's Pod gets, whichever kubeconfig it uses.
    let pod_env = vec![
        (
            "KUBERNETES_SERVICE_HOST".to_string(),
            API_CLUSTER_IP.to_string(),
        ),
        ("KUBERNETES_SERVICE_PORT".to_string(), "443".to_string()),
    ];
    let bin = env!("CARGO_BIN_EXE_svcplane");
    let no_manifests = std::path::Path::new("");
    let web = format!("{CLUSTER_IP}:80").parse().unwrap();
    let api_via_service: std::net::SocketAddr = format!("{API_CLUSTER_IP}:443").parse().unwrap();

    // (a) The API address is the ClusterIP, and nothing programs it on this node.
    let log_a = dir.path().join("a.log");
    let via_cluster_ip_arg = via_cluster_ip.to_str().unwrap();
    let stuck = cluster
        .launch_proxy(
            bin,
            "node-a",
            no_manifests,
            &["--kubeconfig", via_cluster_ip_arg],
            &ProxyLaunch {
                log: Some(log_a.clone()),
                env: pod_env.clone(),
                no_wait: true,
                ..ProxyLaunch::default()
            },
        )
        .expect("svcplane proxy via the ClusterIP");
    let log = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        wait_until(PATIENCE, || log(&log_a).contains(CLUSTER_IP_WARNING)),
        "no warning about the ClusterIP: {}",
        log(&log_a)
    );
    assert!(
        log(&log_a).contains("kubectl config view --minify"),
        "the warning gives no advice: {}",
        log(&log_a)
    );
    // Stuck: its connections to the ClusterIP go unanswered (the SYN is routed to the
    // default gateway, which drops it), so the API never sees a request and nothing syncs.
    let connecting_to_the_cluster_ip = || {
        node_a
            .netns()
            .command(
                "ss",
                &[
                    "-Htn",
                    "state",
                    "syn-sent",
                    "dst",
                    &format!("{API_CLUSTER_IP}:443"),
                ],
            )
            .output()
            .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
    };
    assert!(
        wait_until(PATIENCE, connecting_to_the_cluster_ip),
        "the proxy is not trying the ClusterIP: {}",
        log(&log_a)
    );
    assert_eq!(server.requests(), [], "the API was reached");
    let (code, body) = stuck.get("/healthz").expect("healthz");
    assert_eq!(code, 503, "nothing was synced: {body}");
    let table = node_a
        .netns()
        .command("nft", &["list", "table", "ip", "svcplane"])
        .output()
        .expect("nft");
    assert!(!table.status.success(), "svcplane programmed something");
    assert!(cluster.tcp_request(client, web, T).is_err(), "web answered");
    stuck.terminate().expect("stop the stuck proxy");

    // (b) The same node configured as deploy/ is (the real address; the Pod still has
    // KUBERNETES_SERVICE_HOST): no warning, everything programmed, including the
    // `kubernetes` Service, so pods (and the node) reach the API through it too.
    let log_b = dir.path().join("b.log");
    let proxy = cluster
        .launch_proxy(
            bin,
            "node-a",
            no_manifests,
            &["--kubeconfig", real.to_str().unwrap()],
            &ProxyLaunch {
                log: Some(log_b.clone()),
                env: pod_env.clone(),
                ..ProxyLaunch::default()
            },
        )
        .expect("svcplane proxy with the real address becomes ready");
    let answer = cluster.tcp_request(client, web, T).expect("web answers");
    assert_eq!(parse_echo(&answer).map(|e| e.pod).ok(), Some(web_a.into()));
    for from in [client.netns(), node_a.netns()] {
        let (code, body) = http_get(from.name(), api_via_service, "/api/v1/services", T)
            .expect("the API through its ClusterIP");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("ServiceList"), "{body}");
    }
    assert!(
        !log(&log_b).contains(CLUSTER_IP_WARNING),
        "warned with the real address: {}",
        log(&log_b)
    );
    proxy.terminate().expect("stop the proxy");

    // (c) The ClusterIP configuration works only now that the rules are there (they
    // stay when the proxy stops): the dependency, not the configuration, was the problem.
    let log_c = dir.path().join("c.log");
    let _again = cluster
        .launch_proxy(
            bin,
            "node-a",
            no_manifests,
            &["--kubeconfig", via_cluster_ip_arg],
            &ProxyLaunch {
                log: Some(log_c.clone()),
                env: pod_env,
                ..ProxyLaunch::default()
            },
        )
        .expect("the ClusterIP configuration syncs once the rules exist");
    assert!(log(&log_c).contains(CLUSTER_IP_WARNING), "{}", log(&log_c));
}
