//! Masquerade: the mark chain, the `masquerading` chain (with hairpin), and which
//! ClusterIP traffic a service chain marks.

use std::net::IpAddr;

use ipnet::IpNet;
use svcplane_model::{IpFamily, Protocol};
use svcplane_proxy::{ClusterIpMasquerade, FamilyState};

use super::super::rule::{Chain, Rule};
use super::{HAIRPIN, MARK_MASQ, MASQUERADING, family_nets};

/// kube-proxy's default masquerade mark (`--iptables-masquerade-bit` 14).
pub const MASQUERADE_MARK: u32 = 0x4000;

/// Which ClusterIP traffic is masqueraded (`--masquerade-all`, `--cluster-cidr`).
pub(super) enum Masquerade {
    All,
    FromOutside(Vec<IpNet>),
    None,
}

impl Masquerade {
    pub fn of(fam: &FamilyState) -> Masquerade {
        match &fam.cluster_ip_masquerade {
            ClusterIpMasquerade::All => Masquerade::All,
            ClusterIpMasquerade::FromOutside(cidrs) => {
                let nets = family_nets(fam.family, cidrs);
                if nets.is_empty() {
                    Masquerade::None
                } else {
                    Masquerade::FromOutside(nets)
                }
            }
            ClusterIpMasquerade::None => Masquerade::None,
        }
    }

    /// The rule marking traffic to `cluster_ip:port` for masquerade, if any.
    pub fn cluster_ip_rule(
        &self,
        cluster_ip: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Option<Rule> {
        let unless_from = match self {
            Masquerade::All => Vec::new(),
            Masquerade::FromOutside(nets) => nets.clone(),
            Masquerade::None => return None,
        };
        Some(Rule::MarkClusterIp {
            cluster_ip,
            protocol,
            port,
            unless_from,
            mark_chain: MARK_MASQ,
        })
    }
}

/// `mark-for-masquerade`: sets the mark `masquerading` acts on.
pub(super) fn mark_chain() -> Chain {
    Chain::new(
        MARK_MASQ,
        vec![Rule::SetMark {
            mark: MASQUERADE_MARK,
        }],
    )
}

/// `masquerading` (postrouting): masquerades marked packets, and hairpin traffic — an
/// endpoint that reached itself through a service, whose reply would bypass the node's
/// conntrack (un-DNATed) unless the source is the node.
pub(super) fn masquerading_chain(family: IpFamily) -> Chain {
    Chain::new(
        MASQUERADING,
        vec![
            Rule::HairpinJump {
                family,
                set: HAIRPIN,
                chain: MARK_MASQ,
            },
            Rule::ReturnUnlessMarked {
                mark: MASQUERADE_MARK,
            },
            Rule::ClearMark {
                mark: MASQUERADE_MARK,
            },
            Rule::Masquerade,
        ],
    )
}
