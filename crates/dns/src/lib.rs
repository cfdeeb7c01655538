//! svcplane's cluster DNS: Kubernetes DNS-Based Service Discovery 1.1.0 answered from the
//! same objects the proxy programs.
//!
//! - [`records`]: the zone snapshot (pure record logic).
//! - [`ZoneStore`]: applies object changes and swaps in a fresh snapshot.

pub mod records;
mod store;

pub use records::{Answer, Lookup, Zone, ZoneConfig, ZoneError};
pub use store::ZoneStore;
