//! Membership generations: every decision that keeps acknowledged data safe when
//! replicas fail and return in any order. Pure: no I/O, no clock; the engine's open,
//! drop, rebuild and fence paths call it, and a model checker
//! (`engine/tests/membership_model.rs`) explores it exhaustively.
//!
//! A generation names the volume's replicas (its voters) and which of them are in
//! sync: each holds every write acknowledged while the generation is current. The
//! replicas store the newest generation they were given, under the epoch that fences
//! older engines. The rule (`docs/DESIGN.md`, "Membership generations"):
//!
//! - a change (an engine opening at its epoch, a replica dropped, a rebuild completed,
//!   a replica added or removed) counts once a majority of the previous generation's
//!   replicas stored it;
//! - an engine that took its epoch on a majority of the newest generation's replicas it
//!   has heard of knows that generation is the newest that counted (any newer one was
//!   stored by a majority, which meets its majority);
//! - it serves only from that generation's in-sync replicas, and only after its own
//!   generation counted; nothing is acknowledged while a needed change does not count.

use std::collections::BTreeSet;

/// A replica, as the engine names it (its address).
pub type Id = String;

/// One generation of a volume's membership.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation {
    /// Grows by one with every change.
    pub number: u64,
    /// The epoch of the engine that made it: of two generations with one number, the
    /// one of the newer engine wins.
    pub epoch: u64,
    /// Every replica of the volume: the ones whose majority a change needs.
    pub replicas: BTreeSet<Id>,
    /// The replicas that hold every write acknowledged under this generation.
    pub in_sync: BTreeSet<Id>,
}

/// A change of membership.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    /// An engine opens at its epoch, serving from `serving` (in sync before).
    Open { serving: BTreeSet<Id> },
    /// A replica stops taking writes: it failed, or answered too late.
    Drop(Id),
    /// A rebuild into a replica of the volume completed: it holds everything.
    Join(Id),
    /// A new replica, not in sync until its rebuild completes.
    Add(Id),
    /// A replica leaves the volume.
    Remove(Id),
}

/// Why a change cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It would leave no replica in sync: the data would have nowhere to be.
    #[error("it would leave no replica in sync")]
    LastInSync,
    /// The replica is not one of the volume's.
    #[error("replica {0} is not one of the volume's replicas")]
    NotAReplica(Id),
    /// An earlier change of the replicas does not count yet.
    #[error(
        "generation {0}, which changed the volume's replicas, does not count yet; add or remove a replica once it does"
    )]
    Unsettled(u64),
    /// The replica already is one of the volume's.
    #[error("replica {0} already is one of the volume's replicas")]
    AlreadyAReplica(Id),
    /// An engine can serve only from replicas that were in sync.
    #[error("replica {0} is not in sync")]
    NotInSync(Id),
}

impl Generation {
    /// The first generation of a volume on `replicas`, all in sync (a new volume, or a
    /// clean and agreeing set of copies made before generations existed).
    pub fn first(replicas: impl IntoIterator<Item = Id>, epoch: u64) -> Generation {
        let replicas: BTreeSet<Id> = replicas.into_iter().collect();
        Generation {
            number: 1,
            epoch,
            in_sync: replicas.clone(),
            replicas,
        }
    }

    /// The order of generations: by the epoch of the engine that made it, then by
    /// number. The epoch is the ballot: an engine's open outranks every generation an
    /// older engine made, counted or not. Ordered by number first, an older engine's
    /// uncounted generation, built on a stale base, could outrank a newer engine's
    /// counted one, and a third engine would serve from it beside the newer one (found
    /// by the simulation, seed 1257 without background checkpoints).
    pub fn key(&self) -> (u64, u64) {
        (self.epoch, self.number)
    }

    /// How many of this generation's replicas make a majority.
    pub fn majority(&self) -> usize {
        self.replicas.len() / 2 + 1
    }

    /// Whether the replicas in `stored` are enough for a change from this generation
    /// to count (a majority of this generation's replicas).
    pub fn counts(&self, stored: &BTreeSet<Id>) -> bool {
        stored.intersection(&self.replicas).count() >= self.majority()
    }

    /// The generation after this one with `change`, made by the engine at `epoch`.
    pub fn next(&self, epoch: u64, change: &Change) -> Result<Generation, Refusal> {
        let mut g = Generation {
            number: self.number + 1,
            epoch,
            replicas: self.replicas.clone(),
            in_sync: self.in_sync.clone(),
        };
        match change {
            Change::Open { serving } => {
                if let Some(r) = serving.iter().find(|r| !self.in_sync.contains(*r)) {
                    return Err(Refusal::NotInSync(r.clone()));
                }
                g.in_sync = serving.clone();
            }
            Change::Drop(r) => {
                g.in_sync.remove(r);
            }
            Change::Join(r) => {
                if !self.replicas.contains(r) {
                    return Err(Refusal::NotAReplica(r.clone()));
                }
                g.in_sync.insert(r.clone());
            }
            Change::Add(r) => {
                if !g.replicas.insert(r.clone()) {
                    return Err(Refusal::AlreadyAReplica(r.clone()));
                }
            }
            Change::Remove(r) => {
                if !g.replicas.remove(r) {
                    return Err(Refusal::NotAReplica(r.clone()));
                }
                g.in_sync.remove(r);
            }
        }
        if g.in_sync.is_empty() {
            return Err(Refusal::LastInSync);
        }
        Ok(g)
    }
}

/// The generation an engine at `epoch` makes for `change`, built on `current`: its
/// newest generation, which may not count yet (a later engine may adopt it, so the
/// change must outrank it), where `counted` is the newest that did.
///
/// Only one change of the replicas may be uncounted at a time. Any majority of a set
/// and of that set with one replica more or less share a replica, so a later engine
/// that adopts such a change still meets every engine that went on from `counted`.
/// Two such changes in a row break that: removing r2 and then r3 from {r1, r2, r3},
/// neither counted, left a generation whose majority is r1 alone, and a later engine
/// that reached only r1 served from it while another engine had gone on with r2 and r3
/// (simulation, seed 93044).
pub fn build_on(
    counted: &Generation,
    current: &Generation,
    epoch: u64,
    change: &Change,
) -> Result<Generation, Refusal> {
    if matches!(change, Change::Add(_) | Change::Remove(_)) && current.replicas != counted.replicas
    {
        return Err(Refusal::Unsettled(current.number));
    }
    current.next(epoch, change)
}

/// What a replica told an engine that took its epoch there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Which replica.
    pub id: Id,
    /// The newest generation it stored; `None` on a copy made before generations.
    pub generation: Option<Generation>,
    /// The highest write sequence it applied.
    pub revision: u64,
    /// A rebuild into it started and did not finish.
    pub rebuilding: bool,
    /// The last engine closed it cleanly.
    pub clean: bool,
}

/// What an engine that took its epoch on the replicas in `reports` may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Record `next` (counting once a majority of `base.replicas` stored it), then
    /// serve from `fresh`; rebuild `stale`.
    Serve {
        /// The newest generation that counted.
        base: Generation,
        /// This engine's generation.
        next: Generation,
        /// In sync, with the highest revision among them: served from.
        fresh: BTreeSet<Id>,
        /// Reached but not served from: rebuilt.
        stale: BTreeSet<Id>,
    },
    /// Not yet: `why`, and which replicas could end the wait.
    Wait {
        /// Why the engine may not serve.
        why: String,
        /// Replicas it has not heard from and waits for.
        waiting_for: BTreeSet<Id>,
    },
}

/// Decides whether an engine at `epoch` may serve, from what the replicas that took
/// its epoch reported. `configured` are the replicas the engine was given: they stand
/// for the volume's replicas only where no replica holds a generation yet.
pub fn plan_open(configured: &[Id], reports: &[Report], epoch: u64) -> Plan {
    let heard: BTreeSet<Id> = reports.iter().map(|r| r.id.clone()).collect();
    let newest = reports
        .iter()
        .filter_map(|r| r.generation.as_ref())
        .max_by_key(|g| g.key());
    let base = match newest {
        Some(g) => g.clone(),
        None => match legacy_base(configured, reports) {
            Ok(g) => g,
            Err(why) => {
                return Plan::Wait {
                    why,
                    waiting_for: configured
                        .iter()
                        .filter(|c| !heard.contains(*c))
                        .cloned()
                        .collect(),
                }
            }
        },
    };
    let waiting_for: BTreeSet<Id> = base.replicas.difference(&heard).cloned().collect();
    if !base.counts(&heard) {
        return Plan::Wait {
            why: format!(
                "generation {} names replicas {}; {} of them answered and {} are needed to know no newer generation exists",
                base.number,
                list(&base.replicas),
                base.replicas.intersection(&heard).count(),
                base.majority()
            ),
            waiting_for,
        };
    }
    let candidates: Vec<&Report> = reports
        .iter()
        // A replica the newest generation counts in sync holds every acknowledged
        // write even when its rebuilding flag is set: its join counted before the flag
        // was cleared, or a rebuild restarted before its drop was recorded (no write
        // was acknowledged without it since). Leaving it out would wait for an
        // operator with every replica up (found by the simulation, seed 534).
        .filter(|r| base.in_sync.contains(&r.id))
        .collect();
    let Some(top) = candidates.iter().map(|r| r.revision).max() else {
        return Plan::Wait {
            why: format!(
                "none of the replicas in sync in generation {} ({}) answered; the others may lack acknowledged writes",
                base.number,
                list(&base.in_sync)
            ),
            waiting_for: base.in_sync.difference(&heard).cloned().collect(),
        };
    };
    let fresh: BTreeSet<Id> = candidates
        .iter()
        .filter(|r| r.revision == top)
        .map(|r| r.id.clone())
        .collect();
    let stale = heard.difference(&fresh).cloned().collect();
    match base.next(
        epoch,
        &Change::Open {
            serving: fresh.clone(),
        },
    ) {
        Ok(next) => Plan::Serve {
            base,
            next,
            fresh,
            stale,
        },
        Err(e) => Plan::Wait {
            why: e.to_string(),
            waiting_for,
        },
    }
}

/// The generation that copies made before generations stand for: all the configured
/// replicas in sync, but only when every one of them answered, closed cleanly and
/// agrees on the revision. Anything else could be two lineages: an operator decides.
fn legacy_base(configured: &[Id], reports: &[Report]) -> Result<Generation, String> {
    let missing: Vec<&Id> = configured
        .iter()
        .filter(|c| !reports.iter().any(|r| &r.id == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "no replica holds a membership generation yet, and {} did not answer; every copy must be seen before the first generation is recorded",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let revisions: BTreeSet<u64> = reports.iter().map(|r| r.revision).collect();
    if reports.iter().any(|r| !r.clean || r.rebuilding) || revisions.len() > 1 {
        return Err(
            "no replica holds a membership generation yet, and the copies were not closed cleanly or disagree on the revision; choose the copy to keep with `tether volume salvage`".into(),
        );
    }
    let mut g = Generation::first(configured.iter().cloned(), 0);
    g.number = 0;
    Ok(g)
}

/// The generation an operator forces with a salvage: serve from `from` (their data is
/// accepted, whatever newer writes other replicas may hold), numbered past everything
/// seen so it wins over it.
pub fn salvage(
    seen: &[Report],
    from: &BTreeSet<Id>,
    replicas: &BTreeSet<Id>,
    epoch: u64,
) -> Generation {
    let top = seen
        .iter()
        .filter_map(|r| r.generation.as_ref())
        .map(|g| g.number)
        .max()
        .unwrap_or(0);
    let mut all = replicas.clone();
    all.extend(from.iter().cloned());
    Generation {
        number: top + 1,
        epoch,
        replicas: all,
        in_sync: from.clone(),
    }
}

fn list(s: &BTreeSet<Id>) -> String {
    s.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// Today's rule before generations, kept so the model checker can show what it misses:
/// serve from the reachable replicas with the highest revision, rebuilding the rest.
pub fn plan_open_by_revision(reports: &[Report]) -> Option<BTreeSet<Id>> {
    let top = reports
        .iter()
        .filter(|r| !r.rebuilding)
        .map(|r| r.revision)
        .max()?;
    Some(
        reports
            .iter()
            .filter(|r| !r.rebuilding && r.revision == top)
            .map(|r| r.id.clone())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(s: &[&str]) -> BTreeSet<Id> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn report(id: &str, g: Option<&Generation>, revision: u64) -> Report {
        Report {
            id: id.into(),
            generation: g.cloned(),
            revision,
            rebuilding: false,
            clean: false,
        }
    }

    #[test]
    fn a_second_change_of_the_replicas_waits_for_the_first_to_count() {
        let g3 = Generation::first(["r1", "r2", "r3"].map(String::from), 2);
        let u4 = build_on(&g3, &g3, 2, &Change::Remove("r2".into())).unwrap();
        assert_eq!(u4.replicas, ids(&["r1", "r3"]));
        // Uncounted: neither another removal nor an addition builds on it.
        assert_eq!(
            build_on(&g3, &u4, 2, &Change::Remove("r3".into())),
            Err(Refusal::Unsettled(u4.number))
        );
        assert_eq!(
            build_on(&g3, &u4, 2, &Change::Add("r4".into())),
            Err(Refusal::Unsettled(u4.number))
        );
        // Changes of who is in sync still do, and once it counted the next removal may.
        assert!(build_on(&g3, &u4, 2, &Change::Drop("r3".into())).is_ok());
        assert!(build_on(&u4, &u4, 2, &Change::Remove("r3".into())).is_ok());
        // What the rule prevents: with both removals stored on r1 alone, r1 would be a
        // majority on its own, while r2 and r3 are a majority of the counted one.
        let u5 = u4.next(2, &Change::Remove("r3".into())).unwrap();
        assert!(u5.counts(&ids(&["r1"])));
        assert!(g3.counts(&ids(&["r2", "r3"])));
    }

    #[test]
    fn the_two_sequences_of_issue_13_wait_for_the_newest_generation() {
        // Sequence 1: r1 dropped, B written, r4 added and rebuilt; then only r1 and r4.
        let g1 = Generation::first(["r1", "r2", "r3"].map(String::from), 1);
        let g2 = g1.next(1, &Change::Drop("r1".into())).unwrap();
        let g3 = g2.next(1, &Change::Add("r4".into())).unwrap();
        let g4 = g3.next(1, &Change::Join("r4".into())).unwrap();
        // Adding r4 counted on r2 and r3; its join needs three of the four.
        assert!(g2.counts(&ids(&["r2", "r3"])));
        assert!(g3.counts(&ids(&["r2", "r3", "r4"])));
        assert!(!g3.counts(&ids(&["r1", "r4"])));
        let reports = [report("r1", Some(&g1), 1), report("r4", Some(&g4), 0)];
        let configured = ["r1".to_string(), "r4".to_string()];
        assert!(matches!(
            plan_open(&configured, &reports, 2),
            Plan::Wait { .. }
        ));
        assert_eq!(plan_open_by_revision(&reports), Some(ids(&["r1"])));
        // r2 returns beside them: r4 and r2 hold B, and serve.
        let reports = [
            report("r1", Some(&g1), 1),
            report("r2", Some(&g4), 2),
            report("r4", Some(&g4), 0),
        ];
        match plan_open(&configured, &reports, 2) {
            Plan::Serve { fresh, .. } => assert_eq!(fresh, ids(&["r2"])),
            p => panic!("{p:?}"),
        }

        // Sequence 2: r1 dropped, B written, everything off; r1 back alone.
        let all = ["r1", "r2", "r3"].map(String::from);
        let reports = [report("r1", Some(&g1), 1)];
        assert!(matches!(plan_open(&all, &reports, 2), Plan::Wait { .. }));
        // r2 returns: a majority of g2's replicas, and r2 is in sync.
        let reports = [report("r1", Some(&g1), 1), report("r2", Some(&g2), 2)];
        match plan_open(&all, &reports, 2) {
            Plan::Serve { fresh, next, .. } => {
                assert_eq!(fresh, ids(&["r2"]));
                assert_eq!(next.in_sync, ids(&["r2"]));
                assert_eq!(next.number, g2.number + 1);
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn legacy_copies_become_the_first_generation_only_when_clean_and_agreeing() {
        let all = ["a", "b"].map(String::from);
        let clean = |id: &str, rev| Report {
            clean: true,
            ..report(id, None, rev)
        };
        match plan_open(&all, &[clean("a", 5), clean("b", 5)], 3) {
            Plan::Serve { next, .. } => {
                assert_eq!(next.number, 1);
                assert_eq!(next.in_sync, ids(&["a", "b"]));
            }
            p => panic!("{p:?}"),
        }
        for reports in [
            vec![clean("a", 5), clean("b", 4)],
            vec![clean("a", 5), report("b", None, 5)],
            vec![clean("a", 5)],
        ] {
            assert!(
                matches!(plan_open(&all, &reports, 3), Plan::Wait { .. }),
                "{reports:?}"
            );
        }
    }

    #[test]
    fn changes_keep_someone_in_sync() {
        let g = Generation::first(["a"].map(String::from), 1);
        assert_eq!(
            g.next(1, &Change::Drop("a".into())),
            Err(Refusal::LastInSync)
        );
        assert_eq!(
            g.next(1, &Change::Join("z".into())),
            Err(Refusal::NotAReplica("z".into()))
        );
    }
}
