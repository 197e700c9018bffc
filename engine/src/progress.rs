//! How far each rebuild has come, and when a failed replica is tried next: state the
//! volume core keeps (it registers rebuilds under the same lock as membership
//! changes) and the rebuild updates. Apart from both, so neither imports the other
//! for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tether_proto::wire::BLOCK_SIZE;
use tokio::time::Instant;

/// How far a rebuild has come, for `tether volume status`.
pub struct Progress {
    /// Blocks to compare in all phases.
    pub total: AtomicU64,
    /// Blocks compared so far.
    pub done: AtomicU64,
    /// Bytes copied so far.
    pub copied: AtomicU64,
    /// What it is doing now.
    pub phase: Mutex<String>,
    /// When it started.
    pub started: Instant,
    /// Set when the operator removes the replica: the rebuild stops and never joins it.
    cancelled: std::sync::atomic::AtomicBool,
}

impl Default for Progress {
    fn default() -> Progress {
        Progress::new()
    }
}

impl Progress {
    /// A rebuild about to start.
    pub fn new() -> Progress {
        Progress {
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            phase: Mutex::new("connecting".into()),
            started: Instant::now(),
            cancelled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Stops the rebuild at its next step; it will not join the replica.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Whether the operator removed the replica being rebuilt.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Fails with why when the operator removed the replica being rebuilt.
    pub fn check(&self, addr: &str) -> Result<(), String> {
        if self.is_cancelled() {
            return Err(format!("replica {addr} was removed by the operator"));
        }
        Ok(())
    }

    /// Bytes compared per second so far.
    pub fn rate(&self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        self.done.load(Ordering::Relaxed) as f64 * BLOCK_SIZE as f64 / secs
    }

    /// Seconds left at the current rate.
    pub fn eta(&self) -> u64 {
        let left = self
            .total
            .load(Ordering::Relaxed)
            .saturating_sub(self.done.load(Ordering::Relaxed));
        let rate = self.rate();
        if rate <= 0.0 {
            0
        } else {
            (left as f64 * BLOCK_SIZE as f64 / rate) as u64
        }
    }
}

/// The first pause before a failed replica is tried again.
const RETRY_FIRST: Duration = Duration::from_secs(2);
/// The longest pause between two attempts at a replica that keeps failing.
const RETRY_MAX: Duration = Duration::from_secs(64);

/// When a failed replica is tried next, for `tether volume status`.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// The next attempt starts at this moment.
    pub next: Instant,
    /// The pause after the next failed attempt that reaches the replica.
    pub delay: Duration,
    /// Failed attempts in a row.
    pub attempts: u32,
}

impl Retry {
    /// A replica first seen out at `now`: tried after the first pause.
    pub fn first(now: Instant) -> Retry {
        Retry {
            next: now + RETRY_FIRST,
            delay: RETRY_FIRST,
            attempts: 0,
        }
    }

    /// An attempt failed at `now`. A replica that answered (`reached`) and still
    /// failed waits the current pause, which then doubles up to `RETRY_MAX`: a disk
    /// that keeps failing is not rebuilt every two seconds. One that did not answer
    /// costs nothing to ask again soon.
    pub fn failed(&mut self, now: Instant, reached: bool) {
        self.attempts += 1;
        if reached {
            self.next = now + self.delay;
            self.delay = (self.delay * 2).min(RETRY_MAX);
        } else {
            self.next = now + RETRY_FIRST;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_for_a_replica_that_answers_and_stay_short_for_one_that_does_not() {
        let t0 = Instant::now();
        let mut r = Retry::first(t0);
        assert_eq!(r.next, t0 + RETRY_FIRST);
        let mut waits = Vec::new();
        for _ in 0..8 {
            r.failed(t0, true);
            waits.push((r.next - t0).as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 64, 64]);
        r.failed(t0, false);
        assert_eq!(r.next, t0 + RETRY_FIRST);
        assert_eq!(r.attempts, 9);
    }
}
