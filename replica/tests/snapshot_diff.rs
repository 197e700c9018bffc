//! What a snapshot holds differently from an older one, from the layer index: the
//! source of an incremental backup. It must name every block that changed (trims
//! included), and refuse to answer when the older snapshot is not an ancestor.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod plain;
use plain::Plain;
use std::sync::Arc;

use tether_replica::sim::SimDisk;
use tether_replica::{StoreOptions, VolumeSet};

const B: usize = 4096;

#[test]
fn changed_blocks_between_snapshots_come_from_the_layers() {
    let disk = SimDisk::new();
    let vols = VolumeSet::new(
        std::path::Path::new("/data"),
        Arc::new(disk.clone()),
        StoreOptions::default(),
    )
    .unwrap();
    let (v, _) = vols.get_or_create("v", 1024 * B as u64, None).unwrap();
    v.take_epoch(1, 11).unwrap();
    v.write_blocks(1, 0, &[1u8; 4 * B]).unwrap();
    v.write_blocks(2, 100, &[1u8; B]).unwrap();
    v.snapshot("a").unwrap();
    // Changed after a: a write, a rewrite of a block of a, a trim of a block of a.
    v.write_blocks(3, 500, &[2u8; 2 * B]).unwrap();
    v.write_blocks(4, 1, &[3u8; B]).unwrap();
    v.zero_blocks(5, 100, 1).unwrap();
    v.snapshot("mid").unwrap();
    v.write_blocks(6, 700, &[4u8; B]).unwrap();
    v.snapshot("b").unwrap();
    v.write_blocks(7, 900, &[5u8; B]).unwrap(); // after b: not part of it
    assert_eq!(&v.read_blocks(100, 1).unwrap()[..], &[0u8; B][..]);
    let want = vec![(1, 2), (100, 101), (500, 502), (700, 701)];
    assert_eq!(
        v.changed_between("b", "a", 0, 1024).unwrap(),
        Some(want.clone())
    );
    // A window of the volume.
    assert_eq!(
        v.changed_between("b", "a", 90, 420).unwrap(),
        Some(vec![(100, 101), (500, 502)])
    );
    // An intermediate snapshot deleted: its blocks merge into b's chain, still above a.
    v.delete_snapshot("mid").unwrap();
    assert_eq!(v.changed_between("b", "a", 0, 1024).unwrap(), Some(want));
    // Not an ancestor: b is newer than a, so a does not descend from b.
    assert_eq!(v.changed_between("a", "b", 0, 1024).unwrap(), None);
    // The older snapshot gone: no answer.
    v.delete_snapshot("a").unwrap();
    assert_eq!(v.changed_between("b", "a", 0, 1024).unwrap(), None);
    // A snapshot that does not exist is an error, not an empty answer.
    assert!(v.changed_between("nope", "b", 0, 1024).is_err());
}

#[test]
fn after_a_revert_the_old_branch_is_not_an_ancestor() {
    let disk = SimDisk::new();
    let vols = VolumeSet::new(
        std::path::Path::new("/data"),
        Arc::new(disk.clone()),
        StoreOptions::default(),
    )
    .unwrap();
    let (v, _) = vols.get_or_create("v", 64 * B as u64, None).unwrap();
    v.take_epoch(1, 11).unwrap();
    v.write_blocks(1, 0, &[1u8; B]).unwrap();
    v.snapshot("base").unwrap();
    v.write_blocks(2, 1, &[2u8; B]).unwrap();
    v.snapshot("later").unwrap();
    v.revert("base").unwrap();
    v.write_blocks(3, 2, &[3u8; B]).unwrap();
    v.snapshot("branch").unwrap();
    assert_eq!(v.changed_between("branch", "later", 0, 64).unwrap(), None);
    assert_eq!(
        v.changed_between("branch", "base", 0, 64).unwrap(),
        Some(vec![(2, 3)])
    );
}
