//! The volume core over the in-memory replica link (`replica::local`): the real
//! replica service and store in this process, no network. What a write acknowledges
//! is on every replica; a replica whose link is cut drops out while writes go on, and
//! a later engine opening from it alone finds only what it had.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tether_engine::replica::local::LocalConnector;
use tether_engine::replica::ReplicaState;
use tether_engine::volume::Volume;
use tether_engine::EngineConfig;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_every_replica_and_a_cut_replica_keeps_only_what_it_had() {
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(LocalConnector::default());
    for name in ["a", "b"] {
        let svc = tether_replica::ReplicaService::new(
            &dir.path().join(name),
            tether_replica::StoreOptions::default(),
        )
        .unwrap();
        c.add(name, svc);
    }

    let vol = open(&c, &["a", "b"], dir.path()).await;
    let first = Bytes::from(vec![0x11u8; 32 * BLK]);
    vol.write(0, first.clone(), false).await.unwrap();
    vol.flush().await.unwrap();
    assert_eq!(read(&vol, 0, 32).await, first);
    // Both replicas hold it: every block's copies agree.
    let problems = vol.verify_chunk(0, 256).await;
    assert!(problems.is_empty(), "{problems:?}");

    // Replica b falls off; the next write drops it and is acknowledged by a alone.
    c.cut("b", true);
    let second = Bytes::from(vec![0x22u8; 8 * BLK]);
    vol.write((64 * BLK) as u64, second.clone(), false)
        .await
        .unwrap();
    vol.flush().await.unwrap();
    let b_state = vol.replica("b").unwrap().state();
    assert!(
        matches!(b_state, ReplicaState::Failed { .. }),
        "b is still {}",
        b_state.name()
    );
    assert_eq!(read(&vol, 64, 8).await, second);
    vol.shutdown().await;

    // A later engine that reaches only b reads what b had: the first write, and not
    // the second (which b never saw).
    c.cut("b", false);
    c.cut("a", true);
    let later = open(&c, &["b"], dir.path()).await;
    assert_eq!(read(&later, 0, 32).await, first);
    assert_eq!(read(&later, 64, 8).await, vec![0u8; 8 * BLK]);
    later.shutdown().await;
}
