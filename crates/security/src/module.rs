//! The security module interface ([`SecurityModule`]) and its embedded backend
//! ([`SoftwareModule`]).
//!
//! The switch names keys by id in its config and resolves each id once, to a
//! [`KeyHandle`]; after that it asks the module to translate PIN blocks and to
//! make or check MACs under a handle. Clear keys never leave the module: the
//! interface takes and returns enciphered PIN blocks, MACs and key check values.
//!
//! Each key has a [`Usage`] and the module refuses a key for anything else (a
//! MAC key cannot translate PINs, a PIN key cannot make MACs), as an HSM does.
//! A working key can be replaced ([`SecurityModule::replace`]); the key it
//! replaces stays valid for verification (and PIN translation from it) until
//! the next replacement, so answers in flight under the old key still verify.
//!
//! A rotation towards a peer stages a new key ([`SecurityModule::stage`]),
//! sends it, and activates it once the peer confirms. While it is staged a
//! MAC under it verifies too: a peer with several links switches when it
//! confirms, and its MACs under the new key may arrive on another link before
//! the confirmation does. A refused rotation drops the staged key
//! ([`SecurityModule::discard`]).

use crate::mac::{self, MacError};
use crate::pin::{self, Format, PinError};
use crate::store::KeyType;
use crate::tr31::{self, Exportability, Header, Version};
use crate::{kcv, Algorithm, Key};
use std::sync::{Arc, RwLock};

/// Most keys one module holds.
pub const KEYS_MAX: usize = 4096;

/// A key of the module, resolved from its id once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyHandle(u32);

/// What a key may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A zone PIN key: PIN blocks are enciphered under it.
    Pin,
    /// A zone MAC key: messages are MAC'ed under it.
    Mac,
    /// A key-encrypting key (zone master key, key block protection key): other
    /// keys travel under it.
    KeyEncryption,
    /// A data key: stored data is enciphered under it.
    Data,
}

/// A MAC algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacAlgorithm {
    /// ISO/IEC 9797-1 MAC algorithm 3 (the retail MAC), two-key TDES.
    Iso9797Alg3,
    /// AES-CMAC (RFC 4493).
    AesCmac,
}

impl MacAlgorithm {
    /// The key algorithm it takes.
    pub fn key_algorithm(self) -> Algorithm {
        match self {
            MacAlgorithm::Iso9797Alg3 => Algorithm::Tdes,
            MacAlgorithm::AesCmac => Algorithm::Aes,
        }
    }

    /// Bytes of the full MAC (a field may carry its left part).
    pub fn mac_len(self) -> usize {
        match self {
            MacAlgorithm::Iso9797Alg3 => 8,
            MacAlgorithm::AesCmac => 16,
        }
    }
}

/// Why the module refused an operation.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    /// No key has this handle.
    #[error("no such key")]
    UnknownKey,
    /// The key's usage or algorithm does not allow the operation.
    #[error("key {id} may not be used for this ({usage:?}, {algorithm:?})")]
    Usage {
        /// The key's id.
        id: String,
        /// Its usage.
        usage: Usage,
        /// Its algorithm.
        algorithm: Algorithm,
    },
    /// A PIN block could not be translated.
    #[error("PIN block: {0}")]
    Pin(#[from] PinError),
    /// A MAC could not be made or did not verify.
    #[error("MAC: {0}")]
    Mac(#[from] MacError),
    /// The module holds [`KEYS_MAX`] keys, or an id twice.
    #[error("key {0} cannot be added (duplicate id, or the module is full)")]
    Add(String),
    /// A backend's transport or protocol failed (a hardware module).
    #[error("security module unavailable: {0}")]
    Unavailable(String),
}

/// What the module tells of a key: never the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// Its id.
    pub id: String,
    /// What it may be used for.
    pub usage: Usage,
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// Key check value of the current key.
    pub kcv: [u8; 3],
}

pub use crate::pin::PinBlock;

/// What a security module does for the switch. Implementations keep clear keys
/// to themselves.
pub trait SecurityModule: Send + Sync + std::fmt::Debug {
    /// The handle of the key `id`.
    fn handle(&self, id: &str) -> Option<KeyHandle>;

    /// What is known of `key`.
    fn info(&self, key: KeyHandle) -> Result<KeyInfo, ModuleError>;

    /// Translates `block` (under `from` in `from_format`) for `pan` to
    /// `to_format` under `to`. Both keys must be PIN keys.
    fn translate_pin(
        &self,
        from: (KeyHandle, Format),
        block: &[u8],
        pan: &[u8],
        to: (KeyHandle, Format),
    ) -> Result<PinBlock, ModuleError>;

    /// The MAC of `data` under MAC key `key`, its left `out.len()` bytes (4 to the
    /// algorithm's length) written to `out`.
    fn generate_mac(
        &self,
        key: KeyHandle,
        algorithm: MacAlgorithm,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<(), ModuleError>;

    /// Whether `mac` (the left part of a MAC, 4 bytes or more) is the MAC of `data`
    /// under `key`: its current key, the one staged for it (a rotation under way:
    /// the peer may have switched already), or the one it replaced (answers in
    /// flight across a rotation).
    fn verify_mac(
        &self,
        key: KeyHandle,
        algorithm: MacAlgorithm,
        data: &[u8],
        mac: &[u8],
    ) -> Result<(), ModuleError>;

    /// Generates a new working key for `key` (same usage and algorithm), held
    /// back until [`SecurityModule::activate`]: its TR-31 key block under the
    /// key-encryption key `under` (what goes to the peer) and its check value.
    /// A later call replaces a staged key not yet activated.
    fn stage(&self, key: KeyHandle, under: KeyHandle) -> Result<StagedKey, ModuleError>;

    /// Puts the key staged for `key` (`staged` names it by check value) in use;
    /// the key it replaces stays valid for verification and PIN translation from
    /// it until the next activation.
    fn activate(&self, key: KeyHandle, staged: &StagedKey) -> Result<(), ModuleError>;

    /// Drops the key staged for `key` (`staged` names it by check value) when the
    /// peer refused it: MACs under it no longer verify. A backend that keeps no
    /// staged key itself (the host holds the cryptogram) has nothing to drop.
    fn discard(&self, key: KeyHandle, staged: &StagedKey) -> Result<(), ModuleError> {
        let _ = (key, staged);
        Ok(())
    }

    /// Whether calls wait on another machine (a hardware module over the
    /// network): the switch then runs them where blocking is allowed
    /// (`tokio::task::block_in_place`) instead of on a session task's thread.
    fn remote(&self) -> bool {
        false
    }

    /// For a module whose keys live outside the switch's key store (a
    /// hardware module's tokens under its own master key): the form `key` is
    /// in use under now and its check value, what the switch saves after
    /// [`SecurityModule::activate`]. `None` for the software module, whose keys
    /// the key store holds. Not a clear key, but never logged.
    fn token(&self, key: KeyHandle) -> Option<(String, [u8; 3])> {
        let _ = key;
        None
    }
}

/// A working key generated for a rotation: what goes to the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedKey {
    /// The key as a TR-31 key block under the peer's key-encryption key.
    pub block: String,
    /// Its check value.
    pub kcv: [u8; 3],
}

struct Slot {
    id: String,
    usage: Usage,
    algorithm: Algorithm,
    keys: RwLock<Versions>,
}

struct Versions {
    current: Arc<Key>,
    previous: Option<Arc<Key>>,
    /// Generated for a rotation, not in use yet.
    staged: Option<Arc<Key>>,
}

/// The embedded module: keys in memory, wiped when dropped.
#[derive(Default)]
pub struct SoftwareModule {
    slots: Vec<Slot>,
}

impl std::fmt::Debug for SoftwareModule {
    /// Key ids and check values only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for (i, slot) in self.slots.iter().enumerate() {
            list.entry(&(
                slot.id.as_str(),
                self.info(KeyHandle(i as u32)).map(|i| i.kcv),
            ));
        }
        list.finish()
    }
}

impl SoftwareModule {
    /// An empty module.
    pub fn new() -> SoftwareModule {
        SoftwareModule::default()
    }

    /// Adds key `id` for `usage`.
    pub fn add(&mut self, id: &str, usage: Usage, key: Key) -> Result<KeyHandle, ModuleError> {
        if self.slots.len() >= KEYS_MAX || self.slots.iter().any(|s| s.id == id) {
            return Err(ModuleError::Add(id.to_owned()));
        }
        self.slots.push(Slot {
            id: id.to_owned(),
            usage,
            algorithm: key.algorithm(),
            keys: RwLock::new(Versions {
                current: Arc::new(key),
                previous: None,
                staged: None,
            }),
        });
        Ok(KeyHandle(self.slots.len() as u32 - 1))
    }

    fn slot(&self, key: KeyHandle, usage: Usage) -> Result<&Slot, ModuleError> {
        let slot = self
            .slots
            .get(key.0 as usize)
            .ok_or(ModuleError::UnknownKey)?;
        if slot.usage != usage {
            return Err(slot.refused());
        }
        Ok(slot)
    }

    /// The current key of `slot` and the one it replaced.
    /// The slot's keys, read-locked.
    fn read(slot: &Slot) -> std::sync::RwLockReadGuard<'_, Versions> {
        // A poisoned lock only means a panic elsewhere while replacing: the
        // versions themselves are always whole.
        slot.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    fn versions(slot: &Slot) -> (Arc<Key>, Option<Arc<Key>>) {
        let v = SoftwareModule::read(slot);
        (v.current.clone(), v.previous.clone())
    }
}

impl Slot {
    fn refused(&self) -> ModuleError {
        ModuleError::Usage {
            id: self.id.clone(),
            usage: self.usage,
            algorithm: self.algorithm,
        }
    }
}

impl SecurityModule for SoftwareModule {
    fn handle(&self, id: &str) -> Option<KeyHandle> {
        self.slots
            .iter()
            .position(|s| s.id == id)
            .map(|i| KeyHandle(i as u32))
    }

    fn info(&self, key: KeyHandle) -> Result<KeyInfo, ModuleError> {
        let slot = self
            .slots
            .get(key.0 as usize)
            .ok_or(ModuleError::UnknownKey)?;
        let (current, _) = SoftwareModule::versions(slot);
        Ok(KeyInfo {
            id: slot.id.clone(),
            usage: slot.usage,
            algorithm: slot.algorithm,
            kcv: kcv::kcv(&current),
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
        let (source, previous) = SoftwareModule::versions(source);
        let (target, _) = SoftwareModule::versions(target);
        let mut random = pin::random_fill;
        let translated = pin::translate(
            (from_format, &source),
            block,
            pan,
            (to_format, &target),
            &mut random,
        );
        // A block made under the key just replaced (a request in flight across a
        // rotation) is still accepted.
        let translated = match (translated, previous) {
            (Err(PinError::Block), Some(previous)) => pin::translate(
                (from_format, &previous),
                block,
                pan,
                (to_format, &target),
                &mut random,
            ),
            (t, _) => t,
        }?;
        Ok(translated)
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
            || !(4..=algorithm.mac_len()).contains(&out.len())
        {
            return Err(slot.refused());
        }
        // Under the read guard, no reference count touched: MACs are the hot
        // path, and the count's cache line would bounce between workers.
        let v = SoftwareModule::read(slot);
        let current = &*v.current;
        match algorithm {
            MacAlgorithm::Iso9797Alg3 => {
                let mac = mac::retail_mac(current, data)?;
                out.copy_from_slice(&mac[..out.len()]);
            }
            MacAlgorithm::AesCmac => {
                let mac = mac::aes_cmac(current, data)?;
                out.copy_from_slice(&mac[..out.len()]);
            }
        }
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
        let check = |key: &Key| match algorithm {
            MacAlgorithm::Iso9797Alg3 => mac::verify_retail_mac(key, data, mac),
            MacAlgorithm::AesCmac => mac::verify_aes_cmac(key, data, mac),
        };
        // One read guard, no reference counts (see generate_mac); the staged
        // and the replaced key are tried only when the current one mismatches.
        let v = SoftwareModule::read(slot);
        let mut result = check(&v.current);
        for other in [&v.staged, &v.previous].into_iter().flatten() {
            if result != Err(MacError::Mismatch) {
                break;
            }
            result = check(other);
        }
        Ok(result?)
    }

    fn stage(&self, key: KeyHandle, under: KeyHandle) -> Result<StagedKey, ModuleError> {
        let slot = self
            .slots
            .get(key.0 as usize)
            .ok_or(ModuleError::UnknownKey)?;
        if !matches!(slot.usage, Usage::Pin | Usage::Mac) {
            return Err(slot.refused());
        }
        let (kek, _) = SoftwareModule::versions(self.slot(under, Usage::KeyEncryption)?);
        let (current, _) = SoftwareModule::versions(slot);
        let new = Key::random(slot.algorithm, current.bytes().len()).map_err(|_| slot.refused())?;
        let kind = match slot.usage {
            Usage::Pin => KeyType::Zpk,
            _ => KeyType::Zak,
        };
        let header = Header::new(
            Version::for_kbpk(kek.algorithm()),
            kind.key_usage(slot.algorithm),
            slot.algorithm,
            kind.mode_of_use(),
            Exportability::Trusted,
        );
        let block = tr31::wrap(&kek, &header, &new)
            .map_err(|e| ModuleError::Unavailable(format!("key block: {e}")))?;
        let staged = StagedKey {
            block,
            kcv: kcv::kcv(&new),
        };
        let mut v = slot.keys.write().unwrap_or_else(|e| e.into_inner());
        v.staged = Some(Arc::new(new));
        Ok(staged)
    }

    fn activate(&self, key: KeyHandle, staged: &StagedKey) -> Result<(), ModuleError> {
        let slot = self
            .slots
            .get(key.0 as usize)
            .ok_or(ModuleError::UnknownKey)?;
        let mut v = slot.keys.write().unwrap_or_else(|e| e.into_inner());
        let Some(new) = v.staged.take_if(|k| kcv::kcv(k) == staged.kcv) else {
            return Err(ModuleError::UnknownKey);
        };
        let old = std::mem::replace(&mut v.current, new);
        v.previous = Some(old);
        Ok(())
    }

    fn discard(&self, key: KeyHandle, staged: &StagedKey) -> Result<(), ModuleError> {
        let slot = self
            .slots
            .get(key.0 as usize)
            .ok_or(ModuleError::UnknownKey)?;
        let mut v = slot.keys.write().unwrap_or_else(|e| e.into_inner());
        match v.staged.take_if(|k| kcv::kcv(k) == staged.kcv) {
            Some(_) => Ok(()),
            None => Err(ModuleError::UnknownKey),
        }
    }
}

/// Bytes a [`SoftwareModule::seal_data`] adds: the nonce and the tag.
pub const SEALED_OVERHEAD_BYTES: usize = 12 + 16;

/// Nonces of AES-GCM under data keys: 4 random bytes drawn once per process,
/// then a 64-bit counter starting at a random value (unique per message; two
/// processes collide only with the same prefix and overlapping counters).
fn next_nonce() -> [u8; 12] {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static START: OnceLock<([u8; 4], AtomicU64)> = OnceLock::new();
    let (prefix, counter) = START.get_or_init(|| {
        let mut seed = [0u8; 12];
        pin::os_random(&mut seed);
        let mut prefix = [0u8; 4];
        prefix.copy_from_slice(&seed[..4]);
        let mut start = [0u8; 8];
        start.copy_from_slice(&seed[4..]);
        (prefix, AtomicU64::new(u64::from_le_bytes(start)))
    });
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(prefix);
    nonce[4..].copy_from_slice(&counter.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    nonce
}

impl SoftwareModule {
    /// Enciphers `plain` under data key `key` (AES-GCM, `aad` authenticated with
    /// it) into `out`: nonce, ciphertext and tag, [`SEALED_OVERHEAD_BYTES`] more
    /// than `plain`; returns the length written (`out` too short: refused).
    pub fn seal_data(
        &self,
        key: KeyHandle,
        aad: &[u8],
        plain: &[u8],
        out: &mut [u8],
    ) -> Result<usize, ModuleError> {
        use aes_gcm::aead::{AeadInOut, KeyInit};
        let slot = self.slot(key, Usage::Data)?;
        let len = plain.len() + SEALED_OVERHEAD_BYTES;
        let Some(out) = out.get_mut(..len) else {
            return Err(slot.refused());
        };
        let nonce = next_nonce();
        let (head, rest) = out.split_at_mut(12);
        head.copy_from_slice(&nonce);
        let (body, tag_out) = rest.split_at_mut(plain.len());
        body.copy_from_slice(plain);
        let n = aes_gcm::Nonce::from(nonce);
        let v = SoftwareModule::read(slot);
        let current = v.current.bytes();
        let tag = match current.len() {
            16 => aes_gcm::Aes128Gcm::new_from_slice(current)
                .map_err(|_| slot.refused())?
                .encrypt_inout_detached(&n, aad, body.into()),
            _ => aes_gcm::Aes256Gcm::new_from_slice(current)
                .map_err(|_| slot.refused())?
                .encrypt_inout_detached(&n, aad, body.into()),
        };
        let tag = tag.map_err(|_| slot.refused())?;
        tag_out.copy_from_slice(&tag);
        Ok(len)
    }

    /// Deciphers what [`SoftwareModule::seal_data`] made under `key` (or the key
    /// it replaced) with the same `aad`; `None` when it does not authenticate.
    pub fn open_data(
        &self,
        key: KeyHandle,
        aad: &[u8],
        sealed: &[u8],
    ) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        use aes_gcm::aead::{AeadInOut, KeyInit};
        let slot = self.slot(key, Usage::Data).ok()?;
        if sealed.len() < SEALED_OVERHEAD_BYTES {
            return None;
        }
        let (nonce, rest) = sealed.split_at(12);
        let (ct, tag) = rest.split_at(rest.len() - 16);
        let nonce = aes_gcm::Nonce::try_from(nonce).ok()?;
        let tag = aes_gcm::Tag::try_from(tag).ok()?;
        let (current, previous) = SoftwareModule::versions(slot);
        for key in [Some(current), previous].into_iter().flatten() {
            let mut plain = zeroize::Zeroizing::new(ct.to_vec());
            let ok = match key.bytes().len() {
                16 => aes_gcm::Aes128Gcm::new_from_slice(key.bytes())
                    .ok()?
                    .decrypt_inout_detached(&nonce, aad, (&mut plain[..]).into(), &tag),
                _ => aes_gcm::Aes256Gcm::new_from_slice(key.bytes())
                    .ok()?
                    .decrypt_inout_detached(&nonce, aad, (&mut plain[..]).into(), &tag),
            };
            if ok.is_ok() {
                return Some(plain);
            }
        }
        None
    }

    /// Replaces working key `key` with `new` outright (the old one stays valid
    /// for verification until the next replacement): for tests and key loading;
    /// rotations go through [`SecurityModule::stage`] and `activate`.
    pub fn replace(&self, key: KeyHandle, new: Key) -> Result<(), ModuleError> {
        let slot = self
            .slots
            .get(key.0 as usize)
            .ok_or(ModuleError::UnknownKey)?;
        if new.algorithm() != slot.algorithm {
            return Err(slot.refused());
        }
        let mut v = slot.keys.write().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(&mut v.current, Arc::new(new));
        v.previous = Some(old);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unhex;

    fn module() -> (SoftwareModule, [KeyHandle; 4]) {
        let mut m = SoftwareModule::new();
        let tdes = |hex: &str| Key::new(Algorithm::Tdes, &unhex(hex)).unwrap();
        let a = m
            .add(
                "zpk-a",
                Usage::Pin,
                tdes("0123456789ABCDEFFEDCBA9876543210"),
            )
            .unwrap();
        let b = m
            .add(
                "zpk-b",
                Usage::Pin,
                tdes("1111111111111111FEDCBA9876543210"),
            )
            .unwrap();
        let mac = m
            .add("zak", Usage::Mac, tdes("0123456789ABCDEFFEDCBA9876543210"))
            .unwrap();
        let aes = m
            .add(
                "zpk-aes",
                Usage::Pin,
                Key::new(Algorithm::Aes, &unhex("2B7E151628AED2A6ABF7158809CF4F3C")).unwrap(),
            )
            .unwrap();
        (m, [a, b, mac, aes])
    }

    #[test]
    fn data_sealed_under_a_data_key_opens_only_with_it_and_its_aad() {
        let mut m = SoftwareModule::new();
        let dek = m
            .add("dek", Usage::Data, Key::random(Algorithm::Aes, 32).unwrap())
            .unwrap();
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        let n = m
            .seal_data(dek, b"request 1", b"4321987654321098", &mut a)
            .unwrap();
        m.seal_data(dek, b"request 1", b"4321987654321098", &mut b)
            .unwrap();
        let (a, b) = (a[..n].to_vec(), b[..n].to_vec());
        assert_ne!(a, b, "a fresh nonce per message");
        assert_eq!(a.len(), 16 + SEALED_OVERHEAD_BYTES);
        assert!(!a.windows(16).any(|w| w == b"4321987654321098"));
        assert_eq!(
            &m.open_data(dek, b"request 1", &a).unwrap()[..],
            b"4321987654321098"
        );
        assert!(m.open_data(dek, b"request 2", &a).is_none());
        let mut tampered = a.clone();
        tampered[14] ^= 1;
        assert!(m.open_data(dek, b"request 1", &tampered).is_none());
    }

    #[test]
    fn keys_are_used_only_for_their_usage() {
        let (m, [a, _, mac, _]) = module();
        let mut out = [0u8; 8];
        assert!(matches!(
            m.generate_mac(a, MacAlgorithm::Iso9797Alg3, b"x", &mut out),
            Err(ModuleError::Usage { .. })
        ));
        assert!(matches!(
            m.translate_pin(
                (mac, Format::Iso0),
                &[0; 8],
                b"4321987654321098",
                (a, Format::Iso0)
            ),
            Err(ModuleError::Usage { .. })
        ));
        let info = format!("{m:?}");
        assert!(!info.contains("0123456789"), "{info}");
    }

    #[test]
    fn a_staged_key_travels_under_the_zmk_and_takes_over_on_activation() {
        let (mut m, [_, _, mac, _]) = module();
        let zmk = Key::new(Algorithm::Tdes, &unhex("0123456789ABCDEF0123456789ABCDEF")).unwrap();
        let zmk_copy =
            Key::new(Algorithm::Tdes, &unhex("0123456789ABCDEF0123456789ABCDEF")).unwrap();
        let zmk = m.add("zmk", Usage::KeyEncryption, zmk).unwrap();
        let data = b"a message";
        let mut old = [0u8; 8];
        m.generate_mac(mac, MacAlgorithm::Iso9797Alg3, data, &mut old)
            .unwrap();
        let staged = m.stage(mac, zmk).unwrap();
        // The peer unwraps the block under the ZMK: the same key (by KCV).
        let (header, peer_key) = tr31::unwrap(&zmk_copy, &staged.block).unwrap();
        assert_eq!(header.key_usage.as_str(), "M3");
        assert_eq!(kcv::kcv(&peer_key), staged.kcv);
        // Not in use until activated.
        let mut out = [0u8; 8];
        m.generate_mac(mac, MacAlgorithm::Iso9797Alg3, data, &mut out)
            .unwrap();
        assert_eq!(out, old);
        m.activate(mac, &staged).unwrap();
        m.generate_mac(mac, MacAlgorithm::Iso9797Alg3, data, &mut out)
            .unwrap();
        assert_eq!(out, crate::mac::retail_mac(&peer_key, data).unwrap());
        // The old key still verifies (answers in flight).
        m.verify_mac(mac, MacAlgorithm::Iso9797Alg3, data, &old)
            .unwrap();
        // Activating twice is refused: nothing is staged.
        assert_eq!(m.activate(mac, &staged), Err(ModuleError::UnknownKey));
        // PIN keys cannot wrap keys.
        assert!(m.stage(mac, mac).is_err());
    }

    #[test]
    fn a_staged_key_verifies_until_discarded() {
        let (mut m, [_, _, mac, _]) = module();
        let zmk = Key::new(Algorithm::Tdes, &unhex("0123456789ABCDEF0123456789ABCDEF")).unwrap();
        let zmk_copy =
            Key::new(Algorithm::Tdes, &unhex("0123456789ABCDEF0123456789ABCDEF")).unwrap();
        let zmk = m.add("zmk", Usage::KeyEncryption, zmk).unwrap();
        let staged = m.stage(mac, zmk).unwrap();
        let (_, peer_key) = tr31::unwrap(&zmk_copy, &staged.block).unwrap();
        // The peer switched at once: its MAC under the staged key verifies.
        let data = b"an answer from the peer";
        let peers = crate::mac::retail_mac(&peer_key, data).unwrap();
        m.verify_mac(mac, MacAlgorithm::Iso9797Alg3, data, &peers)
            .unwrap();
        // Refused by the peer: dropped, and its MACs no longer verify.
        m.discard(mac, &staged).unwrap();
        assert!(m
            .verify_mac(mac, MacAlgorithm::Iso9797Alg3, data, &peers)
            .is_err());
        assert_eq!(m.activate(mac, &staged), Err(ModuleError::UnknownKey));
        assert_eq!(m.discard(mac, &staged), Err(ModuleError::UnknownKey));
        // A MAC under no key of the slot is a mismatch.
        assert_eq!(
            m.verify_mac(mac, MacAlgorithm::Iso9797Alg3, data, &[0u8; 8]),
            Err(ModuleError::Mac(MacError::Mismatch))
        );
    }

    #[test]
    fn the_retail_mac_known_answer_through_the_module() {
        let (m, [_, _, mac, _]) = module();
        let mut out = [0u8; 8];
        m.generate_mac(
            mac,
            MacAlgorithm::Iso9797Alg3,
            b"Now is the time for all ",
            &mut out,
        )
        .unwrap();
        assert_eq!(out.to_vec(), unhex("A1C72E74EA3FA9B6"));
        m.verify_mac(
            mac,
            MacAlgorithm::Iso9797Alg3,
            b"Now is the time for all ",
            &out[..4],
        )
        .unwrap();
    }

    #[test]
    fn pins_translate_across_keys_and_formats_and_the_old_key_stays_valid() {
        let (m, [a, b, _, aes]) = module();
        let pan = b"4321987654321098";
        let tdes_a = Key::new(Algorithm::Tdes, &unhex("0123456789ABCDEFFEDCBA9876543210")).unwrap();
        let block =
            pin::encipher(Format::Iso0, &tdes_a, b"1234", pan, &mut pin::os_random).unwrap();
        let out = m
            .translate_pin((a, Format::Iso0), &block, pan, (aes, Format::Iso4))
            .unwrap();
        let aes_key = Key::new(Algorithm::Aes, &unhex("2B7E151628AED2A6ABF7158809CF4F3C")).unwrap();
        assert!(pin::holds_pin(Format::Iso4, &aes_key, out.as_bytes(), pan, b"1234").unwrap());
        // Wrong key: not a valid block.
        assert_eq!(
            m.translate_pin((b, Format::Iso0), &block, pan, (aes, Format::Iso4)),
            Err(ModuleError::Pin(PinError::Block))
        );
        // After a rotation of zpk-a, blocks under the old key still translate.
        m.replace(
            a,
            Key::new(Algorithm::Tdes, &unhex("89ABCDEF01234567FEDCBA9876543210")).unwrap(),
        )
        .unwrap();
        assert!(m
            .translate_pin((a, Format::Iso0), &block, pan, (aes, Format::Iso4))
            .is_ok());
    }
}
