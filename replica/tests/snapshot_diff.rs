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

/// A volume of `blocks` blocks on a simulated disk, taken by epoch 1. Its log is
/// small, so histories also go through checkpoints.
fn volume(blocks: u64) -> Arc<tether_replica::Volume> {
    let opts = StoreOptions {
        wal_size: 64 << 10,
        ..StoreOptions::default()
    };
    let vols = VolumeSet::new(
        std::path::Path::new("/data"),
        Arc::new(SimDisk::new()),
        opts,
    )
    .unwrap();
    let (v, _) = vols.get_or_create("v", blocks * B as u64, None).unwrap();
    v.take_epoch(1, 11).unwrap();
    v
}

#[test]
fn changed_blocks_between_snapshots_come_from_the_layers() {
    let v = volume(1024);
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
    let v = volume(64);
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

/// One step of a random history.
#[derive(Debug, Clone)]
enum Step {
    Write { block: u64, count: u64, byte: u8 },
    Zero { block: u64, count: u64 },
    Snapshot,
    Delete(usize),
    Revert(usize),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0u64..60, 1u64..5, 1u8..=255).prop_map(|(block, count, byte)| Step::Write { block, count, byte }),
        1 => (0u64..60, 1u64..5).prop_map(|(block, count)| Step::Zero { block, count }),
        2 => Just(Step::Snapshot),
        1 => (0usize..8).prop_map(Step::Delete),
        1 => (0usize..8).prop_map(Step::Revert),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Soundness of incremental backups: whenever the layer index answers, every
    /// block that reads differently in two snapshots is among the blocks it names,
    /// whatever writes, trims, snapshots, deletions and reverts came before.
    #[test]
    fn the_layer_index_names_every_block_that_differs(steps in proptest::collection::vec(step(), 1..40)) {
        let v = volume(64);
        let mut seq = 0u64;
        let mut snaps: Vec<String> = Vec::new();
        let mut next = 0;
        for s in &steps {
            seq += 1;
            match *s {
                Step::Write { block, count, byte } => {
                    v.write_blocks(seq, block, &vec![byte; count as usize * B]).unwrap();
                }
                Step::Zero { block, count } => v.zero_blocks(seq, block, count).unwrap(),
                Step::Snapshot => {
                    next += 1;
                    let name = format!("s{next}");
                    v.snapshot(&name).unwrap();
                    snaps.push(name);
                }
                Step::Delete(i) if !snaps.is_empty() => {
                    let name = snaps.remove(i % snaps.len());
                    v.delete_snapshot(&name).unwrap();
                }
                Step::Revert(i) if !snaps.is_empty() => {
                    v.revert(&snaps[i % snaps.len()]).unwrap();
                }
                _ => {}
            }
        }
        for a in &snaps {
            for b in &snaps {
                if a == b {
                    continue;
                }
                let Some(runs) = v.changed_between(b, a, 0, 64).unwrap() else {
                    continue;
                };
                let (da, _) = v.read(Some(a), 0, 64).unwrap();
                let (db, _) = v.read(Some(b), 0, 64).unwrap();
                for blk in 0..64u64 {
                    let r = blk as usize * B..(blk as usize + 1) * B;
                    if da[r.clone()] != db[r] {
                        proptest::prop_assert!(
                            runs.iter().any(|&(s, e)| s <= blk && blk < e),
                            "block {blk} differs between {a} and {b} but the index names only {runs:?}"
                        );
                    }
                }
            }
        }
    }
}
