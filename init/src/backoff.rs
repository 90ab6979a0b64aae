//! Restart backoff: exponential, with a cap, reset once a service has run long enough.

use std::time::Duration;

/// The restart delay policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// The longest delay.
    pub cap: Duration,
    /// A run at least this long resets the failure count.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            cap: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before restart number `failures` (1 for the first failure): initial × 2^(n-1),
    /// at most `cap`.
    pub fn delay(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(30);
        self.initial
            .checked_mul(1u32 << shift)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The failure count after a run of `ran` that ended in a failure, given the previous count.
    pub fn next_failures(&self, previous: u32, ran: Duration) -> u32 {
        if ran >= self.reset_after {
            1
        } else {
            previous.saturating_add(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let b = Backoff::default();
        let ms: Vec<u128> = (1..=10).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(
            ms,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(b.delay(u32::MAX), b.cap);
    }

    #[test]
    fn a_long_run_resets_the_count() {
        let b = Backoff::default();
        assert_eq!(b.next_failures(5, Duration::from_secs(1)), 6);
        assert_eq!(b.next_failures(5, Duration::from_secs(60)), 1);
    }
}
