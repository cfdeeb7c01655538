//! The sync loop: feeds source events into the [`Engine`] and drives a [`Dataplane`] with
//! kube-proxy's `BoundedFrequencyRunner` semantics.
//!
//! - Nothing is synced before the source reports [`SourceEvent::Synced`] (a partial view
//!   would delete rules of services not yet seen).
//! - Then a sync runs whenever changes are pending, but sync starts are at least
//!   `min_sync_period` apart (0: immediately).
//! - A full resync (`Diff.full`) happens at least every `sync_period`, even without changes,
//!   to repair tampering. (kube-proxy's runner wakes every `syncPeriod` but its nftables and
//!   iptables proxiers only rewrite everything hourly, `FullSyncPeriod`; here the wake-up is
//!   always a full resync, since a partial sync with no changes would do nothing.)
//! - A failed sync is retried with exponential backoff, as a full sync, against the last state
//!   the backend applied successfully.
//! - When the event channel closes, whatever is pending is applied once and the loop returns.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use svcplane_model::SourceEvent;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::dataplane::{Dataplane, SyncReport};
use crate::desired::{DesiredState, Diff};
use crate::engine::Engine;

/// Upper bound of the retry backoff after failed syncs.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);
/// Lower bound of the retry backoff, so `min_sync_period = 0` cannot spin on a broken backend.
pub const MIN_RETRY_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncLoopConfig {
    /// Minimum time between the starts of two syncs (kube-proxy `--*-min-sync-period`, 1 s).
    pub min_sync_period: Duration,
    /// Maximum time between full resyncs (kube-proxy `--*-sync-period`, 30 s).
    pub sync_period: Duration,
}

impl Default for SyncLoopConfig {
    fn default() -> Self {
        SyncLoopConfig {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
        }
    }
}

/// Published on the watch channel after every event that changes it (for health and status).
#[derive(Clone, Debug, Default)]
pub struct SyncStatus {
    pub last_success: Option<SystemTime>,
    pub last_attempt: Option<SystemTime>,
    pub last_error: Option<String>,
    pub successful_syncs: u64,
    pub failed_syncs: u64,
    /// When changes were last queued for a sync (kube-proxy's healthz "last queued").
    pub last_queued: Option<SystemTime>,
    /// At least one sync succeeded.
    pub synced_once: bool,
}

/// What one backend call did, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub duration: Duration,
    pub full: bool,
    /// The backend's report, or its error message.
    pub result: Result<SyncReport, String>,
    /// Services and EndpointSlices changed since the previous sync (`Engine::pending_changes`).
    pub pending_services: usize,
    pub pending_endpoint_slices: usize,
    /// Service ports in the synced state, both families.
    pub service_ports: usize,
}

impl SyncOutcome {
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }
}

/// Hook for metrics: called after every backend sync, from the loop's task (keep it cheap).
pub trait SyncObserver: Send + Sync {
    fn on_sync(&self, outcome: &SyncOutcome);
}

#[derive(Debug, thiserror::Error)]
pub enum SyncLoopError {
    /// The blocking task running the backend panicked or was cancelled; the backend is lost.
    #[error("dataplane backend task failed: {0}")]
    BackendTask(String),
}

/// Run until `rx` closes. See the module documentation for the schedule.
pub async fn run_sync_loop(
    engine: Engine,
    rx: mpsc::Receiver<SourceEvent>,
    backend: Box<dyn Dataplane>,
    config: SyncLoopConfig,
    status: watch::Sender<SyncStatus>,
) -> Result<(), SyncLoopError> {
    run_sync_loop_with_observer(engine, rx, backend, config, status, None).await
}

/// [`run_sync_loop`] with a [`SyncObserver`] told about every sync.
pub async fn run_sync_loop_with_observer(
    engine: Engine,
    mut rx: mpsc::Receiver<SourceEvent>,
    backend: Box<dyn Dataplane>,
    config: SyncLoopConfig,
    status: watch::Sender<SyncStatus>,
    observer: Option<Arc<dyn SyncObserver>>,
) -> Result<(), SyncLoopError> {
    let mut lp = LoopState {
        engine,
        backend: Some(backend),
        config,
        status,
        observer,
        source_synced: false,
        last_applied: None,
        last_start: None,
        last_full: None,
        consecutive_failures: 0,
    };
    loop {
        let deadline = lp.next_sync();
        tokio::select! {
            event = rx.recv() => match event {
                Some(SourceEvent::Changes(changes)) => lp.apply(changes),
                Some(SourceEvent::Synced) => {
                    if !lp.source_synced {
                        tracing::debug!("source synced; syncing the dataplane from now on");
                    }
                    lp.source_synced = true;
                }
                None => break,
            },
            () = sleep_until_opt(deadline), if deadline.is_some() => {
                lp.sync().await?;
            }
        }
    }
    if lp.source_synced && lp.needs_sync() {
        tracing::debug!("source closed; applying pending changes");
        lp.sync().await?;
    }
    Ok(())
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d).await;
    }
}

struct LoopState {
    engine: Engine,
    /// Moved into the blocking task during a sync and back out afterwards.
    backend: Option<Box<dyn Dataplane>>,
    config: SyncLoopConfig,
    status: watch::Sender<SyncStatus>,
    observer: Option<Arc<dyn SyncObserver>>,
    source_synced: bool,
    /// What the backend last applied successfully.
    last_applied: Option<Arc<DesiredState>>,
    /// Start of the last sync attempt.
    last_start: Option<Instant>,
    /// Start of the last successful full sync.
    last_full: Option<Instant>,
    consecutive_failures: u32,
}

impl LoopState {
    fn apply(&mut self, changes: Vec<svcplane_model::Change>) {
        for change in changes {
            self.engine.apply(change);
        }
        if self.engine.has_pending() {
            self.status
                .send_modify(|s| s.last_queued = Some(SystemTime::now()));
        }
    }

    /// Something must be sent: never synced yet, changes pending, or the last attempt failed.
    fn needs_sync(&self) -> bool {
        self.last_applied.is_none() || self.engine.has_pending() || self.consecutive_failures > 0
    }

    fn full_due(&self, now: Instant) -> bool {
        self.consecutive_failures > 0
            || self
                .last_full
                .is_none_or(|t| now >= t + self.config.sync_period)
    }

    /// When the next sync should start; `None` before the source has synced.
    fn next_sync(&self) -> Option<Instant> {
        if !self.source_synced {
            return None;
        }
        let now = Instant::now();
        let Some(last_start) = self.last_start else {
            return Some(now);
        };
        if self.consecutive_failures > 0 {
            return Some(
                last_start + retry_backoff(self.config.min_sync_period, self.consecutive_failures),
            );
        }
        let periodic = self.last_full.map_or(now, |t| t + self.config.sync_period);
        if self.needs_sync() {
            // Bounded frequency: never start two syncs closer than min_sync_period.
            Some(last_start + self.config.min_sync_period)
        } else {
            Some(periodic)
        }
    }

    async fn sync(&mut self) -> Result<(), SyncLoopError> {
        let start = Instant::now();
        let full = self.full_due(start);
        let (pending_services, pending_endpoint_slices) = self.engine.pending_changes();
        let desired = self.engine.desired();
        let diff = Diff::between(self.last_applied.clone(), &desired, full);
        if diff.is_empty() {
            // Changes that cancel out: nothing to send, and the state is what was applied.
            self.last_applied = Some(desired);
            return Ok(());
        }
        self.last_start = Some(start);
        self.status
            .send_modify(|s| s.last_attempt = Some(SystemTime::now()));

        let Some(mut backend) = self.backend.take() else {
            return Err(SyncLoopError::BackendTask("backend missing".to_string()));
        };
        let task_state = desired.clone();
        let task_diff = diff;
        let (backend, result, diff) = tokio::task::spawn_blocking(move || {
            let result = backend.sync(&task_state, &task_diff);
            (backend, result, task_diff)
        })
        .await
        .map_err(|e| SyncLoopError::BackendTask(e.to_string()))?;
        self.backend = Some(backend);
        let duration = start.elapsed();
        let service_ports = desired.v4.services.len() + desired.v6.services.len();

        let outcome_result = match result {
            Ok(report) => {
                tracing::debug!(
                    full = diff.full,
                    duration_ms = duration.as_millis() as u64,
                    size = report.size,
                    service_ports,
                    pending_services,
                    pending_endpoint_slices,
                    "dataplane synced"
                );
                self.last_applied = Some(desired);
                self.consecutive_failures = 0;
                if diff.full {
                    self.last_full = Some(start);
                }
                self.status.send_modify(|s| {
                    s.last_success = Some(SystemTime::now());
                    s.last_error = None;
                    s.successful_syncs += 1;
                    s.synced_once = true;
                });
                Ok(report)
            }
            Err(err) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let retry_in =
                    retry_backoff(self.config.min_sync_period, self.consecutive_failures);
                let message = err.to_string();
                if self.consecutive_failures >= 3 {
                    tracing::error!(
                        error = %message,
                        failures = self.consecutive_failures,
                        retry_in_ms = retry_in.as_millis() as u64,
                        "dataplane sync keeps failing; retrying with a full sync"
                    );
                } else {
                    tracing::warn!(
                        error = %message,
                        retry_in_ms = retry_in.as_millis() as u64,
                        "dataplane sync failed; retrying with a full sync"
                    );
                }
                self.status.send_modify(|s| {
                    s.last_error = Some(message.clone());
                    s.failed_syncs += 1;
                });
                Err(message)
            }
        };
        if let Some(observer) = &self.observer {
            observer.on_sync(&SyncOutcome {
                duration,
                full: diff.full,
                result: outcome_result,
                pending_services,
                pending_endpoint_slices,
                service_ports,
            });
        }
        Ok(())
    }
}

/// min(2^(n-1) × max(min_sync_period, 1 s), 30 s) after the n-th consecutive failure.
pub fn retry_backoff(min_sync_period: Duration, failures: u32) -> Duration {
    let base = min_sync_period.max(MIN_RETRY_BACKOFF);
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(MAX_RETRY_BACKOFF)
}
