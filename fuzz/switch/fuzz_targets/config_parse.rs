//! Fuzz target: see `fuzz_checks_switch::config_parse` in tests/fuzz_checks_switch/mod.rs.
#![no_main]

#[allow(dead_code)]
#[path = "../../../tests/fuzz_checks_switch/mod.rs"]
mod fuzz_checks_switch;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks_switch::config_parse(data));
