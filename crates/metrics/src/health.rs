//! kube-proxy's proxy health (`pkg/proxy/healthcheck/proxy_health.go`), driven by the sync
//! loop's [`SyncStatus`].
//!
//! Healthy means: a sync has succeeded, and no change has been waiting longer than the
//! timeout (kube-proxy: 2 × syncPeriod) to be applied. Beyond kube-proxy, syncs that keep
//! failing for longer than the timeout also make it unhealthy even with nothing queued
//! (kube-proxy would stay healthy while its periodic resyncs fail).

use std::time::{Duration, SystemTime};

use svcplane_proxy::sync_loop::SyncStatus;
use svcplane_source::ApiSourceStatus;
use svcplane_source::kube::ApiResource;
use tokio::sync::watch;

/// The proxy's health as the sync loop reports it; cheap to clone into every server.
#[derive(Debug, Clone)]
pub struct ProxyHealth {
    status: watch::Receiver<SyncStatus>,
    timeout: Duration,
    /// The Kubernetes API source's watchers, shown in the body (not in the status code:
    /// as kube-proxy, health is about syncs, and the last state keeps being served).
    source: Option<watch::Receiver<ApiSourceStatus>>,
}

impl ProxyHealth {
    /// `sync_period` is the loop's longest time between syncs; the timeout is twice it, as kube-proxy.
    pub fn new(status: watch::Receiver<SyncStatus>, sync_period: Duration) -> ProxyHealth {
        ProxyHealth {
            status,
            timeout: sync_period.saturating_mul(2),
            source: None,
        }
    }

    /// Also report the API source's state in the body.
    pub fn with_source(mut self, source: watch::Receiver<ApiSourceStatus>) -> ProxyHealth {
        self.source = Some(source);
        self
    }

    pub fn check(&self) -> Health {
        let mut health = evaluate(&self.status.borrow(), SystemTime::now(), self.timeout);
        health.source = self.source.as_ref().map(|s| source_json(&s.borrow()));
        health
    }

    /// The API source's state, when it is the source.
    pub fn source_status(&self) -> Option<ApiSourceStatus> {
        self.source.as_ref().map(|s| s.borrow().clone())
    }
    pub fn status(&self) -> SyncStatus {
        self.status.borrow().clone()
    }
}

/// The answer to one health probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// Why it is unhealthy (`None` when healthy).
    pub reason: Option<String>,
    /// Last successful sync.
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
    /// The object source's state (`source` in the body), when it reports one.
    pub source: Option<serde_json::Value>,
}

impl Health {
    pub fn code(&self) -> u16 {
        if self.healthy { 200 } else { 503 }
    }

    /// kube-proxy's body, `{"lastUpdated": ..., "currentTime": ..., "nodeEligible": true}`,
    /// with RFC 3339 times and, when unhealthy, a `reason`. The node is always eligible:
    /// svcplane has no Node deletion or autoscaler taint to look at.
    pub fn body(&self) -> String {
        let mut body = serde_json::json!({
            "lastUpdated": self.last_updated.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(self.current_time),
            "nodeEligible": true,
        });
        if let Some(map) = body.as_object_mut() {
            if let Some(reason) = &self.reason {
                map.insert("reason".into(), reason.clone().into());
            }
            if let Some(source) = &self.source {
                map.insert("source".into(), source.clone());
            }
        }
        body.to_string()
    }
}

/// `{"kind":"kubernetes-api","synced":B,"watches":{"services":{...},...}}`.
pub fn source_json(status: &ApiSourceStatus) -> serde_json::Value {
    let mut watches = serde_json::Map::new();
    for resource in ApiResource::ALL {
        let w = status.get(resource);
        watches.insert(
            resource.as_str().into(),
            serde_json::json!({
                "synced": w.synced,
                "lists": w.lists,
                "errors": w.errors,
                "lastError": w.last_error,
                "lastErrorTime": w.last_error_time.map(rfc3339),
            }),
        );
    }
    serde_json::json!({
        "kind": "kubernetes-api",
        "synced": status.watches.iter().all(|w| w.synced),
        "healthy": status.healthy(),
        "watches": watches,
    })
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn age(now: SystemTime, then: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or(Duration::ZERO)
}

fn with_error(reason: String, status: &SyncStatus) -> String {
    match &status.last_error {
        Some(err) => format!("{reason}; last sync error: {err}"),
        None => reason,
    }
}

/// Evaluate `status` at `now`; `timeout` is kube-proxy's healthTimeout (2 × syncPeriod).
pub fn evaluate(status: &SyncStatus, now: SystemTime, timeout: Duration) -> Health {
    let unhealthy = |reason: String| Health {
        healthy: false,
        reason: Some(with_error(reason, status)),
        last_updated: status.last_success,
        current_time: now,
        source: None,
    };
    if !status.synced_once {
        return unhealthy("no successful sync yet".to_string());
    }
    if let Some(queued) = status.oldest_pending {
        let waited = age(now, queued);
        if waited > timeout {
            return unhealthy(format!(
                "changes queued {}s ago are not applied yet (limit {}s)",
                waited.as_secs(),
                timeout.as_secs()
            ));
        }
    }
    if status.last_error.is_some()
        && let Some(success) = status.last_success
    {
        let since = age(now, success);
        if since > timeout {
            return unhealthy(format!(
                "syncs failing; last success {}s ago (limit {}s)",
                since.as_secs(),
                timeout.as_secs()
            ));
        }
    }
    Health {
        healthy: true,
        reason: None,
        last_updated: status.last_success,
        current_time: now,
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn synced(s: u64) -> SyncStatus {
        SyncStatus {
            last_success: Some(at(s)),
            last_attempt: Some(at(s)),
            successful_syncs: 1,
            synced_once: true,
            ..SyncStatus::default()
        }
    }

    #[test]
    fn unhealthy_before_first_sync() {
        let h = evaluate(&SyncStatus::default(), at(0), TIMEOUT);
        assert!(!h.healthy);
        assert_eq!(h.code(), 503);
        assert_eq!(h.reason.as_deref(), Some("no successful sync yet"));
        let failed = SyncStatus {
            last_error: Some("nft: syntax error".into()),
            ..SyncStatus::default()
        };
        let h = evaluate(&failed, at(0), TIMEOUT);
        assert!(h.reason.unwrap().contains("nft: syntax error"));
    }

    #[test]
    fn healthy_after_sync_even_long_idle() {
        // No pending changes: idle for hours is still healthy (kube-proxy).
        let h = evaluate(&synced(0), at(10_000), TIMEOUT);
        assert!(h.healthy);
        assert_eq!(h.code(), 200);
        assert_eq!(h.last_updated, Some(at(0)));
    }

    #[test]
    fn pending_change_late_beyond_timeout() {
        let mut st = synced(0);
        st.oldest_pending = Some(at(100));
        assert!(
            evaluate(&st, at(160), TIMEOUT).healthy,
            "exactly at the limit"
        );
        let h = evaluate(&st, at(161), TIMEOUT);
        assert!(!h.healthy);
        assert!(h.reason.unwrap().contains("61s ago"));
        // Applied: healthy again.
        st.oldest_pending = None;
        st.last_success = Some(at(170));
        assert!(evaluate(&st, at(171), TIMEOUT).healthy);
    }

    #[test]
    fn failing_resyncs_become_unhealthy_after_timeout() {
        let mut st = synced(0);
        st.last_error = Some("boom".into());
        assert!(evaluate(&st, at(30), TIMEOUT).healthy);
        let h = evaluate(&st, at(61), TIMEOUT);
        assert!(!h.healthy);
        let reason = h.reason.unwrap();
        assert!(
            reason.contains("syncs failing") && reason.contains("boom"),
            "{reason}"
        );
    }

    #[test]
    fn body_is_kube_proxy_shaped_json() {
        let h = evaluate(&synced(0), at(5), TIMEOUT);
        let v: serde_json::Value = serde_json::from_str(&h.body()).unwrap();
        assert_eq!(v["lastUpdated"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["currentTime"], "2023-11-14T22:13:25.000Z");
        assert_eq!(v["nodeEligible"], true);
        assert!(v.get("reason").is_none());
        let h = evaluate(&SyncStatus::default(), at(0), TIMEOUT);
        let v: serde_json::Value = serde_json::from_str(&h.body()).unwrap();
        assert_eq!(v["reason"], "no successful sync yet");
        assert_eq!(v["lastUpdated"], "");
        assert!(v.get("source").is_none());
    }

    #[test]
    fn body_shows_the_api_source_without_changing_the_code() {
        let mut source = ApiSourceStatus::default();
        for w in &mut source.watches {
            w.synced = true;
            w.lists = 1;
        }
        source.watches[0].errors = 4;
        source.watches[0].last_error = Some("connection refused".into());
        let mut h = evaluate(&synced(0), at(5), TIMEOUT);
        h.source = Some(source_json(&source));
        assert_eq!(h.code(), 200, "an unreachable API does not fail healthz");
        let v: serde_json::Value = serde_json::from_str(&h.body()).unwrap();
        assert_eq!(v["source"]["kind"], "kubernetes-api");
        assert_eq!(v["source"]["synced"], true);
        assert_eq!(v["source"]["healthy"], false);
        assert_eq!(v["source"]["watches"]["services"]["errors"], 4);
        assert_eq!(
            v["source"]["watches"]["services"]["lastError"],
            "connection refused"
        );
        assert_eq!(
            v["source"]["watches"]["nodes"]["lastError"],
            serde_json::Value::Null
        );
    }
}
