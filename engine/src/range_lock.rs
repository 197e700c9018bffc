//! Exclusive locks on block ranges: a write holds its blocks from its read-modify-write
//! until every replica acknowledged it, so no other write to those blocks interleaves.

use parking_lot::Mutex;
use tokio::sync::Notify;

/// A table of held block ranges.
#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Held>,
    released: Notify,
}

#[derive(Default)]
struct Held {
    /// (start, end, id) of each held range.
    ranges: Vec<(u64, u64, u64)>,
    next_id: u64,
}

/// Holds `[start, end)` until dropped.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    /// Waits until `[start, end)` overlaps no held range, then holds it.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            // Register for wake-ups before checking, so a release in between is seen.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut h = self.held.lock();
                if !h.ranges.iter().any(|&(s, e, _)| s < end && start < e) {
                    h.next_id += 1;
                    let id = h.next_id;
                    h.ranges.push((start, end, id));
                    return RangeGuard { lock: self, id };
                }
            }
            notified.await;
        }
    }

    /// Number of ranges held (for tests).
    pub fn held(&self) -> usize {
        self.held.lock().ranges.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.lock.held.lock();
        if let Some(i) = g.ranges.iter().position(|&(_, _, id)| id == self.id) {
            g.ranges.swap_remove(i);
        }
        drop(g);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_do_not() {
        let lock = Arc::new(RangeLock::default());
        let g = lock.lock(0, 4).await;
        let _other = lock.lock(4, 8).await;
        let l2 = lock.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(3, 5).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g);
        drop(_other);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lock.held(), 0);
    }
}
