//! Duplicate detection (sans-IO): the key is DE32 + DE11 + DE7 (+ DE37 when present).
//!
//! An identical retransmission of a completed request gets the original answer
//! again; one still in flight waits and is answered once, with the same answer,
//! when the outcome is known; the same key with different content is a conflict
//! (the switch answers 94). Keys are kept for a time window, in arrival order, up
//! to a bound; at the bound a new request is refused (the caller answers 91).
//!
//! Keys come from acquirers, so the map uses the standard library's randomly keyed
//! SipHash, not the switch's fast hasher.
//!
//! Step 3 building block: not yet used by the daemon.

use super::fxhash::FxHasher;
use crate::wire::Message;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;
use std::time::{Duration, Instant};

/// Bytes of a key: four length-prefixed fields of at most 11, 6, 10 and 12 bytes.
const KEY_BYTES: usize = 4 + 11 + 6 + 10 + 12;

/// DE32 + DE11 + DE7 (+ DE37), compared exactly, without allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DuplicateKey {
    bytes: [u8; KEY_BYTES],
    len: u8,
}

impl std::fmt::Debug for DuplicateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DuplicateKey({})",
            String::from_utf8_lossy(&self.bytes[..usize::from(self.len)])
        )
    }
}

impl DuplicateKey {
    /// The key of `msg`; `None` when DE32, DE11 or DE7 is absent or too long.
    pub fn of(msg: &Message) -> Option<DuplicateKey> {
        let mut key = DuplicateKey {
            bytes: [0; KEY_BYTES],
            len: 0,
        };
        for (n, max) in [(32u8, 11usize), (11, 6), (7, 10)] {
            key.push(msg.field(n)?, max)?;
        }
        key.push(msg.field(37).unwrap_or(b""), 12)?;
        Some(key)
    }

    fn push(&mut self, value: &[u8], max: usize) -> Option<()> {
        if value.len() > max {
            return None;
        }
        let at = usize::from(self.len);
        self.bytes[at] = value.len() as u8;
        self.bytes[at + 1..at + 1 + value.len()].copy_from_slice(value);
        self.len += 1 + value.len() as u8;
        Some(())
    }
}

/// A digest of a request's content: MTI (a repeat, xx1x… 0201, counts as its
/// original) and every present field. Equal keys with unequal digests conflict.
pub fn content_digest(msg: &Message) -> u64 {
    let mut h = FxHasher::default();
    let mut mti = *msg.mti().as_bytes();
    if mti[3] == b'1' {
        mti[3] = b'0';
    }
    h.write(&mti);
    for (n, value) in msg.fields() {
        h.write_u8(n);
        h.write_usize(value.len());
        h.write(value);
    }
    h.finish()
}

/// What to do with a request, given what the table knows of its key.
#[derive(Debug)]
pub enum Verdict<W> {
    /// First time seen: process it; the table now holds it as in flight.
    New(W),
    /// Seen and answered: send this answer again.
    Answered(Bytes, W),
    /// Same key still in flight: the waiter is kept and returned by `complete`.
    Waiting,
    /// Same key, different content: answer 94.
    Conflict(W),
    /// The table is at its bound, or too many waiters on the key: answer 91.
    Full(W),
}

enum State<W> {
    InFlight(Vec<W>),
    Done(Bytes),
}

struct Entry<W> {
    digest: u64,
    since: Instant,
    state: State<W>,
}

/// Keys within the window, bounded.
pub struct DedupTable<W> {
    map: HashMap<DuplicateKey, Entry<W>>,
    order: VecDeque<(Instant, DuplicateKey)>,
    window: Duration,
    capacity: usize,
    waiters_max: usize,
}

impl<W> DedupTable<W> {
    /// A table remembering keys for `window`, at most `capacity` keys, and at most
    /// `waiters_max` duplicates waiting on one in-flight request.
    pub fn new(window: Duration, capacity: usize, waiters_max: usize) -> DedupTable<W> {
        DedupTable {
            map: HashMap::new(),
            order: VecDeque::new(),
            window,
            capacity: capacity.max(1),
            waiters_max,
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Classifies a request with `key` and `digest` arriving at `now`.
    pub fn check(&mut self, key: DuplicateKey, digest: u64, now: Instant, waiter: W) -> Verdict<W> {
        self.expire(now);
        let waiters_max = self.waiters_max;
        if !self.map.contains_key(&key) {
            if self.map.len() >= self.capacity {
                return Verdict::Full(waiter);
            }
            let state = State::InFlight(Vec::new());
            self.map.insert(
                key,
                Entry {
                    digest,
                    since: now,
                    state,
                },
            );
            self.order.push_back((now, key));
            return Verdict::New(waiter);
        }
        match self.map.get_mut(&key) {
            Some(e) if e.digest != digest => Verdict::Conflict(waiter),
            Some(Entry {
                state: State::Done(answer),
                ..
            }) => Verdict::Answered(answer.clone(), waiter),
            Some(Entry {
                state: State::InFlight(waiting),
                ..
            }) => {
                if waiting.len() >= waiters_max {
                    return Verdict::Full(waiter);
                }
                waiting.push(waiter);
                Verdict::Waiting
            }
            None => Verdict::Full(waiter), // checked above
        }
    }

    /// Records the answer of the request with `key`; returns the duplicates that
    /// waited for it (each to get the same answer).
    pub fn complete(&mut self, key: &DuplicateKey, answer: Bytes, now: Instant) -> Vec<W> {
        let Some(entry) = self.map.get_mut(key) else {
            return Vec::new();
        };
        let previous = std::mem::replace(&mut entry.state, State::Done(answer));
        let expired = entry.since + self.window <= now;
        if expired {
            self.map.remove(key); // its place in `order` was already passed
        }
        match previous {
            State::InFlight(waiters) => waiters,
            State::Done(_) => Vec::new(),
        }
    }

    /// Forgets keys older than the window (answered ones; in-flight ones go when they
    /// complete).
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(since, key)) = self.order.front() {
            if since + self.window > now {
                break;
            }
            self.order.pop_front();
            let done = matches!(
                self.map.get(&key),
                Some(Entry { state: State::Done(_), since: s, .. }) if *s == since
            );
            if done {
                self.map.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Dialect, Encoder, Mti};
    use bytes::BytesMut;

    fn msg(mti: Mti, stan: &[u8], amount: &[u8]) -> Message {
        let d = Dialect::iso87_ascii();
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(&d, &mut out, mti);
        for (n, v) in [
            (4u8, amount),
            (7, b"1126093000"),
            (11, stan),
            (32, b"100001"),
            (37, b"000000000001"),
        ] {
            enc.field(n, v).unwrap();
        }
        enc.finish();
        Message::decode(&d, out.freeze()).unwrap()
    }

    #[test]
    fn keys_and_digests() {
        let a = msg(Mti::FINANCIAL, b"000001", b"000000001000");
        let repeat = msg(Mti(*b"0201"), b"000001", b"000000001000");
        let changed = msg(Mti::FINANCIAL, b"000001", b"000000009999");
        let other = msg(Mti::FINANCIAL, b"000002", b"000000001000");
        assert_eq!(DuplicateKey::of(&a), DuplicateKey::of(&changed));
        assert_ne!(DuplicateKey::of(&a), DuplicateKey::of(&other));
        assert_eq!(
            content_digest(&a),
            content_digest(&repeat),
            "0201 repeats its 0200"
        );
        assert_ne!(content_digest(&a), content_digest(&changed));
    }

    #[test]
    fn verdicts_over_a_request_life() {
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        let mut t: DedupTable<u32> = DedupTable::new(window, 100, 2);
        let a = msg(Mti::FINANCIAL, b"000001", b"000000001000");
        let key = DuplicateKey::of(&a).unwrap();
        let digest = content_digest(&a);
        assert!(matches!(t.check(key, digest, t0, 1), Verdict::New(1)));
        assert!(matches!(t.check(key, digest, t0, 2), Verdict::Waiting));
        assert!(matches!(t.check(key, digest, t0, 3), Verdict::Waiting));
        assert!(
            matches!(t.check(key, digest, t0, 4), Verdict::Full(4)),
            "waiters bounded"
        );
        assert!(matches!(
            t.check(key, digest ^ 1, t0, 5),
            Verdict::Conflict(5)
        ));
        let answer = Bytes::from_static(b"0210 answer");
        assert_eq!(t.complete(&key, answer.clone(), t0), vec![2, 3]);
        match t.check(key, digest, t0 + Duration::from_secs(1), 6) {
            Verdict::Answered(a, 6) => assert_eq!(a, answer),
            other => panic!("{other:?}"),
        }
        t.expire(t0 + window);
        assert!(t.is_empty(), "forgotten after the window");
        assert!(matches!(
            t.check(key, digest, t0 + window, 7),
            Verdict::New(7)
        ));
    }

    #[test]
    fn bounded_and_late_completions_do_not_linger() {
        let t0 = Instant::now();
        let window = Duration::from_secs(10);
        let mut t: DedupTable<()> = DedupTable::new(window, 2, 1);
        let keys: Vec<_> = [b"000001", b"000002", b"000003"]
            .iter()
            .map(|s| msg(Mti::FINANCIAL, *s, b"000000001000"))
            .collect();
        let k = |i: usize| DuplicateKey::of(&keys[i]).unwrap();
        let d = |i: usize| content_digest(&keys[i]);
        assert!(matches!(t.check(k(0), d(0), t0, ()), Verdict::New(())));
        assert!(matches!(t.check(k(1), d(1), t0, ()), Verdict::New(())));
        assert!(
            matches!(t.check(k(2), d(2), t0, ()), Verdict::Full(())),
            "capacity"
        );
        // Still in flight past the window: kept until it completes, then dropped.
        t.expire(t0 + window * 2);
        assert_eq!(t.len(), 2);
        t.complete(&k(0), Bytes::new(), t0 + window * 2);
        assert_eq!(t.len(), 1);
    }
}
