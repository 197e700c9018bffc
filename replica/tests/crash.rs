//! Power cuts at random moments against a simple model: after recovery every block
//! holds one of the versions written to it since its last flush, flushed writes are
//! all there, snapshots are exact, and no read fails, except that a block whose bytes
//! rotted may read as a checksum error (never as another version).

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod plain;
use plain::Plain;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use tether_replica::sim::SimDisk;
use tether_replica::{StoreError, StoreOptions, Volume, VolumeSet};

const BLOCKS: u64 = 24;
const B: usize = 4096;

#[derive(Debug, Clone)]
enum Op {
    Write {
        block: u64,
        count: u64,
    },
    Zero {
        block: u64,
        count: u64,
    },
    Flush,
    Snapshot,
    DeleteSnapshot(usize),
    Revert(usize),
    /// Another replica leaves: the volume keeps a record of what is written from here.
    Away,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, 1u64..5).prop_map(|(block, count)| Op::Write { block, count: count.min(BLOCKS - block) }),
        1 => (0..BLOCKS, 1u64..8).prop_map(|(block, count)| Op::Zero { block, count: count.min(BLOCKS - block) }),
        2 => Just(Op::Flush),
        1 => Just(Op::Snapshot),
        1 => any::<usize>().prop_map(Op::DeleteSnapshot),
        1 => any::<usize>().prop_map(Op::Revert),
        1 => Just(Op::Away),
    ]
}

/// Block contents that name the write (tag) and the block, so a block that lands in
/// the wrong place or is torn is recognised.
fn block_data(tag: u32, block: u64) -> Vec<u8> {
    let mut b = vec![(tag % 251) as u8; B];
    b[..4].copy_from_slice(&tag.to_le_bytes());
    b[4..12].copy_from_slice(&block.to_le_bytes());
    b
}

fn decode(b: &[u8], block: u64) -> Result<u32, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(0);
    }
    let tag = u32::from_le_bytes(b[..4].try_into().unwrap());
    if b[4..12] != block.to_le_bytes() || b[12..].iter().any(|&x| x != (tag % 251) as u8) {
        return Err(format!("block {block} holds garbage (tag {tag})"));
    }
    Ok(tag)
}

/// A version whose write failed (it may or may not have happened): no revision
/// promises it.
const MAYBE: u64 = u64::MAX;

/// Per block: every version since the last durable point (first = durable).
struct Model {
    /// (write sequence, tag) of each version.
    versions: Vec<Vec<(u64, u32)>>,
    snapshots: Vec<(String, Vec<u32>)>,
    /// Snapshots an interrupted operation may or may not have created or deleted.
    maybe_snapshots: Vec<(String, Vec<u32>)>,
    next_tag: u32,
    next_snapshot: u32,
    /// The volume is encrypted: writes carry seals.
    sealed: bool,
    /// What the replica that went away holds (the live contents then), and whether the
    /// record certainly exists (false: the request failed, or a revert may have ended
    /// it).
    away: Option<(Vec<u32>, bool)>,
}

impl Model {
    fn new() -> Model {
        Model {
            versions: vec![vec![(0, 0)]; BLOCKS as usize],
            snapshots: Vec::new(),
            maybe_snapshots: Vec::new(),
            next_tag: 1,
            next_snapshot: 0,
            sealed: false,
            away: None,
        }
    }
    fn durable_point(&mut self) {
        for v in &mut self.versions {
            let last = *v.last().unwrap();
            *v = vec![last];
        }
    }
    fn current(&self) -> Vec<u32> {
        self.versions.iter().map(|v| v.last().unwrap().1).collect()
    }

    /// Blocks with a version since the last durable point: what an engine gives the
    /// record to start with (a power cut may take them back).
    fn unflushed(&self) -> Vec<(u64, u64)> {
        (0..BLOCKS)
            .filter(|&b| self.versions[b as usize].len() > 1)
            .map(|b| (b, 1))
            .collect()
    }
}

/// The replica the away records are about.
const AWAY: &str = "r9";

/// Every block that differs from what the away replica holds must be in the record,
/// which must exist while the model says it certainly does.
fn check_away(v: &Volume, m: &Model, contents: &[Option<u32>]) -> Result<(), String> {
    let Some((base, certain)) = &m.away else {
        return Ok(());
    };
    let Some(record) = v.changed(AWAY, v.copy(), 0, BLOCKS) else {
        if *certain {
            return Err("the away record is gone".into());
        }
        return Ok(());
    };
    for (b, (got, had)) in contents.iter().zip(base).enumerate() {
        let b = b as u64;
        // A rotted block (None) is repaired by a write, which the record marks.
        let differs = got.is_some_and(|g| g != *had);
        if differs && !record.iter().any(|&(s, e)| s <= b && b < e) {
            return Err(format!(
                "block {b} reads {got:?} and the away replica holds {had}, but the record {record:?} misses it"
            ));
        }
    }
    Ok(())
}

/// Opens the volume; `sealed` creates it as an encrypted volume (blocks carry seals).
/// `direct`: 0 every write goes through the log, 1 every write goes straight into the
/// head's slots, 2 a mix (writes of 3+ blocks, and all after 4 writes without a flush).
fn open_with(disk: &SimDisk, sealed: bool, direct: u8) -> Result<Arc<Volume>, StoreError> {
    let (direct_min_blocks, direct_after_writes) = match direct {
        0 => (u64::MAX, 0),
        1 => (1, 0),
        _ => (3, 4),
    };
    let opts = StoreOptions {
        wal_dir: None,
        wal_size: 48 << 10,
        direct_min_blocks,
        direct_after_writes,
        // Small, so the log also changes halves for direct data.
        direct_limit: 40 << 10,
        ..StoreOptions::default()
    };
    let set = VolumeSet::new(Path::new("/sim"), Arc::new(disk.clone()), opts).unwrap();
    let enc = sealed.then_some("{}");
    set.get_or_create("v", BLOCKS * B as u64, enc)
        .map(|(v, _)| v)
}

fn open(disk: &SimDisk) -> Result<Arc<Volume>, StoreError> {
    open_with(disk, false, 2)
}

const SEAL: usize = tether_replica::store::SEAL_BYTES;

/// The seal a test write gives a block: derived from its data, so a seal that does not
/// travel with its block (through log, checkpoint, merge, crash) is caught.
fn seal_of(data: &[u8]) -> Vec<u8> {
    data[..SEAL].iter().map(|b| b ^ 0x5a).collect()
}

fn read_all(v: &Volume, snapshot: Option<&str>) -> Result<Vec<u32>, String> {
    let (data, seals) = v
        .read(snapshot, 0, BLOCKS as u32)
        .map_err(|e| e.to_string())?;
    (0..BLOCKS)
        .map(|b| {
            let blk = &data[b as usize * B..(b as usize + 1) * B];
            if !seals.is_empty() {
                let seal = &seals[b as usize * SEAL..(b as usize + 1) * SEAL];
                let want = if blk.iter().all(|&x| x == 0) {
                    vec![0; SEAL]
                } else {
                    seal_of(blk)
                };
                if seal != want {
                    return Err(format!("block {b}: its seal does not belong to its data"));
                }
            }
            decode(blk, b)
        })
        .collect()
}

/// Like `read_all`, but block `rotted` may fail its checksum: `None` there.
fn read_rotted(
    v: &Volume,
    snapshot: Option<&str>,
    rotted: Option<u64>,
) -> Result<Vec<Option<u32>>, String> {
    let Some(r) = rotted else {
        return Ok(read_all(v, snapshot)?.into_iter().map(Some).collect());
    };
    (0..BLOCKS)
        .map(|b| match v.read(snapshot, b, 1) {
            Ok((data, _)) => decode(&data, b).map(Some),
            Err(StoreError::Checksum { block, .. }) if b == r && block == r => Ok(None),
            Err(e) => Err(format!("block {b}: {e}")),
        })
        .collect()
}

/// Whether `got` is `want` but for the rotted block, which may have failed its
/// checksum.
fn same_but_rot(got: &[Option<u32>], want: &[u32]) -> bool {
    got.iter().zip(want).all(|(g, w)| g.is_none_or(|g| g == *w))
}

/// Flips a byte of block `b` in every layer file (bit rot); returns `b`.
fn rot(disk: &SimDisk, b: u64) -> u64 {
    use tether_replica::disk::Disk;
    let dir = Path::new("/sim/volumes/v/layers");
    for f in disk.list(dir).unwrap() {
        if f.ends_with(".data") || f.ends_with(".alt") {
            disk.corrupt(&dir.join(f), b * B as u64 + 100);
        }
    }
    b
}

/// Runs `ops`; an operation that fails (the simulated disk died) may or may not have
/// happened, and the model allows both; the phase ends there.
fn run(v: &Volume, m: &mut Model, ops: &[Op], seq: &mut u64) -> Result<(), String> {
    for op in ops {
        *seq += 1;
        let failed = match *op {
            Op::Write { block, count } => {
                let tag = m.next_tag;
                m.next_tag += 1;
                let data: Vec<u8> = (block..block + count)
                    .flat_map(|b| block_data(tag, b))
                    .collect();
                let seals: Vec<u8> = if m.sealed {
                    data.chunks(B).flat_map(seal_of).collect()
                } else {
                    Vec::new()
                };
                let r = v.write_sealed(*seq, block, &data, &seals);
                let s = if r.is_ok() { *seq } else { MAYBE };
                for b in block..block + count {
                    m.versions[b as usize].push((s, tag));
                }
                r.is_err()
            }
            Op::Zero { block, count } => {
                let r = v.zero_blocks(*seq, block, count);
                let s = if r.is_ok() { *seq } else { MAYBE };
                for b in block..block + count {
                    m.versions[b as usize].push((s, 0));
                }
                r.is_err()
            }
            Op::Flush => match v.sync() {
                Ok(()) => {
                    m.durable_point();
                    false
                }
                Err(_) => true,
            },
            Op::Snapshot => {
                let name = format!("s{}", m.next_snapshot);
                m.next_snapshot += 1;
                match v.snapshot(&name) {
                    Ok(()) => {
                        m.durable_point();
                        m.snapshots.push((name, m.current()));
                        false
                    }
                    Err(_) => {
                        m.maybe_snapshots.push((name, m.current()));
                        true
                    }
                }
            }
            Op::DeleteSnapshot(i) if !m.snapshots.is_empty() => {
                let (name, content) = m.snapshots.remove(i % m.snapshots.len());
                match v.delete_snapshot(&name) {
                    Ok(()) => false,
                    Err(_) => {
                        m.maybe_snapshots.push((name, content));
                        true
                    }
                }
            }
            Op::Revert(i) if !m.snapshots.is_empty() => {
                let (name, content) = m.snapshots[i % m.snapshots.len()].clone();
                match v.revert(&name) {
                    Ok(()) => {
                        m.versions = content.into_iter().map(|t| vec![(0, t)]).collect();
                        if m.away.is_some() && v.changed(AWAY, v.copy(), 0, BLOCKS).is_some() {
                            return Err("a revert left the away record".into());
                        }
                        m.away = None;
                        false
                    }
                    Err(_) => {
                        for (b, t) in content.into_iter().enumerate() {
                            m.versions[b].push((MAYBE, t));
                        }
                        if let Some((_, certain)) = &mut m.away {
                            *certain = false;
                        }
                        true
                    }
                }
            }
            Op::Away if m.away.is_none() => {
                let r = v.away(AWAY, v.copy(), &m.unflushed(), false);
                m.away = Some((m.current(), r.is_ok()));
                r.is_err()
            }
            Op::DeleteSnapshot(_) | Op::Revert(_) | Op::Away => false,
        };
        if failed {
            return Ok(());
        }
        let live = read_all(v, None).map_err(|e| format!("live read after {op:?}: {e}"))?;
        if live != m.current() {
            return Err(format!(
                "live read {live:?} != model {:?} after {op:?}",
                m.current()
            ));
        }
        let live: Vec<Option<u32>> = live.into_iter().map(Some).collect();
        check_away(v, m, &live).map_err(|e| format!("after {op:?}: {e}"))?;
        for (name, want) in &m.snapshots {
            let got = read_all(v, Some(name))?;
            if &got != want {
                return Err(format!(
                    "snapshot {name} reads {got:?}, was {want:?}, after {op:?}"
                ));
            }
        }
    }
    Ok(())
}

fn check_recovered(v: &Volume, m: &mut Model, rotted: Option<u64>) -> Result<(), String> {
    let got = read_rotted(v, None, rotted).map_err(|e| format!("after recovery: {e}"))?;
    check_away(v, m, &got).map_err(|e| format!("after recovery: {e}"))?;
    // The revision the replica reports promises every write up to it: an engine
    // serves from the replicas with the highest, as if they held the same data.
    let (revision, _) = v.revision();
    for (b, tag) in got.iter().enumerate() {
        let Some(tag) = tag else { continue };
        let versions = &m.versions[b];
        let floor = versions
            .iter()
            .rposition(|&(s, _)| s <= revision)
            .unwrap_or(0);
        if !versions[floor..].iter().any(|&(_, t)| t == *tag) {
            return Err(format!(
                "block {b} recovered as version {tag} at revision {revision}, allowed {:?} of (seq, version) {versions:?} (first = last flushed)",
                &versions[floor..]
            ));
        }
    }
    for (name, want) in &m.snapshots {
        let s = read_rotted(v, Some(name), rotted)?;
        if !same_but_rot(&s, want) {
            return Err(format!("snapshot {name} reads {s:?}, was {want:?}"));
        }
    }
    let existing: Vec<String> = v.snapshots().into_iter().map(|s| s.name).collect();
    for (name, want) in std::mem::take(&mut m.maybe_snapshots) {
        if existing.contains(&name) {
            let s = read_rotted(v, Some(&name), rotted)?;
            if !same_but_rot(&s, &want) {
                return Err(format!(
                    "snapshot {name} (interrupted) reads {s:?}, was {want:?}"
                ));
            }
            m.snapshots.push((name, want));
        }
    }
    let known: Vec<&String> = m.snapshots.iter().map(|(n, _)| n).collect();
    if let Some(stray) = existing.iter().find(|n| !known.contains(n)) {
        return Err(format!(
            "snapshot {stray} exists but was never created or was deleted"
        ));
    }
    // Recovery made what it found durable.
    m.versions = got
        .into_iter()
        .zip(&m.versions)
        .map(|(t, was)| vec![(0, t.unwrap_or(was[0].1))])
        .collect();
    Ok(())
}

/// Writes the rotted block again, as an engine repairs it from another replica, and
/// takes every snapshot that still shows the rot out of the model's checks.
fn repair(v: &Volume, m: &mut Model, b: u64, seq: &mut u64) -> Result<(), String> {
    *seq += 1;
    let tag = m.next_tag;
    m.next_tag += 1;
    let data = block_data(tag, b);
    let seals = if m.sealed { seal_of(&data) } else { Vec::new() };
    v.write_sealed(*seq, b, &data, &seals)
        .and_then(|_| v.sync())
        .map_err(|e| format!("repairing block {b}: {e}"))?;
    m.versions[b as usize] = vec![(0, tag)];
    let names: Vec<String> = m.snapshots.iter().map(|(n, _)| n.clone()).collect();
    for name in names {
        if matches!(v.read(Some(&name), b, 1), Err(StoreError::Checksum { .. })) {
            v.delete_snapshot(&name)
                .map_err(|e| format!("deleting rotted snapshot {name}: {e}"))?;
            m.snapshots.retain(|(n, _)| n != &name);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn power_cuts_lose_nothing_flushed(
        phases in proptest::collection::vec(proptest::collection::vec(op(), 0..40), 1..4),
        seed: u64,
        sealed: bool,
        direct in 0u8..3,
    ) {
        let disk = SimDisk::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut m = Model::new();
        m.sealed = sealed;
        let mut seq = 0;
        for ops in &phases {
            let v = open_with(&disk, sealed, direct).map_err(|e| TestCaseError::fail(e.to_string()))?;
            // Half the phases end with the disk dying in the middle of an operation.
            let countdown = rng.random_bool(0.5).then(|| rng.random_range(0..120u64));
            disk.fail_after(countdown);
            run(&v, &mut m, ops, &mut seq).map_err(TestCaseError::fail)?;
            // Some phases end with a byte of one block rotting in every layer: its
            // slot may hold a synced write whose record is still in the log.
            let rotted = rng.random_bool(0.3).then(|| rot(&disk, rng.random_range(0..BLOCKS)));
            v.close();
            drop(v);
            disk.fail_after(None);
            // Some phases end in a kill, not a power cut: the page cache survives, so
            // recovery sees writes that are not durable yet (and must make them so
            // before it relies on them).
            if rng.random_bool(0.7) {
                let keep: f64 = rng.random();
                disk.crash(|| rng.random_bool(keep));
            }
            let v = open_with(&disk, sealed, direct).map_err(|e| TestCaseError::fail(format!("recovery failed: {e}")))?;
            check_recovered(&v, &mut m, rotted).map_err(TestCaseError::fail)?;
            if let Some(b) = rotted {
                repair(&v, &mut m, b, &mut seq).map_err(TestCaseError::fail)?;
            }
        }
    }
}

#[test]
fn failed_sync_poisons_writes_but_not_reads() {
    let disk = SimDisk::new();
    let v = open(&disk).unwrap();
    v.write_blocks(1, 0, &block_data(1, 0)).unwrap();
    disk.fail_syncs(true);
    assert!(matches!(v.sync(), Err(StoreError::Poisoned { .. })));
    assert!(matches!(
        v.write_blocks(2, 1, &block_data(2, 1)),
        Err(StoreError::Poisoned { .. })
    ));
    assert!(matches!(v.sync(), Err(StoreError::Poisoned { .. })));
    assert_eq!(decode(&v.read_blocks(0, 1).unwrap(), 0), Ok(1));
}

#[test]
fn bit_rot_is_reported_never_returned() {
    let disk = SimDisk::new();
    let v = open(&disk).unwrap();
    v.write_blocks(1, 3, &block_data(7, 3)).unwrap();
    v.snapshot("s").unwrap(); // checkpoint: block 3 now lives in layer 1
    disk.corrupt(
        Path::new("/sim/volumes/v/layers/1.data"),
        3 * B as u64 + 100,
    );
    match v.read_blocks(3, 1) {
        Err(StoreError::Checksum { block: 3, .. }) => {}
        other => panic!("expected a checksum error, got {other:?}"),
    }
    // A reader that authenticates by seals gets no pass where blocks carry none.
    assert!(matches!(
        v.read_authenticated(None, 3, 1),
        Err(StoreError::Checksum { block: 3, .. })
    ));
    // Neighbours are fine.
    assert_eq!(decode(&v.read_blocks(4, 1).unwrap(), 4), Ok(0));
    // Damage in the log is caught too.
    v.write_blocks(2, 5, &block_data(8, 5)).unwrap();
    // Small records are gathered in memory until a sync (or 256 KiB) writes them out.
    v.sync().unwrap();
    let wal = disk.read_file_for_test(Path::new("/sim/volumes/v/wal"));
    let at = wal
        .windows(12)
        .position(|w| w[..4] == 8u32.to_le_bytes() && w[4..12] == 5u64.to_le_bytes())
        .unwrap();
    disk.corrupt(Path::new("/sim/volumes/v/wal"), at as u64 + 200);
    assert!(matches!(
        v.read_blocks(5, 1),
        Err(StoreError::Checksum { block: 5, .. })
    ));
    assert!(matches!(
        v.read_authenticated(None, 5, 1),
        Err(StoreError::Checksum { block: 5, .. })
    ));
}

#[test]
fn full_disk_fails_writes_keeps_acknowledged_data_and_recovers() {
    let disk = SimDisk::new();
    let v = open(&disk).unwrap();
    v.write_blocks(1, 0, &block_data(1, 0)).unwrap();
    v.sync().unwrap();
    let used: u64 = 48 << 10; // the log is preallocated; layers grow
    disk.set_capacity(Some(used + 2 * B as u64 + 8 * 1024));
    let mut seq = 2;
    let mut failed = false;
    for round in 0..200u64 {
        let b = round % BLOCKS;
        match v.write_blocks(seq, b, &block_data(100 + round as u32, b)) {
            Ok(()) => seq += 1,
            Err(StoreError::NoSpace { .. }) => {
                failed = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(failed, "the disk never filled up");
    assert!(read_all(&v, None).is_ok());
    disk.set_capacity(None);
    v.write_blocks(seq, 0, &block_data(999, 0)).unwrap();
    v.sync().unwrap();
    assert_eq!(read_all(&v, None).unwrap()[0], 999);
}

/// Flushes racing rewrites of the same blocks, on real threads: whatever a completed
/// flush promised (or a newer write) is there after any power cut, never garbage.
#[test]
fn flushes_racing_direct_rewrites_keep_what_they_promised() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..60 {
        let disk = SimDisk::new();
        // Every write direct, so rewrites choose slots.
        let v = open_with(&disk, false, 1).unwrap();
        // Writes land while a flush waits on the device.
        disk.slow_syncs(Some(std::time::Duration::from_micros(200)));
        let (done, promised, stop) = (AtomicU32::new(0), AtomicU32::new(0), AtomicBool::new(false));
        std::thread::scope(|s| {
            s.spawn(|| {
                for tag in 1..=300u32 {
                    let data: Vec<u8> = (0..4).flat_map(|b| block_data(tag, b)).collect();
                    if v.write_blocks(u64::from(tag), 0, &data).is_err() {
                        break;
                    }
                    done.store(tag, Ordering::SeqCst);
                }
                stop.store(true, Ordering::SeqCst);
            });
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let upto = done.load(Ordering::SeqCst);
                    if v.sync().is_ok() {
                        promised.fetch_max(upto, Ordering::SeqCst);
                    }
                }
            });
        });
        v.close();
        drop(v);
        disk.slow_syncs(None);
        let keep: f64 = rng.random();
        disk.crash(|| rng.random_bool(keep));
        let v = open_with(&disk, false, 1).unwrap();
        let promised = promised.load(Ordering::SeqCst);
        for b in 0..4u64 {
            let got = v
                .read_blocks(b, 1)
                .map_err(|e| format!("round {round}: {e}"))
                .and_then(|d| decode(&d, b))
                .unwrap();
            assert!(
                got >= promised,
                "round {round}: block {b} holds version {got}, a flush promised {promised}"
            );
        }
    }
}

/// Direct records gathered in memory reach the file when the volume settles, so a
/// killed process (page cache kept) comes back with every completed write.
#[test]
fn settled_direct_writes_survive_a_kill() {
    let disk = SimDisk::new();
    let v = open_with(&disk, false, 1).unwrap();
    for b in 0..6u64 {
        v.write_blocks(b + 1, b, &block_data(10 + b as u32, b))
            .unwrap();
    }
    v.settle().unwrap();
    v.close();
    drop(v);
    // A kill: nothing lost from the page cache, nothing synced either.
    let v = open_with(&disk, false, 1).unwrap();
    let got = read_all(&v, None).unwrap();
    assert_eq!(&got[..6], &[10, 11, 12, 13, 14, 15]);
}
