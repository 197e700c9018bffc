//! Opening a volume: probing every replica, deciding the encryption, taking a new
//! epoch on every replica reached (fencing any older engine there), and choosing whom
//! to serve from by durable revision. See `docs/DESIGN.md`, "Opening a volume".

use std::sync::Arc;
use std::time::Duration;

use tether_proto::replica::io_request::Op;
use tether_proto::replica::{Expand, OpenRequest};

use crate::membership::{self, Plan, Report};
use crate::replica::{Connector, Fence, GrpcConnector, ReplicaConn};
use crate::volume::{self, Volume};
use crate::volume::{generation, lease};
use crate::{crypt, EngineConfig, EngineError};

/// Opens the volume on every replica over gRPC (with the configured TLS), choosing the
/// freshest and taking a new epoch.
pub async fn open_volume(cfg: &EngineConfig) -> Result<Arc<Volume>, EngineError> {
    open_volume_with(cfg, Arc::new(grpc_connector(cfg))).await
}

/// The gRPC connector `cfg` asks for (its timeout and TLS).
pub fn grpc_connector(cfg: &EngineConfig) -> GrpcConnector {
    GrpcConnector {
        timeout: cfg.timeout.min(Duration::from_secs(5)),
        tls: cfg.replica_tls.clone(),
    }
}

/// Opens the volume on every replica reached through `connector`: probes them all,
/// takes a new epoch on every one reached, and serves from those with the highest
/// durable revision.
pub async fn open_volume_with(
    cfg: &EngineConfig,
    connector: Arc<dyn Connector>,
) -> Result<Arc<Volume>, EngineError> {
    let name = cfg.volume.clone();
    let cfg_err = |msg: String| EngineError::Config {
        volume: name.clone(),
        msg,
    };
    if cfg.replicas.is_empty() {
        return Err(cfg_err("give at least one --replica ADDR".into()));
    }
    if let Some(bad) = cfg
        .replicas
        .iter()
        .find(|a| crate::replica::local::dir_of(a).is_some_and(|d| d.as_os_str().is_empty()))
    {
        return Err(cfg_err(format!(
            "replica {bad}: give the data directory after dir:, e.g. dir:/var/lib/tether/replica"
        )));
    }
    if let Some(size) = cfg.size {
        if size == 0 || !size.is_multiple_of(volume::BLOCK) {
            return Err(cfg_err(format!(
                "size {size} must be a positive multiple of {} bytes",
                volume::BLOCK
            )));
        }
    }
    // Lets this engine reopen its replicas at its own epoch after they come back.
    let engine_id = {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (t ^ (u64::from(std::process::id()) << 40)) | 1
    };
    let fence = Fence::new(&cfg.volume);
    // Round 1: reach every replica and read its state, changing nothing, so a wrong
    // or missing key is refused before any replica is touched.
    let mut probes = futures::future::join_all(
        cfg.replicas
            .iter()
            .map(|a| probe(cfg, &*connector, a, None, String::new(), &fence)),
    )
    .await;
    // A brand-new volume is created only when every replica answered: an unreachable
    // one may hold the volume already, and creating an empty one beside it would
    // later rebuild the real data away (or seal it under other parameters).
    let found = probes.iter().any(|p| p.is_ok());
    let unreachable: Vec<&str> = cfg
        .replicas
        .iter()
        .zip(&probes)
        .filter(|(_, p)| matches!(p, Err((_, false))))
        .map(|(a, _)| a.as_str())
        .collect();
    if cfg.size.is_some() && !found && !unreachable.is_empty() {
        return Err(cfg_err(format!(
            "no reachable replica holds the volume and {} did not answer; it may hold the volume, so none is created. Start again when every replica is reachable, or leave the unreachable ones out of --replica to create a new volume",
            unreachable.join(", ")
        )));
    }
    let (params, cipher) = encryption_for(cfg, &cfg.replicas, &probes)?;
    // Create the volume where it is missing, with the volume's encryption parameters
    // and, when it exists elsewhere, its size: a replica added to the volume (a voter
    // from then on) that lost its copy before its rebuild made it durable holds no
    // generation, and must be able to answer and store one again, or a volume whose
    // majority needs it waits for good (simulation, seed 1078 with operator steps).
    let existing = probes
        .iter()
        .filter_map(|p| p.as_ref().ok().map(|(_, r)| r.size))
        .max();
    if let Some(size) = existing.or(cfg.size) {
        let created = futures::future::join_all(
            cfg.replicas
                .iter()
                .zip(probes.iter())
                .filter(|(_, p)| matches!(p, Err((_, true))))
                .map(|(addr, _)| probe(cfg, &*connector, addr, Some(size), params.clone(), &fence)),
        )
        .await;
        let missing = probes.iter_mut().filter(|p| matches!(p, Err((_, true))));
        for (p, c) in missing.zip(created) {
            *p = c;
        }
    }
    let mut reachable = Vec::new();
    let mut conns: Vec<Arc<ReplicaConn>> = Vec::new();
    let mut problems = Vec::new();
    for (addr, p) in cfg.replicas.iter().zip(probes) {
        match p {
            Ok((conn, reply)) if reply.encryption != params && !adoptable(&reply, &params) => {
                let e = format!(
                    "replica {addr}: its copy of volume {} is {}, but the volume is {}; it is left out and unchanged: check which copy is right before removing either",
                    cfg.volume,
                    if reply.encryption.is_empty() { "unencrypted" } else { "encrypted under other parameters" },
                    if params.is_empty() { "unencrypted" } else { "encrypted" }
                );
                problems.push(e.clone());
                conn.mark_failed(e);
                conns.push(conn);
            }
            Ok((conn, reply)) => reachable.push((conn, reply)),
            Err((e, _)) => {
                problems.push(e.clone());
                conns.push(ReplicaConn::failed(addr, &cfg.volume, fence.clone(), e));
            }
        }
    }
    if reachable.is_empty() {
        return Err(EngineError::NoReplica {
            volume: name,
            details: problems.join("; "),
        });
    }
    // Volumes only grow, and an expansion goes to every replica: one that has less
    // missed it (it was out, or the engine stopped halfway). Served, it is grown
    // below; stale, its rebuild grows it (simulation, seed 18 with operator steps).
    let size = reachable.iter().map(|(_, r)| r.size).max().unwrap_or(0);
    for (c, r) in &reachable {
        if r.block_size as u64 != volume::BLOCK {
            return Err(cfg_err(format!(
                "replica {} uses block size {}, this engine {}",
                c.addr,
                r.block_size,
                volume::BLOCK
            )));
        }
    }
    if let Some(want) = cfg.size {
        if want != size {
            return Err(cfg_err(format!(
                "the volume exists with {size} bytes, not {want}; start with --size {size} or without --size (growing is `tether volume expand`, planned)"
            )));
        }
    }
    let Some(epoch) = reachable
        .iter()
        .map(|(_, r)| r.previous_epoch)
        .max()
        .unwrap_or(0)
        .checked_add(1)
    else {
        return Err(cfg_err(
            "a replica reports the largest possible epoch; no newer one can be taken. Inspect the replicas' meta files".into(),
        ));
    };
    // Round 2: take the new epoch on every replica reached, stale and half-rebuilt
    // ones included, before deciding anything: an older engine still writing to a
    // replica this engine will not serve from must be fenced there too, or it could
    // go on acknowledging writes on that replica alone.
    let take_timeout = cfg.timeout.max(Duration::from_secs(30));
    let taken = futures::future::join_all(reachable.into_iter().map(|(c, probed)| {
        let adopt = probed.encryption != params;
        let req = OpenRequest {
            volume: cfg.volume.clone(),
            size,
            create: false,
            epoch,
            engine_id,
            rebuild: false,
            encryption: if adopt { params.clone() } else { String::new() },
            adopt_encryption: adopt,
        };
        async move {
            // Taking the epoch syncs the replica's meta: a busy disk gets longer than
            // a request, since giving up here leaves the replica out.
            let r = tokio::time::timeout(take_timeout, c.open(req)).await;
            (c, probed, r)
        }
    }))
    .await;
    let mut fresh = Vec::new();
    let mut raced = Vec::new();
    for (c, probed, r) in taken {
        match r {
            // Between the probe and the epoch another engine made this copy take
            // other parameters: the two raced, and this one does not serve.
            Ok(Ok(reply)) if reply.encryption != params => {
                let why = format!(
                    "replica {}: its copy of volume {} changed its encryption parameters while this engine opened it",
                    c.addr, cfg.volume
                );
                raced.push(why.clone());
                problems.push(why.clone());
                c.mark_failed(why);
                conns.push(c);
            }
            Ok(Ok(reply)) => {
                tracing::info!(volume = %cfg.volume, replica = %c.addr, revision = reply.revision,
                    clean = reply.clean, created = probed.created, rebuilding = reply.rebuilding,
                    previous_epoch = reply.previous_epoch, epoch, "epoch taken");
                fresh.push((c, reply));
            }
            Ok(Err(s)) => {
                let why = format!("replica {}: taking epoch {epoch}: {}", c.addr, s.message());
                if tether_proto::wire::code_of(&s) == Some(tether_proto::replica::ErrorCode::Fenced)
                {
                    raced.push(why.clone());
                }
                problems.push(why.clone());
                c.mark_failed(why);
                conns.push(c);
            }
            Err(_) => {
                let why = format!(
                    "replica {}: no answer while taking epoch {epoch} within {take_timeout:?}",
                    c.addr
                );
                problems.push(why.clone());
                c.mark_failed(why);
                conns.push(c);
            }
        }
    }
    if !raced.is_empty() {
        return Err(EngineError::Raced {
            volume: name,
            details: raced.join("; "),
        });
    }
    // Who may serve is the membership rule's to say (`crate::membership`), from what
    // the replicas reported after this engine's epoch was taken there: no older
    // engine moves their state any more.
    let reports: Vec<Report> = fresh
        .iter()
        .map(|(c, r)| Report {
            id: c.addr.clone(),
            generation: r.generation.as_ref().map(generation::from_wire),
            revision: r.revision,
            rebuilding: r.rebuilding,
            clean: r.clean,
        })
        .collect();
    let (base, next, serving) = match membership::plan_open(&cfg.replicas, &reports, epoch) {
        Plan::Serve {
            base, next, fresh, ..
        } => (base, next, fresh),
        Plan::Wait { why, waiting_for } => {
            return Err(EngineError::Waiting {
                volume: name,
                why,
                waiting_for: waiting_for.into_iter().collect(),
            })
        }
    };
    let reached: Vec<Arc<ReplicaConn>> = fresh.iter().map(|(c, _)| c.clone()).collect();
    // Whether an older engine may hold a read lease there, and since when it is quiet.
    let idle: Vec<(bool, u64)> = fresh
        .iter()
        .map(|(_, r)| (r.clean || r.previous_epoch == 0, r.idle_ms))
        .collect();
    let fresh_salvages: Vec<_> = fresh
        .iter()
        .flat_map(|(_, r)| r.salvages.iter().cloned())
        .collect();
    let recording = generation::Recording {
        volume: &cfg.volume,
        epoch,
        engine_id,
        timeout: take_timeout,
    };
    let stored = recording
        .store(&reached, &generation::to_wire(&next, "open"), |s| {
            base.counts(s)
        })
        .await;
    if !base.counts(&stored) {
        return Err(EngineError::Waiting {
            volume: name,
            why: format!(
                "generation {} (this engine's open) is stored on {} replica(s) of {}; {} are needed",
                next.number,
                stored.intersection(&base.replicas).count(),
                base.replicas.len(),
                base.majority()
            ),
            waiting_for: base.replicas.difference(&stored).cloned().collect(),
        });
    }
    let newest = fresh
        .iter()
        .filter(|(c, _)| serving.contains(&c.addr))
        .map(|(_, r)| r.revision)
        .max()
        .unwrap_or(0);
    let clean_start = fresh
        .iter()
        .filter(|(c, _)| serving.contains(&c.addr))
        .all(|(_, r)| r.clean);
    tracing::info!(volume = %cfg.volume, generation = next.number, revision = newest, serving = ?serving,
        "serving from the in-sync replicas of the newest generation");
    // Round 3: open the stream on every replica served from; the others get rebuilt.
    let taken = futures::future::join_all(fresh.into_iter().map(|(c, r)| {
        let serving = &serving;
        let base = &base;
        async move {
            if !serving.contains(&c.addr) {
                let why = if !base.replicas.contains(&c.addr) {
                    format!(
                        "not one of the volume's replicas in generation {} (removed, or never added); `tether replica add` adds it",
                        base.number
                    )
                } else if r.rebuilding {
                    "stale: its rebuild did not finish; it rebuilds again".to_string()
                } else if !base.in_sync.contains(&c.addr) {
                    format!(
                        "stale: not in sync in generation {}; it needs a rebuild",
                        base.number
                    )
                } else {
                    format!(
                        "stale: revision {} is behind the newest {newest}; it needs a rebuild",
                        r.revision
                    )
                };
                return (c, Err(why));
            }
            let mut res = c.start(epoch).await;
            if res.is_ok() && r.size < size {
                res = grow(&c, size, take_timeout).await;
            }
            (c, res)
        }
    }))
    .await;
    for (c, res) in taken {
        if let Err(why) = res {
            problems.push(format!("replica {}: {why}", c.addr));
            c.mark_failed(why);
        }
        conns.push(c);
    }
    // Keep the command-line order so status output is stable.
    conns.sort_by_key(|c| cfg.replicas.iter().position(|a| *a == c.addr));
    let healthy = conns.iter().filter(|c| c.is_healthy()).count();
    if healthy == 0 {
        return Err(EngineError::NoReplica {
            volume: name,
            details: problems.join("; "),
        });
    }
    // Every salvage any replica remembers, oldest first, each once.
    let mut salvages: Vec<_> = fresh_salvages.into_iter().collect();
    salvages.sort_by_key(|g| (g.number, g.epoch));
    salvages.dedup_by_key(|g| (g.number, g.epoch));
    // An older engine may still answer reads for the rest of its lease: wait it out
    // before anything is acknowledged here (`volume::lease`).
    let wait = lease::wait_to_serve(
        idle.iter()
            .map(|&(clean, ms)| (!clean).then_some(Duration::from_millis(ms))),
    );
    if !wait.is_zero() {
        tracing::info!(volume = %cfg.volume, epoch, ms = wait.as_millis() as u64,
            "waiting for the previous engine's read lease to end before serving");
        tokio::time::sleep(wait).await;
    }
    tracing::info!(volume = %cfg.volume, epoch, revision = newest, healthy, total = conns.len(), size, "volume open");
    Ok(Arc::new(
        Volume::new(&cfg.volume, size, epoch, conns, newest, cfg.timeout, fence)
            .with_policy(cfg.min_replicas, cfg.desired_replicas, engine_id)
            .with_generation(Some(next), cfg.quorum_wait)
            .with_rebuild_rate(cfg.rebuild_rate)
            .with_clean_start(clean_start)
            .with_salvages(salvages.iter().map(generation::describe_salvage).collect())
            .with_cipher(cipher, params)
            .with_connector(connector),
    ))
}

/// Grows a replica that missed an expansion to `size`, on its stream.
async fn grow(c: &ReplicaConn, size: u64, timeout: Duration) -> Result<(), String> {
    let rx = c.submit(Op::Expand(Expand { size }));
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(Ok(_))) => {
            tracing::info!(replica = %c.addr, size, "grown to the volume's size: it missed an expansion");
            Ok(())
        }
        Ok(Ok(Err(e))) => Err(format!(
            "growing to {size} bytes (an expansion it missed): {e}"
        )),
        Ok(Err(_)) | Err(_) => Err(format!(
            "growing to {size} bytes (an expansion it missed): no answer"
        )),
    }
}

/// Opens the volume on the replica at `addr` without taking an epoch (a probe), creating
/// it with `create` bytes when given.
async fn probe(
    cfg: &EngineConfig,
    connector: &dyn Connector,
    addr: &str,
    create: Option<u64>,
    encryption: String,
    fence: &Arc<Fence>,
) -> Probe {
    let req = OpenRequest {
        volume: cfg.volume.clone(),
        size: create.unwrap_or(0),
        create: create.is_some(),
        epoch: 0,
        engine_id: 0,
        rebuild: false,
        encryption,
        adopt_encryption: false,
    };
    let link = connector.connect(addr).await.map_err(|e| (e, false))?;
    let conn = ReplicaConn::new(addr, &req.volume.clone(), link, fence.clone());
    let reply = tokio::time::timeout(cfg.timeout, conn.open(req))
        .await
        .map_err(|_| {
            (
                format!("replica {addr}: no answer to open within {:?}", cfg.timeout),
                false,
            )
        })?
        .map_err(|s| {
            (
                format!("replica {addr}: {}", s.message()),
                tether_proto::wire::code_of(&s) == Some(tether_proto::replica::ErrorCode::NotFound),
            )
        })?;
    Ok((conn, reply))
}

type Probe = Result<(Arc<ReplicaConn>, tether_proto::replica::OpenReply), (String, bool)>;

/// Decides the volume's encryption from what the replicas hold and the key given:
/// the mode is fixed at creation, and a missing or wrong key is refused here.
fn encryption_for(
    cfg: &EngineConfig,
    addrs: &[String],
    probes: &[Probe],
) -> Result<(String, Option<crypt::Cipher>), EngineError> {
    let err = |msg: String| EngineError::Config {
        volume: cfg.volume.clone(),
        msg,
    };
    // (address, parameters, whether the copy was ever served)
    let existing: Vec<(&String, &str, bool)> = addrs
        .iter()
        .zip(probes)
        .filter_map(|(a, p)| {
            let (_, r) = p.as_ref().ok()?;
            Some((a, r.encryption.as_str(), !never_served(r)))
        })
        .collect();
    let Some(&(first_addr, first, _)) = existing.first() else {
        // New everywhere (or unreachable everywhere): created encrypted with a key.
        return match &cfg.encryption_key {
            None => Ok((String::new(), None)),
            Some(key) => {
                let p = crypt::Params::create(key).map_err(|e| err(e.to_string()))?;
                let c = p.unlock(key, &cfg.volume).map_err(|e| err(e.to_string()))?;
                tracing::info!(volume = %cfg.volume, kdf = %p.kdf, "creating an encrypted volume (AES-256-GCM)");
                Ok((p.encode(), Some(c)))
            }
        };
    };
    // An encrypted copy wins over an unencrypted one: never fall back to plaintext.
    // Among encrypted copies, one that was ever served holds blocks sealed under its
    // parameters and wins. Copies never served differ only when engines created the
    // volume at once; the smallest parameters win, so every engine picks the same
    // ones, and the others take them with the epoch (`adopt_encryption`).
    let encrypted = existing.iter().filter(|(_, e, _)| !e.is_empty());
    let (src_addr, params) = encrypted
        .clone()
        .find(|(_, _, served)| *served)
        .or_else(|| encrypted.min_by_key(|(_, e, _)| *e))
        .map_or((first_addr, first), |&(a, e, _)| (a, e));
    if params.is_empty() {
        if cfg.encryption_key.is_some() {
            return Err(err(format!(
                "the volume exists unencrypted (on {src_addr}) and an encryption key was given; the mode is fixed at creation: start without --encryption-key-file and {}",
                crypt::KEY_ENV
            )));
        }
        return Ok((String::new(), None));
    }
    let Some(key) = &cfg.encryption_key else {
        return Err(err(format!(
            "the volume is encrypted (per {src_addr}); give its key with --encryption-key-file PATH or {}",
            crypt::KEY_ENV
        )));
    };
    let p = crypt::Params::parse(params, &cfg.volume).map_err(|e| err(e.to_string()))?;
    let c = p.unlock(key, &cfg.volume).map_err(|e| err(e.to_string()))?;
    tracing::info!(volume = %cfg.volume, "encryption key checked");
    Ok((params.to_string(), Some(c)))
}

/// Whether a replica's copy was never served: no engine stored a membership
/// generation there, so no write reached it.
fn never_served(r: &tether_proto::replica::OpenReply) -> bool {
    r.generation.is_none() && r.salvages.is_empty() && r.revision == 0 && !r.rebuilding
}

/// Whether a copy under other encryption parameters than `params` may take them:
/// it was never served, and both are encrypted (the layouts differ otherwise).
fn adoptable(r: &tether_proto::replica::OpenReply, params: &str) -> bool {
    never_served(r) && !r.encryption.is_empty() && !params.is_empty()
}

/// An operator's salvage of `volume`: takes a new epoch on every replica in
/// `replicas` that answers (fencing any engine serving it), and records there a
/// generation, marked as a salvage, in which only `from` are in sync and the replicas
/// reached are the volume's. A waiting engine then serves from `from`; writes that
/// only other replicas held are given up. Returns the generation recorded.
pub async fn salvage(
    volume: &str,
    replicas: &[String],
    from: &[String],
    connector: &dyn Connector,
    timeout: Duration,
) -> Result<membership::Generation, EngineError> {
    let err = |msg: String| EngineError::Config {
        volume: volume.to_string(),
        msg,
    };
    if let Some(f) = from.iter().find(|f| !replicas.contains(f)) {
        return Err(err(format!(
            "--from {f} is not among the --replica addresses"
        )));
    }
    let fence = Fence::new(volume);
    let mut reached = Vec::new();
    let mut problems = Vec::new();
    for addr in replicas {
        let link = match connector.connect(addr).await {
            Ok(l) => l,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let conn = ReplicaConn::new(addr, volume, link, fence.clone());
        let req = OpenRequest {
            volume: volume.to_string(),
            ..Default::default()
        };
        match tokio::time::timeout(timeout, conn.open(req)).await {
            Ok(Ok(reply)) => reached.push((conn, reply)),
            Ok(Err(s)) => problems.push(format!("replica {addr}: {}", s.message())),
            Err(_) => problems.push(format!("replica {addr}: no answer within {timeout:?}")),
        }
    }
    for f in from {
        if !reached.iter().any(|(c, _)| &c.addr == f) {
            return Err(err(format!(
                "replica {f} (--from) did not answer, so its data cannot be served: {}",
                problems.join("; ")
            )));
        }
    }
    let epoch = reached
        .iter()
        .map(|(_, r)| r.previous_epoch)
        .max()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or_else(|| err("a replica reports the largest possible epoch".into()))?;
    let engine_id = 0;
    let mut reports = Vec::new();
    for (c, _) in &reached {
        let req = OpenRequest {
            volume: volume.to_string(),
            epoch,
            engine_id,
            ..Default::default()
        };
        match tokio::time::timeout(timeout, c.open(req)).await {
            Ok(Ok(r)) => reports.push(Report {
                id: c.addr.clone(),
                generation: r.generation.as_ref().map(generation::from_wire),
                revision: r.revision,
                rebuilding: r.rebuilding,
                clean: r.clean,
            }),
            Ok(Err(s)) => {
                return Err(EngineError::Raced {
                    volume: volume.to_string(),
                    details: format!("replica {}: taking epoch {epoch}: {}", c.addr, s.message()),
                })
            }
            Err(_) => problems.push(format!(
                "replica {}: no answer while taking the epoch",
                c.addr
            )),
        }
    }
    let all: std::collections::BTreeSet<String> = reports.iter().map(|r| r.id.clone()).collect();
    let from: std::collections::BTreeSet<String> = from.iter().cloned().collect();
    let g = membership::salvage(&reports, &from, &all, epoch);
    let mut wire = generation::to_wire(&g, &format!(
        "salvage: serve from {} by an operator's choice; writes only other replicas held are given up",
        from.iter().cloned().collect::<Vec<_>>().join(", ")
    ));
    wire.salvage = true;
    let conns: Vec<Arc<ReplicaConn>> = reached.iter().map(|(c, _)| c.clone()).collect();
    let recording = generation::Recording {
        volume,
        epoch,
        engine_id,
        timeout,
    };
    // Every replica reached is told, not just enough of them: the operator's choice
    // should be everywhere it can be.
    let stored = recording.store(&conns, &wire, |_| false).await;
    if !from.is_subset(&stored) {
        return Err(err(format!(
            "the salvage generation could not be stored on every --from replica (stored on {})",
            stored.iter().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    tracing::warn!(volume, generation = g.number, from = ?from, stored = ?stored,
        "salvage recorded: an operator accepted the data of these replicas");
    Ok(g)
}
