//! One service port's chains: its internal (ClusterIP) chain, the external chains that
//! route external traffic (policy, eTP Local's short-circuits, masquerade), and its
//! firewall chain; their names go into the dispatch maps (see `elements`). Without
//! affinity they end in a shared selection chain (see `select`); with it, in balancing
//! chains of their own.

use std::collections::BTreeSet;
use std::net::IpAddr;

use svcplane_model::IpFamily;
use svcplane_proxy::{DataplaneError, ServicePortState};

use super::super::names;
use super::super::rule::{Action, Chain, Rule};
use super::select::{self, Affinity, Balancer, Keyed, Lists};
use super::{Decl, FamilyCtx, MARK_MASQ, filter};

/// The chains a service port's map elements point at.
pub(crate) struct Targets {
    /// The chain of internal (ClusterIP) traffic; `None`: no endpoints.
    pub internal: Option<String>,
    /// kube-proxy's EXT chain of the external addresses (externalIPs, LoadBalancer
    /// IPs), when external traffic can reach any endpoint.
    pub external: Option<String>,
    /// The same for the node port (without affinity a chain of its own: its selection
    /// is keyed by the port alone).
    pub node_port: Option<String>,
    /// External traffic has no endpoint (what the short-circuits do not take is
    /// dropped or rejected by the filter chains).
    pub external_empty: bool,
    /// The source-range firewall chain.
    pub firewall: Option<String>,
    /// The endpoint lists chosen through the endpoints maps (no affinity): they give
    /// the maps' elements.
    pub keyed: Option<Lists>,
}

/// A service port's declarations (in block order) and its map targets.
pub(super) struct Rendered {
    pub decls: Vec<Decl>,
    pub targets: Targets,
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
    let lists = Lists::of(svc);
    for l in [&lists.internal, &lists.external, &lists.origin] {
        for &i in l.iter().flatten() {
            let ep = &svc.endpoints[i];
            if IpFamily::of(&ep.ip) != family {
                return Err(wrong_family(svc, "endpoint", &ep.ip, family));
            }
        }
    }
    let firewall = filter::firewall_chain(family, svc, &base)?;
    match svc.affinity_timeout_seconds {
        Some(_) => with_affinity(ctx, svc, &base, lists, firewall),
        None => keyed(ctx, svc, &base, lists, firewall),
    }
}

/// The ClusterIP masquerade mark rule of the internal chain, if any (qualified by the
/// ClusterIP: with affinity the chain may also balance external traffic).
fn cluster_ip_mark(ctx: &FamilyCtx, svc: &ServicePortState) -> Option<Rule> {
    svc.cluster_ip
        .and_then(|cip| ctx.masquerade.cluster_ip_rule(cip, svc.protocol, svc.port))
}

/// Without affinity: every chain of the service ends in a `goto` of a shared selection
/// chain, so an endpoint swap changes map elements only.
fn keyed(
    ctx: &FamilyCtx,
    svc: &ServicePortState,
    base: &str,
    lists: Lists,
    firewall: Option<Chain>,
) -> Result<Rendered, DataplaneError> {
    let p = svc.protocol;
    let count = |l: &Option<Vec<usize>>| l.as_ref().map(|v| v.len() as u32);
    let mut decls = Vec::with_capacity(4);
    let internal = match count(&lists.internal) {
        Some(n) => {
            let name = names::join(names::SERVICE_PREFIX, base)?;
            let mut rules = Vec::with_capacity(2);
            rules.extend(cluster_ip_mark(ctx, svc));
            rules.push(select::goto_selection((Keyed::Addr, p, n)));
            decls.push(Decl::Chain(Chain::new(name.clone(), rules)));
            Some(name)
        }
        None => None,
    };
    let (ext_n, origin_n) = (count(&lists.external), count(&lists.origin));
    let reachable = ext_n.is_some() || origin_n.is_some();
    let addrs = !svc.external_ips.is_empty() || !svc.load_balancer_ips.is_empty();
    // One EXT chain per key space: the same rules, but the selections they go to.
    let mut ext_chain = |prefix: &str, on: bool, keyed: Keyed, origin: Keyed| {
        if !(reachable && on) {
            return Ok::<_, DataplaneError>(None);
        }
        let name = names::join(prefix, base)?;
        let rules = external_rules(
            ctx,
            lists.local,
            origin_n.map(|n| select::selection_chain_name((origin, p, n))),
            ext_n.map(|n| select::selection_chain_name((keyed, p, n))),
        );
        decls.push(Decl::Chain(Chain::new(name.clone(), rules)));
        Ok(Some(name))
    };
    let external = ext_chain(
        names::EXTERNAL_PREFIX,
        addrs,
        Keyed::Addr,
        Keyed::OriginAddr,
    )?;
    let node_port = ext_chain(
        names::NODEPORT_PREFIX,
        svc.node_port.is_some(),
        Keyed::NodePort,
        Keyed::OriginNodePort,
    )?;
    let firewall_name = firewall.as_ref().map(|c| c.name.clone());
    decls.extend(firewall.map(Decl::Chain));
    Ok(Rendered {
        decls,
        targets: Targets {
            internal,
            external,
            node_port,
            external_empty: ext_n.is_none(),
            firewall: firewall_name,
            keyed: Some(lists),
        },
    })
}

/// ClientIP affinity: kube-proxy's per-endpoint chains (their `update @affinity-…`
/// rule comes before DNAT), chosen by balancing chains, one per distinct list.
fn with_affinity(
    ctx: &FamilyCtx,
    svc: &ServicePortState,
    base: &str,
    lists: Lists,
    firewall: Option<Chain>,
) -> Result<Rendered, DataplaneError> {
    let family = ctx.family;
    let mut balancers: Vec<Balancer> = Vec::with_capacity(3);
    let mut balancer = |prefix, list: Option<Vec<usize>>| {
        list.map(|l| select::balancer_for(&mut balancers, prefix, base, l))
            .transpose()
    };
    let internal_chain = balancer(names::SERVICE_PREFIX, lists.internal)?;
    let origin_chain = balancer(names::CLUSTER_PREFIX, lists.origin)?;
    let external_policy_chain = balancer(names::EXTERNAL_POLICY_PREFIX, lists.external)?;
    // kube-proxy's EXT chain: needed when external traffic can reach any endpoint,
    // including only through the eTP Local short-circuits.
    let external_chain = if external_policy_chain.is_some() || origin_chain.is_some() {
        Some(names::join(names::EXTERNAL_PREFIX, base)?)
    } else {
        None
    };

    // The endpoints some balancing chain uses.
    let used: BTreeSet<usize> = balancers
        .iter()
        .flat_map(|b| b.endpoints.iter().copied())
        .collect();
    let affinity = Affinity::of(svc, &used)?;

    let mut decls = Vec::with_capacity(2 * used.len() + balancers.len() + 2);
    if let Some(a) = &affinity {
        decls.extend(a.sets(family, &used).into_iter().map(Decl::Set));
    }
    for (bi, b) in balancers.iter().enumerate() {
        let mut rules = Vec::with_capacity(b.endpoints.len() + 2);
        if Some(bi) == internal_chain {
            rules.extend(cluster_ip_mark(ctx, svc));
        }
        if let Some(a) = &affinity {
            rules.extend(select::affinity_rules(family, b, a));
        }
        decls.push(Decl::Chain(Chain::new(b.name.clone(), rules)));
    }
    if let Some(ext) = &external_chain {
        let rules = external_rules(
            ctx,
            lists.local,
            origin_chain.map(|i| balancers[i].name.clone()),
            external_policy_chain.map(|i| balancers[i].name.clone()),
        );
        decls.push(Decl::Chain(Chain::new(ext.clone(), rules)));
    }
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
            node_port: external_chain.clone(),
            external: external_chain,
            external_empty: external_policy_chain.is_none(),
            firewall: firewall_name,
            keyed: None,
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
    origin: Option<String>,
    policy: Option<String>,
) -> Vec<Rule> {
    let mut rules = Vec::with_capacity(4);
    if !local {
        rules.push(Rule::Always {
            ct_new: false,
            action: Action::Jump(MARK_MASQ.to_owned()),
        });
    } else {
        let origin = origin.map_or(Action::Drop, Action::Goto);
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
            action: Action::Goto(chain),
        });
    }
    rules
}
