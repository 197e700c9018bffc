//! Create and restore against a real directory target, over random volumes and
//! random changes: whatever changed, grew or was zeroed between two backups, the
//! incremental (from the changed chunks) and the compared one both restore to the
//! volume as it was.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use proptest::prelude::*;
use tether_backup::{BackupError, Header, Keys, Manifest, Progress, Scope, Target, TargetSpec};

const CHUNK: u64 = 256 << 10;
const B: usize = 4096;

struct Mem(Vec<u8>);

impl tether_backup::Source for Mem {
    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<u8>, BackupError>> {
        let (s, e) = (offset as usize, (offset + len) as usize);
        Box::pin(async move { Ok(self.0[s..e].to_vec()) })
    }
}

struct Sink(Mutex<Vec<u8>>);

impl tether_backup::Sink for Sink {
    fn write(&self, offset: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), BackupError>> {
        let o = offset as usize;
        self.0.lock().unwrap()[o..o + data.len()].copy_from_slice(&data);
        Box::pin(async { Ok(()) })
    }
    fn zero(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackupError>> {
        let o = offset as usize;
        self.0.lock().unwrap()[o..o + len as usize].fill(0);
        Box::pin(async { Ok(()) })
    }
    fn finish(&self) -> BoxFuture<'_, Result<(), BackupError>> {
        Box::pin(async { Ok(()) })
    }
}

fn header(id: &str, size: u64, parent: Option<&Manifest>) -> Header {
    Header {
        format: tether_backup::manifest::FORMAT,
        id: id.into(),
        volume: "v".into(),
        size,
        chunk_size: CHUNK,
        snapshot: id.into(),
        snapshot_seq: 1,
        parent: parent.map(|p| p.header.id.clone()),
        created: 0,
        labels: Default::default(),
        stats: Default::default(),
    }
}

async fn backup(
    t: &Target,
    k: &Keys,
    vol: &[u8],
    id: &str,
    parent: Option<Manifest>,
    scope: Scope,
) -> Manifest {
    let start = tether_backup::LeaseStart {
        parent: parent.as_ref().map(|p| p.header.id.clone()),
        resume: false,
    };
    let lease = tether_backup::Lease::take(t, std::time::Duration::from_secs(60), "v", id, &start)
        .await
        .unwrap();
    let job = tether_backup::Job {
        target: t.clone(),
        keys: k.clone(),
        header: header(id, vol.len() as u64, parent.as_ref()),
        parent,
        scope,
        concurrency: 3,
        progress: Arc::new(Progress::default()),
        lease: Arc::new(lease),
        resume: Default::default(),
        checkpoint_every: std::time::Duration::from_millis(5),
    };
    tether_backup::create(job, &Mem(vol.to_vec()))
        .await
        .unwrap()
}

/// Restores `m` over garbage, so a zero run the restore misses shows.
async fn restore(t: &Target, k: &Keys, m: &Manifest) -> Vec<u8> {
    let sink = Sink(Mutex::new(vec![0xEE; m.header.size as usize]));
    tether_backup::restore(t, k, m, &sink, false, 3, Arc::new(Progress::default()))
        .await
        .unwrap();
    sink.0.into_inner().unwrap()
}

/// (block, count, byte): byte 0 zeroes the blocks.
fn edits() -> impl Strategy<Value = Vec<(usize, usize, u8)>> {
    proptest::collection::vec((0usize..400, 1usize..80, any::<u8>()), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn incremental_and_compared_backups_restore_the_volume(
        blocks in 1usize..400,
        first in edits(),
        grow in 0usize..200,
        second in edits(),
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let t = Target::connect(&TargetSpec {
                url: dir.path().display().to_string(),
                endpoint: String::new(),
                region: String::new(),
                path_style: false,
                access_key: String::new(),
                secret_key: String::new(),
            })
            .unwrap();
            let k = Keys::from_master([5; 32]);
            let apply = |vol: &mut Vec<u8>, e: &[(usize, usize, u8)], touched: &mut Vec<u64>| {
                for &(b, n, byte) in e {
                    let nb = vol.len() / B;
                    let (s, end) = (b.min(nb), (b + n).min(nb));
                    for blk in s..end {
                        // Distinct content per block, so chunks rarely repeat.
                        let fill = if byte == 0 { 0 } else { byte ^ (blk as u8) };
                        vol[blk * B..(blk + 1) * B].fill(fill);
                        touched.push(blk as u64 * B as u64 / CHUNK);
                    }
                }
            };
            let mut vol = vec![0u8; blocks * B];
            apply(&mut vol, &first, &mut Vec::new());
            let all: Vec<u64> = (0..(vol.len() as u64).div_ceil(CHUNK)).collect();
            let m1 = backup(&t, &k, &vol, "20260101T000000.000Z-000001", None, Scope::Allocated(all)).await;
            assert_eq!(restore(&t, &k, &m1).await, vol, "full backup");
            let before = vol.clone();

            vol.resize(vol.len() + grow * B, 0);
            let mut touched = Vec::new();
            apply(&mut vol, &second, &mut touched);
            let m2 = backup(&t, &k, &vol, "20260101T000001.000Z-000002", Some(m1.clone()), Scope::Changed(touched)).await;
            assert_eq!(restore(&t, &k, &m2).await, vol, "incremental from the changed chunks");
            let all: Vec<u64> = (0..(vol.len() as u64).div_ceil(CHUNK)).collect();
            let m3 = backup(&t, &k, &vol, "20260101T000002.000Z-000003", Some(m1.clone()), Scope::Allocated(all)).await;
            assert_eq!(restore(&t, &k, &m3).await, vol, "compared against the parent");
            let names = |m: &Manifest| m.chunks.iter().map(|(i, r)| (*i, r.name)).collect::<Vec<_>>();
            assert_eq!(names(&m2), names(&m3), "both ways find the same chunk map");
            assert_eq!(restore(&t, &k, &m1).await, before, "the first backup is untouched");
        });
    }
}
