//! The import's request quota, shared by all its shards through the database.
//!
//! A reservation scheme (GCRA-like): each request reserves the next free slot
//! `at = max(now, next_at, paused_until)` and moves `next_at` one interval on; the
//! requester sleeps until `at`. A shard that finishes early simply stops
//! reserving, leaving its share to the rest. A 429's `Retry-After` moves
//! `paused_until`, which every shard's next reservation honours. The optional
//! budget (`max_requests`) is checked in the same atomic statement.
//!
//! Why no one-second window holds more than `rps` requests: a request is sent
//! only if it leaves within [`LATE_TOLERANCE_S`] of its slot, counting the
//! reservation's own round trip (the slot's clock is read somewhere inside
//! it); a later sender gives the slot back and reserves another. Every send therefore lies
//! in `[slot, slot + tolerance]`, so a window `[t, t + 1 s)` can only hold
//! sends of slots in `(t - tolerance, t + 1 s)`, an interval of `1 s + tolerance`.
//! With slots `SPACING_MARGIN / rps` apart, that interval holds at most `rps`
//! slots when `SPACING_MARGIN > 1 + tolerance`; the rest of the margin (25 ms)
//! absorbs the variation between sending and the server's arrival clock. (A
//! test on a loaded machine once saw 21 in a second at 20 rps when the
//! reservation's round trip was not counted.) (Fixed spacing
//! alone was not enough: a 3 % margin saw 21 requests in one second at 20 rps
//! on a loaded 2-core machine, where wake-ups can be tens of milliseconds late.)

/// Slots are this much further apart than 1/rps (see the module docs).
pub const SPACING_MARGIN: f64 = 1.04;

/// A sender that wakes later than this after its slot gives the slot back.
pub const LATE_TOLERANCE_S: f64 = 0.015;

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
}
