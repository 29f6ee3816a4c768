//! The binary as a user runs it: `demo --json` and `demo --serve` with a client that
//! builds its ISO 8583:1987 bytes by hand (not with switchyard's encoder).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

#[test]
fn demo_json_prints_one_object_with_approvals_and_no_errors() {
    let out = Command::new(BIN)
        .args([
            "demo",
            "--duration",
            "1",
            "--json",
            "--connections",
            "2",
            "--window",
            "8",
        ])
        .output()
        .expect("run demo");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "exactly one line: {stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    for k in [
        "approved",
        "declined",
        "errors",
        "timeouts",
        "tps",
        "latency_us",
    ] {
        assert!(keys.contains(&k), "{k} missing in {stdout}");
    }
    assert!(v["approved"].as_u64().unwrap() > 0, "{stdout}");
    assert_eq!(v["errors"].as_u64(), Some(0), "{stdout}");
    for k in ["p50", "p99", "p999", "max"] {
        assert!(v["latency_us"][k].is_u64(), "{k} in {stdout}");
    }
}

/// `demo --keys`: every request carries a PIN block and a MAC, translated and
/// re-MAC'ed on its way; the simulated banks check the MAC (63 when it fails)
/// and decline only the usual one in twenty.
#[test]
fn demo_with_pin_and_mac_keys_on_every_link_approves() {
    for keys in ["tdes", "aes"] {
        let out = Command::new(BIN)
            .args(["demo", "--duration", "1", "--json", "--connections", "2"])
            .args(["--window", "8", "--keys", keys])
            .output()
            .expect("run demo");
        assert!(
            out.status.success(),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (approved, declined) = (
            v["approved"].as_u64().unwrap(),
            v["declined"].as_u64().unwrap(),
        );
        assert!(approved > 0, "{keys}: {v}");
        assert!(declined * 10 < approved, "{keys}: MAC or PIN refusals? {v}");
        assert_eq!(v["errors"].as_u64(), Some(0), "{keys}: {v}");
    }
}

/// Appends an ASCII fixed field, or an LLVAR one with its 2-digit length.
fn fixed(out: &mut Vec<u8>, v: &str) {
    out.extend_from_slice(v.as_bytes());
}
fn llvar(out: &mut Vec<u8>, v: &str) {
    out.extend_from_slice(format!("{:02}", v.len()).as_bytes());
    out.extend_from_slice(v.as_bytes());
}

/// A standard 0200: fields 2, 3, 4, 7, 11, 12, 13, 32, 37, 41, 42, 49 and 100.
fn hand_built_0200(acquirer: &str, destination: &str) -> Vec<u8> {
    let mut m = b"0200".to_vec();
    // Primary bitmap: 1 (secondary present), 2, 3, 4, 7, 11, 12, 13, 32, 37, 41, 42, 49.
    let mut primary = 0u64;
    for f in [1u32, 2, 3, 4, 7, 11, 12, 13, 32, 37, 41, 42, 49] {
        primary |= 1 << (64 - f);
    }
    m.extend_from_slice(&primary.to_be_bytes());
    m.extend_from_slice(&(1u64 << (128 - 100)).to_be_bytes());
    llvar(&mut m, "4111111111111111");
    fixed(&mut m, "000000");
    fixed(&mut m, "000000012345");
    fixed(&mut m, "1125093000");
    fixed(&mut m, "123456");
    fixed(&mut m, "093000");
    fixed(&mut m, "1125");
    llvar(&mut m, acquirer);
    fixed(&mut m, "532909123456");
    fixed(&mut m, "ATM00001");
    fixed(&mut m, "SHOP00000000001");
    fixed(&mut m, "978");
    llvar(&mut m, destination);
    m
}

fn frame(m: &[u8]) -> Vec<u8> {
    let mut f = (m.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(m);
    f
}

#[tokio::test]
async fn demo_serve_answers_a_standard_client() {
    let dir = std::env::temp_dir().join(format!("switchyard-serve-{}", std::process::id()));
    let mut child = Command::new(BIN)
        .args(["demo", "--serve", "--certs-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start demo --serve");
    let stdout = child.stdout.take().unwrap();
    let _guard = KillOnDrop(Some(child));
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).expect("one JSON line");
    let addr: std::net::SocketAddr = info["listen"].as_str().unwrap().parse().unwrap();
    let institution = info["institutions"][0].as_str().unwrap().to_owned();
    let destination = info["destinations"][0].as_str().unwrap().to_owned();

    let ca = switchyard::tls::load_certs(&dir.join("ca.pem")).unwrap();
    let chain = switchyard::tls::load_certs(&dir.join(format!("{institution}.pem"))).unwrap();
    let key = switchyard::tls::load_key(&dir.join(format!("{institution}.key"))).unwrap();
    let tls = switchyard::tls::client_config(&ca, chain, key).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::clone(&tls))
        .connect(name, tcp)
        .await
        .unwrap();

    let mut echo = b"0800".to_vec();
    // Fields 7, 11 and 70 (secondary bitmap).
    let bm: u64 = 1 << (64 - 1) | 1 << (64 - 7) | 1 << (64 - 11);
    echo.extend_from_slice(&bm.to_be_bytes());
    echo.extend_from_slice(&(1u64 << (128 - 70)).to_be_bytes());
    echo.extend_from_slice(b"1125093000654321301");

    let mut out = frame(&hand_built_0200(&institution, &destination));
    out.extend_from_slice(&frame(&echo));
    s.write_all(&out).await.unwrap();
    s.flush().await.unwrap();

    let d = switchyard::wire::Dialect::iso87_ascii();
    let mut answers = Vec::new();
    let mut buf = Vec::new();
    let read = async {
        while answers.len() < 2 {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "switch closed the connection");
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                if buf.len() < 2 + len {
                    break;
                }
                let body = bytes::Bytes::copy_from_slice(&buf[2..2 + len]);
                buf.drain(..2 + len);
                answers.push(switchyard::wire::Message::decode(&d, body).unwrap());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("answers in time");
    answers.sort_by_key(|m| *m.mti().as_bytes());
    let (a, e) = (&answers[0], &answers[1]);
    assert_eq!(a.mti().as_bytes(), b"0210");
    assert_eq!(a.field(39), Some(&b"00"[..]));
    assert_eq!(a.field(11), Some(&b"123456"[..]));
    assert_eq!(a.field(37), Some(&b"532909123456"[..]));
    assert_eq!(e.mti().as_bytes(), b"0810");
    assert_eq!(
        (e.field(39), e.field(70)),
        (Some(&b"00"[..]), Some(&b"301"[..]))
    );

    let _ = std::fs::remove_dir_all(&dir);
}

/// Stops the served demo even when an assertion fails: SIGTERM, so that it stops
/// as an operator's would and removes its temporary journal; SIGKILL if it has not
/// exited within 10 s.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        let pid = child.id();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let (exited, waiting) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = exited.send(child.wait());
        });
        if waiting
            .recv_timeout(std::time::Duration::from_secs(10))
            .is_err()
        {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

#[test]
fn check_config_reads_the_tls_files_too() {
    let dir = std::env::temp_dir().join(format!("switchyard-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config")).unwrap();
    let shipped = include_str!("../../../config/switchyard.toml");
    let config = dir.join("config/switchyard.toml");
    std::fs::write(&config, shipped).unwrap();
    let run = |args: &[&str]| Command::new(BIN).args(args).output().unwrap();
    let check = || run(&["check-config", "--config", config.to_str().unwrap()]);
    let out = check();
    assert!(!out.status.success(), "no certificates written yet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certs/ca.pem"), "{stderr}");
    let certs = dir.join("certs");
    let gen_certs = || {
        run(&[
            "gen-certs",
            "--config",
            config.to_str().unwrap(),
            "--out",
            certs.to_str().unwrap(),
        ])
    };
    let out = gen_certs();
    assert!(out.status.success(), "{out:?}");
    let out = check();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid, with its TLS files"));
    // An institution added to the config: gen-certs again keeps the CA and every
    // certificate already there, and issues the new institution's.
    let read = |name: &str| std::fs::read(certs.join(name)).unwrap();
    let (ca, switch) = (read("ca.pem"), read("switch.pem"));
    let added = shipped.replacen(
        "[[institution]]",
        "[[institution]]\nid = \"100009\"\n\n[[institution]]",
        1,
    );
    std::fs::write(&config, added).unwrap();
    let out = gen_certs();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("extended the CA") && stdout.ends_with("issued 100009\n"),
        "{stdout}"
    );
    assert_eq!((read("ca.pem"), read("switch.pem")), (ca, switch), "kept");
    assert!(certs.join("100009.key").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}
