//! The volume's meta file (`docs/format.md`, "meta"): size, epoch, state flags and the
//! tree of layers, as JSON replaced atomically on every change.

use serde::{Deserialize, Serialize};

use tether_proto::wire::SEAL_SIZE as SEAL_BYTES;

/// The block size every volume has, as meta records it.
const BLOCK_SIZE: u32 = tether_proto::wire::BLOCK_SIZE as u32;

/// Packed block records (`.pack`; format 6 had none, 4 no membership generations, 2
/// one slot per block): older formats are upgraded on open, so that older versions
/// refuse the volume rather than miss records that are not in `.rec`.
const FORMAT: u32 = 8;
/// Encrypted volumes (64-byte block records): older versions must refuse them.
const FORMAT_SEALED: u32 = 9;
/// Formats opened and upgraded: one slot per block (2, 3), no generations (4, 5), no
/// packed records (6, 7).
const OLD_FORMATS: [u32; 3] = [2, 4, 6];
const OLD_FORMATS_SEALED: [u32; 3] = [3, 5, 7];
/// Generations kept in the history besides the current one (salvages stay for good).
const HISTORY: usize = 32;

/// A membership generation as a replica stores it: the replica orders them by
/// (number, epoch) and does not interpret the rest (the engine's `membership` does).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenerationRecord {
    /// Grows by one with every change.
    pub number: u64,
    /// The epoch of the engine that made it.
    pub epoch: u64,
    /// Every replica of the volume.
    pub replicas: Vec<String>,
    /// The replicas holding every write acknowledged under it.
    pub in_sync: Vec<String>,
    /// What changed, in words, for status and for the operator.
    pub cause: String,
    /// An operator accepted possibly older data (a salvage): kept in the history for good.
    #[serde(default)]
    pub salvage: bool,
}

impl GenerationRecord {
    /// The order of generations: by epoch (the ballot), then by number; the same
    /// order as the engine's `membership::Generation::key`.
    pub fn key(&self) -> (u64, u64) {
        (self.epoch, self.number)
    }
}

/// One layer of the tree: the head, or a frozen snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct LayerMeta {
    pub(super) id: u64,
    pub(super) parent: Option<u64>,
    /// Snapshot name, for frozen layers.
    pub(super) name: Option<String>,
    /// Write sequence at which it was frozen.
    pub(super) frozen_at: Option<u64>,
}

/// The contents of the meta file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct Meta {
    pub(super) format: u32,
    pub(super) size: u64,
    pub(super) block_size: u32,
    pub(super) epoch: u64,
    #[serde(default)]
    pub(super) engine_id: u64,
    /// A rebuild into this replica started and has not finished.
    #[serde(default)]
    pub(super) rebuilding: bool,
    pub(super) clean: bool,
    /// Bytes of engine seal stored with every block (0: unencrypted volume).
    #[serde(default)]
    pub(super) tag_bytes: u32,
    /// The engine's encryption parameters (no key), kept verbatim for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) encryption: Option<String>,
    pub(super) head: u64,
    pub(super) next_layer: u64,
    pub(super) layers: Vec<LayerMeta>,
    /// The newest membership generation this replica stored; none on volumes made
    /// before generations, until an engine records the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) generation: Option<GenerationRecord>,
    /// Earlier generations, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) history: Vec<GenerationRecord>,
    /// Names this copy of the volume: a copy made again in the same place (a lost
    /// disk) gets another, so a record of what an earlier copy missed never applies
    /// to it. 0 on volumes made before; given one when opened.
    #[serde(default)]
    pub(super) copy: u64,
}

/// A new copy's name: unique in time and within the process, never 0.
pub(super) fn new_copy_id() -> u64 {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // splitmix64 of both, so ids made close together differ in every bit.
    let mut z = nanos ^ n.rotate_left(40) ^ (u64::from(std::process::id()) << 20);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

impl Meta {
    /// A new volume of `size` bytes with one empty layer, 1 (encrypted volumes carry
    /// the engine's parameters).
    pub(super) fn new(size: u64, encryption: Option<&str>) -> Meta {
        Meta {
            format: current_format(encryption.is_some()),
            size,
            block_size: BLOCK_SIZE,
            epoch: 0,
            engine_id: 0,
            rebuilding: false,
            clean: true,
            tag_bytes: if encryption.is_some() {
                SEAL_BYTES as u32
            } else {
                0
            },
            encryption: encryption.map(str::to_string),
            head: 1,
            next_layer: 2,
            layers: vec![LayerMeta {
                id: 1,
                parent: None,
                name: None,
                frozen_at: None,
            }],
            generation: None,
            history: Vec::new(),
            copy: new_copy_id(),
        }
    }

    /// Makes `g` the current generation if it is newer, keeping the one it replaces
    /// in the history; false if it is not newer.
    pub(super) fn store_generation(&mut self, g: GenerationRecord) -> bool {
        if self.generation.as_ref().is_some_and(|c| c.key() >= g.key()) {
            return false;
        }
        if let Some(old) = self.generation.replace(g) {
            self.history.push(old);
        }
        // The oldest ordinary entries go first; salvages stay.
        while self.history.iter().filter(|h| !h.salvage).count() > HISTORY {
            if let Some(i) = self.history.iter().position(|h| !h.salvage) {
                self.history.remove(i);
            }
        }
        true
    }

    /// Parses a meta file and checks this version can serve it; also says whether its
    /// format must be upgraded (older versions would misread the second slot).
    pub(super) fn decode(raw: &[u8]) -> Result<(Meta, bool), String> {
        let mut meta: Meta = serde_json::from_slice(raw).map_err(|e| format!("not valid: {e}"))?;
        let sealed = meta.tag_bytes != 0;
        let format_ok = ((OLD_FORMATS.contains(&meta.format) || meta.format == FORMAT) && !sealed)
            || ((OLD_FORMATS_SEALED.contains(&meta.format) || meta.format == FORMAT_SEALED)
                && meta.tag_bytes as usize == SEAL_BYTES);
        if !format_ok || meta.block_size != BLOCK_SIZE {
            return Err(format!(
                "format {} / block size {} / seal {} is not supported by this version (encrypted volumes made before format 3 must be recreated)",
                meta.format, meta.block_size, meta.tag_bytes
            ));
        }
        let mut upgrade =
            OLD_FORMATS.contains(&meta.format) || OLD_FORMATS_SEALED.contains(&meta.format);
        if meta.copy == 0 {
            meta.copy = new_copy_id();
            upgrade = true;
        }
        Ok((meta, upgrade))
    }

    /// The file's bytes.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Marks the meta as this version's format.
    pub(super) fn upgrade(&mut self) {
        self.format = current_format(self.tag_bytes != 0);
    }

    /// The layer frozen as snapshot `name`.
    pub(super) fn snapshot(&self, name: &str) -> Option<&LayerMeta> {
        self.layers.iter().find(|l| l.name.as_deref() == Some(name))
    }

    /// Makes the new layer `id`, a child of `parent`, the head.
    pub(super) fn push_head(&mut self, id: u64, parent: u64) {
        self.layers.push(LayerMeta {
            id,
            parent: Some(parent),
            name: None,
            frozen_at: None,
        });
        self.head = id;
        self.next_layer = id + 1;
    }

    /// The read path from layer `id`: it, then its ancestors.
    pub(super) fn chain(&self, id: u64) -> Result<Vec<u64>, String> {
        let mut chain = Vec::new();
        let mut cur = Some(id);
        while let Some(c) = cur {
            if chain.contains(&c) || chain.len() > self.layers.len() {
                return Err(format!("layer {c} is part of a cycle in meta"));
            }
            let Some(l) = self.layers.iter().find(|l| l.id == c) else {
                return Err(format!("layer {c} is named in meta but not described"));
            };
            chain.push(c);
            cur = l.parent;
        }
        Ok(chain)
    }
}

fn current_format(sealed: bool) -> u32 {
    if sealed {
        FORMAT_SEALED
    } else {
        FORMAT
    }
}
