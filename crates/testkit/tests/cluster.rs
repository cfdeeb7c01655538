//! The virtual cluster itself (root): pods reach each other across nodes with their
//! own addresses, both families, TCP and UDP; closed ports are refused; nothing is
//! left behind after drop, even after a panic.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use svcplane_testkit::{Cluster, PodSpec, Proto, RequestError, parse_echo, skip_unless_root};

const T: Duration = Duration::from_secs(3);

fn two_nodes() -> Cluster {
    Cluster::builder()
        .node("node-a", "zone-a")
        .node("node-b", "zone-b")
        .pod(PodSpec::new("a1", "node-a").tcp(&[8080]).udp(&[8080]))
        .pod(PodSpec::new("b1", "node-b").tcp(&[8080]).udp(&[5353]))
        .client_address("203.0.113.10".parse().unwrap())
        .build()
        .unwrap()
}

/// Names of the existing namespaces (first word of each `ip netns list` line).
fn netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn pods_talk_across_nodes_with_their_own_addresses() {
    if skip_unless_root(&["ip", "sysctl"]) {
        return;
    }
    let cluster = two_nodes();
    let a1 = cluster.pod("a1").unwrap();
    let b1 = cluster.pod("b1").unwrap();
    assert_eq!(a1.ipv4().to_string(), "10.244.1.10");
    assert_eq!(b1.ipv4().to_string(), "10.244.2.10");

    for (dst, src) in [
        (IpAddr::V4(b1.ipv4()), IpAddr::V4(a1.ipv4())),
        (IpAddr::V6(b1.ipv6()), IpAddr::V6(a1.ipv6())),
    ] {
        let tcp = cluster
            .tcp_request(a1, SocketAddr::new(dst, 8080), T)
            .unwrap();
        let tcp = parse_echo(&tcp).unwrap();
        assert_eq!(
            (tcp.pod, tcp.peer.ip(), tcp.proto, tcp.port),
            (dst, src, Proto::Tcp, 8080)
        );
        let udp = cluster
            .udp_request(a1, SocketAddr::new(dst, 5353), T)
            .unwrap();
        let udp = parse_echo(&udp).unwrap();
        assert_eq!(
            (udp.pod, udp.peer.ip(), udp.proto, udp.port),
            (dst, src, Proto::Udp, 5353)
        );
    }

    // Closed ports: TCP RST and ICMP port unreachable both read as Refused.
    let closed = SocketAddr::new(IpAddr::V4(b1.ipv4()), 9999);
    assert!(matches!(
        cluster.tcp_request(a1, closed, T),
        Err(RequestError::Refused)
    ));
    assert!(matches!(
        cluster.udp_request(a1, closed, T),
        Err(RequestError::Refused)
    ));

    // The client reaches the nodes on the bridge from its own and its extra address
    // (nodes route the extra address back to it).
    let node_b = cluster.node("node-b").unwrap();
    let sshless = SocketAddr::new(IpAddr::V4(node_b.ipv4()), 9);
    let extra: IpAddr = "203.0.113.10".parse().unwrap();
    assert!(matches!(
        cluster.tcp_request_from(cluster.client(), extra, sshless, T),
        Err(RequestError::Refused)
    ));
}

#[test]
fn everything_is_removed_on_drop_even_after_a_panic() {
    if skip_unless_root(&["ip", "sysctl"]) {
        return;
    }
    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = two_nodes();
        names.push(cluster.fabric().name().to_string());
        names.push(cluster.client().netns().name().to_string());
        for node in cluster.nodes() {
            names.push(node.netns().name().to_string());
        }
        for pod in cluster.pods() {
            names.push(pod.netns().name().to_string());
        }
        panic!("test failure inside the cluster");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 6);
    let left = netns_list();
    for name in &names {
        assert!(!left.contains(name), "{name} survived: {left:?}");
    }
}

#[test]
fn pods_with_explicit_addresses_are_reachable_across_nodes() {
    if skip_unless_root(&["ip", "sysctl"]) {
        return;
    }
    // Addresses as a manifest might give them: IPv4 inside node-a's pod CIDR but not the
    // next free one, IPv6 outside every node's pod CIDR (fd00:244:0:1::/64).
    let v4: std::net::Ipv4Addr = "10.244.1.20".parse().unwrap();
    let v6: std::net::Ipv6Addr = "fd00:244:1::10".parse().unwrap();
    let cluster = Cluster::builder()
        .node("node-a", "zone-a")
        .node("node-b", "zone-b")
        .pod(PodSpec::new("a1", "node-a").ipv4(v4).ipv6(v6).tcp(&[8080]))
        .pod(PodSpec::new("b1", "node-b"))
        .build()
        .unwrap();
    let a1 = cluster.pod("a1").unwrap();
    assert_eq!((a1.ipv4(), a1.ipv6()), (v4, v6));
    let b1 = cluster.pod("b1").unwrap();
    for (dst, src) in [
        (IpAddr::V4(v4), IpAddr::V4(b1.ipv4())),
        (IpAddr::V6(v6), IpAddr::V6(b1.ipv6())),
    ] {
        let reply = cluster
            .tcp_request(b1, SocketAddr::new(dst, 8080), T)
            .unwrap_or_else(|e| panic!("b1 -> {dst}: {e}"));
        let reply = parse_echo(&reply).unwrap();
        assert_eq!((reply.pod, reply.peer.ip()), (dst, src));
    }
}

#[test]
fn an_address_used_twice_is_an_error() {
    if skip_unless_root(&["ip", "sysctl"]) {
        return;
    }
    // b1 would get 10.244.2.10 by default, which a1 already has.
    let taken: std::net::Ipv4Addr = "10.244.2.10".parse().unwrap();
    let err = Cluster::builder()
        .node("node-a", "zone-a")
        .node("node-b", "zone-b")
        .pod(PodSpec::new("a1", "node-a").ipv4(taken))
        .pod(PodSpec::new("b1", "node-b"))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("already used by pod a1"), "{err}");
}

/// The plan (no root) has the built cluster's addresses and writes the same manifests.
#[test]
fn the_plan_is_what_gets_built() {
    if skip_unless_root(&["ip", "sysctl"]) {
        return;
    }
    let builder = || {
        Cluster::builder()
            .node("node-a", "zone-a")
            .node("node-b", "zone-b")
            .pod(PodSpec::new("a1", "node-a").label("app", "x").tcp(&[80]))
            .pod(PodSpec::new("a2", "node-a").udp(&[53]).ready(false))
            .pod(PodSpec::new("b1", "node-b").ipv4("10.9.9.9".parse().unwrap()))
    };
    let plan = builder().plan().unwrap();
    let mut cluster = builder().build().unwrap();
    let mut plan = plan;
    cluster.add_pod(PodSpec::new("b2", "node-b")).unwrap();
    plan.add_pod(PodSpec::new("b2", "node-b")).unwrap();
    for node in cluster.nodes() {
        let planned = plan.node(node.name()).unwrap();
        assert_eq!((planned.v4, planned.v6), (node.ipv4(), node.ipv6()));
    }
    assert_eq!(plan.pods.len(), cluster.pods().len());
    for pod in cluster.pods() {
        let planned = plan.pod(pod.name()).unwrap();
        assert_eq!(
            (planned.v4, planned.v6),
            (pod.ipv4(), pod.ipv6()),
            "{}",
            pod.name()
        );
    }
    let (live, planned) = (cluster.manifests().unwrap(), plan.manifests().unwrap());
    for file in ["nodes.yaml", "pods.yaml"] {
        let read =
            |m: &svcplane_testkit::Manifests| std::fs::read_to_string(m.path().join(file)).unwrap();
        assert_eq!(read(&live), read(&planned), "{file}");
    }
}
