//! The port every backend implements. Defined here, beside the engine, so the
//! engine's sync loop can drive any backend without depending on one.

use std::sync::Arc;

use crate::desired::{DesiredState, Diff};

/// Errors a backend reports. The sync loop logs them, counts them and retries.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The mode exists in the CLI but is not built yet.
    #[error("proxy mode {mode} is not implemented yet")]
    NotImplemented { mode: &'static str },
    /// A kernel tool (nft, iptables-restore, ...) could not be run or rejected the input.
    #[error("{tool}: {message}")]
    Tool { tool: String, message: String },
    #[error("{0}")]
    Other(String),
}

/// What one sync did, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// A full rewrite (as opposed to a partial one carrying only changes).
    pub full: bool,
    /// Size of what was sent to the kernel (script bytes, map operations, ...).
    pub size: usize,
    /// Stale UDP/SCTP conntrack entries deleted after the rules were applied, per family.
    pub conntrack_deleted_v4: u64,
    pub conntrack_deleted_v6: u64,
    /// Conntrack cleanup failures (they never fail the sync: the rules are applied).
    pub conntrack_failures: u64,
    /// iptables mode: the rules svcplane owns in the nat and filter tables after this
    /// sync, both families together (`kubeproxy_sync_proxy_rules_iptables_total{table}`).
    pub iptables_rules: Option<(u64, u64)>,
    /// iptables mode: partial restores refused during this sync (then retried in full).
    pub partial_restore_failures: u64,
}

/// A dataplane backend: translates the desired state into kernel state.
pub trait Dataplane: Send {
    /// The mode name (`nftables`, `iptables`, `ipvs`, `ebpf`).
    fn mode(&self) -> &'static str;
    /// Bring the kernel to `desired`. `diff` is against the last state this backend applied
    /// successfully (`diff.previous`); with `diff.full` rewrite everything. An empty,
    /// partial diff is the periodic check: confirm cheaply that the rules are still in
    /// place, and sync in full when they are not.
    fn sync(
        &mut self,
        desired: &Arc<DesiredState>,
        diff: &Diff,
    ) -> Result<SyncReport, DataplaneError>;
    /// Exactly what a full sync would program, as text, without touching the kernel.
    fn render(&self, desired: &DesiredState) -> Result<String, DataplaneError>;
    /// Remove everything this mode ever programmed.
    fn cleanup(&mut self) -> Result<(), DataplaneError>;
}
