//! Replicas that fail, come back and rebuild online; fencing; replica policy.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn ctl(c: &Cluster, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--control-socket")
        .arg(&c.engine().control)
        .output()
        .unwrap()
}

/// Adds replica `new` to the volume with `tether replica add`.
fn add_replica(c: &Cluster, new: &Replica) {
    let out = ctl(c, &["replica", "add", "vol", &new.addr.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copied_bytes(log: &str) -> u64 {
    log.lines()
        .rev()
        .filter(|l| l.contains("rebuild finished"))
        .filter_map(|l| l.split("copied=").nth(1))
        .find_map(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Three replicas of `size` whose first `mib` MiB are written (each MiB its own
/// byte) and flushed.
fn filled(size: &str, mib: u64) -> (Cluster, NbdClient) {
    let c = Cluster::start(3, size);
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    for i in 0..mib {
        assert_eq!(
            cl.write(i << 20, &vec![(i % 200) as u8 + 1; 1 << 20])
                .unwrap(),
            0
        );
    }
    assert_eq!(cl.flush().unwrap(), 0);
    (c, cl)
}

/// Three replicas of 64 MiB holding 32 MiB, flushed, and the third one killed.
fn filled_with_one_replica_down() -> (Cluster, NbdClient) {
    let (mut c, cl) = filled("64M", 32);
    c.replicas[2].kill9();
    (c, cl)
}

#[test]
fn returning_replica_copies_only_what_it_missed() {
    let (mut c, mut cl) = filled_with_one_replica_down();
    assert_eq!(cl.write(40 << 20, &vec![0xee; 1 << 20]).unwrap(), 0);
    let out = ctl(&c, &["snapshot", "create", "vol", "after"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cl.write(50 << 20, &vec![0xdd; 512 << 10]).unwrap(), 0);
    let dir = c.replicas[2].dir.clone();
    let port = c.replicas[2].addr.port();
    c.replicas[2] = Replica::start(&dir, port);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
    let copied = copied_bytes(&c.engine().log_text());
    assert!(
        copied <= 2 << 20,
        "copied {copied} bytes; it missed 1.5 MiB"
    );
    let v = ctl(&c, &["volume", "verify", "vol"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    // The rebuilt replica serves the snapshot too.
    for _ in 0..3 {
        let mut s = NbdClient::connect(c.engine().nbd, "vol@after").unwrap();
        assert_eq!(s.read(40 << 20, 4096).unwrap().unwrap(), vec![0xee; 4096]);
        assert_eq!(s.read(50 << 20, 4096).unwrap().unwrap(), vec![0; 4096]);
    }
}

#[test]
fn a_replica_that_lost_its_disk_is_rebuilt_whole_despite_the_record() {
    let (mut c, mut cl) = filled_with_one_replica_down();
    // The others start a record of what it misses: 1 MiB.
    assert_eq!(cl.write(40 << 20, &vec![0xee; 1 << 20]).unwrap(), 0);
    assert_eq!(cl.flush().unwrap(), 0);
    // It comes back with an empty disk: the record is about the copy it lost.
    let dir = c.replicas[2].dir.clone();
    std::fs::remove_dir_all(&dir).unwrap();
    let port = c.replicas[2].addr.port();
    c.replicas[2] = Replica::start(&dir, port);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
    let copied = copied_bytes(&c.engine().log_text());
    assert!(
        copied >= 33 << 20,
        "copied {copied} bytes into an empty replica of a volume holding 33 MiB"
    );
    let v = ctl(&c, &["volume", "verify", "vol"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

#[test]
fn replica_add_rebuilds_a_new_replica_under_io() {
    let c = Cluster::start_with(2, "64M", &["--replicas", "3"]);
    let addr = c.engine().nbd;
    let mut cl = NbdClient::connect(addr, "vol").unwrap();
    for i in 0..48u64 {
        assert_eq!(
            cl.write(i << 20, &vec![(i % 200) as u8 + 1; 1 << 20])
                .unwrap(),
            0
        );
    }
    let st = c.engine().status_json("vol");
    assert_eq!(st["degraded"], true, "{st}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut cl = NbdClient::connect(addr, "vol").unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let b = (n * 13) % 16384;
                assert_eq!(cl.write(b * 4096, &[(n % 250) as u8 + 1; 4096]).unwrap(), 0);
                n += 1;
            }
            assert_eq!(cl.flush().unwrap(), 0);
            n
        })
    };
    let new = Replica::start(&c.dir.path().join("new"), free_port());
    let out = ctl(&c, &["replica", "add", "vol", &new.addr.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut saw_progress = false;
    loop {
        let st = c.engine().status_json("vol");
        let reps = st["replicas"].as_array().unwrap().clone();
        if reps
            .iter()
            .any(|r| r["state"] == "rebuilding" && r["rebuild_total"].as_u64() > Some(0))
        {
            saw_progress = true;
        }
        if reps.iter().filter(|r| r["state"] == "healthy").count() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "rebuild did not finish: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    let text = String::from_utf8_lossy(&ctl(&c, &["volume", "status", "vol"]).stdout).to_string();
    assert!(
        saw_progress || c.engine().log_text().contains("rebuild finished"),
        "{text}"
    );
    assert_eq!(c.engine().status_json("vol")["degraded"], false);
    let v = ctl(&c, &["volume", "verify", "vol"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    drop(new);
}

#[test]
fn a_newer_engine_fences_the_older_one() {
    let mut c = Cluster::start(3, "16M");
    let mut old = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(old.write(0, &[1u8; 4096]).unwrap(), 0);
    // A second engine for the same volume (say, after a failover) takes a newer epoch.
    let first = c.engine.take().unwrap();
    c.start_engine(None);
    let mut new = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(new.write(0, &[2u8; 4096]).unwrap(), 0);
    // The old engine can no longer write anything anywhere.
    assert_eq!(old.write(0, &[3u8; 4096]).unwrap(), 5, "EIO");
    assert_eq!(old.write(8192, &[3u8; 4096]).unwrap(), 5, "EIO");
    assert_eq!(new.read(0, 4096).unwrap().unwrap(), vec![2u8; 4096]);
    assert_eq!(new.read(8192, 4096).unwrap().unwrap(), vec![0u8; 4096]);
    assert!(
        first.log_text().contains("newer engine has taken over"),
        "{}",
        first.log_text()
    );
    drop(first);
}

#[test]
fn min_replicas_refuses_writes_on_too_few_copies_and_metrics_show_it() {
    let metrics = free_port();
    let mut c = Cluster::start_with(
        3,
        "16M",
        &[
            "--min-replicas",
            "2",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
        ],
    );
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(cl.write(0, &[1u8; 4096]).unwrap(), 0);
    c.replicas[0].kill9();
    assert_eq!(
        cl.write(0, &[2u8; 4096]).unwrap(),
        0,
        "two copies are enough"
    );
    c.replicas[1].kill9();
    assert_eq!(
        cl.write(0, &[3u8; 4096]).unwrap(),
        5,
        "one copy is below --min-replicas"
    );
    // A failed write may or may not have reached the surviving replica; either
    // version is fine, and reads still work.
    let got = cl.read(0, 4096).unwrap().unwrap();
    assert!(got == vec![2u8; 4096] || got == vec![3u8; 4096]);
    // Now the engine knows: writes are refused up front.
    assert_eq!(cl.write(4096, &[4u8; 4096]).unwrap(), 5);
    assert_eq!(cl.read(4096, 4096).unwrap().unwrap(), vec![0u8; 4096]);
    let body = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        b
    };
    assert!(
        body.contains("tether_volume_replicas_healthy{volume=\"vol\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("tether_volume_degraded{volume=\"vol\"} 1"),
        "{body}"
    );
    // Removing the last healthy replica is refused.
    let out = ctl(
        &c,
        &["replica", "rm", "vol", &c.replica_addr(2).to_string()],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("min-replicas"));
}

#[test]
fn replica_rm_takes_a_replica_out() {
    let c = Cluster::start(3, "16M");
    let out = ctl(
        &c,
        &["replica", "rm", "vol", &c.replica_addr(1).to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = c.engine().status_json("vol");
    assert_eq!(st["replicas"].as_array().unwrap().len(), 2, "{st}");
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(cl.write(0, &[7u8; 4096]).unwrap(), 0);
    assert_eq!(cl.flush().unwrap(), 0);
}

#[test]
fn slow_replica_stays_hung_replica_goes() {
    let c = Cluster::start_proxied(3, "16M", &["--timeout", "2"]);
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    c.proxies[0].set(ProxyMode::Delay(300));
    for i in 0..5u64 {
        assert_eq!(cl.write(i * 4096, &[9u8; 4096]).unwrap(), 0);
    }
    assert_eq!(cl.flush().unwrap(), 0);
    assert_eq!(
        c.engine().healthy("vol"),
        3,
        "slow under the timeout is not dropped"
    );
    c.proxies[0].set(ProxyMode::Pass);
    c.proxies[1].set(ProxyMode::Blackhole);
    let t = Instant::now();
    assert_eq!(cl.write(0, &[8u8; 4096]).unwrap(), 0);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let st = c.engine().status_json("vol");
    assert_eq!(st["replicas"][1]["state"], "failed", "{st}");
    // Healed, it comes back through a rebuild.
    c.proxies[1].set(ProxyMode::Pass);
    c.proxies[1].cut();
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
    assert_eq!(cl.read(0, 4096).unwrap().unwrap(), vec![8u8; 4096]);
}

#[test]
fn interrupted_rebuild_restarts_cleanly_after_either_side_dies() {
    let (mut c, cl) = filled("128M", 96);
    drop(cl);
    // Replica 2 comes back empty: a full rebuild starts.
    c.replicas[2].kill9();
    let dir = c.replicas[2].dir.clone();
    let port = c.replicas[2].addr.port();
    std::fs::remove_dir_all(&dir).unwrap();
    c.replicas[2] = Replica::start(&dir, port);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.engine().log_text().contains("rebuild started") {
        assert!(Instant::now() < deadline, "no rebuild started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The engine dies mid-rebuild: the half-built replica must not count as fresh.
    if let Some(mut e) = c.engine.take() {
        e.kill9();
    }
    c.start_engine(None);
    let log = c.engine().log_text();
    assert!(
        log.contains("rebuild did not finish") || log.contains("stale: revision"),
        "{log}"
    );
    // The target dies mid-rebuild too, then returns: the rebuild completes.
    std::thread::sleep(Duration::from_millis(300));
    c.replicas[2].kill9();
    c.replicas[2] = Replica::start(&dir, port);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(120));
    let v = ctl(&c, &["volume", "verify", "vol"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

#[test]
fn wal_dir_puts_the_log_on_another_disk() {
    let dir = tempfile::Builder::new()
        .prefix("tether-wal")
        .tempdir_in(test_root())
        .unwrap();
    let wal = dir.path().join("fast");
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let start = || {
        let mut r = Command::new(BIN)
            .args([
                "replica",
                "--listen",
                &addr.to_string(),
                "--wal-size",
                "4M",
                "--wal-dir",
            ])
            .arg(&wal)
            .arg("--data")
            .arg(dir.path().join("bulk"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_port(addr, &mut r, "replica");
        r
    };
    let mut rep = start();
    let nbd: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let engine = |size: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.args(["engine", "--volume", "vol", "--replica", &addr.to_string()])
            .args(["--nbd-listen", &nbd.to_string(), "--control-socket"])
            .arg(dir.path().join("c.sock"))
            .stderr(std::process::Stdio::null());
        if let Some(s) = size {
            cmd.args(["--size", s]);
        }
        let mut e = cmd.spawn().unwrap();
        wait_port(nbd, &mut e, "engine");
        e
    };
    let mut e = engine(Some("16M"));
    let mut cl = NbdClient::connect(nbd, "vol").unwrap();
    assert_eq!(cl.write(4096, &[0x42; 8192]).unwrap(), 0);
    assert_eq!(cl.flush().unwrap(), 0);
    assert!(wal.join("vol.wal").exists(), "the log is not in --wal-dir");
    assert!(!dir.path().join("bulk/volumes/vol/wal").exists());
    drop(cl);
    let _ = e.kill();
    let _ = e.wait();
    let _ = rep.kill();
    let _ = rep.wait();
    let mut rep = start();
    let mut e = engine(None);
    let mut cl = NbdClient::connect(nbd, "vol").unwrap();
    assert_eq!(cl.read(4096, 8192).unwrap().unwrap(), vec![0x42; 8192]);
    let _ = e.kill();
    let _ = e.wait();
    let _ = rep.kill();
    let _ = rep.wait();
}

#[test]
fn rebuild_rate_paces_the_copy() {
    let c = Cluster::start_with(2, "64M", &["--replicas", "3", "--rebuild-rate", "8"]);
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    for i in 0..32u64 {
        assert_eq!(cl.write(i << 20, &vec![i as u8 + 1; 1 << 20]).unwrap(), 0);
    }
    assert_eq!(cl.flush().unwrap(), 0);
    let new = Replica::start(&c.dir.path().join("new"), free_port());
    let started = Instant::now();
    add_replica(&c, &new);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
    // 32 MiB at 8 MiB/s: never faster than the limit (a lower bound only: how much
    // slower depends on the machine).
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(3500),
        "rebuilt 32 MiB in {took:?} at 8 MiB/s"
    );
    assert!(copied_bytes(&c.engine().log_text()) >= 32 << 20);
    let v = ctl(&c, &["volume", "verify", "vol"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    drop(new);
}

#[test]
fn returning_replica_copies_about_what_changed_across_an_engine_restart() {
    // Full: every MiB written.
    let (mut c, mut cl) = filled("4G", 4096);
    c.replicas[2].kill9();
    // 1 % changes while it is away: 41 MiB spread over the volume.
    for i in 0..41u64 {
        assert_eq!(cl.write((i * 100) << 20, &vec![0xa5; 1 << 20]).unwrap(), 0);
    }
    assert_eq!(cl.flush().unwrap(), 0);
    drop(cl);
    // A new engine in between: what the replica missed is found again.
    c.engine.as_mut().unwrap().stop();
    c.start_engine(None);
    c.restart_replica(2);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(300));
    let copied = copied_bytes(&c.engine().log_text());
    assert!(
        copied <= (4u64 << 30) / 50,
        "copied {copied} bytes, more than 2 % of the volume; 41 MiB changed"
    );
    assert!(copied >= 41 << 20, "copied {copied} bytes; 41 MiB changed");
    // The replicas that stayed kept a record of what was written while it was away
    // (across the engine restart), so only that was looked at: the build before the
    // record compared all 1,048,576 blocks.
    let log = c.engine().log_text();
    let compared = finished_field(&log, "compared").unwrap_or(u64::MAX);
    eprintln!("compared {compared} blocks, copied {copied} bytes");
    assert!(
        compared <= (1 << 20) / 50,
        "compared {compared} blocks, more than 2 % of the volume's; from: {}",
        log.lines()
            .filter(|l| l.contains("rebuild"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let v = ctl(&c, &["volume", "verify", "vol"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

/// The number after `key=` in the engine's last "rebuild finished" line.
fn finished_field(log: &str, key: &str) -> Option<u64> {
    log.lines()
        .rev()
        .filter(|l| l.contains("rebuild finished"))
        .filter_map(|l| l.split(&format!("{key}=")).nth(1))
        .find_map(|r| r.split_whitespace().next()?.parse().ok())
}

#[test]
fn a_thin_volumes_rebuild_looks_only_at_its_data() {
    let c = Cluster::start_with(2, "1G", &["--replicas", "3"]);
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    // 4 MiB in 64 KiB pieces, 16 MiB apart, in a 1 GiB volume.
    for i in 0..64u64 {
        assert_eq!(cl.write(i << 24, &vec![i as u8 + 1; 64 << 10]).unwrap(), 0);
    }
    assert_eq!(cl.flush().unwrap(), 0);
    let new = Replica::start(&c.dir.path().join("new"), free_port());
    add_replica(&c, &new);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(120));
    let log = c.engine().log_text();
    // 1024 blocks hold data; the volume has 262,144.
    let compared = finished_field(&log, "compared");
    assert_eq!(compared, Some(1024), "blocks compared, from: {log}");
    assert_eq!(finished_field(&log, "copied"), Some(4 << 20));
    let v = ctl(&c, &["volume", "verify", "vol"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    drop(new);
}
