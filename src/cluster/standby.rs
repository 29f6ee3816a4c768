//! The standby: the stream copied into the local journal directory as it
//! grows, the lease watched, and the takeover ([`Standby::run`]).
//!
//! The copy is the journal itself: each batch message holds records encoded as
//! in a segment, and they are appended to segment files named, as the
//! journal's, by their first sequence number. When the lease is free the
//! standby takes it, reads the stream to its last sequence, syncs the copy, and
//! writes a fence record (a message without records, carrying its epoch) that
//! names that sequence as the last: from then on the old active's publishes are
//! refused. The switch then starts on the copied journal, whose ordinary
//! recovery rebuilds the duplicates table and closes unfinished requests.
//!
//! A node's own journal directory may hold records the stream never
//! acknowledged (it was active, and died between its local write and the
//! acknowledgement): such records never counted as durable. So before the first
//! record copied from a stream that is not empty, the directory is moved aside to
//! `<dir>.previous` (replacing an older one) and the copy starts afresh.

use super::{
    header_u64, Acquired, Cluster, ClusterError, Lease, HEADER_EPOCH, HEADER_FENCE,
    HEADER_FIRST_SEQ, HEADER_LAST_SEQ, HEADER_NODE, STANDBY_KEY_PREFIX,
};
use crate::journal::reader::{SEGMENT_PREFIX, SEGMENT_SUFFIX};
use crate::journal::writer::segment_path;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use futures_util::StreamExt;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most fence attempts (each after reading what was published meanwhile).
const FENCE_ATTEMPTS_MAX: usize = 20;
/// The longest wait for the stream's next message while catching up.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);
/// The longest pause between two looks at the lease.
const LEASE_POLL_MAX: Duration = Duration::from_millis(250);

/// What a takeover found and did.
#[derive(Debug)]
pub struct Takeover {
    /// The lease (its epoch).
    pub lease: Lease,
    /// The stream sequence of the fence record.
    pub fence_sequence: u64,
    /// Batch messages copied while standing by and catching up.
    pub batches_copied: u64,
    /// The last journal sequence copied (0: none).
    pub journal_last_seq: u64,
    /// From taking the lease to the fence written.
    pub catch_up: Duration,
}

/// The local copy of the stream.
struct Copy {
    dir: PathBuf,
    segment_size_max: u64,
    /// The segment being written and its size.
    file: Option<(File, PathBuf, u64)>,
    /// Whether the directory was made ready (moved aside when it held records).
    ready: bool,
    /// The next journal sequence expected (0: any).
    next_seq: u64,
    batches: u64,
    /// The stream sequence of the last message applied.
    applied: u64,
}

fn local(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Local {
        path: path.to_owned(),
        source,
    }
}

/// Whether `dir` holds journal segments.
fn has_segments(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(SEGMENT_PREFIX) && name.ends_with(SEGMENT_SUFFIX)
        })
    })
}

impl Copy {
    /// Moves a directory holding records aside, once, before the first record
    /// is copied into it.
    fn make_ready(&mut self) -> Result<(), ClusterError> {
        if self.ready {
            return Ok(());
        }
        if has_segments(&self.dir) {
            let mut previous = self.dir.clone().into_os_string();
            previous.push(".previous");
            let previous = PathBuf::from(previous);
            if previous.exists() {
                fs::remove_dir_all(&previous).map_err(local(&previous))?;
            }
            fs::rename(&self.dir, &previous).map_err(local(&self.dir))?;
            tracing::warn!(dir = %self.dir.display(), moved_to = %previous.display(),
                "cluster: the local journal is rebuilt from the stream; the old one is kept aside");
        }
        fs::create_dir_all(&self.dir).map_err(local(&self.dir))?;
        self.ready = true;
        Ok(())
    }

    fn append(
        &mut self,
        sequence: u64,
        first: u64,
        last: u64,
        bytes: &[u8],
    ) -> Result<(), ClusterError> {
        if self.next_seq != 0 && first != self.next_seq {
            return Err(ClusterError::Batch {
                sequence,
                message: format!(
                    "journal records {first}..={last}, but {} was expected next",
                    self.next_seq
                ),
            });
        }
        self.make_ready()?;
        let rotate = self
            .file
            .as_ref()
            .is_none_or(|(_, _, size)| *size >= self.segment_size_max);
        if rotate {
            if let Some((file, path, _)) = self.file.take() {
                file.sync_data().map_err(local(&path))?;
            }
            let path = segment_path(&self.dir, first);
            let file = File::options()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(local(&path))?;
            self.file = Some((file, path, 0));
        }
        if let Some((file, path, size)) = &mut self.file {
            file.write_all(bytes).map_err(local(path))?;
            *size += bytes.len() as u64;
        }
        self.next_seq = last + 1;
        self.batches += 1;
        Ok(())
    }

    /// Copies one message of the stream: a batch's records are appended, a
    /// fence record is only passed. Its delivery information.
    fn apply<'m>(
        &mut self,
        msg: &'m async_nats::jetstream::Message,
    ) -> Result<async_nats::jetstream::message::Info<'m>, ClusterError> {
        let info = msg
            .info()
            .map_err(|e| ClusterError::js("stream message")(e.to_string()))?;
        let sequence = info.stream_sequence;
        let headers = msg.headers.as_ref();
        if header_u64(headers, HEADER_FENCE).is_none() {
            let (Some(first), Some(last)) = (
                header_u64(headers, HEADER_FIRST_SEQ),
                header_u64(headers, HEADER_LAST_SEQ),
            ) else {
                return Err(ClusterError::Batch {
                    sequence,
                    message: "no journal sequence headers".to_owned(),
                });
            };
            self.append(sequence, first, last, &msg.payload)?;
            metrics::counter!("switchyard_cluster_batches_copied_total").increment(1);
        }
        self.applied = sequence;
        Ok(info)
    }

    /// Makes what was copied durable here.
    fn sync(&mut self) -> Result<(), ClusterError> {
        if let Some((file, path, _)) = &self.file {
            file.sync_data().map_err(local(path))?;
        }
        if self.ready {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(local(&self.dir))?;
        }
        Ok(())
    }
}

/// How far a standby has come, for its admin endpoint (`/status`,
/// `/readyz`).
#[derive(Debug, Default)]
pub struct Progress {
    /// The stream sequence of the last message copied.
    pub applied: AtomicU64,
    /// Messages the stream holds after it (the consumer's pending count).
    pub lag_messages: AtomicU64,
    /// The last journal sequence copied.
    pub journal_last_seq: AtomicU64,
    /// When the last message copied was stored in the stream, Unix ms.
    pub last_published_unix_ms: AtomicU64,
    /// The node holding the lease, as last seen.
    pub holder: Mutex<String>,
}

impl Progress {
    /// How far behind the stream the copy is, ms: the age of the last message
    /// copied while more wait, 0 when none does.
    pub fn lag_ms(&self) -> u64 {
        if self.lag_messages.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        crate::clock::unix_ms().saturating_sub(self.last_published_unix_ms.load(Ordering::Relaxed))
    }
}

/// A node standing by.
pub struct Standby {
    cluster: Cluster,
    copy: Copy,
    progress: Arc<Progress>,
}

impl Standby {
    /// A standby copying into the journal directory `dir` (segments of
    /// `segment_size_max` bytes).
    pub fn new(
        cluster: Cluster,
        dir: PathBuf,
        segment_size_max: u64,
        progress: Arc<Progress>,
    ) -> Standby {
        Standby {
            progress,
            cluster,
            copy: Copy {
                dir,
                segment_size_max,
                file: None,
                ready: false,
                next_seq: 0,
                batches: 0,
                applied: 0,
            },
        }
    }

    fn apply(&mut self, msg: &async_nats::jetstream::Message) -> Result<(), ClusterError> {
        let info = self.copy.apply(msg)?;
        let published = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        let p = &self.progress;
        p.lag_messages.store(info.pending, Ordering::Relaxed);
        p.last_published_unix_ms.store(published, Ordering::Relaxed);
        p.applied.store(info.stream_sequence, Ordering::Relaxed);
        p.journal_last_seq
            .store(self.copy.next_seq.saturating_sub(1), Ordering::Relaxed);
        metrics::gauge!("switchyard_cluster_applied_sequence").set(info.stream_sequence as f64);
        Ok(())
    }

    /// Copies the stream until this node takes the lease (then catches up and
    /// fences: [`Takeover`]), or `stop` resolves (`None`).
    pub async fn run(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Option<Takeover>, ClusterError> {
        let consumer = self
            .cluster
            .stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.cluster.config.subject(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::js("creating the standby's consumer")(e.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| ClusterError::js("reading the stream")(e.to_string()))?;
        let poll = (self.cluster.config.lease_ttl / 10).min(LEASE_POLL_MAX);
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        let mut holder = String::new();
        let mut reported = Instant::now();
        let lease = loop {
            tokio::select! {
                _ = &mut stop => return Ok(None),
                msg = messages.next() => match msg {
                    Some(Ok(msg)) => self.apply(&msg)?,
                    Some(Err(e)) => {
                        crate::log_limited!(warn, error = %e, "cluster: reading the stream failed; going on");
                    }
                    None => return Err(ClusterError::js("reading the stream")("the consumer ended".to_owned())),
                },
                _ = tick.tick() => match Lease::acquire(&self.cluster).await {
                    Ok(Acquired::Held { .. }) if reported.elapsed() >= self.cluster.config.lease_ttl / 3 => {
                        reported = Instant::now();
                        self.report().await;
                    }
                    Ok(Acquired::Taken(lease)) => break lease,
                    Ok(Acquired::Held { by, .. }) => {
                        if by != holder && !by.is_empty() {
                            *crate::sync::lock(&self.progress.holder) = by.clone();
                            tracing::info!(active = %by, node = %self.cluster.config.node_id,
                                "cluster: standing by, copying the stream");
                            holder = by;
                        }
                    }
                    Err(e) => crate::log_limited!(warn, error = %e, "cluster: looking at the lease failed"),
                },
            }
        };
        let took = Instant::now();
        tracing::info!(epoch = lease.epoch, node = %self.cluster.config.node_id,
            "cluster: lease taken; catching up with the stream");
        for _ in 0..FENCE_ATTEMPTS_MAX {
            let last = self.cluster.last_sequence().await?;
            while self.copy.applied < last {
                match tokio::time::timeout(CATCH_UP_WAIT, messages.next()).await {
                    Ok(Some(Ok(msg))) => self.apply(&msg)?,
                    Ok(Some(Err(e))) => {
                        crate::log_limited!(warn, error = %e, "cluster: reading the stream failed; going on");
                    }
                    Ok(None) | Err(_) => {
                        return Err(ClusterError::js("catching up")(format!(
                            "stream sequence {} of {last} not delivered within {CATCH_UP_WAIT:?}",
                            self.copy.applied + 1
                        )))
                    }
                }
            }
            self.copy.sync()?;
            match self.fence(lease.epoch, last).await {
                Ok(fence_sequence) => {
                    let takeover = Takeover {
                        fence_sequence,
                        batches_copied: self.copy.batches,
                        journal_last_seq: self.copy.next_seq.saturating_sub(1),
                        catch_up: took.elapsed(),
                        lease,
                    };
                    return Ok(Some(takeover));
                }
                // Something was published after `last`: read it, fence again.
                Err(None) => continue,
                Err(Some(e)) => return Err(e),
            }
        }
        Err(ClusterError::js("fencing")(format!(
            "the stream kept growing through {FENCE_ATTEMPTS_MAX} attempts"
        )))
    }

    /// Tells the bucket how far this standby has copied (key
    /// `standby.<node>`: the stream sequence and the journal sequence), for
    /// `switchyard cluster status`; entries age out with the lease TTL.
    async fn report(&self) {
        let key = format!("{STANDBY_KEY_PREFIX}{}", self.cluster.config.node_id);
        let value = format!(
            "{} {}",
            self.copy.applied,
            self.copy.next_seq.saturating_sub(1)
        );
        if let Err(e) = self.cluster.lease.put(key, value.into()).await {
            crate::log_limited!(warn, error = %e, "cluster: reporting the standby's progress failed");
        }
    }

    /// Writes the fence record after stream sequence `last`: its sequence, or
    /// `Err(None)` when something was written after `last` meanwhile.
    async fn fence(&self, epoch: u64, last: u64) -> Result<u64, Option<ClusterError>> {
        let mut headers = async_nats::HeaderMap::new();
        let epoch_text = epoch.to_string();
        headers.insert(HEADER_FENCE, epoch_text.as_str());
        headers.insert(HEADER_EPOCH, epoch_text.as_str());
        headers.insert(HEADER_NODE, self.cluster.config.node_id.as_str());
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
            last.to_string().as_str(),
        );
        let fail = |e: String| Some(ClusterError::js("writing the fence record")(e));
        let ack = self
            .cluster
            .js
            .publish_with_headers(self.cluster.config.subject(), headers, bytes::Bytes::new())
            .await;
        let ack = match ack {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(None),
            Err(e) => Err(fail(e.to_string())),
        }
    }
}

/// Copies the cluster's stream, up to its last sequence now, into the empty
/// (or new) directory `dir` as journal segments: what `journal verify`,
/// `journal dump` and `settlement` read with `--cluster-config`. Takes no
/// lease and writes nothing to NATS. The batch messages copied and the last
/// journal sequence.
pub async fn copy_stream(
    config: &super::ClusterConfig,
    dir: &Path,
) -> Result<(u64, u64), ClusterError> {
    let js = async_nats::jetstream::new(super::connect_client(config, "stream copy").await?);
    let stream = js
        .get_stream(&config.stream)
        .await
        .map_err(|e| ClusterError::js("reading the stream")(e.to_string()))?;
    let last = stream
        .get_info()
        .await
        .map_err(|e| ClusterError::js("reading the stream")(e.to_string()))?
        .state
        .last_sequence;
    let mut copy = Copy {
        dir: dir.to_owned(),
        segment_size_max: crate::journal::writer::SEGMENT_SIZE_MAX_BYTES_DEFAULT,
        file: None,
        ready: false,
        next_seq: 0,
        batches: 0,
        applied: 0,
    };
    fs::create_dir_all(dir).map_err(local(dir))?;
    if last > 0 {
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: config.subject(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::js("reading the stream")(e.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| ClusterError::js("reading the stream")(e.to_string()))?;
        while copy.applied < last {
            let msg = match tokio::time::timeout(CATCH_UP_WAIT, messages.next()).await {
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(e))) => {
                    return Err(ClusterError::js("reading the stream")(e.to_string()))
                }
                Ok(None) | Err(_) => {
                    return Err(ClusterError::js("reading the stream")(format!(
                        "sequence {} of {last} not delivered within {CATCH_UP_WAIT:?}",
                        copy.applied + 1
                    )))
                }
            };
            copy.apply(&msg)?;
        }
    }
    copy.sync()?;
    Ok((copy.batches, copy.next_seq.saturating_sub(1)))
}
