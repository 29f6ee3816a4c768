//! The life of a request's entry in the duplicates table, in one place: opened when
//! the request arrives ([`Recent::open`], which also answers a repeat), waited on
//! by retransmissions and by the acquirer's reversal of it ([`Recent::original`]),
//! completed with its outcome ([`Recent::complete`], which answers the
//! retransmissions that waited and hands back the reversals for routing).
//!
//! The table itself (keys, generations, bounds) is [`super::dedup::DedupTable`].

use super::answer::{Reply, Stored};
use super::dedup::{content_digest, DedupTable, DuplicateKey, Original, Verdict};
use super::request::{AnswerSlot, Pending};
use super::route::BankIndex;
use super::{InstitutionId, ResponseCode};
use crate::wire::{Dialect, Message};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A request that [`Recent::open`] lets through: its entry is open (`registered`:
/// false when its ids are too long to key, and it is not tracked).
pub struct Opened {
    /// The request.
    pub request: Message,
    /// Its answer slot.
    pub reply: AnswerSlot,
    /// Whether its key is in the table (its outcome must complete it).
    pub registered: bool,
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
pub struct Recent(DedupTable<Awaiting, Stored>);

impl Recent {
    /// Keys kept at least `window` (at most twice that), at most `entries_max`, and at
    /// most `waiters_max` retransmissions or reversals waiting on one request; the
    /// window's first generation starts at `now`.
    pub fn new(window: Duration, entries_max: usize, waiters_max: usize, now: Instant) -> Recent {
        Recent(DedupTable::new(window, entries_max, waiters_max, now))
    }

    /// Opens the entry of `request` (from `institution`, arriving at `now`). A new
    /// request comes back to be processed; a repeat is answered here: the original
    /// answer again (its bank's dialect from `dialect_of`, else `fallback`), or
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
        let Some(key) = DuplicateKey::of(&request) else {
            return Some(Opened {
                request,
                reply,
                registered: false,
            });
        };
        let digest = content_digest(&request);
        let waiter = Awaiting::Duplicate { request, reply };
        let (result, code, waiter) = match self.0.check(key, digest, now, waiter) {
            Verdict::New(Awaiting::Duplicate { request, reply }) => {
                return Some(Opened {
                    request,
                    reply,
                    registered: true,
                })
            }
            Verdict::Answered {
                answer,
                seq,
                waiter: Awaiting::Duplicate { request, reply },
            } => {
                metrics::counter!("switchyard_duplicates_total", "result" => "answered_again")
                    .increment(1);
                tracing::debug!(%institution, mti = %request.mti(), "retransmission: original answer sent again");
                let dialect = match &answer {
                    Stored::Bank { connector, .. } => dialect_of(*connector),
                    Stored::Switch(_) => None,
                };
                let dialect = dialect.unwrap_or_else(|| fallback.clone());
                reply.send(answer.reply_to(request, &dialect, seq));
                return None;
            }
            Verdict::Waiting => {
                metrics::counter!("switchyard_duplicates_total", "result" => "waiting")
                    .increment(1);
                return None;
            }
            Verdict::Conflict(w) => ("conflict", ResponseCode::Duplicate, w),
            Verdict::Full(w) => ("full", ResponseCode::DestinationUnavailable, w),
            Verdict::New(w) | Verdict::Answered { waiter: w, .. } => {
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
            waiter = match self.0.original(&key, waiter) {
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
            .find_map(|key| self.0.stored(&key))
    }

    /// Completes the entry of `request` with its outcome (the answer released once
    /// record `seq` is durable): retransmissions that waited get the same answer
    /// (`bank_dialect`: the dialect of a `Stored::Bank` answer); the reversals that
    /// waited are returned, to be routed by [`Stored::reversal_route`].
    pub fn complete(
        &self,
        request: &Message,
        stored: &Stored,
        seq: u64,
        bank_dialect: &Arc<Dialect>,
    ) -> Vec<Pending> {
        let Some(key) = DuplicateKey::of(request) else {
            return Vec::new();
        };
        let mut reversals = Vec::new();
        for waiter in self.0.complete(&key, stored.clone(), seq) {
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

    /// Adds a request answered before a restart (from the journal). False when its
    /// shard is full or the key is already held.
    pub fn restore(&self, request: &Message, stored: Stored) -> bool {
        let Some(key) = DuplicateKey::of(request) else {
            return false;
        };
        self.0.restore(key, content_digest(request), stored, 0)
    }

    /// Drops keys past the window even where no request comes (once a second).
    pub fn expire(&self, now: Instant) {
        self.0.expire(now);
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
