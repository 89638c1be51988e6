//! The import's request quota, shared by all its shards through the database.
//!
//! A reservation scheme (GCRA-like): each request reserves the next free slot
//! `at = max(now, next_at, paused_until)` and moves `next_at` one interval on; the
//! requester sleeps until `at`. Slots are spaced by `SPACING_MARGIN / rps`
//! seconds, so no one-second window holds more than `rps` requests even with
//! small scheduling jitter, and a shard that finishes early simply stops
//! reserving, leaving its share to the rest. A 429's `Retry-After` moves
//! `paused_until`, which every shard's next reservation honours. The optional
//! budget (`max_requests`) is checked in the same atomic statement.

/// Slots are this much further apart than 1/rps, to absorb scheduling jitter
/// (3 % was not enough on a loaded 2-core machine: 21 requests in one second at 20 rps).
pub const SPACING_MARGIN: f64 = 1.06;

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
}
