//! A simulated disk for crash tests: it keeps what was synced apart from what was
//! only written, and on `crash` keeps any subset of the unsynced changes, tearing one
//! write at 512-byte granularity, as a power cut may.
//!
//! Simplification: creating, replacing and removing files is durable at once (the
//! real store fsyncs the directory for each of them).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::disk::{Disk, DiskFile, OsDisk};

#[derive(Clone, Debug)]
enum Change {
    Write(u64, Vec<u8>),
    Punch(u64, u64),
}

#[derive(Default)]
struct SimFileState {
    durable: Vec<u8>,
    live: Vec<u8>,
    pending: Vec<Change>,
}

fn apply(buf: &mut Vec<u8>, c: &Change) {
    match c {
        Change::Write(off, data) => {
            let end = *off as usize + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*off as usize..end].copy_from_slice(data);
        }
        Change::Punch(off, len) => {
            let s = (*off as usize).min(buf.len());
            let e = (*off as usize + *len as usize).min(buf.len());
            buf[s..e].fill(0);
        }
    }
}

#[derive(Default)]
struct SimState {
    /// Ordered, so a crash draws its choices in the same order on every run.
    files: BTreeMap<PathBuf, SimFileState>,
    /// Grows with every `power_cut`: handles from an earlier boot belong to a process
    /// that died with the power, and every call through them fails.
    boot: u64,
    fail_syncs: bool,
    /// File syncs (fdatasync) that succeeded, over every file.
    syncs: u64,
    /// Writes fail with ENOSPC once live bytes exceed this.
    capacity: Option<u64>,
    /// Mutating operations left before the disk dies (every one after fails).
    countdown: Option<u64>,
    /// How long a sync takes after it made the file durable (other threads run then,
    /// as they do while a real fdatasync waits for the device).
    sync_delay: Option<std::time::Duration>,
}

impl SimState {
    /// Fails calls through a handle of a process that died in a power cut.
    fn alive(&self, boot: u64) -> io::Result<()> {
        if boot == self.boot {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(5))
        }
    }

    /// Counts one mutating operation; errors once the countdown has run out.
    fn tick(&mut self) -> io::Result<()> {
        match self.countdown.as_mut() {
            Some(0) => Err(io::Error::from_raw_os_error(5)),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// A simulated disk; clones share the same state.
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<SimState>>,
    boot: u64,
}

struct SimFile {
    path: PathBuf,
    state: Arc<Mutex<SimState>>,
    boot: u64,
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// How many file syncs (fdatasync) succeeded so far, over every file: what a
    /// flush costs the disk.
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Loses power: each unsynced change survives or not as `pick` says, and a write
    /// `pick` chooses to tear keeps only the 512-byte sectors `pick` allows.
    pub fn crash(&self, mut pick: impl FnMut() -> bool) {
        let mut st = self.state.lock();
        for f in st.files.values_mut() {
            let pending = std::mem::take(&mut f.pending);
            for c in pending {
                match c {
                    Change::Write(off, data) if data.len() > 512 && pick() => {
                        // Torn: some sectors made it, some did not.
                        for (i, sector) in data.chunks(512).enumerate() {
                            if pick() {
                                apply(
                                    &mut f.durable,
                                    &Change::Write(off + i as u64 * 512, sector.to_vec()),
                                );
                            }
                        }
                    }
                    c => {
                        if pick() {
                            apply(&mut f.durable, &c);
                        }
                    }
                }
            }
            f.live = f.durable.clone();
        }
    }

    /// Loses power as `crash` does, and with it the process using the disk: every
    /// call through this handle, its clones and its files fails from now on. Returns
    /// the handle for the process that starts after the power returns.
    pub fn power_cut(&self, pick: impl FnMut() -> bool) -> SimDisk {
        self.crash(pick);
        let mut st = self.state.lock();
        st.boot += 1;
        SimDisk {
            state: self.state.clone(),
            boot: st.boot,
        }
    }

    /// Lets `n` more mutating operations succeed, then fails all later ones, so a
    /// crash can hit the middle of a checkpoint, snapshot, merge or revert.
    pub fn fail_after(&self, n: Option<u64>) {
        self.state.lock().countdown = n;
    }

    /// Makes every later sync fail (as a dying disk does).
    pub fn fail_syncs(&self, fail: bool) {
        self.state.lock().fail_syncs = fail;
    }

    /// Makes every later sync take `d` after it made its file durable.
    pub fn slow_syncs(&self, d: Option<std::time::Duration>) {
        self.state.lock().sync_delay = d;
    }

    /// Limits the bytes the disk holds; writes past it fail with ENOSPC.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state.lock().capacity = bytes;
    }

    /// A file's current contents (for tests that look for bytes on disk).
    pub fn read_file_for_test(&self, path: &Path) -> Vec<u8> {
        self.state
            .lock()
            .files
            .get(path)
            .map(|f| f.live.clone())
            .unwrap_or_default()
    }

    /// Flips one byte of a file (bit rot).
    pub fn corrupt(&self, path: &Path, off: u64) {
        let mut st = self.state.lock();
        if let Some(f) = st.files.get_mut(path) {
            for b in [&mut f.live, &mut f.durable] {
                if let Some(x) = b.get_mut(off as usize) {
                    *x ^= 0x5a;
                }
            }
        }
    }
}

impl DiskFile for SimFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let st = self.state.lock();
        st.alive(self.boot)?;
        let f = st.files.get(&self.path).ok_or(io::ErrorKind::NotFound)?;
        buf.fill(0);
        let s = (off as usize).min(f.live.len());
        let e = (off as usize + buf.len()).min(f.live.len());
        buf[..e - s].copy_from_slice(&f.live[s..e]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        st.alive(self.boot)?;
        st.tick()?;
        let total: u64 = st.files.values().map(|f| f.live.len() as u64).sum();
        let cap = st.capacity;
        let f = st
            .files
            .get_mut(&self.path)
            .ok_or(io::ErrorKind::NotFound)?;
        let growth = (off + buf.len() as u64).saturating_sub(f.live.len() as u64);
        if cap.is_some_and(|c| total + growth > c) {
            return Err(io::Error::from_raw_os_error(28));
        }
        let c = Change::Write(off, buf.to_vec());
        apply(&mut f.live, &c);
        f.pending.push(c);
        Ok(())
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        st.alive(self.boot)?;
        st.tick()?;
        let f = st
            .files
            .get_mut(&self.path)
            .ok_or(io::ErrorKind::NotFound)?;
        let c = Change::Punch(off, len);
        apply(&mut f.live, &c);
        f.pending.push(c);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let st = self.state.lock();
        st.alive(self.boot)?;
        Ok(st.files.get(&self.path).map_or(0, |f| f.live.len() as u64))
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.state.lock();
        st.alive(self.boot)?;
        st.tick()?;
        if st.fail_syncs {
            return Err(io::Error::from_raw_os_error(5));
        }
        let f = st
            .files
            .get_mut(&self.path)
            .ok_or(io::ErrorKind::NotFound)?;
        f.durable = f.live.clone();
        f.pending.clear();
        st.syncs += 1;
        let delay = st.sync_delay;
        drop(st);
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        Ok(())
    }

    fn allocated(&self) -> io::Result<u64> {
        self.len()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        st.alive(self.boot)?;
        let f = st
            .files
            .get_mut(&self.path)
            .ok_or(io::ErrorKind::NotFound)?;
        if f.live.len() < len as usize {
            f.live.resize(len as usize, 0);
            f.durable.resize(len as usize, 0);
        }
        Ok(())
    }
}

impl Disk for SimDisk {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>> {
        let mut st = self.state.lock();
        st.alive(self.boot)?;
        if !st.files.contains_key(path) {
            if !create {
                return Err(io::ErrorKind::NotFound.into());
            }
            st.tick()?;
            st.files.insert(path.to_path_buf(), SimFileState::default());
        }
        Ok(Arc::new(SimFile {
            path: path.to_path_buf(),
            state: self.state.clone(),
            boot: self.boot,
        }))
    }

    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        let st = self.state.lock();
        st.alive(self.boot)?;
        Ok(st.files.get(path).map(|f| f.live.clone()))
    }

    fn replace(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
        let mut st = self.state.lock();
        st.alive(self.boot)?;
        st.tick()?;
        if st.fail_syncs {
            return Err(io::Error::from_raw_os_error(5));
        }
        st.files.insert(
            path.to_path_buf(),
            SimFileState {
                durable: contents.to_vec(),
                live: contents.to_vec(),
                pending: Vec::new(),
            },
        );
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.state.lock();
        st.alive(self.boot)?;
        st.tick()?;
        st.files.remove(path);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.state.lock();
        st.alive(self.boot)?;
        let mut names: Vec<String> = st
            .files
            .keys()
            .filter_map(|p| p.strip_prefix(dir).ok())
            .filter_map(|rest| rest.components().next())
            .filter_map(|c| c.as_os_str().to_str().map(String::from))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}

/// The real disk, except that every sync fails with EIO while it is told to: a
/// dying disk under a running daemon, for tests that need real files.
#[derive(Default, Clone)]
pub struct SyncFaults {
    failing: Arc<std::sync::atomic::AtomicBool>,
    failed: Arc<std::sync::atomic::AtomicU64>,
}

struct SyncFaultsFile {
    inner: Arc<dyn DiskFile>,
    faults: SyncFaults,
}

impl SyncFaults {
    /// Makes every later sync fail, or succeed again.
    pub fn fail_syncs(&self, fail: bool) {
        self.failing
            .store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many syncs failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl DiskFile for SyncFaultsFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.punch(off, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn sync(&self) -> io::Result<()> {
        if self
            .faults
            .failing
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            self.faults
                .failed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::IO.raw_os_error(),
            ));
        }
        self.inner.sync()
    }
    fn allocated(&self) -> io::Result<u64> {
        self.inner.allocated()
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.inner.allocate(len)
    }
}

impl Disk for SyncFaults {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>> {
        Ok(Arc::new(SyncFaultsFile {
            inner: OsDisk.open(path, create)?,
            faults: self.clone(),
        }))
    }
    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        OsDisk.read_file(path)
    }
    fn replace(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
        OsDisk.replace(path, contents)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        OsDisk.remove(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        OsDisk.list(dir)
    }
    fn drop_cache(&self, path: &Path) {
        OsDisk.drop_cache(path)
    }
}
