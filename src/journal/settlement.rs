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

    /// The settlement as a table for a person (`from` and `to` as given).
    pub fn table(&self, from: &str, to: &str) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "settlement {from} .. {to} ({} records read)",
            self.records
        );
        let _ = writeln!(
            t,
            "{:<36} {:>9} {:>18} {:>9} {:>18} {:>18}",
            "acquirer -> issuer currency", "approved", "sum", "reversed", "sum", "net"
        );
        for (pair, p) in &self.pairs {
            let _ = writeln!(
                t,
                "{pair:<36} {:>9} {:>18} {:>9} {:>18} {:>18}",
                p.approved, p.approved_sum, p.reversed, p.reversed_sum, p.net
            );
        }
        let _ = writeln!(t, "net positions (positive: to receive)");
        for (who, net) in &self.positions {
            let _ = writeln!(t, "  {who:<24} {net:>18}");
        }
        for (currency, sum) in &self.balance {
            let _ = writeln!(t, "  {currency}: positions sum to {sum}");
        }
        t
    }
}

/// Why a time given for a settlement window is not one.
#[derive(Debug, thiserror::Error)]
pub enum TimeError {
    /// Neither Unix ms nor an RFC 3339 time.
    #[error("expected Unix ms or an RFC 3339 time (YYYY-MM-DDTHH:MM:SS[.fff]Z): {0}")]
    Format(#[from] time::error::Parse),
    /// Before 1970.
    #[error("before 1970")]
    BeforeEpoch,
}

/// Unix ms from `1234567890123` or an RFC 3339 time (`2026-11-30T00:00:00Z`,
/// `2026-11-30T01:00:00.5+01:00`).
pub fn parse_time(text: &str) -> Result<u64, TimeError> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| TimeError::BeforeEpoch)
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
    let word = u64::from_le_bytes(r.body.get(..8)?.try_into().ok()?);
    let acquirer = crate::core::writeahead::read_accepted_head(word).0?;
    let body = r.body.get(8..)?;
    // Settlement needs amounts and institutions, never the card: the protected
    // form's message is enough.
    let body = match r.protected {
        true => crate::journal::protect::message_part(body)?.0,
        false => body,
    };
    let message = Message::decode_canonical(dialect, Bytes::copy_from_slice(body)).ok()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_unix_ms_or_rfc_3339() {
        assert_eq!(parse_time("1764460800123").unwrap(), 1_764_460_800_123);
        assert_eq!(
            parse_time("2025-11-30T00:00:00Z").unwrap(),
            1_764_460_800_000
        );
        assert_eq!(
            parse_time("2025-11-30T00:00:00.25Z").unwrap(),
            1_764_460_800_250
        );
        assert_eq!(
            parse_time("2025-11-30T01:00:00+01:00").unwrap(),
            1_764_460_800_000
        );
        assert!(matches!(
            parse_time("1969-12-31T23:59:59Z"),
            Err(TimeError::BeforeEpoch)
        ));
        // Not a panic: non-ASCII where the fraction goes, and other junk.
        for bad in [
            "2024-01-01T00:00:00.ééZ",
            "2024-13-01T00:00:00Z",
            "é",
            "",
            "2024-01-01",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.to_string().starts_with("expected Unix ms"), "{bad}: {e}");
        }
    }
}
