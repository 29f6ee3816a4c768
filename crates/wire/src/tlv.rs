//! Structured fields: BER-TLV (EMV data in DE55) and tag-length-value with
//! fixed-width ASCII tags and lengths (`TTLLL…`, private-use fields). The switch
//! checks the structure at the boundary and carries the bytes through unchanged.

use serde::Deserialize;
use std::fmt;

/// How a field's value is structured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum Tlv {
    /// BER-TLV (ISO/IEC 8825, as EMV uses it): tags of one or more bytes (low five
    /// bits all set: more follow, each with its high bit set but the last),
    /// definite lengths (short form below 0x80, long form 0x81..=0x84), values
    /// within the field.
    Ber,
    /// Tags of `tag` characters then lengths of `len` decimal digits, repeated:
    /// `tag2-len3` reads `01005HELLO02003ABC`.
    TagLength {
        /// Characters of each tag.
        tag: u8,
        /// Digits of each length.
        len: u8,
    },
}

impl TryFrom<String> for Tlv {
    type Error = String;

    fn try_from(s: String) -> Result<Tlv, String> {
        if s == "ber" {
            return Ok(Tlv::Ber);
        }
        let digit = |p: Option<&str>| {
            p.and_then(|d| d.parse::<u8>().ok())
                .filter(|d| (1..=9).contains(d))
        };
        let parsed = s.strip_prefix("tag").and_then(|rest| {
            let (tag, len) = rest.split_once("-len")?;
            Some(Tlv::TagLength {
                tag: digit(Some(tag))?,
                len: digit(Some(len))?,
            })
        });
        parsed.ok_or_else(|| format!("expected \"ber\" or \"tagN-lenM\" (N, M 1..=9), found {s:?}"))
    }
}

/// What is wrong with a structured value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlvProblem {
    /// The value ends inside a tag.
    TagTruncated,
    /// The value ends inside a length, or a length is not a number of its kind
    /// (a BER indefinite or over-long form, a non-digit).
    BadLength,
    /// An element's value runs past the end of the field.
    ValueOverruns {
        /// The element's declared length.
        declared: usize,
        /// Bytes left in the field.
        left: usize,
    },
}

/// A structure error: the element's tag (as far as it was read) and what is
/// wrong; the offset within the value is returned beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlvError {
    /// The tag: BER tag bytes big-endian (up to 4), or the ASCII tag's digits as a
    /// number when it is one (0 when it is not, or was not read).
    pub tag: u32,
    /// What is wrong.
    pub problem: TlvProblem,
}

impl fmt::Display for TlvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "element with tag {:X}: ", self.tag)?;
        match self.problem {
            TlvProblem::TagTruncated => f.write_str("the field ends inside its tag"),
            TlvProblem::BadLength => f.write_str("its length is truncated or malformed"),
            TlvProblem::ValueOverruns { declared, left } => write!(
                f,
                "its length {declared} runs past the field's end ({left} bytes left)"
            ),
        }
    }
}

impl Tlv {
    /// The first structure error in `value` and the offset within `value` of the
    /// element it is about; `None` when the value is well formed.
    pub fn check(self, value: &[u8]) -> Option<(usize, TlvError)> {
        match self {
            Tlv::Ber => check_ber(value),
            Tlv::TagLength { tag, len } => {
                check_tag_length(value, usize::from(tag), usize::from(len))
            }
        }
    }

    /// The name used in dialect files.
    pub fn name(self) -> String {
        match self {
            Tlv::Ber => "ber".to_owned(),
            Tlv::TagLength { tag, len } => format!("tag{tag}-len{len}"),
        }
    }
}

fn check_ber(value: &[u8]) -> Option<(usize, TlvError)> {
    let mut at = 0;
    while at < value.len() {
        let start = at;
        // EMV allows 0x00 bytes before, between and after elements.
        if value[at] == 0x00 {
            at += 1;
            continue;
        }
        let err = |tag, problem| Some((start, TlvError { tag, problem }));
        let mut tag = u32::from(value[at]);
        at += 1;
        if tag & 0x1f == 0x1f {
            loop {
                let Some(&b) = value.get(at) else {
                    return err(tag, TlvProblem::TagTruncated);
                };
                tag = (tag << 8) | u32::from(b);
                at += 1;
                if b & 0x80 == 0 {
                    break;
                }
                if at - start >= 4 {
                    return err(tag, TlvProblem::TagTruncated);
                }
            }
        }
        let Some(&first) = value.get(at) else {
            return err(tag, TlvProblem::BadLength);
        };
        at += 1;
        let declared = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || at + n > value.len() {
                return err(tag, TlvProblem::BadLength);
            }
            let v = value[at..at + n]
                .iter()
                .fold(0usize, |v, &b| (v << 8) | usize::from(b));
            at += n;
            v
        };
        let left = value.len() - at;
        if declared > left {
            return err(tag, TlvProblem::ValueOverruns { declared, left });
        }
        at += declared;
    }
    None
}

fn check_tag_length(value: &[u8], tag_len: usize, len_len: usize) -> Option<(usize, TlvError)> {
    let mut at = 0;
    while at < value.len() {
        let start = at;
        let Some(tag_bytes) = value.get(at..at + tag_len) else {
            return Some((
                start,
                TlvError {
                    tag: 0,
                    problem: TlvProblem::TagTruncated,
                },
            ));
        };
        let tag = tag_bytes
            .iter()
            .try_fold(0u32, |v, &b| {
                b.is_ascii_digit().then(|| v * 10 + u32::from(b - b'0'))
            })
            .unwrap_or(0);
        at += tag_len;
        let err = |problem| Some((start, TlvError { tag, problem }));
        let Some(digits) = value.get(at..at + len_len) else {
            return err(TlvProblem::BadLength);
        };
        let Some(declared) = digits.iter().try_fold(0usize, |v, &b| {
            b.is_ascii_digit().then(|| v * 10 + usize::from(b - b'0'))
        }) else {
            return err(TlvProblem::BadLength);
        };
        at += len_len;
        let left = value.len() - at;
        if declared > left {
            return err(TlvProblem::ValueOverruns { declared, left });
        }
        at += declared;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ber_elements_are_walked_and_errors_placed() {
        let emv = [
            0x9f, 0x02, 0x06, 0, 0, 0, 1, 0x23, 0x45, 0x5f, 0x2a, 0x02, 0x09, 0x78, 0x00, 0x82,
            0x02, 0x19, 0x80,
        ];
        assert_eq!(Tlv::Ber.check(&emv), None);
        assert_eq!(Tlv::Ber.check(&[]), None);
        // A long-form length.
        let mut long = vec![0x70, 0x81, 0x80];
        long.extend_from_slice(&[0u8; 0x80]);
        assert_eq!(Tlv::Ber.check(&long), None);
        // 5F2A claims 3 bytes, 2 are left.
        let bad = [0x9f, 0x02, 0x01, 0x00, 0x5f, 0x2a, 0x03, 0x09, 0x78];
        assert_eq!(
            Tlv::Ber.check(&bad),
            Some((
                4,
                TlvError {
                    tag: 0x5f2a,
                    problem: TlvProblem::ValueOverruns {
                        declared: 3,
                        left: 2
                    }
                }
            ))
        );
        // Ends inside a two-byte tag; an indefinite length.
        assert_eq!(
            Tlv::Ber.check(&[0x9f]).map(|e| e.1.problem),
            Some(TlvProblem::TagTruncated)
        );
        assert_eq!(
            Tlv::Ber.check(&[0x82, 0x80]).map(|e| e.1.problem),
            Some(TlvProblem::BadLength)
        );
    }

    #[test]
    fn a_malformed_de55_is_named_by_field_tag_and_wire_offset() {
        use crate::{DecodeErrorKind, Dialect, Encoder, Location, Message, Mti};
        let icc = [0x9f, 0x02, 0x01, 0x00, 0x5f, 0x2a, 0x03, 0x09, 0x78];
        for name in ["iso87-ascii", "iso87-binary", "iso87-ebcdic"] {
            let d = Dialect::builtin(name).unwrap();
            let mut out = bytes::BytesMut::new();
            let mut enc = Encoder::new(&d, &mut out, Mti::FINANCIAL);
            enc.field(3, b"000000").unwrap();
            enc.field(55, &icc).unwrap();
            enc.finish();
            let e = Message::decode(&d, out.clone().freeze()).unwrap_err();
            assert_eq!(e.location, Location::Field(55), "{name}");
            assert_eq!(
                e.kind,
                DecodeErrorKind::BadTlv {
                    tag: 0x5f2a,
                    problem: TlvProblem::ValueOverruns {
                        declared: 3,
                        left: 2
                    }
                },
                "{name}"
            );
            // The element 5F2A starts 4 bytes into the value, which ends the message.
            assert_eq!(e.offset, out.len() - icc.len() + 4, "{name}");
        }
    }

    #[test]
    fn tag_length_values_are_walked() {
        let t = Tlv::try_from("tag2-len3".to_owned()).unwrap();
        assert_eq!(t, Tlv::TagLength { tag: 2, len: 3 });
        assert_eq!(t.name(), "tag2-len3");
        assert_eq!(t.check(b"01005HELLO02003ABC"), None);
        assert_eq!(
            t.check(b"01005HELLO02009ABC"),
            Some((
                10,
                TlvError {
                    tag: 2,
                    problem: TlvProblem::ValueOverruns {
                        declared: 9,
                        left: 3
                    }
                }
            ))
        );
        assert_eq!(
            t.check(b"01X05").map(|e| e.1.problem),
            Some(TlvProblem::BadLength)
        );
        assert!(Tlv::try_from("tag0-len3".to_owned()).is_err());
        assert!(Tlv::try_from("tlv".to_owned()).is_err());
    }
}
