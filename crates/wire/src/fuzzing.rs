//! Checks the fuzz targets run (`fuzz/fuzz_targets/*.rs` are thin wrappers around
//! these functions), shared with the tests (`tests/corpus.rs`, `tests/props.rs`) so
//! every committed corpus file also runs under `cargo test`. Built with the
//! `fuzzing` feature only; [`corpus`](crate::corpus) runs a corpus folder through
//! them. Failures are panics: a fuzzer reports them as crashes and proptest
//! shrinks them.

use crate::{
    reencode, BitmapEncoding, DecodeError, DecodeErrorKind, Dialect, Encoding, FrameDecoder,
    FrameError, Framing, LengthKind, Message, FRAME_SIZE_MAX_BYTES_DEFAULT,
};
use bytes::{Bytes, BytesMut};
use std::sync::OnceLock;

/// Frame bounds tried by [`frame_decoder`]: the default and one small enough that
/// ordinary inputs hit it.
pub const FRAME_BOUNDS_BYTES: [usize; 2] = [FRAME_SIZE_MAX_BYTES_DEFAULT, 64];

// === fuzz target entry points ===

/// `fuzz_targets/decode_iso87_ascii.rs`.
pub fn decode_iso87_ascii(data: &[u8]) {
    check_decode(iso87_ascii(), data);
}

/// `fuzz_targets/decode_iso87_hexbitmap.rs`.
pub fn decode_iso87_hexbitmap(data: &[u8]) {
    check_decode(iso87_hexbitmap(), data);
}

/// `fuzz_targets/decode_iso87_binary.rs`: BCD MTI, numerics and length prefixes.
pub fn decode_iso87_binary(data: &[u8]) {
    check_decode_transcoded(iso87_binary(), data);
}

/// `fuzz_targets/decode_iso87_ebcdic.rs`: EBCDIC MTI, text and length prefixes.
pub fn decode_iso87_ebcdic(data: &[u8]) {
    check_decode_transcoded(iso87_ebcdic(), data);
}

/// `fuzz_targets/decode_iso93_binary.rs`: an ISO 8583:1993 binary message,
/// translated to the 1987 form.
pub fn decode_iso93_binary(data: &[u8]) {
    check_decode_translated(iso93_binary(), data);
}

/// `fuzz_targets/decode_tertiary_binary.rs`: `iso87-binary` with a tertiary
/// bitmap and fields 129..=192 ([`tertiary_dialect`]).
pub fn decode_tertiary_binary(data: &[u8]) {
    check_decode_transcoded(tertiary_binary(), data);
}

/// A shipped 1987 dialect (`base`) with field 65 made the tertiary bitmap and
/// fields 129..=192 defined: odd ones numeric LLVAR in `numeric_encoding`,
/// even ones text LLLVAR. For tests and fuzzing of tertiary bitmaps (no
/// shipped dialect has one).
pub fn tertiary_dialect(base: &str, numeric_encoding: &str) -> Dialect {
    let text = crate::BUILTIN_DIALECTS
        .iter()
        .find(|(n, _)| *n == base)
        .map_or("", |(_, t)| t);
    let text = text.replacen(
        "name = \"Bitmap, extended (tertiary bitmap indicator)\"\ntype = \"b\"\nlength = \"fixed\"\nmax = 1",
        "name = \"Bitmap, tertiary\"\ntype = \"b\"\nlength = \"fixed\"\nmax = 8",
        1,
    );
    let mut text = text.replacen("\n[[field]]", "tertiary_bitmap = true\n\n[[field]]", 1);
    for n in 129..=192 {
        let (ty, length, max, encoding) = if n % 2 == 1 {
            ("n", "llvar", 19, numeric_encoding)
        } else {
            ("ans", "lllvar", 999, "ascii")
        };
        text.push_str(&format!(
            "\n[[field]]\nnumber = {n}\nname = \"Private {n}\"\ntype = \"{ty}\"\nlength = \"{length}\"\nmax = {max}\nencoding = \"{encoding}\"\n"
        ));
    }
    match Dialect::from_toml(&text, base) {
        Ok(d) => d,
        Err(e) => panic!("tertiary variant of {base}: {e}"),
    }
}

/// `iso87-binary` with a tertiary bitmap, built once.
pub fn tertiary_binary() -> &'static Dialect {
    static DIALECT: OnceLock<Dialect> = OnceLock::new();
    DIALECT.get_or_init(|| tertiary_dialect("iso87-binary", "bcd"))
}

/// `fuzz_targets/dialect_jpos_xml.rs`: any text read as a jPOS GenericPackager
/// file gives a dialect or a typed error, never a panic; a dialect it gives
/// describes itself, and carries an echo (DE7, DE11, DE70) when it defines those
/// fields as the 1987 directory does.
pub fn dialect_jpos_xml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let d = match Dialect::from_jpos_xml(text, "fuzz.xml") {
        Ok(d) => d,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = d.describe(true);
    let _ = d.describe(false);
    // The encoder takes values as given (they come from decoded messages): only
    // an echo whose values fit the fields' types must decode.
    let echo: [(u8, &[u8]); 3] = [(7, b"1130120000"), (11, b"000001"), (70, b"301")];
    let fits = echo.iter().all(|(n, _)| {
        d.canonical()
            .field(*n)
            .is_some_and(|f| f.ty == crate::FieldType::N)
    });
    let mut out = BytesMut::new();
    let mut enc = crate::Encoder::new(&d, &mut out, crate::Mti::NETWORK);
    let ok = fits && echo.iter().all(|(n, v)| enc.field(*n, v).is_ok());
    if ok {
        enc.finish();
        let msg = match Message::decode(&d, out.freeze()) {
            Ok(m) => m,
            Err(e) => panic!("an echo the dialect encoded does not decode: {e}"),
        };
        assert_eq!(msg.field(11), Some(&b"000001"[..]));
    }
}

/// `fuzz_targets/frame_decoder.rs`: every framing, two bounds, fed whole and in
/// chunks of 1 to 7 bytes (chosen by the first byte); both feeds must agree.
pub fn frame_decoder(data: &[u8]) {
    let chunk_bytes = 1 + usize::from(data.first().copied().unwrap_or(0) % 7);
    for framing in Framing::ALL {
        for bound in FRAME_BOUNDS_BYTES {
            let dec = FrameDecoder::new(framing, bound);
            let whole = run_frames(&dec, data, &[data.len().max(1)]);
            let chunked = run_frames(&dec, data, &[chunk_bytes]);
            assert_eq!(
                whole, chunked,
                "{framing}, bound {bound}: whole vs chunked feed"
            );
            assert!(
                whole.frames.iter().all(|f| f.len() <= bound),
                "frame over the bound"
            );
            for frame in &whole.frames {
                check_headers(frame);
            }
        }
    }
}

/// A TPDU and fixed headers taken off a frame: the rest is the frame after them,
/// a TPDU comes back with its addresses swapped, a fixed header unchanged, and a
/// frame too short for its header is refused and left whole.
fn check_headers(frame: &Bytes) {
    let headers = [
        crate::MessageHeader::Tpdu,
        crate::MessageHeader::Fixed(1),
        crate::MessageHeader::Fixed(7),
        crate::MessageHeader::Fixed(32),
    ];
    for header in headers {
        let mut rest = frame.clone();
        match header.split(&mut rest) {
            None => {
                assert!(
                    frame.len() < header.len(),
                    "{header:?} refused a long frame"
                );
                assert_eq!(&rest, frame, "a refused frame is left whole");
            }
            Some(back) => {
                let n = header.len();
                assert_eq!(
                    &rest[..],
                    &frame[n..],
                    "{header:?}: the rest follows the header"
                );
                let sent = &frame[..n];
                let expected: Vec<u8> = if header == crate::MessageHeader::Tpdu {
                    [&sent[..1], &sent[3..5], &sent[1..3]].concat()
                } else {
                    sent.to_vec()
                };
                assert_eq!(
                    back.as_bytes(),
                    &expected[..],
                    "{header:?}: the answer's header"
                );
            }
        }
    }
}

// === dialects ===

/// The built-in `iso87-ascii` dialect, parsed once.
pub fn iso87_ascii() -> &'static Dialect {
    static DIALECT: OnceLock<Dialect> = OnceLock::new();
    DIALECT.get_or_init(|| builtin("iso87-ascii"))
}

/// The built-in `iso87-hexbitmap` dialect, parsed once.
pub fn iso87_hexbitmap() -> &'static Dialect {
    static DIALECT: OnceLock<Dialect> = OnceLock::new();
    DIALECT.get_or_init(|| builtin("iso87-hexbitmap"))
}

/// The built-in `iso87-binary` dialect, parsed once.
pub fn iso87_binary() -> &'static Dialect {
    static DIALECT: OnceLock<Dialect> = OnceLock::new();
    DIALECT.get_or_init(|| builtin("iso87-binary"))
}

/// The built-in `iso93-binary` dialect, parsed once.
pub fn iso93_binary() -> &'static Dialect {
    static DIALECT: OnceLock<Dialect> = OnceLock::new();
    DIALECT.get_or_init(|| builtin("iso93-binary"))
}

/// The built-in `iso87-ebcdic` dialect, parsed once.
pub fn iso87_ebcdic() -> &'static Dialect {
    static DIALECT: OnceLock<Dialect> = OnceLock::new();
    DIALECT.get_or_init(|| builtin("iso87-ebcdic"))
}

fn builtin(name: &str) -> Dialect {
    match Dialect::builtin(name) {
        Some(d) => d,
        None => panic!("built-in dialect {name} does not parse"),
    }
}

// === decoding ===

/// Decodes `data` as far as it is valid and checks what came out; a message that
/// decodes fully must re-encode to a message with the same MTI and field values,
/// byte for byte equal to `data` when `data` was in canonical form.
pub fn check_decode(dialect: &Dialect, data: &[u8]) {
    let (msg, err) = Message::decode_partial(dialect, Bytes::copy_from_slice(data));
    check_partial(dialect, data, &msg, err.as_ref());
    // Formatting must not panic on any decoded content (masking, hidden fields).
    let _ = format!("{msg:?}");
    match err {
        Some(e) => {
            let _ = e.to_string();
        }
        None => check_reencode(dialect, data, &msg),
    }
}

/// Decodes `data` under a dialect converted to its canonical form (BCD, EBCDIC):
/// decoded values match their canonical definitions, errors name a byte of the
/// input, and a message that decodes fully re-encodes to the same values, byte
/// for byte equal to `data` when its bitmaps are minimal (decoding is strict:
/// one wire form per message).
pub fn check_decode_transcoded(dialect: &Dialect, data: &[u8]) {
    let (msg, err) = Message::decode_partial(dialect, Bytes::copy_from_slice(data));
    let _ = format!("{msg:?}");
    let canonical = dialect.canonical();
    for (n, value) in msg.fields() {
        check_value(canonical, n, value);
    }
    let Some(e) = err else {
        let out = reencode_same(dialect, &msg);
        let again = match Message::decode(dialect, out.clone()) {
            Ok(m) => m,
            Err(e) => panic!("re-encoded message does not decode: {e}"),
        };
        assert_eq!(again.mti(), msg.mti(), "MTI survives re-encoding");
        assert!(
            msg.fields().eq(again.fields()),
            "field values survive re-encoding"
        );
        let high_field = msg.fields().any(|(n, _)| n > 64);
        if msg.has(1) == high_field {
            assert_eq!(&out[..], data, "strict decoding: the same wire bytes");
        }
        return;
    };
    let _ = e.to_string();
    assert!(e.offset <= data.len(), "error {e:?} past the input");
    let at = data.get(e.offset).copied();
    let names_the_byte = |found: u8| {
        at == Some(found)
            || at
                .zip(dialect.code_page())
                .is_some_and(|(b, cp)| cp.to_latin1(b) == found)
    };
    match e.kind {
        DecodeErrorKind::Truncated { needed, available } => {
            assert!(needed > available, "{e:?}");
            assert_eq!(e.offset + available, data.len(), "{e:?}");
        }
        DecodeErrorKind::TrailingBytes { count } => {
            assert_eq!(e.offset + count, data.len(), "{e:?}");
        }
        DecodeErrorKind::BadMti { found }
        | DecodeErrorKind::BadLengthPrefix { found }
        | DecodeErrorKind::BadCharacter { found, .. }
        | DecodeErrorKind::BadHex { found }
        | DecodeErrorKind::BadBcd { found } => {
            assert!(names_the_byte(found), "{e:?} names the byte at its offset");
        }
        DecodeErrorKind::LengthTooLong { .. }
        | DecodeErrorKind::MessageTooLarge { .. }
        | DecodeErrorKind::BadTlv { .. }
        | DecodeErrorKind::Untranslatable(_) => {
            assert!(e.offset < data.len(), "{e:?}");
        }
        DecodeErrorKind::UndefinedField => {}
    }
}

/// A 1993 message (`dialect` translated): decoding gives the 1987 form or a typed
/// error naming a wire offset, never a panic; every field held is valid in the
/// 1987 form; a message that translated goes back to 1993 and translates again
/// to the same 1987 form (the translation is stable both ways).
pub fn check_decode_translated(dialect: &Dialect, data: &[u8]) {
    let (msg, err) = Message::decode_partial(dialect, Bytes::copy_from_slice(data));
    let _ = format!("{msg:?}");
    for (n, value) in msg.fields() {
        check_value(dialect.canonical(), n, value);
    }
    if let Some(e) = err {
        let _ = e.to_string();
        assert!(e.offset <= data.len(), "error {e:?} past the input");
        if let DecodeErrorKind::Untranslatable(_) = e.kind {
            assert!(e.offset < data.len(), "{e:?} names a wire offset");
        }
        return;
    }
    let out = reencode_same(dialect, &msg);
    let again = match Message::decode(dialect, out) {
        Ok(m) => m,
        Err(e) => panic!("a translated message written back to 1993 does not decode: {e}"),
    };
    assert_eq!(again.mti(), msg.mti(), "MTI survives the round trip");
    assert!(
        msg.fields().eq(again.fields()),
        "the 1987 form survives the round trip: {msg:?} vs {again:?}"
    );
}

/// What a partial decode promises: every decoded field lies inside the input and
/// matches its definition, and the error points at the offending byte.
pub fn check_partial(dialect: &Dialect, data: &[u8], msg: &Message, err: Option<&DecodeError>) {
    assert_eq!(&msg.as_bytes()[..], data, "message bytes are the input");
    assert!(msg.mti().as_bytes().iter().all(u8::is_ascii_digit) || err.is_some());
    for n in 1..=192u8 {
        let Some(span) = msg.span(n) else {
            assert!(msg.field(n).is_none(), "field {n}: no span but a value");
            continue;
        };
        let start = usize::from(span.start);
        let end = start + usize::from(span.len);
        assert!(
            end <= data.len(),
            "field {n}: span {span:?} past the input ({})",
            data.len()
        );
        assert_eq!(
            msg.field(n),
            Some(&data[start..end]),
            "field {n}: value is its span"
        );
        check_value(dialect, n, &data[start..end]);
    }
    let Some(e) = err else { return };
    assert!(
        e.offset <= data.len(),
        "error {e:?} past the input ({} bytes)",
        data.len()
    );
    match e.kind {
        DecodeErrorKind::Truncated { needed, available } => {
            assert!(needed > available, "{e:?}");
            assert_eq!(e.offset + available, data.len(), "{e:?}");
        }
        DecodeErrorKind::TrailingBytes { count } => {
            assert!(count > 0, "{e:?}");
            assert_eq!(e.offset + count, data.len(), "{e:?}");
        }
        DecodeErrorKind::BadMti { found }
        | DecodeErrorKind::BadLengthPrefix { found }
        | DecodeErrorKind::BadCharacter { found, .. }
        | DecodeErrorKind::BadHex { found }
        | DecodeErrorKind::BadBcd { found } => {
            assert_eq!(
                data.get(e.offset),
                Some(&found),
                "{e:?} names the byte at its offset"
            );
        }
        DecodeErrorKind::LengthTooLong { .. }
        | DecodeErrorKind::MessageTooLarge { .. }
        | DecodeErrorKind::BadTlv { .. }
        | DecodeErrorKind::Untranslatable(_) => {
            assert!(e.offset < data.len(), "{e:?}");
        }
        DecodeErrorKind::UndefinedField => {}
    }
}

/// A decoded value has its definition's length and character class.
pub fn check_value(dialect: &Dialect, n: u8, value: &[u8]) {
    if n == 1 {
        let width = dialect.bitmap_encoding().wire_len();
        assert_eq!(value.len(), width, "secondary bitmap width");
        if dialect.bitmap_encoding() == BitmapEncoding::Hex {
            assert!(
                value.iter().all(u8::is_ascii_hexdigit),
                "secondary bitmap hex"
            );
        }
        return;
    }
    let Some(spec) = dialect.field(n) else {
        panic!("field {n} decoded but not defined by {}", dialect.name());
    };
    // Values are held in the canonical form.
    let max_wire = spec.encoding.value().wire_len(usize::from(spec.max));
    match spec.length {
        LengthKind::Fixed => assert_eq!(value.len(), max_wire, "field {n}: fixed length"),
        LengthKind::LlVar | LengthKind::LllVar => {
            assert!(
                value.len() <= max_wire,
                "field {n}: {} > {max_wire}",
                value.len()
            );
        }
    }
    match spec.encoding.value() {
        Encoding::Binary => {}
        Encoding::Hex => {
            assert!(value.len() % 2 == 0, "field {n}: odd hex length");
            assert!(
                value.iter().all(u8::is_ascii_hexdigit),
                "field {n}: not hex"
            );
        }
        Encoding::Ascii | Encoding::Bcd | Encoding::Ebcdic => {
            for (i, &b) in value.iter().enumerate() {
                assert!(
                    spec.ty.allows(i, b),
                    "field {n}: byte {i} 0x{b:02x} not {}",
                    spec.ty
                );
            }
        }
    }
}

/// Re-encodes a fully decoded message under its own dialect without changes.
fn check_reencode(dialect: &Dialect, data: &[u8], msg: &Message) {
    let out = reencode_same(dialect, msg);
    let again = match Message::decode(dialect, out.clone()) {
        Ok(m) => m,
        Err(e) => panic!("re-encoded message does not decode: {e}"),
    };
    assert_eq!(again.mti(), msg.mti(), "MTI survives re-encoding");
    assert!(
        msg.fields().eq(again.fields()),
        "field values survive re-encoding"
    );
    if is_canonical(dialect, msg) {
        assert_eq!(
            &out[..],
            data,
            "canonical message re-encodes to the same bytes"
        );
    }
    // The re-encoded form is canonical: a second pass changes nothing.
    assert_eq!(
        reencode_same(dialect, &again),
        out,
        "re-encoding is idempotent"
    );
}

fn reencode_same(dialect: &Dialect, msg: &Message) -> Bytes {
    let mut out = BytesMut::new();
    match reencode(msg, dialect, dialect, msg.mti(), &[], &mut out) {
        Ok(len) => assert_eq!(len, out.len(), "reencode returns the message length"),
        Err(e) => panic!("decoded message does not re-encode: {e}"),
    }
    out.freeze()
}

/// Whether re-encoding must reproduce the input: bitmaps are written in uppercase
/// hex, and the secondary bitmap only when a field above 64 is present. (Hex field
/// values are carried as they are, so their case does not matter.)
pub fn is_canonical(dialect: &Dialect, msg: &Message) -> bool {
    let high_field = msg.fields().any(|(n, _)| n > 64);
    if msg.has(1) != high_field {
        return false;
    }
    if dialect.bitmap_encoding() == BitmapEncoding::Binary {
        return true;
    }
    let width = dialect.bitmap_encoding().wire_len();
    let primary = &msg.as_bytes()[4..4 + width];
    let secondary = msg.field(1).unwrap_or_default();
    !primary.iter().chain(secondary).any(u8::is_ascii_lowercase)
}

// === framing ===

/// What a run of a frame decoder over a stream produced.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameRun {
    /// Frames taken, in order.
    pub frames: Vec<Bytes>,
    /// The error that stopped the run, if any.
    pub error: Option<FrameError>,
    /// Bytes left in the buffer when the input ran out (0 after an error).
    pub leftover_bytes: usize,
}

/// Feeds `data` to `dec` in chunks whose sizes cycle through `chunk_sizes` (each at
/// least 1), taking every whole frame after each chunk. Checks that each frame is
/// the next slice of the stream after its header and within the bound.
pub fn run_frames(dec: &FrameDecoder, data: &[u8], chunk_sizes: &[usize]) -> FrameRun {
    let header = dec.framing().header_len();
    let mut buf = BytesMut::new();
    let mut run = FrameRun {
        frames: Vec::new(),
        error: None,
        leftover_bytes: 0,
    };
    let mut fed = 0;
    let mut taken = 0;
    let chunk_sizes = if chunk_sizes.is_empty() {
        &[usize::MAX][..]
    } else {
        chunk_sizes
    };
    for &size in chunk_sizes.iter().cycle() {
        if fed == data.len() {
            break;
        }
        let end = data.len().min(fed.saturating_add(size.max(1)));
        buf.extend_from_slice(&data[fed..end]);
        fed = end;
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty(), "empty frame");
                    assert!(
                        frame.len() <= dec.framing().size_limit_bytes(),
                        "frame too large"
                    );
                    let start = taken + header;
                    assert_eq!(&frame[..], &data[start..start + frame.len()], "frame bytes");
                    taken = start + frame.len();
                    assert_eq!(taken + buf.len(), fed, "bytes neither lost nor invented");
                    run.frames.push(frame);
                }
                Ok(None) => break,
                Err(e) => {
                    run.error = Some(e);
                    return run;
                }
            }
        }
    }
    run.leftover_bytes = buf.len();
    run
}
