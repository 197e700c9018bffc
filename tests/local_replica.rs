//! A replica in the engine's own process (`--replica dir:PATH`): it serves and keeps
//! data like a daemon's, reads prefer it, and its data directory has one holder.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A cluster of one daemon and one in-process replica at `dir:<cluster>/local`.
fn local_cluster(size: &str, extra: &[&str]) -> (Cluster, std::path::PathBuf) {
    let root = tempfile::Builder::new()
        .prefix("tether-local")
        .tempdir_in(test_root())
        .unwrap();
    let local = root.path().join("local");
    let addr = format!("dir:{}", local.display());
    let mut args = vec!["--replica", addr.as_str()];
    args.extend_from_slice(extra);
    let c = Cluster::start_with(1, size, &args);
    // The cluster's own directory holds the rest; this one only the local replica.
    std::mem::forget(root);
    (c, local)
}

#[test]
fn in_process_replica_keeps_data_and_serves_reads_first() {
    need("nbdcopy");
    let (mut c, local) = local_cluster("64M", &["--timeout", "30"]);
    let st = c.engine().status_json("vol");
    assert_eq!(c.engine().healthy("vol"), 2, "{st}");

    let input = c.path("in.bin");
    random_file(&input, 64 << 20, 7);
    run(Command::new("nbdcopy").arg(&input).arg(c.uri()));

    // With the daemon stopped (SIGSTOP: it neither answers nor fails), every read
    // must come from the in-process replica: a read sent to the daemon would wait
    // for the 30 s timeout.
    c.replicas[0].signal("STOP");
    let out = c.path("out.bin");
    let t = Instant::now();
    run(Command::new("nbdcopy").arg(c.uri()).arg(&out));
    let took = t.elapsed();
    c.replicas[0].signal("CONT");
    assert_eq!(sha256(&input), sha256(&out));
    assert!(
        took < Duration::from_secs(15),
        "reading 64 MiB took {took:?}: reads went to the stopped daemon"
    );

    // One holder per data directory: a daemon on the in-process replica's directory
    // is refused, with the reason, while the engine runs.
    let refused = Command::new(BIN)
        .args(["replica", "--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data")
        .arg(&local)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a second holder was allowed");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("locked") && err.contains("another process"),
        "{err}"
    );

    // A clean restart of the engine finds both copies in sync.
    c.engine.take().unwrap().stop();
    c.start_engine(None);
    assert_eq!(c.engine().healthy("vol"), 2);
    let again = c.path("again.bin");
    run(Command::new("nbdcopy").arg(c.uri()).arg(&again));
    assert_eq!(sha256(&input), sha256(&again));
}

#[test]
fn flushed_writes_survive_a_killed_engine() {
    need("qemu-io");
    let (mut c, _local) = local_cluster("32M", &[]);
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 4M",
        "-c",
        "flush",
        &c.uri(),
    ]));
    // The engine, and with it the in-process replica, dies without closing anything.
    c.engine.take().unwrap().kill9();
    c.start_engine(None);
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5a 0 4M", &c.uri()]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Pattern verification failed") && text.contains("read 4194304/4194304"),
        "{text}"
    );
    assert_eq!(c.engine().healthy("vol"), 2);
}

#[test]
fn a_missing_directory_name_is_refused_with_the_reason() {
    let out = Command::new(BIN)
        .args([
            "engine",
            "--volume",
            "v",
            "--size",
            "16M",
            "--replica",
            "dir:",
            "--nbd-listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("give the data directory after dir:"), "{err}");
}
