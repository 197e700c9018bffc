//! Schedules, with intervals shortened to seconds: an engine takes snapshots and
//! backups by itself and runs gc; retention keeps the configured number of each; the
//! incremental chain stays unbroken (each backup's parent is the one before, found
//! from the layer index, because the snapshot it diffs from is kept); and
//! `tether volume status` shows every job and the newest backup's age.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::backup::*;
use common::*;
use rand::{Rng, SeedableRng};

fn status(c: &Cluster) -> serde_json::Value {
    let out = c
        .engine()
        .ctl_ok(&["volume", "status", &c.volume, "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn snapshots(c: &Cluster, prefix: &str) -> Vec<String> {
    status(c)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn scheduled_snapshots_and_backups_appear_and_expire_and_the_chain_holds() {
    let bucket = tempfile::tempdir().unwrap();
    let w = Where::Dir(bucket.path().join("t"));
    // Leases shorter than the backup interval: a removed backup's lease has lapsed
    // by the next gc, which would otherwise keep its chunks for a lease time.
    backup_ok(&w, &["target", "init", "--lease-time", "2s"]);
    let pass = bucket.path().join("pass");
    std::fs::write(&pass, PASSPHRASE).unwrap();
    let target = w.files().display().to_string();
    let pass_s = pass.display().to_string();
    let mut c = Cluster::start_with(
        1,
        "64M",
        &[
            "--snapshot-every",
            "2s",
            "--snapshot-keep",
            "3",
            "--backup-every",
            "3s",
            "--backup-keep",
            "2",
            "--gc-every",
            "5s",
            "--backup-target",
            &target,
            "--backup-passphrase-file",
            &pass_s,
        ],
    );
    let mut nbd = NbdClient::connect(c.engine().nbd, &c.volume).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(37);
    let mut model = Model {
        bytes: vec![0u8; 64 * MIB],
    };
    // Writes go on while the schedules run.
    let until = Instant::now() + Duration::from_secs(13);
    while Instant::now() < until {
        let at = rng.random_range(0..64usize) * MIB;
        model.write(&mut nbd, at, &random(&mut rng, 64 << 10));
        assert_eq!(nbd.flush().unwrap(), 0);
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(nbd);
    let stopped = list(&w)
        .last()
        .map(|b| b["id"].as_str().unwrap().to_string());
    // One more backup after the last write, to compare with what was written.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = list(&w);
        let newest = l.last().map(|b| b["id"].as_str().unwrap().to_string());
        if newest.is_some() && newest != stopped {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no backup after the writes stopped"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let a snapshot round pass, so the count is settled.
    std::thread::sleep(Duration::from_millis(2500));

    // The schedule goes on meanwhile: a look counts only if nothing moved during it
    // (a snapshot taken just before its retention ran, a backup removed by the
    // next), and no backup was running or retiring an older one's snapshot (a merge
    // that takes a moment).
    let mut settled = None;
    for _ in 0..40 {
        let (sched, kept, backups) = (snapshots(&c, "sched-"), snapshots(&c, "backup-"), list(&w));
        let older = format!("{}/{}", c.volume, backups[0]["id"].as_str().unwrap());
        let verified = backup_cmd(&w, &["verify", &older])
            .output()
            .unwrap()
            .status
            .success();
        let image = restore_to_file(&w, c.dir.path(), &c.volume);
        let still = (snapshots(&c, "sched-"), snapshots(&c, "backup-"), list(&w));
        if verified && kept.len() == 1 && still == (sched.clone(), kept.clone(), backups.clone()) {
            settled = Some((sched, kept, backups, image));
            break;
        }
    }
    let (sched, kept, backups, image) = settled.expect("the schedule never held still for a look");
    assert_eq!(sched.len(), 3, "three scheduled snapshots kept: {sched:?}");
    assert_eq!(backups.len(), 2, "two scheduled backups kept: {backups:#?}");
    for b in &backups {
        assert_eq!(b["labels"]["schedule"], "auto");
    }
    // The chain: the newest was made from the one before, from the layer index.
    assert_eq!(backups[1]["parent"], backups[0]["id"]);
    assert_eq!(
        backups[1]["stats"]["method"], "layer index",
        "{:#}",
        backups[1]
    );
    // The newest backup's snapshot stays (the next incremental's base); the older
    // one's is gone.
    assert_eq!(
        kept,
        vec![backups[1]["snapshot"].as_str().unwrap().to_string()]
    );
    assert_same(&image, &model.bytes, "the newest scheduled backup");

    // Status shows each job, its last and next run, and the newest backup's age.
    let s = status(&c);
    let jobs: Vec<&str> = s["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job"].as_str().unwrap())
        .collect();
    assert_eq!(jobs, ["snapshot", "backup", "gc"]);
    for j in s["schedules"].as_array().unwrap() {
        assert!(j["last_seconds_ago"].as_i64().unwrap() >= 0, "{j}");
        assert_eq!(j["last_outcome"], "ok", "{j}");
        assert!(j["next_in_seconds"].as_u64().unwrap() <= j["every_seconds"].as_u64().unwrap());
    }
    let age = s["newest_backup_age_seconds"].as_i64().unwrap();
    assert!((0..10).contains(&age), "newest backup {age} s old");
    let text = c.engine().ctl_ok(&["volume", "status", &c.volume]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("schedule  backup every 3s, keep 2; last"),
        "{text}"
    );
    assert!(text.contains("backups   the newest was taken"), "{text}");
    c.engine.as_mut().unwrap().stop();
}
