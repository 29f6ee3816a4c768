//! What the daemon does with a journal's unfinished business at start-up (sans-IO:
//! the simulation runs the same functions after each of its crashes).
//!
//! The journal is read (and checked) by `journal::recovery::Replay`; here its
//! findings are acted on: requests forwarded without an outcome are closed as 68
//! and reversed, requests never forwarded are closed as 91, advices never
//! acknowledged are queued again, and the duplicates table is rebuilt from the
//! requests within its window.

use crate::config::Config;
use crate::core::answer::{ReversalRoute, Stored};
use crate::core::bank::BankState;
use crate::core::books::Books;
use crate::core::dedup::{EntryHandle, KeyTime};
use crate::core::inflight::Stan;
use crate::core::recent::Recent;
use crate::core::reversal::is_reversal;
use crate::core::writeahead::{read_accepted_head, OutcomeSource};
use crate::core::ResponseCode;
use crate::journal::protect::Protector;
use crate::journal::recovery::{forwarded_to, Recovery, Replay};
use crate::journal::{JournalError, Prescan};
use crate::journal::{Record, RecordKind};
use crate::wire::{Dialect, Message};
use bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Acts on what the journal shows unfinished after a crash: a request forwarded
/// without an outcome is closed as timed out (68) and reversed; one never forwarded
/// is closed as 91 (the bank never saw it); advices not acknowledged are queued
/// again.
pub fn resume(
    dialect: &Dialect,
    banks: &[&BankState],
    books: &Books,
    recovery: Recovery,
    now: Instant,
) {
    let protector = books.journal.protector();
    let decode = |request_id, bytes: Bytes, protected| {
        read_request(&protector, dialect, request_id, &bytes, protected).map(|(m, _)| m)
    };
    let unfinished: std::collections::HashSet<u64> =
        recovery.unfinished.iter().map(|u| u.request_id).collect();
    for u in recovery.unfinished {
        let Some((bank, stan)) = u.forwarded else {
            books
                .journal
                .outcome(u.request_id, b"91", OutcomeSource::Switch, None);
            continue;
        };
        let connector = banks.get(usize::from(bank));
        let original = decode(u.request_id, u.request, u.protected);
        // An acquirer's reversal left unfinished: the payment it names is reversed,
        // under the STAN the bank saw the payment with.
        let link_stan = match &original {
            Some(m) if is_reversal(m.mti()) => {
                match books.recent.original_stored(m).map(|s| s.reversal_route()) {
                    Some(ReversalRoute::Bank { link_stan, .. }) => Some(link_stan),
                    _ => None,
                }
            }
            _ => Stan::from_value(stan),
        };
        match (connector, original, link_stan) {
            (Some(c), Some(original), Some(link_stan)) => {
                c.resume_reversal(u.request_id, original, link_stan, true, now);
            }
            _ => tracing::error!(
                request_id = u.request_id,
                "unfinished request names no configured bank or cannot be decoded: reverse it by hand"
            ),
        }
    }
    for p in recovery.reversals_pending {
        if unfinished.contains(&p.request_id) {
            continue; // queued above with its 68
        }
        let (bank, stan) = p.forwarded;
        let connector = banks.get(usize::from(bank));
        match (
            connector,
            decode(p.request_id, p.request, p.protected),
            Stan::from_value(stan),
        ) {
            (Some(c), Some(original), Some(link_stan)) => {
                c.resume_reversal(p.request_id, original, link_stan, false, now);
            }
            _ => tracing::error!(
                request_id = p.request_id,
                "pending reversal names no configured bank or cannot be decoded: reverse it by hand"
            ),
        }
    }
}

/// A journaled request read back: the message (with its PAN when the journal
/// key deciphers it) and, for the protected form, the content digest of the
/// request as it was received.
pub fn read_request(
    protector: &Protector,
    dialect: &Dialect,
    request_id: u64,
    body: &[u8],
    protected: bool,
) -> Option<(Message, Option<u64>)> {
    if protected {
        let revealed = protector.reveal(body, dialect, request_id)?;
        return Some((revealed.message, Some(revealed.digest)));
    }
    let request = Message::decode_canonical(dialect, Bytes::copy_from_slice(body)).ok()?;
    Some((request, None))
}

/// What a switch starts with from its journal, gathered record by record: the
/// unfinished business [`Replay`] finds and the duplicates table [`Rebuild`]
/// fills. `Switch::start` feeds it from the journal's scan at open; a cluster
/// standby feeds it as it copies the stream (with a [`Prescan`] of the copy), so
/// that a takeover starts without reading the journal again ([`Warm`]).
pub struct Restore {
    replay: Replay,
    rebuild: Rebuild,
    recent: Arc<Recent>,
    protector: Protector,
}

impl Restore {
    /// An empty duplicates table as `config` bounds it, to be filled from the
    /// journal (`[journal]` must be configured).
    pub fn new(config: &Config) -> Restore {
        let now = Instant::now();
        let recent = recent_table(config, now);
        // Card data at rest: PANs of requests enciphered under the journal key.
        let protector = Protector::new(
            config
                .keys
                .as_ref()
                .and_then(|k| Some((k.data.clone(), k.journal_key?))),
        );
        let banks: Vec<u64> = config.banks.iter().map(|b| b.id.to_raw()).collect();
        let rebuild = Rebuild::new(
            recent.clone(),
            (config.dialect.clone(), protector.clone()),
            banks.clone(),
            now,
            crate::clock::unix_ms(),
        );
        Restore {
            replay: Replay::new().with_banks(banks),
            rebuild,
            recent,
            protector,
        }
    }

    /// Takes the next record in journal order.
    pub fn record(&mut self, r: &Record<'_>) {
        self.replay.record(r);
        self.rebuild.record(r);
    }

    /// Moves the clock on to now (a standby, before each batch).
    pub fn advance(&mut self) {
        self.rebuild
            .advance(Instant::now(), crate::clock::unix_ms());
    }

    /// Lets keys past the window go (a standby, between batches, as the
    /// daemon does once a second).
    pub fn expire(&self) {
        self.recent.expire(Instant::now());
    }

    /// Keys in the duplicates table, and requests read without an outcome.
    pub fn held(&self) -> (usize, usize) {
        (self.recent.len(), self.replay.open())
    }

    /// Completes the table (requests without an outcome get the one
    /// [`resume`] gives them) and returns it, the protector it read with, and
    /// what is unfinished.
    pub fn finish(mut self) -> (Arc<Recent>, Protector, Recovery) {
        self.advance();
        self.rebuild.finish();
        (self.recent, self.protector, self.replay.finish())
    }
}

/// A standby's journal copy, already read: its records checked and placed
/// ([`Prescan`]), and the switch's start-up state built from them
/// ([`Restore`]). `Switch::start_warm` opens the journal from it without reading
/// it again.
pub struct Warm {
    /// The copy's records, checked and located.
    pub prescan: Prescan,
    /// The duplicates table and unfinished business built from them.
    pub restore: Restore,
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (keys, open) = self.restore.held();
        f.debug_struct("Warm")
            .field("records", &self.prescan.records())
            .field("duplicate_keys", &keys)
            .field("open_requests", &open)
            .finish()
    }
}

impl Warm {
    /// Nothing read yet.
    pub fn new(config: &Config) -> Warm {
        Warm {
            prescan: Prescan::default(),
            restore: Restore::new(config),
        }
    }

    /// Checks and takes the whole records `bytes`, written at `base` in segment
    /// `path` after every record taken before.
    pub fn batch(&mut self, path: &Path, base: u64, bytes: &[u8]) -> Result<(), JournalError> {
        let Warm { prescan, restore } = self;
        restore.advance();
        prescan.segment_bytes(path, base, bytes, |r| restore.record(r))
    }
}

/// The duplicates table `config` asks for (journaled when `[journal]` is set).
pub fn recent_table(config: &Config, now: Instant) -> Arc<Recent> {
    let d = config.duplicates;
    Arc::new(Recent::new(
        d.window,
        d.memory_max_bytes,
        d.waiters_max,
        config.journal.is_some(),
        now,
    ))
}

/// Rebuilds the duplicates table from the journal as its records are read at open,
/// within the table's memory bound: a request accepted within the window is opened
/// in the table at its recorded time and completed by its outcome record (whose
/// sequence number locates a bank's answer for retransmissions); requests left
/// without an outcome get the one [`resume`] gives them (68 if forwarded, else 91).
/// Only requests still without an outcome are held aside while reading.
pub struct Rebuild {
    recent: Arc<Recent>,
    dialect: Arc<Dialect>,
    protector: Protector,
    /// Raw ids of the configured banks, in config order.
    banks: Vec<u64>,
    since_unix_ms: u64,
    now: Instant,
    now_unix_ms: u64,
    open: HashMap<u64, (EntryHandle, Option<(u16, u32)>)>,
    restored: usize,
}

impl Rebuild {
    /// Rebuilds `recent` (keys within its window of `now`, `now_unix_ms` on the
    /// wall clock) from requests in `dialect` forwarded to `banks` (raw ids, in
    /// config order).
    pub fn new(
        recent: Arc<Recent>,
        (dialect, protector): (Arc<Dialect>, Protector),
        banks: Vec<u64>,
        now: Instant,
        now_unix_ms: u64,
    ) -> Rebuild {
        let mut rebuild = Rebuild {
            recent,
            dialect,
            protector,
            banks,
            since_unix_ms: 0,
            now,
            now_unix_ms,
            open: HashMap::new(),
            restored: 0,
        };
        rebuild.advance(now, now_unix_ms);
        rebuild
    }

    /// Moves the rebuild's clock on (a standby rebuilding as records arrive):
    /// later records are placed, and the window measured, from `now`.
    pub fn advance(&mut self, now: Instant, now_unix_ms: u64) {
        let window_ms = self.recent.table().window().as_millis() as u64;
        self.since_unix_ms = now_unix_ms.saturating_sub(window_ms);
        self.now = now;
        self.now_unix_ms = now_unix_ms;
    }

    /// Takes the next record in journal order.
    pub fn record(&mut self, r: &Record<'_>) {
        match r.kind {
            RecordKind::Accepted if r.unix_ms >= self.since_unix_ms => {
                let word = r.body.get(..8).and_then(|b| b.try_into().ok());
                let key_time = word.map_or(KeyTime::Transmission, |w| {
                    read_accepted_head(u64::from_le_bytes(w)).1
                });
                let body = r.body.get(r.kind.head_len()..).unwrap_or_default();
                let Some((request, digest)) = read_request(
                    &self.protector,
                    &self.dialect,
                    r.request_id,
                    body,
                    r.protected,
                ) else {
                    return;
                };
                let ago = Duration::from_millis(self.now_unix_ms.saturating_sub(r.unix_ms));
                let at = self.now.checked_sub(ago).unwrap_or(self.now);
                if let Some(entry) = self.recent.restore(&request, key_time, digest, at) {
                    self.open.insert(r.request_id, (entry, None));
                }
            }
            RecordKind::Forwarded => {
                if let Some((_, forwarded)) = self.open.get_mut(&r.request_id) {
                    *forwarded = forwarded_to(r, Some(&self.banks));
                }
            }
            RecordKind::Outcome => {
                let Some((entry, forwarded)) = self.open.remove(&r.request_id) else {
                    return;
                };
                let head = r.body.get(..3).unwrap_or(b"  \0");
                let route =
                    forwarded.and_then(|(bank, stan)| Some((bank, Stan::from_value(stan)?)));
                let stored = match route {
                    Some((connector, link_stan)) if head[2] == OutcomeSource::Bank as u8 => {
                        Stored::Bank {
                            connector,
                            link_stan,
                            answer: None,
                        }
                    }
                    _ => Stored::Switch(
                        ResponseCode::from_de39(&head[..2])
                            .unwrap_or(ResponseCode::SystemMalfunction),
                    ),
                };
                self.recent.restored(entry, &stored, r.seq);
                self.restored += 1;
            }
            _ => {}
        }
    }

    /// Completes what had no outcome and reports what was rebuilt.
    pub fn finish(self) {
        let unfinished = self.open.len();
        for (entry, forwarded) in self.open.into_values() {
            let code = match forwarded {
                Some(_) => ResponseCode::LateResponse,
                None => ResponseCode::DestinationUnavailable,
            };
            self.recent.restored(entry, &Stored::Switch(code), 0);
        }
        self.recent.expire(self.now);
        if self.restored + unfinished > 0 {
            tracing::info!(
                restored = self.restored,
                unfinished,
                keys = self.recent.len(),
                "duplicates table rebuilt from the journal"
            );
        }
    }
}
