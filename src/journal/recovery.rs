//! What a journal says was left unfinished: requests accepted or forwarded without
//! an outcome, and reversal advices queued without an acknowledgement.
//!
//! The daemon acts on it at start-up (`daemon::recovery::resume`): requests forwarded without
//! an outcome are closed as 68 and reversed, unacknowledged advices are queued again.
//! `journal verify` prints it.

use super::reader::{scan, JournalError, Scan};
use super::record::{Record, RecordKind};
use bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;

/// A request with no outcome in the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unfinished {
    /// The switch's id for it.
    pub request_id: u64,
    /// Where it was forwarded (connector index, link STAN), if it was.
    pub forwarded: Option<(u16, u32)>,
    /// The request as the acquirer sent it (in the protected form when
    /// `protected`: `journal::protect`).
    pub request: Bytes,
    /// Whether `request` is in the protected form.
    pub protected: bool,
}

/// A reversal advice queued and not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingReversal {
    /// The request it reverses.
    pub request_id: u64,
    /// The connector and the STAN the request carried on its link.
    pub forwarded: (u16, u32),
    /// The request as the acquirer sent it (in the protected form when
    /// `protected`).
    pub request: Bytes,
    /// Whether `request` is in the protected form.
    pub protected: bool,
}

/// Unfinished business found in a journal.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Requests without an outcome, in request id order.
    pub unfinished: Vec<Unfinished>,
    /// Reversal advices queued but not acknowledged, in request id order.
    pub reversals_pending: Vec<PendingReversal>,
}

impl Recovery {
    /// Requests the bank may have seen without the acquirer getting an answer: each
    /// needs a reversal advice.
    pub fn needing_reversal(&self) -> impl Iterator<Item = &Unfinished> {
        self.unfinished.iter().filter(|u| u.forwarded.is_some())
    }
}

#[derive(Default)]
struct State {
    forwarded: Option<(u16, u32)>,
    request: Bytes,
    protected: bool,
}

fn message(r: &Record<'_>) -> Bytes {
    Bytes::copy_from_slice(r.body.get(r.kind.head_len()..).unwrap_or(b""))
}

fn forwarded_head(r: &Record<'_>) -> Option<(u16, u32)> {
    let h = r.body.get(..6)?;
    Some((
        u16::from_le_bytes([h[0], h[1]]),
        u32::from_le_bytes([h[2], h[3], h[4], h[5]]),
    ))
}

/// A forwarded record's (connector index, link STAN), the index resolved by the
/// bank id it carries when `banks` (the raw ids of the configured banks, in config
/// order) is given: an id no bank has gives `u16::MAX` (no configured bank).
pub fn forwarded_to(r: &Record<'_>, banks: Option<&[u64]>) -> Option<(u16, u32)> {
    let (index, stan) = forwarded_head(r)?;
    let id = r.body.get(6..14).map(|b| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(b);
        u64::from_le_bytes(raw)
    });
    match (banks, id) {
        (Some(banks), Some(id)) => {
            let index = banks
                .iter()
                .position(|&b| b == id)
                .map_or(u16::MAX, |i| i as u16);
            Some((index, stan))
        }
        _ => Some((index, stan)),
    }
}

/// Builds a [`Recovery`] from records fed in journal order (from a scan, or from
/// records held in memory, as the simulation test does). Memory grows with the
/// unfinished requests only: finished ones are dropped as records arrive.
#[derive(Default)]
pub struct Replay {
    open: HashMap<u64, State>,
    reversals: HashMap<u64, PendingReversal>,
    /// Raw ids of the configured banks, in config order: a forwarded record that
    /// names its bank's id gets that bank's index in this config (slots of the
    /// process that wrote it may differ, after reloads or a reordered file).
    banks: Option<Vec<u64>>,
}

impl Replay {
    /// An empty replay.
    pub fn new() -> Replay {
        Replay::default()
    }

    /// Maps forwarded records to the banks of the config in force by their ids.
    pub fn with_banks(mut self, ids: Vec<u64>) -> Replay {
        self.banks = Some(ids);
        self
    }

    fn forwarded(&self, r: &Record<'_>) -> Option<(u16, u32)> {
        forwarded_to(r, self.banks.as_deref())
    }

    /// Requests read without an outcome yet.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// Takes the next record in journal order.
    pub fn record(&mut self, r: &Record<'_>) {
        match r.kind {
            RecordKind::Accepted => {
                self.open.insert(
                    r.request_id,
                    State {
                        forwarded: None,
                        request: message(r),
                        protected: r.protected,
                    },
                );
            }
            RecordKind::Forwarded => {
                let forwarded = self.forwarded(r);
                self.open.entry(r.request_id).or_default().forwarded = forwarded;
            }
            RecordKind::Outcome => {
                self.open.remove(&r.request_id);
            }
            RecordKind::ReversalQueued => {
                // Queued before its outcome: the open request knows its bank by id.
                let known = self
                    .open
                    .get(&r.request_id)
                    .and_then(|o| o.forwarded)
                    .map(|(index, _)| index);
                if let Some((index, stan)) = forwarded_head(r) {
                    let forwarded = (known.unwrap_or(index), stan);
                    let request = message(r);
                    let pending = PendingReversal {
                        request_id: r.request_id,
                        forwarded,
                        request,
                        protected: r.protected,
                    };
                    self.reversals.insert(r.request_id, pending);
                }
            }
            RecordKind::ReversalAcked => {
                self.reversals.remove(&r.request_id);
            }
        }
    }

    /// What was left unfinished, in request id order.
    pub fn finish(self) -> Recovery {
        let mut unfinished: Vec<Unfinished> = self
            .open
            .into_iter()
            .map(|(request_id, st)| Unfinished {
                request_id,
                forwarded: st.forwarded,
                request: st.request,
                protected: st.protected,
            })
            .collect();
        unfinished.sort_by_key(|u| u.request_id);
        let mut reversals_pending: Vec<PendingReversal> = self.reversals.into_values().collect();
        reversals_pending.sort_by_key(|p| p.request_id);
        Recovery {
            unfinished,
            reversals_pending,
        }
    }
}

/// Scans the journal in `dir` and collects what was left unfinished.
pub fn recover(dir: &Path) -> Result<(Scan, Recovery), JournalError> {
    recover_with(dir, Replay::new())
}

/// Scans the journal in `dir` into `replay`.
pub fn recover_with(dir: &Path, mut replay: Replay) -> Result<(Scan, Recovery), JournalError> {
    let s = scan(dir, |_, _, r| replay.record(r))?;
    Ok((s, replay.finish()))
}

/// One line summarising a recovery.
pub fn summary(r: &Recovery) -> String {
    let forwarded = r.needing_reversal().count();
    format!(
        "unfinished: {} requests without an outcome ({} forwarded to a bank: each needs a \
         reversal advice; {} never forwarded), {} reversal advices not acknowledged",
        r.unfinished.len(),
        forwarded,
        r.unfinished.len() - forwarded,
        r.reversals_pending.len()
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::journal::{Entry, Journal, JournalConfig};
    use bytes::Bytes;
    use switchyard_tools::testkit::TempDir;

    fn entry(kind: RecordKind, request_id: u64, head: &[u8]) -> Entry {
        entry_with(kind, request_id, head, Bytes::new())
    }

    /// A record of `kind` with `head` (up to 16 bytes) before `message`.
    pub(crate) fn entry_with(
        kind: RecordKind,
        request_id: u64,
        head: &[u8],
        message: Bytes,
    ) -> Entry {
        let mut h = [0u8; 16];
        h[..head.len()].copy_from_slice(head);
        Entry {
            kind,
            protected: false,
            request_id,
            unix_ms: 0,
            head: (h, head.len() as u8),
            message,
        }
    }

    #[test]
    fn finds_requests_without_outcome_and_unacknowledged_reversals() {
        let dir = TempDir::new("recovery");
        let opened = Journal::open(JournalConfig::new(&dir.0)).unwrap();
        let j = &opened.journal;
        let mut fwd = [0u8; 6];
        fwd[..2].copy_from_slice(&2u16.to_le_bytes());
        fwd[2..].copy_from_slice(&999_999u32.to_le_bytes());
        for e in [
            entry(RecordKind::Accepted, 1, &[0; 8]),
            entry(RecordKind::Forwarded, 1, &fwd),
            entry(RecordKind::Outcome, 1, b"00\x01"),
            entry(RecordKind::Accepted, 2, &[0; 8]),
            entry(RecordKind::Forwarded, 2, &fwd),
            entry(RecordKind::Accepted, 3, &[0; 8]),
            entry(RecordKind::ReversalQueued, 4, &fwd),
            entry(RecordKind::ReversalQueued, 5, &fwd),
            entry(RecordKind::ReversalAcked, 5, &[]),
        ] {
            j.append(e).unwrap();
        }
        j.close();
        let (s, r) = recover(&dir.0).unwrap();
        assert_eq!(s.records, 9);
        let unfinished: Vec<(u64, Option<(u16, u32)>)> = r
            .unfinished
            .iter()
            .map(|u| (u.request_id, u.forwarded))
            .collect();
        assert_eq!(unfinished, vec![(2, Some((2, 999_999))), (3, None)]);
        assert_eq!(r.needing_reversal().count(), 1);
        let pending: Vec<u64> = r.reversals_pending.iter().map(|p| p.request_id).collect();
        assert_eq!(pending, vec![4]);
        assert!(summary(&r).starts_with("unfinished: 2 requests"));
    }

    #[test]
    fn forwarded_records_name_their_bank_by_id_in_the_config_in_force() {
        let dir = TempDir::new("recovery-banks");
        let id = |s: &str| s.parse::<crate::core::InstitutionId>().unwrap().to_raw();
        // (slot in the process that wrote it, STAN, bank id)
        let fwd = |slot: u16, stan: u32, bank: u64| {
            let mut h = [0u8; 14];
            h[..2].copy_from_slice(&slot.to_le_bytes());
            h[2..6].copy_from_slice(&stan.to_le_bytes());
            h[6..].copy_from_slice(&bank.to_le_bytes());
            h
        };
        let mut queued = [0u8; 6];
        queued[..2].copy_from_slice(&5u16.to_le_bytes());
        queued[2..].copy_from_slice(&9u32.to_le_bytes());
        let opened = Journal::open(JournalConfig::new(&dir.0)).unwrap();
        for e in [
            entry(RecordKind::Accepted, 1, &[0; 8]),
            entry(RecordKind::Forwarded, 1, &fwd(7, 7, id("200002"))),
            entry(RecordKind::Accepted, 2, &[0; 8]),
            entry(RecordKind::Forwarded, 2, &fwd(3, 8, id("200009"))),
            entry(RecordKind::Accepted, 3, &[0; 8]),
            entry(RecordKind::Forwarded, 3, &fwd(5, 9, id("200001"))),
            entry(RecordKind::ReversalQueued, 3, &queued),
            entry(RecordKind::Outcome, 3, b"68\x02"),
        ] {
            opened.journal.append(e).unwrap();
        }
        opened.journal.close();
        // The config now has 200001 first and 200002 second; 200009 is gone.
        let mut replay = Replay::new().with_banks(vec![id("200001"), id("200002")]);
        let reopened = Journal::open_with(JournalConfig::new(&dir.0), |_, _, r| replay.record(r));
        reopened.unwrap().journal.close();
        let r = replay.finish();
        let unfinished: Vec<_> = r
            .unfinished
            .iter()
            .map(|u| (u.request_id, u.forwarded))
            .collect();
        assert_eq!(
            unfinished,
            vec![(1, Some((1, 7))), (2, Some((u16::MAX, 8)))]
        );
        let pending: Vec<_> = r
            .reversals_pending
            .iter()
            .map(|p| (p.request_id, p.forwarded))
            .collect();
        assert_eq!(
            pending,
            vec![(3, (0, 9))],
            "the queued reversal follows its request's bank"
        );
    }
}
