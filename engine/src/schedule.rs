//! Schedules: when snapshots, backups and gc run, and what retention removes. Pure
//! decisions on names and times, with no I/O, so the engine runs them now and the
//! control plane can run the same ones later (`scheduler.rs` is the engine's loop).
//!
//! The one rule that keeps backups incremental: the snapshot the next backup diffs
//! from (the latest backup's) is never deleted, and older backup snapshots go only
//! once a newer backup has completed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Prefix of the snapshots a snapshot schedule takes.
pub const SNAPSHOT_PREFIX: &str = "sched-";
/// Label a scheduled backup carries, so retention removes only those.
pub const BACKUP_LABEL: (&str, &str) = ("schedule", "auto");

/// One recurring job: how often, and how many of its results to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Every {
    /// Time between runs.
    pub every: Duration,
    /// Results kept (at least 1).
    pub keep: usize,
}

/// What an engine runs by itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Snapshots named `sched-TIME`.
    pub snapshots: Option<Every>,
    /// Backups labelled `schedule=auto`.
    pub backups: Option<Every>,
    /// Garbage collection of the backup target.
    pub gc: Option<Duration>,
}

impl Policy {
    /// Whether anything is scheduled.
    pub fn is_empty(&self) -> bool {
        self.snapshots.is_none() && self.backups.is_none() && self.gc.is_none()
    }
}

/// When a job runs next: `every` after its last run, or `every` after the engine
/// started when it has not run (a last run longer ago than that is due at once).
pub fn next_run(every: Duration, last: Option<SystemTime>, started: SystemTime) -> SystemTime {
    match last {
        Some(l) => l + every,
        None => started + every,
    }
}

/// The name of a scheduled snapshot taken at `t`: `sched-20261202T180000Z`.
pub fn snapshot_name(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    let compact: String = s.chars().filter(|c| *c != '-' && *c != ':').collect();
    format!("{SNAPSHOT_PREFIX}{compact}")
}

/// The time a scheduled snapshot's name carries.
pub fn snapshot_time(name: &str) -> Option<SystemTime> {
    let t = name.strip_prefix(SNAPSHOT_PREFIX)?;
    if t.len() != 16 || !t.is_ascii() {
        return None;
    }
    let s = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &t[0..4],
        &t[4..6],
        &t[6..8],
        &t[9..11],
        &t[11..13],
        &t[13..15]
    );
    humantime::parse_rfc3339(&s).ok()
}

/// The scheduled snapshots beyond the newest `keep`, oldest first: the ones to delete.
/// Other snapshots are not the schedule's to touch.
pub fn snapshots_to_delete(names: &[String], keep: usize) -> Vec<String> {
    let mut sched: Vec<(SystemTime, &String)> = names
        .iter()
        .filter_map(|n| snapshot_time(n).map(|t| (t, n)))
        .collect();
    sched.sort();
    let extra = sched.len().saturating_sub(keep.max(1));
    sched[..extra].iter().map(|(_, n)| (*n).clone()).collect()
}

/// A backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupEntry {
    /// Its id (ids sort by time).
    pub id: String,
    /// Made by the schedule.
    pub scheduled: bool,
}

/// The scheduled backups beyond the newest `keep`, oldest first; never `latest`
/// (the base of the next incremental) and never one that is not scheduled.
pub fn backups_to_remove(
    backups: &[BackupEntry],
    keep: usize,
    latest: Option<&str>,
) -> Vec<String> {
    let mut sched: Vec<&BackupEntry> = backups.iter().filter(|b| b.scheduled).collect();
    sched.sort_by(|a, b| a.id.cmp(&b.id));
    let extra = sched.len().saturating_sub(keep.max(1));
    sched[..extra]
        .iter()
        .filter(|b| Some(b.id.as_str()) != latest)
        .map(|b| b.id.clone())
        .collect()
}

/// A snapshot as the volume lists it: name and write sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Its name.
    pub name: String,
    /// The write sequence it was taken at.
    pub seq: u64,
}

/// Backup snapshots (`prefix…`) older than the one the latest completed backup read:
/// no incremental diffs from them any more. `snapshots` is the volume's list, oldest
/// first (two snapshots with no write between them share a sequence, so the order
/// is the list's). The latest backup's snapshot stays, and so does any newer one (a
/// backup running, or interrupted and to be resumed). With no completed backup
/// known, nothing goes.
pub fn backup_snapshots_to_delete(
    snapshots: &[SnapshotEntry],
    prefix: &str,
    latest_backup_snapshot: Option<&SnapshotEntry>,
) -> Vec<String> {
    let Some(base) = latest_backup_snapshot else {
        return Vec::new();
    };
    // The base must be the very snapshot the volume holds, or nothing is known.
    let Some(at) = snapshots.iter().position(|s| s == base) else {
        return Vec::new();
    };
    snapshots[..at]
        .iter()
        .filter(|s| s.name.starts_with(prefix))
        .map(|s| s.name.clone())
        .collect()
}

/// Seconds since the Unix epoch.
pub fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn snapshot_names_carry_their_time() {
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let n = snapshot_name(t);
        assert_eq!(n, "sched-20270115T080000Z");
        assert_eq!(snapshot_time(&n), Some(t));
        assert_eq!(snapshot_time("sched-x"), None);
        assert_eq!(snapshot_time("backup-20270115T080000Z"), None);
    }

    #[test]
    fn retention_keeps_the_newest_scheduled_snapshots_only() {
        let t = |s: u64| snapshot_name(UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s));
        let names = vec![t(30), "mine".into(), t(10), t(20), t(40)];
        assert_eq!(snapshots_to_delete(&names, 2), vec![t(10), t(20)]);
        assert_eq!(snapshots_to_delete(&names, 9), Vec::<String>::new());
        // keep 0 means keep 1: the schedule never deletes what it just took.
        assert_eq!(snapshots_to_delete(&names, 0).len(), 3);
    }

    #[test]
    fn backup_retention_spares_manual_backups_and_the_latest() {
        let b = |id: &str, scheduled| BackupEntry {
            id: id.into(),
            scheduled,
        };
        let all = vec![b("1", true), b("2", false), b("3", true), b("4", true)];
        assert_eq!(backups_to_remove(&all, 2, Some("4")), vec!["1".to_string()]);
        // The latest is never removed, even when older than what the count keeps.
        assert_eq!(backups_to_remove(&all, 1, Some("3")), vec!["1".to_string()]);
    }

    #[test]
    fn backup_snapshots_go_only_below_the_latest_backups() {
        let s = |name: &str, seq| SnapshotEntry {
            name: name.into(),
            seq,
        };
        let snaps = vec![
            s("backup-a", 5),
            s("sched-x", 6),
            s("backup-b", 9),
            s("backup-c", 12),
        ];
        assert_eq!(
            backup_snapshots_to_delete(&snaps, "backup-", Some(&s("backup-b", 9))),
            vec!["backup-a".to_string()]
        );
        // A base the volume does not hold (deleted, or reused name): nothing goes.
        assert!(backup_snapshots_to_delete(&snaps, "backup-", Some(&s("backup-b", 8))).is_empty());
        assert!(backup_snapshots_to_delete(&snaps, "backup-", None).is_empty());
    }

    #[derive(Debug, Clone)]
    enum Event {
        /// A backup starts: takes a snapshot.
        Start,
        /// The running backup completes.
        Complete,
        /// It fails (its snapshot stays, to be resumed).
        Fail,
        /// Retention runs.
        Retain,
    }

    proptest! {
        /// Whatever happens, retention never deletes the snapshot of the latest
        /// completed backup, nor that of a backup running or to be resumed.
        #[test]
        fn retention_never_breaks_the_incremental_chain(events in proptest::collection::vec(
            prop_oneof![Just(Event::Start), Just(Event::Complete), Just(Event::Fail), Just(Event::Retain)],
            0..60,
        )) {
            let mut snaps: Vec<SnapshotEntry> = Vec::new();
            let mut seq = 0u64;
            let mut latest: Option<SnapshotEntry> = None;
            let mut running: Option<SnapshotEntry> = None;
            let mut interrupted: Option<SnapshotEntry> = None;
            for e in events {
                match e {
                    Event::Start if running.is_none() => {
                        // A resumed backup reuses its snapshot.
                        let s = interrupted.take().unwrap_or_else(|| {
                            seq += 1;
                            let s = SnapshotEntry { name: format!("backup-{seq}"), seq };
                            snaps.push(s.clone());
                            s
                        });
                        running = Some(s);
                    }
                    Event::Complete => {
                        if let Some(s) = running.take() {
                            latest = Some(s);
                        }
                    }
                    Event::Fail => interrupted = running.take().or(interrupted),
                    Event::Retain => {
                        let gone = backup_snapshots_to_delete(&snaps, "backup-", latest.as_ref());
                        for keep in [&latest, &running, &interrupted].into_iter().flatten() {
                            prop_assert!(!gone.contains(&keep.name), "{} deleted", keep.name);
                        }
                        snaps.retain(|s| !gone.contains(&s.name));
                    }
                    _ => {}
                }
            }
        }
    }
}
