//! Runs every file of the fuzz corpus (`fuzz/corpus/<target>/`) through the same
//! checks as the fuzz target of that name, so `cargo test` covers the committed
//! seeds and anything a fuzzing run added.
//!
//! The seeds themselves are written by `write_seed_corpus` (ignored; run it after a
//! change to [`seeds`]):
//! `cargo test -p switchyard-wire --test corpus -- --ignored write_seed_corpus`.

use switchyard_wire::corpus::{self as corpus_runner, Check};
use switchyard_wire::fuzzing as fuzz_checks;

use bytes::BytesMut;
use std::path::{Path, PathBuf};
use switchyard_wire::{Dialect, Encoder, Encoding, Framing, Mti};

/// Fuzz targets and their checks.
const TARGETS: [(&str, Check); 8] = [
    ("dialect_jpos_xml", fuzz_checks::dialect_jpos_xml),
    ("frame_decoder", fuzz_checks::frame_decoder),
    ("decode_iso87_ascii", fuzz_checks::decode_iso87_ascii),
    (
        "decode_iso87_hexbitmap",
        fuzz_checks::decode_iso87_hexbitmap,
    ),
    ("decode_iso87_binary", fuzz_checks::decode_iso87_binary),
    ("decode_iso87_ebcdic", fuzz_checks::decode_iso87_ebcdic),
    ("decode_iso93_binary", fuzz_checks::decode_iso93_binary),
    (
        "decode_tertiary_binary",
        fuzz_checks::decode_tertiary_binary,
    ),
];

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

fn run_target(target: &str) {
    corpus_runner::run_target(&corpus_dir(), &TARGETS, target);
}

#[test]
fn corpus_frame_decoder() {
    run_target("frame_decoder");
}

#[test]
fn corpus_decode_iso87_ascii() {
    run_target("decode_iso87_ascii");
}

#[test]
fn corpus_decode_iso87_hexbitmap() {
    run_target("decode_iso87_hexbitmap");
}

#[test]
fn corpus_dialect_jpos_xml() {
    run_target("dialect_jpos_xml");
}

#[test]
fn corpus_decode_iso87_binary() {
    run_target("decode_iso87_binary");
}

#[test]
fn corpus_decode_iso87_ebcdic() {
    run_target("decode_iso87_ebcdic");
}

#[test]
fn corpus_decode_tertiary_binary() {
    run_target("decode_tertiary_binary");
}

/// Seeds for the tertiary bitmap: the usual messages (no field above 128: no
/// third bitmap), and with fields 130, 191 and 192 behind one.
fn tertiary_seeds() -> Vec<(String, Vec<u8>)> {
    let d = fuzz_checks::tertiary_binary();
    let mut out = transcoded_seeds(d);
    let high = build(
        d,
        Mti::NETWORK,
        &[
            (11, b"000042"),
            (70, b"301"),
            (130, b"private text"),
            (191, b"12345"),
            (192, b"last"),
        ],
    );
    out.push(("0800-tertiary".to_owned(), high.clone()));
    out.push(("tertiary-truncated".to_owned(), high[..21].to_vec()));
    out
}

#[test]
fn corpus_decode_iso93_binary() {
    run_target("decode_iso93_binary");
}

/// The 1993 seeds: pyiso8583's golden vectors for `iso93-binary` (a purchase
/// with a 1993-only POS data code, answers, echo, a reversal advice naming its
/// original in DE56), a purchase without DE22 that translates, and broken forms.
fn iso93_seeds() -> Vec<(String, Vec<u8>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/iso93-binary.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("1993 vectors"))
            .expect("vectors parse");
    let unhex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    };
    let mut out: Vec<(String, Vec<u8>)> = doc["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            let name = m["name"].as_str().expect("name");
            let stem: String = name
                .split(',')
                .next()
                .unwrap_or(name)
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            (
                format!("vector-{stem}"),
                unhex(m["wire"].as_str().expect("wire")),
            )
        })
        .collect();
    // Written under the untranslated dialect with a fixed DE12: seeds do not
    // depend on today's date.
    let d = fuzz_checks::iso93_binary().untranslated();
    let purchase = build(
        &d,
        Mti(*b"1200"),
        &[
            (2, b"4111111111111111"),
            (3, b"000000"),
            (4, b"000000012345"),
            (7, b"0605113456"),
            (11, b"000123"),
            (12, b"260605123456"),
            (24, b"200"),
            (32, b"100001"),
            (37, b"515612000123"),
            (41, b"TERM0001"),
            (42, b"MERCHANT0000001"),
            (49, b"978"),
            (100, b"200001"),
        ],
    );
    out.push(("1200-translatable".to_owned(), purchase.clone()));
    out.push((
        "truncated".to_owned(),
        purchase[..purchase.len() - 3].to_vec(),
    ));
    out
}

/// The committed seeds are the ones [`seeds`] describes (fuzzing may add more files).
#[test]
fn seed_corpus_is_committed() {
    for (target, name, bytes) in seeds() {
        let path = corpus_dir().join(target).join(&name);
        let found = std::fs::read(&path).ok();
        assert!(
            found.as_deref() == Some(&bytes[..]),
            "{} missing or stale; run write_seed_corpus (see tests/corpus.rs)",
            path.display()
        );
    }
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing the seeds"]
fn write_seed_corpus() {
    for (target, name, bytes) in seeds() {
        let dir = corpus_dir().join(target);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let path = dir.join(&name);
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

// === seeds ===

/// Binary field values (written as hex under hex dialects).
const PIN_BLOCK: &[u8] = &[0x4f, 0x21, 0x9a, 0x07, 0xc3, 0x5e, 0x10, 0xb8];
const ICC_DATA: &[u8] = &[
    0x9f, 0x02, 0x06, 0x00, 0x00, 0x00, 0x01, 0x23, 0x45, 0x9f, 0x1a, 0x02, 0x09, 0x78, 0x5f, 0x2a,
    0x02, 0x09, 0x78, 0x9a, 0x03, 0x25, 0x06, 0x05, 0x9c, 0x01, 0x00,
];

type Fields = &'static [(u8, &'static [u8])];

const PURCHASE_0200: Fields = &[
    (2, b"4111111111111111"),
    (3, b"000000"),
    (4, b"000000012345"),
    (7, b"0605123456"),
    (11, b"000123"),
    (12, b"123456"),
    (13, b"0605"),
    (32, b"100001"),
    (37, b"515612000123"),
    (41, b"TERM0001"),
    (42, b"MERCHANT0000001"),
    (49, b"978"),
    (100, b"200001"),
];

const APPROVED_0210: Fields = &[
    (2, b"4111111111111111"),
    (3, b"000000"),
    (4, b"000000012345"),
    (7, b"0605123457"),
    (11, b"000123"),
    (37, b"515612000123"),
    (38, b"A1B2C3"),
    (39, b"00"),
    (41, b"TERM0001"),
    (49, b"978"),
    (100, b"200001"),
];

const ECHO_0800: Fields = &[(7, b"0605123458"), (11, b"000777"), (70, b"301")];

const CHIP_PIN_0100: Fields = &[
    (2, b"5500000000000004"),
    (3, b"000000"),
    (4, b"000000099900"),
    (11, b"000124"),
    (14, b"2512"),
    (22, b"051"),
    (23, b"001"),
    (35, b"5500000000000004=25121010000012345678"),
    (43, b"CORNER SHOP              LYON         FR"),
    (52, PIN_BLOCK),
    (55, ICC_DATA),
];

const REVERSAL_0420: Fields = &[
    (2, b"4111111111111111"),
    (3, b"000000"),
    (4, b"000000012345"),
    (11, b"000125"),
    (28, b"C00000050"),
    (39, b"68"),
    (90, b"020000012306051234560000010000100000000000"),
    (95, b"000000000000000000000000C00000000D00000000"),
    (102, b"FR7630006000011234567890189"),
];

/// Encodes a message; binary values are converted for hex dialects.
fn build(d: &Dialect, mti: Mti, fields: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut enc = Encoder::new(d, &mut out, mti);
    for &(n, value) in fields {
        let from = match d.field(n).map(|s| s.encoding) {
            Some(Encoding::Hex) => Encoding::Binary,
            _ => Encoding::Ascii,
        };
        if let Err(e) = enc.field_converted(n, value, from) {
            panic!("seed {mti} field {n}: {e}");
        }
    }
    enc.finish();
    out.to_vec()
}

/// Offset of field `n`'s value (after its length prefix) in an encoded message.
fn value_offset(d: &Dialect, message: &[u8], n: u8) -> usize {
    let msg = switchyard_wire::Message::decode(d, message.to_vec().into())
        .unwrap_or_else(|e| panic!("seed does not decode: {e}"));
    msg.span(n)
        .map(|s| usize::from(s.start))
        .unwrap_or_else(|| panic!("seed lacks field {n}"))
}

fn decode_seeds(d: &Dialect) -> Vec<(String, Vec<u8>)> {
    let purchase = build(d, Mti::FINANCIAL, PURCHASE_0200);
    let de2 = value_offset(d, &purchase, 2);
    let de4 = value_offset(d, &purchase, 4);
    let echo = build(d, Mti::NETWORK, ECHO_0800);
    let mut bad_prefix = purchase.clone();
    bad_prefix[de2 - 1] = b'x';
    let mut bad_amount = purchase.clone();
    bad_amount[de4 + 3] = b'O';
    let mut trailing = echo.clone();
    trailing.extend_from_slice(b"XYZ");
    let bitmap_width = d.bitmap_encoding().wire_len();
    // Announces a secondary bitmap that announces nothing: valid, not canonical.
    let mut empty_secondary = echo.clone();
    empty_secondary.truncate(4 + bitmap_width);
    let mut zero = vec![0u8; bitmap_width];
    if d.bitmap_encoding() == switchyard_wire::BitmapEncoding::Hex {
        zero.fill(b'0');
        empty_secondary[4] = b'A'; // 0x8 (field 1) | 0x2 (field 3)
        empty_secondary[5..4 + bitmap_width].fill(b'0');
        empty_secondary.extend_from_slice(&zero);
        empty_secondary.extend_from_slice(b"000000");
    } else {
        empty_secondary[4] = 0xa0; // field 1 and field 3
        empty_secondary[5..4 + bitmap_width].fill(0);
        empty_secondary.extend_from_slice(&zero);
        empty_secondary.extend_from_slice(b"000000");
    }
    let mut seeds = vec![
        ("0200-purchase".to_owned(), purchase.clone()),
        (
            "0210-approved".to_owned(),
            build(d, Mti::FINANCIAL_RESPONSE, APPROVED_0210),
        ),
        ("0800-echo".to_owned(), echo),
        (
            "0100-chip-pin".to_owned(),
            build(d, Mti::AUTHORIZATION, CHIP_PIN_0100),
        ),
        (
            "0420-reversal".to_owned(),
            build(d, Mti::REVERSAL_ADVICE, REVERSAL_0420),
        ),
        ("truncated-de2".to_owned(), purchase[..de2 + 5].to_vec()),
        ("bad-length-prefix-de2".to_owned(), bad_prefix),
        ("bad-character-de4".to_owned(), bad_amount),
        ("trailing-bytes".to_owned(), trailing),
        ("empty-secondary-bitmap".to_owned(), empty_secondary),
    ];
    if d.bitmap_encoding() == switchyard_wire::BitmapEncoding::Hex {
        let mut bad_bitmap = purchase.clone();
        bad_bitmap[4 + 3] = b'G';
        seeds.push(("bad-bitmap".to_owned(), bad_bitmap));
        let mut lowercase = purchase;
        lowercase[4..4 + 2 * bitmap_width].make_ascii_lowercase();
        seeds.push(("lowercase-bitmap".to_owned(), lowercase));
    }
    seeds
}

fn frame_seeds() -> Vec<(String, Vec<u8>)> {
    let ascii = fuzz_checks::iso87_ascii();
    let hex = fuzz_checks::iso87_hexbitmap();
    let framed = |framing: Framing, messages: &[Vec<u8>]| {
        let mut out = BytesMut::new();
        for m in messages {
            if let Err(e) = framing.write(&mut out, m) {
                panic!("seed frame: {e}");
            }
        }
        out.to_vec()
    };
    let pair_ascii = [
        build(ascii, Mti::FINANCIAL, PURCHASE_0200),
        build(ascii, Mti::NETWORK, ECHO_0800),
    ];
    let pair_hex = [
        build(hex, Mti::FINANCIAL, PURCHASE_0200),
        build(hex, Mti::NETWORK, ECHO_0800),
    ];
    let mut partial = framed(Framing::U16be, &pair_ascii);
    partial.truncate(partial.len() - 10);
    let mut over_small_bound = b"0100".to_vec();
    over_small_bound.extend_from_slice(&[b'7'; 100]);
    vec![
        (
            "u16be-0200-0800".to_owned(),
            framed(Framing::U16be, &pair_ascii),
        ),
        (
            "ascii4-0200-0800".to_owned(),
            framed(Framing::Ascii4, &pair_hex),
        ),
        ("u16be-partial".to_owned(), partial),
        ("ascii4-bad-header".to_owned(), b"00x1hello".to_vec()),
        ("zero-length".to_owned(), b"\x00\x000000".to_vec()),
        (
            "too-large".to_owned(),
            vec![0xff, 0xff, b'9', b'9', b'9', b'9'],
        ),
        ("ascii4-over-small-bound".to_owned(), over_small_bound),
        (
            "u16be-inclusive-0200-0800".to_owned(),
            framed(Framing::U16beInclusive, &pair_ascii),
        ),
        (
            "hex4-0200-0800".to_owned(),
            framed(Framing::Hex4, &pair_hex),
        ),
        (
            "bcd2-0200-0800".to_owned(),
            framed(Framing::Bcd2, &pair_ascii),
        ),
        ("bcd2-bad-header".to_owned(), vec![0x00, 0x1a, b'x']),
    ]
}

/// Seeds of a dialect converted to its canonical form: each message kind, and
/// the same cut short, with bytes after it, and with a byte in DE3 broken (a
/// non-digit BCD nibble, or an EBCDIC letter in a numeric field).
fn transcoded_seeds(d: &Dialect) -> Vec<(String, Vec<u8>)> {
    let purchase = build(d, Mti::FINANCIAL, PURCHASE_0200);
    let mut trailing = purchase.clone();
    trailing.extend_from_slice(&[0xf0, 0x00, 0x12]);
    let mut broken = purchase.clone();
    // DE3 follows the MTI, the two bitmaps and DE2 (prefix and 16 digits).
    let de3 = d.mti_encoding().wire_len()
        + 16
        + d.field_wire(2)
            .prefix
            .wire_len(switchyard_wire::LengthKind::LlVar)
        + d.field(2).map_or(0, |s| s.encoding.wire_len(16));
    broken[de3] = 0xc1;
    vec![
        ("0200-purchase".to_owned(), purchase.clone()),
        (
            "0210-approved".to_owned(),
            build(d, Mti::FINANCIAL_RESPONSE, APPROVED_0210),
        ),
        ("0800-echo".to_owned(), build(d, Mti::NETWORK, ECHO_0800)),
        (
            "0100-chip-pin".to_owned(),
            build(d, Mti::AUTHORIZATION, CHIP_PIN_0100),
        ),
        (
            "0420-reversal".to_owned(),
            build(d, Mti::REVERSAL_ADVICE, REVERSAL_0420),
        ),
        (
            "truncated".to_owned(),
            purchase[..purchase.len() - 5].to_vec(),
        ),
        ("trailing-bytes".to_owned(), trailing),
        ("bad-de3".to_owned(), broken),
    ]
}

/// Every seed: (target, file name, contents).
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut all = Vec::new();
    for (name, bytes) in frame_seeds() {
        all.push(("frame_decoder", name, bytes));
    }
    for (name, bytes) in decode_seeds(fuzz_checks::iso87_ascii()) {
        all.push(("decode_iso87_ascii", name, bytes));
    }
    for (name, bytes) in decode_seeds(fuzz_checks::iso87_hexbitmap()) {
        all.push(("decode_iso87_hexbitmap", name, bytes));
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../config/iso8583/example-jpos-packager.xml");
    let example = std::fs::read(&example).unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    let small = b"<isopackager>\n<isofield id=\"0\" length=\"4\" name=\"MTI\" class=\"org.jpos.iso.IFE_NUMERIC\"/>\n\
<isofield id=\"1\" length=\"16\" name=\"BITMAP\" class=\"org.jpos.iso.IFE_BITMAP\"/>\n\
<isofield id=\"7\" length=\"10\" name=\"DE7\" class=\"org.jpos.iso.IFE_NUMERIC\"/>\n\
<isofield id=\"11\" length=\"6\" name=\"STAN\" class=\"org.jpos.iso.IFB_NUMERIC\"/>\n\
<isofield id=\"70\" length=\"3\" name=\"NMIC\" class=\"org.jpos.iso.IFA_NUMERIC\"/>\n</isopackager>\n"
        .to_vec();
    let variant = |from: &str, to: &str| {
        String::from_utf8_lossy(&small)
            .replace(from, to)
            .into_bytes()
    };
    let ascii = variant("IFE_", "IFA_");
    let unknown = variant("IFB_NUMERIC", "IFX_NUMERIC");
    let truncated = small[..small.len() / 2].to_vec();
    let ber_on_text = variant(
        "<isofield id=\"70\"",
        "<isofieldpackager id=\"55\" length=\"9\" name=\"ICC\" class=\"org.jpos.iso.IFA_LLCHAR\" \
         packager=\"org.jpos.tlv.packager.bertlv.BERTLVAsciiHexPackager\"/>\n<isofield id=\"70\"",
    );
    all.push(("dialect_jpos_xml", "example".to_owned(), example));
    all.push(("dialect_jpos_xml", "ebcdic-echo".to_owned(), small));
    all.push(("dialect_jpos_xml", "ascii-echo".to_owned(), ascii));
    all.push(("dialect_jpos_xml", "unknown-class".to_owned(), unknown));
    all.push(("dialect_jpos_xml", "truncated".to_owned(), truncated));
    all.push(("dialect_jpos_xml", "ber-on-text".to_owned(), ber_on_text));
    for (name, bytes) in transcoded_seeds(fuzz_checks::iso87_binary()) {
        all.push(("decode_iso87_binary", name, bytes));
    }
    for (name, bytes) in transcoded_seeds(fuzz_checks::iso87_ebcdic()) {
        all.push(("decode_iso87_ebcdic", name, bytes));
    }
    for (name, bytes) in iso93_seeds() {
        all.push(("decode_iso93_binary", name, bytes));
    }
    for (name, bytes) in tertiary_seeds() {
        all.push(("decode_tertiary_binary", name, bytes));
    }
    all
}

/// Seeds named for a message type or a non-canonical form decode; the rest fail,
/// each at the place its name says.
#[test]
fn seeds_are_what_their_names_say() {
    use switchyard_wire::{DecodeErrorKind as Kind, Location, Message};
    for (target, name, bytes) in seeds() {
        let d = match target {
            "decode_iso87_ascii" => fuzz_checks::iso87_ascii(),
            "decode_iso87_hexbitmap" => fuzz_checks::iso87_hexbitmap(),
            _ => continue,
        };
        let err = Message::decode(d, bytes.into()).err();
        let found = err.map(|e| (e.location, e.kind));
        let ok = match name.as_str() {
            "truncated-de2" => matches!(found, Some((Location::Field(2), Kind::Truncated { .. }))),
            "bad-length-prefix-de2" => {
                matches!(
                    found,
                    Some((Location::Field(2), Kind::BadLengthPrefix { found: b'x' }))
                )
            }
            "bad-character-de4" => {
                matches!(
                    found,
                    Some((Location::Field(4), Kind::BadCharacter { found: b'O', .. }))
                )
            }
            "trailing-bytes" => matches!(found, Some((_, Kind::TrailingBytes { count: 3 }))),
            "bad-bitmap" => {
                matches!(
                    found,
                    Some((Location::PrimaryBitmap, Kind::BadHex { found: b'G' }))
                )
            }
            _ => found.is_none(),
        };
        assert!(ok, "{target}/{name}: {found:?}");
    }
}
