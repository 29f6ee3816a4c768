//! The switch core: plain values and state machines, no I/O and no clock.
//!
//! Time is passed in as [`std::time::Instant`] arguments so a fake clock can
//! drive it in tests.

pub mod codes;
pub mod datetime;
pub mod dedup;
pub mod fxhash;
pub mod ids;
pub mod inflight;
pub mod reversal;
pub mod route;
pub mod validate;

pub use codes::ResponseCode;
pub use ids::InstitutionId;
