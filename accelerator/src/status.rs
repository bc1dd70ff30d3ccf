//! `meshlane status`: the daemon's answer to GetStatus, as a table, JSON or YAML.

use std::{collections::BTreeMap, path::Path};

use meshlane::telemetry::api;
use meshlane_api::v1 as pb;
use serde::Serialize;

use crate::Output;

pub async fn show(socket: &Path, output: Output) -> anyhow::Result<()> {
    let s = api::fetch_status(socket).await?;
    match output {
        Output::Table => print!("{}", render(&s)),
        _ => print!("{}", crate::serialize(&document(&s), output)?),
    }
    Ok(())
}

fn state_name(s: &pb::Status) -> &'static str {
    match s.state() {
        pb::DatapathState::Accelerating => "accelerating",
        pb::DatapathState::PassThrough => "pass-through",
        pb::DatapathState::Starting => "starting",
        pb::DatapathState::Unspecified => "unknown",
    }
}

fn check_name(c: &pb::ProbeCheck) -> &'static str {
    match c.status() {
        pb::CheckStatus::Pass => "pass",
        pb::CheckStatus::Warn => "warn",
        pb::CheckStatus::Fail => "fail",
        pb::CheckStatus::Skip => "skip",
        pb::CheckStatus::Unspecified => "unknown",
    }
}

fn pod_bytes(p: &pb::Pod) -> u64 {
    p.counters
        .as_ref()
        .map(|c| c.redirected_bytes.values().sum())
        .unwrap_or(0)
}

fn render(s: &pb::Status) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "meshlane {}: {}", s.version, state_name(s));
    if !s.reason.is_empty() {
        let _ = writeln!(o, "  why: {}", s.reason);
    }
    if !s.origin.is_empty() {
        let _ = writeln!(
            o,
            "  datapath {} at {}, sock_ops on {}",
            s.origin, s.pin_dir, s.cgroup
        );
    }
    if !s.mode.is_empty() {
        let _ = writeln!(o, "mode: {} ({})", s.mode, s.mode_reason);
        for d in &s.mode_differences {
            let _ = writeln!(o, "  {d}");
        }
    }
    match &s.probe {
        Some(p) if p.ran => {
            let warns = p
                .checks
                .iter()
                .filter(|c| c.status() == pb::CheckStatus::Warn)
                .count();
            let _ = writeln!(
                o,
                "probe: {} on kernel {} ({} checks, {} warnings)",
                if p.ok { "passed" } else { "FAILED" },
                p.kernel,
                p.checks.len(),
                warns
            );
            for c in p
                .checks
                .iter()
                .filter(|c| matches!(c.status(), pb::CheckStatus::Fail | pb::CheckStatus::Warn))
            {
                let _ = writeln!(o, "  {} {}: {}", check_name(c), c.name, c.detail);
            }
        }
        _ => {
            let _ = writeln!(
                o,
                "probe: not run (skipped with --force, or still starting)"
            );
        }
    }
    for src in &s.sources {
        let _ = writeln!(
            o,
            "source {}: {}{}",
            src.name,
            if src.healthy {
                "healthy"
            } else if src.degraded {
                "DEGRADED (throttled), last good state kept"
            } else {
                "FAILING, last good state kept"
            },
            if src.last_error.is_empty() {
                String::new()
            } else {
                format!(" ({})", src.last_error)
            }
        );
    }
    let accelerated = s
        .pods
        .iter()
        .filter(|p| p.state() == pb::PodState::Accelerated)
        .count();
    let _ = writeln!(
        o,
        "pods: {} accelerated, {} not",
        accelerated,
        s.pods.len() - accelerated
    );
    if !s.pods.is_empty() {
        let w = s
            .pods
            .iter()
            .map(|p| p.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            o,
            "  {:w$}  {:15}  {:>11}  {:>14}  REASON",
            "NAME", "STATE", "PAIRS O/I/S", "BYTES"
        );
        for p in &s.pods {
            let (state, pairs) = match (&p.counters, p.state()) {
                (Some(c), pb::PodState::Accelerated) => (
                    "accelerated",
                    format!(
                        "{}/{}/{}",
                        c.pairs_outbound, c.pairs_inbound, c.pairs_sidecar
                    ),
                ),
                (None, pb::PodState::Accelerated) => ("accelerated", "-".into()),
                _ => ("not accelerated", "-".into()),
            };
            let _ = writeln!(
                o,
                "  {:w$}  {:15}  {:>11}  {:>14}  {}",
                p.name,
                state,
                pairs,
                pod_bytes(p),
                p.reason
            );
            for n in &p.notes {
                let _ = writeln!(o, "  {:w$}  note: {n}", "");
            }
        }
    }
    if !s.maps.is_empty() {
        let maps: Vec<_> = s
            .maps
            .iter()
            .map(|m| format!("{} {}/{}", m.name, m.entries, m.capacity))
            .collect();
        let _ = writeln!(o, "maps: {}", maps.join(", "));
    }
    if let Some(c) = &s.counters {
        let mut nonzero: Vec<_> = counters(c).into_iter().filter(|(_, v)| *v > 0).collect();
        nonzero.sort();
        let _ = writeln!(o, "counters (non-zero):");
        for (k, v) in nonzero {
            let _ = writeln!(o, "  {k:<44} {v}");
        }
    }
    o
}

/// The document `--output json|yaml` prints: field names and value vocabularies are a
/// contract with scripts, so they are spelled out here rather than taken from the generated
/// proto types (whose enums would print as numbers and whose maps have no stable order).
#[derive(Serialize)]
struct StatusDoc<'a> {
    version: &'a str,
    state: &'static str,
    reason: &'a str,
    pin_dir: &'a str,
    cgroup: &'a str,
    origin: &'a str,
    last_reconcile_unix: f64,
    mode: &'a str,
    mode_reason: &'a str,
    mode_differences: &'a [String],
    probe: Option<ProbeDoc<'a>>,
    sources: Vec<SourceDoc<'a>>,
    pods: Vec<PodDoc<'a>>,
    counters: Option<BTreeMap<String, u64>>,
    maps: Vec<MapDoc<'a>>,
}

#[derive(Serialize)]
struct ProbeDoc<'a> {
    ran: bool,
    ok: bool,
    kernel: &'a str,
    checks: Vec<CheckDoc<'a>>,
}

#[derive(Serialize)]
struct CheckDoc<'a> {
    name: &'a str,
    status: &'static str,
    detail: &'a str,
}

#[derive(Serialize)]
struct SourceDoc<'a> {
    name: &'a str,
    healthy: bool,
    degraded: bool,
    last_error: &'a str,
    last_success_unix: f64,
    errors_total: u64,
}

#[derive(Serialize)]
struct PodDoc<'a> {
    name: &'a str,
    netns: &'a str,
    netns_cookie: u64,
    state: &'static str,
    reason: &'a str,
    /// The `reason` label of `meshlane_pods` (empty when accelerated).
    reason_code: String,
    mode: &'a str,
    source: &'a str,
    uid: &'a str,
    pod_ips: &'a [String],
    proxy_uid: Option<u32>,
    proxy_gid: Option<u32>,
    outbound_port: Option<u32>,
    inbound_port: Option<u32>,
    notes: &'a [String],
    counters: Option<PodCountersDoc<'a>>,
}

#[derive(Serialize)]
struct PodCountersDoc<'a> {
    pairs_outbound: u64,
    pairs_inbound: u64,
    pairs_sidecar: u64,
    redirected_messages: BTreeMap<&'a str, u64>,
    redirected_bytes: BTreeMap<&'a str, u64>,
}

#[derive(Serialize)]
struct MapDoc<'a> {
    name: &'a str,
    entries: u32,
    capacity: u32,
}

fn sorted(m: &std::collections::HashMap<String, u64>) -> BTreeMap<&str, u64> {
    m.iter().map(|(k, v)| (k.as_str(), *v)).collect()
}

/// The datapath's own name of an enum value (`COUNTER_NAME_PAIRS_OUTBOUND`: `pairs_outbound`);
/// a value this build does not know keeps its number rather than vanish.
fn enum_key(known: bool, str_name: &str, prefix: &str, raw: i32) -> String {
    if known {
        str_name.trim_start_matches(prefix).to_ascii_lowercase()
    } else {
        format!("unknown_{raw}")
    }
}

fn counters(c: &pb::Counters) -> BTreeMap<String, u64> {
    c.counters
        .iter()
        .map(|c| {
            let name = pb::CounterName::try_from(c.name)
                .ok()
                .filter(|n| *n != pb::CounterName::Unspecified);
            let key = enum_key(
                name.is_some(),
                name.map_or("", |n| n.as_str_name()),
                "COUNTER_NAME_",
                c.name,
            );
            (key, c.value)
        })
        .collect()
}

fn reason_code(p: &pb::Pod) -> String {
    match pb::PodReason::try_from(p.reason_code) {
        Ok(pb::PodReason::Unspecified) => String::new(),
        Ok(r) => enum_key(true, r.as_str_name(), "POD_REASON_", p.reason_code),
        Err(_) => enum_key(false, "", "", p.reason_code),
    }
}

/// Seconds since the epoch, as the document has always carried them (0: never).
fn unix(t: Option<&prost_types::Timestamp>) -> f64 {
    t.map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

fn document(s: &pb::Status) -> StatusDoc<'_> {
    StatusDoc {
        version: &s.version,
        state: state_name(s),
        reason: &s.reason,
        pin_dir: &s.pin_dir,
        cgroup: &s.cgroup,
        origin: &s.origin,
        last_reconcile_unix: unix(s.last_reconcile_time.as_ref()),
        mode: &s.mode,
        mode_reason: &s.mode_reason,
        mode_differences: &s.mode_differences,
        probe: s.probe.as_ref().map(|p| ProbeDoc {
            ran: p.ran,
            ok: p.ok,
            kernel: &p.kernel,
            checks: p
                .checks
                .iter()
                .map(|c| CheckDoc {
                    name: &c.name,
                    status: check_name(c),
                    detail: &c.detail,
                })
                .collect(),
        }),
        sources: s
            .sources
            .iter()
            .map(|x| SourceDoc {
                name: &x.name,
                healthy: x.healthy,
                degraded: x.degraded,
                last_error: &x.last_error,
                last_success_unix: unix(x.last_success_time.as_ref()),
                errors_total: x.errors_total,
            })
            .collect(),
        pods: s
            .pods
            .iter()
            .map(|p| PodDoc {
                name: &p.name,
                netns: &p.netns,
                netns_cookie: p.netns_cookie,
                state: if p.state() == pb::PodState::Accelerated {
                    "accelerated"
                } else {
                    "not_accelerated"
                },
                reason: &p.reason,
                reason_code: reason_code(p),
                mode: &p.mode,
                source: &p.source,
                uid: &p.uid,
                pod_ips: &p.pod_ips,
                proxy_uid: p.proxy_uid,
                proxy_gid: p.proxy_gid,
                outbound_port: p.outbound_port,
                inbound_port: p.inbound_port,
                notes: &p.notes,
                counters: p.counters.as_ref().map(|c| PodCountersDoc {
                    pairs_outbound: c.pairs_outbound,
                    pairs_inbound: c.pairs_inbound,
                    pairs_sidecar: c.pairs_sidecar,
                    redirected_messages: sorted(&c.redirected_messages),
                    redirected_bytes: sorted(&c.redirected_bytes),
                }),
            })
            .collect(),
        counters: s.counters.as_ref().map(counters),
        maps: s
            .maps
            .iter()
            .map(|m| MapDoc {
                name: &m.name,
                entries: m.entries,
                capacity: m.capacity,
            })
            .collect(),
    }
}
