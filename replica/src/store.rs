//! The replica store: a write-ahead log in front of a tree of copy-on-write layers,
//! every block checksummed. The byte-level format is in `docs/format.md`.
//!
//! ```text
//! <data>/volumes/<volume>/
//!   meta             JSON: size, epoch, layers (id, parent, snapshot name), head
//!   layers/<id>.data block i at offset i × 4096 (sparse): slot 0
//!   layers/<id>.alt  the same: slot 1
//!   layers/<id>.rec  8 bytes per block: crc32c, state (1 data in slot 0, 2 zero,
//!                    3 data in slot 1); 64 bytes with the engine's 32-byte seal on
//!                    encrypted volumes
//!   wal              the log (or <wal-dir>/<volume>.wal)
//! ```
//!
//! A small write that a flush may soon wait for is appended to the log and
//! acknowledged; a flush fdatasyncs the log only (group commit). Blocks written since
//! the last checkpoint are served from the log through an in-memory extent map; a
//! checkpoint copies them into the head layer, syncs it and starts a new log
//! generation. Large writes, and small ones that come without flushes, skip the copy:
//! their data goes straight into the slot of the head layer that does not hold the
//! block's last durable version, and only their checksums go to the log. Replay takes
//! such a record only where the slot still matches it, and never overwriting the other
//! slot keeps a version to fall back to.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::disk::{Disk, DiskFile};
use crate::extents::{ExtentMap, Shift};
use crate::wal::{self, RecordHeader, RecordKind, WalHeader, BLOCK, RECORDS_START};

/// The block size of every volume, in bytes, as the meta file records it.
pub const BLOCK_SIZE: u32 = BLOCK as u32;
use tether_proto::wire::MAX_IO_BLOCKS;
/// Default size of a volume's write-ahead log.
pub const DEFAULT_WAL_SIZE: u64 = 64 << 20;
/// Two slots per block (format 2 had one; such volumes are upgraded on open).
const META_FORMAT: u32 = 4;
/// Encrypted volumes (64-byte block records): older versions must refuse them.
const META_FORMAT_SEALED: u32 = 5;
/// Formats before the second slot, opened and upgraded.
const OLD_FORMAT: u32 = 2;
const OLD_FORMAT_SEALED: u32 = 3;
/// The hash reported for a block that failed its checksum (it matches nothing real
/// with overwhelming odds, so a rebuild copies over it).
pub const BAD_BLOCK_HASH: u64 = 0xbad0_b10c_bad0_b10c;
/// Bytes of engine seal per block on encrypted volumes (nonce source and AEAD tag).
pub use tether_proto::wire::SEAL_SIZE as SEAL_BYTES;
const STATE_DATA: u8 = 1;
const STATE_ZERO: u8 = 2;
/// Data in the layer's second slot (`.alt`).
const STATE_ALT: u8 = 3;
/// Direct data per half of the log, rewrites included, in multiples of the limit on
/// distinct blocks.
const DIRECT_REWRITES: u64 = 16;

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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wal_dir: None,
            wal_size: DEFAULT_WAL_SIZE,
            direct_min_blocks: 16,
            direct_after_writes: 64,
            direct_limit: 1 << 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct LayerMeta {
    id: u64,
    parent: Option<u64>,
    /// Snapshot name, for frozen layers.
    name: Option<String>,
    /// Write sequence at which it was frozen.
    frozen_at: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Meta {
    format: u32,
    size: u64,
    block_size: u32,
    epoch: u64,
    #[serde(default)]
    engine_id: u64,
    /// A rebuild into this replica started and has not finished.
    #[serde(default)]
    rebuilding: bool,
    clean: bool,
    /// Bytes of engine seal stored with every block (0: unencrypted volume).
    #[serde(default)]
    tag_bytes: u32,
    /// The engine's encryption parameters (no key), kept verbatim for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encryption: Option<String>,
    head: u64,
    next_layer: u64,
    layers: Vec<LayerMeta>,
}

impl Meta {
    /// The layer frozen as snapshot `name`.
    fn snapshot(&self, name: &str) -> Option<&LayerMeta> {
        self.layers.iter().find(|l| l.name.as_deref() == Some(name))
    }

    /// Makes the new layer `id`, a child of `parent`, the head.
    fn push_head(&mut self, id: u64, parent: u64) {
        self.layers.push(LayerMeta {
            id,
            parent: Some(parent),
            name: None,
            frozen_at: None,
        });
        self.head = id;
        self.next_layer = id + 1;
    }
}

/// Where a block written since the last checkpoint lives in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recent {
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

impl Layer {
    /// Bytes the layer's files occupy on disk.
    fn allocated(&self) -> u64 {
        let f = &self.files;
        [&f.data, &f.alt, &f.rec]
            .iter()
            .map(|x| x.allocated().unwrap_or(0))
            .sum()
    }

    fn files(&self) -> Files {
        self.files.clone()
    }

    /// The file of slot `slot` (0 `.data`, 1 `.alt`) and its path.
    fn slot(&self, slot: u8) -> (&dyn DiskFile, &Path) {
        let path = if slot == 1 {
            &self.alt_path
        } else {
            &self.data_path
        };
        (self.files.slot(slot), path)
    }
}

struct Layer {
    files: Files,
    /// Blocks this layer holds (data or zero).
    present: ExtentMap<()>,
    /// The files' paths, for error messages.
    data_path: PathBuf,
    alt_path: PathBuf,
    rec_path: PathBuf,
}

/// A layer's open files, held without the volume's lock.
#[derive(Clone)]
struct Files {
    data: Arc<dyn DiskFile>,
    alt: Arc<dyn DiskFile>,
    rec: Arc<dyn DiskFile>,
}

impl Files {
    fn slot(&self, slot: u8) -> &dyn DiskFile {
        if slot == 1 {
            &*self.alt
        } else {
            &*self.data
        }
    }
}

/// Which slot a direct write to a block goes to: the one not holding its last durable
/// version. `stable` is that version's slot.
fn other(stable: u8) -> u8 {
    1 - (stable & 1)
}

struct Inner {
    meta: Meta,
    layers: HashMap<u64, Layer>,
    /// Head first, then its ancestors: the read path.
    chain: Vec<u64>,
    header: WalHeader,
    wal_off: u64,
    /// Which half of the log takes appends, and the generation written there.
    half: u8,
    gen_cur: u64,
    recent: ExtentMap<Recent>,
    /// Blocks of the other half, being copied into the head by a checkpoint.
    frozen: Option<Arc<ExtentMap<Recent>>>,
    /// Highest write sequence in `frozen`.
    frozen_rev: u64,
    revision: u64,
    /// Bytes written directly into the head since the live half began.
    direct_in_half: u64,
    /// A snapshot is being merged into the head: every write goes through the log,
    /// so the merge's copies and direct writes never meet in a slot.
    log_only: bool,
    /// Direct records not yet written to the log file, which holds everything before
    /// `tail_off`: a direct write then costs one `pwrite` (its data), not two. Only
    /// syncs promise anything, and every sync writes the tail first, in order.
    tail: Vec<u8>,
    tail_off: u64,
}

/// Direct records gathered in memory before one `pwrite` to the log.
const TAIL_BYTES: usize = 64 << 10;

/// A valid record found by replay, before it is applied.
struct Replayed {
    seq: u64,
    block: u64,
    end: u64,
    value: Recent,
    /// Direct records: block ranges whose slot no longer matches the record.
    unmatched: Vec<(u64, u64)>,
}

impl Replayed {
    /// The record's block ranges that it did set (all but `unmatched`).
    fn matched(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut p = self.block;
        self.unmatched
            .iter()
            .copied()
            .chain([(self.end, self.end)])
            .filter_map(move |(s, e)| {
                let run = (p < s).then_some((p, s));
                p = e;
                run
            })
    }
}

/// How many of the records replay found to apply. A direct record's block whose slot
/// no longer matches is fine if a later applied record covers the block (its slot was
/// reused after a newer version, or overwritten before it was ever synced). If none
/// does, no sync completed after that record (a sync would have left a matching
/// version at or after it), so it and everything after it were never flushed: drop
/// them, as a torn log record ends the log. Stopping there leaves every write up to
/// the revision present, so replicas with equal revisions hold the same data.
fn applicable_prefix(found: &[Replayed]) -> usize {
    let mut limit = found.len();
    loop {
        // Blocks whose last record so far did not reach its slot, with that record.
        let mut pending: std::collections::BTreeMap<u64, usize> = Default::default();
        for (i, r) in found[..limit].iter().enumerate() {
            // The blocks this record did set resolve earlier holes there.
            for (s, e) in r.matched() {
                let covered: Vec<u64> = pending.range(s..e).map(|(&b, _)| b).collect();
                for b in covered {
                    pending.remove(&b);
                }
            }
            for &(s, e) in &r.unmatched {
                for b in s..e {
                    pending.entry(b).or_insert(i);
                }
            }
        }
        match pending.values().min() {
            Some(&first) if first < limit => limit = first,
            _ => return limit,
        }
    }
}

enum Source {
    Zeros,
    Log(Recent),
    Layer(u64),
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// Write sequence it was taken at.
    pub seq: u64,
    /// Bytes its layer occupies on disk.
    pub allocated: u64,
}

/// One volume's replica on this daemon.
pub struct Volume {
    name: String,
    dir: PathBuf,
    disk: Arc<dyn Disk>,
    wal_path: PathBuf,
    wal_size: u64,
    /// The log file (fixed for the volume's life, so it needs no lock).
    wal: Arc<dyn DiskFile>,
    /// Seal bytes per block, and the size of a block record (fixed at creation).
    tag: usize,
    rec: usize,
    size: AtomicU64,
    epoch: AtomicU64,
    inner: RwLock<Inner>,
    sync_lock: Mutex<()>,
    /// Serialises changes to the layer tree (snapshot, delete, revert, expand).
    admin: Mutex<()>,
    /// Held by whoever writes the head layer from the log (checkpoints, merges).
    /// Lock order: admin, then ckpt, then inner.
    ckpt: Mutex<()>,
    /// Lets an append start a background checkpoint on its own volume.
    me: std::sync::OnceLock<std::sync::Weak<Volume>>,
    /// Set by `close`: background checkpoints stop touching the disk.
    closed: std::sync::atomic::AtomicBool,
    /// Set (under `ckpt` and `inner`) when a fresh open replaced this copy: from then
    /// on it writes nothing, not even meta, since the files are the new copy's.
    retired: AtomicBool,
    /// Held shared while a request of an engine is checked against the epoch and
    /// applied, and exclusively while a newer epoch is taken: nothing of an older
    /// engine applies after a newer one took over. Lock order: before `admin`.
    epoch_lock: RwLock<()>,
    /// Log bytes appended and made durable, counted across generations.
    written: AtomicU64,
    synced: AtomicU64,
    /// How far a running sync may reach: a version below this may be promised any
    /// moment, so a direct write must not reuse its slot (it goes through the log).
    syncing: AtomicU64,
    poisoned: Mutex<Option<String>>,
    /// When writes skip the log's data copy (see `StoreOptions`).
    direct_min_blocks: u64,
    direct_after_writes: u64,
    direct_limit: u64,
    /// Writes since the last flush.
    since_flush: AtomicU64,
    /// Data went into the head layer since its files were last synced.
    direct_dirty: AtomicBool,
    /// The head layer's files, for flushes (a leaf lock, taken after `sync_lock`).
    head_files: Mutex<Files>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("size", &self.size())
            .finish()
    }
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

/// A layer's files: slot 0, slot 1, block records.
fn layer_paths(dir: &Path, id: u64) -> [PathBuf; 3] {
    let l = dir.join("layers");
    [
        l.join(format!("{id}.data")),
        l.join(format!("{id}.alt")),
        l.join(format!("{id}.rec")),
    ]
}

/// Size of a block record: 8 bytes, or 64 with a seal (a power of two, so no entry
/// straddles a 512-byte sector and a torn write cannot tear one).
fn rec_len(tag: usize) -> usize {
    if tag == 0 {
        8
    } else {
        (8 + tag).next_power_of_two()
    }
}

/// Appends a block record to `out`.
fn push_rec(out: &mut Vec<u8>, len: usize, crc: u32, state: u8, tag: &[u8]) {
    let at = out.len();
    out.resize(at + len, 0);
    out[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    out[at + 4] = state;
    let t = tag.len().min(len - 8);
    out[at + 8..at + 8 + t].copy_from_slice(&tag[..t]);
}

impl Volume {
    /// Maps an I/O error on `path`; borrows, so the success path allocates nothing.
    fn err<'a>(
        &'a self,
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> StoreError + 'a {
        move |e| io_err(&self.name, op, path, e)
    }

    fn invalid(&self, what: String) -> StoreError {
        StoreError::Invalid {
            volume: self.name.clone(),
            what,
        }
    }

    fn create(
        disk: Arc<dyn Disk>,
        dir: PathBuf,
        wal_path: PathBuf,
        name: &str,
        size: u64,
        opts: &StoreOptions,
        encryption: Option<&str>,
    ) -> Result<Volume, StoreError> {
        let wal_size = opts.wal_size;
        if size == 0 || !size.is_multiple_of(BLOCK as u64) {
            return Err(StoreError::Invalid {
                volume: name.to_string(),
                what: format!("size {size} is not a positive multiple of {BLOCK}"),
            });
        }
        let e = |op, p: &Path| {
            let p = p.to_path_buf();
            move |s| io_err(name, op, &p, s)
        };
        // Leftovers of an unfinished create must not leak into the new volume.
        let layer = layer_paths(&dir, 1);
        for p in layer.iter().chain([&wal_path]) {
            disk.remove(p).map_err(e("removing leftovers", p))?;
        }
        for p in &layer {
            disk.open(p, true).map_err(e("creating a layer", p))?;
        }
        let wal = disk
            .open(&wal_path, true)
            .map_err(e("creating the log", &wal_path))?;
        wal.allocate(wal_size)
            .map_err(e("allocating the log", &wal_path))?;
        // Written zeroes, not just reserved space: a first write into an unwritten
        // extent makes fdatasync commit metadata too, and flush latency is the log's
        // whole job.
        let zeroes = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < wal_size {
            let n = (wal_size - at).min(zeroes.len() as u64) as usize;
            wal.write_at(&zeroes[..n], at)
                .map_err(e("zeroing the log", &wal_path))?;
            at += n as u64;
        }
        let header = WalHeader {
            gen: 1,
            revision: 0,
            half: 0,
        };
        wal.write_at(&header.encode(), header.slot_offset())
            .and_then(|_| wal.sync())
            .map_err(e("writing the log header", &wal_path))?;
        let meta = Meta {
            format: if encryption.is_some() {
                META_FORMAT_SEALED
            } else {
                META_FORMAT
            },
            size,
            block_size: BLOCK_SIZE,
            epoch: 0,
            engine_id: 0,
            rebuilding: false,
            clean: true,
            tag_bytes: if encryption.is_some() {
                SEAL_BYTES as u32
            } else {
                0
            },
            encryption: encryption.map(str::to_string),
            head: 1,
            next_layer: 2,
            layers: vec![LayerMeta {
                id: 1,
                parent: None,
                name: None,
                frozen_at: None,
            }],
        };
        // meta is written last: a directory without meta is an unfinished create.
        let meta_path = dir.join("meta");
        disk.replace(&meta_path, &meta_bytes(&meta))
            .map_err(e("writing meta", &meta_path))?;
        tracing::info!(volume = name, size, wal = %wal_path.display(), "created volume");
        Self::open(disk, dir, wal_path, name, opts)
    }

    fn open(
        disk: Arc<dyn Disk>,
        dir: PathBuf,
        wal_path: PathBuf,
        name: &str,
        opts: &StoreOptions,
    ) -> Result<Volume, StoreError> {
        let wal_size = opts.wal_size;
        let started = Instant::now();
        let meta_path = dir.join("meta");
        let e = |op, p: &Path| {
            let p = p.to_path_buf();
            move |s| io_err(name, op, &p, s)
        };
        let invalid = |what: String| StoreError::Invalid {
            volume: name.to_string(),
            what,
        };
        let Some(raw) = disk
            .read_file(&meta_path)
            .map_err(e("reading meta", &meta_path))?
        else {
            return Err(StoreError::NotFound {
                volume: name.to_string(),
            });
        };
        let meta: Meta = serde_json::from_slice(&raw)
            .map_err(|err| invalid(format!("{} is not valid: {err}", meta_path.display())))?;
        let sealed = meta.tag_bytes != 0;
        let format_ok = ([OLD_FORMAT, META_FORMAT].contains(&meta.format) && !sealed)
            || ([OLD_FORMAT_SEALED, META_FORMAT_SEALED].contains(&meta.format)
                && meta.tag_bytes as usize == SEAL_BYTES);
        let upgrade = [OLD_FORMAT, OLD_FORMAT_SEALED].contains(&meta.format);
        if !format_ok || meta.block_size != BLOCK_SIZE {
            return Err(invalid(format!(
                "{}: format {} / block size {} / seal {} is not supported by this version (encrypted volumes made before format 3 must be recreated)",
                meta_path.display(),
                meta.format,
                meta.block_size,
                meta.tag_bytes
            )));
        }
        let tag = meta.tag_bytes as usize;
        let rec_size = rec_len(tag);
        let blocks = meta.size / BLOCK as u64;
        let mut layers = HashMap::new();
        for l in &meta.layers {
            let [dp, ap, rp] = layer_paths(&dir, l.id);
            let data = disk.open(&dp, false).map_err(e("opening a layer", &dp))?;
            // Volumes of the one-slot formats have no second slot yet.
            let alt = disk.open(&ap, true).map_err(e("opening a layer", &ap))?;
            let rec = disk.open(&rp, false).map_err(e("opening a layer", &rp))?;
            let present =
                scan_records(&*rec, blocks, rec_size).map_err(e("reading block records", &rp))?;
            layers.insert(
                l.id,
                Layer {
                    files: Files { data, alt, rec },
                    present,
                    data_path: dp,
                    alt_path: ap,
                    rec_path: rp,
                },
            );
        }
        let head_files = layers
            .get(&meta.head)
            .map(Layer::files)
            .ok_or_else(|| invalid(format!("head layer {} is not in meta", meta.head)))?;
        let chain = chain_of(&meta, meta.head).map_err(invalid)?;
        let wal = disk.open(&wal_path, false).map_err(|err| {
            if err.kind() == io::ErrorKind::NotFound {
                invalid(format!(
                    "its write-ahead log is missing at {}; was the replica started with a different --wal-dir?",
                    wal_path.display()
                ))
            } else {
                io_err(name, "opening the log", &wal_path, err)
            }
        })?;
        // The log keeps the size it was created with: a different --wal-size must not
        // cut replay short and lose flushed records past the new size.
        let wal_size = match wal.len() {
            Ok(len) if len > RECORDS_START => {
                if len != wal_size {
                    tracing::info!(volume = name, size = len, "keeping the log's existing size");
                }
                len
            }
            _ => wal_size,
        };
        let mut slots = [0u8; 1024];
        wal.read_at(&mut slots, 0)
            .map_err(e("reading the log header", &wal_path))?;
        let header = [
            WalHeader::decode(&slots[..512]),
            WalHeader::decode(&slots[512..]),
        ]
        .into_iter()
        .flatten()
        .max_by_key(|h| h.gen)
        .ok_or_else(|| {
            invalid(format!(
                "{}: both log header slots are corrupt",
                wal_path.display()
            ))
        })?;
        let vol = Volume {
            name: name.to_string(),
            dir,
            disk,
            wal_path,
            wal_size,
            wal,
            tag,
            rec: rec_size,
            size: AtomicU64::new(meta.size),
            epoch: AtomicU64::new(meta.epoch),
            inner: RwLock::new(Inner {
                meta,
                layers,
                chain,
                header,
                wal_off: RECORDS_START,
                tail: Vec::with_capacity(TAIL_BYTES + 4096),
                tail_off: RECORDS_START,
                half: header.half,
                gen_cur: header.gen,
                recent: ExtentMap::new(),
                frozen: None,
                frozen_rev: 0,
                revision: header.revision,
                direct_in_half: 0,
                log_only: false,
            }),
            sync_lock: Mutex::new(()),
            admin: Mutex::new(()),
            ckpt: Mutex::new(()),
            me: std::sync::OnceLock::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            retired: AtomicBool::new(false),
            epoch_lock: RwLock::new(()),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            syncing: AtomicU64::new(0),
            poisoned: Mutex::new(None),
            direct_min_blocks: opts.direct_min_blocks.max(1),
            direct_after_writes: opts.direct_after_writes,
            direct_limit: opts.direct_limit,
            since_flush: AtomicU64::new(0),
            // Replay may map direct data that is only in the page cache (after a
            // kill, not a power cut): the recovery checkpoint must sync the slots.
            direct_dirty: AtomicBool::new(true),
            head_files: Mutex::new(head_files),
        };
        if upgrade {
            // Older versions would misread blocks in the second slot: they must refuse.
            let format = if sealed {
                META_FORMAT_SEALED
            } else {
                META_FORMAT
            };
            vol.save_meta(&mut vol.inner.write(), |m| m.format = format)?;
        }
        let (records, bytes) = vol.replay()?;
        // A new generation: leftovers past the replayed prefix can never be replayed
        // later, after newer records.
        {
            let _c = vol.ckpt.lock();
            vol.checkpoint(&mut vol.inner.write())?;
        }
        tracing::info!(
            volume = name,
            records,
            bytes,
            revision = vol.inner.read().revision,
            ms = started.elapsed().as_millis() as u64,
            "volume recovered"
        );
        Ok(vol)
    }

    /// The byte range of half `h` of the log.
    fn half_range(&self, h: u8) -> (u64, u64) {
        let mid = RECORDS_START + ((self.wal_size - RECORDS_START) / 2) / 4096 * 4096;
        if h == 0 {
            (RECORDS_START, mid)
        } else {
            (mid, self.wal_size)
        }
    }

    /// Rebuilds the recent-block map from the log: the valid prefix of generation
    /// `gen` in the header's half, then of `gen + 1` in the other half.
    fn replay(&self) -> Result<(usize, u64), StoreError> {
        let mut inner = self.inner.write();
        let (first_half, gen) = (inner.header.half, inner.header.gen);
        let mut found = Vec::new();
        let mut bytes = 0;
        for (h, g) in [(first_half, gen), (1 - first_half, gen + 1)] {
            let before = found.len();
            let (end, complete) = self.replay_half(&inner, h, g, &mut found)?;
            let (start, _) = self.half_range(h);
            bytes += end - start;
            inner.half = h;
            inner.gen_cur = g;
            inner.wal_off = end;
            // The next half can only hold live records if this one filled up.
            if found.len() == before || !complete {
                break;
            }
        }
        let applied = applicable_prefix(&found);
        if applied < found.len() {
            tracing::info!(volume = %self.name, records = found.len() - applied,
                "dropping unflushed records after a direct write that did not reach its slot");
        }
        for r in &found[..applied] {
            for (s, e) in r.matched() {
                inner.recent.insert(s, e, r.value.shift(s - r.block));
            }
            inner.revision = inner.revision.max(r.seq);
        }
        Ok((applied, bytes))
    }

    /// Reads the valid records of one half into `found`; returns (end offset, whether
    /// it ended for lack of room).
    fn replay_half(
        &self,
        inner: &Inner,
        half: u8,
        gen: u64,
        found: &mut Vec<Replayed>,
    ) -> Result<(u64, bool), StoreError> {
        let wal = self.wal.clone();
        let (start, limit) = self.half_range(half);
        let mut off = start;
        let rerr = |e| io_err(&self.name, "replaying the log", &self.wal_path, e);
        let mut hdr = [0u8; wal::RECORD_HEADER];
        let mut full = false;
        loop {
            if off + wal::RECORD_HEADER as u64 > limit {
                full = true;
                break;
            }
            wal.read_at(&mut hdr, off).map_err(rerr)?;
            let Some(h) = wal::decode_header(&hdr, gen) else {
                // Either the end of what was written, or a record that did not fit
                // here and went to the other half.
                full = true;
                break;
            };
            if off + h.total_len() > limit
                || h.block
                    .checked_add(u64::from(h.count))
                    .is_none_or(|e| e > self.blocks())
            {
                break;
            }
            let mut head = vec![0u8; wal::RECORD_HEADER + h.sides_len()];
            wal.read_at(&mut head, off).map_err(rerr)?;
            if !wal::verify_record(&head) {
                break;
            }
            if h.kind != RecordKind::Zero && usize::from(h.tag) != self.tag {
                // The header passed its crc: this is not a torn write but a record
                // of another format, and what follows may be flushed data.
                return Err(self.invalid(format!(
                    "log record at offset {off} carries {}-byte seals, the volume {}; the log does not belong to this volume",
                    h.tag, self.tag
                )));
            }
            let end = h.block + u64::from(h.count);
            let side_off = off + wal::RECORD_HEADER as u64;
            let data_off = side_off + h.sides_len() as u64;
            let side = h.side_len();
            let mut unmatched: Vec<(u64, u64)> = Vec::new();
            let value = match h.kind {
                RecordKind::Direct => {
                    // The data went to the head layer without waiting for the log. Where
                    // the slot no longer matches, this version never became durable or was
                    // overwritten after a newer one did: the block keeps what it had.
                    // Either way the replay goes on.
                    let head_id = inner.meta.head;
                    let Some(layer) = inner.layers.get(&head_id) else {
                        return Err(self.invalid(format!("head layer {head_id} is not open")));
                    };
                    let (file, path) = layer.slot(h.slot);
                    let mut data = vec![0u8; (h.count as usize).min(256) * BLOCK];
                    let mut sides = wal::sides(&head[wal::RECORD_HEADER..], side);
                    // In chunks: a record's size is bounded by the log, not by memory.
                    let mut b = h.block;
                    while b < end {
                        let n = (end - b).min(256) as usize;
                        file.read_at(&mut data[..n * BLOCK], b * BLOCK as u64)
                            .map_err(self.err("reading a layer", path))?;
                        for (blk, (c, t)) in data[..n * BLOCK].chunks_exact(BLOCK).zip(&mut sides) {
                            if wal::block_crc(blk, t) != c {
                                match unmatched.last_mut() {
                                    Some(last) if last.1 == b => last.1 = b + 1,
                                    _ => unmatched.push((b, b + 1)),
                                }
                            }
                            b += 1;
                        }
                    }
                    Recent::Direct {
                        side_off,
                        side: side as u8,
                        slot: h.slot,
                        at: 0,
                    }
                }
                RecordKind::Write => {
                    // A torn payload marks the end of what was written before the crash.
                    let mut data = vec![0u8; h.data_len()];
                    wal.read_at(&mut data, data_off).map_err(rerr)?;
                    let intact = data
                        .chunks_exact(BLOCK)
                        .zip(wal::sides(&head[wal::RECORD_HEADER..], side))
                        .all(|(b, (c, t))| wal::block_crc(b, t) == c);
                    if !intact {
                        break;
                    }
                    Recent::Data {
                        data_off,
                        side_off,
                        side: side as u8,
                    }
                }
                RecordKind::Zero => Recent::Zero,
            };
            found.push(Replayed {
                seq: h.seq,
                block: h.block,
                end,
                value,
                unmatched,
            });
            off += h.total_len();
        }
        Ok((off, full))
    }

    /// Copies log extents into the head layer's files and makes them durable there
    /// (no lock held; a failed sync poisons the volume); returns the changes to the
    /// head's presence map: (start, end, present). Direct extents only get their
    /// block records: the data is already in its slot, synced by the caller.
    fn copy_to_head(
        &self,
        head_id: u64,
        files: &Files,
        single: bool,
        extents: &[(u64, u64, Recent)],
    ) -> Result<Vec<(u64, u64, bool)>, StoreError> {
        let [dp, _, rp] = layer_paths(&self.dir, head_id);
        let (data, rec) = (&*files.data, &*files.rec);
        let mut changes = Vec::with_capacity(extents.len());
        let mut recs = Vec::new();
        let mut buf = Vec::new();
        let mut sides = Vec::new();
        for &(s, e, v) in extents {
            let (off, len) = (s * BLOCK as u64, (e - s) * BLOCK as u64);
            match v {
                Recent::Zero => {
                    // Nothing direct is pending for a block whose latest write is a
                    // zero (such blocks go through the log), so both slots are free.
                    data.punch(off, len)
                        .and_then(|_| files.alt.punch(off, len))
                        .map_err(self.err("punching a hole", &dp))?;
                    if single {
                        // Nothing below the head to hide: the blocks just become absent.
                        rec.punch(s * self.rec as u64, (e - s) * self.rec as u64)
                            .map_err(self.err("punching a hole", &rp))?;
                        changes.push((s, e, false));
                        continue;
                    }
                    let mut b = s;
                    while b < e {
                        let n = (e - b).min(1 << 14);
                        recs.clear();
                        for _ in 0..n {
                            push_rec(&mut recs, self.rec, 0, STATE_ZERO, &[]);
                        }
                        rec.write_at(&recs, b * self.rec as u64)
                            .map_err(self.err("writing block records", &rp))?;
                        b += n;
                    }
                }
                Recent::Data { .. } | Recent::Direct { .. } => {
                    let state = match v {
                        Recent::Direct { slot: 1, .. } => STATE_ALT,
                        _ => STATE_DATA,
                    };
                    let mut b = s;
                    while b < e {
                        let n = (e - b).min(256);
                        let (side_off, side, copy) = match v.shift(b - s) {
                            Recent::Data {
                                data_off,
                                side_off,
                                side,
                                ..
                            } => (side_off, side, Some(data_off)),
                            Recent::Direct { side_off, side, .. } => (side_off, side, None),
                            Recent::Zero => break,
                        };
                        sides.resize(n as usize * usize::from(side), 0);
                        self.wal
                            .read_at(&mut sides, side_off)
                            .map_err(self.err("reading the log", &self.wal_path))?;
                        if let Some(data_off) = copy {
                            // From the log into slot 0: no direct write is pending for a
                            // block whose latest write went through the log.
                            buf.resize(n as usize * BLOCK, 0);
                            self.wal
                                .read_at(&mut buf, data_off)
                                .map_err(self.err("reading the log", &self.wal_path))?;
                            data.write_at(&buf, b * BLOCK as u64)
                                .map_err(self.err("writing a layer", &dp))?;
                        }
                        recs.clear();
                        for (c, t) in wal::sides(&sides, usize::from(side)) {
                            push_rec(&mut recs, self.rec, c, state, t);
                        }
                        rec.write_at(&recs, b * self.rec as u64)
                            .map_err(self.err("writing block records", &rp))?;
                        b += n;
                    }
                }
            }
            changes.push((s, e, true));
        }
        if let Err(err) = data.sync().and_then(|_| rec.sync()) {
            return Err(self.poison(format!("fdatasync of layer {head_id} failed: {err}")));
        }
        Ok(changes)
    }

    fn sync_log(&self) -> Result<(), StoreError> {
        self.wal.sync().map_err(|err| {
            self.poison(format!(
                "fdatasync of {} failed: {err}",
                self.wal_path.display()
            ))
        })
    }

    /// Starts a sync and returns how far it will reach: everything appended so far.
    /// Taken under `inner`, so no writer is between choosing a slot and logging its
    /// record; from here until the sync ends, no direct write reuses the slot of a
    /// version it may promise (see `write_run`).
    fn begin_sync(&self) -> Result<u64, StoreError> {
        self.mark_sync(&mut self.inner.write())
    }

    /// `begin_sync` for a caller that holds `inner` for writing.
    fn mark_sync(&self, inner: &mut Inner) -> Result<u64, StoreError> {
        self.write_tail(inner)?;
        let upto = self.written.load(Ordering::SeqCst);
        self.syncing.fetch_max(upto, Ordering::SeqCst);
        Ok(upto)
    }

    /// Writes the gathered direct records to the log file. They belong to completed
    /// writes, so if they cannot be written, no later sync may promise anything.
    fn write_tail(&self, inner: &mut Inner) -> Result<(), StoreError> {
        if inner.tail.is_empty() {
            return Ok(());
        }
        if let Err(err) = self.wal.write_at(&inner.tail, inner.tail_off) {
            return Err(self.poison(format!(
                "appending to {} failed: {err}",
                self.wal_path.display()
            )));
        }
        inner.tail.clear();
        Ok(())
    }

    /// Reads log bytes at `off`, from the gathered tail when they are still there.
    fn read_log(&self, inner: &Inner, buf: &mut [u8], off: u64) -> Result<(), StoreError> {
        let from = off.wrapping_sub(inner.tail_off) as usize;
        if off >= inner.tail_off && from + buf.len() <= inner.tail.len() {
            buf.copy_from_slice(&inner.tail[from..from + buf.len()]);
            return Ok(());
        }
        self.wal
            .read_at(buf, off)
            .map_err(self.err("reading the log", &self.wal_path))
    }

    /// Makes every write up to `upto` (from `begin_sync`) durable: the head layer's
    /// slots if data went there directly, then the log. The caller holds `sync_lock`.
    fn sync_locked(&self, head: &Files, upto: u64) -> Result<(), StoreError> {
        // Direct writes mark the head dirty before their record counts in `written`,
        // so everything counted in `upto` has its data covered by this sync.
        if self.direct_dirty.swap(false, Ordering::SeqCst) {
            if let Err(err) = head.data.sync().and_then(|_| head.alt.sync()) {
                return Err(self.poison(format!("fdatasync of the head layer failed: {err}")));
            }
        }
        self.sync_log()?;
        self.synced.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }

    /// Copies everything in the log (the frozen half, then the live one) into the head
    /// layer, syncs it, and starts a new generation in the live half. The caller holds
    /// `ckpt`. Leaves everything as it was if any step fails.
    fn checkpoint(&self, inner: &mut Inner) -> Result<(), StoreError> {
        self.check_writable()?;
        let head_id = inner.meta.head;
        let Some(head) = inner.layers.get(&head_id) else {
            return Err(self.invalid(format!("head layer {head_id} is not open")));
        };
        let files = head.files();
        // Every record copied below must be replayable if the copy is torn: make the
        // log (and direct data) durable before touching the layer.
        if !inner.recent.is_empty() || inner.frozen.is_some() {
            // `inner` is held for writing: nobody appends meanwhile.
            let upto = self.mark_sync(inner)?;
            let _s = self.sync_lock.lock();
            self.sync_locked(&files, upto)?;
        }
        let mut extents: Vec<(u64, u64, Recent)> = Vec::new();
        if let Some(f) = &inner.frozen {
            extents.extend(f.iter().map(|(s, e, v)| (s, e, *v)));
        }
        let frozen = extents.len();
        extents.extend(inner.recent.iter().map(|(s, e, v)| (s, e, *v)));
        let single = inner.chain.len() == 1;
        let changes = self.copy_to_head(head_id, &files, single, &extents)?;
        let next = WalHeader {
            gen: inner.gen_cur + 1,
            revision: inner.revision,
            half: inner.half,
        };
        self.write_header(&next)?;
        if let Some(head) = inner.layers.get_mut(&head_id) {
            apply_changes(&mut head.present, &changes);
        }
        let (older, live) = extents.split_at(frozen);
        self.reclaim(inner, older, Some(&inner.recent));
        self.reclaim(inner, live, None);
        inner.header = next;
        inner.gen_cur = next.gen;
        inner.recent.clear();
        inner.frozen = None;
        inner.direct_in_half = 0;
        inner.wal_off = self.half_range(inner.half).0;
        self.synced
            .store(self.written.load(Ordering::Acquire), Ordering::Release);
        Ok(())
    }

    fn write_header(&self, h: &WalHeader) -> Result<(), StoreError> {
        self.wal
            .write_at(&h.encode(), h.slot_offset())
            .and_then(|_| self.wal.sync())
            .map_err(|err| self.poison(format!("writing the log header failed: {err}")))
    }

    /// Copies the frozen half into the head layer, without blocking appends to the
    /// live half, then frees the frozen half. The caller holds `ckpt`.
    fn checkpoint_frozen(&self) -> Result<(), StoreError> {
        let (frozen, frozen_rev, head_id, files, single) = {
            let inner = self.inner.read();
            let Some(frozen) = inner.frozen.clone() else {
                return Ok(());
            };
            let head_id = inner.meta.head;
            let Some(head) = inner.layers.get(&head_id) else {
                return Err(self.invalid(format!("head layer {head_id} is not open")));
            };
            (
                frozen,
                inner.frozen_rev,
                head_id,
                head.files(),
                inner.chain.len() == 1,
            )
        };
        self.check_writable()?;
        // A direct write that reused a frozen version's slot before this sync began
        // is covered by it, so the live half's record (replayed after the frozen
        // block records written below) corrects them; once it began, none reuses one.
        let upto = self.begin_sync()?;
        {
            let _s = self.sync_lock.lock();
            self.sync_locked(&files, upto)?;
        }
        let extents: Vec<(u64, u64, Recent)> = frozen.iter().map(|(s, e, v)| (s, e, *v)).collect();
        let changes = self.copy_to_head(head_id, &files, single, &extents)?;
        // While a half is frozen nothing else moves the generation, the half or the
        // header (that takes `ckpt`), so the header is written without holding up
        // writers for its fdatasync; appends to the live half are not its business.
        let next = {
            let inner = self.inner.read();
            WalHeader {
                gen: inner.gen_cur,
                revision: frozen_rev.max(inner.header.revision),
                half: inner.half,
            }
        };
        self.write_header(&next)?;
        let mut inner = self.inner.write();
        // Snapshots and reverts take `ckpt` first, so the head is still `head_id`.
        if let Some(head) = inner.layers.get_mut(&head_id) {
            apply_changes(&mut head.present, &changes);
        }
        self.reclaim(&inner, &extents, Some(&inner.recent));
        inner.header = next;
        inner.frozen = None;
        Ok(())
    }

    /// Punches the other slot of large direct extents whose version the head's block
    /// records now name durably, except where `newer` (the live half) holds a newer
    /// write: that slot holds only a stale copy. The caller holds `inner` for writing
    /// (a write after it may reuse the slot). Small extents keep their stale copy
    /// (one punch per block would cost more than the space) until rewritten or trimmed.
    fn reclaim(
        &self,
        inner: &Inner,
        extents: &[(u64, u64, Recent)],
        newer: Option<&ExtentMap<Recent>>,
    ) {
        let Some(head) = inner.layers.get(&inner.meta.head) else {
            return;
        };
        for &(s, e, v) in extents {
            let Recent::Direct { slot, .. } = v else {
                continue;
            };
            if e - s < self.direct_min_blocks {
                continue;
            }
            let (file, path) = head.slot(other(slot));
            let mut p = s;
            while p < e {
                let (skip, end) = match newer.map(|m| (m.get(p), m.next_start(p))) {
                    Some((Some((_, end)), _)) => (true, end.min(e)),
                    Some((None, Some(next))) => (false, next.min(e)),
                    _ => (false, e),
                };
                if !skip {
                    let (off, len) = (p * BLOCK as u64, (end - p) * BLOCK as u64);
                    if let Err(err) = file.punch(off, len) {
                        tracing::warn!(volume = %self.name, path = %path.display(), error = %err,
                            "could not free a stale slot; the space stays used until the blocks are rewritten");
                    }
                }
                p = end;
            }
        }
    }

    /// Stops background work on this volume and waits for what is running; the
    /// volume must not be used afterwards (crash tests call it before a power cut).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        drop(self.ckpt.lock());
    }

    /// Waits for a running background checkpoint, or does it here if none is running
    /// (or it failed: then its error is this caller's).
    fn finish_checkpoint(&self) -> Result<(), StoreError> {
        let _c = self.ckpt.lock();
        self.checkpoint_frozen()
    }

    fn poison(&self, reason: String) -> StoreError {
        tracing::error!(volume = %self.name, %reason, "replica poisoned: it refuses writes until rebuilt");
        *self.poisoned.lock() = Some(reason.clone());
        StoreError::Poisoned {
            volume: self.name.clone(),
            reason,
        }
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn blocks(&self) -> u64 {
        self.size() / BLOCK as u64
    }

    /// The current epoch: requests from older epochs are refused.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The highest write sequence applied, and whether the last user closed cleanly.
    pub fn revision(&self) -> (u64, bool) {
        let inner = self.inner.read();
        (inner.revision, inner.meta.clean)
    }

    fn save_meta(
        &self,
        inner: &mut Inner,
        change: impl FnOnce(&mut Meta),
    ) -> Result<(), StoreError> {
        self.check_live()?;
        let mut next = inner.meta.clone();
        change(&mut next);
        let path = self.dir.join("meta");
        self.disk
            .replace(&path, &meta_bytes(&next))
            .map_err(self.err("writing meta", &path))?;
        inner.meta = next;
        Ok(())
    }

    /// Takes `epoch` for engine `engine_id`: a newer epoch fences older engines; the
    /// same epoch is accepted again only from the engine that took it.
    pub fn take_epoch(&self, epoch: u64, engine_id: u64) -> Result<u64, StoreError> {
        let _fence = self.epoch_lock.write();
        let mut inner = self.inner.write();
        let stored = self.epoch();
        if epoch == stored && engine_id != 0 && engine_id == inner.meta.engine_id {
            return Ok(stored);
        }
        if epoch <= stored {
            return Err(StoreError::Fenced {
                volume: self.name.clone(),
                epoch,
                stored,
            });
        }
        self.save_meta(&mut inner, |m| {
            m.epoch = epoch;
            m.engine_id = engine_id;
        })?;
        self.epoch.store(epoch, Ordering::Release);
        Ok(stored)
    }

    /// Runs `f` for an engine at `epoch` if that epoch may still issue requests, with
    /// no newer epoch taken until `f` returns.
    pub fn under_epoch<T>(
        &self,
        epoch: u64,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _fence = self.epoch_lock.read();
        self.check_epoch(epoch)?;
        f()
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

    /// The engine's encryption parameters, if the volume was created encrypted.
    pub fn encryption(&self) -> Option<String> {
        self.inner.read().meta.encryption.clone()
    }

    /// Whether a rebuild into this replica is unfinished.
    pub fn rebuilding(&self) -> bool {
        self.inner.read().meta.rebuilding
    }

    /// Durably marks (or clears) an unfinished rebuild into this replica.
    pub fn set_rebuilding(&self, on: bool) -> Result<(), StoreError> {
        let _c = self.ckpt.lock();
        let mut inner = self.inner.write();
        if inner.meta.rebuilding == on {
            return Ok(());
        }
        if !on {
            // Everything copied must be durable before the mark goes.
            self.checkpoint(&mut inner)?;
        }
        self.save_meta(&mut inner, |m| m.rebuilding = on)
    }

    /// Records whether an engine has the volume open (false) or closed it cleanly.
    pub fn set_clean(&self, clean: bool) -> Result<(), StoreError> {
        let _c = self.ckpt.lock();
        let mut inner = self.inner.write();
        if clean {
            self.checkpoint(&mut inner)?;
        }
        self.save_meta(&mut inner, |m| m.clean = clean)
    }

    fn check_range(&self, block: u64, count: u64, limit: bool) -> Result<(), StoreError> {
        if limit && count > MAX_IO_BLOCKS {
            return Err(self.invalid(format!(
                "request of {count} blocks exceeds the limit of {MAX_IO_BLOCKS}"
            )));
        }
        match block.checked_add(count) {
            Some(end) if end <= self.blocks() && count > 0 => Ok(()),
            end => Err(StoreError::OutOfRange {
                volume: self.name.clone(),
                start: block,
                end: end.unwrap_or(u64::MAX),
                blocks: self.blocks(),
            }),
        }
    }

    /// Why the volume refuses writes, when an fdatasync failed.
    pub fn poisoned(&self) -> Option<String> {
        self.poisoned.lock().clone()
    }

    /// Takes this in-memory copy out of use for good: it refuses every write and
    /// sync from now on, and its background work stops. The files stay as they are
    /// for a fresh open to recover.
    fn retire(&self, why: &str) {
        // Under both locks every writer of the files holds: none is midway.
        let _c = self.ckpt.lock();
        let _i = self.inner.write();
        {
            let mut p = self.poisoned.lock();
            let reason = match p.take() {
                Some(r) => format!("{r}; {why}"),
                None => why.to_string(),
            };
            *p = Some(reason);
        }
        self.retired.store(true, Ordering::Release);
        self.closed.store(true, Ordering::Release);
    }

    /// Refuses to touch the files once a fresh open replaced this copy; callers hold
    /// `inner` or `ckpt`, which `retire` takes, so none slips past it.
    fn check_live(&self) -> Result<(), StoreError> {
        if !self.retired.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(StoreError::Poisoned {
            volume: self.name.clone(),
            reason: "this copy was reopened from disk; use the reopened one".into(),
        })
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

    /// Makes room in the live half for a record of `len` bytes that comes with
    /// `direct` bytes written straight into the head; false when the live half is full
    /// and the other half is still being checkpointed (the caller waits and retries).
    fn make_room(&self, inner: &mut Inner, len: u64, direct: u64) -> Result<bool, StoreError> {
        // Recovery reads every block written directly in the log's window from the
        // layer to check it, and every direct record's data: bound both (rewrites of
        // the same blocks cost it memory reads, not disk reads).
        let window = inner.recent.blocks() * BLOCK as u64;
        let full = inner.wal_off + len > self.half_range(inner.half).1
            || (direct > 0
                && inner.direct_in_half > 0
                && (window > self.direct_limit
                    || inner.direct_in_half + direct > DIRECT_REWRITES * self.direct_limit));
        if full {
            if inner.frozen.is_some() {
                return Ok(false);
            }
            // The checkpoint reads the frozen half from the file.
            self.write_tail(inner)?;
            // Freeze this half for a background checkpoint; append to the other.
            inner.frozen = Some(Arc::new(std::mem::replace(
                &mut inner.recent,
                ExtentMap::new(),
            )));
            inner.frozen_rev = inner.revision;
            inner.half = 1 - inner.half;
            inner.gen_cur += 1;
            inner.wal_off = self.half_range(inner.half).0;
            inner.direct_in_half = 0;
            self.spawn_checkpoint();
        }
        if inner.wal_off + len > self.half_range(inner.half).1 {
            return Err(self.invalid(format!(
                "a record of {len} bytes does not fit half of the {} byte log",
                self.wal_size
            )));
        }
        Ok(true)
    }

    /// Appends one record where `make_room` made room, and maps its blocks.
    fn push_record(
        &self,
        inner: &mut Inner,
        h: RecordHeader,
        sides: &[u8],
        data: &[u8],
    ) -> Result<(), StoreError> {
        let len = h.total_len();
        let h = RecordHeader {
            gen: inner.gen_cur,
            ..h
        };
        let head = wal::encode_record(&h, sides);
        let off = inner.wal_off;
        let side_off = off + wal::RECORD_HEADER as u64;
        let data_off = side_off + h.sides_len() as u64;
        if h.kind == RecordKind::Direct {
            if inner.tail.is_empty() {
                inner.tail_off = off;
            }
            inner.tail.extend_from_slice(&head);
            if inner.tail.len() >= TAIL_BYTES {
                self.write_tail(inner)?;
            }
        } else {
            // Records reach the file in order.
            self.write_tail(inner)?;
            let wrote = if data.len() <= 64 << 10 {
                let mut one = head;
                one.extend_from_slice(data);
                self.wal.write_at(&one, off)
            } else {
                self.wal
                    .write_at(&head, off)
                    .and_then(|_| self.wal.write_at(data, data_off))
            };
            wrote.map_err(self.err("appending to the log", &self.wal_path))?;
        }
        let at = self.written.fetch_add(len, Ordering::SeqCst) + len;
        let end = h.block + u64::from(h.count);
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
        inner.recent.insert(h.block, end, v);
        inner.wal_off += len;
        inner.revision = inner.revision.max(h.seq);
        Ok(())
    }

    /// Appends, waiting for the background checkpoint when both halves are busy.
    fn append_waiting(&self, h: RecordHeader, sides: &[u8], data: &[u8]) -> Result<(), StoreError> {
        loop {
            {
                let mut inner = self.inner.write();
                self.check_live()?;
                if self.make_room(&mut inner, h.total_len(), 0)? {
                    return self.push_record(&mut inner, h, sides, data);
                }
            }
            self.finish_checkpoint()?;
        }
    }

    /// Writes the first run of blocks at `block` (at most `max`) that goes one way:
    /// through the log, or straight into one slot of the head. Returns how many
    /// blocks, or `None` when both halves of the log are busy (wait for the
    /// checkpoint, then retry).
    #[allow(clippy::too_many_arguments)]
    fn write_run(
        &self,
        inner: &mut Inner,
        seq: u64,
        block: u64,
        max: u64,
        data: &[u8],
        sides: &[u8],
        direct_ok: bool,
    ) -> Result<Option<u64>, StoreError> {
        self.check_live()?;
        let (latest, mut run_end) = window_at(inner, block, block + max);
        let head_id = inner.meta.head;
        let Some(head) = inner.layers.get(&head_id) else {
            return Err(self.invalid(format!("head layer {head_id} is not open")));
        };
        // Once a block's write since the last checkpoint went through the log, its
        // later ones do too, so log copies (into slot 0) and zeroes (punches) never
        // meet a direct write newer than them in a slot.
        let slot = match latest {
            Some(Recent::Direct { slot, at, .. }) => {
                // Its last durable version is this one once synced, else the one in the
                // other slot (a direct write never goes where that version is).
                let synced = self.synced.load(Ordering::SeqCst);
                if at > synced && at <= self.syncing.load(Ordering::SeqCst) {
                    // A running sync may promise this version any moment, and the
                    // other slot holds the last one it promised: neither is free, so
                    // this write goes through the log (as the block's later writes do
                    // until the checkpoint).
                    None
                } else {
                    let stable = if at <= synced { slot } else { other(slot) };
                    Some(other(stable))
                }
            }
            Some(_) => None,
            None if direct_ok && !inner.log_only => match head.present.run(block, run_end) {
                Err(next) => {
                    // Absent from the head: no slot holds anything of it.
                    run_end = next;
                    Some(0)
                }
                Ok(((), e)) => {
                    // Nothing since the checkpoint: the block record says where the
                    // block's durable version is (zero: anywhere, so slot 0 is free).
                    run_end = e;
                    let n = (run_end - block) as usize;
                    let mut recs = vec![0u8; n * self.rec];
                    head.files
                        .rec
                        .read_at(&mut recs, block * self.rec as u64)
                        .map_err(self.err("reading block records", &head.rec_path))?;
                    let stable = |r: &[u8]| u8::from(r[4] != STATE_DATA);
                    let mut entries = recs.chunks_exact(self.rec);
                    let first = entries.next().map_or(1, stable);
                    let same = 1 + entries.take_while(|r| stable(r) == first).count();
                    run_end = block + same as u64;
                    Some(other(first))
                }
            },
            None => None,
        };
        let n = run_end - block;
        let side = 4 + self.tag;
        let sides = &sides[..n as usize * side];
        let data = &data[..n as usize * BLOCK];
        let mut h = RecordHeader {
            kind: RecordKind::Write,
            gen: 0,
            seq,
            block,
            count: n as u32,
            tag: self.tag as u8,
            slot: 0,
        };
        let Some(slot) = slot else {
            if !self.make_room(inner, h.total_len(), 0)? {
                return Ok(None);
            }
            self.push_record(inner, h, sides, data)?;
            return Ok(Some(n));
        };
        h.kind = RecordKind::Direct;
        h.slot = slot;
        if !self.make_room(inner, h.total_len(), data.len() as u64)? {
            return Ok(None);
        }
        let Some(head) = inner.layers.get(&head_id) else {
            return Err(self.invalid(format!("head layer {head_id} is not open")));
        };
        let (file, path) = head.slot(slot);
        if let Err(e) = file.write_at(data, block * BLOCK as u64) {
            let in_place = matches!(latest, Some(Recent::Direct { slot: s, .. }) if s == slot);
            if in_place {
                // The slot held the latest completed write, not yet synced: it is
                // gone, and a flush must not promise it now.
                return Err(self.poison(format!(
                    "a write over blocks {block}..{run_end} in {} failed: {e}",
                    path.display()
                )));
            }
            return Err(io_err(&self.name, "writing a layer", path, e));
        }
        // Before the record counts in `written`: see `sync_locked`.
        self.direct_dirty.store(true, Ordering::SeqCst);
        self.push_record(inner, h, sides, &[])?;
        inner.direct_in_half += data.len() as u64;
        Ok(Some(n))
    }

    fn spawn_checkpoint(&self) {
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("tether-checkpoint".into())
            .spawn(move || {
                let _c = me.ckpt.lock();
                if me.closed.load(Ordering::Acquire) {
                    return;
                }
                if let Err(e) = me.checkpoint_frozen() {
                    tracing::warn!(volume = %me.name, error = %e, "background checkpoint failed; the next write retries it");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(volume = %self.name, error = %e, "cannot start a checkpoint thread; writes will checkpoint inline");
        }
    }

    /// Writes whole blocks starting at `block` as write sequence `seq` (unencrypted
    /// volumes).
    pub fn write_blocks(&self, seq: u64, block: u64, data: &[u8]) -> Result<(), StoreError> {
        self.write_sealed(seq, block, data, &[])
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
        if data.is_empty() || !data.len().is_multiple_of(BLOCK) {
            return Err(self.invalid(format!(
                "write of {} bytes is not a whole number of blocks",
                data.len()
            )));
        }
        let count = (data.len() / BLOCK) as u64;
        if tags.len() as u64 != count * self.tag as u64 {
            return Err(self.invalid(if self.tag == 0 {
                "the volume is not encrypted but the write carries seals; check the engine's --encryption-key-file".to_string()
            } else {
                format!(
                    "the volume is encrypted: a write of {count} block(s) needs {} seal bytes, got {}; is the engine running without a key?",
                    count * self.tag as u64,
                    tags.len()
                )
            }));
        }
        self.check_range(block, count, true)?;
        self.check_writable()?;
        let writes = self.since_flush.fetch_add(1, Ordering::Relaxed) + 1;
        // Large writes skip the log's copy; so do small ones while nobody flushes (no
        // one waits on the log's one cheap fdatasync then).
        let direct = count >= self.direct_min_blocks
            || (self.direct_after_writes > 0 && writes > self.direct_after_writes);
        let side = 4 + self.tag;
        let sides = wal::make_sides(data, tags, self.tag);
        // Big writes go in pieces that fit a quarter of the log.
        let per = ((self.wal_size / 4) / (BLOCK + side) as u64).max(1);
        let mut b = 0;
        while b < count {
            let wrote = self.write_run(
                &mut self.inner.write(),
                seq,
                block + b,
                per.min(count - b),
                &data[b as usize * BLOCK..],
                &sides[b as usize * side..],
                direct,
            )?;
            match wrote {
                Some(n) => b += n,
                None => self.finish_checkpoint()?,
            }
        }
        Ok(())
    }

    /// Deallocates whole blocks as write sequence `seq`; they read back as zeroes.
    pub fn zero_blocks(&self, seq: u64, block: u64, count: u64) -> Result<(), StoreError> {
        self.check_range(block, count, false)?;
        self.check_writable()?;
        let mut b = 0;
        while b < count {
            let n = (count - b).min(u64::from(u32::MAX));
            let h = RecordHeader {
                kind: RecordKind::Zero,
                gen: 0,
                seq,
                block: block + b,
                count: n as u32,
                tag: 0,
                slot: 0,
            };
            self.append_waiting(h, &[], &[])?;
            b += n;
        }
        Ok(())
    }

    /// Makes every completed write durable: one fdatasync of the log (and of the head
    /// layer if data went there directly), shared by all flushes that arrive while it
    /// runs (group commit).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.since_flush.store(0, Ordering::Relaxed);
        self.check_writable()?;
        let target = self.written.load(Ordering::SeqCst);
        if self.synced.load(Ordering::SeqCst) >= target {
            return Ok(());
        }
        let upto = self.begin_sync()?;
        let _g = self.sync_lock.lock();
        if self.synced.load(Ordering::SeqCst) >= target {
            return Ok(());
        }
        // Another flush may have failed while this one waited: Linux reports a lost
        // writeback only once, so a second fdatasync could wrongly succeed.
        self.check_writable()?;
        let head = self.head_files.lock().clone();
        self.sync_locked(&head, upto)?;
        self.check_writable()
    }

    /// Writes the gathered direct records to the log file (no sync), so a killed
    /// process keeps what it acknowledged; the server calls it when a stream goes idle.
    pub fn settle(&self) -> Result<(), StoreError> {
        self.check_writable()?;
        let mut inner = self.inner.write();
        self.check_live()?;
        self.write_tail(&mut inner)
    }

    /// Reads `count` whole blocks of the head starting at `block`, verifying every
    /// checksum.
    pub fn read_blocks(&self, block: u64, count: u32) -> Result<Bytes, StoreError> {
        Ok(self.read(None, block, count)?.0)
    }

    /// Reads whole blocks and their seals (all-zero seals for blocks never written)
    /// from the head, or as they were in `snapshot`.
    pub fn read(
        &self,
        snapshot: Option<&str>,
        block: u64,
        count: u32,
    ) -> Result<(Bytes, Bytes), StoreError> {
        self.check_range(block, u64::from(count), true)?;
        let inner = self.inner.read();
        match snapshot {
            None => self.read_chain(&inner, &inner.chain, block, count),
            Some(name) => {
                let id = self.snapshot_layer(&inner.meta, name)?.id;
                let chain = chain_of(&inner.meta, id).map_err(|w| self.invalid(w))?;
                self.read_chain(&inner, &chain, block, count)
            }
        }
    }

    fn read_chain(
        &self,
        inner: &Inner,
        chain: &[u64],
        block: u64,
        count: u32,
    ) -> Result<(Bytes, Bytes), StoreError> {
        let end = block + u64::from(count);
        let mut out = BytesMut::zeroed(count as usize * BLOCK);
        let mut tags = BytesMut::zeroed(count as usize * self.tag);
        let tag = self.tag;
        let with_log = chain.first() == Some(&inner.meta.head);
        let mut p = block;
        while p < end {
            let (src, run_end) = source(inner, chain, with_log, p, end);
            let n = (run_end - p) as usize;
            let at = (p - block) as usize * BLOCK;
            let buf = &mut out[at..at + n * BLOCK];
            let tat = (p - block) as usize * tag;
            let tbuf = &mut tags[tat..tat + n * tag];
            match src {
                Source::Zeros | Source::Log(Recent::Zero) => {}
                Source::Log(
                    v @ (Recent::Data { side_off, side, .. }
                    | Recent::Direct { side_off, side, .. }),
                ) => {
                    let mut sides = vec![0u8; n * usize::from(side)];
                    self.read_log(inner, &mut sides, side_off)?;
                    match v {
                        Recent::Direct { slot, .. } => {
                            let head_id = inner.meta.head;
                            let Some(head) = inner.layers.get(&head_id) else {
                                return Err(self.invalid(format!("layer {head_id} is not open")));
                            };
                            let (file, path) = head.slot(slot);
                            file.read_at(buf, p * BLOCK as u64)
                                .map_err(self.err("reading a layer", path))?;
                        }
                        Recent::Data { data_off, .. } => self
                            .wal
                            .read_at(buf, data_off)
                            .map_err(self.err("reading the log", &self.wal_path))?,
                        Recent::Zero => {}
                    }
                    for (i, (c, t)) in wal::sides(&sides, usize::from(side)).enumerate() {
                        if wal::block_crc(&buf[i * BLOCK..(i + 1) * BLOCK], t) != c
                            || t.len() != tag
                        {
                            return Err(self.checksum(p + i as u64, "the write-ahead log".into()));
                        }
                        tbuf[i * tag..(i + 1) * tag].copy_from_slice(t);
                    }
                }
                Source::Layer(id) => {
                    let Some(layer) = inner.layers.get(&id) else {
                        return Err(self.invalid(format!("layer {id} is not open")));
                    };
                    let mut recs = vec![0u8; n * self.rec];
                    layer
                        .files
                        .rec
                        .read_at(&mut recs, p * self.rec as u64)
                        .map_err(self.err("reading block records", &layer.rec_path))?;
                    // Each run of blocks in the same slot in one read.
                    let slot_of = |i: usize| u8::from(recs[i * self.rec + 4] == STATE_ALT);
                    let mut i = 0;
                    while i < n {
                        let slot = slot_of(i);
                        let j = (i + 1..n).find(|&j| slot_of(j) != slot).unwrap_or(n);
                        let (file, path) = layer.slot(slot);
                        file.read_at(
                            &mut buf[i * BLOCK..j * BLOCK],
                            (p + i as u64) * BLOCK as u64,
                        )
                        .map_err(self.err("reading a layer", path))?;
                        i = j;
                    }
                    for (i, r) in recs.chunks_exact(self.rec).enumerate() {
                        let blk = &mut buf[i * BLOCK..(i + 1) * BLOCK];
                        let crc = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
                        let t = &r[8..8 + tag];
                        match r[4] {
                            STATE_ZERO => blk.fill(0),
                            STATE_DATA | STATE_ALT if wal::block_crc(blk, t) == crc => {
                                tbuf[i * tag..(i + 1) * tag].copy_from_slice(t);
                            }
                            _ => {
                                return Err(self.checksum(
                                    p + i as u64,
                                    format!("layer file {}", layer.data_path.display()),
                                ))
                            }
                        }
                    }
                }
            }
            p = run_end;
        }
        Ok((out.freeze(), tags.freeze()))
    }

    fn checksum(&self, block: u64, place: String) -> StoreError {
        tracing::error!(volume = %self.name, block, %place, "checksum mismatch: block not returned");
        StoreError::Checksum {
            volume: self.name.clone(),
            block,
            place,
        }
    }

    /// Creates the (empty) files of layer `id`.
    fn create_layer(&self, id: u64) -> Result<Layer, StoreError> {
        let [dp, ap, rp] = layer_paths(&self.dir, id);
        let create = |p: &Path| {
            self.disk
                .open(p, true)
                .map_err(self.err("creating a layer", p))
        };
        Ok(Layer {
            files: Files {
                data: create(&dp)?,
                alt: create(&ap)?,
                rec: create(&rp)?,
            },
            present: ExtentMap::new(),
            data_path: dp,
            alt_path: ap,
            rec_path: rp,
        })
    }

    /// Makes layer `id` (just created) the head's files for flushes.
    fn set_head_files(&self, layer: &Layer) {
        *self.head_files.lock() = layer.files();
    }

    /// Removes a dropped layer's files (a leftover only wastes space).
    fn remove_layer_files(&self, id: u64) {
        for p in layer_paths(&self.dir, id) {
            if let Err(e) = self.disk.remove(&p) {
                tracing::warn!(volume = %self.name, path = %p.display(), error = %e, "could not remove a dropped layer file");
            }
        }
    }

    /// Freezes the head as snapshot `name` and starts a new empty head.
    pub fn snapshot(&self, name: &str) -> Result<(), StoreError> {
        validate_name(name).map_err(|_| {
            self.invalid(format!(
                "snapshot name {name:?} is not valid: use 1-64 characters from A-Z a-z 0-9 . _ -"
            ))
        })?;
        self.check_writable()?;
        let _admin = self.admin.lock();
        let _c = self.ckpt.lock();
        let mut inner = self.inner.write();
        if inner.meta.snapshot(name).is_some() {
            return Err(self.invalid(format!("a snapshot named {name} already exists")));
        }
        self.checkpoint(&mut inner)?;
        let id = inner.meta.next_layer;
        let old = inner.meta.head;
        let layer = self.create_layer(id)?;
        let seq = inner.revision;
        self.save_meta(&mut inner, |m| {
            for l in m.layers.iter_mut().filter(|l| l.id == old) {
                l.name = Some(name.to_string());
                l.frozen_at = Some(seq);
            }
            m.push_head(id, old);
        })?;
        self.set_head_files(&layer);
        inner.layers.insert(id, layer);
        inner.chain.insert(0, id);
        tracing::info!(volume = %self.name, snapshot = name, seq, "snapshot created");
        Ok(())
    }

    /// Snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let inner = self.inner.read();
        inner
            .meta
            .layers
            .iter()
            .filter_map(|l| {
                let name = l.name.clone()?;
                let allocated = inner.layers.get(&l.id).map_or(0, |x| x.allocated());
                Some(SnapshotInfo {
                    name,
                    seq: l.frozen_at.unwrap_or(0),
                    allocated,
                })
            })
            .collect()
    }

    fn snapshot_layer<'m>(&self, meta: &'m Meta, name: &str) -> Result<&'m LayerMeta, StoreError> {
        meta.snapshot(name)
            .ok_or_else(|| self.invalid(format!("no snapshot named {name}")))
    }

    /// Deletes snapshot `name`: its blocks that a child layer lacks are copied into
    /// that child, chunk by chunk, so I/O continues meanwhile. Until the final meta
    /// update the snapshot's layer stays in every read path, so a crash midway only
    /// leaves copies that read the same.
    pub fn delete_snapshot(&self, name: &str) -> Result<(), StoreError> {
        self.check_writable()?;
        let _admin = self.admin.lock();
        let (lid, parent, children, extents) = {
            let inner = self.inner.read();
            let l = self.snapshot_layer(&inner.meta, name)?;
            let children: Vec<u64> = inner
                .meta
                .layers
                .iter()
                .filter(|c| c.parent == Some(l.id))
                .map(|c| c.id)
                .collect();
            let extents: Vec<(u64, u64)> = inner
                .layers
                .get(&l.id)
                .map(|x| x.present.iter().map(|(s, e, _)| (s, e)).collect())
                .unwrap_or_default();
            (l.id, l.parent, children, extents)
        };
        let started = Instant::now();
        let mut copied = 0u64;
        // Into the head, the merge copies into slot 0 while writes go on: from here to
        // the end every write goes through the log, and nothing written directly
        // before is left in the log, so no direct write and no copy meet in a slot.
        let into_head = {
            let _c = self.ckpt.lock();
            let mut inner = self.inner.write();
            let into_head = children.contains(&inner.meta.head);
            if into_head {
                self.checkpoint(&mut inner)?;
                inner.log_only = true;
            }
            into_head
        };
        let merged = self.merge_into(lid, &children, &extents, &mut copied);
        if into_head {
            self.inner.write().log_only = false;
        }
        merged?;
        let mut inner = self.inner.write();
        self.save_meta(&mut inner, |m| {
            m.layers.retain(|l| l.id != lid);
            for l in m.layers.iter_mut().filter(|l| l.parent == Some(lid)) {
                l.parent = parent;
            }
        })?;
        inner.layers.remove(&lid);
        inner.chain = chain_of(&inner.meta, inner.meta.head).map_err(|w| self.invalid(w))?;
        self.remove_layer_files(lid);
        tracing::info!(volume = %self.name, snapshot = name, blocks = copied,
            ms = started.elapsed().as_millis() as u64, "snapshot deleted and merged");
        Ok(())
    }

    /// Copies the blocks of layer `lid` (its `extents`) that each child lacks into it,
    /// and makes the children's records durable.
    fn merge_into(
        &self,
        lid: u64,
        children: &[u64],
        extents: &[(u64, u64)],
        copied: &mut u64,
    ) -> Result<(), StoreError> {
        for &child in children {
            for &(s, e) in extents {
                let mut b = s;
                while b < e {
                    let n = (e - b).min(1024);
                    *copied += self.merge_chunk(lid, child, b, b + n)?;
                    b += n;
                }
            }
            let inner = self.inner.read();
            if let Some(c) = inner.layers.get(&child) {
                c.files
                    .rec
                    .sync()
                    .map_err(self.err("syncing block records", &c.rec_path))?;
            }
        }
        Ok(())
    }

    /// Copies the blocks of `[s, e)` that layer `from` has and `to` lacks.
    fn merge_chunk(&self, from: u64, to: u64, s: u64, e: u64) -> Result<u64, StoreError> {
        // `ckpt` (and the caller's `admin`) keep every other writer of layer files
        // away, so the copy runs without `inner`: client I/O goes on meanwhile.
        let _c = self.ckpt.lock();
        self.check_live()?;
        let (src, dst, missing) = {
            let inner = self.inner.read();
            let (Some(src), Some(dst)) = (inner.layers.get(&from), inner.layers.get(&to)) else {
                return Err(self.invalid(format!("layer {from} or {to} is not open")));
            };
            // Blocks in the head's log still get the copy: the log may be lost in a
            // crash before its next flush, and then the snapshot's version must remain.
            let missing: Vec<u64> = (s..e).filter(|&b| dst.present.get(b).is_none()).collect();
            let files = |l: &Layer| {
                (
                    l.files(),
                    [l.data_path.clone(), l.alt_path.clone(), l.rec_path.clone()],
                )
            };
            (files(src), files(dst), missing)
        };
        if missing.is_empty() {
            return Ok(0);
        }
        let (sf, [sdp, sap, srp]) = src;
        let (df, [ddp, _, drp]) = dst;
        let (ddata, drec) = (df.data, df.rec);
        let mut recs = vec![0u8; missing.len() * self.rec];
        let mut block = vec![0u8; BLOCK];
        for (&b, r) in missing.iter().zip(recs.chunks_exact_mut(self.rec)) {
            sf.rec
                .read_at(r, b * self.rec as u64)
                .map_err(self.err("reading block records", &srp))?;
            if r[4] == STATE_DATA || r[4] == STATE_ALT {
                let slot = u8::from(r[4] == STATE_ALT);
                sf.slot(slot)
                    .read_at(&mut block, b * BLOCK as u64)
                    .map_err(self.err("reading a layer", if slot == 1 { &sap } else { &sdp }))?;
                // The copy goes to slot 0 (nothing direct is pending in the head
                // during a merge, and a snapshot layer has no writers).
                r[4] = STATE_DATA;
                ddata
                    .write_at(&block, b * BLOCK as u64)
                    .map_err(self.err("writing a layer", &ddp))?;
            }
        }
        // Data durable before the records that point at it: a crash can leave a
        // record missing (the block still reads through the old layer), never a
        // record over torn data.
        ddata.sync().map_err(self.err("syncing a layer", &ddp))?;
        for (&b, r) in missing.iter().zip(recs.chunks_exact(self.rec)) {
            drec.write_at(r, b * self.rec as u64)
                .map_err(self.err("writing block records", &drp))?;
        }
        let mut inner = self.inner.write();
        if let Some(dst) = inner.layers.get_mut(&to) {
            for &b in &missing {
                dst.present.insert(b, b + 1, ());
            }
        }
        Ok(missing.len() as u64)
    }

    /// Makes the volume's contents those of snapshot `name`: a new empty head on top
    /// of it; what the old head held since is dropped.
    pub fn revert(&self, name: &str) -> Result<(), StoreError> {
        self.check_writable()?;
        let _admin = self.admin.lock();
        let _c = self.ckpt.lock();
        let mut inner = self.inner.write();
        let target = self.snapshot_layer(&inner.meta, name)?.id;
        self.checkpoint(&mut inner)?;
        let id = inner.meta.next_layer;
        let old = inner.meta.head;
        let layer = self.create_layer(id)?;
        self.save_meta(&mut inner, |m| {
            m.layers.retain(|l| l.id != old);
            m.push_head(id, target);
        })?;
        self.set_head_files(&layer);
        inner.layers.remove(&old);
        inner.layers.insert(id, layer);
        inner.chain = chain_of(&inner.meta, id).map_err(|w| self.invalid(w))?;
        self.remove_layer_files(old);
        tracing::info!(volume = %self.name, snapshot = name, "reverted to snapshot");
        Ok(())
    }

    /// Grows the volume to `size` bytes; shrinking is refused.
    pub fn expand(&self, size: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        let _admin = self.admin.lock();
        let mut inner = self.inner.write();
        let cur = self.size();
        if size < cur {
            return Err(self.invalid(format!(
                "cannot shrink from {cur} to {size} bytes: shrinking would drop data"
            )));
        }
        if !size.is_multiple_of(BLOCK as u64) {
            return Err(self.invalid(format!("size {size} is not a multiple of {BLOCK}")));
        }
        if size == cur {
            return Ok(());
        }
        self.save_meta(&mut inner, |m| m.size = size)?;
        self.size.store(size, Ordering::Release);
        tracing::info!(volume = %self.name, from = cur, to = size, "volume expanded");
        Ok(())
    }

    /// A 64-bit hash of each block of the head (or of snapshot `name`), verified:
    /// a block that fails its checksum gets a hash no healthy copy can have.
    pub fn hashes(
        &self,
        snapshot: Option<&str>,
        block: u64,
        count: u32,
    ) -> Result<Vec<u64>, StoreError> {
        match self.read(snapshot, block, count) {
            // The seal is part of the block: a copy with another seal is another block.
            Ok((d, t)) => Ok(d
                .chunks_exact(BLOCK)
                .enumerate()
                .map(|(i, b)| {
                    let mut h = xxhash_rust::xxh3::Xxh3::new();
                    h.update(b);
                    h.update(t.get(i * self.tag..(i + 1) * self.tag).unwrap_or(&[]));
                    h.digest()
                })
                .collect()),
            Err(StoreError::Checksum { .. }) if count > 1 => (0..count)
                .map(|i| {
                    self.hashes(snapshot, block + u64::from(i), 1)
                        .map(|h| h.first().copied().unwrap_or(BAD_BLOCK_HASH))
                })
                .collect(),
            Err(StoreError::Checksum { .. }) => Ok(vec![BAD_BLOCK_HASH]),
            Err(e) => Err(e),
        }
    }

    /// Which blocks of `[block, block+count)` hold data, as (start, end, allocated).
    pub fn map(&self, block: u64, count: u64) -> Result<Vec<(u64, u64, bool)>, StoreError> {
        self.check_range(block, count, false)?;
        let inner = self.inner.read();
        let end = block + count;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut p = block;
        while p < end {
            let (src, run_end) = source(&inner, &inner.chain, true, p, end);
            let allocated = matches!(
                src,
                Source::Layer(_) | Source::Log(Recent::Data { .. } | Recent::Direct { .. })
            );
            match out.last_mut() {
                Some(last) if last.2 == allocated && last.1 == p => last.1 = run_end,
                _ => out.push((p, run_end, allocated)),
            }
            p = run_end;
        }
        Ok(out)
    }

    /// Bytes on disk: the head layer, and the log.
    pub fn allocated(&self) -> (u64, u64) {
        let inner = self.inner.read();
        let head = inner
            .layers
            .get(&inner.meta.head)
            .map_or(0, |x| x.allocated());
        (head, self.wal.allocated().unwrap_or(0))
    }
}

fn apply_changes(present: &mut ExtentMap<()>, changes: &[(u64, u64, bool)]) {
    for &(s, e, here) in changes {
        if here {
            present.insert(s, e, ());
        } else {
            present.remove(s, e);
        }
    }
}

fn meta_bytes(m: &Meta) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(m).unwrap_or_default();
    v.push(b'\n');
    v
}

/// The read path from layer `id`: it, then its ancestors.
fn chain_of(meta: &Meta, id: u64) -> Result<Vec<u64>, String> {
    let mut chain = Vec::new();
    let mut cur = Some(id);
    while let Some(c) = cur {
        if chain.contains(&c) || chain.len() > meta.layers.len() {
            return Err(format!("layer {c} is part of a cycle in meta"));
        }
        let Some(l) = meta.layers.iter().find(|l| l.id == c) else {
            return Err(format!("layer {c} is named in meta but not described"));
        };
        chain.push(c);
        cur = l.parent;
    }
    Ok(chain)
}

/// Where block `p` comes from on `chain`, and how far that source runs (< `end`).
fn source(inner: &Inner, chain: &[u64], with_log: bool, p: u64, end: u64) -> (Source, u64) {
    let mut bound = end;
    if with_log {
        match window_at(inner, p, end) {
            (Some(v), e) => return (Source::Log(v), e),
            (None, e) => bound = e,
        }
    }
    for id in chain {
        let Some(layer) = inner.layers.get(id) else {
            continue;
        };
        match layer.present.run(p, bound) {
            Ok(((), e)) => return (Source::Layer(*id), e),
            Err(b) => bound = b,
        }
    }
    (Source::Zeros, bound)
}

/// What the log holds for block `p` (the live half first), and how far that runs
/// (< `end`); `None` while the log holds nothing.
fn window_at(inner: &Inner, p: u64, end: u64) -> (Option<Recent>, u64) {
    let mut bound = end;
    for map in std::iter::once(&inner.recent).chain(inner.frozen.as_deref()) {
        match map.run(p, bound) {
            Ok((v, e)) => return (Some(v), e),
            Err(b) => bound = b,
        }
    }
    (None, bound)
}

/// Builds a layer's present-block map from its record file.
fn scan_records(rec: &dyn DiskFile, blocks: u64, rec_size: usize) -> io::Result<ExtentMap<()>> {
    let mut present = ExtentMap::new();
    let len = rec.len()?.min(blocks * rec_size as u64);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    let mut run: Option<u64> = None;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        rec.read_at(&mut buf[..n], off)?;
        for (i, e) in buf[..n].chunks_exact(rec_size).enumerate() {
            let b = off / rec_size as u64 + i as u64;
            // Anything but an all-zero entry counts as present, so a damaged entry
            // fails its checksum instead of silently showing an older layer.
            let here = e.iter().any(|&x| x != 0);
            match (here, run) {
                (true, None) => run = Some(b),
                (false, Some(s)) => {
                    present.insert(s, b, ());
                    run = None;
                }
                _ => {}
            }
        }
        off += n as u64;
    }
    if let Some(s) = run {
        present.insert(s, len / rec_size as u64, ());
    }
    Ok(present)
}

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

/// All volumes held by one replica daemon under its data directory.
pub struct VolumeSet {
    root: PathBuf,
    disk: Arc<dyn Disk>,
    opts: StoreOptions,
    open: Mutex<HashMap<String, Arc<Volume>>>,
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
        let mut open = self.open.lock();
        if let Some(old) = open.get(name).cloned() {
            let Some(reason) = old.poisoned() else {
                return Ok(old);
            };
            open.remove(name);
            old.retire("reopened from disk for a rebuild");
            drop(old);
            tracing::warn!(volume = %name, %reason, "reopening a poisoned volume from disk for its rebuild");
            self.disk.drop_cache(&self.root.join(name));
            self.disk.drop_cache(&self.wal_path(name));
        }
        self.load_locked(&mut open, name, None).map(|(v, _)| v)
    }

    /// Opens (and with `create`, creates) `name` once, under the set's lock.
    fn load(
        &self,
        name: &str,
        create: Option<(u64, Option<&str>)>,
    ) -> Result<(Arc<Volume>, bool), StoreError> {
        validate_name(name)?;
        let mut open = self.open.lock();
        self.load_locked(&mut open, name, create)
    }

    fn load_locked(
        &self,
        open: &mut HashMap<String, Arc<Volume>>,
        name: &str,
        create: Option<(u64, Option<&str>)>,
    ) -> Result<(Arc<Volume>, bool), StoreError> {
        if let Some(v) = open.get(name) {
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
        let _ = v.me.set(Arc::downgrade(&v));
        open.insert(name.to_string(), v.clone());
        Ok((v, created))
    }

    /// Every volume on disk as its meta file describes it, without opening any; a
    /// volume whose meta cannot be read is reported by name with the reason.
    pub fn inventory(&self) -> io::Result<Inventory> {
        let open: Vec<String> = self.open.lock().keys().cloned().collect();
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

    /// Volumes that are open right now.
    pub fn open_volumes(&self) -> Vec<Arc<Volume>> {
        self.open.lock().values().cloned().collect()
    }
}
