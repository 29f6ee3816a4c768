//! Encoding into a caller's reused buffer, fields in ascending order.

use crate::dialect::{BitmapEncoding, Dialect, Encoding, LengthKind};
use crate::error::{EncodeError, EncodeErrorKind};
use crate::message::{hex_value, Message, Mti};
use bytes::{BufMut, BytesMut};

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Writes one message into `out`: the MTI, bitmaps, then fields in ascending order.
///
/// Space for both bitmaps is reserved at the start and the secondary one is
/// removed by [`Encoder::finish`] when no field above 64 was written. On error the
/// buffer holds a partial message: truncate it to [`Encoder::start`].
pub struct Encoder<'a> {
    /// The canonical form the message is built in.
    dialect: &'a Dialect,
    /// The dialect to convert it to in [`Encoder::finish`], when transcoded.
    wire: Option<&'a Dialect>,
    out: &'a mut BytesMut,
    start: usize,
    bits: u128,
    /// Fields 129..=192 (bit `192 - n`), under a dialect with a tertiary bitmap.
    bits3: u64,
    last: u8,
}

impl<'a> Encoder<'a> {
    /// Starts a message with `mti` at the end of `out`.
    ///
    /// Under a transcoded dialect ([`Dialect::is_transcoded`]) values are given in
    /// its canonical form (ASCII text, as [`Message::field`] returns them) and the
    /// wire form is written by [`Encoder::finish`].
    pub fn new(dialect: &'a Dialect, out: &'a mut BytesMut, mti: Mti) -> Encoder<'a> {
        let wire = dialect.is_transcoded().then_some(dialect);
        let dialect = dialect.canonical();
        let start = out.len();
        out.put_slice(mti.as_bytes());
        let bitmap = dialect.bitmap_encoding().wire_len();
        let reserved = if dialect.tertiary_bitmap() { 3 } else { 2 };
        out.put_bytes(0, reserved * bitmap);
        Encoder {
            dialect,
            wire,
            out,
            start,
            bits: 0,
            bits3: 0,
            last: 1,
        }
    }

    /// Offset in the buffer where this message starts.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Appends field `n` whose value is already in this dialect's value encoding
    /// ([`Encoding::value`]: ASCII for text, raw bytes or hex for binary).
    pub fn field(&mut self, n: u8, value: &[u8]) -> Result<(), EncodeError> {
        let encoding = self
            .dialect
            .field(n)
            .map_or(Encoding::Ascii, |s| s.encoding);
        self.field_converted(n, value, encoding)
    }

    /// Appends field `n` whose value is in `from` encoding (hex ↔ binary converted).
    pub fn field_converted(
        &mut self,
        n: u8,
        value: &[u8],
        from: Encoding,
    ) -> Result<(), EncodeError> {
        let err = |kind| EncodeError { field: n, kind };
        let from = from.value();
        // Field 65 of a dialect with a tertiary bitmap is that bitmap: written by
        // `finish`, never given.
        let Some(spec) = self.dialect.field(n).filter(|_| n >= 2) else {
            return Err(err(EncodeErrorKind::UndefinedField));
        };
        if n == 65 && self.dialect.tertiary_bitmap() {
            return Err(err(EncodeErrorKind::UndefinedField));
        }
        if let Some(wire) = self.wire {
            representable(wire, n, value)?;
        }
        if n <= self.last {
            return Err(err(EncodeErrorKind::OutOfOrder {
                previous: self.last,
            }));
        }
        let units = match from {
            Encoding::Hex if value.len() % 2 != 0 => return Err(err(EncodeErrorKind::BadHex)),
            Encoding::Hex => value.len() / 2,
            Encoding::Ascii | Encoding::Binary | Encoding::Bcd | Encoding::Ebcdic => value.len(),
        };
        match spec.length {
            LengthKind::Fixed if units != usize::from(spec.max) => {
                let kind = EncodeErrorKind::WrongLength {
                    expected: spec.max,
                    found: units,
                };
                return Err(err(kind));
            }
            LengthKind::LlVar | LengthKind::LllVar if units > usize::from(spec.max) => {
                return Err(err(EncodeErrorKind::TooLong {
                    max: spec.max,
                    found: units,
                }));
            }
            _ => {}
        }
        match spec.length {
            LengthKind::Fixed => {}
            LengthKind::LlVar => self
                .out
                .put_slice(&[b'0' + (units / 10) as u8, digit(units)]),
            LengthKind::LllVar => {
                self.out
                    .put_slice(&[b'0' + (units / 100) as u8, digit(units / 10), digit(units)])
            }
        }
        match (from, spec.encoding) {
            (Encoding::Hex, Encoding::Binary) => {
                for pair in value.chunks_exact(2) {
                    let (Some(hi), Some(lo)) = (hex_value(pair[0]), hex_value(pair[1])) else {
                        return Err(err(EncodeErrorKind::BadHex));
                    };
                    self.out.put_u8(hi << 4 | lo);
                }
            }
            (Encoding::Binary, Encoding::Hex) => {
                for &b in value {
                    self.out
                        .put_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
                }
            }
            _ => self.out.put_slice(value),
        }
        match 128u32.checked_sub(u32::from(n)) {
            Some(shift) => self.bits |= 1u128 << shift,
            None => self.bits3 |= crate::message::bit3(n),
        }
        self.last = n;
        Ok(())
    }

    /// Writes the bitmaps and returns the message length in bytes; under a
    /// transcoded dialect, converts the message to its wire form. Returns 0 (and
    /// leaves nothing of the message) if that conversion fails, which the checks
    /// in [`Encoder::field`] rule out; callers that send the message check it.
    pub fn finish(self) -> usize {
        let (wire, start) = (self.wire, self.start);
        let out = self.finish_canonical();
        match wire {
            None => out.len() - start,
            // Values were checked to be representable as they were added, so the
            // conversion cannot fail; if it did, nothing is left of the message.
            Some(d) => transcode_tail(d, out, start).unwrap_or_else(|_| {
                out.truncate(start);
                0
            }),
        }
    }

    fn finish_canonical(self) -> &'a mut BytesMut {
        let encoding = self.dialect.bitmap_encoding();
        let width = encoding.wire_len();
        let at = self.start + 4;
        let reserved = if self.dialect.tertiary_bitmap() { 3 } else { 2 };
        let tertiary = self.bits3;
        let mut secondary = self.bits as u64;
        if tertiary != 0 {
            secondary |= 1 << 63; // bit 65: the tertiary bitmap follows
        }
        let mut primary = (self.bits >> 64) as u64;
        let used = match (secondary, tertiary) {
            (0, _) => 1,
            (_, 0) => 2,
            _ => 3,
        };
        if used >= 2 {
            primary |= 1 << 63;
            let slot = &mut self.out[at + width..at + 2 * width];
            write_bitmap(slot, secondary, encoding);
        }
        if used == 3 {
            let slot = &mut self.out[at + 2 * width..at + 3 * width];
            write_bitmap(slot, tertiary, encoding);
        }
        if used < reserved {
            // Bitmaps reserved but not needed: close the gap.
            let end = self.out.len();
            self.out
                .copy_within(at + reserved * width..end, at + used * width);
            self.out.truncate(end - (reserved - used) * width);
        }
        write_bitmap(&mut self.out[at..at + width], primary, encoding);
        self.out
    }
}

/// Whether `value` can be carried by field `n` of transcoded dialect `wire` (out
/// of line: the ASCII path does not carry it). A 1993 dialect's fields are
/// checked as the translation writes them.
#[inline(never)]
fn representable(wire: &Dialect, n: u8, value: &[u8]) -> Result<(), EncodeError> {
    let spec = wire.field(n).filter(|_| wire.translation().is_none());
    match spec.and_then(|spec| crate::transcode::representable(spec, value)) {
        Some(offset) => Err(EncodeError {
            field: n,
            kind: EncodeErrorKind::Unrepresentable {
                offset,
                found: value[offset],
            },
        }),
        None => Ok(()),
    }
}

thread_local! {
    /// The canonical form of the message being converted (reused: no allocation
    /// per message once grown).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Converts `out[start..]`, a message in `d`'s canonical form, to `d`'s wire
/// form in place; returns its wire length.
fn transcode_tail(d: &Dialect, out: &mut BytesMut, start: usize) -> Result<usize, EncodeError> {
    if let Some(t) = d.translation() {
        // ISO 8583:1993: the 1987 form, indexed, written out in 1993 form.
        let held = bytes::Bytes::copy_from_slice(&out[start..]);
        out.truncate(start);
        let m = Message::decode_canonical(d, held).map_err(|e| EncodeError {
            field: e.location.field_number(),
            kind: EncodeErrorKind::Malformed,
        })?;
        return crate::version::to_1993(&m, t, crate::version::Today::now(), out);
    }
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        scratch.extend_from_slice(&out[start..]);
        out.truncate(start);
        crate::transcode::from_canonical(d, &scratch, out)?;
        Ok(out.len() - start)
    })
}

#[inline]
fn digit(v: usize) -> u8 {
    b'0' + (v % 10) as u8
}

fn write_bitmap(dst: &mut [u8], value: u64, encoding: BitmapEncoding) {
    match encoding {
        BitmapEncoding::Binary => dst.copy_from_slice(&value.to_be_bytes()),
        // The canonical form's bitmaps are binary; hex in EBCDIC is written by
        // the conversion.
        BitmapEncoding::Hex | BitmapEncoding::HexEbcdic => {
            for (i, slot) in dst.iter_mut().enumerate() {
                *slot = HEX[((value >> (60 - 4 * i)) & 15) as usize];
            }
        }
    }
}

/// A change applied while re-encoding: set (or add) a field, or drop it.
#[derive(Clone, Copy, Debug)]
pub enum Change<'v> {
    /// Field `n` takes this value (in the target dialect's encoding).
    Set(u8, &'v [u8]),
    /// Field `n` is left out.
    Remove(u8),
}

impl Change<'_> {
    fn number(&self) -> u8 {
        match *self {
            Change::Set(n, _) | Change::Remove(n) => n,
        }
    }
}

/// Re-encodes `msg` (decoded under `from`) under `to` with a new MTI and `changes`,
/// appending to `out`; every other present field is carried through untouched.
/// Returns the message length.
pub fn reencode(
    msg: &Message,
    from: &Dialect,
    to: &Dialect,
    mti: Mti,
    changes: &[Change<'_>],
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let before = out.len();
    // Between canonical forms: copy and patch when the layouts are equal, else
    // field by field; then to the target's wire form when it differs.
    let (from, canonical_to) = (from.canonical(), to.canonical());
    let patched = (from.fingerprint() == canonical_to.fingerprint())
        .then(|| patch(msg, mti, changes, out))
        .flatten();
    let result = match patched {
        Some(len) => Ok(len),
        None => reencode_inner(msg, from, canonical_to, mti, changes, out),
    }
    .and_then(|len| {
        if to.is_transcoded() {
            transcode_tail(to, out, before)
        } else {
            Ok(len)
        }
    });
    if result.is_err() {
        out.truncate(before);
    }
    result
}

/// The common case of the forward and return paths, same layout on both sides and
/// only same-length values replaced (DE11, DE39…): copy the message and overwrite
/// the changed bytes in place. `None` when the message needs a full re-encode.
fn patch(msg: &Message, mti: Mti, changes: &[Change<'_>], out: &mut BytesMut) -> Option<usize> {
    if !msg.is_complete() {
        return None;
    }
    for change in changes {
        match *change {
            Change::Set(n, value) if msg.span(n)?.len as usize == value.len() => {}
            _ => return None,
        }
    }
    let start = out.len();
    let bytes = msg.as_bytes();
    out.extend_from_slice(bytes);
    out[start..start + 4].copy_from_slice(mti.as_bytes());
    for change in changes {
        if let Change::Set(n, value) = *change {
            let span = msg.span(n)?;
            let at = start + usize::from(span.start);
            out[at..at + value.len()].copy_from_slice(value);
        }
    }
    Some(bytes.len())
}

fn reencode_inner(
    msg: &Message,
    from: &Dialect,
    to: &Dialect,
    mti: Mti,
    changes: &[Change<'_>],
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let (mut wanted, mut wanted3) = msg.present_mask();
    for change in changes {
        let n = change.number();
        if !(2..=192).contains(&n) {
            return Err(EncodeError {
                field: n,
                kind: EncodeErrorKind::UndefinedField,
            });
        }
        let set = matches!(change, Change::Set(..));
        if n <= 128 {
            let b = 1u128 << (128 - u32::from(n));
            wanted = if set { wanted | b } else { wanted & !b };
        } else {
            let b = crate::message::bit3(n);
            wanted3 = if set { wanted3 | b } else { wanted3 & !b };
        }
    }
    let mut enc = Encoder::new(to, out, mti);
    // A source's tertiary bitmap (field 65) is not data: the target writes its own.
    for n in crate::message::numbers(wanted, wanted3, msg.has_tertiary_bitmap()) {
        let set = changes.iter().rev().find_map(|c| match *c {
            Change::Set(m, v) if m == n => Some(v),
            _ => None,
        });
        match (set, msg.field(n)) {
            (Some(value), _) => enc.field(n, value)?,
            (None, Some(value)) => {
                let encoding = from
                    .field(n)
                    .map_or(Encoding::Ascii, |s| s.encoding.value());
                enc.field_converted(n, value, encoding)?;
            }
            (None, None) => {}
        }
    }
    Ok(enc.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn sample(d: &Dialect) -> BytesMut {
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(d, &mut out, Mti::FINANCIAL);
        enc.field(2, b"4111111111111111").unwrap();
        enc.field(3, b"000000").unwrap();
        enc.field(4, b"000000012345").unwrap();
        enc.field(11, b"000123").unwrap();
        enc.field(32, b"100001").unwrap();
        enc.field(49, b"978").unwrap();
        enc.field(100, b"200001").unwrap();
        enc.finish();
        out
    }

    #[test]
    fn round_trip_with_secondary_bitmap() {
        let d = Dialect::iso87_ascii();
        let out = sample(&d);
        let msg = Message::decode(&d, out.freeze()).unwrap();
        assert_eq!(msg.mti(), Mti::FINANCIAL);
        assert_eq!(msg.field(2), Some(&b"4111111111111111"[..]));
        assert_eq!(msg.field(100), Some(&b"200001"[..]));
        assert!(msg.has(1));
        assert_eq!(msg.fields().count(), 7);
        assert!(format!("{msg:?}").contains("411111******1111"));
    }

    #[test]
    fn reencode_translates_bitmaps_and_applies_changes() {
        let a = Dialect::iso87_ascii();
        let h = Dialect::builtin("iso87-hexbitmap").unwrap();
        let msg = Message::decode(&a, sample(&a).freeze()).unwrap();
        let mut out = BytesMut::new();
        let changes = [
            Change::Set(11, b"999999"),
            Change::Set(39, b"00"),
            Change::Remove(100),
        ];
        reencode(&msg, &a, &h, Mti::FINANCIAL_RESPONSE, &changes, &mut out).unwrap();
        assert_eq!(&out[4..20], &b"7020000102008000"[..]);
        let back = Message::decode(&h, out.freeze()).unwrap();
        assert_eq!(back.mti(), Mti::FINANCIAL_RESPONSE);
        assert_eq!(back.field(11), Some(&b"999999"[..]));
        assert_eq!(back.field(39), Some(&b"00"[..]));
        assert!(!back.has(100) && !back.has(1));
    }

    #[test]
    fn encoder_rejects_bad_values() {
        let d = Dialect::iso87_ascii();
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(&d, &mut out, Mti::FINANCIAL);
        let e = enc.field(4, b"123").unwrap_err();
        assert_eq!(
            e.kind,
            EncodeErrorKind::WrongLength {
                expected: 12,
                found: 3
            }
        );
        enc.field(11, b"000001").unwrap();
        let e = enc.field(3, b"000000").unwrap_err();
        assert_eq!(e.kind, EncodeErrorKind::OutOfOrder { previous: 11 });
        let e = enc.field(32, b"123456789012").unwrap_err();
        assert_eq!(e.kind, EncodeErrorKind::TooLong { max: 11, found: 12 });
        let _ = Bytes::new();
    }
}
