//! Fuzz target: `switchyard::fuzzing::journal_records` (src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::journal_records(data));
