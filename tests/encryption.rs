//! Encryption at rest and in flight: nothing readable leaves the engine, tampering is
//! caught, keys are checked at open, replicas accept only trusted engines, NBD over
//! TLS works with real clients, and nonces never repeat.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const PATTERN: &[u8] = b"TETHER-PLAINTEXT-MARKER:";
const SEAL: u64 = 32;
const REC: u64 = 64;
const BLK: u64 = 4096;

fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let p = dir.join(name);
    // 0xff never occurs in UTF-8: this is unmistakably a raw 32-byte key.
    let key: Vec<u8> = (0..32u8)
        .map(|i| {
            if i == 0 {
                0xff
            } else {
                i.wrapping_mul(37) ^ byte
            }
        })
        .collect();
    std::fs::write(&p, key).unwrap();
    p
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn pattern_block(i: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLK as usize);
    while b.len() < BLK as usize {
        b.extend_from_slice(PATTERN);
        b.extend_from_slice(format!("{i:08}").as_bytes());
    }
    b.truncate(BLK as usize);
    b
}

/// Writes 256 pattern blocks, checkpoints half into the layers (snapshot) and leaves
/// the rest in the log; returns whether the pattern shows in replica files or traffic.
fn run_pattern(encrypted: bool) -> (bool, bool) {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let key = key_file(dir.path(), "k", 1);
    let key_arg = key.to_str().unwrap().to_string();
    let args: Vec<&str> = if encrypted {
        vec!["--encryption-key-file", &key_arg]
    } else {
        vec![]
    };
    let mut c = Cluster::start_proxied(2, "16M", &args);
    for p in &c.proxies {
        p.capture();
    }
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    for i in 0..128 {
        assert_eq!(cl.write(i * BLK, &pattern_block(i)).unwrap(), 0);
    }
    c.engine().ctl_ok(&["snapshot", "create", "vol", "s1"]);
    for i in 128..256 {
        assert_eq!(cl.write(i * BLK, &pattern_block(i)).unwrap(), 0);
    }
    assert_eq!(cl.flush().unwrap(), 0);
    for i in [0, 5, 130, 255] {
        assert_eq!(
            cl.read(i * BLK, BLK as u32).unwrap().unwrap(),
            pattern_block(i)
        );
    }
    drop(cl);
    // Kill rather than stop: the newest writes stay in the replicas' logs.
    c.engine.as_mut().unwrap().kill9();
    for r in &mut c.replicas {
        r.kill9();
    }
    let mut files = Vec::new();
    for r in &c.replicas {
        all_files(&r.dir, &mut files);
    }
    let on_disk = files
        .iter()
        .any(|f| contains(&std::fs::read(f).unwrap(), PATTERN));
    let on_wire = c
        .proxies
        .iter()
        .any(|p| contains(p.captured.lock().unwrap().as_ref().unwrap(), PATTERN));
    (on_disk, on_wire)
}

#[test]
fn plaintext_never_reaches_replica_disks_or_the_wire() {
    // The control run proves the search would find it.
    assert_eq!(run_pattern(false), (true, true));
    assert_eq!(
        run_pattern(true),
        (false, false),
        "plaintext found on a replica's disk or on the wire"
    );
}

fn status(c: &Cluster) -> serde_json::Value {
    c.engine().status_json("vol")
}

/// Opens `volume` layer file `name` of replica `r`.
fn layer(r: &Replica, id: u64, ext: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(r.dir.join(format!("volumes/vol/layers/{id}.{ext}")))
        .unwrap()
}

/// Flips a byte of block `b`'s ciphertext and fixes the replica's own crc, as an
/// attacker with the disk would: only the AEAD tag can catch it.
fn flip(r: &Replica, b: u64) {
    let (data, rec) = (layer(r, 1, "data"), layer(r, 1, "rec"));
    let mut blk = vec![0u8; BLK as usize];
    data.read_exact_at(&mut blk, b * BLK).unwrap();
    blk[100] ^= 0x5a;
    data.write_all_at(&blk, b * BLK).unwrap();
    let mut e = vec![0u8; REC as usize];
    rec.read_exact_at(&mut e, b * REC).unwrap();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&blk), &e[8..8 + SEAL as usize]);
    rec.write_all_at(&crc.to_le_bytes(), b * REC).unwrap();
}

/// Swaps blocks `a` and `b` (data and records) within a replica.
fn swap(r: &Replica, a: u64, b: u64) {
    let (data, rec) = (layer(r, 1, "data"), layer(r, 1, "rec"));
    for (f, size) in [(&data, BLK), (&rec, REC)] {
        let (mut x, mut y) = (vec![0u8; size as usize], vec![0u8; size as usize]);
        f.read_exact_at(&mut x, a * size).unwrap();
        f.read_exact_at(&mut y, b * size).unwrap();
        f.write_all_at(&y, a * size).unwrap();
        f.write_all_at(&x, b * size).unwrap();
    }
}

/// Three replicas of an encrypted volume (key byte `key`) whose first 64 blocks are
/// `block(i)` and live in layer 1 on every replica, where `flip` and `rot` reach them.
fn in_layer_one(dir: &Path, key: u8, block: impl Fn(u64) -> Vec<u8>) -> (Cluster, NbdClient) {
    let key = key_file(dir, "k", key);
    let c = Cluster::start_with(3, "16M", &["--encryption-key-file", key.to_str().unwrap()]);
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    // One write of a whole group of 64 blocks: their records get their page of `.rec`
    // (a group holding few keeps them packed in `.pack`, where `flip` cannot reach).
    let all: Vec<u8> = (0..64).flat_map(block).collect();
    assert_eq!(cl.write(0, &all).unwrap(), 0);
    // A snapshot checkpoints the log: the blocks now live in layer 1 everywhere.
    c.engine().ctl_ok(&["snapshot", "create", "vol", "base"]);
    (c, cl)
}

#[test]
fn tampered_blocks_are_never_returned() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let block = |i: u64| vec![i as u8 + 1; BLK as usize];
    let (c, mut cl) = in_layer_one(dir.path(), 2, block);
    flip(&c.replicas[0], 3);
    swap(&c.replicas[1], 7, 8);
    // A new, empty replica rebuilds from replica 0, whose block 3 is tampered: it
    // must get a good copy from another replica, never the bad one.
    let new = Replica::start(&c.dir.path().join("new"), free_port());
    c.engine()
        .ctl_ok(&["replica", "add", "vol", &new.addr.to_string()]);
    c.engine().wait_healthy("vol", 4, Duration::from_secs(60));
    // Every read is right, whichever replica serves it (reads rotate over the
    // replicas, so four in a row reach every copy).
    for i in [3, 7, 8] {
        for _ in 0..4 {
            assert_eq!(cl.read(i * BLK, BLK as u32).unwrap().unwrap(), block(i));
        }
    }
    let st = status(&c);
    assert!(
        st["counters"]["checksum_errors"].as_u64().unwrap() >= 2,
        "{st}"
    );
    assert_eq!(st["encryption"], "aes-256-gcm (32-byte key)", "{st}");
    let log = c.engine().log_text();
    assert!(log.contains("failed authentication"), "{log}");
    assert!(log.contains("block=3") && log.contains("block=7"), "{log}");
    assert_eq!(
        c.engine().healthy("vol"),
        4,
        "a bad block does not drop a replica"
    );
    // The bad copies were repaired verbatim from a good one: verify is clean.
    c.engine().ctl_ok(&["volume", "verify", "vol"]);
    // The same damage everywhere: the read fails with EIO, never returns garbage.
    for r in c.replicas.iter().chain([&new]) {
        swap(r, 10, 11);
    }
    assert_eq!(cl.read(10 * BLK, BLK as u32).unwrap(), Err(5));
    assert_eq!(cl.read(12 * BLK, BLK as u32).unwrap().unwrap(), block(12));
    assert_eq!(c.engine().healthy("vol"), 4);
}

/// Flips a byte of block `b`'s ciphertext on replica `r`, leaving its crc: bit rot.
fn rot(r: &Replica, b: u64) {
    let data = layer(r, 1, "data");
    let mut byte = [0u8; 1];
    data.read_exact_at(&mut byte, b * BLK + 200).unwrap();
    data.write_all_at(&[byte[0] ^ 0x10], b * BLK + 200).unwrap();
}

#[test]
fn rot_in_an_encrypted_volume_is_caught_by_the_seal_and_repaired() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let block = |i: u64| vec![i as u8 + 9; BLK as usize];
    let (c, mut cl) = in_layer_one(dir.path(), 4, block);
    rot(&c.replicas[0], 5);
    rot(&c.replicas[1], 6);
    // Reads rotate over the replicas: four in a row reach every copy.
    for i in [5, 6] {
        for _ in 0..4 {
            assert_eq!(cl.read(i * BLK, BLK as u32).unwrap().unwrap(), block(i));
        }
    }
    // The engine reads encrypted blocks without the replicas' checksums: the seal is
    // what caught the rot (a replica's checksum error never says "authentication").
    let log = c.engine().log_text();
    assert!(log.contains("failed authentication"), "{log}");
    assert!(log.contains("block=5") && log.contains("block=6"), "{log}");
    assert!(status(&c)["counters"]["checksum_errors"].as_u64().unwrap() >= 2);
    assert_eq!(
        c.engine().healthy("vol"),
        3,
        "a bad block does not drop a replica"
    );
    // Repaired from a good copy: every replica's copy is the same and opens.
    c.engine().ctl_ok(&["volume", "verify", "vol"]);
}

fn metas(c: &Cluster) -> Vec<Vec<u8>> {
    c.replicas
        .iter()
        .map(|r| std::fs::read(r.dir.join("volumes/vol/meta")).unwrap())
        .collect()
}

/// Runs an engine for the cluster's volume with `args` and `env`, expecting it to
/// refuse to start; returns its stderr.
fn refused(c: &Cluster, args: &[&str], env: &[(&str, &str)]) -> String {
    let nbd: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ctl = c.path("refused.sock");
    let cmd = c.engine_command(None, nbd, &ctl);
    // Drop the cluster's own key arguments.
    let mut base: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().to_string())
        .collect();
    if let Some(i) = base.iter().position(|a| a == "--encryption-key-file") {
        base.drain(i..i + 2);
    }
    let mut cmd2 = Command::new(BIN);
    cmd2.args(&base)
        .args(args)
        .env_remove("TETHER_ENCRYPTION_KEY");
    for (k, v) in env {
        cmd2.env(k, v);
    }
    let out = cmd2
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the engine started: {args:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn wrong_missing_or_truncated_keys_fail_at_open_and_change_nothing() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let key = key_file(dir.path(), "good", 3);
    let mut c = Cluster::start_with(3, "16M", &["--encryption-key-file", key.to_str().unwrap()]);
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(cl.write(0, &[0x42; 8192]).unwrap(), 0);
    drop(cl);
    c.engine.take().unwrap().stop();
    let before = metas(&c);

    let err = refused(&c, &[], &[]);
    assert!(
        err.contains("is encrypted") && err.contains("--encryption-key-file"),
        "{err}"
    );
    let wrong = key_file(dir.path(), "wrong", 4);
    let err = refused(&c, &["--encryption-key-file", wrong.to_str().unwrap()], &[]);
    assert!(err.contains("does not match"), "{err}");
    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, &std::fs::read(&key).unwrap()[..20]).unwrap();
    let err = refused(
        &c,
        &["--encryption-key-file", truncated.to_str().unwrap()],
        &[],
    );
    assert!(err.contains("truncated"), "{err}");
    let hex_short = dir.path().join("hexshort");
    std::fs::write(&hex_short, "ab".repeat(20)).unwrap();
    let err = refused(
        &c,
        &["--encryption-key-file", hex_short.to_str().unwrap()],
        &[],
    );
    assert!(err.contains("truncated"), "{err}");
    let err = refused(&c, &[], &[("TETHER_ENCRYPTION_KEY", "a wrong passphrase")]);
    assert!(err.contains("created with a 32-byte key"), "{err}");
    let err = refused(&c, &["--encryption-key-file", "/nonexistent/key"], &[]);
    assert!(err.contains("/nonexistent/key"), "{err}");
    assert_eq!(metas(&c), before, "a refused open changed replica state");

    // The right key serves the data.
    c.start_engine(None);
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(cl.read(0, 8192).unwrap().unwrap(), vec![0x42; 8192]);

    // An unencrypted volume refuses a key: the mode is fixed at creation.
    let plain = Cluster::start(1, "16M");
    let err = refused(
        &plain,
        &["--encryption-key-file", key.to_str().unwrap()],
        &[],
    );
    assert!(err.contains("exists unencrypted"), "{err}");

    // A passphrase works through the environment.
    let env = [("TETHER_ENCRYPTION_KEY", "correct horse battery staple")];
    let mut pc = Cluster::build(
        1,
        "16M",
        Setup {
            engine_env: &env,
            ..Setup::default()
        },
    );
    let mut cl = NbdClient::connect(pc.engine().nbd, "vol").unwrap();
    assert_eq!(cl.write(4096, &[9; 4096]).unwrap(), 0);
    drop(cl);
    pc.engine.take().unwrap().stop();
    let err = refused(
        &pc,
        &[],
        &[("TETHER_ENCRYPTION_KEY", "correct horse battery stapler")],
    );
    assert!(err.contains("does not match"), "{err}");
    pc.start_engine(None);
    let mut cl = NbdClient::connect(pc.engine().nbd, "vol").unwrap();
    assert_eq!(cl.read(4096, 4096).unwrap().unwrap(), vec![9; 4096]);
}

fn tls_init(dir: &Path) {
    run(Command::new(BIN).args(["tls", "init"]).arg(dir));
}

fn tls_args(dir: &Path, side: &str) -> Vec<String> {
    let f = |n: &str| dir.join(n).to_string_lossy().to_string();
    vec![
        "--tls-cert".into(),
        f(&format!("{side}-cert.pem")),
        "--tls-key".into(),
        f(&format!("{side}-key.pem")),
        "--tls-ca".into(),
        f("ca-cert.pem"),
    ]
}

#[test]
fn replicas_accept_only_engines_their_ca_signed() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let (ca1, ca2) = (dir.path().join("ca1"), dir.path().join("ca2"));
    tls_init(&ca1);
    tls_init(&ca2);
    let replica_args = tls_args(&ca1, "server");
    let engine_args = tls_args(&ca1, "client");
    let ea: Vec<&str> = engine_args.iter().map(String::as_str).collect();
    let mut c = Cluster::build(
        2,
        "16M",
        Setup {
            engine_args: &ea,
            replica_args: &replica_args,
            ..Setup::default()
        },
    );
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(cl.write(0, &[7; 4096]).unwrap(), 0);
    assert_eq!(cl.read(0, 4096).unwrap().unwrap(), vec![7; 4096]);
    drop(cl);
    c.engine.take().unwrap().stop();

    // No certificate at all (plaintext).
    c.extra_engine_args.clear();
    let err = refused(&c, &[], &[]);
    assert!(err.contains("no replica can serve it"), "{err}");
    // A certificate from another CA (trusting the right server CA).
    let mut other = tls_args(&ca2, "client");
    other[5] = ca1.join("ca-cert.pem").to_string_lossy().to_string();
    let o: Vec<&str> = other.iter().map(String::as_str).collect();
    let err = refused(&c, &o, &[]);
    assert!(err.contains("no replica can serve it"), "{err}");
    // A replica with a certificate the engine's CA did not sign is refused too.
    let mut wrong_ca = tls_args(&ca1, "client");
    wrong_ca[5] = ca2.join("ca-cert.pem").to_string_lossy().to_string();
    let w: Vec<&str> = wrong_ca.iter().map(String::as_str).collect();
    let err = refused(&c, &w, &[]);
    assert!(err.contains("no replica can serve it"), "{err}");
    // The trusted engine still works.
    c.extra_engine_args = engine_args;
    c.start_engine(None);
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(cl.read(0, 4096).unwrap().unwrap(), vec![7; 4096]);
}

#[test]
fn nbd_over_tls_with_real_clients() {
    need("nbdinfo");
    need("nbdcopy");
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let pki = dir.path().join("pki");
    tls_init(&pki);
    let cert = pki.join("server-cert.pem").to_string_lossy().to_string();
    let key = pki.join("server-key.pem").to_string_lossy().to_string();
    let c = Cluster::start_with(2, "16M", &["--nbd-tls-cert", &cert, "--nbd-tls-key", &key]);
    let nbd = c.engine().nbd;
    let uri = format!(
        "nbds://{nbd}/vol?tls-certificates={}",
        pki.to_string_lossy()
    );
    let info = run(Command::new("nbdinfo").args(["--json", &uri]));
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("16777216"), "{text}");
    let src = dir.path().join("src");
    let back = dir.path().join("back");
    random_file(&src, 16 << 20, 5);
    run(Command::new("nbdcopy").arg(&src).arg(&uri));
    run(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert_eq!(sha256(&src), sha256(&back));
    // Plaintext is refused on the TCP port.
    let plain = Command::new("nbdinfo")
        .arg(format!("nbd://{nbd}/vol"))
        .output()
        .unwrap();
    // (libnbd reports the server's NBD_REP_ERR_TLS_REQD as "not supported".)
    assert!(!plain.status.success());
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(err.contains("not supported"), "{err}");
    // So is a client that does not trust the server's CA.
    let other = dir.path().join("other");
    tls_init(&other);
    let bad = Command::new("nbdinfo")
        .arg(format!(
            "nbds://{nbd}/vol?tls-certificates={}",
            other.to_string_lossy()
        ))
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// Parses the nonce audit file: (writer id, first counter, count) per sealed batch.
fn audit(path: &Path) -> Vec<(String, u64, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_string(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn nonces_never_repeat_across_restarts_and_rebuilds() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let key = key_file(dir.path(), "k", 5);
    let audit_path = dir.path().join("nonces");
    let ap = audit_path.to_string_lossy().to_string();
    let env = [("TETHER_NONCE_AUDIT", ap.as_str())];
    let ka = ["--encryption-key-file", key.to_str().unwrap()];
    let mut c = Cluster::build(
        3,
        "16M",
        Setup {
            engine_args: &ka,
            engine_env: &env,
            ..Setup::default()
        },
    );
    let write_round = |c: &Cluster, seed: u8| {
        let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
        for i in 0..64u64 {
            // The same blocks every round: overwrites must get fresh nonces.
            let b = (i * 7) % 48;
            assert_eq!(cl.write(b * BLK, &[seed ^ i as u8; 4096]).unwrap(), 0);
        }
        // Unaligned writes go through read-modify-write.
        assert_eq!(cl.write(100, &[seed; 5000]).unwrap(), 0);
        assert_eq!(cl.flush().unwrap(), 0);
    };
    write_round(&c, 1);
    c.engine.take().unwrap().stop();
    c.start_engine(None);
    write_round(&c, 2);
    // A replica misses writes and rebuilds.
    c.replicas[2].kill9();
    write_round(&c, 3);
    let (rdir, rport) = (c.replicas[2].dir.clone(), c.replicas[2].addr.port());
    c.replicas[2] = Replica::start_with(&rdir, rport, &[]);
    c.engine().wait_healthy("vol", 3, Duration::from_secs(60));
    write_round(&c, 4);
    // The engine dies without a clean close; its successor must not reuse nonces.
    c.engine.as_mut().unwrap().kill9();
    c.start_engine(None);
    write_round(&c, 5);
    c.engine().ctl_ok(&["volume", "verify", "vol"]);
    c.stop_all();

    let batches = audit(&audit_path);
    let mut by_writer: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for (id, first, n) in &batches {
        by_writer.entry(id.clone()).or_default().push((*first, *n));
    }
    assert!(
        by_writer.len() >= 3,
        "one writer id per engine start: {by_writer:?}"
    );
    let mut sealed = 0;
    for (id, mut ranges) in by_writer {
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "writer {id} reused a nonce: {w:?}"
            );
        }
        sealed += ranges.iter().map(|r| r.1).sum::<u64>();
    }
    assert!(sealed >= 5 * 64, "{sealed}");
    // On every replica, no two stored blocks share a (writer id, counter).
    for r in &c.replicas {
        let layers = r.dir.join("volumes/vol/layers");
        let mut seen = std::collections::HashSet::new();
        for e in std::fs::read_dir(&layers).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "rec") {
                let recs = std::fs::read(&p).unwrap();
                for (b, entry) in recs.chunks_exact(REC as usize).enumerate() {
                    if entry[4] != 1 {
                        continue;
                    }
                    let nonce = entry[8..8 + 16].to_vec();
                    assert!(seen.insert(nonce), "block {b} in {p:?} reuses a nonce");
                }
            }
        }
        assert!(!seen.is_empty());
    }
}

#[test]
fn a_rebuild_never_touches_a_copy_under_other_parameters() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let key = key_file(dir.path(), "k", 6);
    let c = Cluster::start_with(2, "16M", &["--encryption-key-file", key.to_str().unwrap()]);
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(cl.write(0, &[1; 4096]).unwrap(), 0);
    // Another replica daemon holds a volume of the same name, unencrypted.
    let other = Cluster::start(1, "16M");
    let mut ocl = NbdClient::connect(other.engine().nbd, "vol").unwrap();
    assert_eq!(ocl.write(0, &[2; 4096]).unwrap(), 0);
    assert_eq!(ocl.flush().unwrap(), 0);
    drop(ocl);
    let mut other = other;
    other.engine.take().unwrap().stop();
    let target = &other.replicas[0];
    let meta = std::fs::read(target.dir.join("volumes/vol/meta")).unwrap();
    c.engine()
        .ctl_ok(&["replica", "add", "vol", &target.addr.to_string()]);
    std::thread::sleep(Duration::from_secs(3));
    let log = c.engine().log_text();
    assert!(log.contains("left unchanged"), "{log}");
    assert_eq!(
        std::fs::read(target.dir.join("volumes/vol/meta")).unwrap(),
        meta,
        "the rebuild changed the other copy"
    );
    assert_eq!(c.engine().healthy("vol"), 2);
    assert_eq!(cl.read(0, 4096).unwrap().unwrap(), vec![1; 4096]);
}
