//! One replica of the volume as the engine sees it: its state (healthy, rebuilding,
//! failed with a reason), the fence all replicas share, and the ordered I/O stream,
//! with requests batched onto it and replies matched back to their callers by id.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use tether_proto::replica::{
    io_request::Op, DeleteSnapshotReply, DeleteSnapshotRequest, ErrorCode, HashesReply,
    HashesRequest, IoBatch, IoRequest, MapReply, MapRequest, OpenReply, OpenRequest,
    RecordGenerationReply, RecordGenerationRequest, SnapshotsReply, SnapshotsRequest,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use super::link::{Inbound, NoLink, Outbound, ReplicaLink};

/// A batch stops growing past this many payload bytes.
const BATCH_BYTES: usize = 4 << 20;
/// A batch stops growing past this many requests.
const BATCH_REQUESTS: usize = 512;

/// Why a request to a replica failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaError {
    /// The replica answered with an error.
    #[error("{0}")]
    Replica(String),
    /// The replica's disk is full.
    #[error("{0}")]
    NoSpace(String),
    /// A newer engine owns the volume.
    #[error("{0}")]
    Fenced(String),
    /// A block failed its checksum there; other blocks are fine.
    #[error("{0}")]
    Checksum(String),
    /// The connection failed or the replica was dropped.
    #[error("{0}")]
    Gone(String),
    /// An fdatasync failed there: it refuses writes until a rebuild reopens it.
    #[error("{0}")]
    Poisoned(String),
}

impl ReplicaError {
    /// The error a replica's typed code stands for.
    pub fn from_code(code: Option<ErrorCode>, message: String) -> ReplicaError {
        match code {
            Some(ErrorCode::NoSpace) => ReplicaError::NoSpace(message),
            Some(ErrorCode::Fenced) => ReplicaError::Fenced(message),
            Some(ErrorCode::Checksum) => ReplicaError::Checksum(message),
            Some(ErrorCode::Poisoned) => ReplicaError::Poisoned(message),
            _ => ReplicaError::Replica(message),
        }
    }

    /// The error a unary call's status stands for, by its typed code.
    pub fn from_status(addr: &str, s: &tonic::Status) -> ReplicaError {
        match tether_proto::wire::code_of(s) {
            None => ReplicaError::Gone(format!("replica {addr}: {}", s.message())),
            code => ReplicaError::from_code(code, format!("replica {addr}: {}", s.message())),
        }
    }

    /// What the engine does with the replica that answered this.
    pub fn down(&self) -> Down {
        match self {
            ReplicaError::Fenced(_) => Down::Fenced,
            ReplicaError::Poisoned(_) => Down::Poisoned,
            _ => Down::Failed,
        }
    }
}

/// The three phases of a replica, stored in one atomic.
#[repr(u8)]
#[derive(Clone, Copy)]
enum Phase {
    Healthy = 0,
    Rebuilding = 1,
    Failed = 2,
}

/// Where a replica stands, as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaState {
    /// In the read-write set: serves reads and counts for acknowledgements.
    Healthy,
    /// Takes every write while its rebuild copies the rest; serves no reads yet.
    Rebuilding,
    /// Out of the volume, for `kind` of reason.
    Failed {
        /// What the engine does about it.
        kind: Down,
        /// What went wrong, for people.
        reason: String,
    },
}

impl ReplicaState {
    /// "healthy", "rebuilding" or "failed", as status shows it.
    pub fn name(&self) -> &'static str {
        match self {
            ReplicaState::Healthy => "healthy",
            ReplicaState::Rebuilding => "rebuilding",
            ReplicaState::Failed { .. } => "failed",
        }
    }
}

/// Why a replica is out of the volume; what the engine does next depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// Errors, timeouts, unreachable or stale: rebuilt once it answers again.
    Failed,
    /// Its disk failed a sync: rebuilt (the replica reopens it from disk), with
    /// growing pauses between attempts while the disk keeps failing.
    Poisoned,
    /// A newer engine owns the volume there: never retried by this engine.
    Fenced,
    /// The operator removed it: never retried.
    Removed,
    /// This engine is stopping.
    Stopped,
}

impl Down {
    /// Whether the engine should try to bring the replica back by itself.
    pub fn retried(self) -> bool {
        matches!(self, Down::Failed | Down::Poisoned)
    }
}

/// Set by the first reply, from any replica, that says a newer engine owns the
/// volume. From then on this engine acknowledges nothing: every write, flush and
/// read that has not been answered fails with EIO.
pub struct Fence {
    volume: String,
    tripped: AtomicBool,
}

impl Fence {
    /// A fence for `volume`, not tripped.
    pub fn new(volume: &str) -> Arc<Fence> {
        Arc::new(Fence {
            volume: volume.to_string(),
            tripped: AtomicBool::new(false),
        })
    }

    /// Records that `replica` refused this engine's epoch; logs the first time.
    pub fn trip(&self, replica: &str, why: &str) {
        if !self.tripped.swap(true, Ordering::SeqCst) {
            tracing::error!(volume = %self.volume, %replica, error = %why,
                "a newer engine has taken over this volume: this engine's I/O now fails with EIO; stop it");
        }
    }

    /// Whether a newer engine has fenced this one off.
    pub fn is_tripped(&self) -> bool {
        self.tripped.load(Ordering::SeqCst)
    }
}

/// What a replica returns for a request: block data and, on encrypted volumes, the
/// blocks' seals.
#[derive(Debug, Clone, Default)]
pub struct Payload {
    /// Whole blocks (ciphertext on encrypted volumes).
    pub data: Bytes,
    /// `crypt::SEAL` bytes per block on encrypted volumes, else empty.
    pub tags: Bytes,
    /// For a prefetch: blocks the replica held and read ahead.
    pub blocks: u64,
}

/// A request's waiter, with when it was sent.
type Pending = (Instant, oneshot::Sender<Result<Payload, ReplicaError>>);

/// One replica of the volume, as the engine sees it.
pub struct ReplicaConn {
    /// Address as given on the command line.
    pub addr: String,
    volume: String,
    link: Arc<dyn ReplicaLink>,
    tx: mpsc::UnboundedSender<IoRequest>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<IoRequest>>>,
    /// Ordered, so failing them all wakes their waiters in one order (a simulation
    /// replays).
    pending: Mutex<BTreeMap<u64, Pending>>,
    /// When the latest request was sent that the replica answered without error (it
    /// held this engine's epoch then: every request is checked against it), as
    /// nanoseconds after `born` plus one; 0 if none. An atomic: every reply sets it.
    confirmed: AtomicU64,
    born: Instant,
    next_id: AtomicU64,
    /// `Phase` as a number: read on every request, so an atomic, not a lock.
    phase: AtomicU8,
    /// Why the replica is out, once it is.
    down: Mutex<(Down, String)>,
    fence: Arc<Fence>,
    close: Arc<Notify>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The copy of the volume there, as its last open said (0 until one did).
    copy: AtomicU64,
    /// The replica process that answered the last open (0 until one did).
    boot: AtomicU64,
}

/// A unary reply, which names the replica process that sent it (`OpenReply.boot`).
trait FromProcess {
    fn boot(&self) -> u64;
}

macro_rules! from_process {
    ($($t:ty),*) => {
        $(impl FromProcess for $t {
            fn boot(&self) -> u64 {
                self.boot
            }
        })*
    };
}

from_process!(SnapshotsReply, DeleteSnapshotReply, MapReply, HashesReply);

impl ReplicaConn {
    /// A connection to `addr` for `volume`; the stream opens with [`ReplicaConn::start`].
    /// A fencing reply on it trips `fence`.
    pub fn new(
        addr: &str,
        volume: &str,
        link: Arc<dyn ReplicaLink>,
        fence: Arc<Fence>,
    ) -> Arc<ReplicaConn> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(ReplicaConn {
            addr: addr.to_string(),
            volume: volume.to_string(),
            fence,
            link,
            tx,
            rx: Mutex::new(Some(rx)),
            pending: Mutex::new(BTreeMap::new()),
            confirmed: AtomicU64::new(0),
            born: Instant::now(),
            next_id: AtomicU64::new(1),
            phase: AtomicU8::new(Phase::Healthy as u8),
            down: Mutex::new((Down::Failed, String::new())),
            close: Arc::new(Notify::new()),
            reader: Mutex::new(None),
            copy: AtomicU64::new(0),
            boot: AtomicU64::new(0),
        })
    }

    /// A connection that is failed from the start (unreachable, stale, fenced).
    pub fn failed(addr: &str, volume: &str, fence: Arc<Fence>, reason: String) -> Arc<ReplicaConn> {
        let link = Arc::new(NoLink(reason.clone()));
        let c = ReplicaConn::new(addr, volume, link, fence);
        c.mark_failed(reason);
        c
    }

    /// Whether the replica lives in this process (reads prefer it).
    pub fn is_local(&self) -> bool {
        self.link.is_local()
    }

    /// Fails when a reply came from another process than the one this engine
    /// opened: a replica restarted since may have lost writes it acknowledged, so what
    /// it says about the volume (a map, hashes, snapshots) is not the copy the engine
    /// has been writing to. Once the stream runs, the replica is also dropped, to be
    /// rebuilt.
    fn same_process(&self, boot: u64) -> Result<(), tonic::Status> {
        let want = self.boot.load(Ordering::Relaxed);
        if want == 0 || boot == 0 || want == boot {
            return Ok(());
        }
        let why = format!(
            "replica {} restarted after this engine opened it, so it may lack writes it acknowledged; it is dropped and rebuilt",
            self.addr
        );
        if self.rx.lock().is_none() {
            self.mark_failed(why.clone());
        }
        Err(tether_proto::wire::status(ErrorCode::Restarted, why))
    }

    /// `call`'s reply, if the process this engine opened sent it.
    async fn answer<T: FromProcess>(
        &self,
        call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let r = call.await?;
        self.same_process(r.boot())?;
        Ok(r)
    }

    /// Stores a membership generation if it is newer than the one held there. Not
    /// checked for the process that answers: any process of the replica stores it
    /// durably and holds the epoch, which is all a generation store or a lease
    /// renewal asks of it (a stale replica that restarted still renews the lease).
    pub async fn record_generation(
        &self,
        req: RecordGenerationRequest,
    ) -> Result<RecordGenerationReply, tonic::Status> {
        self.link.record_generation(req).await
    }

    /// The volume's snapshots and space on this replica.
    pub async fn snapshots(&self, req: SnapshotsRequest) -> Result<SnapshotsReply, tonic::Status> {
        self.answer(self.link.snapshots(req)).await
    }

    /// Deletes a snapshot on this replica.
    pub async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotReply, tonic::Status> {
        self.answer(self.link.delete_snapshot(req)).await
    }

    /// Which blocks hold data (or changed) on this replica.
    pub async fn map(&self, req: MapRequest) -> Result<MapReply, tonic::Status> {
        self.answer(self.link.map(req)).await
    }

    /// Hashes of blocks on this replica.
    pub async fn hashes(&self, req: HashesRequest) -> Result<HashesReply, tonic::Status> {
        self.answer(self.link.hashes(req)).await
    }

    /// Opens (and with `create`, creates) the volume on this replica; a refusal of
    /// the epoch trips the fence.
    pub async fn open(&self, req: OpenRequest) -> Result<OpenReply, tonic::Status> {
        let r = self.link.open(req).await;
        match &r {
            Ok(reply) => {
                self.copy.store(reply.copy, Ordering::Relaxed);
                self.boot.store(reply.boot, Ordering::Relaxed);
            }
            Err(s) => self.check_fenced(s),
        }
        r
    }

    /// The copy of the volume on this replica, as its last open said (0: unknown).
    pub fn copy(&self) -> u64 {
        self.copy.load(Ordering::Relaxed)
    }

    /// Trips the fence when a unary call's status says a newer engine owns the volume.
    pub fn check_fenced(&self, s: &tonic::Status) {
        if tether_proto::wire::code_of(s) == Some(ErrorCode::Fenced) {
            self.fence.trip(&self.addr, s.message());
        }
    }

    /// Opens the ordered I/O stream with `epoch`.
    pub async fn start(self: &Arc<Self>, epoch: u64) -> Result<(), String> {
        let Some(rx) = self.rx.lock().take() else {
            return Err(format!("replica {}: stream already started", self.addr));
        };
        // The stream goes to the process whose Open reply this engine acted on, or
        // is refused: a replica restarted since may lack unsynced writes that reply
        // counted (simulation, seed 70078).
        let hello = IoBatch {
            volume: self.volume.clone(),
            epoch,
            requests: Vec::new(),
            boot: self.boot.load(Ordering::Relaxed),
        };
        let close = self.close.clone();
        let me = Arc::downgrade(self);
        let outbound =
            futures::stream::unfold((Some(hello), rx, close), move |(hello, mut rx, close)| {
                let me = me.clone();
                async move {
                    if let Some(h) = hello {
                        return Some((h, (None, rx, close)));
                    }
                    // Biased, so a simulation replays: queued requests go before a close.
                    let first = tokio::select! {
                        biased;
                        r = rx.recv() => r?,
                        _ = close.notified() => return None,
                    };
                    // Other requests await answers: more are probably on their way from
                    // tasks the runtime has yet to run (it runs the one it woke last
                    // first), so one turn lets them join this batch.
                    let busy = me.upgrade().is_some_and(|c| c.pending.lock().len() > 1);
                    if busy && rx.is_empty() {
                        tokio::task::yield_now().await;
                    }
                    // Everything already queued rides in the same message: under load
                    // this turns many small requests into one HTTP/2 frame.
                    let mut bytes = payload_len(&first);
                    let mut requests = vec![first];
                    while requests.len() < BATCH_REQUESTS && bytes < BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(r) => {
                                bytes += payload_len(&r);
                                requests.push(r);
                            }
                            Err(_) => break,
                        }
                    }
                    let batch = IoBatch {
                        volume: String::new(),
                        epoch: 0,
                        requests,
                        boot: 0,
                    };
                    Some((batch, (None, rx, close)))
                }
            });
        let inbound = self
            .link
            .io(Outbound(Box::pin(outbound)))
            .await
            .map_err(|s| {
                self.check_fenced(&s);
                format!(
                    "replica {}: cannot open the I/O stream: {}",
                    self.addr,
                    s.message()
                )
            })?;
        let me = self.clone();
        *self.reader.lock() = Some(tokio::spawn(async move { me.read_replies(inbound).await }));
        Ok(())
    }

    async fn read_replies(&self, mut inbound: Inbound) {
        let why = loop {
            match inbound.next().await.transpose() {
                Ok(Some(batch)) => {
                    for r in batch.replies {
                        let result = match ErrorCode::try_from(r.error) {
                            Ok(ErrorCode::Ok) => Ok(Payload {
                                data: r.data,
                                tags: r.tags,
                                blocks: r.blocks,
                            }),
                            code => {
                                // Before anyone hears the answer: no acknowledgement
                                // may leave this engine after a fencing reply.
                                if code == Ok(ErrorCode::Fenced) {
                                    self.fence.trip(&self.addr, &r.message);
                                }
                                Err(ReplicaError::from_code(code.ok(), r.message))
                            }
                        };
                        if let Some((sent, p)) = self.pending.lock().remove(&r.id) {
                            if result.is_ok() {
                                self.confirm(sent);
                            }
                            let _ = p.send(result);
                        }
                    }
                }
                Ok(None) => break "the replica closed the I/O stream".to_string(),
                Err(s) => {
                    self.check_fenced(&s);
                    break format!("I/O stream failed: {}", s.message());
                }
            }
        };
        if self.is_writable() {
            self.mark_failed(why);
        }
    }

    /// Queues `op`; the receiver resolves with the replica's answer.
    pub fn submit(&self, op: Op) -> oneshot::Receiver<Result<Payload, ReplicaError>> {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().insert(id, (Instant::now(), tx));
        // Checked after inserting: mark_failed drains after leaving the writable
        // phases, so either it sees this entry or this sees the phase.
        let refused = if self.fence.is_tripped() {
            // Nothing leaves this engine once any replica said a newer one owns the
            // volume, whichever replica it is for.
            Some(ReplicaError::Fenced(format!(
                "volume {}: a newer engine owns it; this engine sends nothing more",
                self.volume
            )))
        } else if !self.is_writable() || self.tx.send(IoRequest { id, op: Some(op) }).is_err() {
            Some(ReplicaError::Gone(self.reason()))
        } else {
            None
        };
        if let Some(e) = refused {
            if let Some((_, p)) = self.pending.lock().remove(&id) {
                let _ = p.send(Err(e));
            }
        }
        rx
    }

    /// Notes that the replica held this engine's epoch when a request sent at `sent`
    /// reached it.
    pub fn confirm(&self, sent: Instant) {
        let at = sent.saturating_duration_since(self.born).as_nanos() as u64 + 1;
        self.confirmed.fetch_max(at, Ordering::Relaxed);
    }

    /// When the latest request was sent that the replica confirmed this engine's
    /// epoch with (see `crate::volume::lease`).
    pub fn confirmed(&self) -> Option<Instant> {
        match self.confirmed.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.born + Duration::from_nanos(at - 1)),
        }
    }

    /// Whether the replica is in the read-write set.
    pub fn is_healthy(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == Phase::Healthy as u8
    }

    /// Whether the replica takes writes (healthy, or rebuilding write-only).
    pub fn is_writable(&self) -> bool {
        self.phase.load(Ordering::SeqCst) != Phase::Failed as u8
    }

    /// Marks the replica as a write-only rebuild target, or done rebuilding; a
    /// replica that failed stays failed.
    pub fn set_rebuilding(&self, on: bool) {
        let (from, to) = if on {
            (Phase::Healthy, Phase::Rebuilding)
        } else {
            (Phase::Rebuilding, Phase::Healthy)
        };
        let _ =
            self.phase
                .compare_exchange(from as u8, to as u8, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Why the replica is out, or `None` while it takes writes.
    pub fn down(&self) -> Option<Down> {
        (!self.is_writable()).then(|| self.down.lock().0)
    }

    /// Where the replica stands now.
    pub fn state(&self) -> ReplicaState {
        match self.phase.load(Ordering::SeqCst) {
            p if p == Phase::Healthy as u8 => ReplicaState::Healthy,
            p if p == Phase::Rebuilding as u8 => ReplicaState::Rebuilding,
            _ => {
                let (kind, reason) = self.down.lock().clone();
                ReplicaState::Failed { kind, reason }
            }
        }
    }

    /// Why the replica was dropped (empty while healthy).
    pub fn reason(&self) -> String {
        self.down.lock().1.clone()
    }

    /// Takes the replica out of service with `reason`; false if it already was out.
    fn retire(&self, kind: Down, reason: &str) -> bool {
        let mut r = self.down.lock();
        if self.phase.swap(Phase::Failed as u8, Ordering::SeqCst) == Phase::Failed as u8 {
            return false;
        }
        *r = (kind, reason.to_string());
        true
    }

    /// Takes the replica out of service for `kind` of reason if it is still in, and
    /// records that reason either way (a failed replica the operator then removed).
    pub fn set_down(&self, kind: Down, reason: String) {
        if !self.mark_down(kind, reason.clone()) {
            *self.down.lock() = (kind, reason);
        }
    }

    /// Drops the replica from service as failed; returns false if it already was.
    pub fn mark_failed(&self, reason: String) -> bool {
        self.mark_down(Down::Failed, reason)
    }

    /// Drops the replica from service for `kind` of reason; false if it already was.
    pub fn mark_down(&self, kind: Down, reason: String) -> bool {
        if !self.retire(kind, &reason) {
            return false;
        }
        tracing::warn!(volume = %self.volume, replica = %self.addr, %reason, "replica dropped from the volume");
        let drained = std::mem::take(&mut *self.pending.lock());
        for (_, (_, p)) in drained {
            let _ = p.send(Err(ReplicaError::Gone(reason.clone())));
        }
        self.close.notify_one();
        if let Some(h) = self.reader.lock().take() {
            h.abort();
        }
        true
    }

    /// Ends the stream cleanly so the replica records a clean close.
    pub async fn close(&self, timeout: Duration) {
        if !self.retire(Down::Stopped, "engine stopped") {
            return;
        }
        self.close.notify_one();
        let reader = self.reader.lock().take();
        if let Some(h) = reader {
            let _ = tokio::time::timeout(timeout, h).await;
        }
    }
}

fn payload_len(r: &IoRequest) -> usize {
    match &r.op {
        Some(Op::Write(w)) => w.data.len() + w.tags.len(),
        _ => 64,
    }
}
