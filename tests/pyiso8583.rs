//! pyiso8583 (pinned, in the oracle virtual environment `.ci/oracle-venv`
//! creates) as an independent implementation to check against:
//!
//! 1. the committed golden vectors (`crates/wire/tests/vectors`, read by the
//!    codec's `tests/golden.rs`) are what pyiso8583 writes today for the shipped
//!    dialect files;
//! 2. messages our encoder writes in every shipped dialect (PANs of 12 to 19
//!    digits, odd and even BCD lengths, text with the characters EBCDIC pages
//!    disagree on, EMV data of several lengths) decode in pyiso8583 to the
//!    values we encoded;
//! 3. an acquirer written with pyiso8583 and Python's `ssl`
//!    (`crates/wire/tests/oracle/pyiso8583_client.py`) pays through the switch
//!    over mutual TLS in each shipped dialect, framing and header: approve,
//!    decline, echo, reversal; and with banks in other dialects behind it;
//! 4. a bank host written with pyiso8583 (`pyiso8583_bank.py`) that speaks
//!    ISO 8583:1993 natively behind a 1987 pyiso8583 acquirer: what the switch
//!    translates is checked by an implementation that is not ours on both sides.

use bytes::BytesMut;
use std::path::{Path, PathBuf};
use std::process::Command;
use switchyard::wire::{Dialect, Encoder, Encoding, FieldType, Framing, MessageHeader, Mti};
use switchyard_tools::certs;
use switchyard_tools::demo::{Speaks, Testbed, TestbedOptions};
use switchyard_tools::testkit::oracle_python;

fn oracle_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/wire/tests/oracle")
}

fn script() -> PathBuf {
    oracle_dir().join("pyiso8583_vectors.py")
}

#[test]
fn committed_vectors_are_what_pyiso8583_writes() {
    let out = Command::new(oracle_python())
        .arg(script())
        .arg("check")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/wire/tests/vectors"))
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
        "iso93-ascii",
        "iso93-binary",
    ] {
        // As on the wire (a 1993 dialect's own fields, untranslated).
        let d = Dialect::builtin(name)
            .expect("shipped dialect")
            .untranslated();
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
    let out = Command::new(oracle_python())
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

/// Runs the pyiso8583 acquirer against a test bed whose acquirers speak `acquirers`
/// and whose banks speak `banks`.
async fn pyiso8583_acquirer(acquirers: Speaks, banks: Vec<Speaks>) {
    let bed = Testbed::start(TestbedOptions {
        banks: 2,
        links: 1,
        acquirers: acquirers.clone(),
        bank_speaks: banks,
        ..TestbedOptions::default()
    })
    .await
    .expect("test bed starts");
    run_client(&bed, bed.switch_addr, &acquirers).await;
    bed.stop().await;
}

/// The pyiso8583 acquirer against `addr`, a listener of `bed` speaking as `speaks`.
async fn run_client(bed: &Testbed, addr: std::net::SocketAddr, speaks: &Speaks) {
    let tpdu = match speaks.header {
        MessageHeader::None => false,
        MessageHeader::Tpdu => true,
        MessageHeader::Fixed(_) => panic!("the client sends a TPDU or nothing"),
    };
    let (dialect, framing) = (speaks.dialect.clone(), speaks.framing);
    let dir = tempdir();
    certs::write_ca(&dir, &bed.ca).expect("ca.pem");
    let client = bed.ca.issue_client("100001").expect("client certificate");
    certs::write_issued(&dir, "100001", &client).expect("client files");
    let mut cmd = Command::new(oracle_python());
    cmd.arg(oracle_dir().join("pyiso8583_client.py"))
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--certs")
        .arg(&dir)
        .arg("--dialect")
        .arg(&dialect)
        .arg("--framing")
        .arg(framing.as_str());
    if tpdu {
        cmd.arg("--tpdu");
    }
    // Each run its own STANs: on one test bed they are new requests, not
    // retransmissions.
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    cmd.arg("--stan").arg((100 + run * 10).to_string());
    // The client bounds each read itself (30 s), so this ends.
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("client task")
        .expect("run the pyiso8583 client");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().count() == 5,
        "{dialect} {framing} tpdu={tpdu}:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tempdir() -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("switchyard-pyclient-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn speaks(dialect: &str, framing: Framing, header: MessageHeader) -> Speaks {
    Speaks {
        dialect: dialect.to_owned(),
        framing,
        header,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pyiso8583_acquirer_in_every_shipped_dialect_framing_and_header() {
    let cases = [
        ("iso87-ascii", Framing::U16be, MessageHeader::None),
        ("iso87-ascii", Framing::Ascii4, MessageHeader::Tpdu),
        ("iso87-hexbitmap", Framing::Hex4, MessageHeader::None),
        ("iso87-binary", Framing::Bcd2, MessageHeader::Tpdu),
        ("iso87-binary", Framing::U16be, MessageHeader::None),
        ("iso87-ebcdic", Framing::U16beInclusive, MessageHeader::None),
        ("iso87-ebcdic", Framing::U16be, MessageHeader::Tpdu),
        ("iso93-ascii", Framing::U16be, MessageHeader::None),
        ("iso93-ascii", Framing::Ascii4, MessageHeader::Tpdu),
        ("iso93-binary", Framing::Bcd2, MessageHeader::Tpdu),
        ("iso93-binary", Framing::U16be, MessageHeader::None),
    ];
    for (dialect, framing, header) in cases {
        pyiso8583_acquirer(speaks(dialect, framing, header), Vec::new()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bcd_acquirer_with_a_tpdu_pays_an_ebcdic_bank_and_a_bcd_bank() {
    pyiso8583_acquirer(
        speaks("iso87-binary", Framing::Bcd2, MessageHeader::Tpdu),
        vec![
            speaks("iso87-ebcdic", Framing::U16be, MessageHeader::None),
            speaks("iso87-binary", Framing::U16be, MessageHeader::Tpdu),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_listeners_in_three_dialects_serve_side_by_side() {
    let listeners = [
        speaks("iso87-ascii", Framing::U16be, MessageHeader::None),
        speaks("iso87-binary", Framing::Bcd2, MessageHeader::Tpdu),
        speaks("iso87-ebcdic", Framing::Hex4, MessageHeader::None),
    ];
    let bed = Testbed::start(TestbedOptions {
        banks: 2,
        links: 1,
        acquirers: listeners[0].clone(),
        more_listeners: listeners[1..].to_vec(),
        ..TestbedOptions::default()
    })
    .await
    .expect("test bed starts");
    assert_eq!(bed.listener_addrs.len(), 3);
    for (addr, speaks) in bed.listener_addrs.clone().iter().zip(&listeners) {
        run_client(&bed, *addr, speaks).await;
    }
    bed.stop().await;
}

/// A pyiso8583 bank speaking ISO 8583:1993 in `dialect`, running until its
/// stdin closes; its port is read from its first line.
struct PyBank {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    dir: PathBuf,
}

impl PyBank {
    fn start(ca: &certs::DevCa, id: &str, dialect: &str, framing: Framing) -> PyBank {
        use std::io::BufRead;
        let dir = tempdir();
        certs::write_ca(&dir, ca).expect("ca.pem");
        let issued = ca
            .issue_server(&[&format!("bank-{id}")])
            .expect("bank certificate");
        certs::write_issued(&dir, "bank", &issued).expect("bank files");
        let mut child = Command::new(oracle_python())
            .arg(oracle_dir().join("pyiso8583_bank.py"))
            .arg("--certs")
            .arg(&dir)
            .arg("--dialect")
            .arg(dialect)
            .arg("--framing")
            .arg(framing.as_str())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the pyiso8583 bank");
        let stdout = child.stdout.as_mut().expect("stdout");
        let mut line = String::new();
        // Its first line says it listens (it exits after 60 s idle, so this ends).
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("bank's first line");
        let port: u16 = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("bank said {line:?}"));
        PyBank {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            dir,
        }
    }

    /// Stops it (closes its stdin once the switch has closed the link) and
    /// returns what it printed.
    fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().expect("bank output");
        let _ = std::fs::remove_dir_all(&self.dir);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

async fn a_1987_acquirer_pays_a_1993_bank(bank: Speaks, acquirers: Speaks) {
    let ca = std::sync::Arc::new(certs::DevCa::new("switchyard test CA").expect("CA"));
    let py = PyBank::start(&ca, "200001", &bank.dialect, bank.framing);
    let bed = Testbed::start(TestbedOptions {
        banks: 0,
        links: 1,
        acquirers: acquirers.clone(),
        outside_banks: vec![(py.addr, bank.clone())],
        // The decline's PAN (55…) goes to the same bank.
        routes: vec!["pan_prefix = \"55\"\nbank = \"200001\"".to_owned()],
        ca: Some(ca),
        ..TestbedOptions::default()
    })
    .await
    .expect("test bed starts");
    run_client(&bed, bed.switch_addr, &acquirers).await;
    bed.stop().await;
    let seen = py.finish();
    assert!(!seen.contains("ERROR"), "the 1993 bank objected:\n{seen}");
    for want in [
        "1804 sign-on",
        "-> 1210 000",
        "-> 1210 116",
        "1400 DE11=",
        "-> 1410 400",
    ] {
        assert!(seen.contains(want), "bank saw no {want:?}:\n{seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1993_bank_behind_a_1987_acquirer() {
    // ASCII on both sides, then a BCD 1993 host behind a BCD + TPDU 1987 acquirer.
    a_1987_acquirer_pays_a_1993_bank(
        speaks("iso93-ascii", Framing::U16be, MessageHeader::None),
        speaks("iso87-ascii", Framing::U16be, MessageHeader::None),
    )
    .await;
    a_1987_acquirer_pays_a_1993_bank(
        speaks("iso93-binary", Framing::U16be, MessageHeader::None),
        speaks("iso87-binary", Framing::Bcd2, MessageHeader::Tpdu),
    )
    .await;
}
