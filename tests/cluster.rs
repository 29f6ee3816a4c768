//! The cluster's fencing, through its own pieces against a real three-node
//! NATS JetStream cluster (the pinned `nats-server` of `.ci/oracle-venv`):
//! once a new node has taken the lease and written its fence record, a batch
//! the old node publishes late is refused by the stream, and the old node stops
//! acting. (The process-level tests are in `crates/cli/tests/crash.rs`.)

use std::sync::Arc;
use std::time::Duration;
use switchyard::cluster::replica::Replicator;
use switchyard::cluster::standby::Standby;
use switchyard::cluster::{may_act, Cluster, ClusterConfig, LEASE_KEY};
use switchyard::journal::record::{self, Record};
use switchyard::journal::{JournalConfig, RecordKind, Replica};
use switchyard_tools::natskit::NatsCluster;
use switchyard_tools::testkit::TempDir;
use tokio_util::sync::CancellationToken;

fn config(nats: &NatsCluster, node: &str) -> ClusterConfig {
    ClusterConfig {
        nats: nats.urls(),
        node_id: node.to_owned(),
        stream: "FENCING".to_owned(),
        lease_ttl: Duration::from_millis(1_000),
        connect_timeout: Duration::from_secs(30),
        credentials_file: None,
        tls: None,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_publish_of_the_old_epoch_is_refused_after_the_fence() {
    let dir = TempDir::new("cluster-fencing");
    let nats = NatsCluster::start(&dir.0, 3);
    let retention = Duration::from_secs(3600);

    // The old node takes the lease and replicates a batch.
    let old = Cluster::connect(&config(&nats, "old"), retention)
        .await
        .unwrap();
    let takeover = Standby::new(
        old.clone(),
        &JournalConfig {
            segment_size_max_bytes: 1 << 20,
            ..JournalConfig::new(dir.0.join("journal-old"))
        },
        Default::default(),
        None,
    )
    .run(std::future::pending())
    .await
    .unwrap()
    .expect("the lease is free");
    let fenced = CancellationToken::new();
    let replicator = Arc::new(Replicator::new(
        old.clone(),
        takeover.lease.epoch,
        takeover.fence_sequence,
        tokio::runtime::Handle::current(),
        fenced.clone(),
    ));
    replicate(&replicator, 1..=3).await.unwrap();
    assert!(may_act());

    // The old node's lease goes (as when it is paused past its TTL) and a new
    // node takes over: it copies the batch and writes its fence.
    old.lease.purge(LEASE_KEY).await.unwrap();
    let new = Cluster::connect(&config(&nats, "new"), retention)
        .await
        .unwrap();
    let took = Standby::new(
        new.clone(),
        &JournalConfig {
            segment_size_max_bytes: 1 << 20,
            ..JournalConfig::new(dir.0.join("journal-new"))
        },
        Default::default(),
        None,
    )
    .run(std::future::pending())
    .await
    .unwrap()
    .expect("the lease is free again");
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
