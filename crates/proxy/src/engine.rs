use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;
use svcplane_model::{
    Change, EndpointSlice, IpFamily, Kind, NamespacedName, Node, Object, ObjectKey, Service,
    ServicePortName,
};

use crate::compute::{NodeContext, compute_service};
use crate::desired::{
    ClusterIpMasquerade, DesiredState, FamilyState, HealthCheck, NodePortAddresses,
    ServicePortState,
};

/// Node-level settings of the engine (kube-proxy's flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineConfig {
    /// This node's name: endpoints with this `nodeName` are local.
    pub node_name: String,
    /// `--cluster-cidr` (both families may be given).
    pub cluster_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses`; empty means every local address.
    pub nodeport_addresses: Vec<IpNet>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
}

/// What one Service contributed to the last desired state, so a recompute can replace it.
#[derive(Debug, Default)]
struct ServiceEntry {
    v4: Vec<ServicePortName>,
    v6: Vec<ServicePortName>,
}

/// The object cache plus change tracking.
///
/// `desired()` recomputes only the services touched since the previous call (a Service change,
/// or a change of one of its EndpointSlices) and reuses every other `Arc<ServicePortState>`.
/// A change of this node's zone recomputes everything (topology hints depend on it).
pub struct Engine {
    config: EngineConfig,
    services: HashMap<NamespacedName, Service>,
    slices: HashMap<NamespacedName, EndpointSlice>,
    /// Service (namespace/name) → names of the slices labelled with it.
    slices_by_service: HashMap<NamespacedName, BTreeSet<NamespacedName>>,
    nodes: HashMap<String, Node>,

    /// Services to recompute at the next `desired()`.
    dirty: HashSet<NamespacedName>,
    /// Recompute every service (this node's zone changed).
    all_dirty: bool,
    /// This node's Node object changed (zone or addresses): the family globals may differ.
    node_changed: bool,
    /// Distinct objects changed since the last `desired()`, for [`Engine::pending_changes`].
    changed_services: HashSet<NamespacedName>,
    changed_slices: HashSet<NamespacedName>,

    entries: HashMap<NamespacedName, ServiceEntry>,
    v4_services: BTreeMap<ServicePortName, Arc<ServicePortState>>,
    v6_services: BTreeMap<ServicePortName, Arc<ServicePortState>>,
    /// Service → (healthCheckNodePort, local ready endpoints), sorted for a stable port owner.
    health: BTreeMap<NamespacedName, (u16, usize)>,
    last: Option<Arc<DesiredState>>,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Engine {
            config,
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_by_service: HashMap::new(),
            nodes: HashMap::new(),
            dirty: HashSet::new(),
            all_dirty: false,
            node_changed: false,
            changed_services: HashSet::new(),
            changed_slices: HashSet::new(),
            entries: HashMap::new(),
            v4_services: BTreeMap::new(),
            v6_services: BTreeMap::new(),
            health: BTreeMap::new(),
            last: None,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Distinct `(Services, EndpointSlices)` changed since the last [`Engine::desired`] call.
    pub fn pending_changes(&self) -> (usize, usize) {
        (self.changed_services.len(), self.changed_slices.len())
    }

    /// Whether [`Engine::desired`] would differ from its previous result's inputs: any Service,
    /// EndpointSlice or this node's Node changed (no-op changes do not count).
    pub fn has_pending(&self) -> bool {
        !self.dirty.is_empty() || self.all_dirty || self.node_changed
    }

    /// Record a change from a source. Cheap: work happens in [`Engine::desired`].
    /// Applying an object identical to the cached one, or deleting an unknown one, is a no-op.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Apply(Object::Service(svc)) => self.put_service(svc),
            Change::Apply(Object::EndpointSlice(slice)) => self.put_slice(slice),
            Change::Apply(Object::Node(node)) => self.put_node(node),
            Change::Apply(Object::Pod(_)) => {}
            Change::Delete(ObjectKey { kind, name }) => match kind {
                Kind::Service => {
                    if self.services.remove(&name).is_some() {
                        self.changed_services.insert(name.clone());
                        self.dirty.insert(name);
                    }
                }
                Kind::EndpointSlice => {
                    if let Some(old) = self.slices.remove(&name) {
                        self.unindex_slice(&old);
                        self.changed_slices.insert(name);
                    }
                }
                Kind::Node => {
                    if let Some(old) = self.nodes.remove(&name.name) {
                        self.node_updated(Some(&old), None);
                    }
                }
                Kind::Pod => {}
            },
        }
    }

    fn put_service(&mut self, svc: Service) {
        if self.services.get(&svc.name) == Some(&svc) {
            return;
        }
        self.changed_services.insert(svc.name.clone());
        self.dirty.insert(svc.name.clone());
        self.services.insert(svc.name.clone(), svc);
    }

    fn put_slice(&mut self, slice: EndpointSlice) {
        if let Some(old) = self.slices.get(&slice.name) {
            if *old == slice {
                return;
            }
            let old = old.clone();
            self.unindex_slice(&old);
        }
        if let Some(svc) = slice_service(&slice) {
            self.slices_by_service
                .entry(svc.clone())
                .or_default()
                .insert(slice.name.clone());
            self.dirty.insert(svc);
        }
        self.changed_slices.insert(slice.name.clone());
        self.slices.insert(slice.name.clone(), slice);
    }

    /// Drop `slice` from the service index and dirty the service it belonged to.
    fn unindex_slice(&mut self, slice: &EndpointSlice) {
        let Some(svc) = slice_service(slice) else {
            return;
        };
        if let Some(set) = self.slices_by_service.get_mut(&svc) {
            set.remove(&slice.name);
            if set.is_empty() {
                self.slices_by_service.remove(&svc);
            }
        }
        self.dirty.insert(svc);
    }

    fn put_node(&mut self, node: Node) {
        if self.nodes.get(&node.name) == Some(&node) {
            return;
        }
        let old = self.nodes.insert(node.name.clone(), node.clone());
        self.node_updated(old.as_ref(), Some(&node));
    }

    fn node_updated(&mut self, old: Option<&Node>, new: Option<&Node>) {
        let name = old.or(new).map(|n| n.name.as_str());
        if name != Some(self.config.node_name.as_str()) {
            // Other nodes are cached but affect nothing here.
            return;
        }
        self.node_changed = true;
        // Only the zone feeds per-service decisions (topology hints); addresses only feed the
        // family globals, recomputed at every `desired()`.
        if old.and_then(|n| n.zone.as_ref()) != new.and_then(|n| n.zone.as_ref()) {
            self.all_dirty = true;
        }
    }

    fn this_node(&self) -> Option<&Node> {
        self.nodes.get(&self.config.node_name)
    }

    /// The desired state for everything applied so far. Services untouched since the last
    /// call keep their `Arc`s, so [`crate::Diff::between`] is cheap. When nothing changed at
    /// all, the previous `Arc<DesiredState>` itself is returned.
    pub fn desired(&mut self) -> Arc<DesiredState> {
        let dirty: Vec<NamespacedName> = if self.all_dirty {
            let mut all: HashSet<NamespacedName> = self.services.keys().cloned().collect();
            all.extend(self.entries.keys().cloned());
            all.into_iter().collect()
        } else {
            self.dirty.drain().collect()
        };
        let anything_changed = !dirty.is_empty() || self.node_changed || self.last.is_none();
        self.dirty.clear();
        self.all_dirty = false;
        self.node_changed = false;
        self.changed_services.clear();
        self.changed_slices.clear();

        for name in &dirty {
            self.recompute(name);
        }

        if !anything_changed && let Some(last) = &self.last {
            return last.clone();
        }
        let node = self.this_node();
        let mut v4 = family_globals(&self.config, IpFamily::V4, node);
        let mut v6 = family_globals(&self.config, IpFamily::V6, node);
        v4.services = self.v4_services.clone();
        v6.services = self.v6_services.clone();
        let mut health_checks = BTreeMap::new();
        for (service, &(port, local_endpoints)) in &self.health {
            // Two services claiming one port cannot both be served; the first by name wins.
            if let Some(existing) = health_checks.get(&port) {
                let existing: &HealthCheck = existing;
                tracing::warn!(
                    port,
                    service = %service,
                    owner = %existing.service,
                    "healthCheckNodePort already used by another service; ignored"
                );
                continue;
            }
            health_checks.insert(
                port,
                HealthCheck {
                    service: service.clone(),
                    local_endpoints,
                },
            );
        }
        let state = Arc::new(DesiredState {
            node_name: self.config.node_name.clone(),
            node_zone: node.and_then(|n| n.zone.clone()),
            v4,
            v6,
            health_checks,
        });
        // Keep the previous Arc when the value is identical (no-op changes), for cheap diffs.
        if let Some(last) = &self.last
            && **last == *state
        {
            return last.clone();
        }
        self.last = Some(state.clone());
        state
    }

    /// Replace everything `name` contributed with a fresh computation.
    fn recompute(&mut self, name: &NamespacedName) {
        let old = self.entries.remove(name).unwrap_or_default();
        let mut old_v4: HashMap<ServicePortName, Arc<ServicePortState>> = old
            .v4
            .iter()
            .filter_map(|k| self.v4_services.remove_entry(k))
            .collect();
        let mut old_v6: HashMap<ServicePortName, Arc<ServicePortState>> = old
            .v6
            .iter()
            .filter_map(|k| self.v6_services.remove_entry(k))
            .collect();
        self.health.remove(name);

        let Some(svc) = self.services.get(name) else {
            return;
        };
        let slices: Vec<&EndpointSlice> = self
            .slices_by_service
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|s| self.slices.get(s))
            .collect();
        let zone = self
            .nodes
            .get(&self.config.node_name)
            .and_then(|n| n.zone.as_deref());
        let ctx = NodeContext {
            node_name: &self.config.node_name,
            zone,
        };
        let output = compute_service(svc, &slices, &ctx);

        let mut entry = ServiceEntry::default();
        for (states, map, old, keys) in [
            (output.v4, &mut self.v4_services, &mut old_v4, &mut entry.v4),
            (output.v6, &mut self.v6_services, &mut old_v6, &mut entry.v6),
        ] {
            for state in states {
                let arc = match old.remove(&state.name) {
                    Some(prev) if *prev == state => prev,
                    _ => Arc::new(state),
                };
                keys.push(arc.name.clone());
                map.insert(arc.name.clone(), arc);
            }
        }
        if let Some(hc) = output.health_check {
            self.health.insert(name.clone(), hc);
        }
        if !entry.v4.is_empty() || !entry.v6.is_empty() {
            self.entries.insert(name.clone(), entry);
        }
    }
}

/// The Service a slice belongs to: its `kubernetes.io/service-name` label, same namespace.
fn slice_service(slice: &EndpointSlice) -> Option<NamespacedName> {
    slice
        .service_name
        .as_ref()
        .filter(|s| !s.is_empty())
        .map(|s| NamespacedName::new(slice.name.namespace.clone(), s.clone()))
}

/// One family's node-wide settings (services left empty).
pub(crate) fn family_globals(
    config: &EngineConfig,
    family: IpFamily,
    node: Option<&Node>,
) -> FamilyState {
    let cluster_cidrs: Vec<IpNet> = config
        .cluster_cidrs
        .iter()
        .copied()
        .filter(|c| IpFamily::of_net(c) == family)
        .collect();
    let cluster_ip_masquerade = if config.masquerade_all {
        ClusterIpMasquerade::All
    } else if !cluster_cidrs.is_empty() {
        ClusterIpMasquerade::FromOutside(cluster_cidrs.clone())
    } else {
        ClusterIpMasquerade::None
    };
    // kube-proxy's NewNodePortAddresses: the family's CIDRs; none of this family (even when
    // the other family has some) or a zero CIDR among them means every local address.
    let family_npa: Vec<IpNet> = config
        .nodeport_addresses
        .iter()
        .copied()
        .filter(|c| IpFamily::of_net(c) == family)
        .collect();
    let nodeport_addresses =
        if family_npa.is_empty() || family_npa.iter().any(|c| c.prefix_len() == 0) {
            NodePortAddresses::AllLocal
        } else {
            NodePortAddresses::Cidrs(family_npa)
        };
    let node_ips = node
        .map(|n| {
            n.addresses
                .iter()
                .copied()
                .filter(|ip| IpFamily::of(ip) == family)
                .collect()
        })
        .unwrap_or_default();
    FamilyState {
        family,
        cluster_cidrs,
        cluster_ip_masquerade,
        nodeport_addresses,
        node_ips,
        services: BTreeMap::new(),
    }
}
