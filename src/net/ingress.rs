//! Acquirer sessions: accept mutual TLS, name the institution from its
//! certificate, read frames, admit or decline, and write answers in batches.

use super::durable::Durable;
use super::live::Live;
use crate::config::{Config, Listener};
use crate::core::answer::{encode_reply, Reply, ReversalRoute};
use crate::core::books::Books;
use crate::core::dedup::KeyTime;
use crate::core::recent::OriginalOf;
use crate::core::request::{Answer, AnswerSlot, InstitutionSlot, Pending};
use crate::core::route::{BankIndex, FailoverId};
use crate::core::validate::{admit, Admission, RequestKind};
use crate::core::writeahead::OutcomeSource;
use crate::core::{InstitutionId, ResponseCode};
use crate::security::{translate_pin, MacFailure, PinFailure, PinOut, NO_KEYS};
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
    /// The config the switch started with: what a reload cannot change (the
    /// acquirer dialect and framing, the frame bound).
    config: Arc<Config>,
    /// Acquirer connections open (each held by a [`ConnectionGuard`]).
    connections: Arc<Connections>,
    /// Open sessions per institution (entries removed when they reach zero).
    sessions: dashmap::DashMap<InstitutionId, usize>,
    /// Where requests are booked: the journal and the duplicates table.
    books: Books,
    /// Where a session's answers wait for their outcome records.
    durable: Durable,
    /// The next request id (journal records name requests by it).
    next_request_id: AtomicU64,
    /// What a reload replaces (routes, institutions, limits, connectors, TLS),
    /// and its generation: a session keeps its own copy of the `Arc` and looks at
    /// the lock only when the generation moved (one relaxed load per request).
    live: std::sync::RwLock<Arc<Live>>,
    generation: AtomicU64,
}

/// Per-session handles on `switchyard_responses_total{institution, connector, code}`,
/// created on first use so counting an answer is one atomic add, no allocation.
struct ResponseCounters {
    institution: String,
    handles: HashMap<(Option<BankIndex>, &'static str), metrics::Counter>,
}

impl ResponseCounters {
    fn new(institution: InstitutionId) -> Self {
        ResponseCounters {
            institution: institution.to_string(),
            handles: HashMap::new(),
        }
    }

    fn count(&mut self, reply: &Reply, live: &Live) {
        let key = (reply.connector(), reply.code_label());
        let handle = self.handles.entry(key).or_insert_with(|| {
            let connector = key
                .0
                .and_then(|i| live.connector(i))
                .map_or_else(|| "none".to_owned(), |c| c.bank().id.to_string());
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
    /// Shared session state: `config` is the config at start, `live` the first
    /// generation of what a reload may replace.
    pub fn new(
        config: Arc<Config>,
        live: Live,
        books: Books,
        durable: Durable,
        first_request_id: u64,
    ) -> Arc<Ingress> {
        Arc::new(Ingress {
            config,
            connections: Arc::new(Connections::default()),
            books,
            durable,
            next_request_id: AtomicU64::new(first_request_id),
            live: std::sync::RwLock::new(Arc::new(live)),
            generation: AtomicU64::new(0),
            sessions: dashmap::DashMap::new(),
        })
    }

    /// Puts a new generation in force: new connections use it at once, sessions
    /// from their next request on.
    pub fn replace_live(&self, live: Live) {
        *crate::sync::write(&self.live) = Arc::new(live);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// How many listeners the config the switch started with names.
    pub fn listeners(&self) -> usize {
        self.config.listeners.len()
    }

    /// The generation in force.
    pub fn live(&self) -> Arc<Live> {
        crate::sync::read(&self.live).clone()
    }

    fn current(&self) -> (u64, Arc<Live>) {
        let generation = self.generation.load(Ordering::Acquire);
        (generation, self.live())
    }

    /// A session's copy of the generation, refreshed when it moved (returns
    /// whether it did).
    fn refresh(&self, seen: &mut (u64, Arc<Live>)) -> bool {
        if self.generation.load(Ordering::Relaxed) == seen.0 {
            return false;
        }
        *seen = self.current();
        true
    }

    /// The id the next request will get (its journal position).
    pub fn next_request_id(&self) -> u64 {
        self.next_request_id.load(Ordering::Relaxed)
    }

    /// Open sessions by institution.
    pub fn sessions_by_institution(&self) -> Vec<(InstitutionId, usize)> {
        let mut all: Vec<_> = self
            .sessions
            .iter()
            .map(|e| (*e.key(), *e.value()))
            .collect();
        all.sort_unstable();
        all
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
        self.connections.open.load(Ordering::Relaxed)
    }

    /// Waits until no acquirer connection is open (a graceful shutdown's drain).
    pub async fn all_closed(&self) {
        loop {
            let closed = self.connections.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.connections() == 0 {
                return;
            }
            closed.await;
        }
    }

    /// Accepts acquirer connections until `shutdown` (the drain token: once it is
    /// cancelled, no connection is accepted, sessions answer new requests 91, and
    /// each closes once its requests in flight are answered).
    ///
    /// `index` names the listener in [`Config::listeners`]: its dialect, framing
    /// and header are the sessions'.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        index: usize,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
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
            let live = self.live();
            let limit = live.config.connections_max;
            let Some(guard) = ConnectionGuard::take(&self.connections, limit) else {
                metrics::counter!("switchyard_connections_refused_total", "reason" => "limit")
                    .increment(1);
                crate::log_limited!(warn, %peer, limit, "connection refused: limit");
                continue;
            };
            let this = self.clone();
            let acceptor = TlsAcceptor::from(live.tls.clone());
            drop(live);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                // Held by the task: given back when it ends, even by a panic.
                let _guard = guard;
                this.connection(tcp, peer, acceptor, index, shutdown).await;
            });
        }
    }

    async fn connection(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        acceptor: TlsAcceptor,
        index: usize,
        shutdown: CancellationToken,
    ) {
        let _ = tcp.set_nodelay(true);
        let limit = self.live().config.handshake_timeout;
        let handshake = tokio::time::timeout(limit, acceptor.accept(tcp));
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
        // The mapping in force after the handshake (a reload may have changed it).
        let live = self.live();
        let identity = connection_identity(tls.get_ref().1, self.config.identity);
        let institution = match identity.as_ref().map(|name| live.by_certificate.get(name)) {
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
        let limit = live.config.connections_per_institution_max;
        let inflight_max = live.config.inflight_per_connection_max;
        drop(live);
        if open > limit {
            self.session_closed(institution);
            metrics::counter!("switchyard_connections_refused_total", "reason" => "institution_limit")
                .increment(1);
            crate::log_limited!(warn, %peer, %institution, limit,
                "connection refused: the institution's connection limit");
            return;
        }
        crate::log_limited!(info, %peer, %institution, sessions = open, "acquirer session open");
        let wire = &self.config.listeners[index];
        self.session(tls, institution, inflight_max, wire, &shutdown)
            .await;
        self.session_closed(institution);
        crate::log_limited!(info, %peer, %institution, "acquirer session closed");
    }

    async fn session(
        &self,
        tls: TlsStream<TcpStream>,
        institution: InstitutionId,
        inflight_max: usize,
        wire: &Listener,
        shutdown: &CancellationToken,
    ) {
        let (rd, wr) = tokio::io::split(tls);
        let (tx, rx) = mpsc::channel::<Answer>(inflight_max);
        let reader = self.read_loop(rd, tx, institution, wire, shutdown);
        let writer = self.write_loop(wr, rx, institution, wire);
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
        tx: mpsc::Sender<Answer>,
        institution: InstitutionId,
        wire: &Listener,
        shutdown: &CancellationToken,
    ) {
        let decoder = FrameDecoder::new(wire.framing, self.config.frame_size_max_bytes);
        let mut buf = BytesMut::with_capacity(SESSION_READ_BUFFER_BYTES);
        // When the partial frame in `buf` began to arrive (None: nothing partial).
        let mut frame_started: Option<tokio::time::Instant> = None;
        let mut draining = shutdown.is_cancelled();
        let mut live = self.current();
        // Counted when this connection has its limit of requests in flight and
        // is not read further until answers go out (backpressure).
        let backpressure = metrics::counter!(
            "switchyard_connection_backpressure_total",
            "institution" => institution.to_string()
        );
        loop {
            loop {
                let mut frame = match decoder.decode(&mut buf) {
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
                // The header (TPDU) before the message; its answer carries it back.
                let Some(header) = wire.header.split(&mut frame) else {
                    metrics::counter!("switchyard_rejected_input_total", "reason" => "header")
                        .increment(1);
                    crate::log_limited!(warn, %institution, header = wire.header.kind(),
                        bytes = frame.len(), "frame shorter than its header: dropped");
                    continue;
                };
                let Ok(permit) = tx.clone().reserve_owned().await else {
                    return;
                };
                let permit = AnswerSlot::new(permit, header);
                if self.refresh(&mut live) && !live.1.institutions.contains_key(&institution) {
                    // Removed by a reload: this request is declined 58, and the
                    // session closes once its answers are out.
                    metrics::counter!("switchyard_connections_closed_total", "reason" => "institution_removed")
                        .increment(1);
                    crate::log_limited!(warn, %institution,
                        "institution removed by a reload: request declined 58, session closing");
                    let (msg, e) = Message::decode_partial(&wire.dialect, frame);
                    if e.is_none_or(|e| e.location != Location::Mti) && msg.mti().is_request() {
                        permit.send(Reply::switch(msg, ResponseCode::NotPermitted));
                    }
                    return;
                }
                self.on_request(frame, permit, institution, wire, draining, &live.1);
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
                    live.1.config.idle_timeout
                };
                tokio::time::Instant::now() + wait
            } else {
                *frame_started.get_or_insert_with(tokio::time::Instant::now)
                    + live.1.config.frame_read_timeout
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
        permit: AnswerSlot,
        institution: InstitutionId,
        wire: &Listener,
        draining: bool,
        live: &Live,
    ) {
        let keys = live
            .institutions
            .get(&institution)
            .map(|s| &s.config.security)
            .filter(|k| k.has_mac());
        // The message as it came, for its MAC (a reference count, not a copy).
        let raw = keys.map(|_| frame.clone());
        let (msg, error) = Message::decode_partial(&wire.dialect, frame);
        if let Some(e) = error {
            metrics::counter!("switchyard_rejected_input_total", "reason" => "format").increment(1);
            crate::log_limited!(warn, %institution, error = %e, "request does not match the dialect");
            if e.location == Location::Mti || !msg.mti().is_request() {
                return; // no answer can be formed; the permit returns unused
            }
            let code = ResponseCode::FormatError;
            permit.send(Reply::switch(msg, code));
            return;
        }
        if let (Some(keys), Some(raw)) = (keys, raw) {
            if let Err(failure) = keys.verify(&raw, &msg, &wire.dialect) {
                // Answered 63 (96 when the module could not be asked) and not
                // forwarded; the MAC itself is never logged.
                metrics::counter!("switchyard_mac_failures_total", "side" => "acquirer", "reason" => failure.as_str())
                    .increment(1);
                let code = if failure == MacFailure::Unavailable {
                    crate::log_limited!(error, %institution, mti = %msg.mti(),
                        "security module unavailable: request MAC not checked, answered 96");
                    ResponseCode::SystemMalfunction
                } else {
                    crate::log_limited!(warn, %institution, mti = %msg.mti(), reason = failure.as_str(),
                        "request MAC does not verify: answered 63");
                    ResponseCode::SecurityViolation
                };
                if msg.mti().is_request() {
                    permit.send(Reply::switch(msg, code));
                }
                return;
            }
        }
        match admit(&msg, institution, &live.routes) {
            // Shutting down: nothing new is forwarded.
            Admission::Forward { bank, .. } if draining => {
                metrics::counter!("switchyard_connector_unavailable_total", "reason" => "draining")
                    .increment(1);
                permit.send(Reply::switch(msg, ResponseCode::DestinationUnavailable).via(bank));
            }
            Admission::Forward { .. } if !within_rate(live, institution) => {
                permit.send(Reply::switch(msg, ResponseCode::RateLimited));
            }
            Admission::Forward {
                bank,
                failover,
                kind,
                ..
            } => {
                let bank = failover_of(live, bank, failover);
                self.forward(msg, permit, institution, (bank, kind), wire, live)
            }
            Admission::Network(code) => {
                permit.send(Reply::switch(msg, code));
            }
            Admission::Decline(code, reason) => {
                metrics::counter!("switchyard_declined_total", "code" => code.as_str(), "reason" => reason.as_str())
                    .increment(1);
                crate::log_limited!(warn, %institution, mti = %msg.mti(), code = %code, %reason, "request declined by the switch");
                permit.send(Reply::switch(msg, code));
            }
            Admission::Unsolicited => {
                metrics::counter!("switchyard_rejected_input_total", "reason" => "unsolicited")
                    .increment(1);
                crate::log_limited!(warn, %institution, mti = %msg.mti(), "answer MTI from an acquirer dropped");
            }
        }
    }

    /// A request admitted for `bank`: its duplicates entry opened (a repeat is
    /// answered there), journaled as accepted, and queued for its bank (a reversal
    /// for the bank that saw its original).
    fn forward(
        &self,
        msg: Message,
        permit: AnswerSlot,
        institution: InstitutionId,
        (bank, kind): (BankIndex, RequestKind),
        wire: &Listener,
        live: &Live,
    ) {
        let Some(slot) = inflight_slot(live, institution) else {
            crate::log_limited!(warn, %institution, limit = live.config.inflight_per_institution_max,
                "institution's requests in flight at the limit: answered 91");
            let code = ResponseCode::DestinationUnavailable;
            permit.send(Reply::switch(msg, code).via(bank));
            return;
        };
        let Some(connector) = live.connector(bank) else {
            return; // routes name configured slots only
        };
        let acquirer_keys = live
            .institutions
            .get(&institution)
            .map(|s| &s.config.security);
        let acquirer_keys = acquirer_keys.unwrap_or(&NO_KEYS);
        let reversal = matches!(kind, RequestKind::Reversal | RequestKind::ReversalAdvice);
        let pin = if reversal && msg.has(52) && acquirer_keys.pin.is_some() {
            // A reversal carries no PIN onwards (its bank is the original's).
            PinOut::Removed
        } else {
            match translate_pin(&msg, acquirer_keys, &connector.bank().security) {
                Ok(pin) => pin,
                Err(failure) => {
                    metrics::counter!("switchyard_pin_failures_total", "reason" => failure.as_str())
                        .increment(1);
                    let code = if failure == PinFailure::Unavailable {
                        crate::log_limited!(error, %institution, bank = %connector.bank().id,
                            "security module unavailable: PIN block not translated, answered 96");
                        ResponseCode::SystemMalfunction
                    } else {
                        crate::log_limited!(warn, %institution, bank = %connector.bank().id,
                            reason = failure.as_str(), "PIN block cannot be translated: answered 81");
                        ResponseCode::PinCryptographicError
                    };
                    permit.send(Reply::switch(msg, code).via(bank));
                    return;
                }
            }
        };
        let acquirer_mac = acquirer_keys.has_mac();
        let received_at = Instant::now();
        let dialect_of = |c: BankIndex| live.connector(c).map(|c| c.bank().dialect.clone());
        let Some(opened) = self.books.recent.open(
            msg,
            permit,
            institution,
            received_at,
            dialect_of,
            &wire.dialect,
        ) else {
            return; // a repeat: answered, or waiting for its original's answer
        };
        let pending = Pending {
            request: opened.request,
            reply: opened.reply,
            acquirer: institution,
            request_id: self.next_request_id.fetch_add(1, Ordering::Relaxed),
            received_at,
            forwarded_at: received_at,
            bank,
            deadline: received_at + connector.request_timeout(),
            entry: opened.entry,
            original_link_stan: None,
            slot,
            // The rule `open` keyed it by, journaled with it.
            key_time: KeyTime::of(wire.dialect.version()),
            pin,
            acquirer_mac,
            digest: opened.digest,
        };
        let Some(pending) = self.books.accept(pending) else {
            return; // not journaled: answered 91
        };
        if reversal {
            self.reverse(pending, live);
        } else {
            connector.submit(pending);
        }
    }

    /// Sends an acquirer's reversal where its original went, with DE90 naming the
    /// STAN the bank saw (see [`crate::core::answer::Stored::reversal_route`]); waits
    /// for an original still in flight; answers 00 when the switch answered the
    /// original, 91 when too many wait on it, and 25 when it is not known. The
    /// switch's own answers here never pass a connector.
    fn reverse(&self, pending: Pending, live: &Live) {
        let (p, code, matched) = match self.books.recent.original(pending) {
            OriginalOf::Waiting => {
                metrics::counter!("switchyard_reversals_matched_total", "original" => "in_flight")
                    .increment(1);
                return;
            }
            OriginalOf::Done(stored, mut p) => match stored.reversal_route() {
                ReversalRoute::Bank {
                    connector,
                    link_stan,
                } => {
                    metrics::counter!("switchyard_reversals_matched_total", "original" => "answered")
                        .increment(1);
                    // The bank that saw the original, under its slot now.
                    let to = live.serving(connector);
                    p.bank = to;
                    p.original_link_stan = Some(link_stan);
                    match live.connector(to) {
                        Some(c) => return c.submit(p),
                        None => (p, ResponseCode::DestinationUnavailable, None),
                    }
                }
                ReversalRoute::Approve => (p, ResponseCode::Approved, Some("switch_answered")),
            },
            OriginalOf::Full(p) => (p, ResponseCode::DestinationUnavailable, None),
            OriginalOf::NotFound(p) => {
                crate::log_limited!(warn, acquirer = %p.acquirer,
                    "reversal names no known original: answered 25");
                (p, ResponseCode::OriginalNotFound, Some("not_found"))
            }
        };
        if let Some(matched) = matched {
            metrics::counter!("switchyard_reversals_matched_total", "original" => matched)
                .increment(1);
        }
        self.books.answer_switch(p, code, OutcomeSource::Switch);
    }

    async fn write_loop(
        &self,
        mut wr: tokio::io::WriteHalf<TlsStream<TcpStream>>,
        mut rx: mpsc::Receiver<Answer>,
        institution: InstitutionId,
        wire: &Listener,
    ) {
        let mut counters = ResponseCounters::new(institution);
        let mut live = self.current();
        let mut batch = Vec::with_capacity(SESSION_WRITE_BATCH_MAX);
        let mut out = BytesMut::with_capacity(64 * 1024);
        loop {
            if rx.recv_many(&mut batch, SESSION_WRITE_BATCH_MAX).await == 0 {
                let _ = wr.shutdown().await;
                return;
            }
            // Nothing leaves before the outcomes in this batch are durable.
            let seq = batch.iter().map(|a| a.reply.seq()).max().unwrap_or(0);
            if !self.durable.wait(seq).await {
                metrics::counter!("switchyard_connections_closed_total", "reason" => "journal")
                    .increment(1);
                crate::log_limited!(warn, %institution, "journal failed: answers withheld, connection closed");
                return;
            }
            let _ = self.refresh(&mut live);
            let keys = live.1.institutions.get(&institution);
            let keys = keys.map_or(&NO_KEYS, |s| &s.config.security);
            for Answer { header, reply } in batch.drain(..) {
                counters.count(&reply, &live.1);
                let (dialect, framing) = ((&*wire.dialect, keys), wire.framing);
                if !encode_reply(&reply, dialect, framing, header.as_bytes(), &mut out) {
                    metrics::counter!("switchyard_encode_failures_total").increment(1);
                    crate::log_limited!(
                        warn,
                        "answer could not be encoded in the acquirer's dialect"
                    );
                }
            }
            let written = async {
                if !crate::cluster::may_act() {
                    // A cluster node whose lease ran out answers no more.
                    return Err(std::io::Error::other("cluster lease lost"));
                }
                wr.write_all(&out).await?;
                wr.flush().await
            };
            match tokio::time::timeout(live.1.config.write_timeout, written).await {
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

/// `bank`, or the first bank of the route's `failover` list with a link up while
/// it has none.
fn failover_of(live: &Live, bank: BankIndex, failover: FailoverId) -> BankIndex {
    let up = |b: BankIndex| live.connector(b).is_some_and(|c| c.links_up() > 0);
    if up(bank) {
        return bank;
    }
    match live
        .routes
        .failover(failover)
        .iter()
        .copied()
        .find(|&b| up(b))
    {
        Some(b) => {
            metrics::counter!("switchyard_failover_total").increment(1);
            b
        }
        None => bank, // answered 91 at once by the connector
    }
}

/// A slot among `institution`'s requests in flight, if it is below its limit.
fn inflight_slot(live: &Live, institution: InstitutionId) -> Option<InstitutionSlot> {
    let state = live.institutions.get(&institution)?;
    let slot = InstitutionSlot::take(&state.inflight, live.config.inflight_per_institution_max);
    if slot.is_none() {
        state.inflight_refused.increment(1);
    }
    slot
}

/// Whether `institution` may send one more request now (its rate limit).
fn within_rate(live: &Live, institution: InstitutionId) -> bool {
    let Some(state) = live.institutions.get(&institution) else {
        return true; // every configured institution has one
    };
    if state.limiter.check().is_ok() {
        return true;
    }
    state.refused.increment(1);
    false
}

/// Acquirer connections open, and a wake-up when the last one closes.
#[derive(Default)]
struct Connections {
    open: AtomicUsize,
    closed: tokio::sync::Notify,
}

/// One open acquirer connection, counted until dropped (a session that panics
/// gives its place back too).
struct ConnectionGuard(Arc<Connections>);

impl ConnectionGuard {
    /// A place among `connections` if fewer than `max` are open.
    fn take(connections: &Arc<Connections>, max: usize) -> Option<ConnectionGuard> {
        connections
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionGuard(connections.clone()))
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}
