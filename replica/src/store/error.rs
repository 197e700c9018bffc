//! What can go wrong in the store, each error naming its volume.

use std::io;
use std::path::{Path, PathBuf};

/// What can go wrong in the store; each variant names the volume.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The volume does not exist on this replica.
    #[error("volume {volume}: not found on this replica; the engine creates it when given --size")]
    NotFound { volume: String },
    /// The volume name is not acceptable as a directory name.
    #[error("invalid volume name {name:?}: use 1-64 characters from A-Z a-z 0-9 . _ - not starting with '.'")]
    BadName { name: String },
    /// The request addresses blocks past the end of the volume.
    #[error("volume {volume}: blocks {start}..{end} are outside the volume ({blocks} blocks)")]
    OutOfRange {
        volume: String,
        start: u64,
        end: u64,
        blocks: u64,
    },
    /// A malformed request or on-disk record.
    #[error("volume {volume}: {what}")]
    Invalid { volume: String, what: String },
    /// The caller's epoch is older than the stored one.
    #[error("volume {volume}: epoch {epoch} is not newer than the stored epoch {stored}; another engine owns this volume")]
    Fenced {
        volume: String,
        epoch: u64,
        stored: u64,
    },
    /// The disk is full.
    #[error("volume {volume}: disk full while {op}; free space on the replica's data disk")]
    NoSpace { volume: String, op: &'static str },
    /// A block failed its checksum: it is never returned as data.
    #[error("volume {volume}: block {block} failed its checksum in {place}; read it from another replica")]
    Checksum {
        volume: String,
        block: u64,
        place: String,
    },
    /// Any other I/O error.
    #[error("volume {volume}: {op} failed at {}: {source}", path.display())]
    Io {
        volume: String,
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A sync failed earlier; nothing written since can be promised.
    #[error("volume {volume}: replica is poisoned after a failed sync ({reason}); it refuses writes until rebuilt")]
    Poisoned { volume: String, reason: String },
    /// Under `without_waiting`: the request would have waited for a lock or the disk,
    /// and nothing of it is lost by running it again where waiting is allowed. Never
    /// reaches the wire.
    #[error("volume {volume}: the request would wait; run it again off the async threads")]
    WouldBlock { volume: String },
}

/// Maps an I/O error of `op` on `path` of `volume`; a full disk gets its own kind.
pub(super) fn io_err(volume: &str, op: &'static str, path: &Path, source: io::Error) -> StoreError {
    if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
        StoreError::NoSpace {
            volume: volume.to_string(),
            op,
        }
    } else {
        StoreError::Io {
            volume: volume.to_string(),
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Names a volume in the errors of its parts (log, layers), which know no more of it.
#[derive(Debug, Clone)]
pub(super) struct Named(pub(super) String);

impl Named {
    /// Maps an I/O error on `path`; borrows, so the success path allocates nothing.
    pub(super) fn io<'a>(
        &'a self,
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> StoreError + 'a {
        move |e| io_err(&self.0, op, path, e)
    }

    /// A malformed request or on-disk record of this volume.
    pub(super) fn invalid(&self, what: String) -> StoreError {
        StoreError::Invalid {
            volume: self.0.clone(),
            what,
        }
    }
}
