//! The sync loop: feeds source events into the [`Engine`] and drives a [`Dataplane`] with
//! kube-proxy's `BoundedFrequencyRunner` semantics.
//!
//! - Nothing is synced before the source reports [`SourceEvent::Synced`] (a partial view
//!   would delete rules of services not yet seen).
//! - Then a sync runs whenever changes are pending, but sync starts are at least
//!   `min_sync_period` apart (0: immediately).
//! - Every `sync_period` the backend is called even without changes, with an empty partial
//!   diff: a cheap check that its rules are still there (it syncs in full when they are
//!   not, e.g. after `nft flush ruleset`). A full resync (`Diff.full`) that rewrites
//!   everything runs every `full_sync_period` (1 h), as kube-proxy's nftables and iptables
//!   proxiers do (`FullSyncPeriod`); a full rewrite of 10k services costs seconds.
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
    /// Maximum time between syncs, which check the kernel even without changes
    /// (kube-proxy `--*-sync-period`, 30 s).
    pub sync_period: Duration,
    /// Maximum time between full resyncs (kube-proxy's `FullSyncPeriod`, 1 h).
    pub full_sync_period: Duration,
}

/// kube-proxy's `FullSyncPeriod`.
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

impl Default for SyncLoopConfig {
    fn default() -> Self {
        SyncLoopConfig {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            full_sync_period: FULL_SYNC_PERIOD,
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
    /// When the oldest change not yet applied successfully was queued (kube-proxy's
    /// healthz "oldest pending queued"); `None` when everything queued has been applied.
    pub oldest_pending: Option<SystemTime>,
}

/// What one backend call did, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub duration: Duration,
    /// A full rewrite: asked for by the loop, or done by the backend on its own.
    pub full: bool,
    /// The backend's report, or its error message.
    pub result: Result<SyncReport, String>,
    /// Services and EndpointSlices changed since the previous sync (`Engine::pending_changes`).
    pub pending_services: usize,
    pub pending_endpoint_slices: usize,
    /// Service ports in the synced state, both families.
    pub service_ports: usize,
    /// When the oldest change this sync carried was queued (for network programming latency);
    /// `None` for a resync without changes.
    pub queued_since: Option<SystemTime>,
    /// The EndpointSlice trigger times (`endpoints.kubernetes.io/last-change-trigger-time`)
    /// of the changes this sync carried; when any, latency is measured from these instead.
    pub trigger_times: Vec<SystemTime>,
    /// The state this sync tried to apply (for health-check servers and per-service metrics).
    pub desired: Arc<DesiredState>,
    /// What changed from the last state applied successfully (`diff.previous`) to `desired`,
    /// so per-service metrics can follow the changes instead of scanning every service.
    pub diff: Diff,
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
            let now = SystemTime::now();
            self.status.send_modify(|s| {
                s.last_queued = Some(now);
                s.oldest_pending.get_or_insert(now);
            });
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
                .is_none_or(|t| now >= t + self.config.full_sync_period)
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
        let periodic = last_start + self.config.sync_period;
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
        // Woken by the period alone: the backend checks its rules even if nothing changed.
        let periodic = !self.needs_sync();
        let (pending_services, pending_endpoint_slices) = self.engine.pending_changes();
        let trigger_times = self.engine.take_trigger_times();
        let desired = self.engine.desired();
        // The engine's own record of what changed: no comparison of every service.
        let diff = self.engine.diff(self.last_applied.clone(), &desired, full);
        if diff.is_empty() && !periodic {
            // Changes that cancel out: nothing to send, and the state is what was applied.
            self.last_applied = Some(desired);
            self.status
                .send_if_modified(|s| s.oldest_pending.take().is_some());
            return Ok(());
        }
        let queued_since = self.status.borrow().oldest_pending;
        self.last_start = Some(start);
        self.status
            .send_modify(|s| s.last_attempt = Some(SystemTime::now()));

        let Some(mut backend) = self.backend.take() else {
            return Err(SyncLoopError::BackendTask("backend missing".to_string()));
        };
        let task_state = desired.clone();
        let outcome_state = desired.clone();
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
                    conntrack_deleted_v4 = report.conntrack_deleted_v4,
                    conntrack_deleted_v6 = report.conntrack_deleted_v6,
                    conntrack_failures = report.conntrack_failures,
                    service_ports,
                    pending_services,
                    pending_endpoint_slices,
                    "dataplane synced"
                );
                self.last_applied = Some(desired);
                self.consecutive_failures = 0;
                // After the first sync: the engine's second buffer, made now rather than
                // in the first change (once; a no-op later).
                self.engine.prepare_spare();
                // The backend may have synced in full on its own (it found its rules gone).
                if diff.full || report.full {
                    self.last_full = Some(start);
                    release_freed_memory();
                }
                self.status.send_modify(|s| {
                    s.last_success = Some(SystemTime::now());
                    s.last_error = None;
                    s.successful_syncs += 1;
                    s.synced_once = true;
                    // No events are processed while a sync runs, so everything queued is applied.
                    s.oldest_pending = None;
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
            let full = match &outcome_result {
                Ok(report) => report.full,
                Err(_) => diff.full,
            };
            observer.on_sync(&SyncOutcome {
                duration,
                full,
                result: outcome_result,
                pending_services,
                pending_endpoint_slices,
                service_ports,
                queued_since,
                trigger_times,
                desired: outcome_state,
                diff,
            });
        }
        Ok(())
    }
}

/// Hand the heap that a full sync freed back to the kernel. A full sync's transients (the
/// rule values, the netlink batch: ~50 MB at 10k services) and, before the first one, the
/// source's parse are freed, but glibc keeps freed memory in its arenas, where the next
/// full sync is an hour away: without this, RSS stays at the peak (at 10k services ×
/// 10 endpoints, 122 MB anonymous with 65 MB live; 81 MB after the trim). Costs a walk of
/// the free lists, a few ms, once per full sync.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let start = Instant::now();
        // SAFETY: malloc_trim takes no pointers and only returns free pages of glibc's own
        // arenas to the kernel (madvise); no allocation changes.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(
            released = released != 0,
            duration_us = start.elapsed().as_micros() as u64,
            "freed heap returned to the kernel after a full sync"
        );
    }
}

/// min(2^(n-1) × max(min_sync_period, 1 s), 30 s) after the n-th consecutive failure.
pub fn retry_backoff(min_sync_period: Duration, failures: u32) -> Duration {
    let base = min_sync_period.max(MIN_RETRY_BACKOFF);
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(MAX_RETRY_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use svcplane_model::{Change, Object};

    use crate::dataplane::DataplaneError;
    use crate::engine::EngineConfig;
    use crate::testutil::*;

    /// What the fake backend was asked to do.
    #[derive(Debug, Clone)]
    struct Call {
        full: bool,
        had_previous: bool,
        previous_services: usize,
        services: usize,
        added: usize,
        changed: usize,
        ok: bool,
    }

    #[derive(Default)]
    struct Shared {
        calls: Mutex<Vec<Call>>,
        /// Fail this many upcoming syncs.
        fail_next: AtomicUsize,
    }

    struct FakeBackend(Arc<Shared>);

    impl Dataplane for FakeBackend {
        fn mode(&self) -> &'static str {
            "fake"
        }
        fn sync(
            &mut self,
            desired: &Arc<DesiredState>,
            diff: &Diff,
        ) -> Result<SyncReport, DataplaneError> {
            let fail = self
                .0
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            self.0.calls.lock().unwrap().push(Call {
                full: diff.full,
                had_previous: diff.previous.is_some(),
                previous_services: diff.previous.as_ref().map_or(0, |p| p.v4.services.len()),
                services: desired.v4.services.len(),
                added: diff.v4.added.len(),
                changed: diff.v4.changed.len(),
                ok: !fail,
            });
            if fail {
                return Err(DataplaneError::Other("boom".into()));
            }
            Ok(SyncReport {
                full: diff.full,
                size: desired.v4.services.len(),
                ..SyncReport::default()
            })
        }
        fn render(&self, _: &DesiredState) -> Result<String, DataplaneError> {
            Ok(String::new())
        }
        fn cleanup(&mut self) -> Result<(), DataplaneError> {
            Ok(())
        }
    }

    /// Records when each sync finished (paused clock) and its outcome.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(Instant, SyncOutcome)>>);

    impl SyncObserver for Recorder {
        fn on_sync(&self, outcome: &SyncOutcome) {
            self.0
                .lock()
                .unwrap()
                .push((Instant::now(), outcome.clone()));
        }
    }

    struct Harness {
        tx: Option<mpsc::Sender<SourceEvent>>,
        shared: Arc<Shared>,
        recorder: Arc<Recorder>,
        status: watch::Receiver<SyncStatus>,
        task: tokio::task::JoinHandle<Result<(), SyncLoopError>>,
        t0: Instant,
    }

    impl Harness {
        fn start(min: u64, period: u64) -> Harness {
            let (tx, rx) = mpsc::channel(16);
            let shared = Arc::new(Shared::default());
            let recorder = Arc::new(Recorder::default());
            let (status_tx, status) = watch::channel(SyncStatus::default());
            let engine = Engine::new(EngineConfig {
                node_name: NODE.into(),
                ..EngineConfig::default()
            });
            let observer: Arc<dyn SyncObserver> = recorder.clone();
            let task = tokio::spawn(run_sync_loop_with_observer(
                engine,
                rx,
                Box::new(FakeBackend(shared.clone())),
                SyncLoopConfig {
                    min_sync_period: Duration::from_secs(min),
                    sync_period: Duration::from_secs(period),
                    full_sync_period: Duration::from_secs(period * 4),
                },
                status_tx,
                Some(observer),
            ));
            Harness {
                tx: Some(tx),
                shared,
                recorder,
                status,
                task,
                t0: Instant::now(),
            }
        }
        async fn send(&self, ev: SourceEvent) {
            self.tx.as_ref().unwrap().send(ev).await.unwrap();
        }
        async fn add_service(&self, i: u8) {
            let svc = service("ns", &format!("svc-{i}"), &[&format!("10.96.0.{i}")]);
            self.send(SourceEvent::Changes(vec![Change::Apply(Object::from(svc))]))
                .await;
        }
        fn calls(&self) -> Vec<Call> {
            self.shared.calls.lock().unwrap().clone()
        }
        /// Seconds since start at which each sync finished.
        fn sync_times(&self) -> Vec<f64> {
            self.recorder
                .0
                .lock()
                .unwrap()
                .iter()
                .map(|(t, _)| (*t - self.t0).as_secs_f64())
                .collect()
        }
        async fn close(mut self) -> Result<(), SyncLoopError> {
            self.tx.take();
            self.task.await.unwrap()
        }
    }

    async fn sleep_ms(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn no_sync_before_synced() {
        let h = Harness::start(1, 30);
        h.add_service(1).await;
        sleep_ms(120_000).await;
        assert!(h.calls().is_empty());
        assert!(!h.status.borrow().synced_once);
        assert!(h.status.borrow().last_queued.is_some());

        h.send(SourceEvent::Synced).await;
        sleep_ms(10).await;
        let calls = h.calls();
        assert_eq!(calls.len(), 1);
        assert!(calls[0].full && !calls[0].had_previous);
        assert_eq!(calls[0].services, 1);
        let st = h.status.borrow().clone();
        assert!(st.synced_once && st.last_success.is_some() && st.last_error.is_none());
        assert_eq!(st.successful_syncs, 1);
        h.close().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn empty_cluster_still_synced_once() {
        let h = Harness::start(1, 30);
        h.send(SourceEvent::Synced).await;
        sleep_ms(10).await;
        let calls = h.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].services, 0);
        h.close().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_frequency() {
        let h = Harness::start(1, 30);
        h.add_service(1).await;
        h.send(SourceEvent::Synced).await;
        sleep_ms(100).await;
        assert_eq!(h.calls().len(), 1);

        // Changes right after a sync wait for min_sync_period, and are batched.
        h.add_service(2).await;
        sleep_ms(100).await;
        h.add_service(3).await;
        sleep_ms(500).await;
        assert_eq!(h.calls().len(), 1, "synced before min_sync_period");
        sleep_ms(500).await;
        let calls = h.calls();
        assert_eq!(calls.len(), 2);
        assert!(!calls[1].full);
        assert_eq!((calls[1].added, calls[1].services), (2, 3));
        let times = h.sync_times();
        assert!((times[1] - 1.0).abs() < 1e-6, "{times:?}");

        // A change long after the last sync is applied immediately.
        sleep_ms(5_000).await;
        h.add_service(4).await;
        sleep_ms(1).await;
        assert_eq!(h.calls().len(), 3);
        assert!(
            (h.sync_times()[2] - 6.2).abs() < 1e-6,
            "{:?}",
            h.sync_times()
        );
        h.close().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn zero_min_sync_period_syncs_immediately() {
        let h = Harness::start(0, 30);
        h.send(SourceEvent::Synced).await;
        sleep_ms(1).await;
        h.add_service(1).await;
        sleep_ms(1).await;
        h.add_service(2).await;
        sleep_ms(1).await;
        assert_eq!(h.calls().len(), 3);
        h.close().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_checks_and_full_resyncs() {
        // sync_period 30 s; the harness sets full_sync_period to 4 × that, 120 s.
        let h = Harness::start(1, 30);
        h.add_service(1).await;
        h.send(SourceEvent::Synced).await;
        sleep_ms(29_000).await;
        assert_eq!(h.calls().len(), 1);
        assert!(h.calls()[0].full);
        sleep_ms(2_000).await;
        // Every sync_period: the backend is called with an empty partial diff (its check).
        let calls = h.calls();
        assert_eq!(calls.len(), 2);
        assert!(!calls[1].full && calls[1].had_previous);
        assert_eq!(calls[1].changed + calls[1].added, 0);
        sleep_ms(60_000).await;
        assert_eq!(h.calls().len(), 4, "checks at 60 s and 90 s");
        assert!(h.calls()[2..].iter().all(|c| !c.full));
        sleep_ms(30_000).await;
        // At full_sync_period: a full resync.
        let calls = h.calls();
        assert_eq!(calls.len(), 5);
        assert!(calls[4].full, "{calls:?}");
        let times = h.sync_times();
        assert!(
            [0.0, 30.0, 60.0, 90.0, 120.0]
                .iter()
                .zip(&times)
                .all(|(want, got)| (want - got).abs() < 1e-6),
            "{times:?}"
        );

        // A change resets the period: the next check is sync_period after it.
        sleep_ms(10_000).await;
        h.add_service(2).await;
        sleep_ms(1).await;
        let calls = h.calls();
        assert_eq!(calls.len(), 6);
        assert!(!calls[5].full && calls[5].added == 1);
        sleep_ms(29_000).await;
        assert_eq!(h.calls().len(), 6);
        sleep_ms(2_000).await;
        assert_eq!(h.calls().len(), 7);
        h.close().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn failure_retries_full_with_backoff_against_last_success() {
        let h = Harness::start(1, 300);
        h.add_service(1).await;
        h.send(SourceEvent::Synced).await;
        sleep_ms(10).await;
        assert_eq!(h.calls().len(), 1);

        // The next two attempts fail.
        h.shared.fail_next.store(2, Ordering::SeqCst);
        sleep_ms(2_000).await;
        h.add_service(2).await;
        sleep_ms(10).await;
        let calls = h.calls();
        assert_eq!(calls.len(), 2);
        assert!(!calls[1].ok && !calls[1].full);
        {
            let st = h.status.borrow();
            assert_eq!(st.failed_syncs, 1);
            assert_eq!(st.last_error.as_deref(), Some("boom"));
        }

        // Retry 1 s after the failed attempt (backoff 1 s), still failing; then 2 s later.
        sleep_ms(1_000).await;
        let calls = h.calls();
        assert_eq!(calls.len(), 3);
        assert!(calls[2].full && !calls[2].ok);
        sleep_ms(1_500).await;
        assert_eq!(h.calls().len(), 3, "backoff did not double");
        sleep_ms(600).await;
        let calls = h.calls();
        assert_eq!(calls.len(), 4);
        let last = &calls[3];
        assert!(last.ok && last.full);
        // Diffed against the last *successful* state (1 service), not the failed one.
        assert_eq!(last.previous_services, 1);
        assert_eq!((last.added, last.services), (1, 2));
        let st = h.status.borrow().clone();
        assert_eq!((st.successful_syncs, st.failed_syncs), (2, 2));
        assert!(st.last_error.is_none());
        let outcomes: Vec<bool> = h
            .recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, o)| o.ok())
            .collect();
        assert_eq!(outcomes, [true, false, false, true]);

        // After recovery, partial syncs again.
        sleep_ms(2_000).await;
        h.add_service(3).await;
        sleep_ms(10).await;
        let calls = h.calls();
        assert!(calls[4].ok && !calls[4].full);
        h.close().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn oldest_pending_survives_failures_and_clears_on_success() {
        let h = Harness::start(1, 300);
        h.add_service(1).await;
        sleep_ms(10).await;
        assert!(h.status.borrow().oldest_pending.is_some());
        h.send(SourceEvent::Synced).await;
        sleep_ms(10).await;
        assert!(h.status.borrow().oldest_pending.is_none());

        h.shared.fail_next.store(1, Ordering::SeqCst);
        sleep_ms(2_000).await;
        h.add_service(2).await;
        sleep_ms(10).await;
        // The failed attempt leaves the change pending.
        assert_eq!(h.calls().len(), 2);
        let queued = h.status.borrow().oldest_pending;
        assert!(queued.is_some());
        sleep_ms(1_100).await;
        assert_eq!(h.calls().len(), 3);
        assert!(h.status.borrow().oldest_pending.is_none());

        let outcomes: Vec<(bool, usize)> = h
            .recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, o)| (o.ok(), o.desired.v4.services.len()))
            .collect();
        assert_eq!(outcomes, [(true, 1), (false, 2), (true, 2)]);
        // The retry still reports when the change was first queued.
        let since: Vec<_> = h
            .recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, o)| o.queued_since)
            .collect();
        assert!(since[0].is_some());
        assert_eq!(&since[1..], [queued, queued]);
        h.close().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn close_applies_pending_then_returns() {
        let h = Harness::start(1, 30);
        h.add_service(1).await;
        h.send(SourceEvent::Synced).await;
        sleep_ms(10).await;
        // Pending, but min_sync_period has not passed; closing flushes it right away.
        h.add_service(2).await;
        let shared = h.shared.clone();
        let recorder = h.recorder.clone();
        let t0 = h.t0;
        h.close().await.unwrap();
        let calls = shared.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].services, 2);
        let at = recorder.0.lock().unwrap()[1].0 - t0;
        assert!(at < Duration::from_millis(100), "{at:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn close_before_synced_syncs_nothing() {
        let h = Harness::start(1, 30);
        h.add_service(1).await;
        let shared = h.shared.clone();
        h.close().await.unwrap();
        assert!(shared.calls.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn no_op_changes_do_not_sync() {
        let h = Harness::start(1, 30);
        h.add_service(1).await;
        h.send(SourceEvent::Synced).await;
        sleep_ms(10).await;
        h.add_service(1).await;
        sleep_ms(5_000).await;
        assert_eq!(h.calls().len(), 1);
        h.close().await.unwrap();
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = Duration::from_secs;
        assert_eq!(retry_backoff(s(1), 1), s(1));
        assert_eq!(retry_backoff(s(1), 2), s(2));
        assert_eq!(retry_backoff(s(1), 3), s(4));
        assert_eq!(retry_backoff(s(1), 10), s(30));
        assert_eq!(retry_backoff(s(1), u32::MAX), s(30));
        assert_eq!(retry_backoff(Duration::ZERO, 1), s(1));
        assert_eq!(retry_backoff(s(5), 2), s(10));
    }
}
