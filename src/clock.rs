//! The prober's two clocks.
//!
//! - **Canary time** ([`now_ms`]): Unix milliseconds read from the wall clock once, when the
//!   process starts, then advanced by the monotonic clock. Every duration and deadline of a
//!   canary is a difference of two canary times, so an NTP step of the wall clock (an hour back
//!   or forward) neither fires a deadline nor yields a negative or absurd duration.
//! - **Wall time** ([`wall_ms`]): what the system clock says now. Timestamps that leave the
//!   process for a reader with its own clock (`*_timestamp_seconds` gauges, which Prometheus
//!   compares with `time()`) are canary times moved onto the wall clock by [`to_wall_ms`].
//!
//! Canary times are persisted in the ledger. After a restart the new process anchors its own
//! canary time to the wall clock of its start, so a canary resumed across a restart measures
//! across it with the wall clock, the only clock both processes share.
//!
//! The alternative, re-anchoring canary time whenever the wall clock is seen to step, was
//! rejected: it would move the start of every stage in flight by the step, which is exactly
//! the false deadline this module exists to prevent.

use std::{
    sync::LazyLock,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

// The instant is read first: the anchor then runs a few nanoseconds ahead of the wall clock,
// never behind it.
static ANCHOR: LazyLock<(Duration, Instant)> = LazyLock::new(|| {
    let at = Instant::now();
    (wall(), at)
});

/// Canary time now: the wall clock at start plus the monotonic time since. Kept in
/// nanoseconds until the final truncation, so a canary time never reads a millisecond behind
/// the wall clock it was anchored to (two truncations did, and a stage measured against a
/// wall-clock ground truth came out at -1 ms).
pub fn now_ms() -> u64 {
    let (wall, at) = *ANCHOR;
    (wall + at.elapsed()).as_millis() as u64
}

/// Canary time of a monotonic instant (an IMAP arrival seen before it was dispatched).
pub fn at_ms(instant: Instant) -> u64 {
    let (wall, at) = *ANCHOR;
    match instant.checked_duration_since(at) {
        Some(since) => (wall + since).as_millis() as u64,
        None => wall.saturating_sub(at - instant).as_millis() as u64,
    }
}

fn wall() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The system's wall clock, Unix milliseconds (0 before 1970).
pub fn wall_ms() -> u64 {
    wall().as_millis() as u64
}

/// A canary time as wall-clock Unix milliseconds: moved by however far the wall clock has
/// stepped since the process started.
pub fn to_wall_ms(canary_ms: u64) -> u64 {
    let offset = wall_ms() as i128 - now_ms() as i128;
    (canary_ms as i128 + offset).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_time_starts_at_the_wall_clock_and_never_goes_back() {
        let (a, w) = (now_ms(), wall_ms());
        assert!(
            a.abs_diff(w) < 1_000,
            "anchored to the wall clock: {a} vs {w}"
        );
        let mut last = now_ms();
        for _ in 0..1_000 {
            let t = now_ms();
            assert!(t >= last);
            last = t;
        }
        let i = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let then = at_ms(i);
        assert!(now_ms() - then >= 20);
        assert!(to_wall_ms(now_ms()).abs_diff(wall_ms()) < 1_000);
    }
}
