//! The pure half of eBPF mode: the desired state → map contents, and map contents →
//! the ordered writes that move the kernel from one to the other. No kernel here, so the
//! write order ("backends first, then the slots, then the count; shrinking lowers the count
//! first") is unit-tested.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use svcplane_ebpf_common::{
    Backend, FLAG_AFFINITY, FLAG_DROP_WHEN_EMPTY, PROTO_TCP, PROTO_UDP, ServiceKey, ServiceValue,
    WILDCARD_PORT, WILDCARD_PROTO,
};
use svcplane_model::{IpFamily, Protocol, ServicePortName};
use svcplane_proxy::{
    EmptyVerdict, ExternalPolicy, FamilyState, NodePortAddresses, ServicePortState, TrafficTarget,
};

/// Which of a service port's targets a frontend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The ClusterIP: the internal target (iTP).
    ClusterIp,
    /// externalIPs, LoadBalancer IPs, node IPs with the NodePort, reached from this node (a
    /// pod or the host): what kube-proxy does for traffic that never left the node, eTP
    /// Cluster → the external target, eTP Local → the cluster-policy endpoints.
    External,
}

/// A service port's frontends of one scope and what they balance over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopePlan {
    pub scope: Scope,
    pub proto: u8,
    /// (address, port) pairs, host order.
    pub frontends: Vec<(IpAddr, u16)>,
    /// (endpoint address, target port), in the target's order.
    pub backends: Vec<(IpAddr, u16)>,
    pub flags: u8,
    pub affinity_timeout: u32,
}

/// Identity of the owner of a set of frontends.
pub type Owner = (ServicePortName, IpFamily, Scope);

/// Socket-LB handles TCP and UDP; SCTP sockets are left alone (as Cilium's socket-LB).
pub fn proto_number(p: Protocol) -> Option<u8> {
    match p {
        Protocol::Tcp => Some(PROTO_TCP),
        Protocol::Udp => Some(PROTO_UDP),
        Protocol::Sctp => None,
    }
}

/// What one service port programs, per scope.
pub fn plan_service(sps: &ServicePortState, fam: &FamilyState) -> Vec<ScopePlan> {
    let Some(proto) = proto_number(sps.protocol) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let make = |scope, frontends: Vec<(IpAddr, u16)>, target: &TrafficTarget| {
        let mut flags = 0;
        if target.verdict_when_empty() == Some(EmptyVerdict::Drop) {
            flags |= FLAG_DROP_WHEN_EMPTY;
        }
        if sps.affinity_timeout_seconds.is_some() {
            flags |= FLAG_AFFINITY;
        }
        ScopePlan {
            scope,
            proto,
            frontends,
            backends: sps
                .target_endpoints(target)
                .map(|e| (e.ip, e.port))
                .collect(),
            flags,
            affinity_timeout: sps.affinity_timeout_seconds.unwrap_or(0),
        }
    };
    if let Some(ip) = sps.cluster_ip {
        out.push(make(Scope::ClusterIp, vec![(ip, sps.port)], &sps.internal));
    }
    let mut ext: Vec<(IpAddr, u16)> = sps.external_ips.iter().map(|&ip| (ip, sps.port)).collect();
    // Source ranges need the client's address, which a socket does not have at connect
    // time: such LoadBalancer IPs are not translated at the socket (see README).
    if sps.load_balancer_source_ranges.is_empty() {
        ext.extend(sps.load_balancer_ips.iter().map(|&ip| (ip, sps.port)));
    }
    if let Some(np) = sps.node_port {
        for &ip in &fam.node_ips {
            let allowed = match &fam.nodeport_addresses {
                NodePortAddresses::AllLocal => true,
                NodePortAddresses::Cidrs(c) => c.iter().any(|n| n.contains(&ip)),
            };
            if allowed {
                ext.push((ip, np));
            }
        }
    }
    ext.sort();
    ext.dedup();
    if !ext.is_empty() {
        let target = match &sps.external_policy {
            ExternalPolicy::Cluster => &sps.external,
            ExternalPolicy::Local { local_origin } => local_origin,
        };
        out.push(make(Scope::External, ext, target));
    }
    out
}

/// An address as the maps hold it: 16 bytes (IPv4 mapped), as four native-endian words.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    let o = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The inverse of [`addr_words`].
pub fn words_addr(w: &[u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn frontend_key(ip: IpAddr, port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: addr_words(ip),
        port: port.to_be(),
        slot: 0,
        proto,
        pad: [0; 3],
    }
}

/// A ClusterIP's wildcard key: its ports no Service has are refused.
pub fn wildcard_key(ip: IpAddr) -> ServiceKey {
    ServiceKey {
        addr: addr_words(ip),
        port: WILDCARD_PORT,
        slot: 0,
        proto: WILDCARD_PROTO,
        pad: [0; 3],
    }
}

pub fn is_wildcard(key: &ServiceKey) -> bool {
    key.port == WILDCARD_PORT && key.proto == WILDCARD_PROTO
}

/// The wildcard entry: no backends, no flags (so: reject).
pub fn wildcard_entry() -> FrontEntry {
    FrontEntry {
        value: ServiceValue::default(),
        slots: Vec::new(),
    }
}

pub fn backend_value(ip: IpAddr, port: u16) -> Backend {
    Backend {
        addr: addr_words(ip),
        port: port.to_be(),
        pad: 0,
    }
}

/// One frontend as programmed: its slot-0 value and the backend id of each slot from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontEntry {
    pub value: ServiceValue,
    pub slots: Vec<u32>,
}

/// The maps' contents (what user space believes the kernel holds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// Keyed by the slot-0 key.
    pub frontends: BTreeMap<ServiceKey, FrontEntry>,
    pub backends: BTreeMap<u32, Backend>,
}

/// One map write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    DelBackend(u32),
    PutService(ServiceKey, ServiceValue),
    DelService(ServiceKey),
}

fn slot_key(key: &ServiceKey, slot: usize) -> ServiceKey {
    ServiceKey {
        slot: u16::try_from(slot).unwrap_or(u16::MAX),
        ..*key
    }
}

fn slot_value(id: u32) -> ServiceValue {
    ServiceValue {
        backend_id: id,
        ..ServiceValue::default()
    }
}

/// The writes that turn frontend `old` into `new`: a connect running between any two of
/// them sees a whole service (every slot below the count it reads names a live backend).
pub fn frontend_ops(
    ops: &mut Vec<Op>,
    key: &ServiceKey,
    old: Option<&FrontEntry>,
    new: Option<&FrontEntry>,
) {
    let empty: &[u32] = &[];
    let old_slots = old.map_or(empty, |o| &o.slots);
    let new_slots = new.map_or(empty, |n| &n.slots);
    let value_changed = match (old, new) {
        (Some(o), Some(n)) => o.value != n.value,
        _ => true,
    };
    let shrinking = new_slots.len() < old_slots.len();
    // Removing, or lowering the count: slot 0 first, so no connect reads a slot about to go.
    match new {
        None if old.is_some() => ops.push(Op::DelService(*key)),
        Some(n) if shrinking && value_changed => ops.push(Op::PutService(*key, n.value)),
        _ => {}
    }
    for (i, &id) in new_slots.iter().enumerate() {
        if old_slots.get(i) != Some(&id) {
            ops.push(Op::PutService(slot_key(key, i + 1), slot_value(id)));
        }
    }
    // Growing or equal: the count last, once every slot below it is written.
    if let Some(n) = new
        && !shrinking
        && value_changed
    {
        ops.push(Op::PutService(*key, n.value));
    }
    for i in new_slots.len()..old_slots.len() {
        ops.push(Op::DelService(slot_key(key, i + 1)));
    }
}

/// The writes from `old` to `new` for the frontends in `keys` and the backends in
/// `backend_ids` (both: the union of what either side holds for the services being
/// synced). New backends first, then each frontend's slots and count, then the ClusterIPs'
/// wildcard entries (a new Service's ports exist before its other ports are refused), then
/// the backends no longer used.
pub fn image_ops(
    old: &Image,
    new: &Image,
    keys: &BTreeSet<ServiceKey>,
    backend_ids: &BTreeSet<u32>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for id in backend_ids {
        if let Some(b) = new.backends.get(id)
            && old.backends.get(id) != Some(b)
        {
            ops.push(Op::PutBackend(*id, *b));
        }
    }
    let (wild, exact): (Vec<&ServiceKey>, Vec<&ServiceKey>) =
        keys.iter().partition(|k| is_wildcard(k));
    for key in exact.into_iter().chain(wild) {
        frontend_ops(
            &mut ops,
            key,
            old.frontends.get(key),
            new.frontends.get(key),
        );
    }
    for id in backend_ids {
        if old.backends.contains_key(id) && !new.backends.contains_key(id) {
            ops.push(Op::DelBackend(*id));
        }
    }
    ops
}

/// Ids from 1 up, reusing freed ones; ids still present in the kernel are skipped.
#[derive(Debug, Clone, Default)]
pub struct IdPool {
    next: u32,
    free: Vec<u32>,
    reserved: BTreeSet<u32>,
}

impl IdPool {
    pub fn reserve(&mut self, id: u32) {
        self.reserved.insert(id);
    }
    pub fn alloc(&mut self) -> u32 {
        if let Some(id) = self.free.pop() {
            return id;
        }
        loop {
            self.next = self.next.wrapping_add(1).max(1);
            if !self.reserved.contains(&self.next) {
                return self.next;
            }
        }
    }
    pub fn release(&mut self, id: u32) {
        self.reserved.remove(&id);
        self.free.push(id);
    }
}

/// What one owner (service port, family, scope) holds: its id, its backends' ids and its
/// frontends, so a partial sync rewrites only its own entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    pub svc_id: u32,
    pub backends: BTreeMap<(IpAddr, u16), u32>,
    pub frontends: BTreeSet<ServiceKey>,
}

/// Builds the image entries of one owner's plan, reusing its ids where it had them.
pub fn build_owned(
    plan: &ScopePlan,
    previous: Option<&Owned>,
    svc_ids: &mut IdPool,
    backend_ids: &mut IdPool,
    image: &mut Image,
) -> Owned {
    let svc_id = previous.map_or_else(|| svc_ids.alloc(), |p| p.svc_id);
    let mut owned = Owned {
        svc_id,
        ..Owned::default()
    };
    let mut slots = Vec::with_capacity(plan.backends.len());
    for &(ip, port) in &plan.backends {
        let id = match owned.backends.get(&(ip, port)) {
            Some(&id) => id,
            None => {
                let id = previous
                    .and_then(|p| p.backends.get(&(ip, port)).copied())
                    .unwrap_or_else(|| backend_ids.alloc());
                owned.backends.insert((ip, port), id);
                image.backends.insert(id, backend_value(ip, port));
                id
            }
        };
        slots.push(id);
    }
    let value = ServiceValue {
        backend_id: 0,
        count: u16::try_from(slots.len()).unwrap_or(u16::MAX),
        pad0: 0,
        svc_id,
        affinity_timeout: plan.affinity_timeout,
        flags: plan.flags,
        pad1: [0; 3],
    };
    slots.truncate(usize::from(value.count));
    for &(ip, port) in &plan.frontends {
        let key = frontend_key(ip, port, plan.proto);
        owned.frontends.insert(key);
        image.frontends.insert(
            key,
            FrontEntry {
                value,
                slots: slots.clone(),
            },
        );
    }
    owned
}

/// `cilium-dbg service list`-like table of an image.
pub fn render_table(image: &Image, names: &BTreeMap<u32, String>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<46} {:<40} BACKENDS",
        "ID", "FRONTEND", "SERVICE"
    );
    for (key, entry) in &image.frontends {
        if is_wildcard(key) {
            let _ = writeln!(
                out,
                "{:<6} {:<46} {:<40} none: reject (no Service has this port; connect fails with ECONNREFUSED)",
                "-",
                format!("{}:*/*", words_addr(&key.addr)),
                "ClusterIP, other ports"
            );
            continue;
        }
        let proto = match key.proto {
            PROTO_TCP => "TCP",
            PROTO_UDP => "UDP",
            _ => "?",
        };
        let front = sock_text(words_addr(&key.addr), u16::from_be(key.port));
        let mut what = names
            .get(&entry.value.svc_id)
            .cloned()
            .unwrap_or_else(|| "-".into());
        if entry.value.flags & FLAG_AFFINITY != 0 {
            let _ = write!(what, " affinity={}s", entry.value.affinity_timeout);
        }
        let mut backends = Vec::new();
        for (i, id) in entry.slots.iter().enumerate() {
            match image.backends.get(id) {
                Some(b) => backends.push(format!(
                    "{} => {} (#{id})",
                    i + 1,
                    sock_text(words_addr(&b.addr), u16::from_be(b.port))
                )),
                None => backends.push(format!("{} => #{id} (missing)", i + 1)),
            }
        }
        if backends.is_empty() {
            backends.push(
                if entry.value.flags & FLAG_DROP_WHEN_EMPTY != 0 {
                    "none: drop (connect fails with ETIMEDOUT)"
                } else {
                    "none: reject (connect fails with ECONNREFUSED)"
                }
                .to_owned(),
            );
        }
        let _ = writeln!(
            out,
            "{:<6} {:<46} {:<40} {}",
            entry.value.svc_id,
            format!("{front}/{proto}"),
            what,
            backends.join(", ")
        );
    }
    out
}

fn sock_text(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ServiceKey {
        frontend_key("10.96.0.1".parse().unwrap(), 80, PROTO_TCP)
    }
    fn entry(slots: &[u32]) -> FrontEntry {
        FrontEntry {
            value: ServiceValue {
                count: slots.len() as u16,
                svc_id: 1,
                ..ServiceValue::default()
            },
            slots: slots.to_vec(),
        }
    }
    fn kinds(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                Op::PutBackend(id, _) => format!("+b{id}"),
                Op::DelBackend(id) => format!("-b{id}"),
                Op::PutService(k, v) if k.slot == 0 => format!("+count{}", v.count),
                Op::PutService(k, v) => format!("+s{}={}", k.slot, v.backend_id),
                Op::DelService(k) if k.slot == 0 => "-svc".to_owned(),
                Op::DelService(k) => format!("-s{}", k.slot),
            })
            .collect()
    }

    fn image(slots: &[u32]) -> Image {
        let mut img = Image::default();
        img.frontends.insert(key(), entry(slots));
        for &id in slots {
            img.backends
                .insert(id, backend_value("10.0.0.1".parse().unwrap(), id as u16));
        }
        img
    }

    fn ops(old: &[u32], new: &[u32]) -> Vec<String> {
        let (o, n) = (image(old), image(new));
        let ids = o
            .backends
            .keys()
            .chain(n.backends.keys())
            .copied()
            .collect();
        kinds(&image_ops(&o, &n, &BTreeSet::from([key()]), &ids))
    }

    #[test]
    fn growing_writes_backends_then_slots_then_the_count() {
        assert_eq!(
            ops(&[1], &[1, 2, 3]),
            ["+b2", "+b3", "+s2=2", "+s3=3", "+count3"]
        );
    }

    #[test]
    fn shrinking_lowers_the_count_first_and_deletes_backends_last() {
        assert_eq!(ops(&[1, 2, 3], &[1, 3]), ["+count2", "+s2=3", "-s3", "-b2"]);
    }

    #[test]
    fn a_new_and_a_removed_frontend() {
        let (empty, one) = (Image::default(), image(&[7]));
        let ids = BTreeSet::from([7]);
        assert_eq!(
            kinds(&image_ops(&empty, &one, &BTreeSet::from([key()]), &ids)),
            ["+b7", "+s1=7", "+count1"]
        );
        assert_eq!(
            kinds(&image_ops(&one, &empty, &BTreeSet::from([key()]), &ids)),
            ["-svc", "-s1", "-b7"]
        );
    }

    #[test]
    fn wildcards_are_written_after_the_ports() {
        let w = wildcard_key("10.96.0.1".parse().unwrap());
        assert!(w < key(), "sorts first, so the order must be explicit");
        let mut new = image(&[7]);
        new.frontends.insert(w, wildcard_entry());
        let keys = BTreeSet::from([key(), w]);
        let ops = image_ops(&Image::default(), &new, &keys, &BTreeSet::from([7]));
        assert_eq!(
            kinds(&ops),
            ["+b7", "+s1=7", "+count1", "+count0"],
            "{ops:?}"
        );
        assert_eq!(
            ops.last(),
            Some(&Op::PutService(w, ServiceValue::default()))
        );
    }

    #[test]
    fn unchanged_writes_nothing() {
        assert!(ops(&[1, 2], &[1, 2]).is_empty());
    }

    #[test]
    fn addresses_round_trip_and_v4_is_mapped() {
        for ip in ["10.96.0.1", "fd00::1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(words_addr(&addr_words(ip)), ip);
        }
        let w = addr_words("10.96.0.1".parse().unwrap());
        assert_eq!(w[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(w[3].to_ne_bytes(), [10, 96, 0, 1]);
        // The port as the kernel's user_port low 16 bits: big-endian bytes.
        assert_eq!(
            frontend_key("10.0.0.1".parse().unwrap(), 80, 6)
                .port
                .to_ne_bytes(),
            [0, 80]
        );
    }

    #[test]
    fn id_pool_skips_reserved_and_reuses_freed() {
        let mut p = IdPool::default();
        p.reserve(1);
        assert_eq!(p.alloc(), 2);
        p.release(2);
        assert_eq!(p.alloc(), 2);
        assert_eq!(p.alloc(), 3);
    }
}
