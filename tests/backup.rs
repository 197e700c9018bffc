//! Backups end to end: a real engine backs a volume up to a directory and to a real
//! S3 server that checks signatures (s3s-fs), and a restore brings it back, into a
//! file and into a new volume on new replicas. Requests are counted at the server,
//! from its own log; what lands in the bucket is read from the server's disk.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::backup::*;
use common::*;
use rand::{RngCore, SeedableRng};

/// The whole story on one target kind: full, unchanged, 1 % changed; dedup, layout,
/// the canary, and restores into a file and into a new volume on new replicas.
fn back_up_and_restore(c: &mut Cluster, w: &Where, s3: Option<&S3>) {
    let size = 256 * MIB;
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut model = Model {
        bytes: vec![0u8; size],
    };
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    // Half the volume random in 1 MiB pieces, the rest zero; one chunk of a
    // recognisable, very compressible pattern; a chunk's worth repeated twice.
    for i in 0..128 {
        let data = random(&mut rng, MIB);
        model.write(&mut nbd, i * 2 * MIB, &data);
    }
    let canary: Vec<u8> = CANARY.iter().copied().cycle().take(MIB).collect();
    model.write(&mut nbd, 201 * MIB, &canary);
    assert_eq!(nbd.flush().unwrap(), 0);

    backup_ok(w, &["target", "init"]);
    let show = backup_ok(w, &["target", "show"]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("key opens:   yes"));
    // Full backup: every non-zero chunk once.
    let full = create_counted(c, w, s3);
    assert_eq!(
        w.chunk_objects(),
        129,
        "128 random chunks and the canary chunk"
    );
    let first = list(w);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["stats"]["method"], "full");
    let b1 = format!("{}/{}", c.volume, first[0]["id"].as_str().unwrap());
    let at_b1 = model.bytes.clone();

    // Unchanged: no chunk uploaded.
    let unchanged = create_counted(c, w, s3);
    if s3.is_some() {
        let puts: Vec<_> = unchanged
            .iter()
            .filter(|(op, k)| op == "PutObject" && !k.contains("/leases/"))
            .collect();
        // The manifest and the latest pointer, and the lease gc reads; nothing else.
        assert_eq!(puts.len(), 2, "{puts:?}");
        let chunk_puts = full
            .iter()
            .filter(|(op, k)| op == "PutObject" && k.contains("/chunks/"));
        assert_eq!(chunk_puts.count(), 129, "the full backup's chunk PUTs");
    }
    assert_eq!(
        w.chunk_objects(),
        129,
        "an unchanged volume uploads no chunk"
    );
    let second = list(w);
    assert_eq!(second[1]["stats"]["chunks_uploaded"], 0);
    assert_eq!(second[1]["stats"]["method"], "layer index");

    // 1 % changed in random 1 MiB-aligned regions: only those chunks go up.
    let mut changed = std::collections::BTreeSet::new();
    while changed.len() < 3 {
        changed.insert((rng.next_u32() as usize) % 256);
    }
    for &ch in &changed {
        let data = random(&mut rng, MIB);
        model.write(&mut nbd, ch * MIB, &data);
    }
    assert_eq!(nbd.flush().unwrap(), 0);
    let ops = create_counted(c, w, s3);
    assert_eq!(
        w.chunk_objects(),
        132,
        "exactly the 3 changed chunks uploaded"
    );
    let third = list(w);
    assert_eq!(third[2]["stats"]["chunks_uploaded"], 3);
    assert_eq!(
        third[2]["stats"]["chunks_read"], 3,
        "only changed chunks are read"
    );
    if s3.is_some() {
        let puts = ops
            .iter()
            .filter(|(op, k)| op == "PutObject" && k.contains("/chunks/"))
            .count();
        assert_eq!(puts, 3, "chunk PUTs seen by the server: {ops:?}");
    }

    // Nothing in the target shows the canary (compression and sealing hide it).
    for f in files_under(&w.files()) {
        let b = std::fs::read(&f).unwrap();
        assert!(
            !b.windows(CANARY.len()).any(|x| x == CANARY),
            "{} holds the canary in the clear",
            f.display()
        );
    }

    // Each backup restores to exactly the volume at its time.
    assert_same(
        &restore_to_file(w, c.dir.path(), &b1),
        &at_b1,
        "first backup",
    );
    assert_same(
        &restore_to_file(w, c.dir.path(), &c.volume),
        &model.bytes,
        "latest backup",
    );
    backup_ok(w, &["verify", &c.volume]);

    // Into a new volume on new replicas, sealed under a new key: the pilot light.
    let key = c.dir.path().join("dr-key");
    std::fs::write(&key, "a disaster-recovery site's own key").unwrap();
    let r1 = Replica::start(
        &c.dir.path().join(format!("dr1-{}", free_port())),
        free_port(),
    );
    let r2 = Replica::start(
        &c.dir.path().join(format!("dr2-{}", free_port())),
        free_port(),
    );
    let none = c.dir.path().join("no-engine.sock");
    backup_ok(
        w,
        &[
            "restore",
            &c.volume,
            "--volume",
            "restored",
            "--replica",
            &r1.addr.to_string(),
            "--replica",
            &r2.addr.to_string(),
            "--encryption-key-file",
            key.to_str().unwrap(),
            "--control-socket",
            none.to_str().unwrap(),
        ],
    );
    let nbd_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ctl = c
        .dir
        .path()
        .join(format!("restored-{}.sock", nbd_addr.port()));
    let mut engine = Command::new(BIN)
        .args([
            "engine",
            "--volume",
            "restored",
            "--nbd-listen",
            &nbd_addr.to_string(),
        ])
        .args([
            "--replica",
            &r1.addr.to_string(),
            "--replica",
            &r2.addr.to_string(),
        ])
        .arg("--encryption-key-file")
        .arg(&key)
        .arg("--control-socket")
        .arg(&ctl)
        .env_remove("TETHER_ENCRYPTION_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(nbd_addr, &mut engine, "restored volume's engine");
    let mut rc = NbdClient::connect(nbd_addr, "restored").unwrap();
    for i in 0..size / (4 * MIB) {
        let got = rc
            .read((i * 4 * MIB) as u64, (4 * MIB) as u32)
            .unwrap()
            .unwrap();
        assert_same(
            &got,
            &model.bytes[i * 4 * MIB..(i + 1) * 4 * MIB],
            "restored volume",
        );
    }
    drop(rc);
    // The restored replicas hold the canary sealed under the new key, not in the clear.
    for r in [&r1, &r2] {
        let data = r.data("restored");
        assert!(!data.windows(CANARY.len()).any(|x| x == CANARY));
    }
    let _ = engine.kill();
    let _ = engine.wait();
}

#[test]
fn directory_target_backs_up_incrementally_and_restores() {
    let mut c = Cluster::start(2, "256M");
    let w = Where::Dir(c.dir.path().join("bucket"));
    back_up_and_restore(&mut c, &w, None);
}

#[test]
fn s3_target_backs_up_incrementally_and_restores() {
    let mut c = Cluster::start(2, "256M");
    let s3 = S3::start(c.dir.path());
    let w = Where::S3(&s3);
    back_up_and_restore(&mut c, &w, Some(&s3));
}

#[test]
fn a_wrong_s3_secret_is_refused_by_the_server() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let s3 = S3::start(dir.path());
    let w = Where::S3(&s3);
    let mut cmd = backup_cmd(&w, &["target", "init"]);
    cmd.env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "a wrong secret was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SignatureDoesNotMatch"), "{err}");
    assert!(
        err.contains("s3://bucket/backups"),
        "names the target: {err}"
    );
    assert!(
        files_under(&s3.root.join("bucket")).is_empty(),
        "nothing was written"
    );
    // The right secret works: the failure was the signature.
    backup_ok(&w, &["target", "init"]);
}

#[test]
fn a_wrong_passphrase_fails_and_rekey_changes_it() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let w = Where::Dir(dir.path().join("bucket"));
    backup_ok(&w, &["target", "init", "--chunk-size", "256K"]);
    let again = backup_fails(&w, &["target", "init"]);
    assert!(again.contains("already initialised"), "{again}");
    let mut cmd = backup_cmd(&w, &["target", "show"]);
    cmd.env("TETHER_BACKUP_PASSPHRASE", "not the passphrase");
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not open the master key"), "{err}");

    let mut rekey = backup_cmd(&w, &["target", "rekey"]);
    rekey.env("TETHER_BACKUP_NEW_PASSPHRASE", "saturday morning");
    run(&mut rekey);
    let err = backup_fails(&w, &["target", "show"]);
    assert!(
        err.contains("does not open the master key"),
        "old passphrase: {err}"
    );
    let mut show = backup_cmd(&w, &["target", "show"]);
    show.env("TETHER_BACKUP_PASSPHRASE", "saturday morning");
    let out = run(&mut show);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("key opens:   yes") && text.contains("256.0 KiB"),
        "{text}"
    );
    // Bad chunk sizes are refused with the rule.
    let other = Where::Dir(dir.path().join("other"));
    let err = backup_fails(&other, &["target", "init", "--chunk-size", "3M"]);
    assert!(err.contains("power of two"), "{err}");
}

#[test]
fn a_damaged_chunk_is_found_by_verify_and_fails_a_restore() {
    let c = Cluster::start(1, "16M");
    let w = Where::Dir(c.dir.path().join("bucket"));
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for i in 0..4 {
        assert_eq!(
            nbd.write((i * MIB) as u64, &random(&mut rng, MIB)).unwrap(),
            0
        );
    }
    assert_eq!(nbd.flush().unwrap(), 0);
    backup_ok(&w, &["target", "init"]);
    create(&c, &w);
    backup_ok(&w, &["verify", &c.volume]);
    // Flip one byte in the middle of one chunk object.
    let chunk = files_under(&w.files().join("chunks"))
        .into_iter()
        .min()
        .unwrap();
    let name = chunk.file_name().unwrap().to_str().unwrap().to_string();
    let mut b = std::fs::read(&chunk).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(&chunk, &b).unwrap();

    let err = backup_fails(&w, &["verify", &c.volume]);
    assert!(err.contains(&name), "verify names the chunk: {err}");
    assert!(err.contains("1 of 4 chunks failed"), "{err}");
    let img = c.dir.path().join("out.img");
    let err = backup_fails(
        &w,
        &["restore", &c.volume, "--to-file", img.to_str().unwrap()],
    );
    assert!(
        err.contains(&name) && err.contains(&format!("backup {}/", c.volume)),
        "{err}"
    );
    assert!(err.contains("failed authentication"), "{err}");
    assert!(!img.exists(), "a failed restore leaves no image behind");
    // Into a volume it fails the same way, writing nothing from that chunk.
    let r = Replica::start(&c.dir.path().join("fresh"), free_port());
    let none = c.dir.path().join("none.sock");
    let err = backup_fails(
        &w,
        &[
            "restore",
            &c.volume,
            "--volume",
            "fresh",
            "--replica",
            &r.addr.to_string(),
            "--control-socket",
            none.to_str().unwrap(),
        ],
    );
    assert!(err.contains(&name), "{err}");
}

#[test]
fn a_crash_between_chunks_and_manifest_leaves_every_manifest_restorable() {
    let mut c = Cluster::start(1, "512M");
    let w = Where::Dir(c.dir.path().join("bucket"));
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut model = Model {
        bytes: vec![0u8; 512 * MIB],
    };
    model.write(&mut nbd, 0, &random(&mut rng, 8 * MIB));
    assert_eq!(nbd.flush().unwrap(), 0);
    backup_ok(&w, &["target", "init"]);
    create(&c, &w);
    let good = model.bytes.clone();
    // A big change, backed up one chunk at a time, killed once chunks are landing.
    model.write(&mut nbd, 16 * MIB, &random(&mut rng, 400 * MIB));
    assert_eq!(nbd.flush().unwrap(), 0);
    drop(nbd);
    let before = w.chunk_objects();
    let ctl = c.engine().control.display().to_string();
    let mut child = backup_cmd(
        &w,
        &[
            "create",
            &c.volume,
            "--control-socket",
            &ctl,
            "--concurrency",
            "1",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while w.chunk_objects() < before + 5 {
        assert!(std::time::Instant::now() < deadline, "no chunk landed");
        std::thread::sleep(Duration::from_millis(5));
    }
    c.engine.as_mut().unwrap().kill9();
    let _ = child.wait();
    let backups = list(&w);
    assert_eq!(backups.len(), 1, "the killed backup wrote no manifest");
    assert!(
        w.chunk_objects() > before,
        "chunks of the killed backup are in the target"
    );
    // Every manifest in the target restores, and the latest pointer names one.
    assert_same(
        &restore_to_file(&w, c.dir.path(), &c.volume),
        &good,
        "after the crash",
    );
    backup_ok(&w, &["verify", &c.volume]);
    // The engine back: the next backup completes and restores to the volume now.
    c.start_engine(None);
    create(&c, &w);
    assert_eq!(list(&w).len(), 2);
    assert_same(
        &restore_to_file(&w, c.dir.path(), &c.volume),
        &model.bytes,
        "next backup",
    );
}

#[test]
fn a_restore_into_a_volume_with_a_client_attached_is_refused() {
    let c = Cluster::start(1, "16M");
    let w = Where::Dir(c.dir.path().join("bucket"));
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    assert_eq!(nbd.write(0, &[7u8; 65536]).unwrap(), 0);
    assert_eq!(nbd.flush().unwrap(), 0);
    backup_ok(&w, &["target", "init"]);
    create(&c, &w);
    let ctl = c.engine().control.display().to_string();
    let restore = [
        "restore",
        c.volume.as_str(),
        "--volume",
        c.volume.as_str(),
        "--control-socket",
        ctl.as_str(),
    ];
    let err = backup_fails(&w, &restore);
    assert!(err.contains("client(s) attached"), "{err}");
    // The client still works, and its data is untouched.
    assert_eq!(nbd.read(0, 65536).unwrap().unwrap(), vec![7u8; 65536]);
    assert_eq!(nbd.write(0, &[9u8; 4096]).unwrap(), 0);
    // Data where the backup had zeroes must go too.
    assert_eq!(nbd.write(5 << 20, &[3u8; 8192]).unwrap(), 0);
    assert_eq!(nbd.flush().unwrap(), 0);
    drop(nbd);
    // Detached: the restore runs, and brings back the backup's bytes.
    std::thread::sleep(Duration::from_millis(200));
    backup_ok(&w, &restore);
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    assert_eq!(nbd.read(0, 65536).unwrap().unwrap(), vec![7u8; 65536]);
    assert_eq!(nbd.read(5 << 20, 8192).unwrap().unwrap(), vec![0u8; 8192]);
    let status = c.engine().status_json(&c.volume);
    assert_eq!(status["backup"]["operation"], "restore");
    assert_eq!(status["backup"]["state"], "done");
    // What the volume held before is kept: the restore can be undone.
    let snaps = String::from_utf8_lossy(&c.engine().ctl_ok(&["snapshot", "ls", &c.volume]).stdout)
        .to_string();
    let keep = snaps
        .split_whitespace()
        .find(|w| w.starts_with("pre-restore-"))
        .unwrap_or_else(|| panic!("no pre-restore snapshot: {snaps}"))
        .to_string();
    drop(nbd);
    std::thread::sleep(Duration::from_millis(200));
    c.engine().ctl_ok(&["snapshot", "revert", &c.volume, &keep]);
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    assert_eq!(nbd.read(0, 4096).unwrap().unwrap(), vec![9u8; 4096]);
    assert_eq!(nbd.read(5 << 20, 8192).unwrap().unwrap(), vec![3u8; 8192]);
}

#[test]
fn backups_pick_by_time_and_show_in_volume_status() {
    let c = Cluster::start(1, "16M");
    let w = Where::Dir(c.dir.path().join("bucket"));
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    backup_ok(&w, &["target", "init"]);
    let mut at: BTreeMap<String, u8> = BTreeMap::new();
    for v in [1u8, 2] {
        assert_eq!(nbd.write(0, &[v; 4096]).unwrap(), 0);
        assert_eq!(nbd.flush().unwrap(), 0);
        create(&c, &w);
        let id = list(&w).last().unwrap()["id"].as_str().unwrap().to_string();
        at.insert(id, v);
        // Ids carry the second: the next backup gets a later one.
        std::thread::sleep(Duration::from_millis(1100));
    }
    let status = c.engine().status_json(&c.volume);
    assert_eq!(status["backup"]["operation"], "backup");
    assert_eq!(status["backup"]["state"], "done");
    // --at the first backup's time restores the first, not the latest.
    let (first, _) = at.iter().next().unwrap();
    // The first backup's second, plus one: after it, and before the second backup.
    let created = list(&w)[0]["created"].as_u64().unwrap() + 1;
    let t = String::from_utf8(
        run(Command::new("date").args(["-u", "-d", &format!("@{created}"), "+%Y-%m-%dT%H:%M:%SZ"]))
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let img = c.dir.path().join("at.img");
    backup_ok(
        &w,
        &[
            "restore",
            &c.volume,
            "--at",
            &t,
            "--to-file",
            img.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&img).unwrap()[..4096], [1u8; 4096]);
    let out = backup_ok(&w, &["inspect", &format!("{}/{first}", c.volume)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("parent    none"));
    let err = backup_fails(
        &w,
        &[
            "restore",
            &c.volume,
            "--at",
            "2001-01-01T00:00:00Z",
            "--to-file",
            "/nonexistent/x",
        ],
    );
    assert!(err.contains("no backup at or before"), "{err}");
    // Each backup keeps its snapshot (the next incremental's base); `snapshot ls`
    // names each twice (name and export).
    let snaps = c.engine().ctl_ok(&["snapshot", "ls", &c.volume]);
    let text = String::from_utf8_lossy(&snaps.stdout);
    assert_eq!(text.matches("backup-").count(), 4, "{text}");
}

#[test]
fn incremental_backups_follow_trims_growth_and_deleted_snapshots() {
    let c = Cluster::start(1, "32M");
    let w = Where::Dir(c.dir.path().join("bucket"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut model = Model {
        bytes: vec![0u8; 32 * MIB],
    };
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    model.write(&mut nbd, 0, &random(&mut rng, 20 * MIB));
    assert_eq!(nbd.flush().unwrap(), 0);
    backup_ok(&w, &["target", "init"]);
    create(&c, &w);
    // A trim (NBD_CMD_TRIM = 4) inside a chunk, and one of a whole chunk.
    for (off, len) in [(3 * MIB + 8192, 65536), (7 * MIB, MIB)] {
        assert_eq!(
            nbd.send(4, 0, off as u64, len as u64, &[]).unwrap().error,
            0
        );
        model.bytes[off..off + len].fill(0);
    }
    // A snapshot taken and deleted between two backups: its blocks merge onward.
    model.write(&mut nbd, 9 * MIB, &random(&mut rng, 4096));
    assert_eq!(nbd.flush().unwrap(), 0);
    c.engine()
        .ctl_ok(&["snapshot", "create", &c.volume, "between"]);
    model.write(&mut nbd, 11 * MIB, &random(&mut rng, 4096));
    assert_eq!(nbd.flush().unwrap(), 0);
    c.engine().ctl_ok(&["snapshot", "rm", &c.volume, "between"]);
    drop(nbd);
    // Growth: the old last chunk and new chunks past the old end.
    c.engine().ctl_ok(&["volume", "expand", &c.volume, "40M"]);
    model.bytes.resize(40 * MIB, 0);
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    model.write(&mut nbd, 36 * MIB, &random(&mut rng, MIB));
    assert_eq!(nbd.flush().unwrap(), 0);
    create(&c, &w);
    let l = list(&w);
    assert_eq!(l[1]["stats"]["method"], "layer index");
    assert_eq!(
        l[1]["stats"]["chunks_read"], 6,
        "chunks 3, 7, 9, 11, 31 (the old last, re-read on growth) and 36"
    );
    assert_same(
        &restore_to_file(&w, c.dir.path(), &c.volume),
        &model.bytes,
        "after trims, growth and a deleted snapshot",
    );
    // A new-volume restore refuses a volume that exists, unless told to overwrite.
    let none = c.dir.path().join("none.sock");
    let addr = c.replicas[0].addr.to_string();
    let args = [
        "restore",
        c.volume.as_str(),
        "--volume",
        c.volume.as_str(),
        "--replica",
        addr.as_str(),
        "--control-socket",
        none.to_str().unwrap(),
    ];
    let err = backup_fails(&w, &args);
    assert!(
        err.contains("already exists on") && err.contains("--overwrite"),
        "{err}"
    );
}

#[test]
fn rm_deletes_one_manifest_and_moves_the_latest_pointer() {
    let c = Cluster::start(1, "16M");
    let w = Where::Dir(c.dir.path().join("bucket"));
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    backup_ok(&w, &["target", "init"]);
    for v in 1u8..=3 {
        assert_eq!(nbd.write(0, &[v; 4096]).unwrap(), 0);
        assert_eq!(nbd.flush().unwrap(), 0);
        create(&c, &w);
    }
    let ids: Vec<String> = list(&w)
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    let chunks = w.chunk_objects();
    // The middle one: the others stay whole, no chunk goes.
    backup_ok(&w, &["rm", &format!("{}/{}", c.volume, ids[1])]);
    assert_eq!(list(&w).len(), 2);
    assert_eq!(w.chunk_objects(), chunks, "rm deletes no chunk");
    let first = restore_to_file(&w, c.dir.path(), &format!("{}/{}", c.volume, ids[0]));
    assert_eq!(first[..4096], [1u8; 4096]);
    // The latest: the pointer moves back, and the next backup builds on that one.
    backup_ok(&w, &["rm", &format!("{}/{}", c.volume, ids[2])]);
    let latest = restore_to_file(&w, c.dir.path(), &c.volume);
    assert_eq!(
        latest[..4096],
        [1u8; 4096],
        "latest is the first backup now"
    );
    assert_eq!(nbd.write(8192, &[4u8; 4096]).unwrap(), 0);
    assert_eq!(nbd.flush().unwrap(), 0);
    create(&c, &w);
    let l = list(&w);
    assert_eq!(l[1]["parent"].as_str(), Some(ids[0].as_str()));
    let now = restore_to_file(&w, c.dir.path(), &c.volume);
    assert_eq!(now[..4096], [3u8; 4096]);
    assert_eq!(now[8192..12288], [4u8; 4096]);
    // Unknown or half-named backups are refused clearly.
    let err = backup_fails(&w, &["rm", &format!("{}/{}", c.volume, ids[1])]);
    assert!(err.contains("no backup"), "{err}");
    let err = backup_fails(&w, &["rm", &c.volume]);
    assert!(err.contains("VOLUME/ID"), "{err}");
}
