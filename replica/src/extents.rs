//! A map from block ranges to values, kept as non-overlapping extents, so memory
//! follows how fragmented the writes are, not how big the volume is.

use std::collections::BTreeMap;

/// A value that can describe a sub-range of its extent.
pub trait Shift: Clone {
    /// The value for the part of the extent that starts `by` blocks later.
    fn shift(&self, by: u64) -> Self;
}

impl Shift for () {
    fn shift(&self, _by: u64) -> Self {}
}

/// Non-overlapping `[start, end)` extents, each with a value.
#[derive(Debug, Clone, Default)]
pub struct ExtentMap<V> {
    map: BTreeMap<u64, (u64, V)>,
    /// Blocks mapped, kept up to date (the store bounds its log's window by it).
    mapped: u64,
}

impl<V: Shift + PartialEq> ExtentMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        ExtentMap {
            map: BTreeMap::new(),
            mapped: 0,
        }
    }

    /// Number of extents (the memory cost).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no block is mapped.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Removes all extents.
    pub fn clear(&mut self) {
        self.map.clear();
        self.mapped = 0;
    }

    /// Unmaps `[start, end)`, splitting extents that straddle its edges.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // An extent beginning before `start` may reach into the range.
        if let Some((&s, &(e, ref v))) = self.map.range(..start).next_back() {
            if e > start {
                let v = v.clone();
                self.map.insert(s, (start, v.clone()));
                if e > end {
                    self.map.insert(end, (e, v.shift(end - s)));
                }
                self.mapped -= e.min(end) - start;
            }
        }
        while let Some((&s, _)) = self.map.range(start..end).next() {
            if let Some((e, v)) = self.map.remove(&s) {
                if e > end {
                    self.map.insert(end, (e, v.shift(end - s)));
                }
                self.mapped -= e.min(end) - s;
            }
        }
    }

    /// Maps `[start, end)` to `v` (for `start`; later blocks get `v.shift(i)`).
    /// Neighbours that continue each other merge, so a volume written in random
    /// order but completely ends up as one extent.
    pub fn insert(&mut self, start: u64, end: u64, v: V) {
        if start >= end {
            return;
        }
        let Err(v) = self.insert_alone(start, end, v) else {
            return;
        };
        self.remove(start, end);
        self.mapped += end - start;
        let (mut start, mut end, mut v) = (start, end, v);
        if let Some((&ls, &(le, ref lv))) = self.map.range(..start).next_back() {
            if le == start && lv.shift(le - ls) == v {
                v = lv.clone();
                start = ls;
                self.map.remove(&ls);
            }
        }
        if let Some((re, rv)) = self.map.get(&end) {
            if v.shift(end - start) == *rv {
                let re = *re;
                self.map.remove(&end);
                end = re;
            }
        }
        self.map.insert(start, (end, v));
    }

    /// `insert` for the common cases of a store's small writes, in one walk of the
    /// tree for a rewrite and two for a new extent, instead of seven or more:
    /// `[start, end)` is exactly one extent (a rewrite) or meets none, and continues
    /// neither neighbour. Gives `v` back otherwise. In a random 4 KiB write load the
    /// map holds one extent per block written, and its walks were a sixth of the
    /// engine's thread (tether1 P2, `perf record`).
    fn insert_alone(&mut self, start: u64, end: u64, v: V) -> Result<(), V> {
        let continues =
            |(&ls, &mut (le, ref lv)): (&u64, &mut (u64, V))| le == start && lv.shift(le - ls) == v;
        // From the right neighbour (an extent starting at `end`, if any) leftwards.
        let mut near = self.map.range_mut(..=end).rev().peekable();
        if let Some((_, (_, rv))) = near.next_if(|(&s, _)| s == end) {
            if v.shift(end - start) == *rv {
                return Err(v);
            }
        }
        let rewrite = match near.next() {
            Some((&s, (e, slot))) if s == start && *e == end => {
                if near.next().is_some_and(continues) {
                    return Err(v);
                }
                Some(slot)
            }
            Some(left) if left.1 .0 <= start => {
                if continues(left) {
                    return Err(v);
                }
                None
            }
            Some(_) => return Err(v),
            None => None,
        };
        match rewrite {
            Some(slot) => *slot = v,
            None => {
                self.map.insert(start, (end, v));
                self.mapped += end - start;
            }
        }
        Ok(())
    }

    /// The extents that meet `[start, end)`, cut to it, with their values unshifted.
    pub fn within(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, &V)> {
        let first = self
            .map
            .range(..=start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map_or(start, |(&s, _)| s);
        self.map
            .range(first..end)
            .map(move |(&s, (e, v))| (s.max(start), (*e).min(end), v))
            .filter(|(s, e, _)| s < e)
    }

    /// The extent covering `block`, as (value for `block`, end of the extent).
    pub fn get(&self, block: u64) -> Option<(V, u64)> {
        let (&s, &(e, ref v)) = self.map.range(..=block).next_back()?;
        (e > block).then(|| (v.shift(block - s), e))
    }

    /// The first extent start after `block`, if any.
    pub fn next_start(&self, block: u64) -> Option<u64> {
        self.map.range(block + 1..).next().map(|(&s, _)| s)
    }

    /// The run at `block`, cut at `end` (> `block`): its value and where it ends if
    /// `block` is mapped, else where the next extent (or `end`) begins.
    pub fn run(&self, block: u64, end: u64) -> Result<(V, u64), u64> {
        if let Some((v, e)) = self.get(block) {
            return Ok((v, e.min(end)));
        }
        // A one-block run cannot get shorter: skip the second walk (a 4 KiB read
        // through a chain of snapshots does this once per layer).
        if end <= block + 1 {
            return Err(end);
        }
        Err(self.next_start(block).map_or(end, |n| n.min(end)))
    }

    /// All extents in order, as (start, end, value).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, &V)> {
        self.map.iter().map(|(&s, (e, v))| (s, *e, v))
    }

    /// Number of blocks mapped.
    pub fn blocks(&self) -> u64 {
        self.mapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Off(u64);
    impl Shift for Off {
        fn shift(&self, by: u64) -> Self {
            Off(self.0 + by)
        }
    }

    /// Applies `ops` (insert or remove, start, length, value) to a map and to a plain
    /// per-block array, and checks that they agree.
    fn agrees(ops: Vec<(bool, u64, u64, u64)>) -> Result<(), TestCaseError> {
        let mut m = ExtentMap::new();
        let mut flat: Vec<Option<u64>> = vec![None; 80];
        for (ins, start, len, base) in ops {
            let end = start + len;
            if ins {
                m.insert(start, end, Off(base));
                for b in start..end {
                    flat[b as usize] = Some(base + b - start);
                }
            } else {
                m.remove(start, end);
                for b in start..end {
                    flat[b as usize] = None;
                }
            }
        }
        for (b, want) in flat.iter().enumerate() {
            prop_assert_eq!(m.get(b as u64).map(|(v, _)| v.0), *want);
            // `run` ends where the flat model stops being the same kind of run.
            let end = (b as u64 + 8).min(80);
            let same = |x: &Option<u64>, i: u64| match (want, x) {
                (Some(w), Some(v)) => *v == w + i,
                (None, None) => true,
                _ => false,
            };
            let flat_end = (b as u64..end)
                .take_while(|&i| same(&flat[i as usize], i - b as u64))
                .last()
                .map_or(b as u64, |i| i + 1);
            let got = match m.run(b as u64, end) {
                Ok((_, e)) | Err(e) => e,
            };
            prop_assert_eq!(got, flat_end);
        }
        // Adjacent extents that continue each other are always merged.
        let ext: Vec<(u64, u64, u64)> = m.iter().map(|(s, e, v)| (s, e, v.0)).collect();
        for w in ext.windows(2) {
            prop_assert!(!(w[0].1 == w[1].0 && w[0].2 + (w[0].1 - w[0].0) == w[1].2));
        }
        let mapped = flat.iter().filter(|x| x.is_some()).count() as u64;
        prop_assert_eq!(m.blocks(), mapped);
        let mut last_end = 0;
        for (s, e, _) in m.iter() {
            prop_assert!(s >= last_end && e > s);
            last_end = e;
        }
        Ok(())
    }

    proptest! {
        /// The extent map agrees with a plain per-block array.
        #[test]
        fn matches_a_flat_model(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 1u64..16, 0u64..1000), 1..60)) {
            agrees(ops)?;
        }

        /// The same with a store's small writes: mostly one or two blocks, often rewrites
        /// of a whole extent, with values that often continue a neighbour.
        #[test]
        fn small_writes_match_a_flat_model(ops in proptest::collection::vec((proptest::bool::weighted(0.9), 0u64..24, 1u64..3, 0u64..30), 1..80)) {
            agrees(ops)?;
        }
    }
}
