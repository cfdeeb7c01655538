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
//! In ebpf mode the proxy attaches to a scratch cgroup (pins in a scratch directory, as the
//! tests do) and this process joins that cgroup once the proxy is ready, so the measuring
//! sockets are the ones the socket load balancer sees; all three paths then run its
//! connect hook (a lookup that misses, for the two direct ones).
//!
//! Every connection is new (the first packet of a flow is what the rules see; later
//! packets follow conntrack) and the client closes with SO_LINGER 0, so no TIME_WAIT
//! piles up and ports never run out.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use svcplane_testkit::{Cluster, Manifests, Pod, PodSpec, ProxyLaunch, metric_value};

use super::{cluster_ip, endpoint_ip, service_yaml, slice_yaml};
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
const MAX_SERVICES: u32 = 500_000;
/// Dummy endpoints come from 10.128.0.0/9; stay below the virtual cluster's pods (10.244/16).
const MAX_DUMMY_ENDPOINTS: u64 = 4 << 20;
/// Each connection leaves a conntrack entry for 10 s (CLOSE state); stay far from the table's limit.
const MAX_REQUESTS: u32 = 100_000;

pub fn datapath(args: BenchDatapathArgs) -> Result<()> {
    if !svcplane_testkit::is_root() {
        bail!("`svcplane bench datapath` needs root (network namespaces and the proxy's rules)");
    }
    if args.endpoints == 0 {
        bail!("--endpoints 0: must be at least 1");
    }
    if args.services.is_empty() {
        bail!("--services: give at least one number of services");
    }
    for &n in &args.services {
        if n == 0 || n > MAX_SERVICES {
            bail!("--services {n}: must be 1..={MAX_SERVICES}");
        }
        if u64::from(n) * u64::from(args.endpoints) > MAX_DUMMY_ENDPOINTS {
            bail!(
                "--services {n} × --endpoints {}: at most {MAX_DUMMY_ENDPOINTS} endpoints in all",
                args.endpoints
            );
        }
    }
    if args.requests == 0 || args.requests > MAX_REQUESTS {
        bail!("--requests {}: must be 1..={MAX_REQUESTS}", args.requests);
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
    let mut rows = Vec::new();
    for &services in &args.services {
        let row = match measure_size(&args, services, &proxy_args, &stop) {
            Ok(row) => row,
            // Whatever failed after the signal (the proxy got it too) is its consequence;
            // the cluster is torn down by now.
            Err(_) if stop.load(Ordering::SeqCst) => bail!("interrupted"),
            Err(e) => return Err(e.context(format!("at {services} services"))),
        };
        println!("{}", row.line(&label));
        rows.push(row);
    }
    if rows.len() > 1 {
        println!("== summary");
        for row in &rows {
            println!("{}", row.line(&label));
        }
    }
    Ok(())
}

/// One size's result.
struct Row {
    services: u32,
    via: Percentiles,
    direct: Percentiles,
    /// Pod to pod on a node without any rules.
    reference: Percentiles,
    full_sync: Option<f64>,
}

impl Row {
    fn line(&self, label: &str) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
        let mut out = format!(
            "{label} {} svc: via ClusterIP p50 {:.0} µs p99 {:.0} µs | direct p50 {:.0} µs p99 {:.0} µs \
             | ratio p50 {:.2} p99 {:.2}",
            self.services,
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
        out
    }
}

#[derive(Debug, Clone, Copy)]
struct Percentiles {
    p50: Duration,
    p99: Duration,
}

impl Percentiles {
    /// Nearest-rank percentiles; `None` without samples.
    fn of(mut samples: Vec<Duration>) -> Option<Percentiles> {
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

fn measure_size(
    args: &BenchDatapathArgs,
    services: u32,
    proxy_args: &[String],
    stop: &AtomicBool,
) -> Result<Row> {
    let cluster = Cluster::builder()
        .node(NODE, "bench-zone")
        .node(REF_NODE, "bench-zone")
        .pod(PodSpec::new("client", NODE))
        .pod(PodSpec::new("server", NODE))
        .pod(PodSpec::new("ref-client", REF_NODE))
        .pod(PodSpec::new("ref-server", REF_NODE))
        .build()
        .context("cannot build the virtual cluster")?;
    let client = cluster.pod("client")?;
    let server = cluster.pod("server")?;
    let ref_client = cluster.pod("ref-client")?;
    let ref_server = cluster.pod("ref-server")?;
    let manifests = cluster.manifests()?;
    check(stop)?;
    let written = Instant::now();
    let target = write_services(&manifests, services, args.endpoints, server.ipv4())?;
    println!(
        "== {services} ClusterIP services written in {:.1} s; measured: bench/{} {}:{SERVICE_PORT} → {}:{POD_PORT} (sorts last)",
        written.elapsed().as_secs_f64(),
        target.name,
        target.cluster_ip,
        server.ipv4(),
    );

    let ebpf = (args.proxy_mode == "ebpf")
        .then(EbpfScratch::new)
        .transpose()?;
    let ebpf_args = ebpf
        .as_ref()
        .map(EbpfScratch::proxy_args)
        .unwrap_or_default();
    let mut argv: Vec<&str> = vec!["--proxy-mode", &args.proxy_mode];
    argv.extend(ebpf_args.iter().map(String::as_str));
    // No periodic check in the middle of a measurement (it probes the kernel's tables).
    if !has_flag(proxy_args, "--sync-period") {
        argv.extend(["--sync-period", "1h"]);
    }
    argv.extend(proxy_args.iter().map(String::as_str));
    let logs = tempfile::tempdir().context("cannot create a directory for the proxy's log")?;
    let log = logs.path().join("proxy.log");
    let exe = std::env::current_exe().context("cannot find the svcplane binary")?;
    let started = Instant::now();
    let proxy = cluster
        .launch_proxy(
            &exe,
            NODE,
            manifests.path(),
            &argv,
            &ProxyLaunch {
                log: Some(log.clone()),
                ready_wait: Some(args.first_sync_wait),
                ..ProxyLaunch::default()
            },
        )
        .map_err(|e| anyhow!("{e}; the proxy's log ends with:\n{}", log_tail(&log)))?;
    check(stop)?;
    let metrics = proxy.metrics().context("reading the proxy's metrics")?;
    let full_sync = first_full_sync(&metrics);
    println!(
        "== svcplane proxy {}: ready (read the manifests, first full sync) after {:.2} s; the sync itself {}",
        argv.join(" "),
        started.elapsed().as_secs_f64(),
        full_sync.map_or("not reported".to_owned(), |s| format!("{s:.2} s")),
    );

    let _joined = match &ebpf {
        Some(e) => Some(e.join()?),
        None => None,
    };
    let direct = SocketAddr::new(server.ipv4().into(), POD_PORT);
    let reference = SocketAddr::new(ref_server.ipv4().into(), POD_PORT);
    let _server = PingServer::start(&[
        (server.netns().name(), direct),
        (ref_server.netns().name(), reference),
    ])
    .context("cannot start the servers in the server pods")?;
    let mut paths = [
        Route::new(
            "through the ClusterIP",
            client,
            SocketAddr::new(target.cluster_ip.into(), SERVICE_PORT),
        ),
        Route::new("straight to the pod at", client, direct),
        Route::new("on the node without rules to", ref_client, reference),
    ];
    measure(&mut paths, args.requests, stop)?;
    let _ = proxy.terminate();
    let [via, direct, reference] = paths.map(|p| Percentiles::of(p.samples));
    Ok(Row {
        services,
        via: via.context("no samples")?,
        direct: direct.context("no samples")?,
        reference: reference.context("no samples")?,
        full_sync,
    })
}

/// ebpf mode's scratch: the proxy's pin directory and cgroup, unpinned and removed on drop.
struct EbpfScratch {
    pins: std::path::PathBuf,
    cgroup: svcplane_testkit::Cgroup,
}

impl EbpfScratch {
    fn new() -> Result<EbpfScratch> {
        let (bpffs, _) = svcplane_testkit::bpf_test_mounts().context("bpffs for the bench")?;
        let pins = bpffs.join(format!("bench-datapath-{}", std::process::id()));
        let cgroup = svcplane_testkit::Cgroup::new("svcplane-bench-datapath")
            .context("a scratch cgroup for the bench")?;
        Ok(EbpfScratch { pins, cgroup })
    }

    fn proxy_args(&self) -> Vec<String> {
        vec![
            "--bpf-pin-path".into(),
            self.pins.display().to_string(),
            "--cgroup-path".into(),
            self.cgroup.path().display().to_string(),
        ]
    }

    /// Move this process (every thread) into the cgroup until the guard drops: sockets
    /// made meanwhile belong to it.
    fn join(&self) -> Result<CgroupGuard> {
        let (_, root) = svcplane_testkit::bpf_test_mounts()?;
        // cgroup v2: the one line `0::/path`, relative to the hierarchy's root.
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?;
        let back = root.join(rel.trim_start_matches('/'));
        write_pid(self.cgroup.path())?;
        Ok(CgroupGuard { back })
    }
}

impl Drop for EbpfScratch {
    fn drop(&mut self) {
        if let Ok(exe) = std::env::current_exe() {
            let _ = std::process::Command::new(exe)
                .args(["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-path"])
                .arg(&self.pins)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Moves this process back to its own cgroup on drop (so the scratch one can be removed).
struct CgroupGuard {
    back: std::path::PathBuf,
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Err(e) = write_pid(&self.back) {
            eprintln!("cannot move back to cgroup {}: {e}", self.back.display());
        }
    }
}

fn write_pid(cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("writing {}", procs.display()))
}

/// The first full sync's duration from the proxy's metrics (as `bench sync` reads it).
fn first_full_sync(metrics: &str) -> Option<f64> {
    const FULL: &str = "kubeproxy_sync_full_proxy_rules_duration_seconds";
    let count = metric_value(metrics, &format!("{FULL}_count"))?;
    let sum = metric_value(metrics, &format!("{FULL}_sum"))?;
    // Only the first sync has run when the proxy just became ready; divide anyway.
    (count >= 1.0).then(|| sum / count)
}

/// One measured path (route): from which pod to which address, and its samples.
struct Route {
    what: &'static str,
    /// The client pod's namespace: its sockets are created there.
    netns: String,
    dst: SocketAddr,
    /// Sockets made in advance, a batch at a time (see [`new_sockets`]).
    spare: Vec<Socket>,
    samples: Vec<Duration>,
}

impl Route {
    fn new(what: &'static str, from: &Pod, dst: SocketAddr) -> Route {
        Route {
            what,
            netns: from.netns().name().to_owned(),
            dst,
            spare: Vec::new(),
            samples: Vec::new(),
        }
    }

    /// Request `i`; its time is kept unless warming up.
    fn request(&mut self, i: u32, keep: bool) -> Result<()> {
        if self.spare.is_empty() {
            self.spare = new_sockets(&self.netns, self.dst, SOCKET_BATCH)
                .with_context(|| format!("cannot make sockets in {}", self.netns))?;
        }
        let Some(sock) = self.spare.pop() else {
            bail!("no socket made in {}", self.netns);
        };
        let took = request(sock, self.dst)
            .with_context(|| format!("request {i} {} {}", self.what, self.dst))?;
        if keep {
            self.samples.push(took);
        }
        Ok(())
    }
}

/// R rounds of one request per path (after a warm-up), rotating which path goes first so
/// that none always follows the same other one.
fn measure(paths: &mut [Route], requests: u32, stop: &AtomicBool) -> Result<()> {
    for i in 0..WARMUP.min(requests) {
        check(stop)?;
        for path in paths.iter_mut() {
            path.request(i, false)?;
        }
    }
    let n = paths.len();
    for i in 0..requests {
        check(stop)?;
        for k in 0..n {
            paths[(i as usize + k) % n].request(i, true)?;
        }
    }
    Ok(())
}

/// `n` TCP sockets for `dst`, made inside `netns` (a socket stays in the namespace it was
/// made in, so any thread can use it; the measuring thread never changes namespace, and
/// making them is not part of what is measured).
fn new_sockets(netns: &str, dst: SocketAddr, n: usize) -> io::Result<Vec<Socket>> {
    svcplane_testkit::in_netns(netns, || {
        (0..n)
            .map(|_| {
                let sock =
                    Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
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
    sock.connect_timeout(&SockAddr::from(dst), REQUEST_TIMEOUT)?;
    (&sock).write_all(b"?")?;
    let mut reply = [0u8; 1];
    (&sock).read_exact(&mut reply)?;
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
struct PingServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PingServer {
    /// Listen on each `(netns, address)`; returns once every listener is bound.
    fn start(listen: &[(&str, SocketAddr)]) -> io::Result<PingServer> {
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
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-ping".to_owned())
            .spawn(move || {
                let mut fds: Vec<libc::pollfd> = listeners
                    .iter()
                    .map(|l| libc::pollfd {
                        fd: l.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                while !stopped.load(Ordering::Relaxed) {
                    // The timeout only bounds how long a stop request waits.
                    // SAFETY: `fds` is a valid, exclusively borrowed array of its length.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
                    if n <= 0 {
                        continue;
                    }
                    for (pfd, listener) in fds.iter_mut().zip(&listeners) {
                        if std::mem::take(&mut pfd.revents) != 0 {
                            while let Ok((conn, _)) = listener.accept() {
                                answer(&conn);
                            }
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
/// has the server pod.
fn write_services(
    manifests: &Manifests,
    services: u32,
    endpoints: u32,
    pod: Ipv4Addr,
) -> Result<Target> {
    let (yaml, target) = services_yaml(services, endpoints, pod);
    manifests
        .write("services.yaml", &yaml)
        .context("writing services.yaml")?;
    Ok(target)
}

fn services_yaml(services: u32, endpoints: u32, pod: Ipv4Addr) -> (String, Target) {
    let mut out = String::with_capacity(services as usize * (400 + 60 * endpoints as usize));
    let name = |i: u32| format!("svc-{i:06}");
    let last = services.saturating_sub(1);
    for i in 0..last {
        service_yaml(&mut out, &name(i), cluster_ip(i));
        let first = i * endpoints;
        slice_yaml(
            &mut out,
            &name(i),
            (first..first + endpoints).map(endpoint_ip),
        );
    }
    let target = Target {
        name: name(last),
        cluster_ip: cluster_ip(last),
    };
    service_yaml(&mut out, &target.name, target.cluster_ip);
    slice_yaml(&mut out, &target.name, [pod]);
    (out, target)
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
        let (yaml, target) = services_yaml(12, 2, pod);
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
        let (_, last_slice) = yaml.rsplit_once("name: svc-000011-1").unwrap();
        assert!(last_slice.contains(&format!("[\"{pod}\"]")), "{last_slice}");
        assert_eq!(yaml.matches(&pod.to_string()).count(), 1);
        assert_eq!(yaml.matches("addresses:").count(), 11 * 2 + 1);
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
