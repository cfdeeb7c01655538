//! Cluster DNS asked by real resolvers (root): `dig` (bind9-dnsutils) against
//! `svcplane dns` in a scratch namespace over UDP and TCP, and glibc's resolver in a pod
//! (search list, ndots:5) against `svcplane proxy --dns-listen` in a virtual cluster.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use svcplane_testkit::{
    Cluster, Daemon, Netns, PodSpec, in_netns, parse_echo, skip_unless_root, wait_until,
};

const WAIT: Duration = Duration::from_secs(20);

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  clusterIPs: [10.96.5.10, "fd00:96::5:10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec:
  type: ExternalName
  externalName: docs.example.com
"#;

/// A headless service with `n` ready endpoints (too many for one UDP answer when large).
fn headless(n: usize) -> String {
    let mut eps = String::new();
    for i in 0..n {
        eps.push_str(&format!(
            "  - {{addresses: [10.244.{}.{}]}}\n",
            100 + i / 250,
            i % 250 + 1
        ));
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: default}}\nspec:\n  clusterIP: None\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: big-1, namespace: default, labels: {{kubernetes.io/service-name: big}}}}\naddressType: IPv4\nports: [{{name: http, port: 80, protocol: TCP}}]\nendpoints:\n{eps}"
    )
}

fn write(dir: &Path, file: &str, text: &str) {
    // Written aside and renamed, so the watcher never reads half a file.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("write manifest");
    std::fs::rename(&tmp, dir.join(file)).expect("rename manifest");
}

/// `dig` in `ns` against `server`: its stdout.
fn dig(ns: &Netns, server: &str, port: u16, args: &[&str]) -> String {
    let at = format!("@{server}");
    let port = port.to_string();
    let mut all = vec![at.as_str(), "-p", port.as_str(), "+time=2", "+tries=1"];
    all.extend_from_slice(args);
    let out = ns.command("dig", &all).output().expect("run dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(ns: &Netns, port: u16, args: &[&str]) -> Vec<String> {
    let mut all = vec!["+short"];
    all.extend_from_slice(args);
    let mut lines: Vec<String> = dig(ns, "127.0.0.1", port, &all)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

struct Standalone {
    ns: Netns,
    _dns: Daemon,
    dir: tempfile::TempDir,
}

const PORT: u16 = 53;

/// `svcplane dns` on 127.0.0.1:53 in a scratch namespace, serving SERVICES + `extra`.
fn standalone(extra: &[(&str, String)]) -> Option<Standalone> {
    if skip_unless_root(&["ip", "dig"]) {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "services.yaml", SERVICES);
    for (file, text) in extra {
        write(dir.path(), file, text);
    }
    let ns = Netns::new("svcplane-dns").expect("netns");
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_svcplane"), &["dns"]);
    cmd.arg("--manifests").arg(dir.path()).args([
        "--listen",
        "127.0.0.1:53",
        "--metrics-bind-address",
        "127.0.0.1:9153",
    ]);
    let dns = Daemon::spawn(cmd).expect("svcplane dns");
    assert!(
        wait_until(WAIT, || !short(
            &ns,
            PORT,
            &["web.default.svc.cluster.local"]
        )
        .is_empty()),
        "svcplane dns never answered"
    );
    Some(Standalone { ns, _dns: dns, dir })
}

#[test]
fn dig_over_udp_and_tcp() {
    let Some(env) = standalone(&[]) else { return };
    let ns = &env.ns;
    for transport in ["+notcp", "+tcp"] {
        assert_eq!(
            short(ns, PORT, &[transport, "web.default.svc.cluster.local", "A"]),
            ["10.96.5.10"],
            "{transport}"
        );
        assert_eq!(
            short(
                ns,
                PORT,
                &[transport, "WEB.Default.svc.cluster.local", "AAAA"]
            ),
            ["fd00:96::5:10"],
            "{transport}"
        );
        assert_eq!(
            short(
                ns,
                PORT,
                &[transport, "_http._tcp.web.default.svc.cluster.local", "SRV"]
            ),
            ["0 100 80 web.default.svc.cluster.local."],
            "{transport}"
        );
        assert_eq!(
            short(ns, PORT, &[transport, "-x", "10.96.5.10"]),
            ["web.default.svc.cluster.local."],
            "{transport}"
        );
    }
    assert_eq!(
        short(ns, PORT, &["dns-version.cluster.local", "TXT"]),
        ["\"1.1.0\""]
    );
    assert_eq!(
        short(ns, PORT, &["ext.default.svc.cluster.local", "CNAME"]),
        ["docs.example.com."]
    );
    let nx = dig(ns, "127.0.0.1", PORT, &["nope.default.svc.cluster.local"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(nx.contains("flags: qr aa rd"), "{nx}");
    assert!(nx.contains("IN\tSOA\tns.dns.cluster.local."), "{nx}");
    let nodata = dig(ns, "127.0.0.1", PORT, &["default.svc.cluster.local", "A"]);
    assert!(nodata.contains("status: NOERROR"), "{nodata}");
    assert!(nodata.contains("ANSWER: 0"), "{nodata}");
    // No upstream given: names outside the zone are refused, and so is AXFR.
    let out = dig(ns, "127.0.0.1", PORT, &["example.com"]);
    assert!(out.contains("status: REFUSED"), "{out}");
    let axfr = dig(ns, "127.0.0.1", PORT, &["cluster.local", "AXFR"]);
    assert!(axfr.contains("Transfer failed"), "{axfr}");
}

#[test]
fn truncated_over_udp_then_complete_over_tcp() {
    let Some(env) = standalone(&[("big.yaml", headless(200))]) else {
        return;
    };
    let ns = &env.ns;
    let name = "big.default.svc.cluster.local";
    assert!(
        wait_until(WAIT, || dig(ns, "127.0.0.1", PORT, &["+tcp", name])
            .contains("ANSWER: 200")),
        "the headless service was never served"
    );
    // Without TCP fallback the UDP answer is truncated (200 × 16 bytes > 1232).
    let udp = dig(ns, "127.0.0.1", PORT, &["+ignore", "+bufsize=1232", name]);
    assert!(udp.contains("flags: qr aa tc"), "no TC flag: {udp}");
    // dig retries over TCP by itself and gets all 200.
    let full = dig(ns, "127.0.0.1", PORT, &["+bufsize=1232", name]);
    assert!(full.contains("Truncated, retrying in TCP mode"), "{full}");
    assert!(full.contains("ANSWER: 200"), "{full}");
}

#[test]
fn changes_are_answered_without_a_restart() {
    let Some(env) = standalone(&[]) else { return };
    let ns = &env.ns;
    let name = "later.default.svc.cluster.local";
    assert!(short(ns, PORT, &[name]).is_empty());
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: later, namespace: default}\nspec:\n  clusterIP: 10.96.7.7\n  ports: [{port: 80}]\n";
    write(env.dir.path(), "later.yaml", svc);
    assert!(
        wait_until(WAIT, || short(ns, PORT, &[name]) == ["10.96.7.7"]),
        "the new service was never served"
    );
    write(
        env.dir.path(),
        "later.yaml",
        &svc.replace("10.96.7.7", "10.96.7.8"),
    );
    assert!(
        wait_until(WAIT, || short(ns, PORT, &[name]) == ["10.96.7.8"]),
        "the changed ClusterIP was never served"
    );
    std::fs::remove_file(env.dir.path().join("later.yaml")).expect("remove");
    assert!(
        wait_until(WAIT, || dig(ns, "127.0.0.1", PORT, &[name])
            .contains("NXDOMAIN")),
        "the deleted service was still served"
    );
}

#[test]
fn garbage_datagrams_never_stop_the_server() {
    let Some(env) = standalone(&[]) else { return };
    let ns = &env.ns;
    let sent = in_netns(ns.name(), || {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let server: SocketAddr = "127.0.0.1:53".parse().expect("addr");
        // A cheap deterministic generator: the same garbage on every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut sent = 0;
        for i in 0..3000usize {
            let len = i % 700;
            let mut packet = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                packet.push(x as u8);
            }
            // Every tenth packet looks like a query header, to get past the first checks.
            if i % 10 == 0 && len >= 12 {
                packet[2] = 0x01;
                packet[3] = 0;
                packet[4] = 0;
                packet[5] = 1;
            }
            if socket.send_to(&packet, server).is_ok() {
                sent += 1;
            }
        }
        sent
    })
    .expect("in netns");
    assert_eq!(sent, 3000);
    // TCP garbage too: a length prefix and noise.
    let _ = in_netns(ns.name(), || {
        use std::io::Write as _;
        if let Ok(mut s) = std::net::TcpStream::connect("127.0.0.1:53") {
            let _ = s.write_all(&[0x00, 0x20, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
        }
    });
    for transport in ["+notcp", "+tcp"] {
        assert_eq!(
            short(ns, PORT, &[transport, "web.default.svc.cluster.local"]),
            ["10.96.5.10"],
            "{transport}"
        );
    }
    let metrics = svcplane_testkit::http_get(
        ns.name(),
        "127.0.0.1:9153".parse().expect("addr"),
        "/metrics",
        Duration::from_secs(2),
    )
    .expect("GET /metrics");
    assert!(
        metrics
            .1
            .contains("svcplane_dns_responses_total{rcode=\"FORMERR\"}"),
        "{}",
        metrics.1
    );
    let formerr = svcplane_testkit::metric_value(
        &metrics.1,
        "svcplane_dns_responses_total{rcode=\"NOERROR\"}",
    )
    .unwrap_or(0.0);
    assert!(formerr >= 2.0, "{}", metrics.1);
}

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` bind-mounts over
/// /etc/resolv.conf; removed on drop.
struct NetnsResolvConf {
    dir: PathBuf,
}

impl NetnsResolvConf {
    fn write(netns: &str, text: &str) -> NetnsResolvConf {
        let dir = Path::new("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
        std::fs::write(dir.join("resolv.conf"), text).expect("write resolv.conf");
        NetnsResolvConf { dir }
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `getent ahosts NAME` in the pod (glibc's resolver, with the pod's resolv.conf).
fn getent(pod: &Netns, family: &str, name: &str) -> Vec<String> {
    let out = pod
        .command("getent", &[family, name])
        .output()
        .expect("run getent");
    let mut ips: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

#[test]
fn a_pod_resolves_a_short_name_through_the_proxy() {
    if skip_unless_root(&["ip", "nft", "getent", "dig"]) {
        return;
    }
    let cluster = Cluster::builder()
        .node("node-a", "zone-a")
        .pod(PodSpec::new("client", "node-a"))
        .pod(
            PodSpec::new("web-1", "node-a")
                .label("app", "web")
                .tcp(&[8080]),
        )
        .build()
        .expect("virtual cluster");
    let manifests = cluster.manifests().expect("manifests");
    manifests
        .write("services.yaml", SERVICES)
        .expect("services");
    let node = cluster.node("node-a").expect("node");
    let listen = format!("{}:53", node.ipv4());
    let proxy = cluster
        .run_proxy(
            env!("CARGO_BIN_EXE_svcplane"),
            "node-a",
            manifests.path(),
            &[
                "--dns-listen",
                &listen,
                "--metrics-bind-address",
                "127.0.0.1:10249",
            ],
        )
        .expect("svcplane proxy --dns-listen");
    let client = cluster.pod("client").expect("client pod");
    let _resolv = NetnsResolvConf::write(
        client.netns().name(),
        &format!(
            "nameserver {}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:1 attempts:2\n",
            node.ipv4()
        ),
    );
    assert!(
        wait_until(WAIT, || getent(client.netns(), "ahostsv4", "web")
            == ["10.96.5.10"]),
        "`web` did not resolve in the pod: {:?}",
        getent(client.netns(), "ahostsv4", "web")
    );
    assert_eq!(
        getent(client.netns(), "ahostsv6", "web.default"),
        ["fd00:96::5:10"]
    );
    // The answer agrees with the dataplane: the resolved ClusterIP reaches the pod.
    let reply = cluster
        .tcp_request(
            client,
            "10.96.5.10:80".parse().expect("addr"),
            Duration::from_secs(3),
        )
        .expect("request to the resolved ClusterIP");
    let web = cluster.pod("web-1").expect("web pod");
    let echo = parse_echo(&reply).expect("an echo reply");
    assert_eq!(echo.pod, std::net::IpAddr::V4(web.ipv4()), "{reply}");
    // Same object stream: an edit is served by DNS (and programmed) without a restart.
    manifests
        .write(
            "services.yaml",
            &SERVICES.replace("10.96.5.10", "10.96.5.11"),
        )
        .expect("edit services");
    assert!(
        wait_until(WAIT, || getent(client.netns(), "ahostsv4", "web")
            == ["10.96.5.11"]),
        "the edited ClusterIP was never served"
    );
    // dig from the pod over TCP too, and the DNS metrics are on the proxy's /metrics.
    let out = dig(
        client.netns(),
        &node.ipv4().to_string(),
        53,
        &["+tcp", "+short", "web.default.svc.cluster.local"],
    );
    assert_eq!(out.trim(), "10.96.5.11");
    let metrics = proxy.metrics().expect("proxy /metrics");
    assert!(
        metrics.contains("svcplane_dns_requests_total{type=\"A\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("kubeproxy_sync_proxy_rules_duration_seconds"));
}

#[test]
fn proxy_forwards_outside_names_to_the_nodes_resolver_for_pods_only() {
    if skip_unless_root(&["ip", "nft", "dig"]) {
        return;
    }
    let cluster = Cluster::builder()
        .node("node-a", "zone-a")
        .pod(PodSpec::new("client", "node-a"))
        .build()
        .expect("virtual cluster");
    let outside = cluster.client().netns();
    // The "node's resolver": another svcplane dns, for corp.test, on the external client.
    let upstream_dir = tempfile::tempdir().expect("tempdir");
    write(
        upstream_dir.path(),
        "it.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: intranet, namespace: it}\nspec:\n  clusterIP: 192.0.2.80\n  ports: [{port: 80}]\n",
    );
    let upstream_listen = format!("{}:53", svcplane_testkit::CLIENT_V4);
    let mut cmd = outside.command(env!("CARGO_BIN_EXE_svcplane"), &["dns"]);
    cmd.arg("--manifests").arg(upstream_dir.path()).args([
        "--listen",
        &upstream_listen,
        "--cluster-domain",
        "corp.test",
    ]);
    let _upstream = Daemon::spawn(cmd).expect("upstream svcplane dns");
    let intranet = "intranet.it.svc.corp.test";
    let client_ip = svcplane_testkit::CLIENT_V4.to_string();
    assert!(
        wait_until(WAIT, || dig(outside, &client_ip, 53, &["+short", intranet])
            .trim()
            == "192.0.2.80"),
        "the upstream never answered"
    );
    // `ip netns exec` gives the proxy this file as /etc/resolv.conf.
    let node = cluster.node("node-a").expect("node");
    let _node_resolv =
        NetnsResolvConf::write(node.netns().name(), &format!("nameserver {client_ip}\n"));
    let manifests = cluster.manifests().expect("manifests");
    manifests
        .write("services.yaml", SERVICES)
        .expect("services");
    let node_ip = node.ipv4().to_string();
    let listen = format!("{node_ip}:53");
    let _proxy = cluster
        .run_proxy(
            env!("CARGO_BIN_EXE_svcplane"),
            "node-a",
            manifests.path(),
            &["--dns-listen", &listen],
        )
        .expect("svcplane proxy --dns-listen");
    let pod = cluster.pod("client").expect("pod").netns();
    assert!(
        wait_until(WAIT, || dig(
            pod,
            &node_ip,
            53,
            &["+short", "web.default.svc.cluster.local"]
        )
        .trim()
            == "10.96.5.10"),
        "the proxy's DNS never answered"
    );
    // A pod (inside --cluster-cidr) has outside names forwarded, over UDP and TCP.
    for transport in ["+notcp", "+tcp"] {
        assert_eq!(
            dig(pod, &node_ip, 53, &[transport, "+short", intranet]).trim(),
            "192.0.2.80",
            "{transport}"
        );
    }
    // The external client is outside the allowed networks: refused, but served the zone.
    let refused = dig(outside, &node_ip, 53, &[intranet]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    assert_eq!(
        dig(
            outside,
            &node_ip,
            53,
            &["+short", "web.default.svc.cluster.local"]
        )
        .trim(),
        "10.96.5.10"
    );
}
