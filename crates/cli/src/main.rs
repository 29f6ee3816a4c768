//! `switchyard`: the daemon and its tools. Thin: parse arguments, call the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use switchyard::admin::{request_reload, request_rotate, request_step_down, ReloadTls};
use switchyard::config::{Config, FRAME_SIZE_MAX_BYTES_DEFAULT};
use switchyard::journal::settlement::{self, parse_time};
use switchyard::journal::{dump, Fsync};
use switchyard::security::{WorkingKey, KCV_FIELD_DEFAULT, KEY_BLOCK_FIELD_DEFAULT};
use switchyard::service::{self, Stopped};
use switchyard::wire::{Dialect, Framing, MessageHeader, HEADER_BYTES_MAX};
use switchyard_security::module::MacAlgorithm;
use switchyard_security::store::{self, KeyStore, KeyType};
use switchyard_security::{Algorithm, Key};
use switchyard_tools::banksim::{self, BankSimOptions, Behavior, SimKeys};
use switchyard_tools::certs;
use switchyard_tools::demo::{self, DemoOptions};
use switchyard_tools::loadgen::{self, LoadOptions, Report};

/// How long `switchyard reload` waits for the switch's answer (a reload waits up to
/// 5 s for new banks' links).
const RELOAD_WAIT_S: u64 = 30;
/// How long `switchyard keys rotate` waits for the switch's answer (the switch
/// answers within its `admin.request_timeout_ms`, 30 s by default).
const ROTATE_WAIT_S: u64 = 60;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A payment switch: ISO 8583 over mutual TLS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the switch daemon from a config file.
    Run {
        /// Config file.
        #[arg(long, default_value = "config/switchyard.toml")]
        config: PathBuf,
        /// Log lines as text (default) or as JSON objects, one per line.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a config file and exit (0: valid).
    CheckConfig {
        /// Config file.
        #[arg(long, default_value = "config/switchyard.toml")]
        config: PathBuf,
    },
    /// Write a development CA and certificates for the switch, its banks and institutions.
    GenCerts {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Config naming the institutions and banks.
        #[arg(long, default_value = "config/switchyard.toml")]
        config: PathBuf,
    },
    /// List the shipped dialects, or print one's interface definition.
    Dialect {
        #[command(subcommand)]
        command: DialectCommand,
    },
    /// Run a simulated bank host (mutual TLS).
    BankSim(BankSimArgs),
    /// Drive load at a switch (closed loop, or open loop with --rate) and report throughput
    /// and latency.
    Loadgen(LoadgenArgs),
    /// Check or print a write-ahead journal (read-only).
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Ask a running switch to reload its config file (`POST /reload` on its admin
    /// endpoint; the same as SIGHUP). Exits 0 when the new config was applied.
    Reload(AdminClientArgs),
    /// Settlement totals from a journal: per acquirer, issuer and currency, the
    /// approved financial requests net of reversals, and each institution's net
    /// position (exact decimals; each currency's positions sum to zero).
    Settlement(SettlementArgs),
    /// Start the switch with simulated banks and load, all in-process; print a summary.
    Demo(DemoArgs),
    /// The key store: keys wrapped under a local master key, imported from
    /// components or TR-31 key blocks, generated, exported as TR-31 key blocks.
    /// No clear key is ever printed.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// An active/standby pair through NATS JetStream (`[cluster]`): its state,
    /// and a manual step-down for maintenance.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

/// `switchyard cluster …`.
#[derive(Subcommand)]
enum ClusterCommand {
    /// Print (JSON) what NATS holds: the stream (messages, last sequence,
    /// replicas, leader, the newest batch's epoch and node), the lease (holder,
    /// revision, age) and each standby's progress (lag in messages).
    Status {
        /// Config file (its `[cluster]` section).
        #[arg(long, default_value = "config/switchyard.toml")]
        config: PathBuf,
    },
    /// Ask the active node to step down (`POST /cluster/step-down` on its admin
    /// endpoint): it drains, gives its lease up, and exits; the standby takes
    /// over at once.
    StepDown {
        #[command(flatten)]
        admin: AdminClientArgs,
    },
}

/// How a command reaches a running switch's admin endpoint.
#[derive(clap::Args)]
struct AdminClientArgs {
    /// The switch's admin endpoint (`[admin] listen`).
    #[arg(long, default_value = "127.0.0.1:9464")]
    admin: std::net::SocketAddr,
    /// With `[admin.tls]`: the CA that signed the endpoint's certificate (PEM);
    /// the request then goes over TLS.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The operator certificate chain to present (PEM; with --tls-ca and --key).
    #[arg(long, requires_all = ["tls_ca", "key"])]
    cert: Option<PathBuf>,
    /// The operator certificate's key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The name the endpoint's certificate must carry (default: the IP address
    /// of --admin).
    #[arg(long, requires = "tls_ca")]
    server_name: Option<String>,
}

impl AdminClientArgs {
    /// The TLS to reach the endpoint with, when --tls-ca is given.
    fn tls(&self) -> anyhow::Result<Option<ReloadTls>> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| self.admin.ip().to_string());
        let operator = self.cert.as_deref().zip(self.key.as_deref());
        Ok(Some(ReloadTls::from_files(ca, operator, &name)?))
    }
}

#[derive(clap::Args)]
/// `switchyard bank-sim`.
struct BankSimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9101")]
    listen: SocketAddr,
    /// Directory with ca.pem and <name>.pem / <name>.key.
    #[arg(long, default_value = "certs")]
    certs_dir: PathBuf,
    /// Certificate stem of this bank (as written by gen-certs: bank-<id>).
    #[arg(long, default_value = "bank-200001")]
    name: String,
    /// Answer delay, ms.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Requests out of a million left unanswered (1000000: a silent bank).
    #[arg(long, default_value_t = 0)]
    drop_per_million: u32,
    /// MAC key (ZAK), clear hex (a simulator's key): requests' MACs are checked
    /// (63 when they fail), answers MAC'ed, key changes may replace it.
    #[arg(long, requires = "mac")]
    zak: Option<String>,
    /// The ZAK's MAC algorithm: iso9797-3 (TDES) or aes-cmac (AES).
    #[arg(long, requires = "zak", value_parser = parse_mac)]
    mac: Option<MacAlgorithm>,
    /// PIN key (ZPK), clear hex: key changes may replace it (PIN blocks are not checked).
    #[arg(long)]
    zpk: Option<String>,
    /// The ZPK's algorithm: tdes or aes.
    #[arg(long, default_value = "tdes", value_parser = parse_algorithm)]
    zpk_algorithm: Algorithm,
    /// Key-encrypting key (ZMK) of key changes (0800 DE70 161), clear hex.
    #[arg(long)]
    zmk: Option<String>,
    /// The ZMK's algorithm: tdes (TR-31 version B blocks) or aes (version D).
    #[arg(long, default_value = "tdes", value_parser = parse_algorithm)]
    zmk_algorithm: Algorithm,
    /// The field of a key change's key block (the switch's `key_block_field`).
    #[arg(long, default_value_t = KEY_BLOCK_FIELD_DEFAULT)]
    key_block_field: u8,
    /// The field of a key change's check value (the switch's `kcv_field`).
    #[arg(long, default_value_t = KCV_FIELD_DEFAULT)]
    kcv_field: u8,
    #[command(flatten)]
    wire: WireArgs,
}

/// How a peer speaks on the wire: `bank-sim` as a bank, `loadgen` to a listener.
#[derive(clap::Args)]
struct WireArgs {
    /// Dialect: a shipped name or a file.
    #[arg(long, default_value = "iso87-ascii")]
    dialect: String,
    /// Framing: u16be, u16be-inclusive, ascii4, hex4 or bcd2.
    #[arg(long, default_value = "u16be", value_parser = parse_framing)]
    framing: Framing,
    /// Header after the length: none, tpdu (5 bytes, answered with its addresses
    /// swapped) or fixed:N (N bytes, echoed).
    #[arg(long, default_value = "none", value_parser = parse_header)]
    header: MessageHeader,
}

#[derive(clap::Subcommand)]
enum DialectCommand {
    /// The dialects built into the binary, with their descriptions.
    List,
    /// A dialect's settings and field table: what to hand a bank connecting for
    /// the first time.
    Show {
        /// A shipped dialect's name or a dialect file.
        dialect: String,
        /// As Markdown (a list of settings and a table).
        #[arg(long)]
        markdown: bool,
    },
}

#[derive(clap::Args)]
/// `switchyard loadgen`.
struct LoadgenArgs {
    /// Switch address.
    #[arg(long)]
    target: SocketAddr,
    /// TLS name of the switch's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Directory with ca.pem and <institution>.pem / .key.
    #[arg(long)]
    certs_dir: PathBuf,
    /// Acquirer institutions (comma-separated), one certificate each.
    #[arg(long, value_delimiter = ',', required = true)]
    institution: Vec<String>,
    /// DE100 destinations (comma-separated); none: route by PAN.
    #[arg(long, value_delimiter = ',')]
    destination: Vec<String>,
    /// Connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests in flight per connection (with --rate: a hard cap).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Open loop: requests per second over all connections, latency measured from each
    /// request's intended send time. Omitted: closed loop.
    #[arg(long)]
    rate: Option<u64>,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of unrecorded load before the measured period.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// A request unanswered this long counts as a timeout, ms.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Every Nth request of a connection gets a declining amount; 0: never.
    #[arg(long, default_value_t = 20)]
    decline_every: u32,
    #[command(flatten)]
    wire: WireArgs,
    /// Print the summary as one JSON object (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    no_progress: bool,
    /// Write the latency distribution in HdrHistogram's .hgrm text format (ms).
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Write an SVG chart of latency by percentile.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(clap::Args)]
/// `switchyard demo`.
struct DemoArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Serve for an external client instead of driving load.
    #[arg(long)]
    serve: bool,
    /// With --serve: where to write ca.pem and the institutions' certificates.
    #[arg(long, default_value = "demo-certs")]
    certs_dir: PathBuf,
    /// With --serve: the acquirers' dialect (a shipped name or a file).
    #[arg(long, default_value = "iso87-ascii")]
    dialect: String,
    /// With --serve: the acquirers' framing (u16be, u16be-inclusive, ascii4,
    /// hex4, bcd2).
    #[arg(long, default_value = "u16be", value_parser = parse_framing)]
    framing: Framing,
    /// With --serve: acquirers send a 5-byte TPDU before each message (answered
    /// with its addresses swapped).
    #[arg(long)]
    tpdu: bool,
    /// Acquirer connections of the built-in load.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Delay the simulated banks add to every answer, ms (default: none, so the
    /// switch is what is measured).
    #[arg(long, default_value_t = 0)]
    bank_latency_ms: u64,
    /// Write-ahead journal in a temporary directory: "batch" (fsync per group
    /// commit, the default), "off" (no fsync; unsafe) or "none" (no journal).
    #[arg(long, value_enum, default_value_t = JournalMode::Batch)]
    journal: JournalMode,
    /// PIN and MAC keys on every link of the built-in load: "tdes" (ISO 0 PIN
    /// blocks, ISO 9797-1 algorithm 3 MACs), "aes" (ISO 0 PIN blocks, AES-CMAC),
    /// or "none" (the default). Test keys, made in memory.
    #[arg(long, value_enum, default_value_t = DemoKeysArg::None)]
    keys: DemoKeysArg,
}

/// `demo --keys`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DemoKeysArg {
    None,
    Tdes,
    Aes,
}

#[derive(clap::Args)]
/// `switchyard settlement`.
struct SettlementArgs {
    #[command(flatten)]
    source: JournalSource,
    /// Window start (inclusive): RFC 3339 UTC (`2026-11-26T00:00:00Z`) or Unix ms.
    #[arg(long)]
    from: String,
    /// Window end (exclusive), as `--from`.
    #[arg(long)]
    to: String,
    /// One JSON object.
    #[arg(long)]
    json: bool,
    /// Dialect of the stored messages (name or file).
    #[arg(long, default_value = "iso87-ascii")]
    dialect: String,
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Check every record of every segment and print counts; fails on corruption.
    Verify {
        #[command(flatten)]
        source: JournalSource,
    },
    /// Print every record, card numbers masked.
    Dump {
        #[command(flatten)]
        source: JournalSource,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Dialect of the stored messages (name or file).
        #[arg(long, default_value = "iso87-ascii")]
        dialect: String,
    },
}

/// Which journal a command reads: a directory, or a cluster's stream.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct JournalSource {
    /// Journal directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// A config file with `[cluster]`: read the cluster's stream (copied, up to
    /// its last sequence now, into a temporary directory removed afterwards).
    #[arg(long)]
    cluster_config: Option<PathBuf>,
}

/// A journal directory to read, and the temporary copy of a stream to remove.
struct JournalDir {
    dir: PathBuf,
    temporary: bool,
}

impl Drop for JournalDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl JournalSource {
    /// The directory to read: `--dir`, or a fresh copy of the stream.
    fn open(&self) -> anyhow::Result<JournalDir> {
        if let Some(dir) = &self.dir {
            return Ok(JournalDir {
                dir: dir.clone(),
                temporary: false,
            });
        }
        let path = self
            .cluster_config
            .as_ref()
            .context("--dir or --cluster-config")?;
        let cluster = Config::load(path)?
            .cluster
            .with_context(|| format!("{}: no [cluster] section", path.display()))?;
        let dir = std::env::temp_dir().join(format!("switchyard-stream-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let copy = JournalDir {
            dir: dir.clone(),
            temporary: true,
        };
        let copied = service::runtime(1)?
            .block_on(switchyard::cluster::standby::copy_stream(&cluster, &dir))?;
        eprintln!(
            "stream {}: {} batch messages copied, journal records up to {}",
            cluster.stream, copied.0, copied.1
        );
        Ok(copy)
    }
}

/// Where the key store is: both files, for every `keys` subcommand.
#[derive(clap::Args)]
struct StoreArgs {
    /// Key store file (text; each key wrapped under the master key).
    #[arg(long)]
    store: PathBuf,
    /// Master key file: 32 raw bytes or 64 hex digits, mode 0600.
    #[arg(long)]
    master_key_file: PathBuf,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a random master key file (mode 0600) and an empty store, where missing.
    Init {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Add a key: from clear components (XORed), or from a TR-31 key block
    /// unwrapped under a stored ZMK or KBPK. Prints id, type, algorithm and KCV.
    Import(KeysImportArgs),
    /// Add a random key. Prints id, type, algorithm and KCV.
    Generate {
        #[command(flatten)]
        store: StoreArgs,
        /// The new key's id.
        #[arg(long)]
        id: String,
        /// zmk, zpk, zak, kbpk or dek.
        #[arg(long = "type", value_name = "TYPE", value_parser = parse_key_type)]
        kind: KeyType,
        /// tdes or aes.
        #[arg(long, value_parser = parse_algorithm)]
        algorithm: Algorithm,
        /// Key length, bytes (default 16; a dek: 32 for aes, 24 for tdes).
        #[arg(long)]
        length: Option<usize>,
    },
    /// Print a stored key as a TR-31 key block under a stored ZMK or KBPK
    /// (version D under AES, B under TDES).
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// The key to export.
        #[arg(long)]
        id: String,
        /// The ZMK or KBPK to wrap it under.
        #[arg(long)]
        under: String,
    },
    /// Every key's id, type, algorithm and KCV.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// A JSON array of objects.
        #[arg(long)]
        json: bool,
    },
    /// Rotate a bank's working key through the running switch (`POST /keys/rotate`
    /// on its admin endpoint): a new key goes to the bank under its ZMK in an 0800
    /// key change, is used once the bank approves, and is saved in the key store.
    /// Prints the switch's answer (JSON: the new KCV, or why not); exits 0 when the
    /// new key is in use and saved.
    Rotate {
        /// The bank's id (`[[bank]] id`).
        #[arg(long)]
        bank: String,
        /// zak or zpk.
        #[arg(long = "type", value_name = "TYPE", value_parser = parse_working_key)]
        kind: WorkingKey,
        #[command(flatten)]
        admin: AdminClientArgs,
    },
}

/// `switchyard keys import`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["components", "tr31"])))]
struct KeysImportArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The new key's id.
    #[arg(long)]
    id: String,
    /// zmk, zpk, zak, kbpk or dek.
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_key_type)]
    kind: KeyType,
    /// With --component: tdes or aes.
    #[arg(long, value_parser = parse_algorithm, requires = "components")]
    algorithm: Option<Algorithm>,
    /// A clear component, hex (repeat for each; all XORed together).
    #[arg(long = "component", requires = "algorithm")]
    components: Vec<String>,
    /// The key's expected check value (6 hex digits): on a mismatch nothing is written.
    #[arg(long)]
    kcv: Option<String>,
    /// A TR-31 key block (its algorithm is the key's).
    #[arg(long, requires = "under", conflicts_with = "components")]
    tr31: Option<String>,
    /// With --tr31: the stored ZMK or KBPK the block is wrapped under.
    #[arg(long, requires = "tr31")]
    under: Option<String>,
}

fn parse_key_type(s: &str) -> Result<KeyType, String> {
    s.parse().map_err(|e: store::StoreError| e.to_string())
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    store::algorithm_from_name(s).map_err(|e| e.to_string())
}

fn parse_working_key(s: &str) -> Result<WorkingKey, String> {
    WorkingKey::from_name(s).ok_or_else(|| format!("zak or zpk, found {s:?}"))
}

fn parse_mac(s: &str) -> Result<MacAlgorithm, String> {
    match s {
        "iso9797-3" => Ok(MacAlgorithm::Iso9797Alg3),
        "aes-cmac" => Ok(MacAlgorithm::AesCmac),
        _ => Err(format!("iso9797-3 or aes-cmac, found {s:?}")),
    }
}

/// The demo's journal: `fsync` per group commit, no `fsync`, or none at all.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum JournalMode {
    Batch,
    Off,
    None,
}

impl JournalMode {
    fn fsync(self) -> Option<Fsync> {
        match self {
            JournalMode::Batch => Some(Fsync::Batch),
            JournalMode::Off => Some(Fsync::Off),
            JournalMode::None => None,
        }
    }
}

fn parse_framing(s: &str) -> Result<Framing, String> {
    s.parse()
}

fn parse_header(s: &str) -> Result<MessageHeader, String> {
    match s {
        "none" => Ok(MessageHeader::None),
        "tpdu" => Ok(MessageHeader::Tpdu),
        _ => s
            .strip_prefix("fixed:")
            .and_then(|n| n.parse::<u8>().ok())
            .filter(|n| (1..=HEADER_BYTES_MAX).contains(&usize::from(*n)))
            .map(MessageHeader::Fixed)
            .ok_or_else(|| {
                format!("expected none, tpdu or fixed:N (N 1..={HEADER_BYTES_MAX}), found {s:?}")
            }),
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

fn init_logs(default: &str) {
    init_logs_as(default, LogFormat::Text);
}

/// Logs to stderr at `default` level (or `RUST_LOG`), as text or JSON.
fn init_logs_as(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        // Colours only for a person at a terminal, not in files or journald.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run { config, log_format } => run(config, log_format),
        Command::CheckConfig { config } => {
            println!("{}", service::check_config(&config)?);
            Ok(())
        }
        Command::GenCerts { out, config } => {
            println!("{}", certs::gen_certs(&out, &config)?);
            Ok(())
        }
        Command::Journal { command } => journal(command),
        Command::Reload(admin) => {
            let limit = Duration::from_secs(RELOAD_WAIT_S);
            let tls = admin.tls()?;
            let (applied, words) =
                service::runtime(1)?.block_on(request_reload(admin.admin, tls.as_ref(), limit))?;
            print!("{words}");
            anyhow::ensure!(applied, "reload rejected");
            Ok(())
        }
        Command::Settlement(args) => settlement(args),
        Command::Dialect { command } => {
            match command {
                DialectCommand::List => {
                    for (name, _) in switchyard::wire::BUILTIN_DIALECTS {
                        let d = Dialect::load(name)?;
                        println!("{name:<18} {}", d.description());
                    }
                }
                DialectCommand::Show { dialect, markdown } => {
                    print!("{}", Dialect::load(&dialect)?.describe(markdown));
                }
            }
            Ok(())
        }
        Command::BankSim(args) => bank_sim(args),
        Command::Loadgen(args) => loadgen(args),
        Command::Demo(args) => demo(args),
        Command::Keys { command } => keys(command),
        Command::Cluster { command } => cluster(command),
    }
}

fn run(config: PathBuf, log_format: LogFormat) -> anyhow::Result<()> {
    init_logs_as("info", log_format);
    let loaded = Config::load(&config)?;
    let workers = loaded.worker_threads;
    let stopped = service::runtime(workers)?.block_on(service::run_file(config, loaded))?;
    if stopped == Stopped::Interrupted {
        // A second signal: at once, without waiting for anything.
        std::process::exit(1);
    }
    Ok(())
}

fn journal(command: JournalCommand) -> anyhow::Result<()> {
    match command {
        JournalCommand::Verify { source } => {
            let dir = source.open()?;
            println!("{}", dump::verify(&dir.dir)?)
        }
        JournalCommand::Dump {
            source,
            json,
            dialect,
        } => {
            let opened = source.open()?;
            let dir = &opened.dir;
            let dialect = Dialect::load(&dialect)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let scan = dump::dump(dir, &dialect, json, &mut out)?;
            std::io::Write::flush(&mut out)?;
            eprintln!("{}", dump::report(dir, &scan));
        }
    }
    Ok(())
}

fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Init { store: s } => {
            let ks = KeyStore::init(&s.store, &s.master_key_file)?;
            println!(
                "key store {}: {} keys; master key file {}",
                s.store.display(),
                ks.keys().len(),
                s.master_key_file.display()
            );
        }
        KeysCommand::Import(args) => keys_import(args)?,
        KeysCommand::Generate {
            store: s,
            id,
            kind,
            algorithm,
            length,
        } => {
            let mut ks = KeyStore::open(&s.store, &s.master_key_file)?;
            let length = length.unwrap_or(match (kind, algorithm) {
                (KeyType::Dek, Algorithm::Aes) => 32,
                (KeyType::Dek, Algorithm::Tdes) => 24,
                _ => 16,
            });
            let key = Key::random(algorithm, length)?;
            ks.insert(&id, kind, &key)?;
            ks.save()?;
            print_entry(&ks, &id);
        }
        KeysCommand::Export {
            store: s,
            id,
            under,
        } => {
            let ks = KeyStore::open(&s.store, &s.master_key_file)?;
            println!("{}", ks.export_tr31(&id, &under)?);
        }
        KeysCommand::List { store: s, json } => {
            let ks = KeyStore::open(&s.store, &s.master_key_file)?;
            if json {
                let list: Vec<serde_json::Value> = ks
                    .keys()
                    .iter()
                    .map(|k| {
                        serde_json::json!({"id": k.id, "type": k.kind.name(),
                            "algorithm": store::algorithm_name(k.algorithm),
                            "kcv": store::kcv_hex(k.kcv)})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                println!("{:<24} {:<5} {:<9} KCV", "ID", "TYPE", "ALGORITHM");
                for k in ks.keys() {
                    println!("{}", entry_line(k));
                }
            }
        }
        KeysCommand::Rotate { bank, kind, admin } => keys_rotate(&bank, kind, &admin)?,
    }
    Ok(())
}

fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Status { config } => {
            let loaded = Config::load(&config)?;
            let cluster = loaded
                .cluster
                .with_context(|| format!("{}: no [cluster] section", config.display()))?;
            let status = service::runtime(1)?.block_on(switchyard::cluster::status(&cluster))?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        ClusterCommand::StepDown { admin } => {
            let tls = admin.tls()?;
            let asked = request_step_down(admin.admin, tls.as_ref(), Duration::from_secs(10));
            let (status, words) = service::runtime(1)?.block_on(asked)?;
            print!("{words}");
            anyhow::ensure!(status == 200, "step-down refused ({status})");
        }
    }
    Ok(())
}

/// `keys rotate`: asks the switch, prints its answer, fails unless the new key is
/// in use and saved.
fn keys_rotate(bank: &str, kind: WorkingKey, admin: &AdminClientArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !bank.is_empty() && bank.bytes().all(|b| b.is_ascii_digit()),
        "--bank: an institution id (digits), found {bank:?}"
    );
    let tls = admin.tls()?;
    let limit = Duration::from_secs(ROTATE_WAIT_S);
    let asked = request_rotate(admin.admin, tls.as_ref(), bank, kind, limit);
    let (status, words) = service::runtime(1)?.block_on(asked)?;
    print!("{words}");
    let answer: serde_json::Value = serde_json::from_str(&words)
        .with_context(|| format!("the switch answered {status}, not JSON"))?;
    anyhow::ensure!(
        answer["ok"] == true,
        "rotation failed ({status}): {}",
        answer["reason"].as_str().unwrap_or("no reason given")
    );
    anyhow::ensure!(
        answer["saved"] == true,
        "the new key is in use with the bank but NOT saved in the key store: {}",
        answer["save_error"].as_str().unwrap_or("no reason given")
    );
    Ok(())
}

/// `keys import`: components (XORed, KCV checked before anything is written) or
/// a TR-31 key block under a stored key.
fn keys_import(mut a: KeysImportArgs) -> anyhow::Result<()> {
    let s = &a.store;
    let mut ks = KeyStore::open(&s.store, &s.master_key_file)?;
    if let (Some(block), Some(under)) = (&a.tr31, &a.under) {
        ks.import_tr31(&a.id, a.kind, block, under)?;
        if let Some(given) = &a.kcv {
            store::check_kcv(&a.id, &ks.unwrap(&a.id)?, given)?;
        }
    } else {
        let algorithm = a.algorithm.context("--component needs --algorithm")?;
        let key = key_from_components(algorithm, &a.components);
        zeroize::Zeroize::zeroize(&mut a.components);
        let key = key?;
        if let Some(given) = &a.kcv {
            store::check_kcv(&a.id, &key, given)?;
        }
        ks.insert(&a.id, a.kind, &key)?;
    }
    ks.save()?;
    print_entry(&ks, &a.id);
    Ok(())
}

/// The key of hex components, XORed; errors never quote a component.
fn key_from_components(algorithm: Algorithm, hex: &[String]) -> anyhow::Result<Key> {
    let mut parts = Vec::with_capacity(hex.len());
    for (i, h) in hex.iter().enumerate() {
        let part = unhex_secret(h).with_context(|| {
            format!("--component {} is not an even number of hex digits", i + 1)
        })?;
        parts.push(part);
    }
    if let Some(p) = parts.iter().find(|p| p.len() != parts[0].len()) {
        anyhow::bail!(
            "components differ in length ({} and {} bytes)",
            parts[0].len(),
            p.len()
        );
    }
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    Ok(Key::from_components(algorithm, &refs)?)
}

/// Hex digits (either case) to bytes wiped on drop; `None` if not hex.
fn unhex_secret(hex: &str) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let b = hex.as_bytes();
    if b.is_empty() || b.len() % 2 != 0 {
        return None;
    }
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(b.len() / 2));
    for pair in b.chunks(2) {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        out.push((hi * 16 + lo) as u8);
    }
    Some(out)
}

fn entry_line(k: &store::StoredKey) -> String {
    format!(
        "{:<24} {:<5} {:<9} {}",
        k.id,
        k.kind.name(),
        store::algorithm_name(k.algorithm),
        store::kcv_hex(k.kcv)
    )
}

fn print_entry(ks: &KeyStore, id: &str) {
    if let Some(k) = ks.get(id) {
        println!("{}", entry_line(k));
    }
}

fn settlement(a: SettlementArgs) -> anyhow::Result<()> {
    let from_ms = parse_time(&a.from).with_context(|| format!("--from {}", a.from))?;
    let to_ms = parse_time(&a.to).with_context(|| format!("--to {}", a.to))?;
    anyhow::ensure!(from_ms < to_ms, "--from must be before --to");
    let dialect = Dialect::load(&a.dialect)?;
    let dir = a.source.open()?;
    let s = settlement::settle(&dir.dir, from_ms, to_ms, &dialect)?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        print!("{}", s.table(&a.from, &a.to));
    }
    anyhow::ensure!(s.balanced(), "positions do not sum to zero");
    Ok(())
}

fn bank_sim(a: BankSimArgs) -> anyhow::Result<()> {
    init_logs("info");
    let clear = |what: &str, hex: &Option<String>, algorithm: Algorithm| match hex {
        None => Ok(None),
        Some(hex) => {
            let bytes = unhex_secret(hex).with_context(|| format!("--{what}: hex digits"))?;
            anyhow::Ok(Some(
                Key::new(algorithm, &bytes).with_context(|| format!("--{what}"))?,
            ))
        }
    };
    let zak = match a.mac {
        Some(mac) => clear("zak", &a.zak, mac.key_algorithm())?.map(|k| (mac, k)),
        None => None,
    };
    let zpk = clear("zpk", &a.zpk, a.zpk_algorithm)?;
    let zmk = clear("zmk", &a.zmk, a.zmk_algorithm)?;
    let keys = (zak.is_some() || zpk.is_some() || zmk.is_some())
        .then(|| Arc::new(SimKeys::new(zak, zpk, zmk).with_fields(a.key_block_field, a.kcv_field)));
    let opts = BankSimOptions {
        dialect: Arc::new(Dialect::load(&a.wire.dialect)?),
        framing: a.wire.framing,
        header: a.wire.header,
        frame_size_max_bytes: FRAME_SIZE_MAX_BYTES_DEFAULT,
        seed: 1,
        keys,
    };
    let latency = Duration::from_millis(a.latency_ms);
    let behavior = Arc::new(Behavior::new(latency, a.drop_per_million));
    let shutdown = service::terminate_signal();
    let serving =
        banksim::serve_from_dir(a.listen, &a.certs_dir, &a.name, opts, behavior, shutdown);
    service::runtime(1)?.block_on(serving)
}

fn loadgen(a: LoadgenArgs) -> anyhow::Result<()> {
    init_logs("warn");
    let identities = loadgen::identities_from_dir(&a.certs_dir, &a.institution)?;
    let opts = LoadOptions {
        destinations: a.destination,
        pans: vec!["4111111111111111".to_owned(), "5500000000000004".to_owned()],
        connections: a.connections,
        window: a.window,
        rate: a.rate,
        warmup: Duration::from_secs(a.warmup),
        duration: Duration::from_secs(a.duration),
        answer_timeout: Duration::from_millis(a.timeout_ms),
        progress: !a.no_progress,
        decline_every: a.decline_every,
        dialect: Arc::new(Dialect::load(&a.wire.dialect)?),
        framing: a.wire.framing,
        header: a.wire.header,
        ..LoadOptions::new(a.target, &a.server_name, identities)
    };
    let report = Report {
        json: a.json,
        hgrm: a.hgrm,
        plot: a.plot,
    };
    let running = loadgen::run_and_report(opts, &report);
    println!("{}", service::runtime(2)?.block_on(running)?);
    Ok(())
}

fn demo(a: DemoArgs) -> anyhow::Result<()> {
    init_logs("warn");
    let rt = service::runtime(2)?;
    let bank_latency = Duration::from_millis(a.bank_latency_ms);
    let journal = a.journal.fsync();
    if a.serve {
        let shutdown = service::terminate_signal();
        let acquirers = demo::Speaks {
            dialect: a.dialect,
            framing: a.framing,
            header: if a.tpdu {
                MessageHeader::Tpdu
            } else {
                MessageHeader::None
            },
        };
        return rt.block_on(demo::serve_demo(
            &a.certs_dir,
            acquirers,
            bank_latency,
            journal,
            shutdown,
        ));
    }
    let opts = DemoOptions {
        duration: Duration::from_secs(a.duration),
        connections: a.connections,
        window: a.window,
        bank_latency,
        journal,
        keys: match a.keys {
            DemoKeysArg::None => None,
            DemoKeysArg::Tdes => Some(demo::DemoKeys::Tdes),
            DemoKeysArg::Aes => Some(demo::DemoKeys::Aes),
        },
    };
    let summary = rt.block_on(demo::run_demo(opts))?;
    let text = if a.json {
        summary.demo_json()
    } else {
        summary.render()
    };
    println!("{text}");
    Ok(())
}
