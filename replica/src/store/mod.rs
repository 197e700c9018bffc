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
//!                    encrypted volumes; for groups of blocks that hold few, in
//!   layers/<id>.pack instead, packed
//!   wal              the log (or <wal-dir>/<volume>.wal)
//!   away             what was written while other replicas were away
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
//! | `options` | `StoreOptions`, and the names a volume may have |
//! | `meta` | the meta file: chain of layers, epoch, state flags |
//! | `record` | a block record's bytes, and a block's checksum |
//! | `records` | where a layer's block records live: `.rec` pages, `.pack` chunks |
//! | `log/codec` | the log's header and record bytes |
//! | `layer` | a layer's files and the blocks it holds |
//! | `log` | the log file, its in-memory index and tail; `log/replay` |
//! | `core` | a volume's state, its locks, the checks all operations share |
//! | `away` | what was written while another replica was away (for its rebuild) |
//! | `flush` | durability: group commit, poisoning on a failed sync |
//! | `checkpoint` | copying the log into the head layer |
//! | `write`, `read` | the write path and the read path |
//! | `snapshot` | create, delete (merge), revert |
//! | `volume` | `Volume`: opening, recovery, and every operation's public face |
//! | `set` | `VolumeSet`: the daemon's volumes, and the inventory |

mod away;
mod checkpoint;
mod core;
mod error;
mod flush;
mod layer;
pub mod log;
mod meta;
mod options;
mod read;
mod record;
mod records;
mod set;
mod snapshot;
mod volume;
mod write;

pub use self::core::without_waiting;
pub use error::StoreError;
pub use meta::GenerationRecord;
pub use options::{validate_name, Execution, Job, StoreOptions, DEFAULT_WAL_SIZE};
pub use read::BAD_BLOCK_HASH;
pub use set::{Inventory, VolumeEntry, VolumeSet};
pub use snapshot::SnapshotInfo;
pub use volume::Volume;

/// The block size of every volume, in bytes, as the meta file records it.
pub const BLOCK_SIZE: u32 = log::codec::BLOCK as u32;
/// Bytes of engine seal per block on encrypted volumes (nonce source and AEAD tag).
pub use tether_proto::wire::SEAL_SIZE as SEAL_BYTES;
