//! One service port's chains: which balancing chains it needs (internal, external
//! policy, local origin), the external chain that routes external traffic to them,
//! and its firewall chain; their names go into the dispatch maps (see `elements`).

use std::collections::BTreeSet;
use std::net::IpAddr;

use svcplane_model::IpFamily;
use svcplane_proxy::{DataplaneError, ExternalPolicy, ServicePortState, TrafficTarget};

use super::super::names;
use super::super::rule::{Action, Chain, Rule};
use super::select::{self, Affinity, Balancer};
use super::{Decl, FamilyCtx, MARK_MASQ, filter};

/// The chains a service port's map elements point at.
pub(crate) struct Targets {
    /// The balancing chain of internal (ClusterIP) traffic; `None`: no endpoints.
    pub internal: Option<String>,
    /// Its endpoints by bucket, when it chooses through the endpoints map.
    pub internal_keyed: Option<Vec<usize>>,
    /// kube-proxy's EXT chain, when external traffic can reach any endpoint.
    pub external: Option<String>,
    /// External traffic has no endpoint (what the short-circuits do not take is
    /// dropped or rejected by the filter chains).
    pub external_empty: bool,
    /// The source-range firewall chain.
    pub firewall: Option<String>,
}

/// A service port's declarations (in block order) and its map targets.
pub(super) struct Rendered {
    pub decls: Vec<Decl>,
    pub targets: Targets,
}

/// A target's endpoint indices that resolve (an out-of-range index is ignored, as
/// `ServicePortState::target_endpoints` does).
fn resolved(svc: &ServicePortState, target: &TrafficTarget) -> Vec<usize> {
    target
        .endpoints
        .iter()
        .copied()
        .filter(|&i| i < svc.endpoints.len())
        .collect()
}

fn wrong_family(
    svc: &ServicePortState,
    what: &str,
    ip: &IpAddr,
    family: IpFamily,
) -> DataplaneError {
    DataplaneError::Other(format!(
        "service port {}: {what} {ip} is not {family} but is in the {family} state",
        svc.name
    ))
}

/// Addresses of another family would make nft reject the whole transaction.
fn check_families(svc: &ServicePortState, family: IpFamily) -> Result<(), DataplaneError> {
    for ip in svc.cluster_ip.iter() {
        if IpFamily::of(ip) != family {
            return Err(wrong_family(svc, "ClusterIP", ip, family));
        }
    }
    for ip in svc.external_ips.iter().chain(&svc.load_balancer_ips) {
        if IpFamily::of(ip) != family {
            return Err(wrong_family(svc, "external address", ip, family));
        }
    }
    Ok(())
}

/// The service port's sets and chains, and where its map elements point.
pub(super) fn render(ctx: &FamilyCtx, svc: &ServicePortState) -> Result<Rendered, DataplaneError> {
    let family = ctx.family;
    check_families(svc, family)?;
    let base = names::service_base(&svc.name)?;

    let internal = resolved(svc, &svc.internal);
    let external = resolved(svc, &svc.external);
    let local_origin = match &svc.external_policy {
        ExternalPolicy::Local { local_origin } => Some(resolved(svc, local_origin)),
        ExternalPolicy::Cluster => None,
    };
    let has_external = svc.has_external();

    // Balancing chains, only for targets something will reference.
    let mut balancers: Vec<Balancer> = Vec::with_capacity(3);
    let internal_chain = match svc.cluster_ip {
        Some(_) if !internal.is_empty() => Some(select::balancer_for(
            &mut balancers,
            names::SERVICE_PREFIX,
            &base,
            internal,
            select::keyed_selection(svc).is_some(),
        )?),
        _ => None,
    };
    let origin_chain = match &local_origin {
        Some(eps) if has_external && !eps.is_empty() => Some(select::balancer_for(
            &mut balancers,
            names::CLUSTER_PREFIX,
            &base,
            eps.clone(),
            false,
        )?),
        _ => None,
    };
    let external_policy_chain = if has_external && !external.is_empty() {
        Some(select::balancer_for(
            &mut balancers,
            names::EXTERNAL_POLICY_PREFIX,
            &base,
            external,
            false,
        )?)
    } else {
        None
    };
    // kube-proxy's EXT chain: needed when external traffic can reach any endpoint,
    // including only through the eTP Local short-circuits.
    let external_chain = if external_policy_chain.is_some() || origin_chain.is_some() {
        Some(names::join(names::EXTERNAL_PREFIX, &base)?)
    } else {
        None
    };

    // The endpoints some balancing chain uses.
    let used: BTreeSet<usize> = balancers
        .iter()
        .flat_map(|b| b.endpoints.iter().copied())
        .collect();
    for &i in &used {
        let ep = &svc.endpoints[i];
        if IpFamily::of(&ep.ip) != family {
            return Err(wrong_family(svc, "endpoint", &ep.ip, family));
        }
    }
    let affinity = Affinity::of(svc, &used)?;

    let mut decls = Vec::with_capacity(balancers.len() + 2);
    if let Some(a) = &affinity {
        decls.extend(a.sets(family, &used).into_iter().map(Decl::Set));
    }
    for (bi, b) in balancers.iter().enumerate() {
        let mut rules = Vec::with_capacity(b.endpoints.len() + 1);
        // Qualified by the ClusterIP: the chain may also balance external traffic.
        if Some(bi) == internal_chain
            && let Some(cip) = svc.cluster_ip
            && let Some(mark) = ctx.masquerade.cluster_ip_rule(cip, svc.protocol, svc.port)
        {
            rules.push(mark);
        }
        rules.extend(select::selection_rules(family, svc, b, affinity.as_ref()));
        decls.push(Decl::Chain(Chain::new(b.name.clone(), rules)));
    }
    if let Some(ext) = &external_chain {
        let rules = external_rules(
            ctx,
            local_origin.is_some(),
            origin_chain.map(|i| balancers[i].name.as_str()),
            external_policy_chain.map(|i| balancers[i].name.as_str()),
        );
        decls.push(Decl::Chain(Chain::new(ext.clone(), rules)));
    }
    let firewall = filter::firewall_chain(family, svc, &base)?;
    let firewall_name = firewall.as_ref().map(|c| c.name.clone());
    decls.extend(firewall.map(Decl::Chain));
    if let Some(a) = &affinity {
        decls.extend(
            a.endpoint_chains(family, svc, &used)
                .into_iter()
                .map(Decl::Chain),
        );
    }

    Ok(Rendered {
        decls,
        targets: Targets {
            internal: internal_chain.map(|i| balancers[i].name.clone()),
            internal_keyed: internal_chain
                .filter(|&i| balancers[i].keyed)
                .map(|i| balancers[i].endpoints.clone()),
            external: external_chain,
            external_empty: external_policy_chain.is_none(),
            firewall: firewall_name,
        },
    })
}

/// The external chain: eTP Cluster masquerades (the endpoint may be on another node);
/// eTP Local short-circuits traffic that never left this node (`origin`: its chain,
/// or drop when it has no endpoint: `reject` is not allowed in a nat chain), then
/// balances over the local endpoints (`policy`).
fn external_rules(
    ctx: &FamilyCtx,
    local: bool,
    origin: Option<&str>,
    policy: Option<&str>,
) -> Vec<Rule> {
    let mut rules = Vec::with_capacity(4);
    if !local {
        rules.push(Rule::Always {
            ct_new: false,
            action: Action::Jump(MARK_MASQ.to_owned()),
        });
    } else {
        let origin = origin.map_or(Action::Drop, |c| Action::Goto(c.to_owned()));
        if !ctx.cluster_cidrs.is_empty() {
            rules.push(Rule::FromNets {
                family: ctx.family,
                nets: ctx.cluster_cidrs.clone(),
                action: origin.clone(),
                comment: "short-circuit pod traffic",
            });
        }
        rules.push(Rule::FromLocal {
            action: Action::Jump(MARK_MASQ.to_owned()),
            comment: "masquerade local traffic",
        });
        rules.push(Rule::FromLocal {
            action: origin,
            comment: "short-circuit local traffic",
        });
    }
    if let Some(chain) = policy {
        rules.push(Rule::Always {
            ct_new: false,
            action: Action::Goto(chain.to_owned()),
        });
    }
    rules
}
