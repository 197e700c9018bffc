//! Snapshots end to end through NBD, bit rot caught and routed around, verify.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::process::Command;

fn cli(c: &Cluster, args: &[&str]) -> std::process::Output {
    let (cmd, rest) = args.split_at(2);
    Command::new(BIN)
        .args(cmd)
        .arg("vol")
        .args(rest)
        .arg("--control-socket")
        .arg(&c.engine().control)
        .output()
        .unwrap()
}

fn cli_ok(c: &Cluster, args: &[&str], extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("vol")
        .args(extra)
        .arg("--control-socket")
        .arg(&c.engine().control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?} {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

const MB: usize = 1 << 20;

#[test]
fn snapshot_create_serve_revert_rm() {
    let c = Cluster::start(3, "16M");
    let addr = c.engine().nbd;
    let mut cl = NbdClient::connect(addr, "vol").unwrap();
    // A in the first MiB, B in the second, C in the third (and over A's second half).
    assert_eq!(cl.write(0, &vec![0xa1; MB]).unwrap(), 0);
    let t = std::time::Instant::now();
    cli_ok(&c, &["snapshot", "create"], &["s1"]);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "snapshot took {:?}",
        t.elapsed()
    );
    assert_eq!(cl.write(MB as u64, &vec![0xb2; MB]).unwrap(), 0);
    cli_ok(&c, &["snapshot", "create"], &["s2"]);
    assert_eq!(cl.write(MB as u64 / 2, &vec![0xc3; 2 * MB]).unwrap(), 0);
    let ls = cli_ok(&c, &["snapshot", "ls"], &[]);
    assert!(ls.contains("s1") && ls.contains("s2"), "{ls}");
    // A duplicate name is refused clearly.
    let dup = cli(&c, &["snapshot", "create", "s1"]);
    assert!(!dup.status.success());

    let read = |export: &str, off: u64, len: u32| {
        let mut s = NbdClient::connect(addr, export).unwrap();
        s.read(off, len).unwrap().unwrap()
    };
    assert_eq!(read("vol@s1", 0, MB as u32), vec![0xa1; MB]);
    assert_eq!(read("vol@s1", MB as u64, MB as u32), vec![0; MB]);
    assert_eq!(read("vol@s2", 0, MB as u32), vec![0xa1; MB]);
    assert_eq!(read("vol@s2", MB as u64, MB as u32), vec![0xb2; MB]);
    let head = read("vol", 0, 3 * MB as u32);
    assert_eq!(head[..MB / 2], vec![0xa1; MB / 2][..]);
    assert_eq!(head[MB / 2..MB / 2 + 2 * MB], vec![0xc3; 2 * MB][..]);
    // Snapshots are read-only.
    let mut ro = NbdClient::connect(addr, "vol@s1").unwrap();
    assert_eq!(ro.write(0, &[1u8; 4096]).unwrap(), 1, "EPERM");
    drop(ro);
    // The snapshot is readable with real tools too.
    need("nbdinfo");
    let info = run(Command::new("nbdinfo").args(["--json", &format!("nbd://{addr}/vol@s2")]));
    assert!(String::from_utf8_lossy(&info.stdout).contains("\"is_read_only\": true"));

    // Revert is refused while a client is attached.
    let out = Command::new(BIN)
        .args(["snapshot", "revert", "vol", "s1", "--control-socket"])
        .arg(&c.engine().control)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("attached"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(cl);
    std::thread::sleep(std::time::Duration::from_millis(200));
    cli_ok(&c, &["snapshot", "revert"], &["s1"]);
    assert_eq!(read("vol", 0, MB as u32), vec![0xa1; MB]);
    assert_eq!(read("vol", MB as u64, 2 * MB as u32), vec![0; 2 * MB]);

    // Write D on the reverted head, then delete s1: s2 and the head stay intact.
    let mut cl = NbdClient::connect(addr, "vol").unwrap();
    assert_eq!(cl.write(3 * MB as u64, &vec![0xd4; 4096]).unwrap(), 0);
    drop(cl);
    cli_ok(&c, &["snapshot", "rm"], &["s1"]);
    assert!(!cli_ok(&c, &["snapshot", "ls"], &[]).contains("s1 "));
    assert_eq!(read("vol@s2", 0, MB as u32), vec![0xa1; MB]);
    assert_eq!(read("vol@s2", MB as u64, MB as u32), vec![0xb2; MB]);
    assert_eq!(read("vol", 0, MB as u32), vec![0xa1; MB]);
    assert_eq!(read("vol", 3 * MB as u64, 4096), vec![0xd4; 4096]);
    assert_eq!(read("vol", MB as u64, MB as u32), vec![0; MB]);
    let st = c.engine().status_json("vol");
    assert_eq!(st["snapshots"].as_array().unwrap().len(), 1, "{st}");
    assert!(st["head_allocated"].as_u64().unwrap() > 0, "{st}");
    cli_ok(&c, &["volume", "verify"], &[]);
}

#[test]
fn bit_rot_is_served_from_another_replica_and_found_by_verify() {
    let c = Cluster::start(3, "16M");
    let addr = c.engine().nbd;
    let mut cl = NbdClient::connect(addr, "vol").unwrap();
    assert_eq!(cl.write(0, &vec![0x77; 64 * 4096]).unwrap(), 0);
    // A snapshot checkpoints the log: the blocks now live in layer 1 on every replica.
    cli_ok(&c, &["snapshot", "create"], &["base"]);
    let layer = c.replicas[0].dir.join("volumes/vol/layers/1.data");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&layer)
        .unwrap();
    f.write_all_at(&[0xff, 0x00, 0xff], 5 * 4096 + 123).unwrap();
    drop(f);
    // Every read is right, whichever replica serves it.
    for _ in 0..6 {
        assert_eq!(cl.read(5 * 4096, 4096).unwrap().unwrap(), vec![0x77; 4096]);
    }
    let st = c.engine().status_json("vol");
    assert!(
        st["counters"]["checksum_errors"].as_u64().unwrap() >= 1,
        "{st}"
    );
    assert!(c.engine().log_text().contains("bad block copy on replica"));
    assert_eq!(
        c.engine().healthy("vol"),
        3,
        "a bad block does not drop the replica"
    );
    // The bad copy was repaired from a healthy replica: verify is clean again.
    assert!(c.engine().log_text().contains("repaired bad block copy"));
    cli_ok(&c, &["volume", "verify"], &[]);
    // Rot another block, and find it with verify before any read touches it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&layer)
        .unwrap();
    f.write_all_at(&[0xff, 0x00, 0xff], 6 * 4096 + 123).unwrap();
    drop(f);
    let out = Command::new(BIN)
        .args(["volume", "verify", "vol", "--control-socket"])
        .arg(&c.engine().control)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("block 6:") && text.contains(&c.replicas[0].addr.to_string()),
        "{text}"
    );
}

#[test]
fn expand_online_and_refuse_shrink() {
    let c = Cluster::start(3, "16M");
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(cl.write(0, &[5u8; 4096]).unwrap(), 0);
    cli_ok(&c, &["volume", "expand"], &["32M"]);
    // The old connection keeps its size; a new one sees the new size.
    assert_eq!(cl.read(16 << 20, 4096).unwrap(), Err(22));
    let mut cl2 = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(cl2.size, 32 << 20);
    assert_eq!(cl2.write((32 << 20) - 4096, &[6u8; 4096]).unwrap(), 0);
    assert_eq!(cl2.read(0, 4096).unwrap().unwrap(), vec![5u8; 4096]);
    let out = Command::new(BIN)
        .args(["volume", "expand", "vol", "8M", "--control-socket"])
        .arg(&c.engine().control)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shrink"));
}
