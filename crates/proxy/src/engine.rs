use std::sync::Arc;

use ipnet::IpNet;
use svcplane_model::{Change, IpFamily};

use crate::desired::{DesiredState, FamilyState};

/// Node-level settings of the engine (kube-proxy's flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineConfig {
    /// This node's name: endpoints with this `nodeName` are local.
    pub node_name: String,
    /// `--cluster-cidr` (both families may be given).
    pub cluster_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses`; empty means every local address.
    pub nodeport_addresses: Vec<IpNet>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
}

/// The object cache plus change tracking.
pub struct Engine {
    config: EngineConfig,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Engine { config }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Record a change from a source. Cheap: work happens in [`Engine::desired`].
    pub fn apply(&mut self, change: Change) {
        let _ = change;
    }

    /// The desired state for everything applied so far. Services untouched since the last
    /// call keep their `Arc`s, so [`crate::Diff::between`] is cheap.
    pub fn desired(&mut self) -> Arc<DesiredState> {
        Arc::new(DesiredState {
            node_name: self.config.node_name.clone(),
            node_zone: None,
            v4: FamilyState::empty(IpFamily::V4),
            v6: FamilyState::empty(IpFamily::V6),
            health_checks: Default::default(),
        })
    }
}
