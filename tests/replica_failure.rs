//! Replicas that die or hang while clients write: the volume keeps serving.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn kill9_replica_during_nbdcopy() {
    need("nbdcopy");
    let mut c = Cluster::start(3, "256M");
    let input = c.path("in.bin");
    random_file(&input, 256 << 20, 2);
    let mut copy = Command::new("nbdcopy")
        .arg(&input)
        .arg(c.uri())
        .spawn()
        .unwrap();
    // Kill once the copy is under way.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.engine().status_json("vol")["counters"]["bytes_written"]
        .as_u64()
        .unwrap()
        < 16 << 20
    {
        assert!(Instant::now() < deadline, "copy never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    c.replicas[1].kill9();
    assert!(
        copy.wait().unwrap().success(),
        "nbdcopy failed after a replica died"
    );
    let out = c.path("out.bin");
    run(Command::new("nbdcopy").arg(c.uri()).arg(&out));
    assert_eq!(sha256(&input), sha256(&out));
    let st = c.engine().status_json("vol");
    assert_eq!(c.engine().healthy("vol"), 2, "{st}");
    assert_eq!(st["replicas"][1]["state"], "failed");
    assert!(c
        .engine()
        .log_text()
        .contains("replica dropped from the volume"));
}

#[test]
fn hung_replica_is_dropped_after_the_timeout() {
    let c = Cluster::start_with(3, "16M", &["--timeout", "1.5"]);
    let mut client = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(client.write(0, &[1u8; 4096]).unwrap(), 0);
    c.replicas[2].signal("STOP");
    let t = Instant::now();
    assert_eq!(client.write(4096, &[2u8; 8192]).unwrap(), 0);
    assert_eq!(client.flush().unwrap(), 0);
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        client.read(0, 12288).unwrap().unwrap()[4096..],
        [2u8; 8192][..]
    );
    assert_eq!(c.engine().healthy("vol"), 2);
    c.replicas[2].signal("CONT");
}

#[test]
fn all_replicas_gone_gives_eio_not_lies() {
    let mut c = Cluster::start_with(2, "16M", &["--timeout", "2"]);
    let mut client = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(client.write(0, &[1u8; 4096]).unwrap(), 0);
    c.replicas[0].kill9();
    c.replicas[1].kill9();
    assert_eq!(client.write(0, &[2u8; 4096]).unwrap(), 5, "EIO expected");
    assert_eq!(client.read(0, 4096).unwrap(), Err(5));
    assert_eq!(client.flush().unwrap(), 5);
}

#[test]
fn stale_replica_is_not_served_after_restart() {
    let mut c = Cluster::start(3, "16M");
    let mut client = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(client.write(0, &[1u8; 4096]).unwrap(), 0);
    assert_eq!(client.flush().unwrap(), 0);
    c.replicas[0].kill9();
    assert_eq!(client.write(0, &[2u8; 4096]).unwrap(), 0);
    assert_eq!(client.flush().unwrap(), 0);
    drop(client);
    c.stop_all();
    c.restart_all();
    // The replica that missed a write is not served from; it rebuilds and rejoins.
    let log = c.engine().log_text();
    assert!(log.contains("stale: not in sync"), "{log}");
    for _ in 0..6 {
        let mut client = NbdClient::connect(c.engine().nbd, "vol").unwrap();
        assert_eq!(client.read(0, 4096).unwrap().unwrap(), vec![2u8; 4096]);
    }
    c.engine().wait_healthy("vol", 3, Duration::from_secs(30));
    for _ in 0..6 {
        let mut client = NbdClient::connect(c.engine().nbd, "vol").unwrap();
        assert_eq!(client.read(0, 4096).unwrap().unwrap(), vec![2u8; 4096]);
    }
}

#[test]
fn engine_refuses_unknown_volume_without_size() {
    let c = Cluster::start(1, "16M");
    let nbd: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let out = Command::new(BIN)
        .args([
            "engine",
            "--volume",
            "other",
            "--replica",
            &c.replicas[0].addr.to_string(),
        ])
        .args(["--nbd-listen", &nbd.to_string(), "--control-socket"])
        .arg(c.path("other.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not found") && err.contains("--size"), "{err}");
    // A size mismatch on an existing volume is refused with the fix.
    let mut cmd = c.engine_command(
        Some("32M"),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        &c.path("x.sock"),
    );
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists with"), "{err}");
}

/// A new volume is never created while a replica that may already hold it is down:
/// an empty copy beside it would later rebuild the real data away.
#[test]
fn no_new_volume_while_a_replica_is_unreachable() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let r = Replica::start(&dir.path().join("r0"), free_port());
    let down = format!("127.0.0.1:{}", free_port());
    let out = Command::new(BIN)
        .args([
            "engine",
            "--volume",
            "vol",
            "--size",
            "16M",
            "--timeout",
            "2",
        ])
        .args(["--replica", &r.addr.to_string(), "--replica", &down])
        .args(["--nbd-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--control-socket")
        .arg(dir.path().join("c.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&down) && err.contains("did not answer"),
        "{err}"
    );
    assert!(
        !r.dir.join("volumes/vol/meta").exists(),
        "a volume was created"
    );
}
