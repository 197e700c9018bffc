//! Malformed NBD traffic gets error replies or a closed connection, never a crash,
//! and well-behaved clients keep being served meanwhile.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use rand::{Rng, RngCore, SeedableRng};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn bad_requests_get_spec_errors_and_the_connection_survives() {
    let c = Cluster::start(3, "16M");
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    let size = cl.size;
    assert_eq!(
        cl.read(size - 1, 2).unwrap(),
        Err(22),
        "read past the end: EINVAL"
    );
    assert_eq!(
        cl.write(size - 1, &[0u8; 2]).unwrap(),
        28,
        "write past the end: ENOSPC"
    );
    assert_eq!(
        cl.read(u64::MAX - 1, 4096).unwrap(),
        Err(22),
        "offset overflow: EINVAL"
    );
    assert_eq!(
        cl.raw(0, 0, 0, 64 << 20).unwrap(),
        22,
        "read over 32 MiB: EINVAL"
    );
    assert_eq!(cl.raw(99, 0, 0, 0).unwrap(), 22, "unknown command: EINVAL");
    assert_eq!(
        cl.raw(5, 0, size - 4096, 8192).unwrap(),
        22,
        "CACHE past the end: EINVAL"
    );
    assert_eq!(
        cl.raw(5, 1 << 2, 0, 4096).unwrap(),
        22,
        "a flag of another command on CACHE: EINVAL"
    );
    assert_eq!(
        cl.raw(0, 0x80, 0, 4096).unwrap(),
        22,
        "unknown flag: EINVAL"
    );
    assert_eq!(
        cl.raw(4, 0, size - 4096, 8192).unwrap(),
        22,
        "trim past the end"
    );
    assert_eq!(cl.write(4096, &[9u8; 4096]).unwrap(), 0);
    assert_eq!(cl.read(4096, 4096).unwrap().unwrap(), vec![9u8; 4096]);
}

fn handshake_prefix(name: &str) -> Vec<u8> {
    let mut v = 3u32.to_be_bytes().to_vec();
    v.extend_from_slice(b"IHAVEOPT");
    v.extend_from_slice(&7u32.to_be_bytes());
    v.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v
}

fn request(kind: u16, flags: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x25609513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&7u64.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// One hostile session: the bytes, sent after reading the server greeting.
fn garbage(rng: &mut rand::rngs::StdRng, i: usize) -> Vec<u8> {
    let mut random = vec![0u8; rng.random_range(0..300)];
    rng.fill_bytes(&mut random);
    let mut v = match i % 6 {
        0 => random.clone(),
        1 => {
            // Valid client flags, then a random option.
            let mut v = 3u32.to_be_bytes().to_vec();
            v.extend_from_slice(b"IHAVEOPT");
            v.extend_from_slice(&rng.random_range(0u32..16).to_be_bytes());
            v.extend_from_slice(&rng.random::<u32>().to_be_bytes());
            v.extend_from_slice(&random);
            v
        }
        2 => {
            let mut v = handshake_prefix("vol");
            v.extend_from_slice(&random);
            v
        }
        3 => {
            // Structured, well-formed headers with hostile fields.
            let mut v = 3u32.to_be_bytes().to_vec();
            v.extend_from_slice(b"IHAVEOPT");
            v.extend_from_slice(&8u32.to_be_bytes());
            v.extend_from_slice(&0u32.to_be_bytes());
            v.extend_from_slice(&handshake_prefix("vol")[4..]);
            for _ in 0..rng.random_range(1..8) {
                let kind = rng.random_range(0u16..10);
                let len = if rng.random_bool(0.3) {
                    rng.random::<u32>()
                } else {
                    rng.random_range(0..70000)
                };
                v.extend_from_slice(&request(kind, rng.random_range(0..64), rng.random(), len));
                if kind == 1 && len < 70000 && rng.random_bool(0.5) {
                    v.extend_from_slice(&vec![0x5a; len as usize]);
                }
            }
            v
        }
        4 => {
            // A valid session cut short anywhere.
            let mut v = handshake_prefix("vol");
            v.extend_from_slice(&request(1, 0, 0, 4096));
            v.extend_from_slice(&[1u8; 4096]);
            let cut = rng.random_range(0..v.len());
            v.truncate(cut);
            v
        }
        _ => {
            // Unknown export, over-long option, LIST with data.
            let mut v = handshake_prefix("no-such-volume");
            v.extend_from_slice(b"IHAVEOPT");
            v.extend_from_slice(&3u32.to_be_bytes());
            v.extend_from_slice(&4u32.to_be_bytes());
            v.extend_from_slice(&[1, 2, 3, 4]);
            v.extend_from_slice(b"IHAVEOPT");
            v.extend_from_slice(&7u32.to_be_bytes());
            v.extend_from_slice(&(1u32 << 20).to_be_bytes());
            v.extend_from_slice(&random);
            v
        }
    };
    if rng.random_bool(0.2) && !v.is_empty() {
        let at = rng.random_range(0..v.len());
        v[at] ^= 1 << rng.random_range(0..8);
    }
    v
}

fn hostile_session(addr: SocketAddr, bytes: &[u8]) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut greeting = [0u8; 18];
    let _ = s.read_exact(&mut greeting);
    let _ = s.write_all(bytes);
    let mut sink = [0u8; 4096];
    // Read whatever comes back until the server closes or goes quiet.
    while let Ok(n) = s.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

#[test]
fn hundreds_of_malformed_sessions_while_a_good_client_works() {
    let c = Cluster::start(3, "16M");
    let addr = c.engine().nbd;
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut cl = NbdClient::connect(addr, "vol").unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let block = (n % 1000) * 4096 + (8 << 20);
                let data = vec![(n % 251) as u8; 4096];
                assert_eq!(cl.write(block, &data).unwrap(), 0);
                assert_eq!(cl.read(block, 4096).unwrap().unwrap(), data);
                n += 1;
            }
            assert_eq!(cl.flush().unwrap(), 0);
            n
        })
    };
    let workers: Vec<_> = (0..4)
        .map(|w| {
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(w);
                for i in 0..100 {
                    let g = garbage(&mut rng, i);
                    hostile_session(addr, &g);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = good.join().unwrap();
    assert!(rounds > 0);
    // Still serving new clients, with every replica healthy.
    let mut cl = NbdClient::connect(addr, "vol").unwrap();
    assert_eq!(cl.write(0, &[3u8; 4096]).unwrap(), 0);
    assert_eq!(cl.read(0, 4096).unwrap().unwrap(), vec![3u8; 4096]);
    assert_eq!(c.engine().healthy("vol"), 3);
}

/// The same abuse against a server that requires TLS, plus clients that ask for
/// STARTTLS and then send garbage instead of a TLS handshake: nothing is served in
/// plaintext, and TLS clients keep working.
#[test]
fn hostile_sessions_against_a_tls_only_server() {
    need("nbdinfo");
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let pki = dir.path().join("pki");
    run(Command::new(BIN).args(["tls", "init"]).arg(&pki));
    let cert = pki.join("server-cert.pem").to_string_lossy().to_string();
    let key = pki.join("server-key.pem").to_string_lossy().to_string();
    let c = Cluster::start_with(1, "16M", &["--nbd-tls-cert", &cert, "--nbd-tls-key", &key]);
    let addr = c.engine().nbd;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + w);
                for i in 0..60 {
                    let mut g = garbage(&mut rng, i);
                    if i % 3 == 0 {
                        // STARTTLS, then bytes that are not a TLS handshake.
                        let mut v = 3u32.to_be_bytes().to_vec();
                        v.extend_from_slice(b"IHAVEOPT");
                        v.extend_from_slice(&5u32.to_be_bytes());
                        v.extend_from_slice(&0u32.to_be_bytes());
                        v.append(&mut g);
                        g = v;
                    }
                    hostile_session(addr, &g);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // A plaintext client gets nowhere; a TLS client is served.
    assert!(NbdClient::connect(addr, "vol").is_err());
    let uri = format!("nbds://{addr}/vol?tls-certificates={}", pki.display());
    let info = run(Command::new("nbdinfo").arg(&uri));
    assert!(String::from_utf8_lossy(&info.stdout).contains("16777216"));
    assert_eq!(c.engine().healthy("vol"), 1);
}
