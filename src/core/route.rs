//! Routing: DE100 (receiving institution) when present, else the longest matching
//! PAN prefix (DE2).

use super::fxhash::FxHashMap;
use super::ids::InstitutionId;
use std::collections::HashMap;

/// Index of a bank connector in the daemon's connector list.
pub type BankIndex = u16;

/// Longest PAN prefix a route may name, in digits (a PAN has at most 19).
pub const PAN_PREFIX_DIGITS_MAX: usize = 19;

/// Why a route could not be added.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The prefix is empty, too long, or not digits.
    #[error("PAN prefix must be 1 to 19 digits")]
    BadPrefix,
    /// The same prefix routes twice.
    #[error("PAN prefix {0} is routed twice")]
    DuplicatePrefix(String),
}

/// Why a request has no destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRoute {
    /// DE100 names an institution no connector serves.
    UnknownReceiver,
    /// No prefix matches DE2.
    NoPrefixMatch,
    /// Neither DE100 nor DE2 is present.
    NoRoutingField,
}

/// Immutable routing table, built from config and swapped whole on reload.
///
/// PAN prefixes are kept in one hash map keyed by (length, value) and probed from
/// the longest length present down: at most one probe per distinct prefix length,
/// no allocation, and memory proportional to the number of prefixes.
///
/// A large table (over [`HEAD_FILTER_MIN_PREFIXES`]) also keeps, for each 6-digit
/// PAN head, a bit per prefix length that has a prefix under that head, so a lookup
/// probes only lengths that can match: with a million prefixes each probe of the
/// big map is a cache miss, and skipping the empty ones keeps the cost per payment
/// close to that of a small table.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    receivers: HashMap<InstitutionId, TargetId>,
    prefixes: FxHashMap<(u8, u64), TargetId>,
    /// Distinct (bank, failover list) pairs that routes name, deduplicated: a
    /// million prefixes to a handful of banks share a handful of targets.
    targets: Vec<Destination>,
    /// Failover lists; entry 0 is the empty list.
    failovers: Vec<Box<[BankIndex]>>,
    /// Where each target and failover list is, while the table is built.
    target_ids: FxHashMap<Destination, TargetId>,
    failover_ids: HashMap<Box<[BankIndex]>, FailoverId>,
    /// Distinct prefix lengths, longest first.
    lengths: Vec<u8>,
    /// Empty, or 10^6 entries: bit `l` set when some prefix of length `l` ≥ 6
    /// starts with the entry's 6 digits.
    heads: Vec<u32>,
}

/// Index into [`RouteTable`]'s targets.
type TargetId = u32;

/// Index of a failover list in a [`RouteTable`] (0: none).
pub type FailoverId = u32;

/// Where a route sends a request: its bank, and the banks to try in order while
/// that bank has no link up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    /// The bank the route names.
    pub bank: BankIndex,
    /// Its failover list ([`RouteTable::failover`]).
    pub failover: FailoverId,
}

/// Prefix count from which the head filter is kept (its 4 MB pay off).
pub const HEAD_FILTER_MIN_PREFIXES: usize = 4096;
/// Digits of the PAN head the filter is indexed by.
const HEAD_DIGITS: usize = 6;
const HEADS: usize = 1_000_000;

fn prefix_value(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > PAN_PREFIX_DIGITS_MAX {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0'))
    })
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> RouteTable {
        RouteTable::default()
    }

    /// The target id of `bank` with `failover`, added if new.
    fn target(&mut self, bank: BankIndex, failover: &[BankIndex]) -> TargetId {
        if self.failovers.is_empty() {
            self.failovers.push(Box::new([]));
            self.failover_ids.insert(Box::new([]), 0);
        }
        let failover = match self.failover_ids.get(failover) {
            Some(&i) => i,
            None => {
                let i = self.failovers.len() as FailoverId;
                self.failovers.push(failover.into());
                self.failover_ids.insert(failover.into(), i);
                i
            }
        };
        let d = Destination { bank, failover };
        *self.target_ids.entry(d).or_insert_with(|| {
            self.targets.push(d);
            (self.targets.len() - 1) as TargetId
        })
    }

    /// Requests whose DE100 is `receiver` go to `bank`.
    pub fn add_receiver(&mut self, receiver: InstitutionId, bank: BankIndex) {
        self.add_receiver_with_failover(receiver, bank, &[]);
    }

    /// Requests whose DE100 is `receiver` go to `bank`, else to the first bank of
    /// `failover` with a link up.
    pub fn add_receiver_with_failover(
        &mut self,
        receiver: InstitutionId,
        bank: BankIndex,
        failover: &[BankIndex],
    ) {
        let target = self.target(bank, failover);
        self.receivers.insert(receiver, target);
    }

    /// Requests without DE100 whose PAN starts with `prefix` go to `bank`.
    pub fn add_prefix(&mut self, prefix: &str, bank: BankIndex) -> Result<(), RouteError> {
        self.add_prefix_with_failover(prefix, bank, &[])
    }

    /// Requests without DE100 whose PAN starts with `prefix` go to `bank`, else to
    /// the first bank of `failover` with a link up.
    pub fn add_prefix_with_failover(
        &mut self,
        prefix: &str,
        bank: BankIndex,
        failover: &[BankIndex],
    ) -> Result<(), RouteError> {
        let value = prefix_value(prefix.as_bytes()).ok_or(RouteError::BadPrefix)?;
        let len = prefix.len() as u8;
        if self.prefixes.contains_key(&(len, value)) {
            return Err(RouteError::DuplicatePrefix(prefix.to_owned()));
        }
        let target = self.target(bank, failover);
        self.prefixes.insert((len, value), target);
        if let Err(at) = self.lengths.binary_search_by(|l| len.cmp(l)) {
            self.lengths.insert(at, len);
        }
        if !self.heads.is_empty() {
            self.mark_head(len, value);
        } else if self.prefixes.len() >= HEAD_FILTER_MIN_PREFIXES {
            self.heads = vec![0; HEADS];
            let keys: Vec<(u8, u64)> = self.prefixes.keys().copied().collect();
            for (len, value) in keys {
                self.mark_head(len, value);
            }
        }
        Ok(())
    }

    fn mark_head(&mut self, len: u8, value: u64) {
        let Some(extra) = usize::from(len).checked_sub(HEAD_DIGITS) else {
            return;
        };
        let head = value / 10u64.pow(extra as u32);
        if let Some(bits) = self.heads.get_mut(head as usize) {
            *bits |= 1 << len;
        }
    }

    /// Number of PAN prefixes.
    pub fn prefix_count(&self) -> usize {
        self.prefixes.len()
    }

    /// The failover list `id` names (empty for 0 or an unknown id).
    pub fn failover(&self, id: FailoverId) -> &[BankIndex] {
        self.failovers.get(id as usize).map_or(&[], |f| &f[..])
    }

    /// Renumbers every bank the table names (a reload maps config positions to
    /// the daemon's connector slots).
    pub fn map_banks(&mut self, mut f: impl FnMut(BankIndex) -> BankIndex) {
        for t in &mut self.targets {
            t.bank = f(t.bank);
        }
        for list in &mut self.failovers {
            for b in list.iter_mut() {
                *b = f(*b);
            }
        }
        // Renumbered entries may coincide; the indexes are rebuilt from the lists.
        self.target_ids = self
            .targets
            .iter()
            .enumerate()
            .map(|(i, d)| (*d, i as TargetId))
            .collect();
        self.failover_ids.clear();
        for (i, list) in self.failovers.iter().enumerate() {
            self.failover_ids
                .entry(list.clone())
                .or_insert(i as FailoverId);
        }
    }

    /// The longest prefix route for `pan`.
    pub fn by_pan(&self, pan: &[u8]) -> Option<BankIndex> {
        self.destination_by_pan(pan).map(|d| d.bank)
    }

    /// The longest prefix route for `pan`, with its failover list.
    pub fn destination_by_pan(&self, pan: &[u8]) -> Option<Destination> {
        let mut values = [0u64; PAN_PREFIX_DIGITS_MAX + 1];
        let usable = pan.len().min(PAN_PREFIX_DIGITS_MAX);
        for (i, &b) in pan[..usable].iter().enumerate() {
            if !b.is_ascii_digit() {
                return None;
            }
            values[i + 1] = values[i] * 10 + u64::from(b - b'0');
        }
        let heads = match self.heads.get(values[HEAD_DIGITS] as usize) {
            Some(bits) if usable >= HEAD_DIGITS => *bits,
            _ => u32::MAX,
        };
        self.lengths
            .iter()
            .filter(|&&l| usize::from(l) <= usable)
            .filter(|&&l| usize::from(l) < HEAD_DIGITS || heads & (1 << l) != 0)
            .find_map(|&l| self.prefixes.get(&(l, values[usize::from(l)])))
            .and_then(|&t| self.targets.get(t as usize).copied())
    }

    /// Routes by DE100 when present, else by DE2.
    pub fn route(&self, de100: Option<&[u8]>, de2: Option<&[u8]>) -> Result<BankIndex, NoRoute> {
        self.destination(de100, de2).map(|d| d.bank)
    }

    /// Routes by DE100 when present, else by DE2, with the route's failover list.
    pub fn destination(
        &self,
        de100: Option<&[u8]>,
        de2: Option<&[u8]>,
    ) -> Result<Destination, NoRoute> {
        match (de100, de2) {
            (Some(receiver), _) => InstitutionId::from_digits(receiver)
                .and_then(|id| self.receivers.get(&id))
                .and_then(|&t| self.targets.get(t as usize).copied())
                .ok_or(NoRoute::UnknownReceiver),
            (None, Some(pan)) => self.destination_by_pan(pan).ok_or(NoRoute::NoPrefixMatch),
            (None, None) => Err(NoRoute::NoRoutingField),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_filter_finds_what_a_scan_finds() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut t = RouteTable::new();
        let mut all = Vec::new();
        while all.len() < 3 * HEAD_FILTER_MIN_PREFIXES {
            let len = [4usize, 5, 6, 6, 7, 8, 8, 11][(next() % 8) as usize];
            let digits: String = (0..len)
                .map(|_| char::from(b'0' + (next() % 3) as u8))
                .collect();
            let bank = (next() % 100) as BankIndex;
            if t.add_prefix(&digits, bank).is_ok() {
                all.push((digits, bank));
            }
        }
        assert!(!t.heads.is_empty());
        for _ in 0..20_000 {
            let pan: String = (0..16)
                .map(|_| char::from(b'0' + (next() % 3) as u8))
                .collect();
            let scan = all
                .iter()
                .filter(|(p, _)| pan.starts_with(p.as_str()))
                .max_by_key(|(p, _)| p.len())
                .map(|(_, b)| *b);
            assert_eq!(t.by_pan(pan.as_bytes()), scan, "{pan}");
        }
    }

    #[test]
    fn routes_carry_their_failover_lists_through_renumbering() {
        let mut t = RouteTable::new();
        t.add_prefix_with_failover("4", 0, &[1, 2]).unwrap();
        t.add_prefix_with_failover("5", 0, &[]).unwrap();
        t.add_prefix_with_failover("6", 1, &[1, 2]).unwrap();
        t.add_receiver_with_failover("200003".parse().unwrap(), 2, &[0]);
        let d = t.destination(None, Some(b"4111")).unwrap();
        assert_eq!((d.bank, t.failover(d.failover)), (0, &[1, 2][..]));
        let d = t.destination(None, Some(b"5111")).unwrap();
        assert_eq!((d.bank, t.failover(d.failover)), (0, &[][..]));
        assert_eq!(t.failovers.len(), 3, "lists shared: none, [1, 2], [0]");
        t.map_banks(|b| b + 10);
        let d = t.destination(None, Some(b"6111")).unwrap();
        assert_eq!((d.bank, t.failover(d.failover)), (11, &[11, 12][..]));
        let d = t.destination(Some(b"200003"), None).unwrap();
        assert_eq!((d.bank, t.failover(d.failover)), (12, &[10][..]));
    }

    #[test]
    fn longest_prefix_wins_and_receiver_beats_pan() {
        let mut t = RouteTable::new();
        t.add_prefix("4", 0).unwrap();
        t.add_prefix("4111", 1).unwrap();
        t.add_prefix("41112", 2).unwrap();
        t.add_receiver("200003".parse().unwrap(), 3);
        assert_eq!(t.by_pan(b"4111111111111111"), Some(1));
        assert_eq!(t.by_pan(b"4111211111111111"), Some(2));
        assert_eq!(t.by_pan(b"4999999999999999"), Some(0));
        assert_eq!(t.by_pan(b"5999999999999999"), None);
        assert_eq!(t.by_pan(b"41"), Some(0));
        assert_eq!(t.route(Some(b"200003"), Some(b"4111111111111111")), Ok(3));
        assert_eq!(
            t.route(Some(b"200009"), None),
            Err(NoRoute::UnknownReceiver)
        );
        assert_eq!(t.route(None, None), Err(NoRoute::NoRoutingField));
        assert_eq!(
            t.add_prefix("4111", 2),
            Err(RouteError::DuplicatePrefix("4111".into()))
        );
        assert_eq!(t.add_prefix("41a", 2), Err(RouteError::BadPrefix));
        assert_eq!(
            t.by_pan(b"4111111111111111"),
            Some(1),
            "a refused duplicate changes nothing"
        );
    }
}
