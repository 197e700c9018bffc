//! Real processes killed with SIGKILL while a client writes and flushes, and a replica
//! whose disk fills up: nothing acknowledged after a flush is lost.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BLOCKS: u64 = 512;

fn content(block: u64, version: u32) -> Vec<u8> {
    let mut b = vec![(version % 251) as u8; 4096];
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b
}

fn version_of(block: u64, b: &[u8]) -> Result<u32, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(0);
    }
    let v = u32::from_le_bytes(b[8..12].try_into().unwrap());
    if b[..8] != block.to_le_bytes() || b[12..].iter().any(|&x| x != (v % 251) as u8) {
        return Err(format!("block {block} is garbage"));
    }
    Ok(v)
}

/// Writes block after block (versions count up), flushing every 16 writes, until
/// stopped or the volume fails; returns the versions known flushed.
fn writer(addr: std::net::SocketAddr, stop: Arc<AtomicBool>, flushed: Arc<Mutex<Vec<u32>>>) {
    let Ok(mut cl) = NbdClient::connect(addr, "vol") else {
        return;
    };
    let mut written = vec![0u32; BLOCKS as usize];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let b = (n * 7) % BLOCKS;
        let v = written[b as usize] + 1;
        match cl.write(b * 4096, &content(b, v)) {
            Ok(0) => written[b as usize] = v,
            _ => return,
        }
        n += 1;
        if n.is_multiple_of(16) {
            match cl.flush() {
                Ok(0) => *flushed.lock().unwrap() = written.clone(),
                _ => return,
            }
        }
    }
}

fn check(c: &Cluster, flushed: &[u32]) {
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    let data = cl.read(0, (BLOCKS * 4096) as u32).unwrap().unwrap();
    for b in 0..BLOCKS {
        let v = version_of(b, &data[(b * 4096) as usize..((b + 1) * 4096) as usize]).unwrap();
        assert!(
            v >= flushed[b as usize],
            "block {b}: version {v} is older than the flushed {}",
            flushed[b as usize]
        );
    }
}

#[test]
fn sigkill_replicas_mid_write_and_flush_loses_nothing_flushed() {
    let mut c = Cluster::start(3, "16M");
    let flushed = Arc::new(Mutex::new(vec![0u32; BLOCKS as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = c.engine().nbd;
    let w = {
        let (stop, flushed) = (stop.clone(), flushed.clone());
        std::thread::spawn(move || writer(addr, stop, flushed))
    };
    std::thread::sleep(Duration::from_millis(700));
    // One replica dies; the writer carries on with two.
    c.replicas[0].kill9();
    std::thread::sleep(Duration::from_millis(700));
    // Then the rest die together, mid-write.
    c.replicas[1].kill9();
    c.replicas[2].kill9();
    w.join().unwrap();
    let flushed = flushed.lock().unwrap().clone();
    assert!(flushed.iter().sum::<u32>() > 0, "nothing was flushed");
    if let Some(mut e) = c.engine.take() {
        e.kill9();
    }
    c.restart_all();
    check(&c, &flushed);
    // The replica killed first missed writes: it is stale and not served from; it
    // rebuilds online and rejoins.
    let log = c.engine().log_text();
    assert!(log.contains("stale: not in sync"), "{log}");
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
    check(&c, &flushed);
    let v = Command::new(BIN)
        .args(["volume", "verify", "vol", "--control-socket"])
        .arg(&c.engine().control)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    // The stale replica's own store recovered too.
    let log = std::fs::read_to_string(c.replicas[0].dir.with_extension("log")).unwrap();
    assert!(log.contains("volume recovered"), "{log}");
}

struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "mounting a small tmpfs needs root (CI runs as root)");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_gives_enospc_keeps_flushed_data_and_recovers() {
    let dir = tempfile::Builder::new()
        .prefix("tether-full")
        .tempdir_in(test_root())
        .unwrap();
    let mnt = dir.path().join("small");
    let _fs = Tmpfs::mount(&mnt, "20m");
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; 6 << 20]).unwrap();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut rep = Command::new(BIN)
        .args([
            "replica",
            "--listen",
            &addr.to_string(),
            "--wal-size",
            "2M",
            "--data",
        ])
        .arg(mnt.join("data"))
        .stderr(std::fs::File::create(dir.path().join("replica.log")).unwrap())
        .spawn()
        .unwrap();
    wait_port(addr, &mut rep, "replica");
    let nbd: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut eng = Command::new(BIN)
        .args([
            "engine",
            "--volume",
            "vol",
            "--size",
            "64M",
            "--replica",
            &addr.to_string(),
        ])
        .args(["--nbd-listen", &nbd.to_string(), "--control-socket"])
        .arg(dir.path().join("c.sock"))
        .stderr(std::fs::File::create(dir.path().join("engine.log")).unwrap())
        .spawn()
        .unwrap();
    wait_port(nbd, &mut eng, "engine");
    let mut cl = NbdClient::connect(nbd, "vol").unwrap();
    let mut acked = Vec::new();
    let mut enospc = false;
    for i in 0..4000u64 {
        let b = i % 16000;
        match cl.write(b * 4096, &content(b, 1)).unwrap() {
            0 => acked.push(b),
            28 => {
                enospc = true;
                break;
            }
            e => panic!("write {i} failed with {e}, expected ENOSPC eventually"),
        }
        if i % 64 == 63 {
            assert_eq!(cl.flush().unwrap(), 0);
        }
    }
    assert!(enospc, "the disk never filled up");
    // Everything acknowledged is still readable.
    for &b in acked.iter().step_by(37) {
        let d = cl.read(b * 4096, 4096).unwrap().unwrap();
        assert_eq!(version_of(b, &d), Ok(1), "block {b}");
    }
    // Free space: writes work again, on the same connection and replica.
    std::fs::remove_file(&filler).unwrap();
    let b = 15999;
    assert_eq!(cl.write(b * 4096, &content(b, 2)).unwrap(), 0);
    assert_eq!(cl.flush().unwrap(), 0);
    assert_eq!(
        version_of(b, &cl.read(b * 4096, 4096).unwrap().unwrap()),
        Ok(2)
    );
    let _ = eng.kill();
    let _ = eng.wait();
    let _ = rep.kill();
    let _ = rep.wait();
}
