//! Between a dialect's wire form and its canonical form.
//!
//! A dialect with BCD or EBCDIC data, a BCD or EBCDIC MTI, binary, BCD or
//! EBCDIC length prefixes, or EBCDIC hex bitmaps is held, once decoded, in its
//! canonical twin ([`Dialect::canonical`]): the same fields with ASCII text,
//! ASCII length prefixes, an ASCII MTI and binary bitmaps. Every rule of the
//! switch (amounts, STANs, response codes, keys of the duplicates table) then
//! reads one form, and the journal stores one form.
//!
//! [`to_canonical`] checks the wire bytes as it converts them, so errors name
//! the field and the byte offset on the wire; [`from_canonical`] writes the wire
//! form of a message the [`Encoder`](crate::Encoder) built in the canonical
//! form (values were checked to be representable as they were added:
//! [`representable`]).

use crate::dialect::{
    BitmapEncoding, CodePage, Dialect, Encoding, FieldSpec, FieldType, FieldWire, Filler,
    LengthCounts, LengthKind, MtiEncoding, PadSide, PrefixEncoding,
};
use crate::error::{DecodeError, DecodeErrorKind, EncodeError, EncodeErrorKind, Location};
use crate::message::hex_value;
use bytes::{BufMut, BytesMut};

const HEX: &[u8; 16] = b"0123456789ABCDEF";

struct Wire<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Wire<'a> {
    fn take(&mut self, location: Location, n: usize) -> Result<(usize, &'a [u8]), DecodeError> {
        let available = self.buf.len() - self.pos;
        if n > available {
            return Err(err(
                location,
                self.pos,
                DecodeErrorKind::Truncated {
                    needed: n,
                    available,
                },
            ));
        }
        let start = self.pos;
        self.pos += n;
        Ok((start, &self.buf[start..self.pos]))
    }
}

fn err(location: Location, offset: usize, kind: DecodeErrorKind) -> DecodeError {
    DecodeError {
        location,
        offset,
        kind,
    }
}

fn page(d: &Dialect) -> CodePage {
    // A dialect using EBCDIC is refused at load without a code page.
    d.code_page().unwrap_or(CodePage::Cp1047)
}

/// Appends the canonical form of the wire message `wire` (decoded under `d`) to
/// `out`. On error `out` holds the canonical form of the parts before it.
pub(crate) fn to_canonical(d: &Dialect, wire: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    walk(d, wire, out, None).map(|_| ())
}

/// The offset in `wire` (decoded under `d`) where field `n` starts, if the
/// message is well formed up to it.
pub(crate) fn wire_offset(d: &Dialect, wire: &[u8], n: u8) -> Option<usize> {
    walk(d, wire, &mut Vec::new(), Some(n)).ok().flatten()
}

/// [`to_canonical`], stopping before field `stop_at` (returning its offset).
fn walk(
    d: &Dialect,
    wire: &[u8],
    out: &mut Vec<u8>,
    stop_at: Option<u8>,
) -> Result<Option<usize>, DecodeError> {
    let mut cur = Wire { buf: wire, pos: 0 };
    let cp = page(d);
    // MTI.
    let (start, raw) = cur.take(Location::Mti, d.mti_encoding().wire_len())?;
    let mut mti = [0u8; 4];
    match d.mti_encoding() {
        MtiEncoding::Ascii => mti.copy_from_slice(raw),
        MtiEncoding::Ebcdic => {
            for (m, &b) in mti.iter_mut().zip(raw) {
                *m = cp.to_latin1(b);
            }
        }
        MtiEncoding::Bcd => {
            for (i, &b) in raw.iter().enumerate() {
                for (j, nibble) in [b >> 4, b & 15].into_iter().enumerate() {
                    if nibble > 9 {
                        let kind = DecodeErrorKind::BadMti { found: b };
                        return Err(err(Location::Mti, start + i, kind));
                    }
                    mti[2 * i + j] = b'0' + nibble;
                }
            }
        }
    }
    if let Some(i) = mti.iter().position(|b| !b.is_ascii_digit()) {
        let offset = if d.mti_encoding() == MtiEncoding::Bcd {
            start + i / 2
        } else {
            start + i
        };
        let kind = DecodeErrorKind::BadMti { found: mti[i] };
        return Err(err(Location::Mti, offset, kind));
    }
    out.extend_from_slice(&mti);
    // Bitmaps.
    let primary = read_bitmap(d, &mut cur, Location::PrimaryBitmap)?;
    out.extend_from_slice(&primary.to_be_bytes());
    let mut announced = u128::from(primary) << 64;
    let mut announced3 = 0;
    let mut tertiary = false;
    if primary >> 63 != 0 {
        let secondary = read_bitmap(d, &mut cur, Location::SecondaryBitmap)?;
        out.extend_from_slice(&secondary.to_be_bytes());
        announced |= u128::from(secondary);
        if d.tertiary_bitmap() && secondary >> 63 != 0 {
            announced3 = read_bitmap(d, &mut cur, Location::Field(65))?;
            out.extend_from_slice(&announced3.to_be_bytes());
            tertiary = true;
        }
    }
    // Fields, ascending.
    for n in crate::message::numbers(announced, announced3, tertiary) {
        let location = Location::Field(n);
        if stop_at == Some(n) {
            return Ok(Some(cur.pos));
        }
        let Some(spec) = d.field(n) else {
            return Err(err(location, cur.pos, DecodeErrorKind::UndefinedField));
        };
        // A field that fails leaves nothing behind: the partial form holds only
        // the fields checked before it.
        let mark = out.len();
        if let Err(e) = field_to_canonical(spec, d.field_wire(n), cp, &mut cur, location, out) {
            out.truncate(mark);
            return Err(e);
        }
    }
    if cur.pos != wire.len() {
        let kind = DecodeErrorKind::TrailingBytes {
            count: wire.len() - cur.pos,
        };
        return Err(err(Location::Trailing, cur.pos, kind));
    }
    Ok(None)
}

fn read_bitmap(d: &Dialect, cur: &mut Wire<'_>, location: Location) -> Result<u64, DecodeError> {
    let encoding = d.bitmap_encoding();
    let (start, raw) = cur.take(location, encoding.wire_len())?;
    match encoding {
        BitmapEncoding::Binary => {
            let mut word = [0u8; 8];
            word.copy_from_slice(raw);
            Ok(u64::from_be_bytes(word))
        }
        BitmapEncoding::Hex | BitmapEncoding::HexEbcdic => {
            let cp = page(d);
            let mut value = 0u64;
            for (i, &b) in raw.iter().enumerate() {
                let c = if encoding == BitmapEncoding::HexEbcdic {
                    cp.to_latin1(b)
                } else {
                    b
                };
                let Some(v) = hex_value(c) else {
                    return Err(err(
                        location,
                        start + i,
                        DecodeErrorKind::BadHex { found: c },
                    ));
                };
                value = (value << 4) | u64::from(v);
            }
            Ok(value)
        }
    }
}

/// Reads a length prefix: the count it holds.
fn read_prefix(
    kind: LengthKind,
    encoding: PrefixEncoding,
    cp: CodePage,
    cur: &mut Wire<'_>,
    location: Location,
) -> Result<(usize, u16), DecodeError> {
    let (start, raw) = cur.take(location, encoding.wire_len(kind))?;
    let bad = |i: usize, found: u8| {
        Err(err(
            location,
            start + i,
            DecodeErrorKind::BadLengthPrefix { found },
        ))
    };
    let mut len = 0u16;
    match encoding {
        PrefixEncoding::Ascii | PrefixEncoding::Ebcdic => {
            for (i, &b) in raw.iter().enumerate() {
                let c = if encoding == PrefixEncoding::Ebcdic {
                    cp.to_latin1(b)
                } else {
                    b
                };
                if !c.is_ascii_digit() {
                    return bad(i, c);
                }
                len = len * 10 + u16::from(c - b'0');
            }
        }
        PrefixEncoding::Bcd => {
            for (i, &b) in raw.iter().enumerate() {
                if b >> 4 > 9 || b & 15 > 9 {
                    return bad(i, b);
                }
                len = len * 100 + u16::from(b >> 4) * 10 + u16::from(b & 15);
            }
        }
        PrefixEncoding::Binary => {
            for &b in raw {
                len = (len << 8) | u16::from(b);
            }
        }
    }
    Ok((start, len))
}

fn field_to_canonical(
    spec: &FieldSpec,
    wire: FieldWire,
    cp: CodePage,
    cur: &mut Wire<'_>,
    location: Location,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    let bcd = spec.encoding == Encoding::Bcd;
    // Units of the value (digits for BCD) and its wire bytes.
    let (units, wire_len) = match spec.length {
        LengthKind::Fixed => {
            let units = usize::from(spec.max);
            (units, spec.encoding.wire_len(units))
        }
        kind => {
            let (at, declared) = read_prefix(kind, wire.prefix, cp, cur, location)?;
            let (units, wire_len) = if bcd && wire.counts == LengthCounts::Bytes {
                // Digits are known once the bytes are read (an F pad nibble is not one).
                (usize::from(declared) * 2, usize::from(declared))
            } else {
                let units = usize::from(declared);
                (units, spec.encoding.wire_len(units))
            };
            let bound = if bcd && wire.counts == LengthCounts::Bytes {
                usize::from(spec.max).div_ceil(2)
            } else {
                usize::from(spec.max)
            };
            if usize::from(declared) > bound {
                let kind = DecodeErrorKind::LengthTooLong {
                    max: spec.max,
                    found: declared,
                };
                return Err(err(location, at, kind));
            }
            (units, wire_len)
        }
    };
    let (start, raw) = cur.take(location, wire_len)?;
    let prefix_at = out.len();
    if spec.length != LengthKind::Fixed {
        // Room for the ASCII prefix, written once the digit count is known.
        out.resize(prefix_at + spec.length.prefix_digits(), b'0');
    }
    let value_at = out.len();
    match spec.encoding {
        Encoding::Ascii | Encoding::Binary => out.extend_from_slice(raw),
        Encoding::Ebcdic => out.extend(raw.iter().map(|&b| cp.to_latin1(b))),
        Encoding::Hex => {
            if let Some(i) = raw.iter().position(|&b| hex_value(b).is_none()) {
                let kind = DecodeErrorKind::BadHex { found: raw[i] };
                return Err(err(location, start + i, kind));
            }
            out.extend_from_slice(raw);
        }
        Encoding::Bcd => unpack_bcd(spec, wire, units, raw, start, location, out)?,
    }
    let digits = out.len() - value_at;
    if bcd && digits > usize::from(spec.max) {
        let kind = DecodeErrorKind::LengthTooLong {
            max: spec.max,
            found: digits as u16,
        };
        return Err(err(location, start, kind));
    }
    if spec.ty != FieldType::B {
        if let Some(i) = spec.ty.first_invalid(&out[value_at..]) {
            let offset = if bcd { start + i / 2 } else { start + i };
            let kind = DecodeErrorKind::BadCharacter {
                expected: spec.ty,
                found: out[value_at + i],
            };
            return Err(err(location, offset, kind));
        }
    }
    if let Some((i, e)) = spec.tlv.and_then(|t| t.check(&out[value_at..])) {
        // TLV fields are binary, ASCII or EBCDIC: a byte on the wire a byte held.
        let kind = DecodeErrorKind::BadTlv {
            tag: e.tag,
            problem: e.problem,
        };
        return Err(err(location, start + i, kind));
    }
    if spec.length != LengthKind::Fixed {
        // The canonical prefix counts units: hex characters come two a byte.
        let units = if spec.encoding == Encoding::Hex {
            digits / 2
        } else {
            digits
        };
        write_ascii_digits(&mut out[prefix_at..value_at], units);
    }
    Ok(())
}

fn write_ascii_digits(dst: &mut [u8], mut v: usize) {
    for slot in dst.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Unpacks `units` BCD digits (or, for a byte-counted length, every nibble but an
/// F pad) as ASCII.
fn unpack_bcd(
    spec: &FieldSpec,
    wire: FieldWire,
    units: usize,
    raw: &[u8],
    start: usize,
    location: Location,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    let nibbles = raw.len() * 2;
    let nibble = |k: usize| {
        let b = raw[k / 2];
        if k % 2 == 0 {
            b >> 4
        } else {
            b & 15
        }
    };
    // Which nibbles are digits.
    let (first, count) = if units < nibbles {
        // An odd count: one pad nibble, which must be the filler.
        let pad_at = match wire.pad {
            PadSide::Left => 0,
            PadSide::Right => nibbles - 1,
        };
        if nibble(pad_at) != wire.filler.nibble() {
            let kind = DecodeErrorKind::BadBcd {
                found: raw[pad_at / 2],
            };
            return Err(err(location, start + pad_at / 2, kind));
        }
        (usize::from(wire.pad == PadSide::Left), units)
    } else if wire.counts == LengthCounts::Bytes
        && spec.length != LengthKind::Fixed
        && wire.filler == Filler::F
        && nibbles > 0
    {
        // Byte-counted: an F on the pad side is padding.
        match wire.pad {
            PadSide::Left if nibble(0) == 0xf => (1, nibbles - 1),
            PadSide::Right if nibble(nibbles - 1) == 0xf => (0, nibbles - 1),
            _ => (0, nibbles),
        }
    } else {
        (0, nibbles)
    };
    for k in first..first + count {
        let v = nibble(k);
        let c = match v {
            0..=9 => b'0' + v,
            0xd if spec.ty == FieldType::Z => b'D',
            _ => {
                let kind = DecodeErrorKind::BadBcd { found: raw[k / 2] };
                return Err(err(location, start + k / 2, kind));
            }
        };
        out.push(c);
    }
    Ok(())
}

/// The offset of the first byte of canonical `value` that field `spec` cannot
/// carry on the wire (a letter in a BCD field), if any.
pub(crate) fn representable(spec: &FieldSpec, value: &[u8]) -> Option<usize> {
    match spec.encoding {
        Encoding::Bcd => value.iter().position(|&b| {
            !(b.is_ascii_digit() || (spec.ty == FieldType::Z && matches!(b, b'D' | b'=')))
        }),
        // Every Latin-1 byte has an EBCDIC byte in the three pages.
        _ => None,
    }
}

struct Canon<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Canon<'a> {
    fn take(&mut self, field: u8, n: usize) -> Result<&'a [u8], EncodeError> {
        let end = self.pos + n;
        let Some(raw) = self.buf.get(self.pos..end) else {
            return Err(EncodeError {
                field,
                kind: EncodeErrorKind::Malformed,
            });
        };
        self.pos = end;
        Ok(raw)
    }
}

/// Appends the wire form under `d` of `canon`, a message in `d`'s canonical form
/// (as the [`Encoder`](crate::Encoder) writes it).
pub(crate) fn from_canonical(
    d: &Dialect,
    canon: &[u8],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let cp = page(d);
    let twin = d.canonical();
    let mut cur = Canon { buf: canon, pos: 0 };
    let mti = cur.take(0, 4)?;
    match d.mti_encoding() {
        MtiEncoding::Ascii => out.put_slice(mti),
        MtiEncoding::Ebcdic => {
            for &b in mti {
                out.put_u8(cp.from_latin1(b));
            }
        }
        MtiEncoding::Bcd => {
            for pair in mti.chunks_exact(2) {
                out.put_u8((pair[0].wrapping_sub(b'0') << 4) | (pair[1].wrapping_sub(b'0') & 15));
            }
        }
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(cur.take(0, 8)?);
    let primary = u64::from_be_bytes(word);
    write_bitmap(d, primary, cp, out);
    let mut present = u128::from(primary) << 64;
    if primary >> 63 != 0 {
        word.copy_from_slice(cur.take(1, 8)?);
        let secondary = u64::from_be_bytes(word);
        write_bitmap(d, secondary, cp, out);
        present |= u128::from(secondary);
    }
    let tertiary = d.tertiary_bitmap() && present & 1 << 63 != 0;
    let mut present3 = 0;
    if tertiary {
        word.copy_from_slice(cur.take(65, 8)?);
        present3 = u64::from_be_bytes(word);
        write_bitmap(d, present3, cp, out);
    }
    for n in crate::message::numbers(present, present3, tertiary) {
        let (Some(spec), Some(canon_spec)) = (d.field(n), twin.field(n)) else {
            return Err(EncodeError {
                field: n,
                kind: EncodeErrorKind::UndefinedField,
            });
        };
        let units = match canon_spec.length {
            LengthKind::Fixed => usize::from(canon_spec.max),
            kind => {
                let raw = cur.take(n, kind.prefix_digits())?;
                raw.iter().fold(0usize, |v, &b| {
                    v * 10 + usize::from(b.wrapping_sub(b'0') % 10)
                })
            }
        };
        let value = cur.take(n, canon_spec.encoding.wire_len(units))?;
        field_to_wire(n, spec, d.field_wire(n), cp, units, value, out)?;
    }
    Ok(())
}

fn write_bitmap(d: &Dialect, value: u64, cp: CodePage, out: &mut BytesMut) {
    match d.bitmap_encoding() {
        BitmapEncoding::Binary => out.put_slice(&value.to_be_bytes()),
        e => {
            for i in 0..16 {
                let c = HEX[((value >> (60 - 4 * i)) & 15) as usize];
                out.put_u8(if e == BitmapEncoding::HexEbcdic {
                    cp.from_latin1(c)
                } else {
                    c
                });
            }
        }
    }
}

fn write_prefix(
    kind: LengthKind,
    encoding: PrefixEncoding,
    cp: CodePage,
    count: usize,
    out: &mut BytesMut,
) {
    let width = encoding.wire_len(kind);
    match encoding {
        PrefixEncoding::Ascii | PrefixEncoding::Ebcdic => {
            for i in (0..width).rev() {
                let c = b'0' + ((count / 10usize.pow(i as u32)) % 10) as u8;
                out.put_u8(if encoding == PrefixEncoding::Ebcdic {
                    cp.from_latin1(c)
                } else {
                    c
                });
            }
        }
        PrefixEncoding::Bcd => {
            let digits = 2 * width;
            for i in (0..digits).rev().step_by(2) {
                let hi = (count / 10usize.pow(i as u32)) % 10;
                let lo = (count / 10usize.pow(i as u32 - 1)) % 10;
                out.put_u8(((hi as u8) << 4) | lo as u8);
            }
        }
        PrefixEncoding::Binary => {
            for i in (0..width).rev() {
                out.put_u8((count >> (8 * i)) as u8);
            }
        }
    }
}

fn field_to_wire(
    n: u8,
    spec: &FieldSpec,
    wire: FieldWire,
    cp: CodePage,
    units: usize,
    value: &[u8],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if let Some(i) = representable(spec, value) {
        return Err(EncodeError {
            field: n,
            kind: EncodeErrorKind::Unrepresentable {
                offset: i,
                found: value[i],
            },
        });
    }
    if spec.length != LengthKind::Fixed {
        let count = if spec.encoding == Encoding::Bcd && wire.counts == LengthCounts::Bytes {
            units.div_ceil(2)
        } else {
            units
        };
        write_prefix(spec.length, wire.prefix, cp, count, out);
    }
    match spec.encoding {
        Encoding::Ascii | Encoding::Binary | Encoding::Hex => out.put_slice(value),
        Encoding::Ebcdic => {
            for &b in value {
                out.put_u8(cp.from_latin1(b));
            }
        }
        Encoding::Bcd => {
            let digit = |b: u8| match b {
                b'D' | b'=' => 0xd,
                b => b.wrapping_sub(b'0') & 15,
            };
            let pad = wire.filler.nibble();
            let odd = value.len() % 2 == 1;
            let mut nibbles = value.iter().map(|&b| digit(b));
            let mut pending: Option<u8> = match (odd, wire.pad) {
                (true, PadSide::Left) => Some(pad),
                _ => None,
            };
            loop {
                let hi = match pending.take() {
                    Some(p) => p,
                    None => match nibbles.next() {
                        Some(v) => v,
                        None => break,
                    },
                };
                let lo = nibbles.next().unwrap_or(pad);
                out.put_u8((hi << 4) | lo);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Encoder, Message, Mti};

    fn dialect(extra: &str) -> Dialect {
        let text = format!(
            r#"
            name = "t"
            mti_encoding = "bcd"
            bitmap_encoding = "binary"
            length_prefix_encoding = "bcd"
            code_page = "cp1047"
            {extra}
            [[field]]
            number = 1
            name = "Bitmap"
            type = "b"
            length = "fixed"
            max = 8
            encoding = "binary"
            [[field]]
            number = 2
            name = "PAN"
            type = "n"
            length = "llvar"
            max = 19
            encoding = "bcd"
            [[field]]
            number = 3
            name = "Processing code"
            type = "n"
            length = "fixed"
            max = 6
            encoding = "bcd"
            [[field]]
            number = 35
            name = "Track 2"
            type = "z"
            length = "llvar"
            max = 37
            encoding = "bcd"
            [[field]]
            number = 41
            name = "Terminal"
            type = "ans"
            length = "fixed"
            max = 8
            encoding = "ebcdic"
            [[field]]
            number = 49
            name = "Currency"
            type = "n"
            length = "fixed"
            max = 3
            encoding = "bcd"
            [[field]]
            number = 55
            name = "ICC"
            type = "b"
            length = "lllvar"
            max = 255
            encoding = "binary"
            "#
        );
        Dialect::from_toml(&text, "t").unwrap()
    }

    fn sample(d: &Dialect) -> BytesMut {
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(d, &mut out, Mti::FINANCIAL);
        enc.field(2, b"4111111111111111111").unwrap();
        enc.field(3, b"000000").unwrap();
        enc.field(35, b"4111111111111111D2512").unwrap();
        enc.field(41, b"TERM[01]").unwrap();
        enc.field(49, b"978").unwrap();
        enc.field(55, &[0x9f, 0x02, 0x01, 0x00]).unwrap();
        enc.finish();
        out
    }

    #[test]
    fn bcd_and_ebcdic_round_trip_through_the_canonical_form() {
        let d = dialect("");
        let wire = sample(&d);
        // MTI 0200 in BCD, then the binary bitmap.
        assert_eq!(&wire[..2], &[0x02, 0x00]);
        // DE2: BCD length 19, then 10 bytes, left-padded with 0.
        assert_eq!(&wire[10..12], &[0x19, 0x04]);
        let msg = Message::decode(&d, wire.clone().freeze()).unwrap();
        assert_eq!(msg.mti(), Mti::FINANCIAL);
        assert_eq!(msg.field(2), Some(&b"4111111111111111111"[..]));
        assert_eq!(msg.field(35), Some(&b"4111111111111111D2512"[..]));
        assert_eq!(msg.field(41), Some(&b"TERM[01]"[..]));
        assert_eq!(msg.field(49), Some(&b"978"[..]));
        assert_eq!(msg.field(55), Some(&[0x9f, 0x02, 0x01, 0x00][..]));
        // Re-encoded under the same dialect: the same wire bytes.
        let mut again = BytesMut::new();
        crate::reencode(&msg, &d, &d, msg.mti(), &[], &mut again).unwrap();
        assert_eq!(again, wire);
        // EBCDIC cp1047 brackets.
        let at = wire.len() - 4 - 2 - 2 - 8;
        assert_eq!(
            &wire[at..at + 8],
            &[0xe3, 0xc5, 0xd9, 0xd4, 0xad, 0xf0, 0xf1, 0xbd]
        );
    }

    #[test]
    fn right_padding_with_f_and_byte_counted_lengths() {
        let d = dialect("bcd_pad = \"right\"\nbcd_filler = \"F\"\nlength_counts = \"bytes\"");
        let wire = sample(&d);
        // DE2: 10 bytes, the last nibble F.
        assert_eq!(wire[10], 0x10);
        assert_eq!(wire[20], 0x1f);
        let msg = Message::decode(&d, wire.freeze()).unwrap();
        assert_eq!(msg.field(2), Some(&b"4111111111111111111"[..]));
        assert_eq!(msg.field(49), Some(&b"978"[..]));
    }

    #[test]
    fn errors_name_the_wire_offset() {
        let d = dialect("");
        let mut wire = sample(&d).to_vec();
        // A non-digit nibble in DE3 (after MTI 2, bitmap 8, DE2 1 + 10).
        wire[21] = 0x0a;
        let e = Message::decode(&d, wire.into()).unwrap_err();
        assert_eq!(e.location, Location::Field(3));
        assert_eq!(e.offset, 21);
        assert_eq!(e.kind, DecodeErrorKind::BadBcd { found: 0x0a });
        // The wrong pad nibble on DE2.
        let mut wire = sample(&d).to_vec();
        wire[11] = 0x14;
        let e = Message::decode(&d, wire.into()).unwrap_err();
        assert_eq!((e.location, e.offset), (Location::Field(2), 11));
    }

    #[test]
    fn a_letter_cannot_go_into_a_bcd_field() {
        let d = dialect("");
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(&d, &mut out, Mti::FINANCIAL);
        let e = enc.field(3, b"00A000").unwrap_err();
        assert_eq!(
            e.kind,
            EncodeErrorKind::Unrepresentable {
                offset: 2,
                found: b'A'
            }
        );
    }

    #[test]
    fn ascii_acquirer_to_bcd_bank_and_back() {
        let a = Dialect::iso87_ascii();
        let d = dialect("");
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(&a, &mut out, Mti::FINANCIAL);
        enc.field(2, b"4111111111111111").unwrap();
        enc.field(3, b"000000").unwrap();
        enc.field(49, b"978").unwrap();
        enc.finish();
        let msg = Message::decode(&a, out.freeze()).unwrap();
        let mut wire = BytesMut::new();
        crate::reencode(&msg, &a, &d, msg.mti(), &[], &mut wire).unwrap();
        let at_bank = Message::decode(&d, wire.freeze()).unwrap();
        assert_eq!(at_bank.field(2), Some(&b"4111111111111111"[..]));
        let mut back = BytesMut::new();
        crate::reencode(&at_bank, &d, &a, Mti::FINANCIAL_RESPONSE, &[], &mut back).unwrap();
        let answer = Message::decode(&a, back.freeze()).unwrap();
        assert_eq!(answer.mti(), Mti::FINANCIAL_RESPONSE);
        assert_eq!(answer.field(49), Some(&b"978"[..]));
    }
}
