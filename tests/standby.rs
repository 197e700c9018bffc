//! A standby at a second site: PostgreSQL runs on a tether volume and is backed up
//! five times; `tether backup follow` keeps a standby volume on other replicas at
//! those backups, one apply killed halfway and finished by the next run, another
//! killed halfway and undone by `tether backup promote`. The promoted standby serves
//! PostgreSQL with exactly the rows of the last backup it held whole.
//!
//! Needs what `friday_night.rs` needs: root, FUSE, loop devices, PostgreSQL 15.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::*;
use common::*;

const PASSPHRASE: &str = "a second site, far away";

fn backup_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("backup")
        .args(args)
        .arg("--target")
        .arg(dir.join("bucket"))
        .env("TETHER_BACKUP_PASSPHRASE", PASSPHRASE)
        .env_remove("TETHER_BACKUP_TARGET")
        .env_remove("TETHER_ENCRYPTION_KEY");
    c
}

fn backup(dir: &Path, args: &[&str]) -> String {
    out(&mut backup_cmd(dir, args))
}

fn state(dir: &Path) -> serde_json::Value {
    std::fs::read(dir.join("bucket/standbys/standby"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

const ORDERS_SUM: &str =
    "SELECT md5(string_agg(id || ':' || customer || ':' || note, ',' ORDER BY id)) FROM orders";

#[test]
fn a_standby_follows_backups_survives_a_killed_apply_and_is_promoted() {
    for tool in [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "fsfreeze",
        "runuser",
        "e2fsck",
    ] {
        need(tool);
    }
    assert!(
        Path::new(&format!("{PG}/postgres")).exists(),
        "PostgreSQL 15 is not installed; run .ci/run (apt-get install postgresql-15)"
    );
    let dir = tempfile::Builder::new()
        .prefix("tether-standby")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    run(Command::new("chmod").arg("755").arg(d));
    for sub in ["sock1", "sock2", "logs"] {
        run(Command::new("install")
            .args(["-d", "-o", "postgres", "-g", "postgres", "-m", "700"])
            .arg(d.join(sub)));
    }

    // The primary site: PostgreSQL on a tether volume.
    let c = Cluster::start(2, "512M");
    let mut vol = Attached::new(d, "pg", &c.uri());
    run(Command::new("mkfs.ext4")
        .args(["-q", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&vol.dev));
    vol.mount();
    let data = vol.mnt.join("pgdata");
    run(Command::new("install")
        .args(["-d", "-o", "postgres", "-g", "postgres", "-m", "700"])
        .arg(&data));
    run(as_postgres("initdb")
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "-k", "--no-instructions"])
        .stdout(Stdio::null()));
    let pg = Postgres::start(&data, &d.join("sock1"), &d.join("logs/pg1.log"));
    vol.pgdata = Some(data.clone());
    pg.sql(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer int NOT NULL, note text NOT NULL); \
         CREATE INDEX orders_customer ON orders (customer);",
    );
    backup(d, &["target", "init"]);
    let ctl = c.engine().control.display().to_string();

    // The second site: two replicas of its own.
    let r1 = Replica::start(&d.join("dr1"), free_port());
    let r2 = Replica::start(&d.join("dr2"), free_port());
    let (a1, a2) = (r1.addr.to_string(), r2.addr.to_string());
    let standby_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(
            ["--volume", "standby", "--replica", &a1, "--replica", &a2]
                .iter()
                .map(|s| s.to_string()),
        );
        v
    };
    let follow_once = || {
        let a = standby_args(&["follow", &c.volume, "--once"]);
        backup(d, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // A follow that is killed once it is well into applying.
    let follow_killed = |backup_id: &str| {
        let a = standby_args(&["follow", &c.volume, "--once", "--concurrency", "1"]);
        let mut child = backup_cmd(d, &a.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while state(d)["applying"].as_str() != Some(backup_id) {
            assert!(Instant::now() < deadline, "the apply never started");
            assert!(
                child.try_wait().unwrap().is_none(),
                "follow ended before it was killed"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            child.try_wait().unwrap().is_none(),
            "follow ended before it was killed"
        );
        child.kill().unwrap();
        let _ = child.wait();
    };

    let mut ids: Vec<String> = Vec::new();
    let mut sums: Vec<(String, String)> = Vec::new();
    for round in 1..=5 {
        pg.sql(&format!(
            "INSERT INTO orders (customer, note) \
               SELECT g % 997, 'round {round} ' || md5(g::text) FROM generate_series(1, 3000) g; \
             CHECKPOINT;"
        ));
        if round == 3 || round == 5 {
            // A big change, so the apply is slow enough to be cut off halfway.
            run(Command::new("dd")
                .args([
                    "if=/dev/urandom",
                    "bs=1M",
                    "count=120",
                    "oflag=direct",
                    "status=none",
                ])
                .arg(format!(
                    "of={}",
                    vol.mnt.join(format!("filler-{round}")).display()
                )));
        }
        vol.freeze(true);
        backup(d, &["create", &c.volume, "--control-socket", &ctl]);
        vol.freeze(false);
        let id = backup(d, &["ls", &c.volume, "--json"]);
        let list: serde_json::Value = serde_json::from_str(&id).unwrap();
        ids.push(
            list.as_array().unwrap().last().unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        sums.push((pg.sql("SELECT count(*) FROM orders"), pg.sql(ORDERS_SUM)));
        match round {
            1 | 2 | 4 => {
                let said = follow_once();
                assert!(
                    said.contains(&format!("holds backup {}/{}", c.volume, ids[round - 1])),
                    "{said}"
                );
            }
            3 => {
                follow_killed(&ids[2]);
                let s = state(d);
                assert_eq!(s["at"].as_str(), Some(ids[1].as_str()), "{s}");
                assert_eq!(s["applying"].as_str(), Some(ids[2].as_str()), "{s}");
                // The next run finishes what was cut off.
                let said = follow_once();
                assert!(said.contains(&ids[2]), "{said}");
                let s = state(d);
                assert_eq!(s["at"].as_str(), Some(ids[2].as_str()), "{s}");
                assert!(s["applying"].is_null(), "{s}");
            }
            _ => {
                follow_killed(&ids[4]);
                assert_eq!(state(d)["at"].as_str(), Some(ids[3].as_str()));
            }
        }
    }

    // The primary site is lost. The standby is promoted: the cut-off apply of
    // backup 5 is undone, and it holds backup 4 whole.
    let source = c.volume.clone();
    drop(vol);
    drop(c);
    let recovery = Instant::now();
    let a = standby_args(&["promote"]);
    let said = backup(d, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(said.contains("undone"), "{said}");
    assert!(said.contains(&ids[3]), "{said}");
    assert_eq!(state(d)["promoted"], true);
    // A follower started again refuses: nothing but its engine writes to it now.
    let a = standby_args(&["follow", &source, "--once"]);
    let refused = backup_cmd(d, &a.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("promoted"));

    let nbd = format!("127.0.0.1:{}", free_port());
    let ctl2 = d.join("standby.sock");
    let mut engine = Command::new(BIN)
        .args(["engine", "--volume", "standby", "--nbd-listen", &nbd])
        .args(["--replica", &a1, "--replica", &a2])
        .arg("--control-socket")
        .arg(&ctl2)
        .env_remove("TETHER_ENCRYPTION_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(nbd.parse().unwrap(), &mut engine, "the standby's engine");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = Command::new(BIN)
            .args(["volume", "status", "standby", "--json", "--control-socket"])
            .arg(&ctl2)
            .output()
            .unwrap();
        if String::from_utf8_lossy(&st.stdout).contains("\"serving\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby's engine never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut vol2 = Attached::new(d, "standby", &format!("nbd://{nbd}/standby"));
    run(Command::new("e2fsck").arg("-fn").arg(&vol2.dev));
    vol2.mount();
    let data2 = vol2.mnt.join("pgdata");
    std::fs::remove_file(data2.join("postmaster.pid")).unwrap();
    let pg2 = Postgres::start(&data2, &d.join("sock2"), &d.join("logs/pg2.log"));
    vol2.pgdata = Some(data2);
    let (count, sum) = (pg2.sql("SELECT count(*) FROM orders"), pg2.sql(ORDERS_SUM));
    eprintln!(
        "recovery: promote, engine, mount and PostgreSQL answering in {:.1} s",
        recovery.elapsed().as_secs_f64()
    );
    assert_eq!(count, sums[3].0, "the rows of backup 4");
    assert_eq!(sum, sums[3].1, "the rows of backup 4, byte for byte");
    assert_eq!(count, "12000");
    let check = as_postgres("pg_amcheck")
        .arg("-h")
        .arg(d.join("sock2"))
        .args([
            "-p",
            &pg2.port.to_string(),
            "-U",
            "postgres",
            "--all",
            "--install-missing",
        ])
        .args(["--heapallindexed", "--parent-check", "--rootdescend"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "pg_amcheck found problems:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    drop(vol2);
    let _ = engine.kill();
    let _ = engine.wait();
}
