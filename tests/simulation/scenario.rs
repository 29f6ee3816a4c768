//! What a seed draws: the random number generator, the policy of the simulated
//! shell, the banks' behaviours, and the run's bounds and crash points.

use std::time::Duration;
use switchyard::config::{
    ECHO_INTERVAL_MS_DEFAULT, INFLIGHT_PER_LINK_MAX_DEFAULT, QUEUE_DEPTH_MAX_DEFAULT,
    REQUEST_TIMEOUT_MS_DEFAULT, WRITE_BATCH_MAX_DEFAULT,
};

pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

// === random numbers ===

/// splitmix64: small, fast, and the same on every platform.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    pub fn percent(&mut self, p: u32) -> bool {
        self.below(100) < u64::from(p)
    }

    pub fn micros(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_micros(self.between(lo, hi))
    }
}

// === the shell's policy ===

/// Where the simulated shell (or its journal) may differ from the daemon; the two
/// other policies keep bugs the simulation found in earlier versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Write a batch to the bank only once the forwarded records it names are
    /// durable (the connector's `Durable::wait`).
    pub forward_after_durable: bool,
    /// The journal keeps a 68 outcome before the reversal advice recorded just
    /// before it (`WriteAhead::reversed` writes the advice first).
    pub outcome_before_reversal: bool,
}

impl Policy {
    /// The daemon as this tree has it.
    pub const DAEMON: Policy = Policy {
        forward_after_durable: true,
        outcome_before_reversal: false,
    };
    /// The journal order of `Connector::resume_reversal` before the simulation found
    /// it losing reversals: the 68, then the advice.
    pub const SIXTY_EIGHT_FIRST: Policy = Policy {
        outcome_before_reversal: true,
        ..Policy::DAEMON
    };
    /// Forwarding without the write-ahead wait (the connector at commit 7d2e140).
    pub const NO_WRITE_AHEAD: Policy = Policy {
        forward_after_durable: false,
        ..Policy::DAEMON
    };

    const NAMED: [(&'static str, Policy); 3] = [
        ("daemon", Policy::DAEMON),
        ("68-first", Policy::SIXTY_EIGHT_FIRST),
        ("no-write-ahead", Policy::NO_WRITE_AHEAD),
    ];

    pub fn from_env() -> Policy {
        let Ok(name) = std::env::var("SIM_POLICY") else {
            return Policy::DAEMON;
        };
        Policy::NAMED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| {
                panic!("SIM_POLICY={name}: expected daemon, 68-first or no-write-ahead")
            })
    }

    /// `SIM_POLICY=… ` to replay under this policy (empty for the default).
    pub fn env(self) -> String {
        match Policy::NAMED.iter().find(|(_, p)| *p == self) {
            Some(("daemon", _)) => String::new(),
            Some((name, _)) => format!("SIM_POLICY={name} "),
            None => format!("(policy {self:?}) "),
        }
    }
}

// === what a seed draws ===

/// How one simulated bank behaves while traffic runs (afterwards it is reliable).
#[derive(Clone, Debug)]
pub struct BankProfile {
    pub links: usize,
    pub request_timeout: Duration,
    /// Answer latency range, µs.
    pub latency_us: (u64, u64),
    /// Answers (and 0430s) sent after the deadline, %.
    pub slow_percent: u32,
    /// Requests never answered, %.
    pub silent_percent: u32,
    pub approve_percent: u32,
    /// 0430s lost, %.
    pub ack_loss_percent: u32,
    /// Time between link drops, ms, per link.
    pub drop_gap_ms: Option<(u64, u64)>,
    /// Reconnects refused, %.
    pub refuse_percent: u32,
    pub traits: Vec<&'static str>,
}

impl BankProfile {
    fn draw(rng: &mut Rng) -> BankProfile {
        let mut traits = Vec::new();
        let mut pick = |rng: &mut Rng, p: u32, name: &'static str| {
            let on = rng.percent(p);
            if on {
                traits.push(name);
            }
            on
        };
        let slow = pick(rng, 30, "slow");
        let silent = pick(rng, 25, "silent");
        let reordering = pick(rng, 40, "reordering");
        let dropping = pick(rng, 30, "dropping");
        let lossy = pick(rng, 30, "lossy-acks");
        let latency_us = if reordering {
            (100, rng.between(200_000, 3_000_000))
        } else {
            let lo = rng.between(100, 5_000);
            (lo, lo + rng.between(0, 20_000))
        };
        let drop_gap_ms = dropping.then(|| {
            let lo = rng.between(200, 3_000);
            (lo, 3 * lo)
        });
        BankProfile {
            links: rng.between(1, 2) as usize,
            request_timeout: ms(rng.between(1_000, REQUEST_TIMEOUT_MS_DEFAULT)),
            latency_us,
            slow_percent: if slow { rng.between(5, 30) as u32 } else { 0 },
            silent_percent: if silent { rng.between(2, 20) as u32 } else { 0 },
            approve_percent: rng.between(60, 95) as u32,
            ack_loss_percent: if lossy { rng.between(10, 50) as u32 } else { 0 },
            drop_gap_ms,
            refuse_percent: if dropping {
                rng.between(0, 50) as u32
            } else {
                0
            },
            traits,
        }
    }
}

/// Everything a seed decides up front.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub banks: Vec<BankProfile>,
    /// Traffic (and bank misbehaviour) lasts this long.
    pub traffic: Duration,
    pub arrival_gap_mean_us: u64,
    pub inflight_per_link_max: usize,
    pub queue_depth_max: usize,
    pub write_batch_max: usize,
    /// Idle time before a link sends an echo.
    pub echo_interval: Duration,
    /// Longest wait of the journal writer for more records, µs.
    pub commit_delay_max_us: u64,
    /// Longest sync, µs.
    pub fsync_max_us: u64,
    /// Record appends (counted over all lives) at which the switch crashes.
    pub crash_at: Vec<u64>,
    /// A crash this long after the first restart, whatever is being done then.
    pub crash_after_restart: Option<Duration>,
}

impl Scenario {
    pub fn draw(rng: &mut Rng) -> Scenario {
        let banks = (0..rng.between(1, 3))
            .map(|_| BankProfile::draw(rng))
            .collect();
        let traffic = ms(rng.between(2_000, 15_000));
        let requests = rng.between(20, 200);
        let small = |rng: &mut Rng, default: usize| {
            if rng.percent(20) {
                rng.between(1, 6) as usize
            } else {
                default
            }
        };
        let inflight_per_link_max = small(rng, INFLIGHT_PER_LINK_MAX_DEFAULT);
        let queue_depth_max = small(rng, QUEUE_DEPTH_MAX_DEFAULT);
        let write_batch_max = small(rng, WRITE_BATCH_MAX_DEFAULT);
        let echo_interval = if rng.percent(50) {
            ms(rng.between(200, 3_000))
        } else {
            ms(ECHO_INTERVAL_MS_DEFAULT)
        };
        let crashes = match rng.below(100) {
            0..=19 => 0,
            20..=74 => 1,
            _ => 2,
        };
        // About five records per request; half the second crashes come soon after
        // the first (while the restarted switch is resuming).
        let mut crash_at: Vec<u64> = (0..crashes).map(|_| rng.below(5 * requests)).collect();
        crash_at.sort_unstable();
        if crashes == 2 && rng.percent(50) {
            crash_at[1] = crash_at[0] + rng.between(1, 12);
        }
        crash_at.dedup();
        let crash_after_restart = (crashes > 0 && rng.percent(30)).then(|| rng.micros(0, 40_000));
        Scenario {
            banks,
            traffic,
            arrival_gap_mean_us: traffic.as_micros() as u64 / requests,
            inflight_per_link_max,
            queue_depth_max,
            write_batch_max,
            echo_interval,
            commit_delay_max_us: rng.between(0, 2_000),
            fsync_max_us: rng.between(50, 20_000),
            crash_at,
            crash_after_restart,
        }
    }
}
