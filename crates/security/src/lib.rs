//! switchyard's security primitives (sans-IO): ISO 9564 PIN blocks, MACs and
//! key check values, the first layer of the security module of step 9.
//!
//! * [`pin`]: PIN block formats 0, 1, 3 (TDES, 8 bytes) and 4 (AES, 16 bytes):
//!   build, encipher, decipher, and translate from one key and format to
//!   another without the clear PIN leaving this crate.
//! * [`mac`]: ISO/IEC 9797-1 MAC algorithm 3 (the "retail MAC", TDES keys) and
//!   AES-CMAC (RFC 4493).
//! * [`kcv`]: key check values.
//!
//! Clear keys are [`Key`] values: zeroized on drop, never printed (their `Debug`
//! shows the algorithm and the key check value only). Clear PIN blocks and PIN
//! digits live in [`zeroize::Zeroizing`] buffers, wiped when dropped.
#![forbid(unsafe_code)]

pub mod fastdes;
pub mod kcv;
pub mod mac;
pub mod module;
pub mod payshield;
pub mod pin;
#[cfg(any(test, feature = "responder"))]
pub mod responder;
pub mod store;
pub mod tr31;

use zeroize::Zeroizing;

/// A key's algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Triple DES: 16 bytes (two-key) or 24 bytes (three-key).
    Tdes,
    /// AES: 16, 24 or 32 bytes.
    Aes,
}

/// Why a key was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The length does not fit the algorithm.
    #[error("a {algorithm:?} key cannot be {length} bytes")]
    Length {
        /// The algorithm.
        algorithm: Algorithm,
        /// The length given.
        length: usize,
    },
}

/// A clear key: held only inside the security module, wiped on drop.
pub struct Key {
    algorithm: Algorithm,
    bytes: Zeroizing<Vec<u8>>,
    /// A TDES key's schedules, computed once (wiped on drop too).
    tdes: Option<Box<fastdes::Tdes>>,
    /// An AES key's CMAC state (key schedule and subkeys), computed once.
    cmac: Option<Box<mac::CmacState>>,
}

impl Key {
    /// A key of `algorithm` from its clear bytes (copied; wipe your copy).
    pub fn new(algorithm: Algorithm, bytes: &[u8]) -> Result<Key, KeyError> {
        let fits = match algorithm {
            Algorithm::Tdes => matches!(bytes.len(), 16 | 24),
            Algorithm::Aes => matches!(bytes.len(), 16 | 24 | 32),
        };
        if !fits {
            return Err(KeyError::Length {
                algorithm,
                length: bytes.len(),
            });
        }
        let (tdes, cmac) = match algorithm {
            Algorithm::Tdes => (fastdes::Tdes::new(bytes).map(Box::new), None),
            Algorithm::Aes => (None, mac::CmacState::new(bytes).map(Box::new)),
        };
        Ok(Key {
            algorithm,
            bytes: Zeroizing::new(bytes.to_vec()),
            tdes,
            cmac,
        })
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// A fresh key of `len` bytes from the operating system's random source;
    /// TDES keys get odd parity in every byte (the DES convention).
    ///
    /// # Panics
    ///
    /// If the operating system has no working random source: no key is made
    /// from anything weaker.
    pub fn random(algorithm: Algorithm, len: usize) -> Result<Key, KeyError> {
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        // The length is checked by `Key::new` below; check it first so that no
        // entropy is drawn for a key that cannot be made.
        Key::new(algorithm, &bytes)?;
        if let Err(e) = getrandom::fill(&mut bytes) {
            panic!("the operating system's random source failed ({e}): no key made");
        }
        if algorithm == Algorithm::Tdes {
            for b in bytes.iter_mut() {
                *b = (*b & 0xFE) | u8::from((*b >> 1).count_ones() % 2 == 0);
            }
        }
        Key::new(algorithm, &bytes)
    }

    /// A key from clear components, XORed together (all of one length; the
    /// result keeps the components' parity as it falls). No components, or
    /// one of another length than the first, is a [`KeyError::Length`] naming
    /// that length.
    pub fn from_components(algorithm: Algorithm, components: &[&[u8]]) -> Result<Key, KeyError> {
        let Some(first) = components.first() else {
            return Err(KeyError::Length {
                algorithm,
                length: 0,
            });
        };
        let mut bytes = Zeroizing::new(first.to_vec());
        for c in &components[1..] {
            if c.len() != bytes.len() {
                return Err(KeyError::Length {
                    algorithm,
                    length: c.len(),
                });
            }
            for (b, x) in bytes.iter_mut().zip(c.iter()) {
                *b ^= x;
            }
        }
        Key::new(algorithm, &bytes)
    }

    /// The key check value ([`kcv::kcv`]).
    pub fn check_value(&self) -> [u8; 3] {
        kcv::kcv(self)
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A TDES key's schedules.
    pub(crate) fn tdes(&self) -> Option<&fastdes::Tdes> {
        self.tdes.as_deref()
    }

    /// An AES key's CMAC state.
    pub(crate) fn cmac(&self) -> Option<&mac::CmacState> {
        self.cmac.as_deref()
    }
}

impl std::fmt::Debug for Key {
    /// The algorithm, length and check value; never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kcv = kcv::kcv(self);
        write!(
            f,
            "Key({:?}, {} bytes, KCV {:02X}{:02X}{:02X})",
            self.algorithm,
            self.bytes.len(),
            kcv[0],
            kcv[1],
            kcv[2]
        )
    }
}

/// Block-cipher helpers over a [`Key`].
pub(crate) mod cipher_ops {
    use super::{Algorithm, Key};
    use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

    /// Enciphers one block in place (8 bytes for TDES, 16 for AES).
    pub(crate) fn encrypt(key: &Key, block: &mut [u8]) {
        apply(key, block, true);
    }

    /// Deciphers one block in place.
    pub(crate) fn decrypt(key: &Key, block: &mut [u8]) {
        apply(key, block, false);
    }

    fn apply(key: &Key, block: &mut [u8], encrypt: bool) {
        let k = key.bytes();
        match (key.algorithm(), k.len()) {
            (Algorithm::Tdes, _) => {
                // Schedules made with the key: no key setup per block.
                let (Some(t), Ok(b)) = (key.tdes(), <[u8; 8]>::try_from(&block[..])) else {
                    return;
                };
                let x = u64::from_be_bytes(b);
                let y = if encrypt { t.encrypt(x) } else { t.decrypt(x) };
                block.copy_from_slice(&y.to_be_bytes());
            }
            (Algorithm::Aes, 16) => run::<aes::Aes128>(k, block, encrypt),
            (Algorithm::Aes, 24) => run::<aes::Aes192>(k, block, encrypt),
            (Algorithm::Aes, _) => run::<aes::Aes256>(k, block, encrypt),
        }
    }

    fn run<C: KeyInit + BlockCipherEncrypt + BlockCipherDecrypt>(
        key: &[u8],
        block: &mut [u8],
        encrypt: bool,
    ) {
        // Key lengths are checked when a Key is made.
        let Ok(cipher) = C::new_from_slice(key) else {
            return;
        };
        let Ok(block) = block.try_into() else {
            return;
        };
        if encrypt {
            cipher.encrypt_block(block);
        } else {
            cipher.decrypt_block(block);
        }
    }
}

/// Hex text to bytes, for the tests' known answers.
#[cfg(test)]
pub(crate) fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0))
        .collect()
}
