//! Issue 13's two sequences, end to end with real processes: a flushed write is never
//! reverted, whatever order replicas fail and come back in. The engine waits rather
//! than serve an older lineage, and serves again once a majority of the newest
//! membership generation answers.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const A: u8 = 0xaa;
const B: u8 = 0xbb;

/// Writes `byte` over block 0 and flushes; both acknowledged.
fn write_flush(nbd: SocketAddr, byte: u8) {
    let mut client = NbdClient::connect(nbd, "vol").unwrap();
    assert_eq!(client.write(0, &[byte; 4096]).unwrap(), 0);
    assert_eq!(client.flush().unwrap(), 0);
}

/// Waits until the engine's log says it waits before serving; it must not listen
/// for NBD meanwhile, and its status names r2 and r3 (and not r1) as the replicas it
/// waits for.
fn assert_waits(c: &Cluster, nbd: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.engine().log_text().contains("not serving yet") {
        assert!(
            Instant::now() < deadline,
            "the engine never said it waits:\n{}",
            c.engine().log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        TcpStream::connect(nbd).is_err(),
        "the engine listens for NBD while it may not serve"
    );
    let st = c.engine().status_json("vol");
    assert_eq!(st["state"], "waiting", "{st}");
    let waiting_for: Vec<String> = st["waiting_for"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    for (i, waited) in [(0, false), (1, true), (2, true)] {
        let addr = c.replicas[i].addr.to_string();
        assert_eq!(waiting_for.contains(&addr), waited, "r{}: {st}", i + 1);
    }
    assert!(
        st["waiting_reason"]
            .as_str()
            .unwrap()
            .contains("generation"),
        "{st}"
    );
}

/// Waits until the engine serves, then reads block 0.
fn served(c: &mut Cluster, nbd: SocketAddr) -> Vec<u8> {
    let child = c.engine.as_mut().unwrap().child.as_mut().unwrap();
    wait_port(nbd, child, "engine");
    let mut client = NbdClient::connect(nbd, "vol").unwrap();
    client.read(0, 4096).unwrap().unwrap()
}

#[test]
fn after_a_power_outage_the_stalest_replica_back_first_is_not_served() {
    let mut c = Cluster::start(3, "16M");
    write_flush(c.engine().nbd, A);
    c.replicas[0].kill9();
    write_flush(c.engine().nbd, B);
    // Everything goes down; r1, which missed B, comes back alone.
    c.engine.as_mut().unwrap().kill9();
    c.replicas[1].kill9();
    c.replicas[2].kill9();
    c.restart_replica(0);
    let nbd = c.spawn_engine();
    assert_waits(&c, nbd);
    // r2 returns: a majority of the newest generation answers, and B is served.
    c.restart_replica(1);
    assert_eq!(served(&mut c, nbd), vec![B; 4096]);
}

/// Issue 13's first sequence up to the restart: r1 missed B, r4 was rebuilt with it,
/// then r2 and r3 went down; an engine on r1 and r4 waits. Returns its NBD address
/// and r4's.
fn rebuild_then_restart(c: &mut Cluster) -> (SocketAddr, String) {
    write_flush(c.engine().nbd, A);
    c.replicas[0].kill9();
    write_flush(c.engine().nbd, B);
    // r4 is added and rebuilt from r2 or r3.
    let r4 = Replica::start(&c.dir.path().join("r4"), free_port());
    let r4_addr = r4.addr.to_string();
    c.engine().ctl_ok(&["replica", "add", "vol", &r4_addr]);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
    c.engine.as_mut().unwrap().kill9();
    // r2 and r3 are down; r1 (which missed B) and r4 (which has it) are up.
    c.replicas[1].kill9();
    c.replicas[2].kill9();
    c.restart_replica(0);
    c.replicas.push(r4);
    let nbd = c.spawn_engine();
    assert_waits(c, nbd);
    (nbd, r4_addr)
}

#[test]
fn a_rebuild_then_a_restart_does_not_serve_the_older_lineage() {
    let mut c = Cluster::start(3, "16M");
    let (nbd, _) = rebuild_then_restart(&mut c);
    // r2 returns beside r4: three of the four replicas of the newest generation.
    c.restart_replica(1);
    assert_eq!(served(&mut c, nbd), vec![B; 4096]);
}

#[test]
fn a_salvage_serves_what_the_operator_chose_and_is_refused_without_confirmation() {
    let mut c = Cluster::start(3, "16M");
    let (nbd, r4) = rebuild_then_restart(&mut c);
    let r1 = c.replicas[0].addr.to_string();
    let salvage = |confirm: bool| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args([
            "volume",
            "salvage",
            "vol",
            "--from",
            &r4,
            "--replica",
            &r1,
            "--replica",
            &r4,
        ]);
        if confirm {
            cmd.arg("--accept-data-loss");
        }
        cmd.output().unwrap()
    };
    let refused = salvage(false);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("--accept-data-loss"), "{why}");
    assert!(TcpStream::connect(nbd).is_err(), "served without a salvage");
    let done = salvage(true);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    // The waiting engine serves from r4, which holds B.
    assert_eq!(served(&mut c, nbd), vec![B; 4096]);
    // Status shows the salvage, and goes on showing it for good: it is in r4's
    // generation history.
    let st = c.engine().status_json("vol");
    assert_eq!(st["state"], "serving", "{st}");
    let salvages = st["salvages"].as_array().unwrap();
    assert_eq!(salvages.len(), 1, "{st}");
    assert!(salvages[0].as_str().unwrap().contains(&r4), "{st}");
    let meta = std::fs::read_to_string(c.replicas[3].dir.join("volumes/vol/meta")).unwrap();
    assert!(meta.contains("\"salvage\": true"), "{meta}");
}
