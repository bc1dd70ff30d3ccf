//! What the relay suite measures (written by `relay.rs`, read by `report.rs`).

use crate::{measure::Percentiles, progstats::ProgCost};

/// The scenarios, in the order each round runs them: no meshlane program loaded, then the
/// datapath loaded and attached with both pods listed.
pub const SCENARIOS: [&str; 2] = ["plain", "meshlane"];

/// One scenario's measurements in one round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Round {
    pub scenario: &'static str,
    pub round: usize,
    pub rtt: Percentiles,
    pub connect: Percentiles,
    pub pairs: u64,
    pub redirected_bytes: u64,
    /// Blocking reads of the ping-pong and connect cycles that returned EAGAIN and were retried
    /// (a socket in a sockhash can do that; plain TCP never does).
    pub eagain_retries: u64,
    /// meshlane rounds: what each program cost during the ping-pong (per round trip) and
    /// during the connect cycles (per connect+exchange+close), as the kernel measured it.
    pub pingpong_progs: Vec<ProgCost>,
    pub connect_progs: Vec<ProgCost>,
}
