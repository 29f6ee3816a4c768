//! What one bank's links share (sans-IO): the bounded lock-free queue acquirer
//! sessions hand requests to, the STAN counter, the reversal advices waiting
//! ([`Saf`]), the count of links up, and how a request that ended on a link is
//! booked and answered. [`BankState`] is the switch's [`LinkEnv`]: every
//! [`super::link::Link`] of the bank draws from it.
//!
//! The tokio connector (`net::connector`) wraps it with the link tasks, TLS and
//! wake-ups (through [`Wake`]); the simulation wraps it with simulated links.

use super::books::Books;
use super::inflight::{Stan, STAN_MAX};
use super::link::{kcv_hex, Finish, KeyChange, KeyChangeAnswer, LinkConfig, LinkEnv};
use super::request::Pending;
use super::route::BankIndex;
use super::saf::{Advice, Saf};
use super::writeahead::OutcomeSource;
use super::ResponseCode;
use crate::config::{Bank, LINKS_MAX};
use crate::journal::AppendError;
use crate::security::{StageError, WorkingKey};
use crate::wire::{Dialect, Message};
use crossbeam_queue::ArrayQueue;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use switchyard_security::module::StagedKey;
use tokio::sync::oneshot;
use tracing::error;

/// Longest a key change waits for one of the bank's links to take it (an up link
/// with room takes it at its next transmit, at once). A link that takes it later
/// sends nothing, so the one who asked knows its outcome within this plus the
/// echo timeout.
pub const KEY_CHANGE_PICKUP_MAX: Duration = Duration::from_secs(5);

/// How a bank's state wakes the tasks (or simulated links) that serve it.
pub trait Wake: Send + Sync {
    /// Something was queued for the bank (a request, a reversal advice) or it was
    /// retired: a link writer should look.
    fn writers(&self);
    /// A link went up or down.
    fn links_changed(&self);
}

/// Counters of one bank (also exported as metrics).
#[derive(Default, Debug)]
pub struct BankStats {
    /// Requests written to the bank.
    pub forwarded: AtomicU64,
    /// Bank answers returned to acquirers.
    pub answered: AtomicU64,
    /// Requests answered 68 at their deadline.
    pub timed_out: AtomicU64,
    /// Requests answered 91 (no link, queue full, link lost).
    pub unavailable: AtomicU64,
    /// Bank answers that matched nothing in flight (late or unknown).
    pub unmatched: AtomicU64,
    /// Reversal advices the bank acknowledged (0430).
    pub reversals_acked: AtomicU64,
}

/// One bank's shared state (see the module docs).
pub struct BankState {
    bank: Bank,
    acquirer_dialect: Arc<Dialect>,
    /// This bank's connector slot.
    index: BankIndex,
    queue: ArrayQueue<Pending>,
    saf: Saf,
    /// The next STAN for this bank, shared by its links: STANs are unique per bank
    /// (not per link), and continue across restarts (seeded from the journal).
    next_stan: AtomicU32,
    links_up: AtomicUsize,
    /// Requests in flight on each link slot ([`LINKS_MAX`] slots).
    inflight_by_link: Vec<AtomicUsize>,
    /// Whether `/readyz` ignores this bank (a reload may change it).
    optional: AtomicBool,
    /// Set when a reload removed or replaced the bank: it takes nothing new.
    retired: AtomicBool,
    /// The state that replaced this one (same bank, new link settings): what this
    /// one is handed after it retired goes there.
    successor: OnceLock<Arc<BankState>>,
    /// The request deadline, ms (`request_timeout_ms`; a reload may change it).
    request_timeout_ms: AtomicU64,
    /// Counters.
    pub stats: BankStats,
    books: Books,
    wake: Arc<dyn Wake>,
    /// Whether a key change waits for a link (checked on every transmit, so that
    /// the lock below is taken only when one does).
    key_change_queued: AtomicBool,
    /// The bank's working-key rotation, one at a time.
    key_change: Mutex<KeyChangeSlot>,
}

/// A bank's key change: waiting for a link, then under way on one, until its
/// outcome goes to whoever asked.
#[derive(Default)]
struct KeyChangeSlot {
    next_id: u64,
    /// Not yet taken by a link.
    queued: Option<KeyChange>,
    /// The change under way (queued or on a link) and where its outcome goes
    /// (nowhere once whoever asked has given up; the change still blocks the
    /// next until its link reports).
    under_way: Option<(u64, Option<oneshot::Sender<KeyChangeReport>>)>,
}

/// Why a key change could not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyChangeRefused {
    /// The bank's keys do not allow it (no ZMK, no such key, module refusal).
    #[error(transparent)]
    Stage(#[from] StageError),
    /// No link is up to carry it.
    #[error("no link to the bank is up")]
    NoLinkUp,
    /// Another key change of the bank is under way.
    #[error("another key change of this bank is under way")]
    UnderWay,
}

/// What became of a key change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyChangeOutcome {
    /// The bank took it: the new key is in use on every link of the bank (the one
    /// it replaced still verifies).
    Activated,
    /// The bank took it, but the module would not put it in use.
    ActivationRefused(String),
    /// The link's answer otherwise (declined, unanswered, never sent). The staged
    /// key is dropped, except when unanswered: the bank may have taken it, so
    /// MACs under it still verify until the next rotation (rotate again).
    Failed(KeyChangeAnswer),
}

/// The outcome of a key change, for whoever asked.
#[derive(Clone)]
pub struct KeyChangeReport {
    /// The key rotated.
    pub key: WorkingKey,
    /// The new key as it went to the bank (its block is what the key store
    /// imports) and its check value.
    pub staged: StagedKey,
    /// What became of it.
    pub outcome: KeyChangeOutcome,
    /// The link that carried it, if one took it.
    pub link: Option<usize>,
}

impl std::fmt::Debug for KeyChangeReport {
    /// The key's check value, never its block.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyChangeReport")
            .field("key", &self.key)
            .field("kcv", &String::from_utf8_lossy(&kcv_hex(self.staged.kcv)))
            .field("outcome", &self.outcome)
            .field("link", &self.link)
            .finish()
    }
}

impl BankState {
    /// The state of `bank` in connector slot `index`, booking into `books`, STANs
    /// from `first_stan` (unless the bank's config sets its own, for tests of the
    /// wrap-around), waking its servers through `wake`.
    pub fn new(
        index: BankIndex,
        bank: Bank,
        acquirer_dialect: Arc<Dialect>,
        books: Books,
        first_stan: u32,
        wake: Arc<dyn Wake>,
    ) -> BankState {
        let first_stan = if bank.first_stan > 1 {
            bank.first_stan
        } else {
            first_stan
        };
        BankState {
            queue: ArrayQueue::new(bank.queue_depth_max.max(1)),
            saf: Saf::new(bank.saf.clone()),
            // `next_stan` hands out `counter % STAN_MAX + 1`.
            next_stan: AtomicU32::new(first_stan.saturating_sub(1)),
            links_up: AtomicUsize::new(0),
            inflight_by_link: (0..LINKS_MAX).map(|_| AtomicUsize::new(0)).collect(),
            optional: AtomicBool::new(bank.optional),
            retired: AtomicBool::new(false),
            successor: OnceLock::new(),
            request_timeout_ms: AtomicU64::new(bank.request_timeout.as_millis() as u64),
            stats: BankStats::default(),
            bank,
            acquirer_dialect,
            index,
            books,
            wake,
            key_change_queued: AtomicBool::new(false),
            key_change: Mutex::new(KeyChangeSlot::default()),
        }
    }

    /// What each link of this bank is configured with.
    pub fn link_config(&self) -> LinkConfig {
        LinkConfig {
            bank: self.bank.id,
            acquirer_dialect: self.acquirer_dialect.clone(),
            dialect: self.bank.dialect.clone(),
            framing: self.bank.framing,
            header: (self.bank.header, self.bank.header_sent),
            inflight_max: self.bank.inflight_per_link_max,
            write_batch_max: self.bank.write_batch_max,
            echo_interval: self.bank.echo_interval,
            echo_timeout: self.bank.echo_timeout,
            security: self.bank.security.clone(),
        }
    }

    // === getters ===

    /// The bank's configuration (as when the state was made: `links`,
    /// `request_timeout` and `optional` may since have been changed by a reload).
    pub fn bank(&self) -> &Bank {
        &self.bank
    }

    /// The acquirers' dialect this bank's requests arrive in.
    pub fn acquirer_dialect(&self) -> &Arc<Dialect> {
        &self.acquirer_dialect
    }

    /// The connector slot.
    pub fn index(&self) -> BankIndex {
        self.index
    }

    /// The books this bank's requests end in.
    pub fn books(&self) -> &Books {
        &self.books
    }

    /// The deadline of a request to this bank, from its receipt.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.load(Ordering::Relaxed))
    }

    /// Whether the switch is ready without a link to this bank.
    pub fn is_optional(&self) -> bool {
        self.optional.load(Ordering::Relaxed)
    }

    /// Whether a reload removed or replaced this bank.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Links up now.
    pub fn links_up(&self) -> usize {
        self.links_up.load(Ordering::Acquire)
    }

    /// Requests waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Reversal advices waiting to be sent (not counting those awaiting a 0430).
    pub fn reversals_waiting(&self) -> usize {
        self.saf.len()
    }

    /// Requests in flight on link slot `slot`.
    pub fn inflight_on(&self, slot: usize) -> usize {
        self.inflight_by_link
            .get(slot)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Requests in flight on all links.
    pub fn inflight(&self) -> usize {
        self.inflight_by_link
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    /// The STAN counter's position, for a state that replaces this one (the bank
    /// must not see a STAN again).
    pub fn stan_position(&self) -> u32 {
        self.next_stan.load(Ordering::Relaxed) % STAN_MAX + 1
    }

    // === mutators ===

    /// Changes the request deadline (a reload); requests in flight keep theirs.
    pub fn set_request_timeout(&self, timeout: Duration) {
        self.request_timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// Changes whether `/readyz` waits for this bank (a reload).
    pub fn set_optional(&self, optional: bool) {
        self.optional.store(optional, Ordering::Relaxed);
    }

    /// Hands a request to the bank's links, or answers 91 at once when no link is
    /// up or the queue is full. A retired bank passes it to its successor.
    pub fn submit(&self, mut pending: Pending) {
        if self.is_retired() {
            if let Some(next) = self.successor.get() {
                pending.bank = next.index;
                return next.submit(pending);
            }
        }
        if self.links_up() == 0 || self.is_retired() {
            return self.unavailable(pending, "no link up");
        }
        match self.queue.push(pending) {
            Ok(()) => self.wake.writers(),
            Err(pending) => return self.unavailable(pending, "queue full"),
        }
        // The last link may have gone down between the check above and the push:
        // whoever sees no link up after the other's write drains the queue (this
        // fence pairs with the one in `link_down`), so nothing waits for a link.
        fence(Ordering::SeqCst);
        if self.links_up() == 0 {
            self.drain_stranded();
        }
    }

    /// Starts a rotation of working key `key`: stages a new key in the module and
    /// queues its key change for the first up link to take; its outcome comes on
    /// the receiver (when a link answers, within [`KEY_CHANGE_PICKUP_MAX`] plus the
    /// echo timeout; a dropped sender means the change was withdrawn). One at a
    /// time per bank.
    pub fn start_key_change(
        &self,
        key: WorkingKey,
        now: Instant,
    ) -> Result<(u64, oneshot::Receiver<KeyChangeReport>), KeyChangeRefused> {
        if self.links_up() == 0 || self.is_retired() {
            return Err(KeyChangeRefused::NoLinkUp);
        }
        let mut slot = crate::sync::lock(&self.key_change);
        if slot.under_way.is_some() {
            return Err(KeyChangeRefused::UnderWay);
        }
        let staged = self.bank.security.stage(key)?;
        slot.next_id += 1;
        let id = slot.next_id;
        let (tx, rx) = oneshot::channel();
        slot.under_way = Some((id, Some(tx)));
        slot.queued = Some(KeyChange {
            id,
            key,
            staged,
            send_by: now + KEY_CHANGE_PICKUP_MAX,
        });
        self.key_change_queued.store(true, Ordering::Release);
        drop(slot);
        self.wake.writers();
        Ok((id, rx))
    }

    /// Whoever asked for key change `id` stops waiting: if no link has taken it,
    /// it is dropped with its staged key (and true is returned); if one has, its
    /// outcome still applies when it comes (an approval still activates the key),
    /// but goes to no one, and no other change starts before it.
    pub fn withdraw_key_change(&self, id: u64) -> bool {
        let mut slot = crate::sync::lock(&self.key_change);
        let Some(change) = slot.queued.take_if(|c| c.id == id) else {
            if let Some((_, reply)) = slot.under_way.as_mut().filter(|(u, _)| *u == id) {
                *reply = None;
            }
            return false;
        };
        slot.under_way = None;
        self.key_change_queued.store(false, Ordering::Release);
        drop(slot);
        self.bank.security.discard(change.key, &change.staged);
        true
    }

    /// Takes the bank out of service: nothing new is queued (answered 91).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wake.writers();
    }

    /// Retires this bank in favour of `successor` (the same bank with new link
    /// settings): requests queued here, and reversal advices waiting or coming back
    /// from its retiring links, go to the successor.
    pub fn retire_into(&self, successor: Arc<BankState>) {
        let _ = self.successor.set(successor);
        self.retire();
        self.hand_over();
    }

    /// Moves queued requests and waiting reversal advices to the successor, if
    /// there is one.
    pub fn hand_over(&self) {
        let Some(next) = self.successor.get() else {
            return;
        };
        while let Some(mut p) = self.queue.pop() {
            p.bank = next.index;
            next.submit(p);
        }
        let now = Instant::now();
        let mut advices = Vec::new();
        self.saf.take_all(&mut advices);
        for advice in advices {
            next.push_advice(advice, now);
        }
    }

    /// Answers 91 to whatever waits in the queue (no link is up to take it).
    pub fn drain_stranded(&self) {
        while let Some(p) = self.queue.pop() {
            self.unavailable(p, "link lost");
        }
    }

    /// A retired bank whose last link task ended: what is left goes to the
    /// successor, or is answered 91; advices left are parked (they stay in the
    /// journal) and logged for follow-up.
    pub fn stopped(&self) {
        self.hand_over();
        self.drain_stranded();
        let waiting = self.saf.len();
        if waiting > 0 {
            metrics::counter!("switchyard_reversals_parked_total").increment(waiting as u64);
            error!(bank = %self.bank.id, waiting,
                "bank removed by a reload with reversal advices unsent: parked, follow up with the bank (they are in the journal)");
        }
    }

    /// After a restart, from the journal: a request forwarded without an outcome
    /// (`unfinished`: closed as 68, its reversal recorded first) or an advice
    /// queued and never acknowledged (recorded as queued again, so pruning old
    /// segments never loses it); either way an advice is queued. An advice pending
    /// before the restart may have reached the bank: it is resent as a repeat (0421).
    pub fn resume_reversal(
        &self,
        request_id: u64,
        original: Message,
        link_stan: Stan,
        unfinished: bool,
        now: Instant,
    ) {
        let outcome = unfinished.then_some((&b"68"[..], OutcomeSource::Timeout));
        let (queued, _) = self
            .books
            .journal
            .reversed(request_id, self.index, link_stan, &original, outcome);
        if let Err(e) = queued {
            error!(bank = %self.bank.id, request_id, error = %e, "resumed reversal not journaled");
        }
        let advice = Advice {
            original,
            original_link_stan: link_stan,
            request_id,
            attempts: u32::from(!unfinished),
            queued_at: now,
            next_try: now,
        };
        self.push_advice(advice, now);
    }

    // === inside ===

    fn unavailable(&self, p: Pending, why: &'static str) {
        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("switchyard_connector_unavailable_total", "reason" => why).increment(1);
        let code = ResponseCode::DestinationUnavailable;
        self.books.answer_switch(p, code, OutcomeSource::Switch);
    }

    /// Ends `p` with `code` after a reversal advice for the payment the bank knows
    /// as `link_stan`: the reversal is recorded before the outcome.
    fn reverse_and_answer(
        &self,
        p: Pending,
        link_stan: Stan,
        code: ResponseCode,
        source: OutcomeSource,
        now: Instant,
    ) {
        let (queued, seq) = self.books.journal.reversed(
            p.request_id,
            self.index,
            link_stan,
            &p.request,
            Some((code.as_bytes(), source)),
        );
        if let Err(e) = queued {
            error!(bank = %self.bank.id, request_id = p.request_id, error = %e,
                "reversal advice not journaled; queued in memory only");
        }
        let advice = Advice {
            original: p.request.clone(),
            original_link_stan: link_stan,
            request_id: p.request_id,
            attempts: 0,
            queued_at: now,
            next_try: now,
        };
        self.push_advice(advice, now);
        self.books.settle_switch(p, code, seq);
    }

    fn push_advice(&self, advice: Advice, now: Instant) {
        metrics::counter!("switchyard_reversals_queued_total").increment(1);
        if let Err(parked) = self.saf.push(advice, now) {
            metrics::counter!("switchyard_reversals_parked_total").increment(1);
            error!(
                bank = %self.bank.id, request_id = parked.request_id, attempts = parked.attempts,
                reason = ?parked.reason, "reversal advice parked: needs manual follow-up with the bank"
            );
            return;
        }
        self.wake.writers();
    }

    /// The state advices go to: the successor once retired, else this one.
    fn advices_home(&self) -> &BankState {
        match self.successor.get() {
            Some(next) if self.is_retired() => next,
            _ => self,
        }
    }
}

impl LinkEnv for BankState {
    type Request = Pending;

    fn next_stan(&self) -> u32 {
        let n = self.next_stan.fetch_add(1, Ordering::Relaxed);
        n % STAN_MAX + 1
    }

    fn next_request(&self) -> Option<Pending> {
        self.queue.pop()
    }

    fn due_advices(&self, now: Instant, max: usize, out: &mut Vec<Advice>) {
        self.saf.take_due(now, max, out);
    }

    fn next_advice_due(&self) -> Option<Instant> {
        self.saf.next_due()
    }

    fn forwarded(&self, p: &Pending, stan: Stan) -> Result<u64, AppendError> {
        let seq = self
            .books
            .journal
            .forwarded(p.request_id, self.index, stan, self.bank.id)?;
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }

    fn finish(&self, p: Pending, how: Finish, now: Instant) {
        match how {
            Finish::Answered { stan, answer } => {
                self.stats.answered.fetch_add(1, Ordering::Relaxed);
                let dialect = &self.bank.dialect;
                let reversals = self.books.answer_bank(p, stan, answer, dialect, self.index);
                // Acquirers' reversals that waited for this answer go to this bank.
                for mut reversal in reversals {
                    reversal.bank = self.index;
                    self.submit(reversal);
                }
            }
            Finish::TimedOut { reverse } => {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("switchyard_timeouts_total").increment(1);
                crate::log_limited!(warn,
                    bank = %self.bank.id, acquirer = %p.acquirer, link_stan = reverse.value(),
                    mti = %p.request.mti(),
                    "no answer by the deadline: acquirer answered 68; reversal advice queued"
                );
                let (code, source) = (ResponseCode::LateResponse, OutcomeSource::Timeout);
                self.reverse_and_answer(p, reverse, code, source, now);
            }
            Finish::Unavailable { why, reverse } => {
                self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("switchyard_connector_unavailable_total", "reason" => why)
                    .increment(1);
                let code = ResponseCode::DestinationUnavailable;
                match reverse {
                    Some(stan) => {
                        self.reverse_and_answer(p, stan, code, OutcomeSource::Switch, now)
                    }
                    None => self.books.answer_switch(p, code, OutcomeSource::Switch),
                }
            }
            Finish::Unencodable => {
                let code = ResponseCode::FormatError;
                self.books.answer_switch(p, code, OutcomeSource::Switch);
            }
            Finish::WrongAnswer { .. } => {
                let code = ResponseCode::SystemMalfunction;
                self.books.answer_switch(p, code, OutcomeSource::Switch);
            }
        }
    }

    fn unmatched(&self, stan: Stan, approved: bool) {
        self.stats.unmatched.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("switchyard_bank_late_answers_total").increment(1);
        crate::log_limited!(warn,
            bank = %self.bank.id, link_stan = stan.value(), approved,
            "bank answer after the deadline (or unknown) dropped"
        );
    }

    fn advice_acked(&self, advice: Advice) {
        metrics::counter!("switchyard_reversals_acknowledged_total").increment(1);
        self.stats.reversals_acked.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.books.journal.reversal_acked(advice.request_id) {
            error!(request_id = advice.request_id, error = %e, "reversal ack not journaled");
        }
        tracing::info!(bank = %self.bank.id, request_id = advice.request_id, "reversal acknowledged");
    }

    fn advice_retry(&self, mut advice: Advice, now: Instant) {
        advice.attempts += 1;
        advice.next_try = now + self.saf.backoff(advice.attempts - 1);
        self.advices_home().push_advice(advice, now);
    }

    fn advice_deferred(&self, mut advice: Advice, now: Instant) {
        // Not at once: the writer would spin on an advice still due.
        advice.next_try = now + self.saf.backoff(0);
        if let Err(parked) = self.saf.push(advice, now) {
            metrics::counter!("switchyard_reversals_parked_total").increment(1);
            error!(bank = %self.bank.id, request_id = parked.request_id,
                reason = ?parked.reason, "reversal advice parked: needs manual follow-up with the bank");
        }
    }

    fn advice_unsendable(&self, advice: Advice) {
        error!(bank = %self.bank.id, request_id = advice.request_id,
            "reversal advice cannot be encoded for this bank: parked");
        metrics::counter!("switchyard_reversals_parked_total").increment(1);
    }

    fn link_up(&self, slot: usize) {
        self.links_up.fetch_add(1, Ordering::AcqRel);
        tracing::info!(bank = %self.bank.id, link = slot, "bank link up");
        self.wake.links_changed();
    }

    fn link_down(&self, _slot: usize) {
        let left = self.links_up.fetch_sub(1, Ordering::AcqRel) - 1;
        self.wake.links_changed();
        // Pairs with the fence in `submit`.
        fence(Ordering::SeqCst);
        if left == 0 {
            self.drain_stranded();
        }
    }

    fn inflight(&self, slot: usize, n: usize) {
        if let Some(gauge) = self.inflight_by_link.get(slot) {
            gauge.store(n, Ordering::Relaxed);
        }
    }

    fn take_key_change(&self) -> Option<KeyChange> {
        if !self.key_change_queued.load(Ordering::Acquire) {
            return None;
        }
        let mut slot = crate::sync::lock(&self.key_change);
        self.key_change_queued.store(false, Ordering::Release);
        slot.queued.take()
    }

    fn key_change_done(&self, change: KeyChange, answer: KeyChangeAnswer, link: usize) {
        let security = &self.bank.security;
        let outcome = match answer {
            KeyChangeAnswer::Approved => match security.activate(change.key, &change.staged) {
                Ok(()) => KeyChangeOutcome::Activated,
                Err(e) => KeyChangeOutcome::ActivationRefused(e.to_string()),
            },
            KeyChangeAnswer::Unanswered => KeyChangeOutcome::Failed(answer),
            KeyChangeAnswer::Declined(_)
            | KeyChangeAnswer::KcvMismatch
            | KeyChangeAnswer::NotSent(_) => {
                security.discard(change.key, &change.staged);
                KeyChangeOutcome::Failed(answer)
            }
        };
        let result = match &outcome {
            KeyChangeOutcome::Activated => "activated",
            KeyChangeOutcome::ActivationRefused(_) => "activation-refused",
            KeyChangeOutcome::Failed(a) => a.as_str(),
        };
        metrics::counter!("switchyard_key_changes_total", "key" => change.key.as_str(), "result" => result)
            .increment(1);
        let kcv = kcv_hex(change.staged.kcv);
        let kcv = String::from_utf8_lossy(&kcv);
        let reply = {
            let mut slot = crate::sync::lock(&self.key_change);
            let ours = slot.under_way.take_if(|(id, _)| *id == change.id);
            ours.and_then(|(_, reply)| reply)
        };
        match (&outcome, &reply) {
            (KeyChangeOutcome::Activated, Some(_)) => tracing::info!(bank = %self.bank.id, link,
                key = change.key.as_str(), %kcv, "key change approved: the new key is in use"),
            (KeyChangeOutcome::Activated, None) => error!(bank = %self.bank.id, link,
                key = change.key.as_str(), %kcv,
                "key change approved after its rotation gave up: the new key is in use but not \
                 saved in the key store; rotate again"),
            (_, _) => tracing::warn!(bank = %self.bank.id, link, key = change.key.as_str(),
                %kcv, result, detail = ?outcome, "key change failed"),
        }
        if let Some(reply) = reply {
            // The asker may have gone: nothing to tell then.
            let _ = reply.send(KeyChangeReport {
                key: change.key,
                staged: change.staged,
                outcome,
                link: Some(link),
            });
        }
    }
}
