//! A chunk: a fixed, volume-aligned slice of plaintext, named by a keyed hash of its
//! content and stored compressed and sealed.
//!
//! ```text
//! name   = BLAKE3-keyed(name key, content)                  (32 bytes, 64 hex digits)
//! object = "TTC1" | encoding u8 | nonce (12) | AES-256-GCM(chunk key, body) | tag (16)
//! body   = zstd(content) when encoding = 1, content when 0
//! AAD    = "TTC1" | encoding | name
//! ```
//!
//! The name is keyed so that someone who can list the bucket cannot test whether it
//! holds a chunk of known content. It is the AAD, so an object copied under another
//! name fails to open; and the content is hashed again after opening, so a restore
//! never writes a chunk that is not what its name says.

use crate::error::BackupError;
use crate::keys::{self, Keys};

const MAGIC: &[u8; 4] = b"TTC1";
const RAW: u8 = 0;
const ZSTD: u8 = 1;
/// zstd level: 1 compresses at several hundred MB/s per core, and the chunks of a
/// block device are mostly either compressible text and pages or incompressible data.
const LEVEL: i32 = 1;
/// Smallest and largest chunk sizes a target may use.
pub const MIN_CHUNK: u64 = 256 << 10;
/// Largest chunk size.
pub const MAX_CHUNK: u64 = 16 << 20;
/// The default chunk size.
pub const DEFAULT_CHUNK: u64 = 1 << 20;

/// A chunk's name: the keyed hash of its content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkName(pub [u8; 32]);

impl ChunkName {
    /// The name as 64 hex digits.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn parse(s: &str) -> Option<ChunkName> {
        let b = hex::decode(s).ok()?;
        Some(ChunkName(b.try_into().ok()?))
    }
}

impl std::fmt::Debug for ChunkName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.hex()[..16])
    }
}

impl std::fmt::Display for ChunkName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// A stored chunk: its content's name, and the tag of the upload that stored it.
///
/// Every upload gets a fresh random tag, so each object is written once and never
/// overwritten. That is what lets gc trust what its listing said about an object
/// (its age) until it deletes it: a backup uploading the same content meanwhile
/// writes another object. Tag 0 is the key without a tag.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ChunkRef {
    /// The content's name.
    pub name: ChunkName,
    /// The upload's tag.
    pub tag: u64,
}

impl ChunkRef {
    /// A fresh reference for a new upload of `name`.
    pub fn fresh(name: ChunkName) -> Result<ChunkRef, BackupError> {
        let tag = u64::from_le_bytes(crate::keys::random()?).max(1);
        Ok(ChunkRef { name, tag })
    }

    /// The object's file name: the name's hex digits, then `-` and the tag's.
    pub fn key(&self) -> String {
        match self.tag {
            0 => self.name.hex(),
            t => format!("{}-{t:016x}", self.name.hex()),
        }
    }

    /// Parses what [`ChunkRef::key`] makes.
    pub fn parse_key(s: &str) -> Option<ChunkRef> {
        let (name, tag) = match s.split_once('-') {
            Some((n, t)) if t.len() == 16 => (n, u64::from_str_radix(t, 16).ok()?),
            Some(_) => return None,
            None => (s, 0),
        };
        Some(ChunkRef {
            name: ChunkName::parse(name)?,
            tag,
        })
    }
}

impl std::fmt::Display for ChunkRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// The name `content` gets under `keys`.
pub fn name_of(keys: &Keys, content: &[u8]) -> ChunkName {
    ChunkName(*blake3::keyed_hash(keys.name_key(), content).as_bytes())
}

/// Whether every byte is zero (such chunks get no object).
pub fn is_zero(content: &[u8]) -> bool {
    // 16 bytes per compare: this runs over every byte a backup reads.
    let mut words = content.chunks_exact(16);
    words.by_ref().all(|w| {
        w.try_into()
            .is_ok_and(|w: [u8; 16]| u128::from_ne_bytes(w) == 0)
    }) && words.remainder().iter().all(|&b| b == 0)
}

fn aad(encoding: u8, name: &ChunkName) -> [u8; 37] {
    let mut a = [0u8; 37];
    a[..4].copy_from_slice(MAGIC);
    a[4] = encoding;
    a[5..].copy_from_slice(&name.0);
    a
}

/// Names, compresses (when that helps) and seals `content`: (name, object bytes).
pub fn seal(keys: &Keys, content: &[u8]) -> Result<(ChunkName, Vec<u8>), BackupError> {
    let name = name_of(keys, content);
    let compressed = zstd::bulk::compress(content, LEVEL)
        .map_err(|e| BackupError::Volume(format!("zstd failed on chunk {name}: {e}")))?;
    let (encoding, body) = if compressed.len() < content.len() {
        (ZSTD, compressed.as_slice())
    } else {
        (RAW, content)
    };
    let sealed = keys::seal(&keys.chunk_key()?, &aad(encoding, &name), body)?;
    let mut out = Vec::with_capacity(5 + sealed.len());
    out.extend_from_slice(MAGIC);
    out.push(encoding);
    out.extend_from_slice(&sealed);
    Ok((name, out))
}

/// Opens the object of chunk `name`, of `len` content bytes, and checks that its
/// content hashes to `name`. `what` names the chunk and backup in errors.
pub fn open(
    keys: &Keys,
    name: &ChunkName,
    object: &[u8],
    len: usize,
    what: &str,
) -> Result<Vec<u8>, BackupError> {
    let corrupt =
        |why: &str| BackupError::Corrupt(format!("{what}: {why}; the chunk was not used"));
    if object.len() < 5 || &object[..4] != MAGIC {
        return Err(corrupt("not a tether chunk object (bad magic)"));
    }
    let encoding = object[4];
    if encoding != RAW && encoding != ZSTD {
        return Err(corrupt("unknown encoding"));
    }
    let body =
        keys::open(&keys.chunk_key()?, &aad(encoding, name), &object[5..]).ok_or_else(|| {
            corrupt("failed authentication (tampered, damaged or stored under another name)")
        })?;
    let content = if encoding == ZSTD {
        // The capacity bounds what a hostile frame can make us allocate.
        zstd::bulk::decompress(&body, len).map_err(|e| corrupt(&format!("bad zstd frame: {e}")))?
    } else {
        body
    };
    if content.len() != len {
        return Err(corrupt(&format!(
            "holds {} bytes where the manifest says {len}",
            content.len()
        )));
    }
    if name_of(keys, &content) != *name {
        return Err(corrupt("content does not hash to its name"));
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> Keys {
        Keys::from_master([9; 32])
    }

    #[test]
    fn round_trip_compressible_and_not() {
        let k = keys();
        let text = vec![b'a'; 1 << 20];
        let (n, obj) = seal(&k, &text).unwrap();
        assert!(obj.len() < 10_000, "text compresses");
        assert_eq!(open(&k, &n, &obj, text.len(), "c").unwrap(), text);
        let mut random = vec![0u8; 1 << 16];
        getrandom::fill(&mut random).unwrap();
        let (n2, obj2) = seal(&k, &random).unwrap();
        assert_eq!(obj2[4], RAW);
        assert_eq!(open(&k, &n2, &obj2, random.len(), "c").unwrap(), random);
    }

    #[test]
    fn names_are_keyed() {
        let data = b"known content".repeat(100);
        assert_ne!(
            name_of(&keys(), &data),
            name_of(&Keys::from_master([8; 32]), &data)
        );
        assert_ne!(name_of(&keys(), &data).0, *blake3::hash(&data).as_bytes());
    }

    #[test]
    fn every_flipped_byte_and_a_swapped_name_fail() {
        let k = keys();
        let data = b"0123456789abcdef".repeat(64);
        let (n, obj) = seal(&k, &data).unwrap();
        for i in 0..obj.len() {
            let mut bad = obj.clone();
            bad[i] ^= 0x40;
            assert!(matches!(
                open(&k, &n, &bad, data.len(), "c"),
                Err(BackupError::Corrupt(_))
            ));
        }
        let other = name_of(&k, b"other");
        assert!(open(&k, &other, &obj, data.len(), "c").is_err());
        assert!(open(&k, &n, &obj, data.len() + 1, "c").is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 4099]));
        for i in [0, 7, 8, 4095, 4098] {
            let mut b = vec![0; 4099];
            b[i] = 1;
            assert!(!is_zero(&b), "{i}");
        }
        assert!(is_zero(&[]));
    }

    proptest! {
        #[test]
        fn random_objects_never_open_or_panic(obj in proptest::collection::vec(any::<u8>(), 0..200), len in 0usize..5000) {
            let k = keys();
            let n = name_of(&k, b"x");
            prop_assert!(open(&k, &n, &obj, len, "c").is_err());
        }
    }
}
