//! Fuzz target: `switchyard_wire::fuzzing::decode_tertiary_binary` (crates/wire/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_wire::fuzzing::decode_tertiary_binary(data));
