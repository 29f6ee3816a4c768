//! The security module's cost per payment, through the switch's own link-key
//! code (`switchyard::security`): what the daemon does for one payment when
//! both its links have PIN and MAC keys —
//!
//! 1. verify the acquirer's MAC on the request,
//! 2. translate the PIN block (DE52) to the bank's key and format,
//! 3. MAC the request for the bank,
//! 4. verify the bank's MAC on its answer,
//! 5. MAC the answer for the acquirer.
//!
//! Three pairings: TDES on both sides (ISO 0, retail MAC), a TDES acquirer
//! with an AES bank (ISO 0 → ISO 4, retail MAC → AES-CMAC), and AES on both
//! sides (ISO 4, AES-CMAC). Messages are in iso87-ascii with a 16-byte DE52. One iteration is one
//! payment. Run with `cargo bench --bench security`; `cargo test --bench
//! security` runs each once.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use switchyard::security::{translate_pin, LinkKeys, MacSpec, PinSpec};
use switchyard::wire::{Dialect, Encoder, Message, Mti};
use switchyard_security::module::{MacAlgorithm, SoftwareModule, Usage};
use switchyard_security::pin::{self, Format};
use switchyard_security::{Algorithm, Key};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0))
        .collect()
}

struct Pairing {
    /// The acquirer's dialect (DE52 of 8 or 16 bytes).
    dialect: Dialect,
    acquirer: LinkKeys,
    bank: LinkKeys,
    request: Vec<u8>,
    answer: Vec<u8>,
}

/// Encodes `fields` with a zero MAC placeholder in DE64 (no field above 64).
fn with_placeholder(d: &Dialect, mti: Mti, fields: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut enc = Encoder::new(d, &mut out, mti);
    for (n, v) in fields {
        enc.field(*n, v).expect("bench field");
    }
    enc.field(64, &[0; 8]).expect("DE64");
    enc.finish();
    out.to_vec()
}

/// iso87-ascii with a 16-byte DE52 (room for an ISO 4 PIN block).
fn dialect() -> Dialect {
    let (_, text) = switchyard::wire::BUILTIN_DIALECTS
        .iter()
        .find(|(n, _)| *n == "iso87-ascii")
        .expect("shipped dialect");
    let at = text.find("number = 52").expect("DE52");
    let max = at + text[at..].find("max = 8").expect("its length");
    let text = format!("{}max = 16{}", &text[..max], &text[max + "max = 8".len()..]);
    Dialect::from_toml(&text, "bench").expect("dialect")
}

fn pairing(aes_acquirer: bool, aes_bank: bool) -> Pairing {
    let d = if aes_acquirer {
        dialect()
    } else {
        Dialect::iso87_ascii()
    };
    let tdes = |h: &str| Key::new(Algorithm::Tdes, &unhex(h)).expect("TDES key");
    let mut m = SoftwareModule::new();
    let aes = |h: &str| Key::new(Algorithm::Aes, &unhex(h)).expect("AES key");
    let (acq_zpk_key, acq_format, acq_mac) = if aes_acquirer {
        (
            aes("0123456789ABCDEFFEDCBA9876543210"),
            Format::Iso4,
            MacAlgorithm::AesCmac,
        )
    } else {
        (
            tdes("0123456789ABCDEFFEDCBA9876543210"),
            Format::Iso0,
            MacAlgorithm::Iso9797Alg3,
        )
    };
    let acq_zak_key = if aes_acquirer {
        aes("89ABCDEF0123456776543210FEDCBA98")
    } else {
        tdes("89ABCDEF0123456776543210FEDCBA98")
    };
    let acq_zpk = m.add("acq-zpk", Usage::Pin, acq_zpk_key).expect("key");
    let acq_zak = m.add("acq-zak", Usage::Mac, acq_zak_key).expect("key");
    let (bank_zpk, bank_format, bank_zak, bank_mac) = if aes_bank {
        (
            m.add(
                "bank-zpk",
                Usage::Pin,
                aes("2B7E151628AED2A6ABF7158809CF4F3C"),
            ),
            Format::Iso4,
            m.add(
                "bank-zak",
                Usage::Mac,
                aes("000102030405060708090A0B0C0D0E0F"),
            ),
            MacAlgorithm::AesCmac,
        )
    } else {
        (
            m.add(
                "bank-zpk",
                Usage::Pin,
                tdes("F1E2D3C4B5A69788796A5B4C3D2E1F00"),
            ),
            Format::Iso0,
            m.add(
                "bank-zak",
                Usage::Mac,
                tdes("13579BDF02468ACE0123456789ABCDEF"),
            ),
            MacAlgorithm::Iso9797Alg3,
        )
    };
    let m = Arc::new(m);
    let acquirer = LinkKeys::new(
        m.clone(),
        Some(MacSpec {
            key: acq_zak,
            algorithm: acq_mac,
        }),
        Some(PinSpec {
            key: acq_zpk,
            format: acq_format,
        }),
    );
    let bank = LinkKeys::new(
        m,
        Some(MacSpec {
            key: bank_zak.expect("key"),
            algorithm: bank_mac,
        }),
        Some(PinSpec {
            key: bank_zpk.expect("key"),
            format: bank_format,
        }),
    );
    let pan = b"4321987654321098";
    let block = pin::encipher(
        acq_format,
        &if aes_acquirer {
            aes("0123456789ABCDEFFEDCBA9876543210")
        } else {
            tdes("0123456789ABCDEFFEDCBA9876543210")
        },
        b"1234",
        pan,
        &mut pin::os_random,
    )
    .expect("PIN block");
    let mut request = with_placeholder(
        &d,
        Mti::FINANCIAL,
        &[
            (2, pan),
            (3, b"000000"),
            (4, b"000000001000"),
            (7, b"1125120000"),
            (11, b"000001"),
            (12, b"120000"),
            (13, b"1125"),
            (32, b"100001"),
            (37, b"532912000001"),
            (41, b"TERM0001"),
            (42, b"MERCHANT0000001"),
            (49, b"978"),
            (52, &block),
        ],
    );
    assert!(acquirer.seal(&mut request, 8));
    let mut answer = with_placeholder(
        &d,
        Mti::FINANCIAL_RESPONSE,
        &[
            (2, pan),
            (3, b"000000"),
            (4, b"000000001000"),
            (7, b"1125120000"),
            (11, b"000001"),
            (32, b"100001"),
            (37, b"532912000001"),
            (38, b"123456"),
            (39, b"00"),
            (41, b"TERM0001"),
            (49, b"978"),
        ],
    );
    assert!(bank.seal(&mut answer, 8));
    Pairing {
        dialect: d,
        acquirer,
        bank,
        request,
        answer,
    }
}

fn payment_crypto(c: &mut Criterion) {
    let mut group = c.benchmark_group("payment_crypto");
    group.throughput(Throughput::Elements(1));
    for (name, aes_acquirer, aes_bank) in [
        ("tdes_to_tdes", false, false),
        ("tdes_to_aes", false, true),
        ("aes_to_aes", true, true),
    ] {
        let p = pairing(aes_acquirer, aes_bank);
        let d = &p.dialect;
        let request = Message::decode(d, p.request.clone().into()).expect("request");
        let answer = Message::decode(d, p.answer.clone().into()).expect("answer");
        let (mut out, mut back) = (p.request.clone(), p.answer.clone());
        group.bench_function(name, |b| {
            b.iter(|| {
                // 1. The acquirer's MAC.
                p.acquirer
                    .verify(black_box(&p.request), &request, d)
                    .expect("acquirer MAC");
                // 2. DE52 to the bank's key and format.
                let pin = translate_pin(&request, &p.acquirer, &p.bank).expect("PIN");
                // 3. The bank's MAC on what goes to it.
                out.copy_from_slice(&p.request);
                assert!(p.bank.seal(black_box(&mut out), 8));
                // 4. The bank's MAC on its answer.
                p.bank
                    .verify(black_box(&p.answer), &answer, d)
                    .expect("bank MAC");
                // 5. The acquirer's MAC on the answer.
                back.copy_from_slice(&p.answer);
                assert!(p.acquirer.seal(black_box(&mut back), 8));
                pin
            })
        });
    }
    group.finish();
}

/// The retail MAC (ISO 9797-1 algorithm 3: single-DES CBC, then TDES on the
/// last block) over 1 KiB, as bytes per second: the figure to put beside
/// `openssl speed -provider legacy -provider default -evp des-cbc` run in the
/// same session, which bounds what any DES can do on the machine.
fn retail_mac_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("retail_mac");
    let data = vec![0x5Au8; 1024];
    group.throughput(Throughput::Bytes(data.len() as u64));
    let key = Key::new(Algorithm::Tdes, &unhex("0123456789ABCDEFFEDCBA9876543210")).expect("key");
    group.bench_function("1024_bytes", |b| {
        b.iter(|| switchyard_security::mac::retail_mac(&key, black_box(&data)).expect("MAC"))
    });
    group.finish();
}

criterion_group!(benches, payment_crypto, retail_mac_throughput);
criterion_main!(benches);
