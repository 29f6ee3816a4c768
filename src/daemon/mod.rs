//! The daemon: wires config, TLS, connectors and the acquirer listener together.

pub mod recovery;

use crate::config::{Config, TlsFiles};
use crate::core::bank::BankState;
use crate::core::books::Books;
use crate::core::inflight::STAN_MAX;
use crate::core::recent::Recent;
use crate::core::writeahead::WriteAhead;
use crate::journal::recovery::Replay;
use crate::journal::{Journal, JournalError};
use crate::net::connector::{Bookkeeping, Connector};
use crate::net::durable::Durable;
use crate::net::ingress::Ingress;
use crate::net::live::{Live, CONNECTOR_SLOTS_MAX};
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
        let crls = match &files.crl_file {
            Some(path) => tls::load_crls(path)?,
            None => Vec::new(),
        };
        let server = tls::server_config_with_crls(
            &ca,
            tls::load_certs(&files.cert_file)?,
            tls::load_key(&files.key_file)?,
            crls,
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
}

impl Switch {
    /// Opens the journal (when configured: every record is checked and a torn tail
    /// truncated) and starts every bank connector's links (call inside a tokio
    /// runtime).
    pub fn start(config: Config, tls: TlsSetup) -> Result<Switch, JournalError> {
        let (journaling, journal, first_request_id, recovery) = match &config.journal {
            Some(jc) => {
                // One pass: the checking scan feeds the replay.
                let window_ms = config.duplicates.window.as_millis() as u64;
                let since = unix_ms_now().saturating_sub(window_ms);
                let banks = config.banks.iter().map(|b| b.id.to_raw()).collect();
                let mut replay =
                    Replay::remembering(since, config.duplicates.entries_max).with_banks(banks);
                let opened = Journal::open_with(jc.clone(), |_, _, r| replay.record(r))?;
                let recovery = replay.finish();
                tracing::info!(
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
                (
                    WriteAhead::new(journal.clone()),
                    Some(journal),
                    next,
                    Some(recovery),
                )
            }
            None => (WriteAhead::off(), None, 1, None),
        };
        let config = Arc::new(config);
        let d = config.duplicates;
        let recent = Arc::new(Recent::new(
            d.window,
            d.entries_max,
            d.waiters_max,
            std::time::Instant::now(),
        ));
        if let Some(recovery) = &recovery {
            recovery::restore_recent(&config.dialect, &recent, recovery);
        }
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
        let published = Published {
            ingress: ingress.clone(),
            recent: recent.clone(),
            journal: journal.clone(),
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
        };
        Gauges::new().publish(&published);
    }

    /// Waits until every bank has at least one link up, or `limit` passes.
    pub async fn wait_links_up(&self, limit: Duration) -> bool {
        self.wait_linked(&self.connectors(), limit).await.is_empty()
    }

    /// Serves acquirers on `listener` until [`Switch::shutdown`] is called.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        let serving = self.ingress.clone().serve(listener, self.draining.clone());
        serving.await
    }

    /// A token cancelled at shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Reloads the config file at `path` (SIGHUP, `switchyard reload`). The whole
    /// file is validated as `check-config` does, and the TLS files it names are
    /// read again; an invalid file, or one changing what only a restart can (see
    /// [`Config::restart_only_changes`]), is rejected whole and the running config
    /// stays. Otherwise everything else is put in force without closing a
    /// connection or dropping a request in flight: routes, failover lists,
    /// institutions and their certificate names and rate limits, limits, request
    /// deadlines, TLS certificates and revocation lists (for new handshakes), and
    /// the banks: added ones are connected (waiting up to [`RELOAD_LINK_WAIT`] for
    /// a first link), removed ones retired (their links finish what they carry,
    /// sign off and close), and resized ones start or retire links. A bank whose
    /// link settings changed gets a new connector, which takes over once linked.
    pub async fn reload(&self, path: &std::path::Path) -> Result<String, String> {
        let _one_at_a_time = self.reloading.lock().await;
        let result = self.try_reload(path).await;
        let label = if result.is_ok() {
            "applied"
        } else {
            "rejected"
        };
        metrics::counter!("switchyard_config_reloads_total", "result" => label).increment(1);
        result
    }

    async fn try_reload(&self, path: &std::path::Path) -> Result<String, String> {
        let new = Config::load(path).map_err(|e| e.to_string())?;
        let old = self.ingress.live();
        let fixed = old.config.restart_only_changes(&new);
        if !fixed.is_empty() {
            return Err(format!(
                "{}: {} changed: this needs a restart",
                path.display(),
                fixed.join(", ")
            ));
        }
        let tls =
            TlsSetup::from_files(&new.tls_files).map_err(|e| format!("{}: {e}", path.display()))?;
        // Each configured bank: its running connector, or a new one.
        let mut plan = Vec::with_capacity(new.banks.len());
        for bank in &new.banks {
            let running = old
                .active_connectors()
                .find(|c| c.bank().id == bank.id)
                .cloned();
            plan.push(match running {
                Some(c) if c.bank().same_link_settings(bank) => BankPlan::Keep(c),
                Some(c) => BankPlan::Replace(c),
                None => BankPlan::Add,
            });
        }
        let added = plan
            .iter()
            .filter(|p| !matches!(p, BankPlan::Keep(_)))
            .count();
        if old.connectors.len() + added > CONNECTOR_SLOTS_MAX {
            return Err(format!(
                "{}: {added} banks added or replaced would pass the {CONNECTOR_SLOTS_MAX} \
                 connector slots this process keeps: restart to renumber",
                path.display()
            ));
        }
        // New connectors first; they take over once linked (or after the wait).
        // Retired connectors that have stopped leave a tombstone in their slot.
        let mut slots: Vec<Arc<Connector>> = old
            .connectors
            .iter()
            .map(|c| {
                if c.is_stopped() && !c.is_tombstone() {
                    c.tombstone()
                } else {
                    c.clone()
                }
            })
            .collect();
        let mut active = Vec::with_capacity(new.banks.len());
        let mut fresh = Vec::new();
        let mut retire = Vec::new();
        let mut replaced = Vec::new();
        let mut resized = Vec::new();
        let next_stan = (self.ingress.next_request_id() % u64::from(STAN_MAX)) as u32 + 1;
        for (bank, step) in new.banks.iter().zip(&plan) {
            let index = match step {
                BankPlan::Keep(c) => {
                    c.set_tls(tls.client.clone());
                    if c.links_configured() != bank.links {
                        resized.push(format!(
                            "{} {}→{}",
                            bank.id,
                            c.links_configured(),
                            bank.links
                        ));
                    }
                    c.index()
                }
                BankPlan::Replace(_) | BankPlan::Add => {
                    let first_stan = match step {
                        // Past what the old connector may still use while it
                        // retires (its sign-offs).
                        BankPlan::Replace(c) => {
                            (c.stan_position() + REPLACED_STAN_GAP) % STAN_MAX + 1
                        }
                        _ => next_stan,
                    };
                    let index = slots.len() as crate::core::route::BankIndex;
                    let c = Connector::new(
                        index,
                        bank.clone(),
                        new.dialect.clone(),
                        tls.client.clone(),
                        new.frame_size_max_bytes,
                        self.link_changed.clone(),
                        Bookkeeping {
                            first_stan,
                            ..self.books.clone()
                        },
                    );
                    c.spawn_links(&self.shutdown);
                    fresh.push(c.clone());
                    if let BankPlan::Replace(old) = step {
                        replaced.push((old.clone(), c.clone()));
                    }
                    slots.push(c);
                    index
                }
            };
            active.push(index);
        }
        for c in old.active_connectors() {
            if !new.banks.iter().any(|b| b.id == c.bank().id) {
                retire.push(c.clone());
            }
        }
        let unlinked = self.wait_linked(&fresh, RELOAD_LINK_WAIT).await;
        let new = Arc::new(new);
        let live = Live::new(new.clone(), slots.into(), active, tls.server, Some(&old));
        let prefixes = live.routes.prefix_count();
        let institutions = live.institutions.len();
        // In force from here: new connections at once, sessions at their next request.
        self.ingress.replace_live(live);
        for (bank, step) in new.banks.iter().zip(&plan) {
            if let BankPlan::Keep(c) = step {
                c.apply(bank);
            }
        }
        for c in &retire {
            c.retire();
        }
        for (old, successor) in replaced {
            old.retire_into(&successor);
        }
        let mut what = format!(
            "config reloaded: {prefixes} PAN prefixes, {institutions} institutions, {} banks",
            new.banks.len()
        );
        let added = plan.iter().filter(|p| matches!(p, BankPlan::Add)).count();
        let replaced = plan
            .iter()
            .filter(|p| matches!(p, BankPlan::Replace(_)))
            .count();
        let removed = retire.len();
        if added + replaced + removed > 0 {
            what.push_str(&format!(
                " ({added} added, {replaced} replaced, {removed} removed)"
            ));
        }
        if !resized.is_empty() {
            what.push_str(&format!("; links resized: {}", resized.join(", ")));
        }
        if !unlinked.is_empty() {
            what.push_str(&format!(
                "; no link up yet to {} (requests to it fail over or get 91 until one is)",
                unlinked.join(", ")
            ));
        }
        Ok(what)
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
        let deadline = tokio::time::Instant::now() + grace;
        let mut drained = false;
        while tokio::time::Instant::now() < deadline {
            if self.ingress.connections() == 0 {
                drained = true;
                break;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
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
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
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

/// Reloads the config on every SIGHUP (unix), logging what was applied or why
/// the new file was rejected.
async fn reload_on_sighup(switch: Arc<Switch>, path: std::path::PathBuf) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("SIGHUP cannot be watched: no reload on signal");
            return;
        };
        let token = switch.shutdown_token();
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            match switch.reload(&path).await {
                Ok(what) => tracing::info!(config = %path.display(), "{what}"),
                Err(why) => tracing::error!(
                    config = %path.display(),
                    "config reload rejected, the running config stays: {why}"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (switch, path);
    }
}

/// How long a reload waits for a bank it adds (or replaces) to have a link up
/// before putting the new config in force anyway.
pub const RELOAD_LINK_WAIT: Duration = Duration::from_secs(5);

/// STANs left between a replaced connector's position and its successor's start.
const REPLACED_STAN_GAP: u32 = 1000;

/// What a reload does with one configured bank.
enum BankPlan {
    /// Its connector stays; new `links`, deadline and `optional` are applied.
    Keep(Arc<Connector>),
    /// Its link settings changed: a new connector takes over from this one.
    Replace(Arc<Connector>),
    /// A bank the running config does not have.
    Add,
}

/// How often a draining switch checks whether its sessions have ended.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Wall-clock time now, in milliseconds since the Unix epoch.
fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Refreshes gauges once per [`PUBLISH_INTERVAL`] until shutdown.
/// What the gauges are read from.
struct Published {
    ingress: Arc<Ingress>,
    recent: Arc<Recent>,
    journal: Option<Arc<Journal>>,
}

async fn publish_loop(p: Published, shutdown: CancellationToken) {
    let mut gauges = Gauges::new();
    let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                // Keys past the window go even where no request comes to expire them.
                p.recent.expire(std::time::Instant::now());
                gauges.publish(&p);
            }
        }
    }
}

/// Every gauge the switch publishes, registered once: latency quantiles, queue
/// depth, requests in flight and links up per connector, acquirer connections.
struct Gauges {
    connectors: Vec<ConnectorGauges>,
    connections: metrics::Gauge,
    duplicates: metrics::Gauge,
    journal_segments: metrics::Gauge,
    journal_bytes: metrics::Gauge,
    journal_queue: metrics::Gauge,
}

struct ConnectorGauges {
    latency: telemetry::LatencyGauges,
    queue_depth: metrics::Gauge,
    inflight: metrics::Gauge,
    links_up: metrics::Gauge,
    saf_depth: metrics::Gauge,
}

impl ConnectorGauges {
    fn new(c: &Connector) -> ConnectorGauges {
        let label = c.bank().id.to_string();
        ConnectorGauges {
            latency: telemetry::LatencyGauges::new(&label),
            queue_depth: metrics::gauge!("switchyard_connector_queue_depth", "connector" => label.clone()),
            inflight: metrics::gauge!("switchyard_connector_inflight", "connector" => label.clone()),
            links_up: metrics::gauge!("switchyard_connector_links_up", "connector" => label.clone()),
            saf_depth: metrics::gauge!("switchyard_reversals_waiting", "connector" => label),
        }
    }
}

impl Gauges {
    fn new() -> Gauges {
        Gauges {
            connectors: Vec::new(),
            connections: metrics::gauge!("switchyard_acquirer_connections"),
            duplicates: metrics::gauge!("switchyard_duplicates_entries"),
            journal_segments: metrics::gauge!("switchyard_journal_segments"),
            journal_bytes: metrics::gauge!("switchyard_journal_bytes"),
            journal_queue: metrics::gauge!("switchyard_journal_queue_depth"),
        }
    }

    /// Sets every gauge; connector slots a reload added get theirs first, and
    /// retired connectors are left out (a replacement has the same labels).
    fn publish(&mut self, p: &Published) {
        let live = p.ingress.live();
        for c in live.connectors.get(self.connectors.len()..).unwrap_or(&[]) {
            self.connectors.push(ConnectorGauges::new(c));
        }
        for (c, g) in live.connectors.iter().zip(&self.connectors) {
            if c.is_retired() {
                continue;
            }
            g.latency.set(&c.latency);
            g.queue_depth.set(c.queue_depth() as f64);
            g.inflight.set(c.inflight() as f64);
            g.links_up.set(c.links_up() as f64);
            g.saf_depth.set(c.reversals_waiting() as f64);
        }
        self.connections.set(p.ingress.connections() as f64);
        self.duplicates.set(p.recent.len() as f64);
        if let Some(journal) = &p.journal {
            let (segments, bytes) = journal.disk_usage();
            self.journal_segments.set(segments as f64);
            self.journal_bytes.set(bytes as f64);
            self.journal_queue.set(journal.queue_depth() as f64);
        }
    }
}

/// Runs the switch on an already bound listener until `shutdown` resolves
/// (testable entry point: tests bind `127.0.0.1:0`).
pub async fn run(
    listener: TcpListener,
    admin: Option<(TcpListener, metrics_exporter_prometheus::PrometheusHandle)>,
    config_path: Option<std::path::PathBuf>,
    config: Config,
    tls: TlsSetup,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let switch = Arc::new(Switch::start(config, tls).map_err(std::io::Error::other)?);
    if let Some((admin, metrics)) = admin {
        let token = switch.shutdown_token();
        let path = config_path.clone();
        tokio::spawn(crate::admin::serve(
            admin,
            metrics,
            switch.clone(),
            path,
            token,
        ));
    }
    if let Some(path) = config_path {
        tokio::spawn(reload_on_sighup(switch.clone(), path));
    }
    let serving = switch.serve(listener);
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => {
            switch.shutdown().await;
            return r;
        }
        _ = shutdown => {}
    }
    // The grace period in force (a reload may have changed it).
    let grace = switch.config().shutdown_grace;
    tracing::info!(?grace, "shutting down: answering what is in flight");
    // The listener keeps running (it stops accepting once draining) until drained;
    // a second signal stops at once (the journal makes that safe).
    let drained = tokio::select! {
        drained = switch.drain(grace) => drained,
        _ = terminate_signal() => {
            tracing::warn!("second signal: stopping at once");
            std::process::exit(1);
        }
    };
    tracing::info!(drained, "switchyard stopped");
    Ok(())
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
