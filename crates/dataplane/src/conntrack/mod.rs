//! The UDP/SCTP conntrack reconciler (kube-proxy's `pkg/proxy/conntrack` `CleanStaleEntries`):
//! after a successful sync, delete conntrack entries that would keep datagrams of a
//! service flowing to an endpoint that is gone. UDP has no connection to reset, so a
//! DNS-like client reusing its 5-tuple would otherwise blackhole until the entry times out.
//!
//! An entry of family F is stale when its original destination is a UDP or SCTP frontend
//! of F's desired state (ClusterIP:port, externalIP:port, LoadBalancer IP:port, or a local
//! NodePort address:nodePort) and either
//! - it was DNATed (reply source ≠ original destination) to an ip:port that is not an
//!   endpoint of that service port, or
//! - it was not DNATed (created while nothing translated that frontend) and the traffic
//!   target that frontend uses now has endpoints.
//!
//! Differences from kube-proxy, deliberately:
//! - Endpoints are matched by ip:port, not ip alone, so a targetPort change moves flows too.
//! - A service port without endpoints still gets its DNATed entries deleted (kube-proxy
//!   skips such services): the next datagram then meets the REJECT rule at once instead
//!   of vanishing into the deleted pod.
//! - "Endpoint" is [`ServicePortState::endpoints`], the endpoints some target uses. A
//!   serving terminating endpoint that no target uses (ready ones exist) loses its UDP
//!   flows to the ready ones; kube-proxy would let them drain.
//! - SCTP entries are reconciled like UDP (kube-proxy reconciles UDP only since 1.31).
//! - NodePort entries must be addressed to a local address where NodePorts are accepted
//!   (kube-proxy matches the port on any destination).
//!
//! [`stale_flows`] is the pure decision; [`netlink`] talks to the kernel; [`Reconciler`]
//! joins them for one sync.

pub mod netlink;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use svcplane_model::{IpFamily, Protocol};
use svcplane_proxy::{
    DesiredState, Diff, ExternalPolicy, FamilyState, NodePortAddresses, ServicePortState,
    SyncReport,
};

pub use netlink::{ConntrackSocket, DeleteOutcome, local_addresses};

/// IANA protocol numbers as conntrack reports them.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Why the reconciler could not do its work (the sync it follows still succeeded).
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot open a conntrack netlink socket: {0}")]
    Socket(io::Error),
    #[error("conntrack netlink: {0}")]
    Io(io::Error),
    #[error("conntrack {request} failed: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { request: &'static str, errno: i32 },
    #[error("malformed conntrack netlink message: {0}")]
    Malformed(String),
    #[error("cannot list local addresses: {0}")]
    LocalAddresses(io::Error),
}

/// One direction of a conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IANA protocol number ([`IPPROTO_UDP`], ...).
    pub protocol: u8,
    /// 0 for protocols without ports.
    pub src_port: u16,
    pub dst_port: u16,
}

/// A conntrack entry as dumped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The original direction: the client's packet before NAT.
    pub orig: Tuple,
    /// The reply direction: after DNAT its source is the endpoint.
    pub reply: Tuple,
    /// `CTA_ZONE` (absent: the default zone).
    pub zone: Option<u16>,
    /// `CTA_ID`; a delete naming it removes only this entry, not one recreated since.
    pub id: Option<u32>,
}

impl Flow {
    /// The destination was translated: the reply does not come from the original destination.
    pub fn is_dnat(&self) -> bool {
        (self.reply.src, self.reply.src_port) != (self.orig.dst, self.orig.dst_port)
    }
}

/// Whether `svc`'s flows are reconciled: UDP and SCTP, which have no connection to reset.
fn reconciled(svc: &ServicePortState) -> bool {
    matches!(svc.protocol, Protocol::Udp | Protocol::Sctp)
}

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

/// One service port reachable on one frontend.
#[derive(Debug, Clone, Copy)]
struct Frontend<'a> {
    service: &'a ServicePortState,
    /// The traffic target this frontend uses has endpoints (internal for the ClusterIP,
    /// external, or for eTP Local also the local-origin one, for the others).
    has_endpoints: bool,
}

/// The UDP and SCTP frontends of one family's desired state, indexed for lookups.
#[derive(Debug)]
pub struct Frontends<'a> {
    /// (protocol, ip, port) → ClusterIP, externalIP and LoadBalancer IP frontends.
    by_addr: HashMap<(u8, IpAddr, u16), Vec<Frontend<'a>>>,
    /// (protocol, nodePort) → NodePort frontends.
    node_ports: HashMap<(u8, u16), Vec<Frontend<'a>>>,
    /// Local addresses of the family where NodePorts are accepted.
    node_port_ips: HashSet<IpAddr>,
}

impl<'a> Frontends<'a> {
    /// `local_addrs`: the node's local addresses (any family; loopback is ignored, as the
    /// rules never accept NodePorts there).
    pub fn new(state: &'a FamilyState, local_addrs: &[IpAddr]) -> Frontends<'a> {
        Frontends::of(state, state.services.values().map(|s| &**s), local_addrs)
    }

    /// The frontends of `ports` only (service ports of `state`).
    pub fn of(
        state: &FamilyState,
        ports: impl Iterator<Item = &'a ServicePortState>,
        local_addrs: &[IpAddr],
    ) -> Frontends<'a> {
        let mut by_addr: HashMap<_, Vec<_>> = HashMap::new();
        let mut node_ports: HashMap<_, Vec<_>> = HashMap::new();
        for svc in ports.filter(|s| reconciled(s)) {
            let proto = protocol_number(svc.protocol);
            let external_has_endpoints = !svc.external.endpoints.is_empty()
                || matches!(&svc.external_policy, ExternalPolicy::Local { local_origin } if !local_origin.endpoints.is_empty());
            if let Some(ip) = svc.cluster_ip {
                by_addr
                    .entry((proto, ip, svc.port))
                    .or_default()
                    .push(Frontend {
                        service: svc,
                        has_endpoints: !svc.internal.endpoints.is_empty(),
                    });
            }
            let external = Frontend {
                service: svc,
                has_endpoints: external_has_endpoints,
            };
            for &ip in svc.external_ips.iter().chain(&svc.load_balancer_ips) {
                by_addr
                    .entry((proto, ip, svc.port))
                    .or_default()
                    .push(external);
            }
            if let Some(np) = svc.node_port {
                node_ports.entry((proto, np)).or_default().push(external);
            }
        }
        let node_port_ips = local_addrs
            .iter()
            .copied()
            .filter(|ip| IpFamily::of(ip) == state.family && !ip.is_loopback())
            .filter(|ip| match &state.nodeport_addresses {
                NodePortAddresses::AllLocal => true,
                NodePortAddresses::Cidrs(cidrs) => cidrs.iter().any(|c| c.contains(ip)),
            })
            .collect();
        Frontends {
            by_addr,
            node_ports,
            node_port_ips,
        }
    }

    /// No UDP or SCTP frontend: no entry can be stale, the dump can be skipped.
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty() && self.node_ports.is_empty()
    }

    /// Should `flow` be deleted? See the module documentation.
    pub fn is_stale(&self, flow: &Flow) -> bool {
        let o = &flow.orig;
        if o.protocol != IPPROTO_UDP && o.protocol != IPPROTO_SCTP {
            return false;
        }
        let by_addr = self.by_addr.get(&(o.protocol, o.dst, o.dst_port));
        let by_node_port = self
            .node_port_ips
            .contains(&o.dst)
            .then(|| self.node_ports.get(&(o.protocol, o.dst_port)))
            .flatten();
        let mut matched = by_addr.into_iter().chain(by_node_port).flatten().peekable();
        if matched.peek().is_none() {
            return false;
        }
        if flow.is_dnat() {
            let (ip, port) = (flow.reply.src, flow.reply.src_port);
            !matched.any(|f| {
                f.service
                    .endpoints
                    .iter()
                    .any(|e| e.ip == ip && e.port == port)
            })
        } else {
            matched.any(|f| f.has_endpoints)
        }
    }
}

/// The entries of `flows` to delete, given one family's desired state and the node's
/// local addresses.
pub fn stale_flows<'f>(
    state: &FamilyState,
    local_addrs: &[IpAddr],
    flows: &'f [Flow],
) -> Vec<&'f Flow> {
    let frontends = Frontends::new(state, local_addrs);
    flows.iter().filter(|f| frontends.is_stale(f)).collect()
}

/// Where the reconciler works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConntrackScope {
    /// Not at all (tests that program another namespace's rules from this one).
    Disabled,
    /// This process's network namespace (the node's, for `svcplane proxy`).
    CurrentNetns,
    /// The namespace `/run/netns/NAME`.
    Netns(String),
}

/// What the reconciler did in one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyOutcome {
    /// Entries dumped.
    pub entries: usize,
    /// Entries found stale.
    pub stale: usize,
    /// Stale entries the kernel deleted (others had gone by themselves).
    pub deleted: u64,
    /// Stale entries the kernel refused to delete.
    pub failed: u64,
}

/// What one reconciliation did, both families.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub v4: FamilyOutcome,
    pub v6: FamilyOutcome,
    /// What went wrong: opening the socket, listing addresses, a family's dump or deletes.
    pub errors: Vec<ConntrackError>,
}

impl ReconcileReport {
    /// Failures to count: errors plus entries the kernel refused to delete.
    pub fn failures(&self) -> u64 {
        self.errors.len() as u64 + self.v4.failed + self.v6.failed
    }
}

/// Runs the reconciliation against the kernel.
#[derive(Debug, Clone)]
pub struct Reconciler {
    scope: ConntrackScope,
}

impl Reconciler {
    pub fn new(scope: ConntrackScope) -> Reconciler {
        Reconciler { scope }
    }

    pub fn scope(&self) -> &ConntrackScope {
        &self.scope
    }

    /// `report` (of the sync that just programmed `desired`; `changed` as for
    /// [`Reconciler::reconcile`]) with the reconciliation's counts. Its failures are only
    /// logged: the rules are in place.
    pub fn reconcile_into(
        &self,
        desired: &DesiredState,
        changed: Option<&Diff>,
        mut report: SyncReport,
    ) -> SyncReport {
        let ct = self.reconcile(desired, changed);
        for e in &ct.errors {
            tracing::warn!(error = %e, "conntrack cleanup failed; stale UDP flows stay until the next sync");
        }
        report.conntrack_deleted_v4 = ct.v4.deleted;
        report.conntrack_deleted_v6 = ct.v6.deleted;
        report.conntrack_failures = ct.failures();
        report
    }

    /// Reconcile both families against `desired`: the flows of every service port, or
    /// with `changed` (the partial sync that was just applied) of the ports it added or
    /// changed only; the others' flows were reconciled when they last changed, and their
    /// endpoints have not since. (One limit: a frontend shared by a changed port and an
    /// unchanged one, an invalid cluster, loses the unchanged one's flows.) Nothing
    /// happens when disabled, and a family without such UDP or SCTP service ports is not
    /// even dumped.
    pub fn reconcile(&self, desired: &DesiredState, changed: Option<&Diff>) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let netns = match &self.scope {
            ConntrackScope::Disabled => return report,
            ConntrackScope::CurrentNetns => None,
            ConntrackScope::Netns(name) => Some(name.as_str()),
        };
        let wanted: Vec<(&FamilyState, Vec<&ServicePortState>)> = desired
            .families()
            .into_iter()
            .map(|state| (state, reconciled_ports(state, changed)))
            .filter(|(_, ports)| !ports.is_empty())
            .collect();
        if wanted.is_empty() {
            return report;
        }
        let opened = ConntrackSocket::open_in(netns).and_then(|socket| {
            let addrs = local_addresses(netns).map_err(ConntrackError::LocalAddresses)?;
            Ok((socket, addrs))
        });
        let (mut socket, addrs) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        };
        for (state, ports) in wanted {
            let frontends = Frontends::of(state, ports.into_iter(), &addrs);
            match reconcile_family(&mut socket, state.family, &frontends) {
                Ok(outcome) => match state.family {
                    IpFamily::V4 => report.v4 = outcome,
                    IpFamily::V6 => report.v6 = outcome,
                },
                Err(e) => report.errors.push(e),
            }
        }
        report
    }
}

/// The UDP and SCTP ports of `state` whose flows [`Reconciler::reconcile`] looks at:
/// every one, or the ones `changed` added or changed (all when the family's globals,
/// which decide NodePort frontends, changed).
fn reconciled_ports<'a>(
    state: &'a FamilyState,
    changed: Option<&Diff>,
) -> Vec<&'a ServicePortState> {
    let ports: Box<dyn Iterator<Item = &Arc<ServicePortState>>> = match changed
        .map(|d| d.family(state.family))
        .filter(|d| !d.globals_changed)
    {
        Some(fd) => Box::new(
            fd.added
                .iter()
                .chain(&fd.changed)
                .filter_map(|name| state.services.get(name)),
        ),
        None => Box::new(state.services.values()),
    };
    ports.map(|s| &**s).filter(|s| reconciled(s)).collect()
}

fn reconcile_family(
    socket: &mut ConntrackSocket,
    family: IpFamily,
    frontends: &Frontends,
) -> Result<FamilyOutcome, ConntrackError> {
    if frontends.is_empty() {
        return Ok(FamilyOutcome::default());
    }
    let mut entries = 0;
    let stale = socket.dump_matching(family, |f| {
        entries += 1;
        frontends.is_stale(f)
    })?;
    let mut outcome = FamilyOutcome {
        entries,
        stale: stale.len(),
        ..FamilyOutcome::default()
    };
    tracing::debug!(
        family = ?family,
        entries,
        stale = stale.len(),
        "conntrack table reconciled"
    );
    if stale.is_empty() {
        return Ok(outcome);
    }
    let deleted = socket.delete(&stale)?;
    for (tuple, errno) in &deleted.failed {
        tracing::warn!(
            flow = ?tuple,
            error = %io::Error::from_raw_os_error(*errno),
            "cannot delete a stale conntrack entry"
        );
    }
    outcome.deleted = deleted.deleted;
    outcome.failed = deleted.failed.len() as u64;
    Ok(outcome)
}

#[cfg(test)]
mod tests;
