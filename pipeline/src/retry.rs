//! Retries of a provider's requests: the policy (exponential backoff with full
//! jitter, AWS Architecture Blog "Exponential Backoff and Jitter", never shorter
//! than a server's `Retry-After`, a bounded number of attempts) and the
//! accounting of one batch's requests ([`Tries`]): what counts as a retry, as
//! throttled, and how many attempts a coordinate has left.
//!
//! A 429 is the server asking for patience, not a fault: it does not count as
//! an attempt, but against an allowance four times larger, and its wait pauses
//! every shard of the import (through the quota) instead of only this one.

use std::time::Duration;

use crate::provider::CallError;

/// 429s one batch may meet, per attempt of [`RetryPolicy::max_attempts`], before it fails.
const THROTTLES_PER_ATTEMPT: u32 = 4;

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

    /// Whether a coordinate that a response left out, after `requests` requests
    /// for it in all, is asked again (stays pending) rather than `failed`.
    pub fn asks_again(&self, requests: i32) -> bool {
        (requests as u32) < self.max_attempts
    }
}

/// What to do after a failed request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Send it again after `wait`; `pause_all` is a 429's wait, for every shard
    /// of the import (the quota's pause) rather than this one alone.
    Retry {
        wait: Duration,
        pause_all: Option<Duration>,
    },
    /// Stop: the batch's coordinates fail with this error.
    GiveUp,
}

/// The requests of one batch: sent, throttled, retried.
#[derive(Debug, Clone)]
pub struct Tries {
    policy: RetryPolicy,
    /// Requests sent.
    sent: u32,
    /// Of those, answered 429.
    throttled: u32,
    /// Failures followed by another request.
    retries: u32,
}

impl Tries {
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            sent: 0,
            throttled: 0,
            retries: 0,
        }
    }

    /// A request is being sent.
    pub fn sent(&mut self) {
        self.sent += 1;
    }

    /// The last request sent failed with `err`; `jitter` is a sample of [0, 1)
    /// that scales the backoff. Decides whether and when to send it again.
    pub fn failed(&mut self, err: &CallError, jitter: f64) -> Verdict {
        let verdict = match err {
            CallError::Permanent(_) => Verdict::GiveUp,
            CallError::Throttled { retry_after } => {
                self.throttled += 1;
                if self.throttled > self.policy.max_attempts * THROTTLES_PER_ATTEMPT {
                    Verdict::GiveUp
                } else {
                    let pause = self.policy.delay(self.throttled, *retry_after, jitter);
                    Verdict::Retry {
                        wait: Duration::ZERO,
                        pause_all: Some(pause),
                    }
                }
            }
            CallError::Transient(_) if !self.policy.allows(self.attempts() + 1) => Verdict::GiveUp,
            CallError::Transient(_) => Verdict::Retry {
                wait: self.policy.delay(self.attempts(), None, jitter),
                pause_all: None,
            },
        };
        if matches!(verdict, Verdict::Retry { .. }) {
            self.retries += 1;
        }
        verdict
    }

    /// Requests sent that count as attempts (all but the 429s).
    pub fn attempts(&self) -> u32 {
        self.sent - self.throttled
    }

    /// Requests sent, 429s included: what each coordinate of the batch is charged.
    pub fn requests(&self) -> u32 {
        self.sent
    }

    /// Requests answered 429.
    pub fn throttled(&self) -> u32 {
        self.throttled
    }

    /// Failed requests that were sent again (429s included).
    pub fn retries(&self) -> u32 {
        self.retries
    }
}

/// A retry budget, after gRPC's retry throttling: over any `window`, the
/// retries one enricher sends stay within `ratio` of its requests (at least
/// `floor` retries, so a small import still gets its attempts). A retry over
/// budget is not dropped (its rows would fail) but waits until it fits, so a
/// failing or slow server sees few re-sent requests, never a storm.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    window: Duration,
    ratio: f64,
    floor: u32,
    /// Requests sent within the window: (when, whether a retry), oldest first.
    sent: std::collections::VecDeque<(tokio::time::Instant, bool)>,
}

impl Default for RetryBudget {
    /// Retries at most 10 % of requests over 60 s, at least 10.
    fn default() -> Self {
        Self::new(Duration::from_secs(60), 0.1, 10)
    }
}

impl RetryBudget {
    pub fn new(window: Duration, ratio: f64, floor: u32) -> Self {
        Self {
            window,
            ratio,
            floor,
            sent: Default::default(),
        }
    }

    fn forget_before(&mut self, now: tokio::time::Instant) {
        while self
            .sent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= self.window)
        {
            self.sent.pop_front();
        }
    }

    /// A request is sent at `now`; `retry` when it re-sends a failed one.
    pub fn sent(&mut self, now: tokio::time::Instant, retry: bool) {
        self.forget_before(now);
        self.sent.push_back((now, retry));
    }

    /// How long a retry must wait at `now` to fit the budget (zero when it fits).
    pub fn wait_for_retry(&mut self, now: tokio::time::Instant) -> Duration {
        self.forget_before(now);
        let requests = self.sent.len() as f64 + 1.0;
        let allowed = (requests * self.ratio).floor().max(f64::from(self.floor)) as usize;
        let retries: Vec<_> = self.sent.iter().filter(|(_, r)| *r).map(|(t, _)| *t).collect();
        if retries.len() < allowed {
            return Duration::ZERO;
        }
        // Wait until enough retries have left the window for one more to fit.
        let leaving = retries[retries.len() - allowed];
        (leaving + self.window).saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_budget_allows_the_floor_then_a_tenth_and_waits_for_the_window() {
        let t0 = tokio::time::Instant::now();
        let mut b = RetryBudget::new(Duration::from_secs(60), 0.1, 2);
        for _ in 0..2 {
            assert_eq!(b.wait_for_retry(t0), Duration::ZERO);
            b.sent(t0, true);
        }
        // a third retry waits until the first leaves the 60 s window
        assert_eq!(
            b.wait_for_retry(t0 + Duration::from_secs(10)),
            Duration::from_secs(50)
        );
        // 30 requests in the window allow 3 retries
        for _ in 0..28 {
            b.sent(t0 + Duration::from_secs(20), false);
        }
        assert_eq!(b.wait_for_retry(t0 + Duration::from_secs(20)), Duration::ZERO);
        assert_eq!(b.wait_for_retry(t0 + Duration::from_secs(61)), Duration::ZERO);
    }

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(5),
        }
    }

    fn transient() -> CallError {
        CallError::Transient("HTTP 503".into())
    }

    fn throttled(retry_after: Option<u64>) -> CallError {
        CallError::Throttled {
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_honours_retry_after() {
        let p = policy(3);
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

    #[test]
    fn transient_failures_retry_with_growing_backoff_until_the_attempts_are_spent() {
        let mut t = Tries::new(policy(3));
        let mut waits = vec![];
        loop {
            t.sent();
            match t.failed(&transient(), 1.0) {
                Verdict::Retry { wait, pause_all } => {
                    assert_eq!(pause_all, None, "a 5xx waits alone");
                    waits.push(wait.as_secs());
                }
                Verdict::GiveUp => break,
            }
        }
        assert_eq!(waits, [1, 2], "3 attempts: 2 retries, backoff 1 s then 2 s");
        assert_eq!(
            (t.requests(), t.attempts(), t.retries(), t.throttled()),
            (3, 3, 2, 0)
        );
    }

    #[test]
    fn a_permanent_error_gives_up_at_once() {
        let mut t = Tries::new(policy(8));
        t.sent();
        assert_eq!(
            t.failed(&CallError::Permanent("HTTP 400".into()), 0.5),
            Verdict::GiveUp
        );
        assert_eq!((t.requests(), t.retries()), (1, 0));
    }

    #[test]
    fn throttles_pause_every_shard_and_do_not_spend_attempts() {
        let mut t = Tries::new(policy(2));
        t.sent();
        // The pause is the backoff of the nth 429, or Retry-After when longer.
        assert_eq!(
            t.failed(&throttled(Some(3)), 0.0),
            Verdict::Retry {
                wait: Duration::ZERO,
                pause_all: Some(Duration::from_secs(3))
            }
        );
        t.sent();
        assert_eq!(
            t.failed(&throttled(None), 1.0),
            Verdict::Retry {
                wait: Duration::ZERO,
                pause_all: Some(Duration::from_secs(2))
            }
        );
        // Two 429s cost no attempt: a 5xx still gets its one retry of two attempts,
        // with the backoff of a first retry.
        t.sent();
        assert_eq!(t.attempts(), 1);
        assert_eq!(
            t.failed(&transient(), 1.0),
            Verdict::Retry {
                wait: Duration::from_secs(1),
                pause_all: None
            }
        );
        t.sent();
        assert_eq!(t.failed(&transient(), 1.0), Verdict::GiveUp);
        assert_eq!(
            (t.requests(), t.attempts(), t.throttled(), t.retries()),
            (4, 2, 2, 3)
        );
    }

    #[test]
    fn throttles_give_up_after_four_per_attempt() {
        let mut t = Tries::new(policy(2));
        for n in 1..=8 {
            t.sent();
            assert!(
                matches!(t.failed(&throttled(None), 0.0), Verdict::Retry { .. }),
                "429 number {n}"
            );
        }
        t.sent();
        assert_eq!(t.failed(&throttled(None), 0.0), Verdict::GiveUp);
        assert_eq!(
            (t.requests(), t.throttled(), t.retries(), t.attempts()),
            (9, 9, 8, 0)
        );
    }

    #[test]
    fn a_coordinate_left_out_is_asked_again_while_attempts_remain() {
        let p = policy(3);
        assert!(p.asks_again(2));
        assert!(!p.asks_again(3));
        assert!(!p.asks_again(i32::MAX));
    }
}
