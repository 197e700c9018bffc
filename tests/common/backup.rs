//! Backup test helpers: an S3 server that checks signatures (s3s-fs), targets in a
//! directory or its bucket, and the CLI driven against them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use rand::RngCore;

use super::*;

pub const MIB: usize = 1 << 20;
pub const PASSPHRASE: &str = "friday night, 18:30";
pub const CANARY: &[u8] = b"TETHER-CANARY-0f1e2d3c4b5a-";

/// An S3 server on loopback that checks SigV4 signatures, logging every request.
pub struct S3 {
    pub child: Child,
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub log: PathBuf,
}

pub const ACCESS: &str = "tether-test-access";
pub const SECRET: &str = "tether-test-secret-0123456789";

impl S3 {
    pub fn start(dir: &Path) -> S3 {
        need("s3s-fs");
        let root = dir.join("s3root");
        std::fs::create_dir_all(root.join("bucket")).unwrap();
        let port = free_port();
        let log = dir.join("s3s.log");
        let mut child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS, "--secret-key", SECRET])
            .arg(&root)
            .env("RUST_LOG", "s3s::ops=debug")
            .env("NO_COLOR", "1")
            // It logs on stdout.
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning s3s-fs");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_port(addr, &mut child, "s3s-fs");
        S3 {
            child,
            addr,
            root,
            log,
        }
    }

    /// Every request the server routed, as (operation, key), in order.
    pub fn ops(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.log).unwrap();
        text.lines()
            .filter_map(|l| {
                let rest = l.split("resolved route, op: ").nth(1)?;
                let op = rest.split(',').next()?.to_string();
                let key = rest
                    .split("key: \"")
                    .nth(1)
                    .and_then(|k| k.split('"').next())
                    .unwrap_or("")
                    .to_string();
                Some((op, key))
            })
            .collect()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A target: a directory, or a prefix in the S3 server's bucket.
pub enum Where<'a> {
    Dir(PathBuf),
    S3(&'a S3),
}

impl Where<'_> {
    pub fn args(&self) -> Vec<String> {
        match self {
            Where::Dir(d) => vec!["--target".into(), d.display().to_string()],
            Where::S3(s) => vec![
                "--target".into(),
                "s3://bucket/backups".into(),
                "--s3-endpoint".into(),
                format!("http://{}", s.addr),
                "--s3-path-style".into(),
            ],
        }
    }

    /// Where the target's objects lie on disk (the server's store for S3).
    pub fn files(&self) -> PathBuf {
        match self {
            Where::Dir(d) => d.clone(),
            Where::S3(s) => s.root.join("bucket").join("backups"),
        }
    }

    /// Chunk objects in the target, counted on disk.
    pub fn chunk_objects(&self) -> usize {
        files_under(&self.files().join("chunks")).len()
    }
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `tether backup ARGS` against `w`, with the passphrase and S3 credentials in the
/// environment.
pub fn backup_cmd(w: &Where, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("backup")
        .args(args)
        .args(w.args())
        .env("TETHER_BACKUP_PASSPHRASE", PASSPHRASE)
        .env("AWS_ACCESS_KEY_ID", ACCESS)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env_remove("TETHER_BACKUP_TARGET")
        .env_remove("TETHER_ENCRYPTION_KEY");
    cmd
}

pub fn backup_ok(w: &Where, args: &[&str]) -> Output {
    run(&mut backup_cmd(w, args))
}

pub fn backup_fails(w: &Where, args: &[&str]) -> String {
    let out = backup_cmd(w, args).output().unwrap();
    assert!(
        !out.status.success(),
        "tether backup {args:?} succeeded but should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `tether backup create` of the cluster's volume through its engine.
pub fn create(c: &Cluster, w: &Where) -> String {
    let ctl = c.engine().control.display().to_string();
    let out = backup_ok(w, &["create", &c.volume, "--control-socket", &ctl]);
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `create`, and the requests the S3 server saw meanwhile (none for a directory);
/// a backup never LISTs or HEADs.
pub fn create_counted(c: &Cluster, w: &Where, s3: Option<&S3>) -> Vec<(String, String)> {
    let before = s3.map_or(0, |s| s.ops().len());
    create(c, w);
    let ops = s3.map_or(Vec::new(), |s| s.ops()[before..].to_vec());
    let probes: Vec<_> = ops
        .iter()
        .filter(|(op, _)| op.starts_with("List") || op == "HeadObject")
        .collect();
    assert!(probes.is_empty(), "LIST/HEAD during a backup: {probes:?}");
    ops
}

/// The backups in the target, as `tether backup ls --json` lists them.
pub fn list(w: &Where) -> Vec<serde_json::Value> {
    let out = backup_ok(w, &["ls", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The volume's contents as the test wrote them, kept beside it.
pub struct Model {
    pub bytes: Vec<u8>,
}

impl Model {
    pub fn write(&mut self, nbd: &mut NbdClient, offset: usize, data: &[u8]) {
        for (i, piece) in data.chunks(4 * MIB).enumerate() {
            let at = offset + i * 4 * MIB;
            assert_eq!(nbd.write(at as u64, piece).unwrap(), 0, "write at {at}");
        }
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }
}

pub fn random(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rng.fill_bytes(&mut b);
    b
}

/// Restores `backup` to a new image file and returns its bytes.
pub fn restore_to_file(w: &Where, dir: &Path, backup: &str) -> Vec<u8> {
    let img = dir.join(format!("restored-{}.img", free_port()));
    backup_ok(w, &["restore", backup, "--to-file", img.to_str().unwrap()]);
    let b = std::fs::read(&img).unwrap();
    std::fs::remove_file(&img).unwrap();
    b
}

pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {at} (chunk {})", at / MIB);
    }
}

impl Where<'_> {
    /// The target opened by the library, as the CLI opens it.
    pub fn open(&self) -> (tether_backup::Target, tether_backup::Keys) {
        let spec = match self {
            Where::Dir(d) => tether_backup::TargetSpec {
                url: d.display().to_string(),
                endpoint: String::new(),
                region: String::new(),
                path_style: false,
                access_key: String::new(),
                secret_key: String::new(),
            },
            Where::S3(s) => tether_backup::TargetSpec {
                url: "s3://bucket/backups".into(),
                endpoint: format!("http://{}", s.addr),
                region: String::new(),
                path_style: true,
                access_key: ACCESS.into(),
                secret_key: SECRET.into(),
            },
        };
        let t = tether_backup::Target::connect(&spec).unwrap();
        let secret = tether_backup::Secret::Passphrase(PASSPHRASE.as_bytes().to_vec());
        let (_, keys) = block_on(t.unlock(&secret)).unwrap();
        (t, keys)
    }

    /// The chunk names every manifest in the target holds.
    pub fn referenced(&self) -> std::collections::BTreeSet<String> {
        let (t, keys) = self.open();
        block_on(async {
            let mut out = std::collections::BTreeSet::new();
            for (v, id) in t.list(None).await.unwrap() {
                let m = t.manifest(&keys, &v, &id).await.unwrap();
                out.extend(m.chunks.iter().map(|(_, r)| r.key()));
            }
            out
        })
    }

    /// The chunk names the target's files hold.
    pub fn stored(&self) -> std::collections::BTreeSet<String> {
        files_under(&self.files().join("chunks"))
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect()
    }
}

/// Runs a future to its end on a runtime of its own.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}
