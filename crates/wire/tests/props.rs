//! Property tests of the codec under both built-in dialects: encode/decode round
//! trips, decoding that never panics nor reads past the message, errors that point
//! inside the input, framing over any chunking, and translation between dialects.

#[allow(dead_code)]
use switchyard_wire::fuzzing as fuzz_checks;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::TestCaseError;
use switchyard_wire::{
    reencode, BitmapEncoding, Change, DecodeErrorKind, Dialect, Encoder, Encoding, FieldSpec,
    FieldType, FrameDecoder, Framing, LengthKind, Location, Message, Mti, Tlv,
    FRAME_SIZE_MAX_BYTES_DEFAULT,
};

use fuzz_checks::{iso87_ascii, iso87_hexbitmap};

/// Cases per property: enough to cover every field definition, quick in debug builds.
const CASES: u32 = 256;

fn config() -> ProptestConfig {
    // No regression files: a failure prints its minimal input, which belongs in a
    // unit test or the fuzz corpus.
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// === generators ===

/// A message as a list of (field number, value in the dialect's wire encoding),
/// ascending.
#[derive(Clone, Debug)]
struct Generated {
    mti: Mti,
    fields: Vec<(u8, Vec<u8>)>,
}

/// Bounds on generated messages.
#[derive(Clone, Copy, Debug)]
struct Shape {
    fields_max: usize,
    /// Cap on a variable-length value, in units (characters, or bytes for `b`).
    var_units_max: usize,
}

/// Up to 24 fields of any length: at most ~48 KB, under the 65,535-byte message limit.
const WIDE: Shape = Shape {
    fields_max: 24,
    var_units_max: 999,
};
/// Messages that fit both frame headers and the default frame bound.
const SMALL: Shape = Shape {
    fields_max: 12,
    var_units_max: 40,
};

const HEX_DIGITS: &[u8] = b"0123456789ABCDEFabcdef";

fn unit(ty: FieldType) -> BoxedStrategy<u8> {
    match ty {
        FieldType::N | FieldType::XN => (b'0'..=b'9').boxed(),
        FieldType::A => prop_oneof![b'a'..=b'z', b'A'..=b'Z', Just(b' ')].boxed(),
        FieldType::An => prop_oneof![b'a'..=b'z', b'A'..=b'Z', b'0'..=b'9', Just(b' ')].boxed(),
        FieldType::Ans | FieldType::As | FieldType::Ns | FieldType::Anp => {
            prop_oneof![4 => 0x20u8..=0x7e, 1 => 0xa0u8..=0xff].boxed()
        }
        FieldType::Z => select(b"0123456789=D;?F".to_vec()).boxed(),
        FieldType::B => any::<u8>().boxed(),
    }
}

/// A value for `spec`: its exact length when fixed, 1..=max units when variable.
fn value(spec: &FieldSpec, shape: Shape) -> BoxedStrategy<Vec<u8>> {
    let max = usize::from(spec.max);
    let units = match spec.length {
        LengthKind::Fixed => Just(max).boxed(),
        LengthKind::LlVar | LengthKind::LllVar => {
            let cap = max.min(shape.var_units_max);
            prop_oneof![3 => 1..=cap.min(16), 1 => 1..=cap, 1 => Just(cap)].boxed()
        }
    };
    let (ty, encoding) = (spec.ty, spec.encoding);
    if spec.tlv == Some(Tlv::Ber) {
        return units
            .prop_flat_map(|units| prop::collection::vec(any::<u8>(), units).prop_map(ber_from))
            .boxed();
    }
    if spec.number == 55 && encoding == Encoding::Hex {
        // DE55 is BER-TLV where it is binary: its hex twin carries the same
        // structure, so translations between the dialects decode on both sides.
        return units
            .prop_flat_map(|units| prop::collection::vec(any::<u8>(), units))
            .prop_map(|raw| {
                ber_from(raw)
                    .iter()
                    .flat_map(|b| format!("{b:02X}").into_bytes())
                    .collect()
            })
            .boxed();
    }
    units
        .prop_flat_map(move |units| match (ty, encoding) {
            (_, Encoding::Hex) => prop::collection::vec(select(HEX_DIGITS), 2 * units).boxed(),
            (FieldType::XN, _) => (
                select(b"CD".to_vec()),
                prop::collection::vec(unit(ty), units - 1),
            )
                .prop_map(|(sign, digits)| [vec![sign], digits].concat())
                .boxed(),
            _ => prop::collection::vec(unit(ty), units).boxed(),
        })
        .boxed()
}

/// Well-formed BER-TLV of exactly `raw.len()` bytes, its lengths, tags and values
/// drawn from `raw`: one-byte tags, short lengths, a 0x00 pad when one byte is left.
fn ber_from(raw: Vec<u8>) -> Vec<u8> {
    const TAGS: [u8; 5] = [0x5a, 0x82, 0x95, 0x9a, 0x9c];
    let n = raw.len();
    let mut out = Vec::with_capacity(n);
    while n - out.len() >= 2 {
        let at = out.len();
        let len = (usize::from(raw[at]) % 128).min(n - at - 2);
        out.push(TAGS[usize::from(raw[at + 1]) % TAGS.len()]);
        out.push(len as u8);
        out.extend_from_slice(&raw[at + 2..at + 2 + len]);
    }
    out.resize(n, 0);
    out
}

/// A valid message of `dialect`: random MTI digits and a random set of fields 2..=128.
fn message(dialect: &'static Dialect, shape: Shape) -> impl Strategy<Value = Generated> {
    let mti = prop::array::uniform4(b'0'..=b'9');
    let numbers = prop::collection::btree_set(2u8..=128, 0..=shape.fields_max);
    (mti, numbers).prop_flat_map(move |(mti, numbers)| {
        let values: Vec<_> = numbers
            .into_iter()
            .map(|n| {
                let spec = dialect
                    .field(n)
                    .unwrap_or_else(|| panic!("field {n} undefined"));
                value(spec, shape).prop_map(move |v| (n, v))
            })
            .collect();
        values.prop_map(move |fields| Generated {
            mti: Mti(mti),
            fields,
        })
    })
}

/// One edit of an encoded message.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        (any::<Index>(), any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        if let Mutation::Insert(_, b) = *m {
            bytes.push(b);
        }
        return;
    }
    match *m {
        Mutation::Flip(ref at, mask) => {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        Mutation::Set(ref at, b) => {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        Mutation::Insert(ref at, b) => {
            let i = at.index(bytes.len() + 1);
            bytes.insert(i, b);
        }
        Mutation::Delete(ref at) => {
            bytes.remove(at.index(bytes.len()));
        }
        Mutation::Truncate(ref at) => bytes.truncate(at.index(bytes.len())),
    }
}

/// Four MTI digits and a sparse primary bitmap, then mostly digits: gets random
/// input past the header checks and into field decoding.
fn plausible_header_then_noise(dialect: &'static Dialect) -> impl Strategy<Value = Vec<u8>> {
    let hex = dialect.bitmap_encoding() == BitmapEncoding::Hex;
    let bits = prop::collection::btree_set(1u8..=64, 0..=6);
    let noise = prop::collection::vec(prop_oneof![3 => b'0'..=b'9', 1 => any::<u8>()], 0..=600);
    (prop::array::uniform4(b'0'..=b'9'), bits, noise).prop_map(move |(mti, bits, noise)| {
        let bitmap = bits
            .iter()
            .fold(0u64, |map, &n| map | 1 << (64 - u32::from(n)));
        let bitmap = if hex {
            format!("{bitmap:016X}").into_bytes()
        } else {
            bitmap.to_be_bytes().to_vec()
        };
        [&mti[..], &bitmap, &noise].concat()
    })
}

// === helpers ===

fn fail(what: &str, e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("{what}: {e}"))
}

fn encode(d: &Dialect, g: &Generated) -> Result<Bytes, TestCaseError> {
    let mut out = BytesMut::new();
    let mut enc = Encoder::new(d, &mut out, g.mti);
    for (n, v) in &g.fields {
        enc.field(*n, v).map_err(|e| fail("encode", e))?;
    }
    let len = enc.finish();
    prop_assert_eq!(len, out.len());
    Ok(out.freeze())
}

/// Wire size the dialect implies for `g`.
fn expected_size(d: &Dialect, g: &Generated) -> usize {
    let bitmaps = if g.fields.iter().any(|&(n, _)| n > 64) {
        2
    } else {
        1
    };
    let fields: usize = g
        .fields
        .iter()
        .map(|(n, v)| d.field(*n).map_or(0, |s| s.length.prefix_digits()) + v.len())
        .sum();
    4 + bitmaps * d.bitmap_encoding().wire_len() + fields
}

fn decoded_fields(msg: &Message) -> Vec<(u8, Vec<u8>)> {
    msg.fields().map(|(n, v)| (n, v.to_vec())).collect()
}

/// Field values as bytes, whatever the dialect's encoding (hex decoded), for
/// comparing a message across dialects.
fn binary_values(d: &Dialect, fields: &[(u8, Vec<u8>)]) -> Vec<(u8, Vec<u8>)> {
    let unhex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
    fields
        .iter()
        .map(|(n, v)| match d.field(*n).map(|s| s.encoding) {
            Some(Encoding::Hex) => (
                *n,
                v.chunks(2)
                    .map(|p| unhex(p[0]) << 4 | unhex(p[1]))
                    .collect(),
            ),
            _ => (*n, v.clone()),
        })
        .collect()
}

fn other(d: &'static Dialect) -> &'static Dialect {
    if std::ptr::eq(d, iso87_ascii()) {
        iso87_hexbitmap()
    } else {
        iso87_ascii()
    }
}

// === properties ===

/// (a) Encode, decode: same MTI and fields; encode the decoded values again, and
/// re-encode the message: the same bytes.
fn round_trip(d: &Dialect, g: &Generated) -> Result<(), TestCaseError> {
    let wire = encode(d, g)?;
    prop_assert_eq!(wire.len(), expected_size(d, g));
    let msg = Message::decode(d, wire.clone()).map_err(|e| fail("decode", e))?;
    prop_assert_eq!(msg.mti(), g.mti);
    prop_assert_eq!(&decoded_fields(&msg), &g.fields);
    prop_assert_eq!(msg.has(1), g.fields.iter().any(|&(n, _)| n > 64));
    for n in 2..=128u8 {
        let want = g.fields.iter().find(|(m, _)| *m == n).map(|(_, v)| &v[..]);
        prop_assert_eq!(msg.field(n), want, "field {}", n);
        let shared = msg.field_bytes(n);
        prop_assert_eq!(shared.as_deref(), want, "field {}", n);
    }
    let again = encode(
        d,
        &Generated {
            mti: msg.mti(),
            fields: decoded_fields(&msg),
        },
    )?;
    prop_assert_eq!(&again[..], &wire[..]);
    let mut out = BytesMut::new();
    reencode(&msg, d, d, msg.mti(), &[], &mut out).map_err(|e| fail("reencode", e))?;
    prop_assert_eq!(&out[..], &wire[..]);
    Ok(())
}

/// (c) Every proper prefix of a valid message is `Truncated` at the end of the
/// input (the prefix parses exactly as the whole until it runs out), and the fields
/// decoded before that are the message's first fields.
fn truncation(d: &Dialect, g: &Generated, cut: &Index) -> Result<(), TestCaseError> {
    let wire = encode(d, g)?;
    let cut = cut.index(wire.len());
    let input = wire.slice(..cut);
    let (msg, err) = Message::decode_partial(d, input.clone());
    fuzz_checks::check_partial(d, &input, &msg, err.as_ref());
    let Some(err) = err else {
        return Err(TestCaseError::fail(format!(
            "prefix of {cut} bytes decoded as whole"
        )));
    };
    let DecodeErrorKind::Truncated { available, .. } = err.kind else {
        return Err(TestCaseError::fail(format!(
            "prefix of {cut} bytes: {err:?}"
        )));
    };
    prop_assert_eq!(err.offset + available, cut);
    let partial = decoded_fields(&msg);
    prop_assert_eq!(&partial[..], &g.fields[..partial.len()]);
    Ok(())
}

/// (c) A byte outside its field's character class is reported as that field, at
/// that offset, with that byte; the fields before it are decoded.
fn corruption(d: &Dialect, g: &Generated, pick: &Index, at: &Index) -> Result<(), TestCaseError> {
    let wire = encode(d, g)?;
    let msg = Message::decode(d, wire.clone()).map_err(|e| fail("decode", e))?;
    let candidates: Vec<u8> = g
        .fields
        .iter()
        .map(|&(n, _)| n)
        .filter(|&n| d.field(n).is_some_and(|s| s.encoding != Encoding::Binary))
        .collect();
    if candidates.is_empty() {
        return Ok(());
    }
    let n = candidates[pick.index(candidates.len())];
    let span = msg.span(n).ok_or_else(|| fail("span", n))?;
    let offset = usize::from(span.start) + at.index(usize::from(span.len));
    let mut bad = wire.to_vec();
    bad[offset] = 0x01; // control character: in no character class, not hex
    let (partial, err) = Message::decode_partial(d, bad.clone().into());
    fuzz_checks::check_partial(d, &bad, &partial, err.as_ref());
    let err = err.ok_or_else(|| fail("corrupted field decoded", n))?;
    prop_assert_eq!(err.location, Location::Field(n));
    prop_assert_eq!(err.offset, offset);
    let expected_kind = match d.field(n).map(|s| (s.encoding, s.ty)) {
        Some((Encoding::Hex, _)) => DecodeErrorKind::BadHex { found: 0x01 },
        Some((_, ty)) => DecodeErrorKind::BadCharacter {
            expected: ty,
            found: 0x01,
        },
        None => return Err(fail("undefined field", n)),
    };
    prop_assert_eq!(err.kind, expected_kind);
    let before: Vec<_> = g
        .fields
        .iter()
        .take_while(|(m, _)| *m < n)
        .cloned()
        .collect();
    prop_assert_eq!(decoded_fields(&partial), before);
    Ok(())
}

/// (d) A stream of framed messages fed in arbitrary chunks yields the messages.
fn framing(
    d: &Dialect,
    messages: &[Generated],
    chunk_sizes: &[usize],
) -> Result<(), TestCaseError> {
    let wires: Vec<Bytes> = messages
        .iter()
        .map(|g| encode(d, g))
        .collect::<Result<_, _>>()?;
    for framing in [Framing::U16be, Framing::Ascii4] {
        let mut stream = BytesMut::new();
        for w in &wires {
            framing
                .write(&mut stream, w)
                .map_err(|e| fail("frame", e))?;
        }
        let dec = FrameDecoder::new(framing, FRAME_SIZE_MAX_BYTES_DEFAULT);
        let run = fuzz_checks::run_frames(&dec, &stream, chunk_sizes);
        prop_assert_eq!(run.error, None);
        prop_assert_eq!(run.leftover_bytes, 0);
        prop_assert_eq!(&run.frames, &wires);
        for (frame, g) in run.frames.iter().zip(messages) {
            let msg = Message::decode(d, frame.clone()).map_err(|e| fail("decode", e))?;
            prop_assert_eq!(msg.mti(), g.mti);
            prop_assert_eq!(decoded_fields(&msg), g.fields.clone());
        }
    }
    Ok(())
}

/// (e) Re-encoding into the other dialect and back keeps every field value; hex
/// values come back in uppercase.
fn translation(d: &'static Dialect, g: &Generated) -> Result<(), TestCaseError> {
    let there = other(d);
    let msg = Message::decode(d, encode(d, g)?).map_err(|e| fail("decode", e))?;
    let mut out = BytesMut::new();
    reencode(&msg, d, there, g.mti, &[], &mut out).map_err(|e| fail("reencode there", e))?;
    let away = Message::decode(there, out.freeze()).map_err(|e| fail("decode there", e))?;
    prop_assert_eq!(away.mti(), g.mti);
    let values = binary_values(d, &g.fields);
    prop_assert_eq!(binary_values(there, &decoded_fields(&away)), values.clone());
    let mut out = BytesMut::new();
    reencode(&away, there, d, g.mti, &[], &mut out).map_err(|e| fail("reencode back", e))?;
    let back = Message::decode(d, out.clone().freeze()).map_err(|e| fail("decode back", e))?;
    prop_assert_eq!(binary_values(d, &decoded_fields(&back)), values);
    let mut upper = g.clone();
    for (n, v) in &mut upper.fields {
        if d.field(*n).is_some_and(|s| s.encoding == Encoding::Hex) {
            v.make_ascii_uppercase();
        }
    }
    prop_assert_eq!(&out[..], &encode(d, &upper)?[..]);
    Ok(())
}

/// (e) The forward path: a new MTI, a new STAN and a removed field give the message
/// the encoder would write for those values directly.
fn forward_changes(
    d: &Dialect,
    g: &Generated,
    mti: [u8; 4],
    stan: &[u8],
    remove: &Index,
) -> Result<(), TestCaseError> {
    let msg = Message::decode(d, encode(d, g)?).map_err(|e| fail("decode", e))?;
    let removed = if g.fields.is_empty() {
        2
    } else {
        g.fields[remove.index(g.fields.len())].0
    };
    let mut out = BytesMut::from(&b"prefix"[..]);
    let changes = [Change::Set(11, stan), Change::Remove(removed)];
    reencode(&msg, d, d, Mti(mti), &changes, &mut out).map_err(|e| fail("reencode", e))?;
    prop_assert_eq!(&out[..6], b"prefix", "reencode appends");
    let mut fields: Vec<(u8, Vec<u8>)> = g
        .fields
        .iter()
        .filter(|(n, _)| *n != 11 && *n != removed)
        .cloned()
        .collect();
    if removed != 11 {
        fields.push((11, stan.to_vec()));
        fields.sort_by_key(|&(n, _)| n);
    }
    let expected = encode(
        d,
        &Generated {
            mti: Mti(mti),
            fields,
        },
    )?;
    prop_assert_eq!(&out[6..], &expected[..]);
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    // --- (a) round trip ---

    #[test]
    fn round_trip_iso87_ascii(g in message(iso87_ascii(), WIDE)) {
        round_trip(iso87_ascii(), &g)?;
    }

    #[test]
    fn round_trip_iso87_hexbitmap(g in message(iso87_hexbitmap(), WIDE)) {
        round_trip(iso87_hexbitmap(), &g)?;
    }

    // --- (b) decode never panics, never reads past the input ---

    #[test]
    fn random_bytes_decode_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..=600)) {
        fuzz_checks::check_decode(iso87_ascii(), &bytes);
        fuzz_checks::check_decode(iso87_hexbitmap(), &bytes);
    }

    #[test]
    fn noise_after_header_iso87_ascii(bytes in plausible_header_then_noise(iso87_ascii())) {
        fuzz_checks::check_decode(iso87_ascii(), &bytes);
    }

    #[test]
    fn noise_after_header_iso87_hexbitmap(
        bytes in plausible_header_then_noise(iso87_hexbitmap()),
    ) {
        fuzz_checks::check_decode(iso87_hexbitmap(), &bytes);
    }

    #[test]
    fn mutated_iso87_ascii(
        g in message(iso87_ascii(), SMALL),
        edits in prop::collection::vec(mutation(), 1..=3),
    ) {
        let mut bytes = encode(iso87_ascii(), &g)?.to_vec();
        edits.iter().for_each(|m| mutate(&mut bytes, m));
        fuzz_checks::check_decode(iso87_ascii(), &bytes);
    }

    #[test]
    fn mutated_iso87_hexbitmap(
        g in message(iso87_hexbitmap(), SMALL),
        edits in prop::collection::vec(mutation(), 1..=3),
    ) {
        let mut bytes = encode(iso87_hexbitmap(), &g)?.to_vec();
        edits.iter().for_each(|m| mutate(&mut bytes, m));
        fuzz_checks::check_decode(iso87_hexbitmap(), &bytes);
    }

    // --- (c) errors point inside the input; truncation is never success ---

    #[test]
    fn truncated_iso87_ascii(g in message(iso87_ascii(), SMALL), cut in any::<Index>()) {
        truncation(iso87_ascii(), &g, &cut)?;
    }

    #[test]
    fn truncated_iso87_hexbitmap(g in message(iso87_hexbitmap(), SMALL), cut in any::<Index>()) {
        truncation(iso87_hexbitmap(), &g, &cut)?;
    }

    #[test]
    fn corrupted_iso87_ascii(
        g in message(iso87_ascii(), SMALL),
        pick in any::<Index>(),
        at in any::<Index>(),
    ) {
        corruption(iso87_ascii(), &g, &pick, &at)?;
    }

    #[test]
    fn corrupted_iso87_hexbitmap(
        g in message(iso87_hexbitmap(), SMALL),
        pick in any::<Index>(),
        at in any::<Index>(),
    ) {
        corruption(iso87_hexbitmap(), &g, &pick, &at)?;
    }

    // --- (d) framing ---

    #[test]
    fn framed_stream_iso87_ascii(
        messages in prop::collection::vec(message(iso87_ascii(), SMALL), 1..=5),
        chunk_sizes in prop::collection::vec(1usize..=64, 1..=16),
    ) {
        framing(iso87_ascii(), &messages, &chunk_sizes)?;
    }

    #[test]
    fn framed_stream_iso87_hexbitmap(
        messages in prop::collection::vec(message(iso87_hexbitmap(), SMALL), 1..=5),
        chunk_sizes in prop::collection::vec(1usize..=64, 1..=16),
    ) {
        framing(iso87_hexbitmap(), &messages, &chunk_sizes)?;
    }

    #[test]
    fn frame_decoder_random_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..=600),
        chunk_sizes in prop::collection::vec(1usize..=64, 1..=16),
    ) {
        fuzz_checks::frame_decoder(&bytes);
        for framing in [Framing::U16be, Framing::Ascii4] {
            for bound in fuzz_checks::FRAME_BOUNDS_BYTES {
                let dec = FrameDecoder::new(framing, bound);
                let whole = fuzz_checks::run_frames(&dec, &bytes, &[]);
                let chunked = fuzz_checks::run_frames(&dec, &bytes, &chunk_sizes);
                prop_assert_eq!(whole, chunked);
            }
        }
    }

    // --- (e) dialect translation and the forward path ---

    #[test]
    fn translate_from_iso87_ascii(g in message(iso87_ascii(), WIDE)) {
        translation(iso87_ascii(), &g)?;
    }

    #[test]
    fn translate_from_iso87_hexbitmap(g in message(iso87_hexbitmap(), WIDE)) {
        translation(iso87_hexbitmap(), &g)?;
    }

    #[test]
    fn forward_changes_iso87_ascii(
        g in message(iso87_ascii(), SMALL),
        mti in prop::array::uniform4(b'0'..=b'9'),
        stan in prop::collection::vec(b'0'..=b'9', 6),
        remove in any::<Index>(),
    ) {
        forward_changes(iso87_ascii(), &g, mti, &stan, &remove)?;
    }

    #[test]
    fn forward_changes_iso87_hexbitmap(
        g in message(iso87_hexbitmap(), SMALL),
        mti in prop::array::uniform4(b'0'..=b'9'),
        stan in prop::collection::vec(b'0'..=b'9', 6),
        remove in any::<Index>(),
    ) {
        forward_changes(iso87_hexbitmap(), &g, mti, &stan, &remove)?;
    }
}

/// The generators produce only values their field definitions allow.
#[test]
fn generated_values_match_their_definitions() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    for d in [iso87_ascii(), iso87_hexbitmap()] {
        for n in 2..=128u8 {
            let Some(spec) = d.field(n) else { continue };
            for _ in 0..8 {
                let v = match value(spec, WIDE).new_tree(&mut runner) {
                    Ok(tree) => tree.current(),
                    Err(e) => panic!("field {n}: {e}"),
                };
                fuzz_checks::check_value(d, n, &v);
                assert!(
                    spec.length == LengthKind::Fixed || !v.is_empty(),
                    "field {n} empty"
                );
            }
        }
    }
}
