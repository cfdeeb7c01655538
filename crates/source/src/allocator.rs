//! The standalone mode's allocator: what the API server fills in when a manifest leaves it
//! out, as `kubectl expose` and `kubectl create service` write them. ClusterIPs come from
//! `--service-cluster-ip-range` (one range per family, the first is the primary), following
//! the Service's ipFamilyPolicy and ipFamilies as the API server does; nodePorts (and the
//! healthCheckNodePort of an eTP Local LoadBalancer) from `--service-node-port-range`.
//!
//! There is no etcd to remember an allocation, so the result is a function of the object
//! set alone: the same manifests give the same addresses after a restart. Values set in a
//! manifest are reserved first; then each Service, in namespace/name order, takes the
//! address its name hashes to in the range's dynamic band (the API server keeps a lower
//! band for static values too), or the next free one after it. So a Service keeps its
//! address while others come and go, unless a new explicit value or a colliding hash
//! takes it first (the change is logged).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use svcplane_model::{
    InvalidObject, IpFamily, IpFamilyPolicy, Kind, NamespacedName, Service, ServiceType,
    TrafficPolicy,
};

/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: NodePortRange = NodePortRange {
    first: 30000,
    last: 32767,
};

/// `--service-node-port-range`, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePortRange {
    pub first: u16,
    pub last: u16,
}

impl std::fmt::Display for NodePortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for NodePortRange {
    type Err = String;

    /// kube-apiserver's spellings: `30000-32767`, `30000+2767`, or a single port.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let port = |t: &str| {
            t.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("invalid port {t:?} in {s:?} (must be 1-65535)"))
        };
        let (first, last) = if let Some((a, b)) = s.split_once('-') {
            (port(a)?, port(b)?)
        } else if let Some((a, n)) = s.split_once('+') {
            let first = port(a)?;
            let n: u16 = n
                .trim()
                .parse()
                .map_err(|_| format!("invalid offset {n:?} in {s:?}"))?;
            let last = first
                .checked_add(n)
                .ok_or_else(|| format!("{s:?} goes past port 65535"))?;
            (first, last)
        } else {
            let p = port(s)?;
            (p, p)
        };
        if last < first {
            return Err(format!("{s:?}: the last port is below the first"));
        }
        Ok(NodePortRange { first, last })
    }
}

/// What the allocator allocates from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatorConfig {
    /// `--service-cluster-ip-range`: at most one per family, the primary first. Empty: a
    /// Service without a clusterIP is reported and skipped.
    pub cluster_ip_ranges: Vec<IpNet>,
    /// `--service-node-port-range`.
    pub node_ports: NodePortRange,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            cluster_ip_ranges: Vec::new(),
            node_ports: DEFAULT_NODE_PORT_RANGE,
        }
    }
}

/// Parse `--service-cluster-ip-range` (`CIDR[,CIDR]`, one per family, as kube-apiserver).
pub fn parse_service_cluster_ip_range(s: &str) -> Result<Vec<IpNet>, String> {
    let mut ranges: Vec<IpNet> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net: IpNet = part.parse().map_err(|_| format!("invalid CIDR {part:?}"))?;
        if net.trunc() != net {
            return Err(format!(
                "{part:?} has host bits set (the network is {})",
                net.trunc()
            ));
        }
        let family = IpFamily::of_net(&net);
        if ranges.iter().any(|r| IpFamily::of_net(r) == family) {
            return Err(format!("more than one {family} range in {s:?}"));
        }
        // The network address, the first address and (IPv4) the broadcast address are
        // not handed out: at least one more is needed.
        if net.max_prefix_len() - net.prefix_len() < 2 {
            return Err(format!("{part:?} is too small to allocate from"));
        }
        ranges.push(net);
    }
    if ranges.is_empty() {
        return Err("no CIDR given".into());
    }
    Ok(ranges)
}

/// One Service's allocation result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The Service with what was missing filled in, and what was allocated (for the log).
    Allocated(Box<Service>, String),
    /// It cannot be programmed: it is skipped, for this reason.
    Failed(InvalidObject),
    /// Something asked for cannot be given, the rest is used (e.g. RequireDualStack on a
    /// single-stack range: only the family that exists).
    Partial(Box<Service>, String, InvalidObject),
}

/// Allocate what `services` left out. Only Services that needed something are in the
/// result; the others are used as they are.
pub fn allocate(
    config: &AllocatorConfig,
    services: &[&Service],
) -> BTreeMap<NamespacedName, Outcome> {
    let mut pools: Vec<IpPool> = config.cluster_ip_ranges.iter().map(IpPool::new).collect();
    let mut ports = PortPool::new(config.node_ports);
    // Explicit values first, whoever holds them.
    for svc in services {
        for ip in &svc.cluster_ips {
            for pool in &mut pools {
                pool.reserve(*ip);
            }
        }
        for p in &svc.ports {
            if let Some(n) = p.node_port {
                ports.reserve(n);
            }
        }
        if let Some(n) = svc.rare.health_check_node_port {
            ports.reserve(n);
        }
    }
    let mut sorted: Vec<&Service> = services.to_vec();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = BTreeMap::new();
    for svc in sorted {
        if let Some(outcome) = allocate_one(config, &mut pools, &mut ports, svc) {
            out.insert(svc.name.clone(), outcome);
        }
    }
    out
}

fn allocate_one(
    config: &AllocatorConfig,
    pools: &mut [IpPool],
    ports: &mut PortPool,
    svc: &Service,
) -> Option<Outcome> {
    let err = |field: &str, reason: String| InvalidObject {
        kind: Kind::Service,
        object: svc.name.to_string(),
        field: field.to_string(),
        value: String::new(),
        reason,
    };
    let key = svc.name.to_string();
    let mut new = svc.clone();
    let mut notes = Vec::new();
    let mut partial = None;

    // Which families are wanted and still missing.
    let policy = svc.allocation.ip_family_policy;
    let dual = policy != IpFamilyPolicy::SingleStack;
    let wants_ips = !svc.headless && svc.service_type != ServiceType::ExternalName;
    let configured = |f: IpFamily| pools.iter().any(|p| p.family == f);
    let mut missing: Vec<IpFamily> = Vec::new();
    if wants_ips && svc.cluster_ips.is_empty() {
        if pools.is_empty() {
            return Some(Outcome::Failed(err(
                "spec.clusterIP",
                "must be set: svcplane allocates it, as the API server does, only when \
                 given --service-cluster-ip-range"
                    .into(),
            )));
        }
        let primary = svc
            .allocation
            .ip_families
            .first()
            .copied()
            .unwrap_or(pools[0].family);
        if !configured(primary) {
            return Some(Outcome::Failed(err(
                "spec.ipFamilies[0]",
                format!("{primary} is not in --service-cluster-ip-range"),
            )));
        }
        missing.push(primary);
    }
    if wants_ips && dual && new.cluster_ips.len() + missing.len() == 1 {
        let have = missing
            .first()
            .copied()
            .or_else(|| svc.cluster_ips.first().map(IpFamily::of));
        let other = match have {
            Some(IpFamily::V4) => IpFamily::V6,
            _ => IpFamily::V4,
        };
        if configured(other) {
            missing.push(other);
        } else if policy == IpFamilyPolicy::RequireDualStack {
            partial = Some(err(
                "spec.ipFamilyPolicy",
                format!(
                    "RequireDualStack needs an {other} cluster IP and --service-cluster-ip-range \
                     has no {other} range: only the {} one is programmed",
                    have.map(|f| f.as_k8s()).unwrap_or("other")
                ),
            ));
        }
    }
    for family in missing {
        let Some(pool) = pools.iter_mut().find(|p| p.family == family) else {
            continue;
        };
        match pool.take(&format!("{key}/{family}")) {
            Some(ip) => {
                new.cluster_ips.push(ip);
                notes.push(format!("ClusterIP {ip}"));
            }
            None => {
                return Some(Outcome::Failed(err(
                    "spec.clusterIP",
                    format!(
                        "no free address left in --service-cluster-ip-range {}",
                        pool.net
                    ),
                )));
            }
        }
    }
    if wants_ips {
        new.ip_families = new.cluster_ips.iter().map(IpFamily::of).collect();
    }

    let node_ports = match svc.service_type {
        ServiceType::NodePort => true,
        ServiceType::LoadBalancer => !svc.allocation.no_load_balancer_node_ports,
        _ => false,
    };
    if node_ports {
        for i in 0..new.ports.len() {
            if new.ports[i].node_port.is_some() {
                continue;
            }
            // The same port number over two protocols shares one nodePort, as the API
            // server allocates it.
            let shared = new
                .ports
                .iter()
                .find(|q| q.port == new.ports[i].port && q.node_port.is_some())
                .and_then(|q| q.node_port);
            let n = match shared {
                Some(n) => n,
                None => match ports.take(&format!("{key}/{i}")) {
                    Some(n) => {
                        notes.push(format!("nodePort {n} ({})", port_label(&new, i)));
                        n
                    }
                    None => {
                        return Some(Outcome::Failed(err(
                            &format!("spec.ports[{i}].nodePort"),
                            format!(
                                "no free port left in --service-node-port-range {}",
                                config.node_ports
                            ),
                        )));
                    }
                },
            };
            new.ports[i].node_port = Some(n);
        }
    }
    if svc.service_type == ServiceType::LoadBalancer
        && svc.external_traffic_policy == TrafficPolicy::Local
        && svc.rare.health_check_node_port.is_none()
    {
        match ports.take(&format!("{key}/healthz")) {
            Some(n) => {
                new.rare.health_check_node_port = Some(n);
                notes.push(format!("healthCheckNodePort {n}"));
            }
            None => {
                return Some(Outcome::Failed(err(
                    "spec.healthCheckNodePort",
                    format!(
                        "no free port left in --service-node-port-range {}",
                        config.node_ports
                    ),
                )));
            }
        }
    }

    let notes = notes.join(", ");
    match partial {
        Some(p) => Some(Outcome::Partial(Box::new(new), notes, p)),
        None if notes.is_empty() => None,
        None => Some(Outcome::Allocated(Box::new(new), notes)),
    }
}

fn port_label(svc: &Service, i: usize) -> String {
    let p = &svc.ports[i];
    if p.name.is_empty() {
        format!("{}/{}", p.port, p.protocol.as_lower())
    } else {
        format!("{} {}/{}", p.name, p.port, p.protocol.as_lower())
    }
}

/// FNV-1a: stable across builds and versions (std's hasher is not), so an allocation
/// survives an upgrade.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Offsets `0..size` split as the API server splits them: a lower band preferred by
/// static values and an upper band where dynamic allocation starts; a hash picks the
/// start in the upper band, then the next free offset, wrapping, then the lower band.
fn pick(size: u128, band: u128, seed: u64, taken: &impl Fn(u128) -> bool) -> Option<u128> {
    let upper = size - band;
    if upper > 0 {
        let start = band + u128::from(seed) % upper;
        let found = (start..size).chain(band..start).find(|&o| !taken(o));
        if found.is_some() {
            return found;
        }
    }
    (0..band).find(|&o| !taken(o))
}

struct IpPool {
    net: IpNet,
    family: IpFamily,
    /// Offsets from the network address that are taken.
    taken: BTreeSet<u128>,
    size: u128,
}

impl IpPool {
    fn new(net: &IpNet) -> IpPool {
        let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        // Probing is bounded by the taken set, not by the range; a /64 needs no more
        // than 2^64 offsets of headroom.
        let size = 1u128 << host_bits.min(64);
        let mut taken = BTreeSet::new();
        // The network address and the first address (the API server gives it to the
        // `kubernetes` Service); IPv4's broadcast address.
        taken.insert(0);
        taken.insert(1);
        if matches!(net, IpNet::V4(_)) {
            taken.insert(size - 1);
        }
        IpPool {
            net: *net,
            family: IpFamily::of_net(net),
            taken,
            size,
        }
    }

    fn offset(&self, ip: IpAddr) -> Option<u128> {
        if !self.net.contains(&ip) {
            return None;
        }
        let o = match (ip, self.net.network()) {
            (IpAddr::V4(a), IpAddr::V4(n)) => u128::from(u32::from(a) - u32::from(n)),
            (IpAddr::V6(a), IpAddr::V6(n)) => u128::from(a) - u128::from(n),
            _ => return None,
        };
        (o < self.size).then_some(o)
    }

    fn reserve(&mut self, ip: IpAddr) {
        if let Some(o) = self.offset(ip) {
            self.taken.insert(o);
        }
    }

    fn take(&mut self, key: &str) -> Option<IpAddr> {
        // kube-apiserver's ServiceIPStaticSubrange: min(max(16, size/16), 256).
        let band = (self.size / 16).clamp(16, 256).min(self.size / 2);
        let o = pick(self.size, band, fnv1a(key), &|o| self.taken.contains(&o))?;
        self.taken.insert(o);
        Some(match self.net.network() {
            IpAddr::V4(n) => IpAddr::V4((u32::from(n) + o as u32).into()),
            IpAddr::V6(n) => IpAddr::V6((u128::from(n) + o).into()),
        })
    }
}

struct PortPool {
    range: NodePortRange,
    taken: BTreeSet<u16>,
}

impl PortPool {
    fn new(range: NodePortRange) -> PortPool {
        PortPool {
            range,
            taken: BTreeSet::new(),
        }
    }

    fn reserve(&mut self, port: u16) {
        self.taken.insert(port);
    }

    fn take(&mut self, key: &str) -> Option<u16> {
        let first = u128::from(self.range.first);
        let size = u128::from(self.range.last) - first + 1;
        // kube-apiserver's ServiceNodePortStaticSubrange: min(max(16, size/32), 128).
        let band = (size / 32).clamp(16, 128).min(size / 2);
        let o = pick(size, band, fnv1a(key), &|o| {
            self.taken.contains(&((first + o) as u16))
        })?;
        let port = (first + o) as u16;
        self.taken.insert(port);
        Some(port)
    }
}

#[cfg(test)]
mod tests;
