//! Working-key rotation through a real `switchyard run`, under load: two simulated
//! banks (in this process, over mutual TLS) check the MAC of every request and MAC
//! every answer, one with a TDES ZAK (retail MAC) under a TDES ZMK, one with an AES
//! ZAK (AES-CMAC) under an AES ZMK. While a client keeps payments in flight to both,
//! `switchyard keys rotate` changes each bank's ZAK through the admin endpoint.
//!
//! Checked: each rotation is reported ok with the new key's check value, which is
//! the bank's new key; no MAC fails on either side (the banks' counters, the
//! switch's `switchyard_mac_failures_total`); every payment is answered 00; once
//! the rotations are done, every request reaches the banks under the new key; the
//! TDES bank's ZPK rotates too; the key store holds the new keys, and a restarted
//! switch uses them.

use bytes::BytesMut;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use switchyard::core::link::kcv_hex;
use switchyard::wire::{FrameDecoder, Framing, Message, Mti};
use switchyard_security::module::MacAlgorithm;
use switchyard_security::store::{KeyStore, KeyType};
use switchyard_security::{Algorithm, Key};
use switchyard_tools::banksim::{self, BankSimOptions, BankStats, Behavior, SimKeys};
use switchyard_tools::testkit::{self, Daemon, Pki, TempDir, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The `switchyard` binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

const TDES_ZMK: &str = "0123456789ABCDEFFEDCBA9876543210";
const TDES_ZAK: &str = "89ABCDEF0123456776543210FEDCBA98";
const TDES_ZPK: &str = "F1E2D3C4B5A69788796A5B4C3D2E1F00";
const AES_ZMK: &str = "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F";
const AES_ZAK: &str = "2B7E151628AED2A6ABF7158809CF4F3C";

/// Payments kept in flight by the client.
const WINDOW: usize = 32;
/// Payments answered before the rotations are asked for.
const ANSWERED_BEFORE: usize = 1_000;
/// Payments answered after the rotations, before the load stops.
const ANSWERED_AFTER: usize = 1_000;
/// Payments sent once the load has stopped and drained: all must arrive under the
/// new keys.
const PAYMENTS_LATER: usize = 500;
/// Most payments the load sends, whatever happens (a bound, not a target).
const PAYMENTS_MAX: usize = 50_000;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn key(algorithm: Algorithm, hex: &str) -> Key {
    Key::new(algorithm, &unhex(hex)).unwrap()
}

fn hex_kcv(kcv: [u8; 3]) -> String {
    String::from_utf8(kcv_hex(kcv).to_vec()).unwrap()
}

fn key_store(dir: &Path) {
    let (store, master) = (dir.join("keys.toml"), dir.join("master.key"));
    let mut keys = KeyStore::init(&store, &master).unwrap();
    let entries = [
        ("zmk-tdes", KeyType::Zmk, key(Algorithm::Tdes, TDES_ZMK)),
        ("zak-tdes", KeyType::Zak, key(Algorithm::Tdes, TDES_ZAK)),
        ("zpk-tdes", KeyType::Zpk, key(Algorithm::Tdes, TDES_ZPK)),
        ("zmk-aes", KeyType::Zmk, key(Algorithm::Aes, AES_ZMK)),
        ("zak-aes", KeyType::Zak, key(Algorithm::Aes, AES_ZAK)),
    ];
    for (id, kind, k) in &entries {
        keys.insert(id, *kind, k).unwrap();
    }
    keys.save().unwrap();
}

/// A simulated bank with `keys`, certified as `bank-<id>`.
struct Bank {
    port: u16,
    keys: Arc<SimKeys>,
    stats: Arc<BankStats>,
}

async fn start_bank(pki: &Pki, id: &str, keys: SimKeys, stop: &Arc<tokio::sync::Notify>) -> Bank {
    let issued = pki.ca.issue_server(&[&format!("bank-{id}")]).unwrap();
    let tls = switchyard::tls::server_config(
        &[pki.ca.ca_der()],
        issued.chain().unwrap(),
        issued.key().unwrap(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let keys = Arc::new(keys);
    let stats = Arc::new(BankStats::default());
    let opts = BankSimOptions {
        dialect: Arc::new(switchyard::wire::Dialect::iso87_ascii()),
        framing: Framing::U16be,
        header: switchyard::wire::MessageHeader::None,
        frame_size_max_bytes: 8192,
        seed: 1,
        keys: Some(keys.clone()),
    };
    let stopped = stop.clone();
    tokio::spawn(banksim::serve(
        listener,
        tls,
        opts,
        Arc::new(Behavior::default()),
        stats.clone(),
        async move { stopped.notified().await },
    ));
    Bank { port, keys, stats }
}

fn config(dir: &Path, tdes: &Bank, aes: &Bank) -> std::path::PathBuf {
    let rest = format!(
        r#"[admin]
listen = "127.0.0.1:0"

[keys]
store = "keys.toml"
master_key_file = "master.key"

[[institution]]
id = "100001"

[[bank]]
id = "200001"
address = "127.0.0.1:{}"
server_name = "bank-200001"
links = 2
mac_key = "zak-tdes"
mac = "iso9797-3"
pin_key = "zpk-tdes"
pin_block_format = "iso0"
zmk_key = "zmk-tdes"

[[bank]]
id = "200002"
address = "127.0.0.1:{}"
server_name = "bank-200002"
links = 2
mac_key = "zak-aes"
mac = "aes-cmac"
zmk_key = "zmk-aes"

[[route]]
pan_prefix = "4"
bank = "200001"

[[route]]
pan_prefix = "5"
bank = "200002"
"#,
        tdes.port, aes.port
    );
    testkit::write_config(dir, "", "", &rest)
}

/// Starts the switch and waits until all four bank links are up.
fn start_switch(config: &Path) -> Daemon {
    let mut daemon = Daemon::start(BIN, config);
    for _ in 1..4 {
        daemon.wait_line("bank link up");
    }
    daemon
}

/// Payment `n`, framed: to the TDES bank when even, the AES bank when odd; DE11,
/// DE7 and DE37 from `n`, so that no two are duplicates.
fn payment(n: usize) -> Vec<u8> {
    let pan: &[u8] = if n % 2 == 0 {
        b"4111111111111111"
    } else {
        b"5500000000000004"
    };
    let stan = format!("{:06}", (n - 1) % 999_999 + 1);
    let t = n % 86_400;
    let de7 = format!("1126{:02}{:02}{:02}", t / 3600, (t / 60) % 60, t % 60);
    let rrn = format!("{n:012}");
    testkit::framed(&testkit::message(
        Mti::FINANCIAL,
        &[
            (2, pan),
            (3, b"000000"),
            (4, b"000000001000"),
            (7, de7.as_bytes()),
            (11, stan.as_bytes()),
            (32, b"100001"),
            (37, rrn.as_bytes()),
            (49, b"978"),
        ],
    ))
}

/// What a load run saw: payments sent, and the answers that were not 00.
#[derive(Debug, Default)]
struct Seen {
    sent: usize,
    answered: usize,
    not_approved: Vec<(String, String)>,
}

/// Sends payments `first`, `first + 1`, … to the switch at `addr`, `WINDOW` in
/// flight, until `count` are sent or `stop` is set (at most [`PAYMENTS_MAX`]),
/// then waits for every answer; `progress` follows the answers.
async fn drive(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    first: usize,
    count: usize,
    stop: Arc<AtomicBool>,
    progress: watch::Sender<usize>,
) -> Seen {
    let mut stream = testkit::connect(addr, &tls).await.unwrap();
    let decoder = FrameDecoder::new(Framing::U16be, 8192);
    let mut buf = BytesMut::new();
    let mut seen = Seen::default();
    let count = count.min(PAYMENTS_MAX);
    loop {
        let stopped = stop.load(Ordering::Relaxed);
        let mut out = Vec::new();
        while seen.sent - seen.answered < WINDOW && seen.sent < count && !stopped {
            out.extend_from_slice(&payment(first + seen.sent));
            seen.sent += 1;
        }
        if !out.is_empty() {
            stream.write_all(&out).await.unwrap();
            stream.flush().await.unwrap();
        }
        if seen.answered == seen.sent && (stopped || seen.sent == count) {
            return seen;
        }
        let read = tokio::time::timeout(WAIT, stream.read_buf(&mut buf))
            .await
            .expect("answers in time")
            .unwrap();
        assert!(read > 0, "the switch closed the connection");
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            let answer = Message::decode(testkit::dialect(), frame).unwrap();
            seen.answered += 1;
            if answer.field(39) != Some(b"00") {
                let text = |n| String::from_utf8_lossy(answer.field(n).unwrap_or(b"")).into_owned();
                seen.not_approved.push((text(11), text(39)));
            }
        }
        progress.send_replace(seen.answered);
    }
}

/// `switchyard keys rotate` for `bank`'s ZAK: its exit status and JSON answer.
async fn rotate(admin: std::net::SocketAddr, bank: &str, kind: &str) -> (bool, serde_json::Value) {
    let (bank, kind) = (bank.to_owned(), kind.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args([
                "keys", "rotate", "--bank", &bank, "--type", &kind, "--admin",
            ])
            .arg(admin.to_string())
            .output()
            .expect("run switchyard keys rotate")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answer = serde_json::from_str(&stdout).unwrap_or_else(|_| {
        panic!(
            "keys rotate printed {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), answer)
}

/// The sum of every series of metric `name` on the admin endpoint.
async fn metric(admin: std::net::SocketAddr, name: &str) -> f64 {
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let request = "GET /metrics HTTP/1.1\r\nHost: switchyard\r\n\r\n";
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut text))
        .await
        .expect("metrics in time")
        .unwrap();
    testkit::parse_prometheus(&text)
        .into_iter()
        .filter(|(series, _)| series == name || series.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zaks_rotate_under_load_with_no_failed_mac() {
    let dir = TempDir::new("key-rotation");
    let pki = Pki::write(&dir.0);
    key_store(&dir.0);
    let stop_banks = Arc::new(tokio::sync::Notify::new());
    let tdes_keys = SimKeys::new(
        Some((MacAlgorithm::Iso9797Alg3, key(Algorithm::Tdes, TDES_ZAK))),
        Some(key(Algorithm::Tdes, TDES_ZPK)),
        Some(key(Algorithm::Tdes, TDES_ZMK)),
    );
    let aes_keys = SimKeys::new(
        Some((MacAlgorithm::AesCmac, key(Algorithm::Aes, AES_ZAK))),
        None,
        Some(key(Algorithm::Aes, AES_ZMK)),
    );
    let tdes = start_bank(&pki, "200001", tdes_keys, &stop_banks).await;
    let aes = start_bank(&pki, "200002", aes_keys, &stop_banks).await;
    let config = config(&dir.0, &tdes, &aes);
    let mut daemon = start_switch(&config);
    let admin = daemon.admin.expect("the admin endpoint's address");
    let client = pki.client("100001");
    let old_kcvs = [tdes.keys.mac_kcv().unwrap(), aes.keys.mac_kcv().unwrap()];

    // Refusals first: an unknown bank, a key the bank does not have.
    let (exited_ok, answer) = rotate(admin, "299999", "zak").await;
    assert!(!exited_ok && answer["ok"] == false, "{answer}");
    let (exited_ok, answer) = rotate(admin, "200002", "zpk").await;
    assert!(!exited_ok && answer["ok"] == false, "{answer}");
    assert!(
        answer["reason"].as_str().unwrap().contains("no zpk"),
        "{answer}"
    );

    // Load to both banks; both ZAKs rotated while it runs.
    let stop = Arc::new(AtomicBool::new(false));
    let (progress, mut answered) = watch::channel(0);
    let load = tokio::spawn(drive(
        daemon.addr,
        client.clone(),
        1,
        PAYMENTS_MAX,
        stop.clone(),
        progress,
    ));
    tokio::time::timeout(WAIT, answered.wait_for(|n| *n >= ANSWERED_BEFORE))
        .await
        .expect("load under way")
        .unwrap();
    let mut rotated = Vec::new();
    for bank in ["200001", "200002"] {
        let (exited_ok, answer) = rotate(admin, bank, "zak").await;
        assert!(exited_ok, "{answer}");
        rotated.push(answer);
    }
    let at = *answered.borrow();
    tokio::time::timeout(WAIT, answered.wait_for(|n| *n >= at + ANSWERED_AFTER))
        .await
        .expect("load goes on after the rotations")
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let seen = load.await.unwrap();
    println!(
        "load: {} payments; rotations answered at {at}: {rotated:?}",
        seen.sent
    );
    assert!(seen.not_approved.is_empty(), "{:?}", seen.not_approved);
    assert!(
        seen.sent < PAYMENTS_MAX,
        "the load stopped by itself, not at its bound"
    );

    // The rotations: ok, saved, the new keys the banks' own.
    for ((answer, bank), old) in rotated.iter().zip([&tdes, &aes]).zip(old_kcvs) {
        let new = bank.keys.mac_kcv().unwrap();
        assert_ne!(new, old);
        assert_eq!(answer["ok"], true, "{answer}");
        assert_eq!(answer["saved"], true, "{answer}");
        assert_eq!(answer["key"], "zak", "{answer}");
        assert_eq!(answer["kcv"], hex_kcv(new), "{answer}");
        assert_eq!(answer["previous_kcv"], hex_kcv(old), "{answer}");
        assert_eq!(count(&bank.stats.key_changes), 1);
        assert_eq!(count(&bank.stats.key_changes_refused), 0);
    }
    // No MAC failed anywhere, and both keys verified during the load.
    for bank in [&tdes, &aes] {
        assert_eq!(count(&bank.stats.mac_failures), 0);
        assert!(count(&bank.stats.mac_verified) > 0);
    }
    assert_eq!(metric(admin, "switchyard_mac_failures_total").await, 0.0);
    assert_eq!(metric(admin, "switchyard_key_changes_total").await, 2.0);

    // The TDES bank's ZPK too (a P0 key block; its PIN blocks are not checked).
    let old_zpk = tdes.keys.pin_kcv().unwrap();
    let (exited_ok, answer) = rotate(admin, "200001", "zpk").await;
    assert!(exited_ok, "{answer}");
    let new_zpk = tdes.keys.pin_kcv().unwrap();
    assert_ne!(new_zpk, old_zpk);
    assert_eq!(answer["kcv"], hex_kcv(new_zpk), "{answer}");
    assert_eq!(answer["key_id"], "zpk-tdes", "{answer}");
    assert_eq!(count(&tdes.stats.key_changes), 2);

    // Once the rotations are done and the load drained, every request comes under
    // the new keys.
    let previous = [&tdes, &aes].map(|b| count(&b.stats.mac_verified_previous));
    let current = [&tdes, &aes].map(|b| count(&b.stats.mac_verified));
    println!("at the banks: {current:?} under the current key, {previous:?} under the old");
    let (progress, _) = watch::channel(0);
    let later = drive(
        daemon.addr,
        client.clone(),
        seen.sent + 1,
        PAYMENTS_LATER,
        Arc::new(AtomicBool::new(false)),
        progress,
    )
    .await;
    assert!(later.not_approved.is_empty(), "{:?}", later.not_approved);
    for (i, bank) in [&tdes, &aes].into_iter().enumerate() {
        assert_eq!(count(&bank.stats.mac_verified_previous), previous[i]);
        assert_eq!(
            count(&bank.stats.mac_verified),
            current[i] + PAYMENTS_LATER as u64 / 2
        );
        assert_eq!(count(&bank.stats.mac_failures), 0);
    }
    assert_eq!(metric(admin, "switchyard_mac_failures_total").await, 0.0);

    // The key store holds the new keys; a restarted switch uses them.
    daemon.terminate();
    assert!(daemon.wait_exit().success());
    let store = KeyStore::open(&dir.0.join("keys.toml"), &dir.0.join("master.key")).unwrap();
    assert_eq!(
        store.get("zak-tdes").unwrap().kcv,
        tdes.keys.mac_kcv().unwrap()
    );
    assert_eq!(
        store.get("zak-aes").unwrap().kcv,
        aes.keys.mac_kcv().unwrap()
    );
    assert_eq!(store.get("zpk-tdes").unwrap().kcv, new_zpk);
    let daemon = start_switch(&config);
    let previous = [&tdes, &aes].map(|b| count(&b.stats.mac_verified_previous));
    let (progress, _) = watch::channel(0);
    let restarted = drive(
        daemon.addr,
        client,
        seen.sent + PAYMENTS_LATER + 1,
        20,
        Arc::new(AtomicBool::new(false)),
        progress,
    )
    .await;
    assert!(
        restarted.not_approved.is_empty(),
        "{:?}",
        restarted.not_approved
    );
    for (i, bank) in [&tdes, &aes].into_iter().enumerate() {
        assert_eq!(count(&bank.stats.mac_verified_previous), previous[i]);
        assert_eq!(count(&bank.stats.mac_failures), 0);
    }
    drop(daemon);
    stop_banks.notify_waiters();
}
