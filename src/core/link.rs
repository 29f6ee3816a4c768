//! One bank link as a sans-IO state machine (in the spirit of quinn-proto's
//! `Connection`): its in-flight table, STAN allocation, batch filling (requests and
//! reversal advices), answer matching, deadline expiry, echoes, sign-on and
//! sign-off, and what becomes of a request the bank may have seen but whose answer
//! the acquirer will not get (a reversal advice).
//!
//! No sockets, no tasks, no clock: time comes in as arguments. The tokio connector
//! (`net::connector`) is a shell that moves bytes and timers; the simulation
//! (`tests/simulation/`) drives this same type with a fake clock; the
//! `core_payment` bench drives it without a journal.
//!
//! Its methods come in the four kinds of a quinn-proto state machine:
//! - getters: [`Link::is_up`], [`Link::inflight`], [`Link::ended`];
//! - input: [`Link::on_answer`] (a frame from the bank), [`Link::handle_timeout`],
//!   [`Link::on_link_lost`];
//! - mutators: [`Link::submit`] (one request into flight), [`Link::retire`],
//!   [`Link::close`];
//! - output: [`Link::poll_transmit`] (bytes to write, and the journal record they
//!   wait for), [`Link::poll_timeout`] (when to call `handle_timeout`), and the
//!   wake-up flags [`Link::take_wake_writer`] / [`Link::take_wake_reader`] for a
//!   shell that reads and writes in two futures.
//!
//! What a link needs from its bank (the queue it draws requests from, the STAN
//! counter shared by the bank's links, reversal advices waiting, the journal, where
//! an answer goes) it asks of a [`LinkEnv`]; `core::bank::BankState` is the
//! switch's.
//!
//! Life of a link: `SigningOn` (0800 DE70 001 sent; the link is up once the bank
//! answers 00 within the echo timeout) → `Up` (requests and advices flow; an echo,
//! DE70 301, after `echo_interval` without a write; an echo unanswered within
//! `echo_timeout` ends the link) → `Retiring` (a reload shrank the pool: nothing new
//! is taken, requests in flight are answered or time out) → `SigningOff` (0800 DE70
//! 002, awaited up to min(echo timeout, [`SIGN_OFF_WAIT_MAX`])) → `Ended`.
//!
//! Key change: when its bank has a new working key to send ([`LinkEnv::take_key_change`],
//! taken by one link only), an up link sends an 0800 with DE70 161, DE7, DE11, the
//! key's TR-31 block under the bank's ZMK and its check value (in the fields the
//! bank's `key_block_field` and `kcv_field` name; no MAC, as on every 08xx), and
//! reports what became of it ([`LinkEnv::key_change_done`]): an 0810 with 00 (and,
//! if it echoes the check value, the same one), another code, or no answer within
//! the echo timeout.

use super::inflight::{InflightTable, Stan, TableFull};
use super::reversal::{encode_reversal_advice, rewrite_de90};
use super::saf::Advice;
use super::InstitutionId;
use crate::journal::AppendError;
use crate::security::{LinkKeys, PinOut, WorkingKey};
use crate::wire::{
    reencode, Change, Dialect, EncodeError, Encoder, Framing, Header, Message, MessageHeader, Mti,
};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_security::module::StagedKey;

/// Longest wait for a bank's answer to a sign-off (else the echo timeout).
pub const SIGN_OFF_WAIT_MAX: Duration = Duration::from_secs(1);

/// DE70 network management codes the switch sends.
const SIGN_ON: &[u8; 3] = b"001";
const SIGN_OFF: &[u8; 3] = b"002";
const ECHO: &[u8; 3] = b"301";
const KEY_CHANGE: &[u8; 3] = b"161";

/// A new working key for the bank, sent by whichever of its links takes it
/// first (`core::bank::BankState::start_key_change` makes them).
pub struct KeyChange {
    /// Tells this change from the bank's others.
    pub id: u64,
    /// Which working key it replaces.
    pub key: WorkingKey,
    /// The key as it goes to the bank (a TR-31 block under its ZMK) and its
    /// check value. Never logged but by check value.
    pub staged: StagedKey,
    /// A link taking it later sends nothing: whoever asked has given up by then.
    pub send_by: Instant,
}

impl std::fmt::Debug for KeyChange {
    /// The key's check value, never its block.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyChange")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("kcv", &String::from_utf8_lossy(&kcv_hex(self.staged.kcv)))
            .finish_non_exhaustive()
    }
}

/// What became of a key change on the link that took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyChangeAnswer {
    /// An 0810 with 00 (and the new key's check value, if it echoed one).
    Approved,
    /// An answer with another code (`--`: none), or another MTI than 0810.
    Declined([u8; 2]),
    /// An 0810 with 00 but another check value: the bank holds another key.
    KcvMismatch,
    /// No answer within the echo timeout, or the link was lost meanwhile: the
    /// bank may or may not have taken the key.
    Unanswered,
    /// Never sent (why: a static label).
    NotSent(&'static str),
}

impl KeyChangeAnswer {
    /// As a metric label and in log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyChangeAnswer::Approved => "approved",
            KeyChangeAnswer::Declined(_) => "declined",
            KeyChangeAnswer::KcvMismatch => "kcv-mismatch",
            KeyChangeAnswer::Unanswered => "unanswered",
            KeyChangeAnswer::NotSent(_) => "not-sent",
        }
    }
}

/// A request as a link carries it.
pub trait LinkRequest {
    /// The request as the acquirer sent it.
    fn message(&self) -> &Message;
    /// When the acquirer must have its answer.
    fn deadline(&self) -> Instant;
    /// For an acquirer's reversal: the STAN the bank saw its original under.
    fn original_link_stan(&self) -> Option<Stan>;
    /// Notes when the request was encoded for the bank.
    fn forwarded_at(&mut self, now: Instant);
    /// When it was received and when forwarded (for latency samples).
    fn times(&self) -> (Instant, Instant);
    /// What becomes of its DE52 on the bank's link (translated at ingress).
    fn pin_out(&self) -> PinOut {
        PinOut::AsIs
    }
    /// Whether its DE64/DE128 was its acquirer's MAC (checked at ingress): the
    /// bank never sees it.
    fn acquirer_mac(&self) -> bool {
        false
    }
}

/// How a request on a link ended. (Answers dominate; boxing the message would
/// allocate per answer.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Finish {
    /// The bank answered, with an MTI that fits the request.
    Answered {
        /// The STAN the request carried on the link.
        stan: Stan,
        /// The bank's answer.
        answer: Message,
    },
    /// No answer by the deadline (68). The bank may have seen the request: a
    /// reversal advice goes to it for the payment the bank knows under `reverse`.
    TimedOut {
        /// The link STAN to reverse (an acquirer's reversal: its original's).
        reverse: Stan,
    },
    /// The link could not take or keep it (91): `why` names which bound or event,
    /// for metrics. With `reverse`, the bank may have seen it (the link was lost
    /// with it in flight) and a reversal advice goes too.
    Unavailable {
        /// A static metric label: "expired in queue", "link in-flight table full",
        /// "journal", "link lost".
        why: &'static str,
        /// The link STAN to reverse, when the bank may have seen it.
        reverse: Option<Stan>,
    },
    /// It does not fit the bank's dialect (30); nothing was sent.
    Unencodable,
    /// The bank answered with an MTI that does not fit it (96).
    WrongAnswer {
        /// The MTI the bank sent.
        mti: Mti,
    },
}

/// What a link asks of its bank (the switch's: `core::bank::BankState`).
pub trait LinkEnv {
    /// The requests this link carries.
    type Request: LinkRequest;

    /// The next STAN candidate, from a counter shared by every link to the bank
    /// (STANs are unique per bank, and continue across restarts).
    fn next_stan(&self) -> u32;
    /// The next request queued for the bank, if any.
    fn next_request(&self) -> Option<Self::Request>;
    /// Reversal advices due at `now`, at most `max`, appended to `out`.
    fn due_advices(&self, now: Instant, max: usize, out: &mut Vec<Advice>);
    /// When the earliest waiting advice is due.
    fn next_advice_due(&self) -> Option<Instant>;
    /// Write-ahead: `request` is about to go to the bank under `stan`; the journal
    /// sequence returned must be durable before the bytes are written. An error:
    /// the request is not sent (the link finishes it as unavailable).
    fn forwarded(&self, request: &Self::Request, stan: Stan) -> Result<u64, AppendError>;
    /// `request` ended on this link.
    fn finish(&self, request: Self::Request, how: Finish, now: Instant);
    /// An answer matched nothing in flight (late, or unknown); `approved`: DE39 00.
    fn unmatched(&self, stan: Stan, approved: bool);
    /// The bank acknowledged a reversal advice (0430).
    fn advice_acked(&self, advice: Advice);
    /// An advice went unanswered (or its link was lost): try again after a backoff.
    fn advice_retry(&self, advice: Advice, now: Instant);
    /// The link's table is full: the advice waits its first backoff step (no
    /// attempt counted).
    fn advice_deferred(&self, advice: Advice, now: Instant);
    /// The advice cannot be encoded for this bank: it is parked.
    fn advice_unsendable(&self, advice: Advice);
    /// Link `slot` signed on: it counts as up.
    fn link_up(&self, slot: usize);
    /// Link `slot`, up until now, is not any more (lost, retiring, closed).
    fn link_down(&self, slot: usize);
    /// Requests and messages in flight on link `slot` now (a gauge).
    fn inflight(&self, slot: usize, n: usize);
    /// A key change to send, if one waits (each is handed to one link only).
    /// Called on every transmit of an up link: keep the empty case cheap.
    fn take_key_change(&self) -> Option<KeyChange> {
        None
    }
    /// The key change link `slot` took ended with `answer`.
    fn key_change_done(&self, change: KeyChange, answer: KeyChangeAnswer, slot: usize) {
        let _ = (change, answer, slot);
    }
}

/// Why a link ended, as far as the link itself knows (the shell adds I/O errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkEnd {
    /// The bank did not answer the sign-on within the echo timeout.
    #[error("sign-on unanswered")]
    SignOnUnanswered,
    /// The bank answered the sign-on with a code other than 00.
    #[error("sign-on declined by the bank")]
    SignOnDeclined,
    /// The sign-on cannot be encoded in the bank's dialect.
    #[error("sign-on cannot be encoded in the bank's dialect")]
    SignOnUnencodable,
    /// An echo went unanswered (or could not be sent: the table was full).
    #[error("echo unanswered")]
    EchoUnanswered,
    /// Closed for shutdown (signed off).
    #[error("shutdown")]
    Shutdown,
    /// Retired by a reload (signed off once its requests ended).
    #[error("retired by a reload")]
    Retired,
}

/// What a link needs of its bank's settings.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The bank (for log lines).
    pub bank: InstitutionId,
    /// The acquirers' dialect (requests arrive in it).
    pub acquirer_dialect: Arc<Dialect>,
    /// The bank's dialect.
    pub dialect: Arc<Dialect>,
    /// The bank's framing.
    pub framing: Framing,
    /// The header between a frame's length and the message (a TPDU), and what the
    /// switch writes there.
    pub header: (MessageHeader, Header),
    /// Requests and messages in flight at most.
    pub inflight_max: usize,
    /// Requests (and, separately, advices) taken per transmit.
    pub write_batch_max: usize,
    /// Time without a write before an echo.
    pub echo_interval: Duration,
    /// Time the bank has to answer an echo, a sign-on, a sign-off or an advice.
    pub echo_timeout: Duration,
    /// The bank's PIN and MAC keys.
    pub security: LinkKeys,
}

impl LinkConfig {
    /// Starts a frame at the end of `buf`: its length (filled in by
    /// `framing.finish`) and the header; returns the frame's offset.
    fn begin(&self, buf: &mut BytesMut) -> usize {
        let at = self.framing.begin(buf);
        buf.extend_from_slice(self.header.1.as_bytes());
        at
    }
}

/// What a link is waiting on under a STAN (requests dominate; boxing would
/// allocate per request).
#[allow(clippy::large_enum_variant)]
enum Waiter<R> {
    Request(R),
    Reversal(Advice),
    Echo,
    SignOn,
    SignOff,
    KeyChange(KeyChange),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    SigningOn,
    Up,
    Retiring,
    SigningOff(LinkEnd),
    Ended(LinkEnd),
}

/// One bank link's state (see the module docs).
pub struct Link<E: LinkEnv> {
    config: LinkConfig,
    /// The link slot (gauges, log lines).
    slot: usize,
    state: State,
    table: InflightTable<Waiter<E::Request>>,
    /// Network management messages to write, by STAN (their waiters are in the
    /// table).
    echo_due: Option<Stan>,
    sign_off_due: Option<Stan>,
    /// The echo in flight, if any.
    echo: Option<Stan>,
    /// Whether the link counts as up at its bank.
    counted_up: bool,
    /// Whether it ever signed on.
    signed_on: bool,
    /// When bytes were last handed out for writing.
    last_transmit: Instant,
    /// What the shell's timer is set to (the last `poll_timeout`).
    armed: Option<Instant>,
    /// Advices due up to here have had the writer woken for them.
    advices_woken_until: Option<Instant>,
    wake_writer: bool,
    wake_reader: bool,
    /// Reused scratch space.
    advices: Vec<Advice>,
    expired: Vec<(Stan, Waiter<E::Request>)>,
}

impl<E: LinkEnv> Link<E> {
    /// A link just connected, about to sign on (its first transmit is the 0800).
    pub fn new(config: LinkConfig, slot: usize, now: Instant) -> Link<E> {
        Link {
            table: InflightTable::new(config.inflight_max),
            config,
            slot,
            state: State::SigningOn,
            echo_due: None,
            sign_off_due: None,
            echo: None,
            counted_up: false,
            signed_on: false,
            last_transmit: now,
            armed: None,
            advices_woken_until: None,
            wake_writer: true,
            wake_reader: true,
            advices: Vec::new(),
            expired: Vec::new(),
        }
    }

    // === getters ===

    /// Whether the link is signed on and takes requests.
    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// Whether the bank accepted its sign-on (the link was up at some point).
    pub fn has_signed_on(&self) -> bool {
        self.signed_on
    }

    /// Requests and messages in flight.
    pub fn inflight(&self) -> usize {
        self.table.len()
    }

    /// Why the link ended, once it has: the shell then closes it.
    pub fn ended(&self) -> Option<LinkEnd> {
        match self.state {
            State::Ended(end) => Some(end),
            _ => None,
        }
    }

    /// The link slot.
    pub fn slot(&self) -> usize {
        self.slot
    }

    // === input ===

    /// A frame from the bank: matched by DE11 to what is in flight. When it answers
    /// a request, returns when that request was received and when its batch was
    /// encoded (the shell knows when that batch was written, for its latency
    /// sample, `telemetry::Sample::new(.., .., now)`).
    pub fn on_answer(
        &mut self,
        env: &E,
        mut frame: Bytes,
        now: Instant,
    ) -> Option<(Instant, Instant)> {
        if self.config.header.0.split(&mut frame).is_none() {
            crate::log_limited!(warn, bank = %self.config.bank, header = self.config.header.0.kind(),
                "bank message shorter than its header dropped");
            metrics::counter!("switchyard_bank_bad_messages_total").increment(1);
            return None;
        }
        let raw = frame.clone();
        let answer = match Message::decode(&self.config.dialect, frame) {
            Ok(m) => m,
            Err(e) => {
                crate::log_limited!(warn, bank = %self.config.bank, error = %e,
                    "undecodable message from bank dropped");
                metrics::counter!("switchyard_bank_bad_messages_total").increment(1);
                return None;
            }
        };
        if let Err(failure) = self
            .config
            .security
            .verify(&raw, &answer, &self.config.dialect)
        {
            // Dropped: its request ends as an unanswered one (68, and a reversal
            // advice). The MAC itself is never logged.
            metrics::counter!("switchyard_mac_failures_total", "side" => "bank", "reason" => failure.as_str())
                .increment(1);
            crate::log_limited!(warn, bank = %self.config.bank, mti = %answer.mti(),
                reason = failure.as_str(), "bank message whose MAC does not verify dropped");
            return None;
        }
        let Some(stan) = answer.field(11).and_then(Stan::from_de11) else {
            crate::log_limited!(warn, bank = %self.config.bank, mti = %answer.mti(),
                "bank message without a valid DE11");
            return None;
        };
        let waiter = self.table.take(stan);
        env.inflight(self.slot, self.table.len());
        let mut sample = None;
        match waiter {
            Some(Waiter::Request(p)) if Some(answer.mti()) == p.message().mti().response() => {
                sample = Some(p.times());
                env.finish(p, Finish::Answered { stan, answer }, now);
            }
            Some(Waiter::Request(p)) => {
                crate::log_limited!(warn, bank = %self.config.bank, mti = %answer.mti(),
                    "bank answer with the wrong MTI");
                env.finish(p, Finish::WrongAnswer { mti: answer.mti() }, now);
            }
            Some(Waiter::Reversal(advice)) if answer.mti() == Mti::REVERSAL_ADVICE_RESPONSE => {
                env.advice_acked(advice);
            }
            Some(Waiter::Reversal(advice)) => {
                crate::log_limited!(warn, bank = %self.config.bank, mti = %answer.mti(),
                    "unexpected answer to a reversal advice");
                env.advice_retry(advice, now);
            }
            Some(Waiter::Echo) => {
                self.echo = None;
                tracing::debug!(bank = %self.config.bank, "echo answered");
            }
            Some(Waiter::SignOn) => self.signed_on(env, &answer),
            Some(Waiter::SignOff) => {
                let result = if answer.field(39) == Some(b"00") {
                    "answered"
                } else {
                    "declined"
                };
                metrics::counter!("switchyard_sign_offs_total", "result" => result).increment(1);
                tracing::info!(bank = %self.config.bank, link = self.slot, result, "sign-off answered");
                self.signed_off();
            }
            Some(Waiter::KeyChange(change)) => {
                let outcome = key_change_answer(&self.config.security, &change, &answer);
                env.key_change_done(change, outcome, self.slot);
            }
            None => env.unmatched(stan, answer.field(39) == Some(b"00")),
        }
        self.check_retired();
        sample
    }

    /// Expires what is due at `now`: requests (68, and a reversal advice), advices
    /// (tried again later), the echo, sign-on or sign-off (the link ends); starts an
    /// echo after `echo_interval` without a write.
    pub fn handle_timeout(&mut self, env: &E, now: Instant) {
        self.armed = None;
        let mut expired = std::mem::take(&mut self.expired);
        self.table.expire(now, &mut expired);
        if !expired.is_empty() {
            env.inflight(self.slot, self.table.len());
        }
        for (stan, waiter) in expired.drain(..) {
            match waiter {
                Waiter::Request(p) => {
                    let reverse = p.original_link_stan().unwrap_or(stan);
                    env.finish(p, Finish::TimedOut { reverse }, now);
                }
                Waiter::Reversal(advice) => env.advice_retry(advice, now),
                Waiter::Echo => self.end(LinkEnd::EchoUnanswered),
                Waiter::SignOn => self.end(LinkEnd::SignOnUnanswered),
                Waiter::SignOff => {
                    metrics::counter!("switchyard_sign_offs_total", "result" => "unanswered")
                        .increment(1);
                    crate::log_limited!(warn, bank = %self.config.bank, "sign-off unanswered");
                    self.signed_off();
                }
                Waiter::KeyChange(change) => {
                    env.key_change_done(change, KeyChangeAnswer::Unanswered, self.slot);
                }
            }
        }
        self.expired = expired;
        if self.state == State::Up {
            if self.echo.is_none() && now >= self.last_transmit + self.config.echo_interval {
                self.start_echo(env, now);
            }
            if env.next_advice_due().is_some_and(|due| due <= now) {
                self.advices_woken_until = Some(now);
                self.wake_writer = true;
            }
        }
        self.check_retired();
    }

    /// The connection is gone: everything in flight ends. Requests get 91 and, as
    /// the bank may have seen them, a reversal advice; advices are tried again on
    /// another link or later.
    pub fn on_link_lost(&mut self, env: &E, now: Instant) {
        let mut lost = 0u64;
        let drained: Vec<(Stan, Waiter<E::Request>)> = self.table.drain().collect();
        for (stan, waiter) in drained {
            match waiter {
                Waiter::Request(p) => {
                    lost += 1;
                    let reverse = Some(p.original_link_stan().unwrap_or(stan));
                    let how = Finish::Unavailable {
                        why: "link lost",
                        reverse,
                    };
                    env.finish(p, how, now);
                }
                Waiter::Reversal(advice) => env.advice_retry(advice, now),
                Waiter::KeyChange(change) => {
                    env.key_change_done(change, KeyChangeAnswer::Unanswered, self.slot);
                }
                Waiter::Echo | Waiter::SignOn | Waiter::SignOff => {}
            }
        }
        env.inflight(self.slot, 0);
        if lost > 0 {
            crate::log_limited!(warn, bank = %self.config.bank, link = self.slot, lost,
                "link lost with requests in flight: answered 91; reversal advices queued");
        }
        self.count_down(env);
        if !matches!(self.state, State::Ended(_)) {
            self.state = State::Ended(match self.state {
                State::SigningOff(end) => end,
                _ => LinkEnd::Shutdown,
            });
        }
    }

    // === mutators ===

    /// Puts one request in flight at `now` and encodes it (DE11 its link STAN, a
    /// reversal's DE90 naming the STAN its original had) into `buf`. Returns the
    /// journal sequence the bytes wait for (0: none, or the request was finished
    /// instead: expired in the queue, table full, journal refused, unencodable).
    pub fn submit(
        &mut self,
        env: &E,
        mut request: E::Request,
        now: Instant,
        buf: &mut BytesMut,
    ) -> u64 {
        let deadline = request.deadline();
        if deadline <= now {
            let how = Finish::Unavailable {
                why: "expired in queue",
                reverse: None,
            };
            env.finish(request, how, now);
            return 0;
        }
        request.forwarded_at(now);
        let first = env.next_stan();
        let (stan, request) =
            match self
                .table
                .insert_from_mut(first, deadline, Waiter::Request(request))
            {
                Ok((stan, Waiter::Request(request))) => (stan, &*request),
                Ok(_) => return 0,
                Err(TableFull(Waiter::Request(p))) => {
                    let how = Finish::Unavailable {
                        why: "link in-flight table full",
                        reverse: None,
                    };
                    env.finish(p, how, now);
                    return 0;
                }
                Err(TableFull(_)) => return 0,
            };
        // Recorded before the bank can see it, so recovery knows to reverse it.
        let journaled = env.forwarded(request, stan);
        let encoded = match journaled {
            Ok(_) => encode_request(&self.config, request, stan, buf),
            Err(_) => Ok(()),
        };
        let seq = match journaled {
            Ok(seq) if encoded.is_ok() => seq,
            Ok(_) => {
                if let Some(Waiter::Request(p)) = self.table.take(stan) {
                    let error = encoded.err().flatten();
                    crate::log_limited!(warn, bank = %self.config.bank,
                        field = error.map_or(0, |e| e.field),
                        error = %error.map_or_else(|| "too large for the frame".to_owned(), |e| e.to_string()),
                        from = self.config.acquirer_dialect.name(), to = self.config.dialect.name(),
                        "request does not fit the bank's dialect: answered 30");
                    env.finish(p, Finish::Unencodable, now);
                }
                return 0;
            }
            Err(e) => {
                crate::log_limited!(warn, bank = %self.config.bank, error = %e,
                    "forward not journaled: answered 91");
                if let Some(Waiter::Request(p)) = self.table.take(stan) {
                    let how = Finish::Unavailable {
                        why: "journal",
                        reverse: None,
                    };
                    env.finish(p, how, now);
                }
                return 0;
            }
        };
        self.deadline_added(deadline);
        seq
    }

    /// A reload shrank the pool: nothing new is taken; once its requests in flight
    /// have ended the link signs off and ends.
    pub fn retire(&mut self, env: &E) {
        match self.state {
            State::Up => {
                self.state = State::Retiring;
                self.count_down(env);
            }
            State::SigningOn => self.end(LinkEnd::Retired),
            _ => {}
        }
        self.wake_writer = true;
    }

    /// Shutdown: sign off now (whatever is still in flight ends as the link
    /// closes, see [`Link::on_link_lost`]).
    pub fn close(&mut self, now: Instant) {
        match self.state {
            State::SigningOn => self.end(LinkEnd::Shutdown),
            State::Up | State::Retiring => self.sign_off(LinkEnd::Shutdown, now),
            State::SigningOff(_) | State::Ended(_) => {}
        }
        self.wake_writer = true;
    }

    // === output ===

    /// Fills `buf` with what is to be written now: a pending sign-on, echo or
    /// sign-off; when up, the reversal advices due (0420, or 0421 for a repeat, each
    /// under a new STAN, answered within the echo timeout) and up to
    /// `write_batch_max` queued requests. `unix_s` is the wall clock (DE7).
    /// Returns the journal sequence to be durable before `buf` is written (0: none).
    pub fn poll_transmit(&mut self, env: &E, now: Instant, unix_s: u64, buf: &mut BytesMut) -> u64 {
        self.wake_writer = false;
        let start = buf.len();
        let mut seq = 0;
        if self.state == State::Retiring && self.table.is_empty() {
            self.sign_off(LinkEnd::Retired, now);
        }
        if self.state == State::SigningOn && self.table.is_empty() {
            self.start_sign_on(env, now, unix_s, buf);
        }
        if let Some(stan) = self.echo_due.take() {
            // Unencodable: the echo goes unanswered and ends the link, as a lost one.
            let _ = self.network_message(ECHO, stan, unix_s, None, buf);
        }
        if self.state == State::Up {
            self.send_key_change(env, now, unix_s, buf);
            self.fill_advices(env, now, unix_s, buf);
            let mut taken = 0;
            while taken < self.config.write_batch_max {
                let Some(request) = env.next_request() else {
                    break;
                };
                taken += 1;
                seq = seq.max(self.submit(env, request, now, buf));
            }
            env.inflight(self.slot, self.table.len());
            // A full batch (even one whose requests were all answered at once, a
            // full table's 91s writing nothing): the queue may hold more.
            if taken == self.config.write_batch_max {
                self.wake_writer = true;
            }
        }
        if let Some(stan) = self.sign_off_due.take() {
            if !self.network_message(SIGN_OFF, stan, unix_s, None, buf) {
                self.signed_off();
            }
        }
        if buf.len() > start {
            self.last_transmit = now;
        }
        seq
    }

    /// When [`Link::handle_timeout`] is next due: the earliest deadline in flight,
    /// the echo when idle, a reversal advice becoming due.
    pub fn poll_timeout(&mut self, env: &E) -> Option<Instant> {
        let mut at = self.table.next_deadline();
        if self.state == State::Up {
            if self.echo.is_none() {
                at = earliest(at, Some(self.last_transmit + self.config.echo_interval));
            }
            let due = env
                .next_advice_due()
                .filter(|&due| self.advices_woken_until.is_none_or(|w| due > w));
            at = earliest(at, due);
        }
        self.armed = at;
        self.wake_reader = false;
        at
    }

    /// Whether the writer must run (something to transmit, more queued than one
    /// transmit takes, or the link ended). A writer checks it after
    /// [`Link::poll_transmit`] too: no bytes does not mean nothing left to do.
    pub fn take_wake_writer(&mut self) -> bool {
        std::mem::take(&mut self.wake_writer)
    }

    /// Whether the timer must be set again (a deadline earlier than the one it is
    /// set to was added).
    pub fn take_wake_reader(&mut self) -> bool {
        std::mem::take(&mut self.wake_reader)
    }

    // === inside ===

    fn end(&mut self, end: LinkEnd) {
        if !matches!(self.state, State::Ended(_)) {
            self.state = State::Ended(end);
        }
        self.wake_writer = true;
    }

    fn count_down(&mut self, env: &E) {
        if std::mem::take(&mut self.counted_up) {
            env.link_down(self.slot);
        }
    }

    fn deadline_added(&mut self, deadline: Instant) {
        if self.armed.is_none_or(|armed| deadline < armed) {
            self.wake_reader = true;
        }
    }

    fn check_retired(&mut self) {
        if self.state == State::Retiring && self.table.is_empty() {
            self.wake_writer = true;
        }
    }

    fn start_sign_on(&mut self, env: &E, now: Instant, unix_s: u64, buf: &mut BytesMut) {
        let deadline = now + self.config.echo_timeout;
        match self
            .table
            .insert_from(env.next_stan(), deadline, Waiter::SignOn)
        {
            Ok(stan) => {
                self.deadline_added(deadline);
                if !self.network_message(SIGN_ON, stan, unix_s, None, buf) {
                    self.end(LinkEnd::SignOnUnencodable);
                }
            }
            Err(_) => self.end(LinkEnd::SignOnUnanswered),
        }
    }

    fn signed_on(&mut self, env: &E, answer: &Message) {
        if self.state != State::SigningOn {
            return;
        }
        if answer.field(39) != Some(b"00") {
            self.end(LinkEnd::SignOnDeclined);
            return;
        }
        self.state = State::Up;
        self.counted_up = true;
        self.signed_on = true;
        env.link_up(self.slot);
        self.wake_writer = true;
        self.wake_reader = true; // the echo timer starts
    }

    fn start_echo(&mut self, env: &E, now: Instant) {
        let deadline = now + self.config.echo_timeout;
        match self
            .table
            .insert_from(env.next_stan(), deadline, Waiter::Echo)
        {
            Ok(stan) => {
                self.echo = Some(stan);
                self.echo_due = Some(stan);
                self.deadline_added(deadline);
                self.wake_writer = true;
            }
            Err(_) => self.end(LinkEnd::EchoUnanswered),
        }
    }

    /// Sends an 0800 sign-off and ends with `end` once it is answered or its
    /// deadline passes (a full table: ends at once).
    fn sign_off(&mut self, end: LinkEnd, now: Instant) {
        let wait = self.config.echo_timeout.min(SIGN_OFF_WAIT_MAX);
        let stan = self.table.insert(now + wait, Waiter::SignOff);
        match stan {
            Ok(stan) => {
                self.state = State::SigningOff(end);
                self.sign_off_due = Some(stan);
                self.deadline_added(now + wait);
                self.wake_writer = true;
            }
            Err(_) => self.end(end),
        }
    }

    fn signed_off(&mut self) {
        let end = match self.state {
            State::SigningOff(end) => end,
            _ => LinkEnd::Shutdown,
        };
        self.end(end);
    }

    /// Encodes the reversal advices that are due into `buf`.
    fn fill_advices(&mut self, env: &E, now: Instant, unix_s: u64, buf: &mut BytesMut) {
        if env.next_advice_due().is_none_or(|due| due > now) {
            return;
        }
        let de7 = super::datetime::de7(unix_s);
        let mut due = std::mem::take(&mut self.advices);
        env.due_advices(now, self.config.write_batch_max, &mut due);
        if due.len() == self.config.write_batch_max {
            self.wake_writer = true; // more may be due
        }
        let deadline = now + self.config.echo_timeout;
        for advice in due.drain(..) {
            let stan =
                match self
                    .table
                    .insert_from(env.next_stan(), deadline, Waiter::Reversal(advice))
                {
                    Ok(stan) => stan,
                    Err(TableFull(Waiter::Reversal(advice))) => {
                        env.advice_deferred(advice, now);
                        continue;
                    }
                    Err(TableFull(_)) => continue,
                };
            let Some(Waiter::Reversal(advice)) = self.table.get(stan) else {
                continue;
            };
            let at = self.config.begin(buf);
            let encoded = encode_reversal_advice(
                &advice.original,
                (&self.config.dialect, &self.config.security),
                advice.original_link_stan,
                stan,
                &de7,
                advice.attempts > 0,
                buf,
            )
            .is_ok()
                && self.config.framing.finish(buf, at).is_ok();
            if !encoded {
                buf.truncate(at);
                if let Some(Waiter::Reversal(advice)) = self.table.take(stan) {
                    env.advice_unsendable(advice);
                }
                continue;
            }
            self.deadline_added(deadline);
        }
        self.advices = due;
    }

    /// Takes the key change waiting for the bank, if any, and encodes its 0800
    /// into `buf` (see the module docs); what cannot go is reported at once.
    fn send_key_change(&mut self, env: &E, now: Instant, unix_s: u64, buf: &mut BytesMut) {
        let Some(change) = env.take_key_change() else {
            return;
        };
        if now > change.send_by {
            let late = KeyChangeAnswer::NotSent("no link took it in time");
            return env.key_change_done(change, late, self.slot);
        }
        let deadline = now + self.config.echo_timeout;
        let waiter = Waiter::KeyChange(change);
        let stan = match self.table.insert_from(env.next_stan(), deadline, waiter) {
            Ok(stan) => stan,
            Err(TableFull(Waiter::KeyChange(change))) => {
                let full = KeyChangeAnswer::NotSent("link in-flight table full");
                return env.key_change_done(change, full, self.slot);
            }
            Err(TableFull(_)) => return,
        };
        let Some(Waiter::KeyChange(change)) = self.table.get(stan) else {
            return;
        };
        let kcv = kcv_hex(change.staged.kcv);
        let sent = self.config.security.exchange.is_some_and(|e| {
            let fields = [
                (e.key_block_field, change.staged.block.as_bytes()),
                (e.kcv_field, &kcv[..]),
            ];
            self.network_message(KEY_CHANGE, stan, unix_s, Some(fields), buf)
        });
        if !sent {
            if let Some(Waiter::KeyChange(change)) = self.table.take(stan) {
                let why = KeyChangeAnswer::NotSent("does not fit the bank's dialect");
                env.key_change_done(change, why, self.slot);
            }
            return;
        }
        tracing::info!(bank = %self.config.bank, link = self.slot, key = change.key.as_str(),
            kcv = %String::from_utf8_lossy(&kcv), stan = stan.value(), "key change sent");
        self.deadline_added(deadline);
    }

    /// Encodes an 0800 with DE70 `code`, DE11 `stan`, DE7 and the `extra` fields,
    /// framed, into `buf`; false (nothing appended) if it cannot be encoded.
    fn network_message(
        &self,
        code: &[u8; 3],
        stan: Stan,
        unix_s: u64,
        extra: Option<[(u8, &[u8]); 2]>,
        buf: &mut BytesMut,
    ) -> bool {
        let digits = stan.to_de11();
        let de7 = super::datetime::de7(unix_s);
        let mut fields: [(u8, &[u8]); 5] =
            [(7, &de7), (11, &digits), (70, code), (0, &[]), (0, &[])];
        let count = match extra {
            Some([a, b]) => {
                fields[3] = a;
                fields[4] = b;
                5
            }
            None => 3,
        };
        let fields = &mut fields[..count];
        fields.sort_unstable_by_key(|f| f.0);
        let framing = self.config.framing;
        let at = self.config.begin(buf);
        let mut enc = Encoder::new(&self.config.dialect, buf, Mti::NETWORK);
        let ok = fields.iter().all(|&(n, value)| enc.field(n, value).is_ok());
        // finish() is 0 only when the wire conversion failed.
        let ok = ok && enc.finish() > 0;
        let ok = ok && framing.finish(buf, at).is_ok();
        if !ok {
            buf.truncate(at);
        }
        ok
    }
}

/// Encodes `request` for the bank with DE11 `stan` (and a reversal's DE90 naming
/// the STAN its original had), framed, into `buf`; false (nothing appended) if it
/// does not fit the bank's dialect.
/// Encodes `p` for the bank under `stan`, framed, into `buf`; on failure nothing is
/// appended and the error names the field the bank's dialect cannot carry (None:
/// the message is too large for the frame).
fn encode_request<R: LinkRequest>(
    config: &LinkConfig,
    p: &R,
    stan: Stan,
    buf: &mut BytesMut,
) -> Result<(), Option<EncodeError>> {
    let request = p.message();
    let digits = stan.to_de11();
    let de90 = p
        .original_link_stan()
        .and_then(|s| rewrite_de90(request, s));
    // At most: DE11, DE90, DE52, the MAC placeholder and the other MAC field
    // removed (unused places repeat DE11's change).
    let set11 = Change::Set(11, &digits);
    let mut changes = [set11; 5];
    let mut count = 1;
    macro_rules! push {
        ($c:expr) => {{
            changes[count] = $c;
            count += 1;
        }};
    }
    if let Some(de90) = &de90 {
        push!(Change::Set(90, de90));
    }
    let pin = p.pin_out();
    match &pin {
        PinOut::AsIs => {}
        PinOut::Translated(block) => push!(Change::Set(52, block.as_bytes())),
        PinOut::Removed => push!(Change::Remove(52)),
    }
    let highest = request
        .highest_field_except(&[64, 128])
        .max(if de90.is_some() { 90 } else { 0 });
    let placeholder = config.security.placeholder(&config.dialect, highest);
    match placeholder {
        Some((n, zeros)) => {
            push!(Change::Set(n, zeros));
            let other = if n == 64 { 128 } else { 64 };
            if request.has(other) {
                push!(Change::Remove(other));
            }
        }
        None if p.acquirer_mac() => {
            for n in [64, 128] {
                if request.has(n) {
                    push!(Change::Remove(n));
                }
            }
        }
        None => {}
    }
    let at = config.begin(buf);
    let start = buf.len();
    let encoded = reencode(
        request,
        &config.acquirer_dialect,
        &config.dialect,
        request.mti(),
        &changes[..count],
        buf,
    )
    .map_err(Some)
    .and_then(|_| match placeholder {
        Some((n, zeros)) if !config.security.seal(&mut buf[start..], zeros.len()) => {
            Err(Some(EncodeError {
                field: n,
                kind: crate::wire::EncodeErrorKind::Malformed,
            }))
        }
        _ => Ok(()),
    })
    .and_then(|_| config.framing.finish(buf, at).map_err(|_| None));
    if encoded.is_err() {
        buf.truncate(at);
    }
    encoded
}

/// What the bank's answer to `change` says (see [`KeyChangeAnswer`]).
fn key_change_answer(security: &LinkKeys, change: &KeyChange, answer: &Message) -> KeyChangeAnswer {
    let code = match answer.field(39) {
        Some(&[a, b]) => [a, b],
        _ => *b"--",
    };
    if answer.mti() != Mti::NETWORK_RESPONSE || &code != b"00" {
        return KeyChangeAnswer::Declined(code);
    }
    let echoed = security.exchange.and_then(|e| answer.field(e.kcv_field));
    match echoed {
        Some(kcv) if !kcv.eq_ignore_ascii_case(&kcv_hex(change.staged.kcv)) => {
            KeyChangeAnswer::KcvMismatch
        }
        _ => KeyChangeAnswer::Approved,
    }
}

/// A key check value as 6 upper-case hex digits.
pub fn kcv_hex(kcv: [u8; 3]) -> [u8; 6] {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = [0u8; 6];
    for (i, b) in kcv.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xF)];
    }
    out
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    //! The link driven directly, without sockets or a runtime, against the
    //! switch's own [`BankState`] (journal off): frames in and out as a bank would
    //! see them, answers as the acquirer's session would receive them.

    use super::*;
    use crate::core::answer::encode_reply;
    use crate::core::bank::{BankState, Wake};
    use crate::core::books::Books;
    use crate::core::recent::Recent;
    use crate::core::request::Answer;
    use crate::core::request::{InstitutionSlot, Pending};
    use crate::core::writeahead::WriteAhead;
    use crate::wire::FrameDecoder;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::mpsc;

    struct NoWake;

    impl Wake for NoWake {
        fn writers(&self) {}
        fn links_changed(&self) {}
    }

    /// One link of one bank, the acquirer's answer channel, and a clock.
    struct Harness {
        bank: BankState,
        link: Link<BankState>,
        dialect: Arc<Dialect>,
        tx: mpsc::Sender<Answer>,
        rx: mpsc::Receiver<Answer>,
        inflight: Arc<AtomicUsize>,
        t0: Instant,
        now: Instant,
        /// Acquirer DE11s handed out.
        sent: u32,
    }

    const ECHO_INTERVAL: Duration = Duration::from_secs(30);
    const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

    fn config(bank_extra: &str) -> crate::config::Config {
        let text = format!(
            "[switch]\nlisten = \"127.0.0.1:0\"\n\
             [tls]\nca_file = \"x\"\ncert_file = \"x\"\nkey_file = \"x\"\n\
             client_cert_file = \"x\"\nclient_key_file = \"x\"\n\
             [[institution]]\nid = \"100001\"\n\
             [[bank]]\nid = \"200001\"\naddress = \"127.0.0.1:9\"\nserver_name = \"bank\"\n\
             request_timeout_ms = {}\necho_interval_ms = {}\necho_timeout_ms = {}\n{bank_extra}\n\
             [[route]]\npan_prefix = \"4\"\nbank = \"200001\"\n",
            REQUEST_TIMEOUT.as_millis(),
            ECHO_INTERVAL.as_millis(),
            ECHO_TIMEOUT.as_millis(),
        );
        crate::config::Config::parse(&text, std::path::Path::new("<link test>")).unwrap()
    }

    impl Harness {
        fn new(bank_extra: &str, first_stan: u32) -> Harness {
            let config = config(bank_extra);
            let t0 = Instant::now();
            let dialect = config.dialect.clone();
            let recent = Arc::new(Recent::new(Duration::from_secs(60), 1 << 20, 4, false, t0));
            let books = Books::new(WriteAhead::off(), recent, dialect.clone());
            let bank = config.banks[0].clone();
            let bank = BankState::new(
                0,
                bank,
                dialect.clone(),
                books,
                first_stan,
                Arc::new(NoWake),
            );
            let link = Link::new(bank.link_config(), 0, t0);
            let (tx, rx) = mpsc::channel(64);
            Harness {
                bank,
                link,
                dialect,
                tx,
                rx,
                inflight: Arc::new(AtomicUsize::new(0)),
                t0,
                now: t0,
                sent: 0,
            }
        }

        /// A link signed on (its sign-on answered 00 by the bank).
        fn up(first_stan: u32) -> Harness {
            let mut h = Harness::new("", first_stan);
            let sign_on = h.transmit();
            assert_eq!(sign_on.len(), 1);
            assert_eq!(sign_on[0].field(70), Some(&b"001"[..]));
            assert!(!h.link.is_up());
            h.answer_network(&sign_on[0], b"00");
            assert!(h.link.is_up() && h.bank.links_up() == 1);
            h
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
        }

        /// What the link writes now, as the bank decodes it.
        fn transmit(&mut self) -> Vec<Message> {
            transmit_on(&mut self.link, &self.bank, self.now, &self.dialect)
        }

        /// Queues a request of the acquirer (`mti`, DE90 `de90`) for the bank.
        fn submit(&mut self, mti: Mti, de90: Option<&[u8]>, original_link_stan: Option<Stan>) {
            self.sent += 1;
            let stan = format!("{:06}", self.sent);
            let mut fields: Vec<(u8, &[u8])> = vec![
                (2, b"4111111111111111"),
                (3, b"000000"),
                (4, b"000000001000"),
                (7, b"1126093000"),
                (11, stan.as_bytes()),
                (32, b"100001"),
                (49, b"978"),
            ];
            if let Some(de90) = de90 {
                fields.push((90, de90));
            }
            let request = build(&self.dialect, mti, &fields);
            let pending = Pending {
                request,
                reply: self.tx.clone().try_reserve_owned().unwrap().into(),
                acquirer: InstitutionId::from_digits(b"100001").unwrap(),
                request_id: u64::from(self.sent),
                received_at: self.now,
                forwarded_at: self.now,
                bank: 0,
                deadline: self.now + REQUEST_TIMEOUT,
                entry: None,
                original_link_stan,
                slot: InstitutionSlot::take(&self.inflight, usize::MAX).unwrap(),
                key_time: crate::core::dedup::KeyTime::Transmission,
                pin: Default::default(),
                acquirer_mac: false,
                digest: None,
            };
            self.bank.submit(pending);
        }

        /// The bank answers `request` (as it received it) with `de39`.
        fn answer(&mut self, request: &Message, de39: &[u8]) -> Option<(Instant, Instant)> {
            let mti = request.mti().response().unwrap();
            let mut fields: Vec<(u8, &[u8])> = Vec::new();
            for n in [2u8, 3, 4, 7, 11, 32] {
                if let Some(v) = request.field(n) {
                    fields.push((n, v));
                }
            }
            fields.push((39, de39));
            let answer = build(&self.dialect, mti, &fields);
            self.link
                .on_answer(&self.bank, answer.as_bytes().clone(), self.now)
        }

        fn answer_network(&mut self, request: &Message, de39: &[u8]) {
            let fields: [(u8, &[u8]); 4] = [
                (7, request.field(7).unwrap()),
                (11, request.field(11).unwrap()),
                (39, de39),
                (70, request.field(70).unwrap()),
            ];
            let answer = build(&self.dialect, Mti::NETWORK_RESPONSE, &fields);
            self.link
                .on_answer(&self.bank, answer.as_bytes().clone(), self.now);
        }

        /// The answers the acquirer received, as (its DE11, DE39).
        fn replies(&mut self) -> Vec<(String, String)> {
            let mut out = Vec::new();
            while let Ok(Answer { reply, .. }) = self.rx.try_recv() {
                let mut buf = BytesMut::new();
                assert!(encode_reply(
                    &reply,
                    (&self.dialect, &Default::default()),
                    Framing::U16be,
                    &[],
                    &mut buf
                ));
                let frame = FrameDecoder::new(Framing::U16be, 8192)
                    .decode(&mut buf)
                    .unwrap()
                    .unwrap();
                let m = Message::decode(&self.dialect, frame).unwrap();
                let text = |n| String::from_utf8_lossy(m.field(n).unwrap_or(b"")).into_owned();
                out.push((text(11), text(39)));
            }
            out
        }
    }

    /// What `link` writes now, as the bank decodes it.
    fn transmit_on(
        link: &mut Link<BankState>,
        bank: &BankState,
        now: Instant,
        dialect: &Dialect,
    ) -> Vec<Message> {
        let mut buf = BytesMut::new();
        link.poll_transmit(bank, now, 1_764_149_400, &mut buf);
        let decoder = FrameDecoder::new(Framing::U16be, 8192);
        let mut out = Vec::new();
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            out.push(Message::decode(dialect, frame).unwrap());
        }
        assert!(buf.is_empty());
        out
    }

    fn build(d: &Dialect, mti: Mti, fields: &[(u8, &[u8])]) -> Message {
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(d, &mut out, mti);
        for &(n, v) in fields {
            enc.field(n, v).unwrap();
        }
        enc.finish();
        Message::decode(d, out.freeze()).unwrap()
    }

    fn pair(de11: &str, de39: &str) -> (String, String) {
        (de11.to_owned(), de39.to_owned())
    }

    #[test]
    fn answers_out_of_order_are_matched_by_stan() {
        let mut h = Harness::up(1);
        for _ in 0..3 {
            h.submit(Mti::FINANCIAL, None, None);
        }
        let at_bank = h.transmit();
        let stans: Vec<&[u8]> = at_bank.iter().map(|m| m.field(11).unwrap()).collect();
        assert_eq!(
            stans,
            [b"000002", b"000003", b"000004"],
            "after the sign-on's 1"
        );
        assert_eq!(h.link.inflight(), 3);
        h.advance(Duration::from_millis(3));
        assert!(h.answer(&at_bank[2], b"51").is_some());
        assert!(h.answer(&at_bank[0], b"00").is_some());
        assert!(h.answer(&at_bank[1], b"05").is_some());
        // Each acquirer gets its own answer, with its own DE11 back.
        let replies = h.replies();
        assert_eq!(
            replies,
            [
                pair("000003", "51"),
                pair("000001", "00"),
                pair("000002", "05")
            ]
        );
        assert_eq!(h.link.inflight(), 0);
        // An answer matching nothing in flight is counted and dropped.
        assert!(h.answer(&at_bank[0], b"00").is_none());
        assert_eq!(
            h.bank
                .stats
                .unmatched
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_late_answer_after_expiry_leaves_the_advice_queued() {
        let mut h = Harness::up(1);
        h.submit(Mti::FINANCIAL, None, None);
        let at_bank = h.transmit();
        assert_eq!(h.link.poll_timeout(&h.bank), Some(h.t0 + REQUEST_TIMEOUT));
        h.advance(REQUEST_TIMEOUT);
        h.link.handle_timeout(&h.bank, h.now);
        assert_eq!(h.replies(), [pair("000001", "68")]);
        assert_eq!(h.bank.reversals_waiting(), 1);
        // The bank's approval arrives late: dropped, and the advice stays queued.
        h.advance(Duration::from_millis(10));
        assert!(h.answer(&at_bank[0], b"00").is_none());
        assert_eq!(h.bank.reversals_waiting(), 1);
        assert!(h.replies().is_empty(), "no second answer");
        // The next write carries it: an 0420 naming the request as the bank saw it.
        let advices = h.transmit();
        assert_eq!(advices.len(), 1);
        assert_eq!(advices[0].mti(), Mti::REVERSAL_ADVICE);
        let de90 = advices[0].field(90).unwrap();
        assert_eq!(&de90[..4], b"0200");
        assert_eq!(&de90[4..10], at_bank[0].field(11).unwrap(), "the link STAN");
        assert_eq!(&de90[10..20], b"1126093000");
        // Unanswered within the echo timeout: repeated as an 0421 after a backoff.
        h.advance(ECHO_TIMEOUT);
        h.link.handle_timeout(&h.bank, h.now);
        assert_eq!(h.bank.reversals_waiting(), 1);
        h.advance(Duration::from_secs(1));
        h.link.handle_timeout(&h.bank, h.now);
        let repeat = h.transmit();
        assert_eq!(repeat[0].mti(), Mti::REVERSAL_ADVICE_REPEAT);
        let answered = h.answer(&repeat[0], b"00");
        assert!(answered.is_none(), "no latency sample for an advice");
        assert_eq!(h.bank.reversals_waiting(), 0);
        assert_eq!(
            h.bank
                .stats
                .reversals_acked
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_lost_link_answers_91_and_queues_advices() {
        let mut h = Harness::up(1);
        h.submit(Mti::FINANCIAL, None, None);
        h.submit(Mti::FINANCIAL, None, None);
        let at_bank = h.transmit();
        assert_eq!(at_bank.len(), 2);
        h.link.on_link_lost(&h.bank, h.now);
        let mut replies = h.replies();
        replies.sort();
        assert_eq!(replies, [pair("000001", "91"), pair("000002", "91")]);
        assert_eq!(h.bank.reversals_waiting(), 2, "the bank may have seen both");
        assert_eq!(h.bank.links_up(), 0);
        // With no link up, a new request is answered 91 at once.
        h.submit(Mti::FINANCIAL, None, None);
        assert_eq!(h.replies(), [pair("000003", "91")]);
    }

    #[test]
    fn stans_wrap_from_999999_to_1() {
        let mut h = Harness::up(crate::core::inflight::STAN_MAX - 1);
        h.submit(Mti::FINANCIAL, None, None);
        h.submit(Mti::FINANCIAL, None, None);
        let at_bank = h.transmit();
        let stans: Vec<&[u8]> = at_bank.iter().map(|m| m.field(11).unwrap()).collect();
        assert_eq!(stans, [b"999999", b"000001"], "after the sign-on's 999998");
        h.answer(&at_bank[1], b"00");
        h.answer(&at_bank[0], b"00");
        assert_eq!(h.replies(), [pair("000002", "00"), pair("000001", "00")]);
    }

    #[test]
    fn a_reversal_of_a_reversal_names_the_original_payment() {
        let mut h = Harness::up(1);
        // The acquirer's 0400 names its payment by the acquirer's DE11 (000042);
        // the bank saw the payment under link STAN 000777.
        let de90 = b"020000004211260930000000010000100000000000";
        let original = Stan::from_value(777).unwrap();
        h.submit(Mti::REVERSAL, Some(de90), Some(original));
        let at_bank = h.transmit();
        assert_eq!(at_bank[0].mti(), Mti::REVERSAL);
        assert_eq!(&at_bank[0].field(90).unwrap()[4..10], b"000777");
        // No answer: 68 to the acquirer, and the switch reverses the payment itself.
        h.advance(REQUEST_TIMEOUT);
        h.link.handle_timeout(&h.bank, h.now);
        assert_eq!(h.replies(), [pair("000001", "68")]);
        let advice = h.transmit();
        assert_eq!(advice[0].mti(), Mti::REVERSAL_ADVICE);
        let named = advice[0].field(90).unwrap();
        assert_eq!(&named[..4], b"0200", "the payment, not the 0400");
        assert_eq!(&named[4..10], b"000777", "under the STAN the bank saw it");
    }

    #[test]
    fn sign_on_declined_or_unanswered_ends_the_link() {
        let mut h = Harness::new("", 1);
        let sign_on = h.transmit();
        h.answer_network(&sign_on[0], b"91");
        assert_eq!(h.link.ended(), Some(LinkEnd::SignOnDeclined));
        assert_eq!(h.bank.links_up(), 0);
        let mut h = Harness::new("", 1);
        h.transmit();
        assert_eq!(h.link.poll_timeout(&h.bank), Some(h.t0 + ECHO_TIMEOUT));
        h.advance(ECHO_TIMEOUT);
        h.link.handle_timeout(&h.bank, h.now);
        assert_eq!(h.link.ended(), Some(LinkEnd::SignOnUnanswered));
    }

    #[test]
    fn an_idle_link_echoes_and_an_unanswered_echo_ends_it() {
        let mut h = Harness::up(1);
        assert_eq!(h.link.poll_timeout(&h.bank), Some(h.t0 + ECHO_INTERVAL));
        h.advance(ECHO_INTERVAL);
        h.link.handle_timeout(&h.bank, h.now);
        assert!(h.link.take_wake_writer());
        let echo = h.transmit();
        assert_eq!(echo[0].field(70), Some(&b"301"[..]));
        h.answer_network(&echo[0], b"00");
        assert_eq!(h.link.poll_timeout(&h.bank), Some(h.now + ECHO_INTERVAL));
        h.advance(ECHO_INTERVAL);
        h.link.handle_timeout(&h.bank, h.now);
        h.transmit();
        h.advance(ECHO_TIMEOUT);
        h.link.handle_timeout(&h.bank, h.now);
        assert_eq!(h.link.ended(), Some(LinkEnd::EchoUnanswered));
    }

    #[test]
    fn a_retiring_link_finishes_its_requests_then_signs_off() {
        let mut h = Harness::up(1);
        h.submit(Mti::FINANCIAL, None, None);
        let at_bank = h.transmit();
        h.link.retire(&h.bank);
        assert_eq!(h.bank.links_up(), 0, "takes nothing new");
        assert!(
            h.transmit().is_empty(),
            "no sign-off while a request is in flight"
        );
        h.answer(&at_bank[0], b"00");
        assert_eq!(h.replies(), [pair("000001", "00")]);
        assert!(h.link.take_wake_writer());
        let sign_off = h.transmit();
        assert_eq!(sign_off[0].field(70), Some(&b"002"[..]));
        assert_eq!(h.link.ended(), None);
        h.answer_network(&sign_off[0], b"00");
        assert_eq!(h.link.ended(), Some(LinkEnd::Retired));
    }

    #[test]
    fn shutdown_signs_off_and_unanswered_sign_off_ends_after_its_wait() {
        let mut h = Harness::up(1);
        h.link.close(h.now);
        let sign_off = h.transmit();
        assert_eq!(sign_off[0].field(70), Some(&b"002"[..]));
        let wait = ECHO_TIMEOUT.min(SIGN_OFF_WAIT_MAX);
        assert_eq!(h.link.poll_timeout(&h.bank), Some(h.now + wait));
        h.advance(wait);
        h.link.handle_timeout(&h.bank, h.now);
        assert_eq!(h.link.ended(), Some(LinkEnd::Shutdown));
    }

    #[test]
    fn a_full_batch_that_writes_nothing_still_asks_for_the_writer() {
        let mut h = Harness::new("inflight_per_link_max = 1\nwrite_batch_max = 1", 1);
        let sign_on = h.transmit();
        h.answer_network(&sign_on[0], b"00");
        for _ in 0..3 {
            h.submit(Mti::FINANCIAL, None, None);
        }
        assert_eq!(
            h.transmit().len(),
            1,
            "one per batch, and the table holds one"
        );
        assert!(h.link.take_wake_writer(), "a full batch: more may wait");
        // The table is full: the next request is answered 91 and nothing is written,
        // yet the writer must look again, for the third.
        assert!(h.transmit().is_empty());
        assert!(h.link.take_wake_writer());
        assert!(h.transmit().is_empty());
        assert_eq!(h.replies(), [pair("000002", "91"), pair("000003", "91")]);
        assert!(h.link.take_wake_writer(), "still a full batch");
        assert!(h.transmit().is_empty());
        assert!(!h.link.take_wake_writer(), "the queue is empty");
    }

    #[test]
    fn a_full_table_answers_91_and_an_expired_request_is_not_sent() {
        let mut h = Harness::new("inflight_per_link_max = 1", 1);
        let sign_on = h.transmit();
        h.answer_network(&sign_on[0], b"00");
        h.submit(Mti::FINANCIAL, None, None);
        h.submit(Mti::FINANCIAL, None, None);
        let at_bank = h.transmit();
        assert_eq!(at_bank.len(), 1, "the table holds one");
        assert_eq!(h.replies(), [pair("000002", "91")]);
        h.answer(&at_bank[0], b"00");
        h.replies();
        h.submit(Mti::FINANCIAL, None, None);
        h.advance(REQUEST_TIMEOUT);
        assert!(h.transmit().is_empty());
        assert_eq!(h.replies(), [pair("000003", "91")], "expired in the queue");
    }

    // === key change ===

    const ZMK: &str = "0123456789ABCDEFFEDCBA9876543210";
    const ZAK: &str = "89ABCDEF0123456776543210FEDCBA98";

    fn tdes(hex: &str) -> switchyard_security::Key {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        switchyard_security::Key::new(switchyard_security::Algorithm::Tdes, &bytes).unwrap()
    }

    /// A bank with a retail-MAC ZAK and a ZMK (store and master key in `dir`).
    fn keyed(dir: &switchyard_tools::testkit::TempDir) -> Harness {
        use switchyard_security::store::{KeyStore, KeyType};
        let (store, master) = (dir.path().join("keys.txt"), dir.path().join("master.key"));
        let mut keys = KeyStore::init(&store, &master).unwrap();
        keys.insert("zmk", KeyType::Zmk, &tdes(ZMK)).unwrap();
        keys.insert("zak", KeyType::Zak, &tdes(ZAK)).unwrap();
        keys.save().unwrap();
        let extra = format!(
            "mac_key = \"zak\"\nmac = \"iso9797-3\"\nzmk_key = \"zmk\"\n\
             [keys]\nstore = \"{}\"\nmaster_key_file = \"{}\"\n",
            store.display(),
            master.display()
        );
        let mut h = Harness::new(&extra, 1);
        let sign_on = h.transmit();
        h.answer_network(&sign_on[0], b"00");
        assert!(h.link.is_up());
        h
    }

    /// Whether `m`'s last 8 bytes are the retail MAC of the rest under `key`.
    fn sealed_under(m: &Message, key: &switchyard_security::Key) -> bool {
        let raw = m.as_bytes();
        let (data, mac) = raw.split_at(raw.len() - 8);
        switchyard_security::mac::retail_mac(key, data).unwrap()[..] == *mac
    }

    impl Harness {
        /// The bank answers `request` with `de39`, MAC'ed under `key`.
        fn answer_sealed(
            &mut self,
            request: &Message,
            de39: &[u8],
            key: &switchyard_security::Key,
        ) -> Option<(Instant, Instant)> {
            let mti = request.mti().response().unwrap();
            let mut fields: Vec<(u8, &[u8])> = Vec::new();
            for n in [2u8, 3, 4, 7, 11, 32] {
                if let Some(v) = request.field(n) {
                    fields.push((n, v));
                }
            }
            fields.push((39, de39));
            fields.push((64, &[0u8; 8]));
            let unsealed = build(&self.dialect, mti, &fields);
            let mut raw = unsealed.as_bytes().to_vec();
            let at = raw.len() - 8;
            let mac = switchyard_security::mac::retail_mac(key, &raw[..at]).unwrap();
            raw[at..].copy_from_slice(&mac);
            self.link.on_answer(&self.bank, Bytes::from(raw), self.now)
        }

        /// The bank's 0810 to a key change: `de39`, and `kcv` in DE62 if given.
        fn answer_key_change(&mut self, request: &Message, de39: &[u8], kcv: Option<&[u8]>) {
            let mut fields: Vec<(u8, &[u8])> = vec![
                (7, request.field(7).unwrap()),
                (11, request.field(11).unwrap()),
                (39, de39),
            ];
            if let Some(kcv) = kcv {
                fields.push((62, kcv));
            }
            fields.push((70, request.field(70).unwrap()));
            let answer = build(&self.dialect, Mti::NETWORK_RESPONSE, &fields);
            self.link
                .on_answer(&self.bank, answer.as_bytes().clone(), self.now);
        }

        /// One request through to the bank; its message as the bank got it.
        fn one_request(&mut self) -> Message {
            self.submit(Mti::FINANCIAL, None, None);
            let mut at_bank = self.transmit();
            assert_eq!(at_bank.len(), 1);
            at_bank.remove(0)
        }
    }

    #[test]
    fn a_bank_answer_whose_mac_fails_is_dropped_and_its_request_ends_68_with_a_maced_reversal() {
        let dir = switchyard_tools::testkit::TempDir::new("link-bad-mac");
        let mut h = keyed(&dir);
        let zak = tdes(ZAK);
        let at_bank = h.one_request();
        assert!(
            sealed_under(&at_bank, &zak),
            "the request carries the bank's MAC"
        );
        // An approval MAC'ed under another key: dropped, nothing answered.
        assert!(h.answer_sealed(&at_bank, b"00", &tdes(ZMK)).is_none());
        assert!(h.replies().is_empty());
        // The request ends as an unanswered one: 68, and a reversal advice that
        // carries the bank's MAC too.
        h.advance(REQUEST_TIMEOUT);
        h.link.handle_timeout(&h.bank, h.now);
        assert_eq!(h.replies(), [pair("000001", "68")]);
        let advices = h.transmit();
        assert_eq!(advices.len(), 1);
        assert_eq!(advices[0].mti(), Mti::REVERSAL_ADVICE);
        assert!(sealed_under(&advices[0], &zak), "the advice is MAC'ed");
        // An answer MAC'ed under the right key is taken.
        assert!(h.answer_sealed(&advices[0], b"00", &zak).is_none());
        assert_eq!(h.bank.reversals_waiting(), 0);
    }

    #[test]
    fn a_key_change_goes_out_on_one_link_and_every_link_uses_the_key_once_approved() {
        let dir = switchyard_tools::testkit::TempDir::new("link-key-change");
        let mut h = keyed(&dir);
        let old = tdes(ZAK);
        // A second link of the same bank, up too.
        let mut other = Link::new(h.bank.link_config(), 1, h.t0);
        let sign_on = transmit_on(&mut other, &h.bank, h.now, &h.dialect);
        let answer = build(
            &h.dialect,
            Mti::NETWORK_RESPONSE,
            &[
                (7, sign_on[0].field(7).unwrap()),
                (11, sign_on[0].field(11).unwrap()),
                (39, b"00"),
                (70, b"001"),
            ],
        );
        other.on_answer(&h.bank, answer.as_bytes().clone(), h.now);
        assert!(other.is_up());

        let (_, mut outcome) = h.bank.start_key_change(WorkingKey::Mac, h.now).unwrap();
        assert_eq!(
            h.bank.start_key_change(WorkingKey::Mac, h.now).unwrap_err(),
            crate::core::bank::KeyChangeRefused::UnderWay
        );
        // The other link takes it; this one sends nothing.
        let sent = transmit_on(&mut other, &h.bank, h.now, &h.dialect);
        assert!(h.transmit().is_empty(), "one link only");
        assert_eq!(sent.len(), 1);
        let change = &sent[0];
        assert_eq!(change.mti(), Mti::NETWORK);
        assert_eq!(change.field(70), Some(&b"161"[..]));
        assert!(!change.has(64) && !change.has(128), "no MAC on an 0800");
        let block = std::str::from_utf8(change.field(48).unwrap()).unwrap();
        let (header, new) = switchyard_security::tr31::unwrap(&tdes(ZMK), block).unwrap();
        assert_eq!(header.key_usage.as_str(), "M3");
        assert_eq!(change.field(62), Some(&kcv_hex(new.check_value())[..]));
        // Until the bank answers, requests go under the old key.
        let before = h.one_request();
        assert!(sealed_under(&before, &old));
        assert!(outcome.try_recv().is_err(), "no outcome yet");

        let kcv = kcv_hex(new.check_value());
        let answer = build(
            &h.dialect,
            Mti::NETWORK_RESPONSE,
            &[
                (7, change.field(7).unwrap()),
                (11, change.field(11).unwrap()),
                (39, b"00"),
                (62, &kcv),
                (70, b"161"),
            ],
        );
        other.on_answer(&h.bank, answer.as_bytes().clone(), h.now);
        let report = outcome.try_recv().unwrap();
        assert_eq!(
            report.outcome,
            crate::core::bank::KeyChangeOutcome::Activated
        );
        assert_eq!((report.key, report.link), (WorkingKey::Mac, Some(1)));
        assert_eq!(report.staged.kcv, new.check_value());
        // Every link now MACs under the new key; the old one still verifies the
        // answer in flight, and the new one the bank's next answers.
        let after = h.one_request();
        assert!(
            sealed_under(&after, &new),
            "the link that did not carry it too"
        );
        assert!(h.answer_sealed(&before, b"00", &old).is_some());
        assert!(h.answer_sealed(&after, b"00", &new).is_some());
        assert_eq!(h.replies(), [pair("000001", "00"), pair("000002", "00")]);
        // The next rotation may start.
        assert!(h.bank.start_key_change(WorkingKey::Mac, h.now).is_ok());
    }

    #[test]
    fn a_declined_key_change_drops_the_staged_key_and_keeps_the_old_one() {
        let dir = switchyard_tools::testkit::TempDir::new("link-key-change-declined");
        let mut h = keyed(&dir);
        let (_, mut outcome) = h.bank.start_key_change(WorkingKey::Mac, h.now).unwrap();
        let sent = h.transmit();
        let block = std::str::from_utf8(sent[0].field(48).unwrap()).unwrap();
        let (_, staged) = switchyard_security::tr31::unwrap(&tdes(ZMK), block).unwrap();
        h.answer_key_change(&sent[0], b"30", None);
        let report = outcome.try_recv().unwrap();
        assert_eq!(
            report.outcome,
            crate::core::bank::KeyChangeOutcome::Failed(KeyChangeAnswer::Declined(*b"30"))
        );
        let request = h.one_request();
        assert!(sealed_under(&request, &tdes(ZAK)), "still the old key");
        // An answer under the refused key no longer verifies: dropped.
        assert!(h.answer_sealed(&request, b"00", &staged).is_none());
        assert!(h.replies().is_empty());
        assert!(h.answer_sealed(&request, b"00", &tdes(ZAK)).is_some());

        // 00, but the check value of another key: refused as well.
        let (_, mut outcome) = h.bank.start_key_change(WorkingKey::Mac, h.now).unwrap();
        let sent = h.transmit();
        h.answer_key_change(&sent[0], b"00", Some(b"000000"));
        let report = outcome.try_recv().unwrap();
        assert_eq!(
            report.outcome,
            crate::core::bank::KeyChangeOutcome::Failed(KeyChangeAnswer::KcvMismatch)
        );
        assert!(sealed_under(&h.one_request(), &tdes(ZAK)));
    }

    #[test]
    fn an_unanswered_key_change_fails_but_its_key_still_verifies() {
        let dir = switchyard_tools::testkit::TempDir::new("link-key-change-timeout");
        let mut h = keyed(&dir);
        let (_, mut outcome) = h.bank.start_key_change(WorkingKey::Mac, h.now).unwrap();
        let sent = h.transmit();
        let block = std::str::from_utf8(sent[0].field(48).unwrap()).unwrap();
        let (_, staged) = switchyard_security::tr31::unwrap(&tdes(ZMK), block).unwrap();
        assert_eq!(h.link.poll_timeout(&h.bank), Some(h.now + ECHO_TIMEOUT));
        h.advance(ECHO_TIMEOUT);
        h.link.handle_timeout(&h.bank, h.now);
        let report = outcome.try_recv().unwrap();
        assert_eq!(
            report.outcome,
            crate::core::bank::KeyChangeOutcome::Failed(KeyChangeAnswer::Unanswered)
        );
        assert!(h.link.is_up(), "the link carries on");
        // The switch keeps the old key; the bank may have taken the new one, so
        // its MACs under it still verify.
        let request = h.one_request();
        assert!(sealed_under(&request, &tdes(ZAK)));
        assert!(h.answer_sealed(&request, b"00", &staged).is_some());
        assert_eq!(h.replies(), [pair("000001", "00")]);
        // A late 0810 matches nothing.
        h.answer_key_change(&sent[0], b"00", None);
        assert!(sealed_under(&h.one_request(), &tdes(ZAK)));
    }

    #[test]
    fn a_key_change_no_link_takes_in_time_is_not_sent() {
        let dir = switchyard_tools::testkit::TempDir::new("link-key-change-late");
        let mut h = keyed(&dir);
        let (_, mut outcome) = h.bank.start_key_change(WorkingKey::Mac, h.now).unwrap();
        h.advance(crate::core::bank::KEY_CHANGE_PICKUP_MAX + Duration::from_millis(1));
        assert!(h.transmit().is_empty());
        let report = outcome.try_recv().unwrap();
        assert!(matches!(
            report.outcome,
            crate::core::bank::KeyChangeOutcome::Failed(KeyChangeAnswer::NotSent(_))
        ));
        // Withdrawn before any link took it: nothing is sent, no outcome comes.
        let (id, mut outcome) = h.bank.start_key_change(WorkingKey::Mac, h.now).unwrap();
        assert!(h.bank.withdraw_key_change(id));
        assert!(h.transmit().is_empty());
        assert!(matches!(
            outcome.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        ));
        // A bank without the key asked for, or without a link up, refuses.
        assert!(matches!(
            h.bank.start_key_change(WorkingKey::Pin, h.now),
            Err(crate::core::bank::KeyChangeRefused::Stage(_))
        ));
        h.link.on_link_lost(&h.bank, h.now);
        assert_eq!(
            h.bank.start_key_change(WorkingKey::Mac, h.now).unwrap_err(),
            crate::core::bank::KeyChangeRefused::NoLinkUp
        );
    }

    #[test]
    fn a_key_change_given_up_on_still_ends_on_its_link_before_another_starts() {
        let dir = switchyard_tools::testkit::TempDir::new("link-key-change-withdrawn");
        let mut h = keyed(&dir);
        let (id, mut outcome) = h.bank.start_key_change(WorkingKey::Mac, h.now).unwrap();
        let sent = h.transmit();
        let block = std::str::from_utf8(sent[0].field(48).unwrap()).unwrap();
        let (_, new) = switchyard_security::tr31::unwrap(&tdes(ZMK), block).unwrap();
        assert!(!h.bank.withdraw_key_change(id), "a link has it");
        assert_eq!(
            h.bank.start_key_change(WorkingKey::Mac, h.now).unwrap_err(),
            crate::core::bank::KeyChangeRefused::UnderWay
        );
        // The bank approves: the key is in use, though no one hears of it.
        h.answer_key_change(&sent[0], b"00", None);
        assert!(matches!(
            outcome.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        ));
        assert!(sealed_under(&h.one_request(), &new));
        assert!(h.bank.start_key_change(WorkingKey::Mac, h.now).is_ok());
    }
}
