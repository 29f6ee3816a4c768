//! Waiting for journal records to be durable: the I/O half of the write-ahead
//! order (`core::writeahead` writes the records; a link's batch and a session's
//! answers are written only once the records they name are durable).

use crate::core::writeahead::NOT_JOURNALED;
use crate::journal::Journal;
use std::sync::Arc;

/// The journal's durable point, as the shells wait on it; waits for nothing when
/// no journal is configured.
#[derive(Clone, Default)]
pub struct Durable(Option<Arc<Journal>>);

impl Durable {
    /// Durability of `journal`.
    pub fn new(journal: Option<Arc<Journal>>) -> Durable {
        Durable(journal)
    }

    /// Waits until record `seq` is durable; true at once without a journal or for
    /// seq 0, false when the journal failed or the record was never written.
    pub async fn wait(&self, seq: u64) -> bool {
        match &self.0 {
            None => true,
            Some(_) if seq == 0 => true,
            Some(_) if seq == NOT_JOURNALED => false,
            Some(journal) => journal.wait_durable(seq).await,
        }
    }
}
