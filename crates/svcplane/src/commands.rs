//! The subcommands. Each resolves settings, wires source → engine → backend, and runs.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use svcplane_dataplane::ProxyMode;
use svcplane_metrics::{HealthCheckServers, Metrics, ProxyHealth, SyncRecorder, http};
use svcplane_model::{Change, Object};
use svcplane_proxy::Engine;
use svcplane_proxy::sync_loop::{
    SyncLoopConfig, SyncObserver, SyncStatus, run_sync_loop_with_observer,
};
use svcplane_source::kube::API_ADDRESS_ADVICE;
use svcplane_source::kube::{DEFAULT_API_BURST, DEFAULT_API_QPS};
use svcplane_source::{
    ApiClientOptions, ApiSourceStatus, ClusterIpDependency, KubeSource, ManifestSource, Problem,
    ProblemSink, Source, api_config, client_from_config,
};

use crate::cli::{ApiArgs, CleanupArgs, Cli, Command, ProxyArgs, RenderArgs};
use crate::settings::{EngineSettings, ProxySettings};

pub fn run(cli: Cli) -> Result<()> {
    // kube-proxy's `--cleanup`: on its own or on `proxy`, it is `svcplane cleanup`
    // (every mode, as kube-proxy's cleans every mode).
    let every_mode = CleanupArgs::default();
    let Some(command) = cli.command else {
        if cli.cleanup {
            return cleanup(every_mode);
        }
        bail!("no command given; see `svcplane --help`");
    };
    match command {
        Command::Proxy(args) if cli.cleanup || args.cleanup => {
            // The proxy's excluded CIDRs (flag, else its --config file's) stay excluded.
            let file = match &args.engine.config {
                Some(path) => crate::config::load_file_config(path)?,
                None => crate::config::FileConfig::default(),
            };
            let exclude =
                crate::settings::ipvs_exclude_cidrs(&args.engine.ipvs_exclude_cidrs, &file)?;
            cleanup_with(every_mode, exclude)
        }
        _ if cli.cleanup => bail!("--cleanup goes alone (`svcplane --cleanup`) or with `proxy`"),
        Command::Proxy(args) => proxy(*args),
        Command::Render(args) => render(args),
        Command::Cleanup(args) => cleanup(args),
        Command::Dns(args) => crate::dns::run(args),
        Command::Lab(args) => crate::lab::run(args),
        Command::Trace(args) => crate::trace::run(args),
        Command::Bench(bench) => match bench.command {
            Some(crate::cli::BenchCommand::Sync(args)) => crate::bench::sync(args),
            Some(crate::cli::BenchCommand::Datapath(args)) => crate::bench::datapath(args),
            None => crate::bench::run(bench.run),
        },
    }
}

fn manifests_dir(s: &EngineSettings) -> Result<std::path::PathBuf> {
    s.manifests.clone().context(
        "no object source: pass --manifests DIR (a directory of Service, EndpointSlice, Node and Pod manifests)",
    )
}

/// Warn when the node's own Node object is missing: without it svcplane knows neither
/// the node's IPs nor its zone (topology hints are then ignored, as kube-proxy does).
fn warn_if_node_missing(changes: &[Change], node_name: &str) {
    let found = changes
        .iter()
        .any(|c| matches!(c, Change::Apply(Object::Node(n)) if n.name == node_name));
    if !found {
        tracing::warn!(
            "no Node object named {node_name:?} in the manifests: node IPs and zone are unknown \
             (topology hints ignored); add one or pass the right --hostname-override"
        );
    }
}

fn render(args: RenderArgs) -> Result<()> {
    let settings = EngineSettings::resolve(&args.engine)?;
    let (text, problems) = render_script(&settings)?;
    for problem in &problems {
        eprintln!("warning: {problem}");
    }
    print!("{text}");
    let ignored = problems.iter().filter(|p| p.is_ignored_value()).count();
    let skipped = problems
        .iter()
        .filter(|p| p.message.contains(": invalid value") && !p.is_ignored_value())
        .count();
    if skipped > 0 || ignored > 0 {
        eprintln!(
            "warning: {skipped} invalid object(s) skipped, {ignored} value(s) ignored; everything else was rendered"
        );
    }
    Ok(())
}

/// What `render` prints: the mode's script for the manifests, and the problems found.
pub(crate) fn render_script(settings: &EngineSettings) -> Result<(String, Vec<Problem>)> {
    let dir = manifests_dir(settings)?;
    let mut source = ManifestSource::new(&dir).allocator(settings.allocator.clone());
    let (changes, problems) = source.load_once()?;
    warn_if_node_missing(&changes, &settings.node_name);
    let mut engine = Engine::new(settings.engine_config());
    for change in changes {
        engine.apply(change);
    }
    let desired = engine.desired();
    let backend = svcplane_dataplane::backend_with(settings.mode, settings.backend_options());
    let text = backend.render(&desired)?;
    Ok((text, problems))
}

fn proxy(args: ProxyArgs) -> Result<()> {
    let settings = ProxySettings::resolve(&args)?;
    if !matches!(
        settings.engine.mode,
        ProxyMode::Nftables | ProxyMode::Iptables | ProxyMode::Ipvs | ProxyMode::Ebpf
    ) {
        bail!(
            "proxy mode {} is not implemented yet; available: nftables, iptables, ipvs, ebpf",
            settings.engine.mode
        );
    }
    let source_kind = object_source(&settings.engine, &args.api)?;
    // In proxy mode names outside the cluster go where the node's own resolver sends them.
    let dns_settings = match &args.dns_listen {
        Some(listen) => Some(crate::dns::DnsSettings::resolve(
            listen,
            &args.dns,
            &settings.engine.cluster_cidrs,
            Some("/etc/resolv.conf"),
        )?),
        None => None,
    };
    tracing::info!(
        mode = %settings.engine.mode,
        node = %settings.engine.node_name,
        source = %source_kind,
        "starting svcplane proxy"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let dns_metrics = Arc::new(svcplane_dns::DnsMetrics::new());
        let mut metrics = Metrics::for_mode(settings.engine.mode.as_str());
        if dns_settings.is_some() {
            dns_metrics.register(metrics.registry_mut());
        }
        let metrics = Arc::new(metrics);
        let (status_tx, status_rx) = tokio::sync::watch::channel(SyncStatus::default());
        let mut health = ProxyHealth::new(status_rx, settings.sync_period);
        let source: Box<dyn Source> = match &source_kind {
            ObjectSource::Manifests(dir) => Box::new(
                ManifestSource::new(dir).allocator(settings.engine.allocator.clone()),
            ),
            ObjectSource::Api(options) => {
                let config = api_config(options).await?;
                let service_host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
                let dependency =
                    ClusterIpDependency::of_config(options, &config, service_host.as_deref());
                if let Some(reason) = dependency {
                    warn_cluster_ip_dependency(&config.cluster_url.to_string(), reason);
                }
                let url = config.cluster_url.to_string();
                let client = client_from_config(config, options)?;
                let source = KubeSource::new(client, settings.engine.node_name.clone());
                health = health.with_source(source.status());
                if let Some(reason) = dependency {
                    tokio::spawn(repeat_hint_while_unlisted(source.status(), url, reason));
                }
                Box::new(source)
            }
        };
        // Bound before anything else runs, so a taken address is a clear startup error.
        let metrics_listener =
            http::bind("--metrics-bind-address", settings.metrics_bind_address).await?;
        let healthz_listener =
            http::bind("--healthz-bind-address", settings.healthz_bind_address).await?;
        tracing::info!(
            metrics = %settings.metrics_bind_address,
            healthz = %settings.healthz_bind_address,
            "serving /metrics, /healthz and /livez"
        );
        let metrics_server = tokio::spawn(http::serve(
            metrics_listener,
            http::metrics_router(metrics.clone(), health.clone()),
        ));
        let healthz_server = tokio::spawn(http::serve(
            healthz_listener,
            http::healthz_router(metrics.clone(), health.clone()),
        ));
        let (recorder, applied) = SyncRecorder::new(metrics.clone());
        // healthCheckNodePort servers listen on every address, as kube-proxy's.
        let health_checks = HealthCheckServers::new(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
            Some(health),
        );
        tokio::spawn(health_checks.run(applied));

        let (tx, rx) = tokio::sync::mpsc::channel(64);
        // The source logs each problem itself; here it is only counted.
        let counted = metrics.clone();
        let problems: ProblemSink = Arc::new(move |_| counted.invalid_object());
        let source_task = tokio::spawn(source.run(tx, problems));
        // DNS sees every event first, then passes it on: the engine is unchanged.
        let (rx, dns_server) = match &dns_settings {
            Some(dns) => {
                let (rx, server) = crate::dns::tee_into_proxy(dns, dns_metrics, rx)?;
                (rx, Some(server))
            }
            None => (rx, None),
        };
        let engine = Engine::new(settings.engine.engine_config());
        // kube-proxy's CleanupLeftovers: the other modes' rules would fight this one's.
        let mode = settings.engine.mode;
        let options = settings.engine.backend_options();
        for line in tokio::task::spawn_blocking(move || {
            svcplane_dataplane::remove_other_modes(mode, &options)
        })
        .await
            .unwrap_or_default()
        {
            tracing::info!("switching to {mode} mode: {line}");
        }
        let backend = svcplane_dataplane::backend_with(mode, settings.engine.backend_options());
        let loop_config = SyncLoopConfig {
            min_sync_period: settings.min_sync_period,
            sync_period: settings.sync_period,
            ..SyncLoopConfig::default()
        };
        let observer: Arc<dyn SyncObserver> = Arc::new(recorder);
        let sync_loop =
            run_sync_loop_with_observer(engine, rx, backend, loop_config, status_tx, Some(observer));
        tokio::select! {
            result = sync_loop => result.context("sync loop failed"),
            result = metrics_server => task_ended("/metrics server", result),
            result = healthz_server => task_ended("/healthz server", result),
            result = optional_task(dns_server) => task_ended("DNS server", result),
            result = source_task => task_ended("object source", result),
            _ = shutdown_signal() => {
                // As kube-proxy: leave the rules in place, so traffic keeps flowing across a restart.
                tracing::info!("shutting down; rules stay in place (use `svcplane cleanup` to remove them)");
                Ok(())
            }
        }
    })
}

/// The bootstrap deadlock, said at startup: on a node without Service rules (a new node,
/// or right after kube-proxy's were removed) nothing routes that ClusterIP, so the proxy
/// cannot list what it needs to program it. kube-proxy says nothing here; its kubeadm
/// kubeconfig avoids the case.
fn warn_cluster_ip_dependency(url: &str, reason: ClusterIpDependency) {
    tracing::warn!(
        "the Kubernetes API server is reached at {url}, {reason}: only a Service dataplane \
         (this proxy) makes it reachable, so on a node without Service rules svcplane cannot \
         list the objects it needs to program that rule; give it a kubeconfig \
         (clientConnection.kubeconfig, --kubeconfig) or --master with {API_ADDRESS_ADVICE}"
    );
}

/// While the initial lists keep failing, say the likely cause again (at most once a
/// minute), next to the watch errors.
async fn repeat_hint_while_unlisted(
    mut status: tokio::sync::watch::Receiver<ApiSourceStatus>,
    url: String,
    reason: ClusterIpDependency,
) {
    let mut pacer = HintPacer::default();
    while status.changed().await.is_ok() {
        let due = pacer.due(&status.borrow_and_update(), std::time::Instant::now());
        match due {
            None => return,
            Some(false) => {}
            Some(true) => tracing::warn!(
                "the initial lists are failing and the API server is reached at {url}, \
                 {reason}: this node may need Service rules to reach it; use \
                 {API_ADDRESS_ADVICE}"
            ),
        }
    }
}

const HINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// When [`repeat_hint_while_unlisted`] speaks: on a new error before every initial list
/// completed, at most once per [`HINT_INTERVAL`].
#[derive(Debug, Default)]
struct HintPacer {
    seen_errors: u64,
    hinted: Option<std::time::Instant>,
}

impl HintPacer {
    /// `None` once everything was listed (no more hints), else whether to hint now.
    fn due(&mut self, status: &ApiSourceStatus, now: std::time::Instant) -> Option<bool> {
        if status.watches.iter().all(|w| w.synced) {
            return None;
        }
        let errors = status.watches.iter().map(|w| w.errors).sum::<u64>();
        let new_error = errors > self.seen_errors;
        self.seen_errors = errors;
        let quiet_long_enough = self
            .hinted
            .is_none_or(|t| now.saturating_duration_since(t) >= HINT_INTERVAL);
        let due = new_error && quiet_long_enough;
        if due {
            self.hinted = Some(now);
        }
        Some(due)
    }
}

/// Where `proxy` gets its objects.
#[derive(Debug)]
pub(crate) enum ObjectSource {
    Manifests(std::path::PathBuf),
    Api(ApiClientOptions),
}

impl std::fmt::Display for ObjectSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectSource::Manifests(dir) => write!(f, "manifests {}", dir.display()),
            ObjectSource::Api(o) => match (&o.kubeconfig, &o.master) {
                (Some(k), _) => write!(f, "kubernetes-api (kubeconfig {})", k.display()),
                (None, Some(m)) => write!(f, "kubernetes-api ({m})"),
                (None, None) => f.write_str("kubernetes-api (in-cluster)"),
            },
        }
    }
}

/// Exactly one of --manifests, --kubeconfig/--master, or the in-cluster service account
/// (KUBERNETES_SERVICE_HOST set, neither flag given).
fn object_source(engine: &EngineSettings, api: &ApiArgs) -> Result<ObjectSource> {
    object_source_with(
        engine,
        api,
        std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty()),
    )
}

pub(crate) fn object_source_with(
    engine: &EngineSettings,
    api: &ApiArgs,
    in_cluster: bool,
) -> Result<ObjectSource> {
    // Flags first, then the --config file's clientConnection (0 there means "unset", as
    // in kube-proxy's defaulting).
    let file = &engine.file;
    let kubeconfig = api.kubeconfig.clone().or_else(|| file.kubeconfig.clone());
    let qps = api
        .qps
        .or_else(|| file.api_qps.filter(|q| *q > 0.0).map(|q| q as f32));
    let burst = api.burst.or_else(|| {
        file.api_burst
            .filter(|b| *b > 0)
            .and_then(|b| u32::try_from(b).ok())
    });
    let wants_api = kubeconfig.is_some() || api.master.is_some();
    let options = || ApiClientOptions {
        kubeconfig: kubeconfig.clone(),
        master: api.master.clone(),
        qps: qps.unwrap_or(DEFAULT_API_QPS),
        burst: burst.unwrap_or(DEFAULT_API_BURST),
    };
    if let Some(q) = qps
        && !(q.is_finite() && q >= 0.0)
    {
        bail!("--kube-api-qps: must be a number ≥ 0 (0: unlimited), not {q}");
    }
    match (&engine.manifests, wants_api) {
        (Some(_), true) => {
            bail!("--manifests and --kubeconfig/--master are exclusive: pick one object source")
        }
        (Some(dir), false) => Ok(ObjectSource::Manifests(dir.clone())),
        (None, true) => Ok(ObjectSource::Api(options())),
        (None, false) if in_cluster => Ok(ObjectSource::Api(options())),
        (None, false) => bail!(
            "no object source: pass --manifests DIR, or --kubeconfig PATH (or --master URL), \
             or run in a Pod (KUBERNETES_SERVICE_HOST set) to use its service account"
        ),
    }
}

/// A task that runs until the process exits (a server, the source) ended: an error
/// either way, saying how.
pub(crate) fn task_ended<E>(
    what: &str,
    result: Result<Result<(), E>, tokio::task::JoinError>,
) -> Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match result {
        Ok(Ok(())) => bail!("the {what} stopped"),
        Ok(Err(err)) => Err(err).with_context(|| format!("the {what} failed")),
        Err(err) => Err(err).with_context(|| format!("the {what} panicked")),
    }
}

/// Waits for an optional task; never resolves when there is none.
pub(crate) async fn optional_task<T>(
    task: Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn cleanup(args: CleanupArgs) -> Result<()> {
    let exclude = cleanup_ipvs_exclusions(&args)?;
    cleanup_with(args, exclude)
}

/// --ipvs-exclude-cidrs, else the --config file's `ipvs.excludeCIDRs` (as the proxy reads them).
fn cleanup_ipvs_exclusions(args: &CleanupArgs) -> Result<Vec<ipnet::IpNet>> {
    let file = match &args.config {
        Some(path) => crate::config::load_file_config(path)?,
        None => crate::config::FileConfig::default(),
    };
    crate::settings::ipvs_exclude_cidrs(&args.ipvs_exclude_cidrs, &file)
}

/// `svcplane cleanup`, sparing IPVS virtual servers on `ipvs_exclude` (`--ipvs-exclude-cidrs`).
fn cleanup_with(args: CleanupArgs, ipvs_exclude: Vec<ipnet::IpNet>) -> Result<()> {
    if args.kube_proxy {
        return cleanup_kube_proxy(&ipvs_exclude);
    }
    let modes: Vec<ProxyMode> = match &args.proxy_mode {
        Some(m) => vec![
            m.parse()
                .map_err(|e| anyhow::anyhow!("--proxy-mode: {e}"))?,
        ],
        None => ProxyMode::ALL.to_vec(),
    };
    let mut options = svcplane_dataplane::BackendOptions::default();
    options.ipvs.exclude_cidrs = ipvs_exclude;
    if let Some(p) = &args.bpf_pin_path {
        options.ebpf.pin_path = p.clone();
    }
    let mut failed = Vec::new();
    for mode in modes {
        match svcplane_dataplane::backend_with(mode, options.clone()).cleanup() {
            Ok(()) => tracing::info!("cleaned up {mode} rules"),
            Err(err) => {
                eprintln!("error: cleanup of {mode} failed: {err}");
                failed.push(mode.to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!("cleanup failed for: {}", failed.join(", "));
    }
    Ok(())
}

fn cleanup_kube_proxy(ipvs_exclude: &[ipnet::IpNet]) -> Result<()> {
    let report = svcplane_dataplane::kube_proxy::cleanup_kube_proxy(ipvs_exclude);
    for removed in &report.removed {
        tracing::info!("removed kube-proxy's {removed}");
    }
    for skipped in &report.skipped {
        tracing::info!("skipped: {skipped}");
    }
    for error in &report.errors {
        eprintln!("error: {error}");
    }
    if !report.errors.is_empty() {
        bail!(
            "cleanup of kube-proxy's rules failed ({} error(s))",
            report.errors.len()
        );
    }
    if report.removed.is_empty() {
        tracing::info!("nothing of kube-proxy's was left on this node");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::EngineArgs;

    fn engine(manifests: Option<&str>) -> EngineSettings {
        EngineSettings::resolve(&EngineArgs {
            manifests: manifests.map(Into::into),
            hostname_override: Some("node-a".into()),
            ..EngineArgs::default()
        })
        .unwrap()
    }

    #[test]
    fn cleanup_spares_the_config_files_ipvs_exclusions_unless_the_flag_says_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.conf");
        std::fs::write(
            &config,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             mode: ipvs\nipvs:\n  excludeCIDRs: [10.96.8.0/24]\n",
        )
        .unwrap();
        let from_file = CleanupArgs {
            kube_proxy: true,
            config: Some(config.clone()),
            ..CleanupArgs::default()
        };
        assert_eq!(
            cleanup_ipvs_exclusions(&from_file).unwrap(),
            ["10.96.8.0/24".parse::<ipnet::IpNet>().unwrap()]
        );
        let flag_wins = CleanupArgs {
            ipvs_exclude_cidrs: vec!["192.0.2.0/24".into()],
            ..from_file
        };
        assert_eq!(
            cleanup_ipvs_exclusions(&flag_wins).unwrap(),
            ["192.0.2.0/24".parse::<ipnet::IpNet>().unwrap()]
        );
        let missing = CleanupArgs {
            config: Some(dir.path().join("absent.conf")),
            ..CleanupArgs::default()
        };
        let err = format!("{:#}", cleanup_ipvs_exclusions(&missing).unwrap_err());
        assert!(err.contains("absent.conf"), "{err}");
        assert!(
            cleanup_ipvs_exclusions(&CleanupArgs::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn exactly_one_object_source() {
        let none = ApiArgs::default();
        let kubeconfig = ApiArgs {
            kubeconfig: Some("/k".into()),
            qps: Some(20.0),
            ..ApiArgs::default()
        };
        assert!(matches!(
            object_source_with(&engine(Some("/m")), &none, true).unwrap(),
            ObjectSource::Manifests(_)
        ));
        match object_source_with(&engine(None), &kubeconfig, false).unwrap() {
            ObjectSource::Api(o) => {
                assert_eq!(o.kubeconfig.as_deref(), Some(std::path::Path::new("/k")));
                assert_eq!((o.qps, o.burst), (20.0, DEFAULT_API_BURST));
            }
            other => panic!("{other:?}"),
        }
        match object_source_with(&engine(None), &none, true).unwrap() {
            ObjectSource::Api(o) => assert!(o.kubeconfig.is_none() && o.master.is_none()),
            other => panic!("{other:?}"),
        }
        let err = object_source_with(&engine(None), &none, false).unwrap_err();
        assert!(err.to_string().contains("no object source"), "{err}");
        let err = object_source_with(&engine(Some("/m")), &kubeconfig, false).unwrap_err();
        assert!(err.to_string().contains("exclusive"), "{err}");
        let bad = ApiArgs {
            master: Some("http://x".into()),
            qps: Some(-1.0),
            ..ApiArgs::default()
        };
        assert!(object_source_with(&engine(None), &bad, false).is_err());
    }

    #[test]
    fn the_cluster_ip_hint_repeats_at_most_once_a_minute_until_listed() {
        let mut pacer = HintPacer::default();
        let mut status = ApiSourceStatus::default();
        let t0 = std::time::Instant::now();
        let secs = std::time::Duration::from_secs;
        assert_eq!(pacer.due(&status, t0), Some(false), "no error yet");
        status.watches[0].errors = 1;
        assert_eq!(pacer.due(&status, t0), Some(true), "the first failure");
        status.watches[1].errors = 3;
        assert_eq!(pacer.due(&status, t0 + secs(30)), Some(false), "too soon");
        assert_eq!(
            pacer.due(&status, t0 + secs(90)),
            Some(false),
            "no new error"
        );
        status.watches[2].errors = 1;
        assert_eq!(pacer.due(&status, t0 + secs(91)), Some(true));
        // Listed (also after failures): done, whatever the errors.
        for w in &mut status.watches {
            w.synced = true;
            w.errors += 1;
        }
        assert_eq!(pacer.due(&status, t0 + secs(500)), None);
    }

    #[test]
    fn the_config_files_client_connection_is_used_unless_flags_say_otherwise() {
        let mut from_file = engine(None);
        from_file.file.kubeconfig = Some("/var/lib/kube-proxy/kubeconfig.conf".into());
        from_file.file.api_qps = Some(7.5);
        from_file.file.api_burst = Some(0); // 0: unset, as in kube-proxy
        match object_source_with(&from_file, &ApiArgs::default(), false).unwrap() {
            ObjectSource::Api(o) => {
                assert_eq!(
                    o.kubeconfig.as_deref(),
                    Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
                );
                assert_eq!((o.qps, o.burst), (7.5, DEFAULT_API_BURST));
            }
            other => panic!("{other:?}"),
        }
        let flags = ApiArgs {
            kubeconfig: Some("/k".into()),
            qps: Some(1.0),
            ..ApiArgs::default()
        };
        match object_source_with(&from_file, &flags, false).unwrap() {
            ObjectSource::Api(o) => {
                assert_eq!(o.kubeconfig.as_deref(), Some(std::path::Path::new("/k")));
                assert_eq!(o.qps, 1.0);
            }
            other => panic!("{other:?}"),
        }
    }
}
