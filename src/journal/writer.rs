//! Appending with group commit: one thread owns the segment file, takes whatever
//! records are queued (up to a batch bound, waiting at most a few microseconds for
//! more), writes them with one system call and makes them durable with one
//! `fdatasync`, then publishes the highest durable sequence number.
//!
//! Each segment's space is reserved when it is created (`fallocate` of
//! `segment_size_max_bytes`, where the filesystem allows it), so appends write
//! into the reservation instead of growing the file; the reader takes the zeros
//! after a segment's last record as its end. Old segments are pruned at open and
//! on each rotation: by age (`retention`), then by size (`size_max_bytes`); when
//! the bound is reached and nothing may be pruned, the journal refuses appends.

use super::durable::DurablePoint;
use super::lookup::{Lookup, Stride};
use super::pages::SegmentFile;
use super::reader::{self, JournalError, Scan, SEGMENT_PREFIX, SEGMENT_SUFFIX};
use super::record::{self, Record, RecordKind, BODY_SIZE_MAX_BYTES};
use super::spare::Spare;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records queued for the writer thread; a full queue refuses new records (the
/// switch answers 91) rather than buffering without bound.
pub const QUEUE_DEPTH_MAX_DEFAULT: usize = 65_536;
/// Records written per group commit at most.
pub const BATCH_RECORDS_MAX_DEFAULT: usize = 4_096;
/// Longest wait for more records before a commit, µs.
pub const BATCH_DELAY_US_DEFAULT: u64 = 20;
/// Longest sleep of an idle writer between checks (it is also woken by appends).
const IDLE_PARK: Duration = Duration::from_millis(50);
/// Segment size at which a new segment starts, bytes; also the space reserved for
/// each new segment.
pub const SEGMENT_SIZE_MAX_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// A closed segment whose newest record is older than this is deleted, seconds
/// (2 days). Must exceed the longest reversal age (`bank.reversal_age_max_s`,
/// 24 h by default): a segment may hold the only record of a pending advice.
pub const RETENTION_S_DEFAULT: u64 = 172_800;
/// Bound on all segments together, bytes (64 GiB).
pub const SIZE_MAX_BYTES_DEFAULT: u64 = 64 * 1024 * 1024 * 1024;

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
    /// Rotation size, and the space reserved for each new segment.
    pub segment_size_max_bytes: u64,
    /// Closed segments whose newest record is older than this are deleted. Must
    /// exceed the longest reversal age of any bank (checked by the caller).
    pub retention: Duration,
    /// Bound on all segments together (the one being written and its reservation
    /// included), bytes.
    pub size_max_bytes: u64,
    /// With `fsync = "batch"`: write segments with `O_DIRECT | O_DSYNC` where the
    /// filesystem allows it (see `journal::pages`); false: buffered writes and
    /// `fdatasync` (also the fallback).
    pub direct_io: bool,
    /// Where every batch also goes before it counts as durable (a cluster's
    /// stream: `crate::cluster`); none on a single node.
    pub replica: Option<Arc<dyn Replica>>,
}

/// A copy of the journal elsewhere: each commit's batch (its records encoded
/// as in a segment) is handed to [`Replica::send`] before the local write, and
/// a record counts as durable only once it is written here and
/// [`Replica::confirmed`] covers it. Batches are pipelined: the next commit
/// does not wait for the previous one's confirmation (the replica bounds how
/// many are unconfirmed: `send` blocks past that). A failure stops the
/// journal, as a failed write does.
pub trait Replica: Send + Sync + std::fmt::Debug {
    /// The writer thread, woken whenever a confirmation arrives.
    fn attach(&self, writer: std::thread::Thread);
    /// Starts sending `batch` (records encoded as in a segment; their
    /// sequence numbers are in them).
    fn send(&self, batch: &[u8]);
    /// The last journal sequence number up to which every record is safe
    /// elsewhere (never blocks); an error once the replica failed for good.
    fn confirmed(&self) -> Result<u64, String>;
}

impl JournalConfig {
    fn wants_direct(&self) -> bool {
        self.direct_io && self.fsync == Fsync::Batch
    }

    /// Defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> JournalConfig {
        JournalConfig {
            dir: dir.into(),
            fsync: Fsync::Batch,
            queue_depth_max: QUEUE_DEPTH_MAX_DEFAULT,
            batch_records_max: BATCH_RECORDS_MAX_DEFAULT,
            batch_delay: Duration::from_micros(BATCH_DELAY_US_DEFAULT),
            segment_size_max_bytes: SEGMENT_SIZE_MAX_BYTES_DEFAULT,
            retention: Duration::from_secs(RETENTION_S_DEFAULT),
            size_max_bytes: SIZE_MAX_BYTES_DEFAULT,
            direct_io: true,
            replica: None,
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
    /// The ISO 8583 message (may be empty), or its protected form (card data
    /// removed or enciphered: [`crate::journal::protect`]) when `protected`.
    pub message: Bytes,
    /// Whether `message` is in the protected form.
    pub protected: bool,
}

/// Where records are appended: the journal's writer thread, or (in the
/// simulation) an in-memory journal. `append` never blocks; durability is the
/// sink's own business (the daemon waits with [`Journal::wait_durable`]).
pub trait RecordSink: Send + Sync {
    /// Queues a record; returns its sequence number.
    fn append(&self, entry: Entry) -> Result<u64, AppendError>;
}

impl RecordSink for Journal {
    fn append(&self, entry: Entry) -> Result<u64, AppendError> {
        Journal::append(self, entry)
    }
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
    /// The segments reached `size_max_bytes` and none could be pruned: the journal
    /// accepts nothing more (it counts as failed: [`Journal::has_failed`]).
    #[error("journal at its size bound (journal.size_max_bytes): no more writes")]
    SizeBound,
    /// The body exceeds the record bound.
    #[error("record body too large")]
    TooLarge,
    /// The message could not be put in its protected form (re-encoded without
    /// its card data): it is not journaled, and the request goes no further.
    #[error("message cannot be journaled without its card data")]
    Unprotectable,
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

/// Segments and bytes on disk, published by whoever changes them.
#[derive(Default)]
struct Usage {
    segments: AtomicUsize,
    bytes: AtomicU64,
}

/// Handle to an open journal: append records, learn what is durable.
pub struct Journal {
    sender: Mutex<Option<Sender>>,
    queue: Arc<Queue>,
    /// What is durable, whether the journal failed, and who waits.
    point: Arc<DurablePoint>,
    /// Set (before the journal counts as failed) when the size bound stopped the writer.
    full: Arc<AtomicBool>,
    usage: Arc<Usage>,
    lookup: Arc<Lookup>,
    spare: Arc<Spare>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    spare_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What opening found: the scan of the existing records (after any torn tail was
/// truncated).
pub struct Opened {
    /// The journal.
    pub journal: Journal,
    /// The existing records' scan (torn tail, if any, already cut off).
    pub recovered: Scan,
    /// The sequence number the first append gets: after the last record, and
    /// after every segment's first sequence number (so the sequence goes on even
    /// when the only segments left are empty).
    pub next_seq: u64,
}

impl Journal {
    /// Opens (creating) the journal in `config.dir`: checks every existing record,
    /// truncates a torn tail, prunes old segments, and starts a new segment after
    /// the last record. Same as [`Journal::open_with`] with a visitor that does
    /// nothing.
    pub fn open(config: JournalConfig) -> Result<Opened, JournalError> {
        Journal::open_with(config, |_, _, _| {})
    }

    /// Opens (creating) the journal in `config.dir` in one pass over the existing
    /// records: each is checked and, if valid, given to `visit` with its segment
    /// and its offset in it, in journal order (a torn tail is not visited). Then
    /// the torn tail is truncated, the preallocated space left after the last
    /// record of a segment is given back, segments are pruned (by age, then by
    /// size: only segments of earlier opens, oldest first, whose open work the
    /// caller must journal again) and a new segment starts after the last record.
    ///
    /// `visit` sees every record before anything is pruned, including records of
    /// segments pruned right after.
    pub fn open_with(
        config: JournalConfig,
        visit: impl FnMut(&Path, u64, &Record<'_>),
    ) -> Result<Opened, JournalError> {
        Journal::open_at(config, visit, crate::clock::unix_ms())
    }

    /// [`Journal::open_with`] with the time pruning at open compares against.
    fn open_at(
        config: JournalConfig,
        mut visit: impl FnMut(&Path, u64, &Record<'_>),
        now_ms: u64,
    ) -> Result<Opened, JournalError> {
        std::fs::create_dir_all(&config.dir).map_err(io(&config.dir))?;
        let (mut seen, lookup) = (Vec::new(), Arc::new(Lookup::new()));
        let scan = reader::scan(&config.dir, |path, offset, r| {
            note(&mut seen, &lookup, path, offset, r);
            visit(path, offset, r);
        })?;
        let prescan = Prescan { scan, seen, lookup };
        Journal::open_scanned(config, prescan, now_ms)
    }

    /// Opens the journal in `config.dir` whose every record `prescan` has already
    /// seen and checked (a standby's copy, read as it was written): nothing is
    /// read again. Otherwise as [`Journal::open_with`].
    pub fn open_prescanned(
        config: JournalConfig,
        prescan: Prescan,
    ) -> Result<Opened, JournalError> {
        std::fs::create_dir_all(&config.dir).map_err(io(&config.dir))?;
        Journal::open_scanned(config, prescan, crate::clock::unix_ms())
    }

    fn open_scanned(
        config: JournalConfig,
        prescan: Prescan,
        now_ms: u64,
    ) -> Result<Opened, JournalError> {
        let Prescan {
            scan: recovered,
            seen,
            lookup,
        } = prescan;
        let (spare, spare_thread) = Spare::start(&config.dir).map_err(io(&config.dir))?;
        if let Some(torn) = &recovered.torn_tail {
            reader::truncate(torn)?;
        }
        let usage = Arc::new(Usage::default());
        let mut segments = Segments::load(&config.dir, &seen, usage.clone(), lookup.clone())?;
        segments
            .prune(&config, now_ms, config.segment_size_max_bytes)
            .map_err(|full| JournalError::Full {
                dir: config.dir.clone(),
                bytes: full.bytes,
                needed: full.needed,
                size_max: config.size_max_bytes,
            })?;
        let next_seq = recovered
            .seq_range
            .map_or(1, |(_, last)| last + 1)
            .max(segments.first_seq_max);
        let mut preallocate = true;
        let (file, path, reserved) = new_segment(
            &config.dir,
            next_seq,
            config.segment_size_max_bytes,
            &mut preallocate,
        )?;
        let file = SegmentFile::new(file, &path, config.wants_direct());
        if config.fsync == Fsync::Batch {
            if file.is_direct() {
                tracing::info!(dir = %config.dir.display(), "journal: direct synchronous writes");
            } else {
                tracing::info!(dir = %config.dir.display(),
                    "journal: buffered writes and fdatasync (direct I/O off or not supported here)");
            }
        }
        segments.start(path, reserved);
        let queue = Arc::new(Queue {
            records: ArrayQueue::new(config.queue_depth_max.max(1)),
            writer_sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let writer_queue = queue.clone();
        let point = Arc::new(DurablePoint::new(next_seq - 1));
        let full = Arc::new(AtomicBool::new(false));
        let state = WriterState {
            config,
            file,
            segment_bytes: 0,
            segments,
            preallocate,
            buf: Vec::with_capacity(1 << 20),
            batch_first_seq: 0,
            points: Stride::default(),
            lookup: lookup.clone(),
            spare: spare.clone(),
            point: point.clone(),
            woken: Vec::new(),
            full: full.clone(),
            batch_unix_ms: 0,
            local_seq: next_seq - 1,
            published_seq: next_seq - 1,
        };
        state.want_spare();
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
            point,
            full,
            usage,
            lookup,
            spare,
            thread: Mutex::new(Some(thread)),
            spare_thread: Mutex::new(Some(spare_thread)),
        };
        Ok(Opened {
            journal,
            recovered,
            next_seq,
        })
    }

    /// Queues a record; returns its sequence number. Never blocks.
    pub fn append(&self, entry: Entry) -> Result<u64, AppendError> {
        if usize::from(entry.head.1) + entry.message.len() > BODY_SIZE_MAX_BYTES {
            return Err(AppendError::TooLarge);
        }
        if self.point.has_failed() {
            if self.full.load(Ordering::Acquire) {
                return Err(AppendError::SizeBound);
            }
            return Err(AppendError::Failed);
        }
        // Sequence numbers are given in queue order under this short lock, so the
        // writer sees them ascending.
        let mut guard = crate::sync::lock(&self.sender);
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

    /// Where its records lie: reads one back by its sequence number.
    pub fn lookup(&self) -> &Lookup {
        &self.lookup
    }

    /// Records queued for the writer, not yet written.
    pub fn queue_depth(&self) -> usize {
        self.queue.records.len()
    }

    /// The highest sequence number known durable (all below it are too).
    pub fn durable(&self) -> u64 {
        self.point.get()
    }

    /// Waits until `seq` is durable; false if the journal failed first.
    pub async fn wait_durable(&self, seq: u64) -> bool {
        self.point.wait(seq).await
    }

    /// Marks the journal failed as a write or sync failure would (for tests of the
    /// switch's behaviour on a full or broken disk).
    pub fn simulate_failure(&self) {
        self.point.fail();
    }

    /// Whether a write or sync failed, or the size bound was reached.
    pub fn has_failed(&self) -> bool {
        self.point.has_failed()
    }

    /// Whether the size bound (`size_max_bytes`) stopped the journal (it then
    /// counts as failed too).
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Segment files and their bytes on disk (reserved space included), as of the
    /// last open, rotation or commit: for gauges.
    pub fn disk_usage(&self) -> (usize, u64) {
        (
            self.usage.segments.load(Ordering::Relaxed),
            self.usage.bytes.load(Ordering::Relaxed),
        )
    }

    /// Stops accepting, writes and syncs what is queued, and waits for the writer.
    pub fn close(&self) {
        let sender = crate::sync::lock(&self.sender).take();
        self.queue.closed.store(true, Ordering::SeqCst);
        if let Some(sender) = sender {
            sender.writer.unpark();
        }
        let thread = crate::sync::lock(&self.thread).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        self.spare.close();
        let thread = crate::sync::lock(&self.spare_thread).take();
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

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_owned();
    move |source| JournalError::Io { path, source }
}

/// What opening a journal learns from its records, gathered as they are read:
/// by [`Journal::open_with`]'s scan, or record by record as a standby copies
/// them ([`Prescan::segment_bytes`]), so that opening the copy reads nothing
/// again ([`Journal::open_prescanned`]).
#[derive(Default)]
pub struct Prescan {
    scan: Scan,
    /// Per segment holding records: the end of its last record, its newest time.
    seen: Vec<Seen>,
    lookup: Arc<Lookup>,
}

/// Takes a valid record at `offset` in segment `path`, in journal order.
fn note(seen: &mut Vec<Seen>, lookup: &Lookup, path: &Path, offset: u64, r: &Record<'_>) {
    let end = offset + (record::LEN_BYTES + record::FIXED_BYTES + r.body.len()) as u64;
    let s = match seen.last_mut() {
        Some(s) if s.path.as_os_str() == path.as_os_str() => s,
        _ => {
            seen.push(Seen {
                path: path.to_owned(),
                end,
                newest_unix_ms: r.unix_ms,
                points: Stride::default(),
                first_seq: r.seq,
                records: 0,
                by_kind: [0; 5],
            });
            seen.last_mut().expect("pushed")
        }
    };
    s.end = end;
    s.newest_unix_ms = s.newest_unix_ms.max(r.unix_ms);
    if s.points.due(offset) {
        lookup.note(path, r.seq, offset);
    }
    s.records += 1;
    if let Some(i) = RecordKind::ALL.iter().position(|k| *k == r.kind) {
        s.by_kind[i] += 1;
    }
}

impl Prescan {
    /// Checks and takes the whole records `bytes`, written at `base` in segment
    /// `path` after every record taken before, giving each to `visit`.
    pub fn segment_bytes(
        &mut self,
        path: &Path,
        base: u64,
        bytes: &[u8],
        mut visit: impl FnMut(&Record<'_>),
    ) -> Result<(), JournalError> {
        let Prescan { scan, seen, lookup } = self;
        reader::scan_bytes(scan, path, base, bytes, |path, offset, r| {
            note(seen, lookup, path, offset, r);
            visit(r);
        })?;
        scan.segments = seen.len();
        Ok(())
    }

    /// Records taken so far (in the segments not forgotten).
    pub fn records(&self) -> u64 {
        self.scan.records
    }

    /// The segments taken, but the last (the one being written), whose newest
    /// record is older than `retention` at `now_ms`: the journal's own rule
    /// for pruning by age. Oldest first.
    pub fn expired(&self, retention: Duration, now_ms: u64) -> Vec<PathBuf> {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let closed = &self.seen[..self.seen.len().saturating_sub(1)];
        closed
            .iter()
            .filter(|s| now_ms.saturating_sub(s.newest_unix_ms) > retention_ms)
            .map(|s| s.path.clone())
            .collect()
    }

    /// Forgets the segment `path` (deleted): its records no longer count, and
    /// the index no longer points into it.
    pub fn forget(&mut self, path: &Path) {
        let Some(i) = self.seen.iter().position(|s| s.path == path) else {
            return;
        };
        let gone = self.seen.remove(i);
        self.lookup.forget(path);
        let scan = &mut self.scan;
        scan.segments = self.seen.len();
        scan.records -= gone.records;
        for (n, g) in scan.by_kind.iter_mut().zip(gone.by_kind) {
            *n -= g;
        }
        scan.seq_range = match (self.seen.first(), scan.seq_range) {
            (Some(first), Some((_, last))) => Some((first.first_seq, last)),
            _ => None,
        };
    }
}

/// A segment holding records, as the scan at open saw it.
struct Seen {
    path: PathBuf,
    /// Where its last record ends: anything after it is zeros (checked by the scan).
    end: u64,
    newest_unix_ms: u64,
    /// When its next index point is due.
    points: Stride,
    /// Its records: the first's sequence number, how many, how many of each kind.
    first_seq: u64,
    records: u64,
    by_kind: [u64; 5],
}

/// A segment as pruning sees it.
#[derive(Clone, Debug)]
struct Segment {
    path: PathBuf,
    /// Length on disk, reserved space included.
    bytes: u64,
    /// Its newest record's time, ms since the epoch; 0 when it holds none.
    newest_unix_ms: u64,
    /// Created since this process opened the journal: it may hold open work that
    /// exists nowhere else, so it is never pruned by size.
    this_open: bool,
}

/// The size bound leaves no room for a new segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Full {
    /// Bytes of the segments kept.
    bytes: u64,
    /// Bytes the new segment needs.
    needed: u64,
}

/// The journal's segments: the closed ones, oldest first, and the one being
/// written.
struct Segments {
    dir: PathBuf,
    closed: VecDeque<Segment>,
    closed_bytes: u64,
    current: Option<Segment>,
    usage: Arc<Usage>,
    /// Forgets the segments deleted.
    lookup: Arc<Lookup>,
    /// The highest first sequence number of a segment found at open (0: none).
    first_seq_max: u64,
}

impl Segments {
    /// The segments of `dir` after the scan at open (`seen`, in segment order):
    /// every one is closed and of an earlier open. The zeros a segment's
    /// preallocation left after its last record are cut off.
    fn load(
        dir: &Path,
        seen: &[Seen],
        usage: Arc<Usage>,
        lookup: Arc<Lookup>,
    ) -> Result<Segments, JournalError> {
        let mut segments = Segments {
            dir: dir.to_owned(),
            closed: VecDeque::new(),
            closed_bytes: 0,
            current: None,
            usage,
            lookup,
            first_seq_max: 0,
        };
        let mut seen = seen.iter().peekable();
        for (first_seq, path) in reader::segments(dir)? {
            segments.first_seq_max = segments.first_seq_max.max(first_seq);
            let io = |source| JournalError::Io {
                path: path.clone(),
                source,
            };
            let (end, newest_unix_ms) = match seen.peek() {
                Some(s) if s.path == path => {
                    let s = seen.next().expect("peeked");
                    (s.end, s.newest_unix_ms)
                }
                _ => (0, 0),
            };
            let mut bytes = std::fs::metadata(&path).map_err(io)?.len();
            if bytes > end {
                // Only zeros there (the scan stops at anything else).
                let file = OpenOptions::new().write(true).open(&path).map_err(io)?;
                file.set_len(end).map_err(io)?;
                file.sync_all().map_err(io)?;
                bytes = end;
            }
            segments.closed_bytes += bytes;
            segments.closed.push_back(Segment {
                path,
                bytes,
                newest_unix_ms,
                this_open: false,
            });
        }
        segments.publish();
        Ok(segments)
    }

    /// Makes `path`, `bytes` long on disk, the segment being written.
    fn start(&mut self, path: PathBuf, bytes: u64) {
        self.current = Some(Segment {
            path,
            bytes,
            newest_unix_ms: 0,
            this_open: true,
        });
        self.publish();
    }

    /// Notes what was written to the current segment: its length on disk is at
    /// least `written`, and it holds a record of `newest_unix_ms`.
    fn wrote(&mut self, written: u64, newest_unix_ms: u64) {
        if let Some(c) = &mut self.current {
            c.newest_unix_ms = c.newest_unix_ms.max(newest_unix_ms);
            if written > c.bytes {
                c.bytes = written;
                self.publish();
            }
        }
    }

    /// The current segment joins the closed ones.
    fn close_current(&mut self) {
        if let Some(c) = self.current.take() {
            self.closed_bytes += c.bytes;
            self.closed.push_back(c);
        }
        self.publish();
    }

    fn publish(&self) {
        let current = self.current.as_ref().map_or(0, |c| c.bytes);
        let count = self.closed.len() + usize::from(self.current.is_some());
        self.usage.segments.store(count, Ordering::Relaxed);
        self.usage
            .bytes
            .store(self.closed_bytes + current, Ordering::Relaxed);
    }

    /// Deletes the closed segments whose newest record is older than
    /// `config.retention` at `now_ms` (oldest first); then, while the segments and
    /// `needed` more bytes would exceed `config.size_max_bytes`, the oldest closed
    /// segments of earlier opens. `Err` when there is still no room for `needed`.
    fn prune(&mut self, config: &JournalConfig, now_ms: u64, needed: u64) -> Result<(), Full> {
        let retention_ms = u64::try_from(config.retention.as_millis()).unwrap_or(u64::MAX);
        let mut deleted = 0;
        let mut kept = VecDeque::with_capacity(self.closed.len());
        while let Some(s) = self.closed.pop_front() {
            let old = now_ms.saturating_sub(s.newest_unix_ms) > retention_ms;
            if old && self.delete(&s, now_ms, "age") {
                deleted += 1;
            } else {
                kept.push_back(s);
            }
        }
        self.closed = kept;
        let current = self.current.as_ref().map_or(0, |c| c.bytes);
        while self.closed_bytes + current + needed > config.size_max_bytes {
            let Some(i) = self.closed.iter().position(|s| !s.this_open) else {
                break;
            };
            let s = self.closed[i].clone();
            if !self.delete(&s, now_ms, "size") {
                break;
            }
            self.closed.remove(i);
            deleted += 1;
        }
        if deleted > 0 {
            // The deletions must not come back after a crash (they would only be
            // pruned again, but the space counted would be wrong meanwhile).
            if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "journal: directory sync after pruning failed");
            }
        }
        self.publish();
        let bytes = self.closed_bytes + current;
        if bytes + needed > config.size_max_bytes {
            return Err(Full { bytes, needed });
        }
        Ok(())
    }

    /// Deletes one closed segment (already gone counts as deleted); false if it
    /// could not be.
    fn delete(&mut self, s: &Segment, now_ms: u64, reason: &'static str) -> bool {
        let age_s = (s.newest_unix_ms != 0).then(|| now_ms.saturating_sub(s.newest_unix_ms) / 1000);
        match std::fs::remove_file(&s.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %s.path.display(), error = %e, "journal: cannot delete segment");
                return false;
            }
        }
        self.closed_bytes -= s.bytes;
        self.lookup.forget(&s.path);
        tracing::info!(
            path = %s.path.display(),
            age_s = ?age_s,
            bytes = s.bytes,
            reason,
            "journal segment pruned"
        );
        metrics::counter!("switchyard_journal_segments_pruned_total").increment(1);
        true
    }
}

/// Set once a failed preallocation has been logged.
static PREALLOCATION_WARNED: AtomicBool = AtomicBool::new(false);

/// Creates the segment starting at `first_seq` (never over an existing file),
/// reserves `reserve` bytes for it where the filesystem allows (`preallocate`
/// turns false when it does not support it), and syncs the directory so the new
/// name survives a crash. Returns the file, its path and its length on disk.
fn new_segment(
    dir: &Path,
    first_seq: u64,
    reserve: u64,
    preallocate: &mut bool,
) -> Result<(File, PathBuf, u64), JournalError> {
    let path = segment_path(dir, first_seq);
    let io = |source| JournalError::Io {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    let mut bytes = 0;
    if *preallocate && reserve > 0 {
        match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, reserve) {
            Ok(()) => bytes = reserve,
            Err(e) => {
                let unsupported =
                    e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS;
                if unsupported {
                    *preallocate = false;
                }
                if !unsupported || !PREALLOCATION_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        path = %path.display(),
                        error = %std::io::Error::from(e),
                        "journal: cannot reserve segment space; appends will grow the file"
                    );
                }
                // A failed reservation may still have extended the file.
                bytes = file.metadata().map_err(io)?.len();
            }
        }
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| JournalError::Io {
            path: dir.to_owned(),
            source,
        })?;
    Ok((file, path, bytes))
}

/// The path of the segment starting at `first_seq`.
pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}"))
}

/// Why the writer stops.
enum Stop {
    Io(JournalError),
    Full(Full),
    /// The replica refused or could not confirm a batch.
    Replica(String),
}

impl From<JournalError> for Stop {
    fn from(e: JournalError) -> Stop {
        Stop::Io(e)
    }
}

struct WriterState {
    config: JournalConfig,
    file: SegmentFile,
    /// Bytes written to the current segment: where the next batch goes.
    segment_bytes: u64,
    segments: Segments,
    /// Whether to reserve space for new segments (false once the filesystem said
    /// it cannot).
    preallocate: bool,
    buf: Vec<u8>,
    /// The first record in `buf`.
    batch_first_seq: u64,
    /// When the current segment's next index point is due.
    points: Stride,
    lookup: Arc<Lookup>,
    /// The next segment, zero-filled ahead of time.
    spare: Arc<Spare>,
    point: Arc<DurablePoint>,
    /// Wakers taken by a commit (kept: no allocation per commit).
    woken: Vec<std::task::Waker>,
    full: Arc<AtomicBool>,
    batch_unix_ms: u64,
    /// The last record written (and synced) here.
    local_seq: u64,
    /// The last durable point published.
    published_seq: u64,
}

impl WriterState {
    fn run(mut self, queue: &Queue) {
        if let Some(r) = &self.config.replica {
            r.attach(std::thread::current());
        }
        loop {
            self.batch_unix_ms = crate::clock::unix_ms();
            let mut last_seq = None;
            let mut count = 0;
            let mut newest = 0;
            while count < self.config.batch_records_max {
                let Some(entry) = queue.records.pop() else {
                    break;
                };
                last_seq = Some(self.add(entry, &mut newest));
                count += 1;
            }
            // A small batch may wait a moment for company (group commit).
            if count > 0 && count < self.config.batch_records_max / 4 {
                std::thread::park_timeout(self.config.batch_delay);
                while count < self.config.batch_records_max {
                    let Some(entry) = queue.records.pop() else {
                        break;
                    };
                    last_seq = Some(self.add(entry, &mut newest));
                    count += 1;
                }
            }
            // Confirmations of batches written earlier count too when nothing
            // new came (a replica's acknowledgements arrive after the write).
            let done = match last_seq {
                Some(seq) => self.commit(seq, newest),
                None => self.publish_durable(),
            };
            if let Err(stop) = done {
                self.halt(stop);
                return;
            }
            match last_seq {
                Some(_) => {}
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

    /// Stops the writer for good: says why, then marks the journal failed.
    fn halt(&self, stop: Stop) {
        match stop {
            Stop::Io(e) => {
                tracing::error!(error = %e, "journal write failed: refusing new requests");
            }
            Stop::Replica(why) => {
                tracing::error!(error = %why, "journal batch not replicated: refusing new requests");
            }
            Stop::Full(f) => {
                tracing::error!(
                    dir = %self.config.dir.display(),
                    bytes = f.bytes,
                    needed = f.needed,
                    size_max_bytes = self.config.size_max_bytes,
                    "journal at its size bound (journal.size_max_bytes) with no segment old \
                     enough to prune: refusing new requests"
                );
                metrics::counter!("switchyard_journal_full_total").increment(1);
                self.full.store(true, Ordering::Release);
            }
        }
        self.stop();
    }

    /// Marks the journal failed and wakes the waiters to see it.
    fn stop(&self) {
        self.point.fail();
    }

    /// Publishes what is durable: written here, and confirmed by the replica
    /// when there is one.
    fn publish_durable(&mut self) -> Result<(), Stop> {
        let durable = match &self.config.replica {
            None => self.local_seq,
            Some(r) => self.local_seq.min(r.confirmed().map_err(Stop::Replica)?),
        };
        if durable > self.published_seq {
            self.published_seq = durable;
            self.point.publish(durable, &mut self.woken);
        }
        Ok(())
    }

    fn add(&mut self, (seq, entry): (u64, Entry), newest: &mut u64) -> u64 {
        if self.buf.is_empty() {
            self.batch_first_seq = seq;
        }
        let unix_ms = if entry.unix_ms == 0 {
            self.batch_unix_ms
        } else {
            entry.unix_ms
        };
        *newest = (*newest).max(unix_ms);
        let r = Record {
            seq,
            kind: entry.kind,
            protected: entry.protected,
            request_id: entry.request_id,
            unix_ms,
            body: &[],
        };
        let head = &entry.head.0[..usize::from(entry.head.1)];
        record::encode_parts(&mut self.buf, &r, &[head, &entry.message]);
        seq
    }

    fn commit(&mut self, last_seq: u64, newest_unix_ms: u64) -> Result<(), Stop> {
        let dir = self.config.dir.clone();
        let io = |source| JournalError::Io {
            path: dir.clone(),
            source,
        };
        // Positioned: the file may be longer than what was written (reserved).
        let reserved = self.segments.current.as_ref().map_or(0, |c| c.bytes);
        let sync = self.config.fsync == Fsync::Batch;
        if let Some(r) = &self.config.replica {
            r.send(&self.buf);
        }
        self.file
            .commit(&mut self.buf, self.segment_bytes, reserved, sync)
            .map_err(io)?;
        // Indexed before it counts as durable: a reader waits for that.
        let at = self.segment_bytes;
        if self.points.due(at) {
            if let Some(current) = &self.segments.current {
                self.lookup.note(&current.path, self.batch_first_seq, at);
            }
        }
        self.segment_bytes += self.buf.len() as u64;
        self.buf.clear();
        self.local_seq = last_seq;
        self.publish_durable()?;
        self.segments.wrote(self.segment_bytes, newest_unix_ms);
        if self.segment_bytes >= self.config.segment_size_max_bytes {
            self.rotate(last_seq + 1, crate::clock::unix_ms())?;
        }
        Ok(())
    }

    /// Closes the current segment, prunes, and starts the segment of `first_seq`.
    fn rotate(&mut self, first_seq: u64, now_ms: u64) -> Result<(), Stop> {
        self.segments.close_current();
        let reserve = self.config.segment_size_max_bytes;
        self.segments
            .prune(&self.config, now_ms, reserve)
            .map_err(Stop::Full)?;
        let path = segment_path(&self.config.dir, first_seq);
        let (file, path, bytes) = match self.spare.take(&path, reserve) {
            Some(file) => {
                metrics::counter!("switchyard_journal_segments_created_total", "how" => "zeroed")
                    .increment(1);
                (file, path, reserve)
            }
            None => {
                metrics::counter!("switchyard_journal_segments_created_total", "how" => "reserved")
                    .increment(1);
                new_segment(&self.config.dir, first_seq, reserve, &mut self.preallocate)?
            }
        };
        self.file = SegmentFile::new(file, &path, self.config.wants_direct());
        self.segment_bytes = 0;
        self.points = Stride::default();
        self.segments.start(path, bytes);
        self.want_spare();
        Ok(())
    }

    /// Asks for the next segment to be made ready when the size bound leaves room
    /// for it beside the segments kept and the current one. Not without syncs
    /// (`fsync = "off"`): there zero-filling would only cost.
    fn want_spare(&self) {
        if self.config.fsync == Fsync::Off {
            return;
        }
        let reserve = self.config.segment_size_max_bytes;
        let s = &self.segments;
        let current = s.current.as_ref().map_or(0, |c| c.bytes);
        if s.closed_bytes + current + reserve <= self.config.size_max_bytes && reserve > 0 {
            self.spare.want(reserve);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::reader::scan;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use switchyard_tools::testkit::TempDir;

    /// A record stamped by the writer (now), so retention keeps it.
    fn entry(i: u64) -> Entry {
        stamped(i, 0)
    }

    fn stamped(i: u64, unix_ms: u64) -> Entry {
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&i.to_le_bytes());
        let kind = RecordKind::ALL[(i % 5) as usize];
        let message = Bytes::from(format!("message {i}").into_bytes());
        Entry {
            kind,
            protected: false,
            request_id: i,
            unix_ms,
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

    /// Small segments, so a few hundred records rotate several times.
    fn small(dir: &Path) -> JournalConfig {
        JournalConfig {
            segment_size_max_bytes: 4_096,
            batch_records_max: 10,
            fsync: Fsync::Off,
            ..JournalConfig::new(dir)
        }
    }

    /// First sequence numbers of the segment files.
    fn firsts(dir: &Path) -> Vec<u64> {
        crate::journal::segments(dir)
            .unwrap()
            .into_iter()
            .map(|(seq, _)| seq)
            .collect()
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
    fn open_with_visits_every_record_once_in_order() {
        let dir = TempDir::new("visit");
        fill(small(&dir.0), 500);
        let mut expected = Vec::new();
        scan(&dir.0, |p, offset, r| {
            expected.push((p.to_owned(), offset, r.seq))
        })
        .unwrap();
        let mut visited = Vec::new();
        let opened = Journal::open_with(small(&dir.0), |p, offset, r| {
            visited.push((p.to_owned(), offset, r.seq))
        })
        .unwrap();
        assert_eq!(visited, expected);
        assert_eq!(visited.len(), 500);
        assert_eq!(opened.recovered.records, 500);
    }

    #[tokio::test]
    async fn rotation_takes_the_zero_filled_spare_when_it_is_ready() {
        let dir = TempDir::new("spare");
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(
            dir.0.join(super::super::spare::SPARE_NAME),
            b"left half filled",
        )
        .unwrap();
        let config = JournalConfig {
            segment_size_max_bytes: 256 * 1024,
            ..JournalConfig::new(&dir.0)
        };
        let journal = Journal::open(config.clone()).unwrap().journal;
        use std::os::unix::fs::MetadataExt;
        let spare = dir.0.join(super::super::spare::SPARE_NAME);
        for round in 0..3u64 {
            while !journal.spare.is_ready() {
                tokio::task::yield_now().await;
            }
            let taken = std::fs::metadata(&spare).unwrap().ino();
            // Fill the current segment past its size: the last commit rotates.
            let mut last = 0;
            let mut written = 0;
            while written < 256 * 1024 {
                let e = entry(round * 10_000 + written as u64);
                written += record::LEN_BYTES + record::FIXED_BYTES + 8 + e.message.len();
                last = journal.append(e).unwrap();
            }
            assert!(journal.wait_durable(last).await);
            // The rotation follows the commit.
            let newest = loop {
                let segments = crate::journal::segments(&dir.0).unwrap();
                if segments.len() == round as usize + 2 {
                    break segments.last().unwrap().1.clone();
                }
                tokio::task::yield_now().await;
            };
            assert_eq!(std::fs::metadata(newest).unwrap().ino(), taken, "the spare");
        }
        let segments = crate::journal::segments(&dir.0).unwrap();
        assert_eq!(segments.len(), 4, "{segments:?}");
        drop(journal);
        let reopened = Journal::open(config).unwrap();
        assert!(reopened.recovered.torn_tail.is_none());
        assert!(reopened.recovered.records > 0);
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

    /// Where the last record of `segment` ends.
    fn valid_end(dir: &Path, segment: &Path) -> u64 {
        let mut end = 0;
        scan(dir, |p, offset, r| {
            if p == segment {
                end = offset + (record::LEN_BYTES + record::FIXED_BYTES + r.body.len()) as u64;
            }
        })
        .unwrap();
        end
    }

    #[test]
    fn preallocated_segments_reopen_cleanly_and_give_back_their_reservation() {
        let dir = TempDir::new("prealloc");
        let config = JournalConfig {
            segment_size_max_bytes: 1 << 20,
            ..JournalConfig::new(&dir.0)
        };
        fill(config.clone(), 100);
        let segment = last_segment(&dir.0);
        let valid = valid_end(&dir.0, &segment);
        if std::fs::metadata(&segment).unwrap().len() == valid {
            // A filesystem without fallocate: make the reservation's zeros by hand.
            let f = OpenOptions::new().write(true).open(&segment).unwrap();
            f.set_len(1 << 20).unwrap();
        }
        assert!(std::fs::metadata(&segment).unwrap().len() > valid);

        let opened = Journal::open(config.clone()).unwrap();
        assert!(
            opened.recovered.torn_tail.is_none(),
            "zeros are no torn tail"
        );
        assert_eq!(opened.recovered.records, 100);
        assert_eq!(opened.recovered.seq_range, Some((1, 100)));
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            valid,
            "the unused reservation is given back"
        );
        let current = dir
            .0
            .join(format!("{SEGMENT_PREFIX}{:020}{SEGMENT_SUFFIX}", 101));
        let (count, bytes) = opened.journal.disk_usage();
        assert_eq!(count, 2);
        assert_eq!(bytes, valid + std::fs::metadata(&current).unwrap().len());
        assert_eq!(opened.journal.append(entry(7)), Ok(101));
        opened.journal.close();
        drop(opened);

        let again = Journal::open(config).unwrap();
        assert!(again.recovered.torn_tail.is_none());
        assert_eq!(again.recovered.seq_range, Some((1, 101)));
        assert_eq!(again.journal.append(entry(8)), Ok(102));
    }

    #[test]
    fn torn_tail_is_truncated_and_reported() {
        // A torn record followed by the zeros of the reservation, and one at the
        // very end of the file.
        for zeros_after in [true, false] {
            let dir = TempDir::new("torn");
            fill(JournalConfig::new(&dir.0), 100);
            let segment = last_segment(&dir.0);
            let good_len = valid_end(&dir.0, &segment);
            let mut torn = Vec::new();
            let r = Record {
                seq: 101,
                kind: RecordKind::Outcome,
                protected: false,
                request_id: 1,
                unix_ms: 2,
                body: b"xyz",
            };
            record::encode(&mut torn, &r);
            torn.truncate(torn.len() / 2);
            let f = OpenOptions::new().write(true).open(&segment).unwrap();
            if zeros_after {
                f.set_len(good_len + 4_096).unwrap();
            } else {
                f.set_len(good_len).unwrap();
            }
            f.write_all_at(&torn, good_len).unwrap();
            drop(f);
            let file_len = std::fs::metadata(&segment).unwrap().len();
            let opened = Journal::open(JournalConfig::new(&dir.0)).unwrap();
            let tail = opened
                .recovered
                .torn_tail
                .clone()
                .expect("torn tail reported");
            assert_eq!(
                (tail.segment.as_path(), tail.offset, tail.bytes),
                (segment.as_path(), good_len, file_len - good_len)
            );
            assert_eq!(opened.recovered.records, 100);
            assert_eq!(
                std::fs::metadata(&segment).unwrap().len(),
                good_len,
                "truncated"
            );
            assert_eq!(opened.journal.append(entry(7)), Ok(101));
        }
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

    const DAY_MS: u64 = 86_400_000;

    #[test]
    fn rotation_prunes_closed_segments_past_retention() {
        let dir = TempDir::new("age-rotate");
        let opened = Journal::open(small(&dir.0)).unwrap();
        let old = crate::clock::unix_ms() - 3 * DAY_MS;
        for i in 0..300 {
            opened.journal.append(stamped(i, old + i)).unwrap();
        }
        for i in 300..600 {
            opened.journal.append(entry(i)).unwrap();
        }
        opened.journal.close();
        let mut per_segment: Vec<(PathBuf, u64)> = Vec::new();
        let s = scan(&dir.0, |p, _, r| match per_segment.last_mut() {
            Some((q, newest)) if q == p => *newest = (*newest).max(r.unix_ms),
            _ => per_segment.push((p.to_owned(), r.unix_ms)),
        })
        .unwrap();
        let (first, last) = s.seq_range.unwrap();
        assert!(first > 1, "segments of old records only were pruned");
        assert!(first <= 301, "no recent record was: first left {first}");
        assert_eq!(last, 600);
        let recent = crate::clock::unix_ms() - DAY_MS;
        assert!(per_segment.iter().all(|(_, newest)| *newest > recent));
    }

    #[test]
    fn open_prunes_by_age_against_the_time_given() {
        let dir = TempDir::new("age-open");
        fill(small(&dir.0), 500);
        let before = firsts(&dir.0);
        assert!(before.len() > 3);
        // Today: every segment is recent; nothing goes.
        let opened =
            Journal::open_at(small(&dir.0), |_, _, _| {}, crate::clock::unix_ms()).unwrap();
        opened.journal.close();
        drop(opened);
        // (An empty last segment, left by a rotation at the end, is pruned and
        // made again under the same name.)
        let mut kept = before.clone();
        if kept.last() != Some(&501) {
            kept.push(501);
        }
        assert_eq!(firsts(&dir.0), kept);
        // Three days on: the records are still visited, then every closed
        // segment is pruned; the new one is kept.
        let mut visited = 0;
        let later = crate::clock::unix_ms() + 3 * DAY_MS;
        let opened = Journal::open_at(small(&dir.0), |_, _, _| visited += 1, later).unwrap();
        assert_eq!(visited, 500);
        assert_eq!(firsts(&dir.0), vec![501]);
        assert_eq!(opened.journal.disk_usage().0, 1);
        opened.journal.close();
        drop(opened);
        // Only an empty segment is left: the sequence still goes on.
        let opened = Journal::open(small(&dir.0)).unwrap();
        assert_eq!(opened.recovered.seq_range, None);
        assert_eq!(opened.next_seq, 501);
        assert_eq!(firsts(&dir.0), vec![501]);
        assert_eq!(opened.journal.append(entry(1)), Ok(501));
    }

    #[tokio::test]
    async fn size_bound_prunes_earlier_opens_only_then_refuses() {
        let dir = TempDir::new("size");
        let config = JournalConfig {
            size_max_bytes: 8 * 4_096,
            ..small(&dir.0)
        };
        fill(config.clone(), 300);
        let earlier = firsts(&dir.0);
        assert!(earlier.len() >= 3, "{earlier:?}");
        let opened = Journal::open(config.clone()).unwrap();
        let first = opened.recovered.seq_range.unwrap().1 + 1;
        let mut expected = earlier.clone();
        if expected.last() != Some(&first) {
            expected.push(first); // else an empty one was pruned and made again
        }
        assert_eq!(firsts(&dir.0), expected, "room at open: nothing pruned");
        let mut refused = None;
        for i in 0..10_000 {
            match opened.journal.append(entry(i)) {
                Ok(seq) => {
                    if !opened.journal.wait_durable(seq).await {
                        break;
                    }
                }
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        assert!(matches!(refused, None | Some(AppendError::SizeBound)));
        assert!(opened.journal.is_full() && opened.journal.has_failed());
        assert_eq!(opened.journal.append(entry(0)), Err(AppendError::SizeBound));
        let durable = opened.journal.durable();
        let (_, bytes) = opened.journal.disk_usage();
        // The bound holds but for the last segment's overshoot (one batch).
        assert!(bytes <= config.size_max_bytes + 10 * 100, "{bytes}");
        opened.journal.close();
        drop(opened);
        // Every segment of earlier opens went first, none of this one's, so every
        // durable record of this open is still there.
        let left = firsts(&dir.0);
        assert!(left.iter().all(|s| *s >= first), "{left:?}");
        let s = scan(&dir.0, |_, _, _| {}).unwrap();
        assert_eq!(s.seq_range, Some((first, durable)));
        assert_eq!(s.records, durable - first + 1);
    }

    #[test]
    fn no_room_at_open_is_a_typed_error() {
        let dir = TempDir::new("size-open");
        let config = JournalConfig {
            size_max_bytes: 4_095,
            ..small(&dir.0)
        };
        let err = Journal::open(config).err().expect("refused");
        assert!(matches!(err, JournalError::Full { .. }), "{err}");
    }

    /// Files of the given sizes in `dir`, as closed segments.
    fn closed(dir: &Path, specs: &[(u64, u64, bool)]) -> Segments {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = Segments {
            dir: dir.to_owned(),
            closed: VecDeque::new(),
            closed_bytes: 0,
            current: None,
            usage: Arc::default(),
            lookup: Arc::default(),
            first_seq_max: 0,
        };
        for (i, &(bytes, newest_unix_ms, this_open)) in specs.iter().enumerate() {
            let path = dir.join(format!("{SEGMENT_PREFIX}{:020}{SEGMENT_SUFFIX}", i + 1));
            std::fs::File::create(&path)
                .unwrap()
                .write_all(&vec![0; bytes as usize])
                .unwrap();
            s.closed_bytes += bytes;
            s.closed.push_back(Segment {
                path,
                bytes,
                newest_unix_ms,
                this_open,
            });
        }
        s
    }

    #[test]
    fn prune_by_age_takes_closed_segments_older_than_retention_only() {
        let dir = TempDir::new("prune-age");
        let config = JournalConfig {
            retention: Duration::from_secs(3_600),
            ..JournalConfig::new(&dir.0)
        };
        let now = 10 * DAY_MS;
        let hour = 3_600_000;
        let mut s = closed(
            &dir.0,
            &[
                (10, now - 2 * hour, false),
                (10, now - hour + 1, false),
                (10, now - 3 * hour, true),
                (10, now, true),
            ],
        );
        s.start(dir.0.join("current"), 10);
        s.current.as_mut().unwrap().newest_unix_ms = 1; // ancient, but written to
        s.prune(&config, now, 0).unwrap();
        assert_eq!(firsts(&dir.0), vec![2, 4]);
        assert_eq!(s.closed.len(), 2);
        assert_eq!(s.closed_bytes, 20);
        assert_eq!(s.usage.segments.load(Ordering::Relaxed), 3);
        assert_eq!(s.usage.bytes.load(Ordering::Relaxed), 30);
    }

    #[test]
    fn prune_by_size_takes_earlier_opens_oldest_first_and_says_when_full() {
        let dir = TempDir::new("prune-size");
        let config = JournalConfig {
            size_max_bytes: 100,
            ..JournalConfig::new(&dir.0)
        };
        let now = crate::clock::unix_ms();
        let mut s = closed(
            &dir.0,
            &[
                (30, now, false),
                (30, now, false),
                (30, now, true),
                (30, now, true),
            ],
        );
        // 120 + 10 > 100: the oldest goes, 90 + 10 fits.
        s.prune(&config, now, 10).unwrap();
        assert_eq!(firsts(&dir.0), vec![2, 3, 4]);
        // 90 + 40: the other earlier one goes; 60 + 40 fits.
        s.prune(&config, now, 40).unwrap();
        assert_eq!(firsts(&dir.0), vec![3, 4]);
        // 60 + 50: nothing of this open may go.
        assert_eq!(
            s.prune(&config, now, 50),
            Err(Full {
                bytes: 60,
                needed: 50
            })
        );
        assert_eq!(firsts(&dir.0), vec![3, 4]);
    }
}
