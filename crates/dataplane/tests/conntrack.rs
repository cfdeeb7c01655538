//! The conntrack reconciler against a real conntrack table (root, scratch netns): ctnetlink
//! dump and delete on their own, then the nftables backend deleting a flow whose endpoint
//! went away.
//!
//! Each namespace has a veth pair whose `veth0` end has 10.99.0.2/24 and fd00:99::2/64 and
//! whose other end has no address: a datagram to another address of the subnet waits for
//! a neighbour that never answers, but conntrack has confirmed its entry in postrouting
//! before that, so the entries exist without any peer. (No dummy interface: not every
//! kernel has the module.)

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;

use svcplane_dataplane::NftablesBackend;
use svcplane_dataplane::conntrack::{
    ConntrackScope, ConntrackSocket, Flow, IPPROTO_UDP, local_addresses,
};
use svcplane_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
use svcplane_proxy::{
    Dataplane, DesiredState, Diff, EmptyVerdict, EndpointState, ExternalPolicy, FamilyState,
    ServicePortState, TrafficTarget,
};
use svcplane_testkit::{Netns, in_netns, run_checked, skip_unless_root};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test socket address")
}

/// A scratch namespace with the veth pair up and `veth0` addressed.
fn scratch(prefix: &str) -> Netns {
    let ns = Netns::new(prefix).expect("netns");
    for args in [
        &[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
        ][..],
        &["addr", "add", "10.99.0.2/24", "dev", "veth0"],
        &["addr", "add", "fd00:99::2/64", "dev", "veth0", "nodad"],
        &["link", "set", "veth1", "up"],
        &["link", "set", "veth0", "up"],
        // The service CIDR of the backend test, out of veth0 as well.
        &["route", "add", "10.96.0.0/12", "dev", "veth0"],
    ] {
        run_checked(&mut ns.command("ip", args)).expect("ip");
    }
    ns
}

fn nft(ns: &Netns, script: &str) {
    let out = ns.run_with_input("nft", &["-f", "-"], script).expect("nft");
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One datagram from `src` to `dst`, sent inside `ns`.
fn send_udp(ns: &Netns, src: &str, dst: &str) {
    let (src, dst) = (sa(src), sa(dst));
    in_netns(ns.name(), || -> std::io::Result<()> {
        let sock = UdpSocket::bind(src)?;
        sock.send_to(b"ping", dst)?;
        Ok(())
    })
    .expect("enter netns")
    .expect("send datagram");
}

fn dump(ns: &Netns, family: IpFamily) -> Vec<Flow> {
    ConntrackSocket::open_in(Some(ns.name()))
        .expect("conntrack socket")
        .dump(family)
        .expect("dump")
}

fn to(flows: &[Flow], dst: &str) -> Vec<Flow> {
    let dst = sa(dst);
    flows
        .iter()
        .filter(|f| (f.orig.dst, f.orig.dst_port) == (dst.ip(), dst.port()))
        .cloned()
        .collect()
}

#[test]
fn dump_sees_a_dnated_udp_entry_and_delete_removes_it() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let ns = scratch("svcplane-ctnl");
    nft(
        &ns,
        "table ip ct_test {\n chain out { type nat hook output priority -100; ip daddr 10.99.0.1 udp dport 53 dnat to 10.99.0.3:5353; }\n}\n\
         table ip6 ct_test {\n chain out { type nat hook output priority -100; ip6 daddr fd00:99::1 udp dport 53 dnat to [fd00:99::3]:5353; }\n}\n",
    );
    send_udp(&ns, "10.99.0.2:40000", "10.99.0.1:53");
    send_udp(&ns, "[fd00:99::2]:40000", "[fd00:99::1]:53");

    let v4 = dump(&ns, IpFamily::V4);
    let found = to(&v4, "10.99.0.1:53");
    assert_eq!(found.len(), 1, "one entry to the DNATed address: {v4:?}");
    let flow = &found[0];
    assert_eq!(flow.orig.protocol, IPPROTO_UDP);
    assert_eq!(
        (flow.orig.src, flow.orig.src_port),
        (ip("10.99.0.2"), 40000)
    );
    assert_eq!(
        (flow.reply.src, flow.reply.src_port),
        (ip("10.99.0.3"), 5353)
    );
    assert_eq!(
        (flow.reply.dst, flow.reply.dst_port),
        (ip("10.99.0.2"), 40000)
    );
    assert!(flow.is_dnat());
    assert!(flow.id.is_some(), "the kernel reports CTA_ID");
    // The dump is filtered by family.
    assert!(v4.iter().all(|f| f.orig.src.is_ipv4()), "{v4:?}");
    let v6 = dump(&ns, IpFamily::V6);
    let found6 = to(&v6, "[fd00:99::1]:53");
    assert_eq!(found6.len(), 1, "{v6:?}");
    assert_eq!(
        (found6[0].reply.src, found6[0].reply.src_port),
        (ip("fd00:99::3"), 5353)
    );
    assert!(v6.iter().all(|f| f.orig.src.is_ipv6()), "{v6:?}");

    let mut socket = ConntrackSocket::open_in(Some(ns.name())).expect("socket");
    let outcome = socket.delete([flow, &found6[0]]).expect("delete");
    assert_eq!((outcome.deleted, outcome.missing), (2, 0), "{outcome:?}");
    assert!(outcome.failed.is_empty());
    assert!(to(&dump(&ns, IpFamily::V4), "10.99.0.1:53").is_empty());
    assert!(to(&dump(&ns, IpFamily::V6), "[fd00:99::1]:53").is_empty());
    // Deleting it again: already gone, not an error.
    let again = socket.delete([flow]).expect("delete again");
    assert_eq!((again.deleted, again.missing), (0, 1));

    // A new entry for the same tuple has a new id: the old flow's delete leaves it alone.
    send_udp(&ns, "10.99.0.2:40000", "10.99.0.1:53");
    let renewed = socket.delete([flow]).expect("delete by old id");
    assert_eq!((renewed.deleted, renewed.missing), (0, 1));
    assert_eq!(to(&dump(&ns, IpFamily::V4), "10.99.0.1:53").len(), 1);
}

#[test]
fn local_addresses_are_the_namespaces_own() {
    if skip_unless_root(&["ip"]) {
        return;
    }
    let ns = scratch("svcplane-ctla");
    let addrs = local_addresses(Some(ns.name())).expect("addresses");
    for want in ["10.99.0.2", "fd00:99::2", "127.0.0.1"] {
        assert!(addrs.contains(&ip(want)), "{want} missing from {addrs:?}");
    }
}

/// A UDP service 10.96.0.10:53 over one endpoint at `endpoint`:5353.
fn dns_state(endpoint: &str) -> Arc<DesiredState> {
    let name = ServicePortName {
        service: NamespacedName::new("kube-system", "dns"),
        port: "dns".into(),
        protocol: Protocol::Udp,
    };
    let all = TrafficTarget {
        endpoints: vec![0].into(),
        if_empty: EmptyVerdict::Reject,
    };
    let svc = ServicePortState {
        name: name.clone(),
        protocol: Protocol::Udp,
        port: 53,
        cluster_ip: Some(ip("10.96.0.10")),
        node_port: None,
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        load_balancer_source_ranges: Vec::new(),
        affinity_timeout_seconds: None,
        ipvs_scheduler: None,
        endpoints: vec![EndpointState::ready(ip(endpoint), 5353, false)],
        internal: all.clone(),
        external: all,
        external_policy: ExternalPolicy::Cluster,
        health_check_node_port: None,
    };
    let mut v4 = FamilyState::empty(IpFamily::V4);
    v4.services.insert(Arc::new(svc));
    Arc::new(DesiredState {
        node_name: "node-a".into(),
        node_zone: None,
        v4,
        v6: FamilyState::empty(IpFamily::V6),
        health_checks: BTreeMap::new(),
    })
}

#[test]
fn the_nftables_backend_deletes_flows_to_a_removed_endpoint() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let ns = scratch("svcplane-ctbe");
    let mut backend = NftablesBackend::with_nft_command(["ip", "netns", "exec", ns.name(), "nft"])
        .with_conntrack(ConntrackScope::Netns(ns.name().to_owned()));
    let first = dns_state("10.99.0.3");
    let report = backend
        .sync(&first, &Diff::between(None, &first, true))
        .expect("first sync");
    assert_eq!(
        (report.conntrack_deleted_v4, report.conntrack_failures),
        (0, 0)
    );
    // The node itself queries the ClusterIP: svcplane's output chain DNATs it.
    send_udp(&ns, "10.99.0.2:40053", "10.96.0.10:53");
    let before = to(&dump(&ns, IpFamily::V4), "10.96.0.10:53");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].reply.src, ip("10.99.0.3"));

    // An unrelated change keeps the live flow...
    let mut same = (*first).clone();
    same.node_zone = Some("zone-a".into());
    let same = Arc::new(same);
    let report = backend
        .sync(&same, &Diff::between(Some(first.clone()), &same, false))
        .expect("sync");
    assert_eq!(report.conntrack_deleted_v4, 0);
    assert_eq!(to(&dump(&ns, IpFamily::V4), "10.96.0.10:53"), before);

    // ...the endpoint moving to 10.99.0.4 deletes it.
    let moved = dns_state("10.99.0.4");
    let report = backend
        .sync(&moved, &Diff::between(Some(same), &moved, false))
        .expect("sync");
    assert_eq!(
        (report.conntrack_deleted_v4, report.conntrack_failures),
        (1, 0),
        "{report:?}"
    );
    assert!(to(&dump(&ns, IpFamily::V4), "10.96.0.10:53").is_empty());
    // The next datagram of the same 5-tuple reaches the new endpoint.
    send_udp(&ns, "10.99.0.2:40053", "10.96.0.10:53");
    let after = to(&dump(&ns, IpFamily::V4), "10.96.0.10:53");
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].reply.src, ip("10.99.0.4"));
}
