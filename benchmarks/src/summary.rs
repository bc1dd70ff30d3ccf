//! The Envoy suite's results: medians over rounds with min..max spread, C/B ratios and the share
//! of the sidecar tax (B - A) that C removes, and what meshlane's BPF programs cost in C; as a
//! table, JSON, Markdown and SVG plots.

use std::{fmt::Write as _, path::Path};

use anyhow::Result;

use crate::{
    progstats::KINDS,
    provenance::Provenance,
    report::Spread,
    results::suite::{RoundProgCost, Row, SCENARIOS},
    workload::{self, Kind, Workload},
    Args,
};

type Metric = (&'static str, fn(&Row) -> f64);

/// The per-round metrics summarised.
const METRICS: [Metric; 6] = [
    ("p50_us", |r| r.measured.latency.p50_us),
    ("p90_us", |r| r.measured.latency.p90_us),
    ("p99_us", |r| r.measured.latency.p99_us),
    ("p999_us", |r| r.measured.latency.p999_us),
    ("throughput", |r| r.measured.throughput),
    ("cpu_us_per_req", |r| r.cpu_us_per_req),
];

/// One workload's summary: per scenario and metric, the spread over the accepted rounds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadSummary {
    pub workload: Workload,
    /// `[scenario][metric]`, scenarios A, B, C; metrics as [`METRICS`].
    pub spreads: Vec<Vec<(String, Spread)>>,
    /// Rounds that count, per scenario (C rounds whose counters did not move are left out).
    pub rounds: Vec<usize>,
    /// Per BPF program kind ([`KINDS`]), its cost over the accepted C rounds.
    pub bpf: Vec<ProgSummary>,
}

/// What one of meshlane's BPF programs cost in one workload, over the accepted C rounds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgSummary {
    pub kind: &'static str,
    /// Accepted C rounds with this program's counters.
    pub rounds: usize,
    /// Time in the program per run (rounds where it ran).
    pub ns_per_run: Spread,
    /// Runs per request sent, warm-up included (bulk: per write; connect: per cycle).
    pub runs_per_req: Spread,
}

impl WorkloadSummary {
    fn get(&self, scenario: usize, metric: usize) -> Spread {
        self.spreads[scenario][metric].1
    }
    fn ratio(&self, metric: usize) -> f64 {
        self.get(2, metric).median / self.get(1, metric).median
    }
    /// (B - C) / (B - A): the share of the sidecar tax that meshlane removes.
    fn tax_removed(&self, metric: usize) -> f64 {
        let (a, b, c) = (
            self.get(0, metric).median,
            self.get(1, metric).median,
            self.get(2, metric).median,
        );
        // Meaningless when the sidecars add nothing (connect() to a local sidecar is faster
        // than a handshake across the veth).
        if b - a > 0.05 * b {
            (b - c) / (b - a)
        } else {
            f64::NAN
        }
    }
}

pub struct Report {
    pub rounds: usize,
    pub scale: f64,
    pub smoke: bool,
    /// C's daemon: `--mode` and `--sidecar-hop`.
    pub mode: String,
    pub sidecar_hop: String,
    /// Istio's mTLS between the sidecars in B and C.
    pub mtls: String,
    /// Both sidecars' `--concurrency`.
    pub envoy_concurrency: u32,
    pub rows: Vec<Row>,
    pub summaries: Vec<WorkloadSummary>,
    /// Per C round, the daemon's programs from ready to stop.
    pub prog_rounds: Vec<RoundProgCost>,
    /// The machine, builds and command of this run.
    pub provenance: Provenance,
    /// Latency CDFs of [`CDF_WORKLOADS`] per scenario (cdf.svg; kept in results.json to re-plot).
    pub cdfs: Vec<Cdf>,
}

/// The workloads whose latency distribution is plotted as a CDF.
pub const CDF_WORKLOADS: [&str; 2] = ["tcp 64B x1", "http 1KiB x16"];

/// One scenario's latency distribution in one workload, every accepted round's samples pooled.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cdf {
    pub workload: String,
    pub scenario: &'static str,
    pub samples: usize,
    /// (quantile, latency in us), quantiles from 0 to 0.999.
    pub points: Vec<(f64, f64)>,
}

/// The quantiles a CDF keeps: every half percent up to 99%, then 99.5% and 99.9% (beyond that a
/// few samples decide the curve).
fn cdf_quantiles() -> Vec<f64> {
    let mut q: Vec<f64> = (0..=198).map(|i| f64::from(i) / 200.0).collect();
    q.extend([0.995, 0.999]);
    q
}

/// The value at quantile `q` of sorted `v` (the nearest rank, as [`crate::measure::Percentiles`]).
fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

/// The CDF of `samples_ns` (sorted or not), in us.
pub fn cdf_of(workload: &str, scenario: &'static str, mut samples_ns: Vec<u64>) -> Cdf {
    samples_ns.sort_unstable();
    Cdf {
        workload: workload.to_string(),
        scenario,
        samples: samples_ns.len(),
        points: cdf_quantiles()
            .into_iter()
            .filter_map(|q| Some((q, quantile(&samples_ns, q)? as f64 / 1000.0)))
            .collect(),
    }
}

/// A tick step of 1, 2 or 5 times a power of ten giving about four ticks up to `max`, and the
/// axis end (the first tick at or above `max`).
fn axis(max: f64) -> (f64, f64) {
    if !max.is_finite() || max <= 0.0 {
        return (1.0, 1.0);
    }
    let raw = max / 4.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    (step, (max / step).ceil() * step)
}

/// A tick label without float noise.
fn tick(v: f64) -> String {
    let r = (v * 1000.0).round() / 1000.0;
    if r.fract() == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r}")
    }
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    Spread {
        median,
        min: v.first().copied().unwrap_or(f64::NAN),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

fn fmt(s: Spread) -> String {
    let p = |x: f64| {
        if x >= 1000.0 {
            format!("{x:.0}")
        } else {
            format!("{x:.1}")
        }
    };
    format!("{} [{}..{}]", p(s.median), p(s.min), p(s.max))
}

impl Report {
    pub fn new(
        args: &Args,
        rounds: usize,
        scale: f64,
        matrix: &[Workload],
        rows: Vec<Row>,
        prog_rounds: Vec<RoundProgCost>,
        provenance: Provenance,
    ) -> Report {
        let summaries = matrix
            .iter()
            .map(|w| {
                let of = |sc: &str| -> Vec<&Row> {
                    rows.iter()
                        .filter(|r| r.workload == w.name && r.scenario == sc && r.accelerated)
                        .collect()
                };
                WorkloadSummary {
                    workload: w.clone(),
                    spreads: SCENARIOS
                        .iter()
                        .map(|sc| {
                            METRICS
                                .iter()
                                .map(|(name, f)| {
                                    (
                                        name.to_string(),
                                        spread(of(sc).into_iter().map(f).collect()),
                                    )
                                })
                                .collect()
                        })
                        .collect(),
                    rounds: SCENARIOS.iter().map(|sc| of(sc).len()).collect(),
                    bpf: prog_summaries(w, &of("C")),
                }
            })
            .collect();
        let cdfs = CDF_WORKLOADS
            .iter()
            .flat_map(|name| {
                let rows = &rows;
                SCENARIOS.iter().map(move |sc| {
                    let pooled: Vec<u64> = rows
                        .iter()
                        .filter(|r| r.workload == *name && r.scenario == *sc && r.accelerated)
                        .flat_map(|r| r.measured.samples_ns.iter().copied())
                        .collect();
                    cdf_of(name, sc, pooled)
                })
            })
            .collect();
        Report {
            cdfs,
            rounds,
            scale,
            smoke: args.smoke,
            mode: match rows.iter().find_map(|r| r.mode.as_deref()) {
                Some(decided) if decided != args.mode => format!("{} -> {decided}", args.mode),
                _ => args.mode.clone(),
            },
            sidecar_hop: args.sidecar_hop.clone(),
            mtls: args.mtls.clone(),
            envoy_concurrency: args.concurrency,
            rows,
            summaries,
            prog_rounds,
            provenance,
        }
    }

    /// The Markdown table printed on stdout and written to results.md.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let rejected = self.rows.iter().filter(|r| !r.accelerated).count();
        let _ = writeln!(
            t,
            "Envoy mini-mesh: A = no mesh, B = Envoy sidecars (iptables capture; --concurrency {}; mTLS between them: {}), C = B + meshlane daemon (--mode {}, --sidecar-hop {})\n\
             {} interleaved rounds per scenario (scale {}){}; median over rounds [min..max]\n\
             latency in us; C/B below 1 means meshlane is faster; tax removed = (B - C) / (B - A)\n\
             C workloads discarded because the daemon's counters did not show every direction the mode redirects carrying the workload's bytes, or showed messages left on TCP (no peer, pinned): {rejected}\n\
             EAGAIN retries of the load generators' blocking reads (plain TCP never returns one): {}\n",
            self.envoy_concurrency,
            self.mtls,
            self.mode,
            self.sidecar_hop,
            self.rounds,
            self.scale,
            if self.smoke { ", SMOKE RUN: numbers mean nothing" } else { "" },
            SCENARIOS
                .iter()
                .map(|sc| format!(
                    "{sc} {}",
                    self.rows
                        .iter()
                        .filter(|r| r.scenario == *sc)
                        .map(|r| r.measured.eagain_retries)
                        .sum::<u64>()
                ))
                .collect::<Vec<_>>()
                .join(", "),
        );
        for s in &self.summaries {
            if let Some(o) = &s.workload.open_loop {
                let _ = writeln!(
                    t,
                    "- open loop: {} sends {:.0} requests/s ({:.0}% of B's {:.0} requests/s in {}, closed loop, measured before the rounds); latency from each request's scheduled time",
                    s.workload.name,
                    o.rate,
                    o.fraction * 100.0,
                    o.rate / o.fraction,
                    o.base
                );
            }
        }
        for r in self.rows.iter().filter(|r| !r.accelerated) {
            let _ = writeln!(
                t,
                "- discarded: round {} {} {}: {}",
                r.round + 1,
                r.scenario,
                r.workload,
                r.proof_failures.join("; ")
            );
        }
        if rejected > 0 {
            t.push('\n');
        }
        let _ = writeln!(
            t,
            "| workload | A p50 | B p50 | C p50 | C/B p50 | tax removed p50 | A p99 | B p99 | C p99 | C/B p99 | tax removed p99 |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|---|");
        for s in self
            .summaries
            .iter()
            .filter(|s| s.workload.kind != Kind::Bulk)
        {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {:.2} | {} | {} | {} | {} | {:.2} | {} |",
                s.workload.name,
                fmt(s.get(0, 0)),
                fmt(s.get(1, 0)),
                fmt(s.get(2, 0)),
                s.ratio(0),
                pct(s.tax_removed(0)),
                fmt(s.get(0, 2)),
                fmt(s.get(1, 2)),
                fmt(s.get(2, 2)),
                s.ratio(2),
                pct(s.tax_removed(2)),
            );
        }
        let _ = writeln!(
            t,
            "\nThroughput (requests/s; bulk: MiB/s echoed) and CPU per request (us, user+system of \
             client, sidecars, server apps and, in C, the daemon; from /proc, 10 ms ticks):\n"
        );
        let _ = writeln!(
            t,
            "| workload | A thr | B thr | C thr | C/B thr | B cpu/req | C cpu/req | C/B cpu |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|");
        for s in &self.summaries {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {:.2} | {} | {} | {:.2} |",
                s.workload.name,
                fmt(s.get(0, 4)),
                fmt(s.get(1, 4)),
                fmt(s.get(2, 4)),
                s.ratio(4),
                fmt(s.get(1, 5)),
                fmt(s.get(2, 5)),
                s.ratio(5),
            );
        }
        t.push_str(&self.bpf_table());
        t
    }

    /// Per workload and program: median ns per run and runs per request in C.
    fn bpf_table(&self) -> String {
        let mut t = String::from(
            "\nBPF program cost during C (kernel bpf_stats): median over rounds of ns per run \
             (runs per request, warm-up included; bulk: per write); the daemon's own programs; \
             recv is the read tracer (an fexit on tcp_bpf_recvmsg, sockhash reads only; where the kernel refuses fexit, a tracepoint on every recvmsg() of the node); \"-\" where a program is not attached:\n\n\
             | workload | sock_ops ns/run (runs/req) | sk_msg ns/run (runs/req) | connect hooks ns/run (runs/req) | recv tracer ns/run (runs/req) |\n\
             |---|---|---|---|---|\n",
        );
        for s in &self.summaries {
            let cells: Vec<String> = s
                .bpf
                .iter()
                .map(|p| match p.rounds {
                    0 => "-".to_string(),
                    _ if p.ns_per_run.median.is_finite() => format!(
                        "{:.0} ({})",
                        p.ns_per_run.median,
                        per_req(p.runs_per_req.median)
                    ),
                    _ => format!("n/a ({})", per_req(p.runs_per_req.median)),
                })
                .collect();
            let _ = writeln!(t, "| {} | {} |", s.workload.name, cells.join(" | "));
        }
        t
    }

    fn tails(&self) -> String {
        let mut t = String::from(
            "\n| workload | A p90 | B p90 | C p90 | A p99.9 | B p99.9 | C p99.9 | C/B p99.9 |\n|---|---|---|---|---|---|---|---|\n",
        );
        for s in self
            .summaries
            .iter()
            .filter(|s| s.workload.kind != Kind::Bulk)
        {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {:.2} |",
                s.workload.name,
                fmt(s.get(0, 1)),
                fmt(s.get(1, 1)),
                fmt(s.get(2, 1)),
                fmt(s.get(0, 3)),
                fmt(s.get(1, 3)),
                fmt(s.get(2, 3)),
                s.ratio(3),
            );
        }
        t
    }

    pub fn write(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out)?;
        let json = serde_json::json!({
            "rounds": self.rounds,
            "scale": self.scale,
            "smoke": self.smoke,
            "mode": self.mode,
            "sidecar_hop": self.sidecar_hop,
            "mtls": self.mtls,
            "envoy_concurrency": self.envoy_concurrency,
            "provenance": self.provenance,
            "scenarios": {"A": "no mesh", "B": "Envoy sidecars, iptables capture", "C": "B + meshlane daemon (local discovery)"},
            "summary": self.summaries.iter().map(|s| serde_json::json!({
                "workload": s.workload,
                "rounds": s.rounds,
                "A": s.spreads[0].iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                "B": s.spreads[1].iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                "C": s.spreads[2].iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                "c_over_b": {"p50": s.ratio(0), "p99": s.ratio(2), "throughput": s.ratio(4), "cpu_us_per_req": s.ratio(5)},
                "tax_removed": {"p50": s.tax_removed(0), "p99": s.tax_removed(2)},
                "c_bpf_prog": s.bpf,
            })).collect::<Vec<_>>(),
            "rows": self.rows,
            "c_rounds_bpf_prog": self.prog_rounds,
            "cdf": self.cdfs,
        });
        // NaN (an empty scenario) is not JSON: serde_json writes null.
        std::fs::write(
            out.join("results.json"),
            serde_json::to_string_pretty(&json)?,
        )?;
        let md = format!(
            "{}\n\n{}\nTail percentiles:\n{}\n![latency](latency.svg)\n\n![latency CDF](cdf.svg)\n\n![ratio per size](ratio.svg)\n",
            self.provenance.line(),
            self.table(),
            self.tails()
        );
        std::fs::write(out.join("results.md"), md)?;
        std::fs::write(out.join("latency.svg"), self.latency_svg())?;
        std::fs::write(out.join("ratio.svg"), self.ratio_svg())?;
        std::fs::write(out.join("cdf.svg"), self.cdf_svg())?;
        std::fs::write(
            out.join("latency.hlog"),
            crate::hdrlog::write(&self.rows, self.provenance.started_unix)?,
        )?;
        Ok(())
    }

    /// One panel per latency workload, each on its own linear scale from 0 (a shared log scale
    /// hid the B/C gap): bars for the median p50 and p99 over rounds of A, B and C, whiskers
    /// from the rounds' min to max.
    fn latency_svg(&self) -> String {
        let ws: Vec<&WorkloadSummary> = self
            .summaries
            .iter()
            .filter(|s| s.workload.kind != Kind::Bulk)
            .collect();
        let colors = ["#7f7f7f", "#d62728", "#2ca02c"];
        let cols = 4;
        let (pw, ph) = (250.0, 200.0);
        let (pl, pt, pb) = (48.0, 26.0, 22.0);
        let rows = ws.len().div_ceil(cols).max(1);
        // The legend takes three lines under the title; the panels start below it.
        let head = 80.0;
        let (w, h) = (pw * cols as f64 + 20.0, ph * rows as f64 + head);
        let mut s = svg_head(
            w,
            h,
            "Latency (us, linear, each panel its own scale): bar = median over rounds, whisker = min..max; left group p50, right group p99",
        );
        legend(
            &mut s,
            w,
            &["A no mesh", "B Envoy", "C Envoy + meshlane"],
            &colors,
        );
        for (i, ws) in ws.iter().enumerate() {
            let (x0, y0) = (10.0 + pw * (i % cols) as f64, head + ph * (i / cols) as f64);
            let plot_h = ph - pt - pb;
            let top = (0..3)
                .flat_map(|k| [ws.get(k, 0).max, ws.get(k, 2).max])
                .filter(|x| x.is_finite())
                .fold(0.0_f64, f64::max);
            let (step, hi) = axis(top);
            let y = |v: f64| y0 + pt + plot_h * (1.0 - v / hi);
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="12" font-weight="bold">{}</text>"#,
                x0 + pl,
                y0 + 14.0,
                ws.workload.name
            );
            let mut v = 0.0;
            while v <= hi + step / 2.0 {
                let _ = writeln!(
                    s,
                    r##"<line x1="{:.1}" x2="{:.1}" y1="{yv:.1}" y2="{yv:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{}</text>"##,
                    x0 + pl,
                    x0 + pw - 10.0,
                    x0 + pl - 3.0,
                    y(v) + 3.0,
                    tick(v),
                    yv = y(v)
                );
                v += step;
            }
            for (g, (metric, label)) in [(0, "p50"), (2, "p99")].into_iter().enumerate() {
                let gx = x0 + pl + 10.0 + 95.0 * g as f64;
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{label}</text>"#,
                    gx + 40.0,
                    y0 + ph - 6.0
                );
                for k in 0..3 {
                    let sp = ws.get(k, metric);
                    if !sp.median.is_finite() {
                        continue;
                    }
                    let x = gx + 27.0 * k as f64;
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{:.1}" width="22" height="{:.1}" fill="{}"><title>{} {} {label}: median {:.1} us [{:.1}..{:.1}]</title></rect><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
                        y(sp.median),
                        y(0.0) - y(sp.median),
                        colors[k],
                        ws.workload.name,
                        SCENARIOS[k],
                        sp.median,
                        sp.min,
                        sp.max,
                        x + 11.0,
                        x + 11.0,
                        y(sp.min),
                        y(sp.max),
                        x + 6.0,
                        x + 16.0,
                        y(sp.min),
                        y(sp.min),
                        x + 6.0,
                        x + 16.0,
                        y(sp.max),
                        y(sp.max),
                    );
                }
            }
        }
        s.push_str("</svg>\n");
        s
    }

    /// Latency CDFs of B and C for [`CDF_WORKLOADS`], every accepted round's samples pooled,
    /// linear axes, up to the largest p99.9.
    fn cdf_svg(&self) -> String {
        let colors = [("B", "#d62728"), ("C", "#2ca02c")];
        let (pw, ph) = (420.0, 300.0);
        let (pl, pt, pb) = (50.0, 30.0, 40.0);
        let w = pw * CDF_WORKLOADS.len() as f64 + 20.0;
        let h = ph + 50.0;
        let mut s = svg_head(
            w,
            h,
            "Latency CDF, B vs C, all accepted rounds pooled (us, linear; x axis up to the larger p99)",
        );
        legend(
            &mut s,
            w,
            &["B Envoy", "C Envoy + meshlane"],
            &["#d62728", "#2ca02c"],
        );
        for (i, name) in CDF_WORKLOADS.iter().enumerate() {
            let x0 = 10.0 + pw * i as f64;
            let y0 = 45.0;
            let curves: Vec<(&str, &str, &Cdf)> = colors
                .iter()
                .filter_map(|(sc, c)| {
                    let cdf = self
                        .cdfs
                        .iter()
                        .find(|d| d.workload == *name && d.scenario == *sc)?;
                    Some((*sc, *c, cdf))
                })
                .collect();
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="12" font-weight="bold">{name}</text>"#,
                x0 + pl,
                y0 + 14.0
            );
            // The x axis ends at the larger p99: a few slow requests (this VM's scheduler) would
            // otherwise squeeze the body of both curves into the left edge. Beyond it a curve
            // runs along the right edge up to p99.9; the tables have the tails.
            let top = curves
                .iter()
                .filter_map(|(_, _, c)| c.points.iter().find(|p| p.0 >= 0.99).map(|p| p.1))
                .fold(0.0_f64, f64::max);
            if top <= 0.0 {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" font-size="11">no samples</text>"#,
                    x0 + pl,
                    y0 + 40.0
                );
                continue;
            }
            let (step, hi) = axis(top);
            let plot_w = pw - pl - 20.0;
            let plot_h = ph - pt - pb;
            let x = |v: f64| x0 + pl + plot_w * v / hi;
            let y = |q: f64| y0 + pt + plot_h * (1.0 - q);
            let mut v = 0.0;
            while v <= hi + step / 2.0 {
                let _ = writeln!(
                    s,
                    r##"<line x1="{xv:.1}" x2="{xv:.1}" y1="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{xv:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"##,
                    y(0.0),
                    y(1.0),
                    y(0.0) + 14.0,
                    tick(v),
                    xv = x(v)
                );
                v += step;
            }
            // No label at 1: it would print over 0.99's.
            for q in [0.0, 0.25, 0.5, 0.75, 0.9, 0.99] {
                let _ = writeln!(
                    s,
                    r##"<line x1="{:.1}" x2="{:.1}" y1="{yq:.1}" y2="{yq:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{q}</text>"##,
                    x(0.0),
                    x(hi),
                    x(0.0) - 3.0,
                    y(q) + 3.0,
                    yq = y(q)
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">latency (us)</text>"#,
                x(hi / 2.0),
                y(0.0) + 28.0
            );
            for (sc, c, cdf) in curves {
                let pts: Vec<String> = cdf
                    .points
                    .iter()
                    .map(|(q, v)| format!("{:.1},{:.1}", x(v.min(hi)), y(*q)))
                    .collect();
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"><title>{sc}: {} samples</title></polyline>"#,
                    pts.join(" "),
                    cdf.samples
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }

    /// C/B of p50 and p99 per TCP ping-pong message size, with the 1.0 line.
    fn ratio_svg(&self) -> String {
        let ws: Vec<&WorkloadSummary> = self
            .summaries
            .iter()
            .filter(|s| s.workload.kind == Kind::TcpPingPong && s.workload.conns == 1)
            .collect();
        let colors = ["#1f77b4", "#ff7f0e"];
        let (w, h, left, bottom, top) = (100.0 * ws.len() as f64 + 100.0, 360.0, 60.0, 50.0, 40.0);
        let plot_h = h - bottom - top;
        let hi = ws
            .iter()
            .flat_map(|s| [s.ratio(0), s.ratio(2)])
            .filter(|x| x.is_finite())
            .fold(1.2_f64, f64::max);
        let y = |v: f64| top + plot_h * (1.0 - v / hi);
        let mut s = svg_head(
            w,
            h,
            "C/B latency ratio per TCP message size (below 1: meshlane faster)",
        );
        for k in 0..=((hi / 0.2) as usize) {
            let v = 0.2 * k as f64;
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{yv:.1}" y2="{yv:.1}" stroke="{}"/><text x="{}" y="{:.1}" text-anchor="end" font-size="11">{v:.1}</text>"##,
                w - 10.0,
                if (v - 1.0).abs() < 1e-9 {
                    "#000"
                } else {
                    "#ddd"
                },
                left - 4.0,
                y(v) + 4.0,
                yv = y(v)
            );
        }
        for (i, ws) in ws.iter().enumerate() {
            let x0 = left + 20.0 + 100.0 * i as f64;
            for (k, m) in [0, 2].into_iter().enumerate() {
                let r = ws.ratio(m);
                if !r.is_finite() {
                    continue;
                }
                let x = x0 + 30.0 * k as f64;
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="26" height="{:.1}" fill="{}"><title>{r:.2}</title></rect><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{r:.2}</text>"#,
                    y(r),
                    (h - bottom) - y(r),
                    colors[k],
                    x + 13.0,
                    y(r) - 3.0
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
                x0 + 28.0,
                h - bottom + 16.0,
                ws.workload
                    .name
                    .trim_start_matches("tcp ")
                    .trim_end_matches(" x1")
            );
        }
        legend(&mut s, w, &["p50 C/B", "p99 C/B"], &colors);
        s.push_str("</svg>\n");
        s
    }
}

/// Per kind in [`KINDS`], the cost of the program over `c_rows` (one workload's accepted C rounds).
fn prog_summaries(w: &Workload, c_rows: &[&Row]) -> Vec<ProgSummary> {
    KINDS
        .iter()
        .map(|&kind| {
            let costs: Vec<(u64, u64, u64)> = c_rows
                .iter()
                .filter_map(|r| {
                    let c = r.prog.iter().find(|p| p.kind == kind)?;
                    Some((c.runs, c.ns, workload::requests_sent(w, &r.measured)))
                })
                .collect();
            ProgSummary {
                kind,
                rounds: costs.len(),
                ns_per_run: spread(
                    costs
                        .iter()
                        .filter(|(runs, _, _)| *runs > 0)
                        .map(|&(runs, ns, _)| ns as f64 / runs as f64)
                        .collect(),
                ),
                runs_per_req: spread(
                    costs
                        .iter()
                        .map(|&(runs, _, sent)| runs as f64 / sent.max(1) as f64)
                        .collect(),
                ),
            }
        })
        .collect()
}

fn per_req(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.0}%", 100.0 * x)
    } else {
        "n/a".to_string()
    }
}

fn svg_head(w: f64, h: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">{title}</text>\n"
    )
}

fn legend(s: &mut String, w: f64, names: &[&str], colors: &[&str]) {
    for (k, (n, c)) in names.iter().zip(colors).enumerate() {
        let y = 30.0 + 14.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{c}"/><text x="{:.1}" y="{:.1}" font-size="11">{n}</text>"#,
            w - 170.0,
            y,
            w - 155.0,
            y + 9.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_steps_are_1_2_5_and_cover_the_max() {
        assert_eq!(axis(100.0), (50.0, 100.0));
        assert_eq!(axis(130.0), (50.0, 150.0));
        assert_eq!(axis(7.3), (2.0, 8.0));
        assert_eq!(axis(3241.0), (1000.0, 4000.0));
        assert_eq!(axis(0.0), (1.0, 1.0));
        for max in [0.37, 1.0, 9.99, 123.4, 98765.0] {
            let (step, hi) = axis(max);
            assert!(hi >= max && hi - step < max, "{max}: {step} {hi}");
            assert!(hi / step <= 5.0, "{max}: too many ticks");
        }
        assert_eq!(tick(0.30000000000000004), "0.3");
        assert_eq!(tick(200.0), "200");
    }

    #[test]
    fn cdf_quantiles_are_nearest_ranks_in_us() {
        // 1..=1000 us: the quantile q is the sample at rank round(999 q).
        let samples: Vec<u64> = (1..=1000).rev().map(|us| us * 1000).collect();
        let c = cdf_of("w", "B", samples);
        assert_eq!(c.samples, 1000);
        assert_eq!(c.points.first(), Some(&(0.0, 1.0)));
        assert_eq!(c.points.last(), Some(&(0.999, 999.0)));
        let median = c.points.iter().find(|p| p.0 == 0.5).unwrap();
        assert_eq!(median.1, 501.0);
        // Monotone in both coordinates.
        assert!(c
            .points
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert!(cdf_of("w", "C", Vec::new()).points.is_empty());
    }
}
