//! Compact, validated internal types. Every value here has passed validation
//! (see `validate`), so later stages may trust it: IPs parse and agree with the
//! object's families, ports are in range, names are DNS labels/subdomains.
//! Validated names are what guarantees nothing from a manifest can inject text
//! into a rule set.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// L4 protocol of a Service or endpoint port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Lower-case name as nftables/iptables/IPVS spell it (`tcp`, `udp`, `sctp`).
    pub fn as_lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
    /// The Kubernetes spelling (`TCP`, `UDP`, `SCTP`).
    pub fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
    /// Parse the Kubernetes spelling; `None` for anything else.
    pub fn from_k8s(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_k8s())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
    pub fn of_net(net: &IpNet) -> IpFamily {
        match net {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }
    /// The Kubernetes spelling (`IPv4`, `IPv6`).
    pub fn as_k8s(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
    pub fn from_k8s(s: &str) -> Option<IpFamily> {
        match s {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_k8s())
    }
}

/// At most two IP families (one of each), in order, read as a slice: a Service's, inline
/// (a `Vec` of one family was a 24 B header and a 32 B allocation per Service).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpFamilies {
    /// Slots past `len` hold `V4`, so that equal lists compare equal.
    list: [IpFamily; 2],
    len: u8,
}

impl Default for IpFamilies {
    fn default() -> Self {
        IpFamilies {
            list: [IpFamily::V4; 2],
            len: 0,
        }
    }
}

impl IpFamilies {
    /// Appends `family`; a third one is dropped (a Service has at most one of each:
    /// validation refuses duplicates).
    pub fn push(&mut self, family: IpFamily) {
        if let Some(slot) = self.list.get_mut(usize::from(self.len)) {
            *slot = family;
            self.len += 1;
        }
    }
}

impl std::ops::Deref for IpFamilies {
    type Target = [IpFamily];
    fn deref(&self) -> &[IpFamily] {
        &self.list[..usize::from(self.len)]
    }
}

impl FromIterator<IpFamily> for IpFamilies {
    fn from_iter<I: IntoIterator<Item = IpFamily>>(iter: I) -> Self {
        let mut families = IpFamilies::default();
        iter.into_iter().for_each(|f| families.push(f));
        families
    }
}

impl From<Vec<IpFamily>> for IpFamilies {
    fn from(families: Vec<IpFamily>) -> Self {
        families.into_iter().collect()
    }
}

impl PartialEq<Vec<IpFamily>> for IpFamilies {
    fn eq(&self, other: &Vec<IpFamily>) -> bool {
        **self == **other
    }
}

impl fmt::Debug for IpFamilies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// `namespace/name`. For cluster-scoped objects (Node) the namespace is empty.
///
/// Copied as a key into every map of the sources, the engine and its states, so a copy is
/// two reference counts, not two allocations: the namespace is the process-wide shared
/// copy ([`crate::shared_name`]: 10k Services in one namespace hold one string), the name
/// one `Arc` per object that all its copies share. Reads as `&str` through deref.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl NamespacedName {
    /// The namespace is interned; `name` is kept as given (an `Arc<str>` is not copied).
    pub fn new(namespace: impl AsRef<str>, name: impl Into<Arc<str>>) -> Self {
        NamespacedName {
            namespace: crate::shared_name(namespace.as_ref()),
            name: name.into(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// kube-proxy's key for one Service port: `namespace/name:portName` plus protocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub service: NamespacedName,
    /// The port's `name` (empty for a single unnamed port), shared ([`crate::shared_name`]):
    /// a handful of distinct port names serve every Service.
    pub port: Arc<str>,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    /// `ns/name:port/TCP` (`ns/name/TCP` for an unnamed port).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.service)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// internalTrafficPolicy / externalTrafficPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetPort {
    Number(u16),
    /// A named container port, resolved per Pod by the EndpointSlice controller.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Empty only when the Service has a single port. Shared ([`crate::shared_name`]), as
    /// every [`ServicePortName`] of the port holds it.
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

/// A validated v1 Service. Compact, as 10k of them are kept: what a ClusterIP Service
/// leaves empty is in [`ServiceRare`], allocated only when one of its fields is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: NamespacedName,
    pub service_type: ServiceType,
    /// spec.clusterIPs (primary first). Empty for headless and ExternalName.
    pub cluster_ips: Vec<IpAddr>,
    /// spec.clusterIP was "None".
    pub headless: bool,
    /// spec.ipFamilies (in order), or derived from clusterIPs when absent.
    pub ip_families: IpFamilies,
    pub ports: Vec<ServicePort>,
    /// Some(timeoutSeconds) when sessionAffinity is ClientIP (default 10800).
    pub session_affinity_timeout: Option<u32>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    /// spec.selector; `None` when the Service has no selector (EndpointSlices are managed by hand).
    pub selector: Option<BTreeMap<String, String>>,
    pub publish_not_ready_addresses: bool,
    /// Label `service.kubernetes.io/headless` is set: kube-proxy's informer never sees the
    /// Service. The only label the engine reads, so the labels themselves are not kept
    /// (most Services carry some; keeping them would box [`ServiceRare`] for every one).
    pub headless_label: bool,
    /// What the API server would allocate from this Service's spec; only the standalone
    /// mode's allocator reads it (a Service from the API server has been allocated).
    /// Inline, not in [`ServiceRare`]: the API server writes ipFamilies into every Service.
    pub allocation: AllocationRequest,
    /// Read and written as `svc.rare.external_ips` and so on.
    pub rare: Rare,
}

/// The fields of a [`Service`] that a ClusterIP Service leaves empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceRare {
    /// spec.externalName for type ExternalName (a validated DNS subdomain).
    pub external_name: Option<String>,
    pub external_ips: Vec<IpAddr>,
    /// status.loadBalancer.ingress[].ip whose ipMode is not `Proxy`.
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub health_check_node_port: Option<u16>,
    /// Label `service.kubernetes.io/service-proxy-name`: when set, kube-proxy (and svcplane) ignore the Service.
    pub service_proxy_name: Option<String>,
    /// Annotation `kube-router.io/service.scheduler` (IPVS mode), when it names a known
    /// scheduler.
    pub ipvs_scheduler: Option<String>,
}

/// What every Service without any of [`ServiceRare`]'s fields reads.
static NO_RARE: ServiceRare = ServiceRare {
    external_name: None,
    external_ips: Vec::new(),
    load_balancer_ips: Vec::new(),
    load_balancer_source_ranges: Vec::new(),
    health_check_node_port: None,
    service_proxy_name: None,
    ipvs_scheduler: None,
};

/// A [`ServiceRare`], boxed only when not empty (its ~200 B inline were half of a
/// ClusterIP Service). Reads as its fields either way; a write through it allocates it.
#[derive(Clone, Default)]
pub struct Rare(Option<Box<ServiceRare>>);

impl std::ops::Deref for Rare {
    type Target = ServiceRare;
    fn deref(&self) -> &ServiceRare {
        self.0.as_deref().unwrap_or(&NO_RARE)
    }
}

impl std::ops::DerefMut for Rare {
    fn deref_mut(&mut self) -> &mut ServiceRare {
        self.0.get_or_insert_default()
    }
}

impl From<ServiceRare> for Rare {
    fn from(rare: ServiceRare) -> Rare {
        Rare((rare != NO_RARE).then(|| Box::new(rare)))
    }
}

/// By the fields: an empty box equals none.
impl PartialEq for Rare {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Rare {}

impl fmt::Debug for Rare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl Service {
    /// Neither a ClusterIP nor headless nor ExternalName: the manifest left the cluster IP
    /// to the API server (as `kubectl expose` does), so it still has to be allocated.
    pub fn needs_cluster_ip(&self) -> bool {
        !self.headless
            && self.service_type != ServiceType::ExternalName
            && self.cluster_ips.is_empty()
    }
}

/// spec.ipFamilyPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpFamilyPolicy {
    /// Also what an absent policy means.
    #[default]
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

/// The fields that steer the API server's allocation, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocationRequest {
    pub ip_family_policy: IpFamilyPolicy,
    /// spec.ipFamilies as written (validated, no duplicates).
    pub ip_families: IpFamilies,
    /// spec.allocateLoadBalancerNodePorts: false (the default, true, allocates them).
    pub no_load_balancer_node_ports: bool,
}

/// Topology hints of one endpoint (`hints.forZones`, `hints.forNodes`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointHints {
    pub for_zones: Vec<String>,
    pub for_nodes: Vec<String>,
}

/// Where an endpoint runs: its node and zone, one shared copy per distinct pair
/// ([`crate::shared_topology`]), so every endpoint of a node holds the same one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Topology {
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
}

/// What few endpoints have, out of line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct EndpointExtra {
    /// Every address, when there are several (the DNS serves them all).
    addresses: Box<[IpAddr]>,
    hostname: Option<Arc<str>>,
    hints: Option<EndpointHints>,
}

/// One entry of an EndpointSlice's `endpoints`. Conditions are already defaulted
/// as the API documents: ready unset → true, serving unset → ready, terminating unset → false.
/// Compact, as 100k of them are kept at 10k Services: the first address inline (kube-proxy
/// reads only that one; the EndpointSlice controller writes exactly one), node and zone one
/// shared pair (the engine's endpoint records share its names), and what is rare (more
/// addresses, a hostname, hints) boxed: 40 B.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The first address; `None` for an FQDN slice's endpoint (never used).
    address: Option<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    topology: Option<Arc<Topology>>,
    extra: Option<Box<EndpointExtra>>,
}

impl Endpoint {
    /// A ready, serving endpoint (the API's defaults) with these addresses, on no known
    /// node.
    pub fn new(addresses: &[IpAddr]) -> Endpoint {
        let mut e = Endpoint {
            address: None,
            ready: true,
            serving: true,
            terminating: false,
            topology: None,
            extra: None,
        };
        e.set_addresses(addresses);
        e
    }

    /// With this node and zone (shared, see [`Topology`]).
    pub fn with_topology(mut self, node_name: Option<&str>, zone: Option<&str>) -> Endpoint {
        self.topology = (node_name.is_some() || zone.is_some())
            .then(|| crate::shared_topology(node_name, zone));
        self
    }

    pub fn with_hostname(mut self, hostname: Option<&str>) -> Endpoint {
        self.update_extra(|x| x.hostname = hostname.map(Arc::from));
        self
    }

    pub fn with_hints(mut self, hints: Option<EndpointHints>) -> Endpoint {
        self.update_extra(|x| x.hints = hints);
        self
    }

    pub fn set_addresses(&mut self, addresses: &[IpAddr]) {
        self.address = addresses.first().copied();
        let many = addresses.len() > 1;
        self.update_extra(|x| {
            x.addresses = if many {
                addresses.into()
            } else {
                Box::default()
            }
        });
    }

    /// Every address (kube-proxy uses the first; the DNS serves them all).
    pub fn addresses(&self) -> &[IpAddr] {
        match &self.extra {
            Some(x) if !x.addresses.is_empty() => &x.addresses,
            _ => self.address.as_slice(),
        }
    }

    pub fn topology(&self) -> Option<&Arc<Topology>> {
        self.topology.as_ref()
    }

    pub fn node_name(&self) -> Option<&Arc<str>> {
        self.topology.as_ref()?.node_name.as_ref()
    }

    pub fn zone(&self) -> Option<&Arc<str>> {
        self.topology.as_ref()?.zone.as_ref()
    }

    pub fn hostname(&self) -> Option<&Arc<str>> {
        self.extra.as_ref()?.hostname.as_ref()
    }

    pub fn hints(&self) -> Option<&EndpointHints> {
        self.extra.as_ref()?.hints.as_ref()
    }

    /// Change the boxed part; an empty one is dropped, so equal endpoints compare equal.
    /// (An empty `EndpointExtra` takes no allocation: only a kept one is boxed.)
    fn update_extra(&mut self, change: impl FnOnce(&mut EndpointExtra)) {
        let mut extra = self.extra.take().map(|x| *x).unwrap_or_default();
        change(&mut extra);
        if extra != EndpointExtra::default() {
            self.extra = Some(Box::new(extra));
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointPort {
    /// Matches the ServicePort's name (empty for an unnamed port); shared
    /// ([`crate::shared_name`]).
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub port: u16,
}

/// A validated discovery.k8s.io/v1 EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    /// The slice's own namespace/name.
    pub name: NamespacedName,
    /// Label `kubernetes.io/service-name`; slices without it belong to no Service. An `Arc`,
    /// as the engine's and the source's keys of the slice's Service hold it.
    pub service_name: Option<Arc<str>>,
    /// `None` for addressType FQDN (kube-proxy ignores those).
    pub address_family: Option<IpFamily>,
    /// One shared copy per distinct list ([`crate::shared_ports`]): most slices of a
    /// cluster list the same few ports.
    pub ports: Arc<[EndpointPort]>,
    /// Kept for as long as the slice exists, so exactly sized.
    pub endpoints: Box<[Endpoint]>,
    /// Annotation `endpoints.kubernetes.io/last-change-trigger-time` (RFC 3339), for latency metrics.
    pub last_change_trigger_time: Option<Box<str>>,
}

/// A validated v1 Node: what the proxy needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// Label `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// status.addresses of type InternalIP, then ExternalIP, in order.
    pub addresses: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// A validated v1 Pod: what the standalone EndpointSlice controller needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: NamespacedName,
    pub labels: BTreeMap<String, String>,
    /// status.podIPs (status.podIP when podIPs is absent).
    pub ips: Vec<IpAddr>,
    pub node_name: Option<String>,
    /// Condition Ready is True.
    pub ready: bool,
    /// metadata.deletionTimestamp is set.
    pub terminating: bool,
    /// status.phase is Succeeded or Failed (never an endpoint).
    pub finished: bool,
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
    /// Every container's ports, in order.
    pub container_ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Pod,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
        })
    }
}

/// Identity of an object: kind + namespace/name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub name: NamespacedName,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// One object of a kind svcplane reads. Shared, not copied: the source that parsed it,
/// the engine's cache and every batch that carried it hold the same allocation, so a
/// clone is a reference count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Node(Arc<Node>),
    Pod(Arc<Pod>),
}

impl From<Service> for Object {
    fn from(s: Service) -> Object {
        Object::Service(Arc::new(s))
    }
}

impl From<EndpointSlice> for Object {
    fn from(s: EndpointSlice) -> Object {
        Object::EndpointSlice(Arc::new(s))
    }
}

impl From<Node> for Object {
    fn from(n: Node) -> Object {
        Object::Node(Arc::new(n))
    }
}

impl From<Pod> for Object {
    fn from(p: Pod) -> Object {
        Object::Pod(Arc::new(p))
    }
}

impl Object {
    /// The same allocation (not merely an equal value): an unchanged object, cheaply.
    pub fn ptr_eq(&self, other: &Object) -> bool {
        match (self, other) {
            (Object::Service(a), Object::Service(b)) => Arc::ptr_eq(a, b),
            (Object::EndpointSlice(a), Object::EndpointSlice(b)) => Arc::ptr_eq(a, b),
            (Object::Node(a), Object::Node(b)) => Arc::ptr_eq(a, b),
            (Object::Pod(a), Object::Pod(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Service(s) => ObjectKey {
                kind: Kind::Service,
                name: s.name.clone(),
            },
            Object::EndpointSlice(s) => ObjectKey {
                kind: Kind::EndpointSlice,
                name: s.name.clone(),
            },
            Object::Node(n) => ObjectKey {
                kind: Kind::Node,
                name: NamespacedName::new("", n.name.clone()),
            },
            Object::Pod(p) => ObjectKey {
                kind: Kind::Pod,
                name: p.name.clone(),
            },
        }
    }
}

/// One change to the object cache, as every source (manifests directory,
/// Kubernetes API) delivers it to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Add or replace the object with this key.
    Apply(Object),
    Delete(ObjectKey),
}

/// What a source sends to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// A batch of changes, applied together (one debounced file edit, one watch batch).
    Changes(Vec<Change>),
    /// The source has delivered its complete initial state; the engine may sync.
    Synced,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addresses_read_as_the_slice_they_were_made_of() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for ips in [vec![], vec![a], vec![a, b]] {
            let mut e = Endpoint::new(&ips);
            assert_eq!(e.addresses(), ips.as_slice());
            // Back to one address: the same value as made with one.
            e.set_addresses(&[b]);
            assert_eq!(e, Endpoint::new(&[b]));
        }
        assert_ne!(Endpoint::new(&[a]), Endpoint::new(&[a, b]));
        let hinted = Endpoint::new(&[a]).with_hints(Some(EndpointHints::default()));
        assert_eq!(hinted.with_hints(None), Endpoint::new(&[a]));
    }

    #[test]
    fn names_are_shared_not_copied() {
        let a = NamespacedName::new("bench", "svc-1");
        let b = NamespacedName::new(String::from("bench"), "svc-2");
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        let copy = a.clone();
        assert!(Arc::ptr_eq(&a.name, &copy.name));
        assert_eq!(a.to_string(), "bench/svc-1");
        assert_eq!(NamespacedName::new("", "node-a").to_string(), "node-a");
        // By namespace, then name (not by the joined text: '-' sorts before '/').
        assert!(NamespacedName::new("a", "z") < NamespacedName::new("a-b", "a"));
        // A copy is two fat pointers (two `String`s were 48 B and two allocations).
        assert!(size_of::<NamespacedName>() <= 32);
        assert!(size_of::<ServicePortName>() <= 56);
    }

    #[test]
    fn ip_families_read_as_the_slice_they_were_made_of() {
        use IpFamily::{V4, V6};
        for list in [vec![], vec![V6], vec![V6, V4]] {
            let families = IpFamilies::from(list.clone());
            assert_eq!(&*families, list.as_slice());
            assert_eq!(families, list);
        }
        assert_ne!(IpFamilies::from(vec![V4]), IpFamilies::from(vec![V4, V4]));
        // A third family is dropped, not kept past the inline two.
        assert_eq!(IpFamilies::from(vec![V4, V6, V4]), vec![V4, V6]);
        assert!(size_of::<IpFamilies>() <= 3);
    }

    #[test]
    fn a_cluster_ip_service_is_compact() {
        // What a ClusterIP Service leaves empty takes 8 B, not ~200, and its families 3 B
        // inline, not a `Vec` (it was ~390 B).
        assert!(size_of::<Service>() <= 144, "{}", size_of::<Service>());
        let mut rare = Rare::default();
        assert!(rare.0.is_none() && rare.external_ips.is_empty());
        assert_eq!(Rare::from(ServiceRare::default()).0, None);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        rare.external_ips.push(ip);
        assert_eq!(rare.external_ips, [ip]);
        // An emptied box still equals none.
        rare.external_ips.clear();
        assert_eq!(rare, Rare::default());
    }

    #[test]
    fn an_endpoint_is_compact() {
        // One address inline, node and zone one shared pair, the rest boxed: what 100k
        // endpoints at 10k Services cost (88 B in session 7, 152 B + 32 B before).
        assert!(size_of::<Endpoint>() <= 40, "{}", size_of::<Endpoint>());
        let e = Endpoint::new(&["10.0.0.1".parse().unwrap()])
            .with_topology(Some("node-a"), Some("zone-a"))
            .with_hostname(Some("web-0"));
        let f = Endpoint::new(&["10.0.0.2".parse().unwrap()])
            .with_topology(Some("node-a"), Some("zone-a"));
        assert!(Arc::ptr_eq(e.topology().unwrap(), f.topology().unwrap()));
        assert_eq!(e.node_name().map(|n| &**n), Some("node-a"));
        assert_eq!(e.zone().map(|n| &**n), Some("zone-a"));
        assert_eq!(e.hostname().map(|n| &**n), Some("web-0"));
        assert_eq!(f.hostname(), None);
    }
}
