//! The target's master key: random, independent of every volume key, stored in the
//! target only wrapped (by a passphrase stretched with Argon2id, or by a key file).
//! Every key the backups use is derived from it with HKDF-SHA256.
//!
//! ```text
//! wrapping key  = Argon2id(passphrase, salt)        or  HKDF(key file, salt, "tether backup key file")
//! wrapped       = AES-256-GCM(wrapping key, nonce, master key, AAD = "tether backup master key v1")
//! name key      = HKDF(master, info = "tether backup chunk names")      BLAKE3 keyed hash
//! chunk key     = HKDF(master, info = "tether backup chunk seal")       AES-256-GCM
//! manifest key  = HKDF(master, info = "tether backup manifest seal")    AES-256-GCM
//! ```
//!
//! Losing both the passphrase (or key file) and every copy of the master key loses
//! every backup in the target: nothing else can open them.

use hkdf::Hkdf;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::BackupError;

const WRAP_AAD: &[u8] = b"tether backup master key v1";
/// Bytes of a nonce for AES-256-GCM.
pub const NONCE: usize = 12;
/// Bytes of an AES-256-GCM tag.
pub const TAG: usize = 16;

/// What unlocks the master key: a passphrase or the bytes of a key file.
#[derive(Clone)]
pub enum Secret {
    /// A passphrase, stretched with Argon2id.
    Passphrase(Vec<u8>),
    /// A key file's contents (at least 32 bytes), expanded with HKDF.
    KeyFile(Vec<u8>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Passphrase(_) => f.write_str("Secret::Passphrase(..)"),
            Secret::KeyFile(_) => f.write_str("Secret::KeyFile(..)"),
        }
    }
}

/// The master key as stored in the target's `target.json`: never in the clear.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WrappedKey {
    /// "passphrase" (Argon2id) or "key-file" (HKDF).
    pub kind: String,
    /// Argon2id memory in KiB, passes and lanes (passphrase only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argon2: Option<[u32; 3]>,
    /// Hex: the salt of the stretch.
    pub salt: String,
    /// Hex: the nonce of the wrap.
    pub nonce: String,
    /// Hex: the master key sealed under the wrapping key, with its tag.
    pub wrapped: String,
}

/// The keys every backup of a target uses, derived from its master key.
#[derive(Clone)]
pub struct Keys {
    master: [u8; 32],
    name: [u8; 32],
    chunk: [u8; 32],
    manifest: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

fn derive(master: &[u8; 32], info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit, so expand cannot fail.
    let _ = Hkdf::<Sha256>::new(None, master).expand(info, &mut out);
    out
}

/// An AES-256-GCM key; ring accepts every 32-byte key.
pub(crate) fn aead(key: &[u8; 32]) -> Result<LessSafeKey, BackupError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| BackupError::Key("AES-256-GCM refused a 32-byte key".into()))
}

/// Fresh random bytes from the OS.
pub(crate) fn random<const N: usize>() -> Result<[u8; N], BackupError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)
        .map_err(|e| BackupError::Key(format!("the OS random source failed: {e}")))?;
    Ok(b)
}

/// Seals `plain` under `key` with a random nonce: nonce | ciphertext | tag.
pub(crate) fn seal(key: &LessSafeKey, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, BackupError> {
    let nonce: [u8; NONCE] = random()?;
    let mut out = Vec::with_capacity(NONCE + plain.len() + TAG);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE..],
        )
        .map_err(|_| BackupError::Key("AES-256-GCM failed to seal".into()))?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens what [`seal`] made; `None` when it fails authentication.
pub(crate) fn open(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE + TAG {
        return None;
    }
    let nonce: [u8; NONCE] = sealed[..NONCE].try_into().ok()?;
    let mut buf = sealed[NONCE..].to_vec();
    let n = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .ok()?
        .len();
    buf.truncate(n);
    Some(buf)
}

/// Argon2id cost of a new wrap: 64 MiB, 3 passes, 1 lane. target.json is readable by
/// whoever can read the bucket, so the passphrase must resist offline guessing; this
/// costs about a quarter of a second per unlock.
const ARGON2: [u32; 3] = [64 << 10, 3, 1];
/// Shortest passphrase accepted.
pub const MIN_PASSPHRASE: usize = 8;

fn wrapping_key(
    secret: &Secret,
    salt: &[u8],
    argon: Option<[u32; 3]>,
) -> Result<[u8; 32], BackupError> {
    let mut out = [0u8; 32];
    match secret {
        Secret::Passphrase(p) => {
            if p.len() < MIN_PASSPHRASE {
                return Err(BackupError::Invalid(format!(
                    "the backup passphrase is shorter than {MIN_PASSPHRASE} characters; choose a longer one"
                )));
            }
            let [m, t, l] = argon.unwrap_or(ARGON2);
            // Bounds keep a tampered target.json from asking for terabytes of memory.
            if !(8..=4 << 20).contains(&m) || !(1..=64).contains(&t) || !(1..=16).contains(&l) {
                return Err(BackupError::Corrupt(format!(
                    "the target's Argon2id parameters {m} KiB / {t} passes / {l} lanes are out of range"
                )));
            }
            let params = argon2::Params::new(m, t, l, Some(32))
                .map_err(|e| BackupError::Corrupt(format!("Argon2id parameters: {e}")))?;
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into(p, salt, &mut out)
                .map_err(|e| BackupError::Key(format!("Argon2id: {e}")))?;
        }
        Secret::KeyFile(k) => {
            if k.len() < 32 {
                return Err(BackupError::Invalid(format!(
                    "the backup key file holds {} bytes; it needs at least 32 random bytes (e.g. `head -c 32 /dev/urandom > FILE`)",
                    k.len()
                )));
            }
            let _ = Hkdf::<Sha256>::new(Some(salt), k).expand(b"tether backup key file", &mut out);
        }
    }
    Ok(out)
}

impl Keys {
    /// A new random master key.
    pub fn generate() -> Result<Keys, BackupError> {
        Ok(Keys::from_master(random()?))
    }

    /// The keys derived from `master`.
    pub fn from_master(master: [u8; 32]) -> Keys {
        Keys {
            master,
            name: derive(&master, b"tether backup chunk names"),
            chunk: derive(&master, b"tether backup chunk seal"),
            manifest: derive(&master, b"tether backup manifest seal"),
        }
    }

    /// The master key itself (to pass to an engine over its local control socket).
    pub fn master(&self) -> &[u8; 32] {
        &self.master
    }

    /// Key of the chunk names' keyed hash.
    pub(crate) fn name_key(&self) -> &[u8; 32] {
        &self.name
    }

    /// Key sealing chunks.
    pub(crate) fn chunk_key(&self) -> Result<LessSafeKey, BackupError> {
        aead(&self.chunk)
    }

    /// Key sealing manifests.
    pub(crate) fn manifest_key(&self) -> Result<LessSafeKey, BackupError> {
        aead(&self.manifest)
    }

    /// The master key wrapped under `secret`, for `target.json`.
    pub fn wrap(&self, secret: &Secret) -> Result<WrappedKey, BackupError> {
        let salt: [u8; 16] = random()?;
        let argon = matches!(secret, Secret::Passphrase(_)).then_some(ARGON2);
        let kek = aead(&wrapping_key(secret, &salt, argon)?)?;
        let sealed = seal(&kek, WRAP_AAD, &self.master)?;
        Ok(WrappedKey {
            kind: match secret {
                Secret::Passphrase(_) => "passphrase".into(),
                Secret::KeyFile(_) => "key-file".into(),
            },
            argon2: argon,
            salt: hex::encode(salt),
            nonce: hex::encode(&sealed[..NONCE]),
            wrapped: hex::encode(&sealed[NONCE..]),
        })
    }

    /// Unwraps the master key; a wrong passphrase or key file is a [`BackupError::Key`].
    pub fn unwrap(w: &WrappedKey, secret: &Secret, target: &str) -> Result<Keys, BackupError> {
        let want = match secret {
            Secret::Passphrase(_) => "passphrase",
            Secret::KeyFile(_) => "key-file",
        };
        if w.kind != want {
            return Err(BackupError::Key(format!(
                "backup target {target}: its master key is wrapped by a {}, not a {want}; give the {} (TETHER_BACKUP_PASSPHRASE or --passphrase-file, or --backup-key-file)",
                w.kind, w.kind
            )));
        }
        let bad = |what: &str| {
            BackupError::Corrupt(format!(
                "backup target {target}: target.json has a malformed {what}"
            ))
        };
        let salt = hex::decode(&w.salt).map_err(|_| bad("salt"))?;
        let mut sealed = hex::decode(&w.nonce).map_err(|_| bad("nonce"))?;
        if sealed.len() != NONCE {
            return Err(bad("nonce"));
        }
        sealed.extend(hex::decode(&w.wrapped).map_err(|_| bad("wrapped key"))?);
        let kek = aead(&wrapping_key(secret, &salt, w.argon2)?)?;
        let master = open(&kek, WRAP_AAD, &sealed)
            .and_then(|m| <[u8; 32]>::try_from(m.as_slice()).ok())
            .ok_or_else(|| {
                BackupError::Key(format!(
                    "backup target {target}: the {want} does not open the master key (wrong {want}, or target.json was changed)"
                ))
            })?;
        Ok(Keys::from_master(master))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_and_wrong_secret() {
        let k = Keys::generate().unwrap();
        for secret in [
            Secret::Passphrase(b"correct horse".to_vec()),
            Secret::KeyFile(vec![7u8; 32]),
        ] {
            let w = k.wrap(&secret).unwrap();
            let back = Keys::unwrap(&w, &secret, "t").unwrap();
            assert_eq!(back.master(), k.master());
            let wrong = match &secret {
                Secret::Passphrase(_) => Secret::Passphrase(b"wrong horse".to_vec()),
                Secret::KeyFile(_) => Secret::KeyFile(vec![8u8; 32]),
            };
            assert!(matches!(
                Keys::unwrap(&w, &wrong, "t"),
                Err(BackupError::Key(_))
            ));
        }
    }

    #[test]
    fn derived_keys_differ() {
        let k = Keys::from_master([1; 32]);
        assert_ne!(k.name, k.chunk);
        assert_ne!(k.chunk, k.manifest);
        assert_ne!(&k.name, k.master());
    }

    #[test]
    fn short_key_file_and_absurd_argon_are_refused() {
        assert!(matches!(
            wrapping_key(&Secret::KeyFile(vec![1; 16]), b"salt", None),
            Err(BackupError::Invalid(_))
        ));
        assert!(matches!(
            wrapping_key(
                &Secret::Passphrase(b"long enough".to_vec()),
                b"saltsalt",
                Some([u32::MAX, 1, 1])
            ),
            Err(BackupError::Corrupt(_))
        ));
    }
}
