//! Leases: how a running backup tells gc what it depends on, judged by the server's
//! clock alone.
//!
//! A backup writes `leases/VOLUME/ID/start` (naming its parent, and whether it resumes
//! a checkpoint) before it reads either, and rewrites `leases/VOLUME/ID/renewed`
//! often. gc counts a lease as live while its newest object's LastModified is younger
//! than the target's lease time. The backup measures, on its own monotonic clock,
//! that each renewal came back less than three quarters of the lease time after the
//! previous one was sent; a server time lies between a request's sending and its
//! response, so the lease was then live without a gap. Anything the backup writes
//! that gc must see (checkpoint, manifest) is written through [`Lease::put_guarded`],
//! which proves the same for that write, and deletes it again when it cannot.
//! `docs/backup.md` has the whole argument.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::error::BackupError;
use crate::target::Target;

/// What a lease's start object says.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseStart {
    /// The backup whose chunks this one reuses without uploading them.
    #[serde(default)]
    pub parent: Option<String>,
    /// Whether it reuses the chunks its volume's checkpoint names.
    #[serde(default)]
    pub resume: bool,
}

/// What a lease's renewal object says.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRenewed {
    /// The backup's manifest is written: gc marks it, and needs nothing else.
    #[serde(default)]
    pub done: bool,
}

/// A held lease, renewed by whoever holds it as it works.
#[derive(Debug)]
pub struct Lease {
    target: Target,
    what: String,
    renew_path: Path,
    ttl: Duration,
    /// When (local clock) the newest renewal that came back in time was sent.
    sent: parking_lot::Mutex<Duration>,
    renewing: tokio::sync::Mutex<()>,
    lapsed: AtomicBool,
    /// What a renewal writes: a running lease's state, or a lock's holder.
    renew_body: Vec<u8>,
}

/// The paths of backup `volume/id`'s lease: (start, renewed).
pub(crate) fn paths(target: &Target, volume: &str, id: &str) -> (Path, Path) {
    (
        target.path(&["leases", volume, id, "start"]),
        target.path(&["leases", volume, id, "renewed"]),
    )
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, BackupError> {
    serde_json::to_vec(v).map_err(|e| BackupError::Invalid(format!("encoding a lease: {e}")))
}

impl Lease {
    /// Takes the lease of backup `volume/id`; `start` says what it will rely on. Call
    /// it before reading the parent or checkpoint it names.
    pub async fn take(
        target: &Target,
        ttl: Duration,
        volume: &str,
        id: &str,
        start: &LeaseStart,
    ) -> Result<Lease, BackupError> {
        let (start_path, renew_path) = paths(target, volume, id);
        let lease = Lease {
            target: target.clone(),
            what: format!("backup {volume}/{id}"),
            renew_path,
            ttl,
            sent: parking_lot::Mutex::new(target.clock().now()),
            renewing: tokio::sync::Mutex::new(()),
            lapsed: AtomicBool::new(false),
            renew_body: json(&LeaseRenewed::default())?,
        };
        let body = json(start)?;
        lease
            .timed(|| target.put(&start_path, body, "writing a backup's lease"))
            .await?;
        Ok(lease)
    }

    /// A lock held the same way: `path` created only if absent (the caller has made
    /// sure of that) and renewed by rewriting it.
    pub(crate) fn held(
        target: &Target,
        ttl: Duration,
        what: String,
        path: Path,
        body: Vec<u8>,
    ) -> Lease {
        Lease {
            target: target.clone(),
            what,
            renew_path: path,
            ttl,
            sent: parking_lot::Mutex::new(target.clock().now()),
            renewing: tokio::sync::Mutex::new(()),
            lapsed: AtomicBool::new(false),
            renew_body: body,
        }
    }

    /// The longest a renewal may take to come back, from the sending of the one before.
    fn limit(&self) -> Duration {
        self.ttl * 3 / 4
    }

    fn lapsed_err(&self, gap: Duration) -> BackupError {
        self.lapsed.store(true, Ordering::Relaxed);
        BackupError::Lapsed(format!(
            "{}: its lease on target {} may have lapsed ({} without a renewal, the limit is {}), so gc may have counted it gone; it stopped before writing anything that relies on it. Run it again: it resumes",
            self.what,
            self.target.name(),
            humantime::format_duration(Duration::from_millis(gap.as_millis() as u64)),
            humantime::format_duration(self.limit()),
        ))
    }

    /// Fails when the lease may have lapsed.
    pub fn check(&self) -> Result<(), BackupError> {
        let gap = self.target.clock().now().saturating_sub(*self.sent.lock());
        if self.lapsed.load(Ordering::Relaxed) || gap >= self.limit() {
            return Err(self.lapsed_err(gap));
        }
        Ok(())
    }

    /// Runs the write `f` as a renewal: it counts only if it came back within the
    /// limit of the previous renewal's sending.
    async fn timed<F, Fut>(&self, f: F) -> Result<(), BackupError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), BackupError>>,
    {
        let clock = self.target.clock();
        let sent = clock.now();
        f().await?;
        let gap = clock.now().saturating_sub(*self.sent.lock());
        if gap >= self.limit() {
            return Err(self.lapsed_err(gap));
        }
        *self.sent.lock() = sent;
        Ok(())
    }

    /// Renews the lease if a quarter of its time has gone since the last renewal.
    pub async fn keep(&self) -> Result<(), BackupError> {
        self.check()?;
        let due = || self.target.clock().now().saturating_sub(*self.sent.lock()) >= self.ttl / 4;
        if !due() {
            return Ok(());
        }
        let _one = self.renewing.lock().await;
        if !due() {
            return Ok(());
        }
        self.renew().await
    }

    async fn renew(&self) -> Result<(), BackupError> {
        let what = format!("renewing the lease of {}", self.what);
        self.timed(|| {
            self.target
                .put(&self.renew_path, self.renew_body.clone(), &what)
        })
        .await
    }

    /// Writes `data` at `path` only while the lease is live: it renews first, and
    /// checks after the write came back. When that check fails, the write is deleted
    /// again, since gc may not have seen what it relies on.
    pub async fn put_guarded(
        &self,
        path: &Path,
        data: Vec<u8>,
        what: &str,
    ) -> Result<(), BackupError> {
        {
            let _one = self.renewing.lock().await;
            self.check()?;
            self.renew().await?;
        }
        self.target.put(path, data, what).await?;
        if let Err(e) = self.check() {
            if let Err(d) = self.target.delete(path, what).await {
                tracing::error!(lease = %self.what, path = %path, error = %d,
                    "a write made after its lease may have lapsed could not be deleted; delete it by hand");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Marks the backup done: gc now marks its manifest instead.
    pub async fn done(&self) -> Result<(), BackupError> {
        let body = json(&LeaseRenewed { done: true })?;
        self.target
            .put(&self.renew_path, body, "marking a backup's lease done")
            .await
    }

    /// Renews a lock's single object when due, or now with `force`.
    pub(crate) async fn renew_lock(&self, force: bool) -> Result<(), BackupError> {
        if !force {
            return self.keep().await;
        }
        self.check()?;
        let _one = self.renewing.lock().await;
        self.renew().await
    }
}
