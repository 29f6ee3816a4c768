//! A request on its way through the switch ([`Pending`]): the message, where its
//! one answer goes, and what its journal records and deadline need.

use super::answer::Reply;
use super::inflight::Stan;
use super::link::LinkRequest;
use super::route::BankIndex;
use super::{InstitutionId, ResponseCode};
use crate::security::PinOut;
use crate::wire::{Header, Message};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Where a request's one answer goes: a place reserved on its session's bounded
/// answer channel before the request was read further, so delivering the answer
/// never waits and never fails for lack of room, with the header (TPDU) the
/// answer carries back. (A tokio channel permit: a sync primitive, used without
/// a runtime in the simulation; no I/O, no clock.)
pub struct AnswerSlot {
    permit: tokio::sync::mpsc::OwnedPermit<Answer>,
    header: Header,
}

/// An answer as its session writes it: the header before the message, and the
/// reply.
pub struct Answer {
    /// Written between the frame's length and the message (empty: none).
    pub header: Header,
    /// The answer.
    pub reply: Reply,
}

impl AnswerSlot {
    /// The slot `permit`, answering with `header`.
    pub fn new(permit: tokio::sync::mpsc::OwnedPermit<Answer>, header: Header) -> AnswerSlot {
        AnswerSlot { permit, header }
    }

    /// Delivers the answer.
    pub fn send(self, reply: Reply) {
        self.permit.send(Answer {
            header: self.header,
            reply,
        });
    }
}

impl From<tokio::sync::mpsc::OwnedPermit<Answer>> for AnswerSlot {
    /// A slot whose answer carries no header.
    fn from(permit: tokio::sync::mpsc::OwnedPermit<Answer>) -> AnswerSlot {
        AnswerSlot::new(permit, Header::default())
    }
}

/// A request admitted for a bank, holding its answer slot. Every `Pending` ends in
/// exactly one [`Reply`] (or, if its session is gone, in the slot being dropped).
pub struct Pending {
    /// The request as the acquirer sent it.
    pub request: Message,
    /// Where the answer goes.
    pub reply: AnswerSlot,
    /// The sender's institution (from its certificate).
    pub acquirer: InstitutionId,
    /// The switch's id for the request (in journal records).
    pub request_id: u64,
    /// When the request was read.
    pub received_at: Instant,
    /// When its batch was encoded for the bank (set by the link).
    pub forwarded_at: Instant,
    /// The connector slot it was routed to.
    pub bank: BankIndex,
    /// When the acquirer must have its answer.
    pub deadline: Instant,
    /// Its entry in the duplicates table (its outcome is recorded there), if keyed.
    pub entry: Option<super::dedup::EntryHandle>,
    /// For an acquirer's reversal: the STAN the bank saw its original under (DE90
    /// is rewritten to name it, and a reversal advice for it names the original).
    pub original_link_stan: Option<Stan>,
    /// Counts it in its institution's requests in flight until it is dropped.
    pub slot: InstitutionSlot,
    /// Which date and time its duplicates key uses (its acquirer's version);
    /// journaled with it so a restart keys it the same way.
    pub key_time: super::dedup::KeyTime,
    /// Its DE52 for the bank (translated to the bank's key and format).
    pub pin: PinOut,
    /// Whether its acquirer's MAC was checked (the bank never sees it).
    pub acquirer_mac: bool,
    /// Its content digest, computed once for duplicates and journaled with it.
    pub digest: Option<u64>,
}

impl Pending {
    /// Answers `code` without a journal record or a connector: for requests that
    /// ended before anything was journaled for them.
    pub fn refuse(self, code: ResponseCode) {
        self.reply.send(Reply::switch(self.request, code));
    }
}

impl LinkRequest for Pending {
    fn message(&self) -> &Message {
        &self.request
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn original_link_stan(&self) -> Option<Stan> {
        self.original_link_stan
    }

    fn forwarded_at(&mut self, now: Instant) {
        self.forwarded_at = now;
    }

    fn times(&self) -> (Instant, Instant) {
        (self.received_at, self.forwarded_at)
    }

    fn pin_out(&self) -> PinOut {
        self.pin
    }

    fn acquirer_mac(&self) -> bool {
        self.acquirer_mac
    }
}

/// One request in flight of an institution: taken when the request is admitted,
/// given back when its `Pending` ends (answered, or dropped with its session).
pub struct InstitutionSlot(Arc<AtomicUsize>);

impl InstitutionSlot {
    /// Takes a slot of `count` if fewer than `max` are taken.
    pub fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<InstitutionSlot> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InstitutionSlot(count.clone()))
    }
}

impl Drop for InstitutionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
