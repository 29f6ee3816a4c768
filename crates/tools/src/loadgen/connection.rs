//! A task's connections: their reads and writes, one timer for all, the requests in flight
//! on each, and building requests.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, TryLockError};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
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

/// A task's share of the run: its connections, each with one read and at most one write
/// in flight, one timer for the task (the earliest send due among its connections, or
/// housekeeping), one tally. Returns the task's tally.
pub(super) async fn group(plan: Arc<Plan>, members: Vec<(usize, Stream)>) -> Tally {
    let first = members.first().map_or(0, |m| m.0);
    let mut g = Group {
        books: Books::new(&plan, first),
        members: Vec::with_capacity(members.len()),
        due: BinaryHeap::with_capacity(members.len()),
        ready: Vec::with_capacity(members.len()),
    };
    let mut reads = FuturesUnordered::new();
    let mut writes = FuturesUnordered::new();
    for (slot, (index, stream)) in members.into_iter().enumerate() {
        let (reader, writer) = tokio::io::split(stream);
        reads.push(read_some(
            slot,
            reader,
            BytesMut::with_capacity(READ_CHUNK_BYTES),
        ));
        g.members.push(Member {
            state: ConnState::new(&plan, index),
            writer: Some(writer),
            out: BytesMut::new(),
            spare: None,
            sending: Sending::Ready,
            failed: false,
            queued: false,
        });
        g.look_at(slot);
    }
    // Closed loop: sending stops at `send_until`; open loop: a backlog held up by a full
    // window may still be sent until `drain_until`.
    let limit = match plan.opts.rate {
        None => plan.send_until,
        Some(_) => plan.drain_until,
    };
    let timer = tokio::time::sleep_until(plan.start);
    tokio::pin!(timer);
    loop {
        let now = Instant::now();
        g.housekeeping(&plan, now);
        if now >= plan.drain_until {
            break;
        }
        while g.due.peek().is_some_and(|d| d.0 .0 <= now) {
            if let Some(Reverse((_, slot))) = g.due.pop() {
                g.look_at(slot);
            }
        }
        let sending = now < limit;
        for slot in std::mem::take(&mut g.ready) {
            g.members[slot].queued = false;
            g.send(&plan, slot, now, sending);
            if let Some(write) = g.start_write(&plan, slot) {
                writes.push(write);
            }
        }
        if g.finished(sending) && writes.is_empty() {
            break;
        }
        let mut wake = g.books.next_housekeeping(&plan).min(plan.drain_until);
        if sending {
            wake = wake.min(limit);
        }
        if let Some(Reverse((at, _))) = g.due.peek() {
            wake = wake.min(*at);
        }
        timer.as_mut().reset(wake);
        tokio::select! {
            biased;
            Some((slot, reader, mut input, read)) = reads.next() => {
                let now = Instant::now();
                match g.on_read(&plan, slot, &mut input, read, now) {
                    Ok(()) => reads.push(read_some(slot, reader, input)),
                    Err(e) => g.fail(slot, &e),
                }
            }
            Some((slot, writer, out, written)) = writes.next() => {
                g.wrote(slot, writer, out, written);
                // Encoded while that write was in flight: written now.
                if let Some(write) = g.start_write(&plan, slot) {
                    writes.push(write);
                }
            }
            () = &mut timer => {}
        }
    }
    g.finish(&plan).await
}

/// Reads what there is on one connection; gives the reader and buffer back.
async fn read_some(
    slot: usize,
    mut reader: ReadHalf<Stream>,
    mut input: BytesMut,
) -> (usize, ReadHalf<Stream>, BytesMut, std::io::Result<usize>) {
    if input.capacity() - input.len() < READ_CHUNK_BYTES / 4 {
        input.reserve(READ_CHUNK_BYTES);
    }
    let read = reader.read_buf(&mut input).await;
    (slot, reader, input, read)
}

/// A write ended: the connection, its writer and buffer back, how it went.
type Wrote = (
    usize,
    WriteHalf<Stream>,
    BytesMut,
    Result<(), ConnectionError>,
);

/// Writes one burst on one connection with one flush, at the latest by `until`.
async fn write_burst(
    slot: usize,
    mut writer: WriteHalf<Stream>,
    out: BytesMut,
    until: Instant,
) -> Wrote {
    let burst = async {
        writer.write_all(&out).await?;
        writer.flush().await
    };
    let written = match tokio::time::timeout_at(until, burst).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ConnectionError::Io(e)),
        Err(_) => Err(ConnectionError::WriteStalled),
    };
    (slot, writer, out, written)
}

/// Whether a connection has more to send.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sending {
    /// Looked at when due or when an answer frees its window.
    Ready,
    /// Window full: looked at again when an answer (or the expiry scan) frees a slot.
    WindowFull,
    /// Nothing more to send.
    Done,
}

/// One connection of a group.
struct Member {
    state: ConnState,
    /// `None` while a write is in flight (or once failed).
    writer: Option<WriteHalf<Stream>>,
    /// Encoded, not yet handed to a write.
    out: BytesMut,
    /// The buffer of the last write, kept for the next.
    spare: Option<BytesMut>,
    sending: Sending,
    failed: bool,
    /// In `Group::ready` already.
    queued: bool,
}

/// A task's connections and what they share.
struct Group {
    books: Books,
    members: Vec<Member>,
    /// Open loop: when each waiting connection's next request is due (one entry each:
    /// a connection gets one only from `send`, and is looked at again only once it
    /// is taken out, or while its window is full and it has none).
    due: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Connections to look at now.
    ready: Vec<usize>,
}

impl Group {
    /// Has connection `slot` looked at in this round (once, however many reasons).
    fn look_at(&mut self, slot: usize) {
        let m = &mut self.members[slot];
        if !m.queued {
            m.queued = true;
            self.ready.push(slot);
        }
    }

    /// Encodes what connection `slot` has to send now (closed loop: fills its window;
    /// open loop: what is due) and notes when to look at it again.
    fn send(&mut self, plan: &Plan, slot: usize, now: Instant, sending: bool) {
        let m = &mut self.members[slot];
        if m.failed || m.sending == Sending::Done {
            return;
        }
        if !sending {
            m.sending = Sending::Done;
            return;
        }
        let next = match plan.opts.rate {
            None => m
                .state
                .fill(plan, now, &mut m.out, &mut self.books)
                .map(|()| Next::WindowFull),
            Some(rate) => m
                .state
                .send_due(plan, rate, now, &mut m.out, &mut self.books),
        };
        match next {
            Ok(Next::At(at)) => {
                m.sending = Sending::Ready;
                self.due.push(Reverse((at, slot)));
            }
            Ok(Next::WindowFull) => m.sending = Sending::WindowFull,
            Ok(Next::Done) => m.sending = Sending::Done,
            Err(e) => self.fail(slot, &e),
        }
    }

    /// Hands connection `slot`'s encoded requests to a write unless one is in flight
    /// (they then go with the next).
    fn start_write(
        &mut self,
        plan: &Plan,
        slot: usize,
    ) -> Option<impl std::future::Future<Output = Wrote>> {
        let m = &mut self.members[slot];
        if m.failed || m.out.is_empty() {
            return None;
        }
        let writer = m.writer.take()?;
        let next = m.spare.take().unwrap_or_default();
        let out = std::mem::replace(&mut m.out, next);
        Some(write_burst(slot, writer, out, plan.drain_until))
    }

    /// A write on `slot` ended.
    fn wrote(
        &mut self,
        slot: usize,
        writer: WriteHalf<Stream>,
        mut out: BytesMut,
        written: Result<(), ConnectionError>,
    ) {
        if let Err(e) = written {
            self.fail(slot, &e);
            return;
        }
        let m = &mut self.members[slot];
        if m.failed {
            return;
        }
        out.clear();
        m.spare = Some(out);
        m.writer = Some(writer);
    }

    /// Counts the answers read on `slot`; an error when the connection failed or closed.
    fn on_read(
        &mut self,
        plan: &Plan,
        slot: usize,
        input: &mut BytesMut,
        read: std::io::Result<usize>,
        now: Instant,
    ) -> Result<(), ConnectionError> {
        if read? == 0 {
            return Err(ConnectionError::Closed);
        }
        let max = FRAME_SIZE_MAX_BYTES_DEFAULT.max(plan.opts.dialect.message_size_max_bytes());
        let frames = FrameDecoder::new(plan.opts.framing, max);
        let in_period = now >= plan.measure_from;
        let timeout = plan.opts.answer_timeout;
        let books = &mut self.books;
        let m = &mut self.members[slot];
        while let Some(mut frame) = frames.decode(input)? {
            // The answer's TPDU or header: read past (its bytes are not checked).
            if plan.opts.header.split(&mut frame).is_none() {
                books.recent.errors += 1;
                continue;
            }
            match Message::decode(&plan.opts.dialect, frame) {
                Ok(answer) => m.state.on_answer(&answer, now, in_period, timeout, books),
                Err(e) => {
                    books.recent.errors += 1;
                    if in_period {
                        books.tally.errors += 1;
                    }
                    if !books.warned_decode {
                        books.warned_decode = true;
                        tracing::warn!(error = %e, "load generator: undecodable answer");
                    }
                }
            }
        }
        // Closed loop refills at once; open loop only a connection its window held up.
        if plan.opts.rate.is_none() || m.sending == Sending::WindowFull {
            self.look_at(slot);
        }
        Ok(())
    }

    /// Connection `slot` failed: what it had in flight counts as errors.
    fn fail(&mut self, slot: usize, e: &ConnectionError) {
        let m = &mut self.members[slot];
        if m.failed {
            return;
        }
        tracing::warn!(connection = m.state.index, error = %e, "load generator: connection failed");
        m.failed = true;
        m.writer = None;
        let in_flight = m.state.abandon();
        self.books.tally.errors += 1 + in_flight;
    }

    /// Scans for timed-out requests (freeing windows) and hands recent figures to the
    /// progress reporter, each when its time has come.
    fn housekeeping(&mut self, plan: &Plan, now: Instant) {
        if now >= self.books.next_scan {
            for (slot, m) in self.members.iter_mut().enumerate() {
                if m.state
                    .expire(now, plan.opts.answer_timeout, &mut self.books)
                    && m.sending == Sending::WindowFull
                    && !m.queued
                {
                    m.queued = true;
                    self.ready.push(slot);
                }
            }
            self.books.next_scan = now + plan.expiry_tick;
        }
        if plan.opts.progress && now >= self.books.next_flush {
            self.books.flush_live(plan);
            self.books.next_flush = now + Duration::from_millis(LIVE_FLUSH_MS);
        }
    }

    /// Whether every connection is done: nothing more to send (`sending`: sending may
    /// go on) and nothing in flight.
    fn finished(&self, sending: bool) -> bool {
        self.members.iter().all(|m| {
            m.failed
                || (m.state.in_flight == 0
                    && (!sending || m.sending == Sending::Done)
                    && m.out.is_empty())
        })
    }

    /// Ends the run: what is still in flight counts as timeouts, unsent requests are
    /// counted, connections are closed.
    async fn finish(mut self, plan: &Plan) -> Tally {
        let close = Duration::from_millis(CLOSE_TIMEOUT_MS);
        for m in &mut self.members {
            if !m.failed {
                let left = m.state.abandon();
                self.books.tally.timeouts += left;
            }
            if let Some(rate) = plan.opts.rate {
                let unsent = plan
                    .scheduled_measured(rate, m.state.index as usize)
                    .saturating_sub(m.state.sent_measured);
                self.books.tally.unsent += unsent;
                self.books.tally.behind |= unsent > 0 && !m.failed;
            }
            if let Some(mut writer) = m.writer.take() {
                let _ = tokio::time::timeout(close, writer.shutdown()).await;
            }
        }
        if plan.opts.progress {
            self.books.flush_live(plan);
        }
        self.books.tally
    }
}

/// What a group counts for all its connections.
struct Books {
    tally: Tally,
    /// Not yet handed to the progress reporter.
    recent: Recent,
    next_scan: Instant,
    next_flush: Instant,
    /// Whether an undecodable answer was already logged (once per task is enough).
    warned_decode: bool,
}

impl Books {
    fn new(plan: &Plan, first: usize) -> Books {
        // Stagger the progress hand-overs of the tasks over the flush interval.
        let stagger = LIVE_FLUSH_MS * first as u64 / plan.opts.connections as u64;
        Books {
            tally: Tally::new(&plan.templates),
            recent: Recent::new(&plan.templates),
            next_scan: plan.start,
            next_flush: plan.start + Duration::from_millis(stagger),
            warned_decode: false,
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

    /// Adds the recent figures to the shared ones, unless another task or the reporter
    /// holds the lock: then they wait for the next flush (never blocks).
    fn flush_live(&mut self, plan: &Plan) {
        match plan.live.try_lock() {
            Ok(mut live) => live.absorb(&mut self.recent),
            Err(TryLockError::Poisoned(e)) => e.into_inner().absorb(&mut self.recent),
            Err(TryLockError::WouldBlock) => {}
        }
    }
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
/// twice the window.
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
    /// Open loop: requests sent (intended) in the measured period on this connection.
    sent_measured: u64,
}

impl ConnState {
    fn new(plan: &Plan, index: usize) -> ConnState {
        let capacity = (plan.opts.window * 2).next_power_of_two();
        // Spread connections over the STAN space so that two connections of one institution
        // do not send the same STAN in the same second.
        let spacing = STAN_MAX as usize / plan.opts.connections;
        let first = 1 + (index * spacing) % STAN_MAX as usize;
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
            sent_measured: 0,
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
        books: &mut Books,
    ) -> Result<(), ConnectionError> {
        let opts = &plan.opts;
        let identity = &opts.identities[self.index as usize % opts.identities.len()];
        let stan = self.allocate_stan();
        let seq = self.seq;
        let rotation = (seq + self.index) as usize;
        let rrn = (seq * self.connections + self.index) % RRN_MODULUS;
        let pan_index = rotation % plan.pans.len();
        let values = RequestValues {
            pan: plan.pans[pan_index].as_bytes(),
            institution: identity.institution.as_bytes(),
            destination: (!opts.destinations.is_empty())
                .then(|| opts.destinations[rotation % opts.destinations.len()].as_bytes()),
            currency: &opts.currency,
            stan,
            rrn,
            amount_minor: amount_minor(seq, opts.decline_every),
            secured: opts
                .keys
                .as_ref()
                .map(|k| (&k.acquirer, plan.pin_blocks[pan_index].as_bytes())),
        };
        let header = opts.header_sent();
        values.encode(&opts.dialect, opts.framing, header.as_bytes(), clock, out)?;
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
            books.tally.sent += 1;
            self.sent_measured += 1;
        }
        Ok(())
    }

    /// Closed loop: encodes requests until the window is full, all stamped `now`.
    fn fill(
        &mut self,
        plan: &Plan,
        now: Instant,
        out: &mut BytesMut,
        books: &mut Books,
    ) -> Result<(), ConnectionError> {
        let free = plan.opts.window.saturating_sub(self.in_flight);
        if free == 0 {
            return Ok(());
        }
        let clock = WireClock::now();
        for _ in 0..free {
            self.push_request(plan, &clock, now, out, books)?;
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
        books: &mut Books,
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
            self.push_request(plan, &clock, intended, out, books)?;
            self.next_due += 1;
            if intended >= plan.measure_from {
                let lag_us = u64::try_from(now.saturating_duration_since(intended).as_micros());
                let lag_us = lag_us.unwrap_or(LATENCY_MAX_US).min(LATENCY_MAX_US);
                books.tally.send_lag.saturating_record(lag_us);
                if now >= plan.send_until {
                    books.tally.sent_late += 1;
                }
            }
        }
    }

    /// Counts requests sent `timeout` or longer before `now` as timeouts, freeing their
    /// slots; says whether it freed any.
    fn expire(&mut self, now: Instant, timeout: Duration, books: &mut Books) -> bool {
        if self.in_flight == 0 {
            return false;
        }
        let before = self.in_flight;
        for slot in &mut self.slots {
            if let SlotState::InFlight { sent, measured, .. } = slot.state {
                if now.saturating_duration_since(sent) >= timeout {
                    slot.state = SlotState::TimedOut;
                    self.in_flight -= 1;
                    books.recent.timeouts += 1;
                    if measured {
                        books.tally.timeouts += 1;
                    }
                }
            }
        }
        self.in_flight < before
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
    fn on_answer(
        &mut self,
        answer: &Message,
        now: Instant,
        in_period: bool,
        timeout: Duration,
        books: &mut Books,
    ) {
        let de39 = answer.field(39).and_then(|c| <[u8; 2]>::try_from(c).ok());
        let (sent, measured) = match self.take_request(answer, in_period) {
            Matched::Request { sent, measured } => (sent, measured),
            // Already counted as a timeout: one outcome per request.
            Matched::Late => return,
            Matched::Stray { measured } => {
                books.recent.errors += 1;
                if measured {
                    books.tally.errors += 1;
                    if let Some(code) = de39 {
                        books.tally.count_code(code, 1);
                    }
                }
                return;
            }
        };
        let waited = now.saturating_duration_since(sent);
        if waited >= timeout {
            books.recent.timeouts += 1;
            books.tally.timeouts += u64::from(measured);
            return;
        }
        let micros = u64::try_from(waited.as_micros());
        let micros = micros.unwrap_or(LATENCY_MAX_US).clamp(1, LATENCY_MAX_US);
        books.recent.latency.saturating_record(micros);
        let outcome = de39.map_or(Outcome::Error, |c| classify(&c));
        match outcome {
            Outcome::Error => books.recent.errors += 1,
            Outcome::Timeout => books.recent.timeouts += 1,
            Outcome::Approved | Outcome::Declined => {}
        }
        if !measured {
            return;
        }
        books.tally.answered += 1;
        books.tally.latency.saturating_record(micros);
        if let Some(code) = de39 {
            books.tally.count_code(code, 1);
        }
        match outcome {
            Outcome::Approved => books.tally.approved += 1,
            Outcome::Declined => books.tally.declined += 1,
            Outcome::Timeout => books.tally.timeouts += 1,
            Outcome::Error => books.tally.errors += 1,
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
    /// The acquirer's MAC key and the request's PIN block.
    pub(super) secured: Option<(&'a switchyard::security::LinkKeys, &'a [u8])>,
}

impl RequestValues<'_> {
    /// Appends the framed request to `out`, `header` between the length and the
    /// message; on error `out` is left as it was.
    pub(super) fn encode(
        &self,
        dialect: &Dialect,
        framing: Framing,
        header: &[u8],
        clock: &WireClock,
        out: &mut BytesMut,
    ) -> Result<(), ConnectionError> {
        let at = framing.begin(out);
        out.extend_from_slice(header);
        let start = out.len();
        let result = self.encode_message(dialect, clock, out);
        // The MAC over the message, in its placeholder (the last field).
        let result = result.and_then(|width| match (self.secured, width) {
            (Some((keys, _)), Some(width)) if !keys.seal(&mut out[start..], width) => {
                Err(EncodeError {
                    field: 64,
                    kind: switchyard::wire::EncodeErrorKind::Malformed,
                })
            }
            _ => Ok(()),
        });
        let result = result
            .map_err(ConnectionError::from)
            .and_then(|()| Ok(framing.finish(out, at)?));
        if result.is_err() {
            out.truncate(at);
        }
        result
    }

    /// Encodes the message; with keys, a MAC placeholder last, whose width is
    /// returned.
    fn encode_message(
        &self,
        dialect: &Dialect,
        clock: &WireClock,
        out: &mut BytesMut,
    ) -> Result<Option<usize>, EncodeError> {
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
        if let Some((_, pin_block)) = self.secured {
            enc.field(52, pin_block)?;
        }
        if let Some(destination) = self.destination {
            enc.field(100, destination)?;
        }
        let highest = if self.destination.is_some() { 100 } else { 52 };
        let placeholder = self
            .secured
            .and_then(|(keys, _)| keys.placeholder(dialect, highest));
        if let Some((n, zeros)) = placeholder {
            enc.field(n, zeros)?;
        }
        enc.finish();
        Ok(placeholder.map(|(_, zeros)| zeros.len()))
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
