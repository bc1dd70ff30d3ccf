//! Prometheus metrics, every name prefixed `meshlane_`. Nothing is cached: each scrape reads the
//! daemon's snapshot and the kernel's maps as they are at that moment.

use std::{collections::BTreeMap, fmt, sync::Arc};

use meshlane_common::{counter, DIRECTIONS, HOPS};
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        gauge::ConstGauge,
        MetricType::{self, Counter, Gauge},
    },
    registry::Registry,
};

use super::state::{unix_secs, Phase, Shared};
use crate::probe;

/// The registry to encode on each scrape.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut r = Registry::default();
    r.register(
        "meshlane_reconcile_duration_seconds",
        "Time one reconcile pass took: sources read, policies written, status updated",
        shared.timings.reconcile.clone(),
    );
    r.register(
        "meshlane_discovery_pass_duration_seconds",
        "Time one read of the discovery source took (local: every proxy namespace's rules and admin API, cached ones skipped; kubernetes: mapping the watched pods and the xDS cross-check)",
        shared.timings.discovery.clone(),
    );
    r.register_collector(Box::new(Collector(shared)));
    r
}

/// Encodes the registry in the OpenMetrics text format (what Prometheus asks for first).
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// The same in the classic Prometheus text format (0.0.4), for clients that do not ask for
/// OpenMetrics (curl, promtool, older scrapers). The two differ only in counter family names
/// (OpenMetrics names the family without `_total`) and the closing `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|r| r.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

struct Collector(Arc<Shared>);

impl fmt::Debug for Collector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("meshlane collector")
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: its samples are (labels, value).
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[(Labels, u64)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        let e = m.encode_family(labels)?;
        match kind {
            Counter => ConstCounter::new(*v).encode(e)?,
            _ => ConstGauge::new(*v as i64).encode(e)?,
        }
    }
    Ok(())
}

fn gauge_f64(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, f64)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let snap = self.0.read().clone();
        // Read the kernel's maps once per scrape, outside the snapshot lock.
        let (counters, pod_stats, maps, budget, tracer, progs) = match self.0.datapath().as_ref() {
            Some(dp) => (
                dp.counters().ok(),
                dp.pod_stats().unwrap_or_default(),
                dp.map_usage().unwrap_or_default(),
                dp.budget_enforced()
                    .then_some(meshlane_common::UNREAD_BUDGET as u64),
                dp.read_tracer().map(|t| (t, dp.read_hints_enabled())),
                dp.program_stats().unwrap_or_default(),
            ),
            None => (None, BTreeMap::new(), Vec::new(), None, None, Vec::new()),
        };

        family(
            &mut enc,
            "meshlane_build_info",
            "meshlane version and the git revision it was built from (always 1)",
            Gauge,
            &[(
                vec![
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("revision", env!("MESHLANE_GIT_REVISION")),
                ],
                1,
            )],
        )?;
        let phase = snap.phase.name();
        family(
            &mut enc,
            "meshlane_datapath_state",
            "1 for the daemon's current state: starting, accelerating, or pass_through (nothing attached, all traffic on plain TCP)",
            Gauge,
            &Phase::NAMES.map(|s| (vec![("state", s)], u64::from(s == phase))),
        )?;

        // Pods by state and reason.
        let mut by_state: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for p in &snap.pods {
            let state = if p.accelerated() {
                "accelerated"
            } else {
                "not_accelerated"
            };
            *by_state.entry((state, p.reason_code)).or_default() += 1;
        }
        by_state.entry(("accelerated", "")).or_default();
        let pods: Vec<_> = by_state
            .iter()
            .map(|((state, reason), n)| (vec![("state", *state), ("reason", *reason)], *n))
            .collect();
        family(
            &mut enc,
            "meshlane_pods",
            "Pods known to the daemon, by state and (when not accelerated) reason",
            Gauge,
            &pods,
        )?;
        let disagreeing = snap
            .pods
            .iter()
            .filter(|p| {
                p.notes
                    .iter()
                    .any(|n| n.starts_with(crate::discovery::xds::DISAGREES))
            })
            .count() as u64;
        family(
            &mut enc,
            "meshlane_xds_disagreements",
            "Pods whose sidecar's xDS listeners disagree with their capture rules (the rules are used; status names the ports)",
            Gauge,
            &[(vec![], disagreeing)],
        )?;

        if let Some(c) = &counters {
            family(
                &mut enc,
                "meshlane_pairs",
                "Hops paired, by hop (outbound and inbound: app <-> its sidecar; sidecar: client sidecar <-> server sidecar on this node)",
                Counter,
                &HOPS
                    .iter()
                    .enumerate()
                    .map(|(i, h)| (vec![("hop", *h)], c.at(counter::pairs(i as u32))))
                    .collect::<Vec<_>>(),
            )?;
            // (messages, bytes) counters of each direction, by the programs' own table.
            let by_dir = |bytes: bool| -> Vec<(Labels, u64)> {
                DIRECTIONS
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        let (m, b) = counter::redirected(i as u32);
                        (vec![("direction", *d)], c.at(if bytes { b } else { m }))
                    })
                    .collect()
            };
            family(
                &mut enc,
                "meshlane_redirected_bytes",
                "Bytes handed socket to socket, by direction (added every 32 messages or 256 KiB per connection, and when it closes)",
                Counter,
                &by_dir(true),
            )?;
            family(
                &mut enc,
                "meshlane_redirected_messages",
                "sendmsg calls handed socket to socket, by direction (added every 32 messages or 256 KiB per connection, and when it closes)",
                Counter,
                &by_dir(false),
            )?;
            let pass = [
                ("untracked", counter::PASS_UNTRACKED),
                ("no_peer", counter::PASS_NO_PEER),
                ("tcp_pinned", counter::PASS_TCP_PINNED),
                ("peer_gone", counter::PASS_PEER_GONE),
                ("draining", counter::PASS_DRAINING),
                ("not_captured", counter::CONNECT_NOT_CAPTURED),
                ("early_data", counter::SKIP_EARLY_DATA),
                ("pair_rejected", counter::PAIR_REJECTED),
                ("over_budget", counter::PASS_OVER_BUDGET),
                ("memory_tight", counter::PASS_MEMORY_TIGHT),
                ("owner_unknown", counter::CONNECT_OWNER_UNKNOWN),
            ]
            .map(|(reason, i)| (vec![("reason", reason)], c.at(i)));
            family(
                &mut enc,
                "meshlane_passthrough",
                "Messages or connections left on plain TCP, by reason",
                Counter,
                &pass,
            )?;
            family(
                &mut enc,
                "meshlane_stamps",
                "Pairing tokens on the handshake's last ACK: written by app sockets, found or missing at the sidecar",
                Counter,
                &[
                    ("written", counter::STAMPS_WRITTEN),
                    ("found", counter::STAMPS_FOUND),
                    ("missing", counter::STAMPS_MISSING),
                ]
                .map(|(r, i)| (vec![("result", r)], c.at(i))),
            )?;
            family(
                &mut enc,
                "meshlane_map_full",
                "Hops left on plain TCP because a map was full, by map",
                Counter,
                &[
                    ("socks", counter::SOCKHASH_FULL),
                    ("rendezvous", counter::RENDEZVOUS_FULL),
                    ("unread", counter::PEERS_FULL),
                ]
                .map(|(m, i)| (vec![("map", m)], c.at(i))),
            )?;
            family(
                &mut enc,
                "meshlane_app_unpaired_at_half_close",
                "App sockets that left the sockhash at their own half-close (reader rule): their later reads are plain TCP",
                Counter,
                &[(vec![], c.at(counter::APP_UNPAIRED_AT_HALF_CLOSE))],
            )?;
        }

        // Per pod: pod stats are keyed by netns cookie; name them from the snapshot.
        let names: BTreeMap<u64, &str> = snap
            .pods
            .iter()
            .filter_map(|p| Some((p.netns_cookie?, p.name.as_str())))
            .collect();
        let mut pod_pairs = Vec::new();
        let mut pod_bytes = Vec::new();
        let mut pod_msgs = Vec::new();
        for (cookie, s) in &pod_stats {
            let Some(name) = names.get(cookie) else {
                continue;
            };
            // `pod` is meshlane's `namespace/name`; `pod_namespace` and `pod_name` join with
            // Istio's series (whose `namespace` and `pod` are the scraped sidecar's), which a
            // `pod` label of meshlane's own could not do under a scrape without honorLabels.
            let (namespace, pod_name) = name.split_once('/').unwrap_or(("", name));
            let labels = |k: &'static str, v: &'static str| -> Labels {
                vec![
                    ("pod", name),
                    ("pod_namespace", namespace),
                    ("pod_name", pod_name),
                    (k, v),
                ]
            };
            for (hop, v) in HOPS.iter().zip(s.pairs) {
                pod_pairs.push((labels("hop", hop), v));
            }
            for (i, d) in DIRECTIONS.iter().enumerate() {
                pod_bytes.push((labels("direction", d), s.bytes[i]));
                pod_msgs.push((labels("direction", d), s.msgs[i]));
            }
        }
        family(
            &mut enc,
            "meshlane_pod_pairs",
            "Hops paired, per pod and hop",
            Counter,
            &pod_pairs,
        )?;
        family(
            &mut enc,
            "meshlane_pod_redirected_bytes",
            "Bytes redirected, per pod and direction (added every 32 messages or 256 KiB per connection, and when it closes)",
            Counter,
            &pod_bytes,
        )?;
        family(
            &mut enc,
            "meshlane_pod_redirected_messages",
            "Messages redirected, per pod and direction (added every 32 messages or 256 KiB per connection, and when it closes)",
            Counter,
            &pod_msgs,
        )?;

        family(
            &mut enc,
            "meshlane_unread_budget_bytes",
            "Redirected bytes a reader may leave unread before its writer moves to TCP (0: not enforced, this kernel offers no read tracer)",
            Gauge,
            &[(vec![], budget.unwrap_or(0))],
        )?;
        if let Some((tracer, hints)) = tracer {
            family(
                &mut enc,
                "meshlane_read_tracer",
                "1 for how reads are counted for the unread budget: fexit (tcp_bpf_recvmsg, sockets in a sockhash only) or tracepoint (sock_recv_length, every read on the node)",
                Gauge,
                &[(vec![("attachment", tracer.as_str())], 1)],
            )?;
            family(
                &mut enc,
                "meshlane_read_hints",
                "1 when the read tracer skips sockets meshlane never paired with two array loads; 0 while it looks every read up (after adopting another build's pins, until their entries are covered)",
                Gauge,
                &[(vec![], u64::from(hints))],
            )?;
        }
        let runs: Vec<_> = progs
            .iter()
            .map(|(kind, p)| (vec![("program", *kind)], p.run_cnt))
            .collect();
        family(
            &mut enc,
            "meshlane_program_runs",
            "Runs of each meshlane BPF program, as the kernel counts them (only while kernel.bpf_stats_enabled=1)",
            Counter,
            &runs,
        )?;
        let mut m = enc.encode_descriptor(
            "meshlane_program_run_seconds",
            "Time spent inside each meshlane BPF program, as the kernel measures it (only while kernel.bpf_stats_enabled=1); divided by meshlane_program_runs_total, the cost per run",
            None,
            Counter,
        )?;
        for (kind, p) in &progs {
            ConstCounter::new(p.run_time_ns as f64 / 1e9)
                .encode(m.encode_family(&vec![("program", *kind)])?)?;
        }
        let usage: Vec<_> = maps
            .iter()
            .map(|m| (vec![("map", m.name)], u64::from(m.entries)))
            .collect();
        family(
            &mut enc,
            "meshlane_map_entries",
            "Entries in use, per map",
            Gauge,
            &usage,
        )?;
        let cap: Vec<_> = maps
            .iter()
            .map(|m| (vec![("map", m.name)], u64::from(m.capacity)))
            .collect();
        family(
            &mut enc,
            "meshlane_map_capacity",
            "Maximum entries, per map",
            Gauge,
            &cap,
        )?;

        // The mode in force (1) and the others (0); absent until decided.
        if let Some(d) = &snap.mode {
            let modes: Vec<_> = crate::mode::Mode::ALL
                .iter()
                .map(|m| (vec![("mode", m.as_str())], u64::from(*m == d.mode)))
                .collect();
            family(
                &mut enc,
                "meshlane_mode",
                "1 for the redirect mode in force: reader (app -> sidecar only), two-way (opt-in, also into the app), sidecar (app sockets left alone, only the sidecar <-> sidecar hop) or off (nothing)",
                Gauge,
                &modes,
            )?;
        }
        if let Some(r) = &snap.probe {
            let differs: Vec<_> = r
                .modes
                .iter()
                .map(|m| {
                    let names = m.difference_names();
                    (m.mode.as_str(), names.len() as u64)
                })
                .map(|(mode, n)| (vec![("mode", mode)], n))
                .collect();
            family(
                &mut enc,
                "meshlane_mode_app_differences",
                "App-visible behaviours the probe found different from plain TCP, per mode, on this kernel",
                Gauge,
                &differs,
            )?;
        }

        // Probe: 1 passed, 0 failed; absent when it has not run (or was skipped with --force).
        if let Some(r) = &snap.probe {
            family(
                &mut enc,
                "meshlane_probe_ok",
                "1 if the start-up safety probe passed, 0 if it failed",
                Gauge,
                &[(vec![("kernel", r.kernel.as_str())], u64::from(r.ok))],
            )?;
            let checks: Vec<_> = r
                .checks
                .iter()
                .map(|c| {
                    let status = match c.status {
                        probe::Status::Pass => "pass",
                        probe::Status::Warn => "warn",
                        probe::Status::Fail => "fail",
                        probe::Status::Skip => "skip",
                    };
                    (vec![("check", c.name), ("status", status)], 1)
                })
                .collect();
            family(
                &mut enc,
                "meshlane_probe_check",
                "The probe's verdict per check (value 1; the status is the label)",
                Gauge,
                &checks,
            )?;
        }

        let up: Vec<_> = snap
            .sources
            .iter()
            .map(|(n, h)| (vec![("source", n.as_str())], u64::from(h.healthy)))
            .collect();
        family(
            &mut enc,
            "meshlane_source_up",
            "1 if the discovery source's last read succeeded",
            Gauge,
            &up,
        )?;
        let degraded: Vec<_> = snap
            .sources
            .iter()
            .map(|(n, h)| (vec![("source", n.as_str())], u64::from(h.degraded)))
            .collect();
        family(
            &mut enc,
            "meshlane_source_degraded",
            "1 if the discovery source is throttled (an API server's 429): not failing, last good state kept, retrying",
            Gauge,
            &degraded,
        )?;
        let errs: Vec<_> = snap
            .sources
            .iter()
            .map(|(n, h)| (vec![("source", n.as_str())], h.errors_total))
            .collect();
        family(
            &mut enc,
            "meshlane_source_errors",
            "Failed reads per discovery source (the last good state was kept)",
            Counter,
            &errs,
        )?;
        let ok: Vec<_> = snap
            .sources
            .iter()
            .filter_map(|(n, h)| Some((vec![("source", n.as_str())], unix_secs(h.last_success?))))
            .collect();
        gauge_f64(
            &mut enc,
            "meshlane_source_last_success_timestamp_seconds",
            "Unix time of each source's last successful read",
            &ok,
        )?;
        family(
            &mut enc,
            "meshlane_reconciles",
            "Passes of the policy reconcile loop",
            Counter,
            &[(vec![], snap.reconciles_total)],
        )?;
        family(
            &mut enc,
            "meshlane_unpaired_swept",
            "Sockets removed from the sockhash after waiting for a partner through two sweeps (a stamp no sidecar read): their reads are plain TCP again",
            Counter,
            &[(vec![], snap.unpaired_swept_total)],
        )?;
        family(
            &mut enc,
            "meshlane_memory_tight_pods",
            "Accelerated pods whose memory groups have less room than --memory-headroom: no new pairs, their redirected directions moved to TCP",
            Gauge,
            &[(vec![], snap.memory_tight.len() as u64)],
        )?;
        family(
            &mut enc,
            "meshlane_policy_errors",
            "Policy map writes or removals the kernel refused",
            Counter,
            &[(vec![], snap.policy_errors_total)],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::to_prometheus_text;

    #[test]
    fn counter_families_take_their_sample_names() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{x=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
