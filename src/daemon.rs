//! The daemon: wires config, TLS, connectors and the acquirer listener together.

use crate::config::{Config, TlsFiles};
use crate::core::inflight::Stan;
use crate::journal::recovery::Recovery;
use crate::journal::{Journal, JournalError};
use crate::net::connector::Connector;
use crate::net::ingress::Ingress;
use crate::net::journaling::Journaling;
use crate::telemetry::{self, PUBLISH_INTERVAL};
use crate::tls::{self, TlsError};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// TLS configurations of the switch: towards acquirers and towards banks.
#[derive(Clone)]
pub struct TlsSetup {
    /// Server side, requiring client certificates from the configured CA.
    pub server: Arc<rustls::ServerConfig>,
    /// Client side, presenting the switch's client certificate to banks.
    pub client: Arc<rustls::ClientConfig>,
}

impl TlsSetup {
    /// Loads the certificate files named in the config.
    pub fn from_files(files: &TlsFiles) -> Result<TlsSetup, TlsError> {
        let ca = tls::load_certs(&files.ca_file)?;
        let server = tls::server_config(
            &ca,
            tls::load_certs(&files.cert_file)?,
            tls::load_key(&files.key_file)?,
        )?;
        let client = tls::client_config(
            &ca,
            tls::load_certs(&files.client_cert_file)?,
            tls::load_key(&files.client_key_file)?,
        )?;
        Ok(TlsSetup { server, client })
    }
}

/// A running switch: connectors started, ready to serve a listener.
pub struct Switch {
    config: Arc<Config>,
    tls: TlsSetup,
    connectors: Vec<Arc<Connector>>,
    ingress: Arc<Ingress>,
    link_changed: Arc<Notify>,
    shutdown: CancellationToken,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    journal: Option<Arc<Journal>>,
}

impl Switch {
    /// Opens the journal (when configured: every record is checked and a torn tail
    /// truncated) and starts every bank connector's links (call inside a tokio
    /// runtime).
    pub fn start(config: Config, tls: TlsSetup) -> Result<Switch, JournalError> {
        let (journaling, journal, first_request_id, recovery) = match &config.journal {
            Some(jc) => {
                let opened = Journal::open(jc.clone())?;
                tracing::info!(
                    "{}",
                    crate::journal::dump::report(&jc.dir, &opened.recovered)
                );
                // A second pass over the journal for now (the first checked it).
                let (_, recovery) = crate::journal::recovery::recover(&jc.dir)?;
                if recovery.unfinished.is_empty() && recovery.reversals_pending.is_empty() {
                    tracing::info!("journal: nothing unfinished");
                } else {
                    let summary = crate::journal::recovery::summary(&recovery);
                    tracing::warn!("journal {summary}: resuming");
                }
                let next = opened.recovered.seq_range.map_or(1, |(_, last)| last + 1);
                let journal = Arc::new(opened.journal);
                (
                    Journaling::new(journal.clone()),
                    Some(journal),
                    next,
                    Some(recovery),
                )
            }
            None => (Journaling::off(), None, 1, None),
        };
        let config = Arc::new(config);
        let shutdown = CancellationToken::new();
        let link_changed = Arc::new(Notify::new());
        let connectors: Vec<Arc<Connector>> = config
            .banks
            .iter()
            .enumerate()
            .map(|(index, bank)| {
                Connector::new(
                    index as crate::core::route::BankIndex,
                    bank.clone(),
                    config.dialect.clone(),
                    tls.client.clone(),
                    config.frame_size_max_bytes,
                    link_changed.clone(),
                    journaling.clone(),
                )
            })
            .collect();
        let mut tasks: Vec<_> = connectors
            .iter()
            .flat_map(|c| c.spawn_links(&shutdown))
            .collect();
        if let Some(recovery) = recovery {
            resume(&config, &connectors, &journaling, recovery);
        }
        let ingress = Ingress::new(
            config.clone(),
            connectors.clone(),
            journaling,
            first_request_id,
        );
        tasks.push(tokio::spawn(publish_loop(
            connectors.clone(),
            ingress.clone(),
            shutdown.clone(),
        )));
        let tasks = std::sync::Mutex::new(tasks);
        Ok(Switch {
            config,
            tls,
            connectors,
            ingress,
            link_changed,
            shutdown,
            tasks,
            journal,
        })
    }

    /// The journal, when configured.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_deref()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The bank connectors, in config order.
    pub fn connectors(&self) -> &[Arc<Connector>] {
        &self.connectors
    }

    /// Acquirer connections open now.
    pub fn connections(&self) -> usize {
        self.ingress.connections()
    }

    /// Open acquirer sessions of `institution`.
    pub fn sessions_of(&self, institution: crate::core::InstitutionId) -> usize {
        self.ingress.sessions_of(institution)
    }

    /// Publishes all gauges now (the publisher also does so once a second).
    pub fn publish_metrics(&self) {
        Gauges::new(&self.connectors).publish(&self.connectors, &self.ingress);
    }

    /// Waits until every bank has at least one link up, or `limit` passes.
    pub async fn wait_links_up(&self, limit: Duration) -> bool {
        let all_up = || self.connectors.iter().all(|c| c.links_up() > 0);
        let wait = async {
            loop {
                let changed = self.link_changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if all_up() {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// Serves acquirers on `listener` until [`Switch::shutdown`] is called.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        let serving =
            self.ingress
                .clone()
                .serve(listener, self.tls.server.clone(), self.shutdown.clone());
        serving.await
    }

    /// A token cancelled at shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, closes sessions and links, and waits for the link tasks.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
        if let Some(journal) = &self.journal {
            // Whatever is queued is written and synced before the writer stops.
            journal.close();
        }
    }
}

/// Acts on what the journal shows unfinished after a crash: a request forwarded
/// without an outcome is closed as timed out (68) and reversed; one never forwarded
/// is closed as 91 (the bank never saw it); advices not acknowledged are queued
/// again.
fn resume(
    config: &Config,
    connectors: &[Arc<Connector>],
    journaling: &Journaling,
    recovery: Recovery,
) {
    use crate::net::journaling::OutcomeSource;
    let decode = |bytes: bytes::Bytes| crate::wire::Message::decode(&config.dialect, bytes).ok();
    for u in recovery.unfinished {
        let Some((bank, stan)) = u.forwarded else {
            journaling.outcome(u.request_id, b"91", OutcomeSource::Switch, None);
            continue;
        };
        let connector = connectors.get(usize::from(bank));
        let original = decode(u.request);
        let link_stan = Stan::from_value(stan);
        match (connector, original, link_stan) {
            (Some(c), Some(original), Some(link_stan)) => {
                c.resume_reversal(u.request_id, original, link_stan, true);
            }
            _ => tracing::error!(
                request_id = u.request_id,
                "unfinished request names no configured bank or cannot be decoded: reverse it by hand"
            ),
        }
    }
    for p in recovery.reversals_pending {
        let (bank, stan) = p.forwarded;
        let connector = connectors.get(usize::from(bank));
        match (connector, decode(p.request), Stan::from_value(stan)) {
            (Some(c), Some(original), Some(link_stan)) => {
                c.resume_reversal(p.request_id, original, link_stan, false);
            }
            _ => tracing::error!(
                request_id = p.request_id,
                "pending reversal names no configured bank or cannot be decoded: reverse it by hand"
            ),
        }
    }
}

/// Refreshes gauges once per [`PUBLISH_INTERVAL`] until shutdown.
async fn publish_loop(
    connectors: Vec<Arc<Connector>>,
    ingress: Arc<Ingress>,
    shutdown: CancellationToken,
) {
    let gauges = Gauges::new(&connectors);
    let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => gauges.publish(&connectors, &ingress),
        }
    }
}

/// Every gauge the switch publishes, registered once: latency quantiles, queue
/// depth, requests in flight and links up per connector, acquirer connections.
struct Gauges {
    connectors: Vec<ConnectorGauges>,
    connections: metrics::Gauge,
}

struct ConnectorGauges {
    latency: telemetry::LatencyGauges,
    queue_depth: metrics::Gauge,
    inflight: metrics::Gauge,
    links_up: metrics::Gauge,
}

impl Gauges {
    fn new(connectors: &[Arc<Connector>]) -> Gauges {
        let connectors = connectors
            .iter()
            .map(|c| {
                let label = c.bank().id.to_string();
                ConnectorGauges {
                    latency: telemetry::LatencyGauges::new(&label),
                    queue_depth: metrics::gauge!("switchyard_connector_queue_depth", "connector" => label.clone()),
                    inflight: metrics::gauge!("switchyard_connector_inflight", "connector" => label.clone()),
                    links_up: metrics::gauge!("switchyard_connector_links_up", "connector" => label),
                }
            })
            .collect();
        Gauges {
            connectors,
            connections: metrics::gauge!("switchyard_acquirer_connections"),
        }
    }

    fn publish(&self, connectors: &[Arc<Connector>], ingress: &Ingress) {
        for (c, g) in connectors.iter().zip(&self.connectors) {
            g.latency.set(&c.latency);
            g.queue_depth.set(c.queue_depth() as f64);
            g.inflight.set(c.inflight() as f64);
            g.links_up.set(c.links_up() as f64);
        }
        self.connections.set(ingress.connections() as f64);
    }
}

/// Runs the switch on an already bound listener until `shutdown` resolves
/// (testable entry point: tests bind `127.0.0.1:0`).
pub async fn run(
    listener: TcpListener,
    config: Config,
    tls: TlsSetup,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let switch = Switch::start(config, tls).map_err(std::io::Error::other)?;
    let result = tokio::select! {
        r = switch.serve(listener) => r,
        _ = shutdown => Ok(()),
    };
    switch.shutdown().await;
    result
}

/// Resolves on SIGINT or SIGTERM.
pub async fn terminate_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
