//! Bank host simulator: answers ISO 8583 requests over mutual TLS, for tests, the demo and
//! load runs.
//!
//! Answers are deterministic: the response code follows from the amount (DE4) and the
//! approval code from DE11 and DE7, so a test can predict every answer (see [`answer`]).
//! Latency and loss are knobs on a shared [`Behavior`] that tests turn while it runs.
//!
//! One task per connection; inside it a reader and a writer future run concurrently, so the
//! bank keeps reading while answers wait for their release time or for the peer to read.
//!
//! With [`SimKeys`] the bank checks the MAC of every request and advice (answering 63
//! when it fails, counted in [`BankStats::mac_failures`]), MACs every answer but network
//! management, and takes new working keys in an 0800 key change (DE70 161: a TR-31 key
//! block under its ZMK and the key's check value): it answers 0810 00 and uses the new
//! key from then on for what it sends, still accepting the key it replaced on requests
//! (those in flight) until the next change.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use switchyard::core::link::kcv_hex;
use switchyard::core::ResponseCode;
use switchyard::security::{
    binary_field_len, mac_field, KCV_FIELD_DEFAULT, KEY_BLOCK_FIELD_DEFAULT,
};
use switchyard::wire::{
    reencode, Change, DecodeError, Dialect, EncodeError, FrameDecoder, FrameError, Framing,
    Message, MessageHeader, Mti,
};
use switchyard_security::module::MacAlgorithm;
use switchyard_security::{mac, tr31, Key};

/// How long a client has to complete the TLS handshake, in milliseconds.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Answers waiting for their release time or for the peer to read them, per connection, in
/// bytes. At the bound the simulator stops reading (TCP backpressure) until the writer drains.
pub const PENDING_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Free space kept in the read buffer before each read, in bytes.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Pause after a failed `accept` (for example too many open files), in milliseconds, so the
/// accept loop does not spin.
const ACCEPT_RETRY_MS: u64 = 50;
/// How often a stalled writer checks whether the stall was ended early, in milliseconds.
const STALL_CHECK_MS: u64 = 10;
/// One million: the unit of [`Behavior::set_drop_per_million`].
const PER_MILLION: u32 = 1_000_000;
/// Longest simulated answer delay, in microseconds (one hour); longer settings are clamped.
pub const ANSWER_DELAY_MAX_US: u64 = 3_600_000_000;

// === Behavior ===

/// Knobs tests can turn while the simulator runs. Read once per read batch (latency) or per
/// request (drops); changes apply to requests received afterwards. A stall applies at once.
#[derive(Debug)]
pub struct Behavior {
    latency_us: AtomicU64,
    drop_per_million: AtomicU32,
    silent: AtomicBool,
    /// Time base of `stall_until_us`.
    epoch: Instant,
    /// End of the current stall, in microseconds after `epoch`; 0: no stall.
    stall_until_us: AtomicU64,
}

impl Behavior {
    /// A behaviour answering after `latency`, dropping `drop_per_million` requests out of a
    /// million (clamped to 1,000,000 = drop all).
    pub fn new(latency: Duration, drop_per_million: u32) -> Behavior {
        Behavior {
            latency_us: AtomicU64::new(duration_us(latency)),
            drop_per_million: AtomicU32::new(drop_per_million.min(PER_MILLION)),
            silent: AtomicBool::new(false),
            epoch: Instant::now(),
            stall_until_us: AtomicU64::new(0),
        }
    }

    /// Sets the delay between receiving a request and releasing its answer (clamped to
    /// [`ANSWER_DELAY_MAX_US`]).
    pub fn set_latency(&self, latency: Duration) {
        self.latency_us
            .store(duration_us(latency), Ordering::Relaxed);
    }

    /// The delay between receiving a request and releasing its answer.
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }

    /// Sets how many requests out of a million are dropped unanswered (clamped to 1,000,000).
    pub fn set_drop_per_million(&self, drop_per_million: u32) {
        self.drop_per_million
            .store(drop_per_million.min(PER_MILLION), Ordering::Relaxed);
    }

    /// How many requests out of a million are dropped; 1,000,000 while silent.
    pub fn drop_per_million(&self) -> u32 {
        if self.silent.load(Ordering::Relaxed) {
            PER_MILLION
        } else {
            self.drop_per_million.load(Ordering::Relaxed)
        }
    }

    /// Silent: every request (network management included) is dropped, whatever the drop
    /// ratio; the ratio applies again once silence is lifted.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::Relaxed);
    }

    /// Stalls every connection for `stall` from now (clamped to [`ANSWER_DELAY_MAX_US`]): no answer
    /// is written until it ends, then all answers that fell due meanwhile are released together
    /// (one write per connection). Requests keep being read and answered into the pending
    /// buffer meanwhile (up to [`PENDING_BYTES_MAX`]), like a host that pauses, e.g. for a
    /// garbage collection. A later call replaces the end; `Duration::ZERO` ends a stall.
    pub fn stall_for(&self, stall: Duration) {
        let now_us = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let until = now_us.saturating_add(duration_us(stall));
        self.stall_until_us.store(until, Ordering::Relaxed);
    }

    /// The end of the current stall, or `None` when not stalled.
    pub fn stalled_until(&self) -> Option<Instant> {
        let until_us = self.stall_until_us.load(Ordering::Relaxed);
        let until = self.epoch + Duration::from_micros(until_us);
        (until_us > 0 && until > Instant::now()).then_some(until)
    }
}

impl Default for Behavior {
    /// Answers at once, drops nothing.
    fn default() -> Behavior {
        Behavior::new(Duration::ZERO, 0)
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).map_or(ANSWER_DELAY_MAX_US, |us| us.min(ANSWER_DELAY_MAX_US))
}

// === options and statistics ===

/// How the simulator speaks on the wire.
#[derive(Clone, Debug)]
pub struct BankSimOptions {
    /// Message profile of requests and answers.
    pub dialect: Arc<Dialect>,
    /// Length header of each message.
    pub framing: Framing,
    /// Header between the length and the message (a TPDU); answers carry the
    /// request's back (a TPDU with its addresses swapped).
    pub header: MessageHeader,
    /// Largest accepted message (without header), in bytes; a larger frame closes the
    /// connection.
    pub frame_size_max_bytes: usize,
    /// Seed of the drop decisions; connection `n` uses `seed ^ n`.
    pub seed: u64,
    /// MAC, PIN and key-encrypting keys; `None`: MACs are neither checked nor made.
    pub keys: Option<Arc<SimKeys>>,
}

/// Counters since the simulator started; read them with `load(Ordering::Relaxed)`.
#[derive(Debug, Default)]
pub struct BankStats {
    /// Messages decoded (requests, advices, and any responses sent to the bank), but
    /// not network management: 0800s are counted in `echoes`, `sign_ons`, `sign_offs`.
    pub requests: AtomicU64,
    /// Answers queued for writing.
    pub answered: AtomicU64,
    /// Requests left unanswered on purpose ([`Behavior`] drop ratio or silence).
    pub dropped: AtomicU64,
    /// TCP connections accepted (handshake failures included); also the connection number.
    pub connections: AtomicU64,
    /// Echoes (0800 with DE70 301) answered.
    pub echoes: AtomicU64,
    /// Sign-ons (0800 with DE70 001) answered.
    pub sign_ons: AtomicU64,
    /// Sign-offs (0800 with DE70 002) answered.
    pub sign_offs: AtomicU64,
    /// DE11 of the latest request, as a number (0 when absent or not digits).
    pub last_stan: AtomicU32,
    /// Requests and advices whose MAC verified under the current MAC key.
    pub mac_verified: AtomicU64,
    /// Requests and advices whose MAC verified under the MAC key the last key change
    /// replaced (sent before the switch took the new key).
    pub mac_verified_previous: AtomicU64,
    /// Requests and advices whose MAC was missing or did not verify (answered 63).
    pub mac_failures: AtomicU64,
    /// Key changes (0800 DE70 161) taken: answered 00, the new key in use.
    pub key_changes: AtomicU64,
    /// Key changes refused (answered 30): no ZMK, a block that does not unwrap, a
    /// check value that does not match, a key of no usage the bank holds.
    pub key_changes_refused: AtomicU64,
    /// Every message received, when enabled (for tests that audit what a bank saw).
    pub log: MessageLog,
}

/// A bounded record of the messages a simulated bank received, off by default.
#[derive(Debug, Default)]
pub struct MessageLog {
    max: std::sync::atomic::AtomicUsize,
    messages: std::sync::Mutex<Vec<Bytes>>,
}

impl MessageLog {
    /// Starts keeping up to `max` messages (later ones are not kept).
    pub fn enable(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    fn push(&self, message: &Bytes) {
        let max = self.max.load(Ordering::Relaxed);
        if max == 0 {
            return;
        }
        let mut messages = switchyard::sync::lock(&self.messages);
        if messages.len() < max {
            messages.push(message.clone());
        }
    }

    /// The messages kept so far, in arrival order.
    pub fn messages(&self) -> Vec<Bytes> {
        switchyard::sync::lock(&self.messages).clone()
    }
}

/// Why one connection was closed. Affects that connection only.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("TLS handshake did not finish within {HANDSHAKE_TIMEOUT_MS} ms")]
    HandshakeTimeout,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("decoding: {0}")]
    Decode(#[from] DecodeError),
    #[error("stream ended inside a frame ({0} bytes left over)")]
    Truncated(usize),
}

// === keys ===

/// A simulated bank's keys (clear: it is a simulator). See the module docs.
pub struct SimKeys {
    mac: Option<(MacAlgorithm, RwLock<KeyPair>)>,
    pin: Option<RwLock<KeyPair>>,
    zmk: Option<Key>,
    key_block_field: u8,
    kcv_field: u8,
}

/// A working key and the one the last key change replaced.
struct KeyPair {
    current: Arc<Key>,
    previous: Option<Arc<Key>>,
}

impl KeyPair {
    fn new(key: Key) -> RwLock<KeyPair> {
        RwLock::new(KeyPair {
            current: Arc::new(key),
            previous: None,
        })
    }
}

impl std::fmt::Debug for SimKeys {
    /// Check values only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimKeys")
            .field("mac_kcv", &self.mac_kcv())
            .field("pin_kcv", &self.pin_kcv())
            .field("zmk_kcv", &self.zmk.as_ref().map(Key::check_value))
            .field("key_block_field", &self.key_block_field)
            .field("kcv_field", &self.kcv_field)
            .finish()
    }
}

/// What the MAC of a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MacCheck {
    /// No MAC key: not checked.
    Unchecked,
    /// Verified under the current key.
    Current,
    /// Verified under the key the last change replaced.
    Previous,
    /// Missing, or verified under neither.
    Failed,
}

impl SimKeys {
    /// Keys of a bank: a MAC key and its algorithm, a PIN key, a ZMK (each
    /// optional); key changes carry the key block in DE48 and the check value in
    /// DE62, as the switch's defaults.
    pub fn new(mac: Option<(MacAlgorithm, Key)>, pin: Option<Key>, zmk: Option<Key>) -> SimKeys {
        SimKeys {
            mac: mac.map(|(algorithm, key)| (algorithm, KeyPair::new(key))),
            pin: pin.map(KeyPair::new),
            zmk,
            key_block_field: KEY_BLOCK_FIELD_DEFAULT,
            kcv_field: KCV_FIELD_DEFAULT,
        }
    }

    /// Key changes carry the key block in `key_block_field` and the check value in
    /// `kcv_field`.
    pub fn with_fields(mut self, key_block_field: u8, kcv_field: u8) -> SimKeys {
        self.key_block_field = key_block_field;
        self.kcv_field = kcv_field;
        self
    }

    /// The check value of the MAC key in use.
    pub fn mac_kcv(&self) -> Option<[u8; 3]> {
        let (_, pair) = self.mac.as_ref()?;
        Some(read(pair).current.check_value())
    }

    /// The check value of the PIN key in use.
    pub fn pin_kcv(&self) -> Option<[u8; 3]> {
        Some(read(self.pin.as_ref()?).current.check_value())
    }

    /// Checks the MAC of `msg` (decoded from `raw`) as the switch places it: the last
    /// field, DE128 when the message has fields above 64, else DE64, over all bytes
    /// before it.
    fn verify(&self, raw: &[u8], msg: &Message, dialect: &Dialect) -> MacCheck {
        let Some((algorithm, pair)) = &self.mac else {
            return MacCheck::Unchecked;
        };
        let n = if msg.has(128) {
            128
        } else if msg.has(64) {
            64
        } else {
            return MacCheck::Failed;
        };
        let Some(width) = binary_field_len(dialect, n) else {
            return MacCheck::Failed;
        };
        let Some(at) = raw.len().checked_sub(width) else {
            return MacCheck::Failed;
        };
        let (data, value) = raw.split_at(at);
        // The field decoded must be those last bytes: the MAC is the last field.
        if msg.field(n) != Some(value) || (n == 64 && msg.highest_field_except(&[64]) > 64) {
            return MacCheck::Failed;
        }
        let (current, previous) = {
            let p = read(pair);
            (p.current.clone(), p.previous.clone())
        };
        let matches = |key: &Key| {
            let mut mac = [0u8; 16];
            let len = mac_of(*algorithm, key, data, &mut mac);
            len > 0 && value.get(..len.min(width)) == mac.get(..len.min(width))
        };
        if matches(&current) {
            MacCheck::Current
        } else if previous.as_deref().is_some_and(matches) {
            MacCheck::Previous
        } else {
            MacCheck::Failed
        }
    }

    /// The MAC field an answer (with `highest` its highest other field) carries, and
    /// its width; `None` without a MAC key or where the dialect cannot carry one.
    fn mac_slot(&self, dialect: &Dialect, highest: u8) -> Option<(u8, usize)> {
        self.mac.as_ref()?;
        let n = mac_field(highest);
        binary_field_len(dialect, n).map(|w| (n, w))
    }

    /// Writes the MAC of `message[..len - width]` under the current key into its
    /// last `width` bytes.
    fn seal(&self, message: &mut [u8], width: usize) {
        let Some((algorithm, pair)) = &self.mac else {
            return;
        };
        let Some(at) = message.len().checked_sub(width) else {
            return;
        };
        let current = read(pair).current.clone();
        let (data, value) = message.split_at_mut(at);
        let mut mac = [0u8; 16];
        let len = mac_of(*algorithm, &current, data, &mut mac).min(width);
        value[..len].copy_from_slice(&mac[..len]);
    }

    /// Takes the new working key of key change `msg`: unwrapped under the ZMK, its
    /// check value compared with the message's, put in place of the working key of
    /// its usage (a MAC key for `M*`, a PIN key for `P0`) and algorithm.
    fn take_key_change(&self, msg: &Message) -> Result<(), &'static str> {
        let zmk = self.zmk.as_ref().ok_or("no ZMK")?;
        let block = msg.field(self.key_block_field).ok_or("no key block")?;
        let block = std::str::from_utf8(block).map_err(|_| "a key block that is not text")?;
        let (header, key) = tr31::unwrap(zmk, block)
            .map_err(|_| "a key block that does not unwrap under the ZMK")?;
        let given = msg.field(self.kcv_field).ok_or("no check value")?;
        if !given.eq_ignore_ascii_case(&kcv_hex(key.check_value())) {
            return Err("a check value of another key");
        }
        let pair = match header.key_usage.as_str().as_bytes().first() {
            Some(b'M') => self.mac.as_ref().map(|(_, p)| p),
            Some(b'P') => self.pin.as_ref(),
            _ => None,
        }
        .ok_or("a key of no usage this bank holds")?;
        let mut p = pair.write().unwrap_or_else(|e| e.into_inner());
        if p.current.algorithm() != key.algorithm() {
            return Err("a key of another algorithm");
        }
        let old = std::mem::replace(&mut p.current, Arc::new(key));
        p.previous = Some(old);
        Ok(())
    }
}

fn read(pair: &RwLock<KeyPair>) -> std::sync::RwLockReadGuard<'_, KeyPair> {
    // A panic while replacing leaves the pair whole: the lock's poison is moot.
    pair.read().unwrap_or_else(|e| e.into_inner())
}

/// The MAC of `data` under `key` into `out`; its length (0: the key does not fit).
fn mac_of(algorithm: MacAlgorithm, key: &Key, data: &[u8], out: &mut [u8; 16]) -> usize {
    match algorithm {
        MacAlgorithm::Iso9797Alg3 => match mac::retail_mac(key, data) {
            Ok(m) => {
                out[..8].copy_from_slice(&m);
                8
            }
            Err(_) => 0,
        },
        MacAlgorithm::AesCmac => match mac::aes_cmac(key, data) {
            Ok(m) => {
                *out = m;
                16
            }
            Err(_) => 0,
        },
    }
}

// === serve ===

/// Accepts TLS connections until `shutdown` resolves, then closes every connection and
/// returns once their tasks have ended.
///
/// `tls` is built by the caller and should require client certificates
/// ([`switchyard::tls::server_config`]). A failed handshake, frame or message closes only that
/// connection, with a `warn!` naming the error.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    opts: BankSimOptions,
    behavior: Arc<Behavior>,
    stats: Arc<BankStats>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let opts = Arc::new(opts);
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "bank simulator: accept failed");
                tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                continue;
            }
        };
        let number = stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Connection {
            opts: opts.clone(),
            behavior: behavior.clone(),
            stats: stats.clone(),
            number,
        };
        let acceptor = acceptor.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let result = tokio::select! {
                () = cancel.cancelled() => Ok(()),
                result = conn.run(acceptor, tcp) => result,
            };
            if let Err(e) = result {
                tracing::warn!(%peer, connection = number, error = %e,
                    "bank simulator: connection closed");
            }
        });
    }
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

// === one connection ===

struct Connection {
    opts: Arc<BankSimOptions>,
    behavior: Arc<Behavior>,
    stats: Arc<BankStats>,
    number: u64,
}

/// Answers encoded (with frame headers) but not yet written, shared by the reader and the
/// writer of one connection. Both run in the same task, so the lock is never contended.
#[derive(Default)]
struct Pending {
    buf: BytesMut,
    /// (release time, end of its answers in the stream of answers), in release order.
    due: VecDeque<(Instant, u64)>,
    /// Stream offset of `buf[0]`.
    written: u64,
    /// The reader has finished: write what is left, then stop.
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Reader → writer: answers were queued, or the reader finished.
    queued: Notify,
    /// Writer → reader: answers were written, room was made.
    drained: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock is a bug elsewhere; the buffer is still usable.
        switchyard::sync::lock(&self.pending)
    }
}

impl Connection {
    async fn run(self, acceptor: TlsAcceptor, tcp: TcpStream) -> Result<(), ConnectionError> {
        let _ = tcp.set_nodelay(true);
        let handshake = acceptor.accept(tcp);
        let stream = tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), handshake)
            .await
            .map_err(|_| ConnectionError::HandshakeTimeout)??;
        let (reader, writer) = tokio::io::split(stream);
        let shared = Shared {
            pending: Mutex::new(Pending::default()),
            queued: Notify::new(),
            drained: Notify::new(),
        };
        tokio::try_join!(
            self.read_loop(reader, &shared),
            write_loop(writer, &shared, &self.behavior)
        )?;
        Ok(())
    }

    /// Reads batches of frames and queues their answers, released at receipt + latency.
    async fn read_loop(
        &self,
        mut reader: impl AsyncRead + Unpin,
        shared: &Shared,
    ) -> Result<(), ConnectionError> {
        let frames = FrameDecoder::new(self.opts.framing, self.opts.frame_size_max_bytes);
        let mut rng = XorShift64Star::new(self.opts.seed ^ self.number);
        let mut input = BytesMut::with_capacity(READ_CHUNK_BYTES);
        loop {
            // Backpressure: stop reading while too many answers wait to be written.
            while shared.lock().buf.len() >= PENDING_BYTES_MAX {
                shared.drained.notified().await;
            }
            if input.capacity() - input.len() < READ_CHUNK_BYTES / 4 {
                input.reserve(READ_CHUNK_BYTES);
            }
            if reader.read_buf(&mut input).await? == 0 {
                shared.lock().closed = true;
                shared.queued.notify_one();
                return match input.len() {
                    0 => Ok(()),
                    left => Err(ConnectionError::Truncated(left)),
                };
            }
            let due = Instant::now() + self.behavior.latency();
            let mut pending = shared.lock();
            let before = pending.buf.len();
            let result = self.answer_batch(&frames, &mut input, &mut rng, &mut pending.buf);
            let after = pending.buf.len();
            if after > before {
                let end = pending.written + after as u64;
                pending.due.push_back((due, end));
                drop(pending);
                shared.queued.notify_one();
            }
            result?;
        }
    }

    /// Answers every whole frame in `input` into `out` (with frame headers).
    fn answer_batch(
        &self,
        frames: &FrameDecoder,
        input: &mut BytesMut,
        rng: &mut XorShift64Star,
        out: &mut BytesMut,
    ) -> Result<(), ConnectionError> {
        let dialect = &*self.opts.dialect;
        let framing = self.opts.framing;
        while let Some(frame) = frames.decode(input)? {
            let mut frame = frame;
            let Some(echo) = self.opts.header.split(&mut frame) else {
                tracing::warn!(
                    header = self.opts.header.kind(),
                    "bank simulator: message shorter than its header"
                );
                continue;
            };
            // Kept as it arrived on the wire (the message's bytes are its
            // canonical form under a BCD or EBCDIC dialect).
            self.stats.log.push(&frame);
            let raw = frame.clone();
            let request = Message::decode(dialect, frame)?;
            let network = request.mti().as_bytes()[..3] == *b"080";
            if !network {
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
            }
            let stan = request.field(11).map_or(0, |f| {
                f.iter()
                    .try_fold(0u32, |acc, &b| {
                        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
                    })
                    .unwrap_or(0)
            });
            if !network {
                self.stats.last_stan.store(stan, Ordering::Relaxed);
            }
            if !request.mti().is_request() {
                continue;
            }
            let ppm = self.behavior.drop_per_million();
            if ppm > 0 && (ppm >= PER_MILLION || rng.next() % u64::from(PER_MILLION) < ppm.into()) {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let shape = self.shape(&raw[..], &request, network);
            let header = framing.begin(out);
            out.extend_from_slice(echo.as_bytes());
            let start = out.len();
            if answer_as(&request, dialect, &shape, out).is_none() {
                out.truncate(header);
                tracing::warn!(mti = %request.mti(), "bank simulator: cannot encode an answer");
                continue;
            }
            if let (Some(keys), Some((_, width))) = (&self.opts.keys, shape.mac) {
                keys.seal(&mut out[start..], width);
            }
            if let Err(e) = framing.finish(out, header) {
                tracing::warn!(error = %e, "bank simulator: answer too large for its frame");
                continue;
            }
            self.stats.answered.fetch_add(1, Ordering::Relaxed);
            if request.mti().as_bytes()[..3] == *b"080" {
                let counter = match request.field(70) {
                    Some(b"001") => &self.stats.sign_ons,
                    Some(b"002") => &self.stats.sign_offs,
                    Some(KEY_CHANGE) => continue,
                    _ => &self.stats.echoes,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// How the answer to `request` (`raw` as received) differs from the plain rules:
    /// 63 for a MAC that fails, the key change's outcome, the MAC it carries.
    fn shape(&self, raw: &[u8], request: &Message, network: bool) -> Shape {
        let mut shape = Shape::default();
        if network && request.field(70) == Some(KEY_CHANGE) {
            let keys = self.opts.keys.as_deref();
            let taken = keys.map_or(Err("no keys"), |k| k.take_key_change(request));
            shape.code = Some(match taken {
                Ok(()) => {
                    self.stats.key_changes.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(connection = self.number, "bank simulator: key change taken");
                    ResponseCode::Approved.as_bytes()
                }
                Err(why) => {
                    self.stats
                        .key_changes_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        connection = self.number,
                        why,
                        "bank simulator: key change refused"
                    );
                    ResponseCode::FormatError.as_bytes()
                }
            });
            shape.remove = keys.map(|k| k.key_block_field);
            return shape;
        }
        let Some(keys) = self.opts.keys.as_deref().filter(|_| !network) else {
            return shape;
        };
        let dialect = &*self.opts.dialect;
        let counter = match keys.verify(raw, request, dialect) {
            MacCheck::Unchecked => None,
            MacCheck::Current => Some(&self.stats.mac_verified),
            MacCheck::Previous => Some(&self.stats.mac_verified_previous),
            MacCheck::Failed => {
                shape.code = Some(ResponseCode::SecurityViolation.as_bytes());
                Some(&self.stats.mac_failures)
            }
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        shape.mac = keys.mac_slot(dialect, request.highest_field_except(&[64, 128]));
        shape
    }
}

/// Writes answers as they fall due: everything due at once in one write and one flush.
/// While the bank is stalled ([`Behavior::stall_for`]) nothing is written. Ends when the
/// reader has finished and every answer is written.
async fn write_loop(
    mut writer: impl AsyncWrite + Unpin,
    shared: &Shared,
    behavior: &Behavior,
) -> Result<(), ConnectionError> {
    loop {
        // Bounded: a stall lasts at most ANSWER_DELAY_MAX_US; the connection task is cancelled at
        // shutdown. Re-checked every STALL_CHECK_MS so that ending a stall early takes effect.
        if let Some(until) = behavior.stalled_until() {
            let check = Instant::now() + Duration::from_millis(STALL_CHECK_MS);
            tokio::time::sleep_until(until.min(check)).await;
            continue;
        }
        let (ready, wait_until) = {
            let mut pending = shared.lock();
            let now = Instant::now();
            let mut end = None;
            while let Some(&(due, stop)) = pending.due.front() {
                if due > now {
                    break;
                }
                end = Some(stop);
                pending.due.pop_front();
            }
            let next = pending.due.front().map(|&(due, _)| due);
            match end {
                Some(end) => {
                    let len = usize::try_from(end - pending.written).unwrap_or(usize::MAX);
                    let len = len.min(pending.buf.len());
                    pending.written = end;
                    (Some(pending.buf.split_to(len)), None)
                }
                None if next.is_none() && pending.closed => break,
                None => (None, next),
            }
        };
        match (ready, wait_until) {
            (Some(chunk), _) => {
                writer.write_all(&chunk).await?;
                writer.flush().await?;
                shared.drained.notify_one();
            }
            (None, Some(due)) => tokio::time::sleep_until(due).await,
            (None, None) => shared.queued.notified().await,
        }
    }
    writer.shutdown().await?;
    Ok(())
}

// === answers ===

/// Fields never echoed in an answer: PIN block, ICC data, MACs and track data.
const NOT_ECHOED: [u8; 6] = [35, 45, 52, 55, 64, 128];

/// DE70 of a key change.
const KEY_CHANGE: &[u8] = b"161";

/// Zeros where an answer's MAC goes until it is computed (16 bytes at most).
const MAC_PLACEHOLDER: [u8; 16] = [0; 16];

/// How an answer departs from [`answer`]'s rules.
#[derive(Clone, Copy, Debug, Default)]
struct Shape {
    /// DE39, in place of the rules'.
    code: Option<&'static [u8; 2]>,
    /// A field not echoed (a key change's key block).
    remove: Option<u8>,
    /// The MAC field and its width: a placeholder of zeros, filled in once encoded.
    mac: Option<(u8, usize)>,
}

/// The answer the simulator gives to `req`, appended to `out` (without a frame header).
/// Returns the answer's length, or `None` for messages it does not answer (responses) or
/// cannot encode (`out` is then unchanged).
///
/// Rules:
/// * 0100 → 0110 and 0200 → 0210: DE4 ending in `51`, `05` or `61` declines with that code,
///   anything else approves (`00`) with DE38 = a 6-digit code derived from DE11 and DE7.
/// * 0400 → 0410, 0420/0421 → 0430, 0800 → 0810: always `00`.
/// * Any other request or advice → its response MTI with `12` (invalid transaction).
///
/// Every request field is echoed except 35, 45, 52, 55, 64 and 128; DE39 is added, and DE37
/// when absent (hhmmss of DE7, then DE11).
pub fn answer(req: &Message, dialect: &Dialect, out: &mut BytesMut) -> Option<usize> {
    answer_as(req, dialect, &Shape::default(), out)
}

/// [`answer`] as `shape` says.
fn answer_as(req: &Message, dialect: &Dialect, shape: &Shape, out: &mut BytesMut) -> Option<usize> {
    let mti = req.mti();
    let response_mti = mti.response()?;
    let kind = &mti.as_bytes()[..3];
    let authorizes = matches!(kind, b"010" | b"020");
    let code: &[u8; 2] = if let Some(code) = shape.code {
        code
    } else if authorizes {
        decline_code(req.field(4)).unwrap_or(ResponseCode::Approved.as_bytes())
    } else if matches!(kind, b"040" | b"042" | b"080") {
        ResponseCode::Approved.as_bytes()
    } else {
        ResponseCode::InvalidTransaction.as_bytes()
    };
    let rrn = (!req.has(37)).then(|| derived_rrn(req));
    let approval = (authorizes && code == ResponseCode::Approved.as_bytes())
        .then(|| approval_code(req.field(11), req.field(7)));

    // At most 10 changes, kept on the stack, then sorted by field number.
    let mut changes = [Change::Remove(NOT_ECHOED[0]); 10];
    let mut count = 0;
    let mut push = |change| {
        changes[count] = change;
        count += 1;
    };
    push(Change::Remove(35));
    if let Some(rrn) = &rrn {
        push(Change::Set(37, rrn));
    }
    if let Some(approval) = &approval {
        push(Change::Set(38, approval));
    }
    push(Change::Set(39, code));
    for &n in &NOT_ECHOED[1..] {
        match shape.mac {
            Some((field, width)) if field == n => {
                push(Change::Set(
                    n,
                    &MAC_PLACEHOLDER[..width.min(MAC_PLACEHOLDER.len())],
                ));
            }
            _ => push(Change::Remove(n)),
        }
    }
    if let Some(n) = shape
        .remove
        .filter(|n| !NOT_ECHOED.contains(n) && !matches!(n, 37..=39))
    {
        push(Change::Remove(n));
    }
    let changes = &mut changes[..count];
    changes.sort_unstable_by_key(|c| match *c {
        Change::Set(n, _) | Change::Remove(n) => n,
    });
    encode_answer(req, dialect, response_mti, changes, out).ok()
}

fn encode_answer(
    req: &Message,
    dialect: &Dialect,
    mti: Mti,
    changes: &[Change<'_>],
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    reencode(req, dialect, dialect, mti, changes, out)
}

/// The decline code for an amount ending in 51, 05 or 61; `None` approves.
fn decline_code(de4: Option<&[u8]>) -> Option<&'static [u8; 2]> {
    let de4 = de4?;
    let last_two = de4.get(de4.len().checked_sub(2)?..)?;
    match last_two {
        b"51" => Some(b"51"),
        b"05" => Some(b"05"),
        b"61" => Some(b"61"),
        _ => None,
    }
}

/// Six digits from a hash (FNV-1a) of DE11 and DE7: the same request always gets the same
/// code.
fn approval_code(de11: Option<&[u8]>, de7: Option<&[u8]>) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in de11
        .unwrap_or_default()
        .iter()
        .chain(b"|")
        .chain(de7.unwrap_or_default())
    {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let mut code = [b'0'; 6];
    write_digits(hash % 1_000_000, &mut code);
    code
}

/// A 12-digit RRN: the hhmmss part of DE7 then DE11 (zeros where a field is missing or not
/// all digits).
fn derived_rrn(req: &Message) -> [u8; 12] {
    let mut rrn = [b'0'; 12];
    if let Some(de7) = req.field(7).filter(|f| f.len() == 10 && all_digits(f)) {
        rrn[..6].copy_from_slice(&de7[4..]);
    }
    if let Some(de11) = req.field(11).filter(|f| f.len() == 6 && all_digits(f)) {
        rrn[6..].copy_from_slice(de11);
    }
    rrn
}

fn all_digits(field: &[u8]) -> bool {
    field.iter().all(u8::is_ascii_digit)
}

/// Writes `value` as decimal digits right-aligned in `out` (leading zeros; high digits that
/// do not fit are dropped).
fn write_digits(mut value: u64, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

// === drop decisions ===

/// xorshift64*: small, fast and deterministic for a given seed.
struct XorShift64Star(u64);

impl XorShift64Star {
    fn new(seed: u64) -> XorShift64Star {
        // Zero is a fixed point of xorshift; any other start works.
        XorShift64Star(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `switchyard bank-sim`: a simulated bank on `listen` until `shutdown`, with the
/// certificate `<certs_dir>/<name>.pem` (and `.key`) and the CA `<certs_dir>/ca.pem`.
pub async fn serve_from_dir(
    listen: std::net::SocketAddr,
    certs_dir: &std::path::Path,
    name: &str,
    opts: BankSimOptions,
    behavior: Arc<Behavior>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    use switchyard::tls;
    let ca = tls::load_certs(&certs_dir.join("ca.pem"))?;
    let chain = tls::load_certs(&certs_dir.join(format!("{name}.pem")))?;
    let key = tls::load_key(&certs_dir.join(format!("{name}.key")))?;
    let server = tls::server_config(&ca, chain, key)?;
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(%listen, %name, "bank simulator running");
    let stats = Arc::new(BankStats::default());
    serve(listener, server, opts, behavior, stats, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard::wire::Encoder;

    fn request(d: &Dialect, mti: Mti, fields: &[(u8, &[u8])]) -> Message {
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(d, &mut out, mti);
        for (n, v) in fields {
            enc.field(*n, v).unwrap();
        }
        enc.finish();
        Message::decode(d, out.freeze()).unwrap()
    }

    fn answered(d: &Dialect, req: &Message) -> Message {
        let mut out = BytesMut::from(&b"xx"[..]);
        let len = answer(req, d, &mut out).unwrap();
        assert_eq!(len, out.len() - 2, "appends after what is already there");
        Message::decode(d, out.split_off(2).freeze()).unwrap()
    }

    fn financial(amount: &[u8; 12], with_rrn: bool) -> Vec<(u8, &'static [u8])> {
        let amount: &'static [u8] = Box::leak(Box::new(*amount));
        let mut fields: Vec<(u8, &'static [u8])> = vec![
            (2, b"4111111111111111"),
            (3, b"000000"),
            (4, amount),
            (7, b"1231235959"),
            (11, b"000123"),
            (32, b"100001"),
        ];
        if with_rrn {
            fields.push((37, b"RRN000000001"));
        }
        fields.extend_from_slice(&[(49, b"978"), (52, b"\x01\x02\x03\x04\x05\x06\x07\x08")]);
        fields.push((100, b"200001"));
        fields
    }

    #[test]
    fn approves_with_approval_code_and_echoes() {
        let d = Dialect::iso87_ascii();
        let req = request(&d, Mti::FINANCIAL, &financial(b"000000001000", true));
        let resp = answered(&d, &req);
        assert_eq!(resp.mti(), Mti::FINANCIAL_RESPONSE);
        assert_eq!(resp.field(39), Some(&b"00"[..]));
        assert_eq!(resp.field(11), Some(&b"000123"[..]));
        assert_eq!(resp.field(37), Some(&b"RRN000000001"[..]));
        assert_eq!(resp.field(100), Some(&b"200001"[..]));
        assert_eq!(resp.field(2), req.field(2));
        assert!(!resp.has(52), "PIN block never echoed");
        let code = resp.field(38).unwrap();
        assert!(code.len() == 6 && all_digits(code));
        // Deterministic: same DE11 and DE7, same code; another STAN, (almost surely) another.
        assert_eq!(answered(&d, &req).field(38), Some(code));
        assert_eq!(approval_code(Some(b"000123"), Some(b"1231235959")), code);

        let auth = request(&d, Mti::AUTHORIZATION, &financial(b"000000001000", false));
        let resp = answered(&d, &auth);
        assert_eq!(resp.mti(), Mti::AUTHORIZATION_RESPONSE);
        assert_eq!(resp.field(39), Some(&b"00"[..]));
        assert_eq!(
            resp.field(37),
            Some(&b"235959000123"[..]),
            "derived from DE7 + DE11"
        );
        assert!(resp.has(38));
    }

    #[test]
    fn declines_by_amount() {
        let d = Dialect::iso87_ascii();
        for (amount, code) in [
            (b"000000001051", b"51"),
            (b"000000001005", b"05"),
            (b"000000001061", b"61"),
        ] {
            let req = request(&d, Mti::FINANCIAL, &financial(amount, true));
            let resp = answered(&d, &req);
            assert_eq!(resp.field(39), Some(&code[..]));
            assert!(!resp.has(38), "no approval code on a decline");
            assert_eq!(resp.field(4), Some(&amount[..]));
        }
    }

    #[test]
    fn network_management_and_reversals() {
        let d = Dialect::iso87_ascii();
        let echo = request(
            &d,
            Mti::NETWORK,
            &[(7, b"0101000000"), (11, b"000001"), (70, b"301")],
        );
        let resp = answered(&d, &echo);
        assert_eq!(resp.mti(), Mti::NETWORK_RESPONSE);
        assert_eq!(resp.field(39), Some(&b"00"[..]));
        assert_eq!(resp.field(70), Some(&b"301"[..]));
        assert!(!resp.has(38));

        for (mti, expected) in [
            (Mti::REVERSAL_ADVICE, Mti::REVERSAL_ADVICE_RESPONSE),
            (Mti::REVERSAL_ADVICE_REPEAT, Mti::REVERSAL_ADVICE_RESPONSE),
            (Mti::REVERSAL, Mti::REVERSAL_RESPONSE),
        ] {
            // A reversal of a declining amount is still acknowledged.
            let req = request(&d, mti, &financial(b"000000001051", true));
            let resp = answered(&d, &req);
            assert_eq!(resp.mti(), expected);
            assert_eq!(resp.field(39), Some(&b"00"[..]));
            assert!(!resp.has(38));
        }
    }

    #[test]
    fn other_requests_get_12_and_responses_nothing() {
        let d = Dialect::iso87_ascii();
        let req = request(&d, Mti(*b"0600"), &[(11, b"000009")]);
        let resp = answered(&d, &req);
        assert_eq!(resp.mti(), Mti(*b"0610"));
        assert_eq!(resp.field(39), Some(&b"12"[..]));

        let resp_in = request(&d, Mti::FINANCIAL_RESPONSE, &[(11, b"000009"), (39, b"00")]);
        let mut out = BytesMut::new();
        assert_eq!(answer(&resp_in, &d, &mut out), None);
        assert!(out.is_empty());
    }

    /// A bad frame closes that connection only; the other keeps being answered, and
    /// shutdown closes it.
    #[tokio::test]
    async fn a_bad_message_closes_only_its_connection() {
        use crate::certs::DevCa;
        use rustls::pki_types::ServerName;
        use switchyard::tls;
        use tokio_rustls::TlsConnector;

        let ca = DevCa::new("test ca").unwrap();
        let server = ca.issue_server(&["localhost"]).unwrap();
        let client = ca.issue_client("200001").unwrap();
        let anchors = [ca.ca_der()];
        let server_tls =
            tls::server_config(&anchors, server.chain().unwrap(), server.key().unwrap()).unwrap();
        let client_tls =
            tls::client_config(&anchors, client.chain().unwrap(), client.key().unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dialect = Arc::new(Dialect::iso87_ascii());
        let opts = BankSimOptions {
            dialect: dialect.clone(),
            framing: Framing::U16be,
            header: switchyard::wire::MessageHeader::None,
            frame_size_max_bytes: 4096,
            seed: 1,
            keys: None,
        };
        let stats = Arc::new(BankStats::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let bank = tokio::spawn(serve(
            listener,
            server_tls,
            opts,
            Arc::new(Behavior::default()),
            stats.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let connect = || async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            TlsConnector::from(client_tls.clone())
                .connect(name, tcp)
                .await
                .unwrap()
        };
        let mut bad = connect().await;
        let mut good = connect().await;

        bad.write_all(b"\x00\x05AB?DE").await.unwrap();
        bad.flush().await.unwrap();
        let mut rest = Vec::new();
        // The bank closes: EOF, or a reset on some platforms; never an answer.
        let _ = bad.read_to_end(&mut rest).await;
        assert!(rest.is_empty());

        let echo = request(&dialect, Mti::NETWORK, &[(11, b"000001"), (70, b"301")]);
        let mut out = BytesMut::new();
        Framing::U16be.write(&mut out, echo.as_bytes()).unwrap();
        good.write_all(&out).await.unwrap();
        good.flush().await.unwrap();
        let mut input = BytesMut::new();
        let frames = FrameDecoder::new(Framing::U16be, 4096);
        let frame = loop {
            if let Some(frame) = frames.decode(&mut input).unwrap() {
                break frame;
            }
            assert!(good.read_buf(&mut input).await.unwrap() > 0);
        };
        let resp = Message::decode(&dialect, frame).unwrap();
        assert_eq!(resp.mti(), Mti::NETWORK_RESPONSE);
        assert_eq!(resp.field(39), Some(&b"00"[..]));
        assert_eq!(stats.echoes.load(Ordering::Relaxed), 1);
        assert_eq!(stats.connections.load(Ordering::Relaxed), 2);

        stop.send(()).unwrap();
        bank.await.unwrap().unwrap();
        let mut rest = Vec::new();
        let _ = good.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }

    fn tdes(hex: &str) -> Key {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        Key::new(switchyard_security::Algorithm::Tdes, &bytes).unwrap()
    }

    /// A request carrying a MAC under `key` (as `keys` would make it).
    fn sealed(d: &Dialect, keys: &SimKeys, stan: &[u8]) -> (Message, Bytes) {
        let mut fields = financial(b"000000001000", true);
        fields.retain(|(n, _)| *n != 52 && *n != 100);
        fields.retain(|(n, _)| *n != 11);
        fields.push((11, Box::leak(stan.to_vec().into_boxed_slice())));
        fields.sort_by_key(|f| f.0);
        fields.push((64, &[0u8; 8]));
        let unsealed = request(d, Mti::FINANCIAL, &fields);
        let mut raw = unsealed.as_bytes().to_vec();
        keys.seal(&mut raw, 8);
        let raw = Bytes::from(raw);
        (Message::decode(d, raw.clone()).unwrap(), raw)
    }

    #[test]
    fn macs_are_checked_and_key_changes_switch_the_key() {
        use switchyard_security::store::KeyType;
        use switchyard_security::tr31::{Exportability, Header, Version};
        let d = Dialect::iso87_ascii();
        let zmk = "0123456789ABCDEFFEDCBA9876543210";
        let keys = SimKeys::new(
            Some((
                MacAlgorithm::Iso9797Alg3,
                tdes("89ABCDEF0123456776543210FEDCBA98"),
            )),
            None,
            Some(tdes(zmk)),
        );
        let (old_msg, old_raw) = sealed(&d, &keys, b"000001");
        assert_eq!(keys.verify(&old_raw, &old_msg, &d), MacCheck::Current);
        let mut tampered = old_raw.to_vec();
        tampered[20] ^= 1;
        let tampered = Bytes::from(tampered);
        let tampered_msg = Message::decode(&d, tampered.clone()).unwrap();
        assert_eq!(keys.verify(&tampered, &tampered_msg, &d), MacCheck::Failed);

        let new = Key::random(switchyard_security::Algorithm::Tdes, 16).unwrap();
        let header = Header::new(
            Version::B,
            KeyType::Zak.key_usage(switchyard_security::Algorithm::Tdes),
            switchyard_security::Algorithm::Tdes,
            KeyType::Zak.mode_of_use(),
            Exportability::Trusted,
        );
        let block = tr31::wrap(&tdes(zmk), &header, &new).unwrap();
        let kcv = kcv_hex(new.check_value());
        let change = |kcv: &[u8]| {
            request(
                &d,
                Mti::NETWORK,
                &[
                    (7, b"0101000000"),
                    (11, b"000002"),
                    (48, block.as_bytes()),
                    (62, kcv),
                    (70, b"161"),
                ],
            )
        };
        assert!(
            keys.take_key_change(&change(b"000000")).is_err(),
            "another KCV"
        );
        assert_eq!(
            keys.mac_kcv(),
            Some(tdes("89ABCDEF0123456776543210FEDCBA98").check_value())
        );
        keys.take_key_change(&change(&kcv)).unwrap();
        assert_eq!(keys.mac_kcv(), Some(new.check_value()));
        // A request sealed before the change still verifies, under the old key.
        assert_eq!(keys.verify(&old_raw, &old_msg, &d), MacCheck::Previous);
        let (new_msg, new_raw) = sealed(&d, &keys, b"000003");
        assert_eq!(keys.verify(&new_raw, &new_msg, &d), MacCheck::Current);
        // The 0810 echoes the check value, not the key block; it carries no MAC.
        let mut out = BytesMut::new();
        let shape = Shape {
            code: Some(b"00"),
            remove: Some(48),
            mac: None,
        };
        answer_as(&change(&kcv), &d, &shape, &mut out).unwrap();
        let answer = Message::decode(&d, out.freeze()).unwrap();
        assert_eq!(answer.mti(), Mti::NETWORK_RESPONSE);
        assert_eq!(answer.field(39), Some(&b"00"[..]));
        assert_eq!(answer.field(62), Some(&kcv[..]));
        assert!(!answer.has(48) && !answer.has(64));
    }

    #[test]
    fn stalls_start_and_end() {
        let behavior = Behavior::default();
        assert_eq!(behavior.stalled_until(), None);
        behavior.stall_for(Duration::from_secs(3600));
        let until = behavior.stalled_until().unwrap();
        assert!(until > Instant::now() + Duration::from_secs(3000));
        behavior.stall_for(Duration::ZERO);
        assert_eq!(behavior.stalled_until(), None);
    }

    #[test]
    fn drop_decisions_are_deterministic() {
        let mut a = XorShift64Star::new(7);
        let mut b = XorShift64Star::new(7);
        assert!((0..100).all(|_| a.next() == b.next()));
        let mut z = XorShift64Star::new(0);
        assert_ne!(z.next(), 0);
    }
}
