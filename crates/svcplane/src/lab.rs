//! `svcplane lab`: the bundled example (examples/cluster) as a live virtual cluster.
//!
//! 1. Render the example as node-a would program it (no root needed) and show how a
//!    ClusterIP packet is dispatched.
//! 2. As root: build the test kit's virtual cluster (a bridge, the example's nodes, its
//!    Pods and hand-written EndpointSlice addresses as namespaces with echo servers, an
//!    external client), run `svcplane proxy --proxy-mode nftables --manifests DIR` on
//!    node-a for real, and send traffic down each Service path the example shows, with
//!    what kube-proxy's semantics predict next to what happened.
//! 3. Tear everything down: on success, on error, and on Ctrl-C / SIGTERM.
//!
//! The probes are written for the bundled example's Services; one whose Service is
//! missing from the directory is reported as skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use svcplane_model::{
    EndpointSlice, Format, IpFamily, NamespacedName, Node, Object, Pod, Protocol, Service,
};
use svcplane_testkit::{CLIENT_V4, Cluster, EchoReply, PodSpec, ProxyHandle, RequestError};

use crate::cli::{EngineArgs, LabArgs};
use crate::settings::EngineSettings;

/// The client's second address: inside demo/store's loadBalancerSourceRanges.
const CLIENT_ALLOWED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Per-request timeout; also how long a dropped packet is waited for.
const T: Duration = Duration::from_secs(1);

pub fn run(args: LabArgs) -> Result<()> {
    if crate::lab_walk::has_deployment(&args.manifests) {
        return crate::lab_walk::run(&args);
    }
    let dir = args.manifests.clone();
    let settings = EngineSettings::resolve(&EngineArgs {
        proxy_mode: Some("nftables".into()),
        manifests: Some(dir.clone()),
        hostname_override: Some(args.node.clone()),
        cluster_cidr: Some(args.cluster_cidr.clone()),
        ..EngineArgs::default()
    })?;
    render_excerpt(&settings, &dir)?;

    if !svcplane_testkit::is_root() {
        println!(
            "== the live virtual cluster needs root (network namespaces, nftables): \
             run `sudo make lab`. Only the render above was done."
        );
        return Ok(());
    }
    if let Some(tool) = ["ip", "nft", "sysctl"].into_iter().find(|t| !on_path(t)) {
        bail!("`{tool}` is not installed (make deps installs it)");
    }
    let stop = watch_signals()?;
    let started = Instant::now();
    let result = live(&args, &dir, &stop);
    // Every namespace is gone by now (the cluster was dropped inside `live`); say so
    // from the kernel's point of view, whatever happened.
    let left = leftover_namespaces();
    if left.is_empty() {
        println!(
            "== torn down: no namespace of this lab is left ({:.1} s in all)",
            started.elapsed().as_secs_f64()
        );
    } else {
        println!("== NOT torn down, still present: {}", left.join(" "));
    }
    if stop.load(Ordering::SeqCst) {
        // Whatever failed after the signal (the proxy got it too) is its consequence.
        bail!("interrupted");
    }
    match result? {
        0 => Ok(()),
        n => bail!("{n} probe(s) did not go as kube-proxy's semantics predict"),
    }
}

/// The existing render excerpt: the dispatch map and one service's chain.
fn render_excerpt(settings: &EngineSettings, dir: &Path) -> Result<()> {
    println!(
        "== svcplane render --proxy-mode nftables ({}) on {}",
        settings.node_name,
        dir.display()
    );
    let (script, problems) = crate::commands::render_script(settings)?;
    println!("-- reported:");
    for problem in &problems {
        println!("   {problem}");
    }
    println!(
        "-- script: {} lines. How a packet to a ClusterIP is dispatched (IPv4):",
        script.lines().count()
    );
    print_block(&script, |l| {
        l.starts_with("add element ip svcplane service-ips")
    });
    println!("-- and the demo/web service: pick an endpoint at random, DNAT to it:");
    print_block(&script, |l| {
        l.trim_start().starts_with("chain ") && l.contains("demo/web/tcp/http")
    });
    println!(
        "   (the whole script: svcplane render --manifests {} --hostname-override {} ...)",
        dir.display(),
        settings.node_name
    );
    Ok(())
}

/// Print the first block whose opening line matches `start`, up to its closing brace.
fn print_block(script: &str, start: impl Fn(&str) -> bool) {
    match block(script, start) {
        Some(lines) => {
            for line in lines {
                println!("   {line}");
            }
        }
        None => println!("   (not found in this script)"),
    }
}

/// The first block whose opening line matches `start`, up to the closing brace at its
/// own indentation (at most 20 lines), with that indentation removed.
pub(crate) fn block(script: &str, start: impl Fn(&str) -> bool) -> Option<Vec<&str>> {
    let mut lines = script.lines().skip_while(|l| !start(l));
    let first = lines.next()?;
    let indent = first.len() - first.trim_start().len();
    let mut out = vec![first.trim_start()];
    for line in lines.take(20) {
        out.push(line.get(indent..).unwrap_or(line.trim_start()));
        if line.trim() == "}" && line.len() - line.trim_start().len() == indent {
            break;
        }
    }
    Some(out)
}

pub(crate) fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// A flag set by SIGINT or SIGTERM, so the lab (and `bench datapath`) stops between steps
/// and tears down (the default action would kill it with every namespace left behind).
pub(crate) fn watch_signals() -> Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("cannot start the signal watcher")?;
    // Registered here, before any namespace exists, so no signal can slip through.
    let (mut int, mut term) = {
        let _guard = runtime.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("lab-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            flag.store(true, Ordering::SeqCst);
        })?;
    Ok(stop)
}

pub(crate) fn check(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Namespaces this process created (the test kit puts the pid in every name).
fn leftover_namespaces() -> Vec<String> {
    let tag = format!("-{}-", std::process::id());
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|name| name.starts_with("svk-") && name.contains(&tag))
                .collect()
        })
        .unwrap_or_default()
}

/// The objects of the manifests directory (same file rules as the proxy: `*.yaml`,
/// `*.yml`, `*.json`, not hidden), Pods included (the proxy's source consumes those).
#[derive(Default)]
struct Example {
    services: BTreeMap<NamespacedName, Service>,
    slices: Vec<EndpointSlice>,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
}

impl Example {
    fn load(dir: &Path) -> Result<Example> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| {
                Format::from_path(p).is_some()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| !n.starts_with('.'))
            })
            .collect();
        files.sort();
        let mut example = Example::default();
        for path in files {
            let Some(format) = Format::from_path(&path) else {
                continue;
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            // Unparsable files and invalid objects are the proxy's to report.
            let Ok(parsed) = svcplane_model::parse_manifest(&text, format) else {
                continue;
            };
            for object in parsed.objects {
                match object {
                    Object::Service(s) => {
                        example
                            .services
                            .insert(s.name.clone(), Arc::unwrap_or_clone(s));
                    }
                    Object::EndpointSlice(s) => example.slices.push(Arc::unwrap_or_clone(s)),
                    Object::Node(n) => example.nodes.push(Arc::unwrap_or_clone(n)),
                    Object::Pod(p) => example.pods.push(Arc::unwrap_or_clone(p)),
                }
            }
        }
        Ok(example)
    }
}

/// Who a reply came from or what source address a pod saw, by name.
struct Names(BTreeMap<IpAddr, String>);

impl Names {
    fn of(&self, ip: IpAddr) -> String {
        // IPv4 clients of a dual-stack socket show up mapped; name the IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.get(&ip).cloned().unwrap_or_else(|| ip.to_string())
    }
}

/// The live part; returns how many probes went other than predicted. The cluster and
/// the proxy are dropped (torn down) before it returns, also on error.
fn live(args: &LabArgs, dir: &Path, stop: &AtomicBool) -> Result<usize> {
    let example = Example::load(dir)?;
    let built = Instant::now();
    let cluster = build_cluster(&example, &args.node)?;
    check(stop)?;
    let names = names(&cluster);
    println!(
        "== live: a virtual cluster of network namespaces ({:.1} s to build)",
        built.elapsed().as_secs_f64()
    );
    let client = cluster.client();
    println!(
        "-- bridge; external client {CLIENT_V4} (+{})",
        client
            .extra_addresses()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    for node in cluster.nodes() {
        let pods: Vec<String> = cluster
            .pods()
            .iter()
            .filter(|p| p.node() == node.name())
            .map(|p| format!("{} {}", p.name(), p.ipv4()))
            .collect();
        println!("-- {} {}: {}", node.name(), node.ipv4(), pods.join(", "));
    }

    let log = tempfile::Builder::new()
        .prefix("svcplane-lab")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let log_file = log.path().join("proxy.log");
    let exe = std::env::current_exe().context("cannot find the svcplane binary")?;
    let manifests = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let started = Instant::now();
    let proxy = cluster
        .run_proxy_logged(
            &exe,
            &args.node,
            &manifests,
            &["--cluster-cidr", &args.cluster_cidr],
            &log_file,
        )
        .map_err(|e| anyhow::anyhow!("{e}\n{}", proxy_log(&log_file)))
        .with_context(|| format!("svcplane proxy on {}", args.node))?;
    println!(
        "== svcplane proxy --proxy-mode nftables --manifests {} on {}: first sync applied in {:.1} s",
        dir.display(),
        args.node,
        started.elapsed().as_secs_f64()
    );
    report_problems(&proxy, &log_file);
    check(stop)?;

    println!("-- traffic (in brackets: what kube-proxy's semantics predict; ok = it did):");
    let lab = Lab {
        cluster: &cluster,
        example: &example,
        names: &names,
        node: &args.node,
    };
    let mut unexpected = 0;
    for probe in probes() {
        check(stop)?;
        let (ok, line) = lab.run(&probe);
        println!("   {} {line}", if ok { "ok" } else { "!!" });
        if !ok {
            unexpected += 1;
        }
    }
    if unexpected > 0 {
        println!("-- the proxy's log:\n{}", proxy_log(&log_file));
    }
    println!("== tearing down (the proxy, then every namespace)");
    drop(proxy);
    drop(cluster);
    Ok(unexpected)
}

/// The cluster of the example: its nodes (which must have the test kit's addresses),
/// its Pods at their own addresses, and an endpoint host for every EndpointSlice address
/// that no Pod has.
fn build_cluster(example: &Example, proxy_node: &str) -> Result<Cluster> {
    let mut nodes: Vec<&Node> = example.nodes.iter().collect();
    nodes.sort_by_key(|n| first_v4(&n.addresses).unwrap_or(Ipv4Addr::BROADCAST));
    let mut builder = Cluster::builder();
    for (i, node) in nodes.iter().enumerate() {
        // The test kit gives node i 10.0.0.(11+i); the manifests must agree.
        let want = Ipv4Addr::new(10, 0, 0, 11 + i as u8);
        if first_v4(&node.addresses) != Some(want) {
            bail!(
                "Node {}: the lab's node #{} has InternalIP {want}; the manifests say {:?}",
                node.name,
                i + 1,
                node.addresses
            );
        }
        builder = builder.node(&node.name, node.zone.as_deref().unwrap_or(""));
    }
    if !nodes.iter().any(|n| n.name == proxy_node) {
        bail!("no Node {proxy_node:?} in the manifests");
    }
    let known = |node: Option<&str>| {
        node.filter(|n| nodes.iter().any(|m| m.name == *n))
            .map(str::to_string)
    };
    let mut taken = BTreeSet::new();
    for pod in &example.pods {
        let Some(node) = known(pod.node_name.as_deref()) else {
            continue;
        };
        if pod.finished || pod.ips.is_empty() {
            continue;
        }
        let mut spec = PodSpec::new(&pod.name.name, &node);
        for ip in &pod.ips {
            taken.insert(*ip);
            spec = match ip {
                IpAddr::V4(v4) => spec.ipv4(*v4),
                IpAddr::V6(v6) => spec.ipv6(*v6),
            };
        }
        for port in &pod.container_ports {
            spec = listen(spec, port.protocol, port.port);
        }
        builder = builder.pod(spec);
    }
    // Hand-written EndpointSlices name addresses no Pod has: one host per address, named
    // after its Service and node, serving the slice's ports.
    let mut hosts: BTreeMap<String, usize> = BTreeMap::new();
    for slice in &example.slices {
        let service = slice.service_name.as_deref().unwrap_or(&slice.name.name);
        for endpoint in &slice.endpoints {
            let Some(node) = known(endpoint.node_name().map(|n| &**n)) else {
                continue;
            };
            for ip in endpoint.addresses() {
                if !taken.insert(*ip) {
                    continue;
                }
                let base = format!("{service}-{node}");
                let n = hosts.entry(base.clone()).or_default();
                *n += 1;
                let name = if *n == 1 { base } else { format!("{base}-{n}") };
                let mut spec = PodSpec::new(&name, &node);
                spec = match ip {
                    IpAddr::V4(v4) => spec.ipv4(*v4),
                    IpAddr::V6(v6) => spec.ipv6(*v6),
                };
                for port in slice.ports.iter() {
                    spec = listen(spec, port.protocol, port.port);
                }
                builder = builder.pod(spec);
            }
        }
    }
    let cluster = builder
        .client_address(IpAddr::V4(CLIENT_ALLOWED))
        .client_gateway(proxy_node)
        .build()
        .context("cannot build the virtual cluster")?;
    // LoadBalancer and external IPs reach the proxy's node, as an upstream router would send them.
    for svc in example.services.values() {
        for ip in svc
            .rare
            .load_balancer_ips
            .iter()
            .chain(&svc.rare.external_ips)
        {
            let cidr = if ip.is_ipv4() {
                format!("{ip}/32")
            } else {
                format!("{ip}/128")
            };
            cluster.route_client_via(&cidr, proxy_node)?;
        }
    }
    Ok(cluster)
}

fn listen(spec: PodSpec, protocol: Protocol, port: u16) -> PodSpec {
    match protocol {
        Protocol::Tcp => spec.tcp(&[port]),
        Protocol::Udp => spec.udp(&[port]),
        // The echo server has no SCTP.
        Protocol::Sctp => spec,
    }
}

fn first_v4(addresses: &[IpAddr]) -> Option<Ipv4Addr> {
    addresses.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}

fn names(cluster: &Cluster) -> Names {
    let mut names = BTreeMap::new();
    for pod in cluster.pods() {
        names.insert(IpAddr::V4(pod.ipv4()), pod.name().to_string());
        names.insert(IpAddr::V6(pod.ipv6()), pod.name().to_string());
    }
    for node in cluster.nodes() {
        names.insert(IpAddr::V4(node.ipv4()), node.name().to_string());
        names.insert(IpAddr::V6(node.ipv6()), node.name().to_string());
    }
    names.insert(IpAddr::V4(CLIENT_V4), "client".to_string());
    for ip in cluster.client().extra_addresses() {
        names.insert(*ip, format!("client@{ip}"));
    }
    Names(names)
}

/// The invalid object(s) the proxy reported, from its log and its metrics.
fn report_problems(proxy: &ProxyHandle, log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for line in text.lines().map(strip_ansi) {
        if line.contains("invalid value") {
            // Drop the timestamp and level.
            let message: Vec<&str> = line.split_whitespace().skip(2).collect();
            println!("-- the proxy reported: {}", message.join(" "));
        }
    }
    match proxy.metrics() {
        Ok(metrics) => {
            let series = "svcplane_invalid_objects_total";
            match svcplane_testkit::metric_value(&metrics, series) {
                Some(n) => println!("-- /metrics on 127.0.0.1:10249: {series} {n}"),
                None => println!("-- /metrics: no {series}"),
            }
        }
        Err(e) => println!("-- /metrics: {e}"),
    }
}

fn proxy_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| format!("   | {}", strip_ansi(l)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The log's colour codes (`ESC [ ... m`), removed.
pub(crate) fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Where a probe's request comes from.
#[derive(Debug, Clone, Copy)]
enum Sender {
    Pod(&'static str),
    Client,
    /// The client's [`CLIENT_ALLOWED`] address.
    ClientAllowed,
}

/// Which address of the Service a probe sends to.
#[derive(Debug, Clone, Copy)]
enum To {
    ClusterIp(IpFamily),
    /// The NodePort on the proxy's node.
    NodePort,
    LoadBalancer,
    ExternalIp,
    /// `GET /` on the healthCheckNodePort of the proxy's node.
    HealthCheck,
}

/// What kube-proxy's semantics predict.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Every one of these answers at least once, and nothing else does.
    Spread(&'static [&'static str]),
    /// One of these answers every request (session affinity).
    Sticky(&'static [&'static str]),
    /// TCP RST / ICMP unreachable: no endpoints at all.
    Refused,
    /// No answer: dropped.
    Dropped,
    /// The healthCheckNodePort answers this status with this many local endpoints.
    Health(u16, u64),
}

/// The source address the endpoints must see.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// The sender's own (not masqueraded).
    Kept,
    /// The proxy node's (masqueraded).
    Masqueraded,
    Any,
}

struct Probe {
    service: &'static str,
    to: To,
    protocol: Protocol,
    from: Sender,
    requests: usize,
    expect: Expect,
    source: Source,
    /// Why that is the prediction, for the transcript.
    why: &'static str,
}

/// The example's Service paths. Spreads send enough requests that a random choice
/// between two endpoints misses one with probability 2^-29 or less.
fn probes() -> Vec<Probe> {
    use Expect::*;
    use IpFamily::*;
    let p = |service, to, from, requests, expect, source, why| Probe {
        service,
        to,
        protocol: Protocol::Tcp,
        from,
        requests,
        expect,
        source,
        why,
    };
    vec![
        p(
            "demo/web",
            To::ClusterIp(V4),
            Sender::Pod("shop-1"),
            40,
            Spread(&["web-1", "web-2"]),
            Source::Kept,
            "random over the ready endpoints; web-3 is not Ready",
        ),
        p(
            "demo/web",
            To::ClusterIp(V6),
            Sender::Pod("shop-1"),
            30,
            Spread(&["web-1", "web-2"]),
            Source::Kept,
            "the IPv6 ClusterIP, the pods' IPv6 addresses",
        ),
        p(
            "demo/node-cache",
            To::ClusterIp(V4),
            Sender::Pod("shop-1"),
            10,
            Spread(&["web-1"]),
            Source::Kept,
            "internalTrafficPolicy Local: this node's endpoint only",
        ),
        p(
            "demo/zonal",
            To::ClusterIp(V4),
            Sender::Pod("shop-1"),
            10,
            Spread(&["zonal-node-a"]),
            Source::Kept,
            "topology hints: node-a is in zone-a",
        ),
        p(
            "demo/draining",
            To::ClusterIp(V4),
            Sender::Pod("shop-1"),
            10,
            Spread(&["draining-node-a"]),
            Source::Kept,
            "no ready endpoint: the serving terminating one",
        ),
        p(
            "demo/empty",
            To::ClusterIp(V4),
            Sender::Pod("shop-1"),
            1,
            Refused,
            Source::Any,
            "no endpoints: rejected",
        ),
        p(
            "demo/shop",
            To::NodePort,
            Sender::Client,
            10,
            Spread(&["shop-1"]),
            Source::Kept,
            "externalTrafficPolicy Local: node-a's endpoint, client IP kept",
        ),
        p(
            "demo/store",
            To::LoadBalancer,
            Sender::ClientAllowed,
            10,
            Sticky(&["shop-1", "shop-2"]),
            Source::Masqueraded,
            "in loadBalancerSourceRanges; ClientIP affinity; eTP Cluster masquerades",
        ),
        p(
            "demo/store",
            To::LoadBalancer,
            Sender::Client,
            1,
            Dropped,
            Source::Any,
            "10.0.0.100 is outside loadBalancerSourceRanges",
        ),
        p(
            "demo/edge",
            To::HealthCheck,
            Sender::Client,
            1,
            Health(200, 1),
            Source::Any,
            "eTP Local LoadBalancer: node-a has web-1",
        ),
        Probe {
            protocol: Protocol::Udp,
            ..p(
                "demo/resolver",
                To::ExternalIp,
                Sender::Client,
                40,
                Spread(&["resolver-node-a", "resolver-node-b"]),
                Source::Masqueraded,
                "externalIPs, UDP; endpoints from a hand-written EndpointSlice",
            )
        },
        p(
            "demo/resolver",
            To::ExternalIp,
            Sender::Client,
            40,
            Spread(&["resolver-node-a", "resolver-node-b"]),
            Source::Masqueraded,
            "the same port number over TCP",
        ),
    ]
}

/// The sender's name, as [`names`] calls its address.
fn sender_name(from: Sender) -> String {
    match from {
        Sender::Pod(pod) => pod.to_string(),
        Sender::Client => "client".to_string(),
        Sender::ClientAllowed => format!("client@{CLIENT_ALLOWED}"),
    }
}

struct Lab<'a> {
    cluster: &'a Cluster,
    example: &'a Example,
    names: &'a Names,
    node: &'a str,
}

impl Lab<'_> {
    /// Run one probe: whether it went as predicted, and its transcript line.
    fn run(&self, probe: &Probe) -> (bool, String) {
        let service: Option<NamespacedName> = probe
            .service
            .split_once('/')
            .map(|(ns, name)| NamespacedName::new(ns, name));
        let Some(svc) = service.and_then(|n| self.example.services.get(&n)) else {
            return (
                true,
                format!("{}: not in the manifests, skipped", probe.service),
            );
        };
        let (dst, what) = match self.destination(svc, probe) {
            Ok(found) => found,
            Err(e) => return (false, format!("{}: {e}", probe.service)),
        };
        let from = sender_name(probe.from);
        let head = format!(
            "{} {what} {dst}/{} from {from}",
            probe.service,
            probe.protocol.as_k8s().to_lowercase()
        );
        let (ok, result) = match probe.expect {
            Expect::Health(status, endpoints) => self.health(dst, status, endpoints),
            _ => self.traffic(probe, dst),
        };
        (ok, format!("{head} ({})\n      -> {result}", probe.why))
    }

    fn destination(&self, svc: &Service, probe: &Probe) -> Result<(SocketAddr, &'static str)> {
        let port = svc
            .ports
            .iter()
            .find(|p| p.protocol == probe.protocol)
            .context("no port of that protocol")?;
        let node = self.cluster.node(self.node)?;
        let first = |ips: &[IpAddr], what: &str| {
            ips.first()
                .copied()
                .with_context(|| format!("no {what} in the manifests"))
        };
        Ok(match probe.to {
            To::ClusterIp(family) => {
                let ip = svc
                    .cluster_ips
                    .iter()
                    .copied()
                    .find(|ip| ip.is_ipv4() == (family == IpFamily::V4))
                    .context("no ClusterIP of that family")?;
                (SocketAddr::new(ip, port.port), "ClusterIP")
            }
            To::NodePort => {
                let node_port = port.node_port.context("no nodePort")?;
                (SocketAddr::new(node.ipv4().into(), node_port), "NodePort")
            }
            To::LoadBalancer => (
                SocketAddr::new(
                    first(&svc.rare.load_balancer_ips, "LoadBalancer IP")?,
                    port.port,
                ),
                "LoadBalancer",
            ),
            To::ExternalIp => (
                SocketAddr::new(first(&svc.rare.external_ips, "external IP")?, port.port),
                "externalIP",
            ),
            To::HealthCheck => {
                let hc = svc
                    .rare
                    .health_check_node_port
                    .context("no healthCheckNodePort")?;
                (
                    SocketAddr::new(node.ipv4().into(), hc),
                    "healthCheckNodePort",
                )
            }
        })
    }

    fn request(&self, probe: &Probe, dst: SocketAddr) -> Result<String, RequestError> {
        let client = self.cluster.client();
        let pod = match probe.from {
            Sender::Pod(name) => Some(self.cluster.pod(name).map_err(RequestError::Other)?),
            Sender::Client | Sender::ClientAllowed => None,
        };
        let src = matches!(probe.from, Sender::ClientAllowed).then_some(IpAddr::V4(CLIENT_ALLOWED));
        match (probe.protocol, pod, src) {
            (Protocol::Udp, Some(pod), _) => self.cluster.udp_request(pod, dst, T),
            (Protocol::Udp, None, Some(src)) => self.cluster.udp_request_from(client, src, dst, T),
            (Protocol::Udp, None, None) => self.cluster.udp_request(client, dst, T),
            (_, Some(pod), _) => self.cluster.tcp_request(pod, dst, T),
            (_, None, Some(src)) => self.cluster.tcp_request_from(client, src, dst, T),
            (_, None, None) => self.cluster.tcp_request(client, dst, T),
        }
    }

    fn traffic(&self, probe: &Probe, dst: SocketAddr) -> (bool, String) {
        let mut answered: BTreeMap<String, usize> = BTreeMap::new();
        let mut sources = BTreeSet::new();
        let mut failure = None;
        for _ in 0..probe.requests {
            match self.request(probe, dst) {
                Ok(reply) => match EchoReply::parse(&reply) {
                    Some(reply) => {
                        *answered.entry(self.names.of(reply.pod)).or_default() += 1;
                        sources.insert(self.names.of(reply.peer.ip()));
                    }
                    None => failure = Some(format!("not an echo reply: {reply:?}")),
                },
                Err(RequestError::Refused) => failure = Some("refused".to_string()),
                Err(RequestError::Timeout) => failure = Some("no answer (dropped)".to_string()),
                Err(e) => failure = Some(e.to_string()),
            }
            if failure.is_some() {
                break;
            }
        }
        let who: Vec<String> = answered.iter().map(|(n, c)| format!("{n} ×{c}")).collect();
        let sources: Vec<String> = sources.into_iter().collect();
        let summary = match &failure {
            Some(f) => f.clone(),
            None => format!(
                "{} answered by {}; source seen: {}",
                probe.requests,
                who.join(", "),
                sources.join(", ")
            ),
        };
        let answered: BTreeSet<&str> = answered.keys().map(String::as_str).collect();
        let ok = match probe.expect {
            Expect::Spread(want) => failure.is_none() && answered == want.iter().copied().collect(),
            Expect::Sticky(among) => {
                failure.is_none()
                    && answered.len() == 1
                    && answered.iter().all(|a| among.contains(a))
            }
            Expect::Refused => failure.as_deref() == Some("refused"),
            Expect::Dropped => failure.as_deref() == Some("no answer (dropped)"),
            // Health probes go to `health`, not here.
            Expect::Health(..) => false,
        };
        let from = sender_name(probe.from);
        let source_ok = failure.is_some()
            || match probe.source {
                Source::Kept => sources == [from],
                Source::Masqueraded => sources == [self.node.to_string()],
                Source::Any => true,
            };
        (ok && source_ok, summary)
    }

    fn health(&self, dst: SocketAddr, status: u16, endpoints: u64) -> (bool, String) {
        let client = self.cluster.client().netns().name();
        match svcplane_testkit::http_get(client, dst, "/", T) {
            Ok((code, body)) => {
                let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let local = json["localEndpoints"].as_u64();
                (
                    code == status && local == Some(endpoints),
                    format!("HTTP {code} {}", body.trim()),
                )
            }
            Err(e) => (false, format!("GET /: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_codes_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x: invalid value"),
            "2026  WARN x: invalid value"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn blocks_are_cut_at_their_own_closing_brace() {
        let script = "table ip t {\n\tchain a {\n\t\tx\n\t}\n\tchain web {\n\t\tdnat\n\t}\n}\n";
        assert_eq!(
            block(script, |l| l.contains("chain web")),
            Some(vec!["chain web {", "\tdnat", "}"])
        );
        assert_eq!(
            block(script, |l| l.starts_with("table")).map(|b| b.len()),
            Some(8)
        );
        assert_eq!(block(script, |l| l.contains("nothing")), None);
    }

    #[test]
    fn mapped_ipv4_sources_are_named() {
        let names = Names(BTreeMap::from([(
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100)),
            "client".to_string(),
        )]));
        assert_eq!(names.of("::ffff:10.0.0.100".parse().unwrap()), "client");
        assert_eq!(names.of("10.0.0.1".parse().unwrap()), "10.0.0.1");
    }

    #[test]
    fn the_bundled_example_has_every_probed_service() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cluster");
        let example = Example::load(&dir).unwrap();
        for probe in probes() {
            let (ns, name) = probe.service.split_once('/').unwrap();
            assert!(
                example
                    .services
                    .contains_key(&NamespacedName::new(ns, name)),
                "{} is not in examples/cluster",
                probe.service
            );
        }
        // Pods named by the probes exist in pods.yaml.
        for pod in ["shop-1", "web-1", "web-2"] {
            assert!(example.pods.iter().any(|p| &*p.name.name == pod), "{pod}");
        }
    }
}
