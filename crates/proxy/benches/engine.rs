//! What one EndpointSlice change costs the engine at 10k and 30k Services × 10 endpoints:
//! `Engine::desired` plus the diff the sync loop hands the backend, as the sync loop runs
//! them. Timed in the thread's CPU time, so a loaded machine does not distort it.
//!
//! Two ways, same changes: as the sync loop runs (the backend applied the last state, so
//! the engine patches the state before it: O(changed)), and with every state kept alive (as
//! after failed syncs), which forces a copy of the maps and a comparison of every service
//! (`Diff::between`): the O(services) work every change cost before the engine patched.
//!
//! `cargo bench -p svcplane-proxy --bench engine [-- N...]` (default 10000 30000).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use svcplane_model::{Change, Format, parse_manifest};
use svcplane_proxy::{DesiredState, Diff, Engine, EngineConfig};

const ENDPOINTS: u32 = 10;
const ROUNDS: u32 = 200;

/// This thread's CPU time so far, in seconds (`CLOCK_THREAD_CPUTIME_ID`: exact, unlike
/// `/proc/thread-self/schedstat`, which moves only at scheduler ticks).
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid, exclusively borrowed timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn slice_yaml(out: &mut String, service: &str, first: u32) {
    let _ = write!(
        out,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {service}-1, namespace: bench, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for e in first..first + ENDPOINTS {
        let ip = Ipv4Addr::from(0x0a80_0000 + e);
        let _ = writeln!(
            out,
            "  - {{addresses: [\"{ip}\"], nodeName: node-{}, conditions: {{ready: true}}}}",
            e % 50
        );
    }
}

fn changes(yaml: &str) -> Vec<Change> {
    let parsed = parse_manifest(yaml, Format::Yaml).expect("the bench's YAML parses");
    assert!(parsed.invalid.is_empty(), "{:?}", parsed.invalid);
    parsed.objects.into_iter().map(Change::Apply).collect()
}

fn percentiles(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).saturating_sub(1)] * 1e3;
    format!("p50 {:.3} ms, p99 {:.3} ms", rank(0.5), rank(0.99))
}

fn main() {
    let sizes: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10_000, 30_000]
    } else {
        sizes
    };
    for n in sizes {
        let mut yaml = String::new();
        for i in 0..n {
            let ip = Ipv4Addr::from(0x0a60_0001 + i);
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
                 spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]}}\n"
            );
            slice_yaml(&mut yaml, &format!("svc-{i}"), i * ENDPOINTS);
        }
        let changed: Vec<Vec<Change>> = (1..=ROUNDS)
            .map(|r| {
                let mut y = String::new();
                slice_yaml(&mut y, "svc-0", 0x0070_0000 + r);
                changes(&y)
            })
            .collect();
        for keep_all in [false, true] {
            let mut engine = Engine::new(EngineConfig {
                node_name: "node-0".into(),
                ..EngineConfig::default()
            });
            for c in changes(&yaml) {
                engine.apply(c);
            }
            let mut applied: Option<Arc<DesiredState>> = Some(engine.desired());
            let mut kept = Vec::new();
            let mut times = Vec::new();
            for round in &changed {
                for c in round.clone() {
                    engine.apply(c);
                }
                let t0 = thread_cpu();
                let next = engine.desired();
                let diff = if keep_all {
                    Diff::between(applied.clone(), &next, false)
                } else {
                    engine.diff(applied.clone(), &next, false)
                };
                assert_eq!(diff.v4.changed.len(), 1);
                if keep_all {
                    kept.extend(applied.take());
                }
                applied = Some(next);
                drop(diff);
                times.push(thread_cpu() - t0);
            }
            println!(
                "{n:>6} services × {ENDPOINTS} endpoints, one slice changed, {ROUNDS} rounds: {} ({})",
                percentiles(times),
                if keep_all {
                    "every state kept: a copy of the maps + Diff::between, the work per change before"
                } else {
                    "as the sync loop runs: the spare state patched, the engine's diff"
                }
            );
        }
    }
}
