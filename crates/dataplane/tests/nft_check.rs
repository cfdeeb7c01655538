//! Root test: the rendered transaction must be accepted by the real `nft`, apply in a
//! scratch network namespace (twice: idempotent), drop stale objects on the next sync,
//! keep affinity state across syncs, and `cleanup` must remove both tables and nothing
//! else. Skips (with a message) when not root.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use svcplane_dataplane::NftablesBackend;
use svcplane_dataplane::nftables::render;
use svcplane_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
use svcplane_proxy::{
    ClusterIpMasquerade, Dataplane, DesiredState, Diff, EmptyVerdict, EndpointState,
    ExternalPolicy, FamilyState, NodePortAddresses, ServicePortState, TrafficTarget,
};
use svcplane_testkit::{Netns, run_checked, skip_unless_root};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn endpoint(addr: &str, port: u16, is_local: bool) -> EndpointState {
    EndpointState::ready(ip(addr), port, is_local)
}

fn target(endpoints: &[usize], if_empty: EmptyVerdict) -> TrafficTarget {
    TrafficTarget {
        endpoints: endpoints.to_vec(),
        if_empty,
    }
}

fn service(
    name: &str,
    port_name: &str,
    protocol: Protocol,
    port: u16,
    cluster_ip: &str,
    eps: &[(&str, u16, bool)],
) -> ServicePortState {
    let all: Vec<usize> = (0..eps.len()).collect();
    ServicePortState {
        name: ServicePortName {
            service: NamespacedName::new("demo", name),
            port: port_name.into(),
            protocol,
        },
        protocol,
        port,
        cluster_ip: Some(ip(cluster_ip)),
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        affinity_timeout_seconds: None,
        ipvs_scheduler: None,
        endpoints: eps.iter().map(|(a, p, l)| endpoint(a, *p, *l)).collect(),
        internal: target(&all, EmptyVerdict::Reject),
        external: target(&all, EmptyVerdict::Reject),
        external_policy: ExternalPolicy::Cluster,
        health_check_node_port: None,
    }
}

/// Every feature, in one family.
fn rich_family(v6: bool) -> FamilyState {
    let a = |v4: &'static str, v6s: &'static str| if v6 { v6s } else { v4 };
    let family = if v6 { IpFamily::V6 } else { IpFamily::V4 };
    let mut services = Vec::new();

    // ClusterIP, two endpoints.
    services.push(service(
        "web",
        "http",
        Protocol::Tcp,
        80,
        a("10.96.0.10", "fd00:96::10"),
        &[
            (a("10.244.1.5", "fd00:244:1::5"), 8080, true),
            (a("10.244.2.7", "fd00:244:2::7"), 8080, false),
        ],
    ));
    // No endpoints at all (reject), with a NodePort.
    let mut empty = service(
        "empty",
        "",
        Protocol::Udp,
        53,
        a("10.96.0.11", "fd00:96::11"),
        &[],
    );
    empty.node_port = Some(30053);
    services.push(empty);
    // iTP Local without local endpoints (drop).
    let mut drop = service(
        "drop",
        "p",
        Protocol::Tcp,
        81,
        a("10.96.0.12", "fd00:96::12"),
        &[],
    );
    drop.internal.if_empty = EmptyVerdict::Drop;
    services.push(drop);
    // NodePort + LoadBalancer with source ranges + externalIP + affinity, eTP Cluster.
    let mut lb = service(
        "lb",
        "https",
        Protocol::Tcp,
        443,
        a("10.96.0.13", "fd00:96::13"),
        &[
            (a("10.244.1.8", "fd00:244:1::8"), 8443, true),
            (a("10.244.2.9", "fd00:244:2::9"), 8443, false),
        ],
    );
    lb.node_port = Some(30443);
    lb.load_balancer_ips = vec![ip(a("203.0.113.13", "2001:db8:113::13"))];
    lb.external_ips = vec![ip(a("198.51.100.13", "2001:db8:100::13"))];
    lb.load_balancer_source_ranges = vec![
        net("192.0.2.0/24"),
        net("192.0.2.128/25"),
        net("2001:db8:2::/48"),
    ];
    lb.affinity_timeout_seconds = Some(10800);
    services.push(lb);
    // eTP Local: external = the local endpoint, local_origin = both; iTP Local too.
    let mut local = service(
        "local",
        "http",
        Protocol::Tcp,
        8000,
        a("10.96.0.14", "fd00:96::14"),
        &[
            (a("10.244.1.20", "fd00:244:1::20"), 80, true),
            (a("10.244.2.21", "fd00:244:2::21"), 80, false),
        ],
    );
    local.node_port = Some(30800);
    local.load_balancer_ips = vec![ip(a("203.0.113.14", "2001:db8:113::14"))];
    local.internal = target(&[0], EmptyVerdict::Drop);
    local.external = target(&[0], EmptyVerdict::Drop);
    local.external_policy = ExternalPolicy::Local {
        local_origin: target(&[0, 1], EmptyVerdict::Reject),
    };
    local.affinity_timeout_seconds = Some(60);
    services.push(local);
    // eTP Local without a local endpoint: short-circuits only, drop the rest.
    let mut remote = service(
        "remote",
        "",
        Protocol::Sctp,
        9000,
        a("10.96.0.15", "fd00:96::15"),
        &[(a("10.244.2.30", "fd00:244:2::30"), 9000, false)],
    );
    remote.node_port = Some(30900);
    remote.external = target(&[], EmptyVerdict::Drop);
    remote.external_policy = ExternalPolicy::Local {
        local_origin: target(&[0], EmptyVerdict::Reject),
    };
    services.push(remote);

    // Longest possible names (63-character namespace, name and port name): the chain
    // names get truncated to fit nft's limit and must still parse.
    let long = "l".repeat(63);
    let mut longest = service(
        "x",
        "",
        Protocol::Sctp,
        65535,
        a("10.96.0.16", "fd00:96::16"),
        &[(
            a("10.244.255.255", "fd00:244:ffff:ffff:ffff:ffff:ffff:fff1"),
            65535,
            true,
        )],
    );
    longest.name.service = NamespacedName::new(long.clone(), long.clone());
    longest.name.port = long.into();
    longest.node_port = Some(32767);
    longest.affinity_timeout_seconds = Some(86400);
    longest.external_policy = ExternalPolicy::Local {
        local_origin: target(&[0], EmptyVerdict::Reject),
    };
    services.push(longest);

    let mut f = FamilyState::empty(family);
    if v6 {
        f.cluster_cidrs = vec![net("fd00:244::/48")];
        f.cluster_ip_masquerade = ClusterIpMasquerade::All;
        f.nodeport_addresses = NodePortAddresses::Cidrs(vec![net("2001:db8:1::/64")]);
        f.node_ips = vec![ip("2001:db8:1::1")];
    } else {
        f.cluster_cidrs = vec![net("10.244.0.0/16")];
        f.cluster_ip_masquerade = ClusterIpMasquerade::FromOutside(vec![net("10.244.0.0/16")]);
        f.nodeport_addresses = NodePortAddresses::AllLocal;
        f.node_ips = vec![ip("192.0.2.10")];
    }
    f.services = services
        .into_iter()
        .map(|s| (s.name.clone(), Arc::new(s)))
        .collect();
    f
}

fn rich_state() -> DesiredState {
    DesiredState {
        node_name: "node-a".into(),
        node_zone: None,
        v4: rich_family(false),
        v6: rich_family(true),
        health_checks: BTreeMap::new(),
    }
}

fn nft_in(ns: &Netns, args: &[&str]) -> String {
    let out = run_checked(&mut ns.command("nft", args)).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sync(backend: &mut NftablesBackend, state: &DesiredState) {
    let state = Arc::new(state.clone());
    let diff = Diff::between(None, &state, true);
    let report = backend.sync(&state, &diff).expect("sync");
    assert!(report.full);
    assert!(report.size > 0);
}

#[test]
fn rendered_rules_are_accepted_applied_and_cleaned_up() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("svcplane-t").expect("create netns");
    let state = rich_state();
    let script = render(&state).expect("render");

    // Check only.
    let checked = ns
        .run_with_input("nft", &["-c", "-f", "-"], &script)
        .unwrap();
    assert!(
        checked.status.success(),
        "nft -c rejected the script: {}",
        String::from_utf8_lossy(&checked.stderr)
    );

    // A table of somebody else's, which we must never touch.
    run_checked(&mut ns.command("nft", &["add", "table", "ip", "other"])).unwrap();
    run_checked(&mut ns.command("nft", &["add", "chain", "ip", "other", "keep"])).unwrap();

    let mut backend = NftablesBackend::with_nft_command(["ip", "netns", "exec", ns.name(), "nft"]);
    sync(&mut backend, &state);
    sync(&mut backend, &state); // idempotent
    let v4 = nft_in(&ns, &["list", "table", "ip", "svcplane"]);
    let v6 = nft_in(&ns, &["list", "table", "ip6", "svcplane"]);
    assert!(v4.contains("numgen random mod 2 vmap"), "{v4}");
    // ClusterIP traffic picks its endpoint from the endpoints map (as nft lists it).
    assert!(
        v4.contains("dnat ip to ip daddr . tcp dport . numgen random mod 2 map @endpoints-tcp"),
        "{v4}"
    );
    assert!(
        v4.contains("10.96.0.10 . 80 . 0 : 10.244.1.5 . 8080"),
        "{v4}"
    );
    assert!(
        v6.contains("fd00:96::10 . 80 . 0 : fd00:244:1::5 . 8080"),
        "{v6}"
    );
    assert!(v4.contains("goto reject-chain"));
    assert!(v6.contains("set nodeport-ips"));
    assert!(!v4.contains("set nodeport-ips"));
    let longest_name = v6
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("chain ")
                .and_then(|r| r.strip_suffix(" {"))
        })
        .map(str::len)
        .max()
        .unwrap();
    assert!(
        (240..=255).contains(&longest_name),
        "longest chain name: {longest_name}"
    );

    // Affinity state survives a resync: add a sticky client, sync, it is still there.
    let affinity_set = v4
        .lines()
        .map(str::trim)
        .find_map(|l| {
            l.strip_prefix("set affinity-")
                .and_then(|r| r.strip_suffix(" {"))
                .filter(|r| r.contains("demo/lb/"))
        })
        .map(|r| format!("affinity-{r}"))
        .expect("an affinity set for demo/lb");
    run_checked(&mut ns.command(
        "nft",
        &[
            "add",
            "element",
            "ip",
            "svcplane",
            &affinity_set,
            "{ 192.0.2.99 }",
        ],
    ))
    .unwrap();
    sync(&mut backend, &state);
    let set = nft_in(&ns, &["list", "set", "ip", "svcplane", &affinity_set]);
    assert!(set.contains("192.0.2.99"), "affinity element lost: {set}");

    // A smaller state: the old service's chains and sets disappear.
    let mut smaller = state.clone();
    for fam in [&mut smaller.v4, &mut smaller.v6] {
        fam.services.retain(|k, _| &*k.service.name == "web");
        fam.nodeport_addresses = NodePortAddresses::AllLocal;
    }
    sync(&mut backend, &smaller);
    let v4 = nft_in(&ns, &["list", "table", "ip", "svcplane"]);
    let v6 = nft_in(&ns, &["list", "table", "ip6", "svcplane"]);
    for listing in [&v4, &v6] {
        assert!(
            !listing.contains("demo/lb/"),
            "stale objects left: {listing}"
        );
        assert!(!listing.contains("affinity-"), "stale affinity set left");
        assert!(listing.contains("demo/web/"));
    }
    assert!(!v6.contains("set nodeport-ips"));

    // Cleanup removes both tables (and is fine when they are already gone).
    backend.cleanup().expect("cleanup");
    backend.cleanup().expect("second cleanup");
    let tables = nft_in(&ns, &["list", "tables"]);
    assert!(!tables.contains("svcplane"), "{tables}");
    assert!(
        tables.contains("table ip other"),
        "someone else's table was touched: {tables}"
    );
}
