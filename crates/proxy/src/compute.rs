//! Per-service computation: one Service plus its EndpointSlices → the `ServicePortState`s of
//! each IP family. Pure functions (no cache, no change tracking), mirroring kube-proxy's
//! `serviceport.go` (`newBaseServiceInfo`), `endpointslicecache.go` (merging slices) and
//! `topology.go` (`CategorizeEndpoints`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use svcplane_model::{
    EndpointSlice, IpFamily, Protocol, Service, ServicePort, ServicePortName, ServiceType,
    TrafficPolicy,
};

use crate::desired::{
    Category, EmptyVerdict, EndpointState, Exclusion, ExplainedEndpoint, ExternalPolicy, Picks,
    PortSelection, ServicePortState, TopologyChoice, TrafficTarget,
};

/// What the node contributes to the per-service decisions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodeContext<'a> {
    pub node_name: &'a str,
    /// This node's zone; `None` (or empty) disables zone hints, as in kube-proxy.
    pub zone: Option<&'a str>,
    /// This node's addresses (both families), from its Node object.
    pub node_ips: &'a [IpAddr],
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
        || svc.rare.service_proxy_name.is_some()
        || svc.headless_label
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
    /// Where it runs, for `trace` only ([`explain_service`]).
    node_name: Option<&'a Arc<str>>,
    zone: Option<&'a Arc<str>>,
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

type PortKey = (Arc<str>, Protocol);
type MergedEndpoints<'a> = BTreeMap<PortKey, BTreeMap<(IpAddr, u16), RawEndpoint<'a>>>;

/// Merge the slices of one family into endpoints per slice port (name, protocol), deduplicated
/// by (ip, port). `slices` must be in a stable order (by slice name).
fn merge_slices<'a>(
    slices: &[&'a EndpointSlice],
    family: IpFamily,
    ctx: &NodeContext<'_>,
) -> MergedEndpoints<'a> {
    let node_name = ctx.node_name;
    let mut merged: MergedEndpoints<'a> = BTreeMap::new();
    for slice in slices {
        if slice.address_family != Some(family) {
            continue;
        }
        for port in slice.ports.iter() {
            // kube-proxy ignores ports without a number ("all ports" is not implemented).
            if port.port == 0 {
                continue;
            }
            let set = merged
                .entry((port.name.clone(), port.protocol))
                .or_default();
            for ep in &slice.endpoints {
                // kube-proxy uses addresses[0] only, and only when it is of the slice's family.
                let Some(&ip) = ep.addresses().first() else {
                    continue;
                };
                if IpFamily::of(&ip) != family {
                    continue;
                }
                let hints = ep.hints();
                let raw = RawEndpoint {
                    state: EndpointState {
                        ip,
                        port: port.port,
                        is_local: !node_name.is_empty()
                            && ep.node_name().map(|n| &**n) == Some(node_name),
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                    },
                    node_name: ep.node_name(),
                    zone: ep.zone(),
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
        let merged = merge_slices(slices, family, ctx);
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
        svc.rare.health_check_node_port.filter(|&p| p != 0)
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
    ) || !svc.rare.external_ips.is_empty();
    externally_typed && svc.external_traffic_policy == TrafficPolicy::Local
}

/// Which of `CategorizeEndpoints`' lists a port uses, from its policies.
#[derive(Debug, Clone, Copy)]
struct PortPolicy {
    internal_local: bool,
    external_local: bool,
    uses_cluster: bool,
    uses_local: bool,
}

impl PortPolicy {
    /// `externally_accessible`: kube-proxy's `ServicePort.ExternallyAccessible`, per port
    /// and family, by what is actually exposed (nodePort, LB IPs or externalIPs).
    fn new(svc: &Service, externally_accessible: bool) -> PortPolicy {
        let internal_local = svc.internal_traffic_policy == TrafficPolicy::Local;
        let external_local = external_policy_local(svc) && externally_accessible;
        PortPolicy {
            internal_local,
            external_local,
            uses_cluster: !internal_local || externally_accessible,
            uses_local: internal_local || external_local,
        }
    }
}

/// The merged endpoints of one service port, in (ip, port) order.
fn raw_endpoints<'a>(merged: &MergedEndpoints<'a>, port: &ServicePort) -> Vec<RawEndpoint<'a>> {
    merged
        .get(&(port.name.clone(), port.protocol))
        .map(|set| set.values().cloned().collect())
        .unwrap_or_default()
}

/// Why each port of `svc` got its endpoints: the same categorization as
/// [`compute_service`], with the reasons kept (`svcplane trace`).
pub(crate) fn explain_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    ctx: &NodeContext<'_>,
) -> Vec<PortSelection> {
    let mut out = Vec::new();
    if should_skip(svc) {
        return out;
    }
    let states = compute_service(svc, slices, ctx);
    for family in [IpFamily::V4, IpFamily::V6] {
        if cluster_ip_of(svc, family).is_none() {
            continue;
        }
        let merged = merge_slices(slices, family, ctx);
        let computed = match family {
            IpFamily::V4 => &states.v4,
            IpFamily::V6 => &states.v6,
        };
        for (port, state) in svc.ports.iter().zip(computed) {
            let policy = PortPolicy::new(svc, state.has_external());
            let raw = raw_endpoints(&merged, port);
            let cat = categorize(&raw, policy.uses_cluster, policy.uses_local, ctx);
            let cluster = policy.uses_cluster.then(|| {
                let mode = topology_mode(&raw, ctx);
                let fallback = !raw
                    .iter()
                    .any(|e| e.state.ready && available_for_topology(e, mode, ctx));
                let excluded = excluded(&raw, &cat.cluster, |e| {
                    if e.state.ready {
                        Exclusion::Topology
                    } else if e.state.serving && e.state.terminating && !fallback {
                        Exclusion::TerminatingWhileReadyExist
                    } else {
                        Exclusion::NotReady
                    }
                });
                Category {
                    chosen: cat.cluster.clone(),
                    topology: match mode {
                        TopologyMode::None => TopologyChoice::None,
                        TopologyMode::PreferSameNode => {
                            TopologyChoice::SameNode(ctx.node_name.to_string())
                        }
                        TopologyMode::PreferSameZone => {
                            TopologyChoice::SameZone(ctx.zone.unwrap_or("").to_string())
                        }
                    },
                    terminating_fallback: fallback && !cat.cluster.is_empty(),
                    excluded,
                }
            });
            let local = policy.uses_local.then(|| {
                let fallback = !raw.iter().any(|e| e.state.is_local && e.state.ready);
                let excluded = excluded(&raw, &cat.local, |e| {
                    if !e.state.is_local {
                        Exclusion::NotLocal
                    } else if e.state.serving && e.state.terminating && !fallback {
                        Exclusion::TerminatingWhileReadyExist
                    } else {
                        Exclusion::NotReady
                    }
                });
                Category {
                    chosen: cat.local.clone(),
                    topology: TopologyChoice::None,
                    terminating_fallback: fallback && !cat.local.is_empty(),
                    excluded,
                }
            });
            out.push(PortSelection {
                name: state.name.clone(),
                family,
                endpoints: raw
                    .iter()
                    .map(|e| ExplainedEndpoint {
                        state: e.state.clone(),
                        node_name: e.node_name.cloned(),
                        zone: e.zone.cloned(),
                    })
                    .collect(),
                internal_local: policy.internal_local,
                external_local: policy.external_local,
                cluster,
                local,
            });
        }
    }
    out
}

/// The endpoints of `raw` not in `chosen`, each with `why`.
fn excluded(
    raw: &[RawEndpoint<'_>],
    chosen: &[usize],
    why: impl Fn(&RawEndpoint<'_>) -> Exclusion,
) -> Vec<(usize, Exclusion)> {
    raw.iter()
        .enumerate()
        .filter(|(i, _)| !chosen.contains(i))
        .map(|(i, e)| (i, why(e)))
        .collect()
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
    let external_ips = of_family(&svc.rare.external_ips, family, IpFamily::of);
    let load_balancer_ips = if svc.service_type == ServiceType::LoadBalancer {
        of_family(&svc.rare.load_balancer_ips, family, IpFamily::of)
    } else {
        Vec::new()
    };
    // As kube-proxy: ranges are filtered by family; when none is of this family the list is
    // empty, i.e. this family's LoadBalancer IPs are open to every source.
    let mut load_balancer_source_ranges = of_family(
        &svc.rare.load_balancer_source_ranges,
        family,
        IpFamily::of_net,
    );
    // kube-proxy's allowFromNode: a VIP-style load balancer delivers this node's own
    // requests with the LB IP as their source, so when the node itself is allowed, the
    // LB IPs are allowed too.
    let node_allowed = ctx
        .node_ips
        .iter()
        .any(|ip| load_balancer_source_ranges.iter().any(|r| r.contains(ip)));
    if node_allowed {
        load_balancer_source_ranges
            .extend(load_balancer_ips.iter().map(|&ip| ipnet::IpNet::from(ip)));
    }

    let policy = PortPolicy::new(
        svc,
        node_port.is_some() || !load_balancer_ips.is_empty() || !external_ips.is_empty(),
    );
    let internal_local = policy.internal_local;
    let external_local = policy.external_local;
    let raw = raw_endpoints(merged, port);
    let cat = categorize(&raw, policy.uses_cluster, policy.uses_local, ctx);

    // Keep only endpoints some target uses (kube-proxy's allReachableEndpoints), re-indexed.
    let used: BTreeSet<usize> = cat.cluster.iter().chain(&cat.local).copied().collect();
    let remap: BTreeMap<usize, usize> = used
        .iter()
        .enumerate()
        .map(|(new, &old)| (old, new))
        .collect();
    let endpoints: Vec<EndpointState> = used.iter().map(|&i| raw[i].state.clone()).collect();
    let reindex =
        |idx: &[usize]| -> Picks { idx.iter().filter_map(|i| remap.get(i).copied()).collect() };

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
        ipvs_scheduler: svc.rare.ipvs_scheduler.clone(),
        endpoints,
        internal,
        external,
        external_policy,
        health_check_node_port: needs_health_check(svc),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testutil::*;
    use svcplane_model::{Endpoint, EndpointPort, Protocol, ServiceType, TrafficPolicy};

    fn compute(svc: &Service, slices: &[EndpointSlice], zone: Option<&str>) -> ServiceOutput {
        compute_on(svc, slices, zone, &[])
    }

    fn compute_on(
        svc: &Service,
        slices: &[EndpointSlice],
        zone: Option<&str>,
        node_ips: &[IpAddr],
    ) -> ServiceOutput {
        let refs: Vec<&EndpointSlice> = slices.iter().collect();
        compute_service(
            svc,
            &refs,
            &NodeContext {
                node_name: NODE,
                zone,
                node_ips,
            },
        )
    }

    fn only_v4(out: &ServiceOutput) -> &ServicePortState {
        assert_eq!(out.v4.len(), 1, "expected one v4 port: {out:?}");
        &out.v4[0]
    }

    fn ips(sp: &ServicePortState, t: &TrafficTarget) -> Vec<String> {
        sp.target_endpoints(t).map(|e| e.ip.to_string()).collect()
    }

    fn local_origin(sp: &ServicePortState) -> &TrafficTarget {
        match &sp.external_policy {
            ExternalPolicy::Local { local_origin } => local_origin,
            ExternalPolicy::Cluster => panic!("expected eTP Local: {sp:?}"),
        }
    }

    fn one_slice(eps: Vec<Endpoint>) -> Vec<EndpointSlice> {
        vec![slice("ns", "web-1", "web", 8080, eps)]
    }

    #[test]
    fn cluster_policy_uses_ready_endpoints_everywhere() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let out = compute(
            &svc,
            &one_slice(vec![
                ep("10.0.0.2", "node-b"),
                ep("10.0.0.1", NODE),
                not_ready(ep("10.0.0.3", NODE)),
            ]),
            None,
        );
        let sp = only_v4(&out);
        assert_eq!(sp.cluster_ip, Some(ip("10.96.0.10")));
        assert_eq!(sp.port, 80);
        // Sorted by (ip, port); the not-ready one is in no target, so not listed.
        assert_eq!(ips(sp, &sp.internal), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(sp.endpoints.len(), 2);
        assert!(sp.endpoints[0].is_local && !sp.endpoints[1].is_local);
        assert!(sp.endpoints.iter().all(|e| e.port == 8080));
        assert_eq!(sp.external_policy, ExternalPolicy::Cluster);
        assert!(!sp.has_external());
    }

    #[test]
    fn no_endpoints_rejects() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let out = compute(
            &svc,
            &one_slice(vec![not_ready(ep("10.0.0.1", NODE))]),
            None,
        );
        let sp = only_v4(&out);
        assert_eq!(sp.internal.verdict_when_empty(), Some(EmptyVerdict::Reject));
        let out = compute(&svc, &[], None);
        assert_eq!(
            only_v4(&out).internal.verdict_when_empty(),
            Some(EmptyVerdict::Reject)
        );
    }

    #[test]
    fn cluster_falls_back_to_serving_terminating_cluster_wide() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let out = compute(
            &svc,
            &one_slice(vec![
                terminating(ep("10.0.0.1", "node-b"), true),
                terminating(ep("10.0.0.2", NODE), false),
                not_ready(ep("10.0.0.3", NODE)),
            ]),
            None,
        );
        let sp = only_v4(&out);
        assert_eq!(ips(sp, &sp.internal), ["10.0.0.1"]);
        assert!(sp.endpoints[0].terminating && sp.endpoints[0].serving);
    }

    #[test]
    fn terminating_ignored_while_any_ready() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let out = compute(
            &svc,
            &one_slice(vec![
                terminating(ep("10.0.0.1", NODE), true),
                ep("10.0.0.2", "node-b"),
            ]),
            None,
        );
        let sp = only_v4(&out);
        assert_eq!(ips(sp, &sp.internal), ["10.0.0.2"]);
    }

    #[test]
    fn internal_local_uses_local_ready_then_drops() {
        let mut svc = service("ns", "web", &["10.96.0.10"]);
        svc.internal_traffic_policy = TrafficPolicy::Local;
        let out = compute(
            &svc,
            &one_slice(vec![ep("10.0.0.1", NODE), ep("10.0.0.2", "node-b")]),
            None,
        );
        let sp = only_v4(&out);
        assert_eq!(ips(sp, &sp.internal), ["10.0.0.1"]);
        // Not externally accessible: cluster endpoints are not even computed.
        assert_eq!(sp.endpoints.len(), 1);

        // Endpoints elsewhere only: drop (not reject).
        let out = compute(&svc, &one_slice(vec![ep("10.0.0.2", "node-b")]), None);
        let sp = only_v4(&out);
        assert_eq!(sp.internal.verdict_when_empty(), Some(EmptyVerdict::Drop));
        assert!(sp.endpoints.is_empty());

        // Only a serving-terminating remote endpoint still counts as "has endpoints".
        let out = compute(
            &svc,
            &one_slice(vec![terminating(ep("10.0.0.2", "node-b"), true)]),
            None,
        );
        assert_eq!(
            only_v4(&out).internal.verdict_when_empty(),
            Some(EmptyVerdict::Drop)
        );

        // Nothing usable anywhere: reject.
        let out = compute(
            &svc,
            &one_slice(vec![terminating(ep("10.0.0.2", "node-b"), false)]),
            None,
        );
        assert_eq!(
            only_v4(&out).internal.verdict_when_empty(),
            Some(EmptyVerdict::Reject)
        );
    }

    #[test]
    fn local_falls_back_to_local_serving_terminating() {
        let mut svc = service("ns", "web", &["10.96.0.10"]);
        svc.internal_traffic_policy = TrafficPolicy::Local;
        let out = compute(
            &svc,
            &one_slice(vec![
                terminating(ep("10.0.0.1", NODE), true),
                terminating(ep("10.0.0.3", NODE), false),
                ep("10.0.0.2", "node-b"),
            ]),
            None,
        );
        let sp = only_v4(&out);
        // Remote ready endpoints do not prevent the local terminating fallback.
        assert_eq!(ips(sp, &sp.internal), ["10.0.0.1"]);

        // A local ready endpoint wins over local terminating ones.
        let out = compute(
            &svc,
            &one_slice(vec![
                terminating(ep("10.0.0.1", NODE), true),
                ep("10.0.0.4", NODE),
            ]),
            None,
        );
        let sp = only_v4(&out);
        assert_eq!(ips(sp, &sp.internal), ["10.0.0.4"]);
    }

    #[test]
    fn external_local_uses_local_and_keeps_cluster_for_local_origin() {
        let mut svc = lb_service("ns", "web", &["10.96.0.10"]);
        svc.external_traffic_policy = TrafficPolicy::Local;
        svc.rare.health_check_node_port = Some(32000);
        svc.rare.load_balancer_ips = vec![ip("192.0.2.10")];
        let out = compute(
            &svc,
            &one_slice(vec![ep("10.0.0.1", NODE), ep("10.0.0.2", "node-b")]),
            None,
        );
        let sp = only_v4(&out);
        assert_eq!(ips(sp, &sp.internal), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(ips(sp, &sp.external), ["10.0.0.1"]);
        assert_eq!(ips(sp, local_origin(sp)), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(sp.health_check_node_port, Some(32000));
        assert_eq!(out.health_check, Some((32000, 1)));

        // No local endpoint: external drops, internal and local_origin still balance.
        let out = compute(&svc, &one_slice(vec![ep("10.0.0.2", "node-b")]), None);
        let sp = only_v4(&out);
        assert_eq!(sp.external.verdict_when_empty(), Some(EmptyVerdict::Drop));
        assert_eq!(ips(sp, local_origin(sp)), ["10.0.0.2"]);
        assert_eq!(out.health_check, Some((32000, 0)));

        // No endpoint at all: reject everywhere.
        let out = compute(&svc, &[], None);
        let sp = only_v4(&out);
        assert_eq!(sp.external.verdict_when_empty(), Some(EmptyVerdict::Reject));
        assert_eq!(
            local_origin(sp).verdict_when_empty(),
            Some(EmptyVerdict::Reject)
        );
    }

    #[test]
    fn both_policies_local_still_compute_cluster_for_local_origin() {
        let mut svc = lb_service("ns", "web", &["10.96.0.10"]);
        svc.service_type = ServiceType::NodePort;
        svc.external_traffic_policy = TrafficPolicy::Local;
        svc.internal_traffic_policy = TrafficPolicy::Local;
        let out = compute(
            &svc,
            &one_slice(vec![
                ep("10.0.0.2", "node-b"),
                terminating(ep("10.0.0.1", NODE), true),
            ]),
            None,
        );
        let sp = only_v4(&out);
        assert_eq!(sp.node_port, Some(30080));
        assert_eq!(ips(sp, &sp.internal), ["10.0.0.1"]);
        assert_eq!(ips(sp, &sp.external), ["10.0.0.1"]);
        assert_eq!(ips(sp, local_origin(sp)), ["10.0.0.2"]);
        // Union of both: the local terminating one and the remote ready one.
        assert_eq!(sp.endpoints.len(), 2);
        // NodePort type: no health check (kube-proxy: LoadBalancer only).
        assert_eq!(out.health_check, None);
        assert_eq!(sp.health_check_node_port, None);
    }

    #[test]
    fn external_local_without_external_addresses_is_cluster() {
        // LoadBalancer without nodePort (allocateLoadBalancerNodePorts=false) and no ingress yet:
        // not externally accessible, so kube-proxy does not apply eTP Local at all.
        let mut svc = lb_service("ns", "web", &["10.96.0.10"]);
        svc.ports[0].node_port = None;
        svc.external_traffic_policy = TrafficPolicy::Local;
        let out = compute(&svc, &one_slice(vec![ep("10.0.0.2", "node-b")]), None);
        let sp = only_v4(&out);
        assert!(!sp.has_external());
        assert_eq!(sp.external_policy, ExternalPolicy::Cluster);
        assert_eq!(ips(sp, &sp.external), ["10.0.0.2"]);
    }

    #[test]
    fn external_ips_make_cluster_ip_service_externally_accessible() {
        let mut svc = service("ns", "web", &["10.96.0.10"]);
        svc.rare.external_ips = vec![ip("198.51.100.1"), ip("2001:db8::1")];
        svc.external_traffic_policy = TrafficPolicy::Local;
        let out = compute(
            &svc,
            &one_slice(vec![ep("10.0.0.1", NODE), ep("10.0.0.2", "node-b")]),
            None,
        );
        let sp = only_v4(&out);
        assert_eq!(sp.external_ips, vec![ip("198.51.100.1")]);
        assert_eq!(sp.node_port, None);
        assert_eq!(ips(sp, &sp.external), ["10.0.0.1"]);
        assert_eq!(ips(sp, local_origin(sp)), ["10.0.0.1", "10.0.0.2"]);
    }

    fn hinted(addr: &str, node: &str, zones: &[&str]) -> Endpoint {
        zone_hints(ep(addr, node), zones)
    }

    #[test]
    fn zone_hints_used_when_all_ready_have_hints_and_one_is_for_us() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let slices = one_slice(vec![
            hinted("10.0.0.1", "node-b", &["zone-a"]),
            hinted("10.0.0.2", "node-c", &["zone-b"]),
            // Not ready and unhinted: does not disable hints.
            not_ready(ep("10.0.0.9", "node-c")),
        ]);
        let sp = compute(&svc, &slices, Some("zone-a")).v4.remove(0);
        assert_eq!(ips(&sp, &sp.internal), ["10.0.0.1"]);
        // Another zone sees the other endpoint.
        let sp = compute(&svc, &slices, Some("zone-b")).v4.remove(0);
        assert_eq!(ips(&sp, &sp.internal), ["10.0.0.2"]);
    }

    #[test]
    fn zone_hints_ignored_when_one_ready_endpoint_lacks_them() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let slices = one_slice(vec![
            hinted("10.0.0.1", "node-b", &["zone-a"]),
            hinted("10.0.0.2", "node-c", &["zone-b"]),
            ep("10.0.0.3", "node-c"),
        ]);
        let sp = compute(&svc, &slices, Some("zone-a")).v4.remove(0);
        assert_eq!(ips(&sp, &sp.internal), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    }

    #[test]
    fn zone_hints_ignored_when_none_for_our_zone_or_no_zone() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let slices = one_slice(vec![
            hinted("10.0.0.1", "node-b", &["zone-b"]),
            hinted("10.0.0.2", "node-c", &["zone-c"]),
        ]);
        for zone in [Some("zone-a"), None] {
            let sp = compute(&svc, &slices, zone).v4.remove(0);
            assert_eq!(
                ips(&sp, &sp.internal),
                ["10.0.0.1", "10.0.0.2"],
                "zone {zone:?}"
            );
        }
    }

    #[test]
    fn node_hints_prefer_same_node_over_zone() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let slices = one_slice(vec![
            node_hints(hinted("10.0.0.1", "node-b", &["zone-a"]), &["node-b"]),
            node_hints(hinted("10.0.0.2", NODE, &["zone-a"]), &[NODE]),
            node_hints(hinted("10.0.0.3", "node-c", &["zone-b"]), &["node-c"]),
        ]);
        let sp = compute(&svc, &slices, Some("zone-a")).v4.remove(0);
        assert_eq!(ips(&sp, &sp.internal), ["10.0.0.2"]);

        // No node hint for this node: fall back to zone hints.
        let slices = one_slice(vec![
            node_hints(hinted("10.0.0.1", "node-b", &["zone-a"]), &["node-b"]),
            node_hints(hinted("10.0.0.3", "node-c", &["zone-b"]), &["node-c"]),
        ]);
        let sp = compute(&svc, &slices, Some("zone-a")).v4.remove(0);
        assert_eq!(ips(&sp, &sp.internal), ["10.0.0.1"]);
    }

    /// The reasons come from the same categorization: what `compute_service` chose is
    /// exactly what `explain_service` calls chosen, and the rest has a reason.
    #[test]
    fn explain_gives_the_reasons_of_the_same_choice() {
        let mut svc = lb_service("ns", "web", &["10.96.0.10"]);
        svc.external_traffic_policy = TrafficPolicy::Local;
        let slices = one_slice(vec![
            hinted("10.0.0.1", NODE, &["zone-a"]),
            hinted("10.0.0.2", "node-b", &["zone-b"]),
            not_ready(ep("10.0.0.3", NODE)),
            terminating(ep("10.0.0.4", NODE), true),
        ]);
        let refs: Vec<&EndpointSlice> = slices.iter().collect();
        let ctx = NodeContext {
            node_name: NODE,
            zone: Some("zone-a"),
            node_ips: &[],
        };
        let sel = explain_service(&svc, &refs, &ctx).remove(0);
        let sp = compute(&svc, &slices, Some("zone-a")).v4.remove(0);
        let chosen = |c: &Category| -> Vec<String> {
            c.chosen
                .iter()
                .map(|&i| sel.endpoints[i].state.ip.to_string())
                .collect()
        };
        let cluster = sel.cluster.as_ref().unwrap();
        let local = sel.local.as_ref().unwrap();
        assert!(sel.external_local && !sel.internal_local);
        assert_eq!(chosen(cluster), ips(&sp, &sp.internal));
        assert_eq!(chosen(local), ips(&sp, &sp.external));
        assert_eq!(cluster.topology, TopologyChoice::SameZone("zone-a".into()));
        let why = |c: &Category| -> Vec<(String, Exclusion)> {
            c.excluded
                .iter()
                .map(|&(i, e)| (sel.endpoints[i].state.ip.to_string(), e))
                .collect()
        };
        assert_eq!(
            why(cluster),
            [
                ("10.0.0.2".into(), Exclusion::Topology),
                ("10.0.0.3".into(), Exclusion::NotReady),
                ("10.0.0.4".into(), Exclusion::TerminatingWhileReadyExist),
            ]
        );
        assert_eq!(
            why(local),
            [
                ("10.0.0.2".into(), Exclusion::NotLocal),
                ("10.0.0.3".into(), Exclusion::NotReady),
                ("10.0.0.4".into(), Exclusion::TerminatingWhileReadyExist),
            ]
        );
        assert!(!cluster.terminating_fallback && !local.terminating_fallback);

        // Nothing ready: the fallback, said so.
        let slices = one_slice(vec![
            terminating(ep("10.0.0.4", NODE), true),
            terminating(ep("10.0.0.5", NODE), false),
        ]);
        let refs: Vec<&EndpointSlice> = slices.iter().collect();
        let sel = explain_service(&svc, &refs, &ctx).remove(0);
        let cluster = sel.cluster.unwrap();
        assert!(cluster.terminating_fallback);
        assert_eq!(cluster.chosen, [0]);
        assert_eq!(cluster.excluded, [(1, Exclusion::NotReady)]);
    }

    #[test]
    fn terminating_fallback_ignores_topology() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let slices = one_slice(vec![
            zone_hints(terminating(ep("10.0.0.1", "node-b"), true), &["zone-b"]),
            zone_hints(terminating(ep("10.0.0.2", "node-c"), true), &["zone-c"]),
        ]);
        let sp = compute(&svc, &slices, Some("zone-a")).v4.remove(0);
        assert_eq!(ips(&sp, &sp.internal), ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn topology_with_local_policy_merges_reachable_endpoints() {
        // eTP Local + topology: local endpoints outside our zone's hints are still reachable.
        let mut svc = lb_service("ns", "web", &["10.96.0.10"]);
        svc.external_traffic_policy = TrafficPolicy::Local;
        let slices = one_slice(vec![
            hinted("10.0.0.1", NODE, &["zone-b"]),
            hinted("10.0.0.2", "node-b", &["zone-a"]),
        ]);
        let sp = compute(&svc, &slices, Some("zone-a")).v4.remove(0);
        assert_eq!(ips(&sp, &sp.internal), ["10.0.0.2"]);
        assert_eq!(ips(&sp, &sp.external), ["10.0.0.1"]);
        assert_eq!(sp.endpoints.len(), 2);
    }

    #[test]
    fn slices_merge_and_duplicates_prefer_ready_non_terminating() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let slices = vec![
            slice(
                "ns",
                "web-a",
                "web",
                8080,
                vec![
                    terminating(ep("10.0.0.1", "node-b"), true),
                    not_ready(ep("10.0.0.2", "node-b")),
                    ep("10.0.0.3", "node-b"),
                ],
            ),
            slice(
                "ns",
                "web-b",
                "web",
                8080,
                vec![
                    ep("10.0.0.1", "node-c"),
                    ep("10.0.0.2", "node-c"),
                    not_ready(ep("10.0.0.3", "node-c")),
                    ep("10.0.0.4", "node-c"),
                ],
            ),
        ];
        for order in [slices.clone(), slices.iter().rev().cloned().collect()] {
            let refs: Vec<&EndpointSlice> = {
                // compute_service expects slice-name order; the engine guarantees it.
                let mut r: Vec<&EndpointSlice> = order.iter().collect();
                r.sort_by(|a, b| a.name.cmp(&b.name));
                r
            };
            let ctx = NodeContext {
                node_name: NODE,
                zone: None,
                node_ips: &[],
            };
            let out = compute_service(&svc, &refs, &ctx);
            let sp = &out.v4[0];
            assert_eq!(
                ips(sp, &sp.internal),
                ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
            );
            // Where the winners run: what `trace` shows (the state itself keeps no names).
            let sel = &explain_service(&svc, &refs, &ctx)[0];
            let nodes: Vec<_> = sel
                .endpoints
                .iter()
                .map(|e| e.node_name.as_deref().unwrap())
                .collect();
            assert_eq!(nodes, ["node-c", "node-c", "node-b", "node-c"]);
            // One allocation per distinct node name, shared by every endpoint naming it.
            assert!(Arc::ptr_eq(
                sel.endpoints[0].node_name.as_ref().unwrap(),
                sel.endpoints[3].node_name.as_ref().unwrap()
            ));
        }
    }

    #[test]
    fn same_ip_different_ports_are_distinct() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let slices = vec![
            slice("ns", "web-a", "web", 8080, vec![ep("10.0.0.1", "node-b")]),
            slice("ns", "web-b", "web", 9090, vec![ep("10.0.0.1", "node-b")]),
        ];
        let sp = compute(&svc, &slices, None).v4.remove(0);
        let eps: Vec<_> = sp.endpoints.iter().map(|e| (e.ip, e.port)).collect();
        assert_eq!(eps, [(ip("10.0.0.1"), 8080), (ip("10.0.0.1"), 9090)]);
    }

    #[test]
    fn only_first_address_and_empty_addresses_skipped() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let mut multi = ep("10.0.0.1", "node-b");
        multi.set_addresses(&[ip("10.0.0.1"), ip("10.0.0.99")]);
        let mut empty = ep("10.0.0.5", "node-b");
        empty.set_addresses(&[]);
        let sp = compute(&svc, &one_slice(vec![multi, empty]), None)
            .v4
            .remove(0);
        assert_eq!(ips(&sp, &sp.internal), ["10.0.0.1"]);
    }

    #[test]
    fn named_ports_match_by_name_and_protocol() {
        let mut svc = service("ns", "dns", &["10.96.0.10"]);
        svc.ports = vec![
            port("dns", Protocol::Udp, 53),
            port("dns-tcp", Protocol::Tcp, 53),
            port("metrics", Protocol::Tcp, 9153),
        ];
        let mut s = slice("ns", "dns-1", "dns", 0, vec![ep("10.0.0.1", "node-b")]);
        s.ports = vec![
            EndpointPort {
                name: "dns".into(),
                protocol: Protocol::Udp,
                port: 5353,
            },
            EndpointPort {
                name: "dns-tcp".into(),
                protocol: Protocol::Tcp,
                port: 5354,
            },
            // Same name, wrong protocol: not the metrics port.
            EndpointPort {
                name: "metrics".into(),
                protocol: Protocol::Udp,
                port: 9999,
            },
        ]
        .into();
        let out = compute(&svc, &[s], None);
        assert_eq!(out.v4.len(), 3);
        let by_name: BTreeMap<_, _> = out.v4.iter().map(|s| (s.name.port.clone(), s)).collect();
        assert_eq!(by_name["dns"].protocol, Protocol::Udp);
        assert_eq!(by_name["dns"].endpoints[0].port, 5353);
        assert_eq!(by_name["dns-tcp"].endpoints[0].port, 5354);
        assert!(by_name["metrics"].endpoints.is_empty());
        assert_eq!(
            by_name["metrics"].internal.verdict_when_empty(),
            Some(EmptyVerdict::Reject)
        );
        assert_eq!(by_name["dns"].name.to_string(), "ns/dns:dns/UDP");
    }

    #[test]
    fn source_ranges_allow_the_lb_ips_when_they_allow_the_node() {
        let mut svc = lb_service("ns", "web", &["10.96.0.10"]);
        svc.rare.load_balancer_ips = vec![ip("192.0.2.1"), ip("192.0.2.2")];
        svc.rare.load_balancer_source_ranges = vec!["192.168.0.0/16".parse().unwrap()];
        let slices = vec![slice(
            "ns",
            "web",
            "web",
            8080,
            vec![ep("10.0.0.1", "node-b")],
        )];
        let ranges = |svc: &Service, node_ips: &[IpAddr]| {
            compute_on(svc, &slices, None, node_ips).v4[0]
                .load_balancer_source_ranges
                .clone()
        };
        // Node outside the ranges: the ranges as given.
        assert_eq!(
            ranges(&svc, &[ip("10.1.0.1")]),
            vec!["192.168.0.0/16".parse::<ipnet::IpNet>().unwrap()]
        );
        // Node inside: the LB IPs join them (allowFromNode).
        assert_eq!(
            ranges(&svc, &[ip("10.1.0.1"), ip("192.168.7.7")]),
            vec![
                "192.168.0.0/16".parse::<ipnet::IpNet>().unwrap(),
                "192.0.2.1/32".parse().unwrap(),
                "192.0.2.2/32".parse().unwrap(),
            ]
        );
        // No ranges: nothing to extend (everyone is allowed).
        svc.rare.load_balancer_source_ranges.clear();
        assert!(ranges(&svc, &[ip("192.168.7.7")]).is_empty());
    }

    #[test]
    fn dual_stack_each_family_own_cluster_ip_and_endpoints() {
        let mut svc = lb_service("ns", "web", &["10.96.0.10", "fd00::10"]);
        svc.rare.load_balancer_ips = vec![ip("192.0.2.1"), ip("2001:db8::1")];
        svc.rare.load_balancer_source_ranges = vec![
            "203.0.113.0/24".parse().unwrap(),
            "2001:db8:1::/48".parse().unwrap(),
        ];
        svc.rare.external_ips = vec![ip("198.51.100.7")];
        let slices = vec![
            slice("ns", "web-v4", "web", 8080, vec![ep("10.0.0.1", "node-b")]),
            slice("ns", "web-v6", "web", 8080, vec![ep("fd00::1", "node-b")]),
        ];
        let out = compute(&svc, &slices, None);
        let (v4, v6) = (&out.v4[0], &out.v6[0]);
        assert_eq!(v4.cluster_ip, Some(ip("10.96.0.10")));
        assert_eq!(v6.cluster_ip, Some(ip("fd00::10")));
        assert_eq!(ips(v4, &v4.internal), ["10.0.0.1"]);
        assert_eq!(ips(v6, &v6.internal), ["fd00::1"]);
        assert_eq!(v4.load_balancer_ips, vec![ip("192.0.2.1")]);
        assert_eq!(v6.load_balancer_ips, vec![ip("2001:db8::1")]);
        assert_eq!(
            v4.load_balancer_source_ranges,
            vec!["203.0.113.0/24".parse().unwrap()]
        );
        assert_eq!(
            v6.load_balancer_source_ranges,
            vec!["2001:db8:1::/48".parse().unwrap()]
        );
        assert_eq!(v4.external_ips, vec![ip("198.51.100.7")]);
        assert!(v6.external_ips.is_empty());
        assert_eq!(v4.node_port, Some(30080));
        assert_eq!(v6.node_port, Some(30080));
    }

    #[test]
    fn source_ranges_of_other_family_only_leave_this_family_open() {
        let mut svc = lb_service("ns", "web", &["10.96.0.10", "fd00::10"]);
        svc.rare.load_balancer_ips = vec![ip("192.0.2.1"), ip("2001:db8::1")];
        svc.rare.load_balancer_source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
        let out = compute(&svc, &[], None);
        assert_eq!(out.v4[0].load_balancer_source_ranges.len(), 1);
        assert!(out.v6[0].load_balancer_source_ranges.is_empty());
    }

    #[test]
    fn single_stack_service_only_in_its_family() {
        let svc = service("ns", "web", &["fd00::10"]);
        let slices = vec![slice(
            "ns",
            "web-v4",
            "web",
            8080,
            vec![ep("10.0.0.1", "node-b")],
        )];
        let out = compute(&svc, &slices, None);
        assert!(out.v4.is_empty());
        assert_eq!(out.v6.len(), 1);
        assert!(out.v6[0].endpoints.is_empty());
    }

    #[test]
    fn endpoints_of_wrong_family_in_a_slice_are_ignored() {
        let svc = service("ns", "web", &["10.96.0.10"]);
        let mut s = slice("ns", "web-1", "web", 8080, vec![ep("10.0.0.1", "node-b")]);
        s.endpoints = [s.endpoints.to_vec(), vec![ep("fd00::1", "node-b")]]
            .concat()
            .into();
        let sp = compute(&svc, &[s.clone()], None).v4.remove(0);
        assert_eq!(ips(&sp, &sp.internal), ["10.0.0.1"]);
        // FQDN slices (no family) are ignored.
        s.address_family = None;
        let sp = compute(&svc, &[s], None).v4.remove(0);
        assert!(sp.endpoints.is_empty());
    }

    #[test]
    fn skipped_services() {
        let slices = one_slice(vec![ep("10.0.0.1", "node-b")]);
        let mut headless = service("ns", "web", &[]);
        headless.headless = true;
        let mut external_name = service("ns", "web", &[]);
        external_name.service_type = ServiceType::ExternalName;
        external_name.rare.external_name = Some("example.com".into());
        let mut proxy_name = service("ns", "web", &["10.96.0.10"]);
        proxy_name.rare.service_proxy_name = Some("other-proxy".into());
        let mut headless_label = service("ns", "web", &["10.96.0.10"]);
        headless_label.headless_label = true;
        for svc in [headless, external_name, proxy_name, headless_label] {
            assert_eq!(
                compute(&svc, &slices, None),
                ServiceOutput::default(),
                "{svc:?}"
            );
        }
        // Control: the same service without the skip reason is programmed.
        assert_eq!(
            compute(&service("ns", "web", &["10.96.0.10"]), &slices, None)
                .v4
                .len(),
            1
        );
    }

    #[test]
    fn node_port_and_lb_ips_only_for_their_types() {
        let mut svc = service("ns", "web", &["10.96.0.10"]);
        svc.ports[0].node_port = Some(30080);
        svc.rare.load_balancer_ips = vec![ip("192.0.2.1")];
        let sp = compute(&svc, &[], None).v4.remove(0);
        assert_eq!(sp.node_port, None);
        assert!(sp.load_balancer_ips.is_empty());

        svc.service_type = ServiceType::NodePort;
        let sp = compute(&svc, &[], None).v4.remove(0);
        assert_eq!(sp.node_port, Some(30080));
        assert!(sp.load_balancer_ips.is_empty());

        svc.service_type = ServiceType::LoadBalancer;
        let sp = compute(&svc, &[], None).v4.remove(0);
        assert_eq!(sp.node_port, Some(30080));
        assert_eq!(sp.load_balancer_ips, vec![ip("192.0.2.1")]);
    }

    #[test]
    fn affinity_copied() {
        let mut svc = service("ns", "web", &["10.96.0.10"]);
        assert_eq!(
            compute(&svc, &[], None).v4[0].affinity_timeout_seconds,
            None
        );
        svc.session_affinity_timeout = Some(600);
        assert_eq!(
            compute(&svc, &[], None).v4[0].affinity_timeout_seconds,
            Some(600)
        );
    }

    #[test]
    fn ipvs_scheduler_copied_to_every_family() {
        let mut svc = service("ns", "web", &["10.96.0.10", "fd00::10"]);
        let none = compute(&svc, &[], None);
        assert_eq!(none.v4[0].ipvs_scheduler, None);
        svc.rare.ipvs_scheduler = Some("sh".into());
        let st = compute(&svc, &[], None);
        assert_eq!(st.v4[0].ipvs_scheduler.as_deref(), Some("sh"));
        assert_eq!(st.v6[0].ipvs_scheduler.as_deref(), Some("sh"));
    }

    #[test]
    fn health_check_counts_distinct_local_ready_ips_across_ports() {
        let mut svc = lb_service("ns", "web", &["10.96.0.10", "fd00::10"]);
        svc.external_traffic_policy = TrafficPolicy::Local;
        svc.rare.health_check_node_port = Some(32000);
        svc.ports.push(port("b", Protocol::Tcp, 81));
        svc.ports[0].name = "a".into();
        let mut s4 = slice(
            "ns",
            "web-v4",
            "web",
            0,
            vec![
                ep("10.0.0.1", NODE),
                ep("10.0.0.2", NODE),
                not_ready(ep("10.0.0.3", NODE)),
                terminating(ep("10.0.0.4", NODE), true),
                ep("10.0.0.5", "node-b"),
            ],
        );
        s4.ports = vec![
            EndpointPort {
                name: "a".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            },
            EndpointPort {
                name: "b".into(),
                protocol: Protocol::Tcp,
                port: 8081,
            },
        ]
        .into();
        let s6 = slice("ns", "web-v6", "web", 8080, vec![ep("fd00::1", NODE)]);
        let out = compute(&svc, &[s4, s6], None);
        // v4: 2 distinct local ready IPs (not 4 endpoint-ports); v6: 1. The larger wins.
        assert_eq!(out.health_check, Some((32000, 2)));

        // Not eTP Local: no health check even with the port set.
        svc.external_traffic_policy = TrafficPolicy::Cluster;
        assert_eq!(compute(&svc, &[], None).health_check, None);
    }
}
