//! DesiredState → `iptables-restore` input, modelled on kube-proxy's iptables mode
//! (`pkg/proxy/iptables/proxier.go`, syncProxyRules), with svcplane's chain prefix.
//!
//! Per family and table the renderer produces chains (name + rules): the fixed chains
//! (SVCP-SERVICES, SVCP-NODEPORTS, SVCP-POSTROUTING, SVCP-MARK-MASQ, SVCP-CANARY in nat;
//! SVCP-SERVICES, SVCP-EXTERNAL-SERVICES, SVCP-NODEPORTS, SVCP-FORWARD,
//! SVCP-PROXY-FIREWALL, SVCP-CANARY in filter), the dispatch tree chains below them
//! (see [`super::dispatch`]), and per service port its nat chains (SVC/SVO/SVX
//! balancers, EXT, FW, one SEP per endpoint). Every semantic decision comes from the
//! DesiredState; this module only spells it.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use svcplane_model::{IpFamily, ServicePortName};
use svcplane_proxy::{
    ClusterIpMasquerade, DataplaneError, DesiredState, EmptyVerdict, ExternalPolicy, FamilyState,
    NodePortAddresses, ServicePortState, TrafficTarget,
};

use super::dispatch::{self, Dispatch, Entry, KeyKind};
use super::names::{self, *};
use crate::nftables::MASQUERADE_MARK;

/// Writing into a `String` cannot fail.
macro_rules! w {
    ($dst:expr, $($arg:tt)*) => {{ let _ = write!($dst, $($arg)*); }};
}

/// How to render (from the CLI and the detected iptables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub dispatch: Dispatch,
    /// `MASQUERADE --random-fully` (iptables ≥ 1.6.2).
    pub random_fully: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dispatch: Dispatch::Tree,
            random_fully: true,
        }
    }
}

/// One chain: its name, its rules as `-A NAME …` lines, and how many there are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub rules: String,
    pub count: usize,
}

impl Chain {
    fn new(name: impl Into<String>) -> Chain {
        Chain {
            name: name.into(),
            rules: String::new(),
            count: 0,
        }
    }

    /// Appends `-A NAME <body>`.
    fn rule(&mut self, body: &str) {
        self.rules.push_str("-A ");
        self.rules.push_str(&self.name);
        self.rules.push(' ');
        self.rules.push_str(body);
        self.rules.push('\n');
        self.count += 1;
    }
}

/// A jump from a built-in chain to one of svcplane's, inserted when missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub builtin: &'static str,
    pub target: &'static str,
    /// The rule, without `-I BUILTIN`.
    pub rule: &'static str,
}

/// kube-proxy's iptablesJumpChains, in the order they end up in each built-in chain.
pub const JUMPS: &[Jump] = &[
    Jump {
        table: "nat",
        builtin: "PREROUTING",
        target: SERVICES,
        rule: "-m comment --comment \"svcplane service portals\" -j SVCP-SERVICES",
    },
    Jump {
        table: "nat",
        builtin: "OUTPUT",
        target: SERVICES,
        rule: "-m comment --comment \"svcplane service portals\" -j SVCP-SERVICES",
    },
    Jump {
        table: "nat",
        builtin: "POSTROUTING",
        target: POSTROUTING,
        rule: "-m comment --comment \"svcplane postrouting rules\" -j SVCP-POSTROUTING",
    },
    Jump {
        table: "filter",
        builtin: "INPUT",
        target: PROXY_FIREWALL,
        rule: "-m conntrack --ctstate NEW -m comment --comment \"svcplane load balancer firewall\" -j SVCP-PROXY-FIREWALL",
    },
    Jump {
        table: "filter",
        builtin: "INPUT",
        target: NODEPORTS,
        rule: "-m comment --comment \"svcplane health check service ports\" -j SVCP-NODEPORTS",
    },
    Jump {
        table: "filter",
        builtin: "INPUT",
        target: EXTERNAL_SERVICES,
        rule: "-m conntrack --ctstate NEW -m comment --comment \"svcplane externally-visible service portals\" -j SVCP-EXTERNAL-SERVICES",
    },
    Jump {
        table: "filter",
        builtin: "FORWARD",
        target: PROXY_FIREWALL,
        rule: "-m conntrack --ctstate NEW -m comment --comment \"svcplane load balancer firewall\" -j SVCP-PROXY-FIREWALL",
    },
    Jump {
        table: "filter",
        builtin: "FORWARD",
        target: FORWARD,
        rule: "-m comment --comment \"svcplane forwarding rules\" -j SVCP-FORWARD",
    },
    Jump {
        table: "filter",
        builtin: "FORWARD",
        target: SERVICES,
        rule: "-m conntrack --ctstate NEW -m comment --comment \"svcplane service portals\" -j SVCP-SERVICES",
    },
    Jump {
        table: "filter",
        builtin: "FORWARD",
        target: EXTERNAL_SERVICES,
        rule: "-m conntrack --ctstate NEW -m comment --comment \"svcplane externally-visible service portals\" -j SVCP-EXTERNAL-SERVICES",
    },
    Jump {
        table: "filter",
        builtin: "OUTPUT",
        target: PROXY_FIREWALL,
        rule: "-m conntrack --ctstate NEW -m comment --comment \"svcplane load balancer firewall\" -j SVCP-PROXY-FIREWALL",
    },
    Jump {
        table: "filter",
        builtin: "OUTPUT",
        target: SERVICES,
        rule: "-m conntrack --ctstate NEW -m comment --comment \"svcplane service portals\" -j SVCP-SERVICES",
    },
];

/// The tables svcplane writes.
pub const TABLES: [&str; 2] = ["nat", "filter"];

/// One family's rules. `services` holds the chains of the services that were asked for
/// (all of them for a full render).
#[derive(Debug, Default)]
pub struct FamilyRules {
    pub nat_shared: Vec<Chain>,
    pub filter: Vec<Chain>,
    pub services: Vec<(ServicePortName, Vec<Chain>)>,
}

impl FamilyRules {
    /// Every nat chain, fixed ones first.
    pub fn nat(&self) -> impl Iterator<Item = &Chain> + Clone {
        self.nat_shared
            .iter()
            .chain(self.services.iter().flat_map(|(_, c)| c))
    }
}

/// Which services' own chains to render (their dispatch entries are always rendered).
#[derive(Clone, Copy)]
pub enum Select<'a> {
    All,
    Only(&'a BTreeSet<ServicePortName>),
}

/// How ClusterIP traffic is marked for masquerade.
enum Masq {
    All,
    /// `! -s CIDR` inline (kube-proxy's single cluster CIDR).
    Outside(IpNet),
    /// Several CIDRs: through [`MASQ_OUTSIDE`].
    OutsideMany(Vec<IpNet>),
    None,
}

struct Ctx {
    family: IpFamily,
    cluster_cidrs: Vec<IpNet>,
    masq: Masq,
}

fn family_nets(family: IpFamily, nets: &[IpNet]) -> Vec<IpNet> {
    let own: Vec<IpNet> = nets
        .iter()
        .filter(|n| IpFamily::of_net(n) == family)
        .map(|n| n.trunc())
        .collect();
    IpNet::aggregate(&own)
}

fn ctx(fam: &FamilyState) -> Ctx {
    let family = fam.family;
    let masq = match &fam.cluster_ip_masquerade {
        ClusterIpMasquerade::All => Masq::All,
        ClusterIpMasquerade::FromOutside(cidrs) => {
            let nets = family_nets(family, cidrs);
            match nets.as_slice() {
                [] => Masq::None,
                [one] => Masq::Outside(*one),
                _ => Masq::OutsideMany(nets),
            }
        }
        ClusterIpMasquerade::None => Masq::None,
    };
    Ctx {
        family,
        cluster_cidrs: family_nets(family, &fam.cluster_cidrs),
        masq,
    }
}

/// The dispatch lists of one family, filled from every service.
#[derive(Default)]
struct Lists {
    nat_services: Vec<Entry>,
    nat_nodeports: Vec<Entry>,
    filter_services: Vec<Entry>,
    filter_external: Vec<Entry>,
    filter_external_ports: Vec<Entry>,
    filter_firewall: Vec<Entry>,
    filter_nodeports: Vec<Entry>,
    hairpin: Vec<Entry>,
    /// After every per-port rule: reject what is left for a ClusterIP.
    cluster_ips: Vec<Entry>,
}

/// A balancing chain: name and endpoint indices.
struct Balancer {
    name: String,
    endpoints: Vec<usize>,
}

/// What one service port renders to: the chains that exist, before any text.
struct Plan<'a> {
    svc: &'a ServicePortState,
    pn: String,
    proto: &'static str,
    balancers: Vec<Balancer>,
    internal: Option<usize>,
    origin: Option<usize>,
    external: Option<usize>,
    ext: Option<String>,
    fw: Option<String>,
    source_ranges: Vec<IpNet>,
    /// The endpoints some balancing chain uses.
    used: BTreeSet<usize>,
}

fn resolved(svc: &ServicePortState, target: &TrafficTarget) -> Vec<usize> {
    target
        .endpoints
        .iter()
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

fn plan<'a>(ctx: &Ctx, svc: &'a ServicePortState) -> Result<Plan<'a>, DataplaneError> {
    names::check_comment_safe(&svc.name)?;
    let family = ctx.family;
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
    let hash = names::service_hash(&svc.name);
    let mut balancers: Vec<Balancer> = Vec::with_capacity(3);
    let mut balancer = |prefix: &str, endpoints: Vec<usize>| -> usize {
        if let Some(i) = balancers.iter().position(|b| b.endpoints == endpoints) {
            return i;
        }
        balancers.push(Balancer {
            name: names::service_chain(prefix, &hash),
            endpoints,
        });
        balancers.len() - 1
    };
    let internal_eps = resolved(svc, &svc.internal);
    let internal =
        (svc.cluster_ip.is_some() && !internal_eps.is_empty()).then(|| balancer(SVC, internal_eps));
    let has_external = svc.has_external();
    let origin = match &svc.external_policy {
        ExternalPolicy::Local { local_origin } if has_external => {
            let eps = resolved(svc, local_origin);
            (!eps.is_empty()).then(|| balancer(SVO, eps))
        }
        _ => None,
    };
    let external_eps = resolved(svc, &svc.external);
    let external = (has_external && !external_eps.is_empty()).then(|| balancer(SVX, external_eps));
    for b in &balancers {
        for &i in &b.endpoints {
            let ip = &svc.endpoints[i].ip;
            if IpFamily::of(ip) != family {
                return Err(wrong_family(svc, "endpoint", ip, family));
            }
        }
    }
    // kube-proxy's EXT chain: whenever external traffic can reach an endpoint, including
    // only through the eTP Local short-circuits.
    let ext = (external.is_some() || origin.is_some()).then(|| names::service_chain(EXT, &hash));
    let source_ranges = family_nets(family, &svc.load_balancer_source_ranges);
    let fw = (ext.is_some() && !svc.load_balancer_ips.is_empty() && !source_ranges.is_empty())
        .then(|| names::service_chain(FW, &hash));
    let used = balancers
        .iter()
        .flat_map(|b| b.endpoints.iter().copied())
        .collect();
    Ok(Plan {
        used,
        svc,
        pn: names::port_name(&svc.name),
        proto: svc.protocol.as_lower(),
        balancers,
        internal,
        origin,
        external,
        ext,
        fw,
        source_ranges,
    })
}

fn verdict(v: EmptyVerdict) -> (&'static str, &'static str) {
    match v {
        EmptyVerdict::Reject => ("has no endpoints", "REJECT"),
        EmptyVerdict::Drop => ("has no local endpoints", "DROP"),
    }
}

/// The plan's dispatch entries.
fn entries(p: &Plan, lists: &mut Lists) {
    let svc = p.svc;
    let (pn, proto, port) = (&p.pn, p.proto, svc.port);
    if let Some(cip) = svc.cluster_ip {
        let key = dispatch::addr_key(cip);
        lists.cluster_ips.push(Entry {
            key,
            rule: format!(
                "-m comment --comment \"Reject traffic to invalid ports of ClusterIPs\" -d {cip} -j REJECT"
            ),
        });
        match p.internal {
            Some(i) => lists.nat_services.push(Entry {
                key,
                rule: format!(
                    "-m comment --comment \"{pn} cluster IP\" -m {proto} -p {proto} -d {cip} --dport {port} -j {}",
                    p.balancers[i].name
                ),
            }),
            None => {
                let (why, target) = verdict(svc.internal.if_empty);
                lists.filter_services.push(Entry {
                    key,
                    rule: format!(
                        "-m comment --comment \"{pn} {why}\" -m {proto} -p {proto} -d {cip} --dport {port} -j {target}"
                    ),
                });
            }
        }
    }
    let (why, empty_target) = verdict(svc.external.if_empty);
    let external_empty = p.external.is_none();
    for (ips, what) in [
        (&svc.external_ips, "external IP"),
        (&svc.load_balancer_ips, "loadbalancer IP"),
    ] {
        for &ip in ips.iter() {
            let key = dispatch::addr_key(ip);
            if let Some(ext) = &p.ext {
                let to = match (&p.fw, what) {
                    (Some(fw), "loadbalancer IP") => fw,
                    _ => ext,
                };
                lists.nat_services.push(Entry {
                    key,
                    rule: format!(
                        "-m comment --comment \"{pn} {what}\" -m {proto} -p {proto} -d {ip} --dport {port} -j {to}"
                    ),
                });
            }
            if external_empty {
                // No endpoint for external traffic: what the short-circuits did not take
                // is dropped or rejected.
                lists.filter_external.push(Entry {
                    key,
                    rule: format!(
                        "-m comment --comment \"{pn} {why}\" -m {proto} -p {proto} -d {ip} --dport {port} -j {empty_target}"
                    ),
                });
            }
        }
    }
    if let Some(fw) = &p.fw {
        for &ip in &svc.load_balancer_ips {
            lists.filter_firewall.push(Entry {
                key: dispatch::addr_key(ip),
                rule: format!(
                    "-m comment --comment \"{pn} traffic not accepted by {fw}\" -m {proto} -p {proto} -d {ip} --dport {port} -j DROP"
                ),
            });
        }
    }
    if let Some(np) = svc.node_port {
        let key = dispatch::port_key(svc.protocol, np);
        if let Some(ext) = &p.ext {
            lists.nat_nodeports.push(Entry {
                key,
                rule: format!(
                    "-m comment --comment {pn} -m {proto} -p {proto} --dport {np} -j {ext}"
                ),
            });
        }
        if external_empty {
            lists.filter_external_ports.push(Entry {
                key,
                rule: format!(
                    "-m comment --comment \"{pn} {why}\" -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j {empty_target}"
                ),
            });
        }
    }
    // Hairpin, for services without per-endpoint chains: a pod reaching itself through
    // the service. Only this node's pods can (a remote pod's ClusterIP, externalIP and
    // LoadBalancer traffic is DNATed on its own node), except through this node's
    // NodePorts, whose eTP Local short-circuit may pick any pod's endpoint.
    if svc.affinity_timeout_seconds.is_none() {
        let any =
            svc.node_port.is_some() && matches!(svc.external_policy, ExternalPolicy::Local { .. });
        for &i in &p.used {
            let ep = &svc.endpoints[i];
            if ep.is_local || any {
                lists.hairpin.push(Entry {
                    key: dispatch::addr_key(ep.ip),
                    rule: format!("-s {0} -d {0} -j {MARK_MASQ}", ep.ip),
                });
            }
        }
    }
    if let Some(hc) = svc.health_check_node_port {
        lists.filter_nodeports.push(Entry {
            key: dispatch::port_key(svcplane_model::Protocol::Tcp, hc),
            rule: format!(
                "-m comment --comment \"{} health check node port\" -m tcp -p tcp --dport {hc} -j ACCEPT",
                svc.name.service
            ),
        });
    }
}

/// `%0.10f` of 1/n, kube-proxy's `computeProbability`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// The plan's nat chains.
fn service_chains(ctx: &Ctx, p: &Plan) -> Vec<Chain> {
    let svc = p.svc;
    let (pn, proto, port) = (&p.pn, p.proto, svc.port);
    let mut chains = Vec::with_capacity(p.balancers.len() + 3 + svc.endpoints.len());
    // Per-endpoint chains only with ClientIP affinity, where `recent` names them. Without
    // it the balancing chain DNATs directly and hairpin is caught in SVCP-HAIRPIN: a
    // chain and two rules per endpoint made iptables-restore several times slower
    // (kube-proxy's shape: 35 s for a full sync at 10k services × 10 endpoints).
    let sticky = svc.affinity_timeout_seconds.is_some();
    let sep: Vec<Option<String>> = (0..svc.endpoints.len())
        .map(|i| {
            (sticky && p.used.contains(&i)).then(|| {
                names::endpoint_chain(&svc.name, svc.endpoints[i].ip, svc.endpoints[i].port)
            })
        })
        .collect();
    let sep_name = |i: usize| sep[i].as_deref().unwrap_or("");
    let mut rule = String::with_capacity(256);
    for (bi, b) in p.balancers.iter().enumerate() {
        let mut c = Chain::new(b.name.clone());
        if Some(bi) == p.internal
            && let Some(cip) = svc.cluster_ip
        {
            // Qualified by the ClusterIP: the chain may also balance external traffic.
            let head = format!(
                "-m comment --comment \"{pn} cluster IP\" -m {proto} -p {proto} -d {cip} --dport {port}"
            );
            match &ctx.masq {
                Masq::All => c.rule(&format!("{head} -j {MARK_MASQ}")),
                Masq::Outside(net) => c.rule(&format!("{head} ! -s {net} -j {MARK_MASQ}")),
                Masq::OutsideMany(_) => c.rule(&format!("{head} -j {MASQ_OUTSIDE}")),
                Masq::None => {}
            }
        }
        if let Some(timeout) = svc.affinity_timeout_seconds {
            for &i in &b.endpoints {
                let ep = &svc.endpoints[i];
                rule.clear();
                w!(
                    rule,
                    "-m comment --comment \"{pn} -> {}\" -m recent --name {} --rcheck --seconds {timeout} --reap -j {}",
                    names::host_port(ep.ip, ep.port),
                    sep_name(i),
                    sep_name(i)
                );
                c.rule(&rule);
            }
        }
        let n = b.endpoints.len();
        for (k, &i) in b.endpoints.iter().enumerate() {
            let ep = &svc.endpoints[i];
            rule.clear();
            w!(
                rule,
                "-m comment --comment \"{pn} -> {}\"",
                names::host_port(ep.ip, ep.port)
            );
            if k + 1 < n {
                w!(
                    rule,
                    " -m statistic --mode random --probability {}",
                    probability(n - k)
                );
            }
            if sticky {
                w!(rule, " -j {}", sep_name(i));
            } else {
                w!(
                    rule,
                    " -m {proto} -p {proto} -j DNAT --to-destination {}",
                    names::host_port(ep.ip, ep.port)
                );
            }
            c.rule(&rule);
        }
        chains.push(c);
    }
    if let Some(ext) = &p.ext {
        let mut c = Chain::new(ext.clone());
        match (&svc.external_policy, p.origin) {
            (ExternalPolicy::Cluster, _) => c.rule(&format!(
                "-m comment --comment \"masquerade traffic for {pn} external destinations\" -j {MARK_MASQ}"
            )),
            (ExternalPolicy::Local { .. }, Some(o)) => {
                // Traffic that never left this node is not subject to eTP Local.
                let origin = &p.balancers[o].name;
                for net in &ctx.cluster_cidrs {
                    c.rule(&format!(
                        "-m comment --comment \"pod traffic for {pn} external destinations\" -s {net} -j {origin}"
                    ));
                }
                c.rule(&format!(
                    "-m comment --comment \"masquerade LOCAL traffic for {pn} external destinations\" -m addrtype --src-type LOCAL -j {MARK_MASQ}"
                ));
                c.rule(&format!(
                    "-m comment --comment \"route LOCAL traffic for {pn} external destinations\" -m addrtype --src-type LOCAL -j {origin}"
                ));
            }
            (ExternalPolicy::Local { .. }, None) => {}
        }
        if let Some(x) = p.external {
            c.rule(&format!("-j {}", p.balancers[x].name));
        }
        chains.push(c);
    }
    if let Some(fw) = &p.fw {
        let ext = p.ext.as_deref().unwrap_or_default();
        let mut c = Chain::new(fw.clone());
        for net in &p.source_ranges {
            c.rule(&format!(
                "-m comment --comment \"{pn} loadbalancer IP\" -s {net} -j {ext}"
            ));
        }
        // What reaches the end was not DNATed: SVCP-PROXY-FIREWALL drops it.
        c.rule(&format!(
            "-m comment --comment \"other traffic to {pn} will be dropped by {PROXY_FIREWALL}\""
        ));
        chains.push(c);
    }
    for (i, ep) in svc.endpoints.iter().enumerate() {
        let Some(name) = &sep[i] else { continue };
        let mut c = Chain::new(name.clone());
        // Hairpin: an endpoint reaching itself through the service.
        c.rule(&format!(
            "-m comment --comment {pn} -s {} -j {MARK_MASQ}",
            ep.ip
        ));
        let recent = if svc.affinity_timeout_seconds.is_some() {
            format!(" -m recent --name {name} --set")
        } else {
            String::new()
        };
        c.rule(&format!(
            "-m comment --comment {pn}{recent} -m {proto} -p {proto} -j DNAT --to-destination {}",
            names::host_port(ep.ip, ep.port)
        ));
        chains.push(c);
    }
    chains
}

/// Renders one family: every fixed and dispatch chain, and the chains of `select`ed
/// services. A service that cannot be rendered (data the engine should never produce)
/// is skipped with a warning; the others are rendered.
pub fn render_family(fam: &FamilyState, opts: Options, select: Select) -> FamilyRules {
    let ctx = ctx(fam);
    let mut lists = Lists::default();
    let mut out = FamilyRules::default();
    for svc in fam.services.values() {
        let p = match plan(&ctx, svc) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "service port not programmed");
                continue;
            }
        };
        entries(&p, &mut lists);
        let wanted = match select {
            Select::All => true,
            Select::Only(set) => set.contains(&svc.name),
        };
        if wanted {
            out.services
                .push((svc.name.clone(), service_chains(&ctx, &p)));
        }
    }
    let addr_kind = match ctx.family {
        IpFamily::V4 => KeyKind::V4,
        IpFamily::V6 => KeyKind::V6,
    };
    let d = opts.dispatch;
    let mut tree_nat = Vec::new();
    let mut tree_filter = Vec::new();
    let list = |kind, name: &str, entries: Vec<Entry>, trees: &mut Vec<Chain>| -> Vec<String> {
        let mut r = dispatch::render(d, kind, name, dedup(entries));
        for (chain, rules) in r.chains.drain(..) {
            let mut c = Chain::new(chain);
            for rule in &rules {
                c.rule(rule);
            }
            trees.push(c);
        }
        r.top
    };

    // nat.
    let mut services = Chain::new(SERVICES);
    for r in list(addr_kind, "nat-services", lists.nat_services, &mut tree_nat) {
        services.rule(&r);
    }
    let nodeports_comment = "-m comment --comment \"svcplane service nodeports; NOTE: this must be the last rule in this chain\"";
    match &fam.nodeport_addresses {
        NodePortAddresses::AllLocal => {
            // Loopback excluded: svcplane does not serve localhost NodePorts.
            let lo = match ctx.family {
                IpFamily::V4 => "127.0.0.0/8",
                IpFamily::V6 => "::1/128",
            };
            services.rule(&format!(
                "{nodeports_comment} ! -d {lo} -m addrtype --dst-type LOCAL -j {NODEPORTS}"
            ));
        }
        NodePortAddresses::Cidrs(cidrs) => {
            for net in family_nets(ctx.family, cidrs) {
                services.rule(&format!(
                    "{nodeports_comment} -d {net} -m addrtype --dst-type LOCAL -j {NODEPORTS}"
                ));
            }
        }
    }
    let mut nodeports = Chain::new(NODEPORTS);
    for r in list(
        KeyKind::Port,
        "nat-nodeports",
        lists.nat_nodeports,
        &mut tree_nat,
    ) {
        nodeports.rule(&r);
    }
    let mut post = Chain::new(POSTROUTING);
    let hairpin_kind = match ctx.family {
        IpFamily::V4 => KeyKind::SrcV4,
        IpFamily::V6 => KeyKind::SrcV6,
    };
    let mut hairpin = Chain::new(HAIRPIN);
    for r in list(hairpin_kind, "nat-hairpin", lists.hairpin, &mut tree_nat) {
        hairpin.rule(&r);
    }
    post.rule(&format!("-m conntrack --ctstate DNAT -j {HAIRPIN}"));
    post.rule(&format!(
        "-m mark ! --mark {MASQUERADE_MARK:#x}/{MASQUERADE_MARK:#x} -j RETURN"
    ));
    post.rule(&format!("-j MARK --xor-mark {MASQUERADE_MARK:#x}"));
    post.rule(&format!(
        "-m comment --comment \"svcplane service traffic requiring SNAT\" -j MASQUERADE{}",
        if opts.random_fully {
            " --random-fully"
        } else {
            ""
        }
    ));
    let mut mark = Chain::new(MARK_MASQ);
    mark.rule(&format!("-j MARK --or-mark {MASQUERADE_MARK:#x}"));
    let mut nat = vec![services, nodeports, post, hairpin, mark, canary()];
    if let Masq::OutsideMany(nets) = &ctx.masq {
        let mut c = Chain::new(MASQ_OUTSIDE);
        for net in nets {
            c.rule(&format!("-s {net} -j RETURN"));
        }
        c.rule(&format!("-j {MARK_MASQ}"));
        nat.push(c);
    }
    nat.extend(tree_nat);
    out.nat_shared = nat;

    // filter.
    let mut f_services = Chain::new(SERVICES);
    // As svcplane's nftables mode (kube-proxy's nftables mode's cluster-ips-check): a
    // packet to a ClusterIP that no rule DNATed is refused rather than routed on. Equal
    // keys keep their order, so these come after the ClusterIP's own port rules.
    let mut filter_services = lists.filter_services;
    filter_services.append(&mut lists.cluster_ips);
    for r in list(
        addr_kind,
        "filter-services",
        filter_services,
        &mut tree_filter,
    ) {
        f_services.rule(&r);
    }
    let mut f_external = Chain::new(EXTERNAL_SERVICES);
    for r in list(
        addr_kind,
        "filter-external",
        lists.filter_external,
        &mut tree_filter,
    ) {
        f_external.rule(&r);
    }
    for r in list(
        KeyKind::Port,
        "filter-external-ports",
        lists.filter_external_ports,
        &mut tree_filter,
    ) {
        f_external.rule(&r);
    }
    let mut f_nodeports = Chain::new(NODEPORTS);
    for r in list(
        KeyKind::Port,
        "filter-nodeports",
        lists.filter_nodeports,
        &mut tree_filter,
    ) {
        f_nodeports.rule(&r);
    }
    let mut f_firewall = Chain::new(PROXY_FIREWALL);
    for r in list(
        addr_kind,
        "filter-firewall",
        lists.filter_firewall,
        &mut tree_filter,
    ) {
        f_firewall.rule(&r);
    }
    let mut f_forward = Chain::new(FORWARD);
    f_forward.rule("-m conntrack --ctstate INVALID -j DROP");
    f_forward.rule(&format!(
        "-m comment --comment \"svcplane forwarding rules\" -m mark --mark {MASQUERADE_MARK:#x}/{MASQUERADE_MARK:#x} -j ACCEPT"
    ));
    f_forward.rule(
        "-m comment --comment \"svcplane forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    );
    let mut filter = vec![
        f_services,
        f_external,
        f_nodeports,
        f_forward,
        f_firewall,
        canary(),
    ];
    filter.extend(tree_filter);
    out.filter = filter;
    out
}

/// The same rule twice (a health check port shared by a service's ports) is written once.
fn dedup(mut entries: Vec<Entry>) -> Vec<Entry> {
    let mut seen = HashSet::new();
    entries.retain(|e| seen.insert(e.rule.clone()));
    entries
}

/// The chain whose disappearance tells that someone flushed the table. Its one rule
/// is what a partial sync deletes and re-adds: a transaction fails when it is gone.
fn canary() -> Chain {
    let mut c = Chain::new(CANARY);
    c.rule("-j RETURN");
    c
}

/// The lines that make a partial transaction fail when the table was flushed.
pub const CANARY_CHECK: &str = "-D SVCP-CANARY -j RETURN\n-A SVCP-CANARY -j RETURN\n";

/// One table's `iptables-restore --noflush` input: declare (and so flush) `chains` and
/// `stale`, write `chains`' rules, insert `jumps`, delete `stale`.
pub fn table_script<'a>(
    table: &str,
    chains: impl Iterator<Item = &'a Chain> + Clone,
    stale: &[String],
    jumps: &[&Jump],
    canary_check: bool,
) -> String {
    let size: usize = chains
        .clone()
        .map(|c| c.rules.len() + c.name.len() + 10)
        .sum();
    let mut out = String::with_capacity(size + 64 * stale.len() + 256);
    out.push('*');
    out.push_str(table);
    out.push('\n');
    for c in chains.clone() {
        w!(out, ":{} - [0:0]\n", c.name);
    }
    for name in stale {
        w!(out, ":{name} - [0:0]\n");
    }
    if canary_check {
        out.push_str(CANARY_CHECK);
    }
    for c in chains {
        out.push_str(&c.rules);
    }
    for j in jumps {
        w!(out, "-I {} {}\n", j.builtin, j.rule);
    }
    for name in stale {
        w!(out, "-X {name}\n");
    }
    out.push_str("COMMIT\n");
    out
}

/// Exactly what a full sync sends on a node without svcplane's chains, both families.
pub fn render(desired: &DesiredState, opts: Options) -> String {
    let mut out = String::new();
    for fam in desired.families() {
        let rules = render_family(fam, opts, Select::All);
        let tool = match fam.family {
            IpFamily::V4 => "iptables-restore",
            IpFamily::V6 => "ip6tables-restore",
        };
        w!(
            out,
            "# {}: {tool} --noflush (dispatch: {})\n",
            fam.family,
            opts.dispatch.as_str()
        );
        for table in TABLES {
            let jumps: Vec<&Jump> = JUMPS.iter().rev().filter(|j| j.table == table).collect();
            let script = if table == "nat" {
                table_script(table, rules.nat(), &[], &jumps, false)
            } else {
                table_script(table, rules.filter.iter(), &[], &jumps, false)
            };
            out.push_str(&script);
        }
    }
    out
}
