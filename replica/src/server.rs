//! The replica daemon's gRPC service: opening volumes and the ordered I/O stream.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tether_proto::replica::replica_server::{Replica, ReplicaServer};
use tether_proto::replica::{
    io_request::Op, DeleteSnapshotReply, DeleteSnapshotRequest, ErrorCode, Generation, HashesReply,
    HashesRequest, InventoryReply, InventoryRequest, IoBatch, IoReply, IoReplyBatch, IoRequest,
    MapReply, MapRequest, OpenReply, OpenRequest, RecordGenerationReply, RecordGenerationRequest,
    SnapshotInfo, SnapshotsReply, SnapshotsRequest, VolumeEntry,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::disk::{Disk, OsDisk};
use crate::store::{Execution, GenerationRecord, StoreError, StoreOptions, Volume, VolumeSet};

use tether_proto::wire::MAX_MESSAGE;

/// The `Replica` gRPC service over one data directory.
#[derive(Clone)]
pub struct ReplicaService {
    volumes: Arc<VolumeSet>,
    blocking: Blocking,
    heard: Heard,
    /// Whether this service's port also takes data connections (`dataconn`).
    framed_io: Arc<std::sync::atomic::AtomicBool>,
    /// Names this start of the service (`OpenReply.boot`): an engine that read the
    /// state of an earlier one must not stream to this one as if nothing happened.
    boot: u64,
    /// The data directory's lock, held while any clone of the service lives: one
    /// process serves a data directory (a daemon, or an engine's in-process replica).
    _lock: Option<Arc<std::fs::File>>,
}

/// When each volume last received I/O or a generation from an engine, on this process's
/// clock: a newer
/// engine that takes the epoch learns how long ago the older one was last confirmed
/// here, and so how much of its read lease may be left.
#[derive(Clone)]
struct Heard {
    started: tokio::time::Instant,
    last: Arc<parking_lot::Mutex<HashMap<String, tokio::time::Instant>>>,
}

impl Heard {
    fn new() -> Heard {
        Heard {
            started: tokio::time::Instant::now(),
            last: Default::default(),
        }
    }

    /// A batch of I/O for `volume` arrived (before any of it applies).
    fn note(&self, volume: &str) {
        let now = tokio::time::Instant::now();
        let mut last = self.last.lock();
        match last.get_mut(volume) {
            Some(t) => *t = now,
            None => {
                last.insert(volume.to_string(), now);
            }
        }
    }

    /// How long before `at` `volume` last received I/O (or this process started).
    fn idle_before(&self, volume: &str, at: tokio::time::Instant) -> std::time::Duration {
        let last = self
            .last
            .lock()
            .get(volume)
            .copied()
            .unwrap_or(self.started);
        at.saturating_duration_since(last)
    }
}

impl ReplicaService {
    /// Serves the volumes under `data_dir` (created if missing).
    /// Fails if another process serves the directory.
    pub fn new(data_dir: &Path, opts: StoreOptions) -> std::io::Result<ReplicaService> {
        let lock = lock_data_dir(data_dir)?;
        let mut svc = Self::with_disk(data_dir, Arc::new(OsDisk), opts)?;
        svc._lock = Some(Arc::new(lock));
        Ok(svc)
    }

    /// Serves the volumes under `data_dir` through `disk`: the real one, or one that
    /// injects faults in tests.
    pub fn with_disk(
        data_dir: &Path,
        disk: Arc<dyn Disk>,
        opts: StoreOptions,
    ) -> std::io::Result<ReplicaService> {
        std::fs::create_dir_all(data_dir.join("volumes"))?;
        if let Some(w) = &opts.wal_dir {
            std::fs::create_dir_all(w)?;
        }
        let blocking = Blocking {
            inline: matches!(opts.execution, Execution::Scheduled(_)),
        };
        Ok(ReplicaService {
            volumes: Arc::new(VolumeSet::new(data_dir, disk, opts)?),
            blocking,
            heard: Heard::new(),
            framed_io: Arc::default(),
            boot: new_boot(),
            _lock: None,
        })
    }

    /// Serves one engine's ordered I/O stream: the batches come from `inbound` (the
    /// network, or an in-memory link); the first names the volume and the epoch.
    pub async fn io_stream<S>(&self, mut inbound: S) -> Result<ReplyStream, Status>
    where
        S: Stream<Item = Result<IoBatch, Status>> + Send + Unpin + 'static,
    {
        let first = inbound.next().await.transpose()?.ok_or_else(|| {
            tether_proto::wire::status(
                ErrorCode::Invalid,
                "empty I/O stream: its first message must name the volume",
            )
        })?;
        if first.boot != 0 && first.boot != self.boot {
            // The engine decided on this replica from what an earlier process said;
            // this one may have lost unsynced writes that answer counted.
            return Err(tether_proto::wire::status(
                ErrorCode::Restarted,
                format!(
                    "volume {}: this replica restarted after the engine opened it; the engine must open it again",
                    first.volume
                ),
            ));
        }
        let vol = self.volume(&first.volume).await?;
        vol.check_epoch(first.epoch).map_err(status)?;
        if first.epoch != vol.epoch() {
            return Err(tether_proto::wire::status(
                ErrorCode::Invalid,
                format!(
                    "volume {}: epoch {} was never taken with Open (stored epoch {})",
                    first.volume,
                    first.epoch,
                    vol.epoch()
                ),
            ));
        }
        let (tx, rx) = mpsc::channel(64);
        let epoch = first.epoch;
        let blocking = self.blocking;
        let heard = self.heard.clone();
        tokio::spawn(async move {
            let v = vol.clone();
            if let Err(e) = blocking.run(move || v.set_clean(false), vol.name()).await {
                tracing::error!(volume = vol.name(), error = %e, "cannot mark volume in use");
            }
            let mut stream = IoStreamState {
                vol,
                blocking,
                epoch,
                last_seq: None,
                tx,
                flushes: Vec::new(),
                heard,
            };
            stream.run(first.requests, inbound).await;
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Makes everything written to open volumes durable; used at shutdown.
    pub fn sync_all(&self) {
        for v in self.volumes.open_volumes() {
            if let Err(e) = v.sync() {
                tracing::error!(volume = v.name(), error = %e, "final sync failed");
            }
        }
    }
}

/// A name for one start of the service, unlikely to repeat across processes and
/// restarts (process, clock, and a count within the process). Never 0.
fn new_boot() -> u64 {
    static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut seed = [0u8; 24];
    seed[..8].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    seed[8..16].copy_from_slice(&nanos.to_le_bytes());
    seed[16..].copy_from_slice(&n.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&seed).max(1)
}

/// Takes `data_dir/lock` exclusively (created if missing). Two processes serving one
/// directory would each keep their own idea of the same volumes' logs and layers; the
/// kernel drops the lock when the holder exits, however it exits.
fn lock_data_dir(data_dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!(
                "{} is locked: another process serves this data directory (a replica daemon, \
                 or an engine with an in-process replica there); stop it or use another directory",
                path.display()
            ),
        )),
        Err(e) => Err(std::io::Error::from_raw_os_error(e.raw_os_error())),
    }
}

/// A store error as a gRPC status, tagged with its typed code.
fn status(e: StoreError) -> Status {
    tether_proto::wire::status(code(&e), e.to_string())
}

/// The typed code the engine acts on, for stream replies and statuses alike.
fn code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::OutOfRange { .. } => ErrorCode::OutOfRange,
        StoreError::NotFound { .. } => ErrorCode::NotFound,
        StoreError::BadName { .. } | StoreError::Invalid { .. } => ErrorCode::Invalid,
        StoreError::Fenced { .. } => ErrorCode::Fenced,
        StoreError::NoSpace { .. } => ErrorCode::NoSpace,
        StoreError::Checksum { .. } => ErrorCode::Checksum,
        StoreError::Poisoned { .. } => ErrorCode::Poisoned,
        StoreError::Io { .. } | StoreError::WouldBlock { .. } => ErrorCode::Io,
    }
}

/// A stored generation as the wire carries it.
pub fn to_wire(g: GenerationRecord) -> Generation {
    Generation {
        number: g.number,
        epoch: g.epoch,
        replicas: g.replicas,
        in_sync: g.in_sync,
        cause: g.cause,
        salvage: g.salvage,
    }
}

/// A generation from the wire, to store.
pub fn from_wire(g: Generation) -> GenerationRecord {
    GenerationRecord {
        number: g.number,
        epoch: g.epoch,
        replicas: g.replicas,
        in_sync: g.in_sync,
        cause: g.cause,
        salvage: g.salvage,
    }
}

fn reply(id: u64, r: Result<(Bytes, Bytes), StoreError>) -> IoReply {
    match r {
        Ok((data, tags)) => IoReply {
            id,
            error: ErrorCode::Ok as i32,
            message: String::new(),
            data,
            tags,
            blocks: 0,
        },
        Err(e) => IoReply {
            id,
            error: code(&e) as i32,
            message: e.to_string(),
            ..Default::default()
        },
    }
}

fn done(r: Result<(), StoreError>) -> Result<(Bytes, Bytes), StoreError> {
    r.map(|_| (Bytes::new(), Bytes::new()))
}

impl ReplicaService {
    /// The open volume `name`, opened (and replayed) on the blocking pool if needed, so
    /// no async thread waits for a volume's replay.
    async fn volume(&self, name: &str) -> Result<Arc<Volume>, Status> {
        if let Some(v) = self.volumes.get_open(name) {
            return Ok(v);
        }
        let (volumes, n) = (self.volumes.clone(), name.to_string());
        self.blocking
            .run(move || volumes.get(&n), name)
            .await
            .map_err(status)
    }
}

/// Where store calls that block (they sync files) run.
#[derive(Clone, Copy)]
struct Blocking {
    /// On the caller's thread: the simulation, whose disk is memory and whose seed
    /// must replay. Otherwise on tokio's blocking pool.
    inline: bool,
}

impl Blocking {
    async fn run<T: Send + 'static>(
        self,
        f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
        volume: &str,
    ) -> Result<T, StoreError> {
        if self.inline {
            return f();
        }
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Invalid {
                volume: volume.to_string(),
                what: format!("internal task failed: {e}"),
            }),
        }
    }
}

/// The replies of an ordered I/O stream, in order.
pub type ReplyStream = Pin<Box<dyn Stream<Item = Result<IoReplyBatch, Status>> + Send>>;

#[tonic::async_trait]
impl Replica for ReplicaService {
    async fn open(&self, req: Request<OpenRequest>) -> Result<Response<OpenReply>, Status> {
        let req = req.into_inner();
        let volumes = self.volumes.clone();
        let name = req.volume.clone();
        let taking = req.epoch != 0;
        // Before the epoch is taken, so the idle time reported is never longer than
        // the true one.
        let at = tokio::time::Instant::now();
        let framed_io = self.framed_io.load(std::sync::atomic::Ordering::Relaxed);
        let boot = self.boot;
        let r = self.blocking.run(
            move || {
                let (vol, created) = if req.create {
                    let enc = (!req.encryption.is_empty()).then_some(req.encryption.as_str());
                    volumes.get_or_create(&req.volume, req.size, enc)?
                } else {
                    (volumes.get(&req.volume)?, false)
                };

                // A rebuild or an encrypted create must not touch a copy sealed under
                // other parameters (or none): it may be the only good one.
                // A copy never served may take the engine's parameters instead, under
                // the epoch this request takes (`Volume::adopt_encryption`).
                let adopt = req.adopt_encryption && req.epoch != 0 && !req.rebuild;
                if (req.rebuild || !req.encryption.is_empty())
                    && vol.encryption().unwrap_or_default() != req.encryption
                    && !adopt
                {
                    return Err(StoreError::Invalid {
                        volume: req.volume.clone(),
                        what: format!(
                            "this replica holds the volume {}, unlike the engine's; it was left unchanged. If it is not needed, delete its directory on this replica and add it again",
                            if vol.encryption().is_some() { "encrypted under other parameters" } else { "unencrypted" }
                        ),
                    });
                }
                let previous_epoch = if req.epoch == 0 {
                    vol.epoch()
                } else {
                    vol.take_epoch(req.epoch, req.engine_id)?
                };
                if adopt {
                    vol.adopt_encryption(req.epoch, &req.encryption)?;
                }
                // A rebuild is how a poisoned copy returns to service: it starts again
                // from what its disk holds (the epoch just taken included), and the
                // rebuild fills in the rest.
                let vol = if req.rebuild && vol.poisoned().is_some() {
                    volumes.reopen_poisoned(&req.volume)?
                } else {
                    vol
                };
                // Read before a rebuild starts: this rebuild may follow records of the
                // copy as it stands; an unfinished earlier one may not.
                let copy = vol.copy_for_records();
                if req.rebuild {
                    vol.set_rebuilding(true)?;
                }
                let (revision, clean) = vol.revision();
                Ok(OpenReply {
                    size: vol.size(),
                    block_size: crate::BLOCK_SIZE,
                    previous_epoch,
                    revision,
                    created,
                    clean,
                    rebuilding: vol.rebuilding(),
                    encryption: vol.encryption().unwrap_or_default(),
                    generation: vol.generation().map(to_wire),
                    salvages: vol
                        .generation_history()
                        .into_iter()
                        .chain(vol.generation())
                        .filter(|g| g.salvage)
                        .map(to_wire)
                        .collect(),
                    idle_ms: 0,
                    copy,
                    framed_io,
                    boot,
                })
            },
            &name,
        )
        .await;
        match r {
            Ok(mut reply) => {
                if taking {
                    // Read after the take: every batch heard before it is counted.
                    reply.idle_ms = self.heard.idle_before(&name, at).as_millis() as u64;
                }
                tracing::info!(volume = %name, epoch = req.epoch, revision = reply.revision, "volume opened");
                Ok(Response::new(reply))
            }
            // A probe for a volume that does not exist yet is routine.
            Err(e @ StoreError::NotFound { .. }) => {
                tracing::info!(volume = %name, "open: volume not on this replica yet");
                Err(status(e))
            }
            Err(e) => {
                tracing::warn!(volume = %name, error = %e, "open refused");
                Err(status(e))
            }
        }
    }

    async fn record_generation(
        &self,
        req: Request<RecordGenerationRequest>,
    ) -> Result<Response<RecordGenerationReply>, Status> {
        let req = req.into_inner();
        let Some(g) = req.generation else {
            return Err(tether_proto::wire::status(
                ErrorCode::Invalid,
                format!("volume {}: a generation to record is required", req.volume),
            ));
        };
        // Before anything applies: an engine's read lease counts from it.
        self.heard.note(&req.volume);
        let vol = self.volume(&req.volume).await?;
        let name = vol.name().to_string();
        let stored = self
            .blocking
            .run(
                move || vol.record_generation(req.epoch, req.engine_id, from_wire(g)),
                &name,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(RecordGenerationReply {
            stored: Some(to_wire(stored)),
        }))
    }

    type IoStream = ReplyStream;

    async fn io(
        &self,
        req: Request<Streaming<IoBatch>>,
    ) -> Result<Response<Self::IoStream>, Status> {
        Ok(Response::new(self.io_stream(req.into_inner()).await?))
    }

    async fn inventory(
        &self,
        _req: Request<InventoryRequest>,
    ) -> Result<Response<InventoryReply>, Status> {
        let volumes = self.volumes.clone();
        let (found, problems) = self
            .blocking
            .run(move || Ok(volumes.inventory()), "")
            .await
            .map_err(|e| Status::internal(format!("listing volumes: {e}")))?
            .map_err(|e| Status::internal(format!("listing volumes: {e}")))?;
        Ok(Response::new(InventoryReply {
            volumes: found
                .into_iter()
                .map(|v| VolumeEntry {
                    name: v.name,
                    size: v.size,
                    epoch: v.epoch,
                    clean: v.clean,
                    rebuilding: v.rebuilding,
                    encrypted: v.encrypted,
                    open: v.open,
                    snapshots: u32::try_from(v.snapshots).unwrap_or(u32::MAX),
                })
                .collect(),
            problems: problems
                .into_iter()
                .map(|(name, why)| format!("volume {name}: {why}"))
                .collect(),
        }))
    }

    async fn snapshots(
        &self,
        req: Request<SnapshotsRequest>,
    ) -> Result<Response<SnapshotsReply>, Status> {
        let vol = self.volume(&req.into_inner().volume).await?;
        let name = vol.name().to_string();
        let v = vol.clone();
        let ((head_allocated, wal_allocated), snapshots) = self
            .blocking
            .run(move || Ok((v.allocated(), v.snapshots())), &name)
            .await
            .map_err(status)?;
        let snapshots = snapshots
            .into_iter()
            .map(|s| SnapshotInfo {
                name: s.name,
                seq: s.seq,
                allocated: s.allocated,
            })
            .collect();
        Ok(Response::new(SnapshotsReply {
            snapshots,
            head_allocated,
            wal_allocated,
            size: vol.size(),
            boot: self.boot,
        }))
    }

    async fn hashes(&self, req: Request<HashesRequest>) -> Result<Response<HashesReply>, Status> {
        let req = req.into_inner();
        let vol = self.volume(&req.volume).await?;
        let name = vol.name().to_string();
        let hashes = self
            .blocking
            .run(
                move || {
                    let snap = (!req.snapshot.is_empty()).then_some(req.snapshot.as_str());
                    vol.hashes(snap, req.block, req.count)
                },
                &name,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(HashesReply {
            hashes,
            boot: self.boot,
        }))
    }

    async fn map(&self, req: Request<MapRequest>) -> Result<Response<MapReply>, Status> {
        let req = req.into_inner();
        let vol = self.volume(&req.volume).await?;
        let name = vol.name().to_string();
        if !req.since.is_empty() {
            let changed = self
                .blocking
                .run(
                    move || vol.changed_between(&req.snapshot, &req.since, req.block, req.count),
                    &name,
                )
                .await
                .map_err(status)?;
            return Ok(Response::new(runs_reply(changed, self.boot)));
        }
        if !req.changed_for.is_empty() {
            let changed = self
                .blocking
                .run(
                    move || {
                        Ok(vol.changed(
                            &req.changed_for,
                            req.changed_for_copy,
                            req.block,
                            req.count,
                        ))
                    },
                    &name,
                )
                .await
                .map_err(status)?;
            return Ok(Response::new(runs_reply(changed, self.boot)));
        }
        let extents = self
            .blocking
            .run(
                move || {
                    let snap = (!req.snapshot.is_empty()).then_some(req.snapshot.as_str());
                    vol.map(snap, req.block, req.count)
                },
                &name,
            )
            .await
            .map_err(status)?
            .into_iter()
            .map(|(s, e, allocated)| tether_proto::replica::Extent {
                block: s,
                count: e - s,
                allocated,
            })
            .collect();
        Ok(Response::new(MapReply {
            extents,
            no_record: false,
            boot: self.boot,
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotReply>, Status> {
        let req = req.into_inner();
        let vol = self.volume(&req.volume).await?;
        vol.check_epoch(req.epoch).map_err(status)?;
        let name = vol.name().to_string();
        self.blocking
            .run(move || vol.delete_snapshot(&req.name), &name)
            .await
            .map_err(status)?;
        Ok(Response::new(DeleteSnapshotReply { boot: self.boot }))
    }
}

/// A `Map` answer of runs, or of "no record" when there are none to give.
fn runs_reply(runs: Option<Vec<(u64, u64)>>, boot: u64) -> MapReply {
    MapReply {
        boot,
        no_record: runs.is_none(),
        extents: runs
            .unwrap_or_default()
            .into_iter()
            .map(|(s, e)| tether_proto::replica::Extent {
                block: s,
                count: e - s,
                allocated: true,
            })
            .collect(),
    }
}

/// How long a stream waits for its next batch before its volume's gathered log
/// records are written out.
const IDLE: std::time::Duration = std::time::Duration::from_millis(200);

struct IoStreamState {
    vol: Arc<Volume>,
    blocking: Blocking,
    epoch: u64,
    last_seq: Option<u64>,
    tx: mpsc::Sender<Result<IoReplyBatch, Status>>,
    flushes: Vec<tokio::task::JoinHandle<()>>,
    heard: Heard,
}

impl IoStreamState {
    async fn run<S>(&mut self, first: Vec<IoRequest>, mut inbound: S)
    where
        S: Stream<Item = Result<IoBatch, Status>> + Unpin,
    {
        let mut batch = first;
        loop {
            if !self.process(batch).await {
                return;
            }
            let next = match tokio::time::timeout(IDLE, inbound.next()).await {
                Ok(next) => next,
                Err(_) => {
                    // Idle: the page cache then holds every acknowledged write's
                    // record, so a killed process (not a power cut) keeps them.
                    // Not if it would wait (a checkpoint holds the volume): the next
                    // idle moment tries again.
                    match crate::store::without_waiting(|| self.vol.settle()) {
                        // Already reported when it was poisoned.
                        Ok(())
                        | Err(StoreError::Poisoned { .. } | StoreError::WouldBlock { .. }) => {}
                        Err(e) => {
                            tracing::error!(volume = self.vol.name(), error = %e, "writing the log's tail failed")
                        }
                    }
                    inbound.next().await
                }
            };
            batch = match next.transpose() {
                Ok(Some(b)) => b.requests,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(volume = self.vol.name(), error = %e, "I/O stream broken");
                    return;
                }
            };
        }
        // The engine closed the stream on purpose: it is done with the volume.
        for f in self.flushes.drain(..) {
            let _ = f.await;
        }
        let v = self.vol.clone();
        let name = v.name().to_string();
        let epoch = self.epoch;
        let closed = self
            .blocking
            .run(
                move || {
                    v.sync()?;
                    // A fenced engine's close says nothing about the newer engine's use.
                    match v.under_epoch(epoch, || v.set_clean(true)) {
                        Err(StoreError::Fenced { .. }) => Ok(()),
                        r => r,
                    }
                },
                &name,
            )
            .await;
        match closed {
            Ok(()) => tracing::info!(volume = %name, "engine closed the volume cleanly"),
            Err(e) => tracing::error!(volume = %name, error = %e, "closing the volume failed"),
        }
    }

    fn check_seq(&mut self, seq: u64) -> Result<(), StoreError> {
        // A rebuild copy: ordered by the stream, outside the write sequence.
        if seq == 0 {
            return Ok(());
        }
        if let Some(last) = self.last_seq {
            if Some(seq) != last.checked_add(1) {
                return Err(StoreError::Invalid {
                    volume: self.vol.name().to_string(),
                    what: format!(
                        "write sequence {seq} after {last}: a gap or reorder in the stream; the engine must reopen it"
                    ),
                });
            }
        }
        self.last_seq = Some(seq);
        Ok(())
    }

    /// Applies a write or read while no newer engine can take the volume: on this
    /// async thread if it needs nothing the store would wait for (the common case:
    /// data into the page cache, no thread hop), else on the blocking pool, so a slow
    /// disk or a long checkpoint of this volume never stalls another volume's stream.
    async fn apply<T: Send + 'static>(
        &self,
        f: impl Fn(&Volume) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (v, epoch) = (&self.vol, self.epoch);
        match crate::store::without_waiting(|| v.under_epoch(epoch, || f(v))) {
            Err(StoreError::WouldBlock { .. }) => {
                let v = v.clone();
                self.blocking
                    .run(move || v.under_epoch(epoch, || f(&v)), self.vol.name())
                    .await
            }
            r => r,
        }
    }

    /// Runs a change to the layer tree off the async runtime (it syncs files), while
    /// no newer engine can take the volume.
    async fn admin(
        &self,
        f: impl FnOnce(&Volume) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(Bytes, Bytes), StoreError> {
        let v = self.vol.clone();
        let epoch = self.epoch;
        done(
            self.blocking
                .run(move || v.under_epoch(epoch, || f(&v)), self.vol.name())
                .await,
        )
    }

    /// Answers `rest` with the fencing error before the stream ends:
    /// a newer engine took the volume, and nothing after that point may apply.
    async fn fenced(&self, e: StoreError, rest: impl Iterator<Item = u64>) {
        let message = e.to_string();
        let replies = rest
            .map(|id| IoReply {
                id,
                error: ErrorCode::Fenced as i32,
                message: message.clone(),
                ..Default::default()
            })
            .collect();
        let _ = self.tx.send(Ok(IoReplyBatch { replies })).await;
        tracing::warn!(volume = self.vol.name(), error = %e, "stream fenced by a newer engine");
    }

    /// Applies one batch in order; returns false when the stream must end.
    async fn process(&mut self, batch: Vec<IoRequest>) -> bool {
        // Before anything applies: an open that takes a newer epoch after this point
        // counts this batch as heard, whether it applies before the open or is fenced.
        self.heard.note(self.vol.name());
        let mut replies = Vec::with_capacity(batch.len());
        let mut batch = batch.into_iter();
        while let Some(req) = batch.next() {
            // Every request is checked against the epoch as it applies (`under_epoch`):
            // a newer engine may take the volume mid-batch, and nothing of this
            // engine's may apply after that.
            let id = req.id;
            let epoch = self.epoch;
            let mut blocks = 0;
            let r = match req.op {
                Some(Op::Write(w)) => match self.check_seq(w.seq) {
                    Ok(()) => done(
                        self.apply(move |v| v.write_sealed(w.seq, w.block, &w.data, &w.tags))
                            .await,
                    ),
                    Err(e) => Err(e),
                },
                Some(Op::Read(r)) => {
                    self.apply(move |v| {
                        let snapshot = (!r.snapshot.is_empty()).then_some(r.snapshot.as_str());
                        if r.authenticated {
                            v.read_authenticated(snapshot, r.block, r.count)
                        } else {
                            v.read(snapshot, r.block, r.count)
                        }
                    })
                    .await
                }
                Some(Op::Snapshot(sn)) => match self.check_seq(sn.seq) {
                    Ok(()) => self.admin(move |v| v.snapshot(&sn.name)).await,
                    Err(e) => Err(e),
                },
                Some(Op::Revert(rv)) => self.admin(move |v| v.revert(&rv.name)).await,
                Some(Op::RebuildDone(d)) => self.admin(move |v| v.rebuild_done(d.revision)).await,
                Some(Op::Expand(x)) => self.admin(move |v| v.expand(x.size)).await,
                Some(Op::Away(a)) if a.replica.is_empty() => Err(StoreError::Invalid {
                    volume: self.vol.name().to_string(),
                    what: "an away request without a replica".to_string(),
                }),
                Some(Op::Away(a)) => {
                    let runs: Vec<(u64, u64)> = a.runs.iter().map(|x| (x.block, x.count)).collect();
                    self.admin(move |v| v.away(&a.replica, a.copy, &runs, a.unknown))
                        .await
                }
                Some(Op::Zero(z)) => match self.check_seq(z.seq) {
                    Ok(()) => done(
                        self.apply(move |v| v.zero_blocks(z.seq, z.block, u64::from(z.count)))
                            .await,
                    ),
                    Err(e) => Err(e),
                },
                Some(Op::Cache(c)) => {
                    self.apply(move |v| v.prefetch(c.block, c.count))
                        .await
                        .map(|n| {
                            blocks = n;
                            (Bytes::new(), Bytes::new())
                        })
                }
                Some(Op::Flush(_)) => match self.vol.check_epoch(epoch) {
                    Err(e) => Err(e),
                    // fdatasync runs off the stream so later writes keep flowing; it
                    // covers every write applied before this point.
                    Ok(()) => {
                        let v = self.vol.clone();
                        let tx = self.tx.clone();
                        let blocking = self.blocking;
                        self.flushes.retain(|h| !h.is_finished());
                        self.flushes.push(tokio::spawn(async move {
                            let name = v.name().to_string();
                            let r = blocking.run(move || v.sync(), &name).await;
                            let batch = IoReplyBatch {
                                replies: vec![reply(id, done(r))],
                            };
                            let _ = tx.send(Ok(batch)).await;
                        }));
                        continue;
                    }
                },
                None => Err(StoreError::Invalid {
                    volume: self.vol.name().to_string(),
                    what: "request without an operation".to_string(),
                }),
            };
            if let Err(e @ StoreError::Fenced { .. }) = r {
                if !replies.is_empty() {
                    let _ = self.tx.send(Ok(IoReplyBatch { replies })).await;
                }
                self.fenced(e, std::iter::once(id).chain(batch.map(|r| r.id)))
                    .await;
                return false;
            }
            let mut rep = reply(id, r);
            rep.blocks = blocks;
            replies.push(rep);
        }
        if replies.is_empty() {
            return true;
        }
        self.tx.send(Ok(IoReplyBatch { replies })).await.is_ok()
    }
}

/// The replica's TLS material (PEM): its certificate and key, and the CA whose
/// client certificates it accepts (without a CA, any client may connect over TLS).
#[derive(Clone)]
pub struct ServerTls {
    /// Certificate chain.
    pub cert: Vec<u8>,
    /// Private key.
    pub key: Vec<u8>,
    /// CA that must have signed every client's certificate.
    pub ca: Option<Vec<u8>>,
}

/// Runs the replica daemon on `listen` until `shutdown` resolves, then syncs.
pub async fn serve(
    listen: SocketAddr,
    data_dir: &Path,
    opts: StoreOptions,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let svc = ReplicaService::new(data_dir, opts).map_err(|e| {
        format!(
            "cannot use data directory {}: {e}; check that it exists and is writable",
            data_dir.display()
        )
    })?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, data = %data_dir.display(), "replica serving");
    serve_with(listener, svc, tls, shutdown).await
}

/// Runs `svc` on `listener` until `shutdown` resolves, then syncs.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    svc: ReplicaService,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listen = listener
        .local_addr()
        .map_err(|e| format!("listening socket: {e}"))?;
    let data_tls = match &tls {
        Some(t) => Some(crate::dataconn::tls_config(t).map_err(|e| format!("TLS: {e}"))?),
        None => None,
    };
    if let Some(t) = &tls {
        tracing::info!(%listen, client_ca = t.ca.is_some(), "replica requires TLS{}",
            if t.ca.is_some() { " with client certificates from its CA" } else { "" });
    }
    // One port for both: gRPC connections go on to tonic, data connections (the I/O
    // stream in frames) are served beside it, told apart by their first bytes or,
    // over TLS, by ALPN. A proxy or firewall in front of the port passes both.
    svc.framed_io
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (incoming, router) = crate::dataconn::route(listener, svc.clone(), data_tls);
    let builder = tonic::transport::Server::builder();
    let server = builder
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .add_service(
            ReplicaServer::new(svc.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming(incoming);
    tokio::select! {
        r = server => r.map_err(|e| format!("replica server failed: {e}"))?,
        () = router => {}
        _ = shutdown => {
            tracing::info!("replica shutting down");
        }
    }
    let s = svc.clone();
    let _ = tokio::task::spawn_blocking(move || s.sync_all()).await;
    Ok(())
}
