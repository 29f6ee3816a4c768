//! The fuzz targets' checks, shared by the targets (fuzz_targets/) and by
//! crates/security/tests/fuzz_corpus.rs, which runs every corpus file under
//! `cargo test`. Each takes any bytes and panics only on a broken property.

#![allow(dead_code)]

use switchyard_security::store::{self, parse_store, KEY_COUNT_MAX};
use switchyard_security::tr31::{self, KEY_BLOCK_LENGTH_MAX_CHARS};
use switchyard_security::{Algorithm, Key};

/// The TDES key block protection key the seeds are wrapped under.
pub const FUZZ_KBPK_TDES: [u8; 16] = [
    0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32, 0x10,
];

/// The AES key block protection key the seeds are wrapped under.
pub const FUZZ_KBPK_AES: [u8; 32] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x1D, 0x1E, 0x1F,
];

/// `parse_store` never panics; what it accepts is within its bounds, with
/// well-formed, unique ids.
pub fn keystore_parse(data: &[u8]) {
    let Ok(keys) = parse_store(data) else {
        return;
    };
    assert!(keys.len() <= KEY_COUNT_MAX);
    let mut ids = std::collections::HashSet::new();
    for k in &keys {
        assert_eq!(store::id_fault(&k.id), None, "{:?}", k.id);
        assert!(ids.insert(k.id.clone()), "duplicate {:?}", k.id);
    }
}

/// `parse` and `unwrap` never panic; `parse` splits the whole block into header,
/// payload and MAC; `unwrap` succeeds only where `parse` does; what unwraps
/// wraps again (unless too long once masked), under the same KBPK, to a block that unwraps to the same header
/// and key.
pub fn tr31_unwrap(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = tr31::parse(text);
    if let Ok(p) = &parsed {
        assert!(text.len() <= KEY_BLOCK_LENGTH_MAX_CHARS);
        assert_eq!(
            p.header_text.len() + p.payload_hex.len() + p.mac_hex.len(),
            text.len()
        );
        assert_eq!(p.mac_hex.len(), 2 * p.header.version.mac_bytes());
        assert_eq!(
            p.payload_hex.len() % (2 * p.header.version.block_bytes()),
            0
        );
    }
    let kbpks = [
        Key::new(Algorithm::Tdes, &FUZZ_KBPK_TDES),
        Key::new(Algorithm::Aes, &FUZZ_KBPK_AES),
    ];
    for kbpk in kbpks.iter().flatten() {
        let Ok((header, key)) = tr31::unwrap(kbpk, text) else {
            continue;
        };
        assert!(parsed.is_ok());
        // Wrapping masks the key length, so a block near the length bound may
        // not fit again; nothing else may refuse it.
        let again = match tr31::wrap(kbpk, &header, &key) {
            Ok(again) => again,
            Err(tr31::Tr31Error::TooLong { .. }) => continue,
            Err(e) => panic!("what unwrapped does not wrap again: {e}"),
        };
        let (h, k) = tr31::unwrap(kbpk, &again).expect("our own block unwraps");
        assert_eq!(h, header);
        assert_eq!(k.check_value(), key.check_value());
    }
}
