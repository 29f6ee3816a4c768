//! Fuzz target: `switchyard_security::tr31::{parse, unwrap}` (checks in ../checks.rs).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::tr31_unwrap(data));
