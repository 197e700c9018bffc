//! The volume core: aligns client I/O to 4 KiB blocks, orders writes with a
//! volume-wide sequence, fans them out to every healthy replica and collects the
//! acknowledgements, dropping replicas that fail or stall.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tether_proto::replica::{
    io_request::Op, DeleteSnapshotRequest, Expand, Flush, Read, Revert, Snapshot, SnapshotsReply,
    SnapshotsRequest, Write, Zero,
};
use tokio::sync::oneshot;

use crate::crypt::Cipher;
use crate::error::VolumeError;
use crate::range_lock::RangeLock;
use crate::replica_client::{Down, Fence, Payload, ReplicaConn, ReplicaError};

/// Block size inside the engine and on the replicas.
pub use tether_proto::wire::BLOCK_SIZE as BLOCK;

/// Zeroes for WRITE_ZEROES without allocating per request.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// `n` (at most 1 MiB) zero bytes.
fn zeroes(n: u64) -> Bytes {
    Bytes::from_static(&ZEROES[..n as usize])
}

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
    size: AtomicU64,
    epoch: u64,
    /// Writes hold it shared; snapshot, revert and expand hold it exclusively, so
    /// they are one cut through the write stream on every replica.
    gate: tokio::sync::RwLock<()>,
    /// Snapshot names, kept for export lookups.
    snapshot_names: Mutex<Vec<String>>,
    /// NBD clients in transmission right now.
    attached: AtomicU64,
    /// Tripped by the first reply from any replica that a newer engine owns the
    /// volume: nothing is acknowledged after it.
    fence: Arc<Fence>,
    replicas: parking_lot::RwLock<Vec<Arc<ReplicaConn>>>,
    /// Fewer healthy replicas than this: writes fail with EIO.
    min_replicas: usize,
    /// The replica count wanted; fewer healthy means degraded.
    desired: usize,
    /// Identifies this engine process to replicas when it reopens them.
    pub engine_id: u64,
    /// Rebuilds under way, by replica address.
    pub rebuilds: Mutex<HashMap<String, Arc<crate::progress::Progress>>>,
    /// When failed replicas are tried next, by address.
    pub retries: Mutex<HashMap<String, crate::progress::Retry>>,
    /// Last write sequence handed out; held while a write is queued on every replica,
    /// so all replicas see writes in the same order.
    seq: Mutex<u64>,
    locks: RangeLock,
    next_reader: AtomicUsize,
    timeout: Duration,
    /// Counters shown by `tether volume status`.
    pub counters: Counters,
    /// Seals every block before it leaves the engine (encrypted volumes).
    cipher: Option<Arc<Cipher>>,
    /// The encryption parameters, given to replicas created for this volume.
    encryption: String,
    /// Mutual TLS towards replicas, for replicas joining later.
    tls: Option<crate::tls::Identity>,
}

/// The gate (shared) and the range lock over `[start, end)`, held together.
pub struct Held<'a> {
    _gate: tokio::sync::RwLockReadGuard<'a, ()>,
    _range: crate::range_lock::RangeGuard<'a>,
    start: u64,
    end: u64,
}

impl Held<'_> {
    /// Whether `[start, end)` lies inside the held range.
    fn covers(&self, start: u64, end: u64) -> bool {
        self.start <= start && end <= self.end
    }
}

/// Blocks as one replica served them, and the replicas whose copies of them failed
/// their check on the way (to be repaired by whoever holds the blocks).
struct Served {
    data: Bytes,
    good: Arc<ReplicaConn>,
    bad: Vec<Arc<ReplicaConn>>,
}

type Waiting = Vec<(
    Arc<ReplicaConn>,
    oneshot::Receiver<Result<Payload, ReplicaError>>,
)>;

impl Volume {
    /// A volume over `replicas` (healthy ones already streaming), continuing after `seq`;
    /// `fence` is the one the replicas' connections trip.
    pub fn new(
        name: &str,
        size: u64,
        epoch: u64,
        replicas: Vec<Arc<ReplicaConn>>,
        seq: u64,
        timeout: Duration,
        fence: Arc<Fence>,
    ) -> Volume {
        Volume {
            name: name.to_string(),
            size: AtomicU64::new(size),
            epoch,
            gate: tokio::sync::RwLock::new(()),
            snapshot_names: Mutex::new(Vec::new()),
            attached: AtomicU64::new(0),
            fence,
            replicas: parking_lot::RwLock::new(replicas),
            min_replicas: 1,
            desired: 0,
            engine_id: 0,
            rebuilds: Mutex::new(HashMap::new()),
            retries: Mutex::new(HashMap::new()),
            seq: Mutex::new(seq),
            locks: RangeLock::default(),
            next_reader: AtomicUsize::new(0),
            timeout,
            counters: Counters::default(),
            cipher: None,
            encryption: String::new(),
            tls: None,
        }
    }

    /// Encrypts the volume's blocks with `cipher`; `params` are its stored parameters.
    pub fn with_cipher(mut self, cipher: Option<Cipher>, params: String) -> Volume {
        self.cipher = cipher.map(Arc::new);
        self.encryption = params;
        self
    }

    /// Connects to replicas over mutual TLS with `tls`.
    pub fn with_tls(mut self, tls: Option<crate::tls::Identity>) -> Volume {
        self.tls = tls;
        self
    }

    /// The TLS identity for replica connections, if any.
    pub fn tls(&self) -> Option<&crate::tls::Identity> {
        self.tls.as_ref()
    }

    /// The encryption parameters (empty when the volume is not encrypted).
    pub fn encryption(&self) -> &str {
        &self.encryption
    }

    /// How blocks are encrypted, for status output.
    pub fn encryption_summary(&self) -> String {
        match crate::crypt::Params::parse(&self.encryption, &self.name) {
            Ok(p) if self.cipher.is_some() => format!(
                "{} ({})",
                p.cipher,
                if p.kdf == "raw" {
                    "32-byte key"
                } else {
                    "passphrase, argon2id"
                }
            ),
            _ => "none".to_string(),
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

    /// NBD clients attached right now.
    pub fn attached(&self) -> u64 {
        self.attached.load(Ordering::Relaxed)
    }

    /// Sets the replica policy: `min` healthy replicas to accept writes, `desired` in all.
    pub fn with_policy(mut self, min: usize, desired: usize, engine_id: u64) -> Volume {
        self.min_replicas = min.max(1);
        self.desired = desired;
        self.engine_id = engine_id;
        self
    }

    /// Fewer healthy replicas than this fail writes.
    pub fn min_replicas(&self) -> usize {
        self.min_replicas
    }

    /// The wanted number of replicas.
    pub fn desired(&self) -> usize {
        self.desired.max(self.replicas.read().len())
    }

    /// Fewer replicas are healthy than wanted.
    pub fn degraded(&self) -> bool {
        self.healthy_count() < self.desired()
    }

    /// The operation timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A healthy replica to read from or ask.
    pub fn first_healthy(&self) -> Result<Arc<ReplicaConn>, VolumeError> {
        self.replicas
            .read()
            .iter()
            .find(|r| r.is_healthy())
            .cloned()
            .ok_or_else(|| self.no_replica())
    }

    /// Adds a replica to the write set (as a rebuild target, write-only), unless the
    /// operator removed it while its rebuild ran; says whether it joined.
    pub fn join(&self, r: Arc<ReplicaConn>, rebuild: &crate::progress::Progress) -> bool {
        // Under the sequence lock: no write is half-queued while the set changes, and
        // a removal (which takes it too) is either seen here or sees the new member.
        let _seq = self.seq.lock();
        if rebuild.is_cancelled() {
            return false;
        }
        let mut reps = self.replicas.write();
        match reps.iter().position(|x| x.addr == r.addr) {
            Some(i) => reps[i] = r,
            None => reps.push(r),
        }
        true
    }

    /// Turns a rebuilt replica read-write, unless the operator removed it meanwhile.
    pub fn promote(&self, r: &ReplicaConn, rebuild: &crate::progress::Progress) -> bool {
        let _seq = self.seq.lock();
        if rebuild.is_cancelled() || !r.is_writable() {
            return false;
        }
        r.set_rebuilding(false);
        true
    }

    /// Registers a rebuild of `addr`: a `new` replica, or one of the volume's failed
    /// replicas that may be retried. Under the sequence lock, like a removal, so a
    /// removal either stops the rebuild or comes first and prevents it.
    pub fn begin_rebuild(
        &self,
        addr: &str,
        new: bool,
    ) -> Result<Arc<crate::progress::Progress>, String> {
        let _seq = self.seq.lock();
        let mut rebuilds = self.rebuilds.lock();
        if rebuilds.contains_key(addr) {
            return Err(format!("replica {addr} is already rebuilding"));
        }
        if !new {
            let retried = self
                .replica(addr)
                .and_then(|r| r.down())
                .is_some_and(|d| d.retried());
            if !retried {
                return Err(format!("replica {addr} is not one to bring back"));
            }
        }
        let p = Arc::new(crate::progress::Progress::new());
        rebuilds.insert(addr.to_string(), p.clone());
        Ok(p)
    }

    /// Unregisters the rebuild `p` of `addr` (not a later one of the same address).
    pub fn end_rebuild(&self, addr: &str, p: &Arc<crate::progress::Progress>) {
        let mut rebuilds = self.rebuilds.lock();
        if rebuilds.get(addr).is_some_and(|x| Arc::ptr_eq(x, p)) {
            rebuilds.remove(addr);
        }
    }

    /// Removes the replica at `addr` from the volume, stopping its rebuild if one
    /// runs; false if the volume has no such replica.
    pub fn remove(&self, addr: &str) -> bool {
        let _seq = self.seq.lock();
        // A stopped rebuild no longer counts: snapshots and a new `add` may go on.
        let rebuilding = match self.rebuilds.lock().remove(addr) {
            Some(p) => {
                p.cancel();
                true
            }
            None => false,
        };
        self.retries.lock().remove(addr);
        let mut reps = self.replicas.write();
        match reps.iter().position(|x| x.addr == addr) {
            Some(i) => {
                // Also when already out (failed): it must not count as one to bring back.
                reps.remove(i)
                    .set_down(Down::Removed, "removed by the operator".into());
                true
            }
            None => rebuilding,
        }
    }

    /// The replica at `addr`, if the volume has one.
    pub fn replica(&self, addr: &str) -> Option<Arc<ReplicaConn>> {
        self.replicas
            .read()
            .iter()
            .find(|r| r.addr == addr)
            .cloned()
    }

    /// Snapshots and space, as one healthy replica sees them.
    pub async fn space(&self) -> Result<SnapshotsReply, VolumeError> {
        let r = self.first_healthy()?;
        let req = SnapshotsRequest {
            volume: self.name.clone(),
        };
        let reply = tokio::time::timeout(self.timeout, r.client().snapshots(req))
            .await
            .map_err(|_| VolumeError::Io(format!("replica {}: no answer", r.addr)))?
            .map_err(|s| VolumeError::Io(format!("replica {}: {}", r.addr, s.message())))?
            .into_inner();
        *self.snapshot_names.lock() = reply.snapshots.iter().map(|s| s.name.clone()).collect();
        Ok(reply)
    }

    /// Whether snapshot `name` exists (from the last listing).
    pub fn has_snapshot(&self, name: &str) -> bool {
        self.snapshot_names.lock().iter().any(|n| n == name)
    }

    fn require_snapshot(&self, name: &str) -> Result<(), VolumeError> {
        if self.has_snapshot(name) {
            Ok(())
        } else {
            Err(VolumeError::Invalid(format!(
                "volume {}: no snapshot named {name}",
                self.name
            )))
        }
    }

    /// Snapshot names (from the last listing).
    pub fn snapshot_names(&self) -> Vec<String> {
        self.snapshot_names.lock().clone()
    }

    /// Refuses chain-changing operations while a rebuild copies the chain.
    fn no_rebuild(&self, what: &str) -> Result<(), VolumeError> {
        let r = self.rebuilds.lock();
        match r.keys().next() {
            Some(addr) => Err(VolumeError::Invalid(format!(
                "volume {}: replica {addr} is rebuilding; {what} after it finishes (see tether volume status)",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// Takes snapshot `name` on every replica at the same point of the write stream.
    pub async fn snapshot(&self, name: &str) -> Result<(), VolumeError> {
        self.no_rebuild("take the snapshot")?;
        if self.has_snapshot(name) {
            return Err(VolumeError::Invalid(format!(
                "volume {}: a snapshot named {name} already exists",
                self.name
            )));
        }
        let _cut = self.gate.write().await;
        let waiting = self.submit_ordered(|seq| {
            Op::Snapshot(Snapshot {
                seq,
                name: name.to_string(),
            })
        });
        let r = self.wait_all_ops(waiting).await;
        let _ = self.space().await;
        r
    }

    /// Makes the volume's contents those of snapshot `name`; refused while attached.
    pub async fn revert(&self, name: &str) -> Result<(), VolumeError> {
        self.no_rebuild("revert")?;
        let _cut = self.gate.write().await;
        let n = self.attached();
        if n > 0 {
            return Err(VolumeError::Invalid(format!(
                "volume {}: {n} NBD client(s) attached; detach them before reverting (their caches would go stale)",
                self.name
            )));
        }
        self.require_snapshot(name)?;
        let waiting = self.submit_unsequenced(Op::Revert(Revert {
            name: name.to_string(),
        }));
        self.wait_all_ops(waiting).await
    }

    /// Deletes snapshot `name` on every healthy replica; I/O continues meanwhile.
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), VolumeError> {
        self.no_rebuild("delete the snapshot")?;
        self.require_snapshot(name)?;
        let reps = self.replicas();
        let calls = reps.iter().filter(|r| r.is_healthy()).map(|r| {
            let req = DeleteSnapshotRequest {
                volume: self.name.clone(),
                epoch: self.epoch,
                name: name.to_string(),
            };
            async move { (r, r.client().delete_snapshot(req).await) }
        });
        let mut ok = 0;
        let mut last = String::new();
        for (r, res) in futures::future::join_all(calls).await {
            match res {
                Ok(_) => ok += 1,
                Err(s) => {
                    let e = ReplicaError::from_status(&r.addr, &s);
                    last = e.to_string();
                    self.fail_err(r, &e, &format!("deleting snapshot {name} failed: "));
                }
            }
        }
        self.check_fence()?;
        let _ = self.space().await;
        if ok == 0 {
            return Err(VolumeError::Io(format!(
                "volume {}: deleting snapshot {name} failed: {last}",
                self.name
            )));
        }
        Ok(())
    }

    /// Grows the volume; clients see the new size when they reconnect.
    pub async fn expand(&self, size: u64) -> Result<u64, VolumeError> {
        let _cut = self.gate.write().await;
        let cur = self.size.load(Ordering::Acquire);
        if size < cur {
            return Err(VolumeError::Invalid(format!(
                "volume {}: cannot shrink from {cur} to {size} bytes; shrinking is not supported",
                self.name
            )));
        }
        if !size.is_multiple_of(BLOCK) {
            return Err(VolumeError::Invalid(format!(
                "volume {}: size {size} is not a multiple of {BLOCK}",
                self.name
            )));
        }
        let waiting = self.submit_unsequenced(Op::Expand(Expand { size }));
        self.wait_all_ops(waiting).await?;
        self.size.store(size, Ordering::Release);
        tracing::info!(volume = %self.name, size, "volume expanded; clients see it on reconnect");
        Ok(size)
    }

    /// Rewrites blocks that failed their checksum on `bad` replicas with a good copy
    /// from `good`, under the caller's hold of those blocks, so no client write can
    /// interleave and no lock is taken twice. The copy is verbatim (still sealed):
    /// repairs never encrypt anything.
    async fn repair(
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

    /// Queues an operation that changes no block on every healthy replica, in order.
    fn submit_unsequenced(&self, op: Op) -> Waiting {
        let _seq = self.seq.lock();
        self.queue_all(&op)
    }

    /// Queues `op` on every replica that takes writes; the caller holds `seq`.
    fn queue_all(&self, op: &Op) -> Waiting {
        self.replicas
            .read()
            .iter()
            .filter(|r| r.is_writable())
            .map(|r| (r.clone(), r.submit(op.clone())))
            .collect()
    }

    /// Like `wait_all`, but any replica error fails the operation (and the replica).
    async fn wait_all_ops(&self, waiting: Waiting) -> Result<(), VolumeError> {
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
            None => Ok(()),
        }
    }

    /// All replicas, healthy or not.
    pub fn replicas(&self) -> Vec<Arc<ReplicaConn>> {
        self.replicas.read().clone()
    }

    /// Replicas serving reads and counting for acknowledgements.
    pub fn healthy_count(&self) -> usize {
        self.replicas
            .read()
            .iter()
            .filter(|r| r.is_healthy())
            .count()
    }

    /// Whether a newer engine has fenced this one off.
    pub fn is_fenced(&self) -> bool {
        self.fence.is_tripped()
    }

    /// The fence this volume's replica connections trip.
    pub fn fence(&self) -> Arc<Fence> {
        self.fence.clone()
    }

    /// Fails the request if a newer engine has fenced this one off; then every
    /// replica is let go, so nothing more reaches any of them from here.
    fn check_fence(&self) -> Result<(), VolumeError> {
        if !self.fence.is_tripped() {
            return Ok(());
        }
        for r in self.replicas() {
            r.mark_down(
                Down::Fenced,
                "a newer engine owns the volume; stop this engine".into(),
            );
        }
        Err(VolumeError::Fenced(format!(
            "volume {}: a newer engine has taken over this volume; this engine acknowledges nothing more: stop it",
            self.name
        )))
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
                .open(block, &p.data, &p.tags)
                .map_err(|b| self.auth_failed(r, b)),
        }
    }

    fn auth_failed(&self, r: &ReplicaConn, b: u64) -> ReplicaError {
        tracing::error!(volume = %self.name, replica = %r.addr, block = b,
            "block failed authentication (tampered, moved or damaged): not returned");
        ReplicaError::Checksum(format!(
            "volume {}: block {b} on replica {} failed authentication (tampered, moved or damaged); read it from another replica",
            self.name, r.addr
        ))
    }

    /// Checks that a raw copy opens under this volume's key (always true unencrypted).
    fn check_sealed(&self, r: &ReplicaConn, block: u64, p: &Payload) -> Result<(), ReplicaError> {
        match &self.cipher {
            None => Ok(()),
            Some(c) => c
                .open(block, &p.data, &p.tags)
                .map(drop)
                .map_err(|b| self.auth_failed(r, b)),
        }
    }

    /// Reads blocks as stored from `r` and checks that they open under this volume's
    /// key (a copy that does not is a checksum error naming the block).
    async fn read_checked_from(
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

    /// Reads blocks as stored (ciphertext and seals) from replica `r`.
    pub async fn read_raw_from(
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

    /// Drops `r` for the error it answered with; a fencing answer also trips the fence.
    fn fail_err(&self, r: &ReplicaConn, e: &ReplicaError, what: &str) {
        if let ReplicaError::Fenced(m) = e {
            self.fence.trip(&r.addr, m);
        }
        self.drop_replica(r, e.down(), format!("{what}{e}"));
    }

    fn fail(&self, r: &ReplicaConn, reason: String) {
        self.drop_replica(r, Down::Failed, reason)
    }

    fn drop_replica(&self, r: &ReplicaConn, kind: Down, reason: String) {
        if r.mark_down(kind, reason) {
            let left = self.healthy_count();
            tracing::info!(volume = %self.name, healthy_left = left, "replica set shrank");
            if left == 0 {
                tracing::error!(volume = %self.name,
                    "no healthy replica left: all I/O fails with EIO until the engine is restarted with a good replica");
            }
        }
    }

    fn no_replica(&self) -> VolumeError {
        VolumeError::Io(format!("volume {}: no healthy replica", self.name))
    }

    /// Refuses writes while fewer than `--min-replicas` replicas are healthy.
    fn check_quorum(&self) -> Result<(), VolumeError> {
        let n = self.healthy_count();
        if n < self.min_replicas {
            return Err(VolumeError::Io(format!(
                "volume {}: {n} healthy replica(s), below --min-replicas {}; writes are refused rather than kept on too few copies",
                self.name, self.min_replicas
            )));
        }
        Ok(())
    }

    /// Queues a sequenced operation on every healthy replica, in one global order.
    fn submit_ordered(&self, make: impl Fn(u64) -> Op) -> Waiting {
        let mut seq = self.seq.lock();
        *seq += 1;
        self.queue_all(&make(*seq))
    }

    /// Waits for every replica's answer; succeeds if all that remain healthy accepted.
    async fn wait_all(&self, waiting: Waiting) -> Result<(), VolumeError> {
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
        Ok(())
    }

    /// Reads whole blocks from one healthy replica, trying the others on failure.
    /// A block that fails its checksum on one replica is read from another, and the
    /// bad copy is reported in the answer for the caller to repair; it is never
    /// returned. Takes no lock: callers may hold the blocks already.
    async fn read_blocks_of(
        &self,
        snapshot: &str,
        block: u64,
        count: u32,
    ) -> Result<Served, VolumeError> {
        let n = self.replicas.read().len();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
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

    fn blocks_of(offset: u64, len: u64) -> (u64, u64) {
        (offset / BLOCK, (offset + len).div_ceil(BLOCK))
    }

    async fn write_inner(&self, offset: u64, data: Bytes) -> Result<(), VolumeError> {
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
        self.wait_all(waiting).await
    }

    async fn flush_inner(&self) -> Result<(), VolumeError> {
        self.check_fence()?;
        let waiting = {
            let seq = self.seq.lock();
            self.queue_all(&Op::Flush(Flush { seq: *seq }))
        };
        self.wait_all(waiting).await
    }

    /// Deallocates the whole blocks inside `[offset, offset+len)`.
    async fn zero_whole_blocks(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let first = offset.div_ceil(BLOCK);
        let end = (offset + len) / BLOCK;
        if end <= first {
            return Ok(());
        }
        self.check_fence()?;
        let _held = self.hold(first, end).await;
        let count = u32::try_from(end - first)
            .map_err(|_| VolumeError::Invalid("zero range too large".to_string()))?;
        self.check_quorum()?;
        let waiting = self.submit_ordered(|seq| {
            Op::Zero(Zero {
                seq,
                block: first,
                count,
            })
        });
        self.wait_all(waiting).await
    }

    fn count<T>(&self, r: Result<T, VolumeError>) -> Result<T, VolumeError> {
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
        let reps = self.replicas();
        futures::future::join_all(reps.iter().map(|r| r.close(Duration::from_secs(5)))).await;
    }
}

/// Client I/O: what a frontend (NBD today) asks of the volume.
impl Volume {
    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
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

    /// Writes `data` at `offset`; with `fua`, durably.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
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

    /// Writes zeroes; `may_trim` lets the volume deallocate instead.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        let len = u64::from(len);
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
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        let r = self.zero_whole_blocks(offset, u64::from(len)).await;
        self.count(r)
    }

    /// Makes every completed write durable on every replica.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        let r = self.flush_inner().await;
        self.count(r)
    }

    /// Allocation of `[offset, offset+len)` as runs of (length, allocated).
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, bool)>, VolumeError> {
        let (first, end) = Self::blocks_of(offset, u64::from(len));
        let r = self.first_healthy()?;
        let req = tether_proto::replica::MapRequest {
            volume: self.name.clone(),
            block: first,
            count: end - first,
        };
        let map = tokio::time::timeout(self.timeout, r.client().map(req))
            .await
            .map_err(|_| VolumeError::Io(format!("replica {}: no answer", r.addr)))?
            .map_err(|s| VolumeError::Io(format!("replica {}: {}", r.addr, s.message())))?
            .into_inner();
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

    /// A client connected.
    pub fn connection_opened(&self) {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        self.attached.fetch_add(1, Ordering::Relaxed);
    }

    /// A client went away.
    pub fn connection_closed(&self) {
        self.attached.fetch_sub(1, Ordering::Relaxed);
    }
}
