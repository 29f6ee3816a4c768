//! The simulated world around the shipped switch: an event queue ordered by (time,
//! sequence), a fake clock, an in-memory journal that can crash at any record, the
//! shell that drives the shipped `core::link::Link`s of the shipped
//! `core::bank::BankState`s as the tokio connector does, the acquirer, and crashes
//! and restarts (recovery by the shipped `daemon::recovery`).

use crate::oracle::Oracle;
use crate::scenario::{ms, Policy, Rng, Scenario};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchyard::config::{
    Bank, SafLimits, CONNECT_TIMEOUT_MS_DEFAULT, DUPLICATE_MEMORY_MAX_BYTES_DEFAULT,
    DUPLICATE_WAITERS_MAX_DEFAULT, DUPLICATE_WINDOW_S_DEFAULT, ECHO_TIMEOUT_MS_DEFAULT,
    RECONNECT_BACKOFF_MAX_MS_DEFAULT, RECONNECT_BACKOFF_MIN_MS_DEFAULT,
};
use switchyard::core::answer::{encode_reply, Reply};
use switchyard::core::bank::{BankState, Wake};
use switchyard::core::books::Books;
use switchyard::core::inflight::{Stan, STAN_MAX};
use switchyard::core::link::Link;
use switchyard::core::recent::Recent;
use switchyard::core::request::{Answer as Delivered, InstitutionSlot, Pending};
use switchyard::core::writeahead::{OutcomeSource, Protection, WriteAhead};
use switchyard::core::InstitutionId;
use switchyard::daemon::recovery::Rebuild;
use switchyard::journal::protect::Protector;
use switchyard::journal::record::{self, Record, RecordKind};
use switchyard::journal::recovery::{Recovery, Replay};
use switchyard::journal::{AppendError, Entry, RecordSink};
use switchyard::sync::lock;
use switchyard::wire::{Dialect, FrameDecoder, Framing, Header, Message, MessageHeader, Mti};
use switchyard_tools::testkit::decoded;
use tokio::sync::mpsc;

/// Events one seed may take before it counts as not quiescing.
pub const EVENTS_PER_SEED_MAX: u64 = 2_000_000;
/// Simulated wall clock at time zero (2025-11-26 09:30:00 UTC), for DE7 and records.
pub const SIM_EPOCH_S: u64 = 1_764_149_400;
/// The acquirer's institution id (DE32).
pub const ACQUIRER: &[u8] = b"100001";
/// Largest frame on either side.
pub const FRAME_MAX_BYTES: usize = 8 * 1024;
/// Answers one switch life may hold for the acquirer (its session's channel).
const ANSWER_SLOTS_MAX: usize = 1 << 16;

// === events ===

pub enum Event {
    AcquirerSend,
    Crash {
        life: u32,
    },
    Restart,
    CommitStart {
        life: u32,
    },
    CommitDone {
        life: u32,
        upto: usize,
    },
    /// A link writer runs: of `link`, or of any up link of the bank.
    Writer {
        life: u32,
        bank: usize,
        link: Option<usize>,
    },
    /// A link's timer (`poll_timeout`) fires.
    LinkTimer {
        bank: usize,
        link: usize,
        gen: u64,
        at: Duration,
    },
    /// A link connects (TCP and TLS done): it signs on.
    LinkUp {
        life: u32,
        bank: usize,
        link: usize,
    },
    /// Chaos: the connection of a link breaks.
    LinkDrop {
        bank: usize,
        link: usize,
    },
    /// A batch of frames reaches the bank.
    BankReceive {
        bank: usize,
        link: usize,
        gen: u64,
        batch: Bytes,
    },
    /// A frame reaches the switch.
    SwitchReceive {
        bank: usize,
        link: usize,
        gen: u64,
        frame: Bytes,
    },
}

// === the journal ===

/// Records in memory; record `i` has sequence number `i + 1`. The shipped code
/// appends through [`Sink`]; the simulation commits, crashes and reads.
pub struct SimJournal {
    pub bytes: Vec<u8>,
    /// End offset of each record.
    pub ends: Vec<usize>,
    /// The event (handler run) that appended each record.
    pub appended_by: Vec<u64>,
    /// Records durable.
    pub durable: usize,
    /// Appends tried over all lives (crash points count these).
    pub attempts: u64,
    pub crash_at: VecDeque<u64>,
    /// A commit is scheduled or in progress.
    pub committing: bool,
    /// Bytes of torn tail the last crash left.
    pub torn: Option<usize>,
    /// The switch process died appending this record (a candidate torn tail):
    /// nothing it does afterwards counts.
    pub crashed: Option<Vec<u8>>,
    /// Set by the simulation before each handler: the clock (record stamps) and
    /// the handler's number.
    pub now_ms: u64,
    pub event: u64,
    /// The last record, as written (for the 68-first policy's reordering).
    last: Option<LastRecord>,
    policy: Policy,
}

/// The last record appended: (kind, protected), request id, time, body.
type LastRecord = ((RecordKind, bool), u64, u64, Vec<u8>);

impl SimJournal {
    pub fn end_of(&self, records: usize) -> usize {
        if records == 0 {
            0
        } else {
            self.ends[records - 1]
        }
    }

    fn push(
        &mut self,
        (kind, protected): (RecordKind, bool),
        request_id: u64,
        unix_ms: u64,
        body: Vec<u8>,
    ) -> u64 {
        let seq = self.ends.len() as u64 + 1;
        let r = Record {
            seq,
            kind,
            protected,
            request_id,
            unix_ms,
            body: &body,
        };
        record::encode(&mut self.bytes, &r);
        self.ends.push(self.bytes.len());
        self.appended_by.push(self.event);
        self.last = Some(((kind, protected), request_id, unix_ms, body));
        seq
    }

    fn append(&mut self, entry: Entry) -> Result<u64, AppendError> {
        if self.crashed.is_some() {
            return Err(AppendError::Failed); // a dead process writes nothing
        }
        let mut body = entry.head.0[..usize::from(entry.head.1)].to_vec();
        body.extend_from_slice(&entry.message);
        let attempt = self.attempts;
        self.attempts += 1;
        if self.crash_at.front() == Some(&attempt) {
            self.crash_at.pop_front();
            let mut torn = Vec::new();
            let r = Record {
                seq: self.ends.len() as u64 + 1,
                kind: entry.kind,
                protected: entry.protected,
                request_id: entry.request_id,
                unix_ms: self.now_ms,
                body: &body,
            };
            record::encode(&mut torn, &r);
            self.crashed = Some(torn);
            return Err(AppendError::Failed);
        }
        if self.policy.outcome_before_reversal && self.swaps(&entry, &body) {
            // The 68 goes before the advice recorded just before it.
            let (kind, id, unix_ms, reversal) = self.last.take().unwrap_or_else(|| unreachable!());
            self.ends.pop();
            self.appended_by.pop();
            self.bytes.truncate(self.end_of(self.ends.len()));
            let seq = self.push(
                (entry.kind, entry.protected),
                entry.request_id,
                self.now_ms,
                body,
            );
            self.push(kind, id, unix_ms, reversal);
            return Ok(seq);
        }
        Ok(self.push(
            (entry.kind, entry.protected),
            entry.request_id,
            self.now_ms,
            body,
        ))
    }

    /// Whether `entry` is a 68 whose reversal advice is the last record, not yet
    /// durable.
    fn swaps(&self, entry: &Entry, body: &[u8]) -> bool {
        let timed_out = entry.kind == RecordKind::Outcome
            && body.get(2) == Some(&(OutcomeSource::Timeout as u8));
        let after_its_reversal = matches!(&self.last,
            Some(((RecordKind::ReversalQueued, _), id, _, _)) if *id == entry.request_id);
        timed_out && after_its_reversal && self.durable < self.ends.len()
    }
}

/// The shipped code's view of the journal.
pub struct Sink(pub Arc<Mutex<SimJournal>>);

impl RecordSink for Sink {
    fn append(&self, entry: Entry) -> Result<u64, AppendError> {
        lock(&self.0).append(entry)
    }
}

// === the switch side ===

/// Which banks asked for a writer (the connector's `Notify`).
#[derive(Default)]
pub struct Wakes {
    writers: BTreeSet<usize>,
}

struct SimWake {
    bank: usize,
    wakes: Arc<Mutex<Wakes>>,
}

impl Wake for SimWake {
    fn writers(&self) {
        lock(&self.wakes).writers.insert(self.bank);
    }

    fn links_changed(&self) {}
}

/// One link slot of a simulated connector.
pub struct SimLink {
    /// The connected link (None: down, reconnecting).
    pub link: Option<Link<BankState>>,
    /// The connection's generation (frames of a broken one are lost).
    pub gen: u64,
    /// A batch waiting for its journal records to be durable: the writer waits.
    held: Option<(u64, Bytes)>,
    backoff: Duration,
    /// The timer event scheduled (stale ones are ignored).
    timer: Option<Duration>,
}

/// Everything the switch process holds in memory; dropped at a crash.
pub struct Switch {
    next_request_id: u64,
    pub books: Books,
    pub banks: Vec<Arc<BankState>>,
    pub links: Vec<Vec<SimLink>>,
    wakes: Arc<Mutex<Wakes>>,
    /// When a bank-wide writer wake-up is due (coalesced as `Notify` does).
    writer_at: Vec<Option<Duration>>,
    /// The acquirer session's answer channel.
    tx: mpsc::Sender<Delivered>,
    rx: mpsc::Receiver<Delivered>,
    /// Answers waiting for their outcome record to be durable, with when the switch
    /// decided them.
    pub replies: Vec<(u64, Reply, Duration)>,
    inflight: Arc<AtomicUsize>,
}

// === the other side ===

#[derive(Default)]
pub struct Sent {
    pub life: u32,
    pub deadline: Duration,
    pub de11: [u8; 6],
}

pub struct Answer {
    /// When it reached the acquirer.
    pub at: Duration,
    /// When the switch decided it (appended its outcome).
    pub decided: Duration,
    pub de39: Vec<u8>,
    pub life: u32,
}

#[derive(Default)]
pub struct Acquirer {
    next_rrn: u64,
    /// By DE37.
    pub sent: BTreeMap<u64, Sent>,
    pub answers: BTreeMap<u64, Vec<Answer>>,
}

/// Counts over a run, summed over seeds for the summary line.
#[derive(Default, Clone, Copy, Debug)]
pub struct Stats {
    pub seeds: u64,
    pub requests: u64,
    pub refused_while_down: u64,
    pub forwarded: u64,
    pub approved_at_bank: u64,
    pub answered: u64,
    pub answered_68: u64,
    pub answered_91: u64,
    pub late_answers_dropped: u64,
    pub link_drops: u64,
    pub links_ended: u64,
    pub lost_in_transit: u64,
    pub crashes: u64,
    pub torn_tails: u64,
    pub records_lost: u64,
    pub sign_ons: u64,
    pub echoes: u64,
    pub advices_received: u64,
    pub repeats_received: u64,
    pub reversals_applied: u64,
    pub advices_for_unseen: u64,
    pub duplicate_advices: u64,
    pub duplicate_0420: u64,
    pub acks: u64,
    pub events: u64,
    pub sim_ms: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        let fields = [
            (&mut self.seeds, o.seeds),
            (&mut self.requests, o.requests),
            (&mut self.refused_while_down, o.refused_while_down),
            (&mut self.forwarded, o.forwarded),
            (&mut self.approved_at_bank, o.approved_at_bank),
            (&mut self.answered, o.answered),
            (&mut self.answered_68, o.answered_68),
            (&mut self.answered_91, o.answered_91),
            (&mut self.late_answers_dropped, o.late_answers_dropped),
            (&mut self.link_drops, o.link_drops),
            (&mut self.links_ended, o.links_ended),
            (&mut self.lost_in_transit, o.lost_in_transit),
            (&mut self.crashes, o.crashes),
            (&mut self.torn_tails, o.torn_tails),
            (&mut self.records_lost, o.records_lost),
            (&mut self.sign_ons, o.sign_ons),
            (&mut self.echoes, o.echoes),
            (&mut self.advices_received, o.advices_received),
            (&mut self.repeats_received, o.repeats_received),
            (&mut self.reversals_applied, o.reversals_applied),
            (&mut self.advices_for_unseen, o.advices_for_unseen),
            (&mut self.duplicate_advices, o.duplicate_advices),
            (&mut self.duplicate_0420, o.duplicate_0420),
            (&mut self.acks, o.acks),
            (&mut self.events, o.events),
            (&mut self.sim_ms, o.sim_ms),
        ];
        for (mine, theirs) in fields {
            *mine += theirs;
        }
    }
}

// === the simulation ===

pub struct Sim {
    pub seed: u64,
    pub policy: Policy,
    pub sc: Scenario,
    pub rng: Rng,
    base: Instant,
    pub now: Duration,
    events: BTreeMap<(Duration, u64), Event>,
    event_seq: u64,
    /// Events in the queue other than link timers (the run is over when none is
    /// left and the switch is idle).
    work: u64,
    /// Events handled so far.
    pub events_run: u64,
    pub dialect: Arc<Dialect>,
    /// The journal's card-data protection, kept across crashes.
    protector: Protector,
    acquirer: InstitutionId,
    pub journal: Arc<Mutex<SimJournal>>,
    pub sw: Option<Switch>,
    pub life: u32,
    next_gen: u64,
    /// Connections broken by a link drop: what was in flight on them is lost (a
    /// crash, by contrast, does not stop what the switch already wrote).
    pub broken: BTreeSet<u64>,
    pub banks: Vec<crate::banks::Host>,
    pub acq: Acquirer,
    /// The durable bytes at each crash: the final journal must start with them.
    pub durable_at_crash: Vec<Vec<u8>>,
    pub violations: Vec<String>,
    pub stats: Stats,
    pub trace: Option<Vec<String>>,
}

pub fn digits(field: Option<&[u8]>) -> u64 {
    field
        .unwrap_or(b"")
        .iter()
        .fold(0, |acc, &b| acc * 10 + u64::from(b.wrapping_sub(b'0')))
}

impl Sim {
    pub fn new(seed: u64, policy: Policy, base: Instant, trace: bool) -> Sim {
        let mut rng = Rng::new(seed);
        let sc = Scenario::draw(&mut rng);
        let banks = sc.banks.iter().map(|_| Default::default()).collect();
        let journal = SimJournal {
            bytes: Vec::new(),
            ends: Vec::new(),
            appended_by: Vec::new(),
            durable: 0,
            attempts: 0,
            crash_at: sc.crash_at.iter().copied().collect(),
            committing: false,
            torn: None,
            crashed: None,
            now_ms: 0,
            event: 0,
            last: None,
            policy,
        };
        Sim {
            seed,
            policy,
            sc,
            rng,
            base,
            now: Duration::ZERO,
            events: BTreeMap::new(),
            event_seq: 0,
            work: 0,
            events_run: 0,
            dialect: crate::dialect(),
            // PANs masked only: enciphering draws nonces, and the same seed must
            // give the same journal bytes (the data key's round trip is tested
            // in journal::protect and tests/switch.rs).
            protector: Protector::default(),
            acquirer: InstitutionId::from_digits(ACQUIRER).expect("acquirer id"),
            journal: Arc::new(Mutex::new(journal)),
            sw: None,
            life: 0,
            next_gen: 1,
            broken: BTreeSet::new(),
            banks,
            acq: Acquirer::default(),
            durable_at_crash: Vec::new(),
            violations: Vec::new(),
            stats: Stats::default(),
            trace: trace.then(Vec::new),
        }
    }

    pub fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn unix_s(&self) -> u64 {
        SIM_EPOCH_S + self.now.as_secs()
    }

    pub fn disruptive(&self) -> bool {
        self.now < self.sc.traffic
    }

    pub fn note(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            trace.push(format!("{:>12?} {}", self.now, line()));
        }
    }

    pub fn violation(&mut self, what: String) {
        self.note(|| format!("VIOLATION {what}"));
        self.violations.push(what);
    }

    pub fn schedule(&mut self, at: Duration, event: Event) {
        self.event_seq += 1;
        if !matches!(event, Event::LinkTimer { .. }) {
            self.work += 1;
        }
        self.events
            .insert((at.max(self.now), self.event_seq), event);
    }

    fn sw(&mut self) -> &mut Switch {
        self.sw.as_mut().expect("switch is up")
    }

    fn alive(&self, life: u32) -> bool {
        self.sw.is_some() && self.life == life
    }

    // --- running ---

    pub fn run(&mut self) -> Result<(), String> {
        if let Some(trace) = &mut self.trace {
            trace.push(format!("seed {}", self.seed));
            for (b, profile) in self.sc.banks.iter().enumerate() {
                trace.push(format!("bank {b}: {:?}", profile.traits));
            }
        }
        self.restart_switch(true);
        if lock(&self.journal).crashed.is_some() {
            return Err("crash before the first record".to_owned());
        }
        self.schedule(Duration::ZERO, Event::AcquirerSend);
        for bank in 0..self.sc.banks.len() {
            if let Some((lo, hi)) = self.sc.banks[bank].drop_gap_ms {
                for link in 0..self.sc.banks[bank].links {
                    let at = ms(self.rng.between(lo, hi));
                    self.schedule(at, Event::LinkDrop { bank, link });
                }
            }
        }
        while let Some(((at, _), event)) = self.events.pop_first() {
            if matches!(event, Event::LinkTimer { .. }) {
                // Only timers left (echoes of idle links) and nothing to finish.
                if self.work == 0 && !self.disruptive() && self.idle() {
                    break;
                }
            } else {
                self.work -= 1;
            }
            self.events_run += 1;
            if self.events_run > EVENTS_PER_SEED_MAX {
                return Err(format!(
                    "no quiescence after {EVENTS_PER_SEED_MAX} events (at {:?})",
                    self.now
                ));
            }
            self.now = at;
            {
                let mut j = lock(&self.journal);
                j.now_ms = SIM_EPOCH_S * 1000 + at.as_millis() as u64;
                j.event = self.events_run;
            }
            self.handle(event);
            self.after_event();
        }
        self.collect_stats();
        self.stats.events = self.events_run;
        self.stats.sim_ms = self.now.as_millis() as u64;
        Ok(())
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::AcquirerSend => self.acquirer_send(),
            Event::Crash { life } if self.alive(life) => {
                self.note(|| "CRASH".into());
                lock(&self.journal).crashed = Some(Vec::new());
            }
            Event::Restart => self.restart(),
            Event::CommitStart { life } if self.alive(life) => self.commit_start(),
            Event::CommitDone { life, upto } if self.alive(life) => self.commit_done(upto),
            Event::Writer { life, bank, link } if self.alive(life) => self.writer(bank, link),
            Event::LinkTimer {
                bank,
                link,
                gen,
                at,
            } => self.link_timer(bank, link, gen, at),
            Event::LinkUp { life, bank, link } if self.alive(life) => self.link_up(bank, link),
            Event::LinkDrop { bank, link } => self.chaos_drop(bank, link),
            Event::BankReceive {
                bank,
                link,
                gen,
                batch,
            } => self.bank_receive(bank, link, gen, batch),
            Event::SwitchReceive {
                bank,
                link,
                gen,
                frame,
            } => self.link_receive(bank, link, gen, frame),
            // An event of a switch life that has ended.
            _ => {}
        }
    }

    /// What the shell does after the shipped code ran: a crash if the process died
    /// appending, answers released once durable, writers woken, timers set, ended
    /// links reconnected, a commit started.
    fn after_event(&mut self) {
        if self.sw.is_some() {
            // Ended links first: their requests end too, in this same event.
            for bank in 0..self.sc.banks.len() {
                for link in 0..self.sc.banks[bank].links {
                    self.after_link(bank, link);
                }
            }
        }
        let crashed = lock(&self.journal).crashed.take();
        if let Some(torn) = crashed {
            return self.crash(torn);
        }
        if self.sw.is_none() {
            return;
        }
        let now = self.now;
        while let Ok(Delivered { reply, .. }) = self.sw().rx.try_recv() {
            let seq = reply.seq();
            self.sw().replies.push((seq, reply, now));
        }
        self.release_replies();
        let woken = std::mem::take(&mut lock(&self.sw().wakes).writers);
        for bank in woken {
            self.wake_bank(bank);
        }
        let mut j = lock(&self.journal);
        if j.ends.len() > j.durable && !j.committing {
            j.committing = true;
            drop(j);
            let delay = self.rng.micros(0, self.sc.commit_delay_max_us);
            let life = self.life;
            self.schedule(self.now + delay, Event::CommitStart { life });
        }
    }

    fn after_link(&mut self, bank: usize, link: usize) {
        let life = self.life;
        let sw = self.sw.as_mut().expect("switch is up");
        let state = sw.banks[bank].clone();
        let l = &mut sw.links[bank][link];
        let Some(sim_link) = l.link.as_mut() else {
            return;
        };
        if let Some(end) = sim_link.ended() {
            self.stats.links_ended += 1;
            self.note(|| format!("link {bank}/{link} ended: {end}"));
            return self.link_down(bank, link);
        }
        let write = sim_link.take_wake_writer();
        let _ = sim_link.take_wake_reader(); // timers are looked at after every event
        let timer = sim_link
            .poll_timeout(&state)
            .map(|at| at.saturating_duration_since(self.base));
        let gen = l.gen;
        let reschedule = timer.is_some_and(|t| l.timer != Some(t));
        l.timer = timer;
        if write {
            let at = self.now + self.rng.micros(0, 50);
            let link = Some(link);
            self.schedule(at, Event::Writer { life, bank, link });
        }
        if let (true, Some(at)) = (reschedule, timer) {
            self.schedule(
                at,
                Event::LinkTimer {
                    bank,
                    link,
                    gen,
                    at,
                },
            );
        }
    }

    /// Whether nothing is left to do: nothing queued, in flight, held or waiting.
    fn idle(&self) -> bool {
        let Some(sw) = &self.sw else {
            return false;
        };
        let j = lock(&self.journal);
        let journal_idle = j.durable == j.ends.len() && !j.committing;
        drop(j);
        journal_idle
            && sw.replies.is_empty()
            && sw
                .banks
                .iter()
                .all(|b| b.queue_depth() == 0 && b.reversals_waiting() == 0)
            && sw
                .links
                .iter()
                .flatten()
                .all(|l| l.held.is_none() && l.link.as_ref().is_none_or(|l| l.inflight() == 0))
    }

    fn collect_stats(&mut self) {
        if let Some(sw) = &self.sw {
            for b in &sw.banks {
                let n =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                self.stats.forwarded += n(&b.stats.forwarded);
                self.stats.late_answers_dropped += n(&b.stats.unmatched);
                self.stats.acks += n(&b.stats.reversals_acked);
            }
        }
    }

    // --- journal ---

    fn commit_start(&mut self) {
        let mut j = lock(&self.journal);
        let (durable, appended) = (j.durable, j.ends.len());
        if appended == durable {
            j.committing = false;
            return;
        }
        // The writer takes what is queued when it looks: usually everything, sometimes
        // only part of what the last handler appended (it was between two records).
        let last = j.appended_by[appended - 1];
        let group = j.appended_by[durable..]
            .iter()
            .rev()
            .take_while(|&&by| by == last)
            .count();
        drop(j);
        let upto = if group >= 2 && self.rng.percent(25) {
            appended - 1 - self.rng.below(group as u64 - 1) as usize
        } else {
            appended
        };
        let sync = self.rng.micros(10, self.sc.fsync_max_us);
        let life = self.life;
        self.schedule(self.now + sync, Event::CommitDone { life, upto });
    }

    fn commit_done(&mut self, upto: usize) {
        let mut j = lock(&self.journal);
        j.durable = j.durable.max(upto);
        let durable = j.durable;
        let more = j.ends.len() > j.durable;
        if !more {
            j.committing = false;
        }
        drop(j);
        self.note(|| format!("durable up to #{durable}"));
        self.release_replies();
        // Batches whose records are durable go to the bank; their writers go on.
        for bank in 0..self.sc.banks.len() {
            for link in 0..self.sc.banks[bank].links {
                let l = &mut self.sw().links[bank][link];
                if l.held
                    .as_ref()
                    .is_some_and(|(seq, _)| *seq <= durable as u64)
                {
                    let (_, batch) = l.held.take().unwrap_or_default();
                    self.send(bank, link, batch);
                }
            }
        }
        if more {
            let delay = self.rng.micros(0, self.sc.commit_delay_max_us);
            let life = self.life;
            self.schedule(self.now + delay, Event::CommitStart { life });
        }
    }

    /// Answers whose outcome records are durable reach the acquirer (the session
    /// writer's wait).
    fn release_replies(&mut self) {
        let durable = lock(&self.journal).durable as u64;
        let replies = std::mem::take(&mut self.sw().replies);
        let (ready, waiting): (Vec<_>, Vec<_>) =
            replies.into_iter().partition(|(seq, _, _)| *seq <= durable);
        self.sw().replies = waiting;
        for (_, reply, decided) in ready {
            self.deliver(reply, decided);
        }
    }

    // --- crash and restart ---

    fn crash(&mut self, appending: Vec<u8>) {
        self.stats.crashes += 1;
        self.collect_stats();
        let mut j = lock(&self.journal);
        let durable_end = j.end_of(j.durable);
        self.durable_at_crash.push(j.bytes[..durable_end].to_vec());
        // The next record on disk would be the first one not durable, or the one whose
        // append crashed.
        let next = if j.ends.len() > j.durable {
            j.bytes[durable_end..j.ends[j.durable]].to_vec()
        } else {
            appending
        };
        self.stats.records_lost += (j.ends.len() - j.durable) as u64;
        j.bytes.truncate(durable_end);
        let durable = j.durable;
        j.ends.truncate(durable);
        j.appended_by.truncate(durable);
        j.torn = None;
        j.last = None;
        if next.len() > 1 && self.rng.percent(50) {
            let torn: Vec<u8> = if self.rng.percent(50) {
                let cut = 1 + self.rng.below(next.len() as u64 - 1) as usize;
                next[..cut].to_vec()
            } else {
                let mut whole = next;
                let at = self.rng.below(whole.len() as u64) as usize;
                whole[at] ^= 1 << self.rng.below(8);
                whole
            };
            self.stats.torn_tails += 1;
            j.torn = Some(torn.len());
            j.bytes.extend_from_slice(&torn);
        }
        j.committing = false;
        let torn = j.torn;
        drop(j);
        self.sw = None;
        self.life += 1;
        let down = self.rng.micros(1_000, 2_000_000);
        self.note(|| format!("switch down for {down:?}; torn tail {torn:?}"));
        self.schedule(self.now + down, Event::Restart);
    }

    /// Reads the journal as `Journal::open` and `recover` do: every record checked, a
    /// torn tail cut off, the duplicates table `recent` rebuilt; returns what
    /// `Replay` found.
    fn read_journal(&mut self, recent: &Arc<Recent>) -> Recovery {
        let mut replay = Replay::new();
        let banks = (0..self.sc.banks.len())
            .map(|b| self.bank_config(b).id.to_raw())
            .collect();
        let now_unix_ms = SIM_EPOCH_S * 1000 + self.now.as_millis() as u64;
        let mut rebuild = Rebuild::new(
            recent.clone(),
            (self.dialect.clone(), self.protector.clone()),
            banks,
            self.instant(),
            now_unix_ms,
        );
        let mut oracle = Oracle::default();
        let mut j = lock(&self.journal);
        let mut at = 0;
        let mut last_seq = 0;
        let mut torn_error = None;
        let mut violations = Vec::new();
        loop {
            match record::decode(&j.bytes[at..]) {
                Ok(None) => break,
                Ok(Some((r, size))) => {
                    if r.seq != last_seq + 1 {
                        violations.push(format!("record seq {} after {last_seq}", r.seq));
                    }
                    last_seq = r.seq;
                    replay.record(&r);
                    rebuild.record(&r);
                    oracle.record(&r);
                    at += size;
                }
                Err(e) => {
                    torn_error = Some(e);
                    break;
                }
            }
        }
        let records_end = j.end_of(j.ends.len());
        match (j.torn, torn_error) {
            (None, None) if at == records_end => {}
            (Some(_), Some(_)) if at == records_end => {}
            (torn, error) => violations.push(format!(
                "journal read stopped at byte {at} with {error:?}, records end at \
                 {records_end}, torn tail {torn:?}"
            )),
        }
        j.bytes.truncate(at);
        j.torn = None;
        drop(j);
        rebuild.finish();
        for v in violations {
            self.violation(v);
        }
        let recovery = replay.finish();
        if let Err(e) = oracle.compare(&recovery) {
            self.violation(format!("Replay disagrees with the records: {e}"));
        }
        recovery
    }

    fn restart(&mut self) {
        if let Some(after) = self.sc.crash_after_restart.take() {
            let life = self.life;
            self.schedule(self.now + after, Event::Crash { life });
        }
        self.restart_switch(false);
    }

    fn bank_config(&self, bank: usize) -> Bank {
        let profile = &self.sc.banks[bank];
        let id = format!("20000{}", bank + 1);
        Bank {
            id: InstitutionId::from_digits(id.as_bytes()).expect("bank id"),
            name: id.clone(),
            address: "127.0.0.1:9".parse().expect("address"),
            server_name: format!("bank-{id}"),
            links: profile.links,
            dialect: self.dialect.clone(),
            framing: Framing::U16be,
            header: MessageHeader::None,
            header_sent: Header::default(),
            queue_depth_max: self.sc.queue_depth_max,
            inflight_per_link_max: self.sc.inflight_per_link_max,
            request_timeout: profile.request_timeout,
            connect_timeout: ms(CONNECT_TIMEOUT_MS_DEFAULT),
            reconnect_backoff_min: ms(RECONNECT_BACKOFF_MIN_MS_DEFAULT),
            reconnect_backoff_max: ms(RECONNECT_BACKOFF_MAX_MS_DEFAULT),
            echo_interval: self.sc.echo_interval,
            echo_timeout: ms(ECHO_TIMEOUT_MS_DEFAULT),
            write_batch_max: self.sc.write_batch_max,
            saf: SafLimits::default(),
            first_stan: 1,
            failover: Vec::new(),
            optional: false,
            security: Default::default(),
        }
    }

    /// A new switch life over the surviving journal, as `Switch::start` makes it:
    /// the duplicates table rebuilt, the banks' STANs past the journal's position,
    /// unfinished business resumed, links connecting.
    fn restart_switch(&mut self, first: bool) {
        let recent = Arc::new(Recent::new(
            Duration::from_secs(DUPLICATE_WINDOW_S_DEFAULT),
            DUPLICATE_MEMORY_MAX_BYTES_DEFAULT,
            DUPLICATE_WAITERS_MAX_DEFAULT,
            true,
            self.instant(),
        ));
        let recovery = self.read_journal(&recent);
        let last_seq = {
            let mut j = lock(&self.journal);
            // The whole surviving journal is durable (Journal::open).
            j.durable = j.ends.len();
            j.ends.len() as u64
        };
        let now = self.instant();
        let protection = Protection {
            protector: self.protector.clone(),
            dialect: self.dialect.clone(),
        };
        let journal = WriteAhead::new(Arc::new(Sink(self.journal.clone())), protection);
        let books = Books::new(journal, recent, self.dialect.clone());
        let wakes = Arc::new(Mutex::new(Wakes::default()));
        let first_request_id = last_seq + 1;
        let first_stan = (first_request_id % u64::from(STAN_MAX)) as u32 + 1;
        let banks: Vec<Arc<BankState>> = (0..self.sc.banks.len())
            .map(|b| {
                let wake = Arc::new(SimWake {
                    bank: b,
                    wakes: wakes.clone(),
                });
                let config = self.bank_config(b);
                let (dialect, books) = (self.dialect.clone(), books.clone());
                Arc::new(BankState::new(
                    b as u16, config, dialect, books, first_stan, wake,
                ))
            })
            .collect();
        let links = self
            .sc
            .banks
            .iter()
            .map(|profile| {
                (0..profile.links)
                    .map(|_| SimLink {
                        link: None,
                        gen: 0,
                        held: None,
                        backoff: ms(RECONNECT_BACKOFF_MIN_MS_DEFAULT),
                        timer: None,
                    })
                    .collect()
            })
            .collect();
        let (tx, rx) = mpsc::channel(ANSWER_SLOTS_MAX);
        self.sw = Some(Switch {
            next_request_id: first_request_id,
            books: books.clone(),
            writer_at: vec![None; banks.len()],
            banks,
            links,
            wakes,
            tx,
            rx,
            replies: Vec::new(),
            inflight: Arc::new(AtomicUsize::new(0)),
        });
        let life = self.life;
        for bank in 0..self.sc.banks.len() {
            for link in 0..self.sc.banks[bank].links {
                let connect = self.rng.micros(500, 30_000);
                self.schedule(self.now + connect, Event::LinkUp { life, bank, link });
            }
        }
        if !first {
            self.note(|| {
                format!(
                    "restart: {} unfinished, {} advices pending",
                    recovery.unfinished.len(),
                    recovery.reversals_pending.len()
                )
            });
        }
        let banks = self.sw().banks.clone();
        let states: Vec<&BankState> = banks.iter().map(|b| b.as_ref()).collect();
        switchyard::daemon::recovery::resume(&self.dialect, &states, &books, recovery, now);
    }

    // --- acquirer ---

    fn acquirer_send(&mut self) {
        if !self.disruptive() {
            return;
        }
        let gap = self.rng.below(2 * self.sc.arrival_gap_mean_us);
        self.schedule(self.now + Duration::from_micros(gap), Event::AcquirerSend);
        if self.sw.is_none() {
            self.stats.refused_while_down += 1;
            return;
        }
        self.stats.requests += 1;
        self.acq.next_rrn += 1;
        let rrn = self.acq.next_rrn;
        let bank = self.rng.below(self.sc.banks.len() as u64) as usize;
        let de11 = Stan::from_value((rrn % 999_999) as u32 + 1)
            .expect("valid STAN")
            .to_de11();
        let de7 = switchyard::core::datetime::de7(self.unix_s());
        let amount = format!("{:012}", self.rng.between(1, 500_000));
        let rrn_digits = format!("{rrn:012}");
        let receiver = format!("20000{}", bank + 1);
        let request = decoded(
            Mti::FINANCIAL,
            &[
                (2, b"4111111111111111"),
                (3, b"000000"),
                (4, amount.as_bytes()),
                (7, &de7),
                (11, &de11),
                (32, ACQUIRER),
                (37, rrn_digits.as_bytes()),
                (49, b"978"),
                (100, receiver.as_bytes()),
            ],
        );
        let (life, now, instant) = (self.life, self.now, self.instant());
        let timeout = self.sw().banks[bank].request_timeout();
        self.acq.sent.insert(
            rrn,
            Sent {
                life,
                deadline: now + timeout,
                de11,
            },
        );
        // The session's steps (`net::ingress`): the duplicates entry, an id, the
        // accepted record, then the bank's queue.
        let (acquirer, dialect) = (self.acquirer, self.dialect.clone());
        let sw = self.sw();
        let permit = sw
            .tx
            .clone()
            .try_reserve_owned()
            .expect("answer slot")
            .into();
        let opened = sw
            .books
            .recent
            .open(request, permit, acquirer, instant, |_| None, &dialect)
            .expect("a new request");
        let pending = Pending {
            request: opened.request,
            reply: opened.reply,
            acquirer,
            request_id: sw.next_request_id,
            received_at: instant,
            forwarded_at: instant,
            bank: bank as u16,
            deadline: instant + timeout,
            entry: opened.entry,
            original_link_stan: None,
            slot: InstitutionSlot::take(&sw.inflight, usize::MAX).expect("slot"),
            key_time: switchyard::core::dedup::KeyTime::Transmission,
            pin: Default::default(),
            acquirer_mac: false,
            digest: None,
        };
        sw.next_request_id += 1;
        if let Some(pending) = sw.books.accept(pending) {
            sw.banks[bank].submit(pending);
        }
    }

    fn deliver(&mut self, reply: Reply, decided: Duration) {
        let mut out = BytesMut::new();
        if !encode_reply(
            &reply,
            (&self.dialect, &Default::default()),
            Framing::U16be,
            &[],
            &mut out,
        ) {
            return self.violation("an answer could not be encoded".into());
        }
        let frame = FrameDecoder::new(Framing::U16be, FRAME_MAX_BYTES).decode(&mut out);
        let Ok(Some(frame)) = frame else {
            return self.violation(format!("answer frame not readable: {frame:?}"));
        };
        let answer = match Message::decode(&self.dialect, frame) {
            Ok(m) => m,
            Err(e) => return self.violation(format!("answer not decodable: {e}")),
        };
        let rrn = digits(answer.field(37));
        let de39 = answer.field(39).unwrap_or(b"").to_vec();
        let Some(sent) = self.acq.sent.get(&rrn) else {
            return self.violation(format!("answer for unknown DE37 {rrn}"));
        };
        if answer.field(11) != Some(&sent.de11[..]) || answer.mti() != Mti::FINANCIAL_RESPONSE {
            self.violation(format!("answer for {rrn}: wrong MTI or DE11 not restored"));
        }
        self.stats.answered += 1;
        match &de39[..] {
            b"68" => self.stats.answered_68 += 1,
            b"91" => self.stats.answered_91 += 1,
            _ => {}
        }
        let (at, life) = (self.now, self.life);
        self.note(|| format!("acquirer gets {} for {rrn}", String::from_utf8_lossy(&de39)));
        self.acq.answers.entry(rrn).or_default().push(Answer {
            at,
            decided,
            de39,
            life,
        });
    }

    // --- the connector shell ---

    /// A bank-wide wake-up (`Notify::notify_one`): one writer runs a little later
    /// (batches form), unless one is due before then anyway.
    fn wake_bank(&mut self, bank: usize) {
        let (life, now) = (self.life, self.now);
        let at = now + self.rng.micros(0, 300);
        let due = &mut self.sw().writer_at[bank];
        if due.is_some_and(|w| w <= at && w >= now) {
            return;
        }
        *due = Some(at);
        self.schedule(
            at,
            Event::Writer {
                life,
                bank,
                link: None,
            },
        );
    }

    /// A link writer runs `poll_transmit` (of `link`, or of a random up link not
    /// waiting on a batch) and writes its batch once the journal records it names
    /// are durable.
    fn writer(&mut self, bank: usize, link: Option<usize>) {
        let link = match link {
            Some(link) => link,
            None => {
                self.sw().writer_at[bank] = None;
                let links = &self.sw().links[bank];
                let ready: Vec<usize> = (0..links.len())
                    .filter(|&l| {
                        links[l].held.is_none() && links[l].link.as_ref().is_some_and(|l| l.is_up())
                    })
                    .collect();
                if ready.is_empty() {
                    return;
                }
                ready[self.rng.below(ready.len() as u64) as usize]
            }
        };
        let (instant, unix_s) = (self.instant(), self.unix_s());
        let state = self.sw().banks[bank].clone();
        let l = &mut self.sw().links[bank][link];
        if l.held.is_some() {
            return; // the writer waits for its batch to be durable
        }
        let Some(sim_link) = l.link.as_mut() else {
            return;
        };
        let mut buf = BytesMut::new();
        let seq = sim_link.poll_transmit(&state, instant, unix_s, &mut buf);
        if buf.is_empty() {
            return;
        }
        let durable = lock(&self.journal).durable as u64;
        if self.policy.forward_after_durable && seq > durable {
            self.sw().links[bank][link].held = Some((seq, buf.freeze()));
        } else {
            self.send(bank, link, buf.freeze());
        }
    }

    /// Writes a batch on `link`; the writer then looks for more.
    fn send(&mut self, bank: usize, link: usize, batch: Bytes) {
        let latency = self.rng.micros(20, 500);
        let gen = self.sw().links[bank][link].gen;
        let life = self.life;
        self.schedule(
            self.now + latency,
            Event::BankReceive {
                bank,
                link,
                gen,
                batch,
            },
        );
        let at = self.now + self.rng.micros(1, 50);
        self.schedule(
            at,
            Event::Writer {
                life,
                bank,
                link: Some(link),
            },
        );
    }

    fn link_timer(&mut self, bank: usize, link: usize, gen: u64, at: Duration) {
        let instant = self.instant();
        let Some(sw) = self.sw.as_mut() else {
            return;
        };
        let state = sw.banks[bank].clone();
        let l = &mut sw.links[bank][link];
        if l.gen != gen || l.timer != Some(at) {
            return; // stale
        }
        l.timer = None;
        if let Some(sim_link) = l.link.as_mut() {
            sim_link.handle_timeout(&state, instant);
        }
    }

    /// A frame from the bank, on the connection it was sent on.
    fn link_receive(&mut self, bank: usize, link: usize, gen: u64, frame: Bytes) {
        let instant = self.instant();
        let Some(sw) = self.sw.as_mut() else {
            return;
        };
        let state = sw.banks[bank].clone();
        let l = &mut sw.links[bank][link];
        if l.gen != gen {
            return; // the connection is gone
        }
        if let Some(sim_link) = l.link.as_mut() {
            let _ = sim_link.on_answer(&state, frame, instant);
        }
    }

    fn link_up(&mut self, bank: usize, link: usize) {
        let refuse = self.disruptive() && self.rng.percent(self.sc.banks[bank].refuse_percent);
        let connect = self.rng.micros(500, 30_000);
        let life = self.life;
        let gen = self.next_gen;
        let instant = self.instant();
        let config = self.sw().banks[bank].link_config();
        let l = &mut self.sw().links[bank][link];
        if refuse {
            let wait = l.backoff;
            l.backoff = (l.backoff * 2).min(ms(RECONNECT_BACKOFF_MAX_MS_DEFAULT));
            self.schedule(
                self.now + wait + connect,
                Event::LinkUp { life, bank, link },
            );
            return;
        }
        l.link = Some(Link::new(config, link, instant));
        l.gen = gen;
        l.timer = None;
        self.next_gen += 1;
        self.note(|| format!("link {bank}/{link} connected (gen {gen}), signing on"));
    }

    fn chaos_drop(&mut self, bank: usize, link: usize) {
        if !self.disruptive() {
            return;
        }
        if let Some((lo, hi)) = self.sc.banks[bank].drop_gap_ms {
            let at = self.now + ms(self.rng.between(lo, hi));
            self.schedule(at, Event::LinkDrop { bank, link });
        }
        if self.sw.is_none() || self.sw().links[bank][link].link.is_none() {
            return;
        }
        self.stats.link_drops += 1;
        self.note(|| format!("link {bank}/{link} dropped"));
        self.link_down(bank, link);
    }

    /// The end of `run_link` and the reconnect in `keep_link`.
    fn link_down(&mut self, bank: usize, link: usize) {
        let connect = self.rng.micros(500, 30_000);
        let (life, instant) = (self.life, self.instant());
        let state = self.sw().banks[bank].clone();
        let l = &mut self.sw().links[bank][link];
        let Some(mut sim_link) = l.link.take() else {
            return;
        };
        l.held = None;
        l.timer = None;
        let gen = l.gen;
        if sim_link.has_signed_on() {
            l.backoff = ms(RECONNECT_BACKOFF_MIN_MS_DEFAULT);
        }
        let wait = l.backoff;
        l.backoff = (l.backoff * 2).min(ms(RECONNECT_BACKOFF_MAX_MS_DEFAULT));
        self.broken.insert(gen);
        sim_link.on_link_lost(&state, instant);
        self.schedule(
            self.now + wait + connect,
            Event::LinkUp { life, bank, link },
        );
    }
}
