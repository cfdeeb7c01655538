//! Dataplane backends: each translates svcplane's desired state into the kernel.
//!
//! [`backend`] builds the backend of a [`ProxyMode`]: nftables, iptables, ipvs and ebpf.

pub mod conntrack;
pub mod ebpf;
mod hash;
pub mod iptables;
pub mod ipvs;
pub mod kube_proxy;
mod netlink;
pub mod nftables;
pub mod objects;
mod refs;
mod tool;

use std::fmt;
use std::str::FromStr;

pub use ebpf::{EbpfBackend, EbpfOptions};
pub use iptables::IptablesBackend;
pub use ipvs::{IpvsBackend, IpvsOptions};
pub use netlink::NetlinkError;
pub use nftables::NftablesBackend;
use svcplane_proxy::Dataplane;

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

/// One configuration of a mode worth comparing side by side with the others (benchmarks,
/// the lab): a name, and the `svcplane proxy` flags that select it beside `--proxy-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flavour {
    /// `nftables`, `iptables`, `iptables-linear`, …: unique across every mode.
    pub name: &'static str,
    pub mode: ProxyMode,
    /// Besides `--proxy-mode <mode>`.
    pub proxy_args: &'static [&'static str],
    /// The mode attaches programs to a cgroup (`--cgroup-path`) and pins them
    /// (`--bpf-pin-path`): only sockets of processes inside that cgroup are translated, so
    /// a client must run there.
    pub cgroup: bool,
}

impl ProxyMode {
    /// Its flavours: the default first, then the variants kept for comparison (the
    /// iptables linear dispatch is kube-proxy's own layout, the baseline the tree beats).
    pub fn flavours(self) -> &'static [Flavour] {
        const fn plain(name: &'static str, mode: ProxyMode) -> Flavour {
            Flavour {
                name,
                mode,
                proxy_args: &[],
                cgroup: false,
            }
        }
        const NFTABLES: &[Flavour] = &[plain("nftables", ProxyMode::Nftables)];
        const IPTABLES: &[Flavour] = &[
            Flavour {
                proxy_args: &["--iptables-dispatch", "tree"],
                ..plain("iptables", ProxyMode::Iptables)
            },
            Flavour {
                proxy_args: &["--iptables-dispatch", "linear"],
                ..plain("iptables-linear", ProxyMode::Iptables)
            },
        ];
        const IPVS: &[Flavour] = &[plain("ipvs", ProxyMode::Ipvs)];
        const EBPF: &[Flavour] = &[Flavour {
            cgroup: true,
            ..plain("ebpf", ProxyMode::Ebpf)
        }];
        match self {
            ProxyMode::Nftables => NFTABLES,
            ProxyMode::Iptables => IPTABLES,
            ProxyMode::Ipvs => IPVS,
            ProxyMode::Ebpf => EBPF,
        }
    }

    /// Whether this kernel can run the mode: `Err` says why not (e.g. no IPVS).
    pub fn kernel_support(self) -> Result<(), String> {
        match self {
            ProxyMode::Ipvs => ipvs::kernel_has_ipvs(None),
            ProxyMode::Nftables | ProxyMode::Iptables | ProxyMode::Ebpf => Ok(()),
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
    /// `--iptables-dispatch`.
    pub iptables_dispatch: iptables::Dispatch,
    /// `--ipvs-scheduler`, `--ipvs-strict-arp`, `--ipvs-exclude-cidrs`, the timeouts.
    pub ipvs: IpvsOptions,
    /// `--bpf-pin-path`, `--cgroup-path`, `--bpf-*-map-max`.
    pub ebpf: EbpfOptions,
}

/// The backend for `mode`.
pub fn backend(mode: ProxyMode) -> Box<dyn Dataplane> {
    backend_with(mode, BackendOptions::default())
}

/// The backend for `mode`, with `options`.
pub fn backend_with(mode: ProxyMode, options: BackendOptions) -> Box<dyn Dataplane> {
    match mode {
        ProxyMode::Nftables => Box::new(NftablesBackend::new()),
        ProxyMode::Iptables => {
            Box::new(IptablesBackend::new().with_dispatch(options.iptables_dispatch))
        }
        ProxyMode::Ipvs => Box::new(IpvsBackend::new(options.ipvs)),
        ProxyMode::Ebpf => Box::new(EbpfBackend::new(options.ebpf)),
    }
}

/// kube-proxy's `CleanupLeftovers` at startup: a proxy starting in `mode` removes what
/// svcplane's other modes left on this host, so two sets of Service rules never fight.
/// Returns one line per mode whose rules were found, for the log (removed, or why not).
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
        let mut nft = NftablesBackend::new();
        if nft.is_present() {
            said.push(match nft.cleanup() {
                Ok(()) => {
                    "removed svcplane's nftables tables (ip/ip6 svcplane) left by nftables mode"
                        .to_owned()
                }
                Err(e) => {
                    format!("cannot remove svcplane's nftables tables left by nftables mode: {e}")
                }
            });
        }
    }
    if mode != ProxyMode::Iptables {
        let mut ipt = IptablesBackend::new();
        if ipt.has_chains() {
            match ipt.cleanup() {
                Ok(()) => said.push(
                    "removed svcplane's iptables chains (SVCP-*) left by iptables mode".to_owned(),
                ),
                Err(e) => said.push(format!(
                    "cannot remove svcplane's iptables chains left by iptables mode: {e}"
                )),
            }
        }
    }
    if mode != ProxyMode::Ipvs
        && let Some(line) = ipvs::remove_leftovers(&options.ipvs)
    {
        said.push(line);
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcplane_model::IpFamily;
    use svcplane_proxy::DesiredState;
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
    fn flavours_have_unique_names_and_their_own_mode() {
        let mut names = std::collections::BTreeSet::new();
        for mode in ProxyMode::ALL {
            let flavours = mode.flavours();
            assert_eq!(flavours.first().map(|f| f.name), Some(mode.as_str()));
            for f in flavours {
                assert_eq!(f.mode, mode, "{}", f.name);
                assert!(names.insert(f.name), "{} twice", f.name);
            }
        }
        assert!(names.contains("iptables-linear"));
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
        let ipt = backend(ProxyMode::Iptables);
        assert_eq!(ipt.mode(), "iptables");
        assert!(
            ipt.render(&state)
                .unwrap()
                .contains(":SVCP-SERVICES - [0:0]")
        );
        let ipvs = backend(ProxyMode::Ipvs);
        assert_eq!(ipvs.mode(), "ipvs");
        assert!(
            ipvs.render(&state)
                .unwrap()
                .contains("table ip svcplane-ipvs")
        );
    }
}
