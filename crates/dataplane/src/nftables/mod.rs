//! The nftables backend: tables `ip svcplane` and `ip6 svcplane`, laid out as
//! kube-proxy's nftables mode lays out `kube-proxy`. See [`render`](render::render) for the
//! transaction's shape.

mod names;
mod render;

use std::collections::HashSet;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;

use svcplane_proxy::{Dataplane, DataplaneError, DesiredState, Diff, SyncReport};

use crate::conntrack::{ConntrackScope, Reconciler};

pub use names::nft_identifier_safe;
pub use render::{MASQUERADE_MARK, TABLE, render};

/// How many lines of nft's complaint an error carries.
const ERROR_LINES: usize = 6;

/// The nftables dataplane. The first sync, every `diff.full` one and every one after a
/// failure is a full, atomic `nft -f -` transaction (which replaces a table left by an
/// earlier process in place, without deleting it: flows and affinity survive a restart).
/// Others are partial: only what `diff` changed (see `render::render_partial`).
///
/// Tampering: before a partial sync one `nft list tables` checks that both tables
/// exist; if either is missing (`nft flush ruleset`, table deleted) the sync is full. A partial transaction that nft rejects (a chain or element it names was
/// deleted or altered) is retried as a full one. Rules rewritten in place by hand are
/// not detected; the sync loop's periodic full resync repairs them.
///
/// After every successful sync the conntrack [`Reconciler`] deletes UDP/SCTP entries
/// still pointing at endpoints that are gone; its failures are logged and counted in the
/// report, never failing the sync.
#[derive(Debug, Clone)]
pub struct NftablesBackend {
    /// The program and leading arguments that run `nft` (`["nft"]`, or e.g.
    /// `["ip", "netns", "exec", "NS", "nft"]` for a test namespace).
    nft: Vec<String>,
    /// The kernel may differ from the last applied state: the next sync must be full.
    needs_full: bool,
    conntrack: Reconciler,
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
        }
    }

    /// Run nft through another command line (its first element is the program).
    /// An empty command falls back to plain `nft`. The conntrack reconciler is then
    /// disabled (the command may program another namespace than this process's); enable
    /// it with [`NftablesBackend::with_conntrack`].
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

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.nft[0]);
        cmd.args(&self.nft[1..]).args(args);
        cmd
    }

    /// Run nft with `args`, feeding `input` on stdin; its stdout on success.
    fn run(&self, args: &[&str], input: Option<&str>) -> Result<String, DataplaneError> {
        let mut cmd = self.command(args);
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| tool_error(format!("cannot run {:?}: {e}", self.nft[0])))?;
        let output = std::thread::scope(|scope| {
            // Feed stdin from another thread so a large script cannot deadlock against
            // nft's output pipes.
            let writer = child
                .stdin
                .take()
                .zip(input)
                .map(|(mut stdin, text)| scope.spawn(move || stdin.write_all(text.as_bytes())));
            let output = child.wait_with_output();
            let written = writer.map(|w| w.join());
            (output, written)
        });
        let (output, written) = output;
        let output = output.map_err(|e| tool_error(format!("waiting for nft: {e}")))?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let mut message: String = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(ERROR_LINES)
            .collect::<Vec<_>>()
            .join("\n");
        if message.is_empty() {
            message = format!("exited with {}", output.status);
            if let Some(Ok(Err(e))) = written {
                message.push_str(&format!(" (writing its input failed: {e})"));
            }
        }
        Err(tool_error(message))
    }

    /// Names of the chains, sets and maps currently in `<family> svcplane`, or `None`
    /// when the table does not exist.
    fn existing_objects(&self, family: &str) -> Result<Vec<(ObjectKind, String)>, DataplaneError> {
        match self.run(&["-t", "list", "table", family, TABLE], None) {
            Ok(listing) => Ok(parse_listing(&listing)),
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Delete what the last transaction left empty and unreferenced (objects of an
    /// earlier state). Best effort: a failure only delays the cleanup to the next sync.
    fn delete_stale(&self, declared: &[HashSet<String>; 2]) {
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
                            script.push_str(&format!("flush chain {family} {TABLE} {name}\n"));
                        }
                        script.push_str(&format!("delete {word} {family} {TABLE} {name}\n"));
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
        let Some(partial) = render::render_partial(previous, desired, diff)? else {
            return Ok(None);
        };
        // `list tables` is small whatever the rule set's size. (One batch listing both
        // tables' chains would be more precise, but nft 1.0.6 builds its cache for only
        // one family in such a batch.)
        let present = match self.run(&["list", "tables"], None) {
            Ok(listing) => ["ip", "ip6"].iter().all(|f| {
                let want = format!("table {f} {TABLE}");
                listing.lines().any(|l| l.trim() == want)
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list nftables tables; syncing in full");
                false
            }
        };
        if !present {
            tracing::warn!("svcplane's nftables tables are missing; syncing in full");
            return Ok(None);
        }
        if !partial.script.is_empty()
            && let Err(e) = self.run(&["-f", "-"], Some(&partial.script))
        {
            tracing::warn!(error = %e, "partial nftables sync failed; retrying in full");
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

fn tool_error(message: String) -> DataplaneError {
    DataplaneError::Tool {
        tool: "nft".to_owned(),
        message,
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

/// The chains, sets and maps of an `nft -t list table` listing.
fn parse_listing(listing: &str) -> Vec<(ObjectKind, String)> {
    listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let kind = match words.next()? {
                "chain" => ObjectKind::Chain,
                "set" => ObjectKind::Set,
                "map" => ObjectKind::Map,
                _ => return None,
            };
            let name = words.next()?;
            (words.next() == Some("{")).then(|| (kind, name.to_owned()))
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
        let (script, declared) = render::render_declared(desired)?;
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
        render::render(desired)
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        let mut first_error = None;
        for family in ["ip", "ip6"] {
            match self.run(&["delete", "table", family, TABLE], None) {
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
