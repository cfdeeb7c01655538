//! DesiredState → one `nft -f -` transaction, modelled on kube-proxy's nftables mode
//! (`pkg/proxy/nftables/proxier.go`: setupNFTables + syncProxyRules).
//!
//! Transaction shape, per family (`ip svcplane`, then `ip6 svcplane`):
//! 1. `add table` + `flush table`: every chain loses its rules, but the table, its
//!    chains and its sets stay. Set elements survive a table flush, so ClientIP
//!    affinity state is kept across syncs (a `delete table` would reset every sticky
//!    client on every sync). Established connections do not depend on rules at all:
//!    their NAT is in conntrack, and the whole transaction is atomic, so no packet
//!    ever sees a half-written ruleset. This is what kube-proxy does.
//! 2. The base chains are deleted and re-created (kube-proxy does this on its first
//!    sync), so a changed hook priority can never make the transaction fail. Base
//!    chains of an earlier layout are emptied by the flush and deleted as stale objects.
//! 3. The shared maps/sets are `add` + `flush`ed (flush table does not empty them);
//!    affinity sets are only `add`ed, which keeps their elements.
//! 4. One `table … { … }` block declares every chain with its rules (nft resolves
//!    forward references inside a block), then `add element` fills the maps.
//!
//! Objects of an earlier state that are no longer wanted are left empty and
//! unreferenced by this script; `sync` deletes them in a second step (as kube-proxy,
//! because kernels before 6.2 release a chain's last map reference asynchronously).
//!
//! The pieces: [`base`] (base chains, the shared sets and dispatch maps, the `services`
//! dispatch chain), [`service`] (a service port's chains), [`select`] (endpoint
//! selection), [`filter`] (filter chains, no-endpoint verdicts, the source-range
//! firewall), [`masq`] (masquerade and hairpin), [`elements`] (set and map elements).
//! Each produces values ([`Rule`], [`Chain`], [`SetDecl`], element keys); this module
//! assembles them into a [`FamilyTable`] and spells it as text.
//!
//! Partial syncs ([`render_partial`]) send only what a `Diff` changed; `render` stays the
//! full transaction (what startup, periodic resyncs and repairs send).
//!
//! Every semantic decision (which endpoints, which verdict when empty, masquerade
//! policy) comes from the DesiredState; this module only spells it.

mod base;
mod elements;
mod filter;
mod masq;
mod ops;
mod partial;
mod select;
mod service;

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;

use ipnet::IpNet;
use svcplane_model::IpFamily;
use svcplane_proxy::{DataplaneError, DesiredState, FamilyState, NodePortAddresses};

use super::rule::{Chain, SetDecl, family_word};

pub use base::{Layout, NORTH_SOUTH_TABLE, TABLE};
pub(crate) use base::{tables_present_probe, tables_present_probe_ops};
use elements::Elements;
pub use masq::MASQUERADE_MARK;
pub(crate) use ops::family_ops;
#[cfg(test)]
pub(crate) use partial::NetlinkPartial;
pub(crate) use partial::{Partial, hairpin_refs, render_partial};
use select::Selection;

/// Writing into a `String` cannot fail; these keep the renderer free of `let _ =`.
macro_rules! w {
    ($dst:expr, $($arg:tt)*) => {{ let _ = write!($dst, $($arg)*); }};
}
macro_rules! wl {
    ($dst:expr, $($arg:tt)*) => {{ let _ = writeln!($dst, $($arg)*); }};
}
pub(crate) use {w, wl};

// Fixed chains, sets and maps (kube-proxy's names).
const SERVICES: &str = "services";
const SERVICE_IPS: &str = "service-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NODEPORT_IPS: &str = "nodeport-ips";
const CLUSTER_IPS: &str = "cluster-ips";
const HAIRPIN: &str = "hairpin";
const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
const REJECT_CHAIN: &str = "reject-chain";
const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
const FIREWALL_IPS: &str = "firewall-ips";
const FIREWALL_CHECK: &str = "firewall-check";
const MARK_MASQ: &str = "mark-for-masquerade";
const MASQUERADING: &str = "masquerading";

/// This family's networks, merged: nft rejects overlapping intervals in a set.
pub(crate) fn family_nets(family: IpFamily, nets: &[IpNet]) -> Vec<IpNet> {
    let own: Vec<IpNet> = nets
        .iter()
        .filter(|n| IpFamily::of_net(n) == family)
        .map(|n| n.trunc())
        .collect();
    IpNet::aggregate(&own)
}

/// What every service of a family renders against (from the family's globals).
struct FamilyCtx {
    family: IpFamily,
    cluster_cidrs: Vec<IpNet>,
    masquerade: masq::Masquerade,
}

fn family_ctx(fam: &FamilyState) -> FamilyCtx {
    FamilyCtx {
        family: fam.family,
        cluster_cidrs: family_nets(fam.family, &fam.cluster_cidrs),
        masquerade: masq::Masquerade::of(fam),
    }
}

/// A declaration inside the `table … { }` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decl {
    Set(SetDecl),
    Chain(Chain),
}

impl Decl {
    pub fn name(&self) -> &str {
        match self {
            Decl::Set(s) => &s.name,
            Decl::Chain(c) => &c.name,
        }
    }
}

/// One family's whole table as values: what the full transaction declares and fills.
pub(crate) struct FamilyTable {
    pub family: IpFamily,
    /// Base chains (deleted and re-created by the transaction).
    pub base_chains: Vec<Chain>,
    /// Shared sets and maps (declared and flushed; `absent` ones declared and deleted).
    pub shared: Vec<base::Shared>,
    /// The block: fixed chains, then each service port's sets and chains.
    pub block: Vec<Decl>,
    pub elements: Elements,
    /// The `nodeport-ips` elements (with `--nodeport-addresses` CIDRs).
    pub nodeport_nets: Vec<IpNet>,
}

impl FamilyTable {
    /// The names this table declares (for the stale-object cleanup).
    pub(crate) fn declared(&self) -> HashSet<String> {
        self.base_chains
            .iter()
            .map(|c| c.name.clone())
            .chain(
                self.shared
                    .iter()
                    .filter(|s| !s.absent)
                    .map(|s| s.decl.name.clone()),
            )
            .chain(self.block.iter().map(|d| d.name().to_owned()))
            .collect()
    }
}

/// `fam` as a [`FamilyTable`] in `layout`.
pub(crate) fn family_table(
    fam: &FamilyState,
    layout: Layout,
) -> Result<FamilyTable, DataplaneError> {
    let family = fam.family;
    let all_local = fam.nodeport_addresses == NodePortAddresses::AllLocal;
    let mut block: Vec<Decl> = [
        masq::mark_chain(),
        masq::masquerading_chain(family),
        filter::reject_chain(),
        filter::service_endpoints_check(family),
        filter::nodeport_endpoints_check(family, all_local),
        filter::cluster_ips_check(family),
        filter::firewall_check(family),
        base::services_chain(family, all_local),
    ]
    .into_iter()
    .map(Decl::Chain)
    .collect();
    let ctx = family_ctx(fam);
    let mut elements = Elements::default();
    let mut services = Vec::with_capacity(fam.services.len());
    for svc in fam.services.values() {
        let rendered = service::render(&ctx, svc)?;
        elements.claim_service(family, svc, &rendered.targets);
        services.extend(rendered.decls);
    }
    // The shared selection chains before the services (nft would resolve them anyway).
    block.extend(
        selection_chains(&elements)
            .into_iter()
            .map(|sel| Decl::Chain(select::selection_chain(family, sel))),
    );
    block.extend(services);
    let nodeport_nets = match &fam.nodeport_addresses {
        NodePortAddresses::Cidrs(cidrs) => family_nets(family, cidrs),
        NodePortAddresses::AllLocal => Vec::new(),
    };
    Ok(FamilyTable {
        family,
        base_chains: layout.base_chains().collect(),
        shared: base::shared_sets(family, all_local),
        block,
        elements,
        nodeport_nets,
    })
}

/// The selection chains a full sync declares: every one in use, and counts
/// 1..=[`select::PRECREATED_COUNTS`] of every endpoints map (used or not, so a partial
/// sync can tell which exist from the previous state alone).
fn selection_chains(elements: &Elements) -> BTreeSet<Selection> {
    with_precreated(elements.selection_chains.clone())
}

/// The selection chains that exist after the last sync of `fam` (a partial sync never
/// deletes one; the next full sync deletes those no longer used).
fn selection_chains_of(fam: &FamilyState) -> BTreeSet<Selection> {
    with_precreated(
        fam.services
            .values()
            .flat_map(|s| select::keyed_selections(s))
            .collect(),
    )
}

fn with_precreated(mut in_use: BTreeSet<Selection>) -> BTreeSet<Selection> {
    for (k, p) in elements::endpoint_maps() {
        in_use.extend((1..=select::PRECREATED_COUNTS).map(|n| (k, p, n)));
    }
    in_use
}

/// The full transaction for `desired`: both families, deterministic.
pub fn render(desired: &DesiredState) -> Result<String, DataplaneError> {
    render_layout(desired, Layout::FULL)
}

/// [`render`] into `layout`'s table and hooks.
pub fn render_layout(desired: &DesiredState, layout: Layout) -> Result<String, DataplaneError> {
    let mut out = String::with_capacity(estimate(desired));
    for fam in desired.families() {
        spell_family(&mut out, &family_table(fam, layout)?, layout.table);
    }
    Ok(out)
}

/// Both families' tables (v4, v6): what the netlink transport encodes; the text of the
/// same transaction is [`spell_tables`].
pub(crate) fn family_tables(
    desired: &DesiredState,
    layout: Layout,
) -> Result<Vec<FamilyTable>, DataplaneError> {
    desired
        .families()
        .into_iter()
        .map(|fam| family_table(fam, layout))
        .collect()
}

/// The text transaction of `tables` (as [`render_layout`] writes it).
pub(crate) fn spell_tables(desired: &DesiredState, tables: &[FamilyTable], table: &str) -> String {
    let mut out = String::with_capacity(estimate(desired));
    for ft in tables {
        spell_family(&mut out, ft, table);
    }
    out
}

fn estimate(desired: &DesiredState) -> usize {
    desired
        .families()
        .iter()
        .map(|f| {
            f.services
                .values()
                .map(|s| 1024 + 512 * s.endpoints.len())
                .sum::<usize>()
        })
        .sum::<usize>()
        + 8192
}

/// The text of one family's full transaction (steps 1–5 of the module's doc).
fn spell_family(out: &mut String, ft: &FamilyTable, table: &str) {
    let t = family_word(ft.family);
    wl!(
        out,
        "add table {t} {table} {{ comment \"rules for svcplane\" ; }}"
    );
    wl!(out, "flush table {t} {table}");
    for bc in &ft.base_chains {
        wl!(out, "add chain {t} {table} {}", bc.name);
        wl!(out, "delete chain {t} {table} {}", bc.name);
    }
    for s in &ft.shared {
        let (word, name) = (s.decl.word(), &s.decl.name);
        wl!(out, "add {word} {t} {table} {name} {}", s.decl.body());
        // kube-proxy: with AllLocal the nodeport-ips set must not exist (add+delete
        // rather than delete, which would fail when it is absent).
        let verb = if s.absent { "delete" } else { "flush" };
        wl!(out, "{verb} {word} {t} {table} {name}");
    }
    wl!(out, "table {t} {table} {{");
    for c in &ft.base_chains {
        w!(out, "{c}");
    }
    for d in &ft.block {
        match d {
            Decl::Set(s) => w!(out, "{s}"),
            Decl::Chain(c) => w!(out, "{c}"),
        }
    }
    wl!(out, "}}");
    elements::spell(out, &format!("{t} {table}"), ft);
}
