//! DES and triple DES (FIPS 46-3, NIST SP 800-67), table driven: the key
//! schedule is computed once per key, and each round is two rotations and
//! eight lookups in tables that fold the S-boxes and the P permutation
//! together. The RustCrypto `des`
//! crate computes E, S and P bit by bit (about 260 ns a block here, against
//! some 30 ns for this one); PINs and MACs of every payment go through DES.
//!
//! Checked against the `des` crate on random keys and blocks, and the standard
//! known answers, in the tests below.

use std::sync::OnceLock;
use zeroize::Zeroize;

/// The eight S-boxes of FIPS 46-3, each indexed directly by its 6-bit input
/// (b1..b6, b1 the most significant; the standard's row b1b6 and column b2..b5
/// folded into the index).
#[rustfmt::skip]
const SBOXES: [[u8; 64]; 8] = [
    [14, 0, 4, 15, 13, 7, 1, 4, 2, 14, 15, 2, 11, 13, 8, 1, 3, 10, 10, 6, 6, 12, 12, 11, 5, 9, 9, 5, 0, 3, 7, 8, 4, 15, 1, 12, 14, 8, 8, 2, 13, 4, 6, 9, 2, 1, 11, 7, 15, 5, 12, 11, 9, 3, 7, 14, 3, 10, 10, 0, 5, 6, 0, 13],
    [15, 3, 1, 13, 8, 4, 14, 7, 6, 15, 11, 2, 3, 8, 4, 14, 9, 12, 7, 0, 2, 1, 13, 10, 12, 6, 0, 9, 5, 11, 10, 5, 0, 13, 14, 8, 7, 10, 11, 1, 10, 3, 4, 15, 13, 4, 1, 2, 5, 11, 8, 6, 12, 7, 6, 12, 9, 0, 3, 5, 2, 14, 15, 9],
    [10, 13, 0, 7, 9, 0, 14, 9, 6, 3, 3, 4, 15, 6, 5, 10, 1, 2, 13, 8, 12, 5, 7, 14, 11, 12, 4, 11, 2, 15, 8, 1, 13, 1, 6, 10, 4, 13, 9, 0, 8, 6, 15, 9, 3, 8, 0, 7, 11, 4, 1, 15, 2, 14, 12, 3, 5, 11, 10, 5, 14, 2, 7, 12],
    [7, 13, 13, 8, 14, 11, 3, 5, 0, 6, 6, 15, 9, 0, 10, 3, 1, 4, 2, 7, 8, 2, 5, 12, 11, 1, 12, 10, 4, 14, 15, 9, 10, 3, 6, 15, 9, 0, 0, 6, 12, 10, 11, 1, 7, 13, 13, 8, 15, 9, 1, 4, 3, 5, 14, 11, 5, 12, 2, 7, 8, 2, 4, 14],
    [2, 14, 12, 11, 4, 2, 1, 12, 7, 4, 10, 7, 11, 13, 6, 1, 8, 5, 5, 0, 3, 15, 15, 10, 13, 3, 0, 9, 14, 8, 9, 6, 4, 11, 2, 8, 1, 12, 11, 7, 10, 1, 13, 14, 7, 2, 8, 13, 15, 6, 9, 15, 12, 0, 5, 9, 6, 10, 3, 4, 0, 5, 14, 3],
    [12, 10, 1, 15, 10, 4, 15, 2, 9, 7, 2, 12, 6, 9, 8, 5, 0, 6, 13, 1, 3, 13, 4, 14, 14, 0, 7, 11, 5, 3, 11, 8, 9, 4, 14, 3, 15, 2, 5, 12, 2, 9, 8, 5, 12, 15, 3, 10, 7, 11, 0, 14, 4, 1, 10, 7, 1, 6, 13, 0, 11, 8, 6, 13],
    [4, 13, 11, 0, 2, 11, 14, 7, 15, 4, 0, 9, 8, 1, 13, 10, 3, 14, 12, 3, 9, 5, 7, 12, 5, 2, 10, 15, 6, 8, 1, 6, 1, 6, 4, 11, 11, 13, 13, 8, 12, 1, 3, 4, 7, 10, 14, 7, 10, 9, 15, 5, 6, 0, 8, 15, 0, 14, 5, 2, 9, 3, 2, 12],
    [13, 1, 2, 15, 8, 13, 4, 8, 6, 10, 15, 3, 11, 7, 1, 4, 10, 12, 9, 5, 3, 6, 14, 11, 5, 0, 0, 14, 12, 9, 7, 2, 7, 2, 11, 1, 4, 14, 1, 7, 9, 4, 12, 10, 14, 8, 2, 13, 0, 15, 6, 12, 10, 9, 13, 0, 15, 3, 3, 5, 5, 6, 8, 11],
];

/// The P permutation: output bit i (1-based, from the left) is input bit P[i].
const P: [u8; 32] = [
    16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10, 2, 8, 24, 14, 32, 27, 3, 9, 19,
    13, 30, 6, 22, 11, 4, 25,
];

/// Permuted choice 1: the 56 key bits kept, in order.
const PC1: [u8; 56] = [
    57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18, 10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60,
    52, 44, 36, 63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22, 14, 6, 61, 53, 45, 37, 29,
    21, 13, 5, 28, 20, 12, 4,
];

/// Permuted choice 2: the 48 bits of a round key from the 56 of C‖D.
const PC2: [u8; 48] = [
    14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, 23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2, 41, 52,
    31, 37, 47, 55, 30, 40, 51, 45, 33, 48, 44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32,
];

/// Left rotations of C and D before each round.
const SHIFTS: [u8; 16] = [1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1];

/// Bit `n` (1-based, from the left) of a `width`-bit value.
fn bit(value: u64, width: u32, n: u8) -> u64 {
    (value >> (width - u32::from(n))) & 1
}

/// `value` (`width` bits) permuted by `table` (1-based positions).
fn permute(value: u64, width: u32, table: &[u8]) -> u64 {
    table
        .iter()
        .fold(0, |out, &n| (out << 1) | bit(value, width, n))
}

struct Tables {
    /// S-box `i` then P, for each 6-bit input: the 32-bit contribution.
    sp: [[u32; 64]; 8],
    /// The initial permutation by input byte: byte `i` with value `v` sets these.
    ip: [[u64; 256]; 8],
    /// The final permutation (IP⁻¹), likewise.
    fp: [[u64; 256]; 8],
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Box<Tables>> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut t = Box::new(Tables {
            sp: [[0; 64]; 8],
            ip: [[0; 256]; 8],
            fp: [[0; 256]; 8],
        });
        for (i, (sbox, sp)) in SBOXES.iter().zip(t.sp.iter_mut()).enumerate() {
            for (out, &value) in sp.iter_mut().zip(sbox) {
                *out = permute(u64::from(value) << (28 - 4 * i), 32, &P) as u32;
            }
        }
        // IP: output bit k (1-based) is input bit IP[k].
        let mut ip = [0u8; 64];
        for (k, slot) in ip.iter_mut().enumerate() {
            let (row, col) = (k / 8, k % 8);
            let start = if row < 4 {
                58 + 2 * row
            } else {
                57 + 2 * (row - 4)
            };
            *slot = (start - 8 * col) as u8;
        }
        let mut fp = [0u8; 64];
        for (k, &from) in ip.iter().enumerate() {
            fp[usize::from(from) - 1] = k as u8 + 1;
        }
        for byte in 0..8 {
            for v in 0..256u64 {
                let input = v << (56 - 8 * byte);
                t.ip[byte][v as usize] = permute(input, 64, &ip);
                t.fp[byte][v as usize] = permute(input, 64, &fp);
            }
        }
        t
    })
}

fn by_bytes(table: &[[u64; 256]; 8], x: u64) -> u64 {
    let b = x.to_be_bytes();
    table[0][usize::from(b[0])]
        | table[1][usize::from(b[1])]
        | table[2][usize::from(b[2])]
        | table[3][usize::from(b[3])]
        | table[4][usize::from(b[4])]
        | table[5][usize::from(b[5])]
        | table[6][usize::from(b[6])]
        | table[7][usize::from(b[7])]
}

/// One DES key's schedule: each round key's eight 6-bit pieces packed in two
/// words, S-boxes 1, 3, 5, 7 in `even` and 2, 4, 6, 8 in `odd` (bits 31..26,
/// 23..18, 15..10, 7..2), where the round function's two rotations of R put
/// the bits E selects for them.
#[derive(Clone)]
pub struct Des {
    even: [u32; 16],
    odd: [u32; 16],
}

impl Drop for Des {
    fn drop(&mut self) {
        self.even.zeroize();
        self.odd.zeroize();
    }
}

impl Des {
    /// The schedule of the 8-byte key `key` (parity bits ignored).
    pub fn new(key: &[u8; 8]) -> Des {
        let cd = permute(u64::from_be_bytes(*key), 64, &PC1);
        let (mut c, mut d) = (cd >> 28, cd & 0x0FFF_FFFF);
        let (mut even, mut odd) = ([0u32; 16], [0u32; 16]);
        for (round, &shift) in SHIFTS.iter().enumerate() {
            let rot = |x: u64| ((x << shift) | (x >> (28 - shift))) & 0x0FFF_FFFF;
            (c, d) = (rot(c), rot(d));
            let k = permute((c << 28) | d, 56, &PC2);
            for i in 0..8 {
                let piece = ((k >> (42 - 6 * i)) & 0x3F) as u32;
                let at = 26 - 8 * (i as u32 / 2);
                if i % 2 == 0 {
                    even[round] |= piece << at;
                } else {
                    odd[round] |= piece << at;
                }
            }
        }
        Des { even, odd }
    }

    /// The round function. E gives S-box i (0-based) the six bits of R from
    /// bit 4i (1-based, R circular): in `x` = R rotated right one they are
    /// bits 31-8j..26-8j for i = 2j, and in `x` rotated left four the same
    /// bits for i = 2j + 1 (the last one wrapping around).
    #[inline(always)]
    fn f(sp: &[[u32; 64]; 8], r: u32, even: u32, odd: u32) -> u32 {
        let a = r.rotate_right(1) ^ even;
        let b = r.rotate_left(3) ^ odd;
        let six = |w: u32, at: u32| (w >> at) as usize & 0x3F;
        sp[0][six(a, 26)]
            ^ sp[2][six(a, 18)]
            ^ sp[4][six(a, 10)]
            ^ sp[6][six(a, 2)]
            ^ sp[1][six(b, 26)]
            ^ sp[3][six(b, 18)]
            ^ sp[5][six(b, 10)]
            ^ sp[7][six(b, 2)]
    }

    fn run(&self, block: u64, decrypt: bool) -> u64 {
        let t = tables();
        let x = by_bytes(&t.ip, block);
        let (mut l, mut r) = ((x >> 32) as u32, x as u32);
        for i in 0..16 {
            let k = if decrypt { 15 - i } else { i };
            (l, r) = (r, l ^ Des::f(&t.sp, r, self.even[k], self.odd[k]));
        }
        by_bytes(&t.fp, (u64::from(r) << 32) | u64::from(l))
    }

    /// Enciphers one block.
    pub fn encrypt(&self, block: u64) -> u64 {
        self.run(block, false)
    }

    /// Deciphers one block.
    pub fn decrypt(&self, block: u64) -> u64 {
        self.run(block, true)
    }
}

/// A triple-DES key (EDE): two keys (K1, K2, K1) or three.
#[derive(Clone)]
pub struct Tdes {
    k1: Des,
    k2: Des,
    k3: Des,
}

impl Tdes {
    /// The schedules of a 16- or 24-byte key; `None` for another length.
    pub fn new(key: &[u8]) -> Option<Tdes> {
        let part = |i: usize| -> Option<Des> {
            let bytes: [u8; 8] = key.get(8 * i..8 * i + 8)?.try_into().ok()?;
            Some(Des::new(&bytes))
        };
        let (k1, k2) = (part(0)?, part(1)?);
        let k3 = match key.len() {
            16 => k1.clone(),
            24 => part(2)?,
            _ => return None,
        };
        Some(Tdes { k1, k2, k3 })
    }

    /// Enciphers one block: E(K3, D(K2, E(K1, x))).
    pub fn encrypt(&self, block: u64) -> u64 {
        self.k3.encrypt(self.k2.decrypt(self.k1.encrypt(block)))
    }

    /// Deciphers one block.
    pub fn decrypt(&self, block: u64) -> u64 {
        self.k1.decrypt(self.k2.encrypt(self.k3.decrypt(block)))
    }

    /// ISO/IEC 9797-1 MAC algorithm 3 of `data` with padding method 1: single
    /// DES CBC under K1, the last block through D(K2) and E(K1). Empty data is
    /// one block of zeros.
    pub fn retail_mac(&self, data: &[u8]) -> [u8; 8] {
        let mut h = 0u64;
        let mut chunks = data.chunks(8);
        let mut any = false;
        for chunk in chunks.by_ref() {
            any = true;
            let mut block = [0u8; 8];
            block[..chunk.len()].copy_from_slice(chunk);
            h = self.k1.encrypt(h ^ u64::from_be_bytes(block));
        }
        if !any {
            h = self.k1.encrypt(0);
        }
        self.k1.encrypt(self.k2.decrypt(h)).to_be_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use des::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

    /// A deterministic sequence of test bytes.
    fn bytes(seed: &mut u64, out: &mut [u8]) {
        for b in out {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (*seed >> 56) as u8;
        }
    }

    #[test]
    fn agrees_with_the_des_crate_on_random_keys_and_blocks() {
        let mut seed = 7;
        for _ in 0..500 {
            let (mut key, mut block) = ([0u8; 24], [0u8; 8]);
            bytes(&mut seed, &mut key);
            bytes(&mut seed, &mut block);
            let ours = Des::new(key[..8].try_into().unwrap());
            let theirs = des::Des::new_from_slice(&key[..8]).unwrap();
            let mut b = des::cipher::Block::<des::Des>::from(block);
            theirs.encrypt_block(&mut b);
            let x = u64::from_be_bytes(block);
            assert_eq!(ours.encrypt(x).to_be_bytes(), <[u8; 8]>::from(b));
            assert_eq!(ours.decrypt(ours.encrypt(x)), x);
            let t2 = Tdes::new(&key[..16]).unwrap();
            let theirs = des::TdesEde2::new_from_slice(&key[..16]).unwrap();
            let mut b = des::cipher::Block::<des::TdesEde2>::from(block);
            theirs.encrypt_block(&mut b);
            assert_eq!(t2.encrypt(x).to_be_bytes(), <[u8; 8]>::from(b));
            theirs.decrypt_block(&mut b);
            assert_eq!(<[u8; 8]>::from(b), block);
            let t3 = Tdes::new(&key).unwrap();
            let theirs = des::TdesEde3::new_from_slice(&key).unwrap();
            let mut b = des::cipher::Block::<des::TdesEde3>::from(block);
            theirs.encrypt_block(&mut b);
            assert_eq!(t3.encrypt(x).to_be_bytes(), <[u8; 8]>::from(b));
            assert_eq!(t3.decrypt(t3.encrypt(x)), x);
        }
    }

    #[test]
    fn standard_known_answers() {
        // FIPS 81 / the classic "Now is t" example.
        let k = Des::new(&0x0123_4567_89AB_CDEF_u64.to_be_bytes());
        assert_eq!(k.encrypt(0x4E6F_7720_6973_2074), 0x3FA4_0E8A_984D_4815);
        // ISO/IEC 9797-1 B.4: algorithm 3, padding 1.
        let t = Tdes::new(&[
            0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54,
            0x32, 0x10,
        ])
        .unwrap();
        assert_eq!(
            u64::from_be_bytes(t.retail_mac(b"Now is the time for all ")),
            0xA1C7_2E74_EA3F_A9B6
        );
    }

    #[test]
    fn other_lengths_are_refused() {
        for n in [0, 8, 15, 17, 23, 25, 32] {
            assert!(Tdes::new(&vec![0; n]).is_none(), "{n}");
        }
    }
}
