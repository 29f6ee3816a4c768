//! Simulation test: a seeded, deterministic run of the shipped switch core against
//! simulated banks that are slow, silent, reordering, or drop the link, with a fake
//! clock and an in-memory journal that can "crash" at any record.
//!
//! # What it drives
//!
//! One thread, no tokio runtime, no sockets, no sleeps, no wall clock: a fake clock
//! (one `Instant` captured once plus a simulated offset, passed into every call), an
//! event queue ordered by (time, sequence) and a splitmix64 generator seeded per
//! run. The switch side is the shipped code; the simulation is only its shell
//! (`model.rs`), doing what `net::connector` and `net::ingress` do with it:
//!
//! - `core::link::Link` per bank link (a new one, signing on, per connection):
//!   its writer runs `poll_transmit` when woken and writes the batch once the
//!   journal records it names are durable; its timer is `poll_timeout`, firing
//!   `handle_timeout`; frames from the bank go to `on_answer`; a dropped or
//!   ended link gets `on_link_lost` and reconnects with the connector's backoff;
//! - `core::bank::BankState` per bank: the request queue, the STAN counter (seeded
//!   from the journal's position as the daemon seeds it), reversal advices
//!   (`core::saf`, 0420 then 0421 with backoff), links up, every outcome;
//! - `core::books::Books` (journal records in the order of `core::writeahead`,
//!   the duplicates table of `core::recent`) into a `RecordSink` over an in-memory
//!   journal of real `journal::record` records;
//! - after each crash, `journal::recovery::Replay` over the records that survive,
//!   then `daemon::recovery::{Rebuild, resume}`, as `Switch::start` does;
//! - `core::answer::encode_reply` for what the acquirer receives (its own DE11
//!   restored), released once the outcome record is durable.
//!
//! The acquirer's session steps (`Recent::open`, `Books::accept`,
//! `BankState::submit`) are called in the order `net::ingress` calls them.
//!
//! Banks (`banks.rs`: one to three, one or two links each) pick behaviours per
//! seed: slow (some answers after the deadline: dropped as late, the 68 stands and
//! the reversal stays queued), silent (some requests never answered), reordering
//! (latencies spread over seconds), dropping links (everything in flight on the
//! link: 91 and an advice; frames in transit on it are lost both ways; reconnects
//! may be refused for a while), and lossy or late 0430s (advice repeated as 0421).
//! They answer sign-ons, echoes and sign-offs. A bank decides on a request as it
//! arrives and records, by the acquirer's DE37, which requests it saw, under which
//! link STAN, which it approved and which reversals it applied (idempotently; DE90
//! must name the MTI, link STAN, DE7 and DE32 it saw).
//!
//! Durability: the journal has a durable point moved by group commits at random
//! times; a commit usually takes every record appended so far, sometimes only part
//! of what the last handler appended (the writer thread looked while an appender was
//! between two records). Crashes come at a random record append (zero to two per
//! seed, half of the second ones during or just after the first recovery) and, in
//! some seeds, at a random moment up to 40 ms after the first restart. A crash keeps
//! the durable records, possibly followed by a torn piece of the next record, which
//! `decode` must reject; all switch memory is dropped, answers not yet released are
//! never delivered, frames already written still reach the bank. After `traffic`
//! the banks turn reliable, so every advice is acknowledged within the SAF limits;
//! a run ends when nothing is left to do but idle links' echoes (bounded in events).
//!
//! # What is checked per seed (`oracle.rs`; failures name the seed, which replays)
//!
//! 1. every accepted request has exactly one Outcome record in the final journal
//!    (request ids never reused), and at the end nothing is unfinished or
//!    unacknowledged (a parked advice stays unacknowledged);
//! 2. every request the bank approved whose approval the acquirer did not receive
//!    has a reversal applied at the bank, and no delivered approval is reversed;
//! 3. no original request reaches a bank twice, across crashes;
//! 4. every answer the acquirer received is in the final journal with the same DE39,
//!    and every record durable at a crash is still there, unchanged;
//! 5. the acquirer gets at most one answer per request, only on the session that
//!    sent it, decided (outcome appended) by its deadline and released only once
//!    durable; every request sent to the last switch life is answered.
//!
//! Also: `Replay` agrees with an independent reading of the records at every
//! restart, a torn tail is rejected exactly where the durable records end, record
//! sequence numbers run on across crashes, and the same seed gives the same run.
//!
//! # Orders the simulation shows to be wrong
//!
//! The default sweep runs [`Policy::DAEMON`]. Two other policies keep bugs the
//! simulation found in earlier versions, with a test each that prints the first
//! seed showing them:
//! - `resumed_68_before_reversal_queued_loses_a_reversal` (`SIM_POLICY=68-first`):
//!   the journal keeps a 68 outcome before the reversal advice recorded with it
//!   (`Connector::resume_reversal` once wrote them in that order); a crash that
//!   keeps the first and loses the second closes the request with no reversal
//!   pending (invariant 2). `WriteAhead::reversed` now writes both, advice first.
//! - `forwarding_before_durable_loses_a_reversal` (`SIM_POLICY=no-write-ahead`):
//!   the shell writes a batch before the forwarded records it names are durable
//!   (the connector did at commit 7d2e140): a crash that loses a record leaves an
//!   approval the bank made, the acquirer never received, and the restarted switch
//!   does not know to reverse.
//!
//! # What it does not cover
//!
//! The async glue (tokio tasks, `Notify` wake-ups, TLS, reading and writing
//! sockets, the journal writer thread and its files, fsync) is not run here: it is
//! covered by `tests/switch.rs` and the SIGKILL test (`crates/cli/tests/crash.rs`).
//! Routing, admission, acquirer retransmissions and acquirer-sent 0400s are not
//! simulated, nor a bank still working on a request when its advice arrives, nor
//! reloads. A crash keeps exactly the durable records (plus a torn piece): records
//! written but not yet synced that happen to survive, and the moment between an
//! outcome being durable and its answer leaving the socket, are left out; in both
//! the switch cannot know whether the acquirer got the answer, and the acquirer's
//! own reversal on a missing answer is what covers them.
//!
//! Run: `cargo test --test simulation` (200 seeds); `SIM_SEEDS=n` sets the count,
//! `SIM_SEED=n` replays one seed (`SIM_TRACE=1` prints its events), `SIM_KEEP_GOING=1`
//! counts failing seeds instead of stopping at the first,
//! `SIM_SEEDS=20000 cargo test --release --test simulation -- --ignored` is the long
//! run.

mod banks;
mod model;
mod oracle;
mod scenario;

use model::{Sim, Stats};
use scenario::Policy;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;
use switchyard::wire::Dialect;

/// Seeds run by `cargo test` (override with `SIM_SEEDS`).
const SEEDS_DEFAULT: u64 = 200;
/// Seeds of the ignored long run (override with `SIM_SEEDS`).
const SEEDS_LONG_DEFAULT: u64 = 20_000;
/// Seeds the gap tests search for a failing run.
const GAP_SEARCH_SEEDS_MAX: u64 = 3_000;

/// What one seed produced.
struct Outcome {
    stats: Stats,
    /// Digest of the final journal and the acquirer's answers (same seed, same run).
    digest: u64,
    trace: Vec<String>,
}

fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01B3);
    }
    h
}

// === driving seeds ===

/// The default profile, parsed once.
pub fn dialect() -> Arc<Dialect> {
    static DIALECT: std::sync::OnceLock<Arc<Dialect>> = std::sync::OnceLock::new();
    DIALECT
        .get_or_init(|| Arc::new(Dialect::iso87_ascii()))
        .clone()
}

fn base_instant() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Runs one seed; `Err` names what broke.
fn run_seed(seed: u64, policy: Policy, trace: bool) -> Result<Outcome, String> {
    let run = catch_unwind(AssertUnwindSafe(|| {
        let mut sim = Sim::new(seed, policy, base_instant(), trace);
        let result = sim.run().and_then(|()| sim.check());
        let trace = sim.trace.take().unwrap_or_default();
        let mut stats = sim.stats;
        stats.seeds = 1;
        let bytes = switchyard::sync::lock(&sim.journal).bytes.clone();
        let mut digest = fnv(&bytes, 0xCBF2_9CE4_8422_2325);
        for (rrn, answers) in &sim.acq.answers {
            for a in answers {
                digest = fnv(&rrn.to_le_bytes(), digest);
                digest = fnv(&a.de39, digest);
                digest = fnv(&(a.at.as_nanos() as u64).to_le_bytes(), digest);
            }
        }
        digest = fnv(&stats.events.to_le_bytes(), digest);
        let scenario = format!("{:?}", sim.sc);
        result
            .map(|()| Outcome {
                stats,
                digest,
                trace: trace.clone(),
            })
            .map_err(|e| {
                if trace.is_empty() {
                    format!("{e}\n  scenario: {scenario}")
                } else {
                    format!("{e}\n  scenario: {scenario}\n{}", trace.join("\n"))
                }
            })
    }));
    run.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Err(format!("panicked: {what}"))
    })
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value}: expected a number")),
    )
}

fn replay_hint(seed: u64, policy: Policy) -> String {
    let env = policy.env();
    format!("seed {seed}: replay with {env}SIM_SEED={seed} cargo test --test simulation")
}

/// Runs `SIM_SEED` alone, or seeds `0..SIM_SEEDS` (default `seeds`); panics naming
/// the first failing seed.
fn sweep(seeds: u64) {
    let policy = Policy::from_env();
    let started = Instant::now();
    let (list, trace): (Vec<u64>, bool) = match env_u64("SIM_SEED") {
        Some(seed) => (vec![seed], std::env::var_os("SIM_TRACE").is_some()),
        None => ((0..env_u64("SIM_SEEDS").unwrap_or(seeds)).collect(), false),
    };
    let keep_going = std::env::var_os("SIM_KEEP_GOING").is_some();
    let mut total = Stats::default();
    let mut failed = Vec::new();
    for &seed in &list {
        match run_seed(seed, policy, trace) {
            Ok(outcome) => {
                if trace {
                    eprintln!("{}", outcome.trace.join("\n"));
                }
                total.add(&outcome.stats);
            }
            Err(e) if keep_going => {
                eprintln!(
                    "{}\n  {}",
                    replay_hint(seed, policy),
                    e.lines().next().unwrap_or("")
                );
                failed.push(seed);
            }
            Err(e) => panic!("{}\n  policy {policy:?}\n  {e}", replay_hint(seed, policy)),
        }
    }
    eprintln!(
        "simulation: {} seeds in {:.2?} ({policy:?}), {} failed: {total:?}",
        list.len(),
        started.elapsed(),
        failed.len()
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

#[test]
fn simulation() {
    sweep(SEEDS_DEFAULT);
}

#[test]
#[ignore = "long run: SIM_SEEDS=20000 cargo test --release --test simulation -- --ignored"]
fn simulation_long() {
    sweep(SEEDS_LONG_DEFAULT);
}

#[test]
fn same_seed_same_run() {
    for seed in [3, 1_234, 99_999] {
        let policy = Policy::DAEMON;
        let a = run_seed(seed, policy, false).unwrap_or_else(|e| panic!("{e}"));
        let b = run_seed(seed, policy, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            a.digest,
            b.digest,
            "{}: runs differ",
            replay_hint(seed, policy)
        );
        assert_eq!(a.stats.events, b.stats.events);
    }
}

/// Finds the first seed where `policy` breaks an invariant that [`Policy::DAEMON`]
/// keeps, and checks it is invariant 2 that breaks.
fn first_failure(policy: Policy) {
    for seed in 0..GAP_SEARCH_SEEDS_MAX {
        if let Err(e) = run_seed(seed, policy, false) {
            let daemon = run_seed(seed, Policy::DAEMON, false);
            assert!(
                daemon.is_ok(),
                "{}: fails with the daemon's policy too",
                replay_hint(seed, Policy::DAEMON)
            );
            eprintln!("{}\n  {e}", replay_hint(seed, policy));
            assert!(e.contains("(2)"), "seed {seed}: {e}");
            return;
        }
    }
    panic!("no seed below {GAP_SEARCH_SEEDS_MAX} shows the gap of {policy:?}");
}

/// Writing a request to the bank before its Forwarded record is durable (as the
/// connector did at commit 7d2e140) leaves approvals unreversed after a crash: the
/// simulation must see it.
#[test]
fn forwarding_before_durable_loses_a_reversal() {
    first_failure(Policy::NO_WRITE_AHEAD);
}

/// Journaling a 68 before its ReversalQueued (as `Connector::resume_reversal` once
/// did; `WriteAhead::reversed` now writes the advice first) loses the reversal when
/// the switch crashes between the two records: the simulation must see it.
#[test]
fn resumed_68_before_reversal_queued_loses_a_reversal() {
    first_failure(Policy::SIXTY_EIGHT_FIRST);
}
