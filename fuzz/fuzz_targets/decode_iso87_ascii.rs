//! Fuzz target: see `fuzz_checks::decode_iso87_ascii` in crates/wire/tests/fuzz_checks/mod.rs.
#![no_main]

#[allow(dead_code)]
#[path = "../../crates/wire/tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::decode_iso87_ascii(data));
