//! The operator's steps: snapshots taken, deleted and reverted to, the volume grown,
//! replicas added and removed, each through a serving engine while the faults go on.

use std::sync::Arc;

use tether_engine::membership::Change;
use tether_engine::volume::Volume;

use super::World;

/// How much an expansion grows the volume.
const GROWTH: u64 = 1 << 20;

impl World {
    /// One operator step, chosen by the seed, through a serving engine.
    pub(super) fn admin(&mut self) {
        let serving = self.serving();
        let Some((_, inc, vol)) = self.rng.pick(&serving).cloned() else {
            return;
        };
        match self.rng.below(100) {
            0..=29 => self.take_snapshot(inc, vol),
            30..=49 => self.delete_snapshot(inc, vol),
            50..=59 => self.revert(inc, vol),
            60..=64 => self.expand(inc, vol),
            65..=82 => self.add_replica(inc, vol),
            _ => self.remove_replica(inc, vol),
        }
    }

    /// Runs `op` as the operator's request `what`: the auditor waits for it like a
    /// client's, and its outcome goes into the trace.
    fn operate<F, T>(&mut self, what: String, op: F) -> u64
    where
        F: std::future::Future<Output = Result<T, String>> + Send + 'static,
    {
        self.next_id += 1;
        let id = self.next_id;
        let shared = self.shared.clone();
        shared.audit.lock().other_sent(id, what.clone());
        shared.log(format!("operator {id}: {what}"));
        tokio::spawn(async move {
            let outcome = match op.await {
                Ok(_) => "done".to_string(),
                Err(e) => format!("failed: {e}"),
            };
            shared.audit.lock().request_done(id);
            shared.log(format!("operator {id} {outcome}"));
        });
        id
    }

    fn take_snapshot(&mut self, inc: usize, vol: Arc<Volume>) {
        self.snapshots += 1;
        let name = format!("s{}", self.snapshots);
        self.fault("snapshot create");
        let what = format!("snapshot {name} through engine {inc}");
        self.operate(what, async move {
            vol.snapshot(&name).await.map_err(|e| kind(&e))
        });
    }

    fn delete_snapshot(&mut self, inc: usize, vol: Arc<Volume>) {
        let names = vol.snapshot_names();
        let Some(name) = self.rng.pick(&names).cloned() else {
            return;
        };
        self.fault("snapshot delete");
        let what = format!("delete snapshot {name} through engine {inc}");
        self.operate(what, async move {
            vol.delete_snapshot(&name).await.map_err(|e| kind(&e))
        });
    }

    /// Reverts while no client request is in flight, and holds new ones back until it
    /// ends (an operator detaches the clients first; the engine refuses otherwise).
    fn revert(&mut self, inc: usize, vol: Arc<Volume>) {
        let names = vol.snapshot_names();
        let Some(name) = self.rng.pick(&names).cloned() else {
            return;
        };
        if self.shared.audit.lock().in_flight() > 0 || *self.reverting.lock() {
            return;
        }
        self.fault("snapshot revert");
        *self.reverting.lock() = true;
        let (shared, reverting) = (self.shared.clone(), self.reverting.clone());
        let what = format!("revert to snapshot {name} through engine {inc}");
        self.operate(what, async move {
            let r = vol.revert(&name).await.map_err(|e| kind(&e));
            // Done or not, on some replicas or all: what the cells held before may be
            // back. Reads from here on are checked against later writes only.
            shared.audit.lock().reverted();
            *reverting.lock() = false;
            r
        });
    }

    fn expand(&mut self, inc: usize, vol: Arc<Volume>) {
        let size = vol.size() + GROWTH;
        self.fault("expand");
        // Later engines take the size the replicas have.
        self.expanded
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let what = format!("expand to {size} bytes through engine {inc}");
        self.operate(
            what,
            async move { vol.expand(size).await.map_err(|e| kind(&e)) },
        );
    }

    /// Adds a replica that is not one of the volume's: the engine rebuilds it, and the
    /// operator lists it for every later engine.
    fn add_replica(&mut self, inc: usize, vol: Arc<Volume>) {
        let Some(g) = vol.generation() else { return };
        let spare: Vec<String> = self
            .addrs
            .iter()
            .filter(|a| !g.replicas.contains(*a))
            .cloned()
            .collect();
        let Some(addr) = self.rng.pick(&spare).cloned() else {
            return;
        };
        self.fault("replica add");
        {
            let mut members = self.members.lock();
            if !members.contains(&addr) {
                members.push(addr.clone());
            }
        }
        let what = format!("add replica {addr} through engine {inc}");
        self.operate(what, async move {
            tether_engine::rebuild::start(&vol, &addr, true).map(|_| ())
        });
    }

    /// Removes one of the volume's replicas as `tether replica rm` does: out of the
    /// generation on a majority, then out of the engine. The operator stops listing it
    /// once that is done.
    fn remove_replica(&mut self, inc: usize, vol: Arc<Volume>) {
        let Some(g) = vol.generation() else { return };
        if g.replicas.len() < 3 {
            return;
        }
        let names: Vec<String> = g.replicas.iter().cloned().collect();
        let Some(addr) = self.rng.pick(&names).cloned() else {
            return;
        };
        self.fault("replica remove");
        let members = self.members.clone();
        let what = format!("remove replica {addr} through engine {inc}");
        self.operate(what, async move {
            let healthy = vol.replica(&addr).is_some_and(|r| r.is_healthy());
            if healthy && vol.healthy_count() <= 1 {
                return Err("it is the last healthy replica".to_string());
            }
            vol.record(Change::Remove(addr.clone()))
                .await
                .map_err(|e| kind(&e))?;
            vol.remove(&addr);
            members.lock().retain(|a| *a != addr);
            Ok(())
        });
    }
}

/// An error's kind, for the trace.
fn kind(e: &tether_engine::error::VolumeError) -> String {
    super::kind(e).to_string()
}
