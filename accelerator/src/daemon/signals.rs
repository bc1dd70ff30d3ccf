//! The signals the daemon answers: SIGTERM and SIGINT stop it, SIGHUP asks for a pass now
//! (the pod list file re-read). Installed first thing, so a signal that arrives during the
//! start-up probe is kept and acted on when the loop starts, not lost or fatal.

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Needs the runtime (its signal driver): called from inside it.
    pub fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("install signal handler")?,
            int: signal(SignalKind::interrupt()).context("install signal handler")?,
            hup: signal(SignalKind::hangup()).context("install SIGHUP handler")?,
        })
    }

    /// The next signal. Cancel-safe: a signal not yet returned stays pending. A stop wins
    /// over a SIGHUP that arrived with it.
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            biased;
            Some(()) = self.term.recv() => Signal::Stop,
            Some(()) = self.int.recv() => Signal::Stop,
            Some(()) = self.hup.recv() => Signal::Reload,
            // Every stream ended: only when the runtime itself is going away.
            else => std::future::pending().await,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP.
    Reload,
}
