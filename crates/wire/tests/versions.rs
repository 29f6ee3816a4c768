//! ISO 8583:1993 dialects through the public API: a 1987 message encoded under
//! `iso93-ascii` / `iso93-binary` is a 1993 message on the wire (checked field by
//! field under the untranslated dialect), and decodes back to the same 1987
//! message; what has no counterpart is refused in requests and dropped in answers.

use bytes::{Bytes, BytesMut};
use switchyard_wire::{
    reencode, Change, DecodeErrorKind, Dialect, EncodeErrorKind, Encoder, Location, Message, Mti,
    Untranslatable, Version,
};

fn encode(d: &Dialect, mti: &[u8; 4], fields: &[(u8, &[u8])]) -> Bytes {
    let mut out = BytesMut::new();
    let mut enc = Encoder::new(d, &mut out, Mti(*mti));
    for (n, v) in fields {
        enc.field(*n, v).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(enc.finish() > 0, "translated");
    out.freeze()
}

fn purchase() -> Vec<(u8, &'static [u8])> {
    vec![
        (2, b"4111111111111111"),
        (3, b"000000"),
        (4, b"000000001000"),
        (7, b"1130120000"),
        (11, b"000042"),
        (12, b"120000"),
        (13, b"1130"),
        (24, b"001"), // the NII: left out
        (32, b"100001"),
        (37, b"532912000001"),
        (41, b"TERM0001"),
        (42, b"MERCHANT0000001"),
        (49, b"978"),
    ]
}

#[test]
fn a_1987_purchase_is_a_1993_purchase_on_the_wire_and_back() {
    for name in ["iso93-ascii", "iso93-binary"] {
        let d = Dialect::builtin(name).unwrap();
        assert_eq!(d.version(), Version::Iso1993);
        let plain = d.untranslated();
        let wire = encode(&d, b"0200", &purchase());
        let m93 = Message::decode(&plain, wire.clone()).unwrap();
        assert_eq!(m93.mti(), Mti(*b"1200"), "{name}");
        let de12 = m93.field(12).unwrap();
        assert_eq!(de12.len(), 12);
        assert_eq!(&de12[2..], b"1130120000", "{name}: YY MMDD hhmmss");
        assert_eq!(m93.field(24), Some(&b"200"[..]), "function code");
        assert!(!m93.has(13), "1993 DE13 is the effective date: not set");
        assert_eq!(m93.field(2), Some(&b"4111111111111111"[..]));
        let back = Message::decode(&d, wire).unwrap();
        assert_eq!(back.mti(), Mti::FINANCIAL);
        for (n, v) in purchase() {
            if n != 24 {
                assert_eq!(back.field(n), Some(v), "{name}: field {n}");
            }
        }
        assert!(!back.has(24), "no NII and no function code in 1987");
    }
}

#[test]
fn answers_echo_and_reversals_translate() {
    let d = Dialect::builtin("iso93-ascii").unwrap();
    let plain = d.untranslated();
    // A decline in 1987 is 116 in 1993, and back.
    let mut answer = purchase();
    answer.retain(|(n, _)| *n != 24);
    answer.push((39, b"51"));
    answer.sort_by_key(|(n, _)| *n);
    let wire = encode(&d, b"0210", &answer);
    let m93 = Message::decode(&plain, wire.clone()).unwrap();
    assert_eq!(m93.mti(), Mti(*b"1210"));
    assert_eq!(m93.field(39), Some(&b"116"[..]));
    assert!(!m93.has(24), "no function code in an answer");
    assert_eq!(
        Message::decode(&d, wire).unwrap().field(39),
        Some(&b"51"[..])
    );
    // Echo: 0800 DE70 301 is 1804 DE24 831; its answer 1814 800.
    let wire = encode(
        &d,
        b"0800",
        &[(7, b"1130120000"), (11, b"000007"), (70, b"301")],
    );
    let m93 = Message::decode(&plain, wire.clone()).unwrap();
    assert_eq!(m93.mti(), Mti(*b"1804"));
    assert_eq!(m93.field(24), Some(&b"831"[..]));
    assert!(!m93.has(70), "1993 DE70 is a country code");
    let back = Message::decode(&d, wire).unwrap();
    assert_eq!(
        (back.mti(), back.field(70)),
        (Mti::NETWORK, Some(&b"301"[..]))
    );
    let wire = encode(
        &d,
        b"0810",
        &[
            (7, b"1130120000"),
            (11, b"000007"),
            (39, b"00"),
            (70, b"301"),
        ],
    );
    let m93 = Message::decode(&plain, wire).unwrap();
    assert_eq!(m93.mti(), Mti(*b"1814"));
    assert_eq!(m93.field(39), Some(&b"800"[..]));
    // Reversal advice: DE90 is DE56 (the original's local date and time, from the
    // advice's DE13 + DE12), DE24 400, DE39 68 is 911.
    let de90 = b"020000004211301200000000010000100000000000";
    let mut advice = purchase();
    advice.retain(|(n, _)| *n != 24);
    advice.extend([(39u8, &b"68"[..]), (90, &de90[..])]);
    advice.sort_by_key(|(n, _)| *n);
    let wire = encode(&d, b"0420", &advice);
    let m93 = Message::decode(&plain, wire.clone()).unwrap();
    assert_eq!(m93.mti(), Mti(*b"1420"));
    assert_eq!(m93.field(24), Some(&b"400"[..]));
    assert_eq!(m93.field(39), Some(&b"911"[..]));
    let de56 = m93.field(56).unwrap();
    assert_eq!(&de56[..10], b"1200000042");
    assert_eq!(&de56[12..22], b"1130120000");
    assert!(de56.ends_with(b"06100001"), "LL + acquirer");
    let back = Message::decode(&d, wire).unwrap();
    assert_eq!(back.field(90), Some(&de90[..]));
    assert_eq!(back.mti(), Mti::REVERSAL_ADVICE);
}

#[test]
fn a_request_with_a_field_of_another_meaning_is_refused() {
    let d = Dialect::builtin("iso93-ascii").unwrap();
    // 1987 → 1993: DE22 (POS entry mode n3; in 1993 the POS data code an12).
    let mut fields = purchase();
    fields.push((22, b"051"));
    fields.sort_by_key(|(n, _)| *n);
    let mut out = BytesMut::new();
    let mut enc = Encoder::new(&d, &mut out, Mti::FINANCIAL);
    for (n, v) in &fields {
        enc.field(*n, v).unwrap();
    }
    assert_eq!(enc.finish(), 0, "refused");
    let a = Dialect::iso87_ascii();
    let msg = Message::decode(&a, encode(&a, b"0200", &fields)).unwrap();
    let e = reencode(
        &msg,
        &a,
        &d,
        Mti::FINANCIAL,
        &[Change::Set(11, b"000001")],
        &mut out,
    )
    .unwrap_err();
    assert_eq!(e.field, 22);
    assert_eq!(
        e.kind,
        EncodeErrorKind::Untranslatable(Untranslatable::NoCounterpart {
            into: Version::Iso1993
        })
    );
    assert!(e.to_string().contains("ISO 8583:1993"), "{e}");
    // 1993 → 1987: DE22 an12 in a 1200; the partial message still has DE11.
    let plain = d.untranslated();
    let wire = encode(
        &plain,
        b"1200",
        &[
            (3, b"000000"),
            (4, b"000000001000"),
            (11, b"000042"),
            (22, b"A10101A5500C"),
        ],
    );
    let (msg, e) = Message::decode_partial(&d, wire);
    let e = e.expect("refused");
    assert_eq!(e.location, Location::Field(22));
    assert!(matches!(e.kind, DecodeErrorKind::Untranslatable(_)));
    assert_eq!(
        msg.field(11),
        Some(&b"000042"[..]),
        "DE11 for the 30 answer"
    );
    // In an answer the field is dropped.
    let wire = encode(
        &plain,
        b"1210",
        &[(11, b"000042"), (22, b"A10101A5500C"), (39, b"000")],
    );
    let msg = Message::decode(&d, wire).unwrap();
    assert!(!msg.has(22));
    assert_eq!(msg.field(39), Some(&b"00"[..]));
}

#[test]
fn both_1993_dialects_share_the_1987_held_form() {
    let a = Dialect::iso87_ascii();
    for name in ["iso93-ascii", "iso93-binary"] {
        let d = Dialect::builtin(name).unwrap();
        assert_eq!(d.canonical().fingerprint(), a.fingerprint(), "{name}");
        assert_ne!(d.fingerprint(), a.fingerprint(), "{name}");
        assert_ne!(d.untranslated().fingerprint(), a.fingerprint(), "{name}");
    }
    let e = Dialect::from_toml(
        &switchyard_wire::BUILTIN_DIALECTS[0].1.replace(
            "length_prefix_encoding = \"ascii\"",
            "length_prefix_encoding = \"ascii\"\naction_codes = \"x.toml\"",
        ),
        "t",
    )
    .unwrap_err();
    assert!(e.to_string().contains("1993"), "{e}");
}
