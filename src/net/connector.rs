//! Bank connectors: the tokio shell around one bank's [`BankState`] and its links'
//! [`Link`] state machines. It only moves bytes and timers: it connects (TCP and
//! TLS, bounded in time), feeds what it reads to [`Link::on_answer`], sleeps until
//! [`Link::poll_timeout`], writes what [`Link::poll_transmit`] hands out once the
//! journal records it names are durable (one flush per batch), and reconnects
//! with a doubling backoff. Every decision is the link's or the bank state's.
//!
//! Each link runs as one task with two futures, a reader and a writer, over one
//! `Link` behind a mutex that is never held across an `.await` (and, the two
//! futures sharing a task, never contended). Producers (acquirer sessions) push
//! into the bank's lock-free queue and wake one writer.

use crate::config::{Bank, LINKS_MAX};
use crate::core::bank::{BankState, Wake};
use crate::core::books::Books;
use crate::core::link::{Link, LinkEnd, SIGN_OFF_WAIT_MAX};
use crate::core::route::BankIndex;
use crate::net::durable::Durable;
use crate::sync::lock;
use crate::telemetry::{ConnectorLatency, Sample};
use crate::wire::{Dialect, FrameDecoder};
use bytes::BytesMut;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Read buffer of one bank link, bytes (rustls hands over 4 KiB at a time).
const LINK_READ_BUFFER_BYTES: usize = 64 * 1024;
/// Write buffer of one bank link, bytes (grows to a batch if need be).
const LINK_WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// Batches a link encodes ahead while earlier ones wait for the journal. Each
/// holds at most `write_batch_max` requests (and the link's in-flight table bounds
/// them all), so this bounds buffers, not requests.
const LINK_PIPELINE_BATCHES_MAX: usize = 4;
/// Batches whose written instant a link remembers for latency samples (32 bytes
/// each). An answer to an older batch counts from when it was encoded.
const LINK_BATCH_TIMES_MAX: usize = 4_096;
/// Longest a link waits for the TLS close_notify to go out when it closes.
const CLOSE_NOTIFY_WAIT: Duration = Duration::from_secs(1);

/// How a bank state wakes this connector's tasks.
struct Wakers {
    /// Link writers wait on it for queued requests and advices.
    writers: Arc<Notify>,
    /// Whoever waits for links (readiness, reloads) waits on it.
    links: Arc<Notify>,
}

impl Wake for Wakers {
    fn writers(&self) {
        self.writers.notify_one();
    }

    fn links_changed(&self) {
        self.links.notify_waiters();
    }
}

/// One bank's connector: its shared state, its link tasks, and the TLS they
/// connect with. Derefs to its [`BankState`].
pub struct Connector {
    state: Arc<BankState>,
    /// Link writers wait on it (the state's [`Wake::writers`]).
    writers: Arc<Notify>,
    /// Notified whenever a link goes up or down (shared by all connectors).
    link_changed: Arc<Notify>,
    /// The client TLS config new links connect with (a reload may replace it).
    tls: std::sync::RwLock<Arc<rustls::ClientConfig>>,
    frame_size_max_bytes: usize,
    /// Where a link's batch waits for its forwarded records.
    durable: Durable,
    /// Latency histograms (time in the switch, at the bank, total).
    pub latency: ConnectorLatency,
    /// The link tasks: which slots are taken, each running link's retire token,
    /// and every task's handle (joined at shutdown).
    links: Mutex<LinkSet>,
}

impl std::ops::Deref for Connector {
    type Target = BankState;

    fn deref(&self) -> &BankState {
        &self.state
    }
}

/// What a connector is made with besides its bank.
#[derive(Clone)]
pub struct Bookkeeping {
    /// The books every request ends in.
    pub books: Books,
    /// The journal's durable point.
    pub durable: Durable,
    /// Where bank STANs start (1..=999,999): derived from the journal's position,
    /// so that a restart does not reuse the STANs a bank saw just before.
    pub first_stan: u32,
}

impl Connector {
    /// A connector for `bank` in slot `index`; `link_changed` is notified whenever
    /// a link goes up or down.
    pub fn new(
        index: BankIndex,
        bank: Bank,
        acquirer_dialect: Arc<Dialect>,
        tls: Arc<rustls::ClientConfig>,
        frame_size_max_bytes: usize,
        link_changed: Arc<Notify>,
        books: Bookkeeping,
    ) -> Arc<Connector> {
        let writers = Arc::new(Notify::new());
        let wake = Arc::new(Wakers {
            writers: writers.clone(),
            links: link_changed.clone(),
        });
        let state = BankState::new(
            index,
            bank,
            acquirer_dialect,
            books.books,
            books.first_stan,
            wake,
        );
        Arc::new(Connector {
            state: Arc::new(state),
            writers,
            link_changed,
            tls: std::sync::RwLock::new(tls),
            frame_size_max_bytes,
            durable: books.durable,
            latency: ConnectorLatency::default(),
            links: Mutex::new(LinkSet::default()),
        })
    }

    /// The bank's shared state.
    pub fn state(&self) -> &Arc<BankState> {
        &self.state
    }

    /// Puts a reloaded bank's changeable settings in force: the request deadline,
    /// `optional`, and the number of links.
    pub fn apply(self: &Arc<Self>, bank: &Bank) {
        self.set_request_timeout(bank.request_timeout);
        self.set_optional(bank.optional);
        self.resize_links(bank.links);
    }

    /// Replaces the client TLS config that new links connect with.
    pub fn set_tls(&self, tls: Arc<rustls::ClientConfig>) {
        *crate::sync::write(&self.tls) = tls;
    }

    /// Whether this retired connector has stopped: no link task left, nothing
    /// queued. A reload then keeps a [`Connector::tombstone`] in its slot.
    pub fn is_stopped(&self) -> bool {
        self.is_retired() && lock(&self.links).busy == 0 && self.queue_depth() == 0
    }

    /// Whether this is a tombstone (the only connectors with no links: the
    /// config requires at least one).
    pub fn is_tombstone(&self) -> bool {
        self.bank().links == 0
    }

    /// A stand-in for this stopped connector: the same slot, bank id and dialect
    /// (for the answers and reversals that name the slot), without the memory
    /// of its queue and histograms. It takes nothing (91).
    pub fn tombstone(&self) -> Arc<Connector> {
        let mut bank = self.bank().clone();
        bank.queue_depth_max = 1;
        bank.links = 0;
        let tls = crate::sync::read(&self.tls).clone();
        let c = Connector::new(
            self.index(),
            bank,
            self.acquirer_dialect().clone(),
            tls,
            self.frame_size_max_bytes,
            self.link_changed.clone(),
            Bookkeeping {
                books: self.books().clone(),
                durable: self.durable.clone(),
                first_stan: self.stan_position(),
            },
        );
        c.state.retire();
        c
    }

    /// Links running, retiring ones not counted.
    pub fn links_configured(&self) -> usize {
        lock(&self.links).active.len()
    }

    /// Takes the bank out of service: no new request is queued (they are answered
    /// 91), and every link finishes what it carries, signs off and closes.
    pub fn retire(&self) {
        self.state.retire();
        self.retire_links();
    }

    /// Retires this connector in favour of `successor` (the same bank with new
    /// link settings): requests queued here, and reversal advices waiting or
    /// coming back from its retiring links, go to the successor.
    pub fn retire_into(&self, successor: &Connector) {
        self.state.retire_into(successor.state.clone());
        self.retire_links();
    }

    fn retire_links(&self) {
        let mut set = lock(&self.links);
        for (_, retire) in set.active.drain(..) {
            retire.cancel();
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
                info!(bank = %self.bank().id, link = slot, "bank link retiring (reload)");
                retire.cancel();
            }
        }
        while set.active.len() < n {
            if !self.spawn_link(&mut set, &shutdown) {
                // Started as retiring links free their slots (see `link_slot`).
                crate::log_limited!(warn, bank = %self.bank().id, wanted = n,
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

    /// Starts the configured links; they run until `shutdown` (or a reload retires
    /// them). [`Connector::join_links`] waits for them.
    pub fn spawn_links(self: &Arc<Self>, shutdown: &CancellationToken) {
        let mut set = lock(&self.links);
        set.shutdown = Some(shutdown.clone());
        let n = self.bank().links.min(LINKS_MAX);
        set.target = n;
        for _ in 0..n {
            self.spawn_link(&mut set, shutdown);
        }
    }

    /// Waits for every link task to end (after shutdown).
    pub async fn join_links(&self) {
        let tasks = std::mem::take(&mut lock(&self.links).tasks);
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Requests in flight on each running or retiring link: (slot, count).
    pub fn inflight_by_link(&self) -> Vec<(usize, usize)> {
        let busy = lock(&self.links).busy;
        (0..LINKS_MAX)
            .filter(|&i| busy & (1 << i) != 0)
            .map(|i| (i, self.inflight_on(i)))
            .collect()
    }

    /// Keeps link `slot` connected: connect, run, back off, reconnect; ends at
    /// shutdown or once retired, and frees its slot.
    async fn link_slot(
        self: Arc<Self>,
        slot: usize,
        shutdown: CancellationToken,
        retire: CancellationToken,
    ) {
        self.keep_link(slot, &shutdown, &retire).await;
        let last = {
            let mut set = lock(&self.links);
            set.busy &= !(1 << slot);
            // A pool grown while all slots were taken gets the slot freed here.
            if !self.is_retired() && !shutdown.is_cancelled() && set.active.len() < set.target {
                self.spawn_link(&mut set, &shutdown);
            }
            set.busy == 0
        };
        if self.is_retired() && last {
            self.state.stopped();
        }
    }

    async fn keep_link(
        &self,
        slot: usize,
        shutdown: &CancellationToken,
        retire: &CancellationToken,
    ) {
        let bank = self.bank();
        let mut backoff = bank.reconnect_backoff_min;
        while !shutdown.is_cancelled() && !retire.is_cancelled() {
            let connected = tokio::select! {
                c = self.connect() => c,
                _ = retire.cancelled() => return,
            };
            match connected {
                Ok(stream) => {
                    let (why, signed_on) = self.run_link(stream, shutdown, retire, slot).await;
                    if signed_on {
                        backoff = bank.reconnect_backoff_min;
                    }
                    match why {
                        Ended::Link(LinkEnd::Shutdown) => {
                            info!(bank = %bank.id, link = slot, "bank link closed for shutdown");
                        }
                        Ended::Link(LinkEnd::Retired) => {
                            info!(bank = %bank.id, link = slot, "bank link retired: signed off and closed");
                            return;
                        }
                        why if signed_on => {
                            crate::log_limited!(warn, bank = %bank.id, link = slot, reason = %why,
                                links_up = self.links_up(), "bank link down");
                        }
                        why => {
                            debug!(bank = %bank.id, link = slot, reason = %why, "bank sign-on failed");
                        }
                    }
                }
                Err(e) => {
                    debug!(bank = %bank.id, link = slot, error = %e, "bank connect failed");
                }
            }
            let until = Instant::now() + backoff;
            backoff = (backoff * 2).min(bank.reconnect_backoff_max);
            tokio::select! {
                _ = sleep_until(until) => {}
                _ = shutdown.cancelled() => {}
                _ = retire.cancelled() => return,
            }
        }
    }

    async fn connect(&self) -> std::io::Result<TlsStream<TcpStream>> {
        let bank = self.bank();
        let name = rustls::pki_types::ServerName::try_from(bank.server_name.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let tls = crate::sync::read(&self.tls).clone();
        let connector = tokio_rustls::TlsConnector::from(tls);
        let attempt = async {
            let tcp = TcpStream::connect(bank.address).await?;
            tcp.set_nodelay(true)?;
            connector.connect(name, tcp).await
        };
        match timeout(bank.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timeout",
            )),
        }
    }

    /// Runs one connected link (sign-on first) until it ends; everything still in
    /// flight on it then ends too ([`Link::on_link_lost`]). Returns why, and whether
    /// it had signed on.
    async fn run_link(
        &self,
        stream: TlsStream<TcpStream>,
        shutdown: &CancellationToken,
        retire: &CancellationToken,
        slot: usize,
    ) -> (Ended, bool) {
        let (rd, mut wr) = tokio::io::split(stream);
        let link = LinkShell {
            link: Mutex::new(Link::new(
                self.link_config(),
                slot,
                Instant::now().into_std(),
            )),
            wake_reader: Notify::new(),
            wake_writer: Notify::new(),
            batch_times: Mutex::new(BatchTimes::default()),
        };
        let end = tokio::select! {
            end = self.read_loop(&link, rd) => end,
            end = self.write_loop(&link, &mut wr, retire, shutdown) => end,
            // The writer signs off at shutdown; past this bound the link closes
            // anyway (a writer stuck on a bank that does not read).
            _ = async {
                shutdown.cancelled().await;
                tokio::time::sleep(SIGN_OFF_WAIT_MAX * 2).await;
            } => Ended::Link(LinkEnd::Shutdown),
        };
        if matches!(end, Ended::Link(LinkEnd::Shutdown | LinkEnd::Retired)) {
            // TLS close_notify, bounded in time.
            let _ = timeout(CLOSE_NOTIFY_WAIT, wr.shutdown()).await;
        }
        let mut link = lock(&link.link);
        let signed_on = link.has_signed_on();
        link.on_link_lost(&self.state, Instant::now().into_std());
        (end, signed_on)
    }

    /// Reads frames into the link and runs its timers.
    async fn read_loop(&self, shell: &LinkShell, mut rd: ReadHalf<TlsStream<TcpStream>>) -> Ended {
        let decoder = FrameDecoder::new(self.bank().framing, self.frame_size_max_bytes);
        let mut buf = BytesMut::with_capacity(LINK_READ_BUFFER_BYTES);
        let mut recorder = self.latency.recorder();
        // Placeholder deadline for disabled `select!` branches (never awaited).
        let far = Instant::now() + Duration::from_secs(3600);
        loop {
            let timer = lock(&shell.link).poll_timeout(&self.state);
            let flush_due = recorder.flush_due();
            tokio::select! {
                biased;
                read = rd.read_buf(&mut buf) => match read {
                    Ok(0) => return Ended::Closed,
                    Ok(_) => {
                        let now = std::time::Instant::now();
                        let mut link = lock(&shell.link);
                        let times = lock(&shell.batch_times);
                        loop {
                            match decoder.decode(&mut buf) {
                                Ok(Some(frame)) => {
                                    if let Some((received, encoded)) =
                                        link.on_answer(&self.state, frame, now)
                                    {
                                        let written = times.written(encoded);
                                        recorder.record(Sample::new(
                                            received, encoded, written, now,
                                        ));
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => return Ended::Frame(e),
                            }
                        }
                        drop(times);
                        if let Some(end) = shell.after(&mut link) {
                            return Ended::Link(end);
                        }
                        drop(link);
                        recorder.maybe_flush(now);
                    }
                    Err(e) => return Ended::Io(e),
                },
                _ = sleep_until(timer.map_or(far, Instant::from_std)), if timer.is_some() => {
                    let mut link = lock(&shell.link);
                    link.handle_timeout(&self.state, Instant::now().into_std());
                    if let Some(end) = shell.after(&mut link) {
                        return Ended::Link(end);
                    }
                }
                _ = shell.wake_reader.notified() => {}
                // Samples reach the connector within a second even when traffic stops.
                _ = sleep_until(flush_due.map_or(far, Instant::from_std)), if flush_due.is_some() => {
                    recorder.flush(std::time::Instant::now());
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(LINK_READ_BUFFER_BYTES);
            }
        }
    }

    /// Writes what the link hands out, each batch once the journal records it
    /// names are durable; tells the link of a retirement or shutdown.
    async fn write_loop(
        &self,
        shell: &LinkShell,
        wr: &mut WriteHalf<TlsStream<TcpStream>>,
        retire: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Ended {
        let mut flags = Flags::default();
        let mut pipeline = Pipeline::default();
        loop {
            // Encode what there is while earlier batches wait for the journal:
            // their forwarded records join the next group commit at once.
            let (more, end) = match self.fill(shell, retire, shutdown, &mut flags, &mut pipeline) {
                Ok(state) => state,
                Err(end) => return end,
            };
            if more {
                continue;
            }
            if let Err(end) = self.write_durable(shell, wr, &mut pipeline).await {
                return end;
            }
            if let Some(end) = end {
                if pipeline.is_empty() {
                    return Ended::Link(end);
                }
                // Written once durable, then the link ends.
                let Some(seq) = pipeline.last_seq() else {
                    return Ended::Link(end);
                };
                if !self.durable.wait(seq).await {
                    return Ended::Journal;
                }
                continue;
            }
            // Nothing more to encode now: wait for work, for the oldest batch to be
            // durable, or for a retirement or shutdown. Wake-ups are registered
            // first, then one more look, so that nothing queued in between is
            // missed. Only a link that takes requests waits for them.
            let up = lock(&shell.link).is_up();
            let queued = self.writers.notified();
            let woken = shell.wake_writer.notified();
            tokio::pin!(queued, woken);
            let room = !pipeline.is_full();
            if up && room {
                queued.as_mut().enable();
            }
            woken.as_mut().enable();
            match self.fill(shell, retire, shutdown, &mut flags, &mut pipeline) {
                Ok((true, _)) => continue,
                Ok((false, Some(_))) => continue, // handled at the top
                Ok((false, None)) => {}
                Err(end) => return end,
            }
            let oldest = pipeline.first_seq();
            tokio::select! {
                durable = self.durable.wait(oldest.unwrap_or(0)), if oldest.is_some() => {
                    if !durable {
                        return Ended::Journal;
                    }
                }
                _ = &mut queued, if up && room => {}
                _ = &mut woken => {}
                _ = retire.cancelled(), if !flags.retiring => {}
                _ = shutdown.cancelled(), if !flags.closing => {}
            }
        }
    }

    /// Tells the link of a retirement or shutdown and takes what it has to write,
    /// batch after batch, into the pipeline while there is room. Returns whether a
    /// full batch was answered without writing (look again), and the link's end
    /// once nothing more will come.
    fn fill(
        &self,
        shell: &LinkShell,
        retire: &CancellationToken,
        shutdown: &CancellationToken,
        flags: &mut Flags,
        pipeline: &mut Pipeline,
    ) -> Result<(bool, Option<LinkEnd>), Ended> {
        while !pipeline.is_full() {
            let mut out = pipeline.buffer();
            let now = std::time::Instant::now();
            let (seq, end, more) = {
                let mut link = lock(&shell.link);
                if shutdown.is_cancelled() && !flags.closing {
                    flags.closing = true;
                    link.close(now);
                }
                if retire.is_cancelled() && !flags.retiring {
                    flags.retiring = true;
                    link.retire(&self.state);
                }
                let seq = link.poll_transmit(&self.state, now, crate::clock::unix_s(), &mut out);
                if link.take_wake_reader() {
                    shell.wake_reader.notify_one();
                }
                (seq, link.ended(), link.take_wake_writer())
            };
            if out.is_empty() {
                pipeline.recycle(out);
                // A full batch answered without writing (a full table): look again.
                return Ok((more && end.is_none(), end));
            }
            pipeline.push(seq, now, out);
        }
        Ok((false, None))
    }

    /// Writes, in order and with one flush, every batch whose journal records are
    /// durable (the bank sees no request before its forwarded record, and so its
    /// accepted record, is durable), and notes when they went out.
    async fn write_durable(
        &self,
        shell: &LinkShell,
        wr: &mut WriteHalf<TlsStream<TcpStream>>,
        pipeline: &mut Pipeline,
    ) -> Result<(), Ended> {
        let mut wrote = false;
        while let Some(seq) = pipeline.first_seq() {
            match self.durable.is_durable(seq) {
                Some(true) => {}
                Some(false) => break,
                None => return Err(Ended::Journal),
            }
            if !crate::cluster::may_act() {
                // A cluster node whose lease ran out forwards no more.
                return Err(Ended::Journal);
            }
            let Some((encoded, out)) = pipeline.pop() else {
                break;
            };
            let written = timeout(self.request_timeout(), wr.write_all(&out)).await;
            pipeline.recycle(out);
            match written {
                // Noted before the flush: the reader may see an answer while it runs.
                Ok(Ok(())) => {
                    lock(&shell.batch_times).note(encoded, std::time::Instant::now());
                    wrote = true;
                }
                Ok(Err(e)) => return Err(Ended::Io(e)),
                Err(_) => return Err(Ended::Io(write_timed_out())),
            }
        }
        if wrote {
            if let Err(e) = write_flush(wr, &[], self.request_timeout()).await {
                return Err(Ended::Io(e));
            }
        }
        Ok(())
    }
}

/// Batches a link has encoded, in order, waiting for their journal records to be
/// durable before they are written; bounded by [`LINK_PIPELINE_BATCHES_MAX`].
/// Emptied buffers are kept for the next batches (no allocation per batch).
#[derive(Default)]
struct Pipeline {
    /// Each batch: the journal record it waits for, when it was encoded, its bytes.
    batches: std::collections::VecDeque<(u64, std::time::Instant, BytesMut)>,
    free: Vec<BytesMut>,
}

impl Pipeline {
    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    fn is_full(&self) -> bool {
        self.batches.len() >= LINK_PIPELINE_BATCHES_MAX
    }

    fn first_seq(&self) -> Option<u64> {
        self.batches.front().map(|b| b.0)
    }

    fn last_seq(&self) -> Option<u64> {
        self.batches.iter().map(|b| b.0).max()
    }

    fn buffer(&mut self) -> BytesMut {
        self.free
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(LINK_WRITE_BUFFER_BYTES))
    }

    fn push(&mut self, seq: u64, encoded: std::time::Instant, out: BytesMut) {
        self.batches.push_back((seq, encoded, out));
    }

    fn pop(&mut self) -> Option<(std::time::Instant, BytesMut)> {
        self.batches.pop_front().map(|b| (b.1, b.2))
    }

    fn recycle(&mut self, mut out: BytesMut) {
        out.clear();
        if self.free.len() < LINK_PIPELINE_BATCHES_MAX {
            self.free.push(out);
        }
    }
}

/// What a link writer has told its link already.
#[derive(Default)]
struct Flags {
    retiring: bool,
    closing: bool,
}

/// One connected link: its state machine and how its two futures wake each other.
struct LinkShell {
    link: Mutex<Link<BankState>>,
    wake_reader: Notify,
    wake_writer: Notify,
    /// When recent batches went out (the reader and writer share one task).
    batch_times: Mutex<BatchTimes>,
}

/// When a link's recent batches were encoded and when written to the bank, so
/// that the time a batch waited for the journal counts as the switch's, not the
/// bank's. Requests of one batch share its encoded instant (`Link::poll_transmit`
/// stamps them all with one); batches are written in the order encoded. Bounded
/// by [`LINK_BATCH_TIMES_MAX`].
#[derive(Default)]
struct BatchTimes(std::collections::VecDeque<(std::time::Instant, std::time::Instant)>);

impl BatchTimes {
    fn note(&mut self, encoded: std::time::Instant, written: std::time::Instant) {
        if self.0.len() >= LINK_BATCH_TIMES_MAX {
            self.0.pop_front();
        }
        self.0.push_back((encoded, written));
    }

    /// When the batch encoded at `encoded` was written; `encoded` itself when the
    /// batch is too old to be remembered.
    fn written(&self, encoded: std::time::Instant) -> std::time::Instant {
        match self.0.binary_search_by(|b| b.0.cmp(&encoded)) {
            Ok(i) => self.0[i].1,
            Err(_) => encoded,
        }
    }
}

impl LinkShell {
    /// After the reader fed the link: wakes the writer if the link asks, and says
    /// whether the link ended.
    fn after(&self, link: &mut Link<BankState>) -> Option<LinkEnd> {
        if link.take_wake_writer() {
            self.wake_writer.notify_one();
        }
        link.ended()
    }
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
        if !crate::cluster::may_act() {
            // A cluster node whose lease ran out sends nothing more to a bank.
            return Err(std::io::Error::other("cluster lease lost"));
        }
        wr.write_all(out).await?;
        wr.flush().await
    };
    match timeout(limit, write).await {
        Ok(result) => result,
        Err(_) => Err(write_timed_out()),
    }
}

/// A bank that did not take a batch in time.
fn write_timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "bank not reading")
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("{0}")]
    Link(LinkEnd),
    #[error("bank closed the connection")]
    Closed,
    #[error("i/o error: {0}")]
    Io(std::io::Error),
    #[error("unframeable stream: {0}")]
    Frame(crate::wire::FrameError),
    #[error("journal failed: nothing more is forwarded")]
    Journal,
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
    fn batch_times_give_when_a_batch_went_out_within_their_bound() {
        let t0 = std::time::Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let mut times = BatchTimes::default();
        for i in 0..LINK_BATCH_TIMES_MAX as u64 + 10 {
            times.note(at(i * 10), at(i * 10 + 5));
        }
        assert_eq!(times.0.len(), LINK_BATCH_TIMES_MAX);
        // A remembered batch: its written instant.
        assert_eq!(times.written(at(100 * 10)), at(100 * 10 + 5));
        // Forgotten (the oldest ten) or never written: counts from encoding.
        assert_eq!(times.written(at(30)), at(30));
        assert_eq!(times.written(at(7)), at(7));
    }
}
