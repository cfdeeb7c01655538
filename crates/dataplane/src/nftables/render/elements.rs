//! Set and map elements: what each service port puts into the shared sets and dispatch
//! maps, and their spelling as `add element` / `delete element` statements.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use svcplane_model::{IpFamily, Protocol, ServicePortName};
use svcplane_proxy::ServicePortState;

use super::base::PROTOCOLS;
use super::select::endpoints_map;
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
/// An endpoints map key (the map is per protocol): service address, port, bucket.
pub(super) type EndpointKey = (Protocol, IpAddr, u16, u32);
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
    /// The selection chains the services use: (protocol, endpoint count).
    pub selection_chains: BTreeSet<(Protocol, u32)>,
}

fn claim<K: Ord + fmt::Debug, V: PartialEq>(
    map: &mut BTreeMap<K, V>,
    map_name: &str,
    key: K,
    value: V,
    owner: &ServicePortName,
) {
    match map.entry(key) {
        std::collections::btree_map::Entry::Vacant(e) => {
            e.insert(value);
        }
        std::collections::btree_map::Entry::Occupied(e) => {
            if *e.get() != value {
                tracing::warn!(
                    map = map_name,
                    key = ?e.key(),
                    service = %owner,
                    "key already used by another service port; keeping the first"
                );
            }
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
        if let Some(cip) = svc.cluster_ip {
            self.cluster_ips.insert(cip);
            if let Some(eps) = &targets.internal_keyed {
                let count = eps.len() as u32;
                self.selection_chains.insert((protocol, count));
                // The first service port to claim the address and port keeps all its
                // buckets (as it keeps the service-ips element).
                if !self.endpoints.contains_key(&(protocol, cip, port, 0)) {
                    for (bucket, &i) in (0..count).zip(eps) {
                        let ep = &svc.endpoints[i];
                        self.endpoints
                            .insert((protocol, cip, port, bucket), (ep.ip, ep.port));
                    }
                }
            }
            match &targets.internal {
                Some(chain) => claim(
                    &mut self.service_ips,
                    SERVICE_IPS,
                    (cip, protocol, port),
                    Verdict::Goto(chain.clone()),
                    name,
                ),
                None => claim(
                    &mut self.no_endpoint_services,
                    NO_ENDPOINT_SERVICES,
                    (cip, protocol, port),
                    filter::no_endpoint_verdict(svc.internal.if_empty),
                    name,
                ),
            }
        }
        for &ip in svc.external_ips.iter().chain(&svc.load_balancer_ips) {
            if let Some(ext) = &targets.external {
                claim(
                    &mut self.service_ips,
                    SERVICE_IPS,
                    (ip, protocol, port),
                    Verdict::Goto(ext.clone()),
                    name,
                );
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
            if let Some(ext) = &targets.external {
                claim(
                    &mut self.service_nodeports,
                    SERVICE_NODEPORTS,
                    (protocol, node_port),
                    Verdict::Goto(ext.clone()),
                    name,
                );
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

pub(super) fn endpoint_elem(
    out: &mut String,
    ((_, ip, port, bucket), (ep, ep_port)): (&EndpointKey, &EndpointValue),
) {
    w!(out, "{ip} . {port} . {bucket} : {ep} . {ep_port}")
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
    for p in PROTOCOLS {
        element_op(
            out,
            "add",
            t,
            endpoints_map(p),
            e.endpoints_of(p),
            endpoint_elem,
        );
    }
}

impl Elements {
    /// The elements of `protocol`'s endpoints map.
    pub fn endpoints_of(
        &self,
        protocol: Protocol,
    ) -> impl Iterator<Item = (&EndpointKey, &EndpointValue)> {
        let from = (protocol, IpAddr::from([0u8; 4]), 0, 0);
        self.endpoints
            .range(from..)
            .take_while(move |((p, ..), _)| *p == protocol)
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
