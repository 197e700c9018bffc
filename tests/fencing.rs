//! A fenced engine acknowledges nothing; one bad block copy never hangs a volume; a
//! replica removed mid-rebuild stays removed. Each test is a sequence a user could
//! type, run against real processes.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

const BLK: u64 = 4096;

/// E1 serves r0 and r1 and is rebuilding r2, which takes its writes already. E2 opens
/// the volume on all three and judges r2 stale (its rebuild did not finish). E2 must
/// still take its epoch on r2, so E1 can acknowledge nothing there: before the fix,
/// E1's write and flush landed on r2 alone and both succeeded.
#[test]
fn a_fenced_engine_acknowledges_nothing_through_a_replica_the_new_one_judged_stale() {
    // 24 MiB to copy at 8 MiB/s: E2 opens while the rebuild is under way.
    let mut c = Cluster::start_with(2, "64M", &["--replicas", "3", "--rebuild-rate", "8"]);
    let mut old = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(old.write(0, &[1u8; 4096]).unwrap(), 0);
    for i in 4..28u64 {
        assert_eq!(old.write(i << 20, &vec![i as u8; 1 << 20]).unwrap(), 0);
    }
    assert_eq!(old.flush().unwrap(), 0);
    let r2 = Replica::start(&c.dir.path().join("r2"), free_port());
    c.engine()
        .ctl_ok(&["replica", "add", "vol", &r2.addr.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.engine().log_text().contains("rebuild started") {
        assert!(Instant::now() < deadline, "the rebuild never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // E2 on all three replicas, E1 still running.
    c.replicas.push(r2);
    let first = c.engine.take().unwrap();
    c.start_engine(None);
    let judged = c.engine().log_text();
    assert!(
        judged.contains("rebuild did not finish"),
        "E2 did not judge the replica under rebuild stale: the case is not exercised\n{judged}"
    );
    // E1: nothing is acknowledged any more, whichever replica would take it.
    assert_eq!(
        old.write(0, &[3u8; 4096]).unwrap(),
        5,
        "write through E1: EIO"
    );
    assert_eq!(old.flush().unwrap(), 5, "flush through E1: EIO");
    assert_eq!(old.write(8192, &[3u8; 4096]).unwrap(), 5, "EIO");
    assert_eq!(old.read(0, 4096).unwrap(), Err(5), "read through E1: EIO");
    assert!(
        first.log_text().contains("newer engine has taken over"),
        "{}",
        first.log_text()
    );
    // E2 serves what was acknowledged, from every replica once r2 is rebuilt.
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
    let mut new = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    for _ in 0..3 {
        assert_eq!(new.read(0, 4096).unwrap().unwrap(), vec![1u8; 4096]);
        assert_eq!(new.read(8192, 4096).unwrap().unwrap(), vec![0u8; 4096]);
    }
    c.engine().ctl_ok(&["volume", "verify", "vol"]);
    let st = first.status_json("vol");
    let states: Vec<&str> = st["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert!(states.iter().all(|s| *s == "failed"), "{st}");
    drop(first);
}

/// Flips three bytes of each of `blocks` in a replica's first layer file.
fn rot(r: &Replica, blocks: std::ops::Range<u64>) {
    let layer = r.dir.join("volumes/vol/layers/1.data");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&layer)
        .unwrap();
    for b in blocks {
        f.write_all_at(&[0xff, 0x00, 0xff], b * BLK + 123).unwrap();
    }
}

/// Runs `f` on a thread and fails the test if it does not finish in `within`.
fn within<T: Send + 'static>(
    what: &str,
    within: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(within)
        .unwrap_or_else(|_| panic!("{what} did not finish within {within:?}: the volume hangs"))
}

/// An unaligned write reads its edge block; when that copy is bad on the replica
/// read first, the repair must run under the write's own range lock. Before the fix
/// it took the lock again and waited on itself, and every later write, snapshot and
/// expand queued behind it.
#[test]
fn an_unaligned_write_over_a_bad_copy_completes_and_nothing_queues_behind_it() {
    let c = Cluster::start(2, "16M");
    let nbd = c.engine().nbd;
    let mut cl = NbdClient::connect(nbd, "vol").unwrap();
    assert_eq!(cl.write(0, &vec![0x77; 64 * BLK as usize]).unwrap(), 0);
    // A snapshot checkpoints the log: the blocks now live in layer 1.
    c.engine().ctl_ok(&["snapshot", "create", "vol", "base"]);
    // Reads rotate over the two replicas: of two edge reads in a row, one meets the
    // bad copy first.
    rot(&c.replicas[0], 5..9);
    let mut cl = within("unaligned writes", Duration::from_secs(25), move || {
        for b in 5..9u64 {
            assert_eq!(cl.write(b * BLK + 100, &[0xab; 200]).unwrap(), 0);
        }
        cl
    });
    let e = c.engine();
    let control = e.control.clone();
    within("snapshot and expand", Duration::from_secs(25), move || {
        for args in [
            vec!["snapshot", "create", "vol", "after"],
            vec!["volume", "expand", "vol", "32M"],
        ] {
            let out = Command::new(BIN)
                .args(&args)
                .arg("--control-socket")
                .arg(&control)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
        }
    });
    assert!(
        e.log_text().contains("bad block copy on replica"),
        "the bad copy was never met: the test proves nothing\n{}",
        e.log_text()
    );
    let mut want = vec![0x77u8; BLK as usize];
    want[100..300].fill(0xab);
    for b in 5..9u64 {
        for _ in 0..2 {
            assert_eq!(cl.read(b * BLK, BLK as u32).unwrap().unwrap(), want);
        }
    }
    assert_eq!(cl.write(0, &[0x55; 4096]).unwrap(), 0);
    assert_eq!(cl.flush().unwrap(), 0);
    assert_eq!(e.healthy("vol"), 2, "a bad block does not drop a replica");
}

/// A replica that is being rebuilt (here a returning one, still copying its
/// snapshot) is removed by the operator: it stays removed. Before the fix the
/// rebuild's own join put it back.
#[test]
fn replica_rm_during_a_rebuild_takes_effect() {
    let mut c = Cluster::start_proxied(3, "64M", &[]);
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    for i in 0..32u64 {
        assert_eq!(cl.write(i << 20, &vec![i as u8 + 1; 1 << 20]).unwrap(), 0);
    }
    assert_eq!(cl.flush().unwrap(), 0);
    c.engine().ctl_ok(&["snapshot", "create", "vol", "base"]);
    // Replica 2 comes back empty and slow: its rebuild copies the snapshot first.
    c.replicas[2].kill9();
    let dir = c.replicas[2].dir.clone();
    let port = c.replicas[2].addr.port();
    std::fs::remove_dir_all(&dir).unwrap();
    c.proxies[2].set(ProxyMode::Delay(40));
    c.replicas[2] = Replica::start(&dir, port);
    let addr = c.replica_addr(2).to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.engine().status_json("vol");
        if st["replicas"][2]["state"] == "rebuilding" {
            break;
        }
        assert!(Instant::now() < deadline, "no rebuild started: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    c.engine().ctl_ok(&["replica", "rm", "vol", &addr]);
    c.proxies[2].set(ProxyMode::Pass);
    // Long enough for the rebuild to have finished and joined, had it gone on.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let st = c.engine().status_json("vol");
        let reps = st["replicas"].as_array().unwrap();
        assert_eq!(reps.len(), 2, "the removed replica came back: {st}");
        assert!(reps.iter().all(|r| r["address"] != addr.as_str()), "{st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = c.engine().log_text();
    assert!(!log.contains("rebuild finished"), "{log}");
    assert_eq!(cl.write(0, &[9u8; 4096]).unwrap(), 0);
    assert_eq!(cl.flush().unwrap(), 0);
    c.engine().ctl_ok(&["volume", "verify", "vol"]);
}
