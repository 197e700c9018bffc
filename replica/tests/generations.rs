//! The store's side of membership generations: a replica keeps the newest generation
//! it was given (by number, then epoch), refuses one from an older engine, takes a
//! newer engine's epoch with it, keeps a bounded history in which salvages stay for
//! good, and all of it survives a reopen. Volumes of the format before generations are
//! upgraded when opened.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use tether_replica::disk::Disk;
use tether_replica::sim::SimDisk;
use tether_replica::store::GenerationRecord;
use tether_replica::{StoreError, StoreOptions, VolumeSet};

fn set(disk: &SimDisk) -> VolumeSet {
    VolumeSet::new(
        Path::new("/data"),
        Arc::new(disk.clone()),
        StoreOptions::default(),
    )
    .unwrap()
}

fn generation(number: u64, epoch: u64, in_sync: &[&str]) -> GenerationRecord {
    GenerationRecord {
        number,
        epoch,
        replicas: vec!["a".into(), "b".into(), "c".into()],
        in_sync: in_sync.iter().map(|s| s.to_string()).collect(),
        cause: format!("test {number}"),
        salvage: false,
    }
}

#[test]
fn the_newest_generation_wins_and_older_engines_are_refused() {
    let disk = SimDisk::new();
    let vols = set(&disk);
    let (v, _) = vols.get_or_create("v", 1 << 20, None).unwrap();
    assert_eq!(v.generation(), None);
    v.take_epoch(3, 33).unwrap();
    let g1 = generation(1, 3, &["a", "b", "c"]);
    assert_eq!(v.record_generation(3, 33, g1.clone()).unwrap(), g1);
    // Not newer: kept as it is.
    assert_eq!(
        v.record_generation(3, 33, generation(1, 2, &["a"]))
            .unwrap(),
        g1
    );
    // An older engine is refused outright.
    let r = v.record_generation(2, 22, generation(9, 2, &["a"]));
    assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
    // A newer engine's generation is stored, and its epoch taken: the engine at 3 is
    // fenced here from now on.
    let g2 = generation(2, 4, &["b", "c"]);
    assert_eq!(v.record_generation(4, 44, g2.clone()).unwrap(), g2);
    assert_eq!(v.epoch(), 4);
    assert!(matches!(v.check_epoch(3), Err(StoreError::Fenced { .. })));
    // The engine that took epoch 4 this way may reopen at it.
    v.take_epoch(4, 44).unwrap();
    assert_eq!(v.generation_history(), vec![g1.clone()]);
    // Everything is in meta: a fresh open from disk finds it.
    drop(v);
    let again = set(&disk);
    let v = again.get("v").unwrap();
    assert_eq!(v.generation(), Some(g2));
    assert_eq!(v.generation_history(), vec![g1]);
}

#[test]
fn the_history_is_bounded_but_salvages_stay() {
    let disk = SimDisk::new();
    let vols = set(&disk);
    let (v, _) = vols.get_or_create("v", 1 << 20, None).unwrap();
    let mut salvage = generation(2, 1, &["a"]);
    salvage.salvage = true;
    v.record_generation(1, 1, generation(1, 1, &["a", "b"]))
        .unwrap();
    v.record_generation(1, 1, salvage.clone()).unwrap();
    for n in 3..100 {
        v.record_generation(1, 1, generation(n, 1, &["a"])).unwrap();
    }
    let history = v.generation_history();
    assert_eq!(history.iter().filter(|h| !h.salvage).count(), 32);
    assert!(history.contains(&salvage), "the salvage left the history");
    assert_eq!(v.generation().unwrap().number, 99);
}

#[test]
fn a_volume_of_the_format_before_generations_is_upgraded_on_open() {
    let disk = SimDisk::new();
    {
        let vols = set(&disk);
        vols.get_or_create("v", 1 << 20, None).unwrap();
    }
    // Rewrite meta as the previous version wrote it: format 4, no generation.
    let path = Path::new("/data/volumes/v/meta");
    let raw = String::from_utf8(disk.read_file_for_test(path)).unwrap();
    let old = raw.replace("\"format\": 8", "\"format\": 4");
    assert_ne!(old, raw, "meta does not look as expected: {raw}");
    disk.replace(path, old.as_bytes()).unwrap();
    let vols = set(&disk);
    let v = vols.get("v").unwrap();
    assert_eq!(v.generation(), None);
    let raw = String::from_utf8(disk.read_file_for_test(path)).unwrap();
    assert!(raw.contains("\"format\": 8"), "not upgraded: {raw}");
}

#[test]
fn no_record_applies_to_a_copy_whose_rebuild_did_not_finish() {
    let disk = SimDisk::new();
    let vols = set(&disk);
    let (v, _) = vols.get_or_create("v", 1 << 20, None).unwrap();
    let copy = v.copy();
    assert_eq!(v.copy_for_records(), copy);
    v.set_rebuilding(true).unwrap();
    assert_eq!(
        v.copy_for_records(),
        0,
        "a rebuild under way keeps its records"
    );
    drop(v);
    drop(vols);
    // Cut short: still none after a restart; once finished, the copy's own again.
    let vols = set(&disk);
    let v = vols.get("v").unwrap();
    assert_eq!(v.copy_for_records(), 0);
    v.set_rebuilding(false).unwrap();
    assert_eq!(v.copy_for_records(), copy);
    assert_eq!(v.copy(), copy, "a finished rebuild keeps the copy's name");
}

#[test]
fn only_a_copy_never_served_takes_other_encryption_parameters() {
    let disk = SimDisk::new();
    let vols = set(&disk);
    let (v, _) = vols.get_or_create("v", 1 << 20, Some("params-b")).unwrap();
    v.take_epoch(3, 33).unwrap();
    // Another engine's epoch since: this one's change is refused.
    let r = v.adopt_encryption(2, "params-a");
    assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
    // Never served: it takes the parameters of the engine that holds the epoch, and
    // keeps them across a reopen.
    v.adopt_encryption(3, "params-a").unwrap();
    assert_eq!(v.encryption().as_deref(), Some("params-a"));
    drop(v);
    let v = set(&disk).get("v").unwrap();
    assert_eq!(v.encryption().as_deref(), Some("params-a"));
    // An encrypted copy never turns into an unencrypted one (the layouts differ).
    assert!(v.adopt_encryption(3, "").is_err());
    // Once served (a generation stored), its blocks may be sealed under its
    // parameters: refused, and unchanged.
    v.record_generation(3, 33, generation(1, 3, &["a", "b", "c"]))
        .unwrap();
    let r = v.adopt_encryption(3, "params-c");
    assert!(matches!(r, Err(StoreError::Invalid { .. })), "{r:?}");
    assert_eq!(v.encryption().as_deref(), Some("params-a"));

    // A copy that applied a write without a generation (a volume of the format
    // before generations) is refused too.
    let (w, _) = vols.get_or_create("w", 1 << 20, Some("params-b")).unwrap();
    w.take_epoch(3, 33).unwrap();
    w.write_sealed(1, 0, &[7u8; 4096], &[1u8; 32]).unwrap();
    let r = w.adopt_encryption(3, "params-a");
    assert!(matches!(r, Err(StoreError::Invalid { .. })), "{r:?}");
    assert_eq!(w.encryption().as_deref(), Some("params-b"));
}
