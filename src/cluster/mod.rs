//! No single machine: an active/standby pair of switches replicated through a
//! NATS JetStream stream (`[cluster]`).
//!
//! **One owner at a time.** The active node holds a lease: key `active` of the
//! JetStream key-value bucket `<stream>-lease` (file storage, three replicas,
//! `max_age` = the lease TTL, so an entry not renewed within the TTL is gone).
//! It takes the lease by creating the key ([`Lease::acquire`]); the revision
//! it created is its **epoch**. It renews with a compare-and-swap on the last
//! revision every TTL/3. On its own clock it stops answering and forwarding
//! once the time it last sent a renewal that succeeded plus 9/10 of the TTL has
//! passed ([`may_act`]): a paused or partitioned node stops before the lease
//! can expire at the servers, so before a standby can take it.
//!
//! **Replication.** Every journal batch (the same encoded records the local
//! journal writes) is published as one message (or a few, at record boundaries,
//! when larger than the servers' `max_payload`) to subject `<stream>.journal`
//! of the stream (file storage, at least three replicas; checked at start-up and
//! refused if weaker) with the node's epoch ([`replica::Replicator`]). Each
//! publish names the stream sequence it expects last in the stream
//! (`Nats-Expected-Last-Sequence`; the stream holds nothing else, and unlike
//! the per-subject check, the leader checks it against what it has accepted
//! but not yet applied, so publishes can be pipelined): once a new active has
//! written its
//! fence record, every late publish of the old one is rejected, and the old one
//! stops. A batch counts as durable only when the stream acknowledged it and the
//! local journal synced it; answers and forwards wait for that, as on one node.
//!
//! **The standby** ([`standby::Standby`]) consumes the stream continuously into
//! its local journal directory (the same segment format), so the duplicates
//! table, unfinished requests and reversal queue are a journal scan away. When
//! the lease is free it takes it, catches up to the stream's last sequence,
//! publishes a fence record, and only then starts the switch on its journal:
//! the ordinary recovery closes forwarded requests without an answer as
//! unanswered (68 to the acquirer's retransmission, a reversal advice to the
//! bank; never forwarded again), answers retransmissions from the journal, opens
//! the bank links and signs on, and then listens for acquirers. A standby does
//! not listen for acquirers at all: their connections are refused, and they try
//! the other address.

pub mod encoding;
pub mod replica;
pub mod standby;

use async_nats::jetstream::{self, kv, stream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The stream's name by default.
pub const STREAM_DEFAULT: &str = "SWITCHYARD";
/// The lease's time to live by default, ms. Longer than JetStream takes to
/// elect a new leader for the lease bucket when the NATS server leading it
/// dies (its Raft election timeouts are seconds long: up to ~8 s seen here),
/// during which no renewal can succeed: a shorter lease turns the loss of one
/// NATS server into a failover of the switch.
pub const LEASE_TTL_MS_DEFAULT: u64 = 15_000;
/// The shortest lease accepted, ms.
pub const LEASE_TTL_MS_MIN: u64 = 500;
/// The longest lease accepted, ms.
pub const LEASE_TTL_MS_MAX: u64 = 60_000;
/// How long connecting to NATS may take at start-up by default, ms.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// The most NATS server URLs.
pub const NATS_SERVERS_MAX: usize = 16;
/// The longest node id or stream name, characters.
pub const NAME_CHARS_MAX: usize = 64;
/// The fewest replicas the stream and the lease bucket may have.
pub const REPLICAS_MIN: usize = 3;
/// The lease's key in its bucket.
pub const LEASE_KEY: &str = "active";
/// The keys standbys report their progress under: `standby.<node id>`.
pub const STANDBY_KEY_PREFIX: &str = "standby.";

/// Header: the epoch of the node that published a batch.
pub const HEADER_EPOCH: &str = "Switchyard-Epoch";
/// Header: the node that published a batch.
pub const HEADER_NODE: &str = "Switchyard-Node";
/// Header: the first and last journal sequence numbers of a batch.
pub const HEADER_FIRST_SEQ: &str = "Switchyard-First-Seq";
/// See [`HEADER_FIRST_SEQ`].
pub const HEADER_LAST_SEQ: &str = "Switchyard-Last-Seq";
/// Header: a fence record (no records): the epoch that took over.
pub const HEADER_FENCE: &str = "Switchyard-Fence";

/// The cluster's settings (`[cluster]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// NATS server URLs.
    pub nats: Vec<String>,
    /// This node's id (in the lease and on every batch).
    pub node_id: String,
    /// The stream's name (the lease bucket is `<stream>-lease`).
    pub stream: String,
    /// The lease's time to live.
    pub lease_ttl: Duration,
    /// How long connecting may take at start-up.
    pub connect_timeout: Duration,
    /// A NATS credentials file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// TLS to the NATS servers.
    pub tls: Option<NatsTlsFiles>,
    /// How the batches this node publishes are encoded.
    pub compression: encoding::Compression,
}

impl ClusterConfig {
    /// The subject journal batches go to.
    pub fn subject(&self) -> String {
        format!("{}.journal", self.stream)
    }

    /// The lease bucket's name.
    pub fn bucket(&self) -> String {
        format!("{}-lease", self.stream)
    }
}

/// TLS files for NATS (`[cluster.tls]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsTlsFiles {
    /// The CA the servers' certificates chain to.
    pub ca_file: PathBuf,
    /// This node's certificate, when the servers ask for one.
    pub cert_file: Option<PathBuf>,
    /// Its key.
    pub key_file: Option<PathBuf>,
}

/// Why the cluster could not be joined or served.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The NATS servers could not be reached.
    #[error("connecting to NATS {servers:?}: {message}")]
    Connect {
        /// The URLs tried.
        servers: Vec<String>,
        /// What failed.
        message: String,
    },
    /// The stream or the lease bucket is configured more weakly than required,
    /// or could not be created.
    #[error("stream {name}: {message}")]
    Stream {
        /// The stream or bucket.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A JetStream request failed.
    #[error("{what}: {message}")]
    JetStream {
        /// What was being done.
        what: &'static str,
        /// The error.
        message: String,
    },
    /// A batch in the stream is not what a switch publishes.
    #[error("stream message {sequence}: {message}")]
    Batch {
        /// Its stream sequence.
        sequence: u64,
        /// What is wrong.
        message: String,
    },
    /// Writing the local copy of the stream failed.
    #[error("local journal {path}: {source}")]
    Local {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The lease was lost: this node stopped.
    #[error("lease lost (epoch {epoch}): {message}")]
    LeaseLost {
        /// The epoch this node held.
        epoch: u64,
        /// Why.
        message: String,
    },
}

impl ClusterError {
    /// Whether trying again may help (JetStream not ready yet), rather than a
    /// stream configured more weakly than required.
    fn is_temporary(&self) -> bool {
        match self {
            ClusterError::Stream { message, .. } => {
                !(message.contains("required") || message.contains("does not take"))
            }
            _ => false,
        }
    }

    fn js(what: &'static str) -> impl FnOnce(String) -> ClusterError {
        move |message| ClusterError::JetStream { what, message }
    }
}

// === The lease clock: whether this node may still act ===

/// Nanoseconds since [`clock_origin`] until which this node may answer and
/// forward; `u64::MAX` on a single node (always).
static ACT_UNTIL_NS: AtomicU64 = AtomicU64::new(u64::MAX);

fn clock_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn ns_since_origin(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(clock_origin()).as_nanos()).unwrap_or(u64::MAX)
}

/// Whether this node may write to a bank or an acquirer now: always on a single
/// node; in a cluster, while its lease holds on its own clock. Checked before
/// every write burst (one clock read).
pub fn may_act() -> bool {
    let until = ACT_UNTIL_NS.load(Ordering::Acquire);
    until == u64::MAX || ns_since_origin(Instant::now()) < until
}

/// How long this node may still act on its lease (`None` on a single node).
pub fn lease_left() -> Option<Duration> {
    let until = ACT_UNTIL_NS.load(Ordering::Acquire);
    (until != u64::MAX)
        .then(|| Duration::from_nanos(until.saturating_sub(ns_since_origin(Instant::now()))))
}

/// Sets the time until which this node may act.
fn act_until(at: Instant) {
    ACT_UNTIL_NS.store(ns_since_origin(at), Ordering::Release);
}

/// Stops this node acting, for good.
fn stop_acting() {
    ACT_UNTIL_NS.store(0, Ordering::Release);
}

// === Connecting ===

/// A node's connection to the cluster: the client, JetStream, the stream and
/// the lease bucket, checked.
#[derive(Clone)]
pub struct Cluster {
    /// The settings.
    pub config: ClusterConfig,
    /// JetStream.
    pub js: jetstream::Context,
    /// The stream of journal batches.
    pub stream: stream::Stream,
    /// The lease bucket.
    pub lease: kv::Store,
    /// The most bytes one message may carry (the servers' `max_payload`, less
    /// room for headers).
    pub message_max_bytes: usize,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.config.node_id)
            .field("stream", &self.config.stream)
            .finish_non_exhaustive()
    }
}

/// How long a JetStream request (a publish's acknowledgement, a lease
/// renewal) is waited for before it is retried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause before a failed lease renewal is tried again.
const RENEW_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The pause between two connection attempts at start-up.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Room left for a message's headers under `max_payload`, bytes.
const HEADER_ROOM_BYTES: usize = 1024;

impl Cluster {
    /// Connects, and creates or checks the stream (`retention`: how long batches
    /// are kept; the journal's retention) and the lease bucket.
    pub async fn connect(
        config: &ClusterConfig,
        retention: Duration,
    ) -> Result<Cluster, ClusterError> {
        let connect_error = |message: String| ClusterError::Connect {
            servers: config.nats.clone(),
            message,
        };
        let (options, servers) = connect_options(config, "node").await?;
        // Unbounded reconnection attempts to the cluster's servers while the
        // process lives (the lease bounds what happens meanwhile).
        let options = options.max_reconnects(None);
        // The servers may be starting too: try again until the connect timeout.
        let deadline = Instant::now() + config.connect_timeout;
        let client = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt =
                tokio::time::timeout(left, options.clone().connect(servers.clone())).await;
            match attempt {
                Ok(Ok(client)) => break client,
                Ok(Err(e)) if Instant::now() + CONNECT_RETRY_PAUSE < deadline => {
                    crate::log_limited!(warn, error = %e, "cluster: connecting to NATS failed; retrying");
                    tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
                }
                Ok(Err(e)) => return Err(connect_error(e.to_string())),
                Err(_) => {
                    return Err(connect_error(format!(
                        "no answer within {:?}",
                        config.connect_timeout
                    )))
                }
            }
        };
        let max_payload = client.server_info().max_payload;
        let mut js = jetstream::new(client);
        // A publish or a lease request unanswered this long is retried: an
        // acknowledgement lost with a server must not hold the journal for
        // long.
        js.set_timeout(REQUEST_TIMEOUT.min(config.lease_ttl / 3));
        // Right after the servers start, JetStream may still be electing its
        // leaders: try again until the connect timeout.
        let deadline = Instant::now() + config.connect_timeout;
        let (stream, lease) = loop {
            let ready = match ensure_stream(&js, config, retention).await {
                Ok(stream) => ensure_bucket(&js, config)
                    .await
                    .map(|lease| (stream, lease)),
                Err(e) => Err(e),
            };
            match ready {
                Ok(ready) => break ready,
                Err(e) if Instant::now() < deadline && e.is_temporary() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Cluster {
            config: config.clone(),
            js,
            stream,
            lease,
            message_max_bytes: max_payload.saturating_sub(HEADER_ROOM_BYTES).max(4096),
        })
    }

    /// The stream's last sequence now.
    pub async fn last_sequence(&self) -> Result<u64, ClusterError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| ClusterError::js("stream info")(e.to_string()))?;
        Ok(info.state.last_sequence)
    }
}

/// Creates the stream, or checks the one there: file storage, at least
/// [`REPLICAS_MIN`] replicas, our subject.
async fn ensure_stream(
    js: &jetstream::Context,
    config: &ClusterConfig,
    retention: Duration,
) -> Result<stream::Stream, ClusterError> {
    let name = config.stream.clone();
    let subject = config.subject();
    let wanted = stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        num_replicas: REPLICAS_MIN,
        max_age: retention,
        // Retried publishes carry the same message id: answered as duplicates.
        duplicate_window: Duration::from_secs(120),
        discard: stream::DiscardPolicy::Old,
        deny_delete: true,
        ..Default::default()
    };
    let refused = |message: String| ClusterError::Stream {
        name: name.clone(),
        message,
    };
    let stream = js
        .get_or_create_stream(wanted)
        .await
        .map_err(|e| refused(e.to_string()))?;
    let info = stream.cached_info();
    let c = &info.config;
    if c.storage != stream::StorageType::File {
        return Err(refused("memory storage: file storage required".to_owned()));
    }
    if c.num_replicas < REPLICAS_MIN {
        return Err(refused(format!(
            "{} replicas: at least {REPLICAS_MIN} required",
            c.num_replicas
        )));
    }
    if !c.subjects.contains(&subject) {
        return Err(refused(format!(
            "does not take subject {subject:?} (it takes {:?})",
            c.subjects
        )));
    }
    if c.duplicate_window.is_zero() {
        return Err(refused(
            "no duplicate window: retried publishes would be written twice".to_owned(),
        ));
    }
    if leaderless(&info.cluster) {
        return Err(refused("no leader elected yet".to_owned()));
    }
    Ok(stream)
}

/// Whether a replicated stream (or bucket) has no leader yet, as right after
/// it is created: a publish to it finds no one to answer, so it is not ready
/// (a temporary error, tried again until the connect timeout).
fn leaderless(cluster: &Option<stream::ClusterInfo>) -> bool {
    cluster.as_ref().is_some_and(|c| c.leader.is_none())
}

/// Creates the lease bucket, or checks the one there: file storage, at least
/// [`REPLICAS_MIN`] replicas, `max_age` the lease TTL.
async fn ensure_bucket(
    js: &jetstream::Context,
    config: &ClusterConfig,
) -> Result<kv::Store, ClusterError> {
    let bucket = config.bucket();
    let refused = |message: String| ClusterError::Stream {
        name: bucket.clone(),
        message,
    };
    let store = match js.get_key_value(bucket.clone()).await {
        Ok(store) => store,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                history: 1,
                max_age: config.lease_ttl,
                storage: stream::StorageType::File,
                num_replicas: REPLICAS_MIN,
                ..Default::default()
            })
            .await
            .map_err(|e| refused(e.to_string()))?,
    };
    let status = store.status().await.map_err(|e| refused(e.to_string()))?;
    let c = &status.info.config;
    if c.storage != stream::StorageType::File || c.num_replicas < REPLICAS_MIN {
        return Err(refused(format!(
            "{:?} storage, {} replicas: file storage and at least {REPLICAS_MIN} replicas required",
            c.storage, c.num_replicas
        )));
    }
    if c.max_age != config.lease_ttl {
        return Err(refused(format!(
            "max_age {:?} is not cluster.lease_ttl_ms ({:?}): every node must use the same TTL \
             (delete the bucket to change it)",
            c.max_age, config.lease_ttl
        )));
    }
    if leaderless(&status.info.cluster) {
        return Err(refused("no leader elected yet".to_owned()));
    }
    Ok(store)
}

// === The lease ===

/// The lease this node holds.
#[derive(Debug)]
pub struct Lease {
    /// The revision that created it: this node's epoch.
    pub epoch: u64,
    /// The revision of the last renewal.
    revision: u64,
    /// When the last renewal that succeeded was sent.
    renewed_at: Instant,
}

/// What [`Lease::acquire`] found.
#[derive(Debug)]
pub enum Acquired {
    /// Taken: this node is active.
    Taken(Lease),
    /// Held by another node.
    Held {
        /// Its node id.
        by: String,
        /// The revision it holds.
        revision: u64,
    },
}

impl Lease {
    /// Takes the lease if no node holds it.
    pub async fn acquire(cluster: &Cluster) -> Result<Acquired, ClusterError> {
        let sent = Instant::now();
        let id = bytes::Bytes::from(cluster.config.node_id.clone().into_bytes());
        match cluster.lease.create(LEASE_KEY, id).await {
            Ok(revision) => {
                let lease = Lease {
                    epoch: revision,
                    revision,
                    renewed_at: sent,
                };
                act_until(lease.valid_until(cluster.config.lease_ttl));
                Ok(Acquired::Taken(lease))
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let entry = cluster
                    .lease
                    .entry(LEASE_KEY)
                    .await
                    .map_err(|e| ClusterError::js("reading the lease")(e.to_string()))?;
                Ok(match entry {
                    Some(e) if e.operation == kv::Operation::Put => Acquired::Held {
                        by: String::from_utf8_lossy(&e.value).into_owned(),
                        revision: e.revision,
                    },
                    // Deleted or expired between the two calls: free next time.
                    _ => Acquired::Held {
                        by: String::new(),
                        revision: 0,
                    },
                })
            }
            Err(e) => Err(ClusterError::js("taking the lease")(e.to_string())),
        }
    }

    /// Until when this node may act on this lease: the last renewal's sending
    /// time plus 9/10 of the TTL (the servers expire it at the earliest a TTL
    /// after they stored it).
    fn valid_until(&self, ttl: Duration) -> Instant {
        self.renewed_at + ttl - ttl / 10
    }

    /// Renews the lease (compare-and-swap on its last revision): `Ok(false)`
    /// when the revision is no longer the last (expired, or another node's).
    pub async fn renew(&mut self, cluster: &Cluster) -> Result<bool, ClusterError> {
        let sent = Instant::now();
        let id = bytes::Bytes::from(cluster.config.node_id.clone().into_bytes());
        let revision = match cluster.lease.update(LEASE_KEY, id, self.revision).await {
            Ok(revision) => revision,
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => return Ok(false),
            Err(e) => return Err(ClusterError::js("renewing the lease")(e.to_string())),
        };
        self.revision = revision;
        self.renewed_at = sent;
        act_until(self.valid_until(cluster.config.lease_ttl));
        Ok(true)
    }

    /// Gives the lease up (a step-down): deletes the key if it is still ours.
    pub async fn release(self, cluster: &Cluster) {
        stop_acting();
        let _ = cluster
            .lease
            .delete_expect_revision(LEASE_KEY, Some(self.revision))
            .await;
    }
}

/// Renews `lease` every TTL/3 until `stop` is cancelled (then releases it);
/// when a renewal has not succeeded by the time the lease runs out on this
/// node's clock, stops this node acting and cancels `lost`.
pub async fn keep_lease(
    cluster: Cluster,
    mut lease: Lease,
    stop: tokio_util::sync::CancellationToken,
    lost: tokio_util::sync::CancellationToken,
) {
    let ttl = cluster.config.lease_ttl;
    let mut next = ttl / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                lease.release(&cluster).await;
                return;
            }
            _ = tokio::time::sleep(next) => {}
        }
        next = RENEW_RETRY_PAUSE;
        let deadline = lease.valid_until(ttl);
        let renewed = tokio::time::timeout_at(deadline.into(), lease.renew(&cluster)).await;
        match renewed {
            Ok(Ok(true)) => {
                metrics::counter!("switchyard_cluster_lease_renewals_total", "result" => "ok")
                    .increment(1);
                next = ttl / 3;
            }
            Ok(Ok(false)) => {
                // Expired at the servers, or another node's now.
                metrics::counter!("switchyard_cluster_lease_renewals_total", "result" => "lost")
                    .increment(1);
                stop_acting();
                tracing::error!(
                    epoch = lease.epoch,
                    "cluster lease no longer ours (expired or taken): stopping"
                );
                lost.cancel();
                return;
            }
            Ok(Err(e)) => {
                metrics::counter!("switchyard_cluster_lease_renewals_total", "result" => "failed")
                    .increment(1);
                crate::log_limited!(warn, epoch = lease.epoch, error = %e, "cluster lease renewal failed");
            }
            Err(_) => {}
        }
        if Instant::now() >= lease.valid_until(ttl) {
            stop_acting();
            tracing::error!(
                epoch = lease.epoch,
                "cluster lease not renewed in time: stopping (no more answers or forwards)"
            );
            lost.cancel();
            return;
        }
    }
}

/// The stream sequence and journal sequences of a batch message.
pub(crate) fn header_u64(headers: Option<&async_nats::HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

// === From standby to active ===

/// An active node: its epoch, and the tokens that end its term.
#[derive(Debug)]
pub struct Active {
    /// This node's epoch.
    pub epoch: u64,
    /// Cancel to give the lease up (a shutdown or step-down).
    pub stop: tokio_util::sync::CancellationToken,
    /// Cancelled when the lease is lost or the stream fenced this node.
    pub lost: tokio_util::sync::CancellationToken,
    /// The journal copy as read while standing by (`Switch::start_warm`).
    pub warm: Option<crate::daemon::recovery::Warm>,
    lease_task: tokio::task::JoinHandle<()>,
}

impl Active {
    /// Gives the lease up and waits until it is released.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.lease_task.await;
    }
}

/// Joins the cluster: stands by, copying the stream into `journal`'s directory
/// and reading it into `warm` (the switch's duplicates table and unfinished
/// business, kept current), until this node takes the lease (then catches up,
/// fences, and returns with `journal` replicating into the stream and the lease
/// kept), or `stop` resolves first (`None`).
pub async fn activate(
    config: &ClusterConfig,
    journal: &mut crate::journal::JournalConfig,
    progress: std::sync::Arc<standby::Progress>,
    warm: Option<crate::daemon::recovery::Warm>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Option<Active>, ClusterError> {
    let cluster = Cluster::connect(config, journal.retention).await?;
    let needed = crate::journal::record::RECORD_LEN_MAX_BYTES + crate::journal::record::LEN_BYTES;
    if cluster.message_max_bytes < needed {
        return Err(ClusterError::Stream {
            name: config.stream.clone(),
            message: format!(
                "the servers' max_payload leaves {} bytes a message: a journal record needs up to \
                 {needed}",
                cluster.message_max_bytes
            ),
        });
    }
    tracing::info!(node = %config.node_id, stream = %config.stream, servers = ?config.nats,
        lease_ttl_ms = config.lease_ttl.as_millis() as u64, "cluster: connected");
    let standby = standby::Standby::new(cluster.clone(), journal, progress, warm);
    let Some(mut takeover) = standby.run(stop).await? else {
        return Ok(None);
    };
    let epoch = takeover.lease.epoch;
    tracing::info!(node = %config.node_id, epoch, fence_sequence = takeover.fence_sequence,
        batches_copied = takeover.batches_copied, journal_last_seq = takeover.journal_last_seq,
        catch_up_ms = takeover.catch_up.as_millis() as u64, warm = ?takeover.warm,
        "cluster: active (fence written; starting the switch on the copied journal)");
    metrics::counter!("switchyard_cluster_takeovers_total").increment(1);
    let lost = tokio_util::sync::CancellationToken::new();
    let replicator = std::sync::Arc::new(replica::Replicator::new(
        cluster.clone(),
        epoch,
        takeover.fence_sequence,
        tokio::runtime::Handle::current(),
        lost.clone(),
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    let lease_task = tokio::spawn(keep_lease(
        cluster,
        takeover.lease,
        stop.clone(),
        lost.clone(),
    ));
    if takeover.batches_copied == 0 {
        seed(replicator.clone(), journal).await?;
    }
    journal.replica = Some(replicator);
    Ok(Some(Active {
        epoch,
        stop,
        lost,
        warm: takeover.warm.take(),
        lease_task,
    }))
}

/// Records a seeding message holds at most, in bytes (the replicator cuts
/// larger ones at `max_payload`): what a seeding keeps in memory is at most
/// [`replica::IN_FLIGHT_MAX`] of them.
const SEED_PIECE_BYTES: usize = 256 * 1024;

/// A node that takes over a stream holding no journal record (a new cluster,
/// started on a node that ran alone before) publishes its own journal first,
/// from its first record within the retention, so that the standbys know
/// the unfinished business and the duplicates of before the cluster; then
/// the switch starts on it as usual. Records checked as a scan checks them
/// (a torn tail is left out, as the journal's open cuts it). Waits until the
/// stream acknowledged every one. The records published and the last one's
/// sequence.
async fn seed(
    replicator: std::sync::Arc<replica::Replicator>,
    journal: &crate::journal::JournalConfig,
) -> Result<(u64, u64), ClusterError> {
    use crate::journal::Replica;
    let dir = journal.dir.clone();
    if !dir.exists() {
        return Ok((0, 0));
    }
    let retention_ms = u64::try_from(journal.retention.as_millis()).unwrap_or(u64::MAX);
    let since = crate::clock::unix_ms().saturating_sub(retention_ms);
    let sender = replicator.clone();
    let read = tokio::task::spawn_blocking(move || {
        let (mut piece, mut records, mut last) = (Vec::new(), 0u64, 0u64);
        let scan = crate::journal::scan(&dir, |_, _, r| {
            if records == 0 && r.unix_ms < since {
                return; // before the retention: the journal prunes it
            }
            crate::journal::record::encode(&mut piece, r);
            records += 1;
            last = r.seq;
            if piece.len() >= SEED_PIECE_BYTES {
                sender.send(&piece);
                piece.clear();
            }
        });
        if !piece.is_empty() {
            sender.send(&piece);
        }
        scan.map(|_| (records, last))
    })
    .await
    .map_err(|e| ClusterError::js("seeding the stream")(e.to_string()))?;
    let (records, last) = read.map_err(|e| ClusterError::Local {
        path: journal.dir.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    if records == 0 {
        return Ok((0, 0));
    }
    tracing::info!(records, last_seq = last, dir = %journal.dir.display(),
        "cluster: the stream holds no journal record: publishing this node's journal first");
    loop {
        match replicator.confirmed() {
            Ok(confirmed) if confirmed >= last => break,
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            Err(why) => return Err(ClusterError::js("seeding the stream")(why)),
        }
    }
    tracing::info!(
        records,
        last_seq = last,
        "cluster: this node's journal is in the stream"
    );
    Ok((records, last))
}

// === `switchyard cluster status`, and reading the stream ===

/// The connection options for `config` (name, timeout, credentials, TLS) and
/// its servers; `what` names the client to the servers.
async fn connect_options(
    config: &ClusterConfig,
    what: &str,
) -> Result<(async_nats::ConnectOptions, Vec<async_nats::ServerAddr>), ClusterError> {
    let connect_error = |message: String| ClusterError::Connect {
        servers: config.nats.clone(),
        message,
    };
    let servers: Vec<async_nats::ServerAddr> = config
        .nats
        .iter()
        .map(|u| u.parse().map_err(|e| connect_error(format!("{u:?}: {e}"))))
        .collect::<Result<_, _>>()?;
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("switchyard {what} ({})", config.node_id))
        .connection_timeout(config.connect_timeout);
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| connect_error(format!("credentials file {}: {e}", path.display())))?;
    }
    if let Some(tls) = &config.tls {
        options = options
            .require_tls(true)
            .add_root_certificates(tls.ca_file.clone());
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    Ok((options, servers))
}

/// A plain client of the cluster's servers (for a command: no retries).
pub(crate) async fn connect_client(
    config: &ClusterConfig,
    what: &str,
) -> Result<async_nats::Client, ClusterError> {
    let (options, servers) = connect_options(config, what).await?;
    tokio::time::timeout(config.connect_timeout, options.connect(servers))
        .await
        .map_err(|_| ClusterError::Connect {
            servers: config.nats.clone(),
            message: format!("no answer within {:?}", config.connect_timeout),
        })?
        .map_err(|e| ClusterError::Connect {
            servers: config.nats.clone(),
            message: e.to_string(),
        })
}

/// What the cluster looks like from NATS (for `switchyard cluster status`): the
/// stream, the lease, and each standby's progress. Creates nothing.
pub async fn status(config: &ClusterConfig) -> Result<serde_json::Value, ClusterError> {
    let js = jetstream::new(connect_client(config, "cluster status").await?);
    let stream = js
        .get_stream(&config.stream)
        .await
        .map_err(|e| ClusterError::js("reading the stream")(e.to_string()))?;
    let info = stream
        .get_info()
        .await
        .map_err(|e| ClusterError::js("reading the stream")(e.to_string()))?;
    let last = info.state.last_sequence;
    let newest = match stream
        .get_last_raw_message_by_subject(&config.subject())
        .await
    {
        Ok(m) => {
            let h = Some(&m.headers);
            serde_json::json!({
                "sequence": m.sequence,
                "epoch": header_u64(h, HEADER_EPOCH),
                "node": m.headers.get(HEADER_NODE).map(|v| v.as_str().to_owned()),
                "fence": header_u64(h, HEADER_FENCE).is_some(),
                "journal_last_seq": header_u64(h, HEADER_LAST_SEQ),
            })
        }
        Err(_) => serde_json::Value::Null,
    };
    let store = js
        .get_key_value(config.bucket())
        .await
        .map_err(|e| ClusterError::js("reading the lease bucket")(e.to_string()))?;
    let now = time::OffsetDateTime::now_utc();
    let age_ms = |created: time::OffsetDateTime| (now - created).whole_milliseconds().max(0) as u64;
    let lease = match store.entry(LEASE_KEY).await {
        Ok(Some(e)) if e.operation == kv::Operation::Put => serde_json::json!({
            "holder": String::from_utf8_lossy(&e.value),
            "revision": e.revision,
            "age_ms": age_ms(e.created),
        }),
        Ok(_) => serde_json::Value::Null,
        Err(e) => return Err(ClusterError::js("reading the lease")(e.to_string())),
    };
    let mut standbys = Vec::new();
    if let Ok(mut keys) = store.keys().await {
        use futures_util::StreamExt;
        while let Some(Ok(key)) = keys.next().await {
            let Some(node) = key.strip_prefix(STANDBY_KEY_PREFIX) else {
                continue;
            };
            if let Ok(Some(e)) = store.entry(key.as_str()).await {
                let text = String::from_utf8_lossy(&e.value).into_owned();
                let mut parts = text.split(' ').map(|p| p.parse::<u64>().ok());
                let applied = parts.next().flatten().unwrap_or(0);
                standbys.push(serde_json::json!({
                    "node": node,
                    "applied_sequence": applied,
                    "journal_last_seq": parts.next().flatten(),
                    "lag_messages": last.saturating_sub(applied),
                    "reported_ms_ago": age_ms(e.created),
                }));
            }
        }
    }
    Ok(serde_json::json!({
        "stream": {
            "name": config.stream,
            "messages": info.state.messages,
            "bytes": info.state.bytes,
            "first_sequence": info.state.first_sequence,
            "last_sequence": last,
            "replicas": info.config.num_replicas,
            "leader": info.cluster.as_ref().and_then(|c| c.leader.clone()),
            "newest": newest,
        },
        "lease": lease,
        "lease_ttl_ms": config.lease_ttl.as_millis() as u64,
        "standbys": standbys,
    }))
}
