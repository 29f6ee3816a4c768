//! Load generator: many mutual-TLS connections, as several institutions, sending 0200
//! requests and measuring throughput and latency with HdrHistogram.
//!
//! Two ways to drive load:
//!
//! * **Closed loop** (no rate): each connection keeps a window of requests in flight and sends
//!   a new one as soon as an answer frees a slot. Latency runs from the moment a request was
//!   put in the write buffer. A slow server slows the generator down, so this measures
//!   capacity, not the latency a client at a given rate would see.
//! * **Open loop** (`rate`): request `i` of connection `c` (of `n`) is due at
//!   `t0 + (i·n + c) / rate` ([`intended_offset`]): each connection sends every `n / rate`
//!   seconds, the connections staggered by `1 / rate`. Latency and the answer timeout run from
//!   that *intended* send time, so a server that stalls cannot hide the queue it causes
//!   (coordinated omission). The window stays a hard cap on requests in flight: while it is
//!   full, due requests wait and their latency keeps growing.
//!
//! Send-time jitter: tokio timers have a 1 ms resolution, so a connection wakes up to about
//! 1 ms (plus scheduling delay) after a request's intended time, and sends every request then
//! due in one write and one flush. That delay is part of the reported latency — a client on
//! this schedule would see it too — and is reported on its own as `send_lag_us`, so the
//! generator's share can be told from the server's. Connections sleep until their next
//! intended time rather than ticking every millisecond, so at low rates the delay stays at the
//! timer's resolution. If sends lag more than [`BEHIND_LAG_MS`] (1 s of requests), or requests
//! of the measured period are never sent, the summary says `behind`.
//!
//! Warmup: load runs for `warmup` first without being recorded. Counts and histograms cover
//! the requests sent in the measured period that follows (open loop: intended in it), with
//! their answers even when these arrive after it.
//!
//! Every measured request sent ends in exactly one outcome: approved, declined, error or
//! timeout. A connection that fails counts one error, plus one per measured request it had in
//! flight.
//!
//! Live progress (`progress`): each connection hands its recent latencies and counts to a
//! shared accumulator every [`LIVE_FLUSH_MS`] with `try_lock` (never waiting on it); a task
//! prints one line per second on stderr.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use switchyard::core::ResponseCode;
use switchyard::money::format_de4;
use switchyard::tls;
use switchyard::wire::{
    Dialect, EncodeError, Encoder, FrameDecoder, FrameError, Framing, Message, Mti,
    FRAME_SIZE_MAX_BYTES_DEFAULT,
};

/// How long a TCP connect plus TLS handshake may take, in milliseconds.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Largest window per connection (requests in flight); well below the 999,999 STANs.
pub const WINDOW_MAX: usize = 100_000;
/// Largest number of connections one run opens.
pub const CONNECTIONS_MAX: usize = 10_000;
/// Largest open-loop rate, in requests per second over all connections.
pub const RATE_MAX: u64 = 10_000_000;
/// Longest run: warmup + duration + answer timeout, in seconds (one week).
pub const RUN_MAX_SECS: u64 = 7 * 86_400;
/// Largest latency the histograms record, in microseconds (60 s); longer ones are clamped.
pub const LATENCY_MAX_US: u64 = 60_000_000;
/// Open loop: a send lagging its intended time by more than this (at any rate, a backlog of
/// more than 1 s of requests) means the generator fell behind, in milliseconds.
pub const BEHIND_LAG_MS: u64 = 1_000;
/// How often a connection hands its recent answers to the progress reporter, in milliseconds.
pub const LIVE_FLUSH_MS: u64 = 200;
/// Interval between progress lines, in milliseconds.
pub const PROGRESS_INTERVAL_MS: u64 = 1_000;
/// Rows of the percentile distribution per halving of the distance to 100 % (HdrHistogram's
/// usual 5).
pub const HGRM_TICKS_PER_HALF: u32 = 5;
/// The PAN used when [`LoadOptions::pans`] is empty.
pub const PAN_DEFAULT: &str = "4111111111111111";
/// Significant digits of the measured latency histogram: 0.1 % resolution.
const LATENCY_SIGFIG: u8 = 3;
/// Significant digits of the progress and send-lag histograms: 1 % is enough there, and each
/// takes an eighth of the memory of a 3-digit one (≈20 KiB instead of ≈140 KiB).
const COARSE_SIGFIG: u8 = 2;
/// .hgrm values are milliseconds: recorded microseconds divided by this.
const HGRM_VALUE_SCALE: f64 = 1000.0;
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
const NANOS_PER_SEC: u128 = 1_000_000_000;
/// Size of the latency chart, in pixels.
const PLOT_SIZE_PX: (u32, u32) = (1000, 640);
/// The chart's percentile axis reaches at least 99.999 % (5 nines) and at most 6 nines.
const PLOT_NINES_MIN: u32 = 5;
const PLOT_NINES_MAX: u32 = 6;
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
    /// Requests in flight per connection (1..=[`WINDOW_MAX`]); in the open loop a hard cap.
    pub window: usize,
    /// Open loop: requests per second over all connections (1..=[`RATE_MAX`]); `None`: closed
    /// loop.
    pub rate: Option<u64>,
    /// Load run before the measured period and not recorded.
    pub warmup: Duration,
    /// Length of the measured period.
    pub duration: Duration,
    /// A request unanswered this long (open loop: after its intended send time) counts as a
    /// timeout and frees its window slot; also how long to wait for outstanding answers after
    /// the measured period.
    pub answer_timeout: Duration,
    /// Print a progress line on stderr once a second.
    pub progress: bool,
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

impl LoadOptions {
    /// Closed loop at `target` as `identities`, with the defaults the CLI documents:
    /// 8 connections × 64 in flight for 10 s, no warm-up, answers awaited 10 s,
    /// ISO 8583:1987 ASCII with 2-byte frames, EUR, every 20th request declined, routed
    /// by PAN (the default test card), no progress lines.
    pub fn new(target: SocketAddr, server_name: &str, identities: Vec<Identity>) -> LoadOptions {
        LoadOptions {
            target,
            server_name: server_name.to_owned(),
            identities,
            destinations: Vec::new(),
            pans: Vec::new(),
            connections: 8,
            window: 64,
            rate: None,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(10),
            answer_timeout: Duration::from_secs(10),
            progress: false,
            dialect: Arc::new(Dialect::iso87_ascii()),
            framing: Framing::U16be,
            currency: *b"978",
            decline_every: 20,
        }
    }
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

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }

    fn json(&self) -> String {
        format!(
            "{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}",
            self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

/// The result of a run. Counts cover the measured period only (see the module docs).
/// `Debug` shows [`Summary::full_json`] (not the histogram's thousands of counters).
#[derive(Clone, serde::Serialize)]
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
    /// Matched answers per second of the measured period.
    pub tps: f64,
    /// Wall time of the run, connecting, warmup and draining included, in milliseconds.
    pub elapsed_ms: u64,
    /// Latency of matched answers, from the (intended) send time.
    pub latency_us: Latency,
    /// Every DE39 value seen, with its count.
    pub codes: BTreeMap<String, u64>,
    /// Open-loop rate asked for, requests per second; `None`: closed loop.
    pub rate: Option<u64>,
    /// Connections asked for.
    pub connections: usize,
    /// Requests in flight per connection, at most.
    pub window: usize,
    /// Unrecorded load before the measured period, in milliseconds.
    pub warmup_ms: u64,
    /// Length of the measured period, in milliseconds.
    pub duration_ms: u64,
    /// Requests sent within the measured period per second of it. Open loop: requests due in
    /// its last moments may be written just after it (timer resolution) and are not counted
    /// here, so a generator on schedule shows a hair under the rate.
    pub send_rate: f64,
    /// Open loop: how long after its intended time each request was written, in microseconds
    /// (timer resolution, scheduling, and waiting for a full window).
    pub send_lag_us: Latency,
    /// Open loop: requests due in the measured period that were never sent (their window
    /// stayed full, or their connection failed).
    pub unsent: u64,
    /// Open loop: the generator fell behind its schedule (a send lagged more than
    /// [`BEHIND_LAG_MS`], or requests were left unsent on a working connection).
    pub behind: bool,
    /// The latency distribution, in microseconds, for [`hgrm_text`] and [`write_plot`].
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

impl std::fmt::Debug for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.full_json())
    }
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
    /// tps (one decimal), latency_us {p50, p90, p99, p999, max}, then elapsed_ms, codes,
    /// mode ("open" or "closed"), rate (null in the closed loop), connections, window,
    /// warmup_ms, duration_ms, send_rate, behind, unsent, send_lag_us {p50 … max}.
    pub fn full_json(&self) -> String {
        let mut out = format!(
            "{{\"sent\":{},\"approved\":{},\"declined\":{},\"errors\":{},\"timeouts\":{},\
             \"tps\":{},\"latency_us\":{},\"elapsed_ms\":{},\"codes\":",
            self.sent,
            self.approved,
            self.declined,
            self.errors,
            self.timeouts,
            tps_1dp(self.tps),
            self.latency_us.json(),
            self.elapsed_ms,
        );
        // A map of strings to integers always serialises.
        out.push_str(&serde_json::to_string(&self.codes).unwrap_or_else(|_| "{}".to_owned()));
        let _ = write!(
            out,
            ",\"mode\":\"{}\",\"rate\":{},\"connections\":{},\"window\":{},\"warmup_ms\":{},\
             \"duration_ms\":{},\"send_rate\":{},\"behind\":{},\"unsent\":{},\"send_lag_us\":{}}}",
            self.mode(),
            self.rate.map_or("null".to_owned(), |r| r.to_string()),
            self.connections,
            self.window,
            self.warmup_ms,
            self.duration_ms,
            tps_1dp(self.send_rate),
            self.behind,
            self.unsent,
            self.send_lag_us.json(),
        );
        out
    }

    fn mode(&self) -> &'static str {
        if self.rate.is_some() {
            "open"
        } else {
            "closed"
        }
    }

    /// One line describing the load, e.g. "open loop 1,000 requests/s, 1 connection,
    /// window 2,000".
    pub fn load_description(&self) -> String {
        let connections = match self.connections {
            1 => "1 connection".to_owned(),
            n => format!("{} connections", thousands(n as u64)),
        };
        let window = thousands(self.window as u64);
        match self.rate {
            Some(rate) => format!(
                "open loop {} requests/s, {connections}, window {window}",
                thousands(rate)
            ),
            None => format!("closed loop, {connections}, window {window}"),
        }
    }

    /// A warning to print when the generator fell behind its schedule; `None` when it did not.
    pub fn behind_warning(&self) -> Option<String> {
        if !self.behind {
            return None;
        }
        let unsent = match self.unsent {
            0 => String::new(),
            n => format!(", {} requests never sent", thousands(n)),
        };
        Some(format!(
            "the load generator fell behind its schedule: sends lagged up to {:.1} ms after \
             their intended times{unsent}; sent {}/s of the {}/s asked. Either the window \
             ({}) stayed full (the target is slower than the rate) or this machine could not \
             keep up; latency is still counted from the intended times.",
            self.send_lag_us.max as f64 / 1000.0,
            tps_1dp(self.send_rate),
            thousands(self.rate.unwrap_or(0)),
            thousands(self.window as u64),
        ))
    }

    /// A human-readable summary, one figure per line.
    pub fn render(&self) -> String {
        let l = &self.latency_us;
        let mut out = String::new();
        let secs = self.duration_ms as f64 / 1000.0;
        let _ = writeln!(out, "load        {}", self.load_description());
        let _ = writeln!(
            out,
            "measured    {secs:.2} s after {:.2} s of warmup ({:.2} s in all)",
            self.warmup_ms as f64 / 1000.0,
            self.elapsed_ms as f64 / 1000.0
        );
        let _ = writeln!(out, "sent        {}", self.sent);
        let _ = writeln!(out, "approved    {}", self.approved);
        let _ = writeln!(out, "declined    {}", self.declined);
        let _ = writeln!(out, "errors      {}", self.errors);
        let _ = writeln!(out, "timeouts    {}", self.timeouts);
        let _ = writeln!(out, "throughput  {} tps", tps_1dp(self.tps));
        let _ = writeln!(
            out,
            "latency us  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        if let Some(rate) = self.rate {
            let lag = &self.send_lag_us;
            let _ = writeln!(
                out,
                "sending     {}/s of {rate}/s asked{}{}",
                tps_1dp(self.send_rate),
                if self.unsent > 0 {
                    format!(", {} never sent", self.unsent)
                } else {
                    String::new()
                },
                if self.behind { " (behind)" } else { "" }
            );
            let _ = writeln!(
                out,
                "send lag us p50 {}  p99 {}  max {}",
                lag.p50, lag.p99, lag.max
            );
        }
        let codes: Vec<String> = self.codes.iter().map(|(c, n)| format!("{c}={n}")).collect();
        let _ = writeln!(out, "codes       {}", codes.join(" "));
        out
    }
}

/// `n` with a comma every three digits: 1234567 → "1,234,567".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// === run ===

/// Why one connection failed. It counts as one error plus its requests in flight.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("connect and TLS handshake did not finish in time")]
    ConnectTimeout,
    #[error("the connecting task failed")]
    ConnectTaskFailed,
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

/// Empty histograms that tallies and connections are made from.
struct Templates {
    /// Measured latencies, 1 µs to [`LATENCY_MAX_US`], [`LATENCY_SIGFIG`] digits.
    latency: Histogram<u64>,
    /// Progress and send lag, same range, [`COARSE_SIGFIG`] digits.
    coarse: Histogram<u64>,
}

impl Templates {
    fn new() -> anyhow::Result<Templates> {
        Ok(Templates {
            latency: Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
                .context("cannot create the latency histogram")?,
            coarse: Histogram::new_with_bounds(1, LATENCY_MAX_US, COARSE_SIGFIG)
                .context("cannot create the progress histogram")?,
        })
    }
}

/// What every connection of a run shares, once all connections are open.
struct Plan {
    opts: LoadOptions,
    pans: Vec<String>,
    templates: Templates,
    /// Start of the load and of the open-loop schedule (warmup begins here).
    start: Instant,
    /// Start of the measured period: requests sent (open loop: intended) from here on count.
    measure_from: Instant,
    /// End of the measured period: no request intended (or, closed loop, sent) after it.
    send_until: Instant,
    /// Stop waiting for answers (and, open loop, sending a backlog) at this instant.
    drain_until: Instant,
    /// How often to scan for timed-out requests.
    expiry_tick: Duration,
    /// Recent answers of all connections, taken by the progress reporter once a second.
    live: Mutex<Recent>,
}

impl Plan {
    fn new(opts: LoadOptions, pans: Vec<String>, templates: Templates, start: Instant) -> Plan {
        let measure_from = start + opts.warmup;
        let send_until = measure_from + opts.duration;
        let tick_ms = u64::try_from(opts.answer_timeout.as_millis() / 4).unwrap_or(u64::MAX);
        Plan {
            expiry_tick: Duration::from_millis(tick_ms.clamp(1, EXPIRY_TICK_MAX_MS)),
            drain_until: send_until + opts.answer_timeout,
            live: Mutex::new(Recent::new(&templates)),
            start,
            measure_from,
            send_until,
            templates,
            pans,
            opts,
        }
    }

    /// Open loop: how many requests of connection `index` are due in the measured period.
    fn scheduled_measured(&self, rate: u64, index: usize) -> u64 {
        let n = self.opts.connections;
        let from = first_index_from(rate, n, index, self.opts.warmup);
        let until = first_index_from(rate, n, index, self.opts.warmup + self.opts.duration);
        until.saturating_sub(from)
    }
}

/// Runs the load described by `opts` and summarises it. All connections are opened first;
/// the warmup and the measured period start once they are. Connections that fail are
/// counted as errors; only invalid options are an `Err`.
pub async fn run(opts: LoadOptions) -> anyhow::Result<Summary> {
    let pans = if opts.pans.is_empty() {
        vec![PAN_DEFAULT.to_owned()]
    } else {
        opts.pans.clone()
    };
    check_options(&opts, &pans)?;
    let server_name = ServerName::try_from(opts.server_name.clone())
        .with_context(|| format!("invalid TLS server name {:?}", opts.server_name))?;
    let templates = Templates::new()?;
    let begun = Instant::now();
    let streams = connect_all(&opts, &server_name).await;
    let plan = Arc::new(Plan::new(opts, pans, templates, Instant::now()));
    let (stop_progress, progress) = if plan.opts.progress {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(report_progress(plan.clone(), stopped));
        (Some(stop), Some(task))
    } else {
        (None, None)
    };
    let mut total = Tally::new(&plan.templates);
    let mut tasks = JoinSet::new();
    for (index, stream) in streams.into_iter().enumerate() {
        match stream {
            Ok(stream) => {
                tasks.spawn(connection(plan.clone(), index, stream));
            }
            Err(e) => {
                tracing::warn!(connection = index, error = %e, "load generator: cannot connect");
                total.errors += 1;
                if let Some(rate) = plan.opts.rate {
                    total.unsent += plan.scheduled_measured(rate, index);
                }
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(tally) => total.merge(&tally),
            Err(e) => {
                tracing::warn!(error = %e, "load generator: connection task failed");
                total.errors += 1;
            }
        }
    }
    if let Some(stop) = stop_progress {
        let _ = stop.send(());
    }
    if let Some(task) = progress {
        let _ = task.await;
    }
    Ok(total.summary(&plan, begun.elapsed()))
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
    if let Some(rate) = opts.rate {
        if !(1..=RATE_MAX).contains(&rate) {
            bail!("rate must be 1..={RATE_MAX} requests/s, not {rate}");
        }
    }
    if opts.answer_timeout.is_zero() {
        bail!("the answer timeout must be positive");
    }
    let run = opts.warmup.checked_add(opts.duration);
    let run = run.and_then(|r| r.checked_add(opts.answer_timeout));
    if run.is_none_or(|r| r > Duration::from_secs(RUN_MAX_SECS)) {
        bail!("warmup + duration + answer timeout must be at most {RUN_MAX_SECS} s");
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

type Stream = TlsStream<TcpStream>;

/// Opens every connection concurrently, each within [`CONNECT_TIMEOUT_MS`]; the result is
/// indexed by connection.
async fn connect_all(
    opts: &LoadOptions,
    server_name: &ServerName<'static>,
) -> Vec<Result<Stream, ConnectionError>> {
    let mut tasks = JoinSet::new();
    for index in 0..opts.connections {
        let identity = &opts.identities[index % opts.identities.len()];
        let connector = TlsConnector::from(identity.tls.clone());
        let (target, name) = (opts.target, server_name.clone());
        tasks.spawn(async move { (index, connect(target, connector, name).await) });
    }
    let mut streams: Vec<Option<Result<Stream, ConnectionError>>> =
        (0..opts.connections).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((index, result)) = joined {
            streams[index] = Some(result);
        }
    }
    streams
        .into_iter()
        .map(|s| s.unwrap_or(Err(ConnectionError::ConnectTaskFailed)))
        .collect()
}

async fn connect(
    target: SocketAddr,
    connector: TlsConnector,
    server_name: ServerName<'static>,
) -> Result<Stream, ConnectionError> {
    let attempt = async {
        let tcp = TcpStream::connect(target).await?;
        let _ = tcp.set_nodelay(true);
        connector.connect(server_name, tcp).await
    };
    Ok(
        tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), attempt)
            .await
            .map_err(|_| ConnectionError::ConnectTimeout)??,
    )
}

// === open-loop schedule ===

/// When request `index` of connection `connection` is due, as an offset from the start of
/// the load, when `connections` connections share `rate` requests per second: the `k`-th
/// request overall (`k = index · connections + connection`) is due at `k / rate` seconds.
/// Each connection thus sends every `connections / rate` seconds, connection `c` starting
/// `c / rate` seconds in, so that connections do not all fire together. Integer nanoseconds:
/// no drift however long the run. `rate` must not be 0.
pub fn intended_offset(rate: u64, connections: usize, connection: usize, index: u64) -> Duration {
    let k = u128::from(index) * connections as u128 + connection as u128;
    let nanos = k * NANOS_PER_SEC / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The first index of connection `connection` whose [`intended_offset`] is at or after
/// `offset`: requests `first_index_from(.., a)..first_index_from(.., b)` are those due in
/// `[a, b)`.
pub fn first_index_from(rate: u64, connections: usize, connection: usize, offset: Duration) -> u64 {
    // floor(k · 1e9 / rate) >= ns  ⇔  k · 1e9 >= ns · rate  ⇔  k >= ceil(ns · rate / 1e9).
    let k_min = (offset.as_nanos() * u128::from(rate.max(1))).div_ceil(NANOS_PER_SEC);
    let c = connection as u128;
    if k_min <= c {
        return 0;
    }
    let index = (k_min - c).div_ceil(connections.max(1) as u128);
    u64::try_from(index).unwrap_or(u64::MAX)
}

// === live progress ===

/// Answers (their latencies), errors and timeouts not yet reported, warmup included.
struct Recent {
    latency: Histogram<u64>,
    errors: u64,
    timeouts: u64,
}

impl Recent {
    fn new(templates: &Templates) -> Recent {
        Recent {
            latency: Histogram::new_from(&templates.coarse),
            errors: 0,
            timeouts: 0,
        }
    }

    /// Moves everything in `other` into `self`, leaving `other` empty.
    fn absorb(&mut self, other: &mut Recent) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        other.clear();
    }

    fn clear(&mut self) {
        self.latency.reset();
        self.errors = 0;
        self.timeouts = 0;
    }
}

fn lock_recovering<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug elsewhere; the figures are still usable.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prints a progress line on stderr every [`PROGRESS_INTERVAL_MS`] until `stop` fires (or,
/// at the latest, shortly after the run must have ended).
async fn report_progress(plan: Arc<Plan>, mut stop: oneshot::Receiver<()>) {
    let period = Duration::from_millis(PROGRESS_INTERVAL_MS);
    let end = plan.drain_until + Duration::from_millis(CLOSE_TIMEOUT_MS) + period;
    let mut recent = Recent::new(&plan.templates);
    let (mut answers, mut errors, mut timeouts) = (0u64, 0u64, 0u64);
    let mut last = plan.start;
    let mut next = plan.start + period;
    while next <= end {
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep_until(next) => {}
        }
        next += period;
        let now = Instant::now();
        // Held for one copy of a small histogram; connections only ever `try_lock` it.
        recent.absorb(&mut lock_recovering(&plan.live));
        let interval_answers = recent.latency.len();
        answers += interval_answers;
        errors += recent.errors;
        timeouts += recent.timeouts;
        let secs = now.saturating_duration_since(last).as_secs_f64();
        // The phase the interval began in.
        let phase = if last < plan.measure_from {
            "warmup"
        } else if last >= plan.send_until {
            "draining"
        } else {
            ""
        };
        last = now;
        let line = ProgressLine {
            elapsed_s: now.saturating_duration_since(plan.start).as_secs_f64(),
            tps: if secs > 0.0 {
                interval_answers as f64 / secs
            } else {
                0.0
            },
            answers,
            errors,
            timeouts,
            p99_us: (!recent.latency.is_empty()).then(|| recent.latency.value_at_quantile(0.99)),
            phase,
        };
        eprintln!("{}", line.render());
        recent.clear();
    }
}

/// One line of live progress.
struct ProgressLine {
    elapsed_s: f64,
    /// Answers per second over the last interval.
    tps: f64,
    /// Totals since the start, warmup included.
    answers: u64,
    errors: u64,
    timeouts: u64,
    /// 99th percentile of the last interval's answers, in microseconds.
    p99_us: Option<u64>,
    /// The phase the interval began in: "warmup", "draining" or "" (measuring).
    phase: &'static str,
}

impl ProgressLine {
    /// `[  3s] 412,345 tps  answers 1,234,567  errors 0  timeouts 0  p99 1.4 ms`
    fn render(&self) -> String {
        let tps = if self.tps.is_finite() && self.tps > 0.0 {
            self.tps.round() as u64
        } else {
            0
        };
        let p99 = self
            .p99_us
            .map_or("-".to_owned(), |us| format!("{:.1} ms", us as f64 / 1000.0));
        let mut line = format!(
            "[{:>3.0}s] {} tps  answers {}  errors {}  timeouts {}  p99 {p99}",
            self.elapsed_s.max(0.0),
            thousands(tps),
            thousands(self.answers),
            thousands(self.errors),
            thousands(self.timeouts),
        );
        if !self.phase.is_empty() {
            let _ = write!(line, "  ({})", self.phase);
        }
        line
    }
}

// === tallies ===

/// Counts and latencies of the measured requests of one connection, merged at the end.
struct Tally {
    sent: u64,
    /// Open loop: measured requests sent only after the measured period (a backlog).
    sent_late: u64,
    answered: u64,
    approved: u64,
    declined: u64,
    errors: u64,
    timeouts: u64,
    unsent: u64,
    /// Requests were left unsent on a connection that kept working.
    behind: bool,
    /// DE39 values seen; few distinct ones, so a small vector beats a map.
    codes: Vec<([u8; 2], u64)>,
    latency: Histogram<u64>,
    /// Open loop: time from intended to actual send, in microseconds.
    send_lag: Histogram<u64>,
}

impl Tally {
    fn new(templates: &Templates) -> Tally {
        Tally {
            sent: 0,
            sent_late: 0,
            answered: 0,
            approved: 0,
            declined: 0,
            errors: 0,
            timeouts: 0,
            unsent: 0,
            behind: false,
            codes: Vec::new(),
            latency: Histogram::new_from(&templates.latency),
            send_lag: Histogram::new_from(&templates.coarse),
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
        self.sent_late += other.sent_late;
        self.answered += other.answered;
        self.approved += other.approved;
        self.declined += other.declined;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.unsent += other.unsent;
        self.behind |= other.behind;
        for &(code, n) in &other.codes {
            self.count_code(code, n);
        }
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.send_lag.add(&other.send_lag);
    }

    fn summary(&self, plan: &Plan, elapsed: Duration) -> Summary {
        let opts = &plan.opts;
        let secs = opts.duration.as_secs_f64();
        let per_second = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let send_lag_us = Latency::of(&self.send_lag);
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Summary {
            sent: self.sent,
            approved: self.approved,
            declined: self.declined,
            errors: self.errors,
            timeouts: self.timeouts,
            tps: per_second(self.answered),
            elapsed_ms: millis(elapsed),
            latency_us: Latency::of(&self.latency),
            codes: self
                .codes
                .iter()
                .map(|(c, n)| (String::from_utf8_lossy(c).into_owned(), *n))
                .collect(),
            rate: opts.rate,
            connections: opts.connections,
            window: opts.window,
            warmup_ms: millis(opts.warmup),
            duration_ms: millis(opts.duration),
            send_rate: per_second(self.sent.saturating_sub(self.sent_late)),
            behind: self.behind || send_lag_us.max > BEHIND_LAG_MS * 1000,
            send_lag_us,
            unsent: self.unsent,
            histogram: self.latency.clone(),
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

async fn connection(plan: Arc<Plan>, index: usize, stream: Stream) -> Tally {
    let (reader, writer) = tokio::io::split(stream);
    let shared = Shared {
        state: Mutex::new(ConnState::new(&plan, index)),
        freed: Notify::new(),
    };
    let result = tokio::select! {
        read = read_loop(reader, &shared, &plan) => read,
        write = write_loop(writer, &shared, &plan) => write,
    };
    let mut state = shared.state.into_inner().unwrap_or_else(|e| e.into_inner());
    let failed = result.is_err();
    if let Err(e) = result {
        tracing::warn!(connection = index, error = %e, "load generator: connection failed");
        let in_flight = state.abandon();
        state.tally.errors += 1 + in_flight;
    }
    if let Some(rate) = plan.opts.rate {
        let unsent = plan
            .scheduled_measured(rate, index)
            .saturating_sub(state.tally.sent);
        state.tally.unsent = unsent;
        state.tally.behind = unsent > 0 && !failed;
    }
    if plan.opts.progress {
        state.flush_live(&plan);
    }
    state.tally
}

#[derive(Clone, Copy)]
enum SlotState {
    Free,
    InFlight {
        /// Send time (open loop: intended send time); latency and timeout run from it.
        sent: Instant,
        rrn: u64,
        /// Sent (intended) in the measured period.
        measured: bool,
    },
    /// Counted as a timeout; a late answer to it is ignored until the slot is reused.
    TimedOut,
}

#[derive(Clone, Copy)]
struct Slot {
    stan: u32,
    state: SlotState,
}

/// What the writer does next.
enum Next {
    /// Sleep until this intended send time.
    At(Instant),
    /// Wait for an answer to free a window slot.
    WindowFull,
    /// Nothing more to send.
    Done,
}

/// What an answer turned out to answer.
enum Matched {
    Request {
        sent: Instant,
        measured: bool,
    },
    /// An answer to a request already counted as a timeout.
    Late,
    /// Nothing in flight, or not the request in flight with that STAN.
    Stray {
        measured: bool,
    },
}

/// Requests in flight on one connection, indexed by STAN modulo a power of two at least
/// twice the window, plus the tally.
struct ConnState {
    slots: Vec<Slot>,
    in_flight: usize,
    next_stan: u32,
    /// Requests sent on this connection so far.
    seq: u64,
    /// Open loop: schedule index of the next request to send.
    next_due: u64,
    index: u64,
    connections: u64,
    tally: Tally,
    /// Not yet handed to the progress reporter.
    recent: Recent,
    next_scan: Instant,
    next_flush: Instant,
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
        // Reader and writer run in one task, so the lock is never contended.
        lock_recovering(&self.state)
    }
}

impl ConnState {
    fn new(plan: &Plan, index: usize) -> ConnState {
        let capacity = (plan.opts.window * 2).next_power_of_two();
        // Spread connections over the STAN space so that two connections of one institution
        // do not send the same STAN in the same second.
        let spacing = STAN_MAX as usize / plan.opts.connections;
        let first = 1 + (index * spacing) % STAN_MAX as usize;
        // Stagger the progress hand-overs of the connections over the flush interval.
        let stagger = LIVE_FLUSH_MS * index as u64 / plan.opts.connections as u64;
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
            next_due: 0,
            index: index as u64,
            connections: plan.opts.connections as u64,
            tally: Tally::new(&plan.templates),
            recent: Recent::new(&plan.templates),
            next_scan: plan.start,
            next_flush: plan.start + Duration::from_millis(stagger),
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

    /// Encodes the next request into `out`, stamped `stamp` (its send time or, open loop,
    /// intended send time); it is measured if `stamp` is in the measured period.
    fn push_request(
        &mut self,
        plan: &Plan,
        clock: &WireClock,
        stamp: Instant,
        out: &mut BytesMut,
    ) -> Result<(), ConnectionError> {
        let opts = &plan.opts;
        let identity = &opts.identities[self.index as usize % opts.identities.len()];
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
        values.encode(&opts.dialect, opts.framing, clock, out)?;
        let measured = stamp >= plan.measure_from && stamp < plan.send_until;
        let at = self.slot_index(stan);
        self.slots[at] = Slot {
            stan,
            state: SlotState::InFlight {
                sent: stamp,
                rrn,
                measured,
            },
        };
        self.seq += 1;
        self.in_flight += 1;
        if measured {
            self.tally.sent += 1;
        }
        Ok(())
    }

    /// Closed loop: encodes requests until the window is full, all stamped `now`.
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
        let clock = WireClock::now();
        for _ in 0..free {
            self.push_request(plan, &clock, now, out)?;
        }
        Ok(())
    }

    /// Open loop: encodes every request due by `now` that the window has room for, each
    /// stamped with its intended send time, and says what to wait for next. At most `window`
    /// requests per call.
    fn send_due(
        &mut self,
        plan: &Plan,
        rate: u64,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<Next, ConnectionError> {
        let clock = WireClock::now();
        let (connections, index) = (plan.opts.connections, self.index as usize);
        // Each pass fills one window slot or returns, so this ends within window + 1 passes.
        loop {
            let offset = intended_offset(rate, connections, index, self.next_due);
            let intended = plan.start + offset;
            if intended >= plan.send_until {
                return Ok(Next::Done);
            }
            if intended > now {
                return Ok(Next::At(intended));
            }
            if self.in_flight >= plan.opts.window {
                return Ok(Next::WindowFull);
            }
            self.push_request(plan, &clock, intended, out)?;
            self.next_due += 1;
            if intended >= plan.measure_from {
                let lag_us = u64::try_from(now.saturating_duration_since(intended).as_micros());
                let lag_us = lag_us.unwrap_or(LATENCY_MAX_US).min(LATENCY_MAX_US);
                self.tally.send_lag.saturating_record(lag_us);
                if now >= plan.send_until {
                    self.tally.sent_late += 1;
                }
            }
        }
    }

    /// Scans for timed-out requests and hands recent figures to the progress reporter, each
    /// when its time has come.
    fn housekeeping(&mut self, plan: &Plan, now: Instant) {
        if now >= self.next_scan {
            self.expire(now, plan.opts.answer_timeout);
            self.next_scan = now + plan.expiry_tick;
        }
        if plan.opts.progress && now >= self.next_flush {
            self.flush_live(plan);
            self.next_flush = now + Duration::from_millis(LIVE_FLUSH_MS);
        }
    }

    /// When housekeeping is next due.
    fn next_housekeeping(&self, plan: &Plan) -> Instant {
        if plan.opts.progress {
            self.next_scan.min(self.next_flush)
        } else {
            self.next_scan
        }
    }

    /// Adds the recent figures to the shared ones, unless another connection or the
    /// reporter holds the lock: then they wait for the next flush (never blocks).
    fn flush_live(&mut self, plan: &Plan) {
        match plan.live.try_lock() {
            Ok(mut live) => live.absorb(&mut self.recent),
            Err(TryLockError::Poisoned(e)) => e.into_inner().absorb(&mut self.recent),
            Err(TryLockError::WouldBlock) => {}
        }
    }

    /// Counts requests sent `timeout` or longer before `now` as timeouts, freeing their slots.
    fn expire(&mut self, now: Instant, timeout: Duration) {
        if self.in_flight == 0 {
            return;
        }
        for slot in &mut self.slots {
            if let SlotState::InFlight { sent, measured, .. } = slot.state {
                if now.saturating_duration_since(sent) >= timeout {
                    slot.state = SlotState::TimedOut;
                    self.in_flight -= 1;
                    self.recent.timeouts += 1;
                    if measured {
                        self.tally.timeouts += 1;
                    }
                }
            }
        }
    }

    /// Forgets every request in flight (the connection failed, or the run ended); returns how
    /// many measured ones there were.
    fn abandon(&mut self) -> u64 {
        let mut measured_in_flight = 0;
        for slot in &mut self.slots {
            if let SlotState::InFlight { measured, .. } = slot.state {
                slot.state = SlotState::Free;
                measured_in_flight += u64::from(measured);
            }
        }
        self.in_flight = 0;
        measured_in_flight
    }

    /// Matches one answer with its request by STAN (and RRN) and counts it. `in_period`:
    /// the answer arrived in or after the measured period (for answers that match nothing).
    /// An answer `timeout` or more after its (intended) send time counts as a timeout, as the
    /// expiry scan would have counted it.
    fn on_answer(&mut self, answer: &Message, now: Instant, in_period: bool, timeout: Duration) {
        let de39 = answer.field(39).and_then(|c| <[u8; 2]>::try_from(c).ok());
        let (sent, measured) = match self.take_request(answer, in_period) {
            Matched::Request { sent, measured } => (sent, measured),
            // Already counted as a timeout: one outcome per request.
            Matched::Late => return,
            Matched::Stray { measured } => {
                self.recent.errors += 1;
                if measured {
                    self.tally.errors += 1;
                    if let Some(code) = de39 {
                        self.tally.count_code(code, 1);
                    }
                }
                return;
            }
        };
        let waited = now.saturating_duration_since(sent);
        if waited >= timeout {
            self.recent.timeouts += 1;
            self.tally.timeouts += u64::from(measured);
            return;
        }
        let micros = u64::try_from(waited.as_micros());
        let micros = micros.unwrap_or(LATENCY_MAX_US).clamp(1, LATENCY_MAX_US);
        self.recent.latency.saturating_record(micros);
        let outcome = de39.map_or(Outcome::Error, |c| classify(&c));
        match outcome {
            Outcome::Error => self.recent.errors += 1,
            Outcome::Timeout => self.recent.timeouts += 1,
            Outcome::Approved | Outcome::Declined => {}
        }
        if !measured {
            return;
        }
        self.tally.answered += 1;
        self.tally.latency.saturating_record(micros);
        if let Some(code) = de39 {
            self.tally.count_code(code, 1);
        }
        match outcome {
            Outcome::Approved => self.tally.approved += 1,
            Outcome::Declined => self.tally.declined += 1,
            Outcome::Timeout => self.tally.timeouts += 1,
            Outcome::Error => self.tally.errors += 1,
        }
    }

    /// Finds the request in flight that `answer` answers and frees its slot.
    fn take_request(&mut self, answer: &Message, in_period: bool) -> Matched {
        let stray = Matched::Stray {
            measured: in_period,
        };
        let Some(stan) = answer.field(11).and_then(parse_stan) else {
            return stray;
        };
        let at = self.slot_index(stan);
        let slot = self.slots[at];
        if slot.stan != stan {
            return stray;
        }
        match slot.state {
            SlotState::InFlight {
                sent,
                rrn,
                measured,
            } => {
                let mut expected_rrn = [0u8; 12];
                write_digits(rrn, &mut expected_rrn);
                if answer.mti() != Mti::FINANCIAL_RESPONSE
                    || answer.field(37) != Some(&expected_rrn[..])
                {
                    // Not the answer to this request; the request stays in flight.
                    return Matched::Stray { measured };
                }
                self.slots[at].state = SlotState::Free;
                self.in_flight -= 1;
                Matched::Request { sent, measured }
            }
            SlotState::TimedOut => {
                self.slots[at].state = SlotState::Free;
                Matched::Late
            }
            SlotState::Free => stray,
        }
    }
}

/// Sends until the end of the measured period — closed loop: keeps the window full; open
/// loop: follows the schedule — then waits for outstanding answers until `drain_until`
/// (those left count as timeouts) and closes the connection.
async fn write_loop(
    mut writer: impl AsyncWrite + Unpin,
    shared: &Shared,
    plan: &Plan,
) -> Result<(), ConnectionError> {
    let mut out = BytesMut::with_capacity(plan.opts.window.min(1024) * 256);
    // Closed loop: sending stops at `send_until`; open loop: a backlog held up by a full
    // window may still be sent until `drain_until`.
    let limit = match plan.opts.rate {
        None => plan.send_until,
        Some(_) => plan.drain_until,
    };
    loop {
        let now = Instant::now();
        if now >= limit {
            break;
        }
        let (next, wake) = {
            let mut state = shared.lock();
            state.housekeeping(plan, now);
            let next = match plan.opts.rate {
                None => state.fill(plan, now, &mut out).map(|()| Next::WindowFull)?,
                Some(rate) => state.send_due(plan, rate, now, &mut out)?,
            };
            (next, state.next_housekeeping(plan).min(limit))
        };
        if !out.is_empty() {
            // One write and one flush for everything due.
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
        match next {
            Next::Done => break,
            Next::At(at) => tokio::time::sleep_until(at.min(wake)).await,
            Next::WindowFull => tokio::select! {
                () = shared.freed.notified() => {}
                () = tokio::time::sleep_until(wake) => {}
            },
        }
    }
    drain(shared, plan).await;
    let close = Duration::from_millis(CLOSE_TIMEOUT_MS);
    let _ = tokio::time::timeout(close, writer.shutdown()).await;
    Ok(())
}

/// Waits until every request in flight is answered or timed out, at the latest until
/// `drain_until`; those still in flight then count as timeouts.
async fn drain(shared: &Shared, plan: &Plan) {
    loop {
        let now = Instant::now();
        let wake = {
            let mut state = shared.lock();
            state.housekeeping(plan, now);
            if state.in_flight == 0 {
                return;
            }
            if now >= plan.drain_until {
                let left = state.abandon();
                state.tally.timeouts += left;
                return;
            }
            state.next_housekeeping(plan).min(plan.drain_until)
        };
        tokio::select! {
            () = shared.freed.notified() => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
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
    let timeout = plan.opts.answer_timeout;
    loop {
        if input.capacity() - input.len() < READ_CHUNK_BYTES / 4 {
            input.reserve(READ_CHUNK_BYTES);
        }
        if reader.read_buf(&mut input).await? == 0 {
            return Err(ConnectionError::Closed);
        }
        let now = Instant::now();
        let in_period = now >= plan.measure_from;
        let mut state = shared.lock();
        while let Some(frame) = frames.decode(&mut input)? {
            match Message::decode(&plan.opts.dialect, frame) {
                Ok(answer) => state.on_answer(&answer, now, in_period, timeout),
                Err(e) => {
                    state.recent.errors += 1;
                    if in_period {
                        state.tally.errors += 1;
                    }
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

// === reports: .hgrm and chart ===

/// Sub-buckets of an HdrHistogram with `sigfig` significant digits: the power of two at or
/// above 2·10^sigfig (2048 for 3 digits), as HdrHistogram's trailer prints it.
fn sub_bucket_count(sigfig: u8) -> u64 {
    (2 * 10u64.pow(u32::from(sigfig))).next_power_of_two()
}

/// `h` (microseconds) in HdrHistogram's percentile distribution text format (`.hgrm`), as
/// Java's `outputPercentileDistribution(out, 5, 1000.0)` prints it: values in milliseconds
/// with as many decimals as the histogram has significant digits, [`HGRM_TICKS_PER_HALF`]
/// rows per halving of the distance to 100 %, then the mean, standard deviation, maximum,
/// count and histogram shape. HdrHistogram's plotter
/// (hdrhistogram.github.io/HdrHistogram/plotFiles.html) reads it.
pub fn hgrm_text(h: &Histogram<u64>) -> String {
    let digits = usize::from(h.sigfig());
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for row in h.iter_quantiles(HGRM_TICKS_PER_HALF) {
        total += row.count_since_last_iteration();
        let value = row.value_iterated_to() as f64 / HGRM_VALUE_SCALE;
        let quantile = row.quantile_iterated_to();
        if quantile < 1.0 {
            let inverse = 1.0 / (1.0 - quantile);
            let _ = writeln!(
                out,
                "{value:12.digits$} {quantile:2.12} {total:10} {inverse:14.2}"
            );
        } else {
            let _ = writeln!(out, "{value:12.digits$} {quantile:2.12} {total:10}");
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (
            h.mean() / HGRM_VALUE_SCALE,
            h.stdev() / HGRM_VALUE_SCALE,
            h.max() as f64 / HGRM_VALUE_SCALE,
        )
    };
    let _ = writeln!(
        out,
        "#[Mean    = {mean:12.digits$}, StdDeviation   = {stdev:12.digits$}]"
    );
    let _ = writeln!(
        out,
        "#[Max     = {max:12.digits$}, Total count    = {:12}]",
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    );
    out
}

/// The label of `nines` on the chart's percentile axis: 0 → "0%", 1 → "90%", 2 → "99%",
/// 3 → "99.9%" …
fn percentile_label(nines: u32) -> String {
    match nines {
        0 => "0%".to_owned(),
        1 => "90%".to_owned(),
        2 => "99%".to_owned(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)),
    }
}

/// Chart points: x = log10(1 / (1 − quantile)) (0 at 0 %, 1 at 90 %, 2 at 99 % …), y =
/// latency in milliseconds, one per row of the percentile distribution (the 100 % row, at
/// infinity, left out).
fn plot_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    h.iter_quantiles(HGRM_TICKS_PER_HALF)
        .filter(|row| row.quantile_iterated_to() < 1.0)
        .map(|row| {
            let x = (1.0 / (1.0 - row.quantile_iterated_to())).log10();
            (x, row.value_iterated_to() as f64 / HGRM_VALUE_SCALE)
        })
        .collect()
}

/// Writes an SVG chart of `summary`'s latency by percentile: x on a log scale of
/// 1/(1 − p), labelled 0 %, 90 %, 99 %, 99.9 % …; y in milliseconds. Text is left to the
/// SVG viewer's fonts (`<text>` elements; plotters draws no glyphs without its `ttf`
/// feature).
pub fn write_plot(path: &Path, summary: &Summary) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let points = plot_points(&summary.histogram);
    let last_x = points.last().map_or(0.0, |&(x, _)| x);
    let nines = (last_x.ceil() as u32).clamp(PLOT_NINES_MIN, PLOT_NINES_MAX);
    let points: Vec<(f64, f64)> = points
        .into_iter()
        .filter(|&(x, _)| x <= f64::from(nines))
        .collect();
    let y_max = points.iter().map(|&(_, y)| y).fold(0.0, f64::max) * 1.1;
    let y_max = if y_max > 0.0 { y_max } else { 1.0 };
    let title = format!(
        "Latency by percentile: {}, {:.0} s",
        summary.load_description(),
        summary.duration_ms as f64 / 1000.0
    );

    let root = SVGBackend::new(path, PLOT_SIZE_PX).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..f64::from(nines), 0f64..y_max)?;
    let x_label = |x: &f64| {
        let rounded = x.round();
        if (x - rounded).abs() < 1e-6 && rounded >= 0.0 {
            percentile_label(rounded as u32)
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_labels(nines as usize + 1)
        .x_label_formatter(&x_label)
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    chart.draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?;
    root.present()?;
    Ok(())
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
        let (month, day) = switchyard::core::datetime::month_day(secs / 86_400);
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
            destinations: vec!["200001".to_owned()],
            connections: 2,
            window: 8,
            duration: Duration::from_millis(1000),
            answer_timeout: Duration::from_secs(5),
            decline_every: 10,
            ..LoadOptions::new(target, "localhost", vec![identity])
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
        let summary = run(opts.clone()).await.unwrap();
        assert_eq!(summary.errors, 2);
        assert_eq!(summary.sent, 0);

        // Open loop: the schedule of the failed connections counts as never sent.
        opts.rate = Some(1000);
        let summary = run(opts.clone()).await.unwrap();
        assert_eq!((summary.errors, summary.unsent), (2, 50));
        assert!(!summary.behind);

        for (rate, warmup) in [(Some(0), 0), (Some(RATE_MAX + 1), 0), (None, u64::MAX)] {
            opts.rate = rate;
            opts.warmup = Duration::from_secs(warmup);
            assert!(run(opts.clone()).await.is_err(), "{rate:?} {warmup}");
        }
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
            rate: Some(1000),
            connections: 2,
            window: 64,
            warmup_ms: 500,
            duration_ms: 1000,
            send_rate: 10.0,
            send_lag_us: Latency::default(),
            unsent: 0,
            behind: false,
            histogram: Histogram::new_from(&Templates::new().unwrap().latency),
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

        let full_json = summary.full_json();
        assert!(
            full_json.starts_with(concat!(
                r#"{"sent":10,"approved":7,"declined":1,"errors":1,"timeouts":1,"tps":1234.6,"#,
                r#""latency_us":{"p50":100,"p90":150,"p99":200,"p999":300,"max":400},"#
            )),
            "{full_json}"
        );
        let full: serde_json::Value = serde_json::from_str(&full_json).unwrap();
        assert_eq!(full["sent"], 10);
        assert_eq!(full["latency_us"]["p90"], 150);
        assert_eq!(full["codes"]["51"], 1);
        assert_eq!(full["mode"], "open");
        assert_eq!(full["rate"], 1000);
        assert_eq!(full["behind"], false);
        assert_eq!(full["send_lag_us"]["max"], 0);
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

    /// Waits until the bank has answered `answered` requests (bounded), then stalls it.
    async fn stall_after(stats: Arc<BankStats>, behavior: Arc<Behavior>, answered: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while stats.answered.load(Ordering::Relaxed) < answered {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        behavior.stall_for(Duration::from_secs(1));
        true
    }

    /// Open loop at 1,000 requests/s on one connection for 3.5 s; the bank stalls for 1 s
    /// once it has answered 1,000 requests (about 1 s in).
    async fn open_loop_with_a_stall(window: usize) -> Summary {
        let behavior = Arc::new(Behavior::default());
        let (bank, identity) = bank(behavior.clone()).await;
        let mut opts = options(bank.addr, identity);
        opts.connections = 1;
        opts.window = window;
        opts.rate = Some(1000);
        opts.duration = Duration::from_millis(3500);
        let stall = tokio::spawn(stall_after(bank.stats.clone(), behavior, 1000));
        let summary = run(opts).await.unwrap();
        assert!(
            stall.await.unwrap(),
            "the bank never answered 1,000 requests"
        );
        println!(
            "window {window}:\n{}{}",
            summary.render(),
            summary.full_json()
        );
        assert_eq!(bank.stats.answered.load(Ordering::Relaxed), summary.sent);
        bank.stop().await;
        summary
    }

    /// Coordinated omission: requests due during the stall wait for it to end, and their
    /// latency counts from their intended send times — whether they were written at once
    /// (wide window) or held back because the window was full (narrow window; a closed loop
    /// would show only the 16 stalled requests, less than 1 %, at the 99th percentile).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_latency_counts_a_stall_from_the_intended_times() {
        let (wide, narrow) = tokio::join!(open_loop_with_a_stall(2000), open_loop_with_a_stall(16));
        for summary in [&wide, &narrow] {
            let shown = summary.render();
            assert_eq!(summary.sent + summary.unsent, 3500, "the schedule: {shown}");
            assert_eq!(summary.errors + summary.timeouts, 0, "{shown}");
            assert_eq!(summary.approved + summary.declined, summary.sent, "{shown}");
            assert!(summary.latency_us.p99 > 500_000, "{shown}");
            assert_eq!(summary.histogram.len(), summary.sent);
        }
        // Held back by the full window for most of the stall.
        assert!(narrow.send_lag_us.max > 500_000, "{}", narrow.render());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn warmup_is_not_recorded() {
        let (bank, identity) = bank(Arc::new(Behavior::default())).await;
        let mut opts = options(bank.addr, identity);
        opts.warmup = Duration::from_millis(300);
        opts.duration = Duration::from_millis(300);
        let summary = run(opts).await.unwrap();
        let shown = summary.render();
        assert!(summary.approved > 0, "{shown}");
        assert_eq!(summary.errors + summary.timeouts, 0, "{shown}");
        assert_eq!(summary.sent, summary.approved + summary.declined, "{shown}");
        // At least the two windows filled when the warmup began were answered, not counted.
        let answered = bank.stats.answered.load(Ordering::Relaxed);
        assert!(
            answered >= summary.sent + 16,
            "{answered} answered; {shown}"
        );
        assert_eq!(summary.warmup_ms, 300);
        bank.stop().await;
    }

    /// The open loop sends exactly its schedule: 2,000/s for 0.5 s after 0.2 s of warmup is
    /// 1,000 measured requests and 400 unrecorded ones. Progress is on, to exercise it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_sends_its_schedule() {
        let (bank, identity) = bank(Arc::new(Behavior::default())).await;
        let mut opts = options(bank.addr, identity);
        opts.rate = Some(2000);
        opts.window = 1000;
        opts.warmup = Duration::from_millis(200);
        opts.duration = Duration::from_millis(500);
        opts.progress = true;
        let summary = run(opts).await.unwrap();
        let shown = summary.render();
        assert_eq!(summary.sent + summary.unsent, 1000, "{shown}");
        assert_eq!(summary.errors + summary.timeouts, 0, "{shown}");
        assert_eq!(summary.sent, summary.approved + summary.declined, "{shown}");
        let answered = bank.stats.answered.load(Ordering::Relaxed);
        assert_eq!(answered, summary.sent + 400, "{shown}");
        bank.stop().await;
    }

    #[test]
    fn open_loop_schedule() {
        let ms = Duration::from_millis;
        // 1,000/s over 4 connections: request k overall at k ms; connection c every 4 ms from
        // c ms.
        assert_eq!(intended_offset(1000, 4, 0, 0), Duration::ZERO);
        assert_eq!(intended_offset(1000, 4, 1, 0), ms(1));
        assert_eq!(intended_offset(1000, 4, 0, 1), ms(4));
        assert_eq!(intended_offset(1000, 4, 3, 2), ms(11));
        let mut all: Vec<Duration> = (0..4)
            .flat_map(|c| (0..25).map(move |i| intended_offset(1000, 4, c, i)))
            .collect();
        all.sort();
        assert_eq!(all, (0..100).map(ms).collect::<Vec<_>>());
        // Integer nanoseconds: no drift.
        assert_eq!(
            intended_offset(3, 1, 0, 1),
            Duration::from_nanos(333_333_333)
        );
        assert_eq!(
            intended_offset(3, 1, 0, 3_000_000),
            Duration::from_secs(1_000_000)
        );
        // Fewer requests than connections per second: each connection waits longer.
        assert_eq!(intended_offset(1, 10, 9, 1), Duration::from_secs(19));
        // first_index_from inverts it.
        for (rate, n) in [
            (1000, 4),
            (3, 1),
            (7, 3),
            (1, 10),
            (RATE_MAX, CONNECTIONS_MAX),
        ] {
            for c in [0, 1, n - 1] {
                for i in 0..50 {
                    let at = intended_offset(rate, n, c, i);
                    assert_eq!(first_index_from(rate, n, c, at), i, "{rate} {n} {c} {i}");
                    if let Some(before) = at.checked_sub(Duration::from_nanos(1)) {
                        assert_eq!(first_index_from(rate, n, c, before), i);
                    }
                    let after = at + Duration::from_nanos(1);
                    assert_eq!(first_index_from(rate, n, c, after), i + 1);
                }
            }
        }
        assert_eq!(
            first_index_from(1000, 1, 0, Duration::from_millis(3500)),
            3500
        );
    }

    #[test]
    fn hgrm_format() {
        let mut h = Histogram::new_from(&Templates::new().unwrap().latency);
        for us in [100, 200, 300, 400] {
            h.record(us).unwrap();
        }
        let text = hgrm_text(&h);
        println!("{text}");
        let expected = concat!(
            "       Value     Percentile TotalCount 1/(1-Percentile)\n",
            "\n",
            "       0.100 0.000000000000          1           1.00\n",
            "HGRM_ROWS",
            "#[Mean    =        0.250, StdDeviation   =        0.112]\n",
            "#[Max     =        0.400, Total count    =            4]\n",
            "#[Buckets =           16, SubBuckets     =         2048]\n",
        );
        let (head, tail) = expected.split_once("HGRM_ROWS").unwrap();
        assert!(text.starts_with(head), "{text}");
        assert!(text.ends_with(tail), "{text}");
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .skip(2)
            .collect();
        assert_eq!(
            rows.last().copied(),
            Some("       0.400 1.000000000000          4")
        );
        for row in &rows[..rows.len() - 1] {
            let columns: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(columns.len(), 4, "{row}");
            assert_eq!(row.len(), 12 + 1 + 14 + 1 + 10 + 1 + 14, "{row}");
            let quantile: f64 = columns[1].parse().unwrap();
            let inverse: f64 = columns[3].parse().unwrap();
            assert!((inverse - 1.0 / (1.0 - quantile)).abs() < 0.01, "{row}");
        }
        assert_eq!(text, HGRM_SMALL, "{text}");
        // An empty histogram: header and trailer only.
        h.reset();
        assert!(hgrm_text(&h).contains("#[Max     =        0.000, Total count    =            0]"));
    }

    #[test]
    fn progress_lines() {
        let line = ProgressLine {
            elapsed_s: 3.2,
            tps: 412_345.4,
            answers: 1_234_567,
            errors: 0,
            timeouts: 0,
            p99_us: Some(1_400),
            phase: "",
        };
        assert_eq!(
            line.render(),
            "[  3s] 412,345 tps  answers 1,234,567  errors 0  timeouts 0  p99 1.4 ms"
        );
        let warmup = ProgressLine {
            p99_us: None,
            phase: "warmup",
            ..line
        };
        assert!(warmup.render().ends_with("p99 -  (warmup)"));
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(12_345_678), "12,345,678");
    }

    #[test]
    fn latency_chart() {
        let mut histogram = Histogram::new_from(&Templates::new().unwrap().latency);
        for i in 1..=10_000u64 {
            histogram
                .record(200 + i % 300 + if i % 100 == 0 { 50_000 } else { 0 })
                .unwrap();
        }
        let summary = Summary {
            sent: 10_000,
            approved: 10_000,
            declined: 0,
            errors: 0,
            timeouts: 0,
            tps: 1000.0,
            elapsed_ms: 10_000,
            latency_us: Latency::of(&histogram),
            codes: BTreeMap::new(),
            rate: Some(1000),
            connections: 1,
            window: 2000,
            warmup_ms: 0,
            duration_ms: 10_000,
            send_rate: 1000.0,
            send_lag_us: Latency::default(),
            unsent: 0,
            behind: false,
            histogram,
        };
        let path = std::env::temp_dir().join(format!("loadgen-chart-{}.svg", std::process::id()));
        write_plot(&path, &summary).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        if std::env::var_os("KEEP_CHART").is_none() {
            let _ = std::fs::remove_file(&path);
        }
        assert!(svg.starts_with("<svg"), "{svg}");
        for label in [
            "0%",
            "90%",
            "99%",
            "99.9%",
            "99.99%",
            "99.999%",
            "latency (ms)",
        ] {
            assert!(
                svg.contains(&format!(">\n{label}\n</text>")),
                "{label} missing: {svg}"
            );
        }
        assert!(svg.contains("open loop 1,000 requests/s, 1 connection, window 2,000"));
        assert!(svg.contains("<polyline"), "{svg}");
        assert_eq!(percentile_label(4), "99.99%");
    }

    const HGRM_SMALL: &str = concat!(
        "       Value     Percentile TotalCount 1/(1-Percentile)\n",
        "\n",
        "       0.100 0.000000000000          1           1.00\n",
        "       0.100 0.100000000000          1           1.11\n",
        "       0.100 0.200000000000          1           1.25\n",
        "       0.200 0.300000000000          2           1.43\n",
        "       0.200 0.400000000000          2           1.67\n",
        "       0.200 0.500000000000          2           2.00\n",
        "       0.300 0.550000000000          3           2.22\n",
        "       0.300 0.600000000000          3           2.50\n",
        "       0.300 0.650000000000          3           2.86\n",
        "       0.300 0.700000000000          3           3.33\n",
        "       0.400 0.750000000000          4           4.00\n",
        "       0.400 1.000000000000          4\n",
        "#[Mean    =        0.250, StdDeviation   =        0.112]\n",
        "#[Max     =        0.400, Total count    =            4]\n",
        "#[Buckets =           16, SubBuckets     =         2048]\n",
    );
}
