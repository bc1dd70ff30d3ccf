//! The reconcile loop, as one task on the daemon's runtime. It sleeps until something is due:
//! an ask from a source that learns of changes by itself (the watch, an xDS stream), SIGHUP,
//! the resync, the memory guard's next pass, the sweep; or until a stop signal ends it. No
//! fixed-period polling: an idle daemon wakes only for its heartbeat.
//!
//! The heartbeat (`Shared::beat`, read by `/healthz`) is written at every turn, and a turn
//! waits for its passes: a pass that hangs (an `iptables-save` that never returns, a wedged
//! map write) stops the beats, and `/healthz` fails as it did when the loop was a thread.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    check_memory,
    memory_guard::MemoryGuard,
    reconcile,
    signals::{Signal, Signals},
    sweep::Sweep,
};
use crate::{discovery::Wake, telemetry::Shared};

/// How often an idle loop turns anyway, so the heartbeat proves it is alive (`/healthz` fails
/// after 30 s without one).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// What the loop's passes own between turns.
pub struct Passes {
    pub sources: super::Sources,
    pub memory: MemoryGuard,
    pub sweep: Sweep,
    /// `--resync`: the longest a reconcile waits when nothing asks for one.
    pub resync: Duration,
    /// The next reconcile not asked for (at once at start).
    pub next_reconcile: Instant,
}

impl Passes {
    /// The earliest moment a pass is due without being asked for.
    fn next_due(&self) -> Instant {
        let mut due = self.next_reconcile.min(self.sweep.next_due());
        if let Some(m) = self.memory.next_due() {
            due = due.min(m);
        }
        due
    }

    /// One turn: the memory guard and the sweep when due, a reconcile when asked for, when
    /// the resync is up, or when the set of memory-tight pods changed.
    fn turn(&mut self, shared: &Shared, asked: bool) {
        if check_memory(shared, &mut self.memory) {
            // The policy map follows at once; the fast path above already moved the
            // directions of newly tight pods.
            self.next_reconcile = Instant::now();
        }
        if asked || Instant::now() >= self.next_reconcile {
            let started = Instant::now();
            reconcile(shared, &mut self.sources);
            shared
                .timings
                .reconcile
                .observe(started.elapsed().as_secs_f64());
            self.next_reconcile = Instant::now() + self.resync;
        }
        self.sweep.maybe_run(shared);
    }
}

/// Turns until SIGTERM or SIGINT; returns then, with the passes' state dropped.
pub async fn run(
    shared: Arc<Shared>,
    mut passes: Passes,
    wake: Wake,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    loop {
        shared.beat();
        let due = passes.next_due();
        let idle = Instant::now() + HEARTBEAT;
        // Biased: a stop wins over any pass that is due at the same time, as when the loop
        // checked its stop flag first.
        let asked = tokio::select! {
            biased;
            signal = signals.next() => match signal {
                Signal::Stop => return Ok(()),
                Signal::Reload => true,
            },
            () = wake.notified() => true,
            () = tokio::time::sleep_until(due.min(idle).into()) => false,
        };
        if !asked && Instant::now() < due {
            // Only the heartbeat: beat at the top of the loop, nothing to run.
            continue;
        }
        let on_pool = Arc::clone(&shared);
        passes = off_the_workers(move || {
            passes.turn(&on_pool, asked);
            passes
        })
        .await?;
    }
}

/// Runs blocking work (reading /proc, running `iptables-save`, map writes: milliseconds to
/// seconds) on the runtime's blocking pool and waits for it, so the servers, the watch and the
/// xDS streams keep their workers meanwhile. `spawn_blocking` rather than `block_in_place`: the
/// loop is the one owner of its state, so moving it to the pool and back costs nothing, and it
/// works on any runtime (`block_in_place` panics on a current-thread one) without taking a
/// worker out of the runtime for the length of a pass.
pub async fn off_the_workers<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(t) => Ok(t),
        // A panic in a pass is a bug: it ends the daemon, as it did when the loop ran on the
        // main thread (the supervisor restarts it; the datapath stays pinned meanwhile).
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(anyhow::anyhow!("a daemon pass did not run: {e}")),
    }
}
