//! PIN translation and MACs on each link, through the security module
//! (`switchyard-security`).
//!
//! Every `[[institution]]` and `[[bank]]` may name a PIN key and format and a
//! MAC key and algorithm ([`LinkKeys`]); the ids are resolved to module handles
//! when the config is read. On the way through the switch:
//!
//! * a request from an institution with a MAC key must carry a MAC that
//!   verifies ([`LinkKeys::verify`]), else it is answered 63 and goes no
//!   further; an answer from a bank with a MAC key likewise, else it is dropped
//!   (its request then ends as an unanswered one: 68 and a reversal advice);
//! * DE52 is translated from the acquirer's key and format to the bank's
//!   ([`translate_pin`]); a block that does not decipher to a valid PIN block is
//!   answered 81;
//! * what goes to a bank with a MAC key carries its MAC, what goes back to an
//!   institution with one carries the institution's ([`LinkKeys::seal`]).
//!
//! **Where the MAC is.** The MAC is the last field of the message: DE128 when
//! the message has fields above 64, else DE64, binary and of fixed length in the
//! link's dialect (check-config refuses a dialect where it is not). It covers
//! every byte of the message before it, from the MTI (a TPDU or length prefix
//! is not part of the message). An AES-CMAC is carried as its left 8 bytes when
//! the field is 8 bytes long. Network management messages (08xx) carry none.
//!
//! **Working-key rotation.** A bank with a key-encrypting key (`zmk_key`,
//! [`KeyExchange`]) can be sent a new ZPK or ZAK ([`WorkingKey`]): the module
//! stages one ([`LinkKeys::stage`]), a link sends it under the ZMK in an 0800
//! key change (`core::link`), and once the bank answers 00 it takes over for
//! every link of the bank ([`LinkKeys::activate`]); the key it replaced still
//! verifies answers in flight.

use crate::wire::{Dialect, FieldType, LengthKind, Message};
use std::sync::Arc;
use switchyard_security::module::{
    KeyHandle, MacAlgorithm, ModuleError, PinBlock, SecurityModule, SoftwareModule, StagedKey,
};
use switchyard_security::pin::Format;

/// The security module the links use: the software module holding the key
/// store's keys, or a payShield client (`[keys] module`).
pub type Module = Arc<dyn SecurityModule>;

/// The software module holding the key store's keys: the journal's data key
/// lives there whichever module the links use.
pub type DataModule = Arc<SoftwareModule>;

/// Runs `call` on `module`: directly for the software module (microseconds of
/// CPU), and where blocking is allowed for a module on another machine, so that
/// a session task waiting on the HSM does not stall the tasks that share its
/// worker thread (`tokio::task::block_in_place`, on the multi-thread runtime
/// the daemon runs; directly elsewhere). The payShield client bounds the calls
/// waiting at once by its `connections_max`: a call finding every connection
/// busy is refused at once.
pub fn offload<R>(module: &dyn SecurityModule, call: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    // The software module asks nothing of the runtime: no lookup per MAC.
    if module.remote()
        && Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
    {
        tokio::task::block_in_place(call)
    } else {
        call()
    }
}

/// A link's MAC: the key and the algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacSpec {
    /// The MAC key.
    pub key: KeyHandle,
    /// The algorithm.
    pub algorithm: MacAlgorithm,
}

/// A link's PIN key and the ISO 9564 format its PIN blocks are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinSpec {
    /// The zone PIN key.
    pub key: KeyHandle,
    /// The PIN block format.
    pub format: Format,
}

/// The field of a key change that carries the TR-31 key block, by default
/// (`key_block_field`): DE48, additional data (private use), `ans` LLLVAR in the
/// shipped dialects.
pub const KEY_BLOCK_FIELD_DEFAULT: u8 = 48;

/// The field of a key change that carries the new key's check value, by default
/// (`kcv_field`): DE62, reserved (private use), `ans` LLLVAR in the shipped
/// dialects. (DE53, security related control information, is `n 16` in the 1987
/// dialects and `b` in the 1993 ones: it cannot carry hex digits.)
pub const KCV_FIELD_DEFAULT: u8 = 62;

/// The longest key block a key change carries, characters: an AES-256 key under
/// an AES key-encrypting key (TR-31 version D: a 16-character header, a
/// 48-byte payload and a 16-byte MAC, both as hex). A key block field must hold
/// at least this many.
pub const KEY_BLOCK_CHARS_MAX: usize = 16 + 2 * 48 + 2 * 16;

/// Characters of a key check value in a key change: 3 bytes as hex.
pub const KCV_CHARS: usize = 6;

/// Where a bank's working keys come from in a key change: the key-encrypting
/// key they travel under (`zmk_key`) and the fields of the 0800 that carry the
/// TR-31 key block and its check value (`key_block_field`, `kcv_field`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyExchange {
    /// The zone master key (or key block protection key).
    pub zmk: KeyHandle,
    /// The field of the key block (printable text, variable length).
    pub key_block_field: u8,
    /// The field of the new key's check value (6 hex digits).
    pub kcv_field: u8,
}

/// A working key of a link that a rotation replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkingKey {
    /// The zone PIN key (`pin_key`).
    Pin,
    /// The zone MAC key (`mac_key`).
    Mac,
}

impl WorkingKey {
    /// Its short name, as the admin endpoint and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkingKey::Pin => "zpk",
            WorkingKey::Mac => "zak",
        }
    }

    /// The `[[bank]]` key that names it.
    pub fn config_key(self) -> &'static str {
        match self {
            WorkingKey::Pin => "pin_key",
            WorkingKey::Mac => "mac_key",
        }
    }

    /// From its short name (`zpk`, `zak`).
    pub fn from_name(name: &str) -> Option<WorkingKey> {
        match name {
            "zpk" => Some(WorkingKey::Pin),
            "zak" => Some(WorkingKey::Mac),
            _ => None,
        }
    }
}

/// Why a rotation could not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StageError {
    /// The link has no `zmk_key`.
    #[error("no zmk_key: the bank's keys cannot be sent to it")]
    NoExchange,
    /// The link has no such working key.
    #[error("the bank has no {} (no {} in its config)", .0.as_str(), .0.config_key())]
    NoKey(WorkingKey),
    /// The module refused (its words).
    #[error("security module: {0}")]
    Module(String),
}

/// One link's keys (an institution's or a bank's); the default has none, and
/// messages then pass as they are.
#[derive(Clone, Default)]
pub struct LinkKeys {
    module: Option<Module>,
    /// MAC on every message but network management.
    pub mac: Option<MacSpec>,
    /// PIN blocks (DE52) under this key and format.
    pub pin: Option<PinSpec>,
    /// How new working keys go to the bank (banks only).
    pub exchange: Option<KeyExchange>,
}

/// No keys: what a link without `pin_key` or `mac_key` has.
pub static NO_KEYS: LinkKeys = LinkKeys {
    module: None,
    mac: None,
    pin: None,
    exchange: None,
};

impl std::fmt::Debug for LinkKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkKeys")
            .field("mac", &self.mac)
            .field("pin", &self.pin)
            .field("exchange", &self.exchange)
            .finish()
    }
}

impl PartialEq for LinkKeys {
    /// The same specs naming keys of the same id, usage, algorithm and check
    /// value (a reload that reads an unchanged key store changes nothing).
    fn eq(&self, other: &LinkKeys) -> bool {
        let info = |k: &LinkKeys, h: Option<KeyHandle>| {
            k.module.as_ref().zip(h).map(|(m, h)| m.info(h).ok())
        };
        let keys = |k: &LinkKeys| {
            (
                info(k, k.mac.map(|m| m.key)),
                info(k, k.pin.map(|p| p.key)),
                k.mac.map(|m| m.algorithm),
                k.pin.map(|p| p.format),
                info(k, k.exchange.map(|e| e.zmk)),
                k.exchange.map(|e| (e.key_block_field, e.kcv_field)),
            )
        };
        keys(self) == keys(other)
    }
}

/// Why a message's MAC was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacFailure {
    /// The message carries no MAC field, or not as its last field.
    Missing,
    /// The MAC does not verify.
    Mismatch,
    /// The link's dialect cannot carry a MAC (refused by check-config).
    Field,
    /// The security module could not be asked (a hardware module unreachable,
    /// busy or failing): the switch answers 96, not 63.
    Unavailable,
}

impl MacFailure {
    /// As a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            MacFailure::Missing => "missing",
            MacFailure::Mismatch => "mismatch",
            MacFailure::Field => "field",
            MacFailure::Unavailable => "module_unavailable",
        }
    }
}

/// Bytes of field `n` where a dialect carries it as a fixed binary field (a MAC
/// or a PIN block); `None` where it does not.
pub fn binary_field_len(dialect: &Dialect, n: u8) -> Option<usize> {
    let spec = dialect.field(n)?;
    let fits = spec.ty == FieldType::B
        && spec.length == LengthKind::Fixed
        && spec.encoding == crate::wire::Encoding::Binary;
    fits.then_some(usize::from(spec.max))
}

/// The field a message's MAC goes in when its highest other field is `highest`.
pub fn mac_field(highest: u8) -> u8 {
    if highest > 64 {
        128
    } else {
        64
    }
}

/// Whether messages of this MTI carry a MAC (all but network management).
pub fn carries_mac(msg: &Message) -> bool {
    msg.mti().as_bytes()[1] != b'8'
}

impl LinkKeys {
    /// Keys of `module` for a link.
    pub fn new(module: Module, mac: Option<MacSpec>, pin: Option<PinSpec>) -> LinkKeys {
        LinkKeys {
            module: Some(module),
            mac,
            pin,
            exchange: None,
        }
    }

    /// These keys, rotated with the bank through `exchange`.
    pub fn with_exchange(mut self, exchange: KeyExchange) -> LinkKeys {
        self.exchange = Some(exchange);
        self
    }

    /// The handle of working key `key`, if the link has it.
    pub fn working_key(&self, key: WorkingKey) -> Option<KeyHandle> {
        match key {
            WorkingKey::Pin => self.pin.map(|p| p.key),
            WorkingKey::Mac => self.mac.map(|m| m.key),
        }
    }

    /// The module's word on working key `key` (id, check value; never the key).
    pub fn info(&self, key: WorkingKey) -> Option<switchyard_security::module::KeyInfo> {
        let (module, handle) = self.module.as_ref().zip(self.working_key(key))?;
        module.info(handle).ok()
    }

    /// Working key `key` as a hardware module keeps it (its token) and its
    /// check value; `None` with the software module ([`SecurityModule::token`]).
    pub fn token(&self, key: WorkingKey) -> Option<(String, [u8; 3])> {
        let (module, handle) = self.module.as_ref().zip(self.working_key(key))?;
        module.token(handle)
    }

    /// The id of the key-encrypting key the bank's keys travel under.
    pub fn zmk_id(&self) -> Option<String> {
        let (module, exchange) = self.module.as_ref().zip(self.exchange)?;
        module.info(exchange.zmk).ok().map(|i| i.id)
    }

    /// Stages a new working key `key`: what goes to the bank (its TR-31 key block
    /// under the ZMK, and its check value). Not in use before
    /// [`LinkKeys::activate`]; MACs under it verify meanwhile.
    pub fn stage(&self, key: WorkingKey) -> Result<StagedKey, StageError> {
        let exchange = self.exchange.ok_or(StageError::NoExchange)?;
        let (module, handle) = self
            .module
            .as_ref()
            .zip(self.working_key(key))
            .ok_or(StageError::NoKey(key))?;
        offload(&**module, || module.stage(handle, exchange.zmk))
            .map_err(|e| StageError::Module(e.to_string()))
    }

    /// Puts the staged key in use, for every link that shares this module; the
    /// key it replaces still verifies.
    pub fn activate(&self, key: WorkingKey, staged: &StagedKey) -> Result<(), ModuleError> {
        let (module, handle) = self
            .module
            .as_ref()
            .zip(self.working_key(key))
            .ok_or(ModuleError::UnknownKey)?;
        module.activate(handle, staged)
    }

    /// Drops the staged key (the bank refused it, or it never went out).
    pub fn discard(&self, key: WorkingKey, staged: &StagedKey) {
        if let Some((module, handle)) = self.module.as_ref().zip(self.working_key(key)) {
            // Already gone (a later rotation staged another): nothing to drop.
            let _ = module.discard(handle, staged);
        }
    }

    /// Whether messages on this link carry a MAC.
    pub fn has_mac(&self) -> bool {
        self.mac.is_some() && self.module.is_some()
    }

    /// Checks the MAC of `msg` (decoded under `dialect` from `raw`, the message's
    /// bytes as received): Ok when the link has no MAC key or the message is a
    /// network management message.
    pub fn verify(&self, raw: &[u8], msg: &Message, dialect: &Dialect) -> Result<(), MacFailure> {
        let (Some(module), Some(mac)) = (&self.module, self.mac) else {
            return Ok(());
        };
        if !carries_mac(msg) {
            return Ok(());
        }
        let n = if msg.has(128) {
            128
        } else if msg.has(64) {
            64
        } else {
            return Err(MacFailure::Missing);
        };
        let width = binary_field_len(dialect, n).ok_or(MacFailure::Field)?;
        let Some(at) = raw.len().checked_sub(width) else {
            return Err(MacFailure::Missing);
        };
        let (data, value) = raw.split_at(at);
        // The field decoded must be those last bytes: the MAC is the last field.
        if msg.field(n) != Some(value) || (n == 64 && msg.highest_field_except(&[64]) > 64) {
            return Err(MacFailure::Missing);
        }
        let len = width.min(mac.algorithm.mac_len());
        let module = &**module;
        offload(module, || {
            module.verify_mac(mac.key, mac.algorithm, data, &value[..len])
        })
        .map_err(|e| match e {
            ModuleError::Unavailable(_) => MacFailure::Unavailable,
            _ => MacFailure::Mismatch,
        })
    }

    /// The placeholder `(field, zeros)` a message for this link carries while it
    /// is encoded, its highest other field being `highest`; `None` without a MAC
    /// key or when the dialect cannot carry one.
    pub fn placeholder(&self, dialect: &Dialect, highest: u8) -> Option<(u8, &'static [u8])> {
        const ZEROS: [u8; 16] = [0; 16];
        self.mac?;
        let n = mac_field(highest);
        let width = binary_field_len(dialect, n)?;
        ZEROS.get(..width).map(|z| (n, z))
    }

    /// Writes the MAC of `message[..len - width]` into its last `width` bytes
    /// (where the placeholder was encoded). False when the module refused.
    pub fn seal(&self, message: &mut [u8], width: usize) -> bool {
        let (Some(module), Some(mac)) = (&self.module, self.mac) else {
            return true;
        };
        let Some(at) = message.len().checked_sub(width) else {
            return false;
        };
        let (data, value) = message.split_at_mut(at);
        let len = width.min(mac.algorithm.mac_len());
        let module = &**module;
        let ok = offload(module, || {
            module.generate_mac(mac.key, mac.algorithm, data, &mut value[..len])
        })
        .is_ok();
        // A field longer than the MAC: the rest stays zero.
        ok
    }
}

/// What the switch does with a request's DE52 on its way to the bank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PinOut {
    /// Forwarded as it came (neither side has a PIN key, or no DE52).
    #[default]
    AsIs,
    /// Replaced by this block (under the bank's key, in its format).
    Translated(PinBlock),
    /// Left out (a reversal: it carries no PIN to the bank).
    Removed,
}

/// Why a PIN block could not go to the bank: the switch answers 81 (96 when the
/// module could not be asked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinFailure {
    /// Only one side has a PIN key.
    NoKey,
    /// The block is not a valid PIN block under the acquirer's key (or the PAN
    /// does not fit the format).
    Block,
    /// The security module could not be asked: the switch answers 96, not 81.
    Unavailable,
}

impl PinFailure {
    /// As a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            PinFailure::NoKey => "no_key",
            PinFailure::Block => "block",
            PinFailure::Unavailable => "module_unavailable",
        }
    }
}

/// Translates `msg`'s DE52 from the acquirer's key and format to the bank's.
pub fn translate_pin(
    msg: &Message,
    acquirer: &LinkKeys,
    bank: &LinkKeys,
) -> Result<PinOut, PinFailure> {
    let Some(block) = msg.field(52) else {
        return Ok(PinOut::AsIs);
    };
    let (from, to, module) = match (acquirer.pin, bank.pin, &bank.module) {
        (None, None, _) => return Ok(PinOut::AsIs),
        (Some(from), Some(to), Some(module)) => (from, to, module),
        _ => return Err(PinFailure::NoKey),
    };
    let pan = msg.field(2).unwrap_or(b"");
    let module = &**module;
    let translated = offload(module, || {
        module.translate_pin((from.key, from.format), block, pan, (to.key, to.format))
    });
    match translated {
        Ok(out) => Ok(PinOut::Translated(out)),
        Err(ModuleError::Pin(_)) => Err(PinFailure::Block),
        Err(ModuleError::Unavailable(_)) => Err(PinFailure::Unavailable),
        Err(_) => Err(PinFailure::NoKey),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_security::module::Usage;
    use switchyard_security::{Algorithm, Key};

    #[test]
    fn the_longest_key_block_is_an_aes_256_key_under_an_aes_zmk() {
        let mut longest = 0;
        for (zmk, key) in [
            (Algorithm::Tdes, (Algorithm::Tdes, 16)),
            (Algorithm::Tdes, (Algorithm::Tdes, 24)),
            (Algorithm::Aes, (Algorithm::Tdes, 24)),
            (Algorithm::Aes, (Algorithm::Aes, 16)),
            (Algorithm::Aes, (Algorithm::Aes, 32)),
        ] {
            let mut module = SoftwareModule::new();
            let zmk_len = if zmk == Algorithm::Aes { 32 } else { 16 };
            let zmk = Key::random(zmk, zmk_len).unwrap();
            let zmk = module.add("zmk", Usage::KeyEncryption, zmk).unwrap();
            let zak = module
                .add("zak", Usage::Mac, Key::random(key.0, key.1).unwrap())
                .unwrap();
            let staged = module.stage(zak, zmk).unwrap();
            assert!(staged.block.len() <= KEY_BLOCK_CHARS_MAX, "{key:?}");
            longest = longest.max(staged.block.len());
        }
        assert_eq!(longest, KEY_BLOCK_CHARS_MAX);
    }
}
