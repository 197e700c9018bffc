//! The tether engine: one process per volume. It opens the volume on its replicas,
//! serves it over NBD, and answers control requests on a Unix socket.

pub mod backup;
pub mod control;
pub mod crypt;
pub mod error;
pub mod membership;
pub mod metrics;
pub mod nbd;
pub mod open;
pub mod phase;
pub mod progress;
pub mod range_lock;
pub mod rebuild;
pub mod replica;
pub mod schedule;
pub mod scheduler;
pub mod tls;
pub mod volume;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use open::{open_volume, open_volume_with};

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
    /// How long I/O waits for a membership change to count before it fails with EIO.
    pub quorum_wait: Duration,
    /// Bytes per second a rebuild may copy (0: no limit).
    pub rebuild_rate: u64,
    /// Snapshots, backups and gc the engine runs by itself.
    pub schedule: Option<scheduler::Schedule>,
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
    /// The membership rule does not let this engine serve yet.
    #[error(
        "volume {volume}: not serving yet: {why}; waiting for {}",
        phase::waiting_list(waiting_for)
    )]
    Waiting {
        volume: String,
        why: String,
        waiting_for: Vec<String>,
    },
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

/// Opens the volume through `connector`, asking again every 2 s while the membership
/// rule does not let it serve; each wait is logged and noted in `state` (for status and
/// metrics). Any other error ends it.
pub async fn open_when_allowed(
    cfg: &EngineConfig,
    connector: Arc<dyn replica::Connector>,
    state: &phase::EngineState,
) -> Result<Arc<volume::Volume>, EngineError> {
    loop {
        match open_volume_with(cfg, connector.clone()).await {
            Err(EngineError::Waiting {
                volume,
                why,
                waiting_for,
            }) => {
                tracing::warn!(%volume, "not serving yet: {why}; waiting for {}; trying again",
                    phase::waiting_list(&waiting_for));
                state.wait(why, waiting_for);
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            r => return r,
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
    // The control socket is bound before replicas are touched, so a taken path fails fast.
    let control = control::bind(&cfg.control_socket).map_err(|e| {
        listen_err(
            format!(
                "control socket {} (choose another with --control-socket)",
                cfg.control_socket.display()
            ),
            e,
        )
    })?;
    // A taken NBD address fails now, before any replica is touched; the engine
    // listens for NBD clients only once it serves.
    if let Some(a) = cfg.nbd_listen {
        drop(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| listen_err(format!("NBD address {a}"), e))?,
        );
    }
    // Status and metrics answer from the start, so a waiting engine says what it
    // waits for; the other control requests wait until it serves.
    let state = phase::EngineState::new(&cfg.volume, &cfg.replicas);
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| listen_err(format!("metrics address {addr}"), e))?;
        tasks.spawn(metrics::serve(l, state.clone()));
    }
    let jobs: scheduler::JobSlot = Default::default();
    let sched_status: scheduler::StatusSlot = Default::default();
    let svc = control::ControlService::new(state.clone(), jobs.clone(), sched_status.clone());
    tasks.spawn(async move {
        if let Err(e) = control::serve(control, svc).await {
            tracing::error!(error = %e, "control API stopped");
        }
    });
    let connector = Arc::new(open::grpc_connector(&cfg));
    tokio::pin!(shutdown);
    let opened = tokio::select! {
        _ = &mut shutdown => None,
        r = open_when_allowed(&cfg, connector, &state) => Some(r),
    };
    let volume = match opened {
        Some(Ok(v)) => v,
        done => {
            tasks.abort_all();
            let _ = std::fs::remove_file(&cfg.control_socket);
            return done.transpose().map(|_| ());
        }
    };
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
    tasks.spawn(rebuild::watch(volume.clone()));
    tasks.spawn(volume::lease::keep(volume.clone()));
    if let Some(s) = cfg.schedule.clone().filter(|s| !s.policy.is_empty()) {
        tasks.spawn(scheduler::run(volume.clone(), s, jobs, sched_status));
    }
    state.serve(volume.clone(), nbd_address.clone());
    if let Some(l) = tcp {
        // Small NBD replies must not wait for delayed ACKs.
        let conns =
            futures::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(l), |c| {
                c.inspect(|s| {
                    let _ = s.set_nodelay(true);
                    tether_proto::wire::tune_local_tcp(s);
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
