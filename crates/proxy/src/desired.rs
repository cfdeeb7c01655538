//! The desired state: everything a dataplane (nftables, iptables, IPVS, eBPF),
//! the DNS and `trace` need, with every kube-proxy semantic decision already made.
//! A backend translates it; it never re-derives policy, topology, fallback or
//! masquerade rules.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use svcplane_model::{ByName, IpFamily, Named, NamespacedName, Protocol, ServicePortName};

/// The whole desired dataplane for this node. Cheap to clone (services are `Arc`s,
/// shared between successive states when unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredState {
    /// This node's name (`--hostname-override` or the host name).
    pub node_name: String,
    /// This node's zone (label `topology.kubernetes.io/zone` of its Node object).
    pub node_zone: Option<String>,
    pub v4: FamilyState,
    pub v6: FamilyState,
    /// healthCheckNodePort servers to run (eTP Local services), keyed by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

impl DesiredState {
    pub fn family(&self, family: IpFamily) -> &FamilyState {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }
    pub fn families(&self) -> [&FamilyState; 2] {
        [&self.v4, &self.v6]
    }
}

/// Where NodePorts are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Any local address of the node (`fib daddr type local`), loopback excluded.
    AllLocal,
    /// Local addresses within these CIDRs only (`--nodeport-addresses`), this family's.
    Cidrs(Vec<IpNet>),
}

/// Which ClusterIP traffic is marked for masquerade (kube-proxy's rules on the
/// service's ClusterIP, before endpoint selection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterIpMasquerade {
    /// `--masquerade-all`: every packet to a ClusterIP.
    All,
    /// Packets whose source is outside these cluster CIDRs (`--cluster-cidr`, this family's).
    FromOutside(Vec<IpNet>),
    /// No cluster CIDR is known and masquerade-all is off: nothing (as kube-proxy).
    None,
}

/// One IP family's part of the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyState {
    pub family: IpFamily,
    /// This family's `--cluster-cidr` ranges (pod network); used to recognise pod sources.
    pub cluster_cidrs: Vec<IpNet>,
    pub cluster_ip_masquerade: ClusterIpMasquerade,
    pub nodeport_addresses: NodePortAddresses,
    /// This node's addresses of this family, from its Node object.
    pub node_ips: Vec<IpAddr>,
    /// One entry per service port programmed in this family.
    pub services: ServicePorts,
}

impl FamilyState {
    pub fn empty(family: IpFamily) -> Self {
        FamilyState {
            family,
            cluster_cidrs: Vec::new(),
            cluster_ip_masquerade: ClusterIpMasquerade::None,
            nodeport_addresses: NodePortAddresses::AllLocal,
            node_ips: Vec::new(),
            services: ServicePorts::new(),
        }
    }
    /// Every ClusterIP of this family (for "reject unknown ports on a ClusterIP").
    pub fn cluster_ips(&self) -> BTreeSet<IpAddr> {
        self.services
            .values()
            .filter_map(|s| s.cluster_ip)
            .collect()
    }
}

/// A family's service ports by name: a map from `ServicePortName` to the port's state, keyed
/// by the state's own `name` (no copy of the key: at 10k services the engine's two states
/// kept 20k of them, a third of each map's bytes).
#[derive(Clone, Default)]
pub struct ServicePorts(BTreeSet<ByName<ServicePortState>>);

impl Named for ServicePortState {
    type Name = ServicePortName;
    fn name(&self) -> &ServicePortName {
        &self.name
    }
}

impl ServicePorts {
    pub fn new() -> Self {
        ServicePorts(BTreeSet::new())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn get(&self, name: &ServicePortName) -> Option<&Arc<ServicePortState>> {
        self.0.get(name).map(|p| &p.0)
    }
    pub fn contains_key(&self, name: &ServicePortName) -> bool {
        self.0.contains(name)
    }
    /// Add `port` under its name, replacing (and returning) the port of that name.
    pub fn insert(&mut self, port: Arc<ServicePortState>) -> Option<Arc<ServicePortState>> {
        self.0.replace(ByName(port)).map(|p| p.0)
    }
    pub fn remove(&mut self, name: &ServicePortName) -> Option<Arc<ServicePortState>> {
        self.0.take(name).map(|p| p.0)
    }
    pub fn clear(&mut self) {
        self.0.clear();
    }
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(&ServicePortName, &Arc<ServicePortState>) -> bool,
    ) {
        self.0.retain(|p| keep(&p.0.name, &p.0));
    }
    /// `(name, port)` in name order.
    pub fn iter(&self) -> ServicePortsIter<'_> {
        ServicePortsIter(self.0.iter())
    }
    // Concrete iterator types (no `impl Trait`): the borrow then ends with the last use,
    // as a map's `keys()` and `values()` do.
    pub fn keys(&self) -> std::iter::Map<ServicePortsIter<'_>, KeyOf> {
        self.iter().map(|(k, _)| k)
    }
    pub fn values(&self) -> std::iter::Map<ServicePortsIter<'_>, ValueOf> {
        self.iter().map(|(_, v)| v)
    }
    /// The ports named from `from` on, in name order.
    pub fn from_name<'a>(
        &'a self,
        from: &ServicePortName,
    ) -> impl Iterator<Item = &'a Arc<ServicePortState>> + use<'a> {
        self.0
            .range::<ServicePortName, _>((
                std::ops::Bound::Included(from),
                std::ops::Bound::Unbounded,
            ))
            .map(|p| &p.0)
    }
}

impl PartialEq for ServicePorts {
    /// Same names and equal states (the same `Arc` is equal without a look inside).
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|(a, b)| Arc::ptr_eq(&a.0, &b.0) || *a.0 == *b.0)
    }
}
impl Eq for ServicePorts {}

impl std::fmt::Debug for ServicePorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<Arc<ServicePortState>> for ServicePorts {
    fn from_iter<I: IntoIterator<Item = Arc<ServicePortState>>>(iter: I) -> Self {
        let mut ports = ServicePorts::new();
        for port in iter {
            ports.insert(port);
        }
        ports
    }
}

impl std::ops::Index<&ServicePortName> for ServicePorts {
    type Output = Arc<ServicePortState>;
    /// The port of that name; panics when there is none (as a map's index does).
    fn index(&self, name: &ServicePortName) -> &Arc<ServicePortState> {
        match self.get(name) {
            Some(port) => port,
            None => panic!("no service port {name}"),
        }
    }
}

impl<'a> IntoIterator for &'a ServicePorts {
    type Item = (&'a ServicePortName, &'a Arc<ServicePortState>);
    type IntoIter = ServicePortsIter<'a>;
    fn into_iter(self) -> ServicePortsIter<'a> {
        self.iter()
    }
}

/// [`ServicePorts::keys`]' projection.
pub type KeyOf =
    for<'a> fn((&'a ServicePortName, &'a Arc<ServicePortState>)) -> &'a ServicePortName;
/// [`ServicePorts::values`]' projection.
pub type ValueOf =
    for<'a> fn((&'a ServicePortName, &'a Arc<ServicePortState>)) -> &'a Arc<ServicePortState>;

/// [`ServicePorts::iter`].
pub struct ServicePortsIter<'a>(std::collections::btree_set::Iter<'a, ByName<ServicePortState>>);

impl<'a> Iterator for ServicePortsIter<'a> {
    type Item = (&'a ServicePortName, &'a Arc<ServicePortState>);
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|p| (&p.0.name, &p.0))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for ServicePortsIter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|p| (&p.0.name, &p.0))
    }
}

impl ExactSizeIterator for ServicePortsIter<'_> {}

/// What to do with a packet for a service whose target has no endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EmptyVerdict {
    /// The service has no usable endpoints anywhere: ICMP/TCP reject.
    Reject,
    /// Endpoints exist but none on this node and the policy is Local: drop silently.
    Drop,
}

/// Indices into `ServicePortState::endpoints`, in order. A service port keeps only the
/// endpoints some target uses, so a target usually picks all of them: that is kept as a
/// count, without an allocation (two per service port at 10k services); any other list
/// as `u32`s.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Picks(PicksRepr);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PicksRepr {
    /// `0..n`.
    First(u32),
    /// Any list that is not `0..n` (so that equal lists are equal values).
    Listed(Box<[u32]>),
}

impl Picks {
    pub fn len(&self) -> usize {
        match &self.0 {
            PicksRepr::First(n) => *n as usize,
            PicksRepr::Listed(l) => l.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The indices, in order.
    pub fn iter(&self) -> PicksIter<'_> {
        match &self.0 {
            PicksRepr::First(n) => PicksIter::First(0..*n as usize),
            PicksRepr::Listed(l) => PicksIter::Listed(l.iter()),
        }
    }
    pub fn contains(&self, index: usize) -> bool {
        match &self.0 {
            PicksRepr::First(n) => index < *n as usize,
            PicksRepr::Listed(l) => l.iter().any(|&i| i as usize == index),
        }
    }
}

impl Default for Picks {
    fn default() -> Self {
        Picks(PicksRepr::First(0))
    }
}

impl FromIterator<usize> for Picks {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        // An index beyond u32 cannot point at an endpoint (no port has 4G of them); it
        // stays one that resolves to nothing, as any out-of-range index.
        let list: Vec<u32> = iter
            .into_iter()
            .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
            .collect();
        if list.iter().enumerate().all(|(at, &i)| at == i as usize) {
            Picks(PicksRepr::First(
                u32::try_from(list.len()).unwrap_or(u32::MAX),
            ))
        } else {
            Picks(PicksRepr::Listed(list.into_boxed_slice()))
        }
    }
}

impl From<&[usize]> for Picks {
    fn from(list: &[usize]) -> Self {
        list.iter().copied().collect()
    }
}

impl From<Vec<usize>> for Picks {
    fn from(list: Vec<usize>) -> Self {
        list.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Picks {
    type Item = usize;
    type IntoIter = PicksIter<'a>;
    fn into_iter(self) -> PicksIter<'a> {
        self.iter()
    }
}

/// [`Picks::iter`].
#[derive(Debug, Clone)]
pub enum PicksIter<'a> {
    First(std::ops::Range<usize>),
    Listed(std::slice::Iter<'a, u32>),
}

impl Iterator for PicksIter<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        match self {
            PicksIter::First(r) => r.next(),
            PicksIter::Listed(l) => l.next().map(|&i| i as usize),
        }
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            PicksIter::First(r) => r.size_hint(),
            PicksIter::Listed(l) => l.size_hint(),
        }
    }
}

impl ExactSizeIterator for PicksIter<'_> {}

/// The endpoints one kind of traffic is balanced over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficTarget {
    /// Indices into `ServicePortState::endpoints`, in order. Empty → `if_empty`.
    pub endpoints: Picks,
    /// Meaningful only when `endpoints` is empty.
    pub if_empty: EmptyVerdict,
}

impl TrafficTarget {
    /// `None` when there are endpoints to balance over, else the verdict.
    pub fn verdict_when_empty(&self) -> Option<EmptyVerdict> {
        self.endpoints.is_empty().then_some(self.if_empty)
    }
}

/// How traffic arriving on an external address (NodePort, LoadBalancer IP,
/// externalIP) is handled. `Cluster` and `Local` are the Service's eTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalPolicy {
    /// eTP Cluster: mark for masquerade, then balance over `ServicePortState::external`.
    Cluster,
    /// eTP Local: keep the client IP and balance over `external` (local endpoints only), except,
    /// as kube-proxy, traffic that never left this node: a source in the family's cluster CIDRs
    /// (a pod) uses `local_origin` without masquerade ("short-circuit pod traffic"), and traffic
    /// originated by the node itself (`fib saddr type local`) is marked for masquerade and uses
    /// `local_origin`.
    Local {
        /// kube-proxy's cluster-policy endpoints (ready, topology-aware, terminating fallback),
        /// regardless of the Service's iTP.
        local_origin: TrafficTarget,
    },
}

/// One endpoint of a service port: an address and the (resolved) target port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointState {
    pub ip: IpAddr,
    pub port: u16,
    /// On this node (`nodeName` equals the node name).
    pub is_local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl EndpointState {
    /// A ready, serving, non-terminating endpoint without node or zone: what
    /// backend tests, benchmarks and tools build by hand.
    pub fn ready(ip: IpAddr, port: u16, is_local: bool) -> Self {
        EndpointState {
            ip,
            port,
            is_local,
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

/// Everything about one service port in one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortState {
    pub name: ServicePortName,
    pub protocol: Protocol,
    /// The Service port (on ClusterIP, externalIPs and LoadBalancer IPs).
    pub port: u16,
    /// This family's ClusterIP.
    pub cluster_ip: Option<IpAddr>,
    pub node_port: Option<u16>,
    /// This family's externalIPs.
    pub external_ips: Vec<IpAddr>,
    /// This family's LoadBalancer ingress IPs (ipMode Proxy excluded).
    pub load_balancer_ips: Vec<IpAddr>,
    /// Only these sources may use the LoadBalancer IPs (empty: all may). NodePorts and
    /// externalIPs are not subject to them, as in kube-proxy. When a node address is
    /// within them, they include the LoadBalancer IPs (kube-proxy's allowFromNode).
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// ClientIP session affinity timeout, seconds.
    pub affinity_timeout_seconds: Option<u32>,
    /// The Service's own IPVS scheduler (its annotation); `None`: the proxy's
    /// `--ipvs-scheduler`. Only IPVS mode reads it.
    pub ipvs_scheduler: Option<String>,
    /// Every endpoint either target uses, sorted and deduplicated (by ip, port).
    pub endpoints: Vec<EndpointState>,
    /// Traffic to the ClusterIP (iTP applied, topology, terminating fallback).
    pub internal: TrafficTarget,
    /// Traffic to NodePort / LoadBalancer IPs / externalIPs (eTP applied).
    pub external: TrafficTarget,
    pub external_policy: ExternalPolicy,
    pub health_check_node_port: Option<u16>,
}

impl ServicePortState {
    /// The endpoints of a target, resolved.
    pub fn target_endpoints<'a>(
        &'a self,
        target: &'a TrafficTarget,
    ) -> impl Iterator<Item = &'a EndpointState> + 'a {
        target
            .endpoints
            .iter()
            .filter_map(|i| self.endpoints.get(i))
    }
    /// True when the service has any external address (NodePort, LB IP or externalIP).
    pub fn has_external(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// A healthCheckNodePort server's answer for one eTP Local service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: NamespacedName,
    /// Ready endpoints of the service on this node (200 when > 0, 503 otherwise).
    pub local_endpoints: usize,
}

/// What changed in one family between two desired states.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyDiff {
    pub added: BTreeSet<ServicePortName>,
    pub changed: BTreeSet<ServicePortName>,
    pub removed: BTreeSet<ServicePortName>,
    /// Family-wide settings (cluster CIDRs, masquerade, nodeport addresses, node IPs) changed.
    pub globals_changed: bool,
}

impl FamilyDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && !self.globals_changed
    }
}

/// The difference a backend applies: from `previous` (what it last applied
/// successfully, `None` at startup) to the new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub previous: Option<Arc<DesiredState>>,
    /// Rewrite everything (startup, periodic resync, repair after tampering).
    pub full: bool,
    pub v4: FamilyDiff,
    pub v6: FamilyDiff,
}

impl Diff {
    pub fn family(&self, family: IpFamily) -> &FamilyDiff {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }
    pub fn is_empty(&self) -> bool {
        !self.full && self.v4.is_empty() && self.v6.is_empty()
    }

    /// Compute the diff from `previous` to `next`. Unchanged services are usually the same
    /// `Arc` (the engine reuses them), so this is cheap.
    pub fn between(previous: Option<Arc<DesiredState>>, next: &DesiredState, full: bool) -> Diff {
        let fam = |f: IpFamily| -> FamilyDiff {
            let new = next.family(f);
            let Some(prev) = previous.as_deref() else {
                return FamilyDiff {
                    added: new.services.keys().cloned().collect(),
                    globals_changed: true,
                    ..FamilyDiff::default()
                };
            };
            let old = prev.family(f);
            let mut d = FamilyDiff {
                globals_changed: old.cluster_cidrs != new.cluster_cidrs
                    || old.cluster_ip_masquerade != new.cluster_ip_masquerade
                    || old.nodeport_addresses != new.nodeport_addresses
                    || old.node_ips != new.node_ips,
                ..FamilyDiff::default()
            };
            for (k, v) in &new.services {
                match old.services.get(k) {
                    None => {
                        d.added.insert(k.clone());
                    }
                    Some(o) if !Arc::ptr_eq(o, v) && **o != **v => {
                        d.changed.insert(k.clone());
                    }
                    Some(_) => {}
                }
            }
            for k in old.services.keys() {
                if !new.services.contains_key(k) {
                    d.removed.insert(k.clone());
                }
            }
            d
        };
        Diff {
            v4: fam(IpFamily::V4),
            v6: fam(IpFamily::V6),
            full: full || previous.is_none(),
            previous,
        }
    }
}

/// Why the engine chose a service port's endpoints as it did: what `svcplane trace`
/// explains. Computed on demand ([`crate::Engine::explain`]) by the same code that
/// computes the [`ServicePortState`], never kept in the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSelection {
    pub name: ServicePortName,
    pub family: IpFamily,
    /// Every endpoint the EndpointSlices give this port (merged, deduplicated), used or not.
    pub endpoints: Vec<ExplainedEndpoint>,
    /// internalTrafficPolicy Local.
    pub internal_local: bool,
    /// externalTrafficPolicy Local, and the port is externally accessible in this family.
    pub external_local: bool,
    /// kube-proxy's cluster-policy endpoints (ClusterIP with iTP Cluster, external
    /// addresses with eTP Cluster, eTP Local's short-circuit); `None` when unused.
    pub cluster: Option<Category>,
    /// kube-proxy's local-policy endpoints (iTP or eTP Local); `None` when unused.
    pub local: Option<Category>,
}

/// An endpoint as `trace` shows it: its state and where it runs (the slice endpoint's
/// node and zone, shared names; the desired state does not keep them, no backend reads
/// them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainedEndpoint {
    pub state: EndpointState,
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
}

/// One of `CategorizeEndpoints`' two lists, with the reasons behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Category {
    /// Indices into [`PortSelection::endpoints`] of the chosen endpoints.
    pub chosen: Vec<usize>,
    /// Topology applied (cluster list only; the local list ignores hints).
    pub topology: TopologyChoice,
    /// No ready endpoint qualified, so serving terminating ones were taken.
    pub terminating_fallback: bool,
    /// Every other endpoint, with the reason it was left out.
    pub excluded: Vec<(usize, Exclusion)>,
}

/// Which topology hints the cluster list followed (kube-proxy's `topologyModeFromHints`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopologyChoice {
    /// Hints ignored: not every ready endpoint has one, none names this node/zone, or
    /// there are none.
    None,
    /// `hints.forNodes` naming this node.
    SameNode(String),
    /// `hints.forZones` naming this node's zone.
    SameZone(String),
}

/// Why an endpoint is not among a category's chosen ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclusion {
    /// Not ready, and not serving while terminating.
    NotReady,
    /// Serving but terminating, while ready endpoints exist.
    TerminatingWhileReadyExist,
    /// Its hints are for another node or zone (the topology choice).
    Topology,
    /// On another node, and the policy is Local.
    NotLocal,
}

impl std::fmt::Display for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Exclusion::NotReady => "not ready",
            Exclusion::TerminatingWhileReadyExist => "terminating, and ready endpoints exist",
            Exclusion::Topology => "topology hints for another node or zone",
            Exclusion::NotLocal => "on another node (traffic policy Local)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_records_are_compact() {
        // 100k of them at 10k services × 10 endpoints: no names, no padding to 8.
        assert!(size_of::<EndpointState>() <= 24);
        assert!(size_of::<TrafficTarget>() <= 32);
    }

    /// Service `name`'s one port, its number `port`, as the engine computes it.
    fn port(name: &str, port: u16) -> Arc<ServicePortState> {
        let svc = crate::testutil::service("ns", name, &["10.96.0.10"]);
        let ctx = crate::compute::NodeContext {
            node_name: crate::testutil::NODE,
            zone: None,
            node_ips: &[],
        };
        let mut out = crate::compute::compute_service(&svc, &[], &ctx);
        let mut state = out.v4.remove(0);
        state.port = port;
        Arc::new(state)
    }

    #[test]
    fn service_ports_are_a_map_keyed_by_the_states_names() {
        let mut ports: ServicePorts = [port("b", 80), port("a", 80)].into_iter().collect();
        assert_eq!(
            ports.keys().map(|k| &*k.service.name).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let b = port("b", 81);
        let old = ports.insert(b.clone());
        assert_eq!(old.map(|o| o.port), Some(80), "the same name replaces");
        assert!(Arc::ptr_eq(&ports[&b.name], &b));
        assert_eq!(ports.len(), 2);
        // Equal means equal states, not only the same names.
        let mut other = ports.clone();
        assert_eq!(ports, other);
        other.insert(port("b", 82));
        assert_ne!(ports, other);
        let a = port("a", 80);
        assert_eq!(
            ports.from_name(&b.name).map(|p| p.port).collect::<Vec<_>>(),
            [81]
        );
        assert!(ports.remove(&a.name).is_some() && !ports.contains_key(&a.name));
        // One pointer per port beside the states: the key is the state's own name.
        assert_eq!(size_of::<ByName<ServicePortState>>(), size_of::<usize>());
    }

    #[test]
    fn picks_keep_all_as_a_count_and_any_other_list_as_is() {
        let all: Picks = (0..3).collect();
        assert_eq!(all, Picks(PicksRepr::First(3)));
        assert_eq!(all.iter().collect::<Vec<_>>(), [0, 1, 2]);
        assert!(all.contains(2) && !all.contains(3));
        let some = Picks::from(vec![0, 2]);
        assert_eq!(some.len(), 2);
        assert_eq!(some.iter().collect::<Vec<_>>(), [0, 2]);
        assert!(!some.contains(1));
        assert_ne!(some, Picks::from(vec![0, 1]));
        // Equal lists are equal values, whichever way they were built.
        assert_eq!(Picks::from(&[0, 1][..]), (0..2).collect());
        assert!(Picks::default().is_empty());
        let sp_endpoints = [EndpointState::ready("10.0.0.1".parse().unwrap(), 80, false)];
        let beyond: Picks = [usize::MAX].into_iter().collect();
        assert_eq!(beyond.iter().filter_map(|i| sp_endpoints.get(i)).count(), 0);
    }
}
