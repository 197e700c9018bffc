//! The engine's loop over its schedules (`schedule.rs` decides; this runs): scheduled
//! snapshots with retention, scheduled backups with retention of backups and of the
//! snapshots no incremental needs any more, and gc of the target.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tether_backup::{GcOptions, GcProgress, Keys, Target};
use tether_proto::engine::ScheduledJob;

use crate::backup::{BackupArgs, Job, SNAPSHOT_PREFIX as BACKUP_SNAPSHOT_PREFIX};
use crate::schedule::{self, BackupEntry, Policy, SnapshotEntry};
use crate::volume::Volume;

/// The backup or restore running in the engine, or the last one; one at a time.
pub type JobSlot = Arc<Mutex<Option<Arc<Job>>>>;

/// Puts `job` in `slot` unless another is running; the error names that one.
pub fn start_job(slot: &JobSlot, volume: &str, job: &Arc<Job>) -> Result<(), String> {
    let mut cur = slot.lock();
    if let Some(j) = cur.as_ref().filter(|j| !j.finished()) {
        return Err(format!(
            "volume {volume}: a {} ({}) is already running; wait for it (`tether volume status`)",
            j.operation,
            j.backup.lock()
        ));
    }
    *cur = Some(job.clone());
    Ok(())
}

/// What a schedule needs: the policy, and the backup target for backups and gc.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// When what runs.
    pub policy: Policy,
    /// The target and its keys (needed for backups and gc).
    pub target: Option<(Target, Keys)>,
}

/// One job's state.
#[derive(Debug, Clone)]
struct JobState {
    name: &'static str,
    every: Duration,
    keep: usize,
    last: Option<SystemTime>,
    outcome: String,
}

impl JobState {
    fn new(name: &'static str, every: Duration, keep: usize, last: Option<SystemTime>) -> JobState {
        JobState {
            name,
            every,
            keep,
            last,
            outcome: String::new(),
        }
    }
}

/// What status shows of the schedules.
#[derive(Debug, Default)]
pub struct Status {
    started: Option<SystemTime>,
    jobs: Vec<JobState>,
    newest_backup: Option<SystemTime>,
}

/// Shared between the loop and the control API.
pub type StatusSlot = Arc<Mutex<Status>>;

/// The schedules as the control API reports them, and the newest backup's age.
pub fn report(slot: &StatusSlot) -> (Vec<ScheduledJob>, i64) {
    let s = slot.lock();
    let now = SystemTime::now();
    let ago = |t: SystemTime| {
        now.duration_since(t)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    };
    let jobs = s
        .jobs
        .iter()
        .map(|j| {
            let next = schedule::next_run(j.every, j.last, s.started.unwrap_or(now));
            ScheduledJob {
                job: j.name.into(),
                every_seconds: j.every.as_secs(),
                keep: j.keep as u64,
                last_seconds_ago: j.last.map_or(-1, ago),
                last_outcome: j.outcome.clone(),
                next_in_seconds: next.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
            }
        })
        .collect();
    (jobs, s.newest_backup.map_or(-1, ago))
}

/// Runs `sched` over `v` until the engine stops.
pub async fn run(v: Arc<Volume>, sched: Schedule, jobs: JobSlot, status: StatusSlot) {
    let vol = v.name().to_string();
    let started = SystemTime::now();
    // Last runs from what exists: the newest scheduled snapshot, the newest backup.
    let last_snapshot = v
        .snapshot_names()
        .iter()
        .filter_map(|n| schedule::snapshot_time(n))
        .max();
    let newest_backup = match &sched.target {
        Some((t, _)) => match t.latest(&vol).await {
            Ok(id) => id
                .as_deref()
                .and_then(tether_backup::manifest::id_millis)
                .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
            Err(e) => {
                tracing::warn!(volume = %vol, error = %e, "schedule: cannot read the latest backup");
                None
            }
        },
        None => None,
    };
    {
        let mut s = status.lock();
        s.started = Some(started);
        s.newest_backup = newest_backup;
        let p = &sched.policy;
        if let Some(e) = p.snapshots {
            s.jobs
                .push(JobState::new("snapshot", e.every, e.keep, last_snapshot));
        }
        if let Some(e) = p.backups {
            s.jobs
                .push(JobState::new("backup", e.every, e.keep, newest_backup));
        }
        if let Some(e) = p.gc {
            s.jobs.push(JobState::new("gc", e, 0, None));
        }
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let due: Vec<usize> = {
            let s = status.lock();
            let now = SystemTime::now();
            s.jobs
                .iter()
                .enumerate()
                .filter(|(_, j)| schedule::next_run(j.every, j.last, started) <= now)
                .map(|(i, _)| i)
                .collect()
        };
        for i in due {
            let name = status.lock().jobs[i].name;
            let keep = status.lock().jobs[i].keep;
            let ran_at = SystemTime::now();
            let r = match name {
                "snapshot" => snapshot(&v, keep).await,
                "backup" => match backup(&v, &sched, &jobs, keep).await {
                    Ok(Some(t)) => {
                        status.lock().newest_backup = Some(t);
                        Ok(())
                    }
                    // Another backup or restore runs: try again at the next tick.
                    Ok(None) => continue,
                    Err(e) => Err(e),
                },
                _ => gc(&sched).await,
            };
            if let Err(e) = &r {
                tracing::warn!(volume = %vol, job = name, error = %e, "scheduled job failed");
            }
            let mut s = status.lock();
            s.jobs[i].last = Some(ran_at);
            s.jobs[i].outcome = r.err().unwrap_or_else(|| "ok".into());
        }
    }
}

async fn snapshot(v: &Volume, keep: usize) -> Result<(), String> {
    let name = schedule::snapshot_name(SystemTime::now());
    v.snapshot(&name)
        .await
        .map_err(|e| format!("taking snapshot {name}: {e}"))?;
    tracing::info!(volume = %v.name(), snapshot = %name, "scheduled snapshot taken");
    for old in schedule::snapshots_to_delete(&v.snapshot_names(), keep) {
        v.delete_snapshot(&old)
            .await
            .map_err(|e| format!("deleting snapshot {old} (retention): {e}"))?;
        tracing::info!(volume = %v.name(), snapshot = %old, "scheduled snapshot expired");
    }
    Ok(())
}

/// Runs a scheduled backup and its retention; the backup's snapshot time, or `None`
/// when another backup or restore holds the engine.
async fn backup(
    v: &Arc<Volume>,
    sched: &Schedule,
    jobs: &JobSlot,
    keep: usize,
) -> Result<Option<SystemTime>, String> {
    let Some((target, keys)) = &sched.target else {
        return Err("no backup target".into());
    };
    let vol = v.name().to_string();
    let job = Job::new("backup", target.name().to_string());
    if start_job(jobs, &vol, &job).is_err() {
        return Ok(None);
    }
    let args = BackupArgs {
        target: target.clone(),
        keys: keys.clone(),
        snapshot: None,
        labels: [(
            schedule::BACKUP_LABEL.0.to_string(),
            schedule::BACKUP_LABEL.1.to_string(),
        )]
        .into(),
        concurrency: crate::backup::CONCURRENCY,
    };
    let r = crate::backup::backup(v.clone(), args, job.clone()).await;
    job.finish(
        &r.as_ref()
            .map(drop)
            .map_err(|e| tether_backup::BackupError::Volume(e.to_string())),
    );
    let m = r.map_err(|e| e.to_string())?;
    let taken = SystemTime::UNIX_EPOCH + Duration::from_secs(m.header.created);
    tracing::info!(volume = %vol, backup = %m.header.id, "scheduled backup complete");
    // Retention of backups: scheduled ones beyond `keep`, never the latest.
    let ids = target.list(Some(&vol)).await.map_err(|e| e.to_string())?;
    let mut entries = Vec::new();
    for (_, id) in ids {
        let scheduled = match target.manifest(keys, &vol, &id).await {
            Ok(b) => {
                b.header
                    .labels
                    .get(schedule::BACKUP_LABEL.0)
                    .map(String::as_str)
                    == Some(schedule::BACKUP_LABEL.1)
            }
            Err(_) => false,
        };
        entries.push(BackupEntry { id, scheduled });
    }
    for id in schedule::backups_to_remove(&entries, keep, Some(&m.header.id)) {
        target
            .remove(&vol, &id)
            .await
            .map_err(|e| format!("removing backup {vol}/{id} (retention): {e}"))?;
        tracing::info!(volume = %vol, backup = %id, "scheduled backup expired");
    }
    // Snapshots older than the one this backup read serve no incremental now.
    let space = v.space().await.map_err(|e| e.to_string())?;
    let snaps: Vec<SnapshotEntry> = space
        .snapshots
        .iter()
        .map(|s| SnapshotEntry {
            name: s.name.clone(),
            seq: s.seq,
        })
        .collect();
    let base = SnapshotEntry {
        name: m.header.snapshot.clone(),
        seq: m.header.snapshot_seq,
    };
    for s in schedule::backup_snapshots_to_delete(&snaps, BACKUP_SNAPSHOT_PREFIX, Some(&base)) {
        v.delete_snapshot(&s)
            .await
            .map_err(|e| format!("deleting backup snapshot {s}: {e}"))?;
        tracing::info!(volume = %vol, snapshot = %s, "an older backup's snapshot deleted");
    }
    Ok(Some(taken))
}

async fn gc(sched: &Schedule) -> Result<(), String> {
    let Some((target, keys)) = &sched.target else {
        return Err("no backup target".into());
    };
    let cfg = target.config().await.map_err(|e| e.to_string())?;
    let r = tether_backup::gc(
        target,
        keys,
        &cfg,
        &GcOptions::default(),
        &GcProgress::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!(target = %target.name(), deleted = r.deleted, "scheduled gc complete");
    match r.skipped {
        Some(why) => Err(format!("swept nothing: {why}")),
        None => Ok(()),
    }
}
