//! The admin HTTP endpoint (`[admin] listen`, loopback by default): `/metrics`
//! (Prometheus text), `/healthz`, `/readyz` and `/status` (JSON), `POST
//! /reload` (what SIGHUP does; `switchyard reload` calls it), and `POST
//! /keys/rotate?bank=ID&type=zak|zpk` (a bank's working key rotated; `switchyard
//! keys rotate` calls it; answered in JSON once the bank answered the key change,
//! within `admin.request_timeout_ms` less [`ADMIN_ANSWER_MARGIN`]).
//!
//! Reading is open to whoever reaches the endpoint; changing the switch is not.
//! Every request with a method other than GET or HEAD (`POST /reload`, key
//! rotation, any path, known or not) passes one rule, [`allowed`], before it is
//! routed: without `[admin.tls]` it is served only to a loopback peer (and the
//! config refuses a non-loopback `admin.listen` then); with `[admin.tls]` the
//! endpoint speaks TLS only and a change needs a client certificate chaining to
//! `admin.tls.client_ca_file` (and carrying one of `admin.tls.client_names`, when
//! given), from loopback too. Anything else is answered 403 and counted in
//! `switchyard_admin_forbidden_total{reason}`.
//!
//! HTTP/1.1 is hyper's; the endpoint keeps its bounds through hyper's settings
//! and tower layers: a request head of at most `admin.request_head_max_bytes`
//! (hyper's read buffer; larger: 431), read within `admin.header_read_timeout_ms`
//! (hyper's header timer; with TLS the handshake gets the same time before it), a
//! request done within `admin.request_timeout_ms` (tower's timeout layer), one
//! request per connection (no keep-alive), and at most `admin.connections_max`
//! connections at once (more are closed at accept and counted in
//! `switchyard_admin_refused_total`).
//!
//! What the endpoint shows and does it asks of an [`Operator`]: the daemon
//! implements it (`service`); the endpoint knows nothing else of the daemon.

use crate::config::{AdminLimits, AdminTls};
use crate::core::ids::INSTITUTION_ID_DIGITS_MAX;
use crate::security::WorkingKey;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What the admin endpoint asks of the daemon.
pub trait Operator: Send + Sync + 'static {
    /// Prometheus text exposition of every metric.
    fn metrics(&self) -> String;
    /// Whether the switch is ready to serve, and why not (or "ready").
    fn readiness(&self) -> (bool, String);
    /// Sessions, connectors, links, queues, journal: a JSON object.
    fn status(&self) -> serde_json::Value;
    /// Reloads the config file: what was applied, or why it was rejected; `None`
    /// when the switch runs without a config file.
    fn reload(&self) -> impl Future<Output = Option<Result<String, String>>> + Send;
    /// Rotates working key `key` of bank `bank`: the HTTP status and the JSON
    /// answer (never a key or a key block).
    fn rotate_key(
        &self,
        bank: String,
        key: WorkingKey,
    ) -> impl Future<Output = (u16, serde_json::Value)> + Send;
    /// A cluster's active node steps down (drains, then gives its lease up so
    /// the standby takes over at once): whether this node is one.
    fn step_down(&self) -> bool {
        false
    }
}

/// Time kept for writing the answer of a long change (a key rotation) within
/// `admin.request_timeout_ms`: the change waits for its outcome that much less.
pub const ADMIN_ANSWER_MARGIN: Duration = Duration::from_secs(1);

// === who may change the switch ===

/// Where a request comes from and what its connection proved: all the rule for
/// changes ([`allowed`]) looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The TCP peer address.
    pub addr: SocketAddr,
    /// What the connection proved.
    pub credential: Credential,
}

/// What a connection to the admin endpoint proved about its client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Plain HTTP (no `[admin.tls]`): nothing beyond the peer address.
    Plain,
    /// TLS without a client certificate.
    Anonymous,
    /// TLS with a client certificate verified against `admin.tls.client_ca_file`:
    /// the names it carries (subject CNs, then DNS SANs; see
    /// [`crate::tls::certificate_names`]).
    Certificate(Vec<String>),
}

/// Why a request that would change the switch is refused (403).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Plain HTTP from an address other than loopback.
    #[error("changes are served to loopback clients only, or over TLS to an operator certificate")]
    NotLoopback,
    /// TLS, but no client certificate.
    #[error("changes need an operator client certificate")]
    NoCertificate,
    /// A certificate from the operator CA, but none of its names is in
    /// `admin.tls.client_names`.
    #[error("the client certificate names no allowed operator")]
    NameNotAllowed,
}

impl Refusal {
    /// The `reason` label of `switchyard_admin_forbidden_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::NotLoopback => "not-loopback",
            Refusal::NoCertificate => "no-certificate",
            Refusal::NameNotAllowed => "name-not-allowed",
        }
    }
}

/// Whether a request would change the switch: any method but GET and HEAD, on
/// any path (a route added later, such as key rotation, is covered unseen).
pub fn is_change(method: &Method) -> bool {
    method != Method::GET && method != Method::HEAD
}

/// The one rule for changes. Reading (GET, HEAD) is allowed to every peer that
/// reaches the endpoint. A change is allowed over plain HTTP to a loopback peer
/// only; over TLS to a client certificate (verified against the operator CA
/// during the handshake) that carries one of `client_names`, or any name when
/// `client_names` is `None`.
pub fn allowed(
    method: &Method,
    peer: &Peer,
    client_names: Option<&[String]>,
) -> Result<(), Refusal> {
    if !is_change(method) {
        return Ok(());
    }
    match &peer.credential {
        // An IPv4 peer of a dual-stack socket shows as ::ffff:127.0.0.1.
        Credential::Plain if peer.addr.ip().to_canonical().is_loopback() => Ok(()),
        Credential::Plain => Err(Refusal::NotLoopback),
        Credential::Anonymous => Err(Refusal::NoCertificate),
        Credential::Certificate(names) => match client_names {
            None => Ok(()),
            Some(allowed) if names.iter().any(|n| allowed.contains(n)) => Ok(()),
            Some(_) => Err(Refusal::NameNotAllowed),
        },
    }
}

// === the endpoint ===

/// Serves the admin endpoint on `listener` until `shutdown`: plain HTTP, or TLS
/// only with `tls` (`[admin.tls]`).
pub async fn serve<O: Operator>(
    listener: TcpListener,
    operator: Arc<O>,
    limits: AdminLimits,
    tls: Option<AdminTls>,
    shutdown: CancellationToken,
) -> TcpListener {
    let slots = Arc::new(Semaphore::new(limits.connections_max));
    let endpoint = Arc::new(Endpoint::new(operator, limits, tls));
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => return listener,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("switchyard_admin_refused_total").increment(1);
            continue; // dropped: closed
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let _slot = slot;
            endpoint.connection(tcp, addr).await;
        });
    }
}

/// What every admin connection shares.
struct Endpoint<O> {
    operator: Arc<O>,
    limits: AdminLimits,
    http: hyper::server::conn::http1::Builder,
    /// With `[admin.tls]`: TLS only.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// `admin.tls.client_names`.
    client_names: Option<Arc<[String]>>,
}

impl<O: Operator> Endpoint<O> {
    fn new(operator: Arc<O>, limits: AdminLimits, tls: Option<AdminTls>) -> Endpoint<O> {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.keep_alive(false)
            .max_buf_size(limits.request_head_max_bytes)
            .header_read_timeout(limits.header_read_timeout)
            .timer(TokioTimer::new());
        let (tls, client_names) = match tls {
            Some(t) => (
                Some(tokio_rustls::TlsAcceptor::from(t.server)),
                t.client_names,
            ),
            None => (None, None),
        };
        Endpoint {
            operator,
            limits,
            http,
            tls,
            client_names,
        }
    }

    /// One accepted connection: the TLS handshake (bounded by the header read
    /// timeout), then one exchange.
    async fn connection(&self, tcp: TcpStream, addr: SocketAddr) {
        let Some(acceptor) = &self.tls else {
            let peer = Peer {
                addr,
                credential: Credential::Plain,
            };
            return self.exchange(tcp, peer).await;
        };
        let why = match tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(tcp))
            .await
        {
            Ok(Ok(stream)) => {
                let credential = match stream.get_ref().1.peer_certificates() {
                    Some([leaf, ..]) => Credential::Certificate(
                        // Verified by the handshake; unreadable names match none.
                        crate::tls::certificate_names(leaf).unwrap_or_default(),
                    ),
                    _ => Credential::Anonymous,
                };
                return self.exchange(stream, Peer { addr, credential }).await;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        metrics::counter!("switchyard_admin_handshakes_failed_total").increment(1);
        crate::log_limited!(warn, peer = %addr, error = %why, "admin TLS handshake failed");
    }

    /// One HTTP exchange on an established connection from `peer`; the whole of
    /// it bounded too (a client that does not read its answer).
    async fn exchange<IO>(&self, io: IO, peer: Peer)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let operator = self.operator.clone();
        let client_names = self.client_names.clone();
        let rotate_wait = self
            .limits
            .request_timeout
            .saturating_sub(ADMIN_ANSWER_MARGIN);
        let service = tower::ServiceBuilder::new()
            .layer(tower::timeout::TimeoutLayer::new(
                self.limits.request_timeout,
            ))
            .service_fn(move |request| {
                answer(
                    operator.clone(),
                    peer.clone(),
                    client_names.clone(),
                    rotate_wait,
                    request,
                )
            });
        let connection = self
            .http
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let bound = self.limits.header_read_timeout + self.limits.request_timeout;
        let _ = tokio::time::timeout(bound, connection).await;
    }
}

type Answer = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(body)));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    answer
}

fn text(status: StatusCode, body: impl Into<String>) -> Answer {
    respond(status, "text/plain", body.into())
}

/// Answers one request; the rule for changes comes before any routing.
async fn answer<O: Operator>(
    operator: Arc<O>,
    peer: Peer,
    client_names: Option<Arc<[String]>>,
    rotate_wait: Duration,
    request: Request<Incoming>,
) -> Result<Answer, Infallible> {
    let path = request.uri().path();
    if let Err(refusal) = allowed(request.method(), &peer, client_names.as_deref()) {
        metrics::counter!("switchyard_admin_forbidden_total", "reason" => refusal.as_str())
            .increment(1);
        crate::log_limited!(warn, peer = %peer.addr, method = %request.method(), path,
            reason = refusal.as_str(), "admin request refused");
        return Ok(text(
            StatusCode::FORBIDDEN,
            format!("forbidden: {refusal}\n"),
        ));
    }
    if request.method() == Method::POST && path == "/reload" {
        return Ok(reload(operator, &peer).await);
    }
    if request.method() == Method::POST && path == "/keys/rotate" {
        return Ok(rotate(operator, &peer, request.uri().query(), rotate_wait).await);
    }
    if request.method() == Method::POST && path == "/cluster/step-down" {
        tracing::warn!(peer = %peer.addr, operator = operator_name(&peer),
            "cluster step-down asked (admin endpoint)");
        return Ok(if operator.step_down() {
            json(
                200,
                &serde_json::json!({"ok": true,
                "detail": "draining; the lease is given up once drained and the standby takes over"}),
            )
        } else {
            json(
                409,
                &serde_json::json!({"ok": false, "reason": "not a cluster node"}),
            )
        });
    }
    if request.method() != Method::GET {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET (and POST /reload, /keys/rotate, /cluster/step-down)\n",
        ));
    }
    Ok(match path {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            operator.metrics(),
        ),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let (ready, why) = operator.readiness();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, format!("{why}\n"))
        }
        "/status" => respond(
            StatusCode::OK,
            "application/json",
            operator.status().to_string(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

/// `POST /reload`, once allowed.
async fn reload<O: Operator>(operator: Arc<O>, peer: &Peer) -> Answer {
    let by = operator_name(peer);
    // In a task of its own: a client going away must not cut a reload short.
    let reload = tokio::spawn(async move { operator.reload().await });
    let result = reload
        .await
        .unwrap_or_else(|e| Some(Err(format!("reload failed: {e}"))));
    match result {
        Some(Ok(what)) => {
            tracing::info!(peer = %peer.addr, operator = by, "{what} (admin endpoint)");
            text(StatusCode::OK, format!("{what}\n"))
        }
        Some(Err(why)) => {
            tracing::error!("config reload rejected, the running config stays: {why}");
            text(StatusCode::UNPROCESSABLE_ENTITY, format!("{why}\n"))
        }
        None => text(StatusCode::NOT_FOUND, "no config file to reload\n"),
    }
}

/// The operator's name for log lines: the first name of its certificate.
fn operator_name(peer: &Peer) -> &str {
    match &peer.credential {
        Credential::Certificate(names) => names.first().map_or("", String::as_str),
        Credential::Plain | Credential::Anonymous => "",
    }
}

/// `bank` and `type` of `POST /keys/rotate`, or why the query is refused.
fn rotate_params(query: Option<&str>) -> Result<(String, WorkingKey), String> {
    let (mut bank, mut key) = (None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("bank", v)) => bank = Some(v),
            Some(("type", v)) => key = Some(v),
            _ => return Err("parameters: bank=ID&type=zak|zpk".to_owned()),
        }
    }
    let bank = bank
        .filter(|b| (1..=INSTITUTION_ID_DIGITS_MAX).contains(&b.len()))
        .filter(|b| b.bytes().all(|c| c.is_ascii_digit()))
        .ok_or_else(|| {
            format!("bank: an institution id of 1 to {INSTITUTION_ID_DIGITS_MAX} digits")
        })?;
    let key = key
        .and_then(WorkingKey::from_name)
        .ok_or_else(|| "type: zak or zpk".to_owned())?;
    Ok((bank.to_owned(), key))
}

fn json(status: u16, body: &serde_json::Value) -> Answer {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    respond(status, "application/json", format!("{body}\n"))
}

/// `POST /keys/rotate`, once allowed: the rotation runs in a task of its own (a
/// client going away does not cut it short), answered within `wait`.
async fn rotate<O: Operator>(
    operator: Arc<O>,
    peer: &Peer,
    query: Option<&str>,
    wait: Duration,
) -> Answer {
    let (bank, key) = match rotate_params(query) {
        Ok(params) => params,
        Err(why) => return json(400, &serde_json::json!({"ok": false, "reason": why})),
    };
    let by = operator_name(peer);
    tracing::info!(peer = %peer.addr, operator = by, bank, key = key.as_str(),
        "working-key rotation asked (admin endpoint)");
    let task = tokio::spawn(async move { operator.rotate_key(bank, key).await });
    match tokio::time::timeout(wait, task).await {
        Ok(Ok((status, body))) => json(status, &body),
        Ok(Err(e)) => json(
            500,
            &serde_json::json!({"ok": false, "reason": format!("rotation failed: {e}")}),
        ),
        Err(_) => json(
            504,
            &serde_json::json!({"ok": false, "reason": format!(
                "no outcome within {wait:?}; the rotation goes on: see the switch's log"
            )}),
        ),
    }
}

/// Largest answer body `request_reload` and `request_rotate` read, bytes.
const RELOAD_ANSWER_MAX_BYTES: usize = 64 * 1024;

/// Why asking a switch to reload failed (before any answer).
#[derive(Debug, thiserror::Error)]
pub enum ReloadRequestError {
    /// The endpoint could not be reached.
    #[error("admin endpoint {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake failed (an unknown server certificate, or the endpoint
    /// refused the client's).
    #[error("admin endpoint {addr}: TLS handshake: {source}")]
    Handshake {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("admin endpoint {addr}: {message}")]
    Http {
        /// Where.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
    /// No answer in time.
    #[error("admin endpoint {0}: no answer within {1:?}")]
    Timeout(SocketAddr, Duration),
}

/// How `switchyard reload` reaches an endpoint with `[admin.tls]`: the client
/// configuration (trusting the endpoint's CA, presenting an operator certificate)
/// and the name the endpoint's certificate must carry.
#[derive(Clone, Debug)]
pub struct ReloadTls {
    /// Trust and, for a change to be allowed, an operator certificate.
    pub config: Arc<rustls::ClientConfig>,
    /// The endpoint certificate's name (a DNS name or an IP address).
    pub server_name: rustls::pki_types::ServerName<'static>,
}

/// Why a [`ReloadTls`] could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReloadTlsError {
    /// A certificate or key file.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The server name.
    #[error("server name {0:?} is neither a DNS name nor an IP address")]
    ServerName(String),
}

impl ReloadTls {
    /// Reads `ca` (the endpoint's CA) and, when given, the operator certificate
    /// chain and key, each a regular file of at most
    /// [`crate::config::ADMIN_TLS_FILE_SIZE_MAX_BYTES`].
    pub fn from_files(
        ca: &std::path::Path,
        operator: Option<(&std::path::Path, &std::path::Path)>,
        server_name: &str,
    ) -> Result<ReloadTls, ReloadTlsError> {
        use crate::tls::{load_certs_bounded, load_key_bounded};
        let max = crate::config::ADMIN_TLS_FILE_SIZE_MAX_BYTES;
        let anchors = load_certs_bounded(ca, max)?;
        let config = match operator {
            Some((cert, key)) => crate::tls::client_config(
                &anchors,
                load_certs_bounded(cert, max)?,
                load_key_bounded(key, max)?,
            )?,
            None => crate::tls::client_config_anonymous(&anchors)?,
        };
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|_| ReloadTlsError::ServerName(server_name.to_owned()))?;
        Ok(ReloadTls {
            config,
            server_name,
        })
    }
}

/// `switchyard reload`: `POST /reload` to the admin endpoint at `addr` (over TLS
/// with `tls`), within `limit`. Returns whether the new config was applied, and
/// the endpoint's words.
pub async fn request_reload(
    addr: SocketAddr,
    tls: Option<&ReloadTls>,
    limit: Duration,
) -> Result<(bool, String), ReloadRequestError> {
    let (status, words) = request_post(addr, tls, "/reload", limit).await?;
    Ok((status == StatusCode::OK, words))
}

/// `switchyard keys rotate`: `POST /keys/rotate?bank=..&type=..` to the admin
/// endpoint at `addr` (over TLS with `tls`), within `limit`. Returns the HTTP
/// status and the endpoint's JSON answer (as text).
pub async fn request_rotate(
    addr: SocketAddr,
    tls: Option<&ReloadTls>,
    bank: &str,
    key: WorkingKey,
    limit: Duration,
) -> Result<(u16, String), ReloadRequestError> {
    let path = format!("/keys/rotate?bank={bank}&type={}", key.as_str());
    let (status, words) = request_post(addr, tls, &path, limit).await?;
    Ok((status.as_u16(), words))
}

/// Asks the switch at `addr` to step down (`POST /cluster/step-down`): the HTTP
/// status and the answer's body.
pub async fn request_step_down(
    addr: SocketAddr,
    tls: Option<&ReloadTls>,
    limit: Duration,
) -> Result<(u16, String), ReloadRequestError> {
    let (status, words) = request_post(addr, tls, "/cluster/step-down", limit).await?;
    Ok((status.as_u16(), words))
}

/// `POST path` to the admin endpoint at `addr` (over TLS with `tls`), within
/// `limit`: the status and the answer's body.
async fn request_post(
    addr: SocketAddr,
    tls: Option<&ReloadTls>,
    path: &str,
    limit: Duration,
) -> Result<(StatusCode, String), ReloadRequestError> {
    let exchange = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ReloadRequestError::Connect { addr, source })?;
        match tls {
            None => post(tcp, addr, path).await,
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let stream = connector
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|source| ReloadRequestError::Handshake { addr, source })?;
                post(stream, addr, path).await
            }
        }
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| ReloadRequestError::Timeout(addr, limit))?
}

/// `POST path` on an established connection to `addr`.
async fn post<IO>(
    io: IO,
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, String), ReloadRequestError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::{BodyExt, Empty, Limited};
    let http = |e: &dyn std::fmt::Display| ReloadRequestError::Http {
        addr,
        message: e.to_string(),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| http(&e))?;
    tokio::spawn(connection);
    let request = Request::post(path)
        .header(hyper::header::HOST, "switchyard")
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(&e))?;
    let answer = sender.send_request(request).await.map_err(|e| http(&e))?;
    let status = answer.status();
    let body = Limited::new(answer.into_body(), RELOAD_ANSWER_MAX_BYTES)
        .collect()
        .await
        .map_err(|e| http(&e))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An operator that counts reloads and rotations.
    #[derive(Default)]
    struct Counting {
        reloads: AtomicUsize,
        rotations: AtomicUsize,
    }

    impl Operator for Counting {
        fn metrics(&self) -> String {
            "# metrics\n".to_owned()
        }
        fn readiness(&self) -> (bool, String) {
            (true, "ready".to_owned())
        }
        fn status(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        async fn reload(&self) -> Option<Result<String, String>> {
            self.reloads.fetch_add(1, Ordering::SeqCst);
            Some(Ok("config reloaded".to_owned()))
        }
        async fn rotate_key(&self, bank: String, key: WorkingKey) -> (u16, serde_json::Value) {
            self.rotations.fetch_add(1, Ordering::SeqCst);
            (
                200,
                serde_json::json!({"ok": true, "bank": bank, "key": key.as_str()}),
            )
        }
    }

    fn peer(addr: &str, credential: Credential) -> Peer {
        Peer {
            addr: addr.parse().unwrap(),
            credential,
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn changes_need_loopback_or_an_operator_certificate() {
        let remote = peer("192.0.2.1:40000", Credential::Plain);
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            assert_eq!(
                allowed(&method, &remote, None),
                Err(Refusal::NotLoopback),
                "{method}"
            );
        }
        // Reading is open to whoever reaches the endpoint.
        assert_eq!(allowed(&Method::GET, &remote, None), Ok(()));
        assert_eq!(allowed(&Method::HEAD, &remote, None), Ok(()));
        for local in ["127.0.0.1:1", "[::1]:1", "[::ffff:127.0.0.1]:1"] {
            let p = peer(local, Credential::Plain);
            assert_eq!(allowed(&Method::POST, &p, None), Ok(()), "{local}");
        }
        // Over TLS the address does not help: a certificate is needed, from
        // loopback too.
        let anonymous = peer("127.0.0.1:1", Credential::Anonymous);
        assert_eq!(
            allowed(&Method::POST, &anonymous, None),
            Err(Refusal::NoCertificate)
        );
        assert_eq!(allowed(&Method::GET, &anonymous, None), Ok(()));
        let operator = peer(
            "192.0.2.1:40000",
            Credential::Certificate(names(&["ops-1", "ops-1.example"])),
        );
        assert_eq!(allowed(&Method::POST, &operator, None), Ok(()));
        let list = names(&["ops-0", "ops-1.example"]);
        assert_eq!(allowed(&Method::POST, &operator, Some(&list)), Ok(()));
        let list = names(&["ops-2"]);
        assert_eq!(
            allowed(&Method::POST, &operator, Some(&list)),
            Err(Refusal::NameNotAllowed)
        );
        let nameless = peer("192.0.2.1:40000", Credential::Certificate(Vec::new()));
        assert_eq!(
            allowed(&Method::POST, &nameless, Some(&list)),
            Err(Refusal::NameNotAllowed)
        );
    }

    /// Sends `request` over an in-memory connection from `peer` to an endpoint
    /// allowing `client_names`; the status and body of the answer.
    async fn exchange(
        operator: &Arc<Counting>,
        client_names: Option<&[&str]>,
        peer: Peer,
        request: &str,
    ) -> (u16, String) {
        let mut endpoint = Endpoint::new(operator.clone(), AdminLimits::default(), None);
        endpoint.client_names = client_names.map(|n| names(n).into());
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(async move { endpoint.exchange(server, peer).await });
        client.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        serving.await.unwrap();
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_owned());
        (status, body)
    }

    #[tokio::test]
    async fn a_remote_change_without_a_certificate_is_refused_before_routing() {
        let operator = Arc::new(Counting::default());
        let remote = || peer("192.0.2.1:40000", Credential::Plain);
        let post = |path: &str| format!("POST {path} HTTP/1.1\r\nHost: s\r\n\r\n");
        for path in ["/reload", "/keys/rotate", "/nope"] {
            let (code, body) = exchange(&operator, None, remote(), &post(path)).await;
            assert_eq!(code, 403, "{path}: {body}");
            assert_eq!(
                body,
                "forbidden: changes are served to loopback clients only, or over TLS to an \
                 operator certificate\n"
            );
        }
        assert_eq!(operator.reloads.load(Ordering::SeqCst), 0);
        // Reading stays open.
        let get = "GET /healthz HTTP/1.1\r\nHost: s\r\n\r\n";
        assert_eq!(
            exchange(&operator, None, remote(), get).await,
            (200, "ok\n".to_owned())
        );
        // Over TLS without a certificate, or with one not named: refused too.
        let anonymous = peer("192.0.2.1:40000", Credential::Anonymous);
        let (code, _) = exchange(&operator, None, anonymous, &post("/reload")).await;
        assert_eq!(code, 403);
        let stranger = peer("192.0.2.1:40000", Credential::Certificate(names(&["x"])));
        let allowed = Some(&["ops-1"][..]);
        let (code, body) = exchange(&operator, allowed, stranger, &post("/reload")).await;
        assert_eq!(
            (code, body.as_str()),
            (
                403,
                "forbidden: the client certificate names no allowed operator\n"
            )
        );
        assert_eq!(operator.reloads.load(Ordering::SeqCst), 0);
        // An allowed operator certificate, from the same remote address: served.
        let ops = peer(
            "192.0.2.1:40000",
            Credential::Certificate(names(&["ops-1"])),
        );
        let (code, body) = exchange(&operator, allowed, ops, &post("/reload")).await;
        assert_eq!((code, body.as_str()), (200, "config reloaded\n"));
        assert_eq!(operator.reloads.load(Ordering::SeqCst), 1);
        // Plain HTTP from loopback: served as before; an unknown change is 405.
        let local = || peer("127.0.0.1:40000", Credential::Plain);
        assert_eq!(
            exchange(&operator, None, local(), &post("/reload")).await.0,
            200
        );
        assert_eq!(operator.reloads.load(Ordering::SeqCst), 2);
        assert_eq!(operator.rotations.load(Ordering::SeqCst), 0);
        assert_eq!(
            exchange(&operator, None, local(), &post("/nope")).await.0,
            405
        );
    }

    #[tokio::test]
    async fn a_key_rotation_names_its_bank_and_key_type() {
        let operator = Arc::new(Counting::default());
        let local = || peer("127.0.0.1:40000", Credential::Plain);
        let post = |path: &str| format!("POST {path} HTTP/1.1\r\nHost: s\r\n\r\n");
        for query in [
            "",
            "?bank=200001",
            "?type=zak",
            "?bank=20000a&type=zak",
            "?bank=200001&type=zmk",
            "?bank=200001&type=zak&x=1",
            "?bank=123456789012&type=zpk",
        ] {
            let (code, body) = exchange(
                &operator,
                None,
                local(),
                &post(&format!("/keys/rotate{query}")),
            )
            .await;
            assert_eq!(code, 400, "{query}: {body}");
            assert!(body.contains("\"ok\":false"), "{body}");
        }
        assert_eq!(operator.rotations.load(Ordering::SeqCst), 0);
        let (code, body) = exchange(
            &operator,
            None,
            local(),
            &post("/keys/rotate?type=zpk&bank=200001"),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"ok": true, "bank": "200001", "key": "zpk"})
        );
        assert_eq!(operator.rotations.load(Ordering::SeqCst), 1);
    }
}
