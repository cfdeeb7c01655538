//! Sync cost at scale: full render and full apply for 1k / 10k / 50k ClusterIP service
//! ports × 10 endpoints, and one endpoint change at 10k and above (a partial sync: render and
//! apply). The apply part needs root (it runs in a private network namespace).
//!
//! `cargo bench -p svcplane-dataplane --bench sync [-- [nftables|nftables-text|iptables|iptables-linear|ipvs]... [external] 1000 10000]`
//! (default: nftables; `nftables-text` sends everything through `nft -f` instead of netlink;
//! `external`: every service is a LoadBalancer, with a node port and a LoadBalancer IP,
//! every tenth with externalTrafficPolicy Local over its first 5 endpoints).
//! ipvs applies only where the kernel has IPVS (`make test-ipvs`'s VM:
//! carry the bench binary there with `scripts/ipvs-vm.sh --bin`); everywhere it also times
//! a partial sync's in-memory part at 10k (the changed service's virtual servers, the
//! dummy's address claims, the filter tables' element changes).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use svcplane_dataplane::iptables::{Dispatch, render::Options};
use svcplane_dataplane::ipvs::{self, filter::FilterState, plan};
use svcplane_dataplane::{IptablesBackend, IpvsBackend, IpvsOptions, NftablesBackend};
use svcplane_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
use svcplane_proxy::{
    ClusterIpMasquerade, Dataplane, DesiredState, Diff, EmptyVerdict, EndpointState,
    ExternalPolicy, FamilyState, NodePortAddresses, ServicePortState, TrafficTarget,
};
use svcplane_testkit::{Netns, skip_unless_root};

const ENDPOINTS: u32 = 10;

fn v4(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

fn service(id: u32, first_endpoint: u32, external: bool) -> ServicePortState {
    let endpoints: Vec<EndpointState> = (0..ENDPOINTS)
        // 10.128.0.0/9: room for 50k × 10 distinct pod addresses.
        .map(|e| EndpointState::ready(v4(0x0a80_0000 + first_endpoint + e), 8080, false))
        .collect();
    let target = TrafficTarget {
        endpoints: (0..endpoints.len()).collect(),
        if_empty: EmptyVerdict::Reject,
    };
    let mut s = ServicePortState {
        name: ServicePortName {
            service: NamespacedName::new("bench", format!("svc-{id}")),
            port: "http".into(),
            protocol: Protocol::Tcp,
        },
        protocol: Protocol::Tcp,
        port: 80,
        // 10.96.0.0/12 from 10.96.0.1 on.
        cluster_ip: Some(v4(0x0a60_0001 + id)),
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        affinity_timeout_seconds: None,
        ipvs_scheduler: None,
        endpoints,
        internal: target.clone(),
        external: target,
        external_policy: ExternalPolicy::Cluster,
        health_check_node_port: None,
    };
    if external {
        // Node ports from 30000 on (35k services at most), LoadBalancer IPs from
        // 198.18.0.0/15.
        s.node_port = u16::try_from(30_000 + id).ok();
        s.load_balancer_ips = vec![v4(0xc612_0000 + id)];
        if id.is_multiple_of(10) {
            s.external_policy = ExternalPolicy::Local {
                local_origin: s.external.clone(),
            };
            s.external.endpoints = (0..5).collect();
        }
    }
    s
}

fn state(services: u32, external: bool) -> DesiredState {
    let mut fam = FamilyState::empty(IpFamily::V4);
    fam.cluster_cidrs = vec!["10.128.0.0/9".parse().expect("cidr")];
    fam.cluster_ip_masquerade = ClusterIpMasquerade::FromOutside(fam.cluster_cidrs.clone());
    fam.nodeport_addresses = NodePortAddresses::AllLocal;
    for id in 0..services {
        let s = service(id, id * ENDPOINTS, external);
        fam.services.insert(Arc::new(s));
    }
    DesiredState {
        node_name: "node-a".into(),
        node_zone: None,
        v4: fam,
        v6: FamilyState::empty(IpFamily::V6),
        health_checks: BTreeMap::new(),
    }
}

/// Median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// A mode the bench runs.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `text`: full and partial syncs through `nft -f` only.
    Nftables {
        text: bool,
    },
    Iptables(Dispatch),
    Ipvs,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Nftables { text: false } => "nftables",
            Mode::Nftables { text: true } => "nftables-text",
            Mode::Iptables(Dispatch::Tree) => "iptables",
            Mode::Iptables(Dispatch::Linear) => "iptables-linear",
            Mode::Ipvs => "ipvs",
        }
    }

    fn render(self, desired: &DesiredState) -> usize {
        match self {
            Mode::Nftables { .. } => svcplane_dataplane::nftables::render(desired)
                .map(|s| s.len())
                .unwrap_or(0),
            Mode::Iptables(dispatch) => svcplane_dataplane::iptables::render::render(
                desired,
                Options {
                    dispatch,
                    random_fully: true,
                },
            )
            .len(),
            Mode::Ipvs => ipvs::render(desired, &IpvsOptions::default())
                .map(|s| s.len())
                .unwrap_or(0),
        }
    }

    fn backend(self, ns: &str) -> Box<dyn Dataplane> {
        match self {
            Mode::Nftables { text } => Box::new(NftablesBackend::in_netns(ns).with_netlink(!text)),
            Mode::Iptables(d) => Box::new(IptablesBackend::in_netns(ns).with_dispatch(d)),
            Mode::Ipvs => Box::new(IpvsBackend::in_netns(ns, IpvsOptions::default())),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes: Vec<u32> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000, 50_000]
    } else {
        sizes
    };
    let mut modes: Vec<Mode> = args
        .iter()
        .filter_map(|a| match a.as_str() {
            "nftables" => Some(Mode::Nftables { text: false }),
            "nftables-text" => Some(Mode::Nftables { text: true }),
            "iptables" => Some(Mode::Iptables(Dispatch::Tree)),
            "iptables-linear" => Some(Mode::Iptables(Dispatch::Linear)),
            "ipvs" => Some(Mode::Ipvs),
            _ => None,
        })
        .collect();
    if modes.is_empty() {
        modes.push(Mode::Nftables { text: false });
    }
    let external = args.iter().any(|a| a == "external");
    for mode in modes {
        println!(
            "mode {}{}",
            mode.name(),
            if external {
                ", LoadBalancer services"
            } else {
                ""
            }
        );
        run(mode, &sizes, external);
    }
}

fn run(mode: Mode, sizes: &[u32], external: bool) {
    let root = !skip_unless_root(&["ip", "nft", "iptables-restore"]);
    for &n in sizes {
        let desired = Arc::new(state(n, external));
        let mut bytes = 0;
        let render_time = median(5, || {
            bytes = mode.render(&desired);
        });
        println!(
            "{n:>6} services × {ENDPOINTS} endpoints: full render {render_time:?} ({bytes} bytes)"
        );
        if mode == Mode::Ipvs && n == 10_000 {
            ipvs_partial_in_memory(&desired);
        }
        if !root {
            continue;
        }
        let ns = match Netns::new("svcplane-bench") {
            Ok(ns) => ns,
            Err(e) => {
                eprintln!("cannot create a network namespace: {e}");
                return;
            }
        };
        if mode == Mode::Ipvs
            && let Err(e) = ipvs::kernel_has_ipvs(Some(ns.name()))
        {
            println!("{n:>6} services: no apply: {e}");
            continue;
        }
        let mut backend = mode.backend(ns.name());
        let full = Diff::between(None, &desired, true);
        let runs = if n >= 50_000 { 1 } else { 3 };
        let mut failed = None;
        // The first apply creates everything; later ones replace it in place, as every
        // full resync does.
        let apply_time = median(runs, || {
            if let Err(e) = backend.sync(&desired, &full) {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            eprintln!("full apply failed: {e}");
            continue;
        }
        println!("{n:>6} services: full sync (render + apply) {apply_time:?}");

        if n >= 10_000 {
            // One endpoint of one service moves: a partial sync. The states and diffs
            // are the engine's work, prepared outside the timing.
            let mut steps = Vec::new();
            let mut current = desired.clone();
            for round in 1..=21 {
                let mut next = (*current).clone();
                let moved = service(n / 2, n * ENDPOINTS + round, external);
                next.v4.services.insert(Arc::new(moved));
                let next = Arc::new(next);
                let diff = Diff::between(Some(current.clone()), &next, false);
                steps.push((next.clone(), diff));
                current = next;
            }
            let mut steps = steps.into_iter();
            let mut sizes = Vec::new();
            // Each step's states are freed after the timing: dropping the last holder of
            // a whole state is O(N), and the sync loop's engine keeps it (its spare).
            let mut done = Vec::new();
            let partial_time = median(21, || {
                if let Some((next, diff)) = steps.next() {
                    match backend.sync(&next, &diff) {
                        Ok(report) => sizes.push((report.full, report.size)),
                        Err(e) => eprintln!("partial sync failed: {e}"),
                    }
                    done.push((next, diff));
                }
            });
            drop(done);
            // The periodic check: an empty partial diff (the tables probe, the conntrack pass).
            let settled = current.clone();
            let check = Diff::between(Some(settled.clone()), &settled, false);
            let mut check_failed = None;
            let check_time = median(11, || {
                if let Err(e) = backend.sync(&settled, &check) {
                    check_failed = Some(e);
                }
            });
            match check_failed {
                Some(e) => eprintln!("periodic check failed: {e}"),
                None => {
                    println!("{n:>6} services: periodic check (empty partial sync) {check_time:?}")
                }
            }
            let all_partial = sizes.iter().all(|(full, _)| !full);
            println!(
                "{n:>6} services: one endpoint change, partial sync (render + apply) {partial_time:?}, {} bytes of script, all partial: {all_partial}",
                sizes.first().map_or(0, |s| s.1),
            );
        }
    }
}

/// IPVS mode's partial sync without the kernel: for one endpoint moving in one of 10k
/// services, the changed service's virtual servers before and after, the dummy's
/// address claims and the filter tables' element changes (what `IpvsBackend` computes
/// between its netlink requests).
fn ipvs_partial_in_memory(desired: &Arc<DesiredState>) {
    let n = desired.v4.services.len() as u32;
    let (mut applied, contested) = plan::virtual_servers_contested(desired, "rr", &[]);
    let vips = plan::service_addresses(desired);
    let mut filter =
        FilterState::build(&desired.v4, applied.values(), &vips).expect("filter state");
    let mut claims = plan::address_claims(desired);
    let mut current = desired.clone();
    let mut steps = Vec::new();
    for round in 1..=21 {
        let mut next = (*current).clone();
        let moved = service(n / 2, n * ENDPOINTS + round, false);
        next.v4.services.insert(Arc::new(moved));
        let next = Arc::new(next);
        // The engine's diff, outside the timing.
        let diff = Diff::between(Some(current.clone()), &next, false);
        steps.push((current.clone(), next.clone(), diff));
        current = next;
    }
    let mut steps = steps.into_iter();
    let mut changed_elements = 0;
    // Each step's states are freed after the timing (the sync loop frees them, not the backend).
    let mut done = Vec::new();
    let time = median(21, || {
        let Some((prev, next, diff)) = steps.next() else {
            return;
        };
        let changed: std::collections::BTreeSet<&ServicePortName> =
            diff.v4.changed.iter().collect();
        let (came_ips, gone_ips) = plan::update_address_claims(&mut claims, &prev, &next, &changed);
        let change =
            plan::changed_virtual_servers(&prev, &next, &changed, &applied, &contested, "rr", &[])
                .expect("no contested keys");
        let (removed, added) = change.served(0, &applied, &prev.v4, &next.v4);
        let changes = filter
            .update(&removed, &added, &gone_ips, &came_ips)
            .expect("elements only");
        changed_elements = changes.len();
        change.apply_to(&mut applied);
        done.push((prev, next, diff));
    });
    drop(done);
    println!(
        "{n:>6} services: ipvs one endpoint change, in-memory part of the partial sync {time:?} ({changed_elements} element changes)"
    );
}
