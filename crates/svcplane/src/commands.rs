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
use svcplane_source::{ManifestSource, Problem, ProblemSink, Source};

use crate::cli::{CleanupArgs, Cli, Command, ProxyArgs, RenderArgs};
use crate::settings::{EngineSettings, ProxySettings};

pub fn run(cli: Cli) -> Result<()> {
    // kube-proxy's `--cleanup`: on its own or on `proxy`, it is `svcplane cleanup`
    // (every mode, as kube-proxy's cleans every mode).
    let every_mode = CleanupArgs {
        proxy_mode: None,
        kube_proxy: false,
    };
    let Some(command) = cli.command else {
        if cli.cleanup {
            return cleanup(every_mode);
        }
        bail!("no command given; see `svcplane --help`");
    };
    match command {
        Command::Proxy(args) if cli.cleanup || args.cleanup => cleanup(every_mode),
        _ if cli.cleanup => bail!("--cleanup goes alone (`svcplane --cleanup`) or with `proxy`"),
        Command::Proxy(args) => proxy(*args),
        Command::Render(args) => render(args),
        Command::Cleanup(args) => cleanup(args),
        Command::Dns(args) => crate::dns::run(args),
        Command::Lab(args) => crate::lab::run(args),
        Command::Bench(crate::cli::BenchCommand::Sync(args)) => crate::bench::sync(args),
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
    let skipped = problems
        .iter()
        .filter(|p| p.message.contains(": invalid value"))
        .count();
    if skipped > 0 {
        eprintln!("warning: {skipped} invalid object(s) skipped; everything else was rendered");
    }
    Ok(())
}

/// What `render` prints: the mode's script for the manifests, and the problems found.
pub(crate) fn render_script(settings: &EngineSettings) -> Result<(String, Vec<Problem>)> {
    let dir = manifests_dir(settings)?;
    let mut source = ManifestSource::new(&dir);
    let (changes, problems) = source.load_once()?;
    warn_if_node_missing(&changes, &settings.node_name);
    let mut engine = Engine::new(settings.engine_config());
    for change in changes {
        engine.apply(change);
    }
    let desired = engine.desired();
    let backend = svcplane_dataplane::backend(settings.mode);
    let text = backend.render(&desired)?;
    Ok((text, problems))
}

fn proxy(args: ProxyArgs) -> Result<()> {
    let settings = ProxySettings::resolve(&args)?;
    if settings.engine.mode != ProxyMode::Nftables {
        bail!(
            "proxy mode {} is not implemented yet; available: nftables",
            settings.engine.mode
        );
    }
    let dir = manifests_dir(&settings.engine)?;
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
        manifests = %dir.display(),
        "starting svcplane proxy"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let dns_metrics = Arc::new(svcplane_dns::DnsMetrics::new());
        let mut metrics = Metrics::new();
        if dns_settings.is_some() {
            dns_metrics.register(metrics.registry_mut());
        }
        let metrics = Arc::new(metrics);
        let (status_tx, status_rx) = tokio::sync::watch::channel(SyncStatus::default());
        let health = ProxyHealth::new(status_rx, settings.sync_period);
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
        let source: Box<dyn Source> = Box::new(ManifestSource::new(&dir));
        let source_task = tokio::spawn(source.run(tx, problems));
        // DNS sees every event first, then passes it on: the engine is unchanged.
        let (rx, dns_server) = match &dns_settings {
            Some(dns) => {
                let (rx, server) = crate::dns::tee_into_proxy(dns, dns_metrics, rx)?;
                (rx, Some(server))
            }
            None => (rx, None),
        };
        let dns_stopped = async {
            match dns_server {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };
        let engine = Engine::new(settings.engine.engine_config());
        let backend = svcplane_dataplane::backend(settings.engine.mode);
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
            result = metrics_server => server_stopped("/metrics", result),
            result = healthz_server => server_stopped("/healthz", result),
            result = dns_stopped => match result {
                Ok(Ok(())) => bail!("the DNS server stopped"),
                Ok(Err(err)) => Err(err.into()),
                Err(err) => Err(err).context("the DNS server panicked"),
            },
            result = source_task => match result {
                Ok(Ok(())) => bail!("the manifests source stopped"),
                Ok(Err(err)) => Err(err).context("manifests source failed"),
                Err(err) => Err(err).context("manifests source panicked"),
            },
            _ = shutdown_signal() => {
                // As kube-proxy: leave the rules in place, so traffic keeps flowing across a restart.
                tracing::info!("shutting down; rules stay in place (use `svcplane cleanup` to remove them)");
                Ok(())
            }
        }
    })
}

/// A server task ended (they run until the process exits): an error either way.
fn server_stopped(
    what: &str,
    result: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<()> {
    match result {
        Ok(Ok(())) => bail!("the {what} server stopped"),
        Ok(Err(err)) => Err(err).with_context(|| format!("the {what} server failed")),
        Err(err) => Err(err).with_context(|| format!("the {what} server panicked")),
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
    if args.kube_proxy {
        return cleanup_kube_proxy();
    }
    let modes: Vec<ProxyMode> = match &args.proxy_mode {
        Some(m) => vec![
            m.parse()
                .map_err(|e| anyhow::anyhow!("--proxy-mode: {e}"))?,
        ],
        None => ProxyMode::ALL.to_vec(),
    };
    let mut failed = Vec::new();
    for mode in modes {
        match svcplane_dataplane::backend(mode).cleanup() {
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

fn cleanup_kube_proxy() -> Result<()> {
    let report = svcplane_dataplane::kube_proxy::cleanup_kube_proxy();
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
