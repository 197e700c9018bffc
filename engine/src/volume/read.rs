//! Reads: from one healthy replica in turn, every block checked (checksum, and the
//! seal on encrypted volumes); bad copies are repaired from a good one under the
//! caller's hold of the blocks. Also verify, which compares every replica's copy.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tether_proto::replica::{io_request::Op, Cache, Read, Write};

use super::{Held, Served, Volume, BLOCK};
use crate::error::VolumeError;
use crate::replica::{Payload, ReplicaConn, ReplicaError};

impl Volume {
    /// Rewrites blocks that failed their checksum on `bad` replicas with a good copy
    /// from `good`, under the caller's hold of those blocks, so no client write can
    /// interleave and no lock is taken twice. The copy is verbatim (still sealed):
    /// repairs never encrypt anything.
    pub(super) async fn repair(
        &self,
        held: &Held<'_>,
        good: &ReplicaConn,
        bad: &[Arc<ReplicaConn>],
        block: u64,
        count: u32,
    ) {
        if !held.covers(block, block + u64::from(count)) {
            tracing::error!(volume = %self.name, block, count, "repair skipped: the caller does not hold these blocks");
            return;
        }
        let copy = match self.read_checked_from(good, "", block, count).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(volume = %self.name, block, error = %e, "repair skipped: re-reading the good copy failed");
                return;
            }
        };
        for r in bad {
            let rx = r.submit(Op::Write(Write {
                seq: 0,
                block,
                data: copy.data.clone(),
                tags: copy.tags.clone(),
            }));
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(Ok(_))) => {
                    tracing::info!(volume = %self.name, replica = %r.addr, block, count, "repaired bad block copy from a healthy replica")
                }
                _ => {
                    tracing::warn!(volume = %self.name, replica = %r.addr, block, "repairing a bad block copy failed")
                }
            }
        }
    }

    /// Reads blocks `[block, block+count)` from every healthy replica, with writes to
    /// them held off, and reports checksum failures and disagreements by block.
    pub async fn verify_chunk(&self, block: u64, count: u32) -> Vec<(u64, String, String)> {
        let _held = self.hold(block, block + u64::from(count)).await;
        let reps = self.replicas();
        let healthy: Vec<&Arc<ReplicaConn>> = reps.iter().filter(|r| r.is_healthy()).collect();
        // Raw copies: replicas hold the same ciphertext, and each must also open.
        let reads = futures::future::join_all(
            healthy
                .iter()
                .map(|r| self.read_checked_from(r, "", block, count)),
        )
        .await;
        let mut problems = Vec::new();
        let mut copies: Vec<(&str, Payload)> = Vec::new();
        for (r, res) in healthy.iter().zip(reads) {
            match res {
                Ok(p) => copies.push((&r.addr, p)),
                // Find the bad blocks one by one.
                Err(ReplicaError::Checksum(_)) => {
                    for b in block..block + u64::from(count) {
                        if let Err(e) = self.read_checked_from(r, "", b, 1).await {
                            problems.push((b, r.addr.clone(), e.to_string()));
                        }
                    }
                }
                Err(e) => problems.push((block, r.addr.clone(), format!("read failed: {e}"))),
            }
        }
        // Replicas hold identical copies: the same data and the same seal per block.
        let seal = copies
            .first()
            .map_or(0, |(_, p)| p.tags.len() / count as usize);
        for i in 0..count as usize {
            let bs = BLOCK as usize;
            let blk = |p: &Payload| {
                (
                    p.data.slice(i * bs..(i + 1) * bs),
                    p.tags.slice(i * seal..(i + 1) * seal),
                )
            };
            let Some((_, first)) = copies.first() else {
                break;
            };
            if copies.iter().all(|(_, d)| blk(d) == blk(first)) {
                continue;
            }
            // Name the copies that differ from the most common content.
            let majority = copies
                .iter()
                .max_by_key(|(_, d)| copies.iter().filter(|(_, o)| blk(o) == blk(d)).count())
                .map(|(_, d)| blk(d))
                .unwrap_or_default();
            for (addr, d) in &copies {
                if blk(d) != majority {
                    problems.push((
                        block + i as u64,
                        addr.to_string(),
                        "differs from the other replicas".into(),
                    ));
                }
            }
        }
        problems
    }

    /// Holds off writes to `[start, end)` (and snapshots) until the guard drops.
    /// Neither lock is re-entrant: whoever holds one passes the guard down instead
    /// of taking it again (see [`Volume::repair`]).
    pub async fn hold(&self, start: u64, end: u64) -> Held<'_> {
        let gate = self.gate.read().await;
        let range = self.locks.lock(start, end).await;
        Held {
            _gate: gate,
            _range: range,
            start,
            end,
        }
    }

    /// Reads verified blocks of snapshot `snapshot` (the head when empty) from `r`,
    /// decrypted; a block that fails to open is a checksum error naming it.
    pub async fn read_view_from(
        &self,
        r: &ReplicaConn,
        snapshot: &str,
        block: u64,
        count: u32,
    ) -> Result<Bytes, ReplicaError> {
        let p = self.read_raw_from(r, snapshot, block, count).await?;
        match &self.cipher {
            None => Ok(p.data),
            Some(c) => c
                .open(block, p.data, &p.tags)
                .map_err(|b| self.auth_failed(r, b)),
        }
    }

    pub(super) fn auth_failed(&self, r: &ReplicaConn, b: u64) -> ReplicaError {
        tracing::error!(volume = %self.name, replica = %r.addr, block = b,
            "block failed authentication (tampered, moved or damaged): not returned");
        ReplicaError::Checksum(format!(
            "volume {}: block {b} on replica {} failed authentication (tampered, moved or damaged); read it from another replica",
            self.name, r.addr
        ))
    }

    /// Checks that a raw copy opens under this volume's key (always true unencrypted).
    pub(super) fn check_sealed(
        &self,
        r: &ReplicaConn,
        block: u64,
        p: &Payload,
    ) -> Result<(), ReplicaError> {
        match &self.cipher {
            None => Ok(()),
            Some(c) => c
                .open(block, p.data.clone(), &p.tags)
                .map(drop)
                .map_err(|b| self.auth_failed(r, b)),
        }
    }

    /// Reads blocks as stored from `r` and checks that they open under this volume's
    /// key (a copy that does not is a checksum error naming the block).
    pub(super) async fn read_checked_from(
        &self,
        r: &ReplicaConn,
        snapshot: &str,
        block: u64,
        count: u32,
    ) -> Result<Payload, ReplicaError> {
        let p = self.read_raw_from(r, snapshot, block, count).await?;
        self.check_sealed(r, block, &p)?;
        Ok(p)
    }

    /// Reads blocks as stored from `preferred`, or from another healthy replica when
    /// its copy fails its checksum or does not open; never returns a bad copy.
    pub async fn read_good_raw(
        &self,
        preferred: &ReplicaConn,
        snapshot: &str,
        block: u64,
        count: u32,
    ) -> Result<Payload, String> {
        let mut problems = Vec::new();
        let others: Vec<Arc<ReplicaConn>> = self
            .replicas()
            .into_iter()
            .filter(|r| r.is_healthy() && r.addr != preferred.addr)
            .collect();
        let candidates = std::iter::once(preferred).chain(others.iter().map(|r| &**r));
        for r in candidates {
            match self.read_checked_from(r, snapshot, block, count).await {
                Ok(p) => return Ok(p),
                Err(e) => {
                    if matches!(e, ReplicaError::Checksum(_)) {
                        self.counters
                            .checksum_errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    problems.push(format!("{}: {e}", r.addr))
                }
            }
        }
        Err(format!(
            "volume {}: no healthy replica has a good copy of blocks {block}..{}: {}",
            self.name,
            block + u64::from(count),
            problems.join("; ")
        ))
    }

    /// Passes a prefetch hint for `[offset, offset+len)` to one healthy replica (the
    /// next in the reads' turn), which reads what it holds of it ahead.
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.counters.cache_requests.fetch_add(1, Ordering::Relaxed);
        let end = offset.saturating_add(len).min(self.size()).div_ceil(BLOCK);
        let mut block = offset / BLOCK;
        let reps = self.replicas();
        let (_, start) = self.read_order();
        let Some(r) = (0..reps.len())
            .map(|i| &reps[(start + i) % reps.len()])
            .find(|r| r.is_healthy())
        else {
            return self.count(Err(VolumeError::Io(format!(
                "volume {}: no healthy replica to pass a prefetch hint to",
                self.name
            ))));
        };
        while block < end {
            // 1 GiB per request: a replica's stream does not stall on one hint.
            let count = (end - block).min(1 << 18) as u32;
            let rx = r.submit(Op::Cache(Cache { block, count }));
            let res = match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(res)) => res.map_err(|e| e.to_string()),
                Ok(Err(_)) => Err("connection lost".to_string()),
                Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            };
            match res {
                Ok(p) => {
                    self.counters
                        .cache_blocks
                        .fetch_add(p.blocks, Ordering::Relaxed);
                }
                Err(e) => {
                    return self.count(Err(VolumeError::Io(format!(
                        "volume {}: replica {} failed a prefetch hint: {e}",
                        self.name, r.addr
                    ))))
                }
            }
            block += u64::from(count);
        }
        Ok(())
    }

    /// Reads blocks as stored (ciphertext and seals) from replica `r`. The caller
    /// opens every block under the volume's key: the replica skips their checksums.
    async fn read_raw_from(
        &self,
        r: &ReplicaConn,
        snapshot: &str,
        block: u64,
        count: u32,
    ) -> Result<Payload, ReplicaError> {
        let rx = r.submit(Op::Read(Read {
            block,
            count,
            snapshot: snapshot.to_string(),
            // Both callers open every block under the volume's key, which finds any
            // damage a checksum would (a CRC pass costs as much as a tenth of a read).
            authenticated: self.cipher.is_some(),
        }));
        let p = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(res)) => res?,
            Ok(Err(_)) => return Err(ReplicaError::Gone("connection lost".into())),
            Err(_) => {
                return Err(ReplicaError::Gone(format!(
                    "no answer within {:?}",
                    self.timeout
                )))
            }
        };
        let seal = if self.cipher.is_some() {
            tether_proto::wire::SEAL_SIZE
        } else {
            0
        };
        let n = count as usize;
        if p.data.len() != n * BLOCK as usize || p.tags.len() != n * seal {
            return Err(ReplicaError::Replica(format!(
                "volume {}: replica {} answered a read of {count} block(s) with {} bytes and {} seal bytes; expected {} and {}",
                self.name,
                r.addr,
                p.data.len(),
                p.tags.len(),
                n * BLOCK as usize,
                n * seal
            )));
        }
        Ok(p)
    }

    /// How many replicas there are and which to try first: the healthy one in this
    /// process if there is one (no network hop), else the next in turn.
    fn read_order(&self) -> (usize, usize) {
        let reps = self.replicas.read();
        let local = reps.iter().position(|r| r.is_local() && r.is_healthy());
        let start = local.unwrap_or_else(|| self.next_reader.fetch_add(1, Ordering::Relaxed));
        (reps.len(), start)
    }

    /// Reads whole blocks from one healthy replica, trying the others on failure.
    /// A block that fails its checksum on one replica is read from another, and the
    /// bad copy is reported in the answer for the caller to repair; it is never
    /// returned. Takes no lock: callers may hold the blocks already.
    pub(super) async fn read_blocks_of(
        &self,
        snapshot: &str,
        block: u64,
        count: u32,
    ) -> Result<Served, VolumeError> {
        let (n, start) = self.read_order();
        let mut bad: Vec<Arc<ReplicaConn>> = Vec::new();
        for i in 0..n {
            // One Arc clone per attempt rather than a copy of the whole set per read.
            let Some(r) = self.replicas.read().get((start + i) % n).cloned() else {
                continue;
            };
            if !r.is_healthy() {
                continue;
            }
            match self.read_view_from(&r, snapshot, block, count).await {
                Ok(data) => {
                    if !bad.is_empty() {
                        tracing::info!(volume = %self.name, replica = %r.addr, block, count,
                            "served a good copy from another replica");
                    }
                    return Ok(Served { data, good: r, bad });
                }
                Err(ReplicaError::Checksum(msg)) => {
                    self.counters
                        .checksum_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume = %self.name, replica = %r.addr, error = %msg,
                        "bad block copy on replica; reading it from another");
                    bad.push(r);
                }
                Err(e) => self.fail_err(&r, &e, "read failed: "),
            }
        }
        self.check_fence()?;
        if !bad.is_empty() {
            return Err(VolumeError::Io(format!(
                "volume {}: blocks {block}..{} have no good copy on any healthy replica",
                self.name,
                block + u64::from(count)
            )));
        }
        Err(self.no_replica())
    }

    /// Reads `len` bytes at `offset` of the head (or of `snapshot` when not empty),
    /// unaligned, and repairs bad copies of the head it met on the way.
    pub async fn read_range(
        &self,
        snapshot: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Bytes>, VolumeError> {
        self.check_fence()?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.ensure_lease().await?;
        let (first, end) = Self::blocks_of(offset, u64::from(len));
        let count = (end - first) as u32;
        let served = self.read_blocks_of(snapshot, first, count).await?;
        if !served.bad.is_empty() && snapshot.is_empty() {
            let held = self.hold(first, end).await;
            self.repair(&held, &served.good, &served.bad, first, count)
                .await;
        }
        // A read answered after the fence tripped could be older than what the
        // newer engine has acknowledged since.
        self.check_fence()?;
        let head = (offset % BLOCK) as usize;
        Ok(vec![served.data.slice(head..head + len as usize)])
    }

    /// Reads `len` bytes at `offset`, as one or more buffers in order.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<Bytes>, VolumeError> {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_read
            .fetch_add(u64::from(len), Ordering::Relaxed);
        let r = self.read_range("", offset, len).await;
        self.count(r)
    }

    /// Allocation of `[offset, offset+len)` as runs of (length, allocated).
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, bool)>, VolumeError> {
        self.ensure_lease().await?;
        let (first, end) = Self::blocks_of(offset, u64::from(len));
        let req = tether_proto::replica::MapRequest {
            volume: self.name.clone(),
            block: first,
            count: end - first,
            snapshot: String::new(),
            changed_for: String::new(),
            changed_for_copy: 0,
            since: String::new(),
        };
        let mut asked = 0;
        let map = loop {
            let r = self.first_healthy()?;
            match self.ask(&r, r.map(req.clone())).await {
                Ok(map) => break map,
                // It restarted unseen and is dropped now: the next one answers.
                Err(_) if !r.is_healthy() && asked < self.replicas().len() => asked += 1,
                Err(e) => return Err(e),
            }
        };
        let stop = offset + u64::from(len);
        let mut runs: Vec<(u32, bool)> = Vec::new();
        for x in map.extents {
            // Clip block extents to the byte range asked for.
            let s = (x.block * BLOCK).max(offset);
            let e = ((x.block + x.count) * BLOCK).min(stop);
            if e <= s {
                continue;
            }
            runs.push(((e - s) as u32, x.allocated));
        }
        if runs.is_empty() {
            runs.push((len, true));
        }
        Ok(runs)
    }
}
