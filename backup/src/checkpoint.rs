//! Checkpoints: a running backup's progress, kept in the target so that a backup
//! killed, cut off or out of space resumes where it stopped. Chunk names come from
//! content, so every upload is idempotent; the checkpoint says which chunks of the
//! snapshot are done, and under which names.
//!
//! One per volume, `checkpoints/VOLUME`: the backup id in the clear, then a chunk map
//! sealed like a manifest (its AAD says checkpoint, so neither opens as the other).
//! gc marks what every checkpoint names, so a resumed backup finds its chunks.

use std::collections::BTreeMap;

use crate::chunk::{ChunkName, ChunkRef};
use crate::error::BackupError;
use crate::keys::Keys;
use crate::manifest::{Header, Kind, Manifest};

const MAGIC: &[u8; 4] = b"TTK1";
/// What a checkpoint records for a chunk that was all zeroes (no object).
const ZERO: ChunkRef = ChunkRef {
    name: ChunkName([0; 32]),
    tag: 0,
};

/// A running backup's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The backup's header (its id, snapshot and parent).
    pub header: Header,
    /// Chunks done: where they are stored, or `None` for all zeroes.
    pub done: BTreeMap<u64, Option<ChunkRef>>,
}

impl Checkpoint {
    /// The object stored in the target.
    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>, BackupError> {
        let m = Manifest {
            header: self.header.clone(),
            chunks: self
                .done
                .iter()
                .map(|(i, n)| (*i, n.unwrap_or(ZERO)))
                .collect(),
        };
        let id = self.header.id.as_bytes();
        let len = u8::try_from(id.len()).map_err(|_| {
            BackupError::Invalid(format!("backup id {} is too long", self.header.id))
        })?;
        let mut out = MAGIC.to_vec();
        out.push(len);
        out.extend_from_slice(id);
        out.extend_from_slice(&m.seal_as(keys, Kind::Checkpoint)?);
        Ok(out)
    }

    /// The backup id a stored checkpoint is for, without opening it.
    pub fn id_of(object: &[u8]) -> Option<String> {
        let rest = object.strip_prefix(MAGIC)?;
        let (&len, rest) = rest.split_first()?;
        let id = rest.get(..len as usize)?;
        std::str::from_utf8(id).ok().map(str::to_string)
    }

    /// Opens the checkpoint stored for `volume`.
    pub fn open(keys: &Keys, volume: &str, object: &[u8]) -> Result<Checkpoint, BackupError> {
        let id = Checkpoint::id_of(object).ok_or_else(|| {
            BackupError::Corrupt(format!(
                "the checkpoint of volume {volume} is not a tether checkpoint (bad header)"
            ))
        })?;
        let m = Manifest::open_as(
            keys,
            volume,
            &id,
            &object[MAGIC.len() + 1 + id.len()..],
            Kind::Checkpoint,
        )?;
        Ok(Checkpoint {
            header: m.header,
            done: m
                .chunks
                .into_iter()
                .map(|(i, n)| (i, (n != ZERO).then_some(n)))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_round_trips_and_is_no_manifest() {
        let keys = Keys::from_master([7; 32]);
        let header = Header {
            format: crate::manifest::FORMAT,
            id: "20261202T170000.000Z-abcdef".into(),
            volume: "v".into(),
            size: 4 << 20,
            chunk_size: 1 << 20,
            snapshot: "s".into(),
            snapshot_seq: 3,
            parent: None,
            created: 0,
            labels: Default::default(),
            stats: Default::default(),
        };
        let c = Checkpoint {
            header: header.clone(),
            done: [
                (
                    0,
                    Some(ChunkRef {
                        name: ChunkName([5; 32]),
                        tag: 9,
                    }),
                ),
                (2, None),
            ]
            .into(),
        };
        let sealed = c.seal(&keys).unwrap();
        assert_eq!(Checkpoint::open(&keys, "v", &sealed).unwrap(), c);
        assert!(Checkpoint::open(&keys, "w", &sealed).is_err());
        // The sealed map inside does not open as the backup's manifest.
        let inner = &sealed[MAGIC.len() + 1 + header.id.len()..];
        assert!(Manifest::open(&keys, "v", &header.id, inner).is_err());
    }
}
