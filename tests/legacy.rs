//! Replica data written by the binary from before membership generations (commit
//! 27e957c; `tests/fixtures/make-legacy.sh` made `tests/fixtures/legacy.tar.gz`) opens
//! under this one: a clean, agreeing set becomes the first generation and serves its
//! data; a set that crashed with one copy behind waits for an operator, who salvages.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

/// Unpacks the fixture's `set` (clean or diverged) and starts a replica on each copy.
fn cluster(set: &str) -> Cluster {
    let dir = tempfile::Builder::new()
        .prefix("tether-legacy")
        .tempdir_in(test_root())
        .unwrap();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/legacy.tar.gz");
    run(std::process::Command::new("tar")
        .arg("-xzf")
        .arg(fixture)
        .arg("-C")
        .arg(dir.path())
        .arg(set));
    let dirs: Vec<PathBuf> = (1..=3)
        .map(|i| dir.path().join(set).join(format!("r{i}")))
        .collect();
    Cluster::over_dirs(dir, &dirs)
}

/// Waits until the engine serves, then reads `block`.
fn read(c: &mut Cluster, nbd: SocketAddr, block: u64) -> Vec<u8> {
    let child = c.engine.as_mut().unwrap().child.as_mut().unwrap();
    wait_port(nbd, child, "engine");
    let mut client = NbdClient::connect(nbd, "vol").unwrap();
    client.read(block * 4096, 4096).unwrap().unwrap()
}

#[test]
fn a_clean_set_written_before_generations_serves_as_the_first_generation() {
    let mut c = cluster("clean");
    let nbd = c.spawn_engine();
    assert_eq!(read(&mut c, nbd, 0), vec![0xaa; 4096]);
    assert_eq!(read(&mut c, nbd, 100), vec![0xcc; 4096]);
    assert_eq!(read(&mut c, nbd, 1), vec![0; 4096]);
    let st = c.engine().status_json("vol");
    assert_eq!(st["state"], "serving", "{st}");
    assert!(st["generation"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["in_sync"].as_array().unwrap().len(), 3, "{st}");
    assert!(st["salvages"].as_array().unwrap().is_empty(), "{st}");
    // Every copy stores the generation now, and a write lands on all three.
    for r in &c.replicas {
        let meta = std::fs::read_to_string(r.dir.join("volumes/vol/meta")).unwrap();
        assert!(meta.contains("\"generation\""), "{meta}");
    }
    let mut client = NbdClient::connect(nbd, "vol").unwrap();
    assert_eq!(client.write(4096, &[0x11; 4096]).unwrap(), 0);
    assert_eq!(client.flush().unwrap(), 0);
    drop(client);
    // A second engine opens from the stored generation, after a crash of the first.
    c.engine.as_mut().unwrap().kill9();
    let nbd = c.spawn_engine();
    assert_eq!(read(&mut c, nbd, 1), vec![0x11; 4096]);
    assert_eq!(read(&mut c, nbd, 0), vec![0xaa; 4096]);
}

#[test]
fn a_crashed_set_with_a_copy_behind_waits_for_an_operator_and_is_salvaged() {
    let mut c = cluster("diverged");
    let nbd = c.spawn_engine();
    // No copy holds a generation and none closed cleanly: which is newest cannot be
    // proven, so the engine waits, naming no replica (only an operator can help).
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = c.engine().try_status_json("vol");
        if let Some(st) = st.filter(|s| s["open_attempts"].as_u64().unwrap_or(0) > 0) {
            break st;
        }
        assert!(Instant::now() < deadline, "the engine never said it waits");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(st["state"], "waiting", "{st}");
    assert!(st["waiting_for"].as_array().unwrap().is_empty(), "{st}");
    assert!(
        st["waiting_reason"].as_str().unwrap().contains("salvage"),
        "{st}"
    );
    assert!(TcpStream::connect(nbd).is_err(), "served a guessed copy");
    // The operator keeps r2's data, which holds B.
    let addrs: Vec<String> = c.replicas.iter().map(|r| r.addr.to_string()).collect();
    let mut cmd = std::process::Command::new(BIN);
    cmd.args([
        "volume",
        "salvage",
        "vol",
        "--from",
        &addrs[1],
        "--accept-data-loss",
    ]);
    for a in &addrs {
        cmd.args(["--replica", a]);
    }
    run(&mut cmd);
    assert_eq!(read(&mut c, nbd, 0), vec![0xbb; 4096]);
    let st = c.engine().status_json("vol");
    assert_eq!(st["salvages"].as_array().unwrap().len(), 1, "{st}");
    // r1 and r3 are rebuilt from r2: every copy ends up holding B.
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
}
