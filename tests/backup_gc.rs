//! Backups that live for years, end to end: `backup rm` and `backup gc` leave exactly
//! the chunks the remaining backups name, on a directory and on an S3 server that
//! checks signatures; a backup killed halfway resumes and uploads only what its
//! checkpoint did not hold, counted at the server.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::backup::*;
use common::*;
use rand::SeedableRng;

fn gc_json(w: &Where, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["gc", "--json"];
    a.extend_from_slice(args);
    let out = backup_ok(w, &a);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Four backups with changes between them; two removed (the latest among them);
/// gc with the default grace deletes nothing, with none it leaves exactly what the
/// two left name, and they still restore.
fn gc_is_exact(c: &Cluster, w: &Where) {
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let mut model = Model {
        bytes: vec![0u8; 32 * MIB],
    };
    // Short leases: a removed backup's lease keeps its chunks for a lease time after
    // it ended (a backup that read it before the removal may rely on them).
    backup_ok(w, &["target", "init", "--lease-time", "2s"]);
    let mut states = Vec::new();
    for round in 0..4 {
        let at = [0, 4, 8, 4][round] * MIB;
        model.write(&mut nbd, at, &random(&mut rng, 6 * MIB));
        assert_eq!(nbd.flush().unwrap(), 0);
        create(c, w);
        states.push(model.bytes.clone());
    }
    drop(nbd);
    let ids: Vec<String> = list(w)
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 4);
    let before = w.stored();
    backup_ok(w, &["rm", &format!("{}/{}", c.volume, ids[1])]);
    backup_ok(w, &["rm", &format!("{}/{}", c.volume, ids[3])]);
    assert_eq!(w.stored(), before, "rm deletes no chunk");

    // Every chunk was written minutes ago at most: the default grace keeps them.
    let r = gc_json(w, &[]);
    assert_eq!(r["deleted"], 0, "{r}");
    assert!(r["kept_young"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(w.stored(), before);

    std::thread::sleep(Duration::from_millis(2500));
    // A dry run counts without deleting.
    let dry = gc_json(w, &["--grace", "0s", "--dry-run"]);
    let garbage = before.len() - w.referenced().len();
    assert!(garbage >= 6, "the removed backups own chunks: {garbage}");
    assert_eq!(dry["deleted"].as_u64().unwrap() as usize, garbage, "{dry}");
    assert_eq!(w.stored(), before);

    let r = gc_json(w, &["--grace", "0s"]);
    assert_eq!(r["deleted"].as_u64().unwrap() as usize, garbage, "{r}");
    assert_eq!(r["manifests"], 2, "{r}");
    assert!(r["skipped"].is_null(), "{r}");
    assert_eq!(
        w.stored(),
        w.referenced(),
        "the target holds exactly the chunks of the backups left"
    );
    for (i, state) in [(0, &states[0]), (2, &states[2])] {
        let b = format!("{}/{}", c.volume, ids[i]);
        assert_same(
            &restore_to_file(w, c.dir.path(), &b),
            state,
            &format!("backup {i} after gc"),
        );
        backup_ok(w, &["verify", &b]);
    }
    // Nothing left to take; the lock was released.
    let again = gc_json(w, &["--grace", "0s"]);
    assert_eq!(again["deleted"], 0, "{again}");
    // And the next backup builds on what is left.
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    model.write(&mut nbd, 20 * MIB, &random(&mut rng, MIB));
    assert_eq!(nbd.flush().unwrap(), 0);
    drop(nbd);
    create(c, w);
    assert_same(
        &restore_to_file(w, c.dir.path(), &c.volume),
        &model.bytes,
        "the backup after gc",
    );
}

#[test]
fn gc_leaves_exactly_the_chunks_of_the_backups_left_in_a_directory() {
    let c = Cluster::start(1, "32M");
    let w = Where::Dir(c.dir.path().join("bucket"));
    gc_is_exact(&c, &w);
}

#[test]
fn gc_leaves_exactly_the_chunks_of_the_backups_left_in_s3() {
    let c = Cluster::start(1, "32M");
    let s3 = S3::start(c.dir.path());
    let w = Where::S3(&s3);
    gc_is_exact(&c, &w);
    // gc finds garbage by listing; a backup never does.
    let ops = s3.ops();
    assert!(
        ops.iter().any(|(op, _)| op == "DeleteObject"),
        "gc deleted at the server"
    );
}

#[test]
fn a_second_gc_is_refused_while_one_holds_the_lock() {
    let c = Cluster::start(1, "16M");
    let w = Where::Dir(c.dir.path().join("bucket"));
    backup_ok(&w, &["target", "init", "--lease-time", "30s"]);
    let shown = String::from_utf8_lossy(&backup_ok(&w, &["target", "show"]).stdout).to_string();
    assert!(shown.contains("lease time:  30s"), "{shown}");
    // A lock as a running gc holds it.
    std::fs::create_dir_all(w.files().join("gc")).unwrap();
    std::fs::write(w.files().join("gc/lock"), "gc 0123 pid 1").unwrap();
    let err = backup_fails(&w, &["gc"]);
    assert!(err.contains("another gc is running"), "{err}");
    // Once it is older than the lease time, its gc is taken for dead.
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(w.files().join("gc/lock"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let r = gc_json(&w, &[]);
    assert!(r["skipped"].is_null(), "{r}");
    assert!(!w.files().join("gc/lock").exists(), "the lock is released");
}

#[test]
fn a_killed_backup_resumes_and_uploads_only_what_was_missing() {
    let mut c = Cluster::start(1, "512M");
    let s3 = S3::start(c.dir.path());
    let w = Where::S3(&s3);
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(29);
    let mut model = Model {
        bytes: vec![0u8; 512 * MIB],
    };
    model.write(&mut nbd, 0, &random(&mut rng, 4 * MIB));
    assert_eq!(nbd.flush().unwrap(), 0);
    backup_ok(&w, &["target", "init"]);
    create(&c, &w);
    // 400 new chunks, backed up one at a time, killed once a checkpoint is in.
    model.write(&mut nbd, 16 * MIB, &random(&mut rng, 400 * MIB));
    assert_eq!(nbd.flush().unwrap(), 0);
    drop(nbd);
    let checkpoint = w.files().join("checkpoints").join(&c.volume);
    let ctl = c.engine().control.display().to_string();
    let before = s3.ops().len();
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
    while !checkpoint.exists() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint landed");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(100));
    c.engine.as_mut().unwrap().kill9();
    let _ = child.wait();
    let killed: Vec<_> = s3.ops()[before..]
        .iter()
        .filter(|(op, k)| op == "PutObject" && k.contains("/chunks/"))
        .cloned()
        .collect();
    assert_eq!(list(&w).len(), 1, "the killed backup wrote no manifest");
    let (t, keys) = w.open();
    let ck = block_on(t.checkpoint(&keys, &c.volume)).unwrap().unwrap();
    let saved = ck.done.values().flatten().count();
    assert!(
        (64..400).contains(&saved),
        "the checkpoint holds {saved} chunks"
    );
    assert!(
        killed.len() >= saved,
        "{} uploaded, {saved} checkpointed",
        killed.len()
    );

    // The engine back, the next backup resumes that one: the same id and snapshot.
    c.start_engine(None);
    let before = s3.ops().len();
    create(&c, &w);
    let resumed: Vec<_> = s3.ops()[before..]
        .iter()
        .filter(|(op, k)| op == "PutObject" && k.contains("/chunks/"))
        .cloned()
        .collect();
    assert_eq!(
        resumed.len(),
        400 - saved,
        "the resumed backup uploads what the checkpoint did not hold, nothing more"
    );
    eprintln!(
        "killed after {} chunk uploads ({saved} checkpointed); resumed with {} uploads",
        killed.len(),
        resumed.len()
    );
    let backups = list(&w);
    assert_eq!(backups.len(), 2);
    assert_eq!(backups[1]["id"].as_str(), Some(ck.header.id.as_str()));
    assert!(
        !checkpoint.exists(),
        "a completed backup deletes its checkpoint"
    );
    assert_same(
        &restore_to_file(&w, c.dir.path(), &c.volume),
        &model.bytes,
        "the resumed backup",
    );
    // What the killed run uploaded after its last checkpoint was uploaded again (an
    // upload never reuses an object it did not record); gc takes exactly those.
    let r = gc_json(&w, &["--grace", "0s"]);
    // (The upload in flight at the kill reached the server's log, not its disk.)
    let deleted = r["deleted"].as_u64().unwrap() as usize;
    let unrecorded = killed.len() - saved;
    assert!(
        deleted == unrecorded || deleted + 1 == unrecorded,
        "{unrecorded}: {r}"
    );
    assert_eq!(w.stored(), w.referenced());
}

/// Chunk GETs the server saw since `before`.
fn chunk_gets(s3: &S3, before: usize) -> usize {
    s3.ops()[before..]
        .iter()
        .filter(|(op, k)| op == "GetObject" && k.contains("/chunks/"))
        .count()
}

/// Runs `args` and kills it with SIGKILL once the server has served `after` chunk
/// GETs for it.
fn kill_after_gets(w: &Where, s3: &S3, args: &[&str], after: usize) {
    let before = s3.ops().len();
    let mut child = backup_cmd(w, args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while chunk_gets(s3, before) < after {
        assert!(
            std::time::Instant::now() < deadline,
            "the restore fetched nothing"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn an_interrupted_restore_resumes_without_downloading_again() {
    let c = Cluster::start(1, "256M");
    let s3 = S3::start(c.dir.path());
    let w = Where::S3(&s3);
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let mut model = Model {
        bytes: vec![0u8; 256 * MIB],
    };
    model.write(&mut nbd, 8 * MIB, &random(&mut rng, 200 * MIB));
    assert_eq!(nbd.flush().unwrap(), 0);
    drop(nbd);
    backup_ok(&w, &["target", "init"]);
    create(&c, &w);
    let chunks = 200;

    // Into a file: killed, then finished with --resume.
    let img = c.dir.path().join("resumed.img");
    let img_s = img.to_str().unwrap().to_string();
    kill_after_gets(
        &w,
        &s3,
        &[
            "restore",
            &c.volume,
            "--to-file",
            &img_s,
            "--concurrency",
            "1",
        ],
        60,
    );
    let partial = std::fs::read(&img).unwrap();
    let done = (0..256)
        .filter(|i| {
            let r = i * MIB..(i + 1) * MIB;
            partial[r.clone()] == model.bytes[r]
                && model.bytes[i * MIB..(i + 1) * MIB].iter().any(|&b| b != 0)
        })
        .count();
    assert!(done >= 50, "{done} chunks were in place when it was killed");
    let before = s3.ops().len();
    backup_ok(&w, &["restore", &c.volume, "--to-file", &img_s, "--resume"]);
    assert_eq!(
        chunk_gets(&s3, before),
        chunks - done,
        "the resumed restore downloads only the chunks not in place"
    );
    assert_same(
        &std::fs::read(&img).unwrap(),
        &model.bytes,
        "the resumed image",
    );

    // Into a new volume on a new replica: killed, then finished with --resume.
    let r = Replica::start(&c.dir.path().join("dr"), free_port());
    let none = c.dir.path().join("none.sock");
    let ra = r.addr.to_string();
    let into = [
        "restore",
        &c.volume,
        "--volume",
        "copy",
        "--replica",
        &ra,
        "--control-socket",
        none.to_str().unwrap(),
    ];
    let mut killed = into.to_vec();
    killed.extend(["--concurrency", "1"]);
    kill_after_gets(&w, &s3, &killed, 60);
    let err = backup_fails(&w, &into);
    assert!(err.contains("--overwrite"), "{err}");
    let before = s3.ops().len();
    let mut resumed = into.to_vec();
    resumed.push("--resume");
    backup_ok(&w, &resumed);
    let fetched = chunk_gets(&s3, before);
    assert!(
        fetched <= chunks - 55,
        "the resumed restore fetched {fetched} of {chunks} chunks"
    );
    eprintln!("volume restore resumed: {fetched} of {chunks} chunks fetched again");
    let nbd_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ctl = c.dir.path().join("copy.sock");
    let mut engine = Command::new(BIN)
        .args([
            "engine",
            "--volume",
            "copy",
            "--nbd-listen",
            &nbd_addr.to_string(),
        ])
        .args(["--replica", &ra])
        .arg("--control-socket")
        .arg(&ctl)
        .env_remove("TETHER_ENCRYPTION_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(nbd_addr, &mut engine, "the copy's engine");
    let mut rc = NbdClient::connect(nbd_addr, "copy").unwrap();
    for i in 0..64 {
        let got = rc
            .read((i * 4 * MIB) as u64, (4 * MIB) as u32)
            .unwrap()
            .unwrap();
        assert_same(
            &got,
            &model.bytes[i * 4 * MIB..(i + 1) * 4 * MIB],
            "the resumed volume",
        );
    }
    drop(rc);
    let _ = engine.kill();
    let _ = engine.wait();
}
