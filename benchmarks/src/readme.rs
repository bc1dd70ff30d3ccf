//! The READMEs' benchmark tables, generated from committed `results.json` files and checked in
//! CI (`--check-readme`), so no number in a README is typed by hand.
//!
//! A generated table sits between two markers; the first names what it is made from:
//!
//! ```text
//! <!-- bench-table:begin kind=runs runs="results/default-1|results/default-2" workloads="tcp 64B x1|connect+close" (generated: meshlane-bench --update-readme) -->
//! | workload | ... |
//! <!-- bench-table:end -->
//! ```
//!
//! `runs` are result directories (or `.json` files) relative to the README, separated by `|`;
//! `workloads` (optional, default: every workload of the first run) and `labels` (optional) too.
//! Kinds: `runs` (C/B p50 and p99 per run and their median, C/B throughput's median), `modes`
//! (per run: B / C p50, C/B p50, p99 and throughput), `latency` (one run: A, B, C p50 and p99
//! with min..max, C/B, tax removed), `throughput` (one run: throughput and CPU per request) and
//! `cost` (one run: each BPF program's ns per run in C, as the kernel's bpf_stats measured it,
//! with min..max over rounds and runs per request; issue 13 wants it beside the latency).
//! Only summary fields every results.json has had are read (workload name, per scenario the
//! median/min/max of each metric, `tax_removed`), so old runs regenerate too; a workload a run
//! lacks is shown as "-".

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

const BEGIN: &str = "<!-- bench-table:begin ";
const END: &str = "<!-- bench-table:end -->";

/// What one marker asks for.
#[derive(Debug, Clone, PartialEq)]
struct Spec {
    kind: String,
    runs: Vec<String>,
    workloads: Vec<String>,
    labels: Vec<String>,
}

/// `key=value` and `key="value with spaces"` pairs of a begin marker; other words are ignored
/// (the marker's note to readers).
fn parse_spec(line: &str) -> Result<Spec> {
    let body = line
        .trim()
        .strip_prefix(BEGIN)
        .and_then(|l| l.strip_suffix("-->"))
        .context("not a bench-table begin marker")?;
    let mut pairs = Vec::new();
    let mut rest = body;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq]
            .rsplit(|c: char| c.is_whitespace() || c == '(')
            .next()
            .unwrap_or("");
        let after = &rest[eq + 1..];
        let (value, tail) = match after.strip_prefix('"') {
            Some(q) => {
                let end = q
                    .find('"')
                    .context("unterminated quote in bench-table marker")?;
                (&q[..end], &q[end + 1..])
            }
            None => {
                let end = after.find(char::is_whitespace).unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        pairs.push((key.to_string(), value.to_string()));
        rest = tail;
    }
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let list = |k: &str| -> Vec<String> {
        get(k)
            .map(|v| v.split('|').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    };
    let spec = Spec {
        kind: get("kind").context("bench-table marker without kind=")?,
        runs: list("runs"),
        workloads: list("workloads"),
        labels: list("labels"),
    };
    ensure!(!spec.runs.is_empty(), "bench-table marker without runs=");
    if matches!(spec.kind.as_str(), "latency" | "throughput" | "cost") {
        ensure!(
            spec.runs.len() == 1,
            "kind={} takes one run, not {}",
            spec.kind,
            spec.runs.len()
        );
    }
    if !spec.labels.is_empty() {
        ensure!(
            spec.labels.len() == spec.runs.len(),
            "{} labels for {} runs",
            spec.labels.len(),
            spec.runs.len()
        );
    }
    Ok(spec)
}

/// One run's summary, as read from its results.json.
struct Run {
    summary: Vec<Value>,
}

impl Run {
    fn load(base: &Path, run: &str) -> Result<Run> {
        let mut path = base.join(run);
        if path.is_dir() {
            path = path.join("results.json");
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Run::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    fn parse(text: &str) -> Result<Run> {
        let v: Value = serde_json::from_str(text)?;
        let summary = v["summary"]
            .as_array()
            .context("no summary array")?
            .to_vec();
        Ok(Run { summary })
    }

    fn workload(&self, name: &str) -> Option<&Value> {
        self.summary
            .iter()
            .find(|s| s["workload"]["name"].as_str() == Some(name))
    }

    fn names(&self, with_bulk: bool) -> Vec<String> {
        self.summary
            .iter()
            .filter(|s| with_bulk || s["workload"]["kind"].as_str() != Some("Bulk"))
            .filter_map(|s| s["workload"]["name"].as_str().map(str::to_string))
            .collect()
    }
}

/// The median, min and max of one scenario's metric (NaN where absent: null in JSON).
fn spread(w: &Value, scenario: &str, metric: &str) -> [f64; 3] {
    let m = &w[scenario][metric];
    ["median", "min", "max"].map(|k| m[k].as_f64().unwrap_or(f64::NAN))
}

fn median(w: &Value, scenario: &str, metric: &str) -> f64 {
    spread(w, scenario, metric)[0]
}

/// C/B of the medians (what results.md shows as C/B).
fn ratio(w: &Value, metric: &str) -> f64 {
    median(w, "C", metric) / median(w, "B", metric)
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// As results.md: four significant-ish digits, no decimals from 1000 up.
fn num(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x >= 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn r2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "-".into()
    }
}

fn with_range(s: [f64; 3]) -> String {
    format!("{} [{}..{}]", num(s[0]), num(s[1]), num(s[2]))
}

fn pct(x: Option<f64>) -> String {
    match x {
        Some(x) if x.is_finite() => format!("{:.0}%", 100.0 * x),
        _ => "n/a".into(),
    }
}

/// The programs of a `cost` table: their `kind` in results.json and their column heading.
const PROGRAMS: [(&str, &str); 4] = [
    ("sock_ops", "sock_ops ns/run [min..max] (runs/req)"),
    ("sk_msg", "sk_msg ns/run [min..max] (runs/req)"),
    ("connect", "connect hooks ns/run [min..max] (runs/req)"),
    ("recv", "read tracer ns/run [min..max] (runs/req)"),
];

/// One program's cost cell: "-" where it was not attached (no round measured it) or the run
/// predates the cost record.
fn program_cost(w: &Value, kind: &str) -> String {
    let Some(p) = w["c_bpf_prog"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["kind"].as_str() == Some(kind)))
    else {
        return "-".into();
    };
    if p["rounds"].as_u64().unwrap_or(0) == 0 {
        return "-".into();
    }
    let ns = ["median", "min", "max"].map(|k| p["ns_per_run"][k].as_f64().unwrap_or(f64::NAN));
    let per_req = p["runs_per_req"]["median"].as_f64().unwrap_or(f64::NAN);
    if !ns[0].is_finite() {
        // Attached, and never ran during the workload (sk_msg with nothing in a sockhash).
        return "not run (0)".into();
    }
    let per_req = if !per_req.is_finite() {
        "-".to_string()
    } else if per_req >= 100.0 {
        format!("{per_req:.0}")
    } else {
        format!("{per_req:.2}")
    };
    format!("{:.0} [{:.0}..{:.0}] ({per_req})", ns[0], ns[1], ns[2])
}

/// The Markdown table of `spec` from `runs` (in the spec's order).
fn render(spec: &Spec, runs: &[Run]) -> Result<String> {
    let latency_kind = matches!(spec.kind.as_str(), "runs" | "modes" | "latency");
    let names = if spec.workloads.is_empty() {
        runs[0].names(!latency_kind)
    } else {
        spec.workloads.clone()
    };
    let labels: Vec<String> = if spec.labels.is_empty() {
        (1..=runs.len()).map(|i| i.to_string()).collect()
    } else {
        spec.labels.clone()
    };
    let mut t = String::new();
    match spec.kind.as_str() {
        "runs" => {
            let l = labels.join(" / ");
            let _ = writeln!(
                t,
                "| workload | C/B p50, runs {l} | median | C/B p99, runs {l} | median | C/B thr, median |"
            );
            let _ = writeln!(t, "|---|---|---|---|---|---|");
            for name in &names {
                let per = |metric: &str| -> Vec<f64> {
                    runs.iter()
                        .map(|r| r.workload(name).map_or(f64::NAN, |w| ratio(w, metric)))
                        .collect()
                };
                let (p50, p99, thr) = (per("p50_us"), per("p99_us"), per("throughput"));
                let join = |v: &[f64]| v.iter().map(|x| r2(*x)).collect::<Vec<_>>().join(" / ");
                let _ = writeln!(
                    t,
                    "| {name} | {} | {} | {} | {} | {} |",
                    join(&p50),
                    r2(median_of(p50.clone())),
                    join(&p99),
                    r2(median_of(p99.clone())),
                    r2(median_of(thr)),
                );
            }
        }
        "modes" => {
            let mut head = String::from("| workload |");
            let mut rule = String::from("|---|");
            for l in &labels {
                let _ = write!(head, " {l}: B / C p50 | C/B p50 | C/B p99 | C/B thr |");
                rule.push_str("---|---|---|---|");
            }
            let _ = writeln!(t, "{head}\n{rule}");
            for name in &names {
                let _ = write!(t, "| {name} |");
                for r in runs {
                    match r.workload(name) {
                        Some(w) => {
                            let _ = write!(
                                t,
                                " {} / {} | {} | {} | {} |",
                                num(median(w, "B", "p50_us")),
                                num(median(w, "C", "p50_us")),
                                r2(ratio(w, "p50_us")),
                                r2(ratio(w, "p99_us")),
                                r2(ratio(w, "throughput")),
                            );
                        }
                        None => t.push_str(" - | - | - | - |"),
                    }
                }
                t.push('\n');
            }
        }
        "latency" => {
            let _ = writeln!(
                t,
                "| workload | A p50 | B p50 | C p50 | C/B p50 | tax removed p50 | A p99 | B p99 | C p99 | C/B p99 | tax removed p99 |"
            );
            let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|---|");
            for name in &names {
                let w = runs[0]
                    .workload(name)
                    .with_context(|| format!("no workload {name:?} in the run"))?;
                let tax = |k: &str| w["tax_removed"][k].as_f64();
                let _ = writeln!(
                    t,
                    "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    with_range(spread(w, "A", "p50_us")),
                    with_range(spread(w, "B", "p50_us")),
                    with_range(spread(w, "C", "p50_us")),
                    r2(ratio(w, "p50_us")),
                    pct(tax("p50")),
                    with_range(spread(w, "A", "p99_us")),
                    with_range(spread(w, "B", "p99_us")),
                    with_range(spread(w, "C", "p99_us")),
                    r2(ratio(w, "p99_us")),
                    pct(tax("p99")),
                );
            }
        }
        "throughput" => {
            let _ = writeln!(
                t,
                "| workload | A thr | B thr | C thr | C/B thr | B cpu/req | C cpu/req | C/B cpu |"
            );
            let _ = writeln!(t, "|---|---|---|---|---|---|---|---|");
            for name in &names {
                let w = runs[0]
                    .workload(name)
                    .with_context(|| format!("no workload {name:?} in the run"))?;
                let _ = writeln!(
                    t,
                    "| {name} | {} | {} | {} | {} | {} | {} | {} |",
                    with_range(spread(w, "A", "throughput")),
                    with_range(spread(w, "B", "throughput")),
                    with_range(spread(w, "C", "throughput")),
                    r2(ratio(w, "throughput")),
                    with_range(spread(w, "B", "cpu_us_per_req")),
                    with_range(spread(w, "C", "cpu_us_per_req")),
                    r2(ratio(w, "cpu_us_per_req")),
                );
            }
        }
        "cost" => {
            let _ = writeln!(t, "| workload | {} |", PROGRAMS.map(|p| p.1).join(" | "));
            let _ = writeln!(t, "|---|---|---|---|---|");
            for name in &names {
                let w = runs[0]
                    .workload(name)
                    .with_context(|| format!("no workload {name:?} in the run"))?;
                let cells = PROGRAMS.map(|(kind, _)| program_cost(w, kind));
                let _ = writeln!(t, "| {name} | {} |", cells.join(" | "));
            }
        }
        other => {
            bail!("unknown bench-table kind {other:?} (runs, modes, latency, throughput, cost)")
        }
    }
    Ok(t)
}

/// `text` with every generated table replaced by what its marker's results give now.
/// `load` reads a run named in a marker.
fn regenerate(text: &str, load: &dyn Fn(&str) -> Result<Run>) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut lines = text.split_inclusive('\n');
    let mut line_no = 0;
    while let Some(line) = lines.next() {
        line_no += 1;
        out.push_str(line);
        if !line.trim_start().starts_with(BEGIN) {
            continue;
        }
        let spec = parse_spec(line).with_context(|| format!("line {line_no}"))?;
        let runs = spec
            .runs
            .iter()
            .map(|r| load(r))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("the table at line {line_no}"))?;
        out.push_str(&render(&spec, &runs).with_context(|| format!("line {line_no}"))?);
        // Skip the old table up to and including the end marker.
        loop {
            let Some(old) = lines.next() else {
                bail!("line {line_no}: bench-table without {END}");
            };
            line_no += 1;
            if old.trim() == END {
                out.push_str(old);
                break;
            }
            ensure!(
                !old.trim_start().starts_with(BEGIN),
                "line {line_no}: bench-table begins inside another"
            );
        }
    }
    Ok(out)
}

/// `--update-readme` (write) or `--check-readme` (fail on any difference) for each README.
pub fn run(readmes: &[PathBuf], update: bool) -> Result<()> {
    let mut stale = Vec::new();
    for readme in readmes {
        let text = std::fs::read_to_string(readme)
            .with_context(|| format!("reading {}", readme.display()))?;
        let base = readme.parent().unwrap_or(Path::new(".")).to_path_buf();
        let new = regenerate(&text, &|run| Run::load(&base, run))
            .with_context(|| format!("in {}", readme.display()))?;
        let tables = text.matches(BEGIN).count();
        if new == text {
            eprintln!(
                "[bench] {}: {tables} generated tables up to date",
                readme.display()
            );
            continue;
        }
        if update {
            std::fs::write(readme, &new)?;
            eprintln!("[bench] {}: tables rewritten", readme.display());
        } else {
            let (old_l, new_l): (Vec<&str>, Vec<&str>) =
                (text.lines().collect(), new.lines().collect());
            let at = old_l
                .iter()
                .zip(&new_l)
                .position(|(a, b)| a != b)
                .unwrap_or(old_l.len().min(new_l.len()));
            eprintln!(
                "{}:{}: the table differs from its results\n  README:    {}\n  generated: {}",
                readme.display(),
                at + 1,
                old_l.get(at).unwrap_or(&"(end)"),
                new_l.get(at).unwrap_or(&"(end)"),
            );
            stale.push(readme.display().to_string());
        }
    }
    if !stale.is_empty() {
        bail!(
            "generated tables in {} differ from their results.json; tables are never edited by hand: run `meshlane-bench --update-readme` and commit",
            stale.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_json(rows: &[(&str, &str, [f64; 3])]) -> Run {
        // (workload, kind, [A, B, C] medians of every metric; min/max around them)
        let summary: Vec<Value> = rows
            .iter()
            .map(|(name, kind, m)| {
                let sc = |x: f64| {
                    let s = serde_json::json!({"median": x, "min": x * 0.9, "max": x * 1.1});
                    serde_json::json!({"p50_us": s, "p99_us": s, "throughput": s, "cpu_us_per_req": s})
                };
                serde_json::json!({
                    "workload": {"name": name, "kind": kind},
                    "A": sc(m[0]), "B": sc(m[1]), "C": sc(m[2]),
                    "tax_removed": {"p50": (m[1] - m[2]) / (m[1] - m[0]), "p99": null},
                })
            })
            .collect();
        Run::parse(&serde_json::json!({ "summary": summary }).to_string()).unwrap()
    }

    #[test]
    fn cost_table_shows_each_program_or_a_dash() {
        let prog = |kind: &str, rounds: u64, ns: f64, per: f64| {
            serde_json::json!({"kind": kind, "rounds": rounds,
                "ns_per_run": {"median": ns, "min": ns - 10.0, "max": ns + 10.0},
                "runs_per_req": {"median": per, "min": per, "max": per}})
        };
        let summary = serde_json::json!({"summary": [
            {"workload": {"name": "tcp 64B x1", "kind": "TcpPingPong"},
             "c_bpf_prog": [prog("sock_ops", 7, 887.4, 0.0068), prog("sk_msg", 7, 478.0, 2.0),
                            prog("connect", 0, f64::NAN, f64::NAN), prog("recv", 7, 136.2, 12.0)]},
            {"workload": {"name": "old", "kind": "TcpPingPong"}},
        ]});
        let run = Run::parse(&summary.to_string()).unwrap();
        let spec = parse_spec("<!-- bench-table:begin kind=cost runs=\"1\" -->").unwrap();
        let t = render(&spec, &[run]).unwrap();
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(
            rows[2],
            "| tcp 64B x1 | 887 [877..897] (0.01) | 478 [468..488] (2.00) | - | 136 [126..146] (12.00) |"
        );
        assert_eq!(rows[3], "| old | - | - | - | - |");
        let idle = serde_json::json!({"summary": [
            {"workload": {"name": "remote", "kind": "TcpPingPong"},
             "c_bpf_prog": [prog("sk_msg", 7, f64::NAN, 0.0)]},
        ]});
        let t = render(&spec, &[Run::parse(&idle.to_string()).unwrap()]).unwrap();
        assert_eq!(
            t.lines().nth(2),
            Some("| remote | - | not run (0) | - | - |")
        );
        assert!(parse_spec("<!-- bench-table:begin kind=cost runs=\"a|b\" -->").is_err());
    }

    #[test]
    fn spec_is_parsed_with_quotes_and_notes() {
        let s = parse_spec(
            r#"<!-- bench-table:begin kind=runs runs="a|b c" workloads="tcp 64B x1|connect+close" (generated: meshlane-bench --update-readme) -->"#,
        )
        .unwrap();
        assert_eq!(s.kind, "runs");
        assert_eq!(s.runs, ["a", "b c"]);
        assert_eq!(s.workloads, ["tcp 64B x1", "connect+close"]);
        assert!(s.labels.is_empty());
        assert!(parse_spec("<!-- bench-table:begin runs=a -->").is_err());
        assert!(parse_spec("<!-- bench-table:begin kind=latency runs=\"a|b\" -->").is_err());
    }

    #[test]
    fn runs_table_has_per_run_ratios_and_their_median() {
        let runs = [
            run_json(&[("tcp 64B x1", "TcpPingPong", [10.0, 100.0, 90.0])]),
            run_json(&[("tcp 64B x1", "TcpPingPong", [10.0, 100.0, 120.0])]),
            run_json(&[
                ("tcp 64B x1", "TcpPingPong", [10.0, 100.0, 100.0]),
                ("bulk", "Bulk", [1.0, 1.0, 1.0]),
            ]),
        ];
        let spec = parse_spec("<!-- bench-table:begin kind=runs runs=\"1|2|3\" -->").unwrap();
        let t = render(&spec, &runs).unwrap();
        let row = t.lines().nth(2).unwrap();
        assert_eq!(
            row,
            "| tcp 64B x1 | 0.90 / 1.20 / 1.00 | 1.00 | 0.90 / 1.20 / 1.00 | 1.00 | 1.00 |"
        );
        // Latency tables leave bulk out; a workload a run lacks is "-".
        assert_eq!(t.lines().count(), 3);
        let spec = parse_spec(
            "<!-- bench-table:begin kind=modes runs=\"1|3\" labels=\"x|y\" workloads=\"tcp 64B x1|bulk\" -->",
        )
        .unwrap();
        let t = render(&spec, &[runs[0].clone_summary(), runs[2].clone_summary()]).unwrap();
        assert!(t.starts_with("| workload | x: B / C p50 |"), "{t}");
        assert!(
            t.contains("| bulk | - | - | - | - | 1.0 / 1.0 | 1.00 | 1.00 | 1.00 |"),
            "{t}"
        );
    }

    #[test]
    fn latency_table_shows_ranges_and_tax() {
        let runs = [run_json(&[("http", "Http", [100.0, 2000.0, 1000.0])])];
        let spec = parse_spec("<!-- bench-table:begin kind=latency runs=r -->").unwrap();
        let t = render(&spec, &runs).unwrap();
        let row = t.lines().nth(2).unwrap();
        assert!(
            row.starts_with("| http | 100.0 [90.0..110.0] | 2000 [1800..2200] | 1000 [900.0..1100] | 0.50 | 53% |"),
            "{row}"
        );
        assert!(row.ends_with("| 0.50 | n/a |"), "{row}");
    }

    #[test]
    fn regenerate_replaces_only_marked_tables_and_check_sees_edits() {
        let text = "intro\n<!-- bench-table:begin kind=runs runs=r -->\n| stale |\n<!-- bench-table:end -->\noutro | kept |\n";
        let load = |_: &str| Ok(run_json(&[("w", "TcpPingPong", [1.0, 2.0, 1.0])]));
        let new = regenerate(text, &load).unwrap();
        assert!(new.starts_with("intro\n<!-- bench-table:begin kind=runs runs=r -->\n| workload |"));
        assert!(new.contains(
            "| w | 0.50 | 0.50 | 0.50 | 0.50 | 0.50 |\n<!-- bench-table:end -->\noutro | kept |\n"
        ));
        // Regenerating what was generated changes nothing: what --check-readme relies on.
        assert_eq!(regenerate(&new, &load).unwrap(), new);
        assert!(regenerate(
            "<!-- bench-table:begin kind=runs runs=r -->\n| x |\n",
            &load
        )
        .is_err());
    }

    impl Run {
        fn clone_summary(&self) -> Run {
            Run {
                summary: self.summary.clone(),
            }
        }
    }
}
