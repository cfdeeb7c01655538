//! svcplane's cluster DNS: Kubernetes DNS-Based Service Discovery 1.1.0 answered from the
//! same objects the proxy programs.
//!
//! - [`records`]: the zone snapshot (pure record logic).
//! - [`ZoneStore`]: applies object changes and swaps in a fresh snapshot.
//! - [`server`]: the hickory-server request handler, UDP/TCP listeners, forwarding.
//! - [`metrics`]: `svcplane_dns_*` Prometheus metrics.

pub mod metrics;
pub mod records;
pub mod server;
mod store;

pub use metrics::DnsMetrics;
pub use records::{Answer, Lookup, Zone, ZoneConfig, ZoneError};
pub use server::{DnsError, DnsHandler, DnsServer, Forwarding};
pub use store::{ZoneStore, follow};
