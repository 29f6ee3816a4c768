//! Transport around the switch core: acquirer sessions and bank connectors.
//!
//! These tasks only move bytes and wake each other; decisions come from
//! [`crate::core`] (the bank link's state machine is `core::link`).

pub mod connector;
pub mod durable;
pub mod ingress;
pub mod live;
