//! The volume core over the in-memory replica link (`replica::local`): the real
//! replica service and store in this process, no network. What a write acknowledges
//! is on every replica; a replica whose link is cut drops out while writes go on (the
//! drop recorded on a majority), and a later engine that reaches only it waits instead
//! of serving what it had.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tether_engine::replica::local::LocalConnector;
use tether_engine::replica::ReplicaState;
use tether_engine::volume::Volume;
use tether_engine::EngineConfig;
use tether_replica::sim::SimDisk;
use tether_replica::{ReplicaService, StoreOptions};

const BLK: usize = 4096;

fn cfg(replicas: &[&str], dir: &std::path::Path) -> EngineConfig {
    EngineConfig {
        volume: "vol".into(),
        size: Some(8 << 20),
        replicas: replicas.iter().map(|s| s.to_string()).collect(),
        nbd_listen: None,
        nbd_socket: None,
        control_socket: dir.join("control.sock"),
        timeout: Duration::from_secs(8),
        min_replicas: 1,
        desired_replicas: 0,
        metrics_listen: None,
        encryption_key: None,
        replica_tls: None,
        nbd_tls: None,
        quorum_wait: Duration::from_secs(30),
        rebuild_rate: 0,
        schedule: None,
    }
}

async fn open(c: &Arc<LocalConnector>, replicas: &[&str], dir: &std::path::Path) -> Arc<Volume> {
    tether_engine::open_volume_with(&cfg(replicas, dir), c.clone())
        .await
        .unwrap()
}

async fn read(vol: &Volume, block: usize, blocks: usize) -> Vec<u8> {
    vol.read((block * BLK) as u64, (blocks * BLK) as u32)
        .await
        .unwrap()
        .concat()
}

/// Replicas `names` on simulated disks (a power cut loses what was not synced),
/// reached through `c`.
fn on_sim_disks(
    c: &LocalConnector,
    dir: &std::path::Path,
    names: &[&'static str],
) -> HashMap<&'static str, SimDisk> {
    let mut disks = HashMap::new();
    for &name in names {
        let disk = SimDisk::new();
        let svc = ReplicaService::with_disk(
            &dir.join(name),
            Arc::new(disk.clone()),
            StoreOptions::default(),
        )
        .unwrap();
        c.add(name, svc);
        disks.insert(name, disk);
    }
    disks
}

/// Replica `name` loses power and a new process serves what its disk kept; the old
/// process's streams stay as they were unless the caller cut them.
fn restart_after_power_cut(c: &LocalConnector, dir: &std::path::Path, disk: &SimDisk, name: &str) {
    let svc = ReplicaService::with_disk(
        &dir.join(name),
        Arc::new(disk.power_cut(|| false)),
        StoreOptions::default(),
    )
    .unwrap();
    c.add(name, svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_every_replica_and_a_cut_replica_is_never_served_alone() {
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(LocalConnector::default());
    for name in ["a", "b", "c"] {
        let svc = tether_replica::ReplicaService::new(
            &dir.path().join(name),
            tether_replica::StoreOptions::default(),
        )
        .unwrap();
        c.add(name, svc);
    }

    let vol = open(&c, &["a", "b", "c"], dir.path()).await;
    let first = Bytes::from(vec![0x11u8; 32 * BLK]);
    vol.write(0, first.clone(), false).await.unwrap();
    vol.flush().await.unwrap();
    assert_eq!(read(&vol, 0, 32).await, first);
    // Every replica holds it: every block's copies agree.
    let problems = vol.verify_chunk(0, 256).await;
    assert!(problems.is_empty(), "{problems:?}");

    // Replica c falls off; the next write drops it (recorded on a and b, a majority)
    // and is acknowledged without it.
    c.cut("c", true);
    let second = Bytes::from(vec![0x22u8; 8 * BLK]);
    vol.write((64 * BLK) as u64, second.clone(), false)
        .await
        .unwrap();
    vol.flush().await.unwrap();
    let c_state = vol.replica("c").unwrap().state();
    assert!(
        matches!(c_state, ReplicaState::Failed { .. }),
        "c is still {}",
        c_state.name()
    );
    assert!(!vol.generation().unwrap().in_sync.contains("c"));
    assert_eq!(read(&vol, 64, 8).await, second);
    vol.shutdown().await;

    // An engine that reaches only c (which missed the second write) does not serve:
    // it waits for the replicas of the newest generation.
    c.cut("c", false);
    c.cut("a", true);
    c.cut("b", true);
    match tether_engine::open_volume_with(&cfg(&["a", "b", "c"], dir.path()), c.clone()).await {
        Err(tether_engine::EngineError::Waiting { waiting_for, .. }) => {
            assert!(waiting_for.contains(&"a".to_string()), "{waiting_for:?}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("served from the stale replica alone"),
    }
    // With a back, it serves a's data, second write included; c is rebuilt.
    c.cut("a", false);
    let later = open(&c, &["a", "b", "c"], dir.path()).await;
    assert_eq!(read(&later, 0, 32).await, first);
    assert_eq!(read(&later, 64, 8).await, second);
    later.shutdown().await;
}

/// A rebuild's source that lost power and restarted while no request was in flight
/// still looks healthy: its stream to the old process has not failed yet. The
/// source's answers would come from the new process, which lost the writes it had not
/// synced and its record of what the target missed; copying by them left the target
/// without an acknowledged write (simulation, seed 12668). Those answers name another
/// process than the engine opened, so they fail and the rebuild takes another source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_does_not_copy_from_a_source_that_restarted_unseen() {
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(LocalConnector::default());
    // b first: the rebuild takes the first healthy replica as its source.
    let disks = on_sim_disks(&c, dir.path(), &["b", "a", "c"]);
    let vol = open(&c, &["b", "a", "c"], dir.path()).await;
    let first = Bytes::from(vec![0x11u8; 8 * BLK]);
    vol.write(0, first.clone(), false).await.unwrap();
    vol.flush().await.unwrap();

    // c falls off; the next write is acknowledged by b and a, not flushed.
    c.cut("c", true);
    let second = Bytes::from(vec![0x22u8; 8 * BLK]);
    vol.write((64 * BLK) as u64, second.clone(), false)
        .await
        .unwrap();
    assert!(!vol.replica("c").unwrap().is_healthy());

    // b loses power (its unsynced writes with it) and comes back while the engine sends
    // it nothing: the engine still counts it healthy.
    c.cut("b", true);
    restart_after_power_cut(&c, dir.path(), &disks["b"], "b");
    assert!(vol.replica("b").unwrap().is_healthy());

    // c comes back and is rebuilt; a rebuild that finds its source gone fails and the
    // next one takes a.
    c.cut("c", false);
    let mut outcome = Err("not run".to_string());
    for _ in 0..5 {
        let Ok(h) = tether_engine::rebuild::start(&vol, "c", false) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        outcome = h.await.unwrap().map_err(|e| e.to_string());
        if outcome.is_ok() {
            break;
        }
    }
    outcome.unwrap();
    assert!(vol.replica("c").unwrap().is_healthy());
    // The copies the engine counts (a and c: b's old stream failed the rebuild's flush,
    // so b is out until rebuilt) agree, and hold the acknowledged write.
    let problems = vol.verify_chunk(0, 256).await;
    assert!(problems.is_empty(), "copies disagree: {problems:?}");
    assert!(!vol.replica("b").unwrap().is_healthy());
    assert_eq!(read(&vol, 64, 8).await, second);
    vol.shutdown().await;
}

/// Reaches the replicas through `inner`; once armed, replica `a` restarts right after it
/// answers an open that takes an epoch (its disk losing what was not synced), before
/// the engine opens its I/O stream.
struct RestartAfterEpoch {
    inner: Arc<LocalConnector>,
    restart: Arc<dyn Fn() + Send + Sync>,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

struct RestartLink {
    inner: Arc<dyn tether_engine::replica::ReplicaLink>,
    restart: Option<Arc<dyn Fn() + Send + Sync>>,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

#[tonic::async_trait]
impl tether_engine::replica::Connector for RestartAfterEpoch {
    async fn connect(
        &self,
        addr: &str,
    ) -> Result<Arc<dyn tether_engine::replica::ReplicaLink>, String> {
        Ok(Arc::new(RestartLink {
            inner: self.inner.connect(addr).await?,
            restart: (addr == "a").then(|| self.restart.clone()),
            armed: self.armed.clone(),
        }))
    }
}

#[tonic::async_trait]
impl tether_engine::replica::ReplicaLink for RestartLink {
    async fn open(
        &self,
        req: tether_proto::replica::OpenRequest,
    ) -> Result<tether_proto::replica::OpenReply, tonic::Status> {
        let epoch = req.epoch;
        let r = self.inner.open(req).await;
        if let Some(restart) = &self.restart {
            if epoch != 0 && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                restart();
            }
        }
        r
    }
    async fn record_generation(
        &self,
        req: tether_proto::replica::RecordGenerationRequest,
    ) -> Result<tether_proto::replica::RecordGenerationReply, tonic::Status> {
        self.inner.record_generation(req).await
    }
    fn io(
        &self,
        outbound: tether_engine::replica::link::Outbound,
    ) -> futures::future::BoxFuture<
        'static,
        Result<tether_engine::replica::link::Inbound, tonic::Status>,
    > {
        self.inner.io(outbound)
    }
    async fn snapshots(
        &self,
        req: tether_proto::replica::SnapshotsRequest,
    ) -> Result<tether_proto::replica::SnapshotsReply, tonic::Status> {
        self.inner.snapshots(req).await
    }
    async fn delete_snapshot(
        &self,
        req: tether_proto::replica::DeleteSnapshotRequest,
    ) -> Result<tether_proto::replica::DeleteSnapshotReply, tonic::Status> {
        self.inner.delete_snapshot(req).await
    }
    async fn map(
        &self,
        req: tether_proto::replica::MapRequest,
    ) -> Result<tether_proto::replica::MapReply, tonic::Status> {
        self.inner.map(req).await
    }
    async fn hashes(
        &self,
        req: tether_proto::replica::HashesRequest,
    ) -> Result<tether_proto::replica::HashesReply, tonic::Status> {
        self.inner.hashes(req).await
    }
}

/// A newer engine decides whom to serve from what each replica said when it took the
/// epoch. A replica that restarts right after (losing an acknowledged write it had not
/// synced) must not then take the stream as if it were the process that answered:
/// served, it would hand out the old data beside copies with the new (simulation, seed
/// 70078, where a kill lost the write's record gathered in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_restarts_between_the_epoch_and_the_stream_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(LocalConnector::default());
    // a first: reads take the first healthy replica.
    let disks = on_sim_disks(&c, dir.path(), &["a", "b", "c"]);
    let old = open(&c, &["a", "b", "c"], dir.path()).await;
    let first = Bytes::from(vec![0x11u8; 8 * BLK]);
    old.write(0, first.clone(), false).await.unwrap();
    old.flush().await.unwrap();
    // Acknowledged by all three, not flushed; then the engine is gone (no clean close).
    let second = Bytes::from(vec![0x22u8; 8 * BLK]);
    old.write(0, second.clone(), false).await.unwrap();

    let disk_a = disks["a"].clone();
    let (c2, dir_path) = (c.clone(), dir.path().to_path_buf());
    let restart: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        c2.cut("a", true);
        restart_after_power_cut(&c2, &dir_path, &disk_a, "a");
    });
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let connector = Arc::new(RestartAfterEpoch {
        inner: c.clone(),
        restart,
        armed: armed.clone(),
    });
    let vol = tether_engine::open_volume_with(&cfg(&["a", "b", "c"], dir.path()), connector)
        .await
        .unwrap();
    assert!(
        !armed.load(std::sync::atomic::Ordering::SeqCst),
        "a never restarted"
    );
    // a's new process lacks the write: it is left out (and rebuilt), not served.
    assert!(!vol.replica("a").unwrap().is_healthy());
    let problems = vol.verify_chunk(0, 256).await;
    assert!(problems.is_empty(), "copies disagree: {problems:?}");
    for _ in 0..4 {
        assert_eq!(read(&vol, 0, 8).await, second);
    }
    vol.shutdown().await;
    old.shutdown().await;
}

/// A replica that restarted while its engine sent it nothing still looks healthy, and
/// its new process answers calls about the volume from a disk that lost unsynced
/// writes. Every answer names the process, so the engine drops that replica instead of
/// telling a client that a block it wrote is a hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_a_replica_that_restarted_unseen_are_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(LocalConnector::default());
    // a first: block status asks the first healthy replica.
    let disks = on_sim_disks(&c, dir.path(), &["a", "b", "c"]);
    let vol = open(&c, &["a", "b", "c"], dir.path()).await;
    let data = Bytes::from(vec![0x33u8; 8 * BLK]);
    vol.write((16 * BLK) as u64, data.clone(), false)
        .await
        .unwrap();

    // a loses power and comes back; its old stream is not cut, so the engine has not
    // noticed.
    restart_after_power_cut(&c, dir.path(), &disks["a"], "a");
    assert!(vol.replica("a").unwrap().is_healthy());

    let runs = vol.block_status(0, (32 * BLK) as u32).await.unwrap();
    let mut at = 0u64;
    for (len, allocated) in runs {
        let (s, e) = (at, at + u64::from(len));
        if s < (24 * BLK) as u64 && e > (16 * BLK) as u64 {
            assert!(allocated, "written blocks reported as a hole: [{s}, {e})");
        }
        at = e;
    }
    assert!(!vol.replica("a").unwrap().is_healthy());
    assert_eq!(read(&vol, 16, 8).await, data);
    vol.shutdown().await;
}
