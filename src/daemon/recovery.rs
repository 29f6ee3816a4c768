//! What the daemon does with a journal's unfinished business at start-up (sans-IO:
//! the simulation runs the same functions after each of its crashes).
//!
//! The journal is read (and checked) by `journal::recovery::Replay`; here its
//! findings are acted on: requests forwarded without an outcome are closed as 68
//! and reversed, requests never forwarded are closed as 91, advices never
//! acknowledged are queued again, and the duplicates table is rebuilt from the
//! requests within its window.

use crate::core::answer::{ReversalRoute, Stored};
use crate::core::bank::BankState;
use crate::core::books::Books;
use crate::core::inflight::Stan;
use crate::core::recent::Recent;
use crate::core::reversal::is_reversal;
use crate::core::writeahead::OutcomeSource;
use crate::core::ResponseCode;
use crate::journal::recovery::Recovery;
use crate::wire::{Dialect, Message};
use std::time::Instant;

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
    let decode = |bytes: bytes::Bytes| Message::decode(dialect, bytes).ok();
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
        let original = decode(u.request);
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
        match (connector, decode(p.request), Stan::from_value(stan)) {
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

/// Rebuilds the duplicates table from requests the journal shows within the window:
/// answered ones keep their answer; unfinished ones get the outcome [`resume`] gives
/// them (68 if forwarded, else 91).
pub fn restore_recent(dialect: &Dialect, recent: &Recent, recovery: &Recovery) {
    let mut restored = 0usize;
    for r in &recovery.recent {
        let Ok(request) = Message::decode(dialect, r.request.clone()) else {
            continue;
        };
        let forwarded = r
            .forwarded
            .and_then(|(bank, stan)| Some((bank, Stan::from_value(stan)?)));
        let stored = match (&r.outcome, forwarded) {
            (Some(o), Some((connector, link_stan))) if o.source == OutcomeSource::Bank as u8 => {
                Stored::Bank {
                    connector,
                    link_stan,
                    answer: o.answer.clone(),
                }
            }
            (Some(o), _) => Stored::Switch(
                ResponseCode::from_de39(&o.de39).unwrap_or(ResponseCode::SystemMalfunction),
            ),
            (None, Some(_)) => Stored::Switch(ResponseCode::LateResponse),
            (None, None) => Stored::Switch(ResponseCode::DestinationUnavailable),
        };
        restored += usize::from(recent.restore(&request, stored));
    }
    if restored > 0 {
        tracing::info!(restored, "duplicates table rebuilt from the journal");
    }
}
