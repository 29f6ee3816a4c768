//! The admin HTTP endpoint (`[admin] listen`, loopback by default): `/metrics`
//! (Prometheus text), `/healthz`, `/readyz` and `/status` (JSON), and `POST
//! /reload` (what SIGHUP does; `switchyard reload` calls it).
//!
//! HTTP/1.1 is hyper's; the endpoint keeps its bounds through hyper's settings
//! and tower layers: a request head of at most `admin.request_head_max_bytes`
//! (hyper's read buffer; larger: 431), read within `admin.header_read_timeout_ms`
//! (hyper's header timer), a request done within `admin.request_timeout_ms`
//! (tower's timeout layer), one request per connection (no keep-alive), and at
//! most `admin.connections_max` connections at once (more are closed at accept and
//! counted in `switchyard_admin_refused_total`).
//!
//! What the endpoint shows and does it asks of an [`Operator`]: the daemon
//! implements it (`service`); the endpoint knows nothing else of the daemon.

use crate::config::AdminLimits;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
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
}

/// Serves the admin endpoint on `listener` until `shutdown`.
pub async fn serve<O: Operator>(
    listener: TcpListener,
    operator: Arc<O>,
    limits: AdminLimits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.connections_max));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(false)
        .max_buf_size(limits.request_head_max_bytes)
        .header_read_timeout(limits.header_read_timeout)
        .timer(TokioTimer::new());
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
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
        let operator = operator.clone();
        let service = tower::ServiceBuilder::new()
            .layer(tower::timeout::TimeoutLayer::new(limits.request_timeout))
            .service_fn(move |request| answer(operator.clone(), request));
        let connection =
            http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
        // The whole exchange is bounded too (a client that does not read its answer).
        let bound = limits.header_read_timeout + limits.request_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(bound, connection).await;
        });
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

async fn answer<O: Operator>(
    operator: Arc<O>,
    request: Request<Incoming>,
) -> Result<Answer, Infallible> {
    let path = request.uri().path();
    if request.method() == Method::POST && path == "/reload" {
        // In a task of its own: a client going away must not cut a reload short.
        let reload = tokio::spawn(async move { operator.reload().await });
        let result = reload
            .await
            .unwrap_or_else(|e| Some(Err(format!("reload failed: {e}"))));
        return Ok(match result {
            Some(Ok(what)) => {
                tracing::info!("{what} (admin endpoint)");
                text(StatusCode::OK, format!("{what}\n"))
            }
            Some(Err(why)) => {
                tracing::error!("config reload rejected, the running config stays: {why}");
                text(StatusCode::UNPROCESSABLE_ENTITY, format!("{why}\n"))
            }
            None => text(StatusCode::NOT_FOUND, "no config file to reload\n"),
        });
    }
    if request.method() != Method::GET {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET (and POST /reload)\n",
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

/// Largest answer body `request_reload` reads, bytes.
const RELOAD_ANSWER_MAX_BYTES: usize = 64 * 1024;

/// Why asking a switch to reload failed (before any answer).
#[derive(Debug, thiserror::Error)]
pub enum ReloadRequestError {
    /// The endpoint could not be reached.
    #[error("admin endpoint {addr}: {source}")]
    Connect {
        /// Where.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("admin endpoint {addr}: {message}")]
    Http {
        /// Where.
        addr: std::net::SocketAddr,
        /// Why.
        message: String,
    },
    /// No answer in time.
    #[error("admin endpoint {0}: no answer within {1:?}")]
    Timeout(std::net::SocketAddr, Duration),
}

/// `switchyard reload`: `POST /reload` to the admin endpoint at `addr`, within
/// `limit`. Returns whether the new config was applied, and the endpoint's words.
pub async fn request_reload(
    addr: std::net::SocketAddr,
    limit: Duration,
) -> Result<(bool, String), ReloadRequestError> {
    use http_body_util::{BodyExt, Empty, Limited};
    let http = |e: &dyn std::fmt::Display| ReloadRequestError::Http {
        addr,
        message: e.to_string(),
    };
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ReloadRequestError::Connect { addr, source })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| http(&e))?;
        tokio::spawn(connection);
        let request = Request::post("/reload")
            .header(hyper::header::HOST, "switchyard")
            .body(Empty::<Bytes>::new())
            .map_err(|e| http(&e))?;
        let answer = sender.send_request(request).await.map_err(|e| http(&e))?;
        let applied = answer.status() == StatusCode::OK;
        let body = Limited::new(answer.into_body(), RELOAD_ANSWER_MAX_BYTES)
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes();
        Ok((applied, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| ReloadRequestError::Timeout(addr, limit))?
}
