//! Configuration: the TOML file, every key with a unit and a default, validated
//! whole at load time into typed values the daemon uses.
//!
//! Relative paths in the file are resolved against the file's own directory.

use crate::cluster::ClusterConfig;
use crate::core::route::{BankIndex, RouteTable};
use crate::core::InstitutionId;
use crate::journal::{Fsync, JournalConfig};
use crate::security::{DataModule, KeyExchange, LinkKeys, MacSpec, Module, PinSpec};
use crate::tls::IdentitySource;
use crate::wire::{
    Dialect, FieldType, Framing, Header, LengthKind, MessageHeader, HEADER_BYTES_MAX, TPDU_BYTES,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use switchyard_security::module::{KeyHandle, MacAlgorithm, SecurityModule, SoftwareModule, Usage};
use switchyard_security::payshield::{PayShieldConfig, PayShieldModule, PayShieldTls};
use switchyard_security::pin::Format;
use switchyard_security::store::{KeyStore, KeyType};

// === defaults (units last) ===

/// Tokio worker threads (one per core on the 2-core machines this is sized for).
pub const WORKER_THREADS_DEFAULT: usize = 2;
/// Largest ISO 8583 message accepted or sent, excluding the frame header.
pub const FRAME_SIZE_MAX_BYTES_DEFAULT: usize = crate::wire::FRAME_SIZE_MAX_BYTES_DEFAULT;
/// Acquirer connections open at once.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
/// Requests in flight on one acquirer connection; past it the switch stops reading
/// that connection until answers free a slot.
pub const INFLIGHT_PER_CONNECTION_MAX_DEFAULT: usize = 1024;
/// How long a request's key (DE32 + DE11 + DE7 + DE37) is remembered: a
/// retransmission within it gets the original answer, a reversal within it is
/// matched to its original by DE90.
pub const DUPLICATE_WINDOW_S_DEFAULT: u64 = 300;
/// Memory the duplicates table may use, bytes (2 GiB): 46 bytes a key with a
/// journal (bank answers are read back from it), so 46 million keys, 153,000
/// payments a second over a 300 s window. Past it the oldest answered keys are
/// evicted early (the window shrinks); `check-config` prints the rate it holds.
pub const DUPLICATE_MEMORY_MAX_BYTES_DEFAULT: usize = 2 << 30;
/// Least `duplicates.memory_max_bytes` (1 MiB).
pub const DUPLICATE_MEMORY_MIN_BYTES: usize = 1 << 20;
/// Retransmissions (or reversals) waiting on one request still in flight; past it
/// they are answered 91.
pub const DUPLICATE_WAITERS_MAX_DEFAULT: usize = 4;
/// Acquirer connections one institution may hold open at once; more are closed
/// after the handshake.
pub const CONNECTIONS_PER_INSTITUTION_MAX_DEFAULT: usize = 1_000;
/// Requests of one institution in flight at once, over all its connections;
/// beyond it the switch answers 91 at once.
pub const INFLIGHT_PER_INSTITUTION_MAX_DEFAULT: usize = 16_384;
/// Time an acquirer connection may stay without sending a byte (its echoes count)
/// before it is closed.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 120_000;
/// Time a frame may take to arrive once its first byte has: a peer trickling
/// bytes is cut off.
pub const FRAME_READ_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Time an acquirer has to take one batch of answers; a peer that stops reading
/// is cut off, not buffered for.
pub const WRITE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Time a graceful shutdown (SIGTERM) has to answer what is in flight before the
/// switch stops anyway.
pub const SHUTDOWN_GRACE_MS_DEFAULT: u64 = 30_000;
/// Requests per second one institution may send, sustained (all its connections
/// together); beyond it and its burst the switch answers 65 at once.
pub const RATE_PER_S_DEFAULT: u32 = 20_000;
/// Requests one institution may send at once above its sustained rate.
pub const RATE_BURST_DEFAULT: u32 = 2_000;
/// TLS handshake time allowed to a connecting acquirer.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Deadline of a request from its receipt until its answer must be back.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Requests waiting in one bank connector's queue.
pub const QUEUE_DEPTH_MAX_DEFAULT: usize = 8_192;
/// Requests in flight on one bank link.
pub const INFLIGHT_PER_LINK_MAX_DEFAULT: usize = 8_192;
/// TLS links to one bank.
pub const LINKS_DEFAULT: usize = 2;
/// Most links to one bank.
pub const LINKS_MAX: usize = 64;
/// Most banks in one failover list (of a bank or a route).
pub const FAILOVER_MAX: usize = 16;
/// TCP connect plus TLS handshake to a bank.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 3_000;
/// First wait before reconnecting a failed bank link; doubles up to the maximum.
pub const RECONNECT_BACKOFF_MIN_MS_DEFAULT: u64 = 100;
/// Longest wait between reconnection attempts.
pub const RECONNECT_BACKOFF_MAX_MS_DEFAULT: u64 = 5_000;
/// Idle time on a bank link before the switch sends an 0800 echo.
pub const ECHO_INTERVAL_MS_DEFAULT: u64 = 30_000;
/// Time an echo may take before the link is declared dead and reconnected.
pub const ECHO_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Requests written to a bank link per wake-up (one flush per batch).
pub const WRITE_BATCH_MAX_DEFAULT: usize = 256;
/// Admin connections served at once; more are closed at accept.
pub const ADMIN_CONNECTIONS_MAX_DEFAULT: usize = 64;
/// Largest admin request head, bytes (at least 8 KiB: hyper's smallest read buffer);
/// a longer one is answered 431.
pub const ADMIN_REQUEST_HEAD_MAX_BYTES_DEFAULT: usize = 8 * 1024;
/// Time an admin client has to send its request head.
pub const ADMIN_HEADER_READ_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Time one admin request may take in all (a reload waits up to 5 s for the links
/// of banks it adds).
pub const ADMIN_REQUEST_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Largest certificate, key or CA file `[admin.tls]` names, bytes (1 MiB).
pub const ADMIN_TLS_FILE_SIZE_MAX_BYTES: u64 = 1 << 20;
/// Most names in `admin.tls.client_names`.
pub const ADMIN_CLIENT_NAMES_MAX: usize = 256;
/// Longest name in `admin.tls.client_names`, bytes (a DNS name's limit).
pub const ADMIN_CLIENT_NAME_MAX_BYTES: usize = 253;

/// A bank's key change fields (`key_block_field`, `kcv_field`): defined with the
/// key exchange.
pub use crate::security::{
    KCV_CHARS, KCV_FIELD_DEFAULT, KEY_BLOCK_CHARS_MAX, KEY_BLOCK_FIELD_DEFAULT,
};

/// Reversal store-and-forward bounds: defined with the queue they bound.
pub use crate::core::saf::{
    SafLimits, REVERSAL_AGE_MAX_S_DEFAULT, REVERSAL_ATTEMPTS_MAX_DEFAULT,
    REVERSAL_RETRY_MAX_MS_DEFAULT, REVERSAL_RETRY_MIN_MS_DEFAULT, SAF_DEPTH_MAX_DEFAULT,
};

/// A configuration that cannot be used: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The config file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not TOML, or a key of the wrong type, or an unknown key.
    #[error("{file}: {source}")]
    Toml {
        /// The config file.
        file: PathBuf,
        /// The parser's message (names the key and line).
        source: Box<toml::de::Error>,
    },
    /// A key whose value is not acceptable.
    #[error("{file}: {key}: {problem}")]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// The key, e.g. `bank[1].links`.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// Largest config file read, bytes.
pub const CONFIG_FILE_SIZE_MAX_BYTES: u64 = 64 << 20;
/// Largest dialect file read, bytes.
pub const DIALECT_FILE_SIZE_MAX_BYTES: u64 = crate::wire::DIALECT_FILE_SIZE_MAX_BYTES;
/// Most `[[bank]]` entries (connector indexes are 16-bit).
pub const BANKS_MAX: usize = 4_096;
/// Most `[[institution]]` entries.
pub const INSTITUTIONS_MAX: usize = 100_000;
/// Most `[[route]]` entries.
pub const ROUTES_MAX: usize = 10_000_000;

/// Reads a regular file of at most `max` bytes as UTF-8 (never a device or a pipe,
/// which could block or never end).
fn read_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} bytes, more than the {max} allowed", meta.len()),
        ));
    }
    let mut text = String::new();
    file.take(max + 1).read_to_string(&mut text)?;
    Ok(text)
}

// === the file's shape ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    switch: SwitchSection,
    tls: TlsSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    admin: AdminSection,
    journal: Option<JournalSection>,
    #[serde(default)]
    duplicates: DuplicatesSection,
    #[serde(default)]
    institution: Vec<InstitutionSection>,
    #[serde(default)]
    bank: Vec<BankSection>,
    #[serde(default)]
    route: Vec<RouteSection>,
    #[serde(default)]
    listener: Vec<ListenerSection>,
    keys: Option<KeysSection>,
    cluster: Option<ClusterSection>,
}

/// An active/standby pair replicated through NATS JetStream (`[cluster]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    nats: Vec<String>,
    node_id: String,
    #[serde(default = "d_cluster_stream")]
    stream: String,
    #[serde(default = "d_lease_ttl_ms")]
    lease_ttl_ms: u64,
    #[serde(default = "d_connect_timeout_ms")]
    connect_timeout_ms: u64,
    credentials_file: Option<PathBuf>,
    tls: Option<ClusterTlsSection>,
    /// "lz4" (the default) or "none".
    compression: Option<String>,
}

/// TLS to the NATS servers (`[cluster.tls]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterTlsSection {
    ca_file: PathBuf,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

fn d_cluster_stream() -> String {
    crate::cluster::STREAM_DEFAULT.to_owned()
}
fn d_lease_ttl_ms() -> u64 {
    crate::cluster::LEASE_TTL_MS_DEFAULT
}
fn d_connect_timeout_ms() -> u64 {
    crate::cluster::CONNECT_TIMEOUT_MS_DEFAULT
}

/// The key store and security module (`[keys]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysSection {
    store: PathBuf,
    master_key_file: PathBuf,
    #[serde(default = "d_module")]
    module: String,
    journal_key: Option<String>,
    #[serde(default = "d_mac_failure_code")]
    mac_failure_code: String,
    #[serde(default = "d_pin_failure_code")]
    pin_failure_code: String,
    payshield: Option<PayShieldSection>,
}

/// The payShield the links' keys live on (`[keys.payshield]`, with
/// `module = "payshield"`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PayShieldSection {
    address: String,
    #[serde(default = "d_payshield_header_len")]
    header_len: usize,
    #[serde(default = "d_payshield_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "d_payshield_connections_max")]
    connections_max: usize,
    keys_file: PathBuf,
    tls: Option<PayShieldTlsSection>,
}

/// TLS to the payShield (`[keys.payshield.tls]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PayShieldTlsSection {
    ca_file: PathBuf,
    server_name: String,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

fn d_payshield_header_len() -> usize {
    switchyard_security::payshield::HEADER_LENGTH_DEFAULT_CHARS
}
fn d_payshield_timeout_ms() -> u64 {
    switchyard_security::payshield::TIMEOUT_DEFAULT_MS
}
fn d_payshield_connections_max() -> usize {
    switchyard_security::payshield::CONNECTIONS_DEFAULT
}

fn d_mac_failure_code() -> String {
    "63".to_owned()
}
fn d_pin_failure_code() -> String {
    "81".to_owned()
}

fn d_module() -> String {
    "software".to_owned()
}

/// A link's keys as the file names them (`[[institution]]`, `[[bank]]`).
struct LinkKeysNames<'a> {
    pin_key: Option<&'a str>,
    pin_block_format: Option<&'a str>,
    mac_key: Option<&'a str>,
    mac: Option<&'a str>,
}

/// A further acquirer listener (`[[listener]]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerSection {
    listen: SocketAddr,
    #[serde(default = "d_dialect")]
    dialect: String,
    #[serde(default = "d_framing")]
    framing: Framing,
    #[serde(default)]
    header: HeaderKind,
    #[serde(default)]
    header_bytes: Option<usize>,
}

/// Most acquirer listeners (`[switch]` and the `[[listener]]` entries).
pub const LISTENERS_MAX: usize = 16;

/// Where acquirers connect, and how they speak there.
#[derive(Clone, Debug)]
pub struct Listener {
    /// Address.
    pub listen: SocketAddr,
    /// Message profile.
    pub dialect: Arc<Dialect>,
    /// Length header.
    pub framing: Framing,
    /// Header between the length and the message; answers carry the request's
    /// back (a TPDU with its addresses swapped).
    pub header: MessageHeader,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchSection {
    listen: SocketAddr,
    #[serde(default = "d_workers")]
    worker_threads: usize,
    #[serde(default = "d_dialect")]
    dialect: String,
    #[serde(default = "d_framing")]
    framing: Framing,
    #[serde(default)]
    header: HeaderKind,
    #[serde(default)]
    header_bytes: Option<usize>,
    #[serde(default = "d_grace")]
    shutdown_grace_ms: u64,
}

/// What comes between a frame's length and the message (`header = …`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum HeaderKind {
    #[default]
    None,
    Tpdu,
    Fixed,
}

fn d_grace() -> u64 {
    SHUTDOWN_GRACE_MS_DEFAULT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    client_cert_file: PathBuf,
    client_key_file: PathBuf,
    crl_file: Option<PathBuf>,
    #[serde(default = "d_identity")]
    identity: IdentitySource,
    #[serde(default = "d_handshake")]
    handshake_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsSection {
    frame_size_max_bytes: usize,
    connections_max: usize,
    connections_per_institution_max: usize,
    inflight_per_connection_max: usize,
    inflight_per_institution_max: usize,
    idle_timeout_ms: u64,
    frame_read_timeout_ms: u64,
    write_timeout_ms: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            frame_size_max_bytes: FRAME_SIZE_MAX_BYTES_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            connections_per_institution_max: CONNECTIONS_PER_INSTITUTION_MAX_DEFAULT,
            inflight_per_connection_max: INFLIGHT_PER_CONNECTION_MAX_DEFAULT,
            inflight_per_institution_max: INFLIGHT_PER_INSTITUTION_MAX_DEFAULT,
            idle_timeout_ms: IDLE_TIMEOUT_MS_DEFAULT,
            frame_read_timeout_ms: FRAME_READ_TIMEOUT_MS_DEFAULT,
            write_timeout_ms: WRITE_TIMEOUT_MS_DEFAULT,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalSection {
    dir: PathBuf,
    #[serde(default = "d_fsync")]
    fsync: Fsync,
    #[serde(default = "d_journal_queue")]
    queue_depth_max: usize,
    #[serde(default = "d_journal_batch")]
    batch_records_max: usize,
    #[serde(default = "d_journal_delay")]
    batch_delay_us: u64,
    #[serde(default = "d_journal_segment")]
    segment_size_max_bytes: u64,
    #[serde(default = "d_journal_retention")]
    retention_s: u64,
    #[serde(default = "d_journal_size")]
    size_max_bytes: u64,
    #[serde(default = "d_true")]
    direct_io: bool,
}

fn d_fsync() -> Fsync {
    Fsync::Batch
}
fn d_true() -> bool {
    true
}
fn d_journal_queue() -> usize {
    crate::journal::writer::QUEUE_DEPTH_MAX_DEFAULT
}
fn d_journal_batch() -> usize {
    crate::journal::writer::BATCH_RECORDS_MAX_DEFAULT
}
fn d_journal_delay() -> u64 {
    crate::journal::writer::BATCH_DELAY_US_DEFAULT
}
fn d_journal_segment() -> u64 {
    crate::journal::writer::SEGMENT_SIZE_MAX_BYTES_DEFAULT
}
fn d_journal_retention() -> u64 {
    crate::journal::writer::RETENTION_S_DEFAULT
}
fn d_journal_size() -> u64 {
    crate::journal::writer::SIZE_MAX_BYTES_DEFAULT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DuplicatesSection {
    window_s: u64,
    memory_max_bytes: usize,
    /// Replaced by `memory_max_bytes`: named in the error when still present.
    entries_max: Option<usize>,
    waiters_max: usize,
}

impl Default for DuplicatesSection {
    fn default() -> Self {
        DuplicatesSection {
            window_s: DUPLICATE_WINDOW_S_DEFAULT,
            memory_max_bytes: DUPLICATE_MEMORY_MAX_BYTES_DEFAULT,
            entries_max: None,
            waiters_max: DUPLICATE_WAITERS_MAX_DEFAULT,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AdminSection {
    listen: Option<SocketAddr>,
    connections_max: usize,
    request_head_max_bytes: usize,
    header_read_timeout_ms: u64,
    request_timeout_ms: u64,
    tls: Option<AdminTlsSection>,
}

/// `[admin.tls]`: the endpoint speaks TLS only, and changes need an operator
/// certificate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminTlsSection {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: PathBuf,
    client_names: Option<Vec<String>>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: None,
            connections_max: ADMIN_CONNECTIONS_MAX_DEFAULT,
            request_head_max_bytes: ADMIN_REQUEST_HEAD_MAX_BYTES_DEFAULT,
            header_read_timeout_ms: ADMIN_HEADER_READ_TIMEOUT_MS_DEFAULT,
            request_timeout_ms: ADMIN_REQUEST_TIMEOUT_MS_DEFAULT,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstitutionSection {
    id: String,
    #[serde(default)]
    name: String,
    certificate_name: Option<String>,
    #[serde(default = "d_rate")]
    rate_per_s: u32,
    #[serde(default = "d_burst")]
    rate_burst: u32,
    #[serde(default)]
    pin_key: Option<String>,
    #[serde(default)]
    pin_block_format: Option<String>,
    #[serde(default)]
    mac_key: Option<String>,
    #[serde(default)]
    mac: Option<String>,
}

fn d_rate() -> u32 {
    RATE_PER_S_DEFAULT
}
fn d_burst() -> u32 {
    RATE_BURST_DEFAULT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BankSection {
    id: String,
    #[serde(default)]
    name: String,
    address: SocketAddr,
    server_name: String,
    #[serde(default = "d_links")]
    links: usize,
    #[serde(default = "d_dialect")]
    dialect: String,
    #[serde(default = "d_framing")]
    framing: Framing,
    #[serde(default)]
    header: HeaderKind,
    #[serde(default)]
    header_hex: Option<String>,
    #[serde(default = "d_queue")]
    queue_depth_max: usize,
    #[serde(default = "d_inflight_link")]
    inflight_per_link_max: usize,
    #[serde(default = "d_request_timeout")]
    request_timeout_ms: u64,
    #[serde(default = "d_connect_timeout")]
    connect_timeout_ms: u64,
    #[serde(default = "d_backoff_min")]
    reconnect_backoff_min_ms: u64,
    #[serde(default = "d_backoff_max")]
    reconnect_backoff_max_ms: u64,
    #[serde(default = "d_echo_interval")]
    echo_interval_ms: u64,
    #[serde(default = "d_echo_timeout")]
    echo_timeout_ms: u64,
    #[serde(default = "d_write_batch")]
    write_batch_max: usize,
    #[serde(default = "d_saf_depth")]
    saf_depth_max: usize,
    #[serde(default = "d_retry_min")]
    reversal_retry_min_ms: u64,
    #[serde(default = "d_retry_max")]
    reversal_retry_max_ms: u64,
    #[serde(default = "d_attempts")]
    reversal_attempts_max: u32,
    #[serde(default = "d_age")]
    reversal_age_max_s: u64,
    #[serde(default)]
    failover: Vec<String>,
    #[serde(default)]
    optional: bool,
    #[serde(default)]
    pin_key: Option<String>,
    #[serde(default)]
    pin_block_format: Option<String>,
    #[serde(default)]
    mac_key: Option<String>,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    zmk_key: Option<String>,
    #[serde(default)]
    key_block_field: Option<u8>,
    #[serde(default)]
    kcv_field: Option<u8>,
}

fn d_saf_depth() -> usize {
    SAF_DEPTH_MAX_DEFAULT
}
fn d_retry_min() -> u64 {
    REVERSAL_RETRY_MIN_MS_DEFAULT
}
fn d_retry_max() -> u64 {
    REVERSAL_RETRY_MAX_MS_DEFAULT
}
fn d_attempts() -> u32 {
    REVERSAL_ATTEMPTS_MAX_DEFAULT
}
fn d_age() -> u64 {
    REVERSAL_AGE_MAX_S_DEFAULT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSection {
    pan_prefix: String,
    bank: String,
    /// Banks to try, in order, while `bank` has no link up (default: the bank's
    /// own `failover`).
    #[serde(default)]
    failover: Option<Vec<String>>,
}

fn d_workers() -> usize {
    WORKER_THREADS_DEFAULT
}
fn d_dialect() -> String {
    "iso87-ascii".to_owned()
}
fn d_framing() -> Framing {
    Framing::U16be
}
fn d_identity() -> IdentitySource {
    IdentitySource::CommonName
}
fn d_handshake() -> u64 {
    HANDSHAKE_TIMEOUT_MS_DEFAULT
}
fn d_links() -> usize {
    LINKS_DEFAULT
}
fn d_queue() -> usize {
    QUEUE_DEPTH_MAX_DEFAULT
}
fn d_inflight_link() -> usize {
    INFLIGHT_PER_LINK_MAX_DEFAULT
}
fn d_request_timeout() -> u64 {
    REQUEST_TIMEOUT_MS_DEFAULT
}
fn d_connect_timeout() -> u64 {
    CONNECT_TIMEOUT_MS_DEFAULT
}
fn d_backoff_min() -> u64 {
    RECONNECT_BACKOFF_MIN_MS_DEFAULT
}
fn d_backoff_max() -> u64 {
    RECONNECT_BACKOFF_MAX_MS_DEFAULT
}
fn d_echo_interval() -> u64 {
    ECHO_INTERVAL_MS_DEFAULT
}
fn d_echo_timeout() -> u64 {
    ECHO_TIMEOUT_MS_DEFAULT
}
fn d_write_batch() -> usize {
    WRITE_BATCH_MAX_DEFAULT
}

// === validated configuration ===

/// Where the switch's certificates and keys are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// CA that signs acquirer client certificates and bank server certificates.
    pub ca_file: PathBuf,
    /// The switch's server certificate chain (presented to acquirers).
    pub cert_file: PathBuf,
    /// Its key.
    pub key_file: PathBuf,
    /// The switch's client certificate (presented to banks).
    pub client_cert_file: PathBuf,
    /// Its key.
    pub client_key_file: PathBuf,
    /// Certificate revocation lists (PEM) for acquirer certificates; none when absent.
    pub crl_file: Option<PathBuf>,
}

/// An acquiring institution allowed to connect.
#[derive(Clone, Debug)]
pub struct Institution {
    /// DE32 value its requests must carry.
    pub id: InstitutionId,
    /// Display name.
    pub name: String,
    /// The certificate identity (CN or SAN, per `tls.identity`) that names it.
    pub certificate_name: String,
    /// Sustained requests per second it may send; beyond it (and its burst) the
    /// switch answers 65 at once.
    pub rate_per_s: u32,
    /// Requests it may send at once above the sustained rate.
    pub rate_burst: u32,
    /// Its PIN and MAC keys (none: DE52 and MACs pass as they are).
    pub security: LinkKeys,
}

/// A destination bank and its connector settings.
#[derive(Clone, Debug)]
pub struct Bank {
    /// Receiving institution id (DE100).
    pub id: InstitutionId,
    /// Display name.
    pub name: String,
    /// The bank host's address.
    pub address: SocketAddr,
    /// Name its TLS certificate must carry.
    pub server_name: String,
    /// TLS links kept open.
    pub links: usize,
    /// Message profile on the links.
    pub dialect: Arc<Dialect>,
    /// Framing on the links.
    pub framing: Framing,
    /// Header between a frame's length and the message on the links.
    pub header: MessageHeader,
    /// The header the switch writes before each message to the bank (`header_hex`).
    pub header_sent: Header,
    /// Connector queue bound; full → 91.
    pub queue_depth_max: usize,
    /// In-flight bound per link.
    pub inflight_per_link_max: usize,
    /// Request deadline from receipt.
    pub request_timeout: Duration,
    /// Connect + handshake bound.
    pub connect_timeout: Duration,
    /// Reconnect backoff, first step.
    pub reconnect_backoff_min: Duration,
    /// Reconnect backoff, cap.
    pub reconnect_backoff_max: Duration,
    /// Idle time before an echo.
    pub echo_interval: Duration,
    /// Echo answer bound.
    pub echo_timeout: Duration,
    /// Requests per write batch.
    pub write_batch_max: usize,
    /// Reversal store-and-forward bounds.
    pub saf: SafLimits,
    /// STAN each new link starts from. Not a config key: always 1, except where a
    /// test starts near 999,999 to see the wrap-around.
    pub first_stan: u32,
    /// Banks (by index) that take this bank's requests, in order, while it has no
    /// link up: the default of its routes (a `[[route]]` may name its own).
    pub failover: Vec<BankIndex>,
    /// Whether the switch is ready (`/readyz`) without a link to this bank.
    pub optional: bool,
    /// Its PIN and MAC keys (none: DE52 and MACs pass as they are).
    pub security: LinkKeys,
}

impl Bank {
    /// Whether `other` keeps every setting of this bank's links (address, TLS
    /// name, dialect, framing, bounds, timers): then a reload applies its new
    /// `links`, `request_timeout`, `failover` and `optional` to the running
    /// connector; otherwise a new connector replaces it.
    pub fn same_link_settings(&self, other: &Bank) -> bool {
        self.id == other.id
            && self.address == other.address
            && self.server_name == other.server_name
            && self.dialect.fingerprint() == other.dialect.fingerprint()
            && self.framing == other.framing
            && self.header == other.header
            && self.header_sent == other.header_sent
            && self.queue_depth_max == other.queue_depth_max
            && self.inflight_per_link_max == other.inflight_per_link_max
            && self.connect_timeout == other.connect_timeout
            && self.reconnect_backoff_min == other.reconnect_backoff_min
            && self.reconnect_backoff_max == other.reconnect_backoff_max
            && self.echo_interval == other.echo_interval
            && self.echo_timeout == other.echo_timeout
            && self.write_batch_max == other.write_batch_max
            && format!("{:?}", self.saf) == format!("{:?}", other.saf)
            && self.first_stan == other.first_stan
            && self.security == other.security
    }
}

/// Bounds of the admin endpoint (`[admin]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminLimits {
    /// Connections served at once; more are closed at accept.
    pub connections_max: usize,
    /// Largest request head, bytes; a longer one gets 431.
    pub request_head_max_bytes: usize,
    /// Time a client has to send its request head.
    pub header_read_timeout: Duration,
    /// Time one request may take in all.
    pub request_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            connections_max: ADMIN_CONNECTIONS_MAX_DEFAULT,
            request_head_max_bytes: ADMIN_REQUEST_HEAD_MAX_BYTES_DEFAULT,
            header_read_timeout: Duration::from_millis(ADMIN_HEADER_READ_TIMEOUT_MS_DEFAULT),
            request_timeout: Duration::from_millis(ADMIN_REQUEST_TIMEOUT_MS_DEFAULT),
        }
    }
}

/// The admin endpoint's TLS (`[admin.tls]`): where its files are, and which
/// operators it lets change the switch. With it the endpoint speaks TLS only;
/// read-only requests need no client certificate, changes (`POST /reload`, any
/// method but GET and HEAD) need one that chains to `client_ca_file` and, with
/// `client_names`, carries one of them. The files are read by
/// [`AdminTlsFiles::load`] (at start, by `check-config` and by a reload), not by
/// [`Config::load`], so that `gen-certs` can read a config naming files it has
/// not written yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminTlsFiles {
    /// The endpoint's certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Its key.
    pub key_file: PathBuf,
    /// CA(s) operator certificates must chain to.
    pub client_ca_file: PathBuf,
    /// Names an operator certificate must carry one of (subject CN or DNS SAN,
    /// compared exactly); `None`: any certificate from `client_ca_file`.
    pub client_names: Option<Arc<[String]>>,
    /// The config file naming them (what errors name).
    config_file: PathBuf,
}

/// The admin endpoint's TLS, its files read: what the endpoint serves with.
#[derive(Clone)]
pub struct AdminTls {
    /// TLS 1.3 and 1.2; a client certificate optional, verified against the
    /// operator CA when presented.
    pub server: Arc<rustls::ServerConfig>,
    /// As [`AdminTlsFiles::client_names`].
    pub client_names: Option<Arc<[String]>>,
}

impl std::fmt::Debug for AdminTls {
    /// The names only: never key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTls")
            .field("client_names", &self.client_names)
            .finish_non_exhaustive()
    }
}

impl AdminTlsFiles {
    /// Reads the files (each a regular file of at most
    /// [`ADMIN_TLS_FILE_SIZE_MAX_BYTES`]) and builds the endpoint's TLS; an error
    /// names the config file, the key and the file read.
    pub fn load(&self) -> Result<AdminTls, ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            file: self.config_file.clone(),
            key: key.to_owned(),
            problem,
        };
        let max = ADMIN_TLS_FILE_SIZE_MAX_BYTES;
        let chain = crate::tls::load_certs_bounded(&self.cert_file, max)
            .map_err(|e| invalid("admin.tls.cert_file", e.to_string()))?;
        let key = crate::tls::load_key_bounded(&self.key_file, max)
            .map_err(|e| invalid("admin.tls.key_file", e.to_string()))?;
        let ca = crate::tls::load_certs_bounded(&self.client_ca_file, max)
            .map_err(|e| invalid("admin.tls.client_ca_file", e.to_string()))?;
        let server = crate::tls::admin_server_config(&ca, chain, key).map_err(|e| {
            let files = format!(
                "cert_file {}, key_file {}, client_ca_file {}",
                self.cert_file.display(),
                self.key_file.display(),
                self.client_ca_file.display()
            );
            invalid("admin.tls", format!("{e} ({files})"))
        })?;
        Ok(AdminTls {
            server,
            client_names: self.client_names.clone(),
        })
    }
}

/// Duplicate detection bounds (`[duplicates]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Duplicates {
    /// How long keys are remembered.
    pub window: Duration,
    /// Memory the table may use, bytes (its keys and, without a journal, answers).
    pub memory_max_bytes: usize,
    /// Duplicates waiting on one request in flight.
    pub waiters_max: usize,
}

impl Default for Duplicates {
    fn default() -> Self {
        Duplicates {
            window: Duration::from_secs(DUPLICATE_WINDOW_S_DEFAULT),
            memory_max_bytes: DUPLICATE_MEMORY_MAX_BYTES_DEFAULT,
            waiters_max: DUPLICATE_WAITERS_MAX_DEFAULT,
        }
    }
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Acquirer listener address (the first of [`Config::listeners`]).
    pub listen: SocketAddr,
    /// Every acquirer listener: `[switch]` first, then each `[[listener]]`. Their
    /// dialects share one field layout (they may differ in encodings, framing and
    /// header): inside the switch a request is held in that layout's canonical
    /// form.
    pub listeners: Vec<Listener>,
    /// Admin address serving Prometheus `/metrics`; none when absent.
    pub admin_listen: Option<SocketAddr>,
    /// Bounds of the admin endpoint.
    pub admin_limits: AdminLimits,
    /// The admin endpoint's TLS files; none: plain HTTP, changes from loopback
    /// only (and then `admin_listen` is a loopback address).
    pub admin_tls: Option<AdminTlsFiles>,
    /// The write-ahead journal; none when the section is absent.
    pub journal: Option<JournalConfig>,
    /// Duplicate detection and reversal matching.
    pub duplicates: Duplicates,
    /// Tokio worker threads.
    pub worker_threads: usize,
    /// Bound on a graceful shutdown.
    pub shutdown_grace: Duration,
    /// Message profile on acquirer connections.
    pub dialect: Arc<Dialect>,
    /// Framing on acquirer connections.
    pub framing: Framing,
    /// Header between a frame's length and the message on acquirer connections;
    /// answers carry the request's back (a TPDU with its addresses swapped).
    pub header: MessageHeader,
    /// Certificate files (unused when TLS material is given in memory).
    pub tls_files: TlsFiles,
    /// Which certificate field names the institution.
    pub identity: IdentitySource,
    /// Handshake bound for acquirers.
    pub handshake_timeout: Duration,
    /// Frame bound, both directions.
    pub frame_size_max_bytes: usize,
    /// Acquirer connections bound.
    pub connections_max: usize,
    /// In-flight bound per acquirer connection.
    pub inflight_per_connection_max: usize,
    /// Acquirer connections per institution.
    pub connections_per_institution_max: usize,
    /// Requests in flight per institution.
    pub inflight_per_institution_max: usize,
    /// Silence allowed on an acquirer connection.
    pub idle_timeout: Duration,
    /// Time a frame may take once started.
    pub frame_read_timeout: Duration,
    /// Time an acquirer has to take a batch of answers.
    pub write_timeout: Duration,
    /// Institutions allowed to connect.
    pub institutions: Vec<Institution>,
    /// Banks, indexed by [`BankIndex`].
    pub banks: Vec<Bank>,
    /// Routing table.
    pub routes: RouteTable,
    /// The key store and security module; none when `[keys]` is absent.
    pub keys: Option<KeysConfig>,
    /// The active/standby pair through NATS JetStream; none: a single node.
    pub cluster: Option<ClusterConfig>,
}

/// The key store and the security module loaded from it (`[keys]`).
#[derive(Clone, Debug)]
pub struct KeysConfig {
    /// The key store file.
    pub store: PathBuf,
    /// The local master key file (mode 0600).
    pub master_key_file: PathBuf,
    /// The module the links' keys are on: the software module holding every
    /// key of the store, or the payShield client (`module`).
    pub module: Module,
    /// The software module holding every key of the store (the journal's data
    /// key is there whichever module the links use).
    pub data: DataModule,
    /// The payShield client and its tokens file, with `module = "payshield"`.
    pub payshield: Option<PayShieldKeys>,
    /// The data key the journal enciphers PANs under (`journal_key`).
    pub journal_key: Option<KeyHandle>,
    /// DE39 for a request whose MAC fails, and for a PIN block that does not
    /// translate (`mac_failure_code`, `pin_failure_code`; 63 and 81).
    pub codes: [[u8; 2]; 2],
}

/// The payShield the links' keys are on (`[keys.payshield]`).
#[derive(Clone, Debug)]
pub struct PayShieldKeys {
    /// The client.
    pub module: Arc<PayShieldModule>,
    /// The key tokens file ([`crate::hsm_keys`]), rewritten after a rotation.
    pub keys_file: PathBuf,
}

/// The largest certificate or key file of `[keys.payshield.tls]`, bytes.
pub const PAYSHIELD_TLS_FILE_SIZE_MAX_BYTES: u64 = 1024 * 1024;

impl Config {
    /// Reads and validates a config file (a regular file of at most
    /// [`CONFIG_FILE_SIZE_MAX_BYTES`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            read_bounded(path, CONFIG_FILE_SIZE_MAX_BYTES).map_err(|source| ConfigError::Io {
                file: path.to_owned(),
                source,
            })?;
        Config::parse(&text, path)
    }

    /// Validates config text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Toml {
            file: path.to_owned(),
            source: Box::new(e),
        })?;
        Checker { file: path }.build(file)
    }

    /// The settings `new` changes that a reload cannot apply (they need a
    /// restart), by config key.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |key, same: bool| {
            if !same {
                changed.push(key);
            }
        };
        check("switch.listen", self.listen == new.listen);
        check("admin.listen", self.admin_listen == new.admin_listen);
        let codes = |c: &Config| c.keys.as_ref().map(|k| k.codes);
        check(
            "keys.mac_failure_code / pin_failure_code",
            codes(self) == codes(new),
        );
        check("admin (limits)", self.admin_limits == new.admin_limits);
        check("admin.tls", self.admin_tls == new.admin_tls);
        check(
            "switch.worker_threads",
            self.worker_threads == new.worker_threads,
        );
        check(
            "switch.dialect",
            self.dialect.fingerprint() == new.dialect.fingerprint(),
        );
        check("switch.framing", self.framing == new.framing);
        check("switch.header", self.header == new.header);
        let same = |a: &Listener, b: &Listener| {
            a.listen == b.listen
                && a.dialect.fingerprint() == b.dialect.fingerprint()
                && a.framing == b.framing
                && a.header == b.header
        };
        // The [[listener]] entries ([switch] is checked by its own keys above).
        check(
            "listener",
            self.listeners.len() == new.listeners.len()
                && self.listeners[1..]
                    .iter()
                    .zip(&new.listeners[1..])
                    .all(|(a, b)| same(a, b)),
        );
        check(
            "limits.frame_size_max_bytes",
            self.frame_size_max_bytes == new.frame_size_max_bytes,
        );
        check("tls.identity", self.identity == new.identity);
        check("duplicates", self.duplicates == new.duplicates);
        // The settings, not the replica a cluster node wires in at takeover.
        let journal = |j: &Option<JournalConfig>| {
            let settings = j.as_ref().map(|j| JournalConfig {
                replica: None,
                ..j.clone()
            });
            format!("{settings:?}")
        };
        check("journal", journal(&self.journal) == journal(&new.journal));
        check("cluster", self.cluster == new.cluster);
        changed
    }

    /// The certificate name → institution map used at handshake.
    pub fn institutions_by_certificate(&self) -> HashMap<String, InstitutionId> {
        self.institutions
            .iter()
            .map(|i| (i.certificate_name.clone(), i.id))
            .collect()
    }
}

struct Checker<'a> {
    file: &'a Path,
}

impl Checker<'_> {
    fn invalid(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    fn range<T: PartialOrd + std::fmt::Display + Copy>(
        &self,
        key: &str,
        value: T,
        min: T,
        max: T,
        unit: &str,
    ) -> Result<T, ConfigError> {
        if value < min || value > max {
            let sep = if unit.is_empty() { "" } else { " " };
            let problem = format!("must be {min}..={max}{sep}{unit}, found {value}");
            return Err(self.invalid(key, problem));
        }
        Ok(value)
    }

    fn path(&self, p: &Path) -> PathBuf {
        match self.file.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_owned(),
        }
    }

    /// `[switch]` then each `[[listener]]`: addresses distinct, one field layout.
    fn listeners(&self, f: &File, dialect: &Arc<Dialect>) -> Result<Vec<Listener>, ConfigError> {
        let s = &f.switch;
        let mut all = vec![Listener {
            listen: s.listen,
            dialect: dialect.clone(),
            framing: s.framing,
            header: self.header_of("switch", s.header, s.header_bytes)?,
        }];
        if f.listener.len() + 1 > LISTENERS_MAX {
            return Err(self.invalid(
                "listener",
                format!("at most {} [[listener]] entries", LISTENERS_MAX - 1),
            ));
        }
        for (i, l) in f.listener.iter().enumerate() {
            let key = |k: &str| format!("listener[{i}].{k}");
            // Port 0 (any free port, in tests) may repeat.
            if l.listen.port() != 0 && all.iter().any(|o| o.listen == l.listen) {
                return Err(
                    self.invalid(key("listen"), format!("{} is listened on twice", l.listen))
                );
            }
            let d = self.dialect(&key("dialect"), &l.dialect)?;
            if d.canonical().fingerprint() != dialect.canonical().fingerprint() {
                return Err(self.invalid(
                    key("dialect"),
                    format!(
                        "{} lays out its fields unlike switch.dialect {}: listeners may differ in \
                         encodings, framing and header, not in field types and lengths",
                        d.name(),
                        dialect.name()
                    ),
                ));
            }
            all.push(Listener {
                listen: l.listen,
                dialect: d,
                framing: l.framing,
                header: self.header_of(&format!("listener[{i}]"), l.header, l.header_bytes)?,
            });
        }
        Ok(all)
    }

    /// A listener's `header` and `header_bytes` (`section` names it in errors).
    fn header_of(
        &self,
        section: &str,
        header: HeaderKind,
        bytes: Option<usize>,
    ) -> Result<MessageHeader, ConfigError> {
        let key = format!("{section}.header_bytes");
        match (header, bytes) {
            (HeaderKind::None, None) => Ok(MessageHeader::None),
            (HeaderKind::Tpdu, None) => Ok(MessageHeader::Tpdu),
            (HeaderKind::Fixed, Some(n)) => {
                let n = self.range(&key, n, 1, HEADER_BYTES_MAX, "bytes")?;
                Ok(MessageHeader::Fixed(n as u8))
            }
            (HeaderKind::Fixed, None) => Err(self.invalid(key, "required with header = \"fixed\"")),
            (_, Some(_)) => Err(self.invalid(key, "only with header = \"fixed\"")),
        }
    }

    /// A bank's `header` and `header_hex` (the bytes sent before each message).
    fn bank_header(
        &self,
        key: &str,
        b: &BankSection,
    ) -> Result<(MessageHeader, Header), ConfigError> {
        let bytes = match &b.header_hex {
            None if b.header == HeaderKind::None => {
                return Ok((MessageHeader::None, Header::default()))
            }
            None => {
                return Err(self.invalid(key, "required with a header (the bytes sent, in hex)"))
            }
            Some(_) if b.header == HeaderKind::None => {
                return Err(self.invalid(key, "only with header = \"tpdu\" or \"fixed\""))
            }
            Some(hex) => parse_hex(hex).ok_or_else(|| {
                self.invalid(
                    key,
                    format!("expected an even count of hex digits, found {hex:?}"),
                )
            })?,
        };
        let header = match b.header {
            HeaderKind::Tpdu if bytes.len() != TPDU_BYTES => {
                return Err(
                    self.invalid(key, format!("a TPDU is {TPDU_BYTES} bytes (10 hex digits)"))
                )
            }
            HeaderKind::Tpdu => MessageHeader::Tpdu,
            _ => {
                let n = self.range(key, bytes.len(), 1, HEADER_BYTES_MAX, "bytes")?;
                MessageHeader::Fixed(n as u8)
            }
        };
        let sent = Header::from_slice(&bytes).ok_or_else(|| self.invalid(key, "too long"))?;
        Ok((header, sent))
    }

    fn dialect(&self, key: &str, name: &str) -> Result<Arc<Dialect>, ConfigError> {
        if let Some(d) = Dialect::builtin(name) {
            return Ok(Arc::new(d));
        }
        let path = self.path(Path::new(name));
        let text = read_bounded(&path, DIALECT_FILE_SIZE_MAX_BYTES)
            .map_err(|e| self.invalid(key, format!("{}: {e}", path.display())))?;
        let origin = path.to_string_lossy();
        if origin.ends_with(".xml") {
            Dialect::from_jpos_xml(&text, &origin)
        } else {
            Dialect::from_toml(&text, &origin)
        }
        .map(Arc::new)
        .map_err(|e| self.invalid(key, e.to_string()))
    }

    fn id(&self, key: &str, value: &str) -> Result<InstitutionId, ConfigError> {
        value
            .parse()
            .map_err(|_| self.invalid(key, format!("must be 1 to 11 digits, found {value:?}")))
    }

    /// `admin.listen` and `[admin.tls]`: an endpoint off loopback must have TLS
    /// (changes then need an operator certificate).
    fn admin_tls(&self, a: &AdminSection) -> Result<Option<AdminTlsFiles>, ConfigError> {
        let Some(t) = &a.tls else {
            if let Some(listen) = a.listen {
                if !listen.ip().to_canonical().is_loopback() {
                    return Err(self.invalid(
                        "admin.listen",
                        format!(
                            "{listen} is not a loopback address: an admin endpoint reachable \
                             from elsewhere needs [admin.tls] (operator certificates for changes)"
                        ),
                    ));
                }
            }
            return Ok(None);
        };
        if a.listen.is_none() {
            return Err(self.invalid("admin.tls", "without admin.listen there is no endpoint"));
        }
        let client_names = match &t.client_names {
            None => None,
            Some(names) => Some(self.client_names(names)?),
        };
        Ok(Some(AdminTlsFiles {
            cert_file: self.path(&t.cert_file),
            key_file: self.path(&t.key_file),
            client_ca_file: self.path(&t.client_ca_file),
            client_names,
            config_file: self.file.to_owned(),
        }))
    }

    /// `admin.tls.client_names`: 1 to [`ADMIN_CLIENT_NAMES_MAX`] names of 1 to
    /// [`ADMIN_CLIENT_NAME_MAX_BYTES`] bytes (an empty list would refuse every
    /// operator: leave the key out to accept any certificate from the CA).
    fn client_names(&self, names: &[String]) -> Result<Arc<[String]>, ConfigError> {
        let key = "admin.tls.client_names";
        self.range(key, names.len(), 1, ADMIN_CLIENT_NAMES_MAX, "names")?;
        for (i, name) in names.iter().enumerate() {
            if name.is_empty() || name.len() > ADMIN_CLIENT_NAME_MAX_BYTES {
                return Err(self.invalid(
                    format!("{key}[{i}]"),
                    format!(
                        "must be 1..={ADMIN_CLIENT_NAME_MAX_BYTES} bytes, found {}",
                        name.len()
                    ),
                ));
            }
        }
        Ok(names.into())
    }

    fn admin(&self, a: &AdminSection) -> Result<AdminLimits, ConfigError> {
        let ms = |v: u64| Duration::from_millis(v);
        Ok(AdminLimits {
            connections_max: self.range("admin.connections_max", a.connections_max, 1, 4096, "")?,
            request_head_max_bytes: self.range(
                "admin.request_head_max_bytes",
                a.request_head_max_bytes,
                8192,
                1 << 20,
                "bytes",
            )?,
            header_read_timeout: ms(self.range(
                "admin.header_read_timeout_ms",
                a.header_read_timeout_ms,
                100,
                600_000,
                "ms",
            )?),
            request_timeout: ms(self.range(
                "admin.request_timeout_ms",
                a.request_timeout_ms,
                1_000,
                600_000,
                "ms",
            )?),
        })
    }

    fn build(&self, f: File) -> Result<Config, ConfigError> {
        let s = &f.switch;
        let worker_threads = self.range("switch.worker_threads", s.worker_threads, 1, 256, "")?;
        let dialect = self.dialect("switch.dialect", &s.dialect)?;
        let t = &f.tls;
        self.range(
            "tls.handshake_timeout_ms",
            t.handshake_timeout_ms,
            100,
            120_000,
            "ms",
        )?;
        let l = &f.limits;
        let frame_max = l.frame_size_max_bytes;
        self.range(
            "limits.frame_size_max_bytes",
            frame_max,
            64,
            65_535,
            "bytes",
        )?;
        self.range(
            "limits.connections_max",
            l.connections_max,
            1,
            1_000_000,
            "",
        )?;
        let inflight = l.inflight_per_connection_max;
        self.range(
            "limits.inflight_per_connection_max",
            inflight,
            1,
            65_536,
            "",
        )?;
        self.range(
            "limits.connections_per_institution_max",
            l.connections_per_institution_max,
            1,
            1_000_000,
            "",
        )?;
        self.range(
            "limits.inflight_per_institution_max",
            l.inflight_per_institution_max,
            1,
            10_000_000,
            "",
        )?;
        self.range(
            "limits.idle_timeout_ms",
            l.idle_timeout_ms,
            100,
            86_400_000,
            "ms",
        )?;
        self.range(
            "limits.frame_read_timeout_ms",
            l.frame_read_timeout_ms,
            10,
            600_000,
            "ms",
        )?;
        self.range(
            "limits.write_timeout_ms",
            l.write_timeout_ms,
            10,
            600_000,
            "ms",
        )?;
        let admin_limits = self.admin(&f.admin)?;
        let admin_tls = self.admin_tls(&f.admin)?;
        let dup = &f.duplicates;
        self.range("duplicates.window_s", dup.window_s, 1, 7 * 86_400, "s")?;
        if dup.entries_max.is_some() {
            return Err(self.invalid(
                "duplicates.entries_max",
                "replaced by duplicates.memory_max_bytes (the table is bounded by memory)",
            ));
        }
        self.range(
            "duplicates.memory_max_bytes",
            dup.memory_max_bytes,
            DUPLICATE_MEMORY_MIN_BYTES,
            1 << 40,
            "bytes",
        )?;
        self.range("duplicates.waiters_max", dup.waiters_max, 0, 1024, "")?;
        let duplicates = Duplicates {
            window: Duration::from_secs(dup.window_s),
            memory_max_bytes: dup.memory_max_bytes,
            waiters_max: dup.waiters_max,
        };
        self.range("bank", f.bank.len(), 0, BANKS_MAX, "entries")?;
        self.range(
            "institution",
            f.institution.len(),
            0,
            INSTITUTIONS_MAX,
            "entries",
        )?;
        self.range("route", f.route.len(), 0, ROUTES_MAX, "entries")?;
        let keys = f.keys.as_ref().map(|k| self.keys(k)).transpose()?;
        let mut institutions = self.institutions(&f.institution)?;
        let banks = f
            .bank
            .iter()
            .enumerate()
            .map(|(i, b)| self.bank(i, b, frame_max))
            .collect::<Result<Vec<_>, _>>()?;
        let mut banks = banks;
        for (i, b) in f.bank.iter().enumerate() {
            let mut list = Vec::new();
            self.failover_list(
                &format!("bank[{i}].failover"),
                &b.failover,
                i,
                &banks,
                &mut list,
            )?;
            banks[i].failover = list;
        }
        let routes = self.routes(&f.route, &banks)?;
        let listeners = self.listeners(&f, &dialect)?;
        for (i, inst) in f.institution.iter().enumerate() {
            let names = LinkKeysNames {
                pin_key: inst.pin_key.as_deref(),
                pin_block_format: inst.pin_block_format.as_deref(),
                mac_key: inst.mac_key.as_deref(),
                mac: inst.mac.as_deref(),
            };
            let dialects: Vec<&Dialect> = listeners.iter().map(|l| &*l.dialect).collect();
            institutions[i].security = self.link_keys(
                &format!("institution[{i}]"),
                &names,
                keys.as_ref(),
                &dialects,
            )?;
        }
        for (i, b) in f.bank.iter().enumerate() {
            let names = LinkKeysNames {
                pin_key: b.pin_key.as_deref(),
                pin_block_format: b.pin_block_format.as_deref(),
                mac_key: b.mac_key.as_deref(),
                mac: b.mac.as_deref(),
            };
            let dialect = banks[i].dialect.clone();
            let at = format!("bank[{i}]");
            let security = self.link_keys(&at, &names, keys.as_ref(), &[&dialect])?;
            let exchange = self.key_exchange(&at, b, keys.as_ref(), &security, &dialect)?;
            banks[i].security = match exchange {
                Some(exchange) => security.with_exchange(exchange),
                None => security,
            };
        }
        let journal = f.journal.as_ref().map(|j| self.journal(j)).transpose()?;
        if let Some(j) = &journal {
            // A segment must outlive every reversal it may still hold, and every
            // request a retransmission may still name.
            let needed = banks
                .iter()
                .map(|b| b.saf.age_max + b.request_timeout)
                .chain([duplicates.window])
                .max()
                .unwrap_or_default();
            if j.retention <= needed {
                return Err(self.invalid(
                    "journal.retention_s",
                    format!(
                        "must exceed the longest reversal age plus request timeout, and the \
                         duplicates window ({} s), found {} s",
                        needed.as_secs(),
                        j.retention.as_secs()
                    ),
                ));
            }
        }
        let cluster = f
            .cluster
            .as_ref()
            .map(|c| self.cluster(c, journal.as_ref()))
            .transpose()?;
        Ok(Config {
            listen: s.listen,
            listeners,
            admin_listen: f.admin.listen,
            admin_limits,
            admin_tls,
            journal,
            duplicates,
            worker_threads,
            shutdown_grace: Duration::from_millis(self.range(
                "switch.shutdown_grace_ms",
                s.shutdown_grace_ms,
                0,
                3_600_000,
                "ms",
            )?),
            dialect,
            framing: s.framing,
            header: self.header_of("switch", s.header, s.header_bytes)?,
            tls_files: TlsFiles {
                ca_file: self.path(&t.ca_file),
                cert_file: self.path(&t.cert_file),
                key_file: self.path(&t.key_file),
                client_cert_file: self.path(&t.client_cert_file),
                client_key_file: self.path(&t.client_key_file),
                crl_file: t.crl_file.as_ref().map(|p| self.path(p)),
            },
            identity: t.identity,
            handshake_timeout: Duration::from_millis(t.handshake_timeout_ms),
            frame_size_max_bytes: frame_max,
            connections_max: l.connections_max,
            connections_per_institution_max: l.connections_per_institution_max,
            inflight_per_institution_max: l.inflight_per_institution_max,
            idle_timeout: Duration::from_millis(l.idle_timeout_ms),
            frame_read_timeout: Duration::from_millis(l.frame_read_timeout_ms),
            write_timeout: Duration::from_millis(l.write_timeout_ms),
            inflight_per_connection_max: inflight,
            institutions,
            banks,
            routes,
            keys,
            cluster,
        })
    }

    /// `[cluster]`: the NATS servers, this node's id, the stream and the lease.
    /// Needs `[journal]`: what is replicated is the journal's batches.
    fn cluster(
        &self,
        c: &ClusterSection,
        journal: Option<&JournalConfig>,
    ) -> Result<ClusterConfig, ConfigError> {
        use crate::cluster::{NAME_CHARS_MAX, NATS_SERVERS_MAX};
        if journal.is_none() {
            return Err(self.invalid(
                "cluster",
                "needs [journal]: the journal's batches are what the cluster replicates",
            ));
        }
        if c.nats.is_empty() || c.nats.len() > NATS_SERVERS_MAX {
            return Err(self.invalid(
                "cluster.nats",
                format!(
                    "1 to {NATS_SERVERS_MAX} server URLs, found {}",
                    c.nats.len()
                ),
            ));
        }
        for url in &c.nats {
            let parsed = url.parse::<async_nats::ServerAddr>();
            if parsed.is_err() {
                return Err(self.invalid("cluster.nats", format!("not a NATS server URL: {url:?}")));
            }
        }
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= NAME_CHARS_MAX
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        for (key, value) in [
            ("cluster.node_id", &c.node_id),
            ("cluster.stream", &c.stream),
        ] {
            if !name_ok(value) {
                return Err(self.invalid(
                    key,
                    format!("1 to {NAME_CHARS_MAX} letters, digits, '-' or '_', found {value:?}"),
                ));
            }
        }
        let lease_ttl = Duration::from_millis(self.range(
            "cluster.lease_ttl_ms",
            c.lease_ttl_ms,
            crate::cluster::LEASE_TTL_MS_MIN,
            crate::cluster::LEASE_TTL_MS_MAX,
            "ms",
        )?);
        let connect_timeout = Duration::from_millis(self.range(
            "cluster.connect_timeout_ms",
            c.connect_timeout_ms,
            100,
            60_000,
            "ms",
        )?);
        let credentials_file = c.credentials_file.as_ref().map(|p| self.path(p));
        let tls = match &c.tls {
            None => None,
            Some(t) => {
                if t.cert_file.is_some() != t.key_file.is_some() {
                    return Err(self.invalid("cluster.tls", "cert_file and key_file go together"));
                }
                Some(crate::cluster::NatsTlsFiles {
                    ca_file: self.path(&t.ca_file),
                    cert_file: t.cert_file.as_ref().map(|p| self.path(p)),
                    key_file: t.key_file.as_ref().map(|p| self.path(p)),
                })
            }
        };
        let compression = match c.compression.as_deref() {
            None => crate::cluster::encoding::Compression::default(),
            Some(name) => {
                crate::cluster::encoding::Compression::from_name(name).ok_or_else(|| {
                    self.invalid(
                        "cluster.compression",
                        format!("\"lz4\" or \"none\", found {name:?}"),
                    )
                })?
            }
        };
        Ok(ClusterConfig {
            nats: c.nats.clone(),
            node_id: c.node_id.clone(),
            stream: c.stream.clone(),
            lease_ttl,
            connect_timeout,
            credentials_file,
            tls,
            compression,
        })
    }

    /// `[keys]`: opens the key store (the master key file must be mode 0600) and
    /// loads every key into the software module.
    fn keys(&self, k: &KeysSection) -> Result<KeysConfig, ConfigError> {
        match (k.module.as_str(), &k.payshield) {
            ("software", None) | ("payshield", Some(_)) => {}
            ("software", Some(_)) => {
                return Err(self.invalid("keys.payshield", "only with module = \"payshield\""))
            }
            ("payshield", None) => {
                return Err(self.invalid("keys.payshield", "required with module = \"payshield\""))
            }
            (other, _) => {
                return Err(self.invalid(
                    "keys.module",
                    format!("\"software\" or \"payshield\", found {other:?}"),
                ))
            }
        }
        let (store, master_key_file) = (self.path(&k.store), self.path(&k.master_key_file));
        let opened = KeyStore::open(&store, &master_key_file)
            .map_err(|e| self.invalid("keys.store", e.to_string()))?;
        let mut module = SoftwareModule::new();
        for stored in opened.keys() {
            let usage = match stored.kind {
                KeyType::Zpk => Usage::Pin,
                KeyType::Zak => Usage::Mac,
                KeyType::Zmk | KeyType::Kbpk => Usage::KeyEncryption,
                KeyType::Dek => Usage::Data,
            };
            let key = opened
                .unwrap(&stored.id)
                .map_err(|e| self.invalid("keys.store", e.to_string()))?;
            module
                .add(&stored.id, usage, key)
                .map_err(|e| self.invalid("keys.store", e.to_string()))?;
        }
        let data = Arc::new(module);
        let journal_key = match &k.journal_key {
            None => None,
            Some(id) => {
                let wanted = (Usage::Data, Some(switchyard_security::Algorithm::Aes));
                Some(self.key_of(&*data, "keys.journal_key", id, wanted)?)
            }
        };
        let payshield = k
            .payshield
            .as_ref()
            .map(|p| self.payshield(p))
            .transpose()?;
        let module: Module = match &payshield {
            Some(p) => p.module.clone(),
            None => data.clone(),
        };
        Ok(KeysConfig {
            store,
            master_key_file,
            module,
            data,
            payshield,
            journal_key,
            codes: [
                self.code("keys.mac_failure_code", &k.mac_failure_code)?,
                self.code("keys.pin_failure_code", &k.pin_failure_code)?,
            ],
        })
    }

    /// `[keys.payshield]`: the client (it connects at the first command) and
    /// the keys of its tokens file.
    fn payshield(&self, p: &PayShieldSection) -> Result<PayShieldKeys, ConfigError> {
        let address: std::net::SocketAddr = p.address.parse().map_err(|_| {
            self.invalid(
                "keys.payshield.address",
                format!("an IP address and port, found {:?}", p.address),
            )
        })?;
        let keys_file = self.path(&p.keys_file);
        let keys = crate::hsm_keys::load(&keys_file)
            .map_err(|e| self.invalid("keys.payshield.keys_file", e.to_string()))?;
        let mut config = PayShieldConfig::new(address);
        config.header_len = p.header_len;
        config.timeout = Duration::from_millis(p.timeout_ms);
        config.connections_max = p.connections_max;
        config.keys = keys;
        if let Some(t) = &p.tls {
            let max = PAYSHIELD_TLS_FILE_SIZE_MAX_BYTES;
            let ca = crate::tls::load_certs_bounded(&self.path(&t.ca_file), max)
                .map_err(|e| self.invalid("keys.payshield.tls.ca_file", e.to_string()))?;
            let client = match (&t.cert_file, &t.key_file) {
                (Some(cert), Some(key)) => {
                    let chain = crate::tls::load_certs_bounded(&self.path(cert), max)
                        .map_err(|e| self.invalid("keys.payshield.tls.cert_file", e.to_string()))?;
                    let key = crate::tls::load_key_bounded(&self.path(key), max)
                        .map_err(|e| self.invalid("keys.payshield.tls.key_file", e.to_string()))?;
                    crate::tls::client_config(&ca, chain, key)
                }
                (None, None) => crate::tls::client_config_anonymous(&ca),
                _ => {
                    return Err(
                        self.invalid("keys.payshield.tls", "cert_file and key_file go together")
                    )
                }
            }
            .map_err(|e| self.invalid("keys.payshield.tls", e.to_string()))?;
            let server_name = rustls::pki_types::ServerName::try_from(t.server_name.clone())
                .map_err(|e| self.invalid("keys.payshield.tls.server_name", e.to_string()))?;
            config.tls = Some(PayShieldTls {
                config: client,
                server_name,
            });
        }
        let module = PayShieldModule::new(config)
            .map_err(|e| self.invalid("keys.payshield", e.to_string()))?;
        Ok(PayShieldKeys {
            module: Arc::new(module),
            keys_file,
        })
    }

    /// A DE39 the switch answers with: two digits, not 00.
    fn code(&self, key: &str, text: &str) -> Result<[u8; 2], ConfigError> {
        match text.as_bytes() {
            &[a, b] if a.is_ascii_digit() && b.is_ascii_digit() && text != "00" => Ok([a, b]),
            _ => Err(self.invalid(key, format!("two digits other than 00, found {text:?}"))),
        }
    }

    /// The handle of key `id`, which must have `usage` (and `algorithm`, when
    /// given); `key` names the setting in errors.
    fn key_of(
        &self,
        module: &dyn SecurityModule,
        key: &str,
        id: &str,
        (usage, algorithm): (Usage, Option<switchyard_security::Algorithm>),
    ) -> Result<KeyHandle, ConfigError> {
        let h = module.handle(id).ok_or_else(|| {
            let place = if module.remote() {
                "the payShield tokens file (keys.payshield.keys_file)"
            } else {
                "the key store"
            };
            self.invalid(key, format!("no key {id:?} in {place}"))
        })?;
        let info = module
            .info(h)
            .map_err(|e| self.invalid(key, e.to_string()))?;
        if info.usage != usage || algorithm.is_some_and(|a| a != info.algorithm) {
            return Err(self.invalid(
                key,
                format!(
                    "key {id:?} is a {:?} {:?} key; this takes a {usage:?} key{}",
                    info.algorithm,
                    info.usage,
                    algorithm.map_or(String::new(), |a| format!(" of {a:?}"))
                ),
            ));
        }
        Ok(h)
    }

    /// A link's PIN and MAC keys, checked against its dialects (the bank's, or
    /// every listener's for an institution): DE52 must hold the format's block,
    /// DE64 and DE128 must be fixed binary fields of 4 to 16 bytes.
    fn link_keys(
        &self,
        at: &str,
        n: &LinkKeysNames<'_>,
        keys: Option<&KeysConfig>,
        dialects: &[&Dialect],
    ) -> Result<LinkKeys, ConfigError> {
        let k = |name: &str| format!("{at}.{name}");
        let mac_algorithm = match n.mac.unwrap_or("none") {
            "none" => None,
            "iso9797-3" => Some(MacAlgorithm::Iso9797Alg3),
            "aes-cmac" => Some(MacAlgorithm::AesCmac),
            other => {
                return Err(self.invalid(
                    k("mac"),
                    format!("\"none\", \"iso9797-3\" or \"aes-cmac\", found {other:?}"),
                ))
            }
        };
        let format = match n.pin_block_format {
            None => None,
            Some("iso0") => Some(Format::Iso0),
            Some("iso1") => Some(Format::Iso1),
            Some("iso3") => Some(Format::Iso3),
            Some("iso4") => Some(Format::Iso4),
            Some(other) => {
                return Err(self.invalid(
                    k("pin_block_format"),
                    format!("\"iso0\", \"iso1\", \"iso3\" or \"iso4\", found {other:?}"),
                ))
            }
        };
        if mac_algorithm.is_none() && n.mac_key.is_some() {
            return Err(self.invalid(k("mac"), "mac_key is set: name the MAC algorithm"));
        }
        if mac_algorithm.is_some() && n.mac_key.is_none() {
            return Err(self.invalid(k("mac_key"), "required with a MAC algorithm"));
        }
        if format.is_some() != n.pin_key.is_some() {
            return Err(self.invalid(k("pin_key"), "pin_key and pin_block_format go together"));
        }
        if mac_algorithm.is_none() && format.is_none() {
            return Ok(LinkKeys::default());
        }
        let Some(keys) = keys else {
            return Err(self.invalid(at, "names keys, but there is no [keys] section"));
        };
        let module = &keys.module;
        let mut mac = None;
        if let (Some(algorithm), Some(id)) = (mac_algorithm, n.mac_key) {
            let wanted = (Usage::Mac, Some(algorithm.key_algorithm()));
            let key = self.key_of(&**module, &k("mac_key"), id, wanted)?;
            for d in dialects {
                for field in [64, 128] {
                    let fits = crate::security::binary_field_len(d, field)
                        .is_some_and(|w| (4..=16).contains(&w));
                    if !fits {
                        return Err(self.invalid(
                            k("mac"),
                            format!("dialect {} does not carry DE{field} as a fixed binary field of 4 to 16 bytes", d.name()),
                        ));
                    }
                }
            }
            mac = Some(MacSpec { key, algorithm });
        }
        let mut pin = None;
        if let (Some(format), Some(id)) = (format, n.pin_key) {
            let wanted = (Usage::Pin, Some(format.algorithm()));
            let key = self.key_of(&**module, &k("pin_key"), id, wanted)?;
            for d in dialects {
                if crate::security::binary_field_len(d, 52) != Some(format.block_len()) {
                    return Err(self.invalid(
                        k("pin_block_format"),
                        format!(
                            "dialect {} does not carry DE52 as a fixed binary field of {} bytes",
                            d.name(),
                            format.block_len()
                        ),
                    ));
                }
            }
            pin = Some(PinSpec { key, format });
        }
        Ok(LinkKeys::new(module.clone(), mac, pin))
    }

    /// A bank's key exchange (`zmk_key`, `key_block_field`, `kcv_field`): the ZMK
    /// must be a key-encrypting key of the store, the bank must have a working
    /// key to rotate, and its dialect must carry the key block and check value as
    /// text ([`key_change_field_fault`]).
    fn key_exchange(
        &self,
        at: &str,
        b: &BankSection,
        keys: Option<&KeysConfig>,
        security: &LinkKeys,
        dialect: &Dialect,
    ) -> Result<Option<KeyExchange>, ConfigError> {
        let k = |name: &str| format!("{at}.{name}");
        let Some(id) = b.zmk_key.as_deref() else {
            for (name, set) in [
                ("key_block_field", b.key_block_field),
                ("kcv_field", b.kcv_field),
            ] {
                if set.is_some() {
                    return Err(self.invalid(k(name), "only with zmk_key"));
                }
            }
            return Ok(None);
        };
        let Some(keys) = keys else {
            return Err(self.invalid(k("zmk_key"), "names a key, but there is no [keys] section"));
        };
        let zmk = self.key_of(
            &*keys.module,
            &k("zmk_key"),
            id,
            (Usage::KeyEncryption, None),
        )?;
        if security.mac.is_none() && security.pin.is_none() {
            return Err(self.invalid(
                k("zmk_key"),
                "the bank has no pin_key or mac_key: nothing to send under it",
            ));
        }
        let key_block_field = b.key_block_field.unwrap_or(KEY_BLOCK_FIELD_DEFAULT);
        let kcv_field = b.kcv_field.unwrap_or(KCV_FIELD_DEFAULT);
        if key_block_field == kcv_field {
            return Err(self.invalid(k("kcv_field"), "must differ from key_block_field"));
        }
        for (name, n, chars) in [
            ("key_block_field", key_block_field, KEY_BLOCK_CHARS_MAX),
            ("kcv_field", kcv_field, KCV_CHARS),
        ] {
            if let Some(fault) = key_change_field_fault(dialect, n, chars) {
                return Err(self.invalid(
                    k(name),
                    format!("DE{n} in dialect {}: {fault}", dialect.name()),
                ));
            }
        }
        Ok(Some(KeyExchange {
            zmk,
            key_block_field,
            kcv_field,
        }))
    }

    fn journal(&self, j: &JournalSection) -> Result<JournalConfig, ConfigError> {
        self.range("journal.queue_depth_max", j.queue_depth_max, 1, 1 << 24, "")?;
        self.range(
            "journal.batch_records_max",
            j.batch_records_max,
            1,
            1 << 20,
            "",
        )?;
        self.range("journal.batch_delay_us", j.batch_delay_us, 0, 100_000, "us")?;
        let segment = j.segment_size_max_bytes;
        self.range(
            "journal.segment_size_max_bytes",
            segment,
            1 << 16,
            1 << 34,
            "bytes",
        )?;
        // At least an hour; it must also exceed every bank's reversal_age_max_s,
        // which the caller checks (JournalConfig::retention).
        self.range(
            "journal.retention_s",
            j.retention_s,
            3_600,
            10 * 365 * 86_400,
            "s",
        )?;
        // Room for the segment being written and a new one.
        self.range(
            "journal.size_max_bytes",
            j.size_max_bytes,
            2 * segment,
            1 << 50,
            "bytes (at least twice segment_size_max_bytes)",
        )?;
        Ok(JournalConfig {
            dir: self.path(&j.dir),
            fsync: j.fsync,
            queue_depth_max: j.queue_depth_max,
            batch_records_max: j.batch_records_max,
            batch_delay: Duration::from_micros(j.batch_delay_us),
            segment_size_max_bytes: segment,
            retention: Duration::from_secs(j.retention_s),
            size_max_bytes: j.size_max_bytes,
            direct_io: j.direct_io,
            replica: None,
        })
    }

    fn institutions(&self, list: &[InstitutionSection]) -> Result<Vec<Institution>, ConfigError> {
        let mut out: Vec<Institution> = Vec::with_capacity(list.len());
        for (i, inst) in list.iter().enumerate() {
            let id = self.id(&format!("institution[{i}].id"), &inst.id)?;
            let certificate_name = inst
                .certificate_name
                .clone()
                .unwrap_or_else(|| inst.id.clone());
            if out.iter().any(|o| o.id == id) {
                return Err(self.invalid(format!("institution[{i}].id"), "defined twice"));
            }
            if out.iter().any(|o| o.certificate_name == certificate_name) {
                let key = format!("institution[{i}].certificate_name");
                return Err(self.invalid(key, "names another institution's certificate too"));
            }
            self.range(
                &format!("institution[{i}].rate_per_s"),
                inst.rate_per_s,
                1,
                10_000_000,
                "requests/s",
            )?;
            self.range(
                &format!("institution[{i}].rate_burst"),
                inst.rate_burst,
                1,
                10_000_000,
                "requests",
            )?;
            out.push(Institution {
                id,
                name: inst.name.clone(),
                certificate_name,
                rate_per_s: inst.rate_per_s,
                rate_burst: inst.rate_burst,
                security: LinkKeys::default(),
            });
        }
        Ok(out)
    }

    fn bank(&self, i: usize, b: &BankSection, frame_max: usize) -> Result<Bank, ConfigError> {
        let k = |name: &str| format!("bank[{i}].{name}");
        let ms = Duration::from_millis;
        let id = self.id(&k("id"), &b.id)?;
        if b.server_name.is_empty() {
            return Err(self.invalid(k("server_name"), "must not be empty"));
        }
        self.range(&k("links"), b.links, 1, LINKS_MAX, "")?;
        self.range(&k("queue_depth_max"), b.queue_depth_max, 1, 1_048_576, "")?;
        self.range(
            &k("inflight_per_link_max"),
            b.inflight_per_link_max,
            1,
            100_000,
            "",
        )?;
        self.range(
            &k("request_timeout_ms"),
            b.request_timeout_ms,
            10,
            120_000,
            "ms",
        )?;
        self.range(
            &k("connect_timeout_ms"),
            b.connect_timeout_ms,
            10,
            120_000,
            "ms",
        )?;
        let min = self.range(
            &k("reconnect_backoff_min_ms"),
            b.reconnect_backoff_min_ms,
            1,
            60_000,
            "ms",
        )?;
        self.range(
            &k("reconnect_backoff_max_ms"),
            b.reconnect_backoff_max_ms,
            min,
            600_000,
            "ms",
        )?;
        self.range(
            &k("echo_interval_ms"),
            b.echo_interval_ms,
            100,
            3_600_000,
            "ms",
        )?;
        self.range(&k("echo_timeout_ms"), b.echo_timeout_ms, 10, 120_000, "ms")?;
        self.range(&k("write_batch_max"), b.write_batch_max, 1, 65_536, "")?;
        let _ = frame_max;
        let header = self.bank_header(&k("header_hex"), b)?;
        Ok(Bank {
            id,
            name: b.name.clone(),
            address: b.address,
            server_name: b.server_name.clone(),
            links: b.links,
            dialect: self.dialect(&k("dialect"), &b.dialect)?,
            framing: b.framing,
            header: header.0,
            header_sent: header.1,
            queue_depth_max: b.queue_depth_max,
            inflight_per_link_max: b.inflight_per_link_max,
            request_timeout: ms(b.request_timeout_ms),
            connect_timeout: ms(b.connect_timeout_ms),
            reconnect_backoff_min: ms(b.reconnect_backoff_min_ms),
            reconnect_backoff_max: ms(b.reconnect_backoff_max_ms),
            echo_interval: ms(b.echo_interval_ms),
            echo_timeout: ms(b.echo_timeout_ms),
            write_batch_max: b.write_batch_max,
            saf: self.saf(i, b)?,
            first_stan: 1,
            failover: Vec::new(), // resolved once every bank is known
            optional: b.optional,
            security: LinkKeys::default(),
        })
    }

    fn saf(&self, i: usize, b: &BankSection) -> Result<SafLimits, ConfigError> {
        let k = |name: &str| format!("bank[{i}].{name}");
        self.range(&k("saf_depth_max"), b.saf_depth_max, 1, 10_000_000, "")?;
        let min = b.reversal_retry_min_ms;
        self.range(&k("reversal_retry_min_ms"), min, 10, 3_600_000, "ms")?;
        self.range(
            &k("reversal_retry_max_ms"),
            b.reversal_retry_max_ms,
            min,
            86_400_000,
            "ms",
        )?;
        self.range(
            &k("reversal_attempts_max"),
            b.reversal_attempts_max,
            1,
            10_000,
            "",
        )?;
        self.range(
            &k("reversal_age_max_s"),
            b.reversal_age_max_s,
            1,
            30 * 86_400,
            "s",
        )?;
        Ok(SafLimits {
            depth_max: b.saf_depth_max,
            retry_min: Duration::from_millis(min),
            retry_max: Duration::from_millis(b.reversal_retry_max_ms),
            attempts_max: b.reversal_attempts_max,
            age_max: Duration::from_secs(b.reversal_age_max_s),
        })
    }

    fn routes(&self, list: &[RouteSection], banks: &[Bank]) -> Result<RouteTable, ConfigError> {
        let mut table = RouteTable::new();
        for (i, bank) in banks.iter().enumerate() {
            if banks[..i].iter().any(|b| b.id == bank.id) {
                return Err(self.invalid(format!("bank[{i}].id"), "defined twice"));
            }
            table.add_receiver_with_failover(bank.id, i as BankIndex, &bank.failover);
        }
        let mut own = Vec::new();
        for (i, r) in list.iter().enumerate() {
            let bank_id = self.id(&format!("route[{i}].bank"), &r.bank)?;
            let Some(index) = banks.iter().position(|b| b.id == bank_id) else {
                let problem = format!("no [[bank]] has id {}", r.bank);
                return Err(self.invalid(format!("route[{i}].bank"), problem));
            };
            let failover = match &r.failover {
                None => &banks[index].failover[..],
                Some(names) => {
                    own.clear();
                    self.failover_list(
                        &format!("route[{i}].failover"),
                        names,
                        index,
                        banks,
                        &mut own,
                    )?;
                    &own[..]
                }
            };
            table
                .add_prefix_with_failover(&r.pan_prefix, index as BankIndex, failover)
                .map_err(|e| self.invalid(format!("route[{i}].pan_prefix"), e.to_string()))?;
        }
        Ok(table)
    }

    /// Resolves the failover list `names` of a route to bank `primary` (`key`
    /// names it in errors): known banks, not the primary, none twice.
    fn failover_list(
        &self,
        key: &str,
        names: &[String],
        primary: usize,
        banks: &[Bank],
        out: &mut Vec<BankIndex>,
    ) -> Result<(), ConfigError> {
        if names.len() > FAILOVER_MAX {
            return Err(self.invalid(
                key,
                format!("at most {FAILOVER_MAX} banks, found {}", names.len()),
            ));
        }
        for (j, name) in names.iter().enumerate() {
            let id = self.id(&format!("{key}[{j}]"), name)?;
            let to = banks
                .iter()
                .position(|o| o.id == id)
                .ok_or_else(|| self.invalid(key, format!("no [[bank]] has id {name}")))?;
            if to == primary || out.contains(&(to as BankIndex)) {
                return Err(self.invalid(key, format!("{name} is the bank itself or listed twice")));
            }
            out.push(to as BankIndex);
        }
        Ok(())
    }
}

/// Bytes of an even count of hex digits.
/// Why field `n` of `dialect` cannot carry `chars` characters of a key change
/// (a key block or a check value: letters and digits); `None` when it can. It
/// must be text (`an`, `ans`, `anp`) or binary, of variable length up to at
/// least `chars`, or fixed at exactly `chars`; and not a field the key change
/// itself fills in (DE7, DE11, DE39, DE70), nor a bitmap or MAC field.
pub fn key_change_field_fault(dialect: &Dialect, n: u8, chars: usize) -> Option<String> {
    if matches!(n, 0 | 1 | 7 | 11 | 39 | 64 | 65 | 70 | 128) || n > 128 {
        return Some("the key change cannot carry it there (a field it fills in itself, a bitmap or a MAC field)".to_owned());
    }
    let Some(spec) = dialect.field(n) else {
        return Some("the dialect does not define it".to_owned());
    };
    if !matches!(
        spec.ty,
        FieldType::An | FieldType::Ans | FieldType::Anp | FieldType::B
    ) {
        return Some(format!(
            "type {:?} cannot carry letters and digits (an, ans, anp or b)",
            spec.ty
        ));
    }
    let max = usize::from(spec.max);
    match spec.length {
        LengthKind::Fixed if max != chars => Some(format!(
            "fixed at {max}, it must take {chars} characters (or be of variable length)"
        )),
        LengthKind::LlVar | LengthKind::LllVar if max < chars => Some(format!(
            "holds at most {max} characters, it must take {chars}"
        )),
        _ => None,
    }
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../config/switchyard.toml");

    #[test]
    fn shipped_config_is_valid() {
        let c = Config::parse(SHIPPED, Path::new("config/switchyard.toml")).unwrap();
        assert_eq!(c.banks.len(), 3);
        assert!(c.routes.prefix_count() >= 3);
        assert_eq!(c.tls_files.ca_file, Path::new("config/../certs/ca.pem"));
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let bad = SHIPPED.replacen("links = 2", "links = 0", 1);
        let err = Config::parse(&bad, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "s.toml: bank[0].links: must be 1..=64, found 0");
        let bad = SHIPPED.replacen("bank = \"200001\"", "bank = \"777\"", 1);
        let err = Config::parse(&bad, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "s.toml: route[0].bank: no [[bank]] has id 777");
        let bad = format!("{SHIPPED}\n[limits]\nframes = 3\n");
        let err = Config::parse(&bad, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("s.toml: "), "{err}");
    }

    #[test]
    fn framings_and_headers_are_checked() {
        let parse = |text: &str| Config::parse(text, Path::new("s.toml"));
        let tpdu = SHIPPED.replacen("header = \"none\"", "header = \"tpdu\"", 1);
        let tpdu = tpdu.replacen("framing = \"u16be\"", "framing = \"bcd2\"", 1);
        let c = parse(&tpdu).unwrap();
        assert_eq!((c.framing, c.header), (Framing::Bcd2, MessageHeader::Tpdu));
        let fixed = SHIPPED.replacen("header = \"none\"", "header = \"fixed\"", 1);
        let err = parse(&fixed).unwrap_err().to_string();
        assert_eq!(
            err,
            "s.toml: switch.header_bytes: required with header = \"fixed\""
        );
        let fixed = fixed.replacen(
            "header = \"fixed\"",
            "header = \"fixed\"\nheader_bytes = 12",
            1,
        );
        assert_eq!(parse(&fixed).unwrap().header, MessageHeader::Fixed(12));
        let bank = |extra: &str| {
            SHIPPED.replacen(
                "server_name = \"bank-200001\"",
                &format!("server_name = \"bank-200001\"\n{extra}"),
                1,
            )
        };
        let err = parse(&bank("header_hex = \"6000010000\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("header = \"tpdu\""), "{err}");
        let text = bank("header_hex = \"60000100\"");
        let text = replace_bank_header(&text, "tpdu");
        let err = parse(&text).unwrap_err().to_string();
        assert_eq!(
            err,
            "s.toml: bank[0].header_hex: a TPDU is 5 bytes (10 hex digits)"
        );
        let text = replace_bank_header(&bank("header_hex = \"6000010000\""), "tpdu");
        let c = parse(&text).unwrap();
        assert_eq!(c.banks[0].header, MessageHeader::Tpdu);
        assert_eq!(c.banks[0].header_sent.as_bytes(), &[0x60, 0, 1, 0, 0]);
    }

    /// The first bank's `header = "none"` (the second in the file) set to `kind`.
    fn replace_bank_header(text: &str, kind: &str) -> String {
        let first = text.find("header = \"none\"").unwrap() + 1;
        let at = first + text[first..].find("header = \"none\"").unwrap();
        format!(
            "{}header = \"{kind}\"{}",
            &text[..at],
            &text[at + "header = \"none\"".len()..]
        )
    }

    #[test]
    fn listeners_share_one_field_layout() {
        let parse = |text: &str| Config::parse(text, Path::new("s.toml"));
        let c = parse(SHIPPED).unwrap();
        assert_eq!(c.listeners.len(), 3);
        assert_eq!(c.listeners[1].dialect.name(), "iso87-binary");
        // A 1993 listener is held in the 1987 form: it serves beside them.
        assert_eq!(c.listeners[2].dialect.name(), "iso93-ascii");
        assert_eq!(
            c.listeners[2].dialect.version(),
            crate::wire::Version::Iso1993
        );
        assert_eq!(
            (c.listeners[1].framing, c.listeners[1].header),
            (Framing::Bcd2, MessageHeader::Tpdu)
        );
        let hex = SHIPPED.replacen(
            "dialect = \"iso87-binary\"",
            "dialect = \"iso87-hexbitmap\"",
            1,
        );
        let err = parse(&hex).unwrap_err().to_string();
        assert!(
            err.starts_with("s.toml: listener[0].dialect: iso87-hexbitmap lays out its fields"),
            "{err}"
        );
        let twice = format!("{SHIPPED}\n[[listener]]\nlisten = \"127.0.0.1:8583\"\n");
        let err = parse(&twice).unwrap_err().to_string();
        assert!(err.contains("listener[2].listen"), "{err}");
    }

    #[test]
    fn route_failover_lists_are_checked() {
        let c = Config::parse(SHIPPED, Path::new("s.toml")).unwrap();
        let d = c
            .routes
            .destination(None, Some(b"4571000000000000"))
            .unwrap();
        assert_eq!((d.bank, c.routes.failover(d.failover)), (2, &[0][..]));
        let d = c
            .routes
            .destination(None, Some(b"4111000000000000"))
            .unwrap();
        assert_eq!((d.bank, c.routes.failover(d.failover)), (0, &[][..]));
        let bad = SHIPPED.replacen("failover = [\"200001\"]", "failover = [\"200009\"]", 1);
        let err = Config::parse(&bad, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "s.toml: route[3].failover: no [[bank]] has id 200009");
        let bad = SHIPPED.replacen("failover = [\"200001\"]", "failover = [\"200003\"]", 1);
        let err = Config::parse(&bad, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "s.toml: route[3].failover: 200003 is the bank itself or listed twice"
        );
    }

    #[test]
    fn journal_retention_must_outlive_reversals() {
        let short = SHIPPED.replacen("retention_s = 172800", "retention_s = 3600", 1);
        assert_ne!(short, SHIPPED);
        let err = Config::parse(&short, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("s.toml: journal.retention_s: must exceed"),
            "{err}"
        );
        let bad = SHIPPED.replacen("window_s = 300", "window_s = 0", 1);
        let err = Config::parse(&bad, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "s.toml: duplicates.window_s: must be 1..=604800 s, found 0"
        );
    }

    #[test]
    fn the_security_codes_are_two_digits_and_need_a_restart() {
        let dir = switchyard_tools::testkit::TempDir::new("config-security-codes");
        let (store, master) = (dir.path().join("keys.txt"), dir.path().join("master.key"));
        KeyStore::init(&store, &master).unwrap().save().unwrap();
        let parse = |codes: &str| {
            let text = format!(
                "[switch]\nlisten = \"127.0.0.1:0\"\n\
                 [tls]\nca_file = \"x\"\ncert_file = \"x\"\nkey_file = \"x\"\n\
                 client_cert_file = \"x\"\nclient_key_file = \"x\"\n\
                 [keys]\nstore = \"{}\"\nmaster_key_file = \"{}\"\n{codes}\n",
                store.display(),
                master.display()
            );
            Config::parse(&text, Path::new("s.toml")).map_err(|e| e.to_string())
        };
        let default = parse("").unwrap();
        assert_eq!(default.keys.as_ref().unwrap().codes, [*b"63", *b"81"]);
        let custom = parse("mac_failure_code = \"96\"\npin_failure_code = \"55\"").unwrap();
        assert_eq!(custom.keys.as_ref().unwrap().codes, [*b"96", *b"55"]);
        assert_eq!(
            default.restart_only_changes(&custom),
            ["keys.mac_failure_code / pin_failure_code"]
        );
        for bad in ["\"00\"", "\"6\"", "\"6A\"", "\"633\""] {
            assert_eq!(
                parse(&format!("mac_failure_code = {bad}")).unwrap_err(),
                format!("s.toml: keys.mac_failure_code: two digits other than 00, found {bad}")
            );
        }
    }

    #[derive(Debug)]
    struct NoReplica;

    impl crate::journal::Replica for NoReplica {
        fn attach(&self, _: std::thread::Thread) {}
        fn send(&self, _: &[u8]) {}
        fn confirmed(&self) -> Result<u64, String> {
            Ok(0)
        }
    }

    #[test]
    fn a_cluster_needs_a_journal_and_names_each_wrong_setting() {
        let parse = |journal: &str, cluster: &str| {
            let text = format!(
                "[switch]\nlisten = \"127.0.0.1:0\"\n\
                 [tls]\nca_file = \"x\"\ncert_file = \"x\"\nkey_file = \"x\"\n\
                 client_cert_file = \"x\"\nclient_key_file = \"x\"\n{journal}\n\
                 [cluster]\n{cluster}\n"
            );
            Config::parse(&text, Path::new("s.toml")).map_err(|e| e.to_string())
        };
        let journal = "[journal]\ndir = \"j\"\n";
        let good =
            "nats = [\"nats://127.0.0.1:4222\", \"nats://127.0.0.1:4223\"]\nnode_id = \"a-1\"";
        let c = parse(journal, good).unwrap();
        // The cluster's settings take a restart; the replica a node wires
        // into its journal at takeover is no change of the file.
        let mut wired = c.clone();
        if let Some(j) = &mut wired.journal {
            j.replica = Some(std::sync::Arc::new(NoReplica));
        }
        assert!(wired.restart_only_changes(&c).is_empty());
        let longer = parse(journal, &format!("{good}\nlease_ttl_ms = 20000")).unwrap();
        assert_eq!(c.restart_only_changes(&longer), ["cluster"]);
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.stream, crate::cluster::STREAM_DEFAULT);
        assert_eq!(
            cluster.lease_ttl,
            Duration::from_millis(crate::cluster::LEASE_TTL_MS_DEFAULT)
        );
        assert_eq!(cluster.subject(), "SWITCHYARD.journal");
        assert_eq!(cluster.bucket(), "SWITCHYARD-lease");
        assert_eq!(
            cluster.compression,
            crate::cluster::encoding::Compression::Lz4
        );
        let plain = parse(journal, &format!("{good}\ncompression = \"none\""))
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(
            plain.compression,
            crate::cluster::encoding::Compression::None
        );
        let refused = [
            (
                parse("", good),
                "s.toml: cluster: needs [journal]: the journal's batches are what the cluster \
                 replicates",
            ),
            (
                parse(journal, "nats = []\nnode_id = \"a\""),
                "s.toml: cluster.nats: 1 to 16 server URLs, found 0",
            ),
            (
                parse(
                    journal,
                    "nats = [\"nats://127.0.0.1:4222\"]\nnode_id = \"a.b\"",
                ),
                "s.toml: cluster.node_id: 1 to 64 letters, digits, '-' or '_', found \"a.b\"",
            ),
            (
                parse(journal, &format!("{good}\nstream = \"S*\"")),
                "s.toml: cluster.stream: 1 to 64 letters, digits, '-' or '_', found \"S*\"",
            ),
            (
                parse(journal, &format!("{good}\nlease_ttl_ms = 100")),
                "s.toml: cluster.lease_ttl_ms: must be 500..=60000 ms, found 100",
            ),
            (
                parse(journal, &format!("{good}\ncompression = \"zstd\"")),
                "s.toml: cluster.compression: \"lz4\" or \"none\", found \"zstd\"",
            ),
        ];
        for (result, says) in refused {
            assert_eq!(result.unwrap_err(), says);
        }
    }

    #[test]
    fn a_payshield_module_takes_its_keys_from_the_tokens_file() {
        let dir = switchyard_tools::testkit::TempDir::new("config-payshield");
        let (store, master) = (dir.path().join("keys.txt"), dir.path().join("master.key"));
        KeyStore::init(&store, &master).unwrap().save().unwrap();
        let tokens = dir.path().join("hsm-keys.toml");
        std::fs::write(
            &tokens,
            "[[key]]\nid = \"zak\"\ntype = \"zak\"\nalgorithm = \"tdes\"\n\
             token = \"U0123456789ABCDEF0123456789ABCDEF\"\nkcv = \"08D7B4\"\n",
        )
        .unwrap();
        let parse = |keys: &str, institution: &str| {
            let text = format!(
                "[switch]\nlisten = \"127.0.0.1:0\"\n\
                 [tls]\nca_file = \"x\"\ncert_file = \"x\"\nkey_file = \"x\"\n\
                 client_cert_file = \"x\"\nclient_key_file = \"x\"\n\
                 [keys]\nstore = \"{}\"\nmaster_key_file = \"{}\"\n{keys}\n\
                 [[institution]]\nid = \"100001\"\n{institution}\n",
                store.display(),
                master.display()
            );
            Config::parse(&text, Path::new("s.toml")).map_err(|e| e.to_string())
        };
        let hsm = format!(
            "module = \"payshield\"\n[keys.payshield]\naddress = \"127.0.0.1:1500\"\n\
             keys_file = \"{}\"\n",
            tokens.display()
        );
        let mac = "mac_key = \"zak\"\nmac = \"iso9797-3\"";
        let c = parse(&hsm, mac).unwrap();
        let keys = c.keys.as_ref().unwrap();
        assert!(keys.payshield.is_some() && keys.module.remote());
        assert!(c.institutions[0].security.has_mac());
        let refused = [
            (
                parse(&hsm, "mac_key = \"nope\"\nmac = \"iso9797-3\""),
                "s.toml: institution[0].mac_key: no key \"nope\" in the payShield tokens file \
                 (keys.payshield.keys_file)",
            ),
            (
                parse("module = \"payshield\"", ""),
                "s.toml: keys.payshield: required with module = \"payshield\"",
            ),
            (
                parse(&hsm.replace("\"payshield\"\n[", "\"software\"\n["), ""),
                "s.toml: keys.payshield: only with module = \"payshield\"",
            ),
            (
                parse(&hsm.replace("\"payshield\"\n[", "\"thales\"\n["), ""),
                "s.toml: keys.module: \"software\" or \"payshield\", found \"thales\"",
            ),
            (
                parse(&hsm.replace("127.0.0.1:1500", "hsm:1500"), ""),
                "s.toml: keys.payshield.address: an IP address and port, found \"hsm:1500\"",
            ),
        ];
        for (result, says) in refused {
            assert_eq!(result.unwrap_err(), says);
        }
        let no_file = parse(&hsm.replace("hsm-keys.toml", "missing.toml"), "").unwrap_err();
        assert!(
            no_file.starts_with("s.toml: keys.payshield.keys_file: "),
            "{no_file}"
        );
    }

    #[test]
    fn a_bank_key_exchange_is_checked_against_its_store_and_dialect() {
        use switchyard_security::{Algorithm, Key};
        let dir = switchyard_tools::testkit::TempDir::new("config-key-exchange");
        let (store, master) = (dir.path().join("keys.txt"), dir.path().join("master.key"));
        let mut keys = KeyStore::init(&store, &master).unwrap();
        for (id, kind) in [("zmk", KeyType::Zmk), ("zak", KeyType::Zak)] {
            let key = Key::random(Algorithm::Tdes, 16).unwrap();
            keys.insert(id, kind, &key).unwrap();
        }
        keys.save().unwrap();
        let parse = |bank: &str| {
            let text = format!(
                "[switch]\nlisten = \"127.0.0.1:0\"\n\
                 [tls]\nca_file = \"x\"\ncert_file = \"x\"\nkey_file = \"x\"\n\
                 client_cert_file = \"x\"\nclient_key_file = \"x\"\n\
                 [keys]\nstore = \"{}\"\nmaster_key_file = \"{}\"\n\
                 [[institution]]\nid = \"100001\"\n\
                 [[bank]]\nid = \"200001\"\naddress = \"127.0.0.1:9\"\nserver_name = \"b\"\n{bank}\n\
                 [[route]]\npan_prefix = \"4\"\nbank = \"200001\"\n",
                store.display(),
                master.display()
            );
            Config::parse(&text, Path::new("s.toml")).map_err(|e| e.to_string())
        };
        let mac = "mac_key = \"zak\"\nmac = \"iso9797-3\"\n";
        let c = parse(&format!("{mac}zmk_key = \"zmk\"")).unwrap();
        let exchange = c.banks[0].security.exchange.unwrap();
        assert_eq!(
            (exchange.key_block_field, exchange.kcv_field),
            (KEY_BLOCK_FIELD_DEFAULT, KCV_FIELD_DEFAULT)
        );
        assert_eq!(c.banks[0].security.zmk_id().as_deref(), Some("zmk"));
        assert!(parse(mac).unwrap().banks[0].security.exchange.is_none());
        let refused = [
            (
                format!("{mac}zmk_key = \"zak\""),
                "s.toml: bank[0].zmk_key: key \"zak\" is a Tdes Mac key; this takes a \
                 KeyEncryption key",
            ),
            (
                format!("{mac}zmk_key = \"nope\""),
                "s.toml: bank[0].zmk_key: no key \"nope\" in the key store",
            ),
            (
                "zmk_key = \"zmk\"".to_owned(),
                "s.toml: bank[0].zmk_key: the bank has no pin_key or mac_key",
            ),
            (
                format!("{mac}key_block_field = 120"),
                "s.toml: bank[0].key_block_field: only with zmk_key",
            ),
            (
                format!("{mac}zmk_key = \"zmk\"\nkey_block_field = 53"),
                "s.toml: bank[0].key_block_field: DE53 in dialect iso87-ascii: type N cannot \
                 carry letters and digits",
            ),
            (
                format!("{mac}zmk_key = \"zmk\"\nkcv_field = 70"),
                "s.toml: bank[0].kcv_field: DE70 in dialect iso87-ascii: the key change \
                 cannot carry it there",
            ),
            (
                format!("{mac}zmk_key = \"zmk\"\nkcv_field = 48"),
                "s.toml: bank[0].kcv_field: must differ from key_block_field",
            ),
            (
                format!("{mac}zmk_key = \"zmk\"\nkcv_field = 41"),
                "s.toml: bank[0].kcv_field: DE41 in dialect iso87-ascii: fixed at 8, it must \
                 take 6 characters",
            ),
        ];
        for (bank, want) in refused {
            let err = parse(&bank).unwrap_err();
            assert!(err.starts_with(want), "{err}\nwanted: {want}");
        }
        // Another field that carries text will do.
        let c = parse(&format!(
            "{mac}zmk_key = \"zmk\"\nkey_block_field = 120\nkcv_field = 63"
        ))
        .unwrap();
        let exchange = c.banks[0].security.exchange.unwrap();
        assert_eq!((exchange.key_block_field, exchange.kcv_field), (120, 63));
    }

    #[test]
    fn an_admin_endpoint_off_loopback_needs_tls() {
        let parse = |text: &str| Config::parse(text, Path::new("s.toml"));
        let listen = |addr: &str| {
            let text = SHIPPED.replacen(
                "listen = \"127.0.0.1:9464\"",
                &format!("listen = \"{addr}\""),
                1,
            );
            assert_ne!(text, SHIPPED);
            text
        };
        for addr in ["0.0.0.0:9464", "192.0.2.10:9464", "[::]:9464"] {
            let err = parse(&listen(addr)).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!(
                    "s.toml: admin.listen: {addr} is not a loopback address: an admin endpoint \
                     reachable from elsewhere needs [admin.tls]"
                )),
                "{err}"
            );
        }
        assert_eq!(
            parse(&listen("[::1]:9464")).unwrap().admin_listen,
            Some("[::1]:9464".parse().unwrap())
        );
        let c = parse(SHIPPED).unwrap();
        assert!(
            c.admin_tls.is_none(),
            "the shipped endpoint: plain, loopback"
        );

        // With [admin.tls] the address may be any; the files are read by load().
        let dir = switchyard_tools::testkit::TempDir::new("config-admin-tls");
        let ca = switchyard_tools::certs::DevCa::new("operator CA").unwrap();
        let server = ca.issue_server(&["localhost"]).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let (cert, key) = (
            write("admin.pem", &server.cert_pem),
            write("admin.key", &server.key_pem),
        );
        let client_ca = write("operators.pem", &ca.ca_pem());
        let tls = |extra: &str| {
            format!(
                "{}\n[admin.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
                 client_ca_file = \"{client_ca}\"\n{extra}",
                listen("0.0.0.0:9464")
            )
        };
        let c = parse(&tls("client_names = [\"ops-1\", \"ops-2\"]\n")).unwrap();
        let files = c.admin_tls.clone().unwrap();
        let loaded = files.load().unwrap();
        assert_eq!(loaded.client_names.as_deref().unwrap(), ["ops-1", "ops-2"]);
        let any = parse(&tls("")).unwrap();
        assert!(any.admin_tls.as_ref().unwrap().client_names.is_none());
        assert_eq!(any.restart_only_changes(&c), ["admin.tls"]);
        assert!(c.restart_only_changes(&c.clone()).is_empty());

        let err = parse(&tls("client_names = []\n")).unwrap_err().to_string();
        assert_eq!(
            err,
            "s.toml: admin.tls.client_names: must be 1..=256 names, found 0"
        );
        let err = parse(&tls("client_names = [\"\"]\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "s.toml: admin.tls.client_names[0]: must be 1..=253 bytes, found 0"
        );
        let err = parse(&tls("ca_file = \"x.pem\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `ca_file`"), "{err}");
        let unlisted = format!(
            "{}\n[admin.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
             client_ca_file = \"{client_ca}\"\n",
            SHIPPED.replacen("listen = \"127.0.0.1:9464\"\n", "", 1)
        );
        let err = parse(&unlisted).unwrap_err().to_string();
        assert_eq!(
            err,
            "s.toml: admin.tls: without admin.listen there is no endpoint"
        );

        // A missing or oversized file: the key and the file named.
        let mut missing = files.clone();
        missing.key_file = dir.path().join("missing.key");
        let err = missing.load().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "s.toml: admin.tls.key_file: cannot read {}",
                missing.key_file.display()
            )),
            "{err}"
        );
        let mut huge = files.clone();
        huge.cert_file = dir.path().join("huge.pem");
        std::fs::write(&huge.cert_file, server.cert_pem.repeat(2_000)).unwrap();
        let err = huge.load().unwrap_err().to_string();
        assert!(
            err.starts_with("s.toml: admin.tls.cert_file: cannot read ")
                && err.contains("huge.pem")
                && err.ends_with(&format!(
                    "more than the {ADMIN_TLS_FILE_SIZE_MAX_BYTES} allowed"
                )),
            "{err}"
        );
        let mut swapped = files.clone();
        swapped.key_file = files.cert_file.clone();
        let err = swapped.load().unwrap_err().to_string();
        assert!(err.starts_with("s.toml: admin.tls.key_file: "), "{err}");
    }
}
