//! The IPVS plan and render, from hand-built desired states.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use svcplane_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
use svcplane_proxy::{
    ClusterIpMasquerade, DesiredState, EmptyVerdict, EndpointState, ExternalPolicy, FamilyState,
    NodePortAddresses, ServicePortState, TrafficTarget,
};

use super::filter::FilterState;
use super::genl::DestStatus;
use super::plan::{self, Current, Op, RealServer, VirtualServer, VsKey};
use super::{IpvsOptions, parse_scheduler, render};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn spn(name: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        service: NamespacedName::new("default", name),
        port: "p".into(),
        protocol,
    }
}

fn target(endpoints: &[usize], if_empty: EmptyVerdict) -> TrafficTarget {
    TrafficTarget {
        endpoints: endpoints.into(),
        if_empty,
    }
}

fn svc(name: &str, protocol: Protocol, cip: &str, port: u16, eps: &[&str]) -> ServicePortState {
    let all: Vec<usize> = (0..eps.len()).collect();
    ServicePortState {
        name: spn(name, protocol),
        protocol,
        port,
        cluster_ip: Some(ip(cip)),
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        affinity_timeout_seconds: None,
        ipvs_scheduler: None,
        endpoints: eps
            .iter()
            .map(|e| EndpointState::ready(ip(e), 8080, false))
            .collect(),
        internal: target(&all, EmptyVerdict::Reject),
        external: target(&all, EmptyVerdict::Reject),
        external_policy: ExternalPolicy::Cluster,
        health_check_node_port: None,
    }
}

fn state(v4: Vec<ServicePortState>, v6: Vec<ServicePortState>) -> DesiredState {
    let fam = |family, services: Vec<ServicePortState>| {
        let mut f = FamilyState::empty(family);
        f.services = services.into_iter().map(Arc::new).collect();
        f
    };
    DesiredState {
        node_name: "node-a".into(),
        node_zone: None,
        v4: fam(IpFamily::V4, v4),
        v6: fam(IpFamily::V6, v6),
        health_checks: BTreeMap::new(),
    }
}

fn key(addr: &str, protocol: Protocol, port: u16) -> VsKey {
    VsKey {
        addr: ip(addr),
        protocol,
        port,
    }
}

fn rs(addr: &str, weight: u32) -> RealServer {
    RealServer {
        addr: ip(addr),
        port: 8080,
        weight,
    }
}

fn current(w: &plan::Wanted, dests: &[(RealServer, u32, u32)]) -> Current {
    Current {
        vs: w.vs.clone(),
        dests: dests
            .iter()
            .map(|&(server, active, inactive)| DestStatus {
                server,
                active,
                inactive,
                foreign_forwarding: false,
            })
            .collect(),
    }
}

/// The kernel holding `wanted` as it is, without connections.
fn kernel_holding(wanted: &BTreeMap<VsKey, plan::Wanted>) -> BTreeMap<VsKey, Current> {
    wanted
        .iter()
        .map(|(k, w)| {
            let d: Vec<_> = w.reals.iter().map(|r| (*r, 0, 0)).collect();
            (*k, current(w, &d))
        })
        .collect()
}

#[test]
fn one_virtual_server_per_frontend_with_the_targets_endpoints() {
    let mut web = svc(
        "web",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        &["10.244.1.2", "10.244.2.3"],
    );
    web.node_port = Some(30080);
    web.external_ips = vec![ip("192.0.2.10")];
    web.load_balancer_ips = vec![ip("198.51.100.7")];
    // eTP Local: external traffic only to the first (local) endpoint.
    web.external = target(&[0], EmptyVerdict::Drop);
    web.external_policy = ExternalPolicy::Local {
        local_origin: target(&[0, 1], EmptyVerdict::Reject),
    };
    web.affinity_timeout_seconds = Some(10800);
    let mut dns6 = svc("dns", Protocol::Udp, "fd00::10", 53, &["fd00:244::5"]);
    dns6.node_port = Some(30053);
    let st = state(vec![web], vec![dns6]);
    let node = [ip("10.0.0.11"), ip("fd00::11")];
    let wanted = plan::virtual_servers(&st, "wrr", &node);
    let keys: Vec<VsKey> = wanted.keys().copied().collect();
    assert_eq!(
        keys,
        vec![
            key("10.0.0.11", Protocol::Tcp, 30080),
            key("10.96.0.10", Protocol::Tcp, 80),
            key("192.0.2.10", Protocol::Tcp, 80),
            key("198.51.100.7", Protocol::Tcp, 80),
            key("fd00::10", Protocol::Udp, 53),
            key("fd00::11", Protocol::Udp, 30053),
        ]
    );
    let cip = &wanted[&key("10.96.0.10", Protocol::Tcp, 80)];
    assert_eq!(cip.reals, vec![rs("10.244.1.2", 1), rs("10.244.2.3", 1)]);
    assert_eq!(cip.vs.scheduler, "wrr");
    assert_eq!(cip.vs.persistence, Some(10800));
    let np = &wanted[&key("10.0.0.11", Protocol::Tcp, 30080)];
    assert_eq!(np.reals, vec![rs("10.244.1.2", 1)]);
    assert_eq!(
        wanted[&key("198.51.100.7", Protocol::Tcp, 80)].reals.len(),
        1
    );
    assert_eq!(
        wanted[&key("fd00::11", Protocol::Udp, 30053)].reals.len(),
        1
    );
}

#[test]
fn nodeport_addresses_skip_loopback_link_local_vips_and_other_cidrs() {
    let mut f = FamilyState::empty(IpFamily::V4);
    let local = [
        ip("127.0.0.1"),
        ip("10.0.0.11"),
        ip("10.96.0.10"),
        ip("172.16.0.1"),
        ip("fe80::1"),
    ];
    let vips: BTreeSet<IpAddr> = [ip("10.96.0.10")].into();
    assert_eq!(
        plan::nodeport_addresses(&f, &local, &vips),
        vec![ip("10.0.0.11"), ip("172.16.0.1")]
    );
    f.nodeport_addresses = NodePortAddresses::Cidrs(vec![net("10.0.0.0/8")]);
    assert_eq!(
        plan::nodeport_addresses(&f, &local, &vips),
        vec![ip("10.0.0.11")]
    );
    let f6 = FamilyState::empty(IpFamily::V6);
    assert!(plan::nodeport_addresses(&f6, &local, &vips).is_empty());
}

#[test]
fn plan_adds_edits_and_deletes_only_differences() {
    let old = state(
        vec![
            svc(
                "a",
                Protocol::Tcp,
                "10.96.0.1",
                80,
                &["10.244.0.1", "10.244.0.2"],
            ),
            svc("gone", Protocol::Tcp, "10.96.0.9", 80, &["10.244.0.9"]),
        ],
        vec![],
    );
    let mut a = svc(
        "a",
        Protocol::Tcp,
        "10.96.0.1",
        80,
        &["10.244.0.2", "10.244.0.3"],
    );
    a.affinity_timeout_seconds = Some(60);
    let new = state(
        vec![a, svc("b", Protocol::Tcp, "10.96.0.2", 80, &["10.244.0.4"])],
        vec![],
    );
    let before = plan::virtual_servers(&old, "rr", &[]);
    let cur = kernel_holding(&before);
    let wanted = plan::virtual_servers(&new, "rr", &[]);
    let p = plan::plan(&wanted, &cur, &[], |_| true);
    let ka = key("10.96.0.1", Protocol::Tcp, 80);
    let kb = key("10.96.0.2", Protocol::Tcp, 80);
    assert_eq!(
        p.ops,
        vec![
            Op::DelService(key("10.96.0.9", Protocol::Tcp, 80)),
            Op::EditService(VirtualServer {
                key: ka,
                scheduler: "rr".into(),
                persistence: Some(60)
            }),
            Op::AddDest(ka, rs("10.244.0.3", 1)),
            // No connections: gone at once, TCP or not.
            Op::DelDest(ka, rs("10.244.0.1", 1)),
            Op::AddService(wanted[&kb].vs.clone()),
            Op::AddDest(kb, rs("10.244.0.4", 1)),
        ]
    );
    assert!(p.draining.is_empty());
    // Applied: nothing left to do.
    let applied = kernel_holding(&wanted);
    assert_eq!(
        plan::plan(&wanted, &applied, &[], |_| true),
        plan::Plan::default()
    );
    // Out of scope: untouched even when different.
    assert_eq!(
        plan::plan(&wanted, &cur, &[], |k| *k == kb).ops,
        vec![
            Op::AddService(wanted[&kb].vs.clone()),
            Op::AddDest(kb, rs("10.244.0.4", 1)),
        ]
    );
}

#[test]
fn excluded_cidrs_keep_unwanted_virtual_servers_but_not_wanted_ones_real_servers() {
    // Kernel: ours (10.96.0.1), a stale one of ours (10.96.0.9), and two someone else
    // made on a ClusterIP's address (10.96.0.1:9999) and in an excluded range.
    let wanted = plan::virtual_servers(
        &state(
            vec![
                svc("a", Protocol::Tcp, "10.96.0.1", 80, &["10.244.0.2"]),
                svc("x", Protocol::Tcp, "10.96.8.1", 80, &["10.244.0.5"]),
            ],
            vec![],
        ),
        "rr",
        &[],
    );
    let old = plan::virtual_servers(
        &state(
            vec![
                svc("a", Protocol::Tcp, "10.96.0.1", 80, &["10.244.0.1"]),
                svc("x", Protocol::Tcp, "10.96.8.1", 80, &["10.244.0.4"]),
                svc("gone", Protocol::Tcp, "10.96.0.9", 80, &["10.244.0.9"]),
                svc("frozen", Protocol::Tcp, "10.96.8.2", 80, &["10.244.0.9"]),
                svc("other", Protocol::Udp, "10.96.0.1", 9999, &[]),
                svc("vip", Protocol::Tcp, "10.96.8.1", 9999, &["192.0.2.1"]),
            ],
            vec![],
        ),
        "rr",
        &[],
    );
    let cur = kernel_holding(&old);
    let exclude = [net("10.96.8.0/24")];
    let p = plan::plan(&wanted, &cur, &exclude, |_| true);
    let x = key("10.96.8.1", Protocol::Tcp, 80);
    assert_eq!(
        p.ops,
        vec![
            Op::DelService(key("10.96.0.1", Protocol::Udp, 9999)),
            Op::DelService(key("10.96.0.9", Protocol::Tcp, 80)),
            Op::AddDest(key("10.96.0.1", Protocol::Tcp, 80), rs("10.244.0.2", 1)),
            Op::DelDest(key("10.96.0.1", Protocol::Tcp, 80), rs("10.244.0.1", 1)),
            // A wanted virtual server in an excluded range is svcplane's all the same.
            Op::AddDest(x, rs("10.244.0.5", 1)),
            Op::DelDest(x, rs("10.244.0.4", 1)),
        ]
    );
    // Without the exclusion both unwanted ones in 10.96.8.0/24 go too.
    let all = plan::plan(&wanted, &cur, &[], |_| true);
    for k in [
        key("10.96.8.1", Protocol::Tcp, 9999),
        key("10.96.8.2", Protocol::Tcp, 80),
    ] {
        assert!(all.ops.contains(&Op::DelService(k)), "{k:?}");
        assert!(
            !p.ops
                .iter()
                .any(|op| matches!(op, Op::DelService(d) if *d == k))
        );
    }
    assert!(plan::excluded(&exclude, &ip("10.96.8.200")));
    assert!(!plan::excluded(&exclude, &ip("10.96.9.1")));
    assert!(!plan::excluded(&[], &ip("10.96.8.1")));
}

#[test]
fn removed_tcp_real_servers_drain_udp_ones_go_at_once() {
    let tcp = state(
        vec![svc("t", Protocol::Tcp, "10.96.0.1", 80, &["10.244.0.2"])],
        vec![],
    );
    let wanted = plan::virtual_servers(&tcp, "rr", &[]);
    let k = key("10.96.0.1", Protocol::Tcp, 80);
    // 10.244.0.1 was removed but still has connections: weight 0, kept.
    let cur: BTreeMap<VsKey, Current> = [(
        k,
        current(
            &wanted[&k],
            &[(rs("10.244.0.1", 1), 2, 1), (rs("10.244.0.2", 1), 0, 0)],
        ),
    )]
    .into();
    let p = plan::plan(&wanted, &cur, &[], |_| true);
    assert_eq!(p.ops, vec![Op::EditDest(k, rs("10.244.0.1", 0))]);
    assert_eq!(p.draining, [k].into());
    // Next sync: still connections, already weight 0: nothing, still draining.
    let cur2: BTreeMap<VsKey, Current> = [(
        k,
        current(
            &wanted[&k],
            &[(rs("10.244.0.1", 0), 0, 1), (rs("10.244.0.2", 1), 0, 0)],
        ),
    )]
    .into();
    let p2 = plan::plan(&wanted, &cur2, &[], |_| true);
    assert!(p2.ops.is_empty());
    assert_eq!(p2.draining, [k].into());
    // Connections gone: deleted.
    let cur3: BTreeMap<VsKey, Current> = [(
        k,
        current(
            &wanted[&k],
            &[(rs("10.244.0.1", 0), 0, 0), (rs("10.244.0.2", 1), 0, 0)],
        ),
    )]
    .into();
    let p3 = plan::plan(&wanted, &cur3, &[], |_| true);
    assert_eq!(p3.ops, vec![Op::DelDest(k, rs("10.244.0.1", 0))]);
    assert!(p3.draining.is_empty());
    // Back before it drained: weight 1 again.
    let back = state(
        vec![svc(
            "t",
            Protocol::Tcp,
            "10.96.0.1",
            80,
            &["10.244.0.1", "10.244.0.2"],
        )],
        vec![],
    );
    let wanted_back = plan::virtual_servers(&back, "rr", &[]);
    let p4 = plan::plan(&wanted_back, &cur2, &[], |_| true);
    assert_eq!(p4.ops, vec![Op::EditDest(k, rs("10.244.0.1", 1))]);

    // UDP: at once, even with connections.
    let udp = state(vec![svc("u", Protocol::Udp, "10.96.0.5", 53, &[])], vec![]);
    let wu = plan::virtual_servers(&udp, "rr", &[]);
    let ku = key("10.96.0.5", Protocol::Udp, 53);
    let cu: BTreeMap<VsKey, Current> =
        [(ku, current(&wu[&ku], &[(rs("10.244.0.7", 1), 0, 5)]))].into();
    let pu = plan::plan(&wu, &cu, &[], |_| true);
    assert_eq!(pu.ops, vec![Op::DelDest(ku, rs("10.244.0.7", 1))]);
    assert!(pu.draining.is_empty());
}

#[test]
fn a_service_scheduler_overrides_the_flag() {
    let mut web = svc("web", Protocol::Tcp, "10.96.0.10", 80, &["10.244.1.2"]);
    web.ipvs_scheduler = Some("sh".into());
    web.node_port = Some(30080);
    let other = svc("other", Protocol::Tcp, "10.96.0.11", 80, &["10.244.1.3"]);
    let st = state(vec![web, other], vec![]);
    let wanted = plan::virtual_servers(&st, "lc", &[ip("10.0.0.11")]);
    let sched = |addr: &str, port| {
        wanted[&key(addr, Protocol::Tcp, port)]
            .vs
            .scheduler
            .as_str()
    };
    // Every frontend of the annotated Service, the flag's for the others.
    assert_eq!(sched("10.96.0.10", 80), "sh");
    assert_eq!(sched("10.0.0.11", 30080), "sh");
    assert_eq!(sched("10.96.0.11", 80), "lc");
    // A changed scheduler is an edit of the virtual server, not a re-creation.
    let k = key("10.96.0.11", Protocol::Tcp, 80);
    let mut cur_vs = wanted[&k].vs.clone();
    cur_vs.scheduler = "rr".into();
    let cur: BTreeMap<VsKey, Current> = [(
        k,
        Current {
            vs: cur_vs,
            dests: vec![],
        },
    )]
    .into();
    let p = plan::plan(&wanted, &cur, &[], |x| *x == k);
    assert!(
        p.ops.contains(&Op::EditService(wanted[&k].vs.clone())),
        "{:?}",
        p.ops
    );
    assert!(
        !p.ops.iter().any(|o| matches!(o, Op::DelService(_))),
        "{:?}",
        p.ops
    );
}

#[test]
fn render_lists_virtual_servers_as_ipvsadm_does() {
    let mut web = svc("web", Protocol::Tcp, "10.96.0.10", 80, &["10.244.1.2"]);
    web.affinity_timeout_seconds = Some(10800);
    web.node_port = Some(30080);
    let empty = svc("empty", Protocol::Udp, "10.96.0.20", 53, &[]);
    let v6 = svc("six", Protocol::Tcp, "fd00::10", 443, &["fd00:244::5"]);
    let mut st = state(vec![web, empty], vec![v6]);
    st.v4.node_ips = vec![ip("10.0.0.11")];
    st.v4.cluster_cidrs = vec![net("10.244.0.0/16")];
    st.v4.cluster_ip_masquerade = ClusterIpMasquerade::FromOutside(st.v4.cluster_cidrs.clone());
    let out = render(&st, &IpvsOptions::default()).unwrap();
    let listing = out.split("# addresses on").next().unwrap();
    assert_eq!(
        listing,
        "# IPVS virtual servers (ipvsadm -L -n)\n\
         Prot LocalAddress:Port Scheduler Flags\n\
         \x20 -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n\
         TCP  10.0.0.11:30080 rr persistent 10800\n\
         \x20 -> 10.244.1.2:8080              Masq    1      0          0         \n\
         TCP  10.96.0.10:80 rr persistent 10800\n\
         \x20 -> 10.244.1.2:8080              Masq    1      0          0         \n\
         UDP  10.96.0.20:53 rr\n\
         TCP  [fd00::10]:443 rr\n\
         \x20 -> [fd00:244::5]:8080           Masq    1      0          0         \n"
    );
    assert!(out.contains("# 10.96.0.10/32\n# 10.96.0.20/32\n# fd00::10/128\n"));
    assert!(out.contains("# net.ipv4.vs.conntrack = 1\n"));
    assert!(out.contains("add element ip svcplane-ipvs no-endpoints { 10.96.0.20 . udp . 53 }\n"));
    assert!(out.contains(
        "add element ip svcplane-ipvs cluster-ips { 10.96.0.10 . tcp . 80, 10.96.0.20 . udp . 53 }\n"
    ));
    assert!(out.contains("add element ip svcplane-ipvs cluster-cidrs { 10.244.0.0/16 }\n"));
    assert!(out.contains(
        "add rule ip svcplane-ipvs mark-for-masquerade ip saddr != @cluster-cidrs ip daddr . meta l4proto . th dport @cluster-ips meta mark set meta mark or 0x00004000\n"
    ));
    // NodePorts are not dummy addresses: not in service-ports.
    assert!(out.contains(
        "add element ip svcplane-ipvs service-ports { 10.96.0.10 . tcp . 80, 10.96.0.20 . udp . 53 }\n"
    ));
    assert!(
        out.contains("add element ip svcplane-ipvs external-masq { 10.0.0.11 . tcp . 30080 }\n")
    );
    assert!(out.contains("add element ip6 svcplane-ipvs hairpin { fd00:244::5 . fd00:244::5 }\n"));
    // Timeouts: said only when one is set.
    assert!(!out.contains("# timeouts"));
    let timed = IpvsOptions {
        timeouts: super::Timeouts {
            tcp: 3600,
            tcp_fin: 0,
            udp: 45,
        },
        ..IpvsOptions::default()
    };
    let out = render(&st, &timed).unwrap();
    assert!(
        out.contains(
            "# timeouts (ipvsadm --set; 0: the kernel's stays): tcp 3600 tcpfin 0 udp 45\n"
        ),
        "{out}"
    );
}

#[test]
fn filter_verdicts_and_source_ranges() {
    let mut lb = svc("lb", Protocol::Tcp, "10.96.0.30", 80, &["10.244.1.2"]);
    lb.load_balancer_ips = vec![ip("198.51.100.7")];
    lb.load_balancer_source_ranges = vec![net("203.0.113.0/24")];
    lb.node_port = Some(30000);
    lb.external = target(&[], EmptyVerdict::Drop);
    lb.external_policy = ExternalPolicy::Local {
        local_origin: target(&[0], EmptyVerdict::Reject),
    };
    let st = state(vec![lb], vec![]);
    let node = [ip("10.0.0.11")];
    let wanted = plan::virtual_servers(&st, "rr", &node);
    let vips = plan::service_addresses(&st);
    let f = FilterState::build(&st.v4, wanted.values(), &vips).unwrap();
    assert_eq!(
        f.sets["no-local-endpoints"],
        ["10.0.0.11 . tcp . 30000", "198.51.100.7 . tcp . 80"]
            .map(String::from)
            .into()
    );
    assert!(f.sets["no-endpoints"].is_empty());
    // eTP Local: no masquerade of external frontends, except the node's own traffic.
    assert!(f.sets["external-masq"].is_empty());
    assert_eq!(f.sets["external-local"], f.sets["no-local-endpoints"]);
    // No local endpoint: the cluster-wide ones serve the node and its pods (kube-proxy's
    // IPVS mode, kubernetes#97081); the filter drops everyone else.
    for addr in ["198.51.100.7", "10.0.0.11"] {
        let port = if addr == "10.0.0.11" { 30000 } else { 80 };
        let key = VsKey {
            addr: ip(addr),
            protocol: Protocol::Tcp,
            port,
        };
        let reals: Vec<IpAddr> = wanted[&key].reals.iter().map(|r| r.addr).collect();
        assert_eq!(reals, [ip("10.244.1.2")], "{addr}");
    }
    assert_eq!(f.firewall.len(), 1);
    let text = f.render(IpFamily::V4);
    let chain = f.firewall.values().next().unwrap();
    assert!(chain.starts_with("firewall-"));
    assert!(text.contains(&format!(
        "add rule ip svcplane-ipvs {chain} ip saddr {{ 203.0.113.0/24 }} return\nadd rule ip svcplane-ipvs {chain} drop\n"
    )));
    assert!(text.contains(&format!(
        "add element ip svcplane-ipvs firewall {{ 198.51.100.7 . tcp . 80 : jump {chain} }}"
    )));
    assert!(text.contains(
        "add rule ip svcplane-ipvs input fib saddr type != local ip saddr != @cluster-cidrs ip daddr . meta l4proto . th dport @no-local-endpoints drop\n"
    ));
    assert!(text.contains(
        "add rule ip svcplane-ipvs output ip daddr . meta l4proto . th dport @external-local meta mark set meta mark or 0x00004000\n"
    ));
}

#[test]
fn schedulers_are_checked() {
    assert_eq!(parse_scheduler("").unwrap(), "rr");
    for s in ["rr", "wrr", "lc", "sh", "mh"] {
        assert_eq!(parse_scheduler(s).unwrap(), s);
    }
    let e = parse_scheduler("fancy").unwrap_err();
    assert!(
        e.contains("\"fancy\"") && e.contains("rr, wrr, lc, sh, mh"),
        "{e}"
    );
}

/// A partial sync's pure part (claims, virtual servers and filter elements of the
/// changed services only) taken step by step lands exactly where a full computation of
/// each state lands, and its element changes are exactly the difference.
#[test]
fn partial_updates_equal_full_computations() {
    let node = [ip("10.0.0.11"), ip("fd00::11")];
    let with = |mut s: ServicePortState, f: &dyn Fn(&mut ServicePortState)| {
        f(&mut s);
        s
    };
    let a = svc(
        "a",
        Protocol::Tcp,
        "10.96.0.1",
        80,
        &["10.244.0.1", "10.244.0.2"],
    );
    // Another port of a's ClusterIP, sharing endpoint 10.244.0.2 (hairpin counted twice).
    let a2 = with(
        svc("a2", Protocol::Udp, "10.96.0.1", 53, &["10.244.0.2"]),
        &|s| s.node_port = Some(30053),
    );
    let local = with(svc("l", Protocol::Tcp, "10.96.0.3", 443, &[]), &|s| {
        s.node_port = Some(30443);
        s.external_ips = vec![ip("192.0.2.9")];
        s.external = target(&[], EmptyVerdict::Drop);
        s.external_policy = ExternalPolicy::Local {
            local_origin: target(&[], EmptyVerdict::Reject),
        };
    });
    let v6 = svc("six", Protocol::Tcp, "fd00:96::6", 80, &["fd00:244::6"]);
    let steps: Vec<DesiredState> = vec![
        state(vec![a.clone(), a2.clone()], vec![]),
        // One endpoint changes.
        state(
            vec![
                svc(
                    "a",
                    Protocol::Tcp,
                    "10.96.0.1",
                    80,
                    &["10.244.0.1", "10.244.0.3"],
                ),
                a2.clone(),
            ],
            vec![],
        ),
        // a2 loses its endpoint, eTP Local and IPv6 services arrive.
        state(
            vec![
                svc(
                    "a",
                    Protocol::Tcp,
                    "10.96.0.1",
                    80,
                    &["10.244.0.1", "10.244.0.3"],
                ),
                with(a2.clone(), &|s| s.endpoints.clear()),
                local.clone(),
            ],
            vec![v6.clone()],
        ),
        // a goes (its ClusterIP stays for a2), l gets an endpoint, six changes.
        state(
            vec![
                with(a2.clone(), &|s| s.endpoints.clear()),
                with(local.clone(), &|s| {
                    s.endpoints = vec![EndpointState::ready(ip("10.244.0.9"), 8080, true)];
                    s.internal = target(&[0], EmptyVerdict::Reject);
                    s.external = target(&[0], EmptyVerdict::Drop);
                }),
            ],
            vec![svc(
                "six",
                Protocol::Tcp,
                "fd00:96::6",
                80,
                &["fd00:244::7"],
            )],
        ),
        // Everything goes.
        state(vec![], vec![]),
    ];
    let full = |s: &DesiredState| {
        let (wanted, contested) = plan::virtual_servers_contested(s, "rr", &node);
        let vips = plan::service_addresses(s);
        let filters =
            [&s.v4, &s.v6].map(|f| FilterState::build(f, wanted.values(), &vips).unwrap());
        (wanted, contested, filters)
    };
    let (mut applied, contested, mut filters) = full(&steps[0]);
    let mut claims = plan::address_claims(&steps[0]);
    for (n, pair) in steps.windows(2).enumerate() {
        let (prev, next) = (&pair[0], &pair[1]);
        let mut changed: BTreeSet<&ServicePortName> = BTreeSet::new();
        for (o, f) in prev.families().into_iter().zip(next.families()) {
            for (name, s) in &o.services {
                if f.services.get(name).is_none_or(|t| t != s) {
                    changed.insert(name);
                }
            }
            changed.extend(f.services.keys().filter(|k| !o.services.contains_key(k)));
        }
        let before_vips = plan::service_addresses(prev);
        let (came_ips, gone_ips) = plan::update_address_claims(&mut claims, prev, next, &changed);
        assert_eq!(claims, plan::address_claims(next), "step {n}");
        let after_vips = plan::service_addresses(next);
        let diff = |a: &BTreeSet<IpAddr>, b: &BTreeSet<IpAddr>| -> Vec<IpAddr> {
            a.difference(b).copied().collect()
        };
        assert_eq!(came_ips, diff(&after_vips, &before_vips), "step {n}");
        assert_eq!(gone_ips, diff(&before_vips, &after_vips), "step {n}");

        let change =
            plan::changed_virtual_servers(prev, next, &changed, &applied, &contested, "rr", &node)
                .expect("no contested keys here");
        let (want_applied, _, want_filters) = full(next);
        for i in 0..2 {
            let v4 = i == 0;
            let (old, new) = (prev.families()[i], next.families()[i]);
            let (removed, added) = change.served(i, &applied, old, new);
            let fam_ips = |v: &[IpAddr]| -> Vec<IpAddr> {
                v.iter().copied().filter(|a| a.is_ipv4() == v4).collect()
            };
            let before = filters[i].clone();
            let changes = filters[i]
                .update(&removed, &added, &fam_ips(&gone_ips), &fam_ips(&came_ips))
                .expect("elements only");
            assert_eq!(filters[i], want_filters[i], "step {n} family {i}");
            // The changes are exactly the difference of the two states' sets.
            let mut expected = Vec::new();
            for (set, elems) in &want_filters[i].sets {
                let old_elems = before.sets.get(set).cloned().unwrap_or_default();
                for e in old_elems.difference(elems) {
                    expected.push((true, *set, e.clone()));
                }
                for e in elems.difference(&old_elems) {
                    expected.push((false, *set, e.clone()));
                }
            }
            let mut got: Vec<_> = changes
                .iter()
                .map(|c| (c.delete, c.set, c.text.clone()))
                .collect();
            got.sort();
            expected.sort();
            assert_eq!(got, expected, "step {n} family {i}");
        }
        change.apply_to(&mut applied);
        assert_eq!(applied, want_applied, "step {n}");
    }
}

#[test]
fn a_contested_key_makes_the_partial_computation_give_up() {
    // Two services on one ClusterIP:port: the first by name keeps it.
    let a = svc("a", Protocol::Tcp, "10.96.0.1", 80, &["10.244.0.1"]);
    let b = svc("b", Protocol::Tcp, "10.96.0.1", 80, &["10.244.0.2"]);
    let s0 = state(vec![a.clone(), b.clone()], vec![]);
    let (applied, contested) = plan::virtual_servers_contested(&s0, "rr", &[]);
    assert_eq!(contested, [key("10.96.0.1", Protocol::Tcp, 80)].into());
    let s1 = state(vec![b], vec![]);
    let changed: BTreeSet<&ServicePortName> = [&a.name].into();
    assert!(
        plan::changed_virtual_servers(&s0, &s1, &changed, &applied, &contested, "rr", &[])
            .is_none()
    );
    // A new service on a key an unchanged one holds: likewise.
    let c = svc("c", Protocol::Tcp, "10.96.0.1", 80, &[]);
    let s2 = state(vec![a.clone(), c.clone()], vec![]);
    let (applied, contested) = plan::virtual_servers_contested(&state(vec![a], vec![]), "rr", &[]);
    let changed: BTreeSet<&ServicePortName> = [&c.name].into();
    let prev = state(
        vec![svc("a", Protocol::Tcp, "10.96.0.1", 80, &["10.244.0.1"])],
        vec![],
    );
    assert!(
        plan::changed_virtual_servers(&prev, &s2, &changed, &applied, &contested, "rr", &[])
            .is_none()
    );
}
