//! switchyard's tools, beside the daemon library rather than inside it: the load
//! generator, the bank simulator, the demo and its test bed, the development PKI
//! (`gen-certs`), and what the tests share.
//!
//! The `switchyard` binary (`crates/cli`) exposes each as a subcommand.
#![forbid(unsafe_code)]

pub mod banksim;
pub mod certs;
pub mod corepath;
pub mod demo;
pub mod loadgen;
pub mod natskit;
pub mod testkit;
