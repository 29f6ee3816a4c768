//! The admin HTTP endpoint (`[admin] listen`, loopback by default): `/metrics`
//! (Prometheus text), `/healthz`, `/readyz` and `/status` (JSON), and `POST
//! /reload` (what SIGHUP does; `switchyard reload` calls it).
//!
//! A deliberately small HTTP/1.1 server: `GET` (and that one `POST`), one request per connection
//! (`Connection: close`), a bounded request head read within a timeout, and a
//! bounded number of connections at once; anything else gets 4xx and is closed.

use crate::daemon::Switch;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Admin connections served at once; more are closed at accept.
pub const ADMIN_CONNECTIONS_MAX: usize = 64;
/// Largest request head read, bytes; a longer one gets 431.
pub const ADMIN_REQUEST_HEAD_MAX_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one admin request may take in all (a reload waits up to
/// [`crate::daemon::RELOAD_LINK_WAIT`] for new banks' links).
pub const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the admin endpoint on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    switch: Arc<Switch>,
    config_path: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) {
    let config_path = Arc::new(config_path);
    let slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS_MAX));
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
        let (metrics, switch, path) = (metrics.clone(), switch.clone(), config_path.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let answering = answer(tcp, &metrics, &switch, path.as_deref());
            let _ = tokio::time::timeout(ADMIN_REQUEST_TIMEOUT, answering).await;
        });
    }
}

async fn answer(
    mut tcp: TcpStream,
    metrics: &PrometheusHandle,
    switch: &Arc<Switch>,
    config_path: Option<&std::path::Path>,
) {
    let mut head = Vec::with_capacity(1024);
    let read_head = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() > ADMIN_REQUEST_HEAD_MAX_BYTES {
                return Err(true);
            }
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return Err(false),
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(ADMIN_IO_TIMEOUT, read_head).await {
        Ok(Ok(())) => {}
        Ok(Err(true)) => {
            let _ = respond(&mut tcp, 431, "text/plain", "request head too large\n").await;
            return;
        }
        Ok(Err(false)) | Err(_) => return,
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or(b"");
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (parts.next().unwrap_or(b""), parts.next().unwrap_or(b""));
    let path = path.split(|b| *b == b'?').next().unwrap_or(b"");
    if method == b"POST" && path == b"/reload" {
        // In a task of its own: a client going away must not cut a reload short.
        let result = match config_path {
            Some(p) => {
                let (switch, p) = (switch.clone(), p.to_owned());
                let reload = tokio::spawn(async move { switch.reload(&p).await });
                Some(
                    reload
                        .await
                        .unwrap_or_else(|e| Err(format!("reload failed: {e}"))),
                )
            }
            None => None,
        };
        let _ = match result {
            Some(Ok(what)) => {
                tracing::info!("{what} (admin endpoint)");
                respond(&mut tcp, 200, "text/plain", &format!("{what}\n")).await
            }
            Some(Err(why)) => {
                tracing::error!("config reload rejected, the running config stays: {why}");
                respond(&mut tcp, 422, "text/plain", &format!("{why}\n")).await
            }
            None => respond(&mut tcp, 404, "text/plain", "no config file to reload\n").await,
        };
        return;
    }
    if method != b"GET" {
        let _ = respond(&mut tcp, 405, "text/plain", "only GET (and POST /reload)\n").await;
        return;
    }
    let _ = match path {
        b"/metrics" => {
            switch.publish_metrics();
            let mut text = metrics.render();
            let live = switch.connectors();
            crate::telemetry::render_histograms(
                &mut text,
                live.iter().map(|c| (c.bank().id.to_string(), &c.latency)),
            );
            respond(&mut tcp, 200, "text/plain; version=0.0.4", &text).await
        }
        b"/healthz" => respond(&mut tcp, 200, "text/plain", "ok\n").await,
        b"/readyz" => {
            let (ready, why) = readiness(switch);
            let status = if ready { 200 } else { 503 };
            respond(&mut tcp, status, "text/plain", &format!("{why}\n")).await
        }
        b"/status" => {
            let body = status(switch).to_string();
            respond(&mut tcp, 200, "application/json", &body).await
        }
        _ => respond(&mut tcp, 404, "text/plain", "not found\n").await,
    };
}

async fn respond(
    tcp: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    tcp.shutdown().await
}

/// Ready when not shutting down, the journal (if configured) is open and has not
/// failed, and every bank not marked `optional` has a link up.
pub fn readiness(switch: &Switch) -> (bool, String) {
    if switch.is_draining() {
        return (false, "shutting down".to_owned());
    }
    if switch.journal().is_some_and(|j| j.has_failed()) {
        return (false, "journal failed".to_owned());
    }
    let down: Vec<String> = switch
        .connectors()
        .iter()
        .filter(|c| c.links_up() == 0 && !c.is_optional())
        .map(|c| c.bank().id.to_string())
        .collect();
    if !down.is_empty() {
        return (false, format!("no link up to bank {}", down.join(", ")));
    }
    (true, "ready".to_owned())
}

/// Sessions, connectors, links, queues, reversal backlog and journal, as JSON.
pub fn status(switch: &Switch) -> serde_json::Value {
    let connectors: Vec<serde_json::Value> = switch
        .connectors()
        .iter()
        .map(|c| {
            let s = &c.stats;
            let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            serde_json::json!({
                "bank": c.bank().id.to_string(),
                "links": c.links_configured(),
                "links_up": c.links_up(),
                "link_slots": c
                    .inflight_by_link()
                    .into_iter()
                    .map(|(slot, inflight)| serde_json::json!({"slot": slot, "inflight": inflight}))
                    .collect::<Vec<_>>(),
                "queue_depth": c.queue_depth(),
                "inflight": c.inflight(),
                "reversals_waiting": c.reversals_waiting(),
                "forwarded": n(&s.forwarded),
                "answered": n(&s.answered),
                "timed_out": n(&s.timed_out),
                "unavailable": n(&s.unavailable),
                "late_answers": n(&s.unmatched),
                "reversals_acknowledged": n(&s.reversals_acked),
            })
        })
        .collect();
    let journal = switch.journal().map(|j| {
        let (segments, bytes) = j.disk_usage();
        serde_json::json!({
            "failed": j.has_failed(),
            "segments": segments,
            "bytes": bytes,
            "queue_depth": j.queue_depth(),
            "durable_seq": j.durable(),
        })
    });
    let (ready, why) = readiness(switch);
    serde_json::json!({
        "ready": ready,
        "readiness": why,
        "draining": switch.is_draining(),
        "sessions": switch.connections(),
        "sessions_by_institution": switch
            .sessions_by_institution()
            .into_iter()
            .map(|(id, n)| (id.to_string(), serde_json::json!(n)))
            .collect::<serde_json::Map<_, _>>(),
        "connectors": connectors,
        "journal": journal,
        "duplicates_entries": switch.duplicates_entries(),
    })
}
