//! The nftables backend: tables `ip svcplane` and `ip6 svcplane`, laid out as
//! kube-proxy's nftables mode lays out `kube-proxy`. See [`render`](render::render) for the
//! transaction's shape.

pub(crate) mod names;
pub(crate) mod netlink;
pub(crate) mod render;
mod rule;

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;

use svcplane_proxy::{Dataplane, DataplaneError, DesiredState, Diff, SyncReport};

use crate::conntrack::{ConntrackScope, Reconciler};

pub use names::nft_identifier_safe;
pub use render::{Layout, MASQUERADE_MARK, NORTH_SOUTH_TABLE, TABLE, render, render_layout};

/// The nftables dataplane. The first sync, every `diff.full` one and every one after a
/// failure is a full, atomic `nft -f -` transaction (which replaces a table left by an
/// earlier process in place, without deleting it: flows and affinity survive a restart).
/// Others are partial: only what `diff` changed (see `render::render_partial`).
///
/// Tampering: every partial transaction starts with `add chain <family> svcplane
/// services` for both families, a no-op while the tables exist and an error when either
/// is missing (`nft flush ruleset`, table deleted), which fails the whole transaction.
/// A partial transaction that nft rejects, for that or any reason (a chain or element it
/// names was deleted or altered), is retried as a full one. Rules rewritten in place by
/// hand are not detected; the sync loop's hourly full resync repairs them. (Not `nft
/// list tables`: nft 1.0.6 loads the whole rule set for it, 8 s and 450 MB at 10k
/// services.)
///
/// Transport: full syncs go through `nft -f -`. A partial sync whose changed services
/// are all plain ClusterIP services (no affinity, no external addresses, no source
/// ranges) is sent as one nf_tables netlink batch instead (see `netlink`), with the
/// same operations in the same order; it falls back to a full sync on any error, as
/// the text form does. That removes nft's process, parser and cache from the common
/// endpoint-change path (~90 ms per run at 10k services).
///
/// After every successful sync the conntrack [`Reconciler`] deletes UDP/SCTP entries
/// still pointing at endpoints that are gone; its failures are logged and counted in the
/// report, never failing the sync.
pub struct NftablesBackend {
    /// The program and leading arguments that run `nft` (`["nft"]`, or e.g.
    /// `["ip", "netns", "exec", "NS", "nft"]` for a test namespace).
    nft: Vec<String>,
    /// The kernel may differ from the last applied state: the next sync must be full.
    needs_full: bool,
    conntrack: Reconciler,
    netlink: NetlinkTransport,
    /// Partial syncs sent over netlink so far (for tests and logs).
    netlink_partials: u64,
    /// Which table and hooks (nftables mode's, or ebpf mode's north-south table).
    layout: Layout,
}

/// Why a netlink batch was not applied.
#[derive(Debug)]
enum NetlinkFailure {
    /// No socket (netlink off, or it cannot be opened here).
    Unavailable,
    /// The kernel refused the batch (nothing of it was applied).
    Refused(String),
}

/// Where partial syncs may go over netlink.
enum NetlinkTransport {
    /// Not used (nft runs through a command whose namespace is unknown).
    Off,
    /// In this network namespace (`None`) or a named one; the socket opened on first use.
    On {
        netns: Option<String>,
        socket: Option<netlink::Socket>,
    },
}

impl std::fmt::Debug for NftablesBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NftablesBackend")
            .field("nft", &self.nft)
            .field("needs_full", &self.needs_full)
            .field("netlink", &!matches!(self.netlink, NetlinkTransport::Off))
            .finish()
    }
}

impl Default for NftablesBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl NftablesBackend {
    pub fn new() -> Self {
        NftablesBackend {
            nft: vec!["nft".to_owned()],
            needs_full: true,
            conntrack: Reconciler::new(ConntrackScope::CurrentNetns),
            netlink: NetlinkTransport::On {
                netns: None,
                socket: None,
            },
            netlink_partials: 0,
            layout: Layout::FULL,
        }
    }

    /// Program the named network namespace (`ip netns` name): nft runs through `ip
    /// netns exec`, the netlink socket is opened inside it.
    pub fn in_netns(name: &str) -> Self {
        NftablesBackend {
            nft: ["ip", "netns", "exec", name, "nft"]
                .map(str::to_owned)
                .to_vec(),
            needs_full: true,
            conntrack: Reconciler::new(ConntrackScope::Netns(name.to_owned())),
            netlink: NetlinkTransport::On {
                netns: Some(name.to_owned()),
                socket: None,
            },
            netlink_partials: 0,
            layout: Layout::FULL,
        }
    }

    /// Run nft through another command line (its first element is the program).
    /// An empty command falls back to plain `nft`. Every sync then goes through nft
    /// (the command's network namespace is unknown to netlink), and the conntrack
    /// reconciler is disabled (enable it with [`NftablesBackend::with_conntrack`]).
    pub fn with_nft_command<I, S>(command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let nft: Vec<String> = command.into_iter().map(Into::into).collect();
        if nft.is_empty() {
            Self::new()
        } else {
            NftablesBackend {
                nft,
                needs_full: true,
                conntrack: Reconciler::new(ConntrackScope::Disabled),
                netlink: NetlinkTransport::Off,
                netlink_partials: 0,
                layout: Layout::FULL,
            }
        }
    }

    /// Where the conntrack reconciler works (default: this process's namespace for
    /// [`NftablesBackend::new`], disabled for [`NftablesBackend::with_nft_command`]).
    pub fn with_conntrack(mut self, scope: ConntrackScope) -> Self {
        self.conntrack = Reconciler::new(scope);
        self
    }

    /// `report` with the conntrack reconciler's counts, run now that `desired` is
    /// programmed. Its failures are only logged: the rules are in place.
    fn reconcile_conntrack(&self, desired: &DesiredState, mut report: SyncReport) -> SyncReport {
        let ct = self.conntrack.reconcile(desired);
        for e in &ct.errors {
            tracing::warn!(error = %e, "conntrack cleanup failed; stale UDP flows stay until the next sync");
        }
        report.conntrack_deleted_v4 = ct.v4.deleted;
        report.conntrack_deleted_v6 = ct.v6.deleted;
        report.conntrack_failures = ct.failures();
        report
    }

    /// Program `layout`'s table and hooks instead of nftables mode's.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The table this backend programs (in both families).
    pub fn table(&self) -> &'static str {
        self.layout.table
    }

    /// Whether `ip <table>` or `ip6 <table>` exists (`nft list tables` lists names only).
    pub fn is_present(&self) -> bool {
        self.run(&["list", "tables"], None).is_ok_and(|out| {
            out.lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some("table")
                    && matches!(w.next(), Some("ip" | "ip6"))
                    && w.next() == Some(self.layout.table)
            })
        })
    }

    /// Send partial syncs through nft only (`false`), or over netlink where possible.
    pub fn with_netlink(mut self, on: bool) -> Self {
        if !on {
            self.netlink = NetlinkTransport::Off;
        }
        self
    }

    /// How many partial syncs went over netlink.
    pub fn netlink_partials(&self) -> u64 {
        self.netlink_partials
    }

    /// Commit `ops` as one batch, preceded by the tables-present probe.
    fn commit_netlink(&mut self, ops: &[netlink::Op], probe: bool) -> Result<(), NetlinkFailure> {
        let NetlinkTransport::On { netns, socket } = &mut self.netlink else {
            return Err(NetlinkFailure::Unavailable);
        };
        if socket.is_none() {
            match netlink::Socket::open(netns.as_deref()) {
                Ok(s) => *socket = Some(s),
                Err(e) => {
                    // Not the kernel refusing rules: netlink is unusable here, so partial
                    // syncs go through nft from now on.
                    tracing::warn!(error = %e, "no nf_tables netlink socket; partial syncs use nft");
                    self.netlink = NetlinkTransport::Off;
                    return Err(NetlinkFailure::Unavailable);
                }
            }
        }
        let Some(sock) = socket.as_mut() else {
            return Err(NetlinkFailure::Unavailable);
        };
        let table = self.layout.table;
        let mut batch = sock.batch();
        if probe {
            for op in &render::tables_present_probe_ops() {
                batch.op(table, op);
            }
        }
        for op in ops {
            batch.op(table, op);
        }
        let result = sock
            .commit(batch)
            .map_err(|e| NetlinkFailure::Refused(e.to_string()));
        if result.is_err() {
            // A socket left with unread replies would confuse the next batch.
            *socket = None;
        }
        result
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.nft[0]);
        cmd.args(&self.nft[1..]).args(args);
        cmd
    }

    /// Run nft with `args`, feeding `input` on stdin; its stdout on success.
    fn run(&self, args: &[&str], input: Option<&str>) -> Result<String, DataplaneError> {
        crate::tool::run(self.command(args), "nft", input)
    }

    /// Names of the chains, sets and maps currently in `<family> svcplane`, or `None`
    /// when the table does not exist.
    ///
    /// Not `list table`: nft 1.0.6 fetches every rule for it (9 s and 450 MB at 10k
    /// services); listing chains, sets and maps fetches only those (40 ms).
    fn existing_objects(&self, family: &str) -> Result<Vec<(ObjectKind, String)>, DataplaneError> {
        let script = format!("list chains {family}\nlist sets {family}\nlist maps {family}\n");
        let listing = self.run(&["-t", "-f", "-"], Some(&script))?;
        Ok(parse_listing(&listing, self.layout.table))
    }

    /// Delete what the last transaction left empty and unreferenced (objects of an
    /// earlier state). Best effort: a failure only delays the cleanup to the next sync.
    fn delete_stale(&self, declared: &[HashSet<String>; 2]) {
        let table = self.layout.table;
        let mut script = String::new();
        for (family, names) in ["ip", "ip6"].into_iter().zip(declared) {
            let objects = match self.existing_objects(family) {
                Ok(objects) => objects,
                Err(e) => {
                    tracing::warn!(error = %e, family, "cannot list nftables objects; stale ones stay until the next sync");
                    continue;
                }
            };
            // Chains first: a stale chain may still hold rules naming a stale set.
            for kind in [ObjectKind::Chain, ObjectKind::Set, ObjectKind::Map] {
                for (k, name) in &objects {
                    if *k == kind && !names.contains(name) && nft_identifier_safe(name) {
                        let word = kind.word();
                        if kind == ObjectKind::Chain {
                            script.push_str(&format!("flush chain {family} {table} {name}\n"));
                        }
                        script.push_str(&format!("delete {word} {family} {table} {name}\n"));
                    }
                }
            }
        }
        if script.is_empty() {
            return;
        }
        if let Err(e) = self.run(&["-f", "-"], Some(&script)) {
            tracing::warn!(error = %e, "cannot delete stale nftables objects yet; retrying at the next sync");
        }
    }
}

impl NftablesBackend {
    /// One partial sync; `None` when it has to be full instead (globals changed, the
    /// tables were tampered with, or nft rejected the partial transaction).
    fn try_partial(
        &mut self,
        previous: &DesiredState,
        desired: &DesiredState,
        diff: &Diff,
    ) -> Result<Option<(SyncReport, bool)>, DataplaneError> {
        let Some(partial) = render::render_partial(previous, desired, diff, self.layout.table)?
        else {
            return Ok(None);
        };
        let netlink_plan = partial
            .netlink
            .as_ref()
            .filter(|_| !matches!(self.netlink, NetlinkTransport::Off));
        // Even an empty partial sends the probe: that is the periodic check.
        if let Some(plan) = netlink_plan {
            match self.commit_netlink(&plan.ops, true) {
                Ok(()) => {}
                // Said when it was found; the text form below does the same sync.
                Err(NetlinkFailure::Unavailable) => return self.partial_as_text(&partial),
                Err(NetlinkFailure::Refused(e)) => {
                    tracing::warn!(error = %e, "partial nftables sync over netlink failed (tables missing or altered?); retrying in full");
                    return Ok(None);
                }
            }
            self.netlink_partials += 1;
            let mut full_next = false;
            if !plan.stale.is_empty()
                && let Err(e) = self.commit_netlink(&plan.stale, false)
            {
                tracing::warn!(error = ?e, "cannot delete stale nftables objects yet");
                full_next = true;
            }
            return Ok(Some((
                SyncReport {
                    full: false,
                    size: partial.script.len() + partial.stale.len(),
                    ..SyncReport::default()
                },
                full_next,
            )));
        }
        self.partial_as_text(&partial)
    }

    /// A partial sync through `nft -f` (see [`NftablesBackend::try_partial`]).
    fn partial_as_text(
        &self,
        partial: &render::Partial,
    ) -> Result<Option<(SyncReport, bool)>, DataplaneError> {
        let script = render::tables_present_probe(self.layout.table) + &partial.script;
        if let Err(e) = self.run(&["-f", "-"], Some(&script)) {
            tracing::warn!(error = %e, "partial nftables sync failed (tables missing or altered?); retrying in full");
            return Ok(None);
        }
        let mut full_next = false;
        if !partial.stale.is_empty()
            && let Err(e) = self.run(&["-f", "-"], Some(&partial.stale))
        {
            // Harmless leftovers, but a later partial sync could re-declare one of them:
            // the next sync is full, and lists and deletes them.
            tracing::warn!(error = %e, "cannot delete stale nftables objects yet");
            full_next = true;
        }
        Ok(Some((
            SyncReport {
                full: false,
                size: partial.script.len() + partial.stale.len(),
                ..SyncReport::default()
            },
            full_next,
        )))
    }
}

fn is_not_found(e: &DataplaneError) -> bool {
    matches!(e, DataplaneError::Tool { message, .. } if message.contains("No such file or directory"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjectKind {
    Chain,
    Set,
    Map,
}

impl ObjectKind {
    fn word(self) -> &'static str {
        match self {
            ObjectKind::Chain => "chain",
            ObjectKind::Set => "set",
            ObjectKind::Map => "map",
        }
    }
}

/// The chains, sets and maps of svcplane's table in an `nft -t list chains|sets|maps`
/// listing (which groups them under `table <family> <name> {` headers, per table).
fn parse_listing(listing: &str, table: &str) -> Vec<(ObjectKind, String)> {
    let mut ours = false;
    listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let kind = match words.next()? {
                "table" => {
                    ours = words.nth(1) == Some(table);
                    return None;
                }
                "chain" => ObjectKind::Chain,
                "set" => ObjectKind::Set,
                "map" => ObjectKind::Map,
                _ => return None,
            };
            let name = words.next()?;
            (ours && words.next() == Some("{")).then(|| (kind, name.to_owned()))
        })
        .collect()
}

impl Dataplane for NftablesBackend {
    fn mode(&self) -> &'static str {
        "nftables"
    }

    fn sync(
        &mut self,
        desired: &Arc<DesiredState>,
        diff: &Diff,
    ) -> Result<SyncReport, DataplaneError> {
        if !diff.full
            && !self.needs_full
            && let Some(previous) = &diff.previous
        {
            // Until this sync succeeds the kernel's state is unknown.
            self.needs_full = true;
            if let Some((report, full_next)) = self.try_partial(previous, desired, diff)? {
                self.needs_full = full_next;
                return Ok(self.reconcile_conntrack(desired, report));
            }
        }
        self.needs_full = true;
        let (script, declared) = render::render_declared(desired, self.layout)?;
        self.run(&["-f", "-"], Some(&script))?;
        self.delete_stale(&declared);
        self.needs_full = false;
        let report = SyncReport {
            full: true,
            size: script.len(),
            ..SyncReport::default()
        };
        Ok(self.reconcile_conntrack(desired, report))
    }

    fn render(&self, desired: &DesiredState) -> Result<String, DataplaneError> {
        render::render_layout(desired, self.layout)
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        let mut first_error = None;
        for family in ["ip", "ip6"] {
            match self.run(&["delete", "table", family, self.layout.table], None) {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests;
