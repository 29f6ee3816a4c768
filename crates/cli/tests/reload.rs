//! Hot reload of a real `switchyard run`: a route changed in the config file and
//! SIGHUP; new requests take the new route while an existing connection stays
//! open and a request in flight completes; an invalid edit is rejected whole and
//! the routes in force stay. Then banks added, replaced and removed, links
//! resized, institutions added, renamed and removed, a certificate revoked and
//! a limit lowered, all by reloads of a running daemon.

use bytes::BytesMut;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;
use switchyard::wire::{Dialect, FrameDecoder, Framing, Message};
use switchyard_tools::testkit::{self, connect, Bank, Daemon, Pki, TempDir, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `switchyard` binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// The config file with the route for PAN prefix 4 going to bank `route_to`.
fn config(dir: &Path, a: SocketAddr, b: SocketAddr, route_to: &str) -> PathBuf {
    let rest = format!(
        r#"[[institution]]
id = "100001"

[[bank]]
id = "200001"
address = "{a}"
server_name = "bank"
links = 1

[[bank]]
id = "200002"
address = "{b}"
server_name = "bank"
links = 1

[[route]]
pan_prefix = "4"
bank = "{route_to}"
"#
    );
    testkit::write_config(dir, "", "", &rest)
}

/// Payment `n`, framed.
fn payment(n: usize) -> Vec<u8> {
    testkit::framed(&testkit::payment(n, "100001", "000000001000"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_a_route_without_dropping_anything() {
    let dir = TempDir::new("reload");
    let pki = Pki::write(&dir.0);
    let a = Bank::start(&pki, Duration::ZERO).await;
    let b = Bank::start(&pki, Duration::ZERO).await;
    let path = config(&dir.0, a.addr, b.addr, "200001");
    let mut daemon = Daemon::start(BIN, &path);
    daemon.wait_line("bank link up"); // the second bank's link
    let mut s = connect(daemon.addr, &pki.client("100001")).await.unwrap();
    let d = Dialect::iso87_ascii();
    let mut buf = BytesMut::new();
    let decoder = FrameDecoder::new(Framing::U16be, 8192);
    let mut next = async |s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>| loop {
        if let Some(f) = decoder.decode(&mut buf).unwrap() {
            return Message::decode(&d, f).unwrap();
        }
        let n = tokio::time::timeout(WAIT, s.read_buf(&mut buf))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n > 0, "connection closed");
    };

    s.write_all(&payment(1)).await.unwrap();
    assert_eq!(next(&mut s).await.field(39), Some(&b"00"[..]));
    assert_eq!(
        a.stats.requests.load(Ordering::Relaxed),
        1,
        "routed to 200001"
    );

    // A request held in flight at bank A across the reload.
    a.behavior.stall_for(WAIT);
    s.write_all(&payment(2)).await.unwrap();
    let held = async {
        while a.stats.requests.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(WAIT, held).await.unwrap();

    config(&dir.0, a.addr, b.addr, "200002");
    daemon.reload();
    daemon.wait_line("config reloaded");
    s.write_all(&payment(3)).await.unwrap();
    let answer = next(&mut s).await;
    assert_eq!(
        (answer.field(11), answer.field(39)),
        (Some(&b"000003"[..]), Some(&b"00"[..]))
    );
    assert_eq!(
        b.stats.requests.load(Ordering::Relaxed),
        1,
        "new route: 200002"
    );
    a.behavior.stall_for(Duration::ZERO);
    let answer = next(&mut s).await;
    assert_eq!(
        (answer.field(11), answer.field(39)),
        (Some(&b"000002"[..]), Some(&b"00"[..])),
        "the request in flight completed"
    );

    // An invalid edit: rejected whole, the routes in force stay.
    config(&dir.0, a.addr, b.addr, "777");
    daemon.reload();
    let line = daemon.wait_line("reload rejected");
    assert!(line.contains("route[0].bank"), "{line}");
    s.write_all(&payment(4)).await.unwrap();
    assert_eq!(next(&mut s).await.field(39), Some(&b"00"[..]));
    assert_eq!(b.stats.requests.load(Ordering::Relaxed), 2, "still 200002");
    assert_eq!(a.stats.requests.load(Ordering::Relaxed), 2);
    // A rate limit lowered by a reload: over it, 65 at once.
    config(&dir.0, a.addr, b.addr, "200002");
    let slow = std::fs::read_to_string(&path).unwrap().replace(
        "id = \"100001\"\n",
        "id = \"100001\"\nrate_per_s = 1\nrate_burst = 1\n",
    );
    std::fs::write(&path, slow).unwrap();
    daemon.reload();
    daemon.wait_line("config reloaded");
    let mut codes = Vec::new();
    for n in 5..8 {
        s.write_all(&payment(n)).await.unwrap();
        codes.push(next(&mut s).await.field(39).unwrap().to_vec());
    }
    assert!(codes.contains(&b"65".to_vec()), "{codes:?}");
    daemon.kill();
    a.stop().await;
    b.stop().await;
}

/// One acquirer connection: sends a payment and reads its answer (None: the
/// switch closed the connection or refused the handshake).
struct Session {
    s: Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    buf: BytesMut,
}

impl Session {
    async fn open(addr: SocketAddr, tls: &std::sync::Arc<rustls::ClientConfig>) -> Session {
        Session {
            s: connect(addr, tls).await.ok(),
            buf: BytesMut::new(),
        }
    }

    async fn pay(&mut self, n: usize, acquirer: &str) -> Option<Message> {
        let d = Dialect::iso87_ascii();
        let decoder = FrameDecoder::new(Framing::U16be, 8192);
        let s = self.s.as_mut()?;
        let frame = testkit::framed(&testkit::payment(n, acquirer, "000000001000"));
        s.write_all(&frame).await.ok()?;
        loop {
            if let Some(f) = decoder.decode(&mut self.buf).unwrap() {
                return Some(Message::decode(&d, f).unwrap());
            }
            match tokio::time::timeout(WAIT, s.read_buf(&mut self.buf))
                .await
                .expect("an answer or a close in time")
            {
                Ok(n) if n > 0 => {}
                _ => {
                    self.s = None;
                    return None;
                }
            }
        }
    }
}

/// Waits (bounded) until `done` holds, looking every few milliseconds at
/// counters the simulated banks keep.
async fn until(what: &str, done: impl Fn() -> bool) {
    let wait = async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"));
}

/// The config of the second test: `institutions` and `banks` sections as given,
/// and the CRL file `crl.pem`.
fn config_with(dir: &Path, limits: &str, rest: &str) -> PathBuf {
    let rest = format!("[limits]\n{limits}\n\n{rest}");
    testkit::write_config(dir, "", "crl_file = \"crl.pem\"", &rest)
}

fn institution(id: &str, certificate_name: &str) -> String {
    format!("[[institution]]\nid = \"{id}\"\ncertificate_name = \"{certificate_name}\"\n\n")
}

fn bank(id: &str, addr: SocketAddr, links: usize) -> String {
    format!(
        "[[bank]]\nid = \"{id}\"\naddress = \"{addr}\"\nserver_name = \"bank\"\nlinks = {links}\n\n"
    )
}

fn route(prefix: &str, bank: &str, failover: &str) -> String {
    format!("[[route]]\npan_prefix = \"{prefix}\"\nbank = \"{bank}\"\n{failover}\n\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_banks_links_institutions_certificates_and_limits() {
    let dir = TempDir::new("reload-all");
    let pki = Pki::write(&dir.0);
    pki.write_crl(&dir.0, "crl.pem", &[]);
    let a = Bank::start(&pki, Duration::ZERO).await;
    let b = Bank::start(&pki, Duration::ZERO).await;
    let (first_cert, first) = pki.client_with_certificate("100001");
    let second = pki.client("100002");
    let path = config_with(
        &dir.0,
        "",
        &format!(
            "{}{}{}",
            institution("100001", "100001"),
            bank("200001", a.addr, 1),
            route("4", "200001", "")
        ),
    );
    let mut daemon = Daemon::start(BIN, &path);
    let mut one = Session::open(daemon.addr, &first).await;
    assert_eq!(
        one.pay(1, "100001").await.unwrap().field(39),
        Some(&b"00"[..])
    );
    assert!(
        Session::open(daemon.addr, &second)
            .await
            .pay(2, "100002")
            .await
            .is_none(),
        "100002 is not configured yet"
    );

    // Added: an institution, a bank with two links (the route now goes there),
    // a third link to bank A, and a lower per-institution connection limit.
    let text = |links_a: usize, limits: &str, institutions: &str, banks: &str, routes: &str| {
        config_with(
            &dir.0,
            limits,
            &format!(
                "{institutions}{}{banks}{routes}",
                bank("200001", a.addr, links_a)
            ),
        )
    };
    let both = format!(
        "{}{}",
        institution("100001", "100001"),
        institution("100002", "100002")
    );
    text(
        3,
        "connections_per_institution_max = 1",
        &both,
        &bank("200002", b.addr, 2),
        &route("4", "200002", "failover = [\"200001\"]"),
    );
    daemon.reload();
    let line = daemon.wait_line("config reloaded");
    assert!(
        line.contains("1 added") && line.contains("200001 1→3"),
        "{line}"
    );
    until("bank B's two links signed on", || {
        b.stats.sign_ons.load(Ordering::Relaxed) == 2
    })
    .await;
    until("bank A's two new links signed on", || {
        a.stats.sign_ons.load(Ordering::Relaxed) == 3
    })
    .await;
    let mut two = Session::open(daemon.addr, &second).await;
    assert_eq!(
        two.pay(3, "100002").await.unwrap().field(39),
        Some(&b"00"[..])
    );
    assert_eq!(
        one.pay(4, "100001").await.unwrap().field(39),
        Some(&b"00"[..]),
        "the first session stays"
    );
    assert_eq!(
        b.stats.requests.load(Ordering::Relaxed),
        2,
        "both went to the new bank"
    );
    assert!(
        Session::open(daemon.addr, &first)
            .await
            .pay(5, "100001")
            .await
            .is_none(),
        "a second session of 100001 passes the new limit of one"
    );

    // Removed: bank A (its three links sign off and close); bank B shrinks to
    // one link; 100002's certificate name changes; 100001's certificate is
    // revoked (new handshakes fail, the open session stays).
    pki.write_crl(&dir.0, "crl.pem", &[&first_cert]);
    let renamed = format!(
        "{}{}",
        institution("100001", "100001"),
        institution("100002", "acquirer-two")
    );
    config_with(
        &dir.0,
        "",
        &format!(
            "{renamed}{}{}",
            bank("200002", b.addr, 1),
            route("4", "200002", "")
        ),
    );
    daemon.reload();
    let line = daemon.wait_line("config reloaded");
    assert!(
        line.contains("1 removed") && line.contains("200002 2→1"),
        "{line}"
    );
    until("bank A's links signed off", || {
        a.stats.sign_offs.load(Ordering::Relaxed) == 3
    })
    .await;
    until("one of bank B's links signed off", || {
        b.stats.sign_offs.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(
        one.pay(6, "100001").await.unwrap().field(39),
        Some(&b"00"[..]),
        "open session kept"
    );
    assert_eq!(
        two.pay(7, "100002").await.unwrap().field(39),
        Some(&b"00"[..]),
        "open session kept"
    );
    assert!(
        Session::open(daemon.addr, &first)
            .await
            .pay(8, "100001")
            .await
            .is_none(),
        "revoked by the reloaded CRL"
    );
    assert!(
        Session::open(daemon.addr, &second)
            .await
            .pay(9, "100002")
            .await
            .is_none(),
        "the old certificate name no longer maps"
    );
    let third = pki.client("acquirer-two");
    let mut three = Session::open(daemon.addr, &third).await;
    assert_eq!(
        three.pay(10, "100002").await.unwrap().field(39),
        Some(&b"00"[..])
    );
    assert_eq!(b.stats.requests.load(Ordering::Relaxed), 5);

    // Bank 200002 moves to another host: a new connector takes over once it
    // has signed on, and the old one signs off.
    let c = Bank::start(&pki, Duration::ZERO).await;
    config_with(
        &dir.0,
        "",
        &format!(
            "{renamed}{}{}",
            bank("200002", c.addr, 1),
            route("4", "200002", "")
        ),
    );
    daemon.reload();
    let line = daemon.wait_line("config reloaded");
    assert!(line.contains("1 replaced"), "{line}");
    assert_eq!(
        c.stats.sign_ons.load(Ordering::Relaxed),
        1,
        "linked before taking over"
    );
    until("the old host signed off", || {
        b.stats.sign_offs.load(Ordering::Relaxed) == 2
    })
    .await;
    assert_eq!(
        three.pay(11, "100002").await.unwrap().field(39),
        Some(&b"00"[..])
    );
    assert_eq!(c.stats.requests.load(Ordering::Relaxed), 1, "the new host");
    assert!(
        c.stats.last_stan.load(Ordering::Relaxed) > b.stats.last_stan.load(Ordering::Relaxed),
        "the bank's STANs go on from where the old connector left them"
    );

    // Removed: institution 100001. Its open session gets 58 for its next
    // request and is closed; the others go on.
    config_with(
        &dir.0,
        "",
        &format!(
            "{}{}{}",
            institution("100002", "acquirer-two"),
            bank("200002", c.addr, 1),
            route("4", "200002", "")
        ),
    );
    daemon.reload();
    daemon.wait_line("config reloaded");
    assert_eq!(
        one.pay(12, "100001").await.unwrap().field(39),
        Some(&b"58"[..])
    );
    assert!(
        one.pay(13, "100001").await.is_none(),
        "closed after its answer"
    );
    assert_eq!(
        three.pay(14, "100002").await.unwrap().field(39),
        Some(&b"00"[..])
    );
    daemon.kill();
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_retired_by_a_reload_finishes_its_requests_first() {
    let dir = TempDir::new("reload-shrink");
    let pki = Pki::write(&dir.0);
    pki.write_crl(&dir.0, "crl.pem", &[]);
    let b = Bank::start(&pki, Duration::ZERO).await;
    let write = |links: usize| {
        config_with(
            &dir.0,
            "",
            &format!(
                "{}{}{}",
                institution("100001", "100001"),
                bank("200001", b.addr, links),
                route("4", "200001", "")
            ),
        )
    };
    let path = write(4);
    let mut daemon = Daemon::start(BIN, &path);
    until("four links", || {
        b.stats.sign_ons.load(Ordering::Relaxed) == 4
    })
    .await;
    // Held at the bank on whichever links took them.
    b.behavior.stall_for(WAIT);
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(Session::open(daemon.addr, &pki.client("100001")).await);
    }
    let frames: Vec<_> = (0..8)
        .map(|n| testkit::framed(&testkit::payment(n + 1, "100001", "000000001000")))
        .collect();
    for (s, f) in sessions.iter_mut().zip(&frames) {
        s.s.as_mut().unwrap().write_all(f).await.unwrap();
    }
    until("eight requests held", || {
        b.stats.requests.load(Ordering::Relaxed) == 8
    })
    .await;
    write(1);
    daemon.reload();
    daemon.wait_line("config reloaded");
    // A retiring link with requests held waits for them (they would otherwise
    // be answered 91 with a reversal when the link closed).
    b.behavior.stall_for(Duration::ZERO);
    // Each session reads the answer to the request it sent.
    let d = Dialect::iso87_ascii();
    let decoder = FrameDecoder::new(Framing::U16be, 8192);
    for s in &mut sessions {
        let stream = s.s.as_mut().unwrap();
        let answer = loop {
            if let Some(f) = decoder.decode(&mut s.buf).unwrap() {
                break Message::decode(&d, f).unwrap();
            }
            let n = tokio::time::timeout(WAIT, stream.read_buf(&mut s.buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed without an answer");
        };
        assert_eq!(answer.field(39), Some(&b"00"[..]));
    }
    until("three links signed off", || {
        b.stats.sign_offs.load(Ordering::Relaxed) == 3
    })
    .await;
    // What only a restart can change is refused, naming the keys.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("[switch]\n", "[switch]\nframing = \"ascii4\"\n"),
    )
    .unwrap();
    daemon.reload();
    let line = daemon.wait_line("reload rejected");
    assert!(
        line.contains("switch.framing changed: this needs a restart"),
        "{line}"
    );
    // A TLS file that cannot be read rejects the reload, naming the file.
    std::fs::write(&path, &text).unwrap();
    std::fs::remove_file(dir.0.join("crl.pem")).unwrap();
    daemon.reload();
    let line = daemon.wait_line("reload rejected");
    assert!(line.contains("crl.pem"), "{line}");
    daemon.kill();
    b.stop().await;
}

/// Requests in flight on the load test's connection.
const LOAD_WINDOW: usize = 32;
/// Requests the load test sends in all.
const LOAD_REQUESTS: usize = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_answer_every_request() {
    let dir = TempDir::new("reload-load");
    let pki = Pki::write(&dir.0);
    pki.write_crl(&dir.0, "crl.pem", &[]);
    let a = Bank::start(&pki, Duration::from_millis(1)).await;
    let b = Bank::start(&pki, Duration::from_millis(1)).await;
    let write = |links_a: usize, b_section: &str, to: &str| {
        config_with(
            &dir.0,
            "",
            &format!(
                "{}{}{b_section}{}",
                institution("100001", "100001"),
                bank("200001", a.addr, links_a),
                route("4", to, "")
            ),
        )
    };
    let path = write(1, "", "200001");
    let mut daemon = Daemon::start(BIN, &path);
    let stream = connect(daemon.addr, &pki.client("100001")).await.unwrap();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = answered.clone();
    // The load: a window of requests kept full until all are answered.
    let load = tokio::spawn(async move {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let d = Dialect::iso87_ascii();
        let decoder = FrameDecoder::new(Framing::U16be, 8192);
        let mut buf = BytesMut::new();
        let mut codes = std::collections::HashMap::new();
        let mut sent = 0;
        while codes.len() < LOAD_REQUESTS {
            while sent < LOAD_REQUESTS && sent - codes.len() < LOAD_WINDOW {
                sent += 1;
                let frame = testkit::framed(&testkit::payment(sent, "100001", "000000001000"));
                wr.write_all(&frame).await.unwrap();
            }
            let n = tokio::time::timeout(WAIT, rd.read_buf(&mut buf))
                .await
                .expect("answers keep coming")
                .unwrap();
            assert!(n > 0, "connection closed with {} answered", codes.len());
            while let Some(f) = decoder.decode(&mut buf).unwrap() {
                let m = Message::decode(&d, f).unwrap();
                let stan = String::from_utf8(m.field(11).unwrap().to_vec()).unwrap();
                let code = String::from_utf8(m.field(39).unwrap().to_vec()).unwrap();
                assert!(codes.insert(stan, code).is_none(), "answered twice");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        codes
    });
    let b_two_links = bank("200002", b.addr, 2);
    let b_one_link = bank("200002", b.addr, 1);
    // Each reload once a few hundred more requests have been answered.
    // A link setting changed: a new connector replaces B's while B carries the load.
    let b_replaced = format!("{b_two_links}echo_interval_ms = 20000\n\n");
    let steps: [(usize, &str, &str); 6] = [
        (3, &b_two_links, "200002"), // B added, routes to B, A grown to 3
        (1, &b_two_links, "200002"), // A shrunk to 1
        (1, &b_one_link, "200001"),  // B shrunk, routes back to A
        (2, "", "200001"),           // B removed, A grown to 2
        (2, &b_two_links, "200002"), // B added again, routes to B
        (2, &b_replaced, "200002"),  // B's connector replaced under load
    ];
    for (i, (links_a, b_section, to)) in steps.into_iter().enumerate() {
        let at = (i + 1) * LOAD_REQUESTS / 8;
        until("load progressing", || {
            answered.load(Ordering::Relaxed) >= at
        })
        .await;
        write(links_a, b_section, to);
        daemon.reload();
        let line = tokio::task::block_in_place(|| daemon.wait_line("config reloaded"));
        if i == 5 {
            assert!(line.contains("1 replaced"), "{line}");
        }
    }
    let codes = tokio::time::timeout(WAIT, load).await.unwrap().unwrap();
    let not_approved: Vec<_> = codes.iter().filter(|(_, c)| c.as_str() != "00").collect();
    assert!(not_approved.is_empty(), "{not_approved:?}");
    let (to_a, to_b) = (
        a.stats.requests.load(Ordering::Relaxed),
        b.stats.requests.load(Ordering::Relaxed),
    );
    assert_eq!(
        to_a + to_b,
        LOAD_REQUESTS as u64,
        "each request reached one bank once"
    );
    assert!(
        to_a > 0 && to_b > 0,
        "both banks carried load: {to_a} and {to_b}"
    );
    println!("{LOAD_REQUESTS} requests through six reloads, all approved: {to_a} via 200001, {to_b} via 200002");
    daemon.kill();
    a.stop().await;
    b.stop().await;
}
