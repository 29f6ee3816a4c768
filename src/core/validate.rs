//! Admission of one decoded request: who may send it, is it complete, where it goes.
//!
//! Pure function of the message, the sender's certificate identity and the route
//! table; the answer is a decision the transport carries out.

use super::codes::ResponseCode;
use super::ids::InstitutionId;
use super::route::{BankIndex, FailoverId, NoRoute, RouteTable};
use crate::money::{currency_from_de49, parse_de4, Amount};
use crate::wire::{Message, Mti};
use std::fmt;

/// What kind of request an admitted message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// 0100 authorization.
    Authorization,
    /// 0200 financial.
    Financial,
    /// 0400 reversal.
    Reversal,
    /// 0420/0421 reversal advice.
    ReversalAdvice,
}

impl RequestKind {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Authorization => "0100",
            RequestKind::Financial => "0200",
            RequestKind::Reversal => "0400",
            RequestKind::ReversalAdvice => "0420",
        }
    }
}

/// Why the switch answers a request itself instead of forwarding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A field the message type needs is absent.
    MissingField(u8),
    /// DE32 differs from the institution named by the client certificate.
    AcquirerMismatch,
    /// The MTI is not one the switch accepts from acquirers.
    UnsupportedMti,
    /// DE70 is not sign-on (001), sign-off (002) or echo (301).
    UnsupportedNetworkCode,
    /// DE49 is not an ISO 4217 numeric currency.
    UnknownCurrency,
    /// DE4 is not 12 digits.
    BadAmount,
    /// No connector serves the destination.
    NoRoute(NoRoute),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::MissingField(n) => write!(f, "field {n} is required and absent"),
            Reason::AcquirerMismatch => {
                f.write_str("field 32 differs from the certificate's institution")
            }
            Reason::UnsupportedMti => f.write_str("MTI not accepted from acquirers"),
            Reason::UnsupportedNetworkCode => f.write_str("field 70 not 001, 002 or 301"),
            Reason::UnknownCurrency => f.write_str("field 49 is not an ISO 4217 numeric currency"),
            Reason::BadAmount => f.write_str("field 4 is not 12 digits of minor units"),
            Reason::NoRoute(NoRoute::UnknownReceiver) => {
                f.write_str("field 100 names no institution served by a connector")
            }
            Reason::NoRoute(NoRoute::NoPrefixMatch) => f.write_str("no route for the PAN prefix"),
            Reason::NoRoute(NoRoute::NoRoutingField) => f.write_str("neither field 100 nor 2"),
        }
    }
}

impl Reason {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MissingField(_) => "missing_field",
            Reason::AcquirerMismatch => "acquirer_mismatch",
            Reason::UnsupportedMti => "unsupported_mti",
            Reason::UnsupportedNetworkCode => "unsupported_network_code",
            Reason::UnknownCurrency => "unknown_currency",
            Reason::BadAmount => "bad_amount",
            Reason::NoRoute(_) => "no_route",
        }
    }
}

/// The decision for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Forward to this bank's connector.
    Forward {
        /// The destination connector.
        bank: BankIndex,
        /// The route's failover list, for while `bank` has no link up.
        failover: FailoverId,
        /// The request kind.
        kind: RequestKind,
        /// DE4 with DE49, when the message carries an amount.
        amount: Option<Amount>,
    },
    /// A network management request the switch answers with 0810 and this code.
    Network(ResponseCode),
    /// The switch answers with this code at once.
    Decline(ResponseCode, Reason),
    /// An answer MTI arriving from an acquirer: nothing to answer; dropped and counted.
    Unsolicited,
}

fn require(msg: &Message, n: u8) -> Result<&[u8], Admission> {
    msg.field(n).ok_or(Admission::Decline(
        ResponseCode::FormatError,
        Reason::MissingField(n),
    ))
}

const REPEAT_AUTHORIZATION: [u8; 4] = *b"0101";
const REPEAT_FINANCIAL: [u8; 4] = *b"0201";
const REPEAT_REVERSAL: [u8; 4] = *b"0401";

/// Decides what to do with a request received from `acquirer`'s connection.
pub fn admit(msg: &Message, acquirer: InstitutionId, routes: &RouteTable) -> Admission {
    match admit_inner(msg, acquirer, routes) {
        Ok(a) | Err(a) => a,
    }
}

fn admit_inner(
    msg: &Message,
    acquirer: InstitutionId,
    routes: &RouteTable,
) -> Result<Admission, Admission> {
    let mti = msg.mti();
    if mti.is_response() {
        return Ok(Admission::Unsolicited);
    }
    let kind = match mti {
        Mti::NETWORK => return network(msg),
        // A repeat (xx01) is its original sent again: a duplicate or a first copy.
        Mti::AUTHORIZATION | Mti(REPEAT_AUTHORIZATION) => RequestKind::Authorization,
        Mti::FINANCIAL | Mti(REPEAT_FINANCIAL) => RequestKind::Financial,
        Mti::REVERSAL | Mti(REPEAT_REVERSAL) => RequestKind::Reversal,
        Mti::REVERSAL_ADVICE | Mti::REVERSAL_ADVICE_REPEAT => RequestKind::ReversalAdvice,
        _ => {
            let code = ResponseCode::InvalidTransaction;
            return Err(Admission::Decline(code, Reason::UnsupportedMti));
        }
    };
    require(msg, 11)?;
    require(msg, 7)?;
    if matches!(kind, RequestKind::Reversal | RequestKind::ReversalAdvice) {
        require(msg, 90)?; // names the original
    }
    let de32 = require(msg, 32)?;
    if InstitutionId::from_digits(de32) != Some(acquirer) {
        return Err(Admission::Decline(
            ResponseCode::NotPermitted,
            Reason::AcquirerMismatch,
        ));
    }
    let processing = require(msg, 3)?;
    let amount = match (msg.field(4), processing.get(..2)) {
        (None, Some(b"31")) => None, // balance inquiry: no amount
        (de4, _) => {
            let de4 = de4.ok_or(Admission::Decline(
                ResponseCode::FormatError,
                Reason::MissingField(4),
            ))?;
            let de49 = require(msg, 49)?;
            let invalid = |reason| Admission::Decline(ResponseCode::InvalidAmount, reason);
            let minor = parse_de4(de4).map_err(|_| invalid(Reason::BadAmount))?;
            let currency = currency_from_de49(de49).ok_or(invalid(Reason::UnknownCurrency))?;
            Some(Amount { minor, currency })
        }
    };
    let to = routes
        .destination(msg.field(100), msg.field(2))
        .map_err(|e| Admission::Decline(ResponseCode::NoRoute, Reason::NoRoute(e)))?;
    Ok(Admission::Forward {
        bank: to.bank,
        failover: to.failover,
        kind,
        amount,
    })
}

fn network(msg: &Message) -> Result<Admission, Admission> {
    require(msg, 11)?;
    match require(msg, 70)? {
        b"001" | b"002" | b"301" => Ok(Admission::Network(ResponseCode::Approved)),
        _ => Err(Admission::Network(ResponseCode::InvalidTransaction)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Dialect, Encoder};
    use bytes::BytesMut;

    fn msg(mti: Mti, fields: &[(u8, &[u8])]) -> Message {
        let d = Dialect::iso87_ascii();
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(&d, &mut out, mti);
        for (n, v) in fields {
            enc.field(*n, v).unwrap();
        }
        enc.finish();
        Message::decode(&d, out.freeze()).unwrap()
    }

    fn routes() -> RouteTable {
        let mut t = RouteTable::new();
        t.add_prefix("4", 0).unwrap();
        t.add_receiver("200002".parse().unwrap(), 1);
        t
    }

    const BASE: [(u8, &[u8]); 6] = [
        (2, b"4111111111111111"),
        (3, b"000000"),
        (4, b"000000001000"),
        (7, b"1125103000"),
        (11, b"000001"),
        (32, b"100001"),
    ];

    #[test]
    fn decisions() {
        let acq: InstitutionId = "100001".parse().unwrap();
        let r = routes();
        let mut f: Vec<(u8, &[u8])> = BASE.to_vec();
        f.push((49, b"978"));
        let a = admit(&msg(Mti::FINANCIAL, &f), acq, &r);
        assert!(matches!(
            a,
            Admission::Forward {
                bank: 0,
                kind: RequestKind::Financial,
                ..
            }
        ));
        let other: InstitutionId = "100002".parse().unwrap();
        let a = admit(&msg(Mti::FINANCIAL, &f), other, &r);
        assert_eq!(
            a,
            Admission::Decline(ResponseCode::NotPermitted, Reason::AcquirerMismatch)
        );
        f.push((100, b"200002"));
        assert!(matches!(
            admit(&msg(Mti::FINANCIAL, &f), acq, &r),
            Admission::Forward { bank: 1, .. }
        ));
        f.pop();
        f.push((100, b"200009"));
        let a = admit(&msg(Mti::FINANCIAL, &f), acq, &r);
        assert_eq!(
            a,
            Admission::Decline(
                ResponseCode::NoRoute,
                Reason::NoRoute(NoRoute::UnknownReceiver)
            )
        );
        let mut f: Vec<(u8, &[u8])> = BASE.to_vec();
        f.push((49, b"999"));
        let a = admit(&msg(Mti::FINANCIAL, &f), acq, &r);
        assert_eq!(
            a,
            Admission::Decline(ResponseCode::InvalidAmount, Reason::UnknownCurrency)
        );
        let a = admit(&msg(Mti::FINANCIAL, &BASE[1..]), acq, &r);
        assert_eq!(
            a,
            Admission::Decline(ResponseCode::FormatError, Reason::MissingField(49))
        );
        let echo = msg(
            Mti::NETWORK,
            &[(7, b"1125103000"), (11, b"000001"), (70, b"301")],
        );
        assert_eq!(
            admit(&echo, acq, &r),
            Admission::Network(ResponseCode::Approved)
        );
        let bad = msg(Mti(*b"0300"), &[(11, b"000001")]);
        assert_eq!(
            admit(&bad, acq, &r),
            Admission::Decline(ResponseCode::InvalidTransaction, Reason::UnsupportedMti)
        );
        assert_eq!(
            admit(&msg(Mti::FINANCIAL_RESPONSE, &[]), acq, &r),
            Admission::Unsolicited
        );
    }
}
