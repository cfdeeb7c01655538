//! A [`FamilyTable`] as netlink operations: the full transaction of [`super::spell_family`],
//! step by step in the same order, built from the same values (the netlink transport
//! of a full sync; the text stays for `render`, as the fallback and as the oracle).

use svcplane_model::IpFamily;

use super::super::netlink::{Elem, Field, Key, Op, SetData, SetSpec, family_code, intervals};
use super::super::rule::{Chain, SetDecl, SetKind};
use super::elements::endpoint_maps;
use super::partial::{endpoint_key, endpoint_value, ip_key, nl_verdict, port_key};
use super::select::endpoints_map;
use super::{
    CLUSTER_IPS, Decl, FIREWALL_IPS, FamilyTable, HAIRPIN, NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES, NODEPORT_IPS, SERVICE_IPS, SERVICE_NODEPORTS,
};

/// The operations of `ft`'s full transaction, handed to `ops` one by one; `None` when
/// something in it has no netlink encoding (then the text transaction is sent instead,
/// and what `ops` got is dropped).
pub(crate) fn family_ops(ft: &FamilyTable, ops: &mut impl FnMut(Op)) -> Option<()> {
    let family = family_code(ft.family == IpFamily::V6);
    // 1-3: the table (kept), emptied of rules; base chains re-created; shared sets and
    // maps declared and flushed (or deleted).
    ops(Op::AddTable {
        family,
        comment: Some("rules for svcplane".to_owned()),
    });
    ops(Op::FlushTable { family });
    for bc in &ft.base_chains {
        let chain = bc.name.clone();
        ops(Op::AddChain {
            family,
            chain: chain.clone(),
        });
        ops(Op::DeleteChain { family, chain });
    }
    for s in &ft.shared {
        ops(Op::AddSet {
            family,
            spec: set_spec(&s.decl)?,
        });
        let set = s.decl.name.clone();
        ops(if s.absent {
            Op::DeleteSet { family, set }
        } else {
            Op::FlushSet { family, set }
        });
    }
    // 4: the block, as nft sends a `table { }` block: its chains, then its sets, then
    // the rules chain by chain (so every rule finds what it names).
    let chains: Vec<&Chain> = ft
        .base_chains
        .iter()
        .chain(ft.block.iter().filter_map(|d| match d {
            Decl::Chain(c) => Some(c),
            Decl::Set(_) => None,
        }))
        .collect();
    for c in &chains {
        ops(match &c.hook {
            Some(h) => Op::AddBaseChain {
                family,
                chain: c.name.clone(),
                kind: h.kind,
                hook: super::super::netlink::Hook::named(h.hook)?,
                priority: h.priority,
            },
            None => Op::AddChain {
                family,
                chain: c.name.clone(),
            },
        });
    }
    for d in &ft.block {
        if let Decl::Set(s) = d {
            ops(Op::AddSet {
                family,
                spec: set_spec(s)?,
            });
        }
    }
    for c in &chains {
        for rule in &c.rules {
            ops(rule.op(ft.family, &c.name)?);
        }
    }
    // 5: the elements, after everything they name exists.
    let e = &ft.elements;
    let mut add = |set: &str, elems: Vec<Elem>| {
        if !elems.is_empty() {
            ops(Op::AddElements {
                family,
                set: set.to_owned(),
                elems,
            });
        }
    };
    add(NODEPORT_IPS, intervals(&ft.nodeport_nets, false));
    add(
        CLUSTER_IPS,
        e.cluster_ips
            .iter()
            .map(|ip| Elem::key(Key::default().ip(ip)))
            .collect(),
    );
    add(
        HAIRPIN,
        e.hairpin
            .iter()
            .map(|ip| Elem::key(Key::default().ip(ip).ip(ip)))
            .collect(),
    );
    let ip_elems = |m: &std::collections::BTreeMap<_, _>| -> Vec<Elem> {
        m.iter()
            .map(|(k, v)| Elem::verdict(ip_key(k), nl_verdict(v)))
            .collect()
    };
    let port_elems = |m: &std::collections::BTreeMap<_, _>| -> Vec<Elem> {
        m.iter()
            .map(|(k, v)| Elem::verdict(port_key(k), nl_verdict(v)))
            .collect()
    };
    add(NO_ENDPOINT_SERVICES, ip_elems(&e.no_endpoint_services));
    add(NO_ENDPOINT_NODEPORTS, port_elems(&e.no_endpoint_nodeports));
    add(FIREWALL_IPS, ip_elems(&e.firewall_ips));
    add(SERVICE_IPS, ip_elems(&e.service_ips));
    add(SERVICE_NODEPORTS, port_elems(&e.service_nodeports));
    for (k, p) in endpoint_maps() {
        add(
            endpoints_map(k, p),
            e.endpoints_of(k, p)
                .map(|(key, value)| Elem::value(endpoint_key(key), endpoint_value(value)))
                .collect(),
        );
    }
    Some(())
}

/// A declaration's netlink form. `None` for a flag it does not know.
pub(super) fn set_spec(decl: &SetDecl) -> Option<SetSpec> {
    let addr = |fam: IpFamily| Field::Addr {
        v6: fam == IpFamily::V6,
    };
    let (key, data) = match decl.kind {
        SetKind::Addrs(fam) => (vec![addr(fam)], None),
        SetKind::AddrPairs(fam) => (vec![addr(fam), addr(fam)], None),
        SetKind::AddrProtoPortVerdicts(fam) => (
            vec![addr(fam), Field::Proto, Field::Service],
            Some(SetData::Verdict),
        ),
        SetKind::ProtoPortVerdicts => (vec![Field::Proto, Field::Service], Some(SetData::Verdict)),
        SetKind::Endpoints {
            family,
            protocol,
            with_addr,
        } => {
            let daddr = Field::TypeofAddr {
                v6: family == IpFamily::V6,
                source: false,
            };
            let dport = Field::TypeofDport(Some(protocol));
            let key = if with_addr {
                vec![daddr, dport, Field::TypeofNumgen]
            } else {
                vec![dport, Field::TypeofNumgen]
            };
            (key, Some(SetData::Fields(vec![daddr, dport])))
        }
    };
    let (interval, timeout) = match (decl.flags, decl.timeout_seconds) {
        (None, None) => (false, None),
        (Some("interval"), None) => (true, None),
        (Some("dynamic,timeout"), Some(t)) => (false, Some(u64::from(t))),
        _ => return None,
    };
    Some(SetSpec {
        name: decl.name.clone(),
        key,
        data,
        interval,
        timeout_secs: timeout,
        comment: decl.comment.map(str::to_owned),
    })
}
