//! A backup's manifest: what was backed up and the full chunk map, so that any one
//! manifest restores on its own.
//!
//! ```text
//! object = "TTM1" | nonce (12) | AES-256-GCM(manifest key, zstd(body)) | tag (16)
//! AAD    = "TTM1" | volume | "/" | backup id
//! body   = header length u32 LE | header (JSON) | count u64 LE | count × (chunk index u64 LE | name (32))
//! ```
//!
//! The AAD binds a manifest to its place in the target, so one moved to another
//! volume's or another backup's name fails to open. Chunk indices are strictly
//! increasing and below the volume's chunk count; an absent index is an all-zero chunk.

use std::collections::BTreeMap;
use std::io::Read as _;

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkName, ChunkRef, MAX_CHUNK, MIN_CHUNK};
use crate::error::BackupError;
use crate::keys::{self, Keys};

const MAGIC: &[u8; 4] = b"TTM1";
/// The largest manifest body read back: a 64 TiB volume of 1 MiB chunks, all full.
const MAX_BODY: u64 = 64 << 20 << 5;
/// The format this code writes. Format 1 (read too) had no upload tags: each chunk's
/// object was keyed by its name alone.
pub const FORMAT: u32 = 2;

/// What a backup did, for `inspect` and the benchmark.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Chunks read from the volume (changed or compared).
    pub chunks_read: u64,
    /// Chunks uploaded (new content).
    pub chunks_uploaded: u64,
    /// Plaintext bytes read from the volume.
    pub bytes_read: u64,
    /// Bytes of the uploaded objects (compressed and sealed).
    pub bytes_uploaded: u64,
    /// How the changed chunks were found: "layer index", "compare", or "full".
    pub method: String,
    /// Milliseconds from start to the manifest written.
    pub millis: u64,
}

/// Everything about a backup but its chunk map.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    /// Format of the manifest.
    pub format: u32,
    /// The backup's id: its UTC time and a random suffix, e.g. `20261202T180000.123Z-3fa2c1`.
    pub id: String,
    /// The volume backed up.
    pub volume: String,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes per chunk (the target's).
    pub chunk_size: u64,
    /// The snapshot read, and its sequence number on the replicas.
    pub snapshot: String,
    /// The snapshot's sequence number, which tells a reused name apart.
    pub snapshot_seq: u64,
    /// The backup this one was made incrementally from.
    #[serde(default)]
    pub parent: Option<String>,
    /// Seconds since the Unix epoch when the snapshot was taken.
    pub created: u64,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What the backup did.
    #[serde(default)]
    pub stats: Stats,
}

/// A backup's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The backup's description.
    pub header: Header,
    /// (chunk index, stored chunk) of every chunk that is not all zeroes, by index.
    pub chunks: Vec<(u64, ChunkRef)>,
}

/// Bytes of one chunk map entry: index and name, and from format 2 the upload tag.
fn entry_len(format: u32) -> usize {
    if format >= 2 {
        48
    } else {
        40
    }
}

/// Checks a chunk size: a power of two from 256 KiB to 16 MiB.
pub fn check_chunk_size(n: u64) -> Result<(), BackupError> {
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&n) || !n.is_power_of_two() {
        return Err(BackupError::Invalid(format!(
            "chunk size {n} must be a power of two from 256 KiB to 16 MiB"
        )));
    }
    Ok(())
}

impl Header {
    /// How many chunks the volume spans (the last may be short).
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size.max(1))
    }

    /// Bytes of chunk `index` (the volume's tail makes the last one short).
    pub fn chunk_len(&self, index: u64) -> u64 {
        let off = index.saturating_mul(self.chunk_size);
        self.size.saturating_sub(off).min(self.chunk_size)
    }

    /// The creation time as RFC 3339.
    pub fn time(&self) -> String {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.created),
        )
        .to_string()
    }
}

/// What a sealed chunk map is: a backup's manifest, or a running backup's checkpoint.
/// The AAD tells them apart, so neither opens as the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Manifest,
    Checkpoint,
}

fn aad(volume: &str, id: &str, kind: Kind) -> Vec<u8> {
    let mut a = MAGIC.to_vec();
    a.extend_from_slice(volume.as_bytes());
    a.push(b'/');
    a.extend_from_slice(id.as_bytes());
    if kind == Kind::Checkpoint {
        a.extend_from_slice(b"#checkpoint");
    }
    a
}

impl Manifest {
    /// The plaintext body (before compression and sealing).
    pub fn encode_body(&self) -> Result<Vec<u8>, BackupError> {
        let header = serde_json::to_vec(&self.header)
            .map_err(|e| BackupError::Invalid(format!("encoding a manifest header: {e}")))?;
        let entry = entry_len(self.header.format);
        let mut out = Vec::with_capacity(16 + header.len() + self.chunks.len() * entry);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for (i, r) in &self.chunks {
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(&r.name.0);
            if entry == 48 {
                out.extend_from_slice(&r.tag.to_le_bytes());
            }
        }
        Ok(out)
    }

    /// Parses a body; `what` names the manifest in errors.
    pub fn decode_body(b: &[u8], what: &str) -> Result<Manifest, BackupError> {
        let bad = |why: String| BackupError::Corrupt(format!("{what}: {why}"));
        let take = |b: &[u8], at: usize, n: usize| -> Result<Vec<u8>, BackupError> {
            b.get(at..at.saturating_add(n))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| bad(format!("ends at byte {} inside a field", b.len())))
        };
        let hlen = u32::from_le_bytes(take(b, 0, 4)?.try_into().unwrap_or_default()) as usize;
        let header: Header = serde_json::from_slice(&take(b, 4, hlen)?)
            .map_err(|e| bad(format!("bad header: {e}")))?;
        if !(1..=FORMAT).contains(&header.format) {
            return Err(BackupError::Invalid(format!(
                "{what}: manifest format {} is not one this tether reads (1 to {FORMAT}); use a newer tether",
                header.format
            )));
        }
        let entry = entry_len(header.format);
        check_chunk_size(header.chunk_size).map_err(|e| bad(e.to_string()))?;
        let at = 4 + hlen;
        let count = u64::from_le_bytes(take(b, at, 8)?.try_into().unwrap_or_default());
        let rest = &b[at + 8..];
        if count.checked_mul(entry as u64) != Some(rest.len() as u64) {
            return Err(bad(format!(
                "says {count} chunks but holds {} bytes of chunk map",
                rest.len()
            )));
        }
        let total = header.chunk_count();
        let mut chunks = Vec::with_capacity(count as usize);
        let mut prev: Option<u64> = None;
        for e in rest.chunks_exact(entry) {
            let (i, rest) = e.split_at(8);
            let (n, tag) = rest.split_at(32);
            let i = u64::from_le_bytes(i.try_into().unwrap_or_default());
            if prev.is_some_and(|p| p >= i) || i >= total {
                return Err(bad(format!(
                    "chunk index {i} is out of order or past the volume's {total} chunks"
                )));
            }
            prev = Some(i);
            chunks.push((
                i,
                ChunkRef {
                    name: ChunkName(n.try_into().unwrap_or_default()),
                    tag: tag.try_into().map(u64::from_le_bytes).unwrap_or(0),
                },
            ));
        }
        Ok(Manifest { header, chunks })
    }

    /// The sealed object stored in the target.
    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>, BackupError> {
        self.seal_as(keys, Kind::Manifest)
    }

    pub(crate) fn seal_as(&self, keys: &Keys, kind: Kind) -> Result<Vec<u8>, BackupError> {
        let body = zstd::bulk::compress(&self.encode_body()?, 3)
            .map_err(|e| BackupError::Invalid(format!("zstd failed on a manifest: {e}")))?;
        let sealed = keys::seal(
            &keys.manifest_key()?,
            &aad(&self.header.volume, &self.header.id, kind),
            &body,
        )?;
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens the manifest stored as backup `id` of `volume`.
    pub fn open(
        keys: &Keys,
        volume: &str,
        id: &str,
        object: &[u8],
    ) -> Result<Manifest, BackupError> {
        Manifest::open_as(keys, volume, id, object, Kind::Manifest)
    }

    pub(crate) fn open_as(
        keys: &Keys,
        volume: &str,
        id: &str,
        object: &[u8],
        kind: Kind,
    ) -> Result<Manifest, BackupError> {
        let what = match kind {
            Kind::Manifest => format!("backup {volume}/{id}"),
            Kind::Checkpoint => format!("the checkpoint of backup {volume}/{id}"),
        };
        if object.len() < 4 || &object[..4] != MAGIC {
            return Err(BackupError::Corrupt(format!(
                "{what}: the manifest is not a tether manifest (bad magic)"
            )));
        }
        let body = keys::open(&keys.manifest_key()?, &aad(volume, id, kind), &object[4..]).ok_or_else(|| {
            BackupError::Corrupt(format!(
                "{what}: the manifest failed authentication (tampered, damaged, moved, or sealed under another target's key)"
            ))
        })?;
        let mut plain = Vec::new();
        zstd::stream::read::Decoder::new(body.as_slice())
            .and_then(|d| d.take(MAX_BODY).read_to_end(&mut plain))
            .map_err(|e| BackupError::Corrupt(format!("{what}: bad zstd frame: {e}")))?;
        let m = Manifest::decode_body(&plain, &what)?;
        if m.header.volume != volume || m.header.id != id {
            return Err(BackupError::Corrupt(format!(
                "{what}: the manifest describes {}/{}",
                m.header.volume, m.header.id
            )));
        }
        Ok(m)
    }

    /// The chunk map as a lookup by index.
    pub fn map(&self) -> BTreeMap<u64, ChunkRef> {
        self.chunks.iter().copied().collect()
    }
}

/// A new backup id for now: UTC time to the millisecond and 6 random hex digits,
/// e.g. `20261204T180000.123Z-3fa2c1`, so ids sort by time and two backups in one
/// millisecond do not collide.
pub fn new_id(now: std::time::SystemTime) -> Result<String, BackupError> {
    let t = humantime::format_rfc3339_millis(now).to_string();
    let compact: String = t.chars().filter(|c| *c != '-' && *c != ':').collect();
    let r: [u8; 3] = keys::random()?;
    Ok(format!("{compact}-{}", hex::encode(r)))
}

/// The time an id carries, in milliseconds since the Unix epoch.
pub fn id_millis(id: &str) -> Option<u64> {
    let t = id.split('-').next()?;
    if t.len() != 20 || !t.is_ascii() {
        return None;
    }
    let s = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &t[0..4],
        &t[4..6],
        &t[6..8],
        &t[9..11],
        &t[11..13],
        &t[13..19]
    );
    humantime::parse_rfc3339(&s)
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(n: u8, tag: u64) -> ChunkRef {
        ChunkRef {
            name: ChunkName([n; 32]),
            tag,
        }
    }

    fn sample() -> Manifest {
        Manifest {
            header: Header {
                format: FORMAT,
                id: "20261202T180000.000Z-abcdef".into(),
                volume: "pg".into(),
                size: 10 << 20,
                chunk_size: 1 << 20,
                snapshot: "backup-1".into(),
                snapshot_seq: 42,
                parent: None,
                created: 1_800_000_000,
                labels: BTreeMap::from([("app".into(), "pg".into())]),
                stats: Stats::default(),
            },
            chunks: vec![(0, r(1, 7)), (9, r(2, 0))],
        }
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let k = Keys::from_master([3; 32]);
        let m = sample();
        let obj = m.seal(&k).unwrap();
        assert_eq!(Manifest::open(&k, "pg", &m.header.id, &obj).unwrap(), m);
        assert!(Manifest::open(&k, "other", &m.header.id, &obj).is_err());
        assert!(Manifest::open(&k, "pg", "20261202T180001.000Z-abcdef", &obj).is_err());
        assert!(Manifest::open(&Keys::from_master([4; 32]), "pg", &m.header.id, &obj).is_err());
        for i in 0..obj.len() {
            let mut bad = obj.clone();
            bad[i] ^= 1;
            assert!(Manifest::open(&k, "pg", &m.header.id, &bad).is_err());
        }
    }

    #[test]
    fn a_format_1_manifest_reads_with_untagged_chunks() {
        let mut m = sample();
        m.header.format = 1;
        m.chunks = vec![(0, r(1, 0)), (9, r(2, 0))];
        let body = m.encode_body().unwrap();
        assert_eq!(body.len() % 8, (body.len() - 2 * 40) % 8);
        assert_eq!(Manifest::decode_body(&body, "m").unwrap(), m);
    }

    #[test]
    fn out_of_order_or_out_of_range_chunks_are_refused() {
        let mut m = sample();
        m.chunks = vec![(3, r(1, 1)), (3, r(1, 1))];
        assert!(Manifest::decode_body(&m.encode_body().unwrap(), "m").is_err());
        m.chunks = vec![(10, r(1, 1))];
        assert!(Manifest::decode_body(&m.encode_body().unwrap(), "m").is_err());
    }

    #[test]
    fn ids_sort_by_time_and_carry_it() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_800_000_000_250);
        let id = new_id(t).unwrap();
        assert_eq!(id_millis(&id), Some(1_800_000_000_250));
        assert!(id.starts_with("20270115T080000.250Z-"), "{id}");
        assert!(id.starts_with("20270115T"), "{id}");
        assert_eq!(id_millis("nonsense"), None);
        assert_eq!(id_millis("2026120éT180000.12Z-abc"), None);
    }

    proptest! {
        #[test]
        fn any_body_decodes_or_errs(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Manifest::decode_body(&b, "m");
        }

        #[test]
        fn mutated_bodies_never_panic(i in 0usize..400, x in 1u8..=255) {
            let mut b = sample().encode_body().unwrap();
            let n = b.len();
            b[i % n] ^= x;
            let _ = Manifest::decode_body(&b, "m");
        }
    }
}
