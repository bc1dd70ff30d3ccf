//! Medians over rounds with min..max spread, the meshlane/plain ratio, as a table, JSON and
//! Markdown.

use std::fmt::Write as _;

use anyhow::Result;

use crate::{
    progstats::{ProgCost, KINDS},
    results::relay::{Round, SCENARIOS},
    Args,
};

/// Median and range of one metric over the rounds of one scenario.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Spread {
        median,
        min: v.first().copied().unwrap_or(0.0),
        max: v.last().copied().unwrap_or(0.0),
    }
}

type Metric = (&'static str, fn(&Round) -> f64);

const METRICS: [Metric; 6] = [
    ("rtt p50 (us)", |r| r.rtt.p50_us),
    ("rtt p90 (us)", |r| r.rtt.p90_us),
    ("rtt p99 (us)", |r| r.rtt.p99_us),
    ("rtt p99.9 (us)", |r| r.rtt.p999_us),
    ("connect p50 (us)", |r| r.connect.p50_us),
    ("connect p99 (us)", |r| r.connect.p99_us),
];

fn summary(results: &[Round]) -> Vec<(&'static str, Spread, Spread)> {
    METRICS
        .iter()
        .map(|(name, f)| {
            let of = |s: &str| spread(results.iter().filter(|r| r.scenario == s).map(f).collect());
            (*name, of(SCENARIOS[0]), of(SCENARIOS[1]))
        })
        .collect()
}

fn table(args: &Args, results: &[Round]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "relay chain, {} B ping-pong x {} per round, {} connects per round, {} interleaved rounds per scenario",
        64, args.pingpongs, args.connects, args.rounds
    );
    let _ = writeln!(
        t,
        "median over rounds [min..max]; ratio = meshlane / plain (below 1 is faster)\n\
         EAGAIN retries of the blocking reads (plain TCP never returns one): {}\n",
        SCENARIOS
            .iter()
            .map(|sc| format!(
                "{sc} {}",
                results
                    .iter()
                    .filter(|r| r.scenario == *sc)
                    .map(|r| r.eagain_retries)
                    .sum::<u64>()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(t, "| metric | plain | meshlane | ratio |");
    let _ = writeln!(t, "|---|---|---|---|");
    for (name, plain, fast) in summary(results) {
        let ratio = if plain.median > 0.0 {
            fast.median / plain.median
        } else {
            f64::NAN
        };
        let _ = writeln!(
            t,
            "| {name} | {:.1} [{:.1}..{:.1}] | {:.1} [{:.1}..{:.1}] | {ratio:.2} |",
            plain.median, plain.min, plain.max, fast.median, fast.min, fast.max
        );
    }
    let _ = writeln!(
        t,
        "\nBPF program cost in the meshlane rounds (kernel bpf_stats): median over rounds of ns per run, and runs per round trip / per connect cycle (the app's connect, a 1-byte echo and close, which also makes the relays' two further connections)\n"
    );
    let _ = writeln!(
        t,
        "| program | ping-pong ns/run | runs per round trip | connect ns/run | runs per connect | ns per connect |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|");
    let fast: Vec<&Round> = results
        .iter()
        .filter(|r| r.scenario == SCENARIOS[1])
        .collect();
    let mut total = Vec::new();
    for kind in KINDS {
        let of = |costs: &dyn Fn(&Round) -> &Vec<ProgCost>, per: usize| {
            let mut ns = Vec::new();
            let mut runs = Vec::new();
            for r in &fast {
                if let Some(c) = costs(r).iter().find(|c| c.kind == kind) {
                    ns.push(if c.runs > 0 {
                        c.ns as f64 / c.runs as f64
                    } else {
                        0.0
                    });
                    runs.push(c.runs as f64 / per.max(1) as f64);
                }
            }
            (ns, runs)
        };
        let (pp_ns, pp_runs) = of(&|r| &r.pingpong_progs, args.pingpongs + args.pingpongs / 10);
        let (c_ns, c_runs) = of(&|r| &r.connect_progs, args.connects);
        if pp_ns.is_empty() && c_ns.is_empty() {
            let _ = writeln!(t, "| {kind} | not attached | | | | |");
            continue;
        }
        let per_connect: Vec<f64> = fast
            .iter()
            .filter_map(|r| r.connect_progs.iter().find(|c| c.kind == kind))
            .map(|c| c.ns as f64 / args.connects.max(1) as f64)
            .collect();
        total.push(spread(per_connect.clone()).median);
        let _ = writeln!(
            t,
            "| {kind} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} |",
            spread(pp_ns).median,
            spread(pp_runs).median,
            spread(c_ns).median,
            spread(c_runs).median,
            spread(per_connect).median
        );
    }
    let _ = writeln!(
        t,
        "| all programs | | | | | {:.0} |",
        total.iter().sum::<f64>()
    );
    t
}

pub fn print(args: &Args, results: &[Round]) {
    println!("{}", table(args, results));
}

pub fn write(args: &Args, results: &[Round]) -> Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let provenance = crate::provenance::Provenance::collect();
    let json = serde_json::json!({
        "args": {"rounds": args.rounds, "pingpongs": args.pingpongs, "size": 64, "connects": args.connects},
        "provenance": provenance,
        "rounds": results,
        "summary": summary(results).iter().map(|(n, p, f)| serde_json::json!({"metric": n, "plain": p, "meshlane": f})).collect::<Vec<_>>(),
    });
    std::fs::write(
        args.out.join("relay.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(
        args.out.join("relay.md"),
        format!("{}\n\n{}", provenance.line(), table(args, results)),
    )?;
    eprintln!("wrote {}/relay.json and relay.md", args.out.display());
    Ok(())
}
