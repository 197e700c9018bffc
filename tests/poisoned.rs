//! A replica whose disk fails an fdatasync is poisoned: it refuses writes until
//! rebuilt. It must come back through a rebuild while its daemon keeps running, the
//! engine must not hammer a disk that keeps failing, and status must say why the
//! replica is out. The daemon here runs in the test process on a disk whose syncs
//! fail on demand; the engine and the other replicas are real processes.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_replica::disk::Disk;
use tether_replica::sim::SyncFaults;

/// Starts a replica daemon on this process's own runtime thread, over `disk`.
fn in_process_replica(dir: &Path, disk: Arc<dyn Disk>) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let svc = tether_replica::ReplicaService::with_disk(
        dir,
        disk,
        tether_replica::StoreOptions::default(),
    )
    .unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = tether_replica::serve_with(l, svc, None, std::future::pending()).await;
        });
    });
    addr
}

#[test]
fn a_poisoned_replica_returns_through_a_rebuild_without_a_daemon_restart() {
    let c = Cluster::start_with(2, "16M", &["--replicas", "3"]);
    let disk = SyncFaults::default();
    let dir = c.dir.path().join("faulty");
    let addr = in_process_replica(&dir, Arc::new(disk.clone())).to_string();
    c.engine().ctl_ok(&["replica", "add", "vol", &addr]);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    for i in 0..8u64 {
        assert_eq!(cl.write(i * 4096, &[i as u8 + 1; 4096]).unwrap(), 0);
    }
    assert_eq!(cl.flush().unwrap(), 0);

    // The disk starts failing its syncs: the next flush poisons the replica, which
    // is dropped; the flush itself succeeds on the two others.
    disk.fail_syncs(true);
    assert_eq!(cl.write(0, &[0xaa; 4096]).unwrap(), 0);
    assert_eq!(cl.flush().unwrap(), 0);
    assert!(disk.failed() > 0, "no sync failed");
    let st = c.engine().status_json("vol");
    let mine = |st: &serde_json::Value| {
        st["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["address"] == addr.as_str())
            .cloned()
            .unwrap()
    };
    assert_eq!(mine(&st)["state"], "failed", "{st}");
    assert!(
        mine(&st)["reason"].as_str().unwrap().contains("poisoned"),
        "status does not say why: {st}"
    );
    // While the disk keeps failing, attempts to bring it back fail and space out:
    // no rebuild every 2 s.
    let watch = Instant::now();
    let (mut attempts, mut longest_wait) = (0, 0);
    while watch.elapsed() < Duration::from_secs(16) {
        let st = c.engine().status_json("vol");
        let r = mine(&st);
        attempts = attempts.max(r["failed_attempts"].as_u64().unwrap_or(0));
        longest_wait = longest_wait.max(r["retry_in_seconds"].as_u64().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(200));
    }
    // The engine's log names every attempt that failed, whatever the engine's age.
    let tried = c
        .engine()
        .log_text()
        .lines()
        .filter(|l| l.contains("rebuild failed; it will be retried") && l.contains(addr.as_str()))
        .count();
    // Every 2 s would be 8 attempts; doubling pauses make 4 at most.
    assert!(
        tried <= 4,
        "{tried} attempts in 16 s: the engine does not back off"
    );
    assert!(
        attempts >= 2,
        "the engine did not retry the rebuild: {attempts}"
    );
    assert!(
        longest_wait >= 3,
        "status never showed a growing pause: {longest_wait} s"
    );
    assert_eq!(cl.write(4096, &[0xbb; 4096]).unwrap(), 0);
    assert_eq!(cl.flush().unwrap(), 0);

    // The disk recovers: the same daemon takes the replica back through a rebuild.
    disk.fail_syncs(false);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(90));
    let log = c.engine().log_text();
    assert!(log.contains("rebuild finished"), "{log}");
    c.engine().ctl_ok(&["volume", "verify", "vol"]);
    for _ in 0..3 {
        assert_eq!(cl.read(0, 4096).unwrap().unwrap(), vec![0xaa; 4096]);
        assert_eq!(cl.read(4096, 4096).unwrap().unwrap(), vec![0xbb; 4096]);
        assert_eq!(cl.read(2 * 4096, 4096).unwrap().unwrap(), vec![3; 4096]);
    }
    // And it takes writes and flushes again.
    assert_eq!(cl.write(8 * 4096, &[0xcc; 4096]).unwrap(), 0);
    assert_eq!(cl.flush().unwrap(), 0);
    assert_eq!(c.engine().healthy("vol"), 3);
}
