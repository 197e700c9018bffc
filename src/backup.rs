//! `tether backup target|create|ls|inspect|verify|restore`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::future::BoxFuture;
use tether_backup::{BackupError, Keys, Manifest, Progress, Secret, Target, TargetSpec};
use tether_engine::{backup as engine_backup, control, crypt, EngineConfig};
use tether_proto::engine::{BackupProgress, BackupRequest, RestoreRequest};

use crate::cli::{BackupCmd, BackupTarget, BackupTargetCmd};
use crate::render::human;

/// Environment variable holding the backup passphrase when no file is given.
const PASSPHRASE_ENV: &str = "TETHER_BACKUP_PASSPHRASE";
/// Environment variable holding the new passphrase for `rekey`.
const NEW_PASSPHRASE_ENV: &str = "TETHER_BACKUP_NEW_PASSPHRASE";

/// The target's address and credentials, from flags, files and the environment.
fn spec(t: &BackupTarget) -> Result<TargetSpec> {
    let (mut access, mut secret) = (
        std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
        std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
    );
    if let Some(f) = &t.s3_credentials {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading S3 credentials from {}", f.display()))?;
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                let v = v.trim().to_string();
                match k.trim().to_ascii_lowercase().as_str() {
                    "access_key_id" | "aws_access_key_id" => access = v,
                    "secret_access_key" | "aws_secret_access_key" => secret = v,
                    _ => {}
                }
            }
        }
    }
    Ok(TargetSpec {
        url: t.url.clone(),
        endpoint: t.s3_endpoint.clone().unwrap_or_default(),
        region: t.s3_region.clone(),
        path_style: t.s3_path_style,
        access_key: access,
        secret_key: secret,
    })
}

/// What opens the master key: a key file, a passphrase file, or the passphrase in
/// `env`.
fn secret_from(
    key_file: Option<&Path>,
    passphrase_file: Option<&Path>,
    env: &str,
) -> Result<Secret> {
    if let Some(f) = key_file {
        let k = std::fs::read(f)
            .with_context(|| format!("reading the backup key file {}", f.display()))?;
        return Ok(Secret::KeyFile(k));
    }
    let p = match passphrase_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the backup passphrase from {}", f.display()))?,
        None => std::env::var(env).map_err(|_| {
            anyhow!(
                "no backup passphrase: set {env}, or give a passphrase file or a backup key file"
            )
        })?,
    };
    let p = p.trim_end_matches(['\n', '\r']);
    Ok(Secret::Passphrase(p.as_bytes().to_vec()))
}

fn secret(t: &BackupTarget) -> Result<Secret> {
    secret_from(
        t.backup_key_file.as_deref(),
        t.passphrase_file.as_deref(),
        PASSPHRASE_ENV,
    )
}

/// Connects to the target and opens its master key.
pub(crate) async fn open(t: &BackupTarget) -> Result<(Target, tether_backup::TargetConfig, Keys)> {
    let target = Target::connect(&spec(t)?)?;
    let (cfg, keys) = target.unlock(&secret(t)?).await?;
    Ok((target, cfg, keys))
}

/// The backup `reference` names: `VOLUME/ID`, or VOLUME's newest (at or before `at`).
async fn resolve(
    target: &Target,
    keys: &Keys,
    reference: &str,
    at: Option<&str>,
) -> Result<Manifest> {
    if let Some((volume, id)) = reference.split_once('/') {
        if at.is_some() {
            bail!("give either VOLUME/ID or VOLUME with --at, not both");
        }
        return Ok(target.manifest(keys, volume, id).await?);
    }
    let volume = reference;
    let id = match at {
        Some(t) => {
            let when = humantime::parse_rfc3339_weak(t)
                .map_err(|e| anyhow!("--at {t}: {e}; use RFC 3339, e.g. 2026-12-04T18:00:00Z"))?
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let list = target.list(Some(volume)).await?;
            list.into_iter()
                .rev()
                .find(|(_, id)| tether_backup::manifest::id_millis(id).is_some_and(|s| s <= when))
                .map(|(_, id)| id)
                .ok_or_else(|| anyhow!("target {}: volume {volume} has no backup at or before {t}; `tether backup ls {volume}` lists them", target.name()))?
        }
        None => match target.latest(volume).await? {
            Some(id) => id,
            None => target
                .list(Some(volume))
                .await?
                .pop()
                .map(|(_, id)| id)
                .ok_or_else(|| {
                    anyhow!("target {}: volume {volume} has no backups", target.name())
                })?,
        },
    };
    Ok(target.manifest(keys, volume, &id).await?)
}

/// A progress bar on a terminal; elsewhere a line every 10 s.
struct Bar {
    bar: indicatif::ProgressBar,
    tty: bool,
    last: std::time::Instant,
    what: String,
}

impl Bar {
    fn new(what: &str) -> Bar {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(0),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Bar {
            bar,
            tty,
            last: std::time::Instant::now(),
            what: what.to_string(),
        }
    }

    fn update(&mut self, total: u64, done: u64, rate: u64, eta: u64) {
        self.bar.set_length(total);
        self.bar.set_position(done);
        if !self.tty && self.last.elapsed() > Duration::from_secs(10) {
            self.last = std::time::Instant::now();
            eprintln!(
                "{}: {} of {} at {}/s, ETA {eta} s",
                self.what,
                human(done),
                human(total),
                human(rate)
            );
        }
    }

    fn done(&self) {
        self.bar.finish_and_clear();
    }
}

/// Follows an engine's progress stream to its end; the last report.
async fn follow(
    mut stream: tonic::Streaming<BackupProgress>,
    what: &str,
) -> Result<BackupProgress> {
    let mut bar = Bar::new(what);
    let mut last = None;
    while let Some(p) = stream
        .message()
        .await
        .map_err(|e| anyhow!("{what}: {}", e.message()))?
    {
        bar.update(p.total_bytes, p.done_bytes, p.rate_bytes, p.eta_seconds);
        let finished = p.finished;
        last = Some(p);
        if finished {
            break;
        }
    }
    bar.done();
    let p = last.ok_or_else(|| anyhow!("{what}: the engine sent no progress"))?;
    if p.state == "failed" {
        bail!("{what} {} failed ({}): {}", p.backup, p.error_kind, p.error);
    }
    if !p.finished {
        bail!("{what} {}: the engine stopped reporting before it finished; see `tether volume status`", p.backup);
    }
    Ok(p)
}

/// Shows a local operation's progress until `fut` ends.
async fn with_bar<T>(
    what: &str,
    progress: Arc<Progress>,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let mut bar = Bar::new(what);
    tokio::pin!(fut);
    loop {
        tokio::select! {
            r = &mut fut => {
                bar.done();
                return r;
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                let p = progress.read();
                bar.update(p.total, p.done, p.rate, p.eta);
            }
        }
    }
}

/// Runs one `tether backup` subcommand.
pub(crate) async fn backup_cmd(cmd: BackupCmd) -> Result<()> {
    match cmd {
        BackupCmd::Target { cmd } => target_cmd(cmd).await,
        BackupCmd::Create {
            engine,
            target,
            snapshot,
            labels,
            concurrency,
        } => {
            let (t, _, keys) = open(&target).await?;
            let spec = serde_json::to_string(&spec(&target)?)?;
            let stream = crate::cli::engine(&engine)
                .await?
                .backup(BackupRequest {
                    target: spec,
                    master_key: keys.master().to_vec().into(),
                    snapshot: snapshot.unwrap_or_default(),
                    labels: labels.into_iter().collect(),
                    concurrency,
                })
                .await
                .map_err(engine.failed("backup create"))?
                .into_inner();
            let p = follow(stream, "backup").await?;
            println!(
                "backup {} of volume {} complete to {}: read {}, uploaded {} in {} objects ({}, {}/s)",
                p.backup,
                engine.volume,
                t.name(),
                human(p.done_bytes),
                human(p.object_bytes),
                p.objects,
                p.method,
                human(p.rate_bytes)
            );
            Ok(())
        }
        BackupCmd::Ls {
            target,
            volume,
            json,
        } => {
            let (t, _, keys) = open(&target).await?;
            let list = t.list(volume.as_deref()).await?;
            let mut rows = Vec::new();
            let mut bad = 0;
            for (v, id) in list {
                // One damaged manifest must not hide the others.
                match t.manifest(&keys, &v, &id).await {
                    Ok(m) => rows.push(m),
                    Err(e @ (BackupError::Corrupt(_) | BackupError::Invalid(_))) => {
                        eprintln!("backup {v}/{id}: cannot be read: {e}");
                        bad += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            crate::render::backups(&rows, json);
            if bad > 0 {
                bail!(
                    "{bad} backup(s) in {} cannot be read (listed above); the others are shown",
                    t.name()
                );
            }
            Ok(())
        }
        BackupCmd::Inspect {
            target,
            backup,
            at,
            json,
        } => {
            let (t, _, keys) = open(&target).await?;
            let m = resolve(&t, &keys, &backup, at.as_deref()).await?;
            crate::render::backup(&m, json);
            Ok(())
        }
        BackupCmd::Rm { target, backup } => {
            let Some((volume, id)) = backup.split_once('/') else {
                bail!("name the backup in full, VOLUME/ID (`tether backup ls` lists them)");
            };
            let (t, _, _) = open(&target).await?;
            let latest = t.remove(volume, id).await?;
            println!(
                "backup {volume}/{id} deleted from {}; latest backup of {volume}: {}",
                t.name(),
                latest.as_deref().unwrap_or("none")
            );
            Ok(())
        }
        BackupCmd::Follow(a) => crate::standby::follow(a).await,
        BackupCmd::Promote(a) => crate::standby::promote(a).await,
        BackupCmd::Gc {
            target,
            grace,
            checkpoint_keep,
            dry_run,
            json,
        } => gc(&target, grace, checkpoint_keep, dry_run, json).await,
        BackupCmd::Verify {
            target,
            backup,
            at,
            concurrency,
        } => {
            let (t, _, keys) = open(&target).await?;
            let m = resolve(&t, &keys, &backup, at.as_deref()).await?;
            let progress = Arc::new(Progress::default());
            let what = format!("verify {}/{}", m.header.volume, m.header.id);
            let problems = with_bar(
                &what,
                progress.clone(),
                tether_backup::verify(&t, &keys, &m, concurrency as usize, progress.clone()),
            )
            .await?;
            let p = progress.read();
            if !problems.is_empty() {
                for x in &problems {
                    eprintln!("{x}");
                }
                bail!(
                    "backup {}/{}: {} of {} chunks failed their check (listed above); do not restore from it",
                    m.header.volume,
                    m.header.id,
                    problems.len(),
                    m.chunks.len()
                );
            }
            println!(
                "backup {}/{} verified: {} chunks, {} downloaded, every chunk matches its name",
                m.header.volume,
                m.header.id,
                p.objects,
                human(p.object_bytes)
            );
            Ok(())
        }
        BackupCmd::Restore {
            target,
            backup,
            at,
            volume,
            replicas,
            to_file,
            encryption_key_file,
            control_socket,
            overwrite,
            resume,
            concurrency,
            tls,
        } => {
            let (t, _, keys) = open(&target).await?;
            let m = resolve(&t, &keys, &backup, at.as_deref()).await?;
            let started = std::time::Instant::now();
            let name = format!("{}/{}", m.header.volume, m.header.id);
            if let Some(path) = to_file {
                restore_to_file(&t, &keys, &m, &path, concurrency as usize, resume).await?;
                println!(
                    "backup {name} restored to {} ({}) in {:.1} s",
                    path.display(),
                    human(m.header.size),
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            let Some(volume) = volume else {
                bail!("give --volume NAME (with --replica ADDR…) or --to-file PATH");
            };
            let socket = control_socket.unwrap_or_else(|| control::default_socket(&volume));
            if let Ok(mut engine) = control::connect(&socket).await {
                let stream = engine
                    .restore(RestoreRequest {
                        target: serde_json::to_string(&spec(&target)?)?,
                        master_key: keys.master().to_vec().into(),
                        source_volume: m.header.volume.clone(),
                        backup: m.header.id.clone(),
                        concurrency,
                    })
                    .await
                    .map_err(|e| anyhow!("volume {volume}: restore failed: {}", e.message()))?
                    .into_inner();
                follow(stream, "restore").await?;
                println!(
                    "backup {name} restored into volume {volume} through its running engine in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if replicas.is_empty() {
                bail!("volume {volume} has no running engine at {}: give its replicas with --replica ADDR (repeat), and a new volume is created on them", socket.display());
            }
            let cfg = pilot_config(
                &volume,
                m.header.size,
                replicas,
                encryption_key_file.as_deref(),
                &tls,
                socket,
            )?;
            // Only a new volume unless told otherwise: opening an existing one here
            // would fence an engine serving it somewhere this command cannot see.
            let exists_on = exists_on(&cfg, &volume).await;
            if !exists_on.is_empty() && !overwrite && !resume {
                bail!(
                    "volume {volume} already exists on {}: restore into it through its running engine (--control-socket PATH), or stop that engine and add --overwrite; or choose a new volume name",
                    exists_on.join(", ")
                );
            }
            let cfg = EngineConfig {
                size: exists_on.is_empty().then_some(m.header.size),
                ..cfg
            };
            let v = tether_engine::open_volume(&cfg).await.with_context(|| {
                format!("volume {volume}: opening it on its replicas for the restore")
            })?;
            let lease = tokio::spawn(tether_engine::volume::lease::keep(v.clone()));
            let job = engine_backup::Job::new("restore", t.name().to_string());
            let r = with_bar(
                "restore",
                job.progress.clone(),
                engine_backup::restore(
                    v.begin_restore()
                        .map_err(|e| BackupError::Exists(e.to_string()))?,
                    &t,
                    &keys,
                    &m,
                    concurrency as usize,
                    resume && !exists_on.is_empty(),
                    job.clone(),
                ),
            )
            .await;
            lease.abort();
            v.shutdown().await;
            r.map_err(|e| {
                anyhow!(
                    "{e}\nvolume {volume} now holds part of backup {name}: do not serve it; run this restore again with --resume"
                )
            })?;
            let p = job.progress.read();
            println!(
                "backup {name} restored into volume {volume} ({}, {} chunks downloaded, {}) in {:.1} s; start its engine with the same --replica addresses to serve it",
                human(m.header.size),
                p.objects,
                human(p.object_bytes),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

/// The replicas of `cfg` that hold volume `volume` already.
/// An engine this command runs in-process for `volume` on `replicas`, with no NBD
/// export: the pilot light of a restore, a standby's follower, a promotion.
pub(crate) fn pilot_config(
    volume: &str,
    size: u64,
    replicas: Vec<String>,
    key_file: Option<&Path>,
    tls: &crate::cli::TlsArgs,
    control_socket: std::path::PathBuf,
) -> Result<EngineConfig> {
    let key = crypt::load_key(key_file)
        .with_context(|| format!("volume {volume}: loading the encryption key"))?;
    Ok(EngineConfig {
        volume: volume.to_string(),
        size: Some(size),
        replicas,
        nbd_listen: None,
        nbd_socket: None,
        control_socket,
        timeout: Duration::from_secs(8),
        min_replicas: 1,
        desired_replicas: 0,
        metrics_listen: None,
        encryption_key: key,
        replica_tls: crate::daemon::engine_tls(tls)?,
        nbd_tls: None,
        quorum_wait: Duration::from_secs(30),
        rebuild_rate: 0,
        schedule: None,
    })
}

/// The replicas among `cfg`'s that already hold `volume`.
pub(crate) async fn exists_on(cfg: &EngineConfig, volume: &str) -> Vec<String> {
    use tether_engine::replica::Connector as _;
    let connector = tether_engine::open::grpc_connector(cfg);
    let mut out = Vec::new();
    for addr in &cfg.replicas {
        let Ok(link) = connector.connect(addr).await else {
            continue;
        };
        let req = tether_proto::replica::SnapshotsRequest {
            volume: volume.to_string(),
        };
        if link.snapshots(req).await.is_ok() {
            out.push(addr.clone());
        }
    }
    out
}

/// `tether backup gc`: runs it with a progress line, then prints what it did.
async fn gc(
    target: &BackupTarget,
    grace: Duration,
    checkpoint_keep: Duration,
    dry_run: bool,
    json: bool,
) -> Result<()> {
    let (t, cfg, keys) = open(target).await?;
    let opts = tether_backup::GcOptions {
        grace,
        dry_run,
        checkpoint_keep,
        ..Default::default()
    };
    let progress = tether_backup::GcProgress::default();
    let fut = tether_backup::gc(&t, &keys, &cfg, &opts, &progress);
    tokio::pin!(fut);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let spinner = indicatif::ProgressBar::new_spinner();
    let mut last = std::time::Instant::now();
    let report = loop {
        tokio::select! {
            r = &mut fut => break r?,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                let line = format!(
                    "gc {}: {} manifests read, {} chunks listed, {} deleted",
                    progress.phase.lock(),
                    progress.maps_read.load(std::sync::atomic::Ordering::Relaxed),
                    progress.listed.load(std::sync::atomic::Ordering::Relaxed),
                    progress.deleted.load(std::sync::atomic::Ordering::Relaxed),
                );
                if tty {
                    spinner.set_message(line);
                    spinner.tick();
                } else if last.elapsed() > Duration::from_secs(10) {
                    last = std::time::Instant::now();
                    eprintln!("{line}");
                }
            }
        }
    };
    spinner.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "gc of {}{}: {} backups and {} checkpoints reference {} chunks",
        t.name(),
        if dry_run { " (dry run)" } else { "" },
        report.manifests,
        report.checkpoints,
        report.referenced
    );
    println!(
        "  {} chunks listed ({}); {} {} ({}); {} unreferenced kept as younger than the cutoff",
        report.chunks,
        human(report.bytes),
        if dry_run { "would delete" } else { "deleted" },
        report.deleted,
        human(report.bytes_deleted),
        report.kept_young
    );
    println!(
        "  {} running backups' leases honoured; {} expired leases and {} abandoned checkpoints removed; {:.1} s",
        report.leases_running,
        report.leases_removed,
        report.checkpoints_removed,
        report.millis as f64 / 1000.0
    );
    if let Some(why) = &report.skipped {
        println!("  nothing swept: {why}");
    }
    Ok(())
}

async fn target_cmd(cmd: BackupTargetCmd) -> Result<()> {
    match cmd {
        BackupTargetCmd::Init {
            target,
            chunk_size,
            lease_time,
        } => {
            let t = Target::connect(&spec(&target)?)?;
            let s = secret(&target)?;
            t.init(chunk_size, lease_time, &s).await?;
            t.check_writable().await?;
            println!(
                "backup target {} initialised: {} chunks, master key wrapped by {}.\nKeep the {} safe: without it, every backup in this target is lost.",
                t.name(),
                human(chunk_size),
                match s {
                    Secret::Passphrase(_) => "a passphrase (Argon2id)",
                    Secret::KeyFile(_) => "a key file",
                },
                match s {
                    Secret::Passphrase(_) => "passphrase",
                    Secret::KeyFile(_) => "key file",
                }
            );
        }
        BackupTargetCmd::Show { target } => {
            let t = Target::connect(&spec(&target)?)?;
            let cfg = t.config().await?;
            println!("target:      {}", t.name());
            println!("reachable:   yes");
            println!("chunk size:  {}", human(cfg.chunk_size));
            println!("lease time:  {}", humantime::format_duration(cfg.lease()));
            println!("key wrapped: by a {}", cfg.key.kind);
            t.unlock(&secret(&target)?).await?;
            println!("key opens:   yes");
            t.check_writable().await?;
            println!("writable:    yes");
            let list = t.list(None).await?;
            println!("backups:     {}", list.len());
        }
        BackupTargetCmd::Rekey {
            target,
            new_passphrase_file,
            new_backup_key_file,
        } => {
            let t = Target::connect(&spec(&target)?)?;
            let new = secret_from(
                new_backup_key_file.as_deref(),
                new_passphrase_file.as_deref(),
                NEW_PASSPHRASE_ENV,
            )?;
            t.rekey(&secret(&target)?, &new).await?;
            println!(
                "backup target {}: master key wrapped anew; the old passphrase or key file no longer opens it",
                t.name()
            );
        }
    }
    Ok(())
}

/// A raw image file as a restore writes it.
struct FileSink(Arc<std::fs::File>);

impl tether_backup::Sink for FileSink {
    fn write(&self, offset: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), BackupError>> {
        let f = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                std::os::unix::fs::FileExt::write_all_at(&*f, &data, offset)
            })
            .await
            .map_err(|e| BackupError::Volume(format!("a writer stopped: {e}")))?
            .map_err(|e| BackupError::Volume(format!("writing the image at byte {offset}: {e}")))
        })
    }

    fn zero(&self, _offset: u64, _len: u64) -> BoxFuture<'_, Result<(), BackupError>> {
        // The file is new and sparse: it reads zeroes already.
        Box::pin(async { Ok(()) })
    }

    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Option<Vec<u8>>, BackupError>> {
        let f = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut b = vec![0u8; len as usize];
                std::os::unix::fs::FileExt::read_exact_at(&*f, &mut b, offset).map(|_| Some(b))
            })
            .await
            .map_err(|e| BackupError::Volume(format!("a reader stopped: {e}")))?
            .map_err(|e| BackupError::Volume(format!("reading the image at byte {offset}: {e}")))
        })
    }

    fn finish(&self) -> BoxFuture<'_, Result<(), BackupError>> {
        let f = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f.sync_all())
                .await
                .map_err(|e| BackupError::Volume(format!("a writer stopped: {e}")))?
                .map_err(|e| BackupError::Volume(format!("syncing the image: {e}")))
        })
    }
}

async fn restore_to_file(
    t: &Target,
    keys: &Keys,
    m: &Manifest,
    path: &Path,
    concurrency: usize,
    resume: bool,
) -> Result<()> {
    let f = if resume && path.exists() {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {} to resume", path.display()))?;
        let len = f.metadata()?.len();
        if len != m.header.size {
            bail!(
                "{} is {len} bytes, not the {} of backup {}/{}: it is not a restore of this backup to resume",
                path.display(),
                m.header.size,
                m.header.volume,
                m.header.id
            );
        }
        f
    } else {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
        f.set_len(m.header.size)
            .with_context(|| format!("sizing {}", path.display()))?;
        f
    };
    let progress = Arc::new(Progress::default());
    let sink = FileSink(Arc::new(f));
    // Only chunks of this backup are ever written to the image, so the places of its
    // zero chunks read zeroes still when it resumes.
    let opts = tether_backup::ApplyOptions {
        sink_is_empty: true,
        resume,
        concurrency,
    };
    let r = with_bar(
        "restore",
        progress.clone(),
        tether_backup::apply(t, keys, None, m, &sink, opts, progress.clone()),
    )
    .await;
    match &r {
        Ok(()) => {}
        // A damaged backup: half an image must not pass for it.
        Err(BackupError::Corrupt(_)) => {
            let _ = std::fs::remove_file(path);
        }
        Err(e) => bail!(
            "{e}\n{} holds part of backup {}/{}: run this restore again with --resume to finish it",
            path.display(),
            m.header.volume,
            m.header.id
        ),
    }
    Ok(r?)
}
