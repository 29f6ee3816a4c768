//! Reading the journal independently of `Replay`, and the invariants checked at the
//! end of every seed (see the crate docs).

use crate::model::{digits, Sim};
use bytes::Bytes;
use std::collections::BTreeMap;
use switchyard::journal::record::{self, Record, RecordKind};
use switchyard::journal::recovery::{Recovery, Replay};
use switchyard::sync::lock;
use switchyard::wire::Message;

// === reading the journal independently of Replay ===

#[derive(Default, Clone)]
pub struct Story {
    rrn: Option<u64>,
    accepted: u32,
    forwarded: Vec<(u16, u32)>,
    outcomes: Vec<Vec<u8>>,
    queued: u32,
    acked: u32,
    kinds: Vec<&'static str>,
    request: Vec<u8>,
}

/// Per request, what the records say; and, independently of `Replay`, what is left
/// unfinished.
#[derive(Default)]
pub struct Oracle {
    pub stories: BTreeMap<u64, Story>,
    /// Reversals queued and not acknowledged: request id → (bank, link STAN, request).
    pending: BTreeMap<u64, ((u16, u32), Vec<u8>)>,
}

/// A request left unfinished: id, where it was forwarded, the request.
type UnfinishedRow<'a> = (u64, Option<(u16, u32)>, &'a [u8]);

fn head6(body: &[u8]) -> (u16, u32) {
    (
        u16::from_le_bytes([body[0], body[1]]),
        u32::from_le_bytes([body[2], body[3], body[4], body[5]]),
    )
}

impl Oracle {
    pub fn record(&mut self, r: &Record<'_>) {
        let story = self.stories.entry(r.request_id).or_default();
        story.kinds.push(r.kind.as_str());
        let message = r.body.get(r.kind.head_len()..).unwrap_or(&[]);
        match r.kind {
            RecordKind::Accepted => {
                story.accepted += 1;
                story.request = message.to_vec();
                // The journal keeps the protected form: its message part is enough
                // for DE37.
                let message = match r.protected {
                    true => {
                        switchyard::journal::protect::message_part(message).map_or(&[][..], |m| m.0)
                    }
                    false => message,
                };
                let m = Message::decode(&crate::dialect(), Bytes::copy_from_slice(message)).ok();
                story.rrn = m.map(|m| digits(m.field(37)));
            }
            RecordKind::Forwarded => story.forwarded.push(head6(r.body)),
            RecordKind::Outcome => story.outcomes.push(r.body[..2].to_vec()),
            RecordKind::ReversalQueued => {
                story.queued += 1;
                self.pending
                    .insert(r.request_id, (head6(r.body), message.to_vec()));
            }
            RecordKind::ReversalAcked => {
                story.acked += 1;
                self.pending.remove(&r.request_id);
            }
        }
    }

    pub fn compare(&self, recovery: &Recovery) -> Result<(), String> {
        let unfinished: Vec<UnfinishedRow<'_>> = self
            .stories
            .iter()
            .filter(|(_, s)| s.outcomes.is_empty())
            .map(|(&id, s)| (id, s.forwarded.last().copied(), &s.request[..]))
            .collect();
        let replayed: Vec<UnfinishedRow<'_>> = recovery
            .unfinished
            .iter()
            .map(|u| (u.request_id, u.forwarded, &u.request[..]))
            .collect();
        if unfinished != replayed {
            let ids = |v: &[UnfinishedRow<'_>]| v.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>();
            return Err(format!(
                "unfinished {:?}, Replay {:?}",
                ids(&unfinished),
                ids(&replayed)
            ));
        }
        let pending: Vec<(u64, (u16, u32), &[u8])> = self
            .pending
            .iter()
            .map(|(&id, (f, m))| (id, *f, &m[..]))
            .collect();
        let replayed: Vec<(u64, (u16, u32), &[u8])> = recovery
            .reversals_pending
            .iter()
            .map(|p| (p.request_id, p.forwarded, &p.request[..]))
            .collect();
        if pending != replayed {
            return Err(format!(
                "pending {:?}, Replay {:?}",
                pending.iter().map(|p| p.0).collect::<Vec<_>>(),
                replayed.iter().map(|p| p.0).collect::<Vec<_>>()
            ));
        }
        Ok(())
    }
}

// === the invariants ===

impl Sim {
    pub fn check(&mut self) -> Result<(), String> {
        let mut v = std::mem::take(&mut self.violations);
        let mut oracle = Oracle::default();
        let mut replay = Replay::new();
        let bytes = lock(&self.journal).bytes.clone();
        let mut at = 0;
        while let Ok(Some((r, size))) = record::decode(&bytes[at..]) {
            oracle.record(&r);
            replay.record(&r);
            at += size;
        }
        if at != bytes.len() {
            v.push(format!("final journal unreadable from byte {at}"));
        }
        // 4b. What was durable at a crash is still there.
        for (i, durable) in self.durable_at_crash.iter().enumerate() {
            if !bytes.starts_with(durable) {
                v.push(format!("(4) records durable at crash {} were lost", i + 1));
            }
        }
        let by_rrn = self.check_records(&oracle, &mut v);
        self.check_bank(&oracle, &by_rrn, &mut v);
        self.check_acquirer(&oracle, &by_rrn, &mut v);
        // Quiescence: nothing unfinished, nothing unacknowledged (a parked advice
        // stays unacknowledged).
        let recovery = replay.finish();
        if !recovery.unfinished.is_empty() || !recovery.reversals_pending.is_empty() {
            v.push(format!(
                "(1) at the end {} requests unfinished, {} advices unacknowledged",
                recovery.unfinished.len(),
                recovery.reversals_pending.len()
            ));
        }
        if let Some(sw) = &self.sw {
            let busy = sw
                .banks
                .iter()
                .any(|b| b.queue_depth() > 0 || b.reversals_waiting() > 0)
                || sw
                    .links
                    .iter()
                    .flatten()
                    .any(|l| l.link.as_ref().is_some_and(|l| l.inflight() > 0));
            if busy || !sw.replies.is_empty() {
                v.push("switch not idle at the end".into());
            }
        } else {
            v.push("switch down at the end".into());
        }
        if v.is_empty() {
            Ok(())
        } else {
            let more = v.len().saturating_sub(5);
            v.truncate(5);
            if more > 0 {
                v.push(format!("… and {more} more"));
            }
            Err(v.join("\n  "))
        }
    }

    /// 1 and 3 from the records; returns DE37 → request id.
    fn check_records(&self, oracle: &Oracle, v: &mut Vec<String>) -> BTreeMap<u64, u64> {
        let mut by_rrn = BTreeMap::new();
        for (&id, s) in &oracle.stories {
            if s.accepted != 1 {
                v.push(format!(
                    "(1) request id {id} has {} Accepted records: {:?}",
                    s.accepted, s.kinds
                ));
            }
            if s.outcomes.len() != 1 {
                v.push(format!(
                    "(1) request id {id} has {} outcomes: {:?}",
                    s.outcomes.len(),
                    s.kinds
                ));
            }
            if s.forwarded.len() > 1 {
                v.push(format!(
                    "(3) request id {id} forwarded {} times",
                    s.forwarded.len()
                ));
            }
            if let Some(rrn) = s.rrn {
                if let Some(other) = by_rrn.insert(rrn, id) {
                    v.push(format!("(1) DE37 {rrn} accepted as {other} and as {id}"));
                }
            }
        }
        by_rrn
    }

    /// 2 and 3 at the banks.
    fn check_bank(&self, oracle: &Oracle, by_rrn: &BTreeMap<u64, u64>, v: &mut Vec<String>) {
        for (b, bank) in self.banks.iter().enumerate() {
            for (rrn, seen) in &bank.seen {
                if seen.times > 1 {
                    v.push(format!(
                        "(3) DE37 {rrn} reached bank {b} {} times",
                        seen.times
                    ));
                }
                let got_approval = self
                    .acq
                    .answers
                    .get(rrn)
                    .is_some_and(|a| a.iter().any(|a| a.de39 == b"00"));
                let reversed = bank.reversed.contains(rrn);
                let story = by_rrn
                    .get(rrn)
                    .and_then(|id| oracle.stories.get(id).map(|s| (id, s.kinds.clone())));
                if seen.approved && !got_approval && !reversed {
                    v.push(format!(
                        "(2) DE37 {rrn}: approved by bank {b}, the acquirer did not get the \
                         approval, never reversed; journal: {}",
                        story.map_or("nothing (records lost in a crash)".into(), |(id, k)| {
                            format!("request id {id} {k:?}")
                        })
                    ));
                }
                if got_approval && reversed {
                    v.push(format!(
                        "(2) DE37 {rrn}: approval delivered and yet reversed"
                    ));
                }
            }
        }
    }

    /// 4 and 5 at the acquirer.
    fn check_acquirer(&self, oracle: &Oracle, by_rrn: &BTreeMap<u64, u64>, v: &mut Vec<String>) {
        for (rrn, answers) in &self.acq.answers {
            let sent = &self.acq.sent[rrn];
            if answers.len() > 1 {
                let codes: Vec<String> = answers
                    .iter()
                    .map(|a| String::from_utf8_lossy(&a.de39).into_owned())
                    .collect();
                v.push(format!(
                    "(5) DE37 {rrn}: {} answers {codes:?}",
                    answers.len()
                ));
            }
            for a in answers {
                if a.life != sent.life {
                    v.push(format!("(5) DE37 {rrn}: answered on a later session"));
                }
                // Decided by the deadline; released when durable, not before.
                if a.decided > sent.deadline || a.at < a.decided {
                    v.push(format!(
                        "(5) DE37 {rrn}: decided at {:?}, released at {:?}, deadline {:?}",
                        a.decided, a.at, sent.deadline
                    ));
                }
                let journaled = by_rrn
                    .get(rrn)
                    .and_then(|id| oracle.stories.get(id))
                    .and_then(|s| s.outcomes.first());
                if journaled != Some(&a.de39) {
                    v.push(format!(
                        "(4) DE37 {rrn}: acquirer got {}, journal has {:?}",
                        String::from_utf8_lossy(&a.de39),
                        journaled.map(|o| String::from_utf8_lossy(o).into_owned())
                    ));
                }
            }
        }
        for (rrn, sent) in &self.acq.sent {
            if sent.life == self.life && !self.acq.answers.contains_key(rrn) {
                v.push(format!(
                    "(5) DE37 {rrn}: sent to the running switch, never answered"
                ));
            }
        }
    }
}
