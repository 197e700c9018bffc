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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PG: &str = "/usr/lib/postgresql/15/bin";
const PASSPHRASE: &str = "friday night, 18:30";

fn out(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).trim().to_string()
}

fn as_postgres(tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", &format!("{PG}/{tool}")]);
    c
}

/// A volume attached as a block device with a file system, torn down in the one
/// order that works: PostgreSQL, the file system, the loop device, the FUSE mount.
struct Attached {
    fuse: PathBuf,
    nbdfuse: Option<Child>,
    dev: String,
    mnt: PathBuf,
    pgdata: Option<PathBuf>,
    frozen: bool,
}

impl Attached {
    fn new(dir: &Path, name: &str, uri: &str) -> Attached {
        let fuse = dir.join(format!("fuse-{name}"));
        let mnt = dir.join(format!("mnt-{name}"));
        std::fs::create_dir_all(&fuse).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let pid = dir.join(format!("nbdfuse-{name}.pid"));
        // -P: nbdfuse writes its pid once the mount is ready.
        let mut child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pid)
            .arg(&fuse)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning nbdfuse");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&pid).map_or(true, |m| m.len() == 0) {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("nbdfuse exited with {st} before its mount was ready");
            }
            assert!(Instant::now() < deadline, "nbdfuse not ready within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        let dev = out(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(fuse.join("nbd")));
        Attached {
            fuse,
            nbdfuse: Some(child),
            dev,
            mnt,
            pgdata: None,
            frozen: false,
        }
    }

    fn mount(&self) {
        run(Command::new("mount").arg(&self.dev).arg(&self.mnt));
    }

    fn freeze(&mut self, on: bool) {
        run(Command::new("fsfreeze")
            .arg(if on { "-f" } else { "-u" })
            .arg(&self.mnt));
        self.frozen = on;
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let quiet = |c: &mut Command| {
            let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        if self.frozen {
            quiet(Command::new("fsfreeze").arg("-u").arg(&self.mnt));
        }
        if let Some(d) = &self.pgdata {
            quiet(
                as_postgres("pg_ctl")
                    .arg("-D")
                    .arg(d)
                    .args(["-m", "immediate", "-w", "stop"]),
            );
        }
        quiet(Command::new("umount").arg(&self.mnt));
        quiet(Command::new("losetup").args(["-d", &self.dev]));
        quiet(Command::new("umount").arg(&self.fuse));
        if let Some(mut c) = self.nbdfuse.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A PostgreSQL server on `data`, listening only on a socket under `sock`.
struct Postgres {
    sock: PathBuf,
    port: u16,
}

impl Postgres {
    fn start(data: &Path, sock: &Path, log: &Path) -> Postgres {
        let port = free_port();
        run(as_postgres("pg_ctl")
            .arg("-D")
            .arg(data)
            .arg("-l")
            .arg(log)
            .args(["-w", "-t", "120", "-o"])
            .arg(format!(
                "-c listen_addresses='' -c unix_socket_directories={} -p {port}",
                sock.display()
            ))
            .arg("start"));
        Postgres {
            sock: sock.to_path_buf(),
            port,
        }
    }

    fn sql(&self, q: &str) -> String {
        out(as_postgres("psql")
            .arg("-h")
            .arg(&self.sock)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-X",
                "-q",
                "-At",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-c", q]))
    }
}

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
