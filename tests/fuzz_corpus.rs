//! Runs every file of the switch's fuzz corpus (`fuzz/corpus/config_parse/` and
//! `fuzz/corpus/journal_records/`) through the same checks as the fuzz targets of
//! those names (`fuzz/switch/`), so `cargo test` covers the committed seeds and
//! anything a fuzzing run added. Each journal corpus file is also read as a
//! one-segment journal by `journal::scan`, which must agree with the record walk.
//!
//! The seeds themselves are written by `write_seed_corpus` (ignored; run it after a
//! change to [`seeds`]):
//! `cargo test --test fuzz_corpus -- --ignored write_seed_corpus`.

use switchyard::fuzzing as fuzz_checks_switch;
use switchyard::wire::corpus::{self as corpus_runner, Check};
use switchyard_tools::testkit::{self, TempDir};

use fuzz_checks_switch::Walk;
use std::path::{Path, PathBuf};
use switchyard::config::{Config, ConfigError};
use switchyard::journal::reader::{scan, JournalError, SEGMENT_PREFIX, SEGMENT_SUFFIX};
use switchyard::journal::record::{self, Record, RecordError, RecordKind, RECORD_LEN_MAX_BYTES};
use switchyard::wire::Mti;

/// Fuzz targets and their checks.
const TARGETS: [(&str, Check); 2] = [
    ("config_parse", fuzz_checks_switch::config_parse),
    ("journal_records", fuzz_checks_switch::journal_records),
];

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn corpus_files(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    corpus_runner::corpus_files(&corpus_dir(), target)
}

fn run_target(target: &str) {
    corpus_runner::run_target(&corpus_dir(), &TARGETS, target);
}

#[test]
fn corpus_config_parse() {
    run_target("config_parse");
}

#[test]
fn corpus_journal_records() {
    run_target("journal_records");
}

/// The committed seeds are the ones [`seeds`] describes (fuzzing may add more files).
/// The copy of the shipped config only has to exist: the file changes with every
/// new key, and its current text goes through the checks in
/// `config_seeds_are_what_their_names_say`.
#[test]
fn seed_corpus_is_committed() {
    for (target, name, bytes) in seeds() {
        let path = corpus_dir().join(target).join(name);
        let found = std::fs::read(&path).ok();
        let fresh = match found {
            Some(_) if name == SHIPPED_SEED => true,
            Some(found) => found == bytes,
            None => false,
        };
        assert!(
            fresh,
            "{} missing or stale; run write_seed_corpus (see tests/fuzz_corpus.rs)",
            path.display()
        );
    }
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing the seeds"]
fn write_seed_corpus() {
    for (target, name, bytes) in seeds() {
        let dir = corpus_dir().join(target);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

// === journal corpus as a segment ===

/// What `scan` must make of a single segment holding `data`, from the record walk
/// and the reader's rules: sequence numbers grow; zeros after the last record are
/// the segment's clean end; an incomplete record, alone or followed by zeros, is a
/// torn tail; anything else stops reading as corruption at its offset.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Clean { records: usize },
    Torn { records: usize, offset: u64 },
    Corrupt { offset: u64 },
}

fn expected_scan(data: &[u8], walk: &Walk) -> Expected {
    let start = |i: usize| if i == 0 { 0 } else { walk.ends[i - 1] };
    if let Some(i) = (1..walk.records.len()).find(|&i| walk.records[i].0 <= walk.records[i - 1].0) {
        return Expected::Corrupt {
            offset: start(i) as u64,
        };
    }
    let records = walk.records.len();
    let Some((at, e)) = walk.error else {
        return Expected::Clean { records };
    };
    let rest = &data[at..];
    let zeros = |b: &[u8]| b.iter().all(|&x| x == 0);
    if zeros(rest) {
        return Expected::Clean { records };
    }
    let torn = match e {
        RecordError::Truncated { .. } => true,
        RecordError::BadChecksum { .. } | RecordError::BadKind { .. } => {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            zeros(&rest[(record::LEN_BYTES + len).min(rest.len())..])
        }
        RecordError::BadLength { .. } => zeros(&rest[record::LEN_BYTES.min(rest.len())..]),
    };
    if torn {
        Expected::Torn {
            records,
            offset: at as u64,
        }
    } else {
        Expected::Corrupt { offset: at as u64 }
    }
}

#[test]
fn journal_corpus_scans_as_the_walk_says() {
    let dir = TempDir::new("fuzz-corpus-scan");
    let segment = dir
        .0
        .join(format!("{SEGMENT_PREFIX}{:020}{SEGMENT_SUFFIX}", 1));
    for (path, bytes) in corpus_files("journal_records") {
        std::fs::write(&segment, &bytes).unwrap_or_else(|e| panic!("{}: {e}", segment.display()));
        let walk = fuzz_checks_switch::walk(&bytes);
        let mut visited = 0usize;
        let found = match scan(&dir.0, |_, _, _| visited += 1) {
            Ok(s) => {
                assert_eq!(s.records as usize, visited, "{}", path.display());
                match s.torn_tail {
                    None => Expected::Clean { records: visited },
                    Some(t) => Expected::Torn {
                        records: visited,
                        offset: t.offset,
                    },
                }
            }
            Err(JournalError::Corrupt { offset, .. }) => Expected::Corrupt { offset },
            Err(e) => panic!("{}: {e}", path.display()),
        };
        assert_eq!(
            found,
            expected_scan(&bytes, &walk),
            "{}: {walk:?}",
            path.display()
        );
    }
}

// === seeds ===

/// What a config seed must give.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// A valid config.
    Valid,
    /// Not UTF-8: the target skips it.
    NotUtf8,
    /// Rejected by the TOML layer (syntax, types, unknown keys), naming `what`.
    Toml(&'static str),
    /// Rejected by validation at key `key`.
    Invalid(&'static str),
}

const SHIPPED: &str = include_str!("../config/switchyard.toml");
/// The seed that copies [`SHIPPED`].
const SHIPPED_SEED: &str = "shipped";

const MINIMAL: &str = r#"[switch]
listen = "127.0.0.1:8583"

[tls]
ca_file = "ca.pem"
cert_file = "switch.pem"
key_file = "switch.key"
client_cert_file = "switch-client.pem"
client_key_file = "switch-client.key"
"#;

const BANK: &str = r#"
[[institution]]
id = "100001"

[[bank]]
id = "200001"
address = "127.0.0.1:9101"
server_name = "bank-200001"

[[route]]
pan_prefix = "4"
bank = "200001"
"#;

const JOURNAL: &str = r#"
[journal]
dir = "journal"
fsync = "off"
segment_size_max_bytes = 65536
size_max_bytes = 131072
retention_s = 90000
"#;

const INLINE: &str = r#"switch = { listen = "[::1]:8583", framing = "ascii4" }
tls.ca_file = "ca.pem"
tls.cert_file = "switch.pem"
tls.key_file = "switch.key"
tls.client_cert_file = "c.pem"
tls.client_key_file = "c.key"
tls.identity = "uri-san"
admin = { listen = "127.0.0.1:9464" }
institution = [{ id = "0042", certificate_name = "acq" }, { id = "42" }]
bank = [
  { id = "7", address = "127.0.0.1:1", server_name = "b7", links = 64 },
  { id = "07", address = "127.0.0.1:2", server_name = "b07", framing = "ascii4" },
]
route = [
  { pan_prefix = "4", bank = "7" },
  { pan_prefix = "45", bank = "07" },
  { pan_prefix = "4500000000000000000", bank = "7" },
]
"#;

fn with_bank(extra: &str) -> String {
    format!("{MINIMAL}{BANK}{extra}")
}

/// `depth` nested arrays or inline tables as the value of an unknown key.
fn nested(open: &str, close: &str, depth: usize) -> String {
    format!(
        "{MINIMAL}deep = {}1{}\n",
        open.repeat(depth),
        close.repeat(depth)
    )
}

fn config_seeds() -> Vec<(&'static str, Vec<u8>, Outcome)> {
    use Outcome::*;
    let text = |s: String| s.into_bytes();
    // From the minimal config, not the shipped one: it must not go stale with every new key.
    let mut not_utf8 = MINIMAL.as_bytes().to_vec();
    not_utf8.splice(10..10, [0xff, 0xfe]);
    vec![
        (SHIPPED_SEED, text(SHIPPED.to_owned()), Valid),
        ("minimal", text(MINIMAL.to_owned()), Valid),
        ("minimal-bank-route", text(with_bank("")), Valid),
        (
            "hexbitmap-ascii4-journal",
            text(
                with_bank(JOURNAL)
                    .replace(
                        "listen = \"127.0.0.1:8583\"",
                        "listen = \"127.0.0.1:8583\"\ndialect = \"iso87-hexbitmap\"\n\
                         framing = \"ascii4\"\nworker_threads = 256",
                    )
                    .replace(
                        "server_name = \"bank-200001\"",
                        "server_name = \"bank-200001\"\ndialect = \"iso87-hexbitmap\"\n\
                         reversal_age_max_s = 3600\nrequest_timeout_ms = 120000",
                    ),
            ),
            Valid,
        ),
        ("inline-tables-dotted-keys", text(INLINE.to_owned()), Valid),
        (
            "wrong-type-links",
            text(with_bank("").replace("server_name = \"bank-200001\"", "server_name = \"b\"\nlinks = \"two\"")),
            Toml("links"),
        ),
        (
            "wrong-type-section",
            text(format!("limits = 3\n{MINIMAL}")),
            Toml("expected struct LimitsSection"),
        ),
        (
            "unknown-key",
            text(MINIMAL.replace("listen =", "listn =")),
            Toml("listn"),
        ),
        (
            "unknown-section",
            text(format!("{MINIMAL}\n[routes]\npan_prefix = \"4\"\n")),
            Toml("routes"),
        ),
        (
            "missing-tls",
            text(MINIMAL.split("[tls]").next().unwrap_or_default().to_owned()),
            Toml("tls"),
        ),
        ("empty", Vec::new(), Toml("switch")),
        (
            "not-toml",
            text("[switch\nlisten = 127.0.0.1:8583\n".to_owned()),
            Toml("TOML parse error"),
        ),
        (
            "duplicate-key",
            text(MINIMAL.replace("[tls]", "listen = \"127.0.0.1:1\"\n[tls]")),
            Toml("duplicate key"),
        ),
        (
            "bad-socket-address",
            text(MINIMAL.replace("127.0.0.1:8583", "localhost:8583")),
            Toml("listen"),
        ),
        (
            "out-of-range-workers",
            text(MINIMAL.replace("[tls]", "worker_threads = 0\n[tls]")),
            Invalid("switch.worker_threads"),
        ),
        (
            "out-of-range-backoff",
            text(with_bank("").replace(
                "server_name = \"bank-200001\"",
                "server_name = \"b\"\nreconnect_backoff_min_ms = 500\nreconnect_backoff_max_ms = 100",
            )),
            Invalid("bank[0].reconnect_backoff_max_ms"),
        ),
        (
            "negative-number",
            text(with_bank("").replace("server_name = \"bank-200001\"", "server_name = \"b\"\nlinks = -1")),
            Toml("links"),
        ),
        (
            "huge-number",
            text(with_bank(JOURNAL).replace("65536", "99999999999999999999999999")),
            Toml("segment_size_max_bytes"),
        ),
        (
            "i64-max",
            text(with_bank(JOURNAL).replace("131072", "9223372036854775807")),
            Invalid("journal.size_max_bytes"),
        ),
        (
            "float-for-integer",
            text(MINIMAL.replace("[tls]", "worker_threads = 2.5\n[tls]")),
            Toml("worker_threads"),
        ),
        (
            "deep-nesting-arrays",
            text(nested("[", "]", 200)),
            Toml("recursion"),
        ),
        (
            "deep-nesting-inline-tables",
            text(nested("{a=", "}", 200)),
            Toml("recursion"),
        ),
        (
            "deep-dotted-key",
            text(format!("{MINIMAL}{}x = 1\n", "a.".repeat(200))),
            Toml("recursion"),
        ),
        (
            "route-unknown-bank",
            text(with_bank("").replace("bank = \"200001\"", "bank = \"777\"")),
            Invalid("route[0].bank"),
        ),
        (
            "route-bad-prefix",
            text(with_bank("").replace("pan_prefix = \"4\"", "pan_prefix = \"4x\"")),
            Invalid("route[0].pan_prefix"),
        ),
        (
            "route-prefix-twice",
            text(with_bank("\n[[route]]\npan_prefix = \"4\"\nbank = \"200001\"\n")),
            Invalid("route[1].pan_prefix"),
        ),
        (
            "bank-defined-twice",
            text(with_bank(
                "\n[[bank]]\nid = \"200001\"\naddress = \"127.0.0.1:1\"\nserver_name = \"x\"\n",
            )),
            Invalid("bank[1].id"),
        ),
        (
            "institution-id-too-long",
            text(with_bank("").replace("id = \"100001\"", "id = \"123456789012\"")),
            Invalid("institution[0].id"),
        ),
        (
            "retention-too-short",
            text(with_bank(JOURNAL).replace("retention_s = 90000", "retention_s = 3600")),
            Invalid("journal.retention_s"),
        ),
        (
            "dialect-missing-file",
            text(MINIMAL.replace("[tls]", "dialect = \"no-such-dialect.toml\"\n[tls]")),
            Invalid("switch.dialect"),
        ),
        ("not-utf8", not_utf8, NotUtf8),
    ]
}

/// Messages for record bodies, as the switch would journal them.
fn message(mti: Mti, fields: &[(u8, &[u8])]) -> Vec<u8> {
    testkit::message(mti, fields).to_vec()
}

fn request() -> Vec<u8> {
    message(
        Mti::FINANCIAL,
        &[
            (2, b"4111111111111111"),
            (3, b"000000"),
            (4, b"000000012345"),
            (7, b"0605123456"),
            (11, b"000123"),
            (32, b"100001"),
            (37, b"515612000123"),
            (41, b"TERM0001"),
            (49, b"978"),
        ],
    )
}

fn answer() -> Vec<u8> {
    message(
        Mti::FINANCIAL_RESPONSE,
        &[
            (2, b"4111111111111111"),
            (4, b"000000012345"),
            (11, b"000001"),
            (38, b"A1B2C3"),
            (39, b"00"),
        ],
    )
}

const NOW_MS: u64 = 1_717_000_000_000;

fn encode(seq: u64, kind: RecordKind, request_id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let r = Record {
        seq,
        kind,
        protected: false,
        request_id,
        unix_ms: NOW_MS + seq,
        body,
    };
    record::encode(&mut out, &r);
    out
}

/// Record bodies of each kind: (kind, body).
fn bodies() -> Vec<(RecordKind, Vec<u8>)> {
    let link = |connector: u16, stan: u32| {
        let mut head = connector.to_le_bytes().to_vec();
        head.extend_from_slice(&stan.to_le_bytes());
        head
    };
    let mut accepted = 100_001u64.to_le_bytes().to_vec();
    accepted.extend_from_slice(&request());
    let mut outcome = b"00\x01".to_vec();
    outcome.extend_from_slice(&answer());
    let mut reversal = link(1, 7);
    reversal.extend_from_slice(&request());
    vec![
        (RecordKind::Accepted, accepted),
        (RecordKind::Forwarded, link(1, 7)),
        (RecordKind::Outcome, outcome),
        (RecordKind::ReversalQueued, reversal),
        (RecordKind::ReversalAcked, Vec::new()),
    ]
}

/// A journal's worth: request 1 answered, request 2 timed out and reversed,
/// request 3 forwarded without an outcome, request 4 accepted only.
fn sequence() -> Vec<u8> {
    let b = bodies();
    let body = |kind: RecordKind| &b.iter().find(|(k, _)| *k == kind).expect("kind").1[..];
    let mut out = Vec::new();
    let steps = [
        (1, RecordKind::Accepted),
        (1, RecordKind::Forwarded),
        (1, RecordKind::Outcome),
        (2, RecordKind::Accepted),
        (2, RecordKind::Forwarded),
        (3, RecordKind::Accepted),
        (2, RecordKind::Outcome),
        (2, RecordKind::ReversalQueued),
        (3, RecordKind::Forwarded),
        (2, RecordKind::ReversalAcked),
        (4, RecordKind::Accepted),
    ];
    for (seq, (request_id, kind)) in (1u64..).zip(steps) {
        out.extend_from_slice(&encode(seq, kind, request_id, body(kind)));
    }
    out
}

/// What a journal seed must give: records read, then the error that stops them.
type JournalOutcome = (usize, Option<fn(&RecordError) -> bool>);

fn journal_seeds() -> Vec<(&'static str, Vec<u8>, JournalOutcome)> {
    let mut seeds: Vec<(&'static str, Vec<u8>, JournalOutcome)> = Vec::new();
    for (kind, body) in bodies() {
        seeds.push((kind.as_str(), encode(1, kind, 1, &body), (1, None)));
    }
    let seq = sequence();
    let records = 11;
    let first = encode(1, RecordKind::Accepted, 1, &bodies()[0].1);
    let truncated: fn(&RecordError) -> bool = |e| matches!(e, RecordError::Truncated { .. });
    let bad_crc: fn(&RecordError) -> bool = |e| matches!(e, RecordError::BadChecksum { .. });
    let bad_len: fn(&RecordError) -> bool = |e| matches!(e, RecordError::BadLength { .. });
    let bad_kind: fn(&RecordError) -> bool = |e| matches!(e, RecordError::BadKind { kind: 9 });

    seeds.push(("sequence", seq.clone(), (records, None)));
    let mut zeros = seq.clone();
    zeros.resize(seq.len() + 256, 0);
    seeds.push(("sequence-then-zeros", zeros, (records, Some(bad_len))));
    let mut torn = seq.clone();
    torn.truncate(seq.len() - 5);
    seeds.push(("torn-record", torn, (records - 1, Some(truncated))));
    let mut torn_zeros = seq[..seq.len() - 5].to_vec();
    torn_zeros.resize(seq.len() + 64, 0);
    seeds.push((
        "torn-record-then-zeros",
        torn_zeros,
        (records - 1, Some(bad_crc)),
    ));
    let mut flipped = seq.clone();
    flipped[first.len() + 20] ^= 0x01; // the second record's request id
    seeds.push(("bad-crc", flipped, (1, Some(bad_crc))));
    let mut oversized = first.clone();
    oversized.extend_from_slice(&(RECORD_LEN_MAX_BYTES as u32 + 1).to_le_bytes());
    oversized.extend_from_slice(&[0xab; 64]);
    seeds.push(("oversized-length", oversized, (1, Some(bad_len))));
    let mut huge = u32::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&first[4..]);
    seeds.push(("length-u32-max", huge, (0, Some(bad_len))));
    let mut undersized = first.clone();
    undersized[..4].copy_from_slice(&(record::FIXED_BYTES as u32 - 1).to_le_bytes());
    seeds.push(("length-under-fixed", undersized, (0, Some(bad_len))));
    let mut kind = first.clone();
    kind[16] = 9;
    let kind = fuzz_checks_switch::with_checksums_repaired(&kind);
    seeds.push(("bad-kind", kind, (0, Some(bad_kind))));
    seeds.push(("length-only", first[..4].to_vec(), (0, Some(truncated))));
    seeds.push(("two-bytes", first[..2].to_vec(), (0, Some(truncated))));
    // Heads shorter than their kind's: recovery must not read past them.
    let mut short = Vec::new();
    short.extend(encode(1, RecordKind::Accepted, 5, b"\x01\x02"));
    short.extend(encode(2, RecordKind::Forwarded, 5, b"\x01\x00"));
    short.extend(encode(3, RecordKind::ReversalQueued, 5, b"\x01\x00\x07"));
    short.extend(encode(4, RecordKind::Outcome, 5, b"0"));
    short.extend(encode(5, RecordKind::ReversalAcked, 6, b"unexpected body"));
    seeds.push(("short-heads", short, (5, None)));
    // Sequence numbers going back: records are valid, the reader refuses them.
    let mut backwards = encode(7, RecordKind::Accepted, 1, &bodies()[0].1);
    backwards.extend(encode(7, RecordKind::Forwarded, 1, &bodies()[1].1));
    seeds.push(("sequence-repeated", backwards, (2, None)));
    seeds
}

/// Every seed: (target, file name, contents).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut all = Vec::new();
    for (name, bytes, _) in config_seeds() {
        all.push(("config_parse", name, bytes));
    }
    for (name, bytes, _) in journal_seeds() {
        all.push(("journal_records", name, bytes));
    }
    all
}

#[test]
fn config_seeds_are_what_their_names_say() {
    let path = Path::new(fuzz_checks_switch::CONFIG_PATH);
    for (name, bytes, expected) in config_seeds() {
        fuzz_checks_switch::config_parse(&bytes);
        let found = std::str::from_utf8(&bytes)
            .ok()
            .map(|text| Config::parse(text, path));
        let ok = match (expected, &found) {
            (Outcome::NotUtf8, None) => true,
            (Outcome::Valid, Some(Ok(_))) => true,
            (Outcome::Toml(what), Some(Err(e @ ConfigError::Toml { .. }))) => {
                e.to_string().contains(what)
            }
            (Outcome::Invalid(key), Some(Err(ConfigError::Invalid { key: k, .. }))) => k == key,
            _ => false,
        };
        let found = found.map(|r| r.map(|_| "valid").map_err(|e| e.to_string()));
        assert!(ok, "{name}: expected {expected:?}, found {found:?}");
    }
}

#[test]
fn journal_seeds_are_what_their_names_say() {
    for (name, bytes, (records, error)) in journal_seeds() {
        fuzz_checks_switch::journal_records(&bytes);
        let walk = fuzz_checks_switch::walk(&bytes);
        assert_eq!(walk.records.len(), records, "{name}: {walk:?}");
        match (error, walk.error) {
            (None, None) => {}
            (Some(is), Some((_, e))) => assert!(is(&e), "{name}: {e:?}"),
            (_, found) => panic!("{name}: stopped by {found:?}"),
        }
    }
}
