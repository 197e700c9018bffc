//! The auditor: what every write, read and flush was, and the promises checked against
//! them after every step.
//!
//! Data is written in 64-byte cells, each naming its cell and the write that put it
//! there, so a read shows exactly which write each cell came from. Each client owns
//! its cells and has one request in flight, so a cell's writes are in a known order.
//! The promises:
//! - **no flushed write lost**: a read never returns a cell older than the newest
//!   write to it that was acknowledged before the read began, unless every replica
//!   that held that write crashed before a flush covered it (then it may fall back to
//!   the one before, by the same rule). The holders of a write are the replicas in
//!   sync when it was acknowledged; one that crashed while the write was in flight,
//!   or that the newest engine no longer counts in sync, stops being one: NBD lets a
//!   crash lose writes no flush covered, and tether keeps them only while a replica
//!   it serves from holds them;
//! - **no read of data that was never written there**;
//! - **no acknowledgement to a fenced engine**: no write sent after a newer engine
//!   opened is acknowledged by an older one;
//! - **no request waits forever**.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

/// Bytes per cell: the grain of the workload's writes.
pub const CELL: u64 = 64;

/// The bytes of cell `cell` as write `write` puts them.
pub fn cell_bytes(cell: u64, write: u64) -> [u8; CELL as usize] {
    let mut b = [(write ^ cell) as u8 | 1; CELL as usize];
    b[..8].copy_from_slice(&cell.to_le_bytes());
    b[8..16].copy_from_slice(&write.to_le_bytes());
    b
}

/// Which write a cell's bytes came from (0: never written), or why they are no
/// write's at all.
pub fn cell_write(cell: u64, bytes: &[u8]) -> Result<u64, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let num = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&bytes[r]);
        u64::from_le_bytes(a)
    };
    let (c, w) = (num(0..8), num(8..16));
    if c != cell || bytes[..] != cell_bytes(cell, w)[..] {
        return Err(format!(
            "cell {cell} holds bytes no write put there (they name cell {c}, write {w})"
        ));
    }
    Ok(w)
}

/// What became of a write.
#[derive(Clone, Debug, PartialEq)]
enum Fate {
    Pending,
    /// Acknowledged at that event, held by those replicas (until they crash).
    Acked {
        at: u64,
        holders: BTreeSet<String>,
    },
    /// Acknowledged, and a later flush covered it: never lost.
    Flushed {
        at: u64,
    },
    /// Acknowledged, but every replica that held it crashed before a flush.
    Excused {
        at: u64,
    },
    /// Failed: its cells may hold it or what was there before.
    Failed,
}

struct Write {
    cells: std::ops::Range<u64>,
    /// Each replica's crash count when it was sent: a replica that crashed while the
    /// write was in flight may have lost it, even if the engine counted it in sync.
    crashes: BTreeMap<String, u64>,
    engine: usize,
    epoch: u64,
    issued: u64,
    started: Instant,
    fate: Fate,
}

struct Pending {
    what: String,
    started: Instant,
}

/// The history and the checks.
#[derive(Default)]
pub struct Auditor {
    /// Logical clock: one tick per event.
    now: u64,
    writes: BTreeMap<u64, Write>,
    /// Per cell, its writes in order.
    cells: BTreeMap<u64, Vec<u64>>,
    /// Requests in flight other than writes, by id.
    pending: BTreeMap<u64, Pending>,
    /// (event, epoch) of every engine open that completed.
    opens: Vec<(u64, u64)>,
    /// How often each replica crashed.
    crashes: BTreeMap<String, u64>,
    /// When the last revert ended: what the cells held before it may be back.
    reverted: u64,
    /// The first broken promise.
    pub failure: Option<String>,
}

impl Auditor {
    fn tick(&mut self) -> u64 {
        self.now += 1;
        self.now
    }

    fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            self.failure = Some(why);
        }
    }

    /// An engine at `epoch` completed its open.
    pub fn opened(&mut self, epoch: u64) {
        let at = self.tick();
        self.opens.push((at, epoch));
    }

    /// Write `id` of `cells` is sent through the engine incarnation `engine` at `epoch`.
    pub fn write_sent(&mut self, id: u64, cells: std::ops::Range<u64>, engine: usize, epoch: u64) {
        let issued = self.tick();
        for c in cells.clone() {
            self.cells.entry(c).or_default().push(id);
        }
        self.writes.insert(
            id,
            Write {
                cells,
                crashes: self.crashes.clone(),
                engine,
                epoch,
                issued,
                started: Instant::now(),
                fate: Fate::Pending,
            },
        );
    }

    /// Write `id` was acknowledged, with `in_sync` the replicas holding it.
    pub fn write_acked(&mut self, id: u64, in_sync: BTreeSet<String>) {
        let at = self.tick();
        let Some(w) = self.writes.get(&id) else {
            return;
        };
        let (issued, epoch, engine) = (w.issued, w.epoch, w.engine);
        if let Some((opened, newer)) = self.opens.iter().find(|(t, e)| *t < issued && *e > epoch) {
            self.fail(format!(
                "write {id} was acknowledged by engine incarnation {engine} at epoch {epoch}, sent after an engine at epoch {newer} opened (event {opened})"
            ));
        }
        if let Some(w) = self.writes.get_mut(&id) {
            let holders: BTreeSet<String> = in_sync
                .into_iter()
                .filter(|r| self.crashes.get(r) == w.crashes.get(r))
                .collect();
            w.fate = if holders.is_empty() {
                Fate::Excused { at }
            } else {
                Fate::Acked { at, holders }
            };
        }
    }

    /// Write `id` failed.
    pub fn write_failed(&mut self, id: u64) {
        self.tick();
        if let Some(w) = self.writes.get_mut(&id) {
            w.fate = Fate::Failed;
        }
    }

    /// An operator's request `id` is sent (`request_done` ends it).
    pub fn other_sent(&mut self, id: u64, what: String) {
        self.pending.insert(
            id,
            Pending {
                what,
                started: Instant::now(),
            },
        );
        self.tick();
    }

    /// A revert to a snapshot ended (done, or maybe on some replicas): a cell may hold
    /// any write sent to it before, so only writes acknowledged after it set a floor.
    pub fn reverted(&mut self) {
        self.reverted = self.tick();
    }

    /// A flush is sent: returns the event it began at.
    pub fn flush_sent(&mut self, id: u64) -> u64 {
        self.pending.insert(
            id,
            Pending {
                what: format!("flush {id}"),
                started: Instant::now(),
            },
        );
        self.tick()
    }

    /// The flush sent at `began` was acknowledged: every write acknowledged before
    /// it began is durable.
    pub fn flush_acked(&mut self, id: u64, began: u64) {
        self.pending.remove(&id);
        self.tick();
        for w in self.writes.values_mut() {
            if let Fate::Acked { at, .. } = w.fate {
                if at < began {
                    w.fate = Fate::Flushed { at };
                }
            }
        }
    }

    /// A request other than a write ended (a failed flush, or a read checked by
    /// `read_done`).
    pub fn request_done(&mut self, id: u64) {
        self.pending.remove(&id);
        self.tick();
    }

    /// A read is sent: returns the event it began at.
    pub fn read_sent(&mut self, id: u64, cells: std::ops::Range<u64>) -> u64 {
        self.pending.insert(
            id,
            Pending {
                what: format!("read {id} of cells {cells:?}"),
                started: Instant::now(),
            },
        );
        self.tick()
    }

    /// Replica `addr` crashed: acknowledged, unflushed writes lose it as a holder.
    pub fn replica_crashed(&mut self, addr: &str) {
        self.tick();
        *self.crashes.entry(addr.to_string()).or_default() += 1;
        for w in self.writes.values_mut() {
            if let Fate::Acked { at, holders } = &mut w.fate {
                holders.remove(addr);
                if holders.is_empty() {
                    w.fate = Fate::Excused { at: *at };
                }
            }
        }
    }

    /// The newest engine serves from `in_sync`: a replica out of it no longer counts
    /// as a holder (the engine will not read from it, and rebuilds it from the others).
    pub fn in_sync(&mut self, in_sync: &BTreeSet<String>) {
        for w in self.writes.values_mut() {
            if let Fate::Acked { at, holders } = &mut w.fate {
                holders.retain(|r| in_sync.contains(r));
                if holders.is_empty() {
                    w.fate = Fate::Excused { at: *at };
                }
            }
        }
    }

    /// Read `id`, begun at `began`, returned `data` for cells starting at `first`.
    pub fn read_done(&mut self, id: u64, began: u64, first: u64, data: &[u8]) {
        self.request_done(id);
        for (i, bytes) in data.chunks(CELL as usize).enumerate() {
            let cell = first + i as u64;
            let got = match cell_write(cell, bytes) {
                Ok(w) => w,
                Err(why) => return self.fail(format!("read {id}: {why}")),
            };
            if let Err(why) = self.check_cell(cell, got, began) {
                return self.fail(format!("read {id}: {why}"));
            }
        }
    }

    /// Whether cell `cell` may hold write `got` for a read begun at `began`.
    fn check_cell(&self, cell: u64, got: u64, began: u64) -> Result<(), String> {
        let history = self.cells.get(&cell).map(Vec::as_slice).unwrap_or(&[]);
        // The newest write the read must not be older than.
        let floor = history.iter().rposition(|id| {
            self.writes.get(id).is_some_and(|w| match w.fate {
                Fate::Acked { at, .. } | Fate::Flushed { at } => at < began && at > self.reverted,
                _ => false,
            })
        });
        let pos = if got == 0 {
            None
        } else {
            match history.iter().position(|&id| id == got) {
                Some(p) => Some(p),
                None => return Err(format!("cell {cell} holds write {got}, never sent there")),
            }
        };
        match (floor, pos) {
            (Some(f), p) if p.is_none_or(|p| p < f) => Err(format!(
                "cell {cell} holds {}, older than write {} ({:?}), acknowledged before the read began",
                p.map_or("nothing".to_string(), |p| format!("write {}", history[p])),
                history[f],
                self.writes.get(&history[f]).map(|w| &w.fate)
            )),
            _ => Ok(()),
        }
    }

    /// Fails when a request has waited longer than `limit`.
    pub fn check_waits(&mut self, limit: Duration) {
        let now = Instant::now();
        let stuck = self
            .writes
            .iter()
            .filter(|(_, w)| w.fate == Fate::Pending)
            .map(|(id, w)| (format!("write {id} of cells {:?}", w.cells), w.started))
            .chain(self.pending.values().map(|p| (p.what.clone(), p.started)))
            .find(|(_, started)| now.duration_since(*started) > limit);
        if let Some((what, started)) = stuck {
            self.fail(format!(
                "{what} has waited {:?}, longer than {limit:?}",
                now.duration_since(started)
            ));
        }
    }

    /// Requests still in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
            + self
                .writes
                .values()
                .filter(|w| w.fate == Fate::Pending)
                .count()
    }

    /// How many writes were acknowledged, flushed, excused and failed.
    pub fn tally(&self) -> (usize, usize, usize, usize) {
        let mut t = (0, 0, 0, 0);
        for w in self.writes.values() {
            match w.fate {
                Fate::Acked { .. } => t.0 += 1,
                Fate::Flushed { .. } => t.1 += 1,
                Fate::Excused { .. } => t.2 += 1,
                Fate::Failed => t.3 += 1,
                Fate::Pending => {}
            }
        }
        t
    }
}
