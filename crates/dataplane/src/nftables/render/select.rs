//! Endpoint selection: how a balancing chain picks one of its endpoints.
//!
//! - ClusterIP traffic of a service without affinity (`concatk`, docs/nftables-scale.md):
//!   the service chain ends in `goto endpoints-<proto>-mod-N`, a chain shared by every
//!   service with N endpoints, whose one rule DNATs to the endpoint that the map
//!   `endpoints-<proto>` holds for `daddr . dport . numgen random mod N`. An endpoint
//!   swap is then map element operations only; a count change rewrites the service
//!   chain's `goto`. The map is bound by one rule per count in use, not per service
//!   (the kernel checks every element against every binding).
//! - Other traffic (external, eTP Local paths), without affinity: `flat` rules in the
//!   balancing chain, `numgen random mod (k-n) == 0 … dnat` per endpoint.
//! - ClientIP affinity: kube-proxy's per-endpoint chains and affinity sets.

use std::collections::BTreeSet;

use svcplane_model::{IpFamily, Protocol};
use svcplane_proxy::{DataplaneError, ServicePortState};

use super::super::names;
use super::super::rule::{Action, Chain, Rule, SetDecl, SetKind};

/// Endpoint counts that get a selection chain at every full sync, used or not, so a
/// service growing or shrinking within them never creates one (creating one binds the
/// endpoints map, which walks all its elements).
pub(super) const PRECREATED_COUNTS: u32 = 16;

/// The endpoints map of `protocol`.
pub(super) fn endpoints_map(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "endpoints-tcp",
        Protocol::Udp => "endpoints-udp",
        Protocol::Sctp => "endpoints-sctp",
    }
}

/// The shared chain choosing among `count` endpoints of `protocol`.
pub(super) fn selection_chain_name(protocol: Protocol, count: u32) -> String {
    format!("endpoints-{}-mod-{count}", protocol.as_lower())
}

/// The shared chain choosing among `count` endpoints: one `dnat … map` rule.
pub(super) fn selection_chain(family: IpFamily, protocol: Protocol, count: u32) -> Chain {
    Chain::new(
        selection_chain_name(protocol, count),
        vec![Rule::DnatMap {
            family,
            protocol,
            modulus: count,
            map: endpoints_map(protocol),
        }],
    )
}

/// The selection chain a service port's ClusterIP traffic uses, if it chooses through
/// the endpoints map: (protocol, endpoint count). Services with ClientIP affinity keep
/// their per-endpoint chains (their `update @affinity-…` rule comes before DNAT).
pub(super) fn keyed_selection(svc: &ServicePortState) -> Option<(Protocol, u32)> {
    if svc.cluster_ip.is_none() || svc.affinity_timeout_seconds.is_some() {
        return None;
    }
    let n = svc
        .internal
        .endpoints
        .iter()
        .filter(|&&i| i < svc.endpoints.len())
        .count();
    (n > 0).then_some((svc.protocol, n as u32))
}

/// A balancing chain: one choice among endpoints (indices into
/// `ServicePortState::endpoints`).
pub(super) struct Balancer {
    pub name: String,
    pub endpoints: Vec<usize>,
    /// Chooses through the endpoints map, keyed by the packet's destination (so only
    /// traffic to the service's ClusterIP may use it).
    pub keyed: bool,
}

/// The chain balancing `endpoints`: an existing one with the same list (never a keyed
/// one, nor when `keyed`), or a new one named by the service and the first target kind
/// that needs it.
pub(super) fn balancer_for(
    balancers: &mut Vec<Balancer>,
    prefix: &str,
    base: &str,
    endpoints: Vec<usize>,
    keyed: bool,
) -> Result<usize, DataplaneError> {
    if !keyed
        && let Some(i) = balancers
            .iter()
            .position(|b| !b.keyed && b.endpoints == endpoints)
    {
        return Ok(i);
    }
    balancers.push(Balancer {
        name: names::join(prefix, base)?,
        endpoints,
        keyed,
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
                            one_in: None,
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

/// The rules choosing an endpoint of `b` (appended after any masquerade mark).
pub(super) fn selection_rules(
    family: IpFamily,
    svc: &ServicePortState,
    b: &Balancer,
    affinity: Option<&Affinity>,
) -> Vec<Rule> {
    if b.keyed {
        return vec![Rule::Always {
            ct_new: false,
            action: Action::Goto(selection_chain_name(svc.protocol, b.endpoints.len() as u32)),
        }];
    }
    match affinity {
        // A sticky client goes back to its endpoint; others pick one at random.
        Some(a) => b
            .endpoints
            .iter()
            .map(|&i| Rule::AffinityGoto {
                family,
                set: a.set(i).to_owned(),
                chain: a.chain(i).to_owned(),
            })
            .chain(std::iter::once(Rule::NumgenVmap {
                chains: b.endpoints.iter().map(|&i| a.chain(i).to_owned()).collect(),
            }))
            .collect(),
        // Endpoint n of k is taken with probability 1/(k-n) when the earlier ones were
        // not: each equally likely, as kube-proxy's iptables mode's `statistic
        // --probability` chain.
        None => {
            let k = b.endpoints.len();
            b.endpoints
                .iter()
                .enumerate()
                .map(|(n, &i)| {
                    let ep = &svc.endpoints[i];
                    Rule::Dnat {
                        one_in: (n + 1 < k).then(|| (k - n) as u32),
                        protocol: svc.protocol,
                        addr: ep.ip,
                        port: ep.port,
                    }
                })
                .collect()
        }
    }
}
