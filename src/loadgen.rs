//! Closed-loop load generator: many mutual-TLS connections, as several institutions, each
//! keeping a window of 0200 requests in flight, with latency percentiles from HdrHistogram.
//!
//! Latency is measured from the moment a request was put in the write buffer (its intended
//! send time), so a slow write or a queue in front of the server is not hidden.
//!
//! Every request sent ends in exactly one outcome: approved, declined, error or timeout. A
//! connection that fails counts one error, plus one per request it had in flight.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::core::ResponseCode;
use crate::money::format_de4;
use crate::tls;
use crate::wire::{
    Dialect, EncodeError, Encoder, FrameDecoder, FrameError, Framing, Message, Mti,
    FRAME_SIZE_MAX_BYTES_DEFAULT,
};

/// How long a TCP connect plus TLS handshake may take, in milliseconds.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Largest window per connection (requests in flight); well below the 999,999 STANs.
pub const WINDOW_MAX: usize = 100_000;
/// Largest number of connections one run opens.
pub const CONNECTIONS_MAX: usize = 10_000;
/// Largest latency the histograms record, in microseconds (60 s); longer ones are clamped.
pub const LATENCY_MAX_US: u64 = 60_000_000;
/// The PAN used when [`LoadOptions::pans`] is empty.
pub const PAN_DEFAULT: &str = "4111111111111111";
/// How long closing a connection (TLS close_notify) may take, in milliseconds.
const CLOSE_TIMEOUT_MS: u64 = 1_000;
/// Coarsest interval between scans for timed-out requests, in milliseconds.
const EXPIRY_TICK_MAX_MS: u64 = 50;
/// Free space kept in the read buffer before each read, in bytes.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Largest STAN (DE11 is n6); STANs run 1..=999,999 and wrap.
const STAN_MAX: u32 = 999_999;
/// RRNs (DE37) are 12 digits.
const RRN_MODULUS: u64 = 1_000_000_000_000;
const TERMINAL_ID: &[u8] = b"TERM0001";
const MERCHANT_ID: &[u8] = b"MERCHANT0000001";
const PROCESSING_CODE_PURCHASE: &[u8] = b"000000";

// === options ===

/// One institution the generator connects as.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Acquiring institution id sent in DE32 (digits); must match the client certificate.
    pub institution: String,
    /// Client configuration presenting that institution's certificate.
    pub tls: Arc<rustls::ClientConfig>,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Address of the switch (or of a bank simulator).
    pub target: SocketAddr,
    /// TLS name of the target, checked against its certificate, e.g. "localhost".
    pub server_name: String,
    /// Connections are spread round-robin over these.
    pub identities: Vec<Identity>,
    /// DE100 values, round-robin per request; empty: no DE100 (the switch routes by PAN).
    pub destinations: Vec<String>,
    /// PANs cycled per request; empty: [`PAN_DEFAULT`].
    pub pans: Vec<String>,
    /// TLS connections to open (1..=[`CONNECTIONS_MAX`]).
    pub connections: usize,
    /// Requests in flight per connection (1..=[`WINDOW_MAX`]).
    pub window: usize,
    /// How long to keep sending.
    pub duration: Duration,
    /// A request unanswered this long counts as a timeout and frees its window slot; also
    /// how long to wait for outstanding answers after `duration`.
    pub answer_timeout: Duration,
    /// Message profile.
    pub dialect: Arc<Dialect>,
    /// Length header of each message.
    pub framing: Framing,
    /// DE49, ISO 4217 numeric, e.g. `*b"978"`.
    pub currency: [u8; 3],
    /// Every Nth request of a connection uses an amount ending in 51 (the bank simulator
    /// declines it); 0 = never.
    pub decline_every: u32,
}

// === summary ===

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// The result of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Requests written.
    pub sent: u64,
    /// Answers with DE39 00.
    pub approved: u64,
    /// Answers with a bank decline (any code that is neither 00 nor a switch code).
    pub declined: u64,
    /// Switch/system codes (12 13 30 58 65 91 92 94 96), unexpected answers, and failed
    /// connections (one each, plus one per request in flight).
    pub errors: u64,
    /// Requests unanswered within `answer_timeout`, and answers with DE39 68.
    pub timeouts: u64,
    /// Matched answers per second of elapsed time.
    pub tps: f64,
    /// Wall time of the run, connecting and draining included, in milliseconds.
    pub elapsed_ms: u64,
    /// Latency of matched answers, from the send time.
    pub latency_us: Latency,
    /// Every DE39 value seen, with its count.
    pub codes: BTreeMap<String, u64>,
}

/// `tps` with one decimal; non-finite values (never expected) as 0.0 so the JSON stays valid.
fn tps_1dp(tps: f64) -> String {
    if tps.is_finite() {
        format!("{tps:.1}")
    } else {
        "0.0".to_owned()
    }
}

impl Summary {
    /// Exactly `{"approved":N,"declined":N,"errors":N,"timeouts":N,"tps":X,
    /// "latency_us":{"p50":N,"p99":N,"p999":N,"max":N}}`, keys in that order, `tps` with one
    /// decimal.
    pub fn demo_json(&self) -> String {
        let l = &self.latency_us;
        format!(
            "{{\"approved\":{},\"declined\":{},\"errors\":{},\"timeouts\":{},\"tps\":{},\
             \"latency_us\":{{\"p50\":{},\"p99\":{},\"p999\":{},\"max\":{}}}}}",
            self.approved,
            self.declined,
            self.errors,
            self.timeouts,
            tps_1dp(self.tps),
            l.p50,
            l.p99,
            l.p999,
            l.max
        )
    }

    /// The whole summary as one JSON object: sent, approved, declined, errors, timeouts,
    /// tps (one decimal), elapsed_ms, latency_us {p50, p90, p99, p999, max}, codes.
    pub fn full_json(&self) -> String {
        let l = &self.latency_us;
        let mut out = format!(
            "{{\"sent\":{},\"approved\":{},\"declined\":{},\"errors\":{},\"timeouts\":{},\
             \"tps\":{},\"elapsed_ms\":{},\"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\
             \"p999\":{},\"max\":{}}},\"codes\":",
            self.sent,
            self.approved,
            self.declined,
            self.errors,
            self.timeouts,
            tps_1dp(self.tps),
            self.elapsed_ms,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
        );
        // A map of strings to integers always serialises.
        out.push_str(&serde_json::to_string(&self.codes).unwrap_or_else(|_| "{}".to_owned()));
        out.push('}');
        out
    }

    /// A human-readable summary, one figure per line.
    pub fn render(&self) -> String {
        let l = &self.latency_us;
        let mut out = String::new();
        let secs = self.elapsed_ms as f64 / 1000.0;
        let _ = writeln!(out, "sent        {}", self.sent);
        let _ = writeln!(out, "approved    {}", self.approved);
        let _ = writeln!(out, "declined    {}", self.declined);
        let _ = writeln!(out, "errors      {}", self.errors);
        let _ = writeln!(out, "timeouts    {}", self.timeouts);
        let _ = writeln!(
            out,
            "throughput  {} tps over {secs:.2} s",
            tps_1dp(self.tps)
        );
        let _ = writeln!(
            out,
            "latency us  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        let codes: Vec<String> = self.codes.iter().map(|(c, n)| format!("{c}={n}")).collect();
        let _ = writeln!(out, "codes       {}", codes.join(" "));
        out
    }
}

// === run ===

/// Why one connection failed. It counts as one error plus its requests in flight.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("connect and TLS handshake did not finish in time")]
    ConnectTimeout,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("cannot encode a request: {0}")]
    Encode(#[from] EncodeError),
    #[error("the peer closed the connection")]
    Closed,
    #[error("a write did not complete before the run ended")]
    WriteStalled,
}

/// What every connection of a run shares.
struct Plan {
    opts: LoadOptions,
    server_name: ServerName<'static>,
    pans: Vec<String>,
    /// Stop sending at this instant.
    send_until: Instant,
    /// Stop waiting for answers at this instant.
    drain_until: Instant,
    /// How often to scan for timed-out requests.
    expiry_tick: Duration,
    histogram: Histogram<u64>,
}

/// Runs the load described by `opts` and summarises it. Connections that fail are counted
/// as errors; only invalid options are an `Err`.
pub async fn run(opts: LoadOptions) -> anyhow::Result<Summary> {
    let pans = if opts.pans.is_empty() {
        vec![PAN_DEFAULT.to_owned()]
    } else {
        opts.pans.clone()
    };
    check_options(&opts, &pans)?;
    let server_name = ServerName::try_from(opts.server_name.clone())
        .with_context(|| format!("invalid TLS server name {:?}", opts.server_name))?;
    let histogram = Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
        .context("cannot create the latency histogram")?;
    let start = Instant::now();
    let send_until = start + opts.duration;
    let tick_ms = u64::try_from(opts.answer_timeout.as_millis() / 4).unwrap_or(u64::MAX);
    let plan = Arc::new(Plan {
        expiry_tick: Duration::from_millis(tick_ms.clamp(1, EXPIRY_TICK_MAX_MS)),
        drain_until: send_until + opts.answer_timeout,
        send_until,
        server_name,
        pans,
        histogram,
        opts,
    });
    let mut tasks = JoinSet::new();
    for index in 0..plan.opts.connections {
        tasks.spawn(connection(plan.clone(), index));
    }
    let mut total = Tally::new(&plan.histogram);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(tally) => total.merge(&tally),
            Err(e) => {
                tracing::warn!(error = %e, "load generator: connection task failed");
                total.errors += 1;
            }
        }
    }
    Ok(total.summary(start.elapsed()))
}

fn check_options(opts: &LoadOptions, pans: &[String]) -> anyhow::Result<()> {
    if opts.identities.is_empty() {
        bail!("no identities to connect as");
    }
    if !(1..=CONNECTIONS_MAX).contains(&opts.connections) {
        bail!(
            "connections must be 1..={CONNECTIONS_MAX}, not {}",
            opts.connections
        );
    }
    if !(1..=WINDOW_MAX).contains(&opts.window) {
        bail!("window must be 1..={WINDOW_MAX}, not {}", opts.window);
    }
    // Encode one request with each value so a bad one is reported before any connection.
    let first_destination = opts.destinations.first().map(String::as_bytes);
    let sample = |pan: &[u8], institution: &[u8], destination: Option<&[u8]>| {
        let values = RequestValues {
            pan,
            institution,
            destination,
            currency: &opts.currency,
            stan: 1,
            rrn: 1,
            amount_minor: 1000,
        };
        values.encode(
            &opts.dialect,
            opts.framing,
            &WireClock::now(),
            &mut BytesMut::new(),
        )
    };
    let institution = opts.identities[0].institution.as_bytes();
    for (i, pan) in pans.iter().enumerate() {
        sample(pan.as_bytes(), institution, first_destination)
            .with_context(|| format!("PAN #{} cannot be sent", i + 1))?;
    }
    for identity in &opts.identities {
        sample(pans[0].as_bytes(), identity.institution.as_bytes(), None)
            .with_context(|| format!("institution {:?} cannot be sent", identity.institution))?;
    }
    for destination in &opts.destinations {
        sample(
            pans[0].as_bytes(),
            institution,
            Some(destination.as_bytes()),
        )
        .with_context(|| format!("destination {destination:?} cannot be sent"))?;
    }
    Ok(())
}

/// Loads `<dir>/ca.pem` (trusted server CA) and `<dir>/<id>.pem` + `<dir>/<id>.key` for
/// each institution id.
pub fn identities_from_dir(dir: &Path, institutions: &[String]) -> anyhow::Result<Vec<Identity>> {
    let ca = tls::load_certs(&dir.join("ca.pem"))?;
    institutions
        .iter()
        .map(|id| {
            let chain = tls::load_certs(&dir.join(format!("{id}.pem")))?;
            let key = tls::load_key(&dir.join(format!("{id}.key")))?;
            let config = tls::client_config(&ca, chain, key)
                .with_context(|| format!("client configuration for institution {id}"))?;
            Ok(Identity {
                institution: id.clone(),
                tls: config,
            })
        })
        .collect()
}

// === tallies ===

/// Counts and latencies of one connection, merged at the end.
struct Tally {
    sent: u64,
    answered: u64,
    approved: u64,
    declined: u64,
    errors: u64,
    timeouts: u64,
    /// DE39 values seen; few distinct ones, so a small vector beats a map.
    codes: Vec<([u8; 2], u64)>,
    latency: Histogram<u64>,
}

impl Tally {
    fn new(template: &Histogram<u64>) -> Tally {
        Tally {
            sent: 0,
            answered: 0,
            approved: 0,
            declined: 0,
            errors: 0,
            timeouts: 0,
            codes: Vec::new(),
            latency: Histogram::new_from(template),
        }
    }

    fn count_code(&mut self, code: [u8; 2], n: u64) {
        match self.codes.iter_mut().find(|(c, _)| *c == code) {
            Some((_, count)) => *count += n,
            None => self.codes.push((code, n)),
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.approved += other.approved;
        self.declined += other.declined;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        for &(code, n) in &other.codes {
            self.count_code(code, n);
        }
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
    }

    fn summary(&self, elapsed: Duration) -> Summary {
        let secs = elapsed.as_secs_f64();
        let h = &self.latency;
        let latency_us = if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                p50: h.value_at_quantile(0.5),
                p90: h.value_at_quantile(0.9),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
            }
        };
        Summary {
            sent: self.sent,
            approved: self.approved,
            declined: self.declined,
            errors: self.errors,
            timeouts: self.timeouts,
            tps: if secs > 0.0 {
                self.answered as f64 / secs
            } else {
                0.0
            },
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            latency_us,
            codes: self
                .codes
                .iter()
                .map(|(c, n)| (String::from_utf8_lossy(c).into_owned(), *n))
                .collect(),
        }
    }
}

/// How an answer's DE39 is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Approved,
    Declined,
    Error,
    Timeout,
}

fn classify(de39: &[u8]) -> Outcome {
    match ResponseCode::from_de39(de39) {
        Some(ResponseCode::Approved) => Outcome::Approved,
        Some(ResponseCode::LateResponse) => Outcome::Timeout,
        Some(_) => Outcome::Error,
        None => Outcome::Declined,
    }
}

// === one connection ===

async fn connection(plan: Arc<Plan>, index: usize) -> Tally {
    let mut tally = Tally::new(&plan.histogram);
    let stream = match connect(&plan, index).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(connection = index, error = %e, "load generator: cannot connect");
            tally.errors += 1;
            return tally;
        }
    };
    let (reader, writer) = tokio::io::split(stream);
    let shared = Shared {
        state: Mutex::new(ConnState::new(&plan, index, tally)),
        freed: Notify::new(),
    };
    let result = tokio::select! {
        read = read_loop(reader, &shared, &plan) => read,
        write = write_loop(writer, &shared, &plan) => write,
    };
    let mut state = shared.lock();
    if let Err(e) = result {
        tracing::warn!(connection = index, error = %e, "load generator: connection failed");
        let in_flight = state.abandon();
        state.tally.errors += 1 + in_flight;
    }
    std::mem::replace(&mut state.tally, Tally::new(&plan.histogram))
}

async fn connect(plan: &Plan, index: usize) -> Result<TlsStream<TcpStream>, ConnectionError> {
    let identity = &plan.opts.identities[index % plan.opts.identities.len()];
    let connector = TlsConnector::from(identity.tls.clone());
    let limit = (Instant::now() + Duration::from_millis(CONNECT_TIMEOUT_MS)).min(plan.drain_until);
    let attempt = async {
        let tcp = TcpStream::connect(plan.opts.target).await?;
        let _ = tcp.set_nodelay(true);
        connector.connect(plan.server_name.clone(), tcp).await
    };
    Ok(tokio::time::timeout_at(limit, attempt)
        .await
        .map_err(|_| ConnectionError::ConnectTimeout)??)
}

#[derive(Clone, Copy)]
enum SlotState {
    Free,
    InFlight {
        sent: Instant,
        rrn: u64,
    },
    /// Counted as a timeout; a late answer to it is ignored until the slot is reused.
    TimedOut,
}

#[derive(Clone, Copy)]
struct Slot {
    stan: u32,
    state: SlotState,
}

/// Requests in flight on one connection, indexed by STAN modulo a power of two at least
/// twice the window, plus the tally.
struct ConnState {
    slots: Vec<Slot>,
    in_flight: usize,
    next_stan: u32,
    /// Requests sent on this connection so far.
    seq: u64,
    index: u64,
    connections: u64,
    tally: Tally,
    /// Whether an undecodable answer was already logged (once per connection is enough).
    warned_decode: bool,
}

struct Shared {
    state: Mutex<ConnState>,
    /// Reader → writer: window slots were freed.
    freed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // Reader and writer run in one task, so the lock is never contended; a poisoned lock
        // means a bug elsewhere, and the counts are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ConnState {
    fn new(plan: &Plan, index: usize, tally: Tally) -> ConnState {
        let capacity = (plan.opts.window * 2).next_power_of_two();
        // Spread connections over the STAN space so that two connections of one institution
        // do not send the same STAN in the same second.
        let spacing = STAN_MAX as usize / plan.opts.connections;
        let first = 1 + (index * spacing) % STAN_MAX as usize;
        ConnState {
            slots: vec![
                Slot {
                    stan: 0,
                    state: SlotState::Free
                };
                capacity
            ],
            in_flight: 0,
            next_stan: u32::try_from(first).unwrap_or(1),
            seq: 0,
            index: index as u64,
            connections: plan.opts.connections as u64,
            tally,
            warned_decode: false,
        }
    }

    fn slot_index(&self, stan: u32) -> usize {
        stan as usize & (self.slots.len() - 1)
    }

    /// The next STAN whose slot is not in flight. At most `window` slots are in flight and
    /// there are at least twice as many, so this ends within `window + 1` steps.
    fn allocate_stan(&mut self) -> u32 {
        loop {
            let stan = self.next_stan;
            self.next_stan = if stan >= STAN_MAX { 1 } else { stan + 1 };
            let slot = &self.slots[self.slot_index(stan)];
            if !matches!(slot.state, SlotState::InFlight { .. }) {
                return stan;
            }
        }
    }

    /// Encodes requests until the window is full, all stamped `now`.
    fn fill(
        &mut self,
        plan: &Plan,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<(), ConnectionError> {
        let free = plan.opts.window.saturating_sub(self.in_flight);
        if free == 0 {
            return Ok(());
        }
        let opts = &plan.opts;
        let clock = WireClock::now();
        let identity = &opts.identities[self.index as usize % opts.identities.len()];
        for _ in 0..free {
            let stan = self.allocate_stan();
            let seq = self.seq;
            let rotation = (seq + self.index) as usize;
            let rrn = (seq * self.connections + self.index) % RRN_MODULUS;
            let values = RequestValues {
                pan: plan.pans[rotation % plan.pans.len()].as_bytes(),
                institution: identity.institution.as_bytes(),
                destination: (!opts.destinations.is_empty())
                    .then(|| opts.destinations[rotation % opts.destinations.len()].as_bytes()),
                currency: &opts.currency,
                stan,
                rrn,
                amount_minor: amount_minor(seq, opts.decline_every),
            };
            values.encode(&opts.dialect, opts.framing, &clock, out)?;
            let at = self.slot_index(stan);
            self.slots[at] = Slot {
                stan,
                state: SlotState::InFlight { sent: now, rrn },
            };
            self.seq += 1;
            self.in_flight += 1;
            self.tally.sent += 1;
        }
        Ok(())
    }

    /// Counts requests sent `timeout` or longer before `now` as timeouts, freeing their slots.
    fn expire(&mut self, now: Instant, timeout: Duration) {
        if self.in_flight == 0 {
            return;
        }
        for slot in &mut self.slots {
            if let SlotState::InFlight { sent, .. } = slot.state {
                if now.saturating_duration_since(sent) >= timeout {
                    slot.state = SlotState::TimedOut;
                    self.in_flight -= 1;
                    self.tally.timeouts += 1;
                }
            }
        }
    }

    /// Forgets every request in flight (the connection failed); returns how many there were.
    fn abandon(&mut self) -> u64 {
        for slot in &mut self.slots {
            if matches!(slot.state, SlotState::InFlight { .. }) {
                slot.state = SlotState::Free;
            }
        }
        std::mem::take(&mut self.in_flight) as u64
    }

    /// Matches one answer with its request by STAN (and RRN) and counts it.
    fn on_answer(&mut self, answer: &Message, now: Instant) {
        let de39 = answer.field(39).and_then(|c| <[u8; 2]>::try_from(c).ok());
        if let Some(code) = de39 {
            self.tally.count_code(code, 1);
        }
        let Some(stan) = answer.field(11).and_then(parse_stan) else {
            self.tally.errors += 1;
            return;
        };
        let at = self.slot_index(stan);
        let slot = self.slots[at];
        if slot.stan != stan {
            self.tally.errors += 1;
            return;
        }
        let (sent, rrn) = match slot.state {
            SlotState::InFlight { sent, rrn } => (sent, rrn),
            // Already counted as a timeout: one outcome per request.
            SlotState::TimedOut => {
                self.slots[at].state = SlotState::Free;
                return;
            }
            SlotState::Free => {
                self.tally.errors += 1;
                return;
            }
        };
        let mut expected_rrn = [0u8; 12];
        write_digits(rrn, &mut expected_rrn);
        if answer.mti() != Mti::FINANCIAL_RESPONSE || answer.field(37) != Some(&expected_rrn[..]) {
            // Not the answer to this request; the request stays in flight.
            self.tally.errors += 1;
            return;
        }
        self.slots[at].state = SlotState::Free;
        self.in_flight -= 1;
        self.tally.answered += 1;
        let micros = u64::try_from(now.saturating_duration_since(sent).as_micros());
        let micros = micros.unwrap_or(LATENCY_MAX_US).clamp(1, LATENCY_MAX_US);
        self.tally.latency.saturating_record(micros);
        match de39.map(|c| classify(&c)) {
            Some(Outcome::Approved) => self.tally.approved += 1,
            Some(Outcome::Declined) => self.tally.declined += 1,
            Some(Outcome::Timeout) => self.tally.timeouts += 1,
            Some(Outcome::Error) | None => self.tally.errors += 1,
        }
    }
}

/// Keeps the window full until `send_until`, then waits for outstanding answers until
/// `drain_until` (those left count as timeouts) and closes the connection.
async fn write_loop(
    mut writer: impl AsyncWrite + Unpin,
    shared: &Shared,
    plan: &Plan,
) -> Result<(), ConnectionError> {
    let timeout = plan.opts.answer_timeout;
    let mut out = BytesMut::with_capacity(plan.opts.window.min(1024) * 256);
    let mut next_scan = Instant::now();
    loop {
        let now = Instant::now();
        if now >= plan.send_until {
            break;
        }
        {
            let mut state = shared.lock();
            if now >= next_scan {
                state.expire(now, timeout);
                next_scan = now + plan.expiry_tick;
            }
            state.fill(plan, now, &mut out)?;
        }
        if !out.is_empty() {
            let burst = async {
                writer.write_all(&out).await?;
                writer.flush().await
            };
            tokio::time::timeout_at(plan.drain_until, burst)
                .await
                .map_err(|_| ConnectionError::WriteStalled)??;
            out.clear();
            continue;
        }
        tokio::select! {
            () = shared.freed.notified() => {}
            () = tokio::time::sleep_until(next_scan.min(plan.send_until)) => {}
        }
    }
    loop {
        let now = Instant::now();
        {
            let mut state = shared.lock();
            state.expire(now, timeout);
            if state.in_flight == 0 {
                break;
            }
            if now >= plan.drain_until {
                let left = state.abandon();
                state.tally.timeouts += left;
                break;
            }
        }
        next_scan = now + plan.expiry_tick;
        tokio::select! {
            () = shared.freed.notified() => {}
            () = tokio::time::sleep_until(next_scan.min(plan.drain_until)) => {}
        }
    }
    let close = Duration::from_millis(CLOSE_TIMEOUT_MS);
    let _ = tokio::time::timeout(close, writer.shutdown()).await;
    Ok(())
}

/// Reads answers and counts them, one lock and one wake-up of the writer per read.
/// Returns only on error: the peer closing the connection is one.
async fn read_loop(
    mut reader: impl AsyncRead + Unpin,
    shared: &Shared,
    plan: &Plan,
) -> Result<(), ConnectionError> {
    let max = FRAME_SIZE_MAX_BYTES_DEFAULT.max(plan.opts.dialect.message_size_max_bytes());
    let frames = FrameDecoder::new(plan.opts.framing, max);
    let mut input = BytesMut::with_capacity(READ_CHUNK_BYTES);
    loop {
        if input.capacity() - input.len() < READ_CHUNK_BYTES / 4 {
            input.reserve(READ_CHUNK_BYTES);
        }
        if reader.read_buf(&mut input).await? == 0 {
            return Err(ConnectionError::Closed);
        }
        let now = Instant::now();
        let mut state = shared.lock();
        while let Some(frame) = frames.decode(&mut input)? {
            match Message::decode(&plan.opts.dialect, frame) {
                Ok(answer) => state.on_answer(&answer, now),
                Err(e) => {
                    state.tally.errors += 1;
                    if !state.warned_decode {
                        state.warned_decode = true;
                        tracing::warn!(error = %e, "load generator: undecodable answer");
                    }
                }
            }
        }
        drop(state);
        shared.freed.notify_one();
    }
}

// === requests ===

/// The values of one 0200.
struct RequestValues<'a> {
    pan: &'a [u8],
    institution: &'a [u8],
    destination: Option<&'a [u8]>,
    currency: &'a [u8; 3],
    stan: u32,
    rrn: u64,
    amount_minor: i64,
}

impl RequestValues<'_> {
    /// Appends the framed request to `out`; on error `out` is left as it was.
    fn encode(
        &self,
        dialect: &Dialect,
        framing: Framing,
        clock: &WireClock,
        out: &mut BytesMut,
    ) -> Result<(), ConnectionError> {
        let at = framing.begin(out);
        let result = self.encode_message(dialect, clock, out);
        let result = result
            .map_err(ConnectionError::from)
            .and_then(|()| Ok(framing.finish(out, at)?));
        if result.is_err() {
            out.truncate(at);
        }
        result
    }

    fn encode_message(
        &self,
        dialect: &Dialect,
        clock: &WireClock,
        out: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        let mut amount = [0u8; 12];
        format_de4(self.amount_minor, &mut amount);
        let mut stan = [0u8; 6];
        write_digits(u64::from(self.stan), &mut stan);
        let mut rrn = [0u8; 12];
        write_digits(self.rrn, &mut rrn);
        let mut enc = Encoder::new(dialect, out, Mti::FINANCIAL);
        enc.field(2, self.pan)?;
        enc.field(3, PROCESSING_CODE_PURCHASE)?;
        enc.field(4, &amount)?;
        enc.field(7, &clock.de7)?;
        enc.field(11, &stan)?;
        enc.field(12, &clock.de7[4..])?;
        enc.field(13, &clock.de7[..4])?;
        enc.field(32, self.institution)?;
        enc.field(37, &rrn)?;
        enc.field(41, TERMINAL_ID)?;
        enc.field(42, MERCHANT_ID)?;
        enc.field(49, self.currency)?;
        if let Some(destination) = self.destination {
            enc.field(100, destination)?;
        }
        enc.finish();
        Ok(())
    }
}

/// Amount of request `seq` in minor units: 1000 + seq % 9000, never ending in 51, 05 or 61
/// (the bank simulator's declines) except every `decline_every`th request, which ends in 51.
fn amount_minor(seq: u64, decline_every: u32) -> i64 {
    let base = 1000 + (seq % 9000) as i64;
    if decline_every > 0 && (seq + 1) % u64::from(decline_every) == 0 {
        return base - base % 100 + 51;
    }
    match base % 100 {
        51 | 5 | 61 => base + 1,
        _ => base,
    }
}

fn parse_stan(field: &[u8]) -> Option<u32> {
    if field.is_empty() || field.len() > 6 {
        return None;
    }
    field.iter().try_fold(0u32, |v, &b| {
        b.is_ascii_digit().then(|| v * 10 + u32::from(b - b'0'))
    })
}

/// Writes `value` as decimal digits right-aligned in `out` (leading zeros).
fn write_digits(mut value: u64, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// DE7 (MMDDhhmmss, UTC) from the system clock; DE12 is its hhmmss, DE13 its MMDD.
struct WireClock {
    de7: [u8; 10],
}

impl WireClock {
    fn now() -> WireClock {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        WireClock::at_unix(secs)
    }

    fn at_unix(secs: u64) -> WireClock {
        let (month, day) = crate::core::datetime::month_day(secs / 86_400);
        let second_of_day = secs % 86_400;
        let mut de7 = [0u8; 10];
        write_digits(month, &mut de7[0..2]);
        write_digits(day, &mut de7[2..4]);
        write_digits(second_of_day / 3600, &mut de7[4..6]);
        write_digits(second_of_day / 60 % 60, &mut de7[6..8]);
        write_digits(second_of_day % 60, &mut de7[8..10]);
        WireClock { de7 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::banksim::{self, BankSimOptions, BankStats, Behavior};
    use crate::certs::DevCa;
    use std::sync::atomic::Ordering;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    const INSTITUTION: &str = "100001";

    struct Bank {
        addr: SocketAddr,
        stats: Arc<BankStats>,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Bank {
        async fn stop(self) {
            let _ = self.stop.send(());
            self.task.await.unwrap().unwrap();
        }
    }

    /// A bank simulator over mutual TLS on 127.0.0.1:0, and an identity trusted by it.
    async fn bank(behavior: Arc<Behavior>) -> (Bank, Identity) {
        let ca = DevCa::new("test ca").unwrap();
        let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        let client = ca.issue_client(INSTITUTION).unwrap();
        let tls_server = tls::server_config(
            &[ca.ca_der()],
            server.chain().unwrap(),
            server.key().unwrap(),
        )
        .unwrap();
        let tls_client = tls::client_config(
            &[ca.ca_der()],
            client.chain().unwrap(),
            client.key().unwrap(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(BankStats::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let opts = BankSimOptions {
            dialect: Arc::new(Dialect::iso87_ascii()),
            framing: Framing::U16be,
            frame_size_max_bytes: FRAME_SIZE_MAX_BYTES_DEFAULT,
            seed: 42,
        };
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(banksim::serve(
            listener,
            tls_server,
            opts,
            behavior,
            stats.clone(),
            shutdown,
        ));
        let identity = Identity {
            institution: INSTITUTION.to_owned(),
            tls: tls_client,
        };
        (
            Bank {
                addr,
                stats,
                stop,
                task,
            },
            identity,
        )
    }

    fn options(target: SocketAddr, identity: Identity) -> LoadOptions {
        LoadOptions {
            target,
            server_name: "localhost".to_owned(),
            identities: vec![identity],
            destinations: vec!["200001".to_owned()],
            pans: vec![],
            connections: 2,
            window: 8,
            duration: Duration::from_millis(1000),
            answer_timeout: Duration::from_secs(5),
            dialect: Arc::new(Dialect::iso87_ascii()),
            framing: Framing::U16be,
            currency: *b"978",
            decline_every: 10,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_against_the_bank_simulator() {
        let (bank, identity) = bank(Arc::new(Behavior::default())).await;
        let summary = run(options(bank.addr, identity)).await.unwrap();
        println!("{}\n{}", summary.render(), summary.full_json());
        assert!(summary.approved > 0, "{}", summary.render());
        assert!(summary.declined > 0, "{}", summary.render());
        assert_eq!(summary.errors, 0, "{}", summary.render());
        assert_eq!(summary.timeouts, 0, "{}", summary.render());
        assert_eq!(summary.sent, summary.approved + summary.declined);
        assert_eq!(summary.codes.get("51").copied(), Some(summary.declined));
        assert_eq!(summary.codes.get("00").copied(), Some(summary.approved));
        // Every 10th request of each connection declines.
        assert!(summary.declined * 10 <= summary.sent + 20);
        assert!(summary.latency_us.max >= summary.latency_us.p50);
        assert_eq!(bank.stats.connections.load(Ordering::Relaxed), 2);
        assert_eq!(bank.stats.answered.load(Ordering::Relaxed), summary.sent);
        bank.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_bank_gives_timeouts() {
        let (bank, identity) = bank(Arc::new(Behavior::new(Duration::ZERO, 1_000_000))).await;
        let mut opts = options(bank.addr, identity);
        opts.duration = Duration::from_millis(300);
        opts.answer_timeout = Duration::from_millis(200);
        let summary = run(opts).await.unwrap();
        assert!(summary.timeouts > 0, "{}", summary.render());
        assert_eq!(summary.timeouts, summary.sent, "{}", summary.render());
        assert_eq!(summary.approved + summary.declined + summary.errors, 0);
        assert_eq!(bank.stats.dropped.load(Ordering::Relaxed), summary.sent);
        bank.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_is_measured_from_the_send_time() {
        let behavior = Arc::new(Behavior::new(Duration::from_millis(20), 0));
        let (bank, identity) = bank(behavior).await;
        let mut opts = options(bank.addr, identity);
        opts.duration = Duration::from_millis(300);
        opts.connections = 1;
        let summary = run(opts).await.unwrap();
        assert!(summary.approved > 0, "{}", summary.render());
        assert_eq!(summary.errors + summary.timeouts, 0, "{}", summary.render());
        // A lower bound only: the bank holds every answer at least 20 ms.
        assert!(summary.latency_us.p50 >= 20_000, "{}", summary.render());
        bank.stop().await;
    }

    #[tokio::test]
    async fn a_refused_connection_is_one_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let ca = DevCa::new("test ca").unwrap();
        let client = ca.issue_client(INSTITUTION).unwrap();
        let tls_client = tls::client_config(
            &[ca.ca_der()],
            client.chain().unwrap(),
            client.key().unwrap(),
        )
        .unwrap();
        let identity = Identity {
            institution: INSTITUTION.to_owned(),
            tls: tls_client,
        };
        let mut opts = options(addr, identity);
        opts.duration = Duration::from_millis(50);
        let summary = run(opts).await.unwrap();
        assert_eq!(summary.errors, 2);
        assert_eq!(summary.sent, 0);
    }

    #[test]
    fn demo_json_shape() {
        let summary = Summary {
            sent: 10,
            approved: 7,
            declined: 1,
            errors: 1,
            timeouts: 1,
            tps: 1234.56,
            elapsed_ms: 1000,
            latency_us: Latency {
                p50: 100,
                p90: 150,
                p99: 200,
                p999: 300,
                max: 400,
            },
            codes: BTreeMap::from([("00".to_owned(), 7), ("51".to_owned(), 1)]),
        };
        let json = summary.demo_json();
        assert_eq!(
            json,
            concat!(
                r#"{"approved":7,"declined":1,"errors":1,"timeouts":1,"tps":1234.6,"#,
                r#""latency_us":{"p50":100,"p99":200,"p999":300,"max":400}}"#
            )
        );
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["latency_us"]["p999"], 300);

        let full: serde_json::Value = serde_json::from_str(&summary.full_json()).unwrap();
        assert_eq!(full["sent"], 10);
        assert_eq!(full["latency_us"]["p90"], 150);
        assert_eq!(full["codes"]["51"], 1);
        assert!(summary.render().contains("approved    7"));
    }

    #[test]
    fn amounts_decline_only_when_asked() {
        let ends = |a: i64| a % 100;
        for seq in 0..20_000 {
            let a = amount_minor(seq, 0);
            assert!(!matches!(ends(a), 51 | 5 | 61), "{a}");
            assert!((1000..=10_000).contains(&a));
        }
        let declines = (0..100)
            .filter(|&s| ends(amount_minor(s, 10)) == 51)
            .count();
        assert_eq!(declines, 10);
    }

    #[test]
    fn wire_clock_and_stans() {
        // 2024-02-29 23:59:58 UTC.
        assert_eq!(&WireClock::at_unix(1_709_251_198).de7, b"0229235958");
        assert_eq!(&WireClock::at_unix(0).de7, b"0101000000");
        assert_eq!(parse_stan(b"000123"), Some(123));
        assert_eq!(parse_stan(b"12a456"), None);
        assert_eq!(classify(b"00"), Outcome::Approved);
        assert_eq!(classify(b"51"), Outcome::Declined);
        assert_eq!(classify(b"68"), Outcome::Timeout);
        assert_eq!(classify(b"91"), Outcome::Error);
    }
}
