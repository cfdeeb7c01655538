//! The rendered rules for hand-built states: the backend must spell what the engine
//! decided, in kube-proxy's iptables shapes.

use std::net::IpAddr;
use std::sync::Arc;

use svcplane_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
use svcplane_proxy::{
    ClusterIpMasquerade, DesiredState, EmptyVerdict, EndpointState, ExternalPolicy, FamilyState,
    NodePortAddresses, ServicePortState, TrafficTarget,
};

use super::dispatch::Dispatch;
use super::names::{self, CHAIN_LENGTH_MAX};
use super::render::{self, Chain, FamilyRules, JUMPS, Options, Select, probability};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn target(endpoints: &[usize], if_empty: EmptyVerdict) -> TrafficTarget {
    TrafficTarget {
        endpoints: endpoints.into(),
        if_empty,
    }
}

fn service(ns: &str, name: &str, port: &str, cip: &str, eps: &[&str]) -> ServicePortState {
    let all: Vec<usize> = (0..eps.len()).collect();
    ServicePortState {
        name: ServicePortName {
            service: NamespacedName::new(ns, name),
            port: port.into(),
            protocol: Protocol::Tcp,
        },
        protocol: Protocol::Tcp,
        port: 80,
        cluster_ip: Some(ip(cip)),
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        affinity_timeout_seconds: None,
        ipvs_scheduler: None,
        endpoints: eps
            .iter()
            .map(|e| EndpointState::ready(ip(e), 80, false))
            .collect(),
        internal: target(&all, EmptyVerdict::Reject),
        external: target(&all, EmptyVerdict::Reject),
        external_policy: ExternalPolicy::Cluster,
        health_check_node_port: None,
    }
}

fn family(f: IpFamily, services: Vec<ServicePortState>) -> FamilyState {
    let mut fam = FamilyState::empty(f);
    if f == IpFamily::V4 {
        fam.cluster_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        fam.cluster_ip_masquerade = ClusterIpMasquerade::FromOutside(fam.cluster_cidrs.clone());
    }
    fam.services = services.into_iter().map(Arc::new).collect();
    fam
}

fn linear() -> Options {
    Options {
        dispatch: Dispatch::Linear,
        random_fully: true,
    }
}

fn rules(fam: &FamilyState, opts: Options) -> FamilyRules {
    render::render_family(fam, opts, Select::All)
}

fn chain<'a>(chains: impl IntoIterator<Item = &'a Chain>, name: &str) -> &'a Chain {
    chains
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no chain {name}"))
}

#[test]
fn probabilities_are_kube_proxys_sequence() {
    assert_eq!(probability(3), "0.3333333333");
    assert_eq!(probability(2), "0.5000000000");
    assert_eq!(probability(7), "0.1428571429");
    let svc = service(
        "ns2",
        "svc2",
        "p80",
        "172.30.0.42",
        &["10.180.0.1", "10.180.0.2", "10.180.0.3"],
    );
    let r = rules(&family(IpFamily::V4, vec![svc]), linear());
    let svc_chain = r.nat().find(|c| c.name.starts_with(names::SVC)).unwrap();
    let probs: Vec<Option<&str>> = svc_chain
        .rules
        .lines()
        .filter(|l| l.contains(" -> "))
        .map(|l| {
            l.split("--probability ")
                .nth(1)
                .map(|p| p.split(' ').next().unwrap())
        })
        .collect();
    assert_eq!(probs, [Some("0.3333333333"), Some("0.5000000000"), None]);
}

#[test]
fn cluster_ip_service_has_kube_proxys_shape() {
    let mut svc = service("ns1", "svc1", "p80", "172.30.0.41", &["10.180.0.1"]);
    svc.endpoints[0].is_local = true;
    let r = rules(&family(IpFamily::V4, vec![svc]), linear());
    let want_services = "\
-A SVCP-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j SVCP-SVC-XPGD46QRK7WJZT7O
-A SVCP-SERVICES -m comment --comment \"svcplane service nodeports; NOTE: this must be the last rule in this chain\" ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j SVCP-NODEPORTS
";
    assert_eq!(chain(r.nat(), "SVCP-SERVICES").rules, want_services);
    let want_svc = "\
-A SVCP-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j SVCP-MARK-MASQ
-A SVCP-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
";
    assert_eq!(chain(r.nat(), "SVCP-SVC-XPGD46QRK7WJZT7O").rules, want_svc);
    // No per-endpoint chain without affinity: hairpin is caught after DNAT.
    assert!(!r.nat().any(|c| c.name.starts_with(names::SEP)));
    assert_eq!(
        chain(r.nat(), "SVCP-HAIRPIN").rules,
        "-A SVCP-HAIRPIN -s 10.180.0.1 -d 10.180.0.1 -j SVCP-MARK-MASQ\n"
    );
    let post = &chain(r.nat(), "SVCP-POSTROUTING").rules;
    assert!(post.starts_with("-A SVCP-POSTROUTING -m conntrack --ctstate DNAT -j SVCP-HAIRPIN\n"));
    assert!(
        post.contains("-m mark ! --mark 0x4000/0x4000 -j RETURN\n"),
        "{post}"
    );
    assert!(post.ends_with("-j MASQUERADE --random-fully\n"), "{post}");
    // No endpoints → filter REJECT on the ClusterIP, no nat rule.
    let empty = service("ns3", "svc3", "p80", "172.30.0.43", &[]);
    let r = rules(&family(IpFamily::V4, vec![empty]), linear());
    assert_eq!(
        chain(&r.filter, "SVCP-SERVICES").rules,
        "-A SVCP-SERVICES -m comment --comment \"ns3/svc3:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j REJECT\n\
         -A SVCP-SERVICES -m comment --comment \"Reject traffic to invalid ports of ClusterIPs\" -d 172.30.0.43 -j REJECT\n"
    );
    assert_eq!(chain(r.nat(), "SVCP-SERVICES").count, 1);
}

#[test]
fn affinity_uses_recent_with_the_timeout() {
    let mut svc = service(
        "ns1",
        "svc1",
        "p80",
        "172.30.0.41",
        &["10.180.0.1", "10.180.0.2"],
    );
    svc.affinity_timeout_seconds = Some(10800);
    let r = rules(&family(IpFamily::V4, vec![svc]), linear());
    let c = r.nat().find(|c| c.name.starts_with(names::SVC)).unwrap();
    let sep = names::endpoint_chain(
        &ServicePortName {
            service: NamespacedName::new("ns1", "svc1"),
            port: "p80".into(),
            protocol: Protocol::Tcp,
        },
        ip("10.180.0.1"),
        80,
    );
    assert!(c.rules.contains(&format!(
        "-m recent --name {sep} --rcheck --seconds 10800 --reap -j {sep}\n"
    )));
    // kube-proxy's endpoint chain: hairpin mark, then record the client and DNAT.
    assert_eq!(
        chain(r.nat(), &sep).rules,
        format!(
            "-A {sep} -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j SVCP-MARK-MASQ
-A {sep} -m comment --comment ns1/svc1:p80 -m recent --name {sep} --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
"
        )
    );
    assert_eq!(sep, "SVCP-SEP-SXIVWICOYRO3J4NJ");
    assert!(chain(r.nat(), "SVCP-HAIRPIN").rules.is_empty());
}

#[test]
fn etp_local_short_circuits_pod_and_node_traffic() {
    let mut svc = service(
        "ns2",
        "svc2",
        "p80",
        "172.30.0.42",
        &["10.180.0.1", "10.180.0.2"],
    );
    svc.endpoints[1].is_local = true;
    svc.external_ips = vec![ip("192.168.99.22")];
    svc.node_port = Some(30001);
    svc.external = target(&[1], EmptyVerdict::Drop);
    svc.external_policy = ExternalPolicy::Local {
        local_origin: target(&[0, 1], EmptyVerdict::Reject),
    };
    let r = rules(&family(IpFamily::V4, vec![svc.clone()]), linear());
    let hash = names::service_hash(&svc.name);
    let ext = chain(r.nat(), &format!("SVCP-EXT-{hash}"));
    let want = format!(
        "-A SVCP-EXT-{hash} -m comment --comment \"pod traffic for ns2/svc2:p80 external destinations\" -s 10.0.0.0/8 -j SVCP-SVC-{hash}
-A SVCP-EXT-{hash} -m comment --comment \"masquerade LOCAL traffic for ns2/svc2:p80 external destinations\" -m addrtype --src-type LOCAL -j SVCP-MARK-MASQ
-A SVCP-EXT-{hash} -m comment --comment \"route LOCAL traffic for ns2/svc2:p80 external destinations\" -m addrtype --src-type LOCAL -j SVCP-SVC-{hash}
-A SVCP-EXT-{hash} -j SVCP-SVX-{hash}
"
    );
    assert_eq!(ext.rules, want);
    assert!(
        chain(r.nat(), "SVCP-NODEPORTS")
            .rules
            .contains(&format!("--dport 30001 -j SVCP-EXT-{hash}"))
    );
    assert!(chain(&r.filter, "SVCP-EXTERNAL-SERVICES").rules.is_empty());

    // No local endpoint: external traffic the short-circuits did not take is dropped in
    // filter INPUT/FORWARD only; node-originated traffic (filter OUTPUT) still reaches
    // the cluster-wide endpoints through nat OUTPUT.
    svc.external = target(&[], EmptyVerdict::Drop);
    let r = rules(&family(IpFamily::V4, vec![svc]), linear());
    let ext = chain(r.nat(), &format!("SVCP-EXT-{hash}"));
    assert!(ext.rules.contains("route LOCAL traffic") && !ext.rules.contains("SVCP-SVX-"));
    let drops = &chain(&r.filter, "SVCP-EXTERNAL-SERVICES").rules;
    assert!(
        drops.contains("-d 192.168.99.22 --dport 80 -j DROP"),
        "{drops}"
    );
    assert!(
        drops.contains("-m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30001 -j DROP"),
        "{drops}"
    );
    let external_from: Vec<&str> = JUMPS
        .iter()
        .filter(|j| j.target == names::EXTERNAL_SERVICES)
        .map(|j| j.builtin)
        .collect();
    assert_eq!(external_from, ["INPUT", "FORWARD"]);
}

#[test]
fn source_ranges_go_through_a_firewall_chain() {
    let mut svc = service("ns5", "svc5", "p80", "172.30.0.45", &["10.180.0.3"]);
    svc.load_balancer_ips = vec![ip("5.6.7.8")];
    svc.load_balancer_source_ranges = vec!["203.0.113.0/25".parse().unwrap()];
    let r = rules(&family(IpFamily::V4, vec![svc.clone()]), linear());
    let hash = names::service_hash(&svc.name);
    assert!(chain(r.nat(), "SVCP-SERVICES").rules.contains(&format!(
        "\"ns5/svc5:p80 loadbalancer IP\" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j SVCP-FW-{hash}"
    )));
    let fw = &chain(r.nat(), &format!("SVCP-FW-{hash}")).rules;
    assert!(
        fw.contains(&format!("-s 203.0.113.0/25 -j SVCP-EXT-{hash}")),
        "{fw}"
    );
    assert!(chain(&r.filter, "SVCP-PROXY-FIREWALL").rules.contains(&format!(
        "\"ns5/svc5:p80 traffic not accepted by SVCP-FW-{hash}\" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP"
    )));
}

fn many(n: u32) -> Vec<ServicePortState> {
    (0..n)
        .map(|i| {
            let mut s = service(
                "ns",
                &format!("svc{i}"),
                "http",
                &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                &[&format!("10.244.{}.{}", i / 250, i % 250 + 1)],
            );
            s.node_port = Some(30000 + (i % 2000) as u16);
            s
        })
        .collect()
}

#[test]
fn linear_dispatch_is_kube_proxys_flat_list_and_tree_is_short() {
    let fam = family(IpFamily::V4, many(1000));
    let flat = rules(&fam, linear());
    // One rule per ClusterIP, then the NodePort jump.
    assert_eq!(chain(flat.nat(), "SVCP-SERVICES").count, 1001);
    assert_eq!(chain(flat.nat(), "SVCP-NODEPORTS").count, 1000);
    assert!(!flat.nat().any(|c| c.name.starts_with(names::DISPATCH_ADDR)));
    let tree = rules(&fam, Options::default());
    assert!(chain(tree.nat(), "SVCP-SERVICES").count <= 17);
    assert!(chain(tree.nat(), "SVCP-NODEPORTS").count <= 16);
    // Same leaf rules either way.
    let leaves = |r: &FamilyRules| {
        let mut v: Vec<String> = r
            .nat()
            .flat_map(|c| c.rules.lines())
            .filter(|l| l.contains("cluster IP\" -m tcp -p tcp -d") && !l.contains("MARK-MASQ"))
            .map(|l| l.split_once(" -m comment").unwrap().1.to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(leaves(&flat), leaves(&tree));
    for c in tree.nat().chain(&tree.filter) {
        assert!(c.name.len() <= CHAIN_LENGTH_MAX, "{}", c.name);
    }
}

#[test]
fn render_is_restore_input_for_both_families() {
    let v6 = {
        let mut s = service("ns", "v6", "http", "fd00:96::1", &["fd00:244::5"]);
        s.node_port = Some(30080);
        s
    };
    let state = DesiredState {
        node_name: "node-a".into(),
        node_zone: None,
        v4: family(IpFamily::V4, many(3)),
        v6: family(IpFamily::V6, vec![v6]),
        health_checks: Default::default(),
    };
    let text = render::render(&state, Options::default());
    assert_eq!(text.matches("*nat\n").count(), 2);
    assert_eq!(text.matches("*filter\n").count(), 2);
    assert_eq!(text.matches("COMMIT\n").count(), 4);
    assert!(text.contains("--to-destination [fd00:244::5]:80"));
    assert!(text.contains("! -d ::1/128 -m addrtype --dst-type LOCAL -j SVCP-NODEPORTS"));
    assert!(text.contains(
        "-I PREROUTING -m comment --comment \"svcplane service portals\" -j SVCP-SERVICES"
    ));
    // Deterministic.
    assert_eq!(text, render::render(&state, Options::default()));
    // --nodeport-addresses CIDRs replace the LOCAL-except-loopback match.
    let mut state = state;
    state.v4.nodeport_addresses = NodePortAddresses::Cidrs(vec!["192.168.0.0/16".parse().unwrap()]);
    let text = render::render(&state, Options::default());
    assert!(text.contains("-d 192.168.0.0/16 -m addrtype --dst-type LOCAL -j SVCP-NODEPORTS"));
}
