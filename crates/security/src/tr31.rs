//! TR-31 key blocks (ASC X9 TR-31, ANSI X9.143): a key, its attributes and a MAC
//! over both, as one printable string a peer can import.
//!
//! Two versions, the key-derivation binding methods:
//!
//! * **B**: a TDES key block protection key (KBPK, 16 or 24 bytes); the key block
//!   encryption key (KBEK) and authentication key (KBAK) derived from it by TDES
//!   CMAC, the payload enciphered in TDES CBC, an 8-byte TDES CMAC.
//! * **D**: an AES KBPK (16, 24 or 32 bytes); KBEK and KBAK derived by AES CMAC,
//!   AES CBC, a 16-byte AES CMAC.
//!
//! In both, the MAC is taken over the header text and the *clear* payload (2-byte
//! key length in bits, the key, random padding), and is the CBC initial vector.
//! The derivation input is 8 bytes: counter, key usage (`0000` KBEK, `0001` KBAK),
//! separator `00`, algorithm (`0000` TDES-2, `0001` TDES-3, `0002`/`0003`/`0004`
//! AES-128/192/256) and the derived key's length in bits.
//!
//! A block is text:
//!
//! ```text
//! offset  0  version ("B" or "D")
//!         1  length of the whole block, 4 decimal digits
//!         5  key usage, 2 characters ("P0", "M3", "K0", ...)
//!         7  algorithm ("T" TDES, "A" AES)
//!         8  mode of use ("E", "B", "C", ...)
//!         9  key version number, 2 characters ("00": none)
//!        11  exportability ("E", "N", "S")
//!        12  number of optional blocks, 2 digits
//!        14  reserved, "00"
//!        16  optional blocks (id, 2 hex length, data), padded with a "PB" block
//!            so the header is a whole number of cipher blocks
//!         …  enciphered payload, uppercase hex
//!         …  MAC, uppercase hex (16 characters for B, 32 for D)
//! ```
//!
//! [`unwrap`] checks the structure first (every rejection names the offset), then
//! deciphers and verifies the MAC before it reads the key length or returns
//! anything. Clear payloads and derived keys live in [`Zeroizing`] buffers or
//! [`Key`]s. [`wrap`] masks the key's length: the payload is padded as for the
//! longest key of its algorithm (24 bytes TDES, 32 bytes AES).

use crate::{cipher_ops, Algorithm, Key};
use cmac::{Cmac, Mac};
use zeroize::Zeroizing;

/// The longest key block accepted or made, in characters: the largest multiple of
/// 8 that the 4-digit length field can state (9999 is not a whole number of
/// cipher blocks).
pub const KEY_BLOCK_LENGTH_MAX_CHARS: usize = 9992;

/// The fixed part of the header, in characters.
pub const HEADER_FIXED_CHARS: usize = 16;

/// The most optional blocks a header can count (two digits).
pub const OPTIONAL_BLOCKS_MAX: usize = 99;

/// The longest length-of-length of an extended optional block length, in bytes
/// (2: lengths up to 65535, beyond any key block).
pub const OPTIONAL_BLOCK_LENGTH_OF_LENGTH_MAX_BYTES: usize = 2;

/// The key length the payload is padded for when wrapping a TDES key, bytes.
pub const TDES_MASKED_KEY_BYTES: usize = 24;

/// The key length the payload is padded for when wrapping an AES key, bytes.
pub const AES_MASKED_KEY_BYTES: usize = 32;

// === Header ===

/// The key block version: how the block is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// TDES key derivation binding method (TDES KBPK).
    B,
    /// AES key derivation binding method (AES KBPK).
    D,
}

impl Version {
    /// The cipher block size, bytes: 8 (B) or 16 (D).
    pub fn block_bytes(self) -> usize {
        match self {
            Version::B => 8,
            Version::D => 16,
        }
    }

    /// The MAC length, bytes: 8 (B) or 16 (D).
    pub fn mac_bytes(self) -> usize {
        self.block_bytes()
    }

    /// The KBPK's algorithm.
    pub fn kbpk_algorithm(self) -> Algorithm {
        match self {
            Version::B => Algorithm::Tdes,
            Version::D => Algorithm::Aes,
        }
    }

    /// The version that a KBPK of `algorithm` protects: B for TDES, D for AES.
    pub fn for_kbpk(algorithm: Algorithm) -> Version {
        match algorithm {
            Algorithm::Tdes => Version::B,
            Algorithm::Aes => Version::D,
        }
    }

    fn letter(self) -> u8 {
        match self {
            Version::B => b'B',
            Version::D => b'D',
        }
    }
}

/// The key usage: two characters (letters and digits) naming what the key is
/// for. Values this crate names have constants; others pass through unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyUsage([u8; 2]);

impl KeyUsage {
    /// `B0`: base derivation key (DUKPT).
    pub const BDK: KeyUsage = KeyUsage(*b"B0");
    /// `D0`: symmetric data encryption key.
    pub const DATA_ENCRYPTION: KeyUsage = KeyUsage(*b"D0");
    /// `K0`: key encryption or wrapping key (a ZMK).
    pub const KEY_ENCRYPTION: KeyUsage = KeyUsage(*b"K0");
    /// `K1`: TR-31 key block protection key.
    pub const KEY_BLOCK_PROTECTION: KeyUsage = KeyUsage(*b"K1");
    /// `M1`: ISO 9797-1 MAC algorithm 1.
    pub const MAC_ISO9797_1_ALGORITHM_1: KeyUsage = KeyUsage(*b"M1");
    /// `M3`: ISO 9797-1 MAC algorithm 3 (the retail MAC).
    pub const MAC_ISO9797_1_ALGORITHM_3: KeyUsage = KeyUsage(*b"M3");
    /// `M6`: ISO 9797-1:2011 MAC algorithm 5 (CMAC).
    pub const MAC_CMAC: KeyUsage = KeyUsage(*b"M6");
    /// `P0`: PIN encryption key.
    pub const PIN_ENCRYPTION: KeyUsage = KeyUsage(*b"P0");

    /// A usage from its two characters (ASCII letters or digits).
    pub fn new(text: &str) -> Option<KeyUsage> {
        let b = text.as_bytes();
        (b.len() == 2 && b.iter().all(u8::is_ascii_alphanumeric)).then(|| KeyUsage([b[0], b[1]]))
    }

    /// The two characters.
    pub fn as_str(&self) -> &str {
        // Only ASCII letters and digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl std::fmt::Debug for KeyUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyUsage({})", self.as_str())
    }
}

impl std::fmt::Display for KeyUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeOfUse {
    /// `B`: encrypt and decrypt (wrap and unwrap).
    EncryptDecrypt,
    /// `C`: generate and verify (MACs).
    GenerateVerify,
    /// `D`: decrypt (unwrap) only.
    DecryptOnly,
    /// `E`: encrypt (wrap) only.
    EncryptOnly,
    /// `G`: generate only.
    GenerateOnly,
    /// `N`: no restriction beyond the key usage.
    NoRestriction,
    /// `S`: signature only.
    SignatureOnly,
    /// `T`: sign and decrypt.
    SignDecrypt,
    /// `V`: verify only.
    VerifyOnly,
    /// `X`: derive other keys.
    Derive,
    /// `Y`: create key variants.
    Variant,
}

const MODES_OF_USE: [(u8, ModeOfUse); 11] = [
    (b'B', ModeOfUse::EncryptDecrypt),
    (b'C', ModeOfUse::GenerateVerify),
    (b'D', ModeOfUse::DecryptOnly),
    (b'E', ModeOfUse::EncryptOnly),
    (b'G', ModeOfUse::GenerateOnly),
    (b'N', ModeOfUse::NoRestriction),
    (b'S', ModeOfUse::SignatureOnly),
    (b'T', ModeOfUse::SignDecrypt),
    (b'V', ModeOfUse::VerifyOnly),
    (b'X', ModeOfUse::Derive),
    (b'Y', ModeOfUse::Variant),
];

impl ModeOfUse {
    fn from_letter(c: u8) -> Option<ModeOfUse> {
        MODES_OF_USE.iter().find(|(l, _)| *l == c).map(|(_, m)| *m)
    }

    fn letter(self) -> u8 {
        MODES_OF_USE
            .iter()
            .find(|(_, m)| *m == self)
            .map_or(b'N', |(l, _)| *l)
    }
}

/// Whether the key may leave the receiving device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exportability {
    /// `E`: exportable under a trusted key.
    Trusted,
    /// `N`: not exportable.
    None,
    /// `S`: sensitive; exportable under an untrusted key.
    Sensitive,
}

impl Exportability {
    fn from_letter(c: u8) -> Option<Exportability> {
        match c {
            b'E' => Some(Exportability::Trusted),
            b'N' => Some(Exportability::None),
            b'S' => Some(Exportability::Sensitive),
            _ => None,
        }
    }

    fn letter(self) -> u8 {
        match self {
            Exportability::Trusted => b'E',
            Exportability::None => b'N',
            Exportability::Sensitive => b'S',
        }
    }
}

/// One optional header block (its id and printable data). Pad blocks (`PB`) are
/// dropped when parsing and added when wrapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionalBlock {
    /// Two letters or digits, e.g. `KS` (key set identifier), `KV` (version).
    pub id: [u8; 2],
    /// Printable ASCII.
    pub data: String,
}

/// A key block header: the key's attributes, bound to it by the MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// How the block is protected.
    pub version: Version,
    /// What the key is for.
    pub key_usage: KeyUsage,
    /// The key's algorithm (`T` or `A`; others are refused).
    pub algorithm: Algorithm,
    /// What the key may do.
    pub mode_of_use: ModeOfUse,
    /// Two letters or digits; `00`: key versions not used.
    pub key_version: [u8; 2],
    /// Whether the key may be exported again.
    pub exportability: Exportability,
    /// Optional blocks, in order, without pad blocks.
    pub optional_blocks: Vec<OptionalBlock>,
}

impl Header {
    /// A header without a key version or optional blocks.
    pub fn new(
        version: Version,
        key_usage: KeyUsage,
        algorithm: Algorithm,
        mode_of_use: ModeOfUse,
        exportability: Exportability,
    ) -> Header {
        Header {
            version,
            key_usage,
            algorithm,
            mode_of_use,
            key_version: *b"00",
            exportability,
            optional_blocks: Vec::new(),
        }
    }
}

// === Errors ===

/// Why a key block was refused, or could not be made. Offsets count characters
/// from the start of the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Tr31Error {
    /// Longer than [`KEY_BLOCK_LENGTH_MAX_CHARS`].
    #[error("key block is {length} characters; at most {max}")]
    TooLong {
        /// Characters given (or that wrapping would make).
        length: usize,
        /// The bound.
        max: usize,
    },
    /// Shorter than a header.
    #[error("key block is {length} characters; a header alone is {HEADER_FIXED_CHARS}")]
    TooShort {
        /// Characters given.
        length: usize,
    },
    /// A byte that is not printable ASCII.
    #[error("byte {byte:#04x} at offset {offset} is not printable ASCII")]
    NotPrintable {
        /// Where.
        offset: usize,
        /// The byte.
        byte: u8,
    },
    /// A version other than B or D.
    #[error("version {found:?} at offset 0 is not supported (B or D)")]
    Version {
        /// The character found.
        found: char,
    },
    /// The length field is not 4 digits.
    #[error("length field at offset 1 is not 4 decimal digits")]
    LengthField,
    /// The length field disagrees with the text's length.
    #[error("length field at offset 1 says {declared} characters; the block has {actual}")]
    LengthMismatch {
        /// What the field says.
        declared: usize,
        /// The text's length.
        actual: usize,
    },
    /// The block is not a whole number of cipher blocks.
    #[error("key block length {length} is not a multiple of {block} (version {version:?})")]
    NotBlockMultiple {
        /// The length, characters.
        length: usize,
        /// The version's cipher block, bytes.
        block: usize,
        /// The version.
        version: Version,
    },
    /// A header field holds a value it may not.
    #[error("{field} at offset {offset}: {found:?} is not {expected}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// Where.
        offset: usize,
        /// The first offending character.
        found: char,
        /// What it may be.
        expected: &'static str,
    },
    /// An optional block is malformed.
    #[error("optional block {index} at offset {offset}: {reason}")]
    OptionalBlock {
        /// Its position among the optional blocks, from 0.
        index: usize,
        /// Where the fault is.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The header (with its optional blocks) is not a whole number of cipher
    /// blocks.
    #[error("header ends at offset {length}, not a multiple of {block}")]
    HeaderNotBlockMultiple {
        /// The header's length, characters.
        length: usize,
        /// The cipher block, bytes.
        block: usize,
    },
    /// Not an uppercase hex digit where the payload or MAC is.
    #[error("{field} at offset {offset}: {found:?} is not an uppercase hex digit")]
    Hex {
        /// "payload" or "MAC".
        field: &'static str,
        /// Where.
        offset: usize,
        /// The character found.
        found: char,
    },
    /// The enciphered payload is empty, or not whole cipher blocks.
    #[error("payload at offset {offset} is {length} characters; expected a positive multiple of {block_chars}")]
    PayloadLength {
        /// Where the payload starts.
        offset: usize,
        /// Its length, characters.
        length: usize,
        /// Characters per cipher block.
        block_chars: usize,
    },
    /// The KBPK's algorithm does not protect this version.
    #[error("a {kbpk:?} KBPK cannot protect a version {version:?} key block")]
    Kbpk {
        /// The KBPK's algorithm.
        kbpk: Algorithm,
        /// The block's version.
        version: Version,
    },
    /// The MAC does not verify: a wrong KBPK, or an altered block.
    #[error("key block MAC does not verify (wrong KBPK, or the block was altered)")]
    Mac,
    /// After the MAC verified, the key length in the payload is impossible.
    #[error("key length {bits} bits in the payload does not fit a {payload_bytes}-byte payload")]
    KeyLength {
        /// The length field, bits.
        bits: usize,
        /// The payload's length, bytes.
        payload_bytes: usize,
    },
    /// The key's length does not fit the header's algorithm.
    #[error("a {algorithm:?} key cannot be {length} bytes")]
    KeyAlgorithm {
        /// The header's algorithm.
        algorithm: Algorithm,
        /// The key's length, bytes.
        length: usize,
    },
    /// Wrapping: the key is not of the header's algorithm.
    #[error("header says {header:?}; the key is {key:?}")]
    AlgorithmMismatch {
        /// The header's algorithm.
        header: Algorithm,
        /// The key's algorithm.
        key: Algorithm,
    },
    /// Wrapping: the padding does not make whole cipher blocks.
    #[error("{pad} pad bytes leave the payload short of a whole cipher block")]
    Padding {
        /// Pad bytes given.
        pad: usize,
    },
}

// === Parsing ===

/// A structurally valid key block, borrowed: what [`parse`] found.
#[derive(Debug)]
pub struct Parsed<'a> {
    /// The header's fields.
    pub header: Header,
    /// The header's text (fixed part and optional blocks): MACed as it stands.
    pub header_text: &'a str,
    /// The enciphered payload, hex.
    pub payload_hex: &'a str,
    /// The MAC, hex.
    pub mac_hex: &'a str,
}

/// Checks a key block's structure and reads its header, without any key: every
/// bound and field, the optional blocks, the payload's and MAC's hex.
pub fn parse(block: &str) -> Result<Parsed<'_>, Tr31Error> {
    let text = block.as_bytes();
    if text.len() > KEY_BLOCK_LENGTH_MAX_CHARS {
        return Err(Tr31Error::TooLong {
            length: text.len(),
            max: KEY_BLOCK_LENGTH_MAX_CHARS,
        });
    }
    if let Some(offset) = text.iter().position(|b| !(b' '..=b'~').contains(b)) {
        return Err(Tr31Error::NotPrintable {
            offset,
            byte: text[offset],
        });
    }
    if text.len() < HEADER_FIXED_CHARS {
        return Err(Tr31Error::TooShort { length: text.len() });
    }
    let version = match text[0] {
        b'B' => Version::B,
        b'D' => Version::D,
        other => {
            return Err(Tr31Error::Version {
                found: char::from(other),
            })
        }
    };
    let declared = decimal(&text[1..5]).ok_or(Tr31Error::LengthField)?;
    if declared != text.len() {
        return Err(Tr31Error::LengthMismatch {
            declared,
            actual: text.len(),
        });
    }
    let block_bytes = version.block_bytes();
    if text.len() % block_bytes != 0 {
        return Err(Tr31Error::NotBlockMultiple {
            length: text.len(),
            block: block_bytes,
            version,
        });
    }
    let (header, header_len) = parse_header_fields(text, version)?;
    let mac_chars = version.mac_bytes() * 2;
    let rest = text.len() - header_len;
    let block_chars = block_bytes * 2;
    if rest <= mac_chars || (rest - mac_chars) % block_chars != 0 {
        return Err(Tr31Error::PayloadLength {
            offset: header_len,
            length: rest.saturating_sub(mac_chars),
            block_chars,
        });
    }
    let mac_at = text.len() - mac_chars;
    check_hex(text, header_len, mac_at, "payload")?;
    check_hex(text, mac_at, text.len(), "MAC")?;
    // All ASCII, so every index is a char boundary.
    Ok(Parsed {
        header,
        header_text: &block[..header_len],
        payload_hex: &block[header_len..mac_at],
        mac_hex: &block[mac_at..],
    })
}

/// The fixed fields and the optional blocks: the header and its length.
fn parse_header_fields(text: &[u8], version: Version) -> Result<(Header, usize), Tr31Error> {
    let field = |field, offset: usize, expected| Tr31Error::Field {
        field,
        offset,
        found: char::from(text[offset]),
        expected,
    };
    let alnum = |from: usize, name| match text[from..from + 2]
        .iter()
        .position(|b| !b.is_ascii_alphanumeric())
    {
        Some(i) => Err(field(name, from + i, "a letter or digit")),
        None => Ok([text[from], text[from + 1]]),
    };
    let key_usage = KeyUsage(alnum(5, "key usage")?);
    let algorithm = match text[7] {
        b'T' => Algorithm::Tdes,
        b'A' => Algorithm::Aes,
        _ => return Err(field("algorithm", 7, "T (TDES) or A (AES)")),
    };
    let mode_of_use = ModeOfUse::from_letter(text[8])
        .ok_or_else(|| field("mode of use", 8, "one of B C D E G N S T V X Y"))?;
    let key_version = alnum(9, "key version number")?;
    let exportability = Exportability::from_letter(text[11])
        .ok_or_else(|| field("exportability", 11, "E, N or S"))?;
    let count = match decimal(&text[12..14]) {
        Some(n) => n,
        None => {
            let at = if text[12].is_ascii_digit() { 13 } else { 12 };
            return Err(field("optional block count", at, "a decimal digit"));
        }
    };
    if let Some(i) = text[14..16].iter().position(|b| *b != b'0') {
        return Err(field("reserved field", 14 + i, "0"));
    }
    let (optional_blocks, header_len) = parse_optional_blocks(text, count)?;
    let block_bytes = version.block_bytes();
    if header_len % block_bytes != 0 {
        return Err(Tr31Error::HeaderNotBlockMultiple {
            length: header_len,
            block: block_bytes,
        });
    }
    let header = Header {
        version,
        key_usage,
        algorithm,
        mode_of_use,
        key_version,
        exportability,
        optional_blocks,
    };
    Ok((header, header_len))
}

/// `count` optional blocks from offset 16: the blocks (pad blocks dropped) and
/// where the header ends.
fn parse_optional_blocks(
    text: &[u8],
    count: usize,
) -> Result<(Vec<OptionalBlock>, usize), Tr31Error> {
    let mut blocks = Vec::new();
    let mut at = HEADER_FIXED_CHARS;
    for index in 0..count {
        let start = at;
        let fault = |offset, reason| Tr31Error::OptionalBlock {
            index,
            offset,
            reason,
        };
        let id = text
            .get(at..at + 2)
            .filter(|id| id.iter().all(u8::is_ascii_alphanumeric))
            .ok_or(fault(at, "id is not 2 letters or digits"))?;
        let id = [id[0], id[1]];
        at += 2;
        let mut length = text
            .get(at..at + 2)
            .and_then(hex_value)
            .ok_or(fault(at, "length is not 2 hex digits"))?;
        at += 2;
        if length == 0 {
            // Extended length: a length of length (bytes), then the length.
            let of = text
                .get(at..at + 2)
                .and_then(hex_value)
                .filter(|n| (1..=OPTIONAL_BLOCK_LENGTH_OF_LENGTH_MAX_BYTES).contains(n))
                .ok_or(fault(at, "length of length is not 01 or 02"))?;
            at += 2;
            length = text
                .get(at..at + 2 * of)
                .and_then(hex_value)
                .ok_or(fault(at, "extended length is not hex digits"))?;
            at += 2 * of;
        }
        // The length counts the whole block: id, length fields and data.
        let end = start
            .checked_add(length)
            .filter(|end| *end >= at)
            .ok_or(fault(
                start,
                "length is shorter than the block's own fields",
            ))?;
        let data = text
            .get(at..end)
            .ok_or(fault(start, "length runs past the end of the key block"))?;
        if id != *b"PB" {
            blocks.push(OptionalBlock {
                id,
                // Printable ASCII, checked for the whole block.
                data: String::from_utf8_lossy(data).into_owned(),
            });
        }
        at = end;
    }
    Ok((blocks, at))
}

/// The decimal value of ASCII digits (at most 4 here), or `None`.
fn decimal(digits: &[u8]) -> Option<usize> {
    digits.iter().try_fold(0usize, |n, d| {
        d.is_ascii_digit().then(|| n * 10 + usize::from(d - b'0'))
    })
}

/// The value of (at most 4) uppercase or lowercase hex digits, or `None`.
fn hex_value(digits: &[u8]) -> Option<usize> {
    digits.iter().try_fold(0usize, |n, d| {
        char::from(*d).to_digit(16).map(|v| n * 16 + v as usize)
    })
}

fn check_hex(text: &[u8], from: usize, to: usize, field: &'static str) -> Result<(), Tr31Error> {
    match text[from..to].iter().position(|b| hex_nibble(*b).is_none()) {
        Some(i) => Err(Tr31Error::Hex {
            field,
            offset: from + i,
            found: char::from(text[from + i]),
        }),
        None => Ok(()),
    }
}

/// An uppercase hex digit's value.
fn hex_nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Checked uppercase hex to bytes (checked by [`parse`] before).
fn unhex_checked(hex: &str) -> Vec<u8> {
    hex.as_bytes()
        .chunks(2)
        .map(|p| {
            (hex_nibble(p[0]).unwrap_or(0) << 4)
                | hex_nibble(*p.get(1).unwrap_or(&b'0')).unwrap_or(0)
        })
        .collect()
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0F)]));
    }
}

// === Unwrap ===

/// The key in `block`, under `kbpk`, and its header. The MAC is verified before
/// the key length is read or anything is returned.
pub fn unwrap(kbpk: &Key, block: &str) -> Result<(Header, Key), Tr31Error> {
    let parsed = parse(block)?;
    let version = parsed.header.version;
    check_kbpk(kbpk, version)?;
    let (kbek, kbak) = derive(kbpk, version);
    let mac = unhex_checked(parsed.mac_hex);
    let mut payload = Zeroizing::new(unhex_checked(parsed.payload_hex));
    cbc_decrypt(&kbek, &mac, &mut payload);
    let want = mac_of(&kbak, parsed.header_text.as_bytes(), &payload);
    let diff = want.iter().zip(&mac).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 || want.len() != mac.len() {
        return Err(Tr31Error::Mac);
    }
    let bits = usize::from(u16::from_be_bytes([payload[0], payload[1]]));
    let length = bits / 8;
    if bits % 8 != 0 || length > payload.len() - 2 {
        return Err(Tr31Error::KeyLength {
            bits,
            payload_bytes: payload.len(),
        });
    }
    let algorithm = parsed.header.algorithm;
    let key = Key::new(algorithm, &payload[2..2 + length])
        .map_err(|_| Tr31Error::KeyAlgorithm { algorithm, length })?;
    Ok((parsed.header, key))
}

fn check_kbpk(kbpk: &Key, version: Version) -> Result<(), Tr31Error> {
    if kbpk.algorithm() == version.kbpk_algorithm() {
        Ok(())
    } else {
        Err(Tr31Error::Kbpk {
            kbpk: kbpk.algorithm(),
            version,
        })
    }
}

// === Wrap ===

/// `key` in a key block under `kbpk`, with `header`'s attributes (its version
/// must suit the KBPK: B for TDES, D for AES; its algorithm the key's). The
/// payload is padded with random bytes as for the longest key of the algorithm.
pub fn wrap(kbpk: &Key, header: &Header, key: &Key) -> Result<String, Tr31Error> {
    let masked = match key.algorithm() {
        Algorithm::Tdes => TDES_MASKED_KEY_BYTES,
        Algorithm::Aes => AES_MASKED_KEY_BYTES,
    }
    .max(key.bytes().len());
    let block = header.version.block_bytes();
    let unpadded = 2 + masked;
    let pad_len = masked - key.bytes().len() + (block - unpadded % block) % block;
    let mut pad = Zeroizing::new(vec![0u8; pad_len]);
    crate::pin::os_random(&mut pad);
    wrap_with_padding(kbpk, header, key, &pad)
}

/// [`wrap`] with the given pad bytes (after the key in the payload): for known
/// answers, whose padding is published. `2 + key length + pad length` must be a
/// whole number of cipher blocks.
pub fn wrap_with_padding(
    kbpk: &Key,
    header: &Header,
    key: &Key,
    pad: &[u8],
) -> Result<String, Tr31Error> {
    let version = header.version;
    check_kbpk(kbpk, version)?;
    if header.algorithm != key.algorithm() {
        return Err(Tr31Error::AlgorithmMismatch {
            header: header.algorithm,
            key: key.algorithm(),
        });
    }
    let block = version.block_bytes();
    let key_bytes = key.bytes();
    let mut payload = Zeroizing::new(Vec::with_capacity(2 + key_bytes.len() + pad.len()));
    let bits = u16::try_from(key_bytes.len() * 8).unwrap_or(u16::MAX);
    payload.extend_from_slice(&bits.to_be_bytes());
    payload.extend_from_slice(key_bytes);
    payload.extend_from_slice(pad);
    if payload.len() % block != 0 {
        return Err(Tr31Error::Padding { pad: pad.len() });
    }
    let mut text = header_text(header, payload.len())?;
    let (kbek, kbak) = derive(kbpk, version);
    let mac = mac_of(&kbak, text.as_bytes(), &payload);
    cbc_encrypt(&kbek, &mac, &mut payload);
    push_hex(&mut text, &payload);
    push_hex(&mut text, &mac);
    Ok(text)
}

/// The header's text, its length field counting a payload of `payload_bytes`
/// and the MAC; optional blocks padded with a `PB` block to whole cipher blocks.
fn header_text(header: &Header, payload_bytes: usize) -> Result<String, Tr31Error> {
    let block = header.version.block_bytes();
    let mut blocks = String::new();
    let mut count = 0usize;
    for (index, b) in header.optional_blocks.iter().enumerate() {
        let fault = |reason| Tr31Error::OptionalBlock {
            index,
            offset: HEADER_FIXED_CHARS + blocks.len(),
            reason,
        };
        if !b.id.iter().all(u8::is_ascii_alphanumeric) || b.id == *b"PB" {
            return Err(fault("id is not 2 letters or digits (nor PB)"));
        }
        if !b.data.bytes().all(|c| (b' '..=b'~').contains(&c)) {
            return Err(fault("data is not printable ASCII"));
        }
        if b.data.len() > KEY_BLOCK_LENGTH_MAX_CHARS {
            return Err(fault("data is longer than a key block"));
        }
        blocks.push(char::from(b.id[0]));
        blocks.push(char::from(b.id[1]));
        let short = b.data.len() + 4;
        if short <= 0xFF {
            blocks.push_str(&format!("{short:02X}"));
        } else {
            blocks.push_str(&format!("0002{:04X}", b.data.len() + 10));
        }
        blocks.push_str(&b.data);
        count += 1;
    }
    let rem = (HEADER_FIXED_CHARS + blocks.len()) % block;
    if rem != 0 {
        // A pad block: "PB", its length, then zeros up to the cipher block.
        let mut pad = block - rem;
        if pad < 4 {
            pad += block;
        }
        blocks.push_str(&format!("PB{pad:02X}"));
        blocks.extend(std::iter::repeat_n('0', pad - 4));
        count += 1;
    }
    if count > OPTIONAL_BLOCKS_MAX {
        return Err(Tr31Error::OptionalBlock {
            index: count - 1,
            offset: HEADER_FIXED_CHARS,
            reason: "more than 99 optional blocks",
        });
    }
    let length =
        HEADER_FIXED_CHARS + blocks.len() + 2 * payload_bytes + 2 * header.version.mac_bytes();
    if length > KEY_BLOCK_LENGTH_MAX_CHARS {
        return Err(Tr31Error::TooLong {
            length,
            max: KEY_BLOCK_LENGTH_MAX_CHARS,
        });
    }
    let h = header;
    let mut text = String::with_capacity(length);
    text.push(char::from(h.version.letter()));
    text.push_str(&format!("{length:04}"));
    text.push_str(h.key_usage.as_str());
    text.push(match h.algorithm {
        Algorithm::Tdes => 'T',
        Algorithm::Aes => 'A',
    });
    text.push(char::from(h.mode_of_use.letter()));
    if !h.key_version.iter().all(u8::is_ascii_alphanumeric) {
        return Err(Tr31Error::Field {
            field: "key version number",
            offset: 9,
            found: char::from(h.key_version[0]),
            expected: "a letter or digit",
        });
    }
    text.push(char::from(h.key_version[0]));
    text.push(char::from(h.key_version[1]));
    text.push(char::from(h.exportability.letter()));
    text.push_str(&format!("{count:02}00"));
    text.push_str(&blocks);
    Ok(text)
}

// === Cryptography ===

/// KBEK and KBAK from the KBPK: CMAC of the 8-byte derivation input per counter,
/// concatenated and cut to the KBPK's length.
fn derive(kbpk: &Key, version: Version) -> (Key, Key) {
    let len = kbpk.bytes().len();
    let (algorithm_code, cmac_bytes): (u16, usize) = match (version, len) {
        (Version::B, 16) => (0x0000, 8),
        (Version::B, _) => (0x0001, 8),
        (Version::D, 16) => (0x0002, 16),
        (Version::D, 24) => (0x0003, 16),
        (Version::D, _) => (0x0004, 16),
    };
    let bits = u16::try_from(len * 8).unwrap_or(u16::MAX);
    let derive_one = |usage: u16| {
        let mut material = Zeroizing::new(Vec::with_capacity(len + cmac_bytes));
        let mut counter = 1u8;
        while material.len() < len {
            let mut input = [0u8; 8];
            input[0] = counter;
            input[1..3].copy_from_slice(&usage.to_be_bytes());
            input[4..6].copy_from_slice(&algorithm_code.to_be_bytes());
            input[6..8].copy_from_slice(&bits.to_be_bytes());
            material.extend_from_slice(&cmac(kbpk, &[&input]));
            counter += 1;
        }
        // A KBPK's length always fits its own algorithm.
        Key::new(kbpk.algorithm(), &material[..len])
    };
    match (derive_one(0x0000), derive_one(0x0001)) {
        (Ok(kbek), Ok(kbak)) => (kbek, kbak),
        // Unreachable: `len` is the length of a valid key of this algorithm.
        _ => unreachable!("derived keys have the KBPK's length"),
    }
}

/// The key block MAC: CMAC under the KBAK of header and clear payload.
fn mac_of(kbak: &Key, header: &[u8], payload: &[u8]) -> Vec<u8> {
    cmac(kbak, &[header, payload]).to_vec()
}

/// CMAC (NIST SP 800-38B) of the concatenated parts, under a TDES or AES key.
fn cmac(key: &Key, parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
    macro_rules! with {
        ($cipher:ty) => {{
            match <Cmac<$cipher> as cmac::KeyInit>::new_from_slice(key.bytes()) {
                Ok(mut mac) => {
                    for p in parts {
                        mac.update(p);
                    }
                    Zeroizing::new(mac.finalize().into_bytes().to_vec())
                }
                // Key lengths are checked when a Key is made.
                Err(_) => Zeroizing::new(Vec::new()),
            }
        }};
    }
    match (key.algorithm(), key.bytes().len()) {
        (Algorithm::Tdes, 16) => with!(des::TdesEde2),
        (Algorithm::Tdes, _) => with!(des::TdesEde3),
        (Algorithm::Aes, 16) => with!(aes::Aes128),
        (Algorithm::Aes, 24) => with!(aes::Aes192),
        (Algorithm::Aes, _) => with!(aes::Aes256),
    }
}

/// CBC encryption in place (whole blocks), initial vector `iv`.
fn cbc_encrypt(key: &Key, iv: &[u8], data: &mut [u8]) {
    let n = iv.len();
    let mut chain = Zeroizing::new(iv.to_vec());
    for block in data.chunks_mut(n) {
        for (b, c) in block.iter_mut().zip(chain.iter()) {
            *b ^= c;
        }
        cipher_ops::encrypt(key, block);
        chain.copy_from_slice(block);
    }
}

/// CBC decryption in place (whole blocks), initial vector `iv`.
fn cbc_decrypt(key: &Key, iv: &[u8], data: &mut [u8]) {
    let n = iv.len();
    let mut chain = iv.to_vec();
    let mut next = vec![0u8; n];
    for block in data.chunks_mut(n) {
        next.copy_from_slice(block);
        cipher_ops::decrypt(key, block);
        for (b, c) in block.iter_mut().zip(chain.iter()) {
            *b ^= c;
        }
        std::mem::swap(&mut chain, &mut next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unhex;

    fn key(alg: Algorithm, hex: &str) -> Key {
        Key::new(alg, &unhex(hex)).unwrap()
    }

    fn bytes_of(k: &Key) -> Vec<u8> {
        k.bytes().to_vec()
    }

    /// Published blocks: TR-31:2018 annex A (A.7.2.2, A.7.3.2, A.7.4), ANSI
    /// X9.143-2022 section 8.1 (= ISO 20038 B.1), and blocks a Thales payShield
    /// 10k made (as published with the openemv/tr31 tests).
    const PUBLISHED: [(Algorithm, &str, &str, Algorithm, &str); 6] = [
        (
            Algorithm::Tdes,
            "DD7515F2BFC17F85CE48F3CA25CB21F6",
            "B0080P0TE00E000094B420079CC80BA3461F86FE26EFC4A3B8E4FA4C5F5341176EED7B727B8A248E",
            Algorithm::Tdes,
            "3F419E1CB7079442AA37474C2EFBF8B8",
        ),
        (
            Algorithm::Tdes,
            "1D22BF32387C600AD97F9B97A51311AC",
            "B0104B0TX12S0100KS1800604B120F9292800000BB68BE8680A400D9191AD4ECE45B6E6C0D21C4738A52190E248719E24B433627",
            Algorithm::Tdes,
            "E8BC63E5479455E26577F715D587FE68",
        ),
        (
            Algorithm::Tdes,
            "EFE0853B256B583D868F251CE99EA1D9",
            "B0080K0TN00N00001C414014375212C24995E405B5EE052CB92B67F455EA2680F6751088F9F1C228",
            Algorithm::Tdes,
            "5DB50B454F8389ADCE573BE50861F2BF",
        ),
        (
            Algorithm::Aes,
            "88E1AB2A2E3DD38C1FA039A536500CC8A87AB9D62DC92C01058FA79F44657DE6",
            "D0112P0AE00E0000B82679114F470F540165EDFBF7E250FCEA43F810D215F8D207E2E417C07156A27E8E31DA05F7425509593D03A457DC34",
            Algorithm::Aes,
            "3F419E1CB7079442AA37474C2EFBF8B8",
        ),
        (
            Algorithm::Aes,
            "88E1AB2A2E3DD38C1FA039A536500CC8A87AB9D62DC92C01058FA79F44657DE6",
            "D0144P0AE00E00002C77FA3F4A553BED6E88AE5C172A4166E3D4ACA8E2AC71C158A476FAC12C13C3829DE55D3AB54C48F4C4FEF7AC75E90FC47F1B77E7B19A73ED46E64410082557",
            Algorithm::Aes,
            "3F419E1CB7079442AA37474C2EFBF8B8",
        ),
        (
            Algorithm::Aes,
            "4141414141414141414141414141414141414141414141414141414141414141",
            "D0112B0TN00N000037DB9B046B7B0048785690759580ABC3B9842AB4BB7717B49E92528E575785D8123559376A2553B27BE94F054F4E971C",
            Algorithm::Tdes,
            "1FA1F7CEC798D91545DA8AE0C7796BD9",
        ),
    ];

    #[test]
    fn published_blocks_unwrap_to_their_keys() {
        for (kbpk_alg, kbpk, block, key_alg, want) in PUBLISHED {
            let (header, got) = unwrap(&key(kbpk_alg, kbpk), block).expect(block);
            assert_eq!(header.algorithm, key_alg, "{block}");
            assert_eq!(bytes_of(&got), unhex(want), "{block}");
        }
        let (header, _) = unwrap(&key(PUBLISHED[1].0, PUBLISHED[1].1), PUBLISHED[1].2).unwrap();
        assert_eq!(header.key_usage, KeyUsage::BDK);
        assert_eq!(header.mode_of_use, ModeOfUse::Derive);
        assert_eq!(header.key_version, *b"12");
        assert_eq!(header.exportability, Exportability::Sensitive);
        assert_eq!(
            header.optional_blocks,
            vec![OptionalBlock {
                id: *b"KS",
                data: "00604B120F9292800000".to_owned()
            }]
        );
    }

    #[test]
    fn published_blocks_are_remade_from_their_padding() {
        // TR-31:2018 A.7.4 and X9.143-2022 8.1 publish their padding; for the
        // others, the padding is read back from the block itself.
        let aes_kbpk = key(Algorithm::Aes, PUBLISHED[3].1);
        let header = Header::new(
            Version::D,
            KeyUsage::PIN_ENCRYPTION,
            Algorithm::Aes,
            ModeOfUse::EncryptOnly,
            Exportability::Trusted,
        );
        let k = key(Algorithm::Aes, PUBLISHED[3].4);
        let pad = unhex("1C2965473CE206BB855B01533782");
        assert_eq!(
            wrap_with_padding(&aes_kbpk, &header, &k, &pad).unwrap(),
            PUBLISHED[3].2
        );
        let pad = unhex("1A87BBFA2CFE78D383E5F4C6AA83473C1C2965473CE206BB855B01533782");
        assert_eq!(
            wrap_with_padding(&aes_kbpk, &header, &k, &pad).unwrap(),
            PUBLISHED[4].2
        );
        for (kbpk_alg, kbpk, block, _, _) in PUBLISHED {
            let kbpk = key(kbpk_alg, kbpk);
            let (header, k) = unwrap(&kbpk, block).unwrap();
            let pad = padding_of(&kbpk, block, k.bytes().len());
            assert_eq!(wrap_with_padding(&kbpk, &header, &k, &pad).unwrap(), block);
        }
    }

    /// The pad bytes of a block (deciphered with the derived KBEK).
    fn padding_of(kbpk: &Key, block: &str, key_len: usize) -> Vec<u8> {
        let p = parse(block).unwrap();
        let (kbek, _) = derive(kbpk, p.header.version);
        let mut payload = unhex_checked(p.payload_hex);
        cbc_decrypt(&kbek, &unhex_checked(p.mac_hex), &mut payload);
        payload[2 + key_len..].to_vec()
    }

    #[test]
    fn wrap_then_unwrap_every_key_length_both_versions() {
        let kbpks = [
            key(Algorithm::Tdes, "0123456789ABCDEFFEDCBA9876543210"),
            key(
                Algorithm::Tdes,
                "0123456789ABCDEFFEDCBA98765432100123456789ABCDEF",
            ),
            key(Algorithm::Aes, "000102030405060708090A0B0C0D0E0F"),
            key(
                Algorithm::Aes,
                "000102030405060708090A0B0C0D0E0F1011121314151617",
            ),
            key(
                Algorithm::Aes,
                "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F",
            ),
        ];
        for kbpk in &kbpks {
            for (alg, len) in [
                (Algorithm::Tdes, 16),
                (Algorithm::Tdes, 24),
                (Algorithm::Aes, 16),
                (Algorithm::Aes, 32),
            ] {
                let k = Key::random(alg, len).unwrap();
                let mut header = Header::new(
                    Version::for_kbpk(kbpk.algorithm()),
                    KeyUsage::KEY_ENCRYPTION,
                    alg,
                    ModeOfUse::EncryptDecrypt,
                    Exportability::None,
                );
                header.optional_blocks.push(OptionalBlock {
                    id: *b"KV",
                    data: "00604B120F9292800000".to_owned(),
                });
                let block = wrap(kbpk, &header, &k).unwrap();
                let (h, back) = unwrap(kbpk, &block).unwrap();
                assert_eq!(h, header);
                assert_eq!(bytes_of(&back), bytes_of(&k));
                // Masked: every key of an algorithm makes a block of one length.
                let other = Key::random(alg, if alg == Algorithm::Tdes { 24 } else { 32 }).unwrap();
                assert_eq!(wrap(kbpk, &header, &other).unwrap().len(), block.len());
            }
        }
    }

    #[test]
    fn refusals_name_what_and_where() {
        let (kbpk_alg, kbpk, block, _, _) = PUBLISHED[0];
        let kbpk = key(kbpk_alg, kbpk);
        let with = |at: usize, c: &str| {
            let mut s = block.to_owned();
            s.replace_range(at..at + c.len(), c);
            s
        };
        let cases: Vec<(String, Tr31Error)> = vec![
            (String::new(), Tr31Error::TooShort { length: 0 }),
            (with(0, "C"), Tr31Error::Version { found: 'C' }),
            (with(2, "X"), Tr31Error::LengthField),
            (
                with(1, "0072"),
                Tr31Error::LengthMismatch {
                    declared: 72,
                    actual: 80,
                },
            ),
            (
                with(7, "R"),
                Tr31Error::Field {
                    field: "algorithm",
                    offset: 7,
                    found: 'R',
                    expected: "T (TDES) or A (AES)",
                },
            ),
            (
                with(8, "Q"),
                Tr31Error::Field {
                    field: "mode of use",
                    offset: 8,
                    found: 'Q',
                    expected: "one of B C D E G N S T V X Y",
                },
            ),
            (
                with(11, "X"),
                Tr31Error::Field {
                    field: "exportability",
                    offset: 11,
                    found: 'X',
                    expected: "E, N or S",
                },
            ),
            (
                with(15, "1"),
                Tr31Error::Field {
                    field: "reserved field",
                    offset: 15,
                    found: '1',
                    expected: "0",
                },
            ),
            (
                with(20, "g"),
                Tr31Error::Hex {
                    field: "payload",
                    offset: 20,
                    found: 'g',
                },
            ),
            (
                with(79, "x"),
                Tr31Error::Hex {
                    field: "MAC",
                    offset: 79,
                    found: 'x',
                },
            ),
            (with(20, "0"), Tr31Error::Mac),
            (with(5, "P1"), Tr31Error::Mac),
            (
                with(13, "1"),
                Tr31Error::OptionalBlock {
                    index: 0,
                    offset: 16,
                    reason: "length runs past the end of the key block",
                },
            ),
            (
                with(30, "\u{7f}"),
                Tr31Error::NotPrintable {
                    offset: 30,
                    byte: 0x7f,
                },
            ),
            (
                "B".repeat(9993),
                Tr31Error::TooLong {
                    length: 9993,
                    max: 9992,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(unwrap(&kbpk, &text).err(), Some(want), "{text}");
        }
        let aes = key(Algorithm::Aes, "000102030405060708090A0B0C0D0E0F");
        assert_eq!(
            unwrap(&aes, block).err(),
            Some(Tr31Error::Kbpk {
                kbpk: Algorithm::Aes,
                version: Version::B
            })
        );
        // Each refusal prints where.
        let e = unwrap(&kbpk, &with(8, "Q")).unwrap_err().to_string();
        assert!(e.contains("offset 8"), "{e}");
    }

    #[test]
    fn no_prefix_or_corruption_panics() {
        for (kbpk_alg, kbpk, block, _, _) in PUBLISHED {
            let kbpk = key(kbpk_alg, kbpk);
            for end in 0..block.len() {
                assert!(unwrap(&kbpk, &block[..end]).is_err());
            }
            for at in 0..block.len() {
                for c in ['0', 'F', 'Z', ' ', 'p'] {
                    let mut s = block.to_owned();
                    s.replace_range(at..at + 1, &c.to_string());
                    if s != block {
                        assert!(unwrap(&kbpk, &s).is_err(), "{s}");
                    }
                }
            }
        }
    }
}
