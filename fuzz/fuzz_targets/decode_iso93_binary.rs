//! Fuzz target: `switchyard_wire::fuzzing::decode_iso93_binary` (crates/wire/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_wire::fuzzing::decode_iso93_binary(data));
