//! IPVS mode's packet-filter part: tables `ip svcplane-ipvs` and `ip6 svcplane-ipvs`
//! doing what kube-proxy's IPVS mode does with iptables and ipsets: masquerade marks
//! (ClusterIPs from outside the cluster CIDRs, external addresses of eTP Cluster
//! services), hairpin masquerade, loadBalancerSourceRanges, REJECT for service
//! addresses without endpoints, DROP for eTP Local without local endpoints, and REJECT
//! for ports of a service address that no service uses.
//!
//! Every per-service fact is a set element (as kube-proxy's ipsets), so the rules are a
//! fixed handful and a sync that changes only endpoints or services changes only
//! elements ([`FilterState::update`], sent with [`send_changes`]), except for one chain
//! per service with source ranges.
//!
//! Hooks: the marks run in prerouting and output at priority -100 (dstnat; nft 1.0.6
//! refuses the name on filter chains), before IPVS
//! (LOCAL_OUT at -98 for the node's own traffic, LOCAL_IN at 98 otherwise); the verdicts
//! run in input at priority filter (0), before IPVS takes the packet in LOCAL_IN; the
//! masquerade in postrouting (srcnat), where IPVS's masquerade-forwarded packets pass
//! with their conntrack entry (`net.ipv4.vs.conntrack=1`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use svcplane_model::IpFamily;
use svcplane_proxy::{
    ClusterIpMasquerade, DataplaneError, EmptyVerdict, FamilyState, ServicePortState,
};

use super::plan::{Frontend, Wanted};
use crate::nftables::MASQUERADE_MARK;
use crate::nftables::names::{FIREWALL_PREFIX, join, service_base};
use crate::nftables::netlink::{Key, Socket, Verdict, family_code};
use crate::nftables::render::family_nets;
use crate::refs::AddrRefs;

/// The tables' name (in families `ip` and `ip6`).
pub const TABLE: &str = "svcplane-ipvs";

/// The chain setting the masquerade mark (the nftables backend's name for it).
const MARK: &str = "mark-for-masquerade";

/// The sets of one family's table, by name, each with its elements as nft text.
const SETS: [(&str, &str, &str); 8] = [
    (
        "cluster-ips",
        "addr . inet_proto . inet_service",
        "ClusterIP frontends (masquerade from outside the cluster CIDRs)",
    ),
    (
        "external-masq",
        "addr . inet_proto . inet_service",
        "external frontends of eTP Cluster services (masquerade)",
    ),
    (
        "no-endpoints",
        "addr . inet_proto . inet_service",
        "frontends without endpoints (reject)",
    ),
    (
        "no-local-endpoints",
        "addr . inet_proto . inet_service",
        "eTP Local frontends without local endpoints (drop unless from the node or a pod)",
    ),
    (
        "external-local",
        "addr . inet_proto . inet_service",
        "external frontends of eTP Local services (the node's own traffic is masqueraded)",
    ),
    ("service-ips", "addr", "addresses on the dummy interface"),
    (
        "service-ports",
        "addr . inet_proto . inet_service",
        "frontends on the dummy interface's addresses",
    ),
    (
        "hairpin",
        "addr . addr",
        "endpoint . itself (hairpin masquerade)",
    ),
];

/// One family's filter state: set elements, source-range chains, globals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterState {
    pub sets: BTreeMap<&'static str, BTreeSet<String>>,
    /// Per LoadBalancer frontend with source ranges: (frontend element, chain name).
    pub firewall: BTreeMap<String, String>,
    /// Chain name → allowed source ranges.
    pub firewall_chains: BTreeMap<String, Vec<IpNet>>,
    pub masquerade: Option<ClusterIpMasquerade>,
    /// `--cluster-cidr` of this family: pod sources.
    pub cluster_cidrs: Vec<IpNet>,
    /// How many real servers (over every virtual server) each hairpin endpoint is: its
    /// element goes when the last one does.
    pub hairpin_refs: AddrRefs,
}

/// One set element added or deleted by [`FilterState::update`], in nft's text and as
/// the netlink key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementChange {
    pub delete: bool,
    pub set: &'static str,
    pub text: String,
    pub(crate) key: Key,
}

/// The sets a virtual server's frontend element is in, and whether it needs a
/// source-range chain.
fn frontend_sets(w: &Wanted, svc: &ServicePortState) -> (Vec<&'static str>, bool) {
    let mut sets = Vec::with_capacity(3);
    if w.frontend != Frontend::NodePort {
        sets.push("service-ports");
    }
    let target = if w.frontend.external() {
        &svc.external
    } else {
        &svc.internal
    };
    match target.verdict_when_empty() {
        Some(EmptyVerdict::Reject) => sets.push("no-endpoints"),
        Some(EmptyVerdict::Drop) => sets.push("no-local-endpoints"),
        None => {}
    }
    sets.push(match (w.frontend, &svc.external_policy) {
        (Frontend::ClusterIp, _) => "cluster-ips",
        (_, svcplane_proxy::ExternalPolicy::Cluster) => "external-masq",
        (_, svcplane_proxy::ExternalPolicy::Local { .. }) => "external-local",
    });
    let firewall =
        w.frontend == Frontend::LoadBalancer && !svc.load_balancer_source_ranges.is_empty();
    (sets, firewall)
}

fn frontend_key(w: &Wanted) -> Key {
    Key::default()
        .ip(&w.vs.key.addr)
        .proto(w.service.protocol)
        .port(w.vs.key.port)
}

fn ip_word(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

fn addr_type(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    }
}

fn element(addr: IpAddr, w: &Wanted) -> String {
    format!(
        "{addr} . {} . {}",
        w.service.protocol.as_lower(),
        w.vs.key.port
    )
}

impl FilterState {
    /// The filter state of `fam` for its virtual servers `wanted` (of this family) and
    /// the dummy interface's addresses `vips`. A service whose name cannot be a chain
    /// name is an error naming it.
    pub fn build<'a>(
        fam: &FamilyState,
        wanted: impl Iterator<Item = &'a Wanted>,
        vips: &BTreeSet<IpAddr>,
    ) -> Result<FilterState, DataplaneError> {
        let v4 = fam.family == IpFamily::V4;
        let mut st = FilterState {
            masquerade: Some(fam.cluster_ip_masquerade.clone()),
            cluster_cidrs: family_nets(fam.family, &fam.cluster_cidrs),
            ..FilterState::default()
        };
        for (name, _, _) in SETS {
            st.sets.insert(name, BTreeSet::new());
        }
        let mut add = |set: &'static str, e: String| {
            st.sets.entry(set).or_default().insert(e);
        };
        for ip in vips.iter().filter(|ip| ip.is_ipv4() == v4) {
            add("service-ips", ip.to_string());
        }
        let mut firewall = Vec::new();
        let mut hairpin_refs = AddrRefs::default();
        for w in wanted {
            let addr = w.vs.key.addr;
            if addr.is_ipv4() != v4 {
                continue;
            }
            let Some(svc) = fam.services.get(&w.service) else {
                continue;
            };
            let e = element(addr, w);
            let (sets, fw) = frontend_sets(w, svc);
            for set in sets {
                add(set, e.clone());
            }
            if fw {
                firewall.push((
                    e,
                    w.service.clone(),
                    svc.load_balancer_source_ranges.clone(),
                ));
            }
            for r in &w.reals {
                add("hairpin", format!("{} . {}", r.addr, r.addr));
                hairpin_refs.add(r.addr);
            }
        }
        st.hairpin_refs = hairpin_refs;
        for (e, spn, ranges) in firewall {
            let chain = join(FIREWALL_PREFIX, &service_base(&spn)?)?;
            st.firewall.insert(e, chain.clone());
            st.firewall_chains
                .insert(chain, family_nets(fam.family, &ranges));
        }
        Ok(st)
    }

    /// Take out the virtual servers `removed` and put in `added` (each with its service
    /// port's state, old and new), all of this family, and the dummy's addresses
    /// `vips_gone`/`vips_came` of this family: the set elements that change, already applied
    /// to `self`. Work in the number of virtual servers and real servers named, not in
    /// the table's size. `None` (and `self` untouched) when a source-range chain would
    /// come or go: only a whole render does that.
    pub fn update(
        &mut self,
        removed: &[(&Wanted, &ServicePortState)],
        added: &[(&Wanted, &ServicePortState)],
        vips_gone: &[IpAddr],
        vips_came: &[IpAddr],
    ) -> Option<Vec<ElementChange>> {
        if removed
            .iter()
            .chain(added)
            .any(|(w, s)| frontend_sets(w, s).1)
        {
            return None;
        }
        // Presence before the first touch, per (set, element); compared at the end so
        // an element taken out and put back is no change.
        let mut touched: BTreeMap<(&'static str, String), (bool, Key)> = BTreeMap::new();
        let mut touch = |sets: &BTreeMap<&'static str, BTreeSet<String>>,
                         set: &'static str,
                         text: &String,
                         key: &dyn Fn() -> Key| {
            if let std::collections::btree_map::Entry::Vacant(v) =
                touched.entry((set, text.clone()))
            {
                let was = sets.get(set).is_some_and(|s| s.contains(text));
                v.insert((was, key()));
            }
        };
        for (w, svc) in removed {
            let e = element(w.vs.key.addr, w);
            for set in frontend_sets(w, svc).0 {
                touch(&self.sets, set, &e, &|| frontend_key(w));
                if let Some(s) = self.sets.get_mut(set) {
                    s.remove(&e);
                }
            }
            for r in &w.reals {
                let text = format!("{} . {}", r.addr, r.addr);
                touch(&self.sets, "hairpin", &text, &|| {
                    Key::default().ip(&r.addr).ip(&r.addr)
                });
                if self.hairpin_refs.remove(r.addr)
                    && let Some(s) = self.sets.get_mut("hairpin")
                {
                    s.remove(&text);
                }
            }
        }
        for (w, svc) in added {
            let e = element(w.vs.key.addr, w);
            for set in frontend_sets(w, svc).0 {
                touch(&self.sets, set, &e, &|| frontend_key(w));
                self.sets.entry(set).or_default().insert(e.clone());
            }
            for r in &w.reals {
                let text = format!("{} . {}", r.addr, r.addr);
                touch(&self.sets, "hairpin", &text, &|| {
                    Key::default().ip(&r.addr).ip(&r.addr)
                });
                self.hairpin_refs.add(r.addr);
                self.sets.entry("hairpin").or_default().insert(text);
            }
        }
        for (ips, came) in [(vips_gone, false), (vips_came, true)] {
            for ip in ips {
                let text = ip.to_string();
                touch(&self.sets, "service-ips", &text, &|| Key::default().ip(ip));
                let set = self.sets.entry("service-ips").or_default();
                if came {
                    set.insert(text);
                } else {
                    set.remove(&text);
                }
            }
        }
        Some(
            touched
                .into_iter()
                .filter_map(|((set, text), (was, key))| {
                    let now = self.sets.get(set).is_some_and(|s| s.contains(&text));
                    (was != now).then_some(ElementChange {
                        delete: was,
                        set,
                        text,
                        key,
                    })
                })
                .collect(),
        )
    }

    /// The whole table as one `nft -f` transaction that replaces what it holds.
    pub fn render(&self, family: IpFamily) -> String {
        let t = format!("{} {TABLE}", ip_word(family));
        let ipx = ip_word(family);
        let at = addr_type(family);
        let mut o = String::new();
        // Delete and recreate in one transaction: the table holds no state worth keeping
        // (no affinity sets), and whatever an earlier run left goes with it.
        let _ = writeln!(o, "add table {t}");
        let _ = writeln!(o, "delete table {t}");
        let _ = writeln!(o, "add table {t} {{ comment \"svcplane IPVS mode\" ; }}");
        for chain in self.firewall_chains.keys() {
            let _ = writeln!(o, "add chain {t} {chain}");
        }
        let _ = writeln!(o, "add chain {t} {MARK}");
        for (name, key, comment) in SETS {
            let key = key.replace("addr", at);
            let _ = writeln!(
                o,
                "add set {t} {name} {{ type {key} ; comment \"{comment}\" ; }}"
            );
        }
        let _ = writeln!(
            o,
            "add set {t} cluster-cidrs {{ type {at} ; flags interval ; comment \"--cluster-cidr\" ; }}"
        );
        let _ = writeln!(
            o,
            "add map {t} firewall {{ type {at} . inet_proto . inet_service : verdict ; comment \"LoadBalancer frontends with source ranges\" ; }}"
        );
        for (name, elems) in &self.sets {
            push_elements(&mut o, &t, name, elems.iter().map(String::as_str));
        }
        let nets: Vec<String> = self.cluster_cidrs.iter().map(ToString::to_string).collect();
        push_elements(&mut o, &t, "cluster-cidrs", nets.iter().map(String::as_str));
        let fw: Vec<String> = self
            .firewall
            .iter()
            .map(|(e, c)| format!("{e} : jump {c}"))
            .collect();
        push_elements(&mut o, &t, "firewall", fw.iter().map(String::as_str));
        for (chain, ranges) in &self.firewall_chains {
            if !ranges.is_empty() {
                let list: Vec<String> = ranges.iter().map(ToString::to_string).collect();
                let _ = writeln!(
                    o,
                    "add rule {t} {chain} {ipx} saddr {{ {} }} return",
                    list.join(", ")
                );
            }
            let _ = writeln!(o, "add rule {t} {chain} drop");
        }
        let mark = format!("meta mark set meta mark or {MASQUERADE_MARK:#010x}");
        let frontend = format!("{ipx} daddr . meta l4proto . th dport");
        match &self.masquerade {
            Some(ClusterIpMasquerade::All) => {
                let _ = writeln!(o, "add rule {t} {MARK} {frontend} @cluster-ips {mark}");
            }
            Some(ClusterIpMasquerade::FromOutside(_)) => {
                let _ = writeln!(
                    o,
                    "add rule {t} {MARK} {ipx} saddr != @cluster-cidrs {frontend} @cluster-ips {mark}"
                );
            }
            // No cluster CIDR known: the node's own connections to a ClusterIP leave
            // from that ClusterIP (the dummy holds it); masquerade them to the node's
            // address so the endpoint's answer comes back (kube-proxy does the same).
            Some(ClusterIpMasquerade::None) | None => {
                let _ = writeln!(
                    o,
                    "add rule {t} {MARK} {ipx} saddr @service-ips {frontend} @cluster-ips {mark}"
                );
            }
        }
        let _ = writeln!(o, "add rule {t} {MARK} {frontend} @external-masq {mark}");
        let _ = writeln!(
            o,
            "add chain {t} prerouting {{ type filter hook prerouting priority -100 ; policy accept ; }}"
        );
        let _ = writeln!(o, "add rule {t} prerouting jump {MARK}");
        let _ = writeln!(
            o,
            "add chain {t} output {{ type filter hook output priority -100 ; policy accept ; }}"
        );
        let _ = writeln!(o, "add rule {t} output jump {MARK}");
        // The node's own connections to an eTP Local external frontend may go to another
        // node's endpoint (see `plan::real_server_target`) and leave from the frontend's
        // address: masquerade them, as for eTP Cluster.
        let _ = writeln!(o, "add rule {t} output {frontend} @external-local {mark}");
        let _ = writeln!(
            o,
            "add chain {t} input {{ type filter hook input priority filter ; policy accept ; }}"
        );
        let _ = writeln!(o, "add rule {t} input {frontend} vmap @firewall");
        let _ = writeln!(o, "add rule {t} input {frontend} @no-endpoints reject");
        // Drop only what comes from elsewhere: the node's own and its pods' traffic is
        // served by the cluster-wide real servers.
        let _ = writeln!(
            o,
            "add rule {t} input fib saddr type != local {ipx} saddr != @cluster-cidrs {frontend} @no-local-endpoints drop"
        );
        let _ = writeln!(
            o,
            "add rule {t} input ct state new {ipx} daddr @service-ips {frontend} != @service-ports reject"
        );
        let _ = writeln!(
            o,
            "add chain {t} postrouting {{ type nat hook postrouting priority srcnat ; policy accept ; }}"
        );
        let _ = writeln!(
            o,
            "add rule {t} postrouting {ipx} saddr . {ipx} daddr @hairpin masquerade"
        );
        let _ = writeln!(
            o,
            "add rule {t} postrouting meta mark & {MASQUERADE_MARK:#010x} == 0 return"
        );
        let _ = writeln!(
            o,
            "add rule {t} postrouting meta mark set meta mark xor {MASQUERADE_MARK:#010x}"
        );
        let _ = writeln!(o, "add rule {t} postrouting masquerade fully-random");
        o
    }
}

/// An nf_tables netlink socket for [`send_changes`] (in the named network namespace).
pub struct ElementSocket(Socket);

impl ElementSocket {
    pub fn open(netns: Option<&str>) -> Result<ElementSocket, DataplaneError> {
        Socket::open(netns)
            .map(ElementSocket)
            .map_err(|e| DataplaneError::Other(format!("nf_tables netlink socket: {e}")))
    }
}

/// Send the element changes of both families (`[v4, v6]`, from [`FilterState::update`])
/// as one nf_tables batch, which the kernel applies whole or not at all, with a no-op
/// per table (re-adding a chain) that fails when the table is gone: no `nft` process,
/// no parse, no cache of the tables' 10k-element sets. Returns how many elements changed.
pub fn send_changes(
    socket: &mut ElementSocket,
    changes: [&Vec<ElementChange>; 2],
) -> Result<usize, DataplaneError> {
    type Items = Vec<(Key, Option<Verdict>)>;
    let mut batch = socket.0.batch();
    let mut n = 0;
    for (i, list) in changes.into_iter().enumerate() {
        let family = family_code(i == 1);
        batch.add_chain(family, TABLE, MARK);
        let mut groups: BTreeMap<(bool, &'static str), Items> = BTreeMap::new();
        for c in list {
            groups
                .entry((c.delete, c.set))
                .or_default()
                .push((c.key.clone(), None));
            n += 1;
        }
        for ((delete, set), items) in &groups {
            batch.elements(*delete, family, TABLE, set, items);
        }
    }
    socket
        .0
        .commit(batch)
        .map_err(|e| DataplaneError::Other(format!("IPVS filter tables' element changes: {e}")))?;
    Ok(n)
}

/// An nft script that does nothing while both tables exist and fails when either is
/// missing (`add chain` of an existing chain is a no-op).
pub fn tables_present_probe() -> String {
    format!("add chain ip {TABLE} {MARK}\nadd chain ip6 {TABLE} {MARK}\n")
}

fn push_elements<'a>(o: &mut String, t: &str, set: &str, elems: impl Iterator<Item = &'a str>) {
    let elems: Vec<&str> = elems.collect();
    // nft refuses `{ }`; and one line per 1000 keeps lines bounded at 50k services.
    for chunk in elems.chunks(1000) {
        let _ = writeln!(o, "add element {t} {set} {{ {} }}", chunk.join(", "));
    }
}
