//! Durability: what a flush promises, and the group commit that keeps it cheap. A
//! failed fdatasync poisons the volume (Linux reports a lost writeback only once).

use std::sync::atomic::Ordering;

use super::core::{Core, Inner};
use super::error::StoreError;
use super::layer::Files;

/// Makes every completed write durable: one fdatasync of the log (and of the head
/// layer if data went there directly), shared by all flushes that arrive while it
/// runs (group commit).
pub(super) fn sync(v: &Core) -> Result<(), StoreError> {
    v.since_flush.store(0, Ordering::Relaxed);
    v.check_writable()?;
    let target = v.log.written.load(Ordering::SeqCst);
    if v.log.synced.load(Ordering::SeqCst) >= target {
        return Ok(());
    }
    let upto = begin_sync(v)?;
    let _g = v.sync_lock.lock();
    if v.log.synced.load(Ordering::SeqCst) >= target {
        return Ok(());
    }
    // Another flush may have failed while this one waited: Linux reports a lost
    // writeback only once, so a second fdatasync could wrongly succeed.
    v.check_writable()?;
    let head = v.head_files.lock().clone();
    sync_locked(v, &head, upto)?;
    v.check_writable()
}

/// Writes the gathered direct records to the log file (no sync), so a killed process
/// keeps what it acknowledged.
pub(super) fn settle(v: &Core) -> Result<(), StoreError> {
    v.check_writable()?;
    let mut inner = v.write_inner()?;
    v.check_live()?;
    write_tail(v, &mut inner)
}

/// How far a sync reaches: everything appended when it began.
#[derive(Clone, Copy)]
pub(super) struct Reach {
    /// The log's byte count then.
    upto: u64,
    /// The log generation and offset appends had reached then.
    gen: u64,
    off: u64,
    /// The latest direct record placed by then (generation, offset).
    direct: Option<(u64, u64)>,
    /// crc32c of the live half's bytes up to `off`.
    crc: u32,
}

/// Starts a sync and returns how far it will reach: everything appended so far.
/// Taken under `inner`, so no writer is between choosing a slot and logging its
/// record; from here until the sync ends, no direct write reuses the slot of a
/// version it may promise (see `write::write_run`).
pub(super) fn begin_sync(v: &Core) -> Result<Reach, StoreError> {
    mark_sync(v, &mut v.inner.write())
}

/// `begin_sync` for a caller that holds `inner` for writing.
pub(super) fn mark_sync(v: &Core, inner: &mut Inner) -> Result<Reach, StoreError> {
    write_tail(v, inner)?;
    let upto = v.log.written.load(Ordering::SeqCst);
    v.log.syncing.fetch_max(upto, Ordering::SeqCst);
    Ok(Reach {
        upto,
        gen: inner.log.gen,
        off: inner.log.off,
        direct: inner.log.last_direct,
        crc: inner.log.crc,
    })
}

/// Writes the gathered records to the log file. They belong to completed
/// writes, so if they cannot be written, no later sync may promise anything.
pub(super) fn write_tail(v: &Core, inner: &mut Inner) -> Result<(), StoreError> {
    if let Err(err) = v.log.write_tail(&mut inner.log) {
        return Err(v.poison(format!(
            "appending to {} failed: {err}",
            v.log.path.display()
        )));
    }
    Ok(())
}

/// Makes every write `reach` (from `begin_sync`) covers durable: the head layer's
/// slots if data went there directly, then the log. The caller holds `sync_lock`.
pub(super) fn sync_locked(v: &Core, head: &Files, reach: Reach) -> Result<(), StoreError> {
    // Direct writes mark the head dirty before their record counts in `written`,
    // so everything counted in `upto` has its data covered by this sync.
    // Only the slots that took data: a flush after one small direct write costs one
    // fdatasync of the head, not two.
    let dirty = v.direct_dirty.swap(0, Ordering::SeqCst);
    for slot in [0u8, 1] {
        if dirty & (1 << slot) == 0 {
            continue;
        }
        if let Err(err) = head.slot(slot).sync() {
            return Err(v.poison(format!("fdatasync of the head layer failed: {err}")));
        }
    }
    // The slots of every direct record in reach are durable now: say so, in the
    // fdatasync below, so replay can tell rot in a synced slot (the block reads as a
    // checksum error until repaired) from a write a power cut tore (replay ends
    // there). Without it, rot in one slot silently dropped that write and every later
    // one, flushed ones too (simulation, seed 19917 with bit rot).
    if let Err(err) = v
        .log
        .write_mark(reach.gen, reach.off, reach.crc, reach.direct)
    {
        return Err(v.poison(format!(
            "writing a sync mark to {} failed: {err}",
            v.log.path.display()
        )));
    }
    if let Err(err) = v.log.sync() {
        return Err(v.poison(format!(
            "fdatasync of {} failed: {err}",
            v.log.path.display()
        )));
    }
    v.log.synced.fetch_max(reach.upto, Ordering::SeqCst);
    Ok(())
}
