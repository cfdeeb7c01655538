//! `svcplane bench`'s results: one [`Record`] per (series, number of Services), written as
//! a terminal table, CSV, JSON and an SVG plot. The columns are listed once, in
//! [`Record::fields`]; every format is made from that list.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::datapath::RunResult;

/// One run's numbers.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub series: String,
    pub mode: String,
    pub proxy_args: String,
    pub services: u32,
    pub via_p50_us: f64,
    pub via_p99_us: f64,
    pub direct_p50_us: f64,
    pub direct_p99_us: f64,
    pub reference_p50_us: f64,
    pub reference_p99_us: f64,
    /// Straight to the pod over all its ports in turn (the sockets the ClusterIP reaches);
    /// measured when the target has more than one endpoint.
    pub spread_p50_us: Option<f64>,
    pub spread_p99_us: Option<f64>,
    pub rps_via: Option<f64>,
    pub rps_direct: Option<f64>,
    pub full_sync_s: Option<f64>,
    /// One change: file written → in the kernel (includes the manifests watcher's 5 ms
    /// pause after the write), median and max over the rounds.
    pub change_p50_ms: Option<f64>,
    pub change_max_ms: Option<f64>,
    /// The change's sync alone, median.
    pub change_sync_p50_ms: Option<f64>,
    pub rss_mib: Option<f64>,
    pub peak_rss_mib: Option<f64>,
}

/// A series the bench did not measure, and why.
#[derive(Debug, Clone)]
pub(super) struct Skipped {
    pub series: String,
    /// `None`: the whole series.
    pub services: Option<u32>,
    pub reason: String,
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

impl Record {
    pub(super) fn new(series: &str, mode: &str, proxy_args: &[String], run: &RunResult) -> Record {
        let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
        let row = &run.row;
        let ms = |v: Option<f64>| v.map(|s| s * 1e3);
        let changes = run.changes.as_ref();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        Record {
            series: series.to_owned(),
            mode: mode.to_owned(),
            proxy_args: proxy_args.join(" "),
            services: row.services,
            via_p50_us: us(row.via.p50),
            via_p99_us: us(row.via.p99),
            direct_p50_us: us(row.direct.p50),
            direct_p99_us: us(row.direct.p99),
            reference_p50_us: us(row.reference.p50),
            reference_p99_us: us(row.reference.p99),
            spread_p50_us: row.spread.map(|s| us(s.p50)),
            spread_p99_us: row.spread.map(|s| us(s.p99)),
            rps_via: run.rps.map(|r| r.0),
            rps_direct: run.rps.map(|r| r.1),
            full_sync_s: row.full_sync,
            change_p50_ms: ms(changes.and_then(|c| median(&c.e2e))),
            change_max_ms: ms(changes.and_then(|c| c.e2e.iter().copied().reduce(f64::max))),
            change_sync_p50_ms: ms(changes.and_then(|c| median(&c.syncs))),
            rss_mib: run.rss.map(|r| mib(r.0)),
            peak_rss_mib: run.rss.map(|r| mib(r.1)),
        }
    }

    /// Connect latency through the ClusterIP ÷ straight to the pod, p50.
    pub(super) fn ratio_p50(&self) -> f64 {
        self.via_p50_us / self.direct_p50_us
    }

    pub(super) fn ratio_p99(&self) -> f64 {
        self.via_p99_us / self.direct_p99_us
    }

    /// Through the ClusterIP ÷ pod to pod on a node without rules, p50.
    pub(super) fn ratio_reference_p50(&self) -> f64 {
        self.via_p50_us / self.reference_p50_us
    }

    /// Through the ClusterIP ÷ straight to the pod over all its ports, p50.
    pub(super) fn ratio_spread_p50(&self) -> Option<f64> {
        self.spread_p50_us.map(|s| self.via_p50_us / s)
    }

    /// Every column, in order: the CSV header and the JSON keys.
    pub(super) fn fields(&self) -> Vec<(&'static str, Value)> {
        let round = |v: f64, digits: i32| {
            let f = 10f64.powi(digits);
            json!((v * f).round() / f)
        };
        let opt = |v: Option<f64>, digits: i32| v.map_or(Value::Null, |v| round(v, digits));
        vec![
            ("series", json!(self.series)),
            ("mode", json!(self.mode)),
            ("proxy_args", json!(self.proxy_args)),
            ("services", json!(self.services)),
            ("via_p50_us", round(self.via_p50_us, 1)),
            ("via_p99_us", round(self.via_p99_us, 1)),
            ("direct_p50_us", round(self.direct_p50_us, 1)),
            ("direct_p99_us", round(self.direct_p99_us, 1)),
            ("ratio_p50", round(self.ratio_p50(), 3)),
            ("ratio_p99", round(self.ratio_p99(), 3)),
            ("reference_p50_us", round(self.reference_p50_us, 1)),
            ("ratio_reference_p50", round(self.ratio_reference_p50(), 3)),
            ("reference_p99_us", round(self.reference_p99_us, 1)),
            ("spread_p50_us", opt(self.spread_p50_us, 1)),
            ("ratio_spread_p50", opt(self.ratio_spread_p50(), 3)),
            ("spread_p99_us", opt(self.spread_p99_us, 1)),
            ("rps_via", opt(self.rps_via, 0)),
            ("rps_direct", opt(self.rps_direct, 0)),
            ("full_sync_s", opt(self.full_sync_s, 4)),
            ("change_p50_ms", opt(self.change_p50_ms, 2)),
            ("change_max_ms", opt(self.change_max_ms, 2)),
            ("change_sync_p50_ms", opt(self.change_sync_p50_ms, 2)),
            ("rss_mib", opt(self.rss_mib, 1)),
            ("peak_rss_mib", opt(self.peak_rss_mib, 1)),
        ]
    }
}

/// What the run was, for the JSON file.
pub(super) struct Setup {
    pub requests: u32,
    pub endpoints: u32,
    pub changes: u32,
}

/// Write bench.csv, bench.json and bench.svg into `dir` (replacing them: called after each
/// run, so an interrupted bench keeps what it measured).
pub(super) fn write_all(
    dir: &Path,
    setup: &Setup,
    records: &[Record],
    skipped: &[Skipped],
) -> Result<()> {
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))
    };
    write("bench.csv", csv(records))?;
    write("bench.json", json(setup, records, skipped))?;
    write("bench.svg", svg(records))
}

pub(super) fn csv(records: &[Record]) -> String {
    let mut out = String::new();
    let Some(first) = records.first() else {
        return out;
    };
    let header: Vec<&str> = first.fields().iter().map(|(k, _)| *k).collect();
    out += &header.join(",");
    out.push('\n');
    for r in records {
        let cells: Vec<String> = r
            .fields()
            .into_iter()
            .map(|(_, v)| match v {
                Value::Null => String::new(),
                Value::String(s) if s.contains([',', '"', '\n']) => {
                    format!("\"{}\"", s.replace('"', "\"\""))
                }
                Value::String(s) => s,
                other => other.to_string(),
            })
            .collect();
        out += &cells.join(",");
        out.push('\n');
    }
    out
}

pub(super) fn json(setup: &Setup, records: &[Record], skipped: &[Skipped]) -> String {
    let results: Vec<Value> = records
        .iter()
        .map(|r| Value::Object(r.fields().into_iter().map(|(k, v)| (k.into(), v)).collect()))
        .collect();
    let skipped: Vec<Value> = skipped
        .iter()
        .map(|s| json!({"series": s.series, "services": s.services, "reason": s.reason}))
        .collect();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let doc = json!({
        "svcplane": env!("CARGO_PKG_VERSION"),
        "kernel": kernel,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "requests_per_path": setup.requests,
        "endpoints_per_service": setup.endpoints,
        "change_rounds": setup.changes,
        "results": results,
        "skipped": skipped,
    });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}

/// The terminal table.
pub(super) fn table(records: &[Record]) -> String {
    let header = [
        "series",
        "services",
        "ClusterIP p50/p99 µs",
        "pod IP p50/p99 µs",
        "ratio p50/p99",
        "÷ no rules p50",
        "req/s ClusterIP/pod",
        "full sync s",
        "1 change ms (sync)",
        "RSS MiB",
    ];
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    let rows: Vec<[String; 10]> = records
        .iter()
        .map(|r| {
            [
                r.series.clone(),
                r.services.to_string(),
                format!("{:.0} / {:.0}", r.via_p50_us, r.via_p99_us),
                format!("{:.0} / {:.0}", r.direct_p50_us, r.direct_p99_us),
                format!("{:.2} / {:.2}", r.ratio_p50(), r.ratio_p99()),
                format!("{:.2}", r.ratio_reference_p50()),
                format!("{} / {}", opt(r.rps_via, 0), opt(r.rps_direct, 0)),
                opt(r.full_sync_s, 2),
                format!(
                    "{} ({})",
                    opt(r.change_p50_ms, 0),
                    opt(r.change_sync_p50_ms, 1)
                ),
                opt(r.rss_mib, 0),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| {
                let pad = " ".repeat(w - c.chars().count());
                // Names left, numbers right.
                if i == 0 {
                    format!("{c}{pad}")
                } else {
                    format!("{pad}{c}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(&mut out, &header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
    line(&mut out, &rule);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&mut out, &cells);
    }
    out
}

/// The series in order of first appearance.
fn series(records: &[Record]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for r in records {
        if !names.contains(&r.series.as_str()) {
            names.push(&r.series);
        }
    }
    names
}

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Panels side by side, Services on a log x axis, one line per series: connect latency
/// through the ClusterIP ÷ straight to the pod IP (p50), the same ÷ pod to pod on a node
/// without rules (p50: in a linear dispatch the pod IP path walks every rule too, so only
/// this ratio shows the rules' cost), and the full sync time (log y).
pub(super) fn svg(records: &[Record]) -> String {
    const W: f64 = 460.0;
    const H: f64 = 320.0;
    let names = series(records);
    let legend_h = 20.0 * names.len() as f64 + 10.0;
    type Value = fn(&Record) -> Option<f64>;
    let panels: [(&str, Value, bool); 3] = [
        (
            "connect latency: ClusterIP ÷ pod IP (p50)",
            |r| Some(r.ratio_p50()),
            false,
        ),
        (
            "ClusterIP ÷ pod IP on a node without rules (p50)",
            |r| Some(r.ratio_reference_p50()),
            false,
        ),
        ("full sync (s, log scale)", |r| r.full_sync_s, true),
    ];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        W * panels.len() as f64,
        H + legend_h
    );
    for (i, (title, value, log_y)) in panels.iter().enumerate() {
        let points: Vec<(&str, u32, Option<f64>)> = records
            .iter()
            .map(|r| (r.series.as_str(), r.services, value(r)))
            .collect();
        panel(&mut out, W * i as f64, title, &names, &points, *log_y);
    }
    for (i, name) in names.iter().enumerate() {
        let y = H + 15.0 + 20.0 * i as f64;
        let colour = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            out,
            "<line x1=\"70\" y1=\"{y}\" x2=\"100\" y2=\"{y}\" stroke=\"{colour}\" stroke-width=\"2\"/>\
             <text x=\"106\" y=\"{}\">{}</text>",
            y + 4.0,
            escape(name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// One plot at x offset `left`: points (series, services, value).
fn panel(
    out: &mut String,
    left: f64,
    title: &str,
    names: &[&str],
    points: &[(&str, u32, Option<f64>)],
    log_y: bool,
) {
    const W: f64 = 460.0;
    const H: f64 = 320.0;
    let (x0, x1, y0, y1) = (left + 60.0, left + W - 20.0, H - 40.0, 40.0);
    let values: Vec<f64> = points
        .iter()
        .filter_map(|p| p.2)
        .filter(|v| v.is_finite() && (!log_y || *v > 0.0))
        .collect();
    let xs: Vec<f64> = points.iter().map(|p| f64::from(p.1).log10()).collect();
    let (xmin, xmax) = bounds(&xs, 0.5);
    let (ymin, ymax) = if log_y {
        let logs: Vec<f64> = values.iter().map(|v| v.log10()).collect();
        let (lo, hi) = bounds(&logs, 1.0);
        (lo.floor(), hi.ceil())
    } else {
        let (lo, hi) = bounds(&values, 0.1);
        (lo.min(1.0) - 0.05, hi.max(1.0) + 0.05)
    };
    let sx = |x: f64| x0 + (x - xmin) / (xmax - xmin) * (x1 - x0);
    let sy = |v: f64| {
        let v = if log_y { v.log10() } else { v };
        y0 - (v - ymin) / (ymax - ymin) * (y0 - y1)
    };
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>\n\
         <line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"black\"/>\
         <line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{y1}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">Services (log scale)</text>",
        (x0 + x1) / 2.0,
        escape(title),
        (x0 + x1) / 2.0,
        H - 8.0,
    );
    // x ticks at the measured counts.
    let mut counts: Vec<u32> = points.iter().map(|p| p.1).collect();
    counts.sort_unstable();
    counts.dedup();
    for n in counts {
        let x = sx(f64::from(n).log10());
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{y0}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"black\"/>\
             <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{n}</text>",
            y0 + 5.0,
            y0 + 18.0
        );
    }
    // y ticks: decades on a log axis, five steps on a linear one.
    let ticks: Vec<f64> = if log_y {
        (ymin as i32..=ymax as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=5)
            .map(|i| ymin + (ymax - ymin) * f64::from(i) / 5.0)
            .collect()
    };
    for t in ticks {
        let y = sy(t);
        let label = if log_y {
            format!("{t}")
        } else {
            format!("{t:.2}")
        };
        let _ = writeln!(
            out,
            "<line x1=\"{}\" y1=\"{y:.1}\" x2=\"{x1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            x0,
            x0 - 5.0,
            y + 4.0
        );
    }
    for (i, name) in names.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut line: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.0 == *name)
            .filter_map(|p| Some((f64::from(p.1), p.2?)))
            .filter(|(_, v)| v.is_finite() && (!log_y || *v > 0.0))
            .map(|(n, v)| (sx(n.log10()), sy(v)))
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        let coords: Vec<String> = line.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            out,
            "<polyline data-series=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            escape(name),
            coords.join(" ")
        );
        for (x, y) in &line {
            let _ = writeln!(
                out,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{colour}\"/>"
            );
        }
    }
}

/// min and max of `v`, widened by `pad` when they are equal (or `v` is empty).
fn bounds(v: &[f64], pad: f64) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        (lo - pad, hi + pad)
    } else {
        (lo, hi)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(series: &str, services: u32, via: f64, sync: Option<f64>) -> Record {
        Record {
            series: series.into(),
            mode: series.split('-').next().unwrap_or(series).into(),
            proxy_args: String::new(),
            services,
            via_p50_us: via,
            via_p99_us: 2.0 * via,
            direct_p50_us: 50.0,
            direct_p99_us: 100.0,
            reference_p50_us: 40.0,
            reference_p99_us: 90.0,
            spread_p50_us: (services > 1).then_some(60.0),
            spread_p99_us: (services > 1).then_some(120.0),
            rps_via: Some(9000.0),
            rps_direct: None,
            full_sync_s: sync,
            change_p50_ms: Some(150.0),
            change_max_ms: Some(170.0),
            change_sync_p50_ms: Some(3.25),
            rss_mib: Some(20.0),
            peak_rss_mib: Some(30.0),
        }
    }

    #[test]
    fn csv_has_a_header_and_a_row_per_record_with_empty_missing_values() {
        let records = [
            record("nftables", 1, 51.0, Some(0.01)),
            record("iptables-linear", 1000, 100.0, None),
        ];
        let text = csv(&records);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let header: Vec<&str> = lines[0].split(',').collect();
        assert_eq!(header[..4], ["series", "mode", "proxy_args", "services"]);
        let row: Vec<&str> = lines[2].split(',').collect();
        assert_eq!(row.len(), header.len());
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        assert_eq!(row[col("series")], "iptables-linear");
        assert_eq!(row[col("ratio_p50")], "2.0");
        assert_eq!(row[col("full_sync_s")], "");
        assert_eq!(row[col("rps_direct")], "");
        assert_eq!(row[col("ratio_spread_p50")], "1.667");
        let first: Vec<&str> = lines[1].split(',').collect();
        assert_eq!(first[col("spread_p50_us")], "");
    }

    #[test]
    fn json_parses_and_lists_results_and_skipped_series() {
        let setup = Setup {
            requests: 10,
            endpoints: 1,
            changes: 2,
        };
        let text = json(
            &setup,
            &[record("nftables", 1, 51.0, Some(0.01))],
            &[Skipped {
                series: "ipvs".into(),
                services: None,
                reason: "no IPVS".into(),
            }],
        );
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["results"][0]["series"], "nftables");
        assert_eq!(doc["results"][0]["ratio_p50"], 1.02);
        assert_eq!(doc["skipped"][0]["series"], "ipvs");
        assert_eq!(doc["requests_per_path"], 10);
    }

    #[test]
    fn svg_draws_a_line_per_series_in_each_panel() {
        let records = [
            record("nftables", 1, 51.0, Some(0.01)),
            record("nftables", 1000, 52.0, Some(0.1)),
            record("iptables-linear", 1, 51.0, Some(0.02)),
            record("iptables-linear", 1000, 90.0, None),
        ];
        let text = svg(&records);
        assert!(text.starts_with("<svg ") && text.trim_end().ends_with("</svg>"));
        assert_eq!(text.matches("<polyline").count(), 6);
        assert_eq!(
            text.matches("data-series=\"iptables-linear\"").count(),
            3,
            "{text}"
        );
        // The missing sync time leaves one point out of that line.
        assert_eq!(text.matches("<circle").count(), 11);
        assert!(!text.contains("NaN") && !text.contains("inf"), "{text}");
    }

    #[test]
    fn table_has_a_row_per_record() {
        let text = table(&[
            record("nftables", 1, 51.0, Some(0.01)),
            record("ebpf", 30000, 50.0, Some(0.2)),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[3].starts_with("ebpf "), "{text}");
        assert!(lines[3].contains("30000"), "{text}");
    }
}
