//! Space on a real filesystem: writes that go straight into the head's slots leave no
//! second copy behind once checkpointed.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod plain;
use plain::Plain;
use std::sync::Arc;

use tether_replica::disk::OsDisk;
use tether_replica::{StoreOptions, VolumeSet};

#[test]
fn rewriting_across_flushes_keeps_one_copy_of_large_writes() {
    let dir = tempfile::tempdir().unwrap();
    let set = VolumeSet::new(dir.path(), Arc::new(OsDisk), StoreOptions::default()).unwrap();
    let (v, _) = set.get_or_create("v", 16 << 20, None).unwrap();
    let mut last = Vec::new();
    for seq in 1..=4u64 {
        // 4 MiB per write: each pass after a flush goes to the other slot.
        last = vec![seq as u8; 4 << 20];
        v.write_blocks(seq, 0, &last).unwrap();
        v.sync().unwrap();
        // A checkpoint (as on a clean close) commits the pass and frees the slot
        // it left.
        v.set_clean(true).unwrap();
        v.set_clean(false).unwrap();
    }
    v.set_clean(true).unwrap();
    let (head, _) = v.allocated();
    assert!(
        head < (4 << 20) + (1 << 20),
        "the head holds {head} bytes for 4 MiB of data"
    );
    assert_eq!(&v.read_blocks(0, 1024).unwrap()[..], &last[..]);
}

#[test]
fn rewriting_without_flushes_stays_in_one_slot() {
    let dir = tempfile::tempdir().unwrap();
    let set = VolumeSet::new(dir.path(), Arc::new(OsDisk), StoreOptions::default()).unwrap();
    let (v, _) = set.get_or_create("v", 16 << 20, None).unwrap();
    for seq in 1..=8u64 {
        v.write_blocks(seq, 0, &vec![seq as u8; 4 << 20]).unwrap();
    }
    v.sync().unwrap();
    v.set_clean(true).unwrap();
    let (head, _) = v.allocated();
    assert!(
        head < (4 << 20) + (1 << 20),
        "the head holds {head} bytes for 4 MiB of data"
    );
}
