//! The write-ahead log (`docs/format.md`, "The log"): a file of two halves that take
//! records in turn, its header, the in-memory index of the blocks it holds, the tail
//! of direct records gathered before one `pwrite`, and replay. It knows nothing of
//! layers beyond reading a direct record's slot to check it, and never calls up into
//! the checkpoint that empties it.

pub mod codec;
mod replay;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use codec::{RecordHeader, RecordKind, SyncMark, WalHeader, BLOCK, MARK_SLOTS, RECORDS_START};

use super::error::{Named, StoreError};
use crate::disk::{Disk, DiskFile};
use crate::extents::{ExtentMap, Shift};

/// Records gathered in memory before one `pwrite` to the log.
pub(super) const TAIL_BYTES: usize = 256 << 10;

/// Records with at most this much data are gathered in the tail; larger ones are
/// written to the file at once (their copy into the tail would cost more than the
/// syscall it saves).
pub(super) const GATHER_MAX: usize = 64 << 10;

/// Whether a record with `data` is gathered in the tail rather than written at once.
pub(super) fn gathered(kind: RecordKind, data: &[u8]) -> bool {
    kind == RecordKind::Direct || data.len() <= GATHER_MAX
}

/// Where a block written since the last checkpoint lives in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recent {
    Zero,
    /// `side` is the length of each block's side entry (crc and tag) at `side_off`.
    Data {
        data_off: u64,
        side_off: u64,
        side: u8,
    },
    /// The data is in `slot` of the head layer; its checksums are in the log. `at` is
    /// the log's byte count after the record: it is durable once `synced` reaches it.
    Direct {
        side_off: u64,
        side: u8,
        slot: u8,
        at: u64,
    },
}

impl Shift for Recent {
    fn shift(&self, by: u64) -> Self {
        match *self {
            Recent::Zero => Recent::Zero,
            Recent::Data {
                data_off,
                side_off,
                side,
            } => Recent::Data {
                data_off: data_off + by * BLOCK as u64,
                side_off: side_off + by * u64::from(side),
                side,
            },
            Recent::Direct {
                side_off,
                side,
                slot,
                at,
            } => Recent::Direct {
                side_off: side_off + by * u64::from(side),
                side,
                slot,
                at,
            },
        }
    }
}

/// A record placed in the log, not yet counted.
pub(super) struct Placed {
    h: RecordHeader,
    off: u64,
}

/// The log file: fixed for the volume's life, so it needs no lock; byte counts
/// across generations say what is written and what is durable.
pub(super) struct Log {
    file: Arc<dyn DiskFile>,
    pub(super) path: PathBuf,
    pub(super) size: u64,
    /// Log bytes appended and made durable, counted across generations.
    pub(super) written: AtomicU64,
    pub(super) synced: AtomicU64,
    /// How far a running sync may reach: a version below this may be promised any
    /// moment, so a direct write must not reuse its slot (it goes through the log).
    pub(super) syncing: AtomicU64,
    /// The last sync mark written (or found at open); written under `sync_lock`.
    mark: parking_lot::Mutex<SyncMark>,
    vol: Named,
}

/// The in-memory side of the log, under the volume's lock: where appends go, which
/// blocks each half holds, and the direct records not yet in the file.
pub(super) struct Cursor {
    /// The header on disk.
    pub(super) header: WalHeader,
    /// Where the next record goes.
    pub(super) off: u64,
    /// Which half of the log takes appends, and the generation written there.
    pub(super) half: u8,
    pub(super) gen: u64,
    /// Blocks of the live half.
    pub(super) recent: ExtentMap<Recent>,
    /// Blocks of the other half, being copied into the head by a checkpoint.
    pub(super) frozen: Option<Arc<ExtentMap<Recent>>>,
    /// Highest write sequence in `frozen`.
    pub(super) frozen_rev: u64,
    /// Bytes written directly into the head since the live half began.
    pub(super) direct_in_half: u64,
    /// Records not yet written to the log file, which holds everything before
    /// `tail_off`: direct records' headers (a direct write then costs one `pwrite`,
    /// its data, not two) and small writes whole (a batch of 4 KiB writes costs one
    /// `pwrite`, not one each: issue 19). Only syncs promise anything, and every sync
    /// writes the tail first, in order.
    pub(super) tail: Vec<u8>,
    pub(super) tail_off: u64,
    /// Generation and offset of the latest direct record placed: a sync that reaches
    /// it writes a sync mark once the slots are durable.
    pub(super) last_direct: Option<(u64, u64)>,
    /// crc32c of the bytes placed in the live half, from its start to `off` (what a
    /// sync mark carries).
    pub(super) crc: u32,
}

impl Cursor {
    /// What the log holds for block `p` (the live half first), and how far that runs
    /// (< `end`); `None` while the log holds nothing.
    pub(super) fn lookup(&self, p: u64, end: u64) -> (Option<Recent>, u64) {
        let mut bound = end;
        for map in std::iter::once(&self.recent).chain(self.frozen.as_deref()) {
            match map.run(p, bound) {
                Ok((v, e)) => return (Some(v), e),
                Err(b) => bound = b,
            }
        }
        (None, bound)
    }
}

impl Log {
    /// Creates the log of `size` bytes at `path`, written with zeroes, generation 1.
    pub(super) fn create(
        disk: &dyn Disk,
        path: &Path,
        size: u64,
        vol: &Named,
    ) -> Result<(), StoreError> {
        let e = |op| vol.io(op, path);
        let file = disk.open(path, true).map_err(e("creating the log"))?;
        file.allocate(size).map_err(e("allocating the log"))?;
        // Written zeroes, not just reserved space: a first write into an unwritten
        // extent makes fdatasync commit metadata too, and flush latency is the log's
        // whole job.
        let zeroes = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < size {
            let n = (size - at).min(zeroes.len() as u64) as usize;
            file.write_at(&zeroes[..n], at)
                .map_err(e("zeroing the log"))?;
            at += n as u64;
        }
        let header = WalHeader {
            gen: 1,
            revision: 0,
            half: 0,
        };
        file.write_at(&header.encode(), header.slot_offset())
            .and_then(|_| file.sync())
            .map_err(e("writing the log header"))
    }

    /// Opens the log at `path` and reads its header; returns the log and a cursor at
    /// the start of the header's half (replay moves it on).
    pub(super) fn open(
        disk: &dyn Disk,
        path: &Path,
        size: u64,
        vol: &Named,
    ) -> Result<(Log, Cursor), StoreError> {
        let file = disk.open(path, false).map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                vol.invalid(format!(
                    "its write-ahead log is missing at {}; was the replica started with a different --wal-dir?",
                    path.display()
                ))
            } else {
                vol.io("opening the log", path)(err)
            }
        })?;
        // The log keeps the size it was created with: a different --wal-size must not
        // cut replay short and lose flushed records past the new size.
        let size = match file.len() {
            Ok(len) if len > RECORDS_START => {
                if len != size {
                    tracing::info!(volume = %vol.0, size = len, "keeping the log's existing size");
                }
                len
            }
            _ => size,
        };
        let mut slots = [0u8; 2048];
        file.read_at(&mut slots, 0)
            .map_err(vol.io("reading the log header", path))?;
        let mut marks: Vec<SyncMark> = MARK_SLOTS
            .iter()
            .filter_map(|&o| SyncMark::decode(&slots[o as usize..]))
            .collect();
        marks.sort_by_key(|m| std::cmp::Reverse(m.seq));
        let header = [
            WalHeader::decode(&slots[..512]),
            WalHeader::decode(&slots[512..]),
        ]
        .into_iter()
        .flatten()
        .max_by_key(|h| h.gen)
        .ok_or_else(|| {
            vol.invalid(format!(
                "{}: both log header slots are corrupt",
                path.display()
            ))
        })?;
        let log = Log {
            file,
            path: path.to_path_buf(),
            size,
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            syncing: AtomicU64::new(0),
            mark: parking_lot::Mutex::new(SyncMark::default()),
            vol: vol.clone(),
        };
        // The newest mark whose covered bytes all reached the disk; none in a log made
        // before marks existed (the default covers nothing).
        for m in marks {
            if log
                .mark_holds(&header, &m)
                .map_err(vol.io("reading the log", path))?
            {
                *log.mark.lock() = m;
                break;
            }
        }
        let cursor = Cursor {
            header,
            off: RECORDS_START,
            half: header.half,
            gen: header.gen,
            recent: ExtentMap::new(),
            frozen: None,
            frozen_rev: 0,
            direct_in_half: 0,
            tail: Vec::with_capacity(TAIL_BYTES + 4096),
            tail_off: RECORDS_START,
            last_direct: None,
            crc: 0,
        };
        Ok((log, cursor))
    }

    /// crc32c of the bytes of half `h` from its start up to `off`.
    pub(super) fn crc_upto(&self, h: u8, off: u64) -> std::io::Result<u32> {
        let (mut at, end) = self.half_range(h);
        let end = off.min(end);
        let mut crc = 0;
        let mut buf = vec![0u8; 1 << 20];
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            self.file.read_at(&mut buf[..n], at)?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            at += n as u64;
        }
        Ok(crc)
    }

    /// Whether every byte `m` covers reached the disk: the log bytes of its half up
    /// to its offset match its content crc (marks of earlier generations cover no
    /// record replay reads, and marks written before content crcs are taken as they
    /// are).
    fn mark_holds(&self, header: &WalHeader, m: &SyncMark) -> std::io::Result<bool> {
        let Some(content) = m.content else {
            return Ok(true);
        };
        let half = if m.gen == header.gen {
            header.half
        } else if m.gen == header.gen + 1 {
            1 - header.half
        } else {
            return Ok(m.gen < header.gen);
        };
        Ok(self.crc_upto(half, m.off)? == content)
    }

    /// The byte range of half `h`.
    pub(super) fn half_range(&self, h: u8) -> (u64, u64) {
        let mid = RECORDS_START + ((self.size - RECORDS_START) / 2) / 4096 * 4096;
        if h == 0 {
            (RECORDS_START, mid)
        } else {
            (mid, self.size)
        }
    }

    /// Writes header `h` to its slot and syncs it.
    pub(super) fn write_header(&self, h: &WalHeader) -> std::io::Result<()> {
        self.file
            .write_at(&h.encode(), h.slot_offset())
            .and_then(|_| self.file.sync())
    }

    /// The last sync mark written, or the one found at open.
    pub(super) fn mark(&self) -> SyncMark {
        *self.mark.lock()
    }

    /// Writes a sync mark reaching `(gen, off)` if the last one does not cover the direct
    /// record at `direct`; no sync (the log's next fdatasync makes it durable). The
    /// caller holds `sync_lock` and synced the head layer's slots after the reach was
    /// taken.
    pub(super) fn write_mark(
        &self,
        gen: u64,
        off: u64,
        content: u32,
        direct: Option<(u64, u64)>,
    ) -> std::io::Result<()> {
        let mut last = self.mark.lock();
        if direct.is_none_or(|(g, o)| last.covers(g, o)) {
            return Ok(());
        }
        let next = SyncMark {
            seq: last.seq + 1,
            gen,
            off,
            content: Some(content),
        };
        self.file.write_at(&next.encode(), next.slot_offset())?;
        *last = next;
        Ok(())
    }

    /// fdatasync of the log file.
    pub(super) fn sync(&self) -> std::io::Result<()> {
        self.file.sync()
    }

    /// Writes the gathered records to the file.
    pub(super) fn write_tail(&self, c: &mut Cursor) -> std::io::Result<()> {
        if c.tail.is_empty() {
            return Ok(());
        }
        self.file.write_at(&c.tail, c.tail_off)?;
        c.tail.clear();
        Ok(())
    }

    /// Reads log bytes at `off` from the file.
    pub(super) fn read(&self, buf: &mut [u8], off: u64) -> Result<(), StoreError> {
        self.file
            .read_at(buf, off)
            .map_err(self.vol.io("reading the log", &self.path))
    }

    /// Reads log bytes at `off`, from the gathered tail when they are still there.
    pub(super) fn read_through(
        &self,
        c: &Cursor,
        buf: &mut [u8],
        off: u64,
    ) -> Result<(), StoreError> {
        let from = off.wrapping_sub(c.tail_off) as usize;
        if off >= c.tail_off && from + buf.len() <= c.tail.len() {
            buf.copy_from_slice(&c.tail[from..from + buf.len()]);
            return Ok(());
        }
        self.read(buf, off)
    }

    /// Places record `h` (its generation set to the cursor's) with its side entries
    /// at the cursor: a direct record in the tail, any other in the file, with its
    /// `data`. The caller made room, and wrote the tail first for a record that goes
    /// to the file (records reach the file in order). `index` then counts it.
    pub(super) fn place(
        &self,
        c: &mut Cursor,
        h: RecordHeader,
        sides: &[u8],
        data: &[u8],
    ) -> Result<Placed, StoreError> {
        let h = RecordHeader { gen: c.gen, ..h };
        let head = codec::encode_record(&h, sides);
        let off = c.off;
        // Placed in offset order; a record that then fails to reach the file leaves a
        // crc no mark can match, which only switches marks off.
        c.crc = crc32c::crc32c_append(c.crc, &head);
        if h.kind != RecordKind::Direct {
            c.crc = crc32c::crc32c_append(c.crc, data);
        }
        if h.kind == RecordKind::Direct {
            c.last_direct = Some((c.gen, off));
        }
        if gathered(h.kind, data) {
            if c.tail.is_empty() {
                c.tail_off = off;
            }
            c.tail.extend_from_slice(&head);
            if h.kind != RecordKind::Direct {
                c.tail.extend_from_slice(data);
            }
        } else {
            let data_off = off + (codec::RECORD_HEADER + h.sides_len()) as u64;
            self.file
                .write_at(&head, off)
                .and_then(|_| self.file.write_at(data, data_off))
                .map_err(self.vol.io("appending to the log", &self.path))?;
        }
        Ok(Placed { h, off })
    }

    /// Counts a placed record as written and maps its blocks to it.
    pub(super) fn index(&self, c: &mut Cursor, p: Placed) {
        let Placed { h, off } = p;
        let len = h.total_len();
        let at = self.written.fetch_add(len, Ordering::SeqCst) + len;
        let side_off = off + codec::RECORD_HEADER as u64;
        let data_off = side_off + h.sides_len() as u64;
        let side = h.side_len() as u8;
        let v = match h.kind {
            RecordKind::Write => Recent::Data {
                data_off,
                side_off,
                side,
            },
            RecordKind::Direct => Recent::Direct {
                side_off,
                side,
                slot: h.slot,
                at,
            },
            RecordKind::Zero => Recent::Zero,
        };
        c.recent.insert(h.block, h.block + u64::from(h.count), v);
        c.off += len;
    }

    /// Bytes the log occupies on disk.
    pub(super) fn allocated(&self) -> u64 {
        self.file.allocated().unwrap_or(0)
    }
}
