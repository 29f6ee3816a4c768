//! Store-and-forward of reversal advices for one bank connector.
//!
//! When a forwarded request ends without the acquirer getting the bank's answer
//! (deadline passed, link lost), the bank may have approved it: a 0420 reversal
//! advice is queued here, sent on the next link write, repeated as 0421 with
//! doubling backoff until the bank answers 0430, and parked (logged, counted) after
//! too many attempts or too long. Each advice is journaled when queued and when
//! acknowledged; after a restart, recovery (`daemon::recovery`) queues again the
//! advices the journal shows unacknowledged.

use super::inflight::Stan;
use crate::wire::Message;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Reversal advices waiting per bank; past it a new one is parked at once.
pub const SAF_DEPTH_MAX_DEFAULT: usize = 100_000;
/// First delay before repeating an unanswered reversal advice.
pub const REVERSAL_RETRY_MIN_MS_DEFAULT: u64 = 1_000;
/// Longest delay between repeats.
pub const REVERSAL_RETRY_MAX_MS_DEFAULT: u64 = 60_000;
/// Attempts before an advice is parked for manual follow-up.
pub const REVERSAL_ATTEMPTS_MAX_DEFAULT: u32 = 20;
/// Age after which an advice is parked.
pub const REVERSAL_AGE_MAX_S_DEFAULT: u64 = 24 * 3600;

/// Bounds of a bank's reversal store-and-forward queue.
#[derive(Clone, Debug)]
pub struct SafLimits {
    /// Advices waiting.
    pub depth_max: usize,
    /// First repeat delay.
    pub retry_min: Duration,
    /// Longest repeat delay.
    pub retry_max: Duration,
    /// Attempts before parking.
    pub attempts_max: u32,
    /// Age before parking.
    pub age_max: Duration,
}

impl Default for SafLimits {
    fn default() -> Self {
        SafLimits {
            depth_max: SAF_DEPTH_MAX_DEFAULT,
            retry_min: Duration::from_millis(REVERSAL_RETRY_MIN_MS_DEFAULT),
            retry_max: Duration::from_millis(REVERSAL_RETRY_MAX_MS_DEFAULT),
            attempts_max: REVERSAL_ATTEMPTS_MAX_DEFAULT,
            age_max: Duration::from_secs(REVERSAL_AGE_MAX_S_DEFAULT),
        }
    }
}

/// A reversal advice to deliver.
pub struct Advice {
    /// The request to reverse, as the acquirer sent it.
    pub original: Message,
    /// The STAN it carried on the bank link (DE90 names it).
    pub original_link_stan: Stan,
    /// The switch's id of the request.
    pub request_id: u64,
    /// Attempts so far (the first is an 0420, later ones 0421).
    pub attempts: u32,
    /// When it was first queued.
    pub queued_at: Instant,
    /// Not before.
    pub next_try: Instant,
}

/// An advice that was parked instead of queued: which, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parked {
    /// The request it reverses.
    pub request_id: u64,
    /// Attempts made.
    pub attempts: u32,
    /// Why.
    pub reason: ParkReason,
}

/// Why an advice was parked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParkReason {
    /// Too many attempts.
    Attempts,
    /// Too old.
    Age,
    /// The queue is at its bound.
    Full,
}

/// The connector's advices, bounded, ordered by when they are due.
pub struct Saf {
    advices: Mutex<Vec<Advice>>,
    len: AtomicUsize,
    limits: SafLimits,
}

impl Saf {
    /// An empty queue within `limits`.
    pub fn new(limits: SafLimits) -> Saf {
        Saf {
            advices: Mutex::new(Vec::new()),
            len: AtomicUsize::new(0),
            limits,
        }
    }

    /// The delay before attempt `attempts + 1`: doubling from the minimum to the maximum.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.min(16);
        (self.limits.retry_min * factor).min(self.limits.retry_max)
    }

    /// Advices waiting (not counting those in flight on a link).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Advice>> {
        crate::sync::lock(&self.advices)
    }

    /// Queues an advice (first attempt or a retry); `Err` when it must be parked.
    pub fn push(&self, advice: Advice, now: Instant) -> Result<(), Parked> {
        let parked = |reason| {
            Err(Parked {
                request_id: advice.request_id,
                attempts: advice.attempts,
                reason,
            })
        };
        if advice.attempts >= self.limits.attempts_max {
            return parked(ParkReason::Attempts);
        }
        if now.saturating_duration_since(advice.queued_at) >= self.limits.age_max {
            return parked(ParkReason::Age);
        }
        let mut advices = self.lock();
        if advices.len() >= self.limits.depth_max {
            return parked(ParkReason::Full);
        }
        advices.push(advice);
        self.len.store(advices.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Takes up to `max` advices due at `now`.
    pub fn take_due(&self, now: Instant, max: usize, out: &mut Vec<Advice>) {
        if self.is_empty() {
            return;
        }
        let mut advices = self.lock();
        let mut i = 0;
        while i < advices.len() && out.len() < max {
            if advices[i].next_try <= now {
                out.push(advices.swap_remove(i));
            } else {
                i += 1;
            }
        }
        self.len.store(advices.len(), Ordering::Relaxed);
    }

    /// Takes every waiting advice, due or not (a retired bank hands them over).
    pub fn take_all(&self, out: &mut Vec<Advice>) {
        if self.is_empty() {
            return;
        }
        let mut advices = self.lock();
        out.append(&mut advices);
        self.len.store(0, Ordering::Relaxed);
    }

    /// When the earliest waiting advice is due.
    pub fn next_due(&self) -> Option<Instant> {
        if self.is_empty() {
            return None;
        }
        self.lock().iter().map(|a| a.next_try).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Dialect, Encoder, Mti};
    use bytes::BytesMut;

    fn advice(now: Instant, attempts: u32, due_in: Duration) -> Advice {
        let d = Dialect::iso87_ascii();
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(&d, &mut out, Mti::FINANCIAL);
        enc.field(11, b"000001").unwrap();
        enc.finish();
        Advice {
            original: Message::decode(&d, out.freeze()).unwrap(),
            original_link_stan: Stan::from_de11(b"000001").unwrap(),
            request_id: 1,
            attempts,
            queued_at: now,
            next_try: now + due_in,
        }
    }

    #[test]
    fn due_order_bounds_and_parking() {
        let now = Instant::now();
        let saf = Saf::new(SafLimits {
            depth_max: 2,
            ..SafLimits::default()
        });
        assert!(saf.push(advice(now, 0, Duration::ZERO), now).is_ok());
        assert!(saf
            .push(advice(now, 0, Duration::from_secs(5)), now)
            .is_ok());
        let full = saf
            .push(advice(now, 0, Duration::ZERO), now)
            .map_err(|p| p.reason);
        assert_eq!(full, Err(ParkReason::Full));
        let many = advice(now, SafLimits::default().attempts_max, Duration::ZERO);
        assert_eq!(
            saf.push(many, now).map_err(|p| p.reason),
            Err(ParkReason::Attempts)
        );
        assert_eq!(saf.next_due(), Some(now));
        let mut out = Vec::new();
        saf.take_due(now, 10, &mut out);
        assert_eq!((out.len(), saf.len()), (1, 1));
        assert_eq!(saf.next_due(), Some(now + Duration::from_secs(5)));
        assert_eq!(saf.backoff(0), Duration::from_secs(1));
        assert_eq!(saf.backoff(3), Duration::from_secs(8));
        assert_eq!(saf.backoff(30), SafLimits::default().retry_max);
    }
}
