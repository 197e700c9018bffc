//! The write path. A small write that a flush may soon wait for is appended to the
//! log; a large one, or a small one while nobody flushes, goes straight into the slot
//! of the head layer that does not hold the block's last durable version, and only
//! its checksums go to the log.

use std::sync::atomic::Ordering;

use super::checkpoint;
use super::core::{Core, Inner};
use super::error::{io_err, StoreError};
use super::flush;
use super::layer::other;
use super::log::codec::{self, RecordHeader, RecordKind, BLOCK};
use super::log::{Recent, TAIL_BYTES};
use super::record::{BlockRecord, State};

/// Direct data per half of the log, rewrites included, in multiples of the limit on
/// distinct blocks.
const DIRECT_REWRITES: u64 = 16;

/// Writes whole blocks with their seals (`SEAL_BYTES` per block on encrypted
/// volumes, none otherwise) as write sequence `seq`.
pub(super) fn write_sealed(
    v: &Core,
    seq: u64,
    block: u64,
    data: &[u8],
    tags: &[u8],
) -> Result<(), StoreError> {
    if data.is_empty() || !data.len().is_multiple_of(BLOCK) {
        return Err(v.invalid(format!(
            "write of {} bytes is not a whole number of blocks",
            data.len()
        )));
    }
    let count = (data.len() / BLOCK) as u64;
    if tags.len() as u64 != count * v.tag as u64 {
        return Err(v.invalid(if v.tag == 0 {
            "the volume is not encrypted but the write carries seals; check the engine's --encryption-key-file".to_string()
        } else {
            format!(
                "the volume is encrypted: a write of {count} block(s) needs {} seal bytes, got {}; is the engine running without a key?",
                count * v.tag as u64,
                tags.len()
            )
        }));
    }
    v.check_range(block, count, true)?;
    v.check_writable()?;
    let writes = v.since_flush.fetch_add(1, Ordering::Relaxed) + 1;
    // Large writes skip the log's copy; so do small ones while nobody flushes (no one
    // waits on the log's one cheap fdatasync then).
    let direct = count >= v.direct_min_blocks
        || (v.direct_after_writes > 0 && writes > v.direct_after_writes);
    let side = 4 + v.tag;
    let sides = codec::make_sides(data, tags, v.tag);
    // Big writes go in pieces that fit a quarter of the log.
    let per = ((v.log.size / 4) / (BLOCK + side) as u64).max(1);
    let mut b = 0;
    while b < count {
        let wrote = write_run(
            v,
            &mut *v.write_inner()?,
            Run {
                seq,
                block: block + b,
                max: per.min(count - b),
                data: &data[b as usize * BLOCK..],
                sides: &sides[b as usize * side..],
                direct_ok: direct,
            },
        )?;
        match wrote {
            Some(n) => b += n,
            None => {
                v.may_wait()?;
                checkpoint::finish(v)?
            }
        }
    }
    Ok(())
}

/// Deallocates whole blocks as write sequence `seq`; they read back as zeroes.
pub(super) fn zero_blocks(v: &Core, seq: u64, block: u64, count: u64) -> Result<(), StoreError> {
    v.check_range(block, count, false)?;
    v.check_writable()?;
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
            more: b + n < count,
        };
        append_waiting(v, h, &[], &[])?;
        b += n;
    }
    Ok(())
}

/// Appends, waiting for the background checkpoint when both halves are busy.
fn append_waiting(v: &Core, h: RecordHeader, sides: &[u8], data: &[u8]) -> Result<(), StoreError> {
    loop {
        {
            let mut inner = v.write_inner()?;
            v.check_live()?;
            match make_room(v, &mut inner, h.total_len(), 0)? {
                Room::Ready => return push_record(v, &mut inner, h, sides, data),
                Room::Moved => continue,
                Room::Busy => {}
            }
        }
        v.may_wait()?;
        checkpoint::finish(v)?;
    }
}

/// What `make_room` did.
enum Room {
    /// The record fits the live half.
    Ready,
    /// The live half was full: it is frozen for the checkpoint and appends moved to
    /// the other half. Choose again what the record looks like (a durable version
    /// may have become the one a direct write must not overwrite).
    Moved,
    /// The live half is full and the other is still being checkpointed: wait.
    Busy,
}

/// Makes room in the live half for a record of `len` bytes that comes with `direct`
/// bytes written straight into the head.
fn make_room(v: &Core, inner: &mut Inner, len: u64, direct: u64) -> Result<Room, StoreError> {
    // Recovery reads every block written directly in the log's window from the layer
    // to check it, and every direct record's data: bound both (rewrites of the same
    // blocks cost it memory reads, not disk reads).
    let c = &inner.log;
    let window = c.recent.blocks() * BLOCK as u64;
    let full = c.off + len > v.log.half_range(c.half).1
        || (direct > 0
            && c.direct_in_half > 0
            && (window > v.direct_limit
                || c.direct_in_half + direct > DIRECT_REWRITES * v.direct_limit));
    if !full {
        return Ok(Room::Ready);
    }
    if c.frozen.is_some() {
        return Ok(Room::Busy);
    }
    // Moving to the other half syncs this one first (below).
    v.may_wait()?;
    let (start, end) = v.log.half_range(1 - c.half);
    if start + len > end {
        return Err(v.invalid(format!(
            "a record of {len} bytes does not fit half of the {} byte log",
            v.log.size
        )));
    }
    // Durable before the other half gets its first record: replay takes a record it
    // cannot read as the end of this half and goes on in the other, so a power cut
    // must not keep a record there while losing one here (that replica would report
    // a revision it lacks writes of: simulation seed 967). One fdatasync per half of
    // the log. The checkpoint reads the frozen half from the file.
    let upto = flush::mark_sync(v, inner)?;
    {
        let _s = v.sync_lock.lock();
        flush::sync_locked(v, &v.head(inner)?.files(), upto)?;
    }
    checkpoint::freeze_live(v, inner);
    checkpoint::spawn(v);
    Ok(Room::Moved)
}

/// Appends one record where `make_room` made room, and maps its blocks.
fn push_record(
    v: &Core,
    inner: &mut Inner,
    h: RecordHeader,
    sides: &[u8],
    data: &[u8],
) -> Result<(), StoreError> {
    if !super::log::gathered(h.kind, data) {
        // Records reach the file in order.
        flush::write_tail(v, inner)?;
    }
    let placed = v.log.place(&mut inner.log, h, sides, data)?;
    if inner.log.tail.len() >= TAIL_BYTES {
        flush::write_tail(v, inner)?;
    }
    v.log.index(&mut inner.log, placed);
    if !inner.away.is_empty() {
        inner.away.mark(h.block, h.block + u64::from(h.count));
        inner.away_version += 1;
    }
    // A write split into several records counts once its last one is in: a
    // checkpoint's header must not promise a write whose rest may be lost.
    if !h.more {
        inner.revision = inner.revision.max(h.seq);
    }
    Ok(())
}

/// One run of a write: blocks from `block` on (at most `max`), their data and their
/// side entries.
struct Run<'a> {
    seq: u64,
    block: u64,
    max: u64,
    data: &'a [u8],
    sides: &'a [u8],
    /// The write may skip the log's data copy.
    direct_ok: bool,
}

/// Writes the first run of blocks that goes one way: through the log, or straight
/// into one slot of the head. Returns how many blocks (0 when the log just moved to
/// its other half: call again), or `None` when both halves of the log are busy (wait
/// for the checkpoint, then retry).
fn write_run(v: &Core, inner: &mut Inner, run: Run<'_>) -> Result<Option<u64>, StoreError> {
    let Run {
        seq,
        block,
        max,
        data,
        sides,
        direct_ok,
    } = run;
    v.check_live()?;
    let (latest, mut run_end) = inner.log.lookup(block, block + max);
    let head = v.head(inner)?;
    // Once a block's write since the last checkpoint went through the log, its later
    // ones do too, so log copies (into slot 0) and zeroes (punches) never meet a
    // direct write newer than them in a slot.
    let slot = match latest {
        Some(Recent::Direct { slot, at, .. }) => {
            // Its last durable version is this one once synced, else the one in the
            // other slot (a direct write never goes where that version is).
            let synced = v.log.synced.load(Ordering::SeqCst);
            if !direct_ok {
                // A small write while the client flushes often: the log costs one
                // fdatasync per flush, a slot one more (PostgreSQL rewriting its WAL
                // page between commits). Its later writes go through the log too,
                // until the checkpoint.
                None
            } else if at > synced && at <= v.log.syncing.load(Ordering::SeqCst) {
                // A running sync may promise this version any moment, and the other
                // slot holds the last one it promised: neither is free, so this write
                // goes through the log (as the block's later writes do until the
                // checkpoint).
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
                let mut recs = vec![0u8; n * v.rec];
                head.files
                    .rec
                    .read(&mut recs, block)
                    .map_err(v.err("reading block records", &head.rec_path))?;
                let stable =
                    |r: &[u8]| u8::from(BlockRecord::decode(r, v.tag).state != State::Data);
                let mut entries = recs.chunks_exact(v.rec);
                let first = entries.next().map_or(1, stable);
                let same = 1 + entries.take_while(|r| stable(r) == first).count();
                run_end = block + same as u64;
                Some(other(first))
            }
        },
        None => None,
    };
    let n = run_end - block;
    // `data` holds the rest of the write.
    let more = n < (data.len() / BLOCK) as u64;
    let side = 4 + v.tag;
    let sides = &sides[..n as usize * side];
    let data = &data[..n as usize * BLOCK];
    let mut h = RecordHeader {
        kind: RecordKind::Write,
        gen: 0,
        seq,
        block,
        count: n as u32,
        tag: v.tag as u8,
        slot: 0,
        more,
    };
    let Some(slot) = slot else {
        return match make_room(v, inner, h.total_len(), 0)? {
            Room::Ready => {
                push_record(v, inner, h, sides, data)?;
                Ok(Some(n))
            }
            Room::Moved => Ok(Some(0)),
            Room::Busy => Ok(None),
        };
    };
    h.kind = RecordKind::Direct;
    h.slot = slot;
    match make_room(v, inner, h.total_len(), data.len() as u64)? {
        Room::Ready => {}
        Room::Moved => return Ok(Some(0)),
        Room::Busy => return Ok(None),
    }
    let head = v.head(inner)?;
    let (file, path) = head.slot(slot);
    if let Err(e) = file.write_at(data, block * BLOCK as u64) {
        let in_place = matches!(latest, Some(Recent::Direct { slot: s, .. }) if s == slot);
        if in_place {
            // The slot held the latest completed write, not yet synced: it is gone,
            // and a flush must not promise it now.
            return Err(v.poison(format!(
                "a write over blocks {block}..{run_end} in {} failed: {e}",
                path.display()
            )));
        }
        return Err(io_err(v.name(), "writing a layer", path, e));
    }
    // Before the record counts in `written`: see `flush::sync_locked`.
    v.direct_dirty.fetch_or(1 << slot, Ordering::SeqCst);
    if slot == 1 {
        v.alt_used.store(true, Ordering::Release);
    }
    push_record(v, inner, h, sides, &[])?;
    inner.log.direct_in_half += data.len() as u64;
    Ok(Some(n))
}
