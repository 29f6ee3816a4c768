//! Fuzz target: `switchyard_wire::fuzzing::dialect_jpos_xml` (crates/wire/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_wire::fuzzing::dialect_jpos_xml(data));
