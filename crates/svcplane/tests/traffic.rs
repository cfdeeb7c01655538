//! The scenario table: real traffic through `svcplane proxy` (root), every scenario in
//! every mode the binary has and in both families. Each cell builds its own two-node
//! virtual cluster from the test kit (echo servers in every pod, the proxy on node-a in
//! the cell's mode, the external client outside), so cells run in parallel.
//!
//! Test names are `MODE::FAMILY::SCENARIO`; run one cell with e.g.
//! `cargo test -p svcplane --test traffic nftables::v6::hairpin_is_masqueraded`.
//!
//! Adding a scenario: write `fn name(cell: Cell)` below, starting with
//! `let Some(env) = Env::start(cell) else { return };` (it returns `None` when the test
//! must skip: not root). Address everything through `env` (`env.at(MANY, 80)`,
//! `env.pod_ip(..)`, `env.node_at(..)`): addresses come in both families from
//! `traffic/env.rs` (a new Service goes into its `SERVICES`, its addresses into
//! `ADDRESSES`). Then add `name` to `scenarios` in [`scenario_table!`] below. If a mode
//! or family cannot meet it, mark the cell there, `name { iptables/v6: "why" }` (`_` for
//! every mode or family): the cell prints `SKIP mode/family/name: why` instead of running,
//! and the README's "Scenario table" must list the mark (a test checks).
//!
//! Adding a mode: add it to `modes` below, and its tools and how to wreck its rules in
//! `traffic/modes.rs`. A test fails while the binary implements a mode the list lacks.
//!
//! Scenarios assert on traffic and on svcplane's HTTP endpoints, never on a mode's rule
//! text: checks of what a backend programs belong to that backend's own tests.

// A test crate's root resolves modules beside it, so the directory is named.
#[macro_use]
#[path = "traffic/table.rs"]
mod table;
#[path = "traffic/env.rs"]
mod env;
#[path = "traffic/modes.rs"]
mod modes;
#[path = "traffic/probes.rs"]
mod probes;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use svcplane_testkit::{PodSpec, parse_echo};

use env::*;
use probes::*;

scenario_table! {
    modes: [nftables, iptables, ipvs, ebpf];
    scenarios: [
        cluster_ip_one_endpoint_with_target_port_from_a_pod = ONE_FROM_A_POD,
        cluster_ip_many_endpoints_spread_from_a_pod = MANY_FROM_A_POD,
        cluster_ip_from_the_external_client_is_masqueraded = MANY_FROM_OUTSIDE,
        tcp_and_udp_on_the_same_port_number = TCP_AND_UDP,
        node_port_from_the_external_client = NODE_PORT,
        node_ports_outside_the_default_range = NODE_PORTS_WIDE,
        udp_to_a_tcp_only_port_is_rejected = UDP_TO_TCP_ONLY,
        service_without_endpoints_is_rejected = NO_ENDPOINTS,
        load_balancer_source_ranges_allow_and_block_but_not_the_node_port = SOURCE_RANGES,
        external_ip_from_the_external_client = EXTERNAL_IP_PROBES,
        external_traffic_policy_local_keeps_the_client_ip_and_drops_without_local_endpoints = ETP_LOCAL,
        external_traffic_policy_local_from_the_node_itself = ETP_LOCAL_FROM_THE_NODE,
        hairpin_is_masqueraded = HAIRPIN {
            ebpf/_: "the socket load balancer connects the pod's socket straight to the endpoint, so a pod reaching itself keeps its own address: no reply crosses a NAT, nothing to masquerade (as Cilium's socket-LB)",
        },
        session_affinity_client_ip_is_sticky = AFFINITY,
        internal_traffic_policy_local_stays_on_the_node = ITP_LOCAL,
        topology_hints_keep_traffic_in_the_zone = TOPOLOGY,
        terminating_endpoints_serve_only_when_no_endpoint_is_ready = TERMINATING,
        udp_conntrack_cleared {
            ebpf/_: "the socket load balancer creates no conntrack entry for the ClusterIP (the socket is connected to the endpoint), so there is none to delete; the traffic part (a fixed 5-tuple moves to the new endpoint) passes",
        },
        a_manifest_change_reaches_the_kernel = MANIFEST_CHANGE,
        a_malformed_file_leaves_working_services_alone,
        wrecked_rules_are_repaired_by_the_periodic_check,
        a_restart_fails_no_connection,
        healthz_and_livez_answer_after_the_first_sync,
        metrics_through_the_binary,
        metrics_listen_on_loopback_only_by_default,
        health_check_node_port,
    ];
}

/// A scenario that is its probes: start the standard cell, check them.
fn check(cell: Cell, probes: &Probes) {
    let Some(env) = Env::start(cell) else { return };
    env.check_all(probes);
}

/// Probes without extra manifests.
const fn probes(list: &'static [Probe]) -> Probes {
    Probes { setup: None, list }
}

const fn answered(by: &'static [&'static str], port: u16, seen: Seen) -> Expect {
    Expect::Answered { by, port, seen }
}

const MANY_PODS: &[&str] = &["many-a", "many-b"];

const ONE_FROM_A_POD: Probes = probes(&[
    // Port 80 -> targetPort 8080; a pod in the cluster CIDR is not masqueraded.
    tcp(
        "client-a",
        To::Svc(ONE, 80),
        answered(&["one-a"], 8080, Seen::Own),
    ),
]);
fn cluster_ip_one_endpoint_with_target_port_from_a_pod(cell: Cell) {
    check(cell, &ONE_FROM_A_POD);
}

const MANY_FROM_A_POD: Probes = probes(&[tcp(
    "client-a",
    To::Svc(MANY, 80),
    answered(MANY_PODS, 8080, Seen::Own),
)]);
fn cluster_ip_many_endpoints_spread_from_a_pod(cell: Cell) {
    check(cell, &MANY_FROM_A_POD);
}

/// Not from the cluster CIDR: masqueraded to node-a, so replies come back to it.
const MANY_FROM_OUTSIDE: Probes = probes(&[tcp(
    "client",
    To::Svc(MANY, 80),
    answered(MANY_PODS, 8080, Seen::Node),
)]);
fn cluster_ip_from_the_external_client_is_masqueraded(cell: Cell) {
    check(cell, &MANY_FROM_OUTSIDE);
}

/// Different target ports per protocol: the echo reply proves which rule each went through.
const TCP_AND_UDP: Probes = probes(&[
    tcp(
        "client-a",
        To::Svc(DNS, 53),
        answered(&["dns-b"], 5353, Seen::Any),
    ),
    udp(
        "client-a",
        To::Svc(DNS, 53),
        answered(&["dns-b"], 5354, Seen::Any),
    ),
    tcp(
        "client",
        To::Svc(DNS, 53),
        answered(&["dns-b"], 5353, Seen::Any),
    ),
    udp(
        "client",
        To::Svc(DNS, 53),
        answered(&["dns-b"], 5354, Seen::Any),
    ),
]);
fn tcp_and_udp_on_the_same_port_number(cell: Cell) {
    check(cell, &TCP_AND_UDP);
}

/// externalTrafficPolicy Cluster: masqueraded to the node.
const NODE_PORT: Probes = probes(&[tcp(
    "client",
    To::Node("node-a", 30080),
    answered(MANY_PODS, 8080, Seen::Node),
)]);
fn node_port_from_the_external_client(cell: Cell) {
    check(cell, &NODE_PORT);
}

/// kube-proxy programs whatever nodePort a Service carries: the range is the API
/// server's `--service-node-port-range`, which many clusters widen.
const NODE_PORTS_WIDE: Probes = probes(&[
    tcp(
        "client",
        To::Node("node-a", 3001),
        answered(MANY_PODS, 8080, Seen::Node),
    ),
    tcp(
        "client",
        To::Node("node-a", 80),
        answered(MANY_PODS, 8080, Seen::Node),
    ),
]);
fn node_ports_outside_the_default_range(cell: Cell) {
    check(cell, &NODE_PORTS_WIDE);
}

const UDP_TO_TCP_ONLY: Probes = probes(&[
    udp("client-a", To::Svc(MANY, 80), Expect::Rejected),
    udp("client", To::Svc(MANY, 80), Expect::Rejected),
]);
fn udp_to_a_tcp_only_port_is_rejected(cell: Cell) {
    check(cell, &UDP_TO_TCP_ONLY);
}

const NO_ENDPOINTS: Probes = probes(&[
    tcp("client-a", To::Svc(EMPTY, 80), Expect::Rejected),
    tcp("client", To::Svc(EMPTY, 80), Expect::Rejected),
]);
fn service_without_endpoints_is_rejected(cell: Cell) {
    check(cell, &NO_ENDPOINTS);
}

const SOURCE_RANGES: Probes = probes(&[
    // eTP Cluster masquerades.
    tcp(
        "client-allowed",
        To::Svc(LB_IP, 80),
        answered(MANY_PODS, 8080, Seen::Node),
    ),
    // Outside the source ranges: dropped (no answer at all).
    tcp("client", To::Svc(LB_IP, 80), Expect::Dropped),
    // The same service's NodePort is not subject to the source ranges.
    tcp(
        "client",
        To::Node("node-a", 30081),
        answered(MANY_PODS, 8080, Seen::Any),
    ),
]);
fn load_balancer_source_ranges_allow_and_block_but_not_the_node_port(cell: Cell) {
    check(cell, &SOURCE_RANGES);
}

const EXTERNAL_IP_PROBES: Probes = probes(&[tcp(
    "client",
    To::Svc(EXTERNAL_IP, 8000),
    answered(&["one-a"], 8080, Seen::Any),
)]);
fn external_ip_from_the_external_client(cell: Cell) {
    check(cell, &EXTERNAL_IP_PROBES);
}

const ETP_LOCAL: Probes = probes(&[
    tcp(
        "client",
        To::Node("node-a", 30083),
        answered(&["one-a"], 8080, Seen::Own),
    ),
    // node-b has no local endpoint for it: dropped there, not forwarded to node-a.
    tcp("client", To::Node("node-b", 30083), Expect::Dropped).on("node-b"),
]);
fn external_traffic_policy_local_keeps_the_client_ip_and_drops_without_local_endpoints(cell: Cell) {
    check(cell, &ETP_LOCAL);
}

/// eTP Local, node-a without a local endpoint (`local-remote`): traffic that starts on
/// node-a (its own network namespace, or a pod) to the externalIP, the LoadBalancer IP or
/// node-a's NodePort still reaches the cluster-wide endpoint, the node's own masqueraded
/// to node-a's address; the external client's gets no answer.
const ETP_LOCAL_FROM_THE_NODE: Probes = {
    const EXT: To = To::Svc(LOCAL_REMOTE_EXTERNAL_IP, 80);
    const LB: To = To::Svc(LOCAL_REMOTE_LB_IP, 80);
    const NP: To = To::Node("node-a", 30084);
    const REMOTE: &[&str] = &["remote-b"];
    probes(&[
        tcp("node-a", EXT, answered(REMOTE, 8080, Seen::Node)),
        tcp("node-a", LB, answered(REMOTE, 8080, Seen::Node)),
        tcp("node-a", NP, answered(REMOTE, 8080, Seen::Node)),
        tcp("client-a", EXT, answered(REMOTE, 8080, Seen::Own)),
        tcp("client-a", LB, answered(REMOTE, 8080, Seen::Own)),
        tcp("client-a", NP, answered(REMOTE, 8080, Seen::Own)),
        tcp("client", EXT, Expect::Dropped),
        tcp("client", LB, Expect::Dropped),
        tcp("client", NP, Expect::Dropped),
    ])
};
fn external_traffic_policy_local_from_the_node_itself(cell: Cell) {
    check(cell, &ETP_LOCAL_FROM_THE_NODE);
}

/// To itself: masqueraded, or the reply would bypass the node's conntrack.
const HAIRPIN: Probes = probes(&[tcp(
    "many-a",
    To::Svc(MANY, 80),
    answered(MANY_PODS, 8080, Seen::OwnUnlessHairpin),
)]);
fn hairpin_is_masqueraded(cell: Cell) {
    check(cell, &HAIRPIN);
}

const AFFINITY: Probes = probes(&[tcp(
    "client-a",
    To::Svc(STICKY, 80),
    Expect::Sticky { by: MANY_PODS },
)]);
fn session_affinity_client_ip_is_sticky(cell: Cell) {
    check(cell, &AFFINITY);
}

const ITP_LOCAL: Probes = probes(&[tcp(
    "client-a",
    To::Svc(ITP, 80),
    answered(&["many-a"], 8080, Seen::Own),
)]);
fn internal_traffic_policy_local_stays_on_the_node(cell: Cell) {
    check(cell, &ITP_LOCAL);
}

/// Services without selectors whose EndpointSlices (in the cell's family) the test
/// writes, over many-a (node-a, zone-a) and many-b (node-b, zone-b): `hinted` (zone
/// hints), `term` (only a terminating but serving endpoint) and `mixed` (one ready, one
/// terminating).
fn explicit_slices(env: &dyn Place) -> Vec<(&'static str, String)> {
    let (a, b) = (env.pod_ip("many-a"), env.pod_ip("many-b"));
    let service = |name: &str, ips: &str| {
        service_head(name, ips) + "  ports: [{name: http, port: 80, targetPort: 8080}]\n---\n"
    };
    let slice = |name: &str, endpoints: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: {}\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}---\n",
            env.address_type()
        )
    };
    let ep = |ip: IpAddr, node: &str, zone: &str, ready: bool, extra: &str| {
        format!(
            "  - addresses: [\"{ip}\"]\n    nodeName: {node}\n    zone: {zone}\n    \
             conditions: {{ready: {ready}, serving: true, terminating: {}}}\n{extra}",
            !ready
        )
    };
    let hint = |zone: &str| format!("    hints: {{forZones: [{{name: {zone}}}]}}\n");
    let mut out = String::new();
    out += &service("hinted", "HINTED");
    out += &slice(
        "hinted",
        &(ep(a, "node-a", "zone-a", true, &hint("zone-a"))
            + &ep(b, "node-b", "zone-b", true, &hint("zone-b"))),
    );
    out += &service("term", "TERM");
    out += &slice("term", &ep(b, "node-b", "zone-b", false, ""));
    out += &service("mixed", "MIXED");
    out += &slice(
        "mixed",
        &(ep(a, "node-a", "zone-a", true, "") + &ep(b, "node-b", "zone-b", false, "")),
    );
    vec![("slices.yaml", dual_stack(&out))]
}

const TOPOLOGY: Probes = Probes {
    setup: Some(explicit_slices),
    list: &[tcp(
        "client-a",
        To::Svc(HINTED, 80),
        answered(&["many-a"], 8080, Seen::Own),
    )],
};
fn topology_hints_keep_traffic_in_the_zone(cell: Cell) {
    check(cell, &TOPOLOGY);
}

const TERMINATING: Probes = Probes {
    setup: Some(explicit_slices),
    list: &[
        // Only a terminating, serving endpoint: kube-proxy falls back to it.
        tcp(
            "client-a",
            To::Svc(TERM, 80),
            answered(&["many-b"], 8080, Seen::Own),
        ),
        // A ready endpoint exists: the terminating one gets no new connections.
        tcp(
            "client-a",
            To::Svc(MIXED, 80),
            answered(&["many-a"], 8080, Seen::Own),
        ),
    ],
};
fn terminating_endpoints_serve_only_when_no_endpoint_is_ready(cell: Cell) {
    check(cell, &TERMINATING);
}

/// A UDP Service without selector over `endpoint` (a pod address in the cell's family),
/// port 53 -> 5300, with its EndpointSlice.
fn udp_service_over(env: &Env, endpoint: IpAddr) -> String {
    dual_stack(&format!(
        "{}  ports: [{{name: dns, port: 53, protocol: UDP, targetPort: 5300}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: udp-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: udp}}\n\
         addressType: {}\nports: [{{name: dns, port: 5300, protocol: UDP}}]\n\
         endpoints:\n  - addresses: [\"{endpoint}\"]\n    conditions: {{ready: true}}\n",
        service_head("udp", "UDP"),
        env.address_type()
    ))
}

fn udp_conntrack_cleared(cell: Cell) {
    let Some(mut env) = Env::start(cell) else {
        return;
    };
    for (name, node) in [("udp-a", "node-a"), ("udp-b", "node-b")] {
        env.cluster
            .add_pod(PodSpec::new(name, node).udp(&[5300]))
            .expect("pod");
    }
    let (a, b) = (env.pod_ip("udp-a"), env.pod_ip("udp-b"));
    let dst = env.at(UDP, 53);
    // From a fresh source port each time: answered by `endpoint` once the rules are there.
    let programmed = |endpoint: IpAddr| {
        svcplane_testkit::wait_until(Duration::from_secs(10), || {
            env.try_udp_within("client-a", dst, PROBE)
                .is_ok_and(|r| parse_echo(&r).is_ok_and(|r| r.pod == endpoint))
        })
    };
    env.manifests
        .write("udp.yaml", &udp_service_over(&env, a))
        .expect("udp.yaml");
    assert!(
        programmed(a),
        "the udp service over udp-a was not programmed"
    );

    // One 5-tuple throughout, as a DNS client reusing its source port.
    let ask = || {
        env.try_udp_from_port("client-a", 40053, dst, Duration::from_secs(1))
            .map_err(|e| e.to_string())
            .and_then(|r| parse_echo(&r).map_err(|e| e.to_string()))
    };
    for _ in 0..3 {
        let reply = ask().expect("UDP through the service");
        assert_eq!(reply.pod, a, "{reply:?}");
        assert_eq!(reply.peer.port(), 40053, "the source port must stay fixed");
    }

    // udp-a leaves the service (its pod keeps answering), udp-b joins.
    env.manifests
        .write("udp.yaml", &udp_service_over(&env, b))
        .expect("udp.yaml");
    assert!(
        programmed(b),
        "the udp service over udp-b was not programmed"
    );
    // The rules moved; without the reconciler the old conntrack entry would keep sending
    // this 5-tuple to udp-a until it expires (120 s while traffic flows), so any bound
    // well under that tells the two apart: the entry is deleted in the same sync that
    // changed the rules.
    let mut answers = Vec::new();
    let moved = svcplane_testkit::wait_until(SETTLE, || {
        let reply = ask();
        let done = matches!(&reply, Ok(r) if r.pod == b);
        answers.push(reply);
        done
    });
    assert!(
        moved,
        "the same 5-tuple was not answered by udp-b within {SETTLE:?}: {answers:?}"
    );

    // Counted when the sync that deleted the entry returns, which may be just after the
    // answer above.
    let series = format!(
        "kubeproxy_conntrack_reconciler_deleted_entries_total{{ip_family=\"{}\"}}",
        match env.family() {
            Family::V4 => "4",
            Family::V6 => "6",
        }
    );
    let mut deleted = None;
    let counted = svcplane_testkit::wait_until(Duration::from_secs(5), || {
        deleted = env
            .proxy()
            .metrics()
            .ok()
            .and_then(|text| svcplane_testkit::metric_value(&text, &series));
        deleted.is_some_and(|n| n >= 1.0)
    });
    assert!(counted, "deleted entries not counted: {deleted:?}");
}

/// A Service over one-a at `ips` (a name of `env::ADDRESSES`).
fn service_over_one(name: &str, ips: &str) -> String {
    dual_stack(
        &(service_head(name, ips)
            + "  selector: {app: one}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n"),
    )
}

/// A new Service in a new file: how fast is measured by `svcplane bench sync`; here only
/// that it arrives.
const MANIFEST_CHANGE: Probes = Probes {
    setup: Some(|_| vec![("new.yaml", service_over_one("new", "NEW"))]),
    list: &[tcp(
        "client-a",
        To::Svc(NEW, 80),
        answered(&["one-a"], 8080, Seen::Own),
    )],
};
fn a_manifest_change_reaches_the_kernel(cell: Cell) {
    check(cell, &MANIFEST_CHANGE);
}

fn a_malformed_file_leaves_working_services_alone(cell: Cell) {
    let Some(env) = Env::start(cell) else { return };
    // A file that does not parse, and the services file itself broken mid-document.
    env.manifests
        .write("broken.yaml", "kind: Service\nmetadata: {name: [unclosed\n")
        .expect("broken.yaml");
    let broken = SERVICES.replacen("clusterIPs: ${MANY}", "clusterIPs: [${MANY}", 1);
    assert_ne!(broken, SERVICES, "nothing was broken");
    env.manifests
        .write("services.yaml", &dual_stack(&broken))
        .expect("services.yaml");
    // A valid service in another file is still programmed...
    env.manifests
        .write("later.yaml", &service_over_one("later", "LATER"))
        .expect("later.yaml");
    let dst = env.at(LATER, 80);
    assert!(
        env.wait_answering("client-a", dst),
        "the valid service in later.yaml was not programmed"
    );
    // ...and the services of the broken files keep answering.
    assert_eq!(
        env.tcp("client-a", env.at(ONE, 80)).pod,
        env.pod_ip("one-a")
    );
    env.spread("client-a", env.at(MANY, 80), &["many-a", "many-b"]);
}

fn wrecked_rules_are_repaired_by_the_periodic_check(cell: Cell) {
    let Some(env) = Env::start_with(cell, &["--sync-period", "1s"]) else {
        return;
    };
    let dst = env.at(ONE, 80);
    env.tcp("client-a", dst);
    // The periodic syncs are cheap checks, not full rewrites (those are hourly).
    let count = |series: &str| {
        env.proxy()
            .metrics()
            .ok()
            .and_then(|t| svcplane_testkit::metric_value(&t, series))
            .unwrap_or(0.0)
    };
    const FULL: &str = "kubeproxy_sync_full_proxy_rules_duration_seconds_count";
    const PARTIAL: &str = "kubeproxy_sync_partial_proxy_rules_duration_seconds_count";
    // Deadlines are generous (a loaded machine, the IPVS cells under TCG), not speed checks.
    let checked = svcplane_testkit::wait_until(Duration::from_secs(15), || count(PARTIAL) >= 2.0);
    assert!(checked, "no periodic check within 15 s at --sync-period 1s");
    assert_eq!(
        count(FULL),
        1.0,
        "periodic syncs must not rewrite everything"
    );
    modes::wreck_rules(&env);
    assert!(
        env.wait_answering("client-a", dst),
        "{dst} not answering again after its rules were removed"
    );
    assert_eq!(env.tcp("client-a", dst).pod, env.pod_ip("one-a"));
    // Repaired by a full sync, which the check triggered (counted when that sync returns,
    // which may be just after the traffic above got through).
    let full = svcplane_testkit::wait_until(Duration::from_secs(15), || count(FULL) >= 2.0);
    assert!(
        full,
        "not repaired by a full sync: {} full syncs",
        count(FULL)
    );
}

fn a_restart_fails_no_connection(cell: Cell) {
    let Some(mut env) = Env::start(cell) else {
        return;
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let old = env.proxy.take().expect("proxy");
    let dst = env.at(MANY, 80);
    let (sent, failures) = std::thread::scope(|scope| {
        let env = &env;
        let stop = &stop;
        let load = scope.spawn(move || {
            let (mut sent, mut failures) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sent += 1;
                if let Err(e) = env.try_tcp("client-a", dst) {
                    failures.push(e);
                }
            }
            (sent, failures)
        });
        // Old process stops (leaving its rules), the new one adopts and replaces them.
        let status = old.terminate().expect("stop the proxy");
        assert!(status.success(), "old proxy exited with {status}");
        let new = env.run_proxy_on("node-a");
        // Keep the load on past the new process's first sync.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let result = load.join().expect("load thread");
        drop(new);
        result
    });
    assert!(sent > 5, "too few requests during the restart: {sent}");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:?}",
        failures.len()
    );
}

fn healthz_and_livez_answer_after_the_first_sync(cell: Cell) {
    let Some(env) = Env::start(cell) else { return };
    // run_proxy already waited for /healthz 200 on loopback. The default bind address,
    // 0.0.0.0:10256, serves both families (as Go's listener does for kube-proxy), so a
    // load balancer or kubelet reaches it on the node's address of either family.
    let at = env.node_at("node-a", 10256);
    let get = |path: &str| {
        svcplane_testkit::http_get(env.cluster.client().netns().name(), at, path, T)
            .unwrap_or_else(|e| panic!("GET {at}{path}: {e}"))
    };
    let (status, body) = get("/healthz");
    assert_eq!(status, 200, "{body}");
    // kube-proxy's JSON.
    assert!(body.contains("lastUpdated"), "{body}");
    let (status, body) = get("/livez");
    assert_eq!(status, 200, "{body}");
    assert_eq!(get("/nothing").0, 404);
}

/// Every sample line of `text` whose series starts with `prefix`, as (series, value).
fn samples<'a>(text: &'a str, prefix: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series, value.parse().ok()?))
        })
        .collect()
}

/// A metric the test needs, or the whole exposition in the panic message.
fn metric(text: &str, series: &str) -> f64 {
    svcplane_testkit::metric_value(text, series)
        .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
}

fn metrics_through_the_binary(cell: Cell) {
    // Bound to node-a's own address (in the cell's family), so the flag is seen to take
    // effect.
    let bind: SocketAddr = match cell.family {
        Family::V4 => "10.0.0.11:10249",
        Family::V6 => "[fd00:10::11]:10249",
    }
    .parse()
    .expect("address");
    let bind_arg = bind.to_string();
    let Some(env) = Env::start_with(cell, &["--metrics-bind-address", &bind_arg]) else {
        return;
    };
    assert_eq!(bind, env.node_at("node-a", 10249), "node-a's address moved");
    let proxy = env.proxy();
    assert_eq!(proxy.metrics_addr(), Some(bind));
    let text = proxy.metrics().expect("GET /metrics on node-a");

    // kube-proxy's sync histogram: exponential from 1 ms by 2, 15 buckets, then +Inf.
    const H: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
    let buckets = samples(&text, &format!("{H}_bucket{{"));
    assert_eq!(buckets.len(), 16, "15 buckets and +Inf:\n{text}");
    for (i, le) in ["0.001", "0.002", "0.004", "1.024", "16.384", "+Inf"]
        .iter()
        .enumerate()
    {
        let index = [0, 1, 2, 10, 14, 15][i];
        assert_eq!(buckets[index].0, format!("{H}_bucket{{le=\"{le}\"}}"));
    }
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets must be cumulative: {buckets:?}"
    );
    let count = metric(&text, &format!("{H}_count"));
    assert!(count >= 1.0, "no sync observed:\n{text}");
    assert_eq!(buckets[15].1, count, "+Inf bucket is the count");
    assert!(
        metric(
            &text,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count"
        ) >= 1.0
    );
    let last = metric(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        last > 0.0 && last <= now + 1.0,
        "last sync at {last}, now {now}"
    );
    let service_changes = metric(&text, "kubeproxy_sync_proxy_rules_service_changes_total");
    assert!(
        service_changes > 0.0,
        "the first sync carried every service"
    );
    assert_eq!(metric(&text, "svcplane_invalid_objects_total"), 0.0);
    let programmed = metric(
        &text,
        "kubeproxy_network_programming_duration_seconds_count",
    );

    // A manifest change (one more service) and a malformed object (port out of range).
    env.manifests
        .write("more.yaml", &service_over_one("more", "MORE"))
        .expect("more.yaml");
    env.manifests
        .write(
            "bad.yaml",
            &dual_stack(&(service_head("bad", "BAD") + "  ports: [{port: 70000}]\n")),
        )
        .expect("bad.yaml");
    let mut text = String::new();
    let seen = svcplane_testkit::wait_until(Duration::from_secs(10), || {
        text = proxy.metrics().expect("GET /metrics");
        metric(
            &text,
            "kubeproxy_network_programming_duration_seconds_count",
        ) > programmed
            && metric(&text, "svcplane_invalid_objects_total") >= 1.0
    });
    assert!(seen, "the change was not observed:\n{text}");
    assert_eq!(metric(&text, "svcplane_invalid_objects_total"), 1.0);
    assert!(
        metric(&text, "kubeproxy_sync_proxy_rules_service_changes_total") > service_changes,
        "the new service is a service change:\n{text}"
    );
    // The external client reaches it too: the flag, not the default, decided the address.
    let (status, _) =
        svcplane_testkit::http_get(env.cluster.client().netns().name(), bind, "/metrics", T)
            .expect("GET /metrics from the client");
    assert_eq!(status, 200);
}

fn metrics_listen_on_loopback_only_by_default(cell: Cell) {
    let Some(env) = Env::start(cell) else { return };
    let proxy = env.proxy();
    // kube-proxy's default: 127.0.0.1:10249.
    assert_eq!(
        proxy.metrics_addr(),
        Some("127.0.0.1:10249".parse().expect("address"))
    );
    let text = proxy.metrics().expect("GET /metrics on 127.0.0.1");
    assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count"));
    let own = env.node_at("node-a", 10249);
    let node_ns = env.cluster.node("node-a").expect("node").netns().name();
    for (from, who) in [
        (node_ns, "node-a"),
        (env.cluster.client().netns().name(), "client"),
    ] {
        let got = svcplane_testkit::http_get(from, own, "/metrics", T);
        assert!(
            matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{who} -> node-a's own address {own} must be refused: {got:?}"
        );
    }
}

/// The healthCheckNodePort of [`hc_manifests`].
const HC_PORT: u16 = 32000;

/// A LoadBalancer Service with eTP Local and healthCheckNodePort [`HC_PORT`], and its
/// EndpointSlice (in the cell's family) with `endpoints` (pod, node).
fn hc_manifests(env: &Env, endpoints: &[(&str, &str)]) -> String {
    let mut out = service_head("hc", "HC")
        + "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  \
           ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30090}]\n\
           status: {loadBalancer: {ingress: ${HC_LB_IP.ingress}}}\n---\n";
    out += &format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: hc-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: hc}}\n\
         addressType: {}\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:",
        env.address_type()
    );
    if endpoints.is_empty() {
        out += " []\n";
    } else {
        out += "\n";
    }
    for (pod, node) in endpoints {
        out += &format!(
            "  - {{addresses: [\"{}\"], nodeName: {node}, conditions: {{ready: true}}}}\n",
            env.pod_ip(pod)
        );
    }
    dual_stack(&out)
}

/// GET / on `node`'s healthCheckNodePort (its address in the cell's family) from the
/// external client: the status, the JSON body, or `None` when nothing answers (yet).
fn hc_get(env: &Env, node: &str) -> Option<(u16, serde_json::Value)> {
    let (status, body) = svcplane_testkit::http_get(
        env.cluster.client().netns().name(),
        env.node_at(node, HC_PORT),
        "/",
        T,
    )
    .ok()?;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    Some((status, json))
}

/// Wait (bounded by `timeout`) until `node` answers `status`; the last answer.
fn hc_wait(env: &Env, node: &str, status: u16, timeout: Duration) -> (u16, serde_json::Value) {
    let mut last = None;
    svcplane_testkit::wait_until(timeout, || {
        last = hc_get(env, node);
        last.as_ref().is_some_and(|(s, _)| *s == status)
    });
    let last = last.unwrap_or_else(|| panic!("nothing answers on {node}:{HC_PORT}"));
    assert_eq!(last.0, status, "{node}:{HC_PORT} answered {last:?}");
    last
}

fn assert_hc_body(body: &serde_json::Value, local_endpoints: u64) {
    assert_eq!(
        body["service"],
        serde_json::json!({"namespace": "default", "name": "hc"}),
        "{body}"
    );
    assert_eq!(body["localEndpoints"], local_endpoints, "{body}");
}

fn health_check_node_port(cell: Cell) {
    let Some(env) = Env::start(cell) else { return };
    env.manifests
        .write("hc.yaml", &hc_manifests(&env, &[("one-a", "node-a")]))
        .expect("hc.yaml");
    let _proxy_b = env.run_proxy_on("node-b");
    // The servers start with the sync that programs hc.yaml; the bound is not the point.
    let (_, body) = hc_wait(&env, "node-a", 200, Duration::from_secs(10));
    assert_hc_body(&body, 1);
    let (_, body) = hc_wait(&env, "node-b", 503, Duration::from_secs(10));
    assert_hc_body(&body, 0);

    // The endpoint moves from node-a to node-b: node-a's load balancer must stop
    // sending traffic there (the servers follow the sync that applies the change; how
    // fast that is, is the benchmarks' business: a fixed 2 s bound failed under TCG).
    env.manifests
        .write("hc.yaml", &hc_manifests(&env, &[("many-b", "node-b")]))
        .expect("hc.yaml");
    let (_, body) = hc_wait(&env, "node-a", 503, SETTLE);
    assert_hc_body(&body, 0);
    let (_, body) = hc_wait(&env, "node-b", 200, SETTLE);
    assert_hc_body(&body, 1);
}

/// Scenarios without probes, and why `svcplane trace` has nothing to say about them.
const UNTRACED: &[(&str, &str)] = &[
    (
        "udp_conntrack_cleared",
        "about a conntrack entry outliving a rule change; trace explains rules, not kernel state",
    ),
    (
        "a_malformed_file_leaves_working_services_alone",
        "about a watching proxy keeping a file's objects after it stops parsing; a one-shot \
         trace never loaded them",
    ),
    (
        "wrecked_rules_are_repaired_by_the_periodic_check",
        "about the proxy process repairing rules",
    ),
    (
        "a_restart_fails_no_connection",
        "about the proxy process restarting",
    ),
    (
        "healthz_and_livez_answer_after_the_first_sync",
        "the proxy's own HTTP server, not a Service path",
    ),
    (
        "metrics_through_the_binary",
        "the proxy's own HTTP server, not a Service path",
    ),
    (
        "metrics_listen_on_loopback_only_by_default",
        "the proxy's own HTTP server, not a Service path",
    ),
    (
        "health_check_node_port",
        "the proxy's healthCheckNodePort server, not a Service path",
    ),
];

/// Checks of the table itself (no root needed).
mod the_table {
    use std::collections::BTreeSet;

    use svcplane_dataplane::ProxyMode;

    use crate::env::{Family, SERVICES, dual_stack, standard_cluster};
    use crate::probes::{Planned, trace_disagreement};
    use crate::{MODES, TABLE, UNTRACED};

    /// Every scenario has probes or says why `svcplane trace` cannot follow it.
    #[test]
    fn every_scenario_is_traced_or_says_why() {
        for scenario in TABLE {
            let untraced = UNTRACED.iter().any(|(name, _)| *name == scenario.name);
            assert!(
                scenario.probes.is_some() != untraced,
                "{}: give it probes, or list it in UNTRACED with the reason (not both)",
                scenario.name
            );
        }
        for (name, _) in UNTRACED {
            assert!(
                TABLE.iter().any(|s| s.name == *name),
                "UNTRACED names {name}"
            );
        }
    }

    /// `svcplane trace` on each cell's manifests agrees with every probe of every cell
    /// the traffic runs (marked cells run no traffic, so there is nothing to agree with).
    /// No kernel: the cluster is only planned.
    #[test]
    fn trace_agrees_with_the_traffic_of_every_cell() {
        let plan = standard_cluster().plan().expect("plan");
        let mut checked = 0;
        let mut disagreements = Vec::new();
        for family in [Family::V4, Family::V6] {
            let place = Planned {
                plan: &plan,
                family,
            };
            for scenario in TABLE {
                let Some(probes) = scenario.probes else {
                    continue;
                };
                let manifests = plan.manifests().expect("manifests");
                manifests
                    .write("services.yaml", &dual_stack(SERVICES))
                    .expect("services.yaml");
                if let Some(setup) = probes.setup {
                    for (file, yaml) in setup(&place) {
                        manifests.write(file, &yaml).expect(file);
                    }
                }
                let cells: Vec<&str> = MODES
                    .iter()
                    .copied()
                    .filter(|m| scenario.marked(m, family).is_none())
                    .collect();
                std::thread::scope(|scope| {
                    let runs: Vec<_> = cells
                        .iter()
                        .flat_map(|mode| probes.list.iter().map(move |p| (*mode, p)))
                        .map(|(mode, probe)| {
                            let (place, path) = (&place, manifests.path());
                            scope.spawn(move || {
                                trace_disagreement(place, path, mode, probe)
                                    .map(|d| format!("{mode}/{family}/{}: {d}", scenario.name))
                            })
                        })
                        .collect();
                    for run in runs {
                        checked += 1;
                        disagreements.extend(run.join().expect("trace thread"));
                    }
                });
            }
        }
        assert!(checked > 100, "only {checked} probes were traced");
        assert!(
            disagreements.is_empty(),
            "{} of {checked} traced probes disagree with the traffic's expectations:\n{}",
            disagreements.len(),
            disagreements.join("\n\n")
        );
    }

    /// Every mode the binary implements is in `MODES`, and `MODES` has nothing else:
    /// a new backend cannot skip the table silently. Asks `svcplane render` itself.
    #[test]
    fn has_every_mode_the_binary_implements() {
        let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/cluster");
        for mode in ProxyMode::ALL {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_svcplane"))
                .args(["render", "--proxy-mode", mode.as_str()])
                .args(["--manifests", examples, "--hostname-override", "node-a"])
                .output()
                .expect("run svcplane render");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let implemented = if out.status.success() {
                true
            } else if stderr.contains("not implemented yet") {
                false
            } else {
                panic!("svcplane render --proxy-mode {mode} failed: {stderr}");
            };
            assert_eq!(
                MODES.contains(&mode.as_str()),
                implemented,
                "--proxy-mode {mode} is {}implemented but {}in the table's modes {MODES:?}",
                if implemented { "" } else { "not " },
                if implemented { "not " } else { "" },
            );
        }
    }

    /// Marks name scenarios' cells of known modes.
    #[test]
    fn marks_name_known_modes() {
        for scenario in TABLE {
            for mark in scenario.marks {
                if let Some(mode) = mark.mode {
                    assert!(
                        mode.parse::<ProxyMode>().is_ok(),
                        "{}: mark for unknown mode {mode}",
                        scenario.name
                    );
                }
                assert!(
                    !mark.reason.trim().is_empty(),
                    "{}: a mark needs a reason",
                    scenario.name
                );
            }
        }
    }

    /// The README's "Scenario table" section lists exactly the marked cells, as
    /// ``- `mode/family/scenario`: reason`` lines (`*` for every mode or family).
    #[test]
    fn readme_lists_every_mark() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
                .expect("README.md");
        let section = readme
            .split("\n### Scenario table\n")
            .nth(1)
            .expect("README has a `### Scenario table` section");
        let section = section.split("\n#").next().unwrap_or(section);
        let listed: BTreeSet<String> = section
            .lines()
            .filter_map(|l| l.strip_prefix("- `")?.split_once('`'))
            .map(|(cell, _)| cell.to_string())
            .collect();
        let marked: BTreeSet<String> = TABLE
            .iter()
            .flat_map(|s| {
                s.marks
                    .iter()
                    .map(move |m| format!("{}/{}", m.cells(), s.name))
            })
            .collect();
        assert_eq!(listed, marked, "README's marked cells vs the table's");
    }
}
