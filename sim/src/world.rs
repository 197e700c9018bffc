//! The simulated cluster and the scheduler's loop: replicas on simulated disks, engine
//! slots, clients, and the faults the seed chooses.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tether_engine::volume::Volume;
use tether_engine::{EngineConfig, EngineError};
use tether_replica::sim::SimDisk;
use tether_replica::{Execution, Job, ReplicaService, StoreOptions};

use crate::audit::{cell_bytes, Auditor, CELL};
use crate::net::{Delays, Net};
use crate::rng::Rng;
use crate::{Failure, Report};

mod admin;

const BLOCK: u64 = 4096;
/// Blocks each client owns.
const CLIENT_BLOCKS: u64 = 8;
const VOLUME_SIZE: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(2);
const QUORUM_WAIT: Duration = Duration::from_secs(10);
/// Longer than any request may take: the quorum wait, timeouts on both sides of it
/// and a rebuild's worth of slack.
const WAIT_LIMIT: Duration = Duration::from_secs(120);

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Config {
    /// Scheduler steps.
    pub steps: usize,
    /// Replicas of the volume.
    pub replicas: usize,
    /// Replicas running beside them that an operator may add.
    pub spares: usize,
    /// Clients, each with one request in flight at most.
    pub clients: usize,
    /// Engine slots (2: a second engine may start while the first serves).
    pub engines: usize,
    /// A byte of a replica's layer may rot (once per run at most).
    pub bit_rot: bool,
    /// The volume is encrypted: the engine seals every block, and its reads ask the
    /// replicas to leave checking to the seals.
    pub encrypted: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            steps: 500,
            replicas: 3,
            spares: 1,
            clients: 3,
            engines: 2,
            bit_rot: true,
            encrypted: false,
        }
    }
}

/// A background job of the store, and the replica it belongs to.
type Jobs = Arc<Mutex<VecDeque<(usize, Job)>>>;

/// An engine slot: empty, opening, or serving.
#[derive(Default)]
struct Slot {
    /// The network incarnation of the engine in it.
    incarnation: Option<usize>,
    volume: Arc<Mutex<Option<Arc<Volume>>>>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

/// Everything the tasks share.
struct Shared {
    started: tokio::time::Instant,
    audit: Mutex<Auditor>,
    trace: Mutex<Vec<String>>,
}

impl Shared {
    /// Adds `line` to the trace, stamped with the virtual time since the start.
    fn log(&self, line: String) {
        let t = tokio::time::Instant::now().duration_since(self.started);
        let line = format!("{:>4}.{:03} {line}", t.as_secs(), t.subsec_millis());
        // With TETHER_SIM_LOG, between the engine's and the replicas' own lines.
        tracing::info!(target: "sim", "{line}");
        self.trace.lock().push(line);
    }
}

pub(crate) struct World {
    seed: u64,
    cfg: Config,
    rng: Rng,
    dir: tempfile::TempDir,
    addrs: Vec<String>,
    disks: Vec<SimDisk>,
    up: Vec<bool>,
    net: Arc<Net>,
    jobs: Jobs,
    slots: Vec<Slot>,
    busy: Vec<Arc<Mutex<bool>>>,
    shared: Arc<Shared>,
    next_id: u64,
    faults: BTreeMap<&'static str, usize>,
    /// The replicas the operator lists for every engine it starts.
    members: Arc<Mutex<Vec<String>>>,
    /// A revert runs: clients wait (they would be detached).
    reverting: Arc<Mutex<bool>>,
    /// Snapshots asked for so far (their names count up).
    snapshots: u64,
    /// A byte of a replica's layer rotted (once per run at most).
    rotted: bool,
    /// The volume was grown: engines open without a size (read at each attempt, as
    /// an operator would fix the command line).
    expanded: Arc<AtomicBool>,
}

impl World {
    pub(crate) fn new(seed: u64, cfg: Config) -> Result<World, Failure> {
        let mut rng = Rng::new(seed);
        let addrs: Vec<String> = (1..=cfg.replicas + cfg.spares)
            .map(|i| format!("r{i}"))
            .collect();
        let members = addrs[..cfg.replicas].to_vec();
        let delays = Delays::new(Rng::new(rng.next_u64()), 30, Duration::from_millis(20));
        let net = Net::new(&addrs, delays);
        // Only the replica services' directories live there; their data is on the
        // simulated disks.
        let dir = tempfile::Builder::new()
            .prefix("tether-sim")
            .tempdir()
            .map_err(|e| Failure {
                seed,
                why: format!("no temporary directory: {e}"),
                trace: Vec::new(),
                cfg: cfg.clone(),
            })?;
        Ok(World {
            seed,
            rng,
            dir,
            disks: addrs.iter().map(|_| SimDisk::new()).collect(),
            up: vec![false; addrs.len()],
            addrs,
            net,
            jobs: Arc::new(Mutex::new(VecDeque::new())),
            slots: (0..cfg.engines).map(|_| Slot::default()).collect(),
            busy: (0..cfg.clients)
                .map(|_| Arc::new(Mutex::new(false)))
                .collect(),
            shared: Arc::new(Shared {
                started: tokio::time::Instant::now(),
                audit: Mutex::new(Auditor::default()),
                trace: Mutex::new(Vec::new()),
            }),
            next_id: 0,
            faults: BTreeMap::new(),
            members: Arc::new(Mutex::new(members)),
            reverting: Arc::new(Mutex::new(false)),
            snapshots: 0,
            rotted: false,
            expanded: Arc::new(AtomicBool::new(false)),
            cfg,
        })
    }

    fn log(&self, line: String) {
        self.shared.log(line);
    }

    fn fault(&mut self, kind: &'static str) {
        *self.faults.entry(kind).or_default() += 1;
    }

    fn failure(&self) -> Option<String> {
        self.shared.audit.lock().failure.clone()
    }

    fn fail(&self, why: String) -> Failure {
        Failure {
            seed: self.seed,
            why,
            trace: self.shared.trace.lock().clone(),
            cfg: self.cfg.clone(),
        }
    }

    /// Starts replica `i` on its disk as it is now.
    fn start_replica(&mut self, i: usize) -> Result<(), Failure> {
        let jobs = self.jobs.clone();
        let opts = StoreOptions {
            wal_size: 64 << 10,
            direct_limit: 32 << 10,
            direct_after_writes: 8,
            execution: Execution::Scheduled(Arc::new(move |job| jobs.lock().push_back((i, job)))),
            ..StoreOptions::default()
        };
        let path: PathBuf = self.dir.path().join(&self.addrs[i]);
        let svc = ReplicaService::with_disk(&path, Arc::new(self.disks[i].clone()), opts)
            .map_err(|e| self.fail(format!("replica {}: cannot start: {e}", self.addrs[i])))?;
        self.net.replica_up(&self.addrs[i], svc);
        self.up[i] = true;
        Ok(())
    }

    /// Replica `i` loses power (`power`) or its process (its page cache survives).
    fn crash_replica(&mut self, i: usize, power: bool) {
        let mut pick = Rng::new(self.rng.next_u64());
        self.disks[i] = self.disks[i].power_cut(|| !power || pick.chance(50));
        self.net.replica_down(&self.addrs[i]);
        self.up[i] = false;
        self.shared.audit.lock().replica_crashed(&self.addrs[i]);
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            volume: "vol".into(),
            size: Some(VOLUME_SIZE),
            replicas: self.members.lock().clone(),
            nbd_listen: None,
            nbd_socket: None,
            control_socket: self.dir.path().join("control.sock"),
            timeout: TIMEOUT,
            min_replicas: 1,
            desired_replicas: 0,
            metrics_listen: None,
            // A fixed key: which bytes the blocks hold never reaches the trace, only
            // whether they open.
            encryption_key: self
                .cfg
                .encrypted
                .then_some(tether_engine::crypt::KeyMaterial::Raw([7; 32])),
            replica_tls: None,
            nbd_tls: None,
            quorum_wait: QUORUM_WAIT,
            rebuild_rate: 0,
            schedule: None,
        }
    }

    /// Starts an engine in slot `s`: it keeps trying to open, then serves and brings
    /// failed replicas back as the real engine does.
    fn start_engine(&mut self, s: usize) {
        let (inc, connector) = self.net.engine();
        let cfg = self.engine_config();
        let (shared, volume, tasks) = (
            self.shared.clone(),
            self.slots[s].volume.clone(),
            self.slots[s].tasks.clone(),
        );
        let (expanded, members) = (self.expanded.clone(), self.members.clone());
        self.slots[s].incarnation = Some(inc);
        let how = if Net::framed(inc) {
            "data connections"
        } else {
            "streams in memory"
        };
        self.log(format!("engine {inc} starts in slot {s} ({how})"));
        let state = tether_engine::phase::EngineState::new(&cfg.volume, &cfg.replicas);
        let opener = tokio::spawn(async move {
            // Waiting is the engine's own loop; any other error, an operator's restart.
            for _ in 0..100 {
                // What the operator lists now: replicas added or removed since.
                let mut cfg = cfg.clone();
                cfg.replicas = members.lock().clone();
                if expanded.load(Ordering::SeqCst) {
                    cfg.size = None;
                }
                match tether_engine::open_when_allowed(&cfg, connector.clone(), &state).await {
                    Ok(v) => {
                        shared.audit.lock().opened(v.epoch());
                        shared.log(format!(
                            "engine {inc} serves at epoch {}, generation {:?}",
                            v.epoch(),
                            v.generation().map(|g| (g.number, g.in_sync))
                        ));
                        let mut tasks = tasks.lock();
                        tasks.push(tokio::spawn(tether_engine::rebuild::watch(v.clone())));
                        tasks.push(tokio::spawn(tether_engine::volume::lease::keep(v.clone())));
                        *volume.lock() = Some(v);
                        return;
                    }
                    Err(e) => {
                        let kind = match e {
                            EngineError::Raced { .. } => "raced",
                            EngineError::NoReplica { .. } => "no replica",
                            EngineError::Waiting { .. } => "waiting",
                            EngineError::Config { .. } => "config",
                            EngineError::Listen { .. } => "listen",
                        };
                        shared.log(format!(
                            "engine {inc} cannot serve: {kind} ({e}); restarted"
                        ));
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        });
        self.slots[s].tasks.lock().push(opener);
    }

    /// The engine in slot `s` dies.
    fn crash_engine(&mut self, s: usize) {
        let Some(inc) = self.slots[s].incarnation.take() else {
            return;
        };
        self.net.kill_engine(inc);
        for t in self.slots[s].tasks.lock().drain(..) {
            t.abort();
        }
        *self.slots[s].volume.lock() = None;
        self.log(format!("engine {inc} in slot {s} crashes"));
    }

    /// The serving engines: (slot, incarnation, volume).
    fn serving(&self) -> Vec<(usize, usize, Arc<Volume>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(s, slot)| {
                let v = slot.volume.lock().clone()?;
                Some((s, slot.incarnation?, v))
            })
            .collect()
    }

    /// Tells the auditor which replicas the newest serving engine counts in sync.
    fn observe(&self) {
        let newest = self
            .serving()
            .into_iter()
            .filter(|(_, _, v)| !v.is_fenced())
            .max_by_key(|(_, _, v)| v.epoch());
        if let Some(g) = newest.and_then(|(_, _, v)| v.generation()) {
            self.shared.audit.lock().in_sync(&g.in_sync);
        }
    }

    /// Client `c` sends one request through a serving engine, if there is one.
    fn client_request(&mut self, c: usize) {
        if *self.busy[c].lock() || *self.reverting.lock() {
            return;
        }
        let serving = self.serving();
        let Some((_, inc, vol)) = self.rng.pick(&serving).cloned() else {
            return;
        };
        self.next_id += 1;
        let id = self.next_id;
        let (busy, shared) = (self.busy[c].clone(), self.shared.clone());
        *busy.lock() = true;
        let own = c as u64 * CLIENT_BLOCKS * BLOCK / CELL;
        let own_cells = CLIENT_BLOCKS * BLOCK / CELL;
        let per_block = BLOCK / CELL;
        match self.rng.below(10) {
            // Aligned writes of one or two blocks, and unaligned ones of whole cells.
            0..=4 => {
                let (first, n) = if self.rng.chance(50) {
                    let b = self.rng.below(CLIENT_BLOCKS);
                    let n = 1 + self.rng.below(2).min(CLIENT_BLOCKS - b - 1);
                    (own + b * per_block, n * per_block)
                } else {
                    let f = self.rng.below(own_cells);
                    (own + f, 1 + self.rng.below(100.min(own_cells - f)))
                };
                let mut data = Vec::with_capacity((n * CELL) as usize);
                for cell in first..first + n {
                    data.extend_from_slice(&cell_bytes(cell, id));
                }
                shared
                    .audit
                    .lock()
                    .write_sent(id, first..first + n, inc, vol.epoch());
                shared.log(format!(
                    "client {c}: write {id} of cells {first}..{} through engine {inc}",
                    first + n
                ));
                tokio::spawn(async move {
                    let r = vol.write(first * CELL, Bytes::from(data), false).await;
                    match r {
                        Ok(()) => {
                            let in_sync: BTreeSet<String> =
                                vol.generation().map(|g| g.in_sync).unwrap_or_default();
                            shared.audit.lock().write_acked(id, in_sync);
                            shared.log(format!("write {id} acknowledged by {}", healthy(&vol)));
                        }
                        Err(e) => {
                            shared.audit.lock().write_failed(id);
                            shared.log(format!("write {id} failed: {}", kind(&e)));
                        }
                    }
                    *busy.lock() = false;
                });
            }
            5..=7 => {
                let span = self.cfg.clients as u64 * CLIENT_BLOCKS * BLOCK / CELL;
                let first = self.rng.below(span);
                let n = 1 + self.rng.below(2 * per_block).min(span - first - 1);
                let began = shared.audit.lock().read_sent(id, first..first + n);
                shared.log(format!(
                    "client {c}: read {id} of cells {first}..{} through engine {inc}",
                    first + n
                ));
                tokio::spawn(async move {
                    match vol.read(first * CELL, (n * CELL) as u32).await {
                        Ok(parts) => {
                            let data = parts.concat();
                            shared.audit.lock().read_done(id, began, first, &data);
                            shared.log(format!("read {id} answered"));
                        }
                        Err(e) => {
                            shared.audit.lock().request_done(id);
                            shared.log(format!("read {id} failed: {}", kind(&e)));
                        }
                    }
                    *busy.lock() = false;
                });
            }
            _ => {
                let began = shared.audit.lock().flush_sent(id);
                shared.log(format!("client {c}: flush {id} through engine {inc}"));
                tokio::spawn(async move {
                    match vol.flush().await {
                        Ok(()) => {
                            shared.audit.lock().flush_acked(id, began);
                            shared.log(format!("flush {id} acknowledged by {}", healthy(&vol)));
                        }
                        Err(e) => {
                            shared.audit.lock().request_done(id);
                            shared.log(format!("flush {id} failed: {}", kind(&e)));
                        }
                    }
                    *busy.lock() = false;
                });
            }
        }
    }

    /// One step of the scheduler.
    async fn step(&mut self) -> Result<(), Failure> {
        let roll = self.rng.below(100);
        let r = self.rng.below(self.addrs.len() as u64) as usize;
        let s = self.rng.below(self.cfg.engines as u64) as usize;
        match roll {
            0..=64 => {
                let c = self.rng.below(self.cfg.clients as u64) as usize;
                self.client_request(c);
            }
            65..=74 => {
                let job = self.jobs.lock().pop_front();
                if let Some((i, job)) = job {
                    self.log(format!("{}: a background checkpoint runs", self.addrs[i]));
                    job();
                }
            }
            75..=77 if self.up[r] => {
                let power = self.rng.chance(50);
                self.log(format!(
                    "{} {}",
                    self.addrs[r],
                    if power { "loses power" } else { "is killed" }
                ));
                self.fault(if power {
                    "replica power cut"
                } else {
                    "replica killed"
                });
                self.crash_replica(r, power);
            }
            75..=84 if !self.up[r] => {
                self.log(format!("{} restarts", self.addrs[r]));
                self.fault("replica restart");
                self.start_replica(r)?;
            }
            85..=88 => {
                if let Some(inc) = self.slots[s].incarnation {
                    let cut = self.rng.chance(60);
                    self.log(format!(
                        "link engine {inc} - {} {}",
                        self.addrs[r],
                        if cut { "cut" } else { "healed" }
                    ));
                    self.fault(if cut { "partition" } else { "heal" });
                    self.net.set_cut(inc, &self.addrs[r], cut);
                }
            }
            89 if self.slots[s].incarnation.is_some() => {
                self.fault("engine crash");
                self.crash_engine(s);
            }
            89..=91 if self.slots[s].incarnation.is_none() => {
                let other = self.slots.iter().any(|x| x.incarnation.is_some());
                self.fault(if other {
                    "second engine"
                } else {
                    "engine restart"
                });
                self.start_engine(s);
            }
            92..=94 => self.admin(),
            95 if self.cfg.bit_rot && !self.rotted && self.up[r] => self.rot(r),
            _ => {
                let d = Duration::from_millis(1 + self.rng.below(400));
                self.log(format!("time passes: {d:?}"));
                tokio::time::sleep(d).await;
            }
        }
        Ok(())
    }
}

impl World {
    /// Runs the steps, then heals everything and checks that every cell reads back as
    /// the promises say.
    pub(crate) async fn run(mut self) -> Result<Report, Failure> {
        for i in 0..self.addrs.len() {
            self.start_replica(i)?;
        }
        self.start_engine(0);
        for _ in 0..self.cfg.steps {
            self.step().await?;
            // Let the requests and the engines move on before the next choice.
            let d = Duration::from_millis(self.rng.below(20));
            tokio::time::sleep(d).await;
            self.observe();
            self.shared.audit.lock().check_waits(WAIT_LIMIT);
            if let Some(why) = self.failure() {
                return Err(self.fail(why));
            }
        }
        self.settle().await?;
        let trace = self.shared.trace.lock().clone();
        let writes = self.shared.audit.lock().tally();
        for s in 0..self.slots.len() {
            self.crash_engine(s);
        }
        Ok(Report {
            trace,
            steps: self.cfg.steps,
            faults: self.faults.clone(),
            writes,
        })
    }

    /// Heals every fault, waits for every request to end and an engine to serve, and
    /// reads every cell back.
    async fn settle(&mut self) -> Result<(), Failure> {
        self.log("settling: every link healed, every replica up".into());
        self.net.heal_all();
        // An engine still opening waits with the replica list it started with; the
        // operator restarts it with today's (replicas were added or removed since).
        let opening: Vec<usize> = (0..self.slots.len())
            .filter(|&s| {
                self.slots[s].incarnation.is_some() && self.slots[s].volume.lock().is_none()
            })
            .collect();
        for s in opening {
            self.crash_engine(s);
        }
        for i in 0..self.addrs.len() {
            if !self.up[i] {
                self.start_replica(i)?;
            }
        }
        self.quiesce().await?;
        if let Err(e) = self.final_read().await {
            // An engine whose every in-sync replica dropped out does not take them back
            // by itself; an operator restarts it.
            self.log(format!("the final read failed ({e}); the engines restart"));
            self.fault("engine restarted to recover");
            for s in 0..self.slots.len() {
                self.crash_engine(s);
            }
            self.quiesce().await?;
            if let Err(e) = self.final_read().await {
                return Err(self.fail(format!("the final read failed: {e}")));
            }
        }
        match self.failure() {
            Some(why) => Err(self.fail(why)),
            None => Ok(()),
        }
    }

    /// Waits until no request is in flight and an engine serves (starting one when
    /// none runs); fenced engines are stopped.
    async fn quiesce(&mut self) -> Result<(), Failure> {
        let deadline = tokio::time::Instant::now() + WAIT_LIMIT * 2;
        loop {
            // A fenced engine never serves again: it goes, as an operator would stop it.
            for (s, _, v) in self.serving() {
                if v.is_fenced() {
                    self.crash_engine(s);
                }
            }
            if self.slots.iter().all(|s| s.incarnation.is_none()) {
                self.start_engine(0);
            }
            let idle = self.shared.audit.lock().in_flight() == 0;
            let serving = self.serving();
            let opening = self
                .slots
                .iter()
                .any(|s| s.incarnation.is_some() && s.volume.lock().is_none());
            if idle && !serving.is_empty() && !opening {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let why = format!(
                    "after healing everything, {} request(s) still wait and {} engine(s) serve",
                    self.shared.audit.lock().in_flight(),
                    serving.len()
                );
                return Err(self.fail(why));
            }
            let job = self.jobs.lock().pop_front();
            if let Some((_, job)) = job {
                job();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.observe();
            self.shared.audit.lock().check_waits(WAIT_LIMIT);
            if let Some(why) = self.failure() {
                return Err(self.fail(why));
            }
        }
    }

    /// Reads every cell through the newest engine, for the auditor.
    async fn final_read(&mut self) -> Result<(), String> {
        let Some((_, inc, vol)) = self.serving().into_iter().max_by_key(|(_, _, v)| v.epoch())
        else {
            return Err("no engine serves".into());
        };
        let per_block = BLOCK / CELL;
        let blocks = self.cfg.clients as u64 * CLIENT_BLOCKS;
        self.log(format!("final read of every cell through engine {inc}"));
        // Block by block: after bit rot, a block whose every good copy was lost with
        // other faults fails with EIO (one copy cannot be trusted); the rest is checked.
        for b in 0..blocks {
            self.next_id += 1;
            let id = self.next_id;
            let first = b * per_block;
            let began = self
                .shared
                .audit
                .lock()
                .read_sent(id, first..first + per_block);
            match vol.read(b * BLOCK, BLOCK as u32).await {
                Ok(parts) => {
                    self.shared
                        .audit
                        .lock()
                        .read_done(id, began, first, &parts.concat());
                }
                Err(e) => {
                    self.shared.audit.lock().request_done(id);
                    if !(self.rotted && e.to_string().contains("good copy")) {
                        return Err(e.to_string());
                    }
                    self.log(format!("block {b} has no good copy left after the bit rot"));
                }
            }
        }
        Ok(())
    }

    /// A byte of one of replica `r`'s layer files rots, where the clients' cells are.
    fn rot(&mut self, r: usize) {
        let dir = self
            .dir
            .path()
            .join(&self.addrs[r])
            .join("volumes/vol/layers");
        let disk: &dyn tether_replica::disk::Disk = &self.disks[r];
        let mut files: Vec<String> = disk
            .list(&dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f.ends_with(".data") || f.ends_with(".alt"))
            .collect();
        files.sort();
        let Some(file) = self.rng.pick(&files).cloned() else {
            return;
        };
        let off = self
            .rng
            .below(self.cfg.clients as u64 * CLIENT_BLOCKS * BLOCK);
        self.rotted = true;
        self.fault("bit rot");
        self.log(format!(
            "{}: a byte of layers/{file} at offset {off} rots",
            self.addrs[r]
        ));
        self.disks[r].corrupt(&dir.join(&file), off);
    }
}

/// What kind of error an answer was (messages name engine ids, which differ per run).
fn kind(e: &tether_engine::error::VolumeError) -> &'static str {
    use tether_engine::error::VolumeError;
    match e {
        VolumeError::Io(_) => "EIO",
        VolumeError::Invalid(_) => "invalid",
        VolumeError::NoSpace(_) => "ENOSPC",
        VolumeError::Fenced(_) => "fenced",
    }
}

/// The replicas `vol` counts for acknowledgements now, for the trace.
fn healthy(vol: &Volume) -> String {
    let names: Vec<String> = vol
        .replicas()
        .iter()
        .filter(|r| r.is_healthy())
        .map(|r| r.addr.clone())
        .collect();
    names.join(", ")
}
