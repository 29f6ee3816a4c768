//! The switch core: plain values and state machines, no I/O and no clock.
//!
//! Time is passed in as [`std::time::Instant`] arguments so a fake clock can
//! drive it in tests. The bank link ([`link::Link`]) and what a bank's links
//! share ([`bank::BankState`]) are driven by the tokio connector, by the
//! simulation and by the core bench alike; [`writeahead`] keeps the order of the
//! journal records, [`recent`] a duplicate's life, [`books`] every answer.

pub mod answer;
pub mod bank;
pub mod books;
pub mod codes;
pub mod datetime;
pub mod dedup;
pub mod fxhash;
pub mod ids;
pub mod inflight;
pub mod link;
pub mod recent;
pub mod request;
pub mod reversal;
pub mod route;
pub mod saf;
pub mod validate;
pub mod writeahead;

pub use codes::ResponseCode;
pub use ids::InstitutionId;
