//! The volume core over two real replica stores, in one process: a bad block copy
//! met inside a read-modify-write is repaired under the write's own hold, and
//! nothing queues behind it for ever.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tether_engine::volume::Volume;
use tether_engine::EngineConfig;

const BLK: u64 = 4096;
/// Long enough for any step on an idle machine; a hang runs into it.
const PATIENCE: Duration = Duration::from_secs(20);

async fn replica(dir: &std::path::Path) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let svc =
        tether_replica::ReplicaService::new(dir, tether_replica::StoreOptions::default()).unwrap();
    tokio::spawn(tether_replica::serve_with(
        l,
        svc,
        None,
        std::future::pending(),
    ));
    addr
}

async fn open(replicas: Vec<String>, dir: &std::path::Path) -> Arc<Volume> {
    let cfg = EngineConfig {
        volume: "vol".into(),
        size: Some(16 << 20),
        replicas,
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
    };
    tether_engine::open_volume(&cfg).await.unwrap()
}

async fn step<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what} hangs"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_modify_write_over_a_bad_copy_repairs_under_its_own_hold() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let replicas = vec![replica(&a).await, replica(&b).await];
    let vol = open(replicas, dir.path()).await;
    let data = Bytes::from(vec![0x77u8; 64 * BLK as usize]);
    step("write", vol.write(0, data, false)).await.unwrap();
    // A snapshot checkpoints the log: the blocks now live in layer 1.
    step("snapshot", vol.snapshot("base")).await.unwrap();
    let layer = std::fs::OpenOptions::new()
        .write(true)
        .open(a.join("volumes/vol/layers/1.data"))
        .unwrap();
    for blk in 5..9u64 {
        layer
            .write_all_at(&[0xff, 0x00, 0xff], blk * BLK + 123)
            .unwrap();
    }
    // Reads alternate between the replicas: at least two of these edge reads meet
    // the bad copy first.
    for blk in 5..9u64 {
        let w = vol.write(blk * BLK + 100, Bytes::from_static(&[0xab; 200]), false);
        step("an unaligned write over a bad copy", w).await.unwrap();
    }
    let seen = vol
        .counters
        .checksum_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        seen >= 2,
        "the bad copies were met {seen} times: the test proves nothing"
    );
    // Nothing queued behind them.
    step("a snapshot after them", vol.snapshot("after"))
        .await
        .unwrap();
    step("an expand after them", vol.expand(32 << 20))
        .await
        .unwrap();
    step("a flush after them", vol.flush()).await.unwrap();
    let mut want = vec![0x77u8; BLK as usize];
    want[100..300].fill(0xab);
    for blk in 5..9u64 {
        for _ in 0..2 {
            let got = step("a read", vol.read(blk * BLK, BLK as u32))
                .await
                .unwrap();
            assert_eq!(got.concat(), want, "block {blk}");
        }
    }
    // Every copy of the head agrees and checks out.
    for chunk in (0..(16u64 << 20) / BLK).step_by(256) {
        let problems = step("verify", vol.verify_chunk(chunk, 256)).await;
        assert!(problems.is_empty(), "{problems:?}");
    }
}
