//! Partial syncs: only what a `Diff` changed, as text and (when every rule has an
//! encoding) as netlink operations, from the same values.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use svcplane_model::IpFamily;
use svcplane_proxy::{DataplaneError, DesiredState, Diff, ServicePortState};

use super::super::names;
use super::super::netlink::{self, Key, Op, Verdict as NlVerdict};
use super::super::rule::{Chain, family_word};
use super::elements::{
    Elements, IpKey, PortKey, Verdict, element_op, hairpin_elem, ip_elem, port_elem,
};
use super::{
    CLUSTER_IPS, Decl, FIREWALL_IPS, FamilyCtx, HAIRPIN, NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES, REJECT_CHAIN, SERVICE_IPS, SERVICE_NODEPORTS, family_ctx, service, w, wl,
};

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
}

/// [`Partial`]'s transactions as netlink operations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NetlinkPartial {
    pub ops: Vec<Op>,
    pub stale: Vec<Op>,
}

/// A map's name, its old elements and its new ones.
type MapPair<'a, K> = (
    &'static str,
    &'a BTreeMap<K, Verdict>,
    &'a BTreeMap<K, Verdict>,
);

/// What one service port renders to, alone.
struct ServiceParts {
    decls: Vec<Decl>,
    elements: Elements,
}

fn service_parts(ctx: &FamilyCtx, svc: &ServicePortState) -> Result<ServiceParts, DataplaneError> {
    let rendered = service::render(ctx, svc)?;
    let mut elements = Elements::default();
    elements.claim_service(ctx.family, svc, &rendered.targets);
    Ok(ServiceParts {
        decls: rendered.decls,
        elements,
    })
}

/// Borrowed map elements.
type ElementRefs<'a, K> = Vec<(&'a K, &'a Verdict)>;

/// Elements of `old` not in `new` (with the same value), and of `new` not in `old`.
fn map_changes<'a, K: Ord>(
    old: &'a BTreeMap<K, Verdict>,
    new: &'a BTreeMap<K, Verdict>,
) -> (ElementRefs<'a, K>, ElementRefs<'a, K>) {
    let gone = old
        .iter()
        .filter(|(k, v)| new.get(*k) != Some(*v))
        .collect();
    let came = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .collect();
    (gone, came)
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

/// Both forms of one partial transaction, written side by side so they cannot drift.
struct PartialWriter<'a> {
    out: &'a mut String,
    /// `None` once something was met that only the text form expresses.
    ops: Option<Vec<Op>>,
    /// `<family> <table>`.
    t: &'a str,
    family: u8,
}

impl PartialWriter<'_> {
    /// `<verb> element` in both forms; `value` gives a map element's verdict.
    fn elements<T: Copy>(
        &mut self,
        delete: bool,
        set: &'static str,
        items: &[T],
        spell: impl Fn(&mut String, T),
        key: impl Fn(T) -> (Key, Option<NlVerdict>),
    ) {
        element_op(
            self.out,
            if delete { "delete" } else { "add" },
            self.t,
            set,
            items.iter().copied(),
            spell,
        );
        if let Some(ops) = &mut self.ops
            && !items.is_empty()
        {
            ops.push(Op::Elements {
                delete,
                family: self.family,
                set,
                items: items.iter().map(|&i| key(i)).collect(),
            });
        }
    }

    fn flush_chain(&mut self, name: &str) {
        wl!(self.out, "flush chain {} {name}", self.t);
        if let Some(ops) = &mut self.ops {
            ops.push(Op::FlushChain {
                family: self.family,
                chain: name.to_owned(),
            });
        }
    }
}

/// The partial transaction from `prev` (what was last applied) to `next`, or `None` when
/// a family's globals changed (those touch the fixed chains: a full sync rewrites them).
///
/// Per family, only the services of `diff` are rendered, old and new: their map
/// elements are diffed (`delete element` first, so a key whose value changed is
/// replaced), chains both versions declare are flushed and rewritten, new ones are
/// added, and chains only the old version declared are flushed here and deleted, with
/// its affinity sets, by [`Partial::stale`]. Affinity sets both versions use are kept,
/// with their elements (sticky clients stay sticky).
///
/// Limit: a map key claimed by two service ports (an invalid cluster) is resolved as
/// the full render resolves it only at the next full sync.
pub(crate) fn render_partial(
    prev: &DesiredState,
    next: &DesiredState,
    diff: &Diff,
    table: &str,
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
        let (old_ctx, new_ctx) = (family_ctx(old_fam), family_ctx(new_fam));
        let t = &format!("{} {table}", family_word(family));
        let nl_family = netlink::family_code(family == IpFamily::V6);
        let mut old = Elements::default();
        let mut new = Elements::default();
        let mut old_names = HashSet::new();
        let mut new_names = HashSet::new();
        let mut block = String::new();
        let mut new_chains: Vec<Chain> = Vec::new();
        for name in fd.changed.iter().chain(&fd.removed) {
            if let Some(svc) = old_fam.services.get(name) {
                let parts = service_parts(&old_ctx, svc)?;
                old.merge(parts.elements);
                old_names.extend(parts.decls.iter().map(|d| d.name().to_owned()));
            }
        }
        for name in fd.changed.iter().chain(&fd.added) {
            if let Some(svc) = new_fam.services.get(name) {
                let parts = service_parts(&new_ctx, svc)?;
                new.merge(parts.elements);
                for d in parts.decls {
                    new_names.insert(d.name().to_owned());
                    match d {
                        Decl::Set(s) => {
                            w!(block, "{s}");
                            // Set declarations have no netlink encoding here.
                            nl = None;
                        }
                        Decl::Chain(c) => {
                            w!(block, "{c}");
                            new_chains.push(c);
                        }
                    }
                }
            }
        }
        let mut w = PartialWriter {
            out: &mut partial.script,
            ops: nl.as_ref().map(|_| Vec::new()),
            t,
            family: nl_family,
        };
        let ip_only = |out: &mut String, ((ip, proto, port), _): (&IpKey, &Verdict)| {
            w!(out, "{ip} . {} . {port}", proto.as_lower())
        };
        let port_only = |out: &mut String, ((proto, port), _): (&PortKey, &Verdict)| {
            w!(out, "{} . {port}", proto.as_lower())
        };
        let ip_nl = |(k, v): (&IpKey, &Verdict)| (ip_key(k), Some(nl_verdict(v)));
        let port_nl = |(k, v): (&PortKey, &Verdict)| (port_key(k), Some(nl_verdict(v)));
        let addr_nl = |ip: &IpAddr| (Key::default().ip(ip), None);
        let hairpin_nl = |ip: &IpAddr| (Key::default().ip(ip).ip(ip), None);
        let ip_maps: [MapPair<'_, IpKey>; 3] = [
            (SERVICE_IPS, &old.service_ips, &new.service_ips),
            (
                NO_ENDPOINT_SERVICES,
                &old.no_endpoint_services,
                &new.no_endpoint_services,
            ),
            (FIREWALL_IPS, &old.firewall_ips, &new.firewall_ips),
        ];
        let port_maps: [MapPair<'_, PortKey>; 2] = [
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
        let mut adds = String::new();
        let mut add = PartialWriter {
            out: &mut adds,
            ops: w.ops.as_ref().map(|_| Vec::new()),
            t,
            family: nl_family,
        };
        for (map, o, n) in ip_maps {
            let (gone, came) = map_changes(o, n);
            w.elements(true, map, &gone, ip_only, ip_nl);
            add.elements(false, map, &came, ip_elem, ip_nl);
        }
        for (map, o, n) in port_maps {
            let (gone, came) = map_changes(o, n);
            w.elements(true, map, &gone, port_only, port_nl);
            add.elements(false, map, &came, port_elem, port_nl);
        }
        // A ClusterIP is shared by the ports of one Service: it leaves the set only
        // when no port of the new state still has it.
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
        w.elements(true, CLUSTER_IPS, &gone_ips, |o, ip| w!(o, "{ip}"), addr_nl);
        let came_ips: Vec<&IpAddr> = new.cluster_ips.difference(&old.cluster_ips).collect();
        add.elements(
            false,
            CLUSTER_IPS,
            &came_ips,
            |o, ip| w!(o, "{ip}"),
            addr_nl,
        );
        // Likewise an endpoint address leaves the hairpin set only when no service
        // port of the new state still has it.
        let mut gone_hairpin: BTreeSet<&IpAddr> = old.hairpin.difference(&new.hairpin).collect();
        if !gone_hairpin.is_empty() {
            // One pass over every endpoint, without allocating (100k at 10k services).
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
        w.elements(true, HAIRPIN, &gone_hairpin, hairpin_elem, hairpin_nl);
        let came_hairpin: Vec<&IpAddr> = new.hairpin.difference(&old.hairpin).collect();
        add.elements(false, HAIRPIN, &came_hairpin, hairpin_elem, hairpin_nl);
        let add_ops = add.ops;

        let is_set = |name: &str| name.starts_with(names::AFFINITY_PREFIX);
        let mut kept: Vec<&String> = new_names
            .intersection(&old_names)
            .filter(|n| !is_set(n))
            .collect();
        kept.sort();
        for name in kept {
            w.flush_chain(name);
        }
        let mut stale: Vec<&String> = old_names.difference(&new_names).collect();
        stale.sort();
        for name in stale.iter().filter(|n| !is_set(n)) {
            w.flush_chain(name);
        }
        if !block.is_empty() {
            wl!(w.out, "table {t} {{");
            w.out.push_str(&block);
            wl!(w.out, "}}");
        }
        w.out.push_str(&adds);
        // Chains first: a stale endpoint chain is what referenced a stale affinity set.
        for name in stale.iter().filter(|n| !is_set(n)) {
            wl!(partial.stale, "delete chain {t} {name}");
        }
        for name in stale.iter().filter(|n| is_set(n)) {
            wl!(partial.stale, "delete set {t} {name}");
        }

        // The netlink form: the same operations in the same order (the chains of the
        // text block become chain adds and rule appends).
        let mut expressible = true;
        if let (Some(plan), Some(mut ops), Some(add_ops)) = (nl.as_mut(), w.ops, add_ops) {
            'chains: for chain in new_chains {
                ops.push(Op::AddChain {
                    family: nl_family,
                    chain: chain.name.clone(),
                });
                for rule in &chain.rules {
                    let Some(op) = rule.op(family, &chain.name) else {
                        expressible = false;
                        break 'chains;
                    };
                    ops.push(op);
                }
            }
            plan.ops.extend(ops);
            plan.ops.extend(add_ops);
            for name in stale.iter().filter(|n| !is_set(n)) {
                plan.stale.push(Op::DeleteChain {
                    family: nl_family,
                    chain: (*name).clone(),
                });
            }
            for name in stale.iter().filter(|n| is_set(n)) {
                plan.stale.push(Op::DeleteSet {
                    family: nl_family,
                    set: (*name).clone(),
                });
            }
        }
        if !expressible {
            nl = None;
        }
    }
    partial.netlink = nl;
    Ok(Some(partial))
}
