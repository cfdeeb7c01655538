//! The renderer's whole output for one rich fixture (every service kind of tests.rs, both
//! families, both layouts, and partial syncs between variants), compared with a checked-in
//! file. A refactor must leave it byte-identical; a deliberate change of the rules shows
//! up as a reviewable diff of `testdata/render.golden`. Regenerate with
//! `SVCPLANE_BLESS=1 cargo test -p svcplane-dataplane golden`.

use std::fmt::Write as _;
use std::sync::Arc;

use svcplane_model::{IpFamily, Protocol};
use svcplane_proxy::{
    ClusterIpMasquerade, DesiredState, Diff, EmptyVerdict, ExternalPolicy, NodePortAddresses,
    ServicePortState,
};

use super::render::{Layout, render_layout, render_partial};
use super::tests::{cluster_ip_service, ip, net, state, target};

const GOLDEN: &str = "src/nftables/testdata/render.golden";

fn udp(mut s: ServicePortState, port: u16, ep_port: u16) -> ServicePortState {
    s.name.port = "dns".into();
    s.name.protocol = Protocol::Udp;
    s.protocol = Protocol::Udp;
    s.port = port;
    for ep in &mut s.endpoints {
        ep.port = ep_port;
    }
    s
}

fn v4_services(variant: u8) -> Vec<ServicePortState> {
    let mut out = Vec::new();
    // Plain ClusterIPs: 1, 3 endpoints; the variant swaps one endpoint (1, 3) or adds
    // one (2). Variant 3 is variant 0 with that swap alone.
    out.push(cluster_ip_service("one", "10.96.0.1", &["10.244.1.1"]));
    let eps: &[&str] = match variant {
        0 => &["10.244.1.2", "10.244.1.3", "10.244.2.4"],
        1 | 3 => &["10.244.1.2", "10.244.1.9", "10.244.2.4"],
        _ => &["10.244.1.2", "10.244.1.3", "10.244.2.4", "10.244.2.5"],
    };
    out.push(cluster_ip_service("three", "10.96.0.3", eps));
    // Two ports of one Service on one ClusterIP.
    let mut other_port = cluster_ip_service("three", "10.96.0.3", eps);
    other_port.name.port = "https".into();
    other_port.port = 443;
    out.push(other_port);
    // UDP and SCTP.
    out.push(udp(
        cluster_ip_service("dns", "10.96.0.10", &["10.244.1.20", "10.244.2.20"]),
        53,
        5353,
    ));
    let mut sctp = cluster_ip_service("sctp", "10.96.0.11", &["10.244.1.21"]);
    sctp.name.protocol = Protocol::Sctp;
    sctp.protocol = Protocol::Sctp;
    out.push(sctp);
    // No endpoints: reject internal; drop.
    let mut empty = cluster_ip_service("empty", "10.96.0.20", &[]);
    empty.node_port = Some(30020);
    out.push(empty);
    let mut dropped = cluster_ip_service("dropped", "10.96.0.21", &[]);
    dropped.internal = target(&[], EmptyVerdict::Drop);
    out.push(dropped);
    // NodePort, eTP Cluster.
    let mut np = cluster_ip_service("np", "10.96.0.30", &["10.244.1.9", "10.244.2.9"]);
    np.node_port = Some(30080);
    out.push(np);
    // LoadBalancer with source ranges and an externalIP.
    let mut lb = cluster_ip_service("lb", "10.96.0.40", &["10.244.1.10"]);
    lb.node_port = Some(30040);
    lb.load_balancer_ips = vec![ip("203.0.113.7")];
    lb.external_ips = vec![ip("198.51.100.3")];
    lb.load_balancer_source_ranges = vec![
        net("192.0.2.0/24"),
        net("198.51.100.0/24"),
        net("2001:db8::/32"),
    ];
    out.push(lb);
    // One source range.
    let mut lb1 = cluster_ip_service("lb1", "10.96.0.41", &["10.244.1.11"]);
    lb1.load_balancer_ips = vec![ip("203.0.113.8")];
    lb1.load_balancer_source_ranges = vec![net("192.0.2.0/24")];
    out.push(lb1);
    // ClientIP affinity; the variant changes its endpoints too.
    let sticky_eps: &[&str] = match variant {
        0 | 3 => &["10.244.1.30", "10.244.2.30"],
        _ => &["10.244.1.30", "10.244.2.31"],
    };
    let mut sticky = cluster_ip_service("sticky", "10.96.0.50", sticky_eps);
    sticky.affinity_timeout_seconds = Some(10800);
    sticky.node_port = Some(30050);
    out.push(sticky);
    // eTP Local: a local endpoint, none, and iTP Local too.
    let mut etp = cluster_ip_service("etp", "10.96.0.60", &["10.244.1.40", "10.244.2.40"]);
    etp.node_port = Some(30060);
    etp.load_balancer_ips = vec![ip("203.0.113.60")];
    etp.external = target(&[0], EmptyVerdict::Drop);
    etp.external_policy = ExternalPolicy::Local {
        local_origin: target(&[0, 1], EmptyVerdict::Reject),
    };
    let mut none_local = etp.clone();
    none_local.name = super::tests::spn("default", "etp-none", "http", Protocol::Tcp);
    none_local.cluster_ip = Some(ip("10.96.0.61"));
    none_local.node_port = Some(30061);
    none_local.load_balancer_ips = vec![ip("203.0.113.61")];
    none_local.external = target(&[], EmptyVerdict::Drop);
    let mut both_local = etp.clone();
    both_local.name = super::tests::spn("default", "etp-both", "http", Protocol::Tcp);
    both_local.cluster_ip = Some(ip("10.96.0.62"));
    both_local.node_port = Some(30062);
    both_local.load_balancer_ips = vec![];
    both_local.internal = target(&[0], EmptyVerdict::Drop);
    let mut origin_empty = etp.clone();
    origin_empty.name = super::tests::spn("default", "etp-origin", "http", Protocol::Tcp);
    origin_empty.cluster_ip = Some(ip("10.96.0.63"));
    origin_empty.node_port = Some(30063);
    origin_empty.load_balancer_ips = vec![];
    origin_empty.external = target(&[], EmptyVerdict::Drop);
    origin_empty.external_policy = ExternalPolicy::Local {
        local_origin: target(&[], EmptyVerdict::Reject),
    };
    out.extend([etp, none_local, both_local, origin_empty]);
    // A service only the variant adds, and one it removes.
    if variant == 0 || variant == 3 {
        out.push(cluster_ip_service("gone", "10.96.0.70", &["10.244.1.70"]));
    } else {
        out.push(cluster_ip_service("new", "10.96.0.71", &["10.244.1.71"]));
    }
    out
}

fn v6_services(variant: u8) -> Vec<ServicePortState> {
    let eps: &[&str] = if variant == 0 || variant == 3 {
        &["fd00:244::5", "fd00:244::6"]
    } else {
        &["fd00:244::5", "fd00:244::7"]
    };
    let mut dns = udp(cluster_ip_service("v6", "fd00:96::10", eps), 53, 5353);
    dns.node_port = Some(30053);
    let mut sticky = cluster_ip_service("v6sticky", "fd00:96::11", &["fd00:244::8"]);
    sticky.affinity_timeout_seconds = Some(60);
    let mut lb = cluster_ip_service("v6lb", "fd00:96::12", &["fd00:244::9"]);
    lb.load_balancer_ips = vec![ip("2001:db8:1::7")];
    lb.load_balancer_source_ranges = vec![net("2001:db8::/32"), net("192.0.2.0/24")];
    vec![dns, sticky, lb]
}

pub(super) fn fixture(variant: u8) -> DesiredState {
    let mut st = state(v4_services(variant), v6_services(variant));
    st.v4.cluster_cidrs = vec![net("10.244.0.0/16")];
    st.v4.cluster_ip_masquerade = ClusterIpMasquerade::FromOutside(vec![net("10.244.0.0/16")]);
    st.v6.cluster_ip_masquerade = ClusterIpMasquerade::All;
    st.v6.nodeport_addresses =
        NodePortAddresses::Cidrs(vec![net("fd00:1::/64"), net("fd00:1::/48")]);
    assert_eq!(st.v4.family, IpFamily::V4);
    st
}

fn render_everything() -> String {
    let mut out = String::new();
    let states = [fixture(0), fixture(1), fixture(2)];
    for (i, st) in states.iter().enumerate() {
        for layout in [Layout::FULL, Layout::NORTH_SOUTH] {
            let _ = writeln!(out, "=== full, variant {i}, table {}", layout.table);
            out.push_str(&render_layout(st, layout).expect("render"));
        }
    }
    // Masquerade of everything in v4, none in v6.
    let mut all = fixture(0);
    all.v4.cluster_ip_masquerade = ClusterIpMasquerade::All;
    all.v6.cluster_ip_masquerade = ClusterIpMasquerade::None;
    let _ = writeln!(out, "=== full, masquerade all/none");
    out.push_str(&render_layout(&all, Layout::FULL).expect("render"));
    for (a, b) in [(0, 1), (1, 0), (0, 2), (2, 1)] {
        let (prev, next) = (&states[a], &states[b]);
        let diff = Diff::between(Some(Arc::new(prev.clone())), next, false);
        let p = render_partial(prev, next, &diff, Layout::FULL.table, None)
            .expect("render_partial")
            .expect("a partial");
        let _ = writeln!(out, "=== partial {a} -> {b}: script");
        out.push_str(&p.script);
        let _ = writeln!(out, "=== partial {a} -> {b}: stale");
        out.push_str(&p.stale);
        let _ = writeln!(out, "=== partial {a} -> {b}: netlink");
        let _ = writeln!(out, "{:#?}", p.netlink);
    }
    // Only plain ClusterIP services change: the netlink form exists.
    let plain = |variant: u8| {
        let mut st = state(
            v4_services(variant)
                .into_iter()
                .filter(|s| {
                    s.node_port.is_none()
                        && s.load_balancer_ips.is_empty()
                        && s.affinity_timeout_seconds.is_none()
                })
                .collect(),
            vec![],
        );
        st.v4.cluster_ip_masquerade = ClusterIpMasquerade::FromOutside(vec![net("10.244.0.0/16")]);
        st
    };
    for (a, b) in [(0, 1), (0, 2), (0, 3)] {
        let (prev, next) = (plain(a), plain(b));
        let diff = Diff::between(Some(Arc::new(prev.clone())), &next, false);
        let p = render_partial(&prev, &next, &diff, Layout::FULL.table, None)
            .expect("render_partial")
            .expect("a partial");
        let _ = writeln!(out, "=== plain partial {a} -> {b}: script");
        out.push_str(&p.script);
        let _ = writeln!(out, "=== plain partial {a} -> {b}: stale");
        out.push_str(&p.stale);
        let _ = writeln!(out, "=== plain partial {a} -> {b}: netlink");
        let _ = writeln!(out, "{:#?}", p.netlink);
    }
    out
}

#[test]
fn golden_render_is_unchanged() {
    let got = render_everything();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
    if std::env::var_os("SVCPLANE_BLESS").is_some() {
        std::fs::write(&path, &got).expect("write the golden file");
        return;
    }
    let want = std::fs::read_to_string(&path).expect("read the golden file");
    if got != want {
        let line = got
            .lines()
            .zip(want.lines())
            .position(|(g, w)| g != w)
            .unwrap_or(got.lines().count().min(want.lines().count()));
        let show = |s: &str| {
            s.lines()
                .skip(line.saturating_sub(3))
                .take(8)
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "the render differs from {GOLDEN} at line {}:\n--- got\n{}\n--- want\n{}\n(SVCPLANE_BLESS=1 rewrites it after review)",
            line + 1,
            show(&got),
            show(&want)
        );
    }
}
