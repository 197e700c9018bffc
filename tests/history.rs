//! A history checker in the spirit of Jepsen: concurrent clients write blocks whose
//! contents name the write and read blocks back, while a nemesis kills, pauses,
//! restarts and cuts replicas and restarts the engine, and a membership nemesis restarts
//! the engine with some replicas only (stale ones alone included), removes and adds back
//! a replica, and starts a second engine while the first serves. Every read must see the latest
//! acknowledged write of its block or one concurrent with it; after healing, a final
//! flush and a full restart, every acknowledged-and-flushed write must be there.
//!
//! Runs for TETHER_HISTORY_SECS seconds (default 20); longer runs on demand.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WRITERS: u64 = 3;
const PER_WRITER: u64 = 64;
const BLOCKS: u64 = WRITERS * PER_WRITER;

fn content(block: u64, writer: u64, counter: u64) -> Vec<u8> {
    let mut b = vec![(counter % 251) as u8; 4096];
    b[..8].copy_from_slice(b"tether-h");
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&writer.to_le_bytes());
    b[24..32].copy_from_slice(&counter.to_le_bytes());
    b
}

/// The write counter a block holds (0: never written), or what is wrong with it.
fn decode(block: u64, b: &[u8]) -> Result<u64, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(0);
    }
    let counter = u64::from_le_bytes(b[24..32].try_into().unwrap());
    let writer = block / PER_WRITER;
    if &b[..8] != b"tether-h"
        || b[8..16] != block.to_le_bytes()
        || b[16..24] != writer.to_le_bytes()
        || b[32..].iter().any(|&x| x != (counter % 251) as u8)
    {
        return Err(format!("block {block} holds foreign or torn data"));
    }
    Ok(counter)
}

struct Shared {
    addr: Mutex<SocketAddr>,
    acked: Vec<AtomicU64>,
    issued: Vec<AtomicU64>,
    flushed: Vec<AtomicU64>,
    stop: AtomicBool,
    violations: Mutex<Vec<String>>,
    reads: AtomicU64,
    writes: AtomicU64,
}

fn connect(sh: &Shared) -> Option<NbdClient> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let addr = *sh.addr.lock().unwrap();
        if let Ok(c) = NbdClient::connect(addr, "vol") {
            return Some(c);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn client(sh: Arc<Shared>, w: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Some(mut cl) = connect(&sh) else { return };
    let mut n = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let b = w * PER_WRITER + rng.random_range(0..PER_WRITER);
        let counter = sh.issued[b as usize].load(Ordering::SeqCst) + 1;
        sh.issued[b as usize].store(counter, Ordering::SeqCst);
        match cl.write(b * 4096, &content(b, w, counter)) {
            Ok(0) => {
                sh.acked[b as usize].fetch_max(counter, Ordering::SeqCst);
                sh.writes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => match connect(&sh) {
                Some(c) => cl = c,
                None => return,
            },
        }
        n += 1;
        if n.is_multiple_of(8) {
            let mine: Vec<u64> = (w * PER_WRITER..(w + 1) * PER_WRITER)
                .map(|b| sh.acked[b as usize].load(Ordering::SeqCst))
                .collect();
            if let Ok(0) = cl.flush() {
                for (i, v) in mine.into_iter().enumerate() {
                    sh.flushed[(w * PER_WRITER) as usize + i].fetch_max(v, Ordering::SeqCst);
                }
            }
        }
        // Read any block, own or another writer's.
        let rb = rng.random_range(0..BLOCKS);
        let lo = sh.acked[rb as usize].load(Ordering::SeqCst);
        match cl.read(rb * 4096, 4096) {
            Ok(Ok(data)) => {
                let hi = sh.issued[rb as usize].load(Ordering::SeqCst);
                sh.reads.fetch_add(1, Ordering::Relaxed);
                match decode(rb, &data) {
                    Ok(c) if c >= lo && c <= hi => {}
                    Ok(c) => sh.violations.lock().unwrap().push(format!(
                        "read of block {rb} saw write {c}; acknowledged before the read: {lo}, issued by its end: {hi}"
                    )),
                    Err(e) => sh.violations.lock().unwrap().push(e),
                }
            }
            Ok(Err(_)) => {}
            Err(_) => match connect(&sh) {
                Some(c) => cl = c,
                None => return,
            },
        }
    }
}

/// Starts an engine that lists only replicas `keep`; returns its NBD address and
/// process.
fn partial_engine(c: &Cluster, keep: &[usize]) -> (SocketAddr, std::process::Child) {
    let nbd: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let control = c.path(&format!("control-{}.sock", nbd.port()));
    let cmd = c.engine_command(None, nbd, &control);
    // engine_command lists every replica: keep the first arguments and the engine's
    // extra ones, with only the chosen replicas.
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().to_string())
        .collect();
    let mut kept = Vec::new();
    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        if a == "--replica" {
            let addr = it.next().unwrap_or_default();
            let chosen = keep.iter().any(|&k| c.replica_addr(k).to_string() == addr);
            if chosen {
                kept.extend(["--replica".to_string(), addr]);
            }
        } else {
            kept.push(a);
        }
    }
    let log = c.path(&format!("engine-{}.log", nbd.port()));
    let child = std::process::Command::new(BIN)
        .args(&kept)
        .envs(
            cmd.get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    (nbd, child)
}

#[test]
fn reads_see_acknowledged_writes_under_a_nemesis() {
    let secs: u64 = std::env::var("TETHER_HISTORY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    // The volume runs as `tether up` runs it: encrypted, replicas over mutual TLS
    // (through the proxies), so the nemesis exercises those paths too.
    let keys = tempfile::tempdir_in(test_root()).unwrap();
    let pki = keys.path().join("pki");
    run(std::process::Command::new(BIN)
        .args(["tls", "init"])
        .arg(&pki));
    let key = keys.path().join("key");
    std::fs::write(&key, "history test passphrase").unwrap();
    let f = |n: &str| pki.join(n).to_string_lossy().to_string();
    let replica_args = vec![
        "--tls-cert".to_string(),
        f("server-cert.pem"),
        "--tls-key".into(),
        f("server-key.pem"),
        "--tls-ca".into(),
        f("ca-cert.pem"),
    ];
    let (cc, ck, ca, kf) = (
        f("client-cert.pem"),
        f("client-key.pem"),
        f("ca-cert.pem"),
        key.to_string_lossy().to_string(),
    );
    let engine_args = [
        "--timeout",
        "2",
        "--tls-cert",
        &cc,
        "--tls-key",
        &ck,
        "--tls-ca",
        &ca,
        "--encryption-key-file",
        &kf,
    ];
    let mut c = Cluster::build(
        3,
        "16M",
        Setup {
            engine_args: &engine_args,
            replica_args: &replica_args,
            proxied: true,
            ..Setup::default()
        },
    );
    let sh = Arc::new(Shared {
        addr: Mutex::new(c.engine().nbd),
        acked: (0..BLOCKS).map(|_| AtomicU64::new(0)).collect(),
        issued: (0..BLOCKS).map(|_| AtomicU64::new(0)).collect(),
        flushed: (0..BLOCKS).map(|_| AtomicU64::new(0)).collect(),
        stop: AtomicBool::new(false),
        violations: Mutex::new(Vec::new()),
        reads: AtomicU64::new(0),
        writes: AtomicU64::new(0),
    });
    let clients: Vec<_> = (0..WRITERS)
        .map(|w| {
            let sh = sh.clone();
            std::thread::spawn(move || client(sh, w, w + 17))
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4242);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut actions = Vec::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..900)));
        let i = rng.random_range(0..3);
        // One replica at a time is hurt, so the volume stays available. Actions 6 to 8
        // are the membership nemesis: an engine restarted with some of the replicas
        // (stale ones alone included), a replica removed and added back, and a
        // second engine started while the first serves.
        let action = rng.random_range(0..9);
        actions.push(action);
        match action {
            0 => {
                c.replicas[i].kill9();
                std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
                let (dir, port) = (c.replicas[i].dir.clone(), c.replicas[i].addr.port());
                c.replicas[i] = Replica::start_with(&dir, port, &replica_args);
            }
            1 => {
                c.replicas[i].signal("STOP");
                std::thread::sleep(Duration::from_millis(rng.random_range(500..3000)));
                c.replicas[i].signal("CONT");
            }
            2 => {
                c.proxies[i].set(ProxyMode::Delay(rng.random_range(5..80)));
                std::thread::sleep(Duration::from_millis(800));
                c.proxies[i].set(ProxyMode::Pass);
            }
            3 => {
                c.proxies[i].set(ProxyMode::Blackhole);
                std::thread::sleep(Duration::from_millis(rng.random_range(500..3000)));
                c.proxies[i].set(ProxyMode::Pass);
                c.proxies[i].cut();
            }
            4 => c.proxies[i].cut(),
            5 => {
                // The engine dies and comes back (on a new port); clients reconnect.
                if let Some(mut e) = c.engine.take() {
                    e.kill9();
                }
                c.start_engine(None);
                *sh.addr.lock().unwrap() = c.engine().nbd;
            }
            6 => {
                // An engine that reaches only some replicas: it serves if the rule lets
                // it (clients follow it), or waits; then the operator restarts it with
                // all of them.
                if let Some(mut e) = c.engine.take() {
                    e.kill9();
                }
                let keep: Vec<usize> = (0..3).filter(|_| rng.random_bool(0.5)).collect();
                let keep = if keep.is_empty() { vec![i] } else { keep };
                let partial = partial_engine(&c, &keep);
                *sh.addr.lock().unwrap() = partial.0;
                std::thread::sleep(Duration::from_millis(rng.random_range(1000..4000)));
                let (_, mut child) = partial;
                let _ = child.kill();
                let _ = child.wait();
                c.start_engine(None);
                *sh.addr.lock().unwrap() = c.engine().nbd;
            }
            7 => {
                // `replica rm`, then `replica add` of the same one (it is rebuilt); a
                // refusal (too few healthy replicas) is an answer too.
                let addr = c.replica_addr(i).to_string();
                let ctl = |args: &[&str]| {
                    std::process::Command::new(BIN)
                        .args(args)
                        .arg("--control-socket")
                        .arg(&c.engine().control)
                        .output()
                        .unwrap()
                };
                let rm = ctl(&["replica", "rm", "vol", &addr]);
                std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
                if rm.status.success() {
                    let add = ctl(&["replica", "add", "vol", &addr]);
                    assert!(
                        add.status.success(),
                        "replica add {addr}: {}",
                        String::from_utf8_lossy(&add.stderr)
                    );
                }
            }
            _ => {
                // A second engine starts while the first serves: it takes over (the
                // first is fenced) and clients follow it; the first is then stopped.
                let old = c.engine.take();
                c.start_engine(None);
                *sh.addr.lock().unwrap() = c.engine().nbd;
                std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
                if let Some(mut e) = old {
                    e.kill9();
                }
            }
        }
        // Let rebuilds catch up before the next blow, as an operator would.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.engine().wait_healthy("vol", 2, Duration::from_secs(30))
        }));
    }
    sh.stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.join().unwrap();
    }
    let v = sh.violations.lock().unwrap().clone();
    assert!(
        v.is_empty(),
        "{} violations, first: {:?}",
        v.len(),
        &v[..v.len().min(5)]
    );
    assert!(
        sh.writes.load(Ordering::Relaxed) > 100,
        "too few writes succeeded"
    );
    // Heal, flush, restart everything, and check every flushed write.
    c.engine().wait_healthy("vol", 3, Duration::from_secs(120));
    {
        let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
        assert_eq!(cl.flush().unwrap(), 0);
        for b in 0..BLOCKS as usize {
            sh.flushed[b].fetch_max(sh.acked[b].load(Ordering::SeqCst), Ordering::SeqCst);
        }
    }
    c.stop_all();
    c.restart_all();
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    let data = cl.read(0, (BLOCKS * 4096) as u32).unwrap().unwrap();
    for b in 0..BLOCKS {
        let got = decode(b, &data[(b * 4096) as usize..((b + 1) * 4096) as usize]).unwrap();
        let want = sh.flushed[b as usize].load(Ordering::SeqCst);
        let hi = sh.issued[b as usize].load(Ordering::SeqCst);
        assert!(
            got >= want && got <= hi,
            "block {b}: holds write {got}, flushed {want}, issued {hi}"
        );
    }
    let verify = std::process::Command::new(BIN)
        .args(["volume", "verify", "vol", "--control-socket"])
        .arg(&c.engine().control)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    eprintln!(
        "history: {} writes, {} reads, nemesis actions {:?}",
        sh.writes.load(Ordering::Relaxed),
        sh.reads.load(Ordering::Relaxed),
        actions
    );
}
