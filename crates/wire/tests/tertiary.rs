//! Tertiary bitmaps (fields 129..=192): a dialect with `tertiary_bitmap = true`
//! reads a third bitmap right after the secondary when bit 65 is set (the layout
//! jPOS uses for a 24-byte bitmap); field 65 is then that bitmap, not data.
//! Round trips in ASCII and BCD, conversion between them, truncation and
//! corruption, and the jPOS mapping.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use switchyard_wire::fuzzing as fuzz_checks;
use switchyard_wire::{
    reencode, DecodeErrorKind, Dialect, EncodeErrorKind, Encoder, FieldType, LengthKind, Location,
    Message, Mti, BUILTIN_DIALECTS,
};

fn ascii() -> &'static Dialect {
    static D: std::sync::OnceLock<Dialect> = std::sync::OnceLock::new();
    D.get_or_init(|| fuzz_checks::tertiary_dialect("iso87-ascii", "ascii"))
}

fn bcd() -> &'static Dialect {
    fuzz_checks::tertiary_binary()
}

fn encode(d: &Dialect, mti: Mti, fields: &[(u8, Vec<u8>)]) -> Bytes {
    let mut out = BytesMut::new();
    let mut enc = Encoder::new(d, &mut out, mti);
    for (n, v) in fields {
        enc.field(*n, v).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(enc.finish() > 0);
    out.freeze()
}

fn sample() -> Vec<(u8, Vec<u8>)> {
    vec![
        (2, b"4111111111111111".to_vec()),
        (11, b"000042".to_vec()),
        (70, b"301".to_vec()),
        (100, b"200001".to_vec()),
        (130, b"private text".to_vec()),
        (191, b"12345".to_vec()),
        (192, b"last".to_vec()),
    ]
}

#[test]
fn three_bitmaps_then_the_fields() {
    let d = ascii();
    assert!(d.tertiary_bitmap());
    let wire = encode(d, Mti::NETWORK, &sample());
    // MTI, then primary, secondary and tertiary bitmaps back to back.
    assert_eq!(&wire[..4], b"0800");
    assert_eq!(wire[4] & 0x80, 0x80, "bit 1: secondary present");
    assert_eq!(wire[12] & 0x80, 0x80, "bit 65: tertiary present");
    let tertiary = u64::from_be_bytes(wire[20..28].try_into().unwrap());
    assert_eq!(
        tertiary,
        1 << (192 - 130) | 1 << (192 - 191) | 1 << (192 - 192)
    );
    let msg = Message::decode(d, wire.clone()).unwrap();
    assert!(msg.has_tertiary_bitmap());
    let got: Vec<(u8, Vec<u8>)> = msg.fields().map(|(n, v)| (n, v.to_vec())).collect();
    assert_eq!(got, sample(), "field 65 (the bitmap) is not data");
    assert_eq!(msg.field(65), Some(&wire[20..28]));
    assert_eq!(msg.field(192), Some(&b"last"[..]));
    assert!(!msg.has(129) && !msg.has(193));
    // Without fields above 128 nothing changes: no tertiary bitmap, bit 65 clear,
    // the same bytes as the dialect without one.
    let low: Vec<_> = sample().into_iter().filter(|(n, _)| *n <= 128).collect();
    let plain = Dialect::iso87_ascii();
    assert_eq!(
        encode(d, Mti::NETWORK, &low),
        encode(&plain, Mti::NETWORK, &low)
    );
    // Only a field above 128: the secondary bitmap carries bit 65 alone.
    let high = encode(d, Mti::NETWORK, &[(130, b"x".to_vec())]);
    assert_eq!(high.len(), 4 + 24 + 3 + 1);
    assert_eq!(&high[12..20], &(1u64 << 63).to_be_bytes());
}

#[test]
fn converted_between_ascii_and_bcd_and_back() {
    let wire = encode(ascii(), Mti::NETWORK, &sample());
    let msg = Message::decode(ascii(), wire.clone()).unwrap();
    let mut bcd_wire = BytesMut::new();
    reencode(&msg, ascii(), bcd(), msg.mti(), &[], &mut bcd_wire).unwrap();
    assert_eq!(&bcd_wire[..2], &[0x08, 0x00], "BCD MTI");
    let in_bcd = Message::decode(bcd(), bcd_wire.freeze()).unwrap();
    assert!(in_bcd.has_tertiary_bitmap());
    assert!(in_bcd.fields().eq(msg.fields()), "the same values");
    let mut back = BytesMut::new();
    reencode(&in_bcd, bcd(), ascii(), in_bcd.mti(), &[], &mut back).unwrap();
    assert_eq!(&back[..], &wire[..]);
    // A dialect without a tertiary bitmap cannot carry field 130: named.
    let mut out = BytesMut::new();
    let e = reencode(
        &msg,
        ascii(),
        &Dialect::iso87_ascii(),
        msg.mti(),
        &[],
        &mut out,
    )
    .unwrap_err();
    assert_eq!((e.field, e.kind), (130, EncodeErrorKind::UndefinedField));
}

#[test]
fn field_65_is_the_bitmap_and_fields_above_128_need_one() {
    let mut out = BytesMut::new();
    let mut enc = Encoder::new(ascii(), &mut out, Mti::NETWORK);
    let e = enc.field(65, &[0; 8]).unwrap_err();
    assert_eq!(e.kind, EncodeErrorKind::UndefinedField);
    let (_, text) = BUILTIN_DIALECTS[0];
    let with_130 = format!(
        "{text}\n[[field]]\nnumber = 130\nname = \"x\"\ntype = \"n\"\nlength = \"fixed\"\nmax = 1\nencoding = \"ascii\"\n"
    );
    let e = Dialect::from_toml(&with_130, "t").unwrap_err().to_string();
    assert!(
        e.contains("field 130") && e.contains("tertiary_bitmap"),
        "{e}"
    );
    // A tertiary bitmap cut short is an error at field 65, pointing at the end.
    let wire = encode(ascii(), Mti::NETWORK, &sample());
    let (msg, e) = Message::decode_partial(ascii(), wire.slice(..24));
    let e = e.expect("truncated");
    assert_eq!(e.location, Location::Field(65));
    assert!(matches!(e.kind, DecodeErrorKind::Truncated { .. }));
    assert!(msg.fields().next().is_none());
}

#[test]
fn a_jpos_bitmap_of_24_bytes_brings_a_tertiary_bitmap() {
    let xml = r#"<?xml version="1.0"?>
<isopackager>
  <isofield id="0" length="4" name="MTI" class="org.jpos.iso.IFB_NUMERIC"/>
  <isofield id="1" length="24" name="BITMAP" class="org.jpos.iso.IFB_BITMAP"/>
  <isofield id="11" length="6" name="STAN" class="org.jpos.iso.IFB_NUMERIC"/>
  <isofield id="65" length="8" name="TERTIARY" class="org.jpos.iso.IFB_BINARY"/>
  <isofield id="70" length="3" name="NMIC" class="org.jpos.iso.IFB_NUMERIC"/>
  <isofield id="150" length="99" name="PRIVATE" class="org.jpos.iso.IFB_LLCHAR"/>
</isopackager>"#;
    let d = Dialect::from_jpos_xml(xml, "t.xml").unwrap();
    assert!(d.tertiary_bitmap());
    let fields = vec![
        (11, b"000001".to_vec()),
        (70, b"301".to_vec()),
        (150, b"ok".to_vec()),
    ];
    let msg = Message::decode(&d, encode(&d, Mti::NETWORK, &fields)).unwrap();
    let got: Vec<(u8, Vec<u8>)> = msg.fields().map(|(n, v)| (n, v.to_vec())).collect();
    assert_eq!(got, fields);
}

/// A value for field `n` of `d`: digits or text, within its length rule.
fn value(d: &Dialect, n: u8, seed: u32) -> Vec<u8> {
    let spec = d.field(n).expect("defined");
    let len = match spec.length {
        LengthKind::Fixed => usize::from(spec.max),
        _ => (seed as usize % usize::from(spec.max).min(24)) + 1,
    };
    (0..len)
        .map(|i| {
            let k = (seed as usize + i * 7) % 10;
            match spec.ty {
                FieldType::B => (seed as usize + i * 31) as u8,
                FieldType::Ans | FieldType::An | FieldType::As | FieldType::A => b'A' + k as u8,
                _ => b'0' + k as u8,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any set of fields 2..=192 (not 65): encoded in ASCII it decodes to the
    /// same values, converts to BCD and back to the same bytes, and every prefix
    /// decodes partially with the promises of `check_partial`.
    #[test]
    fn any_field_set_round_trips(
        numbers in prop::collection::btree_set((2u8..=192).prop_filter("65 is the bitmap", |n| *n != 65), 0..24),
        seed in any::<u32>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let d = ascii();
        let fields: Vec<(u8, Vec<u8>)> = numbers
            .iter()
            .filter(|n| d.field(**n).is_some_and(|s| (s.ty != FieldType::B || **n == 52) && s.ty != FieldType::XN))
            .map(|&n| (n, value(d, n, seed.wrapping_add(u32::from(n)))))
            .filter(|(n, _)| !matches!(*n, 55)) // BER-checked: not random text
            .collect();
        let wire = encode(d, Mti::FINANCIAL, &fields);
        let msg = Message::decode(d, wire.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got: Vec<(u8, Vec<u8>)> = msg.fields().map(|(n, v)| (n, v.to_vec())).collect();
        prop_assert_eq!(&got, &fields);
        prop_assert_eq!(msg.has_tertiary_bitmap(), fields.iter().any(|(n, _)| *n > 128));
        let mut in_bcd = BytesMut::new();
        if reencode(&msg, d, bcd(), msg.mti(), &[], &mut in_bcd).is_ok() {
            let b = Message::decode(bcd(), in_bcd.freeze()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut back = BytesMut::new();
            reencode(&b, bcd(), d, b.mti(), &[], &mut back).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&back[..], &wire[..]);
        }
        let input = wire.slice(..cut.index(wire.len()));
        let (partial, err) = Message::decode_partial(d, input.clone());
        fuzz_checks::check_partial(d, &input, &partial, err.as_ref());
    }
}
