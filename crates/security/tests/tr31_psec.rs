//! psec (PyPI 1.3.0, pinned in the oracle environment `.ci/oracle-venv` makes) as
//! an independent implementation of TR-31 key blocks: blocks we wrap (versions B
//! and D, every KBPK and key length, with and without optional blocks) unwrap in
//! psec to the same key and header, and psec's blocks of the same keys unwrap in
//! ours. The script is `tests/oracle/tr31_check.py`.

use std::path::{Path, PathBuf};
use std::process::Command;
use switchyard_security::tr31::{
    self, Exportability, Header, KeyUsage, ModeOfUse, OptionalBlock, Version,
};
use switchyard_security::{Algorithm, Key};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Deterministic key bytes.
fn bytes(seed: usize, n: usize) -> Vec<u8> {
    (0..n).map(|i| (seed * 151 + i * 37 + 11) as u8).collect()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The oracle environment's Python, made by `.ci/oracle-venv` when missing (as
/// `switchyard_tools::testkit::oracle_python` does); `None` with the reason when
/// it cannot be made here.
fn oracle_python() -> Result<PathBuf, String> {
    let python = root().join(".venv-oracle/bin/python");
    let ready = |p: &Path| {
        Command::new(p)
            .args(["-c", "import psec"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready(&python) {
        return Ok(python);
    }
    let out = Command::new("bash")
        .arg(root().join(".ci/oracle-venv"))
        .output()
        .map_err(|e| format!("cannot run .ci/oracle-venv: {e}"))?;
    if out.status.success() && ready(&python) {
        Ok(python)
    } else {
        Err(format!(
            ".ci/oracle-venv could not make the oracle environment: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn letter(a: Algorithm) -> &'static str {
    match a {
        Algorithm::Tdes => "T",
        Algorithm::Aes => "A",
    }
}

struct Case {
    kbpk: Key,
    key: Key,
    header: Header,
}

fn cases() -> (Vec<Case>, String) {
    let kbpks = [
        (Algorithm::Tdes, 16),
        (Algorithm::Tdes, 24),
        (Algorithm::Aes, 16),
        (Algorithm::Aes, 24),
        (Algorithm::Aes, 32),
    ];
    let keys = [
        (Algorithm::Tdes, 16),
        (Algorithm::Tdes, 24),
        (Algorithm::Aes, 16),
        (Algorithm::Aes, 24),
        (Algorithm::Aes, 32),
    ];
    let usages = [
        (
            KeyUsage::PIN_ENCRYPTION,
            ModeOfUse::EncryptOnly,
            Exportability::Trusted,
        ),
        (
            KeyUsage::MAC_ISO9797_1_ALGORITHM_3,
            ModeOfUse::GenerateVerify,
            Exportability::None,
        ),
        (
            KeyUsage::MAC_CMAC,
            ModeOfUse::VerifyOnly,
            Exportability::Sensitive,
        ),
        (
            KeyUsage::KEY_ENCRYPTION,
            ModeOfUse::EncryptDecrypt,
            Exportability::None,
        ),
        (
            KeyUsage::DATA_ENCRYPTION,
            ModeOfUse::DecryptOnly,
            Exportability::Trusted,
        ),
    ];
    let mut out = Vec::new();
    let mut lines = String::new();
    let mut seed = 0;
    for (ka, kl) in kbpks {
        for (a, l) in keys {
            for (usage, mode, exp) in usages {
                seed += 1;
                let kbpk_raw = bytes(seed, kl);
                let key_raw = bytes(seed + 1000, l);
                let mut header = Header::new(Version::for_kbpk(ka), usage, a, mode, exp);
                let mut blocks = "-".to_owned();
                if seed % 3 == 0 {
                    header.key_version = *b"12";
                    let data = format!("00604B120F92928{:05}", seed);
                    header.optional_blocks.push(OptionalBlock {
                        id: *b"KS",
                        data: data.clone(),
                    });
                    blocks = format!("KS={data}");
                    if seed % 2 == 0 {
                        // Long enough for the extended length form.
                        let long = "X".repeat(260 + seed % 7);
                        header.optional_blocks.push(OptionalBlock {
                            id: *b"TS",
                            data: long.clone(),
                        });
                        blocks.push_str(&format!(",TS={long}"));
                    }
                }
                let kbpk = Key::new(ka, &kbpk_raw).unwrap();
                let key = Key::new(a, &key_raw).unwrap();
                let ours = tr31::wrap(&kbpk, &header, &key).expect("wrap");
                let h = &header;
                lines.push_str(&format!(
                    "{} {} {} {} {} {} {} {} {blocks} {ours}\n",
                    hex(&kbpk_raw),
                    hex(&key_raw),
                    match h.version {
                        Version::B => "B",
                        Version::D => "D",
                    },
                    h.key_usage,
                    letter(a),
                    mode_letter(mode),
                    std::str::from_utf8(&h.key_version).unwrap(),
                    match exp {
                        Exportability::Trusted => "E",
                        Exportability::None => "N",
                        Exportability::Sensitive => "S",
                    },
                ));
                out.push(Case { kbpk, key, header });
            }
        }
    }
    (out, lines)
}

fn mode_letter(m: ModeOfUse) -> &'static str {
    match m {
        ModeOfUse::EncryptOnly => "E",
        ModeOfUse::GenerateVerify => "C",
        ModeOfUse::VerifyOnly => "V",
        ModeOfUse::EncryptDecrypt => "B",
        ModeOfUse::DecryptOnly => "D",
        _ => "N",
    }
}

/// Whether two keys are equal, without reading either: with fixed padding,
/// wrap is a function of the key.
fn same_key(kbpk: &Key, header: &Header, a: &Key, b: &Key) -> bool {
    let pad = [0x5A; 32];
    // 2 + key + pad must be whole cipher blocks: the first pad length that fits.
    let fixed = |k: &Key| {
        (0..pad.len()).find_map(|n| tr31::wrap_with_padding(kbpk, header, k, &pad[..n]).ok())
    };
    let wrapped = fixed(a);
    a.check_value() == b.check_value() && wrapped.is_some() && wrapped == fixed(b)
}

#[test]
fn tr31_blocks_interchange_with_psec() {
    let python = match oracle_python() {
        Ok(p) => p,
        Err(reason) => {
            println!("skipped: {reason}");
            return;
        }
    };
    let (cases, lines) = cases();
    let file = std::env::temp_dir().join(format!("switchyard-tr31-{}.txt", std::process::id()));
    std::fs::write(&file, lines).expect("write cases");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracle/tr31_check.py");
    let out = Command::new(python)
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
    let theirs = String::from_utf8(out.stdout).expect("psec's blocks");
    let theirs: Vec<&str> = theirs.lines().collect();
    assert_eq!(theirs.len(), cases.len());
    for (case, block) in cases.iter().zip(theirs) {
        let (header, key) =
            tr31::unwrap(&case.kbpk, block).unwrap_or_else(|e| panic!("{block}: {e}"));
        assert_eq!(header, case.header, "{block}");
        assert!(
            same_key(&case.kbpk, &case.header, &key, &case.key),
            "{block}"
        );
    }
}
