//! `svcplane trace`: what happens to one connection on one node, explained from the
//! engine's desired state. Every decision (endpoints, policies, topology, fallback,
//! masquerade, verdicts) is the engine's; this module only finds the service port a
//! destination hits and says what the engine decided for it, with the reasons the engine
//! gives ([`Engine::explain`]) and the lines the chosen mode renders for it
//! ([`svcplane_dataplane::objects::service_objects`]).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use svcplane_dataplane::objects::{ObjectLine, service_objects};
use svcplane_dataplane::{BackendOptions, ProxyMode};
use svcplane_dns::records::{Resolution, Zone, ZoneConfig};
use svcplane_model::{Change, IpFamily, Object, Protocol};
use svcplane_proxy::{
    Category, ClusterIpMasquerade, DesiredState, EmptyVerdict, Engine, ExternalPolicy, FamilyState,
    NodePortAddresses, PortSelection, ServicePortState, TopologyChoice, TrafficTarget,
};

/// One connection to trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub to: SocketAddr,
    pub from: Option<IpAddr>,
    pub protocol: Protocol,
}

/// What the node's objects are, loaded once: the engine (for its explanations), its
/// desired state, and the DNS zone built from the same objects.
pub struct World {
    pub engine: Engine,
    pub desired: Arc<DesiredState>,
    pub zone: Zone,
    pub mode: ProxyMode,
    pub options: BackendOptions,
}

impl World {
    /// Apply `changes` (a source's initial state) to a fresh engine and zone.
    pub fn new(
        mut engine: Engine,
        changes: Vec<Change>,
        zone: &ZoneConfig,
        mode: ProxyMode,
        options: BackendOptions,
    ) -> World {
        let services: Vec<_> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Apply(Object::Service(s)) => Some((**s).clone()),
                _ => None,
            })
            .collect();
        let slices: Vec<_> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Apply(Object::EndpointSlice(s)) => Some((**s).clone()),
                _ => None,
            })
            .collect();
        let zone = Zone::build(zone, &services, &slices, 1);
        for change in changes {
            engine.apply(change);
        }
        let desired = engine.desired();
        World {
            engine,
            desired,
            zone,
            mode,
            options,
        }
    }
}

/// Where the traced packet comes from, as the rules tell sources apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// In the family's `--cluster-cidr`: a pod (taken to be on the traced node).
    Pod,
    /// One of the node's own addresses (its Node object's).
    Node,
    /// Anything else: traffic that arrives from outside the node.
    External,
    /// No `--from`: the decisions that depend on the source are given for each kind.
    Unknown,
}

/// Which kind of Service address the destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Frontend {
    ClusterIP,
    NodePort,
    #[serde(rename = "externalIP")]
    ExternalIp,
    #[serde(rename = "loadBalancerIP")]
    LoadBalancerIp,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Frontend::ClusterIP => "ClusterIP",
            Frontend::NodePort => "NodePort",
            Frontend::ExternalIp => "externalIP",
            Frontend::LoadBalancerIp => "LoadBalancer IP",
        })
    }
}

/// What happens to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// DNATed (or, in eBPF mode, connected) to one of the candidate endpoints.
    Forward,
    /// Dropped silently.
    Drop,
    /// Rejected (ICMP unreachable / TCP reset; eBPF mode: ECONNREFUSED).
    Reject,
    /// The mode does not translate it (it goes on to the address as such).
    Untranslated,
}

/// Whether the source address is rewritten to the node's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Masq {
    Yes,
    No,
    /// Depends on the source (no `--from`).
    Depends,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub ip: IpAddr,
    pub port: u16,
    pub node: Option<String>,
    pub zone: Option<String>,
    pub local: bool,
    pub ready: bool,
    pub terminating: bool,
    /// Chance a new connection (without affinity) goes here.
    pub probability: f64,
    /// The source is this endpoint: a pod reaching itself, masqueraded as hairpin.
    pub hairpin: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Excluded {
    pub ip: IpAddr,
    pub port: u16,
    pub node: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelLine {
    pub context: Option<String>,
    pub line: String,
    /// The line names the traced destination.
    pub matches: bool,
}

/// The trace of one connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    pub node: String,
    pub mode: String,
    pub protocol: String,
    pub to: SocketAddr,
    pub from: Option<IpAddr>,
    pub source: Source,
    /// `ns/name:port/PROTO`; `None` when only the address is a Service's (no such port).
    pub service: Option<String>,
    pub frontend: Frontend,
    /// The decisions, in the order the packet meets them.
    pub steps: Vec<String>,
    pub outcome: Outcome,
    /// Why, in one line ("eTP Local and no local endpoint → DROP").
    pub reason: String,
    pub endpoints: Vec<Candidate>,
    pub excluded: Vec<Excluded>,
    pub masquerade: Masq,
    pub masquerade_why: String,
    /// ClientIP affinity timeout, seconds.
    pub affinity_seconds: Option<u32>,
    pub kernel: Vec<KernelLine>,
}

/// `trace` failed for the destination itself (as opposed to loading the objects).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceError {
    #[error(
        "no Service at {to}/{proto} on node {node}: not a ClusterIP, externalIP or \
         LoadBalancer IP port, nor a NodePort on one of the node's addresses ({addresses})"
    )]
    NoService {
        to: SocketAddr,
        proto: &'static str,
        node: String,
        addresses: String,
    },
    #[error("rendering the {mode} objects failed: {message}")]
    Render { mode: String, message: String },
}

/// Trace `req` on `world`'s node.
pub fn trace(world: &World, req: &Request) -> Result<Trace, TraceError> {
    let desired = &world.desired;
    let family = IpFamily::of(&req.to.ip());
    let fam = desired.family(family);
    let source = classify(fam, req.from);
    let Some((sp, frontend)) = find_port(fam, req) else {
        if fam.cluster_ips().contains(&req.to.ip()) {
            return Ok(unknown_cluster_ip_port(world, req, source));
        }
        return Err(TraceError::NoService {
            to: req.to,
            proto: req.protocol.as_k8s(),
            node: desired.node_name.clone(),
            addresses: if fam.node_ips.is_empty() {
                "none known: no Node object for it".to_string()
            } else {
                join(fam.node_ips.iter())
            },
        });
    };
    let selection = world
        .engine
        .explain(&sp.name.service)
        .into_iter()
        .find(|s| s.family == family && s.name == sp.name);
    let mut t = Trace {
        node: desired.node_name.clone(),
        mode: world.mode.to_string(),
        protocol: req.protocol.as_k8s().to_string(),
        to: req.to,
        from: req.from,
        source,
        service: Some(sp.name.to_string()),
        frontend,
        steps: Vec::new(),
        outcome: Outcome::Forward,
        reason: String::new(),
        endpoints: Vec::new(),
        excluded: Vec::new(),
        masquerade: Masq::No,
        masquerade_why: String::new(),
        affinity_seconds: sp.affinity_timeout_seconds,
        kernel: Vec::new(),
    };
    t.steps.push(format!(
        "{frontend} {} of {} (port {}{})",
        req.to,
        sp.name,
        sp.port,
        sp.node_port
            .map_or(String::new(), |p| format!(", nodePort {p}"))
    ));
    // eBPF mode: the socket load balancer translates connections made on this node (in
    // its pods, or only in its own network namespace with --ebpf-socket-lb-hostns-only);
    // the rest meets the north-south nftables table, which behaves as nftables mode.
    let ebpf = socket_lb(world, source);
    if world.mode == ProxyMode::Ebpf && !ebpf {
        t.steps.push(
            "eBPF mode: not one of the sockets the socket load balancer translates, so the \
             north-south nftables table (svcplane-ns) handles it, as nftables mode would"
                .into(),
        );
    }
    // loadBalancerSourceRanges: checked before anything else.
    if frontend == Frontend::LoadBalancerIp && !sp.load_balancer_source_ranges.is_empty() {
        let ranges = join(sp.load_balancer_source_ranges.iter());
        if ebpf {
            t.outcome = Outcome::Untranslated;
            t.reason = format!(
                "eBPF mode's socket load balancer does not translate LoadBalancer IPs with \
                 loadBalancerSourceRanges ({ranges}): the source is not known at connect, \
                 and the north-south table sees only traffic arriving from outside"
            );
            t.kernel = kernel_lines(world, family, sp, req, frontend)?;
            return Ok(t);
        }
        match req.from {
            Some(from)
                if !sp
                    .load_balancer_source_ranges
                    .iter()
                    .any(|r| r.contains(&from)) =>
            {
                t.steps.push(format!(
                    "loadBalancerSourceRanges {ranges}: {from} is outside"
                ));
                t.outcome = Outcome::Drop;
                t.reason = format!("source {from} not in loadBalancerSourceRanges → DROP");
                t.kernel = kernel_lines(world, family, sp, req, frontend)?;
                return Ok(t);
            }
            Some(from) => t.steps.push(format!(
                "loadBalancerSourceRanges {ranges}: {from} is allowed"
            )),
            None => t.steps.push(format!(
                "loadBalancerSourceRanges {ranges}: other sources are dropped"
            )),
        }
    }

    // Which of the engine's targets applies, and who masquerades.
    let (target, category, masq, masq_why) = match frontend {
        Frontend::ClusterIP => {
            let local = selection.as_ref().is_some_and(|s| s.internal_local);
            t.steps.push(if local {
                "internalTrafficPolicy Local: endpoints on this node only".into()
            } else {
                "internalTrafficPolicy Cluster: endpoints on every node".into()
            });
            let (m, why) = cluster_ip_masquerade(fam, req.from);
            let category = selection.as_ref().and_then(|s| {
                if local {
                    s.local.clone()
                } else {
                    s.cluster.clone()
                }
            });
            (sp.internal.clone(), category, m, why)
        }
        _ => external_target(world, sp, selection.as_ref(), source, &mut t.steps),
    };
    (t.masquerade, t.masquerade_why) = if ebpf {
        (
            Masq::No,
            "eBPF mode rewrites no packet: the socket connects to the endpoint itself".into(),
        )
    } else {
        (masq, masq_why)
    };
    if let Some(cat) = &category {
        describe_category(cat, &mut t.steps);
    }
    if let Some(secs) = sp.affinity_timeout_seconds {
        t.steps.push(format!(
            "sessionAffinity ClientIP: a client's first connection picks an endpoint, \
             its next ones within {secs} s go to the same one"
        ));
    }
    let eps: Vec<_> = sp.target_endpoints(&target).collect();
    let n = eps.len();
    for ep in &eps {
        let hairpin = req.from == Some(ep.ip);
        // Where it runs: the engine's explanation has it (the desired state keeps no names).
        let place = selection.as_ref().and_then(|s| {
            s.endpoints
                .iter()
                .find(|e| e.state.ip == ep.ip && e.state.port == ep.port)
        });
        t.endpoints.push(Candidate {
            ip: ep.ip,
            port: ep.port,
            node: place.and_then(|e| e.node_name.as_deref().map(str::to_owned)),
            zone: place.and_then(|e| e.zone.as_deref().map(str::to_owned)),
            local: ep.is_local,
            ready: ep.ready,
            terminating: ep.terminating,
            probability: 1.0 / n as f64,
            hairpin,
        });
    }
    if let (Some(sel), Some(cat)) = (&selection, &category) {
        for (i, why) in &cat.excluded {
            if let Some(ep) = sel.endpoints.get(*i) {
                t.excluded.push(Excluded {
                    ip: ep.state.ip,
                    port: ep.state.port,
                    node: ep.node_name.as_deref().map(str::to_owned),
                    reason: why.to_string(),
                });
            }
        }
    }
    if t.endpoints.iter().any(|c| c.hairpin) && !ebpf {
        t.masquerade_why += &format!(
            "; when {} is chosen, the source reaches itself: masqueraded (hairpin)",
            req.from.map_or(String::new(), |f| f.to_string())
        );
    }
    match target.verdict_when_empty() {
        None => {
            t.outcome = Outcome::Forward;
            t.reason = format!(
                "{} to {}{}",
                if ebpf { "connected" } else { "DNAT" },
                if n == 1 {
                    "its one endpoint".to_string()
                } else {
                    format!("one of {n} endpoints")
                },
                if world.mode == ProxyMode::Ipvs {
                    format!(" (IPVS scheduler {})", world.options.ipvs.scheduler)
                } else if n > 1 {
                    ", each equally likely".to_string()
                } else {
                    String::new()
                }
            );
        }
        Some(EmptyVerdict::Reject) => {
            t.outcome = Outcome::Reject;
            t.reason = "no endpoints → REJECT".into();
        }
        Some(EmptyVerdict::Drop) => {
            t.outcome = Outcome::Drop;
            t.reason = match frontend {
                Frontend::ClusterIP => "iTP Local and no local endpoint → DROP".into(),
                _ => "eTP Local and no local endpoint → DROP".into(),
            };
        }
    }
    t.kernel = kernel_lines(world, family, sp, req, frontend)?;
    Ok(t)
}

/// A ClusterIP without the traced port: rejected (in eBPF mode the connect is refused).
fn unknown_cluster_ip_port(world: &World, req: &Request, source: Source) -> Trace {
    let ebpf = socket_lb(world, source);
    Trace {
        node: world.desired.node_name.clone(),
        mode: world.mode.to_string(),
        protocol: req.protocol.as_k8s().to_string(),
        to: req.to,
        from: req.from,
        source,
        service: None,
        frontend: Frontend::ClusterIP,
        steps: vec![format!(
            "{} is a ClusterIP, but no Service has port {}/{} on it",
            req.to.ip(),
            req.to.port(),
            req.protocol.as_k8s()
        )],
        outcome: Outcome::Reject,
        reason: if ebpf {
            "a port no Service has on a ClusterIP → the connect fails with ECONNREFUSED".into()
        } else {
            "a port no Service has on a ClusterIP → REJECT".into()
        },
        endpoints: Vec::new(),
        excluded: Vec::new(),
        masquerade: Masq::No,
        masquerade_why: String::new(),
        affinity_seconds: None,
        kernel: Vec::new(),
    }
}

/// Whether eBPF mode's socket load balancer (rather than its north-south nftables table)
/// handles a connection from `source`.
fn socket_lb(world: &World, source: Source) -> bool {
    world.mode == ProxyMode::Ebpf
        && match source {
            Source::External => false,
            Source::Pod => !world.options.ebpf.hostns_only,
            Source::Node | Source::Unknown => true,
        }
}

/// The target of external traffic (NodePort, externalIP, LoadBalancer IP), as the
/// engine set it up for this source.
fn external_target(
    world: &World,
    sp: &ServicePortState,
    selection: Option<&PortSelection>,
    source: Source,
    steps: &mut Vec<String>,
) -> (TrafficTarget, Option<Category>, Masq, String) {
    let cluster = || selection.and_then(|s| s.cluster.clone());
    let local = || selection.and_then(|s| s.local.clone());
    let ebpf = socket_lb(world, source);
    match &sp.external_policy {
        ExternalPolicy::Cluster => {
            steps.push("externalTrafficPolicy Cluster: endpoints on every node".into());
            (
                sp.external.clone(),
                cluster(),
                Masq::Yes,
                "externalTrafficPolicy Cluster: external traffic is masqueraded (the \
                 endpoint may be on another node)"
                    .into(),
            )
        }
        ExternalPolicy::Local { local_origin } => {
            // IPVS picks real servers by destination only: every source gets the
            // address's local-only servers.
            if world.mode == ProxyMode::Ipvs && matches!(source, Source::Pod | Source::Node) {
                let masq = if source == Source::Node {
                    (
                        Masq::Yes,
                        "traffic from the node itself is masqueraded".into(),
                    )
                } else {
                    (Masq::No, "a pod's source is kept".into())
                };
                // The real servers IPVS mode programs (its own choice, not re-derived
                // here): without a local endpoint, the cluster-wide ones (kube-proxy
                // #97081), which only this node's own traffic gets through.
                let reals = svcplane_dataplane::ipvs::plan::real_server_target(sp, true);
                if !std::ptr::eq(reals, &sp.external) {
                    steps.push(
                        "externalTrafficPolicy Local without a local endpoint: IPVS's real \
                         servers are the cluster-wide endpoints, which this node's own \
                         traffic uses"
                            .into(),
                    );
                    return (local_origin.clone(), cluster(), masq.0, masq.1);
                }
                steps.push(
                    "externalTrafficPolicy Local; IPVS chooses real servers by destination \
                     only, so this node's own traffic gets the local endpoints too"
                        .into(),
                );
                return (sp.external.clone(), local(), masq.0, masq.1);
            }
            match source {
                Source::Pod => {
                    steps.push(
                        "externalTrafficPolicy Local, but the source is a pod: its traffic \
                         never left the node, so it uses the cluster-wide endpoints"
                            .into(),
                    );
                    (
                        local_origin.clone(),
                        cluster(),
                        Masq::No,
                        "a pod's traffic to an eTP Local address keeps its source".into(),
                    )
                }
                Source::Node => {
                    steps.push(
                        "externalTrafficPolicy Local, but the source is this node: it uses \
                         the cluster-wide endpoints"
                            .into(),
                    );
                    (
                        local_origin.clone(),
                        cluster(),
                        if ebpf { Masq::No } else { Masq::Yes },
                        "traffic from the node itself is masqueraded".into(),
                    )
                }
                Source::External | Source::Unknown => {
                    steps.push(
                        "externalTrafficPolicy Local: endpoints on this node only, the \
                         client's address is kept"
                            .into(),
                    );
                    if source == Source::Unknown {
                        steps.push(format!(
                            "(from this node's pods or the node itself: the cluster-wide \
                             endpoints, {} of them)",
                            local_origin.endpoints.len()
                        ));
                    }
                    (
                        sp.external.clone(),
                        local(),
                        Masq::No,
                        "externalTrafficPolicy Local keeps the client's address".into(),
                    )
                }
            }
        }
    }
}

/// Who is masqueraded on a ClusterIP (`--cluster-cidr`, `--masquerade-all`).
fn cluster_ip_masquerade(fam: &FamilyState, from: Option<IpAddr>) -> (Masq, String) {
    match &fam.cluster_ip_masquerade {
        ClusterIpMasquerade::All => (Masq::Yes, "--masquerade-all".into()),
        ClusterIpMasquerade::None => (
            Masq::No,
            "no --cluster-cidr of this family and no --masquerade-all: nothing is \
             masqueraded (as kube-proxy)"
                .into(),
        ),
        ClusterIpMasquerade::FromOutside(cidrs) => {
            let cidrs_text = join(cidrs.iter());
            match from {
                Some(ip) if cidrs.iter().any(|c| c.contains(&ip)) => (
                    Masq::No,
                    format!("the source is in the cluster CIDR {cidrs_text}"),
                ),
                Some(_) => (
                    Masq::Yes,
                    format!("the source is outside the cluster CIDR {cidrs_text}"),
                ),
                None => (
                    Masq::Depends,
                    format!("sources outside the cluster CIDR {cidrs_text} are masqueraded"),
                ),
            }
        }
    }
}

fn describe_category(cat: &Category, steps: &mut Vec<String>) {
    match &cat.topology {
        TopologyChoice::None => {}
        TopologyChoice::SameZone(zone) => steps.push(format!(
            "topology hints: every ready endpoint has zone hints and some are for this \
             node's zone {zone}: only those"
        )),
        TopologyChoice::SameNode(node) => steps.push(format!(
            "topology hints: every ready endpoint has node hints and some are for {node}: \
             only those"
        )),
    }
    if cat.terminating_fallback {
        steps.push("no ready endpoint: falling back to the serving terminating ones".to_string());
    }
}

fn classify(fam: &FamilyState, from: Option<IpAddr>) -> Source {
    match from {
        None => Source::Unknown,
        Some(ip) if fam.cluster_cidrs.iter().any(|c| c.contains(&ip)) => Source::Pod,
        Some(ip) if fam.node_ips.contains(&ip) => Source::Node,
        Some(_) => Source::External,
    }
}

/// The service port `req` reaches, and through which kind of address.
fn find_port<'a>(fam: &'a FamilyState, req: &Request) -> Option<(&'a ServicePortState, Frontend)> {
    let ip = req.to.ip();
    let port = req.to.port();
    let ports = || {
        fam.services
            .values()
            .map(|s| s.as_ref())
            .filter(|s| s.protocol == req.protocol)
    };
    if let Some(sp) = ports().find(|s| s.cluster_ip == Some(ip) && s.port == port) {
        return Some((sp, Frontend::ClusterIP));
    }
    if let Some(sp) = ports().find(|s| s.external_ips.contains(&ip) && s.port == port) {
        return Some((sp, Frontend::ExternalIp));
    }
    if let Some(sp) = ports().find(|s| s.load_balancer_ips.contains(&ip) && s.port == port) {
        return Some((sp, Frontend::LoadBalancerIp));
    }
    let accepts_node_ports = fam.node_ips.contains(&ip)
        && match &fam.nodeport_addresses {
            NodePortAddresses::AllLocal => true,
            NodePortAddresses::Cidrs(cidrs) => cidrs.iter().any(|c| c.contains(&ip)),
        };
    if accepts_node_ports && let Some(sp) = ports().find(|s| s.node_port == Some(port)) {
        return Some((sp, Frontend::NodePort));
    }
    None
}

fn kernel_lines(
    world: &World,
    family: IpFamily,
    sp: &ServicePortState,
    req: &Request,
    frontend: Frontend,
) -> Result<Vec<KernelLine>, TraceError> {
    let lines = service_objects(world.mode, &world.options, &world.desired, family, &sp.name)
        .map_err(|e| TraceError::Render {
            mode: world.mode.to_string(),
            message: e.to_string(),
        })?;
    let ip = req.to.ip().to_string();
    let port = req.to.port().to_string();
    let names_it = |l: &ObjectLine| match frontend {
        Frontend::NodePort => l
            .line
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w == port),
        _ => l.line.contains(&ip),
    };
    Ok(lines
        .into_iter()
        .map(|l| KernelLine {
            matches: names_it(&l),
            context: l.context,
            line: l.line,
        })
        .collect())
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// What `trace NAME[:PORT]` resolved, and the traces of its addresses.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The name traced, when a name was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the name resolved to in the cluster DNS (A/AAAA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<IpAddr>>,
    /// An ExternalName's CNAME target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cname: Option<String>,
    /// Resolved addresses that are no Service frontend (a headless Service's pods).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_frontends: Vec<IpAddr>,
    pub traces: Vec<Trace>,
}

/// Trace a name as a pod's lookup would resolve it (the zone the DNS serves), then
/// every address it resolves to. `port`: the Service port; needed when an address has
/// several ports for `protocol`.
pub fn trace_name(
    world: &World,
    name: &str,
    port: Option<u16>,
    from: Option<IpAddr>,
    protocol: Protocol,
) -> Result<Report> {
    let resolution = world
        .zone
        .resolve(name)
        .with_context(|| format!("cannot trace {name:?}"))?;
    let mut report = Report {
        name: Some(name.to_string()),
        addresses: None,
        cname: None,
        not_frontends: Vec::new(),
        traces: Vec::new(),
    };
    let addresses = match resolution {
        Resolution::Outside => bail!(
            "{name}: not a name of the cluster domain {} (svcplane trace follows cluster names \
             only; give an address with --to)",
            world.zone.origin()
        ),
        Resolution::NxDomain => {
            bail!(
                "{name}: no such name in the cluster DNS (NXDOMAIN): no Service or endpoint has it"
            )
        }
        Resolution::Cname { target, addresses } => {
            report.cname = Some(target);
            addresses
        }
        Resolution::Addresses(addresses) => addresses,
    };
    report.addresses = Some(addresses.clone());
    // A source of one family only reaches addresses of that family.
    let family = from.map(|f| IpFamily::of(&f));
    for ip in addresses
        .into_iter()
        .filter(|ip| family.is_none_or(|f| IpFamily::of(ip) == f))
    {
        let fam = world.desired.family(IpFamily::of(&ip));
        let port = match port {
            Some(p) => p,
            None => {
                let ports: Vec<u16> = fam
                    .services
                    .values()
                    .filter(|s| s.protocol == protocol)
                    .filter(|s| {
                        s.cluster_ip == Some(ip)
                            || s.external_ips.contains(&ip)
                            || s.load_balancer_ips.contains(&ip)
                    })
                    .map(|s| s.port)
                    .collect();
                match ports.as_slice() {
                    [] => {
                        report.not_frontends.push(ip);
                        continue;
                    }
                    [one] => *one,
                    many => bail!(
                        "{name}: {ip} has several {} ports ({}): say which, as {name}:PORT",
                        protocol.as_k8s(),
                        join(many.iter())
                    ),
                }
            }
        };
        let req = Request {
            to: SocketAddr::new(ip, port),
            from,
            protocol,
        };
        match trace(world, &req) {
            Ok(t) => report.traces.push(t),
            Err(TraceError::NoService { .. }) => report.not_frontends.push(ip),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(report)
}

/// The report as text, for a terminal or a pipe.
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    if let Some(name) = &report.name {
        let _ = write!(out, "dns       {name}");
        if let Some(cname) = &report.cname {
            let _ = write!(
                out,
                " → CNAME {cname} (ExternalName: svcplane programs nothing for it)"
            );
        }
        match &report.addresses {
            Some(a) if !a.is_empty() => {
                let _ = write!(out, " → {}", join(a.iter()));
            }
            _ => out.push_str(" → no addresses"),
        }
        out.push('\n');
        for ip in &report.not_frontends {
            let _ = writeln!(
                out,
                "          {ip}: not a Service address here (a headless Service's endpoint: \
                 connections go straight to the pod, no Service rule is involved)"
            );
        }
    }
    for (i, t) in report.traces.iter().enumerate() {
        if i > 0 || report.name.is_some() {
            out.push('\n');
        }
        render_trace(&mut out, t);
    }
    out
}

fn render_trace(out: &mut String, t: &Trace) {
    let from = match (t.from, t.source) {
        (Some(ip), Source::Pod) => format!("from {ip} (a pod)"),
        (Some(ip), Source::Node) => format!("from {ip} (node {} itself)", t.node),
        (Some(ip), _) => format!("from {ip} (outside the node)"),
        (None, _) => "from any source".to_string(),
    };
    let _ = writeln!(
        out,
        "trace     {}/{} {from} on node {}, {} mode",
        t.to, t.protocol, t.node, t.mode
    );
    let _ = writeln!(
        out,
        "service   {}",
        t.service.as_deref().unwrap_or("(none on this port)")
    );
    for step in &t.steps {
        let _ = writeln!(out, "  · {step}");
    }
    let verdict = match t.outcome {
        Outcome::Forward => "FORWARD",
        Outcome::Drop => "DROP",
        Outcome::Reject => "REJECT",
        Outcome::Untranslated => "NOT TRANSLATED",
    };
    let _ = writeln!(out, "verdict   {verdict}: {}", t.reason);
    if !t.endpoints.is_empty() {
        let _ = writeln!(out, "endpoints");
        for c in &t.endpoints {
            let mut notes = Vec::new();
            if let Some(n) = &c.node {
                notes.push(format!("node {n}{}", if c.local { " (local)" } else { "" }));
            }
            if let Some(z) = &c.zone {
                notes.push(format!("zone {z}"));
            }
            if c.terminating {
                notes.push("terminating".into());
            }
            if c.hairpin {
                notes.push("the source itself: hairpin".into());
            }
            let _ = writeln!(
                out,
                "  {:<28} {:>5.1}%  {}",
                SocketAddr::new(c.ip, c.port).to_string(),
                c.probability * 100.0,
                notes.join(", ")
            );
        }
    }
    if !t.excluded.is_empty() {
        let _ = writeln!(out, "left out");
        for e in &t.excluded {
            let _ = writeln!(
                out,
                "  {:<28} {}{}",
                SocketAddr::new(e.ip, e.port).to_string(),
                e.node
                    .as_deref()
                    .map_or(String::new(), |n| format!("node {n}: ")),
                e.reason
            );
        }
    }
    if t.outcome == Outcome::Forward {
        let masq = match t.masquerade {
            Masq::Yes => "yes",
            Masq::No => "no",
            Masq::Depends => "depends",
        };
        let _ = writeln!(out, "masquerade {masq}: {}", t.masquerade_why);
    }
    if !t.kernel.is_empty() {
        let _ = writeln!(
            out,
            "kernel    what {} mode programs for it (* names {}):",
            t.mode,
            match t.frontend {
                Frontend::NodePort => format!("port {}", t.to.port()),
                _ => t.to.ip().to_string(),
            }
        );
        let mut shown: Option<&str> = None;
        for l in &t.kernel {
            if let Some(context) = l.context.as_deref()
                && shown != Some(context)
            {
                let _ = writeln!(out, "    {context} …");
                shown = Some(context);
            }
            let _ = writeln!(
                out,
                "  {} {}",
                if l.matches { "*" } else { " " },
                l.line.trim_end()
            );
        }
    }
}

/// `svcplane trace`.
pub fn run(args: crate::cli::TraceArgs) -> Result<()> {
    let mut engine_args = args.engine.clone();
    if args.node.is_some() {
        engine_args.hostname_override = args.node.clone();
    }
    let settings = crate::settings::EngineSettings::resolve(&engine_args)?;
    let protocol = match args.proto.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        other => bail!("--proto: unknown protocol {other:?} (expected tcp, udp or sctp)"),
    };
    let world = load_world(&settings, &args.api, &args.cluster_domain)?;
    let report = match (&args.name, args.to) {
        (Some(name), _) => {
            let (name, port) = split_port(name)?;
            trace_name(&world, name, port, args.from, protocol)?
        }
        (None, Some(to)) => {
            let req = Request {
                to,
                from: args.from,
                protocol,
            };
            Report {
                name: None,
                addresses: None,
                cname: None,
                not_frontends: Vec::new(),
                traces: vec![trace(&world, &req)?],
            }
        }
        (None, None) => bail!("give a destination: --to IP:PORT, or a Service name"),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the trace as JSON")?
        );
    } else {
        print!("{}", render_text(&report));
    }
    Ok(())
}

/// The node's world as `proxy` would start from it: the source's initial state through
/// a fresh engine, and the DNS zone of the same objects (also the lab's hop 2).
pub fn load_world(
    settings: &crate::settings::EngineSettings,
    api: &crate::cli::ApiArgs,
    cluster_domain: &str,
) -> Result<World> {
    let zone = ZoneConfig::new(cluster_domain, svcplane_dns::records::DEFAULT_TTL)
        .context("--cluster-domain")?;
    let changes = load_changes(settings, api)?;
    Ok(World::new(
        Engine::new(settings.engine_config()),
        changes,
        &zone,
        settings.mode,
        settings.backend_options(),
    ))
}

/// `NAME[:PORT]`.
fn split_port(arg: &str) -> Result<(&str, Option<u16>)> {
    match arg.rsplit_once(':') {
        Some((name, port)) => {
            let port = port
                .parse()
                .with_context(|| format!("{arg:?}: the port after ':' must be 1-65535"))?;
            Ok((name, Some(port)))
        }
        None => Ok((arg, None)),
    }
}

/// The source's initial state: the manifests directory read once, or the API's initial
/// lists (the same objects `proxy` would start from).
fn load_changes(
    settings: &crate::settings::EngineSettings,
    api: &crate::cli::ApiArgs,
) -> Result<Vec<Change>> {
    use svcplane_source::{KubeSource, ManifestSource, Source, api_config, client_from_config};
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty());
    match crate::commands::object_source_with(settings, api, in_cluster)? {
        crate::commands::ObjectSource::Manifests(dir) => {
            let (changes, problems) = ManifestSource::new(&dir)
                .allocator(settings.allocator.clone())
                .load_once()?;
            for problem in &problems {
                eprintln!("warning: {problem}");
            }
            Ok(changes)
        }
        crate::commands::ObjectSource::Api(options) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let node = settings.node_name.clone();
            runtime.block_on(async move {
                let config = api_config(&options).await?;
                let client = client_from_config(config, &options)?;
                let source: Box<dyn Source> = Box::new(KubeSource::new(client, node));
                let (tx, mut rx) = tokio::sync::mpsc::channel(64);
                let problems: svcplane_source::ProblemSink =
                    Arc::new(|p| eprintln!("warning: {p}"));
                let task = tokio::spawn(source.run(tx, problems));
                let mut changes = Vec::new();
                let listed = tokio::time::timeout(API_LIST_WAIT, async {
                    while let Some(event) = rx.recv().await {
                        match event {
                            svcplane_model::SourceEvent::Changes(c) => changes.extend(c),
                            svcplane_model::SourceEvent::Synced => return true,
                        }
                    }
                    false
                })
                .await;
                task.abort();
                match listed {
                    Ok(true) => Ok(changes),
                    Ok(false) => bail!("the Kubernetes API source stopped before listing"),
                    Err(_) => bail!(
                        "the Kubernetes API's initial lists (Services, EndpointSlices, Node) \
                         did not complete within {API_LIST_WAIT:?}"
                    ),
                }
            })
        }
    }
}

/// How long `trace --kubeconfig` waits for the initial lists.
const API_LIST_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use svcplane_model::{Format, parse_manifest};
    use svcplane_proxy::EngineConfig;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
status: {addresses: [{type: InternalIP, address: 10.0.0.11}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - {addresses: [10.244.1.10], nodeName: node-a, conditions: {ready: true}}
  - {addresses: [10.244.2.10], nodeName: node-b, conditions: {ready: true}}
  - {addresses: [10.244.2.11], nodeName: node-b, conditions: {ready: false}}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalTrafficPolicy: Local
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.1}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: demo, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - {addresses: [10.244.2.20], nodeName: node-b, conditions: {ready: true}}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec:
  clusterIP: 10.96.0.30
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: zonal, namespace: demo}
spec:
  clusterIP: 10.96.0.40
  sessionAffinity: ClientIP
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zonal-1, namespace: demo, labels: {kubernetes.io/service-name: zonal}}
addressType: IPv4
ports: [{port: 80, protocol: TCP}]
endpoints:
  - {addresses: [10.244.1.40], zone: zone-a, conditions: {ready: true}, hints: {forZones: [{name: zone-a}]}}
  - {addresses: [10.244.2.40], zone: zone-b, conditions: {ready: true}, hints: {forZones: [{name: zone-b}]}}
  - {addresses: [10.244.2.41], zone: zone-b, conditions: {ready: false, serving: true, terminating: true}}
---
apiVersion: v1
kind: Service
metadata: {name: docs, namespace: demo}
spec: {type: ExternalName, externalName: docs.example.com}
"#;

    fn world(mode: ProxyMode) -> World {
        let parsed = parse_manifest(OBJECTS, Format::Yaml).expect("manifests");
        assert!(parsed.invalid.is_empty(), "{:?}", parsed.invalid);
        let changes = parsed.objects.into_iter().map(Change::Apply).collect();
        let engine = Engine::new(EngineConfig {
            node_name: "node-a".into(),
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..EngineConfig::default()
        });
        let zone = ZoneConfig::new("cluster.local", 5).unwrap();
        World::new(engine, changes, &zone, mode, BackendOptions::default())
    }

    fn go(w: &World, to: &str, from: Option<&str>) -> Trace {
        trace(
            w,
            &Request {
                to: to.parse().unwrap(),
                from: from.map(|f| f.parse().unwrap()),
                protocol: Protocol::Tcp,
            },
        )
        .unwrap()
    }

    fn ips(t: &Trace) -> Vec<String> {
        t.endpoints
            .iter()
            .map(|c| SocketAddr::new(c.ip, c.port).to_string())
            .collect()
    }

    #[test]
    fn a_cluster_ip_from_a_pod_and_from_outside() {
        let w = world(ProxyMode::Nftables);
        let t = go(&w, "10.96.0.10:80", Some("10.244.9.9"));
        assert_eq!(t.service.as_deref(), Some("demo/web:http/TCP"));
        assert_eq!(
            (t.frontend, t.source, t.outcome),
            (Frontend::ClusterIP, Source::Pod, Outcome::Forward)
        );
        assert_eq!(ips(&t), ["10.244.1.10:8080", "10.244.2.10:8080"]);
        assert!(t.endpoints.iter().all(|c| c.probability == 0.5));
        assert_eq!(t.masquerade, Masq::No);
        assert_eq!(t.excluded.len(), 1);
        assert_eq!(t.excluded[0].reason, "not ready");
        // The mode's objects: the dispatch element names the ClusterIP.
        assert!(
            t.kernel
                .iter()
                .any(|l| l.matches && l.line.contains("10.96.0.10 . tcp . 80 : goto service-")),
            "{:#?}",
            t.kernel
        );
        let t = go(&w, "10.96.0.10:80", Some("192.0.2.99"));
        assert_eq!((t.source, t.masquerade), (Source::External, Masq::Yes));
        let t = go(&w, "10.96.0.10:80", None);
        assert_eq!(t.masquerade, Masq::Depends);
        // A pod reaching itself: hairpin.
        let t = go(&w, "10.96.0.10:80", Some("10.244.1.10"));
        assert!(t.endpoints[0].hairpin && t.masquerade_why.contains("hairpin"));
    }

    #[test]
    fn etp_local_drops_outside_traffic_without_a_local_endpoint_but_not_the_nodes() {
        let w = world(ProxyMode::Nftables);
        let t = go(&w, "10.0.0.11:30080", Some("192.0.2.99"));
        assert_eq!((t.frontend, t.outcome), (Frontend::NodePort, Outcome::Drop));
        assert_eq!(t.reason, "eTP Local and no local endpoint → DROP");
        assert_eq!(
            t.excluded[0].reason,
            "on another node (traffic policy Local)"
        );
        let t = go(&w, "10.0.0.11:30080", Some("10.0.0.11"));
        assert_eq!(
            (t.source, t.outcome, t.masquerade),
            (Source::Node, Outcome::Forward, Masq::Yes)
        );
        assert_eq!(ips(&t), ["10.244.2.20:8080"]);
        let t = go(&w, "10.0.0.11:30080", Some("10.244.1.5"));
        assert_eq!((t.outcome, t.masquerade), (Outcome::Forward, Masq::No));
        // IPVS without a local endpoint: the real servers are the cluster-wide endpoints
        // (kube-proxy #97081), so the node's own traffic is served, masqueraded.
        let t = go(
            &world(ProxyMode::Ipvs),
            "10.0.0.11:30080",
            Some("10.0.0.11"),
        );
        assert_eq!((t.outcome, t.masquerade), (Outcome::Forward, Masq::Yes));
    }

    #[test]
    fn source_ranges_drop_before_anything_else() {
        let w = world(ProxyMode::Nftables);
        let t = go(&w, "192.0.2.1:80", Some("192.0.2.99"));
        assert_eq!(
            (t.frontend, t.outcome),
            (Frontend::LoadBalancerIp, Outcome::Drop)
        );
        assert!(
            t.reason.contains("loadBalancerSourceRanges"),
            "{}",
            t.reason
        );
        let t = go(&w, "192.0.2.1:80", Some("203.0.113.5"));
        assert_eq!(
            t.outcome,
            Outcome::Drop,
            "allowed, then eTP Local without local endpoint"
        );
        assert_eq!(t.reason, "eTP Local and no local endpoint → DROP");
        assert_eq!(
            go(&world(ProxyMode::Ebpf), "192.0.2.1:80", Some("10.244.1.5")).outcome,
            Outcome::Untranslated
        );
    }

    #[test]
    fn rejects_and_unknown_addresses() {
        let w = world(ProxyMode::Nftables);
        let t = go(&w, "10.96.0.30:80", None);
        assert_eq!(
            (t.outcome, t.reason.as_str()),
            (Outcome::Reject, "no endpoints → REJECT")
        );
        let t = go(&w, "10.96.0.10:81", None);
        assert_eq!((t.outcome, t.service.as_deref()), (Outcome::Reject, None));
        let ebpf = world(ProxyMode::Ebpf);
        let t = go(&ebpf, "10.96.0.10:81", None);
        assert_eq!(
            (t.outcome, t.reason.as_str()),
            (
                Outcome::Reject,
                "a port no Service has on a ClusterIP → the connect fails with ECONNREFUSED"
            )
        );
        // From outside the node: the north-south table, as nftables mode.
        let t = go(&ebpf, "10.96.0.10:80", Some("192.0.2.99"));
        assert_eq!((t.outcome, t.masquerade), (Outcome::Forward, Masq::Yes));
        let err = trace(
            &w,
            &Request {
                to: "10.1.2.3:80".parse().unwrap(),
                from: None,
                protocol: Protocol::Tcp,
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no Service at 10.1.2.3:80/TCP on node node-a: not a ClusterIP, externalIP or \
             LoadBalancer IP port, nor a NodePort on one of the node's addresses (10.0.0.11)"
        );
    }

    #[test]
    fn topology_and_affinity_are_explained() {
        let w = world(ProxyMode::Iptables);
        let t = go(&w, "10.96.0.40:80", Some("10.244.1.5"));
        assert_eq!(ips(&t), ["10.244.1.40:80"]);
        assert!(
            t.steps.iter().any(|s| s.contains("zone zone-a")),
            "{:?}",
            t.steps
        );
        assert_eq!(t.affinity_seconds, Some(10800));
        let reasons: Vec<&str> = t.excluded.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "topology hints for another node or zone",
                "terminating, and ready endpoints exist"
            ]
        );
        assert!(t.kernel.iter().any(|l| l.line.contains("SVCP-SVC-")));
    }

    #[test]
    fn names_resolve_through_the_dns_zone() {
        let w = world(ProxyMode::Nftables);
        let r = trace_name(&w, "web.demo.svc.cluster.local", None, None, Protocol::Tcp).unwrap();
        assert_eq!(r.traces.len(), 1);
        assert_eq!(r.traces[0].to, "10.96.0.10:80".parse().unwrap());
        let r = trace_name(&w, "docs.demo.svc.cluster.local", None, None, Protocol::Tcp).unwrap();
        assert_eq!(r.cname.as_deref(), Some("docs.example.com."));
        assert!(r.traces.is_empty());
        assert!(render_text(&r).contains("ExternalName"));
        let err = trace_name(&w, "nope.demo.svc.cluster.local", None, None, Protocol::Tcp)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NXDOMAIN"), "{err}");
        assert!(split_port("web.demo.svc.cluster.local:99999").is_err());
        assert_eq!(split_port("a.b:53").unwrap(), ("a.b", Some(53)));
    }
}
