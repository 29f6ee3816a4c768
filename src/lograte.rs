//! Rate limits for log lines about other institutions' traffic: a peer sending
//! garbage or opening thousands of connections must not flood the log. Each
//! kind of line has its own budget of lines per second; lines over it are
//! counted and the next line that passes says how many were suppressed.

use std::sync::atomic::{AtomicU64, Ordering};

/// Log lines of one kind per second at most.
pub const LOG_LINES_PER_S: u64 = 20;

/// The budget of one kind of log line.
pub struct LogRate {
    /// The current second (since the Unix epoch) and the lines in it, packed:
    /// `second << 16 | count`.
    window: AtomicU64,
    suppressed: AtomicU64,
}

impl LogRate {
    /// A fresh budget.
    pub const fn new() -> LogRate {
        LogRate {
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written now; `Some(n)` with the number of lines
    /// suppressed since the last one written.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(crate::clock::unix_s())
    }

    fn allow_at(&self, second: u64) -> Option<u64> {
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (at, count) = (current >> 16, current & 0xffff);
            let next = if at == second {
                if count >= LOG_LINES_PER_S {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                current + 1
            } else {
                (second << 16) | 1
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(actual) => current = actual,
            }
        }
    }
}

impl Default for LogRate {
    fn default() -> Self {
        LogRate::new()
    }
}

/// Logs through `tracing::$level!` at most [`LOG_LINES_PER_S`] times a second for
/// this call site, adding a `suppressed` field with the lines skipped before it.
#[macro_export]
macro_rules! log_limited {
    ($level:ident, $($arg:tt)+) => {{
        static RATE: $crate::lograte::LogRate = $crate::lograte::LogRate::new();
        if let Some(suppressed) = RATE.allow() {
            tracing::$level!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_budget_per_second_and_the_rest_counted() {
        let r = LogRate::new();
        let passed = (0..100).filter(|_| r.allow_at(1_000).is_some()).count();
        assert_eq!(passed as u64, LOG_LINES_PER_S);
        assert_eq!(r.allow_at(1_001), Some(100 - LOG_LINES_PER_S));
        assert_eq!(r.allow_at(1_001), Some(0));
    }
}
