//! The daemon's use of the journal: what is recorded when, and what an answer
//! waits for.
//!
//! A request that passed admission is recorded as accepted before it is queued for
//! its bank, as forwarded before its batch is written to the bank, and its outcome
//! (the bank's answer, 68, 91, …) before the answer is released: the acquirer's
//! session writes a batch only once the highest outcome record in it is durable.

use crate::core::inflight::Stan;
use crate::core::route::BankIndex;
use crate::core::InstitutionId;
use crate::journal::{AppendError, Entry, Journal, RecordKind};
use crate::wire::Message;
use bytes::Bytes;
use std::sync::Arc;

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
const NOT_JOURNALED: u64 = u64::MAX;

/// The journal as the daemon uses it; does nothing when no journal is configured.
#[derive(Clone, Default)]
pub struct Journaling(Option<Arc<Journal>>);

impl Journaling {
    /// Journaling into `journal`.
    pub fn new(journal: Arc<Journal>) -> Journaling {
        Journaling(Some(journal))
    }

    /// No journal.
    pub fn off() -> Journaling {
        Journaling(None)
    }

    fn append(
        &self,
        kind: RecordKind,
        request_id: u64,
        head: &[u8],
        message: Bytes,
    ) -> Result<u64, AppendError> {
        let Some(journal) = &self.0 else { return Ok(0) };
        let mut h = [0u8; 16];
        h[..head.len()].copy_from_slice(head);
        let entry = Entry {
            kind,
            request_id,
            unix_ms: 0, // stamped by the writer
            head: (h, head.len() as u8),
            message,
        };
        journal.append(entry)
    }

    /// Records an accepted request (before it is queued). An error means the
    /// request must not go further: the caller answers 91.
    pub fn accepted(
        &self,
        request_id: u64,
        acquirer: InstitutionId,
        request: &Message,
    ) -> Result<u64, AppendError> {
        let head = acquirer.to_raw().to_le_bytes();
        self.append(
            RecordKind::Accepted,
            request_id,
            &head,
            request.as_bytes().clone(),
        )
    }

    /// Records that a request is about to be written to a bank link.
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
        self.append(RecordKind::Forwarded, request_id, &head, Bytes::new())
    }

    /// Records an outcome; returns the sequence number the answer must wait for (0:
    /// nothing to wait for). A failed append is logged and counted; the answer's
    /// durability wait then fails and the session is closed without answering.
    pub fn outcome(
        &self,
        request_id: u64,
        de39: &[u8],
        source: OutcomeSource,
        answer: Option<&Message>,
    ) -> u64 {
        if self.0.is_none() {
            return 0;
        }
        let mut head = [b' ', b' ', source as u8];
        let n = de39.len().min(2);
        head[..n].copy_from_slice(&de39[..n]);
        let message = answer.map_or_else(Bytes::new, |m| m.as_bytes().clone());
        match self.append(RecordKind::Outcome, request_id, &head, message) {
            Ok(seq) => seq,
            Err(e) => {
                metrics::counter!("switchyard_journal_append_failures_total").increment(1);
                tracing::error!(request_id, error = %e, "outcome not journaled: the answer is withheld");
                NOT_JOURNALED
            }
        }
    }

    /// Records that a reversal advice for `request_id` was queued.
    pub fn reversal_queued(
        &self,
        request_id: u64,
        bank: BankIndex,
        link_stan: Stan,
        original: &Message,
    ) -> Result<u64, AppendError> {
        let mut head = [0u8; 6];
        head[..2].copy_from_slice(&bank.to_le_bytes());
        head[2..].copy_from_slice(&link_stan.value().to_le_bytes());
        self.append(
            RecordKind::ReversalQueued,
            request_id,
            &head,
            original.as_bytes().clone(),
        )
    }

    /// Records that the bank acknowledged the reversal of `request_id` (0430).
    pub fn reversal_acked(&self, request_id: u64) -> Result<u64, AppendError> {
        self.append(RecordKind::ReversalAcked, request_id, &[], Bytes::new())
    }

    /// Waits until `seq` is durable; true at once without a journal or for seq 0.
    pub async fn durable(&self, seq: u64) -> bool {
        match &self.0 {
            None => true,
            Some(_) if seq == 0 => true,
            Some(_) if seq == NOT_JOURNALED => false,
            Some(journal) => journal.wait_durable(seq).await,
        }
    }

    /// Whether the journal failed (new requests are then refused with 91).
    pub fn has_failed(&self) -> bool {
        self.0.as_ref().is_some_and(|j| j.has_failed())
    }
}
