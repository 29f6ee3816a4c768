//! The switch core: plain values and state machines, no I/O and no clock.
//!
//! Time is passed in as [`std::time::Instant`] arguments so a fake clock can
//! drive it in tests.

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
