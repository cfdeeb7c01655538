//! Dispatch lists: kube-proxy's KUBE-SERVICES is one rule per service IP:port, so a
//! new connection to the last one walks them all (O(N) per first packet). Here a list
//! of exact-match rules is rendered either that way ([`Dispatch::Linear`]) or as a tree
//! keyed by destination-address prefixes (or port ranges, for NodePorts): each level
//! splits its keys on the next [`FANOUT_BITS`] bits after their common prefix, so a
//! packet meets at most 2^FANOUT_BITS rules a level and O(log N) levels.
//!
//! A tree chain is named by its list and prefix (`SVCP-DA-<hash of list|prefix>`), so a
//! service that comes or goes rewrites only the chains on its path, and only when
//! their rules changed.

use std::net::{Ipv4Addr, Ipv6Addr};

use svcplane_model::Protocol;

use super::names;

/// How dispatch lists are rendered (`--iptables-dispatch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dispatch {
    /// A tree of prefix chains: O(log N) rules per new connection.
    #[default]
    Tree,
    /// kube-proxy's flat list: O(N).
    Linear,
}

impl Dispatch {
    pub fn as_str(self) -> &'static str {
        match self {
            Dispatch::Tree => "tree",
            Dispatch::Linear => "linear",
        }
    }
}

impl std::str::FromStr for Dispatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tree" => Ok(Dispatch::Tree),
            "linear" => Ok(Dispatch::Linear),
            other => Err(format!(
                "unknown iptables dispatch {other:?} (expected tree or linear)"
            )),
        }
    }
}

/// Bits each tree level splits on: at most 16 rules a level.
pub const FANOUT_BITS: u32 = 4;
/// A group of at most this many rules is written out (a leaf).
pub const LEAF_MAX: usize = 8;

/// What the keys of a list are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Destination addresses (`u32` or `u128` as `u128`).
    V4,
    V6,
    /// Source addresses.
    SrcV4,
    SrcV6,
    /// `protocol << 16 | port` (see [`port_key`]).
    Port,
}

impl KeyKind {
    /// Bits split per level and the largest leaf. The hairpin list (source addresses)
    /// holds an entry per local endpoint and is walked only by DNATed new connections
    /// in POSTROUTING: wide and shallow, so that it needs few chains.
    fn shape(self) -> (u32, usize) {
        match self {
            KeyKind::SrcV4 | KeyKind::SrcV6 => (8, 64),
            _ => (FANOUT_BITS, LEAF_MAX),
        }
    }

    fn width(self) -> u32 {
        match self {
            KeyKind::V4 | KeyKind::SrcV4 => 32,
            KeyKind::V6 | KeyKind::SrcV6 => 128,
            KeyKind::Port => 18,
        }
    }

    /// The match for keys whose top `len` bits are `bits`.
    fn prefix_match(self, bits: u128, len: u32) -> String {
        let width = self.width();
        let base = if len == 0 { 0 } else { bits << (width - len) };
        match self {
            KeyKind::V4 => format!("-d {}/{len}", Ipv4Addr::from(base as u32)),
            KeyKind::V6 => format!("-d {}/{len}", Ipv6Addr::from(base)),
            KeyKind::SrcV4 => format!("-s {}/{len}", Ipv4Addr::from(base as u32)),
            KeyKind::SrcV6 => format!("-s {}/{len}", Ipv6Addr::from(base)),
            KeyKind::Port => {
                let proto = match base >> 16 {
                    0 => "tcp",
                    1 => "udp",
                    _ => "sctp",
                };
                let lo = (base & 0xffff) as u16;
                let span = 1u128 << (width - len);
                let hi = ((base & 0xffff) + span - 1).min(0xffff) as u16;
                if lo == hi {
                    format!("-p {proto} -m {proto} --dport {lo}")
                } else {
                    format!("-p {proto} -m {proto} --dport {lo}:{hi}")
                }
            }
        }
    }
}

/// A NodePort list's key.
pub fn port_key(protocol: Protocol, port: u16) -> u128 {
    let p: u128 = match protocol {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
        Protocol::Sctp => 2,
    };
    (p << 16) | u128::from(port)
}

/// An address's key.
pub fn addr_key(ip: std::net::IpAddr) -> u128 {
    match ip {
        std::net::IpAddr::V4(v4) => u128::from(u32::from(v4)),
        std::net::IpAddr::V6(v6) => u128::from(v6),
    }
}

/// One exact-match rule: its key and its body (what follows `-A CHAIN `).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: u128,
    pub rule: String,
}

/// A rendered list: the rule bodies for the list's own chain, and the tree chains
/// (name, rule bodies) below it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub top: Vec<String>,
    pub chains: Vec<(String, Vec<String>)>,
}

/// Render `entries` (any order; equal keys keep their order) as `mode` says. `list`
/// names the list, so that two lists in one table never share chain names.
pub fn render(mode: Dispatch, kind: KeyKind, list: &str, mut entries: Vec<Entry>) -> Rendered {
    entries.sort_by_key(|e| e.key);
    let mut out = Rendered::default();
    match mode {
        Dispatch::Linear => out.top = entries.into_iter().map(|e| e.rule).collect(),
        Dispatch::Tree => {
            let prefix = match kind {
                KeyKind::Port => names::DISPATCH_PORT,
                _ => names::DISPATCH_ADDR,
            };
            let ctx = TreeCtx { kind, list, prefix };
            let mut top = Vec::new();
            ctx.node(&entries, &mut top, &mut out.chains);
            out.top = top;
        }
    }
    out
}

struct TreeCtx<'a> {
    kind: KeyKind,
    list: &'a str,
    prefix: &'static str,
}

impl TreeCtx<'_> {
    fn node(
        &self,
        entries: &[Entry],
        rules: &mut Vec<String>,
        chains: &mut Vec<(String, Vec<String>)>,
    ) {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return;
        };
        let width = self.kind.width();
        let (fanout, leaf) = self.kind.shape();
        if entries.len() <= leaf || first.key == last.key {
            rules.extend(entries.iter().map(|e| e.rule.clone()));
            return;
        }
        // Sorted: the first and last keys share the prefix all of them share.
        let common = ((first.key ^ last.key) << (128 - width)).leading_zeros();
        let split = (common + fanout).min(width);
        let bits = |key: u128| key >> (width - split);
        let mut start = 0;
        while start < entries.len() {
            let group_bits = bits(entries[start].key);
            let end = start
                + entries[start..]
                    .iter()
                    .take_while(|e| bits(e.key) == group_bits)
                    .count();
            let group = &entries[start..end];
            if let [one] = group {
                // A chain for one rule would only add a jump.
                rules.push(one.rule.clone());
            } else {
                let matcher = self.kind.prefix_match(group_bits, split);
                let name = names::dispatch_chain(self.prefix, &format!("{}|{matcher}", self.list));
                let mut child = Vec::new();
                self.node(group, &mut child, chains);
                chains.push((name.clone(), child));
                rules.push(format!("{matcher} -j {name}"));
            }
            start = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::IpAddr;

    fn entries(n: u32) -> Vec<Entry> {
        (0..n)
            .map(|i| {
                let ip = IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i * 7));
                Entry {
                    key: addr_key(ip),
                    rule: format!("-d {ip}/32 -p tcp -m tcp --dport 80 -j X{i}"),
                }
            })
            .collect()
    }

    /// Walks the rendered tree as the kernel would for destination `key`: how many rules
    /// it evaluates, and which leaf rule it reaches.
    fn walk(r: &Rendered, kind: KeyKind, key: u128) -> (usize, Option<String>) {
        let chains: HashMap<&str, &Vec<String>> =
            r.chains.iter().map(|(n, rs)| (n.as_str(), rs)).collect();
        let mut seen = 0;
        let mut rules = &r.top;
        'chain: loop {
            for rule in rules.iter() {
                seen += 1;
                let (m, target) = rule.split_once(" -j ").expect("jump");
                if let Some(child) = chains.get(target) {
                    if matches_prefix(kind, m, key) {
                        rules = child;
                        continue 'chain;
                    }
                } else if rule.starts_with(&format!("-d {}/", Ipv4Addr::from(key as u32))) {
                    return (seen, Some(target.to_owned()));
                }
            }
            return (seen, None);
        }
    }

    fn matches_prefix(kind: KeyKind, m: &str, key: u128) -> bool {
        let (addr, len) = m.trim_start_matches("-d ").split_once('/').unwrap();
        let len: u32 = len.parse().unwrap();
        let base = addr_key(addr.parse().unwrap());
        let width = kind.width();
        (key >> (width - len)) == (base >> (width - len))
    }

    #[test]
    fn linear_is_one_rule_per_entry_in_key_order() {
        let mut es = entries(20);
        es.reverse();
        let r = render(Dispatch::Linear, KeyKind::V4, "x", es);
        assert!(r.chains.is_empty());
        assert_eq!(r.top.len(), 20);
        assert!(r.top[0].ends_with("-j X0") && r.top[19].ends_with("-j X19"));
    }

    #[test]
    fn tree_reaches_every_entry_in_logarithmic_rules() {
        for n in [1u32, 8, 9, 100, 1000, 10_000, 30_000] {
            let es = entries(n);
            let r = render(Dispatch::Tree, KeyKind::V4, "x", es.clone());
            // Every rule of the list is somewhere, exactly once.
            let leaves: usize = r
                .top
                .iter()
                .chain(r.chains.iter().flat_map(|c| &c.1))
                .filter(|r| r.starts_with("-d ") && r.contains("--dport"))
                .count();
            assert_eq!(leaves, n as usize);
            let levels = (f64::from(n).log(16.0).ceil() as usize).max(1) + 1;
            let bound = levels * (1 << FANOUT_BITS) + LEAF_MAX;
            let mut worst = 0;
            for (i, e) in es.iter().enumerate().step_by((n as usize / 97).max(1)) {
                let (seen, hit) = walk(&r, KeyKind::V4, e.key);
                assert_eq!(hit, Some(format!("X{i}")), "n={n} entry {i}");
                worst = worst.max(seen);
            }
            assert!(worst <= bound, "n={n}: {worst} rules walked > {bound}");
            // A key that is not there falls through.
            assert_eq!(
                walk(&r, KeyKind::V4, addr_key("192.0.2.1".parse().unwrap())).1,
                None
            );
        }
    }

    #[test]
    fn tree_chain_count_stays_linear_and_names_are_stable() {
        let r = render(Dispatch::Tree, KeyKind::V4, "x", entries(10_000));
        assert!(r.chains.len() < 10_000 / 2, "{} chains", r.chains.len());
        let again = render(Dispatch::Tree, KeyKind::V4, "x", entries(10_000));
        assert_eq!(r, again);
        // Another list's chains never collide with this one's.
        let other = render(Dispatch::Tree, KeyKind::V4, "y", entries(10_000));
        assert!(
            other
                .chains
                .iter()
                .all(|(n, _)| r.chains.iter().all(|(m, _)| m != n))
        );
        // One entry more changes a few chains, not the tree.
        let mut more = entries(10_000);
        more.push(Entry {
            key: addr_key("10.96.0.2".parse().unwrap()),
            rule: "-d 10.96.0.2/32 -j NEW".into(),
        });
        let changed = render(Dispatch::Tree, KeyKind::V4, "x", more);
        let old: HashMap<_, _> = r.chains.iter().cloned().collect();
        let differ = changed
            .chains
            .iter()
            .filter(|(n, rs)| old.get(n) != Some(rs))
            .count();
        assert!(differ <= 4, "{differ} chains changed");
    }

    #[test]
    fn port_prefixes_are_protocol_and_range() {
        assert_eq!(
            KeyKind::Port.prefix_match(port_key(Protocol::Udp, 30000) >> 8, 10),
            "-p udp -m udp --dport 29952:30207"
        );
        assert_eq!(
            KeyKind::Port.prefix_match(port_key(Protocol::Tcp, 30000), 18),
            "-p tcp -m tcp --dport 30000"
        );
        let es: Vec<Entry> = (0..200u16)
            .map(|i| Entry {
                key: port_key(
                    if i % 2 == 0 {
                        Protocol::Tcp
                    } else {
                        Protocol::Udp
                    },
                    30000 + i,
                ),
                rule: format!("P{i}"),
            })
            .collect();
        let r = render(Dispatch::Tree, KeyKind::Port, "np", es);
        assert!(r.top.len() <= 16, "{:?}", r.top);
        assert!(
            r.top.iter().any(|t| t.starts_with("-p udp"))
                && r.top.iter().any(|t| t.starts_with("-p tcp"))
        );
    }

    #[test]
    fn ipv6_prefixes() {
        let es: Vec<Entry> = (0..50u128)
            .map(|i| Entry {
                key: addr_key("fd00:96::".parse::<IpAddr>().unwrap()) + i * 0x10001,
                rule: format!("R{i}"),
            })
            .collect();
        let r = render(Dispatch::Tree, KeyKind::V6, "x", es);
        assert!(
            r.top.iter().all(|t| t.starts_with("-d fd00:96::")),
            "{:?}",
            r.top
        );
    }
}
