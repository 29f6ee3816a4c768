//! psec (PyPI 1.3.0, pinned in the oracle environment `.ci/oracle-venv` makes)
//! as an independent implementation of the security module's primitives
//! (`crates/security`): PIN blocks we encipher in ISO formats 0, 3 and 4 (psec
//! has no format 1) decipher in psec to the same PIN, and psec's blocks
//! decipher in ours; retail MACs (ISO 9797-1 algorithm 3) and TDES key check
//! values agree with psec's, AES-CMACs with `cryptography`'s.

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use switchyard_security::pin::{self, Format};
use switchyard_security::{kcv, mac, Algorithm, Key};
use switchyard_tools::testkit::oracle_python;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Deterministic "random" bytes for keys and data (the PIN fill comes from the OS).
fn bytes(seed: usize, n: usize) -> Vec<u8> {
    (0..n).map(|i| (seed * 131 + i * 29 + 7) as u8).collect()
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Iso0 => "iso0",
        Format::Iso1 => "iso1",
        Format::Iso3 => "iso3",
        Format::Iso4 => "iso4",
    }
}

#[test]
fn pin_blocks_macs_and_check_values_agree_with_psec() {
    let mut cases = Vec::new();
    for i in 0..40usize {
        let pin: String = (0..4 + i % 9)
            .map(|k| char::from(b'0' + ((i + k * 3) % 10) as u8))
            .collect();
        let pan: String = (0..13 + i % 7)
            .map(|k| char::from(b'0' + ((i * 7 + k) % 10) as u8))
            .collect();
        let tdes = bytes(i, if i % 2 == 0 { 16 } else { 24 });
        let aes = bytes(i + 100, [16, 24, 32][i % 3]);
        for (format, key) in [
            (Format::Iso0, Key::new(Algorithm::Tdes, &tdes).unwrap()),
            (Format::Iso3, Key::new(Algorithm::Tdes, &tdes).unwrap()),
            (Format::Iso4, Key::new(Algorithm::Aes, &aes).unwrap()),
        ] {
            let block = pin::encipher(
                format,
                &key,
                pin.as_bytes(),
                pan.as_bytes(),
                &mut pin::os_random,
            )
            .expect("encipher");
            let raw = if format == Format::Iso4 { &aes } else { &tdes };
            cases.push(
                json!({"kind": "pin", "format": format_name(format), "key": hex(raw),
                "pin": pin, "pan": pan, "ours": hex(&block)}),
            );
        }
        let data = bytes(i + 7, i * 5);
        let mac_key = bytes(i + 50, 16);
        let k = Key::new(Algorithm::Tdes, &mac_key).unwrap();
        cases.push(
            json!({"kind": "retail-mac", "key": hex(&mac_key), "data": hex(&data),
            "ours": hex(&mac::retail_mac(&k, &data).unwrap())}),
        );
        let a = Key::new(Algorithm::Aes, &aes).unwrap();
        cases.push(
            json!({"kind": "aes-cmac", "key": hex(&aes), "data": hex(&data),
            "ours": hex(&mac::aes_cmac(&a, &data).unwrap())}),
        );
        let t = Key::new(Algorithm::Tdes, &tdes).unwrap();
        cases.push(json!({"kind": "kcv", "key": hex(&tdes), "ours": hex(&kcv::kcv(&t))}));
    }
    let file = std::env::temp_dir().join(format!("switchyard-psec-{}.json", std::process::id()));
    std::fs::write(&file, Value::Array(cases).to_string()).expect("write cases");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/security/tests/oracle/psec_check.py");
    let out = Command::new(oracle_python())
        .arg(script)
        .arg(&file)
        .output()
        .expect("run psec");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "psec disagrees: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // psec's own blocks decipher in ours to the same PIN.
    let made: Vec<Value> = serde_json::from_slice(&out.stdout).expect("psec's blocks");
    assert_eq!(made.len(), 120);
    for m in made {
        let s = |k: &str| m[k].as_str().expect(k).to_owned();
        let format = match s("format").as_str() {
            "iso0" => Format::Iso0,
            "iso3" => Format::Iso3,
            _ => Format::Iso4,
        };
        let key = Key::new(format.algorithm(), &unhex(&s("key"))).unwrap();
        let held = pin::holds_pin(
            format,
            &key,
            &unhex(&s("block")),
            s("pan").as_bytes(),
            s("pin").as_bytes(),
        );
        assert_eq!(held, Ok(true), "{m}");
    }
}
