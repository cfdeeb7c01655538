//! The standalone EndpointSlice controller: for a selector Service that has no
//! EndpointSlice in the manifests, derive slices from Pods the way the Kubernetes
//! EndpointSlice controller does (`pkg/controller/endpointslice`, `podToEndpoint`).

use std::collections::{BTreeMap, BTreeSet};

use svcplane_model::{
    Endpoint, EndpointPort, EndpointSlice, IpFamily, NamespacedName, Node, Pod, Service,
    ServiceType, TargetPort,
};

/// Suffix of derived slice names, so they are recognisable in `render` output and logs.
pub const DERIVED_SLICE_MARKER: &str = "svcplane";

/// Slices for every selector Service without a slice of its own. `slices` are the
/// slices given in the manifests; the result holds only derived ones.
pub fn derive_endpoint_slices<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    pods: &[&'a Pod],
    nodes: &BTreeMap<String, &'a Node>,
) -> Vec<EndpointSlice> {
    let covered: BTreeSet<(String, String)> = slices
        .into_iter()
        .filter_map(|s| {
            s.service_name
                .as_ref()
                .map(|svc| (s.name.namespace.clone(), svc.clone()))
        })
        .collect();
    let mut out = Vec::new();
    for svc in services {
        let Some(selector) = &svc.selector else {
            continue;
        };
        if svc.service_type == ServiceType::ExternalName
            || covered.contains(&(svc.name.namespace.clone(), svc.name.name.clone()))
        {
            continue;
        }
        let members: Vec<&Pod> = pods
            .iter()
            .copied()
            .filter(|p| {
                p.name.namespace == svc.name.namespace
                    && !p.finished
                    && !p.ips.is_empty()
                    && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            })
            .collect();
        out.extend(slices_for_service(svc, &members, nodes));
    }
    out
}

fn slices_for_service(
    svc: &Service,
    pods: &[&Pod],
    nodes: &BTreeMap<String, &Node>,
) -> Vec<EndpointSlice> {
    let families: Vec<IpFamily> = if svc.ip_families.is_empty() {
        vec![IpFamily::V4]
    } else {
        svc.ip_families.clone()
    };
    let mut slices = Vec::new();
    for family in families {
        // Upstream groups endpoints by their resolved port list: one slice per port set.
        let mut groups: BTreeMap<Vec<(String, u16)>, Vec<Endpoint>> = BTreeMap::new();
        for pod in pods {
            let Some(ip) = pod.ips.iter().find(|ip| IpFamily::of(ip) == family) else {
                continue;
            };
            let ports: Vec<(String, u16)> = svc
                .ports
                .iter()
                .filter_map(|sp| resolve_target_port(pod, sp).map(|n| (sp.name.clone(), n)))
                .collect();
            groups
                .entry(ports)
                .or_default()
                .push(pod_to_endpoint(pod, *ip, svc, nodes));
        }
        for (index, (ports, mut endpoints)) in groups.into_iter().enumerate() {
            endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
            let ports = ports
                .into_iter()
                .map(|(name, port)| EndpointPort {
                    protocol: svc
                        .ports
                        .iter()
                        .find(|sp| sp.name == name)
                        .map(|sp| sp.protocol)
                        .unwrap_or(svcplane_model::Protocol::Tcp),
                    name,
                    port,
                })
                .collect();
            let family_name = match family {
                IpFamily::V4 => "ipv4",
                IpFamily::V6 => "ipv6",
            };
            slices.push(EndpointSlice {
                name: NamespacedName::new(
                    svc.name.namespace.clone(),
                    format!(
                        "{}-{DERIVED_SLICE_MARKER}-{family_name}-{index}",
                        svc.name.name
                    ),
                ),
                service_name: Some(svc.name.name.clone()),
                address_family: Some(family),
                ports,
                endpoints,
                last_change_trigger_time: None,
            });
        }
    }
    slices
}

/// `podutil.FindPort`: a number is used as is; a name is looked up among the pod's
/// container ports with the same protocol. `None` leaves the pod out of that port.
fn resolve_target_port(pod: &Pod, sp: &svcplane_model::ServicePort) -> Option<u16> {
    match &sp.target_port {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => pod
            .container_ports
            .iter()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()) && cp.protocol == sp.protocol)
            .map(|cp| cp.port),
    }
}

/// Upstream `podToEndpoint`.
fn pod_to_endpoint(
    pod: &Pod,
    ip: std::net::IpAddr,
    svc: &Service,
    nodes: &BTreeMap<String, &Node>,
) -> Endpoint {
    let serving = pod.ready;
    let terminating = pod.terminating;
    // "ready" is never true for a terminating pod, unless publishNotReadyAddresses is set.
    let ready = svc.publish_not_ready_addresses || (serving && !terminating);
    let zone = pod
        .node_name
        .as_ref()
        .and_then(|n| nodes.get(n))
        .and_then(|n| n.zone.clone());
    let hostname = match (&pod.hostname, &pod.subdomain) {
        (Some(h), Some(sub)) if !h.is_empty() && *sub == svc.name.name => Some(h.clone()),
        _ => None,
    };
    Endpoint {
        addresses: vec![ip],
        ready,
        serving,
        terminating,
        hostname,
        node_name: pod.node_name.clone(),
        zone,
        hints: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use svcplane_model::{ContainerPort, Protocol, ServicePort, TrafficPolicy};

    fn service(name: &str, families: &[IpFamily], target: TargetPort) -> Service {
        Service {
            name: NamespacedName::new("demo", name),
            service_type: ServiceType::ClusterIp,
            cluster_ips: vec!["10.96.0.1".parse().unwrap()],
            headless: false,
            ip_families: families.to_vec(),
            external_name: None,
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: target,
                node_port: None,
            }],
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            session_affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            selector: Some([("app".to_string(), "web".to_string())].into()),
            publish_not_ready_addresses: false,
            service_proxy_name: None,
            labels: Default::default(),
        }
    }

    fn pod(name: &str, ips: &[&str], ready: bool, terminating: bool) -> Pod {
        Pod {
            name: NamespacedName::new("demo", name),
            labels: [("app".to_string(), "web".to_string())].into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            node_name: Some("node-a".into()),
            ready,
            terminating,
            finished: false,
            hostname: None,
            subdomain: None,
            container_ports: vec![ContainerPort {
                name: Some("web".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        }
    }

    fn node(name: &str, zone: &str) -> Node {
        Node {
            name: name.into(),
            zone: Some(zone.into()),
            addresses: vec![],
            labels: Default::default(),
        }
    }

    fn derive(
        svcs: &[Service],
        slices: &[EndpointSlice],
        pods: &[Pod],
        nodes: &[Node],
    ) -> Vec<EndpointSlice> {
        let pods: Vec<&Pod> = pods.iter().collect();
        let nodes: BTreeMap<String, &Node> = nodes.iter().map(|n| (n.name.clone(), n)).collect();
        derive_endpoint_slices(svcs, slices, &pods, &nodes)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn selector_matches_and_conditions_follow_upstream() {
        let svc = service("web", &[IpFamily::V4], TargetPort::Number(8080));
        let mut other = pod("other", &["10.244.0.9"], true, false);
        other.labels.insert("app".into(), "db".into());
        let mut finished = pod("done", &["10.244.0.8"], true, false);
        finished.finished = true;
        let pods = vec![
            pod("ready", &["10.244.0.1"], true, false),
            pod("notready", &["10.244.0.2"], false, false),
            pod("term-serving", &["10.244.0.3"], true, true),
            pod("term-gone", &["10.244.0.4"], false, true),
            pod("no-ip", &[], true, false),
            other,
            finished,
        ];
        let slices = derive(&[svc], &[], &pods, &[node("node-a", "zone-a")]);
        assert_eq!(slices.len(), 1);
        let s = &slices[0];
        assert_eq!(s.service_name.as_deref(), Some("web"));
        assert_eq!(s.address_family, Some(IpFamily::V4));
        assert_eq!(
            s.ports,
            vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080
            }]
        );
        let conds: Vec<(IpAddr, bool, bool, bool)> = s
            .endpoints
            .iter()
            .map(|e| (e.addresses[0], e.ready, e.serving, e.terminating))
            .collect();
        assert_eq!(
            conds,
            vec![
                (ip("10.244.0.1"), true, true, false),
                (ip("10.244.0.2"), false, false, false),
                (ip("10.244.0.3"), false, true, true),
                (ip("10.244.0.4"), false, false, true),
            ]
        );
        assert!(
            s.endpoints
                .iter()
                .all(|e| e.zone.as_deref() == Some("zone-a"))
        );
        assert!(
            s.endpoints
                .iter()
                .all(|e| e.node_name.as_deref() == Some("node-a"))
        );
    }

    #[test]
    fn publish_not_ready_addresses_makes_everything_ready() {
        let mut svc = service("web", &[IpFamily::V4], TargetPort::Number(8080));
        svc.publish_not_ready_addresses = true;
        let pods = vec![
            pod("notready", &["10.244.0.2"], false, false),
            pod("term", &["10.244.0.3"], false, true),
        ];
        let s = &derive(&[svc], &[], &pods, &[])[0];
        assert!(s.endpoints.iter().all(|e| e.ready));
        assert!(s.endpoints.iter().all(|e| !e.serving));
        assert!(s.endpoints[1].terminating);
        assert_eq!(s.endpoints[0].zone, None, "no Node object, no zone");
    }

    #[test]
    fn named_target_port_resolves_per_pod_and_groups_by_port_set() {
        let svc = service("web", &[IpFamily::V4], TargetPort::Name("web".into()));
        let mut other_port = pod("b", &["10.244.0.2"], true, false);
        other_port.container_ports[0].port = 9090;
        let mut missing = pod("c", &["10.244.0.3"], true, false);
        missing.container_ports.clear();
        let mut udp = pod("d", &["10.244.0.4"], true, false);
        udp.container_ports[0].protocol = Protocol::Udp;
        let pods = vec![
            pod("a", &["10.244.0.1"], true, false),
            other_port,
            missing,
            udp,
        ];
        let slices = derive(&[svc], &[], &pods, &[]);
        let mut by_port: BTreeMap<Vec<u16>, Vec<IpAddr>> = BTreeMap::new();
        for s in &slices {
            by_port.insert(
                s.ports.iter().map(|p| p.port).collect(),
                s.endpoints.iter().map(|e| e.addresses[0]).collect(),
            );
        }
        assert_eq!(by_port[&vec![8080]], vec![ip("10.244.0.1")]);
        assert_eq!(by_port[&vec![9090]], vec![ip("10.244.0.2")]);
        // Pods without the named port (or with it on another protocol) get no port at all.
        assert_eq!(by_port[&vec![]], vec![ip("10.244.0.3"), ip("10.244.0.4")]);
        let names: BTreeSet<&str> = slices.iter().map(|s| s.name.name.as_str()).collect();
        assert_eq!(names.len(), 3, "slice names are unique: {names:?}");
    }

    #[test]
    fn dual_stack_gets_one_slice_per_family() {
        let svc = service(
            "web",
            &[IpFamily::V4, IpFamily::V6],
            TargetPort::Number(8080),
        );
        let pods = vec![
            pod("a", &["10.244.0.1", "fd00::1"], true, false),
            pod("v4only", &["10.244.0.2"], true, false),
        ];
        let slices = derive(&[svc], &[], &pods, &[]);
        assert_eq!(slices.len(), 2);
        let v4 = slices
            .iter()
            .find(|s| s.address_family == Some(IpFamily::V4))
            .unwrap();
        let v6 = slices
            .iter()
            .find(|s| s.address_family == Some(IpFamily::V6))
            .unwrap();
        assert_eq!(v4.endpoints.len(), 2);
        assert_eq!(v6.endpoints.len(), 1);
        assert_eq!(v6.endpoints[0].addresses, vec![ip("fd00::1")]);
    }

    #[test]
    fn services_with_slices_or_without_selector_are_left_alone() {
        let with_slice = service("web", &[IpFamily::V4], TargetPort::Number(8080));
        let mut no_selector = service("manual", &[IpFamily::V4], TargetPort::Number(8080));
        no_selector.selector = None;
        let explicit = EndpointSlice {
            name: NamespacedName::new("demo", "web-abc"),
            service_name: Some("web".into()),
            address_family: Some(IpFamily::V4),
            ports: vec![],
            endpoints: vec![],
            last_change_trigger_time: None,
        };
        let pods = vec![pod("a", &["10.244.0.1"], true, false)];
        assert!(derive(&[with_slice, no_selector], &[explicit], &pods, &[]).is_empty());
    }

    #[test]
    fn hostname_only_when_subdomain_is_the_service() {
        let svc = service("web", &[IpFamily::V4], TargetPort::Number(8080));
        let mut a = pod("a", &["10.244.0.1"], true, false);
        a.hostname = Some("a".into());
        a.subdomain = Some("web".into());
        let mut b = pod("b", &["10.244.0.2"], true, false);
        b.hostname = Some("b".into());
        b.subdomain = Some("other".into());
        let s = &derive(&[svc], &[], &[a, b], &[])[0];
        assert_eq!(s.endpoints[0].hostname.as_deref(), Some("a"));
        assert_eq!(s.endpoints[1].hostname, None);
    }

    #[test]
    fn output_is_deterministic() {
        let svc = service("web", &[IpFamily::V4], TargetPort::Number(8080));
        let pods = vec![
            pod("b", &["10.244.0.2"], true, false),
            pod("a", &["10.244.0.1"], true, false),
        ];
        let mut reversed = pods.clone();
        reversed.reverse();
        assert_eq!(
            derive(std::slice::from_ref(&svc), &[], &pods, &[]),
            derive(&[svc], &[], &reversed, &[])
        );
    }
}
