//! The cluster's fencing, through its own pieces against a real three-node
//! NATS JetStream cluster (the pinned `nats-server` of `.ci/oracle-venv`):
//! once a new node has taken the lease and written its fence record, a batch
//! the old node publishes late is refused by the stream, and the old node stops
//! acting. (The process-level tests are in `crates/cli/tests/crash.rs`.)

use std::sync::Arc;
use std::time::Duration;
use switchyard::cluster::replica::Replicator;
use switchyard::cluster::standby::{Standby, Takeover};
use switchyard::cluster::{may_act, Cluster, ClusterConfig, LEASE_KEY};
use switchyard::journal::record::{self, Record};
use switchyard::journal::{JournalConfig, RecordKind, Replica};
use switchyard_tools::natskit::NatsCluster;
use switchyard_tools::testkit::TempDir;
use tokio_util::sync::CancellationToken;

/// Whether this process may act is one flag ([`may_act`]): the tests here
/// take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(nats: &NatsCluster, node: &str) -> ClusterConfig {
    ClusterConfig {
        nats: nats.urls(),
        node_id: node.to_owned(),
        stream: "FENCING".to_owned(),
        lease_ttl: Duration::from_millis(1_000),
        connect_timeout: Duration::from_secs(30),
        credentials_file: None,
        tls: None,
        compression: Default::default(),
    }
}

/// Journal records `seqs`, encoded as a batch.
fn batch(seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for seq in seqs {
        let r = Record {
            seq,
            kind: RecordKind::Accepted,
            protected: false,
            request_id: seq,
            unix_ms: 1,
            body: b"0200",
        };
        record::encode(&mut out, &r);
    }
    out
}

/// Sends a batch (off the runtime, as the journal's writer thread does) and
/// waits until it is confirmed, or the replica fails.
async fn replicate(r: &Arc<Replicator>, seqs: std::ops::RangeInclusive<u64>) -> Result<(), String> {
    let sender = r.clone();
    let (first, last) = (*seqs.start(), *seqs.end());
    tokio::task::spawn_blocking(move || sender.send(&batch(seqs)))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match r.confirmed() {
            Ok(confirmed) if confirmed >= last => return Ok(()),
            Ok(_) => {}
            Err(why) => return Err(why),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no outcome for {first}..={last}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stands `cluster` by with its journal in `dir`, until it has taken the
/// lease and written its fence.
async fn take_over(cluster: &Cluster, dir: &std::path::Path) -> Takeover {
    let journal = JournalConfig {
        segment_size_max_bytes: 1 << 20,
        ..JournalConfig::new(dir.to_owned())
    };
    Standby::new(cluster.clone(), &journal, Default::default(), None)
        .run(std::future::pending())
        .await
        .unwrap()
        .expect("the lease is free")
}

/// The replica of the node that took over as `took`; `fenced` is cancelled
/// when it stops.
fn replicator(cluster: &Cluster, took: &Takeover, fenced: &CancellationToken) -> Arc<Replicator> {
    Arc::new(Replicator::new(
        cluster.clone(),
        took.lease.epoch,
        took.fence_sequence,
        tokio::runtime::Handle::current(),
        fenced.clone(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_publish_of_the_old_epoch_is_refused_after_the_fence() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = TempDir::new("cluster-fencing");
    let nats = NatsCluster::start(&dir.0, 3);
    let retention = Duration::from_secs(3600);

    // The old node takes the lease and replicates a batch.
    let old = Cluster::connect(&config(&nats, "old"), retention)
        .await
        .unwrap();
    let takeover = take_over(&old, &dir.0.join("journal-old")).await;
    let fenced = CancellationToken::new();
    let replicator = replicator(&old, &takeover, &fenced);
    replicate(&replicator, 1..=3).await.unwrap();
    assert!(may_act());

    // The old node's lease goes (as when it is paused past its TTL) and a new
    // node takes over: it copies the batch and writes its fence.
    old.lease.purge(LEASE_KEY).await.unwrap();
    let new = Cluster::connect(&config(&nats, "new"), retention)
        .await
        .unwrap();
    let took = take_over(&new, &dir.0.join("journal-new")).await;
    assert!(took.lease.epoch > takeover.lease.epoch);
    assert_eq!(
        took.journal_last_seq, 3,
        "the new node copied the old one's batch"
    );

    // The old node's next batch is refused, and it stops acting.
    let late = replicate(&replicator, 4..=6).await;
    let why = late.expect_err("the stream refuses the old epoch");
    assert!(why.contains("another node wrote"), "{why}");
    assert!(fenced.is_cancelled());
    assert!(!may_act());
    assert_eq!(new.last_sequence().await.unwrap(), took.fence_sequence);
}

/// Batches go compressed (`compression = "lz4"`, the default) and a stream
/// holding both forms reads back record for record: a node publishing plain
/// records (`compression = "none"`, or a stream written before compression)
/// hands over to one that compresses, and the standby's copy and
/// `copy_stream` (what `journal verify --cluster-config` reads) hold exactly
/// the records both sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_compressed_batches_read_back_as_the_records_sent() {
    let _turn = ONE_AT_A_TIME.lock().await;
    use switchyard::cluster::encoding::{Compression, ENCODING_LZ4, HEADER_ENCODING};
    let dir = TempDir::new("cluster-compression");
    let nats = NatsCluster::start(&dir.0, 3);
    let retention = Duration::from_secs(3600);
    let node = |id: &str, compression| ClusterConfig {
        stream: "COMPRESSION".to_owned(),
        compression,
        ..config(&nats, id)
    };
    let fenced = CancellationToken::new();
    let plain = Cluster::connect(&node("plain", Compression::None), retention)
        .await
        .unwrap();
    let took = take_over(&plain, &dir.0.join("journal-plain")).await;
    let sends_plain = replicator(&plain, &took, &fenced);
    replicate(&sends_plain, 1..=40).await.unwrap();
    let last = plain
        .stream
        .get_last_raw_message_by_subject("COMPRESSION.journal")
        .await
        .unwrap();
    assert!(last.headers.get(HEADER_ENCODING).is_none());
    assert_eq!(last.payload.len(), batch(1..=40).len());

    plain.lease.purge(LEASE_KEY).await.unwrap();
    let packs = Cluster::connect(&node("packs", Compression::Lz4), retention)
        .await
        .unwrap();
    let took = take_over(&packs, &dir.0.join("journal-packs")).await;
    assert_eq!(took.journal_last_seq, 40, "the plain batch was copied");
    let sends_packed = replicator(&packs, &took, &fenced);
    replicate(&sends_packed, 41..=400).await.unwrap();
    let last = packs
        .stream
        .get_last_raw_message_by_subject("COMPRESSION.journal")
        .await
        .unwrap();
    assert_eq!(
        last.headers.get(HEADER_ENCODING).map(|v| v.as_str()),
        Some(ENCODING_LZ4)
    );
    let sent = batch(41..=400);
    assert!(
        last.payload.len() * 2 < sent.len(),
        "{} bytes published for {} bytes of records",
        last.payload.len(),
        sent.len()
    );

    // The whole stream, copied as `journal verify --cluster-config` copies it.
    let copy = dir.0.join("copy");
    let (_, last_seq) =
        switchyard::cluster::standby::copy_stream(&node("reader", Compression::Lz4), &copy)
            .await
            .unwrap();
    assert_eq!(last_seq, 400);
    let mut copied = Vec::new();
    let mut segments: Vec<_> = std::fs::read_dir(&copy)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    for segment in segments {
        copied.extend_from_slice(&std::fs::read(segment).unwrap());
    }
    let mut records = batch(1..=40);
    records.extend_from_slice(&sent);
    assert!(
        copied == records,
        "the copy holds the records sent, in order"
    );
}
