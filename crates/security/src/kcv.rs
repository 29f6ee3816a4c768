//! Key check values: the first three bytes of a block of zeros enciphered
//! under the key (TDES: 8 bytes, the classic KCV; AES: 16 bytes, the legacy
//! method many HSMs still report beside the CMAC-based one of X9.24-1:2017).

use crate::{cipher_ops, Algorithm, Key};

/// The key check value of `key`.
pub fn kcv(key: &Key) -> [u8; 3] {
    let mut block = [0u8; 16];
    let width = match key.algorithm() {
        Algorithm::Tdes => 8,
        Algorithm::Aes => 16,
    };
    cipher_ops::encrypt(key, &mut block[..width]);
    [block[0], block[1], block[2]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_tdes_check_value() {
        let key = Key::new(
            Algorithm::Tdes,
            &[
                0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54,
                0x32, 0x10,
            ],
        )
        .unwrap();
        assert_eq!(kcv(&key), [0x08, 0xD7, 0xB4]);
        assert_eq!(format!("{key:?}"), "Key(Tdes, 16 bytes, KCV 08D7B4)");
    }
}
