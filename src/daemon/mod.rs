//! The switch as a whole ([`Switch`]): the journal opened and replayed, the
//! duplicates table rebuilt, a connector per bank, the acquirer sessions; its
//! readiness and status; reload (`reload.rs`, planned by a pure function), start-up
//! recovery (`recovery.rs`), gauges (`gauges.rs`), working-key rotation
//! (`rotate.rs`), graceful drain and shutdown.
//! `service` runs it from a config file with signals and the admin endpoint.

pub mod gauges;
pub mod recovery;
pub mod reload;
pub mod rotate;

use crate::config::Config;
use crate::core::bank::BankState;
use crate::core::books::Books;
use crate::core::inflight::STAN_MAX;
use crate::core::recent::Recent;
use crate::core::writeahead::{Protection, WriteAhead};
use crate::journal::{Journal, JournalError};
use crate::net::connector::{Bookkeeping, Connector};
use crate::net::durable::{Durable, JournalAnswers};
use crate::net::ingress::Ingress;
use crate::net::live::Live;
use crate::tls::TlsSetup;
use gauges::{publish_loop, Gauges, Published};
use std::sync::Arc;
use std::time::Duration;
use switchyard_security::payshield::PayShieldModule;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A running switch: connectors started, ready to serve a listener.
pub struct Switch {
    ingress: Arc<Ingress>,
    /// What a connector added by a reload records with.
    books: Bookkeeping,
    /// Serialises reloads (SIGHUP and the admin endpoint).
    reloading: tokio::sync::Mutex<()>,
    link_changed: Arc<Notify>,
    shutdown: CancellationToken,
    /// Cancelled when a graceful shutdown starts: no new connections or requests.
    draining: CancellationToken,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    journal: Option<Arc<Journal>>,
    recent: Arc<Recent>,
    /// The payShield client the switch started with, for its metrics.
    payshield: Option<Arc<PayShieldModule>>,
}

impl Switch {
    /// Opens the journal (when configured: every record is checked and a torn tail
    /// truncated) and starts every bank connector's links (call inside a tokio
    /// runtime).
    pub fn start(config: Config, tls: TlsSetup) -> Result<Switch, JournalError> {
        Switch::start_warm(config, tls, None)
    }

    /// [`Switch::start`], on a journal already read when `warm` is given (a
    /// cluster standby's copy, with the duplicates table and unfinished
    /// business built as it was copied): the journal is opened without reading
    /// it again.
    pub fn start_warm(
        config: Config,
        tls: TlsSetup,
        warm: Option<recovery::Warm>,
    ) -> Result<Switch, JournalError> {
        if let Some(keys) = &config.keys {
            if !crate::core::codes::set_security_codes(keys.codes) {
                tracing::warn!(
                    "keys.mac_failure_code / pin_failure_code differ from this process's first \
                     switch: the first ones stay"
                );
            }
        }
        let (recent, journaling, journal, first_request_id, recovery) = match &config.journal {
            Some(jc) => {
                let read = std::time::Instant::now();
                let (restore, opened) = match warm {
                    Some(warm) => {
                        let opened = Journal::open_prescanned(jc.clone(), warm.prescan)?;
                        (warm.restore, opened)
                    }
                    None => {
                        // One pass: the checking scan feeds the replay and
                        // rebuilds the duplicates table.
                        let mut restore = recovery::Restore::new(&config);
                        let opened = Journal::open_with(jc.clone(), |_, _, r| restore.record(r))?;
                        (restore, opened)
                    }
                };
                let (recent, protector, recovery) = restore.finish();
                if !protector.enciphers_pans() {
                    tracing::warn!(
                        "journal: no [keys] journal_key: PANs are journaled masked only, and \
                         reversal advices resumed after a restart carry no DE2"
                    );
                }
                tracing::info!(
                    open_ms = read.elapsed().as_millis() as u64,
                    "{}",
                    crate::journal::dump::report(&jc.dir, &opened.recovered)
                );
                if recovery.unfinished.is_empty() && recovery.reversals_pending.is_empty() {
                    tracing::info!("journal: nothing unfinished");
                } else {
                    let summary = crate::journal::recovery::summary(&recovery);
                    tracing::warn!("journal {summary}: resuming");
                }
                let next = opened.next_seq;
                let journal = Arc::new(opened.journal);
                recent.read_answers_with(Arc::new(JournalAnswers::new(journal.clone())));
                (
                    recent,
                    WriteAhead::new(
                        journal.clone(),
                        Protection {
                            protector,
                            dialect: config.dialect.clone(),
                        },
                    ),
                    Some(journal),
                    next,
                    Some(recovery),
                )
            }
            None => (
                recovery::recent_table(&config, std::time::Instant::now()),
                WriteAhead::off(),
                None,
                1,
                None,
            ),
        };
        let config = Arc::new(config);
        let books = Books::new(journaling, recent.clone(), config.dialect.clone());
        let durable = Durable::new(journal.clone());
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
                    Bookkeeping {
                        books: books.clone(),
                        durable: durable.clone(),
                        // Past every STAN used before the restart (each request
                        // took at least one journal sequence number), modulo wrap.
                        first_stan: (first_request_id % u64::from(STAN_MAX)) as u32 + 1,
                    },
                )
            })
            .collect();
        for c in &connectors {
            c.spawn_links(&shutdown);
        }
        if let Some(recovery) = recovery {
            let banks: Vec<&BankState> = connectors.iter().map(|c| c.state().as_ref()).collect();
            recovery::resume(
                &config.dialect,
                &banks,
                &books,
                recovery,
                std::time::Instant::now(),
            );
        }
        let active = (0..connectors.len())
            .map(|i| i as crate::core::route::BankIndex)
            .collect();
        let live = Live::new(
            config.clone(),
            connectors.into(),
            active,
            tls.server.clone(),
            None,
        );
        let bookkeeping = Bookkeeping {
            books: books.clone(),
            durable: durable.clone(),
            first_stan: 1,
        };
        let ingress = Ingress::new(config.clone(), live, books, durable, first_request_id);
        let payshield = config
            .keys
            .as_ref()
            .and_then(|k| Some(k.payshield.as_ref()?.module.clone()));
        let published = Published {
            ingress: ingress.clone(),
            recent: recent.clone(),
            journal: journal.clone(),
            payshield: payshield.clone(),
        };
        let tasks = vec![tokio::spawn(publish_loop(published, shutdown.clone()))];
        let tasks = std::sync::Mutex::new(tasks);
        Ok(Switch {
            ingress,
            books: bookkeeping,
            reloading: tokio::sync::Mutex::new(()),
            link_changed,
            shutdown,
            draining: CancellationToken::new(),
            tasks,
            journal,
            recent,
            payshield,
        })
    }

    /// The journal, when configured.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_deref()
    }

    /// The configuration in force (the last one reloaded).
    pub fn config(&self) -> Arc<Config> {
        self.ingress.live().config.clone()
    }

    /// The configured banks' connectors, in config order.
    pub fn connectors(&self) -> Vec<Arc<Connector>> {
        self.ingress.live().active_connectors().cloned().collect()
    }

    /// Acquirer connections open now.
    pub fn connections(&self) -> usize {
        self.ingress.connections()
    }

    /// Open acquirer sessions by institution.
    pub fn sessions_by_institution(&self) -> Vec<(crate::core::InstitutionId, usize)> {
        self.ingress.sessions_by_institution()
    }

    /// Open acquirer sessions of `institution`.
    pub fn sessions_of(&self, institution: crate::core::InstitutionId) -> usize {
        self.ingress.sessions_of(institution)
    }

    /// Publishes all gauges now (the publisher also does so once a second).
    pub fn publish_metrics(&self) {
        let published = Published {
            ingress: self.ingress.clone(),
            recent: self.recent.clone(),
            journal: self.journal.clone(),
            payshield: self.payshield.clone(),
        };
        Gauges::new().publish(&published);
    }

    /// Waits until every bank has at least one link up, or `limit` passes.
    pub async fn wait_links_up(&self, limit: Duration) -> bool {
        self.wait_linked(&self.connectors(), limit).await.is_empty()
    }

    /// Serves acquirers on `listener` (the first of the config's listeners: its
    /// dialect, framing and header) until [`Switch::shutdown`] is called.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        self.serve_all(vec![listener]).await
    }

    /// Serves acquirers on each of `listeners`, the `n`th speaking as the config's
    /// `n`th listener, until [`Switch::shutdown`] is called; the first that fails
    /// ends it.
    pub async fn serve_all(&self, listeners: Vec<TcpListener>) -> std::io::Result<()> {
        let configured = self.ingress.listeners();
        let mut set = tokio::task::JoinSet::new();
        for (index, listener) in listeners.into_iter().enumerate().take(configured) {
            set.spawn(
                self.ingress
                    .clone()
                    .serve(listener, index, self.draining.clone()),
            );
        }
        while let Some(done) = set.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        Ok(())
    }

    /// A token cancelled at shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until each of `connectors` has a link up, or `limit` passes; returns
    /// the ids of those still without one.
    async fn wait_linked(&self, connectors: &[Arc<Connector>], limit: Duration) -> Vec<String> {
        let all_up = || connectors.iter().all(|c| c.links_up() > 0);
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
        let _ = tokio::time::timeout(limit, wait).await;
        connectors
            .iter()
            .filter(|c| c.links_up() == 0)
            .map(|c| c.bank().id.to_string())
            .collect()
    }

    /// Ready when not shutting down, the journal (if configured) is open and has
    /// not failed, and every bank not marked `optional` has a link up; else why not.
    pub fn readiness(&self) -> (bool, String) {
        if self.is_draining() {
            return (false, "shutting down".to_owned());
        }
        if self.journal().is_some_and(|j| j.has_failed()) {
            return (false, "journal failed".to_owned());
        }
        let down: Vec<String> = self
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
    pub fn status(&self) -> serde_json::Value {
        let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let connectors: Vec<serde_json::Value> = self
            .connectors()
            .iter()
            .map(|c| {
                let s = &c.stats;
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
        let journal = self.journal().map(|j| {
            let (segments, bytes) = j.disk_usage();
            serde_json::json!({
                "failed": j.has_failed(),
                "segments": segments,
                "bytes": bytes,
                "queue_depth": j.queue_depth(),
                "durable_seq": j.durable(),
            })
        });
        let (ready, why) = self.readiness();
        serde_json::json!({
            "ready": ready,
            "readiness": why,
            "draining": self.is_draining(),
            "sessions": self.connections(),
            "sessions_by_institution": self
                .sessions_by_institution()
                .into_iter()
                .map(|(id, n)| (id.to_string(), serde_json::json!(n)))
                .collect::<serde_json::Map<_, _>>(),
            "connectors": connectors,
            "journal": journal,
            "duplicates_entries": self.duplicates_entries(),
        })
    }

    /// Prometheus text: what `metrics` recorded (`handle`), with the gauges
    /// published now and the connectors' latency histograms.
    pub fn metrics_text(&self, handle: &metrics_exporter_prometheus::PrometheusHandle) -> String {
        self.publish_metrics();
        let mut text = handle.render();
        let live = self.connectors();
        crate::telemetry::render_histograms(
            &mut text,
            live.iter().map(|c| (c.bank().id.to_string(), &c.latency)),
        );
        text
    }

    /// Whether a graceful shutdown has started.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Keys in the duplicates table.
    pub fn duplicates_entries(&self) -> usize {
        self.recent.len()
    }

    /// Graceful shutdown: stops accepting connections and forwarding new requests
    /// (they are answered 91), lets what is in flight be answered or time out by its
    /// deadline (reversals queued as usual), then stops as [`Switch::shutdown`] does.
    /// Gives up waiting after `grace`. Returns whether every session ended in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.draining.cancel();
        let drained = tokio::time::timeout(grace, self.ingress.all_closed())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                sessions = self.ingress.connections(),
                ?grace,
                "graceful shutdown: grace period over with sessions open"
            );
        }
        self.shutdown().await;
        drained
    }

    /// Stops accepting, closes sessions and links, and waits for the link tasks.
    pub async fn shutdown(&self) {
        self.draining.cancel();
        self.shutdown.cancel();
        let tasks = std::mem::take(&mut *crate::sync::lock(&self.tasks));
        for task in tasks {
            let _ = task.await;
        }
        let live = self.ingress.live();
        for c in live.connectors.iter() {
            c.join_links().await;
        }
        if let Some(journal) = &self.journal {
            // Whatever is queued is written and synced before the writer stops.
            journal.close();
        }
    }
}
