//! Answers to acquirers (sans-IO): the bank's answer with the acquirer's own DE11
//! restored, or an answer the switch makes itself, built by one constructor
//! ([`Reply::switch`]) and encoded by one function ([`encode_reply`]).
//!
//! Also what the duplicates table keeps of an answer ([`Stored`]): enough to send
//! it again to a retransmission, and to know where an acquirer's reversal of the
//! request must go ([`Stored::reversal_route`], the one place that rule is written).

use super::inflight::Stan;
use super::route::BankIndex;
use super::ResponseCode;
use crate::security::{LinkKeys, NO_KEYS};
use crate::wire::{Change, Dialect, Encoder, Framing, Message};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// Fields a switch-produced answer copies from the request (ascending; 39 is the code).
const ECHOED: [u8; 18] = [
    2, 3, 4, 7, 11, 12, 13, 32, 37, 39, 41, 42, 49, 70, 90, 100, 102, 103,
];

/// Longest DE11 kept inline (the default profile's is 6 digits).
const ORIGINAL_STAN_MAX_BYTES: usize = 12;

/// An answer for an acquirer session's writer to encode.
///
/// Moved once, into the session's channel; boxing the messages would cost an
/// allocation per answer.
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
    /// An answer the switch gives itself (decline, 0810, format error, 68, 91 …).
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

impl Reply {
    /// The switch's own answer `code` to `request`: no connector involved, nothing
    /// to wait for (see [`Reply::via`] and [`Reply::after`]).
    pub fn switch(request: Message, code: ResponseCode) -> Reply {
        Reply::Switch {
            request,
            code,
            connector: None,
            seq: 0,
        }
    }

    /// The bank's `answer` to a request whose DE11 was `stan`, forwarded by
    /// `connector`, released once journal record `seq` is durable.
    pub fn bank(
        stan: OriginalStan,
        answer: Message,
        dialect: Arc<Dialect>,
        connector: BankIndex,
        seq: u64,
    ) -> Reply {
        Reply::Bank {
            stan,
            answer,
            dialect,
            connector,
            seq,
        }
    }

    /// This answer, counted against `connector` (the request was routed there).
    pub fn via(mut self, bank: BankIndex) -> Reply {
        match &mut self {
            Reply::Bank { connector, .. } => *connector = bank,
            Reply::Switch { connector, .. } => *connector = Some(bank),
        }
        self
    }

    /// This answer, released only once journal record `seq` is durable (0: none).
    pub fn after(mut self, record: u64) -> Reply {
        match &mut self {
            Reply::Bank { seq, .. } | Reply::Switch { seq, .. } => *seq = record,
        }
        self
    }

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
            Reply::Bank { answer, .. } => super::codes::de39_label(answer.field(39).unwrap_or(b"")),
            Reply::Switch { code, .. } => code.as_str(),
        }
    }
}

/// Appends one framed answer to `out`, `header` (a TPDU, or nothing) between the
/// frame's length and the message, MAC'ed under the acquirer's `keys` when they
/// have a MAC key (a bank's MAC is replaced; a decline of the switch's own goes
/// without a MAC when the module cannot make one). Returns false (and appends
/// nothing) when the answer could not be encoded; the caller counts it.
pub fn encode_reply(
    reply: &Reply,
    (dialect, keys): (&Dialect, &LinkKeys),
    framing: Framing,
    header: &[u8],
    out: &mut BytesMut,
) -> bool {
    let at = framing.begin(out);
    out.extend_from_slice(header);
    let start = out.len();
    let (ok, placeholder) = match reply {
        Reply::Bank {
            stan,
            answer,
            dialect: from,
            ..
        } => {
            let highest = answer.highest_field_except(&[64, 128]);
            let placeholder = keys.placeholder(dialect, highest);
            let set11 = Change::Set(11, stan.as_bytes());
            let mut changes = [set11; 3];
            let mut count = 1;
            if let Some((n, zeros)) = placeholder {
                changes[1] = Change::Set(n, zeros);
                count = 2;
                let other = if n == 64 { 128 } else { 64 };
                if answer.has(other) {
                    changes[2] = Change::Remove(other);
                    count = 3;
                }
            }
            let changes = &changes[..count];
            let ok = crate::wire::reencode(answer, from, dialect, answer.mti(), changes, out);
            (ok.is_ok(), placeholder)
        }
        Reply::Switch { request, code, .. } => {
            encode_switch_answer(request, *code, (dialect, keys), out)
        }
    };
    let sealed = placeholder.is_none_or(|(_, zeros)| keys.seal(&mut out[start..], zeros.len()));
    let ok = match reply {
        // The module could not MAC the switch's own decline (a hardware module
        // unreachable): it goes without a MAC rather than not at all, so the
        // acquirer has its outcome now instead of at its timeout. A bank's
        // answer is never sent unauthenticated: unanswered, its acquirer reverses.
        Reply::Switch { request, code, .. } if ok && !sealed => {
            out.truncate(start);
            metrics::counter!("switchyard_answers_without_mac_total").increment(1);
            crate::log_limited!(
                error,
                code = code.as_str(),
                "security module could not MAC the switch's answer: sent without a MAC"
            );
            encode_switch_answer(request, *code, (dialect, &NO_KEYS), out).0
        }
        _ => ok && sealed,
    };
    if !ok || framing.finish(out, at).is_err() {
        out.truncate(at);
        return false;
    }
    true
}

/// The switch's own answer to `request`; with the placeholder of its MAC last
/// when the acquirer's `keys` have a MAC key (the caller seals it).
fn encode_switch_answer(
    request: &Message,
    code: ResponseCode,
    (d, keys): (&Dialect, &LinkKeys),
    out: &mut BytesMut,
) -> (bool, Option<(u8, &'static [u8])>) {
    let Some(mti) = request.mti().response() else {
        return (false, None);
    };
    let start = out.len();
    let mut enc = Encoder::new(d, out, mti);
    let mut ok = true;
    let mut highest = 0;
    for n in ECHOED {
        let value = if n == 39 {
            Some(&code.as_bytes()[..])
        } else {
            request.field(n)
        };
        if let Some(value) = value {
            ok &= enc.field(n, value).is_ok();
            highest = n;
        }
    }
    // Network management answers carry no MAC.
    let placeholder = if crate::security::carries_mac(request) {
        keys.placeholder(d, highest)
    } else {
        None
    };
    if let Some((n, zeros)) = placeholder {
        ok &= enc.field(n, zeros).is_ok();
    }
    // finish() is 0 only when the wire conversion failed (it has truncated).
    let ok = ok && enc.finish() > 0;
    if !ok {
        out.truncate(start);
    }
    (ok, placeholder)
}

/// An acquirer's DE11, kept by value so an answer does not carry the request.
#[derive(Clone, Copy, Debug)]
pub struct OriginalStan {
    digits: [u8; ORIGINAL_STAN_MAX_BYTES],
    len: u8,
}

impl OriginalStan {
    /// DE11 of `request` (truncated to 12 bytes, more than any dialect defines).
    pub fn of(request: &Message) -> OriginalStan {
        let field = request.field(11).unwrap_or(b"");
        let len = field.len().min(ORIGINAL_STAN_MAX_BYTES);
        let mut digits = [0u8; ORIGINAL_STAN_MAX_BYTES];
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
        /// The answer as the bank sent it; `None` where only the journal keeps it
        /// (the duplicates table does not hold it when there is a journal: see
        /// `core::recent`).
        answer: Option<Bytes>,
    },
    /// The switch answered with this code (a timeout, 91, …).
    Switch(ResponseCode),
}

/// Where an acquirer's reversal (0400/0420) goes, given what became of the
/// original it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReversalRoute {
    /// To the bank that answered the original, with DE90 naming the STAN the bank
    /// saw it under (the connector slot may since have been replaced by a reload:
    /// the slot now serving the same bank takes it).
    Bank {
        /// The connector slot that forwarded the original.
        connector: BankIndex,
        /// The STAN the original carried on its link.
        link_stan: Stan,
    },
    /// Answered 00 by the switch: the original never reached a bank (91, 30 …), or
    /// it timed out and the switch's own reversal advice is already queued.
    Approve,
}

impl Stored {
    /// Where a reversal of the request this answered goes: the rule, written once.
    pub fn reversal_route(&self) -> ReversalRoute {
        match self {
            Stored::Bank {
                connector,
                link_stan,
                ..
            } => ReversalRoute::Bank {
                connector: *connector,
                link_stan: *link_stan,
            },
            Stored::Switch(_) => ReversalRoute::Approve,
        }
    }

    /// The answer for `request` (a retransmission, or a duplicate that waited),
    /// released once journal record `seq` is durable. `bank_dialect` is the dialect
    /// of the connector in `Stored::Bank`.
    pub fn reply_to(&self, request: Message, bank_dialect: &Arc<Dialect>, seq: u64) -> Reply {
        match self {
            Stored::Bank {
                connector, answer, ..
            } => match answer
                .clone()
                .map(|a| Message::decode_canonical(bank_dialect, a))
            {
                Some(Ok(answer)) => Reply::bank(
                    OriginalStan::of(&request),
                    answer,
                    bank_dialect.clone(),
                    *connector,
                    seq,
                ),
                Some(Err(_)) | None => Reply::switch(request, ResponseCode::SystemMalfunction)
                    .via(*connector)
                    .after(seq),
            },
            Stored::Switch(code) => Reply::switch(request, *code).after(seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FrameDecoder, Mti};

    fn request(d: &Dialect) -> Message {
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(d, &mut out, Mti::FINANCIAL);
        for (n, v) in [
            (2u8, &b"4111111111111111"[..]),
            (4, b"000000001000"),
            (11, b"000042"),
            (32, b"100001"),
            (41, b"TERM0001"),
            (64, b"\x01\x02\x03\x04\x05\x06\x07\x08"),
        ] {
            enc.field(n, v).unwrap();
        }
        enc.finish();
        Message::decode(d, out.freeze()).unwrap()
    }

    #[test]
    fn switch_answers_echo_the_request_and_carry_the_code() {
        let d = Dialect::iso87_ascii();
        let reply = Reply::switch(request(&d), ResponseCode::NoRoute)
            .via(3)
            .after(9);
        assert_eq!((reply.connector(), reply.seq()), (Some(3), 9));
        assert_eq!(reply.code_label(), "92");
        let mut out = BytesMut::new();
        assert!(encode_reply(
            &reply,
            (&d, &Default::default()),
            Framing::U16be,
            &[],
            &mut out
        ));
        let frame = FrameDecoder::new(Framing::U16be, 8192)
            .decode(&mut out)
            .unwrap()
            .unwrap();
        let answer = Message::decode(&d, frame).unwrap();
        assert_eq!(answer.mti(), Mti::FINANCIAL_RESPONSE);
        assert_eq!(answer.field(39), Some(&b"92"[..]));
        assert_eq!(answer.field(11), Some(&b"000042"[..]));
        assert_eq!(answer.field(41), Some(&b"TERM0001"[..]));
        assert_eq!(answer.field(64), None, "a MAC is not echoed");
    }

    #[test]
    fn reversal_routes() {
        let stan = Stan::from_value(7).unwrap();
        let bank = Stored::Bank {
            connector: 2,
            link_stan: stan,
            answer: None,
        };
        assert_eq!(
            bank.reversal_route(),
            ReversalRoute::Bank {
                connector: 2,
                link_stan: stan
            }
        );
        let timed_out = Stored::Switch(ResponseCode::LateResponse);
        assert_eq!(timed_out.reversal_route(), ReversalRoute::Approve);
    }
}
