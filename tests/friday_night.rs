//! The Friday-night story: PostgreSQL runs on a tether volume (nbdfuse → loop →
//! ext4), a backup is taken, more rows are written and a table is dropped; the
//! backup is restored into a new volume on new replicas, and PostgreSQL started on it
//! finds exactly the rows of backup time, with `pg_amcheck` clean.
//!
//! Needs root (loop devices, mounts, FUSE), /dev/fuse and /dev/loop-control, and
//! PostgreSQL 15 (`.ci/run` installs it).

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::*;
use common::*;

const PASSPHRASE: &str = "friday night, 18:30";

fn backup(dir: &Path, args: &[&str]) -> String {
    out(Command::new(BIN)
        .arg("backup")
        .args(args)
        .arg("--target")
        .arg(dir.join("bucket"))
        .env("TETHER_BACKUP_PASSPHRASE", PASSPHRASE)
        .env_remove("TETHER_BACKUP_TARGET"))
}

const ORDERS_SUM: &str = "SELECT md5(string_agg(id || ':' || customer || ':' || amount || ':' || note, ',' ORDER BY id)) FROM orders";

#[test]
fn friday_night_a_dropped_table_comes_back_from_the_backup() {
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
    // PostgreSQL runs as its own user: everything it touches lives under a
    // directory it can reach.
    let dir = tempfile::Builder::new()
        .prefix("tether-friday")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    run(Command::new("chmod").arg("755").arg(d));
    for sub in ["sock1", "sock2", "logs"] {
        run(Command::new("install")
            .args(["-d", "-o", "postgres", "-g", "postgres", "-m", "700"])
            .arg(d.join(sub)));
    }

    // 1. PostgreSQL on a tether volume.
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

    // 2. Rows, then a backup of a frozen (consistent) file system.
    pg.sql(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer int NOT NULL, \
           amount numeric(12,2) NOT NULL, note text NOT NULL); \
         CREATE INDEX orders_customer ON orders (customer); \
         CREATE TABLE audit (id bigserial PRIMARY KEY, order_id bigint NOT NULL, action text NOT NULL); \
         INSERT INTO orders (customer, amount, note) \
           SELECT g % 997, (g * 7 % 100000) / 100.0, md5(g::text) FROM generate_series(1, 10000) g; \
         INSERT INTO audit (order_id, action) SELECT id, 'created' FROM orders; \
         CHECKPOINT;",
    );
    let (orders, audit, sum) = (
        pg.sql("SELECT count(*) FROM orders"),
        pg.sql("SELECT count(*) FROM audit"),
        pg.sql(ORDERS_SUM),
    );
    assert_eq!((orders.as_str(), audit.as_str()), ("10000", "10000"));
    backup(d, &["target", "init"]);
    let ctl = c.engine().control.display().to_string();
    vol.freeze(true);
    backup(
        d,
        &[
            "create",
            &c.volume,
            "--control-socket",
            &ctl,
            "--label",
            "when=before-migration",
        ],
    );
    vol.freeze(false);
    // The next backup must get a later second, so --at can tell them apart.
    std::thread::sleep(Duration::from_millis(1100));
    let backup_time = humantime_now();
    std::thread::sleep(Duration::from_millis(1100));

    // 3. The bad migration: more rows, a dropped table; the nightly backup runs anyway.
    pg.sql(
        "INSERT INTO orders (customer, amount, note) \
           SELECT g % 997, 1.00, 'after' FROM generate_series(1, 5000) g; \
         DROP TABLE audit; CHECKPOINT;",
    );
    vol.freeze(true);
    backup(d, &["create", &c.volume, "--control-socket", &ctl]);
    vol.freeze(false);
    assert_eq!(pg.sql("SELECT count(*) FROM orders"), "15000");

    // 4. Restore the backup from before into a new volume on new replicas: nothing of
    //    the new volume exists; the command runs its own engine.
    let r1 = Replica::start(&d.join("dr1"), free_port());
    let r2 = Replica::start(&d.join("dr2"), free_port());
    let none = d.join("no-engine.sock");
    backup(
        d,
        &[
            "restore",
            &c.volume,
            "--at",
            &backup_time,
            "--volume",
            "pg2",
            "--replica",
            &r1.addr.to_string(),
            "--replica",
            &r2.addr.to_string(),
            "--control-socket",
            none.to_str().unwrap(),
        ],
    );
    let nbd = format!("127.0.0.1:{}", free_port());
    let ctl2 = d.join("pg2.sock");
    let mut engine = Command::new(BIN)
        .args(["engine", "--volume", "pg2", "--nbd-listen", &nbd])
        .args([
            "--replica",
            &r1.addr.to_string(),
            "--replica",
            &r2.addr.to_string(),
        ])
        .arg("--control-socket")
        .arg(&ctl2)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(nbd.parse().unwrap(), &mut engine, "pg2's engine");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = Command::new(BIN)
            .args(["volume", "status", "pg2", "--json", "--control-socket"])
            .arg(&ctl2)
            .output()
            .unwrap();
        if String::from_utf8_lossy(&st.stdout).contains("\"serving\"") {
            break;
        }
        assert!(Instant::now() < deadline, "pg2's engine never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut vol2 = Attached::new(d, "pg2", &format!("nbd://{nbd}/pg2"));
    run(Command::new("e2fsck").arg("-fn").arg(&vol2.dev));
    vol2.mount();
    let data2 = vol2.mnt.join("pgdata");
    // The image holds the first server's lock file, whose pid is alive here.
    std::fs::remove_file(data2.join("postmaster.pid")).unwrap();
    let pg2 = Postgres::start(&data2, &d.join("sock2"), &d.join("logs/pg2.log"));
    vol2.pgdata = Some(data2);

    // 5. Exactly the rows of backup time, and a clean bill from pg_amcheck.
    assert_eq!(pg2.sql("SELECT count(*) FROM orders"), orders);
    assert_eq!(
        pg2.sql("SELECT count(*) FROM audit"),
        audit,
        "the dropped table is back"
    );
    assert_eq!(pg2.sql(ORDERS_SUM), sum, "orders hold the same rows");
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
    drop(vol);
    let _ = engine.kill();
    let _ = engine.wait();
}

/// Now as RFC 3339 to the second.
fn humantime_now() -> String {
    out(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
}
