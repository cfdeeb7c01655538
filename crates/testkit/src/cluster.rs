//! A virtual cluster made of network namespaces, for tests that need real traffic.
//!
//! Layout (every box is a network namespace owned by the [`Cluster`]):
//!
//! ```text
//!                       fabric: bridge br0 (no addresses)
//!          ┌──────────────────┼──────────────────┬─────────────────┐
//!   node-a eth0 10.0.0.11/24  node-b eth0 10.0.0.12/24 ...   client eth0 10.0.0.100/24
//!          fd00:10::11/64            fd00:10::12/64                  fd00:10::100/64
//!     ├─ p0 ── pod eth0 10.244.1.10/32, fd00:244:0:1::10/128            + extra addresses
//!     └─ p1 ── pod eth0 10.244.1.11/32, ...                             (e.g. 203.0.113.10)
//! ```
//!
//! - The bridge lives in its own "fabric" namespace rather than in the first node, so
//!   every node is symmetrical and a proxy's rules on one node never see bridge traffic
//!   of the others.
//! - Node `i` (0-based, in the order added) has 10.0.0.(11+i) and fd00:10::(11+i) on
//!   the bridge, pod CIDRs 10.244.(i+1).0/24 and fd00:244:0:(i+1)::/64 (both inside
//!   [`CLUSTER_CIDR`]; note fd00:244:1::/64 would not be inside fd00:244::/48), forwarding
//!   enabled, and routes to every other node's pod CIDRs via that node.
//! - A pod is a namespace joined to its node by a veth pair: /32 and /128 routes on the
//!   node, default routes in the pod via the node (IPv4 via the node's bridge address
//!   `onlink`, IPv6 via fe80::1 on the node's side of the veth).
//! - The external client sits on the bridge and is every node's default gateway (it
//!   does not forward); its extra addresses are routed to it from every node, and it reaches the service CIDRs ([`SERVICE_CIDRS`]) through the
//!   gateway node (the first node unless [`ClusterBuilder::client_gateway`] says
//!   otherwise).
//!
//! Naming: namespace names carry the pid and a per-process counter ([`Netns::new`]).
//! Interfaces are only ever created inside the cluster's own namespaces (never in the
//! host's, not even transiently: veth peers are created directly in their target
//! namespace), so their short fixed names (`br0`, `n0`, `cl`, `p0`, `eth0`) cannot
//! collide between tests running in parallel. Everything is torn down on drop, even
//! when a test panics.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::net::{self, EchoReply, EchoServer, RequestError};
use crate::{Daemon, Netns, run_checked, wait_until};

/// The cluster CIDRs every virtual cluster uses (pass to `--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16,fd00:244::/48";
/// Service CIDRs the client routes through its gateway node.
pub const SERVICE_CIDRS: [&str; 2] = ["10.96.0.0/12", "fd00:96::/64"];
/// The external client's own addresses on the bridge.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// See [`CLIENT_V4`].
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x100);

/// How long [`Cluster::run_proxy`] waits for the proxy to become ready (see
/// [`Cluster::run_proxy_logged_within`] for more).
const PROXY_READY_WAIT: Duration = Duration::from_secs(30);

/// A pod to create: name, node, labels, and the ports its echo server listens on.
#[derive(Debug, Clone)]
pub struct PodSpec {
    name: String,
    node: String,
    labels: BTreeMap<String, String>,
    tcp_ports: Vec<u16>,
    udp_ports: Vec<u16>,
    ready: bool,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

impl PodSpec {
    /// A ready pod on `node`, with no labels and no ports yet.
    pub fn new(name: &str, node: &str) -> PodSpec {
        PodSpec {
            name: name.to_string(),
            node: node.to_string(),
            labels: BTreeMap::new(),
            tcp_ports: Vec::new(),
            udp_ports: Vec::new(),
            ready: true,
            v4: None,
            v6: None,
        }
    }

    /// Use this IPv4 address instead of the next one of the node's pod CIDR (e.g. to
    /// match addresses already written in manifests). Other nodes get a host route to it.
    pub fn ipv4(mut self, ip: Ipv4Addr) -> PodSpec {
        self.v4 = Some(ip);
        self
    }

    /// Use this IPv6 address; see [`PodSpec::ipv4`].
    pub fn ipv6(mut self, ip: Ipv6Addr) -> PodSpec {
        self.v6 = Some(ip);
        self
    }

    /// Add a label (Services select pods by these in the written manifests).
    pub fn label(mut self, key: &str, value: &str) -> PodSpec {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// TCP ports the pod's echo server listens on (also written as containerPorts).
    pub fn tcp(mut self, ports: &[u16]) -> PodSpec {
        self.tcp_ports.extend_from_slice(ports);
        self
    }

    /// UDP ports the pod's echo server listens on (also written as containerPorts).
    pub fn udp(mut self, ports: &[u16]) -> PodSpec {
        self.udp_ports.extend_from_slice(ports);
        self
    }

    /// The pod's Ready condition in the written manifests (default true). The echo
    /// server runs either way.
    pub fn ready(mut self, ready: bool) -> PodSpec {
        self.ready = ready;
        self
    }
}

/// Builds a [`Cluster`]; see the module docs for the layout.
#[derive(Debug, Default)]
pub struct ClusterBuilder {
    nodes: Vec<(String, String)>,
    pods: Vec<PodSpec>,
    client_extra: Vec<IpAddr>,
    gateway: Option<String>,
}

impl ClusterBuilder {
    /// Add a node with its name and `topology.kubernetes.io/zone`.
    pub fn node(mut self, name: &str, zone: &str) -> ClusterBuilder {
        self.nodes.push((name.to_string(), zone.to_string()));
        self
    }

    /// Add a pod (its node must be added too).
    pub fn pod(mut self, pod: PodSpec) -> ClusterBuilder {
        self.pods.push(pod);
        self
    }

    /// Give the external client an extra address (e.g. 203.0.113.10 for source-range
    /// tests), routed to the client from every node. Use it with `src` in
    /// [`Cluster::tcp_request_from`].
    pub fn client_address(mut self, ip: IpAddr) -> ClusterBuilder {
        self.client_extra.push(ip);
        self
    }

    /// The node through which the client reaches the service CIDRs (default: the first).
    pub fn client_gateway(mut self, node: &str) -> ClusterBuilder {
        self.gateway = Some(node.to_string());
        self
    }

    /// The cluster's names and addresses as [`ClusterBuilder::build`] would assign them,
    /// without creating anything (no root needed): for checks that only need the
    /// manifests, e.g. `svcplane trace` on the same objects a live cluster's proxy reads.
    pub fn plan(&self) -> io::Result<ClusterPlan> {
        let mut plan = ClusterPlan {
            nodes: self
                .nodes
                .iter()
                .enumerate()
                .map(|(i, (name, zone))| {
                    let (v4, v6) = node_addresses(i);
                    PlannedNode {
                        name: name.clone(),
                        zone: zone.clone(),
                        v4,
                        v6,
                    }
                })
                .collect(),
            pods: Vec::new(),
        };
        for spec in &self.pods {
            plan.add_pod(spec.clone())?;
        }
        Ok(plan)
    }

    /// Create every namespace, link, address and route, and start the echo servers.
    /// On error, whatever was created is torn down again.
    pub fn build(self) -> io::Result<Cluster> {
        if self.nodes.is_empty() || self.nodes.len() > 200 {
            return Err(io::Error::other("a cluster needs 1..=200 nodes"));
        }
        let fabric = cluster_netns("svk-fabric")?;
        ip(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        // No multicast snooping: IPv6 neighbour discovery must flood without a querier.
        ip(
            &fabric,
            &[
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        ip(&fabric, &["link", "set", "br0", "up"])?;
        let mut cluster = Cluster {
            echo: Vec::new(),
            pods: Vec::new(),
            nodes: Vec::new(),
            client: Client {
                netns: cluster_netns("svk-client")?,
                extra: self.client_extra.clone(),
            },
            fabric,
        };

        for (i, (name, zone)) in self.nodes.iter().enumerate() {
            if cluster.nodes.iter().any(|n| &n.name == name) {
                return Err(io::Error::other(format!("node {name} added twice")));
            }
            let netns = cluster_netns(&format!("svk-{name}"))?;
            let (v4, v6) = node_addresses(i);
            let node = Node {
                name: name.clone(),
                zone: zone.clone(),
                index: i,
                v4,
                v6,
                netns,
                pods: 0,
            };
            attach(&cluster.fabric, &format!("n{i}"), &node.netns)?;
            ip(
                &node.netns,
                &["addr", "add", &format!("{}/24", node.v4), "dev", "eth0"],
            )?;
            ip(
                &node.netns,
                &[
                    "addr",
                    "add",
                    &format!("{}/64", node.v6),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            ip(&node.netns, &["link", "set", "eth0", "up"])?;
            run_checked(&mut node.netns.command(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                    // A node forwarding a packet back out eth0 (e.g. the client's
                    // packet to a ClusterIP without endpoints, routed to the default
                    // gateway) would send an ICMP redirect first, which uses up the
                    // per-host ICMP rate limit and suppresses the REJECT's
                    // unreachable. Routers in real clusters commonly disable them too.
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.default.send_redirects=0",
                    "net.ipv4.conf.eth0.send_redirects=0",
                ],
            ))?;
            cluster.nodes.push(node);
        }

        // Every node reaches the others' pods via those nodes, and the client's extra
        // addresses via the client.
        for node in &cluster.nodes {
            for other in cluster.nodes.iter().filter(|o| o.index != node.index) {
                let (v4, v6) = other.pod_cidrs();
                ip(
                    &node.netns,
                    &["route", "add", &v4, "via", &other.v4.to_string()],
                )?;
                ip(
                    &node.netns,
                    &["-6", "route", "add", &v6, "via", &other.v6.to_string()],
                )?;
            }
            // Real nodes have a default route; without one a packet to an unprogrammed
            // ClusterIP fails routing before any filter rule sees it. The client is
            // the "outside world" gateway; it does not forward, so nothing loops.
            ip(
                &node.netns,
                &["route", "add", "default", "via", &CLIENT_V4.to_string()],
            )?;
            ip(
                &node.netns,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &CLIENT_V6.to_string(),
                ],
            )?;
            for extra in &self.client_extra {
                let (via, len) = match extra {
                    IpAddr::V4(_) => (IpAddr::V4(CLIENT_V4), 32),
                    IpAddr::V6(_) => (IpAddr::V6(CLIENT_V6), 128),
                };
                ip(
                    &node.netns,
                    &[
                        "route",
                        "add",
                        &format!("{extra}/{len}"),
                        "via",
                        &via.to_string(),
                    ],
                )?;
            }
        }

        let client = &cluster.client.netns;
        attach(&cluster.fabric, "cl", client)?;
        ip(
            client,
            &["addr", "add", &format!("{CLIENT_V4}/24"), "dev", "eth0"],
        )?;
        ip(
            client,
            &[
                "addr",
                "add",
                &format!("{CLIENT_V6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        for extra in &self.client_extra {
            let len = if extra.is_ipv4() { 32 } else { 128 };
            ip(
                client,
                &[
                    "addr",
                    "add",
                    &format!("{extra}/{len}"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
        }
        ip(client, &["link", "set", "eth0", "up"])?;
        let gateway = match &self.gateway {
            Some(name) => cluster.node(name)?,
            None => &cluster.nodes[0],
        };
        for cidr in SERVICE_CIDRS {
            let via = if cidr.contains(':') {
                gateway.v6.to_string()
            } else {
                gateway.v4.to_string()
            };
            ip(client, &["route", "add", cidr, "via", &via])?;
        }

        for spec in self.pods {
            cluster.add_pod(spec)?;
        }
        Ok(cluster)
    }
}

/// A namespace of the cluster, with IPv6 duplicate address detection off for every
/// interface created in it afterwards. Otherwise each new veth's link-local address stays
/// tentative for about a second, and a pod's first IPv6 packet waits that long for the
/// neighbour discovery of its gateway (fe80::1); the addresses here are unique anyway.
fn cluster_netns(name: &str) -> io::Result<Netns> {
    let ns = Netns::new(name)?;
    net::in_netns(ns.name(), || -> io::Result<()> {
        // /proc/sys/net is the calling thread's namespace's.
        for scope in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{scope}/accept_dad"), "0")?;
        }
        Ok(())
    })??;
    Ok(ns)
}

/// Run `ip ARGS` inside `ns`.
fn ip(ns: &Netns, args: &[&str]) -> io::Result<()> {
    run_checked(Command::new("ip").args(["-n", ns.name()]).args(args)).map(|_| ())
}

/// A veth pair: `port` in `from` (up; a bridge port when `from` is the fabric), and
/// `eth0` created directly in `to`.
fn attach(from: &Netns, port: &str, to: &Netns) -> io::Result<()> {
    ip(
        from,
        &[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            to.name(),
        ],
    )?;
    if from.name().starts_with("svk-fabric") {
        ip(from, &["link", "set", port, "master", "br0"])?;
    }
    ip(from, &["link", "set", port, "up"])
}

/// A virtual node.
#[derive(Debug)]
pub struct Node {
    name: String,
    zone: String,
    index: usize,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    netns: Netns,
    pods: usize,
}

impl Node {
    /// The node's name (its Node object's `metadata.name`, `--hostname-override`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its zone label.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// Its IPv4 address on the bridge.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.v4
    }

    /// Its IPv6 address on the bridge.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.v6
    }

    /// Its pod CIDRs (IPv4, IPv6).
    pub fn pod_cidrs(&self) -> (String, String) {
        let n = self.index + 1;
        (format!("10.244.{n}.0/24"), format!("fd00:244:0:{n}::/64"))
    }

    /// Its namespace (run commands in it with [`Netns::command`]).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
}

/// A virtual pod.
#[derive(Debug)]
pub struct Pod {
    spec: PodSpec,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    netns: Netns,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The node it runs on.
    pub fn node(&self) -> &str {
        &self.spec.node
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.v4
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.v6
    }

    /// Its namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
}

/// The external client on the bridge.
#[derive(Debug)]
pub struct Client {
    netns: Netns,
    extra: Vec<IpAddr>,
}

impl Client {
    /// Its namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The extra addresses given with [`ClusterBuilder::client_address`].
    pub fn extra_addresses(&self) -> &[IpAddr] {
        &self.extra
    }
}

impl AsRef<Netns> for Node {
    fn as_ref(&self) -> &Netns {
        &self.netns
    }
}

impl AsRef<Netns> for Pod {
    fn as_ref(&self) -> &Netns {
        &self.netns
    }
}

impl AsRef<Netns> for Client {
    fn as_ref(&self) -> &Netns {
        &self.netns
    }
}

impl AsRef<Netns> for Netns {
    fn as_ref(&self) -> &Netns {
        self
    }
}

/// A virtual cluster; see the module docs. Dropping it stops the echo servers and
/// deletes every namespace (which deletes every interface and route in them).
#[derive(Debug)]
pub struct Cluster {
    // Field order is drop order: servers stop before their namespaces go away.
    echo: Vec<EchoServer>,
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    client: Client,
    fabric: Netns,
}

impl Cluster {
    /// Start describing a cluster.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> io::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| io::Error::other(format!("no node {name} in the cluster")))
    }

    /// A pod by name.
    pub fn pod(&self, name: &str) -> io::Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .ok_or_else(|| io::Error::other(format!("no pod {name} in the cluster")))
    }

    /// Every node, in the order added.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Every pod, in the order added.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The external client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The namespace holding the bridge.
    pub fn fabric(&self) -> &Netns {
        &self.fabric
    }

    /// Add a pod to a running cluster (the builder uses this too) and start its echo
    /// server. Pod `j` on node `i` gets 10.244.(i+1).(10+j) and fd00:244:0:(i+1)::(10+j).
    pub fn add_pod(&mut self, spec: PodSpec) -> io::Result<&Pod> {
        if self.pods.iter().any(|p| p.spec.name == spec.name) {
            return Err(io::Error::other(format!("pod {} added twice", spec.name)));
        }
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == spec.node)
            .ok_or_else(|| io::Error::other(format!("pod {}: no node {}", spec.name, spec.node)))?;
        let j = node.pods;
        if j > 200 {
            return Err(io::Error::other("at most 200 pods per node"));
        }
        let (v4, v6) = pod_addresses(node.index, j, &spec);
        if let Some(other) = self.pods.iter().find(|p| p.v4 == v4 || p.v6 == v6) {
            return Err(io::Error::other(format!(
                "pod {}: address {v4} or {v6} already used by pod {}",
                spec.name, other.spec.name
            )));
        }
        node.pods += 1;
        let node_v4 = node.v4;
        let node_v6 = node.v6;
        let node_index = node.index;
        let netns = cluster_netns(&format!("svk-{}", spec.name))?;
        let port = format!("p{j}");
        attach(&node.netns, &port, &netns)?;
        ip(
            &node.netns,
            &["addr", "add", "fe80::1/64", "dev", &port, "nodad"],
        )?;
        ip(
            &node.netns,
            &["route", "add", &format!("{v4}/32"), "dev", &port],
        )?;
        ip(
            &node.netns,
            &["-6", "route", "add", &format!("{v6}/128"), "dev", &port],
        )?;
        ip(&netns, &["addr", "add", &format!("{v4}/32"), "dev", "eth0"])?;
        ip(
            &netns,
            &["addr", "add", &format!("{v6}/128"), "dev", "eth0", "nodad"],
        )?;
        ip(&netns, &["link", "set", "eth0", "up"])?;
        let gw = node_v4.to_string();
        ip(
            &netns,
            &[
                "route", "add", "default", "via", &gw, "dev", "eth0", "onlink",
            ],
        )?;
        ip(
            &netns,
            &[
                "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ],
        )?;
        // The other nodes route the node's pod CIDRs to it; an explicit address outside
        // them needs its own route there.
        for other in self.nodes.iter().filter(|n| n.index != node_index) {
            if spec.v4.is_some() {
                ip(
                    &other.netns,
                    &[
                        "route",
                        "replace",
                        &format!("{v4}/32"),
                        "via",
                        &node_v4.to_string(),
                    ],
                )?;
            }
            if spec.v6.is_some() {
                ip(
                    &other.netns,
                    &[
                        "-6",
                        "route",
                        "replace",
                        &format!("{v6}/128"),
                        "via",
                        &node_v6.to_string(),
                    ],
                )?;
            }
        }
        let addrs = [IpAddr::V4(v4), IpAddr::V6(v6)];
        let echo = EchoServer::start(netns.name(), &addrs, &spec.tcp_ports, &spec.udp_ports)?;
        self.echo.push(echo);
        self.pods.push(Pod {
            spec,
            v4,
            v6,
            netns,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Route `cidr` (e.g. a LoadBalancer or external IP) from the client via `node`, as
    /// an upstream router would. The service CIDRs are routed at build time.
    pub fn route_client_via(&self, cidr: &str, node: &str) -> io::Result<()> {
        let node = self.node(node)?;
        let via = if cidr.contains(':') {
            node.v6.to_string()
        } else {
            node.v4.to_string()
        };
        ip(&self.client.netns, &["route", "replace", cidr, "via", &via])
    }

    /// TCP request from inside `from` (a node, pod, the client, or any [`Netns`]);
    /// returns the echo reply text or a classified error.
    pub fn tcp_request(
        &self,
        from: &impl AsRef<Netns>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<String, RequestError> {
        net::tcp_request(from.as_ref().name(), None, dst, timeout)
    }

    /// [`Cluster::tcp_request`] from a chosen source address (one of `from`'s).
    pub fn tcp_request_from(
        &self,
        from: &impl AsRef<Netns>,
        src: IpAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<String, RequestError> {
        net::tcp_request(from.as_ref().name(), Some(src), dst, timeout)
    }

    /// UDP request (one datagram, one reply) from inside `from`.
    pub fn udp_request(
        &self,
        from: &impl AsRef<Netns>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<String, RequestError> {
        net::udp_request(from.as_ref().name(), None, dst, timeout)
    }

    /// [`Cluster::udp_request`] from a chosen source address.
    pub fn udp_request_from(
        &self,
        from: &impl AsRef<Netns>,
        src: IpAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<String, RequestError> {
        net::udp_request(from.as_ref().name(), Some(src), dst, timeout)
    }

    /// [`Cluster::udp_request`] from a fixed source port (any of `from`'s addresses): the
    /// same 5-tuple on every call.
    pub fn udp_request_from_port(
        &self,
        from: &impl AsRef<Netns>,
        src_port: u16,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<String, RequestError> {
        let any = match dst {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        net::udp_request_bound(
            from.as_ref().name(),
            SocketAddr::new(any, src_port),
            dst,
            timeout,
        )
    }

    /// Write the cluster's Nodes (`nodes.yaml`: InternalIPs, zone label) and Pods
    /// (`pods.yaml`: labels, nodeName, podIPs, containerPorts, Ready) into a new
    /// temporary manifests directory. Add Services and EndpointSlices with
    /// [`Manifests::write`].
    pub fn manifests(&self) -> io::Result<Manifests> {
        let dir = tempfile::Builder::new().prefix("svk-manifests").tempdir()?;
        let manifests = Manifests { dir };
        manifests.write("nodes.yaml", &self.nodes_yaml())?;
        manifests.write("pods.yaml", &self.pods_yaml())?;
        Ok(manifests)
    }

    fn nodes_yaml(&self) -> String {
        nodes_yaml(
            self.nodes
                .iter()
                .map(|n| (n.name.as_str(), n.zone.as_str(), n.v4, n.v6)),
        )
    }

    fn pods_yaml(&self) -> String {
        pods_yaml(self.pods.iter().map(|p| (&p.spec, p.v4, p.v6)))
    }

    /// Spawn `svcplane proxy` (the binary at `bin`, e.g. `env!("CARGO_BIN_EXE_svcplane")`)
    /// inside `node`'s namespace with `--hostname-override <node>`, the cluster CIDR,
    /// `--proxy-mode nftables`, `--min-sync-period 0s` and `--manifests <dir>` (each
    /// default left out when `extra_args` gives that flag; `--manifests` also when it
    /// gives `--kubeconfig` or `--master`), then `extra_args`. Returns
    /// once the proxy is ready (see [`ProxyHandle::is_ready`]). Its output goes to the
    /// test's (see [`Cluster::run_proxy_logged`] to keep it in a file instead).
    pub fn run_proxy(
        &self,
        bin: impl AsRef<OsStr>,
        node: &str,
        manifests: &Path,
        extra_args: &[&str],
    ) -> io::Result<ProxyHandle> {
        self.launch_proxy(bin, node, manifests, extra_args, &ProxyLaunch::default())
    }

    /// [`Cluster::run_proxy`] with the proxy's stdout and stderr written to the file `log`
    /// (created or truncated), e.g. to show what it reported.
    pub fn run_proxy_logged(
        &self,
        bin: impl AsRef<OsStr>,
        node: &str,
        manifests: &Path,
        extra_args: &[&str],
        log: &Path,
    ) -> io::Result<ProxyHandle> {
        let launch = ProxyLaunch {
            log: Some(log.to_path_buf()),
            ..ProxyLaunch::default()
        };
        self.launch_proxy(bin, node, manifests, extra_args, &launch)
    }

    /// [`Cluster::run_proxy`] as `launch` says: logged to a file, with extra environment
    /// variables, and/or returning without waiting until it is ready.
    pub fn launch_proxy(
        &self,
        bin: impl AsRef<OsStr>,
        node: &str,
        manifests: &Path,
        extra_args: &[&str],
        launch: &ProxyLaunch,
    ) -> io::Result<ProxyHandle> {
        let bin = bin.as_ref();
        let node_ns = self.node(node)?.netns();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", node_ns.name()])
            .arg(bin)
            .arg("proxy");
        let defaults: [(&str, &OsStr); 5] = [
            ("--proxy-mode", OsStr::new("nftables")),
            ("--hostname-override", OsStr::new(node)),
            ("--cluster-cidr", OsStr::new(CLUSTER_CIDR)),
            ("--min-sync-period", OsStr::new("0s")),
            ("--manifests", manifests.as_os_str()),
        ];
        // The API source replaces the manifests directory (the flags are exclusive).
        let api_source = ["--kubeconfig", "--master"]
            .iter()
            .any(|f| flag_value(extra_args, f).is_some());
        for (flag, value) in defaults {
            if flag == "--manifests" && api_source {
                continue;
            }
            if flag_value(extra_args, flag).is_none() {
                cmd.arg(flag).arg(value);
            }
        }
        cmd.args(extra_args);
        // `ip netns exec` passes the environment on.
        cmd.envs(launch.env.iter().map(|(k, v)| (k, v)));
        if let Some(log) = &launch.log {
            let file = std::fs::File::create(log)?;
            cmd.stdout(file.try_clone()?).stderr(file);
        }
        let mut handle = ProxyHandle {
            daemon: Daemon::spawn(cmd)?,
            netns: node_ns.name().to_string(),
            node: node.to_string(),
            healthz: server_address(extra_args, "--healthz-bind-address", DEFAULT_HEALTHZ)?,
            metrics: server_address(extra_args, "--metrics-bind-address", DEFAULT_METRICS)?,
        };
        if launch.no_wait {
            return Ok(handle);
        }
        let mut exited = false;
        let ready_wait = launch.ready_wait.unwrap_or(PROXY_READY_WAIT);
        let ready = wait_until(ready_wait, || {
            exited = !handle.daemon.is_running();
            exited || handle.is_ready()
        });
        if exited {
            return Err(io::Error::other(format!(
                "svcplane proxy on {node} exited before it was ready"
            )));
        }
        if !ready {
            return Err(io::Error::other(format!(
                "svcplane proxy on {node} not ready after {ready_wait:?}"
            )));
        }
        Ok(handle)
    }
}

/// The value of `flag` in `args`, given as `FLAG VALUE` or `FLAG=VALUE`.
fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == flag {
            args.get(i + 1).copied()
        } else {
            a.strip_prefix(flag)?.strip_prefix('=')
        }
    })
}

/// Where to reach, from inside the node, the server a `--*-bind-address` flag (or its
/// default) configures: the bound address itself, or loopback when it binds every address.
fn server_address(args: &[&str], flag: &str, default: &str) -> io::Result<Option<SocketAddr>> {
    let value = flag_value(args, flag).unwrap_or(default);
    let bind: SocketAddr = value
        .parse()
        .map_err(|e| io::Error::other(format!("{flag} {value:?}: {e}")))?;
    if bind.port() == 0 {
        // An ephemeral port: unknown from here.
        return Ok(None);
    }
    let ip = match bind.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(Some(SocketAddr::new(ip, bind.port())))
}

/// How [`Cluster::launch_proxy`] starts `svcplane proxy`, beyond its arguments.
#[derive(Debug, Clone, Default)]
pub struct ProxyLaunch {
    /// Write its stdout and stderr to this file (created or truncated) instead of the
    /// test's output.
    pub log: Option<std::path::PathBuf>,
    /// Extra environment variables, e.g. the `KUBERNETES_SERVICE_HOST` every Pod gets.
    pub env: Vec<(String, String)>,
    /// Return as soon as it is started instead of waiting until it is ready (for a
    /// proxy expected to stay unready).
    pub no_wait: bool,
    /// How long to wait until it is ready (default 30 s): a first sync of tens of
    /// thousands of services takes longer.
    pub ready_wait: Option<Duration>,
}

/// A running `svcplane proxy` in a node namespace; killed on drop.
#[derive(Debug)]
pub struct ProxyHandle {
    daemon: Daemon,
    netns: String,
    node: String,
    /// Where its `/healthz` server answers inside the namespace (`None`: unknown port).
    healthz: Option<SocketAddr>,
    /// Where its `/metrics` server answers inside the namespace (`None`: unknown port).
    metrics: Option<SocketAddr>,
}

/// `svcplane proxy`'s default `--healthz-bind-address` (kube-proxy's).
const DEFAULT_HEALTHZ: &str = "0.0.0.0:10256";
/// `svcplane proxy`'s default `--metrics-bind-address` (kube-proxy's).
const DEFAULT_METRICS: &str = "127.0.0.1:10249";

impl ProxyHandle {
    /// The node it runs as.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The namespace it runs in (its node's).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `GET path` on its healthz server (`/healthz`, `/livez`): status and body.
    pub fn get(&self, path: &str) -> io::Result<(u16, String)> {
        let addr = self
            .healthz
            .ok_or_else(|| io::Error::other("the healthz port is not known (bound to port 0)"))?;
        net::http_get(&self.netns, addr, path, Duration::from_secs(2))
    }

    /// Where its metrics server answers from inside its namespace.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// `GET /metrics` on its metrics server: the exposition text (an error unless 200).
    pub fn metrics(&self) -> io::Result<String> {
        let addr = self
            .metrics
            .ok_or_else(|| io::Error::other("the metrics port is not known (bound to port 0)"))?;
        match net::http_get(&self.netns, addr, "/metrics", Duration::from_secs(2))? {
            (200, body) => Ok(body),
            (status, body) => Err(io::Error::other(format!("GET /metrics: {status}: {body}"))),
        }
    }

    /// Readiness: `/healthz` answers 200 (the first sync was applied and syncs are
    /// current); when its port is unknown, svcplane's `ip svcplane` table exists.
    pub fn is_ready(&self) -> bool {
        if self.healthz.is_some() {
            return self.get("/healthz").is_ok_and(|(status, _)| status == 200);
        }
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "nft",
                "list",
                "table",
                "ip",
                "svcplane",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }

    /// The proxy's process id (`ip netns exec` execs the proxy in its own place).
    pub fn pid(&self) -> Option<u32> {
        self.daemon.id()
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(self) -> io::Result<std::process::ExitStatus> {
        self.daemon.terminate()
    }
}

/// Node `i`'s addresses on the bridge (see the module docs).
fn node_addresses(i: usize) -> (Ipv4Addr, Ipv6Addr) {
    let n = i as u8 + 11;
    (
        Ipv4Addr::new(10, 0, 0, n),
        Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, decimal_as_hex(n)),
    )
}

/// `n`'s decimal digits read as a hex group, so that node 11 is `fd00:10::11`.
fn decimal_as_hex(n: u8) -> u16 {
    let d = u16::from(n);
    (d / 100) * 0x100 + (d / 10 % 10) * 0x10 + d % 10
}

/// Pod `j` of node `node_index`: the spec's own addresses, else 10.244.(i+1).(10+j) and
/// fd00:244:0:(i+1)::(10+j).
fn pod_addresses(node_index: usize, j: usize, spec: &PodSpec) -> (Ipv4Addr, Ipv6Addr) {
    let (subnet, host) = (node_index as u8 + 1, j as u8 + 10);
    (
        spec.v4.unwrap_or(Ipv4Addr::new(10, 244, subnet, host)),
        spec.v6.unwrap_or(Ipv6Addr::new(
            0xfd00,
            0x244,
            0,
            decimal_as_hex(subnet),
            0,
            0,
            0,
            decimal_as_hex(host),
        )),
    )
}

/// `nodes.yaml`: (name, zone, IPv4, IPv6) per node.
fn nodes_yaml<'a>(nodes: impl Iterator<Item = (&'a str, &'a str, Ipv4Addr, Ipv6Addr)>) -> String {
    let mut out = String::new();
    for (name, zone, v4, v6) in nodes {
        out += &format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {:?}\n  labels: {{topology.kubernetes.io/zone: {:?}}}\nstatus:\n  addresses:\n    - {{type: InternalIP, address: \"{}\"}}\n    - {{type: InternalIP, address: \"{}\"}}\n    - {{type: Hostname, address: {:?}}}\n",
            name, zone, v4, v6, name
        );
    }
    out
}

/// `pods.yaml`: each pod's spec and addresses.
fn pods_yaml<'a>(pods: impl Iterator<Item = (&'a PodSpec, Ipv4Addr, Ipv6Addr)>) -> String {
    let mut out = String::new();
    for (spec, v4, v6) in pods {
        let labels: Vec<String> = spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k:?}: {v:?}"))
            .collect();
        let ports: Vec<String> = spec
            .tcp_ports
            .iter()
            .map(|p| format!("{{containerPort: {p}, protocol: TCP}}"))
            .chain(
                spec.udp_ports
                    .iter()
                    .map(|p| format!("{{containerPort: {p}, protocol: UDP}}")),
            )
            .collect();
        out += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {:?}\n  namespace: default\n  labels: {{{}}}\nspec:\n  nodeName: {:?}\n  containers:\n    - name: echo\n      image: echo\n      ports: [{}]\nstatus:\n  podIP: \"{}\"\n  podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]\n  conditions: [{{type: Ready, status: \"{}\"}}]\n",
            spec.name,
            labels.join(", "),
            spec.node,
            ports.join(", "),
            v4,
            v4,
            v6,
            if spec.ready { "True" } else { "False" },
        );
    }
    out
}

/// A node of a [`ClusterPlan`].
#[derive(Debug, Clone)]
pub struct PlannedNode {
    pub name: String,
    pub zone: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// A pod of a [`ClusterPlan`].
#[derive(Debug, Clone)]
pub struct PlannedPod {
    pub name: String,
    pub node: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    spec: PodSpec,
}

/// A cluster's names and addresses without namespaces ([`ClusterBuilder::plan`]): the
/// same addresses and manifests a built [`Cluster`] has.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    pub nodes: Vec<PlannedNode>,
    pub pods: Vec<PlannedPod>,
}

impl ClusterPlan {
    /// Add a pod as [`Cluster::add_pod`] would (the next address of its node).
    pub fn add_pod(&mut self, spec: PodSpec) -> io::Result<&PlannedPod> {
        if self.pods.iter().any(|p| p.name == spec.name) {
            return Err(io::Error::other(format!("pod {} added twice", spec.name)));
        }
        let index = self
            .nodes
            .iter()
            .position(|n| n.name == spec.node)
            .ok_or_else(|| io::Error::other(format!("pod {}: no node {}", spec.name, spec.node)))?;
        let j = self.pods.iter().filter(|p| p.node == spec.node).count();
        let (v4, v6) = pod_addresses(index, j, &spec);
        self.pods.push(PlannedPod {
            name: spec.name.clone(),
            node: spec.node.clone(),
            v4,
            v6,
            spec,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    pub fn node(&self, name: &str) -> io::Result<&PlannedNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| io::Error::other(format!("no node {name} in the plan")))
    }

    pub fn pod(&self, name: &str) -> io::Result<&PlannedPod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| io::Error::other(format!("no pod {name} in the plan")))
    }

    /// A new temporary manifests directory with `nodes.yaml` and `pods.yaml`, as
    /// [`Cluster::manifests`] writes them.
    pub fn manifests(&self) -> io::Result<Manifests> {
        let dir = tempfile::Builder::new().prefix("svk-manifests").tempdir()?;
        let manifests = Manifests { dir };
        manifests.write(
            "nodes.yaml",
            &nodes_yaml(
                self.nodes
                    .iter()
                    .map(|n| (n.name.as_str(), n.zone.as_str(), n.v4, n.v6)),
            ),
        )?;
        manifests.write(
            "pods.yaml",
            &pods_yaml(self.pods.iter().map(|p| (&p.spec, p.v4, p.v6))),
        )?;
        Ok(manifests)
    }
}

/// A temporary manifests directory (deleted on drop) for `svcplane proxy --manifests`.
#[derive(Debug)]
pub struct Manifests {
    dir: tempfile::TempDir,
}

impl Manifests {
    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write (or replace) `file` with `yaml`. The file is written under a temporary
    /// name and renamed, so a watching proxy never reads half a file.
    pub fn write(&self, file: &str, yaml: &str) -> io::Result<()> {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.dir.path().join(file))
    }

    /// Delete `file`.
    pub fn remove(&self, file: &str) -> io::Result<()> {
        std::fs::remove_file(self.dir.path().join(file))
    }
}

/// The value of one sample in a Prometheus/OpenMetrics text exposition: `series` is the
/// metric name with its labels exactly as exposed, e.g. `m_bucket{le="0.001"}`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// Parse an echo reply, or say what came back instead.
pub fn parse_echo(reply: &str) -> io::Result<EchoReply> {
    EchoReply::parse(reply).ok_or_else(|| io::Error::other(format!("not an echo reply: {reply:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_found_in_both_forms() {
        let args = [
            "--sync-period",
            "1s",
            "--metrics-bind-address=10.0.0.11:9100",
        ];
        assert_eq!(flag_value(&args, "--sync-period"), Some("1s"));
        assert_eq!(
            flag_value(&args, "--metrics-bind-address"),
            Some("10.0.0.11:9100")
        );
        assert_eq!(
            flag_value(&args, "--sync"),
            None,
            "a prefix is not the flag"
        );
        assert_eq!(flag_value(&["--sync-period"], "--sync-period"), None);
    }

    #[test]
    fn servers_are_reached_where_they_listen() {
        let at = |args: &[&str]| {
            server_address(args, "--metrics-bind-address", DEFAULT_METRICS)
                .unwrap()
                .map(|a| a.to_string())
        };
        assert_eq!(at(&[]).as_deref(), Some("127.0.0.1:10249"));
        assert_eq!(
            at(&["--metrics-bind-address", "0.0.0.0:9100"]).as_deref(),
            Some("127.0.0.1:9100")
        );
        assert_eq!(
            at(&["--metrics-bind-address", "[::]:9100"]).as_deref(),
            Some("[::1]:9100")
        );
        assert_eq!(
            at(&["--metrics-bind-address=10.0.0.11:9100"]).as_deref(),
            Some("10.0.0.11:9100")
        );
        assert_eq!(at(&["--metrics-bind-address", "0.0.0.0:0"]), None);
        assert!(
            server_address(
                &["--metrics-bind-address", "nope"],
                "--metrics-bind-address",
                ""
            )
            .is_err()
        );
    }
}
