//! Hostile traffic against a running daemon (`switchyard run` as a child process)
//! while a well-behaved institution keeps paying: it must get every answer, and the
//! daemon's memory must stay bounded.
//!
//! The attacks, each from its own connections, all at once:
//! random bytes; truncated frames; length headers past the frame limit; bitmaps
//! announcing fields that are not there; LL/LLL lengths past the field's maximum;
//! non-digits in numeric fields; unknown MTIs; a peer trickling one byte at a time;
//! a peer that sends and never reads; thousands of connections opened and dropped
//! (before and after the handshake); TLS clients with no certificate and with a
//! certificate from another CA.
//!
//! Prints the good institution's answer count and the daemon's peak memory.

use bytes::BytesMut;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchyard::wire::{Dialect, FrameDecoder, Framing, Message};
use switchyard_tools::testkit::{self, connect, Bank, Daemon, Pki, TempDir, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `switchyard` binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// The daemon's peak resident memory must stay under this, KiB.
const PEAK_MEMORY_MAX_KIB: u64 = 512 * 1024;

fn write_config(dir: &Path, bank: SocketAddr) -> PathBuf {
    let rest = format!(
        r#"[limits]
frame_size_max_bytes = 2048
connections_max = 4000
connections_per_institution_max = 2000
inflight_per_connection_max = 256
idle_timeout_ms = 2000
frame_read_timeout_ms = 500
write_timeout_ms = 1000

[duplicates]
window_s = 60
memory_max_bytes = 67108864

[[institution]]
id = "100001"
rate_per_s = 1000000
rate_burst = 100000

[[institution]]
id = "100666"
rate_per_s = 1000000
rate_burst = 100000

[[bank]]
id = "200001"
address = "{bank}"
server_name = "bank"
links = 2

[[route]]
pan_prefix = "4"
bank = "200001"
"#
    );
    testkit::write_config(dir, "", "handshake_timeout_ms = 1000", &rest)
}

/// Payment `n` of `acquirer`, framed.
fn payment(n: usize, acquirer: &str) -> Vec<u8> {
    testkit::framed(&testkit::payment(n, acquirer, "000000001000"))
}

/// Raw ISO 8583 bytes, framed, that do not match the dialect.
fn malformed() -> Vec<Vec<u8>> {
    let frame = |body: &[u8]| {
        let mut out = (body.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    };
    let good = payment(1, "100666");
    let body = &good[2..];
    let mut bad = Vec::new();
    // A bitmap announcing fields 2..64 with nothing after it.
    let mut b = b"0200".to_vec();
    b.extend_from_slice(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    bad.push(frame(&b));
    // DE2 with LL 99 (its maximum is 19).
    let mut b = b"0200".to_vec();
    b.extend_from_slice(&[0x40, 0, 0, 0, 0, 0, 0, 0]);
    b.extend_from_slice(b"99");
    b.extend_from_slice(&[b'4'; 99]);
    bad.push(frame(&b));
    // Non-digits in DE4 (numeric), at its place in a good message.
    let mut b = body.to_vec();
    let at = b.windows(12).position(|w| w == b"000000001000").unwrap();
    b[at..at + 12].copy_from_slice(b"00000000X0!0");
    bad.push(frame(&b));
    // Unknown MTIs.
    let mut b = body.to_vec();
    b[..4].copy_from_slice(b"9999");
    bad.push(frame(&b));
    let mut b = body.to_vec();
    b[..4].copy_from_slice(b"02A0");
    bad.push(frame(&b));
    // Truncated: the frame says more than it holds, then the peer closes.
    let mut b = frame(body);
    b.truncate(b.len() / 2);
    bad.push(b);
    // A length header past the frame limit.
    bad.push(vec![0xff, 0xff, b'0', b'2']);
    bad
}

/// A small xorshift generator: the random bytes are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes `bytes` on a fresh connection (errors ignored: the switch may close it)
/// and reads until the switch closes it or [`WAIT`] passes; true if it closed it.
async fn send_and_wait_close(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    bytes: &[u8],
) -> bool {
    let Ok(mut s) = connect(addr, tls).await else {
        return true;
    };
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_traffic_costs_the_good_institution_nothing() {
    let dir = TempDir::new("hostile");
    let pki = Pki::write(&dir.0);
    let bank = Bank::start(&pki, Duration::ZERO).await;
    let daemon = Daemon::start(BIN, &write_config(&dir.0, bank.addr));
    let addr = daemon.addr;
    let good_tls = pki.client("100001");
    let bad_tls = pki.client("100666");

    // The good institution pays, one request at a time, until the attacks end.
    let attacks_done = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicU64::new(0));
    let good = tokio::spawn({
        let (done, answers, tls) = (attacks_done.clone(), answers.clone(), good_tls.clone());
        async move {
            let mut s = connect(addr, &tls).await.unwrap();
            let decoder = FrameDecoder::new(Framing::U16be, 8192);
            let d = Dialect::iso87_ascii();
            let mut buf = BytesMut::new();
            let mut n = 0u32;
            while !done.load(Ordering::Relaxed) && n < 1_000_000 {
                n += 1;
                let stan = format!("{:06}", (n - 1) % 999_999 + 1); // as `payment` sets DE11
                s.write_all(&payment(n as usize, "100001")).await.unwrap();
                let frame = loop {
                    if let Some(f) = decoder.decode(&mut buf).unwrap() {
                        break f;
                    }
                    let read = tokio::time::timeout(WAIT, s.read_buf(&mut buf)).await;
                    assert!(matches!(read, Ok(Ok(k)) if k > 0), "good connection lost");
                };
                let a = Message::decode(&d, frame).unwrap();
                assert_eq!(a.field(39), Some(&b"00"[..]), "good payment {n} approved");
                assert_eq!(a.field(11), Some(stan.as_bytes()));
                answers.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    let mut attacks = tokio::task::JoinSet::new();
    // Random bytes, after the handshake.
    for seed in 1..=50u64 {
        let tls = bad_tls.clone();
        attacks.spawn(async move {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let bytes: Vec<u8> = (0..2048).map(|_| rng.next() as u8).collect();
            assert!(
                send_and_wait_close(addr, &tls, &bytes).await,
                "random bytes"
            );
        });
    }
    // Malformed messages: each is answered 30, dropped, or closes the connection;
    // none leaves the daemon or the good client worse off.
    for bad in malformed() {
        let tls = bad_tls.clone();
        attacks.spawn(async move {
            for _ in 0..20 {
                let Ok(mut s) = connect(addr, &tls).await else {
                    continue;
                };
                let _ = s.write_all(&bad).await;
                let _ = s.shutdown().await;
                let mut sink = Vec::new();
                let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
            }
        });
    }
    // A peer trickling a frame one byte at a time: cut off by the frame timeout.
    {
        let tls = bad_tls.clone();
        attacks.spawn(async move {
            let mut s = connect(addr, &tls).await.unwrap();
            let frame = payment(777, "100666");
            let trickle = async {
                for b in frame.iter().cycle().take(10_000) {
                    if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await; // the attack's pace
                }
            };
            assert!(
                tokio::time::timeout(WAIT, trickle).await.is_ok(),
                "trickling peer cut off"
            );
        });
    }
    // A peer that sends requests and never reads: cut off by the write timeout.
    {
        let tls = bad_tls.clone();
        attacks.spawn(async move {
            let mut s = connect(addr, &tls).await.unwrap();
            let mut batch = Vec::new();
            for i in 0..100u32 {
                batch.extend_from_slice(&payment(i as usize + 1, "100666"));
            }
            let flood = async {
                for _ in 0..10_000 {
                    if s.write_all(&batch).await.is_err() {
                        return;
                    }
                }
            };
            assert!(
                tokio::time::timeout(WAIT, flood).await.is_ok(),
                "non-reading peer cut off"
            );
        });
    }
    // Thousands of connections opened and dropped: TCP only, and after a handshake.
    attacks.spawn(async move {
        for _ in 0..2_000 {
            if let Ok(tcp) = tokio::net::TcpStream::connect(addr).await {
                drop(tcp);
            }
        }
    });
    {
        let tls = bad_tls.clone();
        attacks.spawn(async move {
            for _ in 0..300 {
                if let Ok(s) = connect(addr, &tls).await {
                    drop(s);
                }
            }
        });
    }
    // TLS clients without a certificate, and with one from another CA.
    let ca_der = pki_ca_der(&dir.0);
    attacks.spawn(async move {
        let anonymous =
            switchyard::tls::client_config_anonymous(std::slice::from_ref(&ca_der)).unwrap();
        let stranger_ca = switchyard_tools::certs::DevCa::new("stranger CA").unwrap();
        let stranger = stranger_ca.issue_client("100001").unwrap();
        let wrong = switchyard::tls::client_config(
            &[ca_der],
            stranger.chain().unwrap(),
            stranger.key().unwrap(),
        )
        .unwrap();
        for tls in [anonymous, wrong] {
            for _ in 0..50 {
                if let Ok(mut s) = connect(addr, &tls).await {
                    // TLS 1.3 reports a refused client certificate on the first read.
                    let _ = s.write_all(&payment(1, "100001")).await;
                    let mut buf = [0u8; 64];
                    let read = tokio::time::timeout(WAIT, s.read(&mut buf)).await;
                    assert!(
                        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
                        "no answer without a valid certificate"
                    );
                }
            }
        }
    });

    while let Some(done) = attacks.join_next().await {
        done.unwrap();
    }
    attacks_done.store(true, Ordering::Relaxed);
    tokio::time::timeout(WAIT, good).await.unwrap().unwrap();
    let mut daemon = daemon;
    assert!(daemon.is_running(), "the daemon survived");
    let peak = daemon.peak_memory_kib();
    let good_answers = answers.load(Ordering::Relaxed);
    println!(
        "good institution: {good_answers} answers, all approved; daemon peak memory: {} KiB",
        peak.map_or("unknown".to_owned(), |k| k.to_string())
    );
    assert!(good_answers > 0);
    if let Some(peak) = peak {
        assert!(peak < PEAK_MEMORY_MAX_KIB, "peak memory {peak} KiB");
    }
    daemon.kill();
    bank.stop().await;
}

/// The test CA's certificate, as written to `dir`.
fn pki_ca_der(dir: &Path) -> rustls::pki_types::CertificateDer<'static> {
    switchyard::tls::load_certs(&dir.join("ca.pem"))
        .unwrap()
        .remove(0)
}
