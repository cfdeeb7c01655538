//! The svcplane engine: kube-proxy's semantics, independent of any backend.
//!
//! Objects arrive as [`svcplane_model::Change`]s from a source; [`Engine`] keeps the
//! object cache, tracks which services changed, and computes one [`DesiredState`]
//! (per IP family) that backends translate. The engine never touches the kernel.
//! [`sync_loop::run_sync_loop`] drives a [`Dataplane`] from a source's events.

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
