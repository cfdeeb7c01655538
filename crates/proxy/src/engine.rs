use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use svcplane_model::{
    ByName, Change, EndpointSlice, IpFamily, Kind, NamespacedName, Node, Object, ObjectKey,
    Protocol, Service, ServicePortName,
};

use crate::compute::{NodeContext, ServiceOutput, compute_service, explain_service};
use crate::desired::{
    ClusterIpMasquerade, DesiredState, Diff, FamilyDiff, FamilyState, HealthCheck,
    NodePortAddresses, PortSelection, ServicePortState, ServicePorts,
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

/// Service ports of one family to replace (`Some`) or remove (`None`) in the next state.
type Updates = BTreeMap<ServicePortName, Option<Arc<ServicePortState>>>;

/// The state before the last one, kept to become the next one (see [`Engine::desired`]).
struct Spare {
    state: Arc<DesiredState>,
    /// What changed from `state` to the last state, per family (v4, v6).
    diff: [FamilyDiff; 2],
}

/// The object cache plus change tracking.
///
/// `desired()` recomputes only the services touched since the previous call (a Service change,
/// or a change of one of its EndpointSlices) and reuses every other `Arc<ServicePortState>`.
/// A change of this node's zone recomputes everything (topology hints depend on it).
///
/// One change costs O(changed services), not O(services): the engine keeps its last state
/// and the one before; once the backend has applied the last one, nobody else holds the one
/// before, so the next state is that one's maps patched forward (with the previous step's
/// changes, then this step's) instead of a copy of every service, and [`Engine::diff`]
/// hands the sync loop the changes it made rather than comparing every service.
pub struct Engine {
    config: EngineConfig,
    /// Shared with the source that sent them (no second copy), by their own names (no
    /// copy of the key either).
    services: HashSet<ByName<Service>>,
    slices: HashSet<ByName<EndpointSlice>>,
    /// Service (namespace/name) → the slices labelled with it, sorted by name (a `Vec`: a
    /// service has one slice or a few, and a `BTreeSet` node costs half a kilobyte; the
    /// slices themselves, not copies of their names).
    /// A boxed slice, not a `Vec`: a first push reserves four slots and the inline
    /// capacity is 8 B more, per service, for a list rebuilt only when a slice comes or goes.
    slices_by_service: HashMap<NamespacedName, Box<[Arc<EndpointSlice>]>>,
    nodes: HashMap<String, Arc<Node>>,

    /// Services to recompute at the next `desired()`.
    dirty: HashSet<NamespacedName>,
    /// Recompute every service (this node's zone changed).
    all_dirty: bool,
    /// This node's Node object changed (zone or addresses): the family globals may differ.
    node_changed: bool,
    /// Distinct objects changed since the last `desired()`, for [`Engine::pending_changes`].
    changed_services: HashSet<NamespacedName>,
    changed_slices: HashSet<NamespacedName>,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of the EndpointSlice changes
    /// since the last [`Engine::take_trigger_times`] (network programming latency).
    trigger_times: Vec<SystemTime>,

    /// Service → (healthCheckNodePort, local ready endpoints), sorted for a stable port owner.
    health: BTreeMap<NamespacedName, (u16, usize)>,
    /// The last state `desired()` returned.
    last: Option<Arc<DesiredState>>,
    /// The state before `last`, and what changed from it to `last`.
    spare: Option<Spare>,
    /// States built by copying every service (the spare was still held elsewhere, or there
    /// was none): what a test checks stays at zero in a steady stream of changes.
    copies: u64,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Engine {
            config,
            services: HashSet::new(),
            slices: HashSet::new(),
            slices_by_service: HashMap::new(),
            nodes: HashMap::new(),
            dirty: HashSet::new(),
            all_dirty: false,
            node_changed: false,
            changed_services: HashSet::new(),
            changed_slices: HashSet::new(),
            trigger_times: Vec::new(),
            health: BTreeMap::new(),
            last: None,
            spare: None,
            copies: 0,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Distinct `(Services, EndpointSlices)` changed since the last [`Engine::desired`] call.
    pub fn pending_changes(&self) -> (usize, usize) {
        (self.changed_services.len(), self.changed_slices.len())
    }

    /// The trigger times of the EndpointSlice changes applied since the previous call, as
    /// kube-proxy measures network programming latency from them (a slice without the
    /// annotation, or with an unparsable one, contributes none).
    pub fn take_trigger_times(&mut self) -> Vec<SystemTime> {
        std::mem::take(&mut self.trigger_times)
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
                    if self.services.remove(&name) {
                        self.changed_services.insert(name.clone());
                        self.dirty.insert(name);
                    }
                }
                Kind::EndpointSlice => {
                    if let Some(ByName(old)) = self.slices.take(&name) {
                        self.unindex_slice(&old);
                        self.changed_slices.insert(name);
                    }
                }
                Kind::Node => {
                    if let Some(old) = self.nodes.remove(&*name.name) {
                        self.node_updated(Some(&*old), None);
                    }
                }
                Kind::Pod => {}
            },
        }
    }

    fn put_service(&mut self, svc: Arc<Service>) {
        if self.services.get(&svc.name).is_some_and(|old| old.0 == svc) {
            return;
        }
        self.changed_services.insert(svc.name.clone());
        self.dirty.insert(svc.name.clone());
        self.services.replace(ByName(svc));
    }

    fn put_slice(&mut self, slice: Arc<EndpointSlice>) {
        if let Some(ByName(old)) = self.slices.get(&slice.name) {
            if *old == slice {
                return;
            }
            let old = old.clone();
            self.unindex_slice(&old);
        }
        if let Some(svc) = slice_service(&slice) {
            let slices = self.slices_by_service.entry(svc.clone()).or_default();
            match slices.binary_search_by(|s| s.name.cmp(&slice.name)) {
                Ok(at) => slices[at] = slice.clone(),
                Err(at) => {
                    let mut list = std::mem::take(slices).into_vec();
                    list.insert(at, slice.clone());
                    *slices = list.into_boxed_slice();
                }
            }
            self.dirty.insert(svc);
        }
        self.changed_slices.insert(slice.name.clone());
        if let Some(t) = slice
            .last_change_trigger_time
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        {
            self.trigger_times.push(t);
        }
        self.slices.replace(ByName(slice));
    }

    /// Drop `slice` from the service index and dirty the service it belonged to.
    fn unindex_slice(&mut self, slice: &EndpointSlice) {
        let Some(svc) = slice_service(slice) else {
            return;
        };
        if let Some(slices) = self.slices_by_service.get_mut(&svc) {
            if let Ok(at) = slices.binary_search_by(|s| s.name.cmp(&slice.name)) {
                let mut list = std::mem::take(slices).into_vec();
                list.remove(at);
                *slices = list.into_boxed_slice();
            }
            if slices.is_empty() {
                self.slices_by_service.remove(&svc);
            }
        }
        self.dirty.insert(svc);
    }

    fn put_node(&mut self, node: Arc<Node>) {
        if self.nodes.get(&node.name) == Some(&node) {
            return;
        }
        let old = self.nodes.insert(node.name.clone(), node.clone());
        self.node_updated(old.as_deref(), Some(&*node));
    }

    fn node_updated(&mut self, old: Option<&Node>, new: Option<&Node>) {
        let name = old.or(new).map(|n| n.name.as_str());
        if name != Some(self.config.node_name.as_str()) {
            // Other nodes are cached but affect nothing here.
            return;
        }
        self.node_changed = true;
        // The zone (topology hints) and the addresses (allowFromNode) feed per-service
        // decisions; both also feed the family globals, recomputed at every `desired()`.
        if old.and_then(|n| n.zone.as_ref()) != new.and_then(|n| n.zone.as_ref())
            || old.map(|n| &n.addresses) != new.map(|n| &n.addresses)
        {
            self.all_dirty = true;
        }
    }

    fn this_node(&self) -> Option<&Node> {
        self.nodes.get(&self.config.node_name).map(|n| &**n)
    }

    /// The desired state for everything applied so far. Services untouched since the last
    /// call keep their `Arc`s; when nothing changed at all (or every change recomputed to the
    /// same value), the previous `Arc<DesiredState>` itself is returned. Costs O(changed
    /// services) when the state before the last one is no longer held outside the engine
    /// (the sync loop drops it once the last one is applied); else one copy of the maps.
    pub fn desired(&mut self) -> Arc<DesiredState> {
        let dirty: Vec<NamespacedName> = if self.all_dirty {
            let mut all: HashSet<NamespacedName> =
                self.services.iter().map(|s| s.0.name.clone()).collect();
            all.extend(self.dirty.drain());
            all.into_iter().collect()
        } else {
            self.dirty.drain().collect()
        };
        // A burst (the first sync) leaves large empty tables behind; give them back.
        for set in [
            &mut self.dirty,
            &mut self.changed_services,
            &mut self.changed_slices,
        ] {
            set.clear();
            if set.capacity() > 1024 {
                set.shrink_to(64);
            }
        }
        self.all_dirty = false;
        self.node_changed = false;

        let mut updates: [Updates; 2] = Default::default();
        for name in &dirty {
            self.recompute(name, &mut updates);
        }
        let node = self.this_node();
        let globals = [
            family_globals(&self.config, IpFamily::V4, node),
            family_globals(&self.config, IpFamily::V6, node),
        ];
        let node_zone = node.and_then(|n| n.zone.clone());
        let health_checks = self.health_checks();

        let Some(last) = self.last.clone() else {
            let mut state = DesiredState {
                node_name: self.config.node_name.clone(),
                node_zone,
                v4: FamilyState::empty(IpFamily::V4),
                v6: FamilyState::empty(IpFamily::V6),
                health_checks,
            };
            for ((fam, updates), globals) in [&mut state.v4, &mut state.v6]
                .into_iter()
                .zip(updates)
                .zip(globals)
            {
                patch(fam, updates, globals);
            }
            let state = Arc::new(state);
            self.last = Some(state.clone());
            return state;
        };
        let globals_changed = [
            !same_globals(&last.v4, &globals[0]),
            !same_globals(&last.v6, &globals[1]),
        ];
        if updates.iter().all(BTreeMap::is_empty)
            && !globals_changed.contains(&true)
            && last.node_zone == node_zone
            && last.health_checks == health_checks
        {
            // No-op changes: the same state, so the backend sees an empty diff.
            return last;
        }

        let diff = [
            family_diff(&last.v4, &updates[0], globals_changed[0]),
            family_diff(&last.v6, &updates[1], globals_changed[1]),
        ];
        let mut state = self.take_spare(&last);
        state.node_zone = node_zone;
        state.health_checks = health_checks;
        for ((fam, updates), globals) in [&mut state.v4, &mut state.v6]
            .into_iter()
            .zip(updates)
            .zip(globals)
        {
            patch(fam, updates, globals);
        }
        let state = Arc::new(state);
        self.spare = Some(Spare { state: last, diff });
        self.last = Some(state.clone());
        state
    }

    /// The last state's contents in an owned value to patch: the spare (the state before
    /// the last) brought up to the last one when nobody else holds it, else a copy.
    fn take_spare(&mut self, last: &DesiredState) -> DesiredState {
        if let Some(Spare { state, diff }) = self.spare.take()
            && let Ok(mut spare) = Arc::try_unwrap(state)
        {
            for (fam, (from, diff)) in [&mut spare.v4, &mut spare.v6]
                .into_iter()
                .zip([&last.v4, &last.v6].into_iter().zip(diff))
            {
                for key in diff.removed {
                    fam.services.remove(&key);
                }
                for key in diff.added.into_iter().chain(diff.changed) {
                    match from.services.get(&key) {
                        Some(port) => fam.services.insert(port.clone()),
                        None => fam.services.remove(&key),
                    };
                }
            }
            return spare;
        }
        self.copies += 1;
        last.clone()
    }

    /// Make the spare state now, a copy of the last one, if there is none yet: called by the
    /// sync loop once the first sync is done, so the one copy of every service that the
    /// double buffering needs is made while the proxy is idle, not in the first change.
    pub fn prepare_spare(&mut self) {
        if self.spare.is_none()
            && let Some(last) = &self.last
        {
            self.copies += 1;
            self.spare = Some(Spare {
                state: Arc::new((**last).clone()),
                diff: Default::default(),
            });
        }
    }

    /// States built by copying every service so far (see [`Engine::desired`]).
    pub fn full_copies(&self) -> u64 {
        self.copies
    }

    /// The difference from `previous` (what the backend last applied) to `next` (what
    /// [`Engine::desired`] returned): the changes the engine made, in O(changed services),
    /// when `previous` is the state before `next` (or `next` itself); else
    /// [`Diff::between`].
    pub fn diff(
        &self,
        previous: Option<Arc<DesiredState>>,
        next: &Arc<DesiredState>,
        full: bool,
    ) -> Diff {
        if let (Some(prev), Some(last)) = (&previous, &self.last)
            && Arc::ptr_eq(last, next)
        {
            if Arc::ptr_eq(prev, next) {
                return Diff {
                    previous,
                    full,
                    v4: FamilyDiff::default(),
                    v6: FamilyDiff::default(),
                };
            }
            if let Some(spare) = &self.spare
                && Arc::ptr_eq(&spare.state, prev)
            {
                let [v4, v6] = spare.diff.clone();
                return Diff {
                    previous,
                    full,
                    v4,
                    v6,
                };
            }
        }
        Diff::between(previous, next, full)
    }

    /// The healthCheckNodePort servers, keyed by port.
    fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
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
        health_checks
    }

    /// Why the ports of Service `name` got their endpoints (every family), computed now
    /// from the cached objects by the same code as [`Engine::desired`]; empty for an
    /// unknown or skipped Service. For `svcplane trace`.
    pub fn explain(&self, name: &NamespacedName) -> Vec<PortSelection> {
        let Some(ByName(svc)) = self.services.get(name) else {
            return Vec::new();
        };
        let slices = self.slices_of(name);
        let this_node = self.this_node();
        let ctx = NodeContext {
            node_name: &self.config.node_name,
            zone: this_node.and_then(|n| n.zone.as_deref()),
            node_ips: this_node.map_or(&[], |n| n.addresses.as_slice()),
        };
        explain_service(svc, &slices, &ctx)
    }

    /// The Service's EndpointSlices, in slice-name order.
    fn slices_of(&self, name: &NamespacedName) -> Vec<&EndpointSlice> {
        self.slices_by_service
            .get(name)
            .into_iter()
            .flatten()
            .map(|s| &**s)
            .collect()
    }

    /// Compute `name`'s ports afresh and record, per family, those that differ from the
    /// last state (new or changed values, and ports it no longer has).
    fn recompute(&mut self, name: &NamespacedName, updates: &mut [Updates; 2]) {
        self.health.remove(name);
        let output = match self.services.get(name) {
            Some(ByName(svc)) => {
                let slices = self.slices_of(name);
                let this_node = self.this_node();
                let ctx = NodeContext {
                    node_name: &self.config.node_name,
                    zone: this_node.and_then(|n| n.zone.as_deref()),
                    node_ips: this_node.map_or(&[], |n| n.addresses.as_slice()),
                };
                compute_service(svc, &slices, &ctx)
            }
            None => ServiceOutput::default(),
        };
        if let Some(hc) = output.health_check {
            self.health.insert(name.clone(), hc);
        }
        let last = self.last.as_deref();
        for ((states, updates), old) in [output.v4, output.v6]
            .into_iter()
            .zip(updates.iter_mut())
            .zip([last.map(|l| &l.v4), last.map(|l| &l.v6)])
        {
            let mut gone: BTreeSet<&ServicePortName> =
                old.map(|o| ports_of(o, name).collect()).unwrap_or_default();
            for state in states {
                gone.remove(&state.name);
                let same = old
                    .and_then(|o| o.services.get(&state.name))
                    .is_some_and(|prev| **prev == state);
                if !same {
                    updates.insert(state.name.clone(), Some(Arc::new(state)));
                }
            }
            for key in gone {
                updates.insert(key.clone(), None);
            }
        }
    }
}

/// The keys of `name`'s ports in `fam` (they sort together: the service comes first).
fn ports_of<'a>(
    fam: &'a FamilyState,
    name: &'a NamespacedName,
) -> impl Iterator<Item = &'a ServicePortName> + 'a {
    let lowest = ServicePortName {
        service: name.clone(),
        port: "".into(),
        protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .into_iter()
            .min()
            .unwrap_or(Protocol::Tcp),
    };
    fam.services
        .from_name(&lowest)
        .map(|p| &p.name)
        .take_while(move |k| k.service == *name)
}

/// Replace `fam`'s node-wide settings with `globals`' and apply `updates` to its services.
fn patch(fam: &mut FamilyState, updates: Updates, globals: FamilyState) {
    let mut services = std::mem::take(&mut fam.services);
    for (key, port) in updates {
        match port {
            Some(port) => services.insert(port),
            None => services.remove(&key),
        };
    }
    *fam = FamilyState {
        services,
        ..globals
    };
}

/// Whether two family states have the same node-wide settings (services aside).
fn same_globals(a: &FamilyState, b: &FamilyState) -> bool {
    a.cluster_cidrs == b.cluster_cidrs
        && a.cluster_ip_masquerade == b.cluster_ip_masquerade
        && a.nodeport_addresses == b.nodeport_addresses
        && a.node_ips == b.node_ips
}

/// What `updates` (each one a real change) do to `old`'s services.
fn family_diff(old: &FamilyState, updates: &Updates, globals_changed: bool) -> FamilyDiff {
    let mut d = FamilyDiff {
        globals_changed,
        ..FamilyDiff::default()
    };
    for (key, port) in updates {
        let set = match (port, old.services.contains_key(key)) {
            (None, _) => &mut d.removed,
            (Some(_), true) => &mut d.changed,
            (Some(_), false) => &mut d.added,
        };
        set.insert(key.clone());
    }
    d
}

/// The Service a slice belongs to: its `kubernetes.io/service-name` label, same namespace.
fn slice_service(slice: &EndpointSlice) -> Option<NamespacedName> {
    slice
        .service_name
        .as_ref()
        .filter(|s| !s.is_empty())
        .map(|s| NamespacedName {
            namespace: slice.name.namespace.clone(),
            name: s.clone(),
        })
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
        services: ServicePorts::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use svcplane_model::{Pod, TrafficPolicy};

    fn config() -> EngineConfig {
        EngineConfig {
            node_name: NODE.to_string(),
            ..EngineConfig::default()
        }
    }

    fn svc_key(ns: &str, name: &str) -> ServicePortName {
        ServicePortName {
            service: NamespacedName::new(ns, name),
            port: "".into(),
            protocol: svcplane_model::Protocol::Tcp,
        }
    }

    fn apply(engine: &mut Engine, obj: Object) {
        engine.apply(Change::Apply(obj));
    }

    fn delete(engine: &mut Engine, kind: Kind, ns: &str, name: &str) {
        engine.apply(Change::Delete(ObjectKey {
            kind,
            name: NamespacedName::new(ns, name),
        }));
    }

    fn endpoint_ips(state: &DesiredState, key: &ServicePortName) -> Vec<String> {
        let sp = &state.v4.services[key];
        sp.target_endpoints(&sp.internal)
            .map(|e| e.ip.to_string())
            .collect()
    }

    #[test]
    fn trigger_times_of_changed_slices_are_collected_once() {
        let mut engine = Engine::new(config());
        let mut s = slice("demo", "web-1", "web", 8080, vec![ep("10.244.1.5", NODE)]);
        s.last_change_trigger_time = Some("2024-01-01T00:00:01.5Z".into());
        engine.apply(Change::Apply(Object::from(s.clone())));
        // The same object again is no change, and brings no second time.
        engine.apply(Change::Apply(Object::from(s.clone())));
        let mut unparsable = slice("demo", "web-2", "web", 8080, vec![ep("10.244.1.6", NODE)]);
        unparsable.last_change_trigger_time = Some("yesterday".into());
        engine.apply(Change::Apply(Object::from(unparsable)));
        let expected = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_704_067_201_500);
        assert_eq!(engine.take_trigger_times(), vec![expected]);
        assert!(engine.take_trigger_times().is_empty());
    }

    #[test]
    fn empty_engine_yields_empty_state() {
        let mut engine = Engine::new(config());
        let state = engine.desired();
        assert_eq!(state.node_name, NODE);
        assert!(state.v4.services.is_empty() && state.v6.services.is_empty());
        assert_eq!(state.v4.nodeport_addresses, NodePortAddresses::AllLocal);
        assert_eq!(state.v4.cluster_ip_masquerade, ClusterIpMasquerade::None);
    }

    #[test]
    fn services_and_slices_tracked_by_service_label() {
        let mut engine = Engine::new(config());
        apply(
            &mut engine,
            Object::from(service("ns", "web", &["10.96.0.10"])),
        );
        apply(
            &mut engine,
            Object::from(slice(
                "ns",
                "web-1",
                "web",
                8080,
                vec![ep("10.0.0.1", "node-b")],
            )),
        );
        // Same service name in another namespace: not ours.
        apply(
            &mut engine,
            Object::from(slice(
                "other",
                "web-1",
                "web",
                8080,
                vec![ep("10.0.0.9", "node-b")],
            )),
        );
        // A slice without the service-name label belongs to nothing.
        let mut orphan = slice("ns", "orphan", "web", 8080, vec![ep("10.0.0.8", "node-b")]);
        orphan.service_name = None;
        apply(&mut engine, Object::from(orphan));
        let state = engine.desired();
        assert_eq!(endpoint_ips(&state, &svc_key("ns", "web")), ["10.0.0.1"]);

        // Relabel the slice to another service: the old service loses it, the new one gains it.
        apply(
            &mut engine,
            Object::from(service("ns", "api", &["10.96.0.11"])),
        );
        apply(
            &mut engine,
            Object::from(slice(
                "ns",
                "web-1",
                "api",
                8080,
                vec![ep("10.0.0.1", "node-b")],
            )),
        );
        let state = engine.desired();
        assert!(endpoint_ips(&state, &svc_key("ns", "web")).is_empty());
        assert_eq!(endpoint_ips(&state, &svc_key("ns", "api")), ["10.0.0.1"]);

        delete(&mut engine, Kind::EndpointSlice, "ns", "web-1");
        let state = engine.desired();
        assert!(endpoint_ips(&state, &svc_key("ns", "api")).is_empty());

        delete(&mut engine, Kind::Service, "ns", "web");
        let state = engine.desired();
        assert!(!state.v4.services.contains_key(&svc_key("ns", "web")));
        assert!(state.v4.services.contains_key(&svc_key("ns", "api")));
    }

    #[test]
    fn pending_changes_counts_distinct_objects_and_ignores_no_ops() {
        let mut engine = Engine::new(config());
        assert_eq!(engine.pending_changes(), (0, 0));
        assert!(!engine.has_pending());
        let svc = service("ns", "web", &["10.96.0.10"]);
        let s1 = slice("ns", "web-1", "web", 8080, vec![ep("10.0.0.1", "node-b")]);
        apply(&mut engine, Object::from(svc.clone()));
        apply(&mut engine, Object::from(svc.clone()));
        apply(&mut engine, Object::from(s1.clone()));
        apply(
            &mut engine,
            Object::from(slice("ns", "web-2", "web", 8080, vec![])),
        );
        assert_eq!(engine.pending_changes(), (1, 2));
        assert!(engine.has_pending());
        engine.desired();
        assert_eq!(engine.pending_changes(), (0, 0));
        assert!(!engine.has_pending());

        // Re-applying identical objects, deleting unknown ones and Pods change nothing.
        apply(&mut engine, Object::from(svc));
        apply(&mut engine, Object::from(s1));
        delete(&mut engine, Kind::Service, "ns", "nope");
        delete(&mut engine, Kind::EndpointSlice, "ns", "nope");
        apply(
            &mut engine,
            Object::from(Pod {
                name: NamespacedName::new("ns", "p"),
                labels: Default::default(),
                ips: vec![ip("10.0.0.1")],
                node_name: None,
                ready: true,
                terminating: false,
                finished: false,
                hostname: None,
                subdomain: None,
                container_ports: vec![],
            }),
        );
        assert_eq!(engine.pending_changes(), (0, 0));
        assert!(!engine.has_pending());
    }

    #[test]
    fn unchanged_services_keep_their_arcs() {
        let mut engine = Engine::new(config());
        for i in 0..50u8 {
            let name = format!("svc-{i}");
            apply(
                &mut engine,
                Object::from(service("ns", &name, &[&format!("10.96.0.{i}")])),
            );
            apply(
                &mut engine,
                Object::from(slice(
                    "ns",
                    &format!("{name}-1"),
                    &name,
                    8080,
                    vec![ep(&format!("10.0.1.{i}"), "node-b")],
                )),
            );
        }
        let first = engine.desired();
        assert_eq!(first.v4.services.len(), 50);
        // Nothing changed: the very same state.
        assert!(Arc::ptr_eq(&first, &engine.desired()));

        apply(
            &mut engine,
            Object::from(slice(
                "ns",
                "svc-7-1",
                "svc-7",
                8080,
                vec![ep("10.0.1.7", "node-b"), ep("10.0.2.7", "node-c")],
            )),
        );
        assert_eq!(engine.pending_changes(), (0, 1));
        let second = engine.desired();
        let changed = svc_key("ns", "svc-7");
        for (key, arc) in &second.v4.services {
            let same = Arc::ptr_eq(arc, &first.v4.services[key]);
            assert_eq!(same, *key != changed, "{key}");
        }
        let diff = Diff::between(Some(first.clone()), &second, false);
        assert_eq!(diff.v4.changed, BTreeSet::from([changed.clone()]));
        assert!(diff.v4.added.is_empty() && diff.v4.removed.is_empty());
        assert!(!diff.v4.globals_changed && !diff.full);

        // A change that recomputes to the same value keeps the Arc too.
        let mut svc = service("ns", "svc-3", &["10.96.0.3"]);
        svc.selector = Some([("team".into(), "x".into())].into());
        apply(&mut engine, Object::from(svc));
        let third = engine.desired();
        assert!(Arc::ptr_eq(&third, &second));
    }

    #[test]
    fn ten_thousand_services_one_endpoint_change_recomputes_one() {
        let mut engine = Engine::new(config());
        let n = 10_000u32;
        let name = |i: u32| format!("svc-{i}");
        for i in 0..n {
            let cip = format!("10.96.{}.{}", i / 256, i % 256);
            engine.apply(Change::Apply(Object::from(service(
                "ns",
                &name(i),
                &[&cip],
            ))));
            let epip = format!("10.1.{}.{}", i / 256, i % 256);
            engine.apply(Change::Apply(Object::from(slice(
                "ns",
                &format!("{}-1", name(i)),
                &name(i),
                8080,
                vec![ep(&epip, "node-b")],
            ))));
        }
        let first = engine.desired();
        assert_eq!(first.v4.services.len(), n as usize);
        engine.apply(Change::Apply(Object::from(slice(
            "ns",
            "svc-4242-1",
            "svc-4242",
            8080,
            vec![ep("10.1.16.146", "node-b"), ep("10.2.0.1", NODE)],
        ))));
        let second = engine.desired();
        let rebuilt: Vec<_> = second
            .v4
            .services
            .iter()
            .filter(|(k, v)| !Arc::ptr_eq(v, &first.v4.services[*k]))
            .map(|(k, _)| k.to_string())
            .collect();
        assert_eq!(rebuilt, ["ns/svc-4242/TCP"]);
    }

    /// A tiny deterministic generator, so the sequence below is the same on every run.
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// A random change of a small cluster: Services (dual-stack, LoadBalancer eTP Local with
    /// health checks, extra ports) and slices come and go, and this node's zone changes.
    fn random_change(rng: &mut Lcg, objects: &mut BTreeMap<String, Option<Object>>) -> Change {
        let i = rng.below(12);
        let name = format!("svc-{i}");
        let (key, change) = match rng.below(10) {
            0..=2 => {
                let mut svc = if rng.below(3) == 0 {
                    let mut s = lb_service("ns", &name, &[&format!("10.96.0.{i}"), "fd00::1"]);
                    s.external_traffic_policy = TrafficPolicy::Local;
                    s.rare.health_check_node_port = Some(32000 + i as u16 % 3);
                    s
                } else {
                    service("ns", &name, &[&format!("10.96.0.{i}")])
                };
                if rng.below(2) == 0 {
                    svc.ports
                        .push(port("dns", svcplane_model::Protocol::Udp, 53));
                }
                (name.clone(), Change::Apply(Object::from(svc)))
            }
            3..=7 => {
                let nodes = [NODE, "node-b"];
                let eps = (0..rng.below(4))
                    .map(|k| {
                        let addr = format!("10.0.{i}.{}", rng.below(5) + k * 10);
                        zone_hints(
                            ep(&addr, nodes[rng.below(2) as usize]),
                            &[["zone-a", "zone-b"][rng.below(2) as usize]],
                        )
                    })
                    .collect();
                let slice_name = format!("{name}-{}", rng.below(2));
                let obj = Object::from(slice("ns", &slice_name, &name, 8080, eps));
                (slice_name, Change::Apply(obj))
            }
            8 => {
                let zone = ["zone-a", "zone-b"][rng.below(2) as usize];
                let obj = Object::from(node(NODE, Some(zone), &["192.168.0.1"]));
                ("node".to_owned(), Change::Apply(obj))
            }
            _ => {
                let (kind, n) = if rng.below(2) == 0 {
                    (Kind::Service, name.clone())
                } else {
                    (Kind::EndpointSlice, format!("{name}-{}", rng.below(2)))
                };
                let key = ObjectKey {
                    kind,
                    name: NamespacedName::new("ns", n.clone()),
                };
                objects.insert(n, None);
                return Change::Delete(key);
            }
        };
        if let Change::Apply(obj) = &change {
            objects.insert(key, Some(obj.clone()));
        }
        change
    }

    #[test]
    fn patched_states_equal_fresh_ones_and_reuse_the_spare() {
        let mut rng = Lcg(7);
        let mut engine = Engine::new(config());
        let mut objects = BTreeMap::new();
        let mut applied: Option<Arc<DesiredState>> = None;
        for step in 0..400 {
            for _ in 0..rng.below(3) + 1 {
                let change = random_change(&mut rng, &mut objects);
                engine.apply(change);
            }
            let next = engine.desired();
            // What the sync loop does: the engine's diff, against what was last applied.
            let diff = engine.diff(applied.clone(), &next, false);
            assert_eq!(
                diff,
                Diff::between(applied.clone(), &next, false),
                "step {step}"
            );
            // The patched state is exactly what a fresh engine computes from the objects.
            let mut fresh = Engine::new(config());
            for obj in objects.values().flatten() {
                fresh.apply(Change::Apply(obj.clone()));
            }
            assert_eq!(*next, *fresh.desired(), "step {step}");
            applied = Some(next);
        }
        // Only the second state was a copy of every service; every later one was the spare,
        // patched, because nothing but the engine held it.
        assert_eq!(engine.full_copies(), 1);
    }

    #[test]
    fn a_prepared_spare_makes_the_first_change_a_patch_too() {
        let mut rng = Lcg(3);
        let mut engine = Engine::new(config());
        let mut objects = BTreeMap::new();
        for _ in 0..30 {
            let change = random_change(&mut rng, &mut objects);
            engine.apply(change);
        }
        let mut applied = engine.desired();
        engine.prepare_spare();
        engine.prepare_spare();
        assert_eq!(engine.full_copies(), 1);
        for step in 0..50 {
            let change = random_change(&mut rng, &mut objects);
            engine.apply(change);
            let next = engine.desired();
            let diff = engine.diff(Some(applied.clone()), &next, false);
            assert_eq!(
                diff,
                Diff::between(Some(applied.clone()), &next, false),
                "step {step}"
            );
            let mut fresh = Engine::new(config());
            for obj in objects.values().flatten() {
                fresh.apply(Change::Apply(obj.clone()));
            }
            assert_eq!(*next, *fresh.desired(), "step {step}");
            applied = next;
        }
        // The prepared copy was the only one.
        assert_eq!(engine.full_copies(), 1);
    }

    #[test]
    fn a_state_still_held_is_copied_and_diffs_fall_back() {
        let mut rng = Lcg(11);
        let mut engine = Engine::new(config());
        let mut objects = BTreeMap::new();
        for _ in 0..20 {
            let change = random_change(&mut rng, &mut objects);
            engine.apply(change);
        }
        let first = engine.desired();
        let mut states = vec![first.clone()];
        let mut changes = 0;
        while states.len() < 6 {
            let change = random_change(&mut rng, &mut objects);
            engine.apply(change);
            changes += 1;
            let next = engine.desired();
            if !Arc::ptr_eq(&next, states.last().unwrap()) {
                states.push(next);
            }
        }
        // Every state is still held (a sync that failed keeps the old one), so each one was
        // built as a copy; the diff from the first (not the state before the last) is
        // computed by comparison, and still right.
        assert_eq!(engine.full_copies(), 5, "{changes} changes");
        let last = states.last().unwrap();
        assert_eq!(
            engine.diff(Some(first.clone()), last, true),
            Diff::between(Some(first), last, true)
        );
        let same = engine.diff(Some(last.clone()), last, false);
        assert!(same.is_empty() && same.previous.is_some());
    }

    #[test]
    fn endpoint_node_names_are_the_slices_own() {
        // What `trace` shows shares the slice's `Arc`s: no copy of a node name.
        let mut engine = Engine::new(config());
        apply(
            &mut engine,
            Object::from(service("ns", "web", &["10.96.0.10"])),
        );
        let slice = Arc::new(slice(
            "ns",
            "web-1",
            "web",
            8080,
            vec![ep("10.0.0.1", "node-b")],
        ));
        engine.apply(Change::Apply(Object::EndpointSlice(slice.clone())));
        let explained = engine.explain(&NamespacedName::new("ns", "web"));
        assert!(Arc::ptr_eq(
            explained[0].endpoints[0].node_name.as_ref().unwrap(),
            slice.endpoints[0].node_name().unwrap()
        ));
    }

    #[test]
    fn diff_between_added_changed_removed() {
        let mut engine = Engine::new(config());
        apply(
            &mut engine,
            Object::from(service("ns", "a", &["10.96.0.1"])),
        );
        apply(
            &mut engine,
            Object::from(service("ns", "b", &["10.96.0.2"])),
        );
        let s1 = engine.desired();
        let d = Diff::between(None, &s1, false);
        assert!(d.full);
        assert_eq!(d.v4.added.len(), 2);

        delete(&mut engine, Kind::Service, "ns", "a");
        let mut b = service("ns", "b", &["10.96.0.2"]);
        b.session_affinity_timeout = Some(60);
        apply(&mut engine, Object::from(b));
        apply(
            &mut engine,
            Object::from(service("ns", "c", &["10.96.0.3", "fd00::3"])),
        );
        let s2 = engine.desired();
        let d = Diff::between(Some(s1), &s2, false);
        assert_eq!(d.v4.removed, BTreeSet::from([svc_key("ns", "a")]));
        assert_eq!(d.v4.changed, BTreeSet::from([svc_key("ns", "b")]));
        assert_eq!(d.v4.added, BTreeSet::from([svc_key("ns", "c")]));
        assert_eq!(d.v6.added, BTreeSet::from([svc_key("ns", "c")]));
        assert!(d.v6.removed.is_empty() && d.v6.changed.is_empty());
        assert!(!d.is_empty());
    }

    #[test]
    fn node_zone_change_recomputes_everything() {
        let mut engine = Engine::new(config());
        let hinted = |addr: &str, zone: &str| zone_hints(ep(addr, "node-b"), &[zone]);
        for name in ["a", "b"] {
            apply(
                &mut engine,
                Object::from(service("ns", name, &["10.96.0.1"])),
            );
            apply(
                &mut engine,
                Object::from(slice(
                    "ns",
                    &format!("{name}-1"),
                    name,
                    8080,
                    vec![hinted("10.0.0.1", "zone-a"), hinted("10.0.0.2", "zone-b")],
                )),
            );
        }
        apply(
            &mut engine,
            Object::from(node(NODE, Some("zone-a"), &["192.168.0.1"])),
        );
        // Other nodes never matter.
        apply(
            &mut engine,
            Object::from(node("node-b", Some("zone-b"), &["192.168.0.2"])),
        );
        let s1 = engine.desired();
        assert_eq!(s1.node_zone.as_deref(), Some("zone-a"));
        assert_eq!(endpoint_ips(&s1, &svc_key("ns", "a")), ["10.0.0.1"]);
        assert_eq!(endpoint_ips(&s1, &svc_key("ns", "b")), ["10.0.0.1"]);

        apply(
            &mut engine,
            Object::from(node("node-b", Some("zone-c"), &["192.168.0.2"])),
        );
        assert!(!engine.has_pending());

        apply(
            &mut engine,
            Object::from(node(NODE, Some("zone-b"), &["192.168.0.1"])),
        );
        assert!(engine.has_pending());
        let s2 = engine.desired();
        assert_eq!(s2.node_zone.as_deref(), Some("zone-b"));
        assert_eq!(endpoint_ips(&s2, &svc_key("ns", "a")), ["10.0.0.2"]);
        assert_eq!(endpoint_ips(&s2, &svc_key("ns", "b")), ["10.0.0.2"]);

        // Node deleted: no zone, hints ignored.
        delete(&mut engine, Kind::Node, "", NODE);
        let s3 = engine.desired();
        assert_eq!(s3.node_zone, None);
        assert_eq!(
            endpoint_ips(&s3, &svc_key("ns", "a")),
            ["10.0.0.1", "10.0.0.2"]
        );
        assert!(s3.v4.node_ips.is_empty());
    }

    #[test]
    fn node_address_change_updates_globals_and_keeps_services() {
        let mut engine = Engine::new(config());
        apply(
            &mut engine,
            Object::from(service("ns", "a", &["10.96.0.1"])),
        );
        apply(
            &mut engine,
            Object::from(node(NODE, None, &["192.168.0.1", "fd00:1::1"])),
        );
        let s1 = engine.desired();
        assert_eq!(s1.v4.node_ips, vec![ip("192.168.0.1")]);
        assert_eq!(s1.v6.node_ips, vec![ip("fd00:1::1")]);
        apply(
            &mut engine,
            Object::from(node(NODE, None, &["192.168.0.9", "fd00:1::1"])),
        );
        assert!(engine.has_pending());
        let s2 = engine.desired();
        assert_eq!(s2.v4.node_ips, vec![ip("192.168.0.9")]);
        let key = svc_key("ns", "a");
        assert!(Arc::ptr_eq(&s1.v4.services[&key], &s2.v4.services[&key]));
        let d = Diff::between(Some(s1), &s2, false);
        assert!(d.v4.globals_changed && !d.v6.globals_changed);
        assert!(d.v4.changed.is_empty());

        // A LoadBalancer whose source ranges now contain the node: its LB IP is allowed
        // (allowFromNode), so that service changes.
        let mut lb = lb_service("ns", "lb", &["10.96.0.2"]);
        lb.rare.load_balancer_ips = vec![ip("192.0.2.1")];
        lb.rare.load_balancer_source_ranges = vec!["192.168.0.9/32".parse().unwrap()];
        apply(&mut engine, Object::from(lb));
        let s3 = engine.desired();
        let lb_key = svc_key("ns", "lb");
        assert_eq!(s3.v4.services[&lb_key].load_balancer_source_ranges.len(), 2);
        apply(
            &mut engine,
            Object::from(node(NODE, None, &["192.168.0.1", "fd00:1::1"])),
        );
        let s4 = engine.desired();
        assert_eq!(s4.v4.services[&lb_key].load_balancer_source_ranges.len(), 1);
        assert!(Arc::ptr_eq(&s3.v4.services[&key], &s4.v4.services[&key]));
        let d = Diff::between(Some(s3), &s4, false);
        assert!(d.v4.changed.contains(&lb_key), "{d:?}");
    }

    #[test]
    fn family_globals_from_config() {
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let mut cfg = EngineConfig {
            node_name: NODE.into(),
            cluster_cidrs: vec![net("10.244.0.0/16"), net("fd00:244::/56")],
            nodeport_addresses: vec![net("192.168.0.0/24")],
            masquerade_all: false,
        };
        let v4 = family_globals(&cfg, IpFamily::V4, None);
        let v6 = family_globals(&cfg, IpFamily::V6, None);
        assert_eq!(v4.cluster_cidrs, vec![net("10.244.0.0/16")]);
        assert_eq!(
            v4.cluster_ip_masquerade,
            ClusterIpMasquerade::FromOutside(vec![net("10.244.0.0/16")])
        );
        assert_eq!(
            v6.cluster_ip_masquerade,
            ClusterIpMasquerade::FromOutside(vec![net("fd00:244::/56")])
        );
        assert_eq!(
            v4.nodeport_addresses,
            NodePortAddresses::Cidrs(vec![net("192.168.0.0/24")])
        );
        // kube-proxy: no CIDR of this family → every local address of this family.
        assert_eq!(v6.nodeport_addresses, NodePortAddresses::AllLocal);

        cfg.masquerade_all = true;
        cfg.cluster_cidrs = vec![net("10.244.0.0/16")];
        cfg.nodeport_addresses = vec![net("0.0.0.0/0"), net("192.168.0.0/24")];
        let v4 = family_globals(&cfg, IpFamily::V4, None);
        let v6 = family_globals(&cfg, IpFamily::V6, None);
        assert_eq!(v4.cluster_ip_masquerade, ClusterIpMasquerade::All);
        assert_eq!(v6.cluster_ip_masquerade, ClusterIpMasquerade::All);
        assert!(v6.cluster_cidrs.is_empty());
        assert_eq!(v4.nodeport_addresses, NodePortAddresses::AllLocal);

        cfg.masquerade_all = false;
        let v6 = family_globals(&cfg, IpFamily::V6, None);
        assert_eq!(v6.cluster_ip_masquerade, ClusterIpMasquerade::None);
    }

    #[test]
    fn health_checks_keyed_by_port_first_service_wins() {
        let mut engine = Engine::new(config());
        let lb = |name: &str, hc: u16| {
            let mut s = lb_service("ns", name, &["10.96.0.1"]);
            s.external_traffic_policy = TrafficPolicy::Local;
            s.rare.health_check_node_port = Some(hc);
            s
        };
        apply(&mut engine, Object::from(lb("a", 32000)));
        apply(&mut engine, Object::from(lb("b", 32001)));
        apply(&mut engine, Object::from(lb("c", 32000)));
        apply(
            &mut engine,
            Object::from(slice("ns", "b-1", "b", 8080, vec![ep("10.0.0.1", NODE)])),
        );
        let state = engine.desired();
        assert_eq!(state.health_checks.len(), 2);
        assert_eq!(
            state.health_checks[&32000].service,
            NamespacedName::new("ns", "a")
        );
        assert_eq!(state.health_checks[&32000].local_endpoints, 0);
        assert_eq!(state.health_checks[&32001].local_endpoints, 1);

        delete(&mut engine, Kind::Service, "ns", "b");
        let state = engine.desired();
        assert!(!state.health_checks.contains_key(&32001));
    }
}
