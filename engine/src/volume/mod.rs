//! The volume core: aligns client I/O to 4 KiB blocks, orders writes with a
//! volume-wide sequence, fans them out to every healthy replica and collects the
//! acknowledgements, dropping replicas that fail or stall.
//!
//! This file holds the volume's state and its replica set (who is in, who is out, the
//! fence); the rest is one concern per file:
//! - `fanout`: writes, zeroes, trims and flushes sent to every replica, and the
//!   acknowledgement rule;
//! - `read`: reads from one replica, checked, with repair of bad copies, and verify;
//! - `admin`: snapshot, revert, delete a snapshot, expand;
//! - `generation`: recording membership changes while serving;
//! - `lease`: the read lease, so an engine a newer one replaced answers no read.
//!
//! Opening a volume (choosing whom to serve from) is `crate::open`; rebuilding a
//! replica is `crate::rebuild`, which uses this module and is not used by it.

mod admin;
pub mod allocation;
mod fanout;
pub mod generation;
pub mod lease;
mod read;
mod unflushed;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::crypt::Cipher;
use crate::error::VolumeError;
use crate::range_lock::RangeLock;
use crate::replica::{Connector, Down, Fence, Payload, ReplicaConn, ReplicaError};

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
    /// Prefetch hints passed to a replica.
    pub cache_requests: AtomicU64,
    /// Blocks replicas held and read ahead for them.
    pub cache_blocks: AtomicU64,
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
    /// What was written since the last flush every in-sync replica made (taken while
    /// holding `seq`).
    unflushed: Mutex<unflushed::Unflushed>,
    locks: RangeLock,
    next_reader: AtomicUsize,
    timeout: Duration,
    /// Counters shown by `tether volume status`.
    pub counters: Counters,
    /// Seals every block before it leaves the engine (encrypted volumes).
    cipher: Option<Arc<Cipher>>,
    /// The encryption parameters, given to replicas created for this volume.
    encryption: String,
    /// Reaches replicas that join later.
    connector: Arc<dyn Connector>,
    /// The membership generation this engine serves under (`None` until recorded).
    generation: Mutex<Option<crate::membership::Generation>>,
    /// Generations this engine sent since the last one that counted: any may be on
    /// some replicas, and a later engine may adopt any of them (whichever is the newest
    /// it finds), so the next change builds on the newest, and every replica one of
    /// them counts in sync is treated as in sync until a change counts.
    uncounted: Mutex<Option<generation::Uncounted>>,
    /// One membership change at a time.
    recording: tokio::sync::Mutex<()>,
    /// One renewal of the read lease at a time.
    renewing: tokio::sync::Mutex<()>,
    /// How many replicas the current generation has in sync.
    in_sync_count: AtomicUsize,
    /// How long I/O waits for a membership change to count before it fails.
    quorum_wait: Duration,
    /// Bytes per second a rebuild may copy (0: no limit).
    rebuild_rate: u64,
    /// Why I/O is held right now, while a needed membership change does not count.
    io_held: Mutex<Option<String>>,
    /// Every salvage in the volume's generation history, in words.
    salvages: Vec<String>,
    /// A restore writes the whole volume: no client may attach meanwhile.
    restoring: std::sync::atomic::AtomicBool,
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
            unflushed: Mutex::new(unflushed::Unflushed::new(false)),
            locks: RangeLock::default(),
            next_reader: AtomicUsize::new(0),
            timeout,
            counters: Counters::default(),
            cipher: None,
            encryption: String::new(),
            connector: Arc::new(crate::replica::GrpcConnector {
                timeout: timeout.min(Duration::from_secs(5)),
                tls: None,
            }),
            generation: Mutex::new(None),
            uncounted: Mutex::new(None),
            recording: tokio::sync::Mutex::new(()),
            renewing: tokio::sync::Mutex::new(()),
            in_sync_count: AtomicUsize::new(0),
            quorum_wait: Duration::from_secs(30),
            rebuild_rate: 0,
            io_held: Mutex::new(None),
            salvages: Vec::new(),
            restoring: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Says that every replica served from was closed cleanly: none holds an earlier
    /// engine's unflushed writes, so a replica that leaves before this engine's first
    /// flush can still be given exactly what it may lack (`Op::Away`).
    pub fn with_clean_start(self, clean: bool) -> Volume {
        *self.unflushed.lock() = unflushed::Unflushed::new(clean);
        self
    }

    /// Limits rebuilds to `bytes` per second (0: no limit), so one does not starve
    /// client I/O.
    pub fn with_rebuild_rate(mut self, bytes: u64) -> Volume {
        self.rebuild_rate = bytes;
        self
    }

    /// Bytes per second a rebuild may copy (0: no limit).
    pub fn rebuild_rate(&self) -> u64 {
        self.rebuild_rate
    }

    /// Encrypts the volume's blocks with `cipher`; `params` are its stored parameters.
    pub fn with_cipher(mut self, cipher: Option<Cipher>, params: String) -> Volume {
        self.cipher = cipher.map(Arc::new);
        self.encryption = params;
        self
    }

    /// Serves under membership generation `g`, waiting up to `quorum_wait` for a
    /// change to count before failing I/O.
    pub fn with_generation(
        mut self,
        g: Option<crate::membership::Generation>,
        quorum_wait: Duration,
    ) -> Volume {
        self.in_sync_count = AtomicUsize::new(g.as_ref().map_or(0, |g| g.in_sync.len()));
        self.generation = Mutex::new(g);
        self.quorum_wait = quorum_wait;
        self
    }

    /// Reaches replicas that join later through `connector` (gRPC, with or without
    /// TLS, or in memory).
    pub fn with_connector(mut self, connector: Arc<dyn Connector>) -> Volume {
        self.connector = connector;
        self
    }

    /// How replicas that join later are reached.
    pub fn connector(&self) -> &dyn Connector {
        &*self.connector
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

    /// A healthy replica to read from or ask: the one in this process when it is.
    pub fn first_healthy(&self) -> Result<Arc<ReplicaConn>, VolumeError> {
        let reps = self.replicas.read();
        // The one in this process first: reading it costs no network hop.
        reps.iter()
            .find(|r| r.is_healthy() && r.is_local())
            .or_else(|| reps.iter().find(|r| r.is_healthy()))
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

    /// A unary call to replica `r`, within the timeout; a fencing refusal trips the
    /// fence, as a stream reply's does.
    async fn ask<T>(
        &self,
        r: &ReplicaConn,
        call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, VolumeError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(s)) => {
                r.check_fenced(&s);
                Err(VolumeError::Io(format!(
                    "replica {}: {}",
                    r.addr,
                    s.message()
                )))
            }
            Err(_) => Err(VolumeError::Io(format!(
                "replica {}: no answer within {:?}",
                r.addr, self.timeout
            ))),
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

    /// Flushes and closes every replica stream cleanly.
    pub async fn shutdown(&self) {
        if let Err(e) = self.flush_inner().await {
            tracing::error!(volume = %self.name, error = %e, "final flush failed");
        }
        let reps = self.replicas();
        futures::future::join_all(reps.iter().map(|r| r.close(Duration::from_secs(5)))).await;
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
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

    /// Starts a restore over the whole volume: refused while a client is attached
    /// (it would read a volume changing under it); no client attaches until the
    /// guard drops.
    pub fn begin_restore(self: &Arc<Self>) -> Result<Restoring, VolumeError> {
        if self.restoring.swap(true, Ordering::SeqCst) {
            return Err(VolumeError::Invalid(format!(
                "volume {}: a restore into it is already running",
                self.name
            )));
        }
        let guard = Restoring(self.clone());
        let n = self.attached.load(Ordering::SeqCst);
        if n > 0 {
            return Err(VolumeError::Invalid(format!(
                "volume {}: {n} client(s) attached; a restore would change the volume under them: disconnect them first, or restore into a new volume",
                self.name
            )));
        }
        Ok(guard)
    }

    /// Whether a restore is writing the volume.
    pub fn is_restoring(&self) -> bool {
        self.restoring.load(Ordering::SeqCst)
    }
}

/// A restore in progress over a volume; clients may attach again once it drops.
pub struct Restoring(Arc<Volume>);

impl Restoring {
    /// The volume being restored.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.0
    }
}

impl Drop for Restoring {
    fn drop(&mut self) {
        self.0.restoring.store(false, Ordering::SeqCst);
    }
}
