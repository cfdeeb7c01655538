//! `svcplane proxy --proxy-mode ebpf` in the test kit's two-node cluster (root): the proxy on
//! node-a attaches the socket load balancer to a per-test cgroup (standing for node-a's
//! cgroup tree); a client pod on node-a runs its requests in child processes placed in that
//! cgroup. ClusterIP TCP and UDP reach both nodes' pods with the client's own address (no
//! NAT at all), a Service without endpoints refuses at once, and a restart of the proxy
//! under a steady connection load loses no connection (the pinned maps and links keep
//! translating while no svcplane runs). `cleanup --proxy-mode ebpf` removes everything, and
//! a proxy starting in nftables mode removes ebpf's pins. `--ebpf-socket-lb-hostns-only`
//! translates the node's sockets and leaves the pods' to the north-south table.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use svcplane_testkit::{
    Cgroup, Cluster, EchoReply, PodSpec, bpf_test_mounts, in_cgroup, run_checked, skip_unless_root,
};

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: many, namespace: default}
spec:
  selector: {app: many}
  clusterIP: 10.96.1.2
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  selector: {app: dns}
  clusterIP: 10.96.1.3
  ports:
    - {name: dns-udp, port: 53, protocol: UDP, targetPort: 5354}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  selector: {app: nobody}
  clusterIP: 10.96.1.5
  ports: [{name: http, port: 80}]
"#;

static PINS: AtomicUsize = AtomicUsize::new(0);

/// "<echo reply>|<getpeername>" or "ERR <errno>".
fn tcp(dst: SocketAddr) -> String {
    match TcpStream::connect_timeout(&dst, Duration::from_secs(3)) {
        Ok(mut s) => {
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let mut reply = String::new();
            let _ = s.read_to_string(&mut reply);
            format!("{}|{peer}", reply.trim())
        }
        Err(e) => format!("ERR {}", e.raw_os_error().unwrap_or(0)),
    }
}

fn udp(dst: SocketAddr) -> String {
    let run = || -> std::io::Result<String> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(b"ping\n", dst)?;
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok(format!(
            "{}|{from}",
            String::from_utf8_lossy(&buf[..n]).trim()
        ))
    };
    run().unwrap_or_else(|e| format!("ERR {}", e.raw_os_error().unwrap_or(0)))
}

fn echo(out: &str) -> Option<(EchoReply, String)> {
    let (reply, seen) = out.split_once('|')?;
    Some((EchoReply::parse(reply)?, seen.to_owned()))
}

fn cleanup(pins: &Path) {
    let _ = run_checked(
        std::process::Command::new(env!("CARGO_BIN_EXE_svcplane"))
            .args(["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-path"])
            .arg(pins),
    );
}

/// The two-node cluster with [`SERVICES`], and a cgroup and pin directory of the test's
/// own for the proxy on node-a; whatever the proxy pinned is removed on drop.
struct Rig {
    pins_arg: String,
    cgroup_arg: String,
    pins: PathBuf,
    // Dropped in this order, after the pins are removed.
    cgroup: Cgroup,
    manifests: svcplane_testkit::Manifests,
    cluster: Cluster,
}

impl Rig {
    fn new(name: &str) -> Rig {
        let cluster = Cluster::builder()
            .node("node-a", "zone-a")
            .node("node-b", "zone-b")
            .pod(PodSpec::new("client-a", "node-a"))
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
                PodSpec::new("dns-b", "node-b")
                    .label("app", "dns")
                    .udp(&[5354]),
            )
            .build()
            .expect("virtual cluster");
        let manifests = cluster.manifests().expect("manifests");
        manifests
            .write("services.yaml", SERVICES)
            .expect("services");
        let cgroup = Cgroup::new(&format!("svcp-ebpf-{name}")).expect("cgroup");
        let (bpffs, _) = bpf_test_mounts().expect("bpffs");
        let pins = bpffs.join(format!(
            "{name}-{}-{}",
            std::process::id(),
            PINS.fetch_add(1, Ordering::Relaxed)
        ));
        Rig {
            pins_arg: pins.to_str().expect("utf-8 path").to_owned(),
            cgroup_arg: cgroup.path().to_str().expect("utf-8 path").to_owned(),
            pins,
            cgroup,
            manifests,
            cluster,
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        cleanup(&self.pins);
    }
}

#[test]
fn ebpf_proxy_balances_at_the_socket_and_restarts_without_losing_connections() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let rig = Rig::new("proxy");
    let Rig {
        cluster,
        manifests,
        cgroup,
        pins,
        pins_arg,
        cgroup_arg,
    } = &rig;
    let args = [
        "--proxy-mode",
        "ebpf",
        "--bpf-pin-path",
        pins_arg,
        "--cgroup-path",
        cgroup_arg,
        "--bpf-lb-map-max",
        "4096",
        "--bpf-backend-map-max",
        "4096",
        "--bpf-revnat-map-max",
        "4096",
        "--bpf-affinity-map-max",
        "1024",
    ];
    let start = || {
        cluster
            .run_proxy(
                env!("CARGO_BIN_EXE_svcplane"),
                "node-a",
                manifests.path(),
                &args,
            )
            .expect("svcplane proxy --proxy-mode ebpf")
    };
    let proxy = start();
    let client_ns = cluster
        .pod("client-a")
        .expect("pod")
        .netns()
        .name()
        .to_owned();
    let client_ip = cluster.pod("client-a").expect("pod").ipv4();
    let run =
        |f: &(dyn Fn() -> String + Sync)| in_cgroup(cgroup.path(), &client_ns, f).expect("client");

    // The first sync may still be under way right after readiness: wait for the maps.
    assert!(
        svcplane_testkit::wait_until(Duration::from_secs(10), || echo(&run(&|| tcp(
            "10.96.1.2:80".parse().expect("addr")
        )))
        .is_some()),
        "the ClusterIP is never translated"
    );
    let mut pods = BTreeSet::new();
    for _ in 0..64 {
        let out = run(&|| tcp("10.96.1.2:80".parse().expect("addr")));
        let (reply, peer) = echo(&out).unwrap_or_else(|| panic!("{out}"));
        assert_eq!(peer, "10.96.1.2:80", "getpeername shows the ClusterIP");
        assert_eq!(
            reply.peer.ip(),
            std::net::IpAddr::V4(client_ip),
            "never masqueraded"
        );
        pods.insert(reply.pod);
        if pods.len() == 2 {
            break;
        }
    }
    assert_eq!(pods.len(), 2, "both nodes' endpoints: {pods:?}");
    let out = run(&|| udp("10.96.1.3:53".parse().expect("addr")));
    let (reply, from) = echo(&out).unwrap_or_else(|| panic!("{out}"));
    assert_eq!((reply.port, from.as_str()), (5354, "10.96.1.3:53"));
    assert_eq!(
        run(&|| tcp("10.96.1.5:80".parse().expect("addr"))),
        "ERR 111"
    );

    // Restart under load: a steady stream of connections while the proxy stops and a new
    // one starts; every connection must succeed.
    let stop = AtomicBool::new(false);
    let (ok, failed) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let out = run(&|| tcp("10.96.1.2:80".parse().expect("addr")));
                if echo(&out).is_some() {
                    ok += 1;
                } else {
                    failed.push(out);
                }
            }
            (ok, failed)
        });
        // Stops the load even when what follows panics (else the scope would wait forever).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stopper = StopOnDrop(&stop);
        let status = proxy.terminate().expect("terminate");
        assert!(status.success(), "{status}");
        let again = start();
        // A few more connections through the new instance before stopping the load.
        std::thread::sleep(Duration::from_millis(500));
        drop(stopper);
        let r = load.join().expect("load thread");
        drop(again);
        r
    });
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 0);
    eprintln!("restart under load: {ok} connections, none failed");

    // cleanup (on the node, as an administrator runs it) detaches, unpins and removes the
    // north-south table; the kernel frees unpinned links in a deferred work item, hence the
    // wait. From a pod, the ClusterIP is then neither translated at the socket nor DNATed
    // by the north-south table on the node.
    let node_a = cluster.node("node-a").expect("node-a");
    run_checked(&mut node_a.netns().command(
        env!("CARGO_BIN_EXE_svcplane"),
        &[
            "cleanup",
            "--proxy-mode",
            "ebpf",
            "--bpf-pin-path",
            pins_arg,
        ],
    ))
    .expect("svcplane cleanup --proxy-mode ebpf on node-a");
    assert!(!pins.exists());
    let out = run_checked(&mut node_a.netns().command("nft", &["list", "tables"])).expect("nft");
    let tables = String::from_utf8_lossy(&out.stdout);
    assert!(!tables.contains("svcplane"), "cleanup left {tables}");
    let untranslated = svcplane_testkit::wait_until(Duration::from_secs(5), || {
        echo(&run(&|| tcp("10.96.1.2:80".parse().expect("addr")))).is_none()
    });
    assert!(untranslated, "10.96.1.2:80 still answers after cleanup");

    // Switching modes: nftables mode removes ebpf's pins at startup (and serves the
    // ClusterIP itself).
    drop(start());
    assert!(pins.exists());
    let nft = cluster
        .run_proxy(
            env!("CARGO_BIN_EXE_svcplane"),
            "node-a",
            manifests.path(),
            &["--proxy-mode", "nftables", "--bpf-pin-path", pins_arg],
        )
        .expect("svcplane proxy --proxy-mode nftables");
    assert!(!pins.exists(), "nftables mode left ebpf's pins");
    let out = run(&|| tcp("10.96.1.2:80".parse().expect("addr")));
    assert!(echo(&out).is_some(), "through nftables: {out}");
    drop(nft);
}

/// `--ebpf-socket-lb-hostns-only`: the node's own sockets are translated at connect, a
/// pod's are not (it keeps the Service address, as a mesh sidecar needs): without the
/// north-south table nothing serves the pod, with it the table DNATs its connection.
#[test]
fn hostns_only_translates_the_node_and_leaves_pods_to_the_north_south_table() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let rig = Rig::new("hostns");
    let Rig {
        cluster,
        manifests,
        cgroup,
        pins_arg,
        cgroup_arg,
        ..
    } = &rig;
    let start = |north_south: &str| {
        cluster
            .run_proxy(
                env!("CARGO_BIN_EXE_svcplane"),
                "node-a",
                manifests.path(),
                &[
                    "--proxy-mode",
                    "ebpf",
                    "--bpf-pin-path",
                    pins_arg,
                    "--cgroup-path",
                    cgroup_arg,
                    "--cluster-cidr",
                    "10.244.0.0/16",
                    "--ebpf-socket-lb-hostns-only",
                    &format!("--ebpf-north-south={north_south}"),
                ],
            )
            .expect("svcplane proxy --proxy-mode ebpf --ebpf-socket-lb-hostns-only")
    };
    let node_ns = cluster
        .node("node-a")
        .expect("node")
        .netns()
        .name()
        .to_owned();
    let pod_ns = cluster
        .pod("client-a")
        .expect("pod")
        .netns()
        .name()
        .to_owned();
    let from = |ns: &str| {
        in_cgroup(cgroup.path(), ns, || {
            tcp("10.96.1.2:80".parse().expect("addr"))
        })
        .expect("client")
    };

    let proxy = start("false");
    // The first sync may still be under way right after readiness.
    let node_served =
        svcplane_testkit::wait_until(Duration::from_secs(10), || echo(&from(&node_ns)).is_some());
    assert!(node_served, "the node's own connection: {}", from(&node_ns));
    let out = from(&pod_ns);
    assert!(
        echo(&out).is_none(),
        "a pod's connection was translated: {out}"
    );
    drop(proxy);

    let proxy = start("true");
    let out = from(&pod_ns);
    let (reply, peer) =
        echo(&out).unwrap_or_else(|| panic!("through the north-south table: {out}"));
    assert_eq!(reply.port, 8080);
    assert_eq!(peer, "10.96.1.2:80");
    assert!(echo(&from(&node_ns)).is_some());
    drop(proxy);
}
