//! Reconnect delays: capped exponential backoff with jitter, so a coordinator restart is not
//! met by every agent of a cluster on the same millisecond.

use std::time::Duration;

/// Backoff settings.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    /// Fraction of the delay that is randomized away (0.0–1.0).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_millis(250), cap: Duration::from_secs(30), jitter: 0.5 }
    }
}

impl Backoff {
    /// The delay before reconnect attempt `attempt` (0-based), with `unit` a uniform random
    /// number in [0, 1) that picks the jitter.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = self.base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX));
        let capped = exp.min(self.cap);
        let keep = 1.0 - self.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0);
        capped.mul_f64(keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn delays_double_until_the_cap() {
        let b = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(2), jitter: 0.0 };
        let d: Vec<u128> = (0..8).map(|a| b.delay(a, 0.5).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    proptest! {
        #[test]
        fn delays_stay_within_jitter_and_cap(attempt in 0u32..1000, unit in 0.0f64..1.0) {
            let b = Backoff::default();
            let d = b.delay(attempt, unit);
            prop_assert!(d <= b.cap);
            let full = b.delay(attempt, 0.0);
            prop_assert!(d >= full.mul_f64(1.0 - b.jitter) - Duration::from_nanos(1));
        }
    }
}
