//! A test double of a payShield HSM: a TCP server that answers the host
//! commands [`PayShieldModule`](crate::payshield::PayShieldModule) sends, in the
//! layouts documented in [`crate::payshield`], with this crate's own PIN block,
//! MAC, key check value and TR-31 code.
//!
//! **It is not an HSM and not a payShield simulator.** No payShield simulator
//! can be installed here; this double exists so that the payShield client can
//! be tested end to end (framing, fields, error codes, connections, rotation)
//! and so that the same interface tests run against both backends. It proves
//! that client and double agree with each other and with the known answers of
//! the interface tests; it cannot prove that either agrees with a real device.
//!
//! Its "LMK" is an AES key of the test's choosing and its key tokens are `S` +
//! a TR-31 version D key block under that LMK ([`Hsm::token`]): keys are held
//! outside the double, enciphered, as on a key-block-LMK payShield. The
//! commands it knows are `NC`, `BU`, `CC`, `M6`, `M8` and `A0`; any other
//! command, or one listed in [`ResponderConfig::disabled`], is answered `68`.
//!
//! [`Hsm`] is the command processor (bytes in, bytes out, no I/O);
//! [`Responder`] serves it on a bound listener with one thread per connection,
//! at most [`ResponderConfig::connections_max`] at once (more are closed on
//! accept).

use crate::mac::{self, MacError};
use crate::module::Usage;
use crate::payshield::{
    format_code, format_of_code, mac_algorithm_code, mac_padding_code, parse_digits, put_digits,
    put_hex, response_code, token_len, FieldError, Reader,
};
use crate::pin::{self, Format, PinError};
use crate::store::KeyType;
use crate::tr31::{self, Exportability, Header, KeyUsage, ModeOfUse, Tr31Error, Version};
use crate::{cipher_ops, kcv, Algorithm, Key};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use zeroize::Zeroizing;

/// Connections served at once by default.
pub const RESPONDER_CONNECTIONS_DEFAULT: usize = 16;

/// The double's settings.
pub struct ResponderConfig {
    /// The test LMK: an AES key (16, 24 or 32 bytes) that key tokens are
    /// wrapped under.
    pub lmk: Key,
    /// Header characters, as the client's `header_len`.
    pub header_len: usize,
    /// Most connections served at once.
    pub connections_max: usize,
    /// The firmware number `NC` reports (9 characters; cut or padded).
    pub firmware: String,
    /// Commands answered `68` (disabled).
    pub disabled: Vec<[u8; 2]>,
    /// A pause before every answer: a slow HSM, for timeout tests.
    pub delay: Duration,
    /// TLS on the host port.
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ResponderConfig {
    /// A double with the LMK `lmk`, a 4-character header and nothing disabled.
    pub fn new(lmk: Key) -> ResponderConfig {
        ResponderConfig {
            lmk,
            header_len: crate::payshield::HEADER_LENGTH_DEFAULT_CHARS,
            connections_max: RESPONDER_CONNECTIONS_DEFAULT,
            firmware: "1500-0900".to_owned(),
            disabled: Vec::new(),
            delay: Duration::ZERO,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

// === The command processor ===

/// An error code the double answers with.
type Code = [u8; 2];

const INPUT: Code = *b"15";
const PIN_BLOCK: Code = *b"20";
const ACCOUNT: Code = *b"22";
const FORMAT: Code = *b"23";
const KEY_SCHEME: Code = *b"26";
const KEY_LENGTH: Code = *b"27";
const KEY_FUNCTION: Code = *b"29";
const DISABLED: Code = *b"68";
const KEY_BLOCK_AUTHENTICATION: Code = *b"A4";

impl From<FieldError> for Refusal {
    fn from(_: FieldError) -> Refusal {
        Refusal(INPUT)
    }
}

/// Why a command was refused: its error code.
struct Refusal(Code);

/// The commands of a payShield, over this crate's primitives (no I/O).
pub struct Hsm {
    lmk: Key,
    header_len: usize,
    firmware: [u8; 9],
    disabled: Vec<[u8; 2]>,
}

impl Hsm {
    /// A processor with `config`'s LMK, header length, firmware and disabled
    /// commands.
    pub fn new(config: &ResponderConfig) -> Result<Hsm, io::Error> {
        if config.lmk.algorithm() != Algorithm::Aes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the test LMK is an AES key",
            ));
        }
        let mut firmware = [b' '; 9];
        for (f, c) in firmware.iter_mut().zip(config.firmware.bytes()) {
            *f = c;
        }
        Ok(Hsm {
            lmk: Key::new(Algorithm::Aes, config.lmk.bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?,
            header_len: config.header_len,
            firmware,
            disabled: config.disabled.clone(),
        })
    }

    /// `key` as this double's LMK token for `usage`: `S` + a TR-31 block under
    /// the LMK (what loading a key into the HSM gives back).
    pub fn token(&self, usage: Usage, key: &Key) -> Result<String, Tr31Error> {
        let kind = key_type(usage);
        let header = Header::new(
            Version::D,
            kind.key_usage(key.algorithm()),
            key.algorithm(),
            kind.mode_of_use(),
            Exportability::Trusted,
        );
        Ok(format!("S{}", tr31::wrap(&self.lmk, &header, key)?))
    }

    /// The answer to `message` (after its 2-byte length) with its length, or
    /// `None` when it is too short to answer (the connection is then closed).
    pub fn answer(&self, message: &[u8]) -> Option<Vec<u8>> {
        let mut r = Reader::new(message, 0);
        let header = r.take(self.header_len, "header").ok()?;
        let code = r.take(2, "command code").ok()?;
        let command = [code[0], code[1]];
        let mut out = vec![0u8, 0u8];
        out.extend_from_slice(header);
        out.extend_from_slice(&response_code(command));
        let fields = if self.disabled.contains(&command) {
            Err(Refusal(DISABLED))
        } else {
            self.execute(command, &mut r)
        };
        match fields {
            Ok(fields) => {
                out.extend_from_slice(b"00");
                out.extend_from_slice(&fields);
            }
            Err(Refusal(code)) => out.extend_from_slice(&code),
        }
        let len = u16::try_from(out.len() - 2).ok()?;
        out[..2].copy_from_slice(&len.to_be_bytes());
        Some(out)
    }

    fn execute(&self, command: [u8; 2], r: &mut Reader<'_>) -> Result<Vec<u8>, Refusal> {
        match &command {
            b"NC" => self.nc(r),
            b"BU" => self.bu(r),
            b"CC" => self.cc(r),
            b"M6" => self.m6_m8(r, false),
            b"M8" => self.m6_m8(r, true),
            b"A0" => self.a0(r),
            _ => Err(Refusal(DISABLED)),
        }
    }

    /// The key in an LMK token, and its header.
    fn unwrap(&self, token: &str) -> Result<(Header, Key), Refusal> {
        let Some(block) = token.strip_prefix('S') else {
            return Err(Refusal(KEY_SCHEME));
        };
        tr31::unwrap(&self.lmk, block).map_err(|e| match e {
            Tr31Error::Mac => Refusal(KEY_BLOCK_AUTHENTICATION),
            _ => Refusal(INPUT),
        })
    }

    /// The key of `token`, refused unless its usage passes `allowed`.
    fn key_for(&self, token: &str, allowed: fn(&str) -> bool) -> Result<Key, Refusal> {
        let (header, key) = self.unwrap(token)?;
        if allowed(header.key_usage.as_str()) {
            Ok(key)
        } else {
            Err(Refusal(KEY_FUNCTION))
        }
    }

    fn nc(&self, r: &mut Reader<'_>) -> Result<Vec<u8>, Refusal> {
        r.end()?;
        let mut check = [0u8; 16];
        cipher_ops::encrypt(&self.lmk, &mut check);
        let mut out = Vec::with_capacity(25);
        put_hex(&mut out, &check[..8]);
        out.extend_from_slice(&self.firmware);
        Ok(out)
    }

    fn bu(&self, r: &mut Reader<'_>) -> Result<Vec<u8>, Refusal> {
        r.expect(b"FF", "key type code")?;
        r.take(1, "key length flag")?;
        let token = r.token("key")?;
        r.expect(b";", "delimiter")?;
        r.take(3, "key type")?;
        r.expect(b";", "delimiter")?;
        r.take(2, "reserved")?;
        r.expect(b"1", "key check value type")?;
        r.end()?;
        let (_, key) = self.unwrap(token)?;
        let mut out = Vec::with_capacity(6);
        put_hex(&mut out, &kcv::kcv(&key));
        Ok(out)
    }

    fn cc(&self, r: &mut Reader<'_>) -> Result<Vec<u8>, Refusal> {
        let source = r.token("source ZPK")?;
        let target = r.token("destination ZPK")?;
        r.expect(b"12", "maximum PIN length")?;
        // The block is 16 H under a TDES key, 32 H under an AES key.
        let is_pin_key = |u: &str| u == "P0";
        let source = self.key_for(source, is_pin_key)?;
        let block_chars = 2 * block_bytes(&source);
        let mut block = [0u8; 16];
        r.hex_into(block_chars, &mut block, "source PIN block")?;
        let from = format_of_code(r.take(2, "source PIN block format")?).ok_or(Refusal(FORMAT))?;
        let to_code = r.take(2, "destination PIN block format")?;
        let to = format_of_code(to_code).ok_or(Refusal(FORMAT))?;
        let pan = account(r, [from, to])?;
        r.end()?;
        let target = self.key_for(target, is_pin_key)?;
        let block = &block[..block_chars / 2];
        let out = pin::translate(
            (from, &source),
            block,
            &pan,
            (to, &target),
            &mut pin::os_random,
        )
        .map_err(|e| {
            Refusal(match e {
                PinError::Block | PinError::Pin => PIN_BLOCK,
                PinError::Pan => ACCOUNT,
                PinError::Key => FORMAT,
            })
        })?;
        let length = pin_length(to, &target, &out, &pan).ok_or(Refusal(PIN_BLOCK))?;
        let mut fields = Vec::with_capacity(40);
        put_digits(&mut fields, u64::from(length), 2);
        put_hex(&mut fields, &out);
        fields.extend_from_slice(format_code(to));
        Ok(fields)
    }

    fn m6_m8(&self, r: &mut Reader<'_>, verify: bool) -> Result<Vec<u8>, Refusal> {
        r.expect(b"0", "mode flag")?;
        r.expect(b"0", "input format flag")?;
        let size = match r.take(1, "MAC size")? {
            b"0" => 4,
            b"1" => 8,
            _ => return Err(Refusal(INPUT)),
        };
        let algorithm = r.take(1, "MAC algorithm")?[0];
        let padding = r.take(1, "padding method")?[0];
        let algorithm = [
            crate::module::MacAlgorithm::Iso9797Alg3,
            crate::module::MacAlgorithm::AesCmac,
        ]
        .into_iter()
        .find(|a| mac_algorithm_code(*a) == algorithm && mac_padding_code(*a) == padding)
        .ok_or(Refusal(INPUT))?;
        let key_type = r.take(3, "key type")?;
        let token = r.token("key")?;
        if key_type != b"FFF" {
            return Err(Refusal(KEY_SCHEME));
        }
        let mut len = [0u8; 2];
        r.hex_into(4, &mut len, "message length")?;
        let data = r.take(usize::from(u16::from_be_bytes(len)), "message")?;
        let mut given = [0u8; 8];
        if verify {
            r.hex_into(2 * size, &mut given[..size], "MAC")?;
        }
        r.end()?;
        let key = self.key_for(token, |u| u.starts_with('M'))?;
        let full = match algorithm {
            crate::module::MacAlgorithm::Iso9797Alg3 => {
                mac::retail_mac(&key, data).map(|m| m.to_vec())
            }
            crate::module::MacAlgorithm::AesCmac => mac::aes_cmac(&key, data).map(|m| m.to_vec()),
        }
        .map_err(|e| match e {
            MacError::Key | MacError::Mismatch => Refusal(KEY_LENGTH),
        })?;
        if verify {
            let diff = full
                .iter()
                .zip(&given[..size])
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            return if diff == 0 {
                Ok(Vec::new())
            } else {
                Err(Refusal(*b"01"))
            };
        }
        let mut out = Vec::with_capacity(16);
        put_hex(&mut out, &full[..8]);
        Ok(out)
    }

    fn a0(&self, r: &mut Reader<'_>) -> Result<Vec<u8>, Refusal> {
        r.expect(b"1", "mode")?;
        r.expect(b"FFF", "key type")?;
        r.expect(b"S", "key scheme (LMK)")?;
        let zmk = r.token("ZMK")?;
        r.expect(b"R", "key scheme (ZMK)")?;
        r.expect(b"#", "delimiter")?;
        let usage = r.take(2, "key usage")?;
        let (algorithm, length) = match r.take(2, "algorithm")? {
            b"T2" => (Algorithm::Tdes, 16),
            b"T3" => (Algorithm::Tdes, 24),
            b"A1" => (Algorithm::Aes, 16),
            b"A2" => (Algorithm::Aes, 24),
            b"A3" => (Algorithm::Aes, 32),
            _ => return Err(Refusal(INPUT)),
        };
        let mode = mode_of_use(r.take(1, "mode of use")?[0]).ok_or(Refusal(INPUT))?;
        r.expect(b"00", "key version number")?;
        r.expect(b"E", "exportability")?;
        r.expect(b"00", "number of optional blocks")?;
        r.end()?;
        let usage = std::str::from_utf8(usage)
            .ok()
            .and_then(KeyUsage::new)
            .ok_or(Refusal(INPUT))?;
        let zmk = self.key_for(zmk, |u| u == "K0" || u == "K1")?;
        // `Key::random` panics only without an OS random source.
        let key = Key::random(algorithm, length).map_err(|_| Refusal(KEY_LENGTH))?;
        let lmk_header = Header::new(Version::D, usage, algorithm, mode, Exportability::Trusted);
        let zmk_header = Header::new(
            Version::for_kbpk(zmk.algorithm()),
            usage,
            algorithm,
            mode,
            Exportability::Trusted,
        );
        let under_lmk = tr31::wrap(&self.lmk, &lmk_header, &key).map_err(|_| Refusal(INPUT))?;
        let under_zmk = tr31::wrap(&zmk, &zmk_header, &key).map_err(|_| Refusal(INPUT))?;
        let mut out = Vec::with_capacity(under_lmk.len() + under_zmk.len() + 8);
        out.push(b'S');
        out.extend_from_slice(under_lmk.as_bytes());
        out.push(b'R');
        out.extend_from_slice(under_zmk.as_bytes());
        put_hex(&mut out, &kcv::kcv(&key));
        Ok(out)
    }
}

/// The cipher block of `key`'s algorithm, bytes.
fn block_bytes(key: &Key) -> usize {
    match key.algorithm() {
        Algorithm::Tdes => 8,
        Algorithm::Aes => 16,
    }
}

/// The store's key type for a module usage (TR-31 usage and mode of use).
fn key_type(usage: Usage) -> KeyType {
    match usage {
        Usage::Pin => KeyType::Zpk,
        Usage::Mac => KeyType::Zak,
        Usage::KeyEncryption => KeyType::Zmk,
        Usage::Data => KeyType::Dek,
    }
}

fn mode_of_use(letter: u8) -> Option<ModeOfUse> {
    Some(match letter {
        b'B' => ModeOfUse::EncryptDecrypt,
        b'C' => ModeOfUse::GenerateVerify,
        b'D' => ModeOfUse::DecryptOnly,
        b'E' => ModeOfUse::EncryptOnly,
        b'G' => ModeOfUse::GenerateOnly,
        b'N' => ModeOfUse::NoRestriction,
        b'V' => ModeOfUse::VerifyOnly,
        _ => return None,
    })
}

/// The PAN the account field of `CC` gives: the whole PAN when a format is 48,
/// else the 12 digits framed so that they are a PAN's 12 before its check digit.
fn account(r: &mut Reader<'_>, formats: [Format; 2]) -> Result<Vec<u8>, Refusal> {
    if formats.contains(&Format::Iso4) {
        let len = r.digits(2, "account number length")? as usize;
        if !(1..=19).contains(&len) {
            return Err(Refusal(ACCOUNT));
        }
        let pan = r.take(len, "account number")?;
        if !pan.iter().all(u8::is_ascii_digit) {
            return Err(Refusal(ACCOUNT));
        }
        return Ok(pan.to_vec());
    }
    let digits = r.take(12, "account number")?;
    if parse_digits(&digits[..6]).is_none() || parse_digits(&digits[6..]).is_none() {
        return Err(Refusal(ACCOUNT));
    }
    let mut pan = Vec::with_capacity(14);
    pan.push(b'0');
    pan.extend_from_slice(digits);
    pan.push(b'0');
    Ok(pan)
}

/// The PIN length in `block` (`format`, under `key`): the length nibble of the
/// clear PIN field (not changed by the PAN field's XOR in formats 0 and 3).
fn pin_length(format: Format, key: &Key, block: &[u8], pan: &[u8]) -> Option<u8> {
    let mut clear = Zeroizing::new([0u8; 16]);
    let clear = &mut clear[..block.len()];
    clear.copy_from_slice(block);
    cipher_ops::decrypt(key, clear);
    if format == Format::Iso4 {
        for (b, p) in clear.iter_mut().zip(pan_field_4(pan)?) {
            *b ^= p;
        }
        cipher_ops::decrypt(key, clear);
    }
    Some(clear.first()? & 0x0F)
}

/// ISO 9564 format 4's PAN field.
fn pan_field_4(pan: &[u8]) -> Option<[u8; 16]> {
    if !(1..=19).contains(&pan.len()) {
        return None;
    }
    let mut nibbles = [0u8; 32];
    nibbles[0] = pan.len().saturating_sub(12) as u8;
    let pad = 12usize.saturating_sub(pan.len());
    for (n, d) in nibbles[1 + pad..].iter_mut().zip(pan) {
        *n = d.wrapping_sub(b'0');
    }
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(nibbles.chunks_exact(2)) {
        *o = pair[0] << 4 | pair[1];
    }
    Some(out)
}

// === The server ===

struct Shared {
    hsm: Hsm,
    delay: Duration,
    connections_max: usize,
    shutdown: AtomicBool,
    /// Server ends of the connections being served, to close them.
    streams: Mutex<Vec<(u64, TcpStream)>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    commands: AtomicU64,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ServerConfig>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The double serving on a listener; stops and joins its threads when dropped.
pub struct Responder {
    address: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Responder({})", self.address)
    }
}

impl Responder {
    /// Serves on `127.0.0.1` at a port of the system's choosing.
    pub fn start(config: ResponderConfig) -> io::Result<Responder> {
        Responder::serve(TcpListener::bind("127.0.0.1:0")?, config)
    }

    /// Serves on `listener`.
    pub fn serve(listener: TcpListener, config: ResponderConfig) -> io::Result<Responder> {
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            hsm: Hsm::new(&config)?,
            delay: config.delay,
            connections_max: config.connections_max,
            shutdown: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
            workers: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            #[cfg(feature = "tls")]
            tls: config.tls,
        });
        let accepting = shared.clone();
        let accept = std::thread::Builder::new()
            .name("payshield-responder".into())
            .spawn(move || accept_loop(&listener, &accepting))?;
        Ok(Responder {
            address,
            shared,
            accept: Some(accept),
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The command processor (for tokens, see [`Hsm::token`]).
    pub fn hsm(&self) -> &Hsm {
        &self.shared.hsm
    }

    /// `key` as an LMK token for `usage` ([`Hsm::token`]).
    pub fn token(&self, usage: Usage, key: &Key) -> Result<String, Tr31Error> {
        self.shared.hsm.token(usage, key)
    }

    /// Closes every connection from the HSM's side (as a restart does).
    pub fn drop_connections(&self) {
        for (_, stream) in lock(&self.shared.streams).iter() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Connections accepted so far (including those closed at the bound).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Commands received so far.
    pub fn commands(&self) -> u64 {
        self.shared.commands.load(Ordering::Relaxed)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // Wake the accept loop: it sees the flag on the next connection.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        self.drop_connections();
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for worker in workers {
            let _ = worker.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(closer) = stream.try_clone() else {
            continue;
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut streams = lock(&shared.streams);
            if streams.len() >= shared.connections_max {
                // At the bound: closed at once.
                continue;
            }
            streams.push((id, closer));
        }
        let serving = shared.clone();
        let worker = std::thread::Builder::new()
            .name("payshield-responder-conn".into())
            .spawn(move || {
                serve_connection(stream, &serving);
                lock(&serving.streams).retain(|(i, _)| *i != id);
            });
        match worker {
            Ok(worker) => {
                let mut workers = lock(&shared.workers);
                workers.retain(|w| !w.is_finished());
                workers.push(worker);
            }
            Err(_) => lock(&shared.streams).retain(|(i, _)| *i != id),
        }
    }
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    #[cfg(feature = "tls")]
    if let Some(tls) = &shared.tls {
        let Ok(server) = rustls::ServerConnection::new(tls.clone()) else {
            return;
        };
        serve(rustls::StreamOwned::new(server, stream), shared);
        return;
    }
    serve(stream, shared);
}

/// Answers frames until the peer closes or a frame cannot be answered.
fn serve(mut stream: impl Read + Write, shared: &Shared) {
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut message).is_err() {
            return;
        }
        shared.commands.fetch_add(1, Ordering::Relaxed);
        if !shared.delay.is_zero() {
            std::thread::sleep(shared.delay);
        }
        let Some(answer) = shared.hsm.answer(&message) else {
            return;
        };
        if stream
            .write_all(&answer)
            .and_then(|()| stream.flush())
            .is_err()
        {
            return;
        }
    }
}

/// The length of the LMK token at the start of `text` (for tests of framing).
pub fn token_length(text: &[u8]) -> Option<usize> {
    token_len(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unhex;

    fn hsm() -> Hsm {
        let lmk = Key::new(Algorithm::Aes, &[7u8; 32]).unwrap();
        Hsm::new(&ResponderConfig::new(lmk)).unwrap()
    }

    fn frame(hsm: &Hsm, message: &[u8]) -> Vec<u8> {
        let answer = hsm.answer(message).unwrap();
        answer[2..].to_vec()
    }

    #[test]
    fn answers_echo_the_header_and_advance_the_code() {
        let hsm = hsm();
        let nc = frame(&hsm, b"0042NC");
        assert_eq!(&nc[..8], b"0042ND00");
        assert_eq!(nc.len(), 8 + 16 + 9);
        assert_eq!(&nc[24..], b"1500-0900");
        assert_eq!(frame(&hsm, b"0001ZZ"), b"0001Z[68");
        assert_eq!(frame(&hsm, b"0001NCx"), b"0001ND15");
        assert!(hsm.answer(b"00").is_none());
    }

    #[test]
    fn tokens_hold_the_key_under_the_lmk() {
        let hsm = hsm();
        let key = Key::new(Algorithm::Tdes, &unhex("0123456789ABCDEFFEDCBA9876543210")).unwrap();
        let token = hsm.token(Usage::Mac, &key).unwrap();
        assert_eq!(token_length(token.as_bytes()), Some(token.len()));
        let message = format!("0000BUFFF{token};FFF;001");
        assert_eq!(frame(&hsm, message.as_bytes()), b"0000BV0008D7B4");
        // Another LMK's token does not authenticate.
        let other = Hsm::new(&ResponderConfig::new(
            Key::new(Algorithm::Aes, &[8u8; 32]).unwrap(),
        ))
        .unwrap();
        assert_eq!(frame(&other, message.as_bytes()), b"0000BVA4");
    }
}
