//! Crash recovery against the real binary: a `switchyard run` process is killed
//! with SIGKILL while load runs, restarted on the same journal, and audited.
//!
//! The bank is a simulator in this test process (it outlives both switch
//! processes and logs every message it receives); the acquirer is a pipelining
//! client with a window of requests in flight. Each request has a unique DE11, DE7
//! and DE37, so the bank's log and the journal can be matched to the client's view.
//!
//! Checked, after the restart:
//! - every answer the client saw is in the journal with the same DE39;
//! - no request reached the bank twice (across the crash and the retransmissions);
//! - every request the bank saw whose outcome the journal does not hold (forwarded,
//!   unanswered) gets a reversal advice naming it (DE90: the STAN the bank saw and
//!   the original DE7) delivered to the bank after the restart;
//! - retransmitting every request from before the crash returns the original answer
//!   for those the client saw answered (same DE39 and DE38), 68 for those forwarded
//!   without an outcome, 91 for those never forwarded.
//!
//! A request whose outcome was durable but whose answer was still in the socket at
//! the kill is not reversed: the switch cannot know it was not delivered. Its
//! acquirer gets the answer again by retransmitting (checked here), or reverses it
//! with its own 0400, which the switch routes to the bank by DE90.

use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard::journal::{scan, RecordKind};
use switchyard::wire::{Dialect, FrameDecoder, Framing, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};

use switchyard_tools::natskit::NatsCluster;
use switchyard_tools::testkit::{self, connect, Bank, Daemon, Pki, TempDir, WAIT};

/// The `switchyard` binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Requests the client sends at most before the kill.
const TOTAL: usize = 3_000;
/// Requests in flight on the client's connection.
const WINDOW: usize = 32;
/// Answers the client has seen when the switch is killed.
const KILL_AFTER: usize = 400;

/// The request with number `i` (from 0): unique DE11, DE7 and DE37; every tenth is
/// declined by the simulator (amount ending in 51).
fn request(i: usize) -> Bytes {
    let n = i + 1;
    let amount = if n % 10 == 0 {
        "000000001051"
    } else {
        "000000001000"
    };
    testkit::payment(n, "100001", amount)
}

/// DE39 and DE38 of an answer.
type Answer = (Vec<u8>, Option<Vec<u8>>);

fn answer_of(m: &Message) -> Answer {
    (
        m.field(39).unwrap_or(b"--").to_vec(),
        m.field(38).map(<[u8]>::to_vec),
    )
}

fn stan_of(m: &Message) -> usize {
    std::str::from_utf8(m.field(11).unwrap_or(b"0"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Sends `requests` with at most [`WINDOW`] in flight and records answers by DE11
/// until the connection ends or every request is answered. `answered` is notified
/// on each answer.
async fn drive(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    requests: Vec<Bytes>,
    answers: Arc<Mutex<HashMap<usize, Answer>>>,
    answered: Arc<Notify>,
    sent: Arc<Mutex<usize>>,
) {
    let (mut rd, mut wr) = tokio::io::split(connect(addr, tls).await.unwrap());
    let window = Arc::new(Semaphore::new(WINDOW));
    let total = requests.len();
    let reader = {
        let window = window.clone();
        async move {
            let decoder = FrameDecoder::new(Framing::U16be, 8192);
            let d = Dialect::iso87_ascii();
            let mut buf = BytesMut::new();
            let mut got = 0;
            loop {
                while let Ok(Some(frame)) = decoder.decode(&mut buf) {
                    let m = Message::decode(&d, frame).unwrap();
                    answers.lock().unwrap().insert(stan_of(&m), answer_of(&m));
                    got += 1;
                    window.add_permits(1);
                    answered.notify_one();
                }
                if got >= total {
                    return;
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }
    };
    let writer = async move {
        for r in requests {
            window.acquire().await.unwrap().forget();
            let mut out = BytesMut::new();
            Framing::U16be.write(&mut out, &r).unwrap();
            if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            *sent.lock().unwrap() += 1;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
}

fn write_config(dir: &Path, bank: SocketAddr) -> PathBuf {
    let rest = format!(
        r#"[journal]
dir = "journal"
fsync = "batch"

[[institution]]
id = "100001"

[[bank]]
id = "200001"
address = "{bank}"
server_name = "bank"
links = 1
request_timeout_ms = 10000
reconnect_backoff_max_ms = 200
reversal_retry_min_ms = 200

[[route]]
pan_prefix = "4"
bank = "200001"
"#
    );
    testkit::write_config(dir, "", "", &rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_switch_loses_nothing_and_forwards_nothing_twice() {
    // Not beside a cluster test: their short leases want the cores.
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = TempDir::new("crash");
    let pki = Pki::write(&dir.0);
    // The bank: answers after 20 ms, logs everything it receives.
    let bank = Bank::start(&pki, Duration::from_millis(20)).await;
    let config = write_config(&dir.0, bank.addr);
    let first = Daemon::start(BIN, &config);
    let journal = dir.0.join("journal");
    kill_and_audit(&pki, bank, first, After::Restart(config), &journal).await;
}

/// What takes over from the killed switch.
enum After {
    /// The same switch restarted on its journal (this config).
    Restart(PathBuf),
    /// A cluster standby, already standing by.
    Standby(Daemon),
}

/// Loads `first` (a running switch in front of `bank`), SIGKILLs it once
/// [`KILL_AFTER`] answers are in and the bank holds a window of unanswered
/// requests, lets `after` take over, and audits what the client, the bank and
/// the journal in `journal` (the taking-over switch's) saw.
async fn kill_and_audit(
    pki: &Pki,
    bank: Bank,
    first: Daemon,
    after: After,
    journal: &Path,
) -> Duration {
    let client_tls = pki.client("100001");
    let stats = bank.stats.clone();
    stats.log.enable(1_000_000);
    let behavior = bank.behavior.clone();

    // Load, then SIGKILL once KILL_AFTER answers are in.
    let answers = Arc::new(Mutex::new(HashMap::new()));
    let answered = Arc::new(Notify::new());
    let sent = Arc::new(Mutex::new(0usize));
    let load = tokio::spawn({
        let (answers, answered, sent) = (answers.clone(), answered.clone(), sent.clone());
        let tls = client_tls.clone();
        let requests = (0..TOTAL).map(request).collect();
        let addr = first.addr;
        async move { drive(addr, &tls, requests, answers, answered, sent).await }
    });
    let enough = async {
        while answers.lock().unwrap().len() < KILL_AFTER {
            answered.notified().await;
        }
    };
    tokio::time::timeout(WAIT, enough)
        .await
        .expect("answers before the kill");
    // Kill while the bank holds requests it has not answered: it stops answering
    // until the client's whole window is there.
    behavior.stall_for(WAIT);
    let at_bank = async {
        loop {
            let sent = *sent.lock().unwrap();
            let outstanding = sent - answers.lock().unwrap().len();
            if outstanding == WINDOW && stats.requests.load(Ordering::Relaxed) == sent as u64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(WAIT, at_bank)
        .await
        .expect("requests at the bank before the kill");
    first.kill();
    let killed = std::time::Instant::now();
    behavior.stall_for(Duration::ZERO);
    tokio::time::timeout(WAIT, load).await.unwrap().unwrap();
    let before: HashMap<usize, Answer> = answers.lock().unwrap().clone();
    let sent_before = *sent.lock().unwrap();
    assert!(
        sent_before > before.len(),
        "requests were in flight at the kill"
    );
    eprintln!(
        "killed with {} answered of {sent_before} sent; the bank had {} messages",
        before.len(),
        stats.requests.load(Ordering::Relaxed)
    );

    // Restart on the same journal, or the standby takes over.
    let second = match after {
        After::Restart(config) => Daemon::start(BIN, &config),
        After::Standby(mut standby) => {
            standby.wait_running();
            standby
        }
    };
    let took_over = killed.elapsed();
    eprintln!("serving again {took_over:?} after the kill");
    let d = Dialect::iso87_ascii();
    let bank_saw = |mtis: &[&[u8; 4]]| -> Vec<Message> {
        stats
            .log
            .messages()
            .into_iter()
            .filter_map(|m| Message::decode(&d, m).ok())
            .filter(|m| mtis.contains(&m.mti().as_bytes()))
            .collect()
    };
    // What the journal says each request ended with (by DE11 of the request).
    let journal_outcomes = || -> HashMap<usize, Vec<u8>> {
        let mut by_id = HashMap::new();
        let mut outcomes = HashMap::new();
        scan(journal, |_, _, r| match r.kind {
            RecordKind::Accepted => {
                // The journal keeps the protected form (no card data): its
                // message part holds DE11.
                let body = &r.body[8..];
                let body = match r.protected {
                    true => switchyard::journal::protect::message_part(body).unwrap().0,
                    false => body,
                };
                let m = Message::decode(&d, Bytes::copy_from_slice(body)).unwrap();
                by_id.insert(r.request_id, stan_of(&m));
            }
            RecordKind::Outcome => {
                let earlier = outcomes.insert(r.request_id, r.body[..2].to_vec());
                assert!(
                    earlier.is_none(),
                    "request {} has two outcomes",
                    r.request_id
                );
            }
            _ => {}
        })
        .unwrap();
        outcomes
            .into_iter()
            .filter_map(|(id, code)| Some((*by_id.get(&id)?, code)))
            .collect()
    };

    // The bank saw each request at most once.
    let forwarded: Vec<Message> = bank_saw(&[b"0200", b"0201"]);
    let mut seen = HashSet::new();
    for m in &forwarded {
        assert!(
            seen.insert(m.field(37).unwrap().to_vec()),
            "forwarded twice: DE37 {:?}",
            m.field(37)
        );
    }
    // Forwarded without an outcome before the crash: each must be reversed after it.
    let outcomes_at_restart = journal_outcomes();
    let expected_reversals: HashSet<(Vec<u8>, Vec<u8>)> = forwarded
        .iter()
        .filter(|m| {
            let n: usize = std::str::from_utf8(m.field(37).unwrap())
                .unwrap()
                .parse()
                .unwrap();
            !before.contains_key(&n) && outcomes_at_restart.get(&n).is_none_or(|c| c == b"68")
        })
        .map(|m| (m.field(11).unwrap().to_vec(), m.field(7).unwrap().to_vec()))
        .collect();
    assert!(
        !expected_reversals.is_empty(),
        "the bank held unanswered requests at the kill"
    );
    let reversed = || -> HashSet<(Vec<u8>, Vec<u8>)> {
        bank_saw(&[b"0420", b"0421"])
            .iter()
            .filter_map(|m| m.field(90))
            .map(|de90| (de90[4..10].to_vec(), de90[10..20].to_vec()))
            .collect()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !expected_reversals.is_subset(&reversed()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reversal advices missing for {:?}",
            expected_reversals
                .difference(&reversed())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{} forwarded before the kill, {} of them reversed after the restart",
        forwarded.len(),
        expected_reversals.len()
    );

    // Every request from before the crash, sent again: the original answers.
    let again = Arc::new(Mutex::new(HashMap::new()));
    let requests: Vec<Bytes> = (0..sent_before).map(request).collect();
    let retransmit = drive(
        second.addr,
        &client_tls,
        requests,
        again.clone(),
        Arc::new(Notify::new()),
        Arc::new(Mutex::new(0)),
    );
    let _ = tokio::time::timeout(WAIT, retransmit).await;
    let again = again.lock().unwrap().clone();
    let missing: Vec<usize> = (1..=sent_before)
        .filter(|n| !again.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "retransmissions unanswered: {missing:?}"
    );
    let forwarded_37: HashSet<usize> = forwarded
        .iter()
        .map(|m| {
            std::str::from_utf8(m.field(37).unwrap())
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    for (n, answer) in &again {
        match before.get(n) {
            Some(original) => assert_eq!(answer, original, "request {n}: original answer again"),
            None if forwarded_37.contains(n) => {
                let code = &answer.0;
                // 68 when it had no outcome; else the outcome it had (answer lost in
                // the socket at the kill).
                let journaled = outcomes_at_restart
                    .get(n)
                    .cloned()
                    .unwrap_or(b"68".to_vec());
                assert_eq!(code, &journaled, "request {n}: forwarded, unanswered");
            }
            // Never forwarded: closed as 91 at the restart if it was journaled as
            // accepted; else the switch never knew it, and it goes to the bank now.
            None => match outcomes_at_restart.get(n) {
                Some(code) => assert_eq!(&answer.0, code, "request {n}: never forwarded"),
                None => assert_ne!(answer.0, b"91", "request {n}: unknown, forwarded now"),
            },
        }
    }
    let mut seen = HashSet::new();
    for m in bank_saw(&[b"0200", b"0201"]) {
        assert!(
            seen.insert(m.field(37).unwrap().to_vec()),
            "forwarded twice: DE37 {:?}",
            m.field(37)
        );
    }

    second.kill();
    // Every answer the client saw before the crash is in the journal, same DE39.
    let outcomes = journal_outcomes();
    for (n, (code, _)) in &before {
        assert_eq!(
            outcomes.get(n),
            Some(code),
            "request {n}: journaled outcome"
        );
    }
    bank.stop().await;
    took_over
}

// === The same audit across a cluster failover ===

/// The cluster tests' lease.
const LEASE_TTL_MS: u64 = 2_000;

/// The tests of this file run one at a time: each cluster test runs three NATS
/// servers and two switches with short leases, and anything beside one on two
/// cores would measure the machine, not the switch.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Node `node`'s config: the crash test's switch, its journal in
/// `journal-<node>`, in the cluster of `nats`.
fn cluster_config(dir: &Path, bank: SocketAddr, nats: &NatsCluster, node: &str) -> PathBuf {
    cluster_config_ttl(dir, bank, nats, node, LEASE_TTL_MS)
}

/// [`cluster_config`] with a lease of `ttl_ms`.
fn cluster_config_ttl(
    dir: &Path,
    bank: SocketAddr,
    nats: &NatsCluster,
    node: &str,
    ttl_ms: u64,
) -> PathBuf {
    let written = write_config(dir, bank);
    let text = std::fs::read_to_string(&written)
        .unwrap()
        .replace("dir = \"journal\"", &format!("dir = \"journal-{node}\""));
    let text = format!(
        "{text}\n[cluster]\nnats = {}\nnode_id = \"{node}\"\nlease_ttl_ms = {ttl_ms}\n\
         connect_timeout_ms = 30000\n",
        nats.toml_urls()
    );
    let path = dir.join(format!("switchyard-{node}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// GET `path` on an admin endpoint: the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: switchyard\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut text))
        .await
        .expect("an answer in time")
        .unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
}

/// `switchyard cluster status` for the cluster of `config`.
fn cluster_status(config: &Path) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .args(["cluster", "status", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until JetStream has its leaders and the stream and lease bucket exist.
async fn wait_jetstream(nats: &NatsCluster) {
    wait_jetstream_ttl(nats, LEASE_TTL_MS).await;
}

/// [`wait_jetstream`] for nodes with a lease of `ttl_ms`.
async fn wait_jetstream_ttl(nats: &NatsCluster, ttl_ms: u64) {
    let config = switchyard::cluster::ClusterConfig {
        nats: nats.urls(),
        node_id: "test".to_owned(),
        stream: switchyard::cluster::STREAM_DEFAULT.to_owned(),
        lease_ttl: Duration::from_millis(ttl_ms),
        connect_timeout: Duration::from_secs(30),
        credentials_file: None,
        tls: None,
        compression: Default::default(),
    };
    switchyard::cluster::Cluster::connect(&config, Duration::from_secs(172_800))
        .await
        .expect("JetStream ready");
}

/// The crash test across a cluster: the active node is killed under load and
/// the standby takes over on its copy of the stream. The same audit: every
/// answer the client saw is in the stream (the standby's copy) with the same
/// DE39; no request reached the bank twice; every request forwarded without an
/// answer gets a reversal advice the bank receives and acknowledges (the
/// stream, read by `journal verify --cluster-config`, has no advice left
/// unacknowledged); retransmissions to the new active get the original
/// answers. And the takeover is within the lease TTL plus 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_a_killed_active_and_loses_nothing() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = TempDir::new("cluster-failover");
    let pki = Pki::write(&dir.0);
    let nats = NatsCluster::start(&dir.0, 3);
    wait_jetstream(&nats).await;
    let bank = Bank::start(&pki, Duration::from_millis(20)).await;
    let a = cluster_config(&dir.0, bank.addr, &nats, "a");
    let b = cluster_config(&dir.0, bank.addr, &nats, "b");
    let active = Daemon::start(BIN, &a);
    let mut standby = Daemon::spawn(BIN, &b);
    standby.wait_line("standing by");
    let journal = dir.0.join("journal-b");
    let took_over = kill_and_audit(&pki, bank, active, After::Standby(standby), &journal).await;
    let bound = Duration::from_millis(LEASE_TTL_MS) + Duration::from_secs(2);
    assert!(
        took_over <= bound,
        "takeover took {took_over:?}, over {bound:?}"
    );
    // `journal verify` reads the stream itself too: every record checks.
    let verified = std::process::Command::new(BIN)
        .args(["journal", "verify", "--cluster-config"])
        .arg(&b)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verified.stdout);
    let err = String::from_utf8_lossy(&verified.stderr);
    assert!(verified.status.success(), "{said} {err}");
    assert!(said.contains("every record checked"), "{said}");
    // Every request the new active closed has its outcome, and every reversal
    // advice it sent was acknowledged by the bank (in the stream).
    assert!(
        said.contains("unfinished: 0 requests without an outcome"),
        "{said}"
    );
    assert!(
        said.contains(", 0 reversal advices not acknowledged"),
        "{said}"
    );
    drop(nats);
}

/// Zombie: the active node is paused (SIGSTOP) past its lease, the standby takes
/// over, and the old active is resumed (SIGCONT) with requests waiting in its
/// socket. It must send nothing more to the bank or the acquirer, write nothing
/// more into the stream, and exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_active_wakes_up_fenced_and_sends_nothing() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = TempDir::new("cluster-zombie");
    let pki = Pki::write(&dir.0);
    let nats = NatsCluster::start(&dir.0, 3);
    wait_jetstream(&nats).await;
    let bank = Bank::start(&pki, Duration::from_millis(1)).await;
    bank.stats.log.enable(1_000_000);
    let a = cluster_config(&dir.0, bank.addr, &nats, "a");
    let b = cluster_config(&dir.0, bank.addr, &nats, "b");
    let mut active = Daemon::start(BIN, &a);
    let mut standby = Daemon::spawn(BIN, &b);
    standby.wait_line("standing by");

    // The active answers.
    let mut client = testkit::Client::connect(active.addr, pki.client("100001"))
        .await
        .unwrap();
    const BEFORE: usize = 20;
    const ZOMBIE: std::ops::Range<usize> = BEFORE..BEFORE + 20;
    for i in 0..BEFORE {
        client.send_raw(&request(i)).await;
        let answer = tokio::time::timeout(WAIT, client.recv()).await.unwrap();
        assert!(answer.is_some(), "the active answers request {i}");
    }

    // Paused past its lease: the standby takes over.
    active.signal("-STOP");
    standby.wait_running();
    // Requests reach the paused node's socket; then it resumes.
    for i in ZOMBIE {
        client.send_raw(&request(i)).await;
    }
    active.signal("-CONT");
    let status = active.wait_exit();
    assert!(!status.success(), "the old active exits with an error");
    active.wait_line("lease");

    // It answered none of them ...
    let mut answers = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), client.recv()).await {
        answers += 1;
    }
    assert_eq!(answers, 0, "the old active answered after losing its lease");
    // ... forwarded none of them ...
    let d = Dialect::iso87_ascii();
    let zombie_rrns: HashSet<Vec<u8>> = ZOMBIE
        .map(|i| format!("{:012}", i + 1).into_bytes())
        .collect();
    for m in bank.stats.log.messages() {
        let m = Message::decode(&d, m).unwrap();
        if let Some(rrn) = m.field(37) {
            assert!(
                !zombie_rrns.contains(rrn),
                "the bank got {:?} from the old active",
                m.mti()
            );
        }
    }
    // ... and the stream (the new active's copy) holds none of them.
    let mut journaled = 0;
    scan(&dir.0.join("journal-b"), |_, _, r| {
        if r.kind == RecordKind::Accepted {
            journaled += 1;
            let body = &r.body[8..];
            let body = match r.protected {
                true => switchyard::journal::protect::message_part(body).unwrap().0,
                false => body,
            };
            let m = Message::decode(&d, Bytes::copy_from_slice(body)).unwrap();
            assert!(
                !ZOMBIE.contains(&(stan_of(&m) - 1)),
                "the stream holds request {} of the old active",
                stan_of(&m)
            );
        }
    })
    .unwrap();
    assert_eq!(
        journaled, BEFORE,
        "the stream holds the requests from before the pause"
    );
    drop(standby);
    bank.stop().await;
    drop(nats);
}

/// One of the three NATS servers killed under load, and restarted: no request
/// fails (every answer is the bank's: 00, or its 51 for every tenth), and the
/// restarted server's replica of the stream catches up.
/// The lease in the NATS loss test: longer than JetStream takes to elect new
/// leaders for the stream and the lease bucket when the server that led them
/// dies.
const NATS_LOSS_TTL_MS: u64 = 15_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_nats_server_under_load_fails_nothing() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    const LOAD: usize = 3_000;
    let dir = TempDir::new("cluster-nats-loss");
    let pki = Pki::write(&dir.0);
    let mut nats = NatsCluster::start(&dir.0, 3);
    wait_jetstream_ttl(&nats, NATS_LOSS_TTL_MS).await;
    let bank = Bank::start(&pki, Duration::from_millis(1)).await;
    let a = cluster_config_ttl(&dir.0, bank.addr, &nats, "a", NATS_LOSS_TTL_MS);
    // JetStream elects a new leader for the stream in seconds: requests wait
    // for it, within a deadline longer than that.
    let text = std::fs::read_to_string(&a).unwrap();
    std::fs::write(
        &a,
        text.replace("request_timeout_ms = 10000", "request_timeout_ms = 30000"),
    )
    .unwrap();
    let active = Daemon::start(BIN, &a);
    let answers = Arc::new(Mutex::new(HashMap::new()));
    let answered = Arc::new(Notify::new());
    let load = tokio::spawn({
        let (answers, answered) = (answers.clone(), answered.clone());
        let tls = pki.client("100001");
        let requests = (0..LOAD).map(request).collect();
        let addr = active.addr;
        async move {
            drive(
                addr,
                &tls,
                requests,
                answers,
                answered,
                Arc::new(Mutex::new(0)),
            )
            .await
        }
    });
    let at_least = |n: usize| {
        let (answers, answered) = (answers.clone(), answered.clone());
        async move {
            while answers.lock().unwrap().len() < n {
                answered.notified().await;
            }
        }
    };
    tokio::time::timeout(WAIT, at_least(LOAD / 6))
        .await
        .expect("load under way");
    // The server leading the stream's replicas: the worst one to lose.
    let stream = switchyard::cluster::STREAM_DEFAULT;
    let lost = nats.stream_leader(0, stream).expect("the stream's leader");
    let kept = (lost + 1) % 3;
    nats.kill(lost);
    eprintln!(
        "NATS server {lost} (the stream's leader) killed at {} answers",
        answers.lock().unwrap().len()
    );
    tokio::time::timeout(2 * WAIT, at_least(LOAD / 2))
        .await
        .expect("load goes on with two servers");
    nats.restart(lost);
    assert!(
        nats.wait_listening(lost, WAIT),
        "NATS server {lost} restarts"
    );
    tokio::time::timeout(2 * WAIT, load)
        .await
        .expect("load done")
        .unwrap();
    let answers = answers.lock().unwrap().clone();
    assert_eq!(answers.len(), LOAD, "every request answered");
    for (n, (code, _)) in &answers {
        let expected: &[u8] = if n % 10 == 0 { b"51" } else { b"00" };
        assert_eq!(code.as_slice(), expected, "request {n}");
    }
    // The restarted server's replica catches up with the others'.
    let target = nats.local_last_sequence(kept, stream).expect("a replica");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let caught_up = nats.local_last_sequence(lost, stream);
        if caught_up.is_some_and(|s| s >= target) {
            eprintln!("server {lost}'s replica at {caught_up:?} of {target}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server {lost} at {caught_up:?} of {target}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(active);
    bank.stop().await;
}

/// Maintenance: `switchyard cluster status` shows the holder and the standby's
/// progress; `switchyard cluster step-down` makes the active drain, give its
/// lease up and exit 0, and the standby takes over at once (well inside the
/// lease TTL), with the same answers for retransmissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_down_hands_over_at_once() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    const TTL_MS: u64 = 15_000;
    let dir = TempDir::new("cluster-step-down");
    let pki = Pki::write(&dir.0);
    let nats = NatsCluster::start(&dir.0, 3);
    wait_jetstream_ttl(&nats, TTL_MS).await;
    let bank = Bank::start(&pki, Duration::from_millis(1)).await;
    let with_admin = |node: &str| {
        let path = cluster_config_ttl(&dir.0, bank.addr, &nats, node, TTL_MS);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n{text}"),
        )
        .unwrap();
        path
    };
    let (a, b) = (with_admin("a"), with_admin("b"));
    // Node a ran alone before the cluster: taking the lease first, on a stream
    // without journal records, it publishes its journal before serving.
    let alone = dir.0.join("switchyard-a-alone.toml");
    let text = std::fs::read_to_string(&a).unwrap();
    std::fs::write(&alone, text.split("\n[cluster]").next().unwrap()).unwrap();
    let mut single = Daemon::start(BIN, &alone);
    let mut client = testkit::Client::connect(single.addr, pki.client("100001"))
        .await
        .unwrap();
    let mut answers = Vec::new();
    for i in 0..5 {
        client.send_raw(&request(i)).await;
        answers.push(answer_of(&client.recv().await.expect("an answer")));
    }
    drop(client);
    single.terminate();
    assert!(single.wait_exit().success());

    let mut active = Daemon::start(BIN, &a);
    let mut standby = Daemon::spawn(BIN, &b);
    let line = standby.wait_line("standby admin endpoint");
    let standby_admin: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .and_then(|a| a.parse().ok())
        .expect("the standby's admin address");
    standby.wait_line("standing by");
    let (code, ready) = http_get(standby_admin, "/readyz").await;
    assert!(code == 503 && ready.contains("standby"), "{code} {ready}");
    let mut client = testkit::Client::connect(active.addr, pki.client("100001"))
        .await
        .unwrap();
    for i in 5..15 {
        client.send_raw(&request(i)).await;
        answers.push(answer_of(&client.recv().await.expect("an answer")));
    }
    // The standby reports its progress every TTL/3.
    let deadline = tokio::time::Instant::now() + WAIT;
    let status = loop {
        let status = cluster_status(&a);
        if status["standbys"][0]["lag_messages"] == 0 {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(status["lease"]["holder"], "a", "{status}");
    let (_, own) = http_get(standby_admin, "/status").await;
    let own: serde_json::Value = serde_json::from_str(&own).unwrap();
    assert_eq!(own["cluster"]["role"], "standby", "{own}");
    assert_eq!(own["cluster"]["active"], "a", "{own}");
    // Three records a payment, from before the cluster and after.
    assert_eq!(own["cluster"]["journal_last_seq"], 45, "{own}");
    // The standby keeps the duplicates table warm: every answered request's key,
    // none still open.
    assert_eq!(own["cluster"]["duplicate_keys"], 15, "{own}");
    assert_eq!(own["cluster"]["open_requests"], 0, "{own}");
    assert_eq!(status["standbys"][0]["node"], "b", "{status}");
    assert_eq!(status["stream"]["replicas"], 3, "{status}");

    // While b stands by, its file gains an institution (as an operator
    // changes both nodes' files and reloads the active): b puts it in force
    // when it takes over.
    let text = std::fs::read_to_string(&b).unwrap();
    let added = "[[institution]]\nid = \"100002\"\n\n[[institution]]\nid = \"100001\"";
    std::fs::write(
        &b,
        text.replacen("[[institution]]\nid = \"100001\"", added, 1),
    )
    .unwrap();

    let admin = active.admin.expect("the active's admin endpoint");
    let asked = std::process::Command::new(BIN)
        .args(["cluster", "step-down", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    assert!(
        asked.status.success(),
        "{}",
        String::from_utf8_lossy(&asked.stdout)
    );
    let stepped = std::time::Instant::now();
    drop(client);
    assert!(active.wait_exit().success(), "a step-down exits 0");
    standby.wait_running();
    let took = stepped.elapsed();
    eprintln!("the standby serves {took:?} after the step-down");
    assert!(
        took < Duration::from_millis(TTL_MS),
        "took {took:?}: not at once"
    );
    assert_eq!(cluster_status(&b)["lease"]["holder"], "b");
    // The new active answers retransmissions with the original answers, those
    // of before the cluster too, and forwards none of them again.
    let mut client = testkit::Client::connect(standby.addr, pki.client("100001"))
        .await
        .unwrap();
    for (i, original) in answers.iter().enumerate() {
        client.send_raw(&request(i)).await;
        assert_eq!(
            &answer_of(&client.recv().await.expect("an answer")),
            original
        );
    }
    assert_eq!(bank.stats.requests.load(Ordering::Relaxed), 15);
    let mut added = testkit::Client::connect(standby.addr, pki.client("100002"))
        .await
        .unwrap();
    added
        .send_raw(&testkit::payment(1, "100002", "000000001000"))
        .await;
    let answer = added
        .recv()
        .await
        .expect("an answer to the added institution");
    assert_eq!(answer.field(39), Some(&b"00"[..]));
    drop(standby);
    bank.stop().await;
}
