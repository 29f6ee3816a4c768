//! The key store: the switch's working and exchange keys in one text file, each
//! wrapped under a local master key, with what may be known of it in clear.
//!
//! # The store file
//!
//! UTF-8 text (in fact printable ASCII), lines ending in `\n`:
//!
//! ```text
//! switchyard-keystore 1
//! # comment lines and empty lines are ignored
//! <id> <type> <algorithm> <kcv> <wrapped>
//! ```
//!
//! * `id`: 1 to [`ID_LENGTH_MAX_CHARS`] characters `A-Z a-z 0-9 . _ -`, the first
//!   a letter or digit; unique in the file.
//! * `type`: `zmk`, `zpk`, `zak`, `kbpk` or `dek` ([`KeyType`]).
//! * `algorithm`: `tdes` or `aes`.
//! * `kcv`: the key check value ([`crate::kcv`]), 6 uppercase hex digits.
//! * `wrapped`: uppercase hex of AES-256 key wrap with padding (RFC 5649, NIST
//!   SP 800-38F KWP) under the master key, of `binding || key`, where `binding`
//!   is the ASCII text `"switchyard-key 1 <id> <type> <algorithm>\n"`.
//!
//! RFC 5649 authenticates what it wraps but has no associated data, so the
//! entry's metadata is wrapped with the key: an entry whose id, type or
//! algorithm was edited, or whose wrapped bytes were moved to another line, no
//! longer unwraps to its own binding and is refused. After unwrapping, the key's
//! check value must also equal the line's `kcv`. [`KeyStore::open`] does both
//! checks for every entry, so a store that opens holds only keys that unwrap.
//!
//! Never in the file, an error or a `Debug` output: a clear key.
//!
//! # The master key file
//!
//! 32 bytes (the AES-256 master key): either exactly 32 raw bytes, or 64 hex
//! digits (either case) optionally followed by `\n` (what [`KeyStore::init`]
//! writes). Group and others must have no access to it (mode 0600, or 0400):
//! otherwise it is refused with [`StoreError::MasterKeyMode`], naming the path
//! and its mode.
//!
//! # Saving
//!
//! [`KeyStore::save`] writes a temporary file in the store's directory (mode
//! 0600), syncs it, renames it over the store and syncs the directory: a crash
//! leaves the old store or the new one, never a mixture.

use crate::tr31::{self, Exportability, Header, KeyUsage, ModeOfUse, Tr31Error, Version};
use crate::{Algorithm, Key, KeyError};
use aes_kw::{KeyInit, KwpAes256};
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The store file's first line.
pub const STORE_HEADER: &str = "switchyard-keystore 1";

/// The largest store file read, bytes (a full store of [`KEY_COUNT_MAX`] keys is
/// about 250 bytes a key).
pub const STORE_FILE_SIZE_MAX_BYTES: u64 = 1024 * 1024;

/// The most keys a store holds.
pub const KEY_COUNT_MAX: usize = 1000;

/// The longest key id, characters.
pub const ID_LENGTH_MAX_CHARS: usize = 64;

/// The longest `wrapped` field, hex characters: a 32-byte key with the longest
/// binding, wrapped, is 136 bytes.
pub const WRAPPED_HEX_MAX_CHARS: usize = 512;

/// The largest master key file read, bytes (64 hex digits and `\r\n`).
pub const MASTER_KEY_FILE_SIZE_MAX_BYTES: u64 = 66;

/// The master key's length, bytes (AES-256).
pub const MASTER_KEY_BYTES: usize = 32;

/// The prefix of the metadata wrapped with each key.
const BINDING_PREFIX: &str = "switchyard-key 1";

/// RFC 5649's semiblock, bytes.
const SEMIBLOCK_BYTES: usize = 8;

// === Key types ===

/// What a stored key is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// Zone master key: a key-encryption key shared with a peer.
    Zmk,
    /// Zone PIN key: PIN blocks exchanged with a peer.
    Zpk,
    /// Zone authentication key: MACs exchanged with a peer.
    Zak,
    /// TR-31 key block protection key.
    Kbpk,
    /// Data encryption key.
    Dek,
}

impl KeyType {
    /// Every type, in the order of the names.
    pub const ALL: [KeyType; 5] = [
        KeyType::Zmk,
        KeyType::Zpk,
        KeyType::Zak,
        KeyType::Kbpk,
        KeyType::Dek,
    ];

    /// The lowercase name, as in the store file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Zmk => "zmk",
            KeyType::Zpk => "zpk",
            KeyType::Zak => "zak",
            KeyType::Kbpk => "kbpk",
            KeyType::Dek => "dek",
        }
    }

    /// Whether keys of this type wrap other keys (the `--under` of TR-31 export
    /// and import): ZMKs and KBPKs.
    pub fn encrypts_keys(self) -> bool {
        matches!(self, KeyType::Zmk | KeyType::Kbpk)
    }

    /// The TR-31 key usage an export of this type carries: ZPK `P0`; ZAK `M3`
    /// (TDES, the retail MAC) or `M6` (AES, CMAC); ZMK and KBPK `K0`; DEK `D0`.
    pub fn key_usage(self, algorithm: Algorithm) -> KeyUsage {
        match (self, algorithm) {
            (KeyType::Zpk, _) => KeyUsage::PIN_ENCRYPTION,
            (KeyType::Zak, Algorithm::Tdes) => KeyUsage::MAC_ISO9797_1_ALGORITHM_3,
            (KeyType::Zak, Algorithm::Aes) => KeyUsage::MAC_CMAC,
            (KeyType::Zmk | KeyType::Kbpk, _) => KeyUsage::KEY_ENCRYPTION,
            (KeyType::Dek, _) => KeyUsage::DATA_ENCRYPTION,
        }
    }

    /// The TR-31 mode of use an export of this type carries: MAC keys generate
    /// and verify (`C`), the others encrypt and decrypt (`B`).
    pub fn mode_of_use(self) -> ModeOfUse {
        match self {
            KeyType::Zak => ModeOfUse::GenerateVerify,
            _ => ModeOfUse::EncryptDecrypt,
        }
    }

    /// Whether a key block of `usage` may be imported as this type: ZPK `P0`,
    /// ZAK any MAC usage `M0`..`M8`, ZMK and KBPK `K0` or `K1`, DEK `D0`.
    pub fn accepts_usage(self, usage: KeyUsage) -> bool {
        let u = usage.as_str().as_bytes();
        match self {
            KeyType::Zpk => usage == KeyUsage::PIN_ENCRYPTION,
            KeyType::Zak => u[0] == b'M' && (b'0'..=b'8').contains(&u[1]),
            KeyType::Zmk | KeyType::Kbpk => {
                usage == KeyUsage::KEY_ENCRYPTION || usage == KeyUsage::KEY_BLOCK_PROTECTION
            }
            KeyType::Dek => usage == KeyUsage::DATA_ENCRYPTION,
        }
    }

    fn expected_usages(self) -> &'static str {
        match self {
            KeyType::Zpk => "P0",
            KeyType::Zak => "M0 to M8",
            KeyType::Zmk | KeyType::Kbpk => "K0 or K1",
            KeyType::Dek => "D0",
        }
    }
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KeyType {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<KeyType, StoreError> {
        KeyType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| StoreError::KeyType {
                found: clip(s).to_owned(),
            })
    }
}

/// An algorithm's name in the store file and on the command line.
pub fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Tdes => "tdes",
        Algorithm::Aes => "aes",
    }
}

/// The algorithm of a name (`tdes` or `aes`).
pub fn algorithm_from_name(name: &str) -> Result<Algorithm, StoreError> {
    match name {
        "tdes" => Ok(Algorithm::Tdes),
        "aes" => Ok(Algorithm::Aes),
        _ => Err(StoreError::Algorithm {
            found: clip(name).to_owned(),
        }),
    }
}

/// A key check value as 6 uppercase hex digits.
pub fn kcv_hex(kcv: [u8; 3]) -> String {
    format!("{:02X}{:02X}{:02X}", kcv[0], kcv[1], kcv[2])
}

/// Whether `id` may name a key: `None`, or what is wrong with it.
pub fn id_fault(id: &str) -> Option<&'static str> {
    let b = id.as_bytes();
    if b.is_empty() {
        return Some("is empty");
    }
    if b.len() > ID_LENGTH_MAX_CHARS {
        return Some("is longer than 64 characters");
    }
    if !b[0].is_ascii_alphanumeric() {
        return Some("does not start with a letter or digit");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Some("has a character other than A-Z a-z 0-9 . _ -");
    }
    None
}

/// At most the first 64 bytes of untrusted text, for error messages.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(ID_LENGTH_MAX_CHARS);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// === Errors ===

/// Why the store, the master key file or a key was refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read, written, synced or renamed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The master key file can be read or written by group or others.
    #[error(
        "master key file {path} has mode {mode:04o}: group and others must have no access \
         (chmod 600 it)"
    )]
    MasterKeyMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// `init` found a store file but no master key file.
    #[error(
        "master key file {path} is missing but key store {store} exists: a new master key \
         would not open it"
    )]
    MasterKeyMissing {
        /// The master key file.
        path: PathBuf,
        /// The store file.
        store: PathBuf,
    },
    /// The master key file holds neither 32 raw bytes nor 64 hex digits.
    #[error("master key file {path} is {length} bytes: expected 32 raw bytes or 64 hex digits")]
    MasterKeyFormat {
        /// The file.
        path: PathBuf,
        /// Its length, bytes.
        length: u64,
    },
    /// A fault in a store file, with its path.
    #[error("key store {path}: {source}")]
    File {
        /// The store file.
        path: PathBuf,
        /// What is wrong in it.
        #[source]
        source: Box<StoreError>,
    },
    /// The store file is larger than [`STORE_FILE_SIZE_MAX_BYTES`].
    #[error("the file is {size} bytes; at most {max}")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// The first line is not [`STORE_HEADER`].
    #[error("line 1 is not {STORE_HEADER:?}")]
    Header,
    /// More than [`KEY_COUNT_MAX`] entries.
    #[error("line {line}: more than {max} keys")]
    TooManyKeys {
        /// The line of the first key too many.
        line: usize,
        /// The bound.
        max: usize,
    },
    /// A field of an entry is malformed.
    #[error("line {line}: {field} {reason}")]
    Field {
        /// The line, from 1.
        line: usize,
        /// The field's name.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two entries share an id.
    #[error("line {line}: key {id:?} appears a second time")]
    DuplicateEntry {
        /// The second entry's line.
        line: usize,
        /// The id.
        id: String,
    },
    /// A key id given to the store is malformed.
    #[error("key id {id:?} {reason}")]
    Id {
        /// The id (its first 64 bytes).
        id: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An unknown key type name.
    #[error("unknown key type {found:?}: expected zmk, zpk, zak, kbpk or dek")]
    KeyType {
        /// The name given (its first 64 bytes).
        found: String,
    },
    /// An unknown algorithm name.
    #[error("unknown algorithm {found:?}: expected tdes or aes")]
    Algorithm {
        /// The name given (its first 64 bytes).
        found: String,
    },
    /// `insert` of an id the store already holds.
    #[error("key {id:?} is already in the store (replace it instead)")]
    Exists {
        /// The id.
        id: String,
    },
    /// No key of this id.
    #[error("no key {id:?} in the store")]
    NotFound {
        /// The id.
        id: String,
    },
    /// The store holds [`KEY_COUNT_MAX`] keys already.
    #[error("the store is full ({max} keys)")]
    Full {
        /// The bound.
        max: usize,
    },
    /// The wrapped key does not unwrap under the master key.
    #[error("key {id:?} does not unwrap under this master key (another master key, or the entry was altered)")]
    Unwrap {
        /// The id.
        id: String,
    },
    /// The metadata wrapped with the key differs from the entry's.
    #[error("key {id:?}: its id, type or algorithm differs from what was wrapped with it (entry altered)")]
    Metadata {
        /// The id.
        id: String,
    },
    /// The unwrapped key's check value differs from the entry's.
    #[error("key {id:?}: check value {found} differs from the stored {stored}")]
    Kcv {
        /// The id.
        id: String,
        /// The entry's check value.
        stored: String,
        /// The unwrapped key's.
        found: String,
    },
    /// A check value given with a key differs from the key's own.
    #[error("key {id:?}: check value {given} given; the key's is {actual}")]
    KcvGiven {
        /// The id.
        id: String,
        /// The check value given.
        given: String,
        /// The key's.
        actual: String,
    },
    /// A key does not fit its algorithm.
    #[error("key {id:?}: {source}")]
    Key {
        /// The id.
        id: String,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// A TR-31 key block could not be made or read.
    #[error("key {id:?}: TR-31: {source}")]
    Tr31 {
        /// The id of the key exported or imported.
        id: String,
        /// Why.
        #[source]
        source: Tr31Error,
    },
    /// `--under` names a key that does not wrap keys.
    #[error("key {id:?} is a {kind}: keys are wrapped only under a zmk or kbpk")]
    NotKeyEncryption {
        /// The id.
        id: String,
        /// Its type.
        kind: KeyType,
    },
    /// A key block's usage does not fit the type it is imported as.
    #[error("key block usage {usage} cannot be imported as a {kind} (expected {expected})")]
    Usage {
        /// The block's usage.
        usage: KeyUsage,
        /// The type asked for.
        kind: KeyType,
        /// The usages that type accepts.
        expected: &'static str,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

// === Entries ===

/// One key of the store: what is known in clear, and the key wrapped.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// The key's id.
    pub id: String,
    /// What it is for.
    pub kind: KeyType,
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// Its check value.
    pub kcv: [u8; 3],
    /// RFC 5649 wrap of binding || key under the master key.
    wrapped: Vec<u8>,
}

impl std::fmt::Debug for StoredKey {
    /// Id, type, algorithm and check value; not the wrapped bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StoredKey({} {} {} KCV {})",
            self.id,
            self.kind,
            algorithm_name(self.algorithm),
            kcv_hex(self.kcv)
        )
    }
}

/// The metadata wrapped with a key.
fn binding(id: &str, kind: KeyType, algorithm: Algorithm) -> String {
    format!(
        "{BINDING_PREFIX} {id} {kind} {}\n",
        algorithm_name(algorithm)
    )
}

/// The entries of a store file's text: checks every field and bound (not the
/// wrapping: that needs the master key, see [`KeyStore::open`]).
pub fn parse_store(text: &[u8]) -> Result<Vec<StoredKey>, StoreError> {
    let size = text.len() as u64;
    if size > STORE_FILE_SIZE_MAX_BYTES {
        return Err(StoreError::TooLarge {
            size,
            max: STORE_FILE_SIZE_MAX_BYTES,
        });
    }
    let mut lines = text.split(|b| *b == b'\n');
    if lines.next() != Some(STORE_HEADER.as_bytes()) {
        return Err(StoreError::Header);
    }
    let mut keys = Vec::new();
    let mut ids = HashSet::new();
    for (i, raw) in lines.enumerate() {
        let line = i + 2;
        if raw.is_empty() || raw[0] == b'#' {
            continue;
        }
        if keys.len() == KEY_COUNT_MAX {
            return Err(StoreError::TooManyKeys {
                line,
                max: KEY_COUNT_MAX,
            });
        }
        let entry = parse_entry(raw, line)?;
        if !ids.insert(entry.id.clone()) {
            return Err(StoreError::DuplicateEntry { line, id: entry.id });
        }
        keys.push(entry);
    }
    Ok(keys)
}

/// One `<id> <type> <algorithm> <kcv> <wrapped>` line.
fn parse_entry(raw: &[u8], line: usize) -> Result<StoredKey, StoreError> {
    let field = |field, reason| StoreError::Field {
        line,
        field,
        reason,
    };
    // Printable ASCII, so the line is UTF-8 and splits on bytes.
    if !raw.iter().all(|b| (b' '..=b'~').contains(b)) {
        return Err(field("line", "is not printable ASCII"));
    }
    let text = std::str::from_utf8(raw).map_err(|_| field("line", "is not printable ASCII"))?;
    let fields: Vec<&str> = text.splitn(6, ' ').collect();
    let [id, kind, algorithm, kcv, wrapped] = fields[..] else {
        return Err(field(
            "line",
            "is not 5 fields: id type algorithm kcv wrapped, one space apart",
        ));
    };
    if let Some(reason) = id_fault(id) {
        return Err(field("id", reason));
    }
    let kind: KeyType = kind
        .parse()
        .map_err(|_| field("type", "is not zmk, zpk, zak, kbpk or dek"))?;
    let algorithm =
        algorithm_from_name(algorithm).map_err(|_| field("algorithm", "is not tdes or aes"))?;
    let kcv = unhex_upper(kcv)
        .and_then(|b| <[u8; 3]>::try_from(b).ok())
        .ok_or(field("kcv", "is not 6 uppercase hex digits"))?;
    if wrapped.len() > WRAPPED_HEX_MAX_CHARS {
        return Err(field("wrapped", "is longer than 512 hex digits"));
    }
    let wrapped = unhex_upper(wrapped)
        .filter(|w| w.len() >= 3 * SEMIBLOCK_BYTES && w.len() % SEMIBLOCK_BYTES == 0)
        .ok_or(field(
            "wrapped",
            "is not uppercase hex of a whole number (at least 3) of 8-byte semiblocks",
        ))?;
    Ok(StoredKey {
        id: id.to_owned(),
        kind,
        algorithm,
        kcv,
        wrapped,
    })
}

fn unhex_upper(s: &str) -> Option<Vec<u8>> {
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    b.chunks(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The store file's text.
fn render(keys: &[StoredKey]) -> String {
    let mut out = String::with_capacity(64 + keys.len() * 256);
    out.push_str(STORE_HEADER);
    out.push('\n');
    for k in keys {
        out.push_str(&format!(
            "{} {} {} {} {}\n",
            k.id,
            k.kind,
            algorithm_name(k.algorithm),
            kcv_hex(k.kcv),
            hex_upper(&k.wrapped)
        ));
    }
    out
}

// === The store ===

/// The key store: its file, the master key, and the entries (wrapped).
pub struct KeyStore {
    path: PathBuf,
    master: Key,
    keys: Vec<StoredKey>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("path", &self.path)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// Opens the store, first making what is missing: a random master key file
    /// (mode 0600) and an empty store file.
    /// A store file without its master key file is refused
    /// ([`StoreError::MasterKeyMissing`]): a new master key would not open it.
    pub fn init(store: &Path, master_key_file: &Path) -> Result<KeyStore, StoreError> {
        if !master_key_file.exists() {
            if store.exists() {
                return Err(StoreError::MasterKeyMissing {
                    path: master_key_file.to_owned(),
                    store: store.to_owned(),
                });
            }
            create_master_key_file(master_key_file)?;
        }
        if store.exists() {
            return KeyStore::open(store, master_key_file);
        }
        let s = KeyStore {
            path: store.to_owned(),
            master: read_master_key(master_key_file)?,
            keys: Vec::new(),
        };
        s.save()?;
        Ok(s)
    }

    /// Opens an existing store: checks the master key file's mode and format,
    /// parses the store within its bounds, and unwraps every entry (binding and
    /// check value verified).
    pub fn open(store: &Path, master_key_file: &Path) -> Result<KeyStore, StoreError> {
        let master = read_master_key(master_key_file)?;
        let in_file = |e| StoreError::File {
            path: store.to_owned(),
            source: Box::new(e),
        };
        let text =
            read_bounded(store, STORE_FILE_SIZE_MAX_BYTES, "read key store")?.map_err(|size| {
                in_file(StoreError::TooLarge {
                    size,
                    max: STORE_FILE_SIZE_MAX_BYTES,
                })
            })?;
        let keys = parse_store(&text).map_err(in_file)?;
        let s = KeyStore {
            path: store.to_owned(),
            master,
            keys,
        };
        for k in &s.keys {
            s.unwrap_entry(k).map_err(in_file)?;
        }
        Ok(s)
    }

    /// The store file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every entry, in file order.
    pub fn keys(&self) -> &[StoredKey] {
        &self.keys
    }

    /// The entry of `id`.
    pub fn get(&self, id: &str) -> Option<&StoredKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The clear key of `id` (binding and check value verified).
    pub fn unwrap(&self, id: &str) -> Result<Key, StoreError> {
        let entry = self.get(id).ok_or_else(|| StoreError::NotFound {
            id: clip(id).to_owned(),
        })?;
        self.unwrap_entry(entry)
    }

    /// Adds `key` as `id`; an id already present is [`StoreError::Exists`].
    pub fn insert(&mut self, id: &str, kind: KeyType, key: &Key) -> Result<(), StoreError> {
        if self.get(id).is_some() {
            return Err(StoreError::Exists { id: id.to_owned() });
        }
        if self.keys.len() >= KEY_COUNT_MAX {
            return Err(StoreError::Full { max: KEY_COUNT_MAX });
        }
        let entry = self.wrap_entry(id, kind, key)?;
        self.keys.push(entry);
        Ok(())
    }

    /// Puts `key` in place of the key `id` (which must exist), keeping its place.
    pub fn replace(&mut self, id: &str, kind: KeyType, key: &Key) -> Result<(), StoreError> {
        let entry = self.wrap_entry(id, kind, key)?;
        let slot = self
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| StoreError::NotFound { id: id.to_owned() })?;
        *slot = entry;
        Ok(())
    }

    /// Writes the store: a temporary file in the same directory (mode 0600),
    /// synced, renamed over the store, the directory synced.
    pub fn save(&self) -> Result<(), StoreError> {
        write_atomically(&self.path, render(&self.keys).as_bytes())
    }

    /// The key `key_id` as a TR-31 key block under the ZMK or KBPK `under`:
    /// version D under an AES key, B under TDES; usage and mode of use from the
    /// key's type ([`KeyType::key_usage`], [`KeyType::mode_of_use`]); exportable
    /// under a trusted key.
    pub fn export_tr31(&self, key_id: &str, under: &str) -> Result<String, StoreError> {
        let kbpk = self.key_encryption_key(under)?;
        let entry = self.get(key_id).ok_or_else(|| StoreError::NotFound {
            id: clip(key_id).to_owned(),
        })?;
        let key = self.unwrap_entry(entry)?;
        let header = Header::new(
            Version::for_kbpk(kbpk.algorithm()),
            entry.kind.key_usage(entry.algorithm),
            entry.algorithm,
            entry.kind.mode_of_use(),
            Exportability::Trusted,
        );
        tr31::wrap(&kbpk, &header, &key).map_err(|source| StoreError::Tr31 {
            id: entry.id.clone(),
            source,
        })
    }

    /// Unwraps a TR-31 key block under the ZMK or KBPK `under` (MAC verified)
    /// and inserts its key as `id` of type `kind` (the block's usage must fit
    /// the type; the algorithm is the block's). Returns the new entry.
    pub fn import_tr31(
        &mut self,
        id: &str,
        kind: KeyType,
        block: &str,
        under: &str,
    ) -> Result<&StoredKey, StoreError> {
        let key = self.unwrap_tr31(id, kind, block, under)?;
        self.insert(id, kind, &key)?;
        self.get(id)
            .ok_or_else(|| StoreError::NotFound { id: id.to_owned() })
    }

    /// [`KeyStore::import_tr31`] in place of the key `id`, which must exist (a
    /// working key rotated with a peer: the block is what went to it). Returns
    /// the new entry.
    pub fn replace_tr31(
        &mut self,
        id: &str,
        kind: KeyType,
        block: &str,
        under: &str,
    ) -> Result<&StoredKey, StoreError> {
        let key = self.unwrap_tr31(id, kind, block, under)?;
        self.replace(id, kind, &key)?;
        self.get(id)
            .ok_or_else(|| StoreError::NotFound { id: id.to_owned() })
    }

    /// The key in `block` under the ZMK or KBPK `under`, its usage fitting `kind`
    /// (`id` names it in errors).
    fn unwrap_tr31(
        &self,
        id: &str,
        kind: KeyType,
        block: &str,
        under: &str,
    ) -> Result<Key, StoreError> {
        let kbpk = self.key_encryption_key(under)?;
        let (header, key) = tr31::unwrap(&kbpk, block).map_err(|source| StoreError::Tr31 {
            id: clip(id).to_owned(),
            source,
        })?;
        if !kind.accepts_usage(header.key_usage) {
            return Err(StoreError::Usage {
                usage: header.key_usage,
                kind,
                expected: kind.expected_usages(),
            });
        }
        Ok(key)
    }

    /// The clear key of `id`, which must be a ZMK or KBPK.
    fn key_encryption_key(&self, id: &str) -> Result<Key, StoreError> {
        let entry = self.get(id).ok_or_else(|| StoreError::NotFound {
            id: clip(id).to_owned(),
        })?;
        if !entry.kind.encrypts_keys() {
            return Err(StoreError::NotKeyEncryption {
                id: entry.id.clone(),
                kind: entry.kind,
            });
        }
        self.unwrap_entry(entry)
    }

    fn wrap_entry(&self, id: &str, kind: KeyType, key: &Key) -> Result<StoredKey, StoreError> {
        if let Some(reason) = id_fault(id) {
            return Err(StoreError::Id {
                id: clip(id).to_owned(),
                reason,
            });
        }
        let mut plain = Zeroizing::new(binding(id, kind, key.algorithm()).into_bytes());
        plain.extend_from_slice(key.bytes());
        let mut wrapped =
            vec![0u8; plain.len().div_ceil(SEMIBLOCK_BYTES) * SEMIBLOCK_BYTES + SEMIBLOCK_BYTES];
        let kw = self.kwp();
        let len = match kw.wrap_key(&plain, &mut wrapped) {
            Ok(w) => w.len(),
            Err(e) => unreachable!("the buffer is sized as RFC 5649 says: {e}"),
        };
        wrapped.truncate(len);
        Ok(StoredKey {
            id: id.to_owned(),
            kind,
            algorithm: key.algorithm(),
            kcv: key.check_value(),
            wrapped,
        })
    }

    fn unwrap_entry(&self, entry: &StoredKey) -> Result<Key, StoreError> {
        let id = || entry.id.clone();
        let mut buf = Zeroizing::new(vec![0u8; entry.wrapped.len()]);
        let plain = self
            .kwp()
            .unwrap_key(&entry.wrapped, &mut buf)
            .map_err(|_| StoreError::Unwrap { id: id() })?;
        let expected = binding(&entry.id, entry.kind, entry.algorithm);
        let Some(key_bytes) = plain.strip_prefix(expected.as_bytes()) else {
            return Err(StoreError::Metadata { id: id() });
        };
        let key = Key::new(entry.algorithm, key_bytes)
            .map_err(|source| StoreError::Key { id: id(), source })?;
        let found = key.check_value();
        if found != entry.kcv {
            return Err(StoreError::Kcv {
                id: id(),
                stored: kcv_hex(entry.kcv),
                found: kcv_hex(found),
            });
        }
        Ok(key)
    }

    fn kwp(&self) -> KwpAes256 {
        // The master key is 32 bytes (checked when read).
        match KwpAes256::new_from_slice(self.master.bytes()) {
            Ok(kw) => kw,
            Err(_) => unreachable!("the master key is an AES-256 key"),
        }
    }
}

/// A check that `key`'s check value is `given` (6 hex digits, either case).
pub fn check_kcv(id: &str, key: &Key, given: &str) -> Result<(), StoreError> {
    let actual = kcv_hex(key.check_value());
    if given.eq_ignore_ascii_case(&actual) {
        Ok(())
    } else {
        Err(StoreError::KcvGiven {
            id: clip(id).to_owned(),
            given: clip(given).to_owned(),
            actual,
        })
    }
}

// === Files ===

/// A file's bytes, or `Err(size)` when larger than `max` bytes.
fn read_bounded(
    path: &Path,
    max: u64,
    action: &'static str,
) -> Result<Result<Zeroizing<Vec<u8>>, u64>, StoreError> {
    let file = File::open(path).map_err(io(action, path))?;
    read_open_bounded(file, path, max, action)
}

fn read_open_bounded(
    file: File,
    path: &Path,
    max: u64,
    action: &'static str,
) -> Result<Result<Zeroizing<Vec<u8>>, u64>, StoreError> {
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io(action, path))?;
    let size = bytes.len() as u64;
    Ok(if size > max { Err(size) } else { Ok(bytes) })
}

/// The master key: mode checked on the open file, then 32 raw bytes or 64 hex.
fn read_master_key(path: &Path) -> Result<Key, StoreError> {
    let action = "read master key file";
    let file = File::open(path).map_err(io(action, path))?;
    let mode = file
        .metadata()
        .map_err(io(action, path))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StoreError::MasterKeyMode {
            path: path.to_owned(),
            mode,
        });
    }
    let format = |length| StoreError::MasterKeyFormat {
        path: path.to_owned(),
        length,
    };
    let bytes =
        read_open_bounded(file, path, MASTER_KEY_FILE_SIZE_MAX_BYTES, action)?.map_err(format)?;
    let raw = if bytes.len() == MASTER_KEY_BYTES {
        bytes
    } else {
        let text = bytes
            .strip_suffix(b"\n")
            .map(|t| t.strip_suffix(b"\r").unwrap_or(t))
            .unwrap_or(&bytes);
        let upper = Zeroizing::new(text.to_ascii_uppercase());
        let hex = std::str::from_utf8(&upper).ok();
        match hex.and_then(unhex_upper).map(Zeroizing::new) {
            Some(raw) if raw.len() == MASTER_KEY_BYTES => raw,
            _ => return Err(format(bytes.len() as u64)),
        }
    };
    Key::new(Algorithm::Aes, &raw).map_err(|_| format(raw.len() as u64))
}

/// A new random master key file: 64 hex digits and `\n`, mode 0600.
fn create_master_key_file(path: &Path) -> Result<(), StoreError> {
    let key = Key::random(Algorithm::Aes, MASTER_KEY_BYTES).map_err(|source| StoreError::Key {
        id: "master".to_owned(),
        source,
    })?;
    let mut text = Zeroizing::new(hex_upper(key.bytes()));
    text.push('\n');
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create master key file", path))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("write master key file", path))
}

/// Writes `bytes` to a fresh file at `path` (mode 0600) and syncs it.
/// Replaces the file at `path` with `bytes`: a temporary file in the same
/// directory (mode 0600), synced, renamed over it, the directory synced. A
/// crash leaves the old file or the new one, never a mix.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keystore".to_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = write_synced(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, path).map_err(io("rename into", path)));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", &dir))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))?;
    // A file left by an earlier run keeps its mode through `open`: set it.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .and_then(|()| file.write_all(bytes))
        .and_then(|()| file.sync_all())
        .map_err(io("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unhex;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let p = std::env::temp_dir()
                .join(format!("switchyard-store-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tdes() -> Key {
        Key::new(Algorithm::Tdes, &unhex("0123456789ABCDEFFEDCBA9876543210")).unwrap()
    }

    #[test]
    fn init_insert_save_open_unwrap() {
        let d = Dir::new("roundtrip");
        let (store, master) = (d.0.join("keys.txt"), d.0.join("master.key"));
        let mut s = KeyStore::init(&store, &master).unwrap();
        let mode = fs::metadata(&master).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::metadata(&store).unwrap().permissions().mode() & 0o777,
            0o600
        );
        s.insert("zpk-1", KeyType::Zpk, &tdes()).unwrap();
        let aes = Key::random(Algorithm::Aes, 32).unwrap();
        s.insert("kbpk.bank_2", KeyType::Kbpk, &aes).unwrap();
        assert!(matches!(
            s.insert("zpk-1", KeyType::Zpk, &aes),
            Err(StoreError::Exists { .. })
        ));
        s.save().unwrap();
        let text = fs::read_to_string(&store).unwrap();
        assert!(text.contains("zpk-1 zpk tdes 08D7B4 "), "{text}");
        assert!(!text.contains("0123456789ABCDEF"), "{text}");
        let s = KeyStore::open(&store, &master).unwrap();
        assert_eq!(s.keys().len(), 2);
        assert_eq!(s.unwrap("zpk-1").unwrap().bytes(), tdes().bytes());
        assert_eq!(s.unwrap("kbpk.bank_2").unwrap().bytes(), aes.bytes());
        assert_eq!(
            format!("{:?}", s.get("zpk-1").unwrap()),
            "StoredKey(zpk-1 zpk tdes KCV 08D7B4)"
        );
        // init again opens what is there.
        assert_eq!(KeyStore::init(&store, &master).unwrap().keys().len(), 2);
    }

    #[test]
    fn altered_entries_and_loose_master_keys_are_refused() {
        let d = Dir::new("tamper");
        let (store, master) = (d.0.join("keys.txt"), d.0.join("master.key"));
        let mut s = KeyStore::init(&store, &master).unwrap();
        s.insert("a", KeyType::Zpk, &tdes()).unwrap();
        s.insert("b", KeyType::Zak, &tdes()).unwrap();
        s.save().unwrap();
        let text = fs::read_to_string(&store).unwrap();
        // Relabel a's type: the binding no longer matches.
        fs::write(&store, text.replace("a zpk", "a zak")).unwrap();
        let e = KeyStore::open(&store, &master).unwrap_err();
        assert!(
            matches!(&e, StoreError::File { source, .. } if matches!(**source, StoreError::Metadata { .. })),
            "{e}"
        );
        // Swap the wrapped keys of a and b.
        let lines: Vec<&str> = text.lines().collect();
        let wa = lines[1].rsplit(' ').next().unwrap();
        let wb = lines[2].rsplit(' ').next().unwrap();
        let swapped = text.replace(wa, "X").replace(wb, wa).replace('X', wb);
        fs::write(&store, swapped).unwrap();
        assert!(KeyStore::open(&store, &master).is_err());
        fs::write(&store, &text).unwrap();
        KeyStore::open(&store, &master).unwrap();
        // Another master key.
        let other = d.0.join("other.key");
        fs::write(&other, [7u8; 32]).unwrap();
        fs::set_permissions(&other, fs::Permissions::from_mode(0o600)).unwrap();
        let e = KeyStore::open(&store, &other).unwrap_err().to_string();
        assert!(e.contains("does not unwrap"), "{e}");
        // A master key others can read.
        fs::set_permissions(&master, fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeyStore::open(&store, &master).unwrap_err();
        assert!(
            matches!(e, StoreError::MasterKeyMode { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("master.key"), "{e}");
    }

    #[test]
    fn parse_refusals_name_line_and_field() {
        let ok = |rest: &str| format!("{STORE_HEADER}\n{rest}");
        let w = "00".repeat(24);
        let cases = [
            ("".to_owned(), "line 1"),
            (
                ok(&format!("a zpk tdes 08D7B4 {w} extra")),
                "line 2: line is not 5 fields",
            ),
            (
                ok(&format!("-a zpk tdes 08D7B4 {w}")),
                "line 2: id does not start",
            ),
            (ok(&format!("a zzz tdes 08D7B4 {w}")), "line 2: type"),
            (ok(&format!("a zpk des 08D7B4 {w}")), "line 2: algorithm"),
            (ok(&format!("a zpk tdes 08d7b4 {w}")), "line 2: kcv"),
            (ok("a zpk tdes 08D7B4 0011"), "line 2: wrapped"),
            (
                ok(&format!(
                    "\n# c\na zpk tdes 08D7B4 {w}\na zpk tdes 08D7B4 {w}"
                )),
                "line 5: key \"a\" appears",
            ),
        ];
        for (text, want) in cases {
            let e = parse_store(text.as_bytes()).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e} / {want}");
        }
        let many: String = (0..=KEY_COUNT_MAX)
            .map(|i| format!("k{i} zpk tdes 08D7B4 {w}\n"))
            .collect();
        assert!(matches!(
            parse_store(ok(&many).as_bytes()),
            Err(StoreError::TooManyKeys { line: 1002, .. })
        ));
    }

    #[test]
    fn a_rotated_working_key_replaces_its_entry_from_the_block_sent() {
        let d = Dir::new("replace-tr31");
        let (store, master) = (d.0.join("keys.txt"), d.0.join("master.key"));
        let mut s = KeyStore::init(&store, &master).unwrap();
        let zmk = Key::random(Algorithm::Tdes, 16).unwrap();
        s.insert("zmk", KeyType::Zmk, &zmk).unwrap();
        s.insert("zak", KeyType::Zak, &tdes()).unwrap();
        s.insert("after", KeyType::Zpk, &tdes()).unwrap();
        let new = Key::random(Algorithm::Tdes, 16).unwrap();
        let header = Header::new(
            Version::B,
            KeyType::Zak.key_usage(Algorithm::Tdes),
            Algorithm::Tdes,
            KeyType::Zak.mode_of_use(),
            Exportability::Trusted,
        );
        let block = tr31::wrap(&zmk, &header, &new).unwrap();
        // Not a PIN key's block; not an unknown id.
        assert!(matches!(
            s.replace_tr31("after", KeyType::Zpk, &block, "zmk"),
            Err(StoreError::Usage { .. })
        ));
        assert!(matches!(
            s.replace_tr31("nope", KeyType::Zak, &block, "zmk"),
            Err(StoreError::NotFound { .. })
        ));
        let entry = s.replace_tr31("zak", KeyType::Zak, &block, "zmk").unwrap();
        assert_eq!(entry.kcv, new.check_value());
        s.save().unwrap();
        let s = KeyStore::open(&store, &master).unwrap();
        let ids: Vec<&str> = s.keys().iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["zmk", "zak", "after"], "the entry keeps its place");
        assert_eq!(s.unwrap("zak").unwrap().bytes(), new.bytes());
    }

    #[test]
    fn init_refuses_a_store_without_its_master_key() {
        let d = Dir::new("no-master");
        let (store, master) = (d.0.join("keys.txt"), d.0.join("master.key"));
        KeyStore::init(&store, &master).unwrap();
        fs::remove_file(&master).unwrap();
        let e = KeyStore::init(&store, &master).unwrap_err();
        assert!(matches!(e, StoreError::MasterKeyMissing { .. }), "{e}");
        assert!(!master.exists(), "no new master key was made");
    }

    #[test]
    fn random_tdes_keys_have_odd_parity() {
        for len in [16, 24] {
            let k = Key::random(Algorithm::Tdes, len).unwrap();
            assert!(k.bytes().iter().all(|b| b.count_ones() % 2 == 1));
        }
    }

    #[test]
    fn key_types_round_trip_their_names() {
        for t in KeyType::ALL {
            assert_eq!(t.to_string().parse::<KeyType>().unwrap(), t);
        }
        assert!("ZPK".parse::<KeyType>().is_err());
    }
}
