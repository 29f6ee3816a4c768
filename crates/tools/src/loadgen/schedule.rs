//! The open-loop schedule: when each request of each connection is due.

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// When request `index` of connection `connection` is due, as an offset from the start of
/// the load, when `connections` connections share `rate` requests per second: the `k`-th
/// request overall (`k = index · connections + connection`) is due at `k / rate` seconds.
/// Each connection thus sends every `connections / rate` seconds, connection `c` starting
/// `c / rate` seconds in, so that connections do not all fire together. Integer nanoseconds:
/// no drift however long the run. `rate` must not be 0.
pub fn intended_offset(rate: u64, connections: usize, connection: usize, index: u64) -> Duration {
    let k = u128::from(index) * connections as u128 + connection as u128;
    let nanos = k * NANOS_PER_SEC / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The first index of connection `connection` whose [`intended_offset`] is at or after
/// `offset`: requests `first_index_from(.., a)..first_index_from(.., b)` are those due in
/// `[a, b)`.
pub fn first_index_from(rate: u64, connections: usize, connection: usize, offset: Duration) -> u64 {
    // floor(k · 1e9 / rate) >= ns  ⇔  k · 1e9 >= ns · rate  ⇔  k >= ceil(ns · rate / 1e9).
    let k_min = (offset.as_nanos() * u128::from(rate.max(1))).div_ceil(NANOS_PER_SEC);
    let c = connection as u128;
    if k_min <= c {
        return 0;
    }
    let index = (k_min - c).div_ceil(connections.max(1) as u128);
    u64::try_from(index).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::{CONNECTIONS_MAX, RATE_MAX};

    #[test]
    fn open_loop_schedule() {
        let ms = Duration::from_millis;
        // 1,000/s over 4 connections: request k overall at k ms; connection c every 4 ms from
        // c ms.
        assert_eq!(intended_offset(1000, 4, 0, 0), Duration::ZERO);
        assert_eq!(intended_offset(1000, 4, 1, 0), ms(1));
        assert_eq!(intended_offset(1000, 4, 0, 1), ms(4));
        assert_eq!(intended_offset(1000, 4, 3, 2), ms(11));
        let mut all: Vec<Duration> = (0..4)
            .flat_map(|c| (0..25).map(move |i| intended_offset(1000, 4, c, i)))
            .collect();
        all.sort();
        assert_eq!(all, (0..100).map(ms).collect::<Vec<_>>());
        // Integer nanoseconds: no drift.
        assert_eq!(
            intended_offset(3, 1, 0, 1),
            Duration::from_nanos(333_333_333)
        );
        assert_eq!(
            intended_offset(3, 1, 0, 3_000_000),
            Duration::from_secs(1_000_000)
        );
        // Fewer requests than connections per second: each connection waits longer.
        assert_eq!(intended_offset(1, 10, 9, 1), Duration::from_secs(19));
        // first_index_from inverts it.
        for (rate, n) in [
            (1000, 4),
            (3, 1),
            (7, 3),
            (1, 10),
            (RATE_MAX, CONNECTIONS_MAX),
        ] {
            for c in [0, 1, n - 1] {
                for i in 0..50 {
                    let at = intended_offset(rate, n, c, i);
                    assert_eq!(first_index_from(rate, n, c, at), i, "{rate} {n} {c} {i}");
                    if let Some(before) = at.checked_sub(Duration::from_nanos(1)) {
                        assert_eq!(first_index_from(rate, n, c, before), i);
                    }
                    let after = at + Duration::from_nanos(1);
                    assert_eq!(first_index_from(rate, n, c, after), i + 1);
                }
            }
        }
        assert_eq!(
            first_index_from(1000, 1, 0, Duration::from_millis(3500)),
            3500
        );
    }
}
