//! Real NBD clients against a 3-replica volume: nbdinfo, qemu-io, nbdcopy, fio.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::process::Command;

#[test]
fn nbdinfo_reports_size_and_flags() {
    need("nbdinfo");
    let c = Cluster::start(3, "64M");
    let out = run(Command::new("nbdinfo").args(["--json", &c.uri()]));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "vol");
    assert_eq!(e["export-size"], 64u64 << 20);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_cache"], true);
    assert_eq!(e["can_df"], true);
    assert_eq!(e["can_fast_zero"], true);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(j["structured"], true);

    // The empty export name selects the volume; an unknown one is refused.
    let any = format!("nbd://{}/", c.engine().nbd);
    let out = run(Command::new("nbdinfo").args(["--size", &any]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (64u64 << 20).to_string()
    );
    let bad = Command::new("nbdinfo")
        .arg(format!("nbd://{}/nope", c.engine().nbd))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let list = run(Command::new("nbdinfo").args(["--list", "--json", &any]));
    assert!(String::from_utf8_lossy(&list.stdout).contains("\"vol\""));
}

#[test]
fn qemu_io_unaligned_patterns() {
    need("qemu-io");
    let c = Cluster::start(3, "64M");
    let uri = c.uri();
    let io = |cmds: &[&str]| {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for x in cmds {
            cmd.args(["-c", x]);
        }
        cmd.arg(&uri);
        let out = run(&mut cmd);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(!text.contains("Pattern verification failed"), "{text}");
        assert!(!text.contains("failed"), "{text}");
        text
    };
    io(&["write -P 0xab 4097 70000", "read -P 0xab 4097 70000"]);
    // Neighbours of the unaligned write are untouched zeroes.
    io(&["read -P 0 0 4097", "read -P 0 74097 10000"]);
    io(&[
        "write -P 0x11 0 512",
        "write -P 0x22 511 2",
        "read -P 0x11 0 511",
        "read -P 0x22 511 2",
        "read -P 0 513 3583",
    ]);
    io(&[
        "write -P 0x33 8190 4",
        "read -P 0x33 8190 4",
        "read -P 0xab 8194 100",
    ]);
    io(&[
        "write -z 5000 10000",
        "read -P 0 5000 10000",
        "read -P 0xab 15000 1000",
    ]);
    io(&[
        "discard 0 1048576",
        "write -P 0x44 1048576 1048576",
        "flush",
        "read -P 0x44 1048576 1048576",
    ]);
    io(&["write -P 0x55 -f 2097152 8192", "read -P 0x55 2097152 8192"]);
}

#[test]
fn nbdcopy_roundtrip_survives_restart_and_replicas_match() {
    need("nbdcopy");
    let mut c = Cluster::start(3, "256M");
    let input = c.path("in.bin");
    random_file(&input, 256 << 20, 1);
    run(Command::new("nbdcopy").arg(&input).arg(c.uri()));
    let out = c.path("out.bin");
    run(Command::new("nbdcopy").arg(c.uri()).arg(&out));
    assert_eq!(sha256(&input), sha256(&out));

    c.stop_all();
    let first = c.replicas[0].data("vol");
    for r in &c.replicas[1..] {
        assert!(
            r.data("vol") == first,
            "replica {} differs after a clean stop",
            r.addr
        );
    }
    drop(first);

    c.restart_all();
    let again = c.path("again.bin");
    run(Command::new("nbdcopy").arg(c.uri()).arg(&again));
    assert_eq!(sha256(&input), sha256(&again));
    assert_eq!(c.engine().healthy("vol"), 3);
}

#[test]
fn fio_verify_crc32c() {
    need("fio");
    let c = Cluster::start(3, "128M");
    // fio writes its verify state into the working directory: keep it in the test's.
    let out = run(Command::new("fio").current_dir(c.dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", c.uri()),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=64m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let json_start = text.find('{').unwrap();
    let j: serde_json::Value = serde_json::from_str(&text[json_start..]).unwrap();
    assert_eq!(j["jobs"][0]["error"], 0, "{text}");
    assert!(j["jobs"][0]["read"]["io_bytes"].as_u64().unwrap() >= 64 << 20);
}

#[test]
fn block_status_shows_holes_and_trim_frees_space() {
    need("nbdinfo");
    need("qemu-io");
    let mut c = Cluster::start(3, "64M");
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 1 1M 8M",
        "-c",
        "write -P 2 32M 64k",
        &c.uri(),
    ]));
    let map = run(Command::new("nbdinfo").args(["--map", &c.uri()]));
    let text = String::from_utf8_lossy(&map.stdout).to_string();
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let data: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l.get(3) == Some(&"data"))
        .map(|l| (l[0], l[1]))
        .collect();
    assert_eq!(
        data,
        vec![("1048576", "8388608"), ("33554432", "65536")],
        "{text}"
    );
    // A restart checkpoints the log into the layers: space shows up there.
    c.stop_all();
    c.restart_all();
    let before = c.engine().status_json("vol")["head_allocated"]
        .as_u64()
        .unwrap();
    assert!(before >= 8 << 20, "allocated {before}");
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "discard 0 64M", &c.uri()]));
    let map = run(Command::new("nbdinfo").args(["--map", &c.uri()]));
    assert!(!String::from_utf8_lossy(&map.stdout).contains("data"));
    c.stop_all();
    c.restart_all();
    let after = c.engine().status_json("vol")["head_allocated"]
        .as_u64()
        .unwrap();
    assert!(
        after < 1 << 20,
        "trim left {after} bytes allocated (was {before})"
    );
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0 0 64M", &c.uri()]));
}
