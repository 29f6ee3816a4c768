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
//!
//! The second test runs the same switch with `[keys] module = "payshield"` on the
//! payShield test double (see [`payshield_module_carries_macs_pins_and_a_rotation`]).

use bytes::BytesMut;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use switchyard::core::link::kcv_hex;
use switchyard::wire::{FrameDecoder, Framing, Message, Mti};
use switchyard_security::module::MacAlgorithm;
use switchyard_security::responder::{Responder, ResponderConfig};
use switchyard_security::store::{KeyStore, KeyType};
use switchyard_security::{kcv, mac, pin, Algorithm, Key};
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

/// The two banks: 200001 with a TDES ZAK, ZPK and ZMK, 200002 with an AES ZAK
/// and ZMK.
async fn start_banks(pki: &Pki, stop: &Arc<tokio::sync::Notify>) -> (Bank, Bank) {
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
    (
        start_bank(pki, "200001", tdes_keys, stop).await,
        start_bank(pki, "200002", aes_keys, stop).await,
    )
}

fn config(dir: &Path, tdes: &Bank, aes: &Bank) -> std::path::PathBuf {
    config_with(dir, tdes, aes, "", "")
}

/// The switch's config: `keys` after the store's settings, `institution` after
/// the institution's id.
fn config_with(
    dir: &Path,
    tdes: &Bank,
    aes: &Bank,
    keys: &str,
    institution: &str,
) -> std::path::PathBuf {
    let rest = format!(
        r#"[admin]
listen = "127.0.0.1:0"

[keys]
store = "keys.toml"
master_key_file = "master.key"
{keys}

[[institution]]
id = "100001"
{institution}

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

/// What a load run saw: payments sent, the answers that were not 00, and the
/// answers whose MAC the client could not verify.
#[derive(Debug, Default)]
struct Seen {
    sent: usize,
    answered: usize,
    not_approved: Vec<(String, String)>,
    bad_answer_macs: usize,
}

/// What a load sends and how it checks answers: payment `n`, framed, and
/// whether an answer (unframed) carries a good MAC for the client.
#[derive(Clone, Copy)]
struct Load {
    payment: fn(usize) -> Vec<u8>,
    answer_ok: fn(&[u8]) -> bool,
}

/// The first test's load: no MAC or PIN between client and switch.
const PLAIN: Load = Load {
    payment,
    answer_ok: |_| true,
};

/// Sends payments `first`, `first + 1`, … to the switch at `addr`, `WINDOW` in
/// flight, until `count` are sent or `stop` is set (at most [`PAYMENTS_MAX`]),
/// then waits for every answer; `progress` follows the answers.
async fn drive(
    load: Load,
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
            out.extend_from_slice(&(load.payment)(first + seen.sent));
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
            if !(load.answer_ok)(&frame) {
                seen.bad_answer_macs += 1;
            }
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

/// Payments from 1 while the ZAKs of `banks` rotate: `before` answered, then
/// the rotations (each must exit 0), then `after` more answered, then the load
/// stops. What the load saw, the rotations' answers, and the answers counted
/// when the rotations were done.
async fn rotate_under_load(
    load: Load,
    daemon: &Daemon,
    client: Arc<rustls::ClientConfig>,
    banks: &[&str],
    (before, after): (usize, usize),
) -> (Seen, Vec<serde_json::Value>, usize) {
    let admin = daemon.admin.expect("the admin endpoint's address");
    let stop = Arc::new(AtomicBool::new(false));
    let (progress, mut answered) = watch::channel(0);
    let running = tokio::spawn(drive(
        load,
        daemon.addr,
        client,
        1,
        PAYMENTS_MAX,
        stop.clone(),
        progress,
    ));
    tokio::time::timeout(WAIT, answered.wait_for(|n| *n >= before))
        .await
        .expect("load under way")
        .unwrap();
    let mut rotated = Vec::new();
    for bank in banks {
        let (exited_ok, answer) = rotate(admin, bank, "zak").await;
        assert!(exited_ok, "{answer}");
        rotated.push(answer);
    }
    let at = *answered.borrow();
    tokio::time::timeout(WAIT, answered.wait_for(|n| *n >= at + after))
        .await
        .expect("load goes on after the rotations")
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    (running.await.unwrap(), rotated, at)
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
    let (tdes, aes) = start_banks(&pki, &stop_banks).await;
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
    let (seen, rotated, at) = rotate_under_load(
        PLAIN,
        &daemon,
        client.clone(),
        &["200001", "200002"],
        (ANSWERED_BEFORE, ANSWERED_AFTER),
    )
    .await;
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
        PLAIN,
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
        PLAIN,
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

// === The same switch on a payShield ===

/// The test double's LMK (AES-128): key tokens are TR-31 blocks under it.
const LMK: &str = "00112233445566778899AABBCCDDEEFF";
/// The acquirer's keys: a TDES ZAK (retail MAC) and ZPK (ISO 0 PIN blocks).
const ACQ_ZAK: &str = "0123456789ABCDEFFEDCBA9876543210";
const ACQ_ZPK: &str = "1C1C1C1C1C1C1C1C5D5D5D5D5D5D5D5D";
/// A PIN block under another key: deciphers to no valid PIN block.
const WRONG_ZPK: &str = "2A2A2A2A2A2A2A2A3B3B3B3B3B3B3B3B";

/// Payments of the payShield test answered before the rotation is asked for,
/// and after it.
const HSM_ANSWERED_BEFORE: usize = 300;
const HSM_ANSWERED_AFTER: usize = 300;

/// The keys file of the payShield: every key of the switch as a token of
/// `responder`, with its check value.
fn hsm_keys_file(dir: &Path, responder: &Responder) {
    use switchyard_security::module::Usage;
    let entries = [
        ("zak-acq", "zak", ACQ_ZAK, Algorithm::Tdes, Usage::Mac),
        ("zpk-acq", "zpk", ACQ_ZPK, Algorithm::Tdes, Usage::Pin),
        (
            "zmk-tdes",
            "zmk",
            TDES_ZMK,
            Algorithm::Tdes,
            Usage::KeyEncryption,
        ),
        ("zak-tdes", "zak", TDES_ZAK, Algorithm::Tdes, Usage::Mac),
        ("zpk-tdes", "zpk", TDES_ZPK, Algorithm::Tdes, Usage::Pin),
        (
            "zmk-aes",
            "zmk",
            AES_ZMK,
            Algorithm::Aes,
            Usage::KeyEncryption,
        ),
        ("zak-aes", "zak", AES_ZAK, Algorithm::Aes, Usage::Mac),
    ];
    let mut text = String::new();
    for (id, kind, hex, algorithm, usage) in entries {
        let k = key(algorithm, hex);
        let token = responder.token(usage, &k).unwrap();
        let algorithm = if algorithm == Algorithm::Tdes {
            "tdes"
        } else {
            "aes"
        };
        text.push_str(&format!(
            "[[key]]\nid = \"{id}\"\ntype = \"{kind}\"\nalgorithm = \"{algorithm}\"\nlength = {}\n\
             token = \"{token}\"\nkcv = \"{}\"\n\n",
            hex.len() / 2,
            hex_kcv(kcv::kcv(&k))
        ));
    }
    std::fs::write(dir.join("hsm-keys.toml"), text).unwrap();
}

/// The config of the switch on the payShield at `hsm`; the acquirer MACs its
/// requests and sends ISO 0 PIN blocks.
fn hsm_config(
    dir: &Path,
    tdes: &Bank,
    aes: &Bank,
    hsm: std::net::SocketAddr,
) -> std::path::PathBuf {
    let keys = format!(
        "module = \"payshield\"\n\n[keys.payshield]\naddress = \"{hsm}\"\nkeys_file = \
         \"hsm-keys.toml\"\nconnections_max = 8\ntimeout_ms = 2000\n"
    );
    let institution = "mac_key = \"zak-acq\"\nmac = \"iso9797-3\"\npin_key = \"zpk-acq\"\n\
                       pin_block_format = \"iso0\"\n";
    config_with(dir, tdes, aes, &keys, institution)
}

/// Payment `n` as the acquirer sends it: [`payment`]'s fields, an ISO 0 PIN
/// block of PIN 1234 under `zpk` (to the TDES bank, which has a ZPK), and the
/// retail MAC under the acquirer's ZAK in DE64.
fn hsm_payment_under(n: usize, zpk: &str, tamper: bool) -> Vec<u8> {
    let plain = payment(n);
    let msg = Message::decode(testkit::dialect(), bytes::Bytes::from(plain[2..].to_vec())).unwrap();
    let mut fields: Vec<(u8, Vec<u8>)> = (2..=63)
        .filter_map(|i| msg.field(i).map(|v| (i, v.to_vec())))
        .collect();
    if n % 2 == 0 {
        let pan = msg.field(2).unwrap();
        let block = pin::encipher(
            pin::Format::Iso0,
            &key(Algorithm::Tdes, zpk),
            b"1234",
            pan,
            &mut pin::random_fill,
        )
        .unwrap();
        fields.push((52, block.to_vec()));
    }
    fields.sort_by_key(|(i, _)| *i);
    fields.push((64, vec![0; 8]));
    let refs: Vec<(u8, &[u8])> = fields.iter().map(|(i, v)| (*i, v.as_slice())).collect();
    let mut raw = testkit::message(Mti::FINANCIAL, &refs).to_vec();
    let at = raw.len() - 8;
    let mac = mac::retail_mac(&key(Algorithm::Tdes, ACQ_ZAK), &raw[..at]).unwrap();
    raw[at..].copy_from_slice(&mac);
    if tamper {
        raw[at] ^= 1;
    }
    testkit::framed(&raw)
}

fn hsm_payment(n: usize) -> Vec<u8> {
    hsm_payment_under(n, ACQ_ZPK, false)
}

/// Whether an answer to the acquirer carries its retail MAC in DE64.
fn acquirer_mac_ok(raw: &[u8]) -> bool {
    let Some(at) = raw.len().checked_sub(8) else {
        return false;
    };
    mac::verify_retail_mac(&key(Algorithm::Tdes, ACQ_ZAK), &raw[..at], &raw[at..]).is_ok()
}

const HSM_LOAD: Load = Load {
    payment: hsm_payment,
    answer_ok: acquirer_mac_ok,
};

/// One framed request on a new connection, and its answer's DE39.
async fn one_answer(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    request: &[u8],
) -> String {
    let mut stream = testkit::connect(addr, &tls).await.unwrap();
    stream.write_all(request).await.unwrap();
    stream.flush().await.unwrap();
    let decoder = FrameDecoder::new(Framing::U16be, 8192);
    let mut buf = BytesMut::new();
    loop {
        if let Some(frame) = decoder.decode(&mut buf).unwrap() {
            let answer = Message::decode(testkit::dialect(), frame).unwrap();
            return String::from_utf8_lossy(answer.field(39).unwrap_or(b"")).into_owned();
        }
        let read = tokio::time::timeout(WAIT, stream.read_buf(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(read > 0, "the switch closed the connection");
    }
}

/// `[keys] module = "payshield"` through a real `switchyard run`, the payShield
/// being the test double of `switchyard-security` (built on the software
/// module; see its docs for what that does and does not prove). The same two
/// banks as above; the acquirer now MACs its requests and sends PIN blocks.
///
/// Checked: every payment is answered 00 with a MAC the acquirer verifies,
/// every MAC and PIN translation went to the HSM; a tampered MAC is answered
/// 63 and a PIN block under a wrong key 81, neither reaching a bank; the AES
/// bank's ZAK rotates under load through `A0` with no failed MAC, and the new
/// token is written to the tokens file; with the HSM gone, payments are
/// answered 96 (not 63 or 81); a tokens file whose check value the HSM does not
/// confirm stops `switchyard run` at start-up; a restart uses the rotated token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payshield_module_carries_macs_pins_and_a_rotation() {
    let dir = TempDir::new("payshield-module");
    let pki = Pki::write(&dir.0);
    // The store holds no link keys here: the links' keys are on the HSM.
    let (store, master) = (dir.0.join("keys.toml"), dir.0.join("master.key"));
    KeyStore::init(&store, &master).unwrap().save().unwrap();
    let responder = Responder::start(ResponderConfig::new(key(Algorithm::Aes, LMK))).unwrap();
    hsm_keys_file(&dir.0, &responder);

    let stop_banks = Arc::new(tokio::sync::Notify::new());
    let (tdes, aes) = start_banks(&pki, &stop_banks).await;
    let config = hsm_config(&dir.0, &tdes, &aes, responder.address());
    let mut daemon = start_switch(&config);
    let admin = daemon.admin.expect("the admin endpoint's address");
    let client = pki.client("100001");

    // Refused at the switch, on the HSM's word: a tampered MAC, a PIN block
    // under another key.
    let banks_before = count(&tdes.stats.requests) + count(&aes.stats.requests);
    let commands_before = responder.commands();
    let tampered = hsm_payment_under(900_001, ACQ_ZPK, true);
    assert_eq!(
        one_answer(daemon.addr, client.clone(), &tampered).await,
        "63"
    );
    let wrong_pin = hsm_payment_under(900_002, WRONG_ZPK, false);
    assert_eq!(
        one_answer(daemon.addr, client.clone(), &wrong_pin).await,
        "81"
    );
    assert_eq!(
        count(&tdes.stats.requests) + count(&aes.stats.requests),
        banks_before
    );
    assert!(responder.commands() > commands_before);

    // Load through the HSM; the AES bank's ZAK rotated while it runs.
    let old_kcv = aes.keys.mac_kcv().unwrap();
    let (seen, rotated, _) = rotate_under_load(
        HSM_LOAD,
        &daemon,
        client.clone(),
        &["200002"],
        (HSM_ANSWERED_BEFORE, HSM_ANSWERED_AFTER),
    )
    .await;
    let rotated = &rotated[0];
    println!(
        "payShield load: {} payments, {} HSM commands",
        seen.sent,
        responder.commands()
    );
    assert!(seen.not_approved.is_empty(), "{:?}", seen.not_approved);
    assert_eq!(seen.bad_answer_macs, 0);
    let new_kcv = aes.keys.mac_kcv().unwrap();
    assert_ne!(new_kcv, old_kcv);
    assert_eq!(rotated["ok"], true, "{rotated}");
    assert_eq!(rotated["saved"], true, "{rotated}");
    assert_eq!(rotated["kcv"], hex_kcv(new_kcv), "{rotated}");
    for bank in [&tdes, &aes] {
        assert_eq!(count(&bank.stats.mac_failures), 0);
        assert!(count(&bank.stats.mac_verified) > 0);
    }
    // Two MACs checked or made by the HSM for each payment at least, and a PIN
    // translation for half of them.
    assert!(responder.commands() as usize >= 2 * seen.sent + seen.sent / 2);
    assert_eq!(metric(admin, "switchyard_payshield_busy_total").await, 0.0);
    assert!(metric(admin, "switchyard_payshield_commands_total").await >= seen.sent as f64);
    // The tokens file holds the new token.
    let keys = switchyard::hsm_keys::load(&dir.0.join("hsm-keys.toml")).unwrap();
    let zak = keys.iter().find(|k| k.id == "zak-aes").unwrap();
    assert_eq!(zak.kcv, new_kcv);

    // The HSM gone: answered 96, not 63 or 81 (without a MAC: none can be made).
    drop(responder);
    assert_eq!(
        one_answer(daemon.addr, client.clone(), &hsm_payment(900_003)).await,
        "96"
    );
    assert_eq!(
        one_answer(daemon.addr, client.clone(), &hsm_payment(900_004)).await,
        "96"
    );
    assert!(metric(admin, "switchyard_payshield_failures_total").await > 0.0);
    assert_eq!(
        metric(admin, "switchyard_answers_without_mac_total").await,
        2.0
    );
    daemon.terminate();
    assert!(daemon.wait_exit().success());

    // The HSM back (the same LMK, another port). A tokens file with a check
    // value the HSM does not confirm stops the switch at start-up.
    let responder = Responder::start(ResponderConfig::new(key(Algorithm::Aes, LMK))).unwrap();
    let config = hsm_config(&dir.0, &tdes, &aes, responder.address());
    let file = dir.0.join("hsm-keys.toml");
    let good = std::fs::read_to_string(&file).unwrap();
    // The check value line only: a token may hold the same six digits.
    let kcv_line = |kcv: &str| format!("kcv = \"{kcv}\"");
    let wrong = good.replace(&kcv_line(&hex_kcv(new_kcv)), &kcv_line("000000"));
    assert_ne!(wrong, good);
    std::fs::write(&file, wrong).unwrap();
    let refused = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("check value"), "{stderr}");

    // A restart from the rewritten file uses the rotated key.
    std::fs::write(&file, good).unwrap();
    let daemon = start_switch(&config);
    let (progress, _) = watch::channel(0);
    let restarted = drive(
        HSM_LOAD,
        daemon.addr,
        client,
        seen.sent + 1,
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
    assert_eq!(restarted.bad_answer_macs, 0);
    assert_eq!(count(&aes.stats.mac_failures), 0);
    drop(daemon);
    stop_banks.notify_waiters();
}
