//! What was written since the last flush that every in-sync replica made. A replica
//! that leaves the in-sync set may lack exactly these blocks (its unflushed writes can
//! be lost to a power cut) or hold versions of them the others never got (writes sent
//! to it alone before the engine stopped), so the replicas that stay start their record
//! of what it missed with these (`Op::Away`).

use std::collections::BTreeMap;

/// Runs past this many are merged into coarser ones: the set stays bounded when
/// nothing flushes for long, and only ever grows.
const MAX_RUNS: usize = 1 << 16;

/// Runs of blocks written since the last flush every in-sync replica made.
#[derive(Debug)]
pub(super) struct Unflushed {
    /// start → (end, the newest write sequence in the run).
    runs: BTreeMap<u64, (u64, u64)>,
    /// Whether the runs are all of it: not until this engine's first flush counted,
    /// unless every replica it serves from was closed cleanly. Before that the
    /// replicas may hold an earlier engine's unflushed writes, which this one never
    /// saw (simulation, seed 296: a replica dropped before the first flush lost such a
    /// write to a power cut, and its rebuild from the record did not bring it back).
    known: bool,
}

impl Unflushed {
    /// Starts with nothing unflushed from before this engine (every replica served
    /// from was closed cleanly) or not.
    pub(super) fn new(known: bool) -> Unflushed {
        Unflushed {
            runs: BTreeMap::new(),
            known,
        }
    }

    /// The runs as (block, count), or `None` when they may not be all of it.
    pub(super) fn runs(&self) -> Option<Vec<(u64, u64)>> {
        self.known
            .then(|| self.runs.iter().map(|(&s, &(e, _))| (s, e - s)).collect())
    }

    /// Notes that write `seq` covers `[s, e)`.
    pub(super) fn wrote(&mut self, mut s: u64, mut e: u64, mut seq: u64) {
        if s >= e {
            return;
        }
        if let Some((&ps, &(pe, pseq))) = self.runs.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
                seq = seq.max(pseq);
                self.runs.remove(&ps);
            }
        }
        while let Some((&ns, &(ne, nseq))) = self.runs.range(s..).next() {
            if ns > e {
                break;
            }
            e = e.max(ne);
            seq = seq.max(nseq);
            self.runs.remove(&ns);
        }
        self.runs.insert(s, (e, seq));
        if self.runs.len() > MAX_RUNS {
            self.coarsen();
        }
    }

    /// Every in-sync replica made writes up to `seq` durable: forgets runs with no
    /// newer write.
    pub(super) fn flushed(&mut self, seq: u64) {
        self.known = true;
        if !self.runs.is_empty() {
            self.runs.retain(|_, &mut (_, newest)| newest > seq);
        }
    }

    /// Rounds runs out to 1 MiB (then coarser) until half the limit is left.
    fn coarsen(&mut self) {
        let mut grain = 256u64;
        while self.runs.len() > MAX_RUNS / 2 && grain < 1 << 40 {
            let old = std::mem::take(&mut self.runs);
            for (s, (e, seq)) in old {
                let (s, e) = (s / grain * grain, e.div_ceil(grain).saturating_mul(grain));
                self.wrote_exact(s, e, seq);
            }
            grain *= 16;
        }
    }

    /// `wrote` without coarsening (used by it).
    fn wrote_exact(&mut self, s: u64, e: u64, seq: u64) {
        match self.runs.range_mut(..=s).next_back() {
            Some((_, (pe, pseq))) if *pe >= s => {
                *pe = (*pe).max(e);
                *pseq = (*pseq).max(seq);
            }
            _ => {
                self.runs.insert(s, (e, seq));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_forget_only_what_they_cover() {
        let mut u = Unflushed::new(true);
        u.wrote(10, 12, 1);
        u.wrote(12, 13, 3);
        u.wrote(20, 21, 2);
        assert_eq!(u.runs(), Some(vec![(10, 3), (20, 1)]));
        u.flushed(2);
        // The merged run holds write 3, which the flush did not cover.
        assert_eq!(u.runs(), Some(vec![(10, 3)]));
        u.flushed(3);
        assert_eq!(u.runs(), Some(vec![]));
        // An engine that may have replicas with an earlier one's unflushed writes
        // knows nothing until its first flush.
        let mut u = Unflushed::new(false);
        u.wrote(1, 2, 1);
        assert_eq!(u.runs(), None);
        u.flushed(0);
        assert_eq!(u.runs(), Some(vec![(1, 1)]));
    }

    #[test]
    fn coarsening_keeps_every_block() {
        let mut u = Unflushed::new(true);
        for i in 0..(MAX_RUNS as u64 + 5) {
            u.wrote(i * 1000, i * 1000 + 1, i + 1);
        }
        assert!(u.runs.len() <= MAX_RUNS);
        let runs = u.runs().unwrap_or_default();
        for i in [0, 77, MAX_RUNS as u64 + 4] {
            let b = i * 1000;
            assert!(
                runs.iter().any(|&(s, n)| s <= b && b < s + n),
                "block {b} was lost"
            );
        }
    }
}
