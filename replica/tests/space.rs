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

/// Writes `writes` random runs of `run` blocks over a volume of `size` bytes, `passes`
/// times, syncing every 1,000 writes and checkpointing after each pass; returns the
/// distinct bytes written and the head's allocation after each pass.
fn scattered(size: u64, passes: u64, writes: u64, run: u64) -> Vec<(u64, u64)> {
    let dir =
        tempfile::tempdir_in(std::env::var("SPACE_DIR").unwrap_or("/var/tmp".into())).unwrap();
    let set = VolumeSet::new(dir.path(), Arc::new(OsDisk), StoreOptions::default()).unwrap();
    let (v, _) = set.get_or_create("v", size, None).unwrap();
    let runs = size / 4096 / run;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let targets: Vec<u64> = (0..writes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % runs) * run
        })
        .collect();
    let mut distinct = targets.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let distinct = distinct.len() as u64 * run * 4096;
    let mut seq = 0;
    let mut out = Vec::new();
    for pass in 0..passes {
        let data = vec![pass as u8 + 1; (run * 4096) as usize];
        for (i, &b) in targets.iter().enumerate() {
            seq += 1;
            v.write_blocks(seq, b, &data).unwrap();
            if i % 1000 == 999 {
                v.sync().unwrap();
            }
        }
        v.sync().unwrap();
        // A checkpoint, as on a clean close.
        v.set_clean(true).unwrap();
        v.set_clean(false).unwrap();
        out.push((distinct, v.allocated().0));
        let last = *targets.last().unwrap();
        assert_eq!(&v.read_blocks(last, run as u32).unwrap()[..], &data[..]);
    }
    out
}

/// Checks that after every pass of `scattered` the head holds at most 1.1 times the
/// distinct data.
fn within_bound(passes: Vec<(u64, u64)>) {
    for (pass, (distinct, head)) in passes.into_iter().enumerate() {
        let bound = distinct + distinct / 10;
        assert!(
            head <= bound,
            "pass {pass}: the head holds {head} bytes for {distinct} distinct bytes (bound {bound})"
        );
    }
}

#[test]
fn rewriting_small_blocks_keeps_about_one_copy_after_a_checkpoint() {
    // 4 KiB writes over a 64 MiB volume: most go straight into a slot (no flush for
    // 64 writes), and every rewrite after a flush into the other one. The block
    // records take 128 KiB at most.
    within_bound(scattered(64 << 20, 3, 8192, 1));
}

#[test]
fn small_writes_scattered_over_a_huge_thin_volume_keep_their_records_packed() {
    // 8,192 4 KiB writes over 64 GiB: nearly each in a group of its own, whose page of
    // `.rec` alone would double the head (1.95 times the data with a page each).
    within_bound(scattered(64 << 30, 2, 8192, 1));
}

#[test]
fn rewriting_large_blocks_keeps_about_one_copy_after_a_checkpoint() {
    within_bound(scattered(256 << 20, 3, 128, 256));
}

/// Prints the head's allocation for scattered writes (`SPACE_GIB`, `SPACE_PASSES`,
/// `SPACE_WRITES`, `SPACE_RUN` blocks per write); not a check.
#[test]
#[ignore]
fn measure_scattered_writes() {
    let env = |k: &str, d: u64| std::env::var(k).map_or(d, |s| s.parse().unwrap());
    let res = scattered(
        env("SPACE_GIB", 1) << 30,
        env("SPACE_PASSES", 3),
        env("SPACE_WRITES", 65536),
        env("SPACE_RUN", 1),
    );
    for (pass, (distinct, head)) in res.into_iter().enumerate() {
        eprintln!(
            "pass {pass}: distinct {} MiB, head {} MiB ({:.3}x)",
            distinct >> 20,
            head >> 20,
            head as f64 / distinct as f64
        );
    }
}
