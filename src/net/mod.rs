//! Transport around the switch core: acquirer sessions and bank connectors.
//!
//! These tasks only move bytes and wake each other; decisions come from
//! [`crate::core`].

pub mod connector;
pub mod ingress;
pub mod journaling;
pub mod live;
pub mod saf;

use crate::core::dedup::DedupTable;
use crate::core::inflight::Stan;
use crate::core::route::BankIndex;
use crate::core::{InstitutionId, ResponseCode};
use crate::wire::{Dialect, Encoder, Framing, Message};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::OwnedPermit;

/// A request on its way through the switch, holding its answer slot.
///
/// The slot is a reserved place on the acquirer session's bounded answer channel,
/// taken before the request was read further, so delivering the answer never waits
/// and never fails for lack of room. Every `Pending` ends in exactly one
/// [`Reply`] (or, if its session is gone, in the slot being dropped).
pub struct Pending {
    /// The request as the acquirer sent it.
    pub request: Message,
    /// Where the answer goes.
    pub reply: OwnedPermit<Reply>,
    /// The sender's institution (from its certificate).
    pub acquirer: InstitutionId,
    /// The switch's id for the request (in journal records).
    pub request_id: u64,
    /// When the request was read.
    pub received_at: Instant,
    /// When its batch was encoded for the bank (set by the link's writer).
    pub forwarded_at: Instant,
    /// The connector it was routed to.
    pub bank: BankIndex,
    /// When the acquirer must have its answer.
    pub deadline: Instant,
    /// Whether its key is in the duplicates table (its outcome is recorded there).
    pub registered: bool,
    /// For a reversal: the STAN the bank saw its original under (DE90 is rewritten
    /// to name it).
    pub original_link_stan: Option<Stan>,
    /// Counts it in its institution's requests in flight until it is dropped.
    pub slot: InstitutionSlot,
}

/// One request in flight of an institution: taken when the request is admitted,
/// given back when its `Pending` ends (answered, or dropped with its session).
pub struct InstitutionSlot(Arc<std::sync::atomic::AtomicUsize>);

impl InstitutionSlot {
    /// Takes a slot of `count` if fewer than `max` are taken.
    pub fn take(
        count: &Arc<std::sync::atomic::AtomicUsize>,
        max: usize,
    ) -> Option<InstitutionSlot> {
        use std::sync::atomic::Ordering;
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
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Pending {
    /// Answers with a switch-produced code, released once journal record `seq` is
    /// durable (0: nothing to wait for).
    pub fn answer_with(self, code: ResponseCode, seq: u64) {
        let connector = Some(self.bank);
        self.reply.send(Reply::Switch {
            request: self.request,
            code,
            connector,
            seq,
        });
    }
}

/// A request's outcome as the duplicates table keeps it: enough to answer a
/// retransmission again and to send a reversal where its original went.
#[derive(Clone, Debug)]
pub enum Stored {
    /// The bank answered.
    Bank {
        /// The connector that forwarded the request.
        connector: BankIndex,
        /// The STAN the request carried on its link.
        link_stan: Stan,
        /// The answer as the bank sent it.
        answer: Bytes,
    },
    /// The switch answered with this code (a timeout, 91, …).
    Switch(ResponseCode),
}

impl Stored {
    /// The answer for `request` (a retransmission, or a duplicate that waited),
    /// released once journal record `seq` is durable. `bank_dialect` is the dialect
    /// of the connector in `Stored::Bank`.
    pub fn reply_to(&self, request: Message, bank_dialect: &Arc<Dialect>, seq: u64) -> Reply {
        match self {
            Stored::Bank {
                connector, answer, ..
            } => match Message::decode(bank_dialect, answer.clone()) {
                Ok(answer) => Reply::Bank {
                    stan: OriginalStan::of(&request),
                    answer,
                    dialect: bank_dialect.clone(),
                    connector: *connector,
                    seq,
                },
                Err(_) => Reply::Switch {
                    request,
                    code: ResponseCode::SystemMalfunction,
                    connector: Some(*connector),
                    seq,
                },
            },
            Stored::Switch(code) => Reply::Switch {
                request,
                code: *code,
                connector: None,
                seq,
            },
        }
    }
}

/// What waits on a request still in flight.
pub enum Awaiting {
    /// A retransmission: gets the same answer.
    Duplicate {
        /// The retransmitted request.
        request: Message,
        /// Where its answer goes.
        reply: OwnedPermit<Reply>,
    },
    /// The acquirer's reversal of it: sent where the original went once known.
    Reversal(Pending),
}

/// Recent requests by duplicate key: retransmissions and reversals find them here.
pub type Recent = DedupTable<Awaiting, Stored>;

/// An answer for an acquirer session's writer to encode.
///
/// Moved once, from a connector into the session's channel; boxing the messages
/// would cost an allocation per answer.
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    /// The bank's answer, to be returned with the acquirer's own DE11.
    Bank {
        /// The acquirer's DE11, to restore (the request itself is not needed).
        stan: OriginalStan,
        /// The bank's answer.
        answer: Message,
        /// The dialect the answer was decoded under.
        dialect: Arc<Dialect>,
        /// The connector that forwarded it.
        connector: BankIndex,
        /// Journal record to be durable before release (0: none).
        seq: u64,
    },
    /// An answer the switch gives itself (decline, 0810, format error).
    Switch {
        /// The request (possibly only partly decoded).
        request: Message,
        /// DE39.
        code: ResponseCode,
        /// The connector involved, if the request got that far.
        connector: Option<BankIndex>,
        /// Journal record to be durable before release (0: none).
        seq: u64,
    },
}

/// Fields a switch-produced answer copies from the request (ascending; 39 is the code).
const ECHOED: [u8; 18] = [
    2, 3, 4, 7, 11, 12, 13, 32, 37, 39, 41, 42, 49, 70, 90, 100, 102, 103,
];

/// Appends one framed answer to `out`. Returns false (and appends nothing) when the
/// answer could not be encoded; the caller counts it.
pub fn encode_reply(
    reply: &Reply,
    dialect: &Dialect,
    framing: Framing,
    out: &mut BytesMut,
) -> bool {
    let at = framing.begin(out);
    let ok = match reply {
        Reply::Bank {
            stan,
            answer,
            dialect: from,
            ..
        } => {
            let changes = [crate::wire::Change::Set(11, stan.as_bytes())];
            crate::wire::reencode(answer, from, dialect, answer.mti(), &changes, out).is_ok()
        }
        Reply::Switch { request, code, .. } => encode_switch_answer(request, *code, dialect, out),
    };
    if !ok || framing.finish(out, at).is_err() {
        out.truncate(at);
        return false;
    }
    true
}

/// Longest DE11 kept inline (the default profile's is 6 digits).
const ORIGINAL_STAN_MAX: usize = 12;

/// An acquirer's DE11, kept by value so an answer does not carry the request.
#[derive(Clone, Copy, Debug)]
pub struct OriginalStan {
    digits: [u8; ORIGINAL_STAN_MAX],
    len: u8,
}

impl OriginalStan {
    /// DE11 of `request` (truncated to 12 bytes, more than any dialect defines).
    pub fn of(request: &Message) -> OriginalStan {
        let field = request.field(11).unwrap_or(b"");
        let len = field.len().min(ORIGINAL_STAN_MAX);
        let mut digits = [0u8; ORIGINAL_STAN_MAX];
        digits[..len].copy_from_slice(&field[..len]);
        OriginalStan {
            digits,
            len: len as u8,
        }
    }

    /// The DE11 value.
    pub fn as_bytes(&self) -> &[u8] {
        &self.digits[..usize::from(self.len)]
    }
}

impl Reply {
    /// The journal record this answer waits for (0: none).
    pub fn seq(&self) -> u64 {
        match self {
            Reply::Bank { seq, .. } | Reply::Switch { seq, .. } => *seq,
        }
    }

    /// The connector involved, if any.
    pub fn connector(&self) -> Option<BankIndex> {
        match self {
            Reply::Bank { connector, .. } => Some(*connector),
            Reply::Switch { connector, .. } => *connector,
        }
    }

    /// DE39 as a static metric label.
    pub fn code_label(&self) -> &'static str {
        match self {
            Reply::Bank { answer, .. } => {
                crate::core::codes::de39_label(answer.field(39).unwrap_or(b""))
            }
            Reply::Switch { code, .. } => code.as_str(),
        }
    }
}

fn encode_switch_answer(
    request: &Message,
    code: ResponseCode,
    d: &Dialect,
    out: &mut BytesMut,
) -> bool {
    let Some(mti) = request.mti().response() else {
        return false;
    };
    let start = out.len();
    let mut enc = Encoder::new(d, out, mti);
    let mut ok = true;
    for n in ECHOED {
        let value = if n == 39 {
            Some(&code.as_bytes()[..])
        } else {
            request.field(n)
        };
        if let Some(value) = value {
            ok &= enc.field(n, value).is_ok();
        }
    }
    if ok {
        enc.finish();
    } else {
        out.truncate(start);
    }
    ok
}
