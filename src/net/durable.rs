//! Waiting for journal records to be durable: the I/O half of the write-ahead
//! order (`core::writeahead` writes the records; a link's batch and a session's
//! answers are written only once the records they name are durable).

use crate::core::recent::{AnswerReader, ReadBack, ReadDone};
use crate::core::writeahead::NOT_JOURNALED;
use crate::journal::{Journal, RecordKind};
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

    /// Whether record `seq` is durable now (`None`: it never will be: the journal
    /// failed or the record was never written).
    pub fn is_durable(&self, seq: u64) -> Option<bool> {
        match &self.0 {
            None => Some(true),
            Some(_) if seq == 0 => Some(true),
            Some(_) if seq == NOT_JOURNALED => None,
            Some(j) if j.has_failed() => None,
            Some(j) => Some(j.durable() >= seq),
        }
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

/// Retransmissions' answers being read back from the journal at once, at most;
/// past it a retransmission is answered 91 (counted).
pub const READ_BACKS_MAX: usize = 256;

/// Reads bank answers back from the journal for retransmissions: each read waits
/// for its record to be durable on a task of its own, then reads on tokio's
/// blocking pool, never on a session's task.
pub struct JournalAnswers {
    journal: Arc<Journal>,
    runtime: tokio::runtime::Handle,
    reading: Arc<std::sync::atomic::AtomicUsize>,
}

impl JournalAnswers {
    /// Reads from `journal` on the current tokio runtime.
    pub fn new(journal: Arc<Journal>) -> JournalAnswers {
        JournalAnswers {
            journal,
            runtime: tokio::runtime::Handle::current(),
            reading: Arc::default(),
        }
    }
}

impl AnswerReader for JournalAnswers {
    fn read(&self, seq: u64, done: ReadDone) {
        use std::sync::atomic::Ordering;
        if seq == NOT_JOURNALED {
            return done(ReadBack::Failed);
        }
        if self.reading.fetch_add(1, Ordering::AcqRel) >= READ_BACKS_MAX {
            self.reading.fetch_sub(1, Ordering::AcqRel);
            return done(ReadBack::Busy);
        }
        let journal = self.journal.clone();
        let reading = self.reading.clone();
        self.runtime.spawn(async move {
            let read = if journal.wait_durable(seq).await {
                let j = journal.clone();
                match tokio::task::spawn_blocking(move || j.lookup().read(seq)).await {
                    Ok(Ok(Some((RecordKind::Outcome, protected, body)))) => {
                        ReadBack::Answer(body.into(), protected)
                    }
                    Ok(Err(e)) => {
                        crate::log_limited!(warn, seq, error = %e, "journal: answer not read back");
                        ReadBack::Failed
                    }
                    _ => ReadBack::Failed,
                }
            } else {
                ReadBack::Failed
            };
            reading.fetch_sub(1, Ordering::AcqRel);
            done(read);
        });
    }
}
