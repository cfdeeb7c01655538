//! What IPVS should hold for a desired state ([`virtual_servers`]), and the operations
//! that bring the kernel's virtual servers there ([`plan`]), graceful termination
//! included. Pure: no kernel, so every decision is unit-tested.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use svcplane_model::{Protocol, ServicePortName};
use svcplane_proxy::{
    DesiredState, ExternalPolicy, FamilyState, NodePortAddresses, ServicePortState, TrafficTarget,
};

use super::genl::DestStatus;

/// A virtual server's identity: address, protocol, port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VsKey {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// A virtual server's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServer {
    pub key: VsKey,
    pub scheduler: String,
    /// ClientIP affinity: persistence timeout in seconds (the kernel's netmask is /32 or /128).
    pub persistence: Option<u32>,
}

/// A real server (masquerade forwarding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RealServer {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
}

impl RealServer {
    fn id(&self) -> (IpAddr, u16) {
        (self.addr, self.port)
    }
}

/// Which address of a service a virtual server is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Frontend {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

impl Frontend {
    pub fn external(self) -> bool {
        self != Frontend::ClusterIp
    }
}

/// One virtual server svcplane wants, with its real servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub vs: VirtualServer,
    /// Sorted by address and port.
    pub reals: Vec<RealServer>,
    pub service: ServicePortName,
    pub frontend: Frontend,
}

/// Where NodePort virtual servers go in `state`'s family: the node's addresses `local`
/// (the kernel's, or for `render` the Node object's) within `--nodeport-addresses`;
/// loopback and IPv6 link-local addresses never, nor the service addresses on the dummy
/// interface (`vips`).
pub fn nodeport_addresses(
    state: &FamilyState,
    local: &[IpAddr],
    vips: &BTreeSet<IpAddr>,
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = local
        .iter()
        .copied()
        .filter(|ip| ip.is_ipv4() == matches!(state.family, svcplane_model::IpFamily::V4))
        .filter(|ip| !ip.is_loopback() && !vips.contains(ip))
        .filter(|ip| match ip {
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            IpAddr::V4(_) => true,
        })
        .filter(|ip| match &state.nodeport_addresses {
            NodePortAddresses::AllLocal => true,
            NodePortAddresses::Cidrs(cidrs) => cidrs.iter().any(|c| c.contains(ip)),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Every address the dummy interface holds: ClusterIPs, externalIPs, LoadBalancer IPs.
pub fn service_addresses(desired: &DesiredState) -> BTreeSet<IpAddr> {
    desired
        .families()
        .into_iter()
        .flat_map(|f| f.services.values())
        .flat_map(|s| {
            s.cluster_ip
                .into_iter()
                .chain(s.external_ips.iter().copied())
                .chain(s.load_balancer_ips.iter().copied())
        })
        .collect()
}

/// The traffic target whose endpoints are a frontend's real servers: the internal one
/// on the ClusterIP, the external one elsewhere, except that an eTP Local frontend
/// without local endpoints gets the cluster-wide ones (`local_origin`), as kube-proxy's
/// IPVS mode does (kubernetes#97081): IPVS chooses by destination only, so this is how
/// the node's own and its pods' traffic is served; the filter drops what comes from
/// anywhere else (the `no-local-endpoints` set).
pub fn real_server_target(svc: &ServicePortState, external: bool) -> &TrafficTarget {
    if !external {
        return &svc.internal;
    }
    match &svc.external_policy {
        ExternalPolicy::Local { local_origin } if svc.external.endpoints.is_empty() => local_origin,
        _ => &svc.external,
    }
}

fn reals(svc: &ServicePortState, external: bool) -> Vec<RealServer> {
    let target = real_server_target(svc, external);
    let mut out: Vec<RealServer> = svc
        .target_endpoints(target)
        .map(|e| RealServer {
            addr: e.ip,
            port: e.port,
            weight: 1,
        })
        .collect();
    out.sort();
    out.dedup_by_key(|r| r.id());
    out
}

/// The frontends of one service port: (frontend, address, port).
pub fn frontends(svc: &ServicePortState, node_addrs: &[IpAddr]) -> Vec<(Frontend, IpAddr, u16)> {
    let mut out = Vec::new();
    out.extend(svc.cluster_ip.map(|ip| (Frontend::ClusterIp, ip, svc.port)));
    out.extend(
        svc.external_ips
            .iter()
            .map(|&ip| (Frontend::ExternalIp, ip, svc.port)),
    );
    out.extend(
        svc.load_balancer_ips
            .iter()
            .map(|&ip| (Frontend::LoadBalancer, ip, svc.port)),
    );
    if let Some(np) = svc.node_port {
        out.extend(node_addrs.iter().map(|&ip| (Frontend::NodePort, ip, np)));
    }
    out
}

/// The virtual servers of one service port `name` of `fam`: one per frontend address
/// (of this family), port and protocol, with the internal target's endpoints on the
/// ClusterIP and the external target's on the others.
pub fn service_virtual_servers(
    fam: &FamilyState,
    name: &ServicePortName,
    svc: &ServicePortState,
    scheduler: &str,
    node_addrs: &[IpAddr],
) -> Vec<Wanted> {
    let v4 = matches!(fam.family, svcplane_model::IpFamily::V4);
    frontends(svc, node_addrs)
        .into_iter()
        .filter(|(_, addr, _)| addr.is_ipv4() == v4)
        .map(|(frontend, addr, port)| Wanted {
            vs: VirtualServer {
                key: VsKey {
                    addr,
                    protocol: svc.protocol,
                    port,
                },
                // The Service's annotation, else `--ipvs-scheduler`.
                scheduler: svc
                    .ipvs_scheduler
                    .as_deref()
                    .unwrap_or(scheduler)
                    .to_owned(),
                persistence: svc.affinity_timeout_seconds,
            },
            reals: reals(svc, frontend.external()),
            service: name.clone(),
            frontend,
        })
        .collect()
}

/// The virtual servers for `desired` ([`service_virtual_servers`] of every service
/// port). `node_addrs` are both families' NodePort addresses ([`nodeport_addresses`]).
/// Two services claiming the same address:port:protocol: the first (by name) keeps it.
pub fn virtual_servers(
    desired: &DesiredState,
    scheduler: &str,
    node_addrs: &[IpAddr],
) -> BTreeMap<VsKey, Wanted> {
    virtual_servers_contested(desired, scheduler, node_addrs).0
}

/// [`virtual_servers`], and the keys more than one service port claims (a partial sync
/// that touches one of those cannot tell the winner from the changed services alone).
pub fn virtual_servers_contested(
    desired: &DesiredState,
    scheduler: &str,
    node_addrs: &[IpAddr],
) -> (BTreeMap<VsKey, Wanted>, BTreeSet<VsKey>) {
    let mut out = BTreeMap::new();
    let mut contested = BTreeSet::new();
    for fam in desired.families() {
        for (name, svc) in &fam.services {
            for w in service_virtual_servers(fam, name, svc, scheduler, node_addrs) {
                match out.entry(w.vs.key) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(w);
                    }
                    std::collections::btree_map::Entry::Occupied(o) => {
                        contested.insert(*o.key());
                    }
                }
            }
        }
    }
    (out, contested)
}

/// The addresses each service port puts on the dummy interface (ClusterIP, externalIPs,
/// LoadBalancer IPs), counted once per service port: an address goes when its count
/// does. The keys are [`service_addresses`].
pub fn address_claims(desired: &DesiredState) -> BTreeMap<IpAddr, u32> {
    let mut out = BTreeMap::new();
    for fam in desired.families() {
        for svc in fam.services.values() {
            for ip in service_port_addresses(svc) {
                *out.entry(ip).or_insert(0) += 1;
            }
        }
    }
    out
}

/// One service port's addresses on the dummy interface, each once.
pub fn service_port_addresses(svc: &ServicePortState) -> BTreeSet<IpAddr> {
    svc.cluster_ip
        .into_iter()
        .chain(svc.external_ips.iter().copied())
        .chain(svc.load_balancer_ips.iter().copied())
        .collect()
}

/// Update the dummy's address `claims` ([`address_claims`] of `prev`) to `desired`
/// for the service ports `changed`: the addresses that came and those that went.
pub fn update_address_claims(
    claims: &mut BTreeMap<IpAddr, u32>,
    prev: &DesiredState,
    desired: &DesiredState,
    changed: &BTreeSet<&ServicePortName>,
) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let mut delta: BTreeMap<IpAddr, i64> = BTreeMap::new();
    for (old, new) in prev.families().into_iter().zip(desired.families()) {
        for name in changed {
            if let Some(svc) = old.services.get(name) {
                for ip in service_port_addresses(svc) {
                    *delta.entry(ip).or_insert(0) -= 1;
                }
            }
            if let Some(svc) = new.services.get(name) {
                for ip in service_port_addresses(svc) {
                    *delta.entry(ip).or_insert(0) += 1;
                }
            }
        }
    }
    let (mut came, mut gone) = (Vec::new(), Vec::new());
    for (ip, d) in delta {
        let before = i64::from(claims.get(&ip).copied().unwrap_or(0));
        let after = before + d;
        if after <= 0 {
            claims.remove(&ip);
        } else {
            claims.insert(ip, u32::try_from(after).unwrap_or(u32::MAX));
        }
        match (before > 0, after > 0) {
            (false, true) => came.push(ip),
            (true, false) => gone.push(ip),
            _ => {}
        }
    }
    (came, gone)
}

/// The virtual servers a partial sync takes out and puts in, each with its family's
/// index in [`DesiredState::families`].
#[derive(Debug, Default)]
pub struct VsChange {
    /// Applied keys of the changed service ports (their old virtual servers).
    pub gone: Vec<(usize, VsKey)>,
    /// The changed service ports' virtual servers now.
    pub came: BTreeMap<VsKey, (usize, Wanted)>,
}

/// A virtual server with the service port it serves.
pub type ServedBy<'a> = (&'a Wanted, &'a ServicePortState);

impl VsChange {
    /// Family `family`'s virtual servers that go (as `applied` holds them, with their
    /// service port in `old`) and that come (with theirs in `new`): what
    /// [`FilterState::update`](super::filter::FilterState::update) takes.
    pub fn served<'a>(
        &'a self,
        family: usize,
        applied: &'a BTreeMap<VsKey, Wanted>,
        old: &'a FamilyState,
        new: &'a FamilyState,
    ) -> (Vec<ServedBy<'a>>, Vec<ServedBy<'a>>) {
        let removed = self
            .gone
            .iter()
            .filter(|(f, _)| *f == family)
            .filter_map(|(_, k)| {
                let w = applied.get(k)?;
                Some((w, old.services.get(&w.service)?.as_ref()))
            })
            .collect();
        let added = self
            .came
            .values()
            .filter(|(f, _)| *f == family)
            .filter_map(|(_, w)| Some((w, new.services.get(&w.service)?.as_ref())))
            .collect();
        (removed, added)
    }

    /// Record the change as applied.
    pub fn apply_to(self, applied: &mut BTreeMap<VsKey, Wanted>) {
        for (_, k) in &self.gone {
            applied.remove(k);
        }
        for (k, (_, w)) in self.came {
            applied.insert(k, w);
        }
    }
}

/// The virtual servers of the service ports `changed`, before (`prev`, as `applied`
/// holds them) and after (`desired`): the work is in the changed services, not in all.
/// `None` when a key is claimed by another service port too ([`virtual_servers`]'s
/// first-by-name rule needs every service: compute in full then).
pub fn changed_virtual_servers(
    prev: &DesiredState,
    desired: &DesiredState,
    changed: &BTreeSet<&ServicePortName>,
    applied: &BTreeMap<VsKey, Wanted>,
    contested: &BTreeSet<VsKey>,
    scheduler: &str,
    node_addrs: &[IpAddr],
) -> Option<VsChange> {
    let mut out = VsChange::default();
    for (i, (old, new)) in prev
        .families()
        .into_iter()
        .zip(desired.families())
        .enumerate()
    {
        for name in changed {
            if let Some(svc) = old.services.get(name) {
                for w in service_virtual_servers(old, name, svc, scheduler, node_addrs) {
                    let k = w.vs.key;
                    if contested.contains(&k) {
                        return None;
                    }
                    if applied.get(&k).is_some_and(|a| &a.service == *name) {
                        out.gone.push((i, k));
                    }
                }
            }
            if let Some(svc) = new.services.get(name) {
                for w in service_virtual_servers(new, name, svc, scheduler, node_addrs) {
                    let k = w.vs.key;
                    let taken = applied
                        .get(&k)
                        .is_some_and(|a| !changed.contains(&a.service));
                    if contested.contains(&k) || taken || out.came.contains_key(&k) {
                        return None;
                    }
                    out.came.insert(k, (i, w));
                }
            }
        }
    }
    Some(out)
}

/// A virtual server as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub vs: VirtualServer,
    pub dests: Vec<DestStatus>,
}

/// One change to IPVS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddService(VirtualServer),
    EditService(VirtualServer),
    DelService(VsKey),
    AddDest(VsKey, RealServer),
    EditDest(VsKey, RealServer),
    DelDest(VsKey, RealServer),
}

/// The operations of one sync, and the virtual servers left with draining real servers
/// (to look at again at the next sync).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub draining: BTreeSet<VsKey>,
}

/// Whether a removed real server drains (weight 0 until its connections are gone) rather
/// than going at once: kube-proxy's `IsRsGracefulTerminationNeeded`, everything but UDP.
/// (A UDP real server goes at once; its conntrack entries are deleted after the sync.)
pub fn drains(protocol: Protocol) -> bool {
    protocol != Protocol::Udp
}

/// Whether `addr` is in one of `exclude` (`--ipvs-exclude-cidrs`).
pub fn excluded(exclude: &[IpNet], addr: &IpAddr) -> bool {
    exclude.iter().any(|c| c.contains(addr))
}

/// The operations taking `current` (the kernel's virtual servers svcplane owns, among
/// those `in_scope`) to `wanted` (likewise restricted to `in_scope`). A virtual server
/// not wanted whose address is in `exclude` stays: kube-proxy's `excludeCIDRs`, which
/// its stale-virtual-server cleanup skips (someone else's, e.g. a keepalived or kube-vip
/// VIP's); wanted ones are programmed whatever their address, as there.
pub fn plan(
    wanted: &BTreeMap<VsKey, Wanted>,
    current: &BTreeMap<VsKey, Current>,
    exclude: &[IpNet],
    in_scope: impl Fn(&VsKey) -> bool,
) -> Plan {
    let mut p = Plan::default();
    for key in current.keys() {
        if in_scope(key) && !wanted.contains_key(key) && !excluded(exclude, &key.addr) {
            // As kube-proxy: a Service's virtual server goes at once with the Service.
            p.ops.push(Op::DelService(*key));
        }
    }
    for (key, w) in wanted {
        if !in_scope(key) {
            continue;
        }
        let Some(cur) = current.get(key) else {
            p.ops.push(Op::AddService(w.vs.clone()));
            p.ops.extend(w.reals.iter().map(|r| Op::AddDest(*key, *r)));
            continue;
        };
        if cur.vs != w.vs {
            p.ops.push(Op::EditService(w.vs.clone()));
        }
        let have: BTreeMap<(IpAddr, u16), &DestStatus> =
            cur.dests.iter().map(|d| (d.server.id(), d)).collect();
        let want: BTreeSet<(IpAddr, u16)> = w.reals.iter().map(RealServer::id).collect();
        for r in &w.reals {
            match have.get(&r.id()) {
                None => p.ops.push(Op::AddDest(*key, *r)),
                Some(d) if d.server.weight != r.weight || d.foreign_forwarding => {
                    p.ops.push(Op::EditDest(*key, *r))
                }
                Some(_) => {}
            }
        }
        for d in &cur.dests {
            if want.contains(&d.server.id()) {
                continue;
            }
            if drains(key.protocol) && d.active + d.inactive > 0 {
                if d.server.weight != 0 {
                    p.ops.push(Op::EditDest(
                        *key,
                        RealServer {
                            weight: 0,
                            ..d.server
                        },
                    ));
                }
                p.draining.insert(*key);
            } else {
                p.ops.push(Op::DelDest(*key, d.server));
            }
        }
    }
    p
}

/// `[addr]:port` for IPv6, `addr:port` for IPv4, as ipvsadm prints them.
fn addr_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// The header `ipvsadm -L -n` prints after its version line.
pub const IPVSADM_HEADER: &str = "Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n";

/// One virtual server in `ipvsadm -L -n`'s layout (ipvsadm's `print_service_entry`),
/// connection counts included (0 for a render).
pub fn ipvsadm_entry(vs: &VirtualServer, dests: &[(RealServer, u32, u32)]) -> String {
    let mut out = format!(
        "{}  {} {}",
        proto_name(vs.key.protocol),
        addr_port(vs.key.addr, vs.key.port),
        vs.scheduler
    );
    if let Some(t) = vs.persistence {
        let _ = write!(out, " persistent {t}");
    }
    out.push('\n');
    for (r, active, inactive) in dests {
        let _ = writeln!(
            out,
            "  -> {:<28} {:<7} {:<6} {:<10} {:<10}",
            addr_port(r.addr, r.port),
            "Masq",
            r.weight,
            active,
            inactive
        );
    }
    out
}

/// Every wanted virtual server in `ipvsadm -L -n`'s layout (sorted, as `--sort`).
pub fn ipvsadm_listing(wanted: &BTreeMap<VsKey, Wanted>) -> String {
    let mut out = String::from(IPVSADM_HEADER);
    for w in wanted.values() {
        let dests: Vec<_> = w.reals.iter().map(|r| (*r, 0, 0)).collect();
        out.push_str(&ipvsadm_entry(&w.vs, &dests));
    }
    out
}
