//! Settings from kube-proxy's flags and its `KubeProxyConfiguration` file
//! (`kubeproxy.config.k8s.io/v1alpha1`). Flags given on the command line override
//! the file (see README: this is a deliberate simplification of kube-proxy's rules).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use serde_json::Value;

use crate::duration::parse_go_duration;

/// Settings as read from a KubeProxyConfiguration file; `None` = not given there.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileConfig {
    pub mode: Option<String>,
    pub hostname_override: Option<String>,
    pub cluster_cidrs: Option<Vec<IpNet>>,
    pub nodeport_addresses: Option<Vec<IpNet>>,
    pub masquerade_all: Option<bool>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub min_sync_period: Option<Duration>,
    pub sync_period: Option<Duration>,
    /// Human-readable warnings: unknown fields, fields svcplane accepts but ignores.
    pub warnings: Vec<String>,
}

/// Top-level fields of KubeProxyConfiguration that svcplane reads.
const HONOURED: &[&str] = &[
    "apiVersion",
    "kind",
    "mode",
    "hostnameOverride",
    "clusterCIDR",
    "nodePortAddresses",
    "metricsBindAddress",
    "healthzBindAddress",
    "syncPeriod",
    "minSyncPeriod",
    "nftables",
    "iptables",
    "ipvs",
];

/// Real KubeProxyConfiguration fields that svcplane accepts without acting on them.
const IGNORED: &[&str] = &[
    "bindAddress",
    "bindAddressHardFail",
    "clientConnection",
    "configSyncPeriod",
    "conntrack",
    "detectLocal",
    "detectLocalMode",
    "enableProfiling",
    "featureGates",
    "healthzBindAddress",
    "logging",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "winkernel",
    "linux",
    "windowsRunAsService",
];

/// Per-mode sub-objects (`nftables:`, `iptables:`, `ipvs:`) fields svcplane reads.
const MODE_HONOURED: &[&str] = &["masqueradeAll", "syncPeriod", "minSyncPeriod"];

pub fn load_file_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --config file {}", path.display()))?;
    parse_file_config(&text).with_context(|| format!("--config file {}", path.display()))
}

pub fn parse_file_config(text: &str) -> Result<FileConfig> {
    let doc: Value = serde_saphyr::from_str(text).context("not valid YAML")?;
    let Value::Object(map) = doc else {
        bail!("expected a KubeProxyConfiguration mapping at the top level");
    };
    let mut cfg = FileConfig::default();
    match map.get("kind").and_then(Value::as_str) {
        Some("KubeProxyConfiguration") => {}
        other => bail!("kind: expected KubeProxyConfiguration, found {other:?}"),
    }
    match map.get("apiVersion").and_then(Value::as_str) {
        Some("kubeproxy.config.k8s.io/v1alpha1") => {}
        other => bail!("apiVersion: expected kubeproxy.config.k8s.io/v1alpha1, found {other:?}"),
    }
    for key in map.keys() {
        if HONOURED.contains(&key.as_str()) {
            continue;
        }
        if IGNORED.contains(&key.as_str()) {
            cfg.warnings
                .push(format!("{key}: accepted but ignored by svcplane"));
        } else {
            cfg.warnings.push(format!("{key}: unknown field, ignored"));
        }
    }
    cfg.mode = opt_str(&map, "mode")?.filter(|m| !m.is_empty());
    cfg.hostname_override = opt_str(&map, "hostnameOverride")?.filter(|h| !h.is_empty());
    if let Some(cidrs) = opt_str(&map, "clusterCIDR")? {
        cfg.cluster_cidrs = Some(parse_cidr_list(&cidrs).context("clusterCIDR")?);
    }
    if let Some(v) = map.get("nodePortAddresses") {
        let Value::Array(items) = v else {
            bail!("nodePortAddresses: expected a list of CIDRs");
        };
        let mut nets = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let s = item
                .as_str()
                .with_context(|| format!("nodePortAddresses[{i}]: expected a string"))?;
            nets.push(parse_cidr(s).with_context(|| format!("nodePortAddresses[{i}]"))?);
        }
        cfg.nodeport_addresses = Some(nets);
    }
    if let Some(a) = opt_str(&map, "metricsBindAddress")?.filter(|a| !a.is_empty()) {
        cfg.metrics_bind_address = Some(parse_bind_address(&a).context("metricsBindAddress")?);
    }
    if let Some(a) = opt_str(&map, "healthzBindAddress")?.filter(|a| !a.is_empty()) {
        cfg.healthz_bind_address = Some(parse_bind_address(&a).context("healthzBindAddress")?);
    }
    if let Some(d) = opt_str(&map, "syncPeriod")? {
        cfg.sync_period = Some(
            parse_go_duration(&d)
                .map_err(anyhow::Error::msg)
                .context("syncPeriod")?,
        );
    }
    if let Some(d) = opt_str(&map, "minSyncPeriod")? {
        cfg.min_sync_period = Some(
            parse_go_duration(&d)
                .map_err(anyhow::Error::msg)
                .context("minSyncPeriod")?,
        );
    }
    // The per-mode block of the selected mode (nftables by default) supplies
    // masqueradeAll and, when the top level does not, the sync periods.
    let mode = cfg.mode.clone().unwrap_or_else(|| "nftables".into());
    for section in ["nftables", "iptables", "ipvs"] {
        let Some(v) = map.get(section) else { continue };
        let Value::Object(sub) = v else {
            bail!("{section}: expected a mapping");
        };
        for key in sub.keys() {
            if !MODE_HONOURED.contains(&key.as_str()) {
                cfg.warnings
                    .push(format!("{section}.{key}: accepted but ignored by svcplane"));
            }
        }
        if section != mode {
            continue;
        }
        if let Some(b) = sub.get("masqueradeAll") {
            cfg.masquerade_all = Some(
                b.as_bool()
                    .with_context(|| format!("{section}.masqueradeAll: expected true or false"))?,
            );
        }
        if cfg.sync_period.is_none()
            && let Some(d) = opt_str(sub, "syncPeriod")?
        {
            cfg.sync_period = Some(
                parse_go_duration(&d)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("{section}.syncPeriod"))?,
            );
        }
        if cfg.min_sync_period.is_none()
            && let Some(d) = opt_str(sub, "minSyncPeriod")?
        {
            cfg.min_sync_period = Some(
                parse_go_duration(&d)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("{section}.minSyncPeriod"))?,
            );
        }
    }
    Ok(cfg)
}

fn opt_str(map: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("{key}: expected a string, found {other}"),
    }
}

/// One CIDR; a bare address is taken as a host route (/32 or /128).
pub fn parse_cidr(s: &str) -> Result<IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    bail!("invalid CIDR {s:?} (expected e.g. 10.244.0.0/16 or fd00::/64)")
}

/// A comma-separated list of CIDRs, as `--cluster-cidr` and `--nodeport-addresses` take.
pub fn parse_cidr_list(s: &str) -> Result<Vec<IpNet>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(parse_cidr)
        .collect()
}

/// `IP:port`; kube-proxy also accepts a bare IP (port defaulted by the caller) — we require both.
pub fn parse_bind_address(s: &str) -> Result<SocketAddr> {
    s.parse::<SocketAddr>().with_context(|| {
        format!("invalid bind address {s:?} (expected IP:PORT, e.g. 127.0.0.1:10249)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kube_proxy_configuration() {
        let cfg = parse_file_config(
            r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
nodePortAddresses: ["192.168.0.0/16"]
metricsBindAddress: 127.0.0.1:10249
hostnameOverride: node-a
conntrack:
  maxPerCore: 0
frobnicate: true
nftables:
  masqueradeAll: true
  syncPeriod: 45s
  minSyncPeriod: 500ms
  masqueradeBit: 14
"#,
        )
        .unwrap();
        assert_eq!(cfg.mode.as_deref(), Some("nftables"));
        assert_eq!(cfg.cluster_cidrs.as_ref().map(Vec::len), Some(2));
        assert_eq!(cfg.masquerade_all, Some(true));
        assert_eq!(cfg.sync_period, Some(Duration::from_secs(45)));
        assert_eq!(cfg.min_sync_period, Some(Duration::from_millis(500)));
        assert_eq!(cfg.hostname_override.as_deref(), Some("node-a"));
        assert!(
            cfg.warnings
                .iter()
                .any(|w| w.starts_with("frobnicate: unknown"))
        );
        assert!(
            cfg.warnings
                .iter()
                .any(|w| w.starts_with("conntrack: accepted but ignored"))
        );
        assert!(
            cfg.warnings
                .iter()
                .any(|w| w.starts_with("nftables.masqueradeBit"))
        );
    }

    #[test]
    fn top_level_sync_periods_win_over_mode_block() {
        let cfg = parse_file_config(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nsyncPeriod: 10s\nnftables:\n  syncPeriod: 45s\n",
        )
        .unwrap();
        assert_eq!(cfg.sync_period, Some(Duration::from_secs(10)));
    }

    #[test]
    fn rejects_wrong_kind_and_bad_values() {
        assert!(parse_file_config("apiVersion: v1\nkind: ConfigMap\n").is_err());
        let bad = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: 10.0.0.0/33\n";
        let err = format!("{:#}", parse_file_config(bad).unwrap_err());
        assert!(err.contains("clusterCIDR"), "{err}");
    }

    #[test]
    fn cidr_lists() {
        let v = parse_cidr_list("10.0.0.1/8, fd00::/64,").unwrap();
        assert_eq!(v[0].to_string(), "10.0.0.0/8");
        assert_eq!(v.len(), 2);
        assert!(parse_cidr_list("nope").is_err());
    }
}
