//! DesiredState → one `nft -f -` transaction, modelled on kube-proxy's nftables mode
//! (`pkg/proxy/nftables/proxier.go`: setupNFTables + syncProxyRules).
//!
//! Transaction shape, per family (`ip svcplane`, then `ip6 svcplane`):
//! 1. `add table` + `flush table`: every chain loses its rules, but the table, its
//!    chains and its sets stay. Set elements survive a table flush, so ClientIP
//!    affinity state is kept across syncs (a `delete table` would reset every sticky
//!    client on every sync). Established connections do not depend on rules at all:
//!    their NAT is in conntrack, and the whole transaction is atomic, so no packet
//!    ever sees a half-written ruleset. This is what kube-proxy does.
//! 2. The base chains are deleted and re-created (kube-proxy does this on its first
//!    sync), so a changed hook priority can never make the transaction fail. Base
//!    chains of an earlier layout are emptied by the flush and deleted as stale objects.
//! 3. The shared maps/sets are `add` + `flush`ed (flush table does not empty them);
//!    affinity sets are only `add`ed, which keeps their elements.
//! 4. One `table … { … }` block declares every chain with its rules (nft resolves
//!    forward references inside a block), then `add element` fills the maps.
//!
//! Objects of an earlier state that are no longer wanted are left empty and
//! unreferenced by this script; `sync` deletes them in a second step (as kube-proxy,
//! because kernels before 6.2 release a chain's last map reference asynchronously).
//!
//! Partial syncs ([`render_partial`]) send only what a `Diff` changed; `render` stays the
//! full transaction (what startup, periodic resyncs and repairs send).
//!
//! Every semantic decision (which endpoints, which verdict when empty, masquerade
//! policy) comes from the DesiredState; this module only spells it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use ipnet::IpNet;
use svcplane_model::{IpFamily, Protocol, ServicePortName};
use svcplane_proxy::{
    ClusterIpMasquerade, DataplaneError, DesiredState, Diff, EmptyVerdict, ExternalPolicy,
    FamilyState, NodePortAddresses, ServicePortState, TrafficTarget,
};

use super::names;
use super::netlink::{self, Key, Op, Verdict as NlVerdict};
use super::rule::Rule;

/// A service port's balancing chains as rule values. `complete` is false when the
/// service also has chains or sets only the text form spells (affinity, external
/// traffic, source ranges).
#[derive(Debug, Default)]
pub(crate) struct ChainRules {
    pub chains: Vec<(String, Vec<Rule>)>,
    pub complete: bool,
}

/// The table, in both the `ip` and the `ip6` family. Nothing outside it is touched.
pub const TABLE: &str = "svcplane";

/// eBPF mode's north-south table (see [`Layout::NORTH_SOUTH`]).
pub const NORTH_SOUTH_TABLE: &str = "svcplane-ns";

/// Which table the rules go into and which traffic they see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub table: &'static str,
    /// Whether the output hook is used: the node's own connections are translated too.
    pub output: bool,
}

impl Layout {
    /// nftables mode: every path, table `svcplane`.
    pub const FULL: Layout = Layout {
        table: TABLE,
        output: true,
    };
    /// eBPF mode's north-south path: the same rules from the same desired state, but only
    /// on the prerouting/input/forward/postrouting hooks, so they see what arrives from
    /// outside the node (and pod traffic the socket load balancer left alone). Local
    /// sockets are translated at connect by the socket load balancer: no output hook.
    pub const NORTH_SOUTH: Layout = Layout {
        table: NORTH_SOUTH_TABLE,
        output: false,
    };

    fn base_chains(self) -> impl Iterator<Item = &'static BaseChain> {
        BASE_CHAINS
            .iter()
            .filter(move |bc| self.output || bc.hook != "output")
    }
}

/// Fails a transaction when either table is missing, changes nothing otherwise (`add`
/// of an existing chain is a no-op; `add chain` into a missing table is an error).
pub(crate) fn tables_present_probe(table: &str) -> String {
    format!("add chain ip {table} {SERVICES}\nadd chain ip6 {table} {SERVICES}\n")
}

/// [`tables_present_probe`] as netlink operations.
pub(crate) fn tables_present_probe_ops() -> [Op; 2] {
    [false, true].map(|ipv6| Op::AddChain {
        family: netlink::family_code(ipv6),
        chain: SERVICES.to_owned(),
    })
}

/// kube-proxy's default masquerade mark (`--iptables-masquerade-bit` 14).
pub const MASQUERADE_MARK: u32 = 0x4000;

// Fixed chains, sets and maps (kube-proxy's names).
const SERVICES: &str = "services";
const SERVICE_IPS: &str = "service-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NODEPORT_IPS: &str = "nodeport-ips";
const CLUSTER_IPS: &str = "cluster-ips";
const HAIRPIN: &str = "hairpin";
const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
const REJECT_CHAIN: &str = "reject-chain";
const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
const FIREWALL_IPS: &str = "firewall-ips";
const FIREWALL_CHECK: &str = "firewall-check";
const MARK_MASQ: &str = "mark-for-masquerade";
const MASQUERADING: &str = "masquerading";

/// A base chain: name, type, hook, priority. Priorities are numeric because nft
/// before 1.0.7 rejects `dstnat - 10` on filter hooks; dstnat is -100, srcnat 100 and
/// filter 0, so these are kube-proxy's `dstnat-10`, `dstnat`, `filter`, `srcnat`.
struct BaseChain {
    name: &'static str,
    kind: &'static str,
    hook: &'static str,
    priority: i32,
    /// Rules: (match, target chain) → `<match> jump <target>`.
    jumps: &'static [(&'static str, &'static str)],
}

const CT_NEW: &str = "ct state new ";

/// kube-proxy's layout since kubernetes#132456 (1.34, cherry-picked to 1.33): only the source-range
/// firewall looks at the destination before DNAT; the endpoint checks run at filter
/// priority, after DNAT. So a connection that an external chain's short-circuit DNATed
/// (pod or node traffic to an eTP Local service without local endpoints) no longer
/// meets the no-endpoint DROP meant for external traffic, while what nothing DNATed
/// still has its original destination there and is dropped or rejected.
const BASE_CHAINS: &[BaseChain] = &[
    BaseChain {
        name: "filter-prerouting-pre-dnat",
        kind: "filter",
        hook: "prerouting",
        priority: -110,
        jumps: &[(CT_NEW, FIREWALL_CHECK)],
    },
    BaseChain {
        name: "filter-output-pre-dnat",
        kind: "filter",
        hook: "output",
        priority: -110,
        jumps: &[(CT_NEW, FIREWALL_CHECK)],
    },
    BaseChain {
        name: "filter-input",
        kind: "filter",
        hook: "input",
        priority: 0,
        jumps: &[
            (CT_NEW, NODEPORT_ENDPOINTS_CHECK),
            (CT_NEW, SERVICE_ENDPOINTS_CHECK),
        ],
    },
    BaseChain {
        name: "filter-forward",
        kind: "filter",
        hook: "forward",
        priority: 0,
        jumps: &[
            (CT_NEW, SERVICE_ENDPOINTS_CHECK),
            (CT_NEW, CLUSTER_IPS_CHECK),
        ],
    },
    BaseChain {
        name: "filter-output",
        kind: "filter",
        hook: "output",
        priority: 0,
        jumps: &[
            (CT_NEW, SERVICE_ENDPOINTS_CHECK),
            (CT_NEW, CLUSTER_IPS_CHECK),
        ],
    },
    BaseChain {
        name: "nat-prerouting",
        kind: "nat",
        hook: "prerouting",
        priority: -100,
        jumps: &[("", SERVICES)],
    },
    BaseChain {
        name: "nat-output",
        kind: "nat",
        hook: "output",
        priority: -100,
        jumps: &[("", SERVICES)],
    },
    BaseChain {
        name: "nat-postrouting",
        kind: "nat",
        hook: "postrouting",
        priority: 100,
        jumps: &[("", MASQUERADING)],
    },
];

/// Writing into a `String` cannot fail; these keep the renderer free of `let _ =`.
macro_rules! w {
    ($dst:expr, $($arg:tt)*) => {{ let _ = write!($dst, $($arg)*); }};
}
macro_rules! wl {
    ($dst:expr, $($arg:tt)*) => {{ let _ = writeln!($dst, $($arg)*); }};
}

/// How a family spells things.
#[derive(Clone, Copy)]
struct Spell {
    family: IpFamily,
    /// Table family and address match keyword (`ip` / `ip6`).
    ipx: &'static str,
    addr_type: &'static str,
    no_localhost: &'static str,
}

impl Spell {
    fn of(family: IpFamily) -> Spell {
        match family {
            IpFamily::V4 => Spell {
                family,
                ipx: "ip",
                addr_type: "ipv4_addr",
                no_localhost: "ip daddr != 127.0.0.0/8",
            },
            IpFamily::V6 => Spell {
                family,
                ipx: "ip6",
                addr_type: "ipv6_addr",
                no_localhost: "ip6 daddr != ::1",
            },
        }
    }
}

/// `ip:port`, with brackets for IPv6 (`[fd00::1]:80`), as `dnat to` wants it.
struct SockAddr(IpAddr, u16);

impl fmt::Display for SockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.1),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.1),
        }
    }
}

/// One network, or an anonymous set `{ a, b }` of several. Never empty (callers check).
struct NetSet<'a>(&'a [IpNet]);

impl fmt::Display for NetSet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let [one] = self.0 {
            return write!(f, "{one}");
        }
        f.write_str("{ ")?;
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{net}")?;
        }
        f.write_str(" }")
    }
}

/// This family's networks, merged: nft rejects overlapping intervals in a set.
pub(crate) fn family_nets(family: IpFamily, nets: &[IpNet]) -> Vec<IpNet> {
    let own: Vec<IpNet> = nets
        .iter()
        .filter(|n| IpFamily::of_net(n) == family)
        .map(|n| n.trunc())
        .collect();
    IpNet::aggregate(&own)
}

/// The value of a verdict-map element.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Goto(String),
    Drop,
    Reject,
}

impl Verdict {
    fn empty(v: EmptyVerdict) -> Verdict {
        match v {
            EmptyVerdict::Reject => Verdict::Reject,
            EmptyVerdict::Drop => Verdict::Drop,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Goto(chain) => write!(f, "goto {chain}"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Reject => write!(f, "goto {REJECT_CHAIN}"),
        }
    }
}

type IpKey = (IpAddr, Protocol, u16);
type PortKey = (Protocol, u16);

/// Map and set elements of one family, sorted by key. The first service (in sorted
/// order) to claim a key keeps it, so a conflict between two services is rendered the
/// same way every time instead of failing the whole transaction.
#[derive(Default)]
struct Elements {
    cluster_ips: BTreeSet<IpAddr>,
    /// Endpoint addresses: a DNATed connection from one to itself is masqueraded.
    hairpin: BTreeSet<IpAddr>,
    service_ips: BTreeMap<IpKey, Verdict>,
    no_endpoint_services: BTreeMap<IpKey, Verdict>,
    firewall_ips: BTreeMap<IpKey, Verdict>,
    service_nodeports: BTreeMap<PortKey, Verdict>,
    no_endpoint_nodeports: BTreeMap<PortKey, Verdict>,
}

fn claim<K: Ord + fmt::Debug>(
    map: &mut BTreeMap<K, Verdict>,
    map_name: &str,
    key: K,
    value: Verdict,
    owner: &ServicePortName,
) {
    match map.entry(key) {
        std::collections::btree_map::Entry::Vacant(e) => {
            e.insert(value);
        }
        std::collections::btree_map::Entry::Occupied(e) => {
            if *e.get() != value {
                tracing::warn!(
                    map = map_name,
                    key = ?e.key(),
                    service = %owner,
                    "key already used by another service port; keeping the first"
                );
            }
        }
    }
}

/// Records the names the script declares (for the sync's stale-object cleanup).
pub(crate) struct Declared<'a>(Option<&'a mut HashSet<String>>);

impl Declared<'_> {
    fn add(&mut self, name: &str) {
        if let Some(set) = self.0.as_deref_mut() {
            set.insert(name.to_owned());
        }
    }
}

/// The full transaction for `desired`: both families, deterministic.
pub fn render(desired: &DesiredState) -> Result<String, DataplaneError> {
    render_layout(desired, Layout::FULL)
}

/// [`render`] into `layout`'s table and hooks.
pub fn render_layout(desired: &DesiredState, layout: Layout) -> Result<String, DataplaneError> {
    let mut out = String::with_capacity(estimate(desired));
    for fam in desired.families() {
        render_family(&mut out, fam, layout, Declared(None))?;
    }
    Ok(out)
}

/// Like [`render`], also returning the chain/set/map names declared per family (v4, v6).
pub(crate) fn render_declared(
    desired: &DesiredState,
    layout: Layout,
) -> Result<(String, [HashSet<String>; 2]), DataplaneError> {
    let mut out = String::with_capacity(estimate(desired));
    let mut declared = [HashSet::new(), HashSet::new()];
    for (fam, names) in desired.families().into_iter().zip(declared.iter_mut()) {
        render_family(&mut out, fam, layout, Declared(Some(names)))?;
    }
    Ok((out, declared))
}

fn estimate(desired: &DesiredState) -> usize {
    desired
        .families()
        .iter()
        .map(|f| {
            f.services
                .values()
                .map(|s| 1024 + 512 * s.endpoints.len())
                .sum::<usize>()
        })
        .sum::<usize>()
        + 8192
}

fn render_family(
    out: &mut String,
    fam: &FamilyState,
    layout: Layout,
    mut declared: Declared<'_>,
) -> Result<(), DataplaneError> {
    let sp = Spell::of(fam.family);
    let t = sp.ipx;
    let at = sp.addr_type;
    let table = layout.table;

    // 1-3: table, flush, base chains re-created, shared maps/sets emptied.
    wl!(
        out,
        "add table {t} {table} {{ comment \"rules for svcplane\" ; }}"
    );
    wl!(out, "flush table {t} {table}");
    for bc in layout.base_chains() {
        wl!(out, "add chain {t} {table} {}", bc.name);
        wl!(out, "delete chain {t} {table} {}", bc.name);
    }
    let sets: [(&str, &str, &str); 2] = [
        (CLUSTER_IPS, "", "Active ClusterIPs"),
        (
            NODEPORT_IPS,
            " flags interval ;",
            "IPs that accept NodePort traffic",
        ),
    ];
    for (name, flags, comment) in sets {
        wl!(
            out,
            "add set {t} {table} {name} {{ type {at} ;{flags} comment \"{comment}\" ; }}"
        );
        // kube-proxy: with AllLocal the nodeport-ips set must not exist (add+delete
        // rather than delete, which would fail when it is absent).
        if name == NODEPORT_IPS && fam.nodeport_addresses == NodePortAddresses::AllLocal {
            wl!(out, "delete set {t} {table} {name}");
        } else {
            wl!(out, "flush set {t} {table} {name}");
            declared.add(name);
        }
    }
    wl!(
        out,
        "add set {t} {table} {HAIRPIN} {{ type {at} . {at} ; comment \"endpoint . itself, for hairpin masquerade\" ; }}"
    );
    wl!(out, "flush set {t} {table} {HAIRPIN}");
    declared.add(HAIRPIN);
    let ip_map = format!("{at} . inet_proto . inet_service : verdict");
    let port_map = "inet_proto . inet_service : verdict";
    let maps: [(&str, &str, &str); 5] = [
        (
            NO_ENDPOINT_SERVICES,
            &ip_map,
            "vmap to drop or reject packets to services with no endpoints",
        ),
        (
            NO_ENDPOINT_NODEPORTS,
            port_map,
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        (
            FIREWALL_IPS,
            &ip_map,
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
        (
            SERVICE_IPS,
            &ip_map,
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        (SERVICE_NODEPORTS, port_map, "NodePort traffic"),
    ];
    for (name, ty, comment) in maps {
        wl!(
            out,
            "add map {t} {table} {name} {{ type {ty} ; comment \"{comment}\" ; }}"
        );
        wl!(out, "flush map {t} {table} {name}");
        declared.add(name);
    }

    // 4: the chains.
    wl!(out, "table {t} {table} {{");
    for bc in layout.base_chains() {
        declared.add(bc.name);
        wl!(out, "\tchain {} {{", bc.name);
        wl!(
            out,
            "\t\ttype {} hook {} priority {} ; policy accept ;",
            bc.kind,
            bc.hook,
            bc.priority
        );
        for (matcher, target) in bc.jumps {
            wl!(out, "\t\t{matcher}jump {target}");
        }
        wl!(out, "\t}}");
    }
    render_fixed_chains(out, sp, fam, &mut declared);

    let ctx = family_ctx(fam);
    let mut elements = Elements::default();
    for svc in fam.services.values() {
        render_service(out, &ctx, svc, &mut elements, &mut declared, None)?;
    }
    wl!(out, "}}");
    write_family_elements(out, fam, table, &elements);
    Ok(())
}

/// What every service of `fam` renders against (from the family's globals).
fn family_ctx(fam: &FamilyState) -> FamilyCtx {
    let sp = Spell::of(fam.family);
    let cluster_cidrs = family_nets(sp.family, &fam.cluster_cidrs);
    let masquerade = match &fam.cluster_ip_masquerade {
        ClusterIpMasquerade::All => Masquerade::All,
        ClusterIpMasquerade::FromOutside(cidrs) => {
            let nets = family_nets(sp.family, cidrs);
            if nets.is_empty() {
                Masquerade::None
            } else {
                Masquerade::FromOutside(nets)
            }
        }
        ClusterIpMasquerade::None => Masquerade::None,
    };
    FamilyCtx {
        sp,
        cluster_cidrs,
        masquerade,
    }
}

/// Step 5: map and set elements, after every chain they name exists.
fn write_family_elements(out: &mut String, fam: &FamilyState, table: &str, elements: &Elements) {
    let t = Spell::of(fam.family).ipx;
    // `<family> <table>`, as every element statement names it.
    let t = &format!("{t} {table}");
    let sp = Spell::of(fam.family);
    if let NodePortAddresses::Cidrs(cidrs) = &fam.nodeport_addresses {
        let nets = family_nets(sp.family, cidrs);
        write_elements(out, t, NODEPORT_IPS, nets.iter(), |out, net| {
            w!(out, "{net}")
        });
    }
    write_elements(
        out,
        t,
        CLUSTER_IPS,
        elements.cluster_ips.iter(),
        |out, ip| w!(out, "{ip}"),
    );
    write_elements(out, t, HAIRPIN, elements.hairpin.iter(), hairpin_elem);
    let ip_elem = |out: &mut String, ((ip, proto, port), v): (&IpKey, &Verdict)| {
        w!(out, "{ip} . {} . {port} : {v}", proto.as_lower())
    };
    let port_elem = |out: &mut String, ((proto, port), v): (&PortKey, &Verdict)| {
        w!(out, "{} . {port} : {v}", proto.as_lower())
    };
    write_elements(
        out,
        t,
        NO_ENDPOINT_SERVICES,
        elements.no_endpoint_services.iter(),
        ip_elem,
    );
    write_elements(
        out,
        t,
        NO_ENDPOINT_NODEPORTS,
        elements.no_endpoint_nodeports.iter(),
        port_elem,
    );
    write_elements(out, t, FIREWALL_IPS, elements.firewall_ips.iter(), ip_elem);
    write_elements(out, t, SERVICE_IPS, elements.service_ips.iter(), ip_elem);
    write_elements(
        out,
        t,
        SERVICE_NODEPORTS,
        elements.service_nodeports.iter(),
        port_elem,
    );
}

fn hairpin_elem(out: &mut String, ip: &IpAddr) {
    w!(out, "{ip} . {ip}")
}

/// `add element <t> <name> { e1, e2, … }` (`t`: family and table), one element a line; nothing when empty
/// (nft rejects `{ }`).
fn write_elements<I, T>(
    out: &mut String,
    t: &str,
    name: &str,
    items: I,
    each: impl FnMut(&mut String, T),
) where
    I: Iterator<Item = T>,
{
    element_op(out, "add", t, name, items, each);
}

/// `<verb> element <t> <name> { … }` (`add` or `delete`); nothing when empty.
fn element_op<I, T>(
    out: &mut String,
    verb: &str,
    t: &str,
    name: &str,
    items: I,
    mut each: impl FnMut(&mut String, T),
) where
    I: Iterator<Item = T>,
{
    let mut first = true;
    for item in items {
        if first {
            wl!(out, "{verb} element {t} {name} {{");
            first = false;
        } else {
            out.push_str(",\n");
        }
        out.push('\t');
        each(out, item);
    }
    if !first {
        out.push_str("\n}\n");
    }
}

fn render_fixed_chains(out: &mut String, sp: Spell, fam: &FamilyState, declared: &mut Declared) {
    let ipx = sp.ipx;
    let all_local = fam.nodeport_addresses == NodePortAddresses::AllLocal;
    let chain = |out: &mut String, declared: &mut Declared, name: &str, rules: &[&str]| {
        declared.add(name);
        wl!(out, "\tchain {name} {{");
        for rule in rules {
            wl!(out, "\t\t{rule}");
        }
        wl!(out, "\t}}");
    };

    chain(
        out,
        declared,
        MARK_MASQ,
        &[&format!(
            "meta mark set meta mark or {MASQUERADE_MARK:#010x}"
        )],
    );
    chain(
        out,
        declared,
        MASQUERADING,
        &[
            // Hairpin: an endpoint that reached itself through a service. Its reply
            // would bypass the node's conntrack (un-DNATed) unless the source is the node.
            &format!("ct status dnat {ipx} saddr . {ipx} daddr @{HAIRPIN} jump {MARK_MASQ}"),
            &format!("meta mark & {MASQUERADE_MARK:#010x} == 0 return"),
            &format!("meta mark set meta mark xor {MASQUERADE_MARK:#010x}"),
            "masquerade fully-random",
        ],
    );
    chain(out, declared, REJECT_CHAIN, &["reject"]);
    chain(
        out,
        declared,
        SERVICE_ENDPOINTS_CHECK,
        &[&format!(
            "{ipx} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"
        )],
    );
    let nodeport_match = if all_local {
        sp.no_localhost.to_owned()
    } else {
        format!("{ipx} daddr @{NODEPORT_IPS}")
    };
    chain(
        out,
        declared,
        NODEPORT_ENDPOINTS_CHECK,
        &[&format!(
            "{nodeport_match} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"
        )],
    );
    chain(
        out,
        declared,
        CLUSTER_IPS_CHECK,
        &[&format!(
            "{ipx} daddr @{CLUSTER_IPS} reject comment \"Reject traffic to invalid ports of ClusterIPs\""
        )],
    );
    chain(
        out,
        declared,
        FIREWALL_CHECK,
        &[&format!(
            "{ipx} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}"
        )],
    );
    // NodePorts: any local address but loopback (kube-proxy does not support localhost
    // NodePorts), or only the local addresses within --nodeport-addresses.
    let nodeports = if all_local {
        format!(
            "fib daddr type local {} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}",
            sp.no_localhost
        )
    } else {
        format!(
            "{ipx} daddr @{NODEPORT_IPS} fib daddr type local {} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}",
            sp.no_localhost
        )
    };
    chain(
        out,
        declared,
        SERVICES,
        &[
            &format!("{ipx} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}"),
            &nodeports,
        ],
    );
}

enum Masquerade {
    All,
    FromOutside(Vec<IpNet>),
    None,
}

struct FamilyCtx {
    sp: Spell,
    cluster_cidrs: Vec<IpNet>,
    masquerade: Masquerade,
}

/// A balancing chain: `numgen` over endpoints (indices into `ServicePortState::endpoints`).
struct Balancer {
    name: String,
    endpoints: Vec<usize>,
}

/// The chain balancing `endpoints`: an existing one with the same list, or a new one
/// named by the service and the first target kind that needs it.
fn balancer_for(
    balancers: &mut Vec<Balancer>,
    prefix: &str,
    base: &str,
    endpoints: Vec<usize>,
) -> Result<usize, DataplaneError> {
    if let Some(i) = balancers.iter().position(|b| b.endpoints == endpoints) {
        return Ok(i);
    }
    balancers.push(Balancer {
        name: names::join(prefix, base)?,
        endpoints,
    });
    Ok(balancers.len() - 1)
}

/// A target's endpoint indices that resolve (an out-of-range index is ignored, as
/// `ServicePortState::target_endpoints` does).
fn resolved(svc: &ServicePortState, target: &TrafficTarget) -> Vec<usize> {
    target
        .endpoints
        .iter()
        .copied()
        .filter(|&i| i < svc.endpoints.len())
        .collect()
}

fn wrong_family(
    svc: &ServicePortState,
    what: &str,
    ip: &IpAddr,
    family: IpFamily,
) -> DataplaneError {
    DataplaneError::Other(format!(
        "service port {}: {what} {ip} is not {family} but is in the {family} state",
        svc.name
    ))
}

/// Writes one service port's chains into `out` and its elements into `elements`; with
/// `rules_out`, also its balancing chains as rule values (for the netlink path).
fn render_service(
    out: &mut String,
    ctx: &FamilyCtx,
    svc: &ServicePortState,
    elements: &mut Elements,
    declared: &mut Declared,
    rules_out: Option<&mut ChainRules>,
) -> Result<(), DataplaneError> {
    let sp = ctx.sp;
    let ipx = sp.ipx;
    let family = sp.family;
    let proto = svc.protocol.as_lower();
    let port = svc.port;
    let base = names::service_base(&svc.name)?;

    // Addresses of another family would make nft reject the whole transaction.
    for ip in svc.cluster_ip.iter() {
        if IpFamily::of(ip) != family {
            return Err(wrong_family(svc, "ClusterIP", ip, family));
        }
    }
    for ip in svc.external_ips.iter().chain(&svc.load_balancer_ips) {
        if IpFamily::of(ip) != family {
            return Err(wrong_family(svc, "external address", ip, family));
        }
    }

    let internal = resolved(svc, &svc.internal);
    let external = resolved(svc, &svc.external);
    let local_origin = match &svc.external_policy {
        ExternalPolicy::Local { local_origin } => Some(resolved(svc, local_origin)),
        ExternalPolicy::Cluster => None,
    };
    let has_external = svc.has_external();

    // Balancing chains, only for targets something will reference.
    let mut balancers: Vec<Balancer> = Vec::with_capacity(3);
    let internal_chain = match svc.cluster_ip {
        Some(_) if !internal.is_empty() => Some(balancer_for(
            &mut balancers,
            names::SERVICE_PREFIX,
            &base,
            internal,
        )?),
        _ => None,
    };
    let origin_chain = match &local_origin {
        Some(eps) if has_external && !eps.is_empty() => Some(balancer_for(
            &mut balancers,
            names::CLUSTER_PREFIX,
            &base,
            eps.clone(),
        )?),
        _ => None,
    };
    let external_policy_chain = if has_external && !external.is_empty() {
        Some(balancer_for(
            &mut balancers,
            names::EXTERNAL_POLICY_PREFIX,
            &base,
            external,
        )?)
    } else {
        None
    };
    // kube-proxy's EXT chain: needed when external traffic can reach any endpoint,
    // including only through the eTP Local short-circuits.
    let external_chain = if external_policy_chain.is_some() || origin_chain.is_some() {
        Some(names::join(names::EXTERNAL_PREFIX, &base)?)
    } else {
        None
    };

    // The endpoints some balancing chain uses.
    let used: BTreeSet<usize> = balancers
        .iter()
        .flat_map(|b| b.endpoints.iter().copied())
        .collect();
    for &i in &used {
        let ep = &svc.endpoints[i];
        if IpFamily::of(&ep.ip) != family {
            return Err(wrong_family(svc, "endpoint", &ep.ip, family));
        }
    }
    // Endpoint chains (and their affinity sets) only with ClientIP affinity, where the
    // chain records the client before DNAT. Without it the balancing chain DNATs
    // directly: per-endpoint chains cost the kernel a chain each and made a 10k-service
    // full sync 50x slower (docs/nftables-scale.md).
    let mut ep_chain: Vec<Option<(String, String)>> = vec![None; svc.endpoints.len()];
    if svc.affinity_timeout_seconds.is_some() {
        for &i in &used {
            let ep = &svc.endpoints[i];
            let ep_base = names::endpoint_base(&svc.name, ep.ip, ep.port);
            ep_chain[i] = Some((
                names::join(names::ENDPOINT_PREFIX, &ep_base)?,
                names::join(names::AFFINITY_PREFIX, &ep_base)?,
            ));
        }
    }
    let ep_names = |i: usize| -> (&str, &str) {
        match &ep_chain[i] {
            Some((c, a)) => (c.as_str(), a.as_str()),
            None => ("", ""),
        }
    };

    // Affinity sets: one per endpoint, recording the client IPs stuck to it.
    if let Some(timeout) = svc.affinity_timeout_seconds {
        for &i in &used {
            let (_, set) = ep_names(i);
            declared.add(set);
            wl!(
                out,
                "\tset {set} {{ type {} ; flags dynamic,timeout ; timeout {timeout}s ; }}",
                sp.addr_type
            );
        }
    }

    let mut rules_out = rules_out;
    if let Some(r) = rules_out.as_deref_mut() {
        r.complete = svc.affinity_timeout_seconds.is_none();
    }
    for (bi, b) in balancers.iter().enumerate() {
        declared.add(&b.name);
        wl!(out, "\tchain {} {{", b.name);
        let mut rules = Vec::with_capacity(b.endpoints.len() + 1);
        if Some(bi) == internal_chain
            && let Some(cip) = svc.cluster_ip
        {
            // Qualified by the ClusterIP: the chain may also balance external traffic.
            let unless_from = match &ctx.masquerade {
                Masquerade::All => Some(Vec::new()),
                Masquerade::FromOutside(nets) => Some(nets.clone()),
                Masquerade::None => None,
            };
            if let Some(unless_from) = unless_from {
                rules.push(Rule::MarkClusterIp {
                    cluster_ip: cip,
                    protocol: svc.protocol,
                    port,
                    unless_from,
                    mark_chain: MARK_MASQ,
                });
            }
        }
        for rule in &rules {
            wl!(out, "\t\t{rule}");
        }
        if svc.affinity_timeout_seconds.is_some() {
            for &i in &b.endpoints {
                let (chain, set) = ep_names(i);
                wl!(out, "\t\t{ipx} saddr @{set} goto {chain}");
            }
            w!(out, "\t\tnumgen random mod {} vmap {{ ", b.endpoints.len());
            for (n, &i) in b.endpoints.iter().enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                w!(out, "{n} : goto {}", ep_names(i).0);
            }
            out.push_str(" }\n");
        } else {
            // Endpoint n of k is taken with probability 1/(k-n) when the earlier ones
            // were not: each equally likely, as kube-proxy's iptables mode's
            // `statistic --probability` chain. (`numgen random mod k vmap` would need an
            // anonymous set per service, which the kernel allocates in quadratic time.)
            let k = b.endpoints.len();
            for (n, &i) in b.endpoints.iter().enumerate() {
                let ep = &svc.endpoints[i];
                let rule = Rule::Dnat {
                    one_in: (n + 1 < k).then(|| (k - n) as u32),
                    protocol: svc.protocol,
                    addr: ep.ip,
                    port: ep.port,
                };
                wl!(out, "\t\t{rule}");
                rules.push(rule);
            }
        }
        out.push_str("\t}\n");
        if let Some(r) = rules_out.as_deref_mut() {
            r.chains.push((b.name.clone(), rules));
        }
    }

    if let Some(ext) = &external_chain {
        if let Some(r) = rules_out.as_deref_mut() {
            r.complete = false;
        }
        declared.add(ext);
        wl!(out, "\tchain {ext} {{");
        match &local_origin {
            None => {
                // eTP Cluster: the endpoint may be on another node, so masquerade.
                wl!(out, "\t\tjump {MARK_MASQ}");
            }
            Some(_) => {
                // Traffic that never left this node is not subject to eTP Local. In a nat
                // chain `reject` is not allowed, so an empty local_origin drops.
                let origin = match origin_chain {
                    Some(i) => format!("goto {}", balancers[i].name),
                    None => "drop".to_owned(),
                };
                if !ctx.cluster_cidrs.is_empty() {
                    wl!(
                        out,
                        "\t\t{ipx} saddr {} {origin} comment \"short-circuit pod traffic\"",
                        NetSet(&ctx.cluster_cidrs)
                    );
                }
                wl!(
                    out,
                    "\t\tfib saddr type local jump {MARK_MASQ} comment \"masquerade local traffic\""
                );
                wl!(
                    out,
                    "\t\tfib saddr type local {origin} comment \"short-circuit local traffic\""
                );
            }
        }
        if let Some(i) = external_policy_chain {
            wl!(out, "\t\tgoto {}", balancers[i].name);
        }
        wl!(out, "\t}}");
    }

    // LoadBalancerSourceRanges (this family's, as kube-proxy filters them).
    let source_ranges = family_nets(family, &svc.load_balancer_source_ranges);
    let firewall_chain = if !svc.load_balancer_ips.is_empty() && !source_ranges.is_empty() {
        let name = names::join(names::FIREWALL_PREFIX, &base)?;
        let allowed = source_ranges;
        if let Some(r) = rules_out {
            r.complete = false;
        }
        declared.add(&name);
        wl!(out, "\tchain {name} {{");
        // Always a set here: `!= { … }` reads the same for one range or many.
        w!(out, "\t\t{ipx} saddr != {{ ");
        for (n, net) in allowed.iter().enumerate() {
            if n > 0 {
                out.push_str(", ");
            }
            w!(out, "{net}");
        }
        wl!(out, " }} drop");
        wl!(out, "\t}}");
        Some(name)
    } else {
        None
    };

    for &i in &used {
        let ep = &svc.endpoints[i];
        let Some((chain, set)) = &ep_chain[i] else {
            continue;
        };
        declared.add(chain);
        wl!(out, "\tchain {chain} {{");
        wl!(out, "\t\tupdate @{set} {{ {ipx} saddr }}");
        wl!(
            out,
            "\t\tmeta l4proto {proto} dnat to {}",
            SockAddr(ep.ip, ep.port)
        );
        wl!(out, "\t}}");
    }

    // Map elements.
    // Every endpoint address (used or not): the set then depends on the endpoint lists
    // alone, which a partial sync can check cheaply.
    elements.hairpin.extend(
        svc.endpoints
            .iter()
            .map(|ep| ep.ip)
            .filter(|ip| IpFamily::of(ip) == family),
    );
    let name = &svc.name;
    let protocol = svc.protocol;
    if let Some(cip) = svc.cluster_ip {
        elements.cluster_ips.insert(cip);
        match internal_chain {
            Some(i) => claim(
                &mut elements.service_ips,
                SERVICE_IPS,
                (cip, protocol, port),
                Verdict::Goto(balancers[i].name.clone()),
                name,
            ),
            None => claim(
                &mut elements.no_endpoint_services,
                NO_ENDPOINT_SERVICES,
                (cip, protocol, port),
                Verdict::empty(svc.internal.if_empty),
                name,
            ),
        }
    }
    let external_empty = external_policy_chain.is_none();
    for &ip in svc.external_ips.iter().chain(&svc.load_balancer_ips) {
        if let Some(ext) = &external_chain {
            claim(
                &mut elements.service_ips,
                SERVICE_IPS,
                (ip, protocol, port),
                Verdict::Goto(ext.clone()),
                name,
            );
        }
        if external_empty {
            // No endpoint for external traffic: what the short-circuits did not take is
            // dropped or rejected by the filter chains.
            claim(
                &mut elements.no_endpoint_services,
                NO_ENDPOINT_SERVICES,
                (ip, protocol, port),
                Verdict::empty(svc.external.if_empty),
                name,
            );
        }
    }
    if let Some(fw) = &firewall_chain {
        for &ip in &svc.load_balancer_ips {
            claim(
                &mut elements.firewall_ips,
                FIREWALL_IPS,
                (ip, protocol, port),
                Verdict::Goto(fw.clone()),
                name,
            );
        }
    }
    if let Some(node_port) = svc.node_port {
        if let Some(ext) = &external_chain {
            claim(
                &mut elements.service_nodeports,
                SERVICE_NODEPORTS,
                (protocol, node_port),
                Verdict::Goto(ext.clone()),
                name,
            );
        }
        if external_empty {
            claim(
                &mut elements.no_endpoint_nodeports,
                NO_ENDPOINT_NODEPORTS,
                (protocol, node_port),
                Verdict::empty(svc.external.if_empty),
                name,
            );
        }
    }
    Ok(())
}

/// A map's name, its old elements and its new ones.
type MapPair<'a, K> = (
    &'static str,
    &'a BTreeMap<K, Verdict>,
    &'a BTreeMap<K, Verdict>,
);

/// A partial transaction (see [`render_partial`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Partial {
    /// The atomic transaction carrying only the changes.
    pub script: String,
    /// Deletes of the chains and sets the transaction left empty and unreferenced. A
    /// second transaction, as kube-proxy does: a chain can only be deleted once nothing
    /// references it, and kernels before 6.2 release a map's reference asynchronously.
    pub stale: String,
    /// The same two transactions as netlink operations, when every changed service port
    /// can be expressed that way (see [`super::netlink`]); `None` otherwise.
    pub netlink: Option<NetlinkPartial>,
}

/// [`Partial`]'s transactions as netlink operations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NetlinkPartial {
    pub ops: Vec<Op>,
    pub stale: Vec<Op>,
}

/// What one service port renders to, alone.
struct ServiceParts {
    text: String,
    elements: Elements,
    names: HashSet<String>,
    rules: ChainRules,
}

fn service_parts(ctx: &FamilyCtx, svc: &ServicePortState) -> Result<ServiceParts, DataplaneError> {
    let mut parts = ServiceParts {
        text: String::new(),
        elements: Elements::default(),
        names: HashSet::new(),
        rules: ChainRules::default(),
    };
    render_service(
        &mut parts.text,
        ctx,
        svc,
        &mut parts.elements,
        &mut Declared(Some(&mut parts.names)),
        Some(&mut parts.rules),
    )?;
    Ok(parts)
}

/// Borrowed map elements.
type ElementRefs<'a, K> = Vec<(&'a K, &'a Verdict)>;

/// Elements of `old` not in `new` (with the same value), and of `new` not in `old`.
fn map_changes<'a, K: Ord>(
    old: &'a BTreeMap<K, Verdict>,
    new: &'a BTreeMap<K, Verdict>,
) -> (ElementRefs<'a, K>, ElementRefs<'a, K>) {
    let gone = old
        .iter()
        .filter(|(k, v)| new.get(*k) != Some(*v))
        .collect();
    let came = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .collect();
    (gone, came)
}

fn nl_verdict(v: &Verdict) -> NlVerdict {
    match v {
        Verdict::Goto(chain) => NlVerdict::Goto(chain.clone()),
        Verdict::Drop => NlVerdict::Drop,
        Verdict::Reject => NlVerdict::Goto(REJECT_CHAIN.to_owned()),
    }
}

fn ip_key((ip, proto, port): &IpKey) -> Key {
    Key::default().ip(ip).proto(*proto).port(*port)
}

fn port_key((proto, port): &PortKey) -> Key {
    Key::default().proto(*proto).port(*port)
}

/// Both forms of one partial transaction, written side by side so they cannot drift.
struct PartialWriter<'a> {
    out: &'a mut String,
    /// `None` once something was met that only the text form expresses.
    ops: Option<Vec<Op>>,
    /// `<family> <table>`.
    t: &'a str,
    family: u8,
}

impl PartialWriter<'_> {
    /// `<verb> element` in both forms; `value` gives a map element's verdict.
    fn elements<T: Copy>(
        &mut self,
        delete: bool,
        set: &'static str,
        items: &[T],
        spell: impl Fn(&mut String, T),
        key: impl Fn(T) -> (Key, Option<NlVerdict>),
    ) {
        element_op(
            self.out,
            if delete { "delete" } else { "add" },
            self.t,
            set,
            items.iter().copied(),
            spell,
        );
        if let Some(ops) = &mut self.ops
            && !items.is_empty()
        {
            ops.push(Op::Elements {
                delete,
                family: self.family,
                set,
                items: items.iter().map(|&i| key(i)).collect(),
            });
        }
    }

    fn flush_chain(&mut self, name: &str) {
        wl!(self.out, "flush chain {} {name}", self.t);
        if let Some(ops) = &mut self.ops {
            ops.push(Op::FlushChain {
                family: self.family,
                chain: name.to_owned(),
            });
        }
    }
}

/// The partial transaction from `prev` (what was last applied) to `next`, or `None` when
/// a family's globals changed (those touch the fixed chains: a full sync rewrites them).
///
/// Per family, only the services of `diff` are rendered, old and new: their map
/// elements are diffed (`delete element` first, so a key whose value changed is
/// replaced), chains both versions declare are flushed and rewritten, new ones are
/// added, and chains only the old version declared are flushed here and deleted, with
/// its affinity sets, by [`Partial::stale`]. Affinity sets both versions use are kept,
/// with their elements (sticky clients stay sticky).
///
/// Limit: a map key claimed by two service ports (an invalid cluster) is resolved as
/// the full render resolves it only at the next full sync.
pub(crate) fn render_partial(
    prev: &DesiredState,
    next: &DesiredState,
    diff: &Diff,
    table: &str,
) -> Result<Option<Partial>, DataplaneError> {
    let mut partial = Partial::default();
    let mut nl = Some(NetlinkPartial::default());
    for family in [IpFamily::V4, IpFamily::V6] {
        let fd = diff.family(family);
        if fd.globals_changed {
            return Ok(None);
        }
        if fd.is_empty() {
            continue;
        }
        let (old_fam, new_fam) = (prev.family(family), next.family(family));
        let (old_ctx, new_ctx) = (family_ctx(old_fam), family_ctx(new_fam));
        let t = &format!("{} {table}", new_ctx.sp.ipx);
        let nl_family = netlink::family_code(family == IpFamily::V6);
        let mut old = Elements::default();
        let mut new = Elements::default();
        let mut old_names = HashSet::new();
        let mut new_names = HashSet::new();
        let mut block = String::new();
        let mut new_chains: Vec<(String, Vec<Rule>)> = Vec::new();
        for name in fd.changed.iter().chain(&fd.removed) {
            if let Some(svc) = old_fam.services.get(name) {
                let parts = service_parts(&old_ctx, svc)?;
                merge(&mut old, parts.elements);
                old_names.extend(parts.names);
            }
        }
        for name in fd.changed.iter().chain(&fd.added) {
            if let Some(svc) = new_fam.services.get(name) {
                let parts = service_parts(&new_ctx, svc)?;
                merge(&mut new, parts.elements);
                new_names.extend(parts.names);
                block.push_str(&parts.text);
                if parts.rules.complete {
                    new_chains.extend(parts.rules.chains);
                } else {
                    nl = None;
                }
            }
        }
        let mut w = PartialWriter {
            out: &mut partial.script,
            ops: nl.as_ref().map(|_| Vec::new()),
            t,
            family: nl_family,
        };
        let ip_elem = |out: &mut String, ((ip, proto, port), v): (&IpKey, &Verdict)| {
            w!(out, "{ip} . {} . {port} : {v}", proto.as_lower())
        };
        let port_elem = |out: &mut String, ((proto, port), v): (&PortKey, &Verdict)| {
            w!(out, "{} . {port} : {v}", proto.as_lower())
        };
        let ip_only = |out: &mut String, ((ip, proto, port), _): (&IpKey, &Verdict)| {
            w!(out, "{ip} . {} . {port}", proto.as_lower())
        };
        let port_only = |out: &mut String, ((proto, port), _): (&PortKey, &Verdict)| {
            w!(out, "{} . {port}", proto.as_lower())
        };
        let ip_nl = |(k, v): (&IpKey, &Verdict)| (ip_key(k), Some(nl_verdict(v)));
        let port_nl = |(k, v): (&PortKey, &Verdict)| (port_key(k), Some(nl_verdict(v)));
        let addr_nl = |ip: &IpAddr| (Key::default().ip(ip), None);
        let hairpin_nl = |ip: &IpAddr| (Key::default().ip(ip).ip(ip), None);
        let ip_maps: [MapPair<'_, IpKey>; 3] = [
            (SERVICE_IPS, &old.service_ips, &new.service_ips),
            (
                NO_ENDPOINT_SERVICES,
                &old.no_endpoint_services,
                &new.no_endpoint_services,
            ),
            (FIREWALL_IPS, &old.firewall_ips, &new.firewall_ips),
        ];
        let port_maps: [MapPair<'_, PortKey>; 2] = [
            (
                SERVICE_NODEPORTS,
                &old.service_nodeports,
                &new.service_nodeports,
            ),
            (
                NO_ENDPOINT_NODEPORTS,
                &old.no_endpoint_nodeports,
                &new.no_endpoint_nodeports,
            ),
        ];
        let mut adds = String::new();
        let mut add = PartialWriter {
            out: &mut adds,
            ops: w.ops.as_ref().map(|_| Vec::new()),
            t,
            family: nl_family,
        };
        for (map, o, n) in ip_maps {
            let (gone, came) = map_changes(o, n);
            w.elements(true, map, &gone, ip_only, ip_nl);
            add.elements(false, map, &came, ip_elem, ip_nl);
        }
        for (map, o, n) in port_maps {
            let (gone, came) = map_changes(o, n);
            w.elements(true, map, &gone, port_only, port_nl);
            add.elements(false, map, &came, port_elem, port_nl);
        }
        // A ClusterIP is shared by the ports of one Service: it leaves the set only
        // when no port of the new state still has it.
        let gone_ips: Vec<&IpAddr> = old
            .cluster_ips
            .difference(&new.cluster_ips)
            .filter(|ip| {
                !new_fam
                    .services
                    .values()
                    .any(|s| s.cluster_ip == Some(**ip))
            })
            .collect();
        w.elements(true, CLUSTER_IPS, &gone_ips, |o, ip| w!(o, "{ip}"), addr_nl);
        let came_ips: Vec<&IpAddr> = new.cluster_ips.difference(&old.cluster_ips).collect();
        add.elements(
            false,
            CLUSTER_IPS,
            &came_ips,
            |o, ip| w!(o, "{ip}"),
            addr_nl,
        );
        // Likewise an endpoint address leaves the hairpin set only when no service
        // port of the new state still has it.
        let mut gone_hairpin: BTreeSet<&IpAddr> = old.hairpin.difference(&new.hairpin).collect();
        if !gone_hairpin.is_empty() {
            // One pass over every endpoint, without allocating (100k at 10k services).
            'scan: for svc in new_fam.services.values() {
                for ep in &svc.endpoints {
                    gone_hairpin.remove(&ep.ip);
                    if gone_hairpin.is_empty() {
                        break 'scan;
                    }
                }
            }
        }
        let gone_hairpin: Vec<&IpAddr> = gone_hairpin.into_iter().collect();
        w.elements(true, HAIRPIN, &gone_hairpin, hairpin_elem, hairpin_nl);
        let came_hairpin: Vec<&IpAddr> = new.hairpin.difference(&old.hairpin).collect();
        add.elements(false, HAIRPIN, &came_hairpin, hairpin_elem, hairpin_nl);
        let add_ops = add.ops;

        let is_set = |name: &str| name.starts_with(names::AFFINITY_PREFIX);
        let mut kept: Vec<&String> = new_names
            .intersection(&old_names)
            .filter(|n| !is_set(n))
            .collect();
        kept.sort();
        for name in kept {
            w.flush_chain(name);
        }
        let mut stale: Vec<&String> = old_names.difference(&new_names).collect();
        stale.sort();
        for name in stale.iter().filter(|n| !is_set(n)) {
            w.flush_chain(name);
        }
        if !block.is_empty() {
            wl!(w.out, "table {t} {{");
            w.out.push_str(&block);
            wl!(w.out, "}}");
        }
        w.out.push_str(&adds);
        // Chains first: a stale endpoint chain is what referenced a stale affinity set.
        for name in stale.iter().filter(|n| !is_set(n)) {
            wl!(partial.stale, "delete chain {t} {name}");
        }
        for name in stale.iter().filter(|n| is_set(n)) {
            wl!(partial.stale, "delete set {t} {name}");
        }

        // The netlink form: the same operations in the same order (the chains of the
        // text block become chain adds and rule appends).
        let mut expressible = true;
        if let (Some(plan), Some(mut ops), Some(add_ops)) = (nl.as_mut(), w.ops, add_ops) {
            'chains: for (chain, rules) in new_chains {
                ops.push(Op::AddChain {
                    family: nl_family,
                    chain: chain.clone(),
                });
                for rule in &rules {
                    let Some(exprs) = rule.exprs() else {
                        expressible = false;
                        break 'chains;
                    };
                    ops.push(Op::AddRule {
                        family: nl_family,
                        chain: chain.clone(),
                        exprs,
                    });
                }
            }
            plan.ops.extend(ops);
            plan.ops.extend(add_ops);
            for name in stale.iter().filter(|n| !is_set(n)) {
                plan.stale.push(Op::DeleteChain {
                    family: nl_family,
                    chain: (*name).clone(),
                });
            }
            for name in stale.iter().filter(|n| is_set(n)) {
                plan.stale.push(Op::DeleteSet {
                    family: nl_family,
                    set: (*name).clone(),
                });
            }
        }
        if !expressible {
            nl = None;
        }
    }
    partial.netlink = nl;
    Ok(Some(partial))
}

fn merge(into: &mut Elements, from: Elements) {
    into.cluster_ips.extend(from.cluster_ips);
    into.hairpin.extend(from.hairpin);
    for (k, v) in from.service_ips {
        into.service_ips.entry(k).or_insert(v);
    }
    for (k, v) in from.no_endpoint_services {
        into.no_endpoint_services.entry(k).or_insert(v);
    }
    for (k, v) in from.firewall_ips {
        into.firewall_ips.entry(k).or_insert(v);
    }
    for (k, v) in from.service_nodeports {
        into.service_nodeports.entry(k).or_insert(v);
    }
    for (k, v) in from.no_endpoint_nodeports {
        into.no_endpoint_nodeports.entry(k).or_insert(v);
    }
}
