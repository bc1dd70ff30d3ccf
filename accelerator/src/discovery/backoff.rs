//! Reconnect backoff for the sources that hold streams (the Kubernetes watch, xDS): the step
//! doubles from a floor to a cap and starts over after a success, and each wait is a random 50
//! to 100% of its step, so daemons that lost the same control plane together (every node of a
//! cluster, when the API server or istiod comes back) do not all reconnect in the same instant.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    time::Duration,
};

#[derive(Clone, Debug)]
pub struct Backoff {
    floor: Duration,
    cap: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(floor: Duration, cap: Duration) -> Backoff {
        Backoff {
            floor,
            cap: cap.max(floor),
            step: floor,
        }
    }

    /// After a success: the next failure waits about the floor again.
    pub fn reset(&mut self) {
        self.step = self.floor;
    }

    /// How long to wait before the next attempt; the step after it doubles (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.cap);
        step.mul_f64(0.5 + 0.5 * unit_random())
    }
}

/// A number in [0, 1]. `RandomState` is seeded from the OS once per process and advanced for
/// each instance, which is all a jitter needs (no cryptographic quality, no extra crate).
fn unit_random() -> f64 {
    let bits = RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_to_the_cap_with_jitter_and_start_over_after_success() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(800));
        let mut seen = Vec::new();
        for step in [100, 200, 400, 800, 800] {
            let d = b.next_delay();
            assert!(d >= ms(step / 2) && d <= ms(step), "{d:?} for step {step}");
            seen.push(d);
        }
        b.reset();
        let d = b.next_delay();
        assert!(d >= ms(50) && d <= ms(100), "{d:?} after reset");
        // Not one fixed fraction: forty draws at the cap are not all the same.
        let mut b = Backoff::new(ms(800), ms(800));
        let draws: std::collections::BTreeSet<_> = (0..40).map(|_| b.next_delay()).collect();
        assert!(draws.len() > 1, "{draws:?}");
    }
}
