//! What the Envoy suite measures (written by `suite.rs`, read by `summary.rs` and `hdrlog.rs`).

use crate::{daemon::Counters, progstats::ProgCost, workload::Measured};

/// The scenarios: A no mesh, B Envoy sidecars, C B plus the meshlane daemon (`suite.rs`).
pub const SCENARIOS: [&str; 3] = ["A", "B", "C"];

/// One workload in one scenario round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub round: usize,
    pub workload: String,
    #[serde(flatten)]
    pub measured: Measured,
    /// CPU (user+system) of client, sidecars, server apps and daemon, per request, in µs.
    pub cpu_us_per_req: f64,
    /// C only: what the daemon's counters moved by during this workload.
    pub counters: Option<Counters>,
    /// C only: false when the counters show the workload was not accelerated as its mode
    /// claims (row discarded; `proof.rs`).
    pub accelerated: bool,
    /// C only: why the row was discarded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub proof_failures: Vec<String>,
    /// C only: runs and time of each of the daemon's BPF programs during this workload (kernel
    /// bpf_stats); empty when the round's programs could not be told apart from another copy's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prog: Vec<ProgCost>,
    /// C only: the mode the daemon decided (`meshlane status`), which `--mode auto` leaves to
    /// the probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// One C round's BPF program cost from the daemon ready to just before it stopped (workloads
/// and what ran between them, such as the `/metrics` reads).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundProgCost {
    pub round: usize,
    pub prog: Vec<ProgCost>,
}
