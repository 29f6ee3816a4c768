//! The active node's journal batches into the stream ([`Replicator`], the
//! journal's [`Replica`]).
//!
//! The journal's writer thread hands each batch over before writing it locally
//! ([`Replica::send`]) and goes on with the next commit; a task on the runtime
//! publishes the batches in order without waiting for each acknowledgement
//! (at most [`IN_FLIGHT_MAX`] batches unacknowledged: `send` blocks past that),
//! and acknowledgements, which arrive in order, move the confirmed point
//! ([`Replica::confirmed`]) and wake the writer. Each message names the stream
//! sequence it expects last (`Nats-Expected-Last-Sequence`: the previous one's, predicted: this
//! node is the only writer while it holds the lease), so a node a standby has
//! fenced is refused; it carries a message id (`<epoch>-<first journal seq>`).
//!
//! When a publish fails (a NATS server lost, a leader being elected), every
//! later one in flight fails too (its expected sequence no longer holds). The
//! task then looks at the last message on the subject: another epoch's means
//! this node was fenced (it stops); its own tells which of the unacknowledged
//! batches landed, and the rest are sent again one at a time, then pipelining
//! resumes. Retries go on while the lease holds on this node's clock.

use super::{
    encoding, header_u64, may_act, stop_acting, Cluster, HEADER_EPOCH, HEADER_FIRST_SEQ,
    HEADER_LAST_SEQ, HEADER_NODE,
};
use crate::journal::record;
use crate::journal::Replica;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Batches handed over and not yet acknowledged, at most: past it the
/// journal's writer waits in [`Replica::send`].
pub const IN_FLIGHT_MAX: usize = 64;

/// Messages published and not yet acknowledged, at most. Batches arriving
/// meanwhile wait and then go together, in as few messages as `max_payload`
/// allows: under load fewer, larger messages (each costs the servers a
/// replication round and, with `sync_interval: always`, an fsync on each).
/// 2 rather than 4: on the bench, 2 gave fewer messages a second, less of the
/// servers' CPU and 0.43–0.46× against 0.30–0.41× single-node throughput, at
/// the same p99 (README, "What it costs").
pub const MESSAGES_IN_FLIGHT_MAX: usize = 2;

/// The pause between two attempts after a failed publish.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What the writer thread and the publishing task share.
#[derive(Default)]
struct State {
    /// Batches sent to the task and not yet acknowledged.
    in_flight: usize,
    /// Every journal record up to this one is in the stream.
    confirmed: u64,
    /// Why replication stopped for good.
    failed: Option<String>,
    writer: Option<std::thread::Thread>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    /// A message acknowledged: journal records up to `last`, the last chunk of
    /// `batches` batches.
    fn confirm(&self, last: u64, batches: usize) {
        let writer = {
            let mut st = self.lock();
            st.confirmed = st.confirmed.max(last);
            st.in_flight = st.in_flight.saturating_sub(batches);
            st.writer.clone()
        };
        self.room.notify_all();
        if let Some(w) = writer {
            w.unpark();
        }
    }

    fn fail(&self, why: String) {
        let writer = {
            let mut st = self.lock();
            st.failed.get_or_insert(why);
            st.writer.clone()
        };
        self.room.notify_all();
        if let Some(w) = writer {
            w.unpark();
        }
    }
}

/// Publishes the active node's journal batches.
pub struct Replicator {
    shared: Arc<Shared>,
    batches: tokio::sync::mpsc::Sender<Vec<Chunk>>,
    message_max_bytes: usize,
    epoch: u64,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Replicator {
    /// Publishes after stream sequence `last` (the fence), from a task on the
    /// runtime of `handle`; cancels `fenced` when replication stops for good
    /// (refused as another epoch's, or the lease ran out while retrying).
    pub fn new(
        cluster: Cluster,
        epoch: u64,
        last: u64,
        handle: tokio::runtime::Handle,
        fenced: CancellationToken,
    ) -> Replicator {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT_MAX);
        let message_max_bytes = cluster.message_max_bytes;
        handle.spawn(publish_task(
            cluster,
            epoch,
            last,
            rx,
            shared.clone(),
            fenced,
        ));
        Replicator {
            shared,
            batches: tx,
            message_max_bytes,
            epoch,
        }
    }
}

/// One message: journal records `first..=last`, encoded.
#[derive(Clone)]
struct Chunk {
    first: u64,
    last: u64,
    /// The payload: the records, or as `encoding` says.
    bytes: Bytes,
    /// [`encoding::HEADER_ENCODING`]'s value; `None`: the records as they are.
    encoding: Option<&'static str>,
}

impl Chunk {
    /// The chunk as it is published: compressed if `compression` says so and
    /// that makes it smaller. Counts the bytes before and after.
    fn encoded(self, compression: encoding::Compression) -> Chunk {
        let (bytes, encoding) = compression.encode(&self.bytes);
        metrics::counter!("switchyard_cluster_batch_bytes_total", "form" => "plain")
            .increment(self.bytes.len() as u64);
        metrics::counter!("switchyard_cluster_batch_bytes_total", "form" => "published")
            .increment(bytes.len() as u64);
        Chunk {
            bytes,
            encoding,
            ..self
        }
    }
}

/// `batch` cut at record boundaries into pieces of at most `max` bytes (a
/// record is never cut; one larger than `max` goes alone).
fn chunks(batch: &[u8], max: usize) -> Vec<Chunk> {
    let mut out = Vec::new();
    let (mut at, mut start) = (0, 0);
    let (mut first, mut last) = (0, 0);
    while at + record::LEN_BYTES + 12 <= batch.len() {
        let mut len = [0u8; 4];
        len.copy_from_slice(&batch[at..at + 4]);
        let size = record::LEN_BYTES + u32::from_le_bytes(len) as usize;
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&batch[at + 8..at + 16]);
        let seq = u64::from_le_bytes(seq);
        if at > start && at + size - start > max {
            out.push(Chunk {
                first,
                last,
                bytes: Bytes::copy_from_slice(&batch[start..at]),
                encoding: None,
            });
            start = at;
        }
        if at == start {
            first = seq;
        }
        last = seq;
        at = (at + size).min(batch.len());
    }
    if at > start {
        out.push(Chunk {
            first,
            last,
            bytes: Bytes::copy_from_slice(&batch[start..at]),
            encoding: None,
        });
    }
    out
}

/// The chunks of `batches`, in order, joined into as few messages of at most
/// `max` bytes as they fit in, each with the number of batches it completes.
fn coalesce(batches: Vec<Vec<Chunk>>, max: usize) -> Vec<(Chunk, usize)> {
    // Messages as runs of chunks: (chunks, bytes, batches completed).
    let mut groups: Vec<(Vec<Chunk>, usize, usize)> = Vec::new();
    for batch in batches {
        let n = batch.len();
        for (i, chunk) in batch.into_iter().enumerate() {
            let ends = usize::from(i + 1 == n);
            match groups.last_mut() {
                Some((chunks, bytes, done)) if *bytes + chunk.bytes.len() <= max => {
                    *bytes += chunk.bytes.len();
                    *done += ends;
                    chunks.push(chunk);
                }
                _ => {
                    let bytes = chunk.bytes.len();
                    groups.push((vec![chunk], bytes, ends));
                }
            }
        }
    }
    groups
        .into_iter()
        .map(|(mut chunks, bytes, done)| {
            let first = chunks.first().map_or(0, |c| c.first);
            let last = chunks.last().map_or(0, |c| c.last);
            // One chunk goes as it is; several are joined (one copy).
            let joined = if chunks.len() == 1 {
                chunks.pop().map(|c| c.bytes).unwrap_or_default()
            } else {
                let mut out = bytes::BytesMut::with_capacity(bytes);
                for c in &chunks {
                    out.extend_from_slice(&c.bytes);
                }
                out.freeze()
            };
            (
                Chunk {
                    first,
                    last,
                    bytes: joined,
                    encoding: None,
                },
                done,
            )
        })
        .collect()
}

/// Sends `chunk` naming `expected` as the last stream sequence on the subject:
/// the acknowledgement to wait for.
async fn send_chunk(
    cluster: &Cluster,
    epoch: u64,
    expected: u64,
    chunk: &Chunk,
) -> Result<PublishAckFuture, async_nats::jetstream::context::PublishError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(HEADER_EPOCH, epoch.to_string().as_str());
    headers.insert(HEADER_NODE, cluster.config.node_id.as_str());
    headers.insert(HEADER_FIRST_SEQ, chunk.first.to_string().as_str());
    headers.insert(HEADER_LAST_SEQ, chunk.last.to_string().as_str());
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
        expected.to_string().as_str(),
    );
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{epoch}-{}", chunk.first).as_str(),
    );
    if let Some(encoding) = chunk.encoding {
        headers.insert(encoding::HEADER_ENCODING, encoding);
    }
    cluster
        .js
        .publish_with_headers(cluster.config.subject(), headers, chunk.bytes.clone())
        .await
}

type Ack = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    async_nats::jetstream::publish::PublishAck,
                    async_nats::jetstream::context::PublishError,
                >,
            > + Send,
    >,
>;

/// Publishes the batches of `rx` in order, pipelined.
async fn publish_task(
    cluster: Cluster,
    epoch: u64,
    last: u64,
    mut rx: tokio::sync::mpsc::Receiver<Vec<Chunk>>,
    shared: Arc<Shared>,
    fenced: CancellationToken,
) {
    // The stream sequence the next publish names as the last.
    let mut expected = last;
    // Sent, not yet acknowledged, in order: the chunk, whether it ends its
    // batch, when it was sent.
    let mut unacked: VecDeque<(Chunk, usize, Instant)> = VecDeque::new();
    let mut acks: FuturesOrdered<Ack> = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            Some(result) = acks.next(), if !acks.is_empty() => {
                let Some((chunk, ends, sent)) = unacked.pop_front() else { continue };
                match result {
                    Ok(ack) => {
                        metrics::histogram!("switchyard_cluster_publish_seconds")
                            .record(sent.elapsed().as_secs_f64());
                        metrics::counter!("switchyard_cluster_acks_total", "result" => if ack.duplicate { "duplicate" } else { "ok" })
                            .increment(1);
                        shared.confirm(chunk.last, ends);
                    }
                    Err(e) => {
                        crate::log_limited!(warn, error = %e, first = chunk.first,
                            "journal batch not acknowledged by the stream: resynchronizing");
                        metrics::counter!("switchyard_cluster_acks_total", "result" => "retried")
                            .increment(1);
                        // Everything after it fails too: start again from the stream.
                        acks = FuturesOrdered::new();
                        unacked.push_front((chunk, ends, sent));
                        match resync(&cluster, epoch, &mut unacked, &shared).await {
                            Ok(next) => expected = next,
                            Err(why) => {
                                stop_acting();
                                tracing::error!(epoch, error = %why, "journal replication stopped: stopping");
                                shared.fail(why);
                                fenced.cancel();
                                return;
                            }
                        }
                    }
                }
            }
            batch = rx.recv(), if unacked.len() < MESSAGES_IN_FLIGHT_MAX => {
                let Some(batch) = batch else { return };
                let mut batches = vec![batch];
                while let Ok(more) = rx.try_recv() {
                    batches.push(more);
                }
                for (chunk, ends) in coalesce(batches, cluster.message_max_bytes) {
                    let chunk = chunk.encoded(cluster.config.compression);
                    let sent = Instant::now();
                    let ack: Ack = match send_chunk(&cluster, epoch, expected, &chunk).await {
                        Ok(future) => Box::pin(std::future::IntoFuture::into_future(future)),
                        Err(e) => Box::pin(std::future::ready(Err(e))),
                    };
                    expected += 1;
                    acks.push_back(ack);
                    unacked.push_back((chunk, ends, sent));
                }
            }
        }
    }
}

/// After a failed publish: confirms the chunks of `unacked` that landed (the
/// last message on the subject is this epoch's and covers them) and sends the
/// others again one at a time, each acknowledged; the next expected sequence.
/// An error when another epoch wrote last (fenced) or the lease ran out.
async fn resync(
    cluster: &Cluster,
    epoch: u64,
    unacked: &mut VecDeque<(Chunk, usize, Instant)>,
    shared: &Shared,
) -> Result<u64, String> {
    let subject = cluster.config.subject();
    loop {
        if !may_act() {
            return Err(format!(
                "journal records from {} not acknowledged before the lease ran out",
                unacked.front().map_or(0, |c| c.0.first)
            ));
        }
        tokio::time::sleep(RETRY_PAUSE).await;
        let Ok(newest) = cluster
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
        else {
            continue;
        };
        let headers = Some(&newest.headers);
        if header_u64(headers, HEADER_EPOCH) != Some(epoch) {
            metrics::counter!("switchyard_cluster_acks_total", "result" => "fenced").increment(1);
            return Err(format!(
                "the stream's last message (sequence {}) is epoch {:?}'s, not this node's ({epoch}): \
                 another node wrote after this one (fenced)",
                newest.sequence,
                header_u64(headers, HEADER_EPOCH)
            ));
        }
        let landed = header_u64(headers, HEADER_LAST_SEQ).unwrap_or(0);
        let mut expected = newest.sequence;
        let mut broke = false;
        while let Some((chunk, ends, _)) = unacked.front().cloned() {
            if chunk.last <= landed {
                shared.confirm(chunk.last, ends);
                unacked.pop_front();
                continue;
            }
            let acked = match send_chunk(cluster, epoch, expected, &chunk).await {
                Ok(future) => future.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) => {
                    expected = ack.sequence;
                    shared.confirm(chunk.last, ends);
                    unacked.pop_front();
                }
                Err(e) => {
                    if e.kind() != PublishErrorKind::WrongLastSequence {
                        crate::log_limited!(warn, error = %e, "journal batch sent again, not acknowledged");
                    }
                    broke = true;
                    break;
                }
            }
        }
        if !broke {
            return Ok(expected);
        }
    }
}

impl Replica for Replicator {
    fn attach(&self, writer: std::thread::Thread) {
        self.shared.lock().writer = Some(writer);
    }

    fn send(&self, batch: &[u8]) {
        let pieces = chunks(batch, self.message_max_bytes);
        {
            let mut st = self.shared.lock();
            while st.in_flight >= IN_FLIGHT_MAX && st.failed.is_none() {
                st = self.shared.room.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.failed.is_some() {
                return;
            }
            st.in_flight += 1;
        }
        if self.batches.try_send(pieces).is_err() {
            self.shared.fail("the replication task ended".to_owned());
        }
    }

    fn confirmed(&self) -> Result<u64, String> {
        let st = self.shared.lock();
        match &st.failed {
            Some(why) => Err(why.clone()),
            None => Ok(st.confirmed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Record, RecordKind};

    fn batch(seqs: std::ops::RangeInclusive<u64>, body: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let body = vec![7u8; body];
        for seq in seqs {
            let r = Record {
                seq,
                kind: RecordKind::Accepted,
                protected: false,
                request_id: seq,
                unix_ms: 1,
                body: &body,
            };
            record::encode(&mut out, &r);
        }
        out
    }

    #[test]
    fn batches_are_cut_at_record_boundaries_under_the_bound() {
        let b = batch(1..=100, 200);
        let size = b.len() / 100;
        let whole = chunks(&b, 1 << 20);
        assert_eq!(whole.len(), 1);
        assert_eq!((whole[0].first, whole[0].last), (1, 100));
        let cut = chunks(&b, size * 30 + 1);
        assert_eq!(cut.len(), 4);
        assert_eq!(
            cut.iter().map(|c| (c.first, c.last)).collect::<Vec<_>>(),
            [(1, 30), (31, 60), (61, 90), (91, 100)]
        );
        let joined: Vec<u8> = cut.iter().flat_map(|c| c.bytes.to_vec()).collect();
        assert_eq!(joined, b);
        // A record larger than the bound goes alone.
        let alone = chunks(&b, 10);
        assert_eq!(alone.len(), 100);
    }

    #[test]
    fn batches_waiting_together_go_in_as_few_messages_as_fit() {
        let size = batch(1..=1, 200).len();
        let one = |r: std::ops::RangeInclusive<u64>| chunks(&batch(r, 200), 1 << 20);
        let batches = vec![one(1..=10), one(11..=15), one(16..=40)];
        let all = coalesce(batches.clone(), 1 << 20);
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].0.first, all[0].0.last, all[0].1), (1, 40, 3));
        assert_eq!(all[0].0.bytes, Bytes::from(batch(1..=40, 200)));
        // Room for 20 records a message: the first two batches, then the third.
        let cut = coalesce(batches, size * 20);
        let shape: Vec<_> = cut.iter().map(|(c, n)| (c.first, c.last, *n)).collect();
        assert_eq!(shape, [(1, 15, 2), (16, 40, 1)]);
    }
}
