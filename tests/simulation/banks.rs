//! The simulated bank hosts: they answer sign-ons, echoes and sign-offs, decide on
//! each request as it arrives (approve or decline, answer on time, late, or never),
//! apply reversal advices idempotently (DE90 must name the MTI, link STAN, DE7 and
//! DE32 they saw), and acknowledge them (sometimes the 0430 is lost or late).
//! After `traffic` they are reliable.

use crate::model::{digits, Event, Sim, ACQUIRER, FRAME_MAX_BYTES};
use crate::scenario::ms;
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use switchyard::config::ECHO_TIMEOUT_MS_DEFAULT;
use switchyard::wire::{FrameDecoder, Framing, Message, Mti};
use switchyard_tools::testkit::decoded;

/// What a bank saw of one request (by DE37).
#[derive(Default)]
pub struct Seen {
    pub link_stan: Vec<u8>,
    pub de7: Vec<u8>,
    pub times: u32,
    pub approved: bool,
}

/// One bank host's memory.
#[derive(Default)]
pub struct Host {
    /// By DE37.
    pub seen: BTreeMap<u64, Seen>,
    pub reversed: BTreeSet<u64>,
}

impl Sim {
    fn bank_answer_latency(&mut self, bank: usize, bound: Duration) -> Duration {
        let profile = &self.sc.banks[bank];
        let (lo, hi) = profile.latency_us;
        let slow = profile.slow_percent;
        if self.disruptive() && self.rng.percent(slow) {
            let bound_us = bound.as_micros() as u64;
            self.rng.micros(bound_us * 4 / 5, bound_us * 2)
        } else if self.disruptive() {
            self.rng.micros(lo, hi)
        } else {
            self.rng.micros(100, 5_000)
        }
    }

    /// A batch written by the switch reaches the bank, frame by frame.
    pub fn bank_receive(&mut self, bank: usize, link: usize, gen: u64, batch: Bytes) {
        let decoder = FrameDecoder::new(Framing::U16be, FRAME_MAX_BYTES);
        let mut buf = BytesMut::from(&batch[..]);
        loop {
            let frame = match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return self.violation(format!("bank {bank}: unframeable batch: {e}")),
            };
            if self.broken.contains(&gen) {
                self.stats.lost_in_transit += 1;
                continue;
            }
            self.bank_message(bank, link, gen, frame);
        }
        if !buf.is_empty() {
            self.violation(format!("bank {bank}: a batch ends inside a frame"));
        }
    }

    fn bank_message(&mut self, bank: usize, link: usize, gen: u64, frame: Bytes) {
        let msg = match Message::decode(&self.dialect, frame) {
            Ok(m) => m,
            Err(e) => return self.violation(format!("bank {bank} cannot decode: {e}")),
        };
        let mti = msg.mti();
        let reply = if mti == Mti::FINANCIAL {
            self.bank_request(bank, &msg)
        } else if mti == Mti::REVERSAL_ADVICE || mti == Mti::REVERSAL_ADVICE_REPEAT {
            self.bank_advice(bank, &msg)
        } else if mti == Mti::NETWORK {
            self.bank_network(&msg)
        } else {
            return self.violation(format!("bank {bank} got MTI {:?}", mti.as_bytes()));
        };
        if let Some((delay, answer)) = reply {
            let frame = answer.as_bytes().clone();
            self.schedule(
                self.now + delay,
                Event::SwitchReceive {
                    bank,
                    link,
                    gen,
                    frame,
                },
            );
        }
    }

    /// 0800: sign-on (001), echo (301), sign-off (002), answered 00 at once.
    fn bank_network(&mut self, msg: &Message) -> Option<(Duration, Message)> {
        match msg.field(70) {
            Some(b"001") => self.stats.sign_ons += 1,
            Some(b"301") => self.stats.echoes += 1,
            _ => {}
        }
        let mut fields: Vec<(u8, &[u8])> = Vec::new();
        for n in [7u8, 11] {
            if let Some(v) = msg.field(n) {
                fields.push((n, v));
            }
        }
        fields.push((39, b"00"));
        if let Some(v) = msg.field(70) {
            fields.push((70, v));
        }
        let delay = self.rng.micros(50, 2_000);
        Some((delay, decoded(Mti::NETWORK_RESPONSE, &fields)))
    }

    fn bank_request(&mut self, bank: usize, msg: &Message) -> Option<(Duration, Message)> {
        let rrn = digits(msg.field(37));
        let approve = self.rng.percent(self.sc.banks[bank].approve_percent);
        let seen = self.banks[bank].seen.entry(rrn).or_default();
        seen.times += 1;
        seen.link_stan = msg.field(11).unwrap_or(b"").to_vec();
        seen.de7 = msg.field(7).unwrap_or(b"").to_vec();
        seen.approved |= approve;
        let times = seen.times;
        if times > 1 {
            self.violation(format!("(3) DE37 {rrn} reached bank {bank} {times} times"));
        }
        self.stats.approved_at_bank += u64::from(approve);
        self.note(|| format!("bank {bank} sees {rrn} approve={approve}"));
        let silent = self.sc.banks[bank].silent_percent;
        if self.disruptive() && self.rng.percent(silent) {
            return None;
        }
        let delay = self.bank_answer_latency(bank, self.sc.banks[bank].request_timeout);
        let de39: &[u8] = if approve {
            b"00"
        } else if self.rng.percent(50) {
            b"05"
        } else {
            b"51"
        };
        let mut fields: Vec<(u8, &[u8])> = Vec::new();
        for n in [2u8, 3, 4, 7, 11, 32, 37] {
            if let Some(v) = msg.field(n) {
                fields.push((n, v));
            }
        }
        if approve {
            fields.push((38, b"A1B2C3"));
        }
        fields.push((39, de39));
        for n in [49u8, 100] {
            if let Some(v) = msg.field(n) {
                fields.push((n, v));
            }
        }
        Some((delay, decoded(Mti::FINANCIAL_RESPONSE, &fields)))
    }

    fn bank_advice(&mut self, bank: usize, msg: &Message) -> Option<(Duration, Message)> {
        let rrn = digits(msg.field(37));
        let repeat = msg.mti() == Mti::REVERSAL_ADVICE_REPEAT;
        self.stats.advices_received += 1;
        self.stats.repeats_received += u64::from(repeat);
        let de90 = msg.field(90).unwrap_or(b"").to_vec();
        let mut acquirer = [b'0'; 11];
        acquirer[11 - ACQUIRER.len()..].copy_from_slice(ACQUIRER);
        match self.banks[bank].seen.get(&rrn) {
            None => self.stats.advices_for_unseen += 1,
            Some(seen) => {
                let expected = [b"0200".as_slice(), &seen.link_stan, &seen.de7, &acquirer].concat();
                if de90.len() != 42 || de90[..31] != expected[..] {
                    let got = String::from_utf8_lossy(&de90).into_owned();
                    let want = String::from_utf8_lossy(&expected).into_owned();
                    self.violation(format!(
                        "advice for {rrn} at bank {bank}: DE90 {got}, the bank saw {want}"
                    ));
                } else if !seen.approved {
                    // Nothing to undo.
                } else if self.banks[bank].reversed.insert(rrn) {
                    self.stats.reversals_applied += 1;
                    self.note(|| format!("bank {bank} reverses {rrn}"));
                } else {
                    self.stats.duplicate_advices += 1;
                    self.stats.duplicate_0420 += u64::from(!repeat);
                }
            }
        }
        let lost = self.sc.banks[bank].ack_loss_percent;
        if self.disruptive() && self.rng.percent(lost) {
            return None;
        }
        let delay = self.bank_answer_latency(bank, ms(ECHO_TIMEOUT_MS_DEFAULT));
        let mut fields: Vec<(u8, &[u8])> = Vec::new();
        for n in [7u8, 11, 32, 37] {
            if let Some(v) = msg.field(n) {
                fields.push((n, v));
            }
        }
        fields.push((39, b"00"));
        fields.push((90, &de90));
        Some((delay, decoded(Mti::REVERSAL_ADVICE_RESPONSE, &fields)))
    }
}
