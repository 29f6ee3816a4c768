//! ISO 9564-1 PIN blocks.
//!
//! | format | cipher | clear block |
//! |---|---|---|
//! | 0 | TDES, 8 bytes | `0` `L` PIN, `F` fill; XOR `0000` + the 12 rightmost PAN digits before the check digit |
//! | 1 | TDES, 8 bytes | `1` `L` PIN, random fill (no PAN) |
//! | 3 | TDES, 8 bytes | `3` `L` PIN, random fill `A`–`F`; XOR the PAN field of format 0 |
//! | 4 | AES, 16 bytes | PIN field `4` `L` PIN, `A` fill to 16 digits, 8 random bytes; PAN field `M` (PAN length − 12) + PAN, zero-padded; block = E(E(PIN field) XOR PAN field) |
//!
//! PINs are 4 to 12 digits. A block that does not decipher to a valid block
//! of its format is an error (the switch answers 81); the clear PIN never leaves
//! this module: [`translate`] goes from one key and format to another.

use crate::{cipher_ops, Algorithm, Key};
use zeroize::Zeroizing;

/// An ISO 9564-1 PIN block format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// ISO format 0 (ANSI X9.8).
    Iso0,
    /// ISO format 1 (no PAN).
    Iso1,
    /// ISO format 3.
    Iso3,
    /// ISO format 4 (AES).
    Iso4,
}

impl Format {
    /// The cipher the format is used with.
    pub fn algorithm(self) -> Algorithm {
        match self {
            Format::Iso4 => Algorithm::Aes,
            _ => Algorithm::Tdes,
        }
    }

    /// Bytes of an enciphered block.
    pub fn block_len(self) -> usize {
        match self {
            Format::Iso4 => 16,
            _ => 8,
        }
    }
}

/// Why a PIN block was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// The PIN is not 4 to 12 digits.
    #[error("PIN must be 4 to 12 digits")]
    Pin,
    /// The PAN is not 1 to 19 digits (13 to 19 for formats 0 and 3).
    #[error("PAN does not fit the PIN block format")]
    Pan,
    /// The key's algorithm or the block's length does not fit the format.
    #[error("key or block length does not fit the PIN block format")]
    Key,
    /// The block does not decipher to a valid block of its format.
    #[error("PIN block does not decipher to a valid block of its format")]
    Block,
}

/// A PIN block enciphered under some key: 8 bytes (formats 0, 1, 3) or 16
/// (format 4). Not secret without the key, but never logged either.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PinBlock {
    bytes: [u8; 16],
    len: u8,
}

impl PinBlock {
    /// A block of 8 or 16 bytes.
    pub fn new(bytes: &[u8]) -> Option<PinBlock> {
        if bytes.len() != 8 && bytes.len() != 16 {
            return None;
        }
        let mut b = [0u8; 16];
        b[..bytes.len()].copy_from_slice(bytes);
        Some(PinBlock {
            bytes: b,
            len: bytes.len() as u8,
        })
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::ops::Deref for PinBlock {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Debug for PinBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinBlock({} bytes)", self.len)
    }
}

/// A clear PIN, 4 to 12 digits (ASCII), on the stack and wiped on drop: no
/// allocation per translation.
struct Digits {
    digits: [u8; 12],
    len: usize,
}

impl Digits {
    fn new() -> Digits {
        Digits {
            digits: [0; 12],
            len: 0,
        }
    }

    fn push(&mut self, d: u8) {
        if let Some(slot) = self.digits.get_mut(self.len) {
            *slot = d;
            self.len += 1;
        }
    }
}

impl std::ops::Deref for Digits {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.digits[..self.len]
    }
}

impl Drop for Digits {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.digits);
    }
}

/// Random bytes for fill digits, from the operating system.
pub fn os_random(buf: &mut [u8]) {
    // getrandom fails only where the OS has no entropy source at all; fill
    // digits then still differ per call through the counter below.
    if getrandom::fill(buf).is_err() {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
        for b in buf {
            *b = (N.fetch_add(0x9E37_79B9, Ordering::Relaxed) >> 24) as u8;
        }
    }
}

/// Blocks a thread's fill generator gives before it is keyed afresh.
const RESEED_BLOCKS: u32 = 1 << 16;

/// Random bytes for fill digits and PIN block padding, fast: AES-128 in
/// counter mode under a key drawn from the operating system per thread, drawn
/// again every [`RESEED_BLOCKS`] blocks (a system call per PIN block costs more
/// than the block's cipher work; NIST SP 800-90A CTR_DRBG in spirit, without
/// its derivation function).
pub fn random_fill(buf: &mut [u8]) {
    use aes::cipher::{BlockCipherEncrypt, KeyInit};
    use std::cell::RefCell;
    struct Ctr {
        cipher: aes::Aes128,
        counter: u128,
        left: u32,
    }
    fn keyed() -> Ctr {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        os_random(&mut seed[..]);
        let cipher = <aes::Aes128 as KeyInit>::new_from_slice(&seed[..16])
            .unwrap_or_else(|_| unreachable!("16 bytes is an AES-128 key"));
        let mut counter = [0u8; 16];
        counter.copy_from_slice(&seed[16..]);
        Ctr {
            cipher,
            counter: u128::from_le_bytes(counter),
            left: RESEED_BLOCKS,
        }
    }
    thread_local! {
        static CTR: RefCell<Option<Ctr>> = const { RefCell::new(None) };
    }
    CTR.with(|c| {
        let mut c = c.borrow_mut();
        for chunk in buf.chunks_mut(16) {
            let ctr = match c.as_mut() {
                Some(ctr) if ctr.left > 0 => ctr,
                _ => c.insert(keyed()),
            };
            ctr.left -= 1;
            ctr.counter = ctr.counter.wrapping_add(1);
            let mut block = aes::cipher::Block::<aes::Aes128>::from(ctr.counter.to_le_bytes());
            ctr.cipher.encrypt_block(&mut block);
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    });
}

/// The PIN field of formats 0, 1, 3 (8 bytes), fill nibbles from `fill`.
fn pin_field(
    control: u8,
    pin: &[u8],
    fill: impl Fn(u8) -> u8,
    random: &mut dyn FnMut(&mut [u8]),
) -> Result<Zeroizing<[u8; 8]>, PinError> {
    check_pin(pin)?;
    let mut nibbles = Zeroizing::new([0u8; 16]);
    nibbles[0] = control;
    nibbles[1] = pin.len() as u8;
    for (n, d) in nibbles[2..].iter_mut().zip(pin) {
        *n = d - b'0';
    }
    let mut noise = Zeroizing::new([0u8; 14]);
    random(&mut noise[..]);
    for i in 2 + pin.len()..16 {
        nibbles[i] = fill(noise[i - 2]);
    }
    Ok(pack(&nibbles))
}

fn check_pin(pin: &[u8]) -> Result<(), PinError> {
    if (4..=12).contains(&pin.len()) && pin.iter().all(u8::is_ascii_digit) {
        Ok(())
    } else {
        Err(PinError::Pin)
    }
}

fn pack(nibbles: &[u8; 16]) -> Zeroizing<[u8; 8]> {
    let mut out = Zeroizing::new([0u8; 8]);
    for (o, pair) in out.iter_mut().zip(nibbles.chunks_exact(2)) {
        *o = pair[0] << 4 | pair[1];
    }
    out
}

/// The PAN field of formats 0 and 3: `0000` + the 12 rightmost digits before
/// the check digit.
fn pan_field(pan: &[u8]) -> Result<[u8; 8], PinError> {
    if !(13..=19).contains(&pan.len()) || !pan.iter().all(u8::is_ascii_digit) {
        return Err(PinError::Pan);
    }
    let digits = &pan[pan.len() - 13..pan.len() - 1];
    let mut nibbles = [0u8; 16];
    for (n, d) in nibbles[4..].iter_mut().zip(digits) {
        *n = d - b'0';
    }
    Ok(*pack(&nibbles))
}

/// The clear 8-byte block of format 0, 1 or 3 for `pin` (and `pan`).
pub fn clear_block(
    format: Format,
    pin: &[u8],
    pan: &[u8],
    random: &mut dyn FnMut(&mut [u8]),
) -> Result<Zeroizing<[u8; 8]>, PinError> {
    let mut block = match format {
        Format::Iso0 => pin_field(0, pin, |_| 0xF, random)?,
        Format::Iso1 => pin_field(1, pin, |r| r & 0xF, random)?,
        Format::Iso3 => pin_field(3, pin, |r| 0xA + (r & 0xF) % 6, random)?,
        Format::Iso4 => return Err(PinError::Key),
    };
    if matches!(format, Format::Iso0 | Format::Iso3) {
        for (b, p) in block.iter_mut().zip(pan_field(pan)?) {
            *b ^= p;
        }
    }
    Ok(block)
}

/// The PIN digits of clear 8-byte block `block` of `format`.
fn pin_of_clear(format: Format, block: &[u8; 8], pan: &[u8]) -> Result<Digits, PinError> {
    let mut field = Zeroizing::new(*block);
    if matches!(format, Format::Iso0 | Format::Iso3) {
        for (b, p) in field.iter_mut().zip(pan_field(pan)?) {
            *b ^= p;
        }
    }
    let mut nibbles = Zeroizing::new([0u8; 16]);
    for (i, b) in field.iter().enumerate() {
        nibbles[2 * i] = b >> 4;
        nibbles[2 * i + 1] = b & 0xF;
    }
    let control = match format {
        Format::Iso0 => 0,
        Format::Iso1 => 1,
        Format::Iso3 => 3,
        Format::Iso4 => return Err(PinError::Key),
    };
    let len = usize::from(nibbles[1]);
    if nibbles[0] != control || !(4..=12).contains(&len) {
        return Err(PinError::Block);
    }
    if nibbles[2..2 + len].iter().any(|&d| d > 9) {
        return Err(PinError::Block);
    }
    let fill_ok = nibbles[2 + len..].iter().all(|&d| match format {
        Format::Iso0 => d == 0xF,
        Format::Iso3 => d >= 0xA,
        _ => true,
    });
    if !fill_ok {
        return Err(PinError::Block);
    }
    let mut digits = Digits::new();
    for d in &nibbles[2..2 + len] {
        digits.push(b'0' + d);
    }
    Ok(digits)
}

/// Format 4's PAN field.
fn pan_field_4(pan: &[u8]) -> Result<[u8; 16], PinError> {
    if !(1..=19).contains(&pan.len()) || !pan.iter().all(u8::is_ascii_digit) {
        return Err(PinError::Pan);
    }
    let mut nibbles = [0u8; 32];
    nibbles[0] = pan.len().saturating_sub(12) as u8;
    let pad = 12usize.saturating_sub(pan.len());
    for (n, d) in nibbles[1 + pad..].iter_mut().zip(pan) {
        *n = d - b'0';
    }
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(nibbles.chunks_exact(2)) {
        *o = pair[0] << 4 | pair[1];
    }
    Ok(out)
}

/// Enciphers `pin` for `pan` in `format` under `key`.
pub fn encipher(
    format: Format,
    key: &Key,
    pin: &[u8],
    pan: &[u8],
    random: &mut dyn FnMut(&mut [u8]),
) -> Result<PinBlock, PinError> {
    if key.algorithm() != format.algorithm() {
        return Err(PinError::Key);
    }
    if format != Format::Iso4 {
        let mut block = clear_block(format, pin, pan, random)?;
        cipher_ops::encrypt(key, &mut block[..]);
        return PinBlock::new(&block[..]).ok_or(PinError::Key);
    }
    check_pin(pin)?;
    let pan_field = pan_field_4(pan)?;
    let mut field = Zeroizing::new([0u8; 16]);
    let mut nibbles = Zeroizing::new([0xAu8; 16]);
    nibbles[0] = 4;
    nibbles[1] = pin.len() as u8;
    for (n, d) in nibbles[2..].iter_mut().zip(pin) {
        *n = d - b'0';
    }
    for (o, pair) in field[..8].iter_mut().zip(nibbles.chunks_exact(2)) {
        *o = pair[0] << 4 | pair[1];
    }
    random(&mut field[8..]);
    cipher_ops::encrypt(key, &mut field[..]);
    for (b, p) in field.iter_mut().zip(pan_field) {
        *b ^= p;
    }
    cipher_ops::encrypt(key, &mut field[..]);
    PinBlock::new(&field[..]).ok_or(PinError::Key)
}

/// The PIN in `block` (`format`, under `key`, for `pan`); checked to be a valid
/// block of its format.
fn decipher(format: Format, key: &Key, block: &[u8], pan: &[u8]) -> Result<Digits, PinError> {
    if key.algorithm() != format.algorithm() || block.len() != format.block_len() {
        return Err(PinError::Key);
    }
    if format != Format::Iso4 {
        let mut clear = Zeroizing::new([0u8; 8]);
        clear.copy_from_slice(block);
        cipher_ops::decrypt(key, &mut clear[..]);
        return pin_of_clear(format, &clear, pan);
    }
    let pan_field = pan_field_4(pan)?;
    let mut field = Zeroizing::new([0u8; 16]);
    field.copy_from_slice(block);
    cipher_ops::decrypt(key, &mut field[..]);
    for (b, p) in field.iter_mut().zip(pan_field) {
        *b ^= p;
    }
    cipher_ops::decrypt(key, &mut field[..]);
    let (control, len) = (field[0] >> 4, usize::from(field[0] & 0xF));
    if control != 4 || !(4..=12).contains(&len) {
        return Err(PinError::Block);
    }
    let mut digits = Digits::new();
    for i in 0..14 {
        let b = field[1 + i / 2];
        let d = if i % 2 == 0 { b >> 4 } else { b & 0xF };
        match (i < len, d) {
            (true, 0..=9) => digits.push(b'0' + d),
            (false, 0xA) => {}
            _ => return Err(PinError::Block),
        }
    }
    Ok(digits)
}

/// Translates `block` (`from` format under `from_key`) to `to` format under
/// `to_key`, for `pan`: the PIN is clear only inside this call, and wiped.
pub fn translate(
    (from, from_key): (Format, &Key),
    block: &[u8],
    pan: &[u8],
    (to, to_key): (Format, &Key),
    random: &mut dyn FnMut(&mut [u8]),
) -> Result<PinBlock, PinError> {
    let pin = decipher(from, from_key, block, pan)?;
    encipher(to, to_key, &pin, pan, random)
}

/// Whether `block` holds `pin` (for tests and PIN verification at the edge).
pub fn holds_pin(
    format: Format,
    key: &Key,
    block: &[u8],
    pan: &[u8],
    pin: &[u8],
) -> Result<bool, PinError> {
    let got = decipher(format, key, block, pan)?;
    Ok(*got == *pin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unhex;

    fn fixed(buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
    }

    #[test]
    fn iso_0_known_answer() {
        let block = clear_block(Format::Iso0, b"1234", b"4321987654321098", &mut fixed).unwrap();
        assert_eq!(block.to_vec(), unhex("04122D789ABCDEF6"));
        assert_eq!(
            pin_of_clear(Format::Iso0, &block, b"4321987654321098")
                .unwrap()
                .to_vec(),
            b"1234"
        );
    }

    #[test]
    fn formats_1_and_3_carry_their_fill() {
        let b1 = clear_block(Format::Iso1, b"123456", b"", &mut fixed).unwrap();
        assert_eq!(b1[0], 0x16);
        assert_eq!(
            pin_of_clear(Format::Iso1, &b1, b"").unwrap().to_vec(),
            b"123456"
        );
        let pan = b"4321987654321098";
        let b3 = clear_block(Format::Iso3, b"1234", pan, &mut fixed).unwrap();
        assert_eq!(b3[0] >> 4, 3);
        assert_eq!(
            pin_of_clear(Format::Iso3, &b3, pan).unwrap().to_vec(),
            b"1234"
        );
        // The fill of format 3 is A-F: any 0-9 there is not a format 3 block.
        let mut bad = *b3;
        let pf = pan_field(pan).unwrap();
        bad[7] = 0x12 ^ pf[7];
        assert_eq!(
            pin_of_clear(Format::Iso3, &bad, pan).err(),
            Some(PinError::Block)
        );
    }

    #[test]
    fn translation_keeps_the_pin_across_keys_and_formats() {
        let zpk_a = Key::new(Algorithm::Tdes, &unhex("0123456789ABCDEFFEDCBA9876543210")).unwrap();
        let zpk_b = Key::new(
            Algorithm::Tdes,
            &unhex("111111111111111122222222222222223333333333333333"),
        )
        .unwrap();
        let aes = Key::new(Algorithm::Aes, &unhex("000102030405060708090A0B0C0D0E0F")).unwrap();
        let pan = b"4321987654321098";
        let block = encipher(Format::Iso0, &zpk_a, b"1234", pan, &mut fixed).unwrap();
        for (to, key) in [
            (Format::Iso1, &zpk_b),
            (Format::Iso3, &zpk_b),
            (Format::Iso4, &aes),
        ] {
            let out =
                translate((Format::Iso0, &zpk_a), &block, pan, (to, key), &mut fixed).unwrap();
            assert_eq!(out.len(), to.block_len());
            assert!(holds_pin(to, key, &out, pan, b"1234").unwrap(), "{to:?}");
            let back = translate((to, key), &out, pan, (Format::Iso0, &zpk_a), &mut fixed).unwrap();
            assert_eq!(back, block, "format 0 has no random fill");
        }
        // Under the wrong key the block does not decipher to format 0 (an 81).
        assert_eq!(
            translate(
                (Format::Iso0, &zpk_b),
                &block,
                pan,
                (Format::Iso0, &zpk_a),
                &mut fixed
            ),
            Err(PinError::Block)
        );
        assert_eq!(
            encipher(Format::Iso4, &zpk_a, b"1234", pan, &mut fixed),
            Err(PinError::Key)
        );
        assert_eq!(
            encipher(Format::Iso0, &zpk_a, b"12a4", pan, &mut fixed),
            Err(PinError::Pin)
        );
    }
}
