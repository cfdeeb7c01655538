//! Endpoint selection: how a balancing chain picks one of its endpoints, and the
//! per-endpoint chains and affinity sets of ClientIP-affinity services.

use std::collections::BTreeSet;

use svcplane_model::IpFamily;
use svcplane_proxy::{DataplaneError, ServicePortState};

use super::super::names;
use super::super::rule::{Chain, Rule, SetDecl};
use super::addr_type;

/// A balancing chain: one choice among endpoints (indices into
/// `ServicePortState::endpoints`).
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
                map: false,
                ty: addr_type(family).to_owned(),
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
        // --probability` chain. (`numgen random mod k vmap` would need an anonymous set
        // per service, which the kernel allocates in quadratic time.)
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
