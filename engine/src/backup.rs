//! Backups and restores run in the engine of their volume: it reads snapshots as
//! plaintext (so chunks compress and dedup), finds what changed from its replicas'
//! layer index, and writes a restore once, fanned out to every replica.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tether_backup::{BackupError, Keys, Manifest, Progress, Scope, Target, TargetSpec};
use tether_proto::engine::BackupProgress;

use crate::volume::{Volume, BLOCK};

/// Chunks read and uploaded (or downloaded and written) at once by default.
pub const CONCURRENCY: usize = 8;
/// Prefix of the snapshots a backup takes itself.
pub const SNAPSHOT_PREFIX: &str = "backup-";

/// A backup or restore: running, or the last one that ended.
pub struct Job {
    /// "backup" or "restore".
    pub operation: &'static str,
    /// `VOLUME/ID` once known.
    pub backup: Mutex<String>,
    /// The target, without credentials.
    pub target: String,
    /// Its counters.
    pub progress: Arc<Progress>,
    /// How changed chunks were found.
    pub method: Mutex<String>,
    /// `None` while running; then the error's kind and message (empty on success).
    pub outcome: Mutex<Option<(String, String, Instant)>>,
    /// Wakes whoever follows the job when it ends.
    pub ended: tokio::sync::Notify,
}

impl Job {
    /// A job starting now.
    pub fn new(operation: &'static str, target: String) -> Arc<Job> {
        Arc::new(Job {
            operation,
            backup: Mutex::new(String::new()),
            target,
            progress: Arc::new(Progress::default()),
            method: Mutex::new(String::new()),
            outcome: Mutex::new(None),
            ended: tokio::sync::Notify::new(),
        })
    }

    /// Records how it ended.
    pub fn finish(&self, r: &Result<(), BackupError>) {
        let (kind, msg) = match r {
            Ok(()) => (String::new(), String::new()),
            Err(e) => (e.kind().to_string(), e.to_string()),
        };
        *self.outcome.lock() = Some((kind, msg, Instant::now()));
        self.ended.notify_waiters();
    }

    /// Whether it ended.
    pub fn finished(&self) -> bool {
        self.outcome.lock().is_some()
    }

    /// Its state as the control API reports it.
    pub fn report(&self) -> BackupProgress {
        let p = self.progress.read();
        let outcome = self.outcome.lock().clone();
        let (state, kind, error, ago) = match &outcome {
            None => ("running", String::new(), String::new(), 0),
            Some((k, _, at)) if k.is_empty() => {
                ("done", String::new(), String::new(), at.elapsed().as_secs())
            }
            Some((k, e, at)) => ("failed", k.clone(), e.clone(), at.elapsed().as_secs()),
        };
        BackupProgress {
            operation: self.operation.into(),
            backup: self.backup.lock().clone(),
            total_bytes: p.total,
            done_bytes: p.done,
            objects: p.objects,
            object_bytes: p.object_bytes,
            rate_bytes: p.rate,
            eta_seconds: if outcome.is_some() { 0 } else { p.eta },
            state: state.into(),
            error,
            method: self.method.lock().clone(),
            finished: outcome.is_some(),
            target: self.target.clone(),
            ended_seconds_ago: ago,
            error_kind: kind,
        }
    }
}

/// Parses a target and master key as the control API carries them.
pub fn target_of(spec_json: &str, master: &[u8]) -> Result<(Target, Keys), BackupError> {
    let spec: TargetSpec = serde_json::from_str(spec_json)
        .map_err(|e| BackupError::Invalid(format!("bad backup target description: {e}")))?;
    let master: [u8; 32] = master.try_into().map_err(|_| {
        BackupError::Invalid(format!(
            "the backup master key must be 32 bytes, not {}",
            master.len()
        ))
    })?;
    Ok((Target::connect(&spec)?, Keys::from_master(master)))
}

/// The snapshot of a volume as a backup reads it: plaintext, 1 MiB per replica read.
struct SnapshotSource {
    volume: Arc<Volume>,
    snapshot: String,
}

impl tether_backup::Source for SnapshotSource {
    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<u8>, BackupError>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(len as usize);
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(1 << 20);
                let bufs = self
                    .volume
                    .read_range(&self.snapshot, at, n as u32)
                    .await
                    .map_err(|e| {
                        BackupError::Volume(format!(
                            "volume {}: reading snapshot {} at byte {at}: {e}",
                            self.volume.name(),
                            self.snapshot
                        ))
                    })?;
                for b in bufs {
                    out.extend_from_slice(&b);
                }
                at += n;
            }
            Ok(out)
        })
    }
}

/// The chunks that block runs `[s, e)` touch.
fn chunks_of(runs: &[(u64, u64)], chunk_size: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &(s, e) in runs {
        if e <= s {
            continue;
        }
        let first = s * BLOCK / chunk_size;
        let last = (e * BLOCK - 1) / chunk_size;
        for c in first..=last {
            if out.last() != Some(&c) {
                out.push(c);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn volume_err(v: &Volume, what: &str, e: impl std::fmt::Display) -> BackupError {
    BackupError::Volume(format!("volume {}: {what}: {e}", v.name()))
}

/// What a backup needs besides the volume.
pub struct BackupArgs {
    /// The target and its keys.
    pub target: Target,
    /// The target's keys.
    pub keys: Keys,
    /// An existing snapshot to back up, or `None` to take one.
    pub snapshot: Option<String>,
    /// Labels for the manifest.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Chunks at once.
    pub concurrency: usize,
}

/// How often a running backup writes its checkpoint.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Backs `v` up: takes (or uses) a snapshot, finds the chunks changed since the last
/// backup, uploads them, and writes the manifest. A backup of this volume that was
/// interrupted resumes instead, when its snapshot is still here.
pub async fn backup(v: Arc<Volume>, a: BackupArgs, job: Arc<Job>) -> Result<Manifest, BackupError> {
    let cfg = a.target.config().await?;
    let vol = v.name().to_string();
    let ck = match a.target.checkpoint(&a.keys, &vol).await {
        Ok(c) => c,
        Err(e @ BackupError::Corrupt(_)) => {
            tracing::warn!(volume = %vol, error = %e, "the checkpoint cannot be read; starting afresh");
            a.target.remove_checkpoint(&vol).await?;
            None
        }
        Err(e) => return Err(e),
    };
    let space = v
        .space()
        .await
        .map_err(|e| volume_err(&v, "listing snapshots", e))?;
    let seq_of = |name: &str| {
        space
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.seq)
    };
    let (resume, stale): (Option<_>, Option<_>) = match ck {
        Some(c)
            if seq_of(&c.header.snapshot) == Some(c.header.snapshot_seq)
                && a.snapshot.as_ref().is_none_or(|s| *s == c.header.snapshot)
                && c.header.chunk_size == cfg.chunk_size
                && c.header.size == v.size() =>
        {
            (Some(c), None)
        }
        other => (None, other),
    };
    if let Some(c) = stale {
        // Its snapshot is gone or another was asked for: that backup cannot be
        // finished. Its snapshot, if it took one, serves nothing now.
        tracing::info!(volume = %vol, backup = %c.header.id, "dropping the checkpoint of a backup that cannot resume");
        a.target.remove_checkpoint(&vol).await?;
        let s = &c.header.snapshot;
        if s.starts_with(SNAPSHOT_PREFIX) && seq_of(s).is_some() {
            if let Err(e) = v.delete_snapshot(s).await {
                tracing::warn!(volume = %vol, snapshot = %s, error = %e, "cannot delete an abandoned backup's snapshot");
            }
        }
    }
    let (id, parent_id, created, snapshot, taken) = match &resume {
        Some(c) => (
            c.header.id.clone(),
            c.header.parent.clone(),
            c.header.created,
            c.header.snapshot.clone(),
            c.header.snapshot.starts_with(SNAPSHOT_PREFIX),
        ),
        None => {
            let now = std::time::SystemTime::now();
            let id = tether_backup::manifest::new_id(now)?;
            let created = now
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let (snapshot, taken) = match &a.snapshot {
                Some(s) => {
                    if seq_of(s).is_none() {
                        return Err(BackupError::NotFound(format!(
                            "volume {vol}: no snapshot {s}; `tether snapshot ls {vol}` lists them"
                        )));
                    }
                    (s.clone(), false)
                }
                None => {
                    let s = format!("{SNAPSHOT_PREFIX}{id}");
                    v.snapshot(&s)
                        .await
                        .map_err(|e| volume_err(&v, "taking the backup's snapshot", e))?;
                    (s, true)
                }
            };
            (id, a.target.latest(&vol).await?, created, snapshot, taken)
        }
    };
    *job.backup.lock() = format!("{vol}/{id}");
    let r = backup_snapshot(
        &v, &a, &job, &cfg, &id, &snapshot, created, parent_id, resume,
    )
    .await;
    // Each backup keeps its snapshot: it is the base the next incremental diffs
    // from. Older ones are not deleted here: deleting one merges its blocks into its
    // child, which for a backup's snapshot is most of the volume (docs/backup.md).
    // One that failed on the way to the target keeps it too: run again, it resumes.
    match &r {
        Ok(_) => {}
        Err(e @ (BackupError::Target(_) | BackupError::Lapsed(_))) if taken => {
            tracing::warn!(volume = %vol, backup = %id, error = %e,
                "backup interrupted; its snapshot and checkpoint are kept, and the next backup resumes it");
        }
        Err(e) if taken => {
            tracing::warn!(volume = %vol, error = %e, "backup failed; deleting its snapshot");
            if let Err(e) = a.target.remove_checkpoint(&vol).await {
                tracing::warn!(volume = %vol, error = %e, "cannot delete the failed backup's checkpoint");
            }
            if let Err(e) = v.delete_snapshot(&snapshot).await {
                tracing::warn!(volume = %vol, snapshot = %snapshot, error = %e,
                    "cannot delete the failed backup's snapshot; delete it by hand");
            }
        }
        Err(_) => {}
    }
    r
}

#[allow(clippy::too_many_arguments)]
async fn backup_snapshot(
    v: &Arc<Volume>,
    a: &BackupArgs,
    job: &Job,
    cfg: &tether_backup::TargetConfig,
    id: &str,
    snapshot: &str,
    created: u64,
    parent_id: Option<String>,
    mut resume: Option<tether_backup::Checkpoint>,
) -> Result<Manifest, BackupError> {
    let chunk_size = cfg.chunk_size;
    let space = v
        .space()
        .await
        .map_err(|e| volume_err(v, "listing snapshots", e))?;
    let seq_of = |name: &str| {
        space
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.seq)
    };
    let snapshot_seq = seq_of(snapshot).ok_or_else(|| {
        BackupError::NotFound(format!("volume {}: snapshot {snapshot} vanished", v.name()))
    })?;
    // The lease goes first: gc keeps what it names from here on.
    let start = tether_backup::LeaseStart {
        parent: parent_id.clone(),
        resume: resume.is_some(),
    };
    let mut lease =
        tether_backup::Lease::take(&a.target, cfg.lease(), v.name(), id, &start).await?;
    let parent = match &parent_id {
        Some(p) => match a.target.manifest(&a.keys, v.name(), p).await {
            Ok(m) => Some(m),
            // The latest backup is gone or damaged: this one stands alone, and
            // reads the whole volume. What a checkpoint took from it is void too.
            Err(e @ (BackupError::NotFound(_) | BackupError::Corrupt(_))) => {
                tracing::warn!(volume = %v.name(), parent = %p, error = %e,
                    "the parent backup cannot be read; making a full backup instead of an incremental one");
                resume = None;
                lease = tether_backup::Lease::take(
                    &a.target,
                    cfg.lease(),
                    v.name(),
                    id,
                    &tether_backup::LeaseStart::default(),
                )
                .await?;
                None
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    let r = v
        .first_healthy()
        .map_err(|e| volume_err(v, "choosing a replica to read", e))?;
    // The parent's snapshot, if this volume still holds that very snapshot (same
    // name and sequence), is the base: the layers above it hold every change.
    let base = parent
        .as_ref()
        .filter(|p| p.header.chunk_size == chunk_size)
        .filter(|p| seq_of(&p.header.snapshot) == Some(p.header.snapshot_seq))
        .map(|p| p.header.snapshot.clone());
    let scope = match &base {
        Some(b) if b == snapshot => Some(Scope::Changed(Vec::new())),
        Some(b) => v
            .changed_between(&r, snapshot, b)
            .await
            .map_err(|e| volume_err(v, "finding changed blocks", e))?
            .map(|runs| Scope::Changed(chunks_of(&runs, chunk_size))),
        None => None,
    };
    let scope = match scope {
        Some(s) => s,
        None => {
            let runs = v
                .allocated(&r, snapshot)
                .await
                .map_err(|e| volume_err(v, "mapping allocated blocks", e))?;
            Scope::Allocated(chunks_of(&runs, chunk_size))
        }
    };
    *job.method.lock() = match (&scope, &parent) {
        (Scope::Changed(_), _) => "layer index",
        (Scope::Allocated(_), Some(_)) => "compare",
        (Scope::Allocated(_), None) => "full",
    }
    .into();
    tracing::info!(volume = %v.name(), backup = %id, snapshot, target = %a.target.name(),
        method = %job.method.lock(), parent = parent.as_ref().map(|p| p.header.id.as_str()).unwrap_or("none"),
        "backup started");
    let header = tether_backup::Header {
        format: tether_backup::manifest::FORMAT,
        id: id.to_string(),
        volume: v.name().to_string(),
        size: v.size(),
        chunk_size,
        snapshot: snapshot.to_string(),
        snapshot_seq,
        parent: parent.as_ref().map(|p| p.header.id.clone()),
        created,
        labels: a.labels.clone(),
        stats: Default::default(),
    };
    let source = SnapshotSource {
        volume: v.clone(),
        snapshot: snapshot.to_string(),
    };
    tether_backup::create(
        tether_backup::Job {
            target: a.target.clone(),
            keys: a.keys.clone(),
            header,
            parent,
            scope,
            concurrency: a.concurrency,
            progress: job.progress.clone(),
            lease: Arc::new(lease),
            resume: resume.map(|c| c.done).unwrap_or_default(),
            checkpoint_every: CHECKPOINT_EVERY,
        },
        &source,
    )
    .await
}

/// The volume as a restore writes it: through the engine, to every replica.
pub struct VolumeSink(pub Arc<Volume>);

impl tether_backup::Sink for VolumeSink {
    fn write(&self, offset: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), BackupError>> {
        Box::pin(async move {
            self.0
                .write(offset, bytes::Bytes::from(data), false)
                .await
                .map_err(|e| volume_err(&self.0, &format!("writing at byte {offset}"), e))
        })
    }

    fn zero(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackupError>> {
        Box::pin(async move {
            self.0
                .trim(offset, len)
                .await
                .map_err(|e| volume_err(&self.0, &format!("zeroing at byte {offset}"), e))
        })
    }

    fn finish(&self) -> BoxFuture<'_, Result<(), BackupError>> {
        Box::pin(async move {
            self.0
                .flush()
                .await
                .map_err(|e| volume_err(&self.0, "flushing the restored data", e))
        })
    }

    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Option<Vec<u8>>, BackupError>> {
        Box::pin(async move {
            let bufs =
                self.0.read(offset, len as u32).await.map_err(|e| {
                    volume_err(&self.0, &format!("reading back at byte {offset}"), e)
                })?;
            Ok(Some(bufs.iter().flat_map(|b| b.iter().copied()).collect()))
        })
    }
}

/// Restores `m` over the volume `held` reserves (see [`Volume::begin_restore`]). The
/// volume grows to the backup's size if smaller. With `resume`, the volume holds
/// part of this same backup from a restore that was cut off: chunks that already
/// hold the right content are read back and skipped, not downloaded.
pub async fn restore(
    held: crate::volume::Restoring,
    target: &Target,
    keys: &Keys,
    m: &Manifest,
    concurrency: usize,
    resume: bool,
    job: Arc<Job>,
) -> Result<(), BackupError> {
    let v = held.volume();
    let size = m.header.size;
    if v.size() > size {
        return Err(BackupError::Invalid(format!(
            "volume {} is {} bytes, larger than backup {}/{} ({size} bytes); restore into a new volume",
            v.name(),
            v.size(),
            m.header.volume,
            m.header.id
        )));
    }
    if v.size() < size {
        v.expand(size)
            .await
            .map_err(|e| volume_err(v, "growing to the backup's size", e))?;
    }
    let r = v
        .first_healthy()
        .map_err(|e| volume_err(v, "choosing a replica", e))?;
    let empty = v
        .allocated(&r, "")
        .await
        .map_err(|e| volume_err(v, "mapping allocated blocks", e))?
        .is_empty();
    *job.backup.lock() = format!("{}/{}", m.header.volume, m.header.id);
    if !empty && !resume {
        // What the volume held stays at hand: a restore that fails halfway, or
        // the wrong backup restored, is undone by reverting to it.
        let keep = format!(
            "pre-restore-{}",
            tether_backup::manifest::new_id(std::time::SystemTime::now())?
        );
        v.snapshot(&keep)
            .await
            .map_err(|e| volume_err(v, "taking a snapshot of what it held", e))?;
        tracing::info!(volume = %v.name(), snapshot = %keep,
            "restore: the volume's contents before it are kept as a snapshot");
    }
    tracing::info!(volume = %v.name(), backup = %job.backup.lock(), target = %target.name(), empty,
        "restore started");
    tether_backup::apply(
        target,
        keys,
        None,
        m,
        &VolumeSink(v.clone()),
        tether_backup::ApplyOptions {
            sink_is_empty: empty,
            resume,
            concurrency,
        },
        job.progress.clone(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_of_runs() {
        // 1 MiB chunks hold 256 blocks.
        assert_eq!(
            chunks_of(&[(0, 1), (255, 257), (1024, 1025)], 1 << 20),
            vec![0, 1, 4]
        );
        assert_eq!(chunks_of(&[(10, 10)], 1 << 20), Vec::<u64>::new());
        assert_eq!(chunks_of(&[(0, 1024)], 1 << 20), vec![0, 1, 2, 3]);
    }
}
