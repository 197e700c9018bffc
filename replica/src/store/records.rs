//! Where a layer keeps its block records (`docs/format.md`, "Block records"). The
//! blocks are split in groups whose entries fill one 4 KiB page of `.rec`. A group
//! that holds many blocks keeps their entries at their address in that page; one that
//! holds few keeps them packed in `.pack`, so 4 KiB writes scattered over a huge thin
//! volume do not cost a page of records each (that made the head 1.95 times the data).
//!
//! `.pack` is a log of chunks: a chunk holds a sparse group's whole set of entries and
//! replaces the group's earlier chunk; a dense mark says the group moved to `.rec`.
//! Only the store's writers that hold the volume's `ckpt` lock write records, so
//! writes never race each other; readers may run alongside.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::record::{BlockRecord, State};
use crate::disk::{Disk, DiskFile};
use crate::extents::ExtentMap;

/// The page one group's entries fill in `.rec`.
const PAGE: usize = 4096;
/// Blocks a group must hold before it gets its page of `.rec`: records then cost at
/// most 4096 / 32 = 128 bytes per block held (3 %).
const DENSE_AT: usize = 32;
/// Header slots at offsets 0 and 512; chunks from 1024.
const FIRST: u64 = 1024;
const HEAD_MAGIC: &[u8; 8] = b"TTHRPAK1";
const CHUNK_MAGIC: u32 = 0x5450_4b31;
const CHUNK_HEADER: usize = 32;
const SPARSE: u8 = 1;
const DENSE: u8 = 2;
/// Garbage (replaced chunks) allowed beyond the live chunks' own size before the file
/// is rewritten with the live ones only.
const SLACK: u64 = 1 << 20;

/// A layer's block records: the `.rec` page of each dense group, the `.pack` chunks of
/// the sparse ones.
pub(super) struct Records {
    rec: Arc<dyn DiskFile>,
    /// Bytes per entry (8, or 64 with a seal).
    entry: usize,
    /// Blocks per group: one page of entries.
    group: u64,
    /// Groups in `pack.index`, read without the lock: reads skip the pack when none.
    sparse: AtomicUsize,
    pack: Mutex<Pack>,
    pack_path: PathBuf,
}

/// The open `.pack` and what it holds.
struct Pack {
    file: Arc<dyn DiskFile>,
    /// Each sparse group's live chunk.
    index: BTreeMap<u64, Chunk>,
    /// Where the next chunk goes.
    end: u64,
    /// The next chunk's sequence number: consecutive from 1 in a file.
    seq: u64,
    /// Bytes of live chunks.
    live: u64,
    /// Groups moved to `.rec` whose dense marks wait for `.rec` to be synced.
    dense_pending: Vec<u64>,
    /// Appends since the last sync.
    dirty: bool,
    /// Syncs so far: picks the header slot.
    syncs: u64,
    /// Groups known to have their page in `.rec` (a bit each): a small write to one
    /// goes there without reading the page to find out.
    dense: Vec<u64>,
}

/// Where a live chunk is in the file.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    off: u64,
    len: u32,
}

/// A sparse group's entries, in block order: each one's index in the group, and the
/// entries' bytes back to back.
#[derive(Debug, Default)]
struct Entries {
    ids: Vec<u16>,
    data: Vec<u8>,
}

impl Entries {
    /// These entries (of a group starting at block `s`) with those of blocks `b..`
    /// replaced by `new`; all-zero ones are dropped (the group no longer has them).
    fn merged(&self, s: u64, b: u64, new: &[u8], e: usize) -> Entries {
        let lo = (b - s) as u16;
        let hi = lo + (new.len() / e) as u16;
        let mut out = Entries {
            ids: Vec::with_capacity(self.ids.len() + new.len() / e),
            data: Vec::with_capacity(self.data.len() + new.len()),
        };
        let split = self.ids.partition_point(|&i| i < lo);
        let rest = self.ids.partition_point(|&i| i < hi);
        out.ids.extend_from_slice(&self.ids[..split]);
        out.data.extend_from_slice(&self.data[..split * e]);
        for (k, x) in new.chunks_exact(e).enumerate() {
            if x.iter().any(|&y| y != 0) {
                out.ids.push(lo + k as u16);
                out.data.extend_from_slice(x);
            }
        }
        out.ids.extend_from_slice(&self.ids[rest..]);
        out.data.extend_from_slice(&self.data[rest * e..]);
        out
    }

    /// (index in the group, entry) of each.
    fn iter(&self, e: usize) -> impl Iterator<Item = (u16, &[u8])> {
        self.ids.iter().copied().zip(self.data.chunks_exact(e))
    }
}

/// A decoded chunk: kind, sequence number, group, and entries.
struct Decoded {
    kind: u8,
    seq: u64,
    group: u64,
    entries: Entries,
    len: usize,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn encode_chunk(kind: u8, seq: u64, group: u64, entries: &Entries, entry: usize) -> Vec<u8> {
    let count = entries.ids.len();
    let body = count * (2 + entry);
    let len = (CHUNK_HEADER + body).next_multiple_of(8);
    let mut out = vec![0u8; len];
    out[0..4].copy_from_slice(&CHUNK_MAGIC.to_le_bytes());
    out[4] = kind;
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[16..24].copy_from_slice(&group.to_le_bytes());
    out[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    let mut at = CHUNK_HEADER;
    for i in &entries.ids {
        out[at..at + 2].copy_from_slice(&i.to_le_bytes());
        at += 2;
    }
    out[at..at + entries.data.len()].copy_from_slice(&entries.data);
    let crc = crc32c::crc32c(&out);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// Decodes the chunk at the start of `b`, if it is a whole valid one: `None` where
/// the file's valid chunks end (or a damaged one is).
fn decode_chunk(b: &[u8], entry: usize, group: u64) -> Option<Decoded> {
    if b.len() < CHUNK_HEADER || u32_at(b, 0) != CHUNK_MAGIC {
        return None;
    }
    let kind = b[4];
    let count = u32_at(b, 24) as usize;
    if !(kind == SPARSE && count < DENSE_AT || kind == DENSE && count == 0) {
        return None;
    }
    let len = (CHUNK_HEADER + count * (2 + entry)).next_multiple_of(8);
    let whole = b.get(..len)?;
    // The crc covers the chunk with its own field as zero.
    let crc = crc32c::crc32c_append(crc32c::crc32c(&whole[..28]), &[0; 4]);
    if crc32c::crc32c_append(crc, &whole[32..]) != u32_at(b, 28) {
        return None;
    }
    let ids = &whole[CHUNK_HEADER..CHUNK_HEADER + 2 * count];
    let mut entries = Entries {
        ids: Vec::with_capacity(count),
        data: whole[CHUNK_HEADER + 2 * count..][..count * entry].to_vec(),
    };
    let mut last = None;
    for i in ids.chunks_exact(2) {
        let i = u16::from_le_bytes([i[0], i[1]]);
        // In order and inside the group, or it is not a chunk this code wrote.
        if u64::from(i) >= group || last.is_some_and(|l| l >= i) {
            return None;
        }
        last = Some(i);
        entries.ids.push(i);
    }
    Some(Decoded {
        kind,
        seq: u64_at(b, 8),
        group: u64_at(b, 16),
        entries,
        len,
    })
}

/// A header slot: "TTHRPAK1" | syncs u64 | end u64 | crc32c u32.
fn encode_head(syncs: u64, end: u64) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..8].copy_from_slice(HEAD_MAGIC);
    h[8..16].copy_from_slice(&syncs.to_le_bytes());
    h[16..24].copy_from_slice(&end.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The newer valid header slot: (syncs, synced end).
fn decode_heads(file: &dyn DiskFile) -> io::Result<Option<(u64, u64)>> {
    let mut best = None;
    for slot in [0u64, 512] {
        let mut h = [0u8; 28];
        file.read_at(&mut h, slot)?;
        if &h[0..8] != HEAD_MAGIC || crc32c::crc32c(&h[..24]) != u32_at(&h, 24) {
            continue;
        }
        let (syncs, end) = (u64_at(&h, 8), u64_at(&h, 16));
        if best.is_none_or(|(s, _)| syncs > s) {
            best = Some((syncs, end));
        }
    }
    Ok(best)
}

impl Pack {
    fn is_dense(&self, g: u64) -> bool {
        self.dense
            .get((g / 64) as usize)
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    fn set_dense(&mut self, g: u64) {
        let i = (g / 64) as usize;
        if self.dense.len() <= i {
            self.dense.resize(i + 1, 0);
        }
        self.dense[i] |= 1 << (g % 64);
    }

    fn append(&mut self, kind: u8, group: u64, entries: &Entries, entry: usize) -> io::Result<()> {
        let bytes = encode_chunk(kind, self.seq, group, entries, entry);
        self.file.write_at(&bytes, self.end)?;
        if let Some(old) = self.index.remove(&group) {
            self.live -= u64::from(old.len);
        }
        if kind == SPARSE {
            self.index.insert(
                group,
                Chunk {
                    off: self.end,
                    len: bytes.len() as u32,
                },
            );
            self.live += bytes.len() as u64;
        }
        self.end += bytes.len() as u64;
        self.seq += 1;
        self.dirty = true;
        Ok(())
    }

    fn read(&self, c: Chunk, entry: usize, group: u64) -> io::Result<Entries> {
        let mut b = vec![0u8; c.len as usize];
        self.file.read_at(&mut b, c.off)?;
        match decode_chunk(&b, entry, group) {
            Some(d) if d.len == b.len() => Ok(d.entries),
            _ => Err(invalid(format!(
                "the packed block records at offset {} fail their checksum",
                c.off
            ))),
        }
    }
}

impl Records {
    /// Creates empty records for a new layer.
    pub(super) fn create(
        disk: &dyn Disk,
        rec: &Path,
        pack: &Path,
        entry: usize,
    ) -> io::Result<Records> {
        let rec = disk.open(rec, true)?;
        let file = disk.open(pack, true)?;
        Ok(Records::new(
            rec,
            file,
            pack,
            entry,
            BTreeMap::new(),
            FIRST,
            1,
            0,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        rec: Arc<dyn DiskFile>,
        file: Arc<dyn DiskFile>,
        pack_path: &Path,
        entry: usize,
        index: BTreeMap<u64, Chunk>,
        end: u64,
        seq: u64,
        syncs: u64,
    ) -> Records {
        let live = index.values().map(|c| u64::from(c.len)).sum();
        Records {
            rec,
            entry,
            group: (PAGE / entry) as u64,
            sparse: AtomicUsize::new(index.len()),
            pack: Mutex::new(Pack {
                file,
                index,
                end,
                seq,
                live,
                dense_pending: Vec::new(),
                dirty: false,
                syncs,
                dense: Vec::new(),
            }),
            pack_path: pack_path.to_path_buf(),
        }
    }

    /// Opens a layer's records (a layer made before `.pack` existed gets an empty one)
    /// and says which of its `blocks` blocks the layer holds. Chunks left unsynced by a
    /// crash after the last valid one are cleared away; a damaged chunk before the
    /// synced end is an error (its records would otherwise vanish silently).
    pub(super) fn open(
        disk: &dyn Disk,
        rec: &Path,
        pack: &Path,
        blocks: u64,
        entry: usize,
    ) -> io::Result<(Records, ExtentMap<()>)> {
        let rec = disk.open(rec, false)?;
        let file = disk.open(pack, true)?;
        let group = (PAGE / entry) as u64;
        let (syncs, synced) = decode_heads(&*file)?.unwrap_or((0, FIRST));
        let len = file.len()?;
        let mut index = BTreeMap::new();
        let mut sparse: BTreeMap<u64, Entries> = BTreeMap::new();
        let (mut at, mut seq) = (FIRST, 1u64);
        // Chunks are read through a buffer far larger than one chunk.
        let longest = (CHUNK_HEADER + DENSE_AT * (2 + entry)).next_multiple_of(8) as u64;
        let mut buf = Vec::new();
        let mut buf_at = at;
        loop {
            let buf_end = buf_at + buf.len() as u64;
            if at + longest > buf_end && buf_end < len && at < len {
                buf.resize((len - at).min(1 << 20) as usize, 0);
                file.read_at(&mut buf, at)?;
                buf_at = at;
            }
            let from = (at - buf_at) as usize;
            let Some(d) = buf.get(from..).and_then(|b| decode_chunk(b, entry, group)) else {
                break;
            };
            if d.seq != seq || d.group >= blocks.div_ceil(group) {
                break;
            }
            if d.kind == SPARSE {
                index.insert(
                    d.group,
                    Chunk {
                        off: at,
                        len: d.len as u32,
                    },
                );
                sparse.insert(d.group, d.entries);
            } else {
                index.remove(&d.group);
                sparse.remove(&d.group);
            }
            at += d.len as u64;
            seq += 1;
        }
        if at < synced {
            return Err(invalid(format!(
                "{}: the packed block record at offset {at} is damaged (the file was synced up to {synced}); the layer's records cannot be trusted, rebuild this replica",
                pack.display()
            )));
        }
        if len > at {
            // Unsynced leftovers of a crash: a later chunk must not be read as the
            // continuation of the ones appended from here.
            file.punch(at, len - at)?;
            file.sync()?;
        }
        let mut present = super::record::scan(&*rec, blocks, entry)?;
        for (&g, entries) in &sparse {
            // A sparse group's page in `.rec` may hold a move to it that a crash cut
            // short: only its chunk counts.
            let s = g * group;
            present.remove(s, (s + group).min(blocks));
            for (i, e) in entries.iter(entry) {
                if BlockRecord::decode(e, 0).state != State::Absent {
                    let b = s + u64::from(i);
                    present.insert(b, b + 1, ());
                }
            }
        }
        Ok((
            Records::new(rec, file, pack, entry, index, at, seq, syncs),
            present,
        ))
    }

    /// Reads the entries of blocks `first..` into `out` (a whole number of entries).
    pub(super) fn read(&self, out: &mut [u8], first: u64) -> io::Result<()> {
        let e = self.entry;
        if self.sparse.load(Ordering::Acquire) == 0 {
            // No sparse group: nothing can move to `.rec` meanwhile (a group that
            // turns sparse now had an empty page, and its new blocks are read from
            // the log until the checkpoint is done).
            return self.rec.read_at(out, first * e as u64);
        }
        let end = first + (out.len() / e) as u64;
        // Held over the page read too: a group moving to `.rec` writes its page and
        // leaves the index under this lock.
        let p = self.pack.lock();
        self.rec.read_at(out, first * e as u64)?;
        for (&g, &c) in p.index.range(first / self.group..end.div_ceil(self.group)) {
            let s = g * self.group;
            // The group's page is not its record: clear the part read, then fill in.
            let (lo, hi) = (s.max(first), (s + self.group).min(end));
            out[((lo - first) as usize) * e..((hi - first) as usize) * e].fill(0);
            for (i, entry) in p.read(c, e, self.group)?.iter(e) {
                let b = s + u64::from(i);
                if (lo..hi).contains(&b) {
                    let at = (b - first) as usize * e;
                    out[at..at + e].copy_from_slice(entry);
                }
            }
        }
        Ok(())
    }

    /// Writes the entries in `entries` for blocks `first..`: not durable until `sync`.
    pub(super) fn write(&self, entries: &[u8], first: u64) -> io::Result<()> {
        let e = self.entry;
        let n = (entries.len() / e) as u64;
        let mut b = first;
        while b < first + n {
            let g = b / self.group;
            let to = ((g + 1) * self.group).min(first + n);
            let at = (b - first) as usize * e;
            self.write_group(g, b, &entries[at..(to - first) as usize * e])?;
            b = to;
        }
        Ok(())
    }

    /// Writes entries of blocks `b..` within group `g`.
    fn write_group(&self, g: u64, b: u64, entries: &[u8]) -> io::Result<()> {
        let e = self.entry;
        let n = entries.len() / e;
        let mut p = self.pack.lock();
        let current = match p.index.get(&g) {
            Some(&c) => Some(p.read(c, e, self.group)?),
            None if n >= DENSE_AT || p.is_dense(g) => None,
            None => {
                // A group with no page yet and few blocks starts sparse.
                let mut page = vec![0u8; PAGE];
                self.rec.read_at(&mut page, g * PAGE as u64)?;
                page.iter().all(|&x| x == 0).then(Entries::default)
            }
        };
        let Some(current) = current else {
            p.set_dense(g);
            return self.rec.write_at(entries, b * e as u64);
        };
        let merged = current.merged(g * self.group, b, entries, e);
        if merged.ids.len() < DENSE_AT {
            let new = !p.index.contains_key(&g);
            p.append(SPARSE, g, &merged, e)?;
            if new {
                self.sparse.fetch_add(1, Ordering::AcqRel);
            }
            return Ok(());
        }
        // The group moves to its page: whole, so whatever a cut-short earlier move left
        // there goes. Its dense mark waits until the page is durable.
        let mut page = vec![0u8; PAGE];
        for (i, x) in merged.iter(e) {
            let at = usize::from(i) * e;
            page[at..at + e].copy_from_slice(x);
        }
        self.rec.write_at(&page, g * PAGE as u64)?;
        p.set_dense(g);
        if let Some(old) = p.index.remove(&g) {
            p.live -= u64::from(old.len);
            self.sparse.fetch_sub(1, Ordering::AcqRel);
        }
        p.dense_pending.push(g);
        Ok(())
    }

    /// Clears the entries of blocks `[s, e)`: the layer no longer has them.
    pub(super) fn punch(&self, s: u64, e: u64) -> io::Result<()> {
        let len = self.entry as u64;
        self.rec.punch(s * len, (e - s) * len)?;
        if self.sparse.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let groups: Vec<u64> = {
            let p = self.pack.lock();
            p.index
                .range(s / self.group..e.div_ceil(self.group))
                .map(|(&g, _)| g)
                .collect()
        };
        for g in groups {
            let (lo, hi) = ((g * self.group).max(s), ((g + 1) * self.group).min(e));
            self.write_group(g, lo, &vec![0u8; (hi - lo) as usize * self.entry])?;
        }
        Ok(())
    }

    /// Makes every write durable: `.rec` first, then the dense marks of groups that
    /// moved there, then `.pack`. May rewrite `.pack` with its live chunks only.
    pub(super) fn sync(&self, disk: &dyn Disk) -> io::Result<()> {
        self.rec.sync()?;
        let mut p = self.pack.lock();
        for g in std::mem::take(&mut p.dense_pending) {
            p.append(DENSE, g, &Entries::default(), self.entry)?;
        }
        if !p.dirty {
            return Ok(());
        }
        p.file.sync()?;
        p.dirty = false;
        // Chunks up to here are durable: a damaged one before this end is rot, not a
        // torn append. The slot reaches the disk with the next sync; until then the
        // older slot's end still holds.
        p.syncs += 1;
        let slot = (p.syncs % 2) * 512;
        p.file.write_at(&encode_head(p.syncs, p.end), slot)?;
        if p.end > 2 * p.live + SLACK + FIRST {
            self.compact(disk, &mut p)?;
        }
        Ok(())
    }

    /// Rewrites `.pack` with the live chunks only (atomically: a crash leaves the old
    /// file or the new one, which say the same).
    fn compact(&self, disk: &dyn Disk, p: &mut Pack) -> io::Result<()> {
        let mut out = vec![0u8; FIRST as usize];
        let mut index = BTreeMap::new();
        let mut seq = 1;
        let live: Vec<(u64, Chunk)> = p.index.iter().map(|(&g, &c)| (g, c)).collect();
        for (g, c) in live {
            let entries = p.read(c, self.entry, self.group)?;
            let bytes = encode_chunk(SPARSE, seq, g, &entries, self.entry);
            index.insert(
                g,
                Chunk {
                    off: out.len() as u64,
                    len: bytes.len() as u32,
                },
            );
            out.extend_from_slice(&bytes);
            seq += 1;
        }
        let syncs = p.syncs + 1;
        let end = out.len() as u64;
        out[(syncs % 2 * 512) as usize..][..28].copy_from_slice(&encode_head(syncs, end));
        disk.replace(&self.pack_path, &out)?;
        p.file = disk.open(&self.pack_path, false)?;
        p.index = index;
        p.end = end;
        p.seq = seq;
        p.live = end - FIRST;
        p.syncs = syncs;
        Ok(())
    }

    /// Bytes the records occupy on disk.
    pub(super) fn allocated(&self) -> io::Result<u64> {
        let pack = self.pack.lock().file.allocated()?;
        Ok(self.rec.allocated()? + pack)
    }
}

#[cfg(test)]
mod tests;
