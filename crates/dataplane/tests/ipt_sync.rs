//! The iptables backend against the kernel (root, netns): partial syncs must leave the
//! same rules as a fresh full sync; a flushed table is repaired; cleanup removes
//! svcplane's chains and jumps only.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use svcplane_dataplane::IptablesBackend;
use svcplane_dataplane::iptables::Dispatch;
use svcplane_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
use svcplane_proxy::{
    ClusterIpMasquerade, Dataplane, DesiredState, Diff, EmptyVerdict, EndpointState,
    ExternalPolicy, FamilyState, NodePortAddresses, ServicePortState, SyncReport, TrafficTarget,
};
use svcplane_testkit::{Netns, run_checked, skip_unless_root};

/// xorshift64*: reproducible runs without a dependency.
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

/// Service port `id` with endpoints `eps` (ids into a small pool) and random features:
/// affinity, NodePort, externalIP, LoadBalancer IP with source ranges, eTP Local.
fn random_service(rng: &mut Rng, v6: bool, id: u32) -> ServicePortState {
    let n = rng.below(4) as usize;
    let mut eps: Vec<u32> = (0..n).map(|_| rng.below(8) as u32).collect();
    eps.sort();
    eps.dedup();
    let addr = |pool: &str, i: u32| {
        if v6 {
            ip(&format!("fd00:{pool}::{:x}", i + 1))
        } else {
            ip(&format!("10.{pool}.{}.{}", i / 200, i % 200 + 1))
        }
    };
    let endpoints: Vec<EndpointState> = eps
        .iter()
        .map(|&e| EndpointState::ready(addr("244", e), 8080, e % 2 == 0))
        .collect();
    let all: Vec<usize> = (0..endpoints.len()).collect();
    let local: Vec<usize> = all
        .iter()
        .copied()
        .filter(|&i| endpoints[i].is_local)
        .collect();
    let etp_local = rng.below(3) == 0;
    let target = |eps: &[usize], if_empty| TrafficTarget {
        endpoints: eps.into(),
        if_empty,
    };
    let external = rng.below(3);
    let protocol = if rng.below(4) == 0 {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    ServicePortState {
        name: ServicePortName {
            service: NamespacedName::new("default", format!("svc{id}")),
            port: "http".into(),
            protocol,
        },
        protocol,
        port: 80,
        cluster_ip: Some(addr("96", id)),
        node_port: (external > 0).then_some(30000 + id as u16),
        external_ips: if external == 1 {
            vec![addr("99", id)]
        } else {
            vec![]
        },
        load_balancer_ips: if external == 2 {
            vec![addr("98", id)]
        } else {
            vec![]
        },
        load_balancer_source_ranges: if external == 2 && rng.below(2) == 0 {
            vec![
                if v6 {
                    "fd00:203::/64"
                } else {
                    "203.0.113.0/24"
                }
                .parse()
                .expect("cidr"),
            ]
        } else {
            vec![]
        },
        affinity_timeout_seconds: (rng.below(3) == 0).then_some(600),
        ipvs_scheduler: None,
        internal: target(&all, EmptyVerdict::Reject),
        external: if etp_local {
            target(
                &local,
                if all.is_empty() {
                    EmptyVerdict::Reject
                } else {
                    EmptyVerdict::Drop
                },
            )
        } else {
            target(&all, EmptyVerdict::Reject)
        },
        external_policy: if etp_local {
            ExternalPolicy::Local {
                local_origin: target(&all, EmptyVerdict::Reject),
            }
        } else {
            ExternalPolicy::Cluster
        },
        health_check_node_port: (etp_local && external > 0).then_some(31000 + id as u16),
        endpoints,
    }
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

fn initial(rng: &mut Rng, n: u32) -> DesiredState {
    let mut state = DesiredState {
        node_name: "node-a".into(),
        node_zone: None,
        v4: empty_family(IpFamily::V4),
        v6: empty_family(IpFamily::V6),
        health_checks: BTreeMap::new(),
    };
    for id in 0..n {
        let s = random_service(rng, false, id);
        state.v4.services.insert(Arc::new(s));
        let s = random_service(rng, true, id);
        state.v6.services.insert(Arc::new(s));
    }
    state
}

/// One to three random edits: add, remove or rewrite a service port.
fn mutate(rng: &mut Rng, state: &DesiredState, n: u32) -> DesiredState {
    let mut next = state.clone();
    for _ in 0..=rng.below(3) {
        let v6 = rng.below(2) == 1;
        let fam = if v6 { &mut next.v6 } else { &mut next.v4 };
        let id = rng.below(u64::from(n)) as u32;
        let s = random_service(rng, v6, id);
        // Another version of the same port may exist under the other protocol.
        fam.services.retain(|k, _| k.service != s.name.service);
        if rng.below(4) != 0 {
            fam.services.insert(Arc::new(s));
        }
    }
    next
}

/// svcplane's chains and the jumps to them, per family, sorted (iptables-save lists
/// chains in kernel order, which differs between an incremental and a fresh table).
fn saved(ns: &Netns) -> [Vec<String>; 2] {
    ["iptables-save", "ip6tables-save"].map(|save| {
        let out = run_checked(&mut ns.command(save, &[])).expect("save");
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(":SVCP-") || (l.starts_with("-A ") && l.contains("SVCP-")))
            .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
            .collect();
        lines.sort();
        lines
    })
}

fn full(backend: &mut IptablesBackend, state: &DesiredState) -> SyncReport {
    let arc = Arc::new(state.clone());
    backend
        .sync(&arc, &Diff::between(None, &arc, true))
        .expect("full sync")
}

fn sync(backend: &mut IptablesBackend, prev: &DesiredState, next: &DesiredState) -> SyncReport {
    let next = Arc::new(next.clone());
    let diff = Diff::between(Some(Arc::new(prev.clone())), &next, false);
    backend.sync(&next, &diff).expect("sync")
}

fn assert_same(synced: &Netns, dispatch: Dispatch, state: &DesiredState, step: &str) {
    let fresh = Netns::new("svcp-ipf").expect("netns");
    let mut reference = IptablesBackend::in_netns(fresh.name()).with_dispatch(dispatch);
    full(&mut reference, state);
    let (got, want) = (saved(synced), saved(&fresh));
    for (g, w) in got.iter().zip(&want) {
        let extra: Vec<&String> = g.iter().filter(|x| !w.contains(x)).collect();
        let missing: Vec<&String> = w.iter().filter(|x| !g.contains(x)).collect();
        assert!(
            g == w,
            "{step}: rules differ from a fresh full sync\nextra: {extra:#?}\nmissing: {missing:#?}"
        );
    }
}

fn partial_syncs_equal_a_fresh_full_sync(dispatch: Dispatch, services: u32, seed: u64) {
    if skip_unless_root(&["ip", "iptables-restore", "ip6tables-restore"]) {
        return;
    }
    let synced = Netns::new("svcp-ips").expect("netns");
    let mut backend = IptablesBackend::in_netns(synced.name()).with_dispatch(dispatch);
    let mut rng = Rng(seed);
    let mut state = initial(&mut rng, services);
    let report = full(&mut backend, &state);
    assert!(report.full);
    assert!(
        report
            .iptables_rules
            .is_some_and(|(nat, filter)| nat > 0 && filter > 0)
    );
    assert_same(&synced, dispatch, &state, "first full sync");

    let mut partials = 0;
    for step in 0..25 {
        let next = mutate(&mut rng, &state, services + 4);
        let report = sync(&mut backend, &state, &next);
        assert!(!report.full, "step {step}: expected a partial sync");
        partials += usize::from(report.size > 0);
        state = next;
        assert_same(&synced, dispatch, &state, &format!("step {step}"));
    }
    assert!(partials > 15, "only {partials} syncs changed anything");

    // The periodic check (nothing changed) finds the tables intact: nothing rewritten.
    let report = sync(&mut backend, &state, &state);
    assert!(!report.full);

    // Someone flushes nat (`iptables -t nat -F`): the periodic check finds the canary's
    // rule gone and a full sync repairs everything.
    run_checked(&mut synced.command("iptables", &["-t", "nat", "-F"])).expect("flush");
    let report = sync(&mut backend, &state, &state);
    assert!(
        report.full,
        "a flushed table must be repaired by a full sync"
    );
    assert_eq!(report.partial_restore_failures, 0);
    assert_same(&synced, dispatch, &state, "after iptables -t nat -F");

    // Flushed again, then a change to IPv4 nat: the partial transaction fails on the
    // canary, is counted, and is retried in full.
    run_checked(&mut synced.command("iptables", &["-t", "nat", "-F"])).expect("flush");
    let mut next = state.clone();
    let s = random_service(&mut rng, false, services + 10);
    next.v4.services.insert(Arc::new(s));
    let report = sync(&mut backend, &state, &next);
    assert!(report.full, "a refused partial must be retried in full");
    assert_eq!(report.partial_restore_failures, 1);
    state = next;
    assert_same(&synced, dispatch, &state, "after a refused partial");

    // IPv6 filter flushed and its chains deleted: the periodic check (an empty diff)
    // checks every table.
    run_checked(&mut synced.command("ip6tables", &["-F"])).expect("flush");
    run_checked(&mut synced.command("ip6tables", &["-X"])).expect("delete chains");
    let report = sync(&mut backend, &state, &state);
    assert!(report.full, "deleted ip6 filter chains must be repaired");
    assert_same(&synced, dispatch, &state, "after ip6tables -F -X");

    // And partial syncs resume.
    let next = mutate(&mut rng, &state, services + 4);
    assert!(!sync(&mut backend, &state, &next).full);
    assert_same(&synced, dispatch, &next, "partial after repair");
}

#[test]
fn tree_partial_syncs_equal_a_fresh_full_sync() {
    // Enough services for the tree to have levels.
    partial_syncs_equal_a_fresh_full_sync(Dispatch::Tree, 60, 0x5eed_1234_abcd_0002);
}

#[test]
fn linear_partial_syncs_equal_a_fresh_full_sync() {
    partial_syncs_equal_a_fresh_full_sync(Dispatch::Linear, 12, 0x5eed_1234_abcd_0003);
}

#[test]
fn switching_dispatch_rewrites_the_tree_away() {
    if skip_unless_root(&["ip", "iptables-restore", "ip6tables-restore"]) {
        return;
    }
    let ns = Netns::new("svcp-ipd").expect("netns");
    let mut rng = Rng(0xd15_0001);
    let state = initial(&mut rng, 60);
    full(&mut IptablesBackend::in_netns(ns.name()), &state);
    assert!(saved(&ns)[0].iter().any(|l| l.starts_with(":SVCP-DA-")));
    // A new process in linear mode: its first full sync lists and deletes the tree.
    full(
        &mut IptablesBackend::in_netns(ns.name()).with_dispatch(Dispatch::Linear),
        &state,
    );
    assert_same(&ns, Dispatch::Linear, &state, "tree → linear");
}

#[test]
fn cleanup_removes_svcplane_chains_and_jumps_only() {
    if skip_unless_root(&["ip", "iptables-restore", "ip6tables-restore"]) {
        return;
    }
    let ns = Netns::new("svcp-ipc").expect("netns");
    // A foreign chain, with a jump from PREROUTING, and kube-proxy's.
    let foreign = "*nat\n:CNI-HOSTPORT-DNAT - [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j CNI-HOSTPORT-DNAT\n-A PREROUTING -j KUBE-SERVICES\n-A CNI-HOSTPORT-DNAT -j RETURN\nCOMMIT\n";
    let out = ns
        .run_with_input("iptables-restore", &["--noflush"], foreign)
        .expect("restore");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rng = Rng(0xc1ea_0001);
    let state = initial(&mut rng, 20);
    let mut backend = IptablesBackend::in_netns(ns.name());
    full(&mut backend, &state);
    assert!(backend.has_chains());
    backend.cleanup().expect("cleanup");
    assert!(!backend.has_chains());
    assert_eq!(saved(&ns), [Vec::<String>::new(), Vec::new()]);
    let nat = run_checked(&mut ns.command("iptables-save", &["-t", "nat"])).expect("save");
    let nat = String::from_utf8_lossy(&nat.stdout);
    for kept in [
        "-A PREROUTING -j CNI-HOSTPORT-DNAT",
        "-A PREROUTING -j KUBE-SERVICES",
        ":KUBE-SERVICES",
        "-A CNI-HOSTPORT-DNAT -j RETURN",
    ] {
        assert!(nat.contains(kept), "{kept} is gone:\n{nat}");
    }
    // Idempotent.
    backend.cleanup().expect("second cleanup");
}

#[test]
fn starting_in_one_mode_removes_the_others_leftovers() {
    if skip_unless_root(&["ip", "nft", "iptables-restore", "ip6tables-restore"]) {
        return;
    }
    let ns = Netns::new("svcp-ipm").expect("netns");
    let mut rng = Rng(0x5717_0001);
    let state = initial(&mut rng, 10);
    let arc = Arc::new(state.clone());
    let diff = Diff::between(None, &arc, true);
    // nftables mode ran here before.
    svcplane_dataplane::NftablesBackend::in_netns(ns.name())
        .sync(&arc, &diff)
        .expect("nftables sync");
    let tables = |ns: &Netns| {
        let out = run_checked(&mut ns.command("nft", &["list", "tables"])).expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(tables(&ns).contains("table ip svcplane"));
    // iptables mode starts: it removes the nftables tables and says so.
    let said = svcplane_testkit::in_netns(ns.name(), || {
        svcplane_dataplane::remove_other_modes(
            svcplane_dataplane::ProxyMode::Iptables,
            &Default::default(),
        )
    })
    .expect("in netns");
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("removed svcplane's nftables tables"),
        "{said:?}"
    );
    assert!(!tables(&ns).contains("svcplane"), "{}", tables(&ns));
    full(&mut IptablesBackend::in_netns(ns.name()), &state);
    // Nothing of another mode left: nothing said.
    let said = svcplane_testkit::in_netns(ns.name(), || {
        svcplane_dataplane::remove_other_modes(
            svcplane_dataplane::ProxyMode::Iptables,
            &Default::default(),
        )
    })
    .expect("in netns");
    assert!(said.is_empty(), "{said:?}");
    // Back to nftables mode: svcplane's iptables chains go, with the jumps to them.
    let said = svcplane_testkit::in_netns(ns.name(), || {
        svcplane_dataplane::remove_other_modes(
            svcplane_dataplane::ProxyMode::Nftables,
            &Default::default(),
        )
    })
    .expect("in netns");
    assert!(said.len() == 1 && said[0].contains("SVCP-"), "{said:?}");
    assert_eq!(saved(&ns), [Vec::<String>::new(), Vec::new()]);
}
