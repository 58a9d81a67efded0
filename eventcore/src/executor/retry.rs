//! Retries: how often, and after how long, a command is tried again.

use std::time::Duration;

use rand::Rng;

#[cfg(doc)]
use crate::error::Error;

/// When and how often the executor repeats a command after a retryable failure
/// ([`Error::VersionConflict`], or a backend error marked retryable).
///
/// The delay before retry `n` (1-based) is drawn uniformly from
/// `[d/2, d]` with `d = min(max_delay, initial_delay * 2^(n-1))` ("equal jitter"), so
/// writers that collided spread out instead of colliding again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_delay: Duration,
    max_delay: Duration,
}

impl RetryPolicy {
    /// The default: 10 attempts, first delay 1 ms, delays capped at 100 ms.
    pub const fn new() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(100),
        }
    }

    /// One attempt, no retry.
    pub const fn no_retries() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        }
    }

    /// Sets the total number of attempts, the first one included (at least 1).
    pub const fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = if max_attempts == 0 { 1 } else { max_attempts };
        self
    }

    /// Sets the delay before the first retry.
    pub const fn with_initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Sets the cap on any single delay.
    pub const fn with_max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// The total number of attempts allowed.
    pub const fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay before the first retry (before jitter).
    pub const fn initial_delay(&self) -> Duration {
        self.initial_delay
    }

    /// The cap on any single delay.
    pub const fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The delay to wait before retry number `retry` (1 for the first retry).
    pub fn delay_before_retry(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(31);
        let ceiling = self
            .initial_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        if ceiling.is_zero() {
            return Duration::ZERO;
        }
        let half = ceiling / 2;
        let nanos = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_within_bounds() {
        let policy = RetryPolicy::new()
            .with_initial_delay(Duration::from_millis(4))
            .with_max_delay(Duration::from_millis(20));
        for _ in 0..100 {
            let first = policy.delay_before_retry(1);
            assert!(first >= Duration::from_millis(2) && first <= Duration::from_millis(4));
            let third = policy.delay_before_retry(3);
            assert!(third >= Duration::from_millis(8) && third <= Duration::from_millis(16));
            let capped = policy.delay_before_retry(30);
            assert!(capped >= Duration::from_millis(10) && capped <= Duration::from_millis(20));
        }
        assert_eq!(
            RetryPolicy::no_retries().delay_before_retry(1),
            Duration::ZERO
        );
        assert_eq!(RetryPolicy::new().with_max_attempts(0).max_attempts(), 1);
    }
}
