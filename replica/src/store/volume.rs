//! One volume's replica: opening and recovering it, and every operation an engine
//! or the daemon may ask of it. Each operation lives in the file of its concern; this
//! is their one public face.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use super::away::Away;
use super::core::{Core, Inner, DIRTY_BOTH};
use super::error::{Named, StoreError};
use super::layer::{self, Layer};
use super::log::codec::BLOCK;
use super::log::Log;
use super::meta::{GenerationRecord, Meta};
use super::options::StoreOptions;
use super::snapshot::SnapshotInfo;
use super::{checkpoint, flush, read, record, snapshot, write};
use crate::disk::Disk;

/// One volume's replica on this daemon.
pub struct Volume {
    core: Arc<Core>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name())
            .field("size", &self.size())
            .finish()
    }
}

impl Volume {
    /// Creates volume `name` of `size` bytes under `dir` with its log at `wal_path`
    /// (encrypted when `encryption` holds the engine's parameters), then opens it.
    pub(super) fn create(
        disk: Arc<dyn Disk>,
        dir: PathBuf,
        wal_path: PathBuf,
        name: &str,
        size: u64,
        opts: &StoreOptions,
        encryption: Option<&str>,
    ) -> Result<Volume, StoreError> {
        let vol = Named(name.to_string());
        if size == 0 || !size.is_multiple_of(BLOCK as u64) {
            return Err(vol.invalid(format!("size {size} is not a positive multiple of {BLOCK}")));
        }
        // Leftovers of an unfinished create must not leak into the new volume.
        let layer = layer::paths(&dir, 1);
        for p in layer.iter().chain([&wal_path]) {
            disk.remove(p).map_err(vol.io("removing leftovers", p))?;
        }
        let meta = Meta::new(size, encryption);
        let entry = record::entry_len(meta.tag_bytes as usize);
        Layer::create(&*disk, &dir, 1, entry, &vol)?;
        Log::create(&*disk, &wal_path, opts.wal_size, &vol)?;
        // meta is written last: a directory without meta is an unfinished create.
        let meta_path = dir.join("meta");
        disk.replace(&meta_path, &meta.encode())
            .map_err(vol.io("writing meta", &meta_path))?;
        tracing::info!(volume = name, size, wal = %wal_path.display(), "created volume");
        Self::open(disk, dir, wal_path, name, opts)
    }

    /// Opens volume `name` from `dir` and its log at `wal_path`, and recovers it:
    /// replays the log and checkpoints what it held.
    pub(super) fn open(
        disk: Arc<dyn Disk>,
        dir: PathBuf,
        wal_path: PathBuf,
        name: &str,
        opts: &StoreOptions,
    ) -> Result<Volume, StoreError> {
        let started = Instant::now();
        let vol = Named(name.to_string());
        let meta_path = dir.join("meta");
        let Some(raw) = disk
            .read_file(&meta_path)
            .map_err(vol.io("reading meta", &meta_path))?
        else {
            return Err(StoreError::NotFound {
                volume: name.to_string(),
            });
        };
        let (meta, upgrade) =
            Meta::decode(&raw).map_err(|e| vol.invalid(format!("{}: {e}", meta_path.display())))?;
        let tag = meta.tag_bytes as usize;
        let rec = record::entry_len(tag);
        let blocks = meta.size / BLOCK as u64;
        let mut layers = HashMap::new();
        for l in &meta.layers {
            layers.insert(l.id, Layer::open(&*disk, &dir, l.id, blocks, rec, &vol)?);
        }
        let Some(head) = layers.get(&meta.head) else {
            return Err(vol.invalid(format!("head layer {} is not in meta", meta.head)));
        };
        let head_files = head.files();
        let alt_used = !matches!(head_files.alt.allocated(), Ok(0));
        let chain = meta.chain(meta.head).map_err(|w| vol.invalid(w))?;
        let (log, mut cursor) = Log::open(&*disk, &wal_path, opts.wal_size, &vol)?;
        let replayed = log.replay(&mut cursor, head, blocks, tag)?;
        let revision = cursor.header.revision.max(replayed.revision);
        let (away, away_version) = load_away(&*disk, &dir, &meta, &cursor, &vol)?;
        let core = Core {
            vol,
            dir,
            disk,
            log,
            tag,
            rec,
            size: AtomicU64::new(meta.size),
            epoch: AtomicU64::new(meta.epoch),
            inner: RwLock::new(Inner {
                meta,
                layers,
                chain,
                log: cursor,
                revision,
                log_only: false,
                away,
                away_version,
            }),
            sync_lock: Mutex::new(()),
            admin: Mutex::new(()),
            ckpt: Mutex::new(()),
            me: OnceLock::new(),
            closed: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            epoch_lock: RwLock::new(()),
            poisoned: Mutex::new(None),
            direct_min_blocks: opts.direct_min_blocks.max(1),
            direct_after_writes: opts.direct_after_writes,
            direct_limit: opts.direct_limit,
            execution: opts.execution.clone(),
            since_flush: AtomicU64::new(0),
            // Replay may map direct data that is only in the page cache (after a
            // kill, not a power cut): the recovery checkpoint must sync the slots.
            direct_dirty: AtomicU8::new(DIRTY_BOTH),
            alt_used: AtomicBool::new(alt_used),
            head_files: Mutex::new(head_files),
            away_saved: Mutex::new(0),
        };
        let core = Arc::new(core);
        let _ = core.me.set(Arc::downgrade(&core));
        if upgrade {
            // Older versions would misread blocks in the second slot: they must refuse.
            core.save_meta(&mut core.inner.write(), Meta::upgrade)?;
        }
        // A new generation: leftovers past the replayed prefix can never be replayed
        // later, after newer records.
        {
            let _c = core.ckpt.lock();
            checkpoint::checkpoint(&core, &mut core.inner.write())?;
        }
        tracing::info!(
            volume = name,
            records = replayed.records,
            bytes = replayed.bytes,
            rotted = replayed.rotted,
            revision = core.inner.read().revision,
            ms = started.elapsed().as_millis() as u64,
            "volume recovered"
        );
        Ok(Volume { core })
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        self.core.name()
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.core.size()
    }

    /// The current epoch: requests from older epochs are refused.
    pub fn epoch(&self) -> u64 {
        self.core.epoch.load(Ordering::Acquire)
    }

    /// The highest write sequence applied, and whether the last user closed cleanly.
    pub fn revision(&self) -> (u64, bool) {
        let inner = self.core.inner.read();
        (inner.revision, inner.meta.clean)
    }

    /// The engine's encryption parameters, if the volume was created encrypted.
    pub fn encryption(&self) -> Option<String> {
        self.core.inner.read().meta.encryption.clone()
    }

    /// Whether a rebuild into this replica is unfinished.
    pub fn rebuilding(&self) -> bool {
        self.core.inner.read().meta.rebuilding
    }

    /// Why the volume refuses writes, when an fdatasync failed.
    pub fn poisoned(&self) -> Option<String> {
        self.core.poisoned.lock().clone()
    }

    /// Bytes on disk: the head layer, and the log.
    pub fn allocated(&self) -> (u64, u64) {
        let v = &*self.core;
        let inner = v.inner.read();
        let head = v.head(&inner).map_or(0, Layer::allocated);
        (head, v.log.allocated())
    }

    /// Takes `epoch` for engine `engine_id`: a newer epoch fences older engines; the
    /// same epoch is accepted again only from the engine that took it.
    pub fn take_epoch(&self, epoch: u64, engine_id: u64) -> Result<u64, StoreError> {
        let v = &*self.core;
        let _fence = v.epoch_lock.write();
        let mut inner = v.inner.write();
        let stored = self.epoch();
        if epoch == stored && engine_id != 0 && engine_id == inner.meta.engine_id {
            return Ok(stored);
        }
        if epoch <= stored {
            return Err(StoreError::Fenced {
                volume: self.name().to_string(),
                epoch,
                stored,
            });
        }
        v.save_meta(&mut inner, |m| {
            m.epoch = epoch;
            m.engine_id = engine_id;
        })?;
        v.epoch.store(epoch, Ordering::Release);
        Ok(stored)
    }

    /// Replaces the encryption parameters of a copy never served, for the engine that
    /// holds `epoch`: two engines that created the volume at once may have left its
    /// copies under different parameters, and one must win. A copy that stored a
    /// membership generation, applied a write, or is being rebuilt may hold blocks
    /// sealed under its parameters, and keeps them.
    pub fn adopt_encryption(&self, epoch: u64, params: &str) -> Result<(), StoreError> {
        let v = &*self.core;
        let _fence = v.epoch_lock.write();
        let mut inner = v.inner.write();
        if epoch != self.epoch() {
            return Err(StoreError::Fenced {
                volume: self.name().to_string(),
                epoch,
                stored: self.epoch(),
            });
        }
        let m = &inner.meta;
        if m.encryption.as_deref() == Some(params) {
            return Ok(());
        }
        let blank = m.generation.is_none()
            && m.history.is_empty()
            && m.layers.len() == 1
            && inner.revision == 0
            && !m.rebuilding;
        // Unencrypted and encrypted copies differ in layout, not only in parameters.
        if !blank || m.encryption.is_none() || params.is_empty() {
            return Err(v.invalid(format!(
                "this replica holds the volume {}, unlike the engine's, and it {}; it was left unchanged. If it is not needed, delete its directory on this replica and add it again",
                if m.encryption.is_some() { "encrypted under other parameters" } else { "unencrypted" },
                if blank { "cannot change its mode" } else { "may hold data sealed under them" }
            )));
        }
        v.save_meta(&mut inner, |m| m.encryption = Some(params.to_string()))?;
        tracing::warn!(volume = %self.name(), epoch,
            "this copy was never served: it takes the opening engine's encryption parameters");
        Ok(())
    }

    /// The newest membership generation stored here, if any.
    pub fn generation(&self) -> Option<GenerationRecord> {
        self.core.inner.read().meta.generation.clone()
    }

    /// Earlier generations, oldest first.
    pub fn generation_history(&self) -> Vec<GenerationRecord> {
        self.core.inner.read().meta.history.clone()
    }

    /// Stores generation `g` from engine `engine_id` at `epoch` if it is newer than the
    /// one stored (an epoch newer than the stored one is taken, fencing older engines
    /// here; an older one is refused). Returns the generation stored afterwards.
    pub fn record_generation(
        &self,
        epoch: u64,
        engine_id: u64,
        g: GenerationRecord,
    ) -> Result<GenerationRecord, StoreError> {
        let v = &*self.core;
        let _fence = v.epoch_lock.write();
        let mut inner = v.inner.write();
        let stored = self.epoch();
        self.check_epoch(epoch)?;
        let mut next = inner.meta.clone();
        let newer = next.store_generation(g.clone());
        if newer || epoch > stored {
            v.save_meta(&mut inner, |m| {
                if epoch > m.epoch {
                    m.engine_id = engine_id;
                }
                m.epoch = epoch;
                m.generation = next.generation.take();
                m.history = std::mem::take(&mut next.history);
            })?;
            v.epoch.store(epoch, Ordering::Release);
            if newer {
                // A replica counted in sync again holds everything: its record ends.
                // After a salvage nobody knows how the others differ from this one.
                let ended = if g.salvage {
                    inner.away.end_all()
                } else {
                    g.in_sync.iter().fold(false, |e, r| inner.away.end(r) | e)
                };
                if ended {
                    inner.away_version += 1;
                    v.save_away(&inner)?;
                }
                tracing::info!(volume = %self.name(), number = g.number, epoch, cause = %g.cause,
                    in_sync = ?g.in_sync, "membership generation stored");
            }
        }
        match inner.meta.generation.clone() {
            Some(g) => Ok(g),
            None => Err(v.invalid("no generation stored".into())),
        }
    }

    /// Runs `f` for an engine at `epoch` if that epoch may still issue requests, with
    /// no newer epoch taken until `f` returns.
    pub fn under_epoch<T>(
        &self,
        epoch: u64,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _fence = match self.core.epoch_lock.try_read() {
            Some(g) => g,
            None => {
                self.core.may_wait()?;
                self.core.epoch_lock.read()
            }
        };
        self.check_epoch(epoch)?;
        f()
    }

    /// Checks that `epoch` may still issue requests.
    pub fn check_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        let stored = self.epoch();
        if epoch < stored {
            return Err(StoreError::Fenced {
                volume: self.name().to_string(),
                epoch,
                stored,
            });
        }
        Ok(())
    }

    /// Durably marks (or clears) an unfinished rebuild into this replica.
    pub fn set_rebuilding(&self, on: bool) -> Result<(), StoreError> {
        self.mark_rebuilding(on, None)
    }

    /// Ends a rebuild: the copy holds exactly the writes up to sequence `revision`
    /// (0: not said, by an older engine), which becomes its revision, durably.
    /// A revision counted by the copy it replaced may be higher, from writes of an
    /// earlier engine this volume no longer has: kept, it would hide writes lost to a
    /// later power cut, and an engine would serve this copy beside one that holds
    /// them (simulation, seed 121441: a replica removed and added back).
    pub fn rebuild_done(&self, revision: u64) -> Result<(), StoreError> {
        self.mark_rebuilding(false, (revision != 0).then_some(revision))
    }

    fn mark_rebuilding(&self, on: bool, revision: Option<u64>) -> Result<(), StoreError> {
        let v = &*self.core;
        let _c = v.ckpt.lock();
        let mut inner = v.inner.write();
        if inner.meta.rebuilding == on {
            return Ok(());
        }
        if !on {
            if let Some(r) = revision {
                inner.revision = r;
            }
            // Everything copied must be durable before the mark goes, and the log's
            // header then carries the revision.
            checkpoint::checkpoint(v, &mut inner)?;
        } else {
            v.end_away(&mut inner)?;
        }
        v.save_meta(&mut inner, |m| m.rebuilding = on)
    }

    /// Starts (or adds to) the record of what is written while replica `replica` is
    /// away, with `runs` (block, count) it may lack already; durable on return.
    /// With `unknown`, what the replica may lack is not known: any record for it ends.
    pub fn away(
        &self,
        replica: &str,
        copy: u64,
        runs: &[(u64, u64)],
        unknown: bool,
    ) -> Result<(), StoreError> {
        let v = &*self.core;
        v.check_writable()?;
        let mut inner = v.write_inner()?;
        if unknown {
            if inner.away.end(replica) {
                inner.away_version += 1;
                v.save_away(&inner)?;
            }
            tracing::info!(volume = %self.name(), away = replica,
                "keeping no record of what is written while this replica is away: what it lacks already is not known");
            return Ok(());
        }
        inner.away.start(replica, copy, runs.iter().copied());
        inner.away_version += 1;
        v.save_away(&inner)?;
        tracing::info!(volume = %self.name(), away = replica, runs = runs.len(),
            "keeping a record of what is written while this replica is away");
        Ok(())
    }

    /// The runs `[s, e)` of `[block, block + count)` written since copy `copy` on
    /// `replica` went away, or `None` if this replica keeps no record of that copy.
    pub fn changed(
        &self,
        replica: &str,
        copy: u64,
        block: u64,
        count: u64,
    ) -> Option<Vec<(u64, u64)>> {
        let inner = self.core.inner.read();
        inner
            .away
            .changed(replica, copy, block, block.saturating_add(count))
    }

    /// Names this copy of the volume (see `away`): another copy made in its place
    /// has another name.
    pub fn copy(&self) -> u64 {
        self.core.inner.read().meta.copy
    }

    /// The name under which others' records of what this copy missed apply to it: its
    /// copy, or 0 (no record applies) while a rebuild into it is unfinished. On its
    /// way a rebuild rewinds blocks of the head to a snapshot's version, so one cut
    /// short leaves a copy that no record describes.
    pub fn copy_for_records(&self) -> u64 {
        let inner = self.core.inner.read();
        if inner.meta.rebuilding {
            0
        } else {
            inner.meta.copy
        }
    }

    /// Records whether an engine has the volume open (false) or closed it cleanly.
    pub fn set_clean(&self, clean: bool) -> Result<(), StoreError> {
        let v = &*self.core;
        let _c = v.ckpt.lock();
        let mut inner = v.inner.write();
        if clean {
            checkpoint::checkpoint(v, &mut inner)?;
        }
        v.save_meta(&mut inner, |m| m.clean = clean)
    }

    /// Writes whole blocks with their seals (`SEAL_BYTES` per block on encrypted
    /// volumes, none otherwise).
    pub fn write_sealed(
        &self,
        seq: u64,
        block: u64,
        data: &[u8],
        tags: &[u8],
    ) -> Result<(), StoreError> {
        write::write_sealed(&self.core, seq, block, data, tags)
    }

    /// Deallocates whole blocks as write sequence `seq`; they read back as zeroes.
    pub fn zero_blocks(&self, seq: u64, block: u64, count: u64) -> Result<(), StoreError> {
        write::zero_blocks(&self.core, seq, block, count)
    }

    /// Makes every completed write durable (group commit: see `flush`).
    pub fn sync(&self) -> Result<(), StoreError> {
        flush::sync(&self.core)
    }

    /// Writes the gathered direct records to the log file (no sync), so a killed
    /// process keeps what it acknowledged; the server calls it when a stream goes idle.
    pub fn settle(&self) -> Result<(), StoreError> {
        flush::settle(&self.core)
    }

    /// Reads whole blocks and their seals (all-zero seals for blocks never written)
    /// from the head, or as they were in `snapshot`.
    pub fn read(
        &self,
        snapshot: Option<&str>,
        block: u64,
        count: u32,
    ) -> Result<(Bytes, Bytes), StoreError> {
        read::read(&self.core, snapshot, block, count, read::Check::Checksums)
    }

    /// As [`Volume::read`], for a reader that authenticates every block by its seal
    /// (the engine of an encrypted volume): where blocks carry seals, their checksums
    /// are not computed, since a damaged block fails to open in the reader.
    pub fn read_authenticated(
        &self,
        snapshot: Option<&str>,
        block: u64,
        count: u32,
    ) -> Result<(Bytes, Bytes), StoreError> {
        read::read(&self.core, snapshot, block, count, read::Check::Seals)
    }

    /// Asks the disk to read ahead what the volume holds of `[block, block+count)`;
    /// returns how many of those blocks it holds.
    pub fn prefetch(&self, block: u64, count: u32) -> Result<u64, StoreError> {
        read::prefetch(&self.core, block, count)
    }

    /// A 64-bit hash of each block of the head (or of snapshot `name`), verified: a
    /// block that fails its checksum gets a hash no healthy copy can have.
    pub fn hashes(
        &self,
        snapshot: Option<&str>,
        block: u64,
        count: u32,
    ) -> Result<Vec<u64>, StoreError> {
        read::hashes(&self.core, snapshot, block, count)
    }

    /// Which blocks of `[block, block+count)` hold data in the head (or in `snapshot`),
    /// as (start, end, allocated).
    pub fn map(
        &self,
        snapshot: Option<&str>,
        block: u64,
        count: u64,
    ) -> Result<Vec<(u64, u64, bool)>, StoreError> {
        read::map(&self.core, snapshot, block, count)
    }

    /// The runs of `[block, block+count)` where snapshot `snapshot` may differ from
    /// snapshot `since` (from the layer index), or `None` when `since` is not an
    /// ancestor of `snapshot` on this replica.
    pub fn changed_between(
        &self,
        snapshot: &str,
        since: &str,
        block: u64,
        count: u64,
    ) -> Result<Option<Vec<(u64, u64)>>, StoreError> {
        read::changed_between(&self.core, snapshot, since, block, count)
    }

    /// Freezes the head as snapshot `name` and starts a new empty head.
    pub fn snapshot(&self, name: &str) -> Result<(), StoreError> {
        snapshot::create(&self.core, name)
    }

    /// Snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        snapshot::list(&self.core)
    }

    /// Deletes snapshot `name`, merging its blocks into its children while I/O goes on.
    pub fn delete_snapshot(&self, name: &str) -> Result<(), StoreError> {
        snapshot::delete(&self.core, name)
    }

    /// Makes the volume's contents those of snapshot `name`.
    pub fn revert(&self, name: &str) -> Result<(), StoreError> {
        snapshot::revert(&self.core, name)
    }

    /// Grows the volume to `size` bytes; shrinking is refused.
    pub fn expand(&self, size: u64) -> Result<(), StoreError> {
        let v = &*self.core;
        v.check_writable()?;
        let _admin = v.admin.lock();
        let mut inner = v.inner.write();
        let cur = self.size();
        if size < cur {
            return Err(v.invalid(format!(
                "cannot shrink from {cur} to {size} bytes: shrinking would drop data"
            )));
        }
        if !size.is_multiple_of(BLOCK as u64) {
            return Err(v.invalid(format!("size {size} is not a multiple of {BLOCK}")));
        }
        if size == cur {
            return Ok(());
        }
        v.save_meta(&mut inner, |m| m.size = size)?;
        v.size.store(size, Ordering::Release);
        tracing::info!(volume = %self.name(), from = cur, to = size, "volume expanded");
        Ok(())
    }

    /// Stops background work on this volume and waits for what is running; the
    /// volume must not be used afterwards (crash tests call it before a power cut).
    pub fn close(&self) {
        self.core.closed.store(true, Ordering::Release);
        drop(self.core.ckpt.lock());
    }

    /// Takes this in-memory copy out of use for good: it refuses every write and sync
    /// from now on, and its background work stops. The files stay as they are for a
    /// fresh open to recover.
    pub(super) fn retire(&self, why: &str) {
        let v = &*self.core;
        // Under both locks every writer of the files holds: none is midway.
        let _c = v.ckpt.lock();
        let _i = v.inner.write();
        {
            let mut p = v.poisoned.lock();
            let reason = match p.take() {
                Some(r) => format!("{r}; {why}"),
                None => why.to_string(),
            };
            *p = Some(reason);
        }
        v.retired.store(true, Ordering::Release);
        v.closed.store(true, Ordering::Release);
    }
}

/// The away records as the file holds them, with the marks of every write replay
/// found in the log (the file has those only up to the last checkpoint). Version 0
/// means nothing to write; anything that must reach the file gets a higher one. A
/// damaged file, or a replica whose rebuild did not finish, keeps no record: rebuilds
/// of the others then compare everything.
fn load_away(
    disk: &dyn Disk,
    dir: &std::path::Path,
    meta: &Meta,
    cursor: &super::log::Cursor,
    vol: &Named,
) -> Result<(Away, u64), StoreError> {
    let path = dir.join("away");
    let Some(raw) = disk.read_file(&path).map_err(vol.io("reading", &path))? else {
        return Ok((Away::default(), 0));
    };
    let mut away = match Away::decode(&raw) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(volume = %vol.0, path = %path.display(), error = %e,
                "the record of what was written while other replicas were away is damaged; their rebuilds will compare every block");
            return Ok((Away::default(), 1));
        }
    };
    if meta.rebuilding {
        away.end_all();
        return Ok((away, 1));
    }
    if !away.is_empty() {
        for (s, e, _) in cursor.recent.iter() {
            away.mark(s, e);
        }
        if let Some(f) = &cursor.frozen {
            for (s, e, _) in f.iter() {
                away.mark(s, e);
            }
        }
    }
    let replicas: Vec<&str> = away.replicas().collect();
    if !replicas.is_empty() {
        tracing::info!(volume = %vol.0, away = ?replicas, "keeping a record of what is written while these replicas are away");
    }
    Ok((away, 1))
}
