//! Whether the engine serves yet. Before the membership rule lets it serve, status and
//! metrics still answer, and say which replicas the engine waits for.

use std::sync::Arc;
use tokio::time::Instant;

use parking_lot::RwLock;

use crate::volume::Volume;

/// What an engine that may not serve yet is waiting for.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// Why it may not serve, from the membership rule or the replicas.
    pub why: String,
    /// The replicas whose answer would let it serve; empty when only an operator can
    /// (`tether volume salvage`).
    pub waiting_for: Vec<String>,
    /// When it started waiting.
    pub since: Instant,
    /// How many opens it tried.
    pub attempts: u32,
}

/// The engine's phase: waiting to serve, or serving a volume.
pub enum Phase {
    /// Not serving yet (or never serving, if the rule never allows it).
    Waiting(Waiting),
    /// Serving `volume`, reachable at `nbd_address`.
    Serving {
        volume: Arc<Volume>,
        nbd_address: String,
    },
}

/// The engine's phase, shared by the open loop, the control API and the metrics.
pub struct EngineState {
    /// The volume's name.
    pub volume: String,
    /// The replicas the engine was started with.
    pub replicas: Vec<String>,
    phase: RwLock<Phase>,
}

impl EngineState {
    /// An engine that has not tried to open `volume` yet.
    pub fn new(volume: &str, replicas: &[String]) -> Arc<EngineState> {
        Arc::new(EngineState {
            volume: volume.to_string(),
            replicas: replicas.to_vec(),
            phase: RwLock::new(Phase::Waiting(Waiting {
                why: "opening the volume on its replicas".into(),
                waiting_for: Vec::new(),
                since: Instant::now(),
                attempts: 0,
            })),
        })
    }

    /// Notes a failed attempt to open: the engine goes on waiting for `waiting_for`.
    pub fn wait(&self, why: String, waiting_for: Vec<String>) {
        let mut p = self.phase.write();
        let (since, attempts) = match &*p {
            Phase::Waiting(w) => (w.since, w.attempts),
            Phase::Serving { .. } => (Instant::now(), 0),
        };
        *p = Phase::Waiting(Waiting {
            why,
            waiting_for,
            since,
            attempts: attempts + 1,
        });
    }

    /// The engine serves `volume` from now on.
    pub fn serve(&self, volume: Arc<Volume>, nbd_address: String) {
        *self.phase.write() = Phase::Serving {
            volume,
            nbd_address,
        };
    }

    /// The served volume and its NBD address, or what the engine waits for.
    pub fn serving(&self) -> Result<(Arc<Volume>, String), Waiting> {
        match &*self.phase.read() {
            Phase::Serving {
                volume,
                nbd_address,
            } => Ok((volume.clone(), nbd_address.clone())),
            Phase::Waiting(w) => Err(w.clone()),
        }
    }
}

impl Waiting {
    /// The waiting as a sentence for errors and logs.
    pub fn describe(&self, volume: &str) -> String {
        format!(
            "volume {volume} is not serving yet: {}; waiting for {}",
            self.why,
            self.waiting_list()
        )
    }

    /// Whom it waits for, in words.
    pub fn waiting_list(&self) -> String {
        if self.attempts == 0 {
            "the replicas to answer".to_string()
        } else {
            waiting_list(&self.waiting_for)
        }
    }
}

/// Whom an engine waits for, in words: the replicas, or an operator when no replica's
/// answer would do.
pub fn waiting_list(waiting_for: &[String]) -> String {
    if waiting_for.is_empty() {
        "an operator (see `tether volume salvage`)".to_string()
    } else {
        waiting_for.join(", ")
    }
}
