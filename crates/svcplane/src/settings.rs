//! Resolved settings: flags over the --config file over kube-proxy's defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::IpNet;
use svcplane_dataplane::iptables::Dispatch;
use svcplane_dataplane::{BackendOptions, ProxyMode};
use svcplane_proxy::EngineConfig;

use crate::cli::{EngineArgs, ProxyArgs};
use crate::config::{
    FileConfig, load_file_config, parse_bind_address, parse_cidr_list, parse_nodeport_addresses,
};
use crate::duration::parse_go_duration;

pub const DEFAULT_METRICS_BIND: &str = "127.0.0.1:10249";
pub const DEFAULT_HEALTHZ_BIND: &str = "0.0.0.0:10256";
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub mode: ProxyMode,
    pub manifests: Option<PathBuf>,
    pub node_name: String,
    pub cluster_cidrs: Vec<IpNet>,
    pub nodeport_addresses: Vec<IpNet>,
    pub masquerade_all: bool,
    /// `--iptables-dispatch` (iptables mode).
    pub iptables_dispatch: Dispatch,
    /// IPVS mode's scheduler and strict ARP.
    pub ipvs: svcplane_dataplane::IpvsOptions,
    /// eBPF mode's pin path, cgroup and map sizes.
    pub ebpf: svcplane_dataplane::EbpfOptions,
    /// What the manifests source allocates (--service-cluster-ip-range, --service-node-port-range).
    pub allocator: svcplane_source::AllocatorConfig,
    /// What the --config file said (for the proxy-only settings).
    pub file: FileConfig,
}

impl EngineSettings {
    pub fn resolve(args: &EngineArgs) -> Result<Self> {
        let file = match &args.config {
            Some(path) => load_file_config(path)?,
            None => FileConfig::default(),
        };
        for warning in &file.warnings {
            tracing::warn!("--config: {warning}");
        }
        let mode_name = args
            .proxy_mode
            .clone()
            .or_else(|| file.mode.clone())
            .unwrap_or_else(|| "nftables".into());
        let mode: ProxyMode = mode_name
            .parse()
            .map_err(|e| anyhow::anyhow!("--proxy-mode: {e}"))?;
        let node_name = match args
            .hostname_override
            .clone()
            .or_else(|| file.hostname_override.clone())
        {
            Some(n) => n,
            // As kube-proxy's DaemonSet sets it from the downward API (spec.nodeName).
            None => match std::env::var("NODE_NAME") {
                Ok(n) if !n.trim().is_empty() => n,
                _ => host_name()?,
            },
        };
        let node_name = node_name.trim().to_lowercase();
        if !svcplane_model::is_dns1123_subdomain(&node_name) {
            anyhow::bail!(
                "--hostname-override (or $NODE_NAME): invalid node name {node_name:?} (must be a DNS-1123 subdomain)"
            );
        }
        let cluster_cidrs = match &args.cluster_cidr {
            Some(s) => parse_cidr_list(s).context("--cluster-cidr")?,
            None => file.cluster_cidrs.clone().unwrap_or_default(),
        };
        let nodeport_addresses = match &args.nodeport_addresses {
            Some(s) => parse_nodeport_addresses(&s.split(',').collect::<Vec<_>>())
                .context("--nodeport-addresses")?,
            None => file.nodeport_addresses.clone().unwrap_or_default(),
        };
        let masquerade_all = args.masquerade_all.or(file.masquerade_all).unwrap_or(false);
        let iptables_dispatch = match &args.iptables_dispatch {
            Some(d) => d
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--iptables-dispatch: {e}"))?,
            None => Dispatch::default(),
        };
        let scheduler = args
            .ipvs_scheduler
            .clone()
            .or_else(|| file.ipvs_scheduler.clone())
            .unwrap_or_default();
        let ipvs = svcplane_dataplane::IpvsOptions {
            scheduler: svcplane_dataplane::ipvs::parse_scheduler(&scheduler)
                .map_err(anyhow::Error::msg)
                .context("--ipvs-scheduler")?,
            strict_arp: args
                .ipvs_strict_arp
                .or(file.ipvs_strict_arp)
                .unwrap_or(false),
            exclude_cidrs: ipvs_exclude_cidrs(&args.ipvs_exclude_cidrs, &file)?,
            timeouts: ipvs_timeouts(args, &file)?,
        };
        let ipvs_flags = [
            ("--ipvs-scheduler", args.ipvs_scheduler.is_some()),
            ("--ipvs-strict-arp", args.ipvs_strict_arp.is_some()),
            ("--ipvs-exclude-cidrs", !args.ipvs_exclude_cidrs.is_empty()),
            ("--ipvs-tcp-timeout", args.ipvs_tcp_timeout.is_some()),
            ("--ipvs-tcpfin-timeout", args.ipvs_tcpfin_timeout.is_some()),
            ("--ipvs-udp-timeout", args.ipvs_udp_timeout.is_some()),
        ];
        let given: Vec<&str> = ipvs_flags
            .iter()
            .filter(|(_, given)| *given)
            .map(|(name, _)| *name)
            .collect();
        if mode != ProxyMode::Ipvs && !given.is_empty() {
            tracing::warn!("{}: ignored in {mode} mode", given.join(", "));
        }
        Ok(EngineSettings {
            mode,
            manifests: args.manifests.clone(),
            node_name,
            cluster_cidrs,
            nodeport_addresses,
            masquerade_all,
            iptables_dispatch,
            ipvs,
            ebpf: args.ebpf.options()?,
            allocator: args.allocation.config()?,
            file,
        })
    }

    /// The backend's mode-specific options.
    pub fn backend_options(&self) -> BackendOptions {
        BackendOptions {
            iptables_dispatch: self.iptables_dispatch,
            ipvs: self.ipvs.clone(),
            ebpf: self.ebpf.clone(),
        }
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            node_name: self.node_name.clone(),
            cluster_cidrs: self.cluster_cidrs.clone(),
            nodeport_addresses: self.nodeport_addresses.clone(),
            masquerade_all: self.masquerade_all,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub engine: EngineSettings,
    pub metrics_bind_address: SocketAddr,
    pub healthz_bind_address: SocketAddr,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
}

impl ProxySettings {
    pub fn resolve(args: &ProxyArgs) -> Result<Self> {
        let engine = EngineSettings::resolve(&args.engine)?;
        let compat = args.kube_proxy.resolve(engine.mode)?;
        for warning in &compat.warnings {
            tracing::warn!("{warning}");
        }
        let file = &engine.file;
        let metrics_bind_address = match &args.metrics_bind_address {
            Some(a) => parse_bind_address(a).context("--metrics-bind-address")?,
            None => file
                .metrics_bind_address
                .unwrap_or_else(|| parse_default(DEFAULT_METRICS_BIND)),
        };
        let healthz_bind_address = match &args.healthz_bind_address {
            Some(a) => parse_bind_address(a).context("--healthz-bind-address")?,
            None => file
                .healthz_bind_address
                .unwrap_or_else(|| parse_default(DEFAULT_HEALTHZ_BIND)),
        };
        let min_sync_period = match &args.min_sync_period {
            Some(d) => parse_go_duration(d)
                .map_err(anyhow::Error::msg)
                .context("--min-sync-period")?,
            None => compat
                .min_sync_period
                .or(file.min_sync_period)
                .unwrap_or(DEFAULT_MIN_SYNC_PERIOD),
        };
        let sync_period = match &args.sync_period {
            Some(d) => parse_go_duration(d)
                .map_err(anyhow::Error::msg)
                .context("--sync-period")?,
            None => compat
                .sync_period
                .or(file.sync_period)
                .unwrap_or(DEFAULT_SYNC_PERIOD),
        };
        if sync_period.is_zero() {
            anyhow::bail!("--sync-period must be greater than 0");
        }
        Ok(ProxySettings {
            engine,
            metrics_bind_address,
            healthz_bind_address,
            min_sync_period,
            sync_period,
        })
    }
}

/// `--ipvs-exclude-cidrs` (comma-separated or repeated), else the --config file's
/// `ipvs.excludeCIDRs`. Also what `proxy --cleanup` spares.
pub fn ipvs_exclude_cidrs(flag: &[String], file: &FileConfig) -> Result<Vec<IpNet>> {
    if flag.is_empty() {
        return Ok(file.ipvs_exclude_cidrs.clone().unwrap_or_default());
    }
    parse_cidr_list(&flag.join(",")).context("--ipvs-exclude-cidrs")
}

/// The three IPVS timeout flags over the --config file's, in the kernel's seconds.
fn ipvs_timeouts(
    args: &EngineArgs,
    file: &FileConfig,
) -> Result<svcplane_dataplane::ipvs::Timeouts> {
    let seconds = |flag: &str, given: &Option<String>, from_file: Option<Duration>| {
        let d = match given {
            Some(s) => parse_go_duration(s)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("--{flag}"))?,
            None => from_file.unwrap_or_default(),
        };
        anyhow::Ok(svcplane_dataplane::ipvs::timeout_seconds(d))
    };
    Ok(svcplane_dataplane::ipvs::Timeouts {
        tcp: seconds(
            "ipvs-tcp-timeout",
            &args.ipvs_tcp_timeout,
            file.ipvs_tcp_timeout,
        )?,
        tcp_fin: seconds(
            "ipvs-tcpfin-timeout",
            &args.ipvs_tcpfin_timeout,
            file.ipvs_tcp_fin_timeout,
        )?,
        udp: seconds(
            "ipvs-udp-timeout",
            &args.ipvs_udp_timeout,
            file.ipvs_udp_timeout,
        )?,
    })
}

fn parse_default(s: &str) -> SocketAddr {
    // The defaults are constants above; a parse failure is a programming error caught by tests.
    s.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// The host name, as kube-proxy uses it when no override is given.
fn host_name() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read the host name; pass --hostname-override NODE")?;
    Ok(name.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn engine(args: &[&str]) -> Result<EngineSettings> {
        let base = ["t", "--hostname-override", "node-a"];
        let t = T::try_parse_from(base.iter().chain(args))?;
        EngineSettings::resolve(&t.engine)
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ipvs_exclude_cidrs_and_timeouts_from_flags() {
        let s = engine(&[
            "--proxy-mode=ipvs",
            "--ipvs-exclude-cidrs=10.96.8.0/24,fd00:8::/64",
            "--ipvs-exclude-cidrs=192.0.2.1",
            "--ipvs-tcp-timeout=1h",
            "--ipvs-tcpfin-timeout=1m30s",
            "--ipvs-udp-timeout=500ms",
        ])
        .unwrap();
        assert_eq!(
            s.ipvs.exclude_cidrs,
            [net("10.96.8.0/24"), net("fd00:8::/64"), net("192.0.2.1/32")]
        );
        // Whole seconds, as kube-proxy: 500ms is 0, which leaves the kernel's value.
        let t = s.ipvs.timeouts;
        assert_eq!((t.tcp, t.tcp_fin, t.udp), (3600, 90, 0));
        assert_eq!(s.backend_options().ipvs, s.ipvs);
        let none = engine(&["--proxy-mode=ipvs"]).unwrap();
        assert!(none.ipvs.exclude_cidrs.is_empty() && none.ipvs.timeouts.is_unset());
    }

    #[test]
    fn bad_ipvs_values_name_the_flag_and_the_value() {
        for (args, flag, value) in [
            (
                &["--ipvs-exclude-cidrs=10.96.8.0/24,10.1.2.0/33"][..],
                "--ipvs-exclude-cidrs",
                "10.1.2.0/33",
            ),
            (
                &["--ipvs-exclude-cidrs=kube-vip"],
                "--ipvs-exclude-cidrs",
                "kube-vip",
            ),
            (&["--ipvs-tcp-timeout=soon"], "--ipvs-tcp-timeout", "soon"),
            (
                &["--ipvs-tcpfin-timeout=-1s"],
                "--ipvs-tcpfin-timeout",
                "-1s",
            ),
            (&["--ipvs-udp-timeout=5"], "--ipvs-udp-timeout", "5"),
        ] {
            let e = format!("{:#}", engine(args).expect_err("refused"));
            assert!(e.contains(flag) && e.contains(value), "{args:?}: {e}");
        }
    }

    #[test]
    fn ipvs_flags_override_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             mode: ipvs\nipvs:\n  excludeCIDRs: [10.0.0.0/8]\n  tcpTimeout: 10m\n  udpTimeout: 1m\n",
        )
        .unwrap();
        let config = format!("--config={}", path.display());
        let s = engine(&[&config, "--ipvs-udp-timeout=2m"]).unwrap();
        assert_eq!(s.ipvs.exclude_cidrs, [net("10.0.0.0/8")]);
        let t = s.ipvs.timeouts;
        assert_eq!((t.tcp, t.tcp_fin, t.udp), (600, 0, 120));
        let s = engine(&[&config, "--ipvs-exclude-cidrs=192.0.2.0/24"]).unwrap();
        assert_eq!(s.ipvs.exclude_cidrs, [net("192.0.2.0/24")]);
    }

    #[test]
    fn defaults_parse() {
        assert_eq!(
            parse_default(DEFAULT_METRICS_BIND).to_string(),
            DEFAULT_METRICS_BIND
        );
        assert_eq!(
            parse_default(DEFAULT_HEALTHZ_BIND).to_string(),
            DEFAULT_HEALTHZ_BIND
        );
    }
}
