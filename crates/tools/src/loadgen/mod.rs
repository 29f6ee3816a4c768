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
//! generator's share can be told from the server's. Tasks sleep until the next intended time
//! of any of their connections rather than ticking every millisecond, so at low rates the
//! delay stays at the timer's resolution. If sends lag more than [`BEHIND_LAG_MS`] (1 s of requests), or requests
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
//! Tasks: up to [`LOAD_TASKS_MIN`] connections get a task each; beyond that each task
//! drives several (at most [`CONNECTIONS_PER_TASK_MAX`]): one timer (a heap of its
//! connections' next intended times), one read in flight per connection and at most one
//! write, one tally and one set of histograms. So 10,000 connections are about 160 tasks
//! with a few megabytes of histograms, and the generator keeps its schedule where one task
//! (and 200 KB of histograms) per connection fell seconds behind.
//!
//! Live progress (`progress`): each task hands its recent latencies and counts to a
//! shared accumulator every [`LIVE_FLUSH_MS`] with `try_lock` (never waiting on it); a task
//! prints one line per second on stderr.

mod connection;
mod plot;
mod progress;
mod schedule;
mod summary;

pub use plot::{hgrm_text, write_plot};
pub use schedule::{first_index_from, intended_offset};
pub use summary::{Latency, Summary};

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use switchyard::tls;
use switchyard::wire::{Dialect, EncodeError, FrameError, Framing, Header, MessageHeader};

use connection::{group, RequestValues, WireClock};
use progress::{report_progress, Recent};
use summary::Tally;

/// How long a TCP connect plus TLS handshake may take, in milliseconds.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Largest window per connection (requests in flight); well below the 999,999 STANs.
pub const WINDOW_MAX: usize = 100_000;
/// Largest number of connections one run opens.
pub const CONNECTIONS_MAX: usize = 10_000;
/// Connections one load task drives at most: they share its timer (the earliest send
/// due among them), its tally and its histograms, so that 10,000 connections cost
/// about 160 tasks, not 10,000, and a few megabytes of histograms, not two gigabytes.
pub const CONNECTIONS_PER_TASK_MAX: usize = 64;
/// Tasks the connections are spread over before tasks take several each (enough to
/// keep every worker thread busy).
pub const LOAD_TASKS_MIN: usize = 16;
/// Largest open-loop rate, in requests per second over all connections.
pub const RATE_MAX: u64 = 10_000_000;
/// Longest run: warmup + duration + answer timeout, in seconds (one week).
pub const RUN_MAX_S: u64 = 7 * 86_400;
/// Largest latency the histograms record, in microseconds (60 s, as the switch's own
/// histograms); longer ones are clamped.
pub use switchyard::telemetry::LATENCY_MAX_US;
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
/// How long closing a connection (TLS close_notify) may take, in milliseconds.
const CLOSE_TIMEOUT_MS: u64 = 1_000;
/// Coarsest interval between scans for timed-out requests, in milliseconds.
const EXPIRY_TICK_MAX_MS: u64 = 50;

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
    /// Header between the length and each message: a TPDU (`60 0001 0000`) or a
    /// fixed header (ASCII zeros); the answers' is read past.
    pub header: MessageHeader,
    /// DE49, ISO 4217 numeric, e.g. `*b"978"`.
    pub currency: [u8; 3],
    /// Every Nth request of a connection uses an amount ending in 51 (the bank simulator
    /// declines it); 0 = never.
    pub decline_every: u32,
    /// The acquirer's keys: each request carries a PIN block (PIN 1234, under
    /// the PIN key, one per PAN, made once) and a MAC. Answers' MACs are not
    /// checked (the switch's are, by the tests).
    pub keys: Option<LoadKeys>,
}

/// The keys the load generator's acquirers use.
#[derive(Clone, Debug)]
pub struct LoadKeys {
    /// The MAC key (and the PIN key, for [`LoadKeys::pin_block`]).
    pub acquirer: switchyard::security::LinkKeys,
    /// The PIN block format and its key, clear (a test key).
    pub pin: (
        switchyard_security::pin::Format,
        Arc<switchyard_security::Key>,
    ),
}

impl LoadKeys {
    /// PIN 1234 for `pan`, enciphered.
    fn pin_block(&self, pan: &str) -> anyhow::Result<switchyard_security::pin::PinBlock> {
        use switchyard_security::pin;
        let (format, key) = &self.pin;
        pin::encipher(*format, key, b"1234", pan.as_bytes(), &mut pin::random_fill)
            .map_err(|e| anyhow::anyhow!("PIN block for the load: {e}"))
    }
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
            header: MessageHeader::None,
            currency: *b"978",
            decline_every: 20,
            keys: None,
        }
    }
}

impl LoadOptions {
    /// The bytes sent as [`LoadOptions::header`].
    pub fn header_sent(&self) -> Header {
        let bytes: &[u8] = match self.header {
            MessageHeader::None => &[],
            MessageHeader::Tpdu => &[0x60, 0x00, 0x01, 0x00, 0x00],
            MessageHeader::Fixed(n) => &b"00000000000000000000000000000000"[..usize::from(n)],
        };
        Header::from_slice(bytes).unwrap_or_default()
    }
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
    /// A PIN block per PAN, with [`LoadOptions::keys`].
    pin_blocks: Vec<switchyard_security::pin::PinBlock>,
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
    fn new(
        opts: LoadOptions,
        pans: Vec<String>,
        templates: Templates,
        start: Instant,
    ) -> anyhow::Result<Plan> {
        let pin_blocks = match &opts.keys {
            Some(keys) => pans
                .iter()
                .map(|p| keys.pin_block(p))
                .collect::<anyhow::Result<_>>()?,
            None => Vec::new(),
        };
        let measure_from = start + opts.warmup;
        let send_until = measure_from + opts.duration;
        let tick_ms = u64::try_from(opts.answer_timeout.as_millis() / 4).unwrap_or(u64::MAX);
        Ok(Plan {
            pin_blocks,
            expiry_tick: Duration::from_millis(tick_ms.clamp(1, EXPIRY_TICK_MAX_MS)),
            drain_until: send_until + opts.answer_timeout,
            live: Mutex::new(Recent::new(&templates)),
            start,
            measure_from,
            send_until,
            templates,
            pans,
            opts,
        })
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
    let plan = Arc::new(Plan::new(opts, pans, templates, Instant::now())?);
    let (stop_progress, progress) = if plan.opts.progress {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(report_progress(plan.clone(), stopped));
        (Some(stop), Some(task))
    } else {
        (None, None)
    };
    let mut total = Tally::new(&plan.templates);
    let mut open = Vec::with_capacity(streams.len());
    for (index, stream) in streams.into_iter().enumerate() {
        match stream {
            Ok(stream) => open.push((index, stream)),
            Err(e) => {
                tracing::warn!(connection = index, error = %e, "load generator: cannot connect");
                total.errors += 1;
                if let Some(rate) = plan.opts.rate {
                    total.unsent += plan.scheduled_measured(rate, index);
                }
            }
        }
    }
    let mut tasks = JoinSet::new();
    let per_task = connections_per_task(open.len());
    let mut open = open.into_iter().peekable();
    while open.peek().is_some() {
        let members: Vec<_> = open.by_ref().take(per_task).collect();
        tasks.spawn(group(plan.clone(), members));
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

/// How many connections each load task drives: one each up to [`LOAD_TASKS_MIN`]
/// connections, then as many as it takes to keep to that many tasks, up to
/// [`CONNECTIONS_PER_TASK_MAX`] each (more tasks beyond that).
fn connections_per_task(connections: usize) -> usize {
    connections
        .div_ceil(LOAD_TASKS_MIN)
        .clamp(1, CONNECTIONS_PER_TASK_MAX)
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
    if run.is_none_or(|r| r > Duration::from_secs(RUN_MAX_S)) {
        bail!("warmup + duration + answer timeout must be at most {RUN_MAX_S} s");
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
            secured: None,
        };
        values.encode(
            &opts.dialect,
            opts.framing,
            opts.header_sent().as_bytes(),
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

/// Where `switchyard loadgen` reports besides its summary.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The summary as one JSON object instead of text.
    pub json: bool,
    /// Write the latency distribution in HdrHistogram's .hgrm text format (ms).
    pub hgrm: Option<std::path::PathBuf>,
    /// Write an SVG chart of latency by percentile.
    pub plot: Option<std::path::PathBuf>,
}

/// `switchyard loadgen`: runs `opts`, writes the files `report` asks for, warns on
/// stderr when the generator fell behind its schedule, and returns the summary to
/// print.
pub async fn run_and_report(opts: LoadOptions, report: &Report) -> anyhow::Result<String> {
    let summary = run(opts).await?;
    if let Some(warning) = summary.behind_warning() {
        eprintln!("warning: {warning}");
    }
    if let Some(path) = &report.hgrm {
        std::fs::write(path, hgrm_text(&summary.histogram))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &report.plot {
        write_plot(path, &summary).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.json {
        summary.full_json()
    } else {
        summary.render()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::banksim::{self, BankSimOptions, BankStats, Behavior};
    use crate::certs::DevCa;
    use std::sync::atomic::Ordering;
    use switchyard::wire::FRAME_SIZE_MAX_BYTES_DEFAULT;
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
            header: switchyard::wire::MessageHeader::None,
            frame_size_max_bytes: FRAME_SIZE_MAX_BYTES_DEFAULT,
            seed: 42,
            keys: None,
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

    /// Connections spread over tasks of several each keep the open loop's schedule
    /// exactly (as `open_loop_sends_its_schedule`) and the closed loop's windows full.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_connections_share_tasks_and_keep_the_schedule() {
        assert_eq!(connections_per_task(8), 1);
        assert_eq!(connections_per_task(1_000), 63);
        assert_eq!(
            connections_per_task(CONNECTIONS_MAX),
            CONNECTIONS_PER_TASK_MAX
        );
        let (bank, identity) = bank(Arc::new(Behavior::default())).await;
        let mut opts = options(bank.addr, identity.clone());
        opts.connections = 100; // 7 a task
        opts.rate = Some(2000);
        opts.warmup = Duration::from_millis(200);
        opts.duration = Duration::from_millis(500);
        let summary = run(opts).await.unwrap();
        let shown = summary.render();
        assert_eq!(summary.sent + summary.unsent, 1000, "{shown}");
        assert_eq!(summary.errors + summary.timeouts, 0, "{shown}");
        assert_eq!(summary.sent, summary.approved + summary.declined, "{shown}");
        assert_eq!(bank.stats.connections.load(Ordering::Relaxed), 100);
        assert_eq!(
            bank.stats.answered.load(Ordering::Relaxed),
            summary.sent + 400,
            "{shown}"
        );
        // Closed loop: every connection of a task keeps its window full.
        let mut opts = options(bank.addr, identity);
        opts.connections = 40;
        opts.duration = Duration::from_millis(300);
        let summary = run(opts).await.unwrap();
        let shown = summary.render();
        assert!(summary.sent >= 40 * 8, "{shown}");
        assert_eq!(summary.errors + summary.timeouts, 0, "{shown}");
        assert_eq!(summary.sent, summary.approved + summary.declined, "{shown}");
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
}
