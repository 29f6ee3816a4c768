//! Write-ahead journal: append-only segments of checksummed records, written with
//! group commit, read back in order with torn-tail truncation. Each segment's space
//! is reserved when it is created; closed segments are pruned by age
//! (`retention`) and, of earlier opens only, by total size (`size_max_bytes`).
//!
//! The switch journals through `core::writeahead` (which keeps the order records
//! must be durable in); `switchyard journal verify` and
//! `journal dump` read it.

pub mod dump;
mod durable;
pub mod lookup;
mod pages;
pub mod protect;
pub mod reader;
pub mod record;
pub mod recovery;
pub mod settlement;
pub mod spare;
pub mod writer;

pub use lookup::Lookup;
pub use reader::{scan, segments, JournalError, Scan, TornTail};
pub use record::{Record, RecordKind};
pub use writer::{
    AppendError, Entry, Fsync, Journal, JournalConfig, Opened, Prescan, RecordSink, Replica,
};
