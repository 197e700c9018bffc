//! What a daemon's operator chooses for its store, and which names it accepts.

use std::path::PathBuf;
use std::sync::Arc;

use super::error::StoreError;

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

/// A job the store hands to a scheduler: the checkpoint of a frozen log half.
pub type Job = Box<dyn FnOnce() + Send>;

/// How the store and its server run work that would block or run in the background.
#[derive(Clone, Default)]
pub enum Execution {
    /// Blocking calls on tokio's blocking pool, background work on threads (the daemon).
    #[default]
    Threads,
    /// Everything on the caller's thread, background work handed to `schedule`, which
    /// runs it when it chooses: the deterministic simulation, where a seed must replay.
    Scheduled(Arc<dyn Fn(Job) + Send + Sync>),
}

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Execution::Threads => "Threads",
            Execution::Scheduled(_) => "Scheduled",
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
    /// Threads, or a scheduler's hands (the simulation).
    pub execution: Execution,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wal_dir: None,
            wal_size: DEFAULT_WAL_SIZE,
            direct_min_blocks: 16,
            direct_after_writes: 64,
            direct_limit: 1 << 30,
            execution: Execution::Threads,
        }
    }
}
