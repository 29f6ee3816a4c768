//! The journal's record format (sans-IO): framing, checksums, typed errors.
//!
//! ```text
//! u32 len   bytes after this field (crc .. end of payload), little-endian
//! u32 crc   CRC32C of the len field and of everything after crc
//! u64 seq   record sequence number, strictly increasing across segments
//! u8  kind  RecordKind; its top bit ([`PROTECTED_BIT`]) set when the message
//!           is in the protected form (card data removed or enciphered:
//!           `journal::protect`)
//! u64 request_id
//! u64 unix_ms  wall-clock time the record was made
//! ..  body  kind-specific bytes (for messages: the ISO 8583 message as on the wire)
//! ```

use std::fmt;

/// Bytes before the length-counted part (the `len` field).
pub const LEN_BYTES: usize = 4;
/// Fixed bytes counted by `len` before the body: crc, seq, kind, request id, time.
pub const FIXED_BYTES: usize = 4 + 8 + 1 + 8 + 8;
/// Largest body: one ISO 8583 message of the largest frame plus a little metadata.
pub const BODY_SIZE_MAX_BYTES: usize = 65_535 + 64;
/// Bit of the kind byte set when the record's message is in the protected form.
pub const PROTECTED_BIT: u8 = 0x80;
/// Largest value of `len`.
pub const RECORD_LEN_MAX_BYTES: usize = FIXED_BYTES + BODY_SIZE_MAX_BYTES;

/// What a record says happened to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// A request was accepted from an acquirer; body: acquirer id (u64) + the message.
    Accepted = 1,
    /// It was written to a bank; body: connector index (u16) + link STAN (u32) +
    /// the bank's institution id (u64; absent in journals written before it was
    /// added: readers take the first 6 bytes and the id when present).
    Forwarded = 2,
    /// Its outcome; body: DE39 (2 bytes) + source (u8) + the answer sent.
    Outcome = 3,
    /// A reversal advice was queued; body: connector index (u16) + the original's
    /// link STAN (u32) + the original request.
    ReversalQueued = 4,
    /// The bank acknowledged a reversal advice (0430); body: empty.
    ReversalAcked = 5,
}

impl RecordKind {
    /// The kind for a stored byte.
    pub fn from_u8(b: u8) -> Option<RecordKind> {
        Some(match b {
            1 => RecordKind::Accepted,
            2 => RecordKind::Forwarded,
            3 => RecordKind::Outcome,
            4 => RecordKind::ReversalQueued,
            5 => RecordKind::ReversalAcked,
            _ => return None,
        })
    }

    /// Name for dumps and counts.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Accepted => "accepted",
            RecordKind::Forwarded => "forwarded",
            RecordKind::Outcome => "outcome",
            RecordKind::ReversalQueued => "reversal_queued",
            RecordKind::ReversalAcked => "reversal_acked",
        }
    }

    /// Bytes of kind-specific metadata before the message in the body.
    pub fn head_len(self) -> usize {
        match self {
            RecordKind::Accepted => 8,
            RecordKind::Forwarded => 14,
            RecordKind::Outcome => 3,
            RecordKind::ReversalQueued => 6,
            RecordKind::ReversalAcked => 0,
        }
    }

    /// Every kind, in code order.
    pub const ALL: [RecordKind; 5] = [
        RecordKind::Accepted,
        RecordKind::Forwarded,
        RecordKind::Outcome,
        RecordKind::ReversalQueued,
        RecordKind::ReversalAcked,
    ];
}

/// One decoded record, borrowing its body from the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Sequence number.
    pub seq: u64,
    /// What happened.
    pub kind: RecordKind,
    /// The switch's id for the request.
    pub request_id: u64,
    /// When, in ms since the Unix epoch.
    pub unix_ms: u64,
    /// Kind-specific bytes.
    pub body: &'a [u8],
    /// Whether the message in `body` is in the protected form.
    pub protected: bool,
}

/// Why bytes are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than the record needs (possibly a torn write).
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// The length field is out of bounds.
    BadLength {
        /// The value found.
        len: u32,
    },
    /// The checksum does not match.
    BadChecksum {
        /// Stored CRC32C.
        stored: u32,
        /// Computed CRC32C.
        computed: u32,
    },
    /// Unknown record kind.
    BadKind {
        /// The byte found.
        kind: u8,
    },
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RecordError::Truncated { needed, available } => {
                write!(f, "expected {needed} bytes of record, found {available}")
            }
            RecordError::BadLength { len } => {
                write!(
                    f,
                    "expected a length of {}..={RECORD_LEN_MAX_BYTES}, found {len}",
                    FIXED_BYTES
                )
            }
            RecordError::BadChecksum { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch: stored {stored:08x}, computed {computed:08x}"
                )
            }
            RecordError::BadKind { kind } => write!(f, "unknown record kind {kind}"),
        }
    }
}

impl std::error::Error for RecordError {}

/// Appends one record to `out`; returns its size in bytes.
pub fn encode(out: &mut Vec<u8>, record: &Record<'_>) -> usize {
    encode_parts(out, record, &[record.body])
}

/// Appends one record whose body is `parts` one after the other (the record's own
/// `body` is not used): the writer's head and message go in without first being
/// copied together.
pub fn encode_parts(out: &mut Vec<u8>, record: &Record<'_>, parts: &[&[u8]]) -> usize {
    let body_len: usize = parts.iter().map(|p| p.len()).sum();
    debug_assert!(body_len <= BODY_SIZE_MAX_BYTES, "caller bounds the body");
    let start = out.len();
    let len = (FIXED_BYTES + body_len) as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&record.seq.to_le_bytes());
    out.push(record.kind as u8 | if record.protected { PROTECTED_BIT } else { 0 });
    out.extend_from_slice(&record.request_id.to_le_bytes());
    out.extend_from_slice(&record.unix_ms.to_le_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    let crc = checksum(&out[start..start + 4], &out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

fn checksum(len: &[u8], rest: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(len), rest)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Decodes the record at the start of `buf`: the record and its size, `Ok(None)` when
/// `buf` is empty.
pub fn decode(buf: &[u8]) -> Result<Option<(Record<'_>, usize)>, RecordError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.len() < LEN_BYTES {
        return Err(RecordError::Truncated {
            needed: LEN_BYTES,
            available: buf.len(),
        });
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let n = len as usize;
    if !(FIXED_BYTES..=RECORD_LEN_MAX_BYTES).contains(&n) {
        return Err(RecordError::BadLength { len });
    }
    let total = LEN_BYTES + n;
    if buf.len() < total {
        return Err(RecordError::Truncated {
            needed: total,
            available: buf.len(),
        });
    }
    let stored = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let computed = checksum(&buf[..4], &buf[8..total]);
    if stored != computed {
        return Err(RecordError::BadChecksum { stored, computed });
    }
    let protected = buf[16] & PROTECTED_BIT != 0;
    let kind = RecordKind::from_u8(buf[16] & !PROTECTED_BIT)
        .ok_or(RecordError::BadKind { kind: buf[16] })?;
    let record = Record {
        seq: u64_at(buf, 8),
        kind,
        protected,
        request_id: u64_at(buf, 17),
        unix_ms: u64_at(buf, 25),
        body: &buf[33..total],
    };
    Ok(Some((record, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let r = Record {
            seq: 7,
            kind: RecordKind::Outcome,
            protected: false,
            request_id: 42,
            unix_ms: 1_700,
            body,
        };
        encode(&mut out, &r);
        out
    }

    #[test]
    fn round_trip_and_every_flip_is_caught() {
        let bytes = sample(b"00\x01hello");
        let (r, size) = decode(&bytes).unwrap().unwrap();
        assert_eq!(size, bytes.len());
        assert_eq!(
            (r.seq, r.kind, r.request_id, r.unix_ms),
            (7, RecordKind::Outcome, 42, 1_700)
        );
        assert_eq!(r.body, b"00\x01hello");
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    decode(&bad).is_err(),
                    "flip at byte {i} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncation_and_bounds() {
        let bytes = sample(b"x");
        for cut in 1..bytes.len() {
            assert!(matches!(
                decode(&bytes[..cut]),
                Err(RecordError::Truncated { .. })
            ));
        }
        assert_eq!(decode(&[]), Ok(None));
        let huge = (RECORD_LEN_MAX_BYTES as u32 + 1).to_le_bytes();
        assert!(matches!(decode(&huge), Err(RecordError::BadLength { .. })));
        assert!(matches!(
            decode(&[0, 0, 0, 0]),
            Err(RecordError::BadLength { len: 0 })
        ));
    }
}
