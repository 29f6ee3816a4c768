//! Bank connectors: a bounded lock-free queue per bank, drained by that bank's
//! TLS links, each with its own in-flight table and deadline sweep.
//!
//! Producers (acquirer sessions) `push` then `notify_one`; a link's writer drains
//! the queue in batches, gives each request a STAN unique on that link, and writes
//! the batch with one flush. The link's reader matches answers by STAN and sweeps
//! deadlines in order from one heap (no timer per request).

use super::journaling::{Journaling, OutcomeSource};
use super::saf::{Advice, Saf};
use super::{Awaiting, OriginalStan, Pending, Recent, Reply, Stored};
use crate::config::{Bank, LINKS_MAX};
use crate::core::dedup::DuplicateKey;
use crate::core::inflight::{InflightTable, Stan, TableFull};
use crate::core::reversal::encode_reversal_advice;
use crate::core::reversal::rewrite_de90;
use crate::core::route::BankIndex;
use crate::core::ResponseCode;
use crate::telemetry::{ConnectorLatency, LatencyRecorder, Sample};
use crate::wire::{reencode, Change, Dialect, Encoder, FrameDecoder, Message, Mti};
use bytes::BytesMut;
use crossbeam_queue::ArrayQueue;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

/// Read buffer of one bank link, bytes (rustls hands over 4 KiB at a time).
const LINK_READ_BUFFER_BYTES: usize = 64 * 1024;
/// While no link is up, how often a reconnecting link checks for stranded requests.
const STRANDED_CHECK_INTERVAL_MS: u64 = 20;
/// How often a retiring link looks whether its last request in flight has ended.
const RETIRE_POLL: Duration = Duration::from_millis(20);
/// Longest wait for a bank's answer to a sign-off (else the echo timeout).
pub const SIGN_OFF_WAIT_MAX: Duration = Duration::from_secs(1);

/// Counters of one connector (also exported as metrics).
#[derive(Default, Debug)]
pub struct ConnectorStats {
    /// Requests written to the bank.
    pub forwarded: AtomicU64,
    /// Bank answers returned to acquirers.
    pub answered: AtomicU64,
    /// Requests answered 68 at their deadline.
    pub timed_out: AtomicU64,
    /// Requests answered 91 (no link, queue full, link lost).
    pub unavailable: AtomicU64,
    /// Bank answers that matched nothing in flight (late or unknown).
    pub unmatched: AtomicU64,
    /// Reversal advices the bank acknowledged (0430).
    pub reversals_acked: AtomicU64,
}

/// Where a connector records outcomes: the journal and the recent-requests table.
#[derive(Clone)]
pub struct Bookkeeping {
    /// The journal.
    pub journaling: Journaling,
    /// Recent requests, for retransmissions and reversals.
    pub recent: Arc<Recent>,
    /// Where bank STANs start (1..=999,999): derived from the journal's position,
    /// so that a restart does not reuse the STANs a bank saw just before.
    pub first_stan: u32,
}

/// What a link is waiting on under a STAN (requests dominate; boxing would
/// allocate per request).
#[allow(clippy::large_enum_variant)]
enum Waiter {
    Acquirer(Pending),
    Echo,
    SignOff,
    Reversal(Advice),
}

/// One bank's connector, shared by the acquirer sessions (producers) and its links.
pub struct Connector {
    bank: Bank,
    acquirer_dialect: Arc<Dialect>,
    /// The client TLS config new links connect with (a reload may replace it).
    tls: std::sync::RwLock<Arc<rustls::ClientConfig>>,
    queue: ArrayQueue<Pending>,
    notify: Notify,
    links_up: AtomicUsize,
    link_changed: Arc<Notify>,
    frame_size_max_bytes: usize,
    /// Counters.
    pub stats: ConnectorStats,
    /// Latency histograms (time in the switch, at the bank, total).
    pub latency: ConnectorLatency,
    /// Requests in flight on each link slot ([`LINKS_MAX`] slots).
    inflight_by_link: Vec<AtomicUsize>,
    /// The link tasks: which slots are taken, each running link's retire token,
    /// and every task's handle (joined at shutdown).
    links: Mutex<LinkSet>,
    /// Whether `/readyz` ignores this bank (a reload may change it).
    optional: AtomicBool,
    /// Set when a reload removed or replaced the bank: its links finish what they
    /// carry and close, and it takes nothing new.
    retired: AtomicBool,
    /// The connector that replaced this one (same bank, new link settings): what
    /// this one is handed after it retired goes there.
    successor: std::sync::OnceLock<Arc<Connector>>,
    /// This connector's index in the daemon's list.
    index: BankIndex,
    /// Where forwards and outcomes are recorded.
    journaling: Journaling,
    /// Reversal advices waiting to be sent.
    saf: Saf,
    /// Recent requests, for retransmissions and reversals.
    recent: Arc<Recent>,
    /// The next STAN for this bank, shared by its links: STANs are unique per
    /// bank (not per link), and continue across restarts (seeded from the journal).
    next_stan: AtomicU32,
    /// The request deadline, ms (`request_timeout_ms`; a reload may change it).
    request_timeout_ms: AtomicU64,
}

impl Connector {
    /// A connector for `bank`; `link_changed` is notified whenever a link goes up or down.
    pub fn new(
        index: BankIndex,
        bank: Bank,
        acquirer_dialect: Arc<Dialect>,
        tls: Arc<rustls::ClientConfig>,
        frame_size_max_bytes: usize,
        link_changed: Arc<Notify>,
        books: Bookkeeping,
    ) -> Arc<Connector> {
        let Bookkeeping {
            journaling,
            recent,
            first_stan,
        } = books;
        // A test's configured start wins (wrap-around tests); else the journal's.
        let first_stan = if bank.first_stan > 1 {
            bank.first_stan
        } else {
            first_stan
        };
        let inflight_by_link = (0..LINKS_MAX).map(|_| AtomicUsize::new(0)).collect();
        let request_timeout_ms = bank.request_timeout.as_millis() as u64;
        let saf_limits = bank.saf.clone();
        let optional = bank.optional;
        Arc::new(Connector {
            queue: ArrayQueue::new(bank.queue_depth_max),
            bank,
            acquirer_dialect,
            tls: std::sync::RwLock::new(tls),
            notify: Notify::new(),
            links: Mutex::new(LinkSet::default()),
            optional: AtomicBool::new(optional),
            retired: AtomicBool::new(false),
            successor: std::sync::OnceLock::new(),
            links_up: AtomicUsize::new(0),
            link_changed,
            frame_size_max_bytes,
            stats: ConnectorStats::default(),
            latency: ConnectorLatency::default(),
            inflight_by_link,
            index,
            journaling,
            saf: Saf::new(saf_limits),
            recent,
            // `next_stan` hands out `counter % STAN_MAX + 1`.
            next_stan: AtomicU32::new(first_stan.saturating_sub(1)),
            request_timeout_ms: AtomicU64::new(request_timeout_ms),
        })
    }

    /// The deadline of a request to this bank, from its receipt.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.load(Ordering::Relaxed))
    }

    /// Changes the request deadline (a reload); requests in flight keep theirs.
    pub fn set_request_timeout(&self, timeout: Duration) {
        self.request_timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// The bank's configuration (as when the connector was made: `links`,
    /// `request_timeout` and `optional` may since have been changed by a reload).
    pub fn bank(&self) -> &Bank {
        &self.bank
    }

    /// This connector's slot in the daemon's list.
    pub fn index(&self) -> BankIndex {
        self.index
    }

    /// Whether the switch is ready without a link to this bank.
    pub fn is_optional(&self) -> bool {
        self.optional.load(Ordering::Relaxed)
    }

    /// Whether a reload removed or replaced this bank.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Puts a reloaded bank's changeable settings in force: the request deadline,
    /// `optional`, and the number of links.
    pub fn apply(self: &Arc<Self>, bank: &Bank) {
        self.set_request_timeout(bank.request_timeout);
        self.optional.store(bank.optional, Ordering::Relaxed);
        self.resize_links(bank.links);
    }

    /// Replaces the client TLS config that new links connect with.
    pub fn set_tls(&self, tls: Arc<rustls::ClientConfig>) {
        *self
            .tls
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tls;
    }

    /// The STAN counter's position, for a connector that replaces this one (the
    /// bank must not see a STAN again).
    pub fn stan_position(&self) -> u32 {
        self.next_stan.load(Ordering::Relaxed) % crate::core::inflight::STAN_MAX + 1
    }

    /// Whether this retired connector has stopped: no link task left, nothing
    /// queued. A reload then keeps a [`Connector::tombstone`] in its slot.
    pub fn is_stopped(&self) -> bool {
        self.is_retired() && lock(&self.links).busy == 0 && self.queue.is_empty()
    }

    /// Whether this is a tombstone (the only connectors with no links: the
    /// config requires at least one).
    pub fn is_tombstone(&self) -> bool {
        self.bank.links == 0
    }

    /// A stand-in for this stopped connector: the same slot, bank id and dialect
    /// (for the answers and reversals that name the slot), without the memory
    /// of its queue and histograms. It takes nothing (91).
    pub fn tombstone(&self) -> Arc<Connector> {
        let mut bank = self.bank.clone();
        bank.queue_depth_max = 1;
        bank.links = 0;
        let tls = self
            .tls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let c = Connector::new(
            self.index,
            bank,
            self.acquirer_dialect.clone(),
            tls,
            self.frame_size_max_bytes,
            self.link_changed.clone(),
            Bookkeeping {
                journaling: self.journaling.clone(),
                recent: self.recent.clone(),
                first_stan: self.stan_position(),
            },
        );
        c.retired.store(true, Ordering::Release);
        c
    }

    /// Links running, retiring ones not counted.
    pub fn links_configured(&self) -> usize {
        lock(&self.links).active.len()
    }

    /// Takes the bank out of service: no new request is queued (they are answered
    /// 91), and every link finishes what it carries, signs off and closes.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        let mut set = lock(&self.links);
        for (_, retire) in set.active.drain(..) {
            retire.cancel();
        }
        drop(set);
        self.notify.notify_waiters();
    }

    /// Retires this connector in favour of `successor` (the same bank with new
    /// link settings): requests queued here, and reversal advices waiting or
    /// coming back from its retiring links, go to the successor.
    pub fn retire_into(&self, successor: Arc<Connector>) {
        let _ = self.successor.set(successor);
        self.retire();
        self.hand_over();
    }

    /// Moves queued requests and waiting reversal advices to the successor, if
    /// there is one.
    fn hand_over(&self) {
        let Some(next) = self.successor.get() else {
            return;
        };
        while let Some(mut p) = self.queue.pop() {
            p.bank = next.index;
            next.submit(p);
        }
        let now = std::time::Instant::now();
        let mut advices = Vec::new();
        self.saf.take_due(
            now + Duration::from_secs(86_400 * 365),
            usize::MAX,
            &mut advices,
        );
        for advice in advices {
            next.push_advice(advice, now);
        }
    }

    /// Runs `n` links (1..=[`LINKS_MAX`]): starts more, or retires the newest; a
    /// retiring link takes no new request, and closes once its requests in flight
    /// are answered or timed out.
    pub fn resize_links(self: &Arc<Self>, n: usize) {
        let n = n.min(LINKS_MAX);
        let mut set = lock(&self.links);
        let Some(shutdown) = set.shutdown.clone() else {
            return; // not started: spawn_links starts `bank.links`
        };
        if self.is_retired() {
            return;
        }
        set.target = n;
        while set.active.len() > n {
            if let Some((slot, retire)) = set.active.pop() {
                info!(bank = %self.bank.id, link = slot, "bank link retiring (reload)");
                retire.cancel();
            }
        }
        self.notify.notify_waiters();
        while set.active.len() < n {
            if !self.spawn_link(&mut set, &shutdown) {
                // Started as retiring links free their slots (see `link_slot`).
                crate::log_limited!(warn, bank = %self.bank.id, wanted = n,
                    "no free link slot while older links retire: the rest start as they close");
                break;
            }
        }
    }

    /// Starts one link on a free slot; false when all slots are taken.
    fn spawn_link(self: &Arc<Self>, set: &mut LinkSet, shutdown: &CancellationToken) -> bool {
        let Some(slot) = (0..LINKS_MAX).find(|&i| set.busy & (1 << i) == 0) else {
            return false;
        };
        set.busy |= 1 << slot;
        let retire = CancellationToken::new();
        set.active.push((slot, retire.clone()));
        set.tasks.retain(|t| !t.is_finished());
        let task = tokio::spawn(self.clone().link_slot(slot, shutdown.clone(), retire));
        set.tasks.push(task);
        true
    }

    /// Waits for every link task to end (after shutdown).
    pub async fn join_links(&self) {
        let tasks = std::mem::take(&mut lock(&self.links).tasks);
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Links currently up.
    pub fn links_up(&self) -> usize {
        self.links_up.load(Ordering::Acquire)
    }

    /// Reversal advices waiting to be sent (not counting those awaiting a 0430).
    pub fn reversals_waiting(&self) -> usize {
        self.saf.len()
    }

    /// Requests in flight on each running or retiring link: (slot, count).
    pub fn inflight_by_link(&self) -> Vec<(usize, usize)> {
        let busy = lock(&self.links).busy;
        (0..LINKS_MAX)
            .filter(|&i| busy & (1 << i) != 0)
            .map(|i| (i, self.inflight_by_link[i].load(Ordering::Relaxed)))
            .collect()
    }

    /// Requests in flight on all links.
    pub fn inflight(&self) -> usize {
        self.inflight_by_link
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Hands a request to the bank's links, or answers 91 at once when no link is up
    /// or the queue is full.
    pub fn submit(&self, mut pending: Pending) {
        if self.is_retired() {
            if let Some(next) = self.successor.get() {
                pending.bank = next.index;
                return next.submit(pending);
            }
        }
        if self.links_up() == 0 || self.is_retired() {
            self.unavailable(pending, "no link up");
            return;
        }
        match self.queue.push(pending) {
            Ok(()) => self.notify.notify_one(),
            Err(pending) => self.unavailable(pending, "queue full"),
        }
    }

    fn unavailable(&self, pending: Pending, why: &'static str) {
        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("switchyard_connector_unavailable_total", "reason" => why).increment(1);
        self.answer(
            pending,
            ResponseCode::DestinationUnavailable,
            OutcomeSource::Switch,
        );
    }

    /// Answers a request of this connector with a switch-produced code (after
    /// journaling the outcome, and recording it for retransmissions).
    pub fn decline(&self, p: Pending, code: ResponseCode) {
        self.answer(p, code, OutcomeSource::Switch);
    }

    /// The next STAN candidate for this bank (wraps from 999,999 to 1).
    fn next_stan(&self) -> u32 {
        let n = self.next_stan.fetch_add(1, Ordering::Relaxed);
        n % crate::core::inflight::STAN_MAX + 1
    }

    /// Answers 91 to a request the journal could not record as accepted (nothing
    /// more is journaled for it).
    pub fn refuse_unjournaled(&self, p: Pending) {
        let code = ResponseCode::DestinationUnavailable;
        if p.registered {
            self.settle(&p.request, Stored::Switch(code), 0);
        }
        p.answer_with(code, 0);
    }

    /// Answers with a switch-produced code after journaling the outcome.
    fn answer(&self, p: Pending, code: ResponseCode, source: OutcomeSource) {
        let seq = self
            .journaling
            .outcome(p.request_id, code.as_bytes(), source, None);
        if p.registered {
            self.settle(&p.request, Stored::Switch(code), seq);
        }
        p.answer_with(code, seq);
    }

    /// Records the outcome of `request` in the duplicates table and serves what
    /// waited on it: retransmissions get the same answer, a reversal goes where the
    /// original went (or is answered 00 when the switch answered the original: it
    /// never reached the bank, or the switch's own reversal advice is queued).
    fn settle(&self, request: &Message, stored: Stored, seq: u64) {
        let Some(key) = DuplicateKey::of(request) else {
            return;
        };
        for waiter in self.recent.complete(&key, stored.clone(), seq) {
            match waiter {
                Awaiting::Duplicate { request, reply } => {
                    metrics::counter!("switchyard_duplicates_total", "result" => "answered_once")
                        .increment(1);
                    reply.send(stored.reply_to(request, &self.bank.dialect, seq));
                }
                Awaiting::Reversal(mut reversal) => match &stored {
                    Stored::Bank { link_stan, .. } => {
                        reversal.bank = self.index;
                        reversal.original_link_stan = Some(*link_stan);
                        self.submit(reversal);
                    }
                    Stored::Switch(_) => {
                        self.answer(reversal, ResponseCode::Approved, OutcomeSource::Switch)
                    }
                },
            }
        }
    }

    /// Starts the configured links; they run until `shutdown` (or a reload retires
    /// them). [`Connector::join_links`] waits for them.
    pub fn spawn_links(self: &Arc<Self>, shutdown: &CancellationToken) {
        let mut set = lock(&self.links);
        set.shutdown = Some(shutdown.clone());
        set.target = self.bank.links.min(LINKS_MAX);
        for _ in 0..self.bank.links.min(LINKS_MAX) {
            self.spawn_link(&mut set, shutdown);
        }
    }

    /// Keeps link `index` connected: connect, run, back off, reconnect; ends at
    /// shutdown or once retired, and frees its slot.
    async fn link_slot(
        self: Arc<Self>,
        index: usize,
        shutdown: CancellationToken,
        retire: CancellationToken,
    ) {
        self.keep_link(index, &shutdown, &retire).await;
        let last = {
            let mut set = lock(&self.links);
            set.busy &= !(1 << index);
            // A pool grown while all slots were taken gets the slot freed here.
            if !self.is_retired() && !shutdown.is_cancelled() && set.active.len() < set.target {
                self.spawn_link(&mut set, &shutdown);
            }
            set.busy == 0
        };
        if self.is_retired() && last {
            self.hand_over();
            self.drain_stranded();
            let waiting = self.saf.len();
            if waiting > 0 {
                metrics::counter!("switchyard_reversals_parked_total").increment(waiting as u64);
                error!(bank = %self.bank.id, waiting,
                    "bank removed by a reload with reversal advices unsent: parked, follow up with the bank (they are in the journal)");
            }
        }
    }

    async fn keep_link(
        &self,
        index: usize,
        shutdown: &CancellationToken,
        retire: &CancellationToken,
    ) {
        let mut backoff = self.bank.reconnect_backoff_min;
        while !shutdown.is_cancelled() && !retire.is_cancelled() {
            let connect = async {
                match self.connect().await {
                    Ok(stream) => self.sign_on(stream).await,
                    Err(e) => Err(e),
                }
            };
            let connected = tokio::select! {
                c = connect => c,
                _ = retire.cancelled() => return,
            };
            match connected {
                Ok(stream) => {
                    backoff = self.bank.reconnect_backoff_min;
                    info!(bank = %self.bank.id, link = index, "bank link up");
                    self.links_up.fetch_add(1, Ordering::AcqRel);
                    self.link_changed.notify_waiters();
                    let up = AtomicBool::new(true);
                    let why = self.run_link(stream, shutdown, retire, index, &up).await;
                    self.link_down(&up);
                    let left = self.links_up();
                    if matches!(why, LinkEnd::Shutdown) {
                        info!(bank = %self.bank.id, link = index, "bank link closed for shutdown");
                    } else if matches!(why, LinkEnd::Retired) {
                        info!(bank = %self.bank.id, link = index, "bank link retired: signed off and closed");
                        return;
                    } else {
                        crate::log_limited!(warn, bank = %self.bank.id, link = index, reason = %why, links_up = left, "bank link down");
                    }
                    if left == 0 {
                        self.drain_stranded();
                    }
                }
                Err(e) => {
                    debug!(bank = %self.bank.id, link = index, error = %e, "bank connect failed");
                }
            }
            let until = Instant::now() + backoff;
            backoff = (backoff * 2).min(self.bank.reconnect_backoff_max);
            tokio::select! {
                _ = self.wait_backoff(until, shutdown) => {}
                _ = retire.cancelled() => return,
            }
        }
    }

    /// Counts a link down once (the writer does so when it starts retiring, so
    /// that nothing new is queued for a bank whose links all retire).
    fn link_down(&self, up: &AtomicBool) {
        if up.swap(false, Ordering::AcqRel) {
            self.links_up.fetch_sub(1, Ordering::AcqRel);
            self.link_changed.notify_waiters();
        }
    }

    /// Sleeps until `until`, answering 91 to anything stranded in the queue while no
    /// link is up (a request pushed just as the last link fell).
    async fn wait_backoff(&self, until: Instant, shutdown: &CancellationToken) {
        let step = Duration::from_millis(STRANDED_CHECK_INTERVAL_MS);
        loop {
            if self.links_up() == 0 {
                self.drain_stranded();
            }
            let now = Instant::now();
            if now >= until {
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(until.min(now + step)) => {}
            }
        }
    }

    fn drain_stranded(&self) {
        while let Some(p) = self.queue.pop() {
            self.unavailable(p, "link lost");
        }
    }

    /// Signs on (0800, DE70 001) on a new link and waits for the bank's 0810 with
    /// DE39 00, within the echo timeout; the link counts as up only then.
    async fn sign_on(
        &self,
        mut stream: TlsStream<TcpStream>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let refused =
            |why: &str| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, why.to_owned());
        let stan = Stan::from_value(self.next_stan()).ok_or_else(|| refused("no STAN"))?;
        let mut out = BytesMut::new();
        if !self.network_message(b"001", stan, &mut out) {
            return Err(refused("sign-on cannot be encoded in the bank's dialect"));
        }
        let exchange = async {
            stream.write_all(&out).await?;
            stream.flush().await?;
            let decoder = FrameDecoder::new(self.bank.framing, self.frame_size_max_bytes);
            let mut buf = BytesMut::with_capacity(4096);
            loop {
                while let Some(frame) = decoder
                    .decode(&mut buf)
                    .map_err(|e| refused(&e.to_string()))?
                {
                    let Ok(m) = Message::decode(&self.bank.dialect, frame) else {
                        continue;
                    };
                    if m.mti() == Mti::NETWORK_RESPONSE && m.field(11) == Some(&stan.to_de11()[..])
                    {
                        return match m.field(39) {
                            Some(b"00") => Ok(()),
                            _ => Err(refused("sign-on declined by the bank")),
                        };
                    }
                }
                if stream.read_buf(&mut buf).await? == 0 {
                    return Err(refused("closed before answering the sign-on"));
                }
            }
        };
        match timeout(self.bank.echo_timeout, exchange).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "sign-on unanswered",
            )),
        }
    }

    /// Encodes an 0800 with DE70 `code` (001 sign-on, 002 sign-off, 301 echo) and
    /// DE11 `stan` into `out`, framed; false if it cannot be encoded.
    fn network_message(&self, code: &[u8; 3], stan: Stan, out: &mut BytesMut) -> bool {
        let digits = stan.to_de11();
        let at = self.bank.framing.begin(out);
        let mut enc = Encoder::new(&self.bank.dialect, out, Mti::NETWORK);
        let ok = enc.field(7, &transmission_time()).is_ok()
            && enc.field(11, &digits).is_ok()
            && enc.field(70, code).is_ok();
        if ok {
            enc.finish();
        }
        let ok = ok && self.bank.framing.finish(out, at).is_ok();
        if !ok {
            out.truncate(at);
        }
        ok
    }

    async fn connect(&self) -> std::io::Result<TlsStream<TcpStream>> {
        let name = rustls::pki_types::ServerName::try_from(self.bank.server_name.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let tls = self
            .tls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let connector = tokio_rustls::TlsConnector::from(tls);
        let attempt = async {
            let tcp = TcpStream::connect(self.bank.address).await?;
            tcp.set_nodelay(true)?;
            connector.connect(name, tcp).await
        };
        match timeout(self.bank.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timeout",
            )),
        }
    }

    /// Runs one connected link until it fails or shutdown; answers everything still in
    /// flight on it with 91 before returning why it ended.
    async fn run_link(
        &self,
        stream: TlsStream<TcpStream>,
        shutdown: &CancellationToken,
        retire: &CancellationToken,
        slot: usize,
        up: &AtomicBool,
    ) -> LinkEnd {
        let (rd, mut wr) = tokio::io::split(stream);
        let link = Link {
            table: Mutex::new(LinkTable {
                inflight: InflightTable::new(self.bank.inflight_per_link_max),
                sweep_at: None,
            }),
            wake_reader: Notify::new(),
            slot,
        };
        let end = tokio::select! {
            end = self.read_loop(&link, rd) => end,
            end = self.write_loop(&link, &mut wr, retire, shutdown, up) => end,
            // The writer signs off at shutdown; past this bound the link closes
            // anyway (a writer stuck on a bank that does not read).
            _ = async {
                shutdown.cancelled().await;
                tokio::time::sleep(SIGN_OFF_WAIT_MAX * 2).await;
            } => LinkEnd::Shutdown,
        };
        if matches!(end, LinkEnd::Shutdown | LinkEnd::Retired) {
            // TLS close_notify, bounded in time.
            let _ = timeout(Duration::from_secs(1), wr.shutdown()).await;
        }
        let mut table = lock(&link.table);
        let mut lost = 0u64;
        let drained: Vec<(Stan, Waiter)> = table.inflight.drain().collect();
        drop(table);
        for (stan, waiter) in drained {
            match waiter {
                Waiter::Acquirer(p) => {
                    lost += 1;
                    crate::log_limited!(warn,
                        bank = %self.bank.id, acquirer = %p.acquirer, link_stan = stan.value(),
                        "link lost with request in flight: answered 91; reversal advice queued"
                    );
                    self.queue_reversal(&p, stan);
                    self.unavailable(p, "link lost");
                }
                Waiter::Reversal(advice) => self.retry_reversal(advice),
                Waiter::Echo | Waiter::SignOff => {}
            }
        }
        let table = lock(&link.table);
        drop(table);
        self.inflight_by_link[slot].store(0, Ordering::Relaxed);
        if lost > 0 {
            crate::log_limited!(warn, bank = %self.bank.id, lost, "requests in flight on a lost link");
        }
        end
    }

    async fn read_loop(&self, link: &Link, mut rd: ReadHalf<TlsStream<TcpStream>>) -> LinkEnd {
        let decoder = FrameDecoder::new(self.bank.framing, self.frame_size_max_bytes);
        let mut buf = BytesMut::with_capacity(LINK_READ_BUFFER_BYTES);
        let mut expired = Vec::new();
        let mut recorder = self.latency.recorder();
        // Placeholder deadline for disabled `select!` branches (never awaited).
        let far = Instant::now() + Duration::from_secs(3600);
        loop {
            let sweep_at = {
                let mut table = lock(&link.table);
                let next = table.inflight.next_deadline();
                table.sweep_at = next;
                next
            };
            tokio::select! {
                biased;
                read = rd.read_buf(&mut buf) => match read {
                    Ok(0) => return LinkEnd::Closed,
                    Ok(_) => {
                        let answered_at = std::time::Instant::now();
                        loop {
                            match decoder.decode(&mut buf) {
                                Ok(Some(frame)) => {
                                    self.on_answer(link, frame, answered_at, &mut recorder)
                                }
                                Ok(None) => break,
                                Err(e) => return LinkEnd::Frame(e),
                            }
                        }
                        recorder.maybe_flush(answered_at);
                    }
                    Err(e) => return LinkEnd::Io(e),
                },
                _ = sleep_until(sweep_at.map_or(far, Instant::from_std)), if sweep_at.is_some() => {
                    let now = Instant::now().into_std();
                    {
                        let mut table = lock(&link.table);
                        table.inflight.expire(now, &mut expired);
                        self.inflight_by_link[link.slot].store(table.inflight.len(), Ordering::Relaxed);
                    }
                    for (stan, waiter) in expired.drain(..) {
                        match waiter {
                            Waiter::Acquirer(p) => self.timed_out(stan, p),
                            Waiter::Echo => return LinkEnd::EchoTimeout,
                            Waiter::SignOff => {
                                metrics::counter!("switchyard_sign_offs_total", "result" => "unanswered")
                                    .increment(1);
                                crate::log_limited!(warn, bank = %self.bank.id, "sign-off unanswered");
                            }
                            Waiter::Reversal(advice) => self.retry_reversal(advice),
                        }
                    }
                }
                _ = link.wake_reader.notified() => {}
                // Samples reach the connector within a second even when traffic stops.
                _ = sleep_until(recorder.flush_due().map_or(far, Instant::from_std)),
                    if recorder.flush_due().is_some() => {
                    recorder.flush(std::time::Instant::now());
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(LINK_READ_BUFFER_BYTES);
            }
        }
    }

    fn timed_out(&self, stan: Stan, p: Pending) {
        self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("switchyard_timeouts_total").increment(1);
        crate::log_limited!(warn,
            bank = %self.bank.id, acquirer = %p.acquirer, link_stan = stan.value(),
            mti = %p.request.mti(),
            "no answer by the deadline: acquirer answered 68; reversal advice queued"
        );
        self.queue_reversal(&p, stan);
        self.answer(p, ResponseCode::LateResponse, OutcomeSource::Timeout);
    }

    /// Queues a reversal advice for a request the bank may have seen but whose
    /// answer the acquirer will not get.
    fn queue_reversal(&self, p: &Pending, link_stan: Stan) {
        // An acquirer's reversal that did not complete: the payment it names is
        // reversed (its DE90 rewritten to the STAN the bank saw the payment under).
        let link_stan = p.original_link_stan.unwrap_or(link_stan);
        if let Err(e) =
            self.journaling
                .reversal_queued(p.request_id, self.index, link_stan, &p.request)
        {
            error!(bank = %self.bank.id, request_id = p.request_id, error = %e,
                "reversal advice not journaled; queued in memory only");
        }
        let now = std::time::Instant::now();
        let advice = Advice {
            original: p.request.clone(),
            original_link_stan: link_stan,
            request_id: p.request_id,
            attempts: 0,
            queued_at: now,
            next_try: now,
        };
        self.push_advice(advice, now);
    }

    fn push_advice(&self, advice: Advice, now: std::time::Instant) {
        metrics::counter!("switchyard_reversals_queued_total").increment(1);
        if let Err(parked) = self.saf.push(advice, now) {
            metrics::counter!("switchyard_reversals_parked_total").increment(1);
            error!(
                bank = %self.bank.id, request_id = parked.request_id, attempts = parked.attempts,
                reason = ?parked.reason, "reversal advice parked: needs manual follow-up with the bank"
            );
            return;
        }
        self.notify.notify_one();
    }

    /// After a restart, from the journal: a request forwarded without an outcome
    /// (`unfinished`: closed as 68 first) or an advice queued and never
    /// acknowledged; either way recorded as queued again.
    pub fn resume_reversal(
        &self,
        request_id: u64,
        original: Message,
        link_stan: Stan,
        unfinished: bool,
    ) {
        // Recorded again even when it was queued before the restart: the open work
        // of older segments is carried into the new one, so pruning old segments
        // never loses it. Before the 68: a crash between the two must leave the
        // reversal pending (the simulation test found the other order losing it).
        if let Err(e) = self
            .journaling
            .reversal_queued(request_id, self.index, link_stan, &original)
        {
            error!(bank = %self.bank.id, request_id, error = %e, "resumed reversal not journaled");
        }
        if unfinished {
            self.journaling
                .outcome(request_id, b"68", OutcomeSource::Timeout, None);
        }
        let now = std::time::Instant::now();
        let advice = Advice {
            original,
            original_link_stan: link_stan,
            request_id,
            // An advice pending before the restart may have reached the bank:
            // resent as a repeat (0421).
            attempts: u32::from(!unfinished),
            queued_at: now,
            next_try: now,
        };
        self.push_advice(advice, now);
    }

    /// An advice went unanswered (or its link was lost): try again after a backoff.
    fn retry_reversal(&self, mut advice: Advice) {
        let now = std::time::Instant::now();
        advice.attempts += 1;
        advice.next_try = now + self.saf.backoff(advice.attempts - 1);
        match self.successor.get() {
            Some(next) if self.is_retired() => next.push_advice(advice, now),
            _ => self.push_advice(advice, now),
        }
    }

    fn on_answer(
        &self,
        link: &Link,
        frame: bytes::Bytes,
        answered_at: std::time::Instant,
        recorder: &mut LatencyRecorder<'_>,
    ) {
        let answer = match Message::decode(&self.bank.dialect, frame) {
            Ok(m) => m,
            Err(e) => {
                crate::log_limited!(warn, bank = %self.bank.id, error = %e, "undecodable message from bank dropped");
                metrics::counter!("switchyard_bank_bad_messages_total").increment(1);
                return;
            }
        };
        let Some(stan) = answer.field(11).and_then(Stan::from_de11) else {
            crate::log_limited!(warn, bank = %self.bank.id, mti = %answer.mti(), "bank message without a valid DE11");
            return;
        };
        let waiter = {
            let mut table = lock(&link.table);
            let waiter = table.inflight.take(stan);
            self.inflight_by_link[link.slot].store(table.inflight.len(), Ordering::Relaxed);
            waiter
        };
        match waiter {
            Some(Waiter::Acquirer(p)) if Some(answer.mti()) == p.request.mti().response() => {
                self.stats.answered.fetch_add(1, Ordering::Relaxed);
                recorder.record(Sample::new(p.received_at, p.forwarded_at, answered_at));
                let dialect = self.bank.dialect.clone();
                let connector = self.index;
                let de39 = answer.field(39).unwrap_or(b"");
                let seq =
                    self.journaling
                        .outcome(p.request_id, de39, OutcomeSource::Bank, Some(&answer));
                if p.registered {
                    let stored = Stored::Bank {
                        connector,
                        link_stan: stan,
                        answer: answer.as_bytes().clone(),
                    };
                    self.settle(&p.request, stored, seq);
                }
                p.reply.send(Reply::Bank {
                    stan: OriginalStan::of(&p.request),
                    answer,
                    dialect,
                    connector,
                    seq,
                });
            }
            Some(Waiter::Acquirer(p)) => {
                crate::log_limited!(warn, bank = %self.bank.id, mti = %answer.mti(), "bank answer with the wrong MTI");
                self.answer(p, ResponseCode::SystemMalfunction, OutcomeSource::Switch);
            }
            Some(Waiter::Echo) => debug!(bank = %self.bank.id, "echo answered"),
            Some(Waiter::SignOff) => {
                let result = if answer.field(39) == Some(b"00") {
                    "answered"
                } else {
                    "declined"
                };
                metrics::counter!("switchyard_sign_offs_total", "result" => result).increment(1);
                info!(bank = %self.bank.id, link = link.slot, result, "sign-off answered");
            }
            Some(Waiter::Reversal(advice)) if answer.mti() == Mti::REVERSAL_ADVICE_RESPONSE => {
                metrics::counter!("switchyard_reversals_acknowledged_total").increment(1);
                self.stats.reversals_acked.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.journaling.reversal_acked(advice.request_id) {
                    error!(request_id = advice.request_id, error = %e, "reversal ack not journaled");
                }
                info!(bank = %self.bank.id, request_id = advice.request_id, "reversal acknowledged");
            }
            Some(Waiter::Reversal(advice)) => {
                crate::log_limited!(warn, bank = %self.bank.id, mti = %answer.mti(), "unexpected answer to a reversal advice");
                self.retry_reversal(advice);
            }
            None => {
                self.stats.unmatched.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("switchyard_bank_late_answers_total").increment(1);
                let approved = answer.field(39) == Some(b"00");
                crate::log_limited!(warn,
                    bank = %self.bank.id, link_stan = stan.value(), approved,
                    "bank answer after the deadline (or unknown) dropped"
                );
            }
        }
    }

    async fn write_loop(
        &self,
        link: &Link,
        wr: &mut WriteHalf<TlsStream<TcpStream>>,
        retire: &CancellationToken,
        shutdown: &CancellationToken,
        up: &AtomicBool,
    ) -> LinkEnd {
        let mut out = BytesMut::with_capacity(64 * 1024);
        let mut last_write = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                return self.sign_off(link, wr, LinkEnd::Shutdown).await;
            }
            if retire.is_cancelled() {
                return self.retiring(link, up, wr, shutdown).await;
            }
            self.fill_reversals(link, &mut out);
            let journaled = self.fill_batch(link, &mut out);
            if !out.is_empty() {
                // Write-ahead: the bank sees no request before its forwarded record
                // (and so its accepted record) is durable, so that after a crash
                // recovery knows of everything a bank may have seen.
                if !self.journaling.durable(journaled).await {
                    return LinkEnd::Journal;
                }
                if let Err(e) = write_flush(wr, &out, self.request_timeout()).await {
                    return LinkEnd::Io(e);
                }
                out.clear();
                last_write = Instant::now();
                continue;
            }
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.queue.is_empty() {
                continue;
            }
            let far = Instant::now() + Duration::from_secs(3600);
            let advice_due = self.saf.next_due().map_or(far, Instant::from_std);
            tokio::select! {
                _ = notified => {}
                _ = retire.cancelled() => {}
                _ = shutdown.cancelled() => {}
                _ = sleep_until(advice_due), if !self.saf.is_empty() => {}
                _ = sleep_until(last_write + self.bank.echo_interval) => {
                    if !self.echo(link, &mut out) {
                        return LinkEnd::EchoTimeout;
                    }
                    if let Err(e) = write_flush(wr, &out, self.request_timeout()).await {
                        return LinkEnd::Io(e);
                    }
                    out.clear();
                    last_write = Instant::now();
                }
            }
        }
    }

    /// A retiring link: takes nothing new (the queue's other links, or 91 when
    /// none is left), and ends once its last request in flight is answered or
    /// timed out by the reader.
    async fn retiring(
        &self,
        link: &Link,
        up: &AtomicBool,
        wr: &mut WriteHalf<TlsStream<TcpStream>>,
        shutdown: &CancellationToken,
    ) -> LinkEnd {
        self.link_down(up);
        if self.links_up() == 0 {
            self.drain_stranded();
        }
        loop {
            if shutdown.is_cancelled() {
                return self.sign_off(link, wr, LinkEnd::Shutdown).await;
            }
            if lock(&link.table).inflight.is_empty() {
                return self.sign_off(link, wr, LinkEnd::Retired).await;
            }
            tokio::time::sleep(RETIRE_POLL).await;
        }
    }

    /// Signs off (0800, DE70 002) and waits for the bank's 0810, or for the
    /// sign-off's deadline (the echo timeout, at most [`SIGN_OFF_WAIT_MAX`]);
    /// the reader takes the answer. Returns `end`.
    async fn sign_off(
        &self,
        link: &Link,
        wr: &mut WriteHalf<TlsStream<TcpStream>>,
        end: LinkEnd,
    ) -> LinkEnd {
        let wait = self.bank.echo_timeout.min(SIGN_OFF_WAIT_MAX);
        let now = std::time::Instant::now();
        let stan = {
            let mut table = lock(&link.table);
            let first = self.next_stan();
            let stan = table
                .inflight
                .insert_from(first, now + wait, Waiter::SignOff)
                .ok();
            if stan.is_some() && table.sweep_at.is_none_or(|s| now + wait < s) {
                link.wake_reader.notify_one();
            }
            stan
        };
        let Some(stan) = stan else {
            return end; // the link's table is full: close without signing off
        };
        let mut out = BytesMut::new();
        if !self.network_message(b"002", stan, &mut out)
            || write_flush(wr, &out, wait).await.is_err()
        {
            return end;
        }
        let until = Instant::now() + wait + RETIRE_POLL;
        while Instant::now() < until && lock(&link.table).inflight.get(stan).is_some() {
            tokio::time::sleep(RETIRE_POLL).await;
        }
        end
    }

    /// Encodes the reversal advices that are due (0420, or 0421 for a repeat) into
    /// `out`, each under a new link STAN, answered within the echo timeout.
    fn fill_reversals(&self, link: &Link, out: &mut BytesMut) {
        if self.saf.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        let mut due = Vec::new();
        self.saf.take_due(now, self.bank.write_batch_max, &mut due);
        if due.is_empty() {
            return;
        }
        let de7 = transmission_time();
        let mut table = lock(&link.table);
        for advice in due {
            let deadline = now + self.bank.echo_timeout;
            let first = self.next_stan();
            let stan = match table
                .inflight
                .insert_from(first, deadline, Waiter::Reversal(advice))
            {
                Ok(stan) => stan,
                Err(TableFull(Waiter::Reversal(mut advice))) => {
                    // The link is full: try again after the first backoff step, not
                    // at once (the writer would spin on an advice still due).
                    advice.next_try = now + self.saf.backoff(0);
                    if let Err(parked) = self.saf.push(advice, now) {
                        metrics::counter!("switchyard_reversals_parked_total").increment(1);
                        error!(bank = %self.bank.id, request_id = parked.request_id,
                            reason = ?parked.reason, "reversal advice parked: needs manual follow-up with the bank");
                    }
                    continue;
                }
                Err(TableFull(_)) => continue,
            };
            let Some(Waiter::Reversal(advice)) = table.inflight.get(stan) else {
                continue;
            };
            let at = self.bank.framing.begin(out);
            let repeat = advice.attempts > 0;
            let encoded = encode_reversal_advice(
                &advice.original,
                &self.bank.dialect,
                advice.original_link_stan,
                stan,
                &de7,
                repeat,
                out,
            )
            .is_ok()
                && self.bank.framing.finish(out, at).is_ok();
            if !encoded {
                out.truncate(at);
                if let Some(Waiter::Reversal(advice)) = table.inflight.take(stan) {
                    error!(bank = %self.bank.id, request_id = advice.request_id,
                        "reversal advice cannot be encoded for this bank: parked");
                    metrics::counter!("switchyard_reversals_parked_total").increment(1);
                }
            }
        }
        let deadline = now + self.bank.echo_timeout;
        if table.sweep_at.is_none_or(|s| deadline < s) {
            link.wake_reader.notify_one();
        }
    }

    /// Moves up to `write_batch_max` queued requests into the in-flight table and
    /// encodes them (DE11 rewritten) into `out`, all under one short lock.
    /// Returns the journal sequence of the last forwarded record (0: none).
    fn fill_batch(&self, link: &Link, out: &mut BytesMut) -> u64 {
        let now = Instant::now().into_std();
        let mut table = lock(&link.table);
        let mut earliest = None;
        let mut journaled = 0;
        for _ in 0..self.bank.write_batch_max {
            let Some(mut p) = self.queue.pop() else { break };
            if p.deadline <= now {
                self.unavailable(p, "expired in queue");
                continue;
            }
            let deadline = p.deadline;
            p.forwarded_at = now;
            let first = self.next_stan();
            let stan = match table
                .inflight
                .insert_from(first, deadline, Waiter::Acquirer(p))
            {
                Ok(stan) => stan,
                Err(TableFull(Waiter::Acquirer(p))) => {
                    self.unavailable(p, "link in-flight table full");
                    continue;
                }
                Err(TableFull(_)) => continue,
            };
            let Some(Waiter::Acquirer(p)) = table.inflight.get(stan) else {
                continue;
            };
            // Recorded before the bank can see it, so recovery knows to reverse it.
            match self
                .journaling
                .forwarded(p.request_id, self.index, stan, self.bank.id)
            {
                Ok(seq) => journaled = seq,
                Err(e) => {
                    if let Some(Waiter::Acquirer(p)) = table.inflight.take(stan) {
                        crate::log_limited!(warn, bank = %self.bank.id, error = %e, "forward not journaled: answered 91");
                        self.unavailable(p, "journal");
                    }
                    continue;
                }
            }
            let digits = stan.to_de11();
            let de90 = p
                .original_link_stan
                .and_then(|s| rewrite_de90(&p.request, s));
            let at = self.bank.framing.begin(out);
            let set11 = Change::Set(11, &digits);
            let changes: &[Change<'_>] = match &de90 {
                Some(de90) => &[set11, Change::Set(90, de90)],
                None => &[set11],
            };
            let encoded = reencode(
                &p.request,
                &self.acquirer_dialect,
                &self.bank.dialect,
                p.request.mti(),
                changes,
                out,
            )
            .is_ok()
                && self.bank.framing.finish(out, at).is_ok();
            if !encoded {
                out.truncate(at);
                if let Some(Waiter::Acquirer(p)) = table.inflight.take(stan) {
                    crate::log_limited!(warn, bank = %self.bank.id, "request does not fit the bank's dialect: answered 30");
                    self.answer(p, ResponseCode::FormatError, OutcomeSource::Switch);
                }
                continue;
            }
            self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
            earliest = Some(earliest.map_or(deadline, |e: std::time::Instant| e.min(deadline)));
        }
        self.inflight_by_link[link.slot].store(table.inflight.len(), Ordering::Relaxed);
        if let Some(d) = earliest {
            if table.sweep_at.is_none_or(|s| d < s) {
                link.wake_reader.notify_one();
            }
        }
        journaled
    }

    /// Encodes an 0800 echo (DE70 301) into `out`; false if the table is full.
    fn echo(&self, link: &Link, out: &mut BytesMut) -> bool {
        let now = std::time::Instant::now();
        let mut table = lock(&link.table);
        let first = self.next_stan();
        let Ok(stan) =
            table
                .inflight
                .insert_from(first, now + self.bank.echo_timeout, Waiter::Echo)
        else {
            return false;
        };
        if table
            .sweep_at
            .is_none_or(|s| now + self.bank.echo_timeout < s)
        {
            link.wake_reader.notify_one();
        }
        self.network_message(b"301", stan, out)
    }
}

/// DE7 (MMDDhhmmss, UTC) for messages the switch originates.
pub fn transmission_time() -> [u8; 10] {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    crate::core::datetime::de7(secs)
}

/// Writes and flushes one batch. A bank that does not take a batch within a
/// request's deadline is treated as a dead link (its requests are answered 91 and
/// the link reconnects), so a stalled peer cannot hold requests past their deadline.
async fn write_flush<W: AsyncWriteExt + Unpin>(
    wr: &mut W,
    out: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    let write = async {
        wr.write_all(out).await?;
        wr.flush().await
    };
    match timeout(limit, write).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "bank not reading",
        )),
    }
}

struct LinkTable {
    inflight: InflightTable<Waiter>,
    /// The deadline the reader sleeps until (None: no deadline pending).
    sweep_at: Option<std::time::Instant>,
}

struct Link {
    table: Mutex<LinkTable>,
    wake_reader: Notify,
    /// The link slot (index into `Connector::inflight_by_link`).
    slot: usize,
}

/// The table lock is never held across `.await`; a poisoned lock means a bug
/// panicked while holding it, and the table is still structurally sound.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
enum LinkEnd {
    #[error("bank closed the connection")]
    Closed,
    #[error("i/o error: {0}")]
    Io(std::io::Error),
    #[error("unframeable stream: {0}")]
    Frame(crate::wire::FrameError),
    #[error("echo unanswered")]
    EchoTimeout,
    #[error("journal failed: nothing more is forwarded")]
    Journal,
    #[error("shutdown")]
    Shutdown,
    #[error("retired by a reload")]
    Retired,
}

/// A connector's link tasks.
#[derive(Default)]
struct LinkSet {
    /// The daemon's shutdown token (None until the links are started).
    shutdown: Option<CancellationToken>,
    /// Running links: slot and retire token, oldest first.
    active: Vec<(usize, CancellationToken)>,
    /// Slots taken, by running or retiring links (bit per slot).
    busy: u64,
    /// Links wanted (`links`, as last applied).
    target: usize,
    /// Task handles, joined at shutdown.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmission_time_is_ten_digits() {
        assert!(transmission_time().iter().all(u8::is_ascii_digit));
    }
}
