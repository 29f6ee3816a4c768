//! The active node's journal batches into the stream ([`Replicator`], the
//! journal's [`Replica`]).
//!
//! The journal's writer thread hands each batch over before writing it locally
//! ([`Replica::send`]): the publish runs on the runtime meanwhile, so the
//! stream's round trip and the local sync overlap; the writer then waits for the
//! acknowledgement ([`Replica::confirm`]). Each message names the stream
//! sequence it expects last on the subject, so a node whose lease a standby has
//! taken (and fenced) is refused; it carries a message id (`<epoch>-<first
//! journal seq>`), so a publish retried after a lost acknowledgement (a NATS
//! server lost, the client reconnecting) is answered as a duplicate instead of
//! written twice. Retries go on while the lease holds on this node's clock.

use super::{
    may_act, stop_acting, Cluster, HEADER_EPOCH, HEADER_FIRST_SEQ, HEADER_LAST_SEQ, HEADER_NODE,
};
use crate::journal::record;
use crate::journal::Replica;
use async_nats::jetstream::context::PublishErrorKind;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The pause between two attempts of a publish that failed in transport.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Publishes the active node's journal batches.
pub struct Replicator {
    cluster: Cluster,
    epoch: u64,
    handle: tokio::runtime::Handle,
    /// The stream sequence of the last message on the subject: the fence this
    /// node wrote, then its own batches.
    last: Arc<AtomicU64>,
    pending: Mutex<Option<oneshot::Receiver<Result<(), String>>>>,
    /// Cancelled when the stream refused a batch as another epoch's.
    fenced: CancellationToken,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("epoch", &self.epoch)
            .field("last", &self.last.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Replicator {
    /// Publishes after stream sequence `last` (the fence), on the runtime of
    /// `handle`; cancels `fenced` when the stream refuses a batch as another
    /// epoch's.
    pub fn new(
        cluster: Cluster,
        epoch: u64,
        last: u64,
        handle: tokio::runtime::Handle,
        fenced: CancellationToken,
    ) -> Replicator {
        Replicator {
            cluster,
            epoch,
            handle,
            last: Arc::new(AtomicU64::new(last)),
            pending: Mutex::new(None),
            fenced,
        }
    }
}

/// One message: journal records `first..=last`, encoded.
struct Chunk {
    first: u64,
    last: u64,
    bytes: Bytes,
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
        });
    }
    out
}

/// Why a chunk was not published.
enum Refused {
    /// Another epoch wrote after this node's last message: fenced.
    Fenced(String),
    /// The lease ran out on this node's clock while retrying.
    Expired(String),
}

async fn publish(
    cluster: &Cluster,
    epoch: u64,
    last: &AtomicU64,
    chunk: Chunk,
) -> Result<(), Refused> {
    let subject = cluster.config.subject();
    let epoch_text = epoch.to_string();
    let (first_text, last_text) = (chunk.first.to_string(), chunk.last.to_string());
    let id = format!("{epoch}-{}", chunk.first);
    loop {
        let expected = last.load(Ordering::Acquire).to_string();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(HEADER_EPOCH, epoch_text.as_str());
        headers.insert(HEADER_NODE, cluster.config.node_id.as_str());
        headers.insert(HEADER_FIRST_SEQ, first_text.as_str());
        headers.insert(HEADER_LAST_SEQ, last_text.as_str());
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.as_str(),
        );
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        let started = Instant::now();
        let sent = cluster
            .js
            .publish_with_headers(subject.clone(), headers, chunk.bytes.clone())
            .await;
        let acked = match sent {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) => {
                last.store(ack.sequence, Ordering::Release);
                metrics::histogram!("switchyard_cluster_publish_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("switchyard_cluster_acks_total", "result" => if ack.duplicate { "duplicate" } else { "ok" })
                    .increment(1);
                return Ok(());
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                metrics::counter!("switchyard_cluster_acks_total", "result" => "fenced")
                    .increment(1);
                return Err(Refused::Fenced(format!(
                    "the stream refused journal records {}..={} of epoch {epoch}: another node \
                     wrote after stream sequence {expected} ({e})",
                    chunk.first, chunk.last
                )));
            }
            Err(e) => {
                metrics::counter!("switchyard_cluster_acks_total", "result" => "retried")
                    .increment(1);
                crate::log_limited!(warn, error = %e, first = chunk.first,
                    "journal batch not acknowledged by the stream: retrying");
                if !may_act() {
                    return Err(Refused::Expired(format!(
                        "journal records {}..={} not acknowledged before the lease ran out: {e}",
                        chunk.first, chunk.last
                    )));
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

impl Replica for Replicator {
    fn send(&self, _first_seq: u64, _last_seq: u64, batch: &[u8]) {
        let pieces = chunks(batch, self.cluster.message_max_bytes);
        let (tx, rx) = oneshot::channel();
        *crate::sync::lock(&self.pending) = Some(rx);
        let cluster = self.cluster.clone();
        let (epoch, last, fenced) = (self.epoch, self.last.clone(), self.fenced.clone());
        self.handle.spawn(async move {
            let mut result = Ok(());
            for chunk in pieces {
                match publish(&cluster, epoch, &last, chunk).await {
                    Ok(()) => {}
                    Err(Refused::Fenced(why)) => {
                        stop_acting();
                        tracing::error!(epoch, error = %why, "fenced by a newer epoch: stopping");
                        fenced.cancel();
                        result = Err(why);
                        break;
                    }
                    Err(Refused::Expired(why)) => {
                        stop_acting();
                        fenced.cancel();
                        result = Err(why);
                        break;
                    }
                }
            }
            let _ = tx.send(result);
        });
    }

    fn confirm(&self) -> Result<(), String> {
        let Some(rx) = crate::sync::lock(&self.pending).take() else {
            return Ok(());
        };
        rx.blocking_recv()
            .unwrap_or_else(|_| Err("the replication task ended".to_owned()))
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
}
