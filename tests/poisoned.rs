//! A replica whose disk fails an fdatasync is poisoned: it refuses writes until
//! rebuilt. It must come back through a rebuild while its daemon keeps running, the
//! engine must not hammer a disk that keeps failing, and status must say why the
//! replica is out. The daemon here runs in the test process on a disk whose syncs
//! fail on demand; the engine and the other replicas are real processes.

mod common;
use common::*;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_replica::disk::{Disk, DiskFile, OsDisk};

/// The real disk, except that `sync` fails with EIO while `failing` is set.
struct FailingSyncs {
    failing: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
}

struct File {
    inner: Arc<dyn DiskFile>,
    failing: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
}

impl DiskFile for File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.punch(off, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn sync(&self) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(5));
        }
        self.inner.sync()
    }
    fn allocated(&self) -> io::Result<u64> {
        self.inner.allocated()
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.inner.allocate(len)
    }
}

impl Disk for FailingSyncs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>> {
        Ok(Arc::new(File {
            inner: OsDisk.open(path, create)?,
            failing: self.failing.clone(),
            failed: self.failed.clone(),
        }))
    }
    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        OsDisk.read_file(path)
    }
    fn replace(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
        OsDisk.replace(path, contents)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        OsDisk.remove(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        OsDisk.list(dir)
    }
    fn drop_cache(&self, path: &Path) {
        OsDisk.drop_cache(path)
    }
}

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
    let failing = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let disk = Arc::new(FailingSyncs {
        failing: failing.clone(),
        failed: failed.clone(),
    });
    let dir = c.dir.path().join("faulty");
    let addr = in_process_replica(&dir, disk).to_string();
    c.engine().ctl_ok(&["replica", "add", "vol", &addr]);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    for i in 0..8u64 {
        assert_eq!(cl.write(i * 4096, &[i as u8 + 1; 4096]).unwrap(), 0);
    }
    assert_eq!(cl.flush().unwrap(), 0);

    // The disk starts failing its syncs: the next flush poisons the replica, which
    // is dropped; the flush itself succeeds on the two others.
    failing.store(true, Ordering::SeqCst);
    assert_eq!(cl.write(0, &[0xaa; 4096]).unwrap(), 0);
    assert_eq!(cl.flush().unwrap(), 0);
    assert!(failed.load(Ordering::SeqCst) > 0, "no sync failed");
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
    failing.store(false, Ordering::SeqCst);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(90));
    let log = c.engine().log_text();
    assert!(log.contains("rebuild finished"), "{log}");
    ctl_ok_verify(&c);
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

fn ctl_ok_verify(c: &Cluster) {
    c.engine().ctl_ok(&["volume", "verify", "vol"]);
}
