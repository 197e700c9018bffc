//! The long-running roles: a replica daemon and a volume's engine.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tether_engine::{control, crypt, tls, EngineConfig};

use crate::cli::{EngineArgs, TlsArgs};

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Runs a replica daemon until a signal stops it.
pub(crate) async fn run_replica(
    listen: Option<std::net::SocketAddr>,
    data: Option<std::path::PathBuf>,
    opts: tether_replica::StoreOptions,
    tls: &TlsArgs,
) -> Result<()> {
    let (Some(listen), Some(data)) = (listen, data) else {
        bail!(
            "a replica daemon needs --listen ADDR and --data DIR (or use `tether replica add|rm`)"
        );
    };
    if opts.wal_size < 1 << 20 {
        bail!("--wal-size must be at least 1M");
    }
    let tls = replica_tls(tls)?;
    tether_replica::serve(listen, &data, opts, tls, shutdown_signal())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs the engine of one volume until a signal stops it.
pub(crate) async fn run_engine(a: EngineArgs) -> Result<()> {
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let control_socket = a
        .control_socket
        .unwrap_or_else(|| control::default_socket(&a.volume));
    let encryption_key = crypt::load_key(a.encryption_key_file.as_deref())
        .with_context(|| format!("volume {}: loading the encryption key", a.volume))?;
    let replica_tls = engine_tls(&a.tls)?;
    let nbd_tls = match (&a.nbd_tls_cert, &a.nbd_tls_key) {
        (Some(c), Some(k)) => Some(tls::nbd_acceptor(c, k)?),
        _ => None,
    };
    let cfg = EngineConfig {
        volume: a.volume,
        size: a.size,
        replicas: a.replicas,
        nbd_listen: a.nbd_listen,
        nbd_socket: a.nbd_socket,
        control_socket,
        timeout: seconds("--timeout", a.timeout)?,
        min_replicas: a.min_replicas,
        desired_replicas: a.desired_replicas.unwrap_or(0),
        metrics_listen: a.metrics_listen,
        encryption_key,
        replica_tls,
        nbd_tls,
        quorum_wait: seconds("--quorum-wait", a.quorum_wait)?,
        rebuild_rate: a.rebuild_rate << 20,
        schedule: schedule(&a.schedule).await?,
    };
    tether_engine::run(cfg, shutdown_signal()).await?;
    Ok(())
}

/// The engine's schedules from its flags; the backup target is opened now, so a
/// wrong passphrase fails the start, not the first backup.
async fn schedule(
    a: &crate::cli::ScheduleArgs,
) -> Result<Option<tether_engine::scheduler::Schedule>> {
    use tether_engine::schedule::{Every, Policy};
    let policy = Policy {
        snapshots: a.snapshot_every.map(|every| Every {
            every,
            keep: a.snapshot_keep,
        }),
        backups: a.backup_every.map(|every| Every {
            every,
            keep: a.backup_keep,
        }),
        gc: a.gc_every,
    };
    if policy.is_empty() {
        return Ok(None);
    }
    let target = match &a.backup_target {
        Some(url) => {
            let bt = crate::cli::BackupTarget {
                url: url.clone(),
                s3_endpoint: a.backup_s3_endpoint.clone(),
                s3_region: "us-east-1".into(),
                s3_path_style: a.backup_s3_path_style,
                s3_credentials: a.backup_s3_credentials.clone(),
                passphrase_file: a.backup_passphrase_file.clone(),
                backup_key_file: a.backup_key_file.clone(),
            };
            let (t, _, keys) = crate::backup::open(&bt)
                .await
                .context("opening the backup target of the engine's schedule")?;
            Some((t, keys))
        }
        None => None,
    };
    Ok(Some(tether_engine::scheduler::Schedule { policy, target }))
}

/// The replica side of `TlsArgs`.
fn replica_tls(a: &TlsArgs) -> Result<Option<tether_replica::ServerTls>> {
    tls::install_provider();
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
        if a.tls_ca.is_some() {
            bail!("--tls-ca needs --tls-cert and --tls-key: the replica must present a certificate too");
        }
        return Ok(None);
    };
    let id = tls::Identity::load(cert, key, a.tls_ca.as_deref().unwrap_or(cert))?;
    Ok(Some(tether_replica::ServerTls {
        cert: id.cert,
        key: id.key,
        ca: a.tls_ca.as_ref().map(|_| id.ca),
    }))
}

/// The engine side of `TlsArgs`: all three are needed.
pub(crate) fn engine_tls(a: &TlsArgs) -> Result<Option<tls::Identity>> {
    tls::install_provider();
    match (&a.tls_cert, &a.tls_key, &a.tls_ca) {
        (None, None, None) => Ok(None),
        (Some(c), Some(k), Some(ca)) => Ok(Some(tls::Identity::load(c, k, ca)?)),
        _ => bail!("TLS towards replicas needs all of --tls-cert, --tls-key and --tls-ca"),
    }
}

/// A flag's seconds as a duration; a negative, infinite or NaN value is refused.
fn seconds(flag: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|e| anyhow::anyhow!("{flag} {s}: {e}; give a number of seconds, 0 or more"))
}
