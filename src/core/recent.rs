//! The life of a request's entry in the duplicates table, in one place: opened when
//! the request arrives ([`Recent::open`], which also answers a repeat), waited on
//! by retransmissions and by the acquirer's reversal of it ([`Recent::original`]),
//! completed with its outcome ([`Recent::complete`], which answers the
//! retransmissions that waited and hands back the reversals for routing).
//!
//! The table itself (keys, memory bound, early eviction) is
//! [`super::dedup::DedupTable`]. With a journal the table keeps no bank answer: a
//! retransmission of a request the bank answered is answered from the outcome
//! record, read back by an [`AnswerReader`] off the session's task.

use super::answer::{Reply, Stored};
use super::dedup::{
    content_digest, DedupTable, DuplicateKey, EntryHandle, KeyTime, Original, Verdict,
};
use super::request::{AnswerSlot, Pending};
use super::route::BankIndex;
use super::{InstitutionId, ResponseCode};
use crate::wire::{Dialect, Message};
use bytes::Bytes;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// What became of reading an answer back from the journal.
pub enum ReadBack {
    /// The bank's answer, as stored in its outcome record, and whether it is in
    /// the protected form (`journal::protect`).
    Answer(Bytes, bool),
    /// The record could not be read (pruned, I/O error, or the journal failed).
    Failed,
    /// Too many reads under way already (the reader's bound).
    Busy,
}

/// Called once with what reading an answer back gave.
pub type ReadDone = Box<dyn FnOnce(ReadBack) + Send>;

/// Reads bank answers back from the journal for retransmissions.
pub trait AnswerReader: Send + Sync {
    /// Reads the answer in outcome record `seq` (once it is durable) and calls
    /// `done` with it, later and off the caller's task, or at once with
    /// [`ReadBack::Busy`] at the reader's bound.
    fn read(&self, seq: u64, done: ReadDone);
}

/// What waits on a request still in flight.
pub enum Awaiting {
    /// A retransmission: gets the same answer.
    Duplicate {
        /// The retransmitted request.
        request: Message,
        /// Where its answer goes.
        reply: AnswerSlot,
    },
    /// The acquirer's reversal of it: sent where the original went once known.
    Reversal(Pending),
}

/// A request that [`Recent::open`] lets through, with its entry in the table (none
/// when its ids are too long to key: it is not tracked).
pub struct Opened {
    /// The request.
    pub request: Message,
    /// Its answer slot.
    pub reply: AnswerSlot,
    /// Its entry: its outcome must complete it.
    pub entry: Option<EntryHandle>,
    /// Its content digest, when it was keyed (the journal keeps it).
    pub digest: Option<u64>,
}

/// What [`Recent::original`] found of the original a reversal names.
pub enum OriginalOf {
    /// Still in flight: the reversal waits and comes back from its `complete`.
    Waiting,
    /// Answered: route the reversal by [`Stored::reversal_route`].
    Done(Stored, Pending),
    /// Too many already wait on it: the caller answers 91.
    Full(Pending),
    /// Not known (never seen, or past the window): the caller answers 25.
    NotFound(Pending),
}

/// Recent requests by duplicate key: retransmissions and reversals find them here.
pub struct Recent {
    table: DedupTable<Awaiting>,
    /// Reads bank answers back when the table does not keep them (a journal).
    reader: OnceLock<Arc<dyn AnswerReader>>,
}

impl Recent {
    /// Keys kept for `window` within `memory_max_bytes` (the window shrinks when
    /// they do not fit), at most `waiters_max` retransmissions or reversals waiting
    /// on one request. `journaled`: bank answers are read back from the journal (by
    /// the reader given to [`Recent::read_answers_with`]) instead of being kept.
    pub fn new(
        window: Duration,
        memory_max_bytes: usize,
        waiters_max: usize,
        journaled: bool,
        now: Instant,
    ) -> Recent {
        Recent {
            table: DedupTable::new(window, memory_max_bytes, waiters_max, !journaled, now),
            reader: OnceLock::new(),
        }
    }

    /// Reads bank answers back with `reader` (set once, when the journal is open).
    pub fn read_answers_with(&self, reader: Arc<dyn AnswerReader>) {
        let _ = self.reader.set(reader);
    }

    /// The table, for its gauges.
    pub fn table(&self) -> &DedupTable<Awaiting> {
        &self.table
    }

    /// Opens the entry of `request` (from `institution`, arriving at `now`). A new
    /// request comes back to be processed; a repeat is answered here: the original
    /// answer again (its bank's dialect from `dialect_of`, else `fallback`, the
    /// acquirer's dialect, whose version also picks the key's [`KeyTime`]), or
    /// nothing yet while the original is in flight (it waits), 94 for the same key
    /// with other content, 91 when the table or the key's waiters are full.
    pub fn open(
        &self,
        request: Message,
        reply: AnswerSlot,
        institution: InstitutionId,
        now: Instant,
        dialect_of: impl Fn(BankIndex) -> Option<Arc<Dialect>>,
        fallback: &Arc<Dialect>,
    ) -> Option<Opened> {
        let Some(key) = DuplicateKey::of(&request, KeyTime::of(fallback.version())) else {
            return Some(Opened {
                request,
                reply,
                entry: None,
                digest: None,
            });
        };
        let digest = content_digest(&request);
        let waiter = Awaiting::Duplicate { request, reply };
        let (result, code, waiter) = match self.table.check(&key, digest, now, waiter) {
            Verdict::New(Awaiting::Duplicate { request, reply }, entry) => {
                return Some(Opened {
                    request,
                    reply,
                    entry: Some(entry),
                    digest: Some(digest),
                })
            }
            Verdict::Answered {
                stored,
                seq,
                waiter: Awaiting::Duplicate { request, reply },
            } => {
                metrics::counter!("switchyard_duplicates_total", "result" => "answered_again")
                    .increment(1);
                tracing::debug!(%institution, mti = %request.mti(), "retransmission: original answer sent again");
                let dialect = match &stored {
                    Stored::Bank { connector, .. } => dialect_of(*connector),
                    Stored::Switch(_) => None,
                };
                let dialect = dialect.unwrap_or_else(|| fallback.clone());
                self.answer_again(stored, seq, request, reply, dialect);
                return None;
            }
            Verdict::Waiting => {
                metrics::counter!("switchyard_duplicates_total", "result" => "waiting")
                    .increment(1);
                return None;
            }
            Verdict::Conflict(w) => ("conflict", ResponseCode::Duplicate, w),
            Verdict::Full(w) => ("full", ResponseCode::DestinationUnavailable, w),
            Verdict::New(w, _) | Verdict::Answered { waiter: w, .. } => {
                ("unexpected", ResponseCode::SystemMalfunction, w)
            }
        };
        metrics::counter!("switchyard_duplicates_total", "result" => result).increment(1);
        crate::log_limited!(warn, %institution, %code, result,
            "request key seen before with other content, or table full");
        if let Awaiting::Duplicate { request, reply } = waiter {
            reply.send(Reply::switch(request, code));
        }
        None
    }

    /// Sends a retransmission the original's answer again: at once when the table
    /// kept it, else once read back from outcome record `seq` (off this task; 96
    /// when it cannot be read, 91 when too many reads are under way).
    fn answer_again(
        &self,
        stored: Stored,
        seq: u64,
        request: Message,
        reply: AnswerSlot,
        dialect: Arc<Dialect>,
    ) {
        let (connector, link_stan) = match stored {
            Stored::Bank {
                connector,
                link_stan,
                answer: None,
            } => (connector, link_stan),
            kept => {
                reply.send(kept.reply_to(request, &dialect, seq));
                return;
            }
        };
        let Some(reader) = self.reader.get() else {
            let code = ResponseCode::SystemMalfunction;
            reply.send(Reply::switch(request, code).via(connector).after(seq));
            return;
        };
        reader.read(
            seq,
            Box::new(move |read| {
                let code = match read {
                    ReadBack::Answer(answer, protected) => {
                        let answer = if protected {
                            // Its DE2 comes from the retransmission it answers.
                            crate::journal::protect::replayed_answer(&answer, &dialect, &request)
                                .unwrap_or_default()
                        } else {
                            answer
                        };
                        let stored = Stored::Bank {
                            connector,
                            link_stan,
                            answer: Some(answer),
                        };
                        reply.send(stored.reply_to(request, &dialect, seq));
                        return;
                    }
                    ReadBack::Failed => ResponseCode::SystemMalfunction,
                    ReadBack::Busy => ResponseCode::DestinationUnavailable,
                };
                metrics::counter!("switchyard_duplicates_read_back_failures_total",
                    "code" => code.as_str())
                .increment(1);
                crate::log_limited!(warn, seq, %code,
                    "retransmission: the original answer could not be read back from the journal");
                reply.send(Reply::switch(request, code).via(connector).after(seq));
            }),
        );
    }

    /// Finds the original that reversal `p` names (by DE32, DE90's STAN and DE7,
    /// with the reversal's DE37, then without it). While the original is in flight
    /// the reversal waits on it.
    pub fn original(&self, p: Pending) -> OriginalOf {
        let key = |with_rrn| DuplicateKey::of_original(&p.request, with_rrn);
        let keys = [
            key(true),
            key(false).filter(|_| p.request.field(37).is_some()),
        ];
        let mut waiter = Awaiting::Reversal(p);
        for key in keys.into_iter().flatten() {
            waiter = match self.table.original(&key, waiter) {
                Original::Attached => return OriginalOf::Waiting,
                Original::Done(stored, Awaiting::Reversal(p)) => {
                    return OriginalOf::Done(stored, p)
                }
                Original::Full(Awaiting::Reversal(p)) => return OriginalOf::Full(p),
                Original::Absent(w) | Original::Done(_, w) | Original::Full(w) => w,
            };
        }
        match waiter {
            Awaiting::Reversal(p) => OriginalOf::NotFound(p),
            Awaiting::Duplicate { .. } => OriginalOf::Waiting, // never: only reversals here
        }
    }

    /// The stored outcome of the original that reversal `request` names, if it was
    /// answered (for a reversal left unfinished by a crash).
    pub fn original_stored(&self, request: &Message) -> Option<Stored> {
        [true, false]
            .into_iter()
            .filter_map(|rrn| DuplicateKey::of_original(request, rrn))
            .find_map(|key| self.table.stored(&key))
            .map(|(stored, _)| stored)
    }

    /// Completes `entry` with its request's outcome (the answer released once
    /// record `seq` is durable): retransmissions that waited get the same answer
    /// (`bank_dialect`: the dialect of a `Stored::Bank` answer); the reversals that
    /// waited are returned, to be routed by [`Stored::reversal_route`].
    pub fn complete(
        &self,
        entry: EntryHandle,
        stored: &Stored,
        seq: u64,
        bank_dialect: &Arc<Dialect>,
    ) -> Vec<Pending> {
        let mut reversals = Vec::new();
        for waiter in self.table.complete(entry, stored, seq) {
            match waiter {
                Awaiting::Duplicate { request, reply } => {
                    metrics::counter!("switchyard_duplicates_total", "result" => "answered_once")
                        .increment(1);
                    reply.send(stored.reply_to(request, bank_dialect, seq));
                }
                Awaiting::Reversal(p) => reversals.push(p),
            }
        }
        reversals
    }

    /// Opens the entry of a request accepted at `at` before a restart (from the
    /// journal), to be completed with its outcome. `None` when its ids do not key
    /// it, its key is already held, or its shard is all in flight.
    pub fn restore(
        &self,
        request: &Message,
        time: KeyTime,
        digest: Option<u64>,
        at: Instant,
    ) -> Option<EntryHandle> {
        let key = DuplicateKey::of(request, time)?;
        // A protected journal record keeps the digest of the request as received
        // (its card data is not journaled).
        let digest = digest.unwrap_or_else(|| content_digest(request));
        self.table.restore(&key, digest, at)
    }

    /// Completes an entry opened by [`Recent::restore`] (nothing waits on it).
    pub fn restored(&self, entry: EntryHandle, stored: &Stored, seq: u64) {
        self.table.complete(entry, stored, seq);
    }

    /// Drops keys past the window even where no request comes (once a second).
    pub fn expire(&self, now: Instant) {
        self.table.expire(now);
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}
