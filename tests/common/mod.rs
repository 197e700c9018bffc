//! A real cluster for end-to-end tests: replica daemons and an engine as separate
//! processes on loopback, driven by real NBD clients.

#![allow(dead_code)]

pub mod backup;
pub mod pg;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// A free loopback port (bound and released; tests run on a quiet machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

pub fn wait_port(addr: SocketAddr, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} before listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{what} did not listen on {addr} within 20 s");
}

/// Fails loudly when a client tool is missing: CI installs them all (.ci/run).
pub fn need(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed; run .ci/run or apt-get install qemu-utils libnbd-bin fio"
    );
}

pub struct Replica {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub child: Option<Child>,
    /// Extra arguments (TLS), kept for restarts.
    pub args: Vec<String>,
}

impl Replica {
    pub fn start(dir: &Path, port: u16) -> Replica {
        Self::start_with(dir, port, &[])
    }

    pub fn start_with(dir: &Path, port: u16, args: &[String]) -> Replica {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let mut child = Command::new(BIN)
            .args(["replica", "--listen", &addr.to_string(), "--data"])
            .arg(dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning a replica");
        wait_port(addr, &mut child, "replica");
        Replica {
            addr,
            dir: dir.to_path_buf(),
            child: Some(child),
            args: args.to_vec(),
        }
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    pub fn kill9(&mut self) {
        self.signal("KILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        self.signal("TERM");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// The volume's first layer on this replica: after a clean stop without
    /// snapshots it holds every block (the log was checkpointed into it).
    pub fn data(&self, volume: &str) -> Vec<u8> {
        let layers = self.dir.join("volumes").join(volume).join("layers");
        let mut all = std::fs::read(layers.join("1.data")).unwrap();
        all.extend(std::fs::read(layers.join("1.rec")).unwrap());
        all
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill9();
    }
}

pub struct Engine {
    pub nbd: SocketAddr,
    pub control: PathBuf,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Engine {
    /// Runs `tether ARGS --control-socket <this engine's>` and checks that it succeeds.
    pub fn ctl_ok(&self, args: &[&str]) -> Output {
        run(Command::new(BIN)
            .args(args)
            .arg("--control-socket")
            .arg(&self.control))
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The volume's status, or `None` while the engine does not answer (yet).
    pub fn try_status_json(&self, volume: &str) -> Option<serde_json::Value> {
        let out = Command::new(BIN)
            .args(["volume", "status", volume, "--json", "--control-socket"])
            .arg(&self.control)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())?
    }

    pub fn status_json(&self, volume: &str) -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["volume", "status", volume, "--json", "--control-socket"])
            .arg(&self.control)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn healthy(&self, volume: &str) -> usize {
        self.status_json(volume)["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "healthy")
            .count()
    }

    /// Waits until `n` replicas are healthy (rebuilds finish), or panics.
    pub fn wait_healthy(&self, volume: &str, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let h = self.healthy(volume);
            if h >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {h} of {n} replicas healthy after {within:?}: {}",
                self.status_json(volume)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub volume: String,
    pub replicas: Vec<Replica>,
    pub engine: Option<Engine>,
    pub extra_engine_args: Vec<String>,
    /// When set, the engine reaches replica i through proxies[i].
    pub proxies: Vec<Proxy>,
    /// Environment for engines (keys, nonce audit).
    pub engine_env: Vec<(String, String)>,
}

/// How to set up a test cluster beyond the defaults.
#[derive(Default)]
pub struct Setup<'a> {
    pub engine_args: &'a [&'a str],
    pub replica_args: &'a [String],
    pub engine_env: &'a [(&'a str, &'a str)],
    pub proxied: bool,
}

impl Cluster {
    /// `n` replicas and an engine for a new volume of `size` (e.g. "256M").
    pub fn start(n: usize, size: &str) -> Cluster {
        Self::start_with(n, size, &[])
    }

    pub fn start_with(n: usize, size: &str, engine_args: &[&str]) -> Cluster {
        Self::build(
            n,
            size,
            Setup {
                engine_args,
                ..Setup::default()
            },
        )
    }

    /// Like `start_with`, with a TCP proxy between the engine and each replica.
    pub fn start_proxied(n: usize, size: &str, engine_args: &[&str]) -> Cluster {
        Self::build(
            n,
            size,
            Setup {
                engine_args,
                proxied: true,
                ..Setup::default()
            },
        )
    }

    pub fn build(n: usize, size: &str, setup: Setup) -> Cluster {
        let Setup {
            engine_args,
            replica_args,
            engine_env,
            proxied,
        } = setup;
        let dir = tempfile::Builder::new()
            .prefix("tether-e2e")
            .tempdir_in(test_root())
            .unwrap();
        let replicas: Vec<Replica> = (0..n)
            .map(|i| {
                Replica::start_with(&dir.path().join(format!("r{i}")), free_port(), replica_args)
            })
            .collect();
        let proxies = if proxied {
            replicas.iter().map(|r| Proxy::start(r.addr)).collect()
        } else {
            Vec::new()
        };
        let mut c = Cluster {
            dir,
            volume: "vol".to_string(),
            replicas,
            engine: None,
            extra_engine_args: engine_args.iter().map(|s| s.to_string()).collect(),
            proxies,
            engine_env: engine_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        c.start_engine(Some(size));
        c
    }

    /// Replicas over the data directories `dirs` (made elsewhere, e.g. by an older
    /// binary) under this cluster's directory, and no engine yet.
    pub fn over_dirs(dir: tempfile::TempDir, dirs: &[PathBuf]) -> Cluster {
        let replicas = dirs
            .iter()
            .map(|d| Replica::start(d, free_port()))
            .collect();
        Cluster {
            dir,
            volume: "vol".to_string(),
            replicas,
            engine: None,
            extra_engine_args: Vec::new(),
            proxies: Vec::new(),
            engine_env: Vec::new(),
        }
    }

    /// The address the engine uses for replica `i`.
    pub fn replica_addr(&self, i: usize) -> SocketAddr {
        self.proxies
            .get(i)
            .map_or(self.replicas[i].addr, |p| p.addr)
    }

    pub fn engine_command(&self, size: Option<&str>, nbd: SocketAddr, control: &Path) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "engine",
            "--volume",
            &self.volume,
            "--nbd-listen",
            &nbd.to_string(),
        ])
        .arg("--control-socket")
        .arg(control);
        if let Some(s) = size {
            cmd.args(["--size", s]);
        }
        for i in 0..self.replicas.len() {
            cmd.args(["--replica", &self.replica_addr(i).to_string()]);
        }
        cmd.args(&self.extra_engine_args);
        cmd.env_remove("TETHER_ENCRYPTION_KEY");
        cmd.envs(self.engine_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    pub fn start_engine(&mut self, size: Option<&str>) {
        let nbd: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let control = self.dir.path().join(format!("control-{}.sock", nbd.port()));
        let log = self.dir.path().join(format!("engine-{}.log", nbd.port()));
        let mut child = self
            .engine_command(size, nbd, &control)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning the engine");
        wait_port(nbd, &mut child, "engine");
        self.engine = Some(Engine {
            nbd,
            control: control.clone(),
            child: Some(child),
            log,
        });
        // The ports are bound before the replicas are opened: wait until the engine
        // answers its control API, i.e. the volume is open.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(BIN)
                .args(["volume", "status", &self.volume, "--control-socket"])
                .arg(&control)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "engine never opened the volume");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The control API answers while the open is still under way: wait that out
        // too (an engine waiting for something else is what its test wants to see).
        while Instant::now() < deadline {
            let st = self.engine().try_status_json(&self.volume);
            let opening = st.is_some_and(|st| {
                st["state"] == "waiting"
                    && st["waiting_reason"] == "opening the volume on its replicas"
            });
            if !opening {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts an engine without waiting for it to serve (it may wait for replicas).
    pub fn spawn_engine(&mut self) -> SocketAddr {
        let nbd: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let control = self.dir.path().join(format!("control-{}.sock", nbd.port()));
        let log = self.dir.path().join(format!("engine-{}.log", nbd.port()));
        let child = self
            .engine_command(None, nbd, &control)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning the engine");
        self.engine = Some(Engine {
            nbd,
            control,
            child: Some(child),
            log,
        });
        nbd
    }

    /// Restarts replica `i` on its old address and data.
    pub fn restart_replica(&mut self, i: usize) {
        let r = &self.replicas[i];
        let (dir, port, args) = (r.dir.clone(), r.addr.port(), r.args.clone());
        self.replicas[i] = Replica::start_with(&dir, port, &args);
    }

    pub fn engine(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    pub fn uri(&self) -> String {
        self.engine().uri(&self.volume)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stops the engine and all replicas cleanly.
    pub fn stop_all(&mut self) {
        if let Some(mut e) = self.engine.take() {
            e.stop();
        }
        for r in &mut self.replicas {
            r.stop();
        }
    }

    /// Restarts every stopped replica on its old address and data, then the engine.
    pub fn restart_all(&mut self) {
        for r in &mut self.replicas {
            if r.child.is_none() {
                *r = Replica::start_with(&r.dir.clone(), r.addr.port(), &r.args.clone());
            }
        }
        self.start_engine(None);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(e) = &self.engine {
                let text = e.log_text();
                let lines: Vec<&str> = text.lines().collect();
                // A process that panicked or exited with an error: its message, which
                // a backtrace pushes out of the tail.
                let died = |l: &&str| l.contains("panicked at") || l.starts_with("Error:");
                if let Some(at) = lines.iter().position(died) {
                    let end = (at + 3).min(lines.len());
                    eprintln!("--- engine ended ---\n{}", lines[at..end].join("\n"));
                }
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!("--- engine log (last lines) ---\n{}", tail.join("\n"));
            }
            for r in &self.replicas {
                let text = std::fs::read_to_string(r.dir.with_extension("log")).unwrap_or_default();
                if let Some(at) = text.find("panicked at") {
                    let end = (at + 400).min(text.len());
                    eprintln!("--- replica {} panic ---\n{}", r.addr, &text[at..end]);
                }
            }
        }
    }
}

/// Where test clusters live: on the real disk, not a small tmpfs.
pub fn test_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&root).unwrap();
    root
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes `len` pseudo-random bytes from `seed` to `path`.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    std::fs::write(path, &buf).unwrap();
}

pub fn sha256(path: &Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(path).unwrap();
    format!("{:x}", sha2::Sha256::digest(&data))
}

/// What an [`NbdClient`] negotiates before NBD_OPT_GO.
#[derive(Debug, Default, Clone, Copy)]
pub struct NbdOptions {
    /// NBD_OPT_STRUCTURED_REPLY.
    pub structured: bool,
    /// NBD_OPT_EXTENDED_HEADERS (then structured replies come with it).
    pub extended: bool,
    /// NBD_OPT_SET_META_CONTEXT base:allocation.
    pub block_status: bool,
}

/// One reply chunk (a simple reply becomes one chunk of type 0 with the data).
#[derive(Debug, Clone)]
pub struct NbdChunk {
    pub kind: u16,
    pub flags: u16,
    /// The extended header's offset field (0 in other framings).
    pub offset: u64,
    pub payload: Vec<u8>,
}

/// A whole reply: its error (0 on success), data read, and chunks.
#[derive(Debug, Clone)]
pub struct NbdReply {
    pub error: u32,
    pub data: Vec<u8>,
    pub chunks: Vec<NbdChunk>,
}

/// A minimal blocking NBD client (fixed newstyle, NBD_OPT_GO; simple replies, or
/// structured replies, or extended headers).
pub struct NbdClient {
    s: TcpStream,
    handle: u64,
    pub size: u64,
    /// Transmission flags from NBD_INFO_EXPORT.
    pub flags: u16,
    /// The canonical name, if the server sent NBD_INFO_NAME.
    pub name: Option<String>,
    opts: NbdOptions,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Sends option `opt` with `data` and reads its replies up to the final one:
/// (reply type, data) of each.
fn nbd_option(s: &mut TcpStream, opt: u32, data: &[u8]) -> std::io::Result<Vec<(u32, Vec<u8>)>> {
    use std::io::{Read, Write};
    let mut o = Vec::new();
    o.extend_from_slice(b"IHAVEOPT");
    o.extend_from_slice(&opt.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    s.write_all(&o)?;
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let kind = be32(&h[12..]);
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        s.read_exact(&mut d)?;
        out.push((kind, d));
        // ACK and errors end an option; INFO, SERVER and META_CONTEXT do not.
        if kind == 1 || kind & 0x8000_0000 != 0 {
            return Ok(out);
        }
    }
}

/// Connects, sends each option of `opts` (without data) and returns the final reply
/// type of each, then aborts.
pub fn nbd_option_replies(addr: SocketAddr, opts: &[u32]) -> Vec<u32> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let replies = opts
        .iter()
        .map(|&o| nbd_option(&mut s, o, &[]).unwrap().last().unwrap().0)
        .collect();
    let _ = nbd_option(&mut s, 2, &[]);
    replies
}

impl NbdClient {
    pub fn connect(addr: SocketAddr, name: &str) -> std::io::Result<NbdClient> {
        Self::connect_with(addr, name, NbdOptions::default())
    }

    pub fn connect_with(
        addr: SocketAddr,
        name: &str,
        opts: NbdOptions,
    ) -> std::io::Result<NbdClient> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        s.write_all(&3u32.to_be_bytes())?;
        let refused = |what: &str, r: &[(u32, Vec<u8>)]| {
            std::io::Error::other(format!(
                "{what} refused: {:#x}",
                r.last().map_or(0, |x| x.0)
            ))
        };
        for (on, opt) in [(opts.extended, 11u32), (opts.structured, 8)] {
            if on {
                let r = nbd_option(&mut s, opt, &[])?;
                if r.last().map(|x| x.0) != Some(1) {
                    return Err(refused("option", &r));
                }
            }
        }
        if opts.block_status {
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&15u32.to_be_bytes());
            d.extend_from_slice(b"base:allocation");
            let r = nbd_option(&mut s, 10, &d)?;
            if !r.iter().any(|x| x.0 == 4) {
                return Err(refused("base:allocation", &r));
            }
        }
        // GO, asking for the canonical name (NBD_INFO_NAME).
        let mut go = Vec::new();
        go.extend_from_slice(&(name.len() as u32).to_be_bytes());
        go.extend_from_slice(name.as_bytes());
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&1u16.to_be_bytes());
        let (mut size, mut flags, mut canonical) = (0, 0, None);
        for (kind, d) in nbd_option(&mut s, 7, &go)? {
            if kind == 1 {
                continue;
            }
            match (kind, be16(&d)) {
                (3, 0) => {
                    size = be64(&d[2..]);
                    flags = be16(&d[10..]);
                }
                (3, 1) => canonical = Some(String::from_utf8_lossy(&d[2..]).to_string()),
                (3, _) => {}
                _ => {
                    return Err(std::io::Error::other(format!(
                        "GO refused: {kind:#x} {}",
                        String::from_utf8_lossy(&d)
                    )))
                }
            }
        }
        Ok(NbdClient {
            s,
            handle: 0,
            size,
            flags,
            name: canonical,
            opts,
        })
    }

    /// Sends one request (extended headers if negotiated, else compact; `payload`
    /// follows the header) and reads its whole reply.
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> std::io::Result<NbdReply> {
        use std::io::{Read, Write};
        self.handle += 1;
        let mut r = Vec::with_capacity(32 + payload.len());
        let magic: u32 = if self.opts.extended {
            0x21e41c71
        } else {
            0x25609513
        };
        r.extend_from_slice(&magic.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&self.handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        if self.opts.extended {
            r.extend_from_slice(&length.to_be_bytes());
        } else {
            r.extend_from_slice(&(length as u32).to_be_bytes());
        }
        r.extend_from_slice(payload);
        self.s.write_all(&r)?;
        let mut reply = NbdReply {
            error: 0,
            data: Vec::new(),
            chunks: Vec::new(),
        };
        loop {
            let mut m = [0u8; 4];
            self.s.read_exact(&mut m)?;
            let (cflags, ckind, handle, coff, len) = match be32(&m) {
                0x67446698 => {
                    let mut h = [0u8; 12];
                    self.s.read_exact(&mut h)?;
                    assert_eq!(be64(&h[4..]), self.handle, "reply handle");
                    reply.error = be32(&h);
                    if kind == 0 && reply.error == 0 {
                        reply.data = vec![0u8; length as usize];
                        self.s.read_exact(&mut reply.data)?;
                    }
                    return Ok(reply);
                }
                0x668e33ef => {
                    let mut h = [0u8; 16];
                    self.s.read_exact(&mut h)?;
                    (
                        be16(&h),
                        be16(&h[2..]),
                        be64(&h[4..]),
                        0,
                        u64::from(be32(&h[12..])),
                    )
                }
                0x6e8a278c => {
                    let mut h = [0u8; 28];
                    self.s.read_exact(&mut h)?;
                    (
                        be16(&h),
                        be16(&h[2..]),
                        be64(&h[4..]),
                        be64(&h[12..]),
                        be64(&h[20..]),
                    )
                }
                other => panic!("reply magic {other:#x}"),
            };
            assert_eq!(handle, self.handle, "reply handle");
            let mut p = vec![0u8; len as usize];
            self.s.read_exact(&mut p)?;
            if ckind & 0x8000 != 0 {
                reply.error = be32(&p);
            } else if ckind == 1 {
                reply.data.extend_from_slice(&p[8..]);
            }
            reply.chunks.push(NbdChunk {
                kind: ckind,
                flags: cflags,
                offset: coff,
                payload: p,
            });
            if cflags & 1 != 0 {
                return Ok(reply);
            }
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<u32> {
        let flags = if self.opts.extended { 1 << 5 } else { 0 };
        self.send(1, flags, offset, data.len() as u64, data)
            .map(|r| r.error)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Result<Vec<u8>, u32>> {
        let r = self.send(0, 0, offset, u64::from(len), &[])?;
        Ok(if r.error == 0 {
            Ok(r.data)
        } else {
            Err(r.error)
        })
    }

    pub fn flush(&mut self) -> std::io::Result<u32> {
        self.send(3, 0, 0, 0, &[]).map(|r| r.error)
    }

    /// Sends any raw request header (for bad-input tests) and returns the error.
    pub fn raw(&mut self, kind: u16, flags: u16, offset: u64, len: u32) -> std::io::Result<u32> {
        self.send(kind, flags, offset, u64::from(len), &[])
            .map(|r| r.error)
    }
}

/// What a [`Proxy`] does to the traffic passing through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward at once.
    Pass,
    /// Forward each chunk after this many milliseconds.
    Delay(u64),
    /// Hold everything (a network partition that keeps connections open).
    Blackhole,
}

/// A TCP proxy between engine and replica that delays, black-holes or cuts traffic.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: std::sync::Arc<std::sync::Mutex<ProxyMode>>,
    epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Every byte forwarded in either direction, once `capture` is on.
    pub captured: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = std::sync::Arc::new(std::sync::Mutex::new(ProxyMode::Pass));
        let epoch = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let captured = std::sync::Arc::new(std::sync::Mutex::new(None));
        let (m, ep, cap) = (mode.clone(), epoch.clone(), captured.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let born = ep.load(Ordering::SeqCst);
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let (m, ep, cap) = (m.clone(), ep.clone(), cap.clone());
                    std::thread::spawn(move || pump(from, to, m, ep, born, cap));
                }
            }
        });
        Proxy {
            addr,
            mode,
            epoch,
            captured,
        }
    }

    /// Starts recording the traffic.
    pub fn capture(&self) {
        *self.captured.lock().unwrap() = Some(Vec::new());
    }

    pub fn set(&self, mode: ProxyMode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Cuts every open connection (new ones are accepted).
    pub fn cut(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    mode: std::sync::Arc<std::sync::Mutex<ProxyMode>>,
    epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
    born: u64,
    captured: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
) {
    use std::io::{Read, Write};
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 64 << 10];
    let cut = || epoch.load(std::sync::atomic::Ordering::SeqCst) != born;
    loop {
        if cut() {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        loop {
            let m = *mode.lock().unwrap();
            match m {
                ProxyMode::Pass => break,
                ProxyMode::Delay(ms) => {
                    std::thread::sleep(Duration::from_millis(ms));
                    break;
                }
                ProxyMode::Blackhole if cut() => break,
                ProxyMode::Blackhole => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        if let Some(c) = captured.lock().unwrap().as_mut() {
            c.extend_from_slice(&buf[..n]);
        }
        if cut() || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}
