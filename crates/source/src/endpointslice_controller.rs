//! The standalone EndpointSlice controller: for a selector Service that has no
//! EndpointSlice in the manifests, derive slices from Pods the way the Kubernetes
//! EndpointSlice controller does (`k8s.io/endpointslice` reconciler, `podToEndpoint`).
//!
//! Deliberate differences from upstream: a Pod whose Node is not in the manifests is
//! kept (upstream skips it unless `publishNotReadyAddresses`), because standalone
//! manifests often carry no Node objects; slices get stable names instead of
//! `generateName`, and endpoints are sorted by IP so unchanged input yields identical
//! slices; no topology hints; sidecar (restartable init) container ports are not looked
//! up for named target ports, as the model keeps only `spec.containers` ports.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use svcplane_model::{
    Endpoint, EndpointPort, EndpointSlice, IpFamily, NamespacedName, Node, Pod, Protocol, Service,
    ServicePort, ServiceType, TargetPort, shared_ports,
};

/// Marker in derived slice names (`<service>-svcplane-<ipv4|ipv6>-<n>`), so they are
/// recognisable in `render` output and logs.
pub const DERIVED_SLICE_MARKER: &str = "svcplane";

/// Upstream's default `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// One resolved endpoint port: (service port name, protocol, port). Upstream groups
/// pods by their list of these (`NewPortMapKey`).
type PortKey = (Arc<str>, Protocol, u16);

/// Slices for every selector Service without a slice of its own. `slices` are the
/// slices given in the manifests; the result holds only derived ones, in a
/// deterministic order.
pub fn derive_endpoint_slices<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    pods: &[&'a Pod],
    nodes: &BTreeMap<String, &'a Node>,
) -> Vec<EndpointSlice> {
    let covered: BTreeSet<(&str, &str)> = slices
        .into_iter()
        .filter_map(|s| {
            s.service_name
                .as_deref()
                .map(|svc| (s.name.namespace.as_ref(), svc))
        })
        .collect();
    let mut out = Vec::new();
    for svc in services {
        if covered.contains(&(svc.name.namespace.as_ref(), svc.name.name.as_ref())) {
            continue;
        }
        out.extend(derive_for_service(svc, pods.iter().copied(), nodes));
    }
    out
}

/// The slices derived for one Service (which has no manifest slice of its own) from
/// `pods` (any; those of other namespaces or not selected are skipped): none for a
/// Service without selector or of type ExternalName.
pub fn derive_for_service<'a>(
    svc: &Service,
    pods: impl IntoIterator<Item = &'a Pod>,
    nodes: &BTreeMap<String, &Node>,
) -> Vec<EndpointSlice> {
    let Some(selector) = &svc.selector else {
        return Vec::new();
    };
    // Upstream: "services with Type ExternalName receive no endpoints from this controller".
    if svc.service_type == ServiceType::ExternalName {
        return Vec::new();
    }
    // `ShouldPodBeInEndpoints(pod, includeTerminating=true)`: not finished, has an IP.
    let members: Vec<&Pod> = pods
        .into_iter()
        .filter(|p| {
            p.name.namespace == svc.name.namespace
                && !p.finished
                && !p.ips.is_empty()
                && selects(selector, p)
        })
        .collect();
    slices_for_service(svc, &members, nodes)
}

/// Whether a Service's `selector` selects `pod` (same namespace assumed).
pub fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
}

/// Upstream `getAddressTypesForService`: spec.ipFamilies; without them the family of
/// the cluster IP, or both families for a headless Service.
fn address_families(svc: &Service) -> Vec<IpFamily> {
    if !svc.ip_families.is_empty() {
        return svc.ip_families.to_vec();
    }
    match svc.cluster_ips.first() {
        Some(ip) => vec![IpFamily::of(ip)],
        None if svc.headless => vec![IpFamily::V4, IpFamily::V6],
        None => vec![IpFamily::V4],
    }
}

fn slices_for_service(
    svc: &Service,
    pods: &[&Pod],
    nodes: &BTreeMap<String, &Node>,
) -> Vec<EndpointSlice> {
    let mut slices = Vec::new();
    for family in address_families(svc) {
        let mut groups: BTreeMap<Vec<PortKey>, Vec<Endpoint>> = BTreeMap::new();
        for pod in pods {
            // At most one IP per family (validated); a pod without one is not in this family's slices.
            let Some(ip) = pod.ips.iter().find(|ip| IpFamily::of(ip) == family) else {
                continue;
            };
            let ports: Vec<PortKey> = svc
                .ports
                .iter()
                .filter_map(|sp| {
                    find_port(pod, sp).map(|port| (sp.name.clone(), sp.protocol, port))
                })
                .collect();
            groups
                .entry(ports)
                .or_default()
                .push(pod_to_endpoint(pod, *ip, svc, nodes));
        }
        let mut index = 0;
        let mut push = |ports: &[PortKey], endpoints: Vec<Endpoint>| {
            slices.push(new_slice(svc, family, index, ports, endpoints));
            index += 1;
        };
        if groups.is_empty() {
            // Upstream keeps a placeholder slice (no ports, no endpoints) per family.
            push(&[], Vec::new());
        }
        for (ports, mut endpoints) in groups {
            endpoints.sort_by(|a, b| a.addresses().cmp(b.addresses()));
            let mut rest = endpoints.into_iter().peekable();
            while rest.peek().is_some() {
                push(
                    &ports,
                    rest.by_ref().take(MAX_ENDPOINTS_PER_SLICE).collect(),
                );
            }
        }
    }
    slices
}

fn new_slice(
    svc: &Service,
    family: IpFamily,
    index: usize,
    ports: &[PortKey],
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let family_name = match family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    };
    EndpointSlice {
        name: NamespacedName::new(
            svc.name.namespace.clone(),
            format!(
                "{}-{DERIVED_SLICE_MARKER}-{family_name}-{index}",
                svc.name.name
            ),
        ),
        service_name: Some(svc.name.name.clone()),
        address_family: Some(family),
        ports: shared_ports(
            &ports
                .iter()
                .map(|(name, protocol, port)| EndpointPort {
                    name: name.clone(),
                    protocol: *protocol,
                    port: *port,
                })
                .collect::<Vec<_>>(),
        ),
        endpoints: endpoints.into(),
        last_change_trigger_time: None,
    }
}

/// Upstream `findPort`: a number is used as is; a name is looked up among the pod's
/// container ports with the same protocol. `None` leaves the pod out of that port.
fn find_port(pod: &Pod, sp: &ServicePort) -> Option<u16> {
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
    ip: IpAddr,
    svc: &Service,
    nodes: &BTreeMap<String, &Node>,
) -> Endpoint {
    let serving = pod.ready;
    let terminating = pod.terminating;
    // "ready" is never true for a terminating pod, unless publishNotReadyAddresses is set;
    // serving stays the pod's readiness either way.
    let ready = svc.publish_not_ready_addresses || (serving && !terminating);
    let zone = pod
        .node_name
        .as_ref()
        .and_then(|n| nodes.get(n))
        .and_then(|n| n.zone.as_deref());
    // `ShouldSetHostname`: the pod's subdomain names this Service (same namespace: the
    // caller only passes pods of the Service's namespace).
    let hostname = match (&pod.hostname, &pod.subdomain) {
        (Some(h), Some(sub)) if !h.is_empty() && **sub == *svc.name.name => Some(h.as_str()),
        _ => None,
    };
    let mut endpoint = Endpoint::new(&[ip])
        .with_topology(pod.node_name.as_deref(), zone)
        .with_hostname(hostname);
    endpoint.ready = ready;
    endpoint.serving = serving;
    endpoint.terminating = terminating;
    endpoint
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
            ip_families: families.iter().copied().collect(),
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: target,
                node_port: None,
            }],
            session_affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            selector: Some([("app".to_string(), "web".to_string())].into()),
            publish_not_ready_addresses: false,
            headless_label: false,
            allocation: Default::default(),
            rare: Default::default(),
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
            *s.ports,
            [EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080
            }]
        );
        let conds: Vec<(IpAddr, bool, bool, bool)> = s
            .endpoints
            .iter()
            .map(|e| (e.addresses()[0], e.ready, e.serving, e.terminating))
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
                .all(|e| e.zone().map(|z| &**z) == Some("zone-a"))
        );
        assert!(
            s.endpoints
                .iter()
                .all(|e| e.node_name().map(|n| &**n) == Some("node-a"))
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
        assert_eq!(s.endpoints[0].zone(), None, "no Node object, no zone");
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
                s.endpoints.iter().map(|e| e.addresses()[0]).collect(),
            );
        }
        assert_eq!(by_port[&vec![8080]], vec![ip("10.244.0.1")]);
        assert_eq!(by_port[&vec![9090]], vec![ip("10.244.0.2")]);
        // Pods without the named port (or with it on another protocol) get no port at all.
        assert_eq!(by_port[&vec![]], vec![ip("10.244.0.3"), ip("10.244.0.4")]);
        let names: BTreeSet<&str> = slices.iter().map(|s| s.name.name.as_ref()).collect();
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
        assert_eq!(v6.endpoints[0].addresses(), [ip("fd00::1")]);
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
            ports: Arc::new([]),
            endpoints: Box::new([]),
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
        assert_eq!(s.endpoints[0].hostname().map(|h| &**h), Some("a"));
        assert_eq!(s.endpoints[1].hostname(), None);
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

    #[test]
    fn no_matching_pods_gives_one_placeholder_per_family() {
        let svc = service(
            "web",
            &[IpFamily::V4, IpFamily::V6],
            TargetPort::Number(8080),
        );
        // Only IPv4 pods: the IPv6 side gets a placeholder, as upstream.
        let pods = vec![pod("a", &["10.244.0.1"], true, false)];
        let slices = derive(std::slice::from_ref(&svc), &[], &pods, &[]);
        let v6: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| s.address_family == Some(IpFamily::V6))
            .collect();
        assert_eq!(v6.len(), 1);
        assert!(v6[0].endpoints.is_empty() && v6[0].ports.is_empty());
        assert_eq!(&*v6[0].name.name, "web-svcplane-ipv6-0");

        let slices = derive(&[svc], &[], &[], &[]);
        assert_eq!(slices.len(), 2);
        assert!(
            slices
                .iter()
                .all(|s| s.endpoints.is_empty() && s.service_name.as_deref() == Some("web"))
        );
    }

    #[test]
    fn large_groups_are_split_at_max_endpoints_per_slice() {
        let svc = service("web", &[IpFamily::V4], TargetPort::Number(8080));
        let pods: Vec<Pod> = (0..250u32)
            .map(|i| {
                let ip = format!("10.244.{}.{}", i / 200, i % 200 + 1);
                pod(&format!("p{i}"), &[ip.as_str()], true, false)
            })
            .collect();
        let slices = derive(&[svc], &[], &pods, &[]);
        let sizes: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
        let names: BTreeSet<&str> = slices.iter().map(|s| s.name.name.as_ref()).collect();
        assert_eq!(names.len(), 3);
        let all: BTreeSet<IpAddr> = slices
            .iter()
            .flat_map(|s| s.endpoints.iter().map(|e| e.addresses()[0]))
            .collect();
        assert_eq!(all.len(), 250, "every pod exactly once");
    }

    #[test]
    fn families_without_ip_families_follow_upstream() {
        // No spec.ipFamilies: the cluster IP's family.
        let mut v6 = service("v6", &[], TargetPort::Number(8080));
        v6.cluster_ips = vec![ip("fd00:96::1")];
        // Headless without families: both.
        let mut headless = service("headless", &[], TargetPort::Number(8080));
        headless.cluster_ips = vec![];
        headless.headless = true;
        let pods = vec![pod("a", &["10.244.0.1", "fd00:244::1"], true, false)];
        let slices = derive(&[v6, headless], &[], &pods, &[]);
        let families = |svc: &str| -> Vec<Option<IpFamily>> {
            slices
                .iter()
                .filter(|s| s.service_name.as_deref() == Some(svc))
                .map(|s| s.address_family)
                .collect()
        };
        assert_eq!(families("v6"), vec![Some(IpFamily::V6)]);
        assert_eq!(
            families("headless"),
            vec![Some(IpFamily::V4), Some(IpFamily::V6)]
        );
    }

    #[test]
    fn other_namespaces_and_external_name_are_not_used() {
        let svc = service("web", &[IpFamily::V4], TargetPort::Number(8080));
        let mut elsewhere = pod("a", &["10.244.0.1"], true, false);
        elsewhere.name.namespace = "other".into();
        let slices = derive(std::slice::from_ref(&svc), &[], &[elsewhere], &[]);
        assert!(slices.iter().all(|s| s.endpoints.is_empty()), "{slices:?}");

        let mut external = svc;
        external.service_type = ServiceType::ExternalName;
        let pods = vec![pod("b", &["10.244.0.2"], true, false)];
        assert!(derive(&[external], &[], &pods, &[]).is_empty());
    }

    #[test]
    fn multiple_ports_keep_names_and_protocols() {
        let mut svc = service("dns", &[IpFamily::V4], TargetPort::Number(53));
        svc.ports[0].name = "dns".into();
        svc.ports.push(ServicePort {
            name: "dns-tcp".into(),
            protocol: Protocol::Tcp,
            port: 53,
            target_port: TargetPort::Name("dns-tcp".into()),
            node_port: None,
        });
        svc.ports[0].protocol = Protocol::Udp;
        let mut p = pod("a", &["10.244.0.1"], true, false);
        p.container_ports = vec![ContainerPort {
            name: Some("dns-tcp".into()),
            port: 5353,
            protocol: Protocol::Tcp,
        }];
        let slices = derive(&[svc], &[], &[p], &[]);
        assert_eq!(slices.len(), 1);
        assert_eq!(
            *slices[0].ports,
            [
                EndpointPort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53
                },
                EndpointPort {
                    name: "dns-tcp".into(),
                    protocol: Protocol::Tcp,
                    port: 5353
                },
            ]
        );
    }

    #[test]
    fn zone_comes_from_the_pods_node_and_unknown_nodes_keep_the_pod() {
        let svc = service("web", &[IpFamily::V4], TargetPort::Number(8080));
        let mut on_b = pod("b", &["10.244.0.2"], true, false);
        on_b.node_name = Some("node-b".into());
        let mut unknown = pod("c", &["10.244.0.3"], true, false);
        unknown.node_name = Some("node-x".into());
        let pods = vec![pod("a", &["10.244.0.1"], true, false), on_b, unknown];
        let nodes = [node("node-a", "zone-a"), node("node-b", "zone-b")];
        let s = &derive(&[svc], &[], &pods, &nodes)[0];
        let zones: Vec<Option<&str>> = s.endpoints.iter().map(|e| e.zone().map(|z| &**z)).collect();
        assert_eq!(zones, vec![Some("zone-a"), Some("zone-b"), None]);
        assert_eq!(s.endpoints[2].node_name().map(|n| &**n), Some("node-x"));
    }
}
