//! Builders for model objects in tests.

use std::collections::BTreeMap;
use std::net::IpAddr;

use svcplane_model::{
    Endpoint, EndpointPort, EndpointSlice, IpFamily, NamespacedName, Node, Protocol, Service,
    ServicePort, ServiceType, TargetPort, TrafficPolicy,
};

pub const NODE: &str = "node-a";

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
    ServicePort {
        name: name.into(),
        protocol,
        port,
        target_port: TargetPort::Number(port),
        node_port: None,
    }
}

/// A ClusterIP service `ns/name` with one unnamed TCP port 80 and the given cluster IPs.
pub fn service(ns: &str, name: &str, cluster_ips: &[&str]) -> Service {
    let cluster_ips: Vec<IpAddr> = cluster_ips.iter().map(|s| ip(s)).collect();
    Service {
        name: NamespacedName::new(ns, name),
        service_type: ServiceType::ClusterIp,
        ip_families: cluster_ips.iter().map(IpFamily::of).collect(),
        cluster_ips,
        headless: false,
        ports: vec![port("", Protocol::Tcp, 80)],
        session_affinity_timeout: None,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        selector: Some(BTreeMap::new()),
        publish_not_ready_addresses: false,
        headless_label: false,
        allocation: Default::default(),
        rare: Default::default(),
    }
}

/// A LoadBalancer service with nodePort 30080 on its single port.
pub fn lb_service(ns: &str, name: &str, cluster_ips: &[&str]) -> Service {
    let mut svc = service(ns, name, cluster_ips);
    svc.service_type = ServiceType::LoadBalancer;
    svc.ports[0].node_port = Some(30080);
    svc
}

/// A ready endpoint on `node`.
pub fn ep(addr: &str, node: &str) -> Endpoint {
    Endpoint::new(&[ip(addr)]).with_topology(Some(node), None)
}

pub fn not_ready(mut e: Endpoint) -> Endpoint {
    e.ready = false;
    e.serving = false;
    e
}

/// Terminating; `serving` says whether it still passes its readiness probe.
pub fn terminating(mut e: Endpoint, serving: bool) -> Endpoint {
    e.ready = false;
    e.serving = serving;
    e.terminating = true;
    e
}

pub fn zone_hints(e: Endpoint, zones: &[&str]) -> Endpoint {
    let mut h = e.hints().cloned().unwrap_or_default();
    h.for_zones = zones.iter().map(|z| z.to_string()).collect();
    e.with_hints(Some(h))
}

pub fn node_hints(e: Endpoint, nodes: &[&str]) -> Endpoint {
    let mut h = e.hints().cloned().unwrap_or_default();
    h.for_nodes = nodes.iter().map(|z| z.to_string()).collect();
    e.with_hints(Some(h))
}

/// A slice `ns/slice` of `svc` with one unnamed TCP port.
pub fn slice(
    ns: &str,
    slice: &str,
    svc: &str,
    target_port: u16,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let family = endpoints
        .first()
        .and_then(|e| e.addresses().first())
        .map_or(IpFamily::V4, IpFamily::of);
    EndpointSlice {
        name: NamespacedName::new(ns, slice),
        service_name: Some(svc.into()),
        address_family: Some(family),
        ports: vec![EndpointPort {
            name: "".into(),
            protocol: Protocol::Tcp,
            port: target_port,
        }]
        .into(),
        endpoints: endpoints.into(),
        last_change_trigger_time: None,
    }
}

pub fn node(name: &str, zone: Option<&str>, addresses: &[&str]) -> Node {
    Node {
        name: name.to_string(),
        zone: zone.map(str::to_string),
        addresses: addresses.iter().map(|a| ip(a)).collect(),
        labels: BTreeMap::new(),
    }
}
