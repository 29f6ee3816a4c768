//! Graceful shutdown of a real `switchyard run` process: SIGTERM under load.
//! Every request the client sent gets an answer (the bank's, or 91 once the switch
//! is draining, or 68 at a deadline), the process exits 0, and the journal verifies
//! with nothing left unfinished.

use bytes::BytesMut;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use switchyard::journal::recovery::recover;
use switchyard::wire::{Dialect, FrameDecoder, Framing, Message};
use switchyard_tools::testkit::{self, connect, Bank, Daemon, Pki, TempDir, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `switchyard` binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Requests in flight on the client's connection.
const WINDOW: usize = 32;
/// Answers before SIGTERM.
const TERM_AFTER: usize = 300;

fn write_config(dir: &Path, bank: SocketAddr) -> PathBuf {
    let rest = format!(
        r#"[journal]
dir = "journal"

[[institution]]
id = "100001"

[[bank]]
id = "200001"
address = "{bank}"
server_name = "bank"
request_timeout_ms = 5000

[[route]]
pan_prefix = "4"
bank = "200001"
"#
    );
    testkit::write_config(dir, "shutdown_grace_ms = 20000", "", &rest)
}

/// Payment `n`, framed.
fn request(n: usize) -> Vec<u8> {
    testkit::framed(&testkit::payment(n, "100001", "000000001000"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_everything_and_exits_0() {
    let dir = TempDir::new("drain");
    let pki = Pki::write(&dir.0);
    let bank = Bank::start(&pki, Duration::from_millis(20)).await;
    let mut daemon = Daemon::start(BIN, &write_config(&dir.0, bank.addr));
    let stream = connect(daemon.addr, &pki.client("100001")).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let d = Dialect::iso87_ascii();
    let decoder = FrameDecoder::new(Framing::U16be, 8192);
    let mut buf = BytesMut::new();
    let mut answers: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut sent = 0usize;
    let mut terminated = false;
    let mut stop_sending = false;
    let run = async {
        loop {
            // Keep the window full until the switch says it is going down.
            while !stop_sending && sent - answers.len() < WINDOW && sent < 100_000 {
                sent += 1;
                wr.write_all(&request(sent)).await.unwrap();
            }
            wr.flush().await.unwrap();
            if answers.len() >= TERM_AFTER && !terminated {
                daemon.terminate();
                terminated = true;
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                let m = Message::decode(&d, frame).unwrap();
                let n: usize = std::str::from_utf8(m.field(11).unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                let code = m.field(39).unwrap().to_vec();
                stop_sending |= code == b"91";
                assert!(
                    answers.insert(n, code).is_none(),
                    "request {n} answered twice"
                );
            }
        }
    };
    tokio::time::timeout(WAIT, run)
        .await
        .expect("the switch closed the connection");
    assert!(terminated, "SIGTERM was sent");
    let missing: Vec<usize> = (1..=sent).filter(|n| !answers.contains_key(n)).collect();
    assert!(missing.is_empty(), "unanswered: {missing:?}");
    let codes = |c: &[u8]| answers.values().filter(|v| v.as_slice() == c).count();
    assert_eq!(
        codes(b"00") + codes(b"91") + codes(b"68"),
        sent,
        "{answers:?}"
    );
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(0), "exit status");
    println!(
        "sent {sent}: {} approved, {} answered 91 while draining, {} timed out; exit 0",
        codes(b"00"),
        codes(b"91"),
        codes(b"68")
    );
    // The journal verifies, and nothing is left unfinished.
    let journal = dir.0.join("journal");
    let out = std::process::Command::new(BIN)
        .args(["journal", "verify", "--dir"])
        .arg(&journal)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, r) = recover(&journal).unwrap();
    assert!(
        r.unfinished.is_empty(),
        "unfinished: {:?}",
        r.unfinished.len()
    );
    bank.stop().await;
}
