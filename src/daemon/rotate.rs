//! Working-key rotation of a bank, as an operator asks for it (`POST /keys/rotate`
//! on the admin endpoint, `switchyard keys rotate`): the bank's state stages a new
//! ZAK or ZPK and one of its links sends it (`core::bank`, `core::link`); once the
//! bank approves, the key is in use on every link and is saved into the key store
//! file, so that a restart keeps it.
//!
//! Saving: the store is opened again from its files (`[keys] store`,
//! `master_key_file`), the entry of the rotated key replaced by the key in the
//! TR-31 block that went to the bank (unwrapped under the bank's ZMK of the
//! store, its check value compared), and the store written atomically. If that
//! fails the key is already in use with the bank: the rotation still succeeded,
//! and the answer and the log say the store was not updated (a restart, or a
//! reload that reads the old key, would go back to the old key: rotate again once
//! the store can be written).
//!
//! Rotations and reloads run one at a time (a reload reads the key store).

use super::Switch;
use crate::config::KeysConfig;
use crate::core::bank::{KeyChangeOutcome, KeyChangeRefused, KEY_CHANGE_PICKUP_MAX};
use crate::core::link::{kcv_hex, KeyChangeAnswer};
use crate::core::InstitutionId;
use crate::security::WorkingKey;
use std::time::Duration;
use switchyard_security::module::StagedKey;
use switchyard_security::store::KeyStore;

/// How long a rotation waits for its key change's outcome beyond the change's
/// own bounds ([`KEY_CHANGE_PICKUP_MAX`] for a link to take it, then the bank's
/// echo timeout for the answer), which always end it first.
pub const KEY_ROTATION_MARGIN: Duration = Duration::from_secs(1);

/// What a rotation came to.
#[derive(Clone, Debug)]
pub struct Rotation {
    /// The bank, as asked for.
    pub bank: String,
    /// The key rotated.
    pub key: WorkingKey,
    /// Its id in the key store, when the bank has it.
    pub key_id: Option<String>,
    /// The check value of the key in use before.
    pub previous_kcv: Option<[u8; 3]>,
    /// The new key, or why there is none.
    pub result: Result<Rotated, RotationError>,
}

/// A new working key in use.
#[derive(Clone, Debug)]
pub struct Rotated {
    /// Its check value.
    pub kcv: [u8; 3],
    /// The link that carried the key change.
    pub link: Option<usize>,
    /// Whether the key store holds it, or why not.
    pub saved: Result<(), String>,
}

/// Why a rotation did not put a new key in use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    /// No bank of that id in the config in force.
    #[error("no bank {0:?} in the config")]
    UnknownBank(String),
    /// The key change could not start.
    #[error(transparent)]
    Refused(#[from] KeyChangeRefused),
    /// The bank declined, did not answer, or the module refused the new key.
    #[error("{}", describe(.0))]
    Failed(KeyChangeOutcome),
    /// No outcome within the rotation's bound (a link would have reported one).
    #[error("no outcome within {0:?}")]
    NoOutcome(Duration),
}

fn describe(outcome: &KeyChangeOutcome) -> String {
    match outcome {
        KeyChangeOutcome::Activated => "activated".to_owned(),
        KeyChangeOutcome::ActivationRefused(why) => {
            format!("the bank took the key but the security module refused it: {why}")
        }
        KeyChangeOutcome::Failed(KeyChangeAnswer::Declined(code)) => format!(
            "the bank declined the key change (DE39 {}); the old key stays",
            String::from_utf8_lossy(code)
        ),
        KeyChangeOutcome::Failed(KeyChangeAnswer::KcvMismatch) => {
            "the bank answered with another key check value; the old key stays".to_owned()
        }
        KeyChangeOutcome::Failed(KeyChangeAnswer::Unanswered) => {
            "the bank did not answer the key change; the old key stays, and MACs under the \
             new one are accepted in case the bank took it: rotate again"
                .to_owned()
        }
        KeyChangeOutcome::Failed(KeyChangeAnswer::NotSent(why)) => {
            format!("the key change was not sent ({why}); the old key stays")
        }
        KeyChangeOutcome::Failed(KeyChangeAnswer::Approved) => "approved".to_owned(),
    }
}

impl Rotation {
    /// Whether a new key is in use.
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }

    /// The HTTP status the admin endpoint answers with: 200 for a key in use
    /// (saved or not), 404 for an unknown bank, 409 while another rotation runs,
    /// 422 for a bank whose keys do not allow it, 503 with no link up, 502 when
    /// the bank or the module refused, 504 when no answer came.
    pub fn http_status(&self) -> u16 {
        match &self.result {
            Ok(_) => 200,
            Err(RotationError::UnknownBank(_)) => 404,
            Err(RotationError::Refused(KeyChangeRefused::UnderWay)) => 409,
            Err(RotationError::Refused(KeyChangeRefused::Stage(_))) => 422,
            Err(RotationError::Refused(KeyChangeRefused::NoLinkUp)) => 503,
            Err(RotationError::Failed(KeyChangeOutcome::Failed(
                KeyChangeAnswer::Unanswered | KeyChangeAnswer::NotSent(_),
            ))) => 504,
            Err(RotationError::Failed(_)) => 502,
            Err(RotationError::NoOutcome(_)) => 504,
        }
    }

    /// As the admin endpoint answers it: `ok`, `bank`, `key`, `key_id`,
    /// `previous_kcv`; with a new key `kcv`, `link`, `saved` (and `save_error`);
    /// without, `reason`. Never a key or a key block.
    pub fn to_json(&self) -> serde_json::Value {
        let hex = |kcv: [u8; 3]| String::from_utf8_lossy(&kcv_hex(kcv)).into_owned();
        let mut out = serde_json::json!({
            "ok": self.is_ok(),
            "bank": self.bank,
            "key": self.key.as_str(),
            "key_id": self.key_id,
            "previous_kcv": self.previous_kcv.map(hex),
        });
        match &self.result {
            Ok(r) => {
                out["kcv"] = hex(r.kcv).into();
                out["link"] = r.link.into();
                out["saved"] = r.saved.is_ok().into();
                if let Err(why) = &r.saved {
                    out["save_error"] = why.clone().into();
                }
            }
            Err(e) => out["reason"] = e.to_string().into(),
        }
        out
    }
}

impl Switch {
    /// Rotates working key `key` of bank `bank` (see the module docs); returns
    /// once the bank answered, or the bound passed. Waits for a reload or another
    /// rotation under way to finish first.
    pub async fn rotate_key(&self, bank: &str, key: WorkingKey) -> Rotation {
        let _one_at_a_time = self.reloading.lock().await;
        let mut rotation = Rotation {
            bank: bank.to_owned(),
            key,
            key_id: None,
            previous_kcv: None,
            result: Err(RotationError::UnknownBank(bank.to_owned())),
        };
        let id = InstitutionId::from_digits(bank.as_bytes());
        let Some(connector) = self
            .connectors()
            .into_iter()
            .find(|c| Some(c.bank().id) == id)
        else {
            return rotation;
        };
        let security = connector.bank().security.clone();
        let before = security.info(key);
        rotation.key_id = before.as_ref().map(|i| i.id.clone());
        rotation.previous_kcv = before.as_ref().map(|i| i.kcv);
        let (change, outcome) = match connector.start_key_change(key, std::time::Instant::now()) {
            Ok(started) => started,
            Err(refused) => {
                rotation.result = Err(refused.into());
                return rotation;
            }
        };
        let wait = KEY_CHANGE_PICKUP_MAX + connector.bank().echo_timeout + KEY_ROTATION_MARGIN;
        let report = match tokio::time::timeout(wait, outcome).await {
            Ok(Ok(report)) => report,
            // Withdrawn (only this function does that) or timed out.
            Ok(Err(_)) | Err(_) => {
                connector.withdraw_key_change(change);
                rotation.result = Err(RotationError::NoOutcome(wait));
                return rotation;
            }
        };
        if report.outcome != KeyChangeOutcome::Activated {
            rotation.result = Err(RotationError::Failed(report.outcome));
            return rotation;
        }
        let saved = match (self.config().keys.clone(), rotation.key_id.clone()) {
            (Some(keys), Some(key_id)) => {
                let zmk_id = security.zmk_id().unwrap_or_default();
                let staged = report.staged.clone();
                let token = security.token(key);
                tokio::task::spawn_blocking(move || match (&keys.payshield, token) {
                    (Some(hsm), Some((token, kcv))) if kcv == staged.kcv => {
                        crate::hsm_keys::replace_token(&hsm.keys_file, &key_id, &token, kcv)
                            .map_err(|e| e.to_string())
                    }
                    (Some(_), _) => Err(format!(
                        "key {key_id:?}: the module's token is not the key activated"
                    )),
                    (None, _) => save_rotated(&keys, &key_id, &zmk_id, &staged),
                })
                .await
                .unwrap_or_else(|e| Err(format!("saving failed: {e}")))
            }
            _ => Err("no [keys] store in the config in force".to_owned()),
        };
        let kcv = String::from_utf8_lossy(&kcv_hex(report.staged.kcv)).into_owned();
        match &saved {
            Ok(()) => {
                tracing::info!(bank, key = key.as_str(), %kcv, "working key rotated and saved (key store, or payShield tokens file)")
            }
            Err(why) => tracing::error!(bank, key = key.as_str(), %kcv, error = %why,
                "working key rotated and in use with the bank, but NOT saved in the key store: a \
                 restart (or a reload reading the store) would go back to the old key; rotate \
                 again once the store can be written"),
        }
        rotation.result = Ok(Rotated {
            kcv: report.staged.kcv,
            link: report.link,
            saved,
        });
        rotation
    }
}

/// Puts the key of `staged` (a TR-31 block under the store's `zmk_id`) in place
/// of entry `key_id` of the key store, and writes it.
fn save_rotated(
    keys: &KeysConfig,
    key_id: &str,
    zmk_id: &str,
    staged: &StagedKey,
) -> Result<(), String> {
    let mut store =
        KeyStore::open(&keys.store, &keys.master_key_file).map_err(|e| e.to_string())?;
    let kind = store
        .get(key_id)
        .map(|k| k.kind)
        .ok_or_else(|| format!("key {key_id:?} is no longer in the store"))?;
    let entry = store
        .replace_tr31(key_id, kind, &staged.block, zmk_id)
        .map_err(|e| e.to_string())?;
    if entry.kcv != staged.kcv {
        return Err(format!(
            "key {key_id:?}: the block unwrapped under {zmk_id:?} of the store is another key"
        ));
    }
    store.save().map_err(|e| e.to_string())
}
