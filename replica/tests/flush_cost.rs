//! What a flush costs the disk, counted on the simulated one. PostgreSQL's commit
//! rewrites one 8 KiB WAL page and flushes; that page was first written whole, as part
//! of a segment (a write large enough to go straight to a head slot). Each commit must
//! still cost one fdatasync (the log's), not one per slot the page went through.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod plain;
use plain::Plain;
use std::sync::Arc;

use tether_replica::sim::SimDisk;
use tether_replica::{StoreOptions, VolumeSet};

const B: usize = 4096;

#[test]
fn a_commit_is_one_fdatasync() {
    let disk = SimDisk::new();
    let vols = VolumeSet::new(
        std::path::Path::new("/data"),
        Arc::new(disk.clone()),
        StoreOptions::default(),
    )
    .unwrap();
    let (v, _) = vols.get_or_create("v", 1024 * B as u64, None).unwrap();
    v.take_epoch(1, 1).unwrap();
    let mut seq = 1;
    v.write_blocks(seq, 0, &vec![1u8; 64 * B]).unwrap();
    v.sync().unwrap();
    let mut costs = Vec::new();
    for i in 0..20u8 {
        seq += 1;
        v.write_blocks(seq, 4, &vec![i; 2 * B]).unwrap();
        let before = disk.syncs();
        v.sync().unwrap();
        costs.push(disk.syncs() - before);
        assert_eq!(&v.read_blocks(4, 2).unwrap()[..], &vec![i; 2 * B][..]);
    }
    assert_eq!(costs, vec![1; 20], "fdatasyncs per commit");
    // A flush with nothing new to make durable costs the disk nothing.
    let before = disk.syncs();
    v.sync().unwrap();
    assert_eq!(disk.syncs() - before, 0);
}
