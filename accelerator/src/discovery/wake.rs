//! How sources that learn of changes by themselves (the Kubernetes watch, the xDS streams) ask
//! the daemon's reconcile loop for a pass now rather than at the next resync. A
//! `tokio::sync::Notify`, so the loop sleeps until asked instead of polling a flag; asks made
//! while a pass runs coalesce into one more pass, never into none.

use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Clone, Debug, Default)]
pub struct Wake(Arc<Notify>);

impl Wake {
    /// Asks for a pass. Never blocks: called from tasks and plain threads alike.
    pub fn notify(&self) {
        // notify_one keeps one permit when nobody waits: an ask is never lost.
        self.0.notify_one();
    }

    /// Returns once asked (at once when an ask came since the last return). Cancel-safe: an
    /// ask that reaches a dropped wait is kept for the next.
    pub async fn notified(&self) {
        self.0.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_coalesce_and_are_kept_until_waited_for() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let wake = Wake::default();
        let waited = |w: &Wake| {
            rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_millis(20), w.notified())
                    .await
                    .is_ok()
            })
        };
        assert!(!waited(&wake), "nothing asked yet");
        wake.notify();
        wake.clone().notify();
        assert!(waited(&wake), "an ask before the wait is kept");
        assert!(!waited(&wake), "two asks make one pass");
    }
}
