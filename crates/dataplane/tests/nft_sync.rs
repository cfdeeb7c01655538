//! Partial syncs against the kernel (root, netns): after every random change the
//! incrementally synced table must equal a fresh full render applied elsewhere.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use svcplane_dataplane::NftablesBackend;
use svcplane_dataplane::nftables::render;
use svcplane_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
use svcplane_proxy::{
    ClusterIpMasquerade, Dataplane, DesiredState, Diff, EmptyVerdict, EndpointState,
    ExternalPolicy, FamilyState, NodePortAddresses, ServicePortState, SyncReport, TrafficTarget,
};
use svcplane_testkit::{Netns, run_checked, skip_unless_root};

/// A small deterministic generator (xorshift64*): reproducible runs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// Service port `id` of family `v6`, with `eps` endpoints (ids into a small pool, so
/// endpoint chains come and go), optionally sticky and with a NodePort.
fn service(v6: bool, id: u32, eps: &[u32], sticky: bool, node_port: bool) -> ServicePortState {
    let cip = if v6 {
        ip(&format!("fd00:96::{:x}", id + 1))
    } else {
        ip(&format!("10.96.{}.{}", id / 200, id % 200 + 1))
    };
    let ep = |e: u32| {
        if v6 {
            ip(&format!("fd00:244::{:x}", e + 1))
        } else {
            ip(&format!("10.244.0.{}", e + 1))
        }
    };
    let endpoints: Vec<EndpointState> = eps
        .iter()
        .map(|&e| EndpointState::ready(ep(e), 8080, e % 2 == 0))
        .collect();
    let n = endpoints.len();
    let target = |if_empty| TrafficTarget {
        endpoints: (0..n).collect(),
        if_empty,
    };
    ServicePortState {
        name: ServicePortName {
            service: NamespacedName::new("default", format!("svc{id}")),
            port: "http".into(),
            protocol: Protocol::Tcp,
        },
        protocol: Protocol::Tcp,
        port: 80,
        cluster_ip: Some(cip),
        node_port: node_port.then_some(30000 + id as u16),
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        affinity_timeout_seconds: sticky.then_some(600),
        ipvs_scheduler: None,
        endpoints,
        internal: target(EmptyVerdict::Reject),
        external: target(EmptyVerdict::Drop),
        external_policy: ExternalPolicy::Cluster,
        health_check_node_port: None,
    }
}

fn random_service(rng: &mut Rng, v6: bool, id: u32) -> ServicePortState {
    let n = rng.below(4) as usize;
    let mut eps: Vec<u32> = (0..n).map(|_| rng.below(8) as u32).collect();
    eps.sort();
    eps.dedup();
    service(v6, id, &eps, rng.below(3) == 0, rng.below(3) == 0)
}

fn empty_family(family: IpFamily) -> FamilyState {
    let mut f = FamilyState::empty(family);
    f.cluster_cidrs = vec![
        match family {
            IpFamily::V4 => "10.244.0.0/16",
            IpFamily::V6 => "fd00:244::/48",
        }
        .parse()
        .expect("cidr"),
    ];
    f.cluster_ip_masquerade = ClusterIpMasquerade::FromOutside(f.cluster_cidrs.clone());
    f.nodeport_addresses = NodePortAddresses::AllLocal;
    f
}

fn initial(rng: &mut Rng) -> DesiredState {
    let mut state = DesiredState {
        node_name: "node-a".into(),
        node_zone: None,
        v4: empty_family(IpFamily::V4),
        v6: empty_family(IpFamily::V6),
        health_checks: BTreeMap::new(),
    };
    for id in 0..12 {
        let s = random_service(rng, false, id);
        state.v4.services.insert(Arc::new(s));
        let s = random_service(rng, true, id);
        state.v6.services.insert(Arc::new(s));
    }
    state
}

/// One to three random edits: add, remove or rewrite a service port.
fn mutate(rng: &mut Rng, state: &DesiredState) -> DesiredState {
    let mut next = state.clone();
    for _ in 0..=rng.below(3) {
        let v6 = rng.below(2) == 1;
        let fam = if v6 { &mut next.v6 } else { &mut next.v4 };
        let id = rng.below(16) as u32;
        let s = random_service(rng, v6, id);
        if rng.below(4) == 0 {
            fam.services.remove(&s.name);
        } else {
            fam.services.insert(Arc::new(s));
        }
    }
    next
}

fn nft(ns: &Netns, args: &[&str]) -> String {
    let out = run_checked(&mut ns.command("nft", args)).expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A listing as a sorted list of items: chains and set elements are listed in kernel
/// order, which differs between an incremental and a fresh table.
fn normalized(listing: &str) -> Vec<String> {
    let mut items: Vec<String> = listing
        .lines()
        .flat_map(|l| l.split(", "))
        .map(|s| s.trim().trim_end_matches(',').to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    items.sort();
    items
}

fn tables(ns: &Netns) -> [Vec<String>; 2] {
    ["ip", "ip6"].map(|f| normalized(&nft(ns, &["list", "table", f, "svcplane"])))
}

/// The tables a fresh full render of `state` yields, in the reference namespace.
fn reference(ns: &Netns, state: &DesiredState) -> [Vec<String>; 2] {
    for f in ["ip", "ip6"] {
        let _ = ns
            .command("nft", &["delete", "table", f, "svcplane"])
            .output();
    }
    let script = render(state).expect("render");
    let out = ns
        .run_with_input("nft", &["-f", "-"], &script)
        .expect("nft");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tables(ns)
}

fn sync(backend: &mut NftablesBackend, prev: &DesiredState, next: &DesiredState) -> SyncReport {
    let next = Arc::new(next.clone());
    let diff = Diff::between(Some(Arc::new(prev.clone())), &next, false);
    backend.sync(&next, &diff).expect("sync")
}

fn assert_same(synced: &Netns, fresh: &Netns, state: &DesiredState, step: &str) {
    let got = tables(synced);
    let want = reference(fresh, state);
    for (g, w) in got.iter().zip(&want) {
        let extra: Vec<&String> = g.iter().filter(|x| !w.contains(x)).collect();
        let missing: Vec<&String> = w.iter().filter(|x| !g.contains(x)).collect();
        assert!(
            g == w,
            "{step}: table differs from a fresh full render\nextra: {extra:?}\nmissing: {missing:?}"
        );
    }
}

#[test]
fn partial_syncs_over_netlink_equal_a_fresh_full_render() {
    let partials = partial_syncs_equal_a_fresh_full_render(true);
    // Every partial sync goes over netlink (40 random steps and one after the repair):
    // every rule, set and element of the render has a netlink encoding.
    if partials != u64::MAX {
        assert_eq!(partials, 41, "partial syncs over netlink");
    }
}

#[test]
fn partial_syncs_through_nft_equal_a_fresh_full_render() {
    assert_eq!(partial_syncs_equal_a_fresh_full_render(false), 0);
}

/// Random partial syncs, each compared with a fresh full render of the same state;
/// returns how many went over netlink (`u64::MAX` when skipped: not root).
fn partial_syncs_equal_a_fresh_full_render(netlink: bool) -> u64 {
    if skip_unless_root(&["ip", "nft"]) {
        return if netlink { u64::MAX } else { 0 };
    }
    let synced = Netns::new("svcplane-ps").expect("netns");
    let fresh = Netns::new("svcplane-pf").expect("netns");
    let mut backend = NftablesBackend::in_netns(synced.name()).with_netlink(netlink);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut state = initial(&mut rng);
    let first = Arc::new(state.clone());
    let report = backend
        .sync(&first, &Diff::between(None, &first, true))
        .expect("full sync");
    assert!(report.full);
    assert_same(&synced, &fresh, &state, "first full sync");

    let mut partials = 0;
    for step in 0..40 {
        let next = mutate(&mut rng, &state);
        let report = sync(&mut backend, &state, &next);
        assert!(!report.full, "step {step}: expected a partial sync");
        partials += usize::from(report.size > 0);
        state = next;
        assert_same(&synced, &fresh, &state, &format!("step {step}"));
    }
    assert!(partials > 30, "only {partials} syncs changed anything");

    // Tampering: the whole ruleset flushed → the next sync is full and repairs it.
    nft(&synced, &["flush", "ruleset"]);
    let next = mutate(&mut rng, &state);
    let report = sync(&mut backend, &state, &next);
    assert!(
        report.full,
        "a flushed ruleset must be repaired by a full sync"
    );
    state = next;
    assert_same(&synced, &fresh, &state, "after flush ruleset");

    // Only the other family's table deleted: still caught, whatever the change touches.
    nft(&synced, &["delete", "table", "ip6", "svcplane"]);
    let next = mutate(&mut rng, &state);
    let report = sync(&mut backend, &state, &next);
    assert!(
        report.full,
        "a deleted ip6 table must be repaired by a full sync"
    );
    state = next;
    assert_same(&synced, &fresh, &state, "after delete table ip6");

    // A partial transaction nft rejects (an element it deletes is already gone) is
    // retried as a full sync.
    let victim = state
        .v4
        .services
        .values()
        .find(|s| s.endpoints.is_empty())
        .cloned()
        .unwrap_or_else(|| {
            let s = Arc::new(service(false, 40, &[], false, false));
            let mut with = state.clone();
            with.v4.services.insert(s.clone());
            assert!(!sync(&mut backend, &state, &with).full);
            state = with;
            s
        });
    let cip = victim.cluster_ip.expect("cluster ip");
    nft(
        &synced,
        &[
            "delete",
            "element",
            "ip",
            "svcplane",
            "no-endpoint-services",
            &format!("{{ {cip} . tcp . 80 }}"),
        ],
    );
    let mut next = state.clone();
    next.v4.services.remove(&victim.name);
    let report = sync(&mut backend, &state, &next);
    assert!(
        report.full,
        "a rejected partial transaction must be retried in full"
    );
    state = next;
    assert_same(&synced, &fresh, &state, "after a failed partial");

    // And partial syncs resume.
    let next = mutate(&mut rng, &state);
    assert!(!sync(&mut backend, &state, &next).full);
    assert_same(&synced, &fresh, &next, "partial after repair");
    backend.netlink_partials()
}

#[test]
fn restart_adopts_the_existing_table_in_place() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    for netlink in [false, true] {
        restart_adopts_the_existing_table(netlink);
    }
}

/// A second process's first (full) sync, through nft or over netlink, keeps the table
/// and its affinity elements.
fn restart_adopts_the_existing_table(netlink: bool) {
    let ns = Netns::new("svcplane-ra").expect("netns");
    let mut rng = Rng(0xadd0_0001);
    let mut state = initial(&mut rng);
    let sticky = Arc::new(service(false, 50, &[1, 2], true, false));
    state.v4.services.insert(sticky.clone());
    let arc = Arc::new(state.clone());
    let diff = Diff::between(None, &arc, true);
    let cmd = ["ip", "netns", "exec", ns.name(), "nft"];
    let process = || {
        if netlink {
            NftablesBackend::in_netns(ns.name())
        } else {
            NftablesBackend::with_nft_command(cmd)
        }
    };
    process().sync(&arc, &diff).expect("first process");
    let set = nft(&ns, &["-a", "list", "table", "ip", "svcplane"])
        .lines()
        .map(str::trim)
        .find_map(|l| {
            l.strip_prefix("set affinity-")
                .filter(|l| l.contains("svc50"))
        })
        .and_then(|l| l.split_whitespace().next())
        .map(|l| format!("affinity-{l}"))
        .expect("affinity set");
    nft(
        &ns,
        &["add", "element", "ip", "svcplane", &set, "{ 192.0.2.7 }"],
    );
    let handle = |ns: &Netns| {
        nft(ns, &["-a", "list", "tables"])
            .lines()
            .find(|l| l.starts_with("table ip svcplane"))
            .map(str::to_owned)
    };
    let before = handle(&ns);
    // A new process: its first sync is full, and must neither delete the table nor
    // lose the affinity element.
    let mut second = process();
    let report = second.sync(&arc, &diff).expect("second process");
    assert!(report.full);
    assert_eq!(second.netlink_fulls(), u64::from(netlink));
    assert_eq!(handle(&ns), before, "the table was re-created");
    let listed = nft(&ns, &["list", "set", "ip", "svcplane", &set]);
    assert!(
        listed.contains("192.0.2.7"),
        "affinity lost on restart (netlink: {netlink}): {listed}"
    );
}

/// A node programmed by an earlier svcplane, whose endpoint checks ran before DNAT
/// (kube-proxy's layout before kubernetes#132456): the first sync leaves exactly what a
/// fresh full render gives, old base chains deleted and the others at their new
/// priorities.
#[test]
fn first_sync_upgrades_the_earlier_base_chain_layout() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let (synced, fresh) = (
        Netns::new("svcplane-up").expect("netns"),
        Netns::new("svcplane-upref").expect("netns"),
    );
    let mut old = String::new();
    for f in ["ip", "ip6"] {
        old += &format!(
            "table {f} svcplane {{
\tcomment \"rules for svcplane\"
\tchain firewall-check {{ }}
\tchain service-endpoints-check {{ }}
\tchain cluster-ips-check {{ }}
\tchain filter-prerouting {{ type filter hook prerouting priority -110 ; ct state new jump firewall-check ; }}
\tchain filter-input {{ type filter hook input priority -110 ; ct state new jump service-endpoints-check ; }}
\tchain filter-forward {{ type filter hook forward priority -110 ; ct state new jump service-endpoints-check ; }}
\tchain filter-output {{ type filter hook output priority -110 ; ct state new jump service-endpoints-check ; }}
\tchain filter-output-post-dnat {{ type filter hook output priority -90 ; ct state new jump cluster-ips-check ; }}
}}
"
        );
    }
    let out = synced
        .run_with_input("nft", &["-f", "-"], &old)
        .expect("nft");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = Arc::new(initial(&mut Rng(0xadd0_0002)));
    let mut backend = NftablesBackend::in_netns(synced.name());
    let report = backend
        .sync(&state, &Diff::between(None, &state, true))
        .expect("first sync");
    assert!(report.full);
    assert_same(&synced, &fresh, &state, "upgrade");
}

/// The rules of both tables with their kernel handles: a rule added or rewritten gets a
/// new handle.
fn rule_handles(ns: &Netns) -> Vec<String> {
    ["ip", "ip6"]
        .into_iter()
        .flat_map(|f| {
            nft(ns, &["-a", "list", "table", f, "svcplane"])
                .lines()
                .filter(|l| l.contains("# handle") && !l.trim_start().starts_with("chain "))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Syncs the endpoint swap `prev` → `next` (the backend's first partial sync) and
/// checks it went over netlink, changed no rule of `before`, and lists as a fresh
/// full render of `next` does.
fn swap_changes_no_rule(
    backend: &mut NftablesBackend,
    (synced, fresh): (&Netns, &Netns),
    before: &[String],
    prev: &DesiredState,
    next: &DesiredState,
) {
    assert!(!sync(backend, prev, next).full);
    assert_eq!(
        backend.netlink_partials(),
        1,
        "the swap did not go over netlink"
    );
    let after = rule_handles(synced);
    let changed: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    assert!(changed.is_empty(), "rules added for a swap: {changed:?}");
    assert_eq!(after.len(), before.len(), "rules removed for a swap");
    assert_same(synced, fresh, next, "after the swap");
}

/// An endpoint swap (same count) of a plain ClusterIP service is map element operations
/// over netlink: no rule of either table changes, and the table still equals a fresh
/// full render. A count change rewrites only that service's chain.
#[test]
fn endpoint_swap_over_netlink_changes_elements_only() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let (synced, fresh) = (
        Netns::new("svcplane-sw").expect("netns"),
        Netns::new("svcplane-swref").expect("netns"),
    );
    let mut state = initial(&mut Rng(0x5a4b_0001));
    for (id, v6) in [(60, false), (61, true)] {
        let s = Arc::new(service(v6, id, &[1, 2, 3], false, false));
        let fam = if v6 { &mut state.v6 } else { &mut state.v4 };
        fam.services.insert(s);
    }
    let mut backend = NftablesBackend::in_netns(synced.name());
    let first = Arc::new(state.clone());
    assert!(
        backend
            .sync(&first, &Diff::between(None, &first, true))
            .expect("full sync")
            .full
    );
    let before = rule_handles(&synced);
    assert!(
        before
            .iter()
            .any(|l| l.contains("goto endpoints-tcp-mod-3"))
    );

    // Swap endpoint 2 for 5 in both families.
    let mut next = state.clone();
    for (id, v6) in [(60, false), (61, true)] {
        let s = Arc::new(service(v6, id, &[1, 3, 5], false, false));
        let fam = if v6 { &mut next.v6 } else { &mut next.v4 };
        fam.services.insert(s);
    }
    swap_changes_no_rule(&mut backend, (&synced, &fresh), &before, &state, &next);
    let map = nft(&synced, &["list", "map", "ip", "svcplane", "endpoints-tcp"]);
    assert!(map.contains("10.244.0.6 . 8080"), "{map}");
    state = next;

    // One more endpoint: that service's chain is rewritten (its masquerade rule and its
    // goto), nothing else.
    let mut next = state.clone();
    let s = Arc::new(service(false, 60, &[1, 3, 5, 6], false, false));
    next.v4.services.insert(s);
    assert!(!sync(&mut backend, &state, &next).full);
    assert_eq!(backend.netlink_partials(), 2);
    let after = rule_handles(&synced);
    let changed: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    assert_eq!(changed.len(), 2, "{changed:?}");
    assert!(
        changed[0].contains("ip daddr 10.96.0.61 tcp dport 80"),
        "{changed:?}"
    );
    assert!(
        changed[1].contains("goto endpoints-tcp-mod-4"),
        "{changed:?}"
    );
    assert_same(&synced, &fresh, &next, "after the count change");
}

/// Service port `id` with external traffic of `kind`: `np` a NodePort, `eip` an
/// externalIP, `lb` a LoadBalancer IP with source ranges and a NodePort, `local` the
/// same with externalTrafficPolicy Local (the first two endpoints on this node).
fn external_service(v6: bool, id: u32, eps: &[u32], kind: &str) -> ServicePortState {
    let mut s = service(v6, id, eps, false, kind != "eip");
    // An address of its own (a key claimed twice is an invalid cluster).
    let addr = |v4: &str| {
        if v6 {
            ip(&format!("2001:db8::{id}"))
        } else {
            ip(&format!("{v4}.{id}"))
        }
    };
    match kind {
        "np" => {}
        "eip" => s.external_ips = vec![addr("203.0.113")],
        "lb" | "local" => {
            s.load_balancer_ips = vec![addr("198.51.100")];
            s.load_balancer_source_ranges = vec![
                if v6 {
                    "2001:db8:2::/48"
                } else {
                    "192.0.2.0/24"
                }
                .parse()
                .expect("cidr"),
            ];
        }
        _ => unreachable!("kind {kind}"),
    }
    if kind == "local" {
        s.external_policy = ExternalPolicy::Local {
            local_origin: s.external.clone(),
        };
        s.external.endpoints = vec![0, 1].into();
    }
    s
}

/// The external entries (NodePorts, externalIPs, LoadBalancer IPs, eTP Local's
/// short-circuits) choose from endpoint maps as ClusterIPs do: a swap changes no rule, a
/// count change rewrites only the changed services' own chains.
#[test]
fn external_endpoint_swap_over_netlink_changes_elements_only() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let (synced, fresh) = (
        Netns::new("svcplane-esw").expect("netns"),
        Netns::new("svcplane-eswref").expect("netns"),
    );
    const KINDS: [(u32, &str); 4] = [(70, "np"), (71, "eip"), (72, "lb"), (73, "local")];
    let with = |state: &DesiredState, eps: &[u32], v6s: &[bool]| {
        let mut next = state.clone();
        for &v6 in v6s {
            for (id, kind) in KINDS {
                let s = Arc::new(external_service(v6, id, eps, kind));
                let fam = if v6 { &mut next.v6 } else { &mut next.v4 };
                fam.services.insert(s);
            }
        }
        next
    };
    let base = initial(&mut Rng(0x5a4b_0002));
    let state = with(&base, &[1, 2, 3], &[false, true]);
    let mut backend = NftablesBackend::in_netns(synced.name());
    let first = Arc::new(state.clone());
    assert!(
        backend
            .sync(&first, &Diff::between(None, &first, true))
            .expect("full sync")
            .full
    );
    assert_same(&synced, &fresh, &state, "the first sync");
    let before = rule_handles(&synced);
    for goto in [
        "goto nodeport-endpoints-tcp-mod-3",
        "goto endpoints-tcp-mod-3",
        "goto nodeport-endpoints-tcp-mod-2",
        "goto origin-nodeport-endpoints-tcp-mod-3",
        "goto origin-endpoints-tcp-mod-3",
    ] {
        assert!(before.iter().any(|l| l.contains(goto)), "no {goto}");
    }

    // Swap endpoint 2 (a local one of the eTP Local service) for 5, both families.
    let next = with(&state, &[1, 5, 3], &[false, true]);
    swap_changes_no_rule(&mut backend, (&synced, &fresh), &before, &state, &next);
    for map in [
        "endpoints-tcp",
        "nodeport-endpoints-tcp",
        "origin-endpoints-tcp",
        "origin-nodeport-endpoints-tcp",
    ] {
        let listing = nft(&synced, &["list", "map", "ip", "svcplane", map]);
        assert!(listing.contains("10.244.0.6 . 8080"), "{map}: {listing}");
        assert!(!listing.contains("10.244.0.3 . 8080"), "{map}: {listing}");
        let listing = nft(&synced, &["list", "map", "ip6", "svcplane", map]);
        assert!(listing.contains("fd00:244::6 . 8080"), "{map}: {listing}");
    }
    let state = next;

    // One more endpoint (not local) for each v4 service: their chains are rewritten, and
    // only theirs. Per service: the service chain (masquerade mark + goto) and each EXT
    // chain (eTP Cluster: mark + goto; Local: 3 short-circuit rules + goto); the firewall
    // chain keeps its rule.
    let next = with(&state, &[1, 5, 3, 7], &[false]);
    assert!(!sync(&mut backend, &state, &next).full);
    assert_eq!(backend.netlink_partials(), 2);
    let after = rule_handles(&synced);
    let changed: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    let (np, eip, lb, local) = (2 + 2, 2 + 2, 2 + 2 + 2, 2 + 4 + 4);
    assert_eq!(changed.len(), np + eip + lb + local, "{changed:#?}");
    for l in &changed {
        assert!(
            l.contains("-mod-4")
                || l.contains("goto nodeport-endpoints-tcp-mod-2")
                || l.contains("goto endpoints-tcp-mod-2")
                || l.contains("mark-for-masquerade"),
            "{l}"
        );
    }
    assert_eq!(after.len(), before.len());
    assert_same(&synced, &fresh, &next, "after the count change");
}
