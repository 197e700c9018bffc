//! A model checker over `tether_engine::membership`: every order in which replicas
//! crash, come back, are cut off, added, removed and rebuilt, and engines open, write,
//! flush, crash and race, explored breadth-first to a fixed depth. The same search run
//! against today's rule (serve from the highest revision, `plan_open_by_revision`)
//! must find the counterexamples of issue 13, so the checker is known to be able to
//! fail.
//!
//! The model keeps what the rule depends on and nothing else: one block, whose history
//! of writes each replica holds (a prefix of it durable), the generation and epoch each
//! replica stored, and per engine its epoch, its generation and the replicas it writes
//! to. Each step is atomic: an engine's write reaches every replica it writes to that
//! is reachable at that moment, and the changes it then needs are recorded on every
//! reachable replica at once; a replica that is down at that moment is the partial
//! recording. States are small `Copy` values (generations are interned), and the
//! search keeps a 64-bit fingerprint of each state seen, as TLC does.
//!
//! The tests search to depth 10 (9 with partitions between each engine and each
//! replica; about 90 s together); deeper runs are opt-in:
//! `TETHER_MODEL_DEPTH=11 cargo test --release -p tether-engine --test membership_model
//! -- --nocapture` (27 million states with two engines, 2.6 GB, two minutes).

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use tether_engine::membership::{self, Change, Generation, Plan, Report};

/// Which rule the engines follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    Generations,
    Revision,
}

const MAX_REPLICAS: usize = 4;
const MAX_ENGINES: usize = 2;
const MAX_WRITES: usize = 4;

/// A set of replicas (bit i: replica i) or of writes (bit w: write w).
type Mask = u8;

fn bit(i: usize) -> Mask {
    1 << i
}

fn bits(m: Mask) -> impl Iterator<Item = usize> {
    (0..8).filter(move |i| m & (1 << i) != 0)
}

fn id(i: usize) -> String {
    format!("r{}", i + 1)
}

fn ids(m: Mask) -> BTreeSet<String> {
    bits(m).map(id).collect()
}

fn mask(s: &BTreeSet<String>) -> Mask {
    s.iter()
        .map(|r| bit(r[1..].parse::<usize>().unwrap() - 1))
        .fold(0, |a, b| a | b)
}

/// Generations met during the search, each stored once; states hold their index + 1.
#[derive(Default)]
struct Arena {
    gens: Vec<Generation>,
    index: HashMap<Generation, u16>,
}

impl Arena {
    fn put(&mut self, g: Generation) -> u16 {
        if let Some(&i) = self.index.get(&g) {
            return i;
        }
        self.gens.push(g.clone());
        let i = u16::try_from(self.gens.len()).unwrap();
        self.index.insert(g, i);
        i
    }

    fn get(&self, i: u16) -> Option<&Generation> {
        (i > 0).then(|| &self.gens[usize::from(i) - 1])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
struct Replica {
    /// Part of the cluster (added and not removed).
    exists: bool,
    /// Running and reachable.
    up: bool,
    /// Engines it is cut off from (bit e: engine e), while others still reach it.
    cut_from: Mask,
    /// Write ids applied, oldest first; the first `durable` survive a crash.
    history: [u8; MAX_WRITES],
    len: u8,
    durable: u8,
    revision: u8,
    durable_revision: u8,
    epoch: u8,
    /// The generation stored (arena index + 1; 0: none).
    generation: u16,
    rebuilding: bool,
    /// An engine has it open, or had it open when it died: set at open, never cleared
    /// (the model's engines only crash).
    dirty: bool,
}

impl Replica {
    fn holds(&self, w: usize) -> bool {
        self.history[..usize::from(self.len)].contains(&(w as u8))
    }

    fn holding(&self) -> Mask {
        self.history[..usize::from(self.len)]
            .iter()
            .fold(0, |m, &w| m | bit(usize::from(w)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Engine {
    Down,
    Serving {
        epoch: u8,
        /// The generation that counted last (generations rule).
        generation: u16,
        /// The newest generation this engine sent that has not counted (0: none): a
        /// later engine may adopt it, so the next change builds on it, as the engine's
        /// `Volume::record` does.
        claim: u16,
        /// Replicas written to; the ones also in sync (not rebuilding) are read from.
        writable: Mask,
        rebuilding: Mask,
        /// Replicas whose process restarted under the engine: its stream to them is
        /// gone, so they count as missing until rebuilt.
        broken: Mask,
        seq: u8,
        /// Writes this engine acknowledged and no flush covered yet.
        unflushed: Mask,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct State {
    replicas: [Replica; MAX_REPLICAS],
    engines: [Engine; MAX_ENGINES],
    next_write: u8,
    /// Acknowledged writes a later acknowledged flush covered.
    flushed: Mask,
    /// Acknowledged, unflushed writes whose every holder crashed: a read may miss them.
    excused: Mask,
    /// The highest epoch whose generation counted.
    recorded_epoch: u8,
    /// An engine older than that epoch got a write acknowledged.
    fence_broken: bool,
}

/// Limits of the exploration.
#[derive(Clone, Copy)]
struct Bounds {
    replicas: usize,
    /// Replicas that exist at the start (the others can be added).
    initial: usize,
    /// The initial replicas hold copies made before generations (none stored).
    legacy: bool,
    /// A replica can be cut off from one engine while the other still reaches it.
    partitions: bool,
    writes: u8,
    engines: usize,
    depth: usize,
}

/// A step, kept small: the search stores one per state for counterexamples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Crash(u8),
    Cut(u8),
    Return(u8),
    /// Engine, replica: the network between them fails, or heals.
    Partition(u8, u8),
    Heal(u8, u8),
    Open(u8),
    EngineCrash(u8),
    Write(u8, u8),
    Flush(u8),
    RebuildStart(u8, u8),
    RebuildFinish(u8, u8),
    Add(u8, u8),
    Remove(u8, u8),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = |i: &u8| id(usize::from(*i));
        match self {
            Step::Crash(i) => write!(f, "crash {}", r(i)),
            Step::Cut(i) => write!(f, "cut off {}", r(i)),
            Step::Return(i) => write!(f, "{} returns", r(i)),
            Step::Partition(e, i) => write!(f, "cut {} off from engine {e}", r(i)),
            Step::Heal(e, i) => write!(f, "{} reconnects to engine {e}", r(i)),
            Step::Open(e) => write!(f, "engine {e} opens"),
            Step::EngineCrash(e) => write!(f, "engine {e} crashes"),
            Step::Write(e, w) => write!(f, "engine {e} writes {w}"),
            Step::Flush(e) => write!(f, "engine {e} flushes"),
            Step::RebuildStart(e, i) => write!(f, "engine {e} starts rebuilding {}", r(i)),
            Step::RebuildFinish(e, i) => write!(f, "engine {e} finishes rebuilding {}", r(i)),
            Step::Add(e, i) => write!(f, "engine {e} adds {}", r(i)),
            Step::Remove(e, i) => write!(f, "engine {e} removes {}", r(i)),
        }
    }
}

impl State {
    fn new(b: Bounds, a: &mut Arena) -> State {
        let first = a.put(Generation::first((0..b.initial).map(id), 0));
        let mut replicas = [Replica::default(); MAX_REPLICAS];
        for r in replicas.iter_mut().take(b.initial) {
            r.exists = true;
            r.up = true;
            r.generation = if b.legacy { 0 } else { first };
        }
        let mut flushed = 0;
        if b.legacy {
            // Copies an older version left behind, closed cleanly: write 1
            // acknowledged and flushed on all of them.
            for r in replicas.iter_mut().take(b.initial) {
                r.history[0] = 1;
                r.len = 1;
                r.durable = 1;
                r.revision = 1;
                r.durable_revision = 1;
            }
            flushed = bit(1);
        }
        State {
            replicas,
            engines: [Engine::Down; MAX_ENGINES],
            next_write: if b.legacy { 2 } else { 1 },
            flushed,
            excused: 0,
            recorded_epoch: 0,
            fence_broken: false,
        }
    }

    /// Whether engine `e` reaches replica `i`.
    fn reachable(&self, e: usize, i: usize) -> bool {
        let r = &self.replicas[i];
        r.exists && r.up && r.cut_from & bit(e) == 0
    }

    fn existing(&self) -> Mask {
        (0..MAX_REPLICAS)
            .filter(|&i| self.replicas[i].exists)
            .fold(0, |m, i| m | bit(i))
    }

    /// Stores `g` on every replica engine `e` reaches that `epoch` may still write
    /// (taking the epoch there, as the replica does); returns which stored it.
    fn record(&mut self, a: &mut Arena, e: usize, epoch: u8, g: &Generation) -> Mask {
        let gi = a.put(g.clone());
        let mut stored = 0;
        for i in 0..MAX_REPLICAS {
            if !self.reachable(e, i) || self.replicas[i].epoch > epoch {
                continue;
            }
            let r = &mut self.replicas[i];
            r.epoch = epoch;
            if a.get(r.generation).is_none_or(|o| o.key() < g.key()) {
                r.generation = gi;
            }
            stored |= bit(i);
        }
        stored
    }

    /// A change an engine needs before it may go on; false if it does not count.
    /// Changes that do not count stay where they were stored, and the engine's next
    /// change builds on them.
    fn change(&mut self, a: &mut Arena, e: usize, change: &Change) -> bool {
        let Engine::Serving {
            epoch,
            generation,
            claim,
            ..
        } = self.engines[e]
        else {
            return false;
        };
        let Some(g) = a.get(generation).cloned() else {
            return true;
        };
        let current = match a.get(claim) {
            Some(c) if c.key() > g.key() => c.clone(),
            _ => g.clone(),
        };
        let Ok(next) = membership::build_on(&g, &current, u64::from(epoch), change) else {
            return false;
        };
        let stored = ids(self.record(a, e, epoch, &next));
        let gi = a.put(next);
        if !(g.counts(&stored) && current.counts(&stored)) {
            if let Engine::Serving { claim, .. } = &mut self.engines[e] {
                *claim = gi;
            }
            return false;
        }
        self.recorded_epoch = self.recorded_epoch.max(epoch);
        if let Engine::Serving {
            generation, claim, ..
        } = &mut self.engines[e]
        {
            *generation = gi;
            *claim = 0;
        }
        true
    }
}

fn successors(s: &State, b: Bounds, rule: Rule, a: &mut Arena, out: &mut Vec<(Step, State)>) {
    for i in 0..b.replicas {
        let r = s.replicas[i];
        let ri = i as u8;
        if r.exists && r.up {
            let mut n = *s;
            let x = &mut n.replicas[i];
            x.up = false;
            x.len = x.durable;
            x.revision = x.durable_revision;
            for engine in &mut n.engines {
                if let Engine::Serving { broken, .. } = engine {
                    *broken |= bit(i);
                }
            }
            excuse_lost(&mut n);
            out.push((Step::Crash(ri), n));
            let mut n = *s;
            n.replicas[i].up = false;
            out.push((Step::Cut(ri), n));
        }
        if r.exists && !r.up {
            let mut n = *s;
            n.replicas[i].up = true;
            out.push((Step::Return(ri), n));
        }
        if r.exists && b.partitions {
            for e in 0..b.engines {
                let mut n = *s;
                n.replicas[i].cut_from ^= bit(e);
                let step = if r.cut_from & bit(e) == 0 {
                    Step::Partition(e as u8, ri)
                } else {
                    Step::Heal(e as u8, ri)
                };
                out.push((step, n));
            }
        }
    }
    for e in 0..b.engines {
        let ei = e as u8;
        match s.engines[e] {
            Engine::Down => {
                if let Some(n) = open(s, e, rule, a) {
                    out.push((Step::Open(ei), n));
                }
            }
            Engine::Serving {
                writable,
                rebuilding,
                ..
            } => {
                let mut n = *s;
                n.engines[e] = Engine::Down;
                out.push((Step::EngineCrash(ei), n));
                if s.next_write <= b.writes {
                    if let Some(n) = write(s, e, rule, a) {
                        out.push((Step::Write(ei, s.next_write), n));
                    }
                }
                if let Some(n) = flush(s, e, rule, a) {
                    out.push((Step::Flush(ei), n));
                }
                let count = s.existing().count_ones() as usize;
                for i in 0..b.replicas {
                    let ri = i as u8;
                    let r = s.replicas[i];
                    if r.exists && r.up && writable & bit(i) == 0 {
                        if let Some(n) = rebuild_start(s, e, i, rule, a) {
                            out.push((Step::RebuildStart(ei, ri), n));
                        }
                    }
                    if rebuilding & bit(i) != 0 {
                        if let Some(n) = rebuild_finish(s, e, i, rule, a) {
                            out.push((Step::RebuildFinish(ei, ri), n));
                        }
                    }
                    if !r.exists && count < b.replicas {
                        if let Some(n) = add(s, e, i, rule, a) {
                            out.push((Step::Add(ei, ri), n));
                        }
                    }
                    if r.exists && count > 1 {
                        if let Some(n) = remove(s, e, i, rule, a) {
                            out.push((Step::Remove(ei, ri), n));
                        }
                    }
                }
            }
        }
    }
}

/// Acknowledged, unflushed writes no replica holds any more are excused.
fn excuse_lost(s: &mut State) {
    let held = (0..MAX_REPLICAS)
        .filter(|&i| s.replicas[i].exists)
        .fold(0, |m, i| m | s.replicas[i].holding());
    for e in s.engines {
        if let Engine::Serving { unflushed, .. } = e {
            s.excused |= unflushed & !held;
        }
    }
}

fn open(s: &State, e: usize, rule: Rule, a: &mut Arena) -> Option<State> {
    let mut n = *s;
    let epoch = n.replicas.iter().map(|r| r.epoch).max().unwrap_or(0) + 1;
    let mut reports = Vec::new();
    for i in 0..MAX_REPLICAS {
        if n.reachable(e, i) {
            n.replicas[i].epoch = epoch;
            let r = n.replicas[i];
            reports.push(Report {
                id: id(i),
                generation: a.get(r.generation).cloned(),
                revision: u64::from(r.revision),
                rebuilding: r.rebuilding,
                clean: !r.dirty,
            });
        }
    }
    // The engine was given every replica that exists.
    let configured: Vec<String> = bits(n.existing()).map(id).collect();
    let (generation, fresh) = match rule {
        Rule::Generations => match membership::plan_open(&configured, &reports, u64::from(epoch)) {
            Plan::Serve {
                base, next, fresh, ..
            } => {
                let stored = n.record(a, e, epoch, &next);
                if !base.counts(&ids(stored)) {
                    return None;
                }
                n.recorded_epoch = n.recorded_epoch.max(epoch);
                (a.put(next), mask(&fresh))
            }
            Plan::Wait { .. } => return None,
        },
        Rule::Revision => {
            let fresh = membership::plan_open_by_revision(&reports)?;
            n.recorded_epoch = n.recorded_epoch.max(epoch);
            (0, mask(&fresh))
        }
    };
    let seq = bits(fresh)
        .map(|i| n.replicas[i].revision)
        .max()
        .unwrap_or(0);
    for i in bits(fresh) {
        n.replicas[i].dirty = true;
    }
    // An older engine still serving finds out at its next request, when a replica
    // refuses its epoch; the fence invariant checks that one always does.
    n.engines[e] = Engine::Serving {
        epoch,
        generation,
        claim: 0,
        writable: fresh,
        rebuilding: 0,
        broken: 0,
        seq,
        unflushed: 0,
    };
    Some(n)
}

/// Sends one request to every replica the engine writes to; returns the ones that
/// did not take it, or `None` if one refused the epoch (the engine is fenced).
fn fan_out(n: &mut State, e: usize, apply: impl Fn(&mut Replica)) -> Option<Mask> {
    let Engine::Serving {
        epoch,
        writable,
        broken,
        ..
    } = n.engines[e]
    else {
        return None;
    };
    let mut missing = 0;
    for i in bits(writable) {
        if !n.reachable(e, i) || broken & bit(i) != 0 {
            missing |= bit(i);
        } else if n.replicas[i].epoch > epoch {
            n.engines[e] = Engine::Down;
            return None;
        } else {
            apply(&mut n.replicas[i]);
        }
    }
    Some(missing)
}

/// Drops the replicas that missed a request, recording it as the rule wants; false
/// when the engine may not acknowledge (it then stops).
fn drop_missing(n: &mut State, a: &mut Arena, e: usize, missing: Mask, rule: Rule) -> bool {
    for i in bits(missing) {
        if rule == Rule::Generations && !n.change(a, e, &Change::Drop(id(i))) {
            n.engines[e] = Engine::Down;
            return false;
        }
        if let Engine::Serving {
            writable,
            rebuilding,
            broken,
            ..
        } = &mut n.engines[e]
        {
            *writable &= !bit(i);
            *rebuilding &= !bit(i);
            *broken &= !bit(i);
        }
    }
    match n.engines[e] {
        Engine::Serving {
            writable,
            rebuilding,
            ..
        } if writable & !rebuilding != 0 => true,
        _ => {
            n.engines[e] = Engine::Down;
            false
        }
    }
}

/// An acknowledgement from an engine older than one whose generation counted is the
/// fence failing: marked for the invariant.
fn check_fence(n: &mut State, e: usize) {
    if let Engine::Serving { epoch, .. } = n.engines[e] {
        if epoch < n.recorded_epoch {
            n.fence_broken = true;
        }
    }
}

fn write(s: &State, e: usize, rule: Rule, a: &mut Arena) -> Option<State> {
    let mut n = *s;
    let w = n.next_write;
    n.next_write += 1;
    let Engine::Serving { seq, .. } = n.engines[e] else {
        return None;
    };
    let seq = seq + 1;
    let missing = fan_out(&mut n, e, |r| {
        r.history[usize::from(r.len)] = w;
        r.len += 1;
        r.revision = seq;
    })?;
    if !drop_missing(&mut n, a, e, missing, rule) {
        return Some(n);
    }
    check_fence(&mut n, e);
    if let Engine::Serving {
        seq: s, unflushed, ..
    } = &mut n.engines[e]
    {
        *s = seq;
        *unflushed |= bit(usize::from(w));
    }
    Some(n)
}

fn flush(s: &State, e: usize, rule: Rule, a: &mut Arena) -> Option<State> {
    let mut n = *s;
    let missing = fan_out(&mut n, e, |r| {
        r.durable = r.len;
        r.durable_revision = r.revision;
    })?;
    if !drop_missing(&mut n, a, e, missing, rule) {
        return Some(n);
    }
    check_fence(&mut n, e);
    if let Engine::Serving { unflushed, .. } = &mut n.engines[e] {
        n.flushed |= *unflushed;
        *unflushed = 0;
    }
    Some(n)
}

fn rebuild_start(s: &State, e: usize, i: usize, rule: Rule, a: &mut Arena) -> Option<State> {
    let mut n = *s;
    let Engine::Serving {
        epoch, generation, ..
    } = n.engines[e]
    else {
        return None;
    };
    if n.replicas[i].epoch > epoch {
        return None;
    }
    if rule == Rule::Generations && !a.get(generation)?.replicas.contains(&id(i)) {
        return None;
    }
    n.replicas[i].epoch = epoch;
    n.replicas[i].rebuilding = true;
    if let Engine::Serving {
        writable,
        rebuilding,
        broken,
        ..
    } = &mut n.engines[e]
    {
        *writable |= bit(i);
        *rebuilding |= bit(i);
        *broken &= !bit(i);
    }
    Some(n)
}

fn rebuild_finish(s: &State, e: usize, i: usize, rule: Rule, a: &mut Arena) -> Option<State> {
    let mut n = *s;
    let Engine::Serving {
        epoch,
        writable,
        rebuilding,
        broken,
        ..
    } = n.engines[e]
    else {
        return None;
    };
    let si = bits(writable & !rebuilding & !broken).next()?;
    if !n.reachable(e, i)
        || !n.reachable(e, si)
        || broken & bit(i) != 0
        || n.replicas[i].epoch > epoch
    {
        return None;
    }
    let source = n.replicas[si];
    let r = &mut n.replicas[i];
    r.history = source.history;
    r.len = source.len;
    r.durable = source.len;
    r.durable_revision = r.revision;
    if rule == Rule::Generations && !n.change(a, e, &Change::Join(id(i))) {
        n.engines[e] = Engine::Down;
        return Some(n);
    }
    n.replicas[i].rebuilding = false;
    if let Engine::Serving { rebuilding, .. } = &mut n.engines[e] {
        *rebuilding &= !bit(i);
    }
    Some(n)
}

fn add(s: &State, e: usize, i: usize, rule: Rule, a: &mut Arena) -> Option<State> {
    let mut n = *s;
    n.replicas[i] = Replica {
        exists: true,
        up: true,
        ..Replica::default()
    };
    if rule == Rule::Generations && !n.change(a, e, &Change::Add(id(i))) {
        // The operator's command failed; what it stored stays.
        let mut failed = *s;
        failed.engines[e] = n.engines[e];
        for k in 0..MAX_REPLICAS {
            if k != i {
                failed.replicas[k] = n.replicas[k];
            }
        }
        return (failed != *s).then_some(failed);
    }
    Some(n)
}

fn remove(s: &State, e: usize, i: usize, rule: Rule, a: &mut Arena) -> Option<State> {
    let mut n = *s;
    if rule == Rule::Generations && !n.change(a, e, &Change::Remove(id(i))) {
        // The operator's command failed; what it stored stays.
        return (n != *s).then_some(n);
    }
    if let Engine::Serving {
        writable,
        rebuilding,
        broken,
        ..
    } = &mut n.engines[e]
    {
        *writable &= !bit(i);
        *rebuilding &= !bit(i);
        *broken &= !bit(i);
        // Removing the last replica read from is not a step an engine takes.
        if *writable & !*rebuilding == 0 {
            return None;
        }
    }
    n.replicas[i] = Replica::default();
    Some(n)
}

/// The invariants; `Err` says which one failed.
fn check(s: &State) -> Result<(), String> {
    if s.fence_broken {
        return Err("an engine older than one whose epoch counted got a write acknowledged".into());
    }
    for (e, engine) in s.engines.iter().enumerate() {
        let Engine::Serving {
            writable,
            rebuilding,
            broken,
            unflushed,
            epoch,
            ..
        } = *engine
        else {
            continue;
        };
        if epoch < s.recorded_epoch {
            // Fenced: it can no longer acknowledge anything (the fence invariant).
            continue;
        }
        for i in bits(writable & !rebuilding & !broken) {
            let replica = &s.replicas[i];
            if !s.reachable(e, i) {
                continue;
            }
            for w in bits(s.flushed) {
                if !replica.holds(w) {
                    return Err(format!(
                        "engine {e} reads from {}, which lacks write {w}, acknowledged and flushed",
                        id(i)
                    ));
                }
            }
            for w in bits(unflushed & !s.excused) {
                if !replica.holds(w) {
                    return Err(format!(
                        "engine {e} reads from {}, which lacks write {w}, acknowledged before",
                        id(i)
                    ));
                }
            }
        }
    }
    Ok(())
}

fn fingerprint(s: &State) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// What a search found.
struct Explored {
    states: usize,
    generations: usize,
}

/// Breadth-first search to `b.depth` steps; the first counterexample comes back as
/// what failed and the steps that lead there.
fn explore(b: Bounds, rule: Rule) -> Result<Explored, (String, Vec<Step>)> {
    let mut a = Arena::default();
    let start = State::new(b, &mut a);
    let mut seen: HashSet<u64> = HashSet::new();
    // For each state found after the start: its parent's entry and the step.
    let mut trace: Vec<(u32, Step)> = Vec::new();
    let mut frontier: Vec<(State, u32)> = vec![(start, u32::MAX)];
    seen.insert(fingerprint(&start));
    let mut next = Vec::new();
    let mut out = Vec::new();
    for depth in 0..=b.depth {
        for (s, at) in frontier.drain(..) {
            if let Err(why) = check(&s) {
                let mut steps = Vec::new();
                let mut cur = at;
                while cur != u32::MAX {
                    let (parent, step) = trace[cur as usize];
                    steps.push(step);
                    cur = parent;
                }
                steps.reverse();
                return Err((why, steps));
            }
            if depth == b.depth {
                continue;
            }
            out.clear();
            successors(&s, b, rule, &mut a, &mut out);
            for &(step, n) in &out {
                if seen.insert(fingerprint(&n)) {
                    trace.push((at, step));
                    next.push((n, u32::try_from(trace.len() - 1).unwrap()));
                }
            }
        }
        std::mem::swap(&mut frontier, &mut next);
    }
    Ok(Explored {
        states: seen.len(),
        generations: a.gens.len(),
    })
}

fn depth_from_env(default: usize) -> usize {
    std::env::var("TETHER_MODEL_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(default)
}

fn must_hold(name: &str, b: Bounds) {
    match explore(b, Rule::Generations) {
        Ok(x) => eprintln!(
            "{name}, depth {}: {} states ({} generations), no counterexample",
            b.depth, x.states, x.generations
        ),
        Err((why, steps)) => panic!(
            "{why}\n  after: {}",
            steps
                .iter()
                .map(Step::to_string)
                .collect::<Vec<_>>()
                .join(" → ")
        ),
    }
}

#[test]
fn generations_keep_every_flushed_write_with_three_replicas_and_two_engines() {
    must_hold(
        "3 replicas, 2 engines",
        Bounds {
            replicas: 3,
            initial: 3,
            legacy: false,
            partitions: false,
            writes: 2,
            engines: 2,
            depth: depth_from_env(10),
        },
    );
}

#[test]
fn generations_keep_every_flushed_write_when_each_engine_sees_other_replicas() {
    must_hold(
        "3 replicas, 2 engines, partitions between each engine and each replica",
        Bounds {
            replicas: 3,
            initial: 3,
            legacy: false,
            partitions: true,
            writes: 2,
            engines: 2,
            depth: depth_from_env(9),
        },
    );
}

#[test]
fn generations_keep_every_flushed_write_with_a_fourth_replica_added() {
    must_hold(
        "3 replicas and a fourth to add, 1 engine",
        Bounds {
            replicas: 4,
            initial: 3,
            legacy: false,
            partitions: false,
            writes: 2,
            engines: 1,
            depth: depth_from_env(10),
        },
    );
}

#[test]
fn copies_made_before_generations_keep_every_flushed_write() {
    must_hold(
        "3 replicas without generations, 2 engines",
        Bounds {
            replicas: 3,
            initial: 3,
            legacy: true,
            partitions: false,
            writes: 3,
            engines: 2,
            depth: depth_from_env(10),
        },
    );
}

#[test]
fn the_revision_rule_loses_flushed_writes() {
    let b = Bounds {
        replicas: 3,
        initial: 3,
        legacy: false,
        partitions: false,
        writes: 2,
        engines: 1,
        depth: 9,
    };
    match explore(b, Rule::Revision) {
        Ok(x) => panic!(
            "{} states and no counterexample: the checker cannot fail",
            x.states
        ),
        Err((why, steps)) => eprintln!(
            "found: {why}\n  after: {}",
            steps
                .iter()
                .map(Step::to_string)
                .collect::<Vec<_>>()
                .join(" → ")
        ),
    }
}

/// Replays `steps` (names as in a counterexample) through the same transitions;
/// returns the first invariant that fails, or the step the rule does not allow.
fn replay(b: Bounds, rule: Rule, steps: &[&str]) -> Result<(), String> {
    let mut a = Arena::default();
    let mut s = State::new(b, &mut a);
    let mut out = Vec::new();
    for step in steps {
        out.clear();
        successors(&s, b, rule, &mut a, &mut out);
        let Some(&(_, n)) = out.iter().find(|(name, _)| name.to_string() == *step) else {
            return Err(format!("not allowed: {step}"));
        };
        check(&n)?;
        s = n;
    }
    Ok(())
}

const ISSUE_13_SEQUENCE_1: &[&str] = &[
    "engine 0 opens",
    "engine 0 writes 1",
    "engine 0 flushes",
    "crash r1",
    "engine 0 writes 2",
    "engine 0 flushes",
    "engine 0 adds r4",
    "engine 0 starts rebuilding r4",
    "engine 0 finishes rebuilding r4",
    "engine 0 crashes",
    "crash r2",
    "crash r3",
    "r1 returns",
    "engine 0 opens",
];

const ISSUE_13_SEQUENCE_2: &[&str] = &[
    "engine 0 opens",
    "engine 0 writes 1",
    "engine 0 flushes",
    "crash r1",
    "engine 0 writes 2",
    "engine 0 flushes",
    "engine 0 crashes",
    "crash r2",
    "crash r3",
    "r1 returns",
    "engine 0 opens",
];

const FENCED_ENGINE: &[&str] = &[
    "engine 0 opens",
    "engine 0 writes 1",
    "engine 0 flushes",
    "cut off r2",
    "cut off r3",
    "engine 0 writes 2",
    "r2 returns",
    "r3 returns",
    "cut off r1",
    "engine 1 opens",
    "r1 returns",
    "engine 0 writes 3",
];

#[test]
fn the_revision_rule_fails_the_three_named_cases_and_generations_do_not() {
    let four = Bounds {
        replicas: 4,
        initial: 3,
        legacy: false,
        partitions: false,
        writes: 3,
        engines: 2,
        depth: 0,
    };
    for (name, steps) in [
        (
            "sequence 1 (a rebuild, then a restart)",
            ISSUE_13_SEQUENCE_1,
        ),
        (
            "sequence 2 (the stalest replica back first)",
            ISSUE_13_SEQUENCE_2,
        ),
        ("a fenced engine", FENCED_ENGINE),
    ] {
        let old = replay(four, Rule::Revision, steps);
        assert!(
            old.as_ref().is_err_and(|e| !e.starts_with("not allowed")),
            "{name}: today's rule shows no failure: {old:?}"
        );
        // Under generations the engine waits instead (the step is not allowed), or
        // the older engine is refused: no invariant fails either way.
        let new = replay(four, Rule::Generations, steps);
        assert!(
            new.is_ok() || new.as_ref().is_err_and(|e| e.starts_with("not allowed")),
            "{name}: {new:?}"
        );
        eprintln!(
            "{name}: today's rule: {}; generations: {new:?}",
            old.unwrap_err()
        );
    }
}
