//! Duplicate detection (sans-IO): the key is DE32 + DE11 + DE7 (+ DE37 when present).
//!
//! An identical retransmission of a completed request gets the original answer
//! again; one still in flight waits and is answered once, with the same answer,
//! when the outcome is known; the same key with different content is a conflict
//! (the switch answers 94). The same table finds the original of an acquirer's 0400
//! reversal: DE90 names the original's DE11 and DE7, the reversal carries the
//! acquirer's DE32 (and usually the original's DE37), which together are the
//! original's key.
//!
//! **Sized by memory, not by a count.** A key is a fixed 32-byte slot (a keyed
//! 96-bit digest of the key, a 32-bit content digest, the insertion second, the
//! outcome packed into 12 bytes) in a ring kept in arrival order, plus its share of a hash
//! index of 4-byte slot numbers. The bank's answer itself is not kept when there is
//! a journal: a retransmission's answer is read back from the outcome record whose
//! sequence number the slot holds (see `core::recent`). Without a journal the answer
//! is kept in memory beside the slot, and counted against the same bound.
//!
//! Keys are remembered for the window (to the second). When a shard reaches its
//! bound, its oldest *answered* keys are evicted early, so the window shrinks under
//! load instead of requests being refused; the shortest window any shard still
//! guarantees is [`DedupTable::effective_window`]. A request still in flight is
//! never evicted (its slot moves to the back of the ring); only when every key of
//! a shard is in flight does a new request get `Full` (the caller answers 91).
//!
//! Keys come from acquirers, so they are hashed with the standard library's
//! randomly keyed SipHash, not the switch's fast hasher. The table is split into
//! shards, each behind its own short lock (never held across an `.await`).

use super::answer::Stored;
use super::fxhash::FxHasher;
use super::inflight::Stan;
use super::route::BankIndex;
use super::ResponseCode;
use crate::sync::lock;
use crate::wire::Message;
use bytes::Bytes;
use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Which date and time identify a request in its key.
///
/// ISO 8583:1987 names a request's original by its transmission date and time
/// (DE90 carries DE7); ISO 8583:1993 by its local date and time (DE56 carries
/// DE12). Requests from a 1993 acquirer, held in 1987 form, key on DE13 + DE12
/// (MMDDhhmmss), which is what their reversals' DE56 — translated into DE90 —
/// names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyTime {
    /// DE7, transmission date and time (ISO 8583:1987 acquirers).
    #[default]
    Transmission,
    /// DE13 + DE12, local date and time (ISO 8583:1993 acquirers).
    Local,
}

impl KeyTime {
    /// The rule for an acquirer speaking `version`.
    pub fn of(version: crate::wire::Version) -> KeyTime {
        match version {
            crate::wire::Version::Iso1987 => KeyTime::Transmission,
            crate::wire::Version::Iso1993 => KeyTime::Local,
        }
    }
}

impl DuplicateKey {
    /// The key of `msg` with its date and time by `time`; `None` when DE32, DE11
    /// or the date and time is absent or too long.
    pub fn of(msg: &Message, time: KeyTime) -> Option<DuplicateKey> {
        let mut key = DuplicateKey {
            bytes: [0; KEY_BYTES],
            len: 0,
        };
        key.push(msg.field(32)?, 11)?;
        key.push(msg.field(11)?, 6)?;
        match time {
            KeyTime::Transmission => key.push(msg.field(7)?, 10)?,
            KeyTime::Local => {
                let (date, clock) = (msg.field(13)?, msg.field(12)?);
                let mut local = [0u8; 10];
                let (d, c) = local.split_at_mut(4);
                d.copy_from_slice(date.get(..4).filter(|_| date.len() == 4)?);
                c.copy_from_slice(clock.get(..6).filter(|_| clock.len() == 6)?);
                key.push(&local, 10)?;
            }
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

/// A key as the table holds it: 64 bits of keyed SipHash (placing it in its shard
/// and index) and 32 more bits checking it (two distinct keys held at once are
/// taken for one with a chance of about one in 2^96 per pair).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Digest {
    hash: u64,
    check: u32,
}

/// What to do with a request, given what the table knows of its key.
#[derive(Debug)]
pub enum Verdict<W> {
    /// First time seen: process it; the table holds it as in flight until
    /// [`DedupTable::complete`] is called with the handle.
    New(W, EntryHandle),
    /// Seen and answered: send this answer again, once journal record `seq` is
    /// durable (0: nothing to wait for). A bank's answer without its bytes
    /// (`answer: None`) is read back from that record.
    Answered {
        /// What the original ended with.
        stored: Stored,
        /// The journal record of the outcome.
        seq: u64,
        /// The retransmission.
        waiter: W,
    },
    /// Same key still in flight: the waiter is kept and returned by `complete`.
    Waiting,
    /// Same key, different content: answer 94.
    Conflict(W),
    /// Every key of the shard is in flight, or too many waiters on the key: 91.
    Full(W),
}

/// What the table knows of the original a reversal names.
#[derive(Debug)]
pub enum Original<W> {
    /// Still in flight: the waiter is kept and returned by `complete`.
    Attached,
    /// Answered with this (a bank's answer without its bytes when there is a
    /// journal: a reversal needs only where the original went).
    Done(Stored, W),
    /// Not (or no longer) known.
    Absent(W),
    /// Too many waiters on it already.
    Full(W),
}

/// A request's entry while it is in flight: completes it without hashing again.
/// Valid until [`DedupTable::complete`] consumes it (an entry in flight is never
/// evicted, so the handle never dangles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryHandle {
    shard: u16,
    in_flight: u32,
}

// === slot layout ===

/// A slot's outcome, 96 bits: a 2-bit tag at the top, then the journal sequence
/// number of the outcome record (54 bits: 570 years at a million records a second;
/// all ones stands for `u64::MAX`, an outcome never journaled), then 40 bits of
/// detail: the in-flight record's index, the switch's code (an index into
/// [`ResponseCode::ALL`]), or the connector (16 bits) and link STAN (24 bits) a
/// bank's answer came through.
const TAG_SHIFT: u32 = 94;
const TAG_IN_FLIGHT: u128 = 0;
const TAG_SWITCH: u128 = 1;
const TAG_BANK: u128 = 2;
const SEQ_SHIFT: u32 = 40;
const SEQ_MASK: u64 = (1 << 54) - 1;
const DETAIL_MASK: u128 = (1 << SEQ_SHIFT) - 1;
const STAN_BITS: u32 = 24;
const _: () = assert!(super::inflight::STAN_MAX < 1 << STAN_BITS);

/// One key: 32 bytes, in arrival order in its shard's ring. Its content digest is
/// kept to 32 bits: a request reusing a key with other content passes for a
/// retransmission (gets the original's answer instead of 94) once in 2^32.
#[derive(Clone, Copy)]
struct Slot {
    /// The index's hash, in two halves (4-byte alignment keeps the slot at 32).
    hash: [u32; 2],
    check: u32,
    /// Seconds since the table's epoch when the key arrived.
    at_s: u32,
    content: u32,
    outcome: [u32; 3],
}

impl Slot {
    fn new(d: Digest, content: u64, at_s: u32, record: u32) -> Slot {
        let mut slot = Slot {
            hash: [d.hash as u32, (d.hash >> 32) as u32],
            check: d.check,
            at_s,
            content: fold(content),
            outcome: [0; 3],
        };
        slot.set(TAG_IN_FLIGHT << TAG_SHIFT | u128::from(record));
        slot
    }

    fn hash(&self) -> u64 {
        u64::from(self.hash[1]) << 32 | u64::from(self.hash[0])
    }

    fn is(&self, d: Digest) -> bool {
        self.hash() == d.hash && self.check == d.check
    }

    fn get(&self) -> u128 {
        let [a, b, c] = self.outcome;
        u128::from(c) << 64 | u128::from(b) << 32 | u128::from(a)
    }

    fn set(&mut self, o: u128) {
        self.outcome = [o as u32, (o >> 32) as u32, (o >> 64) as u32];
    }

    fn tag(&self) -> u128 {
        self.get() >> TAG_SHIFT
    }

    fn in_flight(&self) -> Option<u32> {
        (self.tag() == TAG_IN_FLIGHT).then_some(self.get() as u32)
    }

    fn seq(&self) -> u64 {
        match (self.get() >> SEQ_SHIFT) as u64 & SEQ_MASK {
            SEQ_MASK => u64::MAX,
            seq => seq,
        }
    }

    /// Packs what `stored` needs kept (not a bank answer's bytes) and `seq`.
    fn settle(&mut self, stored: &Stored, seq: u64) {
        let seq = u128::from(seq.min(SEQ_MASK)) << SEQ_SHIFT;
        let (tag, detail) = match stored {
            Stored::Switch(code) => {
                let index = ResponseCode::ALL.iter().position(|c| c == code);
                (TAG_SWITCH, index.unwrap_or(0) as u128)
            }
            Stored::Bank {
                connector,
                link_stan,
                ..
            } => {
                let route = u64::from(*connector) << STAN_BITS | u64::from(link_stan.value());
                (TAG_BANK, u128::from(route))
            }
        };
        self.set(tag << TAG_SHIFT | seq | detail);
    }

    /// What the slot keeps of an answered request (`answer`: its bytes, when kept
    /// in memory), or `None` while in flight.
    fn stored(&self, answer: Option<&Bytes>) -> Option<Stored> {
        let detail = (self.get() & DETAIL_MASK) as u64;
        match self.tag() {
            TAG_SWITCH => {
                let code = ResponseCode::ALL.get(detail as usize).copied();
                Some(Stored::Switch(
                    code.unwrap_or(ResponseCode::SystemMalfunction),
                ))
            }
            TAG_BANK => Some(Stored::Bank {
                connector: (detail >> STAN_BITS) as BankIndex,
                link_stan: Stan::from_value((detail & ((1 << STAN_BITS) - 1)) as u32)?,
                answer: answer.cloned(),
            }),
            _ => None,
        }
    }
}

/// A content digest as a slot keeps it.
fn fold(content: u64) -> u32 {
    (content ^ content >> 32) as u32
}

/// Bytes of one slot.
pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();
/// Bytes a key costs beside its slot when answers are kept in memory (the handle
/// of the answer's bytes; the bytes themselves are counted as they come).
const KEPT_ANSWER_BYTES: usize = std::mem::size_of::<Option<Bytes>>();
/// Bytes of one bucket of a shard's index: a slot number and hashbrown's control byte.
const INDEX_BUCKET_BYTES: usize = 4 + 1;
/// Shards of a table (a power of two).
pub const SHARDS: usize = 32;

/// Keys one shard holds within `budget` bytes when each costs `slot_cost` bytes
/// besides the index. The index is a hashbrown table of `buckets` (a power of two)
/// kept at most 7/16 full: there, hashbrown rehashes in place instead of growing,
/// and removals leave almost no tombstones, so the index never outgrows `buckets`
/// and never stalls a shard to clean up.
fn shard_capacity(budget: usize, slot_cost: usize) -> usize {
    let mut best = 0;
    let mut buckets = 16usize;
    while let Some(index) = buckets
        .checked_mul(INDEX_BUCKET_BYTES)
        .filter(|&b| b + 16 < budget)
    {
        let by_index = buckets / 8 * 7 / 2;
        let by_bytes = (budget - index - 16) / slot_cost;
        best = best.max(by_index.min(by_bytes));
        buckets *= 2;
    }
    best
}

/// Keys a table of `memory_max_bytes` holds (answers kept in memory or not).
pub fn capacity_for(memory_max_bytes: usize, keep_answers: bool) -> usize {
    let budget = memory_max_bytes / SHARDS;
    let capacity = if keep_answers {
        shard_capacity(budget / 2, SLOT_BYTES + KEPT_ANSWER_BYTES)
    } else {
        shard_capacity(budget, SLOT_BYTES)
    };
    capacity * SHARDS
}

// === the table ===

/// An in-flight request's record: where its slot is now, and what waits for it.
struct InFlight<W> {
    /// Its slot's number (`u32::MAX`: this record is free).
    number: u32,
    waiters: Vec<W>,
}

/// One shard: slots in arrival order (a ring numbered by wrapping `u32`s), an index
/// from digest to slot number, and the records of the requests in flight.
struct Shard<W> {
    index: HashTable<u32>,
    slots: VecDeque<Slot>,
    /// The bank answers' bytes, beside their slots (only when answers are kept in
    /// memory: no journal).
    answers: VecDeque<Option<Bytes>>,
    answer_bytes: usize,
    /// The number of `slots[0]`.
    front: u32,
    in_flight: Vec<InFlight<W>>,
    free: Vec<u32>,
    in_flight_count: usize,
    /// Slots held at most.
    capacity: usize,
    /// Bytes of kept answers at most.
    answer_bytes_max: usize,
    /// The arrival second of the newest key evicted before its window passed.
    evicted_at_s: Option<u32>,
}

/// Keys within the window, bounded by memory, split into shards.
pub struct DedupTable<W> {
    shards: Box<[CachePadded<Mutex<Shard<W>>>]>,
    hasher: RandomState,
    window_s: u32,
    waiters_max: usize,
    keep_answers: bool,
    /// Slot times count seconds from here.
    epoch: Instant,
    evicted_early: AtomicU64,
}

impl<W> DedupTable<W> {
    /// A table remembering keys for `window`, within `memory_max_bytes` (see
    /// [`capacity_for`]), with at most `waiters_max` retransmissions (or reversals)
    /// waiting on one request in flight. `keep_answers`: bank answers are kept in
    /// memory (no journal to read them back from). Times before `now` minus the
    /// window count as that moment.
    pub fn new(
        window: Duration,
        memory_max_bytes: usize,
        waiters_max: usize,
        keep_answers: bool,
        now: Instant,
    ) -> DedupTable<W> {
        let budget = memory_max_bytes / SHARDS;
        let (capacity, answer_bytes_max) = if keep_answers {
            let slots = shard_capacity(budget / 2, SLOT_BYTES + KEPT_ANSWER_BYTES);
            (slots, budget / 2)
        } else {
            (shard_capacity(budget, SLOT_BYTES), 0)
        };
        let shards = (0..SHARDS)
            .map(|_| {
                CachePadded::new(Mutex::new(Shard {
                    index: HashTable::new(),
                    slots: VecDeque::new(),
                    answers: VecDeque::new(),
                    answer_bytes: 0,
                    front: 0,
                    in_flight: Vec::new(),
                    free: Vec::new(),
                    in_flight_count: 0,
                    capacity: capacity.max(1),
                    answer_bytes_max,
                    evicted_at_s: None,
                }))
            })
            .collect();
        DedupTable {
            shards,
            hasher: RandomState::new(),
            window_s: u32::try_from(window.as_secs().max(1)).unwrap_or(u32::MAX),
            waiters_max,
            keep_answers,
            epoch: now.checked_sub(window).unwrap_or(now),
            evicted_early: AtomicU64::new(0),
        }
    }

    /// The window keys are remembered for when memory allows.
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window_s.into())
    }

    /// The window the table guarantees at `now`: a key that arrived within it is
    /// still held in every shard. Shorter than [`DedupTable::window`] while keys
    /// are being evicted early.
    pub fn effective_window(&self, now: Instant) -> Duration {
        let now_s = self.secs(now);
        let shortest = self
            .shards
            .iter()
            .filter_map(|s| lock(s).evicted_at_s)
            .filter(|&at| now_s < at.saturating_add(self.window_s))
            .map(|at| now_s - at)
            .min();
        Duration::from_secs(shortest.unwrap_or(self.window_s).into())
    }

    /// Keys evicted before their window passed, since the table was made.
    pub fn evicted_early(&self) -> u64 {
        self.evicted_early.load(Ordering::Relaxed)
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).slots.len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys held at most.
    pub fn capacity(&self) -> usize {
        self.shards.iter().map(|s| lock(s).capacity).sum()
    }

    /// Bytes the table holds for its keys now: slots, index, kept answers (the
    /// records of requests in flight, bounded by the requests in flight, aside).
    pub fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = lock(s);
                s.slots.capacity() * SLOT_BYTES
                    + s.answers.capacity() * KEPT_ANSWER_BYTES
                    + s.answer_bytes
                    + s.index.allocation_size()
            })
            .sum()
    }

    fn secs(&self, at: Instant) -> u32 {
        let s = at.saturating_duration_since(self.epoch).as_secs();
        u32::try_from(s).unwrap_or(u32::MAX)
    }

    fn digest(&self, key: &DuplicateKey) -> Digest {
        let mut check = FxHasher::default();
        check.write(&key.bytes[..usize::from(key.len)]);
        Digest {
            hash: self.hasher.hash_one(key),
            check: (check.finish() >> 32) as u32,
        }
    }

    fn shard(&self, d: Digest) -> (u16, &Mutex<Shard<W>>) {
        // Inside a shard, hashbrown places a key by the hash's low bits and tags it
        // with the top 7: the shard is picked by bits used by neither.
        let i = (d.hash >> 40) as usize % SHARDS;
        (i as u16, &self.shards[i])
    }

    /// Classifies a request with `key` and `content` digest arriving at `now`.
    pub fn check(&self, key: &DuplicateKey, content: u64, now: Instant, waiter: W) -> Verdict<W> {
        let d = self.digest(key);
        let now_s = self.secs(now);
        let (shard_index, shard) = self.shard(d);
        let mut s = lock(shard);
        s.expire(now_s, self.window_s, self.keep_answers);
        let Some(number) = s.find(d) else {
            return match s.open(d, content, now_s, self) {
                Some(in_flight) => Verdict::New(
                    waiter,
                    EntryHandle {
                        shard: shard_index,
                        in_flight,
                    },
                ),
                None => Verdict::Full(waiter),
            };
        };
        let (slot, answer) = s.get(number);
        if slot.content != fold(content) {
            return Verdict::Conflict(waiter);
        }
        if let Some(stored) = slot.stored(answer) {
            let seq = slot.seq();
            return Verdict::Answered {
                stored,
                seq,
                waiter,
            };
        }
        match s.attach(&slot, waiter, self.waiters_max) {
            Ok(()) => Verdict::Waiting,
            Err(waiter) => Verdict::Full(waiter),
        }
    }

    /// Looks up the original named by a reversal; while it is in flight, `waiter`
    /// is attached to it and returned by its `complete`.
    pub fn original(&self, key: &DuplicateKey, waiter: W) -> Original<W> {
        let d = self.digest(key);
        let mut s = lock(self.shard(d).1);
        let Some(number) = s.find(d) else {
            return Original::Absent(waiter);
        };
        let (slot, answer) = s.get(number);
        if let Some(stored) = slot.stored(answer) {
            return Original::Done(stored, waiter);
        }
        match s.attach(&slot, waiter, self.waiters_max) {
            Ok(()) => Original::Attached,
            Err(waiter) => Original::Full(waiter),
        }
    }

    /// What the request with `key` ended with, and its outcome's seq, if answered.
    pub fn stored(&self, key: &DuplicateKey) -> Option<(Stored, u64)> {
        let d = self.digest(key);
        let s = lock(self.shard(d).1);
        let (slot, answer) = s.get(s.find(d)?);
        Some((slot.stored(answer)?, slot.seq()))
    }

    /// Records the outcome of the request `entry` was opened for (released once
    /// journal record `seq` is durable); returns what waited for it.
    pub fn complete(&self, entry: EntryHandle, stored: &Stored, seq: u64) -> Vec<W> {
        let Some(shard) = self.shards.get(usize::from(entry.shard)) else {
            return Vec::new();
        };
        let mut s = lock(shard);
        s.complete(entry.in_flight, stored, seq, self)
    }

    /// Adds a request that arrived at `at` before a restart (read from the
    /// journal), in flight: it is completed like any other. `None` when its key
    /// is already held or its shard is all in flight.
    pub fn restore(&self, key: &DuplicateKey, content: u64, at: Instant) -> Option<EntryHandle> {
        let d = self.digest(key);
        let at_s = self.secs(at);
        let (shard, locked) = self.shard(d);
        let mut s = lock(locked);
        s.expire(at_s, self.window_s, self.keep_answers);
        if s.find(d).is_some() {
            return None;
        }
        let in_flight = s.open(d, content, at_s, self)?;
        Some(EntryHandle { shard, in_flight })
    }

    /// Forgets keys past the window even where no request comes (the daemon calls
    /// it once a second).
    pub fn expire(&self, now: Instant) {
        let now_s = self.secs(now);
        for shard in self.shards.iter() {
            lock(shard).expire(now_s, self.window_s, self.keep_answers);
        }
    }
}

impl<W> Shard<W> {
    fn position(&self, number: u32) -> usize {
        number.wrapping_sub(self.front) as usize
    }

    fn get(&self, number: u32) -> (Slot, Option<&Bytes>) {
        let at = self.position(number);
        let answer = self.answers.get(at).and_then(Option::as_ref);
        (self.slots[at], answer)
    }

    fn find(&self, d: Digest) -> Option<u32> {
        let (slots, front) = (&self.slots, self.front);
        self.index
            .find(d.hash, |&n| slots[n.wrapping_sub(front) as usize].is(d))
            .copied()
    }

    /// Appends `slot` (and its kept answer) at the back of the ring and indexes it.
    fn push(&mut self, slot: Slot, answer: Option<Bytes>, keep_answers: bool) -> u32 {
        let number = self.front.wrapping_add(self.slots.len() as u32);
        if self.slots.len() == self.slots.capacity() {
            // Grow by an eighth, never past the bound: at most an eighth of the
            // ring is ever unused (its pages are touched as the ring turns).
            let want = (self.slots.len() + self.slots.len() / 8).clamp(16, self.capacity.max(16));
            self.slots.reserve_exact(want - self.slots.len());
            if keep_answers {
                self.answers.reserve_exact(want - self.answers.len());
            }
        }
        self.slots.push_back(slot);
        if keep_answers {
            self.answer_bytes += answer.as_ref().map_or(0, Bytes::len);
            self.answers.push_back(answer);
        }
        let Shard {
            index,
            slots,
            front,
            ..
        } = self;
        let front = *front;
        index.insert_unique(slot.hash(), number, |&n| {
            slots[n.wrapping_sub(front) as usize].hash()
        });
        number
    }

    /// Takes the oldest slot off the ring. One in flight goes to the back (its
    /// record follows it) and `None` comes back; otherwise the removed slot.
    fn pop(&mut self, keep_answers: bool) -> Option<Slot> {
        let slot = self.slots.pop_front()?;
        let answer = self.answers.pop_front().flatten();
        let number = self.front;
        self.front = self.front.wrapping_add(1);
        if let Ok(entry) = self.index.find_entry(slot.hash(), |&n| n == number) {
            entry.remove();
        }
        self.answer_bytes -= answer.as_ref().map_or(0, Bytes::len);
        let Some(record) = slot.in_flight() else {
            return Some(slot);
        };
        let moved = self.push(slot, answer, keep_answers);
        if let Some(r) = self.in_flight.get_mut(record as usize) {
            r.number = moved;
        }
        None
    }

    /// Drops the answered keys whose window has passed.
    fn expire(&mut self, now_s: u32, window_s: u32, keep: bool) {
        // Each slot is looked at once at most (those in flight move to the back).
        for _ in 0..self.slots.len() {
            match self.slots.front() {
                Some(s) if s.at_s.saturating_add(window_s) <= now_s => {
                    self.pop(keep);
                }
                _ => return,
            }
        }
    }

    /// Evicts the oldest answered keys while the shard is over its bounds (`one_more`:
    /// with room for one more key), counting those whose window had not passed at
    /// `now_s`; false when every key is in flight.
    fn make_room<T>(&mut self, now_s: u32, one_more: bool, table: &DedupTable<T>) -> bool {
        let keep = table.keep_answers;
        loop {
            let full = one_more && self.slots.len() >= self.capacity;
            let answers_over = keep && self.answer_bytes > self.answer_bytes_max;
            if !full && !answers_over {
                return true;
            }
            if self.in_flight_count >= self.slots.len() {
                return false;
            }
            let Some(gone) = self.pop(keep) else {
                continue; // in flight: moved to the back
            };
            if gone.at_s.saturating_add(table.window_s) > now_s {
                table.evicted_early.fetch_add(1, Ordering::Relaxed);
                self.evicted_at_s = Some(self.evicted_at_s.unwrap_or(0).max(gone.at_s));
            }
        }
    }

    /// Opens a new key in flight; returns its record's index, or `None` when the
    /// shard is all in flight.
    fn open<T>(
        &mut self,
        d: Digest,
        content: u64,
        now_s: u32,
        table: &DedupTable<T>,
    ) -> Option<u32> {
        if !self.make_room(now_s, true, table) {
            return None;
        }
        let record = match self.free.pop() {
            Some(i) => i,
            None => {
                self.in_flight.push(InFlight {
                    number: u32::MAX,
                    waiters: Vec::new(),
                });
                (self.in_flight.len() - 1) as u32
            }
        };
        let slot = Slot::new(d, content, now_s, record);
        let number = self.push(slot, None, table.keep_answers);
        self.in_flight[record as usize].number = number;
        self.in_flight_count += 1;
        Some(record)
    }

    /// Keeps `waiter` on the in-flight request of `slot`, within `waiters_max`.
    fn attach(&mut self, slot: &Slot, waiter: W, waiters_max: usize) -> Result<(), W> {
        match slot
            .in_flight()
            .and_then(|r| self.in_flight.get_mut(r as usize))
        {
            Some(r) if r.waiters.len() < waiters_max => {
                r.waiters.push(waiter);
                Ok(())
            }
            _ => Err(waiter),
        }
    }

    fn complete<T>(
        &mut self,
        record: u32,
        stored: &Stored,
        seq: u64,
        table: &DedupTable<T>,
    ) -> Vec<W> {
        let Some(r) = self.in_flight.get_mut(record as usize) else {
            return Vec::new();
        };
        let number = std::mem::replace(&mut r.number, u32::MAX);
        if number == u32::MAX {
            debug_assert!(false, "an entry completed twice");
            return Vec::new();
        }
        let waiters = std::mem::take(&mut r.waiters);
        self.free.push(record);
        self.in_flight_count -= 1;
        let at = self.position(number);
        self.slots[at].settle(stored, seq);
        if table.keep_answers {
            if let Stored::Bank {
                answer: Some(bytes),
                ..
            } = stored
            {
                self.answer_bytes += bytes.len();
                self.answers[at] = Some(bytes.clone());
            }
            // No clock here: early evictions are judged against the key's arrival,
            // which may count one as on time that was a little early.
            let now_s = self.slots[at].at_s;
            self.make_room(now_s, false, table);
        }
        waiters
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

    /// Key `i` of a run of distinct keys (DE11 and DE37 vary).
    fn key(i: u32) -> DuplicateKey {
        let mut k = DuplicateKey {
            bytes: [0; KEY_BYTES],
            len: 0,
        };
        k.push(b"100001", 11).unwrap();
        k.push(format!("{:06}", i % 1_000_000).as_bytes(), 6)
            .unwrap();
        k.push(b"1126093000", 10).unwrap();
        k.push(format!("{i:012}").as_bytes(), 12).unwrap();
        k
    }

    fn bank(seq_stan: u32) -> Stored {
        Stored::Bank {
            connector: 3,
            link_stan: Stan::from_value(seq_stan).unwrap(),
            answer: Some(Bytes::from_static(b"0210 answer")),
        }
    }

    #[test]
    fn keys_and_digests() {
        let a = msg(Mti::FINANCIAL, b"000001", b"000000001000");
        let repeat = msg(Mti(*b"0201"), b"000001", b"000000001000");
        let changed = msg(Mti::FINANCIAL, b"000001", b"000000009999");
        let other = msg(Mti::FINANCIAL, b"000002", b"000000001000");
        assert_eq!(
            DuplicateKey::of(&a, KeyTime::Transmission),
            DuplicateKey::of(&changed, KeyTime::Transmission)
        );
        assert_ne!(
            DuplicateKey::of(&a, KeyTime::Transmission),
            DuplicateKey::of(&other, KeyTime::Transmission)
        );
        assert_eq!(
            content_digest(&a),
            content_digest(&repeat),
            "0201 repeats its 0200"
        );
        assert_ne!(content_digest(&a), content_digest(&changed));
        assert_eq!(SLOT_BYTES, 32);
    }

    #[test]
    fn verdicts_over_a_request_life() {
        let window = Duration::from_secs(60);
        let t0 = Instant::now();
        let t: DedupTable<u32> = DedupTable::new(window, 1 << 20, 2, false, t0);
        let k = key(1);
        let Verdict::New(1, entry) = t.check(&k, 7, t0, 1) else {
            panic!("new")
        };
        assert!(matches!(t.check(&k, 7, t0, 2), Verdict::Waiting));
        assert!(matches!(t.check(&k, 7, t0, 3), Verdict::Waiting));
        assert!(
            matches!(t.check(&k, 7, t0, 4), Verdict::Full(4)),
            "waiters bounded"
        );
        assert!(matches!(t.check(&k, 8, t0, 5), Verdict::Conflict(5)));
        assert_eq!(t.complete(entry, &bank(42), 7), vec![2, 3]);
        match t.check(&k, 7, t0 + Duration::from_secs(1), 6) {
            Verdict::Answered {
                stored:
                    Stored::Bank {
                        connector: 3,
                        link_stan,
                        answer: None,
                    },
                seq: 7,
                waiter: 6,
            } if link_stan.value() == 42 => {}
            other => panic!("a journaled table keeps route and seq only: {other:?}"),
        }
        t.expire(t0 + window - Duration::from_secs(1));
        assert_eq!(t.len(), 1, "remembered for the window");
        t.expire(t0 + window);
        assert!(t.is_empty(), "forgotten once it passed");
        assert!(matches!(t.check(&k, 7, t0 + window, 9), Verdict::New(9, _)));
        assert_eq!(t.evicted_early(), 0);
        assert_eq!(t.effective_window(t0 + window), window);
    }

    #[test]
    fn without_a_journal_answers_are_kept_and_switch_codes_always() {
        let t0 = Instant::now();
        let t: DedupTable<()> = DedupTable::new(Duration::from_secs(60), 1 << 20, 2, true, t0);
        let Verdict::New((), a) = t.check(&key(1), 1, t0, ()) else {
            panic!()
        };
        let Verdict::New((), b) = t.check(&key(2), 2, t0, ()) else {
            panic!()
        };
        t.complete(a, &bank(5), 11);
        t.complete(b, &Stored::Switch(ResponseCode::LateResponse), u64::MAX);
        match t.stored(&key(1)) {
            Some((
                Stored::Bank {
                    answer: Some(a), ..
                },
                11,
            )) => assert_eq!(&a[..], b"0210 answer"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.stored(&key(2)),
            Some((Stored::Switch(ResponseCode::LateResponse), u64::MAX))
        ));
    }

    /// Fills a small table far past its bound: the oldest answered keys go early,
    /// the effective window shrinks and is reported, keys in flight stay, and only
    /// a shard entirely in flight refuses.
    #[test]
    fn past_its_bound_the_table_evicts_the_oldest_answered_keys_early() {
        let window = Duration::from_secs(300);
        let t0 = Instant::now();
        let t: DedupTable<()> = DedupTable::new(window, 1 << 20, 1, false, t0);
        let capacity = t.capacity();
        assert_eq!(capacity, capacity_for(1 << 20, false));
        // In flight from the start: never evicted, whatever comes after.
        let mut held = Vec::new();
        for i in 0..64 {
            let Verdict::New((), e) = t.check(&key(i), 1, t0, ()) else {
                panic!()
            };
            held.push(e);
        }
        // Then three times the bound in keys over 100 s, each answered at once.
        let n = capacity as u32 * 3;
        for i in 64..n {
            let at = t0 + Duration::from_millis(u64::from(i) * 100_000 / u64::from(n));
            match t.check(&key(i), 1, at, ()) {
                Verdict::New((), e) => {
                    t.complete(e, &Stored::Switch(ResponseCode::Approved), 0);
                }
                other => panic!("key {i}: {other:?}"),
            }
        }
        let now = t0 + Duration::from_secs(100);
        assert!(t.len() <= capacity, "{} > {capacity}", t.len());
        assert!(t.evicted_early() >= u64::from(n) - capacity as u64 - 64);
        let effective = t.effective_window(now);
        assert!(effective < Duration::from_secs(100), "{effective:?}");
        assert!(effective > Duration::ZERO);
        // The newest keys are all still known; the oldest answered are not.
        for i in n - 100..n {
            assert!(t.stored(&key(i)).is_some(), "key {i}");
        }
        assert!(t.stored(&key(64)).is_none());
        // Those in flight were kept and complete normally.
        for (i, e) in held.into_iter().enumerate() {
            assert!(matches!(
                t.check(&key(i as u32), 1, now, ()),
                Verdict::Full(()) | Verdict::Waiting
            ));
            t.complete(e, &Stored::Switch(ResponseCode::Approved), 0);
            assert!(t.stored(&key(i as u32)).is_some(), "in-flight key {i} kept");
        }
        // Memory stays within the bound, at ≤ 64 bytes a key.
        assert!(t.bytes() <= 1 << 20, "{} bytes", t.bytes());
        let per_key = t.bytes() / t.len();
        assert!(per_key <= 64, "{per_key} bytes a key");
        // Once the window passes with no eviction, the full window is back.
        assert_eq!(t.effective_window(now + window), window);
    }

    #[test]
    fn a_shard_entirely_in_flight_refuses_new_keys() {
        let t0 = Instant::now();
        let t: DedupTable<()> = DedupTable::new(Duration::from_secs(60), 1 << 20, 1, false, t0);
        let per_shard = t.capacity() / SHARDS;
        let mut full = 0;
        let mut opened = Vec::new();
        for i in 0..(t.capacity() as u32 * 2) {
            match t.check(&key(i), 1, t0, ()) {
                Verdict::New((), e) => opened.push(e),
                Verdict::Full(()) => full += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(opened.len(), per_shard * SHARDS, "every slot in flight");
        assert!(full > 0);
        assert_eq!(t.evicted_early(), 0, "nothing in flight is evicted");
        // One answered key frees room for one new key in its shard.
        let first = opened[0];
        t.complete(first, &Stored::Switch(ResponseCode::Approved), 0);
        let taken = (t.capacity() as u32 * 2..t.capacity() as u32 * 4)
            .filter(|&i| matches!(t.check(&key(i), 1, t0, ()), Verdict::New(..)))
            .count();
        assert_eq!(taken, 1);
        assert_eq!(t.evicted_early(), 1);
    }

    #[test]
    fn keys_restored_with_their_past_arrival_expire_on_time() {
        let window = Duration::from_secs(60);
        let now = Instant::now() + window * 2;
        let t: DedupTable<()> = DedupTable::new(window, 1 << 20, 1, false, now);
        let e = t
            .restore(&key(1), 1, now - Duration::from_secs(50))
            .unwrap();
        assert!(t.restore(&key(1), 1, now).is_none(), "already held");
        t.complete(e, &bank(9), 3);
        t.expire(now);
        assert!(matches!(t.stored(&key(1)), Some((_, 3))));
        t.expire(now + Duration::from_secs(10));
        assert!(t.is_empty(), "its window counted from its arrival");
    }

    #[test]
    fn a_reversal_finds_its_original_by_de90() {
        let t0 = Instant::now();
        let t: DedupTable<&'static str> =
            DedupTable::new(Duration::from_secs(60), 1 << 20, 2, false, t0);
        let original = msg(Mti::FINANCIAL, b"000042", b"000000001000");
        let key = DuplicateKey::of(&original, KeyTime::Transmission).unwrap();
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
        let Verdict::New("o", entry) = t.check(&key, content_digest(&original), t0, "o") else {
            panic!()
        };
        assert!(matches!(t.original(&named, "r"), Original::Attached));
        assert_eq!(t.complete(entry, &bank(77), 1), vec!["r"]);
        match t.original(&named, "r2") {
            Original::Done(stored, "r2") => assert_eq!(
                stored.reversal_route(),
                super::super::answer::ReversalRoute::Bank {
                    connector: 3,
                    link_stan: Stan::from_value(77).unwrap()
                }
            ),
            other => panic!("{other:?}"),
        }
        let without_rrn = DuplicateKey::of_original(&reversal, false).unwrap();
        assert_ne!(without_rrn, key);
    }
}
