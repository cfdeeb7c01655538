//! `svcplane proxy --proxy-mode ipvs` against a real IPVS kernel (root): a two-node
//! virtual cluster from the test kit, the proxy on node-a, traffic through the virtual
//! servers, and the seed's check: `ipvsadm -L -n` on the node lists exactly what
//! `svcplane render --proxy-mode ipvs` says it programs. Then cleanup removes it all.
//!
//! This machine's kernel has no IPVS: the tests print `SKIP` with the reason there, and
//! `make test-ipvs` runs them in a VM with Debian's stock kernel.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use svcplane_testkit::{
    Cluster, EchoReply, Manifests, PodSpec, Proto, ProxyHandle, RequestError, parse_echo,
    run_checked, skip_unless_root, wait_until,
};

const T: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(30);

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.7.1
  clusterIPs: [10.96.7.1, "fd00:96::7:1"]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  selector: {app: dns}
  clusterIP: 10.96.7.3
  ports:
    - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}
    - {name: dns-udp, port: 53, protocol: UDP, targetPort: 5354}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  selector: {app: web}
  clusterIP: 10.96.7.4
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  selector: {app: nothing}
  clusterIP: 10.96.7.9
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

/// Why IPVS tests cannot run here, or `None` when they can (root, tools, and a kernel
/// with IPVS: `modprobe ip_vs` succeeds, or it is built in).
fn skip_reason() -> Option<String> {
    if skip_unless_root(&["ip", "nft", "ipvsadm"]) {
        return Some("not root, or a tool is missing (see above)".into());
    }
    for module in ["ip_vs", "dummy"] {
        let _ = Command::new("modprobe")
            .arg(module)
            .stderr(std::process::Stdio::null())
            .status();
    }
    if !std::path::Path::new("/proc/net/ip_vs").exists() {
        return Some(
            "this kernel has no IPVS (modprobe ip_vs failed, no /proc/net/ip_vs); \
             `make test-ipvs` runs these tests in a VM with Debian's kernel"
                .into(),
        );
    }
    None
}

fn skip(name: &str) -> bool {
    match skip_reason() {
        None => false,
        Some(why) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "SKIP ipvs/{name}: {why}");
            true
        }
    }
}

struct Env {
    proxy: Option<ProxyHandle>,
    manifests: Manifests,
    cluster: Cluster,
}

impl Env {
    fn start(extra: &[&str]) -> Env {
        Self::start_with(extra, |_, _| {})
    }

    /// [`Env::start`], with `before` run on the cluster and its manifests before the
    /// proxy starts.
    fn start_with(extra: &[&str], before: impl FnOnce(&Cluster, &Manifests)) -> Env {
        let cluster = Cluster::builder()
            .node("node-a", "zone-a")
            .node("node-b", "zone-b")
            .pod(PodSpec::new("client-a", "node-a"))
            .pod(
                PodSpec::new("web-a", "node-a")
                    .label("app", "web")
                    .tcp(&[8080]),
            )
            .pod(
                PodSpec::new("web-b", "node-b")
                    .label("app", "web")
                    .tcp(&[8080]),
            )
            .pod(
                PodSpec::new("dns-b", "node-b")
                    .label("app", "dns")
                    .tcp(&[5353])
                    .udp(&[5354]),
            )
            .build()
            .expect("virtual cluster");
        let manifests = cluster.manifests().expect("manifests");
        manifests
            .write("services.yaml", SERVICES)
            .expect("services");
        before(&cluster, &manifests);
        let mut args = vec!["--proxy-mode", "ipvs"];
        args.extend_from_slice(extra);
        let proxy = cluster
            .run_proxy(
                env!("CARGO_BIN_EXE_svcplane"),
                "node-a",
                manifests.path(),
                &args,
            )
            .expect("svcplane proxy --proxy-mode ipvs on node-a");
        Env {
            proxy: Some(proxy),
            manifests,
            cluster,
        }
    }

    fn on_node_a(&self, program: &str, args: &[&str]) -> String {
        on_node_a(&self.cluster, program, args)
    }

    /// SIGTERM to the proxy, which must exit cleanly (leaving its rules).
    fn stop_proxy(&mut self) {
        let status = self
            .proxy
            .take()
            .expect("proxy")
            .terminate()
            .expect("terminate");
        assert!(status.success(), "proxy exited with {status}");
    }

    fn pod_ip(&self, pod: &str) -> IpAddr {
        IpAddr::V4(self.cluster.pod(pod).expect("pod").ipv4())
    }

    fn try_tcp(&self, from: &str, dst: &str) -> Result<String, RequestError> {
        let dst: SocketAddr = dst.parse().expect("address");
        if from == "client" {
            self.cluster.tcp_request(self.cluster.client(), dst, T)
        } else {
            self.cluster
                .tcp_request(self.cluster.pod(from).expect("pod"), dst, T)
        }
    }

    fn tcp(&self, from: &str, dst: &str) -> EchoReply {
        let r = self
            .try_tcp(from, dst)
            .unwrap_or_else(|e| panic!("TCP {from} -> {dst}: {e}"));
        parse_echo(&r).expect("echo reply")
    }

    /// Requests until both web pods answered (rr alternates, so a handful suffice).
    fn spread(&self, from: &str, dst: &str) -> Vec<EchoReply> {
        let want: BTreeSet<IpAddr> = [self.pod_ip("web-a"), self.pod_ip("web-b")].into();
        let mut seen = BTreeSet::new();
        let mut replies = Vec::new();
        for _ in 0..16 {
            let r = self.tcp(from, dst);
            assert!(want.contains(&r.pod), "unexpected endpoint {r:?}");
            seen.insert(r.pod);
            replies.push(r);
            if seen == want {
                break;
            }
        }
        assert_eq!(seen, want, "not every endpoint answered");
        replies
    }

    /// The virtual-server lines of `ipvsadm -L -n` (connection counters cut off), sorted.
    fn ipvsadm(&self) -> BTreeSet<String> {
        normalize(&self.on_node_a("ipvsadm", &["-L", "-n"]))
    }
}

fn on_node_a(cluster: &Cluster, program: &str, args: &[&str]) -> String {
    let node = cluster.node("node-a").expect("node");
    let out = run_checked(&mut node.netns().command(program, args))
        .unwrap_or_else(|e| panic!("{program} {args:?} on node-a: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Service and real-server lines of an `ipvsadm -L -n` listing, without the version
/// line, the header and the counters (which a render cannot know).
fn normalize(listing: &str) -> BTreeSet<String> {
    listing
        .lines()
        .filter(|l| {
            !(l.starts_with("IP Virtual Server")
                || l.starts_with("Prot ")
                || l.starts_with("  -> RemoteAddress"))
        })
        .filter(|l| {
            l.starts_with("TCP")
                || l.starts_with("UDP")
                || l.starts_with("SCTP")
                || l.starts_with("  ->")
        })
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            if l.starts_with("  ->") {
                // -> addr Forward Weight (ActiveConn InActConn dropped)
                words[..words.len().min(4)].join(" ")
            } else {
                words.join(" ")
            }
        })
        .collect()
}

/// The virtual-server part of `svcplane render --proxy-mode ipvs` for node-a.
fn rendered(env: &Env) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_svcplane"))
        .args([
            "render",
            "--proxy-mode",
            "ipvs",
            "--hostname-override",
            "node-a",
        ])
        .args(["--cluster-cidr", svcplane_testkit::CLUSTER_CIDR])
        .arg("--manifests")
        .arg(env.manifests.path())
        .output()
        .expect("svcplane render");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let listing = text.split("# addresses on").next().unwrap_or("");
    normalize(listing)
}

#[test]
fn ipvs_mode_programs_serves_follows_changes_and_cleans_up() {
    if skip("ipvs_mode_programs_serves_follows_changes_and_cleans_up") {
        return;
    }
    let mut env = Env::start(&["--sync-period", "2s"]);
    // The seed's check: ipvsadm lists exactly what svcplane says it programs.
    let want = rendered(&env);
    assert!(
        want.iter().any(|l| l.starts_with("TCP 10.96.7.1:80 rr")),
        "render: {want:?}"
    );
    assert!(
        wait_until(WAIT, || env.ipvsadm() == want),
        "ipvsadm -L -n:\n{:?}\nrender:\n{want:?}",
        env.ipvsadm()
    );
    let dummy = env.on_node_a("ip", &["-o", "addr", "show", "dev", "svcplane-ipvs0"]);
    for vip in ["10.96.7.1/32", "fd00:96::7:1/128", "10.96.7.9/32"] {
        assert!(dummy.contains(vip), "{vip} not on svcplane-ipvs0: {dummy}");
    }

    // Traffic: a pod (source kept), the external client through the NodePort
    // (masqueraded to node-a), TCP and UDP on one port, the v6 ClusterIP.
    let client_a = env.pod_ip("client-a");
    for r in env.spread("client-a", "10.96.7.1:80") {
        assert_eq!(r.port, 8080);
        assert_eq!(r.peer.ip(), client_a, "pod traffic keeps its source: {r:?}");
    }
    let node_a = IpAddr::V4(env.cluster.node("node-a").expect("node").ipv4());
    for r in env.spread("client", &format!("{node_a}:30080")) {
        assert_eq!(
            r.peer.ip(),
            node_a,
            "NodePort traffic is masqueraded: {r:?}"
        );
    }
    let six = env
        .cluster
        .tcp_request(
            env.cluster.pod("client-a").expect("pod"),
            "[fd00:96::7:1]:80".parse().expect("addr"),
            T,
        )
        .expect("v6 ClusterIP");
    assert!(parse_echo(&six).is_ok(), "{six}");
    let dns = env.pod_ip("dns-b");
    let tcp = env.tcp("client-a", "10.96.7.3:53");
    assert_eq!((tcp.pod, tcp.proto, tcp.port), (dns, Proto::Tcp, 5353));
    let udp = env
        .cluster
        .udp_request(
            env.cluster.pod("client-a").expect("pod"),
            "10.96.7.3:53".parse().expect("addr"),
            T,
        )
        .expect("UDP through IPVS");
    let udp = parse_echo(&udp).expect("echo");
    assert_eq!((udp.pod, udp.proto, udp.port), (dns, Proto::Udp, 5354));
    // ClientIP affinity: IPVS persistence keeps one endpoint.
    let first = env.tcp("client-a", "10.96.7.4:80").pod;
    for _ in 0..6 {
        assert_eq!(env.tcp("client-a", "10.96.7.4:80").pod, first);
    }
    // No endpoints: rejected at once. A port no service uses on a ClusterIP: rejected.
    assert!(
        matches!(
            env.try_tcp("client-a", "10.96.7.9:80"),
            Err(RequestError::Refused)
        ),
        "a service without endpoints must be rejected"
    );
    assert!(
        matches!(
            env.try_tcp("client-a", "10.96.7.1:22"),
            Err(RequestError::Refused)
        ),
        "an unused port of a ClusterIP must be rejected"
    );

    // A change: web loses web-b (not ready). Only that real server goes.
    let pods = std::fs::read_to_string(env.manifests.path().join("pods.yaml")).expect("pods");
    let marker = "name: \"web-b\"";
    let at = pods.find(marker).expect("web-b in pods.yaml");
    let (head, tail) = pods.split_at(at);
    let tail = tail.replacen("status: \"True\"", "status: \"False\"", 1);
    env.manifests
        .write("pods.yaml", &format!("{head}{tail}"))
        .expect("pods.yaml");
    // Graceful termination: web-b had TCP connections (in TIME_WAIT now), so its real
    // servers stay at weight 0, taking no new connection, until those are gone (minutes:
    // IPVS's TIME_WAIT timeout); with none it would be deleted at once.
    let pod_b = env.cluster.pod("web-b").expect("pod");
    let web_b = [
        format!("-> {}:8080", pod_b.ipv4()),
        format!("-> [{}]:8080", pod_b.ipv6()),
    ];
    let is_web_b = |l: &String| web_b.iter().any(|w| l.starts_with(w.as_str()));
    let drained = |l: &String| !is_web_b(l) || l.ends_with(" 0");
    assert!(
        wait_until(WAIT, || env.ipvsadm().iter().all(drained)),
        "web-b still takes connections: {:?}",
        env.ipvsadm()
    );
    let listed: BTreeSet<String> = env.ipvsadm().into_iter().filter(|l| !is_web_b(l)).collect();
    assert_eq!(listed, rendered(&env));
    for _ in 0..4 {
        assert_eq!(env.tcp("client-a", "10.96.7.1:80").pod, env.pod_ip("web-a"));
    }

    // Wrecked behind the proxy's back: the dummy interface and the filter tables come back.
    env.on_node_a("ip", &["link", "del", "svcplane-ipvs0"]);
    env.on_node_a("nft", &["flush", "ruleset"]);
    assert!(
        wait_until(WAIT, || env.try_tcp("client-a", "10.96.7.1:80").is_ok()),
        "not repaired by the periodic check"
    );

    // SIGTERM leaves the rules; cleanup removes them all.
    env.stop_proxy();
    assert!(!env.ipvsadm().is_empty());
    env.on_node_a(
        env!("CARGO_BIN_EXE_svcplane"),
        &["cleanup", "--proxy-mode", "ipvs"],
    );
    assert!(env.ipvsadm().is_empty(), "left: {:?}", env.ipvsadm());
    let node = env.cluster.node("node-a").expect("node");
    let link = node
        .netns()
        .command("ip", &["link", "show", "svcplane-ipvs0"])
        .output()
        .expect("ip link");
    assert!(!link.status.success(), "svcplane-ipvs0 is still there");
    let tables = env.on_node_a("nft", &["list", "tables"]);
    assert!(!tables.contains("svcplane-ipvs"), "{tables}");
}

/// Services over the web pods with the scheduler annotation: `sched` with `scheduler`,
/// `bad-sched` with one the kernel does not have.
fn annotated(scheduler: &str) -> String {
    let one = |name: &str, ip: &str, scheduler: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  \
             annotations: {{kube-router.io/service.scheduler: \"{scheduler}\"}}\n\
             spec:\n  selector: {{app: web}}\n  clusterIP: {ip}\n  \
             ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n"
        )
    };
    one("sched", "10.96.7.5", scheduler) + &one("bad-sched", "10.96.7.6", "fancy")
}

#[test]
fn scheduler_flag_and_annotation_reach_the_kernel() {
    if skip("scheduler_flag_and_annotation_reach_the_kernel") {
        return;
    }
    let env = Env::start(&["--ipvs-scheduler", "lc", "--sync-period", "2s"]);
    assert!(
        wait_until(WAIT, || env
            .ipvsadm()
            .iter()
            .any(|l| l == "TCP 10.96.7.1:80 lc")),
        "{:?}",
        env.ipvsadm()
    );
    assert!(
        env.ipvsadm()
            .iter()
            .any(|l| l == "TCP 10.96.7.4:80 lc persistent 300"),
        "{:?}",
        env.ipvsadm()
    );

    // The annotation picks a Service's scheduler; an unknown one falls back to the
    // flag's (with a warning, checked by the model's tests).
    env.manifests
        .write("annotated.yaml", &annotated("sh"))
        .expect("annotated.yaml");
    let has = |line: &str| env.ipvsadm().contains(line);
    assert!(
        wait_until(WAIT, || has("TCP 10.96.7.5:80 sh")
            && has("TCP 10.96.7.6:80 lc")),
        "{:?}",
        env.ipvsadm()
    );
    // Source hashing: one client, one endpoint (rr or lc would alternate between the
    // two idle web pods).
    let first = env.tcp("client-a", "10.96.7.5:80").pod;
    for _ in 0..8 {
        assert_eq!(
            env.tcp("client-a", "10.96.7.5:80").pod,
            first,
            "sh must stick"
        );
    }
    // Changed in place: the virtual server is edited, not re-created.
    env.manifests
        .write("annotated.yaml", &annotated("wrr"))
        .expect("annotated.yaml");
    assert!(
        wait_until(WAIT, || has("TCP 10.96.7.5:80 wrr")),
        "{:?}",
        env.ipvsadm()
    );
    assert!(has("TCP 10.96.7.1:80 lc"), "{:?}", env.ipvsadm());
    env.spread("client-a", "10.96.7.5:80");
}

#[test]
fn another_mode_removes_ipvs_leftovers_at_startup() {
    if skip("another_mode_removes_ipvs_leftovers_at_startup") {
        return;
    }
    let mut env = Env::start(&[]);
    assert!(
        wait_until(WAIT, || !env.ipvsadm().is_empty()),
        "nothing programmed"
    );
    env.stop_proxy();
    let nft = env
        .cluster
        .run_proxy(
            env!("CARGO_BIN_EXE_svcplane"),
            "node-a",
            env.manifests.path(),
            &["--proxy-mode", "nftables"],
        )
        .expect("svcplane proxy --proxy-mode nftables");
    assert!(env.ipvsadm().is_empty(), "left: {:?}", env.ipvsadm());
    let tables = env.on_node_a("nft", &["list", "tables"]);
    assert!(!tables.contains("svcplane-ipvs"), "{tables}");
    // And the nftables mode serves the same Service.
    assert_eq!(env.tcp("client-a", "10.96.7.3:53").port, 5353);
    drop(nft);
}

/// Services for `--ipvs-exclude-cidrs 10.96.8.0/24`: `kept` and `frozen` in that range,
/// `stale` outside it; the test deletes the last two.
fn excluded_services(with_deleted: bool) -> String {
    let one = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  selector: {{app: web}}\n  clusterIP: {ip}\n  \
             ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n"
        )
    };
    let mut out = one("kept", "10.96.8.1");
    if with_deleted {
        out += &one("frozen", "10.96.8.2");
        out += &one("stale", "10.96.7.20");
    }
    out
}

#[test]
fn excluded_cidrs_are_spared_and_timeouts_reach_the_kernel() {
    if skip("excluded_cidrs_are_spared_and_timeouts_reach_the_kernel") {
        return;
    }
    let mut env = Env::start_with(
        &[
            "--ipvs-exclude-cidrs",
            "10.96.8.0/24",
            "--ipvs-tcp-timeout",
            "1h",
            "--ipvs-tcpfin-timeout",
            "1m30s",
            "--sync-period",
            "2s",
        ],
        |cluster, manifests| {
            manifests
                .write("excluded.yaml", &excluded_services(true))
                .expect("excluded.yaml");
            // Someone else's virtual servers on addresses svcplane's dummy will hold: one
            // in the excluded range, one not. And a UDP timeout of theirs, which the
            // proxy's unset (0) --ipvs-udp-timeout leaves alone.
            on_node_a(
                cluster,
                "ipvsadm",
                &["-A", "-t", "10.96.8.1:9999", "-s", "rr"],
            );
            on_node_a(
                cluster,
                "ipvsadm",
                &["-A", "-t", "10.96.7.1:9999", "-s", "rr"],
            );
            on_node_a(cluster, "ipvsadm", &["--set", "0", "0", "77"]);
        },
    );
    let has = |line: &str| env.ipvsadm().contains(line);
    // The first (full) sync: the foreign one outside the range goes, the excluded one
    // stays; svcplane's own in the range are programmed as any other and serve.
    assert!(
        wait_until(WAIT, || has("TCP 10.96.8.1:80 rr")
            && has("TCP 10.96.7.20:80 rr")
            && !has("TCP 10.96.7.1:9999 rr")),
        "{:?}",
        env.ipvsadm()
    );
    assert!(has("TCP 10.96.8.1:9999 rr"), "{:?}", env.ipvsadm());
    env.spread("client-a", "10.96.8.1:80");

    // The timeouts, read back over netlink (IPVS_CMD_GET_CONFIG) and by ipvsadm.
    let node = env.cluster.node("node-a").expect("node");
    let mut ipvs = svcplane_dataplane::ipvs::genl::Ipvs::open(Some(node.netns().name()))
        .expect("IPVS in node-a's namespace");
    let want = svcplane_dataplane::ipvs::Timeouts {
        tcp: 3600,
        tcp_fin: 90,
        udp: 77,
    };
    assert_eq!(ipvs.timeouts().expect("GET_CONFIG"), want);
    let listed = env.on_node_a("ipvsadm", &["-L", "--timeout"]);
    assert!(
        listed.contains("Timeout (tcp tcpfin udp): 3600 90 77"),
        "{listed}"
    );

    // A partial sync deleting two Services: the one outside the range goes, the one in
    // it stays (kube-proxy skips excluded addresses in its stale-service cleanup); both
    // addresses leave the dummy, as there.
    env.manifests
        .write("excluded.yaml", &excluded_services(false))
        .expect("excluded.yaml");
    assert!(
        wait_until(WAIT, || !has("TCP 10.96.7.20:80 rr")),
        "{:?}",
        env.ipvsadm()
    );
    assert!(has("TCP 10.96.8.2:80 rr"), "{:?}", env.ipvsadm());
    assert!(has("TCP 10.96.8.1:9999 rr"), "{:?}", env.ipvsadm());
    let dummy = env.on_node_a("ip", &["-o", "addr", "show", "dev", "svcplane-ipvs0"]);
    assert!(!dummy.contains("10.96.8.2/32"), "{dummy}");

    // A full sync (the dummy deleted behind the proxy's back): a new foreign virtual
    // server outside the range goes, the excluded one still stays.
    env.on_node_a("ipvsadm", &["-A", "-t", "10.96.7.1:9998", "-s", "rr"]);
    env.on_node_a("ip", &["link", "del", "svcplane-ipvs0"]);
    assert!(
        wait_until(WAIT, || !has("TCP 10.96.7.1:9998 rr")
            && env.try_tcp("client-a", "10.96.8.1:80").is_ok()),
        "{:?}",
        env.ipvsadm()
    );
    assert!(has("TCP 10.96.8.1:9999 rr"), "{:?}", env.ipvsadm());

    // Cleanup with the same exclusion removes svcplane's virtual servers but those in
    // the range (kube-proxy's --cleanup flushes every one; svcplane's spares what is
    // not its own).
    env.stop_proxy();
    env.on_node_a(
        env!("CARGO_BIN_EXE_svcplane"),
        &[
            "cleanup",
            "--proxy-mode",
            "ipvs",
            "--ipvs-exclude-cidrs",
            "10.96.8.0/24",
        ],
    );
    let left: BTreeSet<String> = env
        .ipvsadm()
        .into_iter()
        .filter(|l| !l.starts_with("->"))
        .collect();
    let want: BTreeSet<String> = [
        "TCP 10.96.8.1:80 rr",
        "TCP 10.96.8.1:9999 rr",
        "TCP 10.96.8.2:80 rr",
    ]
    .map(String::from)
    .into();
    assert_eq!(left, want);
}
