//! Message authentication codes: ISO/IEC 9797-1 MAC algorithm 3 (the retail
//! MAC: single DES CBC under the key's left half, the last block through TDES;
//! padding method 1, zeros) for two-key TDES keys, and AES-CMAC (RFC 4493) for
//! AES keys. Verification compares in constant time.

use crate::{Algorithm, Key};
use cmac::Cmac;
use retail_mac::{Mac, RetailMac};

/// Why a MAC could not be made or did not verify.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// The key does not fit the algorithm (the retail MAC needs a two-key TDES
    /// key; AES-CMAC an AES key).
    #[error("the key does not fit this MAC algorithm")]
    Key,
    /// The MAC does not match.
    #[error("MAC does not verify")]
    Mismatch,
}

/// ISO/IEC 9797-1 MAC algorithm 3 of `data` under two-key TDES `key`: 8 bytes.
pub fn retail_mac(key: &Key, data: &[u8]) -> Result<[u8; 8], MacError> {
    let mac = retail(key, data)?;
    let mut out = [0u8; 8];
    out.copy_from_slice(&mac.finalize().into_bytes());
    Ok(out)
}

/// Whether `mac` (8 bytes, or a left part of at least 4) is the retail MAC of
/// `data` under `key`.
pub fn verify_retail_mac(key: &Key, data: &[u8], mac: &[u8]) -> Result<(), MacError> {
    if mac.len() < 4 {
        return Err(MacError::Mismatch);
    }
    retail(key, data)?
        .verify_truncated_left(mac)
        .map_err(|_| MacError::Mismatch)
}

fn retail(key: &Key, data: &[u8]) -> Result<RetailMac<des::Des>, MacError> {
    if key.algorithm() != Algorithm::Tdes || key.bytes().len() != 16 {
        return Err(MacError::Key);
    }
    let mut mac = <RetailMac<des::Des> as retail_mac::KeyInit>::new_from_slice(key.bytes())
        .map_err(|_| MacError::Key)?;
    // Padding method 1 pads to a *positive* multiple of the block: empty data is
    // one block of zeros (the psec test found the crate's MAC of nothing differs).
    mac.update(if data.is_empty() { &[0u8; 8] } else { data });
    Ok(mac)
}

/// AES-CMAC (RFC 4493) of `data` under AES `key`: 16 bytes.
pub fn aes_cmac(key: &Key, data: &[u8]) -> Result<[u8; 16], MacError> {
    let mut out = [0u8; 16];
    out.copy_from_slice(&cmac_of(key, data)?);
    Ok(out)
}

/// Whether `mac` (16 bytes, or a left part of at least 4) is the AES-CMAC of
/// `data` under `key`.
pub fn verify_aes_cmac(key: &Key, data: &[u8], mac: &[u8]) -> Result<(), MacError> {
    if mac.len() < 4 {
        return Err(MacError::Mismatch);
    }
    let full = cmac_of(key, data)?;
    // Constant time over the compared length.
    let diff = full.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff == 0 && mac.len() <= full.len() {
        Ok(())
    } else {
        Err(MacError::Mismatch)
    }
}

fn cmac_of(key: &Key, data: &[u8]) -> Result<Vec<u8>, MacError> {
    if key.algorithm() != Algorithm::Aes {
        return Err(MacError::Key);
    }
    macro_rules! cmac_with {
        ($cipher:ty) => {{
            let mut mac = <Cmac<$cipher> as cmac::KeyInit>::new_from_slice(key.bytes())
                .map_err(|_| MacError::Key)?;
            mac.update(data);
            Ok(mac.finalize().into_bytes().to_vec())
        }};
    }
    match key.bytes().len() {
        16 => cmac_with!(aes::Aes128),
        24 => cmac_with!(aes::Aes192),
        _ => cmac_with!(aes::Aes256),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unhex;

    #[test]
    fn iso_9797_1_algorithm_3_known_answer() {
        // ISO/IEC 9797-1:2011, annex B.4.
        let key = Key::new(Algorithm::Tdes, &unhex("0123456789ABCDEFFEDCBA9876543210")).unwrap();
        let mac = retail_mac(&key, b"Now is the time for all ").unwrap();
        assert_eq!(mac.to_vec(), unhex("A1C72E74EA3FA9B6"));
        let mac = retail_mac(&key, b"Now is the time for it").unwrap();
        assert_eq!(mac.to_vec(), unhex("2E2B1428CC78254F"));
        verify_retail_mac(&key, b"Now is the time for it", &unhex("2E2B1428")).unwrap();
        assert_eq!(
            verify_retail_mac(&key, b"Now is the time for It", &mac),
            Err(MacError::Mismatch)
        );
        // Padding method 1: nothing is one block of zeros.
        assert_eq!(
            retail_mac(&key, b"").unwrap(),
            retail_mac(&key, &[0; 8]).unwrap()
        );
    }

    #[test]
    fn aes_cmac_rfc_4493_known_answers() {
        // RFC 4493, section 4: the four examples.
        let key = Key::new(Algorithm::Aes, &unhex("2b7e151628aed2a6abf7158809cf4f3c")).unwrap();
        let m = unhex(
            "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e5130c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710",
        );
        for (len, want) in [
            (0, "bb1d6929e95937287fa37d129b756746"),
            (16, "070a16b46b4d4144f79bdd9dd04a287c"),
            (40, "dfa66747de9ae63030ca32611497c827"),
            (64, "51f0bebf7e3b9d92fc49741779363cfe"),
        ] {
            assert_eq!(
                aes_cmac(&key, &m[..len]).unwrap().to_vec(),
                unhex(want),
                "{len}"
            );
            verify_aes_cmac(&key, &m[..len], &unhex(want)[..8]).unwrap();
        }
        assert_eq!(
            verify_aes_cmac(&key, &m[..15], &unhex("070a16b46b4d4144")),
            Err(MacError::Mismatch)
        );
        let tdes = Key::new(Algorithm::Tdes, &[1; 16]).unwrap();
        assert_eq!(aes_cmac(&tdes, b""), Err(MacError::Key));
    }
}
