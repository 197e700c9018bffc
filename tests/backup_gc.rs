//! Backups that live for years, end to end: `backup rm` and `backup gc` leave exactly
//! the chunks the remaining backups name, on a directory and on an S3 server that
//! checks signatures; a backup killed halfway resumes and uploads only what its
//! checkpoint did not hold, counted at the server.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Stdio;
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
    backup_ok(w, &["target", "init"]);
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
    // Nothing of the killed run is garbage: every chunk in the bucket is named.
    let r = gc_json(&w, &["--grace", "0s"]);
    assert_eq!(r["deleted"], 0, "{r}");
}
