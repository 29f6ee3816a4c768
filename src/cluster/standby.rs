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
    encoding, header_u64, Acquired, Cluster, ClusterError, Lease, HEADER_EPOCH, HEADER_FENCE,
    HEADER_FIRST_SEQ, HEADER_LAST_SEQ, HEADER_NODE, STANDBY_KEY_PREFIX,
};
use crate::daemon::recovery::Warm;
use crate::journal::reader::{SEGMENT_PREFIX, SEGMENT_SUFFIX};
use crate::journal::writer::segment_path;
use crate::journal::JournalConfig;
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
/// The pause before sending a fence record again that did not reach the
/// stream (its leader being elected, a server lost).
const FENCE_RETRY_PAUSE: Duration = Duration::from_millis(200);
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
    /// The copy as read while it was made, for the switch to start on without
    /// reading it again (`None`: nothing was copied; the switch reads its
    /// journal directory at start).
    pub warm: Option<Warm>,
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
    /// The records copied, read as they come: checked, located, and the
    /// switch's duplicates table and unfinished business built from them.
    warm: Option<Warm>,
    /// The journal's retention: copied segments older than it are deleted,
    /// as the active's journal deletes its own (and the stream its messages);
    /// `None`: kept (a one-off copy).
    retention: Option<Duration>,
    /// Where a compressed message's records are decompressed (kept: at most
    /// [`encoding::PLAIN_MESSAGE_MAX_BYTES`]).
    plain: Vec<u8>,
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
    /// An empty copy into `dir`, read into `warm` when given.
    fn new(dir: PathBuf, segment_size_max: u64, warm: Option<Warm>) -> Copy {
        Copy {
            dir,
            segment_size_max,
            file: None,
            ready: false,
            next_seq: 0,
            batches: 0,
            applied: 0,
            warm,
            retention: None,
            plain: Vec::new(),
        }
    }

    /// Deletes the closed segments whose newest record is older than the
    /// retention (known only from records read: with `warm`).
    fn prune(&mut self) -> Result<(), ClusterError> {
        let (Some(warm), Some(retention)) = (&mut self.warm, self.retention) else {
            return Ok(());
        };
        let expired = warm.prescan.expired(retention, crate::clock::unix_ms());
        if expired.is_empty() {
            return Ok(());
        }
        for path in expired {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e,
                        "cluster: cannot delete a copied segment past the retention");
                    continue;
                }
            }
            warm.prescan.forget(&path);
            tracing::info!(path = %path.display(), reason = "age", "journal segment pruned");
        }
        // The deletions must not come back after a crash.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(local(&self.dir))
    }

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
                self.prune()?;
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
            if let Some(warm) = &mut self.warm {
                warm.batch(path, *size, bytes)
                    .map_err(|e| ClusterError::Batch {
                        sequence,
                        message: e.to_string(),
                    })?;
            }
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
            let encoding = headers
                .and_then(|h| h.get(encoding::HEADER_ENCODING))
                .map(|v| v.as_str());
            // The buffer is lent out while the records are appended.
            let mut buf = std::mem::take(&mut self.plain);
            let appended = match encoding::plain(encoding, &msg.payload, &mut buf) {
                Ok(records) => self.append(sequence, first, last, records),
                Err(message) => Err(ClusterError::Batch { sequence, message }),
            };
            self.plain = buf;
            appended?;
            metrics::counter!("switchyard_cluster_batches_copied_total").increment(1);
        }
        self.applied = sequence;
        Ok(info)
    }

    /// The copy as read, when records were copied into it.
    fn take_warm(&mut self) -> Option<Warm> {
        if self.ready {
            self.warm.take()
        } else {
            None
        }
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
    /// Keys in the duplicates table kept warm from the copy.
    pub duplicate_keys: AtomicU64,
    /// Requests copied without an outcome yet.
    pub open_requests: AtomicU64,
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
    /// A standby copying into the directory of `journal` (its segment size;
    /// segments past its retention deleted), reading the copy into `warm` as it
    /// goes.
    pub fn new(
        cluster: Cluster,
        journal: &JournalConfig,
        progress: Arc<Progress>,
        warm: Option<Warm>,
    ) -> Standby {
        let mut copy = Copy::new(journal.dir.clone(), journal.segment_size_max_bytes, warm);
        copy.retention = Some(journal.retention);
        Standby {
            progress,
            cluster,
            copy,
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
        if let Some(warm) = &self.copy.warm {
            let (keys, open) = warm.restore.held();
            p.duplicate_keys.store(keys as u64, Ordering::Relaxed);
            p.open_requests.store(open as u64, Ordering::Relaxed);
        }
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
                _ = tick.tick() => match self.acquire().await {
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
            // A fence that cannot reach the stream is sent again while half
            // the lease taken is left.
            let fence_deadline = took + self.cluster.config.lease_ttl / 2;
            match self.fence(lease.epoch, last, fence_deadline).await {
                Ok(fence_sequence) => {
                    let takeover = Takeover {
                        fence_sequence,
                        batches_copied: self.copy.batches,
                        journal_last_seq: self.copy.next_seq.saturating_sub(1),
                        catch_up: took.elapsed(),
                        lease,
                        warm: self.copy.take_warm(),
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

    /// Looks at the lease (taking it when free), after letting the warm
    /// duplicates table's keys past the window go.
    async fn acquire(&mut self) -> Result<Acquired, ClusterError> {
        if let Some(warm) = &self.copy.warm {
            warm.restore.expire();
        }
        Lease::acquire(&self.cluster).await
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
    /// `Err(None)` when something was written after `last` meanwhile. A
    /// publish that did not reach the stream (no leader yet right after the
    /// stream was created, a server lost) is sent again until `deadline`; it
    /// carries a message id, so one that landed with its acknowledgement lost
    /// is answered as a duplicate, with its sequence.
    async fn fence(
        &self,
        epoch: u64,
        last: u64,
        deadline: Instant,
    ) -> Result<u64, Option<ClusterError>> {
        let mut headers = async_nats::HeaderMap::new();
        let epoch_text = epoch.to_string();
        headers.insert(HEADER_FENCE, epoch_text.as_str());
        headers.insert(HEADER_EPOCH, epoch_text.as_str());
        headers.insert(HEADER_NODE, self.cluster.config.node_id.as_str());
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
            last.to_string().as_str(),
        );
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("fence-{epoch}-{last}").as_str(),
        );
        loop {
            let ack = self
                .cluster
                .js
                .publish_with_headers(
                    self.cluster.config.subject(),
                    headers.clone(),
                    bytes::Bytes::new(),
                )
                .await;
            let ack = match ack {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match ack {
                Ok(ack) => return Ok(ack.sequence),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => return Err(None),
                Err(e) if Instant::now() + FENCE_RETRY_PAUSE < deadline => {
                    crate::log_limited!(warn, error = %e, "cluster: the fence record did not reach the stream; sending it again");
                    tokio::time::sleep(FENCE_RETRY_PAUSE).await;
                }
                Err(e) => {
                    return Err(Some(ClusterError::js("writing the fence record")(
                        e.to_string(),
                    )))
                }
            }
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
    let segment_size_max = crate::journal::writer::SEGMENT_SIZE_MAX_BYTES_DEFAULT;
    let mut copy = Copy::new(dir.to_owned(), segment_size_max, None);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::daemon::recovery::Restore;
    use crate::journal::recovery::tests::entry_with as entry;
    use crate::journal::{record, Journal, JournalConfig, RecordKind};
    use bytes::Bytes;
    use switchyard_tools::testkit::{self, TempDir};

    const BANK: &str = "200001";

    fn config(dir: &Path) -> Config {
        let text = format!(
            "[switch]\nlisten = \"127.0.0.1:0\"\n\
             [tls]\nca_file = \"x\"\ncert_file = \"x\"\nkey_file = \"x\"\n\
             client_cert_file = \"x\"\nclient_key_file = \"x\"\n\
             [journal]\ndir = {:?}\n\
             [[bank]]\nid = \"{BANK}\"\naddress = \"127.0.0.1:9\"\nserver_name = \"b\"\n",
            dir.display().to_string()
        );
        Config::parse(&text, Path::new("<standby test>")).unwrap()
    }

    /// A journal of 60 payments: most answered by the bank, some forwarded
    /// without an outcome, some never forwarded, reversal advices queued with
    /// and without an acknowledgement.
    fn journal(dir: &Path) {
        let bank = BANK.parse::<crate::core::InstitutionId>().unwrap().to_raw();
        let forwarded = |stan: u32| {
            let mut h = [0u8; 14];
            h[2..6].copy_from_slice(&stan.to_le_bytes());
            h[6..].copy_from_slice(&bank.to_le_bytes());
            h
        };
        let opened = Journal::open(JournalConfig::new(dir)).unwrap();
        let j = &opened.journal;
        for id in 1..=60u64 {
            let payment = testkit::payment(id as usize, "100001", "000000001000");
            j.append(entry(RecordKind::Accepted, id, &[0; 8], payment.clone()))
                .unwrap();
            if id % 10 == 7 {
                continue; // never forwarded
            }
            j.append(entry(
                RecordKind::Forwarded,
                id,
                &forwarded(id as u32),
                Bytes::new(),
            ))
            .unwrap();
            if id % 10 == 3 {
                continue; // forwarded, no outcome
            }
            if id % 10 == 5 {
                let queued = entry(
                    RecordKind::ReversalQueued,
                    id,
                    &forwarded(id as u32)[..6],
                    payment,
                );
                j.append(queued).unwrap();
                j.append(entry(RecordKind::Outcome, id, b"68\x03", Bytes::new()))
                    .unwrap();
                if id < 30 {
                    j.append(entry(RecordKind::ReversalAcked, id, &[], Bytes::new()))
                        .unwrap();
                }
                continue;
            }
            j.append(entry(RecordKind::Outcome, id, b"00\x01", Bytes::new()))
                .unwrap();
        }
        j.close();
    }

    fn copy(dir: &Path, warm: Option<Warm>) -> Copy {
        // Small segments: the copy spans several.
        Copy::new(dir.to_owned(), 4_096, warm)
    }

    /// `source`'s records as the active publishes them: batches of up to
    /// three records (first and last sequence, bytes).
    fn batches(source: &Path) -> Vec<(u64, u64, Vec<u8>)> {
        let mut out = Vec::new();
        for (_, path) in crate::journal::segments(source).unwrap() {
            let bytes = fs::read(path).unwrap();
            let mut at = 0;
            while let Ok(Some(_)) = record::decode(&bytes[at..]) {
                let (start, mut seqs) = (at, Vec::new());
                while seqs.len() < 3 {
                    let Ok(Some((r, size))) = record::decode(&bytes[at..]) else {
                        break;
                    };
                    seqs.push(r.seq);
                    at += size;
                }
                out.push((seqs[0], seqs[seqs.len() - 1], bytes[start..at].to_vec()));
            }
        }
        out
    }

    /// Feeds `batches` to `copy` as stream messages numbered from 1.
    fn replicate(batches: &[(u64, u64, Vec<u8>)], copy: &mut Copy) -> Result<(), ClusterError> {
        for (message, (first, last, bytes)) in (1..).zip(batches) {
            copy.append(message, *first, *last, bytes)?;
            copy.applied = message;
        }
        copy.sync()
    }

    #[test]
    fn the_copy_read_as_it_is_made_starts_the_switch_as_a_scan_of_it_would() {
        let (source, warm_dir, cold_dir) = (
            TempDir::new("warm-source"),
            TempDir::new("warm-copy"),
            TempDir::new("warm-cold"),
        );
        journal(&source.0);
        let config = config(&warm_dir.0);
        let mut warm_copy = copy(&warm_dir.0, Some(Warm::new(&config)));
        let batches = batches(&source.0);
        replicate(&batches, &mut warm_copy).unwrap();
        replicate(&batches, &mut copy(&cold_dir.0, None)).unwrap();
        let warm = warm_copy.take_warm().expect("records were copied");
        assert!(crate::journal::segments(&warm_dir.0).unwrap().len() > 1);

        // The cold start: the copy scanned at open.
        let mut restore = Restore::new(&config);
        let cold = Journal::open_with(JournalConfig::new(&cold_dir.0), |_, _, r| restore.record(r))
            .unwrap();
        let hot = Journal::open_prescanned(JournalConfig::new(&warm_dir.0), warm.prescan).unwrap();
        assert_eq!(hot.next_seq, cold.next_seq);
        let (h, c) = (&hot.recovered, &cold.recovered);
        assert_eq!(
            (h.segments, h.records, h.by_kind, h.seq_range),
            (c.segments, c.records, c.by_kind, c.seq_range)
        );
        // Every record is found by its sequence number through either index.
        for seq in 1..cold.next_seq {
            let found = hot.journal.lookup().read(seq).unwrap();
            assert!(found.is_some(), "record {seq}");
            assert_eq!(
                found,
                cold.journal.lookup().read(seq).unwrap(),
                "record {seq}"
            );
        }
        hot.journal.close();
        cold.journal.close();

        let (hot_recent, _, hot_recovery) = warm.restore.finish();
        let (cold_recent, _, cold_recovery) = restore.finish();
        assert_eq!(hot_recent.len(), 60, "every payment's key");
        assert_eq!(hot_recent.len(), cold_recent.len());
        assert_eq!(hot_recovery.unfinished, cold_recovery.unfinished);
        assert_eq!(
            hot_recovery.reversals_pending,
            cold_recovery.reversals_pending
        );
        let unfinished: Vec<u64> = hot_recovery
            .unfinished
            .iter()
            .map(|u| u.request_id)
            .collect();
        assert_eq!(unfinished, [3, 7, 13, 17, 23, 27, 33, 37, 43, 47, 53, 57]);
        let pending: Vec<u64> = hot_recovery
            .reversals_pending
            .iter()
            .map(|p| p.request_id)
            .collect();
        assert_eq!(pending, [35, 45, 55]);
    }

    #[test]
    fn the_copy_lets_segments_past_the_retention_go_as_the_journal_does() {
        let (source, dir) = (TempDir::new("warm-old-source"), TempDir::new("warm-old"));
        let day = 86_400_000;
        let now = crate::clock::unix_ms();
        let opened = Journal::open(JournalConfig::new(&source.0)).unwrap();
        for id in 1..=90u64 {
            let payment = testkit::payment(id as usize, "100001", "000000001000");
            let mut e = entry(RecordKind::Accepted, id, &[0; 8], payment);
            e.unix_ms = if id <= 45 { now - 2 * day } else { now };
            opened.journal.append(e).unwrap();
        }
        opened.journal.close();
        let mut copy = copy(&dir.0, Some(Warm::new(&config(&dir.0))));
        copy.retention = Some(Duration::from_millis(day));
        replicate(&batches(&source.0), &mut copy).unwrap();
        let warm = copy.take_warm().unwrap();

        let on_disk = crate::journal::scan(&dir.0, |_, _, _| {}).unwrap();
        let (first, last) = on_disk.seq_range.unwrap();
        assert!(first > 1 && first <= 46, "old segments went: {first}");
        assert_eq!(last, 90);
        let opened = Journal::open_prescanned(JournalConfig::new(&dir.0), warm.prescan).unwrap();
        let r = &opened.recovered;
        assert_eq!(
            (r.segments, r.records, r.by_kind, r.seq_range),
            (
                on_disk.segments,
                on_disk.records,
                on_disk.by_kind,
                on_disk.seq_range
            )
        );
        assert_eq!(opened.journal.lookup().read(first - 1).unwrap(), None);
        assert!(opened.journal.lookup().read(first).unwrap().is_some());
        opened.journal.close();
    }

    #[test]
    fn a_batch_that_fails_its_checks_stops_the_copy_naming_its_message() {
        let (source, dir) = (TempDir::new("warm-bad-source"), TempDir::new("warm-bad"));
        journal(&source.0);
        let mut batches = batches(&source.0);
        batches[1].2[20] ^= 0x40;
        let mut copy = copy(&dir.0, Some(Warm::new(&config(&dir.0))));
        let err = replicate(&batches, &mut copy).unwrap_err();
        assert!(
            matches!(&err, ClusterError::Batch { sequence: 2, message } if message.contains(&format!("byte {}", batches[0].2.len()))),
            "{err}"
        );
        let written: u64 = crate::journal::segments(&dir.0)
            .unwrap()
            .iter()
            .map(|(_, p)| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(
            written,
            batches[0].2.len() as u64,
            "nothing of a batch that fails is written"
        );
    }
}
