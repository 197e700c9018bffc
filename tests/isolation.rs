//! One volume's trouble stays its own: while every fdatasync of one volume on a
//! replica daemon is held for 20 s, another volume on the same daemon keeps serving
//! writes and flushes promptly, and none of its replicas is dropped.
//!
//! The daemons run in this process on runtimes shaped like the real ones (one async
//! worker thread on this 2-core machine), over a disk that holds one volume's syncs.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_engine::EngineConfig;
use tether_replica::disk::{Disk, DiskFile, OsDisk};
use tether_replica::{ReplicaService, StoreOptions};

/// How long the slow volume's syncs are held.
const STALL: Duration = Duration::from_secs(20);

/// The real disk, except that while `stall` is set every sync of a file under
/// `under` waits (up to `STALL`), as a dying or overloaded disk does.
struct StallDisk {
    under: PathBuf,
    stall: Arc<AtomicBool>,
}

struct StallFile {
    f: Arc<dyn DiskFile>,
    stall: Option<Arc<AtomicBool>>,
}

impl DiskFile for StallFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.f.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.f.write_at(buf, off)
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.f.punch(off, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.f.len()
    }
    fn sync(&self) -> io::Result<()> {
        if let Some(s) = &self.stall {
            let start = Instant::now();
            while s.load(Ordering::SeqCst) && start.elapsed() < STALL {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.f.sync()
    }
    fn allocated(&self) -> io::Result<u64> {
        self.f.allocated()
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.f.allocate(len)
    }
}

impl Disk for StallDisk {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>> {
        let f = OsDisk.open(path, create)?;
        let stall = path.starts_with(&self.under).then(|| self.stall.clone());
        Ok(Arc::new(StallFile { f, stall }))
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
}

/// Starts a replica daemon on its own runtime with one async worker, as `tether
/// replica` runs on two cores; returns its address.
fn daemon(dir: PathBuf, disk: Arc<dyn Disk>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let opts = StoreOptions {
                // Small, so the slow volume's writes soon need a sync to go on.
                wal_size: 1 << 20,
                ..StoreOptions::default()
            };
            let svc = ReplicaService::with_disk(&dir, disk, opts).unwrap();
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            tether_replica::serve_with(l, svc, None, std::future::pending())
                .await
                .unwrap();
        });
    });
    addr
}

fn config(volume: &str, replicas: &[String], dir: &Path) -> EngineConfig {
    EngineConfig {
        volume: volume.to_string(),
        size: Some(64 << 20),
        replicas: replicas.to_vec(),
        nbd_listen: None,
        nbd_socket: None,
        control_socket: dir.join(format!("{volume}.sock")),
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

#[test]
fn a_stalled_volume_does_not_stall_its_neighbours() {
    let tmp = tempfile::tempdir().unwrap();
    let stall = Arc::new(AtomicBool::new(false));
    let shared_dir = tmp.path().join("shared");
    let shared: Arc<dyn Disk> = Arc::new(StallDisk {
        under: shared_dir.join("volumes").join("slow"),
        stall: stall.clone(),
    });
    let mut addrs = vec![daemon(shared_dir, shared)];
    for i in 0..2 {
        addrs.push(daemon(tmp.path().join(format!("r{i}")), Arc::new(OsDisk)));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let open = |v: &str| {
            let cfg = config(v, &addrs, tmp.path());
            async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match tether_engine::open::open_volume(&cfg).await {
                        Ok(vol) => return vol,
                        Err(e) if Instant::now() < deadline => {
                            eprintln!("opening {}: {e}", cfg.volume);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        };
        let slow = open("slow").await;
        let fast = open("fast").await;
        stall.store(true, Ordering::SeqCst);
        // The slow volume: writes that fill its log (so it needs a sync to go on) and
        // flushes, whose fdatasync is held.
        let slow_load = tokio::spawn(async move {
            let started = Instant::now();
            let mut i = 0u64;
            while started.elapsed() < STALL {
                let data = bytes::Bytes::from(vec![(i % 200) as u8 + 1; 256 << 10]);
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    slow.write((i % 256) * (256 << 10), data, false),
                )
                .await;
                if i % 8 == 7 {
                    let _ = tokio::time::timeout(Duration::from_millis(100), slow.flush()).await;
                }
                i += 1;
            }
        });
        let started = Instant::now();
        let mut took = Vec::new();
        let mut n = 0u64;
        while started.elapsed() < STALL {
            let t = Instant::now();
            let data = bytes::Bytes::from(vec![(n % 200) as u8 + 1; 64 << 10]);
            fast.write((n % 1024) * (64 << 10), data, false).await.unwrap();
            fast.flush().await.unwrap();
            took.push(t.elapsed());
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stall.store(false, Ordering::SeqCst);
        slow_load.await.unwrap();
        took.sort();
        let worst = took.last().copied().unwrap_or_default();
        let p99 = took.get(took.len() * 99 / 100).copied().unwrap_or_default();
        eprintln!(
            "fast volume: {n} writes and flushes during the stall, p99 {p99:?}, the slowest {worst:?}"
        );
        assert!(n > 100, "only {n} writes and flushes in {STALL:?}");
        // A fast volume tied to the slow one waits on a held sync: seconds, then its
        // replica is dropped. The shared disk itself has hiccups (one fdatasync of
        // 130 ms was seen in CI, as the kernel's journal commit also wrote the slow
        // volume's new blocks), so one outlier is allowed, a pattern of them is not.
        assert!(
            p99 <= Duration::from_millis(100),
            "1 in 100 writes and flushes of the fast volume took {p99:?} or longer while the slow one's syncs were held"
        );
        assert!(
            worst <= Duration::from_secs(1),
            "a write and flush of the fast volume took {worst:?} while the slow one's syncs were held"
        );
        for r in fast.replicas() {
            assert!(r.is_healthy(), "replica {} of the fast volume was dropped: {}", r.addr, r.reason());
        }
    });
}
