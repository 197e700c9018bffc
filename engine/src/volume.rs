//! The volume core: aligns client I/O to 4 KiB blocks, orders writes with a
//! volume-wide sequence, fans them out to every healthy replica and collects the
//! acknowledgements, dropping replicas that fail or stall.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tether_proto::replica::{io_request::Op, Flush, Read, Write, Zero};
use tokio::sync::oneshot;

use crate::nbd::{BlockDevice, DeviceError};
use crate::range_lock::RangeLock;
use crate::replica_client::{ReplicaConn, ReplicaError};

/// Block size inside the engine and on the replicas.
pub const BLOCK: u64 = 4096;

/// The engine's I/O counters.
#[derive(Default, Debug)]
pub struct Counters {
    /// Read requests served.
    pub reads: AtomicU64,
    /// Write requests served (including write-zeroes).
    pub writes: AtomicU64,
    /// Flushes served.
    pub flushes: AtomicU64,
    /// Trims served.
    pub trims: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
    /// Bytes read by clients.
    pub bytes_read: AtomicU64,
    /// Bytes written by clients.
    pub bytes_written: AtomicU64,
    /// Client connections accepted.
    pub connections: AtomicU64,
    /// Block copies that failed their checksum on some replica.
    pub checksum_errors: AtomicU64,
}

/// A replicated volume served by this engine.
pub struct Volume {
    name: String,
    size: u64,
    epoch: u64,
    replicas: Vec<Arc<ReplicaConn>>,
    /// Last write sequence handed out; held while a write is queued on every replica,
    /// so all replicas see writes in the same order.
    seq: Mutex<u64>,
    locks: RangeLock,
    next_reader: AtomicUsize,
    timeout: Duration,
    /// Counters shown by `tether volume status`.
    pub counters: Counters,
}

type Waiting = Vec<(
    Arc<ReplicaConn>,
    oneshot::Receiver<Result<Bytes, ReplicaError>>,
)>;

impl Volume {
    /// A volume over `replicas` (healthy ones already streaming), continuing after `seq`.
    pub fn new(
        name: &str,
        size: u64,
        epoch: u64,
        replicas: Vec<Arc<ReplicaConn>>,
        seq: u64,
        timeout: Duration,
    ) -> Volume {
        Volume {
            name: name.to_string(),
            size,
            epoch,
            replicas,
            seq: Mutex::new(seq),
            locks: RangeLock::default(),
            next_reader: AtomicUsize::new(0),
            timeout,
            counters: Counters::default(),
        }
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The engine's epoch on this volume.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// All replicas, healthy or not.
    pub fn replicas(&self) -> &[Arc<ReplicaConn>] {
        &self.replicas
    }

    fn healthy_count(&self) -> usize {
        self.replicas.iter().filter(|r| r.is_healthy()).count()
    }

    fn fail(&self, r: &ReplicaConn, reason: String) {
        if r.mark_failed(reason.clone()) {
            let left = self.healthy_count();
            tracing::info!(volume = %self.name, healthy_left = left, "replica set shrank");
            if left == 0 {
                tracing::error!(volume = %self.name,
                    "no healthy replica left: all I/O fails with EIO until the engine is restarted with a good replica");
            }
        }
    }

    fn no_replica(&self) -> DeviceError {
        DeviceError::Io(format!("volume {}: no healthy replica", self.name))
    }

    /// Queues a sequenced operation on every healthy replica, in one global order.
    fn submit_ordered(&self, make: impl Fn(u64) -> Op) -> Waiting {
        let mut seq = self.seq.lock();
        *seq += 1;
        let op = make(*seq);
        self.replicas
            .iter()
            .filter(|r| r.is_healthy())
            .map(|r| (r.clone(), r.submit(op.clone())))
            .collect()
    }

    /// Waits for every replica's answer; succeeds if all that remain healthy accepted.
    async fn wait_all(&self, waiting: Waiting) -> Result<(), DeviceError> {
        if waiting.is_empty() {
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
                Ok(Ok(Ok(_))) => ok += 1,
                Ok(Ok(Err(ReplicaError::NoSpace(msg)))) => full.push((r, msg)),
                Ok(Ok(Err(e))) => self.fail(&r, e.to_string()),
                Ok(Err(_)) => self.fail(&r, "connection lost".to_string()),
                Err(_) => self.fail(&r, format!("no answer within {timeout:?}")),
            }
        }
        if !full.is_empty() {
            if ok == 0 {
                // Every replica is full: the client gets ENOSPC and all replicas stay,
                // since none of them has the write.
                let msg = full
                    .into_iter()
                    .map(|(_, m)| m)
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(DeviceError::NoSpace(msg));
            }
            for (r, msg) in full {
                self.fail(&r, format!("missed a write others have: {msg}"));
            }
        }
        if ok == 0 {
            return Err(self.no_replica());
        }
        Ok(())
    }

    /// Reads whole blocks from one healthy replica, trying the others on failure.
    /// A block that fails its checksum on one replica is read from another, and the
    /// bad copy is reported; it is never returned.
    async fn read_blocks(&self, block: u64, count: u32) -> Result<Bytes, DeviceError> {
        let n = self.replicas.len();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let mut bad_copies = 0;
        for i in 0..n {
            let r = &self.replicas[(start + i) % n];
            if !r.is_healthy() {
                continue;
            }
            let rx = r.submit(Op::Read(Read { block, count }));
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(Ok(data))) if data.len() == count as usize * BLOCK as usize => {
                    if bad_copies > 0 {
                        tracing::info!(volume = %self.name, replica = %r.addr, block, count,
                            "served a good copy from another replica");
                    }
                    return Ok(data);
                }
                Ok(Ok(Ok(data))) => self.fail(
                    r,
                    format!(
                        "read returned {} bytes, not {}",
                        data.len(),
                        count as u64 * BLOCK
                    ),
                ),
                Ok(Ok(Err(ReplicaError::Checksum(msg)))) => {
                    bad_copies += 1;
                    self.counters
                        .checksum_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume = %self.name, replica = %r.addr, error = %msg,
                        "bad block copy on replica; reading it from another");
                }
                Ok(Ok(Err(e))) => self.fail(r, format!("read failed: {e}")),
                Ok(Err(_)) => self.fail(r, "connection lost".to_string()),
                Err(_) => self.fail(r, format!("no answer within {:?}", self.timeout)),
            }
        }
        if bad_copies > 0 {
            return Err(DeviceError::Io(format!(
                "volume {}: blocks {block}..{} have no good copy on any healthy replica",
                self.name,
                block + u64::from(count)
            )));
        }
        Err(self.no_replica())
    }

    fn blocks_of(offset: u64, len: u64) -> (u64, u64) {
        (offset / BLOCK, (offset + len).div_ceil(BLOCK))
    }

    async fn write_inner(&self, offset: u64, data: Bytes) -> Result<(), DeviceError> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        let (first, end) = Self::blocks_of(offset, len);
        let _guard = self.locks.lock(first, end).await;
        let head = offset % BLOCK;
        let payload = if head == 0 && len.is_multiple_of(BLOCK) {
            data
        } else {
            // Read-modify-write of the partial edge blocks, under the range lock.
            let mut buf = BytesMut::zeroed(((end - first) * BLOCK) as usize);
            let tail_partial = !(offset + len).is_multiple_of(BLOCK);
            let need_head = head != 0;
            let need_tail = tail_partial && (end - 1 != first || !need_head);
            let (h, t) = futures::future::join(
                async {
                    if need_head {
                        self.read_blocks(first, 1).await.map(Some)
                    } else {
                        Ok(None)
                    }
                },
                async {
                    if need_tail {
                        self.read_blocks(end - 1, 1).await.map(Some)
                    } else {
                        Ok(None)
                    }
                },
            )
            .await;
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
        let waiting = self.submit_ordered(|seq| {
            Op::Write(Write {
                seq,
                block: first,
                data: payload.clone(),
            })
        });
        self.wait_all(waiting).await
    }

    async fn flush_inner(&self) -> Result<(), DeviceError> {
        let waiting = {
            let seq = self.seq.lock();
            let op = Op::Flush(Flush { seq: *seq });
            self.replicas
                .iter()
                .filter(|r| r.is_healthy())
                .map(|r| (r.clone(), r.submit(op.clone())))
                .collect()
        };
        self.wait_all(waiting).await
    }

    /// Deallocates the whole blocks inside `[offset, offset+len)`.
    async fn zero_whole_blocks(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let first = offset.div_ceil(BLOCK);
        let end = (offset + len) / BLOCK;
        if end <= first {
            return Ok(());
        }
        let _guard = self.locks.lock(first, end).await;
        let count = u32::try_from(end - first)
            .map_err(|_| DeviceError::Invalid("zero range too large".to_string()))?;
        let waiting = self.submit_ordered(|seq| {
            Op::Zero(Zero {
                seq,
                block: first,
                count,
            })
        });
        self.wait_all(waiting).await
    }

    fn count<T>(&self, r: Result<T, DeviceError>) -> Result<T, DeviceError> {
        if let Err(e) = &r {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(volume = %self.name, error = %e, "request failed");
        }
        r
    }

    /// Flushes and closes every replica stream cleanly.
    pub async fn shutdown(&self) {
        if let Err(e) = self.flush_inner().await {
            tracing::error!(volume = %self.name, error = %e, "final flush failed");
        }
        futures::future::join_all(
            self.replicas
                .iter()
                .map(|r| r.close(Duration::from_secs(5))),
        )
        .await;
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<Bytes>, DeviceError> {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_read
            .fetch_add(u64::from(len), Ordering::Relaxed);
        if len == 0 {
            return Ok(Vec::new());
        }
        let (first, end) = Self::blocks_of(offset, u64::from(len));
        let r = self
            .read_blocks(first, (end - first) as u32)
            .await
            .map(|data| {
                let head = (offset % BLOCK) as usize;
                vec![data.slice(head..head + len as usize)]
            });
        self.count(r)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut r = self.write_inner(offset, data).await;
        if r.is_ok() && fua {
            r = self.flush_inner().await;
        }
        self.count(r)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        let len = u64::from(len);
        let r = async {
            if may_trim {
                // Partial edge blocks get real zeroes; whole blocks are deallocated.
                let first_whole = offset.div_ceil(BLOCK) * BLOCK;
                let end = offset + len;
                let end_whole = (end / BLOCK) * BLOCK;
                if end_whole <= first_whole {
                    self.write_inner(offset, Bytes::from(vec![0u8; len as usize]))
                        .await?;
                } else {
                    if first_whole > offset {
                        let n = (first_whole - offset) as usize;
                        self.write_inner(offset, Bytes::from(vec![0u8; n])).await?;
                    }
                    self.zero_whole_blocks(first_whole, end_whole - first_whole)
                        .await?;
                    if end > end_whole {
                        let n = (end - end_whole) as usize;
                        self.write_inner(end_whole, Bytes::from(vec![0u8; n]))
                            .await?;
                    }
                }
            } else {
                const CHUNK: u64 = 1 << 20;
                let zeroes = Bytes::from(vec![0u8; CHUNK as usize]);
                let mut at = offset;
                while at < offset + len {
                    let n = CHUNK.min(offset + len - at);
                    self.write_inner(at, zeroes.slice(..n as usize)).await?;
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

    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        let r = self.zero_whole_blocks(offset, u64::from(len)).await;
        self.count(r)
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        let r = self.flush_inner().await;
        self.count(r)
    }

    fn connection_opened(&self) {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
    }
}
