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
/// for NBD meanwhile.
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

#[test]
fn a_rebuild_then_a_restart_does_not_serve_the_older_lineage() {
    let mut c = Cluster::start(3, "16M");
    write_flush(c.engine().nbd, A);
    c.replicas[0].kill9();
    write_flush(c.engine().nbd, B);
    // r4 is added and rebuilt from r2 or r3.
    let r4 = Replica::start(&c.dir.path().join("r4"), free_port());
    c.engine()
        .ctl_ok(&["replica", "add", "vol", &r4.addr.to_string()]);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
    c.engine.as_mut().unwrap().kill9();
    // r2 and r3 are down; r1 (which missed B) and r4 (which has it) are up.
    c.replicas[1].kill9();
    c.replicas[2].kill9();
    c.restart_replica(0);
    c.replicas.push(r4);
    let nbd = c.spawn_engine();
    assert_waits(&c, nbd);
    // r2 returns beside r4: three of the four replicas of the newest generation.
    c.restart_replica(1);
    assert_eq!(served(&mut c, nbd), vec![B; 4096]);
}
