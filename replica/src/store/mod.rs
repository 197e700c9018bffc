//! The replica store: a write-ahead log in front of a tree of copy-on-write layers,
//! every block checksummed. The byte-level format is in `docs/format.md`; each of its
//! sections has a file here.
//!
//! ```text
//! <data>/volumes/<volume>/
//!   meta             JSON: size, epoch, layers (id, parent, snapshot name), head
//!   layers/<id>.data block i at offset i × 4096 (sparse): slot 0
//!   layers/<id>.alt  the same: slot 1
//!   layers/<id>.rec  8 bytes per block: crc32c, state (1 data in slot 0, 2 zero,
//!                    3 data in slot 1); 64 bytes with the engine's 32-byte seal on
//!                    encrypted volumes
//!   wal              the log (or <wal-dir>/<volume>.wal)
//! ```
//!
//! A small write that a flush may soon wait for is appended to the log and
//! acknowledged; a flush fdatasyncs the log only (group commit). Blocks written since
//! the last checkpoint are served from the log through an in-memory extent map; a
//! checkpoint copies them into the head layer, syncs it and starts a new log
//! generation. Large writes, and small ones that come without flushes, skip the copy:
//! their data goes straight into the slot of the head layer that does not hold the
//! block's last durable version, and only their checksums go to the log. Replay takes
//! such a record only where the slot still matches it, and never overwriting the other
//! slot keeps a version to fall back to.
//!
//! Where things are, bottom up (each file uses only those above it in this list):
//!
//! | file | owns |
//! | --- | --- |
//! | `error` | `StoreError`, each error naming its volume |
//! | `meta` | the meta file: chain of layers, epoch, state flags |
//! | `log/codec` | the log's header and record bytes |
//! | `record` | the block records of a layer's `.rec` file |
//! | `layer` | a layer's files and the blocks it holds |
//! | `log` | the log file, its in-memory index and tail; `log/replay` |
//! | `core` | a volume's state, its locks, the checks all operations share |
//! | `flush` | durability: group commit, poisoning on a failed sync |
//! | `checkpoint` | copying the log into the head layer |
//! | `write`, `read` | the write path and the read path |
//! | `snapshot` | create, delete (merge), revert |
//! | `volume` | `Volume`: opening, recovery, and every operation's public face |
//! | `set` | `VolumeSet`: the daemon's volumes, and the inventory |

mod checkpoint;
mod core;
mod error;
mod flush;
mod layer;
pub mod log;
mod meta;
mod read;
mod record;
mod set;
mod snapshot;
mod volume;
mod write;

use std::path::PathBuf;

pub use error::StoreError;
pub use read::BAD_BLOCK_HASH;
pub use set::{Inventory, VolumeEntry, VolumeSet};
pub use snapshot::SnapshotInfo;
pub use volume::Volume;

/// Bytes per block.
const BLOCK: usize = log::codec::BLOCK;
/// The block size of every volume, in bytes, as the meta file records it.
pub const BLOCK_SIZE: u32 = BLOCK as u32;
/// Bytes of engine seal per block on encrypted volumes (nonce source and AEAD tag).
pub use tether_proto::wire::SEAL_SIZE as SEAL_BYTES;
/// Default size of a volume's write-ahead log.
pub const DEFAULT_WAL_SIZE: u64 = 64 << 20;

/// Checks that `name` is usable as a volume name (and so as a directory name).
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName {
            name: name.to_string(),
        })
    }
}

/// Where a store keeps things and how big its log is.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Put the logs here instead of next to the layers.
    pub wal_dir: Option<PathBuf>,
    /// Size of each volume's log.
    pub wal_size: u64,
    /// Writes of at least this many blocks skip the log's data copy.
    pub direct_min_blocks: u64,
    /// Smaller writes skip it too once this many writes came without a flush (nobody
    /// is waiting on the log's cheap fdatasync); 0: never.
    pub direct_after_writes: u64,
    /// Distinct bytes written that way per half of the log before it is
    /// checkpointed (and 16 times as much with rewrites): bounds what recovery reads
    /// to check them.
    pub direct_limit: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wal_dir: None,
            wal_size: DEFAULT_WAL_SIZE,
            direct_min_blocks: 16,
            direct_after_writes: 64,
            direct_limit: 1 << 30,
        }
    }
}
