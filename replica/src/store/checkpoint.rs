//! The checkpoint: copies what the log holds into the head layer, makes it durable
//! there, and frees the log for a new generation (`docs/format.md`, "The log").

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::core::{Core, Inner};
use super::error::StoreError;
use super::flush;
use super::layer::{self, Files};
use super::log::codec::{self, WalHeader, BLOCK};
use super::log::Recent;
use super::options::Execution;
use super::record::{self, BlockRecord, State};
use crate::extents::{ExtentMap, Shift};

/// Copies everything in the log (the frozen half, then the live one) into the head
/// layer, syncs it, and starts a new generation in the live half. The caller holds
/// `ckpt` and `inner` for writing. Leaves everything as it was if any step fails.
pub(super) fn checkpoint(v: &Core, inner: &mut Inner) -> Result<(), StoreError> {
    v.check_writable()?;
    let head_id = inner.meta.head;
    let files = v.head(inner)?.files();
    // Every record copied below must be replayable if the copy is torn: make the log
    // (and direct data) durable before touching the layer.
    if !inner.log.recent.is_empty() || inner.log.frozen.is_some() {
        // `inner` is held for writing: nobody appends meanwhile.
        let upto = flush::mark_sync(v, inner)?;
        let _s = v.sync_lock.lock();
        flush::sync_locked(v, &files, upto)?;
    }
    let mut extents: Vec<(u64, u64, Recent)> = Vec::new();
    if let Some(f) = &inner.log.frozen {
        extents.extend(f.iter().map(|(s, e, v)| (s, e, *v)));
    }
    let frozen = extents.len();
    extents.extend(inner.log.recent.iter().map(|(s, e, v)| (s, e, *v)));
    let single = inner.chain.len() == 1;
    let changes = copy_to_head(v, head_id, &files, single, &extents)?;
    let next = WalHeader {
        gen: inner.log.gen + 1,
        revision: inner.revision,
        half: inner.log.half,
    };
    // The log's records stop being replayed: their away marks must be in the file.
    v.save_away(inner)?;
    write_header(v, &next)?;
    if let Some(head) = inner.layers.get_mut(&head_id) {
        head.apply(&changes);
    }
    let (older, live) = extents.split_at(frozen);
    // Nothing is newer than the live half here (the lock is held throughout); the
    // frozen half's stale copies must skip the blocks the live half rewrote.
    free_stale(v, inner, &stale_runs(v, older), &[&inner.log.recent]);
    free_stale(v, inner, &stale_runs(v, live), &[]);
    let c = &mut inner.log;
    c.header = next;
    c.gen = next.gen;
    c.recent.clear();
    c.frozen = None;
    c.direct_in_half = 0;
    c.off = v.log.half_range(c.half).0;
    c.crc = 0;
    v.log
        .synced
        .store(v.log.written.load(Ordering::Acquire), Ordering::Release);
    Ok(())
}

/// Copies the frozen half into the head layer, without blocking appends to the live
/// half, then frees the frozen half. The caller holds `ckpt`.
pub(super) fn checkpoint_frozen(v: &Core) -> Result<(), StoreError> {
    let (frozen, frozen_rev, head_id, files, single) = {
        let inner = v.inner.read();
        let Some(frozen) = inner.log.frozen.clone() else {
            return Ok(());
        };
        let files = v.head(&inner)?.files();
        (
            frozen,
            inner.log.frozen_rev,
            inner.meta.head,
            files,
            inner.chain.len() == 1,
        )
    };
    v.check_writable()?;
    // A direct write that reused a frozen version's slot before this sync began is
    // covered by it, so the live half's record (replayed after the frozen block
    // records written below) corrects them; once it began, none reuses one.
    let upto = flush::begin_sync(v)?;
    {
        let _s = v.sync_lock.lock();
        flush::sync_locked(v, &files, upto)?;
    }
    let extents: Vec<(u64, u64, Recent)> = frozen.iter().map(|(s, e, v)| (s, e, *v)).collect();
    let changes = copy_to_head(v, head_id, &files, single, &extents)?;
    // While a half is frozen nothing else moves the generation, the half or the
    // header (that takes `ckpt`), so the header is written without holding up
    // writers for its fdatasync; appends to the live half are not its business.
    let (next, away) = {
        let inner = v.inner.read();
        let next = WalHeader {
            gen: inner.log.gen,
            revision: frozen_rev.max(inner.log.header.revision),
            half: inner.log.half,
        };
        (next, v.away_to_save(&inner))
    };
    // The frozen half stops being replayed: its away marks must be in the file.
    if let Some((version, bytes)) = away {
        v.write_away(version, &bytes)?;
    }
    write_header(v, &next)?;
    {
        let mut inner = v.inner.write();
        // Snapshots and reverts take `ckpt` first, so the head is still `head_id`.
        if let Some(head) = inner.layers.get_mut(&head_id) {
            head.apply(&changes);
        }
        inner.log.header = next;
        inner.log.frozen = None;
    }
    // Stale copies are freed a batch at a time, so writers wait for one batch of
    // punches at most; a write in between that reaches one of these blocks is newer
    // (in the live half, or a half frozen since) and is skipped.
    for batch in stale_runs(v, &extents).chunks(STALE_BATCH) {
        let inner = v.inner.read();
        let newer: Vec<&ExtentMap<Recent>> = std::iter::once(&inner.log.recent)
            .chain(inner.log.frozen.as_deref())
            .collect();
        free_stale(v, &inner, batch, &newer);
    }
    Ok(())
}

/// Stale runs freed under one hold of the volume's lock.
const STALE_BATCH: usize = 256;

/// Waits for a running background checkpoint, or does it here if none is running
/// (or it failed: then its error is this caller's).
pub(super) fn finish(v: &Core) -> Result<(), StoreError> {
    let _c = v.ckpt.lock();
    checkpoint_frozen(v)
}

/// Starts checkpointing the frozen half in the background: on a thread of its own, or
/// as a job for the simulation's scheduler.
pub(super) fn spawn(v: &Core) {
    let Some(me) = v.me.get().and_then(std::sync::Weak::upgrade) else {
        return;
    };
    let job = move || {
        let _c = me.ckpt.lock();
        if me.closed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = checkpoint_frozen(&me) {
            tracing::warn!(volume = %me.name(), error = %e, "background checkpoint failed; the next write retries it");
        }
    };
    if let Execution::Scheduled(schedule) = &v.execution {
        schedule(Box::new(job));
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("tether-checkpoint".into())
        .spawn(job);
    if let Err(e) = spawned {
        tracing::warn!(volume = %v.name(), error = %e, "cannot start a checkpoint thread; writes will checkpoint inline");
    }
}

fn write_header(v: &Core, h: &WalHeader) -> Result<(), StoreError> {
    v.log
        .write_header(h)
        .map_err(|err| v.poison(format!("writing the log header failed: {err}")))
}

/// Copies log extents into the head layer's files and makes them durable there (no
/// lock held; a failed sync poisons the volume); returns the changes to the head's
/// presence map: (start, end, present). Direct extents only get their block records:
/// the data is already in its slot, synced by the caller.
fn copy_to_head(
    v: &Core,
    head_id: u64,
    files: &Files,
    single: bool,
    extents: &[(u64, u64, Recent)],
) -> Result<Vec<(u64, u64, bool)>, StoreError> {
    let [dp, _, rp, _] = layer::paths(&v.dir, head_id);
    let (data, rec) = (&*files.data, &*files.rec);
    let mut changes = Vec::with_capacity(extents.len());
    let mut recs = Vec::new();
    let mut buf = Vec::new();
    let mut sides = Vec::new();
    for &(s, e, val) in extents {
        let (off, len) = (s * BLOCK as u64, (e - s) * BLOCK as u64);
        match val {
            Recent::Zero => {
                // Nothing direct is pending for a block whose latest write is a zero
                // (such blocks go through the log), so both slots are free.
                data.punch(off, len)
                    .and_then(|_| files.alt.punch(off, len))
                    .map_err(v.err("punching a hole", &dp))?;
                if single {
                    // Nothing below the head to hide: the blocks just become absent.
                    rec.punch(s, e).map_err(v.err("punching a hole", &rp))?;
                    changes.push((s, e, false));
                    continue;
                }
                let mut b = s;
                while b < e {
                    let n = (e - b).min(1 << 14);
                    recs.clear();
                    for _ in 0..n {
                        record::ZERO.encode_into(&mut recs, v.rec);
                    }
                    rec.write(&recs, b)
                        .map_err(v.err("writing block records", &rp))?;
                    b += n;
                }
            }
            Recent::Data { .. } | Recent::Direct { .. } => {
                let state = match val {
                    Recent::Direct { slot, .. } => State::data_in(slot),
                    _ => State::Data,
                };
                let mut b = s;
                while b < e {
                    let n = (e - b).min(256);
                    let (side_off, side, copy) = match val.shift(b - s) {
                        Recent::Data {
                            data_off,
                            side_off,
                            side,
                        } => (side_off, side, Some(data_off)),
                        Recent::Direct { side_off, side, .. } => (side_off, side, None),
                        Recent::Zero => break,
                    };
                    sides.resize(n as usize * usize::from(side), 0);
                    v.log.read(&mut sides, side_off)?;
                    if let Some(data_off) = copy {
                        // From the log into slot 0: no direct write is pending for a
                        // block whose latest write went through the log.
                        buf.resize(n as usize * BLOCK, 0);
                        v.log.read(&mut buf, data_off)?;
                        data.write_at(&buf, b * BLOCK as u64)
                            .map_err(v.err("writing a layer", &dp))?;
                    }
                    recs.clear();
                    for (crc, seal) in codec::sides(&sides, usize::from(side)) {
                        BlockRecord { crc, state, seal }.encode_into(&mut recs, v.rec);
                    }
                    rec.write(&recs, b)
                        .map_err(v.err("writing block records", &rp))?;
                    b += n;
                }
            }
        }
        changes.push((s, e, true));
    }
    if let Err(err) = data.sync().and_then(|_| rec.sync(&*v.disk)) {
        return Err(v.poison(format!("fdatasync of layer {head_id} failed: {err}")));
    }
    Ok(changes)
}

/// The runs of the head's slots that hold only a stale copy once `extents` are
/// checkpointed, as (slot, start, end): the other slot of a direct write (it held the
/// version before), and slot 1 under a write copied from the log into slot 0 (if a
/// direct write ever went there). Adjacent runs are merged: one punch each.
fn stale_runs(v: &Core, extents: &[(u64, u64, Recent)]) -> Vec<(u8, u64, u64)> {
    let alt = v.alt_used.load(Ordering::Acquire);
    let mut runs: Vec<(u8, u64, u64)> = Vec::new();
    for &(s, e, val) in extents {
        let slot = match val {
            Recent::Direct { slot, .. } => layer::other(slot),
            Recent::Data { .. } if alt => 1,
            _ => continue,
        };
        match runs.last_mut() {
            Some(last) if last.0 == slot && last.2 == s => last.2 = e,
            _ => runs.push((slot, s, e)),
        }
    }
    runs
}

/// Punches stale `runs` (see `stale_runs`) out of the head's slots, except where one
/// of the `newer` maps (the live half, a half frozen since) holds a newer write: that
/// write may be in the stale slot. The caller holds `inner`
/// (shared is enough: a write chooses its slot and logs its record under the
/// exclusive lock). This is what bounds the head to about one copy of each block:
/// without it, every block rewritten directly after a flush keeps its old version in
/// the other slot until rewritten again (1.95 times the data after rewriting random
/// 4 KiB blocks).
fn free_stale(v: &Core, inner: &Inner, runs: &[(u8, u64, u64)], newer: &[&ExtentMap<Recent>]) {
    let Some(head) = inner.layers.get(&inner.meta.head) else {
        return;
    };
    for &(slot, s, e) in runs {
        let (file, path) = head.slot(slot);
        let mut p = s;
        while p < e {
            // The next block from `p` that a newer write holds, and where it ends.
            let mut end = e;
            let mut skip_to = None;
            for m in newer {
                match (m.get(p), m.next_start(p)) {
                    (Some((_, until)), _) => {
                        skip_to = Some(skip_to.map_or(until, |t: u64| t.max(until)));
                    }
                    (None, Some(next)) => end = end.min(next),
                    _ => {}
                }
            }
            if let Some(t) = skip_to {
                p = t.min(e).max(p + 1);
                continue;
            }
            let (off, len) = (p * BLOCK as u64, (end - p) * BLOCK as u64);
            if let Err(err) = file.punch(off, len) {
                tracing::warn!(volume = %v.name(), path = %path.display(), error = %err,
                    "could not free a stale slot; the space stays used until the blocks are rewritten");
            }
            p = end;
        }
    }
}

/// Freezes the live half for a background checkpoint and switches appends to the
/// other half (the caller checked that none is frozen).
pub(super) fn freeze_live(v: &Core, inner: &mut Inner) {
    let c = &mut inner.log;
    c.frozen = Some(Arc::new(std::mem::replace(&mut c.recent, ExtentMap::new())));
    c.frozen_rev = inner.revision;
    c.half = 1 - c.half;
    c.gen += 1;
    c.off = v.log.half_range(c.half).0;
    c.crc = 0;
    c.direct_in_half = 0;
}
