//! Requests in flight on one bank link: STAN allocation, matching, deadline sweep.
//!
//! One table per link, owned by that link. Deadlines sit in one min-heap ordered by
//! (deadline, STAN, generation), swept in order; an answered request leaves a stale
//! heap entry that is skipped when it surfaces, and the heap is rebuilt when stale
//! entries outnumber live ones, so its size stays within a constant factor of the
//! table's bound.

use super::fxhash::FxHashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Slots reserved up front; the table grows (during warm-up) to what is in flight.
const INITIAL_SLOTS: usize = 256;

/// STANs are six digits; zero is not used.
pub const STAN_MAX: u32 = 999_999;

/// A system trace audit number unique among the requests in flight on one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Stan(u32);

impl Stan {
    /// The STAN for DE11 digits, if they are exactly six digits.
    pub fn from_de11(field: &[u8]) -> Option<Stan> {
        if field.len() != 6 {
            return None;
        }
        field
            .iter()
            .try_fold(0u32, |acc, &b| {
                b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
            })
            .map(Stan)
    }

    /// The STAN with this value, if it is a valid STAN (1..=999,999).
    pub fn from_value(value: u32) -> Option<Stan> {
        (1..=STAN_MAX).contains(&value).then_some(Stan(value))
    }

    /// Six ASCII digits for DE11.
    pub fn to_de11(self) -> [u8; 6] {
        let mut out = [b'0'; 6];
        let mut v = self.0;
        for slot in out.iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out
    }

    /// The numeric value.
    pub fn value(self) -> u32 {
        self.0
    }
}

/// The table is at its bound; the value is handed back.
#[derive(Debug)]
pub struct TableFull<T>(pub T);

struct Slot<T> {
    generation: u64,
    deadline: Instant,
    value: T,
}

/// Requests in flight on one link, keyed by the STAN the switch gave them.
pub struct InflightTable<T> {
    capacity: usize,
    next: u32,
    generation: u64,
    slots: FxHashMap<u32, Slot<T>>,
    deadlines: BinaryHeap<Reverse<(Instant, u32, u64)>>,
}

impl<T> InflightTable<T> {
    /// A table holding at most `capacity` requests (clamped to the STAN space).
    pub fn new(capacity: usize) -> InflightTable<T> {
        let capacity = capacity.clamp(1, STAN_MAX as usize);
        InflightTable {
            capacity,
            next: 1,
            generation: 0,
            // Start small and grow to the working set: a table sized for the bound
            // would spread a few hundred live entries over megabytes of cache misses.
            slots: FxHashMap::with_capacity_and_hasher(
                capacity.min(INITIAL_SLOTS),
                Default::default(),
            ),
            deadlines: BinaryHeap::with_capacity(capacity.min(INITIAL_SLOTS)),
        }
    }

    /// Starts the STAN counter at `stan` (1..=999,999); for tests of wrap-around.
    pub fn with_next_stan(mut self, stan: u32) -> InflightTable<T> {
        self.next = stan.clamp(1, STAN_MAX);
        self
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Gives `value` the first free STAN from `first` on (1..=999,999; a STAN
    /// drawn from a counter shared by all links to one bank, so that STANs are
    /// unique per bank, not only per link) and remembers it until `deadline`.
    pub fn insert_from(
        &mut self,
        first: u32,
        deadline: Instant,
        value: T,
    ) -> Result<Stan, TableFull<T>> {
        self.insert_from_mut(first, deadline, value)
            .map(|(stan, _)| stan)
    }

    /// As [`InflightTable::insert_from`], also returning the value where it now
    /// lies (no second lookup to use it).
    pub fn insert_from_mut(
        &mut self,
        first: u32,
        deadline: Instant,
        value: T,
    ) -> Result<(Stan, &mut T), TableFull<T>> {
        self.next = first.clamp(1, STAN_MAX);
        self.insert_mut(deadline, value)
    }

    /// Gives `value` the next free STAN and remembers it until `deadline`.
    pub fn insert(&mut self, deadline: Instant, value: T) -> Result<Stan, TableFull<T>> {
        self.insert_mut(deadline, value).map(|(stan, _)| stan)
    }

    fn insert_mut(&mut self, deadline: Instant, value: T) -> Result<(Stan, &mut T), TableFull<T>> {
        if self.slots.len() >= self.capacity {
            return Err(TableFull(value));
        }
        // Capacity < STAN space, so a free STAN exists and the probe ends.
        while self.slots.contains_key(&self.next) {
            self.advance();
        }
        let stan = self.next;
        self.advance();
        self.generation += 1;
        let generation = self.generation;
        self.deadlines.push(Reverse((deadline, stan, generation)));
        let slot = Slot {
            generation,
            deadline,
            value,
        };
        let slot = self.slots.entry(stan).insert_entry(slot).into_mut();
        Ok((Stan(stan), &mut slot.value))
    }

    fn advance(&mut self) {
        self.next = if self.next >= STAN_MAX {
            1
        } else {
            self.next + 1
        };
    }

    /// The request in flight under `stan`, if any.
    pub fn get(&self, stan: Stan) -> Option<&T> {
        self.slots.get(&stan.0).map(|s| &s.value)
    }

    /// Takes the request an answer with `stan` belongs to.
    pub fn take(&mut self, stan: Stan) -> Option<T> {
        let slot = self.slots.remove(&stan.0)?;
        self.compact();
        Some(slot.value)
    }

    /// The earliest deadline still pending.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((deadline, stan, generation))) = self.deadlines.peek().copied() {
            match self.slots.get(&stan) {
                Some(slot) if slot.generation == generation => return Some(deadline),
                _ => {
                    self.deadlines.pop();
                }
            }
        }
        None
    }

    /// Removes every request whose deadline is at or before `now`, in deadline order.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<(Stan, T)>) {
        while let Some(deadline) = self.next_deadline() {
            if deadline > now {
                break;
            }
            if let Some(Reverse((_, stan, _))) = self.deadlines.pop() {
                if let Some(slot) = self.slots.remove(&stan) {
                    out.push((Stan(stan), slot.value));
                }
            }
        }
    }

    /// Removes everything (the link is gone), in no particular order.
    pub fn drain(&mut self) -> impl Iterator<Item = (Stan, T)> + '_ {
        self.deadlines.clear();
        self.slots
            .drain()
            .map(|(stan, slot)| (Stan(stan), slot.value))
    }

    fn compact(&mut self) {
        if self.deadlines.len() > 2 * self.slots.len() + 1024 {
            let slots = &self.slots;
            self.deadlines.retain(|Reverse((_, stan, generation))| {
                slots.get(stan).is_some_and(|s| s.generation == *generation)
            });
        }
    }

    /// Deadline of the request under `stan`.
    pub fn deadline(&self, stan: Stan) -> Option<Instant> {
        self.slots.get(&stan.0).map(|s| s.deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stan_wraps_around_and_skips_stans_in_flight() {
        let t0 = Instant::now();
        let mut t = InflightTable::new(10).with_next_stan(STAN_MAX - 1);
        let a = t.insert(t0, 'a').unwrap();
        let b = t.insert(t0, 'b').unwrap();
        let c = t.insert(t0, 'c').unwrap();
        assert_eq!(
            (a.value(), b.value(), c.value()),
            (STAN_MAX - 1, STAN_MAX, 1)
        );
        assert_eq!(c.to_de11(), *b"000001");
        assert_eq!(Stan::from_de11(b"999999"), Some(b));
        // Wrap all the way round: STAN 999,998 is still in flight and is skipped.
        let mut t = InflightTable::new(3).with_next_stan(STAN_MAX);
        let x = t.insert(t0, 1).unwrap();
        assert_eq!(x.value(), STAN_MAX);
        let y = t.insert(t0, 2).unwrap();
        assert_eq!(y.value(), 1);
        t.take(y);
        let mut t2 = InflightTable::new(2).with_next_stan(5);
        let s5 = t2.insert(t0, ()).unwrap();
        t2.next = 5;
        let s6 = t2.insert(t0, ()).unwrap();
        assert_eq!((s5.value(), s6.value()), (5, 6));
        assert!(t2.insert(t0, ()).is_err(), "bound reached");
    }

    #[test]
    fn expire_in_deadline_order_skips_answered() {
        let t0 = Instant::now();
        let mut t = InflightTable::new(100);
        let s1 = t.insert(t0 + Duration::from_millis(30), "late").unwrap();
        let s2 = t.insert(t0 + Duration::from_millis(10), "early").unwrap();
        let s3 = t
            .insert(t0 + Duration::from_millis(20), "answered")
            .unwrap();
        assert_eq!(t.take(s3), Some("answered"));
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(10)));
        let mut out = Vec::new();
        t.expire(t0 + Duration::from_millis(25), &mut out);
        assert_eq!(out, vec![(s2, "early")]);
        out.clear();
        t.expire(t0 + Duration::from_millis(30), &mut out);
        assert_eq!(out, vec![(s1, "late")]);
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn heap_stays_bounded_when_answers_arrive() {
        let t0 = Instant::now();
        let mut t = InflightTable::new(16);
        for i in 0..100_000u64 {
            let s = t.insert(t0 + Duration::from_secs(5), i).unwrap();
            assert_eq!(t.take(s), Some(i));
        }
        assert!(t.deadlines.len() <= 2 * 16 + 1024 + 1);
    }
}
