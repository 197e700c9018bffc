//! Progress of a backup, restore or verify, shared between the task doing it and
//! whoever reports it (the engine's status, the CLI's bar).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counters of a running operation; all bytes are plaintext unless named otherwise.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    /// Bytes the operation will go through.
    pub total: AtomicU64,
    /// Bytes gone through so far.
    pub done: AtomicU64,
    /// Objects written (backup) or read (restore, verify).
    pub objects: AtomicU64,
    /// Bytes of those objects.
    pub object_bytes: AtomicU64,
}

impl Default for Progress {
    fn default() -> Progress {
        Progress {
            started: Instant::now(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            objects: AtomicU64::new(0),
            object_bytes: AtomicU64::new(0),
        }
    }
}

/// A reading of [`Progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Bytes to go through.
    pub total: u64,
    /// Bytes gone through.
    pub done: u64,
    /// Objects written or read.
    pub objects: u64,
    /// Their bytes.
    pub object_bytes: u64,
    /// Bytes per second so far.
    pub rate: u64,
    /// Seconds left at that rate.
    pub eta: u64,
    /// Milliseconds since it started.
    pub millis: u64,
}

impl Progress {
    /// Adds `n` to what was gone through.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one object of `bytes`.
    pub fn object(&self, bytes: u64) {
        self.objects.fetch_add(1, Ordering::Relaxed);
        self.object_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Reads the counters, with a rate and an ETA.
    pub fn read(&self) -> Snapshot {
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed);
        let millis = self.started.elapsed().as_millis() as u64;
        let rate = done.saturating_mul(1000).checked_div(millis).unwrap_or(0);
        Snapshot {
            total,
            done,
            objects: self.objects.load(Ordering::Relaxed),
            object_bytes: self.object_bytes.load(Ordering::Relaxed),
            rate,
            eta: total.saturating_sub(done).checked_div(rate).unwrap_or(0),
            millis,
        }
    }
}
