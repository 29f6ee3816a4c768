//! Duplicate detection (sans-IO): the key is DE32 + DE11 + DE7 (+ DE37 when present).
//!
//! An identical retransmission of a completed request gets the original answer
//! again; one still in flight waits and is answered once, with the same answer,
//! when the outcome is known; the same key with different content is a conflict
//! (the switch answers 94). Keys are kept for a time window (between one and two
//! windows: two generations per shard), up to a bound; at the bound a new request
//! is refused (the caller answers 91).
//!
//! The same table finds the original of an acquirer's 0400 reversal: DE90 names the
//! original's DE11 and DE7, the reversal carries the acquirer's DE32 (and usually
//! the original's DE37), which together are the original's key.
//!
//! Keys come from acquirers, so they are hashed with the standard library's
//! randomly keyed SipHash, not the switch's fast hasher. The table is split into
//! shards, each behind its own short lock (never held across an `.await`).

use super::fxhash::FxHasher;
use crate::wire::Message;
use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
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

    /// The key of the original that reversal `msg` names: DE32 of the reversal,
    /// DE11 and DE7 from its DE90, and the reversal's DE37 when `with_rrn` (else
    /// none). `None` when DE90 is absent or not 42 digits.
    pub fn of_original(msg: &Message, with_rrn: bool) -> Option<DuplicateKey> {
        let de90 = msg.field(90).filter(|v| v.len() == 42)?;
        let mut key = DuplicateKey {
            bytes: [0; KEY_BYTES],
            len: 0,
        };
        key.push(msg.field(32)?, 11)?;
        key.push(&de90[4..10], 6)?;
        key.push(&de90[10..20], 10)?;
        let rrn = if with_rrn { msg.field(37) } else { None };
        key.push(rrn.unwrap_or(b""), 12)?;
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
pub enum Verdict<W, A> {
    /// First time seen: process it; the table now holds it as in flight.
    New(W),
    /// Seen and answered: send this answer again, once journal record `seq` is
    /// durable (0: nothing to wait for).
    Answered {
        /// The stored answer.
        answer: A,
        /// The journal record of the outcome.
        seq: u64,
        /// The retransmission.
        waiter: W,
    },
    /// Same key still in flight: the waiter is kept and returned by `complete`.
    Waiting,
    /// Same key, different content: answer 94.
    Conflict(W),
    /// The table is at its bound, or too many waiters on the key: answer 91.
    Full(W),
}

/// What the table knows of the original a reversal names.
#[derive(Debug)]
pub enum Original<W, A> {
    /// Still in flight: the waiter is kept and returned by `complete`.
    Attached,
    /// Answered with this.
    Done(A, W),
    /// Not (or no longer) known.
    Absent(W),
    /// Too many waiters on it already.
    Full(W),
}

enum State<W, A> {
    InFlight(Vec<W>),
    Done { answer: A, seq: u64 },
}

struct Entry<W, A> {
    key: DuplicateKey,
    hash: u64,
    digest: u64,
    state: State<W, A>,
}

/// One shard: keys in two generations. New keys go into `current`; every
/// `window` the generations turn (`previous` is dropped, `current` becomes
/// `previous`), so a key is remembered between one and two windows, and expiry
/// costs nothing per request (no per-key removal, no tombstones in the table).
struct Shard<W, A> {
    current: HashTable<Entry<W, A>>,
    previous: HashTable<Entry<W, A>>,
    /// When `current` started.
    turned_at: Instant,
    capacity: usize,
}

/// Keys within the window, bounded, split into shards.
pub struct DedupTable<W, A> {
    shards: Box<[Locked<W, A>]>,
    hasher: RandomState,
    window: Duration,
    waiters_max: usize,
}

/// A shard behind its own lock, on its own cache lines.
type Locked<W, A> = CachePadded<Mutex<Shard<W, A>>>;

/// Shards of a table (a power of two).
const SHARDS: usize = 32;

use crate::sync::lock;

impl<W, A: Clone> DedupTable<W, A> {
    /// A table remembering keys for at least `window` (at most twice that), at most
    /// `capacity` keys, and at most `waiters_max` duplicates (or reversals) waiting
    /// on one in-flight request; its first generation starts at `now`.
    pub fn new(
        window: Duration,
        capacity: usize,
        waiters_max: usize,
        now: Instant,
    ) -> DedupTable<W, A> {
        let per_shard = capacity.max(1).div_ceil(SHARDS);
        let shards = (0..SHARDS)
            .map(|i| {
                // Shards turn at different moments, spreading the work of dropping a
                // generation over the window.
                let stagger = window / SHARDS as u32 * i as u32;
                CachePadded::new(Mutex::new(Shard {
                    current: HashTable::new(),
                    previous: HashTable::new(),
                    turned_at: now.checked_sub(stagger).unwrap_or(now),
                    capacity: per_shard,
                }))
            })
            .collect();
        DedupTable {
            shards,
            hasher: RandomState::new(),
            window,
            waiters_max,
        }
    }

    /// The window keys are remembered for (at least).
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = lock(s);
                s.current.len() + s.previous.len()
            })
            .sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &DuplicateKey) -> (u64, &Mutex<Shard<W, A>>) {
        let hash = self.hasher.hash_one(key);
        // Inside a shard, hashbrown places a key by the hash's low bits and tags it
        // with the top 7: the shard is picked by bits used by neither (picking it by
        // the top bits left tags with 2 bits of entropy, and every probe compared
        // keys; that cost a quarter of the switch's CPU).
        (hash, &self.shards[(hash >> 40) as usize % SHARDS])
    }

    /// Classifies a request with `key` and `digest` arriving at `now`.
    pub fn check(&self, key: DuplicateKey, digest: u64, now: Instant, waiter: W) -> Verdict<W, A> {
        let (hash, shard) = self.shard(&key);
        let mut guard = lock(shard);
        guard.turn(now, self.window);
        let shard = &mut *guard;
        let full = shard.current.len() + shard.previous.len() >= shard.capacity;
        let verdict = match shard.find_mut(hash, &key) {
            None if full => Verdict::Full(waiter),
            None => {
                shard.insert(hash, key, digest, State::InFlight(Vec::new()));
                Verdict::New(waiter)
            }
            Some(e) if e.digest != digest => Verdict::Conflict(waiter),
            Some(e) => match &mut e.state {
                State::Done { answer, seq } => Verdict::Answered {
                    answer: answer.clone(),
                    seq: *seq,
                    waiter,
                },
                State::InFlight(waiting) if waiting.len() >= self.waiters_max => {
                    Verdict::Full(waiter)
                }
                State::InFlight(waiting) => {
                    waiting.push(waiter);
                    Verdict::Waiting
                }
            },
        };
        verdict
    }

    /// Looks up the original named by a reversal; while it is in flight, `waiter`
    /// is attached to it and returned by its `complete`.
    pub fn original(&self, key: &DuplicateKey, waiter: W) -> Original<W, A> {
        let (hash, shard) = self.shard(key);
        let mut shard = lock(shard);
        let Some(e) = shard.find_mut(hash, key) else {
            return Original::Absent(waiter);
        };
        match &mut e.state {
            State::Done { answer, .. } => Original::Done(answer.clone(), waiter),
            State::InFlight(waiting) if waiting.len() >= self.waiters_max => Original::Full(waiter),
            State::InFlight(waiting) => {
                waiting.push(waiter);
                Original::Attached
            }
        }
    }

    /// The stored answer of `key`, if it was answered.
    pub fn stored(&self, key: &DuplicateKey) -> Option<A> {
        let (hash, shard) = self.shard(key);
        let mut shard = lock(shard);
        match &shard.find_mut(hash, key)?.state {
            State::Done { answer, .. } => Some(answer.clone()),
            State::InFlight(_) => None,
        }
    }

    /// Records the answer of the request with `key` (released once journal record
    /// `seq` is durable); returns what waited for it.
    pub fn complete(&self, key: &DuplicateKey, answer: A, seq: u64) -> Vec<W> {
        let (hash, shard) = self.shard(key);
        let mut shard = lock(shard);
        let Some(e) = shard.find_mut(hash, key) else {
            return Vec::new();
        };
        match std::mem::replace(&mut e.state, State::Done { answer, seq }) {
            State::InFlight(waiters) => waiters,
            State::Done { .. } => Vec::new(),
        }
    }

    /// Adds a request answered before a restart (from the journal). Returns false
    /// when its shard is full or the key is already held.
    pub fn restore(&self, key: DuplicateKey, digest: u64, answer: A, seq: u64) -> bool {
        let (hash, shard) = self.shard(&key);
        let mut shard = lock(shard);
        let full = shard.current.len() + shard.previous.len() >= shard.capacity;
        if full || shard.find_mut(hash, &key).is_some() {
            return false;
        }
        shard.insert(hash, key, digest, State::Done { answer, seq });
        true
    }

    /// Turns the generations of shards whose window has passed, so memory is given
    /// back even where no request comes (the daemon calls it once a second).
    pub fn expire(&self, now: Instant) {
        for shard in self.shards.iter() {
            lock(shard).turn(now, self.window);
        }
    }
}

impl<W, A> Shard<W, A> {
    fn find_mut(&mut self, hash: u64, key: &DuplicateKey) -> Option<&mut Entry<W, A>> {
        let Shard {
            current, previous, ..
        } = self;
        match current.find_mut(hash, |e| e.key == *key) {
            Some(e) => Some(e),
            None => previous.find_mut(hash, |e| e.key == *key),
        }
    }

    fn insert(&mut self, hash: u64, key: DuplicateKey, digest: u64, state: State<W, A>) {
        let entry = Entry {
            key,
            hash,
            digest,
            state,
        };
        self.current.insert_unique(hash, entry, |e| e.hash);
    }

    /// Turns the generations when `current` is a window old: the older generation's
    /// answered keys are dropped in place and its table, keeping its memory (no
    /// allocation, no page faults in a steady state) and the requests still in
    /// flight (their waiters must be answered), becomes `current`.
    fn turn(&mut self, now: Instant, window: Duration) {
        if now < self.turned_at + window {
            return;
        }
        // Two windows passed with no request: the newer generation goes too.
        if now >= self.turned_at + window * 2 {
            self.previous
                .retain(|e| matches!(e.state, State::InFlight(_)));
        }
        self.turned_at = now;
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current
            .retain(|e| matches!(e.state, State::InFlight(_)));
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
        let window = Duration::from_secs(60);
        let t0 = Instant::now();
        let t: DedupTable<u32, &'static str> = DedupTable::new(window, 100, 2, t0);
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
        assert_eq!(t.complete(&key, "0210 answer", 7), vec![2, 3]);
        match t.check(key, digest, t0 + Duration::from_secs(1), 6) {
            Verdict::Answered {
                answer: "0210 answer",
                seq: 7,
                waiter: 6,
            } => {}
            other => panic!("{other:?}"),
        }
        t.expire(t0 + window);
        assert_eq!(t.len(), 1, "remembered for at least the window");
        assert!(matches!(
            t.check(key, digest, t0 + window, 8),
            Verdict::Answered { waiter: 8, .. }
        ));
        t.expire(t0 + window * 2);
        assert!(t.is_empty(), "forgotten after two windows");
        assert!(matches!(
            t.check(key, digest, t0 + window * 2, 7),
            Verdict::New(7)
        ));
    }

    #[test]
    fn bounded_and_late_completions_do_not_linger() {
        let window = Duration::from_secs(10);
        // One key per shard at most.
        let t0 = Instant::now();
        let t: DedupTable<(), ()> = DedupTable::new(window, 1, 1, t0);
        let keys: Vec<_> = (0..200u32)
            .map(|i| {
                msg(
                    Mti::FINANCIAL,
                    format!("{i:06}").as_bytes(),
                    b"000000001000",
                )
            })
            .collect();
        let k = |i: usize| DuplicateKey::of(&keys[i]).unwrap();
        let d = |i: usize| content_digest(&keys[i]);
        let new: Vec<usize> = (0..200)
            .filter(|&i| matches!(t.check(k(i), d(i), t0, ()), Verdict::New(())))
            .collect();
        assert!(new.len() <= SHARDS, "capacity per shard: {}", new.len());
        assert!(new.len() > 1);
        // Still in flight past two windows: kept until it completes.
        t.expire(t0 + window * 3);
        assert_eq!(t.len(), new.len());
        t.complete(&k(new[0]), (), 0);
        t.expire(t0 + window * 6);
        assert_eq!(t.len(), new.len() - 1, "answered: gone; in flight: kept");
    }

    #[test]
    fn a_reversal_finds_its_original_by_de90() {
        let t0 = Instant::now();
        let t: DedupTable<&'static str, &'static str> =
            DedupTable::new(Duration::from_secs(60), 100, 2, t0);
        let original = msg(Mti::FINANCIAL, b"000042", b"000000001000");
        let key = DuplicateKey::of(&original).unwrap();
        let d = Dialect::iso87_ascii();
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(&d, &mut out, Mti::REVERSAL);
        let mut de90 = *b"020000004211260930000000010000100000000000";
        de90[20..31].copy_from_slice(b"00000100001");
        for (n, v) in [
            (7u8, &b"1126093500"[..]),
            (11, b"000043"),
            (32, b"100001"),
            (37, b"000000000001"),
            (90, &de90[..]),
        ] {
            enc.field(n, v).unwrap();
        }
        enc.finish();
        let reversal = Message::decode(&d, out.freeze()).unwrap();
        let named = DuplicateKey::of_original(&reversal, true).unwrap();
        assert_eq!(named, key, "DE32 + DE90 STAN and DE7 + DE37");
        assert!(matches!(t.original(&named, "r"), Original::Absent("r")));
        assert!(matches!(
            t.check(key, content_digest(&original), t0, "o"),
            Verdict::New("o")
        ));
        assert!(matches!(t.original(&named, "r"), Original::Attached));
        assert_eq!(t.complete(&key, "answered", 1), vec!["r"]);
        assert!(matches!(
            t.original(&named, "r2"),
            Original::Done("answered", "r2")
        ));
        let without_rrn = DuplicateKey::of_original(&reversal, false).unwrap();
        assert_ne!(without_rrn, key);
    }
}
