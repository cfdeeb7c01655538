//! The stale-flow decision, on hand-built desired states and flows.

use std::net::IpAddr;
use std::sync::Arc;

use svcplane_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
use svcplane_proxy::{
    EmptyVerdict, EndpointState, ExternalPolicy, FamilyState, NodePortAddresses, Picks,
    ServicePortState, TrafficTarget,
};

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

const CLIENT: &str = "10.244.1.20";
const NODE: &str = "10.0.0.11";
const DNS_IP: &str = "10.96.0.10";
const LIVE: (&str, u16) = ("10.244.2.5", 5353);
const GONE: (&str, u16) = ("10.244.2.6", 5353);

fn target(n: usize) -> TrafficTarget {
    TrafficTarget {
        endpoints: (0..n).collect(),
        if_empty: EmptyVerdict::Reject,
    }
}

/// A service port `name` on ClusterIP `cluster_ip`:53 with the given endpoints, used by
/// both targets.
fn svc(name: &str, protocol: Protocol, cluster_ip: &str, eps: &[(&str, u16)]) -> ServicePortState {
    let endpoints: Vec<EndpointState> = eps
        .iter()
        .map(|&(a, p)| EndpointState::ready(ip(a), p, false))
        .collect();
    ServicePortState {
        name: ServicePortName {
            service: NamespacedName::new("kube-system", name),
            port: "dns".into(),
            protocol,
        },
        protocol,
        port: 53,
        cluster_ip: Some(ip(cluster_ip)),
        node_port: None,
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        load_balancer_source_ranges: Vec::new(),
        affinity_timeout_seconds: None,
        ipvs_scheduler: None,
        internal: target(endpoints.len()),
        external: target(endpoints.len()),
        endpoints,
        external_policy: ExternalPolicy::Cluster,
        health_check_node_port: None,
    }
}

fn family(services: Vec<ServicePortState>) -> FamilyState {
    let mut state = FamilyState::empty(IpFamily::V4);
    state.node_ips = vec![ip(NODE)];
    for s in services {
        state.services.insert(Arc::new(s));
    }
    state
}

/// A flow from CLIENT:40000 to `dst`, answered by `reply_from` (== dst: not DNATed).
fn flow(protocol: u8, dst: (&str, u16), reply_from: (&str, u16)) -> Flow {
    Flow {
        orig: Tuple {
            src: ip(CLIENT),
            dst: ip(dst.0),
            protocol,
            src_port: 40000,
            dst_port: dst.1,
        },
        reply: Tuple {
            src: ip(reply_from.0),
            dst: ip(CLIENT),
            protocol,
            src_port: reply_from.1,
            dst_port: 40000,
        },
        zone: None,
        id: None,
    }
}

fn udp(dst: (&str, u16), reply_from: (&str, u16)) -> Flow {
    flow(IPPROTO_UDP, dst, reply_from)
}

fn stale(state: &FamilyState, local: &[&str], flows: &[Flow]) -> Vec<Flow> {
    let local: Vec<IpAddr> = local.iter().map(|a| ip(a)).collect();
    stale_flows(state, &local, flows)
        .into_iter()
        .cloned()
        .collect()
}

fn dns() -> FamilyState {
    family(vec![svc("dns", Protocol::Udp, DNS_IP, &[LIVE])])
}

#[test]
fn a_flow_to_a_gone_endpoint_is_deleted_and_one_to_a_live_endpoint_kept() {
    let to_gone = udp((DNS_IP, 53), GONE);
    let to_live = udp((DNS_IP, 53), LIVE);
    // The live endpoint's address, but a port that is no endpoint (targetPort changed).
    let old_port = udp((DNS_IP, 53), (LIVE.0, 53));
    assert_eq!(
        stale(
            &dns(),
            &[NODE],
            &[to_gone.clone(), to_live, old_port.clone()]
        ),
        vec![to_gone, old_port]
    );
}

#[test]
fn flows_to_other_destinations_are_kept() {
    let flows = [
        // Another address, and the service's address on another port.
        udp(("10.96.0.99", 53), GONE),
        udp((DNS_IP, 54), GONE),
        // Pod to pod, not through any service.
        udp(GONE, GONE),
    ];
    assert!(stale(&dns(), &[NODE], &flows).is_empty());
}

#[test]
fn tcp_flows_are_kept_even_to_a_gone_endpoint() {
    // A TCP service on the same address and port, and the UDP service: TCP is never touched.
    let state = family(vec![
        svc("dns", Protocol::Udp, DNS_IP, &[LIVE]),
        svc("dns-tcp", Protocol::Tcp, DNS_IP, &[LIVE]),
    ]);
    let tcp = flow(IPPROTO_TCP, (DNS_IP, 53), GONE);
    let udp_gone = udp((DNS_IP, 53), GONE);
    assert_eq!(
        stale(&state, &[NODE], &[tcp, udp_gone.clone()]),
        vec![udp_gone]
    );
}

#[test]
fn sctp_is_reconciled_like_udp() {
    let state = family(vec![svc("sig", Protocol::Sctp, DNS_IP, &[LIVE])]);
    let gone = flow(IPPROTO_SCTP, (DNS_IP, 53), GONE);
    let live = flow(IPPROTO_SCTP, (DNS_IP, 53), LIVE);
    // The SCTP service does not make a UDP flow to the same frontend stale.
    let udp_gone = udp((DNS_IP, 53), GONE);
    assert_eq!(
        stale(&state, &[NODE], &[gone.clone(), live, udp_gone]),
        vec![gone]
    );
}

#[test]
fn a_flow_that_was_not_dnated_is_deleted_once_the_service_has_endpoints() {
    let untranslated = udp((DNS_IP, 53), (DNS_IP, 53));
    assert!(!untranslated.is_dnat());
    assert_eq!(
        stale(&dns(), &[NODE], std::slice::from_ref(&untranslated)),
        vec![untranslated.clone()]
    );
    // Still no endpoints: nothing better to send it to, so it stays.
    let empty = family(vec![svc("dns", Protocol::Udp, DNS_IP, &[])]);
    assert!(stale(&empty, &[NODE], &[untranslated]).is_empty());
}

#[test]
fn dnated_flows_of_a_service_without_endpoints_are_deleted() {
    // The REJECT rule answers the next datagram instead of it vanishing into the old pod.
    let empty = family(vec![svc("dns", Protocol::Udp, DNS_IP, &[])]);
    let to_gone = udp((DNS_IP, 53), GONE);
    assert_eq!(
        stale(&empty, &[NODE], std::slice::from_ref(&to_gone)),
        vec![to_gone]
    );
}

#[test]
fn node_port_on_a_node_address() {
    let mut s = svc("dns", Protocol::Udp, DNS_IP, &[LIVE]);
    s.node_port = Some(30053);
    let state = family(vec![s]);
    let on_node_gone = udp((NODE, 30053), GONE);
    let on_node_live = udp((NODE, 30053), LIVE);
    let on_other_address = udp(("10.0.0.99", 30053), GONE);
    let on_loopback = udp(("127.0.0.1", 30053), GONE);
    let other_port = udp((NODE, 30054), GONE);
    let untranslated = udp((NODE, 30053), (NODE, 30053));
    let flows = [
        on_node_gone.clone(),
        on_node_live,
        on_other_address,
        on_loopback,
        other_port,
        untranslated.clone(),
    ];
    assert_eq!(
        stale(&state, &[NODE, "127.0.0.1", "fd00:10::11"], &flows),
        vec![on_node_gone.clone(), untranslated]
    );
    // Not a local address (here: none given), not a NodePort frontend.
    assert!(stale(&state, &[], &flows).is_empty());
    // --nodeport-addresses: only local addresses inside those CIDRs.
    let mut limited = state.clone();
    limited.nodeport_addresses = NodePortAddresses::Cidrs(vec!["10.0.0.0/24".parse().unwrap()]);
    assert_eq!(
        stale(
            &limited,
            &[NODE, "192.168.7.1"],
            &[on_node_gone.clone(), udp(("192.168.7.1", 30053), GONE)]
        ),
        vec![on_node_gone]
    );
}

#[test]
fn external_and_load_balancer_ips_are_frontends() {
    let mut s = svc("dns", Protocol::Udp, DNS_IP, &[LIVE]);
    s.external_ips = vec![ip("192.0.2.20")];
    s.load_balancer_ips = vec![ip("192.0.2.10")];
    let state = family(vec![s]);
    let ext = udp(("192.0.2.20", 53), GONE);
    let lb = udp(("192.0.2.10", 53), GONE);
    let lb_live = udp(("192.0.2.10", 53), LIVE);
    assert_eq!(
        stale(&state, &[NODE], &[ext.clone(), lb.clone(), lb_live]),
        vec![ext, lb]
    );
}

#[test]
fn external_frontends_follow_the_external_target() {
    // eTP Local without local endpoints: the external target is empty (DROP), so an
    // untranslated flow to the NodePort stays...
    let mut s = svc("dns", Protocol::Udp, DNS_IP, &[LIVE]);
    s.node_port = Some(30053);
    s.external = TrafficTarget {
        endpoints: Picks::default(),
        if_empty: EmptyVerdict::Drop,
    };
    s.external_policy = ExternalPolicy::Local {
        local_origin: TrafficTarget {
            endpoints: Picks::default(),
            if_empty: EmptyVerdict::Reject,
        },
    };
    let untranslated_np = udp((NODE, 30053), (NODE, 30053));
    let untranslated_cip = udp((DNS_IP, 53), (DNS_IP, 53));
    let flows = [untranslated_np.clone(), untranslated_cip.clone()];
    // ...while the ClusterIP's internal target has endpoints.
    assert_eq!(
        stale(&family(vec![s.clone()]), &[NODE], &flows),
        vec![untranslated_cip.clone()]
    );
    // Pods and the node itself reach it through local_origin: now it has endpoints too.
    s.external_policy = ExternalPolicy::Local {
        local_origin: target(1),
    };
    assert_eq!(
        stale(&family(vec![s]), &[NODE], &flows),
        vec![untranslated_np, untranslated_cip]
    );
}

#[test]
fn no_udp_service_means_nothing_to_dump() {
    let tcp_only = family(vec![svc("web", Protocol::Tcp, DNS_IP, &[LIVE])]);
    assert!(Frontends::new(&tcp_only, &[ip(NODE)]).is_empty());
    assert!(!Frontends::new(&dns(), &[ip(NODE)]).is_empty());
}

#[test]
fn disabled_reconciler_does_nothing() {
    let desired = DesiredState {
        node_name: "node-a".into(),
        node_zone: None,
        v4: dns(),
        v6: FamilyState::empty(IpFamily::V6),
        health_checks: Default::default(),
    };
    let report = Reconciler::new(ConntrackScope::Disabled).reconcile(&desired, None);
    assert_eq!(report.failures(), 0);
    assert_eq!(report.v4, FamilyOutcome::default());
}

#[test]
fn a_partial_sync_reconciles_the_ports_it_added_or_changed_only() {
    let dns_udp = svc("dns", Protocol::Udp, DNS_IP, &[LIVE]);
    let dns_tcp = svc("dns-tcp", Protocol::Tcp, "10.96.0.11", &[LIVE]);
    let other = svc("other", Protocol::Udp, "10.96.0.12", &[GONE]);
    let state = family(vec![dns_udp.clone(), dns_tcp.clone(), other.clone()]);
    let names = |ports: Vec<&ServicePortState>| -> Vec<String> {
        ports
            .iter()
            .map(|p| p.name.service.name.to_string())
            .collect()
    };
    // A full sync: every UDP/SCTP port.
    assert_eq!(names(reconciled_ports(&state, None)), ["dns", "other"]);
    let mut diff = Diff {
        previous: None,
        full: false,
        v4: Default::default(),
        v6: Default::default(),
    };
    // Nothing changed (the periodic check): nothing to dump.
    assert!(reconciled_ports(&state, Some(&diff)).is_empty());
    // A TCP port changed, a UDP one removed: still nothing.
    diff.v4.changed.insert(dns_tcp.name.clone());
    diff.v4
        .removed
        .insert(svc("gone", Protocol::Udp, "10.96.0.13", &[]).name);
    assert!(reconciled_ports(&state, Some(&diff)).is_empty());
    diff.v4.added.insert(other.name.clone());
    assert_eq!(names(reconciled_ports(&state, Some(&diff))), ["other"]);
    // Node-wide settings changed: NodePort frontends may have moved, every port.
    diff.v4.globals_changed = true;
    assert_eq!(
        names(reconciled_ports(&state, Some(&diff))),
        ["dns", "other"]
    );
}
