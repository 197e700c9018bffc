//! The store's only door to the disk: a handful of file operations, each with the
//! contract the store relies on. `OsDisk` is the real thing; the crash harness in
//! `sim` keeps unsynced writes apart and can lose or tear them.
//!
//! Contracts:
//! - `write_at` may be lost or torn (at 512-byte granularity) until `sync` returns.
//! - `sync` makes every completed `write_at`, `punch` and `set_len` on that file durable.
//! - `read_at` sees every completed write, durable or not; bytes past the end read as 0.
//! - `replace` atomically swaps a small file's contents, durably (temp, fsync, rename,
//!   fsync dir); after a crash the file holds the old or the new contents.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// The largest piece one `pwrite` of the store writes. The kernel sizes a new
/// page-cache folio by the write that creates it, and ext4 on kernels with large
/// folios (6.16 on) walks every buffer of a folio on each later write into it: after a
/// 1 MiB write, random 4 KiB rewrites of those blocks ran at 37k/s against 812k/s
/// after 4 KiB writes (a C loop on this machine's ext4; 254k/s after 64 KiB). In the
/// engine, 4 KiB random writes to a volume filled by 1 MiB writes went from 31k to 104k
/// IOPS. 64 KiB keeps a 1 MiB write to 16 syscalls, which sequential 1 MiB reads did
/// not notice (16 KiB pieces cost them 14 %).
pub const WRITE_PIECE: usize = 64 << 10;

/// An open file of the store.
#[allow(clippy::len_without_is_empty)]
pub trait DiskFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `off`; bytes past the end of the file are zero.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes all of `buf` at `off`, growing the file if needed.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Deallocates `[off, off+len)`; it reads back as zeroes.
    fn punch(&self, off: u64, len: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Makes all completed changes durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Bytes actually allocated on disk (for space accounting).
    fn allocated(&self) -> io::Result<u64>;
    /// Reserves `len` bytes from offset 0, so later writes there cannot run out of space.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Hints that `[off, off+len)` will be read soon (best effort; a disk without a
    /// cache does nothing).
    fn will_need(&self, _off: u64, _len: u64) {}
}

/// The filesystem the store lives on.
pub trait Disk: Send + Sync {
    /// Opens `path`, creating it (and its directory) when `create` is set.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>>;
    /// Reads a whole small file; `None` if it does not exist.
    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Atomically and durably replaces a small file.
    fn replace(&self, path: &Path, contents: &[u8]) -> io::Result<()>;
    /// Removes a file if it exists.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory (empty if it does not exist).
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Drops cached pages of `path` (a file, or every file under a directory), so the
    /// next reads come from the disk. After a failed fdatasync the kernel may keep
    /// pages it never wrote, marked clean; a copy reopened for a rebuild must not
    /// trust them. Best effort: a disk without a cache does nothing.
    fn drop_cache(&self, _path: &Path) {}
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsDisk;

struct OsFile(File);

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

impl DiskFile for OsFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        // In pieces that end on WRITE_PIECE boundaries of the file, so no page-cache
        // folio grows past one piece (see WRITE_PIECE).
        let mut at = 0;
        while at < buf.len() {
            let pos = off + at as u64;
            let room = WRITE_PIECE - (pos % WRITE_PIECE as u64) as usize;
            let n = (buf.len() - at).min(room);
            self.0.write_all_at(&buf[at..at + n], pos)?;
            at += n;
        }
        Ok(())
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags as F;
        match rustix::fs::fallocate(&self.0, F::PUNCH_HOLE | F::KEEP_SIZE, off, len) {
            Ok(()) => Ok(()),
            // Filesystems without hole punching get real zeroes.
            Err(rustix::io::Errno::OPNOTSUPP) => {
                let zeroes = vec![0u8; 1 << 20];
                let mut at = off;
                while at < off + len {
                    let n = (off + len - at).min(zeroes.len() as u64);
                    self.0.write_all_at(&zeroes[..n as usize], at)?;
                    at += n;
                }
                Ok(())
            }
            Err(e) => Err(errno(e)),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn sync(&self) -> io::Result<()> {
        rustix::fs::fdatasync(&self.0).map_err(errno)
    }

    fn allocated(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.0.metadata()?.blocks() * 512)
    }

    fn will_need(&self, off: u64, len: u64) {
        // The kernel reads ahead at most one readahead window per hint (128 KiB by
        // default): a longer range is hinted a window at a time.
        const WINDOW: u64 = 128 << 10;
        let mut at = off;
        while at < off + len {
            let n = std::num::NonZeroU64::new(WINDOW.min(off + len - at));
            if let Err(e) = rustix::fs::fadvise(&self.0, at, n, rustix::fs::Advice::WillNeed) {
                tracing::debug!(error = %e, "read-ahead hint refused");
                return;
            }
            at += WINDOW;
        }
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(&self.0, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => self.0.set_len(len.max(self.len()?)),
            Err(e) => Err(errno(e)),
        }
    }
}

/// Creates `dir` and any missing parents, fsyncing each new entry's parent so the
/// directories survive a power cut like the files in them.
fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durably(parent)?;
    }
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(parent)?.sync_all()
}

impl Disk for OsDisk {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>> {
        if create {
            if let Some(dir) = path.parent() {
                create_dir_durably(dir)?;
            }
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        if create {
            // A new file's directory entry must survive a crash like its data.
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(Arc::new(OsFile(f)))
    }

    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn replace(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        create_dir_durably(dir)?;
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(contents)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for e in rd {
            if let Some(n) = e?.file_name().to_str() {
                names.push(n.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn drop_cache(&self, path: &Path) {
        if path.is_dir() {
            for n in self.list(path).unwrap_or_default() {
                self.drop_cache(&path.join(n));
            }
            return;
        }
        if let Ok(f) = File::open(path) {
            if let Err(e) = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed) {
                tracing::warn!(path = %path.display(), error = %e, "cannot drop cached pages");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes cut into pieces land whole: across piece boundaries, from odd offsets.
    #[test]
    fn a_write_in_pieces_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let f = OsFile(
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("f"))
                .unwrap(),
        );
        let data: Vec<u8> = (0..3 * WRITE_PIECE + 777)
            .map(|i| (i * 31 + i / 4096) as u8)
            .collect();
        for off in [0u64, 5000, WRITE_PIECE as u64 - 1, 3 * WRITE_PIECE as u64] {
            f.write_at(&data, off).unwrap();
            let mut back = vec![0u8; data.len()];
            f.read_at(&mut back, off).unwrap();
            assert!(back == data, "offset {off}");
        }
        f.write_at(&[], 9).unwrap();
    }
}
