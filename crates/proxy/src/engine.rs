use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use svcplane_model::{
    Change, EndpointSlice, IpFamily, Kind, NamespacedName, Node, Object, ObjectKey, Service,
    ServicePortName,
};

use crate::compute::{NodeContext, compute_service, explain_service};
use crate::desired::{
    ClusterIpMasquerade, DesiredState, FamilyState, HealthCheck, NodePortAddresses, PortSelection,
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
    /// Shared with the source that sent them (no second copy).
    services: HashMap<NamespacedName, Arc<Service>>,
    slices: HashMap<NamespacedName, Arc<EndpointSlice>>,
    /// Service (namespace/name) → names of the slices labelled with it.
    slices_by_service: HashMap<NamespacedName, BTreeSet<NamespacedName>>,
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
            trigger_times: Vec::new(),
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
                        self.node_updated(Some(&*old), None);
                    }
                }
                Kind::Pod => {}
            },
        }
    }

    fn put_service(&mut self, svc: Arc<Service>) {
        if self.services.get(&svc.name) == Some(&svc) {
            return;
        }
        self.changed_services.insert(svc.name.clone());
        self.dirty.insert(svc.name.clone());
        self.services.insert(svc.name.clone(), svc);
    }

    fn put_slice(&mut self, slice: Arc<EndpointSlice>) {
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
        if let Some(t) = slice
            .last_change_trigger_time
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        {
            self.trigger_times.push(t);
        }
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

    /// Why the ports of Service `name` got their endpoints (every family), computed now
    /// from the cached objects by the same code as [`Engine::desired`]; empty for an
    /// unknown or skipped Service. For `svcplane trace`.
    pub fn explain(&self, name: &NamespacedName) -> Vec<PortSelection> {
        let Some(svc) = self.services.get(name) else {
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
            .filter_map(|s| self.slices.get(s).map(|s| &**s))
            .collect()
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
        let slices = self.slices_of(name);
        let this_node = self.this_node();
        let ctx = NodeContext {
            node_name: &self.config.node_name,
            zone: this_node.and_then(|n| n.zone.as_deref()),
            node_ips: this_node.map_or(&[], |n| n.addresses.as_slice()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::Diff;
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
            port: String::new(),
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
        svc.labels.insert("team".into(), "x".into());
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
        lb.load_balancer_ips = vec![ip("192.0.2.1")];
        lb.load_balancer_source_ranges = vec!["192.168.0.9/32".parse().unwrap()];
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
            s.health_check_node_port = Some(hc);
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
