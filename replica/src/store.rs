//! The on-disk store of one replica daemon: one directory per volume holding a
//! sparse data file and an atomically replaced `meta` file.
//!
//! ```text
//! <data>/volumes/<volume>/
//!   meta   format, size, block size, epoch (temp file, fsync, rename, fsync dir)
//!   data   4 KiB header (two checksummed slots: revision, clean flag), then block i
//!          at offset 4096 + i × 4096; holes read as zeroes
//! ```
//!
//! The revision lives in the data file so that the fdatasync that makes the data
//! durable makes the revision durable with it: no second sync per flush.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

/// The block size of every volume, in bytes.
pub const BLOCK_SIZE: u32 = 4096;
const HEADER_LEN: u64 = 4096;
const HEADER_MAGIC: &[u8; 8] = b"TTHRHDR1";
const HEADER_SLOT_LEN: usize = 40;
const META_FORMAT: u32 = 1;
/// The largest single read or write a replica accepts, in blocks (32 MiB).
pub const MAX_IO_BLOCKS: u64 = 8192;

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
}

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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Header {
    counter: u64,
    revision: u64,
    clean: bool,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_SLOT_LEN] {
        let mut b = [0u8; HEADER_SLOT_LEN];
        b[0..8].copy_from_slice(HEADER_MAGIC);
        b[8..16].copy_from_slice(&self.counter.to_le_bytes());
        b[16..24].copy_from_slice(&self.revision.to_le_bytes());
        b[24] = u8::from(self.clean);
        let crc = crc32fast::hash(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SLOT_LEN || &b[0..8] != HEADER_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[36..40].try_into().ok()?);
        if crc != crc32fast::hash(&b[..36]) {
            return None;
        }
        Some(Header {
            counter: u64::from_le_bytes(b[8..16].try_into().ok()?),
            revision: u64::from_le_bytes(b[16..24].try_into().ok()?),
            clean: b[24] == 1,
        })
    }
}

/// The persistent facts in `meta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    size: u64,
    epoch: u64,
}

impl Meta {
    fn encode(&self) -> String {
        format!(
            "format={META_FORMAT}\nsize={}\nblock_size={BLOCK_SIZE}\nepoch={}\n",
            self.size, self.epoch
        )
    }

    fn decode(text: &str) -> Result<Meta, String> {
        let mut fields = HashMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("meta line {line:?} is not key=value"))?;
            let v: u64 = v
                .trim()
                .parse()
                .map_err(|_| format!("meta field {k} has a non-numeric value {v:?}"))?;
            fields.insert(k.trim().to_string(), v);
        }
        let get = |k: &str| {
            fields
                .get(k)
                .copied()
                .ok_or_else(|| format!("meta is missing {k}"))
        };
        if get("format")? != u64::from(META_FORMAT) {
            return Err(format!("meta format {} is not supported", get("format")?));
        }
        if get("block_size")? != u64::from(BLOCK_SIZE) {
            return Err(format!(
                "block size {} is not supported",
                get("block_size")?
            ));
        }
        Ok(Meta {
            size: get("size")?,
            epoch: get("epoch")?,
        })
    }
}

/// One volume's replica on this daemon.
pub struct Volume {
    name: String,
    dir: PathBuf,
    data_path: PathBuf,
    file: File,
    size: u64,
    blocks: u64,
    epoch: AtomicU64,
    meta_lock: Mutex<()>,
    header: Mutex<Header>,
    poisoned: Mutex<Option<String>>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish()
    }
}

/// The result of opening a volume: the facts an engine needs to choose replicas.
#[derive(Debug, Clone, Copy)]
pub struct OpenInfo {
    /// Volume size in bytes.
    pub size: u64,
    /// Stored epoch before this open.
    pub previous_epoch: u64,
    /// Highest write sequence known durable.
    pub revision: u64,
    /// Whether the last user closed it cleanly.
    pub clean: bool,
}

fn io_err(volume: &str, op: &'static str, path: &Path, source: io::Error) -> StoreError {
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

/// Replaces `path` with `contents` atomically: temp file, fsync, rename, fsync dir.
fn write_atomic(dir: &Path, path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

impl Volume {
    fn create(dir: PathBuf, name: &str, size: u64) -> Result<Volume, StoreError> {
        if size == 0 || !size.is_multiple_of(u64::from(BLOCK_SIZE)) {
            return Err(StoreError::Invalid {
                volume: name.to_string(),
                what: format!("size {size} is not a positive multiple of {BLOCK_SIZE}"),
            });
        }
        let e = |op, p: &Path, s| io_err(name, op, p, s);
        std::fs::create_dir_all(&dir).map_err(|s| e("creating the volume directory", &dir, s))?;
        let data_path = dir.join("data");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .map_err(|s| e("creating the data file", &data_path, s))?;
        file.set_len(HEADER_LEN + size)
            .map_err(|s| e("sizing the data file", &data_path, s))?;
        let header = Header {
            counter: 1,
            revision: 0,
            clean: true,
        };
        let enc = header.encode();
        file.write_all_at(&enc, 0)
            .and_then(|_| file.write_all_at(&enc, 512))
            .and_then(|_| file.sync_all())
            .map_err(|s| e("writing the data header", &data_path, s))?;
        // meta is written last: a directory without meta is an unfinished create.
        let meta_path = dir.join("meta");
        let meta = Meta { size, epoch: 0 };
        write_atomic(&dir, &meta_path, meta.encode().as_bytes())
            .map_err(|s| e("writing meta", &meta_path, s))?;
        Ok(Volume {
            name: name.to_string(),
            dir,
            data_path,
            file,
            size,
            blocks: size / u64::from(BLOCK_SIZE),
            epoch: AtomicU64::new(0),
            meta_lock: Mutex::new(()),
            header: Mutex::new(header),
            poisoned: Mutex::new(None),
        })
    }

    fn open(dir: PathBuf, name: &str) -> Result<Volume, StoreError> {
        let e = |op, p: &Path, s| io_err(name, op, p, s);
        let meta_path = dir.join("meta");
        let text = match std::fs::read_to_string(&meta_path) {
            Ok(t) => t,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    volume: name.to_string(),
                })
            }
            Err(err) => return Err(e("reading meta", &meta_path, err)),
        };
        let meta = Meta::decode(&text).map_err(|what| StoreError::Invalid {
            volume: name.to_string(),
            what: format!("{}: {what}", meta_path.display()),
        })?;
        let data_path = dir.join("data");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|s| e("opening the data file", &data_path, s))?;
        let mut raw = [0u8; 1024];
        file.read_exact_at(&mut raw, 0)
            .map_err(|s| e("reading the data header", &data_path, s))?;
        let slots = [
            Header::decode(&raw[..HEADER_SLOT_LEN]),
            Header::decode(&raw[512..512 + HEADER_SLOT_LEN]),
        ];
        // A torn slot is skipped: the other one holds the previous, still true state.
        let header = slots
            .iter()
            .flatten()
            .max_by_key(|h| h.counter)
            .copied()
            .ok_or_else(|| StoreError::Invalid {
                volume: name.to_string(),
                what: format!("{}: both header slots are corrupt", data_path.display()),
            })?;
        let len = file
            .metadata()
            .map_err(|s| e("reading the data file size", &data_path, s))?
            .len();
        if len < HEADER_LEN + meta.size {
            return Err(StoreError::Invalid {
                volume: name.to_string(),
                what: format!(
                    "{} is {len} bytes, shorter than the volume size {} plus header",
                    data_path.display(),
                    meta.size
                ),
            });
        }
        Ok(Volume {
            name: name.to_string(),
            dir,
            data_path,
            file,
            size: meta.size,
            blocks: meta.size / u64::from(BLOCK_SIZE),
            epoch: AtomicU64::new(meta.epoch),
            meta_lock: Mutex::new(()),
            header: Mutex::new(header),
            poisoned: Mutex::new(None),
        })
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The current epoch: requests from older epochs are refused.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The highest write sequence known durable, and the clean flag.
    pub fn revision(&self) -> (u64, bool) {
        let h = self.header.lock();
        (h.revision, h.clean)
    }

    /// Takes `epoch` for a new engine; refuses epochs that are not newer.
    pub fn take_epoch(&self, epoch: u64) -> Result<u64, StoreError> {
        let _g = self.meta_lock.lock();
        let stored = self.epoch();
        if epoch <= stored {
            return Err(StoreError::Fenced {
                volume: self.name.clone(),
                epoch,
                stored,
            });
        }
        let meta_path = self.dir.join("meta");
        let meta = Meta {
            size: self.size,
            epoch,
        };
        write_atomic(&self.dir, &meta_path, meta.encode().as_bytes())
            .map_err(|s| io_err(&self.name, "writing meta", &meta_path, s))?;
        self.epoch.store(epoch, Ordering::Release);
        Ok(stored)
    }

    /// Checks that `epoch` may still issue requests.
    pub fn check_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        let stored = self.epoch();
        if epoch < stored {
            return Err(StoreError::Fenced {
                volume: self.name.clone(),
                epoch,
                stored,
            });
        }
        Ok(())
    }

    fn check_range(&self, block: u64, count: u64) -> Result<(), StoreError> {
        let end = block.checked_add(count);
        match end {
            Some(end) if count <= MAX_IO_BLOCKS && end <= self.blocks => Ok(()),
            _ if count > MAX_IO_BLOCKS => Err(StoreError::Invalid {
                volume: self.name.clone(),
                what: format!("request of {count} blocks exceeds the limit of {MAX_IO_BLOCKS}"),
            }),
            _ => Err(StoreError::OutOfRange {
                volume: self.name.clone(),
                start: block,
                end: end.unwrap_or(u64::MAX),
                blocks: self.blocks,
            }),
        }
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        match &*self.poisoned.lock() {
            Some(reason) => Err(StoreError::Poisoned {
                volume: self.name.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn offset(block: u64) -> u64 {
        HEADER_LEN + block * u64::from(BLOCK_SIZE)
    }

    /// Writes whole blocks starting at `block`.
    pub fn write_blocks(&self, block: u64, data: &[u8]) -> Result<(), StoreError> {
        let bs = u64::from(BLOCK_SIZE);
        if data.is_empty() || !(data.len() as u64).is_multiple_of(bs) {
            return Err(StoreError::Invalid {
                volume: self.name.clone(),
                what: format!(
                    "write of {} bytes is not a whole number of blocks",
                    data.len()
                ),
            });
        }
        self.check_range(block, data.len() as u64 / bs)?;
        self.check_writable()?;
        self.file
            .write_all_at(data, Self::offset(block))
            .map_err(|s| io_err(&self.name, "writing blocks", &self.data_path, s))
    }

    /// Reads `count` whole blocks starting at `block`.
    pub fn read_blocks(&self, block: u64, count: u32) -> Result<Bytes, StoreError> {
        self.check_range(block, u64::from(count))?;
        let len = count as usize * BLOCK_SIZE as usize;
        let mut buf = BytesMut::zeroed(len);
        self.file
            .read_exact_at(&mut buf, Self::offset(block))
            .map_err(|s| io_err(&self.name, "reading blocks", &self.data_path, s))?;
        Ok(buf.freeze())
    }

    /// Deallocates whole blocks; they read back as zeroes.
    pub fn zero_blocks(&self, block: u64, count: u64) -> Result<(), StoreError> {
        self.check_range_unbounded(block, count)?;
        self.check_writable()?;
        let bs = u64::from(BLOCK_SIZE);
        let punched = rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            Self::offset(block),
            count * bs,
        );
        match punched {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => {
                // Filesystems without hole punching get real zeroes.
                let zeroes = vec![0u8; (MAX_IO_BLOCKS * bs) as usize];
                let mut b = block;
                while b < block + count {
                    let n = (block + count - b).min(MAX_IO_BLOCKS);
                    self.write_blocks(b, &zeroes[..(n * bs) as usize])?;
                    b += n;
                }
                Ok(())
            }
            Err(errno) => Err(io_err(
                &self.name,
                "punching a hole",
                &self.data_path,
                io::Error::from_raw_os_error(errno.raw_os_error()),
            )),
        }
    }

    fn check_range_unbounded(&self, block: u64, count: u64) -> Result<(), StoreError> {
        match block.checked_add(count) {
            Some(end) if end <= self.blocks => Ok(()),
            end => Err(StoreError::OutOfRange {
                volume: self.name.clone(),
                start: block,
                end: end.unwrap_or(u64::MAX),
                blocks: self.blocks,
            }),
        }
    }

    /// Makes every completed write durable, then records `revision` in the header.
    ///
    /// The header write is made durable by the next sync: the revision on disk never
    /// claims more than what is durable.
    pub fn sync(&self, revision: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        if let Err(source) = rustix::fs::fdatasync(&self.file) {
            let reason = format!("fdatasync of {} failed: {source}", self.data_path.display());
            tracing::error!(volume = %self.name, %reason, "replica poisoned");
            *self.poisoned.lock() = Some(reason.clone());
            return Err(StoreError::Poisoned {
                volume: self.name.clone(),
                reason,
            });
        }
        let mut h = self.header.lock();
        if revision > h.revision {
            let next = Header {
                counter: h.counter + 1,
                revision,
                clean: false,
            };
            self.write_header(&next)?;
            *h = next;
        }
        Ok(())
    }

    /// Sets the clean flag and makes it durable (with everything written before).
    pub fn set_clean(&self, clean: bool) -> Result<(), StoreError> {
        self.check_writable()?;
        let mut h = self.header.lock();
        let next = Header {
            counter: h.counter + 1,
            revision: h.revision,
            clean,
        };
        self.write_header(&next)?;
        rustix::fs::fdatasync(&self.file).map_err(|s| {
            io_err(
                &self.name,
                "syncing the header",
                &self.data_path,
                io::Error::from_raw_os_error(s.raw_os_error()),
            )
        })?;
        *h = next;
        Ok(())
    }

    fn write_header(&self, h: &Header) -> Result<(), StoreError> {
        // Alternate slots so a torn header write leaves the other slot intact.
        let slot = if h.counter.is_multiple_of(2) { 0 } else { 512 };
        self.file
            .write_all_at(&h.encode(), slot)
            .map_err(|s| io_err(&self.name, "writing the header", &self.data_path, s))
    }
}

/// All volumes held by one replica daemon under its data directory.
pub struct VolumeSet {
    root: PathBuf,
    open: Mutex<HashMap<String, Arc<Volume>>>,
}

impl VolumeSet {
    /// Uses `data_dir` (created if missing) as the daemon's data directory.
    pub fn new(data_dir: &Path) -> io::Result<VolumeSet> {
        let root = data_dir.join("volumes");
        std::fs::create_dir_all(&root)?;
        Ok(VolumeSet {
            root,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Returns the open volume `name`, opening it from disk if needed.
    pub fn get(&self, name: &str) -> Result<Arc<Volume>, StoreError> {
        validate_name(name)?;
        let mut open = self.open.lock();
        if let Some(v) = open.get(name) {
            return Ok(v.clone());
        }
        let v = Arc::new(Volume::open(self.root.join(name), name)?);
        open.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// Opens `name`, creating it with `size` bytes when missing; says whether it created.
    pub fn get_or_create(&self, name: &str, size: u64) -> Result<(Arc<Volume>, bool), StoreError> {
        match self.get(name) {
            Ok(v) => Ok((v, false)),
            Err(StoreError::NotFound { .. }) => {
                let mut open = self.open.lock();
                if let Some(v) = open.get(name) {
                    return Ok((v.clone(), false));
                }
                let v = Arc::new(Volume::create(self.root.join(name), name, size)?);
                open.insert(name.to_string(), v.clone());
                tracing::info!(volume = name, size, "created volume");
                Ok((v, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Names of all volumes on disk.
    pub fn names(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            if entry.path().join("meta").exists() {
                if let Some(n) = entry.file_name().to_str() {
                    names.push(n.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Volumes that are open right now.
    pub fn open_volumes(&self) -> Vec<Arc<Volume>> {
        self.open.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_write_reopen_read() {
        let dir = tempfile::tempdir().unwrap();
        let set = VolumeSet::new(dir.path()).unwrap();
        let (v, created) = set.get_or_create("v1", 1 << 20).unwrap();
        assert!(created);
        v.write_blocks(3, &[7u8; 8192]).unwrap();
        v.sync(42).unwrap();
        v.set_clean(true).unwrap();
        drop(v);
        drop(set);
        let set = VolumeSet::new(dir.path()).unwrap();
        let v = set.get("v1").unwrap();
        assert_eq!(v.read_blocks(3, 2).unwrap(), Bytes::from(vec![7u8; 8192]));
        assert_eq!(v.read_blocks(0, 1).unwrap(), Bytes::from(vec![0u8; 4096]));
        assert_eq!(v.revision(), (42, true));
    }

    #[test]
    fn rejects_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let set = VolumeSet::new(dir.path()).unwrap();
        assert!(matches!(set.get("../x"), Err(StoreError::BadName { .. })));
        assert!(matches!(set.get("nope"), Err(StoreError::NotFound { .. })));
        let (v, _) = set.get_or_create("v", 4096 * 4).unwrap();
        assert!(matches!(
            v.write_blocks(4, &[0u8; 4096]),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            v.write_blocks(0, &[0u8; 100]),
            Err(StoreError::Invalid { .. })
        ));
        assert!(matches!(
            v.read_blocks(u64::MAX, 2),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            v.zero_blocks(2, 3),
            Err(StoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn epochs_only_move_forward() {
        let dir = tempfile::tempdir().unwrap();
        let set = VolumeSet::new(dir.path()).unwrap();
        let (v, _) = set.get_or_create("v", 4096).unwrap();
        assert_eq!(v.take_epoch(3).unwrap(), 0);
        assert!(matches!(v.take_epoch(3), Err(StoreError::Fenced { .. })));
        assert!(v.check_epoch(2).is_err());
        assert!(v.check_epoch(3).is_ok());
    }

    #[test]
    fn torn_header_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let set = VolumeSet::new(dir.path()).unwrap();
        let (v, _) = set.get_or_create("v", 4096).unwrap();
        v.sync(5).unwrap();
        v.sync(9).unwrap();
        drop(v);
        drop(set);
        // Corrupt the newest slot (counter 3 lives in slot 512).
        let path = dir.path().join("volumes/v/data");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 8], 512 + 10).unwrap();
        let set = VolumeSet::new(dir.path()).unwrap();
        assert_eq!(set.get("v").unwrap().revision().0, 5);
    }

    #[test]
    fn zero_blocks_reads_back_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let set = VolumeSet::new(dir.path()).unwrap();
        let (v, _) = set.get_or_create("v", 4096 * 8).unwrap();
        v.write_blocks(0, &[1u8; 4096 * 8]).unwrap();
        v.zero_blocks(2, 3).unwrap();
        let all = v.read_blocks(0, 8).unwrap();
        assert!(all[..8192].iter().all(|&b| b == 1));
        assert!(all[8192..20480].iter().all(|&b| b == 0));
        assert!(all[20480..].iter().all(|&b| b == 1));
    }
}
