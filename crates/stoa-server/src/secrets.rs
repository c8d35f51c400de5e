//! Encryption at rest of secrets (XChaCha20-Poly1305, an authenticated cipher) under a
//! master key.
//!
//! The master key comes from `secrets.master_key` (config or
//! `STOA_SECRETS__MASTER_KEY`, 64 hex characters) or from `DATA_DIR/master.key`
//! (generated at first start, mode 0600). That file holds one key per line: the first
//! encrypts, the others (kept during a rotation) only decrypt. Every ciphertext records
//! the id of the key that made it, so a wrong key is a clear error at start, never
//! garbage, and keys can be rotated (`stoa secrets rotate-key`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::Rng;
use sha2::{Digest, Sha256};
use stoa_store::{Sealed, Store};

/// Errors of the keyring.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The key material is unusable.
    #[error("invalid master key: {0}")]
    BadKey(String),
    /// A value was sealed with a key this server does not have.
    #[error(
        "a stored secret was encrypted with master key {have}, but this server's master key is {want}; start it with the right key (secrets.master_key, STOA_SECRETS__MASTER_KEY or DATA_DIR/master.key)"
    )]
    WrongKey { have: String, want: String },
    /// Decryption failed (tampered data, or a different key with the same id).
    #[error("a stored secret could not be decrypted with master key {0}")]
    Undecryptable(String),
    /// The key file could not be read or written.
    #[error("master key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Key {
    id: String,
    cipher: XChaCha20Poly1305,
    /// A key derived from this one that signs the dashboard's sessions (so every
    /// server that shares the master key accepts them).
    sessions: [u8; 32],
}

impl Key {
    fn from_bytes(bytes: &[u8]) -> Result<Key, SecretError> {
        if bytes.len() != 32 {
            return Err(SecretError::BadKey(
                "a master key is 32 bytes (64 hex characters)".into(),
            ));
        }
        Ok(Key {
            id: hex::encode(&Sha256::digest(bytes)[..8]),
            cipher: XChaCha20Poly1305::new_from_slice(bytes)
                .map_err(|e| SecretError::BadKey(e.to_string()))?,
            sessions: {
                use hmac::Mac;
                let mut mac = <hmac::Hmac<Sha256> as Mac>::new_from_slice(bytes)
                    .map_err(|e| SecretError::BadKey(e.to_string()))?;
                mac.update(b"stoa dashboard sessions v1");
                mac.finalize().into_bytes().into()
            },
        })
    }

    fn from_hex(s: &str) -> Result<Key, SecretError> {
        let bytes =
            hex::decode(s.trim()).map_err(|e| SecretError::BadKey(format!("not hex: {e}")))?;
        Key::from_bytes(&bytes)
    }
}

/// The master keys of this server.
pub struct Keyring {
    keys: Mutex<Vec<Key>>,
    /// The key file, when the keys come from one (re-read when a value names a key
    /// that is not loaded: a rotation by the CLI while the server runs).
    file: Option<PathBuf>,
}

/// Generates a new random key, as hex.
pub fn generate_key_hex() -> String {
    let mut k = [0u8; 32];
    rand::rng().fill(&mut k);
    hex::encode(k)
}

fn read_key_file(path: &Path) -> Result<Vec<Key>, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let keys = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(Key::from_hex)
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(SecretError::BadKey(format!(
            "{} holds no key",
            path.display()
        )));
    }
    Ok(keys)
}

/// Writes key lines atomically with mode 0600.
pub fn write_key_file(path: &Path, hex_keys: &[String]) -> Result<(), SecretError> {
    let tmp = path.with_extension("tmp");
    let text = format!("{}\n", hex_keys.join("\n"));
    crate::auth::write_private(&tmp, &text).map_err(|source| SecretError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Keyring {
    /// The keyring from the configured key, else from `DATA_DIR/master.key`. A key file
    /// is generated only when the store holds no sealed value yet.
    pub async fn load(
        configured: Option<&str>,
        data_dir: &Path,
        store: &dyn Store,
    ) -> anyhow::Result<Keyring> {
        if let Some(k) = configured {
            return Ok(Keyring {
                keys: Mutex::new(vec![Key::from_hex(k)?]),
                file: None,
            });
        }
        let path = data_dir.join("master.key");
        if !path.exists() {
            if !store.all_sealed().await?.is_empty() {
                anyhow::bail!(
                    "the store holds encrypted secrets but there is no master key: {} is missing and secrets.master_key is not set",
                    path.display()
                );
            }
            write_key_file(&path, &[generate_key_hex()])?;
        }
        Ok(Keyring {
            keys: Mutex::new(read_key_file(&path)?),
            file: Some(path),
        })
    }

    /// The keyring of a key given as hex (tools and tests).
    pub fn from_hex(k: &str) -> Result<Keyring, SecretError> {
        Ok(Keyring {
            keys: Mutex::new(vec![Key::from_hex(k)?]),
            file: None,
        })
    }

    /// The id of the key that encrypts.
    pub fn current_id(&self) -> String {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())[0]
            .id
            .clone()
    }

    /// The key that signs dashboard sessions, derived from the current master key (a
    /// rotation signs everyone out).
    pub fn session_key(&self) -> [u8; 32] {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())[0].sessions
    }

    /// Encrypts with the current key.
    pub fn seal(&self, plain: &[u8]) -> Sealed {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let mut nonce = [0u8; 24];
        rand::rng().fill(&mut nonce);
        let ciphertext = keys[0]
            .cipher
            .encrypt(XNonce::from_slice(&nonce), plain)
            .expect("encryption with a valid key does not fail");
        Sealed {
            ciphertext,
            nonce: nonce.to_vec(),
            key_id: keys[0].id.clone(),
        }
    }

    fn try_open(&self, s: &Sealed) -> Option<Result<Vec<u8>, SecretError>> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let key = keys.iter().find(|k| k.id == s.key_id)?;
        if s.nonce.len() != 24 {
            return Some(Err(SecretError::Undecryptable(s.key_id.clone())));
        }
        Some(
            key.cipher
                .decrypt(XNonce::from_slice(&s.nonce), s.ciphertext.as_slice())
                .map_err(|_| SecretError::Undecryptable(s.key_id.clone())),
        )
    }

    /// Decrypts a value sealed by any key of the ring.
    pub fn open(&self, s: &Sealed) -> Result<Vec<u8>, SecretError> {
        if let Some(r) = self.try_open(s) {
            return r;
        }
        // Not loaded: the key file may have been rotated since start.
        if let Some(path) = &self.file
            && let Ok(keys) = read_key_file(path)
        {
            *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = keys;
            if let Some(r) = self.try_open(s) {
                return r;
            }
        }
        Err(SecretError::WrongKey {
            have: s.key_id.clone(),
            want: self.current_id(),
        })
    }

    /// Decrypts a value that must be text.
    pub fn open_string(&self, s: &Sealed) -> Result<String, SecretError> {
        String::from_utf8(self.open(s)?).map_err(|_| SecretError::Undecryptable(s.key_id.clone()))
    }

    /// Checks that every sealed value in the store opens with this keyring.
    pub async fn verify(&self, store: &dyn Store) -> anyhow::Result<()> {
        for (_, sealed) in store.all_sealed().await? {
            self.open(&sealed)?;
        }
        Ok(())
    }
}

/// Rotates the master key of a file-based keyring: writes a new key (keeping the old
/// one for decryption), re-encrypts every sealed value under it in one transaction,
/// then drops the old key from the file. Safe to interrupt: the file always holds a key
/// for every value in the store. Returns (old id, new id, values re-encrypted).
pub async fn rotate(data_dir: &Path, store: &dyn Store) -> anyhow::Result<(String, String, usize)> {
    let path = data_dir.join("master.key");
    let old_text = std::fs::read_to_string(&path).map_err(|source| SecretError::Io {
        path: path.clone(),
        source,
    })?;
    let old_lines: Vec<String> = old_text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let old = Keyring {
        keys: Mutex::new(read_key_file(&path)?),
        file: None,
    };
    old.verify(store).await?;
    let new_hex = generate_key_hex();
    let mut both = vec![new_hex.clone()];
    both.extend(old_lines);
    write_key_file(&path, &both)?;
    let new = Keyring::from_hex(&new_hex)?;
    let mut items = Vec::new();
    for (at, sealed) in store.all_sealed().await? {
        let plain = old.open(&sealed)?;
        items.push((at, new.seal(&plain)));
    }
    let n = items.len();
    store.reseal(items).await?;
    write_key_file(&path, &[new_hex])?;
    Ok((old.current_id(), new.current_id(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_wrong_key() {
        let a = Keyring::from_hex(&generate_key_hex()).unwrap();
        let b = Keyring::from_hex(&generate_key_hex()).unwrap();
        let s = a.seal(b"hunter2");
        assert_ne!(s.ciphertext, b"hunter2");
        assert_eq!(a.open(&s).unwrap(), b"hunter2");
        assert!(matches!(b.open(&s), Err(SecretError::WrongKey { .. })));
        let mut tampered = s.clone();
        tampered.ciphertext[0] ^= 1;
        assert!(matches!(
            a.open(&tampered),
            Err(SecretError::Undecryptable(_))
        ));
    }
}
