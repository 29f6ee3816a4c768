//! Reading one record back by its sequence number: a sparse index of where records
//! lie (a point at least every [`POINT_STRIDE_BYTES`] of each segment, kept by the
//! writer as it commits and by the scan at open), then one bounded read and a
//! forward scan from the nearest point.
//!
//! The duplicates table keeps no bank answer when there is a journal: the answer
//! to a retransmission is read back from its outcome record here. Retransmissions
//! are rare, so a read is a file open, at most [`POINT_STRIDE_BYTES`] plus one
//! record read, and no cache.

use super::reader::JournalError;
use super::record::{self, RecordKind, RECORD_LEN_MAX_BYTES};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Bytes between index points of a segment at least (256 KiB: a 64 MiB segment has
/// 256 points, 4 KiB of index; a read scans at most this much).
pub const POINT_STRIDE_BYTES: u64 = 256 * 1024;

/// Bytes read at a time while scanning forward: room for the largest record.
const READ_CHUNK_BYTES: usize = 2 * (record::LEN_BYTES + RECORD_LEN_MAX_BYTES);

/// When the next index point of a segment is due: at its first record, then at the
/// first record a stride past the last point. One per segment being read or
/// written (a fresh one for each segment).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stride(Option<u64>);

impl Stride {
    /// Whether a record at `offset` takes a point (and if so, it counts as taken).
    pub fn due(&mut self, offset: u64) -> bool {
        let due = self.0.is_none_or(|at| offset >= at + POINT_STRIDE_BYTES);
        if due {
            self.0 = Some(offset);
        }
        due
    }
}

/// A segment's index: its first sequence number, its file, and its points
/// (sequence number, byte offset of that record), ascending.
struct Indexed {
    first_seq: u64,
    path: PathBuf,
    points: Vec<(u64, u64)>,
}

/// Where the journal's records lie, segment by segment, oldest first.
#[derive(Default)]
pub struct Lookup {
    segments: Mutex<Vec<Indexed>>,
}

impl Lookup {
    /// An empty index.
    pub fn new() -> Lookup {
        Lookup::default()
    }

    /// Adds an index point: record `seq` lies at `offset` of the segment `path`.
    /// Points must come in journal order, and where a [`Stride`] says one is due.
    pub fn note(&self, path: &Path, seq: u64, offset: u64) {
        let mut segments = crate::sync::lock(&self.segments);
        match segments.last_mut() {
            Some(s) if s.path == path => s.points.push((seq, offset)),
            _ => segments.push(Indexed {
                first_seq: seq,
                path: path.to_owned(),
                points: vec![(seq, offset)],
            }),
        }
    }

    /// Forgets a segment that was deleted.
    pub fn forget(&self, path: &Path) {
        crate::sync::lock(&self.segments).retain(|s| s.path != path);
    }

    /// Where to start looking for record `seq`: the segment and the offset of the
    /// nearest point at or before it.
    fn start(&self, seq: u64) -> Option<(PathBuf, u64)> {
        let segments = crate::sync::lock(&self.segments);
        let i = segments
            .partition_point(|s| s.first_seq <= seq)
            .checked_sub(1)?;
        let s = &segments[i];
        let p = s
            .points
            .partition_point(|&(at, _)| at <= seq)
            .checked_sub(1)?;
        Some((s.path.clone(), s.points[p].1))
    }

    /// Record `seq`'s kind and body (its message after the kind's head), or `None`
    /// when the journal no longer (or never) held it.
    pub fn read(&self, seq: u64) -> Result<Option<(RecordKind, bool, Vec<u8>)>, JournalError> {
        let Some((path, mut offset)) = self.start(seq) else {
            return Ok(None);
        };
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        loop {
            let n = read_at_most(&file, &mut buf, offset).map_err(io)?;
            let mut at = 0;
            while let Ok(Some((r, size))) = record::decode(&buf[at..n]) {
                if r.seq == seq {
                    let body = r.body.get(r.kind.head_len()..).unwrap_or_default();
                    return Ok(Some((r.kind, r.protected, body.to_vec())));
                }
                if r.seq > seq {
                    return Ok(None);
                }
                at += size;
            }
            // A record cut by the chunk's end is read again whole; anything else
            // (zeros after the last record, the end of the file) ends the search.
            if at == 0 || n < buf.len() {
                return Ok(None);
            }
            offset += at as u64;
        }
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Entry, Journal, JournalConfig};
    use bytes::Bytes;
    use switchyard_tools::testkit::TempDir;

    fn outcome(i: u64) -> Entry {
        Entry {
            kind: RecordKind::Outcome,
            protected: false,
            request_id: i,
            unix_ms: 0,
            head: ([b'0', b'0', 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 3),
            message: Bytes::from(format!("answer {i:0>300}").into_bytes()),
        }
    }

    #[tokio::test]
    async fn every_record_is_found_by_its_seq_while_written_and_after_reopen() {
        let dir = TempDir::new("lookup");
        let mut config = JournalConfig::new(dir.path());
        config.segment_size_max_bytes = 1 << 20; // several segments, many points
        let journal = Journal::open(config.clone()).unwrap().journal;
        let seqs: Vec<u64> = (0..8_000)
            .map(|i| journal.append(outcome(i)).unwrap())
            .collect();
        assert!(journal.wait_durable(*seqs.last().unwrap()).await);
        let check = |lookup: &Lookup| {
            for (i, &seq) in seqs.iter().enumerate().step_by(97) {
                let (kind, _, body) = lookup.read(seq).unwrap().expect("found");
                assert_eq!(kind, RecordKind::Outcome);
                assert_eq!(body, format!("answer {i:0>300}").into_bytes());
            }
            assert!(lookup.read(seqs.last().unwrap() + 10).unwrap().is_none());
        };
        check(journal.lookup());
        drop(journal);
        let reopened = Journal::open(config).unwrap().journal;
        check(reopened.lookup());
    }
}
