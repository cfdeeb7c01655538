//! Command-line interface. Flag names are kube-proxy's wherever kube-proxy has one.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "svcplane",
    version,
    arg_required_else_help = true,
    about = "A Kubernetes Service dataplane: a drop-in replacement for kube-proxy",
    long_about = "svcplane turns Kubernetes Services into kernel rules on each node, as kube-proxy does.\n\
                  It reads Services, EndpointSlices, Nodes (and Pods) from a directory of manifests\n\
                  (standalone mode) and programs one atomic nftables transaction per sync.\n\n\
                  Start with `svcplane render` to see exactly what a mode would program.",
    after_help = "Examples:\n  \
                  svcplane render --manifests examples/cluster --hostname-override node-a --cluster-cidr 10.244.0.0/16\n  \
                  svcplane proxy  --manifests examples/cluster --hostname-override node-a --cluster-cidr 10.244.0.0/16\n  \
                  svcplane cleanup"
)]
pub struct Cli {
    /// Log verbosity, as kube-proxy's -v (0-1 info, 2-3 debug, 4+ trace; RUST_LOG overrides).
    #[arg(
        short = 'v',
        long = "v",
        global = true,
        value_name = "N",
        default_value_t = 0
    )]
    pub verbosity: u8,

    /// kube-proxy's name for `svcplane cleanup`: remove everything svcplane programmed, and exit.
    #[arg(long)]
    pub cleanup: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    pub fn verbosity(&self) -> u8 {
        self.verbosity
    }
}

// Parsed once per process; boxing the proxy's flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy: watch the source and keep the kernel's Service rules in sync.
    Proxy(Box<ProxyArgs>),
    /// Print exactly what a mode would program for the manifests, without root and without touching the kernel.
    Render(RenderArgs),
    /// Remove everything svcplane programmed (in one mode, or in every mode).
    Cleanup(CleanupArgs),
    /// Serve cluster DNS (Kubernetes DNS spec 1.1.0) from the manifests, without a dataplane.
    Dns(DnsArgs),
    /// examples/lab live (as root) in every mode: a virtual cluster of network namespaces,
    /// `svcplane proxy` on a node, DNS → ClusterIP → rules → Pod, a NodePort, a scale-down,
    /// the modes side by side; then everything torn down.
    Lab(LabArgs),
    /// Explain what happens to one connection on a node: which Service port it hits, the
    /// policy and topology decisions, the candidate endpoints, masquerade, DROP or REJECT,
    /// and the kernel objects of the mode that carry it. Read-only: no root, no kernel.
    Trace(TraceArgs),
    /// Measure svcplane at scale (as root, in a virtual cluster): every mode side by side, or
    /// one aspect with `bench sync` / `bench datapath`.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Example:\n  \
                  svcplane bench --services 1,1000,10000,30000 --out bench-results\n  \
                  svcplane bench --modes nftables,iptables-linear --services 1,1000 --requests 500"
)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    #[command(flatten)]
    pub run: BenchRunArgs,
}

/// `svcplane bench` without a subcommand: every series × every number of Services.
#[derive(Debug, Args)]
pub struct BenchRunArgs {
    /// Series to measure, comma-separated: a mode (its default settings) or a variant such
    /// as iptables-linear. Default: every series of every mode this binary implements
    /// (those this kernel cannot run are reported and skipped).
    #[arg(long, value_name = "SERIES[,SERIES...]", value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Numbers of ClusterIP Services, comma-separated: one run per series and number.
    #[arg(
        long,
        value_name = "N[,N...]",
        value_delimiter = ',',
        default_value = "1,1000,10000,30000"
    )]
    pub services: Vec<u32>,
    /// New connections per path for the latencies, and again per path for requests per
    /// second.
    #[arg(long, value_name = "R", default_value_t = 2000)]
    pub requests: u32,
    /// Endpoints of each other Service (addresses that need not exist).
    #[arg(long, value_name = "E", default_value_t = 1)]
    pub endpoints: u32,
    /// One-change rounds per run (one EndpointSlice rewritten, timed to the kernel).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub changes: u32,
    /// Where the results go: bench.csv, bench.json and bench.svg (created if missing).
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    pub out: PathBuf,
    /// How long to wait for the proxy's first sync per run (Go duration).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = crate::duration::parse_go_duration)]
    pub first_sync_wait: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// N ClusterIP services through `svcplane proxy`: the first full sync, then how long one
    /// EndpointSlice change takes from the file being written to the rules being in the kernel.
    Sync(BenchSyncArgs),
    /// Connect latency from a pod through the last-programmed of N ClusterIP services, side
    /// by side with straight to the pod's IP (and pod to pod on a node without rules), in a
    /// virtual cluster running `svcplane proxy`.
    Datapath(BenchDatapathArgs),
}

/// `bench sync --source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchSource {
    Manifests,
    Api,
}

#[derive(Debug, Args)]
#[command(after_help = "Example:\n  \
                        svcplane bench datapath --services 1000,10000,30000 --requests 2000\n  \
                        svcplane bench datapath --services 10000 --target-endpoints 1,100,1000\n  \
                        svcplane bench datapath --proxy-mode iptables -- --iptables-dispatch linear")]
pub struct BenchDatapathArgs {
    /// The proxy's --proxy-mode.
    #[arg(long, value_name = "MODE", default_value = "nftables")]
    pub proxy_mode: String,
    /// Numbers of ClusterIP services, comma-separated: one measurement (a fresh cluster and
    /// proxy) per number.
    #[arg(
        long,
        value_name = "N[,N...]",
        value_delimiter = ',',
        default_value = "1000,10000"
    )]
    pub services: Vec<u32>,
    /// New connections per path (through the ClusterIP, straight to the pod IP, and the
    /// reference on a node without rules) per measurement.
    #[arg(long, value_name = "R", default_value_t = 2000)]
    pub requests: u32,
    /// Endpoints of each other service (addresses that need not exist; they only make the
    /// rule set as large as a real one).
    #[arg(long, value_name = "E", default_value_t = 1)]
    pub endpoints: u32,
    /// The measured Service's endpoints, comma-separated: one measurement per number and
    /// number of services (the server pod on that many ports, so every one answers).
    #[arg(
        long,
        value_name = "N[,N...]",
        value_delimiter = ',',
        default_value = "1"
    )]
    pub target_endpoints: Vec<u32>,
    /// How long to wait for the proxy's first sync per size (Go duration).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = crate::duration::parse_go_duration)]
    pub first_sync_wait: std::time::Duration,
    /// One more argument for `svcplane proxy` (repeatable), e.g.
    /// `--proxy-arg=--iptables-dispatch=linear`.
    #[arg(long = "proxy-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub proxy_args: Vec<String>,
    /// Arguments after `--` go to `svcplane proxy` too.
    #[arg(last = true, value_name = "PROXY ARGS")]
    pub trailing_proxy_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BenchSyncArgs {
    /// Where the proxy reads the objects: a manifests directory, or the test kit's fake
    /// Kubernetes API server (plain HTTP) through a kubeconfig.
    #[arg(long, value_enum, default_value_t = BenchSource::Manifests)]
    pub source: BenchSource,
    /// Number of ClusterIP services.
    #[arg(long, default_value_t = 10_000)]
    pub services: u32,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    pub endpoints: u32,
    /// How many times one EndpointSlice is changed.
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// The mode to measure (nftables, iptables, ipvs or ebpf; ebpf pins under
    /// /run/svcplane-test-bpf and attaches to a scratch cgroup, so the host's services are
    /// untouched).
    #[arg(long, default_value = "nftables", value_name = "MODE")]
    pub proxy_mode: String,
    /// iptables mode's dispatch (tree or linear).
    #[arg(long, default_value = "tree", value_name = "tree|linear")]
    pub iptables_dispatch: String,
    /// One more argument for `svcplane proxy` (repeatable), e.g.
    /// `--proxy-arg=--ebpf-north-south=false`.
    #[arg(long = "proxy-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub proxy_args: Vec<String>,
    /// After the rounds, a churn soak (Go duration, e.g. 10m): one endpoint change per
    /// second, then RSS at the end against after the first sync, the sync's p50/p99 and the
    /// failed syncs.
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse_go_duration)]
    pub churn: Option<std::time::Duration>,
    /// The svcplane binary to run as the proxy (default: this one), e.g. another build to
    /// compare with through the same bench.
    #[arg(long, value_name = "PATH")]
    pub proxy_binary: Option<PathBuf>,
}

/// Flags shared by `proxy` and `render`: where objects come from and how the node is configured.
#[derive(Debug, Args, Clone, Default)]
pub struct EngineArgs {
    /// Dataplane mode: nftables, iptables, ipvs or ebpf (default nftables).
    #[arg(long, value_name = "MODE")]
    pub proxy_mode: Option<String>,

    /// Directory of Kubernetes manifests (*.yaml, *.yml, *.json; watched for changes by `proxy`).
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// This node's name: endpoints with this nodeName are local; its Node object gives IPs and zone.
    /// Defaults to the --config file's hostnameOverride, then $NODE_NAME (the DaemonSet sets it
    /// from spec.nodeName), then the host name.
    #[arg(long, value_name = "NODE")]
    pub hostname_override: Option<String>,

    /// The pod network, comma-separated (one per family): traffic from outside it to a ClusterIP is masqueraded.
    #[arg(long, value_name = "CIDR[,CIDR]")]
    pub cluster_cidr: Option<String>,

    /// Accept NodePorts only on local addresses within these CIDRs (default: every local address).
    #[arg(long, value_name = "CIDR[,CIDR...]")]
    pub nodeport_addresses: Option<String>,

    /// Masquerade all traffic sent to a ClusterIP.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub masquerade_all: Option<bool>,

    /// A KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) file; flags given explicitly override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// iptables mode: how a new connection finds its service: `tree` (destination-prefix
    /// chains, O(log N) rules) or `linear` (kube-proxy's flat KUBE-SERVICES list, O(N)).
    #[arg(long, value_name = "tree|linear")]
    pub iptables_dispatch: Option<String>,

    /// IPVS mode: the virtual servers' scheduler, rr (default), wrr, lc, sh or mh.
    #[arg(long, value_name = "NAME")]
    pub ipvs_scheduler: Option<String>,

    /// IPVS mode: set arp_ignore=1 and arp_announce=2 (for MetalLB-style L2 announcements).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub ipvs_strict_arp: Option<bool>,

    /// IPVS mode: virtual servers on addresses in these CIDRs are never deleted unless
    /// svcplane programs them (someone else's, e.g. keepalived's or kube-vip's), by syncs
    /// or cleanup. Comma-separated or repeated.
    #[arg(long, value_name = "CIDR[,CIDR...]", value_delimiter = ',')]
    pub ipvs_exclude_cidrs: Vec<String>,

    /// IPVS mode: the timeout of idle established TCP connections (Go duration, whole
    /// seconds; 0 leaves the kernel's, 15m by default), set at startup.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_tcp_timeout: Option<String>,

    /// IPVS mode: the timeout of TCP connections after a FIN (Go duration; 0 leaves the
    /// kernel's, 2m by default), set at startup.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_tcpfin_timeout: Option<String>,

    /// IPVS mode: the timeout of UDP flows (Go duration; 0 leaves the kernel's, 5m by
    /// default), set at startup.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_udp_timeout: Option<String>,

    #[command(flatten)]
    pub ebpf: EbpfArgs,

    #[command(flatten)]
    pub allocation: AllocationArgs,
}

/// What the standalone mode allocates for a manifest that leaves it to the API server
/// (kube-apiserver's flags and defaults).
#[derive(Debug, Args, Clone, Default)]
pub struct AllocationArgs {
    /// --manifests: ClusterIPs for Services without one come from these ranges (one per
    /// family, the primary first), as kube-apiserver allocates them. Without it such a
    /// Service is reported and skipped.
    #[arg(long, value_name = "CIDR[,CIDR]")]
    pub service_cluster_ip_range: Option<String>,
    /// --manifests: nodePorts (and healthCheckNodePorts) for Services without one come
    /// from this range (default 30000-32767).
    #[arg(long, value_name = "FIRST-LAST")]
    pub service_node_port_range: Option<String>,
}

impl AllocationArgs {
    pub fn config(&self) -> anyhow::Result<svcplane_source::AllocatorConfig> {
        use anyhow::Context;
        let mut config = svcplane_source::AllocatorConfig::default();
        if let Some(s) = &self.service_cluster_ip_range {
            config.cluster_ip_ranges =
                svcplane_source::allocator::parse_service_cluster_ip_range(s)
                    .map_err(anyhow::Error::msg)
                    .context("--service-cluster-ip-range")?;
        }
        if let Some(s) = &self.service_node_port_range {
            config.node_ports = s
                .parse()
                .map_err(anyhow::Error::msg)
                .context("--service-node-port-range")?;
        }
        Ok(config)
    }
}

/// eBPF mode's settings (`--proxy-mode ebpf`; other modes ignore them).
#[derive(Debug, Args, Clone, Default)]
pub struct EbpfArgs {
    /// bpffs directory of eBPF mode's pinned maps and program links (default /sys/fs/bpf/svcplane).
    #[arg(long, value_name = "DIR")]
    pub bpf_pin_path: Option<PathBuf>,
    /// cgroup v2 directory the socket load balancer attaches to (default: the cgroup2 root).
    #[arg(long, value_name = "DIR")]
    pub cgroup_path: Option<PathBuf>,
    /// Service map entries: one per frontend plus one per backend slot (default 327680).
    #[arg(long, value_name = "N")]
    pub bpf_lb_map_max: Option<u32>,
    /// Backend map entries (default 262144).
    #[arg(long, value_name = "N")]
    pub bpf_backend_map_max: Option<u32>,
    /// Reverse-NAT map entries, one per translated socket and backend (LRU, default 262144).
    #[arg(long, value_name = "N")]
    pub bpf_revnat_map_max: Option<u32>,
    /// Session affinity map entries (LRU, default 65536).
    #[arg(long, value_name = "N")]
    pub bpf_affinity_map_max: Option<u32>,
    /// Also program the north-south nftables table (NodePorts, LoadBalancer IPs and
    /// externalIPs reached from outside the node); false leaves that traffic to something
    /// else (default true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub ebpf_north_south: Option<bool>,
    /// Translate only the host network namespace's sockets (Cilium's
    /// bpf-lb-sock-hostns-only, for service meshes); pods go through the north-south table.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub ebpf_socket_lb_hostns_only: Option<bool>,
}

impl EbpfArgs {
    /// The backend options; a zero size is refused, naming the flag.
    pub fn options(&self) -> anyhow::Result<svcplane_dataplane::EbpfOptions> {
        let mut o = svcplane_dataplane::EbpfOptions::default();
        if let Some(p) = &self.bpf_pin_path {
            o.pin_path = p.clone();
        }
        o.cgroup_path = self.cgroup_path.clone();
        if let Some(ns) = self.ebpf_north_south {
            o.north_south = ns;
        }
        if let Some(h) = self.ebpf_socket_lb_hostns_only {
            o.hostns_only = h;
        }
        for (flag, value, slot) in [
            (
                "--bpf-lb-map-max",
                self.bpf_lb_map_max,
                &mut o.service_map_max,
            ),
            (
                "--bpf-backend-map-max",
                self.bpf_backend_map_max,
                &mut o.backend_map_max,
            ),
            (
                "--bpf-revnat-map-max",
                self.bpf_revnat_map_max,
                &mut o.revnat_map_max,
            ),
            (
                "--bpf-affinity-map-max",
                self.bpf_affinity_map_max,
                &mut o.affinity_map_max,
            ),
        ] {
            match value {
                Some(0) => anyhow::bail!("{flag}: 0 is not a map size"),
                Some(n) => *slot = n,
                None => {}
            }
        }
        Ok(o)
    }
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub engine: EngineArgs,

    /// Address for /metrics (default 127.0.0.1:10249).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_bind_address: Option<String>,

    /// Address for /healthz and /livez (default 0.0.0.0:10256).
    #[arg(long, value_name = "IP:PORT")]
    pub healthz_bind_address: Option<String>,

    /// Minimum time between syncs when changes arrive (Go duration, default 1s).
    #[arg(long, value_name = "DURATION")]
    pub min_sync_period: Option<String>,

    /// Longest time between syncs (Go duration, default 30s); each checks that the rules are
    /// still in place. A full rewrite runs hourly.
    #[arg(long, value_name = "DURATION")]
    pub sync_period: Option<String>,

    /// Also serve cluster DNS on this address (UDP and TCP), from the same objects.
    #[arg(long, value_name = "IP:PORT")]
    pub dns_listen: Option<String>,

    #[command(flatten)]
    pub api: ApiArgs,

    #[command(flatten)]
    pub dns: DnsOptions,

    /// kube-proxy's flag: remove everything svcplane programmed (every mode), then exit,
    /// as `svcplane cleanup`.
    #[arg(long)]
    pub cleanup: bool,

    #[command(flatten)]
    pub kube_proxy: crate::compat::KubeProxyFlags,
}

/// The Kubernetes API source (kube-proxy's flag names). Without --manifests and
/// --kubeconfig/--master, the in-cluster service account is used when
/// KUBERNETES_SERVICE_HOST is set.
#[derive(Debug, Args, Clone, Default)]
pub struct ApiArgs {
    /// A kubeconfig file: watch Services, EndpointSlices and this node's Node through it.
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,

    /// The API server's URL (overrides the kubeconfig's server).
    #[arg(long, value_name = "URL", conflicts_with = "manifests")]
    pub master: Option<String>,

    /// Requests per second to the API server (client-side token bucket; 0: unlimited; default 5).
    #[arg(long = "kube-api-qps", visible_alias = "api-qps", value_name = "QPS")]
    pub qps: Option<f32>,

    /// Burst of requests to the API server (default 10).
    #[arg(long = "kube-api-burst", visible_alias = "api-burst", value_name = "N")]
    pub burst: Option<u32>,
}

/// DNS flags shared by `dns` and `proxy --dns-listen`.
#[derive(Debug, Args, Clone)]
pub struct DnsOptions {
    /// The cluster domain served.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// TTL of the answers (and of negative answers), seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = svcplane_dns::records::DEFAULT_TTL)]
    pub ttl: u32,

    /// Upstream servers for names outside the cluster domain, comma-separated (port 53 when
    /// omitted). `dns` default: none (REFUSED); `proxy` default: /etc/resolv.conf's nameservers.
    #[arg(long, value_name = "IP[:PORT],...")]
    pub dns_upstream: Option<String>,

    /// Clients allowed to have names outside the cluster domain forwarded, comma-separated
    /// (default: loopback and --cluster-cidr).
    #[arg(long, value_name = "CIDR,...")]
    pub dns_allow: Option<String>,
}

#[derive(Debug, Args)]
pub struct DnsArgs {
    /// Directory of Kubernetes manifests (*.yaml, *.yml, *.json), watched for changes.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,

    /// Address to serve DNS on (UDP and TCP).
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:53")]
    pub listen: String,

    /// The pod network, comma-separated: these clients may recurse (with loopback).
    #[arg(long, value_name = "CIDR[,CIDR]")]
    pub cluster_cidr: Option<String>,

    /// Address for /metrics (svcplane_dns_*); off when not given.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_bind_address: Option<String>,

    #[command(flatten)]
    pub allocation: AllocationArgs,

    #[command(flatten)]
    pub dns: DnsOptions,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    svcplane trace --manifests examples/cluster --hostname-override node-a --cluster-cidr 10.244.0.0/16 --to 10.96.0.10:80\n  \
    svcplane trace --manifests examples/cluster --node node-a --to 10.0.0.11:30080 --from 192.0.2.7\n  \
    svcplane trace --manifests examples/cluster --proxy-mode iptables web.demo.svc.cluster.local:80 --from 10.244.1.20\n  \
    svcplane trace --kubeconfig ~/.kube/config --node worker-1 --to 10.96.0.10:53 --proto udp --json")]
pub struct TraceArgs {
    /// A Service name to resolve as the cluster DNS does (`NAME.NS.svc.cluster.local`),
    /// optionally with the Service port (`:PORT`, needed when it has several).
    #[arg(
        value_name = "NAME[:PORT]",
        conflicts_with = "to",
        required_unless_present = "to"
    )]
    pub name: Option<String>,

    /// The destination: a ClusterIP, externalIP or LoadBalancer IP with the Service port,
    /// or one of the node's addresses with a NodePort.
    #[arg(long, value_name = "IP:PORT")]
    pub to: Option<std::net::SocketAddr>,

    /// The source address: a pod (in --cluster-cidr; taken to be on the node), the node
    /// itself, or anything else (outside the node). Without it, source-dependent
    /// decisions are given for each kind of source.
    #[arg(long, value_name = "IP")]
    pub from: Option<std::net::IpAddr>,

    /// The protocol: tcp, udp or sctp.
    #[arg(long, value_name = "PROTO", default_value = "tcp")]
    pub proto: String,

    /// The node the connection arrives at (the proxy's --hostname-override there).
    #[arg(long, value_name = "NODE", conflicts_with = "hostname_override")]
    pub node: Option<String>,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// The cluster domain the names are in.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    #[command(flatten)]
    pub engine: EngineArgs,

    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Default, Args)]
pub struct CleanupArgs {
    /// Only this mode's rules (default: every mode).
    #[arg(long, value_name = "MODE", conflicts_with = "kube_proxy")]
    pub proxy_mode: Option<String>,

    /// Instead, remove what kube-proxy left on this node (its nftables tables, iptables
    /// chains and the jumps to them, IPVS virtual servers); svcplane's rules stay.
    #[arg(long)]
    pub kube_proxy: bool,

    /// Where eBPF mode's pins are (default /sys/fs/bpf/svcplane).
    #[arg(long, value_name = "DIR")]
    pub bpf_pin_path: Option<PathBuf>,

    /// IPVS virtual servers on addresses in these CIDRs stay (as the proxy's flag; with
    /// --kube-proxy too).
    #[arg(long, value_name = "CIDR[,CIDR...]", value_delimiter = ',')]
    pub ipvs_exclude_cidrs: Vec<String>,

    /// The proxy's KubeProxyConfiguration file: its `ipvs.excludeCIDRs` (read when its
    /// mode is ipvs, as the proxy reads them) apply when --ipvs-exclude-cidrs is not given.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LabArgs {
    /// The manifests: with a Deployment (examples/lab), the DNS → VIP → Pod walk per mode;
    /// without (examples/cluster), that example's Service-path probes in nftables mode.
    #[arg(long, value_name = "DIR", default_value = "examples/lab")]
    pub manifests: PathBuf,

    /// A mode to walk (repeatable or comma-separated; default: every mode, those this
    /// kernel cannot run are reported as such).
    #[arg(long = "proxy-mode", value_name = "MODE", value_delimiter = ',')]
    pub proxy_modes: Vec<String>,

    /// Keep the (last mode's) cluster until Ctrl-C, to look around.
    #[arg(long)]
    pub keep: bool,

    /// Print the result as JSON on stdout (the walk goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// examples/cluster's probes: the node that runs the proxy.
    #[arg(
        long = "hostname-override",
        value_name = "NODE",
        default_value = "node-a"
    )]
    pub node: String,

    /// examples/cluster's probes: the pod network (covers the example's pods).
    #[arg(
        long,
        value_name = "CIDR[,CIDR]",
        default_value = "10.244.0.0/16,fd00:244::/32"
    )]
    pub cluster_cidr: String,
}
