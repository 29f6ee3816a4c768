//! Reading a journal directory: every segment in order, every record checked.
//!
//! Segments are preallocated (their space reserved, and their length set, when
//! they are created), so a run of zero bytes from right after a valid record to the
//! end of a segment is that segment's clean end, in any segment.
//!
//! A torn tail (the last segment ends inside a record, or in a record followed only
//! by zero bytes, as a crash during a group commit leaves it) is reported and can be
//! truncated. Anything else that fails its checks is corruption: reading stops with
//! an error naming the segment and the byte offset; nothing is skipped silently.

use super::record::{self, Record, RecordError, RecordKind};
use std::path::{Path, PathBuf};

/// Segment file names: `journal-<first seq, 20 digits>.wal`.
pub const SEGMENT_PREFIX: &str = "journal-";
/// Segment file extension.
pub const SEGMENT_SUFFIX: &str = ".wal";

/// Why a journal cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file or the directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A record that fails its checks before the end of the journal.
    #[error("{segment}: corrupt record at byte {offset}: {problem}")]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Byte offset of the record in the segment.
        offset: u64,
        /// What is wrong.
        problem: String,
    },
    /// The segments kept leave no room for a new one within `size_max_bytes`.
    #[error(
        "{dir}: journal at its size bound: {bytes} bytes of segments kept, {needed} more \
         needed, bound {size_max} (journal.size_max_bytes)"
    )]
    Full {
        /// The journal directory.
        dir: PathBuf,
        /// Bytes of the segments that may not be pruned.
        bytes: u64,
        /// Bytes a new segment needs.
        needed: u64,
        /// The bound.
        size_max: u64,
    },
}

/// The end of the last segment that holds an incomplete record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The segment.
    pub segment: PathBuf,
    /// Where the incomplete record starts (the segment's valid length).
    pub offset: u64,
    /// Bytes from there to the end of the file.
    pub bytes: u64,
    /// What was found there.
    pub problem: RecordError,
}

/// What a scan found.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Segments read.
    pub segments: usize,
    /// Valid records.
    pub records: u64,
    /// Valid records by kind, in [`RecordKind::ALL`] order.
    pub by_kind: [u64; 5],
    /// Sequence numbers of the first and last valid records.
    pub seq_range: Option<(u64, u64)>,
    /// The torn tail, if any.
    pub torn_tail: Option<TornTail>,
}

/// The segment files of `dir`, ordered by their first sequence number.
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let io = |source| JournalError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let seq = name
            .strip_prefix(SEGMENT_PREFIX)
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every record of the journal in `dir` in order, calling `visit` with the
/// segment, the record's offset in it, and the record.
pub fn scan(
    dir: &Path,
    mut visit: impl FnMut(&Path, u64, &Record<'_>),
) -> Result<Scan, JournalError> {
    let files = segments(dir)?;
    let mut scan = Scan {
        segments: files.len(),
        ..Scan::default()
    };
    let last = files.len().saturating_sub(1);
    for (index, (_, path)) in files.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(|source| JournalError::Io {
            path: path.clone(),
            source,
        })?;
        let mut offset = 0usize;
        loop {
            match record::decode(&bytes[offset..]) {
                Ok(None) => break,
                Ok(Some((r, size))) => {
                    check_order(&mut scan, path, offset, &r)?;
                    visit(path, offset as u64, &r);
                    offset += size;
                }
                // The unused part of the segment's reservation: its clean end.
                Err(_) if bytes[offset..].iter().all(|&b| b == 0) => break,
                Err(e) if index == last && is_torn(&bytes[offset..], e) => {
                    let rest = (bytes.len() - offset) as u64;
                    let segment = path.clone();
                    let torn = TornTail {
                        segment,
                        offset: offset as u64,
                        bytes: rest,
                        problem: e,
                    };
                    scan.torn_tail = Some(torn);
                    break;
                }
                Err(e) => {
                    let segment = path.clone();
                    let problem = e.to_string();
                    return Err(JournalError::Corrupt {
                        segment,
                        offset: offset as u64,
                        problem,
                    });
                }
            }
        }
    }
    Ok(scan)
}

/// Reads records held whole in `bytes` (a replicated batch, say), which lie at
/// `base` in the segment `path`: each is checked, counted into `scan` and given to
/// `visit` with its offset, as [`scan`] would. Unlike a segment's end, anything
/// that is not a whole valid record is corruption here.
pub fn scan_bytes(
    scan: &mut Scan,
    path: &Path,
    base: u64,
    bytes: &[u8],
    mut visit: impl FnMut(&Path, u64, &Record<'_>),
) -> Result<(), JournalError> {
    let mut offset = 0usize;
    while offset < bytes.len() {
        let corrupt = |problem: String| JournalError::Corrupt {
            segment: path.to_owned(),
            offset: base + offset as u64,
            problem,
        };
        match record::decode(&bytes[offset..]) {
            Ok(Some((r, size))) => {
                check_order(scan, path, base as usize + offset, &r)?;
                visit(path, base + offset as u64, &r);
                offset += size;
            }
            Ok(None) => break,
            Err(e) => return Err(corrupt(e.to_string())),
        }
    }
    Ok(())
}

fn check_order(
    scan: &mut Scan,
    path: &Path,
    offset: usize,
    r: &Record<'_>,
) -> Result<(), JournalError> {
    let first = match scan.seq_range {
        Some((_, last)) if r.seq <= last => {
            let problem = format!("sequence {} after {last}: expected it to grow", r.seq);
            let segment = path.to_owned();
            return Err(JournalError::Corrupt {
                segment,
                offset: offset as u64,
                problem,
            });
        }
        Some((first, _)) => first,
        None => r.seq,
    };
    scan.seq_range = Some((first, r.seq));
    scan.records += 1;
    if let Some(i) = RecordKind::ALL.iter().position(|k| *k == r.kind) {
        scan.by_kind[i] += 1;
    }
    Ok(())
}

/// A crash during an append leaves the file ending inside a record, or a record
/// whose bytes were not all written followed by zeros; anything else is corruption.
fn is_torn(rest: &[u8], error: RecordError) -> bool {
    match error {
        RecordError::Truncated { .. } => true,
        RecordError::BadChecksum { .. } | RecordError::BadKind { .. } => {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let end = (record::LEN_BYTES + len).min(rest.len());
            rest[end..].iter().all(|&b| b == 0)
        }
        RecordError::BadLength { .. } => rest[record::LEN_BYTES.min(rest.len())..]
            .iter()
            .all(|&b| b == 0),
    }
}

/// Cuts a torn tail off its segment and makes that durable.
pub fn truncate(torn: &TornTail) -> Result<(), JournalError> {
    let io = |source| JournalError::Io {
        path: torn.segment.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&torn.segment)
        .map_err(io)?;
    file.set_len(torn.offset).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_tools::testkit::TempDir;

    /// Records `seqs` encoded back to back.
    fn records(seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in seqs {
            let r = Record {
                seq,
                kind: RecordKind::Accepted,
                protected: false,
                request_id: seq,
                unix_ms: 1,
                body: b"12345678 message",
            };
            record::encode(&mut out, &r);
        }
        out
    }

    /// Writes segment files (first seq, bytes) into a fresh directory.
    fn journal(name: &str, files: &[(u64, Vec<u8>)]) -> TempDir {
        let dir = TempDir::new(name);
        std::fs::create_dir_all(&dir.0).unwrap();
        for (first, bytes) in files {
            let name = format!("{SEGMENT_PREFIX}{first:020}{SEGMENT_SUFFIX}");
            std::fs::write(dir.0.join(name), bytes).unwrap();
        }
        dir
    }

    fn zeros(mut bytes: Vec<u8>, n: usize) -> Vec<u8> {
        bytes.resize(bytes.len() + n, 0);
        bytes
    }

    #[test]
    fn zeros_after_the_last_record_end_any_segment_cleanly() {
        let dir = journal(
            "zeros",
            &[
                (1, zeros(records(1..=10), 5_000)),
                (11, zeros(Vec::new(), 4_096)), // reserved, never written
                (21, zeros(records(21..=30), 3)),
                (31, zeros(records(31..=40), 70_000)),
                (41, Vec::new()),
            ],
        );
        let s = scan(&dir.0, |_, _, _| {}).unwrap();
        assert_eq!((s.records, s.seq_range), (30, Some((1, 40))));
        assert!(s.torn_tail.is_none());
    }

    #[test]
    fn a_partial_record_before_the_zeros_is_a_torn_tail_in_the_last_segment_only() {
        let whole = records(1..=10);
        let partial = records(11..=11);
        let mut torn = whole.clone();
        torn.extend_from_slice(&partial[..partial.len() - 5]);
        let torn = zeros(torn, 4_096);
        let dir = journal("torn-zeros", &[(1, torn.clone())]);
        let s = scan(&dir.0, |_, _, _| {}).unwrap();
        let tail = s.torn_tail.expect("torn tail");
        assert_eq!(tail.offset, whole.len() as u64);
        assert_eq!(tail.bytes, (torn.len() - whole.len()) as u64);
        assert_eq!(s.records, 10);

        // Only its length field written, then zeros.
        let mut len_only = whole.clone();
        len_only.extend_from_slice(&partial[..4]);
        let dir = journal("torn-len", &[(1, zeros(len_only, 4_096))]);
        let s = scan(&dir.0, |_, _, _| {}).unwrap();
        assert_eq!(s.torn_tail.unwrap().offset, whole.len() as u64);

        // The same before a later segment is corruption.
        let dir = journal("torn-middle", &[(1, torn), (11, records(11..=12))]);
        let err = scan(&dir.0, |_, _, _| {}).unwrap_err();
        assert!(
            matches!(err, JournalError::Corrupt { offset, .. } if offset == whole.len() as u64),
            "{err}"
        );
    }

    #[test]
    fn data_after_the_zeros_is_corruption() {
        let mut bytes = zeros(records(1..=10), 100);
        bytes.extend_from_slice(&records(11..=11));
        let dir = journal("zeros-then-data", &[(1, bytes), (12, records(12..=12))]);
        assert!(matches!(
            scan(&dir.0, |_, _, _| {}),
            Err(JournalError::Corrupt { .. })
        ));
    }
}
