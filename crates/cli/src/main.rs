//! `switchyard`: the daemon and its tools. Thin: parse arguments, call the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use switchyard::config::Config;
use switchyard::daemon::{self, TlsSetup};
use switchyard::journal::Fsync;
use switchyard::wire::{Dialect, Framing};
use switchyard_tools::banksim::{self, BankSimOptions, BankStats, Behavior};
use switchyard_tools::certs::{self, DevCa};
use switchyard_tools::demo::{self, DemoOptions};
use switchyard_tools::loadgen::{self, LoadOptions};

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
    /// Run a simulated bank host (mutual TLS).
    BankSim {
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
        /// Dialect name or file.
        #[arg(long, default_value = "iso87-ascii")]
        dialect: String,
        /// Framing: u16be or ascii4.
        #[arg(long, default_value = "u16be", value_parser = parse_framing)]
        framing: Framing,
    },
    /// Drive load at a switch (closed loop, or open loop with --rate) and report throughput
    /// and latency.
    Loadgen {
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
    },
    /// Check or print a write-ahead journal (read-only).
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Ask a running switch to reload its config file (`POST /reload` on its admin
    /// endpoint; the same as SIGHUP). Exits 0 when the new config was applied.
    Reload {
        /// The switch's admin endpoint (`[admin] listen`).
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin: std::net::SocketAddr,
    },
    /// Settlement totals from a journal: per acquirer, issuer and currency, the
    /// approved financial requests net of reversals, and each institution's net
    /// position (exact decimals; each currency's positions sum to zero).
    Settlement {
        /// Journal directory.
        #[arg(long)]
        dir: PathBuf,
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
    },
    /// Start the switch with simulated banks and load, all in-process; print a summary.
    Demo {
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
    },
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Check every record of every segment and print counts; fails on corruption.
    Verify {
        /// Journal directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print every record, card numbers masked.
    Dump {
        /// Journal directory.
        #[arg(long)]
        dir: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Dialect of the stored messages (name or file).
        #[arg(long, default_value = "iso87-ascii")]
        dialect: String,
    },
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
    match s {
        "u16be" => Ok(Framing::U16be),
        "ascii4" => Ok(Framing::Ascii4),
        _ => Err(format!("expected u16be or ascii4, found {s:?}")),
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

/// Unix ms from `1234567890123` or an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
fn parse_time(text: &str) -> anyhow::Result<u64> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> anyhow::Result<i64> {
        std::str::from_utf8(b.get(r).context("too short")?)?
            .parse::<i64>()
            .context("not a number")
    };
    anyhow::ensure!(
        b.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b.ends_with(b"Z"),
        "expected Unix ms or YYYY-MM-DDTHH:MM:SSZ"
    );
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let millis = if b.get(19) == Some(&b'.') {
        let frac = &text[20..text.len() - 1];
        format!("{frac:0<3}")[..3]
            .parse::<i64>()
            .context("fraction")?
    } else {
        0
    };
    anyhow::ensure!(
        (1..=12).contains(&m) && (1..=31).contains(&d) && hh < 24 && mm < 60 && ss < 61,
        "date or time out of range"
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + hh * 3_600 + mm * 60 + ss) * 1_000) + millis;
    u64::try_from(ms).context("before 1970")
}

fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, log_format } => {
            init_logs_as("info", log_format);
            let config_path = config.clone();
            let config = Config::load(&config)?;
            let tls = TlsSetup::from_files(&config.tls_files)?;
            runtime(config.worker_threads)?.block_on(async move {
                let admin = match config.admin_listen {
                    Some(addr) => {
                        let metrics = switchyard::telemetry::install_recorder()
                            .context("metrics recorder")?;
                        let listener = tokio::net::TcpListener::bind(addr)
                            .await
                            .with_context(|| format!("binding the admin endpoint {addr}"))?;
                        let admin = listener.local_addr()?;
                        tracing::info!(%admin, "admin endpoint: http://{admin}/metrics, /healthz, /readyz, /status");
                        Some((listener, metrics))
                    }
                    None => None,
                };
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("binding {}", config.listen))?;
                let listen = listener.local_addr()?;
                let admin_addr = admin
                    .as_ref()
                    .and_then(|(l, _)| l.local_addr().ok())
                    .map_or_else(|| "none".to_owned(), |a| a.to_string());
                tracing::info!(%listen, admin = %admin_addr, banks = config.banks.len(), "switchyard running");
                daemon::run(
                    listener,
                    admin,
                    Some(config_path),
                    config,
                    tls,
                    daemon::terminate_signal(),
                )
                .await?;
                Ok(())
            })
        }
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            // The files a reload reads again too, with the same errors.
            switchyard::daemon::TlsSetup::from_files(&c.tls_files)
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            println!(
                "{}: valid, with its TLS files ({} institutions, {} banks, {} PAN prefixes)",
                config.display(),
                c.institutions.len(),
                c.banks.len(),
                c.routes.prefix_count()
            );
            Ok(())
        }
        Command::GenCerts { out, config } => gen_certs(&out, &config),
        Command::Journal { command } => journal(command),
        Command::Reload { admin } => runtime(1)?.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let exchange = async {
                let mut tcp = tokio::net::TcpStream::connect(admin).await?;
                tcp.write_all(
                    b"POST /reload HTTP/1.1\r\nHost: switchyard\r\nContent-Length: 0\r\n\r\n",
                )
                .await?;
                let mut response = String::new();
                tcp.read_to_string(&mut response).await?;
                Ok::<_, std::io::Error>(response)
            };
            let response = tokio::time::timeout(std::time::Duration::from_secs(30), exchange)
                .await
                .context("no answer within 30 s")?
                .with_context(|| format!("admin endpoint {admin}"))?;
            let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
            print!("{body}");
            anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "reload rejected");
            Ok(())
        }),
        Command::Settlement {
            dir,
            from,
            to,
            json,
            dialect,
        } => {
            let from_ms = parse_time(&from).with_context(|| format!("--from {from}"))?;
            let to_ms = parse_time(&to).with_context(|| format!("--to {to}"))?;
            anyhow::ensure!(from_ms < to_ms, "--from must be before --to");
            let dialect = switchyard::wire::Dialect::load(&dialect)?;
            let s = switchyard::journal::settlement::settle(&dir, from_ms, to_ms, &dialect)?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!("settlement {from} .. {to} ({} records read)", s.records);
                println!(
                    "{:<36} {:>9} {:>18} {:>9} {:>18} {:>18}",
                    "acquirer -> issuer currency", "approved", "sum", "reversed", "sum", "net"
                );
                for (pair, t) in &s.pairs {
                    println!(
                        "{pair:<36} {:>9} {:>18} {:>9} {:>18} {:>18}",
                        t.approved, t.approved_sum, t.reversed, t.reversed_sum, t.net
                    );
                }
                println!("net positions (positive: to receive)");
                for (who, net) in &s.positions {
                    println!("  {who:<24} {net:>18}");
                }
                for (currency, sum) in &s.balance {
                    println!("  {currency}: positions sum to {sum}");
                }
            }
            anyhow::ensure!(s.balanced(), "positions do not sum to zero");
            Ok(())
        }
        Command::BankSim {
            listen,
            certs_dir,
            name,
            latency_ms,
            drop_per_million,
            dialect,
            framing,
        } => {
            init_logs("info");
            let ca = switchyard::tls::load_certs(&certs_dir.join("ca.pem"))?;
            let chain = switchyard::tls::load_certs(&certs_dir.join(format!("{name}.pem")))?;
            let key = switchyard::tls::load_key(&certs_dir.join(format!("{name}.key")))?;
            let server = switchyard::tls::server_config(&ca, chain, key)?;
            let opts = BankSimOptions {
                dialect: Arc::new(Dialect::load(&dialect)?),
                framing,
                frame_size_max_bytes: switchyard::config::FRAME_SIZE_MAX_BYTES_DEFAULT,
                seed: 1,
            };
            let behavior = Arc::new(Behavior::new(
                Duration::from_millis(latency_ms),
                drop_per_million,
            ));
            runtime(1)?.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen).await?;
                tracing::info!(%listen, %name, "bank simulator running");
                let stats = Arc::new(BankStats::default());
                banksim::serve(
                    listener,
                    server,
                    opts,
                    behavior,
                    stats,
                    daemon::terminate_signal(),
                )
                .await?;
                Ok(())
            })
        }
        Command::Loadgen {
            target,
            server_name,
            certs_dir,
            institution,
            destination,
            connections,
            window,
            rate,
            duration,
            warmup,
            timeout_ms,
            decline_every,
            json,
            no_progress,
            hgrm,
            plot,
        } => {
            init_logs("warn");
            let identities = loadgen::identities_from_dir(&certs_dir, &institution)?;
            let opts = LoadOptions {
                destinations: destination,
                pans: vec!["4111111111111111".to_owned(), "5500000000000004".to_owned()],
                connections,
                window,
                rate,
                warmup: Duration::from_secs(warmup),
                duration: Duration::from_secs(duration),
                answer_timeout: Duration::from_millis(timeout_ms),
                progress: !no_progress,
                decline_every,
                ..LoadOptions::new(target, &server_name, identities)
            };
            let summary = runtime(2)?.block_on(loadgen::run(opts))?;
            if let Some(warning) = summary.behind_warning() {
                eprintln!("warning: {warning}");
            }
            if json {
                println!("{}", summary.full_json());
            } else {
                println!("{}", summary.render());
            }
            if let Some(path) = hgrm {
                std::fs::write(&path, loadgen::hgrm_text(&summary.histogram))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some(path) = plot {
                loadgen::write_plot(&path, &summary)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Demo {
            duration,
            json,
            serve,
            certs_dir,
            connections,
            window,
            bank_latency_ms,
            journal,
        } => {
            let journal = journal.fsync();
            init_logs("warn");
            let rt = runtime(2)?;
            let bank_latency = Duration::from_millis(bank_latency_ms);
            if serve {
                let shutdown = daemon::terminate_signal();
                let serving = demo::serve_demo(&certs_dir, bank_latency, journal, shutdown);
                return rt.block_on(serving);
            }
            let duration = Duration::from_secs(duration);
            let opts = DemoOptions {
                duration,
                connections,
                window,
                bank_latency,
                journal,
            };
            let summary = rt.block_on(demo::run_demo(opts))?;
            if json {
                println!("{}", summary.demo_json());
            } else {
                println!("{}", summary.render());
            }
            Ok(())
        }
    }
}

fn journal(command: JournalCommand) -> anyhow::Result<()> {
    use switchyard::journal::dump;
    match command {
        JournalCommand::Verify { dir } => {
            let (s, recovery) = switchyard::journal::recovery::recover(&dir)?;
            println!("{}", dump::report(&dir, &s));
            println!("{}", switchyard::journal::recovery::summary(&recovery));
        }
        JournalCommand::Dump { dir, json, dialect } => {
            let dialect = Dialect::load(&dialect)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let s = dump::dump(&dir, &dialect, json, &mut out)?;
            std::io::Write::flush(&mut out)?;
            eprintln!("{}", dump::report(&dir, &s));
        }
    }
    Ok(())
}

fn gen_certs(out: &Path, config: &Path) -> anyhow::Result<()> {
    let c = Config::load(config)?;
    // An existing CA in `out` is extended: only certificates not there yet are
    // issued (an institution or bank added to the config, for a reload).
    let (ca, extended) = match DevCa::load(out)? {
        Some(ca) => (ca, true),
        None => {
            let ca = DevCa::new("switchyard development CA")?;
            certs::write_ca(out, &ca)?;
            (ca, false)
        }
    };
    let mut written = Vec::new();
    let mut issue = |stem: &str, make: &dyn Fn() -> Result<certs::Issued, certs::CertError>| {
        if extended && out.join(format!("{stem}.pem")).is_file() {
            return Ok::<_, anyhow::Error>(());
        }
        certs::write_issued(out, stem, &make()?)?;
        written.push(stem.to_owned());
        Ok(())
    };
    issue("switch", &|| {
        ca.issue_server(&["localhost", "127.0.0.1", "switchyard"])
    })?;
    issue("switch-client", &|| ca.issue_client("switchyard"))?;
    for inst in &c.institutions {
        issue(&inst.certificate_name, &|| {
            ca.issue_client(&inst.certificate_name)
        })?;
    }
    for bank in &c.banks {
        let stem = format!("bank-{}", bank.id);
        issue(&stem, &|| ca.issue_server(&[&bank.server_name]))?;
    }
    let what = if extended {
        "extended the CA in"
    } else {
        "wrote a new CA (ca.pem, ca.key) in"
    };
    println!(
        "{what} {}: {}",
        out.display(),
        if written.is_empty() {
            "no new certificates needed".to_owned()
        } else {
            format!("issued {}", written.join(", "))
        }
    );
    Ok(())
}
