//! One connection: its writer and reader, the requests in flight, and building requests.

use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use switchyard::money::format_de4;
use switchyard::wire::{
    Dialect, EncodeError, Encoder, FrameDecoder, Framing, Message, Mti,
    FRAME_SIZE_MAX_BYTES_DEFAULT,
};

use super::progress::Recent;
use super::schedule::intended_offset;
use super::summary::{classify, Outcome, Tally};
use super::{ConnectionError, Plan, Stream, CLOSE_TIMEOUT_MS, LATENCY_MAX_US, LIVE_FLUSH_MS};
use switchyard::core::inflight::STAN_MAX;

/// Free space kept in the read buffer before each read, in bytes.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// RRNs (DE37) are 12 digits.
const RRN_MODULUS: u64 = 1_000_000_000_000;
const TERMINAL_ID: &[u8] = b"TERM0001";
const MERCHANT_ID: &[u8] = b"MERCHANT0000001";
const PROCESSING_CODE_PURCHASE: &[u8] = b"000000";

pub(super) async fn connection(plan: Arc<Plan>, index: usize, stream: Stream) -> Tally {
    let (reader, writer) = tokio::io::split(stream);
    let shared = Shared {
        state: Mutex::new(ConnState::new(&plan, index)),
        freed: Notify::new(),
    };
    let result = tokio::select! {
        read = read_loop(reader, &shared, &plan) => read,
        write = write_loop(writer, &shared, &plan) => write,
    };
    let mut state = shared.state.into_inner().unwrap_or_else(|e| e.into_inner());
    let failed = result.is_err();
    if let Err(e) = result {
        tracing::warn!(connection = index, error = %e, "load generator: connection failed");
        let in_flight = state.abandon();
        state.tally.errors += 1 + in_flight;
    }
    if let Some(rate) = plan.opts.rate {
        let unsent = plan
            .scheduled_measured(rate, index)
            .saturating_sub(state.tally.sent);
        state.tally.unsent = unsent;
        state.tally.behind = unsent > 0 && !failed;
    }
    if plan.opts.progress {
        state.flush_live(&plan);
    }
    state.tally
}

#[derive(Clone, Copy)]
enum SlotState {
    Free,
    InFlight {
        /// Send time (open loop: intended send time); latency and timeout run from it.
        sent: Instant,
        rrn: u64,
        /// Sent (intended) in the measured period.
        measured: bool,
    },
    /// Counted as a timeout; a late answer to it is ignored until the slot is reused.
    TimedOut,
}

#[derive(Clone, Copy)]
struct Slot {
    stan: u32,
    state: SlotState,
}

/// What the writer does next.
enum Next {
    /// Sleep until this intended send time.
    At(Instant),
    /// Wait for an answer to free a window slot.
    WindowFull,
    /// Nothing more to send.
    Done,
}

/// What an answer turned out to answer.
enum Matched {
    Request {
        sent: Instant,
        measured: bool,
    },
    /// An answer to a request already counted as a timeout.
    Late,
    /// Nothing in flight, or not the request in flight with that STAN.
    Stray {
        measured: bool,
    },
}

/// Requests in flight on one connection, indexed by STAN modulo a power of two at least
/// twice the window, plus the tally.
struct ConnState {
    slots: Vec<Slot>,
    in_flight: usize,
    next_stan: u32,
    /// Requests sent on this connection so far.
    seq: u64,
    /// Open loop: schedule index of the next request to send.
    next_due: u64,
    index: u64,
    connections: u64,
    tally: Tally,
    /// Not yet handed to the progress reporter.
    recent: Recent,
    next_scan: Instant,
    next_flush: Instant,
    /// Whether an undecodable answer was already logged (once per connection is enough).
    warned_decode: bool,
}

struct Shared {
    state: Mutex<ConnState>,
    /// Reader → writer: window slots were freed.
    freed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // Reader and writer run in one task, so the lock is never contended.
        switchyard::sync::lock(&self.state)
    }
}

impl ConnState {
    fn new(plan: &Plan, index: usize) -> ConnState {
        let capacity = (plan.opts.window * 2).next_power_of_two();
        // Spread connections over the STAN space so that two connections of one institution
        // do not send the same STAN in the same second.
        let spacing = STAN_MAX as usize / plan.opts.connections;
        let first = 1 + (index * spacing) % STAN_MAX as usize;
        // Stagger the progress hand-overs of the connections over the flush interval.
        let stagger = LIVE_FLUSH_MS * index as u64 / plan.opts.connections as u64;
        ConnState {
            slots: vec![
                Slot {
                    stan: 0,
                    state: SlotState::Free
                };
                capacity
            ],
            in_flight: 0,
            next_stan: u32::try_from(first).unwrap_or(1),
            seq: 0,
            next_due: 0,
            index: index as u64,
            connections: plan.opts.connections as u64,
            tally: Tally::new(&plan.templates),
            recent: Recent::new(&plan.templates),
            next_scan: plan.start,
            next_flush: plan.start + Duration::from_millis(stagger),
            warned_decode: false,
        }
    }

    fn slot_index(&self, stan: u32) -> usize {
        stan as usize & (self.slots.len() - 1)
    }

    /// The next STAN whose slot is not in flight. At most `window` slots are in flight and
    /// there are at least twice as many, so this ends within `window + 1` steps.
    fn allocate_stan(&mut self) -> u32 {
        loop {
            let stan = self.next_stan;
            self.next_stan = if stan >= STAN_MAX { 1 } else { stan + 1 };
            let slot = &self.slots[self.slot_index(stan)];
            if !matches!(slot.state, SlotState::InFlight { .. }) {
                return stan;
            }
        }
    }

    /// Encodes the next request into `out`, stamped `stamp` (its send time or, open loop,
    /// intended send time); it is measured if `stamp` is in the measured period.
    fn push_request(
        &mut self,
        plan: &Plan,
        clock: &WireClock,
        stamp: Instant,
        out: &mut BytesMut,
    ) -> Result<(), ConnectionError> {
        let opts = &plan.opts;
        let identity = &opts.identities[self.index as usize % opts.identities.len()];
        let stan = self.allocate_stan();
        let seq = self.seq;
        let rotation = (seq + self.index) as usize;
        let rrn = (seq * self.connections + self.index) % RRN_MODULUS;
        let values = RequestValues {
            pan: plan.pans[rotation % plan.pans.len()].as_bytes(),
            institution: identity.institution.as_bytes(),
            destination: (!opts.destinations.is_empty())
                .then(|| opts.destinations[rotation % opts.destinations.len()].as_bytes()),
            currency: &opts.currency,
            stan,
            rrn,
            amount_minor: amount_minor(seq, opts.decline_every),
        };
        values.encode(&opts.dialect, opts.framing, clock, out)?;
        let measured = stamp >= plan.measure_from && stamp < plan.send_until;
        let at = self.slot_index(stan);
        self.slots[at] = Slot {
            stan,
            state: SlotState::InFlight {
                sent: stamp,
                rrn,
                measured,
            },
        };
        self.seq += 1;
        self.in_flight += 1;
        if measured {
            self.tally.sent += 1;
        }
        Ok(())
    }

    /// Closed loop: encodes requests until the window is full, all stamped `now`.
    fn fill(
        &mut self,
        plan: &Plan,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<(), ConnectionError> {
        let free = plan.opts.window.saturating_sub(self.in_flight);
        if free == 0 {
            return Ok(());
        }
        let clock = WireClock::now();
        for _ in 0..free {
            self.push_request(plan, &clock, now, out)?;
        }
        Ok(())
    }

    /// Open loop: encodes every request due by `now` that the window has room for, each
    /// stamped with its intended send time, and says what to wait for next. At most `window`
    /// requests per call.
    fn send_due(
        &mut self,
        plan: &Plan,
        rate: u64,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<Next, ConnectionError> {
        let clock = WireClock::now();
        let (connections, index) = (plan.opts.connections, self.index as usize);
        // Each pass fills one window slot or returns, so this ends within window + 1 passes.
        loop {
            let offset = intended_offset(rate, connections, index, self.next_due);
            let intended = plan.start + offset;
            if intended >= plan.send_until {
                return Ok(Next::Done);
            }
            if intended > now {
                return Ok(Next::At(intended));
            }
            if self.in_flight >= plan.opts.window {
                return Ok(Next::WindowFull);
            }
            self.push_request(plan, &clock, intended, out)?;
            self.next_due += 1;
            if intended >= plan.measure_from {
                let lag_us = u64::try_from(now.saturating_duration_since(intended).as_micros());
                let lag_us = lag_us.unwrap_or(LATENCY_MAX_US).min(LATENCY_MAX_US);
                self.tally.send_lag.saturating_record(lag_us);
                if now >= plan.send_until {
                    self.tally.sent_late += 1;
                }
            }
        }
    }

    /// Scans for timed-out requests and hands recent figures to the progress reporter, each
    /// when its time has come.
    fn housekeeping(&mut self, plan: &Plan, now: Instant) {
        if now >= self.next_scan {
            self.expire(now, plan.opts.answer_timeout);
            self.next_scan = now + plan.expiry_tick;
        }
        if plan.opts.progress && now >= self.next_flush {
            self.flush_live(plan);
            self.next_flush = now + Duration::from_millis(LIVE_FLUSH_MS);
        }
    }

    /// When housekeeping is next due.
    fn next_housekeeping(&self, plan: &Plan) -> Instant {
        if plan.opts.progress {
            self.next_scan.min(self.next_flush)
        } else {
            self.next_scan
        }
    }

    /// Adds the recent figures to the shared ones, unless another connection or the
    /// reporter holds the lock: then they wait for the next flush (never blocks).
    fn flush_live(&mut self, plan: &Plan) {
        match plan.live.try_lock() {
            Ok(mut live) => live.absorb(&mut self.recent),
            Err(TryLockError::Poisoned(e)) => e.into_inner().absorb(&mut self.recent),
            Err(TryLockError::WouldBlock) => {}
        }
    }

    /// Counts requests sent `timeout` or longer before `now` as timeouts, freeing their slots.
    fn expire(&mut self, now: Instant, timeout: Duration) {
        if self.in_flight == 0 {
            return;
        }
        for slot in &mut self.slots {
            if let SlotState::InFlight { sent, measured, .. } = slot.state {
                if now.saturating_duration_since(sent) >= timeout {
                    slot.state = SlotState::TimedOut;
                    self.in_flight -= 1;
                    self.recent.timeouts += 1;
                    if measured {
                        self.tally.timeouts += 1;
                    }
                }
            }
        }
    }

    /// Forgets every request in flight (the connection failed, or the run ended); returns how
    /// many measured ones there were.
    fn abandon(&mut self) -> u64 {
        let mut measured_in_flight = 0;
        for slot in &mut self.slots {
            if let SlotState::InFlight { measured, .. } = slot.state {
                slot.state = SlotState::Free;
                measured_in_flight += u64::from(measured);
            }
        }
        self.in_flight = 0;
        measured_in_flight
    }

    /// Matches one answer with its request by STAN (and RRN) and counts it. `in_period`:
    /// the answer arrived in or after the measured period (for answers that match nothing).
    /// An answer `timeout` or more after its (intended) send time counts as a timeout, as the
    /// expiry scan would have counted it.
    fn on_answer(&mut self, answer: &Message, now: Instant, in_period: bool, timeout: Duration) {
        let de39 = answer.field(39).and_then(|c| <[u8; 2]>::try_from(c).ok());
        let (sent, measured) = match self.take_request(answer, in_period) {
            Matched::Request { sent, measured } => (sent, measured),
            // Already counted as a timeout: one outcome per request.
            Matched::Late => return,
            Matched::Stray { measured } => {
                self.recent.errors += 1;
                if measured {
                    self.tally.errors += 1;
                    if let Some(code) = de39 {
                        self.tally.count_code(code, 1);
                    }
                }
                return;
            }
        };
        let waited = now.saturating_duration_since(sent);
        if waited >= timeout {
            self.recent.timeouts += 1;
            self.tally.timeouts += u64::from(measured);
            return;
        }
        let micros = u64::try_from(waited.as_micros());
        let micros = micros.unwrap_or(LATENCY_MAX_US).clamp(1, LATENCY_MAX_US);
        self.recent.latency.saturating_record(micros);
        let outcome = de39.map_or(Outcome::Error, |c| classify(&c));
        match outcome {
            Outcome::Error => self.recent.errors += 1,
            Outcome::Timeout => self.recent.timeouts += 1,
            Outcome::Approved | Outcome::Declined => {}
        }
        if !measured {
            return;
        }
        self.tally.answered += 1;
        self.tally.latency.saturating_record(micros);
        if let Some(code) = de39 {
            self.tally.count_code(code, 1);
        }
        match outcome {
            Outcome::Approved => self.tally.approved += 1,
            Outcome::Declined => self.tally.declined += 1,
            Outcome::Timeout => self.tally.timeouts += 1,
            Outcome::Error => self.tally.errors += 1,
        }
    }

    /// Finds the request in flight that `answer` answers and frees its slot.
    fn take_request(&mut self, answer: &Message, in_period: bool) -> Matched {
        let stray = Matched::Stray {
            measured: in_period,
        };
        let Some(stan) = answer.field(11).and_then(parse_stan) else {
            return stray;
        };
        let at = self.slot_index(stan);
        let slot = self.slots[at];
        if slot.stan != stan {
            return stray;
        }
        match slot.state {
            SlotState::InFlight {
                sent,
                rrn,
                measured,
            } => {
                let mut expected_rrn = [0u8; 12];
                write_digits(rrn, &mut expected_rrn);
                if answer.mti() != Mti::FINANCIAL_RESPONSE
                    || answer.field(37) != Some(&expected_rrn[..])
                {
                    // Not the answer to this request; the request stays in flight.
                    return Matched::Stray { measured };
                }
                self.slots[at].state = SlotState::Free;
                self.in_flight -= 1;
                Matched::Request { sent, measured }
            }
            SlotState::TimedOut => {
                self.slots[at].state = SlotState::Free;
                Matched::Late
            }
            SlotState::Free => stray,
        }
    }
}

/// Sends until the end of the measured period — closed loop: keeps the window full; open
/// loop: follows the schedule — then waits for outstanding answers until `drain_until`
/// (those left count as timeouts) and closes the connection.
async fn write_loop(
    mut writer: impl AsyncWrite + Unpin,
    shared: &Shared,
    plan: &Plan,
) -> Result<(), ConnectionError> {
    let mut out = BytesMut::with_capacity(plan.opts.window.min(1024) * 256);
    // Closed loop: sending stops at `send_until`; open loop: a backlog held up by a full
    // window may still be sent until `drain_until`.
    let limit = match plan.opts.rate {
        None => plan.send_until,
        Some(_) => plan.drain_until,
    };
    loop {
        let now = Instant::now();
        if now >= limit {
            break;
        }
        let (next, wake) = {
            let mut state = shared.lock();
            state.housekeeping(plan, now);
            let next = match plan.opts.rate {
                None => state.fill(plan, now, &mut out).map(|()| Next::WindowFull)?,
                Some(rate) => state.send_due(plan, rate, now, &mut out)?,
            };
            (next, state.next_housekeeping(plan).min(limit))
        };
        if !out.is_empty() {
            // One write and one flush for everything due.
            let burst = async {
                writer.write_all(&out).await?;
                writer.flush().await
            };
            tokio::time::timeout_at(plan.drain_until, burst)
                .await
                .map_err(|_| ConnectionError::WriteStalled)??;
            out.clear();
            continue;
        }
        match next {
            Next::Done => break,
            Next::At(at) => tokio::time::sleep_until(at.min(wake)).await,
            Next::WindowFull => tokio::select! {
                () = shared.freed.notified() => {}
                () = tokio::time::sleep_until(wake) => {}
            },
        }
    }
    drain(shared, plan).await;
    let close = Duration::from_millis(CLOSE_TIMEOUT_MS);
    let _ = tokio::time::timeout(close, writer.shutdown()).await;
    Ok(())
}

/// Waits until every request in flight is answered or timed out, at the latest until
/// `drain_until`; those still in flight then count as timeouts.
async fn drain(shared: &Shared, plan: &Plan) {
    loop {
        let now = Instant::now();
        let wake = {
            let mut state = shared.lock();
            state.housekeeping(plan, now);
            if state.in_flight == 0 {
                return;
            }
            if now >= plan.drain_until {
                let left = state.abandon();
                state.tally.timeouts += left;
                return;
            }
            state.next_housekeeping(plan).min(plan.drain_until)
        };
        tokio::select! {
            () = shared.freed.notified() => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Reads answers and counts them, one lock and one wake-up of the writer per read.
/// Returns only on error: the peer closing the connection is one.
async fn read_loop(
    mut reader: impl AsyncRead + Unpin,
    shared: &Shared,
    plan: &Plan,
) -> Result<(), ConnectionError> {
    let max = FRAME_SIZE_MAX_BYTES_DEFAULT.max(plan.opts.dialect.message_size_max_bytes());
    let frames = FrameDecoder::new(plan.opts.framing, max);
    let mut input = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let timeout = plan.opts.answer_timeout;
    loop {
        if input.capacity() - input.len() < READ_CHUNK_BYTES / 4 {
            input.reserve(READ_CHUNK_BYTES);
        }
        if reader.read_buf(&mut input).await? == 0 {
            return Err(ConnectionError::Closed);
        }
        let now = Instant::now();
        let in_period = now >= plan.measure_from;
        let mut state = shared.lock();
        while let Some(frame) = frames.decode(&mut input)? {
            match Message::decode(&plan.opts.dialect, frame) {
                Ok(answer) => state.on_answer(&answer, now, in_period, timeout),
                Err(e) => {
                    state.recent.errors += 1;
                    if in_period {
                        state.tally.errors += 1;
                    }
                    if !state.warned_decode {
                        state.warned_decode = true;
                        tracing::warn!(error = %e, "load generator: undecodable answer");
                    }
                }
            }
        }
        drop(state);
        shared.freed.notify_one();
    }
}

// === requests ===

/// The values of one 0200.
pub(super) struct RequestValues<'a> {
    pub(super) pan: &'a [u8],
    pub(super) institution: &'a [u8],
    pub(super) destination: Option<&'a [u8]>,
    pub(super) currency: &'a [u8; 3],
    pub(super) stan: u32,
    pub(super) rrn: u64,
    pub(super) amount_minor: i64,
}

impl RequestValues<'_> {
    /// Appends the framed request to `out`; on error `out` is left as it was.
    pub(super) fn encode(
        &self,
        dialect: &Dialect,
        framing: Framing,
        clock: &WireClock,
        out: &mut BytesMut,
    ) -> Result<(), ConnectionError> {
        let at = framing.begin(out);
        let result = self.encode_message(dialect, clock, out);
        let result = result
            .map_err(ConnectionError::from)
            .and_then(|()| Ok(framing.finish(out, at)?));
        if result.is_err() {
            out.truncate(at);
        }
        result
    }

    fn encode_message(
        &self,
        dialect: &Dialect,
        clock: &WireClock,
        out: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        let mut amount = [0u8; 12];
        format_de4(self.amount_minor, &mut amount);
        let mut stan = [0u8; 6];
        write_digits(u64::from(self.stan), &mut stan);
        let mut rrn = [0u8; 12];
        write_digits(self.rrn, &mut rrn);
        let mut enc = Encoder::new(dialect, out, Mti::FINANCIAL);
        enc.field(2, self.pan)?;
        enc.field(3, PROCESSING_CODE_PURCHASE)?;
        enc.field(4, &amount)?;
        enc.field(7, &clock.de7)?;
        enc.field(11, &stan)?;
        enc.field(12, &clock.de7[4..])?;
        enc.field(13, &clock.de7[..4])?;
        enc.field(32, self.institution)?;
        enc.field(37, &rrn)?;
        enc.field(41, TERMINAL_ID)?;
        enc.field(42, MERCHANT_ID)?;
        enc.field(49, self.currency)?;
        if let Some(destination) = self.destination {
            enc.field(100, destination)?;
        }
        enc.finish();
        Ok(())
    }
}

/// Amount of request `seq` in minor units: 1000 + seq % 9000, never ending in 51, 05 or 61
/// (the bank simulator's declines) except every `decline_every`th request, which ends in 51.
fn amount_minor(seq: u64, decline_every: u32) -> i64 {
    let base = 1000 + (seq % 9000) as i64;
    if decline_every > 0 && (seq + 1) % u64::from(decline_every) == 0 {
        return base - base % 100 + 51;
    }
    match base % 100 {
        51 | 5 | 61 => base + 1,
        _ => base,
    }
}

fn parse_stan(field: &[u8]) -> Option<u32> {
    if field.is_empty() || field.len() > 6 {
        return None;
    }
    field.iter().try_fold(0u32, |v, &b| {
        b.is_ascii_digit().then(|| v * 10 + u32::from(b - b'0'))
    })
}

/// Writes `value` as decimal digits right-aligned in `out` (leading zeros).
fn write_digits(mut value: u64, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// DE7 (MMDDhhmmss, UTC) from the system clock; DE12 is its hhmmss, DE13 its MMDD.
pub(super) struct WireClock {
    de7: [u8; 10],
}

impl WireClock {
    pub(super) fn now() -> WireClock {
        WireClock::at_unix(switchyard::clock::unix_s())
    }

    fn at_unix(secs: u64) -> WireClock {
        WireClock {
            de7: switchyard::core::datetime::de7(secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_decline_only_when_asked() {
        let ends = |a: i64| a % 100;
        for seq in 0..20_000 {
            let a = amount_minor(seq, 0);
            assert!(!matches!(ends(a), 51 | 5 | 61), "{a}");
            assert!((1000..=10_000).contains(&a));
        }
        let declines = (0..100)
            .filter(|&s| ends(amount_minor(s, 10)) == 51)
            .count();
        assert_eq!(declines, 10);
    }

    #[test]
    fn wire_clock_and_stans() {
        // 2024-02-29 23:59:58 UTC.
        assert_eq!(&WireClock::at_unix(1_709_251_198).de7, b"0229235958");
        assert_eq!(&WireClock::at_unix(0).de7, b"0101000000");
        assert_eq!(parse_stan(b"000123"), Some(123));
        assert_eq!(parse_stan(b"12a456"), None);
        assert_eq!(classify(b"00"), Outcome::Approved);
        assert_eq!(classify(b"51"), Outcome::Declined);
        assert_eq!(classify(b"68"), Outcome::Timeout);
        assert_eq!(classify(b"91"), Outcome::Error);
    }
}
