//! Settings from kube-proxy's flags and its `KubeProxyConfiguration` file
//! (`kubeproxy.config.k8s.io/v1alpha1`). Flags given on the command line override
//! the file (see README: this is a deliberate simplification of kube-proxy's rules).
//!
//! [`SCHEMA`] is the whole v1alpha1 type (k8s.io/kube-proxy/config/v1alpha1, 1.34):
//! every field is type-checked, honoured fields are read, ignored ones warn when they
//! ask for something (a non-empty value), and anything else warns as unknown, as
//! kube-proxy's lenient decoding does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use serde_json::{Map, Value};

use crate::duration::parse_go_duration;

/// Settings as read from a KubeProxyConfiguration file; `None` = not given there.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileConfig {
    pub mode: Option<String>,
    pub hostname_override: Option<String>,
    pub cluster_cidrs: Option<Vec<IpNet>>,
    pub nodeport_addresses: Option<Vec<IpNet>>,
    pub masquerade_all: Option<bool>,
    /// `ipvs.scheduler`, `ipvs.strictARP`, `ipvs.excludeCIDRs`, `ipvs.tcpTimeout`,
    /// `tcpFinTimeout`, `udpTimeout` (ipvs mode only).
    pub ipvs_scheduler: Option<String>,
    pub ipvs_strict_arp: Option<bool>,
    pub ipvs_exclude_cidrs: Option<Vec<IpNet>>,
    pub ipvs_tcp_timeout: Option<Duration>,
    pub ipvs_tcp_fin_timeout: Option<Duration>,
    pub ipvs_udp_timeout: Option<Duration>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub min_sync_period: Option<Duration>,
    pub sync_period: Option<Duration>,
    /// `clientConnection.kubeconfig`/`qps`/`burst`: parsed and type-checked for the
    /// Kubernetes API source; until it reads them they are reported as ignored.
    pub kubeconfig: Option<PathBuf>,
    pub api_qps: Option<f64>,
    pub api_burst: Option<i64>,
    /// Human-readable warnings: unknown fields, fields svcplane accepts but ignores.
    pub warnings: Vec<String>,
}

/// A field's JSON type, as the Go type decodes it.
#[derive(Debug, Clone, Copy)]
enum Ty {
    Str,
    Bool,
    Int,
    Float,
    /// metav1.Duration: a Go duration string.
    GoDuration,
    StrList,
    /// map[string]bool (featureGates).
    BoolMap,
    /// A nested struct.
    Obj(&'static [Field]),
    /// A struct svcplane does not look into (logging: component-base's own schema).
    AnyObj,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Use {
    /// Read by svcplane.
    Honoured,
    /// A real field svcplane does not act on: warned when it asks for something.
    Ignored,
    /// A mode's block, or a field in one: read in the selected mode's block only.
    ModeHonoured,
}

#[derive(Debug, Clone, Copy)]
struct Field {
    name: &'static str,
    ty: Ty,
    use_: Use,
}

const fn f(name: &'static str, ty: Ty, use_: Use) -> Field {
    Field { name, ty, use_ }
}

use Ty::*;
use Use::*;

const IPTABLES: &[Field] = &[
    f("masqueradeBit", Int, Ignored),
    f("masqueradeAll", Bool, ModeHonoured),
    f("localhostNodePorts", Bool, Ignored),
    f("snatNodeInternalIP", Bool, Ignored),
    f("syncPeriod", GoDuration, ModeHonoured),
    f("minSyncPeriod", GoDuration, ModeHonoured),
];

const IPVS: &[Field] = &[
    f("syncPeriod", GoDuration, ModeHonoured),
    f("minSyncPeriod", GoDuration, ModeHonoured),
    f("scheduler", Str, ModeHonoured),
    f("excludeCIDRs", StrList, ModeHonoured),
    f("strictARP", Bool, ModeHonoured),
    f("tcpTimeout", GoDuration, ModeHonoured),
    f("tcpFinTimeout", GoDuration, ModeHonoured),
    f("udpTimeout", GoDuration, ModeHonoured),
];

const NFTABLES: &[Field] = &[
    f("masqueradeBit", Int, Ignored),
    f("masqueradeAll", Bool, ModeHonoured),
    f("syncPeriod", GoDuration, ModeHonoured),
    f("minSyncPeriod", GoDuration, ModeHonoured),
];

const CONNTRACK: &[Field] = &[
    f("maxPerCore", Int, Ignored),
    f("min", Int, Ignored),
    f("tcpEstablishedTimeout", GoDuration, Ignored),
    f("tcpCloseWaitTimeout", GoDuration, Ignored),
    f("tcpBeLiberal", Bool, Ignored),
    f("udpTimeout", GoDuration, Ignored),
    f("udpStreamTimeout", GoDuration, Ignored),
];

const WINKERNEL: &[Field] = &[
    f("networkName", Str, Ignored),
    f("sourceVip", Str, Ignored),
    f("enableDSR", Bool, Ignored),
    f("rootHnsEndpointName", Str, Ignored),
    f("forwardHealthCheckVip", Bool, Ignored),
];

const DETECT_LOCAL: &[Field] = &[
    f("bridgeInterface", Str, Ignored),
    f("interfaceNamePrefix", Str, Ignored),
];

const CLIENT_CONNECTION: &[Field] = &[
    f("kubeconfig", Str, Honoured),
    f("acceptContentTypes", Str, Ignored),
    f("contentType", Str, Ignored),
    f("qps", Float, Honoured),
    f("burst", Int, Honoured),
];

/// Every field of v1alpha1 KubeProxyConfiguration.
const SCHEMA: &[Field] = &[
    f("apiVersion", Str, Honoured),
    f("kind", Str, Honoured),
    f("featureGates", BoolMap, Ignored),
    f("clientConnection", Obj(CLIENT_CONNECTION), Honoured),
    f("logging", AnyObj, Ignored),
    f("hostnameOverride", Str, Honoured),
    f("bindAddress", Str, Ignored),
    f("healthzBindAddress", Str, Honoured),
    f("metricsBindAddress", Str, Honoured),
    f("bindAddressHardFail", Bool, Ignored),
    f("enableProfiling", Bool, Ignored),
    f("showHiddenMetricsForVersion", Str, Ignored),
    f("mode", Str, Honoured),
    f("iptables", Obj(IPTABLES), ModeHonoured),
    f("ipvs", Obj(IPVS), ModeHonoured),
    f("nftables", Obj(NFTABLES), ModeHonoured),
    f("winkernel", Obj(WINKERNEL), Ignored),
    f("detectLocalMode", Str, Honoured),
    f("detectLocal", Obj(DETECT_LOCAL), Ignored),
    f("clusterCIDR", Str, Honoured),
    f("nodePortAddresses", StrList, Honoured),
    f("oomScoreAdj", Int, Ignored),
    f("conntrack", Obj(CONNTRACK), Ignored),
    f("configSyncPeriod", GoDuration, Ignored),
    f("portRange", Str, Ignored),
    f("windowsRunAsService", Bool, Ignored),
];

/// Names people put in a v1alpha1 file that belong elsewhere: a hint beats "unknown".
fn unknown_hint(path: &str) -> &'static str {
    match path {
        "syncPeriod" | "minSyncPeriod" => {
            " (a v1alpha2 field; in v1alpha1 it is nftables.syncPeriod / nftables.minSyncPeriod)"
        }
        "linux" | "windows" => " (a v1alpha2 field; v1alpha1 has these settings at the top level)",
        _ => "",
    }
}

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
    match map.get("kind").and_then(Value::as_str) {
        Some("KubeProxyConfiguration") => {}
        other => bail!("kind: expected KubeProxyConfiguration, found {other:?}"),
    }
    match map.get("apiVersion").and_then(Value::as_str) {
        Some("kubeproxy.config.k8s.io/v1alpha1") => {}
        other => bail!("apiVersion: expected kubeproxy.config.k8s.io/v1alpha1, found {other:?}"),
    }
    let mut cfg = FileConfig {
        mode: opt_str(&map, "mode")?.filter(|m| !m.is_empty()),
        ..FileConfig::default()
    };
    // Only the selected mode's block (nftables by default) means anything, as in kube-proxy.
    let selected = cfg.mode.clone().unwrap_or_else(|| "nftables".into());
    let mut checker = Checker {
        selected: &selected,
        warnings: Vec::new(),
    };
    checker.object("", &map, SCHEMA, Quiet::No)?;
    cfg.warnings = checker.warnings;

    cfg.hostname_override = opt_str(&map, "hostnameOverride")?
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty());
    if let Some(cidrs) = opt_str(&map, "clusterCIDR")?.filter(|c| !c.trim().is_empty()) {
        cfg.cluster_cidrs = Some(parse_cidr_list(&cidrs).context("clusterCIDR")?);
    }
    if let Some(Value::Array(items)) = map.get("nodePortAddresses") {
        let items: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
        cfg.nodeport_addresses =
            Some(parse_nodeport_addresses(&items).context("nodePortAddresses")?);
    }
    if let Some(a) = opt_str(&map, "metricsBindAddress")?.filter(|a| !a.is_empty()) {
        cfg.metrics_bind_address = Some(parse_bind_address(&a).context("metricsBindAddress")?);
    }
    if let Some(a) = opt_str(&map, "healthzBindAddress")?.filter(|a| !a.is_empty()) {
        cfg.healthz_bind_address = Some(parse_bind_address(&a).context("healthzBindAddress")?);
    }
    if let Some(m) = opt_str(&map, "detectLocalMode")? {
        check_detect_local_mode(&m).context("detectLocalMode")?;
    }
    if let Some(Value::Object(cc)) = map.get("clientConnection") {
        cfg.kubeconfig = opt_str(cc, "kubeconfig")?
            .filter(|k| !k.is_empty())
            .map(PathBuf::from);
        cfg.api_qps = cc.get("qps").and_then(Value::as_f64);
        cfg.api_burst = cc.get("burst").and_then(Value::as_i64);
    }
    if let Some(Value::Object(sub)) = map.get(selected.as_str()) {
        let section = selected.as_str();
        cfg.masquerade_all = sub.get("masqueradeAll").and_then(Value::as_bool);
        if section == "ipvs" {
            cfg.ipvs_scheduler = opt_str(sub, "scheduler")?.filter(|s| !s.is_empty());
            cfg.ipvs_strict_arp = sub.get("strictARP").and_then(Value::as_bool);
            if let Some(Value::Array(items)) = sub.get("excludeCIDRs") {
                let cidrs: Result<Vec<IpNet>> = items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(parse_cidr)
                    .collect();
                cfg.ipvs_exclude_cidrs = Some(cidrs.context("ipvs.excludeCIDRs")?);
            }
            for (field, slot) in [
                ("tcpTimeout", &mut cfg.ipvs_tcp_timeout),
                ("tcpFinTimeout", &mut cfg.ipvs_tcp_fin_timeout),
                ("udpTimeout", &mut cfg.ipvs_udp_timeout),
            ] {
                if let Some(d) = opt_str(sub, field)?.filter(|d| !d.is_empty()) {
                    *slot = Some(duration(&d).with_context(|| format!("ipvs.{field}"))?);
                }
            }
        }
        if let Some(d) = opt_str(sub, "syncPeriod")? {
            cfg.sync_period = Some(duration(&d).with_context(|| format!("{section}.syncPeriod"))?);
        }
        if let Some(d) = opt_str(sub, "minSyncPeriod")? {
            cfg.min_sync_period =
                Some(duration(&d).with_context(|| format!("{section}.minSyncPeriod"))?);
        }
    }
    Ok(cfg)
}

/// kube-proxy's local-traffic detection: svcplane implements only `ClusterCIDR` (the
/// default). Any other mode would classify traffic differently, so it is an error
/// rather than a warning.
pub fn check_detect_local_mode(mode: &str) -> Result<()> {
    match mode {
        "" | "ClusterCIDR" => Ok(()),
        "NodeCIDR" | "BridgeInterface" | "InterfaceNamePrefix" => bail!(
            "{mode} is not supported by svcplane, which detects local traffic only by the \
             cluster CIDR (ClusterCIDR); using it silently would masquerade different traffic"
        ),
        other => bail!(
            "unknown mode {other:?} (kube-proxy has ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix)"
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Quiet {
    No,
    /// Inside another mode's block: type-checked, but ignored fields are not warned about.
    Yes,
}

struct Checker<'a> {
    selected: &'a str,
    warnings: Vec<String>,
}

impl Checker<'_> {
    /// Type-checks `map` against `fields`, collecting warnings for unknown fields and for
    /// ignored fields that ask for something.
    fn object(
        &mut self,
        prefix: &str,
        map: &Map<String, Value>,
        fields: &[Field],
        quiet: Quiet,
    ) -> Result<()> {
        for (key, value) in map {
            let path = format!("{prefix}{key}");
            let Some(field) = fields.iter().find(|f| f.name == key) else {
                self.warnings.push(format!(
                    "{path}: unknown field, ignored{}",
                    unknown_hint(&path)
                ));
                continue;
            };
            check_type(&path, value, field.ty)?;
            let use_ = field.use_;
            match (field.ty, value) {
                (Obj(sub), Value::Object(inner)) => {
                    let inner_quiet = if use_ == ModeHonoured && prefix.is_empty() {
                        // A mode block: only the selected mode's is read.
                        if key == self.selected {
                            quiet
                        } else {
                            Quiet::Yes
                        }
                    } else {
                        quiet
                    };
                    let sub = if use_ == Ignored {
                        ignored_view(sub)
                    } else {
                        sub.to_vec()
                    };
                    self.object(&format!("{path}."), inner, &sub, inner_quiet)?;
                }
                _ => {
                    if use_ == Ignored && quiet == Quiet::No && !is_empty(value) {
                        self.warnings
                            .push(format!("{path}: accepted but ignored by svcplane"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The fields of an ignored struct: all ignored, whatever they would mean elsewhere.
fn ignored_view(fields: &[Field]) -> Vec<Field> {
    fields
        .iter()
        .map(|field| Field {
            use_: Ignored,
            ..*field
        })
        .collect()
}

/// Go's zero values (and empty collections): a field set to one asks for nothing.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty() || s == "0" || s == "0s",
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_empty),
        Value::Bool(true) => false,
    }
}

/// A wrong type is an error naming the field, as kube-proxy's strict decoding fails.
fn check_type(path: &str, value: &Value, ty: Ty) -> Result<()> {
    // null decodes as the Go zero value for every field.
    if value.is_null() {
        return Ok(());
    }
    let ok = match ty {
        Str => value.is_string(),
        Bool => value.is_boolean(),
        Int => value.is_i64() || value.is_u64(),
        Float => value.is_number(),
        GoDuration => {
            let Some(s) = value.as_str() else {
                bail!("{path}: expected a duration such as 30s or 1m30s, found {value}");
            };
            if !s.is_empty() {
                duration(s).with_context(|| path.to_string())?;
            }
            true
        }
        StrList => value
            .as_array()
            .is_some_and(|items| items.iter().all(Value::is_string)),
        BoolMap => value
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_boolean)),
        Obj(_) | AnyObj => value.is_object(),
    };
    if !ok {
        let expected = match ty {
            Str => "a string",
            Bool => "true or false",
            Int => "an integer",
            Float => "a number",
            GoDuration => "a duration",
            StrList => "a list of strings",
            BoolMap => "a map of names to true/false",
            Obj(_) | AnyObj => "a mapping",
        };
        bail!("{path}: expected {expected}, found {value}");
    }
    Ok(())
}

fn duration(s: &str) -> Result<Duration> {
    parse_go_duration(s).map_err(anyhow::Error::msg)
}

fn opt_str(map: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("{key}: expected a string, found {other}"),
    }
}

/// `--nodeport-addresses` / `nodePortAddresses`: CIDRs, or kube-proxy's `all`
/// keyword. `primary` and `localhost` are refused: svcplane would otherwise accept
/// NodePorts on different addresses than asked for.
pub fn parse_nodeport_addresses(items: &[&str]) -> Result<Vec<IpNet>> {
    let mut nets = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match item {
            "all" => {
                nets.push(parse_cidr("0.0.0.0/0")?);
                nets.push(parse_cidr("::/0")?);
            }
            "primary" | "localhost" => {
                bail!("the {item:?} keyword is not supported by svcplane; list the CIDRs instead")
            }
            cidr => nets.push(parse_cidr(cidr)?),
        }
    }
    Ok(nets)
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

    const HEAD: &str =
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

    fn parse(body: &str) -> Result<FileConfig> {
        parse_file_config(&format!("{HEAD}{body}"))
    }

    fn err(body: &str) -> String {
        format!("{:#}", parse(body).expect_err("should be rejected"))
    }

    #[test]
    fn reads_kube_proxy_configuration() {
        let cfg = parse(
            r#"
mode: nftables
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
nodePortAddresses: ["192.168.0.0/16"]
metricsBindAddress: 127.0.0.1:10249
hostnameOverride: node-a
conntrack:
  maxPerCore: 0
  tcpBeLiberal: true
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
        assert_eq!(
            cfg.warnings,
            vec![
                "conntrack.tcpBeLiberal: accepted but ignored by svcplane",
                "frobnicate: unknown field, ignored",
                "nftables.masqueradeBit: accepted but ignored by svcplane",
            ],
            "maxPerCore: 0 asks for nothing, so it is not warned about"
        );
    }

    #[test]
    fn only_the_selected_mode_block_is_read() {
        let cfg = parse(
            "mode: nftables\niptables:\n  masqueradeAll: true\n  syncPeriod: 5s\n  masqueradeBit: 14\nnftables:\n  syncPeriod: 45s\n",
        )
        .unwrap();
        assert_eq!(cfg.masquerade_all, None);
        assert_eq!(cfg.sync_period, Some(Duration::from_secs(45)));
        assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
        // ...but another block is still type-checked.
        assert!(err("iptables:\n  syncPeriod: soon\n").contains("iptables.syncPeriod"));
    }

    #[test]
    fn v1alpha2_fields_are_unknown_with_a_hint() {
        let cfg = parse("syncPeriod: 10s\nlinux:\n  masqueradeAll: true\n").unwrap();
        assert_eq!(cfg.sync_period, None);
        assert_eq!(cfg.masquerade_all, None);
        assert!(
            cfg.warnings
                .iter()
                .any(|w| w.starts_with("syncPeriod: unknown field")
                    && w.contains("nftables.syncPeriod")),
            "{:?}",
            cfg.warnings
        );
        assert!(cfg.warnings.iter().any(|w| w.starts_with("linux: unknown")));
    }

    #[test]
    fn kubeadm_defaults_do_not_warn() {
        // What `kube-proxy --write-config-to` / kubeadm write: zero values everywhere.
        let cfg = parse(
            r#"
bindAddressHardFail: false
clientConnection: {acceptContentTypes: "", burst: 0, contentType: "", kubeconfig: "", qps: 0}
clusterCIDR: ""
configSyncPeriod: 0s
conntrack: {maxPerCore: null, min: null, tcpBeLiberal: false, tcpCloseWaitTimeout: null, tcpEstablishedTimeout: null, udpStreamTimeout: 0s, udpTimeout: 0s}
detectLocal: {bridgeInterface: "", interfaceNamePrefix: ""}
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables: {localhostNodePorts: null, masqueradeAll: false, masqueradeBit: null, minSyncPeriod: 0s, syncPeriod: 0s}
ipvs: {excludeCIDRs: null, minSyncPeriod: 0s, scheduler: "", strictARP: false, syncPeriod: 0s, tcpFinTimeout: 0s, tcpTimeout: 0s, udpTimeout: 0s}
logging: {flushFrequency: 0, options: {json: {infoBufferSize: "0"}, text: {infoBufferSize: "0"}}, verbosity: 0}
metricsBindAddress: ""
mode: ""
nftables: {masqueradeAll: false, masqueradeBit: null, minSyncPeriod: 0s, syncPeriod: 0s}
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel: {enableDSR: false, forwardHealthCheckVip: false, networkName: "", rootHnsEndpointName: "", sourceVip: ""}
"#,
        )
        .unwrap();
        assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
        assert_eq!(cfg.mode, None);
        assert_eq!(cfg.cluster_cidrs, None);
    }

    #[test]
    fn wrong_types_name_the_field() {
        assert!(err("clusterCIDR: 5\n").contains("clusterCIDR: expected a string"));
        assert!(
            err("nftables:\n  masqueradeAll: yes please\n")
                .contains("nftables.masqueradeAll: expected true or false")
        );
        assert!(err("oomScoreAdj: lots\n").contains("oomScoreAdj: expected an integer"));
        assert!(
            err("conntrack:\n  udpTimeout: 5\n")
                .contains("conntrack.udpTimeout: expected a duration")
        );
        assert!(err("featureGates:\n  Foo: maybe\n").contains("featureGates: expected a map"));
        assert!(
            err("nodePortAddresses: 10.0.0.0/8\n").contains("nodePortAddresses: expected a list")
        );
        assert!(err("conntrack: 3\n").contains("conntrack: expected a mapping"));
    }

    #[test]
    fn rejects_what_svcplane_cannot_honour() {
        assert!(
            err("detectLocalMode: NodeCIDR\n")
                .contains("detectLocalMode: NodeCIDR is not supported")
        );
        assert!(parse("detectLocalMode: ClusterCIDR\n").is_ok());
        assert!(err("nodePortAddresses: [primary]\n").contains("primary"));
        let all = parse("nodePortAddresses: [all]\n").unwrap();
        assert_eq!(all.nodeport_addresses.map(|v| v.len()), Some(2));
    }

    #[test]
    fn ipvs_exclude_cidrs_and_timeouts_are_read_in_ipvs_mode() {
        let block = "ipvs:\n  excludeCIDRs: [10.96.8.0/24, \"fd00:8::/64\"]\n  tcpTimeout: 1h\n  tcpFinTimeout: 1m30s\n  udpTimeout: 0s\n";
        let cfg = parse(&format!("mode: ipvs\n{block}")).unwrap();
        assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
        assert_eq!(
            cfg.ipvs_exclude_cidrs,
            Some(vec![
                "10.96.8.0/24".parse().unwrap(),
                "fd00:8::/64".parse().unwrap()
            ])
        );
        assert_eq!(cfg.ipvs_tcp_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(cfg.ipvs_tcp_fin_timeout, Some(Duration::from_secs(90)));
        assert_eq!(cfg.ipvs_udp_timeout, Some(Duration::ZERO));
        // Another mode's block is type-checked only, as kube-proxy reads it only in ipvs mode.
        let other = parse(&format!("mode: nftables\n{block}")).unwrap();
        assert_eq!(other.ipvs_exclude_cidrs, None);
        assert_eq!(other.ipvs_tcp_timeout, None);
        assert!(other.warnings.is_empty(), "{:?}", other.warnings);
        // A bad value names the field and the value.
        let bad = err("mode: ipvs\nipvs:\n  excludeCIDRs: [10.96.8.0/24, 10.1.2.0/33]\n");
        assert!(
            bad.contains("ipvs.excludeCIDRs") && bad.contains("10.1.2.0/33"),
            "{bad}"
        );
        assert!(err("mode: ipvs\nipvs:\n  udpTimeout: soon\n").contains("ipvs.udpTimeout"));
        assert!(err("mode: ipvs\nipvs:\n  excludeCIDRs: 10.0.0.0/8\n").contains("expected a list"));
    }

    #[test]
    fn client_connection_is_parsed_for_the_api_source() {
        let cfg = parse("clientConnection:\n  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\n  qps: 7.5\n  burst: 20\n").unwrap();
        assert_eq!(
            cfg.kubeconfig,
            Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert_eq!(cfg.api_qps, Some(7.5));
        assert_eq!(cfg.api_burst, Some(20));
        // Read, so not warned about (kubeadm's kube-proxy ConfigMap sets them); its
        // ignored fields still are.
        assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
        let cfg = parse("clientConnection:\n  contentType: application/json\n").unwrap();
        assert_eq!(
            cfg.warnings,
            ["clientConnection.contentType: accepted but ignored by svcplane"]
        );
    }

    #[test]
    fn rejects_wrong_kind_and_bad_values() {
        assert!(parse_file_config("apiVersion: v1\nkind: ConfigMap\n").is_err());
        assert!(err("clusterCIDR: 10.0.0.0/33\n").contains("clusterCIDR"));
    }

    #[test]
    fn cidr_lists() {
        let v = parse_cidr_list("10.0.0.1/8, fd00::/64,").unwrap();
        assert_eq!(v[0].to_string(), "10.0.0.0/8");
        assert_eq!(v.len(), 2);
        assert!(parse_cidr_list("nope").is_err());
    }
}
