//! svcplane health and metrics, as kube-proxy serves them:
//! - [`Metrics`]: kube-proxy's Prometheus metrics (`pkg/proxy/metrics`), fed by
//!   [`SyncRecorder`] (a sync-loop observer) and the source's problem hook;
//! - [`http`]: `/metrics`, `/healthz` and `/livez` ([`health`] has the healthz semantics);
//! - [`HealthCheckServers`]: one healthCheckNodePort server per eTP Local service,
//!   following the applied desired state.

pub mod health;
pub mod http;
mod registry;
mod service_health;

pub use health::{Health, ProxyHealth};
pub use http::BindError;
pub use registry::*;
pub use service_health::HealthCheckServers;
