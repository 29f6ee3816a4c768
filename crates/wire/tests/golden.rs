//! Golden vectors from pyiso8583, an independent ISO 8583 implementation
//! (`tests/vectors/*.json`, written by `tests/oracle/pyiso8583_vectors.py` from
//! the shipped dialect files): every message decodes to the values pyiso8583
//! encoded, and encoding those values gives pyiso8583's bytes exactly.
//! `tests/pyiso8583.rs` checks the committed vectors against the pinned
//! pyiso8583 itself, and our encoder's output against its decoder.

use bytes::BytesMut;
use switchyard_wire::{Dialect, Encoder, Encoding, FieldType, Message, Mti};

fn vectors(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/vectors/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A field's value as the switch holds it, from the vector's text.
fn value(d: &Dialect, n: u8, text: &str) -> Vec<u8> {
    let spec = d.field(n).expect("field defined");
    if spec.ty == FieldType::B && spec.encoding.value() == Encoding::Binary {
        unhex(text)
    } else {
        text.as_bytes().to_vec()
    }
}

fn check(name: &str) {
    // The layout as on the wire: a 1993 dialect without its translation.
    let d = Dialect::builtin(name)
        .expect("shipped dialect")
        .untranslated();
    let doc = vectors(name);
    let messages = doc["messages"].as_array().expect("messages");
    assert!(messages.len() >= 6, "{name}: vectors present");
    for m in messages {
        let title = m["name"].as_str().unwrap_or_default();
        let wire = unhex(m["wire"].as_str().expect("wire"));
        let fields = m["fields"].as_object().expect("fields");
        let mut expected: Vec<(u8, Vec<u8>)> = fields
            .iter()
            .filter(|(k, _)| *k != "t")
            .map(|(k, v)| {
                let n: u8 = k.parse().expect("field number");
                (n, value(&d, n, v.as_str().expect("text")))
            })
            .collect();
        expected.sort();
        let msg = Message::decode(&d, wire.clone().into())
            .unwrap_or_else(|e| panic!("{name}: {title}: {e}"));
        let mti = fields["t"].as_str().expect("mti").as_bytes();
        assert_eq!(&msg.mti().0[..], mti, "{name}: {title}: MTI");
        let got: Vec<(u8, Vec<u8>)> = msg.fields().map(|(n, v)| (n, v.to_vec())).collect();
        assert_eq!(got, expected, "{name}: {title}: decoded values");
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(&d, &mut out, Mti(mti.try_into().expect("4 digits")));
        for (n, v) in &expected {
            enc.field(*n, v)
                .unwrap_or_else(|e| panic!("{name}: {title}: {e}"));
        }
        enc.finish();
        assert_eq!(
            out.to_vec(),
            wire,
            "{name}: {title}: our encoding differs from pyiso8583's"
        );
    }
}

#[test]
fn iso87_ascii_matches_pyiso8583() {
    check("iso87-ascii");
}

#[test]
fn iso87_hexbitmap_matches_pyiso8583() {
    check("iso87-hexbitmap");
}

#[test]
fn iso87_binary_matches_pyiso8583() {
    check("iso87-binary");
}

#[test]
fn iso87_ebcdic_matches_pyiso8583() {
    check("iso87-ebcdic");
}

#[test]
fn iso93_ascii_matches_pyiso8583() {
    check("iso93-ascii");
}

#[test]
fn iso93_binary_matches_pyiso8583() {
    check("iso93-binary");
}
