//! Fuzz target: `switchyard::fuzzing::config_parse` (src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::config_parse(data));
