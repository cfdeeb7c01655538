//! Partial syncs: only what a `Diff` changed, as text and (when every rule has an
//! encoding) as netlink operations, from the same values.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use svcplane_model::{IpFamily, ServicePortName};
use svcplane_proxy::{DataplaneError, DesiredState, Diff, FamilyState};

use super::super::names;
use super::super::netlink::{self, Key, Op, Verdict as NlVerdict};
use super::super::rule::{Chain, family_word};
use super::elements::{
    Elements, EndpointKey, EndpointValue, IpKey, PortKey, Verdict, element_op, endpoint_elem,
    endpoint_key as spell_endpoint_key, endpoint_maps, hairpin_elem, hairpin_users, ip_elem,
    port_elem,
};
use super::select::{self, endpoints_map};
use super::{
    CLUSTER_IPS, Decl, FIREWALL_IPS, HAIRPIN, NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES,
    REJECT_CHAIN, SERVICE_IPS, SERVICE_NODEPORTS, family_ctx, selection_chains_of, service, w, wl,
};
use crate::refs::AddrRefs;

/// A partial transaction (see [`render_partial`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Partial {
    /// The atomic transaction carrying only the changes.
    pub script: String,
    /// Deletes of the chains and sets the transaction left empty and unreferenced. A
    /// second transaction, as kube-proxy does: a chain can only be deleted once nothing
    /// references it, and kernels before 6.2 release a map's reference asynchronously.
    pub stale: String,
    /// The same two transactions as netlink operations, when every changed service port
    /// can be expressed that way (see [`super::super::netlink`]); `None` otherwise.
    pub netlink: Option<NetlinkPartial>,
    /// The hairpin set's users (endpoints, see `hairpin_users`) the changed service ports
    /// had and have: what the caller's [`AddrRefs`] loses and gains once this is applied.
    pub hairpin_users: HairpinUsers,
}

/// The hairpin set's users in `state`: every endpoint of every service port (a full
/// sync's worth of work, done once after one).
pub(crate) fn hairpin_refs(state: &DesiredState) -> AddrRefs {
    // At most one address per endpoint.
    let endpoints =
        |fam: &FamilyState| -> usize { fam.services.values().map(|s| s.endpoints.len()).sum() };
    let mut refs = AddrRefs::with_capacity(endpoints(&state.v4), endpoints(&state.v6));
    for fam in state.families() {
        refs.extend(
            fam.services
                .values()
                .flat_map(|svc| hairpin_users(fam.family, svc)),
        );
    }
    refs
}

/// Endpoint addresses, one per endpoint, of the changed service ports' old and new versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HairpinUsers {
    pub gone: Vec<IpAddr>,
    pub came: Vec<IpAddr>,
}

impl HairpinUsers {
    /// `refs` (the users in the state before this partial) brought to the state after it.
    pub fn apply_to(&self, refs: &mut AddrRefs) {
        for &ip in &self.gone {
            refs.remove(ip);
        }
        for &ip in &self.came {
            refs.add(ip);
        }
    }
}

/// [`Partial`]'s transactions as netlink operations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NetlinkPartial {
    pub ops: Vec<Op>,
    pub stale: Vec<Op>,
}

/// The partial transaction from `prev` (what was last applied) to `next`, or `None` when
/// a family's globals changed (those touch the fixed chains: a full sync rewrites them).
///
/// Per family, only the services of `diff` are rendered, old and new: their map
/// elements are diffed (`delete element` first, so a key whose value changed is
/// replaced), chains whose rules changed are flushed and rewritten (unchanged ones are
/// left alone: an endpoint swap behind a selection chain is element operations only),
/// new ones are added, and chains only the old version declared are flushed here and
/// deleted, with its affinity sets, by [`Partial::stale`]. Affinity sets both versions
/// use are kept, with their elements (sticky clients stay sticky). A selection chain
/// the new services need and the previous state had not is created (`add` + `flush`,
/// as it may be left over from an earlier state).
///
/// `hairpin`: the hairpin set's users in `prev` (every endpoint of every service port),
/// which tells whether an endpoint address of the changed ports has users elsewhere;
/// without it, every service port of `next` is walked when an address leaves them.
///
/// Limit: a map key claimed by two service ports (an invalid cluster) is resolved as
/// the full render resolves it only at the next full sync.
pub(crate) fn render_partial(
    prev: &DesiredState,
    next: &DesiredState,
    diff: &Diff,
    table: &str,
    hairpin: Option<&AddrRefs>,
) -> Result<Option<Partial>, DataplaneError> {
    let mut partial = Partial::default();
    let mut nl = Some(NetlinkPartial::default());
    for family in [IpFamily::V4, IpFamily::V6] {
        let fd = diff.family(family);
        if fd.globals_changed {
            return Ok(None);
        }
        if fd.is_empty() {
            continue;
        }
        let (old_fam, new_fam) = (prev.family(family), next.family(family));
        let old = Side::of(old_fam, fd.changed.iter().chain(&fd.removed))?;
        let new = Side::of(new_fam, fd.changed.iter().chain(&fd.added))?;
        let t = &format!("{} {table}", family_word(family));
        let mut out = FamilyWriter {
            text: Text {
                t,
                ..Text::default()
            },
            nl: nl.as_ref().map(|_| Ops::default()),
            family: netlink::family_code(family == IpFamily::V6),
            ip_family: family,
        };
        write_elements(&mut out, &old, &new, new_fam, hairpin);
        write_chains(&mut out, &old, &new, old_fam, new_fam);
        partial.script.push_str(&out.text.deletes);
        partial.script.push_str(&out.text.flushes);
        if !out.text.block.is_empty() {
            wl!(partial.script, "table {t} {{");
            partial.script.push_str(&out.text.block);
            wl!(partial.script, "}}");
        }
        partial.script.push_str(&out.text.adds);
        partial.stale.push_str(&out.text.stale);
        partial.hairpin_users.gone.extend(old.hairpin_users);
        partial.hairpin_users.came.extend(new.hairpin_users);
        match (nl.as_mut(), out.nl) {
            (Some(plan), Some(ops)) => {
                plan.ops.extend(ops.deletes);
                plan.ops.extend(ops.flushes);
                plan.ops.extend(ops.block_chains);
                plan.ops.extend(ops.block_rules);
                plan.ops.extend(ops.adds);
                plan.stale.extend(ops.stale);
            }
            _ => nl = None,
        }
    }
    partial.netlink = nl;
    Ok(Some(partial))
}

/// What one side (old or new) of the changed service ports renders to.
struct Side {
    elements: Elements,
    /// Their chains and sets, in declaration order.
    decls: Vec<Decl>,
    /// Index into `decls` by name.
    by_name: HashMap<String, usize>,
    /// Their hairpin set users (see `hairpin_users`).
    hairpin_users: Vec<IpAddr>,
}

impl Side {
    fn of<'a>(
        fam: &FamilyState,
        names: impl Iterator<Item = &'a ServicePortName>,
    ) -> Result<Side, DataplaneError> {
        let ctx = family_ctx(fam);
        let mut side = Side {
            elements: Elements::default(),
            decls: Vec::new(),
            by_name: HashMap::new(),
            hairpin_users: Vec::new(),
        };
        for name in names {
            if let Some(svc) = fam.services.get(name) {
                let rendered = service::render(&ctx, svc)?;
                let mut elements = Elements::default();
                elements.claim_service(fam.family, svc, &rendered.targets);
                side.elements.merge(elements);
                side.hairpin_users.extend(hairpin_users(fam.family, svc));
                for d in rendered.decls {
                    side.by_name.insert(d.name().to_owned(), side.decls.len());
                    side.decls.push(d);
                }
            }
        }
        Ok(side)
    }

    fn get(&self, name: &str) -> Option<&Decl> {
        self.by_name.get(name).map(|&i| &self.decls[i])
    }

    /// Whether `d` is a chain this side declares with the same rules.
    fn has_same_chain(&self, d: &Decl) -> bool {
        matches!(
            (d, self.get(d.name())),
            (Decl::Chain(c), Some(Decl::Chain(o))) if c.rules == o.rules
        )
    }
}

/// The text of one family's partial transaction, in its sections.
#[derive(Default)]
struct Text<'a> {
    /// `<family> <table>`.
    t: &'a str,
    deletes: String,
    flushes: String,
    block: String,
    adds: String,
    stale: String,
}

/// The same sections as netlink operations. The block's chains are all added before
/// its rules: a rule may name a chain declared after it (nft resolves that in a text
/// block; the kernel does not).
#[derive(Default)]
struct Ops {
    deletes: Vec<Op>,
    flushes: Vec<Op>,
    block_chains: Vec<Op>,
    block_rules: Vec<Op>,
    adds: Vec<Op>,
    stale: Vec<Op>,
}

/// Both forms of one family's partial transaction, written side by side so they cannot
/// drift. `nl` is `None` once something was met that only the text form expresses.
struct FamilyWriter<'a> {
    text: Text<'a>,
    nl: Option<Ops>,
    family: u8,
    ip_family: IpFamily,
}

impl FamilyWriter<'_> {
    /// `<verb> element` in both forms: `key` gives an element's netlink op.
    fn elements<T: Copy>(
        &mut self,
        delete: bool,
        set: &'static str,
        items: &[T],
        spell: impl Fn(&mut String, T),
        op: impl Fn(u8, Vec<T>) -> Op,
    ) {
        let (out, verb) = if delete {
            (&mut self.text.deletes, "delete")
        } else {
            (&mut self.text.adds, "add")
        };
        element_op(out, verb, self.text.t, set, items.iter().copied(), spell);
        if let Some(ops) = &mut self.nl
            && !items.is_empty()
        {
            let list = if delete {
                &mut ops.deletes
            } else {
                &mut ops.adds
            };
            list.push(op(self.family, items.to_vec()));
        }
    }

    fn flush_chain(&mut self, name: &str) {
        wl!(self.text.flushes, "flush chain {} {name}", self.text.t);
        if let Some(ops) = &mut self.nl {
            ops.flushes.push(Op::FlushChain {
                family: self.family,
                chain: name.to_owned(),
            });
        }
    }

    /// `add chain` (a no-op when it exists) before the flushes.
    fn add_chain(&mut self, name: &str) {
        wl!(self.text.flushes, "add chain {} {name}", self.text.t);
        if let Some(ops) = &mut self.nl {
            ops.flushes.push(Op::AddChain {
                family: self.family,
                chain: name.to_owned(),
            });
        }
    }

    /// A chain with its rules, in the block.
    fn chain(&mut self, chain: &Chain) {
        w!(self.text.block, "{chain}");
        let Some(ops) = &mut self.nl else {
            return;
        };
        ops.block_chains.push(Op::AddChain {
            family: self.family,
            chain: chain.name.clone(),
        });
        for rule in &chain.rules {
            let Some(op) = rule.op(self.ip_family, &chain.name) else {
                self.nl = None;
                return;
            };
            ops.block_rules.push(op);
        }
    }

    fn decl(&mut self, d: &Decl) {
        match d {
            Decl::Chain(c) => self.chain(c),
            Decl::Set(s) => {
                w!(self.text.block, "{s}");
                // Declared with the block's chains, before any rule names it.
                let family = self.family;
                match (&mut self.nl, super::ops::set_spec(s)) {
                    (Some(ops), Some(spec)) => ops.block_chains.push(Op::AddSet { family, spec }),
                    _ => self.nl = None,
                }
            }
        }
    }

    fn stale(&mut self, word: &str, name: &str) {
        wl!(self.text.stale, "delete {word} {} {name}", self.text.t);
        if let Some(ops) = &mut self.nl {
            ops.stale.push(if word == "set" {
                Op::DeleteSet {
                    family: self.family,
                    set: name.to_owned(),
                }
            } else {
                Op::DeleteChain {
                    family: self.family,
                    chain: name.to_owned(),
                }
            });
        }
    }
}

/// Borrowed map elements.
type ElementRefs<'a, K, V> = Vec<(&'a K, &'a V)>;

/// Elements of `old` not in `new` (with the same value), and of `new` not in `old`.
fn map_changes<'a, K: Ord + 'a, V: PartialEq + 'a>(
    old: impl Iterator<Item = (&'a K, &'a V)>,
    new: impl Iterator<Item = (&'a K, &'a V)>,
    old_get: impl Fn(&K) -> Option<&'a V>,
    new_get: impl Fn(&K) -> Option<&'a V>,
) -> (ElementRefs<'a, K, V>, ElementRefs<'a, K, V>) {
    let gone = old.filter(|(k, v)| new_get(k) != Some(*v)).collect();
    let came = new.filter(|(k, v)| old_get(k) != Some(*v)).collect();
    (gone, came)
}

/// [`map_changes`] of two maps.
fn btree_changes<'a, K: Ord, V: PartialEq>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> (ElementRefs<'a, K, V>, ElementRefs<'a, K, V>) {
    map_changes(old.iter(), new.iter(), |k| old.get(k), |k| new.get(k))
}

pub(super) fn nl_verdict(v: &Verdict) -> NlVerdict {
    match v {
        Verdict::Goto(chain) => NlVerdict::Goto(chain.clone()),
        Verdict::Drop => NlVerdict::Drop,
        Verdict::Reject => NlVerdict::Goto(REJECT_CHAIN.to_owned()),
    }
}

pub(super) fn ip_key((ip, proto, port): &IpKey) -> Key {
    Key::default().ip(ip).proto(*proto).port(*port)
}

pub(super) fn port_key((proto, port): &PortKey) -> Key {
    Key::default().proto(*proto).port(*port)
}

/// Verdict-map element operations.
fn verdict_op<'a, K: 'a>(
    set: &'static str,
    delete: bool,
    key: impl Fn(&K) -> Key,
) -> impl Fn(u8, Vec<(&'a K, &'a Verdict)>) -> Op {
    move |family, items| Op::Elements {
        delete,
        family,
        set,
        items: items
            .into_iter()
            .map(|(k, v)| (key(k), Some(nl_verdict(v))))
            .collect(),
    }
}

/// Set element operations (keys only).
fn set_op<'a>(
    set: &'static str,
    delete: bool,
    key: impl Fn(&IpAddr) -> Key,
) -> impl Fn(u8, Vec<&'a IpAddr>) -> Op {
    move |family, items| Op::Elements {
        delete,
        family,
        set,
        items: items.into_iter().map(|ip| (key(ip), None)).collect(),
    }
}

/// An endpoints map key in nft's layout.
pub(super) fn endpoint_key((_, _, ip, port, bucket): &EndpointKey) -> Key {
    let key = match ip {
        Some(ip) => Key::default().ip(ip),
        None => Key::default(),
    };
    key.port(*port).bucket(*bucket)
}

/// An endpoints map value in nft's layout.
pub(super) fn endpoint_value((ep, ep_port): &EndpointValue) -> Key {
    Key::default().ip(ep).port(*ep_port)
}

/// Endpoints map element operations.
fn endpoint_op<'a>(
    set: &'static str,
    delete: bool,
) -> impl Fn(u8, Vec<(&'a EndpointKey, &'a EndpointValue)>) -> Op {
    move |family, items| Op::DataElements {
        delete,
        family,
        set,
        items: items
            .into_iter()
            .map(|(k, v)| (endpoint_key(k), endpoint_value(v)))
            .collect(),
    }
}

/// The element changes between the old and new versions of the changed services.
fn write_elements(
    w: &mut FamilyWriter,
    old_side: &Side,
    new_side: &Side,
    new_fam: &FamilyState,
    hairpin: Option<&AddrRefs>,
) {
    let (old, new) = (&old_side.elements, &new_side.elements);
    let ip_only = |out: &mut String, ((ip, proto, port), _): (&IpKey, &Verdict)| {
        w!(out, "{ip} . {} . {port}", proto.as_lower())
    };
    let port_only = |out: &mut String, ((proto, port), _): (&PortKey, &Verdict)| {
        w!(out, "{} . {port}", proto.as_lower())
    };
    let ip_maps = [
        (SERVICE_IPS, &old.service_ips, &new.service_ips),
        (
            NO_ENDPOINT_SERVICES,
            &old.no_endpoint_services,
            &new.no_endpoint_services,
        ),
        (FIREWALL_IPS, &old.firewall_ips, &new.firewall_ips),
    ];
    for (map, o, n) in ip_maps {
        let (gone, came) = btree_changes(o, n);
        w.elements(true, map, &gone, ip_only, verdict_op(map, true, ip_key));
        w.elements(false, map, &came, ip_elem, verdict_op(map, false, ip_key));
    }
    let port_maps = [
        (
            SERVICE_NODEPORTS,
            &old.service_nodeports,
            &new.service_nodeports,
        ),
        (
            NO_ENDPOINT_NODEPORTS,
            &old.no_endpoint_nodeports,
            &new.no_endpoint_nodeports,
        ),
    ];
    for (map, o, n) in port_maps {
        let (gone, came) = btree_changes(o, n);
        w.elements(true, map, &gone, port_only, verdict_op(map, true, port_key));
        w.elements(
            false,
            map,
            &came,
            port_elem,
            verdict_op(map, false, port_key),
        );
    }
    let key_only =
        |out: &mut String, (key, _): (&EndpointKey, &EndpointValue)| spell_endpoint_key(out, key);
    for (k, p) in endpoint_maps() {
        let map = endpoints_map(k, p);
        let (gone, came) = map_changes(
            old.endpoints_of(k, p),
            new.endpoints_of(k, p),
            |k| old.endpoints.get(k),
            |k| new.endpoints.get(k),
        );
        w.elements(true, map, &gone, key_only, endpoint_op(map, true));
        w.elements(false, map, &came, endpoint_elem, endpoint_op(map, false));
    }
    // A ClusterIP is shared by the ports of one Service: it leaves the set only when no
    // port of the new state still has it.
    let gone_ips: Vec<&IpAddr> = old
        .cluster_ips
        .difference(&new.cluster_ips)
        .filter(|ip| {
            !new_fam
                .services
                .values()
                .any(|s| s.cluster_ip == Some(**ip))
        })
        .collect();
    let addr = |ip: &IpAddr| Key::default().ip(ip);
    let spell_ip = |o: &mut String, ip: &IpAddr| w!(o, "{ip}");
    w.elements(
        true,
        CLUSTER_IPS,
        &gone_ips,
        spell_ip,
        set_op(CLUSTER_IPS, true, addr),
    );
    let came_ips: Vec<&IpAddr> = new.cluster_ips.difference(&old.cluster_ips).collect();
    w.elements(
        false,
        CLUSTER_IPS,
        &came_ips,
        spell_ip,
        set_op(CLUSTER_IPS, false, addr),
    );
    // Likewise an endpoint address leaves the hairpin set only when no service port of
    // the new state still has it.
    let mut gone_hairpin: BTreeSet<&IpAddr> = old.hairpin.difference(&new.hairpin).collect();
    if let Some(refs) = hairpin.filter(|_| !gone_hairpin.is_empty()) {
        // The new versions do not have it: it is gone when the old versions were all
        // its users.
        let mut old_users: HashMap<&IpAddr, u32> = HashMap::new();
        for ip in &old_side.hairpin_users {
            *old_users.entry(ip).or_default() += 1;
        }
        gone_hairpin.retain(|ip| refs.count(ip) <= old_users.get(ip).copied().unwrap_or(0));
    } else if !gone_hairpin.is_empty() {
        // One pass over every endpoint, without allocating (500k at 50k services).
        'scan: for svc in new_fam.services.values() {
            for ep in &svc.endpoints {
                gone_hairpin.remove(&ep.ip);
                if gone_hairpin.is_empty() {
                    break 'scan;
                }
            }
        }
    }
    let gone_hairpin: Vec<&IpAddr> = gone_hairpin.into_iter().collect();
    let pair = |ip: &IpAddr| Key::default().ip(ip).ip(ip);
    w.elements(
        true,
        HAIRPIN,
        &gone_hairpin,
        hairpin_elem,
        set_op(HAIRPIN, true, pair),
    );
    let came_hairpin: Vec<&IpAddr> = new.hairpin.difference(&old.hairpin).collect();
    w.elements(
        false,
        HAIRPIN,
        &came_hairpin,
        hairpin_elem,
        set_op(HAIRPIN, false, pair),
    );
}

/// The chain and set changes: changed chains flushed and rewritten, new ones added,
/// gone ones flushed (and deleted by the stale transaction), missing selection chains
/// created.
fn write_chains(
    w: &mut FamilyWriter,
    old: &Side,
    new: &Side,
    old_fam: &FamilyState,
    new_fam: &FamilyState,
) {
    let is_set = |name: &str| name.starts_with(names::AFFINITY_PREFIX);
    // Chains both versions declare, rewritten only when their rules changed.
    let mut changed: Vec<&str> = new
        .decls
        .iter()
        .filter(|d| matches!(d, Decl::Chain(_)))
        .filter(|d| matches!(old.get(d.name()), Some(Decl::Chain(_))) && !old.has_same_chain(d))
        .map(|d| d.name())
        .collect();
    changed.sort();
    for name in changed {
        w.flush_chain(name);
    }
    let mut stale: Vec<&str> = old
        .decls
        .iter()
        .map(|d| d.name())
        .filter(|n| new.get(n).is_none())
        .collect();
    stale.sort();
    for name in stale.iter().filter(|n| !is_set(n)) {
        w.flush_chain(name);
    }
    // Selection chains the new services need that the previous state did not have.
    // (Counts up to PRECREATED_COUNTS always exist: no scan of the old state for them.)
    if new
        .elements
        .selection_chains
        .iter()
        .any(|&(_, _, n)| n > select::PRECREATED_COUNTS)
    {
        let existing = selection_chains_of(old_fam);
        for &sel in new.elements.selection_chains.difference(&existing) {
            let chain = select::selection_chain(new_fam.family, sel);
            w.add_chain(&chain.name);
            w.flush_chain(&chain.name);
            w.chain(&chain);
        }
    }
    for d in &new.decls {
        if !old.has_same_chain(d) {
            w.decl(d);
        }
    }
    // Chains first: a stale endpoint chain is what referenced a stale affinity set.
    for name in stale.iter().filter(|n| !is_set(n)) {
        w.stale("chain", name);
    }
    for name in stale.iter().filter(|n| is_set(n)) {
        w.stale("set", name);
    }
}
