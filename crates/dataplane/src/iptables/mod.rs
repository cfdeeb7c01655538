//! The iptables backend: kube-proxy's iptables-mode rules under svcplane's `SVCP-`
//! prefix, in the nat and filter tables, IPv4 (`iptables`) and IPv6 (`ip6tables`).
//! See [`render`](render::render) for the layout and [`dispatch`] for the dispatch tree.
//!
//! Each sync sends one `iptables-restore --noflush -w` per table and family that has
//! something to change (so at most four). The first sync, every `diff.full` one (the
//! sync loop's hourly resync) and every one after a failure is full: every chain is
//! declared and rewritten, chains of an earlier state are deleted, and missing jumps
//! from the built-in chains are inserted. Others are partial: only the chains of the
//! changed services and the fixed and dispatch chains whose rules changed are
//! rewritten; chains that went away are deleted. Every partial transaction also
//! deletes and re-adds the one rule of `SVCP-CANARY`, so it fails as a whole when
//! someone flushed the table; a failed partial is counted and retried in full. The
//! periodic check (an empty diff) reads `SVCP-CANARY` in every table (`iptables -S`)
//! and syncs in full when its rule is gone.
//!
//! The iptables binaries are those of the backend the host uses (nft or legacy), found
//! as kube-proxy's image finds them (see [`detect`]).

pub mod dispatch;
pub mod names;
pub mod render;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::process::{Command, Stdio};
use std::sync::Arc;

use svcplane_model::{IpFamily, ServicePortName};
use svcplane_proxy::{Dataplane, DataplaneError, DesiredState, Diff, SyncReport};

use crate::conntrack::{ConntrackScope, Reconciler};
pub use dispatch::Dispatch;
use render::{Chain, FamilyRules, JUMPS, Jump, Options, Select, TABLES};

/// The iptables binaries of one backend, per family (`[v4, v6]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// `nft` or `legacy` (or `unknown`: only plain `iptables-restore` exists).
    pub backend: &'static str,
    pub restore: [&'static str; 2],
    pub save: [&'static str; 2],
    pub iptables: [&'static str; 2],
    /// `MASQUERADE --random-fully` is supported (iptables ≥ 1.6.2).
    pub random_fully: bool,
}

impl Tools {
    fn nft() -> Tools {
        Tools {
            backend: "nft",
            restore: ["iptables-nft-restore", "ip6tables-nft-restore"],
            save: ["iptables-nft-save", "ip6tables-nft-save"],
            iptables: ["iptables-nft", "ip6tables-nft"],
            random_fully: true,
        }
    }
    fn legacy() -> Tools {
        Tools {
            backend: "legacy",
            restore: ["iptables-legacy-restore", "ip6tables-legacy-restore"],
            save: ["iptables-legacy-save", "ip6tables-legacy-save"],
            iptables: ["iptables-legacy", "ip6tables-legacy"],
            random_fully: true,
        }
    }
    fn plain() -> Tools {
        Tools {
            backend: "unknown",
            restore: ["iptables-restore", "ip6tables-restore"],
            save: ["iptables-save", "ip6tables-save"],
            iptables: ["iptables", "ip6tables"],
            random_fully: true,
        }
    }
}

/// Runs programs, here or in a named network namespace.
#[derive(Debug, Clone, Default)]
struct Runner {
    /// `["ip", "netns", "exec", NS]`, or empty.
    prefix: Vec<String>,
}

impl Runner {
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args);
        cmd
    }

    /// Run `program`, feeding `input`; its stdout on success, else a tool error.
    fn run(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, DataplaneError> {
        crate::tool::run(self.command(program, args), program, input)
    }

    fn exists(&self, program: &str) -> bool {
        self.command(program, &["--version"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// The iptables backend the host uses, as kube-proxy's image decides (its
/// iptables-wrapper): kubelet's chains (`KUBE-IPTABLES-HINT`, `KUBE-KUBELET-CANARY` in
/// mangle) name the backend kubelet uses; without them, the backend with more rules
/// wins, nft on a tie. Only one backend installed: that one.
fn detect(runner: &Runner) -> Tools {
    let has_nft = runner.exists("iptables-nft-restore");
    let has_legacy = runner.exists("iptables-legacy-restore");
    let mut tools = match (has_nft, has_legacy) {
        (true, false) => Tools::nft(),
        (false, true) => Tools::legacy(),
        (false, false) => Tools::plain(),
        (true, true) => {
            let (nft, legacy) = (Tools::nft(), Tools::legacy());
            let hint = |t: &Tools| {
                t.save.iter().any(|save| {
                    runner.run(save, &["-t", "mangle"], None).is_ok_and(|out| {
                        out.contains(":KUBE-IPTABLES-HINT") || out.contains(":KUBE-KUBELET-CANARY")
                    })
                })
            };
            let rules = |t: &Tools| -> usize {
                t.save
                    .iter()
                    .filter_map(|save| runner.run(save, &[], None).ok())
                    .map(|out| out.lines().filter(|l| l.starts_with("-A ")).count())
                    .sum()
            };
            if hint(&nft) {
                nft
            } else if legacy_in_use(runner) && (hint(&legacy) || rules(&legacy) > rules(&nft)) {
                legacy
            } else {
                nft
            }
        }
    };
    tools.random_fully = runner
        .run(tools.iptables[0], &["--version"], None)
        .map(|v| supports_random_fully(&v))
        .unwrap_or(true);
    tools
}

/// Whether any legacy table was ever loaded (reading them otherwise loads the modules).
fn legacy_in_use(runner: &Runner) -> bool {
    runner
        .run(
            "cat",
            &["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"],
            None,
        )
        .is_ok_and(|s| !s.trim().is_empty())
}

/// `iptables v1.8.9 (nf_tables)` → true: `--random-fully` came with 1.6.2.
fn supports_random_fully(version: &str) -> bool {
    let Some(v) = version.split_whitespace().find_map(|w| w.strip_prefix('v')) else {
        return true;
    };
    let parts: Vec<u32> = v.split('.').map_while(|p| p.parse().ok()).collect();
    parts.as_slice() >= [1, 6, 2].as_slice()
}

fn text_hash(s: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// What one family's tables hold of svcplane's, as last applied.
#[derive(Debug, Default, Clone)]
struct Applied {
    /// Chain → (hash of its rules, rule count), per table.
    nat: HashMap<String, (u64, usize)>,
    filter: HashMap<String, (u64, usize)>,
    /// The nat chains that are not a service's own.
    nat_shared: HashSet<String>,
    svc_chains: HashMap<ServicePortName, Vec<String>>,
}

impl Applied {
    fn of(rules: &FamilyRules) -> Applied {
        let entry = |c: &Chain| (c.name.clone(), (text_hash(&c.rules), c.count));
        Applied {
            nat: rules.nat().map(entry).collect(),
            filter: rules.filter.iter().map(entry).collect(),
            nat_shared: rules.nat_shared.iter().map(|c| c.name.clone()).collect(),
            svc_chains: rules
                .services
                .iter()
                .map(|(n, cs)| (n.clone(), cs.iter().map(|c| c.name.clone()).collect()))
                .collect(),
        }
    }

    fn table(&self, table: &str) -> &HashMap<String, (u64, usize)> {
        if table == "nat" {
            &self.nat
        } else {
            &self.filter
        }
    }

    fn table_mut(&mut self, table: &str) -> &mut HashMap<String, (u64, usize)> {
        if table == "nat" {
            &mut self.nat
        } else {
            &mut self.filter
        }
    }
}

/// One table's partial change.
struct TableChange<'a> {
    family: usize,
    table: &'static str,
    writes: Vec<&'a Chain>,
    stale: Vec<String>,
}

/// The iptables dataplane (see the module documentation).
#[derive(Debug)]
pub struct IptablesBackend {
    runner: Runner,
    tools: Option<Tools>,
    dispatch: Dispatch,
    needs_full: bool,
    /// `None`: the kernel's state is unknown (startup, after a failure), and the next
    /// full sync lists the tables to find chains of an earlier state.
    applied: Option<[Applied; 2]>,
    conntrack: Reconciler,
}

impl Default for IptablesBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl IptablesBackend {
    pub fn new() -> Self {
        IptablesBackend {
            runner: Runner::default(),
            tools: None,
            dispatch: Dispatch::Tree,
            needs_full: true,
            applied: None,
            conntrack: Reconciler::new(ConntrackScope::CurrentNetns),
        }
    }

    /// Program the named network namespace (`ip netns` name).
    pub fn in_netns(name: &str) -> Self {
        IptablesBackend {
            runner: Runner {
                prefix: ["ip", "netns", "exec", name].map(str::to_owned).to_vec(),
            },
            conntrack: Reconciler::new(ConntrackScope::Netns(name.to_owned())),
            ..Self::new()
        }
    }

    pub fn with_dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = dispatch;
        self
    }

    /// Use these binaries instead of detecting them.
    pub fn with_tools(mut self, tools: Tools) -> Self {
        self.tools = Some(tools);
        self
    }

    /// The binaries in use (detected on first use).
    pub fn tools(&mut self) -> &Tools {
        if self.tools.is_none() {
            let tools = detect(&self.runner);
            tracing::info!(
                backend = tools.backend,
                restore = tools.restore[0],
                "iptables backend detected"
            );
            self.tools = Some(tools);
        }
        self.tools.get_or_insert_with(Tools::plain)
    }

    fn options(&mut self) -> Options {
        let random_fully = self.tools().random_fully;
        Options {
            dispatch: self.dispatch,
            random_fully,
        }
    }

    fn restore(&mut self, family: usize, script: &str) -> Result<(), DataplaneError> {
        let restore = self.tools().restore[family];
        self.runner
            .run(restore, &["--noflush", "-w", "5"], Some(script))
            .map(|_| ())
    }

    /// svcplane's chains in one table, from `iptables-save`.
    fn list_chains(&mut self, family: usize, table: &str) -> Result<Vec<String>, DataplaneError> {
        let save = self.tools().save[family];
        let saved = self.runner.run(save, &["-t", table], None)?;
        Ok(saved
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(names::PREFIX))
            .map(str::to_owned)
            .collect())
    }

    /// The jumps of `table` missing from its built-in chains, in insertion order.
    fn missing_jumps(
        &mut self,
        family: usize,
        table: &str,
    ) -> Result<Vec<&'static Jump>, DataplaneError> {
        let iptables = self.tools().iptables[family];
        let mut listed: HashMap<&str, String> = HashMap::new();
        let mut missing = Vec::new();
        for j in JUMPS.iter().rev().filter(|j| j.table == table) {
            if !listed.contains_key(j.builtin) {
                let out =
                    self.runner
                        .run(iptables, &["-w", "5", "-t", table, "-S", j.builtin], None)?;
                listed.insert(j.builtin, out);
            }
            let present = listed[j.builtin].lines().any(|l| {
                l.split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[0] == "-j" && w[1] == j.target)
            });
            if !present {
                missing.push(j);
            }
        }
        Ok(missing)
    }

    fn full_sync(&mut self, desired: &DesiredState) -> Result<SyncReport, DataplaneError> {
        let opts = self.options();
        let known = self.applied.take();
        let mut applied: [Applied; 2] = Default::default();
        let mut size = 0;
        for (fi, fam) in desired.families().into_iter().enumerate() {
            let rules = render::render_family(fam, opts, Select::All);
            for table in TABLES {
                let chains: Vec<&Chain> = if table == "nat" {
                    rules.nat().collect()
                } else {
                    rules.filter.iter().collect()
                };
                let wanted: HashSet<&str> = chains.iter().map(|c| c.name.as_str()).collect();
                let existing: Vec<String> = match &known {
                    Some(k) => k[fi].table(table).keys().cloned().collect(),
                    None => self.list_chains(fi, table)?,
                };
                let mut stale: Vec<String> = existing
                    .into_iter()
                    .filter(|n| !wanted.contains(n.as_str()))
                    .collect();
                stale.sort();
                let jumps = self.missing_jumps(fi, table)?;
                let script =
                    render::table_script(table, chains.iter().copied(), &stale, &jumps, false);
                size += script.len();
                self.restore(fi, &script)?;
            }
            applied[fi] = Applied::of(&rules);
        }
        self.applied = Some(applied);
        Ok(SyncReport {
            full: true,
            size,
            ..SyncReport::default()
        })
    }

    /// One partial sync; `None` when it has to be full instead.
    /// `failed` is set when a partial transaction was refused (not when the sync has to be
    /// full for other reasons).
    fn try_partial(
        &mut self,
        desired: &DesiredState,
        diff: &Diff,
        failed: &mut bool,
    ) -> Result<Option<SyncReport>, DataplaneError> {
        if self.applied.is_none() {
            return Ok(None);
        }
        if diff.v4.globals_changed || diff.v6.globals_changed {
            return Ok(None);
        }
        let opts = self.options();
        let periodic_check = diff.v4.is_empty() && diff.v6.is_empty();
        if periodic_check {
            // Read-only: adding even one rule makes the kernel validate the whole table
            // (120 ms at 10k services), which a restore of the canary lines would.
            for fi in 0..2 {
                for table in TABLES {
                    if !self.canary_present(fi, table) {
                        tracing::warn!(
                            table,
                            family = if fi == 0 { "IPv4" } else { "IPv6" },
                            "svcplane's iptables rules were flushed or deleted; rewriting them in full"
                        );
                        self.applied = None;
                        return Ok(None);
                    }
                }
            }
            return Ok(Some(SyncReport::default()));
        }
        let mut rendered: Vec<(usize, FamilyRules, BTreeSet<ServicePortName>)> = Vec::new();
        for (fi, family) in [IpFamily::V4, IpFamily::V6].into_iter().enumerate() {
            let fd = diff.family(family);
            if fd.is_empty() {
                continue;
            }
            let selected: BTreeSet<ServicePortName> =
                fd.added.iter().chain(&fd.changed).cloned().collect();
            let rules =
                render::render_family(desired.family(family), opts, Select::Only(&selected));
            rendered.push((fi, rules, selected));
        }
        let Some(applied) = self.applied.as_ref() else {
            return Ok(None);
        };
        let mut changes: Vec<TableChange> = Vec::new();
        for (fi, rules, _) in &rendered {
            let fd = diff.family(if *fi == 0 { IpFamily::V4 } else { IpFamily::V6 });
            let a = &applied[*fi];
            let differs = |table: &HashMap<String, (u64, usize)>, c: &Chain| {
                table.get(&c.name).map(|h| h.0) != Some(text_hash(&c.rules))
            };
            // nat: changed shared chains, changed service chains, chains gone.
            let new_nat: HashSet<&str> = rules.nat().map(|c| c.name.as_str()).collect();
            let writes: Vec<&Chain> = rules.nat().filter(|c| differs(&a.nat, c)).collect();
            let mut stale: Vec<String> = a
                .nat_shared
                .iter()
                .filter(|n| !new_nat.contains(n.as_str()))
                .cloned()
                .collect();
            for name in fd.changed.iter().chain(&fd.removed) {
                for chain in a.svc_chains.get(name).into_iter().flatten() {
                    if !new_nat.contains(chain.as_str()) {
                        stale.push(chain.clone());
                    }
                }
            }
            stale.sort();
            stale.dedup();
            changes.push(TableChange {
                family: *fi,
                table: "nat",
                writes,
                stale,
            });
            let new_filter: HashSet<&str> = rules.filter.iter().map(|c| c.name.as_str()).collect();
            let writes: Vec<&Chain> = rules
                .filter
                .iter()
                .filter(|c| differs(&a.filter, c))
                .collect();
            let mut stale: Vec<String> = a
                .filter
                .keys()
                .filter(|n| !new_filter.contains(n.as_str()))
                .cloned()
                .collect();
            stale.sort();
            changes.push(TableChange {
                family: *fi,
                table: "filter",
                writes,
                stale,
            });
        }
        let mut size = 0;
        let mut refused = None;
        for ch in &changes {
            if ch.writes.is_empty() && ch.stale.is_empty() {
                continue;
            }
            let script =
                render::table_script(ch.table, ch.writes.iter().copied(), &ch.stale, &[], true);
            size += script.len();
            if let Err(e) = self.restore(ch.family, &script) {
                refused = Some(e);
                break;
            }
        }
        if let Some(e) = refused {
            tracing::warn!(error = %e, "partial iptables sync failed (tables flushed or altered?); retrying in full");
            self.applied = None;
            *failed = true;
            return Ok(None);
        }
        // Applied: record what was written and deleted.
        let Some(applied) = self.applied.as_mut() else {
            return Ok(None);
        };
        for ch in &changes {
            let a = &mut applied[ch.family];
            let t = a.table_mut(ch.table);
            for c in &ch.writes {
                t.insert(c.name.clone(), (text_hash(&c.rules), c.count));
            }
            for n in &ch.stale {
                t.remove(n);
            }
        }
        for (fi, rules, selected) in &rendered {
            let fd = diff.family(if *fi == 0 { IpFamily::V4 } else { IpFamily::V6 });
            let a = &mut applied[*fi];
            a.nat_shared = rules.nat_shared.iter().map(|c| c.name.clone()).collect();
            for name in &fd.removed {
                a.svc_chains.remove(name);
            }
            for name in selected {
                a.svc_chains.remove(name);
            }
            for (name, chains) in &rules.services {
                a.svc_chains.insert(
                    name.clone(),
                    chains.iter().map(|c| c.name.clone()).collect(),
                );
            }
        }
        Ok(Some(SyncReport {
            full: false,
            size,
            ..SyncReport::default()
        }))
    }

    /// Whether `SVCP-CANARY` still holds its rule in this table (`iptables -S`, which
    /// lists that chain only).
    fn canary_present(&mut self, family: usize, table: &str) -> bool {
        let iptables = self.tools().iptables[family];
        self.runner
            .run(
                iptables,
                &["-w", "5", "-t", table, "-S", names::CANARY],
                None,
            )
            .is_ok_and(|out| out.lines().any(|l| l.trim() == "-A SVCP-CANARY -j RETURN"))
    }

    /// Rules svcplane owns per table (nat, filter), both families, as last applied.
    fn rule_counts(&self) -> Option<(u64, u64)> {
        let applied = self.applied.as_ref()?;
        let sum = |t: &HashMap<String, (u64, usize)>| t.values().map(|v| v.1 as u64).sum::<u64>();
        Some((
            applied.iter().map(|a| sum(&a.nat)).sum(),
            applied.iter().map(|a| sum(&a.filter)).sum(),
        ))
    }

    /// Whether svcplane's chains are in this host's (or namespace's) tables.
    pub fn has_chains(&mut self) -> bool {
        (0..2).any(|fi| {
            TABLES
                .iter()
                .any(|t| self.list_chains(fi, t).is_ok_and(|c| !c.is_empty()))
        })
    }
}

impl Dataplane for IptablesBackend {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn sync(
        &mut self,
        desired: &Arc<DesiredState>,
        diff: &Diff,
    ) -> Result<SyncReport, DataplaneError> {
        let mut partial_failures = 0;
        if !diff.full && !self.needs_full && diff.previous.is_some() {
            self.needs_full = true;
            let mut failed = false;
            if let Some(mut report) = self.try_partial(desired, diff, &mut failed)? {
                self.needs_full = false;
                report.iptables_rules = self.rule_counts();
                return Ok(self.conntrack.reconcile_into(desired, Some(diff), report));
            }
            partial_failures = u64::from(failed);
        }
        self.needs_full = true;
        let result = self.full_sync(desired);
        let mut report = match result {
            Ok(report) => report,
            Err(e) => {
                // The kernel may hold part of it: list it again next time.
                self.applied = None;
                return Err(e);
            }
        };
        self.needs_full = false;
        report.partial_restore_failures = partial_failures;
        report.iptables_rules = self.rule_counts();
        Ok(self.conntrack.reconcile_into(desired, None, report))
    }

    fn render(&self, desired: &DesiredState) -> Result<String, DataplaneError> {
        let random_fully = self.tools.as_ref().is_none_or(|t| t.random_fully);
        Ok(render::render(
            desired,
            Options {
                dispatch: self.dispatch,
                random_fully,
            },
        ))
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        let mut first_error = None;
        for fi in 0..2 {
            let (save, restore) = {
                let t = self.tools();
                (t.save[fi], t.restore[fi])
            };
            if !self.runner.exists(save) {
                // No iptables here: nothing of svcplane's can be in its tables.
                continue;
            }
            for table in TABLES {
                let saved = match self.runner.run(save, &["-t", table], None) {
                    Ok(s) => s,
                    Err(e) => {
                        first_error.get_or_insert(e);
                        continue;
                    }
                };
                let Some(plan) =
                    crate::kube_proxy::plan_iptables_cleanup_with(&saved, table, |n| {
                        n.starts_with(names::PREFIX)
                    })
                else {
                    continue;
                };
                if let Err(e) =
                    self.runner
                        .run(restore, &["--noflush", "-w", "5"], Some(&plan.script))
                {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.applied = None;
        self.needs_full = true;
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests;
