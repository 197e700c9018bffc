//! Snapshots: freezing the head as a named layer, deleting one by merging it into
//! its children, and reverting the volume to one.

use std::time::Instant;

use super::checkpoint;
use super::core::Core;
use super::error::StoreError;
use super::layer::{self, Layer};
use super::log::codec::BLOCK;
use super::options::validate_name;
use super::record::{BlockRecord, State};

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

/// Freezes the head as snapshot `name` and starts a new empty head.
pub(super) fn create(v: &Core, name: &str) -> Result<(), StoreError> {
    validate_name(name).map_err(|_| {
        v.invalid(format!(
            "snapshot name {name:?} is not valid: use 1-64 characters from A-Z a-z 0-9 . _ -"
        ))
    })?;
    v.check_writable()?;
    let _admin = v.admin.lock();
    let _c = v.ckpt.lock();
    let mut inner = v.inner.write();
    if inner.meta.snapshot(name).is_some() {
        return Err(v.invalid(format!("a snapshot named {name} already exists")));
    }
    checkpoint::checkpoint(v, &mut inner)?;
    let id = inner.meta.next_layer;
    let old = inner.meta.head;
    let layer = Layer::create(&*v.disk, &v.dir, id, v.rec, &v.vol)?;
    let seq = inner.revision;
    v.save_meta(&mut inner, |m| {
        for l in m.layers.iter_mut().filter(|l| l.id == old) {
            l.name = Some(name.to_string());
            l.frozen_at = Some(seq);
        }
        m.push_head(id, old);
    })?;
    *v.head_files.lock() = layer.files();
    inner.layers.insert(id, layer);
    inner.chain.insert(0, id);
    tracing::info!(volume = %v.name(), snapshot = name, seq, "snapshot created");
    Ok(())
}

/// Snapshots, oldest first.
pub(super) fn list(v: &Core) -> Vec<SnapshotInfo> {
    let inner = v.inner.read();
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

/// The id of the layer frozen as snapshot `name`.
fn layer_of(v: &Core, meta: &super::meta::Meta, name: &str) -> Result<u64, StoreError> {
    meta.snapshot(name)
        .map(|l| l.id)
        .ok_or_else(|| v.invalid(format!("no snapshot named {name}")))
}

/// Deletes snapshot `name`: its blocks that a child layer lacks are copied into that
/// child, chunk by chunk, so I/O continues meanwhile. Until the final meta update the
/// snapshot's layer stays in every read path, so a crash midway only leaves copies
/// that read the same.
pub(super) fn delete(v: &Core, name: &str) -> Result<(), StoreError> {
    v.check_writable()?;
    let _admin = v.admin.lock();
    let (lid, parent, children, extents) = {
        let inner = v.inner.read();
        let lid = layer_of(v, &inner.meta, name)?;
        let parent = inner
            .meta
            .layers
            .iter()
            .find(|l| l.id == lid)
            .and_then(|l| l.parent);
        let children: Vec<u64> = inner
            .meta
            .layers
            .iter()
            .filter(|c| c.parent == Some(lid))
            .map(|c| c.id)
            .collect();
        let extents: Vec<(u64, u64)> = inner
            .layers
            .get(&lid)
            .map(|x| x.present.iter().map(|(s, e, _)| (s, e)).collect())
            .unwrap_or_default();
        (lid, parent, children, extents)
    };
    let started = Instant::now();
    let mut copied = 0u64;
    // Into the head, the merge copies into slot 0 while writes go on: from here to the
    // end every write goes through the log, and nothing written directly before is
    // left in the log, so no direct write and no copy meet in a slot.
    let into_head = {
        let _c = v.ckpt.lock();
        let mut inner = v.inner.write();
        let into_head = children.contains(&inner.meta.head);
        if into_head {
            checkpoint::checkpoint(v, &mut inner)?;
            inner.log_only = true;
        }
        into_head
    };
    let merged = merge_into(v, lid, &children, &extents, &mut copied);
    if into_head {
        v.inner.write().log_only = false;
    }
    merged?;
    let mut inner = v.inner.write();
    v.save_meta(&mut inner, |m| {
        m.layers.retain(|l| l.id != lid);
        for l in m.layers.iter_mut().filter(|l| l.parent == Some(lid)) {
            l.parent = parent;
        }
    })?;
    inner.layers.remove(&lid);
    inner.chain = inner
        .meta
        .chain(inner.meta.head)
        .map_err(|w| v.invalid(w))?;
    remove_layer_files(v, lid);
    tracing::info!(volume = %v.name(), snapshot = name, blocks = copied,
        ms = started.elapsed().as_millis() as u64, "snapshot deleted and merged");
    Ok(())
}

/// Copies the blocks of layer `lid` (its `extents`) that each child lacks into it,
/// and makes the children's records durable.
fn merge_into(
    v: &Core,
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
                *copied += merge_chunk(v, lid, child, b, b + n)?;
                b += n;
            }
        }
        let inner = v.inner.read();
        if let Some(c) = inner.layers.get(&child) {
            c.files
                .rec
                .sync(&*v.disk)
                .map_err(v.err("syncing block records", &c.rec_path))?;
        }
    }
    Ok(())
}

/// Copies the blocks of `[s, e)` that layer `from` has and `to` lacks.
fn merge_chunk(v: &Core, from: u64, to: u64, s: u64, e: u64) -> Result<u64, StoreError> {
    // `ckpt` (and the caller's `admin`) keep every other writer of layer files away,
    // so the copy runs without `inner`: client I/O goes on meanwhile.
    let _c = v.ckpt.lock();
    v.check_live()?;
    let (src, dst, missing) = {
        let inner = v.inner.read();
        let (Some(src), Some(dst)) = (inner.layers.get(&from), inner.layers.get(&to)) else {
            return Err(v.invalid(format!("layer {from} or {to} is not open")));
        };
        // Blocks in the head's log still get the copy: the log may be lost in a crash
        // before its next flush, and then the snapshot's version must remain.
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
    let mut recs = Vec::with_capacity(missing.len() * v.rec);
    let mut entry = vec![0u8; v.rec];
    let mut block = vec![0u8; BLOCK];
    for &b in &missing {
        sf.rec
            .read(&mut entry, b)
            .map_err(v.err("reading block records", &srp))?;
        let mut r = BlockRecord::decode(&entry, v.tag);
        if matches!(r.state, State::Data | State::Alt) {
            let slot = r.state.slot();
            sf.slot(slot)
                .read_at(&mut block, b * BLOCK as u64)
                .map_err(v.err("reading a layer", if slot == 1 { &sap } else { &sdp }))?;
            // The copy goes to slot 0 (nothing direct is pending in the head during a
            // merge, and a snapshot layer has no writers).
            r.state = State::Data;
            ddata
                .write_at(&block, b * BLOCK as u64)
                .map_err(v.err("writing a layer", &ddp))?;
        }
        if r.state == State::Unknown || r.state == State::Absent {
            // Not a record this version can re-encode: carried over as it is, so it
            // keeps failing its checksum in the child.
            recs.extend_from_slice(&entry);
        } else {
            r.encode_into(&mut recs, v.rec);
        }
    }
    // Data durable before the records that point at it: a crash can leave a record
    // missing (the block still reads through the old layer), never a record over torn
    // data.
    ddata.sync().map_err(v.err("syncing a layer", &ddp))?;
    for (&b, r) in missing.iter().zip(recs.chunks_exact(v.rec)) {
        drec.write(r, b)
            .map_err(v.err("writing block records", &drp))?;
    }
    let mut inner = v.inner.write();
    if let Some(dst) = inner.layers.get_mut(&to) {
        for &b in &missing {
            dst.present.insert(b, b + 1, ());
        }
    }
    Ok(missing.len() as u64)
}

/// Makes the volume's contents those of snapshot `name`: a new empty head on top of
/// it; what the old head held since is dropped.
pub(super) fn revert(v: &Core, name: &str) -> Result<(), StoreError> {
    v.check_writable()?;
    let _admin = v.admin.lock();
    let _c = v.ckpt.lock();
    let mut inner = v.inner.write();
    let target = layer_of(v, &inner.meta, name)?;
    checkpoint::checkpoint(v, &mut inner)?;
    // The head changes without writes: no record says how.
    v.end_away(&mut inner)?;
    let id = inner.meta.next_layer;
    let old = inner.meta.head;
    let layer = Layer::create(&*v.disk, &v.dir, id, v.rec, &v.vol)?;
    v.save_meta(&mut inner, |m| {
        m.layers.retain(|l| l.id != old);
        m.push_head(id, target);
    })?;
    *v.head_files.lock() = layer.files();
    inner.layers.remove(&old);
    inner.layers.insert(id, layer);
    inner.chain = inner.meta.chain(id).map_err(|w| v.invalid(w))?;
    remove_layer_files(v, old);
    tracing::info!(volume = %v.name(), snapshot = name, "reverted to snapshot");
    Ok(())
}

/// Removes a dropped layer's files (a leftover only wastes space).
fn remove_layer_files(v: &Core, id: u64) {
    for p in layer::paths(&v.dir, id) {
        if let Err(e) = v.disk.remove(&p) {
            tracing::warn!(volume = %v.name(), path = %p.display(), error = %e, "could not remove a dropped layer file");
        }
    }
}
