//! switchyard: a payment switch daemon.
//!
//! Banks connect over mutual TLS and exchange ISO 8583 messages in length-prefixed
//! frames. Each request is checked against the sender's certificate, routed to the
//! connector of the destination bank through a bounded lock-free queue, forwarded
//! over that bank's own TLS link with a STAN unique on the link, matched with its
//! answer, and returned to the sender, or answered by the switch itself by its
//! deadline.
//!
//! Layers, one way down: [`money`] and [`core`] (sans-IO: no sockets, no clock;
//! the bank link's state machine is `core::link`) ← [`config`], [`journal`] ←
//! [`tls`], [`net`] (acquirer sessions, bank connectors: tokio shells around the
//! core) ← [`daemon`] (the switch as a whole) ← [`service`] (the composition root:
//! listeners, signals, admin endpoint) ← `switchyard-cli` (`main.rs`, arguments
//! only). [`admin`] serves HTTP through a narrow [`admin::Operator`] interface.
//! The tools (load generator, bank simulator, demo, development PKI) live in the
//! `switchyard-tools` crate. `docs/architecture.md` has the whole picture.
#![forbid(unsafe_code)]

pub mod admin;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod core;
pub mod daemon;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hsm_keys;
pub mod journal;
pub mod lograte;
pub mod money;
pub mod net;
pub mod security;
pub mod service;
pub mod sync;
pub mod telemetry;
pub mod tls;

pub use switchyard_wire as wire;
