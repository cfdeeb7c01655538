//! The conntrack reconciler against a real conntrack table (root, scratch netns): ctnetlink
//! dump and delete on their own.
//!
//! Each namespace has a veth pair whose `veth0` end has 10.99.0.2/24 and fd00:99::2/64 and
//! whose other end has no address: a datagram to another address of the subnet waits for
//! a neighbour that never answers, but conntrack has confirmed its entry in postrouting
//! before that, so the entries exist without any peer. (No dummy interface: not every
//! kernel has the module.)

use std::net::{IpAddr, SocketAddr, UdpSocket};

use svcplane_dataplane::conntrack::{ConntrackSocket, Flow, IPPROTO_UDP, local_addresses};
use svcplane_model::IpFamily;
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
