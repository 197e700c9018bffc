//! The engine's control API on a Unix socket: `tether volume status` and, later,
//! snapshot and replica commands.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tether_proto::engine::engine_client::EngineClient;
use tether_proto::engine::engine_server::{Engine, EngineServer};
use tether_proto::engine::{
    BackupProgress, BackupRequest, Counters, ExpandReply, ExpandRequest, ReplicaReply,
    ReplicaRequest, ReplicaStatus, RestoreRequest, Snapshot, SnapshotList, SnapshotReply,
    SnapshotRequest, StatusReply, StatusRequest, VerifyProblem, VerifyProgress, VerifyRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use crate::error::VolumeError;
use crate::phase::{EngineState, Waiting};
use crate::volume::Volume;

fn status_of(e: VolumeError) -> Status {
    match e {
        VolumeError::Invalid(m) => Status::failed_precondition(m),
        other => Status::unavailable(other.to_string()),
    }
}

/// Where an engine's control socket lives when not given: `/run/tether/VOLUME.sock`,
/// or under `$TETHER_RUN_DIR` when set.
pub fn default_socket(volume: &str) -> PathBuf {
    let dir = std::env::var_os("TETHER_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/tether"));
    dir.join(format!("{volume}.sock"))
}

/// The control service over one engine: it answers status from the start, and the
/// other requests once the engine serves.
pub struct ControlService {
    state: Arc<EngineState>,
    /// The running backup or restore, or the last one (shared with the schedules).
    job: crate::scheduler::JobSlot,
    /// The schedules' state.
    schedules: crate::scheduler::StatusSlot,
}

impl ControlService {
    /// Serves the control API of the engine whose phase is `state`.
    pub fn new(
        state: Arc<EngineState>,
        job: crate::scheduler::JobSlot,
        schedules: crate::scheduler::StatusSlot,
    ) -> ControlService {
        ControlService {
            state,
            job,
            schedules,
        }
    }

    /// Starts `job` unless another backup or restore is running.
    fn start_job(&self, job: &Arc<crate::backup::Job>) -> Result<(), Status> {
        crate::scheduler::start_job(&self.job, &self.state.volume, job)
            .map_err(Status::already_exists)
    }

    /// The served volume, or UNAVAILABLE saying what the engine waits for.
    fn volume(&self) -> Result<Arc<Volume>, Status> {
        self.state
            .serving()
            .map(|(v, _)| v)
            .map_err(|w| Status::unavailable(w.describe(&self.state.volume)))
    }

    /// Status of an engine that does not serve yet.
    fn waiting_status(&self, w: &Waiting) -> StatusReply {
        StatusReply {
            volume: self.state.volume.clone(),
            state: "waiting".into(),
            waiting_reason: w.why.clone(),
            waiting_for: w.waiting_for.clone(),
            waiting_seconds: w.since.elapsed().as_secs(),
            open_attempts: w.attempts,
            replicas: self
                .state
                .replicas
                .iter()
                .map(|a| ReplicaStatus {
                    address: a.clone(),
                    state: if w.waiting_for.contains(a) {
                        "waited for".into()
                    } else {
                        "not serving".into()
                    },
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// The snapshots a replica reported, as the control API shows them.
fn snapshot_list(space: &tether_proto::replica::SnapshotsReply) -> Vec<Snapshot> {
    space
        .snapshots
        .iter()
        .map(|x| Snapshot {
            name: x.name.clone(),
            seq: x.seq,
            allocated: x.allocated,
        })
        .collect()
}

#[tonic::async_trait]
impl Engine for ControlService {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let (v, nbd_address) = match self.state.serving() {
            Ok(s) => s,
            Err(w) => return Ok(Response::new(self.waiting_status(&w))),
        };
        let generation = v.generation();
        let c = &v.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let space = v.space().await.ok();
        let snapshots = space.as_ref().map(snapshot_list).unwrap_or_default();
        let replicas = v
            .replicas()
            .iter()
            .map(|r| {
                let mut st = ReplicaStatus {
                    address: r.addr.clone(),
                    state: r.state().name().to_string(),
                    reason: r.reason(),
                    ..Default::default()
                };
                if let Some(t) = v.retries.lock().get(&r.addr) {
                    if r.down().is_some_and(|d| d.retried()) {
                        st.retry_in_seconds = t
                            .next
                            .saturating_duration_since(tokio::time::Instant::now())
                            .as_secs();
                        st.failed_attempts = t.attempts;
                    }
                }
                if let Some(p) = v.rebuilds.lock().get(&r.addr) {
                    if st.state == "failed" {
                        st.state = "rebuilding".into();
                    }
                    st.rebuild_done_blocks = p.done.load(Ordering::Relaxed);
                    st.rebuild_total_blocks = p.total.load(Ordering::Relaxed);
                    st.rebuild_copied_bytes = p.copied.load(Ordering::Relaxed);
                    st.rebuild_rate_bytes = p.rate() as u64;
                    st.rebuild_eta_seconds = p.eta();
                    st.rebuild_phase = p.phase.lock().clone();
                }
                st
            })
            .collect::<Vec<_>>();
        let (schedules, newest_backup) = crate::scheduler::report(&self.schedules);
        Ok(Response::new(StatusReply {
            volume: v.name().to_string(),
            size: v.size(),
            block_size: crate::volume::BLOCK as u32,
            epoch: v.epoch(),
            replicas,
            counters: Some(Counters {
                reads: get(&c.reads),
                writes: get(&c.writes),
                flushes: get(&c.flushes),
                trims: get(&c.trims),
                errors: get(&c.errors),
                bytes_read: get(&c.bytes_read),
                bytes_written: get(&c.bytes_written),
                nbd_connections: get(&c.connections),
                checksum_errors: get(&c.checksum_errors),
                cache_requests: get(&c.cache_requests),
                cache_blocks: get(&c.cache_blocks),
            }),
            nbd_address,
            head_allocated: space.as_ref().map_or(0, |s| s.head_allocated),
            wal_allocated: space.as_ref().map_or(0, |s| s.wal_allocated),
            snapshots,
            attached_clients: v.attached(),
            min_replicas: v.min_replicas() as u64,
            desired_replicas: v.desired() as u64,
            degraded: v.degraded(),
            encryption: v.encryption_summary(),
            replica_tls: v.connector().tls(),
            state: "serving".into(),
            io_held: v.io_held().unwrap_or_default(),
            generation: generation.as_ref().map_or(0, |g| g.number),
            in_sync: generation
                .map(|g| g.in_sync.into_iter().collect())
                .unwrap_or_default(),
            salvages: v.salvages().to_vec(),
            backup: self.job.lock().as_ref().map(|j| j.report()),
            schedules,
            newest_backup_age_seconds: newest_backup,
            ..Default::default()
        }))
    }

    async fn add_replica(
        &self,
        req: Request<ReplicaRequest>,
    ) -> Result<Response<ReplicaReply>, Status> {
        let addr = req.into_inner().address;
        let v = &self.volume()?;
        if v.replicas()
            .iter()
            .any(|r| r.addr == addr && r.is_writable())
        {
            return Err(Status::already_exists(format!(
                "volume {}: replica {addr} is already part of the volume",
                v.name()
            )));
        }
        crate::rebuild::start(v, &addr, true)
            .map_err(|e| Status::already_exists(format!("volume {}: {e}", v.name())))?;
        Ok(Response::new(ReplicaReply {}))
    }

    async fn remove_replica(
        &self,
        req: Request<ReplicaRequest>,
    ) -> Result<Response<ReplicaReply>, Status> {
        let addr = req.into_inner().address;
        let v = &self.volume()?;
        let healthy = v.replica(&addr).is_some_and(|r| r.is_healthy());
        if healthy && v.healthy_count() <= v.min_replicas() {
            return Err(Status::failed_precondition(format!(
                "volume {}: removing {addr} would leave fewer than --min-replicas {} healthy replicas",
                v.name(),
                v.min_replicas()
            )));
        }
        let known = v.replica(&addr).is_some()
            || v.generation().is_some_and(|g| g.replicas.contains(&addr));
        if !known {
            return Err(Status::not_found(format!(
                "volume {}: no replica {addr}",
                v.name()
            )));
        }
        // Out of the volume's replicas on a majority first: a replica removed only
        // here could still be counted, or served from, by a later engine.
        v.record(crate::membership::Change::Remove(addr.clone()))
            .await
            .map_err(|e| {
                Status::unavailable(format!("volume {}: removing {addr}: {e}", v.name()))
            })?;
        v.remove(&addr);
        tracing::info!(volume = %v.name(), replica = %addr, "replica removed by the operator");
        Ok(Response::new(ReplicaReply {}))
    }

    async fn create_snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotReply>, Status> {
        let name = req.into_inner().name;
        let started = tokio::time::Instant::now();
        let v = self.volume()?;
        v.snapshot(&name).await.map_err(status_of)?;
        tracing::info!(volume = %v.name(), snapshot = %name,
            ms = started.elapsed().as_millis() as u64, "snapshot taken on all replicas");
        Ok(Response::new(SnapshotReply {}))
    }

    async fn list_snapshots(
        &self,
        _req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotList>, Status> {
        let space = self.volume()?.space().await.map_err(status_of)?;
        Ok(Response::new(SnapshotList {
            snapshots: snapshot_list(&space),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotReply>, Status> {
        let name = req.into_inner().name;
        self.volume()?
            .delete_snapshot(&name)
            .await
            .map_err(status_of)?;
        Ok(Response::new(SnapshotReply {}))
    }

    async fn revert_snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotReply>, Status> {
        let name = req.into_inner().name;
        self.volume()?.revert(&name).await.map_err(status_of)?;
        Ok(Response::new(SnapshotReply {}))
    }

    async fn expand(&self, req: Request<ExpandRequest>) -> Result<Response<ExpandReply>, Status> {
        let size = self
            .volume()?
            .expand(req.into_inner().size)
            .await
            .map_err(status_of)?;
        Ok(Response::new(ExpandReply { size }))
    }

    type BackupStream = ProgressStream;

    async fn backup(
        &self,
        req: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let req = req.into_inner();
        let v = self.volume()?;
        let (target, keys) =
            crate::backup::target_of(&req.target, &req.master_key).map_err(backup_status)?;
        let job = crate::backup::Job::new("backup", target.name().to_string());
        self.start_job(&job)?;
        let args = crate::backup::BackupArgs {
            target,
            keys,
            snapshot: (!req.snapshot.is_empty()).then_some(req.snapshot),
            labels: req.labels.into_iter().collect(),
            concurrency: concurrency(req.concurrency),
        };
        let j = job.clone();
        tokio::spawn(async move {
            let r = crate::backup::backup(v, args, j.clone()).await.map(drop);
            if let Err(e) = &r {
                tracing::error!(error = %e, "backup failed");
            }
            j.finish(&r);
        });
        Ok(Response::new(follow(job)))
    }

    type RestoreStream = ProgressStream;

    async fn restore(
        &self,
        req: Request<RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let req = req.into_inner();
        let v = self.volume()?;
        let (target, keys) =
            crate::backup::target_of(&req.target, &req.master_key).map_err(backup_status)?;
        let m = target
            .manifest(&keys, &req.source_volume, &req.backup)
            .await
            .map_err(backup_status)?;
        let job = crate::backup::Job::new("restore", target.name().to_string());
        self.start_job(&job)?;
        // Taken here, so the caller hears a refusal at once; the task holds it.
        let held = match v.begin_restore() {
            Ok(h) => h,
            Err(e) => {
                job.finish(&Err(tether_backup::BackupError::Exists(e.to_string())));
                return Err(status_of(e));
            }
        };
        let concurrency = concurrency(req.concurrency);
        let j = job.clone();
        tokio::spawn(async move {
            let r = crate::backup::restore(held, &target, &keys, &m, concurrency, false, j.clone())
                .await;
            if let Err(e) = &r {
                tracing::error!(error = %e, "restore failed");
            }
            j.finish(&r);
        });
        Ok(Response::new(follow(job)))
    }

    type VerifyStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<VerifyProgress, Status>> + Send>>;

    async fn verify(
        &self,
        _req: Request<VerifyRequest>,
    ) -> Result<Response<Self::VerifyStream>, Status> {
        let v = self.volume()?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            // Only blocks that hold data on some replica: a hole everywhere reads as
            // zeroes everywhere, so a thin volume's verify follows its data.
            let mut runs = Vec::new();
            for r in v.replicas().iter().filter(|r| r.is_healthy()) {
                match v.allocated(r, "").await {
                    Ok(a) => runs.extend(a),
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "volume {}: cannot verify: {e}",
                                v.name()
                            ))))
                            .await;
                        return;
                    }
                }
            }
            let runs = crate::volume::allocation::union(runs);
            let total: u64 = runs.iter().map(|r| r.1 - r.0).sum();
            let mut done = 0;
            let mut last_report = tokio::time::Instant::now();
            let mut pending = Vec::new();
            if total == 0 {
                let _ = tx
                    .send(Ok(VerifyProgress {
                        blocks_done: 0,
                        blocks_total: 0,
                        problems: Vec::new(),
                        done: true,
                    }))
                    .await;
                return;
            }
            for (block, n) in crate::volume::allocation::split(&runs, 256) {
                for (block, replica, what) in v.verify_chunk(block, n as u32).await {
                    tracing::warn!(volume = %v.name(), block, %replica, %what, "verify found a problem");
                    pending.push(VerifyProblem {
                        block,
                        replica,
                        what,
                    });
                }
                done += n;
                if done == total || last_report.elapsed().as_millis() > 500 || !pending.is_empty() {
                    last_report = tokio::time::Instant::now();
                    let p = VerifyProgress {
                        blocks_done: done,
                        blocks_total: total,
                        problems: std::mem::take(&mut pending),
                        done: done == total,
                    };
                    if tx.send(Ok(p)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A stream of a backup's or restore's progress.
pub type ProgressStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<BackupProgress, Status>> + Send>>;

/// Reports `job` twice a second until it ends; the job goes on if the caller leaves.
fn follow(job: Arc<crate::backup::Job>) -> ProgressStream {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        loop {
            // Armed before the check, so an end in between still wakes it.
            let ended = job.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let done = job.finished();
            if tx.send(Ok(job.report())).await.is_err() || done {
                return;
            }
            tokio::select! {
                _ = ended => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Chunks at once as asked (0: the default).
fn concurrency(asked: u32) -> usize {
    match asked {
        0 => crate::backup::CONCURRENCY,
        n => n as usize,
    }
}

/// A backup error as a status with a typed code.
fn backup_status(e: tether_backup::BackupError) -> Status {
    use tether_backup::BackupError as E;
    match e {
        E::NotFound(m) => Status::not_found(m),
        E::Key(m) => Status::permission_denied(m),
        E::Corrupt(m) => Status::data_loss(m),
        E::Invalid(m) => Status::invalid_argument(m),
        E::Exists(m) => Status::already_exists(m),
        E::Target(m) | E::Volume(m) => Status::unavailable(m),
        E::Lapsed(m) => Status::aborted(m),
    }
}

/// Binds the control socket at `path`, replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A live engine answers on it; refuse to steal its socket.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running engine", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    tokio::net::UnixListener::bind(path)
}

/// Serves the control API on `listener` until dropped.
pub async fn serve(
    listener: tokio::net::UnixListener,
    svc: ControlService,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(EngineServer::new(svc))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
}

/// Connects to an engine's control socket.
pub async fn connect(path: &Path) -> Result<EngineClient<Channel>, String> {
    let p = path.to_path_buf();
    let channel = Endpoint::from_static("http://engine.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
        }))
        .await
        .map_err(|e| {
            format!(
                "cannot reach the engine at {}: {e}; is the engine for this volume running? (use --control-socket if it uses another path)",
                path.display()
            )
        })?;
    Ok(EngineClient::new(channel))
}
