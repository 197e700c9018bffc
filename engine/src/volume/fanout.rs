//! Fan-out and acknowledgement: every write, zero, trim and flush goes to every
//! writable replica in one order, and is acknowledged only when all of them have it.

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use tether_proto::replica::{io_request::Op, Flush, Write, Zero};
use tokio::sync::oneshot;

use super::{zeroes, Volume, Waiting, BLOCK, ZEROES};
use crate::error::VolumeError;
use crate::replica::{Payload, ReplicaConn, ReplicaError};

impl Volume {
    /// Queues an operation that changes no block on every healthy replica, in order.
    pub(super) fn submit_unsequenced(&self, op: Op) -> Waiting {
        let _seq = self.seq.lock();
        self.queue_all(&op)
    }

    /// Queues `op` on every replica that takes writes; the caller holds `seq`.
    pub(super) fn queue_all(&self, op: &Op) -> Waiting {
        self.replicas
            .read()
            .iter()
            .filter(|r| r.is_writable())
            .map(|r| (r.clone(), r.submit(op.clone())))
            .collect()
    }

    /// Like `wait_all`, but any replica error fails the operation (and the replica).
    pub(super) async fn wait_all_ops(&self, waiting: Waiting) -> Result<(), VolumeError> {
        if waiting.is_empty() {
            self.check_fence()?;
            return Err(self.no_replica());
        }
        let mut first_err = None;
        let mut ok = 0;
        for (r, rx) in waiting {
            match tokio::time::timeout(self.timeout.max(std::time::Duration::from_secs(60)), rx)
                .await
            {
                Ok(Ok(Ok(_))) => ok += 1,
                Ok(Ok(Err(e @ (ReplicaError::Fenced(_) | ReplicaError::Poisoned(_))))) => {
                    self.fail_err(&r, &e, "");
                }
                Ok(Ok(Err(e))) => {
                    first_err.get_or_insert(e.to_string());
                }
                Ok(Err(_)) => self.fail(&r, "connection lost".to_string()),
                Err(_) => self.fail(&r, "no answer".to_string()),
            }
        }
        self.check_fence()?;
        match first_err {
            // A refusal (bad name, missing snapshot) is the same on every replica.
            Some(e) if ok == 0 => Err(VolumeError::Invalid(e)),
            Some(e) => {
                for r in self.replicas().iter().filter(|r| r.is_healthy()) {
                    tracing::warn!(volume = %self.name, replica = %r.addr, error = %e, "replicas disagree on an operation");
                }
                Err(VolumeError::Io(e))
            }
            None if ok == 0 => Err(self.no_replica()),
            None => self.record_drops().await,
        }
    }

    /// Queues a sequenced operation on every healthy replica, in one global order.
    pub(super) fn submit_ordered(&self, make: impl Fn(u64) -> Op) -> Waiting {
        let mut seq = self.seq.lock();
        *seq += 1;
        let op = make(*seq);
        let blocks = match &op {
            Op::Write(w) => Some((w.block, w.block + w.data.len() as u64 / BLOCK)),
            Op::Zero(z) => Some((z.block, z.block + u64::from(z.count))),
            _ => None,
        };
        if let Some((s, e)) = blocks {
            self.unflushed.lock().wrote(s, e, *seq);
        }
        self.queue_all(&op)
    }

    /// Queues `make(seq)` on `r`'s stream alone, where `seq` is the newest write
    /// sequence sent: every write up to it is ahead of it on the stream, every later
    /// one behind.
    pub fn submit_at_seq(
        &self,
        r: &ReplicaConn,
        make: impl FnOnce(u64) -> Op,
    ) -> oneshot::Receiver<Result<Payload, ReplicaError>> {
        let seq = self.seq.lock();
        r.submit(make(*seq))
    }

    /// Waits for every replica's answer; succeeds if all that remain healthy accepted.
    pub(super) async fn wait_all(&self, waiting: Waiting) -> Result<(), VolumeError> {
        if waiting.is_empty() {
            self.check_fence()?;
            return Err(self.no_replica());
        }
        let timeout = self.timeout;
        let answers = futures::future::join_all(
            waiting
                .into_iter()
                .map(|(r, rx)| async move { (r, tokio::time::timeout(timeout, rx).await) }),
        )
        .await;
        let mut ok = 0;
        let mut full = Vec::new();
        for (r, answer) in answers {
            match answer {
                // A rebuilding replica must take every write, but does not count yet.
                Ok(Ok(Ok(_))) if r.is_healthy() => ok += 1,
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(ReplicaError::NoSpace(msg)))) => full.push((r, msg)),
                Ok(Ok(Err(e))) => self.fail_err(&r, &e, ""),
                Ok(Err(_)) => self.fail(&r, "connection lost".to_string()),
                Err(_) => self.fail(&r, format!("no answer within {timeout:?}")),
            }
        }
        // After every answer is in: a fencing reply from any replica, even one whose
        // write others accepted, means this write is not acknowledged.
        self.check_fence()?;
        if !full.is_empty() {
            if ok == 0 {
                // Every replica is full: the client gets ENOSPC and all replicas stay,
                // since none of them has the write.
                let msg = full
                    .into_iter()
                    .map(|(_, m)| m)
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(VolumeError::NoSpace(msg));
            }
            for (r, msg) in full {
                self.fail(&r, format!("missed a write others have: {msg}"));
            }
        }
        if ok == 0 {
            return Err(self.no_replica());
        }
        if ok < self.min_replicas {
            return Err(VolumeError::Io(format!(
                "volume {}: only {ok} healthy replica(s) took the write, below --min-replicas {}",
                self.name, self.min_replicas
            )));
        }
        // A replica that missed this write must be out of the in-sync set, durably,
        // before the write is acknowledged.
        self.record_drops().await?;
        Ok(())
    }

    pub(super) fn blocks_of(offset: u64, len: u64) -> (u64, u64) {
        (offset / BLOCK, (offset + len).div_ceil(BLOCK))
    }

    pub(super) async fn write_inner(&self, offset: u64, data: Bytes) -> Result<(), VolumeError> {
        self.write_then(offset, data, false).await
    }

    /// Writes `data` at `offset`; with `fua`, a flush follows it onto every replica's
    /// stream at once, so making it durable costs no second round trip.
    async fn write_then(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        self.check_fence()?;
        let (first, end) = Self::blocks_of(offset, len);
        let held = self.hold(first, end).await;
        let head = offset % BLOCK;
        let payload = if head == 0 && len.is_multiple_of(BLOCK) {
            data
        } else {
            // Read-modify-write of the partial edge blocks, under the range lock.
            let mut buf = BytesMut::zeroed(((end - first) * BLOCK) as usize);
            let tail_partial = !(offset + len).is_multiple_of(BLOCK);
            let need_head = head != 0;
            let need_tail = tail_partial && (end - 1 != first || !need_head);
            // Bad copies met here are repaired under this write's own hold: taking
            // the range again would wait on itself.
            let edge = |b: u64, needed: bool| {
                let held = &held;
                async move {
                    if !needed {
                        return Ok(None);
                    }
                    let served = self.read_blocks_of("", b, 1).await?;
                    if !served.bad.is_empty() {
                        self.repair(held, &served.good, &served.bad, b, 1).await;
                    }
                    Ok::<_, VolumeError>(Some(served.data))
                }
            };
            let (h, t) =
                futures::future::join(edge(first, need_head), edge(end - 1, need_tail)).await;
            let blk = BLOCK as usize;
            if let Some(h) = h? {
                buf[..blk].copy_from_slice(&h);
            }
            if let Some(t) = t? {
                let at = buf.len() - blk;
                buf[at..].copy_from_slice(&t);
            }
            buf[head as usize..head as usize + data.len()].copy_from_slice(&data);
            buf.freeze()
        };
        self.check_quorum()?;
        let (payload, tags) = match &self.cipher {
            None => (payload, Bytes::new()),
            Some(c) => c
                .seal(first, payload)
                .map_err(|e| VolumeError::Io(format!("volume {}: {e}", self.name)))?,
        };
        let waiting = self.submit_ordered(|seq| {
            Op::Write(Write {
                seq,
                block: first,
                data: payload.clone(),
                tags: tags.clone(),
            })
        });
        // Queued behind the write on every stream (each applies in order), before
        // either is answered.
        let flush = fua.then(|| self.queue_flush());
        self.wait_all(waiting).await?;
        match flush {
            Some((waiting, upto)) => self.wait_flush(waiting, upto).await,
            None => Ok(()),
        }
    }

    pub(super) async fn flush_inner(&self) -> Result<(), VolumeError> {
        self.check_fence()?;
        let (waiting, upto) = self.queue_flush();
        self.wait_flush(waiting, upto).await
    }

    /// Queues a flush of every write sequenced so far on every replica that takes
    /// writes; returns the waiters and the sequence number it covers.
    fn queue_flush(&self) -> (Waiting, u64) {
        let seq = self.seq.lock();
        (self.queue_all(&Op::Flush(Flush { seq: *seq })), *seq)
    }

    /// Waits for a flush from `queue_flush`.
    async fn wait_flush(&self, waiting: Waiting, upto: u64) -> Result<(), VolumeError> {
        self.wait_all(waiting).await?;
        // Every replica still in sync made writes up to `upto` durable, and every one
        // that left was given them in its `Away` before this flush counted.
        self.unflushed.lock().flushed(upto);
        Ok(())
    }

    /// Deallocates the whole blocks inside `[offset, offset+len)`.
    pub(super) async fn zero_whole_blocks(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let first = offset.div_ceil(BLOCK);
        let end = (offset + len) / BLOCK;
        if end <= first {
            return Ok(());
        }
        self.check_fence()?;
        let _held = self.hold(first, end).await;
        self.check_quorum()?;
        // One request per 2^31 blocks (8 TiB): extended headers allow 64-bit lengths.
        let mut block = first;
        while block < end {
            let count = (end - block).min(1 << 31) as u32;
            let waiting = self.submit_ordered(|seq| Op::Zero(Zero { seq, block, count }));
            self.wait_all(waiting).await?;
            block += u64::from(count);
        }
        Ok(())
    }

    pub(super) fn count<T>(&self, r: Result<T, VolumeError>) -> Result<T, VolumeError> {
        if let Err(e) = &r {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(volume = %self.name, error = %e, "request failed");
        }
        r
    }

    /// Writes `data` at `offset`; with `fua`, durably.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let r = self.write_then(offset, data, fua).await;
        self.count(r)
    }

    /// Writes zeroes; `may_trim` lets the volume deallocate instead.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        let r = async {
            if may_trim {
                // Partial edge blocks get real zeroes; whole blocks are deallocated.
                let end = offset + len;
                let head_end = (offset.div_ceil(BLOCK) * BLOCK).min(end);
                if head_end > offset {
                    self.write_inner(offset, zeroes(head_end - offset)).await?;
                }
                self.zero_whole_blocks(offset, len).await?;
                let tail = (end / BLOCK * BLOCK).max(head_end);
                if end > tail {
                    self.write_inner(tail, zeroes(end - tail)).await?;
                }
            } else {
                let mut at = offset;
                while at < offset + len {
                    let n = (ZEROES.len() as u64).min(offset + len - at);
                    self.write_inner(at, zeroes(n)).await?;
                    at += n;
                }
            }
            if fua {
                self.flush_inner().await?;
            }
            Ok(())
        }
        .await;
        self.count(r)
    }

    /// Discards whole blocks of a range.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        let r = self.zero_whole_blocks(offset, len).await;
        self.count(r)
    }

    /// Makes every completed write durable on every replica.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        let r = self.flush_inner().await;
        self.count(r)
    }
}
