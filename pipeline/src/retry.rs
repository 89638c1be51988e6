//! Retry policy for external API calls: exponential backoff with full jitter
//! (AWS Architecture Blog, "Exponential Backoff and Jitter"), never shorter than a
//! server's `Retry-After`, and a bounded number of attempts.

use std::time::Duration;

/// When and how often to retry one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included; then its rows become `failed`.
    pub max_attempts: u32,
    /// Backoff ceiling of the first retry; doubles every retry.
    pub base: Duration,
    /// Largest backoff ceiling.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base: Duration::from_millis(250),
            cap: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `retry` (1 for the first retry): uniform in
    /// `[0, min(cap, base·2^(retry-1))]` scaled by `jitter` (a sample of [0, 1)),
    /// and at least `retry_after`.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(self.cap);
        let backoff = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
        backoff.max(retry_after.unwrap_or(Duration::ZERO))
    }

    /// Whether attempt number `attempt` (1-based) may still be made.
    pub fn allows(&self, attempt: u32) -> bool {
        attempt <= self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_honours_retry_after() {
        let p = RetryPolicy {
            max_attempts: 3,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(5),
        };
        assert_eq!(p.delay(1, None, 1.0), Duration::from_secs(1));
        assert_eq!(p.delay(3, None, 1.0), Duration::from_secs(4));
        assert_eq!(p.delay(9, None, 1.0), Duration::from_secs(5));
        assert_eq!(p.delay(3, None, 0.5), Duration::from_secs(2));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(7)), 0.1),
            Duration::from_secs(7)
        );
        assert!(p.allows(3) && !p.allows(4));
    }
}
