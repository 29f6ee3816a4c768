//! The write-ahead order: every journal record the switch writes is written here,
//! and this is where the order they must be durable in is kept.
//!
//! For each request:
//!
//! 1. **accepted**, before the request is queued for its bank (an error: the
//!    request goes no further, 91);
//! 2. **forwarded** (connector slot, link STAN), before the batch carrying it is
//!    written to the bank: the link's transmit names the record its bytes wait
//!    for, so after a crash recovery knows of everything a bank may have seen;
//! 3. when the bank may have seen a request whose answer the acquirer will not
//!    get (deadline passed, link lost, a request left unfinished by a crash),
//!    **reversal queued before the outcome** ([`WriteAhead::reversed`]): a crash
//!    between the two must leave the reversal pending, never a 68 with no
//!    reversal (the simulation found the other order losing reversals);
//! 4. the **outcome** before the answer is released: the answer carries the
//!    record's sequence number and the session writes it only once durable;
//! 5. **reversal acknowledged** when the bank answers the advice (0430).
//!
//! Records go to a [`RecordSink`]: the journal's writer thread in the daemon, an
//! in-memory journal in the simulation. Without a journal nothing is recorded and
//! nothing waits.

use super::dedup::KeyTime;
use super::inflight::Stan;
use super::route::BankIndex;
use super::InstitutionId;
use crate::journal::protect::Protector;
use crate::journal::{AppendError, Entry, RecordKind, RecordSink};
use crate::wire::{Dialect, Message};
use bytes::Bytes;
use std::sync::Arc;

/// Bit of an accepted record's acquirer word set when the request keys on its
/// local date and time ([`KeyTime::Local`]: an ISO 8583:1993 acquirer). The
/// packed institution id uses the low 44 bits, so older journals read as
/// [`KeyTime::Transmission`].
pub const ACCEPTED_LOCAL_TIME_BIT: u64 = 1 << 63;

/// An accepted record's acquirer word: the packed id and the key's date and time.
pub fn accepted_head(acquirer: InstitutionId, key_time: KeyTime) -> u64 {
    match key_time {
        KeyTime::Transmission => acquirer.to_raw(),
        KeyTime::Local => acquirer.to_raw() | ACCEPTED_LOCAL_TIME_BIT,
    }
}

/// The acquirer and key rule of an accepted record's acquirer word.
pub fn read_accepted_head(word: u64) -> (Option<InstitutionId>, KeyTime) {
    let key_time = if word & ACCEPTED_LOCAL_TIME_BIT != 0 {
        KeyTime::Local
    } else {
        KeyTime::Transmission
    };
    (
        InstitutionId::from_raw(word & !ACCEPTED_LOCAL_TIME_BIT),
        key_time,
    )
}

/// Where an outcome came from (stored in the outcome record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OutcomeSource {
    /// The bank's answer.
    Bank = 1,
    /// The switch answered (91 and the like) after accepting the request.
    Switch = 2,
    /// The deadline passed (68).
    Timeout = 3,
}

/// The sequence an answer waits for when its outcome could not be journaled: never
/// durable, so the answer is withheld.
pub const NOT_JOURNALED: u64 = u64::MAX;

/// The journal as the switch writes it; records nothing when there is none.
/// Messages go in in their protected form ([`crate::journal::protect`]): no
/// track data, PIN block or ICC data, the PAN masked (and, for requests,
/// enciphered under the journal's data key).
#[derive(Clone, Default)]
pub struct WriteAhead {
    sink: Option<Arc<dyn RecordSink>>,
    protection: Option<Arc<Protection>>,
}

/// What the journal protects messages with: the protector, and the layout
/// requests are held in.
pub struct Protection {
    /// The PAN key, if any.
    pub protector: Protector,
    /// The acquirers' dialect (requests are held in its layout).
    pub dialect: Arc<Dialect>,
}

impl WriteAhead {
    /// Records into `sink`, messages protected by `protection`.
    pub fn new(sink: Arc<dyn RecordSink>, protection: Protection) -> WriteAhead {
        WriteAhead {
            sink: Some(sink),
            protection: Some(Arc::new(protection)),
        }
    }

    /// No journal.
    pub fn off() -> WriteAhead {
        WriteAhead::default()
    }

    /// Whether records are kept.
    pub fn is_on(&self) -> bool {
        self.sink.is_some()
    }

    /// What reads back the protected messages this journal writes.
    pub fn protector(&self) -> Protector {
        self.protection
            .as_ref()
            .map(|p| p.protector.clone())
            .unwrap_or_default()
    }

    /// Appends a record whose message is `message` (held in `dialect`'s layout;
    /// none: the acquirers'), protected; `encipher_pan` for requests.
    fn append_message(
        &self,
        kind: RecordKind,
        request_id: u64,
        head: &[u8],
        (message, digest): (&Message, Option<u64>),
        (dialect, encipher_pan): (Option<&Dialect>, bool),
    ) -> Result<u64, AppendError> {
        let Some(p) = &self.protection else {
            return self.append(kind, request_id, head, (Bytes::new(), false));
        };
        let dialect = dialect.unwrap_or(&p.dialect);
        let Some(body) = p
            .protector
            .protect((message, digest), dialect, request_id, encipher_pan)
        else {
            metrics::counter!("switchyard_journal_protect_failures_total").increment(1);
            return Err(AppendError::Unprotectable);
        };
        self.append(kind, request_id, head, (body, true))
    }

    fn append(
        &self,
        kind: RecordKind,
        request_id: u64,
        head: &[u8],
        (message, protected): (Bytes, bool),
    ) -> Result<u64, AppendError> {
        let Some(sink) = &self.sink else {
            return Ok(0);
        };
        let mut h = [0u8; 16];
        h[..head.len()].copy_from_slice(head);
        let entry = Entry {
            kind,
            protected,
            request_id,
            unix_ms: 0, // stamped by the writer
            head: (h, head.len() as u8),
            message,
        };
        sink.append(entry)
    }

    /// Order 1: an accepted request (before it is queued). An error means the request
    /// must not go further: the caller answers 91.
    pub fn accepted(
        &self,
        request_id: u64,
        acquirer: InstitutionId,
        key_time: KeyTime,
        (request, digest): (&Message, Option<u64>),
    ) -> Result<u64, AppendError> {
        let head = accepted_head(acquirer, key_time).to_le_bytes();
        self.append_message(
            RecordKind::Accepted,
            request_id,
            &head,
            (request, digest),
            (None, true),
        )
    }

    /// Order 2: a request about to be written to a bank link under `link_stan`; the
    /// returned sequence must be durable before the bytes leave.
    pub fn forwarded(
        &self,
        request_id: u64,
        bank: BankIndex,
        link_stan: Stan,
        bank_id: InstitutionId,
    ) -> Result<u64, AppendError> {
        let mut head = [0u8; 14];
        head[..2].copy_from_slice(&bank.to_le_bytes());
        head[2..6].copy_from_slice(&link_stan.value().to_le_bytes());
        head[6..].copy_from_slice(&bank_id.to_raw().to_le_bytes());
        self.append(
            RecordKind::Forwarded,
            request_id,
            &head,
            (Bytes::new(), false),
        )
    }

    /// Order 3: a reversal advice queued for `request_id` (forwarded by connector `bank`
    /// under `link_stan`; `original` is the request to reverse), then, when
    /// `outcome` is given, the request's outcome: in that order. Returns the
    /// reversal record's result and the outcome's sequence (see
    /// [`WriteAhead::outcome`]; 0 without an outcome).
    pub fn reversed(
        &self,
        request_id: u64,
        bank: BankIndex,
        link_stan: Stan,
        original: &Message,
        outcome: Option<(&[u8], OutcomeSource)>,
    ) -> (Result<u64, AppendError>, u64) {
        let mut head = [0u8; 6];
        head[..2].copy_from_slice(&bank.to_le_bytes());
        head[2..].copy_from_slice(&link_stan.value().to_le_bytes());
        let queued = self.append_message(
            RecordKind::ReversalQueued,
            request_id,
            &head,
            (original, None),
            (None, true),
        );
        let seq = match outcome {
            Some((de39, source)) => self.outcome(request_id, de39, source, None),
            None => 0,
        };
        (queued, seq)
    }

    /// Order 4: an outcome; returns the sequence number the answer must wait for (0:
    /// nothing to wait for). A failed append is logged and counted; the answer then
    /// waits for [`NOT_JOURNALED`], which never becomes durable, and its session
    /// is closed without answering.
    pub fn outcome(
        &self,
        request_id: u64,
        de39: &[u8],
        source: OutcomeSource,
        answer: Option<(&Message, &Dialect)>,
    ) -> u64 {
        if self.sink.is_none() {
            return 0;
        }
        let mut head = [b' ', b' ', source as u8];
        let n = de39.len().min(2);
        head[..n].copy_from_slice(&de39[..n]);
        let appended = match answer {
            // Answers keep their PAN masked only: a replay takes DE2 from the
            // retransmission it answers.
            Some((answer, dialect)) => self.append_message(
                RecordKind::Outcome,
                request_id,
                &head,
                (answer, None),
                (Some(dialect), false),
            ),
            None => self.append(
                RecordKind::Outcome,
                request_id,
                &head,
                (Bytes::new(), false),
            ),
        };
        match appended {
            Ok(seq) => seq,
            Err(e) => {
                metrics::counter!("switchyard_journal_append_failures_total").increment(1);
                tracing::error!(request_id, error = %e, "outcome not journaled: the answer is withheld");
                NOT_JOURNALED
            }
        }
    }

    /// Order 5: the bank acknowledged the reversal of `request_id` (0430).
    pub fn reversal_acked(&self, request_id: u64) -> Result<u64, AppendError> {
        self.append(
            RecordKind::ReversalAcked,
            request_id,
            &[],
            (Bytes::new(), false),
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_key_rule_rides_on_the_acquirer_word() {
        let id = InstitutionId::from_digits(b"00100001").unwrap();
        for time in [KeyTime::Transmission, KeyTime::Local] {
            assert_eq!(
                read_accepted_head(accepted_head(id, time)),
                (Some(id), time)
            );
        }
        // Journals written before the bit existed read as DE7-keyed.
        assert_eq!(
            read_accepted_head(id.to_raw()),
            (Some(id), KeyTime::Transmission)
        );
    }

    use super::*;
    use crate::wire::{Dialect, Encoder, Mti};
    use bytes::BytesMut;
    use std::sync::Mutex;

    /// Keeps (kind, request id, head) of every record.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<(RecordKind, u64, Vec<u8>)>>);

    impl RecordSink for Recorded {
        fn append(&self, e: Entry) -> Result<u64, AppendError> {
            let mut records = crate::sync::lock(&self.0);
            records.push((
                e.kind,
                e.request_id,
                e.head.0[..usize::from(e.head.1)].to_vec(),
            ));
            Ok(records.len() as u64)
        }
    }

    #[test]
    fn a_reversal_is_recorded_before_the_outcome_it_comes_with() {
        let d = Dialect::iso87_ascii();
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(&d, &mut out, Mti::FINANCIAL);
        enc.field(11, b"000001").unwrap();
        enc.finish();
        let original = Message::decode(&d, out.freeze()).unwrap();
        let sink = Arc::new(Recorded::default());
        let protection = Protection {
            protector: Protector::default(),
            dialect: Arc::new(d.clone()),
        };
        let journal = WriteAhead::new(sink.clone(), protection);
        let stan = Stan::from_value(9).unwrap();
        let outcome = Some((&b"68"[..], OutcomeSource::Timeout));
        let (queued, seq) = journal.reversed(7, 1, stan, &original, outcome);
        assert_eq!((queued, seq), (Ok(1), 2));
        let records = crate::sync::lock(&sink.0).clone();
        assert_eq!(records[0].0, RecordKind::ReversalQueued);
        assert_eq!(records[0].2, [1, 0, 9, 0, 0, 0], "connector 1, link STAN 9");
        assert_eq!(records[1].0, RecordKind::Outcome);
        assert_eq!(records[1].2, [b'6', b'8', OutcomeSource::Timeout as u8]);
        assert!(records.iter().all(|r| r.1 == 7));
        // Without a journal nothing waits.
        assert_eq!(
            WriteAhead::off().outcome(7, b"00", OutcomeSource::Bank, None),
            0
        );
    }
}
