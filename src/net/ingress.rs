//! Acquirer sessions: accept mutual TLS, name the institution from its
//! certificate, read frames, admit or decline, and write answers in batches.

use super::connector::Connector;
use super::journaling::Journaling;
use super::{encode_reply, Awaiting, InstitutionSlot, Pending, Recent, Reply, Stored};
use crate::config::Config;
use crate::core::dedup::{content_digest, DuplicateKey, Original, Verdict};
use crate::core::route::BankIndex;
use crate::core::validate::{admit, Admission, RequestKind};
use crate::core::{InstitutionId, ResponseCode};
use crate::tls::connection_identity;
use crate::wire::{FrameDecoder, Location, Message};
use bytes::BytesMut;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Read buffer of one acquirer session, bytes.
const SESSION_READ_BUFFER_BYTES: usize = 32 * 1024;
/// While draining, how long a session with nothing in flight waits for more
/// input before it closes.
const DRAIN_LINGER: std::time::Duration = std::time::Duration::from_millis(200);
/// Answers taken from the channel per write (one flush per batch).
const SESSION_WRITE_BATCH_MAX: usize = 512;

/// Everything a session needs, shared by all sessions.
pub struct Ingress {
    config: Arc<Config>,
    connectors: Vec<Arc<Connector>>,
    by_certificate: HashMap<String, InstitutionId>,
    connections: AtomicUsize,
    /// Open sessions per institution (entries removed when they reach zero).
    sessions: dashmap::DashMap<InstitutionId, usize>,
    /// Metric label of each connector (the bank's id), by index.
    connector_labels: Vec<String>,
    /// Where accepted requests are recorded.
    journaling: Journaling,
    /// The next request id (journal records name requests by it).
    next_request_id: AtomicU64,
    /// Recent requests: retransmissions and reversals are matched here.
    recent: Arc<Recent>,
    /// Each institution's rate limit, with its counter of refusals.
    rates: HashMap<InstitutionId, RateLimit>,
    /// The route table in force (replaced by a reload), and its generation: a
    /// session keeps its own copy of the `Arc` and looks at the lock only when the
    /// generation moved (one relaxed load per request).
    routes: std::sync::RwLock<Arc<crate::core::route::RouteTable>>,
    routes_generation: AtomicU64,
}

/// One institution's request rate limit (GCRA, lock-free) and requests in flight.
struct RateLimit {
    /// Replaced whole by a reload that changes the institution's rate.
    limiter: std::sync::RwLock<governor::DefaultDirectRateLimiter>,
    refused: metrics::Counter,
    inflight: Arc<AtomicUsize>,
    inflight_refused: metrics::Counter,
}

/// The rate limiter of an institution's config.
fn rate_limiter(i: &crate::config::Institution) -> governor::DefaultDirectRateLimiter {
    let per_s = std::num::NonZeroU32::new(i.rate_per_s).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = std::num::NonZeroU32::new(i.rate_burst).unwrap_or(std::num::NonZeroU32::MIN);
    governor::RateLimiter::direct(governor::Quota::per_second(per_s).allow_burst(burst))
}

/// Per-session handles on `switchyard_responses_total{institution, connector, code}`,
/// created on first use so counting an answer is one atomic add, no allocation.
struct ResponseCounters<'a> {
    institution: String,
    connector_labels: &'a [String],
    handles: HashMap<(Option<BankIndex>, &'static str), metrics::Counter>,
}

impl<'a> ResponseCounters<'a> {
    fn new(institution: InstitutionId, connector_labels: &'a [String]) -> Self {
        ResponseCounters {
            institution: institution.to_string(),
            connector_labels,
            handles: HashMap::new(),
        }
    }

    fn count(&mut self, reply: &Reply) {
        let key = (reply.connector(), reply.code_label());
        let handle = self.handles.entry(key).or_insert_with(|| {
            let connector = key
                .0
                .and_then(|i| self.connector_labels.get(usize::from(i)).cloned())
                .unwrap_or_else(|| "none".to_owned());
            metrics::counter!(
                "switchyard_responses_total",
                "institution" => self.institution.clone(),
                "connector" => connector,
                "code" => key.1
            )
        });
        handle.increment(1);
    }
}

impl Ingress {
    /// Shared session state over a validated config and its connectors.
    pub fn new(
        config: Arc<Config>,
        connectors: Vec<Arc<Connector>>,
        journaling: Journaling,
        first_request_id: u64,
        recent: Arc<Recent>,
    ) -> Arc<Ingress> {
        let routes = Arc::new(config.routes.clone());
        let by_certificate = config.institutions_by_certificate();
        let rates = config
            .institutions
            .iter()
            .map(|i| {
                let limit = RateLimit {
                    limiter: std::sync::RwLock::new(rate_limiter(i)),
                    refused: metrics::counter!("switchyard_rate_limited_total", "institution" => i.id.to_string()),
                    inflight: Arc::new(AtomicUsize::new(0)),
                    inflight_refused: metrics::counter!(
                        "switchyard_institution_inflight_refused_total",
                        "institution" => i.id.to_string()
                    ),
                };
                (i.id, limit)
            })
            .collect();
        let connector_labels = config.banks.iter().map(|b| b.id.to_string()).collect();
        Arc::new(Ingress {
            config,
            connectors,
            by_certificate,
            connections: AtomicUsize::new(0),
            journaling,
            next_request_id: AtomicU64::new(first_request_id),
            recent,
            rates,
            routes: std::sync::RwLock::new(routes),
            routes_generation: AtomicU64::new(0),
            sessions: dashmap::DashMap::new(),
            connector_labels,
        })
    }

    /// Puts the rate limits of `institutions` in force, each with a fresh allowance.
    pub fn replace_rates(&self, institutions: &[crate::config::Institution]) {
        for i in institutions {
            if let Some(rate) = self.rates.get(&i.id) {
                *rate
                    .limiter
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = rate_limiter(i);
            }
        }
    }

    /// Puts `routes` in force for every request read from now on (sessions pick it
    /// up at their next request).
    pub fn replace_routes(&self, routes: crate::core::route::RouteTable) {
        *self
            .routes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(routes);
        self.routes_generation.fetch_add(1, Ordering::Release);
    }

    fn current_routes(&self) -> (u64, Arc<crate::core::route::RouteTable>) {
        let generation = self.routes_generation.load(Ordering::Acquire);
        let routes = self
            .routes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        (generation, routes)
    }

    /// Open sessions of `institution`.
    pub fn sessions_of(&self, institution: InstitutionId) -> usize {
        self.sessions.get(&institution).map_or(0, |n| *n)
    }

    fn session_opened(&self, institution: InstitutionId) -> usize {
        let mut n = self.sessions.entry(institution).or_insert(0);
        *n += 1;
        *n
    }

    fn session_closed(&self, institution: InstitutionId) {
        // The guard is dropped before remove_if takes the shard lock again.
        if let Some(mut n) = self.sessions.get_mut(&institution) {
            *n = n.saturating_sub(1);
        }
        self.sessions.remove_if(&institution, |_, n| *n == 0);
    }

    /// Acquirer connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Accepts acquirer connections until `shutdown` (the drain token: once it is
    /// cancelled, no connection is accepted, sessions answer new requests 91, and
    /// each closes once its requests in flight are answered).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let acceptor = TlsAcceptor::from(tls);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: keep serving the others.
                        crate::log_limited!(warn, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            if self.connections.fetch_add(1, Ordering::AcqRel) >= self.config.connections_max {
                self.connections.fetch_sub(1, Ordering::AcqRel);
                metrics::counter!("switchyard_connections_refused_total", "reason" => "limit")
                    .increment(1);
                crate::log_limited!(warn, %peer, limit = self.config.connections_max, "connection refused: limit");
                continue;
            }
            let this = self.clone();
            let acceptor = acceptor.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                this.connection(tcp, peer, acceptor, shutdown).await;
                this.connections.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    async fn connection(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        acceptor: TlsAcceptor,
        shutdown: CancellationToken,
    ) {
        let _ = tcp.set_nodelay(true);
        let handshake = tokio::time::timeout(self.config.handshake_timeout, acceptor.accept(tcp));
        let tls = match handshake.await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                metrics::counter!("switchyard_handshakes_failed_total").increment(1);
                crate::log_limited!(info, %peer, error = %e, "TLS handshake refused");
                return;
            }
            Err(_) => {
                metrics::counter!("switchyard_handshakes_failed_total").increment(1);
                crate::log_limited!(info, %peer, "TLS handshake timed out");
                return;
            }
        };
        let identity = connection_identity(tls.get_ref().1, self.config.identity);
        let institution = match identity.as_ref().map(|name| self.by_certificate.get(name)) {
            Ok(Some(id)) => *id,
            Ok(None) => {
                metrics::counter!("switchyard_connections_refused_total", "reason" => "unknown_institution")
                    .increment(1);
                crate::log_limited!(warn, %peer, identity = ?identity, "certificate names no configured institution");
                return;
            }
            Err(e) => {
                metrics::counter!("switchyard_connections_refused_total", "reason" => "no_identity")
                    .increment(1);
                crate::log_limited!(warn, %peer, error = %e, "certificate carries no institution identity");
                return;
            }
        };
        let open = self.session_opened(institution);
        if open > self.config.connections_per_institution_max {
            self.session_closed(institution);
            metrics::counter!("switchyard_connections_refused_total", "reason" => "institution_limit")
                .increment(1);
            crate::log_limited!(warn, %peer, %institution, limit = self.config.connections_per_institution_max,
                "connection refused: the institution's connection limit");
            return;
        }
        crate::log_limited!(info, %peer, %institution, sessions = open, "acquirer session open");
        self.session(tls, institution, &shutdown).await;
        self.session_closed(institution);
        crate::log_limited!(info, %peer, %institution, "acquirer session closed");
    }

    async fn session(
        &self,
        tls: TlsStream<TcpStream>,
        institution: InstitutionId,
        shutdown: &CancellationToken,
    ) {
        let (rd, wr) = tokio::io::split(tls);
        let (tx, rx) = mpsc::channel::<Reply>(self.config.inflight_per_connection_max);
        let reader = self.read_loop(rd, tx, institution, shutdown);
        let writer = self.write_loop(wr, rx, institution);
        tokio::pin!(reader, writer);
        tokio::select! {
            // The peer stopped reading or went away: nothing more can reach it.
            _ = &mut writer => {}
            // The peer stopped sending: answer what is in flight, then close.
            _ = &mut reader => { writer.await; }
        }
    }

    async fn read_loop(
        &self,
        mut rd: tokio::io::ReadHalf<TlsStream<TcpStream>>,
        tx: mpsc::Sender<Reply>,
        institution: InstitutionId,
        shutdown: &CancellationToken,
    ) {
        let decoder = FrameDecoder::new(self.config.framing, self.config.frame_size_max_bytes);
        let mut buf = BytesMut::with_capacity(SESSION_READ_BUFFER_BYTES);
        // When the partial frame in `buf` began to arrive (None: nothing partial).
        let mut frame_started: Option<tokio::time::Instant> = None;
        let mut draining = shutdown.is_cancelled();
        let (mut generation, mut routes) = self.current_routes();
        // Counted when this connection has its limit of requests in flight and
        // is not read further until answers go out (backpressure).
        let backpressure = metrics::counter!(
            "switchyard_connection_backpressure_total",
            "institution" => institution.to_string()
        );
        loop {
            loop {
                let frame = match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        frame_started = None; // what is left is a new frame
                        frame
                    }
                    Ok(None) => break,
                    Err(e) => {
                        metrics::counter!("switchyard_rejected_input_total", "reason" => "frame")
                            .increment(1);
                        crate::log_limited!(warn, %institution, error = %e, "unframeable input: closing connection");
                        return;
                    }
                };
                // Wait for room on the answer channel: a peer with too many requests in
                // flight is simply not read further until answers go out.
                if tx.capacity() == 0 {
                    backpressure.increment(1);
                }
                let Ok(permit) = tx.clone().reserve_owned().await else {
                    return;
                };
                if self.routes_generation.load(Ordering::Relaxed) != generation {
                    (generation, routes) = self.current_routes();
                }
                self.on_request(frame, permit, institution, draining, &routes);
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(SESSION_READ_BUFFER_BYTES);
            }
            // A partial frame must be completed in time (a trickling peer is cut
            // off); with nothing partial, the connection may be idle that long.
            let limit = if buf.is_empty() {
                frame_started = None;
                // Draining: look again soon whether everything has been answered.
                let wait = if draining {
                    DRAIN_LINGER
                } else {
                    self.config.idle_timeout
                };
                tokio::time::Instant::now() + wait
            } else {
                *frame_started.get_or_insert_with(tokio::time::Instant::now)
                    + self.config.frame_read_timeout
            };
            let read = tokio::select! {
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    continue;
                }
                read = tokio::time::timeout_at(limit, rd.read_buf(&mut buf)) => read,
            };
            match read {
                Ok(Ok(0)) => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    debug!(%institution, error = %e, "read failed");
                    return;
                }
                // Draining and nothing more sent: done once nothing is in flight.
                Err(_) if draining && buf.is_empty() => {
                    if tx.max_capacity() == tx.capacity() {
                        return;
                    }
                }
                Err(_) => {
                    let reason = if buf.is_empty() { "idle" } else { "slow_frame" };
                    metrics::counter!("switchyard_connections_closed_total", "reason" => reason)
                        .increment(1);
                    crate::log_limited!(warn, %institution, reason, "acquirer connection closed: read timeout");
                    return;
                }
            }
        }
    }

    fn on_request(
        &self,
        frame: bytes::Bytes,
        permit: mpsc::OwnedPermit<Reply>,
        institution: InstitutionId,
        draining: bool,
        routes: &crate::core::route::RouteTable,
    ) {
        let (msg, error) = Message::decode_partial(&self.config.dialect, frame);
        if let Some(e) = error {
            metrics::counter!("switchyard_rejected_input_total", "reason" => "format").increment(1);
            crate::log_limited!(warn, %institution, error = %e, "request does not match the dialect");
            if e.location == Location::Mti || !msg.mti().is_request() {
                return; // no answer can be formed; the permit returns unused
            }
            let code = ResponseCode::FormatError;
            permit.send(Reply::Switch {
                request: msg,
                code,
                connector: None,
                seq: 0,
            });
            return;
        }
        match admit(&msg, institution, routes) {
            // Shutting down: nothing new is forwarded.
            Admission::Forward { bank, .. } if draining => {
                metrics::counter!("switchyard_connector_unavailable_total", "reason" => "draining")
                    .increment(1);
                permit.send(Reply::Switch {
                    request: msg,
                    code: ResponseCode::DestinationUnavailable,
                    connector: Some(bank),
                    seq: 0,
                });
            }
            Admission::Forward { .. } if !self.within_rate(institution) => {
                permit.send(Reply::Switch {
                    request: msg,
                    code: ResponseCode::RateLimited,
                    connector: None,
                    seq: 0,
                });
            }
            Admission::Forward { bank, kind, .. } => {
                self.forward(msg, permit, institution, bank, kind)
            }
            Admission::Network(code) => {
                permit.send(Reply::Switch {
                    request: msg,
                    code,
                    connector: None,
                    seq: 0,
                });
            }
            Admission::Decline(code, reason) => {
                metrics::counter!("switchyard_declined_total", "code" => code.as_str(), "reason" => reason.as_str())
                    .increment(1);
                crate::log_limited!(warn, %institution, mti = %msg.mti(), code = %code, %reason, "request declined by the switch");
                permit.send(Reply::Switch {
                    request: msg,
                    code,
                    connector: None,
                    seq: 0,
                });
            }
            Admission::Unsolicited => {
                metrics::counter!("switchyard_rejected_input_total", "reason" => "unsolicited")
                    .increment(1);
                crate::log_limited!(warn, %institution, mti = %msg.mti(), "answer MTI from an acquirer dropped");
            }
        }
    }

    /// `bank`, or the first of its failover banks with a link up while it has none.
    fn failover(&self, bank: BankIndex) -> BankIndex {
        let primary = &self.connectors[usize::from(bank)];
        if primary.links_up() > 0 {
            return bank;
        }
        let alternate = primary.bank().failover.iter().copied().find(|&b| {
            self.connectors
                .get(usize::from(b))
                .is_some_and(|c| c.links_up() > 0)
        });
        match alternate {
            Some(b) => {
                metrics::counter!("switchyard_failover_total").increment(1);
                b
            }
            None => bank, // answered 91 at once by the connector
        }
    }

    /// A slot among `institution`'s requests in flight, if it is below its limit.
    fn inflight_slot(&self, institution: InstitutionId) -> Option<InstitutionSlot> {
        let rate = self.rates.get(&institution)?;
        let slot = InstitutionSlot::take(&rate.inflight, self.config.inflight_per_institution_max);
        if slot.is_none() {
            rate.inflight_refused.increment(1);
        }
        slot
    }

    /// Whether `institution` may send one more request now (its rate limit).
    fn within_rate(&self, institution: InstitutionId) -> bool {
        let Some(rate) = self.rates.get(&institution) else {
            return true; // every configured institution has one
        };
        let limiter = rate
            .limiter
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if limiter.check().is_ok() {
            return true;
        }
        rate.refused.increment(1);
        false
    }

    /// A request admitted for `bank`: checked against recent requests, journaled,
    /// and queued for its bank (a reversal for the bank that saw its original).
    fn forward(
        &self,
        msg: Message,
        permit: mpsc::OwnedPermit<Reply>,
        institution: InstitutionId,
        bank: BankIndex,
        kind: RequestKind,
    ) {
        let Some(slot) = self.inflight_slot(institution) else {
            crate::log_limited!(warn, %institution, limit = self.config.inflight_per_institution_max,
                "institution's requests in flight at the limit: answered 91");
            permit.send(Reply::Switch {
                request: msg,
                code: ResponseCode::DestinationUnavailable,
                connector: Some(bank),
                seq: 0,
            });
            return;
        };
        let received_at = Instant::now();
        let key = DuplicateKey::of(&msg);
        let (msg, permit) = match key {
            None => (msg, permit), // ids too long to key: not tracked
            Some(key) => {
                let digest = content_digest(&msg);
                let waiter = Awaiting::Duplicate {
                    request: msg,
                    reply: permit,
                };
                match self.recent.check(key, digest, received_at, waiter) {
                    Verdict::New(Awaiting::Duplicate { request, reply }) => (request, reply),
                    Verdict::New(Awaiting::Reversal(_)) => return,
                    verdict => return self.duplicate(verdict, institution),
                }
            }
        };
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let bank = self.failover(bank);
        let connector = &self.connectors[usize::from(bank)];
        let pending = Pending {
            request: msg,
            reply: permit,
            acquirer: institution,
            request_id,
            received_at,
            forwarded_at: received_at,
            bank,
            deadline: received_at + connector.request_timeout(),
            registered: key.is_some(),
            original_link_stan: None,
            slot,
        };
        if let Err(e) = self
            .journaling
            .accepted(request_id, institution, &pending.request)
        {
            metrics::counter!("switchyard_connector_unavailable_total", "reason" => "journal")
                .increment(1);
            crate::log_limited!(warn, %institution, error = %e, "request not journaled: answered 91");
            connector.refuse_unjournaled(pending);
            return;
        }
        if matches!(kind, RequestKind::Reversal | RequestKind::ReversalAdvice) {
            self.reverse(pending);
        } else {
            connector.submit(pending);
        }
    }

    /// Answers a request whose key was seen before.
    fn duplicate(&self, verdict: Verdict<Awaiting, Stored>, institution: InstitutionId) {
        let (result, code, waiter) = match verdict {
            Verdict::Answered {
                answer,
                seq,
                waiter: Awaiting::Duplicate { request, reply },
            } => {
                metrics::counter!("switchyard_duplicates_total", "result" => "answered_again")
                    .increment(1);
                debug!(%institution, mti = %request.mti(), "retransmission: original answer sent again");
                let dialect = match &answer {
                    Stored::Bank { connector, .. } => self
                        .connectors
                        .get(usize::from(*connector))
                        .map(|c| c.bank().dialect.clone()),
                    Stored::Switch(_) => None,
                };
                let dialect = dialect.unwrap_or_else(|| self.config.dialect.clone());
                reply.send(answer.reply_to(request, &dialect, seq));
                return;
            }
            Verdict::Waiting => {
                metrics::counter!("switchyard_duplicates_total", "result" => "waiting")
                    .increment(1);
                return;
            }
            Verdict::Conflict(w) => ("conflict", ResponseCode::Duplicate, w),
            Verdict::Full(w) => ("full", ResponseCode::DestinationUnavailable, w),
            Verdict::New(w) | Verdict::Answered { waiter: w, .. } => {
                ("unexpected", ResponseCode::SystemMalfunction, w)
            }
        };
        metrics::counter!("switchyard_duplicates_total", "result" => result).increment(1);
        crate::log_limited!(warn, %institution, %code, result, "request key seen before with other content, or table full");
        if let Awaiting::Duplicate { request, reply } = waiter {
            reply.send(Reply::Switch {
                request,
                code,
                connector: None,
                seq: 0,
            });
        }
    }

    /// Sends an acquirer's reversal where its original went, with DE90 naming the
    /// STAN the bank saw; waits for an original still in flight; answers 00 when the
    /// switch answered the original (never forwarded, or its own reversal advice is
    /// queued) and 25 when the original is not known.
    fn reverse(&self, pending: Pending) {
        let key = |with_rrn| DuplicateKey::of_original(&pending.request, with_rrn);
        let keys = [
            key(true),
            key(false).filter(|_| pending.request.field(37).is_some()),
        ];
        let mut waiter = Awaiting::Reversal(pending);
        for key in keys.into_iter().flatten() {
            waiter = match self.recent.original(&key, waiter) {
                Original::Attached => {
                    metrics::counter!("switchyard_reversals_matched_total", "original" => "in_flight")
                        .increment(1);
                    return;
                }
                Original::Done(stored, Awaiting::Reversal(mut p)) => {
                    let connector = &self.connectors[usize::from(p.bank)];
                    match stored {
                        Stored::Bank {
                            connector: to,
                            link_stan,
                            ..
                        } => {
                            metrics::counter!("switchyard_reversals_matched_total", "original" => "answered")
                                .increment(1);
                            p.bank = to;
                            p.original_link_stan = Some(link_stan);
                            self.connectors[usize::from(to)].submit(p);
                        }
                        Stored::Switch(_) => {
                            metrics::counter!("switchyard_reversals_matched_total", "original" => "switch_answered")
                                .increment(1);
                            connector.decline(p, ResponseCode::Approved);
                        }
                    }
                    return;
                }
                Original::Full(Awaiting::Reversal(p)) => {
                    let connector = &self.connectors[usize::from(p.bank)];
                    connector.decline(p, ResponseCode::DestinationUnavailable);
                    return;
                }
                Original::Absent(w) => w,
                Original::Done(_, w) | Original::Full(w) => w,
            };
        }
        if let Awaiting::Reversal(p) = waiter {
            metrics::counter!("switchyard_reversals_matched_total", "original" => "not_found")
                .increment(1);
            crate::log_limited!(warn, acquirer = %p.acquirer, "reversal names no known original: answered 25");
            let connector = &self.connectors[usize::from(p.bank)];
            connector.decline(p, ResponseCode::OriginalNotFound);
        }
    }

    async fn write_loop(
        &self,
        mut wr: tokio::io::WriteHalf<TlsStream<TcpStream>>,
        mut rx: mpsc::Receiver<Reply>,
        institution: InstitutionId,
    ) {
        let mut counters = ResponseCounters::new(institution, &self.connector_labels);
        let mut batch = Vec::with_capacity(SESSION_WRITE_BATCH_MAX);
        let mut out = BytesMut::with_capacity(64 * 1024);
        loop {
            if rx.recv_many(&mut batch, SESSION_WRITE_BATCH_MAX).await == 0 {
                let _ = wr.shutdown().await;
                return;
            }
            // Nothing leaves before the outcomes in this batch are durable.
            let seq = batch.iter().map(Reply::seq).max().unwrap_or(0);
            if !self.journaling.durable(seq).await {
                metrics::counter!("switchyard_connections_closed_total", "reason" => "journal")
                    .increment(1);
                crate::log_limited!(warn, %institution, "journal failed: answers withheld, connection closed");
                return;
            }
            for reply in batch.drain(..) {
                counters.count(&reply);
                if !encode_reply(&reply, &self.config.dialect, self.config.framing, &mut out) {
                    metrics::counter!("switchyard_encode_failures_total").increment(1);
                    crate::log_limited!(
                        warn,
                        "answer could not be encoded in the acquirer's dialect"
                    );
                }
            }
            let written = async {
                wr.write_all(&out).await?;
                wr.flush().await
            };
            match tokio::time::timeout(self.config.write_timeout, written).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(error = %e, "write to acquirer failed");
                    return;
                }
                Err(_) => {
                    metrics::counter!("switchyard_connections_closed_total", "reason" => "not_reading")
                        .increment(1);
                    crate::log_limited!(
                        warn,
                        "acquirer not reading its answers: connection closed"
                    );
                    return;
                }
            }
            out.clear();
        }
    }
}
