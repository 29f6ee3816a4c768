//! Settlement totals from the journal, in exact decimal arithmetic: per pair of
//! institutions (acquirer, issuer) and currency, the approved financial requests
//! net of approved reversals, and each institution's net position; the positions
//! of each currency sum to zero.
//!
//! Counted, among requests accepted within the window:
//! - a financial request (0200/0201) the bank approved (outcome from the bank, DE39
//!   00): +DE4 (a refund, processing code 20xxxx: −DE4) owed by the issuer to the
//!   acquirer;
//! - a reversal (0400/0401, or an acquirer's 0420/0421) the bank approved: the
//!   opposite, for the reversal's DE4.
//!
//! Requests the switch answered itself (declines, 68, 91, …) move no money. The
//! journal is read in one pass; memory grows with the requests still open in it
//! (accepted without an outcome yet), not with the journal.

use super::reader::{scan, JournalError};
use super::record::{Record, RecordKind};
use crate::core::InstitutionId;
use crate::money::{currency_from_de49, parse_de4};
use crate::wire::{Dialect, Message};
use bytes::Bytes;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Totals of one (acquirer, issuer, currency).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PairTotal {
    /// Approved financial requests.
    pub approved: u64,
    /// Their amounts (refunds negative).
    pub approved_sum: Decimal,
    /// Approved reversals.
    pub reversed: u64,
    /// Their amounts.
    pub reversed_sum: Decimal,
    /// What the issuer owes the acquirer: `approved_sum - reversed_sum`.
    pub net: Decimal,
}

/// The settlement of a window.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Settlement {
    /// Window start, Unix ms (inclusive).
    pub from_ms: u64,
    /// Window end, Unix ms (exclusive).
    pub to_ms: u64,
    /// Per acquirer, issuer and currency.
    pub pairs: BTreeMap<String, PairTotal>,
    /// Net position per institution and currency (positive: to receive).
    pub positions: BTreeMap<String, Decimal>,
    /// Per currency, the sum of all positions (zero when balanced).
    pub balance: BTreeMap<String, Decimal>,
    /// Records read.
    pub records: u64,
}

impl Settlement {
    /// Whether every currency's positions sum to zero.
    pub fn balanced(&self) -> bool {
        self.balance.values().all(|b| b.is_zero())
    }
}

/// A request accepted within the window, until its outcome.
struct Open {
    acquirer: InstitutionId,
    issuer: Option<InstitutionId>,
    sign: i8,
    amount: Decimal,
    currency: &'static str,
}

/// Reads the journal in `dir` and settles requests accepted in `[from_ms, to_ms)`;
/// messages are decoded with `dialect` (the acquirers' dialect).
pub fn settle(
    dir: &Path,
    from_ms: u64,
    to_ms: u64,
    dialect: &Dialect,
) -> Result<Settlement, JournalError> {
    let mut open: HashMap<u64, Open> = HashMap::new();
    let mut out = Settlement {
        from_ms,
        to_ms,
        ..Settlement::default()
    };
    let s = scan(dir, |_, _, r| {
        record(r, from_ms..to_ms, dialect, &mut open, &mut out)
    })?;
    out.records = s.records;
    // The check: every currency's positions, summed.
    for (key, position) in &out.positions {
        let currency = key.rsplit(' ').next().unwrap_or("").to_owned();
        *out.balance.entry(currency).or_default() += position;
    }
    Ok(out)
}

fn record(
    r: &Record<'_>,
    window: std::ops::Range<u64>,
    dialect: &Dialect,
    open: &mut HashMap<u64, Open>,
    out: &mut Settlement,
) {
    match r.kind {
        RecordKind::Accepted if window.contains(&r.unix_ms) => {
            if let Some(o) = accepted(r, dialect) {
                open.insert(r.request_id, o);
            }
        }
        RecordKind::Forwarded => {
            let issuer = r
                .body
                .get(6..14)
                .and_then(|b| InstitutionId::from_raw(u64::from_le_bytes(b.try_into().ok()?)));
            if let (Some(o), Some(issuer)) = (open.get_mut(&r.request_id), issuer) {
                o.issuer = Some(issuer);
            }
        }
        RecordKind::Outcome => {
            let Some(o) = open.remove(&r.request_id) else {
                return;
            };
            // DE39 00 from the bank (source 1).
            if r.body.get(..3) != Some(b"00\x01") {
                return;
            }
            let Some(issuer) = o.issuer else { return };
            let key = format!("{} -> {} {}", o.acquirer, issuer, o.currency);
            let t = out.pairs.entry(key).or_default();
            let amount = o.amount * Decimal::from(o.sign.signum());
            if o.sign.abs() == 1 {
                t.approved += 1;
                t.approved_sum += amount;
                t.net += amount;
            } else {
                t.reversed += 1;
                t.reversed_sum += amount;
                t.net -= amount;
            }
            let net = if o.sign.abs() == 1 { amount } else { -amount };
            *out.positions
                .entry(format!("{} {}", o.acquirer, o.currency))
                .or_default() += net;
            *out.positions
                .entry(format!("{} {}", issuer, o.currency))
                .or_default() -= net;
        }
        _ => {}
    }
}

/// A settled request of interest: `sign` is ±1 for a financial request (−1 a
/// refund), ±2 for a reversal (of a refund: −2).
fn accepted(r: &Record<'_>, dialect: &Dialect) -> Option<Open> {
    let raw = u64::from_le_bytes(r.body.get(..8)?.try_into().ok()?);
    let acquirer = InstitutionId::from_raw(raw)?;
    let message = Message::decode(dialect, Bytes::copy_from_slice(r.body.get(8..)?)).ok()?;
    let kind: i8 = match &message.mti().0 {
        b"0200" | b"0201" => 1,
        b"0400" | b"0401" | b"0420" | b"0421" => 2,
        _ => return None,
    };
    let refund = message.field(3).is_some_and(|p| p.starts_with(b"20"));
    let currency = currency_from_de49(message.field(49)?)?;
    let minor = parse_de4(message.field(4)?).ok()?;
    Some(Open {
        acquirer,
        issuer: None,
        sign: if refund { -kind } else { kind },
        amount: Decimal::new(minor, u32::from(currency.exponent)),
        currency: currency.alpha,
    })
}
