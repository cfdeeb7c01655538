//! The svcplane engine: kube-proxy's semantics, independent of any backend.
//!
//! Objects arrive as [`svcplane_model::Change`]s from a source; [`Engine`] keeps the
//! object cache, tracks which services changed, and computes one [`DesiredState`]
//! (per IP family) that backends translate. The engine never touches the kernel.

pub mod dataplane;
pub mod desired;
mod engine;

pub use dataplane::{Dataplane, DataplaneError, SyncReport};
pub use desired::*;
pub use engine::{Engine, EngineConfig};
