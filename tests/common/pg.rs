//! PostgreSQL on a tether volume: the volume attached as a block device (nbdfuse →
//! loop → ext4) and a server on it, torn down in the one order that works.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

pub const PG: &str = "/usr/lib/postgresql/15/bin";

pub fn out(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).trim().to_string()
}

pub fn as_postgres(tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", &format!("{PG}/{tool}")]);
    c
}

/// A volume attached as a block device with a file system, torn down in the one
/// order that works: PostgreSQL, the file system, the loop device, the FUSE mount.
pub struct Attached {
    pub fuse: PathBuf,
    pub nbdfuse: Option<Child>,
    pub dev: String,
    pub mnt: PathBuf,
    pub pgdata: Option<PathBuf>,
    pub frozen: bool,
}

impl Attached {
    pub fn new(dir: &Path, name: &str, uri: &str) -> Attached {
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

    pub fn mount(&self) {
        run(Command::new("mount").arg(&self.dev).arg(&self.mnt));
    }

    pub fn freeze(&mut self, on: bool) {
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
pub struct Postgres {
    pub sock: PathBuf,
    pub port: u16,
}

impl Postgres {
    pub fn start(data: &Path, sock: &Path, log: &Path) -> Postgres {
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

    pub fn sql(&self, q: &str) -> String {
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
