//! The periodic sweep of ends that will never pair ([`Datapath::sweep_unpaired`]): a socket
//! still waiting for a partner at its second sweep leaves the sockhash, so its reads are plain
//! TCP.
//!
//! [`Datapath::sweep_unpaired`]: crate::datapath::Datapath::sweep_unpaired

use std::time::{Duration, Instant};

use crate::telemetry::Shared;

pub struct Sweep {
    every: Duration,
    last: Option<Instant>,
    waiting: std::collections::BTreeSet<(meshlane_common::PairKey, u64)>,
}

impl Sweep {
    pub fn new(every: Duration) -> Sweep {
        Sweep {
            every,
            last: None,
            waiting: Default::default(),
        }
    }

    /// When the next sweep is due (at once before the first).
    pub fn next_due(&self) -> Instant {
        self.last.map_or_else(Instant::now, |t| t + self.every)
    }

    /// Sweeps when due; the daemon calls it every turn of its loop.
    pub fn maybe_run(&mut self, shared: &Shared) {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        self.last = Some(Instant::now());
        let result = match shared.datapath().as_ref() {
            Some(dp) => dp.sweep_unpaired(&self.waiting),
            None => return,
        };
        match result {
            Ok((waiting, removed)) => {
                self.waiting = waiting;
                if removed > 0 {
                    tracing::info!(
                        removed,
                        "sweep: sockets that waited for a partner through two sweeps left the sockhash (stamped connections no sidecar read)"
                    );
                    shared.write().unpaired_swept_total += removed as u64;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "sweep of unpaired sockets failed; retried at the next")
            }
        }
    }
}
