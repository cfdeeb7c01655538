//! `svcplane bench sync`: the whole path at scale, as a user runs it. N ClusterIP
//! Services with E endpoints each are written to a manifests directory (or, with `--source
//! api`, served by the test kit's fake API server: [`api`]), `svcplane proxy` programs a
//! scratch network namespace from it, and then one EndpointSlice file is rewritten (or the
//! object applied to the server) R times: each time the proxy's own metrics say when the
//! change was in the kernel, so the number is "file changed → rules in the kernel".
//! (`bench datapath`, what the rules cost a packet, is in [`datapath`].)
//!
//! The proxy runs as in production (its watcher, debounce, engine and backend); only
//! `--min-sync-period 0` is set, so a change is not held back by the previous sync.
//! `SVCPLANE_BENCH_WRAP='heaptrack -o /tmp/h'` runs it under a profiler.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use svcplane_testkit::{Daemon, Netns, metric_value};

use datapath::rss_of;

use crate::cli::{BenchSource, BenchSyncArgs};

mod api;
pub(crate) mod datapath;
mod matrix;
mod progress;
mod report;
pub use datapath::datapath;
pub use matrix::run;

const METRICS: &str = "127.0.0.1:10249";
const HEALTHZ: &str = "127.0.0.1:10256";
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(600);
const CHANGE_WAIT: Duration = Duration::from_secs(30);

pub fn sync(args: BenchSyncArgs) -> Result<()> {
    if !svcplane_testkit::is_root() {
        bail!("`svcplane bench sync` needs root (a network namespace and nftables)");
    }
    if args.services == 0 || args.endpoints == 0 || args.services > 500_000 {
        bail!("--services must be 1..=500000 and --endpoints at least 1");
    }
    let ns = Netns::new("svcplane-bench").context("cannot create a network namespace")?;
    let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
    let started = Instant::now();
    // Where the proxy reads the objects: the manifests directory or the fake API server.
    let api = match args.source {
        BenchSource::Manifests => {
            write_manifests(dir.path(), args.services, args.endpoints)?;
            None
        }
        BenchSource::Api => {
            let documents = cluster_yaml(args.services, args.endpoints)
                + &changing_slice_yaml(args.endpoints, 0);
            Some(api::ApiFeed::start(
                &ns,
                dir.path(),
                &documents,
                args.endpoints,
                NODE,
            )?)
        }
    };
    let (source, change) = match &api {
        None => (format!("written to {}", dir.path().display()), CHANGE_FILE),
        Some(_) => (
            "served by the fake Kubernetes API server (plain HTTP; in a cluster it is HTTPS)"
                .to_owned(),
            CHANGE_API,
        ),
    };
    println!(
        "== {} ClusterIP services × {} endpoints {source} in {:.1} s",
        args.services,
        args.endpoints,
        started.elapsed().as_secs_f64()
    );
    if let Some(api) = &api {
        println!(
            "== the fake API server alone, one list each (HTTP/1.0 from the namespace): {}",
            api.time_lists(&ns)?
        );
    }

    let exe = match &args.proxy_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("cannot find the svcplane binary")?,
    };
    // The proxy is this very binary (or --proxy-binary), run inside the namespace.
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]);
    // A profiler around the proxy, e.g. `heaptrack -o /tmp/h` (its RSS and CPU figures are
    // then the wrapper's).
    if let Ok(wrap) = std::env::var(WRAP_ENV) {
        cmd.args(wrap.split_whitespace());
    }
    cmd.arg(&exe).args([
        "proxy",
        "--proxy-mode",
        &args.proxy_mode,
        "--iptables-dispatch",
        &args.iptables_dispatch,
        "--hostname-override",
        NODE,
    ]);
    // ebpf: its own pins and cgroup (removed at the end), as the tests do.
    let mut ebpf_scratch = None;
    if args.proxy_mode == "ebpf" {
        let (bpffs, _) = svcplane_testkit::bpf_test_mounts().context("bpffs for the bench")?;
        let pins = bpffs.join(format!("bench-{}", std::process::id()));
        let cgroup = svcplane_testkit::Cgroup::new("svcplane-bench")?;
        cmd.arg("--bpf-pin-path")
            .arg(&pins)
            .arg("--cgroup-path")
            .arg(cgroup.path());
        ebpf_scratch = Some((pins, cgroup));
    }
    cmd.args(&args.proxy_args);
    cmd.args(["--cluster-cidr", "10.128.0.0/9", "--min-sync-period", "0s"])
        .args(["--sync-period", "1h", "--metrics-bind-address", METRICS])
        .args(["--healthz-bind-address", HEALTHZ]);
    match &api {
        None => cmd.arg("--manifests").arg(dir.path()),
        Some(api) => cmd.arg("--kubeconfig").arg(api.kubeconfig()),
    };
    // The proxy's log, shown should it not sync.
    let log_path = dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).context("creating the proxy's log")?;
    cmd.stdout(std::process::Stdio::null()).stderr(log);
    let started = Instant::now();
    let mut proxy = Daemon::spawn(cmd).context("cannot start svcplane proxy")?;
    let metrics_addr: SocketAddr = METRICS.parse()?;
    let healthz: SocketAddr = HEALTHZ.parse()?;
    let ready = svcplane_testkit::wait_until(FIRST_SYNC_WAIT, || {
        svcplane_testkit::http_get(ns.name(), healthz, "/healthz", Duration::from_secs(1))
            .is_ok_and(|(status, _)| status == 200)
            || !proxy.is_running()
    });
    if !ready || !proxy.is_running() {
        let _ = proxy.terminate();
        bail!(
            "the proxy did not complete its first sync within {FIRST_SYNC_WAIT:?}; the end of its log:\n{}",
            log_tail(&log_path)
        );
    }
    let from_start = started.elapsed();
    let text = get_metrics(&ns, metrics_addr)?;
    let full = metric_value(
        &text,
        "kubeproxy_sync_full_proxy_rules_duration_seconds_sum",
    )
    .unwrap_or(f64::NAN);
    let pid = proxy.id();
    let rss_first = pid.and_then(rss_of).map(|(rss, _)| rss);
    let read = if api.is_some() {
        "listed the API"
    } else {
        "read the manifests"
    };
    println!(
        "== svcplane proxy: started, {read} and completed its first (full) sync in {:.2} s (the sync itself: {:.2} s); RSS after it: {}",
        from_start.as_secs_f64(),
        full,
        mib(rss_first),
    );
    if let Some(api) = &api {
        let (latest, each) = api.lists_done(started)?;
        println!(
            "   lists answered, read and converted (the proxy's first watch of each) {:.2} s after the start ({each})",
            latest.as_secs_f64()
        );
    }

    let metrics = || get_metrics(&ns, metrics_addr);
    let write = |round| match &api {
        None => write_changing_slice(dir.path(), args.endpoints, round),
        Some(api) => api.apply_changing(round),
    };
    let cpu = || pid.and_then(cpu_seconds);
    let result =
        change_rounds(args.rounds, metrics, cpu, write, || Ok(())).and_then(|mut stats| {
            print!(
                "{}",
                change_report(args.services, args.rounds, change, &mut stats)
            );
            match args.churn {
                Some(duration) => churn(
                    &ChurnSpec {
                        services: args.services,
                        duration,
                        first_round: args.rounds + 1,
                        rss_first,
                        pid,
                        change,
                    },
                    metrics,
                    cpu,
                    write,
                ),
                None => Ok(()),
            }
        });
    let _ = proxy.terminate();
    if let Some((pins, _cgroup)) = &ebpf_scratch {
        let _ = std::process::Command::new(&exe)
            .args(["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-path"])
            .arg(pins)
            .status();
    }
    result
}

/// A command (split at whitespace) the proxy runs under, such as a profiler.
const WRAP_ENV: &str = "SVCPLANE_BENCH_WRAP";

/// The proxy's node name (`--hostname-override`; the API source watches its Node).
const NODE: &str = "bench-node";

/// What a round changes, as the reports name it: (the start of the change → kernel line,
/// the note on the difference between it and the network programming line).
type ChangeLabel = (&'static str, &'static str);

const CHANGE_FILE: ChangeLabel = (
    "file written",
    "the watcher: the manifests source waits for a burst of writes to settle, then re-reads \
     the file",
);
const CHANGE_API: ChangeLabel = (
    "object applied to the API server",
    "the fake API server's watch and the proxy's reading of the event",
);

/// The last lines of the proxy's log at `path`.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The one-change rounds' report: p50 and p99 of each measure, with min and max.
fn change_report(
    services: u32,
    rounds: u32,
    (change, note): ChangeLabel,
    stats: &mut ChangeStats,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "== one EndpointSlice changed at {services} services, {rounds} rounds (p50, p99, min–max):"
    );
    for (what, v) in [
        (&*format!("{change} → rules in the kernel"), &mut stats.e2e),
        (
            "change queued → rules in the kernel (network programming)",
            &mut stats.programming,
        ),
        (
            "the sync alone (render + apply + conntrack)",
            &mut stats.syncs,
        ),
        (
            "the proxy's CPU time from the write to the sync's end (every thread)",
            &mut stats.cpu,
        ),
    ] {
        let _ = writeln!(out, "   {what}: {}", summary(v));
    }
    let _ = writeln!(
        out,
        "   (the difference between the first two lines is {note})"
    );
    out
}

/// What a churn soak runs on.
struct ChurnSpec {
    services: u32,
    duration: Duration,
    /// The round number of the first change (the window keeps moving from the rounds before).
    first_round: u32,
    /// The proxy's RSS after its first sync, in bytes.
    rss_first: Option<u64>,
    pid: Option<u32>,
    change: ChangeLabel,
}

/// How many times a soak reports its progress.
const CHURN_REPORTS: u32 = 10;

/// The churn soak: one endpoint change per second for `spec.duration`, each timed to the
/// kernel like the rounds; then RSS at the end against RSS after the first sync, the syncs'
/// p50/p99 and the failed syncs the proxy's metrics counted. A change not in the kernel
/// within [`CHANGE_WAIT`] is counted and the soak goes on.
fn churn(
    spec: &ChurnSpec,
    metrics: impl Fn() -> Result<String>,
    cpu: impl Fn() -> Option<f64>,
    write: impl Fn(u32) -> Result<()>,
) -> Result<()> {
    let rss = || spec.pid.and_then(rss_of).map(|(rss, _)| rss);
    println!(
        "== churn: one endpoint change per second for {:?} at {} services",
        spec.duration, spec.services
    );
    let failures_before = sync_failures(&metrics()?);
    let started = Instant::now();
    let mut stats = ChangeStats::default();
    let mut missed = 0u32;
    let mut next_report = 1;
    let mut round = spec.first_round;
    let mut tick = 0u32;
    while started.elapsed() < spec.duration {
        // One change per second on a fixed schedule; a slow round delays only itself.
        let due = started + Duration::from_secs(u64::from(tick));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        tick += 1;
        match measure_change(&metrics, &cpu, || write(round))? {
            Some(r) => stats.push(r),
            None => missed += 1,
        }
        round += 1;
        let part = started.elapsed().as_secs_f64() / spec.duration.as_secs_f64();
        if part * f64::from(CHURN_REPORTS) >= f64::from(next_report) {
            next_report += 1;
            println!(
                "   [{:>5.0} s] {} changes, RSS {}, the sync so far: {}",
                started.elapsed().as_secs_f64(),
                stats.syncs.len() + missed as usize,
                mib(rss()),
                summary(&mut stats.syncs.clone()),
            );
        }
    }
    let failed = sync_failures(&metrics()?) - failures_before;
    let rss_end = rss();
    println!(
        "== churn done: {} changes in {:.0} s",
        stats.syncs.len() + missed as usize,
        started.elapsed().as_secs_f64()
    );
    let growth = match (spec.rss_first, rss_end) {
        (Some(a), Some(b)) if a > 0 => format!(" (end ÷ first sync: {:.2})", b as f64 / a as f64),
        _ => String::new(),
    };
    println!(
        "   RSS: after the first sync {}, at the end {}{growth}",
        mib(spec.rss_first),
        mib(rss_end)
    );
    println!("   the sync alone: {}", summary(&mut stats.syncs));
    println!(
        "   the proxy's CPU time per change: {}",
        summary(&mut stats.cpu)
    );
    println!(
        "   {} → rules in the kernel: {}",
        spec.change.0,
        summary(&mut stats.e2e)
    );
    println!(
        "   failed syncs (the proxy's metrics): {failed:.0}; changes not in the kernel within {CHANGE_WAIT:?}: {missed}"
    );
    Ok(())
}

/// Failed syncs so far by the proxy's metrics (the nftables counter counts every mode's
/// but iptables', which has its own).
fn sync_failures(metrics: &str) -> f64 {
    [
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
    ]
    .iter()
    .filter_map(|m| metric_value(metrics, m))
    .sum()
}

/// `bytes` in MiB, or why not.
fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("unknown".to_owned(), |b| {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    })
}

/// One-change rounds, each measured from the proxy's own metrics, in seconds.
#[derive(Debug, Default)]
pub(crate) struct ChangeStats {
    /// File written → the sync that applied it finished.
    pub e2e: Vec<f64>,
    /// `kubeproxy_network_programming_duration_seconds`: change queued → in the kernel.
    pub programming: Vec<f64>,
    /// The sync alone (render + apply + conntrack).
    pub syncs: Vec<f64>,
    /// The proxy's CPU time (every thread) from the write to the sync's end: what the
    /// change cost, whatever else runs on a loaded machine (when readable).
    pub cpu: Vec<f64>,
}

impl ChangeStats {
    fn push(&mut self, m: Measured) {
        self.e2e.push(m.e2e);
        self.programming.push(m.programming);
        self.syncs.push(m.sync);
        self.cpu.extend(m.cpu);
    }
}

/// One change's figures, in seconds (see [`ChangeStats`]).
struct Measured {
    e2e: f64,
    programming: f64,
    sync: f64,
    cpu: Option<f64>,
}

/// `rounds` times: `write(round)` one change, then wait until the proxy's metrics (from
/// `metrics`) show a sync after it. `between` runs before each round (progress, Ctrl-C).
/// Every sync counts (the change's is partial where the mode has partial syncs).
pub(crate) fn change_rounds(
    rounds: u32,
    metrics: impl Fn() -> Result<String>,
    cpu: impl Fn() -> Option<f64>,
    write: impl Fn(u32) -> Result<()>,
    mut between: impl FnMut() -> Result<()>,
) -> Result<ChangeStats> {
    let mut stats = ChangeStats::default();
    for round in 1..=rounds {
        between()?;
        match measure_change(&metrics, &cpu, || write(round))? {
            Some(r) => stats.push(r),
            None => {
                bail!("round {round}: the change did not reach the kernel within {CHANGE_WAIT:?}")
            }
        }
    }
    Ok(stats)
}

/// One change: `write` it, wait until the metrics show a sync after it; its figures, or
/// `None` when no sync came within [`CHANGE_WAIT`]. `cpu`: the proxy's CPU time so far.
fn measure_change(
    metrics: &impl Fn() -> Result<String>,
    cpu: &impl Fn() -> Option<f64>,
    write: impl FnOnce() -> Result<()>,
) -> Result<Option<Measured>> {
    const SYNCS: &str = "kubeproxy_sync_proxy_rules_duration_seconds_count";
    const SYNC_TIME: &str = "kubeproxy_sync_proxy_rules_duration_seconds_sum";
    const NP: &str = "kubeproxy_network_programming_duration_seconds_sum";
    const LAST: &str = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
    let value = |t: &str, name: &str| metric_value(t, name).unwrap_or(0.0);
    let before = metrics()?;
    let cpu_before = cpu();
    let changed_at = SystemTime::now();
    write()?;
    let mut after = String::new();
    let done = svcplane_testkit::wait_until(CHANGE_WAIT, || {
        after = metrics().unwrap_or_default();
        value(&after, SYNCS) > value(&before, SYNCS)
    });
    if !done {
        return Ok(None);
    }
    let cpu_after = cpu();
    let changed = changed_at.duration_since(UNIX_EPOCH)?.as_secs_f64();
    Ok(Some(Measured {
        e2e: value(&after, LAST) - changed,
        programming: value(&after, NP) - value(&before, NP),
        sync: value(&after, SYNC_TIME) - value(&before, SYNC_TIME),
        cpu: cpu_before.zip(cpu_after).map(|(a, b)| b - a),
    }))
}

/// Process `pid`'s CPU time so far, every thread's (ended ones too), in seconds: its
/// process CPU clock (`clock_getcpuclockid`), exact, unlike `/proc` figures that move only
/// at scheduler ticks.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: plain calls with valid, exclusively borrowed out-parameters.
    if unsafe { libc::clock_getcpuclockid(libc::pid_t::try_from(pid).ok()?, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as above.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

fn get_metrics(ns: &Netns, addr: SocketAddr) -> Result<String> {
    match svcplane_testkit::http_get(ns.name(), addr, "/metrics", Duration::from_secs(2))? {
        (200, body) => Ok(body),
        (status, _) => bail!("GET /metrics: {status}"),
    }
}

/// p50 and p99 (nearest rank, as [`datapath::Percentiles`]), then min–max, in ms.
fn summary(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v.get(((p * v.len() as f64).ceil() as usize).saturating_sub(1));
    match (v.first(), rank(0.50), rank(0.99), v.last()) {
        (Some(min), Some(p50), Some(p99), Some(max)) => format!(
            "p50 {:.1} ms, p99 {:.1} ms ({:.1}–{:.1} ms)",
            p50 * 1e3,
            p99 * 1e3,
            min * 1e3,
            max * 1e3
        ),
        _ => "no data".to_owned(),
    }
}

/// 10.96.0.1 onwards (the 10.96.0.0/12 service range holds 1M addresses).
fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0001 + i)
}

/// Endpoint addresses in 10.128.0.0/9 (8M addresses).
fn endpoint_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + n)
}

/// `service`'s EndpointSlice in namespace `bench`: port `http` 8080/TCP, every address ready.
fn slice_yaml(out: &mut String, service: &str, addresses: impl IntoIterator<Item = Ipv4Addr>) {
    slice_yaml_on(out, service, 1, 8080, addresses);
}

/// `service`'s EndpointSlice number `n` (`{service}-{n}`): port `http` `port`/TCP.
fn slice_yaml_on(
    out: &mut String,
    service: &str,
    n: u32,
    port: u16,
    addresses: impl IntoIterator<Item = Ipv4Addr>,
) {
    let _ = write!(
        out,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {service}-{n}, namespace: bench, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints:\n"
    );
    for ip in addresses {
        let _ = writeln!(
            out,
            "  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}"
        );
    }
}

/// A ClusterIP Service in namespace `bench`: port `http` 80/TCP → 8080.
fn service_yaml(out: &mut String, name: &str, cluster_ip: Ipv4Addr) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n\
         spec: {{clusterIP: {cluster_ip}, ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]}}\n"
    );
}

/// Every Service and EndpointSlice as YAML documents, except service 0's slice (see
/// [`changing_slice_yaml`]).
fn cluster_yaml(services: u32, endpoints: u32) -> String {
    let mut out = String::with_capacity(services as usize * (400 + 60 * endpoints as usize));
    for i in 0..services {
        let name = format!("svc-{i}");
        service_yaml(&mut out, &name, cluster_ip(i));
        if i > 0 {
            let first = i * endpoints;
            slice_yaml(&mut out, &name, (first..first + endpoints).map(endpoint_ip));
        }
    }
    out
}

/// [`cluster_yaml`] in one file; service 0's slice lives in `changing.yaml`, so that a
/// change re-reads only that small file (as a per-object file layout or the API source
/// would).
fn write_manifests(dir: &Path, services: u32, endpoints: u32) -> Result<()> {
    std::fs::write(dir.join("services.yaml"), cluster_yaml(services, endpoints))
        .context("writing services.yaml")?;
    write_changing_slice(dir, endpoints, 0)
}

/// The changing slice's endpoints in round `round` (as indexes for [`endpoint_ip`]): each
/// round moves the window by one address, so one endpoint leaves and one arrives. Above
/// every other service's endpoints.
fn changing_window(endpoints: u32, round: u32) -> std::ops::Range<u32> {
    let first = 0x0070_0000 + round;
    first..first + endpoints
}

/// Service 0's slice in round `round` (see [`changing_window`]).
fn changing_slice_yaml(endpoints: u32, round: u32) -> String {
    let mut out = String::new();
    slice_yaml(
        &mut out,
        "svc-0",
        changing_window(endpoints, round).map(endpoint_ip),
    );
    out
}

/// [`changing_slice_yaml`] as `changing.yaml`, replaced in one rename.
fn write_changing_slice(dir: &Path, endpoints: u32, round: u32) -> Result<()> {
    let tmp = dir.join(".changing.yaml.tmp");
    std::fs::write(&tmp, changing_slice_yaml(endpoints, round))
        .context("writing the changed slice")?;
    std::fs::rename(&tmp, dir.join("changing.yaml")).context("replacing changing.yaml")?;
    Ok(())
}
