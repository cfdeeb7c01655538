//! Per-service computation: one Service plus its EndpointSlices → the `ServicePortState`s of
//! each IP family. Pure functions (no cache, no change tracking), mirroring kube-proxy's
//! `serviceport.go` (`newBaseServiceInfo`), `endpointslicecache.go` (merging slices) and
//! `topology.go` (`CategorizeEndpoints`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use svcplane_model::{
    EndpointSlice, IpFamily, Protocol, Service, ServicePort, ServicePortName, ServiceType,
    TrafficPolicy,
};

use crate::desired::{
    EmptyVerdict, EndpointState, ExternalPolicy, ServicePortState, TrafficTarget,
};

/// Label kube-proxy's informers exclude (`!service.kubernetes.io/headless`).
pub(crate) const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// What the node contributes to the per-service decisions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodeContext<'a> {
    pub node_name: &'a str,
    /// This node's zone; `None` (or empty) disables zone hints, as in kube-proxy.
    pub zone: Option<&'a str>,
}

/// Everything one Service yields.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ServiceOutput {
    pub v4: Vec<ServicePortState>,
    pub v6: Vec<ServicePortState>,
    /// `(healthCheckNodePort, local ready endpoints)` for LoadBalancer services with eTP Local.
    pub health_check: Option<(u16, usize)>,
}

impl ServiceOutput {
    pub fn family_mut(&mut self, family: IpFamily) -> &mut Vec<ServicePortState> {
        match family {
            IpFamily::V4 => &mut self.v4,
            IpFamily::V6 => &mut self.v6,
        }
    }
}

/// kube-proxy ignores these Services entirely: `ShouldSkipService` (headless, ExternalName) and
/// the informer's label selector (`service-proxy-name` set, `service.kubernetes.io/headless`).
pub(crate) fn should_skip(svc: &Service) -> bool {
    svc.headless
        || svc.service_type == ServiceType::ExternalName
        || svc.service_proxy_name.is_some()
        || svc.labels.contains_key(LABEL_HEADLESS)
}

/// The Service's ClusterIP of `family` (kube-proxy's `GetClusterIPByFamily`).
fn cluster_ip_of(svc: &Service, family: IpFamily) -> Option<IpAddr> {
    svc.cluster_ips
        .iter()
        .copied()
        .find(|ip| IpFamily::of(ip) == family)
}

/// One endpoint of a service port before categorization, with its hints.
#[derive(Debug, Clone)]
struct RawEndpoint<'a> {
    state: EndpointState,
    zone_hints: &'a [String],
    node_hints: &'a [String],
}

impl RawEndpoint<'_> {
    /// kube-proxy's duplicate rule (endpointslicecache.go `addEndpoints`): a non-terminating
    /// endpoint replaces a terminating one (an IP reused by a new pod while the old one
    /// terminates). Beyond upstream (whose order is Go map order, i.e. undefined), a ready one
    /// replaces a not-ready one; otherwise the first seen (slice-name order) stays.
    fn beats(&self, existing: &RawEndpoint<'_>) -> bool {
        let rank = |e: &RawEndpoint<'_>| (!e.state.terminating, e.state.ready);
        rank(self) > rank(existing)
    }
}

type PortKey = (String, Protocol);
type MergedEndpoints<'a> = BTreeMap<PortKey, BTreeMap<(IpAddr, u16), RawEndpoint<'a>>>;

/// Merge the slices of one family into endpoints per slice port (name, protocol), deduplicated
/// by (ip, port). `slices` must be in a stable order (by slice name).
fn merge_slices<'a>(
    slices: &[&'a EndpointSlice],
    family: IpFamily,
    node_name: &str,
) -> MergedEndpoints<'a> {
    let mut merged: MergedEndpoints<'a> = BTreeMap::new();
    for slice in slices {
        if slice.address_family != Some(family) {
            continue;
        }
        for port in &slice.ports {
            // kube-proxy ignores ports without a number ("all ports" is not implemented).
            if port.port == 0 {
                continue;
            }
            let set = merged
                .entry((port.name.clone(), port.protocol))
                .or_default();
            for ep in &slice.endpoints {
                // kube-proxy uses addresses[0] only, and only when it is of the slice's family.
                let Some(&ip) = ep.addresses.first() else {
                    continue;
                };
                if IpFamily::of(&ip) != family {
                    continue;
                }
                let hints = ep.hints.as_ref();
                let raw = RawEndpoint {
                    state: EndpointState {
                        ip,
                        port: port.port,
                        is_local: !node_name.is_empty()
                            && ep.node_name.as_deref() == Some(node_name),
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        node_name: ep.node_name.clone(),
                        zone: ep.zone.clone(),
                        hostname: ep.hostname.clone(),
                    },
                    zone_hints: hints.map_or(&[][..], |h| h.for_zones.as_slice()),
                    node_hints: hints.map_or(&[][..], |h| h.for_nodes.as_slice()),
                };
                match set.entry((ip, port.port)) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(raw);
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        if raw.beats(o.get()) {
                            o.insert(raw);
                        }
                    }
                }
            }
        }
    }
    merged
}

/// kube-proxy's `LocalReadyEndpoints` for one family: distinct IPs of local ready endpoints
/// over every port of the service's endpoints map.
fn local_ready_ips(merged: &MergedEndpoints<'_>) -> usize {
    merged
        .values()
        .flat_map(|set| set.values())
        .filter(|e| e.state.is_local && e.state.ready)
        .map(|e| e.state.ip)
        .collect::<BTreeSet<_>>()
        .len()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    None,
    PreferSameZone,
    PreferSameNode,
}

/// `topologyModeFromHints` (PreferSameTrafficDistribution enabled, as by default since 1.34):
/// only ready endpoints are considered; node hints win when every ready endpoint has one and
/// one names this node; else zone hints when every ready endpoint has one and one names this
/// node's zone; else hints are ignored.
fn topology_mode(endpoints: &[RawEndpoint<'_>], ctx: &NodeContext<'_>) -> TopologyMode {
    let zone = ctx.zone.unwrap_or("");
    let mut all_node_hints = true;
    let mut for_node = false;
    let mut all_zone_hints = true;
    let mut for_zone = false;
    for ep in endpoints.iter().filter(|e| e.state.ready) {
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.iter().any(|n| n == ctx.node_name) {
            for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if !zone.is_empty() && ep.zone_hints.iter().any(|z| z == zone) {
            for_zone = true;
        }
    }
    if all_node_hints && for_node {
        TopologyMode::PreferSameNode
    } else if all_zone_hints && for_zone {
        TopologyMode::PreferSameZone
    } else {
        TopologyMode::None
    }
}

fn available_for_topology(ep: &RawEndpoint<'_>, mode: TopologyMode, ctx: &NodeContext<'_>) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => ep.node_hints.iter().any(|n| n == ctx.node_name),
        TopologyMode::PreferSameZone => {
            let zone = ctx.zone.unwrap_or("");
            ep.zone_hints.iter().any(|z| z == zone)
        }
    }
}

/// Result of `CategorizeEndpoints`, as indices into the endpoint list it was given.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Categorized {
    cluster: Vec<usize>,
    local: Vec<usize>,
    has_any: bool,
}

/// kube-proxy's `CategorizeEndpoints` (topology.go).
fn categorize(
    endpoints: &[RawEndpoint<'_>],
    uses_cluster: bool,
    uses_local: bool,
    ctx: &NodeContext<'_>,
) -> Categorized {
    let pick = |pred: &dyn Fn(&RawEndpoint<'_>) -> bool| -> Vec<usize> {
        endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| pred(e))
            .map(|(i, _)| i)
            .collect()
    };
    let mut out = Categorized::default();
    if uses_cluster {
        let mode = topology_mode(endpoints, ctx);
        out.cluster = pick(&|e| e.state.ready && available_for_topology(e, mode, ctx));
        // No ready endpoint anywhere: fall back to serving-terminating ones, topology ignored.
        if out.cluster.is_empty() {
            out.cluster = pick(&|e| e.state.serving && e.state.terminating);
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !uses_local {
        return out;
    }
    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for e in endpoints {
        if e.state.ready {
            out.has_any = true;
            local_ready |= e.state.is_local;
        } else if e.state.serving && e.state.terminating {
            out.has_any = true;
            local_serving_terminating |= e.state.is_local;
        }
    }
    if local_ready {
        out.local = pick(&|e| e.state.is_local && e.state.ready);
    } else if local_serving_terminating {
        out.local = pick(&|e| e.state.is_local && e.state.serving && e.state.terminating);
    }
    out
}

fn of_family<T: Copy>(items: &[T], family: IpFamily, family_of: impl Fn(&T) -> IpFamily) -> Vec<T> {
    items
        .iter()
        .copied()
        .filter(|i| family_of(i) == family)
        .collect()
}

/// Compute every `ServicePortState` of `svc` (all families) and its health check.
/// `slices` are the service's EndpointSlices (same namespace, `service_name` = the Service's
/// name), in slice-name order.
pub(crate) fn compute_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    ctx: &NodeContext<'_>,
) -> ServiceOutput {
    let mut out = ServiceOutput::default();
    if should_skip(svc) {
        return out;
    }
    let mut local_ready_max: Option<usize> = None;
    for family in [IpFamily::V4, IpFamily::V6] {
        let Some(cluster_ip) = cluster_ip_of(svc, family) else {
            continue;
        };
        let merged = merge_slices(slices, family, ctx.node_name);
        let local_ready = local_ready_ips(&merged);
        local_ready_max = Some(local_ready_max.map_or(local_ready, |m| m.max(local_ready)));
        let states = out.family_mut(family);
        for port in &svc.ports {
            states.push(compute_port(svc, port, family, cluster_ip, &merged, ctx));
        }
    }
    // kube-proxy's NeedsHealthCheck: type LoadBalancer with eTP Local (and a port allocated).
    if let (Some(hc_port), Some(count)) = (needs_health_check(svc), local_ready_max) {
        out.health_check = Some((hc_port, count));
    }
    out
}

fn needs_health_check(svc: &Service) -> Option<u16> {
    if svc.service_type == ServiceType::LoadBalancer
        && svc.external_traffic_policy == TrafficPolicy::Local
    {
        svc.health_check_node_port.filter(|&p| p != 0)
    } else {
        None
    }
}

/// kube-proxy's `apiservice.ExternalPolicyLocal`: eTP Local on a Service that can receive
/// external traffic at all (by type or externalIPs of any family).
fn external_policy_local(svc: &Service) -> bool {
    let externally_typed = matches!(
        svc.service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    ) || !svc.external_ips.is_empty();
    externally_typed && svc.external_traffic_policy == TrafficPolicy::Local
}

fn compute_port(
    svc: &Service,
    port: &ServicePort,
    family: IpFamily,
    cluster_ip: IpAddr,
    merged: &MergedEndpoints<'_>,
    ctx: &NodeContext<'_>,
) -> ServicePortState {
    let name = ServicePortName {
        service: svc.name.clone(),
        port: port.name.clone(),
        protocol: port.protocol,
    };
    let node_port = match svc.service_type {
        ServiceType::NodePort | ServiceType::LoadBalancer => port.node_port.filter(|&p| p != 0),
        ServiceType::ClusterIp | ServiceType::ExternalName => None,
    };
    let external_ips = of_family(&svc.external_ips, family, IpFamily::of);
    let load_balancer_ips = if svc.service_type == ServiceType::LoadBalancer {
        of_family(&svc.load_balancer_ips, family, IpFamily::of)
    } else {
        Vec::new()
    };
    // As kube-proxy: ranges are filtered by family; when none is of this family the list is
    // empty, i.e. this family's LoadBalancer IPs are open to every source.
    let load_balancer_source_ranges =
        of_family(&svc.load_balancer_source_ranges, family, IpFamily::of_net);

    // ServicePort.ExternallyAccessible: per port and family, by what is actually exposed.
    let externally_accessible =
        node_port.is_some() || !load_balancer_ips.is_empty() || !external_ips.is_empty();
    let internal_local = svc.internal_traffic_policy == TrafficPolicy::Local;
    let external_local = external_policy_local(svc) && externally_accessible;
    let uses_cluster = !internal_local || externally_accessible;
    let uses_local = internal_local || external_local;

    let raw: Vec<RawEndpoint<'_>> = merged
        .get(&(port.name.clone(), port.protocol))
        .map(|set| set.values().cloned().collect())
        .unwrap_or_default();
    let cat = categorize(&raw, uses_cluster, uses_local, ctx);

    // Keep only endpoints some target uses (kube-proxy's allReachableEndpoints), re-indexed.
    let used: BTreeSet<usize> = cat.cluster.iter().chain(&cat.local).copied().collect();
    let remap: BTreeMap<usize, usize> = used
        .iter()
        .enumerate()
        .map(|(new, &old)| (old, new))
        .collect();
    let endpoints: Vec<EndpointState> = used.iter().map(|&i| raw[i].state.clone()).collect();
    let reindex = |idx: &[usize]| -> Vec<usize> {
        idx.iter().filter_map(|i| remap.get(i).copied()).collect()
    };

    let if_empty = if cat.has_any {
        EmptyVerdict::Drop
    } else {
        EmptyVerdict::Reject
    };
    let target = |idx: &[usize]| TrafficTarget {
        endpoints: reindex(idx),
        if_empty,
    };
    let cluster_target = target(&cat.cluster);
    let local_target = target(&cat.local);

    let internal = if internal_local {
        local_target.clone()
    } else {
        cluster_target.clone()
    };
    let (external, external_policy) = if external_local {
        // local_origin is the cluster-policy target even when iTP is Local too: kube-proxy
        // short-circuits pod/node-originated traffic to external addresses via the cluster chain.
        (
            local_target,
            ExternalPolicy::Local {
                local_origin: cluster_target,
            },
        )
    } else {
        (cluster_target, ExternalPolicy::Cluster)
    };

    ServicePortState {
        name,
        protocol: port.protocol,
        port: port.port,
        cluster_ip: Some(cluster_ip),
        node_port,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        affinity_timeout_seconds: svc.session_affinity_timeout,
        endpoints,
        internal,
        external,
        external_policy,
        health_check_node_port: needs_health_check(svc),
    }
}
