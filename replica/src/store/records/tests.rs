use std::collections::HashMap;
use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::sim::SimDisk;

const BLOCKS: u64 = 512 * 64;

fn paths() -> (PathBuf, PathBuf) {
    (
        PathBuf::from("/v/layers/1.rec"),
        PathBuf::from("/v/layers/1.pack"),
    )
}

/// A distinct, never all-zero entry for block `b`, version `v`.
fn entry(b: u64, v: u32, len: usize) -> Vec<u8> {
    let mut e = vec![0u8; len];
    e[0..4].copy_from_slice(&(b as u32 ^ v.rotate_left(16)).to_le_bytes());
    e[4] = 1;
    if len > 8 {
        e[8..12].copy_from_slice(&v.to_le_bytes());
    }
    e
}

fn open(disk: &SimDisk, len: usize) -> (Records, ExtentMap<()>) {
    let (r, p) = paths();
    Records::open(disk, &r, &p, BLOCKS, len).unwrap()
}

fn get(r: &Records, b: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    r.read(&mut out, b).unwrap();
    out
}

#[test]
fn scattered_records_pack_and_move_to_their_page_when_the_group_fills() {
    for len in [8usize, 64] {
        let disk = SimDisk::new();
        let (r, p) = paths();
        drop(Records::create(&disk, &r, &p, len).unwrap());
        let (rec, present) = open(&disk, len);
        assert!(present.is_empty());
        let group = (PAGE / len) as u64;
        // One block in each of 40 groups: all packed, no page of `.rec` used.
        for g in 0..40 {
            rec.write(&entry(g * group + 3, 1, len), g * group + 3)
                .unwrap();
        }
        rec.sync(&disk).unwrap();
        assert_eq!(
            disk.read_file_for_test(&r).len(),
            0,
            "no page for sparse groups"
        );
        // Group 0 fills up past the threshold: it moves to its page.
        for i in 4..4 + DENSE_AT as u64 {
            rec.write(&entry(i, 2, len), i).unwrap();
        }
        assert_eq!(get(&rec, 3, len), entry(3, 1, len));
        assert_eq!(get(&rec, 5, len), entry(5, 2, len));
        rec.sync(&disk).unwrap();
        assert!(disk.read_file_for_test(&r).len() >= PAGE);
        // A range read across sparse and dense groups, and holes.
        let mut all = vec![0u8; 2 * group as usize * len];
        rec.read(&mut all, 0).unwrap();
        for b in 0..2 * group {
            let want = match b {
                3 => entry(3, 1, len),
                b if (4..4 + DENSE_AT as u64).contains(&b) => entry(b, 2, len),
                b if b == group + 3 => entry(b, 1, len),
                _ => vec![0; len],
            };
            assert_eq!(&all[b as usize * len..][..len], &want[..], "block {b}");
        }
        // Punch a sparse block and a dense one.
        rec.punch(group + 3, group + 4).unwrap();
        rec.punch(5, 6).unwrap();
        rec.sync(&disk).unwrap();
        drop(rec);
        let (rec, present) = open(&disk, len);
        assert_eq!(get(&rec, group + 3, len), vec![0; len]);
        assert_eq!(get(&rec, 5, len), vec![0; len]);
        assert_eq!(get(&rec, 2 * group + 3, len), entry(2 * group + 3, 1, len));
        assert_eq!(present.blocks(), 1 + DENSE_AT as u64 - 1 + 38);
        assert!(present.get(2 * group + 3).is_some() && present.get(group + 3).is_none());
    }
}

#[test]
fn rewrites_are_compacted_away() {
    let len = 8;
    let disk = SimDisk::new();
    let (r, p) = paths();
    let rec = Records::create(&disk, &r, &p, len).unwrap();
    let groups = BLOCKS / 512;
    for v in 0..400u32 {
        for g in 0..groups {
            let b = g * 512 + u64::from(v % 7);
            rec.write(&entry(b, v, len), b).unwrap();
        }
        rec.sync(&disk).unwrap();
    }
    let size = disk.read_file_for_test(&p).len() as u64;
    let live = rec.pack.lock().live;
    assert!(
        size <= 2 * live + SLACK + FIRST + 64 * 1024,
        "{size} vs {live}"
    );
    drop(rec);
    let (rec, present) = open(&disk, len);
    assert_eq!(present.blocks(), groups * 7);
    for g in 0..groups {
        for i in 0..7u32 {
            let b = g * 512 + u64::from(i);
            let last = (0..400u32).rev().find(|v| v % 7 == i).unwrap_or(0);
            assert_eq!(get(&rec, b, len), entry(b, last, len));
        }
    }
}

#[test]
fn a_damaged_synced_chunk_is_an_error_not_a_silent_loss() {
    let len = 8;
    let disk = SimDisk::new();
    let (r, p) = paths();
    let rec = Records::create(&disk, &r, &p, len).unwrap();
    for g in 0..4 {
        rec.write(&entry(g * 512, 1, len), g * 512).unwrap();
    }
    rec.sync(&disk).unwrap();
    // A second sync writes the header that covers the first chunks durably.
    rec.write(&entry(9 * 512, 1, len), 9 * 512).unwrap();
    rec.sync(&disk).unwrap();
    drop(rec);
    disk.corrupt(&p, FIRST + 40);
    let (r, pp) = paths();
    let err = Records::open(&disk, &r, &pp, BLOCKS, len).err().unwrap();
    assert!(err.to_string().contains("damaged"), "{err}");
}

/// Power cuts at random points: every block reads as its last synced entry or as one
/// written after that sync, never anything else, and a synced block never reverts.
#[test]
fn power_cuts_keep_synced_records() {
    for seed in 0..300u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let len = if seed % 2 == 0 { 8 } else { 64 };
        let group = (PAGE / len) as u64;
        let blocks = group * 4;
        let mut disk = SimDisk::new();
        let (r, p) = paths();
        drop(Records::create(&disk, &r, &p, len).unwrap());
        let mut synced: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut since: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
        let mut version = 0u32;
        for _round in 0..6 {
            let (rec, _) = Records::open(&disk, &r, &p, blocks, len).unwrap();
            // Sometimes the disk dies a few operations in, mid-sync or mid-move.
            disk.fail_after(rng.random_bool(0.5).then(|| rng.random_range(0..40)));
            for _op in 0..rng.random_range(1..30) {
                let b = rng.random_range(0..blocks);
                let most = if rng.random_bool(0.2) { 48 } else { 3 };
                let n = rng.random_range(1..=most).min(blocks - b);
                let done = if rng.random_bool(0.15) {
                    for x in b..b + n {
                        since.entry(x).or_default().push(vec![0; len]);
                    }
                    rec.punch(b, b + n)
                } else {
                    version += 1;
                    let mut buf = Vec::new();
                    for x in b..b + n {
                        let e = entry(x, version, len);
                        buf.extend_from_slice(&e);
                        since.entry(x).or_default().push(e);
                    }
                    rec.write(&buf, b)
                };
                if done.is_err() {
                    break;
                }
                if rng.random_bool(0.2) {
                    if rec.sync(&disk).is_err() {
                        break;
                    }
                    for (x, vs) in since.drain() {
                        if let Some(last) = vs.last() {
                            synced.insert(x, last.clone());
                        }
                    }
                }
            }
            disk.fail_after(None);
            drop(rec);
            disk = disk.power_cut(|| rng.random_bool(0.5));
            let (rec, present) = Records::open(&disk, &r, &p, blocks, len)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            for x in 0..blocks {
                let got = get(&rec, x, len);
                let old = synced.get(&x).cloned().unwrap_or_else(|| vec![0; len]);
                let ok = got == old || since.get(&x).is_some_and(|vs| vs.contains(&got));
                assert!(ok, "seed {seed}: block {x} reads {got:?}, synced {old:?}");
                assert_eq!(
                    present.get(x).is_some(),
                    got.iter().any(|&y| y != 0),
                    "seed {seed}: block {x}"
                );
                synced.insert(x, got);
            }
            since.clear();
        }
    }
}

proptest::proptest! {
    /// Whatever bytes `.pack` holds, decoding answers without panicking.
    #[test]
    fn decoding_any_bytes_never_panics(
        b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2400),
        wide in proptest::prelude::any::<bool>(),
    ) {
        let len = if wide { 64 } else { 8 };
        let _ = decode_chunk(&b, len, (PAGE / len) as u64);
    }

    /// A chunk decodes to what was encoded, and any flipped byte is caught.
    #[test]
    fn chunks_round_trip_and_a_flipped_byte_is_caught(
        ids in proptest::collection::btree_set(0u16..64, 0..DENSE_AT),
        seq in proptest::prelude::any::<u64>(),
        group in proptest::prelude::any::<u64>(),
        flip in proptest::prelude::any::<proptest::sample::Index>(),
    ) {
        let len = 64;
        let entries = Entries {
            ids: ids.iter().copied().collect(),
            data: ids.iter().flat_map(|&i| entry(u64::from(i), 1, len)).collect(),
        };
        let bytes = encode_chunk(SPARSE, seq, group, &entries, len);
        let d = decode_chunk(&bytes, len, 64).unwrap();
        proptest::prop_assert_eq!((d.kind, d.seq, d.group, d.len), (SPARSE, seq, group, bytes.len()));
        proptest::prop_assert_eq!(&d.entries.ids, &entries.ids);
        proptest::prop_assert_eq!(&d.entries.data, &entries.data);
        let mut bad = bytes.clone();
        bad[flip.index(bytes.len())] ^= 0x10;
        proptest::prop_assert!(decode_chunk(&bad, len, 64).is_none());
    }
}
