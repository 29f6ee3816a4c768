//! Checks the switch's fuzz targets run (`fuzz/switch/fuzz_targets/*.rs` are thin
//! wrappers around [`config_parse`] and [`journal_records`]), shared with
//! `tests/fuzz_corpus.rs` so every committed corpus file also runs under `cargo
//! test`. Built with the `fuzzing` feature only. Failures are panics, which a
//! fuzzer reports as crashes.

use crate::config::{Config, ConfigError};
use crate::core::route::BankIndex;
use crate::core::InstitutionId;
use crate::journal::record::{
    self, Record, RecordError, RecordKind, FIXED_BYTES, LEN_BYTES, RECORD_LEN_MAX_BYTES,
};
use crate::journal::recovery::{self, Replay};
use crate::wire::Dialect;
use std::collections::BTreeSet;
use std::path::Path;

/// The name a fuzzed config is parsed under (it anchors relative paths at the
/// working directory).
pub const CONFIG_PATH: &str = "fuzz.toml";

/// Offset of a record's body: length, crc, seq, kind, request id, time.
pub const BODY_OFFSET: usize = LEN_BYTES + FIXED_BYTES;

// === fuzz target entry points ===

/// `fuzz_targets/config_parse.rs`: UTF-8 input is parsed as a config file; it must
/// give a config that keeps the loader's promises or a typed error naming the file,
/// never a panic.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new(CONFIG_PATH);
    // The same text as plain TOML: a config parses only if this does.
    let table = text.parse::<toml::Table>().ok();
    if let Some(table) = &table {
        if names_special_dialect_file(table) {
            return;
        }
    }
    match Config::parse(text, path) {
        Ok(config) => match &table {
            Some(table) => check_config(table, &config),
            None => panic!("a config parsed that is not TOML"),
        },
        Err(e) => {
            check_config_error(path, &e);
            // Text that `toml::Table` refuses may still deserialize into the typed
            // config: an integer above i64::MAX fits a u64 key (then range checks
            // refuse it). Either way the error is typed, never I/O.
            if table.is_none() {
                assert!(
                    matches!(e, ConfigError::Toml { .. } | ConfigError::Invalid { .. }),
                    "not TOML, yet the error is {e:?}"
                );
            }
        }
    }
}

/// `fuzz_targets/journal_records.rs`: the input is read as journal records, one
/// after another until an error or its end; then read again with every checksum
/// put right, so that the fuzzer reaches past the CRC. Every record read stays
/// inside the input and re-encodes to its own bytes; every error describes the
/// bytes where it stopped; replaying the records never panics.
pub fn journal_records(data: &[u8]) {
    let raw = walk(data);
    let repaired = with_checksums_repaired(data);
    let fixed = walk(&repaired);
    assert!(
        !matches!(fixed.error, Some((_, RecordError::BadChecksum { .. }))),
        "checksums repaired, yet {:?}",
        fixed.error
    );
    // Valid records carry right checksums already: repairing changes none of them.
    assert!(
        fixed.ends.starts_with(&raw.ends),
        "repairing checksums changed valid records: {:?} vs {:?}",
        raw.ends,
        fixed.ends
    );
    if raw.error.is_none() {
        assert_eq!(repaired, data, "a valid journal needs no repair");
    }
}

// === config ===

/// Whether a `dialect` key names an existing path that is not a small regular
/// file: `Config::parse` reads any dialect that is not a built-in name, and
/// `/dev/zero` or a FIFO would never finish. Such inputs are skipped.
fn names_special_dialect_file(table: &toml::Table) -> bool {
    let switch = table
        .get("switch")
        .and_then(|s| s.get("dialect"))
        .into_iter();
    let banks = table
        .get("bank")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|b| b.get("dialect"));
    switch
        .chain(banks)
        .filter_map(toml::Value::as_str)
        .any(|name| {
            Dialect::builtin(name).is_none()
                && std::fs::metadata(name).is_ok_and(|m| !m.is_file() || m.len() > 1 << 20)
        })
}

/// A typed error names the file it was asked to parse, and parsing text never
/// reads the config file itself.
pub fn check_config_error(path: &Path, e: &ConfigError) {
    match e {
        ConfigError::Io { .. } => panic!("Config::parse reported a read error: {e:?}"),
        ConfigError::Toml { file, .. } => assert_eq!(file, path, "{e}"),
        ConfigError::Invalid { file, key, problem } => {
            assert_eq!(file, path, "{e}");
            assert!(!key.is_empty(), "invalid value without a key: {e}");
            assert!(!problem.is_empty(), "invalid value without a problem: {e}");
        }
    }
    let shown = e.to_string();
    let prefix = format!("{}: ", path.display());
    assert!(shown.starts_with(&prefix), "{shown:?}");
}

fn digits(id: InstitutionId) -> String {
    id.to_string()
}

/// What a validated config promises, checked against the TOML it came from.
pub fn check_config(table: &toml::Table, c: &Config) {
    assert!((1..=256).contains(&c.worker_threads), "worker_threads");
    assert!(
        (64..=65_535).contains(&c.frame_size_max_bytes),
        "frame_size_max_bytes"
    );
    assert!(c.connections_max >= 1 && c.inflight_per_connection_max >= 1);
    assert!(!c.duplicates.window.is_zero(), "duplicates window");

    let mut ids = BTreeSet::new();
    let mut names = BTreeSet::new();
    for inst in &c.institutions {
        assert!(ids.insert(inst.id), "institution {} twice", inst.id);
        assert!(
            names.insert(inst.certificate_name.as_str()),
            "certificate name {:?} twice",
            inst.certificate_name
        );
    }

    // Every bank is reachable by its DE100, under its own index.
    assert!(
        c.banks.len() <= usize::from(BankIndex::MAX) + 1,
        "{} banks do not fit a BankIndex",
        c.banks.len()
    );
    for (i, bank) in c.banks.iter().enumerate() {
        assert!(!bank.server_name.is_empty(), "bank {} server_name", bank.id);
        assert!((1..=crate::config::LINKS_MAX).contains(&bank.links));
        assert!(bank.reconnect_backoff_min <= bank.reconnect_backoff_max);
        assert!(bank.saf.retry_min <= bank.saf.retry_max);
        assert!(bank.saf.attempts_max >= 1);
        let de100 = digits(bank.id);
        assert_eq!(
            c.routes.route(Some(de100.as_bytes()), None),
            Ok(i as BankIndex),
            "bank {de100} is not routed to itself"
        );
    }

    // Every route names a configured bank, and a PAN equal to its prefix goes there.
    let routes = table
        .get("route")
        .and_then(toml::Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    assert_eq!(
        c.routes.prefix_count(),
        routes.len(),
        "one prefix per route"
    );
    for (i, route) in routes.iter().enumerate() {
        let prefix = route.get("pan_prefix").and_then(toml::Value::as_str);
        let bank = route.get("bank").and_then(toml::Value::as_str);
        let (Some(prefix), Some(bank)) = (prefix, bank) else {
            panic!("route[{i}] accepted without a pan_prefix and a bank: {route:?}");
        };
        let Ok(bank_id) = bank.parse::<InstitutionId>() else {
            panic!("route[{i}] accepted with bank {bank:?}");
        };
        let Some(index) = c.routes.by_pan(prefix.as_bytes()) else {
            panic!("route[{i}]: a PAN of {prefix:?} has no route");
        };
        let Some(target) = c.banks.get(usize::from(index)) else {
            panic!(
                "route[{i}] points at bank index {index} of {}",
                c.banks.len()
            );
        };
        assert_eq!(target.id, bank_id, "route[{i}] goes to the wrong bank");
    }

    // The journal keeps segments long enough, and room for two of them.
    if let Some(j) = &c.journal {
        let needed = c
            .banks
            .iter()
            .map(|b| b.saf.age_max + b.request_timeout)
            .chain([c.duplicates.window])
            .max()
            .unwrap_or_default();
        assert!(j.retention > needed, "journal retention {:?}", j.retention);
        assert!(j.size_max_bytes >= 2 * j.segment_size_max_bytes);
    }
}

// === journal records ===

/// What reading a buffer record by record found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// End offset of each valid record, in order.
    pub ends: Vec<usize>,
    /// Seq, kind and request id of each valid record.
    pub records: Vec<(u64, RecordKind, u64)>,
    /// Where reading stopped before the end, and why.
    pub error: Option<(usize, RecordError)>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The record format's checksum, computed from its description: CRC32C of the
/// length field and of everything after the checksum field.
pub fn checksum(record: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&record[..LEN_BYTES]), &record[8..])
}

/// `data` with the checksum of every record whose length field is in bounds and
/// whose bytes are all present put right, up to the first one that is not.
pub fn with_checksums_repaired(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let mut at = 0;
    while out.len() - at >= LEN_BYTES {
        let len = u32_at(&out, at) as usize;
        let end = at + LEN_BYTES + len;
        if !(FIXED_BYTES..=RECORD_LEN_MAX_BYTES).contains(&len) || end > out.len() {
            break;
        }
        let crc = checksum(&out[at..end]);
        out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
    out
}

/// Reads `data` record by record with `record::decode`, checking each record and
/// the error that stops it, and replays the records as recovery would.
pub fn walk(data: &[u8]) -> Walk {
    let mut walk = Walk::default();
    let mut replay = Replay::new();
    let mut model = ReplayModel::default();
    let mut at = 0;
    loop {
        let rest = &data[at..];
        match record::decode(rest) {
            Ok(None) => {
                assert!(rest.is_empty(), "no record in {} bytes", rest.len());
                break;
            }
            Ok(Some((r, size))) => {
                check_record(rest, &r, size);
                replay.record(&r);
                model.record(&r);
                walk.records.push((r.seq, r.kind, r.request_id));
                at += size;
                walk.ends.push(at);
            }
            Err(e) => {
                check_record_error(rest, e);
                walk.error = Some((at, e));
                break;
            }
        }
    }
    model.check(replay.finish());
    walk
}

/// A decoded record lies inside `rest`, its fields are the bytes the format puts
/// them at, and encoding it gives those bytes back.
fn check_record(rest: &[u8], r: &Record<'_>, size: usize) {
    assert!(
        (BODY_OFFSET..=rest.len()).contains(&size),
        "record size {size} with {} bytes given",
        rest.len()
    );
    assert_eq!(
        u32_at(rest, 0) as usize + LEN_BYTES,
        size,
        "size is the len field"
    );
    let body_at = (r.body.as_ptr() as usize).wrapping_sub(rest.as_ptr() as usize);
    assert_eq!(body_at, BODY_OFFSET, "body starts after the fixed fields");
    assert_eq!(
        BODY_OFFSET + r.body.len(),
        size,
        "body ends with the record"
    );
    assert_eq!(r.seq, u64_at(rest, 8), "seq");
    assert_eq!(r.kind as u8, rest[16], "kind");
    assert_eq!(r.request_id, u64_at(rest, 17), "request id");
    assert_eq!(r.unix_ms, u64_at(rest, 25), "time");
    // What follows a record does not change it.
    assert_eq!(
        record::decode(&rest[..size]),
        Ok(Some((*r, size))),
        "decoded alone"
    );
    // Re-encoding, after other bytes, gives the same bytes.
    let mut out = b"xyz".to_vec();
    let written = record::encode(&mut out, r);
    assert_eq!(written, size, "encoded size");
    assert_eq!(&out[3..], &rest[..size], "re-encoded record");
}

/// An error describes the bytes where reading stopped.
fn check_record_error(rest: &[u8], e: RecordError) {
    assert!(!e.to_string().is_empty());
    match e {
        RecordError::Truncated { needed, available } => {
            assert_eq!(available, rest.len(), "{e:?}");
            assert!(needed > available, "{e:?}");
            if rest.len() >= LEN_BYTES {
                assert_eq!(needed, LEN_BYTES + u32_at(rest, 0) as usize, "{e:?}");
            } else {
                assert_eq!(needed, LEN_BYTES, "{e:?}");
            }
        }
        RecordError::BadLength { len } => {
            assert_eq!(len, u32_at(rest, 0), "{e:?}");
            assert!(
                !(FIXED_BYTES..=RECORD_LEN_MAX_BYTES).contains(&(len as usize)),
                "{e:?}"
            );
        }
        RecordError::BadChecksum { stored, computed } => {
            let end = LEN_BYTES + u32_at(rest, 0) as usize;
            assert!(end <= rest.len(), "{e:?}");
            assert_eq!(stored, u32_at(rest, 4), "{e:?}");
            assert_eq!(computed, checksum(&rest[..end]), "{e:?}");
            assert_ne!(stored, computed, "{e:?}");
        }
        RecordError::BadKind { kind } => {
            assert_eq!(kind, rest[16], "{e:?}");
            assert_eq!(
                RecordKind::from_u8(kind & !crate::journal::record::PROTECTED_BIT),
                None,
                "{e:?}"
            );
        }
    }
}

/// Which requests recovery should find open, from the records' kinds alone.
#[derive(Default)]
struct ReplayModel {
    open: BTreeSet<u64>,
    reversals: BTreeSet<u64>,
    accepted: BTreeSet<u64>,
}

impl ReplayModel {
    fn record(&mut self, r: &Record<'_>) {
        match r.kind {
            RecordKind::Accepted => {
                self.open.insert(r.request_id);
                self.accepted.insert(r.request_id);
            }
            RecordKind::Forwarded => {
                self.open.insert(r.request_id);
            }
            RecordKind::Outcome => {
                self.open.remove(&r.request_id);
            }
            // A queued advice without its 6-byte head (connector, STAN) is unusable.
            RecordKind::ReversalQueued if r.body.len() >= 6 => {
                self.reversals.insert(r.request_id);
            }
            RecordKind::ReversalQueued => {}
            RecordKind::ReversalAcked => {
                self.reversals.remove(&r.request_id);
            }
        }
    }

    fn check(self, found: recovery::Recovery) {
        let unfinished: Vec<u64> = found.unfinished.iter().map(|u| u.request_id).collect();
        let open: Vec<u64> = self.open.into_iter().collect();
        assert_eq!(unfinished, open, "unfinished requests");
        let pending: Vec<u64> = found
            .reversals_pending
            .iter()
            .map(|p| p.request_id)
            .collect();
        let reversals: Vec<u64> = self.reversals.into_iter().collect();
        assert_eq!(pending, reversals, "pending reversals");
        assert!(!recovery::summary(&found).is_empty());
    }
}
