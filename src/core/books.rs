//! A request's books from acceptance to its one answer: its journal records (in
//! the write-ahead order of [`super::writeahead`]) and its entry in the duplicates
//! table ([`super::recent`]). Every answer to an admitted request is given here,
//! whether a bank's link, the switch's deadline, or the acquirer session decided
//! it; answers to requests that never reached a bank never pass a connector.

use super::answer::{OriginalStan, Reply, Stored};
use super::inflight::Stan;
use super::recent::Recent;
use super::request::Pending;
use super::route::BankIndex;
use super::writeahead::{OutcomeSource, WriteAhead};
use super::ResponseCode;
use crate::wire::{Dialect, Message};
use std::sync::Arc;

/// The journal and the duplicates table, as every request's end records itself.
#[derive(Clone)]
pub struct Books {
    /// The journal, in write-ahead order.
    pub journal: WriteAhead,
    /// Recent requests, for retransmissions and reversals.
    pub recent: Arc<Recent>,
    /// The acquirers' dialect (switch answers are encoded in it; a switch answer
    /// stored for a retransmission needs no bank dialect, but one is asked for).
    acquirer_dialect: Arc<Dialect>,
}

impl Books {
    /// Books over `journal` and `recent`.
    pub fn new(journal: WriteAhead, recent: Arc<Recent>, acquirer_dialect: Arc<Dialect>) -> Books {
        Books {
            journal,
            recent,
            acquirer_dialect,
        }
    }

    /// Records `p` as accepted (before it is queued). When the journal refuses
    /// the record, `p` is answered 91 here (nothing more is journaled for it) and
    /// `None` comes back.
    pub fn accept(&self, p: Pending) -> Option<Pending> {
        match self
            .journal
            .accepted(p.request_id, p.acquirer, p.key_time, (&p.request, p.digest))
        {
            Ok(_) => Some(p),
            Err(e) => {
                metrics::counter!("switchyard_connector_unavailable_total", "reason" => "journal")
                    .increment(1);
                crate::log_limited!(warn, institution = %p.acquirer, error = %e,
                    "request not journaled: answered 91");
                let code = ResponseCode::DestinationUnavailable;
                self.settle_switch(p, code, 0);
                None
            }
        }
    }

    /// Ends `p` with the switch's own `code`: the outcome record, then the answer
    /// (released once the record is durable), for retransmissions too.
    pub fn answer_switch(&self, p: Pending, code: ResponseCode, source: OutcomeSource) {
        let seq = self
            .journal
            .outcome(p.request_id, code.as_bytes(), source, None);
        self.settle_switch(p, code, seq);
    }

    /// Answers `p` with `code` whose outcome record is `seq` (already written), and
    /// completes its duplicates entry. Reversals that waited on it are answered 00:
    /// the request never reached a bank, or the switch reverses it itself.
    pub fn settle_switch(&self, p: Pending, code: ResponseCode, seq: u64) {
        if let Some(entry) = p.entry {
            let stored = Stored::Switch(code);
            let waiting = self
                .recent
                .complete(entry, &stored, seq, &self.acquirer_dialect);
            for reversal in waiting {
                // `Stored::Switch` routes every reversal to `Approve`.
                self.answer_switch(reversal, ResponseCode::Approved, OutcomeSource::Switch);
            }
        }
        let bank = p.bank;
        p.reply
            .send(Reply::switch(p.request, code).via(bank).after(seq));
    }

    /// Ends `p` with its bank's `answer` (it travelled as `link_stan` on a link of
    /// connector `connector`, whose dialect is `dialect`): the outcome record, the
    /// duplicates entry, then the answer with the acquirer's DE11. Returns the
    /// reversals that waited for it, with DE90 to be rewritten to `link_stan`: the
    /// caller sends them to the same bank.
    pub fn answer_bank(
        &self,
        p: Pending,
        link_stan: Stan,
        answer: Message,
        dialect: &Arc<Dialect>,
        connector: BankIndex,
    ) -> Vec<Pending> {
        let de39 = answer.field(39).unwrap_or(b"");
        let seq = self.journal.outcome(
            p.request_id,
            de39,
            OutcomeSource::Bank,
            Some((&answer, dialect)),
        );
        let mut reversals = Vec::new();
        if let Some(entry) = p.entry {
            let stored = Stored::Bank {
                connector,
                link_stan,
                answer: Some(answer.as_bytes().clone()),
            };
            reversals = self.recent.complete(entry, &stored, seq, dialect);
            for r in &mut reversals {
                r.original_link_stan = Some(link_stan);
            }
        }
        let stan = OriginalStan::of(&p.request);
        p.reply
            .send(Reply::bank(stan, answer, dialect.clone(), connector, seq));
        reversals
    }
}
