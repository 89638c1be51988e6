//! The import's request quota, shared by all its shards through the database:
//! [`Quota::acquire`] waits for the next request slot, [`Quota::pause`] holds
//! every shard back after a 429.
//!
//! A reservation scheme (GCRA-like): each request reserves the next free slot
//! `at = max(now, next_at, paused_until)` and moves `next_at` one interval on
//! ([`reserve`]; the store's `reserve` runs the same rule as one atomic
//! statement); the requester sleeps until `at`. A shard that finishes early
//! simply stops reserving, leaving its share to the rest. A 429's
//! `Retry-After` moves `paused_until`, which every shard's next reservation
//! honours. The optional budget (`max_requests`) is checked in the same
//! statement; a slot given back returns to the budget.
//!
//! Why no one-second window holds more than `rps` requests: a request is sent
//! only if it leaves within [`LATE_TOLERANCE_S`] of its slot, counting the
//! reservation's own round trip (the slot's clock is read somewhere inside
//! it); a later sender gives the slot back and reserves another. Every send therefore lies
//! in `[slot, slot + tolerance]`, so a window `[t, t + 1 s)` can only hold
//! sends of slots in `(t - tolerance, t + 1 s)`, an interval of `1 s + tolerance`.
//! With slots `SPACING_MARGIN / rps` apart, that interval holds at most `rps`
//! slots when `SPACING_MARGIN > 1 + tolerance`; the rest of the margin (65 ms)
//! absorbs the variation between sending and the server's arrival clock. (A
//! 4 % margin, 25 ms of slack, once let 1 request in 579 through as a 429 at
//! 20 rps while the machine's load average was 6 on 2 cores.) (A
//! test on a loaded machine once saw 21 in a second at 20 rps when the
//! reservation's round trip was not counted.) (Fixed spacing
//! alone was not enough: a 3 % margin saw 21 requests in one second at 20 rps
//! on a loaded 2-core machine, where wake-ups can be tens of milliseconds late.)
//! A database whose round trips always exceed the tolerance must not stop the
//! import: after [`MAX_LATE_STREAK`] slots given back in a row, a request is
//! sent late anyway (with a warning).

use std::{future::Future, time::Duration};

use tokio::time::Instant;

/// Slots are this much further apart than 1/rps (see the module docs).
pub const SPACING_MARGIN: f64 = 1.08;

/// A sender that wakes later than this after its slot gives the slot back.
pub const LATE_TOLERANCE_S: f64 = 0.015;

/// Slots given back in a row before a request is sent late anyway.
pub const MAX_LATE_STREAK: u32 = 20;

/// An import counts as using its API for this long after it last reserved a
/// request slot (seconds): the API's rate is shared among the imports active
/// in this window ([`share_rps`]). An import that finishes (or waits on the
/// API's concurrency limit) stops reserving, and its share goes back to the
/// others once the window has passed.
pub const ACTIVE_WINDOW_S: f64 = 5.0;

/// The rate an import's requests are spaced at (requests/second): its own
/// quota `import_rps`, and no more than its max-min fair share of its API's
/// quota `api_rps` (when the API has one) among the imports using the API,
/// whose own quotas are `active_rps` (itself included). Max-min fair
/// (water-filling): an import asking less than an equal share keeps what it
/// asks, and what it leaves is split equally among the others.
///
/// Fair per import, not per shard or process: an import with 8 shards gets
/// the same share as one with 1, and the API's own spacing
/// ([`crate::store`]'s `API_SLOT`) still bounds them all together.
pub fn share_rps(import_rps: f64, api_rps: Option<f64>, active_rps: &[f64]) -> f64 {
    let Some(mut left) = api_rps.filter(|&r| r > 0.0) else {
        return import_rps;
    };
    let mut asks: Vec<f64> = active_rps.to_vec();
    asks.sort_by(f64::total_cmp);
    for (i, &ask) in asks.iter().enumerate() {
        let equal = left / (asks.len() - i) as f64;
        if ask >= equal {
            return import_rps.min(equal);
        }
        left -= ask;
    }
    import_rps // every import asks less than an equal share: all get what they ask
}

/// Seconds between two request slots at `requests_per_second`.
pub fn interval_s(requests_per_second: f64) -> f64 {
    SPACING_MARGIN / requests_per_second.max(1e-6)
}

/// A reservation's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Slot {
    /// Send at this time (seconds since the Unix epoch, on the clock that reserved it);
    /// `now` is that clock's reading at reservation time.
    At { at: f64, now: f64 },
    /// The import's request budget is spent.
    Exhausted,
}

/// The pure reservation rule (the database statements implement the same):
/// returns the slot and the new `next_at`.
pub fn reserve(now: f64, next_at: f64, paused_until: f64, requests_per_second: f64) -> (f64, f64) {
    let at = now.max(next_at).max(paused_until);
    (at, at + interval_s(requests_per_second))
}

/// The statements on the import's quota row that pacing needs: the store's
/// methods of these names (implemented for the database store in
/// [`crate::enrich`]).
pub trait QuotaStore: Sync {
    /// Reserves the next request slot (see the module docs).
    fn reserve(&self, import_id: i64) -> impl Future<Output = anyhow::Result<Slot>> + Send;
    /// Gives back a reserved slot that was not used: the budget gets it back.
    fn release_slot(&self, import_id: i64) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Holds back every reservation of the import for `seconds` from now.
    fn pause(&self, import_id: i64, seconds: f64) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// What [`Quota::acquire`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Acquired {
    /// It is this request's slot: send now.
    Slot,
    /// The import's request budget is spent: send nothing more.
    Exhausted,
}

/// One enricher's side of its import's quota.
pub struct Quota<'a, S> {
    store: &'a S,
    import_id: i64,
    late_slots: u64,
}

impl<'a, S: QuotaStore> Quota<'a, S> {
    pub fn new(store: &'a S, import_id: i64) -> Self {
        Self {
            store,
            import_id,
            late_slots: 0,
        }
    }

    /// Reserves the next request slot and sleeps until it; a slot woken for
    /// too late is given back and another reserved (see the module docs).
    pub async fn acquire(&mut self) -> anyhow::Result<Acquired> {
        let mut late_streak = 0u32;
        loop {
            let asked = Instant::now();
            let slot = self.store.reserve(self.import_id).await?;
            let answered = Instant::now();
            let Slot::At { at, now } = slot else {
                return Ok(Acquired::Exhausted);
            };
            // `now` was read by the clock that reserved, somewhere between
            // `asked` and `answered`: the slot is at least `wait` after `asked`
            // and at most `wait` after `answered`. Sleep to the latter (never
            // early); the send is late by at most the time since the former.
            let wait = Duration::from_secs_f64((at - now).max(0.0));
            tokio::time::sleep_until(answered + wait).await;
            let late = Instant::now().duration_since(asked + wait).as_secs_f64();
            if late <= LATE_TOLERANCE_S {
                return Ok(Acquired::Slot);
            }
            if late_streak >= MAX_LATE_STREAK {
                tracing::warn!(
                    import_id = self.import_id,
                    late_s = late,
                    "quota slots keep arriving late (slow database round trips?); sending anyway"
                );
                return Ok(Acquired::Slot);
            }
            // Sending now could crowd the next second: give the slot back.
            self.store.release_slot(self.import_id).await?;
            self.late_slots += 1;
            late_streak += 1;
        }
    }

    /// Holds back every shard of the import for `wait` (a 429's backoff).
    pub async fn pause(&self, wait: Duration) -> anyhow::Result<()> {
        self.store.pause(self.import_id, wait.as_secs_f64()).await
    }

    /// Slots given back so far because their sender woke too late.
    pub fn late_slots(&self) -> u64 {
        self.late_slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_spaced_and_pauses_honoured() {
        let (mut next, mut slots) = (0.0, vec![]);
        for _ in 0..41 {
            let (at, n) = reserve(100.0, next, 0.0, 20.0);
            slots.push(at);
            next = n;
        }
        // no one-second window [t, t+1) holds more than 20 slots
        for (i, &t) in slots.iter().enumerate() {
            assert!(slots[i..].iter().take_while(|&&s| s < t + 1.0).count() <= 20);
        }
        let (at, _) = reserve(100.0, 100.0, 130.0, 20.0);
        assert_eq!(at, 130.0);
    }

    #[test]
    fn sends_late_by_up_to_the_tolerance_never_crowd_a_second() {
        // Worst case for a window: alternate sends on time and as late as allowed.
        for rps in [1.0, 4.0, 5.0, 20.0, 50.0, 100.0] {
            let (mut next, mut sends) = (0.0, vec![]);
            for i in 0..(rps as usize * 5) {
                let (at, n) = reserve(0.0, next, 0.0, rps);
                next = n;
                let late = if i % 2 == 0 { LATE_TOLERANCE_S } else { 0.0 };
                sends.push(at + late);
            }
            sends.sort_by(f64::total_cmp);
            for (i, &t) in sends.iter().enumerate() {
                let in_window = sends[i..].iter().take_while(|&&s| s < t + 1.0).count();
                assert!(
                    in_window as f64 <= rps,
                    "{in_window} sends within one second at {rps} rps"
                );
            }
        }
    }

    /// The quota row in memory, on tokio's (paused) clock, with scripted round
    /// trips: `(before, after)` reading the clock, per reservation.
    struct FakeRow {
        start: Instant,
        rps: f64,
        row: std::sync::Mutex<Row>,
    }

    #[derive(Default)]
    struct Row {
        next_at: f64,
        paused_until: f64,
        requests: u32,
        budget: Option<u32>,
        released: u32,
        trips: std::collections::VecDeque<(Duration, Duration)>,
        /// Used when `trips` is empty.
        every_trip: (Duration, Duration),
    }

    impl FakeRow {
        fn new(rps: f64, row: Row) -> Self {
            Self {
                start: Instant::now(),
                rps,
                row: std::sync::Mutex::new(row),
            }
        }

        fn clock(&self) -> f64 {
            self.start.elapsed().as_secs_f64()
        }

        fn row(&self) -> std::sync::MutexGuard<'_, Row> {
            self.row.lock().unwrap()
        }
    }

    impl QuotaStore for FakeRow {
        async fn reserve(&self, _: i64) -> anyhow::Result<Slot> {
            let (before, after) = {
                let mut r = self.row();
                let every = r.every_trip;
                r.trips.pop_front().unwrap_or(every)
            };
            tokio::time::sleep(before).await;
            let now = self.clock();
            let slot = {
                let mut r = self.row();
                if r.budget.is_some_and(|b| r.requests >= b) {
                    Slot::Exhausted
                } else {
                    let (at, next_at) = reserve(now, r.next_at, r.paused_until, self.rps);
                    (r.next_at, r.requests) = (next_at, r.requests + 1);
                    Slot::At { at, now }
                }
            };
            tokio::time::sleep(after).await;
            Ok(slot)
        }

        async fn release_slot(&self, _: i64) -> anyhow::Result<()> {
            let mut r = self.row();
            r.requests -= 1;
            r.released += 1;
            Ok(())
        }

        async fn pause(&self, _: i64, seconds: f64) -> anyhow::Result<()> {
            let until = self.clock() + seconds;
            let mut r = self.row();
            r.paused_until = r.paused_until.max(until);
            Ok(())
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Acquires `n` slots, returning when each was granted (seconds on the fake's clock).
    async fn sends(quota: &mut Quota<'_, FakeRow>, n: usize) -> Vec<f64> {
        let mut at = vec![];
        for _ in 0..n {
            assert_eq!(quota.acquire().await.unwrap(), Acquired::Slot);
            at.push(quota.store.clock());
        }
        at
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_sleeps_until_each_slot() {
        let row = FakeRow::new(2.0, Row::default());
        let mut quota = Quota::new(&row, 1);
        let at = sends(&mut quota, 3).await;
        for (k, t) in at.iter().enumerate() {
            assert!((t - k as f64 * interval_s(2.0)).abs() < 1e-3, "send {k} at {t}");
        }
        assert_eq!((quota.late_slots(), row.row().released), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_reserved_too_slowly_is_given_back() {
        // The first reservation's clock is read 40 ms before its answer arrives:
        // the slot may already be 40 ms past, more than the tolerance.
        let row = FakeRow::new(
            2.0,
            Row {
                trips: [(ms(0), ms(40))].into(),
                ..Row::default()
            },
        );
        let mut quota = Quota::new(&row, 1);
        let at = sends(&mut quota, 1).await;
        let r = row.row();
        assert_eq!((quota.late_slots(), r.released, r.requests), (1, 1, 1));
        drop(r);
        // the second slot, one interval after the first, is the one used
        assert!((at[0] - interval_s(2.0)).abs() < 1e-3, "{at:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn always_late_reservations_send_anyway_after_a_streak() {
        // Where inside a round trip the clock was read cannot be known: any
        // trip longer than the tolerance may have let the slot pass.
        let row = FakeRow::new(
            5.0,
            Row {
                every_trip: (ms(0), ms(30)),
                ..Row::default()
            },
        );
        let mut quota = Quota::new(&row, 1);
        sends(&mut quota, 2).await;
        assert_eq!(quota.late_slots(), 2 * u64::from(MAX_LATE_STREAK));
        assert_eq!(
            row.row().requests,
            2,
            "every slot given back returned to the count"
        );
    }

    #[test]
    fn an_api_quota_is_shared_max_min_fairly_by_its_active_imports_and_never_raises_one() {
        assert_eq!(share_rps(20.0, Some(20.0), &[20.0]), 20.0);
        assert_eq!(share_rps(30.0, Some(20.0), &[30.0]), 20.0);
        let third = share_rps(20.0, Some(20.0), &[20.0, 20.0, 20.0]);
        assert!((third - 20.0 / 3.0).abs() < 1e-9);
        assert_eq!(
            share_rps(5.0, Some(20.0), &[5.0, 20.0]),
            5.0,
            "spec.quota may ask for less"
        );
        assert_eq!(
            share_rps(20.0, Some(20.0), &[5.0, 20.0]),
            15.0,
            "and leaves the rest to the others"
        );
        assert_eq!(share_rps(20.0, Some(12.0), &[2.0, 20.0, 20.0]), 5.0);
        assert_eq!(
            share_rps(5.0, None, &[5.0, 9.0]),
            5.0,
            "no API quota: the import's own"
        );
        assert_eq!(share_rps(5.0, Some(20.0), &[]), 5.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_back_the_next_slot_and_a_spent_budget_stops() {
        let row = FakeRow::new(
            10.0,
            Row {
                budget: Some(2),
                ..Row::default()
            },
        );
        let mut quota = Quota::new(&row, 1);
        sends(&mut quota, 1).await;
        quota.pause(Duration::from_secs(2)).await.unwrap();
        let at = sends(&mut quota, 1).await;
        assert!((at[0] - 2.0).abs() < 1e-3, "{at:?}");
        let before = quota.store.clock();
        assert_eq!(quota.acquire().await.unwrap(), Acquired::Exhausted);
        assert_eq!(
            quota.store.clock(),
            before,
            "no waiting for a slot that will not come"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sends_never_crowd_a_second_whatever_the_round_trips() {
        // Round trips from 0 to 35 ms, the clock read anywhere inside them.
        let trips: Vec<(Duration, Duration)> =
            (0..400u64).map(|i| (ms(i * 7 % 19), ms(i * 11 % 17))).collect();
        let rps = 20.0;
        let row = FakeRow::new(
            rps,
            Row {
                trips: trips.into(),
                ..Row::default()
            },
        );
        let mut quota = Quota::new(&row, 1);
        let at = sends(&mut quota, 100).await;
        assert!(quota.late_slots() > 0, "the script has late slots");
        for (i, &t) in at.iter().enumerate() {
            let in_window = at[i..].iter().take_while(|&&s| s < t + 1.0).count();
            assert!(
                in_window as f64 <= rps,
                "{in_window} sends within a second from {t}"
            );
        }
    }
}
