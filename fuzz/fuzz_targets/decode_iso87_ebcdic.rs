//! Fuzz target: `switchyard_wire::fuzzing::decode_iso87_ebcdic` (crates/wire/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_wire::fuzzing::decode_iso87_ebcdic(data));
