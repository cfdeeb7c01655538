//! Root test (no IPVS needed): IPVS mode's filter tables, as rendered, are accepted by the
//! real `nft` in a scratch namespace (twice: the full form replaces itself), and the
//! probe fails once the tables are gone; a partial sync's element changes sent over
//! netlink land in the kernel's sets.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use svcplane_dataplane::ipvs::filter::{
    ElementSocket, FilterState, send_changes, tables_present_probe,
};
use svcplane_dataplane::ipvs::plan;
use svcplane_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
use svcplane_proxy::{
    ClusterIpMasquerade, DesiredState, EmptyVerdict, EndpointState, ExternalPolicy, FamilyState,
    ServicePortState, TrafficTarget,
};
use svcplane_testkit::{Netns, run_checked, skip_unless_root};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn service(name: &str, cip: &str, eps: &[&str]) -> ServicePortState {
    let target = |if_empty| TrafficTarget {
        endpoints: (0..eps.len()).collect(),
        if_empty,
    };
    ServicePortState {
        name: ServicePortName {
            service: NamespacedName::new("demo", name),
            port: "http".into(),
            protocol: Protocol::Tcp,
        },
        protocol: Protocol::Tcp,
        port: 80,
        cluster_ip: Some(ip(cip)),
        node_port: Some(30080),
        external_ips: vec![],
        load_balancer_ips: vec![ip("192.0.2.7")],
        load_balancer_source_ranges: vec!["203.0.113.0/24".parse().unwrap()],
        affinity_timeout_seconds: None,
        ipvs_scheduler: None,
        endpoints: eps
            .iter()
            .map(|e| EndpointState::ready(ip(e), 8080, false))
            .collect(),
        internal: target(EmptyVerdict::Reject),
        external: target(EmptyVerdict::Reject),
        external_policy: ExternalPolicy::Cluster,
        health_check_node_port: None,
    }
}

fn state(services: Vec<ServicePortState>) -> DesiredState {
    let mut v4 = FamilyState::empty(IpFamily::V4);
    v4.cluster_ip_masquerade =
        ClusterIpMasquerade::FromOutside(vec!["10.244.0.0/16".parse().unwrap()]);
    v4.services = services.into_iter().map(Arc::new).collect();
    DesiredState {
        node_name: "node-a".into(),
        node_zone: None,
        v4,
        v6: FamilyState::empty(IpFamily::V6),
        health_checks: BTreeMap::new(),
    }
}

fn filters(st: &DesiredState) -> [FilterState; 2] {
    let wanted = plan::virtual_servers(st, "rr", &[ip("10.0.0.11")]);
    let vips = plan::service_addresses(st);
    [&st.v4, &st.v6].map(|f| FilterState::build(f, wanted.values(), &vips).unwrap())
}

fn nft(ns: &Netns, script: &str) -> Result<(), String> {
    let path = std::env::temp_dir().join(format!("{}.nft", ns.name()));
    std::fs::write(&path, script).unwrap();
    let out = ns
        .command("nft", &["-f", path.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn ipvs_filter_tables_apply_and_replace_themselves() {
    if skip_unless_root(&["nft", "ip"]) {
        return;
    }
    let ns = Netns::new("svcplane-ipvsf").unwrap();
    assert!(
        nft(&ns, &tables_present_probe()).is_err(),
        "probe passed without tables"
    );

    let a = state(vec![service("web", "10.96.0.10", &["10.244.1.2"])]);
    let [fa4, fa6] = filters(&a);
    let full = fa4.render(IpFamily::V4) + &fa6.render(IpFamily::V6);
    nft(&ns, &full).expect("full render");
    nft(&ns, &full).expect("full render, again");
    nft(&ns, &tables_present_probe()).expect("probe with the tables there");

    run_checked(&mut ns.command("nft", &["flush", "ruleset"])).unwrap();
    assert!(nft(&ns, &tables_present_probe()).is_err());
}

/// A partial sync's element changes, sent as one nf_tables netlink batch, land in the
/// real kernel's sets (keys encoded as nft encodes them: `nft list` prints them back),
/// and the batch fails once the tables are gone (the partial sync then goes full).
#[test]
fn ipvs_element_changes_go_over_netlink() {
    if skip_unless_root(&["nft", "ip"]) {
        return;
    }
    let ns = Netns::new("svcplane-ipvsn").unwrap();
    // No source ranges (no chains to make), each its own NodePort (web's is 30080).
    let plain = |name: &str, cip: &str, eps: &[&str]| ServicePortState {
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        node_port: (name == "web").then_some(30080),
        ..service(name, cip, eps)
    };
    let a = Arc::new(state(vec![
        plain("web", "10.96.0.10", &["10.244.1.2", "10.244.1.3"]),
        plain("api", "10.96.0.12", &["10.244.1.3"]),
    ]));
    let node = [ip("10.0.0.11")];
    let (applied, contested) = plan::virtual_servers_contested(&a, "rr", &node);
    let [mut f4, f6] = filters(&a);
    nft(&ns, &(f4.render(IpFamily::V4) + &f6.render(IpFamily::V6))).expect("full render");

    // web: 10.244.1.2 leaves, 10.244.1.4 comes; api goes; empty comes (no endpoints).
    let b = Arc::new(state(vec![
        plain("web", "10.96.0.10", &["10.244.1.3", "10.244.1.4"]),
        plain("empty", "10.96.0.11", &[]),
    ]));
    let changed: BTreeSet<&ServicePortName> =
        a.v4.services.keys().chain(b.v4.services.keys()).collect();
    let mut claims = plan::address_claims(&a);
    let (came, gone) = plan::update_address_claims(&mut claims, &a, &b, &changed);
    let change = plan::changed_virtual_servers(&a, &b, &changed, &applied, &contested, "rr", &node)
        .expect("no contested keys");
    let (removed, added) = change.served(0, &applied, &a.v4, &b.v4);
    let changes = f4
        .update(&removed, &added, &gone, &came)
        .expect("elements only");
    let mut socket = ElementSocket::open(Some(ns.name())).unwrap();
    let sent = send_changes(&mut socket, [&changes, &Vec::new()]).expect("batch");
    assert_eq!(sent, changes.len());
    // The kernel holds what a full computation of b says, element for element.
    assert_eq!(f4, filters(&b)[0]);
    let out =
        run_checked(&mut ns.command("nft", &["list", "table", "ip", "svcplane-ipvs"])).unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    for elem in [
        "10.244.1.4 . 10.244.1.4",
        "10.244.1.3 . 10.244.1.3",
        "10.96.0.11 . tcp . 80",
        "10.0.0.11 . tcp . 30080",
    ] {
        assert!(listing.contains(elem), "{elem} missing:\n{listing}");
    }
    for gone in ["10.244.1.2", "10.96.0.12"] {
        assert!(!listing.contains(gone), "{gone} still there:\n{listing}");
    }

    run_checked(&mut ns.command("nft", &["flush", "ruleset"])).unwrap();
    assert!(send_changes(&mut socket, [&Vec::new(), &Vec::new()]).is_err());
}
