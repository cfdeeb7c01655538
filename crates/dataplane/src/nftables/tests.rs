//! Structural checks of the rendered transaction. States are built by hand: the
//! backend must translate whatever the engine decided, nothing more.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use svcplane_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
use svcplane_proxy::{
    ClusterIpMasquerade, DataplaneError, DesiredState, EmptyVerdict, EndpointState, ExternalPolicy,
    FamilyState, NodePortAddresses, ServicePortState, TrafficTarget,
};

use super::names::{endpoint_base, service_base};
use super::{ObjectKind, TABLE, parse_listing, render};

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(super) fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

pub(super) fn spn(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        service: NamespacedName::new(ns, name),
        port: port.into(),
        protocol,
    }
}

fn endpoint(addr: &str, port: u16) -> EndpointState {
    EndpointState::ready(ip(addr), port, false)
}

pub(super) fn target(endpoints: &[usize], if_empty: EmptyVerdict) -> TrafficTarget {
    TrafficTarget {
        endpoints: endpoints.into(),
        if_empty,
    }
}

/// A ClusterIP service port `ns/name:http` on `cip:80` balanced over `eps` (port 8080).
pub(super) fn cluster_ip_service(name: &str, cip: &str, eps: &[&str]) -> ServicePortState {
    let all: Vec<usize> = (0..eps.len()).collect();
    ServicePortState {
        name: spn("default", name, "http", Protocol::Tcp),
        protocol: Protocol::Tcp,
        port: 80,
        cluster_ip: Some(ip(cip)),
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        affinity_timeout_seconds: None,
        ipvs_scheduler: None,
        endpoints: eps.iter().map(|e| endpoint(e, 8080)).collect(),
        internal: target(&all, EmptyVerdict::Reject),
        external: target(&all, EmptyVerdict::Reject),
        external_policy: ExternalPolicy::Cluster,
        health_check_node_port: None,
    }
}

fn family(family: IpFamily, services: Vec<ServicePortState>) -> FamilyState {
    let mut f = FamilyState::empty(family);
    f.services = services.into_iter().map(Arc::new).collect();
    f
}

pub(super) fn state(v4: Vec<ServicePortState>, v6: Vec<ServicePortState>) -> DesiredState {
    DesiredState {
        node_name: "node-a".into(),
        node_zone: None,
        v4: family(IpFamily::V4, v4),
        v6: family(IpFamily::V6, v6),
        health_checks: BTreeMap::new(),
    }
}

fn chain_name(prefix: &str, s: &ServicePortState) -> String {
    format!("{prefix}{}", service_base(&s.name).unwrap())
}

fn endpoint_chain(s: &ServicePortState, addr: &str, port: u16) -> String {
    format!("endpoint-{}", endpoint_base(&s.name, ip(addr), port))
}

fn affinity_set(s: &ServicePortState, addr: &str, port: u16) -> String {
    format!("affinity-{}", endpoint_base(&s.name, ip(addr), port))
}

/// The body of `chain NAME { … }` in the table block, or `None` if not declared.
fn chain_body<'a>(script: &'a str, name: &str) -> Option<&'a str> {
    let header = format!("\tchain {name} {{\n");
    let start = script.find(&header)? + header.len();
    let end = script[start..].find("\t}\n")? + start;
    Some(&script[start..end])
}

/// The elements of `add element <t> svcplane <map> { … }`, one a line.
fn elements<'a>(script: &'a str, t: &str, map: &str) -> Vec<&'a str> {
    let header = format!("add element {t} svcplane {map} {{\n");
    let Some(start) = script.find(&header).map(|s| s + header.len()) else {
        return Vec::new();
    };
    let end = script[start..].find("\n}\n").unwrap() + start;
    script[start..end]
        .lines()
        .map(|l| l.trim().trim_end_matches(','))
        .collect()
}

fn declared_chains(script: &str) -> Vec<&str> {
    script
        .lines()
        .filter_map(|l| l.strip_prefix("\tchain "))
        .filter_map(|l| l.strip_suffix(" {"))
        .collect()
}

/// Every chain declared is referenced by some rule or element (base chains aside).
fn assert_no_orphan_chains(script: &str) {
    for chain in declared_chains(script) {
        // Fixed helper chains (reject-chain, …) exist always, as in kube-proxy; only
        // per-service chains (their names have a `/`) must be referenced.
        if !chain.contains('/') {
            continue;
        }
        let jump = format!("jump {chain}\n");
        let goto = format!("goto {chain}");
        let referenced = script.contains(&jump)
            || script.match_indices(&goto).any(|(i, _)| {
                // exact name: followed by a separator, not a longer name
                matches!(
                    script.as_bytes().get(i + goto.len()),
                    Some(b',' | b'\n' | b' ')
                )
            });
        assert!(
            referenced,
            "chain {chain} is declared but nothing references it"
        );
    }
}

#[test]
fn cluster_ip_with_two_endpoints() {
    let svc = cluster_ip_service("web", "10.96.0.10", &["10.244.1.5", "10.244.2.7"]);
    let script = render(&state(vec![svc.clone()], vec![])).unwrap();
    let svc_chain = chain_name("service-", &svc);

    assert_eq!(
        elements(&script, "ip", "service-ips"),
        vec![format!("10.96.0.10 . tcp . 80 : goto {svc_chain}")]
    );
    assert_eq!(elements(&script, "ip", "cluster-ips"), vec!["10.96.0.10"]);
    let body = chain_body(&script, &svc_chain).expect("service chain");
    // The service chain ends in the shared chain for two endpoints, which picks bucket
    // `numgen random mod 2` of the endpoints map under the packet's destination.
    assert_eq!(
        body.lines().map(str::trim).next_back(),
        Some("goto endpoints-tcp-mod-2"),
        "{body}"
    );
    assert!(!body.contains("dnat"), "{body}");
    assert_eq!(
        chain_body(&script, "endpoints-tcp-mod-2").map(str::trim),
        Some("dnat ip to ip daddr . tcp dport . numgen random mod 2 map @endpoints-tcp")
    );
    assert_eq!(
        elements(&script, "ip", "endpoints-tcp"),
        vec![
            "10.96.0.10 . 80 . 0 : 10.244.1.5 . 8080",
            "10.96.0.10 . 80 . 1 : 10.244.2.7 . 8080",
        ]
    );
    assert!(script.contains(
        "add map ip svcplane endpoints-tcp { typeof ip daddr . tcp dport . numgen random mod 1 : ip daddr . tcp dport ;"
    ));
    // No per-endpoint chains without affinity; hairpin through the set instead.
    assert!(chain_body(&script, &endpoint_chain(&svc, "10.244.1.5", 8080)).is_none());
    assert_eq!(
        elements(&script, "ip", "hairpin"),
        vec!["10.244.1.5 . 10.244.1.5", "10.244.2.7 . 10.244.2.7"]
    );
    // No external address: no external chain, no nodeport, no no-endpoint element.
    assert!(chain_body(&script, &chain_name("external-", &svc)).is_none());
    assert!(elements(&script, "ip", "service-nodeports").is_empty());
    assert!(elements(&script, "ip", "no-endpoint-services").is_empty());
    assert_no_orphan_chains(&script);
}

#[test]
fn fixed_chains_follow_kube_proxy() {
    let script = render(&state(vec![], vec![])).unwrap();
    for (chain, spec) in [
        (
            "filter-prerouting-pre-dnat",
            "type filter hook prerouting priority -110",
        ),
        (
            "filter-output-pre-dnat",
            "type filter hook output priority -110",
        ),
        ("filter-input", "type filter hook input priority 0"),
        ("filter-forward", "type filter hook forward priority 0"),
        ("filter-output", "type filter hook output priority 0"),
        ("nat-prerouting", "type nat hook prerouting priority -100"),
        ("nat-output", "type nat hook output priority -100"),
        ("nat-postrouting", "type nat hook postrouting priority 100"),
    ] {
        let body = chain_body(&script, chain).unwrap_or_else(|| panic!("{chain} missing"));
        assert!(body.contains(spec), "{chain}: {body}");
    }
    // kube-proxy's layout since kubernetes#132456: only the firewall before DNAT, the
    // endpoint and ClusterIP checks after it (the old chains are gone).
    let jumps = |chain: &str| -> Vec<String> {
        let body = chain_body(&script, chain).unwrap_or_else(|| panic!("{chain} missing"));
        body.lines()
            .map(str::trim)
            .filter(|l| l.contains("jump"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        jumps("filter-prerouting-pre-dnat"),
        ["ct state new jump firewall-check"]
    );
    assert_eq!(
        jumps("filter-output-pre-dnat"),
        ["ct state new jump firewall-check"]
    );
    assert_eq!(
        jumps("filter-input"),
        [
            "ct state new jump nodeport-endpoints-check",
            "ct state new jump service-endpoints-check"
        ]
    );
    for chain in ["filter-forward", "filter-output"] {
        assert_eq!(
            jumps(chain),
            [
                "ct state new jump service-endpoints-check",
                "ct state new jump cluster-ips-check"
            ],
            "{chain}"
        );
    }
    for old in ["filter-prerouting", "filter-output-post-dnat"] {
        assert!(chain_body(&script, old).is_none(), "{old} still rendered");
    }
    assert!(
        chain_body(&script, "nat-postrouting")
            .unwrap()
            .contains("jump masquerading")
    );
    assert!(
        chain_body(&script, "mark-for-masquerade")
            .unwrap()
            .contains("meta mark set meta mark or 0x00004000")
    );
    let masq = chain_body(&script, "masquerading").unwrap();
    let lines: Vec<&str> = masq.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        vec![
            "ct status dnat ip saddr . ip daddr @hairpin jump mark-for-masquerade",
            "meta mark & 0x00004000 == 0 return",
            "meta mark set meta mark xor 0x00004000",
            "masquerade fully-random",
        ]
    );
    assert!(
        chain_body(&script, "cluster-ips-check")
            .unwrap()
            .contains("ip daddr @cluster-ips reject")
    );
    assert!(script.starts_with("add table ip svcplane"));
    assert!(script.contains("flush table ip svcplane\n"));
    assert!(script.contains("flush map ip svcplane service-ips\n"));
    // Only our own tables are named.
    for line in script.lines() {
        for word in ["table ", "chain ", "map ", "set ", "element "] {
            if let Some(pos) = line.find(&format!("add {word}")) {
                let rest = &line[pos + 4 + word.len()..];
                assert!(
                    rest.starts_with("ip svcplane") || rest.starts_with("ip6 svcplane"),
                    "{line}"
                );
            }
        }
    }
}

#[test]
fn no_endpoints_reject_and_drop() {
    let mut reject = cluster_ip_service("empty", "10.96.0.20", &[]);
    reject.node_port = Some(30020);
    let mut drop = cluster_ip_service("local-only", "10.96.0.21", &[]);
    drop.internal.if_empty = EmptyVerdict::Drop;
    let script = render(&state(vec![reject.clone(), drop.clone()], vec![])).unwrap();
    assert_eq!(
        elements(&script, "ip", "no-endpoint-services"),
        vec![
            "10.96.0.20 . tcp . 80 : goto reject-chain",
            "10.96.0.21 . tcp . 80 : drop",
        ]
    );
    assert_eq!(
        elements(&script, "ip", "no-endpoint-nodeports"),
        vec!["tcp . 30020 : goto reject-chain"]
    );
    // An empty target gets no balancing chain and nothing in service-ips.
    assert!(chain_body(&script, &chain_name("service-", &reject)).is_none());
    assert!(chain_body(&script, &chain_name("external-", &reject)).is_none());
    assert!(elements(&script, "ip", "service-ips").is_empty());
    // Both are still ClusterIPs, so other ports on them are rejected.
    assert_eq!(
        elements(&script, "ip", "cluster-ips"),
        vec!["10.96.0.20", "10.96.0.21"]
    );
    assert_eq!(
        chain_body(&script, "reject-chain").unwrap().trim(),
        "reject"
    );
    assert_no_orphan_chains(&script);
}

#[test]
fn node_port_with_cluster_policy() {
    let mut svc = cluster_ip_service("np", "10.96.0.30", &["10.244.1.9"]);
    svc.node_port = Some(30080);
    let script = render(&state(vec![svc.clone()], vec![])).unwrap();
    let ext = chain_name("nodeport-", &svc);
    assert_eq!(
        elements(&script, "ip", "service-nodeports"),
        vec![format!("tcp . 30080 : goto {ext}")]
    );
    let body = chain_body(&script, &ext).unwrap();
    let lines: Vec<&str> = body.lines().map(str::trim).collect();
    // The node port chooses its endpoint by the port alone (the destination is any
    // local address), through the shared chain of its count.
    assert_eq!(
        lines,
        vec![
            "jump mark-for-masquerade",
            "goto nodeport-endpoints-tcp-mod-1"
        ]
    );
    assert_eq!(
        elements(&script, "ip", "nodeport-endpoints-tcp"),
        vec!["30080 . 0 : 10.244.1.9 . 8080"]
    );
    assert_eq!(
        chain_body(&script, "nodeport-endpoints-tcp-mod-1").map(str::trim),
        Some("dnat ip to tcp dport . numgen random mod 1 map @nodeport-endpoints-tcp")
    );
    assert!(script.contains(
        "add map ip svcplane nodeport-endpoints-tcp { typeof tcp dport . numgen random mod 1 : ip daddr . tcp dport ;"
    ));
    // No external address: no chain for one.
    assert!(chain_body(&script, &chain_name("external-", &svc)).is_none());
    assert!(!script.contains("extpolicy-"));
    let services = chain_body(&script, "services").unwrap();
    assert!(services.contains(
        "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
    ));
    assert!(script.contains("delete set ip svcplane nodeport-ips\n"));
    assert_no_orphan_chains(&script);
}

#[test]
fn node_port_addresses_cidrs_use_an_interval_set() {
    let mut svc = cluster_ip_service("np", "10.96.0.30", &["10.244.1.9"]);
    svc.node_port = Some(30080);
    let mut st = state(vec![svc], vec![]);
    st.v4.nodeport_addresses = NodePortAddresses::Cidrs(vec![
        net("192.168.0.0/16"),
        net("192.168.1.0/24"),
        net("172.16.0.0/12"),
    ]);
    let script = render(&st).unwrap();
    assert!(
        script.contains(
            "add set ip svcplane nodeport-ips { type ipv4_addr ; flags interval ; comment"
        )
    );
    assert!(script.contains("flush set ip svcplane nodeport-ips\n"));
    // Overlapping ranges are merged (nft rejects overlapping intervals).
    assert_eq!(
        elements(&script, "ip", "nodeport-ips"),
        vec!["172.16.0.0/12", "192.168.0.0/16"]
    );
    let services = chain_body(&script, "services").unwrap();
    assert!(
        services.contains("ip daddr @nodeport-ips fib daddr type local"),
        "{services}"
    );
    assert!(
        chain_body(&script, "nodeport-endpoints-check")
            .unwrap()
            .contains("ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports")
    );
}

#[test]
fn load_balancer_with_source_ranges() {
    let mut svc = cluster_ip_service("lb", "10.96.0.40", &["10.244.1.10"]);
    svc.node_port = Some(30040);
    svc.load_balancer_ips = vec![ip("203.0.113.7")];
    svc.external_ips = vec![ip("198.51.100.3")];
    svc.load_balancer_source_ranges = vec![net("192.0.2.0/24"), net("2001:db8::/32")];
    let st = state(vec![svc.clone()], vec![]);
    let script = render(&st).unwrap();
    let fw = chain_name("firewall-", &svc);
    let ext = chain_name("external-", &svc);
    assert_eq!(
        elements(&script, "ip", "firewall-ips"),
        vec![format!("203.0.113.7 . tcp . 80 : goto {fw}")]
    );
    // The IPv6 range is not this family's.
    assert_eq!(
        chain_body(&script, &fw).unwrap().trim(),
        "ip saddr != { 192.0.2.0/24 } drop"
    );
    // externalIPs and LB IPs go to the external chain; source ranges apply to the LB IP only.
    let service_ips = elements(&script, "ip", "service-ips");
    assert!(service_ips.contains(&format!("198.51.100.3 . tcp . 80 : goto {ext}").as_str()));
    assert!(service_ips.contains(&format!("203.0.113.7 . tcp . 80 : goto {ext}").as_str()));
    assert!(!script.contains("198.51.100.3 . tcp . 80 : goto firewall-"));
    assert!(
        chain_body(&script, "firewall-check")
            .unwrap()
            .contains("ip daddr . meta l4proto . th dport vmap @firewall-ips")
    );
    // Whatever the engine allows is spelled, merged (allowFromNode is its decision).
    let mut from_node = svc.clone();
    from_node.load_balancer_source_ranges = vec![
        net("192.0.2.0/25"),
        net("203.0.113.7/32"),
        net("192.0.2.128/25"),
    ];
    let script = render(&state(vec![from_node], vec![])).unwrap();
    assert_eq!(
        chain_body(&script, &fw).unwrap().trim(),
        "ip saddr != { 192.0.2.0/24, 203.0.113.7/32 } drop"
    );
    // No source ranges: no firewall.
    let mut open = svc.clone();
    open.load_balancer_source_ranges.clear();
    let script = render(&state(vec![open], vec![])).unwrap();
    assert!(elements(&script, "ip", "firewall-ips").is_empty());
    assert!(chain_body(&script, &fw).is_none());
    assert_no_orphan_chains(&script);
}

#[test]
fn session_affinity_sets_and_updates() {
    let mut svc = cluster_ip_service("sticky", "10.96.0.50", &["10.244.1.1", "10.244.1.2"]);
    svc.affinity_timeout_seconds = Some(10800);
    let script = render(&state(vec![svc.clone()], vec![])).unwrap();
    for addr in ["10.244.1.1", "10.244.1.2"] {
        let set = affinity_set(&svc, addr, 8080);
        let ep = endpoint_chain(&svc, addr, 8080);
        assert!(
            script.contains(&format!(
                "\tset {set} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }}\n"
            )),
            "set for {addr}"
        );
        let svc_body = chain_body(&script, &chain_name("service-", &svc)).unwrap();
        assert!(svc_body.contains(&format!("ip saddr @{set} goto {ep}")));
        let ep_body = chain_body(&script, &ep).unwrap();
        let lines: Vec<&str> = ep_body.lines().map(str::trim).collect();
        assert_eq!(
            lines,
            vec![
                format!("update @{set} {{ ip saddr }}"),
                format!("meta l4proto tcp dnat to {addr}:8080"),
            ]
        );
    }
    // Affinity checks come before the random choice.
    let svc_body = chain_body(&script, &chain_name("service-", &svc)).unwrap();
    assert!(svc_body.find("@affinity-").unwrap() < svc_body.find("numgen").unwrap());
    // Affinity sets are never flushed (stickiness survives a resync).
    assert!(!script.contains("flush set ip svcplane affinity-"));
    // Without affinity: no sets, no update.
    let plain = cluster_ip_service("sticky", "10.96.0.50", &["10.244.1.1"]);
    let script = render(&state(vec![plain], vec![])).unwrap();
    assert!(!script.contains("affinity-"));
    assert!(!script.contains("update @"));
}

#[test]
fn external_traffic_policy_local() {
    // Endpoints: 0 local, 1 remote. internal (iTP Cluster) = both, external = local
    // only, local_origin = both.
    let mut svc = cluster_ip_service("etp", "10.96.0.60", &["10.244.1.1", "10.244.2.2"]);
    svc.node_port = Some(30060);
    svc.load_balancer_ips = vec![ip("203.0.113.60")];
    svc.external = target(&[0], EmptyVerdict::Drop);
    svc.external_policy = ExternalPolicy::Local {
        local_origin: target(&[0, 1], EmptyVerdict::Reject),
    };
    let mut st = state(vec![svc.clone()], vec![]);
    st.v4.cluster_cidrs = vec![net("10.244.0.0/16")];
    let script = render(&st).unwrap();
    let ext = chain_name("external-", &svc);
    let np = chain_name("nodeport-", &svc);
    let lines = |script: &str, chain: &str| -> Vec<String> {
        chain_body(script, chain)
            .unwrap()
            .lines()
            .map(|l| l.trim().to_owned())
            .collect()
    };
    // Each entry kind selects in its own key space: the LoadBalancer IP by address and
    // port, the node port by port; the short-circuits (the cluster-wide list of the
    // same destination) in the origin maps.
    for (chain, origin, local) in [
        (&ext, "origin-endpoints-tcp-mod-2", "endpoints-tcp-mod-1"),
        (
            &np,
            "origin-nodeport-endpoints-tcp-mod-2",
            "nodeport-endpoints-tcp-mod-1",
        ),
    ] {
        assert_eq!(
            lines(&script, chain),
            vec![
                format!("ip saddr 10.244.0.0/16 goto {origin} comment \"short-circuit pod traffic\""),
                "fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
                    .to_owned(),
                format!("fib saddr type local goto {origin} comment \"short-circuit local traffic\""),
                // External traffic is not masqueraded on the Local path.
                format!("goto {local}"),
            ]
        );
    }
    assert_eq!(
        elements(&script, "ip", "endpoints-tcp"),
        vec![
            "10.96.0.60 . 80 . 0 : 10.244.1.1 . 8080",
            "10.96.0.60 . 80 . 1 : 10.244.2.2 . 8080",
            "203.0.113.60 . 80 . 0 : 10.244.1.1 . 8080",
        ]
    );
    assert_eq!(
        elements(&script, "ip", "origin-endpoints-tcp"),
        vec![
            "203.0.113.60 . 80 . 0 : 10.244.1.1 . 8080",
            "203.0.113.60 . 80 . 1 : 10.244.2.2 . 8080",
        ]
    );
    assert_eq!(
        elements(&script, "ip", "nodeport-endpoints-tcp"),
        vec!["30060 . 0 : 10.244.1.1 . 8080"]
    );
    assert_eq!(
        elements(&script, "ip", "origin-nodeport-endpoints-tcp"),
        vec![
            "30060 . 0 : 10.244.1.1 . 8080",
            "30060 . 1 : 10.244.2.2 . 8080",
        ]
    );
    assert_eq!(
        elements(&script, "ip", "service-ips"),
        vec![
            format!(
                "10.96.0.60 . tcp . 80 : goto {}",
                chain_name("service-", &svc)
            ),
            format!("203.0.113.60 . tcp . 80 : goto {ext}"),
        ]
    );
    assert!(!script.contains("extpolicy-") && !script.contains(&chain_name("cluster-", &svc)));
    assert_no_orphan_chains(&script);

    // No local endpoint: the short-circuits remain, and the rest is dropped by the
    // filter chains via the no-endpoint maps.
    let mut none_local = svc.clone();
    none_local.external = target(&[], EmptyVerdict::Drop);
    let mut st = state(vec![none_local.clone()], vec![]);
    st.v4.cluster_cidrs = vec![net("10.244.0.0/16")];
    let script = render(&st).unwrap();
    let body = chain_body(&script, &np).unwrap();
    assert_eq!(
        body.lines().last().map(str::trim),
        Some(
            "fib saddr type local goto origin-nodeport-endpoints-tcp-mod-2 comment \"short-circuit local traffic\""
        )
    );
    assert!(elements(&script, "ip", "nodeport-endpoints-tcp").is_empty());
    assert_eq!(
        elements(&script, "ip", "no-endpoint-nodeports"),
        vec!["tcp . 30060 : drop"]
    );
    assert_eq!(
        elements(&script, "ip", "no-endpoint-services"),
        vec!["203.0.113.60 . tcp . 80 : drop"]
    );
    assert_eq!(
        elements(&script, "ip", "service-nodeports"),
        vec![format!("tcp . 30060 : goto {np}")]
    );
    assert_no_orphan_chains(&script);

    // iTP Local as well: internal = external = local only, local_origin = both → each
    // list in its own map, whatever their equality.
    let mut both_local = svc.clone();
    both_local.internal = target(&[0], EmptyVerdict::Drop);
    let script = render(&state(vec![both_local.clone()], vec![])).unwrap();
    assert!(
        chain_body(&script, &chain_name("external-", &both_local))
            .unwrap()
            .ends_with("goto endpoints-tcp-mod-1\n")
    );
    assert_eq!(
        chain_body(&script, &chain_name("service-", &both_local))
            .unwrap()
            .trim(),
        "goto endpoints-tcp-mod-1"
    );
    // No cluster CIDR known: no pod short-circuit rule.
    assert!(!script.contains("short-circuit pod traffic"));
    assert_no_orphan_chains(&script);
}

#[test]
fn ipv6_syntax() {
    let mut svc = cluster_ip_service("v6", "fd00:96::10", &["fd00:244::5"]);
    svc.name.port = "dns".into();
    svc.protocol = Protocol::Udp;
    svc.name.protocol = Protocol::Udp;
    svc.port = 53;
    svc.endpoints[0].port = 5353;
    svc.node_port = Some(30053);
    let mut st = state(vec![], vec![svc.clone()]);
    st.v6.cluster_ip_masquerade = ClusterIpMasquerade::FromOutside(vec![net("fd00:244::/48")]);
    let script = render(&st).unwrap();
    assert!(script.contains("add table ip6 svcplane"));
    assert!(script.contains("table ip6 svcplane {\n"));
    assert!(script.contains(
        "add map ip6 svcplane service-ips { type ipv6_addr . inet_proto . inet_service : verdict"
    ));
    let ep = endpoint_chain(&svc, "fd00:244::5", 5353);
    assert!(ep.contains("__fd00.244..5/5353"), "{ep}");
    let svc_body = chain_body(&script, &chain_name("service-", &svc)).unwrap();
    assert!(
        svc_body.ends_with("goto endpoints-udp-mod-1\n"),
        "{svc_body}"
    );
    assert_eq!(
        elements(&script, "ip6", "endpoints-udp"),
        vec!["fd00:96::10 . 53 . 0 : fd00:244::5 . 5353"]
    );
    let v6_part = &script[script.find("add table ip6 svcplane").unwrap()..];
    assert_eq!(
        chain_body(v6_part, "endpoints-udp-mod-1").map(str::trim),
        Some("dnat ip6 to ip6 daddr . udp dport . numgen random mod 1 map @endpoints-udp")
    );
    // The NodePort's selection, keyed by the port alone.
    assert_eq!(
        chain_body(v6_part, "nodeport-endpoints-udp-mod-1").map(str::trim),
        Some("dnat ip6 to udp dport . numgen random mod 1 map @nodeport-endpoints-udp")
    );
    assert_eq!(
        elements(&script, "ip6", "nodeport-endpoints-udp"),
        vec!["30053 . 0 : fd00:244::5 . 5353"]
    );
    assert_eq!(
        elements(&script, "ip6", "hairpin"),
        vec!["fd00:244::5 . fd00:244::5"]
    );
    let v6_masq = &script[script.find("add table ip6 svcplane").unwrap()..];
    assert!(
        chain_body(v6_masq, "masquerading")
            .unwrap()
            .contains("ct status dnat ip6 saddr . ip6 daddr @hairpin jump mark-for-masquerade")
    );
    assert!(svc_body.contains(
        "ip6 daddr fd00:96::10 udp dport 53 ip6 saddr != fd00:244::/48 jump mark-for-masquerade"
    ));
    assert_eq!(
        elements(&script, "ip6", "service-ips"),
        vec![format!(
            "fd00:96::10 . udp . 53 : goto {}",
            chain_name("service-", &svc)
        )]
    );
    let v6_part = &script[script.find("add table ip6 svcplane").unwrap()..];
    assert!(
        chain_body(v6_part, "services")
            .unwrap()
            .contains("ip6 daddr != ::1")
    );
    // The v4 table is still written, empty.
    assert!(script.contains("add table ip svcplane"));
    assert!(elements(&script, "ip", "service-ips").is_empty());
}

#[test]
fn cluster_ip_masquerade_modes() {
    let svc = cluster_ip_service("m", "10.96.0.70", &["10.244.1.1"]);
    let svc_chain = chain_name("service-", &svc);
    let mut st = state(vec![svc], vec![]);

    st.v4.cluster_ip_masquerade = ClusterIpMasquerade::All;
    let script = render(&st).unwrap();
    assert!(
        chain_body(&script, &svc_chain)
            .unwrap()
            .contains("ip daddr 10.96.0.70 tcp dport 80 jump mark-for-masquerade")
    );

    st.v4.cluster_ip_masquerade =
        ClusterIpMasquerade::FromOutside(vec![net("10.244.0.0/16"), net("10.245.0.0/16")]);
    let script = render(&st).unwrap();
    // Adjacent ranges merge into one.
    assert!(chain_body(&script, &svc_chain).unwrap().contains(
        "ip daddr 10.96.0.70 tcp dport 80 ip saddr != 10.244.0.0/15 jump mark-for-masquerade"
    ));
    st.v4.cluster_ip_masquerade =
        ClusterIpMasquerade::FromOutside(vec![net("10.244.0.0/16"), net("10.100.0.0/16")]);
    let script = render(&st).unwrap();
    assert!(
        chain_body(&script, &svc_chain)
            .unwrap()
            .contains("ip saddr != { 10.100.0.0/16, 10.244.0.0/16 } jump mark-for-masquerade")
    );

    st.v4.cluster_ip_masquerade = ClusterIpMasquerade::None;
    let script = render(&st).unwrap();
    let body = chain_body(&script, &svc_chain).unwrap();
    assert!(!body.contains("mark-for-masquerade"), "{body}");
    assert_eq!(body.trim(), "goto endpoints-tcp-mod-1");
}

#[test]
fn hostile_identifiers_never_reach_the_script() {
    for (ns, name, port) in [
        ("default", "web\"; flush ruleset; \"", "http"),
        ("default", "web", "http }\nadd table ip evil {"),
        ("def;ault", "web", "http"),
        ("default", "we b", "http"),
    ] {
        let mut svc = cluster_ip_service("x", "10.96.0.80", &["10.244.1.1"]);
        svc.name = spn(ns, name, port, Protocol::Tcp);
        match render(&state(vec![svc], vec![])) {
            Err(DataplaneError::Other(msg)) => assert!(msg.contains("nftables"), "{msg}"),
            other => panic!("{ns}/{name}:{port}: expected an error, got {other:?}"),
        }
    }
}

#[test]
fn wrong_family_addresses_are_errors() {
    let svc = cluster_ip_service("x", "fd00::1", &["10.244.1.1"]);
    assert!(render(&state(vec![svc], vec![])).is_err());
    let svc = cluster_ip_service("x", "10.96.0.1", &["fd00::1"]);
    assert!(render(&state(vec![svc], vec![])).is_err());
}

#[test]
fn output_is_deterministic_and_sorted() {
    let a = cluster_ip_service("aaa", "10.96.0.2", &["10.244.1.1"]);
    let b = cluster_ip_service("bbb", "10.96.0.1", &["10.244.1.2", "10.244.1.3"]);
    let one = render(&state(vec![a.clone(), b.clone()], vec![])).unwrap();
    let two = render(&state(vec![b, a], vec![])).unwrap();
    assert_eq!(one, two);
    // Elements sorted by key, regardless of service order.
    let ips = elements(&one, "ip", "cluster-ips");
    assert_eq!(ips, vec!["10.96.0.1", "10.96.0.2"]);
    // Services' chains in service order.
    let aaa = one.find("-default/aaa/tcp/http {").unwrap();
    let bbb = one.find("-default/bbb/tcp/http {").unwrap();
    assert!(aaa < bbb);
}

#[test]
fn conflicting_keys_keep_the_first_service() {
    let mut a = cluster_ip_service("aaa", "10.96.0.2", &["10.244.1.1"]);
    let mut b = cluster_ip_service("bbb", "10.96.0.3", &["10.244.1.2"]);
    a.external_ips = vec![ip("198.51.100.1")];
    b.external_ips = vec![ip("198.51.100.1")];
    let script = render(&state(vec![a.clone(), b], vec![])).unwrap();
    let matching: Vec<&str> = elements(&script, "ip", "service-ips")
        .into_iter()
        .filter(|e| e.starts_with("198.51.100.1 "))
        .collect();
    assert_eq!(
        matching,
        vec![format!(
            "198.51.100.1 . tcp . 80 : goto {}",
            chain_name("external-", &a)
        )]
    );
    // Its endpoint buckets are the same service's.
    let buckets: Vec<&str> = elements(&script, "ip", "endpoints-tcp")
        .into_iter()
        .filter(|e| e.starts_with("198.51.100.1 "))
        .collect();
    assert_eq!(buckets, vec!["198.51.100.1 . 80 . 0 : 10.244.1.1 . 8080"]);
}

#[test]
fn out_of_range_endpoint_indices_are_ignored() {
    let mut svc = cluster_ip_service("x", "10.96.0.90", &["10.244.1.1"]);
    svc.internal.endpoints = vec![0, 7].into();
    let script = render(&state(vec![svc.clone()], vec![])).unwrap();
    assert_eq!(
        chain_body(&script, &chain_name("service-", &svc))
            .unwrap()
            .trim(),
        "goto endpoints-tcp-mod-1"
    );
    assert_eq!(
        elements(&script, "ip", "endpoints-tcp"),
        vec!["10.96.0.90 . 80 . 0 : 10.244.1.1 . 8080"]
    );
}

#[test]
fn listing_is_parsed() {
    let listing = "table ip svcplane {\n\tcomment \"x\"\n\tset affinity-A-ns/a {\n\t\ttype ipv4_addr\n\t}\n\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t}\n\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}\n}\ntable ip kube-proxy {\n\tchain services {\n\t}\n\tset cluster-ips {\n\t}\n}\n";
    assert_eq!(
        parse_listing(listing, TABLE),
        vec![
            (ObjectKind::Set, "affinity-A-ns/a".to_owned()),
            (ObjectKind::Map, "service-ips".to_owned()),
            (ObjectKind::Chain, "services".to_owned()),
        ]
    );
}

/// 10k service ports × 10 endpoints. Debug builds are slow, so the bound is generous
/// there; release builds render this in a fraction of a second.
#[test]
fn renders_a_large_state_completely() {
    let services: Vec<ServicePortState> = (0..10_000u32)
        .map(|i| {
            let eps: Vec<String> = (0..10u32)
                .map(|e| {
                    format!(
                        "10.{}.{}.{}",
                        100 + (i >> 16),
                        (i >> 8) & 0xff,
                        (i & 0xff) ^ (e << 4)
                    )
                })
                .collect();
            let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
            let mut s = cluster_ip_service(
                &format!("svc-{i}"),
                &format!("10.96.{}.{}", i >> 8, i & 0xff),
                &eps,
            );
            s.node_port = Some(30000 + (i % 2000) as u16);
            s
        })
        .collect();
    let st = state(services, vec![]);
    // Correctness at scale only; speed is measured by benchmarks, not asserted in tests.
    let script = render(&st).unwrap();
    assert_eq!(elements(&script, "ip", "endpoints-tcp").len(), 100_000);
    // 2000 node ports, each the first claimer's 10 buckets.
    assert_eq!(
        elements(&script, "ip", "nodeport-endpoints-tcp").len(),
        20_000
    );
}

mod partial {
    use super::*;
    use crate::nftables::netlink::Op;
    use crate::nftables::render::{NetlinkPartial, Partial, hairpin_refs, render_partial};
    use svcplane_proxy::Diff;

    /// The partial from `prev` to `next`, the same whether the hairpin set's users are
    /// counted (as the backend does) or found by walking `next`; the counts it hands
    /// back bring `prev`'s to `next`'s.
    fn partial(prev: &DesiredState, next: &DesiredState) -> Option<Partial> {
        let diff = Diff::between(Some(Arc::new(prev.clone())), next, false);
        let mut refs = hairpin_refs(prev);
        let counted =
            render_partial(prev, next, &diff, TABLE, Some(&refs)).expect("render_partial");
        let walked = render_partial(prev, next, &diff, TABLE, None).expect("render_partial");
        assert_eq!(
            counted, walked,
            "counted hairpin users vs a walk of every service"
        );
        if let Some(p) = &counted {
            p.hairpin_users.apply_to(&mut refs);
            assert_eq!(refs, hairpin_refs(next));
        }
        counted
    }

    fn base() -> DesiredState {
        state(
            vec![
                cluster_ip_service("a", "10.96.0.1", &["10.244.1.1"]),
                cluster_ip_service("b", "10.96.0.2", &["10.244.1.2", "10.244.1.3"]),
            ],
            vec![],
        )
    }

    #[test]
    fn unchanged_state_is_an_empty_partial() {
        let p = partial(&base(), &base()).unwrap();
        assert!(p.script.is_empty() && p.stale.is_empty(), "{p:?}");
        assert_eq!(p.netlink, Some(NetlinkPartial::default()));
    }

    /// The netlink operations of `nl`, briefly (`chain` marks the service chain).
    fn op_kinds(nl: &NetlinkPartial, chain: &str) -> Vec<String> {
        nl.ops
            .iter()
            .map(|op| match op {
                Op::Elements {
                    delete, set, items, ..
                } => format!(
                    "{} {set} {}",
                    if *delete { "del" } else { "add" },
                    items.len()
                ),
                Op::DataElements {
                    delete, set, items, ..
                } => format!(
                    "{} {set} {}",
                    if *delete { "del" } else { "add" },
                    items.len()
                ),
                Op::FlushChain { chain: c, .. } => format!("flush {}", c == chain),
                Op::AddChain { chain: c, .. } => format!("chain {}", c == chain),
                Op::AddRule {
                    chain: c, exprs, ..
                } => format!("rule {} {}", c == chain, exprs.len()),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_endpoint_swap_is_element_operations_only() {
        let prev = base();
        let mut next = base();
        let b = cluster_ip_service("b", "10.96.0.2", &["10.244.1.2", "10.244.1.9"]);
        next.v4.services.insert(Arc::new(b.clone()));
        let p = partial(&prev, &next).unwrap();
        let nl = p.netlink.expect("a netlink form");
        // Bucket 1 now holds the new endpoint; the service chain is left alone.
        assert_eq!(
            op_kinds(&nl, &chain_name("service-", &b)),
            [
                "del endpoints-tcp 1",
                "del hairpin 1",
                "add endpoints-tcp 1",
                "add hairpin 1"
            ]
        );
        assert!(nl.stale.is_empty());
        assert!(!p.script.contains("chain"), "{}", p.script);
        assert!(
            p.script
                .contains("delete element ip svcplane endpoints-tcp {\n\t10.96.0.2 . 80 . 1\n}\n"),
            "{}",
            p.script
        );
        assert_eq!(
            elements(&p.script, "ip", "endpoints-tcp"),
            ["10.96.0.2 . 80 . 1 : 10.244.1.9 . 8080"]
        );
    }

    #[test]
    fn an_endpoint_count_change_rewrites_the_service_chain_in_the_text_order() {
        let prev = base();
        let mut next = base();
        let b = cluster_ip_service(
            "b",
            "10.96.0.2",
            &["10.244.1.2", "10.244.1.3", "10.244.1.9"],
        );
        next.v4.services.insert(Arc::new(b.clone()));
        let p = partial(&prev, &next).unwrap();
        let chain = chain_name("service-", &b);
        assert!(
            p.script
                .contains(&format!("flush chain ip svcplane {chain}\n"))
        );
        assert_eq!(
            chain_body(&p.script, &chain).map(str::trim),
            Some("goto endpoints-tcp-mod-3")
        );
        // As the text: element deletes, flushes, chains with their rules, element adds.
        let nl = p.netlink.expect("a netlink form");
        assert_eq!(
            op_kinds(&nl, &chain),
            [
                "flush true",
                "chain true",
                "rule true 1",
                "add endpoints-tcp 1",
                "add hairpin 1"
            ]
        );
    }

    #[test]
    fn a_count_beyond_the_precreated_chains_creates_its_selection_chain() {
        let prev = base();
        let mut next = base();
        let eps: Vec<String> = (1..=17).map(|i| format!("10.244.3.{i}")).collect();
        let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
        let c = cluster_ip_service("c", "10.96.0.3", &eps);
        next.v4.services.insert(Arc::new(c));
        let p = partial(&prev, &next).unwrap();
        assert!(
            p.script.contains(
                "add chain ip svcplane endpoints-tcp-mod-17\nflush chain ip svcplane endpoints-tcp-mod-17\n"
            ),
            "{}",
            p.script
        );
        assert_eq!(
            chain_body(&p.script, "endpoints-tcp-mod-17").map(str::trim),
            Some("dnat ip to ip daddr . tcp dport . numgen random mod 17 map @endpoints-tcp")
        );
        assert_eq!(elements(&p.script, "ip", "endpoints-tcp").len(), 17);
        // Once the previous state has that count, it is not created again.
        let again = partial(&next, &{
            let mut n = next.clone();
            let eps: Vec<String> = (2..=18).map(|i| format!("10.244.3.{i}")).collect();
            let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
            let c = cluster_ip_service("c", "10.96.0.3", &eps);
            n.v4.services.insert(Arc::new(c));
            n
        })
        .unwrap();
        assert!(!again.script.contains("chain"), "{}", again.script);
    }

    /// Every service kind's change has a netlink form (affinity sets, external chains,
    /// source-range firewalls, anonymous sets of several networks).
    #[test]
    fn services_of_every_kind_have_a_netlink_form() {
        let prev = base();
        for change in 0..3 {
            let mut next = base();
            let mut b = cluster_ip_service("b", "10.96.0.2", &["10.244.1.2"]);
            match change {
                0 => b.affinity_timeout_seconds = Some(60),
                1 => {
                    b.node_port = Some(30002);
                    b.external_policy = ExternalPolicy::Local {
                        local_origin: target(&[0], EmptyVerdict::Reject),
                    };
                }
                _ => {
                    b.load_balancer_ips = vec![ip("203.0.113.2")];
                    b.load_balancer_source_ranges = vec![net("192.0.2.0/24")];
                }
            }
            next.v4.services.insert(Arc::new(b));
            let p = partial(&prev, &next).unwrap();
            assert!(!p.script.is_empty());
            assert!(p.netlink.is_some(), "change {change}");
        }
        // Masquerade from outside several cluster CIDRs needs an anonymous set.
        let mut prev = base();
        prev.v4.cluster_ip_masquerade =
            ClusterIpMasquerade::FromOutside(vec![net("10.244.0.0/16"), net("10.100.0.0/16")]);
        let mut next = prev.clone();
        let c = cluster_ip_service("c", "10.96.0.3", &["10.244.1.4"]);
        next.v4.services.insert(Arc::new(c));
        assert!(partial(&prev, &next).unwrap().netlink.is_some());
    }

    #[test]
    fn added_service_adds_chains_and_elements_only() {
        let prev = base();
        let mut next = base();
        let c = cluster_ip_service("c", "10.96.0.3", &["10.244.1.4"]);
        next.v4.services.insert(Arc::new(c.clone()));
        let p = partial(&prev, &next).unwrap();
        let svc_chain = chain_name("service-", &c);
        assert!(chain_body(&p.script, &svc_chain).is_some(), "{}", p.script);
        assert_eq!(
            elements(&p.script, "ip", "hairpin"),
            ["10.244.1.4 . 10.244.1.4"]
        );
        assert_eq!(
            elements(&p.script, "ip", "service-ips"),
            [format!("10.96.0.3 . tcp . 80 : goto {svc_chain}")]
        );
        assert_eq!(elements(&p.script, "ip", "cluster-ips"), ["10.96.0.3"]);
        assert!(!p.script.contains("delete"), "{}", p.script);
        assert!(!p.script.contains("flush"), "{}", p.script);
        // Nothing of the unchanged services.
        let a = &prev.v4.services.values().next().unwrap();
        assert!(!p.script.contains(&service_base(&a.name).unwrap()));
        assert!(p.stale.is_empty());
    }

    #[test]
    fn hairpin_address_stays_while_another_service_has_it() {
        let prev = base();
        let mut next = base();
        // Service a goes; its endpoint address is also an endpoint of a new service c.
        let a = prev.v4.services.values().next().unwrap().clone();
        next.v4.services.remove(&a.name);
        let c = cluster_ip_service("c", "10.96.0.3", &["10.244.1.1"]);
        next.v4.services.insert(Arc::new(c));
        let p = partial(&prev, &next).unwrap();
        assert!(
            !p.script.contains("delete element ip svcplane hairpin"),
            "{}",
            p.script
        );
        // Unchanged services are not rendered, but their addresses still count.
        let mut prev = base();
        let d = cluster_ip_service("d", "10.96.0.4", &["10.244.1.3"]);
        prev.v4.services.insert(Arc::new(d));
        let mut next = prev.clone();
        let b_fewer = cluster_ip_service("b", "10.96.0.2", &["10.244.1.2"]);
        next.v4.services.insert(Arc::new(b_fewer));
        let p = partial(&prev, &next).unwrap();
        assert!(
            !p.script.contains("delete element ip svcplane hairpin"),
            "{}",
            p.script
        );
    }

    #[test]
    fn removed_service_loses_elements_and_chains() {
        let prev = base();
        let mut next = base();
        let b = prev.v4.services.values().nth(1).unwrap().clone();
        next.v4.services.remove(&b.name);
        let p = partial(&prev, &next).unwrap();
        assert!(
            p.script
                .contains("delete element ip svcplane service-ips {\n\t10.96.0.2 . tcp . 80\n}\n"),
            "{}",
            p.script
        );
        assert!(
            p.script
                .contains("delete element ip svcplane cluster-ips {\n\t10.96.0.2\n}\n")
        );
        assert!(!p.script.contains("table ip svcplane {"));
        assert!(p.script.contains(
            "delete element ip svcplane hairpin {\n\t10.244.1.2 . 10.244.1.2,\n\t10.244.1.3 . 10.244.1.3\n}\n"
        ), "{}", p.script);
        {
            let chain = chain_name("service-", &b);
            assert!(
                p.script
                    .contains(&format!("flush chain ip svcplane {chain}\n"))
            );
            assert!(
                p.stale
                    .contains(&format!("delete chain ip svcplane {chain}\n"))
            );
        }
        // Element deletes come before anything else: they reference the chains.
        assert!(p.script.starts_with("delete element"));
    }

    #[test]
    fn shared_cluster_ip_stays_while_another_port_uses_it() {
        let prev = base();
        let mut next = base();
        let mut other_port = cluster_ip_service("b", "10.96.0.2", &["10.244.1.2"]);
        other_port.name = spn("default", "b", "https", Protocol::Tcp);
        other_port.port = 443;
        let b_http = prev.v4.services.values().nth(1).unwrap().name.clone();
        next.v4.services.remove(&b_http);
        next.v4.services.insert(Arc::new(other_port));
        let p = partial(&prev, &next).unwrap();
        assert!(
            !p.script.contains("delete element ip svcplane cluster-ips"),
            "{}",
            p.script
        );
        assert!(
            !p.script.contains("add element ip svcplane cluster-ips"),
            "{}",
            p.script
        );
    }

    #[test]
    fn no_endpoints_moves_the_key_between_maps() {
        let prev = base();
        let mut next = base();
        let a = cluster_ip_service("a", "10.96.0.1", &[]);
        next.v4.services.insert(Arc::new(a));
        let p = partial(&prev, &next).unwrap();
        assert_eq!(
            elements(&p.script, "ip", "no-endpoint-services"),
            ["10.96.0.1 . tcp . 80 : goto reject-chain"]
        );
        assert!(
            p.script
                .contains("delete element ip svcplane service-ips {\n\t10.96.0.1 . tcp . 80\n}\n")
        );
    }

    #[test]
    fn affinity_sets_of_gone_endpoints_are_deleted_after_their_chains() {
        let mut sticky = cluster_ip_service("s", "10.96.0.5", &["10.244.2.1", "10.244.2.2"]);
        sticky.affinity_timeout_seconds = Some(300);
        let prev = state(vec![sticky.clone()], vec![]);
        let mut fewer = cluster_ip_service("s", "10.96.0.5", &["10.244.2.1"]);
        fewer.affinity_timeout_seconds = Some(300);
        let next = state(vec![fewer.clone()], vec![]);
        let p = partial(&prev, &next).unwrap();
        let kept_set = affinity_set(&fewer, "10.244.2.1", 8080);
        let gone_set = affinity_set(&sticky, "10.244.2.2", 8080);
        let gone_chain = endpoint_chain(&sticky, "10.244.2.2", 8080);
        // The kept set is re-declared (a no-op that keeps its elements), never flushed.
        assert!(
            !p.script
                .contains(&format!("flush set ip svcplane {kept_set}"))
        );
        assert!(
            !p.script
                .contains(&format!("delete set ip svcplane {kept_set}"))
        );
        assert!(
            !p.script.contains(&format!("{gone_set} {{")),
            "{}",
            p.script
        );
        assert_eq!(
            p.stale,
            format!("delete chain ip svcplane {gone_chain}\ndelete set ip svcplane {gone_set}\n")
        );
    }

    #[test]
    fn global_changes_need_a_full_sync() {
        let prev = base();
        let mut next = base();
        next.v4.cluster_cidrs = vec![net("10.244.0.0/16")];
        assert_eq!(partial(&prev, &next), None);
        let mut next = base();
        next.v6.node_ips = vec![ip("fd00::1")];
        assert_eq!(partial(&prev, &next), None);
    }
}

/// eBPF mode's north-south table: nftables mode's rules for the same state, in table
/// `svcplane-ns`, without the output hook (local sockets are translated at connect).
#[test]
fn north_south_layout_has_the_same_rules_without_the_output_hook() {
    use super::render::{Layout, render_layout};
    let svc = cluster_ip_service("web", "10.96.0.10", &["10.244.1.5"]);
    let desired = state(vec![svc.clone()], vec![]);
    let full = render(&desired).unwrap();
    let ns = render_layout(&desired, Layout::NORTH_SOUTH).unwrap();
    assert!(ns.contains("add table ip svcplane-ns "), "{ns}");
    assert!(
        !ns.contains(" svcplane "),
        "nftables mode's table named: {ns}"
    );
    assert!(!ns.contains("hook output"), "{ns}");
    for chain in [
        "nat-prerouting",
        "filter-prerouting-pre-dnat",
        "filter-input",
    ] {
        assert!(chain_body(&ns, chain).is_some(), "{chain} missing: {ns}");
    }
    for chain in ["filter-forward", "nat-postrouting"] {
        assert!(chain_body(&ns, chain).is_some(), "{chain} missing: {ns}");
    }
    // Everything else is nftables mode's text with the other table name.
    let svc_chain = chain_name("service-", &svc);
    assert_eq!(chain_body(&ns, &svc_chain), chain_body(&full, &svc_chain));
    let renamed = ns.replace(" svcplane-ns ", " svcplane ");
    for map in ["service-ips", "cluster-ips", "hairpin"] {
        assert_eq!(
            elements(&full, "ip", map),
            elements(&renamed, "ip", map),
            "{map}"
        );
    }
}
