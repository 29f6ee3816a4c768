//! Card data at rest: what of a message the journal may keep (PCI DSS 3.2, 3.5).
//!
//! Every message the switch journals (accepted requests, reversal advices'
//! originals, bank answers) is written in a **protected form** (records with
//! [`super::record::PROTECTED_BIT`]):
//!
//! * sensitive authentication data is **removed**: track 2 (DE35), track 3
//!   (DE36), track 1 (DE45), the PIN block (DE52) and ICC data (DE55, which may
//!   hold the track 2 equivalent, tag 57);
//! * the PAN (DE2) is removed from the message and kept in the trailer masked
//!   (first 6 and last 4 digits, for `journal dump` and investigations) and, for
//!   requests when a data key is configured (`[keys] journal_key`), enciphered
//!   with AES-GCM under it (the record's request id authenticated with it), so
//!   recovery can send reversal advices with their DE2. Answers keep only the
//!   masked PAN: a replayed answer takes DE2 from the retransmission it answers.
//!
//! ```text
//! message   the message without DE2, DE35, DE36, DE45, DE52, DE55
//! u64       content digest of the whole message as received (duplicates
//!           detection after a restart compares against it)
//! u8 + ..   masked PAN (length 0: none)
//! u8 + ..   nonce ‖ AES-GCM(PAN) ‖ tag (length 0: not enciphered)
//! u16       length of the trailer before this field, little-endian
//! ```
//!
//! A copy of the journal directory alone therefore reveals no PAN, track data
//! or PIN block; with the key store and master key, PANs of requests can be
//! read back (`recovery`), never the rest.

use crate::core::dedup::content_digest;
use crate::security::DataModule as Module;
use crate::wire::{reencode, Change, Dialect, Message};
use bytes::{Bytes, BytesMut};
use switchyard_security::module::{KeyHandle, SEALED_OVERHEAD_BYTES};

/// Fields never written to the journal (sensitive authentication data).
pub const REMOVED_FIELDS: [u8; 5] = [35, 36, 45, 52, 55];
/// The PAN, kept masked (and enciphered, for requests).
pub const PAN_FIELD: u8 = 2;
/// Longest PAN kept (ISO 7812: 19 digits).
const PAN_MAX_DIGITS: usize = 19;

/// How the journal protects what it writes: the data key for PANs, if any.
#[derive(Clone, Default)]
pub struct Protector {
    pan_key: Option<(Module, KeyHandle)>,
}

impl std::fmt::Debug for Protector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protector")
            .field("pans_enciphered", &self.pan_key.is_some())
            .finish()
    }
}

/// A protected message read back.
#[derive(Debug)]
pub struct Revealed {
    /// The message: without the removed fields, with DE2 when it could be
    /// deciphered.
    pub message: Message,
    /// The content digest of the message as it was received.
    pub digest: u64,
    /// The masked PAN, when the message had one.
    pub masked_pan: Option<Bytes>,
    /// Whether the message had a DE2 that is not in `message`.
    pub pan_withheld: bool,
}

/// The parts of a protected body.
struct Parts<'a> {
    message: &'a [u8],
    digest: u64,
    masked: &'a [u8],
    sealed: &'a [u8],
}

fn split(body: &[u8]) -> Option<Parts<'_>> {
    let (rest, len) = body.split_at_checked(body.len().checked_sub(2)?)?;
    let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
    let (message, trailer) = rest.split_at_checked(rest.len().checked_sub(len)?)?;
    let (digest, trailer) = trailer.split_at_checked(8)?;
    let (&masked_len, trailer) = trailer.split_first()?;
    let (masked, trailer) = trailer.split_at_checked(usize::from(masked_len))?;
    let (&sealed_len, trailer) = trailer.split_first()?;
    let (sealed, trailer) = trailer.split_at_checked(usize::from(sealed_len))?;
    if !trailer.is_empty() {
        return None;
    }
    let digest = u64::from_le_bytes(digest.try_into().ok()?);
    Some(Parts {
        message,
        digest,
        masked,
        sealed,
    })
}

/// The message part of a protected body (for readers that need no PAN:
/// settlement, dumps) and the masked PAN.
pub fn message_part(body: &[u8]) -> Option<(&[u8], &[u8])> {
    split(body).map(|p| (p.message, p.masked))
}

impl Protector {
    /// PANs of requests enciphered under data key `key` of `module`; without
    /// one, PANs are kept masked only (recovery's reversal advices then carry no
    /// DE2).
    pub fn new(pan_key: Option<(Module, KeyHandle)>) -> Protector {
        Protector { pan_key }
    }

    /// Whether request PANs are enciphered (else only masked).
    pub fn enciphers_pans(&self) -> bool {
        self.pan_key.is_some()
    }

    /// The protected form of `msg` (held in `dialect`'s layout; `digest`: its
    /// content digest if already computed), journaled for request
    /// `request_id`; `encipher_pan`: encipher its PAN (requests) or keep it
    /// masked only (answers). `None` when the message cannot be re-encoded
    /// without the removed fields (then it is not journaled at all).
    pub fn protect(
        &self,
        (msg, digest): (&Message, Option<u64>),
        dialect: &Dialect,
        request_id: u64,
        encipher_pan: bool,
    ) -> Option<Bytes> {
        let mut removed = [Change::Remove(PAN_FIELD); 1 + REMOVED_FIELDS.len()];
        let mut count = 0;
        for n in std::iter::once(PAN_FIELD).chain(REMOVED_FIELDS) {
            if msg.has(n) {
                removed[count] = Change::Remove(n);
                count += 1;
            }
        }
        let mut out = BytesMut::with_capacity(msg.as_bytes().len() + 96);
        // In the form messages are held in (as the journal always kept them),
        // never converted to a wire form.
        let held = dialect.canonical();
        reencode(msg, held, held, msg.mti(), &removed[..count], &mut out).ok()?;
        let trailer_at = out.len();
        // The duplicates table's digest, when it computed one already.
        let digest = digest.unwrap_or_else(|| content_digest(msg));
        out.extend_from_slice(&digest.to_le_bytes());
        let pan = msg.field(PAN_FIELD).filter(|p| p.len() <= PAN_MAX_DIGITS);
        match pan {
            Some(pan) => {
                // Written into a stack buffer: no String per message.
                use std::io::Write;
                let mut buf = [0u8; 2 * PAN_MAX_DIGITS];
                let mut w = &mut buf[..];
                let _ = write!(w, "{}", crate::wire::mask_pan(pan));
                let len = 2 * PAN_MAX_DIGITS - w.len();
                out.extend_from_slice(&[len as u8]);
                out.extend_from_slice(&buf[..len]);
            }
            None => out.extend_from_slice(&[0]),
        }
        // On the stack: nonce, the PAN enciphered, tag.
        let mut sealed = [0u8; PAN_MAX_DIGITS + SEALED_OVERHEAD_BYTES];
        let mut sealed_len = 0;
        if let (Some(pan), Some((module, key)), true) = (pan, &self.pan_key, encipher_pan) {
            sealed_len = module
                .seal_data(*key, &request_id.to_le_bytes(), pan, &mut sealed)
                .ok()?;
        }
        out.extend_from_slice(&[sealed_len as u8]);
        out.extend_from_slice(&sealed[..sealed_len]);
        let trailer_len = (out.len() - trailer_at) as u16;
        out.extend_from_slice(&trailer_len.to_le_bytes());
        Some(out.freeze())
    }

    /// Reads back a protected body journaled for `request_id` (decoded under
    /// `dialect`'s layout), with DE2 deciphered when the key allows.
    pub fn reveal(&self, body: &[u8], dialect: &Dialect, request_id: u64) -> Option<Revealed> {
        let parts = split(body)?;
        let bytes = Bytes::copy_from_slice(parts.message);
        let message = Message::decode_canonical(dialect, bytes).ok()?;
        let masked_pan = (!parts.masked.is_empty()).then(|| Bytes::copy_from_slice(parts.masked));
        let pan = match (&self.pan_key, parts.sealed.is_empty()) {
            (Some((module, key)), false) => {
                module.open_data(*key, &request_id.to_le_bytes(), parts.sealed)
            }
            _ => None,
        };
        let (message, pan_withheld) = match pan {
            Some(pan) => (with_field(&message, dialect, PAN_FIELD, &pan)?, false),
            None => (message, masked_pan.is_some()),
        };
        Some(Revealed {
            message,
            digest: parts.digest,
            masked_pan,
            pan_withheld,
        })
    }
}

/// An answer journaled in the protected form, for a retransmission of its
/// `request`: the answer as stored (canonical bytes under `dialect`), with DE2
/// taken from the request where the answer had one.
pub fn replayed_answer(body: &[u8], dialect: &Dialect, request: &Message) -> Option<Bytes> {
    let parts = split(body)?;
    let answer = Message::decode_canonical(dialect, Bytes::copy_from_slice(parts.message)).ok()?;
    match (parts.masked.is_empty(), request.field(PAN_FIELD)) {
        (false, Some(pan)) => {
            with_field(&answer, dialect, PAN_FIELD, pan).map(|m| m.as_bytes().clone())
        }
        _ => Some(answer.as_bytes().clone()),
    }
}

/// `msg` with field `n` set to `value`.
pub fn with_field(msg: &Message, dialect: &Dialect, n: u8, value: &[u8]) -> Option<Message> {
    let mut out = BytesMut::new();
    let held = dialect.canonical();
    reencode(
        msg,
        held,
        held,
        msg.mti(),
        &[Change::Set(n, value)],
        &mut out,
    )
    .ok()?;
    Message::decode_canonical(dialect, out.freeze()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Encoder, Mti};
    use std::sync::Arc;
    use switchyard_security::module::{SoftwareModule, Usage};
    use switchyard_security::{Algorithm, Key};

    fn request(d: &Dialect) -> Message {
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(d, &mut out, Mti::FINANCIAL);
        for (n, v) in [
            (2, &b"4321987654321098"[..]),
            (3, b"000000"),
            (4, b"000000001000"),
            (11, b"000042"),
            (35, b"4321987654321098=25121010000012300000"),
            (49, b"978"),
            (52, b"\x01\x02\x03\x04\x05\x06\x07\x08"),
        ] {
            enc.field(n, v).unwrap();
        }
        enc.finish();
        Message::decode(d, out.freeze()).unwrap()
    }

    #[test]
    fn the_protected_form_holds_no_pan_track_or_pin_block_and_gives_the_pan_back_with_the_key() {
        let d = Dialect::iso87_ascii();
        let mut m = SoftwareModule::new();
        let dek = m
            .add("dek", Usage::Data, Key::random(Algorithm::Aes, 32).unwrap())
            .unwrap();
        let module = Arc::new(m);
        let p = Protector::new(Some((module.clone(), dek)));
        let msg = request(&d);
        let body = p.protect((&msg, None), &d, 7, true).unwrap();
        let find = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(!find(b"4321987654321098"));
        assert!(!find(b"=2512101"));
        assert!(!find(b"\x01\x02\x03\x04\x05\x06\x07\x08"));
        assert!(find(b"432198******1098"));
        let back = p.reveal(&body, &d, 7).unwrap();
        assert_eq!(back.message.field(2), Some(&b"4321987654321098"[..]));
        assert_eq!(back.message.field(35), None);
        assert_eq!(back.message.field(52), None);
        assert_eq!(back.message.field(4), Some(&b"000000001000"[..]));
        assert_eq!(back.digest, content_digest(&msg));
        assert!(!back.pan_withheld);
        // Another record's id does not open it; no key: masked only.
        assert!(p.reveal(&body, &d, 8).unwrap().pan_withheld);
        let no_key = Protector::default().reveal(&body, &d, 7).unwrap();
        assert_eq!(no_key.message.field(2), None);
        assert_eq!(no_key.masked_pan.as_deref(), Some(&b"432198******1098"[..]));
        // Answers keep the masked PAN only.
        let answer = p.protect((&msg, None), &d, 7, false).unwrap();
        assert!(p.reveal(&answer, &d, 7).unwrap().pan_withheld);
    }

    #[test]
    fn bodies_that_are_not_protected_forms_are_refused() {
        let d = Dialect::iso87_ascii();
        for body in [&b""[..], b"\x00", b"\xff\xff", b"0200\x00\x00\x05\x00"] {
            assert!(Protector::default().reveal(body, &d, 1).is_none());
            assert!(message_part(body).is_none() || !body.is_empty());
        }
    }
}
