//! The payShield key tokens file (`[keys.payshield] keys_file`): the keys the
//! switch uses on a hardware HSM, each as the HSM's token (the key enciphered
//! under the HSM's local master key, so never a clear key) with its id, type,
//! algorithm and check value:
//!
//! ```toml
//! [[key]]
//! id = "zak-acq"
//! type = "zak"          # zmk, kbpk, zpk or zak
//! algorithm = "tdes"    # tdes or aes
//! length = 16           # bytes; 16 when left out
//! token = "S10096M3TN00S0000…"
//! kcv = "08D7B4"
//! ```
//!
//! At start-up the switch asks the HSM for every token's check value (`BU`) and
//! refuses to start when one differs. After a working-key rotation the switch
//! puts the new token and check value in place of the old ones and rewrites the
//! file (a temporary file, synced, renamed over it; mode 0600; comments are not
//! kept), so that a restart uses the key the bank now has.

use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use switchyard_security::module::{Usage, KEYS_MAX};
use switchyard_security::payshield::PayShieldKey;
use switchyard_security::Algorithm;

/// The largest tokens file read, bytes.
pub const KEYS_FILE_MAX_BYTES: u64 = 1024 * 1024;

/// The key length when `length` is left out, bytes (double-length TDES,
/// AES-128).
pub const KEY_LENGTH_DEFAULT_BYTES: usize = 16;

/// Why the tokens file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HsmKeysError {
    /// Reading or writing failed.
    #[error("{path}: cannot {action}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The system's error.
        source: std::io::Error,
    },
    /// The file is larger than [`KEYS_FILE_MAX_BYTES`].
    #[error("{0}: larger than {KEYS_FILE_MAX_BYTES} bytes")]
    TooLarge(PathBuf),
    /// The file is not TOML of the expected shape.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's words.
        message: String,
    },
    /// An entry is wrong.
    #[error("{path}: [[key]] {index} ({id:?}): {message}")]
    Entry {
        /// The file.
        path: PathBuf,
        /// The entry's place, from 1.
        index: usize,
        /// Its id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// The file holds more than [`KEYS_MAX`] keys.
    #[error("{0}: more than {KEYS_MAX} keys")]
    TooMany(PathBuf),
    /// Writing the new file failed.
    #[error("{path}: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The key to replace is not in the file.
    #[error("{path}: no key {id:?}")]
    NotFound {
        /// The file.
        path: PathBuf,
        /// The id.
        id: String,
    },
}

/// The file. No `Debug`: it holds tokens.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    key: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    algorithm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    length: Option<usize>,
    token: String,
    kcv: String,
}

fn read(path: &Path) -> Result<TokensFile, HsmKeysError> {
    let io = |action| {
        move |source| HsmKeysError::Io {
            path: path.to_owned(),
            action,
            source,
        }
    };
    let meta = fs::metadata(path).map_err(io("read"))?;
    if meta.len() > KEYS_FILE_MAX_BYTES {
        return Err(HsmKeysError::TooLarge(path.to_owned()));
    }
    let text = fs::read_to_string(path).map_err(io("read"))?;
    let file: TokensFile = toml::from_str(&text).map_err(|e| HsmKeysError::Syntax {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })?;
    if file.key.len() > KEYS_MAX {
        return Err(HsmKeysError::TooMany(path.to_owned()));
    }
    Ok(file)
}

fn kcv_of(text: &str) -> Option<[u8; 3]> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    match text.as_bytes() {
        [a, b, c, d, e, f] => Some([
            digit(*a)? << 4 | digit(*b)?,
            digit(*c)? << 4 | digit(*d)?,
            digit(*e)? << 4 | digit(*f)?,
        ]),
        _ => None,
    }
}

/// The keys of the tokens file at `path`. The HSM is not asked here (see
/// `PayShieldModule::check_keys`).
pub fn load(path: &Path) -> Result<Vec<PayShieldKey>, HsmKeysError> {
    let file = read(path)?;
    let mut keys = Vec::with_capacity(file.key.len());
    for (i, e) in file.key.into_iter().enumerate() {
        let wrong = |message: String| HsmKeysError::Entry {
            path: path.to_owned(),
            index: i + 1,
            id: e.id.clone(),
            message,
        };
        let usage = match e.kind.as_str() {
            "zmk" | "kbpk" => Usage::KeyEncryption,
            "zpk" => Usage::Pin,
            "zak" => Usage::Mac,
            other => {
                return Err(wrong(format!(
                    "type is \"zmk\", \"kbpk\", \"zpk\" or \"zak\", found {other:?} (the \
                     journal's data key stays in the key store)"
                )))
            }
        };
        let algorithm = match e.algorithm.as_str() {
            "tdes" => Algorithm::Tdes,
            "aes" => Algorithm::Aes,
            other => {
                return Err(wrong(format!(
                    "algorithm is \"tdes\" or \"aes\", found {other:?}"
                )))
            }
        };
        let Some(kcv) = kcv_of(&e.kcv) else {
            return Err(wrong("kcv is 6 hex digits".to_owned()));
        };
        keys.push(PayShieldKey {
            id: e.id.clone(),
            usage,
            algorithm,
            length_bytes: e.length.unwrap_or(KEY_LENGTH_DEFAULT_BYTES),
            token: e.token,
            kcv,
        });
    }
    Ok(keys)
}

/// Puts `token` and `kcv` in place of key `id`'s in the tokens file at `path`,
/// and writes it (temporary file, synced, renamed over it, directory synced).
pub fn replace_token(path: &Path, id: &str, token: &str, kcv: [u8; 3]) -> Result<(), HsmKeysError> {
    let mut file = read(path)?;
    let entry = file
        .key
        .iter_mut()
        .find(|e| e.id == id)
        .ok_or_else(|| HsmKeysError::NotFound {
            path: path.to_owned(),
            id: id.to_owned(),
        })?;
    entry.token = token.to_owned();
    entry.kcv = switchyard_security::store::kcv_hex(kcv);
    let text = toml::to_string(&file).map_err(|e| HsmKeysError::Syntax {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let text = format!(
        "# payShield key tokens of switchyard (rewritten by the switch after a key rotation)\n\n{text}"
    );
    switchyard_security::store::write_atomically(path, text.as_bytes()).map_err(|e| {
        HsmKeysError::Write {
            path: path.to_owned(),
            message: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hsm-keys-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    const FILE: &str = r#"
[[key]]
id = "zak-a"
type = "zak"
algorithm = "tdes"
token = "S-one"
kcv = "08d7b4"

[[key]]
id = "zmk-a"
type = "zmk"
algorithm = "aes"
length = 32
token = "S-two"
kcv = "ABCDEF"
"#;

    #[test]
    fn keys_load_and_a_replaced_token_is_written_in_place() {
        let d = dir("load");
        let path = d.join("hsm-keys.toml");
        fs::write(&path, FILE).unwrap();
        let keys = load(&path).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].usage, Usage::Mac);
        assert_eq!(keys[0].length_bytes, KEY_LENGTH_DEFAULT_BYTES);
        assert_eq!(keys[0].kcv, [0x08, 0xD7, 0xB4]);
        assert_eq!(keys[1].algorithm, Algorithm::Aes);
        assert_eq!(keys[1].length_bytes, 32);

        replace_token(&path, "zak-a", "S-three", [1, 2, 0xAB]).unwrap();
        let keys = load(&path).unwrap();
        assert_eq!(keys[0].token, "S-three");
        assert_eq!(keys[0].kcv, [1, 2, 0xAB]);
        assert_eq!(keys[1].token, "S-two");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            replace_token(&path, "nope", "S", [0; 3]),
            Err(HsmKeysError::NotFound { .. })
        ));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn wrong_entries_are_named() {
        let d = dir("wrong");
        let path = d.join("hsm-keys.toml");
        for (text, says) in [
            (FILE.replace("\"zmk\"", "\"dek\""), "[[key]] 2"),
            (FILE.replace("\"aes\"", "\"des\""), "algorithm"),
            (FILE.replace("08d7b4", "08d7"), "kcv"),
            (FILE.replace("token", "tokn"), "unknown field"),
        ] {
            fs::write(&path, text).unwrap();
            let e = load(&path).expect_err("refused").to_string();
            assert!(e.contains(says), "{e}");
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
