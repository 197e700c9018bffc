//! The I/O stream to a replica daemon runs on a data connection by default, and on
//! gRPC when asked (`TETHER_GRPC_IO`, as with a replica that does not offer data
//! connections): both carry the same writes, flushes and reads, byte for byte.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

const BLK: u64 = 4096;

fn block(i: u64) -> Vec<u8> {
    (0..BLK).map(|j| (i * 31 + j) as u8).collect()
}

/// Small writes, one large one, a flush, and every byte read back.
fn exercise(c: &Cluster) {
    let mut cl = NbdClient::connect(c.engine().nbd, "vol").unwrap();
    for i in 0..64 {
        assert_eq!(cl.write(i * BLK, &block(i)).unwrap(), 0);
    }
    let big: Vec<u8> = (0..256).flat_map(|i| block(1000 + i)).collect();
    assert_eq!(cl.write(256 * BLK, &big).unwrap(), 0);
    assert_eq!(cl.flush().unwrap(), 0);
    for i in 0..64 {
        assert_eq!(cl.read(i * BLK, BLK as u32).unwrap().unwrap(), block(i));
    }
    assert_eq!(cl.read(256 * BLK, big.len() as u32).unwrap().unwrap(), big);
}

#[test]
fn data_connections_by_default() {
    let c = Cluster::start(2, "16M");
    exercise(&c);
    let log = c.engine().log_text();
    assert_eq!(
        log.matches("I/O stream on a data connection").count(),
        2,
        "{log}"
    );
    assert!(!log.contains("I/O stream on gRPC"), "{log}");
}

#[test]
fn grpc_when_asked() {
    let c = Cluster::build(
        2,
        "16M",
        Setup {
            engine_env: &[("TETHER_GRPC_IO", "1")],
            ..Setup::default()
        },
    );
    exercise(&c);
    let log = c.engine().log_text();
    assert_eq!(log.matches("I/O stream on gRPC").count(), 2, "{log}");
    assert!(!log.contains("I/O stream on a data connection"), "{log}");
}
