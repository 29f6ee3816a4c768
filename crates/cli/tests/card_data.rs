//! Card data at rest (PCI DSS 3.2, 3.5): a journal written by a real `switchyard
//! run` under load holds no clear PAN, track data, PIN block or ICC data. The
//! test greps every byte of the journal directory for each card's PAN (as
//! digits and packed), its track 1 and 2, its PIN block and its ICC data;
//! `journal dump` shows the PANs masked; settlement still adds the payments up.

use bytes::BytesMut;
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;
use switchyard::wire::{FrameDecoder, Framing, Message, Mti};
use switchyard_security::store::{KeyStore, KeyType};
use switchyard_security::{Algorithm, Key};
use switchyard_tools::testkit::{self, connect, Bank, Daemon, Pki, TempDir, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `switchyard` binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Payments sent.
const TOTAL: usize = 2_000;
/// Requests in flight on the client's connection.
const WINDOW: usize = 64;

/// Card `i`'s PAN: 16 digits, distinct per card.
fn pan(i: usize) -> String {
    format!("4{:011}{:04}", 90_000_000_000 + i, (i * 7919) % 10_000)
}

/// What is secret of card `i`, as it travels: PAN, track 2, track 1, PIN
/// block (8 bytes), ICC data (tag 57, the track 2 equivalent, packed).
fn secrets(i: usize) -> (String, String, String, Vec<u8>, Vec<u8>) {
    let pan = pan(i);
    let track2 = format!("{pan}=2812101{:012}", i);
    let track1 = format!("B{pan}^CARDHOLDER/TEST^2812101{:06}", i);
    let pin_block = (0..8).map(|k| (i * 31 + k * 17 + 1) as u8).collect();
    let mut icc = vec![0x57, 0x0B];
    let packed: Vec<u8> = format!("{pan}D2812101")
        .as_bytes()
        .chunks(2)
        .map(|p| {
            let nib = |c: u8| if c == b'D' { 13 } else { c - b'0' };
            nib(p[0]) << 4 | nib(p[1])
        })
        .collect();
    icc.extend_from_slice(&packed[..11]);
    (pan, track2, track1, pin_block, icc)
}

fn request(i: usize) -> Vec<u8> {
    let n = i + 1;
    let (pan, track2, track1, pin_block, icc) = secrets(i);
    let stan = format!("{:06}", n);
    let t = n % 86_400;
    let de7 = format!("1126{:02}{:02}{:02}", t / 3600, (t / 60) % 60, t % 60);
    let rrn = format!("{n:012}");
    let msg = testkit::message(
        Mti::FINANCIAL,
        &[
            (2, pan.as_bytes()),
            (3, b"000000"),
            (4, b"000000001000"),
            (7, de7.as_bytes()),
            (11, stan.as_bytes()),
            (32, b"100001"),
            (35, track2.as_bytes()),
            (37, rrn.as_bytes()),
            (45, track1.as_bytes()),
            (49, b"978"),
            (52, &pin_block),
            (55, &icc),
        ],
    );
    testkit::framed(&msg)
}

/// Every byte of every file under `dir` (segments without the zeros they are
/// preallocated with past their last record).
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            out.extend_from_slice(&bytes[..end]);
        }
    }
    out
}

/// Every 8-byte window of `bytes`: a secret (8 bytes or longer) can only be in
/// `bytes` if its first 8 bytes are one of them.
fn windows(bytes: &[u8]) -> HashSet<[u8; 8]> {
    bytes
        .windows(8)
        .map(|w| <[u8; 8]>::try_from(w).unwrap_or_default())
        .collect()
}

fn contains(haystack: &[u8], index: &HashSet<[u8; 8]>, needle: &[u8]) -> bool {
    let head = <[u8; 8]>::try_from(&needle[..8]).unwrap_or_default();
    index.contains(&head) && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_written_under_load_holds_no_clear_card_data() {
    let dir = TempDir::new("card-data");
    let pki = Pki::write(&dir.0);
    let mut keys = KeyStore::init(&dir.0.join("keys.toml"), &dir.0.join("master.key")).unwrap();
    let dek = Key::random(Algorithm::Aes, 32).unwrap();
    keys.insert("journal-dek", KeyType::Dek, &dek).unwrap();
    keys.save().unwrap();
    let bank = Bank::start(&pki, Duration::from_millis(1)).await;
    let rest = format!(
        r#"[keys]
store = "keys.toml"
master_key_file = "master.key"
journal_key = "journal-dek"

[journal]
dir = "journal"

[[institution]]
id = "100001"

[[bank]]
id = "200001"
address = "{}"
server_name = "bank"

[[route]]
pan_prefix = "4"
bank = "200001"
"#,
        bank.addr
    );
    let config = testkit::write_config(&dir.0, "", "", &rest);
    let mut daemon = Daemon::start(BIN, &config);

    let stream = connect(daemon.addr, &pki.client("100001")).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let decoder = FrameDecoder::new(Framing::U16be, 8192);
    let dialect = testkit::dialect();
    let mut buf = BytesMut::new();
    let (mut sent, mut approved, mut answered) = (0, 0, 0);
    tokio::time::timeout(WAIT, async {
        while answered < TOTAL {
            while sent < TOTAL && sent - answered < WINDOW {
                wr.write_all(&request(sent)).await.unwrap();
                sent += 1;
            }
            wr.flush().await.unwrap();
            assert!(rd.read_buf(&mut buf).await.unwrap() > 0, "switch closed");
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                let m = Message::decode(dialect, frame).unwrap();
                answered += 1;
                approved += usize::from(m.field(39) == Some(b"00"));
            }
        }
    })
    .await
    .expect("every payment answered");
    assert_eq!(approved, TOTAL, "the bank approves them all");
    daemon.terminate();
    assert_eq!(daemon.wait_exit().code(), Some(0));

    let journal = dir.0.join("journal");
    let bytes = all_bytes(&journal);
    let index = windows(&bytes);
    assert!(bytes.len() > TOTAL * 100, "{} bytes journaled", bytes.len());
    let mut leaks = Vec::new();
    for i in 0..TOTAL {
        let (pan, track2, track1, pin_block, icc) = secrets(i);
        let checks: [(&str, &[u8]); 5] = [
            ("PAN", pan.as_bytes()),
            ("track 2", track2.as_bytes()),
            ("track 1", track1.as_bytes()),
            ("PIN block", &pin_block),
            ("ICC data", &icc),
        ];
        for (what, secret) in checks {
            if contains(&bytes, &index, secret) {
                leaks.push(format!("card {i}: {what}"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "clear card data in the journal: {leaks:?}"
    );
    // The search does find what is there: the masked PAN the journal keeps.
    let first = pan(0);
    let masked = format!("{}******{}", &first[..6], &first[12..]);
    assert!(contains(&bytes, &index, masked.as_bytes()));

    // The dump shows the PANs masked; settlement still adds the payments up.
    let dump = std::process::Command::new(BIN)
        .args(["journal", "dump", "--dir"])
        .arg(&journal)
        .output()
        .unwrap();
    assert!(dump.status.success());
    let text = String::from_utf8_lossy(&dump.stdout);
    let masked: HashSet<&str> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("pan="))
        .collect();
    assert!(!masked.is_empty(), "masked PANs in the dump");
    for i in [0, TOTAL / 2, TOTAL - 1] {
        let pan = pan(i);
        let shown = format!("{}******{}", &pan[..6], &pan[12..]);
        assert!(masked.contains(shown.as_str()), "{shown} in the dump");
        assert!(!text.contains(&pan), "clear PAN in the dump");
    }
    let settlement = std::process::Command::new(BIN)
        .args([
            "settlement",
            "--json",
            "--from",
            "0",
            "--to",
            "4102444800000",
            "--dir",
        ])
        .arg(&journal)
        .output()
        .unwrap();
    assert!(
        settlement.status.success(),
        "{}",
        String::from_utf8_lossy(&settlement.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&settlement.stdout).unwrap();
    let pair = &v["pairs"]["100001 -> 200001 EUR"];
    assert_eq!(pair["approved"], TOTAL as u64, "settlement: {v}");
}
