//! Which blocks hold data: each replica's map of its allocated runs, so rebuild and
//! verify follow a thin volume's data instead of its size.

use tether_proto::replica::MapRequest;

use super::Volume;
use crate::replica::ReplicaConn;

/// Blocks per map request: the reply is one extent per run, so its size follows the
/// data's fragmentation, not this.
const MAP_WINDOW: u64 = 1 << 20;

/// Merges sorted or unsorted runs `[s, e)` into sorted, disjoint ones.
pub fn union(runs: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = runs.into_iter().filter(|r| r.0 < r.1).collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (s, e) in all {
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Splits sorted, disjoint runs into pieces of at most `max` blocks, in order.
pub fn split(runs: &[(u64, u64)], max: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let max = max.max(1);
    runs.iter().flat_map(move |&(s, e)| {
        (s..e)
            .step_by(max as usize)
            .map(move |b| (b, max.min(e - b)))
    })
}

/// Runs `a` that are also in `b` (both sorted and disjoint), cut to them.
pub fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

impl Volume {
    /// The runs of blocks that hold data on replica `r`, in its head or `snapshot`.
    pub async fn allocated(
        &self,
        r: &ReplicaConn,
        snapshot: &str,
    ) -> Result<Vec<(u64, u64)>, String> {
        Ok(self
            .mapped(r, snapshot, "", 0, "")
            .await?
            .unwrap_or_default())
    }

    /// The runs of blocks where snapshot `snapshot` may differ from the older
    /// snapshot `since` on replica `r`, from its layer index; `None` when `since` is
    /// gone there or is not an ancestor of `snapshot`.
    pub async fn changed_between(
        &self,
        r: &ReplicaConn,
        snapshot: &str,
        since: &str,
    ) -> Result<Option<Vec<(u64, u64)>>, String> {
        self.mapped(r, snapshot, "", 0, since).await
    }

    /// The runs of blocks written on replica `r` since `away` (its copy of the volume
    /// as it is now) left the in-sync set, or `None` if `r` keeps no record of it.
    pub async fn changed_since_away(
        &self,
        r: &ReplicaConn,
        away: &ReplicaConn,
    ) -> Result<Option<Vec<(u64, u64)>>, String> {
        self.mapped(r, "", &away.addr, away.copy(), "").await
    }

    /// `Map` over the whole volume: allocated runs, or with `changed_for` the record's,
    /// or with `since` the snapshots' difference.
    async fn mapped(
        &self,
        r: &ReplicaConn,
        snapshot: &str,
        changed_for: &str,
        changed_for_copy: u64,
        since: &str,
    ) -> Result<Option<Vec<(u64, u64)>>, String> {
        let total = self.size() / super::BLOCK;
        let mut out = Vec::new();
        let mut b = 0;
        while b < total {
            let n = MAP_WINDOW.min(total - b);
            let req = MapRequest {
                volume: self.name.clone(),
                block: b,
                count: n,
                snapshot: snapshot.to_string(),
                changed_for: changed_for.to_string(),
                changed_for_copy,
                since: since.to_string(),
            };
            let reply = match tokio::time::timeout(self.timeout, r.map(req)).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(s)) => {
                    r.check_fenced(&s);
                    return Err(format!(
                        "mapping allocated blocks on {}: {}",
                        r.addr,
                        s.message()
                    ));
                }
                Err(_) => return Err(format!("mapping allocated blocks on {}: no answer", r.addr)),
            };
            if reply.no_record {
                return Ok(None);
            }
            out.extend(
                reply
                    .extents
                    .iter()
                    .filter(|x| x.allocated)
                    .map(|x| (x.block, x.block.saturating_add(x.count).min(total))),
            );
            b += n;
        }
        Ok(Some(union(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_merges_and_split_bounds() {
        assert_eq!(
            union([(5, 7), (0, 2), (1, 3), (7, 8), (9, 9)]),
            vec![(0, 3), (5, 8)]
        );
        let got: Vec<_> = split(&[(0, 5), (10, 11)], 2).collect();
        assert_eq!(got, vec![(0, 2), (2, 2), (4, 1), (10, 1)]);
        assert_eq!(
            intersect(&[(0, 10), (20, 30)], &[(5, 22), (25, 26), (29, 40)]),
            vec![(5, 10), (20, 22), (25, 26), (29, 30)]
        );
    }
}
