//! A client for the Thales payShield host-command protocol ([`PayShieldModule`]):
//! the [`SecurityModule`] of banks that keep their keys in a hardware HSM.
//!
//! On a payShield the keys live as *tokens*: each key enciphered under the HSM's
//! local master key (LMK), as a key block (`S` + block) or, for TDES keys under
//! a variant LMK, as `U`/`X` + 32 hex or `T`/`Y` + 48 hex digits. A token is not
//! secret without the LMK, but it is the key as far as the HSM is concerned, so
//! it is never logged or printed (`Debug` shows ids and check values only). The
//! switch names keys by id ([`PayShieldKey`]); the module sends the tokens with
//! every command and the HSM does the cryptography.
//!
//! # Framing
//!
//! Every message, both ways, is a 2-byte big-endian length of what follows, a
//! header of [`PayShieldConfig::header_len`] characters (the HSM's configured
//! header length) that the HSM echoes unchanged, a 2-character command code,
//! and the fields. The answer's code is the command's with its second letter
//! advanced by one (`CC` → `CD`), then a 2-character error code (`00`: none),
//! then the answer's fields when the error code is `00`. The header is a
//! decimal request counter, so an answer that is not to this request is
//! refused; each connection carries one request at a time.
//!
//! # Commands and their layouts
//!
//! Field notation as in the Host Command Reference: `n N` digits, `n H` hex,
//! `n A` characters; *token* is a key token as above (self-delimiting: a key
//! block states its length at offset 2 of the token).
//!
//! * `NC` perform diagnostics: no fields. Answer `ND`: LMK check value 16 H,
//!   firmware number 9 A.
//! * `BU` generate a key check value: key type code `FF`, key length flag 1 N
//!   (`1` double, `2` triple; `F` for a key block), token, `;`, key type 3 H,
//!   `;`, two reserved `0`, KCV type `1` (6 H). Answer `BV`: KCV 6 H.
//! * `CC` translate a PIN from one ZPK to another: source token, destination
//!   token, maximum PIN length `12`, source PIN block 16 H (32 H under an AES
//!   key), source format 2 N, destination format 2 N, account number. Answer
//!   `CD`: PIN length 2 N, destination PIN block 16 H or 32 H, destination
//!   format 2 N.
//! * `M6` generate a MAC: mode flag `0` (only block), input format `0`
//!   (binary), MAC size `1` (16 H), MAC algorithm 1 N (`3` ISO 9797-1
//!   algorithm 3, `6` AES-CMAC), padding method 1 N (`1` ISO 9797 method 1 for
//!   algorithm 3, `0` for CMAC), key type 3 H (`008` ZAK, `FFF` key block),
//!   token, message length 4 H, message n B. Answer `M7`: MAC 16 H.
//! * `M8` verify a MAC: as `M6` but MAC size `0` (8 H) or `1` (16 H), and the
//!   MAC after the message. Answer `M9`: no fields; error `01` when the MAC
//!   does not verify.
//! * `A0` generate a key and export it under a ZMK: mode `1`, key type `FFF`,
//!   key scheme (LMK) `S`, ZMK token, key scheme (ZMK) `R` (TR-31), `#`, key
//!   usage 2 A (`P0`, `M3`, `M6`), algorithm 2 A (`T2` `T3` `A1` `A2` `A3`),
//!   mode of use 1 A (`B`, `C`), key version number `00`, exportability `E`,
//!   optional blocks `00`. Answer `A1`: key under LMK (token), key under ZMK
//!   (`R` + TR-31 block), KCV 6 H.
//!
//! PIN block format codes: `01` ISO 0, `05` ISO 1, `47` ISO 3, `48` ISO 4. The
//! account number is the 12 rightmost PAN digits before the check digit (12
//! zeros when only format 1 is involved, which uses no PAN); when either
//! format is 48 it is the whole PAN instead, as its length 2 N and 1 to 19 N.
//!
//! **What is taken from the reference and what is not.** The `CC`, `NC`, `A0`
//! (variant form) and `BU` layouts and their error codes follow published
//! payShield host command pages; the `M6`/`M8` field order follows the
//! payShield 9000 reference (its 1 N MAC algorithm and the MAC size field as
//! in later releases). The key-block forms (`FFF` key types, the `#`
//! attributes of `A0`, `R` export, the `F` length flag of `BU`), MAC algorithm
//! `6` for AES-CMAC and the format-48 account field are this module's reading
//! of the payShield 10K documentation, not checked against a device: check
//! them against the Host Command Reference of the firmware in use before
//! production. The test double (module `responder`, feature `responder`)
//! speaks exactly these layouts.
//!
//! # Error codes
//!
//! | code | payShield meaning | [`ModuleError`] |
//! |---|---|---|
//! | `01` | verification failure (`M8`) | `Mac(Mismatch)` |
//! | `02` `04` `05` | key length, key type code, key length flag | `Usage` |
//! | `10` `11` | source / destination key parity error | `Usage` (that key) |
//! | `12` `13` `21` | no keys in user storage, LMK error, storage index | `Unavailable` |
//! | `15` `80` | error in input data, data length error | `Unavailable` |
//! | `17` | not in the authorised state | `Unavailable` |
//! | `20` `24` | PIN block not valid, PIN not 4 to 12 digits | `Pin(Block)` |
//! | `22` | invalid account number | `Pin(Pan)` |
//! | `23` | invalid PIN block format code | `Pin(Key)` |
//! | `26` `27` `28` `29` | key scheme, key length, key type, key function not permitted | `Usage` |
//! | `40` `41` `42` | firmware, hardware, cryptographic failure | `Unavailable` |
//! | `47` `51` | algorithm not licensed, invalid message header | `Unavailable` |
//! | `67` `68` `69` | command not licensed or disabled, format disabled | `Unavailable` |
//! | `A1`…`BD` | key block errors (authentication, usage, mode of use, …) | `Usage` |
//! | other | | `Unavailable` |
//!
//! Transport and protocol failures (refused connection, timeout, a closed
//! connection, an answer too long, a wrong header or answer code, a malformed
//! field) are `Unavailable`, naming what was wrong where.
//!
//! # Connections
//!
//! A bounded pool of at most [`PayShieldConfig::connections_max`] blocking TCP
//! connections (optionally TLS, feature `tls`), opened on demand and kept for
//! reuse. When every connection is busy, a call is refused at once (counted in
//! [`PayShieldStats::busy`]), not queued. Every exchange has a deadline of
//! [`PayShieldConfig::timeout`] for connecting, writing and reading the whole
//! answer; a connection that failed or timed out is closed, never reused. A
//! reused connection that turns out closed before any answer byte (the HSM
//! restarted, or dropped an idle connection) is retried once on a new one.
//!
//! The calls block the calling thread for up to the timeout: from async code,
//! call them on a blocking pool, not on a runtime worker.
//!
//! # Rotation
//!
//! [`SecurityModule::stage`] asks the HSM for a new key (`A0`), keeps its LMK
//! token and returns its TR-31 block under the ZMK; `activate` puts that token
//! in use and `discard` drops it. As in the
//! [`SoftwareModule`], a MAC that does not
//! verify under the current token (`01` from `M8`) is tried under the staged
//! token and then the replaced one, and a PIN block that is not valid under the
//! current token (`20`) is tried under the replaced one.
//!
//! # Limits of this backend
//!
//! MACs of 4 to 8 bytes (the HSM returns 16 H); a longer AES-CMAC is refused as
//! a `Usage` error. MAC data up to [`MAC_DATA_MAX_BYTES`].

use crate::module::{
    KeyHandle, KeyInfo, MacAlgorithm, ModuleError, PinBlock, SecurityModule, SoftwareModule,
    StagedKey, Usage, KEYS_MAX,
};
use crate::pin::{Format, PinError};
use crate::{mac::MacError, Algorithm};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

// === Limits ===

/// The longest message header, characters.
pub const HEADER_LENGTH_MAX_CHARS: usize = 16;
/// The header length a payShield has by default, characters.
pub const HEADER_LENGTH_DEFAULT_CHARS: usize = 4;
/// The most connections one module may open.
pub const CONNECTIONS_MAX: usize = 64;
/// Connections opened by default.
pub const CONNECTIONS_DEFAULT: usize = 4;
/// The default deadline of one exchange (connect, write, read), milliseconds.
pub const TIMEOUT_DEFAULT_MS: u64 = 2_000;
/// The longest deadline accepted, milliseconds.
pub const TIMEOUT_MAX_MS: u64 = 60_000;
/// The longest key token, characters.
pub const TOKEN_LENGTH_MAX_CHARS: usize = 1024;
/// The most data one `M6`/`M8` carries, bytes.
pub const MAC_DATA_MAX_BYTES: usize = 16 * 1024;
/// The longest answer read (after its 2-byte length), bytes; a longer one
/// closes the connection unread.
pub const RESPONSE_SIZE_MAX_BYTES: usize = 4096;
/// The longest message the 2-byte length can state, bytes.
pub const FRAME_SIZE_MAX_BYTES: usize = u16::MAX as usize;

/// The largest MAC the HSM returns here (16 H), bytes.
const HSM_MAC_BYTES: usize = 8;

// === Config ===

/// Where the payShield is and which keys it holds for the switch.
#[derive(Clone, Debug)]
pub struct PayShieldConfig {
    /// Host command port of the HSM (commonly 1500).
    pub address: SocketAddr,
    /// Characters of message header the HSM is configured for (0 to
    /// [`HEADER_LENGTH_MAX_CHARS`]; default [`HEADER_LENGTH_DEFAULT_CHARS`]).
    pub header_len: usize,
    /// Deadline of one exchange: connecting, writing and reading the answer
    /// (up to [`TIMEOUT_MAX_MS`]).
    pub timeout: Duration,
    /// Most connections open at once (1 to [`CONNECTIONS_MAX`]); a call finding
    /// all of them busy is refused.
    pub connections_max: usize,
    /// The keys, by id (at most [`KEYS_MAX`]).
    pub keys: Vec<PayShieldKey>,
    /// TLS to the HSM; plain TCP when `None`.
    #[cfg(feature = "tls")]
    pub tls: Option<PayShieldTls>,
}

impl PayShieldConfig {
    /// A config for the HSM at `address` with the defaults and no keys.
    pub fn new(address: SocketAddr) -> PayShieldConfig {
        PayShieldConfig {
            address,
            header_len: HEADER_LENGTH_DEFAULT_CHARS,
            timeout: Duration::from_millis(TIMEOUT_DEFAULT_MS),
            connections_max: CONNECTIONS_DEFAULT,
            keys: Vec::new(),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// TLS to the HSM (payShield 10K host port over TLS).
#[cfg(feature = "tls")]
#[derive(Clone)]
pub struct PayShieldTls {
    /// The client config (roots, and a client certificate if the HSM asks).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the HSM's certificate must carry.
    pub server_name: rustls::pki_types::ServerName<'static>,
}

#[cfg(feature = "tls")]
impl std::fmt::Debug for PayShieldTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PayShieldTls({:?})", self.server_name)
    }
}

/// One key held by the HSM: its id in the switch, what it is for, and its token.
#[derive(Clone)]
pub struct PayShieldKey {
    /// The id the switch names it by.
    pub id: String,
    /// What it may be used for (checked here before any command is sent).
    pub usage: Usage,
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// Its length, bytes (16 or 24 TDES; 16, 24 or 32 AES): the length of the
    /// keys [`SecurityModule::stage`] generates for it.
    pub length_bytes: usize,
    /// The key under the LMK, as the HSM gave it. Never logged.
    pub token: String,
    /// Its check value, as recorded when it was loaded ([`PayShieldModule::check_keys`]
    /// compares it with the HSM's).
    pub kcv: [u8; 3],
}

impl std::fmt::Debug for PayShieldKey {
    /// Everything but the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PayShieldKey({}, {:?}, {:?}, {} bytes, KCV {})",
            self.id,
            self.usage,
            self.algorithm,
            self.length_bytes,
            kcv_text(self.kcv)
        )
    }
}

/// Why a [`PayShieldConfig`] was refused (at startup).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayShieldConfigError {
    /// The header length is over [`HEADER_LENGTH_MAX_CHARS`].
    #[error("header_len {0} is over {HEADER_LENGTH_MAX_CHARS}")]
    HeaderLength(usize),
    /// `connections_max` is 0 or over [`CONNECTIONS_MAX`].
    #[error("connections_max {0} is not 1 to {CONNECTIONS_MAX}")]
    Connections(usize),
    /// The timeout is zero or over [`TIMEOUT_MAX_MS`].
    #[error("timeout {0:?} is not above 0 and at most {TIMEOUT_MAX_MS} ms")]
    Timeout(Duration),
    /// More than [`KEYS_MAX`] keys.
    #[error("{0} keys; at most {KEYS_MAX}")]
    TooManyKeys(usize),
    /// An id is empty or given twice.
    #[error("key id {0:?} is empty or given twice")]
    Id(String),
    /// A key's length does not fit its algorithm.
    #[error("key {id}: a {algorithm:?} key cannot be {length} bytes")]
    Length {
        /// The key's id.
        id: String,
        /// Its algorithm.
        algorithm: Algorithm,
        /// The length given.
        length: usize,
    },
    /// A token is not one the HSM could have made (nothing of it is shown).
    #[error("key {id}: token is not a key block or variant token ({reason})")]
    Token {
        /// The key's id.
        id: String,
        /// What is wrong, in general terms.
        reason: &'static str,
    },
}

// === Tokens ===

/// The scheme letter of a key-block token.
const KEY_BLOCK_SCHEME: u8 = b'S';
/// The scheme letter of a TR-31 key block under a ZMK.
const TR31_SCHEME: u8 = b'R';

/// The length of the key token at the start of `text` (`U`/`X` + 32 H, `T`/`Y`
/// + 48 H, or a key block: scheme letter, version, 4-digit length), or what is
///   wrong with it. `scheme` is the key-block letter accepted (`S`, or `R` for a
///   TR-31 block under a ZMK).
fn token_len_with(text: &[u8], scheme: u8) -> Result<usize, &'static str> {
    let (len, hex) = match text.first() {
        None => return Err("empty"),
        Some(b'U' | b'X') if scheme == KEY_BLOCK_SCHEME => (33, true),
        Some(b'T' | b'Y') if scheme == KEY_BLOCK_SCHEME => (49, true),
        Some(&c) if c == scheme => {
            let digits = text.get(2..6).ok_or("key block shorter than its header")?;
            let declared = parse_digits(digits).ok_or("key block length is not 4 digits")?;
            (1 + declared as usize, false)
        }
        Some(_) => return Err("unknown key scheme"),
    };
    if len > TOKEN_LENGTH_MAX_CHARS {
        return Err("longer than TOKEN_LENGTH_MAX_CHARS");
    }
    let body = text.get(1..len).ok_or("shorter than its length")?;
    let fits = if hex {
        body.iter().all(u8::is_ascii_hexdigit)
    } else {
        body.iter().all(|b| b.is_ascii_graphic())
    };
    if fits {
        Ok(len)
    } else {
        Err("a character that does not belong")
    }
}

/// The length of the LMK token at the start of `text`.
pub(crate) fn token_len(text: &[u8]) -> Result<usize, &'static str> {
    token_len_with(text, KEY_BLOCK_SCHEME)
}

/// Whether `token` is a whole token that can hold a key of `algorithm`.
fn check_token(token: &str, algorithm: Algorithm) -> Result<(), &'static str> {
    let len = token_len(token.as_bytes())?;
    if len != token.len() {
        return Err("characters after the token");
    }
    if algorithm == Algorithm::Aes && !is_key_block(token) {
        return Err("an AES key must be a key block");
    }
    Ok(())
}

fn is_key_block(token: &str) -> bool {
    token.as_bytes().first() == Some(&KEY_BLOCK_SCHEME)
}

// === Codec ===

pub(crate) fn parse_digits(text: &[u8]) -> Option<u32> {
    if text.is_empty() || text.len() > 9 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(text.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')))
}

const HEX_DIGITS: &[u8; 16] = b"0123456789ABCDEF";

/// Appends `bytes` as uppercase hex.
pub(crate) fn put_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for b in bytes {
        out.push(HEX_DIGITS[usize::from(b >> 4)]);
        out.push(HEX_DIGITS[usize::from(b & 0x0F)]);
    }
}

/// Appends `value` as `width` decimal digits (its last ones).
pub(crate) fn put_digits(out: &mut Vec<u8>, value: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut v = value;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&digits[20 - width.min(20)..]);
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// What is wrong with a field of a message. Offsets count from the start of
/// the message after its 2-byte length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// The message ends inside the field.
    #[error("{field} at offset {offset}: {needed} bytes needed, {left} left")]
    Short {
        /// The field's name.
        field: &'static str,
        /// Where it starts.
        offset: usize,
        /// Bytes it takes.
        needed: usize,
        /// Bytes left in the message.
        left: usize,
    },
    /// A byte the field may not hold.
    #[error("{field} at offset {offset}: byte {found:#04x} is not {expected}")]
    Invalid {
        /// The field's name.
        field: &'static str,
        /// Where the byte is.
        offset: usize,
        /// The byte.
        found: u8,
        /// What it may be.
        expected: &'static str,
    },
    /// Bytes after the last field.
    #[error("{left} bytes after the last field, at offset {offset}")]
    Trailing {
        /// Where they start.
        offset: usize,
        /// How many.
        left: usize,
    },
}

/// Reads fields from a message, each checked before it is taken.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// A reader of `buf` from offset `at`.
    pub(crate) fn new(buf: &'a [u8], at: usize) -> Reader<'a> {
        Reader { buf, at }
    }

    /// Where the next field starts.
    pub(crate) fn offset(&self) -> usize {
        self.at
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FieldError> {
        let left = self.buf.len().saturating_sub(self.at);
        if n > left {
            return Err(FieldError::Short {
                field,
                offset: self.at,
                needed: n,
                left,
            });
        }
        let out = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    /// The next `n` bytes, which must be `expected`.
    pub(crate) fn expect(
        &mut self,
        expected: &'static [u8],
        field: &'static str,
    ) -> Result<(), FieldError> {
        let at = self.at;
        let got = self.take(expected.len(), field)?;
        match got.iter().zip(expected).position(|(g, e)| g != e) {
            None => Ok(()),
            Some(i) => Err(FieldError::Invalid {
                field,
                offset: at + i,
                found: got[i],
                expected: "the value due",
            }),
        }
    }

    /// `n` decimal digits (at most 9).
    pub(crate) fn digits(&mut self, n: usize, field: &'static str) -> Result<u32, FieldError> {
        let at = self.at;
        let text = self.take(n, field)?;
        match text.iter().position(|b| !b.is_ascii_digit()) {
            Some(i) => Err(FieldError::Invalid {
                field,
                offset: at + i,
                found: text[i],
                expected: "a decimal digit",
            }),
            None => parse_digits(text).ok_or(FieldError::Invalid {
                field,
                offset: at,
                found: text.first().copied().unwrap_or(0),
                expected: "at most 9 digits",
            }),
        }
    }

    /// `chars` hex digits, as `chars / 2` bytes into `out` (`chars` even, at
    /// most `2 * out.len()`).
    pub(crate) fn hex_into(
        &mut self,
        chars: usize,
        out: &mut [u8],
        field: &'static str,
    ) -> Result<(), FieldError> {
        let at = self.at;
        let text = self.take(chars, field)?;
        for (i, pair) in text.chunks_exact(2).enumerate() {
            let (Some(hi), Some(lo)) = (hex_value(pair[0]), hex_value(pair[1])) else {
                let bad = if hex_value(pair[0]).is_none() { 0 } else { 1 };
                return Err(FieldError::Invalid {
                    field,
                    offset: at + 2 * i + bad,
                    found: pair[bad],
                    expected: "a hex digit",
                });
            };
            if let Some(o) = out.get_mut(i) {
                *o = hi << 4 | lo;
            }
        }
        Ok(())
    }

    /// A key token (`scheme` as in [`token_len_with`]).
    pub(crate) fn token_of(
        &mut self,
        scheme: u8,
        field: &'static str,
    ) -> Result<&'a str, FieldError> {
        let at = self.at;
        let rest = &self.buf[at.min(self.buf.len())..];
        let len = token_len_with(rest, scheme).map_err(|expected| FieldError::Invalid {
            field,
            offset: at,
            found: rest.first().copied().unwrap_or(0),
            expected,
        })?;
        let text = self.take(len, field)?;
        // Checked to be ASCII by `token_len_with`.
        std::str::from_utf8(text).map_err(|_| FieldError::Invalid {
            field,
            offset: at,
            found: 0,
            expected: "ASCII",
        })
    }

    /// An LMK key token.
    pub(crate) fn token(&mut self, field: &'static str) -> Result<&'a str, FieldError> {
        self.token_of(KEY_BLOCK_SCHEME, field)
    }

    /// Checks that nothing is left.
    pub(crate) fn end(&self) -> Result<(), FieldError> {
        let left = self.buf.len().saturating_sub(self.at);
        if left == 0 {
            Ok(())
        } else {
            Err(FieldError::Trailing {
                offset: self.at,
                left,
            })
        }
    }
}

/// The answer code of `command`: its second character advanced by one.
pub(crate) fn response_code(command: [u8; 2]) -> [u8; 2] {
    [command[0], command[1].wrapping_add(1)]
}

/// The code of `format` in `CC`.
pub(crate) fn format_code(format: Format) -> &'static [u8; 2] {
    match format {
        Format::Iso0 => b"01",
        Format::Iso1 => b"05",
        Format::Iso3 => b"47",
        Format::Iso4 => b"48",
    }
}

/// The format of a `CC` format code.
#[cfg(any(test, feature = "responder"))]
pub(crate) fn format_of_code(code: &[u8]) -> Option<Format> {
    [Format::Iso0, Format::Iso1, Format::Iso3, Format::Iso4]
        .into_iter()
        .find(|f| format_code(*f) == code)
}

/// The `M6`/`M8` code of `algorithm`.
pub(crate) fn mac_algorithm_code(algorithm: MacAlgorithm) -> u8 {
    match algorithm {
        MacAlgorithm::Iso9797Alg3 => b'3',
        MacAlgorithm::AesCmac => b'6',
    }
}

/// The `M6`/`M8` padding method of `algorithm`.
pub(crate) fn mac_padding_code(algorithm: MacAlgorithm) -> u8 {
    match algorithm {
        MacAlgorithm::Iso9797Alg3 => b'1',
        MacAlgorithm::AesCmac => b'0',
    }
}

/// The `A0` algorithm field of a key of `algorithm` and `length` bytes.
pub(crate) fn key_block_algorithm(algorithm: Algorithm, length: usize) -> &'static [u8; 2] {
    match (algorithm, length) {
        (Algorithm::Tdes, 24) => b"T3",
        (Algorithm::Tdes, _) => b"T2",
        (Algorithm::Aes, 24) => b"A2",
        (Algorithm::Aes, 32) => b"A3",
        (Algorithm::Aes, _) => b"A1",
    }
}

use crate::store::kcv_hex as kcv_text;

// === Error codes ===

/// What a payShield error code means, for messages.
pub fn error_meaning(code: [u8; 2]) -> &'static str {
    match &code {
        b"00" => "no error",
        b"01" => "verification failure",
        b"02" => "key inappropriate length for algorithm",
        b"04" => "invalid key type code",
        b"05" => "invalid key length flag",
        b"10" => "source key parity error",
        b"11" => "destination key parity error",
        b"12" => "no keys loaded in user storage",
        b"13" => "LMK error",
        b"15" => "error in input data",
        b"17" => "not in the authorised state",
        b"20" => "PIN block does not contain valid values",
        b"21" => "invalid user storage index",
        b"22" => "invalid account number",
        b"23" => "invalid PIN block format code",
        b"24" => "PIN is fewer than 4 or more than 12 digits",
        b"26" => "invalid key scheme",
        b"27" => "incompatible key length",
        b"28" => "invalid key type",
        b"29" => "key function not permitted",
        b"40" => "firmware error",
        b"41" => "internal hardware or software error",
        b"42" => "cryptographic failure",
        b"47" => "algorithm not licensed",
        b"51" => "invalid message header",
        b"67" => "command not licensed",
        b"68" => "command has been disabled",
        b"69" => "PIN block format has been disabled",
        b"80" => "data length error",
        [b'A' | b'B', _] => "key block error",
        _ => "unknown error code",
    }
}

/// The [`ModuleError`] of error `code` in the answer to `command`, whose keys
/// were `keys` (source first; a parity error `11` names the second).
fn refusal(command: [u8; 2], code: [u8; 2], keys: &[&Slot]) -> ModuleError {
    let key = |i: usize| keys.get(i).or(keys.first()).map(|s| s.refused());
    let usage = |i: usize| key(i).unwrap_or_else(|| unavailable(command, code));
    match &code {
        b"01" if command == *b"M8" => ModuleError::Mac(MacError::Mismatch),
        b"20" | b"24" => ModuleError::Pin(PinError::Block),
        b"22" => ModuleError::Pin(PinError::Pan),
        b"23" => ModuleError::Pin(PinError::Key),
        b"11" => usage(1),
        b"02" | b"04" | b"05" | b"10" | b"26" | b"27" | b"28" | b"29" => usage(0),
        [b'A' | b'B', c] if c.is_ascii_alphanumeric() => usage(0),
        _ => unavailable(command, code),
    }
}

fn unavailable(command: [u8; 2], code: [u8; 2]) -> ModuleError {
    ModuleError::Unavailable(format!(
        "payShield {} answered error {} ({})",
        String::from_utf8_lossy(&command),
        String::from_utf8_lossy(&code),
        error_meaning(code)
    ))
}

// === Transport ===

/// Why an exchange with the HSM failed (reported as
/// [`ModuleError::Unavailable`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Every connection is busy.
    #[error("all {max} connections are busy")]
    Busy {
        /// The bound.
        max: usize,
    },
    /// The connection could not be made.
    #[error("connect: {0:?}")]
    Connect(io::ErrorKind),
    /// The deadline passed.
    #[error("no answer within the timeout")]
    Timeout,
    /// The HSM closed the connection.
    #[error("connection closed {}", closed_where(*.before_answer))]
    Closed {
        /// Nothing of the answer had been read.
        before_answer: bool,
    },
    /// Another I/O error.
    #[error("I/O: {0:?}")]
    Io(io::ErrorKind),
    /// The TLS handshake or record layer failed (a certificate not trusted, a
    /// name that does not match, an alert).
    #[error("TLS: {0}")]
    Tls(String),
    /// The command does not fit a frame.
    #[error("command of {bytes} bytes is over {FRAME_SIZE_MAX_BYTES}")]
    RequestTooLarge {
        /// Its length.
        bytes: usize,
    },
    /// The answer's length is over [`RESPONSE_SIZE_MAX_BYTES`].
    #[error("answer of {declared} bytes is over {RESPONSE_SIZE_MAX_BYTES}")]
    ResponseTooLarge {
        /// Its declared length.
        declared: usize,
    },
    /// The answer does not echo the request's header.
    #[error("answer header is not the request's (not this request's answer)")]
    Header,
    /// The answer's code is not the command's.
    #[error("answer code {found:?} where {expected:?} was due")]
    ResponseCode {
        /// What was due.
        expected: String,
        /// What came.
        found: String,
    },
    /// A field of the answer is malformed.
    #[error("answer: {0}")]
    Field(#[from] FieldError),
}

fn closed_where(before_answer: bool) -> &'static str {
    if before_answer {
        "before the answer"
    } else {
        "inside the answer"
    }
}

impl TransportError {
    /// A reused connection that the HSM had closed: worth one retry.
    fn stale(&self) -> bool {
        matches!(
            self,
            TransportError::Closed {
                before_answer: true
            }
        )
    }
}

fn io_failure(e: &io::Error, before_answer: bool) -> TransportError {
    #[cfg(feature = "tls")]
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return TransportError::Tls(tls.to_string());
    }
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout,
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TransportError::Closed { before_answer },
        kind => TransportError::Io(kind),
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// One connection: the stream (plain or TLS) and its socket, for deadlines.
struct Conn {
    stream: Box<dyn Stream>,
    socket: TcpStream,
}

fn remaining(deadline: Instant) -> Result<Duration, TransportError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(TransportError::Timeout)
}

impl Conn {
    fn send(&mut self, frame: &[u8], deadline: Instant) -> Result<(), TransportError> {
        let until = remaining(deadline)?;
        self.socket
            .set_write_timeout(Some(until))
            .map_err(|e| TransportError::Io(e.kind()))?;
        self.stream
            .write_all(frame)
            .and_then(|()| self.stream.flush())
            .map_err(|e| io_failure(&e, true))
    }

    /// Fills `buf` by `deadline`; `first`: nothing of the answer read before.
    fn fill(
        &mut self,
        buf: &mut [u8],
        deadline: Instant,
        first: bool,
    ) -> Result<(), TransportError> {
        let mut at = 0;
        while at < buf.len() {
            let until = remaining(deadline)?;
            self.socket
                .set_read_timeout(Some(until))
                .map_err(|e| TransportError::Io(e.kind()))?;
            match self.stream.read(&mut buf[at..]) {
                Ok(0) => {
                    return Err(TransportError::Closed {
                        before_answer: first && at == 0,
                    })
                }
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_failure(&e, first && at == 0)),
            }
        }
        Ok(())
    }

    /// One answer: its length checked against the bound before it is read.
    fn receive(&mut self, deadline: Instant) -> Result<Vec<u8>, TransportError> {
        let mut len = [0u8; 2];
        self.fill(&mut len, deadline, true)?;
        let declared = usize::from(u16::from_be_bytes(len));
        if declared > RESPONSE_SIZE_MAX_BYTES {
            return Err(TransportError::ResponseTooLarge { declared });
        }
        let mut body = vec![0u8; declared];
        self.fill(&mut body, deadline, false)?;
        Ok(body)
    }
}

/// How connections are made: plain TCP, or TLS over it.
#[derive(Clone)]
struct Connector {
    address: SocketAddr,
    timeout: Duration,
    #[cfg(feature = "tls")]
    tls: Option<PayShieldTls>,
}

impl Connector {
    fn connect(&self) -> Result<Conn, TransportError> {
        let socket =
            TcpStream::connect_timeout(&self.address, self.timeout).map_err(|e| {
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout,
                    kind => TransportError::Connect(kind),
                }
            })?;
        // Commands are small and each waits for its answer.
        socket
            .set_nodelay(true)
            .map_err(|e| TransportError::Io(e.kind()))?;
        let stream = socket
            .try_clone()
            .map_err(|e| TransportError::Io(e.kind()))?;
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            let client = rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone())
                .map_err(|_| TransportError::Io(io::ErrorKind::InvalidInput))?;
            // The handshake runs inside the first write, under its deadline.
            let stream = Box::new(rustls::StreamOwned::new(client, stream));
            return Ok(Conn { stream, socket });
        }
        Ok(Conn {
            stream: Box::new(stream),
            socket,
        })
    }
}

/// At most `max` connections: idle ones kept for reuse.
struct Pool {
    state: Mutex<PoolState>,
    max: usize,
}

struct PoolState {
    idle: Vec<Conn>,
    /// Idle, in use, or being connected.
    open: usize,
}

/// A connection taken from the pool (or a place for one being made): back to
/// the idle list by [`Lease::keep`], else closed and its place freed on drop.
struct Lease<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
    keep: bool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        match (self.keep, self.conn.take()) {
            (true, Some(conn)) => state.idle.push(conn),
            _ => state.open = state.open.saturating_sub(1),
        }
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves the lists whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection (`reuse`), or a new one; `reuse` false also closes
    /// every idle connection (the HSM closed one: likely all of them).
    fn acquire(
        &self,
        connector: &Connector,
        reuse: bool,
    ) -> Result<(Lease<'_>, bool), TransportError> {
        let mut state = self.lock();
        if reuse {
            if let Some(conn) = state.idle.pop() {
                let lease = Lease {
                    pool: self,
                    conn: Some(conn),
                    keep: false,
                };
                return Ok((lease, true));
            }
        } else {
            let stale = std::mem::take(&mut state.idle);
            state.open = state.open.saturating_sub(stale.len());
        }
        if state.open >= self.max {
            return Err(TransportError::Busy { max: self.max });
        }
        state.open += 1;
        drop(state);
        let mut lease = Lease {
            pool: self,
            conn: None,
            keep: false,
        };
        lease.conn = Some(connector.connect()?);
        Ok((lease, false))
    }

    fn open(&self) -> usize {
        self.lock().open
    }
}

// === The module ===

/// Counters of the module's exchanges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayShieldStats {
    /// Commands sent (retries not counted twice).
    pub requests: u64,
    /// Commands that failed in transport or protocol (not HSM error codes).
    pub failures: u64,
    /// Calls refused because every connection was busy.
    pub busy: u64,
    /// Retries on a new connection after a reused one was found closed.
    pub reconnects: u64,
    /// Connections open now.
    pub connections_open: usize,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    failures: AtomicU64,
    busy: AtomicU64,
    reconnects: AtomicU64,
}

/// What `NC` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostics {
    /// The LMK check value (16 hex digits).
    pub lmk_check: String,
    /// The firmware number (`xxxx-xxxx`).
    pub firmware: String,
}

/// Why [`PayShieldModule::check_keys`] failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyCheckError {
    /// The HSM could not be asked, or refused the key.
    #[error("key {id}: {error}")]
    Module {
        /// The key's id.
        id: String,
        /// What went wrong.
        error: ModuleError,
    },
    /// The HSM's check value of the token is not the configured one: another
    /// key, or another LMK.
    #[error("key {id}: the HSM's check value is {found}, the config says {configured}")]
    Mismatch {
        /// The key's id.
        id: String,
        /// The configured check value.
        configured: String,
        /// The HSM's.
        found: String,
    },
}

struct Slot {
    id: String,
    usage: Usage,
    algorithm: Algorithm,
    length_bytes: usize,
    tokens: RwLock<Tokens>,
}

struct Tokens {
    current: Arc<str>,
    kcv: [u8; 3],
    /// The token `current` replaced: still good for verification.
    previous: Option<Arc<str>>,
    /// Generated by `A0`, not in use yet, and its check value.
    staged: Option<(Arc<str>, [u8; 3])>,
}

impl Slot {
    fn refused(&self) -> ModuleError {
        ModuleError::Usage {
            id: self.id.clone(),
            usage: self.usage,
            algorithm: self.algorithm,
        }
    }

    fn tokens(&self) -> std::sync::RwLockReadGuard<'_, Tokens> {
        // A poisoned lock only means a panic elsewhere while replacing: the
        // tokens themselves are always whole.
        self.tokens.read().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> (Arc<str>, Option<Arc<str>>) {
        let t = self.tokens();
        (t.current.clone(), t.previous.clone())
    }
}

/// What the HSM answered: the answer's fields, or its error code.
enum Outcome<T> {
    Done(T),
    Refused([u8; 2]),
}

/// Reads the fields of an answer whose error code is `00` (all of them: the
/// caller checks that nothing is left).
type Parse<'p, T> = &'p dyn Fn(&mut Reader<'_>) -> Result<T, FieldError>;

/// The payShield backend of [`SecurityModule`].
pub struct PayShieldModule {
    slots: Vec<Slot>,
    /// The handle of each slot, and the slot of each handle.
    handles: Vec<KeyHandle>,
    indices: HashMap<KeyHandle, usize>,
    connector: Connector,
    pool: Pool,
    header_len: usize,
    next_header: AtomicU64,
    counters: Counters,
}

impl std::fmt::Debug for PayShieldModule {
    /// The address, key ids and check values; never a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<_> = self
            .slots
            .iter()
            .map(|s| (s.id.as_str(), kcv_text(s.tokens().kcv)))
            .collect();
        f.debug_struct("PayShieldModule")
            .field("address", &self.connector.address)
            .field("keys", &keys)
            .finish()
    }
}

impl PayShieldModule {
    /// A module for the HSM and keys of `config`, checked. Connects only when
    /// the first command is sent.
    pub fn new(config: PayShieldConfig) -> Result<PayShieldModule, PayShieldConfigError> {
        if config.header_len > HEADER_LENGTH_MAX_CHARS {
            return Err(PayShieldConfigError::HeaderLength(config.header_len));
        }
        if !(1..=CONNECTIONS_MAX).contains(&config.connections_max) {
            return Err(PayShieldConfigError::Connections(config.connections_max));
        }
        if config.timeout.is_zero() || config.timeout > Duration::from_millis(TIMEOUT_MAX_MS) {
            return Err(PayShieldConfigError::Timeout(config.timeout));
        }
        if config.keys.len() > KEYS_MAX {
            return Err(PayShieldConfigError::TooManyKeys(config.keys.len()));
        }
        let mut slots: Vec<Slot> = Vec::with_capacity(config.keys.len());
        for key in config.keys {
            slots.push(PayShieldModule::slot_of(key, &slots)?);
        }
        let ids: Vec<&str> = slots.iter().map(|s| s.id.as_str()).collect();
        let handles = numbering(&ids);
        if handles.len() != slots.len() {
            return Err(PayShieldConfigError::TooManyKeys(slots.len()));
        }
        let indices = handles.iter().enumerate().map(|(i, h)| (*h, i)).collect();
        Ok(PayShieldModule {
            slots,
            handles,
            indices,
            connector: Connector {
                address: config.address,
                timeout: config.timeout,
                #[cfg(feature = "tls")]
                tls: config.tls,
            },
            pool: Pool {
                state: Mutex::new(PoolState {
                    idle: Vec::new(),
                    open: 0,
                }),
                max: config.connections_max,
            },
            header_len: config.header_len,
            next_header: AtomicU64::new(0),
            counters: Counters::default(),
        })
    }

    fn slot_of(key: PayShieldKey, slots: &[Slot]) -> Result<Slot, PayShieldConfigError> {
        if key.id.is_empty() || slots.iter().any(|s| s.id == key.id) {
            return Err(PayShieldConfigError::Id(key.id));
        }
        if crate::Key::new(key.algorithm, &vec![0u8; key.length_bytes]).is_err() {
            return Err(PayShieldConfigError::Length {
                id: key.id,
                algorithm: key.algorithm,
                length: key.length_bytes,
            });
        }
        if let Err(reason) = check_token(&key.token, key.algorithm) {
            return Err(PayShieldConfigError::Token { id: key.id, reason });
        }
        Ok(Slot {
            id: key.id,
            usage: key.usage,
            algorithm: key.algorithm,
            length_bytes: key.length_bytes,
            tokens: RwLock::new(Tokens {
                current: Arc::from(key.token.as_str()),
                kcv: key.kcv,
                previous: None,
                staged: None,
            }),
        })
    }

    /// The counters, and the connections open now.
    pub fn stats(&self) -> PayShieldStats {
        PayShieldStats {
            requests: self.counters.requests.load(Ordering::Relaxed),
            failures: self.counters.failures.load(Ordering::Relaxed),
            busy: self.counters.busy.load(Ordering::Relaxed),
            reconnects: self.counters.reconnects.load(Ordering::Relaxed),
            connections_open: self.pool.open(),
        }
    }

    /// `NC`: the HSM's health, its LMK check value and firmware.
    pub fn diagnostics(&self) -> Result<Diagnostics, ModuleError> {
        self.call(*b"NC", &[], &[], &|r| {
            let lmk_check = r.take(16, "LMK check value")?;
            let firmware = r.take(9, "firmware number")?;
            Ok(Diagnostics {
                lmk_check: String::from_utf8_lossy(lmk_check).into_owned(),
                firmware: String::from_utf8_lossy(firmware).into_owned(),
            })
        })
    }

    /// `BU`: the HSM's check value of `key`'s current token.
    pub fn key_check_value(&self, key: KeyHandle) -> Result<[u8; 3], ModuleError> {
        let slot = self.any_slot(key)?;
        let (token, _) = slot.current();
        let mut fields = Vec::with_capacity(token.len() + 16);
        fields.extend_from_slice(b"FF");
        fields.push(match token.as_bytes().first() {
            Some(b'T' | b'Y') => b'2',
            Some(&KEY_BLOCK_SCHEME) => b'F',
            _ => b'1',
        });
        fields.extend_from_slice(token.as_bytes());
        fields.push(b';');
        fields.extend_from_slice(key_type_code(slot.usage, &token));
        fields.extend_from_slice(b";001");
        self.call(*b"BU", &fields, &[slot], &|r| {
            let mut kcv = [0u8; 3];
            r.hex_into(6, &mut kcv, "key check value")?;
            Ok(kcv)
        })
    }

    /// The token `key` is in use under now, and its check value: what to save
    /// after [`SecurityModule::activate`], since a rotated token lives only in
    /// this module until then (a restart from the old config would go back to
    /// the replaced key). Not secret without the LMK, but never log it.
    pub fn current_token(&self, key: KeyHandle) -> Result<(String, [u8; 3]), ModuleError> {
        let slot = self.any_slot(key)?;
        let t = slot.tokens();
        Ok((t.current.to_string(), t.kcv))
    }

    /// Asks the HSM for every key's check value and compares it with the
    /// configured one: at startup, before the switch takes traffic.
    pub fn check_keys(&self) -> Result<(), KeyCheckError> {
        for (slot, handle) in self.slots.iter().zip(&self.handles) {
            let found = self
                .key_check_value(*handle)
                .map_err(|error| KeyCheckError::Module {
                    id: slot.id.clone(),
                    error,
                })?;
            let configured = slot.tokens().kcv;
            if found != configured {
                return Err(KeyCheckError::Mismatch {
                    id: slot.id.clone(),
                    configured: kcv_text(configured),
                    found: kcv_text(found),
                });
            }
        }
        Ok(())
    }

    fn any_slot(&self, key: KeyHandle) -> Result<&Slot, ModuleError> {
        self.indices
            .get(&key)
            .and_then(|&i| self.slots.get(i))
            .ok_or(ModuleError::UnknownKey)
    }

    fn slot(&self, key: KeyHandle, usage: Usage) -> Result<&Slot, ModuleError> {
        let slot = self.any_slot(key)?;
        if slot.usage != usage {
            return Err(slot.refused());
        }
        Ok(slot)
    }

    // --- exchanges ---

    /// Sends `command` with `fields` and reads the answer's fields with `parse`
    /// when its error code is `00`; any other code is mapped with `keys`
    /// ([`refusal`]).
    fn call<T>(
        &self,
        command: [u8; 2],
        fields: &[u8],
        keys: &[&Slot],
        parse: Parse<'_, T>,
    ) -> Result<T, ModuleError> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut header = Vec::with_capacity(self.header_len);
        if self.header_len > 0 {
            let n = self.next_header.fetch_add(1, Ordering::Relaxed);
            put_digits(&mut header, n, self.header_len);
        }
        let request = Request {
            header: &header,
            command,
        };
        let result = frame(&header, command, fields).and_then(|frame| {
            match self.exchange(&frame, &request, true, parse) {
                Err((e, true)) if e.stale() => {
                    self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.exchange(&frame, &request, false, parse)
                }
                other => other,
            }
            .map_err(|(e, _)| e)
        });
        match result {
            Ok(Outcome::Done(value)) => Ok(value),
            Ok(Outcome::Refused(code)) => Err(refusal(command, code, keys)),
            Err(e) => {
                let counter = match e {
                    TransportError::Busy { .. } => &self.counters.busy,
                    _ => &self.counters.failures,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Err(ModuleError::Unavailable(format!(
                    "payShield {}: {e}",
                    String::from_utf8_lossy(&command)
                )))
            }
        }
    }

    /// One request and its answer, read whole, on a pooled connection: kept
    /// for reuse only when the answer was sound. The error says whether the
    /// connection was a reused one.
    fn exchange<T>(
        &self,
        frame: &[u8],
        request: &Request<'_>,
        reuse: bool,
        parse: Parse<'_, T>,
    ) -> Result<Outcome<T>, (TransportError, bool)> {
        let deadline = Instant::now() + self.connector.timeout;
        let (mut lease, reused) = self
            .pool
            .acquire(&self.connector, reuse)
            .map_err(|e| (e, false))?;
        let Some(conn) = lease.conn.as_mut() else {
            return Err((
                TransportError::Closed {
                    before_answer: true,
                },
                false,
            ));
        };
        let outcome = conn
            .send(frame, deadline)
            .and_then(|()| conn.receive(deadline))
            .and_then(|answer| read_answer(&answer, request, parse))
            .map_err(|e| (e, reused))?;
        lease.keep = true;
        Ok(outcome)
    }

    // --- commands ---

    /// `CC` with `source` as the source token.
    fn cc(
        &self,
        (source, from_format, from_slot): (&str, Format, &Slot),
        block: &[u8],
        account: &[u8],
        (to_format, to_slot): (Format, &Slot),
    ) -> Result<PinBlock, ModuleError> {
        let (target, _) = to_slot.current();
        let mut fields = Vec::with_capacity(source.len() + target.len() + 96);
        fields.extend_from_slice(source.as_bytes());
        fields.extend_from_slice(target.as_bytes());
        fields.extend_from_slice(b"12");
        put_hex(&mut fields, block);
        fields.extend_from_slice(format_code(from_format));
        fields.extend_from_slice(format_code(to_format));
        fields.extend_from_slice(account);
        let len = to_format.block_len();
        let out = self.call(*b"CC", &fields, &[from_slot, to_slot], &|r| {
            r.digits(2, "PIN length")?;
            let mut out = [0u8; 16];
            r.hex_into(2 * len, &mut out[..len], "destination PIN block")?;
            r.expect(format_code(to_format), "destination PIN block format")?;
            Ok(out)
        })?;
        PinBlock::new(&out[..len]).ok_or(ModuleError::Pin(PinError::Key))
    }

    /// `M6`: the MAC (8 bytes) of `data` under `token`.
    fn m6(
        &self,
        slot: &Slot,
        token: &str,
        algorithm: MacAlgorithm,
        data: &[u8],
    ) -> Result<[u8; HSM_MAC_BYTES], ModuleError> {
        let fields = mac_fields(slot, token, algorithm, None, data);
        self.call(*b"M6", &fields, &[slot], &|r| {
            let mut mac = [0u8; HSM_MAC_BYTES];
            r.hex_into(2 * HSM_MAC_BYTES, &mut mac, "MAC")?;
            Ok(mac)
        })
    }

    /// `M8`: whether `mac` (4 or 8 bytes) is the MAC of `data` under `token`.
    fn m8(
        &self,
        slot: &Slot,
        token: &str,
        algorithm: MacAlgorithm,
        data: &[u8],
        mac: &[u8],
    ) -> Result<(), ModuleError> {
        let fields = mac_fields(slot, token, algorithm, Some(mac), data);
        self.call(*b"M8", &fields, &[slot], &|_| Ok(()))
    }

    /// Verifies `mac` under one token: `M8` for 4 or 8 bytes, else `M6` and a
    /// comparison here (the MAC is not secret; compared in constant time).
    fn verify_under(
        &self,
        slot: &Slot,
        token: &str,
        algorithm: MacAlgorithm,
        data: &[u8],
        mac: &[u8],
    ) -> Result<(), ModuleError> {
        if mac.len() == 4 || mac.len() == HSM_MAC_BYTES {
            return self.m8(slot, token, algorithm, data, mac);
        }
        let full = self.m6(slot, token, algorithm, data)?;
        let diff = full.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(())
        } else {
            Err(ModuleError::Mac(MacError::Mismatch))
        }
    }

    /// `A0`: a new key for `slot`, as an LMK token, a TR-31 block under `zmk`'s
    /// token, and its check value.
    fn a0(&self, slot: &Slot, zmk: &Slot) -> Result<(String, String, [u8; 3]), ModuleError> {
        let (zmk_token, _) = zmk.current();
        let (usage, mode) = match (slot.usage, slot.algorithm) {
            (Usage::Pin, _) => (b"P0", b'B'),
            (_, Algorithm::Tdes) => (b"M3", b'C'),
            (_, Algorithm::Aes) => (b"M6", b'C'),
        };
        let mut fields = Vec::with_capacity(zmk_token.len() + 32);
        fields.extend_from_slice(b"1FFFS");
        fields.extend_from_slice(zmk_token.as_bytes());
        fields.push(TR31_SCHEME);
        fields.push(b'#');
        fields.extend_from_slice(usage);
        fields.extend_from_slice(key_block_algorithm(slot.algorithm, slot.length_bytes));
        fields.push(mode);
        fields.extend_from_slice(b"00E00");
        self.call(*b"A0", &fields, &[zmk, slot], &|r| {
            let at = r.offset();
            let lmk = r.token("key under LMK")?;
            if !is_key_block(lmk) {
                return Err(FieldError::Invalid {
                    field: "key under LMK",
                    offset: at,
                    found: lmk.as_bytes()[0],
                    expected: "a key block (S)",
                });
            }
            let block = r.token_of(TR31_SCHEME, "key under ZMK")?;
            let mut kcv = [0u8; 3];
            r.hex_into(6, &mut kcv, "key check value")?;
            Ok((lmk.to_owned(), block[1..].to_owned(), kcv))
        })
    }
}

/// The header and command of a request, which its answer must match.
struct Request<'a> {
    header: &'a [u8],
    command: [u8; 2],
}

/// The frame of a command: its length, header, code and fields.
fn frame(header: &[u8], command: [u8; 2], fields: &[u8]) -> Result<Vec<u8>, TransportError> {
    let len = header.len() + 2 + fields.len();
    let Ok(len16) = u16::try_from(len) else {
        return Err(TransportError::RequestTooLarge { bytes: len });
    };
    let mut frame = Vec::with_capacity(2 + len);
    frame.extend_from_slice(&len16.to_be_bytes());
    frame.extend_from_slice(header);
    frame.extend_from_slice(&command);
    frame.extend_from_slice(fields);
    Ok(frame)
}

/// Checks an answer's header echo, code and error code, and reads its fields
/// with `parse` when the error code is `00`.
fn read_answer<T>(
    frame: &[u8],
    request: &Request<'_>,
    parse: Parse<'_, T>,
) -> Result<Outcome<T>, TransportError> {
    let mut r = Reader::new(frame, 0);
    let echo = r.take(request.header.len(), "header")?;
    if echo != request.header {
        return Err(TransportError::Header);
    }
    let code = r.take(2, "response code")?;
    let expected = response_code(request.command);
    if code != expected {
        return Err(TransportError::ResponseCode {
            expected: String::from_utf8_lossy(&expected).into_owned(),
            found: String::from_utf8_lossy(code).into_owned(),
        });
    }
    let at = r.offset();
    let error = r.take(2, "error code")?;
    if let Some(i) = error.iter().position(|b| !b.is_ascii_alphanumeric()) {
        return Err(TransportError::Field(FieldError::Invalid {
            field: "error code",
            offset: at + i,
            found: error[i],
            expected: "a letter or digit",
        }));
    }
    if error != b"00" {
        return Ok(Outcome::Refused([error[0], error[1]]));
    }
    let value = parse(&mut r)?;
    r.end()?;
    Ok(Outcome::Done(value))
}

/// The 3 H key type of a token for `usage`: `FFF` for a key block (the block
/// names its usage), else ZPK `001`, ZAK `008`, ZMK `000`, data `00A`.
fn key_type_code(usage: Usage, token: &str) -> &'static [u8; 3] {
    if is_key_block(token) {
        return b"FFF";
    }
    match usage {
        Usage::Pin => b"001",
        Usage::Mac => b"008",
        Usage::KeyEncryption => b"000",
        Usage::Data => b"00A",
    }
}

/// The fields of `M6` (no `mac`) or `M8`.
fn mac_fields(
    slot: &Slot,
    token: &str,
    algorithm: MacAlgorithm,
    mac: Option<&[u8]>,
    data: &[u8],
) -> Vec<u8> {
    let mut fields = Vec::with_capacity(token.len() + data.len() + 48);
    fields.extend_from_slice(b"00");
    fields.push(match mac {
        Some(m) if m.len() == 4 => b'0',
        _ => b'1',
    });
    fields.push(mac_algorithm_code(algorithm));
    fields.push(mac_padding_code(algorithm));
    fields.extend_from_slice(key_type_code(slot.usage, token));
    fields.extend_from_slice(token.as_bytes());
    let mut len = Vec::with_capacity(4);
    put_hex(&mut len, &(data.len() as u16).to_be_bytes());
    fields.extend_from_slice(&len);
    fields.extend_from_slice(data);
    if let Some(mac) = mac {
        put_hex(&mut fields, mac);
    }
    fields
}

/// The account number field of `CC` for `pan` and the two formats, or the
/// PAN's fault (as the software module finds it).
fn account_field(pan: &[u8], formats: [Format; 2]) -> Result<Vec<u8>, PinError> {
    if !pan.iter().all(u8::is_ascii_digit) {
        return Err(PinError::Pan);
    }
    let needs_12 = formats
        .iter()
        .any(|f| matches!(f, Format::Iso0 | Format::Iso3));
    if needs_12 && !(13..=19).contains(&pan.len()) {
        return Err(PinError::Pan);
    }
    if formats.contains(&Format::Iso4) {
        if !(1..=19).contains(&pan.len()) {
            return Err(PinError::Pan);
        }
        let mut out = Vec::with_capacity(2 + pan.len());
        put_digits(&mut out, pan.len() as u64, 2);
        out.extend_from_slice(pan);
        return Ok(out);
    }
    if pan.len() >= 13 {
        Ok(pan[pan.len() - 13..pan.len() - 1].to_vec())
    } else {
        Ok(b"000000000000".to_vec())
    }
}

/// Handles for keys `0..ids.len()`. [`KeyHandle`] has no public constructor;
/// a [`SoftwareModule`] numbers its keys from 0 in the order added, so handles
/// are taken from one holding a placeholder key per id (never used for anything
/// else).
fn numbering(ids: &[&str]) -> Vec<KeyHandle> {
    let mut numbers = SoftwareModule::new();
    ids.iter()
        .filter_map(|id| {
            let placeholder = crate::Key::new(Algorithm::Tdes, &[0u8; 16]).ok()?;
            numbers.add(id, Usage::Data, placeholder).ok()
        })
        .collect()
}

impl SecurityModule for PayShieldModule {
    fn handle(&self, id: &str) -> Option<KeyHandle> {
        let i = self.slots.iter().position(|s| s.id == id)?;
        self.handles.get(i).copied()
    }

    fn info(&self, key: KeyHandle) -> Result<KeyInfo, ModuleError> {
        let slot = self.any_slot(key)?;
        Ok(KeyInfo {
            id: slot.id.clone(),
            usage: slot.usage,
            algorithm: slot.algorithm,
            kcv: slot.tokens().kcv,
        })
    }

    fn translate_pin(
        &self,
        (from, from_format): (KeyHandle, Format),
        block: &[u8],
        pan: &[u8],
        (to, to_format): (KeyHandle, Format),
    ) -> Result<PinBlock, ModuleError> {
        let (source, target) = (self.slot(from, Usage::Pin)?, self.slot(to, Usage::Pin)?);
        if source.algorithm != from_format.algorithm() || block.len() != from_format.block_len() {
            return Err(ModuleError::Pin(PinError::Key));
        }
        let account = account_field(pan, [from_format, to_format])?;
        let (current, previous) = source.current();
        let result = self.cc(
            (&current, from_format, source),
            block,
            &account,
            (to_format, target),
        );
        // A block made under the key just replaced (a request in flight across a
        // rotation) is still accepted.
        match (result, previous) {
            (Err(ModuleError::Pin(PinError::Block)), Some(previous)) => self.cc(
                (&previous, from_format, source),
                block,
                &account,
                (to_format, target),
            ),
            (result, _) => result,
        }
    }

    fn generate_mac(
        &self,
        key: KeyHandle,
        algorithm: MacAlgorithm,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<(), ModuleError> {
        let slot = self.slot(key, Usage::Mac)?;
        if slot.algorithm != algorithm.key_algorithm()
            || !(4..=algorithm.mac_len().min(HSM_MAC_BYTES)).contains(&out.len())
        {
            return Err(slot.refused());
        }
        check_mac_data(data)?;
        let (current, _) = slot.current();
        let mac = self.m6(slot, &current, algorithm, data)?;
        out.copy_from_slice(&mac[..out.len()]);
        Ok(())
    }

    fn verify_mac(
        &self,
        key: KeyHandle,
        algorithm: MacAlgorithm,
        data: &[u8],
        mac: &[u8],
    ) -> Result<(), ModuleError> {
        let slot = self.slot(key, Usage::Mac)?;
        if slot.algorithm != algorithm.key_algorithm() {
            return Err(slot.refused());
        }
        if mac.len() < 4 || mac.len() > algorithm.mac_len() {
            return Err(ModuleError::Mac(MacError::Mismatch));
        }
        if mac.len() > HSM_MAC_BYTES {
            return Err(slot.refused());
        }
        check_mac_data(data)?;
        // The current token, then the staged one (the peer may have switched
        // already), then the replaced one (answers in flight).
        let (current, previous, staged) = {
            let t = slot.tokens();
            let staged = t.staged.as_ref().map(|(token, _)| token.clone());
            (t.current.clone(), t.previous.clone(), staged)
        };
        let mut result = self.verify_under(slot, &current, algorithm, data, mac);
        for other in [staged, previous].into_iter().flatten() {
            if result != Err(ModuleError::Mac(MacError::Mismatch)) {
                break;
            }
            result = self.verify_under(slot, &other, algorithm, data, mac);
        }
        result
    }

    fn stage(&self, key: KeyHandle, under: KeyHandle) -> Result<StagedKey, ModuleError> {
        let slot = self.any_slot(key)?;
        if !matches!(slot.usage, Usage::Pin | Usage::Mac) {
            return Err(slot.refused());
        }
        let zmk = self.slot(under, Usage::KeyEncryption)?;
        if !is_key_block(&slot.current().0) {
            // A variant-LMK key would come back in variant form: not a TR-31 block.
            return Err(slot.refused());
        }
        let (token, block, kcv) = self.a0(slot, zmk)?;
        let mut t = slot.tokens.write().unwrap_or_else(|e| e.into_inner());
        t.staged = Some((Arc::from(token.as_str()), kcv));
        Ok(StagedKey { block, kcv })
    }

    fn activate(&self, key: KeyHandle, staged: &StagedKey) -> Result<(), ModuleError> {
        let slot = self.any_slot(key)?;
        let mut t = slot.tokens.write().unwrap_or_else(|e| e.into_inner());
        let Some((token, kcv)) = t.staged.take_if(|(_, kcv)| *kcv == staged.kcv) else {
            return Err(ModuleError::UnknownKey);
        };
        let old = std::mem::replace(&mut t.current, token);
        t.previous = Some(old);
        t.kcv = kcv;
        Ok(())
    }

    fn discard(&self, key: KeyHandle, staged: &StagedKey) -> Result<(), ModuleError> {
        let slot = self.any_slot(key)?;
        let mut t = slot.tokens.write().unwrap_or_else(|e| e.into_inner());
        match t.staged.take_if(|(_, kcv)| *kcv == staged.kcv) {
            Some(_) => Ok(()),
            None => Err(ModuleError::UnknownKey),
        }
    }

    fn remote(&self) -> bool {
        true
    }

    fn token(&self, key: KeyHandle) -> Option<(String, [u8; 3])> {
        self.current_token(key).ok()
    }
}

fn check_mac_data(data: &[u8]) -> Result<(), ModuleError> {
    if data.len() > MAC_DATA_MAX_BYTES {
        return Err(ModuleError::Unavailable(format!(
            "{} bytes to MAC; an M6/M8 carries at most {MAC_DATA_MAX_BYTES}",
            data.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_measured_by_their_scheme() {
        let u = format!("U{}", "0123456789ABCDEF".repeat(2));
        assert_eq!(token_len(u.as_bytes()), Ok(33));
        let t = format!("T{}rest", "0123456789ABCDEF".repeat(3));
        assert_eq!(token_len(t.as_bytes()), Ok(49));
        assert_eq!(token_len(b"S10016P0TB00E0000"), Ok(17));
        assert!(token_len(b"S1001").is_err());
        assert!(token_len(b"S1x016P0TB00E0000").is_err());
        assert!(
            token_len(b"S10020P0TB00E0000").is_err(),
            "shorter than stated"
        );
        assert!(token_len(b"Z0123").is_err());
        assert!(token_len(b"").is_err());
        assert!(token_len(format!("U{}", "G".repeat(32)).as_bytes()).is_err());
        assert!(
            check_token(&u, Algorithm::Aes).is_err(),
            "AES only as a key block"
        );
        assert!(check_token(&format!("{u}0"), Algorithm::Tdes).is_err());
        assert!(check_token(&u, Algorithm::Tdes).is_ok());
    }

    #[test]
    fn the_reader_names_what_is_wrong_where() {
        let mut r = Reader::new(b"12AB3G", 0);
        assert_eq!(r.digits(2, "n"), Ok(12));
        let mut out = [0u8; 2];
        assert_eq!(
            r.hex_into(4, &mut out, "h"),
            Err(FieldError::Invalid {
                field: "h",
                offset: 5,
                found: b'G',
                expected: "a hex digit"
            })
        );
        let mut r = Reader::new(b"12", 0);
        assert_eq!(
            r.take(3, "x"),
            Err(FieldError::Short {
                field: "x",
                offset: 0,
                needed: 3,
                left: 2
            })
        );
        assert_eq!(
            Reader::new(b"12", 1).end(),
            Err(FieldError::Trailing { offset: 1, left: 1 })
        );
    }

    #[test]
    fn account_fields_follow_the_formats() {
        let pan = b"4321987654321098";
        assert_eq!(
            account_field(pan, [Format::Iso0, Format::Iso3]).unwrap(),
            b"198765432109".to_vec()
        );
        assert_eq!(
            account_field(pan, [Format::Iso0, Format::Iso4]).unwrap(),
            b"164321987654321098".to_vec()
        );
        assert_eq!(
            account_field(b"", [Format::Iso1, Format::Iso1]).unwrap(),
            b"000000000000".to_vec()
        );
        assert_eq!(
            account_field(b"123", [Format::Iso0, Format::Iso1]),
            Err(PinError::Pan)
        );
        assert_eq!(
            account_field(b"12a4567890123", [Format::Iso1, Format::Iso1]),
            Err(PinError::Pan)
        );
    }

    #[test]
    fn headers_are_the_last_digits_of_the_counter() {
        let mut out = Vec::new();
        put_digits(&mut out, 123_456, 4);
        assert_eq!(out, b"3456");
        out.clear();
        put_digits(&mut out, 7, 4);
        assert_eq!(out, b"0007");
    }

    #[test]
    fn error_codes_map_to_module_errors() {
        assert_eq!(
            refusal(*b"M8", *b"01", &[]),
            ModuleError::Mac(MacError::Mismatch)
        );
        assert_eq!(
            refusal(*b"CC", *b"20", &[]),
            ModuleError::Pin(PinError::Block)
        );
        assert_eq!(
            refusal(*b"CC", *b"22", &[]),
            ModuleError::Pin(PinError::Pan)
        );
        assert!(matches!(
            refusal(*b"CC", *b"68", &[]),
            ModuleError::Unavailable(m) if m.contains("68") && m.contains("disabled")
        ));
        // A parity error with no key to name is an HSM fault.
        assert!(matches!(
            refusal(*b"BU", *b"10", &[]),
            ModuleError::Unavailable(_)
        ));
    }
}
