//! The fixed frame of the table: base chains (hooks) and their dispatch jumps, the
//! shared sets and dispatch maps, and the `services` chain that looks up a packet's
//! destination in them.

use svcplane_model::{IpFamily, Protocol};

use super::super::netlink::{self, Op};
use super::super::rule::{Action, Chain, Hook, Rule, SetDecl, SetKind};
use super::elements::endpoint_maps;
use super::{
    CLUSTER_IPS, CLUSTER_IPS_CHECK, FIREWALL_CHECK, FIREWALL_IPS, HAIRPIN, MASQUERADING,
    NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES, NODEPORT_ENDPOINTS_CHECK, NODEPORT_IPS,
    SERVICE_ENDPOINTS_CHECK, SERVICE_IPS, SERVICE_NODEPORTS, SERVICES, select,
};

/// Every protocol a service port can have (each has its own endpoints map).
pub(super) const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

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

    /// This layout's base chains, with their rules.
    pub(crate) fn base_chains(self) -> impl Iterator<Item = Chain> {
        BASE_CHAINS
            .iter()
            .filter(move |bc| self.output || bc.hook.hook != "output")
            .map(|bc| Chain {
                name: bc.name.to_owned(),
                hook: Some(bc.hook),
                rules: bc
                    .jumps
                    .iter()
                    .map(|&(ct_new, target)| Rule::Always {
                        ct_new,
                        action: Action::Jump(target.to_owned()),
                    })
                    .collect(),
            })
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

/// A base chain: name, hook, and its jumps (`ct state new` first when the flag is set).
struct BaseChain {
    name: &'static str,
    hook: Hook,
    jumps: &'static [(bool, &'static str)],
}

const fn hook(kind: &'static str, hook: &'static str, priority: i32) -> Hook {
    Hook {
        kind,
        hook,
        priority,
    }
}

/// kube-proxy's layout since kubernetes#132456 (1.34, cherry-picked to 1.33): only the source-range
/// firewall looks at the destination before DNAT; the endpoint checks run at filter
/// priority, after DNAT. So a connection that an external chain's short-circuit DNATed
/// (pod or node traffic to an eTP Local service without local endpoints) no longer
/// meets the no-endpoint DROP meant for external traffic, while what nothing DNATed
/// still has its original destination there and is dropped or rejected. Priorities are
/// kube-proxy's `dstnat-10`, `dstnat`, `filter`, `srcnat`.
const BASE_CHAINS: &[BaseChain] = &[
    BaseChain {
        name: "filter-prerouting-pre-dnat",
        hook: hook("filter", "prerouting", -110),
        jumps: &[(true, FIREWALL_CHECK)],
    },
    BaseChain {
        name: "filter-output-pre-dnat",
        hook: hook("filter", "output", -110),
        jumps: &[(true, FIREWALL_CHECK)],
    },
    BaseChain {
        name: "filter-input",
        hook: hook("filter", "input", 0),
        jumps: &[
            (true, NODEPORT_ENDPOINTS_CHECK),
            (true, SERVICE_ENDPOINTS_CHECK),
        ],
    },
    BaseChain {
        name: "filter-forward",
        hook: hook("filter", "forward", 0),
        jumps: &[(true, SERVICE_ENDPOINTS_CHECK), (true, CLUSTER_IPS_CHECK)],
    },
    BaseChain {
        name: "filter-output",
        hook: hook("filter", "output", 0),
        jumps: &[(true, SERVICE_ENDPOINTS_CHECK), (true, CLUSTER_IPS_CHECK)],
    },
    BaseChain {
        name: "nat-prerouting",
        hook: hook("nat", "prerouting", -100),
        jumps: &[(false, SERVICES)],
    },
    BaseChain {
        name: "nat-output",
        hook: hook("nat", "output", -100),
        jumps: &[(false, SERVICES)],
    },
    BaseChain {
        name: "nat-postrouting",
        hook: hook("nat", "postrouting", 100),
        jumps: &[(false, MASQUERADING)],
    },
];

/// A shared set or map: declared and flushed by every full sync, or (`absent`) declared
/// and deleted, so it is gone whether or not it existed.
pub(crate) struct Shared {
    pub decl: SetDecl,
    pub absent: bool,
}

fn decl(name: &str, kind: SetKind, flags: Option<&'static str>, comment: &'static str) -> SetDecl {
    SetDecl {
        name: name.to_owned(),
        kind,
        flags,
        timeout_seconds: None,
        comment: Some(comment),
    }
}

/// The shared sets and maps, in declaration order.
pub(crate) fn shared_sets(family: IpFamily, all_local: bool) -> Vec<Shared> {
    let kept = |decl| Shared {
        decl,
        absent: false,
    };
    let ip_map = SetKind::AddrProtoPortVerdicts(family);
    let port_map = SetKind::ProtoPortVerdicts;
    let mut out = vec![
        kept(decl(
            CLUSTER_IPS,
            SetKind::Addrs(family),
            None,
            "Active ClusterIPs",
        )),
        // kube-proxy: with AllLocal the nodeport-ips set must not exist.
        Shared {
            decl: decl(
                NODEPORT_IPS,
                SetKind::Addrs(family),
                Some("interval"),
                "IPs that accept NodePort traffic",
            ),
            absent: all_local,
        },
        kept(decl(
            HAIRPIN,
            SetKind::AddrPairs(family),
            None,
            "endpoint . itself, for hairpin masquerade",
        )),
        kept(decl(
            NO_ENDPOINT_SERVICES,
            ip_map,
            None,
            "vmap to drop or reject packets to services with no endpoints",
        )),
        kept(decl(
            NO_ENDPOINT_NODEPORTS,
            port_map,
            None,
            "vmap to drop or reject packets to service nodeports with no endpoints",
        )),
        kept(decl(
            FIREWALL_IPS,
            ip_map,
            None,
            "destinations that are subject to LoadBalancerSourceRanges",
        )),
        kept(decl(
            SERVICE_IPS,
            ip_map,
            None,
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        )),
        kept(decl(SERVICE_NODEPORTS, port_map, None, "NodePort traffic")),
    ];
    out.extend(endpoint_maps().map(|(k, protocol)| {
        kept(decl(
            select::endpoints_map(k, protocol),
            SetKind::Endpoints {
                family,
                protocol,
                with_addr: k.with_addr(),
            },
            None,
            if k.with_addr() {
                "service IP . port . bucket : endpoint"
            } else {
                "node port . bucket : endpoint"
            },
        ))
    }));
    out
}

/// `services`: a packet's destination looked up in the dispatch maps. NodePorts: any
/// local address but loopback (kube-proxy does not support localhost NodePorts), or
/// only the local addresses within --nodeport-addresses.
pub(crate) fn services_chain(family: IpFamily, all_local: bool) -> Chain {
    Chain::new(
        SERVICES,
        vec![
            Rule::AddrPortVmap {
                family,
                map: SERVICE_IPS,
            },
            Rule::NodePortVmap {
                family,
                daddr_in: (!all_local).then_some(NODEPORT_IPS),
                fib_local: true,
                not_loopback: true,
                map: SERVICE_NODEPORTS,
            },
        ],
    )
}
