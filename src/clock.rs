//! The wall clock, read in one place. Deadlines use the monotonic clock
//! (`Instant`), passed into the sans-IO core; the wall clock only stamps what
//! leaves the switch: DE7 of the messages it originates, journal records, the
//! duplicates window at start-up.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_s() -> u64 {
    unix_ms() / 1000
}
