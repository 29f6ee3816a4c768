//! PIN translation and MACs through a real `switchyard run`, checked by an
//! independent implementation: psec (PIN blocks, the retail MAC) and
//! `cryptography` (AES-CMAC), with messages by pyiso8583
//! (`crates/security/tests/oracle/psec_link.py`, in the pinned oracle venv).
//!
//! The acquirer's 0200s carry an ISO 0 PIN block under its TDES zone PIN key
//! and a retail MAC under its TDES MAC key, both made by psec. Two banks, also
//! psec: one with AES keys (ISO 4 PIN blocks, AES-CMAC, in a dialect whose DE52
//! holds 16 bytes), one with TDES keys (ISO 0, retail MAC). Each bank deciphers
//! the forwarded DE52 to the PIN and checks the switch's MAC; the acquirer
//! checks the MAC of every answer. A tampered MAC is answered 63 and a PIN block
//! under the wrong key 81, and neither reaches a bank.

use bytes::BytesMut;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use switchyard::wire::{FrameDecoder, Framing};
use switchyard_security::store::{KeyStore, KeyType};
use switchyard_security::{Algorithm, Key};
use switchyard_tools::certs;
use switchyard_tools::testkit::{self, connect, oracle_python, Daemon, Pki, TempDir, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `switchyard` binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

const ACQ_ZPK: &str = "0123456789ABCDEFFEDCBA9876543210";
const ACQ_ZAK: &str = "89ABCDEF0123456776543210FEDCBA98";
const WRONG_ZPK: &str = "1111111111111111FEDCBA9876543210";
const AES_ZPK: &str = "2B7E151628AED2A6ABF7158809CF4F3C";
const AES_ZAK: &str = "000102030405060708090A0B0C0D0E0F";
const TDES_ZPK: &str = "F1E2D3C4B5A69788796A5B4C3D2E1F00";
const TDES_ZAK: &str = "13579BDF02468ACE0123456789ABCDEF";

fn oracle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../security/tests/oracle/psec_link.py")
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Runs the oracle in `mode` with `input` on stdin; its stdout parsed as JSON.
fn oracle_json(mode: &str, dialect: &Path, input: &serde_json::Value) -> serde_json::Value {
    let mut child = Command::new(oracle_python())
        .args(["-W", "ignore"])
        .arg(oracle())
        .arg(mode)
        .arg("--dialect")
        .arg(dialect)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run psec_link.py");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "psec_link.py {mode} failed");
    serde_json::from_slice(&out.stdout).expect("psec_link.py JSON")
}

/// A psec bank (`psec_link.py bank`) with its certificate for `bank-{id}`.
struct PsecBank {
    child: Child,
    port: u16,
}

impl PsecBank {
    fn start(ca: &certs::DevCa, dir: &Path, id: &str, dialect: &Path, keys: [&str; 4]) -> PsecBank {
        let dir = dir.join(format!("bank-{id}"));
        certs::write_ca(&dir, ca).unwrap();
        let issued = ca.issue_server(&[&format!("bank-{id}")]).unwrap();
        certs::write_issued(&dir, "bank", &issued).unwrap();
        let [zpk, format, zak, mac] = keys;
        let mut child = Command::new(oracle_python())
            .args(["-W", "ignore"])
            .arg(oracle())
            .args(["bank", "--dialect"])
            .arg(dialect)
            .arg("--certs")
            .arg(&dir)
            .args(["--zpk", zpk, "--format", format, "--zak", zak, "--mac", mac])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the psec bank");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("bank said {line:?}"));
        PsecBank { child, port }
    }

    /// Stops it and returns what it printed.
    fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// iso87-ascii with a 16-byte DE52 (room for an ISO 4 PIN block).
fn aes_pin_dialect(dir: &Path) -> PathBuf {
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/iso8583/iso87-ascii.toml");
    let text = std::fs::read_to_string(shipped).unwrap();
    let at = text.find("number = 52").unwrap();
    let max = at + text[at..].find("max = 8").unwrap();
    let text = format!("{}max = 16{}", &text[..max], &text[max + "max = 8".len()..])
        .replace("name = \"iso87-ascii\"", "name = \"iso87-ascii-aes-pin\"");
    let path = dir.join("iso87-ascii-aes-pin.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn key_store(dir: &Path) {
    let (store, master) = (dir.join("keys.toml"), dir.join("master.key"));
    let mut keys = KeyStore::init(&store, &master).unwrap();
    let tdes = |h: &str| Key::new(Algorithm::Tdes, &unhex(h)).unwrap();
    let aes = |h: &str| Key::new(Algorithm::Aes, &unhex(h)).unwrap();
    keys.insert("acq-zpk", KeyType::Zpk, &tdes(ACQ_ZPK))
        .unwrap();
    keys.insert("acq-zak", KeyType::Zak, &tdes(ACQ_ZAK))
        .unwrap();
    keys.insert("aes-zpk", KeyType::Zpk, &aes(AES_ZPK)).unwrap();
    keys.insert("aes-zak", KeyType::Zak, &aes(AES_ZAK)).unwrap();
    keys.insert("tdes-zpk", KeyType::Zpk, &tdes(TDES_ZPK))
        .unwrap();
    keys.insert("tdes-zak", KeyType::Zak, &tdes(TDES_ZAK))
        .unwrap();
    keys.save().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psec_pin_blocks_and_macs_are_translated_and_verified_across_the_switch() {
    let dir = TempDir::new("pin-mac");
    let pki = Pki::write(&dir.0);
    key_store(&dir.0);
    let aes_dialect = aes_pin_dialect(&dir.0);
    let ascii = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/iso8583/iso87-ascii.toml");
    let aes_bank = PsecBank::start(
        &pki.ca,
        &dir.0,
        "200001",
        &aes_dialect,
        [AES_ZPK, "iso4", AES_ZAK, "aes-cmac"],
    );
    let tdes_bank = PsecBank::start(
        &pki.ca,
        &dir.0,
        "200002",
        &ascii,
        [TDES_ZPK, "iso0", TDES_ZAK, "iso9797-3"],
    );
    let rest = format!(
        r#"[keys]
store = "keys.toml"
master_key_file = "master.key"

[[institution]]
id = "100001"
pin_key = "acq-zpk"
pin_block_format = "iso0"
mac_key = "acq-zak"
mac = "iso9797-3"

[[bank]]
id = "200001"
address = "127.0.0.1:{}"
server_name = "bank-200001"
dialect = "{}"
pin_key = "aes-zpk"
pin_block_format = "iso4"
mac_key = "aes-zak"
mac = "aes-cmac"

[[bank]]
id = "200002"
address = "127.0.0.1:{}"
server_name = "bank-200002"
pin_key = "tdes-zpk"
pin_block_format = "iso0"
mac_key = "tdes-zak"
mac = "iso9797-3"

[[route]]
pan_prefix = "4"
bank = "200001"

[[route]]
pan_prefix = "5"
bank = "200002"
"#,
        aes_bank.port,
        aes_dialect.display(),
        tdes_bank.port
    );
    let config = testkit::write_config(&dir.0, "", "", &rest);
    let mut daemon = Daemon::start(BIN, &config);
    daemon.wait_line("bank link up"); // both banks

    // Case: (DE11, PAN, the key DE52 is under, tamper with the MAC, expected DE39).
    let cases = [
        ("000001", "4321987654321098", ACQ_ZPK, false, "00"),
        ("000002", "5432198765432109", ACQ_ZPK, false, "00"),
        ("000003", "4321987654321098", ACQ_ZPK, true, "63"),
        ("000004", "4321987654321098", WRONG_ZPK, false, "81"),
        ("000005", "5432198765432109", WRONG_ZPK, false, "81"),
    ];
    let made: Vec<serde_json::Value> = cases
        .iter()
        .map(|(stan, pan, zpk, tamper, _)| {
            serde_json::json!({
                "mti": "0200",
                "fields": {
                    "2": pan, "3": "000000", "4": "000000001000", "7": "1125120000",
                    "11": stan, "12": "120000", "13": "1125", "32": "100001",
                    "37": format!("5329120000{}", &stan[4..]), "41": "TERM0001",
                    "42": "MERCHANT0000001", "49": "978",
                },
                "pin": "1234", "pan": pan, "zpk": zpk, "format": "iso0",
                "zak": ACQ_ZAK, "mac": "iso9797-3", "tamper": tamper,
            })
        })
        .collect();
    let messages = oracle_json("make", &ascii, &serde_json::Value::Array(made));
    let messages: Vec<Vec<u8>> = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| unhex(m.as_str().unwrap()))
        .collect();

    let mut stream = connect(daemon.addr, &pki.client("100001")).await.unwrap();
    for m in &messages {
        stream.write_all(&testkit::framed(m)).await.unwrap();
    }
    stream.flush().await.unwrap();
    let decoder = FrameDecoder::new(Framing::U16be, 8192);
    let mut buf = BytesMut::new();
    let mut answers = Vec::new();
    tokio::time::timeout(WAIT, async {
        while answers.len() < messages.len() {
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                answers.push(serde_json::json!({
                    "message": hex(&frame), "zak": ACQ_ZAK, "mac": "iso9797-3",
                }));
            }
            if answers.len() < messages.len() {
                assert!(
                    stream.read_buf(&mut buf).await.unwrap() > 0,
                    "switch closed"
                );
            }
        }
    })
    .await
    .expect("every request answered");
    let checked = oracle_json("check", &ascii, &serde_json::Value::Array(answers));
    let mut by_stan = std::collections::HashMap::new();
    for a in checked.as_array().unwrap() {
        assert_eq!(a["mti"], "0210", "{a}");
        assert_eq!(a["mac"], "ok", "the answer's MAC (psec): {a}");
        by_stan.insert(a["stan"].as_str().unwrap().to_owned(), a["code"].clone());
    }
    for (stan, _, _, _, code) in cases {
        assert_eq!(by_stan[stan], code, "DE39 for DE11 {stan}: {by_stan:?}");
    }

    // The banks deciphered the PIN and verified the switch's MAC; refused
    // requests never reached them.
    daemon.terminate();
    daemon.wait_exit();
    let (aes_out, tdes_out) = (aes_bank.finish(), tdes_bank.finish());
    println!("AES bank:\n{aes_out}\nTDES bank:\n{tdes_out}");
    // (Banks see the switch's STANs: requests are told apart by DE37.)
    assert!(
        aes_out.contains("PIN 1234 MAC ok DE37=532912000001 0200"),
        "{aes_out}"
    );
    assert!(
        tdes_out.contains("PIN 1234 MAC ok DE37=532912000002 0200"),
        "{tdes_out}"
    );
    for out in [&aes_out, &tdes_out] {
        assert!(!out.contains("ERROR"), "{out}");
        assert_eq!(
            out.matches(" 0200").count(),
            1,
            "one payment per bank: {out}"
        );
    }
}
