//! Administration of a volume: snapshots (create, revert, delete) and expansion,
//! each one cut through the write stream on every healthy replica.

use std::sync::atomic::Ordering;

use tether_proto::replica::{
    io_request::Op, DeleteSnapshotRequest, Expand, Revert, Snapshot, SnapshotsReply,
    SnapshotsRequest,
};

use super::{Volume, BLOCK};
use crate::error::VolumeError;
use crate::replica::ReplicaError;

impl Volume {
    /// Snapshots and space, as one healthy replica sees them.
    pub async fn space(&self) -> Result<SnapshotsReply, VolumeError> {
        let r = self.first_healthy()?;
        let req = SnapshotsRequest {
            volume: self.name.clone(),
        };
        let reply = self.ask(&r, r.snapshots(req)).await?;
        *self.snapshot_names.lock() = reply.snapshots.iter().map(|s| s.name.clone()).collect();
        Ok(reply)
    }

    /// Whether snapshot `name` exists (from the last listing).
    pub fn has_snapshot(&self, name: &str) -> bool {
        self.snapshot_names.lock().iter().any(|n| n == name)
    }

    pub(super) fn require_snapshot(&self, name: &str) -> Result<(), VolumeError> {
        if self.has_snapshot(name) {
            Ok(())
        } else {
            Err(VolumeError::Invalid(format!(
                "volume {}: no snapshot named {name}",
                self.name
            )))
        }
    }

    /// Snapshot names (from the last listing).
    pub fn snapshot_names(&self) -> Vec<String> {
        self.snapshot_names.lock().clone()
    }

    /// Refuses chain-changing operations while a rebuild copies the chain.
    pub(super) fn no_rebuild(&self, what: &str) -> Result<(), VolumeError> {
        let r = self.rebuilds.lock();
        match r.keys().next() {
            Some(addr) => Err(VolumeError::Invalid(format!(
                "volume {}: replica {addr} is rebuilding; {what} after it finishes (see tether volume status)",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// Takes snapshot `name` on every replica at the same point of the write stream.
    pub async fn snapshot(&self, name: &str) -> Result<(), VolumeError> {
        self.no_rebuild("take the snapshot")?;
        if self.has_snapshot(name) {
            return Err(VolumeError::Invalid(format!(
                "volume {}: a snapshot named {name} already exists",
                self.name
            )));
        }
        let _cut = self.gate.write().await;
        let waiting = self.submit_ordered(|seq| {
            Op::Snapshot(Snapshot {
                seq,
                name: name.to_string(),
            })
        });
        let r = self.wait_all_ops(waiting).await;
        let _ = self.space().await;
        r
    }

    /// Makes the volume's contents those of snapshot `name`; refused while attached.
    pub async fn revert(&self, name: &str) -> Result<(), VolumeError> {
        self.no_rebuild("revert")?;
        let _cut = self.gate.write().await;
        let n = self.attached();
        if n > 0 {
            return Err(VolumeError::Invalid(format!(
                "volume {}: {n} NBD client(s) attached; detach them before reverting (their caches would go stale)",
                self.name
            )));
        }
        self.require_snapshot(name)?;
        let waiting = self.submit_unsequenced(Op::Revert(Revert {
            name: name.to_string(),
        }));
        self.wait_all_ops(waiting).await
    }

    /// Deletes snapshot `name` on every healthy replica; I/O continues meanwhile.
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), VolumeError> {
        self.no_rebuild("delete the snapshot")?;
        self.require_snapshot(name)?;
        let reps = self.replicas();
        let calls = reps.iter().filter(|r| r.is_healthy()).map(|r| {
            let req = DeleteSnapshotRequest {
                volume: self.name.clone(),
                epoch: self.epoch,
                name: name.to_string(),
            };
            async move { (r, r.delete_snapshot(req).await) }
        });
        let mut ok = 0;
        let mut last = String::new();
        for (r, res) in futures::future::join_all(calls).await {
            match res {
                Ok(_) => ok += 1,
                Err(s) => {
                    let e = ReplicaError::from_status(&r.addr, &s);
                    last = e.to_string();
                    self.fail_err(r, &e, &format!("deleting snapshot {name} failed: "));
                }
            }
        }
        self.check_fence()?;
        let _ = self.space().await;
        if ok == 0 {
            return Err(VolumeError::Io(format!(
                "volume {}: deleting snapshot {name} failed: {last}",
                self.name
            )));
        }
        Ok(())
    }

    /// Grows the volume; clients see the new size when they reconnect.
    pub async fn expand(&self, size: u64) -> Result<u64, VolumeError> {
        let _cut = self.gate.write().await;
        let cur = self.size.load(Ordering::Acquire);
        if size < cur {
            return Err(VolumeError::Invalid(format!(
                "volume {}: cannot shrink from {cur} to {size} bytes; shrinking is not supported",
                self.name
            )));
        }
        if !size.is_multiple_of(BLOCK) {
            return Err(VolumeError::Invalid(format!(
                "volume {}: size {size} is not a multiple of {BLOCK}",
                self.name
            )));
        }
        let waiting = self.submit_unsequenced(Op::Expand(Expand { size }));
        self.wait_all_ops(waiting).await?;
        self.size.store(size, Ordering::Release);
        tracing::info!(volume = %self.name, size, "volume expanded; clients see it on reconnect");
        Ok(size)
    }
}
