//! The IPVS backend (`--proxy-mode ipvs`), as kube-proxy's IPVS mode: a dummy interface
//! ([`DUMMY`], down) holding every ClusterIP, externalIP and LoadBalancer IP; one IPVS
//! virtual server per frontend address:port:protocol (NodePorts on each node address)
//! whose real servers are the endpoints the desired state chose, masquerade-forwarded;
//! and tables `ip`/`ip6` [`filter::TABLE`] for what IPVS does not do (see [`filter`]).
//!
//! Kernel conversations are netlink from Rust (`crate::netlink`): generic netlink for
//! IPVS ([`genl`]), rtnetlink for the interface ([`link`]); the filter tables go through
//! `nft -f -` in full syncs and as nf_tables netlink batches of set elements in partial
//! ones ([`filter::send_changes`]).
//!
//! Syncs change only differences: a full sync reads every virtual server svcplane owns
//! from the kernel and plans against that; a partial one works in the services the
//! engine's diff names, never in all of them (see `IpvsBackend::partial_sync`).
//! Graceful termination: see [`plan::plan`].

pub mod filter;
pub mod genl;
pub mod link;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use svcplane_model::{IpFamily, ServicePortName};
use svcplane_proxy::{Dataplane, DataplaneError, DesiredState, Diff, SyncReport};

use crate::conntrack::{ConntrackScope, Reconciler, local_addresses};
use crate::netlink::NetlinkError;
use filter::FilterState;
pub use genl::Timeouts;
use genl::{Ipvs, Request};
use link::Links;
use plan::{Current, Op, VsKey, Wanted};

/// svcplane's dummy interface (kube-proxy's is `kube-ipvs0`).
pub const DUMMY: &str = "svcplane-ipvs0";

/// The schedulers `--ipvs-scheduler` and the per-Service annotation accept (kube-proxy's
/// list; the kernel must have the `ip_vs_<name>` module).
pub use svcplane_model::IPVS_SCHEDULERS as SCHEDULERS;

/// IPVS mode's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsOptions {
    /// `--ipvs-scheduler` (default `rr`).
    pub scheduler: String,
    /// `--ipvs-strict-arp`: arp_ignore=1 / arp_announce=2 on all interfaces.
    pub strict_arp: bool,
    /// `--ipvs-exclude-cidrs`: virtual servers on these addresses are never deleted
    /// unless svcplane wants them (see [`plan::plan`]), nor by [`IpvsBackend::cleanup`].
    pub exclude_cidrs: Vec<IpNet>,
    /// `--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`, `--ipvs-udp-timeout`: set once,
    /// at the first sync; 0 leaves the kernel's value.
    pub timeouts: Timeouts,
}

impl Default for IpvsOptions {
    fn default() -> Self {
        IpvsOptions {
            scheduler: "rr".to_owned(),
            strict_arp: false,
            exclude_cidrs: Vec::new(),
            timeouts: Timeouts::default(),
        }
    }
}

/// A timeout flag's duration in IPVS's unit, whole seconds, cut as kube-proxy's
/// `uint32(d.Seconds())` cuts it (so under 1s is 0: the kernel's value stays); past
/// u32 the kernel refuses it (logged at the first sync).
pub fn timeout_seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// A scheduler name checked against [`SCHEDULERS`]; empty means `rr`, as kube-proxy.
pub fn parse_scheduler(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok("rr".to_owned());
    }
    if SCHEDULERS.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "invalid IPVS scheduler {s:?}: expected one of {}",
            SCHEDULERS.join(", ")
        ))
    }
}

/// The sysctls kube-proxy's IPVS mode sets, (path under /proc/sys, value).
pub fn sysctls(strict_arp: bool) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        // Connections IPVS handles get conntrack entries: needed for the masquerade
        // rules and the UDP conntrack cleanup.
        ("net/ipv4/vs/conntrack", "1"),
        // Packets of a connection whose real server was deleted are dropped at once
        // (the client retries elsewhere) instead of waiting for a timeout.
        ("net/ipv4/vs/expire_nodest_conn", "1"),
        // Persistence templates of a weight-0 real server expire with it.
        ("net/ipv4/vs/expire_quiescent_template", "1"),
        ("net/ipv4/ip_forward", "1"),
    ];
    if strict_arp {
        v.push(("net/ipv4/conf/all/arp_ignore", "1"));
        v.push(("net/ipv4/conf/all/arp_announce", "2"));
    }
    v
}

/// Set each of `sysctls` that differs; one warning per sysctl that cannot be read or set.
fn apply_sysctls(list: &[(&str, &str)]) -> Vec<String> {
    let mut warnings = Vec::new();
    for (path, value) in list {
        let full = format!("/proc/sys/{path}");
        match std::fs::read_to_string(&full) {
            Ok(cur) if cur.trim() == *value => {}
            _ => {
                if let Err(e) = std::fs::write(&full, value) {
                    warnings.push(format!(
                        "cannot set sysctl {} to {value}: {e}",
                        path.replace('/', ".")
                    ));
                }
            }
        }
    }
    warnings
}

fn nl_error(what: &str, e: NetlinkError) -> DataplaneError {
    DataplaneError::Other(format!("{what}: {e}"))
}

/// The IPVS dataplane.
pub struct IpvsBackend {
    options: IpvsOptions,
    /// `None`: this process's network namespace.
    netns: Option<String>,
    nft: Vec<String>,
    needs_full: bool,
    conntrack: Reconciler,
    /// The sysctls and the timeouts were set (once, at the first sync).
    sysctls_checked: bool,
    /// Virtual servers as last applied.
    applied: BTreeMap<VsKey, Wanted>,
    /// Dummy interface addresses as last applied, with how many service ports claim
    /// each ([`plan::address_claims`]).
    vip_claims: BTreeMap<IpAddr, u32>,
    /// Virtual server keys more than one service port claims, as of the last full
    /// computation: a partial sync touching one of them syncs in full.
    contested: BTreeSet<VsKey>,
    /// Filter state per family (v4, v6) as last applied.
    applied_filter: [Option<FilterState>; 2],
    /// NodePort addresses the last sync used.
    applied_node_addrs: Vec<IpAddr>,
    /// Virtual servers with real servers at weight 0 waiting for their connections to end.
    draining: BTreeSet<VsKey>,
    ipvs: Option<Ipvs>,
    links: Option<Links>,
    /// nf_tables netlink socket for the filter tables' element changes.
    nft_socket: Option<filter::ElementSocket>,
}

impl std::fmt::Debug for IpvsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpvsBackend")
            .field("options", &self.options)
            .field("netns", &self.netns)
            .field("needs_full", &self.needs_full)
            .field("virtual_servers", &self.applied.len())
            .finish()
    }
}

impl Default for IpvsBackend {
    fn default() -> Self {
        Self::new(IpvsOptions::default())
    }
}

impl IpvsBackend {
    pub fn new(options: IpvsOptions) -> Self {
        IpvsBackend {
            options,
            netns: None,
            nft: vec!["nft".to_owned()],
            needs_full: true,
            conntrack: Reconciler::new(ConntrackScope::CurrentNetns),
            sysctls_checked: false,
            applied: BTreeMap::new(),
            vip_claims: BTreeMap::new(),
            contested: BTreeSet::new(),
            applied_filter: [None, None],
            applied_node_addrs: Vec::new(),
            draining: BTreeSet::new(),
            ipvs: None,
            links: None,
            nft_socket: None,
        }
    }

    /// Program the named network namespace (`ip netns` name) from this process.
    pub fn in_netns(name: &str, options: IpvsOptions) -> Self {
        IpvsBackend {
            netns: Some(name.to_owned()),
            nft: ["ip", "netns", "exec", name, "nft"]
                .map(str::to_owned)
                .to_vec(),
            conntrack: Reconciler::new(ConntrackScope::Netns(name.to_owned())),
            ..Self::new(options)
        }
    }

    /// Virtual servers with draining real servers (for tests and logs).
    pub fn draining(&self) -> &BTreeSet<VsKey> {
        &self.draining
    }

    fn ipvs(&mut self) -> Result<&mut Ipvs, DataplaneError> {
        if self.ipvs.is_none() {
            let opened = Ipvs::open(self.netns.as_deref()).or_else(|e| {
                if e.errno() == Some(libc::ENOENT) {
                    // The family appears once the module is loaded.
                    let _ = Command::new("modprobe")
                        .arg("ip_vs")
                        .stderr(Stdio::null())
                        .status();
                    Ipvs::open(self.netns.as_deref())
                } else {
                    Err(e)
                }
            });
            self.ipvs = Some(opened.map_err(|e| {
                nl_error(
                    "cannot talk to IPVS (generic netlink family \"IPVS\"; is the ip_vs module available?)",
                    e,
                )
            })?);
        }
        self.ipvs
            .as_mut()
            .ok_or_else(|| DataplaneError::Other("no IPVS socket".into()))
    }

    fn links(&mut self) -> Result<&mut Links, DataplaneError> {
        if self.links.is_none() {
            self.links = Some(
                Links::open(self.netns.as_deref()).map_err(|e| nl_error("rtnetlink socket", e))?,
            );
        }
        self.links
            .as_mut()
            .ok_or_else(|| DataplaneError::Other("no rtnetlink socket".into()))
    }

    fn run_nft(&self, script: &str) -> Result<(), DataplaneError> {
        run_nft(&self.nft, &["-f", "-"], Some(script)).map(drop)
    }

    fn check_sysctls(&mut self) {
        if self.sysctls_checked {
            return;
        }
        self.sysctls_checked = true;
        let list = sysctls(self.options.strict_arp);
        let warnings = match self.netns.as_deref() {
            None => apply_sysctls(&list),
            Some(ns) => crate::netlink::in_netns(ns, || apply_sysctls(&list))
                .unwrap_or_else(|e| vec![format!("cannot enter netns {ns} for sysctls: {e}")]),
        };
        for w in warnings {
            tracing::warn!("{w}; IPVS mode may misbehave");
        }
        self.set_timeouts();
    }

    /// The IPVS timeouts, as kube-proxy sets them at startup (`ipvsadm --set`): only
    /// when one is given, and a failure is logged, not fatal.
    fn set_timeouts(&mut self) {
        let t = self.options.timeouts;
        if t.is_unset() {
            return;
        }
        let result = self.ipvs().and_then(|ipvs| {
            ipvs.send(&Request::set_timeouts(&t))
                .map_err(|e| nl_error("IPVS_CMD_SET_CONFIG", e))
        });
        match result {
            Ok(()) => tracing::info!(
                tcp = t.tcp,
                tcpfin = t.tcp_fin,
                udp = t.udp,
                "set IPVS timeouts (seconds; 0 left as it was)"
            ),
            Err(e) => tracing::error!(error = %e, "failed to configure IPVS timeouts"),
        }
    }

    /// The node's addresses for NodePorts, both families.
    fn node_addresses(
        &self,
        desired: &DesiredState,
        dummy_addrs: &BTreeSet<IpAddr>,
        vips: &BTreeSet<IpAddr>,
    ) -> Result<Vec<IpAddr>, DataplaneError> {
        let local = local_addresses(self.netns.as_deref())
            .map_err(|e| DataplaneError::Other(format!("cannot list local addresses: {e}")))?;
        let not_ours: Vec<IpAddr> = local
            .into_iter()
            .filter(|a| !dummy_addrs.contains(a))
            .collect();
        Ok(desired
            .families()
            .into_iter()
            .flat_map(|f| plan::nodeport_addresses(f, &not_ours, vips))
            .collect())
    }

    fn full_sync(&mut self, desired: &DesiredState) -> Result<SyncReport, DataplaneError> {
        let vips = plan::service_addresses(desired);
        let index = self
            .links()?
            .ensure_dummy(DUMMY)
            .map_err(|e| nl_error(&format!("creating interface {DUMMY}"), e))?;
        let on_dummy: BTreeSet<IpAddr> = self
            .links()?
            .addresses(index)
            .map_err(|e| nl_error(&format!("listing {DUMMY}'s addresses"), e))?
            .into_iter()
            .collect();
        let node_addrs = self.node_addresses(desired, &on_dummy, &vips)?;
        let (wanted, contested) =
            plan::virtual_servers_contested(desired, &self.options.scheduler, &node_addrs);

        // IPVS: every virtual server on an address svcplane manages.
        let owned_addrs: BTreeSet<IpAddr> = on_dummy.iter().chain(vips.iter()).copied().collect();
        let ipvs = self.ipvs()?;
        let services = ipvs
            .services()
            .map_err(|e| nl_error("listing IPVS services", e))?;
        let mut current = BTreeMap::new();
        for vs in services {
            let key = vs.key;
            if !(owned_addrs.contains(&key.addr)
                || wanted.contains_key(&key)
                || self.applied.contains_key(&key))
            {
                continue;
            }
            let dests = self
                .ipvs()?
                .dests(&key)
                .map_err(|e| nl_error("listing IPVS real servers", e))?;
            current.insert(key, Current { vs, dests });
        }
        let plan = plan::plan(&wanted, &current, &self.options.exclude_cidrs, |_| true);
        let mut size = self.apply_ops(&plan.ops)?;
        self.draining = plan.draining;

        // Addresses after the virtual servers: a new address is never live without them.
        let links = self.links()?;
        for ip in vips.difference(&on_dummy) {
            links
                .add_address(index, *ip)
                .map_err(|e| nl_error(&format!("adding {ip} to {DUMMY}"), e))?;
        }
        for ip in on_dummy.difference(&vips) {
            links
                .del_address(index, *ip)
                .map_err(|e| nl_error(&format!("removing {ip} from {DUMMY}"), e))?;
        }

        let mut script = String::new();
        let mut filters = [None, None];
        for (i, fam) in desired.families().into_iter().enumerate() {
            let st = FilterState::build(fam, wanted.values(), &vips)?;
            script.push_str(&st.render(fam.family));
            filters[i] = Some(st);
        }
        self.run_nft(&script)?;
        size += script.len();
        self.applied_filter = filters;
        self.applied = wanted;
        self.contested = contested;
        self.vip_claims = plan::address_claims(desired);
        self.applied_node_addrs = node_addrs;
        Ok(SyncReport {
            full: true,
            size,
            ..SyncReport::default()
        })
    }

    /// `None` when the sync has to be full (the interface or a table is gone, NodePort
    /// addresses changed, a contested virtual server is involved, no previous state).
    ///
    /// The work is in the changed services' virtual servers, real servers and set
    /// elements, never in the number of services: their old virtual servers come from
    /// the previous desired state, their new ones from this one; the kernel is asked
    /// only about those (and the draining ones); the dummy's addresses change by claim
    /// counts; the filter tables' elements go as one nf_tables netlink batch.
    fn partial_sync(
        &mut self,
        desired: &DesiredState,
        diff: &Diff,
    ) -> Result<Option<SyncReport>, DataplaneError> {
        let Some(prev) = diff.previous.as_deref() else {
            return Ok(None);
        };
        let Some(index) = self
            .links()?
            .index(DUMMY)
            .map_err(|e| nl_error("looking up the dummy interface", e))?
        else {
            tracing::warn!("interface {DUMMY} is gone; syncing in full");
            return Ok(None);
        };
        let changed: BTreeSet<&ServicePortName> = [&diff.v4, &diff.v6]
            .into_iter()
            .flat_map(|d| d.added.iter().chain(&d.changed).chain(&d.removed))
            .collect();

        // The dummy's addresses: claims of the changed service ports out, then in.
        let (vips_came, vips_gone) =
            plan::update_address_claims(&mut self.vip_claims, prev, desired, &changed);

        // NodePort addresses: the node's, without listing the dummy's (one per service).
        let local = self
            .links()?
            .addresses_except(index)
            .map_err(|e| nl_error("listing the node's addresses", e))?;
        let on_real: BTreeSet<IpAddr> = local
            .iter()
            .filter(|a| self.vip_claims.contains_key(a))
            .copied()
            .collect();
        let node_addrs: Vec<IpAddr> = desired
            .families()
            .into_iter()
            .flat_map(|f| plan::nodeport_addresses(f, &local, &on_real))
            .collect();
        if node_addrs != self.applied_node_addrs {
            return Ok(None);
        }

        // The changed services' virtual servers, before and after.
        let Some(change) = plan::changed_virtual_servers(
            prev,
            desired,
            &changed,
            &self.applied,
            &self.contested,
            &self.options.scheduler,
            &node_addrs,
        ) else {
            return Ok(None);
        };

        // IPVS: the changed virtual servers and those still draining.
        let mut scope: BTreeSet<VsKey> = self.draining.clone();
        scope.extend(change.gone.iter().map(|(_, k)| *k));
        scope.extend(change.came.keys().copied());
        let mut wanted: BTreeMap<VsKey, Wanted> = change
            .came
            .iter()
            .map(|(k, (_, w))| (*k, w.clone()))
            .collect();
        let gone_keys: BTreeSet<VsKey> = change.gone.iter().map(|(_, k)| *k).collect();
        for k in &self.draining {
            if !gone_keys.contains(k)
                && !wanted.contains_key(k)
                && let Some(w) = self.applied.get(k)
            {
                wanted.insert(*k, w.clone());
            }
        }
        let mut current = BTreeMap::new();
        for key in &scope {
            let ipvs = self.ipvs()?;
            if let Some(vs) = ipvs
                .service(key)
                .map_err(|e| nl_error("reading an IPVS service", e))?
            {
                let dests = ipvs
                    .dests(key)
                    .map_err(|e| nl_error("listing IPVS real servers", e))?;
                current.insert(*key, Current { vs, dests });
            }
        }
        let plan = plan::plan(&wanted, &current, &self.options.exclude_cidrs, |k| {
            scope.contains(k)
        });
        let mut size = self.apply_ops(&plan.ops)?;
        self.draining = plan.draining;

        // Addresses after the virtual servers: a new address is never live without them.
        let links = self.links()?;
        for ip in &vips_came {
            links
                .add_address(index, *ip)
                .map_err(|e| nl_error(&format!("adding {ip} to {DUMMY}"), e))?;
        }
        for ip in &vips_gone {
            links
                .del_address(index, *ip)
                .map_err(|e| nl_error(&format!("removing {ip} from {DUMMY}"), e))?;
        }

        // The filter tables' elements.
        let mut changes: [Option<Vec<filter::ElementChange>>; 2] = [None, None];
        for (i, (old, new)) in prev
            .families()
            .into_iter()
            .zip(desired.families())
            .enumerate()
        {
            let v4 = i == 0;
            let (removed, added) = change.served(i, &self.applied, old, new);
            let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
                ips.iter()
                    .copied()
                    .filter(|ip| ip.is_ipv4() == v4)
                    .collect()
            };
            let Some(state) = self.applied_filter[i].as_mut() else {
                return Ok(None);
            };
            changes[i] = state.update(
                &removed,
                &added,
                &of_family(&vips_gone),
                &of_family(&vips_came),
            );
        }
        change.apply_to(&mut self.applied);
        if changes.iter().all(Option::is_some) {
            size += self.send_elements(&changes)?;
        } else {
            // A source-range chain comes or goes: the whole tables through nft.
            let vips: BTreeSet<IpAddr> = self.vip_claims.keys().copied().collect();
            let mut script = filter::tables_present_probe();
            let mut filters = [None, None];
            for (i, fam) in desired.families().into_iter().enumerate() {
                let st = FilterState::build(fam, self.applied.values(), &vips)?;
                script.push_str(&st.render(fam.family));
                filters[i] = Some(st);
            }
            self.run_nft(&script)?;
            size += script.len();
            self.applied_filter = filters;
        }
        Ok(Some(SyncReport {
            full: false,
            size,
            ..SyncReport::default()
        }))
    }

    /// Send both families' element changes (see [`filter::send_changes`]); an error
    /// makes the sync full.
    fn send_elements(
        &mut self,
        changes: &[Option<Vec<filter::ElementChange>>; 2],
    ) -> Result<usize, DataplaneError> {
        if self.nft_socket.is_none() {
            self.nft_socket = Some(filter::ElementSocket::open(self.netns.as_deref())?);
        }
        let Some(socket) = self.nft_socket.as_mut() else {
            return Err(DataplaneError::Other("no nf_tables socket".into()));
        };
        let none = Vec::new();
        let lists = [
            changes[0].as_ref().unwrap_or(&none),
            changes[1].as_ref().unwrap_or(&none),
        ];
        filter::send_changes(socket, lists).inspect_err(|_| self.nft_socket = None)
    }

    /// Apply `ops` in order; every op is tried, the first failure is returned (the next
    /// sync is then full).
    fn apply_ops(&mut self, ops: &[Op]) -> Result<usize, DataplaneError> {
        let mut first_error = None;
        let ipvs = self.ipvs()?;
        for op in ops {
            let (req, what) = match op {
                Op::AddService(vs) => (Request::new_service(vs), "adding virtual server"),
                Op::EditService(vs) => (Request::set_service(vs), "updating virtual server"),
                Op::DelService(k) => (Request::del_service(k), "deleting virtual server"),
                Op::AddDest(k, r) => (Request::new_dest(k, r), "adding real server"),
                Op::EditDest(k, r) => (Request::set_dest(k, r), "updating real server"),
                Op::DelDest(k, r) => (Request::del_dest(k, r), "deleting real server"),
            };
            // Already there (left by an earlier run on an address svcplane did not know
            // as its own): take it over.
            let result = match (ipvs.send(&req), op) {
                (Err(e), Op::AddService(vs)) if e.errno() == Some(libc::EEXIST) => {
                    ipvs.send(&Request::set_service(vs))
                }
                (Err(e), Op::AddDest(k, r)) if e.errno() == Some(libc::EEXIST) => {
                    ipvs.send(&Request::set_dest(k, r))
                }
                (other, _) => other,
            };
            if let Err(e) = result {
                tracing::warn!(op = ?op, error = %e, "IPVS {what} failed");
                first_error.get_or_insert_with(|| format!("{what} ({op:?}): {e}"));
            }
        }
        match first_error {
            None => Ok(ops.len()),
            Some(e) => Err(DataplaneError::Other(e)),
        }
    }

    /// Whether `addr` is on kube-proxy's dummy interface (`kube-ipvs0`).
    fn foreign_service_address(&mut self, addr: &IpAddr) -> bool {
        let Ok(links) = self.links() else {
            return false;
        };
        match links.index("kube-ipvs0") {
            Ok(Some(i)) => links.addresses(i).is_ok_and(|a| a.contains(addr)),
            _ => false,
        }
    }

    /// Whether IPVS mode ran here: its dummy interface exists. (Not `nft list tables`,
    /// which makes nft 1.0.6 load every table's rules: seconds at 10k services.)
    pub fn present(&mut self) -> bool {
        self.links()
            .ok()
            .and_then(|l| l.index(DUMMY).ok())
            .flatten()
            .is_some()
    }
}

/// kube-proxy's `CleanupLeftovers` for IPVS mode: a proxy starting in another mode
/// removes what IPVS mode left (virtual servers, dummy interface, filter tables), so
/// two sets of Service rules never fight. `None` when IPVS mode never ran here; else
/// a line for the log. `options`' excluded CIDRs are spared.
pub fn remove_leftovers(options: &IpvsOptions) -> Option<String> {
    let mut b = IpvsBackend::new(options.clone());
    if !b.present() {
        return None;
    }
    Some(match b.cleanup() {
        Ok(()) => format!(
            "removed IPVS mode's leftovers (virtual servers, {DUMMY}, tables ip/ip6 {})",
            filter::TABLE
        ),
        Err(e) => format!("cannot remove IPVS mode's leftovers: {e}"),
    })
}

impl Dataplane for IpvsBackend {
    fn mode(&self) -> &'static str {
        "ipvs"
    }

    fn sync(
        &mut self,
        desired: &Arc<DesiredState>,
        diff: &Diff,
    ) -> Result<SyncReport, DataplaneError> {
        self.check_sysctls();
        let was_full = self.needs_full;
        // Until this sync succeeds the kernel's state is unknown.
        self.needs_full = true;
        let partial =
            if !diff.full && !was_full && !diff.v4.globals_changed && !diff.v6.globals_changed {
                self.partial_sync(desired, diff)
            } else {
                Ok(None)
            };
        let (report, changed) = match partial {
            Ok(Some(r)) => (r, Some(diff)),
            Ok(None) => (self.full_sync(desired)?, None),
            Err(e) => {
                tracing::warn!(error = %e, "partial IPVS sync failed; retrying in full");
                // A socket may hold unread replies after an error.
                self.ipvs = None;
                self.links = None;
                (self.full_sync(desired)?, None)
            }
        };
        self.needs_full = false;
        Ok(self.conntrack.reconcile_into(desired, changed, report))
    }

    fn render(&self, desired: &DesiredState) -> Result<String, DataplaneError> {
        render(desired, &self.options)
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        let mut first_error: Option<DataplaneError> = None;
        // Virtual servers on the dummy's addresses, and NodePorts (below).
        let index = match self.links() {
            Ok(l) => l.index(DUMMY).unwrap_or(None),
            Err(_) => None,
        };
        let mut addrs: BTreeSet<IpAddr> = BTreeSet::new();
        if let Some(i) = index
            && let Ok(a) = self.links().and_then(|l| {
                l.addresses(i)
                    .map_err(|e| nl_error("listing the dummy's addresses", e))
            })
        {
            addrs.extend(a);
        }
        // NodePort virtual servers sit on the node's own addresses: those are taken as
        // svcplane's only when its dummy interface shows it ran here, so a cleanup never
        // touches another IPVS user's (kube-proxy's `kube-ipvs0` addresses are local too).
        if index.is_some()
            && let Ok(local) = local_addresses(self.netns.as_deref())
        {
            let dummy = addrs.clone();
            addrs.extend(
                local
                    .into_iter()
                    .filter(|a| !dummy.contains(a) && !self.foreign_service_address(a)),
            );
        }
        addrs.extend(self.applied.keys().map(|k| k.addr));
        // Without IPVS in this kernel there are no virtual servers to remove.
        if let Ok(mut ipvs) = Ipvs::open(self.netns.as_deref()) {
            match ipvs.services() {
                Ok(list) => {
                    // kube-proxy's cleanup flushes every virtual server, excluded or
                    // not; svcplane's spares what is not its own, so these too.
                    let exclude = &self.options.exclude_cidrs;
                    for vs in list.into_iter().filter(|v| {
                        addrs.contains(&v.key.addr) && !plan::excluded(exclude, &v.key.addr)
                    }) {
                        if let Err(e) = ipvs.send(&Request::del_service(&vs.key)) {
                            first_error.get_or_insert(nl_error("deleting a virtual server", e));
                        }
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(nl_error("listing IPVS services", e));
                }
            }
        }
        if let Err(e) = self.links().and_then(|l| {
            l.delete(DUMMY)
                .map_err(|e| nl_error(&format!("deleting {DUMMY}"), e))
        }) {
            first_error.get_or_insert(e);
        }
        for family in ["ip", "ip6"] {
            match run_nft(&self.nft, &["delete", "table", family, filter::TABLE], None) {
                Ok(_) => {}
                Err(DataplaneError::Tool { message, .. })
                    if message.contains("No such file or directory") => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.applied.clear();
        self.vip_claims.clear();
        self.contested.clear();
        self.applied_filter = [None, None];
        self.draining.clear();
        self.needs_full = true;
        first_error.map_or(Ok(()), Err)
    }
}

/// What a full sync programs, without a kernel: the virtual servers in `ipvsadm -L -n`'s
/// layout (NodePorts on the Node object's addresses: the proxy uses the kernel's), the
/// dummy interface's addresses, the sysctls and timeouts, then the filter tables' nft
/// script.
pub fn render(desired: &DesiredState, options: &IpvsOptions) -> Result<String, DataplaneError> {
    let vips = plan::service_addresses(desired);
    let node_addrs: Vec<IpAddr> = desired
        .families()
        .into_iter()
        .flat_map(|f| plan::nodeport_addresses(f, &f.node_ips, &vips))
        .collect();
    let wanted = plan::virtual_servers(desired, &options.scheduler, &node_addrs);
    let mut out = String::from("# IPVS virtual servers (ipvsadm -L -n)\n");
    out.push_str(&plan::ipvsadm_listing(&wanted));
    out.push_str(&format!("# addresses on {DUMMY} (down)\n"));
    for ip in &vips {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        out.push_str(&format!("# {ip}/{len}\n"));
    }
    out.push_str("# sysctls\n");
    for (k, v) in sysctls(options.strict_arp) {
        out.push_str(&format!("# {} = {v}\n", k.replace('/', ".")));
    }
    let t = options.timeouts;
    if !t.is_unset() {
        out.push_str(&format!(
            "# timeouts (ipvsadm --set; 0: the kernel's stays): tcp {} tcpfin {} udp {}\n",
            t.tcp, t.tcp_fin, t.udp
        ));
    }
    out.push_str(&format!(
        "# packet filter (nft -f): tables ip/ip6 {}\n",
        filter::TABLE
    ));
    for fam in desired.families() {
        let st = FilterState::build(fam, wanted.values(), &vips)?;
        out.push_str(&st.render(fam.family));
    }
    Ok(out)
}

/// Run nft (`cmd` is the program and leading arguments) with `args`, feeding `input`.
fn run_nft(cmd: &[String], args: &[&str], input: Option<&str>) -> Result<String, DataplaneError> {
    let (program, lead) = cmd.split_first().ok_or_else(|| DataplaneError::Tool {
        tool: "nft".to_owned(),
        message: "empty nft command".into(),
    })?;
    let mut command = Command::new(program);
    command.args(lead).args(args);
    crate::tool::run(command, "nft", input)
}

/// Whether this kernel has IPVS (the generic netlink family resolves, loading `ip_vs`
/// if needed): `Err` says why not.
pub fn kernel_has_ipvs(netns: Option<&str>) -> Result<(), String> {
    let mut b = IpvsBackend::new(IpvsOptions::default());
    b.netns = netns.map(str::to_owned);
    b.ipvs().map(drop).map_err(|e| e.to_string())
}

/// The family of a virtual server key (for logs and tests).
pub fn key_family(key: &VsKey) -> IpFamily {
    if key.addr.is_ipv4() {
        IpFamily::V4
    } else {
        IpFamily::V6
    }
}

#[cfg(test)]
mod tests;
