//! Replay: rebuilding the log's index from its file after an open, and deciding which
//! of the records found may be applied.

use std::collections::BTreeMap;

use super::codec::{self, RecordKind, BLOCK};
use super::{Cursor, Log, Recent};
use crate::extents::Shift;
use crate::store::error::StoreError;
use crate::store::layer::Layer;

/// A valid record found by replay, before it is applied.
struct Replayed {
    seq: u64,
    /// More records of the same write follow.
    more: bool,
    block: u64,
    end: u64,
    value: Recent,
    /// Direct records: block ranges whose slot no longer matches the record.
    unmatched: Vec<(u64, u64)>,
    /// Direct records a sync mark covers: block ranges whose slot no longer matches
    /// although it was synced. Mapped all the same: unless a later record covers them,
    /// they rotted, and read as checksum errors (never as an older version).
    rotted: Vec<(u64, u64)>,
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

/// What replay found: records applied, bytes read, the highest write sequence, and
/// blocks that rotted in a synced slot.
pub(in crate::store) struct Replay {
    pub(in crate::store) records: usize,
    pub(in crate::store) bytes: u64,
    pub(in crate::store) revision: u64,
    pub(in crate::store) rotted: u64,
}

/// How many of the records replay found to apply. A direct record's block whose slot
/// no longer matches is fine if a later applied record covers the block (its slot was
/// reused after a newer version, or overwritten before it was ever synced). If none
/// does and no sync mark covers the record, no sync completed after that record (a
/// sync would have left a matching version at or after it, and a mark), so it and
/// everything after it were never flushed: drop them, as a torn log record ends the
/// log. Stopping there leaves every write up to the revision present, so replicas with
/// equal revisions hold the same data. (Blocks of a covered record are in `rotted`,
/// not `unmatched`: they never stop replay.)
fn applicable_prefix(found: &[Replayed]) -> usize {
    let mut limit = found.len();
    loop {
        // Blocks whose last record so far did not reach its slot, with that record.
        let mut pending: BTreeMap<u64, usize> = Default::default();
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

impl Log {
    /// Rebuilds the index in `c` from the file: the valid prefix of the header's
    /// generation in its half, then of the next generation in the other half. `head`
    /// is the head layer (direct records are checked against its slots), `blocks` the
    /// volume's size and `tag` its seal bytes per block.
    pub(in crate::store) fn replay(
        &self,
        c: &mut Cursor,
        head: &Layer,
        blocks: u64,
        tag: usize,
    ) -> Result<Replay, StoreError> {
        let (first_half, gen) = (c.header.half, c.header.gen);
        let mut found = Vec::new();
        let mut bytes = 0;
        for (h, g) in [(first_half, gen), (1 - first_half, gen + 1)] {
            let before = found.len();
            let (end, complete) = self.replay_half(head, blocks, tag, (h, g), &mut found)?;
            let (start, _) = self.half_range(h);
            bytes += end - start;
            c.half = h;
            c.gen = g;
            c.off = end;
            c.crc = self
                .crc_upto(h, end)
                .map_err(|e| self.vol.io("replaying the log", &self.path)(e))?;
            // The next half can only hold live records if this one filled up.
            if found.len() == before || !complete {
                break;
            }
        }
        let applied = applicable_prefix(&found);
        if applied < found.len() {
            tracing::info!(volume = %self.vol.0, records = found.len() - applied,
                "dropping unflushed records after a direct write that did not reach its slot");
        }
        let mut revision = 0;
        for r in &found[..applied] {
            for (s, e) in r.matched() {
                c.recent.insert(s, e, r.value.shift(s - r.block));
            }
            for &(s, e) in &r.rotted {
                c.recent.insert(s, e, r.value.shift(s - r.block));
            }
            // A write counts once its last record is back (those before it are too:
            // `found` is in the order records were appended).
            if !r.more {
                revision = revision.max(r.seq);
            }
        }
        // Rotted blocks that no later record replaced: they read as checksum errors
        // until the engine repairs them from another replica.
        let mut rotted = 0;
        for r in &found[..applied] {
            for &(s, e) in &r.rotted {
                for b in s..e {
                    if c.recent
                        .run(b, b + 1)
                        .is_ok_and(|(v, _)| v == r.value.shift(b - r.block))
                    {
                        rotted += 1;
                    }
                }
            }
        }
        if rotted > 0 {
            tracing::error!(volume = %self.vol.0, blocks = rotted,
                "blocks of synced direct writes no longer match their checksums (bit rot): they read as checksum errors until the engine repairs them from another replica");
        }
        Ok(Replay {
            records: applied,
            bytes,
            revision,
            rotted,
        })
    }

    /// Reads the valid records of one half into `found`; returns (end offset, whether
    /// it ended for lack of room).
    fn replay_half(
        &self,
        head: &Layer,
        blocks: u64,
        tag: usize,
        (half, gen): (u8, u64),
        found: &mut Vec<Replayed>,
    ) -> Result<(u64, bool), StoreError> {
        // The mark found at open: replay runs before any sync writes a new one.
        let mark = self.mark();
        let (start, limit) = self.half_range(half);
        let mut off = start;
        let rerr = |e| self.vol.io("replaying the log", &self.path)(e);
        let mut hdr = [0u8; codec::RECORD_HEADER];
        let mut full = false;
        loop {
            if off + codec::RECORD_HEADER as u64 > limit {
                full = true;
                break;
            }
            self.file.read_at(&mut hdr, off).map_err(rerr)?;
            let Some(h) = codec::decode_header(&hdr, gen) else {
                // Either the end of what was written, or a record that did not fit
                // here and went to the other half.
                full = true;
                break;
            };
            if off + h.total_len() > limit
                || h.block
                    .checked_add(u64::from(h.count))
                    .is_none_or(|e| e > blocks)
            {
                break;
            }
            let mut rec = vec![0u8; codec::RECORD_HEADER + h.sides_len()];
            self.file.read_at(&mut rec, off).map_err(rerr)?;
            if !codec::verify_record(&rec) {
                break;
            }
            if h.kind != RecordKind::Zero && usize::from(h.tag) != tag {
                // The header passed its crc: this is not a torn write but a record
                // of another format, and what follows may be flushed data.
                return Err(self.vol.invalid(format!(
                    "log record at offset {off} carries {}-byte seals, the volume {tag}; the log does not belong to this volume",
                    h.tag
                )));
            }
            let end = h.block + u64::from(h.count);
            let side_off = off + codec::RECORD_HEADER as u64;
            let data_off = side_off + h.sides_len() as u64;
            let side = h.side_len();
            let mut unmatched: Vec<(u64, u64)> = Vec::new();
            let value = match h.kind {
                RecordKind::Direct => {
                    // The data went to the head layer without waiting for the log.
                    // Where the slot no longer matches, this version never became
                    // durable or was overwritten after a newer one did: the block
                    // keeps what it had. Either way the replay goes on.
                    let (file, path) = head.slot(h.slot);
                    let mut data = vec![0u8; (h.count as usize).min(256) * BLOCK];
                    let mut sides = codec::sides(&rec[codec::RECORD_HEADER..], side);
                    // In chunks: a record's size is bounded by the log, not by memory.
                    let mut b = h.block;
                    while b < end {
                        let n = (end - b).min(256) as usize;
                        file.read_at(&mut data[..n * BLOCK], b * BLOCK as u64)
                            .map_err(self.vol.io("reading a layer", path))?;
                        for (blk, (c, t)) in data[..n * BLOCK].chunks_exact(BLOCK).zip(&mut sides) {
                            if codec::block_crc(blk, t) != c {
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
                    self.file.read_at(&mut data, data_off).map_err(rerr)?;
                    let intact = data
                        .chunks_exact(BLOCK)
                        .zip(codec::sides(&rec[codec::RECORD_HEADER..], side))
                        .all(|(b, (c, t))| codec::block_crc(b, t) == c);
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
            let rotted = if mark.covers(gen, off) {
                std::mem::take(&mut unmatched)
            } else {
                Vec::new()
            };
            found.push(Replayed {
                seq: h.seq,
                more: h.more,
                block: h.block,
                end,
                value,
                unmatched,
                rotted,
            });
            off += h.total_len();
        }
        Ok((off, full))
    }
}
