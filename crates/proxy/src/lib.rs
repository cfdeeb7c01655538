//! The svcplane engine: kube-proxy's semantics, independent of any backend.
//!
//! Objects arrive as [`svcplane_model::Change`]s from a source; [`Engine`] keeps the
//! object cache, tracks which services changed, and computes one [`DesiredState`]
//! (per IP family) that backends translate. The engine never touches the kernel.
//! [`sync_loop::run_sync_loop`] drives a [`Dataplane`] from a source's events.
//!
//! Semantic notes (kube-proxy `pkg/proxy` is the reference):
//! - Skipped Services: headless, ExternalName, label `service-proxy-name` set, label
//!   `service.kubernetes.io/headless` (kube-proxy's informer selector).
//! - Duplicate endpoints across slices: non-terminating beats terminating (upstream); beyond
//!   upstream, ready beats not-ready, then the first in slice-name order (upstream: undefined).
//! - `--nodeport-addresses` with no CIDR of a family means every local address of that family
//!   (`NewNodePortAddresses` adds the zero CIDR); a zero CIDR also means every local address.
//! - LoadBalancer source ranges are filtered by family; a family with none is unrestricted.
//! - Health checks: type LoadBalancer with eTP Local only (`NeedsHealthCheck`); the count is
//!   distinct local ready IPs across all ports (`LocalReadyEndpoints`), computed per family;
//!   kube-proxy runs one health server per family, the single map here carries the larger.
//! - eTP Local applies only where the port is externally accessible in that family (nodePort,
//!   LB IPs or externalIPs of the family), as `ServicePort.ExternallyAccessible`.

mod compute;
pub mod dataplane;
pub mod desired;
mod engine;
pub mod sync_loop;

#[cfg(test)]
mod testutil;

pub use dataplane::{Dataplane, DataplaneError, SyncReport};
pub use desired::*;
pub use engine::{Engine, EngineConfig};
pub use sync_loop::{
    SyncLoopConfig, SyncLoopError, SyncObserver, SyncOutcome, SyncStatus, run_sync_loop,
    run_sync_loop_with_observer,
};
