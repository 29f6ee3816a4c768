//! Reversal advices (sans-IO): the 0420 (or 0421 repeat) that tells a bank to undo
//! a request whose answer the acquirer never received.
//!
//! The same DE90 rewriting serves an acquirer's own 0400: its DE90 names the
//! original under the acquirer's DE11, and the bank knows it under the link STAN.

use super::inflight::Stan;
use super::ResponseCode;
use crate::wire::{EncodeError, Encoder, Message, Mti};
use bytes::BytesMut;

/// DE90 length: original MTI 4, STAN 6, DE7 10, acquirer 11, forwarding institution 11.
pub const ORIGINAL_DATA_ELEMENTS_LEN: usize = 42;

/// Fields an advice copies from the original request (DE7, DE11, DE39, DE90 are new).
const COPIED: [u8; 11] = [2, 3, 4, 12, 13, 32, 37, 41, 42, 49, 100];

/// Whether `mti` is a reversal (0400/0401) or reversal advice (0420/0421): its DE90
/// names the payment it undoes.
pub fn is_reversal(mti: Mti) -> bool {
    matches!(&mti.0, b"0400" | b"0401" | b"0420" | b"0421")
}

/// A reversal's DE90 with the original STAN replaced by `link_stan` (the STAN the
/// bank saw the original under). `None` if DE90 is absent or not 42 bytes.
pub fn rewrite_de90(
    reversal: &Message,
    link_stan: Stan,
) -> Option<[u8; ORIGINAL_DATA_ELEMENTS_LEN]> {
    let de90 = reversal.field(90)?;
    let mut out: [u8; ORIGINAL_DATA_ELEMENTS_LEN] = de90.try_into().ok()?;
    out[4..10].copy_from_slice(&link_stan.to_de11());
    Some(out)
}

/// DE90 of a request as the bank saw it: its MTI, the STAN it carried on the link,
/// its DE7, DE32 and DE33, the institution ids right-justified and zero-filled.
/// When `original` is itself a reversal (an acquirer's 0400 that did not complete),
/// the payment it names is meant: its DE90 with the STAN as the bank saw it.
/// `None` if DE7, DE32 (or a reversal's DE90) is missing or malformed.
pub fn original_data_elements(
    original: &Message,
    link_stan: Stan,
) -> Option<[u8; ORIGINAL_DATA_ELEMENTS_LEN]> {
    if is_reversal(original.mti()) {
        return rewrite_de90(original, link_stan);
    }
    let mut out = [b'0'; ORIGINAL_DATA_ELEMENTS_LEN];
    out[..4].copy_from_slice(original.mti().as_bytes());
    out[4..10].copy_from_slice(&link_stan.to_de11());
    let de7 = original.field(7).filter(|v| v.len() == 10)?;
    out[10..20].copy_from_slice(de7);
    let right = |dst: &mut [u8], v: &[u8]| -> Option<()> {
        let skip = dst.len().checked_sub(v.len())?;
        dst[skip..].copy_from_slice(v);
        Some(())
    };
    right(&mut out[20..31], original.field(32)?)?;
    if let Some(forwarding) = original.field(33) {
        right(&mut out[31..42], forwarding)?;
    }
    Some(out)
}

/// Appends a reversal advice for `original` (sent on a link as `link_stan`) to `out`:
/// MTI 0420 (0421 when `repeat`), DE11 `advice_stan`, DE7 `now_de7`, DE39 68
/// (no answer in time), DE90 the original data elements. Returns its length.
pub fn encode_reversal_advice(
    original: &Message,
    (dialect, keys): (&crate::wire::Dialect, &crate::security::LinkKeys),
    link_stan: Stan,
    advice_stan: Stan,
    now_de7: &[u8; 10],
    repeat: bool,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let de90 = original_data_elements(original, link_stan).ok_or(EncodeError {
        field: 90,
        kind: crate::wire::EncodeErrorKind::UndefinedField,
    })?;
    let mti = if repeat {
        Mti::REVERSAL_ADVICE_REPEAT
    } else {
        Mti::REVERSAL_ADVICE
    };
    let start = out.len();
    let stan = advice_stan.to_de11();
    let reason = ResponseCode::LateResponse.as_bytes();
    let mut enc = Encoder::new(dialect, out, mti);
    let mut result = Ok(());
    for n in 2..=128u8 {
        let value = match n {
            7 => Some(&now_de7[..]),
            11 => Some(&stan[..]),
            39 => Some(&reason[..]),
            90 => Some(&de90[..]),
            n if COPIED.contains(&n) => original.field(n),
            _ => None,
        };
        if let Some(v) = value {
            result = result.and(enc.field(n, v));
        }
    }
    // The MAC last, on a link with a MAC key (DE90 is always there: DE128).
    let placeholder = keys.placeholder(dialect, 90);
    if let Some((n, zeros)) = placeholder {
        result = result.and(enc.field(n, zeros));
    }
    let malformed = |field| crate::wire::EncodeError {
        field,
        kind: crate::wire::EncodeErrorKind::Malformed,
    };
    match result {
        // finish() is 0 only when the wire conversion failed (see Encoder::finish).
        Ok(()) => match (enc.finish(), placeholder) {
            (0, _) => Err(malformed(0)),
            (_, Some((n, zeros))) if !keys.seal(&mut out[start..], zeros.len()) => {
                out.truncate(start);
                Err(malformed(n))
            }
            (len, _) => Ok(len),
        },
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Dialect;

    #[test]
    fn advice_references_the_request_as_the_bank_saw_it() {
        let d = Dialect::iso87_ascii();
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(&d, &mut out, Mti::FINANCIAL);
        let fields: [(u8, &[u8]); 9] = [
            (2, b"4111111111111111"),
            (3, b"000000"),
            (4, b"000000001000"),
            (7, b"1126093000"),
            (11, b"000042"),
            (32, b"100001"),
            (37, b"532912000001"),
            (49, b"978"),
            (100, b"200001"),
        ];
        for (n, v) in fields {
            enc.field(n, v).unwrap();
        }
        enc.finish();
        let original = Message::decode(&d, out.freeze()).unwrap();
        let link_stan = crate::core::inflight::Stan::from_de11(b"999998").unwrap();
        let advice_stan = crate::core::inflight::Stan::from_de11(b"000007").unwrap();
        let mut buf = BytesMut::new();
        encode_reversal_advice(
            &original,
            (&d, &Default::default()),
            link_stan,
            advice_stan,
            b"1126093100",
            false,
            &mut buf,
        )
        .unwrap();
        let advice = Message::decode(&d, buf.freeze()).unwrap();
        assert_eq!(advice.mti(), Mti::REVERSAL_ADVICE);
        assert_eq!(advice.field(11), Some(&b"000007"[..]));
        assert_eq!(advice.field(39), Some(&b"68"[..]));
        assert_eq!(advice.field(4), Some(&b"000000001000"[..]));
        assert_eq!(advice.field(100), Some(&b"200001"[..]));
        let de90 = advice.field(90).unwrap();
        assert_eq!(de90, &b"0200999998112609300000000100001000000000000"[..42]);
        let mut repeat = BytesMut::new();
        encode_reversal_advice(
            &original,
            (&d, &Default::default()),
            link_stan,
            advice_stan,
            b"1126093100",
            true,
            &mut repeat,
        )
        .unwrap();
        assert_eq!(&repeat[..4], b"0421");
    }
}
