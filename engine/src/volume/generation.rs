//! The volume's membership generation while it serves: every change of who is in
//! sync is recorded on the replicas, and counts only once a majority of the previous
//! generation's replicas stored it (the rule is `crate::membership`). Until a needed
//! change counts, nothing that depends on it is acknowledged: I/O waits up to
//! `quorum_wait`, then fails with EIO.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tether_proto::replica::io_request::Op;
use tether_proto::replica::{Away, Extent, RecordGenerationRequest};
use tokio::time::Instant;

use super::Volume;
use crate::error::VolumeError;
use crate::membership::{self, Change, Generation};

/// A generation as the wire carries it, with what changed.
pub fn to_wire(g: &Generation, cause: &str) -> tether_proto::replica::Generation {
    tether_proto::replica::Generation {
        number: g.number,
        epoch: g.epoch,
        replicas: g.replicas.iter().cloned().collect(),
        in_sync: g.in_sync.iter().cloned().collect(),
        cause: cause.to_string(),
        salvage: false,
    }
}

/// A salvage from the wire, in words.
pub fn describe_salvage(g: &tether_proto::replica::Generation) -> String {
    format!(
        "generation {} (epoch {}): {}; in sync: {}",
        g.number,
        g.epoch,
        g.cause,
        g.in_sync.join(", ")
    )
}

/// A generation from the wire.
pub fn from_wire(g: &tether_proto::replica::Generation) -> Generation {
    Generation {
        number: g.number,
        epoch: g.epoch,
        replicas: g.replicas.iter().cloned().collect(),
        in_sync: g.in_sync.iter().cloned().collect(),
    }
}

/// Who records a generation, and how long a replica may take.
pub struct Recording<'a> {
    /// The volume.
    pub volume: &'a str,
    /// The recording engine's epoch and id.
    pub epoch: u64,
    pub engine_id: u64,
    /// How long one replica may take to answer.
    pub timeout: Duration,
}

impl Recording<'_> {
    /// Sends `wire` to each of `reps` and returns the ones that stored it (or hold it or
    /// a newer one already), as soon as `enough` holds for them or every replica has
    /// answered or timed out. Replicas that have not answered by then still get it, in
    /// the background: a frozen replica must not hold up a change a majority made. A
    /// fencing refusal trips the engine's fence.
    pub async fn store(
        &self,
        reps: &[std::sync::Arc<crate::replica::ReplicaConn>],
        wire: &tether_proto::replica::Generation,
        enough: impl Fn(&BTreeSet<String>) -> bool,
    ) -> BTreeSet<String> {
        let key = from_wire(wire).key();
        let mut calls: futures::stream::FuturesUnordered<_> = reps
            .iter()
            .map(|r| {
                let req = RecordGenerationRequest {
                    volume: self.volume.to_string(),
                    epoch: self.epoch,
                    engine_id: self.engine_id,
                    generation: Some(wire.clone()),
                };
                let (r, timeout) = (r.clone(), self.timeout);
                tokio::spawn(async move {
                    let res = tokio::time::timeout(timeout, r.record_generation(req)).await;
                    let stored = match res {
                        Ok(Ok(reply)) => reply
                            .stored
                            .as_ref()
                            .is_some_and(|s| from_wire(s).key() >= key),
                        Ok(Err(s)) => {
                            r.check_fenced(&s);
                            false
                        }
                        Err(_) => false,
                    };
                    (r.addr.clone(), stored)
                })
            })
            .collect();
        let mut stored = BTreeSet::new();
        while let Some(done) = futures::StreamExt::next(&mut calls).await {
            if let Ok((addr, true)) = done {
                stored.insert(addr);
                if enough(&stored) {
                    break;
                }
            }
        }
        stored
    }
}

/// What this engine sent since its last generation that counted.
#[derive(Debug, Clone)]
pub(super) struct Uncounted {
    /// The newest: the next change builds on it, to outrank all of them.
    newest: Generation,
    /// Every replica any of them counts in sync.
    claims: BTreeSet<String>,
}

impl Volume {
    /// The generation this engine serves under.
    pub fn generation(&self) -> Option<Generation> {
        self.generation.lock().clone()
    }

    /// Every salvage in the volume's history, in words (for status).
    pub fn salvages(&self) -> &[String] {
        &self.salvages
    }

    /// Keeps the salvages in the volume's history, to show them for good.
    pub fn with_salvages(mut self, salvages: Vec<String>) -> Volume {
        self.salvages = salvages;
        self
    }

    /// Why I/O is held right now (a needed membership change does not count yet).
    pub fn io_held(&self) -> Option<String> {
        self.io_held.lock().clone()
    }

    /// Records `change` on every replica this engine knows, retrying until it counts
    /// or `quorum_wait` passes.
    pub async fn record(&self, change: Change) -> Result<(), VolumeError> {
        let _one = self.recording.lock().await;
        // Only a replica that is still counted in sync leaves now: after its drop
        // counted, a record started here would begin too late (simulation, seed 296:
        // a late second request for the same drop started a record that lacked a
        // write the replica had lost).
        if let Change::Drop(r) = &change {
            if self.in_sync_claimed().contains(r)
                && !self.replica(r).is_some_and(|c| c.is_writable())
            {
                self.send_away(r).await;
            }
        }
        let deadline = Instant::now() + self.quorum_wait;
        let mut pause = Duration::from_millis(100);
        let r = loop {
            match self.record_once(&change).await {
                Ok(()) => break Ok(()),
                // A change the rule refuses does not become possible by waiting.
                Err(e @ VolumeError::Invalid(_)) => break Err(e),
                Err(e) if Instant::now() + pause >= deadline => break Err(e),
                Err(e) => {
                    tracing::warn!(volume = %self.name, error = %e, "membership change does not count yet; I/O waits");
                    *self.io_held.lock() = Some(e.to_string());
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
            if let Err(e) = self.check_fence() {
                break Err(e);
            }
        };
        *self.io_held.lock() = None;
        r
    }

    /// Tells every replica that takes writes that `r` left the in-sync set, with what
    /// was written since the last flush every in-sync replica made (what `r` may lack
    /// or hold differently): from that point in the write stream they keep a durable
    /// record of what `r` misses, so its rebuild copies only that. Waits for their
    /// answers, so every replica that stays in sync keeps the record before the drop
    /// counts; one that cannot keep it drops it, and a rebuild from it compares
    /// everything.
    async fn send_away(&self, r: &str) {
        let copy = self.replica(r).map_or(0, |c| c.copy());
        let waiting = {
            let _seq = self.seq.lock();
            let runs = self.unflushed.lock().runs();
            self.queue_all(&Op::Away(Away {
                replica: r.to_string(),
                copy,
                unknown: runs.is_none(),
                runs: runs
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(block, count)| Extent {
                        block,
                        count,
                        allocated: true,
                    })
                    .collect(),
            }))
        };
        let timeout = self.timeout;
        let answers = futures::future::join_all(
            waiting
                .into_iter()
                .map(|(m, rx)| async move { (m, tokio::time::timeout(timeout, rx).await) }),
        )
        .await;
        for (m, answer) in answers {
            let problem = match answer {
                Ok(Ok(Ok(_))) => continue,
                Ok(Ok(Err(e))) => e.to_string(),
                Ok(Err(_)) => "connection lost".to_string(),
                Err(_) => format!("no answer within {timeout:?}"),
            };
            tracing::warn!(volume = %self.name, replica = %m.addr, away = r, error = %problem,
                "a replica keeps no record of what the dropped replica misses; its rebuild from there compares every block");
        }
    }

    async fn record_once(&self, change: &Change) -> Result<(), VolumeError> {
        let Some(counted) = self.generation() else {
            return Ok(());
        };
        // Built on the newest generation stored anywhere, counted or not: one this
        // engine stored on a minority may be adopted by a later engine, so the change
        // must outrank it (a join that did not count, then writes acknowledged without
        // the replica, lost a flushed write when a later engine adopted the join:
        // simulation, seed 12621).
        let current = match self.uncounted.lock().as_ref() {
            Some(u) if u.newest.key() > counted.key() => u.newest.clone(),
            _ => counted.clone(),
        };
        let made = match change {
            Change::Remove(r) if !current.replicas.contains(r) => current.clone(),
            // Asked for when it failed, but it takes writes again (its rebuild joined
            // since): it missed nothing that is still to be acknowledged.
            Change::Drop(r) if self.replica(r).is_some_and(|c| c.is_writable()) => return Ok(()),
            _ => membership::build_on(&counted, &current, self.epoch, change).map_err(|e| {
                VolumeError::Invalid(format!(
                    "volume {}: {change:?} cannot be made: {e}",
                    self.name
                ))
            })?,
        };
        let next = if made.in_sync == current.in_sync && made.replicas == current.replicas {
            if current.key() == counted.key() {
                return Ok(());
            }
            // The change is the uncounted generation's: make that one count.
            current.clone()
        } else {
            made
        };
        let cause = match change {
            Change::Open { .. } => "open".to_string(),
            Change::Drop(r) => format!("drop {r}"),
            Change::Join(r) => format!("join {r}"),
            Change::Add(r) => format!("add {r}"),
            Change::Remove(r) => format!("remove {r}"),
        };
        // Claimed from the moment it is sent, not once it counts: a request that a
        // replica this generation names in sync missed is not acknowledged before that
        // replica's drop (`record_drops` waits for this record to end). The claims of
        // earlier uncounted generations stay: a later engine that does not see this one
        // may adopt one of them (simulation, seed 22941: a join stored on two of four
        // replicas, then a drop of the joined replica stored on one; a write went on
        // without it, and the next engine adopted the join).
        let before = {
            let mut u = self.uncounted.lock();
            let before = u.clone();
            let mut claims = before
                .as_ref()
                .map(|b| b.claims.clone())
                .unwrap_or_default();
            claims.extend(next.in_sync.iter().cloned());
            *u = Some(Uncounted {
                newest: next.clone(),
                claims,
            });
            before
        };
        if let Change::Join(r) = change {
            // Checked after claiming, so a request acknowledged without the replica
            // either saw the claim (and waits for its drop) or failed it before this
            // check. A join recorded for a replica whose stream had ended counted it in
            // sync without a write it missed; a later engine served that write's block
            // from it alone (simulation, seed 145 with links that reach restarted
            // replicas).
            if !self.replica(r).is_some_and(|c| c.is_writable()) {
                *self.uncounted.lock() = before;
                return Err(VolumeError::Invalid(format!(
                    "volume {}: replica {r} stopped taking writes before its join was recorded; its rebuild starts again",
                    self.name
                )));
            }
        }
        let counts = |s: &BTreeSet<String>| counted.counts(s) && current.counts(s);
        let stored = self.store_everywhere(&next, &cause, counts).await;
        self.check_fence()?;
        if !counts(&stored) {
            return Err(VolumeError::Io(format!(
                "volume {}: generation {} ({cause}) is stored on {} of {}; {} are needed",
                self.name,
                next.number,
                stored.len(),
                current.replicas.len(),
                current.majority()
            )));
        }
        tracing::info!(volume = %self.name, number = next.number, %cause, in_sync = ?next.in_sync, "membership generation counts");
        self.in_sync_count
            .store(next.in_sync.len(), Ordering::SeqCst);
        *self.generation.lock() = Some(next);
        *self.uncounted.lock() = None;
        Ok(())
    }

    /// Sends `g` to every replica this engine has a connection to; returns the ones
    /// that stored it (or hold it already) once `enough` holds for them.
    async fn store_everywhere(
        &self,
        g: &Generation,
        cause: &str,
        enough: impl Fn(&BTreeSet<String>) -> bool,
    ) -> BTreeSet<String> {
        let reps = self.replicas();
        let to = Recording {
            volume: &self.name,
            epoch: self.epoch,
            engine_id: self.engine_id,
            timeout: self.timeout,
        };
        to.store(&reps, &to_wire(g, cause), enough).await
    }

    /// The replicas a generation this engine stored counts in sync: the counted one's,
    /// and those of every one sent since (a later engine may adopt any of them).
    pub fn in_sync_claimed(&self) -> BTreeSet<String> {
        let mut claimed = self.generation().map(|g| g.in_sync).unwrap_or_default();
        if let Some(u) = self.uncounted.lock().as_ref() {
            claimed.extend(u.claims.iter().cloned());
        }
        claimed
    }

    /// Records the drop of every in-sync replica that is out of service now; called
    /// before acknowledging a request that such a replica missed.
    pub(super) async fn record_drops(&self) -> Result<(), VolumeError> {
        // Cheap on the hot path: a replica is healthy only once its join counted, so
        // while as many are healthy as are in sync, they are the same ones and no drop
        // is owed (whether the volume dropped a replica or its stream ended by itself).
        if self.healthy_count() == self.in_sync_count.load(Ordering::SeqCst)
            && self.uncounted.lock().is_none()
        {
            return Ok(());
        }
        // One pass is enough: a generation claims its replicas before it is sent and a
        // join checks its replica after that, so a replica that missed this request is
        // either claimed already (and dropped here) or its join is refused.
        let claimed = self.in_sync_claimed();
        // A replica still taking writes misses nothing: that includes one whose rebuild
        // just counted and is being promoted.
        let writable: BTreeSet<String> = self
            .replicas()
            .iter()
            .filter(|r| r.is_writable())
            .map(|r| r.addr.clone())
            .collect();
        for r in claimed.difference(&writable) {
            if let Err(e) = self.record(Change::Drop(r.clone())).await {
                // Not acknowledged; the next request tries again.
                return Err(match e {
                    VolumeError::Invalid(m) => VolumeError::Io(m),
                    e => e,
                });
            }
        }
        Ok(())
    }
}
