//! The daemon's set of volumes: where each lives on disk, opening each once, and the
//! inventory read from meta files without opening any.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::error::StoreError;
use super::meta::Meta;
use super::options::{validate_name, StoreOptions};
use super::volume::Volume;
use crate::disk::Disk;

/// The volumes found on disk, and the ones whose meta could not be read (by name,
/// with why).
pub type Inventory = (Vec<VolumeEntry>, Vec<(String, String)>);

/// A volume as its meta file describes it, read without opening the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeEntry {
    /// The volume's name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The epoch of the engine that owns it.
    pub epoch: u64,
    /// The last engine closed it cleanly.
    pub clean: bool,
    /// A rebuild into it started and did not finish.
    pub rebuilding: bool,
    /// Its blocks carry the engine's seals.
    pub encrypted: bool,
    /// Open in this daemon right now.
    pub open: bool,
    /// Snapshots in its chain.
    pub snapshots: usize,
}

/// One name's place in the set: its own lock, held while that volume is opened (and
/// replayed), so opening one volume never waits for another's replay.
type Slot = Arc<Mutex<Option<Arc<Volume>>>>;

/// All volumes held by one replica daemon under its data directory.
pub struct VolumeSet {
    root: PathBuf,
    disk: Arc<dyn Disk>,
    opts: StoreOptions,
    /// Held only to find or add a slot: never across disk I/O.
    open: Mutex<HashMap<String, Slot>>,
}

impl VolumeSet {
    /// Uses `data_dir` (created if missing) as the daemon's data directory.
    pub fn new(data_dir: &Path, disk: Arc<dyn Disk>, opts: StoreOptions) -> io::Result<VolumeSet> {
        let root = data_dir.join("volumes");
        Ok(VolumeSet {
            root,
            disk,
            opts,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn wal_path(&self, name: &str) -> PathBuf {
        match &self.opts.wal_dir {
            Some(w) => w.join(format!("{name}.wal")),
            None => self.root.join(name).join("wal"),
        }
    }

    /// Returns the open volume `name`, opening (and recovering) it from disk if needed.
    pub fn get(&self, name: &str) -> Result<Arc<Volume>, StoreError> {
        self.load(name, None).map(|(v, _)| v)
    }

    /// Opens `name`, creating it with `size` bytes when missing (encrypted, with seals
    /// on every block, when `encryption` holds the engine's parameters); says whether
    /// it created it.
    pub fn get_or_create(
        &self,
        name: &str,
        size: u64,
        encryption: Option<&str>,
    ) -> Result<(Arc<Volume>, bool), StoreError> {
        self.load(name, Some((size, encryption)))
    }

    /// Gives a poisoned volume a fresh start for its rebuild, without restarting the
    /// daemon: the poisoned copy in memory is retired (streams still holding it get
    /// errors), the cached pages of its files are dropped so recovery reads what the
    /// disk really holds, and the volume is recovered from disk. The rebuild then
    /// compares every block with a healthy replica, so whatever the failed sync lost
    /// is copied again. A volume that is not poisoned is returned as it is.
    pub fn reopen_poisoned(&self, name: &str) -> Result<Arc<Volume>, StoreError> {
        validate_name(name)?;
        let slot = self.slot(name);
        let mut open = slot.lock();
        if let Some(old) = open.clone() {
            let Some(reason) = old.poisoned() else {
                return Ok(old);
            };
            *open = None;
            old.retire("reopened from disk for a rebuild");
            drop(old);
            tracing::warn!(volume = %name, %reason, "reopening a poisoned volume from disk for its rebuild");
            self.disk.drop_cache(&self.root.join(name));
            self.disk.drop_cache(&self.wal_path(name));
        }
        self.load_locked(&mut open, name, None).map(|(v, _)| v)
    }

    /// The volume `name` if it is open and nobody is opening it right now; never waits
    /// (for a request on an async thread: `get` may replay a log).
    pub fn get_open(&self, name: &str) -> Option<Arc<Volume>> {
        let slot = self.open.lock().get(name).cloned()?;
        let v = slot.try_lock()?.clone();
        v
    }

    /// The slot of `name`, added if missing.
    fn slot(&self, name: &str) -> Slot {
        self.open
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Opens (and with `create`, creates) `name` once, under its slot's lock.
    fn load(
        &self,
        name: &str,
        create: Option<(u64, Option<&str>)>,
    ) -> Result<(Arc<Volume>, bool), StoreError> {
        validate_name(name)?;
        let slot = self.slot(name);
        let mut open = slot.lock();
        self.load_locked(&mut open, name, create)
    }

    fn load_locked(
        &self,
        open: &mut Option<Arc<Volume>>,
        name: &str,
        create: Option<(u64, Option<&str>)>,
    ) -> Result<(Arc<Volume>, bool), StoreError> {
        if let Some(v) = open.as_ref() {
            return Ok((v.clone(), false));
        }
        let (dir, wal, disk) = (self.root.join(name), self.wal_path(name), self.disk.clone());
        let opts = &self.opts;
        let (vol, created) = match (
            Volume::open(disk.clone(), dir.clone(), wal.clone(), name, opts),
            create,
        ) {
            (Err(StoreError::NotFound { .. }), Some((size, enc))) => {
                (Volume::create(disk, dir, wal, name, size, opts, enc)?, true)
            }
            (r, _) => (r?, false),
        };
        let v = Arc::new(vol);
        *open = Some(v.clone());
        Ok((v, created))
    }

    /// Every volume on disk as its meta file describes it, without opening any; a
    /// volume whose meta cannot be read is reported by name with the reason.
    pub fn inventory(&self) -> io::Result<Inventory> {
        let open: Vec<String> = self
            .open_volumes()
            .iter()
            .map(|v| v.name().to_string())
            .collect();
        let mut found = Vec::new();
        let mut problems = Vec::new();
        for name in self.names()? {
            let path = self.root.join(&name).join("meta");
            let meta = match self.disk.read_file(&path) {
                Ok(Some(raw)) => serde_json::from_slice::<Meta>(&raw).map_err(|e| e.to_string()),
                Ok(None) => Err("its meta file vanished".to_string()),
                Err(e) => Err(e.to_string()),
            };
            match meta {
                Ok(m) => found.push(VolumeEntry {
                    open: open.contains(&name),
                    name,
                    size: m.size,
                    epoch: m.epoch,
                    clean: m.clean,
                    rebuilding: m.rebuilding,
                    encrypted: m.encryption.is_some(),
                    snapshots: m.layers.iter().filter(|l| l.name.is_some()).count(),
                }),
                Err(e) => problems.push((name, format!("{}: {e}", path.display()))),
            }
        }
        Ok((found, problems))
    }

    /// Names of all volumes on disk.
    pub fn names(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for n in self.disk.list(&self.root)? {
            if self
                .disk
                .read_file(&self.root.join(&n).join("meta"))?
                .is_some()
            {
                names.push(n);
            }
        }
        Ok(names)
    }

    /// Volumes that are open right now (not ones still being opened).
    pub fn open_volumes(&self) -> Vec<Arc<Volume>> {
        let slots: Vec<Slot> = self.open.lock().values().cloned().collect();
        slots
            .iter()
            .filter_map(|s| s.try_lock().and_then(|v| v.clone()))
            .collect()
    }
}
