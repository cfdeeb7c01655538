//! Set and map elements: what each service port puts into the shared sets and dispatch
//! maps, and their spelling as `add element` / `delete element` statements.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use svcplane_model::{IpFamily, Protocol, ServicePortName};
use svcplane_proxy::ServicePortState;

use super::base::PROTOCOLS;
use super::select::{Keyed, Selection, endpoints_map};
use super::service::Targets;
use super::{
    CLUSTER_IPS, FIREWALL_IPS, FamilyTable, HAIRPIN, NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES,
    NODEPORT_IPS, REJECT_CHAIN, SERVICE_IPS, SERVICE_NODEPORTS, filter, w, wl,
};

/// The value of a verdict-map element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Goto(String),
    Drop,
    Reject,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Goto(chain) => write!(f, "goto {chain}"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Reject => write!(f, "goto {REJECT_CHAIN}"),
        }
    }
}

pub(super) type IpKey = (IpAddr, Protocol, u16);
/// An endpoints map key (the map is per key space and protocol): service address (not
/// for NodePorts), port, bucket.
pub(super) type EndpointKey = (Keyed, Protocol, Option<IpAddr>, u16, u32);
/// An endpoints map value: endpoint address and port.
pub(super) type EndpointValue = (IpAddr, u16);
pub(super) type PortKey = (Protocol, u16);

/// Map and set elements of one family, sorted by key. The first service (in sorted
/// order) to claim a key keeps it, so a conflict between two services is rendered the
/// same way every time instead of failing the whole transaction.
#[derive(Default)]
pub(crate) struct Elements {
    pub cluster_ips: BTreeSet<IpAddr>,
    /// Endpoint addresses: a DNATed connection from one to itself is masqueraded.
    pub hairpin: BTreeSet<IpAddr>,
    pub service_ips: BTreeMap<IpKey, Verdict>,
    pub no_endpoint_services: BTreeMap<IpKey, Verdict>,
    pub firewall_ips: BTreeMap<IpKey, Verdict>,
    pub service_nodeports: BTreeMap<PortKey, Verdict>,
    pub no_endpoint_nodeports: BTreeMap<PortKey, Verdict>,
    /// The endpoints maps (see `select`).
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    /// The selection chains the services use.
    pub selection_chains: BTreeSet<Selection>,
}

/// Whether `owner` holds `key` afterwards (it was free, or holds the same value).
fn claim<K: Ord + fmt::Debug, V: PartialEq>(
    map: &mut BTreeMap<K, V>,
    map_name: &str,
    key: K,
    value: V,
    owner: &ServicePortName,
) -> bool {
    match map.entry(key) {
        std::collections::btree_map::Entry::Vacant(e) => {
            e.insert(value);
            true
        }
        std::collections::btree_map::Entry::Occupied(e) => {
            let same = *e.get() == value;
            if !same {
                tracing::warn!(
                    map = map_name,
                    key = ?e.key(),
                    service = %owner,
                    "key already used by another service port; keeping the first"
                );
            }
            same
        }
    }
}

/// The hairpin set's addresses `svc` has, one per endpoint: every endpoint address of
/// `family` (used or not), so the set depends on the endpoint lists alone, which a
/// partial sync can check cheaply (see `refs::AddrRefs`).
pub(crate) fn hairpin_users(
    family: IpFamily,
    svc: &ServicePortState,
) -> impl Iterator<Item = IpAddr> {
    svc.endpoints
        .iter()
        .map(|ep| ep.ip)
        .filter(move |ip| IpFamily::of(ip) == family)
}

impl Elements {
    /// The elements of `svc`, whose chains are `targets`.
    pub fn claim_service(&mut self, family: IpFamily, svc: &ServicePortState, targets: &Targets) {
        self.hairpin.extend(hairpin_users(family, svc));
        let name = &svc.name;
        let (protocol, port) = (svc.protocol, svc.port);
        let keyed = targets.keyed.as_ref();
        if let Some(lists) = keyed {
            self.selection_chains.extend(lists.selections(svc));
        }
        // The endpoints map elements of a key: only for the service port that holds
        // its dispatch element, so the two always belong together.
        let mut buckets =
            |keyed: Keyed, addr: Option<IpAddr>, port: u16, list: Option<&Vec<usize>>| {
                for (bucket, &i) in (0u32..).zip(list.into_iter().flatten()) {
                    let ep = &svc.endpoints[i];
                    self.endpoints
                        .insert((keyed, protocol, addr, port, bucket), (ep.ip, ep.port));
                }
            };
        if let Some(cip) = svc.cluster_ip {
            self.cluster_ips.insert(cip);
            match &targets.internal {
                Some(chain) => {
                    if claim(
                        &mut self.service_ips,
                        SERVICE_IPS,
                        (cip, protocol, port),
                        Verdict::Goto(chain.clone()),
                        name,
                    ) {
                        buckets(
                            Keyed::Addr,
                            Some(cip),
                            port,
                            keyed.and_then(|l| l.internal.as_ref()),
                        );
                    }
                }
                None => {
                    claim(
                        &mut self.no_endpoint_services,
                        NO_ENDPOINT_SERVICES,
                        (cip, protocol, port),
                        filter::no_endpoint_verdict(svc.internal.if_empty),
                        name,
                    );
                }
            }
        }
        for &ip in svc.external_ips.iter().chain(&svc.load_balancer_ips) {
            if let Some(ext) = &targets.external
                && claim(
                    &mut self.service_ips,
                    SERVICE_IPS,
                    (ip, protocol, port),
                    Verdict::Goto(ext.clone()),
                    name,
                )
                && let Some(l) = keyed
            {
                buckets(Keyed::Addr, Some(ip), port, l.external.as_ref());
                buckets(Keyed::OriginAddr, Some(ip), port, l.origin.as_ref());
            }
            if targets.external_empty {
                claim(
                    &mut self.no_endpoint_services,
                    NO_ENDPOINT_SERVICES,
                    (ip, protocol, port),
                    filter::no_endpoint_verdict(svc.external.if_empty),
                    name,
                );
            }
        }
        if let Some(fw) = &targets.firewall {
            for &ip in &svc.load_balancer_ips {
                claim(
                    &mut self.firewall_ips,
                    FIREWALL_IPS,
                    (ip, protocol, port),
                    Verdict::Goto(fw.clone()),
                    name,
                );
            }
        }
        if let Some(node_port) = svc.node_port {
            if let Some(chain) = &targets.node_port
                && claim(
                    &mut self.service_nodeports,
                    SERVICE_NODEPORTS,
                    (protocol, node_port),
                    Verdict::Goto(chain.clone()),
                    name,
                )
                && let Some(l) = keyed
            {
                buckets(Keyed::NodePort, None, node_port, l.external.as_ref());
                buckets(Keyed::OriginNodePort, None, node_port, l.origin.as_ref());
            }
            if targets.external_empty {
                claim(
                    &mut self.no_endpoint_nodeports,
                    NO_ENDPOINT_NODEPORTS,
                    (protocol, node_port),
                    filter::no_endpoint_verdict(svc.external.if_empty),
                    name,
                );
            }
        }
    }

    /// Adds `from`'s elements, keeping the first claim of a key.
    pub fn merge(&mut self, from: Elements) {
        self.cluster_ips.extend(from.cluster_ips);
        self.hairpin.extend(from.hairpin);
        self.selection_chains.extend(from.selection_chains);
        for (k, v) in from.endpoints {
            self.endpoints.entry(k).or_insert(v);
        }
        for (into, from) in [
            (&mut self.service_ips, from.service_ips),
            (&mut self.no_endpoint_services, from.no_endpoint_services),
            (&mut self.firewall_ips, from.firewall_ips),
        ] {
            for (k, v) in from {
                into.entry(k).or_insert(v);
            }
        }
        for (into, from) in [
            (&mut self.service_nodeports, from.service_nodeports),
            (&mut self.no_endpoint_nodeports, from.no_endpoint_nodeports),
        ] {
            for (k, v) in from {
                into.entry(k).or_insert(v);
            }
        }
    }
}

pub(super) fn ip_elem(out: &mut String, ((ip, proto, port), v): (&IpKey, &Verdict)) {
    w!(out, "{ip} . {} . {port} : {v}", proto.as_lower())
}

pub(super) fn port_elem(out: &mut String, ((proto, port), v): (&PortKey, &Verdict)) {
    w!(out, "{} . {port} : {v}", proto.as_lower())
}

/// An endpoints map key as nft spells it.
pub(super) fn endpoint_key(out: &mut String, (_, _, ip, port, bucket): &EndpointKey) {
    if let Some(ip) = ip {
        w!(out, "{ip} . ");
    }
    w!(out, "{port} . {bucket}")
}

pub(super) fn endpoint_elem(
    out: &mut String,
    (key, (ep, ep_port)): (&EndpointKey, &EndpointValue),
) {
    endpoint_key(out, key);
    w!(out, " : {ep} . {ep_port}")
}

pub(super) fn hairpin_elem(out: &mut String, ip: &IpAddr) {
    w!(out, "{ip} . {ip}")
}

/// Step 5 of the full transaction: every element, after every chain they name exists.
/// `t`: `<family> <table>`, as every element statement names it.
pub(super) fn spell(out: &mut String, t: &str, ft: &FamilyTable) {
    let e = &ft.elements;
    element_op(
        out,
        "add",
        t,
        NODEPORT_IPS,
        ft.nodeport_nets.iter(),
        |out, net| w!(out, "{net}"),
    );
    element_op(
        out,
        "add",
        t,
        CLUSTER_IPS,
        e.cluster_ips.iter(),
        |out, ip| w!(out, "{ip}"),
    );
    element_op(out, "add", t, HAIRPIN, e.hairpin.iter(), hairpin_elem);
    element_op(
        out,
        "add",
        t,
        NO_ENDPOINT_SERVICES,
        e.no_endpoint_services.iter(),
        ip_elem,
    );
    element_op(
        out,
        "add",
        t,
        NO_ENDPOINT_NODEPORTS,
        e.no_endpoint_nodeports.iter(),
        port_elem,
    );
    element_op(out, "add", t, FIREWALL_IPS, e.firewall_ips.iter(), ip_elem);
    element_op(out, "add", t, SERVICE_IPS, e.service_ips.iter(), ip_elem);
    element_op(
        out,
        "add",
        t,
        SERVICE_NODEPORTS,
        e.service_nodeports.iter(),
        port_elem,
    );
    for (k, p) in endpoint_maps() {
        element_op(
            out,
            "add",
            t,
            endpoints_map(k, p),
            e.endpoints_of(k, p),
            endpoint_elem,
        );
    }
}

/// Every endpoints map: (key space, protocol).
pub(super) fn endpoint_maps() -> impl Iterator<Item = (Keyed, Protocol)> {
    Keyed::ALL
        .into_iter()
        .flat_map(|k| PROTOCOLS.into_iter().map(move |p| (k, p)))
}

impl Elements {
    /// The elements of the endpoints map of `keyed` and `protocol`.
    pub fn endpoints_of(
        &self,
        keyed: Keyed,
        protocol: Protocol,
    ) -> impl Iterator<Item = (&EndpointKey, &EndpointValue)> {
        self.endpoints
            .range((keyed, protocol, None, 0, 0)..)
            .take_while(move |((k, p, ..), _)| (*k, *p) == (keyed, protocol))
    }
}

/// `<verb> element <t> <name> { … }` (`add` or `delete`), one element a line; nothing
/// when empty (nft rejects `{ }`).
pub(super) fn element_op<I, T>(
    out: &mut String,
    verb: &str,
    t: &str,
    name: &str,
    items: I,
    mut each: impl FnMut(&mut String, T),
) where
    I: Iterator<Item = T>,
{
    let mut first = true;
    for item in items {
        if first {
            wl!(out, "{verb} element {t} {name} {{");
            first = false;
        } else {
            out.push_str(",\n");
        }
        out.push('\t');
        each(out, item);
    }
    if !first {
        out.push_str("\n}\n");
    }
}
