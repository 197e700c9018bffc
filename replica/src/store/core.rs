//! A volume's state and the locks that guard it, with the checks every operation
//! shares. The operations themselves live one concern per file beside it (`flush`,
//! `checkpoint`, `write`, `read`, `snapshot`); `Volume` is their public face.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::{Mutex, RwLock};

use super::away::Away;
use super::error::{Named, StoreError};
use super::layer::{Files, Layer};
use super::log::codec::BLOCK;
use super::log::{Cursor, Log};
use super::meta::Meta;
use crate::disk::Disk;
use tether_proto::wire::MAX_IO_BLOCKS;

/// What the volume's main lock guards.
pub(super) struct Inner {
    pub(super) meta: Meta,
    pub(super) layers: HashMap<u64, Layer>,
    /// Head first, then its ancestors: the read path.
    pub(super) chain: Vec<u64>,
    pub(super) log: Cursor,
    /// Highest write sequence applied.
    pub(super) revision: u64,
    /// A snapshot is being merged into the head: every write goes through the log,
    /// so the merge's copies and direct writes never meet in a slot.
    pub(super) log_only: bool,
    /// What was written while other replicas were away, and a count of its changes
    /// (see `save_away`).
    pub(super) away: Away,
    pub(super) away_version: u64,
}

/// `Core::direct_dirty` with both slots dirty.
pub(super) const DIRTY_BOTH: u8 = 0b11;

/// One volume's replica: its files, its state and its locks.
pub(super) struct Core {
    pub(super) vol: Named,
    pub(super) dir: PathBuf,
    pub(super) disk: Arc<dyn Disk>,
    pub(super) log: Log,
    /// Seal bytes per block, and the size of a block record (fixed at creation).
    pub(super) tag: usize,
    pub(super) rec: usize,
    pub(super) size: AtomicU64,
    pub(super) epoch: AtomicU64,
    pub(super) inner: RwLock<Inner>,
    pub(super) sync_lock: Mutex<()>,
    /// Serialises changes to the layer tree (snapshot, delete, revert, expand).
    pub(super) admin: Mutex<()>,
    /// Held by whoever writes the head layer from the log (checkpoints, merges).
    /// Lock order: admin, then ckpt, then inner.
    pub(super) ckpt: Mutex<()>,
    /// Lets an append start a background checkpoint on its own volume.
    pub(super) me: OnceLock<Weak<Core>>,
    /// Set by `close`: background checkpoints stop touching the disk.
    pub(super) closed: AtomicBool,
    /// Set (under `ckpt` and `inner`) when a fresh open replaced this copy: from then
    /// on it writes nothing, not even meta, since the files are the new copy's.
    pub(super) retired: AtomicBool,
    /// Held shared while a request of an engine is checked against the epoch and
    /// applied, and exclusively while a newer epoch is taken: nothing of an older
    /// engine applies after a newer one took over. Lock order: before `admin`.
    pub(super) epoch_lock: RwLock<()>,
    pub(super) poisoned: Mutex<Option<String>>,
    /// When writes skip the log's data copy (see `StoreOptions`).
    pub(super) direct_min_blocks: u64,
    pub(super) direct_after_writes: u64,
    pub(super) direct_limit: u64,
    /// Where background checkpoints run.
    pub(super) execution: super::options::Execution,
    /// Writes since the last flush.
    pub(super) since_flush: AtomicU64,
    /// Which of the head's slots took data since they were last synced: bit `1 << slot`
    /// (slot 0 is `.data`, slot 1 `.alt`); a flush syncs only those.
    pub(super) direct_dirty: AtomicU8,
    /// A direct write went into the head's second slot (`.alt`) since it was opened:
    /// a checkpoint then also frees slot 1 under blocks copied from the log.
    pub(super) alt_used: AtomicBool,
    /// The head layer's files, for flushes (a leaf lock, taken after `sync_lock`).
    pub(super) head_files: Mutex<Files>,
    /// The `away_version` the `away` file holds (a leaf lock, taken after `inner`).
    pub(super) away_saved: Mutex<u64>,
}

thread_local! {
    /// Set while the caller runs on an async worker thread (see `without_waiting`).
    static NO_WAIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` promising not to wait: where the store would wait for a lock another
/// thread holds, for a checkpoint, or for an fdatasync, it returns
/// `StoreError::WouldBlock` instead, having changed nothing that running `f` again
/// would not redo the same way. The replica server applies writes and reads on its
/// async threads this way (no thread hop, which cost 13–24 %), and runs a request that
/// would wait on the blocking pool, so one volume's slow disk or long checkpoint never
/// holds up another volume's streams.
pub fn without_waiting<T>(f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            NO_WAIT.with(|n| n.set(self.0));
        }
    }
    let _reset = Reset(NO_WAIT.with(|n| n.replace(true)));
    f()
}

impl Core {
    /// The volume's name.
    pub(super) fn name(&self) -> &str {
        &self.vol.0
    }

    /// `WouldBlock` if the caller promised not to wait (see `without_waiting`).
    pub(super) fn may_wait(&self) -> Result<(), StoreError> {
        if NO_WAIT.with(|n| n.get()) {
            return Err(StoreError::WouldBlock {
                volume: self.name().to_string(),
            });
        }
        Ok(())
    }

    /// The main lock for writing, or `WouldBlock` if it is held and the caller may not
    /// wait.
    pub(super) fn write_inner(
        &self,
    ) -> Result<parking_lot::RwLockWriteGuard<'_, Inner>, StoreError> {
        match self.inner.try_write() {
            Some(g) => Ok(g),
            None => {
                self.may_wait()?;
                Ok(self.inner.write())
            }
        }
    }

    /// The main lock for reading, or `WouldBlock` if a writer holds it and the caller
    /// may not wait.
    pub(super) fn read_inner(&self) -> Result<parking_lot::RwLockReadGuard<'_, Inner>, StoreError> {
        match self.inner.try_read() {
            Some(g) => Ok(g),
            None => {
                self.may_wait()?;
                Ok(self.inner.read())
            }
        }
    }

    /// Maps an I/O error on `path`; borrows, so the success path allocates nothing.
    pub(super) fn err<'a>(
        &'a self,
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
        self.vol.io(op, path)
    }

    /// A malformed request or on-disk record of this volume.
    pub(super) fn invalid(&self, what: String) -> StoreError {
        self.vol.invalid(what)
    }

    /// The volume's size in bytes.
    pub(super) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The volume's size in blocks.
    pub(super) fn blocks(&self) -> u64 {
        self.size() / BLOCK as u64
    }

    /// The head layer.
    pub(super) fn head<'a>(&self, inner: &'a Inner) -> Result<&'a Layer, StoreError> {
        let id = inner.meta.head;
        inner
            .layers
            .get(&id)
            .ok_or_else(|| self.invalid(format!("head layer {id} is not open")))
    }

    /// Writes meta with `change` applied, and keeps it.
    pub(super) fn save_meta(
        &self,
        inner: &mut Inner,
        change: impl FnOnce(&mut Meta),
    ) -> Result<(), StoreError> {
        self.check_live()?;
        let mut next = inner.meta.clone();
        change(&mut next);
        let path = self.dir.join("meta");
        self.disk
            .replace(&path, &next.encode())
            .map_err(self.err("writing meta", &path))?;
        inner.meta = next;
        Ok(())
    }

    /// Checks that `[block, block+count)` is a non-empty range inside the volume, and
    /// with `limit` no larger than one request may be.
    pub(super) fn check_range(
        &self,
        block: u64,
        count: u64,
        limit: bool,
    ) -> Result<(), StoreError> {
        if limit && count > MAX_IO_BLOCKS {
            return Err(self.invalid(format!(
                "request of {count} blocks exceeds the limit of {MAX_IO_BLOCKS}"
            )));
        }
        match block.checked_add(count) {
            Some(end) if end <= self.blocks() && count > 0 => Ok(()),
            end => Err(StoreError::OutOfRange {
                volume: self.name().to_string(),
                start: block,
                end: end.unwrap_or(u64::MAX),
                blocks: self.blocks(),
            }),
        }
    }

    /// Refuses writes for good after a failed sync, and says so.
    /// Makes the away records as `inner` holds them durable, unless a newer version
    /// was written already (writers serialise on `away_saved`, so an older state never
    /// overwrites a newer one). A failure poisons the volume: the file could then hold
    /// a record that misses blocks.
    pub(super) fn save_away(&self, inner: &Inner) -> Result<(), StoreError> {
        match self.away_to_save(inner) {
            Some((version, bytes)) => self.write_away(version, &bytes),
            None => Ok(()),
        }
    }

    /// The away records' version and bytes, if that version is not in the file yet.
    pub(super) fn away_to_save(&self, inner: &Inner) -> Option<(u64, Vec<u8>)> {
        let version = inner.away_version;
        (version > *self.away_saved.lock()).then(|| (version, inner.away.encode()))
    }

    /// Writes the away records of `version` (see `save_away`); no lock needed.
    pub(super) fn write_away(&self, version: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let mut saved = self.away_saved.lock();
        if version <= *saved {
            return Ok(());
        }
        self.check_live()?;
        let path = self.dir.join("away");
        self.disk.replace(&path, bytes).map_err(|e| {
            self.poison(format!(
                "writing the record of what was written while other replicas were away ({}) failed: {e}",
                path.display()
            ))
        })?;
        *saved = version;
        Ok(())
    }

    /// Ends every away record (this replica no longer knows how it differs from the
    /// others) and makes that durable.
    pub(super) fn end_away(&self, inner: &mut Inner) -> Result<(), StoreError> {
        if inner.away.end_all() {
            inner.away_version += 1;
            self.save_away(inner)?;
        }
        Ok(())
    }

    pub(super) fn poison(&self, reason: String) -> StoreError {
        tracing::error!(volume = %self.name(), %reason, "replica poisoned: it refuses writes until rebuilt");
        *self.poisoned.lock() = Some(reason.clone());
        StoreError::Poisoned {
            volume: self.name().to_string(),
            reason,
        }
    }

    /// Refuses to touch the files once a fresh open replaced this copy; callers hold
    /// `inner` or `ckpt`, which `retire` takes, so none slips past it.
    pub(super) fn check_live(&self) -> Result<(), StoreError> {
        if !self.retired.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(StoreError::Poisoned {
            volume: self.name().to_string(),
            reason: "this copy was reopened from disk; use the reopened one".into(),
        })
    }

    /// Refuses writes once a sync failed.
    pub(super) fn check_writable(&self) -> Result<(), StoreError> {
        match &*self.poisoned.lock() {
            Some(reason) => Err(StoreError::Poisoned {
                volume: self.name().to_string(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }
}
