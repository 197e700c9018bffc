//! Online rebuild: a new, stale or returning replica catches up while the volume
//! keeps serving.
//!
//! 1. Snapshots first (they are frozen): the target keeps the longest prefix of its
//!    snapshots that matches the source's (same name and write sequence), drops the
//!    rest, and for each missing snapshot makes its head look like that snapshot —
//!    copying only allocated blocks whose 64-bit hashes differ — and freezes it.
//! 2. Then it joins the write set, write-only: every new write reaches it. The head is
//!    copied the same way, chunk by chunk, each chunk under the volume's range lock so
//!    no client write to it can interleave with the copy.
//! 3. It turns read-write.
//!
//! Only blocks that hold data on either side are looked at (each side's map of its
//! allocated runs comes first), so a thin volume's rebuild follows its data, not its
//! size. Where the target holds nothing, the source's blocks are copied without
//! comparing; elsewhere comparing hashes instead of copying everything is what makes a
//! returning replica copy only what it missed, and what makes an interrupted rebuild
//! resume cheaply: whatever was copied before matches and is skipped. Pieces are
//! pipelined, several in flight.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::replica::{
    io_request::Op, DeleteSnapshotRequest, Expand, HashesRequest, OpenRequest, Snapshot,
    SnapshotsRequest, Write, Zero,
};
use tokio::time::Instant;

use crate::membership::Change;
use crate::progress::{Progress, Retry};
use crate::replica::{Down, ReplicaConn};
use crate::volume::allocation::{intersect, split, union};
use crate::volume::{Volume, BLOCK};

/// Why a rebuild stopped, and whether it got as far as the target replica (only a
/// replica that answers and still fails is given growing pauses).
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct RebuildError {
    /// The target replica answered.
    pub reached: bool,
    msg: String,
}

impl From<String> for RebuildError {
    fn from(msg: String) -> RebuildError {
        RebuildError { reached: true, msg }
    }
}

/// Blocks compared and copied per step.
const CHUNK: u64 = 256;

/// The outcome of a unary call to `r`; a fencing refusal trips the engine's fence.
fn step<T>(
    what: &str,
    r: &ReplicaConn,
    res: Result<Result<T, tonic::Status>, tokio::time::error::Elapsed>,
) -> Result<T, String> {
    let addr = &r.addr;
    match res {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(s)) => {
            r.check_fenced(&s);
            Err(format!("{what} on {addr}: {}", s.message()))
        }
        Err(_) => Err(format!("{what} on {addr}: no answer")),
    }
}

async fn wait(
    vol: &Volume,
    r: &ReplicaConn,
    op: Op,
    what: &str,
) -> Result<crate::replica::Payload, String> {
    answer(vol, r, r.submit(op), what).await
}

/// The answer to a request queued on `r`'s stream.
async fn answer(
    vol: &Volume,
    r: &ReplicaConn,
    rx: tokio::sync::oneshot::Receiver<
        Result<crate::replica::Payload, crate::replica::ReplicaError>,
    >,
    what: &str,
) -> Result<crate::replica::Payload, String> {
    match tokio::time::timeout(vol.timeout().max(Duration::from_secs(30)), rx).await {
        Ok(Ok(Ok(d))) => Ok(d),
        Ok(Ok(Err(e))) => Err(format!("{what} on {}: {e}", r.addr)),
        Ok(Err(_)) | Err(_) => Err(format!("{what} on {}: no answer", r.addr)),
    }
}

async fn hashes(
    vol: &Volume,
    r: &ReplicaConn,
    snapshot: &str,
    block: u64,
    count: u32,
) -> Result<Vec<u64>, String> {
    let req = HashesRequest {
        volume: vol.name().to_string(),
        snapshot: snapshot.to_string(),
        block,
        count,
    };
    let reply = step(
        "hashing blocks",
        r,
        tokio::time::timeout(vol.timeout(), r.hashes(req)).await,
    )?;
    let h = reply.hashes;
    if h.len() != count as usize {
        return Err(format!(
            "replica {} returned {} hashes for {count} blocks",
            r.addr,
            h.len()
        ));
    }
    Ok(h)
}

/// Pieces compared or copied at once: enough to keep the disk and the link busy while
/// each piece waits for its round trips.
const IN_FLIGHT: usize = 8;

/// A run of blocks to bring over, and whether the target holds data anywhere in it
/// (if not, nothing needs comparing: the source's blocks are copied as they are).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    block: u64,
    count: u64,
    target_has_data: bool,
    /// The source holds data somewhere in it (if not, the target's blocks are zeroed).
    source_has_data: bool,
}

/// Whether any of the sorted runs `runs[*at..]` meets `[s, e)`; moves `at` past runs
/// that end before `s` (the pieces asked about come in order).
fn meets(runs: &[(u64, u64)], at: &mut usize, s: u64, e: u64) -> bool {
    while runs.get(*at).is_some_and(|r| r.1 <= s) {
        *at += 1;
    }
    runs.get(*at).is_some_and(|r| r.0 < e)
}

/// Splits the blocks allocated on either side (`src`, `dst`: sorted, disjoint runs)
/// into pieces of at most `CHUNK` blocks. Blocks that are holes on both sides read as
/// zeroes on both and are never looked at: a thin volume's rebuild follows its data.
fn pieces(src: &[(u64, u64)], dst: &[(u64, u64)], within: Option<&[(u64, u64)]>) -> Vec<Piece> {
    let mut union = union(src.iter().chain(dst).copied());
    if let Some(w) = within {
        union = intersect(&union, w);
    }
    let (mut at_src, mut at_dst) = (0, 0);
    split(&union, CHUNK)
        .map(|(block, count)| Piece {
            block,
            count,
            target_has_data: meets(dst, &mut at_dst, block, block + count),
            source_has_data: meets(src, &mut at_src, block, block + count),
        })
        .collect()
}

/// One copy into `target`'s head of `source`'s `snapshot` (or head, when empty; then
/// under the volume's range locks).
struct Copying<'a> {
    vol: &'a Volume,
    source: &'a ReplicaConn,
    target: &'a ReplicaConn,
    snapshot: &'a str,
    lock: bool,
    progress: &'a Progress,
}

impl Copying<'_> {
    /// Makes the target's head read like the source's snapshot (or head).
    async fn run(&self) -> Result<(), String> {
        let (vol, source, target) = (self.vol, self.source, self.target);
        let total = vol.size() / BLOCK;
        if self.lock {
            // Writes sent before the target joined the write set reach only the
            // source: wait for them (every write holds its range until it is
            // answered), so the map below shows them. Every later write reaches both.
            drop(vol.hold(0, total).await);
        }
        let (src, dst, changed) = futures::future::join3(
            vol.allocated(source, self.snapshot),
            vol.allocated(target, ""),
            vol.changed_since_away(source, target),
        )
        .await;
        // The source's record of what was written since the target left (taken after
        // the wait above: it covers every write the target may lack) narrows the
        // look to those blocks; without one, everything allocated is compared.
        let changed = changed?;
        let pieces = pieces(&src?, &dst?, changed.as_deref());
        tracing::info!(volume = %vol.name(), replica = %target.addr, source = %source.addr,
        snapshot = self.snapshot, record = changed.is_some(),
        blocks = pieces.iter().map(|p| p.count).sum::<u64>(),
        "rebuild compares the blocks {}", if changed.is_some() {
            "the source's record says were written since the replica left"
        } else {
            "allocated on either side (the source keeps no record for this replica)"
        });
        self.progress.total.fetch_add(
            pieces.iter().map(|p| p.count).sum::<u64>(),
            Ordering::Relaxed,
        );
        let mut done = futures::StreamExt::buffered(
            futures::stream::iter(pieces.into_iter().map(|p| self.piece(p))),
            IN_FLIGHT,
        );
        while let Some(r) = futures::StreamExt::next(&mut done).await {
            r?;
            self.still_going()?;
        }
        // Also when there was nothing to copy: the maps are only as good as the source
        // was healthy since (a source that failed stays failed, so this covers them).
        // A source that lost power before its map showed nothing, and a rebuild that
        // copied nothing joined a replica that lacked an acknowledged write
        // (simulation, seed 5294).
        self.still_going()
    }

    /// Whether the rebuild may go on: not removed, not fenced, both sides up.
    fn still_going(&self) -> Result<(), String> {
        let (source, target) = (self.source, self.target);
        self.progress.check(&target.addr)?;
        if self.vol.is_fenced() {
            return Err("a newer engine owns the volume".into());
        }
        if !target.is_writable() {
            return Err(format!(
                "replica {} failed during the rebuild: {}",
                target.addr,
                target.reason()
            ));
        }
        if !source.is_healthy() {
            return Err(format!(
                "source replica {} failed during the rebuild",
                source.addr
            ));
        }
        Ok(())
    }

    /// Brings one piece over, under the volume's range lock when copying the head.
    async fn piece(&self, p: Piece) -> Result<(), String> {
        let (vol, source, target, snapshot, progress) = (
            self.vol,
            self.source,
            self.target,
            self.snapshot,
            self.progress,
        );
        let lock = self.lock;
        let (b, n) = (p.block, p.count);
        let _held = if lock {
            Some(vol.hold(b, b + n).await)
        } else {
            None
        };
        // Runs of blocks (offsets in the piece) that differ.
        let differ: Vec<(usize, usize)> = if p.target_has_data {
            let (hs, ht) = futures::future::join(
                hashes(vol, source, snapshot, b, n as u32),
                hashes(vol, target, "", b, n as u32),
            )
            .await;
            let (hs, ht) = (hs?, ht?);
            let mut runs = Vec::new();
            let mut i = 0;
            while i < n as usize {
                if hs[i] == ht[i] {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < n as usize && hs[i] != ht[i] {
                    i += 1;
                }
                runs.push((start, i));
            }
            runs
        } else {
            vec![(0, n as usize)]
        };
        for (s, e) in differ {
            let (blk, cnt) = (b + s as u64, (e - s) as u32);
            let w = if p.source_has_data {
                // Verbatim: ciphertext and seals as stored, so a rebuild never encrypts;
                // and only a copy that opens, from whichever healthy replica has one.
                let copy = vol.read_good_raw(source, snapshot, blk, cnt).await?;
                Op::Write(Write {
                    seq: 0,
                    block: blk,
                    data: copy.data,
                    tags: copy.tags,
                })
            } else {
                // A hole on the source: zeroed, not written with zeroes, so the target
                // stays as thin as the source.
                Op::Zero(Zero {
                    seq: 0,
                    block: blk,
                    count: cnt,
                })
            };
            wait(vol, target, w, "copying blocks").await?;
            let copied = progress
                .copied
                .fetch_add(u64::from(cnt) * BLOCK, Ordering::Relaxed)
                + u64::from(cnt) * BLOCK;
            // Paced to `--rebuild-rate`: a piece that got ahead of it waits.
            if vol.rebuild_rate() > 0 {
                let due = Duration::from_secs_f64(copied as f64 / vol.rebuild_rate() as f64);
                let ahead = due.saturating_sub(progress.started.elapsed());
                if !ahead.is_zero() {
                    tokio::time::sleep(ahead).await;
                }
            }
        }
        progress.done.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// Starts rebuilding the replica at `addr` online: a new one (`new`, from
/// `tether replica add`) or one of the volume's failed replicas that may be retried.
/// The rebuild is registered before this returns, so a removal that comes after it
/// always finds and stops it.
pub fn start(
    vol: &Arc<Volume>,
    addr: &str,
    new: bool,
) -> Result<tokio::task::JoinHandle<Result<(), RebuildError>>, String> {
    let progress = vol.begin_rebuild(addr, new)?;
    let (vol, addr) = (vol.clone(), addr.to_string());
    Ok(tokio::spawn(rebuild(vol, addr, progress, new)))
}

/// Runs the rebuild registered as `progress`.
async fn rebuild(
    vol: Arc<Volume>,
    addr: String,
    progress: Arc<Progress>,
    new: bool,
) -> Result<(), RebuildError> {
    let res = run(&vol, &addr, &progress, new).await;
    vol.end_rebuild(&addr, &progress);
    match &res {
        Ok(()) => {
            vol.retries.lock().remove(&addr);
            tracing::info!(volume = %vol.name(), replica = %addr,
                compared = progress.total.load(Ordering::Relaxed),
                copied = progress.copied.load(Ordering::Relaxed),
                secs = progress.started.elapsed().as_secs(), "rebuild finished: replica is healthy")
        }
        Err(e) if progress.is_cancelled() => {
            tracing::info!(volume = %vol.name(), replica = %addr, error = %e, "rebuild stopped: the replica was removed");
        }
        Err(e) => {
            if let Some(r) = vol.replica(&addr) {
                r.set_down(Down::Failed, format!("rebuild failed: {e}"));
            }
            let now = Instant::now();
            vol.retries
                .lock()
                .entry(addr.clone())
                .or_insert_with(|| Retry::first(now))
                .failed(now, e.reached);
            tracing::warn!(volume = %vol.name(), replica = %addr, error = %e, "rebuild failed; it will be retried");
        }
    }
    res
}

async fn run(
    vol: &Arc<Volume>,
    addr: &str,
    progress: &Progress,
    new: bool,
) -> Result<(), RebuildError> {
    let source = vol.first_healthy().map_err(|e| e.to_string())?;
    // A replica the generation still counts in sync (its failure not recorded yet)
    // leaves it first: its join at the end must be a change of its own, or a drop
    // recorded late (for a request its old connection missed) would undo the join
    // while the rebuilt replica took writes alone (simulation, seed 3277).
    if vol.in_sync_claimed().contains(addr) {
        vol.record(Change::Drop(addr.to_string()))
            .await
            .map_err(|e| {
                format!("replica {addr} cannot be rebuilt before its drop is recorded: {e}")
            })?;
    }
    // A new replica becomes one of the volume's (a voter) before it gets any data. A
    // retry never adds one: the replica was removed meanwhile (simulation, seed 4309).
    if vol.generation().is_some_and(|g| !g.replicas.contains(addr)) {
        if !new {
            return Err(format!(
                "replica {addr} is no longer one of the volume's replicas; it is not rebuilt (`tether replica add` adds it)"
            )
            .into());
        }
        vol.record(Change::Add(addr.to_string()))
            .await
            .map_err(|e| format!("replica {addr} cannot be added: {e}"))?;
    }
    let link = vol
        .connector()
        .connect(addr)
        .await
        .map_err(|msg| RebuildError {
            reached: false,
            msg,
        })?;
    let target = ReplicaConn::new(addr, vol.name(), link, vol.fence());
    let res = fill(vol, &source, &target, progress).await;
    if let Err(e) = &res {
        // Ends the target's stream whether or not it joined the write set.
        let kind = if progress.is_cancelled() {
            Down::Removed
        } else {
            Down::Failed
        };
        target.mark_down(kind, format!("rebuild failed: {e}"));
    }
    Ok(res?)
}

/// Opens `target` as a rebuild target and makes it a copy of `source`, online.
async fn fill(
    vol: &Arc<Volume>,
    source: &Arc<ReplicaConn>,
    target: &Arc<ReplicaConn>,
    progress: &Progress,
) -> Result<(), String> {
    let addr = target.addr.as_str();
    let size = vol.size();
    let open = OpenRequest {
        volume: vol.name().to_string(),
        size,
        create: true,
        epoch: vol.epoch(),
        engine_id: vol.engine_id,
        rebuild: true,
        encryption: vol.encryption().to_string(),
        adopt_encryption: false,
    };
    let reply = step(
        "opening the volume",
        target,
        tokio::time::timeout(vol.timeout(), target.open(open)).await,
    )?;
    if reply.encryption != vol.encryption() {
        return Err(format!(
            "replica {addr} holds volume {} with other encryption parameters ({}); remove that copy on the replica before adding it",
            vol.name(),
            if reply.encryption.is_empty() { "unencrypted" } else { "another key or volume id" }
        ));
    }
    if reply.size > size {
        return Err(format!(
            "replica {addr} holds the volume with {} bytes, more than its {size}",
            reply.size
        ));
    }
    target.set_rebuilding(true);
    target.start(vol.epoch()).await?;
    if reply.size < size {
        wait(
            vol,
            target,
            Op::Expand(Expand { size }),
            "growing the volume",
        )
        .await?;
    }
    tracing::info!(volume = %vol.name(), replica = %addr, source = %source.addr,
        revision = reply.revision, "rebuild started");

    // Phase 1: snapshots.
    *progress.phase.lock() = "snapshots".into();
    let list = |r: Arc<ReplicaConn>| async move {
        let req = SnapshotsRequest {
            volume: vol.name().to_string(),
        };
        let mut s = step(
            "listing snapshots",
            &r,
            tokio::time::timeout(vol.timeout(), r.snapshots(req)).await,
        )?
        .snapshots;
        s.sort_by_key(|x| x.seq);
        Ok::<_, String>(s)
    };
    let theirs = list(source.clone()).await?;
    let mine = list(target.clone()).await?;
    let keep = theirs
        .iter()
        .zip(&mine)
        .take_while(|(a, b)| a.name == b.name && a.seq == b.seq)
        .count();
    for extra in &mine[keep..] {
        let req = DeleteSnapshotRequest {
            volume: vol.name().to_string(),
            epoch: vol.epoch(),
            name: extra.name.clone(),
        };
        step(
            "dropping a stale snapshot",
            target,
            tokio::time::timeout(Duration::from_secs(600), target.delete_snapshot(req)).await,
        )?;
    }
    for s in &theirs[keep..] {
        *progress.phase.lock() = format!("snapshot {}", s.name);
        Copying {
            vol,
            source,
            target,
            snapshot: &s.name,
            lock: false,
            progress,
        }
        .run()
        .await?;
        let op = Op::Snapshot(Snapshot {
            seq: 0,
            name: s.name.clone(),
        });
        wait(vol, target, op, "freezing a snapshot").await?;
    }

    // Phase 2: join the write set, then copy the head under range locks.
    *progress.phase.lock() = "head".into();
    if !vol.join(target.clone(), progress) {
        return Err(format!("replica {addr} was removed by the operator"));
    }
    Copying {
        vol,
        source,
        target,
        snapshot: "",
        lock: true,
        progress,
    }
    .run()
    .await?;
    // Durably clear the replica's rebuild mark; only then may a later engine trust
    // its revision.
    progress.check(addr)?;
    // Behind every write sent so far, which the copy now holds: their newest
    // sequence is its revision.
    let done = vol.submit_at_seq(target, |seq| {
        Op::RebuildDone(tether_proto::replica::RebuildDone { revision: seq })
    });
    answer(vol, target, done, "finishing the rebuild").await?;
    // In sync from here on: recorded on a majority before anyone relies on it.
    vol.record(Change::Join(addr.to_string()))
        .await
        .map_err(|e| format!("replica {addr}: its rebuild finished but cannot be recorded: {e}"))?;
    // Under the set's lock, like a removal: a replica removed meanwhile stays out.
    if !vol.promote(target, progress) {
        progress.check(addr)?;
        return Err(format!(
            "replica {addr} failed as its rebuild finished: {}",
            target.reason()
        ));
    }
    Ok(())
}

/// Brings failed replicas back: each is rebuilt when its retry comes due (see
/// [`Retry`]: a replica that answers but whose rebuild fails waits longer each time).
pub async fn watch(vol: Arc<Volume>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if vol.is_fenced() {
            return;
        }
        let now = Instant::now();
        let voters = vol.generation().map(|g| g.replicas);
        for r in vol.replicas() {
            if !r.down().is_some_and(|d| d.retried()) {
                continue;
            }
            // Listed on this engine's command line but removed from the volume (by
            // `replica rm` through another engine, maybe after this one started): a
            // retry must not add it back; `tether replica add` does (simulation, seed
            // 3065 with links that reach restarted replicas).
            if voters.as_ref().is_some_and(|v| !v.contains(&r.addr)) {
                continue;
            }
            let due = vol
                .retries
                .lock()
                .entry(r.addr.clone())
                .or_insert_with(|| Retry::first(now))
                .next
                <= now;
            // Refused when it is rebuilding already or was removed since the list
            // was read.
            if due {
                let _ = start(&vol, &r.addr, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(block: u64, count: u64, target_has_data: bool, source_has_data: bool) -> Piece {
        Piece {
            block,
            count,
            target_has_data,
            source_has_data,
        }
    }

    #[test]
    fn pieces_cover_data_on_either_side_and_nothing_else() {
        // Source: 10..12 and 1000..1300; target: 11..20.
        let got = pieces(&[(10, 12), (1000, 1300)], &[(11, 20)], None);
        assert_eq!(
            got,
            vec![
                p(10, 10, true, true),
                p(1000, CHUNK, false, true),
                p(1000 + CHUNK, 300 - CHUNK, false, true),
            ]
        );
        // A new replica of an empty volume: nothing at all.
        assert!(pieces(&[], &[], None).is_empty());
        // Data only on the target: its blocks are zeroed.
        assert_eq!(pieces(&[], &[(5, 6)], None), vec![p(5, 1, true, false)]);
        // With the source's record of what changed: only those blocks.
        assert_eq!(
            pieces(&[(10, 12), (1000, 1300)], &[(11, 20)], Some(&[(15, 1001)])),
            vec![p(15, 5, true, false), p(1000, 1, false, true)]
        );
    }
}
