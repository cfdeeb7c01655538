//! Every rule, chain and set of the table as a value. The renderer builds these; the
//! text transport spells them with `Display` (exactly what `nft -f` reads), and the
//! netlink transport encodes them with [`Rule::exprs`] — one value, two spellings.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use svcplane_model::{IpFamily, Protocol};

use super::netlink::{Expr, Op, Verdict, exprs, family_code};

/// What a rule does when it matches (the verdicts our rules end in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    Jump(String),
    Goto(String),
    Drop,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Jump(chain) => write!(f, "jump {chain}"),
            Action::Goto(chain) => write!(f, "goto {chain}"),
            Action::Drop => f.write_str("drop"),
        }
    }
}

/// One rule of svcplane's table.
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
    /// `meta l4proto <proto> dnat to ADDR:PORT`.
    Dnat {
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
    },
    /// `[ct state new] ACTION`: a base chain's dispatch, or an unconditional jump/goto.
    Always { ct_new: bool, action: Action },
    /// `meta mark set meta mark or MARK`.
    SetMark { mark: u32 },
    /// `meta mark & MARK == 0 return`.
    ReturnUnlessMarked { mark: u32 },
    /// `meta mark set meta mark xor MARK` (clears it: only marked packets get here).
    ClearMark { mark: u32 },
    /// `masquerade fully-random`.
    Masquerade,
    /// `reject`.
    Reject,
    /// `ct status dnat <ipx> saddr . <ipx> daddr @SET jump CHAIN`: hairpin traffic
    /// (an endpoint that reached itself through a service).
    HairpinJump {
        family: IpFamily,
        set: &'static str,
        chain: &'static str,
    },
    /// `<ipx> daddr . meta l4proto . th dport vmap @MAP`.
    AddrPortVmap { family: IpFamily, map: &'static str },
    /// `[<ipx> daddr @SET] [fib daddr type local] [<not loopback>] meta l4proto . th dport
    /// vmap @MAP`: traffic to a node port, by local address.
    NodePortVmap {
        family: IpFamily,
        daddr_in: Option<&'static str>,
        fib_local: bool,
        not_loopback: bool,
        map: &'static str,
    },
    /// `<ipx> daddr @SET reject comment "…"`.
    RejectDaddrIn {
        family: IpFamily,
        set: &'static str,
        comment: &'static str,
    },
    /// `<ipx> saddr NETS ACTION comment "…"` (one network, or `{ a, b }`).
    FromNets {
        family: IpFamily,
        nets: Vec<IpNet>,
        action: Action,
        comment: &'static str,
    },
    /// `fib saddr type local ACTION comment "…"`.
    FromLocal {
        action: Action,
        comment: &'static str,
    },
    /// `<ipx> saddr != { NETS } drop` (always a set: it reads the same for one or many).
    DropUnlessFrom { family: IpFamily, nets: Vec<IpNet> },
    /// `<ipx> saddr @SET goto CHAIN`: a client stuck to an endpoint (ClientIP affinity).
    AffinityGoto {
        family: IpFamily,
        set: String,
        chain: String,
    },
    /// `update @SET { <ipx> saddr }`: records the client for affinity.
    AffinityUpdate { family: IpFamily, set: String },
    /// `numgen random mod N vmap { 0 : goto C0, 1 : goto C1, … }`.
    NumgenVmap { chains: Vec<String> },
    /// `dnat <ipx> to [<ipx> daddr .] <proto> dport . numgen random mod N map @MAP`:
    /// the endpoint of bucket `numgen` for the packet's own destination, from a map keyed
    /// `[service IP .] service port . bucket` (nft adds the `meta l4proto` dependency of
    /// `<proto> dport` itself, and lists the rule this way).
    DnatMap {
        family: IpFamily,
        protocol: Protocol,
        /// The key starts with the destination address (not for NodePorts).
        with_addr: bool,
        modulus: u32,
        map: &'static str,
    },
}

fn ipx(ip: &IpAddr) -> &'static str {
    if ip.is_ipv6() { "ip6" } else { "ip" }
}

/// The table family and address match keyword (`ip` / `ip6`).
pub(crate) fn family_word(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// A daddr match excluding loopback (kube-proxy does not support localhost NodePorts).
fn not_loopback(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip daddr != 127.0.0.0/8",
        IpFamily::V6 => "ip6 daddr != ::1",
    }
}

fn write_nets(f: &mut fmt::Formatter<'_>, nets: &[IpNet]) -> fmt::Result {
    for (i, net) in nets.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{net}")?;
    }
    Ok(())
}

/// One network, or an anonymous set `{ a, b }` of several.
fn write_net_or_set(f: &mut fmt::Formatter<'_>, nets: &[IpNet]) -> fmt::Result {
    if let [one] = nets {
        return write!(f, "{one}");
    }
    f.write_str("{ ")?;
    write_nets(f, nets)?;
    f.write_str(" }")
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
                if !unless_from.is_empty() {
                    write!(f, "{x} saddr != ")?;
                    write_net_or_set(f, unless_from)?;
                    f.write_str(" ")?;
                }
                write!(f, "jump {mark_chain}")
            }
            Rule::Dnat {
                protocol,
                addr,
                port,
            } => {
                write!(f, "meta l4proto {} dnat to ", protocol.as_lower())?;
                match addr {
                    IpAddr::V4(a) => write!(f, "{a}:{port}"),
                    IpAddr::V6(a) => write!(f, "[{a}]:{port}"),
                }
            }
            Rule::Always { ct_new, action } => {
                if *ct_new {
                    f.write_str("ct state new ")?;
                }
                write!(f, "{action}")
            }
            Rule::SetMark { mark } => write!(f, "meta mark set meta mark or {mark:#010x}"),
            Rule::ReturnUnlessMarked { mark } => write!(f, "meta mark & {mark:#010x} == 0 return"),
            Rule::ClearMark { mark } => write!(f, "meta mark set meta mark xor {mark:#010x}"),
            Rule::Masquerade => f.write_str("masquerade fully-random"),
            Rule::Reject => f.write_str("reject"),
            Rule::HairpinJump { family, set, chain } => {
                let x = family_word(*family);
                write!(
                    f,
                    "ct status dnat {x} saddr . {x} daddr @{set} jump {chain}"
                )
            }
            Rule::AddrPortVmap { family, map } => write!(
                f,
                "{} daddr . meta l4proto . th dport vmap @{map}",
                family_word(*family)
            ),
            Rule::NodePortVmap {
                family,
                daddr_in,
                fib_local,
                not_loopback: no_lo,
                map,
            } => {
                if let Some(set) = daddr_in {
                    write!(f, "{} daddr @{set} ", family_word(*family))?;
                }
                if *fib_local {
                    f.write_str("fib daddr type local ")?;
                }
                if *no_lo {
                    write!(f, "{} ", not_loopback(*family))?;
                }
                write!(f, "meta l4proto . th dport vmap @{map}")
            }
            Rule::RejectDaddrIn {
                family,
                set,
                comment,
            } => write!(
                f,
                "{} daddr @{set} reject comment \"{comment}\"",
                family_word(*family)
            ),
            Rule::FromNets {
                family,
                nets,
                action,
                comment,
            } => {
                write!(f, "{} saddr ", family_word(*family))?;
                write_net_or_set(f, nets)?;
                write!(f, " {action} comment \"{comment}\"")
            }
            Rule::FromLocal { action, comment } => {
                write!(f, "fib saddr type local {action} comment \"{comment}\"")
            }
            Rule::DropUnlessFrom { family, nets } => {
                write!(f, "{} saddr != {{ ", family_word(*family))?;
                write_nets(f, nets)?;
                f.write_str(" } drop")
            }
            Rule::AffinityGoto { family, set, chain } => {
                write!(f, "{} saddr @{set} goto {chain}", family_word(*family))
            }
            Rule::AffinityUpdate { family, set } => {
                write!(f, "update @{set} {{ {} saddr }}", family_word(*family))
            }
            Rule::NumgenVmap { chains } => {
                write!(f, "numgen random mod {} vmap {{ ", chains.len())?;
                for (n, chain) in chains.iter().enumerate() {
                    if n > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{n} : goto {chain}")?;
                }
                f.write_str(" }")
            }
            Rule::DnatMap {
                family,
                protocol,
                with_addr,
                modulus,
                map,
            } => {
                let (x, p) = (family_word(*family), protocol.as_lower());
                write!(f, "dnat {x} to ")?;
                if *with_addr {
                    write!(f, "{x} daddr . ")?;
                }
                write!(f, "{p} dport . numgen random mod {modulus} map @{map}")
            }
        }
    }
}

impl Action {
    fn verdict(&self) -> Verdict {
        match self {
            Action::Jump(c) => Verdict::Jump(c.clone()),
            Action::Goto(c) => Verdict::Goto(c.clone()),
            Action::Drop => Verdict::Drop,
        }
    }
}

impl Rule {
    /// The netlink expressions nft would send for this rule in a `family` table;
    /// `None` when the rule needs something the netlink path does not encode (a /0
    /// network match; then the text path is used). Its comment: [`Rule::comment`].
    pub(crate) fn exprs(&self, family: IpFamily) -> Option<Vec<Expr>> {
        let v6 = family == IpFamily::V6;
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
                if !unless_from.is_empty() {
                    out.extend(exprs::nets_match(
                        true,
                        cluster_ip.is_ipv6(),
                        unless_from,
                        true,
                    )?);
                }
                out.push(exprs::verdict(Verdict::Jump((*mark_chain).to_owned())));
            }
            Rule::Dnat {
                protocol,
                addr,
                port,
            } => {
                out.extend(exprs::l4proto(*protocol));
                out.extend(exprs::dnat_to(addr, *port));
            }
            Rule::Always { ct_new, action } => {
                if *ct_new {
                    out.extend(exprs::ct_state_new());
                }
                out.push(exprs::verdict(action.verdict()));
            }
            Rule::SetMark { mark } => out.extend(exprs::mark_set(*mark, false)),
            Rule::ReturnUnlessMarked { mark } => {
                out.extend(exprs::mark_clear(*mark));
                out.push(exprs::verdict(Verdict::Return));
            }
            Rule::ClearMark { mark } => out.extend(exprs::mark_set(*mark, true)),
            Rule::Masquerade => out.push(Expr::Masquerade { fully_random: true }),
            Rule::Reject => out.push(exprs::reject(v6)),
            Rule::HairpinJump { family, set, chain } => {
                out.extend(exprs::ct_status_dnat());
                out.extend(exprs::saddr_daddr_in_set(*family == IpFamily::V6, set));
                out.push(exprs::verdict(Verdict::Jump((*chain).to_owned())));
            }
            Rule::AddrPortVmap { family, map } => {
                out.extend(exprs::service_vmap(*family == IpFamily::V6, true, map));
            }
            Rule::NodePortVmap {
                family,
                daddr_in,
                fib_local,
                not_loopback: no_lo,
                map,
            } => {
                let v6 = *family == IpFamily::V6;
                if let Some(set) = daddr_in {
                    out.extend(exprs::addr_in_set(false, v6, set, false));
                }
                if *fib_local {
                    out.extend(exprs::fib_local(false));
                }
                if *no_lo {
                    out.extend(exprs::net_match(false, &loopback(*family)?, true)?);
                }
                out.extend(exprs::service_vmap(v6, false, map));
            }
            Rule::RejectDaddrIn { family, set, .. } => {
                out.extend(exprs::addr_in_set(
                    false,
                    *family == IpFamily::V6,
                    set,
                    false,
                ));
                out.push(exprs::reject(v6));
            }
            Rule::FromNets {
                family,
                nets,
                action,
                ..
            } => {
                out.extend(exprs::nets_match(
                    true,
                    *family == IpFamily::V6,
                    nets,
                    false,
                )?);
                out.push(exprs::verdict(action.verdict()));
            }
            Rule::FromLocal { action, .. } => {
                out.extend(exprs::fib_local(true));
                out.push(exprs::verdict(action.verdict()));
            }
            Rule::DropUnlessFrom { family, nets } => {
                // nft turns a one-element `!= { NET }` into the plain prefix match too.
                out.extend(exprs::nets_match(
                    true,
                    *family == IpFamily::V6,
                    nets,
                    true,
                )?);
                out.push(exprs::verdict(Verdict::Drop));
            }
            Rule::AffinityGoto { family, set, chain } => {
                out.extend(exprs::addr_in_set(
                    true,
                    *family == IpFamily::V6,
                    set,
                    false,
                ));
                out.push(exprs::verdict(Verdict::Goto(chain.clone())));
            }
            Rule::AffinityUpdate { family, set } => {
                out.extend(exprs::update_saddr(*family == IpFamily::V6, set));
            }
            Rule::NumgenVmap { chains } => out.extend(exprs::numgen_vmap(
                chains.iter().map(|c| Verdict::Goto(c.clone())).collect(),
            )),
            // `tcp dport` brings nft's `meta l4proto tcp` dependency first.
            Rule::DnatMap {
                family,
                protocol,
                with_addr,
                modulus,
                map,
            } => out.extend(exprs::dnat_map(
                *family == IpFamily::V6,
                *with_addr,
                Some(*protocol),
                *modulus,
                map,
            )),
        }
        Some(out)
    }

    /// The netlink operation appending this rule to `chain` (see [`Rule::exprs`]).
    pub(crate) fn op(&self, family: IpFamily, chain: &str) -> Option<Op> {
        let exprs = self.exprs(family)?;
        let (family, chain) = (family_code(family == IpFamily::V6), chain.to_owned());
        Some(match self.comment() {
            Some(c) => Op::AddCommentedRule {
                family,
                chain,
                exprs,
                comment: c.to_owned(),
            },
            None => Op::AddRule {
                family,
                chain,
                exprs,
            },
        })
    }

    /// The rule's comment (sent as its userdata).
    pub(crate) fn comment(&self) -> Option<&'static str> {
        match self {
            Rule::RejectDaddrIn { comment, .. }
            | Rule::FromNets { comment, .. }
            | Rule::FromLocal { comment, .. } => Some(comment),
            _ => None,
        }
    }
}

/// The loopback network `not_loopback` excludes.
fn loopback(family: IpFamily) -> Option<IpNet> {
    match family {
        IpFamily::V4 => IpNet::new(std::net::Ipv4Addr::new(127, 0, 0, 0).into(), 8).ok(),
        IpFamily::V6 => Some(IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST))),
    }
}

/// A base chain's hook. Priorities are numeric because nft before 1.0.7 rejects
/// `dstnat - 10` on filter hooks; dstnat is -100, srcnat 100 and filter 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hook {
    /// `filter` or `nat`.
    pub kind: &'static str,
    pub hook: &'static str,
    pub priority: i32,
}

/// A chain and its rules (a base chain when `hook` is set, with policy accept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chain {
    pub name: String,
    pub hook: Option<Hook>,
    pub rules: Vec<Rule>,
}

impl Chain {
    pub fn new(name: impl Into<String>, rules: Vec<Rule>) -> Chain {
        Chain {
            name: name.into(),
            hook: None,
            rules,
        }
    }
}

/// `chain NAME { … }` as it stands inside a `table … { }` block (tab-indented).
impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\tchain {} {{", self.name)?;
        if let Some(h) = &self.hook {
            writeln!(
                f,
                "\t\ttype {} hook {} priority {} ; policy accept ;",
                h.kind, h.hook, h.priority
            )?;
        }
        for rule in &self.rules {
            writeln!(f, "\t\t{rule}")?;
        }
        writeln!(f, "\t}}")
    }
}

/// What a set or map holds (its key, and a map's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetKind {
    /// `type ipv4_addr`.
    Addrs(IpFamily),
    /// `type ipv4_addr . ipv4_addr`.
    AddrPairs(IpFamily),
    /// `type ipv4_addr . inet_proto . inet_service : verdict` (a map).
    AddrProtoPortVerdicts(IpFamily),
    /// `type inet_proto . inet_service : verdict` (a map).
    ProtoPortVerdicts,
    /// `typeof [ip daddr .] tcp dport . numgen random mod 1 : ip daddr . tcp dport` (a
    /// map): [service address .] port . bucket → endpoint address . port, for
    /// [`Rule::DnatMap`]. (`type ipv4_addr . inet_service . integer` is refused by nft
    /// 1.0.6: "variable sized data types (integer) in concat expressions".)
    Endpoints {
        family: IpFamily,
        protocol: Protocol,
        with_addr: bool,
    },
}

impl SetKind {
    pub fn is_map(self) -> bool {
        matches!(
            self,
            SetKind::AddrProtoPortVerdicts(_)
                | SetKind::ProtoPortVerdicts
                | SetKind::Endpoints { .. }
        )
    }
}

fn addr_type(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    }
}

impl fmt::Display for SetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SetKind::Addrs(fam) => write!(f, "type {}", addr_type(fam)),
            SetKind::AddrPairs(fam) => {
                let at = addr_type(fam);
                write!(f, "type {at} . {at}")
            }
            SetKind::AddrProtoPortVerdicts(fam) => write!(
                f,
                "type {} . inet_proto . inet_service : verdict",
                addr_type(fam)
            ),
            SetKind::ProtoPortVerdicts => f.write_str("type inet_proto . inet_service : verdict"),
            SetKind::Endpoints {
                family,
                protocol,
                with_addr,
            } => {
                let (x, p) = (family_word(family), protocol.as_lower());
                f.write_str("typeof ")?;
                if with_addr {
                    write!(f, "{x} daddr . ")?;
                }
                write!(f, "{p} dport . numgen random mod 1 : {x} daddr . {p} dport")
            }
        }
    }
}

/// A named set or map declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetDecl {
    pub name: String,
    pub kind: SetKind,
    pub flags: Option<&'static str>,
    pub timeout_seconds: Option<u32>,
    pub comment: Option<&'static str>,
}

impl SetDecl {
    pub fn word(&self) -> &'static str {
        if self.kind.is_map() { "map" } else { "set" }
    }

    /// `{ type T ; [flags F ;] [timeout Ns ;] [comment "C" ;] }`.
    pub fn body(&self) -> SetBody<'_> {
        SetBody(self)
    }
}

/// See [`SetDecl::body`].
pub(crate) struct SetBody<'a>(&'a SetDecl);

impl fmt::Display for SetBody<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        write!(f, "{{ {} ;", s.kind)?;
        if let Some(flags) = s.flags {
            write!(f, " flags {flags} ;")?;
        }
        if let Some(t) = s.timeout_seconds {
            write!(f, " timeout {t}s ;")?;
        }
        if let Some(c) = s.comment {
            write!(f, " comment \"{c}\" ;")?;
        }
        f.write_str(" }")
    }
}

/// `set NAME { … }` inside a table block (tab-indented).
impl fmt::Display for SetDecl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\t{} {} {}", self.word(), self.name, self.body())
    }
}
