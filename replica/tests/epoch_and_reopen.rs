//! The store's side of fencing and of poisoned copies: a newer epoch is taken only
//! between two requests of an older engine, never in the middle of one; and a
//! poisoned copy reopened from disk leaves the old copy in memory unable to touch
//! the files again. A rebuilt copy's revision is the one the engine gives it, not
//! one counted by the copy it replaced.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod plain;
use plain::Plain;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether_replica::sim::SimDisk;
use tether_replica::{StoreError, StoreOptions, VolumeSet};

const B: usize = 4096;

fn set(disk: &SimDisk) -> VolumeSet {
    VolumeSet::new(
        std::path::Path::new("/data"),
        Arc::new(disk.clone()),
        StoreOptions::default(),
    )
    .unwrap()
}

#[test]
fn a_newer_epoch_waits_for_the_request_in_flight_and_refuses_the_next() {
    let disk = SimDisk::new();
    let vols = set(&disk);
    let (v, _) = vols.get_or_create("v", 64 * B as u64, None).unwrap();
    v.take_epoch(1, 11).unwrap();
    let applied = Arc::new(AtomicBool::new(false));
    let (v2, done) = (v.clone(), applied.clone());
    let old = std::thread::spawn(move || {
        v2.under_epoch(1, || {
            std::thread::sleep(Duration::from_millis(300));
            v2.write_blocks(1, 0, &[7u8; B])?;
            done.store(true, Ordering::SeqCst);
            Ok(())
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    // Taken only once the old engine's request is through.
    v.take_epoch(2, 22).unwrap();
    assert!(
        applied.load(Ordering::SeqCst),
        "the epoch moved mid-request"
    );
    old.join().unwrap().unwrap();
    let ran = AtomicBool::new(false);
    let r = v.under_epoch(1, || {
        ran.store(true, Ordering::SeqCst);
        v.write_blocks(2, 1, &[8u8; B])
    });
    assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
    assert!(!ran.load(Ordering::SeqCst), "a fenced request was applied");
    v.under_epoch(2, || v.write_blocks(2, 1, &[9u8; B]))
        .unwrap();
}

#[test]
fn a_poisoned_copy_reopened_from_disk_leaves_the_old_one_inert() {
    let disk = SimDisk::new();
    let vols = set(&disk);
    let (old, _) = vols.get_or_create("v", 64 * B as u64, None).unwrap();
    old.take_epoch(1, 11).unwrap();
    old.write_blocks(1, 0, &[1u8; B]).unwrap();
    old.sync().unwrap();
    old.write_blocks(2, 1, &[2u8; B]).unwrap();
    let (other, _) = vols.get_or_create("w", 64 * B as u64, None).unwrap();
    disk.fail_syncs(true);
    assert!(matches!(old.sync(), Err(StoreError::Poisoned { .. })));
    assert!(old.poisoned().is_some());
    // A healthy volume is handed back as it is.
    assert!(Arc::ptr_eq(&other, &vols.reopen_poisoned("w").unwrap()));
    disk.fail_syncs(false);
    let new = vols.reopen_poisoned("v").unwrap();
    assert!(!Arc::ptr_eq(&old, &new));
    assert!(new.poisoned().is_none(), "the reopened copy starts clean");
    assert!(Arc::ptr_eq(&new, &vols.get("v").unwrap()));
    // What was flushed is there; the old copy can change nothing any more.
    assert_eq!(&new.read_blocks(0, 1).unwrap()[..], &[1u8; B][..]);
    assert!(old.write_blocks(3, 2, &[3u8; B]).is_err());
    assert!(old.zero_blocks(3, 0, 1).is_err());
    assert!(old.take_epoch(5, 55).is_err(), "the old copy wrote meta");
    assert!(old.set_clean(false).is_err(), "the old copy wrote meta");
    assert!(old.settle().is_err());
    assert!(old.snapshot("s").is_err());
    assert_eq!(new.epoch(), 1);
    // The reopened copy takes writes, syncs and epochs.
    new.take_epoch(2, 22).unwrap();
    new.write_blocks(3, 2, &[4u8; B]).unwrap();
    new.sync().unwrap();
    assert_eq!(&new.read_blocks(2, 1).unwrap()[..], &[4u8; B][..]);
}

/// A copy rebuilt over an older one (a replica removed and added back) must not keep
/// the older copy's revision: if it did, a power cut that took a later write would
/// leave it reporting the revision of a copy that has that write, and an engine would
/// serve both (simulation, seed 121441).
#[test]
fn a_rebuilt_copy_takes_the_revision_it_was_given() {
    let disk = SimDisk::new();
    let s = set(&disk);
    let (v, _) = s.get_or_create("v", 64 * B as u64, None).unwrap();
    // The older copy got as far as sequence 30.
    for seq in 1..=30 {
        v.write_blocks(seq, seq % 8, &[seq as u8; B]).unwrap();
    }
    v.sync().unwrap();
    assert_eq!(v.revision().0, 30);
    // Rebuilt by an engine whose writes are at sequence 11 and 12.
    v.set_rebuilding(true).unwrap();
    v.write_blocks(11, 20, &[11; B]).unwrap();
    v.write_blocks(12, 21, &[12; B]).unwrap();
    v.rebuild_done(12).unwrap();
    assert_eq!(v.revision().0, 12);
    // Write 13 is acknowledged, not synced, and lost to a power cut.
    v.write_blocks(13, 22, &[13; B]).unwrap();
    assert_eq!(v.revision().0, 13);
    drop(v);
    drop(s);
    let disk = disk.power_cut(|| false);
    let s = set(&disk);
    let v = s.get("v").unwrap();
    assert_eq!(&v.read_blocks(22, 1).unwrap()[..], &[0u8; B][..]);
    assert_eq!(v.read_blocks(21, 1).unwrap()[0], 12);
    assert_eq!(
        v.revision().0,
        12,
        "the revision counts a write the copy lost"
    );
}
