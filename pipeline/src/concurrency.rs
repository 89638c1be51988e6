//! Requests in flight to an upstream API: a limit shared by every import,
//! shard and process on the database, adjusted to the latency the clients
//! observe, and timeouts that track that latency.
//!
//! A rate quota ([`crate::quota`]) does not protect a slow server: at 10
//! coordinates/s, four shards each sending 100 coordinates keep it busy for
//! 40 s whatever the rate, and a client that gives up and asks again only adds
//! work (the server goes on with requests whose client has left). So each
//! request also holds a lease on one unit of the API's concurrency limit
//! ([`Concurrency::acquire`]), and the limit follows TCP Vegas (Brakmo and
//! Peterson 1995; as Netflix's concurrency-limits `VegasLimit` applies it to
//! requests): with `L` requests allowed, the latency `rtt` of an answer and the
//! smallest latency seen `min`, the requests queued at the server are about
//! `L · (1 − min / rtt)` ([`next_limit`]). Fewer than [`ALPHA`] queued: the
//! limit grows by one (only while it is being used, so an idle or rate-bound
//! client does not grow a limit it would later flood the server with); more
//! than [`BETA`]: it shrinks by one; a timeout halves it. It stays within
//! [`MIN_LIMIT`]`..=`[`MAX_LIMIT`].
//!
//! Timeouts ([`Timeouts`]) are three times the 90th percentile of this
//! process's last [`LATENCY_WINDOW`] latencies, at least [`MIN_TIMEOUT`] and at
//! most the configured maximum (`--timeout-s`), doubled for each timeout in a
//! row; until [`MIN_SAMPLES`] latencies are known, the maximum. (A percentile
//! of a few samples misleads: a shard whose first answer came from the front
//! of the server's queue timed its next request out at the back of it, 100
//! coordinates of wasted work in 1,097 in a test.) A request that timed out keeps its lease for one more timeout (the
//! server is presumably still working on it), and its retry waits as long,
//! so timed-out work is never sent again while the server is busy with it.
//!
//! The baseline `min` is the database's, shared by all clients of the API; it
//! drifts up by [`MIN_DRIFT`] per answer slower than it, so a server that got
//! permanently slower (other tenants, a bigger dataset) is not judged forever
//! against one fast early answer.

use std::{collections::VecDeque, time::Duration};

use crate::store::Store;

/// The concurrency limit of an API no client has adjusted yet (the default
/// number of shards: each may have one request in flight).
pub const INITIAL_LIMIT: f64 = 4.0;
/// The limit never goes below one request in flight.
pub const MIN_LIMIT: f64 = 1.0;
/// Nor above this many.
pub const MAX_LIMIT: f64 = 64.0;
/// Fewer requests than this queued at the server: the limit grows.
pub const ALPHA: f64 = 2.0;
/// More requests than this queued at the server: the limit shrinks.
pub const BETA: f64 = 4.0;
/// The shared smallest latency rises by this factor per slower answer.
pub const MIN_DRIFT: f64 = 1.01;
/// Latencies a client keeps for its timeout.
pub const LATENCY_WINDOW: usize = 64;
/// Latencies a client needs before its timeout follows them.
pub const MIN_SAMPLES: usize = 16;
/// The shortest timeout, whatever the latencies.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A lease whose holder vanished (a killed pod) ends this long after its
/// request's timeout.
pub const LEASE_GRACE: Duration = Duration::from_secs(30);

/// Where an enricher's requests go and how long one may take at most.
#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrencyConfig {
    /// The API's base URL (its key in `api_quotas`, like the quota's).
    pub api_url: String,
    /// The longest request timeout (`--timeout-s`).
    pub max_timeout: Duration,
}

/// How a request held under a lease ended, for the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ended {
    /// Answered (any HTTP status but a timeout) after this many seconds.
    Answered { latency_s: f64 },
    /// Given up after its timeout.
    TimedOut,
}

/// The Vegas rule (module docs): the new limit after a request that ended as
/// `ended`, with `limit` allowed, `min_latency_s` the baseline (after this
/// answer) and `in_flight` the leases held when the request was sent (itself
/// included).
pub fn next_limit(limit: f64, min_latency_s: f64, ended: Ended, in_flight: i64) -> f64 {
    let next = match ended {
        Ended::TimedOut => limit / 2.0,
        Ended::Answered { latency_s } => {
            let queued = limit * (1.0 - min_latency_s / latency_s.max(1e-6));
            if queued > BETA {
                limit - 1.0
            } else if queued < ALPHA && in_flight as f64 * 2.0 >= limit {
                limit + 1.0
            } else {
                limit
            }
        }
    };
    next.clamp(MIN_LIMIT, MAX_LIMIT)
}

/// The shared baseline after an answer of `latency_s` (module docs).
pub fn next_min_latency(min_latency_s: Option<f64>, latency_s: f64) -> f64 {
    match min_latency_s {
        Some(m) if m <= latency_s => (m * MIN_DRIFT).min(latency_s),
        _ => latency_s,
    }
}

/// One client's request timeouts, from its recent latencies (module docs).
#[derive(Debug, Clone)]
pub struct Timeouts {
    max: Duration,
    latencies: VecDeque<f64>,
    timed_out_in_a_row: u32,
}

impl Timeouts {
    /// `max`: the longest timeout (`--timeout-s`), also the one used until
    /// [`MIN_SAMPLES`] latencies are known.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            latencies: VecDeque::with_capacity(LATENCY_WINDOW),
            timed_out_in_a_row: 0,
        }
    }

    /// The timeout of the next request.
    pub fn current(&self) -> Duration {
        let floor = MIN_TIMEOUT.min(self.max);
        let base = match self.p90() {
            None => self.max,
            Some(p90) => Duration::from_secs_f64(3.0 * p90).clamp(floor, self.max),
        };
        base.saturating_mul(1 << self.timed_out_in_a_row.min(16))
            .min(self.max)
    }

    /// Records how a request ended.
    pub fn record(&mut self, ended: Ended) {
        match ended {
            Ended::TimedOut => self.timed_out_in_a_row += 1,
            Ended::Answered { latency_s } => {
                self.timed_out_in_a_row = 0;
                if self.latencies.len() == LATENCY_WINDOW {
                    self.latencies.pop_front();
                }
                self.latencies.push_back(latency_s);
            }
        }
    }

    fn p90(&self) -> Option<f64> {
        if self.latencies.len() < MIN_SAMPLES {
            return None;
        }
        let mut v: Vec<f64> = self.latencies.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let i = ((v.len() as f64 * 0.9).ceil() as usize).clamp(1, v.len()) - 1;
        Some(v[i])
    }
}

/// A lease on one unit of an API's concurrency limit (a row of `api_leases`).
#[derive(Debug)]
#[must_use]
pub struct Lease {
    id: i64,
    /// Leases held when this one was taken, itself included.
    in_flight: i64,
}

/// One enricher's side of an API's concurrency limit.
pub struct Concurrency<'a> {
    store: &'a Store,
    api_url: String,
    timeouts: Timeouts,
    /// Leases refused in a row (for the wait before asking again).
    refused: u32,
}

impl<'a> Concurrency<'a> {
    pub fn new(store: &'a Store, cfg: &ConcurrencyConfig) -> Self {
        Self {
            store,
            api_url: cfg.api_url.clone(),
            timeouts: Timeouts::new(cfg.max_timeout),
            refused: 0,
        }
    }

    /// The timeout of the next request.
    pub fn timeout(&self) -> Duration {
        self.timeouts.current()
    }

    /// Waits for a lease: while the API has as many requests in flight as its
    /// limit, asks again after a short wait (25 ms doubling to 400 ms, with
    /// jitter), as a lease may end in any process.
    pub async fn acquire(&mut self) -> anyhow::Result<Lease> {
        loop {
            let hold = self.timeout() + LEASE_GRACE;
            if let Some((id, in_flight)) = self.store.take_lease(&self.api_url, hold).await? {
                self.refused = 0;
                return Ok(Lease { id, in_flight });
            }
            let ceiling = 25u64 << self.refused.min(4);
            self.refused += 1;
            let wait = ceiling / 2 + (rand::random::<u64>() % (ceiling / 2 + 1));
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }

    /// Ends a lease whose request got an answer (whatever its HTTP status)
    /// `latency` after it was sent: records the latency, adjusts the API's
    /// limit, frees the lease.
    pub async fn answered(&mut self, lease: Lease, latency: Duration) -> anyhow::Result<()> {
        let ended = Ended::Answered {
            latency_s: latency.as_secs_f64(),
        };
        self.timeouts.record(ended);
        self.store
            .adjust_limit(&self.api_url, ended, lease.in_flight)
            .await?;
        self.store.end_lease(lease.id, Duration::ZERO).await
    }

    /// Ends a lease whose request timed out after `timeout`: halves the API's
    /// limit and keeps the lease for one more timeout (the server is still
    /// busy with the request). Returns how long the retry should wait.
    pub async fn timed_out(&mut self, lease: Lease, timeout: Duration) -> anyhow::Result<Duration> {
        self.timeouts.record(Ended::TimedOut);
        self.store
            .adjust_limit(&self.api_url, Ended::TimedOut, lease.in_flight)
            .await?;
        self.store.end_lease(lease.id, timeout).await?;
        Ok(timeout)
    }

    /// Ends a lease whose request failed without an answer or a timeout (a
    /// refused connection): no latency to learn from.
    pub async fn failed(&mut self, lease: Lease) -> anyhow::Result<()> {
        self.store.end_lease(lease.id, Duration::ZERO).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER_AT_BASELINE: Ended = Ended::Answered { latency_s: 1.0 };

    #[test]
    fn the_limit_grows_only_while_used_and_the_server_does_not_queue() {
        assert_eq!(next_limit(4.0, 1.0, ANSWER_AT_BASELINE, 4), 5.0);
        assert_eq!(
            next_limit(4.0, 1.0, ANSWER_AT_BASELINE, 1),
            4.0,
            "an idle limit stays"
        );
        assert_eq!(next_limit(MAX_LIMIT, 1.0, ANSWER_AT_BASELINE, 64), MAX_LIMIT);
    }

    #[test]
    fn queueing_at_the_server_shrinks_the_limit_and_a_timeout_halves_it() {
        // 8 allowed, answers at 4× the baseline: 6 queued > BETA.
        assert_eq!(next_limit(8.0, 1.0, Ended::Answered { latency_s: 4.0 }, 8), 7.0);
        // 4 allowed, 4 s at a 1 s baseline: 3 queued, between ALPHA and BETA.
        assert_eq!(next_limit(4.0, 1.0, Ended::Answered { latency_s: 4.0 }, 4), 4.0);
        assert_eq!(next_limit(8.0, 1.0, Ended::TimedOut, 8), 4.0);
        assert_eq!(next_limit(1.0, 1.0, Ended::TimedOut, 1), MIN_LIMIT);
    }

    #[test]
    fn the_baseline_is_the_smallest_latency_and_drifts_up_slowly() {
        assert_eq!(next_min_latency(None, 3.0), 3.0);
        assert_eq!(next_min_latency(Some(3.0), 2.0), 2.0);
        assert!((next_min_latency(Some(2.0), 5.0) - 2.0 * MIN_DRIFT).abs() < 1e-12);
        assert_eq!(next_min_latency(Some(2.0), 2.01), 2.01);
    }

    #[test]
    fn timeouts_track_three_times_the_p90_within_bounds_and_double_per_timeout() {
        let mut t = Timeouts::new(Duration::from_secs(120));
        assert_eq!(t.current(), Duration::from_secs(120), "no latency known yet");
        for _ in 0..MIN_SAMPLES - 10 {
            t.record(Ended::Answered { latency_s: 0.5 });
        }
        assert_eq!(t.current(), Duration::from_secs(120), "too few latencies known");
        for i in 1..=10 {
            t.record(Ended::Answered {
                latency_s: f64::from(i),
            });
        }
        assert_eq!(t.current(), Duration::from_secs(27), "3 × p90 (9 s)");
        t.record(Ended::TimedOut);
        assert_eq!(t.current(), Duration::from_secs(54));
        t.record(Ended::TimedOut);
        assert_eq!(t.current(), Duration::from_secs(108));
        t.record(Ended::TimedOut);
        assert_eq!(t.current(), Duration::from_secs(120), "never past the maximum");
        t.record(Ended::Answered { latency_s: 0.1 });
        assert_eq!(t.current(), Duration::from_secs(27));
        let mut fast = Timeouts::new(Duration::from_secs(120));
        for _ in 0..MIN_SAMPLES {
            fast.record(Ended::Answered { latency_s: 0.2 });
        }
        assert_eq!(fast.current(), MIN_TIMEOUT);
        let short = Timeouts::new(Duration::from_secs(5));
        assert_eq!(
            short.current(),
            Duration::from_secs(5),
            "a maximum below the floor wins"
        );
    }
}
