//! A deterministic simulation of tether: the real engine core and the real replica
//! store, in one process, under one seeded scheduler that decides everything
//! nondeterministic — which client sends what, message delays, replica power cuts and
//! restarts, cuts between an engine and a replica, engine crashes and restarts, a
//! second engine, and when the store's background checkpoints run — while an auditor
//! checks the promises after every step (`audit`).
//!
//! Determinism: a current-thread tokio runtime with paused time (virtual clock), the
//! store told to run its blocking calls inline and hand its background work to the
//! scheduler (`tether_replica::Execution::Scheduled`), simulated disks, and one
//! generator for every choice. A seed therefore replays exactly, and a failing one
//! prints the command that replays it.

pub mod audit;
pub mod net;
pub mod rng;
mod world;

use std::collections::BTreeMap;

pub use world::Config;

/// What a run did.
#[derive(Debug)]
pub struct Report {
    /// Every step and every answer, in order: equal for equal seeds.
    pub trace: Vec<String>,
    /// Steps taken.
    pub steps: usize,
    /// How often each kind of fault was injected.
    pub faults: BTreeMap<&'static str, usize>,
    /// Writes acknowledged (still unflushed), flushed, excused (lost with every
    /// holder) and failed.
    pub writes: (usize, usize, usize, usize),
}

/// A broken promise, with how to see it again.
#[derive(Debug)]
pub struct Failure {
    /// The seed that found it.
    pub seed: u64,
    /// Which promise, and how.
    pub why: String,
    /// The steps up to it.
    pub trace: Vec<String>,
    /// What the run simulated (the replay command must say so too).
    pub cfg: Config,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {}: {}", self.seed, self.why)?;
        writeln!(f, "the last steps:")?;
        let from = self.trace.len().saturating_sub(60);
        for line in &self.trace[from..] {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "replay: {}{}TETHER_SIM_SEED={} cargo test --release -p tether-sim --test sim replay -- --nocapture",
            if self.cfg.bit_rot { "" } else { "TETHER_SIM_ROT=0 " },
            if self.cfg.encrypted { "TETHER_SIM_ENCRYPT=1 " } else { "" },
            self.seed
        )
    }
}

/// Runs the simulation for `seed`.
pub fn run(seed: u64, cfg: &Config) -> Result<Report, Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| Failure {
            seed,
            why: format!("cannot start the runtime: {e}"),
            trace: Vec::new(),
            cfg: cfg.clone(),
        })?;
    rt.block_on(async { world::World::new(seed, cfg.clone())?.run().await })
}
