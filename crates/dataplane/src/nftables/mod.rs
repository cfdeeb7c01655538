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
use crate::refs::AddrRefs;

pub use names::nft_identifier_safe;
pub use render::{Layout, MASQUERADE_MARK, NORTH_SOUTH_TABLE, TABLE, render, render_layout};

/// The nftables dataplane. The first sync, every `diff.full` one and every one after a
/// failure is a full, atomic transaction (which replaces a table left by an earlier
/// process in place, without deleting it: flows and affinity survive a restart).
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
/// Transport: every transaction is one nf_tables netlink batch (see `netlink`), built
/// from the same values as its text form ([`render::family_ops`] for full syncs, the
/// partial writer for partial ones) with the same operations in the same order, so the
/// kernel ends up with what `nft -f` of the text would leave (`netlink_oracle` checks
/// it). That removes nft's process, parser and cache: a full sync at 10k services
/// spends its time in the kernel, a partial one costs no ~90 ms of nft reading the
/// table. The text goes through `nft -f -` instead when netlink is off
/// ([`NftablesBackend::with_nft_command`], `with_netlink(false)`), the socket cannot be
/// opened, or something has no netlink encoding (a /0 source range); a refused full
/// batch is retried as text (which then reports nft's error), a refused partial one as
/// a full sync. An endpoint swap of a ClusterIP is element operations only (see
/// `render::select`), which the kernel applies without re-validating the table.
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
    /// Full syncs sent over netlink so far.
    netlink_fulls: u64,
    /// Which table and hooks (nftables mode's, or ebpf mode's north-south table).
    layout: Layout,
    /// The hairpin set's users in the last state applied (`None` while the kernel's
    /// state is unknown): a partial sync then finds an address's last user leaving
    /// without walking every service.
    hairpin: Option<AddrRefs>,
}

/// Why a netlink batch was not applied.
#[derive(Debug)]
enum NetlinkFailure {
    /// No socket (netlink off, or it cannot be opened here).
    Unavailable,
    /// The kernel refused the batch (nothing of it was applied).
    Refused(String),
}

/// Where transactions may go over netlink.
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
            netlink_fulls: 0,
            layout: Layout::FULL,
            hairpin: None,
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
            netlink_fulls: 0,
            layout: Layout::FULL,
            hairpin: None,
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
                netlink_fulls: 0,
                layout: Layout::FULL,
                hairpin: None,
            }
        }
    }

    /// Where the conntrack reconciler works (default: this process's namespace for
    /// [`NftablesBackend::new`], disabled for [`NftablesBackend::with_nft_command`]).
    pub fn with_conntrack(mut self, scope: ConntrackScope) -> Self {
        self.conntrack = Reconciler::new(scope);
        self
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

    /// Send every transaction through nft (`false`), or over netlink where possible.
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

    /// How many full syncs went over netlink.
    pub fn netlink_fulls(&self) -> u64 {
        self.netlink_fulls
    }

    /// Commit `ops` as one batch, preceded by the tables-present probe.
    /// Commit `ops` as one batch (preceded by the tables-present probe with `probe`);
    /// the batch's size in bytes.
    fn commit_netlink(
        &mut self,
        ops: &[netlink::Op],
        probe: bool,
    ) -> Result<usize, NetlinkFailure> {
        self.commit_batch(|batch, table| {
            if probe {
                for op in &render::tables_present_probe_ops() {
                    batch.op(table, op);
                }
            }
            for op in ops {
                batch.op(table, op);
            }
            Some(())
        })
    }

    /// Commit the batch `build` writes (into the layout's table); its size in bytes.
    /// `build` returning `None` (something it cannot encode) sends nothing:
    /// `Unavailable`.
    fn commit_batch(
        &mut self,
        build: impl FnOnce(&mut netlink::Batch, &str) -> Option<()>,
    ) -> Result<usize, NetlinkFailure> {
        let NetlinkTransport::On { netns, socket } = &mut self.netlink else {
            return Err(NetlinkFailure::Unavailable);
        };
        if socket.is_none() {
            match netlink::Socket::open(netns.as_deref()) {
                Ok(s) => *socket = Some(s),
                Err(e) => {
                    // Not the kernel refusing rules: netlink is unusable here, so syncs
                    // go through nft from now on.
                    tracing::warn!(error = %e, "no nf_tables netlink socket; syncs use nft");
                    self.netlink = NetlinkTransport::Off;
                    return Err(NetlinkFailure::Unavailable);
                }
            }
        }
        let Some(sock) = socket.as_mut() else {
            return Err(NetlinkFailure::Unavailable);
        };
        let mut batch = sock.batch();
        if build(&mut batch, self.layout.table).is_none() {
            return Err(NetlinkFailure::Unavailable);
        }
        let size = batch.len();
        let result = sock
            .commit(batch)
            .map(|()| size)
            .map_err(|e| NetlinkFailure::Refused(e.to_string()));
        if result.is_err() {
            // A socket left with unread replies would confuse the next batch.
            *socket = None;
        }
        result
    }

    /// The full transaction of `tables` as one netlink batch; its size in bytes.
    /// `Unavailable` when netlink is off or something in the tables has no netlink
    /// encoding (the caller then sends the text form). The operations are encoded as
    /// they are made, never held as a list (a 10k-service table is 200k+ of them).
    fn full_over_netlink(
        &mut self,
        tables: &[render::FamilyTable],
    ) -> Result<usize, NetlinkFailure> {
        let size = self.commit_batch(|batch, table| {
            for ft in tables {
                let encoded = render::family_ops(ft, &mut |op| batch.op(table, &op));
                if encoded.is_none() {
                    tracing::debug!(
                        "the full transaction has a construct netlink does not encode; using nft"
                    );
                    return None;
                }
            }
            Some(())
        })?;
        self.netlink_fulls += 1;
        Ok(size)
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

    /// Names of the chains, sets and maps currently in `<family> <table>` (none when the
    /// table does not exist): over netlink when it is on, else through nft.
    ///
    /// Not `nft list table`: nft 1.0.6 fetches every rule for it (9 s and 450 MB at 10k
    /// services); listing chains, sets and maps fetches only those (40 ms through nft,
    /// a few over netlink).
    fn existing_objects(&self, family: &str) -> Result<Vec<(ObjectKind, String)>, DataplaneError> {
        if let NetlinkTransport::On { netns, .. } = &self.netlink {
            let code = netlink::family_code(family == "ip6");
            match netlink::list_objects(netns.as_deref(), code, self.layout.table) {
                Ok(objects) => {
                    return Ok(objects
                        .into_iter()
                        .map(|o| match o {
                            netlink::Object::Chain(n) => (ObjectKind::Chain, n),
                            netlink::Object::Set(n) => (ObjectKind::Set, n),
                            netlink::Object::Map(n) => (ObjectKind::Map, n),
                        })
                        .collect());
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list nftables objects over netlink; asking nft")
                }
            }
        }
        let script = format!("list chains {family}\nlist sets {family}\nlist maps {family}\n");
        let listing = self.run(&["-t", "-f", "-"], Some(&script))?;
        Ok(parse_listing(&listing, self.layout.table))
    }

    /// Delete what the last transaction left empty and unreferenced (objects of an
    /// earlier state): one netlink batch, or an nft script when netlink is off or
    /// refuses. Best effort: a failure only delays the cleanup to the next sync.
    fn delete_stale(&mut self, declared: &[HashSet<String>; 2]) {
        let table = self.layout.table;
        let mut script = String::new();
        let mut ops = Vec::new();
        for (family, names) in ["ip", "ip6"].into_iter().zip(declared) {
            let objects = match self.existing_objects(family) {
                Ok(objects) => objects,
                Err(e) => {
                    tracing::warn!(error = %e, family, "cannot list nftables objects; stale ones stay until the next sync");
                    continue;
                }
            };
            let code = netlink::family_code(family == "ip6");
            // Chains first: a stale chain may still hold rules naming a stale set.
            for kind in [ObjectKind::Chain, ObjectKind::Set, ObjectKind::Map] {
                for (k, name) in &objects {
                    if *k == kind && !names.contains(name) && nft_identifier_safe(name) {
                        let word = kind.word();
                        if kind == ObjectKind::Chain {
                            script.push_str(&format!("flush chain {family} {table} {name}\n"));
                            ops.push(netlink::Op::FlushChain {
                                family: code,
                                chain: name.clone(),
                            });
                            ops.push(netlink::Op::DeleteChain {
                                family: code,
                                chain: name.clone(),
                            });
                        } else {
                            ops.push(netlink::Op::DeleteSet {
                                family: code,
                                set: name.clone(),
                            });
                        }
                        script.push_str(&format!("delete {word} {family} {table} {name}\n"));
                    }
                }
            }
        }
        if script.is_empty() {
            return;
        }
        match self.commit_netlink(&ops, false) {
            Ok(_) => return,
            Err(NetlinkFailure::Unavailable) => {}
            Err(NetlinkFailure::Refused(e)) => {
                tracing::debug!(error = %e, "stale nftables objects not deleted over netlink; asking nft")
            }
        }
        if let Err(e) = self.run(&["-f", "-"], Some(&script)) {
            tracing::warn!(error = %e, "cannot delete stale nftables objects yet; retrying at the next sync");
        }
    }
}

impl NftablesBackend {
    /// The full transaction of `tables` (made from `desired`): over netlink, else (or
    /// when the kernel refuses it there) through nft; its size in bytes.
    fn send_full(
        &mut self,
        desired: &DesiredState,
        tables: &[render::FamilyTable],
    ) -> Result<usize, DataplaneError> {
        match self.full_over_netlink(tables) {
            Ok(size) => Ok(size),
            Err(failure) => {
                if let NetlinkFailure::Refused(e) = failure {
                    tracing::warn!(error = %e, "full nftables sync over netlink refused; sending it through nft");
                }
                let script = render::spell_tables(desired, tables, self.layout.table);
                self.run(&["-f", "-"], Some(&script))?;
                Ok(script.len())
            }
        }
    }

    /// One partial sync; `None` when it has to be full instead (globals changed, the
    /// tables were tampered with, or nft rejected the partial transaction).
    fn try_partial(
        &mut self,
        previous: &DesiredState,
        desired: &DesiredState,
        diff: &Diff,
    ) -> Result<Option<(SyncReport, bool)>, DataplaneError> {
        let hairpin = self.hairpin.take();
        let Some(partial) =
            render::render_partial(previous, desired, diff, self.layout.table, hairpin.as_ref())?
        else {
            return Ok(None);
        };
        let result = self.apply_partial(&partial);
        // Counted on only once the kernel has the partial.
        if let (Ok(Some(_)), Some(mut refs)) = (&result, hairpin) {
            partial.hairpin_users.apply_to(&mut refs);
            self.hairpin = Some(refs);
        }
        result
    }

    /// Send `partial` (see [`NftablesBackend::try_partial`]).
    fn apply_partial(
        &mut self,
        partial: &render::Partial,
    ) -> Result<Option<(SyncReport, bool)>, DataplaneError> {
        let netlink_plan = partial
            .netlink
            .as_ref()
            .filter(|_| !matches!(self.netlink, NetlinkTransport::Off));
        // Even an empty partial sends the probe: that is the periodic check.
        if let Some(plan) = netlink_plan {
            match self.commit_netlink(&plan.ops, true) {
                Ok(_) => {}
                // Said when it was found; the text form below does the same sync.
                Err(NetlinkFailure::Unavailable) => return self.partial_as_text(partial),
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
        self.partial_as_text(partial)
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
                return Ok(self.conntrack.reconcile_into(desired, Some(diff), report));
            }
        }
        self.needs_full = true;
        self.hairpin = None;
        let tables = render::family_tables(desired, self.layout)?;
        let declared = [0, 1].map(|i| tables.get(i).map(|t| t.declared()).unwrap_or_default());
        // The hairpin users are counted on the other core while the kernel takes the
        // batch (a pass over every endpoint: 500k at 50k services).
        let (sent, counted) = std::thread::scope(|s| {
            let counting = s.spawn(|| render::hairpin_refs(desired));
            (self.send_full(desired, &tables), counting.join())
        });
        let size = sent?;
        drop(tables);
        self.delete_stale(&declared);
        self.needs_full = false;
        // Without counts (the count panicked) partial syncs walk every endpoint instead.
        self.hairpin = counted.ok();
        let report = SyncReport {
            full: true,
            size,
            ..SyncReport::default()
        };
        Ok(self.conntrack.reconcile_into(desired, None, report))
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
mod golden;
#[cfg(test)]
mod netlink_oracle;
#[cfg(test)]
mod tests;
