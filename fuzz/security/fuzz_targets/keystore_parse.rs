//! Fuzz target: `switchyard_security::store::parse_store` (checks in ../checks.rs).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::keystore_parse(data));
