//! A jPOS GenericPackager XML file (`config/iso8583/example-jpos-packager.xml`,
//! written here, covering `IFA_`, `IFB_`, `IFE_`, `IFB_LLH*`, a binary bitmap and
//! a BER-TLV DE55) read as a dialect: every field it defines round-trips, at its
//! shortest and its longest; a class that does not map is an error naming it,
//! the field and the line.

use bytes::BytesMut;
use switchyard_wire::{
    Dialect, DialectError, Encoder, Encoding, FieldSpec, FieldType, LengthKind, Message, Mti,
};

fn example_path() -> String {
    format!(
        "{}/../../config/iso8583/example-jpos-packager.xml",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A value of `units` units for `spec`, as the switch holds it.
fn value(spec: &FieldSpec, units: usize, seed: usize) -> Vec<u8> {
    let digit = |i: usize| b'0' + ((i * 7 + seed) % 10) as u8;
    match (spec.ty, spec.encoding) {
        (FieldType::B, _) if spec.tlv.is_some() => {
            // Well-formed BER-TLV of exactly `units` bytes: one 9F02-style element.
            let mut v = vec![0x9f, 0x36];
            if units >= 4 + 0x80 {
                v.extend_from_slice(&[0x81, (units - 4) as u8]);
            } else {
                v.push((units - 3) as u8);
            }
            v.resize(units, 0x5a);
            v
        }
        (FieldType::B, Encoding::Hex) => (0..units)
            .flat_map(|i| format!("{:02X}", (i * 31 + seed) as u8).into_bytes())
            .collect(),
        (FieldType::B, _) => (0..units).map(|i| (i * 31 + seed) as u8).collect(),
        (FieldType::XN, _) => {
            let mut v = vec![b'C'];
            v.extend((1..units).map(digit));
            v
        }
        (FieldType::Z, _) => (0..units)
            .map(|i| if i == units / 2 { b'D' } else { digit(i) })
            .collect(),
        (FieldType::N, _) => (0..units).map(digit).collect(),
        _ => (0..units)
            .map(|i| b"ABC [x]^!|z 019"[(i + seed) % 15])
            .collect(),
    }
}

fn round_trip(d: &Dialect, longest: bool) {
    let mut fields = Vec::new();
    for n in 2..=128u8 {
        let Some(spec) = d.field(n) else { continue };
        let max = usize::from(spec.max);
        let units = match (spec.length, longest) {
            (LengthKind::Fixed, _) => max,
            (_, true) => max,
            // Odd where it can be: BCD pads the spare nibble.
            (_, false) if spec.tlv.is_some() => 3,
            (_, false) => max.min(3),
        };
        fields.push((n, value(spec, units, usize::from(n))));
    }
    let mut out = BytesMut::new();
    let mut enc = Encoder::new(d, &mut out, Mti::FINANCIAL);
    for (n, v) in &fields {
        enc.field(*n, v).unwrap_or_else(|e| panic!("encode: {e}"));
    }
    enc.finish();
    let msg = Message::decode(d, out.freeze()).unwrap_or_else(|e| panic!("decode: {e}"));
    let got: Vec<(u8, Vec<u8>)> = msg.fields().map(|(n, v)| (n, v.to_vec())).collect();
    assert_eq!(got, fields);
}

#[test]
fn the_example_packager_loads_and_every_field_round_trips() {
    let d = Dialect::load(&example_path()).expect("example packager loads");
    assert!(d.is_transcoded());
    assert_eq!(
        d.field(55).and_then(|f| f.tlv).map(|t| t.name()),
        Some("ber".into())
    );
    assert_eq!(d.field(35).map(|f| f.ty), Some(FieldType::Z));
    round_trip(&d, false);
    round_trip(&d, true);
}

#[test]
fn a_class_that_does_not_map_is_named_with_its_field_and_line() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let bad = text.replace(
        "length=\"76\" name=\"TRACK 1 DATA\" class=\"org.jpos.iso.IFA_LLCHAR\"",
        "length=\"76\" name=\"TRACK 1 DATA\" class=\"org.jpos.iso.IFA_LLLLCHAR\"",
    );
    let line = text
        .lines()
        .position(|l| l.contains("TRACK 1 DATA"))
        .unwrap() as u32
        + 1;
    match Dialect::from_jpos_xml(&bad, "x.xml") {
        Err(DialectError::Xml {
            line: l, problem, ..
        }) => {
            assert_eq!(l, line);
            assert!(
                problem.contains("field 45") && problem.contains("org.jpos.iso.IFA_LLLLCHAR"),
                "{problem}"
            );
        }
        other => panic!("{:?}", other.map(|d| d.name().to_owned())),
    }
    let err = Dialect::from_jpos_xml("<isopackager><isofield", "x.xml")
        .err()
        .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.starts_with("dialect x.xml: line 1: ")));
}
