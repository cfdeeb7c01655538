//! The scenarios' world: the standard two-node cluster, its Services, the proxy on
//! node-a in the cell's mode, and every address in the cell's family.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use svcplane_testkit::{
    Cluster, ClusterBuilder, EchoReply, Manifests, PodSpec, Proto, ProxyHandle, RequestError,
    in_cgroup, parse_echo, skip_unless_root,
};

use crate::modes;
use crate::probes::Place;

/// Per-request timeout: only bounds how long a broken test hangs.
pub const T: Duration = Duration::from_secs(3);
/// Per-request timeout while waiting for a change to be programmed: a packet to a
/// service that is not programmed yet goes to the default route and is never answered.
pub const PROBE: Duration = Duration::from_millis(300);
/// Bound on waiting for a change to take effect: only limits how long a broken test
/// hangs, never a speed requirement (`svcplane bench sync` measures speed; in the QEMU/TCG
/// VM of `make test-ipvs`, on a loaded machine, a sync takes seconds).
pub const SETTLE: Duration = Duration::from_secs(30);
/// Requests sent to see every endpoint of a multi-endpoint service. With random
/// choice between 2 endpoints, missing one in 64 tries has probability 2^-63.
pub const SPREAD_TRIES: usize = 64;
/// Requests that must all reach the same endpoint; with 2 endpoints chosen at random,
/// all landing on one by chance has probability 2^-31.
pub const STICKY_TRIES: usize = 32;

/// An address family: every scenario runs once per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        })
    }
}

/// One cell of the table: a `--proxy-mode` value and a family.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub mode: &'static str,
    pub family: Family,
}

/// An address (or CIDR) of the scenarios, one per family. The Services' YAML names it
/// as `${NAME}` (see [`ADDRESSES`]); a scenario picks its family's with [`Env::ip`].
#[derive(Debug, Clone, Copy)]
pub struct Dual {
    pub v4: &'static str,
    pub v6: &'static str,
}

impl Dual {
    pub fn get(&self, family: Family) -> &'static str {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }
}

const fn dual(v4: &'static str, v6: &'static str) -> Dual {
    Dual { v4, v6 }
}

// ClusterIPs: 10.96.1.N and fd00:96::1:N (inside the test kit's SERVICE_CIDRS).
pub const ONE: Dual = dual("10.96.1.1", "fd00:96::1:1");
pub const MANY: Dual = dual("10.96.1.2", "fd00:96::1:2");
pub const DNS: Dual = dual("10.96.1.3", "fd00:96::1:3");
pub const NP: Dual = dual("10.96.1.4", "fd00:96::1:4");
pub const EMPTY: Dual = dual("10.96.1.5", "fd00:96::1:5");
pub const LB: Dual = dual("10.96.1.6", "fd00:96::1:6");
pub const EXT: Dual = dual("10.96.1.7", "fd00:96::1:7");
pub const LOCAL: Dual = dual("10.96.1.8", "fd00:96::1:8");
pub const STICKY: Dual = dual("10.96.1.9", "fd00:96::1:9");
pub const ITP: Dual = dual("10.96.1.10", "fd00:96::1:10");
pub const LOCAL_REMOTE: Dual = dual("10.96.1.11", "fd00:96::1:11");
pub const NP_WIDE: Dual = dual("10.96.1.12", "fd00:96::1:12");
/// ClusterIPs of Services that scenarios write themselves.
pub const NEW: Dual = dual("10.96.1.50", "fd00:96::1:50");
pub const LATER: Dual = dual("10.96.1.51", "fd00:96::1:51");
pub const MORE: Dual = dual("10.96.1.52", "fd00:96::1:52");
pub const BAD: Dual = dual("10.96.1.53", "fd00:96::1:53");
pub const HINTED: Dual = dual("10.96.1.60", "fd00:96::1:60");
pub const TERM: Dual = dual("10.96.1.61", "fd00:96::1:61");
pub const MIXED: Dual = dual("10.96.1.62", "fd00:96::1:62");
pub const UDP: Dual = dual("10.96.1.70", "fd00:96::1:70");
pub const HC: Dual = dual("10.96.1.71", "fd00:96::1:71");

// Outside the cluster, reached through node-a as an upstream router would send them.
/// Routed from the client via node-a.
pub const EXTERNAL_NET: Dual = dual("192.0.2.0/24", "2001:db8::/64");
/// `lb`'s LoadBalancer IP.
pub const LB_IP: Dual = dual("192.0.2.10", "2001:db8::10");
/// `ext`'s external IP.
pub const EXTERNAL_IP: Dual = dual("192.0.2.20", "2001:db8::20");
/// `local-remote`'s external IP and LoadBalancer IP.
pub const LOCAL_REMOTE_EXTERNAL_IP: Dual = dual("192.0.2.30", "2001:db8::30");
pub const LOCAL_REMOTE_LB_IP: Dual = dual("192.0.2.40", "2001:db8::40");
/// `hc`'s LoadBalancer IP.
pub const HC_LB_IP: Dual = dual("192.0.2.50", "2001:db8::50");
/// `lb`'s loadBalancerSourceRanges, and the client's extra address inside them.
pub const ALLOWED_RANGE: Dual = dual("203.0.113.0/24", "2001:db8:113::/64");
pub const ALLOWED_SRC: Dual = dual("203.0.113.10", "2001:db8:113::10");

/// The `${NAME}`s a Service template may use; each becomes `[v4, "v6"]`, and
/// `${NAME.ingress}` a LoadBalancer status's `[{ip: v4}, {ip: "v6"}]`.
const ADDRESSES: &[(&str, Dual)] = &[
    ("ONE", ONE),
    ("MANY", MANY),
    ("DNS", DNS),
    ("NP", NP),
    ("EMPTY", EMPTY),
    ("LB", LB),
    ("EXT", EXT),
    ("LOCAL", LOCAL),
    ("STICKY", STICKY),
    ("ITP", ITP),
    ("LOCAL_REMOTE", LOCAL_REMOTE),
    ("NP_WIDE", NP_WIDE),
    ("NEW", NEW),
    ("LATER", LATER),
    ("MORE", MORE),
    ("BAD", BAD),
    ("HINTED", HINTED),
    ("TERM", TERM),
    ("MIXED", MIXED),
    ("UDP", UDP),
    ("HC", HC),
    ("LB_IP", LB_IP),
    ("EXTERNAL_IP", EXTERNAL_IP),
    ("LOCAL_REMOTE_EXTERNAL_IP", LOCAL_REMOTE_EXTERNAL_IP),
    ("LOCAL_REMOTE_LB_IP", LOCAL_REMOTE_LB_IP),
    ("HC_LB_IP", HC_LB_IP),
    ("ALLOWED_RANGE", ALLOWED_RANGE),
];

/// `template` with every `${NAME}` of [`ADDRESSES`] expanded to both families, so each
/// Service is dual-stack with its addresses written once.
pub fn dual_stack(template: &str) -> String {
    let mut out = template.to_string();
    for (name, dual) in ADDRESSES {
        out = out.replace(
            &format!("${{{name}.ingress}}"),
            &format!("[{{ip: {}}}, {{ip: \"{}\"}}]", dual.v4, dual.v6),
        );
        out = out.replace(
            &format!("${{{name}}}"),
            &format!("[{}, \"{}\"]", dual.v4, dual.v6),
        );
    }
    assert!(!out.contains("${"), "unknown address in template:\n{out}");
    out
}

/// `metadata` and the dual-stack header of a Service's spec, for the templates.
pub fn service_head(name: &str, cluster_ips: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
         clusterIPs: ${{{cluster_ips}}}\n"
    )
}

/// The standard Services, every one dual-stack. Their pods are in [`Env::start_with`].
pub const SERVICES: &str = r#"
# One endpoint (one-a on node-a), port 80 -> targetPort 8080.
apiVersion: v1
kind: Service
metadata: {name: one, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${ONE}
  selector: {app: one}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
# Two endpoints, one per node.
apiVersion: v1
kind: Service
metadata: {name: many, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${MANY}
  selector: {app: many}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
# TCP and UDP on the same port number, mapped to different target ports so the echo
# reply proves which rule each protocol went through.
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${DNS}
  selector: {app: dns}
  ports:
    - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}
    - {name: dns-udp, port: 53, protocol: UDP, targetPort: 5354}
---
# NodePort over the two "many" pods.
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${NP}
  selector: {app: many}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
# Selects nothing: no endpoints.
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${EMPTY}
  selector: {app: nobody}
  ports: [{name: http, port: 80}]
---
# LoadBalancer with source ranges: only ALLOWED_RANGE may use the LB IP.
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${LB}
  selector: {app: many}
  loadBalancerSourceRanges: ${ALLOWED_RANGE}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]
status:
  loadBalancer:
    ingress: ${LB_IP.ingress}
---
# An external IP.
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${EXT}
  selector: {app: one}
  externalIPs: ${EXTERNAL_IP}
  ports: [{name: http, port: 8000, targetPort: 8080}]
---
# externalTrafficPolicy Local; its only endpoint (one-a) is on node-a.
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${LOCAL}
  selector: {app: one}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30083}]
---
# ClientIP session affinity over the two "many" pods.
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${STICKY}
  selector: {app: many}
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080}]
---
# internalTrafficPolicy Local over the two "many" pods (one per node).
apiVersion: v1
kind: Service
metadata: {name: itp, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${ITP}
  selector: {app: many}
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080}]
---
# externalTrafficPolicy Local with an externalIP and a LoadBalancer IP; its only
# endpoint (remote-b) is on node-b, so node-a has no local endpoint.
apiVersion: v1
kind: Service
metadata: {name: local-remote, namespace: default}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${LOCAL_REMOTE}
  selector: {app: remote}
  externalIPs: ${LOCAL_REMOTE_EXTERNAL_IP}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30084}]
status:
  loadBalancer:
    ingress: ${LOCAL_REMOTE_LB_IP.ingress}
---
# NodePorts outside the API server's default range (30000-32767), which clusters widen.
apiVersion: v1
kind: Service
metadata: {name: np-wide, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: ${NP_WIDE}
  selector: {app: many}
  ports:
    - {name: low, port: 80, targetPort: 8080, nodePort: 3001}
    - {name: web, port: 81, targetPort: 8080, nodePort: 80}
"#;

/// The standard cluster of every cell: node-a (zone-a) and node-b (zone-b), the pods the
/// Services select, and the external client with its extra address. Built by
/// [`Env::start_with`]; planned (no kernel) by the trace agreement check.
pub fn standard_cluster() -> ClusterBuilder {
    Cluster::builder()
        .node("node-a", "zone-a")
        .node("node-b", "zone-b")
        // A pod without labels: the in-cluster client on node-a.
        .pod(PodSpec::new("client-a", "node-a"))
        .pod(
            PodSpec::new("one-a", "node-a")
                .label("app", "one")
                .tcp(&[8080]),
        )
        .pod(
            PodSpec::new("many-a", "node-a")
                .label("app", "many")
                .tcp(&[8080]),
        )
        .pod(
            PodSpec::new("many-b", "node-b")
                .label("app", "many")
                .tcp(&[8080]),
        )
        .pod(
            PodSpec::new("remote-b", "node-b")
                .label("app", "remote")
                .tcp(&[8080]),
        )
        .pod(
            PodSpec::new("dns-b", "node-b")
                .label("app", "dns")
                .tcp(&[5353])
                .udp(&[5354]),
        )
        .client_address(parse_ip(ALLOWED_SRC.v4))
        .client_address(parse_ip(ALLOWED_SRC.v6))
}

/// The standard cluster, its manifests and the proxy on node-a, for one cell. Field
/// order is drop order: the proxy stops before the cluster's namespaces go away.
pub struct Env {
    pub proxy: Option<ProxyHandle>,
    /// Per node with a proxy: the mode's hooks (ebpf's cgroup and pins), after the proxy
    /// in drop order so the proxy stops first.
    hooks: Mutex<BTreeMap<String, Arc<modes::NodeHooks>>>,
    pub manifests: Manifests,
    pub cluster: Cluster,
    pub cell: Cell,
}

impl Env {
    /// `None` when the test must skip (not root, tools missing).
    pub fn start(cell: Cell) -> Option<Env> {
        Env::start_with(cell, &[])
    }

    /// [`Env::start`] with extra `svcplane proxy` flags.
    pub fn start_with(cell: Cell, proxy_args: &[&str]) -> Option<Env> {
        if skip_unless_root(&[&["ip", "sysctl"], modes::tools(cell.mode)].concat()) {
            return None;
        }
        if let Some(why) = modes::unavailable(cell.mode) {
            // Straight to stderr: the harness hides `eprintln!` of a passing test.
            use std::io::Write as _;
            // The harness names each test's thread after the test: `mode::family::name`.
            let test = std::thread::current()
                .name()
                .map(|n| n.replace("::", "/"))
                .unwrap_or_else(|| format!("{}/{}", cell.mode, cell.family));
            let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
            return None;
        }
        let cluster = standard_cluster().build().expect("virtual cluster");
        for family in [Family::V4, Family::V6] {
            cluster
                .route_client_via(EXTERNAL_NET.get(family), "node-a")
                .expect("client route");
        }
        let manifests = cluster.manifests().expect("manifests");
        manifests
            .write("services.yaml", &dual_stack(SERVICES))
            .expect("services.yaml");
        let mut env = Env {
            proxy: None,
            hooks: Mutex::default(),
            manifests,
            cluster,
            cell,
        };
        env.proxy = Some(env.run_proxy_with("node-a", proxy_args));
        Some(env)
    }

    /// `svcplane proxy` in this cell's mode on `node` over this test's manifests.
    pub fn run_proxy_on(&self, node: &str) -> ProxyHandle {
        self.run_proxy_with(node, &[])
    }

    fn run_proxy_with(&self, node: &str, extra: &[&str]) -> ProxyHandle {
        let mut args: Vec<String> = ["--proxy-mode", self.cell.mode]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect();
        // A restarted proxy on the same node reuses its hooks (pins, cgroup).
        let hooks = self.hooks(node).or_else(|| {
            let hooks = Arc::new(modes::NodeHooks::for_mode(self.cell.mode)?);
            let mut all = self.hooks.lock().expect("hooks");
            all.insert(node.to_string(), hooks.clone());
            Some(hooks)
        });
        if let Some(hooks) = hooks {
            args.extend(hooks.proxy_args());
        }
        self.cluster
            .run_proxy(
                env!("CARGO_BIN_EXE_svcplane"),
                node,
                self.manifests.path(),
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "svcplane proxy --proxy-mode {} on {node}: {e}",
                    self.cell.mode
                )
            })
    }

    pub fn family(&self) -> Family {
        self.cell.family
    }

    /// `node`'s mode-specific hooks (ebpf), once a proxy ran there.
    pub fn hooks(&self, node: &str) -> Option<Arc<modes::NodeHooks>> {
        self.hooks.lock().expect("hooks").get(node).cloned()
    }

    /// Run `request` (which opens its socket inside namespace `netns`) from `node`: in
    /// eBPF mode inside that node's cgroup, where the socket load balancer sees it.
    fn on_node(
        &self,
        node: &str,
        netns: &str,
        request: impl Fn(&str) -> Result<String, RequestError>,
    ) -> Result<String, RequestError> {
        let mut outcomes = self.on_node_times(node, netns, 1, request);
        outcomes.pop().expect("one outcome")
    }

    /// [`Env::on_node`] `times` times in a row, in one forked client in eBPF mode: a fork
    /// of this big multi-threaded test process per request is slow on a loaded machine.
    fn on_node_times(
        &self,
        node: &str,
        netns: &str,
        times: usize,
        request: impl Fn(&str) -> Result<String, RequestError>,
    ) -> Vec<Result<String, RequestError>> {
        let Some(hooks) = self.hooks(node) else {
            return (0..times).map(|_| request(netns)).collect();
        };
        // The forked child can only hand back a string: per request the outcome, then
        // the reply, requests separated by NUL (replies are text).
        let out = in_cgroup(hooks.cgroup.path(), netns, || {
            (0..times)
                .map(|_| match request(netns) {
                    Ok(reply) => format!("ok\n{reply}"),
                    Err(RequestError::Refused) => "refused\n".into(),
                    Err(RequestError::Timeout) => "timeout\n".into(),
                    Err(RequestError::Unreachable(e)) => format!("unreachable\n{e}"),
                    Err(RequestError::Other(e)) => format!("other\n{e}"),
                })
                .collect::<Vec<_>>()
                .join("\0")
        });
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let e = e.to_string();
                return (0..times)
                    .map(|_| Err(RequestError::Other(std::io::Error::other(e.clone()))))
                    .collect();
            }
        };
        out.split('\0')
            .map(|one| {
                let (outcome, rest) = one.split_once('\n').unwrap_or((one, ""));
                match outcome {
                    "ok" => Ok(rest.to_string()),
                    "refused" => Err(RequestError::Refused),
                    "timeout" => Err(RequestError::Timeout),
                    "unreachable" => Err(RequestError::Unreachable(std::io::Error::other(
                        rest.to_string(),
                    ))),
                    _ => Err(RequestError::Other(std::io::Error::other(one.to_string()))),
                }
            })
            .collect()
    }

    /// The node of `from` (a node or a pod) and its namespace.
    fn whereabouts(&self, from: &str) -> (String, String) {
        match self.cluster.node(from) {
            Ok(node) => (from.to_string(), node.netns().name().to_string()),
            Err(_) => {
                let pod = self.cluster.pod(from).expect("pod");
                (pod.node().to_string(), pod.netns().name().to_string())
            }
        }
    }

    /// `dual`'s address in the cell's family, at `port`.
    pub fn at(&self, dual: Dual, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(dual), port)
    }

    /// `node`'s own address in the cell's family, at `port` (NodePorts).
    pub fn node_at(&self, node: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.node_ip(node), port)
    }

    pub fn pod_ip(&self, pod: &str) -> IpAddr {
        let pod = self.cluster.pod(pod).expect("pod");
        match self.family() {
            Family::V4 => IpAddr::V4(pod.ipv4()),
            Family::V6 => IpAddr::V6(pod.ipv6()),
        }
    }

    pub fn node_ip(&self, node: &str) -> IpAddr {
        let node = self.cluster.node(node).expect("node");
        match self.family() {
            Family::V4 => IpAddr::V4(node.ipv4()),
            Family::V6 => IpAddr::V6(node.ipv6()),
        }
    }

    /// TCP from `from`: a pod, a node (its own namespace), `"client"` (the external
    /// client, from its own address) or `"client-allowed"` (from [`ALLOWED_SRC`]).
    pub fn tcp(&self, from: &str, dst: SocketAddr) -> EchoReply {
        let reply = self
            .try_tcp(from, dst)
            .unwrap_or_else(|e| panic!("TCP {from} -> {dst}: {e}"));
        parse_echo(&reply).expect("echo reply")
    }

    pub fn try_tcp(&self, from: &str, dst: SocketAddr) -> Result<String, RequestError> {
        self.try_tcp_within(from, dst, T)
    }

    fn try_tcp_within(
        &self,
        from: &str,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<String, RequestError> {
        let mut outcomes = self.requests(from, Proto::Tcp, dst, timeout, 1);
        outcomes.pop().expect("one outcome")
    }

    /// UDP with its own timeout (a fresh source port each time).
    pub fn try_udp_within(
        &self,
        from: &str,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<String, RequestError> {
        let mut outcomes = self.requests(from, Proto::Udp, dst, timeout, 1);
        outcomes.pop().expect("one outcome")
    }

    /// `times` requests in a row from `from` (see [`Env::tcp`]) to `dst`, each with its
    /// own socket; one forked client for all of them in eBPF mode.
    pub fn requests(
        &self,
        from: &str,
        proto: Proto,
        dst: SocketAddr,
        timeout: Duration,
        times: usize,
    ) -> Vec<Result<String, RequestError>> {
        let c = &self.cluster;
        let client_src = match from {
            "client-allowed" => Some(self.ip(ALLOWED_SRC)),
            // Its own address explicitly: for IPv6 the kernel would pick ALLOWED_SRC, the
            // longer prefix match with the 2001:db8:: destinations.
            "client" => Some(self.client_ip()),
            _ => None,
        };
        if let Some(src) = client_src {
            return (0..times)
                .map(|_| match proto {
                    Proto::Tcp => c.tcp_request_from(c.client(), src, dst, timeout),
                    Proto::Udp => c.udp_request_from(c.client(), src, dst, timeout),
                })
                .collect();
        }
        let (node, netns) = self.whereabouts(from);
        self.on_node_times(&node, &netns, times, |ns| match proto {
            Proto::Tcp => svcplane_testkit::tcp_request(ns, None, dst, timeout),
            Proto::Udp => svcplane_testkit::udp_request(ns, None, dst, timeout),
        })
    }

    /// UDP from pod `from`'s fixed source port `src_port`: the same 5-tuple every call.
    pub fn try_udp_from_port(
        &self,
        from: &str,
        src_port: u16,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<String, RequestError> {
        let any = match dst {
            SocketAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        };
        let (node, netns) = self.whereabouts(from);
        self.on_node(&node, &netns, |ns| {
            svcplane_testkit::udp_request_bound(ns, SocketAddr::new(any, src_port), dst, timeout)
        })
    }

    /// Wait (bounded; the bound only limits how long a broken test hangs) until `dst`
    /// answers TCP from `from`, e.g. after writing a manifest. Reads nothing but traffic,
    /// so it works for every mode.
    pub fn wait_answering(&self, from: &str, dst: SocketAddr) -> bool {
        svcplane_testkit::wait_until(Duration::from_secs(10), || {
            self.try_tcp_within(from, dst, PROBE).is_ok()
        })
    }

    /// Send TCP requests until every pod in `want` answered (bounded), and return the
    /// replies; asserts nothing outside `want` answered.
    pub fn spread(&self, from: &str, dst: SocketAddr, want: &[&str]) -> Vec<EchoReply> {
        let want: BTreeSet<IpAddr> = want.iter().map(|p| self.pod_ip(p)).collect();
        let mut seen = BTreeSet::new();
        let mut replies = Vec::new();
        for _ in 0..SPREAD_TRIES {
            let reply = self.tcp(from, dst);
            assert!(want.contains(&reply.pod), "unexpected endpoint: {reply:?}");
            seen.insert(reply.pod);
            replies.push(reply);
            if seen == want {
                break;
            }
        }
        assert_eq!(
            seen, want,
            "not every endpoint answered in {SPREAD_TRIES} tries"
        );
        replies
    }

    /// The proxy on node-a.
    pub fn proxy(&self) -> &ProxyHandle {
        self.proxy.as_ref().expect("proxy")
    }
}

impl Place for Env {
    fn family(&self) -> Family {
        self.cell.family
    }
    fn pod_ip(&self, pod: &str) -> IpAddr {
        Env::pod_ip(self, pod)
    }
    fn node_ip(&self, node: &str) -> IpAddr {
        Env::node_ip(self, node)
    }
}

fn parse_ip(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("address {text:?}: {e}"))
}
