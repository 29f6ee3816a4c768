//! Decoding: a message is checked against its dialect and indexed, never copied.

use crate::dialect::{BitmapEncoding, Dialect, Encoding, LengthKind};
use crate::error::{DecodeError, DecodeErrorKind, Location};
use crate::mask::field_for_log;
use bytes::Bytes;
use std::fmt;

/// Field slots in a message, indexed by field number (0 unused, 1 = secondary
/// bitmap, 65 = tertiary bitmap under a dialect that has one, 129..=192 behind it).
pub const FIELD_COUNT: usize = 193;

/// Where a field's value lies in the message bytes (after any length prefix).
///
/// Offsets are `u16` because a message never exceeds 65,535 bytes (the largest
/// 2-byte frame), which keeps a decoded message small enough to move cheaply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    /// Offset of the first value byte.
    pub start: u16,
    /// Value length in wire bytes.
    pub len: u16,
}

impl Span {
    #[inline]
    fn range(self) -> std::ops::Range<usize> {
        let start = usize::from(self.start);
        start..start + usize::from(self.len)
    }
}

/// Message type indicator: four ASCII digits (version, class, function, origin).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mti(pub [u8; 4]);

impl Mti {
    /// 0100 authorization request.
    pub const AUTHORIZATION: Mti = Mti(*b"0100");
    /// 0110 authorization response.
    pub const AUTHORIZATION_RESPONSE: Mti = Mti(*b"0110");
    /// 0200 financial request.
    pub const FINANCIAL: Mti = Mti(*b"0200");
    /// 0210 financial response.
    pub const FINANCIAL_RESPONSE: Mti = Mti(*b"0210");
    /// 0400 reversal request.
    pub const REVERSAL: Mti = Mti(*b"0400");
    /// 0410 reversal response.
    pub const REVERSAL_RESPONSE: Mti = Mti(*b"0410");
    /// 0420 reversal advice.
    pub const REVERSAL_ADVICE: Mti = Mti(*b"0420");
    /// 0421 reversal advice repeat.
    pub const REVERSAL_ADVICE_REPEAT: Mti = Mti(*b"0421");
    /// 0430 reversal advice response.
    pub const REVERSAL_ADVICE_RESPONSE: Mti = Mti(*b"0430");
    /// 0800 network management request.
    pub const NETWORK: Mti = Mti(*b"0800");
    /// 0810 network management response.
    pub const NETWORK_RESPONSE: Mti = Mti(*b"0810");

    /// The raw digits.
    #[inline]
    pub fn as_bytes(&self) -> &[u8; 4] {
        &self.0
    }

    /// Whether the function digit says request or advice (0, 2, 4), which expects an answer.
    #[inline]
    pub fn is_request(self) -> bool {
        matches!(self.0[2], b'0' | b'2' | b'4')
    }

    /// Whether the function digit says response (1, 3, 5).
    #[inline]
    pub fn is_response(self) -> bool {
        matches!(self.0[2], b'1' | b'3' | b'5')
    }

    /// The answer's MTI for a request or advice (0200 → 0210, 0421 → 0430).
    pub fn response(self) -> Option<Mti> {
        if !self.is_request() {
            return None;
        }
        let mut m = self.0;
        m[2] += 1;
        m[3] = b'0';
        Some(Mti(m))
    }

    /// The request MTI an answer belongs to (0210 → 0200); repeats map to the original.
    pub fn request(self) -> Option<Mti> {
        if !self.is_response() {
            return None;
        }
        let mut m = self.0;
        m[2] -= 1;
        m[3] = b'0';
        Some(Mti(m))
    }
}

impl fmt::Debug for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            fmt::Write::write_char(f, char::from(b))?;
        }
        Ok(())
    }
}

/// A decoded ISO 8583 message: the frame bytes plus where each present field lies.
///
/// Cloning is cheap (a reference count and a small index); field values are
/// slices of the original frame. Spans are kept in field order for the first
/// `INLINE_FIELDS` (40) present fields, found by counting the present bits below a
/// field; a message with more fields keeps the rest in a heap spill. This keeps a
/// message about 240 bytes, cheap to move through queues.
#[derive(Clone)]
pub struct Message {
    bytes: Bytes,
    mti: Mti,
    /// Bit `128 - n` is set when field `n` (1..=128) was decoded.
    present: u128,
    /// Bit `192 - n` is set when field `n` (129..=192, behind a tertiary
    /// bitmap) was decoded.
    present3: u64,
    /// Whether field 65 is the tertiary bitmap (its dialect defines one and the
    /// message carries it), not data.
    tertiary: bool,
    spans: [Span; INLINE_FIELDS],
    spill: Option<Vec<Span>>,
    /// Whether every byte was decoded (false for a partial decode).
    complete: bool,
}

/// Present fields whose spans are held inline (typical messages have 10 to 25).
pub const INLINE_FIELDS: usize = 40;

/// How many present fields have a lower number than `n` (its index among spans).
#[inline]
fn rank(present: u128, n: u8) -> usize {
    if n <= 1 {
        0
    } else {
        (present >> (129 - u32::from(n))).count_ones() as usize
    }
}

/// [`rank`] over both words: fields 129..=192 follow the first 128.
#[inline]
fn rank3(present: u128, present3: u64, n: u8) -> usize {
    match n {
        0..=128 => rank(present, n),
        129 => present.count_ones() as usize,
        _ => {
            present.count_ones() as usize + (present3 >> (193 - u32::from(n))).count_ones() as usize
        }
    }
}

/// Bit of field `n` (129..=192) in the tertiary word.
#[inline]
pub(crate) fn bit3(n: u8) -> u64 {
    1u64 << (192 - u32::from(n))
}

/// Data fields of the masks `(present, present3)` in ascending order: not field
/// 1 (the secondary bitmap), nor 65 when `tertiary` (then it is the tertiary
/// bitmap).
pub(crate) fn numbers(present: u128, present3: u64, tertiary: bool) -> impl Iterator<Item = u8> {
    let mut lo = present & !bit(1);
    if tertiary {
        lo &= !bit(65);
    }
    let mut hi = present3;
    std::iter::from_fn(move || {
        if lo != 0 {
            let n = (lo.leading_zeros() + 1) as u8;
            lo &= !bit(n);
            Some(n)
        } else if hi != 0 {
            let n = (hi.leading_zeros() + 129) as u8;
            hi &= !bit3(n);
            Some(n)
        } else {
            None
        }
    })
}

#[inline]
fn bit(n: u8) -> u128 {
    1u128 << (128 - u32::from(n))
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, location: Location, n: usize) -> Result<usize, DecodeError> {
        let available = self.buf.len() - self.pos;
        if n > available {
            return Err(DecodeError {
                location,
                offset: self.pos,
                kind: DecodeErrorKind::Truncated {
                    needed: n,
                    available,
                },
            });
        }
        let start = self.pos;
        self.pos += n;
        Ok(start)
    }
}

/// The value of one ASCII hex digit.
pub(crate) fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn read_bitmap(
    cur: &mut Cursor<'_>,
    encoding: BitmapEncoding,
    location: Location,
) -> Result<u64, DecodeError> {
    let start = cur.take(location, encoding.wire_len())?;
    let raw = &cur.buf[start..cur.pos];
    match encoding {
        BitmapEncoding::Binary => {
            let mut word = [0u8; 8];
            word.copy_from_slice(raw);
            Ok(u64::from_be_bytes(word))
        }
        // Hex in EBCDIC never reaches here: it is converted to the canonical form.
        BitmapEncoding::Hex | BitmapEncoding::HexEbcdic => {
            let mut value = 0u64;
            for (i, &b) in raw.iter().enumerate() {
                let Some(v) = hex_value(b) else {
                    let kind = DecodeErrorKind::BadHex { found: b };
                    return Err(DecodeError {
                        location,
                        offset: start + i,
                        kind,
                    });
                };
                value = (value << 4) | u64::from(v);
            }
            Ok(value)
        }
    }
}

impl Message {
    /// Decodes a whole message (without its frame header) under `dialect`.
    pub fn decode(dialect: &Dialect, bytes: Bytes) -> Result<Message, DecodeError> {
        match Message::decode_partial(dialect, bytes) {
            (msg, None) => Ok(msg),
            (_, Some(err)) => Err(err),
        }
    }

    /// Decodes as far as the message is valid: the fields before the first error are
    /// available (so a format-error answer can echo the STAN), with the error.
    ///
    /// Under a dialect with BCD, EBCDIC or binary parts ([`Dialect::is_transcoded`])
    /// the message is converted into its canonical form first (one copy), checked
    /// on the wire bytes so errors name wire offsets; [`Message::as_bytes`] is then
    /// the canonical form.
    pub fn decode_partial(dialect: &Dialect, bytes: Bytes) -> (Message, Option<DecodeError>) {
        if dialect.is_transcoded() {
            return Message::decode_converted(dialect, bytes);
        }
        Message::decode_canonical_partial(dialect, bytes, Values::Check)
    }

    /// [`Message::decode_partial`] under a dialect whose wire form is converted
    /// (out of line: the ASCII path stays as small as it was).
    #[inline(never)]
    fn decode_converted(dialect: &Dialect, bytes: Bytes) -> (Message, Option<DecodeError>) {
        if let Some(t) = dialect.translation() {
            // ISO 8583:1993: the 1993 fields first (errors name wire offsets),
            // then their 1987 form.
            let (m93, error) = Message::decode_partial(&t.plain, bytes.clone());
            let mut held = bytes::BytesMut::with_capacity(m93.as_bytes().len() + 32);
            let mut untranslatable = crate::version::to_1987(&m93, t, &mut held).err();
            if let Some(e) = untranslatable.as_mut().filter(|_| t.plain.is_transcoded()) {
                // Name the field's offset on the wire, not in the 1993 held form.
                let n = e.location.field_number();
                e.offset = crate::transcode::wire_offset(&t.plain, &bytes, n).unwrap_or(0);
            }
            let (msg, e87) =
                Message::decode_canonical_partial(dialect, held.freeze(), Values::Check);
            return (msg, error.or(untranslatable).or(e87));
        }
        let mut canonical = Vec::with_capacity(bytes.len() * 2);
        let wire_error = crate::transcode::to_canonical(dialect, &bytes, &mut canonical).err();
        // Checked as it was converted: indexed without checking the values again.
        let (msg, error) =
            Message::decode_canonical_partial(dialect, canonical.into(), Values::Trusted);
        // A wire error comes first; the canonical form cannot fail where the
        // wire form passed, but say so if it did.
        (msg, wire_error.or(error))
    }

    /// Decodes a message held in `dialect`'s canonical form (as [`Message::as_bytes`]
    /// gives it, e.g. read back from the journal): no conversion.
    pub fn decode_canonical(dialect: &Dialect, bytes: Bytes) -> Result<Message, DecodeError> {
        match Message::decode_canonical_partial(dialect, bytes, Values::Check) {
            (msg, None) => Ok(msg),
            (_, Some(err)) => Err(err),
        }
    }

    fn decode_canonical_partial(
        dialect: &Dialect,
        bytes: Bytes,
        values: Values,
    ) -> (Message, Option<DecodeError>) {
        let dialect = dialect.canonical();
        let mut msg = Message {
            bytes,
            mti: Mti(*b"0000"),
            present: 0,
            present3: 0,
            tertiary: false,
            spans: [Span::default(); INLINE_FIELDS],
            spill: None,
            complete: false,
        };
        let err = msg.index(dialect, values).err();
        msg.complete = err.is_none();
        (msg, err)
    }

    fn index(&mut self, dialect: &Dialect, values: Values) -> Result<(), DecodeError> {
        let size = self.bytes.len();
        if size > usize::from(u16::MAX) {
            let kind = DecodeErrorKind::MessageTooLarge { size };
            return Err(DecodeError {
                location: Location::Mti,
                offset: 0,
                kind,
            });
        }
        let bytes = self.bytes.clone();
        let mut cur = Cursor {
            buf: &bytes,
            pos: 0,
        };
        let start = cur.take(Location::Mti, 4)?;
        let mut mti = [0u8; 4];
        mti.copy_from_slice(&cur.buf[start..start + 4]);
        if let Some(i) = mti.iter().position(|b| !b.is_ascii_digit()) {
            let kind = DecodeErrorKind::BadMti { found: mti[i] };
            return Err(DecodeError {
                location: Location::Mti,
                offset: i,
                kind,
            });
        }
        self.mti = Mti(mti);
        let encoding = dialect.bitmap_encoding();
        let primary = read_bitmap(&mut cur, encoding, Location::PrimaryBitmap)?;
        let mut announced = u128::from(primary) << 64;
        let mut announced3 = 0u64;
        let mut tertiary_span = None;
        if announced & bit(1) != 0 {
            let at = cur.pos;
            let secondary = read_bitmap(&mut cur, encoding, Location::SecondaryBitmap)?;
            announced |= u128::from(secondary);
            self.push_span(Span {
                start: at as u16,
                len: (cur.pos - at) as u16,
            });
            self.present |= bit(1);
            if dialect.tertiary_bitmap() && announced & bit(65) != 0 {
                // The tertiary bitmap follows the secondary; its span takes
                // field 65's place in field order.
                let at = cur.pos;
                announced3 = read_bitmap(&mut cur, encoding, Location::Field(65))?;
                tertiary_span = Some(Span {
                    start: at as u16,
                    len: (cur.pos - at) as u16,
                });
                self.tertiary = true;
            }
        }
        let mut count = usize::from(self.present != 0);
        let mut rest = announced & !bit(1);
        while rest != 0 {
            let n = (rest.leading_zeros() + 1) as u8;
            rest &= !bit(n);
            let span = match tertiary_span {
                Some(span) if n == 65 => span,
                _ => read_field(dialect, &mut cur, n, values)?,
            };
            self.put_span(count, span);
            count += 1;
            self.present |= bit(n);
        }
        let mut rest = announced3;
        while rest != 0 {
            let n = (rest.leading_zeros() + 129) as u8;
            rest &= !bit3(n);
            let span = read_field(dialect, &mut cur, n, values)?;
            self.put_span(count, span);
            count += 1;
            self.present3 |= bit3(n);
        }
        if cur.pos != size {
            let kind = DecodeErrorKind::TrailingBytes {
                count: size - cur.pos,
            };
            return Err(DecodeError {
                location: Location::Trailing,
                offset: cur.pos,
                kind,
            });
        }
        Ok(())
    }

    /// The message type indicator (`0000` when the MTI itself failed to decode).
    #[inline]
    pub fn mti(&self) -> Mti {
        self.mti
    }

    /// Appends the span of the next present field (fields arrive in ascending order).
    fn push_span(&mut self, span: Span) {
        self.put_span(self.present.count_ones() as usize, span);
    }

    /// Sets the span of the present field of rank `index` (spans are set in
    /// ascending order).
    #[inline]
    fn put_span(&mut self, index: usize, span: Span) {
        match self.spans.get_mut(index) {
            Some(slot) => *slot = span,
            None => self.spill.get_or_insert_with(Vec::new).push(span),
        }
    }

    /// The span of the present field of this rank (0 = lowest numbered).
    #[inline]
    fn span_at(&self, index: usize) -> Span {
        match self.spans.get(index) {
            Some(span) => *span,
            None => self
                .spill
                .as_ref()
                .and_then(|s| s.get(index - INLINE_FIELDS).copied())
                .unwrap_or_default(),
        }
    }

    /// Whether the whole message decoded (not a partial decode stopped by an error).
    #[inline]
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Present fields as masks: bit `128 - n` for field `n` up to 128, bit
    /// `192 - n` of the second for fields 129..=192.
    #[inline]
    pub(crate) fn present_mask(&self) -> (u128, u64) {
        (self.present, self.present3)
    }

    /// The highest present data field of 2..=128 other than those in `except`
    /// (0 when there is none): where a field that must come last goes.
    pub fn highest_field_except(&self, except: &[u8]) -> u8 {
        let mut mask = self.present & !bit(1);
        for &n in except {
            if (1..=128).contains(&n) {
                mask &= !bit(n);
            }
        }
        if mask == 0 {
            0
        } else {
            (128 - mask.trailing_zeros()) as u8
        }
    }

    /// Whether field 65 is the tertiary bitmap (fields 129..=192 may follow).
    #[inline]
    pub fn has_tertiary_bitmap(&self) -> bool {
        self.tertiary
    }

    /// Whether field `n` is present (and decoded).
    #[inline]
    pub fn has(&self, n: u8) -> bool {
        match n {
            1..=128 => self.present & bit(n) != 0,
            129..=192 => self.present3 & bit3(n) != 0,
            _ => false,
        }
    }

    /// Field `n`'s value as it appears on the wire (without its length prefix).
    #[inline]
    pub fn field(&self, n: u8) -> Option<&[u8]> {
        if self.has(n) {
            Some(&self.bytes[self.span_at(rank3(self.present, self.present3, n)).range()])
        } else {
            None
        }
    }

    /// Field `n`'s value as a shared slice of the frame (no copy).
    pub fn field_bytes(&self, n: u8) -> Option<Bytes> {
        if self.has(n) {
            Some(
                self.bytes
                    .slice(self.span_at(rank3(self.present, self.present3, n)).range()),
            )
        } else {
            None
        }
    }

    /// Where field `n`'s value lies in [`Message::as_bytes`].
    pub fn span(&self, n: u8) -> Option<Span> {
        self.has(n)
            .then(|| self.span_at(rank3(self.present, self.present3, n)))
    }

    /// The whole message as received, or for a transcoded dialect its canonical
    /// form ([`Dialect::canonical`]).
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Present data fields (2..=192, not the secondary or tertiary bitmap) in
    /// ascending order.
    pub fn fields(&self) -> impl Iterator<Item = (u8, &[u8])> + '_ {
        // Spans are in field order, the secondary bitmap's first and the
        // tertiary bitmap's in field 65's place: walk them in step.
        let mut index = usize::from(self.has(1));
        numbers(self.present, self.present3, false).filter_map(move |n| {
            let span = self.span_at(index);
            index += 1;
            if n == 65 && self.tertiary {
                return None;
            }
            Some((n, &self.bytes[span.range()]))
        })
    }
}

/// Whether field values are checked against their types while indexing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Values {
    /// Check each value (bytes as they arrived, or read back from storage).
    Check,
    /// The bytes were just made by `transcode::to_canonical`, which checked
    /// every value on the wire: index only.
    Trusted,
}

fn read_field(
    dialect: &Dialect,
    cur: &mut Cursor<'_>,
    n: u8,
    values: Values,
) -> Result<Span, DecodeError> {
    let location = Location::Field(n);
    let Some(spec) = dialect.field(n) else {
        let kind = DecodeErrorKind::UndefinedField;
        return Err(DecodeError {
            location,
            offset: cur.pos,
            kind,
        });
    };
    let units = match spec.length {
        LengthKind::Fixed => spec.max,
        kind => {
            let digits = kind.prefix_digits();
            let start = cur.take(location, digits)?;
            let mut len = 0u16;
            for (i, &b) in cur.buf[start..start + digits].iter().enumerate() {
                if !b.is_ascii_digit() {
                    let kind = DecodeErrorKind::BadLengthPrefix { found: b };
                    return Err(DecodeError {
                        location,
                        offset: start + i,
                        kind,
                    });
                }
                len = len * 10 + u16::from(b - b'0');
            }
            if len > spec.max {
                let kind = DecodeErrorKind::LengthTooLong {
                    max: spec.max,
                    found: len,
                };
                return Err(DecodeError {
                    location,
                    offset: start,
                    kind,
                });
            }
            len
        }
    };
    let wire = spec.encoding.wire_len(usize::from(units));
    let start = cur.take(location, wire)?;
    let value = &cur.buf[start..cur.pos];
    let bad = match spec.encoding {
        _ if values == Values::Trusted => None,
        Encoding::Binary => None,
        Encoding::Hex => value
            .iter()
            .position(|&b| hex_value(b).is_none())
            .map(|i| (i, DecodeErrorKind::BadHex { found: value[i] })),
        // BCD and EBCDIC never reach here: they are converted to ASCII first.
        Encoding::Ascii | Encoding::Bcd | Encoding::Ebcdic => spec
            .ty
            .first_invalid(value)
            .map(|i| (i, value[i]))
            .map(|(i, b)| {
                (
                    i,
                    DecodeErrorKind::BadCharacter {
                        expected: spec.ty,
                        found: b,
                    },
                )
            }),
    };
    let bad = bad.or_else(|| {
        let tlv = spec.tlv.filter(|_| values == Values::Check)?;
        let (i, e) = tlv.check(value)?;
        let kind = DecodeErrorKind::BadTlv {
            tag: e.tag,
            problem: e.problem,
        };
        Some((i, kind))
    });
    if let Some((i, kind)) = bad {
        return Err(DecodeError {
            location,
            offset: start + i,
            kind,
        });
    }
    Ok(Span {
        start: start as u16,
        len: wire as u16,
    })
}

impl fmt::Debug for Message {
    /// Shows every field, with card numbers masked and track, PIN and MAC data hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Message {{ mti: {}", self.mti)?;
        for (n, value) in self.fields() {
            write!(f, ", {n}: {}", field_for_log(n, value))?;
        }
        f.write_str(" }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_stays_small_to_move() {
        assert!(
            std::mem::size_of::<Message>() <= 256,
            "{}",
            std::mem::size_of::<Message>()
        );
    }

    #[test]
    fn rank_counts_lower_numbered_fields() {
        let present = bit(1) | bit(2) | bit(11) | bit(100);
        assert_eq!(rank(present, 1), 0);
        assert_eq!(rank(present, 2), 1);
        assert_eq!(rank(present, 11), 2);
        assert_eq!(rank(present, 100), 3);
        assert_eq!(rank(present, 128), 4);
    }
}
