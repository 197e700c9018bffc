//! The read path: every block comes from the log or the first layer of the chain
//! that holds it, and is verified against its checksum before it is returned (or,
//! for a reader that opens every block's seal, by that reader: `Check::Seals`).

use bytes::{Bytes, BytesMut};

use super::core::{Core, Inner};
use super::error::StoreError;
use super::log::codec::{self, BLOCK};
use super::log::Recent;
use super::record::{BlockRecord, State};
use crate::extents::ExtentMap;

/// The hash reported for a block that failed its checksum (it matches nothing real
/// with overwhelming odds, so a rebuild copies over it).
pub const BAD_BLOCK_HASH: u64 = 0xbad0_b10c_bad0_b10c;

/// Where a run of blocks comes from.
enum Source {
    Zeros,
    Log(Recent),
    Layer(u64),
}

/// Whether a read computes each block's checksum.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    /// Every block is verified against its checksum.
    Checksums,
    /// The reader authenticates every block by its seal (AES-GCM, keyed, and far
    /// stronger than a CRC), so on a volume whose blocks carry seals the checksums
    /// are not computed: a damaged block fails to open there and is read from
    /// another replica and repaired, as a checksum error would be. Elsewhere the
    /// same as `Checksums`.
    Seals,
}

/// Reads whole blocks and their seals (all-zero seals for blocks never written) from
/// the head, or as they were in `snapshot`.
pub(super) fn read(
    v: &Core,
    snapshot: Option<&str>,
    block: u64,
    count: u32,
    check: Check,
) -> Result<(Bytes, Bytes), StoreError> {
    v.check_range(block, u64::from(count), true)?;
    let inner = v.read_inner()?;
    let chain = chain_of(v, &inner, snapshot)?;
    // Without seals there is nothing else to authenticate a block by.
    let crc = check == Check::Checksums || v.tag == 0;
    read_chain(v, &inner, &chain, block, count, crc)
}

/// Asks the disk to read ahead what the head's layers hold of `[block, block+count)`
/// (NBD_CMD_CACHE); returns how many of those blocks the volume holds.
pub(super) fn prefetch(v: &Core, block: u64, count: u32) -> Result<u64, StoreError> {
    // No data moves: the work follows the extents, not the range's length.
    v.check_range(block, u64::from(count), false)?;
    let end = block + u64::from(count);
    let mut held: ExtentMap<()> = ExtentMap::new();
    let mut ahead = Vec::new();
    {
        let inner = v.read_inner()?;
        for id in inner.chain.iter() {
            let Some(layer) = inner.layers.get(id) else {
                continue;
            };
            let runs: Vec<(u64, u64)> = layer
                .present
                .within(block, end)
                .map(|(s, e, _)| (s, e))
                .collect();
            for &(s, e) in &runs {
                held.insert(s, e, ());
            }
            ahead.push((layer.files(), runs));
        }
        // Blocks still in the log were written lately: cached already, but held.
        let log = &inner.log;
        for m in std::iter::once(&log.recent).chain(log.frozen.as_deref()) {
            for (s, e, _) in m.within(block, end) {
                held.insert(s, e, ());
            }
        }
    }
    // The hints go out without the volume's lock: writers need not wait for them.
    for (files, runs) in ahead {
        for (s, e) in runs {
            // Either slot may hold a block's data; a hole costs the kernel nothing.
            for slot in [0, 1] {
                files
                    .slot(slot)
                    .will_need(s * BLOCK as u64, (e - s) * BLOCK as u64);
            }
        }
    }
    Ok(held.blocks())
}

/// The layers a read of the head (or of `snapshot`) goes through, newest first.
fn chain_of<'a>(
    v: &Core,
    inner: &'a Inner,
    snapshot: Option<&str>,
) -> Result<std::borrow::Cow<'a, [u64]>, StoreError> {
    let Some(name) = snapshot else {
        return Ok(std::borrow::Cow::Borrowed(&inner.chain));
    };
    let id = inner
        .meta
        .snapshot(name)
        .ok_or_else(|| v.invalid(format!("no snapshot named {name}")))?
        .id;
    let chain = inner.meta.chain(id).map_err(|w| v.invalid(w))?;
    Ok(std::borrow::Cow::Owned(chain))
}

fn read_chain(
    v: &Core,
    inner: &Inner,
    chain: &[u64],
    block: u64,
    count: u32,
    crc: bool,
) -> Result<(Bytes, Bytes), StoreError> {
    let end = block + u64::from(count);
    let tag = v.tag;
    let mut out = BytesMut::zeroed(count as usize * BLOCK);
    let mut tags = BytesMut::zeroed(count as usize * tag);
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
                val @ (Recent::Data { side_off, side, .. } | Recent::Direct { side_off, side, .. }),
            ) => {
                let mut sides = vec![0u8; n * usize::from(side)];
                v.log.read_through(&inner.log, &mut sides, side_off)?;
                match val {
                    Recent::Direct { slot, .. } => {
                        let (file, path) = v.head(inner)?.slot(slot);
                        file.read_at(buf, p * BLOCK as u64)
                            .map_err(v.err("reading a layer", path))?;
                    }
                    Recent::Data { data_off, .. } => {
                        v.log.read_through(&inner.log, buf, data_off)?
                    }
                    Recent::Zero => {}
                }
                for (i, (c, t)) in codec::sides(&sides, usize::from(side)).enumerate() {
                    if t.len() != tag
                        || (crc && codec::block_crc(&buf[i * BLOCK..(i + 1) * BLOCK], t) != c)
                    {
                        return Err(checksum(v, p + i as u64, "the write-ahead log".into()));
                    }
                    tbuf[i * tag..(i + 1) * tag].copy_from_slice(t);
                }
            }
            Source::Layer(id) => {
                let Some(layer) = inner.layers.get(&id) else {
                    return Err(v.invalid(format!("layer {id} is not open")));
                };
                let mut recs = vec![0u8; n * v.rec];
                layer
                    .files
                    .rec
                    .read(&mut recs, p)
                    .map_err(v.err("reading block records", &layer.rec_path))?;
                let records: Vec<BlockRecord<'_>> = recs
                    .chunks_exact(v.rec)
                    .map(|r| BlockRecord::decode(r, tag))
                    .collect();
                // Each run of blocks in the same slot in one read.
                let mut i = 0;
                while i < n {
                    let slot = records[i].state.slot();
                    let j = (i + 1..n)
                        .find(|&j| records[j].state.slot() != slot)
                        .unwrap_or(n);
                    let (file, path) = layer.slot(slot);
                    file.read_at(
                        &mut buf[i * BLOCK..j * BLOCK],
                        (p + i as u64) * BLOCK as u64,
                    )
                    .map_err(v.err("reading a layer", path))?;
                    i = j;
                }
                for (i, r) in records.iter().enumerate() {
                    let blk = &mut buf[i * BLOCK..(i + 1) * BLOCK];
                    match r.state {
                        State::Zero => blk.fill(0),
                        State::Data | State::Alt if !crc || r.verifies(blk) => {
                            tbuf[i * tag..(i + 1) * tag].copy_from_slice(r.seal);
                        }
                        _ => {
                            return Err(checksum(
                                v,
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

fn checksum(v: &Core, block: u64, place: String) -> StoreError {
    tracing::error!(volume = %v.name(), block, %place, "checksum mismatch: block not returned");
    StoreError::Checksum {
        volume: v.name().to_string(),
        block,
        place,
    }
}

/// A 64-bit hash of each block of the head (or of snapshot `name`), verified: a
/// block that fails its checksum gets a hash no healthy copy can have.
pub(super) fn hashes(
    v: &Core,
    snapshot: Option<&str>,
    block: u64,
    count: u32,
) -> Result<Vec<u64>, StoreError> {
    match read(v, snapshot, block, count, Check::Checksums) {
        // The seal is part of the block: a copy with another seal is another block.
        Ok((d, t)) => Ok(d
            .chunks_exact(BLOCK)
            .enumerate()
            .map(|(i, b)| {
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                h.update(b);
                h.update(t.get(i * v.tag..(i + 1) * v.tag).unwrap_or(&[]));
                h.digest()
            })
            .collect()),
        Err(StoreError::Checksum { .. }) if count > 1 => (0..count)
            .map(|i| {
                hashes(v, snapshot, block + u64::from(i), 1)
                    .map(|h| h.first().copied().unwrap_or(BAD_BLOCK_HASH))
            })
            .collect(),
        Err(StoreError::Checksum { .. }) => Ok(vec![BAD_BLOCK_HASH]),
        Err(e) => Err(e),
    }
}

/// Which blocks of `[block, block+count)` hold data in the head (or in snapshot
/// `name`), as (start, end, allocated).
pub(super) fn map(
    v: &Core,
    snapshot: Option<&str>,
    block: u64,
    count: u64,
) -> Result<Vec<(u64, u64, bool)>, StoreError> {
    v.check_range(block, count, false)?;
    let inner = v.inner.read();
    let chain = chain_of(v, &inner, snapshot)?;
    let with_log = chain.first() == Some(&inner.meta.head);
    let end = block + count;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut p = block;
    while p < end {
        let (src, run_end) = source(&inner, &chain, with_log, p, end);
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

/// The runs of `[block, block+count)` that snapshot `snapshot` may hold differently
/// from snapshot `since`: the blocks present in the layers of `snapshot`'s chain above
/// `since`'s. `None` when `since` is gone or not an ancestor of `snapshot` (after a
/// revert to an older snapshot): then only a full comparison can tell.
pub(super) fn changed_between(
    v: &Core,
    snapshot: &str,
    since: &str,
    block: u64,
    count: u64,
) -> Result<Option<Vec<(u64, u64)>>, StoreError> {
    v.check_range(block, count, false)?;
    let inner = v.inner.read();
    let chain = chain_of(v, &inner, Some(snapshot))?;
    if inner.meta.snapshot(since).is_none() {
        return Ok(None);
    }
    let base = chain_of(v, &inner, Some(since))?;
    if !chain.ends_with(&base) {
        return Ok(None);
    }
    let end = block + count;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for id in &chain[..chain.len() - base.len()] {
        // A layer the chain names but that is not open: no answer beats a wrong one.
        let Some(layer) = inner.layers.get(id) else {
            return Ok(None);
        };
        let mut p = block;
        while p < end {
            match layer.present.run(p, end) {
                Ok(((), e)) => {
                    runs.push((p, e));
                    p = e;
                }
                Err(b) => p = b.max(p + 1),
            }
        }
    }
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in runs {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    Ok(Some(out))
}

/// Where block `p` comes from on `chain`, and how far that source runs (< `end`).
fn source(inner: &Inner, chain: &[u64], with_log: bool, p: u64, end: u64) -> (Source, u64) {
    let mut bound = end;
    if with_log {
        match inner.log.lookup(p, end) {
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
