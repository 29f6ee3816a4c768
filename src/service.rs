//! The composition root: runs the switch from a config file (`switchyard run`):
//! binds the listeners, installs the metrics recorder, starts the [`Switch`],
//! serves the admin endpoint, reloads on SIGHUP, and drains on SIGTERM/SIGINT
//! (a second signal stops at once). Errors are returned, never a process exit:
//! `main` decides the exit code.

use crate::admin::{self, Operator};
use crate::config::Config;
use crate::daemon::Switch;
use crate::journal::JournalError;
use crate::security::WorkingKey;
use crate::tls::{TlsError, TlsSetup};
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;

/// How a run of the switch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Every session ended within the grace period.
    Drained,
    /// The grace period ran out with sessions open (they were closed).
    GraceOver,
    /// A second signal during the drain: stop at once (the journal makes that
    /// safe; the caller exits without waiting for anything).
    Interrupted,
    /// The acquirer listener failed.
    ListenerFailed,
}

/// Why the switch could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A listener could not be bound.
    #[error("binding {what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Its address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The metrics recorder could not be installed.
    #[error("metrics recorder: {0}")]
    Metrics(String),
    /// The TLS files could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The admin endpoint's TLS files could not be used (the error names the
    /// config key and the file).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The journal could not be opened.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The payShield could not be reached, or holds other keys than the
    /// tokens file says (`[keys.payshield]`).
    #[error("payShield at start-up: {0}")]
    SecurityModule(String),
    /// Joining the cluster failed (`[cluster]`).
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// This node's cluster lease was lost (expired, taken, or fenced): it
    /// stopped answering and forwarding, and exits.
    #[error("cluster: this node's lease was lost; it stopped (a standby has taken over)")]
    LeaseLost,
}

/// The admin endpoint's view of the daemon.
struct Admin {
    switch: Arc<Switch>,
    metrics: PrometheusHandle,
    config_path: Option<PathBuf>,
    cluster: Option<ClusterRole>,
}

/// A cluster node's part in the admin endpoint: what `/status` shows, and the
/// step-down.
#[derive(Clone, Debug)]
pub struct ClusterRole {
    /// This node's id.
    pub node_id: String,
    /// Its epoch.
    pub epoch: u64,
    /// Cancelled to step down (a drain, then the lease given up).
    pub step_down: tokio_util::sync::CancellationToken,
}

impl Operator for Admin {
    fn metrics(&self) -> String {
        self.switch.metrics_text(&self.metrics)
    }

    fn readiness(&self) -> (bool, String) {
        self.switch.readiness()
    }

    fn status(&self) -> serde_json::Value {
        let mut status = self.switch.status();
        if let Some(role) = &self.cluster {
            status["cluster"] = serde_json::json!({
                "node_id": role.node_id,
                "role": if role.step_down.is_cancelled() { "stepping-down" } else { "active" },
                "epoch": role.epoch,
                "lease_left_ms": crate::cluster::lease_left().map(|d| d.as_millis() as u64),
            });
        }
        status
    }

    fn step_down(&self) -> bool {
        match &self.cluster {
            Some(role) => {
                role.step_down.cancel();
                true
            }
            None => false,
        }
    }

    async fn reload(&self) -> Option<Result<String, String>> {
        let path = self.config_path.as_ref()?;
        Some(self.switch.reload(path).await)
    }

    async fn rotate_key(&self, bank: String, key: WorkingKey) -> (u16, serde_json::Value) {
        let rotation = self.switch.rotate_key(&bank, key).await;
        if let Err(why) = &rotation.result {
            tracing::warn!(bank, key = key.as_str(), reason = %why, "working-key rotation failed");
        }
        (rotation.http_status(), rotation.to_json())
    }
}

/// Why `check-config` refuses a config.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The file itself (its error names the file and the key).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A TLS file it names.
    #[error("{file}: {source}")]
    Tls {
        /// The config file.
        file: String,
        /// What is wrong with the TLS file.
        source: TlsError,
    },
}

/// `switchyard check-config`: validates the config file at `path` and the TLS
/// files it names (the same checks a reload makes); what it holds, when valid.
pub fn check_config(path: &std::path::Path) -> Result<String, CheckError> {
    let c = Config::load(path)?;
    TlsSetup::from_files(&c.tls_files).map_err(|source| CheckError::Tls {
        file: path.display().to_string(),
        source,
    })?;
    let admin = match (c.admin_listen, &c.admin_tls) {
        (None, _) => "admin endpoint: none".to_owned(),
        (Some(addr), None) => {
            format!("admin endpoint: {addr}, plain HTTP; changes from loopback only")
        }
        (Some(addr), Some(files)) => {
            files.load()?;
            let names = files
                .client_names
                .as_ref()
                .map_or_else(|| "any name".to_owned(), |n| n.join(", "));
            format!(
                "admin endpoint: {addr}, TLS only; changes need an operator certificate from \
                 {} ({names})",
                files.client_ca_file.display()
            )
        }
    };
    let listeners: Vec<String> = c
        .listeners
        .iter()
        .map(|l| {
            format!(
                "{} ({}, {}, header {})",
                l.listen,
                l.dialect.name(),
                l.framing,
                l.header.kind()
            )
        })
        .collect();
    Ok(format!(
        "{}: valid, with its TLS files ({} institutions, {} banks, {} PAN prefixes)\n\
         acquirer listeners: {}\n{admin}\n{}",
        path.display(),
        c.institutions.len(),
        c.banks.len(),
        c.routes.prefix_count(),
        listeners.join("; "),
        duplicates_capacity(&c)
    ))
}

/// What the duplicates table holds within its memory bound: keys, bytes a key,
/// and the sustained rate its full window holds (past it, the window shrinks).
fn duplicates_capacity(c: &Config) -> String {
    let d = c.duplicates;
    let journaled = c.journal.is_some();
    let keys = crate::core::dedup::capacity_for(d.memory_max_bytes, !journaled);
    let window_s = d.window.as_secs().max(1);
    let answers = if journaled {
        "bank answers read back from the journal"
    } else {
        "answers kept in memory (no journal): fewer keys when answers are large"
    };
    format!(
        "duplicates: {keys} keys in {} MiB ({} bytes a key, {answers}); a {window_s} s \
         window holds {} requests/s sustained, past which answered keys are evicted early",
        d.memory_max_bytes >> 20,
        d.memory_max_bytes / keys.max(1),
        keys as u64 / window_s
    )
}

/// `switchyard run`: the switch from `config` (read from `path`) until SIGTERM or
/// SIGINT.
pub async fn run_file(path: PathBuf, mut config: Config) -> Result<Stopped, ServiceError> {
    let tls = TlsSetup::from_files(&config.tls_files)?;
    if let Some(hsm) = config.keys.as_ref().and_then(|k| k.payshield.clone()) {
        check_payshield(hsm).await?;
    }
    let admin = bind_admin(&config).await?;
    let Some(cluster) = config.cluster.clone() else {
        return run_active(path, config, tls, None, None, admin).await;
    };
    let short: Vec<String> = config
        .banks
        .iter()
        .filter(|b| b.request_timeout < CLUSTER_REQUEST_TIMEOUT_ADVISED)
        .map(|b| b.id.to_string())
        .collect();
    if !short.is_empty() {
        tracing::warn!(banks = ?short, advised_ms = CLUSTER_REQUEST_TIMEOUT_ADVISED.as_millis() as u64,
            "cluster: these banks' request_timeout_ms is shorter than JetStream may take to elect a \
             new stream leader when a NATS server dies: requests caught then end at their deadline \
             (68 and a reversal advice)");
    }
    // In a cluster: stand by (no acquirer listener; the admin endpoint answers
    // as a standby) until this node is the active one.
    let progress = Arc::new(crate::cluster::standby::Progress::default());
    let standby_admin = match admin {
        Some((listener, metrics)) => {
            if let Ok(at) = listener.local_addr() {
                tracing::info!(admin = %at, "cluster: standby admin endpoint: /status, /readyz (503), /metrics");
            }
            let admin_tls = config.admin_tls.as_ref().map(|f| f.load()).transpose()?;
            let operator = Arc::new(StandbyAdmin {
                node_id: cluster.node_id.clone(),
                progress: progress.clone(),
                metrics: metrics.clone(),
            });
            let stop = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(admin::serve(
                listener,
                operator,
                config.admin_limits,
                admin_tls,
                stop.clone(),
            ));
            Some((task, stop, metrics))
        }
        None => None,
    };
    // The standby reads the copy as it makes it: the duplicates table and the
    // unfinished business are current when it takes over.
    let warm = config
        .journal
        .is_some()
        .then(|| crate::daemon::recovery::Warm::new(&config));
    let journal = config.journal.as_mut().ok_or(ServiceError::Cluster(
        crate::cluster::ClusterError::Stream {
            name: cluster.stream.clone(),
            message: "[cluster] needs [journal]".to_owned(),
        },
    ))?;
    let activated =
        crate::cluster::activate(&cluster, journal, progress, warm, terminate_signal()).await;
    // The admin endpoint's listener goes on serving the active switch.
    let admin = match standby_admin {
        Some((task, stop, metrics)) => {
            stop.cancel();
            let listener = task
                .await
                .map_err(|e| ServiceError::Metrics(format!("standby admin endpoint: {e}")))?;
            Some((listener, metrics))
        }
        None => None,
    };
    let Some(mut active) = activated? else {
        return Ok(Stopped::Drained);
    };
    let warm = active.warm.take();
    let lost = active.lost.clone();
    let role = ClusterRole {
        node_id: config
            .cluster
            .as_ref()
            .map(|c| c.node_id.clone())
            .unwrap_or_default(),
        epoch: active.epoch,
        step_down: tokio_util::sync::CancellationToken::new(),
    };
    let stopped = tokio::select! {
        stopped = run_active(path, config, tls, Some((lost.clone(), role)), warm, admin) => stopped,
        // The lease is gone: nothing may be written any more (`may_act`), so
        // no drain either; the process exits, as after a crash, and the
        // standby that took over owns what was unfinished.
        _ = lost.cancelled() => return Err(ServiceError::LeaseLost),
    };
    active.release().await;
    stopped
}

/// [`run_file`] once this node may serve: binds the listeners and runs until a
/// signal, or until `lost` (a cluster node's lease) is cancelled.
async fn run_active(
    path: PathBuf,
    config: Config,
    tls: TlsSetup,
    cluster: Option<(tokio_util::sync::CancellationToken, ClusterRole)>,
    warm: Option<crate::daemon::recovery::Warm>,
    admin: Option<(TcpListener, PrometheusHandle)>,
) -> Result<Stopped, ServiceError> {
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let bound = bind("an acquirer listener", l.listen).await?;
        let at = bound.local_addr().unwrap_or(l.listen);
        tracing::info!(listen = %at, dialect = l.dialect.name(), framing = %l.framing,
            header = l.header.kind(), "acquirer listener");
        listeners.push(bound);
    }
    let listen = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(config.listen);
    let admin_addr = admin
        .as_ref()
        .and_then(|(l, _)| l.local_addr().ok())
        .map_or_else(|| "none".to_owned(), |a| a.to_string());
    if admin.is_some() {
        let (scheme, changes) = match &config.admin_tls {
            Some(_) => (
                "https",
                "POST /reload, /keys/rotate with an operator certificate",
            ),
            None => ("http", "POST /reload, /keys/rotate from loopback"),
        };
        tracing::info!(admin = %admin_addr,
            "admin endpoint: {scheme}://{admin_addr}/metrics, /healthz, /readyz, /status; {changes}");
    }
    tracing::info!(%listen, admin = %admin_addr, banks = config.banks.len(), "switchyard running");
    // The warm copy goes with the role: only a cluster node stood by.
    let role = cluster.as_ref().map(|(_, role)| (role.clone(), warm));
    let shutdown = async move {
        match cluster {
            Some((lost, role)) => tokio::select! {
                _ = terminate_signal() => {}
                _ = lost.cancelled() => {}
                _ = role.step_down.cancelled() => {
                    tracing::warn!("cluster: stepping down: draining, then giving the lease up");
                }
            },
            None => terminate_signal().await,
        }
    };
    run(listeners, admin, Some(path), config, tls, shutdown, role).await
}

/// Before any traffic: the payShield answers `NC`, and its check value of every
/// token is the one the tokens file records (a token of another key, or under
/// another LMK, is refused here rather than failing payments).
async fn check_payshield(hsm: crate::config::PayShieldKeys) -> Result<(), ServiceError> {
    let module = hsm.module.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let diagnostics = module.diagnostics().map_err(|e| e.to_string())?;
        module.check_keys().map_err(|e| e.to_string())?;
        Ok::<_, String>(diagnostics)
    })
    .await
    .map_err(|e| ServiceError::SecurityModule(e.to_string()))?
    .map_err(ServiceError::SecurityModule)?;
    tracing::info!(lmk_check = %checked.lmk_check, firmware = %checked.firmware,
        keys_file = %hsm.keys_file.display(),
        "payShield: reachable, and every key's check value is the tokens file's");
    Ok(())
}

/// The shortest bank `request_timeout_ms` advised in a cluster (a warning at
/// start-up below it): longer than JetStream's leader elections.
pub const CLUSTER_REQUEST_TIMEOUT_ADVISED: std::time::Duration = std::time::Duration::from_secs(15);

/// How long a node taking over waits for a link to every bank before it
/// answers acquirers anyway (those banks' requests are then answered 91).
pub const TAKEOVER_LINKS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The admin endpoint's listener and the metrics recorder, when `[admin]
/// listen` is set.
async fn bind_admin(
    config: &Config,
) -> Result<Option<(TcpListener, PrometheusHandle)>, ServiceError> {
    match config.admin_listen {
        Some(addr) => {
            let metrics = crate::telemetry::install_recorder()
                .map_err(|e| ServiceError::Metrics(e.to_string()))?;
            let listener = bind("the admin endpoint", addr).await?;
            Ok(Some((listener, metrics)))
        }
        None => Ok(None),
    }
}

/// The admin endpoint of a cluster node standing by: `/metrics`, `/healthz`,
/// `/status` (role, progress), `/readyz` (503: not serving); changes refused.
struct StandbyAdmin {
    node_id: String,
    progress: Arc<crate::cluster::standby::Progress>,
    metrics: PrometheusHandle,
}

impl Operator for StandbyAdmin {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    fn readiness(&self) -> (bool, String) {
        let lag = self.progress.lag_messages.load(Ordering::Relaxed);
        (
            false,
            format!("standby: copying the stream ({lag} messages behind); not serving"),
        )
    }

    fn status(&self) -> serde_json::Value {
        let p = &self.progress;
        serde_json::json!({
            "cluster": {
                "node_id": self.node_id,
                "role": "standby",
                "active": *crate::sync::lock(&p.holder),
                "applied_sequence": p.applied.load(Ordering::Relaxed),
                "lag_messages": p.lag_messages.load(Ordering::Relaxed),
                "lag_ms": p.lag_ms(),
                "journal_last_seq": p.journal_last_seq.load(Ordering::Relaxed),
                "duplicate_keys": p.duplicate_keys.load(Ordering::Relaxed),
                "open_requests": p.open_requests.load(Ordering::Relaxed),
            }
        })
    }

    async fn reload(&self) -> Option<Result<String, String>> {
        Some(Err(
            "standby: the config file is read again when this node takes over".to_owned(),
        ))
    }

    async fn rotate_key(&self, _bank: String, _key: WorkingKey) -> (u16, serde_json::Value) {
        (
            409,
            serde_json::json!({"ok": false, "reason": "standby: keys rotate on the active node"}),
        )
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServiceError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServiceError::Bind { what, addr, source })
}

/// Runs the switch on already bound listeners (those of [`Config::listeners`], in
/// order) until `shutdown` resolves, then drains it (testable entry point: tests
/// bind `127.0.0.1:0`). With `admin`, serves the admin endpoint; with
/// `config_path`, reloads it on SIGHUP and `POST /reload`. A cluster node comes
/// with its role and, when it stood by, the journal copy as read (`Warm`).
pub async fn run(
    listeners: Vec<TcpListener>,
    admin: Option<(TcpListener, PrometheusHandle)>,
    config_path: Option<PathBuf>,
    config: Config,
    tls: TlsSetup,
    shutdown: impl Future<Output = ()>,
    cluster: Option<(ClusterRole, Option<crate::daemon::recovery::Warm>)>,
) -> Result<Stopped, ServiceError> {
    let limits = config.admin_limits;
    let clustered = cluster.is_some();
    let admin_tls = match (&admin, &config.admin_tls) {
        (Some(_), Some(files)) => Some(files.load()?),
        _ => None,
    };
    let (cluster, warm) = match cluster {
        Some((role, warm)) => (Some(role), warm),
        None => (None, None),
    };
    let switch = Arc::new(Switch::start_warm(config, tls, warm)?);
    if let Some((listener, metrics)) = admin {
        let operator = Arc::new(Admin {
            switch: switch.clone(),
            metrics,
            config_path: config_path.clone(),
            cluster,
        });
        let token = switch.shutdown_token();
        tokio::spawn(admin::serve(listener, operator, limits, admin_tls, token));
    }
    if let (true, Some(path)) = (clustered, &config_path) {
        // A standby started on the file as it was then; changes made since
        // (on both nodes, as on the active) are put in force as a reload
        // would, before the first acquirer is served.
        match switch.reload(path).await {
            Ok(what) => {
                tracing::info!(config = %path.display(), "cluster: config file read again: {what}")
            }
            Err(why) => tracing::error!(config = %path.display(),
                "cluster: config file read again and rejected, the one this node started with stays: {why}"),
        }
    }
    if let Some(path) = config_path {
        tokio::spawn(reload_on_sighup(switch.clone(), path));
    }
    if clustered {
        // A node taking over opens its bank links (and signs on) before it
        // answers acquirers: their connections wait in the backlog meanwhile.
        if !switch.wait_links_up(TAKEOVER_LINKS_WAIT).await {
            tracing::warn!(wait = ?TAKEOVER_LINKS_WAIT,
                "cluster: not every bank has a link up: serving acquirers anyway");
        }
    }
    let serving = switch.serve_all(listeners);
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => {
            if let Err(e) = served {
                tracing::error!(error = %e, "acquirer listener failed");
            }
            switch.shutdown().await;
            return Ok(Stopped::ListenerFailed);
        }
        _ = shutdown => {}
    }
    // The grace period in force (a reload may have changed it).
    let grace = switch.config().shutdown_grace;
    tracing::info!(?grace, "shutting down: answering what is in flight");
    // The listener keeps running (it stops accepting once draining) until drained;
    // a second signal stops at once.
    let stopped = tokio::select! {
        drained = switch.drain(grace) => if drained { Stopped::Drained } else { Stopped::GraceOver },
        _ = terminate_signal() => {
            tracing::warn!("second signal: stopping at once");
            return Ok(Stopped::Interrupted);
        }
    };
    tracing::info!(drained = stopped == Stopped::Drained, "switchyard stopped");
    Ok(stopped)
}

/// Reloads the config on every SIGHUP (unix), logging what was applied or why
/// the new file was rejected.
async fn reload_on_sighup(switch: Arc<Switch>, path: PathBuf) {
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

/// A multi-threaded runtime with `workers` worker threads.
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
}
