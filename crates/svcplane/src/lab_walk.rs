//! `svcplane lab` on manifests as people write them (examples/lab): a Deployment and the
//! Services `kubectl expose` makes of it, without clusterIP or nodePort. Per proxy mode,
//! on the test kit's two-node virtual cluster:
//!
//! 1. DNS from a client pod with a pod's resolv.conf through `svcplane proxy --dns-listen`;
//! 2. what carries the web Service's ClusterIP in that mode (`svcplane trace` of its name);
//! 3. 30 requests to the name, with the spread over the Deployment's Pods;
//! 4. a NodePort request from the external client, with the source the Pod saw;
//! 5. the Deployment scaled down by one (the manifest edited, its Pod gone): how long until
//!    the proxy programmed it (its metrics) and until traffic stopped reaching that Pod;
//! 6. with several modes, a table side by side: the change → kernel time, connect latency
//!    through a ClusterIP ÷ straight to the Pod (`bench datapath`'s measurement), and the
//!    size of what the mode programs.
//!
//! The lab plays the API server's controllers: it expands each Deployment into Pods on the
//! nodes (addresses from each node's pod range) and writes them next to the Services;
//! svcplane allocates the ClusterIPs and nodePorts and derives the EndpointSlices itself.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::Value;
use svcplane_dataplane::ProxyMode;
use svcplane_model::{
    Change, Format, IpFamily, NamespacedName, Object, Protocol, Service, ServiceType,
};
use svcplane_source::{AllocatorConfig, ManifestSource};
use svcplane_testkit::{
    CLUSTER_CIDR, Cgroup, Cluster, EchoReply, PodSpec, ProxyHandle, ProxyLaunch, bpf_test_mounts,
    in_cgroup, metric_value,
};

use crate::bench::datapath::{DIRECT_LANE, Percentiles, PingServer, Route, VIA_LANE, measure};
use crate::cli::{EngineArgs, LabArgs};
use crate::lab::check;
use crate::settings::EngineSettings;

const NODES: [&str; 2] = ["node-a", "node-b"];
const PROXY_NODE: &str = "node-a";
const CLIENT: &str = "client";
/// Inside the test kit's routed service CIDRs.
const SERVICE_RANGE: &str = "10.96.0.0/16,fd00:96::/108";
const DOMAIN: &str = "cluster.local";
/// Per request; also how long a request that goes nowhere is waited for.
const T: Duration = Duration::from_secs(1);
const REQUESTS: usize = 30;
/// Connections per path for the latency column (a lab, not a benchmark).
const LATENCY_REQUESTS: u32 = 300;
const PING_PORT: u16 = 9000;
/// How long a scale-down may take to show, in the metrics and in the traffic.
const CHANGE_WAIT: Duration = Duration::from_secs(10);
/// Requests in a row without the removed Pod that count as "traffic stopped reaching it".
const QUIET_RUN: usize = 20;

/// Whether `dir` holds a Deployment (then `svcplane lab` walks it with this module).
pub fn has_deployment(dir: &Path) -> bool {
    manifest_files(dir)
        .map(|files| {
            files.iter().any(|f| {
                documents(f)
                    .map(|docs| docs.iter().any(is_deployment))
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

#[derive(Debug, Serialize)]
struct Hop {
    name: &'static str,
    /// `None`: not run in this mode (see `lines`).
    ok: Option<bool>,
    lines: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct ModeRun {
    mode: String,
    /// Why the mode did not run here.
    skipped: Option<String>,
    hops: Vec<Hop>,
    /// The scale-down: file written → the proxy's sync done (its metrics), seconds.
    change_to_kernel_s: Option<f64>,
    /// The scale-down: file written → the removed Pod no longer answered, seconds.
    change_to_traffic_s: Option<f64>,
    latency_cluster_ip_p50_us: Option<f64>,
    latency_pod_p50_us: Option<f64>,
    /// Lines of `svcplane render` in this mode: rules, elements or map entries.
    programmed_lines: Option<usize>,
    error: Option<String>,
}

impl ModeRun {
    fn failed(&self) -> usize {
        self.hops.iter().filter(|h| h.ok == Some(false)).count() + usize::from(self.error.is_some())
    }
}

#[derive(Debug, Serialize)]
struct Report {
    manifests: String,
    modes: Vec<ModeRun>,
    left_behind: Vec<String>,
}

/// Colours on a terminal, plain when piped.
struct Style {
    tty: bool,
    json: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.tty {
            format!("\u{1b}[{code}m{text}\u{1b}[0m")
        } else {
            text.to_string()
        }
    }
    fn say(&self, line: impl AsRef<str>) {
        // With --json, stdout is the document; the walk goes to stderr.
        if self.json {
            eprintln!("{}", line.as_ref());
        } else {
            println!("{}", line.as_ref());
        }
    }
    fn heading(&self, text: &str) {
        self.say(self.paint("1", text));
    }
    fn hop(&self, hop: &Hop) {
        let mark = match hop.ok {
            Some(true) => self.paint("32", "ok"),
            Some(false) => self.paint("31", "!!"),
            None => self.paint("33", "--"),
        };
        self.say(format!("   {mark} {}", hop.name));
        for line in &hop.lines {
            self.say(format!("      {line}"));
        }
    }
}

pub fn run(args: &LabArgs) -> Result<()> {
    let style = Style {
        tty: if args.json {
            std::io::stderr().is_terminal()
        } else {
            std::io::stdout().is_terminal()
        },
        json: args.json,
    };
    // Every mode the binary has (a new one joins without a change here).
    let all: Vec<&str> = ProxyMode::ALL.iter().map(|m| m.as_str()).collect();
    let modes: Vec<String> = if args.proxy_modes.is_empty() {
        all.iter().map(|m| m.to_string()).collect()
    } else {
        args.proxy_modes.clone()
    };
    for mode in &modes {
        if !all.contains(&mode.as_str()) {
            bail!(
                "--proxy-mode {mode}: not a mode (one of {})",
                all.join(", ")
            );
        }
    }
    let lab = Lab::load(&args.manifests)?;
    if !svcplane_testkit::is_root() {
        bail!(
            "the lab needs root (network namespaces and the kernel's rules): run `sudo make lab`"
        );
    }
    for tool in ["ip", "sysctl", "dig", "nft"] {
        if !crate::lab::on_path(tool) {
            bail!("`{tool}` is not installed (make deps installs it)");
        }
    }
    let stop = crate::lab::watch_signals()?;
    let started = Instant::now();
    let mut runs = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        style.heading(&format!("== {mode} mode"));
        let keep = args.keep && i + 1 == modes.len();
        let run = lab.run_mode(mode, &style, &stop, keep);
        if let Some(e) = &run.error {
            style.say(format!("   {} {e}", style.paint("31", "!!")));
        }
        runs.push(run);
    }
    let ran: Vec<&ModeRun> = runs.iter().filter(|r| r.skipped.is_none()).collect();
    if ran.len() > 1 {
        table(&style, &ran);
    }
    let left = leftovers();
    if left.is_empty() {
        style.say(format!(
            "== torn down: no namespace, cgroup, pin or resolv.conf of this lab is left ({:.1} s in all)",
            started.elapsed().as_secs_f64()
        ));
    } else {
        style.say(format!(
            "== NOT torn down, still present: {}",
            left.join(" ")
        ));
    }
    let failed: usize = runs.iter().map(ModeRun::failed).sum();
    if args.json {
        let report = Report {
            manifests: args.manifests.display().to_string(),
            modes: runs,
            left_behind: left.clone(),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    if !left.is_empty() {
        bail!("the lab left {} thing(s) behind", left.len());
    }
    if failed > 0 {
        bail!("{failed} hop(s) did not behave as predicted");
    }
    Ok(())
}

fn table(style: &Style, runs: &[&ModeRun]) {
    style.heading("== side by side");
    let f = |v: Option<f64>, scale: f64, unit: &str| {
        v.map_or("-".to_string(), |v| format!("{:.0} {unit}", v * scale))
    };
    style.say(format!(
        "   {:<10} {:>16} {:>16} {:>14} {:>10} {:>8} {:>12}",
        "mode",
        "change → kernel",
        "change → traffic",
        "ClusterIP p50",
        "Pod p50",
        "ratio",
        "render lines"
    ));
    for r in runs {
        let ratio = match (r.latency_cluster_ip_p50_us, r.latency_pod_p50_us) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        style.say(format!(
            "   {:<10} {:>16} {:>16} {:>14} {:>10} {:>8} {:>12}",
            r.mode,
            f(r.change_to_kernel_s, 1e3, "ms"),
            f(r.change_to_traffic_s, 1e3, "ms"),
            f(r.latency_cluster_ip_p50_us, 1.0, "µs"),
            f(r.latency_pod_p50_us, 1.0, "µs"),
            ratio,
            r.programmed_lines.map_or("-".into(), |n| n.to_string()),
        ));
    }
    style.say(
        "   (one lab run: the ratio is the comparable number; `svcplane bench datapath` measures latency properly)",
    );
}

/// One hop of the walk.
type Step<'a> = &'a dyn Fn(&mut ModeRun) -> Result<Hop>;
/// A Pod the lab makes for a Deployment: the test kit's spec, its name, its labels.
type LabPod = (PodSpec, NamespacedName, BTreeMap<String, String>);

/// The manifests directory: its files as written, and the Deployments in them.
struct Lab {
    /// File name → text.
    files: BTreeMap<String, String>,
    deployments: Vec<Deployment>,
}

#[derive(Debug, Clone)]
struct Deployment {
    file: String,
    name: NamespacedName,
    replicas: usize,
    labels: BTreeMap<String, String>,
    ports: Vec<u16>,
}

impl Deployment {
    /// Pod names as the ReplicaSet controller makes them: `<name>-<hash>-<suffix>`.
    fn pod_name(&self, i: usize) -> String {
        format!(
            "{}-{}-{}",
            self.name.name,
            k8s_chars(&self.name.to_string(), 10),
            k8s_chars(&format!("{}/{i}", self.name), 5)
        )
    }
}

/// `n` characters of the alphabet Kubernetes' generated names use, from a hash of `seed`.
fn k8s_chars(seed: &str, n: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (0..n)
        .map(|_| {
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            Format::from_path(p).is_some()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn documents(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_documents(&text).with_context(|| format!("{}", path.display()))
}

fn parse_documents(text: &str) -> Result<Vec<Value>> {
    serde_saphyr::from_multiple::<Value>(text).map_err(|e| anyhow!("{e}"))
}

fn is_deployment(doc: &Value) -> bool {
    doc["apiVersion"] == "apps/v1" && doc["kind"] == "Deployment"
}

fn deployment(file: &str, doc: &Value) -> Result<Deployment> {
    let meta = &doc["metadata"];
    let name = meta["name"]
        .as_str()
        .context("Deployment without metadata.name")?;
    let namespace = meta["namespace"].as_str().unwrap_or("default");
    let what = format!("Deployment {namespace}/{name}");
    let replicas = match &doc["spec"]["replicas"] {
        Value::Null => 1,
        v => v.as_u64().filter(|n| *n <= 50).with_context(|| {
            format!("{what}: spec.replicas: invalid value {v}: must be 0..=50 in the lab")
        })? as usize,
    };
    let template = &doc["spec"]["template"];
    let labels: BTreeMap<String, String> = template["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    if labels.is_empty() {
        bail!("{what}: spec.template.metadata.labels: required (the Services select by them)");
    }
    let mut ports = Vec::new();
    for c in template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for p in c["ports"].as_array().into_iter().flatten() {
            let tcp = p["protocol"].as_str().is_none_or(|p| p == "TCP");
            if let Some(n) = p["containerPort"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                && tcp
            {
                ports.push(n);
            }
        }
    }
    if ports.is_empty() {
        bail!("{what}: no TCP containerPort: the lab's Pods serve those ports");
    }
    Ok(Deployment {
        file: file.to_string(),
        name: NamespacedName::new(namespace, name),
        replicas,
        labels,
        ports,
    })
}

/// Everything one mode's walk holds; dropped (torn down) in field order: the proxy, then
/// the cluster, then the hooks and resolv.conf files.
struct Live {
    proxy: Option<ProxyHandle>,
    cluster: Cluster,
    manifests: svcplane_testkit::Manifests,
    hooks: Option<Hooks>,
    _resolv: Vec<ResolvConf>,
    log: tempfile::TempDir,
}

/// eBPF mode's scratch cgroup and pins: the proxy attaches there, and the client's
/// requests run in that cgroup, where the socket load balancer sees them.
struct Hooks {
    cgroup: Cgroup,
    pins: PathBuf,
}

impl Drop for Hooks {
    fn drop(&mut self) {
        if let Ok(exe) = std::env::current_exe() {
            // Bounded: teardown must not hang on a stuck child.
            let _ = std::process::Command::new("timeout")
                .arg("30")
                .arg(exe)
                .args(["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-path"])
                .arg(&self.pins)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// `/etc/netns/NS/resolv.conf`, which `ip netns exec NS` mounts over /etc/resolv.conf.
struct ResolvConf(PathBuf);

impl ResolvConf {
    fn write(netns: &str, text: &str) -> Result<ResolvConf> {
        let dir = Path::new("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("resolv.conf"), text)?;
        Ok(ResolvConf(dir))
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Lab {
    fn load(dir: &Path) -> Result<Lab> {
        let mut files = BTreeMap::new();
        let mut deployments = Vec::new();
        for path in manifest_files(dir)? {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .context("file name")?
                .to_string();
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            for doc in parse_documents(&text).with_context(|| path.display().to_string())? {
                if is_deployment(&doc) {
                    deployments.push(deployment(&name, &doc)?);
                }
            }
            files.insert(name, text);
        }
        if deployments.is_empty() {
            bail!("no Deployment in {}", dir.display());
        }
        Ok(Lab { files, deployments })
    }

    /// The Pods of every Deployment (`scaled`: one fewer of the first), round-robin over
    /// the nodes, and the client pod.
    fn pods(&self, scaled: bool) -> Vec<LabPod> {
        let mut out = Vec::new();
        let mut k = 0;
        for (d, dep) in self.deployments.iter().enumerate() {
            let n = if scaled && d == 0 {
                dep.replicas.saturating_sub(1)
            } else {
                dep.replicas
            };
            for i in 0..n {
                let node = NODES[k % NODES.len()];
                k += 1;
                let name = dep.pod_name(i);
                let mut labels = dep.labels.clone();
                labels.insert(
                    "pod-template-hash".into(),
                    name.split('-').rev().nth(1).unwrap_or("").into(),
                );
                let mut spec = PodSpec::new(&name, node).tcp(&dep.ports);
                for (key, value) in &labels {
                    spec = spec.label(key, value);
                }
                out.push((
                    spec,
                    NamespacedName::new(&dep.name.namespace, name.as_str()),
                    labels,
                ));
            }
        }
        out
    }

    fn namespace(&self) -> &str {
        &self.deployments[0].name.namespace
    }

    fn run_mode(&self, mode: &str, style: &Style, stop: &AtomicBool, keep: bool) -> ModeRun {
        let mut run = ModeRun {
            mode: mode.to_string(),
            ..ModeRun::default()
        };
        if let Some(why) = unavailable(mode) {
            style.say(format!("   {} {why}", style.paint("33", "--")));
            run.skipped = Some(why);
            return run;
        }
        if let Err(e) = self.walk(mode, style, stop, keep, &mut run) {
            run.error = Some(format!("{e:#}"));
        }
        run
    }

    fn walk(
        &self,
        mode: &str,
        style: &Style,
        stop: &AtomicBool,
        keep: bool,
        run: &mut ModeRun,
    ) -> Result<()> {
        let built = Instant::now();
        let pods = self.pods(false);
        let mut builder = Cluster::builder();
        for node in NODES {
            builder = builder.node(node, &format!("zone-{}", &node[5..]));
        }
        builder = builder.pod(PodSpec::new(CLIENT, PROXY_NODE));
        // A server for the latency column, straight and through a Service of its own.
        builder = builder.pod(PodSpec::new("ping", PROXY_NODE).label("app", "lab-ping"));
        for (spec, _, _) in &pods {
            builder = builder.pod(spec.clone());
        }
        let cluster = builder
            .build()
            .context("cannot build the virtual cluster")?;
        check(stop)?;
        let manifests = cluster.manifests()?;
        let hooks = if mode == "ebpf" {
            let (bpffs, _) = bpf_test_mounts().context("bpffs")?;
            Some(Hooks {
                cgroup: Cgroup::new("svcp-lab").context("scratch cgroup")?,
                pins: bpffs.join(format!("lab-{}", std::process::id())),
            })
        } else {
            None
        };
        let node_ip = cluster.node(PROXY_NODE)?.ipv4();
        let ns = self.namespace().to_string();
        let client_ns = cluster.pod(CLIENT)?.netns().name().to_string();
        let resolv = vec![
            ResolvConf::write(
                &client_ns,
                &format!(
                    "nameserver {node_ip}\nsearch {ns}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}\noptions ndots:5\n"
                ),
            )?,
            // Names outside the cluster go nowhere (the client does not serve DNS): the
            // lab never depends on the host's network.
            ResolvConf::write(
                cluster.node(PROXY_NODE)?.netns().name(),
                &format!("nameserver {}\n", svcplane_testkit::CLIENT_V4),
            )?,
        ];
        let mut live = Live {
            proxy: None,
            cluster,
            manifests,
            hooks,
            _resolv: resolv,
            log: tempfile::Builder::new().prefix("svcplane-lab").tempdir()?,
        };
        for (name, text) in &self.files {
            live.manifests.write(name, text)?;
        }
        live.manifests
            .write("pods.yaml", &self.pods_yaml(&live.cluster, &pods)?)?;
        live.manifests
            .write("zz-lab-ping.yaml", &ping_service(&ns))?;
        style.say(format!(
            "-- {} Pods of {} on {} (the lab expands Deployments; svcplane derives the EndpointSlices), a client pod; {:.1} s",
            pods.len(),
            self.deployments.iter().map(|d| d.name.to_string()).collect::<Vec<_>>().join(", "),
            NODES.join(" and "),
            built.elapsed().as_secs_f64()
        ));

        let exe = std::env::current_exe().context("cannot find the svcplane binary")?;
        let log = live.log.path().join("proxy.log");
        let listen = format!("{node_ip}:53");
        let mut argv: Vec<String> = vec![
            "--proxy-mode".into(),
            mode.into(),
            "--service-cluster-ip-range".into(),
            SERVICE_RANGE.into(),
            "--dns-listen".into(),
            listen,
        ];
        if let Some(h) = &live.hooks {
            argv.push("--bpf-pin-path".into());
            argv.push(h.pins.display().to_string());
            argv.push("--cgroup-path".into());
            argv.push(h.cgroup.path().display().to_string());
        }
        let argv_ref: Vec<&str> = argv.iter().map(String::as_str).collect();
        let started = Instant::now();
        let proxy = live
            .cluster
            .launch_proxy(
                &exe,
                PROXY_NODE,
                live.manifests.path(),
                &argv_ref,
                &ProxyLaunch {
                    log: Some(log.clone()),
                    ..ProxyLaunch::default()
                },
            )
            .map_err(|e| anyhow!("svcplane proxy: {e}\n{}", log_tail(&log)))?;
        style.say(format!(
            "-- svcplane proxy --proxy-mode {mode} --service-cluster-ip-range {SERVICE_RANGE} --dns-listen {node_ip}:53 on {PROXY_NODE}: ready in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        for line in allocation_lines(&log) {
            style.say(format!("   proxy log: {line}"));
        }
        live.proxy = Some(proxy);
        check(stop)?;

        let services = self.services(live.manifests.path())?;
        let web = self.deployments[0].clone();
        let (svc, headless, node_port, external) = pick_services(&services, &web)?;
        let ctx = Ctx {
            live: &live,
            client_ns: &client_ns,
            web: &web,
        };
        let steps: [Step; 5] = [
            &|_| ctx.dns(svc, headless, external),
            &|run| ctx.carried(mode, svc, run),
            &|_| ctx.spread(svc),
            &|_| ctx.node_port(node_port),
            &|run| ctx.scale_down(self, svc, run),
        ];
        for step in steps {
            check(stop)?;
            let hop = step(run)?;
            style.hop(&hop);
            run.hops.push(hop);
        }
        check(stop)?;
        if let Err(e) = ctx.latency(&services, &ns, run, stop) {
            style.say(format!("   -- latency not measured: {e:#}"));
        }
        if run.failed() > 0 {
            style.say(format!("-- the proxy's log ends with:\n{}", log_tail(&log)));
        }
        if keep {
            style.say(format!(
                "-- --keep: the cluster stays until Ctrl-C. A shell in the client pod: ip netns exec {client_ns} bash"
            ));
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        style.say("-- tearing down (the proxy, every namespace, the mode's hooks)");
        drop(live);
        Ok(())
    }

    fn pods_yaml(&self, cluster: &Cluster, pods: &[LabPod]) -> Result<String> {
        let mut out = String::new();
        let dep_ports = |name: &NamespacedName| {
            self.deployments
                .iter()
                .find(|d| name.name.starts_with(&format!("{}-", d.name.name)))
                .map(|d| d.ports.clone())
                .unwrap_or_default()
        };
        for (_, name, labels) in pods {
            let pod = cluster.pod(&name.name)?;
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k:?}: {v:?}"))
                .collect();
            let ports: Vec<String> = dep_ports(name)
                .iter()
                .map(|p| format!("{{containerPort: {p}, protocol: TCP}}"))
                .collect();
            out += &pod_yaml(
                &name.namespace,
                &name.name,
                &labels.join(", "),
                pod.node(),
                &ports.join(", "),
                pod,
            );
        }
        let ping = cluster.pod("ping")?;
        out += &pod_yaml(
            self.namespace(),
            "ping",
            "\"app\": \"lab-ping\"",
            ping.node(),
            &format!("{{containerPort: {PING_PORT}, protocol: TCP}}"),
            ping,
        );
        Ok(out)
    }

    /// The Services as the proxy sees them: allocated as it allocates them (the same code,
    /// the same input, so the same addresses).
    fn services(&self, dir: &Path) -> Result<BTreeMap<NamespacedName, Service>> {
        let config = AllocatorConfig {
            cluster_ip_ranges: svcplane_source::allocator::parse_service_cluster_ip_range(
                SERVICE_RANGE,
            )
            .map_err(anyhow::Error::msg)?,
            ..AllocatorConfig::default()
        };
        let (changes, _) = ManifestSource::new(dir).allocator(config).load_once()?;
        Ok(changes
            .into_iter()
            .filter_map(|c| match c {
                Change::Apply(Object::Service(s)) => {
                    Some((s.name.clone(), std::sync::Arc::unwrap_or_clone(s)))
                }
                _ => None,
            })
            .collect())
    }
}

fn pod_yaml(
    ns: &str,
    name: &str,
    labels: &str,
    node: &str,
    ports: &str,
    pod: &svcplane_testkit::Pod,
) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name:?}\n  namespace: {ns:?}\n  labels: {{{labels}}}\n\
         spec:\n  nodeName: {node:?}\n  containers:\n    - name: app\n      image: lab\n      ports: [{ports}]\n\
         status:\n  phase: Running\n  podIP: \"{}\"\n  podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
        pod.ipv4(),
        pod.ipv4(),
        pod.ipv6()
    )
}

fn ping_service(ns: &str) -> String {
    format!(
        "# Written by `svcplane lab` for its latency column.\napiVersion: v1\nkind: Service\n\
         metadata: {{name: lab-ping, namespace: {ns}}}\nspec:\n  selector: {{app: lab-ping}}\n  ports: [{{port: 80, targetPort: {PING_PORT}}}]\n"
    )
}

/// The Services the hops use: the first ClusterIP Service selecting the first
/// Deployment's Pods, a headless one, a NodePort (or LoadBalancer) one, an ExternalName.
fn pick_services<'a>(
    services: &'a BTreeMap<NamespacedName, Service>,
    web: &Deployment,
) -> Result<(&'a Service, &'a Service, &'a Service, Option<&'a Service>)> {
    let selects = |s: &&Service| {
        s.name.namespace == web.name.namespace
            && s.selector.as_ref().is_some_and(|sel| {
                !sel.is_empty() && sel.iter().all(|(k, v)| web.labels.get(k) == Some(v))
            })
    };
    let all: Vec<&Service> = services
        .values()
        .filter(|s| &*s.name.name != "lab-ping")
        .collect();
    let cluster_ip = all
        .iter()
        .copied()
        .filter(selects)
        .find(|s| s.service_type == ServiceType::ClusterIp && !s.headless)
        .with_context(|| format!("no ClusterIP Service selects {}'s Pods", web.name))?;
    let headless = all
        .iter()
        .copied()
        .filter(selects)
        .find(|s| s.headless)
        .with_context(|| format!("no headless Service selects {}'s Pods", web.name))?;
    let node_port = all
        .iter()
        .copied()
        .filter(selects)
        .find(|s| s.ports.iter().any(|p| p.node_port.is_some()))
        .with_context(|| format!("no NodePort Service selects {}'s Pods", web.name))?;
    let external = all
        .iter()
        .copied()
        .find(|s| s.service_type == ServiceType::ExternalName);
    Ok((cluster_ip, headless, node_port, external))
}

struct Ctx<'a> {
    live: &'a Live,
    client_ns: &'a str,
    web: &'a Deployment,
}

impl Ctx<'_> {
    fn cluster(&self) -> &Cluster {
        &self.live.cluster
    }

    fn pod_names(&self) -> BTreeMap<IpAddr, String> {
        let mut names = BTreeMap::new();
        for p in self.cluster().pods() {
            names.insert(IpAddr::V4(p.ipv4()), p.name().to_string());
            names.insert(IpAddr::V6(p.ipv6()), p.name().to_string());
        }
        for n in self.cluster().nodes() {
            names.insert(IpAddr::V4(n.ipv4()), n.name().to_string());
        }
        names.insert(
            IpAddr::V4(svcplane_testkit::CLIENT_V4),
            "the external client".into(),
        );
        names
    }

    fn web_pods(&self) -> BTreeSet<String> {
        self.cluster()
            .pods()
            .iter()
            .filter(|p| p.name().starts_with(&format!("{}-", self.web.name.name)))
            .map(|p| p.name().to_string())
            .collect()
    }

    /// `dig +search` in the client pod (its resolv.conf: search list, ndots:5): the
    /// answer section as (type, data).
    fn dig(&self, name: &str) -> Vec<(String, String)> {
        let out = std::process::Command::new("timeout")
            .args([
                "5",
                "ip",
                "netns",
                "exec",
                self.client_ns,
                "dig",
                "+search",
                "+noall",
                "+answer",
                "+time=1",
                "+tries=2",
                name,
            ])
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 5).then(|| (f[3].to_string(), f[4].trim_end_matches('.').to_string()))
            })
            .collect()
    }

    fn dns(&self, svc: &Service, headless: &Service, external: Option<&Service>) -> Result<Hop> {
        let ns = &svc.name.namespace;
        let vip: BTreeSet<String> = svc
            .cluster_ips
            .iter()
            .filter(|ip| ip.is_ipv4())
            .map(ToString::to_string)
            .collect();
        let names = self.pod_names();
        let web_ips: BTreeSet<String> = names
            .iter()
            .filter(|(ip, n)| ip.is_ipv4() && self.web_pods().contains(*n))
            .map(|(ip, _)| ip.to_string())
            .collect();
        let mut lines = vec![format!(
            "client pod resolv.conf: nameserver {} (svcplane proxy --dns-listen), search {ns}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}, ndots:5",
            self.cluster().node(PROXY_NODE)?.ipv4()
        )];
        let mut ok = true;
        let a = |answers: &[(String, String)]| -> BTreeSet<String> {
            answers
                .iter()
                .filter(|(t, _)| t == "A")
                .map(|(_, d)| d.clone())
                .collect()
        };
        let mut check =
            |query: String, want: BTreeSet<String>, kind: &str, answers: Vec<(String, String)>| {
                let got: BTreeSet<String> = if kind == "CNAME" {
                    answers
                        .iter()
                        .filter(|(t, _)| t == "CNAME")
                        .map(|(_, d)| d.clone())
                        .collect()
                } else {
                    a(&answers)
                };
                let good = got == want;
                ok &= good;
                lines.push(format!(
                    "{} {query} → {kind} {}{}",
                    if good { "✓" } else { "✗" },
                    if got.is_empty() {
                        "(no answer)".to_string()
                    } else {
                        got.into_iter().collect::<Vec<_>>().join(", ")
                    },
                    if good {
                        String::new()
                    } else {
                        format!(
                            " (predicted {})",
                            want.into_iter().collect::<Vec<_>>().join(", ")
                        )
                    }
                ));
            };
        // The first lookup may race the DNS server's first load; give it a few tries.
        let mut first = Vec::new();
        svcplane_testkit::wait_until(Duration::from_secs(5), || {
            first = self.dig(&svc.name.name);
            !first.is_empty()
        });
        check(svc.name.name.to_string(), vip.clone(), "A", first);
        let fqdn = format!("{}.{ns}.svc.{DOMAIN}", svc.name.name);
        let answers = self.dig(&fqdn);
        check(fqdn, vip, "A", answers);
        check(
            headless.name.name.to_string(),
            web_ips,
            "A",
            self.dig(&headless.name.name),
        );
        if let Some(ext) = external {
            let target: BTreeSet<String> = ext.rare.external_name.iter().cloned().collect();
            let q = if ext.name.namespace == *ns {
                ext.name.name.to_string()
            } else {
                format!("{}.{}", ext.name.name, ext.name.namespace)
            };
            let answers = self.dig(&q);
            check(q, target, "CNAME", answers);
        }
        Ok(Hop {
            name: "DNS from the client pod",
            ok: Some(ok),
            lines,
        })
    }

    fn carried(&self, mode: &str, svc: &Service, run: &mut ModeRun) -> Result<Hop> {
        let vip = svc.cluster_ips.first().context("no ClusterIP")?.to_string();
        let settings = EngineSettings::resolve(&EngineArgs {
            proxy_mode: Some(mode.into()),
            manifests: Some(self.live.manifests.path().to_path_buf()),
            hostname_override: Some(PROXY_NODE.into()),
            cluster_cidr: Some(CLUSTER_CIDR.into()),
            allocation: crate::cli::AllocationArgs {
                service_cluster_ip_range: Some(SERVICE_RANGE.into()),
                service_node_port_range: None,
            },
            ..EngineArgs::default()
        })?;
        let (script, _) = crate::commands::render_script(&settings)?;
        run.programmed_lines = Some(script.lines().filter(|l| !l.trim().is_empty()).count());
        // `svcplane trace` from the client pod to the Service's name: the engine's
        // decisions and the mode's objects that carry the VIP (one explanation, trace's).
        let world = crate::trace::load_world(&settings, &crate::cli::ApiArgs::default(), DOMAIN)?;
        let port = svc.ports.first().map(|p| p.port);
        let name = format!("{}.{}.svc.{DOMAIN}", svc.name.name, svc.name.namespace);
        let client: IpAddr = self.cluster().pod(CLIENT)?.ipv4().into();
        let report = crate::trace::trace_name(&world, &name, port, Some(client), Protocol::Tcp)?;
        let ok = !report.traces.is_empty()
            && report.traces.iter().all(|t| {
                t.outcome == crate::trace::Outcome::Forward && t.kernel.iter().any(|k| k.matches)
            });
        let mut out = vec![format!(
            "svcplane trace {name}:{} --from {client} --proxy-mode {mode}",
            port.map_or_else(|| "?".to_string(), |p| p.to_string())
        )];
        out.extend(
            crate::trace::render_text(&report)
                .lines()
                .map(str::to_string),
        );
        if mode == "iptables" {
            // The proxy runs the tree dispatch; kube-proxy's flat list is one flag away.
            let linear = EngineSettings {
                iptables_dispatch: "linear".parse().map_err(|e: String| anyhow!("{e}"))?,
                ..settings
            };
            let (script, _) = crate::commands::render_script(&linear)?;
            let total = script
                .lines()
                .filter(|l| l.starts_with("-A SVCP-SERVICES "))
                .count();
            out.push(format!(
                "with --iptables-dispatch linear (kube-proxy's layout): SVCP-SERVICES holds {total} rules, walked in order by every new connection; the ones for {vip}:"
            ));
            out.extend(dispatch_rules(&script, &vip));
        }
        Ok(Hop {
            name: "what carries the ClusterIP",
            ok: Some(ok),
            lines: out,
        })
    }

    /// `n` TCP requests from `netns` to `dst`: the echo replies, or why one failed. In
    /// eBPF mode they run in the mode's cgroup, where the socket load balancer sees them.
    fn requests(&self, netns: &str, dst: SocketAddr, n: usize) -> Vec<Result<EchoReply, String>> {
        let one = move || match svcplane_testkit::tcp_request(netns, None, dst, T) {
            Ok(reply) => {
                EchoReply::parse(&reply).ok_or_else(|| format!("not an echo reply: {reply:?}"))
            }
            Err(e) => Err(e.to_string()),
        };
        match &self.live.hooks {
            None => (0..n).map(|_| one()).collect(),
            Some(h) => {
                let out = in_cgroup(h.cgroup.path(), netns, || {
                    (0..n)
                        .map(|_| match one() {
                            Ok(r) => format!("ok {} {}", r.pod, r.peer),
                            Err(e) => format!("err {e}"),
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                });
                match out {
                    Ok(text) => text
                        .lines()
                        .map(|l| match l.strip_prefix("ok ") {
                            Some(rest) => EchoReply::parse(&format!("{rest} tcp/0"))
                                .ok_or_else(|| rest.to_string()),
                            None => Err(l.trim_start_matches("err ").to_string()),
                        })
                        .collect(),
                    Err(e) => vec![Err(e.to_string())],
                }
            }
        }
    }

    fn tally(
        &self,
        replies: &[Result<EchoReply, String>],
    ) -> (BTreeMap<String, usize>, BTreeSet<String>, Option<String>) {
        let names = self.pod_names();
        let name = |ip: IpAddr| {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            names.get(&ip).cloned().unwrap_or_else(|| ip.to_string())
        };
        let mut by = BTreeMap::new();
        let mut sources = BTreeSet::new();
        let mut failure = None;
        for r in replies {
            match r {
                Ok(r) => {
                    *by.entry(name(r.pod)).or_default() += 1;
                    sources.insert(name(r.peer.ip()));
                }
                Err(e) => failure = failure.or(Some(e.clone())),
            }
        }
        (by, sources, failure)
    }

    fn spread(&self, svc: &Service) -> Result<Hop> {
        let ip = svc
            .cluster_ips
            .iter()
            .find(|ip| IpFamily::of(ip) == IpFamily::V4)
            .context("no IPv4 ClusterIP")?;
        let port = svc.ports.first().context("no port")?.port;
        let dst = SocketAddr::new(*ip, port);
        let replies = self.requests(self.client_ns, dst, REQUESTS);
        let (by, sources, failure) = self.tally(&replies);
        let want = self.web_pods();
        let got: BTreeSet<String> = by.keys().cloned().collect();
        let ok = failure.is_none() && got == want && sources.iter().all(|s| s == CLIENT);
        let mut lines = vec![format!(
            "{REQUESTS} connections from {CLIENT} to {}.{} = {dst} (predicted: every Pod of {} answers, the client's own address seen)",
            svc.name.name, svc.name.namespace, self.web.name
        )];
        for (pod, n) in &by {
            lines.push(format!("{pod:<28} {:<30} {n}", "█".repeat(*n)));
        }
        lines.push(format!(
            "source seen: {}",
            sources.into_iter().collect::<Vec<_>>().join(", ")
        ));
        if let Some(f) = failure {
            lines.push(format!("failed: {f}"));
        }
        Ok(Hop {
            name: "30 requests to the name",
            ok: Some(ok),
            lines,
        })
    }

    fn node_port(&self, svc: &Service) -> Result<Hop> {
        let port = svc
            .ports
            .iter()
            .find_map(|p| p.node_port)
            .context("no nodePort")?;
        let node_ip = self.cluster().node(PROXY_NODE)?.ipv4();
        let dst = SocketAddr::new(node_ip.into(), port);
        let client = self.cluster().client().netns().name().to_string();
        let replies: Vec<_> = (0..10)
            .map(
                |_| match svcplane_testkit::tcp_request(&client, None, dst, T) {
                    Ok(r) => EchoReply::parse(&r).ok_or(r),
                    Err(e) => Err(e.to_string()),
                },
            )
            .collect();
        let (by, sources, failure) = self.tally(&replies);
        let got: BTreeSet<String> = by.keys().cloned().collect();
        // externalTrafficPolicy Cluster: masqueraded to the node the client reached.
        let ok = failure.is_none()
            && !got.is_empty()
            && got.is_subset(&self.web_pods())
            && sources.iter().all(|s| s == PROXY_NODE);
        let mut lines = vec![format!(
            "10 connections from the external client to {dst} ({}, nodePort allocated by svcplane); predicted: answered by {}'s Pods, source masqueraded to {PROXY_NODE} (externalTrafficPolicy Cluster)",
            svc.name, self.web.name
        )];
        lines.push(format!(
            "answered by {}; source the Pod saw: {}",
            by.iter()
                .map(|(p, n)| format!("{p} ×{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            sources.into_iter().collect::<Vec<_>>().join(", ")
        ));
        if let Some(f) = failure {
            lines.push(format!("failed: {f}"));
        }
        Ok(Hop {
            name: "NodePort from the external client",
            ok: Some(ok),
            lines,
        })
    }

    fn scale_down(&self, lab: &Lab, svc: &Service, run: &mut ModeRun) -> Result<Hop> {
        let dep = &lab.deployments[0];
        if dep.replicas < 2 {
            return Ok(Hop {
                name: "scale down by one",
                ok: None,
                lines: vec!["fewer than 2 replicas: nothing to remove".into()],
            });
        }
        let removed = dep.pod_name(dep.replicas - 1);
        let proxy = self.live.proxy.as_ref().context("no proxy")?;
        let syncs = |m: &str| {
            metric_value(m, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0)
        };
        let before = syncs(&proxy.metrics().unwrap_or_default());
        // The manifest edited, and the ReplicaSet's Pod gone, as the controllers would.
        let text = lab.files.get(&dep.file).context("deployment file")?;
        let edited = scale_text(text, dep.replicas).context("no `replicas:` line to edit")?;
        let pods = lab.pods(true);
        let pods_yaml = lab.pods_yaml(self.cluster(), &pods)?;
        let changed_at = SystemTime::now();
        let t0 = Instant::now();
        self.live.manifests.write(&dep.file, &edited)?;
        self.live.manifests.write("pods.yaml", &pods_yaml)?;
        // Traffic: requests until QUIET_RUN in a row miss the removed Pod.
        let ip = svc.cluster_ips.first().context("no ClusterIP")?;
        let dst = SocketAddr::new(*ip, svc.ports.first().context("no port")?.port);
        let removed_ip = IpAddr::V4(self.cluster().pod(&removed)?.ipv4());
        // One loop, in one process: in eBPF mode inside the cgroup (a child per request
        // would make every request's socket look alike to the balancer).
        let netns = self.client_ns.to_string();
        let watch = move || {
            let mut out = Vec::new();
            let mut quiet = 0;
            while t0.elapsed() < CHANGE_WAIT && quiet < QUIET_RUN {
                let at = t0.elapsed().as_micros();
                match svcplane_testkit::tcp_request(&netns, None, dst, T)
                    .ok()
                    .and_then(|r| EchoReply::parse(&r))
                {
                    Some(r) => {
                        quiet = if r.pod == removed_ip { 0 } else { quiet + 1 };
                        out.push(format!("{at} {}", r.pod));
                    }
                    None => out.push(format!("{at} failed")),
                }
            }
            out.join("\n")
        };
        let text = match &self.live.hooks {
            None => watch(),
            Some(h) => in_cgroup(h.cgroup.path(), self.client_ns, watch)?,
        };
        let mut quiet_since: Option<Duration> = None;
        let mut quiet = 0;
        let mut last_seen = None;
        let mut failed = 0;
        for line in text.lines() {
            let Some((at, what)) = line.split_once(' ') else {
                continue;
            };
            let at = Duration::from_micros(at.parse().unwrap_or(0));
            match what.parse::<IpAddr>() {
                Ok(ip) if ip == removed_ip => {
                    quiet = 0;
                    quiet_since = None;
                    last_seen = Some(at);
                }
                Ok(_) => {
                    quiet += 1;
                    quiet_since.get_or_insert(at);
                }
                // A failed request says nothing about where traffic goes.
                Err(_) => failed += 1,
            }
        }
        let traffic = (quiet >= QUIET_RUN).then_some(quiet_since).flatten();
        let mut after = String::new();
        let synced = svcplane_testkit::wait_until(CHANGE_WAIT, || {
            after = proxy.metrics().unwrap_or_default();
            syncs(&after) > before
        });
        let kernel = synced
            .then(|| metric_value(&after, "kubeproxy_sync_proxy_rules_last_timestamp_seconds"))
            .flatten()
            .and_then(|t| Some(t - changed_at.duration_since(UNIX_EPOCH).ok()?.as_secs_f64()));
        run.change_to_kernel_s = kernel;
        run.change_to_traffic_s = traffic.map(|d| d.as_secs_f64());
        let ok = kernel.is_some() && traffic.is_some() && failed == 0;
        let mut lines = vec![format!(
            "{}: spec.replicas {} → {} in {}, Pod {removed} deleted",
            dep.name,
            dep.replicas,
            dep.replicas - 1,
            dep.file
        )];
        lines.push(match kernel {
            Some(k) => format!("the proxy's metrics: synced {:.0} ms after the write (kubeproxy_sync_proxy_rules_last_timestamp_seconds)", k * 1e3),
            None => format!("the proxy's metrics: no sync within {CHANGE_WAIT:?}"),
        });
        lines.push(match traffic {
            Some(t) => format!(
                "the traffic: {removed} last answered at {}, then {QUIET_RUN} in a row without it from {:.0} ms",
                last_seen.map_or("— (never after the write)".to_string(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3)),
                t.as_secs_f64() * 1e3
            ),
            None => format!("the traffic: {removed} still answered after {CHANGE_WAIT:?}"),
        });
        if failed > 0 {
            lines.push(format!("{failed} request(s) failed meanwhile (predicted: none; the other Pods keep serving)"));
        }
        Ok(Hop {
            name: "scale the Deployment down by one",
            ok: Some(ok),
            lines,
        })
    }

    fn latency(
        &self,
        services: &BTreeMap<NamespacedName, Service>,
        ns: &str,
        run: &mut ModeRun,
        stop: &AtomicBool,
    ) -> Result<()> {
        let svc = services
            .get(&NamespacedName::new(ns, "lab-ping"))
            .context("no lab-ping Service")?;
        let vip = *svc
            .cluster_ips
            .first()
            .context("lab-ping has no ClusterIP")?;
        let ping = self.cluster().pod("ping")?;
        let client = self.cluster().pod(CLIENT)?;
        let direct = SocketAddr::new(ping.ipv4().into(), PING_PORT);
        let _server = PingServer::start(&[(ping.netns().name(), direct)])?;
        let mut paths = [
            Route::new(
                "through the ClusterIP",
                client.netns().name(),
                SocketAddr::new(vip, 80),
                VIA_LANE,
            ),
            Route::new(
                "straight to the pod at",
                client.netns().name(),
                direct,
                DIRECT_LANE,
            ),
        ];
        let samples: Vec<Vec<Duration>> = match &self.live.hooks {
            None => {
                measure(&mut paths, LATENCY_REQUESTS, stop)?;
                paths.into_iter().map(|p| p.samples).collect()
            }
            Some(h) => {
                let text = in_cgroup(h.cgroup.path(), client.netns().name(), || {
                    let never = AtomicBool::new(false);
                    match measure(&mut paths, LATENCY_REQUESTS, &never) {
                        Ok(()) => paths
                            .iter()
                            .map(|p| {
                                p.samples
                                    .iter()
                                    .map(|d| d.as_nanos().to_string())
                                    .collect::<Vec<_>>()
                                    .join(" ")
                            })
                            .collect::<Vec<_>>()
                            .join("\n"),
                        Err(e) => format!("error {e:#}"),
                    }
                })?;
                if let Some(e) = text.strip_prefix("error ") {
                    bail!("{e}");
                }
                text.lines()
                    .map(|l| {
                        l.split_whitespace()
                            .filter_map(|n| n.parse().ok())
                            .map(Duration::from_nanos)
                            .collect()
                    })
                    .collect()
            }
        };
        let p50 = |s: Option<&Vec<Duration>>| {
            s.cloned()
                .and_then(Percentiles::of)
                .map(|p| p.p50.as_secs_f64() * 1e6)
        };
        run.latency_cluster_ip_p50_us = p50(samples.first());
        run.latency_pod_p50_us = p50(samples.get(1));
        Ok(())
    }
}

/// `replicas: N` → `replicas: N-1` (the first such line: the Deployment's).
fn scale_text(text: &str, replicas: usize) -> Option<String> {
    let from = format!("replicas: {replicas}");
    let at = text.find(&from)?;
    Some(format!(
        "{}replicas: {}{}",
        &text[..at],
        replicas - 1,
        &text[at + from.len()..]
    ))
}

/// The rules of iptables' top-level `SVCP-SERVICES` list that match `vip` (an address is
/// a word of its family's characters: `10.96.0.1/32` names 10.96.0.1, not 10.96.0.10).
fn dispatch_rules(script: &str, vip: &str) -> Vec<String> {
    let v6 = vip.contains(':');
    let mentions = |l: &str| {
        l.split(|c: char| {
            !(c.is_ascii_digit() || c == '.' || (v6 && (c.is_ascii_hexdigit() || c == ':')))
        })
        .any(|w| w == vip)
    };
    script
        .lines()
        .filter(|l| l.starts_with("-A SVCP-SERVICES ") && mentions(l))
        .map(str::to_string)
        .collect()
}

fn unavailable(mode: &str) -> Option<String> {
    if mode != "ipvs" {
        return None;
    }
    for module in ["ip_vs", "dummy"] {
        let _ = std::process::Command::new("modprobe")
            .arg(module)
            .stderr(std::process::Stdio::null())
            .status();
    }
    (!Path::new("/proc/net/ip_vs").exists()).then(|| {
        "ipvs: this kernel has no IPVS (modprobe ip_vs failed, no /proc/net/ip_vs); \
         `make test-ipvs` runs IPVS mode in a VM with Debian's kernel"
            .to_string()
    })
}

/// The proxy's log lines about allocation.
fn allocation_lines(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .map(crate::lab::strip_ansi)
        .filter(|l| l.contains(": allocated ") || l.contains("not a kind svcplane reads"))
        .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
        .collect()
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<String> = text.lines().map(crate::lab::strip_ansi).collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// What this process's labs could leave: namespaces, /etc/netns entries, cgroups, pins.
pub(crate) fn leftovers() -> Vec<String> {
    let tag = format!("-{}-", std::process::id());
    let mut left = Vec::new();
    for dir in ["/run/netns", "/etc/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("svk-") && name.contains(&tag) {
                    left.push(format!("{dir}/{name}"));
                }
            }
        }
    }
    if let Ok((bpffs, cgroup2)) = bpf_test_mounts() {
        let pins = bpffs.join(format!("lab-{}", std::process::id()));
        if pins.exists() {
            left.push(pins.display().to_string());
        }
        if let Ok(entries) = std::fs::read_dir(&cgroup2) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("svcp-lab-{}-", std::process::id())) {
                    left.push(e.path().display().to_string());
                }
            }
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/lab")
    }

    #[test]
    fn the_bundled_lab_has_what_the_hops_use() {
        let lab = Lab::load(&example()).unwrap();
        assert_eq!(lab.deployments.len(), 1);
        let web = &lab.deployments[0];
        assert_eq!((web.replicas, web.ports.as_slice()), (3, &[8080u16][..]));
        assert!(has_deployment(&example()));
        // Three Pods over the two nodes, names as a ReplicaSet's, stable.
        let pods = lab.pods(false);
        assert_eq!(pods.len(), 3);
        assert_eq!(&*pods[0].1.name, web.pod_name(0));
        assert_ne!(web.pod_name(0), web.pod_name(1));
        assert_eq!(lab.pods(true).len(), 2);
        let text = &lab.files[&web.file];
        let scaled = scale_text(text, 3).unwrap();
        assert!(scaled.contains("replicas: 2") && !scaled.contains("replicas: 3"));
    }

    #[test]
    fn the_dispatch_rules_of_a_vip_are_its_own() {
        let script = "-A SVCP-SERVICES -d 10.96.1.2/32 -p tcp --dport 80 -j SVCP-SVC-X\n\
                      -A SVCP-SERVICES -d 10.96.1.20/32 -p tcp --dport 80 -j SVCP-SVC-Y\n\
                      -A SVCP-SVC-X -d 10.96.1.2/32 -j SVCP-SEP-Z\n";
        assert_eq!(
            dispatch_rules(script, "10.96.1.2"),
            ["-A SVCP-SERVICES -d 10.96.1.2/32 -p tcp --dport 80 -j SVCP-SVC-X"]
        );
        assert!(dispatch_rules(script, "10.96.1.3").is_empty());
    }
}
