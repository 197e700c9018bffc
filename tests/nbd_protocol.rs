//! The rest of the NBD protocol, against a real volume: extended headers (the
//! project's client, and qemu 10, which negotiates them), fast zero, cache, DF reads,
//! the canonical export name, and flags a client was not allowed to send.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::process::Command;

const READ: u16 = 0;
const WRITE: u16 = 1;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const CACHE: u16 = 5;
const ZEROES: u16 = 6;
const STATUS: u16 = 7;
const FUA: u16 = 1;
const NO_HOLE: u16 = 1 << 1;
const DF: u16 = 1 << 2;
const REQ_ONE: u16 = 1 << 3;
const FAST_ZERO: u16 = 1 << 4;
const PAYLOAD_LEN: u16 = 1 << 5;
const EINVAL: u32 = 22;
const ENOTSUP: u32 = 95;
const GIB: u64 = 1 << 30;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// The descriptors of a block status chunk: (length, flags); 64-bit in extended
/// ones (type 6), 32-bit in structured ones (type 5).
fn descriptors(c: &NbdChunk) -> Vec<(u64, u64)> {
    let p = &c.payload;
    match c.kind {
        6 => {
            let n = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
            assert_eq!(p.len(), 8 + 16 * n, "descriptor count matches the length");
            p[8..]
                .chunks_exact(16)
                .map(|d| {
                    let x = |i: usize| u64::from_be_bytes(d[i..i + 8].try_into().unwrap());
                    (x(0), x(8))
                })
                .collect()
        }
        5 => p[4..]
            .chunks_exact(8)
            .map(|d| {
                let x = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                (u64::from(x(0)), u64::from(x(4)))
            })
            .collect(),
        k => panic!("not a block status chunk: type {k}"),
    }
}

fn counter(c: &Cluster, name: &str) -> u64 {
    c.engine().status_json("vol")["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

#[test]
fn extended_headers_carry_64_bit_requests() {
    let c = Cluster::start(2, "8G");
    let opts = NbdOptions {
        extended: true,
        block_status: true,
        ..NbdOptions::default()
    };
    let mut cl = NbdClient::connect_with(c.engine().nbd, "vol", opts).unwrap();
    // DF (bit 7), CACHE (10) and FAST_ZERO (11) are advertised, and the canonical
    // name comes back when asked for.
    for bit in [7, 10, 11] {
        assert_ne!(cl.flags & (1 << bit), 0, "flag bit {bit}: {:#x}", cl.flags);
    }
    assert_eq!(cl.name.as_deref(), Some("vol"));

    // A write past 4 GiB carries its payload length; a bare success is one NONE
    // chunk whose header repeats the request's offset.
    let at = 5 * GIB;
    let data = pattern(64 << 10, 7);
    let r = cl
        .send(WRITE, PAYLOAD_LEN, at, data.len() as u64, &data)
        .unwrap();
    assert_eq!(r.error, 0);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(
        (r.chunks[0].kind, r.chunks[0].flags, r.chunks[0].offset),
        (0, 1, at)
    );
    // A DF read: one data chunk, its payload offset and header offset the request's.
    let r = cl.send(READ, DF, at, data.len() as u64, &[]).unwrap();
    assert_eq!(
        r.chunks.len(),
        1,
        "{:?}",
        r.chunks.iter().map(|c| c.kind).collect::<Vec<_>>()
    );
    assert_eq!(r.chunks[0].kind, 1);
    assert_eq!(r.chunks[0].offset, at);
    assert_eq!(
        u64::from_be_bytes(r.chunks[0].payload[..8].try_into().unwrap()),
        at
    );
    assert!(r.data == data, "read back other bytes");

    // Block status over 6 GiB in one request: 64-bit descriptors (a reply may cover
    // less than asked), the hole first, then the data.
    let r = cl.send(STATUS, 0, 4 * GIB, 2 * GIB, &[]).unwrap();
    assert_eq!(r.error, 0);
    let d = descriptors(&r.chunks[0]);
    assert_eq!(r.chunks[0].kind, 6);
    assert_eq!(d[0], (GIB, 3), "{d:?}");
    assert_eq!(d[1], (64 << 10, 0), "{d:?}");
    assert!(d.iter().map(|x| x.0).sum::<u64>() <= 2 * GIB);

    // A prefetch hint goes to one replica, which reads ahead the 16 blocks it holds.
    let before = counter(&c, "cache_blocks");
    let r = cl.send(CACHE, 0, 4 * GIB, 2 * GIB, &[]).unwrap();
    assert_eq!((r.error, r.chunks[0].kind), (0, 0));
    assert_eq!(counter(&c, "cache_requests"), 1);
    assert_eq!(counter(&c, "cache_blocks") - before, 16);

    // Zeroes over 7 GiB and a trim of 6 GiB: lengths no compact header can carry.
    // Zeroes that must stay allocated are written as data: that many are refused.
    let r = cl.send(ZEROES, NO_HOLE, 0, 7 * GIB, &[]).unwrap();
    assert_eq!(r.error, 75, "EOVERFLOW");
    let r = cl.send(ZEROES, FAST_ZERO, 0, 7 * GIB, &[]).unwrap();
    assert_eq!(r.error, 0);
    let r = cl.send(READ, 0, at, 4096, &[]).unwrap();
    assert!(r.data.iter().all(|&b| b == 0));
    cl.write(at, &data).unwrap();
    assert_eq!(cl.send(TRIM, FUA, GIB, 6 * GIB, &[]).unwrap().error, 0);
    assert!(cl.read(at, 4096).unwrap().unwrap().iter().all(|&b| b == 0));

    // Errors are one error chunk; the connection keeps serving.
    let r = cl.send(READ, 0, 8 * GIB - 4096, 8192, &[]).unwrap();
    assert_eq!(
        (r.error, r.chunks.len(), r.chunks[0].kind),
        (EINVAL, 1, 0x8001)
    );
    // A payload on a command that takes none is consumed and refused.
    assert_eq!(
        cl.send(FLUSH, PAYLOAD_LEN, 0, 8, &[9; 8]).unwrap().error,
        EINVAL
    );
    // A write's length is its payload's, flag or not (qemu sends none).
    assert_eq!(cl.send(WRITE, 0, 0, 4096, &data[..4096]).unwrap().error, 0);
    assert_eq!(cl.write(0, &data).unwrap(), 0);
    assert!(cl.read(0, data.len() as u32).unwrap().unwrap() == data);
    assert_eq!(cl.flush().unwrap(), 0);
    let log = c.engine().log_text();
    assert!(log.contains("extended_headers=true"), "{log}");
}

#[test]
fn option_haggling_follows_the_spec() {
    let c = Cluster::start(1, "16M");
    // Structured replies after extended headers: refused, extended headers win.
    assert_eq!(
        nbd_option_replies(c.engine().nbd, &[11, 8]),
        vec![1, 0x8000_000a]
    );
    // The other way round both are taken.
    assert_eq!(nbd_option_replies(c.engine().nbd, &[8, 11]), vec![1, 1]);
    // Without structured replies, DF is not advertised (and not allowed).
    let cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(cl.flags & (1 << 7), 0, "{:#x}", cl.flags);
    assert_eq!(cl.name.as_deref(), Some("vol"));
    // The empty name is the default export; NBD_INFO_NAME gives its real name.
    let cl = NbdClient::connect(c.engine().nbd, "").unwrap();
    assert_eq!(cl.name.as_deref(), Some("vol"));
}

#[test]
fn flags_a_client_may_not_send_get_einval() {
    let c = Cluster::start(1, "16M");
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    let data = pattern(8192, 3);
    assert_eq!(cl.write(0, &data).unwrap(), 0);
    // DF without structured replies, a payload length without extended headers (the
    // compact write's data is still consumed), a flag of another command, a fast
    // zero flag on a write, a command nobody knows.
    assert_eq!(cl.raw(READ, DF, 0, 4096).unwrap(), EINVAL);
    let r = cl.send(WRITE, PAYLOAD_LEN, 0, 4096, &[1; 4096]).unwrap();
    assert_eq!(r.error, EINVAL);
    assert_eq!(cl.raw(ZEROES, REQ_ONE, 0, 4096).unwrap(), EINVAL);
    let r = cl.send(WRITE, FAST_ZERO, 0, 4096, &[1; 4096]).unwrap();
    assert_eq!(r.error, EINVAL);
    assert_eq!(cl.raw(9, 0, 0, 4096).unwrap(), EINVAL);
    assert_eq!(cl.raw(0xffff, 0xffff, u64::MAX, u32::MAX).unwrap(), EINVAL);
    // FUA is accepted on every command; nothing above changed the data.
    assert_eq!(cl.send(READ, FUA, 0, 8192, &[]).unwrap().data, data);
    assert_eq!(cl.raw(CACHE, FUA, 0, 8192).unwrap(), 0);
    // With structured replies a DF read is one chunk, even a large one.
    let opts = NbdOptions {
        structured: true,
        ..NbdOptions::default()
    };
    let mut st = NbdClient::connect_with(c.engine().nbd, "vol", opts).unwrap();
    assert_ne!(st.flags & (1 << 7), 0);
    let r = st.send(READ, DF, 0, 4 << 20, &[]).unwrap();
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(&r.data[..8192], &data[..]);
    // Block status without its context is refused, as a structured error.
    assert_eq!(st.send(STATUS, 0, 0, 4096, &[]).unwrap().error, EINVAL);
    let log = c.engine().log_text();
    assert!(log.contains("extended_headers=false"), "{log}");
}

/// Runs qemu-io commands on `uri`; returns stdout and stderr.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(uri, &[], cmds)
}

/// The same, with more options (`-r` for a read-only export).
fn qemu_io_with(uri: &str, opts: &[&str], cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]).args(opts);
    for x in cmds {
        cmd.args(["-c", x]);
    }
    cmd.arg(uri);
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
    text
}

#[test]
fn fast_zero_is_fast_or_refused_without_changing_anything() {
    need("qemu-io");
    let c = Cluster::start(2, "64M");
    let uri = c.uri();
    qemu_io(&uri, &["write -P 0x55 0 1M", "flush"]);
    // Zeroes that must stay allocated (no -u: NO_HOLE) would be written as data:
    // not fast, so refused, and the data stays.
    let out = qemu_io(&uri, &["write -z -n 0 64k"]);
    assert!(out.contains("Operation not supported"), "{out}");
    let out = qemu_io(&uri, &["read -P 0x55 0 1M"]);
    assert!(out.contains("read 1048576/1048576"), "{out}");
    // The same, allowed to unmap: fast, done.
    let out = qemu_io(
        &uri,
        &[
            "write -z -u -n 0 64k",
            "read -P 0 0 64k",
            "read -P 0x55 64k 960k",
        ],
    );
    assert!(
        !out.contains("failed") && !out.contains("not supported"),
        "{out}"
    );
    // Under a snapshot a zero only records that the head hides the range: still
    // fast, and the snapshot keeps its data.
    c.engine().ctl_ok(&["snapshot", "create", "vol", "keep"]);
    let out = qemu_io(&uri, &["write -z -u -n 64k 64k", "read -P 0 64k 64k"]);
    assert!(
        !out.contains("failed") && !out.contains("not supported"),
        "{out}"
    );
    let snap = format!("nbd://{}/vol@keep", c.engine().nbd);
    let out = qemu_io_with(&snap, &["-r"], &["read -P 0x55 64k 64k", "read -P 0 0 64k"]);
    assert!(out.contains("read 65536/65536"), "{out}");
    // The project's client: ENOTSUP for the slow kind, nothing written.
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    assert_eq!(
        cl.raw(ZEROES, FAST_ZERO | NO_HOLE, 128 << 10, 4096)
            .unwrap(),
        ENOTSUP
    );
    assert_eq!(cl.read(128 << 10, 4096).unwrap().unwrap(), vec![0x55; 4096]);
}

#[test]
fn a_cache_hint_from_nbdsh_reaches_a_replica() {
    need("nbdsh");
    need("qemu-io");
    let c = Cluster::start(2, "64M");
    let uri = c.uri();
    qemu_io(&uri, &["write -P 0x66 1M 1M", "flush"]);
    // nbdsh is `python3 -m nbd` with Debian's module: run it by the system's python,
    // whatever else is first on PATH.
    let out = run(Command::new("/usr/bin/python3").args([
        "-m",
        "nbd",
        "-u",
        &uri,
        "-c",
        "assert h.can_cache(); h.cache(4 * 1024 * 1024, 0); print('cached')",
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cached"));
    assert_eq!(counter(&c, "cache_requests"), 1);
    // The replica held the 256 blocks written, of the 1,024 asked for.
    assert_eq!(counter(&c, "cache_blocks"), 256);
    // libnbd asking for full information gets the canonical name of the default
    // export (the empty name) and its description.
    let script = format!(
        "h.set_full_info(True); h.connect_uri('nbd://{}/'); \
         print(h.get_canonical_export_name()); print(h.get_export_description())",
        c.engine().nbd
    );
    let out = run(Command::new("/usr/bin/python3").args(["-m", "nbd", "-c", &script]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        vec!["vol", "tether volume vol"],
        "{text}"
    );
}

#[test]
fn qemu_negotiates_extended_headers_and_maps_the_volume() {
    need("qemu-io");
    need("qemu-img");
    let c = Cluster::start(2, "64M");
    let uri = c.uri();
    let out = qemu_io(
        &uri,
        &[
            "write -P 0x77 4M 1M",
            "write -z -u 8M 1M",
            "read -P 0x77 4M 1M",
            "read -P 0 0 4M",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let log = c.engine().log_text();
    assert!(
        log.contains("extended_headers=true"),
        "qemu did not negotiate extended headers: {log}"
    );
    // qemu-img map reads block status (BLOCK_STATUS_EXT under extended headers).
    let out = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(4 << 20, 1 << 20)], "{map}");
    // nbdinfo (libnbd 1.14, no extended headers) sees every flag and the name.
    let out = run(Command::new("nbdinfo").args(["--json", &uri]));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &j["exports"][0];
    for f in ["can_cache", "can_df", "can_fast_zero"] {
        assert_eq!(e[f], true, "{f}: {j}");
    }
}
