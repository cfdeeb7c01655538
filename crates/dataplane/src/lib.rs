//! Dataplane backends: each translates svcplane's desired state into the kernel.
//!
//! [`backend`] builds the backend of a [`ProxyMode`]. nftables and ebpf exist so far;
//! the other modes render and sync as [`DataplaneError::NotImplemented`].

pub mod conntrack;
pub mod ebpf;
pub mod kube_proxy;
mod netlink;
pub mod nftables;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use ebpf::{EbpfBackend, EbpfOptions};
pub use nftables::NftablesBackend;
use svcplane_proxy::{Dataplane, DataplaneError, DesiredState, Diff, SyncReport};

/// A dataplane mode, named as kube-proxy's `--proxy-mode` names them (plus `ebpf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum ProxyMode {
    #[default]
    Nftables,
    Iptables,
    Ipvs,
    Ebpf,
}

impl ProxyMode {
    pub const ALL: [ProxyMode; 4] = [
        ProxyMode::Nftables,
        ProxyMode::Iptables,
        ProxyMode::Ipvs,
        ProxyMode::Ebpf,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ipvs => "ipvs",
            ProxyMode::Ebpf => "ebpf",
        }
    }
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown proxy mode {0:?} (expected nftables, iptables, ipvs or ebpf)")]
pub struct UnknownProxyMode(pub String);

impl FromStr for ProxyMode {
    type Err = UnknownProxyMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProxyMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownProxyMode(s.to_owned()))
    }
}

/// Mode-specific settings of a backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendOptions {
    /// `--bpf-pin-path`, `--cgroup-path`, `--bpf-*-map-max`.
    pub ebpf: EbpfOptions,
}

/// The backend for `mode`.
pub fn backend(mode: ProxyMode) -> Box<dyn Dataplane> {
    backend_with(mode, &BackendOptions::default())
}

/// The backend for `mode`, with `options`.
pub fn backend_with(mode: ProxyMode, options: &BackendOptions) -> Box<dyn Dataplane> {
    match mode {
        ProxyMode::Nftables => Box::new(NftablesBackend::new()),
        ProxyMode::Ebpf => Box::new(EbpfBackend::new(options.ebpf.clone())),
        other => Box::new(NotImplementedBackend { mode: other }),
    }
}

/// kube-proxy's `CleanupLeftovers` at startup, for the modes built so far: a proxy starting
/// in `mode` removes what svcplane's other modes left on this host, so two sets of Service
/// rules never fight. One line per mode whose state was found, for the log.
pub fn remove_other_modes(mode: ProxyMode, options: &BackendOptions) -> Vec<String> {
    let mut said = Vec::new();
    if mode != ProxyMode::Ebpf {
        let mut ebpf = EbpfBackend::new(options.ebpf.clone());
        if ebpf.is_present() {
            let dir = options.ebpf.pin_path.display();
            said.push(match ebpf.cleanup() {
                Ok(()) => format!(
                    "removed svcplane's eBPF programs and maps pinned under {dir} by ebpf mode"
                ),
                Err(e) => {
                    format!("cannot remove svcplane's eBPF pins under {dir} left by ebpf mode: {e}")
                }
            });
        }
    }
    if mode != ProxyMode::Nftables {
        // Idempotent: a table that is not there is not an error.
        if let Err(e) = NftablesBackend::new().cleanup() {
            said.push(format!(
                "cannot remove svcplane's nftables tables left by nftables mode: {e}"
            ));
        }
    }
    said
}

/// A mode that exists in the CLI but is not built yet: it programs nothing, so its
/// cleanup has nothing to remove.
#[derive(Debug, Clone, Copy)]
struct NotImplementedBackend {
    mode: ProxyMode,
}

impl NotImplementedBackend {
    fn error(&self) -> DataplaneError {
        DataplaneError::NotImplemented {
            mode: self.mode.as_str(),
        }
    }
}

impl Dataplane for NotImplementedBackend {
    fn mode(&self) -> &'static str {
        self.mode.as_str()
    }

    fn sync(
        &mut self,
        _desired: &Arc<DesiredState>,
        _diff: &Diff,
    ) -> Result<SyncReport, DataplaneError> {
        Err(self.error())
    }

    fn render(&self, _desired: &DesiredState) -> Result<String, DataplaneError> {
        Err(self.error())
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcplane_model::IpFamily;
    use svcplane_proxy::FamilyState;

    fn empty_state() -> DesiredState {
        DesiredState {
            node_name: "node-a".into(),
            node_zone: None,
            v4: FamilyState::empty(IpFamily::V4),
            v6: FamilyState::empty(IpFamily::V6),
            health_checks: Default::default(),
        }
    }

    #[test]
    fn modes_round_trip_through_their_names() {
        for mode in ProxyMode::ALL {
            assert_eq!(mode.to_string().parse::<ProxyMode>(), Ok(mode));
        }
        assert_eq!("ipvs".parse::<ProxyMode>(), Ok(ProxyMode::Ipvs));
        assert!("userspace".parse::<ProxyMode>().is_err());
        assert!("NFTABLES".parse::<ProxyMode>().is_err());
        assert!("".parse::<ProxyMode>().is_err());
    }

    #[test]
    fn factory_builds_each_mode() {
        let state = empty_state();
        let nft = backend(ProxyMode::Nftables);
        assert_eq!(nft.mode(), "nftables");
        assert!(nft.render(&state).unwrap().contains("table ip svcplane"));
        let ebpf = backend(ProxyMode::Ebpf);
        assert_eq!(ebpf.mode(), "ebpf");
        assert!(ebpf.render(&state).unwrap().contains("FRONTEND"));
        for mode in [ProxyMode::Iptables, ProxyMode::Ipvs] {
            let mut b = backend(mode);
            assert_eq!(b.mode(), mode.as_str());
            match b.render(&state) {
                Err(DataplaneError::NotImplemented { mode: m }) => assert_eq!(m, mode.as_str()),
                other => panic!("{mode}: expected NotImplemented, got {other:?}"),
            }
            let diff = Diff::between(None, &state, true);
            assert!(matches!(
                b.sync(&Arc::new(state.clone()), &diff),
                Err(DataplaneError::NotImplemented { .. })
            ));
            assert!(b.cleanup().is_ok());
        }
    }
}
