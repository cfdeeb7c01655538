//! Real traffic through `svcplane proxy --proxy-mode nftables` (root): a two-node
//! virtual cluster from the test kit, echo servers in every pod, the proxy on node-a,
//! requests from a pod on node-a and from the external client.
//!
//! Adding a scenario: add its Service (and pods, if it needs new ones) to [`SERVICES`]
//! / [`Env::start`], then a `#[test]` that calls `Env::start()` and sends requests.
//! Each test builds its own cluster, so they run in parallel without sharing state.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use svcplane_testkit::{
    Cluster, EchoReply, Manifests, PodSpec, Proto, ProxyHandle, RequestError, parse_echo,
    skip_unless_root,
};

/// Per-request timeout: only bounds how long a broken test hangs.
const T: Duration = Duration::from_secs(3);
/// Requests sent to see every endpoint of a multi-endpoint service. With random
/// choice between 2 endpoints, missing one in 64 tries has probability 2^-63.
const SPREAD_TRIES: usize = 64;

const SERVICES: &str = r#"
# One endpoint (one-a on node-a), dual-stack, port 80 -> targetPort 8080.
apiVersion: v1
kind: Service
metadata: {name: one, namespace: default}
spec:
  selector: {app: one}
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.1.1
  clusterIPs: [10.96.1.1, "fd00:96::1:1"]
  ports: [{name: http, port: 80, targetPort: 8080}]
---
# Two endpoints, one per node.
apiVersion: v1
kind: Service
metadata: {name: many, namespace: default}
spec:
  selector: {app: many}
  clusterIP: 10.96.1.2
  ports: [{name: http, port: 80, targetPort: 8080}]
---
# TCP and UDP on the same port number, mapped to different target ports so the echo
# reply proves which rule each protocol went through.
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  selector: {app: dns}
  clusterIP: 10.96.1.3
  ports:
    - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}
    - {name: dns-udp, port: 53, protocol: UDP, targetPort: 5354}
---
# NodePort over the two "many" pods.
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  selector: {app: many}
  clusterIP: 10.96.1.4
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
# Selects nothing: no endpoints.
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  selector: {app: nobody}
  clusterIP: 10.96.1.5
  ports: [{name: http, port: 80}]
---
# LoadBalancer with source ranges: only 203.0.113.0/24 may use the LB IP.
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  selector: {app: many}
  clusterIP: 10.96.1.6
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.10}]
---
# An external IP.
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec:
  selector: {app: one}
  clusterIP: 10.96.1.7
  externalIPs: [192.0.2.20]
  ports: [{name: http, port: 8000, targetPort: 8080}]
---
# externalTrafficPolicy Local; its only endpoint (one-a) is on node-a.
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: one}
  clusterIP: 10.96.1.8
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30083}]
---
# ClientIP session affinity over the two "many" pods.
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  selector: {app: many}
  clusterIP: 10.96.1.9
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080}]
---
# internalTrafficPolicy Local over the two "many" pods (one per node).
apiVersion: v1
kind: Service
metadata: {name: itp, namespace: default}
spec:
  selector: {app: many}
  clusterIP: 10.96.1.10
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080}]
---
# externalTrafficPolicy Local, dual-stack, an externalIP and a LoadBalancer IP per family;
# its only endpoint (remote-b) is on node-b, so node-a has no local endpoint.
apiVersion: v1
kind: Service
metadata: {name: local-remote, namespace: default}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: remote}
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.1.11
  clusterIPs: [10.96.1.11, "fd00:96::1:11"]
  externalIPs: [192.0.2.30, "2001:db8::30"]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30084}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.40}, {ip: "2001:db8::40"}]
---
# NodePorts outside the API server's default range (30000-32767), which clusters widen.
apiVersion: v1
kind: Service
metadata: {name: np-wide, namespace: default}
spec:
  type: NodePort
  selector: {app: many}
  clusterIP: 10.96.1.12
  ports:
    - {name: low, port: 80, targetPort: 8080, nodePort: 3001}
    - {name: web, port: 81, targetPort: 8080, nodePort: 80}
"#;

/// Requests that must all reach the same endpoint; with 2 endpoints chosen at random,
/// all landing on one by chance has probability 2^-31.
const STICKY_TRIES: usize = 32;

/// The client's extra source address, inside the `lb` service's source ranges.
const ALLOWED_SRC: &str = "203.0.113.10";

/// The standard cluster, its manifests and the proxy on node-a. Field order is drop
/// order: the proxy stops before the cluster's namespaces go away.
struct Env {
    proxy: Option<ProxyHandle>,
    manifests: Manifests,
    cluster: Cluster,
}

impl Env {
    /// `None` when the test must skip (not root, tools missing).
    fn start() -> Option<Env> {
        Env::start_with(&[])
    }

    /// [`Env::start`] with extra `svcplane proxy` flags.
    fn start_with(proxy_args: &[&str]) -> Option<Env> {
        if skip_unless_root(&["ip", "nft", "sysctl"]) {
            return None;
        }
        let cluster = Cluster::builder()
            .node("node-a", "zone-a")
            .node("node-b", "zone-b")
            // A pod without labels: the in-cluster client on node-a.
            .pod(PodSpec::new("client-a", "node-a"))
            .pod(
                PodSpec::new("one-a", "node-a")
                    .label("app", "one")
                    .tcp(&[8080]),
            )
            .pod(
                PodSpec::new("many-a", "node-a")
                    .label("app", "many")
                    .tcp(&[8080]),
            )
            .pod(
                PodSpec::new("many-b", "node-b")
                    .label("app", "many")
                    .tcp(&[8080]),
            )
            .pod(
                PodSpec::new("remote-b", "node-b")
                    .label("app", "remote")
                    .tcp(&[8080]),
            )
            .pod(
                PodSpec::new("dns-b", "node-b")
                    .label("app", "dns")
                    .tcp(&[5353])
                    .udp(&[5354]),
            )
            .client_address(ALLOWED_SRC.parse().expect("address"))
            .build()
            .expect("virtual cluster");
        // LoadBalancer and external IPs reach node-a, as an upstream router would send them.
        cluster
            .route_client_via("192.0.2.0/24", "node-a")
            .expect("client route");
        let manifests = cluster.manifests().expect("manifests");
        manifests
            .write("services.yaml", SERVICES)
            .expect("services.yaml");
        let proxy = cluster
            .run_proxy(
                env!("CARGO_BIN_EXE_svcplane"),
                "node-a",
                manifests.path(),
                proxy_args,
            )
            .expect("svcplane proxy on node-a");
        Some(Env {
            proxy: Some(proxy),
            manifests,
            cluster,
        })
    }

    /// `svcplane proxy` on `node` over this test's manifests (default flags).
    fn run_proxy_on(&self, node: &str) -> ProxyHandle {
        self.cluster
            .run_proxy(
                env!("CARGO_BIN_EXE_svcplane"),
                node,
                self.manifests.path(),
                &[],
            )
            .unwrap_or_else(|e| panic!("svcplane proxy on {node}: {e}"))
    }

    /// `nft ARGS` in node-a's namespace: its stdout, or `None` when nft failed.
    fn nft_on_node_a(&self, args: &[&str]) -> Option<String> {
        let node = self.cluster.node("node-a").expect("node");
        let out = node.netns().command("nft", args).output().expect("run nft");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn pod_ip(&self, pod: &str) -> IpAddr {
        IpAddr::V4(self.cluster.pod(pod).expect("pod").ipv4())
    }

    fn node_ip(&self, node: &str) -> IpAddr {
        IpAddr::V4(self.cluster.node(node).expect("node").ipv4())
    }

    /// TCP from the named pod, or from the external client for `"client"` (its own
    /// address) and `"client-allowed"` (from [`ALLOWED_SRC`]).
    fn tcp(&self, from: &str, dst: &str) -> EchoReply {
        let reply = self
            .try_tcp(from, dst)
            .unwrap_or_else(|e| panic!("TCP {from} -> {dst}: {e}"));
        parse_echo(&reply).expect("echo reply")
    }

    fn udp(&self, from: &str, dst: &str) -> EchoReply {
        let reply = self
            .try_udp(from, dst)
            .unwrap_or_else(|e| panic!("UDP {from} -> {dst}: {e}"));
        parse_echo(&reply).expect("echo reply")
    }

    fn try_tcp(&self, from: &str, dst: &str) -> Result<String, RequestError> {
        let dst: SocketAddr = dst.parse().expect("address");
        if from == "client-allowed" {
            let src = ALLOWED_SRC.parse().expect("address");
            self.cluster
                .tcp_request_from(self.cluster.client(), src, dst, T)
        } else if from == "client" {
            self.cluster.tcp_request(self.cluster.client(), dst, T)
        } else {
            let pod = self.cluster.pod(from).expect("pod");
            self.cluster.tcp_request(pod, dst, T)
        }
    }

    fn try_udp(&self, from: &str, dst: &str) -> Result<String, RequestError> {
        let dst: SocketAddr = dst.parse().expect("address");
        if from == "client" {
            self.cluster.udp_request(self.cluster.client(), dst, T)
        } else {
            let pod = self.cluster.pod(from).expect("pod");
            self.cluster.udp_request(pod, dst, T)
        }
    }

    /// Send TCP requests until every pod in `want` answered (bounded), and return the
    /// replies; asserts nothing outside `want` answered.
    fn spread(&self, from: &str, dst: &str, want: &[&str]) -> Vec<EchoReply> {
        let want: BTreeSet<IpAddr> = want.iter().map(|p| self.pod_ip(p)).collect();
        let mut seen = BTreeSet::new();
        let mut replies = Vec::new();
        for _ in 0..SPREAD_TRIES {
            let reply = self.tcp(from, dst);
            assert!(want.contains(&reply.pod), "unexpected endpoint: {reply:?}");
            seen.insert(reply.pod);
            replies.push(reply);
            if seen == want {
                break;
            }
        }
        assert_eq!(
            seen, want,
            "not every endpoint answered in {SPREAD_TRIES} tries"
        );
        replies
    }
}

#[test]
fn cluster_ip_one_endpoint_with_target_port_from_a_pod() {
    let Some(env) = Env::start() else { return };
    let reply = env.tcp("client-a", "10.96.1.1:80");
    assert_eq!(reply.pod, env.pod_ip("one-a"));
    assert_eq!((reply.proto, reply.port), (Proto::Tcp, 8080));
    // A pod in the cluster CIDR is not masqueraded.
    assert_eq!(reply.peer.ip(), env.pod_ip("client-a"));
}

#[test]
fn cluster_ip_ipv6_from_a_pod() {
    let Some(env) = Env::start() else { return };
    let reply = env.tcp("client-a", "[fd00:96::1:1]:80");
    let one = env.cluster.pod("one-a").expect("pod");
    let client = env.cluster.pod("client-a").expect("pod");
    assert_eq!(reply.pod, IpAddr::V6(one.ipv6()));
    assert_eq!(reply.port, 8080);
    assert_eq!(reply.peer.ip(), IpAddr::V6(client.ipv6()));
}

#[test]
fn cluster_ip_many_endpoints_spread_from_a_pod() {
    let Some(env) = Env::start() else { return };
    let client = env.pod_ip("client-a");
    for reply in env.spread("client-a", "10.96.1.2:80", &["many-a", "many-b"]) {
        assert_eq!(reply.port, 8080);
        assert_eq!(reply.peer.ip(), client, "pod traffic must keep its source");
    }
}

#[test]
fn cluster_ip_from_the_external_client_is_masqueraded() {
    let Some(env) = Env::start() else { return };
    let node_a = env.node_ip("node-a");
    for reply in env.spread("client", "10.96.1.2:80", &["many-a", "many-b"]) {
        // Not from the cluster CIDR: masqueraded to node-a, so replies come back to it.
        assert_eq!(reply.peer.ip(), node_a, "{reply:?}");
    }
}

#[test]
fn tcp_and_udp_on_the_same_port_number() {
    let Some(env) = Env::start() else { return };
    let dns = env.pod_ip("dns-b");
    for from in ["client-a", "client"] {
        let tcp = env.tcp(from, "10.96.1.3:53");
        assert_eq!((tcp.pod, tcp.proto, tcp.port), (dns, Proto::Tcp, 5353));
        let udp = env.udp(from, "10.96.1.3:53");
        assert_eq!((udp.pod, udp.proto, udp.port), (dns, Proto::Udp, 5354));
    }
}

#[test]
fn node_port_from_the_external_client() {
    let Some(env) = Env::start() else { return };
    let node_a = env.node_ip("node-a");
    for reply in env.spread("client", "10.0.0.11:30080", &["many-a", "many-b"]) {
        assert_eq!(reply.port, 8080);
        // externalTrafficPolicy Cluster: masqueraded to the node.
        assert_eq!(reply.peer.ip(), node_a, "{reply:?}");
    }
}

/// kube-proxy programs whatever nodePort a Service carries: the range is the API
/// server's `--service-node-port-range`, which many clusters widen.
#[test]
fn node_ports_outside_the_default_range() {
    let Some(env) = Env::start() else { return };
    let node_a = env.node_ip("node-a");
    for target in ["10.0.0.11:3001", "10.0.0.11:80"] {
        for reply in env.spread("client", target, &["many-a", "many-b"]) {
            assert_eq!(reply.port, 8080);
            assert_eq!(reply.peer.ip(), node_a, "{target}: {reply:?}");
        }
    }
}

#[test]
fn udp_to_a_tcp_only_port_is_rejected() {
    let Some(env) = Env::start() else { return };
    for from in ["client-a", "client"] {
        let got = env.try_udp(from, "10.96.1.2:80");
        assert!(matches!(got, Err(RequestError::Refused)), "{from}: {got:?}");
    }
}

#[test]
fn service_without_endpoints_is_rejected() {
    let Some(env) = Env::start() else { return };
    for from in ["client-a", "client"] {
        let got = env.try_tcp(from, "10.96.1.5:80");
        assert!(matches!(got, Err(RequestError::Refused)), "{from}: {got:?}");
    }
}

#[test]
fn load_balancer_source_ranges_allow_and_block_but_not_the_node_port() {
    let Some(env) = Env::start() else { return };
    let node_a = env.node_ip("node-a");
    for reply in env.spread("client-allowed", "192.0.2.10:80", &["many-a", "many-b"]) {
        assert_eq!(reply.port, 8080);
        assert_eq!(
            reply.peer.ip(),
            node_a,
            "eTP Cluster masquerades: {reply:?}"
        );
    }
    // Outside the source ranges: dropped (no answer at all).
    let got = env.try_tcp("client", "192.0.2.10:80");
    assert!(matches!(got, Err(RequestError::Timeout)), "{got:?}");
    // The same service's NodePort is not subject to the source ranges.
    env.spread("client", "10.0.0.11:30081", &["many-a", "many-b"]);
}

#[test]
fn external_ip_from_the_external_client() {
    let Some(env) = Env::start() else { return };
    let reply = env.tcp("client", "192.0.2.20:8000");
    assert_eq!((reply.pod, reply.port), (env.pod_ip("one-a"), 8080));
}

#[test]
fn external_traffic_policy_local_keeps_the_client_ip_and_drops_without_local_endpoints() {
    let Some(env) = Env::start() else { return };
    let reply = env.tcp("client", "10.0.0.11:30083");
    assert_eq!(reply.pod, env.pod_ip("one-a"));
    assert_eq!(reply.peer.ip(), IpAddr::V4(svcplane_testkit::CLIENT_V4));
    // node-b has no local endpoint for it: dropped there, not forwarded to node-a.
    let _proxy_b = env.run_proxy_on("node-b");
    let got = env.try_tcp("client", "10.0.0.12:30083");
    assert!(matches!(got, Err(RequestError::Timeout)), "{got:?}");
}

/// eTP Local, node-a without a local endpoint (`local-remote`): traffic that starts on
/// node-a (its own network namespace, or a pod) to the externalIP, the LoadBalancer IP or
/// node-a's NodePort still reaches the cluster-wide endpoint, the node's own masqueraded
/// to node-a's address; the external client's gets no answer. Both families. `mode` is
/// the proxy mode.
fn external_traffic_policy_local_from_the_node_itself(mode: &str) {
    let Some(env) = Env::start_with(&["--proxy-mode", mode]) else {
        return;
    };
    env.cluster
        .route_client_via("2001:db8::/64", "node-a")
        .expect("client route");
    let node = env.cluster.node("node-a").expect("node");
    let pod = env.cluster.pod("client-a").expect("pod");
    let remote = env.cluster.pod("remote-b").expect("pod");
    let v4 = (
        IpAddr::V4(node.ipv4()),
        IpAddr::V4(pod.ipv4()),
        IpAddr::V4(remote.ipv4()),
    );
    let v6 = (
        IpAddr::V6(node.ipv6()),
        IpAddr::V6(pod.ipv6()),
        IpAddr::V6(remote.ipv6()),
    );
    let targets: Vec<(SocketAddr, _)> = [
        ("192.0.2.30:80".parse().expect("address"), v4),
        ("192.0.2.40:80".parse().expect("address"), v4),
        (SocketAddr::new(v4.0, 30084), v4),
        ("[2001:db8::30]:80".parse().expect("address"), v6),
        ("[2001:db8::40]:80".parse().expect("address"), v6),
        (SocketAddr::new(v6.0, 30084), v6),
    ]
    .into();
    for &(dst, (node_ip, pod_ip, endpoint)) in &targets {
        let reply = env
            .cluster
            .tcp_request(node, dst, T)
            .unwrap_or_else(|e| panic!("TCP node-a -> {dst}: {e}"));
        let reply = parse_echo(&reply).expect("echo reply");
        assert_eq!(
            (reply.pod, reply.port),
            (endpoint, 8080),
            "{dst}: {reply:?}"
        );
        assert_eq!(
            reply.peer.ip(),
            node_ip,
            "node-a -> {dst} masqueraded: {reply:?}"
        );
        let reply = env
            .cluster
            .tcp_request(pod, dst, T)
            .unwrap_or_else(|e| panic!("TCP client-a -> {dst}: {e}"));
        let reply = parse_echo(&reply).expect("echo reply");
        assert_eq!(reply.pod, endpoint, "{dst}: {reply:?}");
        assert_eq!(reply.peer.ip(), pod_ip, "client-a -> {dst}: {reply:?}");
    }
    // From outside: dropped (all at once: each waits out the timeout).
    let client = env.cluster.client().netns().name();
    std::thread::scope(|scope| {
        let waits: Vec<_> = targets
            .iter()
            .map(|&(dst, _)| {
                let got = scope.spawn(move || svcplane_testkit::tcp_request(client, None, dst, T));
                (dst, got)
            })
            .collect();
        for (dst, got) in waits {
            let got = got.join().expect("request thread");
            assert!(
                matches!(got, Err(RequestError::Timeout)),
                "client -> {dst} must be dropped: {got:?}"
            );
        }
    });
}

#[test]
fn external_traffic_policy_local_from_the_node_itself_nftables() {
    external_traffic_policy_local_from_the_node_itself("nftables");
}

#[test]
fn hairpin_is_masqueraded() {
    let Some(env) = Env::start() else { return };
    let me = env.pod_ip("many-a");
    for reply in env.spread("many-a", "10.96.1.2:80", &["many-a", "many-b"]) {
        if reply.pod == me {
            // To itself: masqueraded, or the reply would bypass the node's conntrack.
            assert_ne!(reply.peer.ip(), me, "hairpin not masqueraded: {reply:?}");
        } else {
            assert_eq!(reply.peer.ip(), me, "{reply:?}");
        }
    }
}

#[test]
fn session_affinity_client_ip_is_sticky() {
    let Some(env) = Env::start() else { return };
    let first = env.tcp("client-a", "10.96.1.9:80").pod;
    for _ in 0..STICKY_TRIES {
        assert_eq!(env.tcp("client-a", "10.96.1.9:80").pod, first);
    }
}

#[test]
fn internal_traffic_policy_local_stays_on_the_node() {
    let Some(env) = Env::start() else { return };
    let local = env.pod_ip("many-a");
    for _ in 0..STICKY_TRIES {
        assert_eq!(env.tcp("client-a", "10.96.1.10:80").pod, local);
    }
}

#[test]
fn a_manifest_change_reaches_the_kernel_within_a_second() {
    let Some(env) = Env::start() else { return };
    env.manifests
        .write(
            "new.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: new, namespace: default}
spec:
  selector: {app: one}
  clusterIP: 10.96.1.50
  ports: [{name: http, port: 80, targetPort: 8080}]
"#,
        )
        .expect("new.yaml");
    // The issue's bound for file change -> kernel (debounce + sync), read from nft itself.
    let programmed = svcplane_testkit::wait_until(Duration::from_secs(1), || {
        env.nft_on_node_a(&["list", "map", "ip", "svcplane", "service-ips"])
            .is_some_and(|m| m.contains("10.96.1.50 . tcp . 80"))
    });
    assert!(programmed, "10.96.1.50 not in service-ips within 1 s");
    let reply = env.tcp("client-a", "10.96.1.50:80");
    assert_eq!(reply.pod, env.pod_ip("one-a"));
}

#[test]
fn nft_flush_ruleset_is_repaired_by_the_next_sync() {
    let Some(env) = Env::start_with(&["--sync-period", "1s"]) else {
        return;
    };
    env.tcp("client-a", "10.96.1.1:80");
    // The periodic syncs are cheap checks, not full rewrites (those are hourly).
    let proxy = env.proxy.as_ref().expect("proxy");
    let count = |series: &str| {
        proxy
            .metrics()
            .ok()
            .and_then(|t| svcplane_testkit::metric_value(&t, series))
            .unwrap_or(0.0)
    };
    const FULL: &str = "kubeproxy_sync_full_proxy_rules_duration_seconds_count";
    const PARTIAL: &str = "kubeproxy_sync_partial_proxy_rules_duration_seconds_count";
    let checked = svcplane_testkit::wait_until(Duration::from_secs(5), || count(PARTIAL) >= 2.0);
    assert!(checked, "no periodic check within 5 s at --sync-period 1s");
    assert_eq!(
        count(FULL),
        1.0,
        "periodic syncs must not rewrite everything"
    );
    env.nft_on_node_a(&["flush", "ruleset"])
        .expect("nft flush ruleset");
    assert!(
        env.nft_on_node_a(&["list", "table", "ip", "svcplane"])
            .is_none(),
        "the flush left svcplane's table"
    );
    let repaired = svcplane_testkit::wait_until(Duration::from_secs(15), || {
        env.try_tcp("client-a", "10.96.1.1:80").is_ok()
    });
    assert!(
        repaired,
        "service not answering again after nft flush ruleset"
    );
    let reply = env.tcp("client-a", "10.96.1.1:80");
    assert_eq!(reply.pod, env.pod_ip("one-a"));
    // Repaired by a full sync, which the check triggered.
    assert!(count(FULL) >= 2.0);
}

#[test]
fn a_malformed_file_leaves_working_services_alone() {
    let Some(env) = Env::start() else { return };
    // A file that does not parse, and the services file itself broken mid-document.
    env.manifests
        .write("broken.yaml", "kind: Service\nmetadata: {name: [unclosed\n")
        .expect("broken.yaml");
    let broken = SERVICES.replacen("clusterIP: 10.96.1.2", "clusterIP: [10.96.1.2", 1);
    env.manifests
        .write("services.yaml", &broken)
        .expect("services.yaml");
    // A valid service in another file is still programmed...
    env.manifests
        .write(
            "later.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: later, namespace: default}
spec:
  selector: {app: one}
  clusterIP: 10.96.1.51
  ports: [{name: http, port: 80, targetPort: 8080}]
"#,
        )
        .expect("later.yaml");
    let programmed = svcplane_testkit::wait_until(Duration::from_secs(10), || {
        env.try_tcp("client-a", "10.96.1.51:80").is_ok()
    });
    assert!(
        programmed,
        "the valid service in later.yaml was not programmed"
    );
    // ...and the services of the broken files keep answering.
    assert_eq!(env.tcp("client-a", "10.96.1.1:80").pod, env.pod_ip("one-a"));
    env.spread("client-a", "10.96.1.2:80", &["many-a", "many-b"]);
}

#[test]
fn a_restart_fails_no_connection() {
    let Some(mut env) = Env::start() else { return };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let old = env.proxy.take().expect("proxy");
    let (sent, failures) = std::thread::scope(|scope| {
        let env = &env;
        let stop = &stop;
        let load = scope.spawn(move || {
            let (mut sent, mut failures) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sent += 1;
                if let Err(e) = env.try_tcp("client-a", "10.96.1.2:80") {
                    failures.push(e);
                }
            }
            (sent, failures)
        });
        // Old process stops (leaving its rules), the new one adopts and replaces the table.
        let status = old.terminate().expect("stop the proxy");
        assert!(status.success(), "old proxy exited with {status}");
        let new = env.run_proxy_on("node-a");
        // Keep the load on past the new process's first sync.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let result = load.join().expect("load thread");
        drop(new);
        result
    });
    assert!(sent > 5, "too few requests during the restart: {sent}");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:?}",
        failures.len()
    );
}

/// Services without selectors whose EndpointSlices the test writes, over many-a (node-a,
/// zone-a) and many-b (node-b, zone-b): `hinted` (zone hints), `term` (only a terminating
/// but serving endpoint) and `mixed` (one ready, one terminating).
fn explicit_slices(env: &Env) -> String {
    let (a, b) = (env.pod_ip("many-a"), env.pod_ip("many-b"));
    let service = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n"
        )
    };
    let slice = |name: &str, endpoints: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}---\n"
        )
    };
    let ep = |ip: IpAddr, node: &str, zone: &str, ready: bool, extra: &str| {
        format!(
            "  - addresses: [\"{ip}\"]\n    nodeName: {node}\n    zone: {zone}\n    \
             conditions: {{ready: {ready}, serving: true, terminating: {}}}\n{extra}",
            !ready
        )
    };
    let hint = |zone: &str| format!("    hints: {{forZones: [{{name: {zone}}}]}}\n");
    let mut out = String::new();
    out += &service("hinted", "10.96.1.60");
    out += &slice(
        "hinted",
        &(ep(a, "node-a", "zone-a", true, &hint("zone-a"))
            + &ep(b, "node-b", "zone-b", true, &hint("zone-b"))),
    );
    out += &service("term", "10.96.1.61");
    out += &slice("term", &ep(b, "node-b", "zone-b", false, ""));
    out += &service("mixed", "10.96.1.62");
    out += &slice(
        "mixed",
        &(ep(a, "node-a", "zone-a", true, "") + &ep(b, "node-b", "zone-b", false, "")),
    );
    out
}

/// Start the standard environment with [`explicit_slices`] programmed.
fn start_with_slices() -> Option<Env> {
    let env = Env::start()?;
    env.manifests
        .write("slices.yaml", &explicit_slices(&env))
        .expect("slices.yaml");
    let programmed = svcplane_testkit::wait_until(Duration::from_secs(10), || {
        env.nft_on_node_a(&["list", "map", "ip", "svcplane", "service-ips"])
            .is_some_and(|m| {
                ["10.96.1.60", "10.96.1.61", "10.96.1.62"]
                    .iter()
                    .all(|ip| m.contains(ip))
            })
    });
    assert!(programmed, "slices.yaml services not programmed");
    Some(env)
}

#[test]
fn topology_hints_keep_traffic_in_the_zone() {
    let Some(env) = start_with_slices() else {
        return;
    };
    for _ in 0..STICKY_TRIES {
        assert_eq!(
            env.tcp("client-a", "10.96.1.60:80").pod,
            env.pod_ip("many-a")
        );
    }
}

#[test]
fn terminating_endpoints_serve_only_when_no_endpoint_is_ready() {
    let Some(env) = start_with_slices() else {
        return;
    };
    // Only a terminating, serving endpoint: kube-proxy falls back to it.
    assert_eq!(
        env.tcp("client-a", "10.96.1.61:80").pod,
        env.pod_ip("many-b")
    );
    // A ready endpoint exists: the terminating one gets no new connections.
    for _ in 0..STICKY_TRIES {
        assert_eq!(
            env.tcp("client-a", "10.96.1.62:80").pod,
            env.pod_ip("many-a")
        );
    }
}

#[test]
fn healthz_and_livez_answer_after_the_first_sync() {
    let Some(env) = Env::start() else { return };
    let proxy = env.proxy.as_ref().expect("proxy");
    // run_proxy already waited for /healthz 200; the body is kube-proxy's JSON.
    let (status, body) = proxy.get("/healthz").expect("GET /healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("lastUpdated"), "{body}");
    let (status, body) = proxy.get("/livez").expect("GET /livez");
    assert_eq!(status, 200, "{body}");
    assert_eq!(proxy.get("/nothing").expect("GET /nothing").0, 404);
}

/// A UDP Service without selector over `endpoint` (an IPv4 pod address), port 53 ->
/// 5300, with its EndpointSlice.
fn udp_service_over(endpoint: IpAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: udp, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.1.70\n  ports: [{{name: dns, port: 53, protocol: UDP, targetPort: 5300}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: udp-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: udp}}\n\
         addressType: IPv4\nports: [{{name: dns, port: 5300, protocol: UDP}}]\n\
         endpoints:\n  - addresses: [\"{endpoint}\"]\n    conditions: {{ready: true}}\n"
    )
}

#[test]
fn udp_conntrack_cleared() {
    let Some(mut env) = Env::start() else { return };
    for (name, node) in [("udp-a", "node-a"), ("udp-b", "node-b")] {
        env.cluster
            .add_pod(PodSpec::new(name, node).udp(&[5300]))
            .expect("pod");
    }
    let (a, b) = (env.pod_ip("udp-a"), env.pod_ip("udp-b"));
    env.manifests
        .write("udp.yaml", &udp_service_over(a))
        .expect("udp.yaml");
    let programmed = |ip: IpAddr| {
        svcplane_testkit::wait_until(Duration::from_secs(10), || {
            env.nft_on_node_a(&["list", "table", "ip", "svcplane"])
                .is_some_and(|t| t.contains("10.96.1.70") && t.contains(&ip.to_string()))
        })
    };
    assert!(
        programmed(a),
        "the udp service over udp-a was not programmed"
    );

    // One 5-tuple throughout, as a DNS client reusing its source port.
    let client = env.cluster.pod("client-a").expect("pod");
    let dst: SocketAddr = "10.96.1.70:53".parse().expect("address");
    let ask = || {
        env.cluster
            .udp_request_from_port(client, 40053, dst, Duration::from_secs(1))
            .map_err(|e| e.to_string())
            .and_then(|r| parse_echo(&r).map_err(|e| e.to_string()))
    };
    for _ in 0..3 {
        let reply = ask().expect("UDP through the service");
        assert_eq!(reply.pod, a, "{reply:?}");
        assert_eq!(reply.peer.port(), 40053, "the source port must stay fixed");
    }

    // udp-a leaves the service (its pod keeps answering), udp-b joins.
    env.manifests
        .write("udp.yaml", &udp_service_over(b))
        .expect("udp.yaml");
    assert!(
        programmed(b),
        "the udp service over udp-b was not programmed"
    );
    // The rules moved; without the reconciler the old conntrack entry would keep sending
    // this 5-tuple to udp-a until it expires (120 s while traffic flows). The bound is
    // generous: the entry is deleted in the same sync that changed the rules.
    let mut answers = Vec::new();
    let moved = svcplane_testkit::wait_until(Duration::from_secs(2), || {
        let reply = ask();
        let done = matches!(&reply, Ok(r) if r.pod == b);
        answers.push(reply);
        done
    });
    assert!(
        moved,
        "the same 5-tuple was not answered by udp-b within 2 s: {answers:?}"
    );

    // Counted when the sync that deleted the entry returns, which may be just after the
    // answer above.
    let proxy = env.proxy.as_ref().expect("proxy");
    let mut deleted = None;
    let counted = svcplane_testkit::wait_until(Duration::from_secs(5), || {
        deleted = proxy.metrics().ok().and_then(|text| {
            svcplane_testkit::metric_value(
                &text,
                "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"4\"}",
            )
        });
        deleted.is_some_and(|n| n >= 1.0)
    });
    assert!(counted, "deleted entries not counted: {deleted:?}");
}

/// Every sample line of `text` whose series starts with `prefix`, as (series, value).
fn samples<'a>(text: &'a str, prefix: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series, value.parse().ok()?))
        })
        .collect()
}

/// A metric the test needs, or the whole exposition in the panic message.
fn metric(text: &str, series: &str) -> f64 {
    svcplane_testkit::metric_value(text, series)
        .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
}

#[test]
fn metrics_through_the_binary() {
    // Bound to node-a's own address, so the flag is seen to take effect.
    let Some(env) = Env::start_with(&["--metrics-bind-address", "10.0.0.11:10249"]) else {
        return;
    };
    let proxy = env.proxy.as_ref().expect("proxy");
    assert_eq!(
        proxy.metrics_addr(),
        Some("10.0.0.11:10249".parse().unwrap())
    );
    let text = proxy.metrics().expect("GET /metrics on node-a");

    // kube-proxy's sync histogram: exponential from 1 ms by 2, 15 buckets, then +Inf.
    const H: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
    let buckets = samples(&text, &format!("{H}_bucket{{"));
    assert_eq!(buckets.len(), 16, "15 buckets and +Inf:\n{text}");
    for (i, le) in ["0.001", "0.002", "0.004", "1.024", "16.384", "+Inf"]
        .iter()
        .enumerate()
    {
        let index = [0, 1, 2, 10, 14, 15][i];
        assert_eq!(buckets[index].0, format!("{H}_bucket{{le=\"{le}\"}}"));
    }
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets must be cumulative: {buckets:?}"
    );
    let count = metric(&text, &format!("{H}_count"));
    assert!(count >= 1.0, "no sync observed:\n{text}");
    assert_eq!(buckets[15].1, count, "+Inf bucket is the count");
    assert!(
        metric(
            &text,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count"
        ) >= 1.0
    );
    let last = metric(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        last > 0.0 && last <= now + 1.0,
        "last sync at {last}, now {now}"
    );
    let service_changes = metric(&text, "kubeproxy_sync_proxy_rules_service_changes_total");
    assert!(
        service_changes > 0.0,
        "the first sync carried every service"
    );
    assert_eq!(metric(&text, "svcplane_invalid_objects_total"), 0.0);
    let programmed = metric(
        &text,
        "kubeproxy_network_programming_duration_seconds_count",
    );

    // A manifest change (one more service) and a malformed object (port out of range).
    env.manifests
        .write(
            "more.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: more, namespace: default}\n\
             spec:\n  selector: {app: one}\n  clusterIP: 10.96.1.52\n  ports: [{port: 80, targetPort: 8080}]\n",
        )
        .expect("more.yaml");
    env.manifests
        .write(
            "bad.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: default}\n\
             spec:\n  clusterIP: 10.96.1.53\n  ports: [{port: 70000}]\n",
        )
        .expect("bad.yaml");
    let mut text = String::new();
    let seen = svcplane_testkit::wait_until(Duration::from_secs(10), || {
        text = proxy.metrics().expect("GET /metrics");
        metric(
            &text,
            "kubeproxy_network_programming_duration_seconds_count",
        ) > programmed
            && metric(&text, "svcplane_invalid_objects_total") >= 1.0
    });
    assert!(seen, "the change was not observed:\n{text}");
    assert!(
        metric(
            &text,
            "kubeproxy_network_programming_duration_seconds_count"
        ) >= 1.0
    );
    assert_eq!(metric(&text, "svcplane_invalid_objects_total"), 1.0);
    assert!(
        metric(&text, "kubeproxy_sync_proxy_rules_service_changes_total") > service_changes,
        "the new service is a service change:\n{text}"
    );
    // The external client reaches it too: the flag, not the default, decided the address.
    let (status, _) = svcplane_testkit::http_get(
        env.cluster.client().netns().name(),
        "10.0.0.11:10249".parse().unwrap(),
        "/metrics",
        T,
    )
    .expect("GET /metrics from the client");
    assert_eq!(status, 200);
}

#[test]
fn metrics_listen_on_loopback_only_by_default() {
    let Some(env) = Env::start() else { return };
    let proxy = env.proxy.as_ref().expect("proxy");
    // kube-proxy's default: 127.0.0.1:10249.
    assert_eq!(
        proxy.metrics_addr(),
        Some("127.0.0.1:10249".parse().unwrap())
    );
    let text = proxy.metrics().expect("GET /metrics on 127.0.0.1");
    assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count"));
    let node_ns = env.cluster.node("node-a").expect("node").netns().name();
    for (from, who) in [
        (node_ns, "node-a"),
        (env.cluster.client().netns().name(), "client"),
    ] {
        let got =
            svcplane_testkit::http_get(from, "10.0.0.11:10249".parse().unwrap(), "/metrics", T);
        assert!(
            matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{who} -> node-a's own address must be refused: {got:?}"
        );
    }
}

/// The healthCheckNodePort of [`hc_manifests`].
const HC_PORT: u16 = 32000;

/// A LoadBalancer Service with eTP Local and healthCheckNodePort [`HC_PORT`], and its
/// EndpointSlice with `endpoints` (pod, node).
fn hc_manifests(env: &Env, endpoints: &[(&str, &str)]) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: hc, namespace: default}\n\
         spec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  \
         clusterIP: 10.96.1.70\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30090}]\n\
         status: {loadBalancer: {ingress: [{ip: 192.0.2.30}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: hc-1\n  namespace: default\n  labels: {kubernetes.io/service-name: hc}\n\
         addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:",
    );
    if endpoints.is_empty() {
        out += " []\n";
    } else {
        out += "\n";
    }
    for (pod, node) in endpoints {
        out += &format!(
            "  - {{addresses: [\"{}\"], nodeName: {node}, conditions: {{ready: true}}}}\n",
            env.pod_ip(pod)
        );
    }
    out
}

/// GET / on `node_ip`'s healthCheckNodePort from the external client: the status, the
/// JSON body, or `None` when nothing answers (yet).
fn hc_get(env: &Env, node_ip: IpAddr) -> Option<(u16, serde_json::Value)> {
    let (status, body) = svcplane_testkit::http_get(
        env.cluster.client().netns().name(),
        SocketAddr::new(node_ip, HC_PORT),
        "/",
        T,
    )
    .ok()?;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    Some((status, json))
}

/// Wait (bounded by `timeout`) until `node_ip` answers `status`; the last answer.
fn hc_wait(env: &Env, node_ip: IpAddr, status: u16, timeout: Duration) -> (u16, serde_json::Value) {
    let mut last = None;
    svcplane_testkit::wait_until(timeout, || {
        last = hc_get(env, node_ip);
        last.as_ref().is_some_and(|(s, _)| *s == status)
    });
    let last = last.unwrap_or_else(|| panic!("nothing answers on {node_ip}:{HC_PORT}"));
    assert_eq!(last.0, status, "{node_ip}:{HC_PORT} answered {last:?}");
    last
}

fn assert_hc_body(body: &serde_json::Value, local_endpoints: u64) {
    assert_eq!(
        body["service"],
        serde_json::json!({"namespace": "default", "name": "hc"}),
        "{body}"
    );
    assert_eq!(body["localEndpoints"], local_endpoints, "{body}");
}

#[test]
fn health_check_node_port() {
    let Some(env) = Env::start() else { return };
    env.manifests
        .write("hc.yaml", &hc_manifests(&env, &[("one-a", "node-a")]))
        .expect("hc.yaml");
    let _proxy_b = env.run_proxy_on("node-b");
    let (node_a, node_b) = (env.node_ip("node-a"), env.node_ip("node-b"));
    // The servers start with the sync that programs hc.yaml; the bound is not the point.
    let (_, body) = hc_wait(&env, node_a, 200, Duration::from_secs(10));
    assert_hc_body(&body, 1);
    let (_, body) = hc_wait(&env, node_b, 503, Duration::from_secs(10));
    assert_hc_body(&body, 0);
    // kube-proxy's server listens on every address of both families.
    let node_a_v6 = IpAddr::V6(env.cluster.node("node-a").expect("node").ipv6());
    let (status, body) = hc_get(&env, node_a_v6).expect("healthCheckNodePort over IPv6");
    assert_eq!(status, 200, "{body}");

    // The endpoint moves from node-a to node-b: node-a's load balancer must stop
    // sending traffic there promptly.
    env.manifests
        .write("hc.yaml", &hc_manifests(&env, &[("many-b", "node-b")]))
        .expect("hc.yaml");
    let (_, body) = hc_wait(&env, node_a, 503, Duration::from_secs(2));
    assert_hc_body(&body, 0);
    let (_, body) = hc_wait(&env, node_b, 200, Duration::from_secs(2));
    assert_hc_body(&body, 1);
}
