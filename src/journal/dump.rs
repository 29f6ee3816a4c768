//! `switchyard journal verify` and `journal dump`: read-only views of a journal.

use super::reader::{scan, JournalError, Scan};
use super::record::{Record, RecordKind};
use crate::wire::{field_for_log, Dialect, Message};
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

/// `switchyard journal verify`: every record of every segment checked; what the
/// journal holds and what is left unfinished in it.
pub fn verify(dir: &Path) -> Result<String, super::JournalError> {
    let (s, recovery) = super::recovery::recover(dir)?;
    Ok(format!(
        "{}\n{}",
        report(dir, &s),
        super::recovery::summary(&recovery)
    ))
}

/// A one-paragraph account of a scan: segments, records, torn tail.
pub fn report(dir: &Path, s: &Scan) -> String {
    let mut out = format!(
        "journal {}: {} segments, {} records",
        dir.display(),
        s.segments,
        s.records
    );
    if let Some((first, last)) = s.seq_range {
        let _ = write!(out, ", sequence {first}..={last}");
    }
    let kinds: Vec<String> = RecordKind::ALL
        .iter()
        .zip(s.by_kind)
        .map(|(k, n)| format!("{} {n}", k.as_str()))
        .collect();
    let _ = write!(out, " ({})", kinds.join(", "));
    match &s.torn_tail {
        Some(t) => {
            let _ = write!(
                out,
                "\ntorn tail: {} bytes at byte {} of {} ({}); the switch truncates it at start",
                t.bytes,
                t.offset,
                t.segment.display(),
                t.problem
            );
        }
        None => out.push_str("\nno torn tail; every record checked"),
    }
    out
}

/// Writes every record to `out`, one per line (JSON objects with `json`), with the
/// ISO 8583 message decoded under `dialect` and card numbers masked.
pub fn dump(
    dir: &Path,
    dialect: &Dialect,
    json: bool,
    out: &mut dyn Write,
) -> Result<Scan, JournalError> {
    let mut failed = None;
    let s = scan(dir, |_, _, r| {
        if failed.is_none() {
            let line = if json {
                json_line(r, dialect)
            } else {
                text_line(r, dialect)
            };
            if let Err(e) = writeln!(out, "{line}") {
                failed = Some(e);
            }
        }
    })?;
    if let Some(source) = failed {
        return Err(JournalError::Io {
            path: "<stdout>".into(),
            source,
        });
    }
    Ok(s)
}

/// A record's head, its message, and (protected form) the masked PAN kept
/// in place of DE2: the message of a protected record is shown without its
/// trailer, the PAN only masked (the dump holds no key).
fn split<'a>(r: &Record<'a>) -> (&'a [u8], &'a [u8], Option<&'a [u8]>) {
    let (head, message) = r.body.split_at(r.kind.head_len().min(r.body.len()));
    if !r.protected {
        return (head, message, None);
    }
    match crate::journal::protect::message_part(message) {
        Some((message, masked)) => (head, message, Some(masked).filter(|m| !m.is_empty())),
        None => (head, b"", None),
    }
}

fn text_line(r: &Record<'_>, dialect: &Dialect) -> String {
    let (head, message, masked) = split(r);
    let mut line = format!(
        "{} {} request={} at={}ms",
        r.seq,
        r.kind.as_str(),
        r.request_id,
        r.unix_ms
    );
    if !head.is_empty() {
        let _ = write!(line, " head={}", hex(head));
    }
    if r.protected {
        line.push_str(" protected");
    }
    if let Some(masked) = masked {
        let _ = write!(line, " pan={}", String::from_utf8_lossy(masked));
    }
    if !message.is_empty() {
        match Message::decode_canonical(dialect, bytes::Bytes::copy_from_slice(message)) {
            Ok(m) => {
                let _ = write!(line, " {m:?}");
            }
            Err(e) => {
                let _ = write!(
                    line,
                    " <{} bytes, not {}: {e}>",
                    message.len(),
                    dialect.name()
                );
            }
        }
    }
    line
}

fn json_line(r: &Record<'_>, dialect: &Dialect) -> String {
    let (head, message, masked) = split(r);
    let mut v = serde_json::json!({
        "seq": r.seq,
        "kind": r.kind.as_str(),
        "request_id": r.request_id,
        "unix_ms": r.unix_ms,
        "head": hex(head),
    });
    if r.protected {
        v["protected"] = true.into();
    }
    if let Some(masked) = masked {
        v["pan"] = String::from_utf8_lossy(masked).into();
    }
    if !message.is_empty() {
        match Message::decode_canonical(dialect, bytes::Bytes::copy_from_slice(message)) {
            Ok(m) => {
                let fields: serde_json::Map<String, serde_json::Value> = m
                    .fields()
                    .map(|(n, value)| {
                        let shown = field_for_log(n, value).to_string();
                        let plain = shown.strip_prefix('"').and_then(|s| s.strip_suffix('"'));
                        (n.to_string(), plain.unwrap_or(&shown).into())
                    })
                    .collect();
                v["mti"] = m.mti().to_string().into();
                v["fields"] = fields.into();
            }
            Err(e) => v["undecodable"] = e.to_string().into(),
        }
    }
    v.to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Entry, Journal, JournalConfig};
    use crate::wire::{Encoder, Mti};
    use bytes::BytesMut;
    use switchyard_tools::testkit::TempDir;

    #[test]
    fn dump_masks_card_numbers_and_verify_counts() {
        let dir = TempDir::new("dump");
        let d = Dialect::iso87_ascii();
        let mut msg = BytesMut::new();
        let mut enc = Encoder::new(&d, &mut msg, Mti::FINANCIAL);
        for (n, v) in [
            (2u8, &b"4111111111111111"[..]),
            (4, b"000000001000"),
            (11, b"000042"),
        ] {
            enc.field(n, v).unwrap();
        }
        enc.finish();
        let opened = Journal::open(JournalConfig::new(&dir.0)).unwrap();
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&100_001u64.to_le_bytes());
        let entry = Entry {
            kind: RecordKind::Accepted,
            protected: false,
            request_id: 9,
            unix_ms: 1,
            head: (head, 8),
            message: msg.freeze(),
        };
        opened.journal.append(entry).unwrap();
        opened.journal.close();
        for json in [false, true] {
            let mut out = Vec::new();
            let s = dump(&dir.0, &d, json, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("411111******1111"), "{text}");
            assert!(!text.contains("4111111111111111"), "{text}");
            assert!(text.contains("000042"), "{text}");
            assert_eq!(s.records, 1);
            if json {
                let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
                assert_eq!(v["kind"], "accepted");
                assert_eq!(v["fields"]["4"], "000000001000");
            }
        }
        let s = scan(&dir.0, |_, _, _| {}).unwrap();
        assert!(report(&dir.0, &s).contains("1 records"));
    }
}
