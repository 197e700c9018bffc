//! Garbage collection: deletes the chunks no backup needs, in two phases, without
//! stopping backups. Mark collects the names every manifest and checkpoint holds,
//! plus what running backups rely on through their leases; sweep streams the
//! listing of `chunks/` and deletes a chunk only when it is unmarked and older than
//! both the mark's start minus the grace period and every running backup's start.
//! Memory is the marked set: one name per chunk referenced. `docs/backup.md` argues
//! why no chunk a backup needs is ever deleted.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;

use crate::chunk::ChunkRef;
use crate::error::BackupError;
use crate::keys::Keys;
use crate::lease::{Lease, LeaseRenewed, LeaseStart};
use crate::target::{Listed, Target, TargetConfig};

/// How gc runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Chunks younger than this at the mark's start are kept even when unmarked:
    /// room for clocks of a many-node server that disagree.
    pub grace: Duration,
    /// Report what would be deleted, delete nothing.
    pub dry_run: bool,
    /// A checkpoint not written for this long belongs to a backup nobody resumes.
    pub checkpoint_keep: Duration,
    /// Objects read or deleted at once.
    pub concurrency: usize,
}

impl Default for GcOptions {
    fn default() -> GcOptions {
        GcOptions {
            grace: Duration::from_secs(3600),
            dry_run: false,
            checkpoint_keep: Duration::from_secs(7 * 24 * 3600),
            concurrency: 16,
        }
    }
}

/// Counters of a running gc, for a progress line.
#[derive(Debug, Default)]
pub struct GcProgress {
    /// "lock", "mark", "leases", "sweep" or "done".
    pub phase: parking_lot::Mutex<&'static str>,
    /// Manifests and checkpoints read.
    pub maps_read: AtomicU64,
    /// Chunk objects listed.
    pub listed: AtomicU64,
    /// Chunk objects deleted.
    pub deleted: AtomicU64,
}

/// What a gc did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GcReport {
    /// Manifests marked from.
    pub manifests: u64,
    /// Checkpoints marked from.
    pub checkpoints: u64,
    /// Checkpoints deleted as abandoned.
    pub checkpoints_removed: u64,
    /// Leases of running backups.
    pub leases_running: u64,
    /// Expired leases deleted.
    pub leases_removed: u64,
    /// Distinct chunks referenced (the marked set).
    pub referenced: u64,
    /// Chunk objects listed.
    pub chunks: u64,
    /// Bytes of them.
    pub bytes: u64,
    /// Unmarked chunks kept because they are younger than the cutoff.
    pub kept_young: u64,
    /// Chunk objects deleted (or, in a dry run, that would be).
    pub deleted: u64,
    /// Bytes of them.
    pub bytes_deleted: u64,
    /// Objects under `chunks/` that are not chunks, left alone.
    pub foreign: u64,
    /// Why nothing was swept, when nothing was.
    pub skipped: Option<String>,
    /// Milliseconds the whole gc took.
    pub millis: u64,
}

fn body<T: serde::de::DeserializeOwned + Default>(b: &[u8]) -> T {
    serde_json::from_slice(b).unwrap_or_default()
}

/// The server's time now: the LastModified of an object written for it.
async fn server_now(target: &Target) -> Result<i64, BackupError> {
    let r: [u8; 8] = crate::keys::random()?;
    let p = target.path(&["gc", &format!("clock-{}", hex::encode(r))]);
    target.put(&p, Vec::new(), "writing a clock probe").await?;
    let t = target.modified(&p, "reading a clock probe").await?;
    target.delete(&p, "deleting a clock probe").await?;
    Ok(t)
}

/// Takes the target's gc lock: one gc at a time. A lock not renewed for the lease
/// time belongs to a gc that died, and is taken over.
async fn lock(target: &Target, cfg: &TargetConfig) -> Result<Lease, BackupError> {
    let path = target.path(&["gc", "lock"]);
    let r: [u8; 8] = crate::keys::random()?;
    let holder = format!("gc {} pid {}", hex::encode(r), std::process::id()).into_bytes();
    let ttl = cfg.lease();
    let mut took = target
        .put_new(&path, holder.clone(), "taking the gc lock")
        .await?;
    if !took {
        let since = match target.modified(&path, "reading the gc lock").await {
            Ok(t) => Some(t),
            Err(BackupError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let now = server_now(target).await?;
        if let Some(t) = since {
            let age = Duration::from_millis(now.saturating_sub(t).max(0) as u64);
            if age < ttl {
                return Err(BackupError::Exists(format!(
                    "another gc is running on backup target {} (its lock gc/lock was renewed {} ago); wait for it to end, or, if it died, run gc again in {}",
                    target.name(),
                    humantime::format_duration(Duration::from_secs(age.as_secs())),
                    humantime::format_duration(Duration::from_secs((ttl - age).as_secs() + 1)),
                )));
            }
            tracing::warn!(target = %target.name(), "taking over the lock of a gc that stopped renewing it");
            target.delete(&path, "deleting a dead gc's lock").await?;
        }
        took = target
            .put_new(&path, holder.clone(), "taking the gc lock")
            .await?;
    }
    // A store that ignores If-None-Match lets a racing gc overwrite the lock: read
    // back whose it is.
    if !took || target.get(&path, "reading the gc lock").await?.as_ref() != holder.as_slice() {
        return Err(BackupError::Exists(format!(
            "another gc took the lock of backup target {} just now; let it run",
            target.name()
        )));
    }
    Ok(Lease::held(
        target,
        ttl,
        format!("gc of {}", target.name()),
        path,
        holder,
    ))
}

/// Collects garbage in `target`; see the module's comment.
pub async fn gc(
    target: &Target,
    keys: &Keys,
    cfg: &TargetConfig,
    opts: &GcOptions,
    progress: &GcProgress,
) -> Result<GcReport, BackupError> {
    let started = target.clock().now();
    *progress.phase.lock() = "lock";
    let lock = lock(target, cfg).await?;
    let r = collect(target, keys, cfg, opts, progress, &lock).await;
    let path = target.path(&["gc", "lock"]);
    if let Err(e) = target.delete(&path, "releasing the gc lock").await {
        tracing::warn!(target = %target.name(), error = %e, "cannot release the gc lock; it expires by itself");
    }
    *progress.phase.lock() = "done";
    let mut report = r?;
    report.millis = target.clock().now().saturating_sub(started).as_millis() as u64;
    tracing::info!(target = %target.name(), deleted = report.deleted, bytes_deleted = report.bytes_deleted,
        referenced = report.referenced, kept_young = report.kept_young, skipped = ?report.skipped, "gc complete");
    Ok(report)
}

/// The leases in the target, by (volume, id): (start, renewed).
type Leases = BTreeMap<(String, String), (Option<Listed>, Option<Listed>)>;

async fn list_leases(target: &Target) -> Result<Leases, BackupError> {
    let mut out = Leases::new();
    let mut s = target.list_under(&["leases"], "listing leases");
    while let Some(l) = s.try_next().await? {
        if let [_, v, id, kind] = l.parts.as_slice() {
            let e = out.entry((v.clone(), id.clone())).or_default();
            match kind.as_str() {
                "start" => e.0 = Some(l),
                "renewed" => e.1 = Some(l),
                _ => {}
            }
        }
    }
    Ok(out)
}

async fn collect(
    target: &Target,
    keys: &Keys,
    cfg: &TargetConfig,
    opts: &GcOptions,
    progress: &GcProgress,
    lock: &Lease,
) -> Result<GcReport, BackupError> {
    let mut report = GcReport::default();
    let ttl = cfg.lease().as_millis() as i64;
    let lock_path = target.path(&["gc", "lock"]);
    let locked_at = target.modified(&lock_path, "reading the gc lock").await?;

    // Abandoned checkpoints go before the mark starts: a backup that resumes one
    // names it in its lease, so whichever gc sees that lease finds it gone and
    // sweeps nothing.
    let keep = opts.checkpoint_keep.as_millis() as i64;
    let stale: Vec<Listed> = target
        .list_under(&["checkpoints"], "listing checkpoints")
        .try_filter(|l| futures::future::ready(l.modified.saturating_add(keep) < locked_at))
        .try_collect()
        .await?;
    for l in stale {
        if let [_, v] = l.parts.as_slice() {
            tracing::info!(volume = %v, "deleting a checkpoint nobody resumed");
            if !opts.dry_run {
                target.remove_checkpoint(v).await?;
            }
            report.checkpoints_removed += 1;
        }
    }

    // The mark's start, on the server's clock.
    lock.renew_lock(true).await?;
    let t0 = target.modified(&lock_path, "reading the gc lock").await?;

    *progress.phase.lock() = "mark";
    let mut marked: HashSet<ChunkRef> = HashSet::new();
    let mut skip: Option<String> = None;
    let backups = target.list(None).await?;
    let mut maps = futures::stream::iter(backups)
        .map(|(v, id)| async move {
            match target.manifest(keys, &v, &id).await {
                Ok(m) => Ok(Some(m.chunks)),
                Err(BackupError::NotFound(_)) => Ok(None),
                Err(e) => Err((v, id, e)),
            }
        })
        .buffer_unordered(opts.concurrency.max(1));
    while let Some(r) = maps.next().await {
        lock.renew_lock(false).await?;
        progress.maps_read.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(Some(chunks)) => {
                report.manifests += 1;
                marked.extend(chunks.into_iter().map(|(_, n)| n));
            }
            Ok(None) => {}
            Err((v, id, BackupError::Corrupt(e))) => {
                // Its chunks cannot be told apart from garbage; keep them all.
                skip.get_or_insert(format!(
                    "backup {v}/{id} cannot be read ({e}); nothing is swept until it is removed with `tether backup rm {v}/{id}`"
                ));
            }
            Err((_, _, e)) => return Err(e),
        }
    }
    drop(maps);
    let checkpoints: Vec<Listed> = target
        .list_under(&["checkpoints"], "listing checkpoints")
        .try_collect()
        .await?;
    for l in checkpoints {
        let [_, v] = l.parts.as_slice() else { continue };
        match target.checkpoint(keys, v).await {
            Ok(Some(c)) => {
                report.checkpoints += 1;
                marked.extend(c.done.into_values().flatten());
            }
            Ok(None) => {}
            // A checkpoint that cannot be opened is never resumed from.
            Err(e) => {
                tracing::warn!(volume = %v, error = %e, "skipping a checkpoint that cannot be read")
            }
        }
        progress.maps_read.fetch_add(1, Ordering::Relaxed);
    }

    // Leases listed after the manifests: a backup whose lease is not here started
    // after the manifests were listed, so its parent was among them.
    *progress.phase.lock() = "leases";
    let mut cutoff = t0.saturating_sub(opts.grace.as_millis() as i64);
    let mut expired = Vec::new();
    for ((v, id), (start, renewed)) in list_leases(target).await? {
        lock.renew_lock(false).await?;
        let newest = start
            .iter()
            .chain(renewed.iter())
            .map(|l| l.modified)
            .max()
            .unwrap_or(i64::MIN);
        if newest.saturating_add(ttl) <= t0 {
            // Lapsed before the mark began: its backup stops without writing. Kept a
            // while longer than that, then deleted.
            if newest.saturating_add(2 * ttl) < t0 {
                expired.push((v, id));
            }
            continue;
        }
        // A live renewal without a start is a backup whose lapsed lease was deleted;
        // it stops at its next check.
        let Some(start) = start else { continue };
        let lease_path = |k: &str| target.path(&["leases", &v, &id, k]);
        let done = match renewed {
            Some(_) => match target.get(&lease_path("renewed"), "reading a lease").await {
                Ok(b) => body::<LeaseRenewed>(&b).done,
                Err(BackupError::NotFound(_)) => false,
                Err(e) => return Err(e),
            },
            None => false,
        };
        if done {
            match target.manifest(keys, &v, &id).await {
                Ok(m) => {
                    marked.extend(m.chunks.into_iter().map(|(_, n)| n));
                    continue;
                }
                // Removed since: a backup that read it before may build on it, and
                // its lease may not be in this listing. What it named is kept as
                // for a running backup: its uploads by age, its parent's by mark.
                Err(BackupError::NotFound(_)) => {}
                Err(e) => {
                    skip.get_or_insert(format!("backup {v}/{id} cannot be read: {e}"));
                    continue;
                }
            }
        }
        report.leases_running += 1;
        cutoff = cutoff.min(start.modified);
        let s: LeaseStart = match target.get(&lease_path("start"), "reading a lease").await {
            Ok(b) => body(&b),
            Err(BackupError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        if let Some(p) = &s.parent {
            match target.manifest(keys, &v, p).await {
                Ok(m) => marked.extend(m.chunks.into_iter().map(|(_, n)| n)),
                Err(e) => {
                    skip.get_or_insert(format!(
                        "backup {v}/{id} builds on {v}/{p}, which cannot be read ({e}); gc sweeps again once the lease of {v}/{id} has expired ({} after it ends)",
                        humantime::format_duration(cfg.lease())
                    ));
                }
            }
        }
        if s.resume {
            match target.checkpoint(keys, &v).await {
                Ok(Some(c)) => marked.extend(c.done.into_values().flatten()),
                r => {
                    let why = match r {
                        Err(e) => e.to_string(),
                        _ => "it is gone".into(),
                    };
                    skip.get_or_insert(format!(
                        "backup {v}/{id} resumed from the checkpoint of {v}, which cannot be read ({why}); gc sweeps again once the lease of {v}/{id} has expired ({} after it ends)",
                        humantime::format_duration(cfg.lease())
                    ));
                }
            }
        }
    }
    report.referenced = marked.len() as u64;

    *progress.phase.lock() = "sweep";
    if let Some(why) = &skip {
        tracing::warn!(target = %target.name(), reason = %why, "gc sweeps nothing this time");
    }
    let sweep = skip.is_none();
    let counts = parking_lot::Mutex::new(&mut report);
    target
        .list_under(&["chunks"], "listing chunks")
        .map(|l| async {
            let l = l?;
            lock.renew_lock(false).await?;
            progress.listed.fetch_add(1, Ordering::Relaxed);
            let Some(name) = Target::chunk_of(&l.parts) else {
                counts.lock().foreign += 1;
                return Ok(());
            };
            {
                let mut c = counts.lock();
                c.chunks += 1;
                c.bytes += l.size;
                if marked.contains(&name) {
                    return Ok(());
                }
                if !sweep || l.modified >= cutoff {
                    c.kept_young += u64::from(sweep);
                    return Ok(());
                }
            }
            if !opts.dry_run {
                target.delete_chunk(&name).await?;
            }
            progress.deleted.fetch_add(1, Ordering::Relaxed);
            let mut c = counts.lock();
            c.deleted += 1;
            c.bytes_deleted += l.size;
            Ok::<(), BackupError>(())
        })
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;

    if !opts.dry_run {
        for (v, id) in expired {
            let (s, r) = crate::lease::paths(target, &v, &id);
            target.delete(&r, "deleting an expired lease").await?;
            target.delete(&s, "deleting an expired lease").await?;
            report.leases_removed += 1;
        }
    }
    report.skipped = skip;
    Ok(report)
}
