//! `svcplane bench datapath`: what the rules cost a packet. A virtual cluster (the test
//! kit's) has a node running `svcplane proxy` with N ClusterIP Services, a client pod and a
//! server pod on it; N−1 Services point at addresses that need not exist, and the one that
//! sorts last points at the server pod. From the client pod, new TCP connections (connect,
//! 1-byte request, 1-byte reply, close) go in turn through that ClusterIP and straight to
//! the pod's IP, so noise hits both alike and their ratio is what the Service costs.
//!
//! Straight to the pod still crosses the node's netfilter hooks (conntrack, the proxy's
//! nat chains: in a linear iptables dispatch every new connection walks every Service's
//! rule, whatever its destination). So a second node without a proxy, with its own pair of
//! pods, is measured in the same rounds: pod to pod with no rules at all.
//!
//! Why the service that sorts last: svcplane's renderers write services in sorted
//! ServicePortName order (`bench/svc-000000:http/TCP` …), so in a linear dispatch (the
//! iptables mode's KUBE-SERVICES list) its rule is the last one a new connection is
//! matched against: the worst case. kube-proxy writes them in Go map order, so there
//! "last" is random; a map or tree dispatch does not care.
//!
//! Every connection is new (the first packet of a flow is what the rules see; later
//! packets follow conntrack) and the client closes with SO_LINGER 0, so no TIME_WAIT
//! piles up and ports never run out.
//!
//! The cluster is built once ([`Rig`]); each run writes its Services and starts its own
//! proxy there, so `svcplane bench` (every mode × every size) measures with this same code.
//! A socket-level mode (ebpf) translates only sockets made inside the cgroup it attached
//! to, so for it the bench process joins that cgroup while it sends traffic.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use svcplane_dataplane::ProxyMode;
use svcplane_testkit::{Cluster, Manifests, Pod, PodSpec, ProxyHandle, ProxyLaunch, metric_value};

use super::progress::Progress;
use super::{
    ChangeStats, change_rounds, cluster_ip, endpoint_ip, service_yaml, slice_yaml, slice_yaml_on,
};
use crate::cli::BenchDatapathArgs;
use crate::lab::check;

const NODE: &str = "bench-node";
/// A second node without a proxy: pod to pod there is the reference without any rules.
const REF_NODE: &str = "ref-node";
/// Sockets made at a time per path (well below the usual limit of 1024 open files).
const SOCKET_BATCH: usize = 200;
/// The server pod's port (the Services' targetPort).
const POD_PORT: u16 = 8080;
/// The Services' port.
const SERVICE_PORT: u16 = 80;
/// Bounds how long one broken request hangs; never a measurement threshold.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Pairs sent before measuring (neighbour entries, caches, the server thread waking up).
const WARMUP: u32 = 100;
pub(super) const MAX_SERVICES: u32 = 500_000;
/// Dummy endpoints come from 10.128.0.0/9; stay below the virtual cluster's pods (10.244/16).
const MAX_DUMMY_ENDPOINTS: u64 = 4 << 20;
/// Each connection leaves a conntrack entry for 10 s (CLOSE state); stay far from the table's limit.
pub(super) const MAX_REQUESTS: u32 = 100_000;
/// The measured Service's endpoints at most: the server pod on as many ports.
const MAX_TARGET_ENDPOINTS: u32 = 5000;
/// Concurrent clients of the requests-per-second step.
const RPS_CLIENTS: usize = 4;
/// Lanes of source ports ([`SourcePorts`]): the four measured paths, then the
/// requests-per-second clients through the ClusterIP, then those straight to the pod.
pub(crate) const VIA_LANE: u16 = 0;
pub(crate) const DIRECT_LANE: u16 = 1;
const REFERENCE_LANE: u16 = 2;
const SPREAD_LANE: u16 = 3;
const RPS_VIA_LANES: u16 = 4;
const RPS_DIRECT_LANES: u16 = RPS_VIA_LANES + RPS_CLIENTS as u16;
/// The Service whose EndpointSlice the one-change rounds rewrite (in `changing.yaml`).
const CHANGING: &str = "svc-000000";

pub fn datapath(args: BenchDatapathArgs) -> Result<()> {
    if !svcplane_testkit::is_root() {
        bail!("`svcplane bench datapath` needs root (network namespaces and the proxy's rules)");
    }
    check_sizes(&args.services, args.endpoints, args.requests)?;
    if let Some(&t) = args
        .target_endpoints
        .iter()
        .find(|&&t| t == 0 || t > MAX_TARGET_ENDPOINTS)
    {
        bail!("--target-endpoints {t}: must be 1..={MAX_TARGET_ENDPOINTS}");
    }
    let proxy_args: Vec<String> = args
        .proxy_args
        .iter()
        .chain(&args.trailing_proxy_args)
        .cloned()
        .collect();
    if has_flag(&proxy_args, "--proxy-mode") {
        bail!("give the mode as `bench datapath --proxy-mode MODE`, not as a proxy argument");
    }
    // The mode's needs (a cgroup for its clients) come from the dataplane's description.
    let cgroup = args
        .proxy_mode
        .parse::<ProxyMode>()
        .map_err(|e| anyhow!("--proxy-mode: {e}"))?
        .flavours()
        .iter()
        .any(|f| f.cgroup);
    let label = std::iter::once(args.proxy_mode.as_str())
        .chain(proxy_args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "== {label}: connect + 1-byte request + close from a pod, {} new connections per path \
         (in turn: through the ClusterIP of the service that sorts last, straight to the pod IP, \
         and pod to pod on a node without rules)",
        args.requests
    );
    // Registered before any namespace exists; checked between steps and requests.
    let stop = crate::lab::watch_signals()?;
    let interrupted = |e: anyhow::Error| {
        // Whatever failed after the signal (the proxy got it too) is its consequence; the
        // cluster is torn down on the way out.
        if stop.load(Ordering::SeqCst) {
            anyhow!("interrupted")
        } else {
            e
        }
    };
    let max_target = args.target_endpoints.iter().copied().max().unwrap_or(1);
    let rig = Rig::new(&stop, max_target).map_err(interrupted)?;
    let mut rows = Vec::new();
    for (&services, &target_endpoints) in args
        .services
        .iter()
        .flat_map(|s| args.target_endpoints.iter().map(move |t| (s, t)))
    {
        let spec = RunSpec {
            mode: &args.proxy_mode,
            proxy_args: &proxy_args,
            cgroup,
            services,
            endpoints: args.endpoints,
            target_endpoints,
            requests: args.requests,
            first_sync_wait: args.first_sync_wait,
            rps: false,
            changes: 0,
        };
        let run = rig
            .run(&spec, &stop)
            .map_err(|e| interrupted(e.context(format!("at {services} services"))))?;
        println!("{}", run.row.line(&label));
        rows.push(run.row);
    }
    if rows.len() > 1 {
        println!("== summary");
        for row in &rows {
            println!("{}", row.line(&label));
        }
    }
    Ok(())
}

/// The sizes every datapath measurement accepts.
pub(super) fn check_sizes(services: &[u32], endpoints: u32, requests: u32) -> Result<()> {
    if endpoints == 0 {
        bail!("--endpoints 0: must be at least 1");
    }
    if services.is_empty() {
        bail!("--services: give at least one number of services");
    }
    for &n in services {
        if n == 0 || n > MAX_SERVICES {
            bail!("--services {n}: must be 1..={MAX_SERVICES}");
        }
        if u64::from(n) * u64::from(endpoints) > MAX_DUMMY_ENDPOINTS {
            bail!(
                "--services {n} × --endpoints {endpoints}: at most {MAX_DUMMY_ENDPOINTS} endpoints in all"
            );
        }
    }
    if requests == 0 || requests > MAX_REQUESTS {
        bail!("--requests {requests}: must be 1..={MAX_REQUESTS}");
    }
    Ok(())
}

/// One size's latency result.
pub(super) struct Row {
    pub services: u32,
    /// The measured Service's endpoints.
    pub target_endpoints: u32,
    pub via: Percentiles,
    pub direct: Percentiles,
    /// With several target endpoints: straight to the pod over all its ports in turn
    /// (the listening sockets the ClusterIP path reaches; a connection to a socket other
    /// than the last one's costs the server more, whatever the rules).
    pub spread: Option<Percentiles>,
    /// Pod to pod on a node without any rules.
    pub reference: Percentiles,
    pub full_sync: Option<f64>,
}

impl Row {
    fn line(&self, label: &str) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
        let mut out = format!(
            "{label} {} svc, target {} endpoint(s): via ClusterIP p50 {:.0} µs p99 {:.0} µs | direct p50 {:.0} µs p99 {:.0} µs \
             | ratio p50 {:.2} p99 {:.2}",
            self.services,
            self.target_endpoints,
            us(self.via.p50),
            us(self.via.p99),
            us(self.direct.p50),
            us(self.direct.p99),
            ratio(self.via.p50, self.direct.p50),
            ratio(self.via.p99, self.direct.p99),
        );
        match self.full_sync {
            Some(s) => {
                let _ = write!(out, " | full sync {s:.2} s");
            }
            None => out.push_str(" | full sync: not reported by the proxy"),
        }
        let _ = write!(
            out,
            "\n    reference, pod to pod on a node without rules: p50 {:.0} µs p99 {:.0} µs; \
             via ClusterIP ÷ that: p50 {:.2} p99 {:.2}; direct ÷ that: p50 {:.2} p99 {:.2}",
            us(self.reference.p50),
            us(self.reference.p99),
            ratio(self.via.p50, self.reference.p50),
            ratio(self.via.p99, self.reference.p99),
            ratio(self.direct.p50, self.reference.p50),
            ratio(self.direct.p99, self.reference.p99),
        );
        if let Some(spread) = &self.spread {
            let _ = write!(
                out,
                "\n    straight to the pod over its {} ports in turn (the sockets the ClusterIP reaches): \
                 p50 {:.0} µs p99 {:.0} µs; via ClusterIP ÷ that: p50 {:.2} p99 {:.2}",
                self.target_endpoints,
                us(spread.p50),
                us(spread.p99),
                ratio(self.via.p50, spread.p50),
                ratio(self.via.p99, spread.p99),
            );
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Percentiles {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

impl Percentiles {
    /// Nearest-rank percentiles; `None` without samples.
    pub(crate) fn of(mut samples: Vec<Duration>) -> Option<Percentiles> {
        samples.sort_unstable();
        let rank = |p: f64| {
            let i = (p * samples.len() as f64).ceil() as usize;
            samples.get(i.saturating_sub(1)).copied()
        };
        Some(Percentiles {
            p50: rank(0.50)?,
            p99: rank(0.99)?,
        })
    }
}

/// What one run measures: a proxy in `mode` with `proxy_args` on `services` Services.
pub(super) struct RunSpec<'a> {
    pub mode: &'a str,
    pub proxy_args: &'a [String],
    /// The mode attaches to a cgroup: give it a scratch one (and pins), and measure from
    /// inside it.
    pub cgroup: bool,
    pub services: u32,
    pub endpoints: u32,
    /// The measured Service's endpoints (the server pod on that many ports).
    pub target_endpoints: u32,
    /// New connections per path.
    pub requests: u32,
    pub first_sync_wait: Duration,
    /// Also requests per second ([`RPS_CLIENTS`] concurrent clients, `requests` per path).
    pub rps: bool,
    /// Also this many one-change rounds (after the traffic).
    pub changes: u32,
}

/// One run's results.
pub(super) struct RunResult {
    pub row: Row,
    /// Requests per second through the ClusterIP and straight to the pod.
    pub rps: Option<(f64, f64)>,
    pub changes: Option<ChangeStats>,
    /// The proxy's resident set at the end of the run, and its peak, in bytes.
    pub rss: Option<(u64, u64)>,
}

/// The virtual cluster every run of a bench shares: a node for the proxy with a client
/// and a server pod, a node without rules with its own pair, the servers answering. Each
/// run writes its Services and starts (and stops) its own proxy on it.
pub(super) struct Rig {
    // Dropped in this order: the servers, the manifests, then the cluster.
    _server: PingServer,
    manifests: Manifests,
    logs: tempfile::TempDir,
    exe: PathBuf,
    client: String,
    server: Ipv4Addr,
    ref_client: String,
    ref_server: Ipv4Addr,
    cluster: Cluster,
}

impl Rig {
    /// `target_endpoints`: the most endpoints a run gives the measured Service (the server
    /// pod listens on that many ports).
    pub(super) fn new(stop: &AtomicBool, target_endpoints: u32) -> Result<Rig> {
        let cluster = Cluster::builder()
            .node(NODE, "bench-zone")
            .node(REF_NODE, "bench-zone")
            .pod(PodSpec::new("client", NODE))
            .pod(PodSpec::new("server", NODE))
            .pod(PodSpec::new("ref-client", REF_NODE))
            .pod(PodSpec::new("ref-server", REF_NODE))
            .build()
            .context("cannot build the virtual cluster")?;
        check(stop)?;
        let netns = |pod: &Pod| pod.netns().name().to_owned();
        let (client, server) = (cluster.pod("client")?, cluster.pod("server")?);
        let (ref_client, ref_server) = (cluster.pod("ref-client")?, cluster.pod("ref-server")?);
        let reference = SocketAddr::new(ref_server.ipv4().into(), POD_PORT);
        // The first is POD_PORT: the direct path's.
        let mut listen: Vec<(&str, SocketAddr)> = (0..target_endpoints.max(1))
            .map(|k| {
                let port = target_port(k)?;
                Ok((
                    server.netns().name(),
                    SocketAddr::new(server.ipv4().into(), port),
                ))
            })
            .collect::<Result<_>>()?;
        listen.push((ref_server.netns().name(), reference));
        let ping =
            PingServer::start(&listen).context("cannot start the servers in the server pods")?;
        Ok(Rig {
            _server: ping,
            manifests: cluster.manifests()?,
            logs: tempfile::tempdir().context("cannot create a directory for the proxy's log")?,
            exe: std::env::current_exe().context("cannot find the svcplane binary")?,
            client: netns(client),
            server: server.ipv4(),
            ref_client: netns(ref_client),
            ref_server: ref_server.ipv4(),
            cluster,
        })
    }

    /// Write the Services, start the proxy, measure, stop it and remove what it programmed.
    pub(super) fn run(&self, spec: &RunSpec<'_>, stop: &AtomicBool) -> Result<RunResult> {
        let services = spec.services;
        let written = Instant::now();
        let (yaml, changing, target) =
            services_yaml(services, spec.endpoints, spec.target_endpoints, self.server)?;
        self.manifests
            .write("services.yaml", &yaml)
            .context("writing services.yaml")?;
        self.manifests
            .write("changing.yaml", &changing)
            .context("writing changing.yaml")?;
        println!(
            "== {services} ClusterIP services written in {:.1} s; measured: bench/{} {}:{SERVICE_PORT} → {}:{POD_PORT}{} (sorts last)",
            written.elapsed().as_secs_f64(),
            target.name,
            target.cluster_ip,
            self.server,
            match spec.target_endpoints {
                0 | 1 => String::new(),
                n => format!(
                    "..{} ({n} endpoints: the pod on {n} ports)",
                    u32::from(POD_PORT) + n - 1
                ),
            },
        );
        let scratch = spec.cgroup.then(EbpfScratch::new).transpose()?;
        let mut argv: Vec<String> = vec!["--proxy-mode".into(), spec.mode.into()];
        // No periodic check in the middle of a measurement (it probes the kernel's tables).
        if !has_flag(spec.proxy_args, "--sync-period") {
            argv.extend(["--sync-period".into(), "1h".into()]);
        }
        if let Some(s) = &scratch {
            argv.extend(s.proxy_args());
        }
        argv.extend(spec.proxy_args.iter().cloned());
        let result = self.run_proxy(spec, &argv, &target, scratch.as_ref(), stop);
        // Whatever happened, the next run starts from a node without this mode's rules.
        let cleaned = self.cleanup(spec.mode, scratch.as_ref());
        let result = result?;
        cleaned?;
        Ok(result)
    }

    fn run_proxy(
        &self,
        spec: &RunSpec<'_>,
        argv: &[String],
        target: &Target,
        scratch: Option<&EbpfScratch>,
        stop: &AtomicBool,
    ) -> Result<RunResult> {
        let log = self.logs.path().join("proxy.log");
        let started = Instant::now();
        let argv_str: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut proxy = self
            .cluster
            .launch_proxy(
                &self.exe,
                NODE,
                self.manifests.path(),
                &argv_str,
                &ProxyLaunch {
                    log: Some(log.clone()),
                    no_wait: true,
                    ..ProxyLaunch::default()
                },
            )
            .context("cannot start svcplane proxy")?;
        wait_ready(&mut proxy, spec, stop)
            .map_err(|e| anyhow!("{e}; the proxy's log ends with:\n{}", log_tail(&log)))?;
        let metrics = proxy.metrics().context("reading the proxy's metrics")?;
        let full_sync = first_full_sync(&metrics);
        println!(
            "== svcplane proxy {}: ready (read the manifests, first full sync) after {:.2} s; the sync itself {}",
            argv.join(" "),
            started.elapsed().as_secs_f64(),
            full_sync.map_or("not reported".to_owned(), |s| format!("{s:.2} s")),
        );

        // A socket-level mode translates only sockets made inside its cgroup: this whole
        // process joins it for the traffic (every path alike, as every pod's would).
        let member = scratch
            .map(|s| s.cgroup.enter())
            .transpose()
            .context("cannot join the proxy's cgroup")?;
        let direct = SocketAddr::new(self.server.into(), POD_PORT);
        let via = SocketAddr::new(target.cluster_ip.into(), SERVICE_PORT);
        let reference = SocketAddr::new(self.ref_server.into(), POD_PORT);
        let mut paths = vec![
            Route::new("through the ClusterIP", &self.client, via, VIA_LANE),
            Route::new("straight to the pod at", &self.client, direct, DIRECT_LANE),
            Route::new(
                "on the node without rules to",
                &self.ref_client,
                reference,
                REFERENCE_LANE,
            ),
        ];
        if let Ok(n @ 2..) = u16::try_from(spec.target_endpoints) {
            paths.push(
                Route::new(
                    "straight to the pod over its ports at",
                    &self.client,
                    direct,
                    SPREAD_LANE,
                )
                .over_ports(n),
            );
        }
        measure(&mut paths, spec.requests, stop)?;
        let mut percentiles = paths.into_iter().map(|p| Percentiles::of(p.samples));
        let mut next = || percentiles.next().flatten().context("no samples");
        let (via_p, direct_p, reference_p) = (next()?, next()?, next()?);
        let spread_p = next().ok();
        let rps = if spec.rps {
            let mut progress = Progress::new("requests per second", 2 * u64::from(spec.requests));
            let (c, r) = (&self.client, spec.requests);
            let through = rps(c, via, RPS_VIA_LANES, r, &mut progress, stop)?;
            let straight = rps(c, direct, RPS_DIRECT_LANES, r, &mut progress, stop)?;
            Some((through, straight))
        } else {
            None
        };
        drop(member);
        let changes = if spec.changes > 0 {
            let mut progress = Progress::new("one-change rounds", u64::from(spec.changes));
            let pid = proxy.pid();
            let stats = change_rounds(
                spec.changes,
                || proxy.metrics().map_err(Into::into),
                || pid.and_then(super::cpu_seconds),
                |round| write_changing_slice(&self.manifests, spec.endpoints, round),
                || {
                    progress.inc();
                    check(stop)
                },
            )?;
            Some(stats)
        } else {
            None
        };
        let rss = proxy.pid().and_then(rss_of);
        if !proxy.is_running() {
            bail!("the proxy exited during the measurement");
        }
        let _ = proxy.terminate();
        Ok(RunResult {
            row: Row {
                services: spec.services,
                target_endpoints: spec.target_endpoints,
                via: via_p,
                direct: direct_p,
                spread: spread_p,
                reference: reference_p,
                full_sync,
            },
            rps,
            changes,
            rss,
        })
    }

    /// `svcplane cleanup --proxy-mode MODE` on the proxy's node.
    fn cleanup(&self, mode: &str, scratch: Option<&EbpfScratch>) -> Result<()> {
        let node = self.cluster.node(NODE)?;
        let mut args = vec!["cleanup", "--proxy-mode", mode];
        let pins = scratch.map(|s| s.pins.to_string_lossy().into_owned());
        if let Some(p) = &pins {
            args.extend(["--bpf-pin-path", p]);
        }
        let exe = self.exe.to_string_lossy();
        svcplane_testkit::run_checked(&mut node.netns().command(&exe, &args))
            .with_context(|| format!("svcplane {} on {NODE}", args.join(" ")))?;
        Ok(())
    }
}

/// Wait (with a spinner) until the proxy is ready, has exited, or the wait is over.
fn wait_ready(proxy: &mut ProxyHandle, spec: &RunSpec<'_>, stop: &AtomicBool) -> Result<()> {
    let mut spinner = Progress::spinner(format!(
        "{} on {} services: waiting for the first sync",
        spec.mode, spec.services
    ));
    let mut exited = false;
    let ready = svcplane_testkit::wait_until(spec.first_sync_wait, || {
        spinner.draw();
        exited = !proxy.is_running();
        exited || stop.load(Ordering::SeqCst) || proxy.is_ready()
    });
    check(stop)?;
    if exited {
        bail!("svcplane proxy on {NODE} exited before it was ready");
    }
    if !ready {
        bail!(
            "svcplane proxy on {NODE} not ready after {:?}",
            spec.first_sync_wait
        );
    }
    Ok(())
}

/// A socket-level mode's scratch: a cgroup of its own to attach to and a pin directory
/// of its own (the host's pins and services are untouched); removed on drop.
struct EbpfScratch {
    cgroup: svcplane_testkit::Cgroup,
    pins: PathBuf,
}

impl EbpfScratch {
    fn new() -> Result<EbpfScratch> {
        let (bpffs, _) = svcplane_testkit::bpf_test_mounts().context("bpffs for the bench")?;
        Ok(EbpfScratch {
            cgroup: svcplane_testkit::Cgroup::new("svcplane-bench")
                .context("a scratch cgroup for the bench")?,
            pins: bpffs.join(format!("bench-{}", std::process::id())),
        })
    }

    fn proxy_args(&self) -> [String; 4] {
        [
            "--bpf-pin-path".into(),
            self.pins.to_string_lossy().into_owned(),
            "--cgroup-path".into(),
            self.cgroup.path().to_string_lossy().into_owned(),
        ]
    }
}

impl Drop for EbpfScratch {
    fn drop(&mut self) {
        // Rig::cleanup unpinned everything; the directory itself may be left.
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// VmRSS and VmHWM of process `pid`, in bytes.
pub(super) fn rss_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |field: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((kib("VmRSS:")? * 1024, kib("VmHWM:")? * 1024))
}

/// The first full sync's duration from the proxy's metrics (as `bench sync` reads it).
fn first_full_sync(metrics: &str) -> Option<f64> {
    const FULL: &str = "kubeproxy_sync_full_proxy_rules_duration_seconds";
    let count = metric_value(metrics, &format!("{FULL}_count"))?;
    let sum = metric_value(metrics, &format!("{FULL}_sum"))?;
    // Only the first sync has run when the proxy just became ready; divide anyway.
    (count >= 1.0).then(|| sum / count)
}

/// The source ports one path's sockets bind to, in turn: each path (and each
/// requests-per-second client) has a range of its own, below the kernel's ephemeral
/// range. Why: IPVS matches a reply by client address:port and real server address:port
/// whatever address the client connected to, so while its table still holds a
/// connection through the ClusterIP (CLOSE for 10 s after the RST, TIME_WAIT for 2 min
/// after a FIN), a direct connection from the same port to the same pod gets its SYN-ACK
/// rewritten to come from the ClusterIP and never completes (kubernetes#90042, open in
/// kube-proxy's IPVS mode too). Ports the kernel picks collide that way now and then.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourcePorts {
    next: u16,
    lane: u16,
}

impl SourcePorts {
    const FIRST: u16 = 10_000;
    /// Far more than the sockets made at a time ([`SOCKET_BATCH`]).
    const PER_LANE: u16 = 1_500;

    pub(crate) fn lane(lane: u16) -> SourcePorts {
        SourcePorts { next: 0, lane }
    }

    fn take(&mut self) -> u16 {
        let port = Self::FIRST + self.lane * Self::PER_LANE + self.next;
        self.next = (self.next + 1) % Self::PER_LANE;
        port
    }
}

/// One measured path (route): from which pod to which address, and its samples.
pub(crate) struct Route {
    what: &'static str,
    /// The client pod's namespace: its sockets are created there.
    netns: String,
    dst: SocketAddr,
    /// Request `i` goes to `dst`'s port + `i % dst_ports`.
    dst_ports: u16,
    ports: SourcePorts,
    /// Sockets made in advance, a batch at a time (see [`new_sockets`]).
    spare: Vec<Socket>,
    pub(crate) samples: Vec<Duration>,
}

impl Route {
    /// `lane`: which range of source ports ([`SourcePorts`]) its sockets bind to; two
    /// routes used at the same time or in turn from one pod need different lanes.
    pub(crate) fn new(what: &'static str, netns: &str, dst: SocketAddr, lane: u16) -> Route {
        Route {
            what,
            netns: netns.to_owned(),
            dst,
            dst_ports: 1,
            ports: SourcePorts::lane(lane),
            spare: Vec::new(),
            samples: Vec::new(),
        }
    }

    /// Requests go to `n` consecutive ports from `dst`'s, in turn.
    pub(crate) fn over_ports(self, n: u16) -> Route {
        Route {
            dst_ports: n.max(1),
            ..self
        }
    }

    /// Request `i`; its time is kept unless warming up.
    fn request(&mut self, i: u32, keep: bool) -> Result<()> {
        if self.spare.is_empty() {
            self.spare = new_sockets(&self.netns, self.dst, &mut self.ports, SOCKET_BATCH)
                .with_context(|| format!("cannot make sockets in {}", self.netns))?;
        }
        let Some(sock) = self.spare.pop() else {
            bail!("no socket made in {}", self.netns);
        };
        let mut dst = self.dst;
        let offset = i % u32::from(self.dst_ports);
        dst.set_port(dst.port().saturating_add(offset as u16));
        let took =
            request(sock, dst).with_context(|| format!("request {i} {} {dst}", self.what))?;
        if keep {
            self.samples.push(took);
        }
        Ok(())
    }
}

/// R rounds of one request per path (after a warm-up), rotating which path goes first so
/// that none always follows the same other one.
pub(crate) fn measure(paths: &mut [Route], requests: u32, stop: &AtomicBool) -> Result<()> {
    let warmup = WARMUP.min(requests);
    let mut progress = Progress::new(
        "connect + request + close, per path",
        u64::from(warmup + requests),
    );
    for i in 0..warmup {
        check(stop)?;
        for path in paths.iter_mut() {
            path.request(i, false)?;
        }
        progress.inc();
    }
    let n = paths.len();
    for i in 0..requests {
        check(stop)?;
        for k in 0..n {
            paths[(i as usize + k) % n].request(i, true)?;
        }
        progress.inc();
    }
    Ok(())
}

/// Requests per second to `dst` from pod `netns`: `requests` new connections (connect,
/// request, reply, close) from [`RPS_CLIENTS`] concurrent clients, over the time from
/// their start to the last one's end.
fn rps(
    netns: &str,
    dst: SocketAddr,
    first_lane: u16,
    requests: u32,
    progress: &mut Progress,
    stop: &AtomicBool,
) -> Result<f64> {
    let done = std::sync::atomic::AtomicU32::new(0);
    let share = |k: usize| {
        let (k, n) = (k as u32, RPS_CLIENTS as u32);
        requests / n + u32::from(k < requests % n)
    };
    let started = Instant::now();
    let ended = std::thread::scope(|scope| -> Result<Instant> {
        let workers: Vec<_> = (0..RPS_CLIENTS)
            .map(|k| {
                let done = &done;
                scope.spawn(move || -> Result<Instant> {
                    let lane = first_lane + k as u16;
                    let mut route = Route::new("(requests per second) to", netns, dst, lane);
                    for i in 0..share(k) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        route.request(i, false)?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Instant::now())
                })
            })
            .collect();
        // The bar follows the workers; they never wait on it, and their own clocks say
        // when they finished.
        let mut shown = 0;
        while workers.iter().any(|w| !w.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
            let now = done.load(Ordering::Relaxed);
            for _ in shown..now {
                progress.inc();
            }
            shown = now;
        }
        let mut last = started;
        for w in workers {
            let end = w
                .join()
                .map_err(|_| anyhow!("a requests-per-second client panicked"))??;
            last = last.max(end);
        }
        Ok(last)
    })?;
    check(stop)?;
    Ok(f64::from(requests) / (ended - started).as_secs_f64())
}

/// `n` TCP sockets for `dst`, made inside `netns` (a socket stays in the namespace it was
/// made in, so any thread can use it; the measuring thread never changes namespace, and
/// making them is not part of what is measured).
fn new_sockets(
    netns: &str,
    dst: SocketAddr,
    ports: &mut SourcePorts,
    n: usize,
) -> io::Result<Vec<Socket>> {
    svcplane_testkit::in_netns(netns, || {
        (0..n)
            .map(|_| {
                let sock =
                    Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
                let any: std::net::IpAddr = match dst {
                    SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                };
                sock.set_reuse_address(true)?;
                sock.bind(&SockAddr::from(SocketAddr::new(any, ports.take())))?;
                // Close with RST: no TIME_WAIT on either side, so R can be large without
                // running out of ports, and a reused port starts a fresh conntrack entry
                // (the first-packet path again).
                sock.set_linger(Some(Duration::ZERO))?;
                sock.set_tcp_nodelay(true)?;
                sock.set_read_timeout(Some(REQUEST_TIMEOUT))?;
                Ok(sock)
            })
            .collect()
    })?
}

/// One new connection on a fresh socket: connect, 1 byte out, 1 byte back, close; how
/// long that took.
fn request(sock: Socket, dst: SocketAddr) -> io::Result<Duration> {
    let started = Instant::now();
    let exchange = |sock: &Socket| -> io::Result<[u8; 1]> {
        sock.connect_timeout(&SockAddr::from(dst), REQUEST_TIMEOUT)?;
        let mut sock = sock;
        sock.write_all(b"?")?;
        let mut reply = [0u8; 1];
        sock.read_exact(&mut reply)?;
        Ok(reply)
    };
    // A failure names the source port: it is the flow's key in conntrack's and IPVS's tables.
    let reply = exchange(&sock).map_err(|e| {
        let from = sock.local_addr().ok().and_then(|a| a.as_socket());
        match from {
            Some(a) => io::Error::new(e.kind(), format!("{e} (from {a})")),
            None => e,
        }
    })?;
    drop(sock);
    let took = started.elapsed();
    if reply != *b"!" {
        return Err(io::Error::other(format!("unexpected reply {reply:?}")));
    }
    Ok(took)
}

/// Request/response TCP servers in pods: accept, read 1 byte, answer 1 byte, close. (The
/// test kit's echo server answers on accept without reading, so the request would not be
/// part of the exchange.) One thread serves every pod's listener, so no path gets a server
/// thread that the scheduler treats differently. Each listener is created inside its pod's
/// namespace and stays there; the serving thread needs no namespace of its own.
pub(crate) struct PingServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PingServer {
    /// Listen on each `(netns, address)`; returns once every listener is bound.
    pub(crate) fn start(listen: &[(&str, SocketAddr)]) -> io::Result<PingServer> {
        let mut listeners = Vec::new();
        for &(netns, addr) in listen {
            let sock = svcplane_testkit::in_netns(netns, || -> io::Result<Socket> {
                let sock =
                    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                sock.set_reuse_address(true)?;
                sock.bind(&SockAddr::from(addr))?;
                sock.listen(1024)?;
                // Accept only what poll reported, and never block on a vanished one.
                sock.set_nonblocking(true)?;
                Ok(sock)
            })??;
            listeners.push(sock);
        }
        // epoll, not poll: with a Service of many endpoints the server pod has as many
        // listeners, and a wake-up must not cost a scan of all of them.
        // SAFETY: plain syscall; the descriptor is owned below.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `epfd` is a fresh descriptor nobody else owns.
        let epoll = unsafe { std::os::fd::OwnedFd::from_raw_fd(epfd) };
        for (i, l) in listeners.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: valid descriptors and a valid event for the call's duration.
            if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, l.as_raw_fd(), &mut ev) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-ping".to_owned())
            .spawn(move || {
                let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
                while !stopped.load(Ordering::Relaxed) {
                    // The timeout only bounds how long a stop request waits.
                    // SAFETY: `events` is a valid, exclusively borrowed array of its length.
                    let n = unsafe {
                        libc::epoll_wait(
                            epoll.as_raw_fd(),
                            events.as_mut_ptr(),
                            events.len() as libc::c_int,
                            100,
                        )
                    };
                    for ev in events.iter().take(usize::try_from(n).unwrap_or(0)) {
                        let Some(listener) = listeners.get(ev.u64 as usize) else {
                            continue;
                        };
                        while let Ok((conn, _)) = listener.accept() {
                            answer(&conn);
                        }
                    }
                }
            })?;
        Ok(PingServer {
            stop,
            thread: Some(thread),
        })
    }
}

/// Read the 1-byte request and answer it; a broken client only costs its own exchange.
fn answer(conn: &Socket) {
    // Accepted sockets do not inherit O_NONBLOCK on Linux; be explicit anyway.
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_tcp_nodelay(true);
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut byte = [0u8; 1];
    let mut conn = conn;
    if conn.read_exact(&mut byte).is_ok() {
        let _ = conn.write_all(b"!");
    }
}

impl Drop for PingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The measured service: the one that sorts last.
struct Target {
    name: String,
    cluster_ip: Ipv4Addr,
}

/// `services` ClusterIP Services in namespace `bench`, `svc-000000` … (zero-padded so that
/// name order is index order); each but the last has `endpoints` dummy endpoints, the last
/// has the server pod on `target_endpoints` ports (one slice per port: an EndpointSlice's
/// ports apply to all its endpoints, so distinct (address, port) endpoints of one address
/// need a slice each). Returns every object but `svc-000000`'s EndpointSlice, that slice
/// (`changing.yaml`: the one-change rounds rewrite it, after the traffic, so with a single
/// Service they may take the pod away), and the measured Service.
fn services_yaml(
    services: u32,
    endpoints: u32,
    target_endpoints: u32,
    pod: Ipv4Addr,
) -> Result<(String, String, Target)> {
    let mut out = String::with_capacity(services as usize * (400 + 60 * endpoints as usize));
    let mut changing = String::new();
    let name = |i: u32| format!("svc-{i:06}");
    let last = services.saturating_sub(1);
    for i in 0..services {
        service_yaml(&mut out, &name(i), cluster_ip(i));
        let slice = if i == 0 { &mut changing } else { &mut out };
        if i == last {
            for k in 0..target_endpoints.max(1) {
                slice_yaml_on(slice, &name(i), k + 1, target_port(k)?, [pod]);
            }
        } else {
            let first = i * endpoints;
            slice_yaml(slice, &name(i), (first..first + endpoints).map(endpoint_ip));
        }
    }
    let target = Target {
        name: name(last),
        cluster_ip: cluster_ip(last),
    };
    Ok((out, changing, target))
}

/// The server pod's `k`-th port for the measured Service (the first is [`POD_PORT`]).
fn target_port(k: u32) -> Result<u16> {
    u16::try_from(u32::from(POD_PORT) + k).context("too many target endpoints for the ports")
}

/// Round `round` of the one-change rounds: [`CHANGING`]'s slice with its endpoint window
/// moved by one address (one endpoint leaves, one arrives).
fn write_changing_slice(manifests: &Manifests, endpoints: u32, round: u32) -> Result<()> {
    let mut out = String::new();
    let window = super::changing_window(endpoints, round).map(endpoint_ip);
    slice_yaml(&mut out, CHANGING, window);
    manifests
        .write("changing.yaml", &out)
        .context("writing the changed slice")?;
    Ok(())
}

/// `FLAG` given as `FLAG VALUE` or `FLAG=VALUE`.
fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| {
        a == flag
            || a.strip_prefix(flag)
                .is_some_and(|rest| rest.starts_with('='))
    })
}

/// The last lines of the proxy's log, to show why it did not become ready.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let us = Duration::from_micros;
        let p = Percentiles::of((1..=100).map(us).collect()).unwrap();
        assert_eq!((p.p50, p.p99), (us(50), us(99)));
        let p = Percentiles::of(vec![us(7)]).unwrap();
        assert_eq!((p.p50, p.p99), (us(7), us(7)));
        assert!(Percentiles::of(Vec::new()).is_none());
    }

    #[test]
    fn the_measured_service_sorts_last_and_has_the_pod() {
        let pod = Ipv4Addr::new(10, 244, 1, 11);
        let (main, changing, target) = services_yaml(12, 2, 1, pod).unwrap();
        let yaml = format!("{main}{changing}");
        let names: Vec<&str> = yaml
            .lines()
            .filter_map(|l| l.strip_prefix("metadata: {name: "))
            .filter_map(|l| l.split_once(", namespace: bench}"))
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names.len(), 12, "{yaml}");
        assert_eq!(names.iter().max(), Some(&target.name.as_str()));
        assert_eq!(target.name, "svc-000011");
        assert_eq!(target.cluster_ip, cluster_ip(11));
        // The pod is the last service's only endpoint, and nobody else's.
        let (_, last_slice) = main.rsplit_once("name: svc-000011-1").unwrap();
        assert!(last_slice.contains(&format!("[\"{pod}\"]")), "{last_slice}");
        assert_eq!(yaml.matches(&pod.to_string()).count(), 1);
        assert_eq!(yaml.matches("addresses:").count(), 11 * 2 + 1);
        // The changing slice is svc-000000's, and only there.
        assert!(
            changing.contains(&format!("name: {CHANGING}-1,")),
            "{changing}"
        );
        assert!(!main.contains(&format!("name: {CHANGING}-1,")));
        assert_eq!(changing.matches("addresses:").count(), 2);
    }

    #[test]
    fn a_single_service_is_measured_and_changed() {
        let pod = Ipv4Addr::new(10, 244, 1, 11);
        let (main, changing, target) = services_yaml(1, 3, 1, pod).unwrap();
        assert_eq!(target.name, CHANGING);
        assert!(main.contains("kind: Service\n"), "{main}");
        assert!(!main.contains("EndpointSlice"), "{main}");
        assert!(changing.contains(&format!("[\"{pod}\"]")), "{changing}");
    }

    #[test]
    fn the_measured_service_has_the_pod_on_as_many_ports_as_target_endpoints() {
        let pod = Ipv4Addr::new(10, 244, 1, 11);
        let (main, _, target) = services_yaml(3, 2, 4, pod).unwrap();
        let (_, last) = main
            .rsplit_once(&format!("name: {}, namespace", target.name))
            .unwrap();
        let ports: Vec<&str> = last
            .lines()
            .filter_map(|l| {
                l.strip_prefix("addressType: IPv4\nports: ")
                    .or(l.strip_prefix("ports: "))
            })
            .collect();
        assert_eq!(
            ports,
            (8080..8084)
                .map(|p| format!("[{{name: http, port: {p}, protocol: TCP}}]"))
                .collect::<Vec<_>>(),
            "{last}"
        );
        assert_eq!(last.matches(&format!("[\"{pod}\"]")).count(), 4);
        assert_eq!(
            last.matches(&format!("name: {}-4,", target.name)).count(),
            1
        );
        assert!(services_yaml(2, 1, 60_000, pod).is_err());
    }

    #[test]
    fn every_lane_has_its_own_source_ports_below_the_ephemeral_range() {
        let lanes = RPS_DIRECT_LANES + RPS_CLIENTS as u16;
        let mut seen = std::collections::BTreeMap::new();
        for lane in 0..lanes {
            let mut p = SourcePorts::lane(lane);
            for _ in 0..SourcePorts::PER_LANE {
                let port = p.take();
                assert!(port < 32_768, "lane {lane}: {port}");
                assert_eq!(seen.insert(port, lane), None, "port {port}");
            }
            // Then the lane starts over with its own first port.
            assert_eq!(p.take(), SourcePorts::lane(lane).take());
        }
    }

    #[test]
    fn proxy_flags_are_found_in_both_forms() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(has_flag(&args(&["--sync-period", "2h"]), "--sync-period"));
        assert!(has_flag(&args(&["--sync-period=2h"]), "--sync-period"));
        assert!(!has_flag(&args(&["--sync-period-x=2h"]), "--sync-period"));
        assert!(!has_flag(
            &args(&["--iptables-sync-period=2h"]),
            "--sync-period"
        ));
    }
}
