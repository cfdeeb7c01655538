//! The rules of balancing chains as values: written as nft text by the renderer and
//! encoded as netlink expressions for partial syncs, from the same value.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use svcplane_model::Protocol;

use super::netlink::{Expr, Verdict, exprs};

/// A rule of a balancing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rule {
    /// `<ipx> daddr CIP <proto> dport PORT [<ipx> saddr != NETS] jump <mark chain>`:
    /// ClusterIP traffic marked for masquerade (from outside `unless_from`, if any).
    MarkClusterIp {
        cluster_ip: IpAddr,
        protocol: Protocol,
        port: u16,
        unless_from: Vec<IpNet>,
        mark_chain: &'static str,
    },
    /// `[numgen random mod K == 0] meta l4proto <proto> dnat to ADDR:PORT`.
    Dnat {
        one_in: Option<u32>,
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
    },
}

fn ipx(ip: &IpAddr) -> &'static str {
    if ip.is_ipv6() { "ip6" } else { "ip" }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::MarkClusterIp {
                cluster_ip,
                protocol,
                port,
                unless_from,
                mark_chain,
            } => {
                let x = ipx(cluster_ip);
                write!(
                    f,
                    "{x} daddr {cluster_ip} {} dport {port} ",
                    protocol.as_lower()
                )?;
                match unless_from.as_slice() {
                    [] => {}
                    [one] => write!(f, "{x} saddr != {one} ")?,
                    many => {
                        write!(f, "{x} saddr != {{ ")?;
                        for (i, net) in many.iter().enumerate() {
                            if i > 0 {
                                f.write_str(", ")?;
                            }
                            write!(f, "{net}")?;
                        }
                        f.write_str(" } ")?;
                    }
                }
                write!(f, "jump {mark_chain}")
            }
            Rule::Dnat {
                one_in,
                protocol,
                addr,
                port,
            } => {
                if let Some(k) = one_in {
                    write!(f, "numgen random mod {k} == 0 ")?;
                }
                write!(f, "meta l4proto {} dnat to ", protocol.as_lower())?;
                match addr {
                    IpAddr::V4(a) => write!(f, "{a}:{port}"),
                    IpAddr::V6(a) => write!(f, "[{a}]:{port}"),
                }
            }
        }
    }
}

impl Rule {
    /// The netlink expressions nft would send for this rule; `None` when the rule needs
    /// something the netlink path does not encode (an anonymous set of networks).
    pub(crate) fn exprs(&self) -> Option<Vec<Expr>> {
        let mut out = Vec::with_capacity(10);
        match self {
            Rule::MarkClusterIp {
                cluster_ip,
                protocol,
                port,
                unless_from,
                mark_chain,
            } => {
                out.extend(exprs::addr_eq(false, cluster_ip));
                out.extend(exprs::dport(*protocol, *port));
                match unless_from.as_slice() {
                    [] => {}
                    [one] => out.extend(exprs::saddr_not_in(one)?),
                    _ => return None,
                }
                out.push(Expr::ImmediateVerdict(Verdict::Jump(
                    (*mark_chain).to_owned(),
                )));
            }
            Rule::Dnat {
                one_in,
                protocol,
                addr,
                port,
            } => {
                if let Some(k) = one_in {
                    out.extend(exprs::one_in(*k));
                }
                out.extend(exprs::l4proto(*protocol));
                out.extend(exprs::dnat_to(addr, *port));
            }
        }
        Some(out)
    }
}
