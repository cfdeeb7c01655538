//! Endpoint selection: how a balancing chain picks one of its endpoints.
//!
//! - Services without affinity (`concatk`, docs/nftables-scale.md): a chain of the
//!   service ends in `goto <map>-mod-N`, a chain shared by every service with N
//!   endpoints in that key space, whose one rule DNATs to the endpoint that the map
//!   holds for the packet's own destination and `numgen random mod N`. An endpoint swap
//!   is then map element operations only; a count change rewrites the `goto`. Each map
//!   is bound by one rule per count in use, not per service (the kernel checks every
//!   element against every binding). The key spaces ([`Keyed`]): ClusterIPs, external
//!   and LoadBalancer IPs by `daddr . dport`; NodePorts by `dport` (any local address);
//!   and, for eTP Local's short-circuit of node-local traffic (a different endpoint list
//!   for the same destination), both again in maps of their own.
//! - ClientIP affinity: kube-proxy's per-endpoint chains and affinity sets, chosen by
//!   `flat` balancing chains (external traffic included).

use std::collections::BTreeSet;

use svcplane_model::{IpFamily, Protocol};
use svcplane_proxy::{DataplaneError, ExternalPolicy, ServicePortState, TrafficTarget};

use super::super::names;
use super::super::rule::{Action, Chain, Rule, SetDecl, SetKind};

/// Endpoint counts that get a selection chain at every full sync, used or not, so a
/// service growing or shrinking within them never creates one (creating one binds the
/// endpoints map, which walks all its elements).
pub(super) const PRECREATED_COUNTS: u32 = 16;

/// An endpoints map's key space: what of the packet selects the endpoint list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Keyed {
    /// `daddr . dport . bucket`: ClusterIPs, externalIPs and LoadBalancer IPs.
    Addr,
    /// `dport . bucket`: NodePorts (the destination is any local address).
    NodePort,
    /// As `Addr`, for eTP Local's node-local origin (the cluster-wide list of an
    /// external address, whose `Addr` elements hold the local one).
    OriginAddr,
    /// As `NodePort`, for eTP Local's node-local origin.
    OriginNodePort,
}

impl Keyed {
    pub const ALL: [Keyed; 4] = [
        Keyed::Addr,
        Keyed::NodePort,
        Keyed::OriginAddr,
        Keyed::OriginNodePort,
    ];

    /// Whether the key starts with the destination address.
    pub fn with_addr(self) -> bool {
        matches!(self, Keyed::Addr | Keyed::OriginAddr)
    }
}

/// A selection: key space, protocol, endpoint count (one shared chain each).
pub(super) type Selection = (Keyed, Protocol, u32);

/// The endpoints map of `keyed` and `protocol`.
pub(super) fn endpoints_map(keyed: Keyed, protocol: Protocol) -> &'static str {
    use {Keyed::*, Protocol::*};
    match (keyed, protocol) {
        (Addr, Tcp) => "endpoints-tcp",
        (Addr, Udp) => "endpoints-udp",
        (Addr, Sctp) => "endpoints-sctp",
        (NodePort, Tcp) => "nodeport-endpoints-tcp",
        (NodePort, Udp) => "nodeport-endpoints-udp",
        (NodePort, Sctp) => "nodeport-endpoints-sctp",
        (OriginAddr, Tcp) => "origin-endpoints-tcp",
        (OriginAddr, Udp) => "origin-endpoints-udp",
        (OriginAddr, Sctp) => "origin-endpoints-sctp",
        (OriginNodePort, Tcp) => "origin-nodeport-endpoints-tcp",
        (OriginNodePort, Udp) => "origin-nodeport-endpoints-udp",
        (OriginNodePort, Sctp) => "origin-nodeport-endpoints-sctp",
    }
}

/// The shared chain choosing among `count` endpoints of a map.
pub(super) fn selection_chain_name((keyed, protocol, count): Selection) -> String {
    format!("{}-mod-{count}", endpoints_map(keyed, protocol))
}

/// The shared chain choosing among `count` endpoints: one `dnat … map` rule.
pub(super) fn selection_chain(family: IpFamily, sel: Selection) -> Chain {
    let (keyed, protocol, count) = sel;
    Chain::new(
        selection_chain_name(sel),
        vec![Rule::DnatMap {
            family,
            protocol,
            with_addr: keyed.with_addr(),
            modulus: count,
            map: endpoints_map(keyed, protocol),
        }],
    )
}

/// A target's endpoint indices that resolve (an out-of-range index is ignored, as
/// `ServicePortState::target_endpoints` does).
pub(super) fn resolved(svc: &ServicePortState, target: &TrafficTarget) -> Vec<usize> {
    target
        .endpoints
        .iter()
        .filter(|&i| i < svc.endpoints.len())
        .collect()
}

/// The endpoint lists a service port balances over, each only when something will
/// reference it (`None` when empty or unused).
pub(crate) struct Lists {
    /// ClusterIP traffic.
    pub internal: Option<Vec<usize>>,
    /// External traffic (externalIPs, LoadBalancer IPs, NodePort) by its policy.
    pub external: Option<Vec<usize>>,
    /// eTP Local: external addresses reached from this node or its pods.
    pub origin: Option<Vec<usize>>,
    /// Whether the policy is eTP Local (with or without an origin list).
    pub local: bool,
}

impl Lists {
    pub fn of(svc: &ServicePortState) -> Lists {
        let has_external = svc.has_external();
        let non_empty = |v: Vec<usize>| (!v.is_empty()).then_some(v);
        let (local, origin) = match &svc.external_policy {
            ExternalPolicy::Local { local_origin } => (
                true,
                has_external
                    .then(|| non_empty(resolved(svc, local_origin)))
                    .flatten(),
            ),
            ExternalPolicy::Cluster => (false, None),
        };
        Lists {
            internal: svc
                .cluster_ip
                .and_then(|_| non_empty(resolved(svc, &svc.internal))),
            external: has_external
                .then(|| non_empty(resolved(svc, &svc.external)))
                .flatten(),
            origin,
            local,
        }
    }

    /// The selections these lists use when chosen through the endpoints maps (no
    /// affinity): what [`super::elements::Elements::claim_service`] records.
    pub fn selections(&self, svc: &ServicePortState) -> impl Iterator<Item = Selection> {
        let addrs = !svc.external_ips.is_empty() || !svc.load_balancer_ips.is_empty();
        let np = svc.node_port.is_some();
        let count = |l: &Option<Vec<usize>>| l.as_ref().map(|v| v.len() as u32);
        let p = svc.protocol;
        let keyed = svc.affinity_timeout_seconds.is_none();
        [
            (Keyed::Addr, count(&self.internal)),
            (Keyed::Addr, count(&self.external).filter(|_| addrs)),
            (Keyed::NodePort, count(&self.external).filter(|_| np)),
            (Keyed::OriginAddr, count(&self.origin).filter(|_| addrs)),
            (Keyed::OriginNodePort, count(&self.origin).filter(|_| np)),
        ]
        .into_iter()
        .filter_map(move |(k, n)| n.filter(|_| keyed).map(|n| (k, p, n)))
    }
}

/// The selections a service port's chains go to (see [`Lists::selections`]).
pub(super) fn keyed_selections(svc: &ServicePortState) -> impl Iterator<Item = Selection> {
    let lists = Lists::of(svc);
    lists.selections(svc).collect::<Vec<_>>().into_iter()
}

/// A balancing chain of a service with ClientIP affinity: one choice among endpoints
/// (indices into `ServicePortState::endpoints`).
pub(super) struct Balancer {
    pub name: String,
    pub endpoints: Vec<usize>,
}

/// The chain balancing `endpoints`: an existing one with the same list, or a new one
/// named by the service and the first target kind that needs it.
pub(super) fn balancer_for(
    balancers: &mut Vec<Balancer>,
    prefix: &str,
    base: &str,
    endpoints: Vec<usize>,
) -> Result<usize, DataplaneError> {
    if let Some(i) = balancers.iter().position(|b| b.endpoints == endpoints) {
        return Ok(i);
    }
    balancers.push(Balancer {
        name: names::join(prefix, base)?,
        endpoints,
    });
    Ok(balancers.len() - 1)
}

/// Per-endpoint chain and affinity set names, only with ClientIP affinity, where the
/// chain records the client before DNAT. Without it the balancing chain DNATs
/// directly: per-endpoint chains cost the kernel a chain each and made a 10k-service
/// full sync 50x slower (docs/nftables-scale.md).
pub(super) struct Affinity {
    pub timeout_seconds: u32,
    /// By endpoint index: (chain, set), for the endpoints some balancer uses.
    names: Vec<Option<(String, String)>>,
}

impl Affinity {
    pub fn of(
        svc: &ServicePortState,
        used: &BTreeSet<usize>,
    ) -> Result<Option<Affinity>, DataplaneError> {
        let Some(timeout_seconds) = svc.affinity_timeout_seconds else {
            return Ok(None);
        };
        let mut names = vec![None; svc.endpoints.len()];
        for &i in used {
            let ep = &svc.endpoints[i];
            let ep_base = names::endpoint_base(&svc.name, ep.ip, ep.port);
            names[i] = Some((
                names::join(names::ENDPOINT_PREFIX, &ep_base)?,
                names::join(names::AFFINITY_PREFIX, &ep_base)?,
            ));
        }
        Ok(Some(Affinity {
            timeout_seconds,
            names,
        }))
    }

    fn chain(&self, i: usize) -> &str {
        self.names[i].as_ref().map_or("", |(c, _)| c.as_str())
    }

    fn set(&self, i: usize) -> &str {
        self.names[i].as_ref().map_or("", |(_, s)| s.as_str())
    }

    /// One set per used endpoint, recording the client IPs stuck to it.
    pub fn sets(&self, family: IpFamily, used: &BTreeSet<usize>) -> Vec<SetDecl> {
        used.iter()
            .map(|&i| SetDecl {
                name: self.set(i).to_owned(),
                kind: SetKind::Addrs(family),
                flags: Some("dynamic,timeout"),
                timeout_seconds: Some(self.timeout_seconds),
                comment: None,
            })
            .collect()
    }

    /// The endpoint chains: record the client, then DNAT.
    pub fn endpoint_chains(
        &self,
        family: IpFamily,
        svc: &ServicePortState,
        used: &BTreeSet<usize>,
    ) -> Vec<Chain> {
        used.iter()
            .map(|&i| {
                let ep = &svc.endpoints[i];
                Chain::new(
                    self.chain(i),
                    vec![
                        Rule::AffinityUpdate {
                            family,
                            set: self.set(i).to_owned(),
                        },
                        Rule::Dnat {
                            protocol: svc.protocol,
                            addr: ep.ip,
                            port: ep.port,
                        },
                    ],
                )
            })
            .collect()
    }
}

/// The rules choosing an endpoint of `b` (appended after any masquerade mark): a
/// sticky client goes back to its endpoint; others pick one at random.
pub(super) fn affinity_rules(family: IpFamily, b: &Balancer, a: &Affinity) -> Vec<Rule> {
    b.endpoints
        .iter()
        .map(|&i| Rule::AffinityGoto {
            family,
            set: a.set(i).to_owned(),
            chain: a.chain(i).to_owned(),
        })
        .chain(std::iter::once(Rule::NumgenVmap {
            chains: b.endpoints.iter().map(|&i| a.chain(i).to_owned()).collect(),
        }))
        .collect()
}

/// `goto` the shared selection chain of `sel`.
pub(super) fn goto_selection(sel: Selection) -> Rule {
    Rule::Always {
        ct_new: false,
        action: Action::Goto(selection_chain_name(sel)),
    }
}
