//! What the tests share: temporary directories, messages and payments built field by
//! field, a mutual-TLS test client, a PKI written to files, a simulated bank in the
//! test process, the daemon as a child process (`switchyard run`), one TLS handshake
//! observed from both sides, and Prometheus text parsed.
//!
//! Test support, not production code: failures panic with what went wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::banksim::{self, BankSimOptions, BankStats, Behavior};
use crate::certs::{self, DevCa};
use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use switchyard::tls::{connection_identity, IdentityError, IdentitySource};
use switchyard::wire::{Dialect, Encoder, FrameDecoder, Framing, Message, Mti};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Bound on any single wait; never reached when things work.
pub const WAIT: Duration = Duration::from_secs(30);

/// A fresh, empty directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new directory whose name starts with `switchyard-<name>-` (unique in the
    /// process and across processes).
    pub fn new(name: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = switchyard::clock::unix_ms();
        let unique = format!("switchyard-{name}-{}-{now}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(unique);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `switchyard run` child process and the lines of its log that matter here.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    /// The admin endpoint, when `[admin] listen` is configured.
    pub admin: Option<SocketAddr>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts `BIN run --config CONFIG` (`BIN`: the `switchyard` binary, e.g.
    /// `env!("CARGO_BIN_EXE_switchyard")`) and waits until it listens and a bank
    /// link is up.
    pub fn start(bin: &str, config: &Path) -> Daemon {
        let mut d = Daemon::spawn(bin, config);
        d.wait_running();
        d
    }

    /// Starts `BIN run --config CONFIG` without waiting for anything (a cluster
    /// standby logs "switchyard running" only once it takes over:
    /// [`Daemon::wait_running`]).
    pub fn spawn(bin: &str, config: &Path) -> Daemon {
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start switchyard run");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::sync_channel(1024);
        // Drains the log so the child never blocks on it; keeps the interesting lines.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var("DEBUG_DAEMON").is_ok() {
                    eprintln!("D {line}");
                }
                if line.contains("switchyard running")
                    || line.contains("bank link up")
                    || line.contains("reload")
                    || line.contains("cluster:")
                    || line.contains("ERROR")
                {
                    let _ = tx.try_send(line);
                }
            }
        });
        Daemon {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            admin: None,
            lines,
        }
    }

    /// Waits until the switch listens (its address and admin endpoint's are
    /// then known) and a bank link is up.
    pub fn wait_running(&mut self) {
        let d = self;
        let running = d.wait_line("switchyard running");
        let listen = running
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .expect("listen address in the log");
        d.addr = listen.parse().unwrap();
        d.admin = running
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .and_then(|a| a.parse().ok());
        d.wait_line("bank link up");
    }

    /// Waits for a log line containing `what` (among the lines kept: start-up,
    /// links, reloads, errors), for at most [`WAIT`].
    pub fn wait_line(&mut self, what: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(line) => eprintln!("switchyard: {line}"),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("switchyard did not log {what:?} within {WAIT:?}");
                }
            }
        }
    }

    /// The process's peak resident memory so far, KiB (`VmHWM`; Linux).
    pub fn peak_memory_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Sends SIGTERM (a graceful shutdown).
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Sends SIGHUP (reload the config).
    pub fn reload(&self) {
        self.signal("-HUP");
    }

    /// Sends a signal with `kill` (`which`: `-TERM`, `-STOP`, `-CONT`, …).
    pub fn signal(&self, which: &str) {
        let status = Command::new("kill")
            .args([which, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {which} failed");
    }

    /// Waits for the process to exit, for at most [`WAIT`]; its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "switchyard did not exit within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL (see `Drop`).
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for Daemon {
    /// SIGKILL; also when a check fails, so no daemon outlives the test.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and the switch's certificates written into a directory: `ca.pem`,
/// `switch.pem`/`.key` (server, for `localhost`), `switchyard.pem`/`.key` (its
/// client certificate towards banks).
pub struct Pki {
    pub ca: DevCa,
}

impl Pki {
    pub fn write(dir: &Path) -> Pki {
        let ca = DevCa::new("test CA").unwrap();
        certs::write_ca(dir, &ca).unwrap();
        certs::write_issued(dir, "switch", &ca.issue_server(&["localhost"]).unwrap()).unwrap();
        certs::write_issued(dir, "switchyard", &ca.issue_client("switchyard").unwrap()).unwrap();
        Pki { ca }
    }

    /// A client TLS config presenting a certificate for `institution`.
    pub fn client(&self, institution: &str) -> Arc<rustls::ClientConfig> {
        self.client_with_certificate(institution).1
    }

    /// A client certificate for `institution` (to revoke later), and a client
    /// TLS config presenting it.
    pub fn client_with_certificate(
        &self,
        institution: &str,
    ) -> (certs::Issued, Arc<rustls::ClientConfig>) {
        let issued = self.ca.issue_client(institution).unwrap();
        let config = switchyard::tls::client_config(
            &[self.ca.ca_der()],
            issued.chain().unwrap(),
            issued.key().unwrap(),
        )
        .unwrap();
        (issued, config)
    }

    /// Writes `name`, a revocation list of the CA revoking `revoked`.
    pub fn write_crl(&self, dir: &Path, name: &str, revoked: &[&certs::Issued]) {
        let crl = self.ca.revocation_list(revoked).unwrap();
        std::fs::write(dir.join(name), crl).unwrap();
    }
}

/// A simulated bank (`server_name = "bank"`) in this process.
pub struct Bank {
    pub addr: SocketAddr,
    pub stats: Arc<BankStats>,
    pub behavior: Arc<Behavior>,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Bank {
    pub async fn start(pki: &Pki, latency: Duration) -> Bank {
        let cert = pki.ca.issue_server(&["bank"]).unwrap();
        let tls = switchyard::tls::server_config(
            &[pki.ca.ca_der()],
            cert.chain().unwrap(),
            cert.key().unwrap(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(BankStats::default());
        let behavior = Arc::new(Behavior::new(latency, 0));
        let stop = Arc::new(Notify::new());
        let stopped = stop.clone();
        let task = tokio::spawn(banksim::serve(
            listener,
            tls,
            BankSimOptions {
                dialect: Arc::new(Dialect::iso87_ascii()),
                framing: Framing::U16be,
                header: switchyard::wire::MessageHeader::None,
                frame_size_max_bytes: 8192,
                seed: 1,
                keys: None,
            },
            behavior.clone(),
            stats.clone(),
            async move { stopped.notified().await },
        ));
        Bank {
            addr,
            stats,
            behavior,
            stop,
            task,
        }
    }

    pub async fn stop(self) {
        self.stop.notify_one();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("bank stops")
            .unwrap()
            .unwrap();
    }
}

/// A mutual-TLS connection to the switch at `addr`.
pub async fn connect(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
}

/// The test client: one mutual-TLS connection of an acquirer to the switch,
/// sending framed messages (default dialect, `u16be`) and reading answers.
pub struct Client {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    buf: BytesMut,
}

impl Client {
    /// Connects to the switch at `addr` presenting `tls`'s certificate.
    pub async fn connect(addr: SocketAddr, tls: Arc<ClientConfig>) -> std::io::Result<Client> {
        Ok(Client {
            stream: connect(addr, &tls).await?,
            buf: BytesMut::new(),
        })
    }

    /// Sends `message` (unframed) in a frame.
    pub async fn send_raw(&mut self, message: &[u8]) {
        self.stream.write_all(&framed(message)).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Sends a message built from `fields`.
    pub async fn send(&mut self, mti: Mti, fields: &[(u8, &[u8])]) {
        self.send_raw(&message(mti, fields)).await;
    }

    /// The next answer (within [`WAIT`]), or None if the switch closed the
    /// connection.
    pub async fn recv(&mut self) -> Option<Message> {
        let decoder = FrameDecoder::new(Framing::U16be, 8192);
        let read = async {
            loop {
                if let Some(frame) = decoder.decode(&mut self.buf).unwrap() {
                    return Some(frame);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        let frame = tokio::time::timeout(WAIT, read)
            .await
            .expect("answer in time")?;
        Some(Message::decode(dialect(), frame).expect("switch answers decode"))
    }

    /// Sends a 0200 of [`payment_fields`] and returns its answer.
    pub async fn pay(
        &mut self,
        stan: &[u8],
        acquirer: &[u8],
        pan: &[u8],
        amount: &[u8],
    ) -> Message {
        self.send(Mti::FINANCIAL, &payment_fields(stan, acquirer, pan, amount))
            .await;
        self.recv().await.expect("an answer")
    }

    /// The next frame, whether or not it decodes (within [`WAIT`]); None on close.
    pub async fn recv_any(&mut self) -> Option<Bytes> {
        let decoder = FrameDecoder::new(Framing::U16be, 8192);
        let read = async {
            loop {
                if let Ok(Some(frame)) = decoder.decode(&mut self.buf) {
                    return Some(frame);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("an answer or close in time")
    }

    /// The TLS stream, for what the client methods do not do.
    pub fn stream(&mut self) -> &mut tokio_rustls::client::TlsStream<TcpStream> {
        &mut self.stream
    }
}

/// A config file for `switchyard run` in `dir` (`switchyard.toml`): the listener on
/// 127.0.0.1:0 and the TLS files [`Pki::write`] wrote, `switch` and `tls` extra
/// lines in those sections, then `rest` (institutions, banks, routes, …).
pub fn write_config(dir: &Path, switch: &str, tls: &str, rest: &str) -> PathBuf {
    let text = format!(
        "[switch]\nlisten = \"127.0.0.1:0\"\n{switch}\n\n\
         [tls]\nca_file = \"ca.pem\"\ncert_file = \"switch.pem\"\nkey_file = \"switch.key\"\n\
         client_cert_file = \"switchyard.pem\"\nclient_key_file = \"switchyard.key\"\n{tls}\n\n{rest}"
    );
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A message built field by field in the default dialect, decoded (values must
/// fit the dialect).
pub fn decoded(mti: Mti, fields: &[(u8, &[u8])]) -> Message {
    Message::decode(dialect(), message(mti, fields)).expect("test message decodes")
}

/// The default dialect, parsed once (parsing it costs milliseconds in debug builds).
pub fn dialect() -> &'static Dialect {
    static DIALECT: std::sync::OnceLock<Dialect> = std::sync::OnceLock::new();
    DIALECT.get_or_init(Dialect::iso87_ascii)
}

/// The fields of a typical 0200 (purchase) from `acquirer`: card `pan`, DE11
/// `stan`, DE4 `amount`, fixed DE7, DE12/13, DE37, DE41/42 and DE49 (978).
pub fn payment_fields<'a>(
    stan: &'a [u8],
    acquirer: &'a [u8],
    pan: &'a [u8],
    amount: &'a [u8],
) -> Vec<(u8, &'a [u8])> {
    vec![
        (2, pan),
        (3, b"000000"),
        (4, amount),
        (7, b"1125120000"),
        (11, stan),
        (12, b"120000"),
        (13, b"1125"),
        (32, acquirer),
        (37, b"532912000001"),
        (41, b"TERM0001"),
        (42, b"MERCHANT0000001"),
        (49, b"978"),
    ]
}

/// A message built field by field (values as given, not checked), unframed.
pub fn message(mti: Mti, fields: &[(u8, &[u8])]) -> Bytes {
    let d = dialect();
    let mut out = BytesMut::new();
    let mut enc = Encoder::new(d, &mut out, mti);
    for (n, v) in fields {
        enc.field(*n, v).unwrap();
    }
    enc.finish();
    out.freeze()
}

/// `message` with its 2-byte length header.
pub fn framed(message: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    Framing::U16be.write(&mut out, message).unwrap();
    out.to_vec()
}

/// Payment number `n` (from 1) of `acquirer`, unframed: DE11 is `n` (wrapping past
/// 999999), DE7 a time of day derived from `n`, DE37 `n`; `amount` is DE4.
pub fn payment(n: usize, acquirer: &str, amount: &str) -> Bytes {
    let stan = format!("{:06}", (n.max(1) - 1) % 999_999 + 1);
    let t = n % 86_400;
    let de7 = format!("1126{:02}{:02}{:02}", t / 3600, (t / 60) % 60, t % 60);
    let rrn = format!("{n:012}");
    message(
        Mti::FINANCIAL,
        &[
            (2, b"4111111111111111"),
            (3, b"000000"),
            (4, amount.as_bytes()),
            (7, de7.as_bytes()),
            (11, stan.as_bytes()),
            (32, acquirer.as_bytes()),
            (37, rrn.as_bytes()),
            (49, b"978"),
        ],
    )
}

/// Parses Prometheus text exposition lines into `name{labels}` → value.
pub fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

// === one TLS handshake, seen from both sides ===

/// What each side saw of one connection attempt.
pub struct Outcome {
    /// The client identity per source as the server read it, or the server's handshake
    /// error.
    pub server: Result<Vec<Result<String, IdentityError>>, std::io::Error>,
    /// Whether the client received the server's greeting after its handshake.
    pub client_got_greeting: bool,
}

const GREETING: &[u8] = b"hello";

/// Runs one connection over 127.0.0.1 and reports what both sides saw. The server reads
/// each of `sources` from the client certificate, then sends a greeting. Both sides are
/// awaited to completion: no sleeps, no timeouts.
pub async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    sources: &[IdentitySource],
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let sources = sources.to_vec();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
        let conn = tls.get_ref().1;
        let ids = sources
            .iter()
            .map(|&s| connection_identity(conn, s))
            .collect::<Vec<_>>();
        tls.write_all(GREETING).await?;
        tls.shutdown().await?;
        Ok::<_, std::io::Error>(ids)
    });

    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    let client_got_greeting = match TlsConnector::from(client).connect(name, tcp).await {
        Err(_) => false,
        Ok(mut tls) => {
            let mut buf = Vec::new();
            // The server closes after the greeting, or after an alert when it refused us.
            let read = tls.read_to_end(&mut buf).await;
            read.is_ok() && buf == GREETING
        }
    };
    let server = server_task.await.expect("server task");
    Outcome {
        server,
        client_got_greeting,
    }
}

/// The Python of the pinned oracle environment (pyiso8583 and the cp1047
/// codec), made by `.ci/oracle-venv` when missing.
pub fn oracle_python() -> PathBuf {
    static READY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    READY
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let python = root.join(".venv-oracle/bin/python");
            let ready = Command::new(&python)
                .args(["-c", "import iso8583, ebcdic, psec"])
                .status()
                .is_ok_and(|s| s.success());
            if !ready {
                let status = Command::new("bash")
                    .arg(root.join(".ci/oracle-venv"))
                    .status()
                    .expect("run .ci/oracle-venv");
                assert!(
                    status.success(),
                    ".ci/oracle-venv could not make the oracle environment (pyiso8583, psec)"
                );
            }
            python
        })
        .clone()
}
