//! Heap allocations per payment, counted by a wrapping global allocator.
//!
//! * `core_payment_is_allocation_free_once_warm`: the sans-IO payment path
//!   (`switchyard_tools::corepath`, what the `core_payment` bench times, through the
//!   shipped bank link) makes no allocation at all once its tables and buffers are warm.
//! * `switch_allocations_per_payment`: the whole switch over real mutual TLS, on its own
//!   runtime whose threads are marked, with the simulated bank and the load generator on
//!   another runtime. Prints allocations per payment on the switch's threads and asserts
//!   a loose bound.
//!
//! To see where the switch's allocations come from, run
//! `SWITCHYARD_ALLOC_BACKTRACES=1 cargo test --test alloc -- --nocapture switch_`:
//! every Nth allocation (N = the value) on a switch thread during the measured period
//! is captured with its backtrace (up to `SAMPLES_MAX`), and the sites are printed
//! grouped, most frequent first.

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// === counting allocator ===

thread_local! {
    /// This thread counts its own allocations into `HERE_COUNT`.
    static HERE_ON: Cell<bool> = const { Cell::new(false) };
    static HERE_COUNT: Cell<u64> = const { Cell::new(0) };
    /// This thread is a worker (or blocking) thread of the switch's runtime.
    static SWITCH_THREAD: Cell<bool> = const { Cell::new(false) };
    /// This thread is capturing a backtrace: its allocations are the capture's own.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
}

/// Allocations (alloc, alloc_zeroed, realloc) on switch threads since start.
static SWITCH_ALLOCS: AtomicU64 = AtomicU64::new(0);
/// Capture backtraces of switch-thread allocations while set.
static SAMPLING: AtomicBool = AtomicBool::new(false);
/// Capture every Nth allocation.
static SAMPLE_EVERY: AtomicU64 = AtomicU64::new(1);
static SAMPLE_SEEN: AtomicU64 = AtomicU64::new(0);
/// Backtraces kept, at most.
const SAMPLES_MAX: usize = 400;
static SAMPLES: Mutex<Vec<Backtrace>> = Mutex::new(Vec::new());

/// `System`, counting allocation calls. The thread-locals are `const`-initialised
/// `Cell`s without destructors, so reading them never allocates and never fails.
struct Counting;

fn note_allocation() {
    if HERE_ON.get() {
        HERE_COUNT.set(HERE_COUNT.get() + 1);
    }
    if SWITCH_THREAD.get() && !CAPTURING.get() {
        SWITCH_ALLOCS.fetch_add(1, Ordering::Relaxed);
        if SAMPLING.load(Ordering::Relaxed) {
            sample_backtrace();
        }
    }
}

/// Records this allocation's backtrace. Capturing and storing allocate in turn; the
/// `CAPTURING` flag keeps those from being counted or captured again.
fn sample_backtrace() {
    CAPTURING.set(true);
    let seen = SAMPLE_SEEN.fetch_add(1, Ordering::Relaxed);
    if seen % SAMPLE_EVERY.load(Ordering::Relaxed).max(1) == 0 {
        let mut samples = SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() < SAMPLES_MAX {
            samples.push(Backtrace::force_capture());
        }
    }
    CAPTURING.set(false);
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; counting touches only atomics and const thread-locals.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`, returning its result and the allocations this thread made meanwhile.
fn allocations_here<R>(f: impl FnOnce() -> R) -> (u64, R) {
    HERE_COUNT.set(0);
    HERE_ON.set(true);
    let result = f();
    HERE_ON.set(false);
    (HERE_COUNT.get(), result)
}

// === the sans-IO payment path ===

/// Payments before counting: tables, heaps and buffers reach their steady capacity.
const CORE_WARM_UP_PAYMENTS: usize = 4096;
/// Payments counted.
const CORE_MEASURED_PAYMENTS: usize = 10_000;

#[test]
fn core_payment_is_allocation_free_once_warm() {
    use switchyard_tools::corepath::{request_frames, route_table, SwitchCore, REQUEST_COUNT};
    let (routes, prefixes) = route_table(10_000, 0x9e37_79b9_7f4a_7c15);
    let requests = request_frames(&switchyard::wire::Dialect::iso87_ascii(), &prefixes, 7);
    let mut core = SwitchCore::new(routes, &requests[0]);
    let (probe, _) = allocations_here(|| std::hint::black_box(Vec::<u8>::with_capacity(64)));
    assert_eq!(probe, 1, "the allocator counts this thread's allocations");
    for i in 0..CORE_WARM_UP_PAYMENTS {
        let result = core.payment(&requests[i % REQUEST_COUNT]);
        assert!(result.is_ok(), "warm-up payment {i}: {result:?}");
    }
    let (allocations, result) = allocations_here(|| {
        for i in 0..CORE_MEASURED_PAYMENTS {
            if let Err(e) = core.payment(&requests[i % REQUEST_COUNT]) {
                return Err((i, e));
            }
        }
        Ok(())
    });
    assert_eq!(result, Ok(()));
    eprintln!("core payment path: {allocations} allocations in {CORE_MEASURED_PAYMENTS} payments");
    assert_eq!(allocations, 0, "allocations on the warm core payment path");
}

// === the whole switch ===

/// Load before measuring (handshakes done, buffers and channels grown).
const SWITCH_WARM_UP: Duration = Duration::from_millis(1000);
/// Measured period.
const SWITCH_MEASURED: Duration = Duration::from_millis(1500);
/// Load continues this long after the measured period, so it ends under load.
const SWITCH_TAIL: Duration = Duration::from_millis(300);
/// Loose bound on switch-thread allocations per payment, so CI stays stable.
const SWITCH_ALLOCATIONS_PER_PAYMENT_MAX: f64 = 1.0;
const ACQUIRER: &str = "100001";
const BANK: &str = "200001";

fn runtime(name: &str, switch: bool) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).thread_name(name).enable_all();
    if switch {
        builder.on_thread_start(|| SWITCH_THREAD.set(true));
    }
    builder.build().expect("tokio runtime")
}

fn config_toml(bank_addr: std::net::SocketAddr) -> String {
    format!(
        "[switch]\nlisten = \"127.0.0.1:0\"\n\n\
         [tls]\nca_file = \"in-memory\"\ncert_file = \"in-memory\"\nkey_file = \"in-memory\"\n\
         client_cert_file = \"in-memory\"\nclient_key_file = \"in-memory\"\n\n\
         [[institution]]\nid = \"{ACQUIRER}\"\nrate_per_s = 5000000\nrate_burst = 1000000\n\n\
         [[bank]]\nid = \"{BANK}\"\naddress = \"{bank_addr}\"\nserver_name = \"bank-{BANK}\"\n\
         links = 2\nrequest_timeout_ms = 5000\n\n\
         [[route]]\npan_prefix = \"4\"\nbank = \"{BANK}\"\n"
    )
}

#[test]
fn switch_allocations_per_payment() -> anyhow::Result<()> {
    use switchyard::daemon::Switch;
    use switchyard::tls;
    use switchyard::tls::TlsSetup;
    use switchyard::wire::{Dialect, Framing, FRAME_SIZE_MAX_BYTES_DEFAULT};
    use switchyard_tools::banksim::{self, BankSimOptions, BankStats, Behavior};
    use switchyard_tools::certs::DevCa;
    use switchyard_tools::loadgen::{self, Identity, LoadOptions};
    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    let sample_every = std::env::var("SWITCHYARD_ALLOC_BACKTRACES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    // Metrics are recorded as in production (the daemon installs this exporter when
    // an admin address is configured); nothing scrapes them here.
    let _metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let client_rt = runtime("client", false);
    let switch_rt = runtime("switch", true);
    let ca = DevCa::new("alloc test CA")?;
    let ca_der = vec![ca.ca_der()];
    let dialect = Arc::new(Dialect::iso87_ascii());

    // The simulated bank, on the client runtime.
    let issued = ca.issue_server(&[&format!("bank-{BANK}")])?;
    let bank_tls = tls::server_config(&ca_der, issued.chain()?, issued.key()?)?;
    let bank_listener = client_rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let bank_addr = bank_listener.local_addr()?;
    let bank_stats = Arc::new(BankStats::default());
    let stop_bank = CancellationToken::new();
    let bank = {
        let sim = BankSimOptions {
            dialect: dialect.clone(),
            framing: Framing::U16be,
            header: switchyard::wire::MessageHeader::None,
            frame_size_max_bytes: FRAME_SIZE_MAX_BYTES_DEFAULT,
            seed: 1,
            keys: None,
        };
        let behavior = Arc::new(Behavior::default());
        let stop = stop_bank.clone();
        let stopped = async move { stop.cancelled().await };
        let serve = banksim::serve(bank_listener, bank_tls, sim, behavior, bank_stats, stopped);
        client_rt.spawn(serve)
    };

    // The switch, on its own runtime.
    let config =
        switchyard::config::Config::parse(&config_toml(bank_addr), Path::new("<alloc test>"))?;
    let server_cert = ca.issue_server(&["localhost", "127.0.0.1"])?;
    let client_cert = ca.issue_client("switchyard")?;
    let setup = TlsSetup {
        server: tls::server_config(&ca_der, server_cert.chain()?, server_cert.key()?)?,
        client: tls::client_config(&ca_der, client_cert.chain()?, client_cert.key()?)?,
    };
    let listener = switch_rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let switch_addr = listener.local_addr()?;
    let switch = {
        let _entered = switch_rt.enter();
        Arc::new(Switch::start(config, setup).expect("switch starts"))
    };
    let serving = switch.clone();
    let serve = switch_rt.spawn(async move { serving.serve(listener).await });
    anyhow::ensure!(
        switch_rt.block_on(switch.wait_links_up(Duration::from_secs(10))),
        "bank links did not come up"
    );

    // Load from the client runtime: 2 connections, 64 in flight each.
    let acquirer_cert = ca.issue_client(ACQUIRER)?;
    let identity = Identity {
        institution: ACQUIRER.to_owned(),
        tls: tls::client_config(&ca_der, acquirer_cert.chain()?, acquirer_cert.key()?)?,
    };
    let load = LoadOptions {
        pans: vec!["4111111111111111".to_owned()],
        connections: 2,
        window: 64,
        duration: SWITCH_WARM_UP + SWITCH_MEASURED + SWITCH_TAIL,
        dialect,
        ..LoadOptions::new(switch_addr, "localhost", vec![identity])
    };
    let load = client_rt.spawn(loadgen::run(load));

    std::thread::sleep(SWITCH_WARM_UP);
    let answered = || {
        switch.connectors()[0]
            .stats
            .answered
            .load(Ordering::Relaxed)
    };
    let (allocs_before, answered_before) = (SWITCH_ALLOCS.load(Ordering::Relaxed), answered());
    if let Some(every) = sample_every {
        SAMPLE_EVERY.store(every, Ordering::Relaxed);
        SAMPLING.store(true, Ordering::Relaxed);
    }
    std::thread::sleep(SWITCH_MEASURED);
    SAMPLING.store(false, Ordering::Relaxed);
    let allocs = SWITCH_ALLOCS.load(Ordering::Relaxed) - allocs_before;
    let payments = answered() - answered_before;

    let summary = client_rt.block_on(load)??;
    switch_rt.block_on(switch.shutdown());
    stop_bank.cancel();
    client_rt.block_on(bank)??;
    switch_rt.block_on(serve)??;

    let per_payment = allocs as f64 / payments.max(1) as f64;
    eprintln!(
        "switch threads: {allocs} allocations in {payments} payments over {:?} \
         = {per_payment:.3} per payment (load: {} sent, {} approved, {} declined, {} errors, \
         {} timeouts)",
        SWITCH_MEASURED,
        summary.sent,
        summary.approved,
        summary.declined,
        summary.errors,
        summary.timeouts
    );
    if sample_every.is_some() {
        print_sites();
    }
    anyhow::ensure!(payments > 0, "no payments in the measured period");
    anyhow::ensure!(summary.errors == 0 && summary.timeouts == 0, "load failed");
    if sample_every.is_none() {
        anyhow::ensure!(
            per_payment < SWITCH_ALLOCATIONS_PER_PAYMENT_MAX,
            "{per_payment:.3} allocations per payment on switch threads"
        );
    }
    Ok(())
}

// === backtrace report ===

/// Frames that say nothing about who allocated (the allocator, this file, std).
const NOISE: [&str; 4] = ["alloc::", "core::", "std::", "__rust"];
/// Informative frames shown per site, innermost first.
const SITE_FRAMES: usize = 4;

/// Prints the sampled backtraces grouped by site: the innermost informative frames
/// plus the innermost frame of switchyard code (which task allocated), with each
/// site's share of the samples.
fn print_sites() {
    let samples = std::mem::take(&mut *SAMPLES.lock().unwrap_or_else(|e| e.into_inner()));
    let mut sites: HashMap<String, usize> = HashMap::new();
    for bt in &samples {
        let text = bt.to_string();
        let frames: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim_start().split_once(": ").map(|(_, f)| f))
            .filter(|f| {
                let bare = f.trim_start_matches('<');
                !NOISE.iter().any(|n| bare.starts_with(n)) && !f.contains("GlobalAlloc")
            })
            .collect();
        let ours = frames
            .iter()
            .find(|f| f.trim_start_matches('<').starts_with("switchyard::"))
            .unwrap_or(&"(no switchyard frame)");
        let head = frames[..frames.len().min(SITE_FRAMES)].join("\n      ");
        *sites.entry(format!("{head}\n    in {ours}")).or_default() += 1;
    }
    let mut sites: Vec<_> = sites.into_iter().collect();
    sites.sort_by_key(|s| std::cmp::Reverse(s.1));
    let total = samples.len().max(1) as f64;
    eprintln!(
        "{} sampled allocations, {} sites:",
        samples.len(),
        sites.len()
    );
    for (site, count) in sites {
        let share = 100.0 * count as f64 / total;
        eprintln!("{count:>5} ({share:4.1}%)\n      {site}\n");
    }
}
