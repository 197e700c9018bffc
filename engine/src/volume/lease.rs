//! The read lease. Fencing keeps an older engine from acknowledging writes once a
//! newer one took its epoch, but a read touches one replica, and a replica the newer
//! engine could not reach does not know it is fenced: an engine cut off with it kept
//! answering reads from it, older than writes the newer engine had acknowledged since
//! (simulation, seed 3752).
//!
//! So an engine answers a read only while a majority of the volume's replicas (the
//! current generation's) confirmed its epoch at most [`READ_LEASE`] before: a request
//! sent then came back without error. The newer engine takes its epoch on a majority,
//! which shares a replica with that one; that replica stops confirming the older epoch
//! when it takes the newer, and tells the newer engine how long before that it last
//! heard from an engine (`OpenReply.idle_ms`). The newer engine waits out what may be
//! left of the lease, plus [`LEASE_MARGIN`], before it serves ([`wait_to_serve`]). A
//! request that the replica answers is sent before it is heard, so every confirmation
//! the older engine counts lies before the time the newer one waits from.
//!
//! Writes need no lease: they are fenced on every replica they reach. An engine with
//! traffic renews its lease with the replies it gets anyway; [`keep`] pings replicas
//! that have been quiet, stale ones included (it records the current generation
//! again: the replica checks the epoch and changes nothing). A replica counts as having
//! heard an engine when a batch of I/O or a generation reaches it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tether_proto::replica::RecordGenerationRequest;
use tokio::time::Instant;

use super::generation::to_wire;
use super::Volume;
use crate::error::VolumeError;
use crate::replica::ReplicaConn;

/// How long a confirmation of this engine's epoch lets it answer reads.
pub const READ_LEASE: Duration = Duration::from_secs(2);

/// What a newer engine waits beyond the lease: clocks run at slightly different rates,
/// and the older engine checks its lease before a read, not after.
pub const LEASE_MARGIN: Duration = Duration::from_millis(250);

/// How long a newer engine waits before serving, given for each replica it took its
/// epoch on how long before that the replica last heard an older engine (`None` when
/// no older engine may hold a lease there: the volume was new or closed cleanly).
pub fn wait_to_serve(idle: impl IntoIterator<Item = Option<Duration>>) -> Duration {
    idle.into_iter()
        .flatten()
        .map(|d| (READ_LEASE + LEASE_MARGIN).saturating_sub(d))
        .max()
        .unwrap_or(Duration::ZERO)
}

impl Volume {
    /// Whether a majority of the generation's replicas confirmed this engine's epoch
    /// within the lease.
    pub fn lease_holds(&self) -> bool {
        // Every read asks: look in place, without copying the generation or the set.
        let g = self.generation.lock();
        let Some(g) = g.as_ref() else {
            // Not serving under a generation yet: no newer engine can have served
            // since (it would have recorded one).
            return true;
        };
        let now = Instant::now();
        let confirmed = self
            .replicas
            .read()
            .iter()
            .filter(|r| g.replicas.contains(&r.addr))
            .filter(|r| {
                r.confirmed()
                    .is_some_and(|t| now.saturating_duration_since(t) < READ_LEASE)
            })
            .count();
        confirmed >= g.majority()
    }

    /// Renews the lease if it ran out: pings every replica of the generation until a
    /// majority confirmed, for up to `quorum_wait`. Reads call it first.
    pub(super) async fn ensure_lease(&self) -> Result<(), VolumeError> {
        if self.lease_holds() {
            return Ok(());
        }
        let _one = self.renewing.lock().await;
        let deadline = Instant::now() + self.quorum_wait;
        loop {
            if self.lease_holds() {
                return Ok(());
            }
            self.check_fence()?;
            let mut pings: futures::stream::FuturesUnordered<_> =
                self.voters().into_iter().map(|r| self.ping(r)).collect();
            while pings.next().await.is_some() {
                if self.lease_holds() {
                    break;
                }
            }
            self.check_fence()?;
            if self.lease_holds() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let voters = self
                    .generation()
                    .map(|g| g.replicas.into_iter().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                return Err(VolumeError::Io(format!(
                    "volume {}: fewer than a majority of its replicas ({voters}) confirmed within {:?} that this engine still owns it; a newer engine may, so reads are refused rather than possibly stale. Check that the replicas are reachable from this engine",
                    self.name, self.quorum_wait
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The connections to the generation's replicas, whatever their state: a stale
    /// replica not rebuilt yet confirms the epoch as well as an in-sync one.
    fn voters(&self) -> Vec<Arc<ReplicaConn>> {
        let Some(g) = self.generation() else {
            return Vec::new();
        };
        self.replicas()
            .into_iter()
            .filter(|r| g.replicas.contains(&r.addr))
            .collect()
    }

    /// Asks `r` to confirm this engine's epoch: recording the current generation again
    /// checks the epoch and changes nothing. A fencing answer trips the fence.
    fn ping(&self, r: Arc<ReplicaConn>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let req = self.generation().map(|g| RecordGenerationRequest {
            volume: self.name.clone(),
            epoch: self.epoch,
            engine_id: self.engine_id,
            generation: Some(to_wire(&g, "lease")),
        });
        let timeout = self.timeout;
        async move {
            let Some(req) = req else { return };
            let sent = Instant::now();
            match tokio::time::timeout(timeout, r.record_generation(req)).await {
                Ok(Ok(_)) => r.confirm(sent),
                Ok(Err(s)) => r.check_fenced(&s),
                Err(_) => {}
            }
        }
    }

    /// Pings, in the background, the replicas that have not confirmed for half a
    /// lease.
    fn ping_quiet(&self) {
        let now = Instant::now();
        for r in self.voters() {
            let quiet = r
                .confirmed()
                .is_none_or(|t| now.saturating_duration_since(t) >= READ_LEASE / 2);
            if quiet {
                tokio::spawn(self.ping(r));
            }
        }
    }
}

/// Keeps the lease from running out while the engine is idle or only reads.
pub async fn keep(vol: Arc<Volume>) {
    loop {
        tokio::time::sleep(READ_LEASE / 4).await;
        if vol.is_fenced() {
            return;
        }
        vol.ping_quiet();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_engine_waits_out_the_longest_lease_left() {
        let full = READ_LEASE + LEASE_MARGIN;
        assert_eq!(wait_to_serve([]), Duration::ZERO);
        assert_eq!(wait_to_serve([None, None]), Duration::ZERO);
        assert_eq!(wait_to_serve([Some(Duration::ZERO)]), full);
        assert_eq!(
            wait_to_serve([
                Some(Duration::from_secs(60)),
                Some(Duration::from_millis(500))
            ]),
            full - Duration::from_millis(500)
        );
        assert_eq!(
            wait_to_serve([Some(Duration::from_secs(60))]),
            Duration::ZERO
        );
    }
}
