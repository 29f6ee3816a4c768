//! Message authentication codes: ISO/IEC 9797-1 MAC algorithm 3 (the retail
//! MAC: single DES CBC under the key's left half, the last block through TDES;
//! padding method 1, zeros) for two-key TDES keys, and AES-CMAC (RFC 4493) for
//! AES keys. Verification compares in constant time.

use crate::{Algorithm, Key};
use cmac::{Cmac, Mac};

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
    match (key.algorithm(), key.bytes().len(), key.tdes()) {
        // Padding method 1 pads to a *positive* multiple of the block: empty
        // data is one block of zeros (found by the psec test).
        (Algorithm::Tdes, 16, Some(t)) => Ok(t.retail_mac(data)),
        _ => Err(MacError::Key),
    }
}

/// Whether `mac` (8 bytes, or a left part of at least 4) is the retail MAC of
/// `data` under `key` (compared in constant time).
pub fn verify_retail_mac(key: &Key, data: &[u8], mac: &[u8]) -> Result<(), MacError> {
    let full = retail_mac(key, data)?;
    if !(4..=8).contains(&mac.len()) {
        return Err(MacError::Mismatch);
    }
    let diff = full.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff == 0 {
        Ok(())
    } else {
        Err(MacError::Mismatch)
    }
}

/// AES-CMAC (RFC 4493) of `data` under AES `key`: 16 bytes.
pub fn aes_cmac(key: &Key, data: &[u8]) -> Result<[u8; 16], MacError> {
    cmac_of(key, data)
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

/// An AES key's CMAC state, made once with the key (key schedule and
/// subkeys; zeroized on drop): each MAC starts from a copy.
#[derive(Clone)]
pub(crate) enum CmacState {
    A128(Cmac<aes::Aes128>),
    A192(Cmac<aes::Aes192>),
    A256(Cmac<aes::Aes256>),
}

impl CmacState {
    /// The state for AES key `bytes` (16, 24 or 32 bytes).
    pub(crate) fn new(bytes: &[u8]) -> Option<CmacState> {
        use cmac::KeyInit;
        Some(match bytes.len() {
            16 => CmacState::A128(Cmac::new_from_slice(bytes).ok()?),
            24 => CmacState::A192(Cmac::new_from_slice(bytes).ok()?),
            32 => CmacState::A256(Cmac::new_from_slice(bytes).ok()?),
            _ => return None,
        })
    }
}

fn cmac_of(key: &Key, data: &[u8]) -> Result<[u8; 16], MacError> {
    fn run<M: Mac + Clone>(m: &M, data: &[u8]) -> [u8; 16] {
        let mut m = m.clone();
        m.update(data);
        let mut out = [0u8; 16];
        out.copy_from_slice(&m.finalize().into_bytes()[..16]);
        out
    }
    match (key.algorithm(), key.cmac()) {
        (Algorithm::Aes, Some(CmacState::A128(m))) => Ok(run(m, data)),
        (Algorithm::Aes, Some(CmacState::A192(m))) => Ok(run(m, data)),
        (Algorithm::Aes, Some(CmacState::A256(m))) => Ok(run(m, data)),
        _ => Err(MacError::Key),
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
