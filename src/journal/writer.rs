//! Appending with group commit: one thread owns the segment file, takes whatever
//! records are queued (up to a batch bound, waiting at most a few microseconds for
//! more), writes them with one system call and makes them durable with one
//! `fdatasync`, then publishes the highest durable sequence number.

use super::reader::{self, JournalError, Scan, SEGMENT_PREFIX, SEGMENT_SUFFIX};
use super::record::{self, Record, RecordKind, BODY_SIZE_MAX_BYTES};
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Records queued for the writer thread; a full queue refuses new records (the
/// switch answers 91) rather than buffering without bound.
pub const QUEUE_DEPTH_MAX_DEFAULT: usize = 65_536;
/// Records written per group commit at most.
pub const BATCH_RECORDS_MAX_DEFAULT: usize = 4_096;
/// Longest wait for more records before a commit, µs.
pub const BATCH_DELAY_US_DEFAULT: u64 = 100;
/// Longest sleep of an idle writer between checks (it is also woken by appends).
const IDLE_PARK: Duration = Duration::from_millis(50);
/// Segment size at which a new segment starts, bytes.
pub const SEGMENT_SIZE_MAX_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// Whether a commit waits for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// `fdatasync` once per batch before anything in it counts as durable (default).
    Batch,
    /// No sync: records reach the OS page cache only. UNSAFE: a power loss or kernel
    /// crash loses acknowledged payments. For benchmarks and tests.
    Off,
}

/// Journal settings.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// Directory of the segments.
    pub dir: PathBuf,
    /// Durability.
    pub fsync: Fsync,
    /// Queue bound.
    pub queue_depth_max: usize,
    /// Records per commit.
    pub batch_records_max: usize,
    /// Wait for more records before a commit.
    pub batch_delay: Duration,
    /// Rotation size.
    pub segment_size_max_bytes: u64,
}

impl JournalConfig {
    /// Defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> JournalConfig {
        JournalConfig {
            dir: dir.into(),
            fsync: Fsync::Batch,
            queue_depth_max: QUEUE_DEPTH_MAX_DEFAULT,
            batch_records_max: BATCH_RECORDS_MAX_DEFAULT,
            batch_delay: Duration::from_micros(BATCH_DELAY_US_DEFAULT),
            segment_size_max_bytes: SEGMENT_SIZE_MAX_BYTES_DEFAULT,
        }
    }
}

/// One record waiting to be written; the message is shared, not copied.
pub struct Entry {
    /// What happened.
    pub kind: RecordKind,
    /// The switch's id for the request.
    pub request_id: u64,
    /// When, ms since the Unix epoch; 0: stamped by the writer with its batch's time
    /// (one clock read per batch instead of one per record).
    pub unix_ms: u64,
    /// Up to 16 bytes of kind-specific metadata written before the message.
    pub head: ([u8; 16], u8),
    /// The ISO 8583 message (may be empty).
    pub message: Bytes,
}

/// Why a record was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The queue is at its bound.
    #[error("journal queue full")]
    Full,
    /// A write or sync failed: the journal accepts nothing more.
    #[error("journal failed: no more durable writes")]
    Failed,
    /// The body exceeds the record bound.
    #[error("record body too large")]
    TooLarge,
}

/// The queue between appenders and the writer thread. Appenders push under a short
/// lock that also hands out sequence numbers, so the queue is in sequence order;
/// the writer is woken only when it sleeps (no system call per record under load).
struct Queue {
    records: ArrayQueue<(u64, Entry)>,
    writer_sleeping: AtomicBool,
    closed: AtomicBool,
}

struct Sender {
    next_seq: u64,
    writer: std::thread::Thread,
}

/// Handle to an open journal: append records, learn what is durable.
pub struct Journal {
    sender: Mutex<Option<Sender>>,
    queue: Arc<Queue>,
    durable: watch::Receiver<u64>,
    failed: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What opening found: the scan of the existing records (after any torn tail was
/// truncated).
pub struct Opened {
    /// The journal.
    pub journal: Journal,
    /// The existing records' scan (torn tail, if any, already cut off).
    pub recovered: Scan,
}

impl Journal {
    /// Opens (creating) the journal in `config.dir`: checks every existing record,
    /// truncates a torn tail, and starts a new segment after the last record.
    pub fn open(config: JournalConfig) -> Result<Opened, JournalError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| JournalError::Io { path, source }
        };
        std::fs::create_dir_all(&config.dir).map_err(io(&config.dir))?;
        let recovered = reader::scan(&config.dir, |_, _, _| {})?;
        if let Some(torn) = &recovered.torn_tail {
            reader::truncate(torn)?;
        }
        let next_seq = recovered.seq_range.map_or(1, |(_, last)| last + 1);
        let file = new_segment(&config.dir, next_seq)?;
        let queue = Arc::new(Queue {
            records: ArrayQueue::new(config.queue_depth_max.max(1)),
            writer_sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let writer_queue = queue.clone();
        let (durable_tx, durable) = watch::channel(next_seq - 1);
        let failed = Arc::new(AtomicBool::new(false));
        let state = WriterState {
            config,
            file,
            segment_bytes: 0,
            buf: Vec::with_capacity(1 << 20),
            durable: durable_tx,
            failed: failed.clone(),
            batch_unix_ms: 0,
        };
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || state.run(&writer_queue))
            .map_err(io(Path::new("journal writer thread")))?;
        let journal = Journal {
            sender: Mutex::new(Some(Sender {
                next_seq,
                writer: thread.thread().clone(),
            })),
            queue,
            durable,
            failed,
            thread: Mutex::new(Some(thread)),
        };
        Ok(Opened { journal, recovered })
    }

    /// Queues a record; returns its sequence number. Never blocks.
    pub fn append(&self, entry: Entry) -> Result<u64, AppendError> {
        if usize::from(entry.head.1) + entry.message.len() > BODY_SIZE_MAX_BYTES {
            return Err(AppendError::TooLarge);
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(AppendError::Failed);
        }
        // Sequence numbers are given in queue order under this short lock, so the
        // writer sees them ascending.
        let mut guard = self
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(sender) = guard.as_mut() else {
            return Err(AppendError::Failed);
        };
        let seq = sender.next_seq;
        if self.queue.records.push((seq, entry)).is_err() {
            return Err(AppendError::Full);
        }
        sender.next_seq += 1;
        // Pairs with the writer's store-then-check in `WriterState::run`.
        if self.queue.writer_sleeping.load(Ordering::SeqCst) {
            sender.writer.unpark();
        }
        Ok(seq)
    }

    /// The highest sequence number known durable (all below it are too).
    pub fn durable(&self) -> u64 {
        *self.durable.borrow()
    }

    /// Waits until `seq` is durable; false if the journal failed first.
    pub async fn wait_durable(&self, seq: u64) -> bool {
        let mut rx = self.durable.clone();
        let failed = &self.failed;
        rx.wait_for(|d| *d >= seq || failed.load(Ordering::Acquire))
            .await
            .is_ok()
            && !self.failed.load(Ordering::Acquire)
    }

    /// Marks the journal failed as a write or sync failure would (for tests of the
    /// switch's behaviour on a full or broken disk).
    pub fn simulate_failure(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Whether a write or sync failed.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Stops accepting, writes and syncs what is queued, and waits for the writer.
    pub fn close(&self) {
        let sender = self
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        self.queue.closed.store(true, Ordering::SeqCst);
        if let Some(sender) = sender {
            sender.writer.unpark();
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

fn new_segment(dir: &Path, first_seq: u64) -> Result<File, JournalError> {
    let path = dir.join(format!("{SEGMENT_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}"));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| JournalError::Io {
            path: path.clone(),
            source,
        })?;
    // The new name must survive a crash too.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| JournalError::Io {
            path: dir.to_owned(),
            source,
        })?;
    Ok(file)
}

struct WriterState {
    config: JournalConfig,
    file: File,
    segment_bytes: u64,
    buf: Vec<u8>,
    durable: watch::Sender<u64>,
    failed: Arc<AtomicBool>,
    batch_unix_ms: u64,
}

impl WriterState {
    fn run(mut self, queue: &Queue) {
        let mut body = Vec::with_capacity(BODY_SIZE_MAX_BYTES);
        loop {
            self.batch_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut last_seq = None;
            let mut count = 0;
            while count < self.config.batch_records_max {
                let Some(entry) = queue.records.pop() else {
                    break;
                };
                last_seq = Some(self.add(entry, &mut body));
                count += 1;
            }
            // A small batch may wait a moment for company (group commit).
            if count > 0 && count < self.config.batch_records_max / 4 {
                std::thread::park_timeout(self.config.batch_delay);
                while count < self.config.batch_records_max {
                    let Some(entry) = queue.records.pop() else {
                        break;
                    };
                    last_seq = Some(self.add(entry, &mut body));
                    count += 1;
                }
            }
            match last_seq {
                Some(seq) => {
                    if let Err(e) = self.commit(seq) {
                        tracing::error!(error = %e, "journal write failed: refusing new requests");
                        self.failed.store(true, Ordering::Release);
                        self.durable.send_modify(|_| {}); // wake waiters to see the failure
                        return;
                    }
                }
                None if queue.closed.load(Ordering::SeqCst) => return,
                None => {
                    queue.writer_sleeping.store(true, Ordering::SeqCst);
                    if queue.records.is_empty() && !queue.closed.load(Ordering::SeqCst) {
                        std::thread::park_timeout(IDLE_PARK);
                    }
                    queue.writer_sleeping.store(false, Ordering::SeqCst);
                }
            }
        }
    }

    fn add(&mut self, (seq, entry): (u64, Entry), body: &mut Vec<u8>) -> u64 {
        body.clear();
        body.extend_from_slice(&entry.head.0[..usize::from(entry.head.1)]);
        body.extend_from_slice(&entry.message);
        let r = Record {
            seq,
            kind: entry.kind,
            request_id: entry.request_id,
            unix_ms: if entry.unix_ms == 0 {
                self.batch_unix_ms
            } else {
                entry.unix_ms
            },
            body,
        };
        record::encode(&mut self.buf, &r);
        seq
    }

    fn commit(&mut self, last_seq: u64) -> Result<(), JournalError> {
        let dir = self.config.dir.clone();
        let io = |source| JournalError::Io {
            path: dir.clone(),
            source,
        };
        self.file.write_all(&self.buf).map_err(io)?;
        if self.config.fsync == Fsync::Batch {
            self.file.sync_data().map_err(io)?;
        }
        self.segment_bytes += self.buf.len() as u64;
        self.buf.clear();
        self.durable.send_replace(last_seq);
        if self.segment_bytes >= self.config.segment_size_max_bytes {
            self.file = new_segment(&self.config.dir, last_seq + 1)?;
            self.segment_bytes = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::reader::scan;
    use crate::journal::testdir::TempDir;

    fn entry(i: u64) -> Entry {
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&i.to_le_bytes());
        let kind = RecordKind::ALL[(i % 5) as usize];
        let message = Bytes::from(format!("message {i}").into_bytes());
        Entry {
            kind,
            request_id: i,
            unix_ms: 1_700_000_000_000 + i,
            head: (head, 8),
            message,
        }
    }

    fn fill(config: JournalConfig, count: u64) -> Scan {
        let opened = Journal::open(config).unwrap();
        let first = opened.recovered.seq_range.map_or(1, |(_, l)| l + 1);
        for i in 0..count {
            assert_eq!(opened.journal.append(entry(i)), Ok(first + i));
        }
        opened.journal.close();
        opened.recovered
    }

    #[test]
    fn records_survive_reopen_and_sequence_continues() {
        let dir = TempDir::new("reopen");
        fill(JournalConfig::new(&dir.0), 5_000);
        let recovered = fill(JournalConfig::new(&dir.0), 10);
        assert_eq!(recovered.records, 5_000);
        assert_eq!(recovered.seq_range, Some((1, 5_000)));
        let mut seen = Vec::new();
        let all = scan(&dir.0, |_, _, r| {
            seen.push((r.seq, r.request_id, r.body.len()))
        })
        .unwrap();
        assert_eq!(all.records, 5_010);
        assert_eq!(all.seq_range, Some((1, 5_010)));
        assert_eq!(seen[5_000], (5_001, 0, 8 + "message 0".len()));
        assert_eq!(all.by_kind.iter().sum::<u64>(), 5_010);
        assert!(all.segments >= 2, "each open starts a segment");
    }

    #[test]
    fn rotation_spreads_records_over_segments() {
        let dir = TempDir::new("rotate");
        let config = JournalConfig {
            segment_size_max_bytes: 4_096,
            batch_records_max: 10,
            ..JournalConfig::new(&dir.0)
        };
        fill(config, 2_000);
        let s = scan(&dir.0, |_, _, _| {}).unwrap();
        assert_eq!((s.records, s.seq_range), (2_000, Some((1, 2_000))));
        assert!(s.segments > 10, "{} segments", s.segments);
    }

    fn last_segment(dir: &Path) -> PathBuf {
        let files = crate::journal::segments(dir).unwrap();
        files
            .iter()
            .rev()
            .find(|(_, p)| std::fs::metadata(p).unwrap().len() > 0)
            .unwrap()
            .1
            .clone()
    }

    #[test]
    fn torn_tail_is_truncated_and_reported() {
        let dir = TempDir::new("torn");
        fill(JournalConfig::new(&dir.0), 100);
        let segment = last_segment(&dir.0);
        let good_len = std::fs::metadata(&segment).unwrap().len();
        // Half a record, then the zeros of a preallocated or unwritten page.
        let mut torn = Vec::new();
        let r = Record {
            seq: 101,
            kind: RecordKind::Outcome,
            request_id: 1,
            unix_ms: 2,
            body: b"xyz",
        };
        record::encode(&mut torn, &r);
        torn.truncate(torn.len() / 2);
        let mut f = OpenOptions::new().append(true).open(&segment).unwrap();
        f.write_all(&torn).unwrap();
        drop(f);
        let opened = Journal::open(JournalConfig::new(&dir.0)).unwrap();
        let tail = opened
            .recovered
            .torn_tail
            .clone()
            .expect("torn tail reported");
        assert_eq!(
            (tail.segment.as_path(), tail.offset),
            (segment.as_path(), good_len)
        );
        assert_eq!(opened.recovered.records, 100);
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            good_len,
            "truncated"
        );
        assert_eq!(opened.journal.append(entry(7)), Ok(101));
    }

    #[test]
    fn corruption_in_the_middle_names_segment_and_offset() {
        let dir = TempDir::new("corrupt");
        fill(JournalConfig::new(&dir.0), 100);
        let segment = last_segment(&dir.0);
        let mut bytes = std::fs::read(&segment).unwrap();
        let mut offsets = Vec::new();
        scan(&dir.0, |_, offset, _| offsets.push(offset)).unwrap();
        let victim = offsets[50] as usize;
        bytes[victim + 20] ^= 0x40;
        std::fs::write(&segment, &bytes).unwrap();
        let err = Journal::open(JournalConfig::new(&dir.0))
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(text.contains(&segment.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("corrupt record at byte {victim}")),
            "{text}"
        );
    }

    #[test]
    fn full_queue_refuses_at_once() {
        let dir = TempDir::new("full");
        let config = JournalConfig {
            queue_depth_max: 4,
            batch_delay: Duration::from_millis(50),
            ..JournalConfig::new(&dir.0)
        };
        let opened = Journal::open(config).unwrap();
        let results: Vec<_> = (0..10_000)
            .map(|i| opened.journal.append(entry(i)))
            .collect();
        assert!(results.contains(&Err(AppendError::Full)));
    }

    #[tokio::test]
    async fn durability_is_published_per_commit() {
        let dir = TempDir::new("durable");
        let opened = Journal::open(JournalConfig::new(&dir.0)).unwrap();
        let seqs: Vec<u64> = (0..100)
            .map(|i| opened.journal.append(entry(i)).unwrap())
            .collect();
        assert!(opened.journal.wait_durable(seqs[99]).await);
        assert!(opened.journal.durable() >= 100);
        let s = scan(&dir.0, |_, _, _| {}).unwrap();
        assert_eq!(s.records, 100, "durable means on disk");
    }
}
