//! What was written while another replica of the volume was away (DRBD keeps a bitmap
//! per peer for the same reason): a rebuild of a returning replica copies only these
//! blocks instead of hashing every allocated one on both sides.
//!
//! A record for replica R starts when the engine says R left the in-sync set (an
//! `Away` request in the ordered stream, carrying what was written since the last
//! flush every in-sync replica made: what R may lack or hold differently). From then
//! on every record appended to the log marks its blocks. It ends when a generation
//! counting R in sync is stored here, and every record ends when this replica becomes
//! a rebuild target, is reverted, or a salvage is stored: then it no longer knows how
//! it differs from R.
//!
//! Durability: the marks of writes still in the log are made again by replay, so the
//! file (`away` beside `meta`, replaced atomically) is written when a record starts
//! or ends and before every checkpoint lets log records go. A record can only ever be
//! too large, never miss a block.

use std::collections::BTreeMap;

use crate::extents::ExtentMap;

/// Runs past this many per record are merged into coarser ones: the record stays
/// bounded, and only ever grows.
const MAX_RUNS: usize = 1 << 18;

/// The records of the replicas that are away, by replica id, each for one copy of
/// the volume there (see `Meta::copy`).
#[derive(Debug, Default, Clone)]
pub(super) struct Away {
    records: BTreeMap<String, (u64, Runs)>,
}

/// Blocks written, as merged runs.
type Runs = ExtentMap<()>;

/// Adds `[s, e)` to `runs`, merging it into coarser runs past `MAX_RUNS`.
fn add(runs: &mut Runs, s: u64, e: u64) {
    runs.insert(s, e, ());
    if runs.len() <= MAX_RUNS {
        return;
    }
    let mut grain = 256u64;
    while runs.len() > MAX_RUNS / 2 && grain < 1 << 40 {
        let old = std::mem::take(runs);
        for (s, e, _) in old.iter() {
            runs.insert(
                s / grain * grain,
                e.div_ceil(grain).saturating_mul(grain),
                (),
            );
        }
        grain *= 16;
    }
}

impl Away {
    /// Whether no replica is away (writes then mark nothing).
    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Marks `[s, e)` written in every record.
    pub(super) fn mark(&mut self, s: u64, e: u64) {
        for (_, r) in self.records.values_mut() {
            add(r, s, e);
        }
    }

    /// Starts (or adds to) the record of copy `copy` on `replica` with `runs` as
    /// (block, count). A record of another copy there is replaced.
    pub(super) fn start(
        &mut self,
        replica: &str,
        copy: u64,
        runs: impl IntoIterator<Item = (u64, u64)>,
    ) {
        let entry = self.records.entry(replica.to_string()).or_default();
        if entry.0 != copy {
            *entry = (copy, Runs::default());
        }
        let rec = &mut entry.1;
        for (b, n) in runs {
            add(rec, b, b.saturating_add(n));
        }
    }

    /// Ends the record of `replica`; whether there was one.
    pub(super) fn end(&mut self, replica: &str) -> bool {
        self.records.remove(replica).is_some()
    }

    /// Ends every record; whether there was any.
    pub(super) fn end_all(&mut self) -> bool {
        let had = !self.records.is_empty();
        self.records.clear();
        had
    }

    /// The replicas with a record.
    pub(super) fn replicas(&self) -> impl Iterator<Item = &str> {
        self.records.keys().map(String::as_str)
    }

    /// The blocks of `[s, e)` written since copy `copy` on `replica` left, or `None`
    /// without a record of that copy.
    pub(super) fn changed(
        &self,
        replica: &str,
        copy: u64,
        s: u64,
        e: u64,
    ) -> Option<Vec<(u64, u64)>> {
        match self.records.get(replica) {
            Some((c, r)) if *c == copy && copy != 0 => {
                Some(r.within(s, e).map(|(s, e, _)| (s, e)).collect())
            }
            _ => None,
        }
    }

    /// The file's bytes: "TTHRAWY1", the record count (u32), then per record the
    /// replica id (u16 length, UTF-8), the copy (u64), the run count (u64) and each
    /// run's start and end (u64 each), all little endian, then a crc32c (u32) of
    /// everything before it.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        for (name, (copy, runs)) in &self.records {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&copy.to_le_bytes());
            out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
            for (s, e, _) in runs.iter() {
                out.extend_from_slice(&s.to_le_bytes());
                out.extend_from_slice(&e.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads what `encode` wrote; a damaged file is an error (the caller then keeps no
    /// record: rebuilds compare everything).
    pub(super) fn decode(bytes: &[u8]) -> Result<Away, String> {
        let Some((body, crc)) = bytes.split_last_chunk::<4>() else {
            return Err("shorter than its checksum".into());
        };
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err("checksum mismatch".into());
        }
        let mut r = Reader(body);
        if r.take(8)? != MAGIC {
            return Err("not a record file (bad magic)".into());
        }
        let mut away = Away::default();
        for _ in 0..r.u32()? {
            let len = u16::from_le_bytes(r.array()?) as usize;
            let name = std::str::from_utf8(r.take(len)?)
                .map_err(|_| "a replica id is not UTF-8".to_string())?
                .to_string();
            let copy = r.u64()?;
            let n = r.u64()?;
            let mut runs = Runs::default();
            let mut last = 0;
            for _ in 0..n {
                let (s, e) = (r.u64()?, r.u64()?);
                // Written merged and in order: touching runs would be merged too.
                if s >= e || (!runs.is_empty() && s <= last) {
                    return Err(format!("record of {name}: runs out of order"));
                }
                runs.insert(s, e, ());
                last = e;
            }
            away.records.insert(name, (copy, runs));
        }
        if !r.0.is_empty() {
            return Err("trailing bytes".into());
        }
        Ok(away)
    }
}

const MAGIC: &[u8; 8] = b"TTHRAWY1";

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_cut() {
        let mut a = Away::default();
        a.mark(0, 10);
        assert!(a.is_empty());
        a.start("r1", 9, [(5, 2)]);
        a.mark(10, 12);
        a.mark(7, 10);
        a.mark(20, 21);
        assert_eq!(a.changed("r1", 9, 0, 100), Some(vec![(5, 12), (20, 21)]));
        assert_eq!(a.changed("r1", 9, 6, 20), Some(vec![(6, 12)]));
        assert_eq!(a.changed("r2", 9, 0, 100), None);
        // Another copy made in r1's place: the record is not about it.
        assert_eq!(a.changed("r1", 10, 0, 100), None);
        a.mark(0, 30);
        assert_eq!(a.changed("r1", 9, 0, 100), Some(vec![(0, 30)]));
        let back = Away::decode(&a.encode()).unwrap();
        assert_eq!(back.encode(), a.encode());
        assert!(a.end("r1"));
        assert!(a.is_empty());
    }

    #[test]
    fn a_damaged_file_is_refused() {
        let mut a = Away::default();
        a.start("r1", 3, [(5, 2), (100, 1)]);
        let mut bytes = a.encode();
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            assert!(
                Away::decode(&bytes).is_err(),
                "flipped byte {i} went unnoticed"
            );
            bytes[i] ^= 1;
        }
        assert!(Away::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn coarsening_keeps_every_block() {
        let mut r = Runs::default();
        for i in 0..(MAX_RUNS as u64 + 10) {
            add(&mut r, i * 3, i * 3 + 1);
        }
        assert!(r.len() <= MAX_RUNS);
        for i in [0, 1000, MAX_RUNS as u64 + 9] {
            let got: Vec<_> = r.within(i * 3, i * 3 + 1).map(|(s, e, _)| (s, e)).collect();
            assert_eq!(got, vec![(i * 3, i * 3 + 1)]);
        }
    }
}
