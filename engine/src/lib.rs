//! The tether engine: one process per volume. It opens the volume on its replicas,
//! serves it over NBD, and answers control requests on a Unix socket.

pub mod control;
pub mod crypt;
pub mod error;
pub mod metrics;
pub mod nbd;
pub mod progress;
pub mod range_lock;
pub mod rebuild;
pub mod replica_client;
pub mod tls;
pub mod volume;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::replica::OpenRequest;

use crate::replica_client::{Fence, ReplicaConn};
use crate::volume::Volume;

/// How to run one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Volume name; also the NBD export name.
    pub volume: String,
    /// Size in bytes; needed when the volume does not exist yet.
    pub size: Option<u64>,
    /// Replica daemon addresses.
    pub replicas: Vec<String>,
    /// TCP address for NBD clients.
    pub nbd_listen: Option<SocketAddr>,
    /// Unix socket path for NBD clients.
    pub nbd_socket: Option<PathBuf>,
    /// Control API socket.
    pub control_socket: PathBuf,
    /// How long a replica may take to answer before it is dropped.
    pub timeout: Duration,
    /// Fewer healthy replicas than this: writes fail with EIO.
    pub min_replicas: usize,
    /// Replica count wanted (0: as many as given); fewer healthy is degraded.
    pub desired_replicas: usize,
    /// Serve Prometheus metrics here.
    pub metrics_listen: Option<SocketAddr>,
    /// The volume key: new volumes are created encrypted with it, and an encrypted
    /// volume needs it to open.
    pub encryption_key: Option<crypt::KeyMaterial>,
    /// Mutual TLS towards the replicas.
    pub replica_tls: Option<tls::Identity>,
    /// TLS for NBD clients (`NBD_OPT_STARTTLS`); when set, plaintext is refused.
    pub nbd_tls: Option<tls::NbdTls>,
}

/// Why the engine could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration cannot work.
    #[error("volume {volume}: {msg}")]
    Config { volume: String, msg: String },
    /// No replica could serve the volume.
    #[error("volume {volume}: no replica can serve it: {details}")]
    NoReplica { volume: String, details: String },
    /// Another engine took a newer epoch on a replica while this one was opening.
    #[error("volume {volume}: {details}; another engine took the volume while this one was opening it, so this one does not serve: stop the other engine, or start this one again to take over")]
    Raced { volume: String, details: String },
    /// A listening socket could not be set up.
    #[error("volume {volume}: cannot listen on {what}: {source}")]
    Listen {
        volume: String,
        what: String,
        source: std::io::Error,
    },
}

/// Opens the volume on every replica, choosing the freshest and taking a new epoch.
pub async fn open_volume(cfg: &EngineConfig) -> Result<Arc<Volume>, EngineError> {
    let name = cfg.volume.clone();
    let cfg_err = |msg: String| EngineError::Config {
        volume: name.clone(),
        msg,
    };
    if cfg.replicas.is_empty() {
        return Err(cfg_err("give at least one --replica ADDR".into()));
    }
    if let Some(size) = cfg.size {
        if size == 0 || !size.is_multiple_of(volume::BLOCK) {
            return Err(cfg_err(format!(
                "size {size} must be a positive multiple of {} bytes",
                volume::BLOCK
            )));
        }
    }
    let connect_timeout = cfg.timeout.min(Duration::from_secs(5));
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
            .map(|a| probe(cfg, a, false, String::new(), connect_timeout, &fence)),
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
    // Create the volume where it is missing, with the volume's encryption parameters.
    if cfg.size.is_some() {
        let created = futures::future::join_all(
            cfg.replicas
                .iter()
                .zip(probes.iter())
                .filter(|(_, p)| matches!(p, Err((_, true))))
                .map(|(addr, _)| probe(cfg, addr, true, params.clone(), connect_timeout, &fence)),
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
            Ok((conn, reply)) if reply.encryption != params => {
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
    let size = reachable[0].1.size;
    for (c, r) in &reachable {
        if r.size != size {
            return Err(cfg_err(format!(
                "replicas disagree on the size: {} has {} bytes, {} has {size}; remove the odd one from --replica",
                c.addr, r.size, reachable[0].0.addr
            )));
        }
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
        let req = OpenRequest {
            volume: cfg.volume.clone(),
            size,
            create: false,
            epoch,
            engine_id,
            rebuild: false,
            encryption: String::new(),
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
    // Only the replicas with the highest durable revision may serve: a lower one
    // missed writes while it was away. Read after the epoch is taken, so no older
    // engine moves it any more.
    // A replica with an unfinished rebuild may have the newest writes but miss older
    // ones: its revision proves nothing, so it never counts as fresh.
    let newest = fresh
        .iter()
        .filter(|(_, r)| !r.rebuilding)
        .map(|(_, r)| r.revision)
        .max()
        .unwrap_or(0);
    let best: Vec<&str> = fresh
        .iter()
        .filter(|(_, r)| r.revision == newest && !r.rebuilding)
        .map(|(c, _)| c.addr.as_str())
        .collect();
    let all_dirty = fresh.iter().all(|(_, r)| !r.clean);
    tracing::info!(volume = %cfg.volume, revision = newest, serving = ?best, all_dirty,
        "serving from the replicas with the highest durable revision{}",
        if all_dirty { " (none closed cleanly: the highest revision is the freshest that is provable)" } else { "" });
    // Round 3: open the stream on every fresh replica; the others get rebuilt.
    let taken = futures::future::join_all(fresh.into_iter().map(|(c, r)| async move {
        if r.rebuilding {
            return (
                c,
                Err("stale: its rebuild did not finish; it rebuilds again".to_string()),
            );
        }
        if r.revision < newest {
            let why = format!(
                "stale: revision {} is behind the newest {newest}; it needs a rebuild",
                r.revision
            );
            return (c, Err(why));
        }
        let res = c.start(epoch).await;
        (c, res)
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
    tracing::info!(volume = %cfg.volume, epoch, revision = newest, healthy, total = conns.len(), size, "volume open");
    Ok(Arc::new(
        Volume::new(&cfg.volume, size, epoch, conns, newest, cfg.timeout, fence)
            .with_policy(cfg.min_replicas, cfg.desired_replicas, engine_id)
            .with_cipher(cipher, params)
            .with_tls(cfg.replica_tls.clone()),
    ))
}

/// Opens the volume on the replica at `addr` without taking an epoch (a probe), creating
/// it when `create` is set.
async fn probe(
    cfg: &EngineConfig,
    addr: &str,
    create: bool,
    encryption: String,
    connect_timeout: Duration,
    fence: &Arc<Fence>,
) -> Probe {
    let req = OpenRequest {
        volume: cfg.volume.clone(),
        size: cfg.size.unwrap_or(0),
        create,
        epoch: 0,
        engine_id: 0,
        rebuild: false,
        encryption,
    };
    let client = replica_client::connect(addr, connect_timeout, cfg.replica_tls.as_ref())
        .await
        .map_err(|e| (e, false))?;
    let conn = ReplicaConn::new(addr, &req.volume.clone(), client, fence.clone());
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
    let existing: Vec<(&String, &str)> = addrs
        .iter()
        .zip(probes)
        .filter_map(|(a, p)| p.as_ref().ok().map(|(_, r)| (a, r.encryption.as_str())))
        .collect();
    let Some(&(first_addr, first)) = existing.first() else {
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
    let (src_addr, params) = existing
        .iter()
        .find(|(_, e)| !e.is_empty())
        .copied()
        .unwrap_or((first_addr, first));
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

/// Serves every NBD client that `conns` yields, each on its own task.
async fn accept_loop<S>(
    volume: String,
    exports: Arc<nbd::export::VolumeExports>,
    mut conns: impl futures::Stream<Item = std::io::Result<S>> + Unpin,
    tls: Option<tokio_rustls::TlsAcceptor>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    while let Some(conn) = futures::StreamExt::next(&mut conns).await {
        match conn {
            Ok(s) => {
                let (exports, volume, tls) = (exports.clone(), volume.clone(), tls.clone());
                tokio::spawn(async move {
                    if let Err(e) = nbd::serve_connection(s, exports, tls).await {
                        tracing::info!(volume = %volume, error = %e, "NBD client dropped");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(volume = %volume, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Runs the engine until `shutdown` resolves, then flushes and closes cleanly.
pub async fn run(cfg: EngineConfig, shutdown: impl Future<Output = ()>) -> Result<(), EngineError> {
    let listen_err = |what: String, source| EngineError::Listen {
        volume: cfg.volume.clone(),
        what,
        source,
    };
    if cfg.nbd_listen.is_none() && cfg.nbd_socket.is_none() {
        return Err(EngineError::Config {
            volume: cfg.volume.clone(),
            msg: "give --nbd-listen ADDR or --nbd-socket PATH".into(),
        });
    }
    // Bind everything before touching replicas, so a taken port fails fast.
    let control = control::bind(&cfg.control_socket).map_err(|e| {
        listen_err(
            format!(
                "control socket {} (choose another with --control-socket)",
                cfg.control_socket.display()
            ),
            e,
        )
    })?;
    let tcp = match cfg.nbd_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| listen_err(format!("NBD address {a}"), e))?,
        ),
        None => None,
    };
    let unix = match &cfg.nbd_socket {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            Some(
                tokio::net::UnixListener::bind(p)
                    .map_err(|e| listen_err(format!("NBD socket {}", p.display()), e))?,
            )
        }
        None => None,
    };
    let volume = open_volume(&cfg).await?;
    if let Err(e) = volume.space().await {
        tracing::warn!(volume = %cfg.volume, error = %e, "cannot list snapshots yet");
    }
    let exports = Arc::new(nbd::export::VolumeExports(volume.clone()));
    let nbd_address = match (&cfg.nbd_listen, &cfg.nbd_socket) {
        (Some(a), _) if cfg.nbd_tls.is_some() => format!("nbds://{a}/{}", cfg.volume),
        (Some(a), _) => format!("nbd://{a}/{}", cfg.volume),
        (None, Some(p)) => format!("nbd+unix:///{}?socket={}", cfg.volume, p.display()),
        (None, None) => String::new(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(rebuild::watch(volume.clone()));
    if let Some(addr) = cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| listen_err(format!("metrics address {addr}"), e))?;
        tasks.spawn(metrics::serve(l, volume.clone()));
    }
    let svc = control::ControlService::new(volume.clone(), nbd_address.clone());
    tasks.spawn(async move {
        if let Err(e) = control::serve(control, svc).await {
            tracing::error!(error = %e, "control API stopped");
        }
    });
    if let Some(l) = tcp {
        // Small NBD replies must not wait for delayed ACKs.
        let conns =
            futures::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(l), |c| {
                c.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            });
        // TLS guards the network; the local Unix socket stays plaintext.
        let tls = cfg.nbd_tls.as_ref().map(|t| t.0.clone());
        tasks.spawn(accept_loop(cfg.volume.clone(), exports.clone(), conns, tls));
    }
    if let Some(l) = unix {
        let conns = tokio_stream::wrappers::UnixListenerStream::new(l);
        tasks.spawn(accept_loop(
            cfg.volume.clone(),
            exports.clone(),
            conns,
            None,
        ));
    }
    tracing::info!(volume = %cfg.volume, nbd = %nbd_address, control = %cfg.control_socket.display(), "engine serving");
    shutdown.await;
    tracing::info!(volume = %cfg.volume, "engine stopping: flushing replicas");
    tasks.abort_all();
    volume.shutdown().await;
    let _ = std::fs::remove_file(&cfg.control_socket);
    if let Some(p) = &cfg.nbd_socket {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!(volume = %cfg.volume, "engine stopped");
    Ok(())
}
