//! Cluster DNS wiring: `svcplane dns` (standalone) and `svcplane proxy --dns-listen`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::commands::{optional_task, task_ended};
use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use svcplane_dns::server::DEFAULT_FORWARD_TIMEOUT;
use svcplane_dns::{DnsHandler, DnsMetrics, DnsServer, Forwarding, ZoneConfig, ZoneStore};
use svcplane_model::SourceEvent;
use svcplane_source::{ManifestSource, ProblemSink, Source};
use tokio::sync::mpsc;

use crate::cli::{DnsArgs, DnsOptions};
use crate::config::{parse_bind_address, parse_cidr_list};

/// Resolved DNS settings.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub listen: SocketAddr,
    pub zone: ZoneConfig,
    pub forwarding: Forwarding,
}

impl DnsSettings {
    /// `resolv_conf`: where the default upstreams come from (`proxy` mode), or `None`.
    pub fn resolve(
        listen: &str,
        opts: &DnsOptions,
        cluster_cidrs: &[IpNet],
        resolv_conf: Option<&str>,
    ) -> Result<DnsSettings> {
        let listen = parse_bind_address(listen).context("DNS listen address")?;
        let zone = ZoneConfig::new(&opts.cluster_domain, opts.ttl).context("--cluster-domain")?;
        let upstreams = match &opts.dns_upstream {
            Some(list) => parse_upstreams(list).context("--dns-upstream")?,
            None => match resolv_conf {
                Some(path) => {
                    let text = std::fs::read_to_string(path).unwrap_or_default();
                    let found = resolv_conf_nameservers(&text);
                    if found.is_empty() {
                        tracing::warn!(
                            "no nameserver in {path}: names outside the cluster domain are refused"
                        );
                    }
                    found
                }
                None => Vec::new(),
            },
        };
        // Forwarding to ourselves would loop until the timeout.
        let upstreams: Vec<SocketAddr> = upstreams
            .into_iter()
            .filter(|u| !is_self(*u, listen))
            .collect();
        let allow = match &opts.dns_allow {
            Some(list) => parse_cidr_list(list).context("--dns-allow")?,
            None => Forwarding::default_allow(cluster_cidrs),
        };
        Ok(DnsSettings {
            listen,
            zone,
            forwarding: Forwarding {
                upstreams,
                allow,
                timeout: DEFAULT_FORWARD_TIMEOUT,
            },
        })
    }
}

fn is_self(upstream: SocketAddr, listen: SocketAddr) -> bool {
    upstream.port() == listen.port()
        && (upstream.ip() == listen.ip()
            || (listen.ip().is_unspecified() && upstream.ip().is_loopback()))
}

/// `IP` or `IP:PORT` (`[v6]:PORT`), comma-separated; port 53 by default.
pub fn parse_upstreams(list: &str) -> Result<Vec<SocketAddr>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<SocketAddr>()
                .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .with_context(|| format!("invalid upstream {s:?} (expected IP or IP:PORT)"))
        })
        .collect()
}

/// The `nameserver` lines of a resolv.conf.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        // A zone index (fe80::1%eth0) cannot be used as an upstream here: skipped.
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The DNS server's task (it runs until a socket fails).
pub type DnsTask = tokio::task::JoinHandle<Result<(), svcplane_dns::DnsError>>;

/// A DNS server bound and serving, fed by [`svcplane_dns::follow`].
pub struct RunningDns {
    pub store: ZoneStore,
    pub server: DnsTask,
}

/// Bind the server (inside the runtime) over a fresh store.
pub fn start(settings: &DnsSettings, metrics: Arc<DnsMetrics>) -> Result<RunningDns> {
    let store = ZoneStore::new(settings.zone.clone());
    let handler = DnsHandler::new(
        store.snapshot_handle(),
        settings.forwarding.clone(),
        metrics,
    );
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let server = DnsServer::bind(settings.listen, handler, workers)?;
    tracing::info!(
        listen = %server.local_addr(),
        zone = %settings.zone.origin,
        upstreams = ?settings.forwarding.upstreams,
        "serving cluster DNS"
    );
    Ok(RunningDns {
        store,
        server: tokio::spawn(server.run()),
    })
}

/// `svcplane dns`.
pub fn run(args: DnsArgs) -> Result<()> {
    let cluster_cidrs = match &args.cluster_cidr {
        Some(s) => parse_cidr_list(s).context("--cluster-cidr")?,
        None => Vec::new(),
    };
    let settings = DnsSettings::resolve(&args.listen, &args.dns, &cluster_cidrs, None)?;
    let metrics_addr = args
        .metrics_bind_address
        .as_deref()
        .map(parse_bind_address)
        .transpose()
        .context("--metrics-bind-address")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let metrics = Arc::new(DnsMetrics::new());
        let metrics_server = match metrics_addr {
            Some(addr) => {
                let mut registry = prometheus_client::registry::Registry::default();
                metrics.register(&mut registry);
                let listener = svcplane_metrics::http::bind("--metrics-bind-address", addr).await?;
                tracing::info!(metrics = %addr, "serving /metrics");
                Some(tokio::spawn(svcplane_metrics::http::serve(
                    listener,
                    svcplane_metrics::http::registry_router(Arc::new(registry)),
                )))
            }
            None => None,
        };
        let dns = start(&settings, metrics)?;
        let (tx, rx) = mpsc::channel(64);
        let problems: ProblemSink = Arc::new(|_| {});
        let source: Box<dyn Source> =
            Box::new(ManifestSource::new(&args.manifests).allocator(args.allocation.config()?));
        let source_task = tokio::spawn(source.run(tx, problems));
        let follower = tokio::spawn(svcplane_dns::follow(dns.store, rx, None));
        tokio::select! {
            result = dns.server => task_ended("DNS server", result),
            result = source_task => task_ended("manifests source", result),
            _ = follower => bail!("the DNS zone stopped following the manifests"),
            result = optional_task(metrics_server) => task_ended("/metrics server", result),
            _ = crate::commands::shutdown_signal() => {
                tracing::info!("shutting down");
                Ok(())
            }
        }
    })
}

/// `proxy --dns-listen`: the events go through the DNS store on their way to the engine.
/// Returns the engine's receiver and the server task.
pub fn tee_into_proxy(
    settings: &DnsSettings,
    metrics: Arc<DnsMetrics>,
    events: mpsc::Receiver<SourceEvent>,
) -> Result<(mpsc::Receiver<SourceEvent>, DnsTask)> {
    let dns = start(settings, metrics)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(svcplane_dns::follow(dns.store, events, Some(tx)));
    Ok((rx, dns.server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_resolv_conf() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver  fd00::53 \nnameserver fe80::1%eth0\noptions ndots:5\n";
        assert_eq!(
            resolv_conf_nameservers(text),
            [
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[fd00::53]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn upstreams_default_to_port_53() {
        assert_eq!(
            parse_upstreams("1.1.1.1, 127.0.0.1:5300,[::1]:54").unwrap(),
            [
                "1.1.1.1:53".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:5300".parse().unwrap(),
                "[::1]:54".parse().unwrap()
            ]
        );
        assert!(parse_upstreams("nope").is_err());
    }

    #[test]
    fn never_forwards_to_itself() {
        let opts = DnsOptions {
            cluster_domain: "cluster.local".into(),
            ttl: 5,
            dns_upstream: Some("127.0.0.1:53,10.0.0.2".into()),
            dns_allow: None,
        };
        let s = DnsSettings::resolve("0.0.0.0:53", &opts, &[], None).unwrap();
        assert_eq!(
            s.forwarding.upstreams,
            ["10.0.0.2:53".parse::<SocketAddr>().unwrap()]
        );
        assert!(
            s.forwarding
                .allow
                .iter()
                .any(|n| n.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()))
        );
    }
}
