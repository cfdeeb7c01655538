//! `svcplane bench`: every series (each flavour of each mode the binary implements, e.g.
//! nftables, iptables, iptables-linear, ipvs, ebpf) × every number of Services, on one
//! virtual cluster: per run the connect + request + close latency through a ClusterIP
//! and straight to the pod, requests per second, the first full sync, one-change latency
//! and the proxy's RSS ([`super::datapath::Rig`] measures; this module only iterates and
//! reports). A mode that lands later joins through [`ProxyMode::ALL`] and its flavours.

use std::sync::atomic::Ordering;

use anyhow::{Context, Result, anyhow, bail};
use svcplane_dataplane::{Flavour, ProxyMode};

use super::datapath::{Rig, RunSpec, check_sizes};
use super::report::{self, Record, Setup, Skipped};
use crate::cli::BenchRunArgs;

const MAX_CHANGES: u32 = 1000;

pub fn run(args: BenchRunArgs) -> Result<()> {
    check_sizes(&args.services, args.endpoints, args.requests)?;
    if args.changes > MAX_CHANGES {
        bail!("--changes {}: must be 0..={MAX_CHANGES}", args.changes);
    }
    let chosen = choose(&args.modes)?;
    if !svcplane_testkit::is_root() {
        bail!("`svcplane bench` needs root (network namespaces and the proxies' rules)");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: cannot create it", args.out.display()))?;
    let setup = Setup {
        requests: args.requests,
        endpoints: args.endpoints,
        changes: args.changes,
    };
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    let mut flavours = Vec::new();
    for flavour in chosen {
        match flavour.mode.kernel_support() {
            Ok(()) => flavours.push(flavour),
            Err(why) => {
                println!(
                    "== {}: skipped: this kernel cannot run it: {why}",
                    flavour.name
                );
                skipped.push(Skipped {
                    series: flavour.name.to_owned(),
                    services: None,
                    reason: format!("this kernel cannot run it: {why}"),
                });
            }
        }
    }
    report::write_all(&args.out, &setup, &records, &skipped)?;
    let names: Vec<&str> = flavours.iter().map(|f| f.name).collect();
    println!(
        "== svcplane bench: {} × {:?} Services, {} new connections per path, {} one-change rounds; \
         results in {}",
        names.join(", "),
        args.services,
        args.requests,
        args.changes,
        args.out.display()
    );

    // Registered before any namespace exists; checked between steps and requests.
    let stop = crate::lab::watch_signals()?;
    let rig = Rig::new(&stop, 1).map_err(|e| {
        if stop.load(Ordering::SeqCst) {
            anyhow!("interrupted")
        } else {
            e
        }
    })?;
    let mut failed = 0;
    for flavour in &flavours {
        let proxy_args: Vec<String> = flavour.proxy_args.iter().map(|a| a.to_string()).collect();
        for &services in &args.services {
            let spec = RunSpec {
                mode: flavour.mode.as_str(),
                proxy_args: &proxy_args,
                cgroup: flavour.cgroup,
                services,
                endpoints: args.endpoints,
                target_endpoints: 1,
                requests: args.requests,
                first_sync_wait: args.first_sync_wait,
                rps: true,
                changes: args.changes,
            };
            match rig.run(&spec, &stop) {
                Ok(run) => {
                    let record = Record::new(flavour.name, spec.mode, &proxy_args, &run);
                    println!("{}", summary(&record));
                    records.push(record);
                }
                Err(_) if stop.load(Ordering::SeqCst) => {
                    report::write_all(&args.out, &setup, &records, &skipped)?;
                    bail!("interrupted; the runs so far are in {}", args.out.display());
                }
                Err(e) => {
                    // One failed run never stops the others; the exit status says so.
                    failed += 1;
                    let reason = format!("{e:#}");
                    eprintln!("error: {} at {services} Services: {reason}", flavour.name);
                    skipped.push(Skipped {
                        series: flavour.name.to_owned(),
                        services: Some(services),
                        reason,
                    });
                }
            }
            report::write_all(&args.out, &setup, &records, &skipped)?;
        }
    }
    drop(rig);
    println!("\n{}", report::table(&records));
    for s in &skipped {
        match s.services {
            None => println!("{}: skipped ({})", s.series, s.reason),
            Some(n) => println!("{} at {n} Services: failed ({})", s.series, s.reason),
        }
    }
    println!(
        "== written: {}, {}, {}",
        args.out.join("bench.csv").display(),
        args.out.join("bench.json").display(),
        args.out.join("bench.svg").display()
    );
    if failed > 0 {
        bail!("{failed} run(s) failed (listed above and in bench.json)");
    }
    Ok(())
}

/// Every flavour of every mode, or those named (by flavour name; a mode's name is its
/// default flavour's), in that order.
fn choose(names: &[String]) -> Result<Vec<Flavour>> {
    let all: Vec<Flavour> = ProxyMode::ALL
        .iter()
        .flat_map(|m| m.flavours().iter().copied())
        .collect();
    if names.is_empty() {
        return Ok(all);
    }
    let mut chosen: Vec<Flavour> = Vec::new();
    for name in names {
        let Some(f) = all.iter().find(|f| f.name == name) else {
            let known: Vec<&str> = all.iter().map(|f| f.name).collect();
            bail!(
                "--modes {name}: no such series (known: {})",
                known.join(", ")
            );
        };
        if !chosen.contains(f) {
            chosen.push(*f);
        }
    }
    Ok(chosen)
}

/// The line printed after each run.
fn summary(r: &Record) -> String {
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    format!(
        "{} {} svc: ClusterIP p50 {:.0} µs p99 {:.0} µs | pod IP p50 {:.0} µs p99 {:.0} µs | \
         ratio p50 {:.2} p99 {:.2} | ÷ no rules p50 {:.2} | {} req/s via ClusterIP, {} to the pod | full sync {} s | \
         one change {} ms (sync {} ms) | RSS {} MiB",
        r.series,
        r.services,
        r.via_p50_us,
        r.via_p99_us,
        r.direct_p50_us,
        r.direct_p99_us,
        r.ratio_p50(),
        r.ratio_p99(),
        r.ratio_reference_p50(),
        opt(r.rps_via, 0),
        opt(r.rps_direct, 0),
        opt(r.full_sync_s, 3),
        opt(r.change_p50_ms, 0),
        opt(r.change_sync_p50_ms, 1),
        opt(r.rss_mib, 1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_by_default_and_the_named_ones_in_order() {
        let names = |v: Vec<Flavour>| v.iter().map(|f| f.name).collect::<Vec<_>>();
        let all = names(choose(&[]).unwrap());
        for name in ["nftables", "iptables", "iptables-linear", "ipvs", "ebpf"] {
            assert!(all.contains(&name), "{all:?}");
        }
        let some = choose(&["iptables-linear".into(), "nftables".into()]).unwrap();
        assert_eq!(names(some), ["iptables-linear", "nftables"]);
        let err = choose(&["userspace".into()]).unwrap_err().to_string();
        assert!(
            err.contains("--modes userspace") && err.contains("iptables-linear"),
            "{err}"
        );
    }
}
