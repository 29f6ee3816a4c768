//! The demo and the test bed: a switch, simulated banks and fresh certificates,
//! all in-process on loopback, nothing to prepare.

use crate::banksim::{self, BankSimOptions, BankStats, Behavior, SimKeys};
use crate::certs::{self, DevCa};
use crate::loadgen::{self, Identity, LoadKeys, LoadOptions, Summary};
use anyhow::Context;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use switchyard::config::Config;
use switchyard::daemon::Switch;
use switchyard::journal::{Fsync, JournalConfig};
use switchyard::tls;
use switchyard::tls::TlsSetup;
use switchyard::wire::{Dialect, Framing, MessageHeader};
use switchyard_security::module::{MacAlgorithm, SoftwareModule};
use switchyard_security::pin::Format;
use switchyard_security::{Algorithm, Key};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Acquirer institutions of the demo.
pub const DEMO_INSTITUTIONS: [&str; 3] = ["100001", "100002", "100003"];
/// Time allowed for every bank link to come up at start.
const LINKS_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// How to build a test bed.
#[derive(Clone, Debug)]
pub struct TestbedOptions {
    /// Simulated banks (ids 200001, 200002, …; PAN prefixes 4, 5, 6, … route to them).
    pub banks: usize,
    /// Banks listed in config whose host is not running (ids after the simulated ones).
    pub banks_down: usize,
    /// Acquirer institutions in config.
    pub institutions: Vec<String>,
    /// Links per bank.
    pub links: usize,
    /// Request deadline at every bank, ms.
    pub request_timeout_ms: u64,
    /// Answer delay of the simulated banks.
    pub bank_latency: Duration,
    /// Requests in flight per acquirer connection.
    pub inflight_per_connection_max: usize,
    /// Idle time before a bank link sends an echo, ms.
    pub echo_interval_ms: u64,
    /// Bank links' `echo_timeout_ms`.
    pub echo_timeout_ms: u64,
    /// STAN every bank link starts from.
    pub first_stan: u32,
    /// Journal in a fresh temporary directory with this durability (None: no journal).
    pub journal: Option<Fsync>,
    /// Use this journal directory instead of a fresh one; for restart tests. It is
    /// the caller's: [`Testbed::stop`] leaves it in place.
    pub journal_at: Option<std::path::PathBuf>,
    /// Seconds request keys are remembered (`[duplicates] window_s`). Short by
    /// default: the demo runs at hundreds of thousands of requests per second,
    /// and the table holds rate × window keys (within
    /// [`DEMO_DUPLICATE_MEMORY_MAX_BYTES`]; past it the window shrinks).
    pub duplicate_window_s: u64,
    /// `[limits]` keys written as they are (e.g. `idle_timeout_ms = 300`), one per
    /// line, for tests of the session limits.
    pub limits: Vec<String>,
    /// Each institution's sustained rate limit (requests/s) and burst. High by
    /// default: the demo runs at hundreds of thousands of payments per second.
    pub rate_per_s: u32,
    /// See `rate_per_s`.
    pub rate_burst: u32,
    /// `(bank id, failover bank id)` pairs written into `[[bank]] failover`.
    pub failover: Vec<(String, String)>,
    /// More `[[route]]` tables (TOML), after those of the banks.
    pub routes: Vec<String>,
    /// Banks written with `optional = true` (readiness does not wait for them).
    pub optional: Vec<String>,
    /// How acquirers speak to the switch (`[switch] dialect`, `framing`, `header`).
    pub acquirers: Speaks,
    /// How simulated bank `i` speaks (its `[[bank]] dialect`, `framing`,
    /// `header`); banks past the list speak as [`Speaks::default`].
    pub bank_speaks: Vec<Speaks>,
    /// More acquirer listeners (`[[listener]]`), each speaking its way; their
    /// addresses are [`Testbed::listener_addrs`] after the first.
    pub more_listeners: Vec<Speaks>,
    /// Bank hosts the caller runs (e.g. an independent implementation), after
    /// the simulated banks: their address and how they speak. Their server
    /// certificate (for `bank-<id>`, ids following the simulated banks') comes
    /// from [`TestbedOptions::ca`].
    pub outside_banks: Vec<(SocketAddr, Speaks)>,
    /// The CA to use (one the caller already issued certificates from); a fresh
    /// one when `None`.
    pub ca: Option<Arc<DevCa>>,
    /// PIN and MAC keys on every link (institutions and simulated banks).
    pub keys: Option<DemoKeys>,
}

/// Keys on every link of a test bed: each institution and each bank has a PIN
/// key (TDES, ISO format 0: the demo dialect's DE52 holds 8 bytes) and a MAC key,
/// fixed test keys made in memory (no key store).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoKeys {
    /// TDES MAC keys: ISO 9797-1 algorithm 3.
    Tdes,
    /// AES MAC keys: AES-CMAC.
    Aes,
}

/// The test bed's keys: the switch's module and handles, and clear copies for
/// the simulated banks and the load generator (test keys).
struct BedKeys {
    acquirer: switchyard::security::LinkKeys,
    bank: switchyard::security::LinkKeys,
    mac: MacAlgorithm,
    acq_zpk: [u8; 16],
    bank_zpk: [u8; 16],
    bank_zak: [u8; 16],
}

impl BedKeys {
    fn new(kind: DemoKeys) -> anyhow::Result<BedKeys> {
        use switchyard::security::{LinkKeys, MacSpec, PinSpec};
        use switchyard_security::module::Usage;
        let (mac, mac_alg) = match kind {
            DemoKeys::Tdes => (MacAlgorithm::Iso9797Alg3, Algorithm::Tdes),
            DemoKeys::Aes => (MacAlgorithm::AesCmac, Algorithm::Aes),
        };
        let acq_zpk = *b"\x01\x23\x45\x67\x89\xAB\xCD\xEF\xFE\xDC\xBA\x98\x76\x54\x32\x10";
        let acq_zak = *b"\x89\xAB\xCD\xEF\x01\x23\x45\x67\x76\x54\x32\x10\xFE\xDC\xBA\x98";
        let bank_zpk = *b"\xF1\xE2\xD3\xC4\xB5\xA6\x97\x88\x79\x6A\x5B\x4C\x3D\x2E\x1F\x01";
        let bank_zak = *b"\x13\x57\x9B\xDF\x02\x46\x8A\xCE\x01\x23\x45\x67\x89\xAB\xCD\xEF";
        let mut m = SoftwareModule::new();
        let k = |alg, bytes: &[u8; 16]| Key::new(alg, bytes).context("demo key");
        let a_zpk = m.add("acq-zpk", Usage::Pin, k(Algorithm::Tdes, &acq_zpk)?)?;
        let a_zak = m.add("acq-zak", Usage::Mac, k(mac_alg, &acq_zak)?)?;
        let b_zpk = m.add("bank-zpk", Usage::Pin, k(Algorithm::Tdes, &bank_zpk)?)?;
        let b_zak = m.add("bank-zak", Usage::Mac, k(mac_alg, &bank_zak)?)?;
        let module = Arc::new(m);
        let link = |zpk, zak| {
            LinkKeys::new(
                module.clone(),
                Some(MacSpec {
                    key: zak,
                    algorithm: mac,
                }),
                Some(PinSpec {
                    key: zpk,
                    format: Format::Iso0,
                }),
            )
        };
        Ok(BedKeys {
            acquirer: link(a_zpk, a_zak),
            bank: link(b_zpk, b_zak),
            mac,
            acq_zpk,
            bank_zpk,
            bank_zak,
        })
    }

    fn mac_algorithm(&self) -> Algorithm {
        self.mac.key_algorithm()
    }

    /// A simulated bank's keys.
    fn sim(&self) -> anyhow::Result<Arc<SimKeys>> {
        let zak = Key::new(self.mac_algorithm(), &self.bank_zak)?;
        let zpk = Key::new(Algorithm::Tdes, &self.bank_zpk)?;
        Ok(Arc::new(SimKeys::new(
            Some((self.mac, zak)),
            Some(zpk),
            None,
        )))
    }

    /// The load generator's.
    fn load(&self) -> anyhow::Result<LoadKeys> {
        Ok(LoadKeys {
            acquirer: self.acquirer.clone(),
            pin: (
                Format::Iso0,
                Arc::new(Key::new(Algorithm::Tdes, &self.acq_zpk)?),
            ),
        })
    }
}

/// A dialect, a framing and a header: how one side talks to the switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Speaks {
    /// Dialect name or file.
    pub dialect: String,
    /// Length header.
    pub framing: Framing,
    /// What comes between the length and the message.
    pub header: MessageHeader,
}

impl Default for Speaks {
    /// `iso87-ascii`, `u16be`, no header.
    fn default() -> Speaks {
        Speaks {
            dialect: "iso87-ascii".to_owned(),
            framing: Framing::U16be,
            header: MessageHeader::None,
        }
    }
}

impl Speaks {
    /// The config keys saying this (`dialect`, `framing`, `header`…); `sent`: for
    /// a bank, the header bytes the switch writes (a TPDU to NII 0001).
    fn toml(&self, bank: bool) -> String {
        let mut t = format!(
            "dialect = \"{}\"\nframing = \"{}\"\nheader = \"{}\"\n",
            self.dialect,
            self.framing,
            self.header.kind()
        );
        match (self.header, bank) {
            (MessageHeader::None, _) => {}
            (MessageHeader::Tpdu, true) => t.push_str("header_hex = \"6000010000\"\n"),
            (MessageHeader::Tpdu, false) => {}
            (MessageHeader::Fixed(n), true) => {
                let hex: String = (0..n).map(|i| format!("{:02X}", 0x41 + i % 26)).collect();
                let _ = writeln!(t, "header_hex = \"{hex}\"");
            }
            (MessageHeader::Fixed(n), false) => {
                let _ = writeln!(t, "header_bytes = {n}");
            }
        }
        t
    }
}

/// Memory the test bed's duplicates table may use (1 GiB; taken as keys come, not
/// at start-up).
pub const DEMO_DUPLICATE_MEMORY_MAX_BYTES: usize = 1 << 30;

impl Default for TestbedOptions {
    fn default() -> Self {
        TestbedOptions {
            banks: 3,
            banks_down: 0,
            institutions: DEMO_INSTITUTIONS.iter().map(|s| (*s).to_owned()).collect(),
            links: 2,
            request_timeout_ms: 5_000,
            bank_latency: Duration::ZERO,
            inflight_per_connection_max: 1024,
            echo_interval_ms: switchyard::config::ECHO_INTERVAL_MS_DEFAULT,
            echo_timeout_ms: switchyard::config::ECHO_TIMEOUT_MS_DEFAULT,
            first_stan: 1,
            journal: None,
            journal_at: None,
            duplicate_window_s: 2,
            limits: Vec::new(),
            rate_per_s: 5_000_000,
            rate_burst: 1_000_000,
            failover: Vec::new(),
            routes: Vec::new(),
            optional: Vec::new(),
            acquirers: Speaks::default(),
            bank_speaks: Vec::new(),
            more_listeners: Vec::new(),
            outside_banks: Vec::new(),
            ca: None,
            keys: None,
        }
    }
}

/// One simulated bank.
pub struct SimBank {
    /// Its institution id (DE100).
    pub id: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its knobs.
    pub behavior: Arc<Behavior>,
    /// Its counters.
    pub stats: Arc<BankStats>,
}

/// A running switch with simulated banks and a development CA.
pub struct Testbed {
    /// The CA that signed everything.
    pub ca: Arc<DevCa>,
    /// Where the switch listens for acquirers (the first listener).
    pub switch_addr: SocketAddr,
    /// Every acquirer listener's address: `switch_addr`, then those of
    /// [`TestbedOptions::more_listeners`].
    pub listener_addrs: Vec<SocketAddr>,
    /// The simulated banks, then the configured-but-down banks' ids.
    pub banks: Vec<SimBank>,
    /// Ids of banks configured without a running host.
    pub banks_down: Vec<String>,
    /// The switch.
    pub switch: Arc<Switch>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The journal's directory.
    pub journal_dir: Option<std::path::PathBuf>,
    /// With [`TestbedOptions::keys`]: what a load generator's acquirers use.
    pub load_keys: Option<LoadKeys>,
    /// Whether [`Testbed::stop`] removes it (a fresh temporary one, not the
    /// caller's `journal_at`).
    remove_journal: bool,
}

impl Testbed {
    /// Generates certificates, starts the banks and the switch, and waits for links.
    pub async fn start(opts: TestbedOptions) -> anyhow::Result<Testbed> {
        let ca = match &opts.ca {
            Some(ca) => ca.clone(),
            None => Arc::new(DevCa::new("switchyard development CA")?),
        };
        let ca_der = vec![ca.ca_der()];
        let bed_keys = opts.keys.map(BedKeys::new).transpose()?;
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut banks = Vec::new();
        for i in 0..opts.banks {
            let speaks = opts.bank_speaks.get(i).cloned().unwrap_or_default();
            let dialect = Arc::new(Dialect::load(&speaks.dialect)?);
            let id = format!("{}", 200_001 + i);
            let issued = ca.issue_server(&[&format!("bank-{id}")])?;
            let server = tls::server_config(&ca_der, issued.chain()?, issued.key()?)?;
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let behavior = Arc::new(Behavior::new(opts.bank_latency, 0));
            let stats = Arc::new(BankStats::default());
            let sim = BankSimOptions {
                dialect: dialect.clone(),
                framing: speaks.framing,
                header: speaks.header,
                frame_size_max_bytes: switchyard::config::FRAME_SIZE_MAX_BYTES_DEFAULT,
                seed: 0x5eed_0000 + i as u64,
                keys: bed_keys.as_ref().map(BedKeys::sim).transpose()?,
            };
            let token = stop.clone();
            let serve = banksim::serve(
                listener,
                server,
                sim,
                behavior.clone(),
                stats.clone(),
                async move { token.cancelled().await },
            );
            tasks.push(tokio::spawn(async move {
                if let Err(e) = serve.await {
                    tracing::warn!(error = %e, "simulated bank stopped");
                }
            }));
            banks.push(SimBank {
                id,
                addr,
                behavior,
                stats,
            });
        }
        let mut configured: Vec<(String, SocketAddr, Speaks)> = banks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let speaks = opts.bank_speaks.get(i).cloned().unwrap_or_default();
                (b.id.clone(), b.addr, speaks)
            })
            .collect();
        for (addr, speaks) in &opts.outside_banks {
            let id = format!("{}", 200_001 + configured.len());
            configured.push((id, *addr, speaks.clone()));
        }
        let mut down = Vec::new();
        for _ in 0..opts.banks_down {
            // A port that was just free: nothing listens there.
            let probe = TcpListener::bind("127.0.0.1:0").await?;
            let id = format!("{}", 200_001 + configured.len() + down.len());
            down.push((id, probe.local_addr()?));
        }
        let speaks_down = |i: usize| opts.bank_speaks.get(i).cloned().unwrap_or_default();
        let first_down = configured.len();
        configured.extend(
            down.iter()
                .enumerate()
                .map(|(i, (id, addr))| (id.clone(), *addr, speaks_down(first_down + i))),
        );
        let mut config = Config::parse(&testbed_toml(&opts, &configured), Path::new("<testbed>"))?;
        for bank in &mut config.banks {
            bank.first_stan = opts.first_stan;
        }
        if let Some(keys) = &bed_keys {
            for i in &mut config.institutions {
                i.security = keys.acquirer.clone();
            }
            for (bank, _) in config.banks.iter_mut().zip(&banks) {
                bank.security = keys.bank.clone();
            }
        }
        let journal_dir = opts.journal.map(|fsync| {
            static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let now = switchyard::clock::unix_ms();
            let name = format!("switchyard-journal-{}-{now}-{n}", std::process::id());
            let dir = opts
                .journal_at
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join(name));
            config.journal = Some(JournalConfig {
                fsync,
                ..JournalConfig::new(&dir)
            });
            dir
        });
        let server_cert = ca.issue_server(&["localhost", "127.0.0.1", "switchyard"])?;
        let client_cert = ca.issue_client("switchyard")?;
        let setup = TlsSetup {
            server: tls::server_config(&ca_der, server_cert.chain()?, server_cert.key()?)?,
            client: tls::client_config(&ca_der, client_cert.chain()?, client_cert.key()?)?,
        };
        let mut listeners = Vec::new();
        let mut listener_addrs = Vec::new();
        for _ in 0..=opts.more_listeners.len() {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            listener_addrs.push(listener.local_addr()?);
            listeners.push(listener);
        }
        let switch_addr = listener_addrs[0];
        let switch = Arc::new(Switch::start(config, setup)?);
        let serving = switch.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serving.serve_all(listeners).await {
                tracing::error!(error = %e, "switch listener failed");
            }
        }));
        let up_banks = opts.banks + opts.outside_banks.len();
        if up_banks > 0 && opts.banks_down == 0 && !switch.wait_links_up(LINKS_UP_TIMEOUT).await {
            anyhow::bail!("bank links did not come up within {LINKS_UP_TIMEOUT:?}");
        }
        if opts.banks_down > 0 {
            let up = |s: &Switch| s.connectors()[..up_banks].iter().all(|c| c.links_up() > 0);
            let deadline = tokio::time::Instant::now() + LINKS_UP_TIMEOUT;
            while !up(&switch) && tokio::time::Instant::now() < deadline {
                let _ = switch.wait_links_up(Duration::from_millis(50)).await;
            }
        }
        let banks_down = down.into_iter().map(|(id, _)| id).collect();
        Ok(Testbed {
            ca,
            switch_addr,
            listener_addrs,
            banks,
            banks_down,
            switch,
            stop,
            tasks,
            journal_dir,
            load_keys: bed_keys.as_ref().map(BedKeys::load).transpose()?,
            remove_journal: opts.journal_at.is_none(),
        })
    }

    /// A client TLS config presenting a fresh certificate for `institution`.
    pub fn client_tls(&self, institution: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let issued = self.ca.issue_client(institution)?;
        Ok(tls::client_config(
            &[self.ca.ca_der()],
            issued.chain()?,
            issued.key()?,
        )?)
    }

    /// Writes `ca.pem` and `<id>.pem`/`<id>.key` for each institution into `dir`.
    pub fn write_client_certs(&self, dir: &Path, institutions: &[String]) -> anyhow::Result<()> {
        certs::write_ca(dir, &self.ca)?;
        for id in institutions {
            certs::write_issued(dir, id, &self.ca.issue_client(id)?)?;
        }
        Ok(())
    }

    /// Stops the switch and the banks.
    pub async fn stop(self) {
        self.switch.shutdown().await;
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(dir) = self.journal_dir.as_ref().filter(|_| self.remove_journal) {
            // Its threads stopped first (the spare segment's helper may be
            // creating a file in it).
            if let Some(journal) = self.switch.journal() {
                journal.close();
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The test bed's config; `banks`: every configured bank (id, address, how it
/// speaks), routed by PAN prefix 4, 5, 6… in order.
fn testbed_toml(opts: &TestbedOptions, banks: &[(String, SocketAddr, Speaks)]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "[switch]\nlisten = \"127.0.0.1:0\"\n{}",
        opts.acquirers.toml(false)
    );
    for l in &opts.more_listeners {
        let _ = writeln!(
            t,
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n{}",
            l.toml(false)
        );
    }
    // TLS material is given in memory; the file keys are required but unused.
    let _ = writeln!(
        t,
        "[tls]\nca_file = \"in-memory\"\ncert_file = \"in-memory\"\nkey_file = \"in-memory\"\n\
         client_cert_file = \"in-memory\"\nclient_key_file = \"in-memory\"\n"
    );
    let _ = writeln!(
        t,
        "[limits]\ninflight_per_connection_max = {}\n{}\n",
        opts.inflight_per_connection_max,
        opts.limits.join("\n")
    );
    let _ = writeln!(
        t,
        "[duplicates]\nwindow_s = {}\nmemory_max_bytes = {DEMO_DUPLICATE_MEMORY_MAX_BYTES}\n",
        opts.duplicate_window_s
    );
    for id in &opts.institutions {
        let _ = writeln!(
            t,
            "[[institution]]\nid = \"{id}\"\nrate_per_s = {}\nrate_burst = {}\n",
            opts.rate_per_s, opts.rate_burst
        );
    }
    for (i, (id, addr, speaks)) in banks.iter().enumerate() {
        let failover: Vec<String> = opts
            .failover
            .iter()
            .filter(|(from, _)| from == id)
            .map(|(_, to)| format!("\"{to}\""))
            .collect();
        let optional = opts.optional.iter().any(|o| o == id);
        let _ = writeln!(
            t,
            "[[bank]]\nfailover = [{}]\noptional = {optional}\n{}",
            failover.join(", "),
            speaks.toml(true)
        );
        let _ = writeln!(
            t,
            "id = \"{id}\"\naddress = \"{addr}\"\nserver_name = \"bank-{id}\"\nlinks = {}\n\
             request_timeout_ms = {}\nreconnect_backoff_max_ms = 1000\necho_interval_ms = {}\necho_timeout_ms = {}\n\n\
             [[route]]\npan_prefix = \"{}\"\nbank = \"{id}\"\n",
            opts.links,
            opts.request_timeout_ms,
            opts.echo_interval_ms,
            opts.echo_timeout_ms,
            4 + i
        );
    }
    for r in &opts.routes {
        let _ = writeln!(t, "[[route]]\n{r}\n");
    }
    t
}

/// How the demo drives load.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Load duration.
    pub duration: Duration,
    /// Acquirer connections.
    pub connections: usize,
    /// Requests in flight per connection.
    pub window: usize,
    /// Delay the simulated banks add to each answer (zero: none).
    pub bank_latency: Duration,
    /// Journal durability (None: no journal).
    pub journal: Option<Fsync>,
    /// PIN and MAC keys on every link (None: none).
    pub keys: Option<DemoKeys>,
}

/// Runs the switch with three simulated banks, drives load, returns the summary.
pub async fn run_demo(opts: DemoOptions) -> anyhow::Result<Summary> {
    let bed = Testbed::start(TestbedOptions {
        bank_latency: opts.bank_latency,
        journal: opts.journal,
        keys: opts.keys,
        ..TestbedOptions::default()
    })
    .await?;
    let identities = DEMO_INSTITUTIONS
        .iter()
        .map(|id| {
            Ok(Identity {
                institution: (*id).to_owned(),
                tls: bed.client_tls(id)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let load = LoadOptions {
        destinations: bed.banks.iter().map(|b| b.id.clone()).collect(),
        pans: vec!["4111111111111111".to_owned(), "5500000000000004".to_owned()],
        connections: opts.connections,
        window: opts.window,
        duration: opts.duration,
        keys: bed.load_keys.clone(),
        ..LoadOptions::new(bed.switch_addr, "localhost", identities)
    };
    let summary = loadgen::run(load).await.context("load generator")?;
    bed.stop().await;
    Ok(summary)
}

/// `demo --serve`: runs the switch and banks, writes client certificates to `dir`,
/// prints one JSON line, and serves until `shutdown`.
pub async fn serve_demo(
    dir: &Path,
    acquirers: Speaks,
    bank_latency: Duration,
    journal: Option<Fsync>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let speaks = acquirers.clone();
    let bed = Testbed::start(TestbedOptions {
        bank_latency,
        journal,
        acquirers,
        ..TestbedOptions::default()
    })
    .await?;
    let institutions: Vec<String> = DEMO_INSTITUTIONS.iter().map(|s| (*s).to_owned()).collect();
    bed.write_client_certs(dir, &institutions)
        .with_context(|| format!("writing certificates to {}", dir.display()))?;
    let line = serde_json::json!({
        "listen": bed.switch_addr.to_string(),
        "institutions": institutions,
        "destinations": bed.banks.iter().map(|b| b.id.clone()).collect::<Vec<_>>(),
        "dialect": speaks.dialect,
        "framing": speaks.framing.as_str(),
        "header": speaks.header.kind(),
    });
    println!("{line}");
    shutdown.await;
    bed.stop().await;
    Ok(())
}
