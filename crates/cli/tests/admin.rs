//! The admin endpoint of a real `switchyard run`: `/healthz`, `/readyz`, `/status`
//! and `/metrics` (scraped and parsed), what it refuses, and who may change the
//! switch (`[admin.tls]`: operator certificates).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use switchyard::wire::{Dialect, FrameDecoder, Framing, Message};
use switchyard_tools::testkit::{self, connect, Bank, Daemon, Pki, TempDir, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn write_config(dir: &Path, bank: SocketAddr) -> PathBuf {
    let rest = format!(
        r#"[admin]
listen = "127.0.0.1:0"

[journal]
dir = "journal"

[[institution]]
id = "100001"

[[bank]]
id = "200001"
address = "{bank}"
server_name = "bank"
reconnect_backoff_max_ms = 200

[[route]]
pan_prefix = "4"
bank = "200001"
"#
    );
    testkit::write_config(dir, "", "", &rest)
}

/// Sends `request` as is and returns the status code and body.
async fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut response))
        .await
        .expect("answer in time")
        .unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: switchyard\r\n\r\n"),
    )
    .await
}

use switchyard_tools::testkit::parse_prometheus as parse;

/// The `switchyard` binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_status_and_metrics() {
    let dir = TempDir::new("admin");
    let pki = Pki::write(&dir.0);
    let bank = Bank::start(&pki, Duration::ZERO).await;
    let daemon = Daemon::start(BIN, &write_config(&dir.0, bank.addr));
    let admin = daemon.admin.expect("admin address in the log");

    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".to_owned()));

    // One payment, then its traces in /status and /metrics.
    let mut s = connect(daemon.addr, &pki.client("100001")).await.unwrap();
    let d = Dialect::iso87_ascii();
    let request = testkit::payment(1, "100001", "000000001000");
    s.write_all(&testkit::framed(&request)).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let frame = loop {
        if let Some(f) = FrameDecoder::new(Framing::U16be, 8192)
            .decode(&mut buf)
            .unwrap()
        {
            break f;
        }
        assert!(s.read_buf(&mut buf).await.unwrap() > 0);
    };
    assert_eq!(
        Message::decode(&d, frame).unwrap().field(39),
        Some(&b"00"[..])
    );

    let (code, body) = get(admin, "/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["ready"], true, "{body}");
    assert_eq!(status["sessions"], 1, "{body}");
    assert_eq!(status["sessions_by_institution"]["100001"], 1, "{body}");
    assert!(
        status["connectors"][0]["link_slots"][0]["inflight"].is_u64(),
        "{body}"
    );
    assert_eq!(status["connectors"][0]["bank"], "200001", "{body}");
    assert!(
        status["connectors"][0]["links_up"].as_u64() >= Some(1),
        "{body}"
    );
    assert_eq!(status["connectors"][0]["answered"], 1, "{body}");
    assert_eq!(status["journal"]["failed"], false, "{body}");
    assert!(status["journal"]["queue_depth"].is_u64(), "{body}");

    let (code, text) = get(admin, "/metrics").await;
    assert_eq!(code, 200);
    let m = parse(&text);
    let answered: f64 = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("switchyard_responses_total")
                && k.contains("institution=\"100001\"")
                && k.contains("code=\"00\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(answered, 1.0, "{text}");
    assert!(
        m.keys()
            .any(|k| k.starts_with("switchyard_connector_links_up")),
        "{text}"
    );
    for gauge in ["switchyard_journal_bytes", "switchyard_journal_queue_depth"] {
        assert!(m.keys().any(|k| k.starts_with(gauge)), "{gauge}: {text}");
    }

    // Latency histograms per connector and stage: the payment shows once its
    // link has handed its samples over (within a second).
    let total = "switchyard_latency_seconds_count{connector=\"200001\",stage=\"total\"}";
    let mut m = m;
    let limit = std::time::Instant::now() + testkit::WAIT;
    while m.get(total) != Some(&1.0) {
        assert!(std::time::Instant::now() < limit, "{total} not 1 in time");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = parse(&get(admin, "/metrics").await.1);
    }
    for stage in ["switch", "bank", "total", "journal"] {
        let series = format!("connector=\"200001\",stage=\"{stage}\"");
        let inf = m[&format!("switchyard_latency_seconds_bucket{{{series},le=\"+Inf\"}}")];
        let count = m[&format!("switchyard_latency_seconds_count{{{series}}}")];
        assert_eq!((inf, count), (1.0, 1.0), "{stage}");
        assert!(m[&format!("switchyard_latency_seconds_sum{{{series}}}")] >= 0.0);
        let in_60s = m[&format!("switchyard_latency_seconds_bucket{{{series},le=\"60\"}}")];
        assert_eq!(in_60s, 1.0, "{stage}");
    }

    // What it refuses.
    assert_eq!(get(admin, "/nope").await.0, 404);
    assert_eq!(http(admin, "POST /status HTTP/1.1\r\n\r\n").await.0, 405);
    // A change from loopback passes the rule; an unknown one is not routed, a
    // key rotation without its bank and key type is refused.
    assert_eq!(http(admin, "POST /keys/nope HTTP/1.1\r\n\r\n").await.0, 405);
    assert_eq!(
        http(admin, "POST /keys/rotate HTTP/1.1\r\n\r\n").await.0,
        400
    );
    let huge = format!("GET /status HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
    assert_eq!(http(admin, &huge).await.0, 431);

    // `switchyard reload` through the endpoint: a valid edit applied, an invalid
    // one rejected with check-config's error.
    let path = dir.0.join("switchyard.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("pan_prefix = \"4\"", "pan_prefix = \"41\""),
    )
    .unwrap();
    let reload = || {
        std::process::Command::new(BIN)
            .args(["reload", "--admin", &admin.to_string()])
            .output()
            .unwrap()
    };
    let out = reload();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("config reloaded"));
    std::fs::write(
        &path,
        text.replace("bank = \"200001\"\n", "bank = \"777\"\n"),
    )
    .unwrap();
    let out = reload();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("route[0].bank: no [[bank]] has id 777"),
        "{out:?}"
    );

    // The bank goes away: not ready.
    bank.stop().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, body) = get(admin, "/readyz").await;
        if code == 503 {
            assert_eq!(body, "no link up to bank 200001\n");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill();
}

/// Reads until the server closes the connection (or resets it); what it sent.
async fn until_closed(tcp: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got))
        .await
        .expect("the switch closes the connection in time");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_keeps_its_bounds() {
    let dir = TempDir::new("admin-bounds");
    let pki = Pki::write(&dir.0);
    let bank = Bank::start(&pki, Duration::ZERO).await;
    let rest = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nconnections_max = 2\nheader_read_timeout_ms = 3000\n\
         request_head_max_bytes = 8192\n\n\
         [[institution]]\nid = \"100001\"\n\n\
         [[bank]]\nid = \"200001\"\naddress = \"{}\"\nserver_name = \"bank\"\n\n\
         [[route]]\npan_prefix = \"4\"\nbank = \"200001\"\n",
        bank.addr
    );
    let daemon = Daemon::start(BIN, &testkit::write_config(&dir.0, "", "", &rest));
    let admin = daemon.admin.expect("admin endpoint");
    // Slow requests: two clients that never finish their request head hold both
    // connection slots...
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: sw")
            .await
            .unwrap();
        slow.push(tcp);
    }
    // ... so a third connection is closed at once, unanswered (the endpoint takes
    // a slot at accept, before reading anything; it accepts in order).
    let mut third = tokio::net::TcpStream::connect(admin).await.unwrap();
    let _ = third.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert_eq!(
        until_closed(&mut third).await,
        "",
        "refused at the connection bound"
    );
    // The slow ones are cut off once their head is overdue, without an answer.
    for tcp in &mut slow {
        let answer = until_closed(tcp).await;
        assert!(!answer.contains("200 OK"), "{answer}");
    }
    // Room again; the refusal was counted.
    let (code, metrics) = get(admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(parse(&metrics)["switchyard_admin_refused_total"] >= 1.0);
    // An oversized head is answered 431.
    let huge = format!("GET /status HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9_000));
    assert_eq!(http(admin, &huge).await.0, 431);
    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".to_owned()));
    daemon.kill();
    bank.stop().await;
}

/// Sends `request` over TLS with `tls` (trusting the endpoint's CA, presenting an
/// operator certificate or none) and returns the status code and body, or the
/// error of a refused handshake.
async fn https(
    addr: SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    request: &str,
) -> std::io::Result<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    stream.write_all(request.as_bytes()).await?;
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut got))
        .await
        .expect("answer in time");
    if got.is_empty() {
        read?;
    }
    let response = String::from_utf8_lossy(&got);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_changes_need_an_operator_certificate() {
    use switchyard_tools::certs::{write_issued, DevCa};
    let dir = TempDir::new("admin-tls");
    let pki = Pki::write(&dir.0);
    // The endpoint's own certificate (from the switch's CA), and a CA of its own
    // for operators.
    let server = pki.ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
    write_issued(&dir.0, "admin", &server).unwrap();
    let operators = DevCa::new("operator CA").unwrap();
    std::fs::write(dir.0.join("operators.pem"), operators.ca_pem()).unwrap();
    let bank = Bank::start(&pki, Duration::ZERO).await;
    let rest = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [admin.tls]\ncert_file = \"admin.pem\"\nkey_file = \"admin.key\"\n\
         client_ca_file = \"operators.pem\"\nclient_names = [\"ops-1\"]\n\n\
         [[institution]]\nid = \"100001\"\n\n\
         [[bank]]\nid = \"200001\"\naddress = \"{}\"\nserver_name = \"bank\"\n\n\
         [[route]]\npan_prefix = \"4\"\nbank = \"200001\"\n",
        bank.addr
    );
    let config = testkit::write_config(&dir.0, "", "", &rest);
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("TLS only; changes need an operator certificate"),
        "{stdout}"
    );
    let daemon = Daemon::start(BIN, &config);
    let admin = daemon.admin.expect("admin endpoint");
    let trust = [pki.ca.ca_der()];
    let anonymous = switchyard::tls::client_config_anonymous(&trust).unwrap();
    let operator = |ca: &DevCa, name: &str| {
        let issued = ca.issue_client(name).unwrap();
        switchyard::tls::client_config(&trust, issued.chain().unwrap(), issued.key().unwrap())
            .unwrap()
    };
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: switchyard\r\n\r\n");
    let post = |path: &str| format!("POST {path} HTTP/1.1\r\nHost: switchyard\r\n\r\n");

    // Reading: any TLS client.
    let (code, metrics) = https(admin, anonymous.clone(), &get("/metrics"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("switchyard_"), "{metrics}");
    let healthz = https(admin, anonymous.clone(), &get("/healthz"))
        .await
        .unwrap();
    assert_eq!(healthz, (200, "ok\n".to_owned()));

    // Changing: no certificate, from loopback even, is refused; so is key rotation.
    for path in ["/reload", "/keys/rotate"] {
        let answer = https(admin, anonymous.clone(), &post(path)).await.unwrap();
        assert_eq!(
            answer,
            (
                403,
                "forbidden: changes need an operator client certificate\n".to_owned()
            ),
            "{path}"
        );
    }
    // A certificate from the operator CA whose name is not listed.
    let answer = https(admin, operator(&operators, "ops-2"), &post("/reload"))
        .await
        .unwrap();
    assert_eq!(
        answer,
        (
            403,
            "forbidden: the client certificate names no allowed operator\n".to_owned()
        )
    );
    // The listed name, but from another CA (the acquirers'): the handshake fails.
    let stranger = https(admin, operator(&pki.ca, "ops-1"), &post("/reload")).await;
    assert!(stranger.is_err(), "{stranger:?}");
    // Plain HTTP on the TLS endpoint: no answer at all.
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let _ = tcp.write_all(post("/reload").as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got))
        .await
        .expect("closed in time");
    assert!(!got.starts_with(b"HTTP/"), "{got:?}");
    // The operator: served.
    let (code, body) = https(admin, operator(&operators, "ops-1"), &post("/reload"))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("config reloaded"), "{body}");

    // `switchyard reload` over TLS: with the operator certificate (the endpoint's
    // name defaults to the address's IP), and without one.
    write_issued(&dir.0, "ops-1", &operators.issue_client("ops-1").unwrap()).unwrap();
    let path = |name: &str| dir.0.join(name).display().to_string();
    let reload = |extra: &[&str]| {
        std::process::Command::new(BIN)
            .args(["reload", "--admin", &admin.to_string(), "--tls-ca"])
            .arg(path("ca.pem"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = reload(&["--cert", &path("ops-1.pem"), "--key", &path("ops-1.key")]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("config reloaded"));
    let out = reload(&["--server-name", "localhost"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("forbidden: changes need an operator"),
        "{out:?}"
    );

    // Counted: each refusal by reason, the failed handshakes (the stranger's and
    // the plain client's), the two reloads applied.
    let scrape = || async {
        let (_, text) = https(admin, anonymous.clone(), &get("/metrics"))
            .await
            .unwrap();
        parse(&text)
    };
    let m = scrape().await;
    let forbidden = |reason: &str| {
        m.get(&format!(
            "switchyard_admin_forbidden_total{{reason=\"{reason}\"}}"
        ))
        .copied()
    };
    assert_eq!(forbidden("no-certificate"), Some(3.0));
    assert_eq!(forbidden("name-not-allowed"), Some(1.0));
    assert_eq!(forbidden("not-loopback"), None);
    assert_eq!(
        m.get("switchyard_config_reloads_total{result=\"applied\"}"),
        Some(&2.0)
    );
    let failed = "switchyard_admin_handshakes_failed_total";
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut m = m;
    while m.get(failed) != Some(&2.0) {
        assert!(tokio::time::Instant::now() < deadline, "{failed}: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = scrape().await;
    }
    daemon.kill();
    bank.stop().await;
}

#[test]
fn check_config_refuses_an_open_admin_endpoint_without_tls() {
    let dir = TempDir::new("admin-open");
    let _pki = Pki::write(&dir.0);
    let rest = "[admin]\nlisten = \"0.0.0.0:9464\"\n\n[[institution]]\nid = \"100001\"\n";
    let config = testkit::write_config(&dir.0, "", "", rest);
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin.listen: 0.0.0.0:9464 is not a loopback address"),
        "{stderr}"
    );
}
