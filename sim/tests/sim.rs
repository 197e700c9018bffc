//! The deterministic simulation in CI: a bounded number of seeds, a determinism check,
//! and the replay of one seed.
//!
//! - `TETHER_SIM_SEEDS=N` runs N seeds instead of CI's budget (from `TETHER_SIM_FROM`,
//!   default 1);
//! - `TETHER_SIM_SEED=S ... replay -- --nocapture` replays seed S and prints its trace;
//! - `TETHER_SIM_ROT=0` leaves bit rot in replicas' layers out of the faults;
//! - `TETHER_SIM_ENCRYPT=1` runs every seed on an encrypted volume (CI runs a share of
//!   its seeds that way in `encrypted_seeds_keep_every_promise`).

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tether_sim::Config;

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The default world; `TETHER_SIM_ROT=0` keeps replicas' layers from rotting,
/// `TETHER_SIM_ENCRYPT=1` encrypts the volume.
fn config() -> Config {
    Config {
        bit_rot: env("TETHER_SIM_ROT") != Some(0),
        encrypted: env("TETHER_SIM_ENCRYPT") == Some(1),
        ..Config::default()
    }
}

/// Seeds CI runs: 1 to 6000, about a minute here.
const CI_SEEDS: u64 = 6000;

/// Seeds CI runs again on an encrypted volume, where reads leave checking to the
/// engine's seals: 1 to 1500.
const CI_ENCRYPTED_SEEDS: u64 = 1500;

#[test]
fn seeds_keep_every_promise() {
    run_seeds(&config(), CI_SEEDS);
}

#[test]
fn encrypted_seeds_keep_every_promise() {
    // Asked for by hand, the other test already runs encrypted.
    if env("TETHER_SIM_ENCRYPT") == Some(1) {
        return;
    }
    let cfg = Config {
        encrypted: true,
        ..config()
    };
    run_seeds(&cfg, CI_ENCRYPTED_SEEDS);
}

/// Runs `ci_seeds` seeds of `cfg` (or what the environment asks for) and prints what
/// they reached.
fn run_seeds(cfg: &Config, ci_seeds: u64) {
    let from = env("TETHER_SIM_FROM").unwrap_or(1);
    let budget = Duration::from_secs(env("TETHER_SIM_SECONDS").unwrap_or(600));
    let count =
        env("TETHER_SIM_SEEDS").or(env("TETHER_SIM_SECONDS").map_or(Some(ci_seeds), |_| None));
    let started = Instant::now();
    let mut runs = 0u64;
    let mut reached: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut steps = 0;
    let mut writes = (0, 0, 0, 0);
    loop {
        let done = match count {
            Some(n) => runs >= n,
            None => started.elapsed() >= budget,
        };
        if done {
            break;
        }
        let seed = from + runs;
        match tether_sim::run(seed, cfg) {
            Ok(r) => {
                for k in r.faults.keys() {
                    *reached.entry(k).or_default() += 1;
                }
                steps += r.steps;
                writes.0 += r.writes.0;
                writes.1 += r.writes.1;
                writes.2 += r.writes.2;
                writes.3 += r.writes.3;
            }
            Err(f) => panic!("{f}"),
        }
        runs += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{runs} {}seeds from {from} in {secs:.1} s ({:.0} per minute), {} steps each",
        if cfg.encrypted { "encrypted " } else { "" },
        runs as f64 * 60.0 / secs,
        steps / runs.max(1) as usize
    );
    eprintln!(
        "writes: {} acknowledged, {} flushed, {} excused (every holder crashed before a flush), {} failed",
        writes.0, writes.1, writes.2, writes.3
    );
    for (k, n) in reached {
        eprintln!("  {k}: in {:.0} % of runs", n as f64 * 100.0 / runs as f64);
    }
}

#[test]
fn a_seed_replays_byte_for_byte() {
    let encrypted = Config {
        encrypted: true,
        ..config()
    };
    for (seed, cfg) in [(7, config()), (8, config()), (9, encrypted)] {
        let a = tether_sim::run(seed, &cfg)
            .map_err(|f| f.to_string())
            .unwrap();
        let b = tether_sim::run(seed, &cfg)
            .map_err(|f| f.to_string())
            .unwrap();
        assert_eq!(a.trace.join("\n"), b.trace.join("\n"), "seed {seed}");
        assert!(a.trace.len() > 100, "{}", a.trace.len());
    }
}

/// Seeds that found bugs, each fixed since: they stay in CI as they are cheap and
/// reach corners on purpose.
/// - 534: an in-sync replica whose rebuilding flag stayed set made the engine wait for
///   an operator with every replica up;
/// - 967: a power cut kept a record in the log's other half and lost the last ones of
///   this half; replay went on past the hole, and the replica reported the revision of
///   writes it lacked (now: the half is synced before the other one takes records, and
///   a write split into records counts once its last one is back);
/// - 3277: a drop of a replica recorded late, after the replica's rebuild had joined,
///   left a replica taking writes that the generation did not count in sync; a flushed
///   write was lost at the next open (now: a rebuild records the drop first, and a
///   drop of a replica that takes writes again is not recorded);
/// - 3752: an engine cut off from the others by a partition answered reads from the one
///   replica it still reached, older than writes a newer engine had acknowledged (now:
///   the read lease, `tether_engine::volume::lease`);
/// - 12621: a rebuild's join was stored on a minority and did not count; the engine
///   went on acknowledging writes without the replica, and a later engine adopted the
///   join and lost a flushed write (now: a generation that did not count is the base
///   of the next change, and the replicas it counts in sync are dropped first);
/// - 145 (once links reach a restarted replica, as gRPC channels do): a rebuild's join
///   was recorded after the replica's stream had ended, counting it in sync without a
///   write acknowledged meanwhile; a later engine served that block from it alone (now:
///   a generation is claimed from when it is sent, and a join needs the replica still
///   taking writes after the claim);
/// - 19917 (with bit rot): a byte rotted in the slot of a synced direct write whose
///   record was still in the log; replay took it for a write a power cut tore and
///   dropped it and every later record, flushed ones too (now: a sync mark says how
///   far the slots are synced, and a rotted block reads as a checksum error);
/// - 5294: a rebuild that follows the source's map of allocated blocks, from a source
///   that had lost power before its map was read, found nothing to copy and joined a
///   replica without an acknowledged write (now: the source must still be healthy when
///   the copy ends, copied or not);
/// - 22941: a join stored on two of four replicas, then the joined replica's drop
///   stored on one; the engine claimed only the newer of the two, acknowledged a write
///   without the replica, and the next engine adopted the join (now: every generation
///   sent since the last that counted keeps its claims until one counts);
/// - 5242: a rebuild cut short by a power cut had rewound a block of the target's head
///   to a snapshot's version on the way; the next rebuild followed the source's record
///   of what the target missed while away, which did not name that block, and left it
///   stale (now: while a rebuild into a replica is unfinished, its open reply names no
///   copy, so no record applies to it).
/// - 12668 (once engines also run data connections): a replica lost power and
///   restarted while its engine sent it nothing, so its stream to the old process had
///   not failed and it still counted healthy; a rebuild took it as the source, and its
///   new process, which had lost an unsynced acknowledged write and its record of what
///   the target missed, led the target to join without that write (now: the maps and
///   hashes name the process that answered, and another than the engine opened is
///   refused; engine/tests/local_link.rs shows the case on its own).
/// - 70078: a replica answered a new engine's epoch and was killed before the engine
///   opened its stream; the new process had lost a write's record gathered in memory
///   and was served beside copies that had it (now: the stream names the process that
///   answered, and another refuses it).
/// - 93044: an engine removed r2 and then r3, neither counted, stored on r1 alone; a
///   later engine that reached only r1 served from that one-replica generation while
///   another engine owned r2 and r3 (now: one uncounted change of the replicas at a
///   time, `membership::build_on`).
/// - 121441: a replica removed and added back kept the revision its old copy had
///   counted to, above the volume's; a power cut took a write from it, and its
///   revision still matched a copy that had the write (now: a rebuild's end gives the
///   copy its revision).
/// - 223 (encrypted): two engines started at once each created the new volume under
///   their own encryption parameters, r3 under one's and r1, r2 under the other's; no
///   engine could ever record the first generation, which needs every copy (now: a
///   copy never served takes the smallest parameters, `adopt_encryption`).
#[test]
fn former_finds() {
    let encrypted = Config {
        encrypted: true,
        ..config()
    };
    let plain = [
        145, 296, 534, 967, 3277, 3752, 5242, 5294, 12621, 12668, 19917, 22941, 70078, 93044,
        121441,
    ];
    let runs = plain
        .into_iter()
        .map(|s| (s, config()))
        .chain([(223, encrypted)]);
    for (seed, cfg) in runs {
        let r = tether_sim::run(seed, &cfg);
        assert!(
            r.is_ok(),
            "{}",
            r.err().map(|f| f.to_string()).unwrap_or_default()
        );
    }
}

#[test]
fn replay() {
    let Some(seed) = env("TETHER_SIM_SEED") else {
        return;
    };
    // The engine's and the replicas' own logs, interleaved with the trace.
    if std::env::var_os("TETHER_SIM_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::stdout)
            .try_init();
    }
    match tether_sim::run(seed, &config()) {
        Ok(r) => {
            for line in &r.trace {
                println!("{line}");
            }
            println!("seed {seed}: every promise kept; faults {:?}", r.faults);
        }
        Err(f) => {
            for line in &f.trace {
                println!("{line}");
            }
            panic!("{f}")
        }
    }
}
