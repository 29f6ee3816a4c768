//! What a journal says was left unfinished: requests accepted or forwarded without
//! an outcome, and reversal advices queued without an acknowledgement.
//!
//! The daemon acts on it at start-up (`daemon::resume`): requests forwarded without
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
    /// The request as the acquirer sent it.
    pub request: Bytes,
}

/// A reversal advice queued and not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingReversal {
    /// The request it reverses.
    pub request_id: u64,
    /// The connector and the STAN the request carried on its link.
    pub forwarded: (u16, u32),
    /// The request as the acquirer sent it.
    pub request: Bytes,
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

/// Builds a [`Recovery`] from records fed in journal order (from a scan, or from
/// records held in memory, as the simulation test does). Memory grows with the
/// unfinished requests only: finished ones are dropped as records arrive.
#[derive(Default)]
pub struct Replay {
    open: HashMap<u64, State>,
    reversals: HashMap<u64, PendingReversal>,
}

impl Replay {
    /// An empty replay.
    pub fn new() -> Replay {
        Replay::default()
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
                    },
                );
            }
            RecordKind::Forwarded => {
                self.open.entry(r.request_id).or_default().forwarded = forwarded_head(r);
            }
            RecordKind::Outcome => {
                self.open.remove(&r.request_id);
            }
            RecordKind::ReversalQueued => {
                if let Some(forwarded) = forwarded_head(r) {
                    let request = message(r);
                    let pending = PendingReversal {
                        request_id: r.request_id,
                        forwarded,
                        request,
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
    let mut replay = Replay::new();
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
mod tests {
    use super::*;
    use crate::journal::testdir::TempDir;
    use crate::journal::{Entry, Journal, JournalConfig};
    use bytes::Bytes;

    fn entry(kind: RecordKind, request_id: u64, head: &[u8]) -> Entry {
        let mut h = [0u8; 16];
        h[..head.len()].copy_from_slice(head);
        Entry {
            kind,
            request_id,
            unix_ms: 0,
            head: (h, head.len() as u8),
            message: Bytes::new(),
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
}
