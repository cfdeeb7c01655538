//! Object sources: where svcplane learns about Services and endpoints.
//!
//! A [`Source`] delivers [`svcplane_model::Change`]s to the engine through a channel:
//! the whole initial state, then [`SourceEvent::Synced`], then changes as they happen.
//! The engine cannot tell which source it is fed by.

pub mod allocator;
mod by_name;
pub mod endpointslice_controller;
pub mod kube;
mod manifests;
pub mod ratelimit;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

pub use allocator::{AllocatorConfig, NodePortRange};
pub use kube::{
    ApiClientOptions, ApiSourceStatus, ClusterIpDependency, KubeSource, api_client, api_config,
    client_from_config,
};
pub use manifests::ManifestSource;
use svcplane_model::SourceEvent;

/// Something worth telling the user: a file that does not parse, an invalid object, a
/// value ignored in an object that was kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: Option<PathBuf>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}: {}", file.display(), self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// How a source reports a value it ignored in an object it kept (a model warning).
pub(crate) const IGNORED: &str = "ignored, the rest of the object is used";

impl Problem {
    /// A value ignored in an object that was kept (not a skipped object or file).
    pub fn is_ignored_value(&self) -> bool {
        self.message.ends_with(IGNORED)
    }
}

/// Where problems go: the CLI logs and counts them; tests collect them.
pub type ProblemSink = Arc<dyn Fn(&Problem) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read manifests directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot watch manifests directory {path}: {message}")]
    Watch { path: PathBuf, message: String },
    #[error("Kubernetes API: {0}")]
    ApiClient(String),
}

pub type SourceFuture = Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;

/// A source of objects for the engine.
pub trait Source: Send + 'static {
    /// Deliver the initial state as changes, then `SourceEvent::Synced`, then further
    /// changes until the receiver is dropped (then return `Ok`).
    fn run(
        self: Box<Self>,
        tx: tokio::sync::mpsc::Sender<SourceEvent>,
        problems: ProblemSink,
    ) -> SourceFuture;
}
