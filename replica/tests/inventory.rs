//! The daemon's inventory: every volume on disk, read from meta files without opening
//! (and so recovering) any of them.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use tether_replica::disk::Disk;
use tether_replica::sim::SimDisk;
use tether_replica::store::VolumeEntry;
use tether_replica::{StoreOptions, VolumeSet};

fn set(disk: &SimDisk) -> VolumeSet {
    VolumeSet::new(
        Path::new("/data"),
        Arc::new(disk.clone()),
        StoreOptions::default(),
    )
    .unwrap()
}

#[test]
fn inventory_lists_volumes_without_opening_them() {
    let disk = SimDisk::new();
    {
        let vols = set(&disk);
        let (a, _) = vols.get_or_create("a", 1 << 20, None).unwrap();
        a.take_epoch(3, 33).unwrap();
        a.snapshot("s1").unwrap();
        vols.get_or_create("b", 2 << 20, Some("aes-256-gcm params"))
            .unwrap();
        vols.get_or_create("c", 1 << 20, None).unwrap();
    }
    // A meta file nobody can read is named, not skipped and not fatal.
    disk.replace(Path::new("/data/volumes/c/meta"), b"{not json")
        .unwrap();
    let vols = set(&disk);
    let (found, problems) = vols.inventory().unwrap();
    assert!(
        vols.open_volumes().is_empty(),
        "the inventory opened volumes"
    );
    assert_eq!(
        found,
        vec![
            VolumeEntry {
                name: "a".into(),
                size: 1 << 20,
                epoch: 3,
                clean: true,
                rebuilding: false,
                encrypted: false,
                open: false,
                snapshots: 1,
            },
            VolumeEntry {
                name: "b".into(),
                size: 2 << 20,
                epoch: 0,
                clean: true,
                rebuilding: false,
                encrypted: true,
                open: false,
                snapshots: 0,
            },
        ]
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "c");
    vols.get("a").unwrap();
    let (found, _) = vols.inventory().unwrap();
    assert!(found[0].open && !found[1].open);
}
