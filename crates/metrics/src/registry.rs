//! kube-proxy's Prometheus metrics (`pkg/proxy/metrics/metrics.go`), same names, help and
//! buckets, plus `svcplane_invalid_objects_total`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;
use svcplane_proxy::sync_loop::{SyncObserver, SyncOutcome, SyncStatus};
use svcplane_proxy::{DesiredState, EmptyVerdict, ExternalPolicy, ServicePortState};
use tokio::sync::watch;

/// A label set of `(name, value)` pairs.
pub type Labels = Vec<(&'static str, &'static str)>;
type TimestampGauge = Gauge<f64, AtomicU64>;

/// kube-proxy's sync latency buckets: 1 ms × 2, 15 buckets (1 ms … 16.384 s).
pub fn sync_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 15).collect()
}

/// kube-proxy's network programming buckets: 0.25, 0.5, 1..59, 60..115 by 5, 120..300 by 30.
pub fn network_programming_buckets() -> Vec<f64> {
    linear_buckets(0.25, 0.25, 2)
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
        .collect()
}

/// Every metric svcplane exports. Shared as an `Arc`; all updates are atomic.
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub network_programming_duration: Histogram,
    pub last_timestamp: TimestampGauge,
    pub last_queued_timestamp: TimestampGauge,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes_total: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes_total: Counter,
    /// `traffic_policy` = `internal` | `external`.
    pub no_local_endpoints: Family<Labels, Gauge>,
    pub nftables_sync_failures: Counter,
    /// iptables mode: `table` = `nat` | `filter`, the rules svcplane owns (both families).
    pub iptables_rules: Family<Labels, Gauge>,
    /// iptables mode: failed iptables-restore runs (partial ones included, as kube-proxy).
    pub iptables_restore_failures: Counter,
    /// iptables mode: failed partial iptables-restore runs (each then retried in full).
    pub iptables_partial_restore_failures: Counter,
    /// The mode whose failure counters `record_sync` feeds.
    iptables_mode: bool,
    /// `ip_family` = `4` | `6`; incremented by the conntrack reconciler.
    pub conntrack_deleted_entries: Family<Labels, Counter>,
    /// Conntrack reconciler failures (socket, dump or delete); the syncs still succeeded.
    pub conntrack_failures: Counter,
    /// `code` = `200` | `503`.
    pub healthz_total: Family<Labels, Counter>,
    pub livez_total: Family<Labels, Counter>,
    pub invalid_objects: Counter,
    /// `resource` = `services` | `endpointslices` | `nodes`: the API source's watch errors.
    pub source_watch_errors: Family<Labels, Counter>,
    /// What `no_local_endpoints` counts for the last state recorded, kept so that a sync
    /// updates it from its diff instead of scanning every service.
    no_local: std::sync::Mutex<NoLocalCount>,
}

/// [`no_local_endpoints`] of one state, identified by its address (only compared).
#[derive(Debug, Default)]
struct NoLocalCount {
    state: usize,
    internal: usize,
    external: usize,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The metrics of nftables mode.
    pub fn new() -> Metrics {
        Self::for_mode("nftables")
    }

    /// The metrics of `mode` (`nftables`, `iptables`, ...): as kube-proxy's
    /// RegisterMetrics, a mode's own metrics are registered only in that mode.
    pub fn for_mode(mode: &str) -> Metrics {
        let iptables_mode = mode == "iptables";
        let mut m = Metrics {
            registry: Registry::default(),
            sync_duration: Histogram::new(sync_buckets()),
            sync_full_duration: Histogram::new(sync_buckets()),
            sync_partial_duration: Histogram::new(sync_buckets()),
            network_programming_duration: Histogram::new(network_programming_buckets()),
            last_timestamp: TimestampGauge::default(),
            last_queued_timestamp: TimestampGauge::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            no_local_endpoints: Family::default(),
            nftables_sync_failures: Counter::default(),
            iptables_rules: Family::default(),
            iptables_restore_failures: Counter::default(),
            iptables_partial_restore_failures: Counter::default(),
            iptables_mode,
            no_local: std::sync::Mutex::default(),
            conntrack_deleted_entries: Family::default(),
            conntrack_failures: Counter::default(),
            healthz_total: Family::default(),
            livez_total: Family::default(),
            invalid_objects: Counter::default(),
            source_watch_errors: Family::default(),
        };
        // Counters are registered without `_total`: the OpenMetrics encoder appends it.
        let r = &mut m.registry;
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial_duration.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_timestamp.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued_timestamp.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes_total.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes_total.clone(),
        );
        // A gauge whose name ends in `_total`, as upstream.
        r.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        if iptables_mode {
            r.register(
                "kubeproxy_sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by kube-proxy",
                m.iptables_rules.clone(),
            );
            r.register(
                "kubeproxy_sync_proxy_rules_iptables_restore_failures",
                "Cumulative proxy iptables restore failures",
                m.iptables_restore_failures.clone(),
            );
            r.register(
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
                "Cumulative proxy iptables partial restore failures",
                m.iptables_partial_restore_failures.clone(),
            );
            for table in ["nat", "filter"] {
                let _ = m.iptables_rules.get_or_create(&vec![("table", table)]);
            }
        } else {
            r.register(
                "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                "Cumulative proxy nftables sync failures",
                m.nftables_sync_failures.clone(),
            );
        }
        r.register(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            m.conntrack_deleted_entries.clone(),
        );
        r.register(
            "svcplane_conntrack_reconciler_failures",
            "Cumulative conntrack reconciler failures (the sync itself succeeded)",
            m.conntrack_failures.clone(),
        );
        r.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz_total.clone(),
        );
        r.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez_total.clone(),
        );
        r.register(
            "svcplane_invalid_objects",
            "Cumulative problems reported by the object source (invalid objects, values ignored in kept objects, unparsable files)",
            m.invalid_objects.clone(),
        );
        r.register(
            "svcplane_source_watch_errors",
            "Cumulative Kubernetes API watch errors (failed lists and watches, 410 Gone) by resource; the last state is kept",
            m.source_watch_errors.clone(),
        );
        // Every label value exists from the start, so a scrape shows 0 rather than nothing.
        for policy in ["internal", "external"] {
            let _ = m
                .no_local_endpoints
                .get_or_create(&vec![("traffic_policy", policy)]);
        }
        for family in ["4", "6"] {
            let _ = m
                .conntrack_deleted_entries
                .get_or_create(&vec![("ip_family", family)]);
        }
        m
    }

    /// The registry, to add metrics of other components (DNS) before the `Metrics` is shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Count one problem reported by the object source (the CLI's `ProblemSink`).
    pub fn invalid_object(&self) {
        self.invalid_objects.inc();
    }

    /// Bring `svcplane_source_watch_errors_total` up to the source's counts (at scrape time).
    pub fn observe_source(&self, status: &svcplane_source::ApiSourceStatus) {
        for resource in svcplane_source::kube::ApiResource::ALL {
            let counter = self
                .source_watch_errors
                .get_or_create(&vec![("resource", resource.as_str())]);
            let seen = status.get(resource).errors;
            counter.inc_by(seen.saturating_sub(counter.get()));
        }
    }

    /// Count conntrack entries the reconciler deleted (`ip_family` is `"4"` or `"6"`).
    pub fn conntrack_deleted(&self, ip_family: &'static str, entries: u64) {
        self.conntrack_deleted_entries
            .get_or_create(&vec![("ip_family", ip_family)])
            .inc_by(entries);
    }

    /// Count one healthz (or livez) answer by status code.
    pub fn health_answer(&self, livez: bool, code: u16) {
        let family = if livez {
            &self.livez_total
        } else {
            &self.healthz_total
        };
        let code = if code == 200 { "200" } else { "503" };
        family.get_or_create(&vec![("code", code)]).inc();
    }

    /// Refresh what comes from the sync loop's status (called before each scrape).
    pub fn observe_status(&self, status: &SyncStatus) {
        if let Some(t) = status.last_queued {
            self.last_queued_timestamp.set(unix_seconds(t));
        }
    }

    /// Record one sync that finished at wall time `now`.
    pub fn record_sync(&self, outcome: &SyncOutcome, now: SystemTime) {
        // The changes this sync carried are no longer pending, whatever its result: a failed
        // sync is retried as a full sync that includes them.
        self.service_changes_total
            .inc_by(outcome.pending_services as u64);
        self.endpoint_changes_total
            .inc_by(outcome.pending_endpoint_slices as u64);
        self.service_changes_pending.set(0);
        self.endpoint_changes_pending.set(0);
        let report = match &outcome.result {
            Ok(report) => report,
            Err(_) => {
                if self.iptables_mode {
                    self.iptables_restore_failures.inc();
                } else {
                    self.nftables_sync_failures.inc();
                }
                return;
            }
        };
        // A refused partial restore was retried in full within the sync; kube-proxy
        // counts it in both counters.
        self.iptables_partial_restore_failures
            .inc_by(report.partial_restore_failures);
        self.iptables_restore_failures
            .inc_by(report.partial_restore_failures);
        if let Some((nat, filter)) = report.iptables_rules {
            for (table, n) in [("nat", nat), ("filter", filter)] {
                self.iptables_rules
                    .get_or_create(&vec![("table", table)])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        self.conntrack_deleted("4", report.conntrack_deleted_v4);
        self.conntrack_deleted("6", report.conntrack_deleted_v6);
        self.conntrack_failures.inc_by(report.conntrack_failures);
        let seconds = outcome.duration.as_secs_f64();
        self.sync_duration.observe(seconds);
        if outcome.full {
            self.sync_full_duration.observe(seconds);
        } else {
            self.sync_partial_duration.observe(seconds);
        }
        self.last_timestamp.set(unix_seconds(now));
        if !outcome.trigger_times.is_empty() {
            // As kube-proxy: from each EndpointSlice change's trigger time (set by the
            // EndpointSlice controller when the Pod or Service changed) to now.
            for t in &outcome.trigger_times {
                let latency = now.duration_since(*t).unwrap_or(Duration::ZERO);
                self.network_programming_duration
                    .observe(latency.as_secs_f64());
            }
        } else if let Some(queued) = outcome.queued_since {
            // No trigger times (a manifests directory has none): from the change reaching
            // svcplane to the rules being in the kernel.
            let latency = now.duration_since(queued).unwrap_or(Duration::ZERO);
            self.network_programming_duration
                .observe(latency.as_secs_f64());
        }
        let (internal, external) = self.count_no_local(outcome);
        self.no_local_endpoints
            .get_or_create(&vec![("traffic_policy", "internal")])
            .set(internal as i64);
        self.no_local_endpoints
            .get_or_create(&vec![("traffic_policy", "external")])
            .set(external as i64);
    }
}

impl Metrics {
    /// [`no_local_endpoints`] of a successful sync's state: from the last count and the
    /// sync's diff when that count is of the diff's `previous` state (the usual case, so one
    /// change costs O(changed)), else counted afresh.
    fn count_no_local(&self, outcome: &SyncOutcome) -> (usize, usize) {
        let mut count = self
            .no_local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let diff = &outcome.diff;
        let prev = diff
            .previous
            .as_ref()
            .map_or(0, |p| Arc::as_ptr(p) as usize);
        let next = Arc::as_ptr(&outcome.desired) as usize;
        if count.state == prev && prev != 0 {
            for (fam, fam_diff) in diff
                .previous
                .iter()
                .flat_map(|p| p.families())
                .zip([&diff.v4, &diff.v6])
            {
                for key in fam_diff.removed.iter().chain(&fam_diff.changed) {
                    if let Some(svc) = fam.services.get(key) {
                        let (i, e) = drops(svc);
                        count.internal = count.internal.saturating_sub(usize::from(i));
                        count.external = count.external.saturating_sub(usize::from(e));
                    }
                }
            }
            for (fam, fam_diff) in outcome
                .desired
                .families()
                .into_iter()
                .zip([&diff.v4, &diff.v6])
            {
                for key in fam_diff.added.iter().chain(&fam_diff.changed) {
                    if let Some(svc) = fam.services.get(key) {
                        let (i, e) = drops(svc);
                        count.internal += usize::from(i);
                        count.external += usize::from(e);
                    }
                }
            }
        } else {
            (count.internal, count.external) = no_local_endpoints(&outcome.desired);
        }
        count.state = next;
        (count.internal, count.external)
    }
}

/// Service ports (both families) with a Local policy whose traffic is dropped because the
/// service has endpoints but none on this node: (internal, external), as kube-proxy counts.
pub fn no_local_endpoints(desired: &DesiredState) -> (usize, usize) {
    let mut internal = 0;
    let mut external = 0;
    for family in desired.families() {
        for svc in family.services.values() {
            let (i, e) = drops(svc);
            internal += usize::from(i);
            external += usize::from(e);
        }
    }
    (internal, external)
}

/// Whether one service port counts in [`no_local_endpoints`]: (internal, external).
fn drops(svc: &ServicePortState) -> (bool, bool) {
    let internal = svc.internal.verdict_when_empty() == Some(EmptyVerdict::Drop);
    let external = matches!(svc.external_policy, ExternalPolicy::Local { .. })
        && svc.has_external()
        && svc.external.verdict_when_empty() == Some(EmptyVerdict::Drop);
    (internal, external)
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The last successfully applied desired state (`None` before the first success).
pub type AppliedState = watch::Receiver<Option<Arc<DesiredState>>>;

/// The [`SyncObserver`] svcplane installs: records metrics and publishes each successfully
/// applied state (for the healthCheckNodePort servers).
pub struct SyncRecorder {
    metrics: Arc<Metrics>,
    applied: watch::Sender<Option<Arc<DesiredState>>>,
}

impl SyncRecorder {
    /// The recorder and a receiver of the last successfully applied state.
    pub fn new(metrics: Arc<Metrics>) -> (SyncRecorder, AppliedState) {
        let (applied, rx) = watch::channel(None);
        (SyncRecorder { metrics, applied }, rx)
    }
}

impl SyncObserver for SyncRecorder {
    fn on_sync(&self, outcome: &SyncOutcome) {
        self.metrics.record_sync(outcome, SystemTime::now());
        if outcome.ok() {
            // As kube-proxy, health-check servers follow the rules actually programmed.
            self.applied.send_replace(Some(outcome.desired.clone()));
        }
    }
}

/// Desired states for tests, built by hand (the engine's test helpers are private).
#[cfg(test)]
pub(crate) mod fixtures {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use svcplane_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
    use svcplane_proxy::{
        DesiredState, EmptyVerdict, ExternalPolicy, FamilyState, HealthCheck, ServicePortState,
        TrafficTarget,
    };

    pub fn target(endpoints: usize, if_empty: EmptyVerdict) -> TrafficTarget {
        TrafficTarget {
            endpoints: (0..endpoints).collect(),
            if_empty,
        }
    }

    /// A service port; `internal`/`external` are the targets, `node_port` makes it external.
    pub fn port(
        name: &str,
        internal: TrafficTarget,
        external: TrafficTarget,
        local: bool,
        node_port: Option<u16>,
    ) -> Arc<ServicePortState> {
        Arc::new(ServicePortState {
            name: ServicePortName {
                service: NamespacedName::new("ns", name),
                port: "".into(),
                protocol: Protocol::Tcp,
            },
            protocol: Protocol::Tcp,
            port: 80,
            cluster_ip: None,
            node_port,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            affinity_timeout_seconds: None,
            ipvs_scheduler: None,
            endpoints: Vec::new(),
            internal,
            external,
            external_policy: if local {
                ExternalPolicy::Local {
                    local_origin: target(0, EmptyVerdict::Reject),
                }
            } else {
                ExternalPolicy::Cluster
            },
            health_check_node_port: None,
        })
    }

    pub fn state(
        v4: Vec<Arc<ServicePortState>>,
        health_checks: &[(u16, &str, usize)],
    ) -> Arc<DesiredState> {
        let mut fam = FamilyState::empty(IpFamily::V4);
        for s in v4 {
            fam.services.insert(s.name.clone(), s);
        }
        Arc::new(DesiredState {
            node_name: "node-a".into(),
            node_zone: None,
            v4: fam,
            v6: FamilyState::empty(IpFamily::V6),
            health_checks: health_checks
                .iter()
                .map(|&(port, name, n)| {
                    (
                        port,
                        HealthCheck {
                            service: NamespacedName::new("ns", name),
                            local_endpoints: n,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use svcplane_proxy::SyncReport;

    /// The value of the sample line `name` (with labels, exactly as encoded).
    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    fn outcome(full: bool, ms: u64, ok: bool, state: Arc<DesiredState>) -> SyncOutcome {
        SyncOutcome {
            duration: Duration::from_millis(ms),
            full,
            result: if ok {
                Ok(SyncReport {
                    full,
                    size: 1,
                    conntrack_deleted_v4: 2,
                    conntrack_deleted_v6: 1,
                    conntrack_failures: 1,
                    ..SyncReport::default()
                })
            } else {
                Err("nft: boom".into())
            },
            pending_services: 2,
            pending_endpoint_slices: 3,
            service_ports: 1,
            queued_since: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(100)),
            trigger_times: Vec::new(),
            diff: svcplane_proxy::Diff::between(None, &state, full),
            desired: state,
        }
    }

    #[test]
    fn iptables_mode_has_kube_proxys_iptables_metrics() {
        let m = Metrics::for_mode("iptables");
        let text = m.encode();
        assert!(text.contains("# TYPE kubeproxy_sync_proxy_rules_iptables_total gauge"));
        assert!(text.contains("kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"} 0"));
        assert!(
            text.contains("# TYPE kubeproxy_sync_proxy_rules_iptables_restore_failures counter")
        );
        assert!(!text.contains("nftables_sync_failures"), "{text}");
        let state = state(vec![], &[]);
        m.record_sync(&outcome(true, 5, false, state.clone()), SystemTime::now());
        let mut ok = outcome(true, 5, true, state);
        if let Ok(r) = &mut ok.result {
            r.partial_restore_failures = 1;
            r.iptables_rules = Some((120, 7));
        }
        m.record_sync(&ok, SystemTime::now());
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"}"
            ),
            Some(120.0)
        );
        assert_eq!(
            sample(
                &text,
                "kubeproxy_sync_proxy_rules_iptables_total{table=\"filter\"}"
            ),
            Some(7.0)
        );
        assert!(!Metrics::new().encode().contains("iptables"));
    }

    #[test]
    fn kube_proxy_names_and_types() {
        let text = Metrics::new().encode();
        for (name, kind) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
            (
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "histogram",
            ),
            (
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "histogram",
            ),
            (
                "kubeproxy_network_programming_duration_seconds",
                "histogram",
            ),
            ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "gauge",
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "gauge",
            ),
            ("kubeproxy_sync_proxy_rules_endpoint_changes", "counter"),
            (
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "gauge",
            ),
            ("kubeproxy_sync_proxy_rules_service_changes", "counter"),
            (
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "gauge",
            ),
            (
                "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                "counter",
            ),
            ("kubeproxy_conntrack_reconciler_deleted_entries", "counter"),
            ("svcplane_conntrack_reconciler_failures", "counter"),
            ("svcplane_invalid_objects", "counter"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind} missing:\n{text}"
            );
        }
        // Counters are exposed with the `_total` suffix kube-proxy's names have.
        for counter in [
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
            "svcplane_invalid_objects_total",
            "svcplane_conntrack_reconciler_failures_total",
        ] {
            assert_eq!(sample(&text, counter), Some(0.0), "{counter}");
        }
        for labels in [
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"}",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"}",
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"4\"}",
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"6\"}",
        ] {
            assert_eq!(sample(&text, labels), Some(0.0), "{labels}");
        }
        assert!(text.contains(
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds.\n"
        ));
    }

    #[test]
    fn network_programming_latency_from_trigger_times() {
        let m = Metrics::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(103);
        let mut o = outcome(false, 1, true, state(vec![], &[]));
        // Queued at 100 s, but the changes were triggered at 90 s and 102.5 s.
        o.trigger_times = vec![
            SystemTime::UNIX_EPOCH + Duration::from_secs(90),
            SystemTime::UNIX_EPOCH + Duration::from_millis(102_500),
        ];
        m.record_sync(&o, now);
        let text = m.encode();
        let v = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name}:\n{text}"));
        assert_eq!(
            v("kubeproxy_network_programming_duration_seconds_count"),
            2.0
        );
        assert_eq!(
            v("kubeproxy_network_programming_duration_seconds_sum"),
            13.5
        );
    }

    #[test]
    fn source_watch_errors_follow_the_source_status() {
        let m = Metrics::new();
        let mut st = svcplane_source::ApiSourceStatus::default();
        st.watches[0].errors = 3;
        m.observe_source(&st);
        st.watches[0].errors = 5;
        st.watches[2].errors = 1;
        m.observe_source(&st);
        m.observe_source(&st);
        let text = m.encode();
        let v = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name}:\n{text}"));
        assert_eq!(
            v("svcplane_source_watch_errors_total{resource=\"services\"}"),
            5.0
        );
        assert_eq!(
            v("svcplane_source_watch_errors_total{resource=\"endpointslices\"}"),
            0.0
        );
        assert_eq!(
            v("svcplane_source_watch_errors_total{resource=\"nodes\"}"),
            1.0
        );
    }

    #[test]
    fn buckets_are_kube_proxys() {
        let b = sync_buckets();
        assert_eq!(b.len(), 15);
        assert_eq!(b[0], 0.001);
        assert_eq!(b[14], 16.384);
        let text = Metrics::new().encode();
        let les: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kubeproxy_sync_proxy_rules_duration_seconds_bucket"))
            .collect();
        assert_eq!(les.len(), 16, "15 buckets and +Inf");
        assert!(les[0].contains("le=\"0.001\""), "{}", les[0]);
        assert!(les[15].contains("le=\"+Inf\""));

        let n = network_programming_buckets();
        assert_eq!(n.len(), 80);
        assert_eq!((n[0], n[1], n[2], n[60]), (0.25, 0.5, 1.0, 59.0));
        assert_eq!((n[61], n[72], n[73], n[79]), (60.0, 115.0, 120.0, 300.0));
    }

    #[test]
    fn values_after_simulated_syncs() {
        let m = Metrics::new();
        let empty = state(vec![], &[]);
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(103);
        m.record_sync(&outcome(true, 3, true, empty.clone()), t);
        m.record_sync(&outcome(false, 1, true, empty.clone()), t);
        m.record_sync(&outcome(false, 1, false, empty), t);
        m.invalid_object();
        m.conntrack_deleted("4", 5);
        m.observe_status(&SyncStatus {
            last_queued: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(99)),
            ..SyncStatus::default()
        });
        let text = m.encode();
        let v = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name}:\n{text}"));
        assert_eq!(v("kubeproxy_sync_proxy_rules_duration_seconds_count"), 2.0);
        assert_eq!(
            v("kubeproxy_sync_full_proxy_rules_duration_seconds_count"),
            1.0
        );
        assert_eq!(
            v("kubeproxy_sync_partial_proxy_rules_duration_seconds_count"),
            1.0
        );
        // 3 ms falls in the 4 ms bucket, not the 2 ms one.
        assert_eq!(
            v("kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.002\"}"),
            0.0
        );
        assert_eq!(
            v("kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.004\"}"),
            1.0
        );
        // Queued at 100 s, applied at 103 s: 3 s, twice (failures are not observed).
        assert_eq!(
            v("kubeproxy_network_programming_duration_seconds_count"),
            2.0
        );
        assert_eq!(v("kubeproxy_network_programming_duration_seconds_sum"), 6.0);
        assert_eq!(
            v("kubeproxy_network_programming_duration_seconds_bucket{le=\"2.0\"}"),
            0.0
        );
        assert_eq!(
            v("kubeproxy_network_programming_duration_seconds_bucket{le=\"3.0\"}"),
            2.0
        );
        assert_eq!(
            v("kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
            103.0
        );
        assert_eq!(
            v("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"),
            99.0
        );
        assert_eq!(v("kubeproxy_sync_proxy_rules_service_changes_total"), 6.0);
        assert_eq!(v("kubeproxy_sync_proxy_rules_endpoint_changes_total"), 9.0);
        assert_eq!(v("kubeproxy_sync_proxy_rules_service_changes_pending"), 0.0);
        assert_eq!(
            v("kubeproxy_sync_proxy_rules_nftables_sync_failures_total"),
            1.0
        );
        assert_eq!(v("svcplane_invalid_objects_total"), 1.0);
        // 5 by hand, plus 2 (v4) and 1 (v6) from each of the two successful syncs.
        assert_eq!(
            v("kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"4\"}"),
            9.0
        );
        assert_eq!(
            v("kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"6\"}"),
            2.0
        );
        assert_eq!(v("svcplane_conntrack_reconciler_failures_total"), 2.0);
    }

    #[test]
    fn no_local_endpoints_counts_local_policies_that_drop() {
        let drop = || target(0, EmptyVerdict::Drop);
        let reject = || target(0, EmptyVerdict::Reject);
        let some = || target(1, EmptyVerdict::Reject);
        let desired = state(
            vec![
                // iTP Local, endpoints elsewhere only: internal.
                port("a", drop(), some(), false, None),
                // eTP Local with a NodePort and no local endpoints: external.
                port("b", some(), drop(), true, Some(30001)),
                // No endpoints at all: rejected, counted nowhere (as kube-proxy).
                port("c", reject(), reject(), true, Some(30002)),
                // eTP Local but not externally accessible: not counted.
                port("d", some(), drop(), true, None),
                // Both.
                port("e", drop(), drop(), true, Some(30003)),
            ],
            &[],
        );
        assert_eq!(no_local_endpoints(&desired), (2, 2));
        let m = Metrics::new();
        m.record_sync(&outcome(true, 1, true, desired), SystemTime::now());
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"}"
            ),
            Some(2.0)
        );
    }

    #[test]
    fn no_local_endpoints_follows_each_syncs_diff() {
        let drop = || target(0, EmptyVerdict::Drop);
        let some = || target(1, EmptyVerdict::Reject);
        let gauges = |m: &Metrics| {
            let text = m.encode();
            let g = |p: &str| {
                let name = format!(
                    "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{traffic_policy=\"{p}\"}}"
                );
                sample(&text, &name)
            };
            (g("internal"), g("external"))
        };
        let m = Metrics::new();
        let a = state(
            vec![
                port("a", drop(), some(), false, None),
                port("b", some(), drop(), true, Some(30001)),
                port("c", some(), some(), false, None),
            ],
            &[],
        );
        m.record_sync(&outcome(true, 1, true, a.clone()), SystemTime::now());
        assert_eq!(gauges(&m), (Some(1.0), Some(1.0)));

        // a stops dropping, c starts, d arrives dropping both, b goes: counted from the diff.
        let mut b = (*a).clone();
        let key = |n: &str| {
            b.v4.services
                .keys()
                .find(|k| &*k.service.name == n)
                .cloned()
        };
        let (ka, kb, kc) = (key("a").unwrap(), key("b").unwrap(), key("c").unwrap());
        b.v4.services
            .insert(ka, port("a", some(), some(), false, None));
        b.v4.services.remove(&kb);
        b.v4.services
            .insert(kc, port("c", drop(), some(), false, None));
        let d = port("d", drop(), drop(), true, Some(30004));
        b.v4.services.insert(d.name.clone(), d);
        let b = Arc::new(b);
        let mut next = outcome(false, 1, true, b.clone());
        next.diff = svcplane_proxy::Diff::between(Some(a.clone()), &b, false);
        assert_eq!(next.diff.v4.changed.len(), 2);
        m.record_sync(&next, SystemTime::now());
        assert_eq!(gauges(&m), (Some(2.0), Some(1.0)));
        assert_eq!(no_local_endpoints(&b), (2, 1));

        // A diff from a state other than the one counted last (here: empty, from `a` to
        // `a`): counted afresh, not patched.
        let mut other = outcome(false, 1, true, a.clone());
        other.diff = svcplane_proxy::Diff::between(Some(a.clone()), &a, false);
        m.record_sync(&other, SystemTime::now());
        assert_eq!(gauges(&m), (Some(1.0), Some(1.0)));
    }

    #[test]
    fn recorder_publishes_only_successful_states() {
        let (rec, rx) = SyncRecorder::new(Arc::new(Metrics::new()));
        let failed = state(vec![], &[(30100, "x", 1)]);
        rec.on_sync(&outcome(true, 1, false, failed));
        assert!(rx.borrow().is_none());
        let ok = state(vec![], &[(30101, "y", 2)]);
        rec.on_sync(&outcome(true, 1, true, ok.clone()));
        assert!(Arc::ptr_eq(rx.borrow().as_ref().unwrap(), &ok));
    }
}
