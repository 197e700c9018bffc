//! `tether backup follow` and `promote`: a standby volume at a second site, kept at
//! the newest backup of another by an engine this command runs in-process, and made a
//! normal volume with one command. Its state lives in the target (see
//! `backup/src/standby.rs`).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use tether_backup::{BackupError, Keys, Manifest, Progress, StandbyState, Target};
use tether_engine::backup::VolumeSink;
use tether_engine::volume::Volume;
use tether_engine::{control, EngineConfig};

use crate::backup::{exists_on, open, pilot_config};
use crate::cli::StandbyArgs;

/// The manifest of backup `id` of `volume`, or `None` when it was removed.
async fn manifest_or_gone(
    t: &Target,
    keys: &Keys,
    volume: &str,
    id: Option<&str>,
) -> Result<Option<Manifest>> {
    let Some(id) = id else { return Ok(None) };
    match t.manifest(keys, volume, id).await {
        Ok(m) => Ok(Some(m)),
        Err(BackupError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Brings the open standby from `from` to `to`, growing it first if needed.
async fn apply(
    t: &Target,
    keys: &Keys,
    v: &Arc<Volume>,
    from: Option<&Manifest>,
    to: &Manifest,
    concurrency: usize,
) -> Result<u64> {
    if v.size() < to.header.size {
        v.expand(to.header.size).await.with_context(|| {
            format!("standby {}: growing to {} bytes", v.name(), to.header.size)
        })?;
    }
    let progress = Arc::new(Progress::default());
    tether_backup::apply(
        t,
        keys,
        from,
        to,
        &VolumeSink(v.clone()),
        tether_backup::ApplyOptions {
            sink_is_empty: false,
            resume: false,
            concurrency,
        },
        progress.clone(),
    )
    .await?;
    Ok(progress.read().objects)
}

/// Opens the standby in-process (fencing any other engine of it).
async fn open_standby(cfg: &EngineConfig) -> Result<(Arc<Volume>, tokio::task::JoinHandle<()>)> {
    let v = tether_engine::open_volume(cfg)
        .await
        .with_context(|| format!("standby {}: opening it on its replicas", cfg.volume))?;
    let lease = tokio::spawn(tether_engine::volume::lease::keep(v.clone()));
    Ok((v, lease))
}

fn config(a: &StandbyArgs, size: u64) -> Result<EngineConfig> {
    pilot_config(
        &a.volume,
        size,
        a.replicas.clone(),
        a.encryption_key_file.as_deref(),
        &a.tls,
        control::default_socket(&a.volume),
    )
}

/// `tether backup follow SOURCE --volume STANDBY --replica …`.
pub(crate) async fn follow(a: StandbyArgs) -> Result<()> {
    let Some(source) = a.source.clone() else {
        bail!("name the volume to follow: tether backup follow SOURCE --volume STANDBY --replica ADDR");
    };
    let (t, _, keys) = open(&a.target).await?;
    let name = a.volume.clone();
    let mut st = match t.standby(&name).await? {
        Some(s) if s.promoted => {
            bail!("standby {name} was promoted to a normal volume; it follows no backups any more")
        }
        Some(s) if s.source != source => bail!(
            "standby {name} follows the backups of {}, not {source}",
            s.source
        ),
        Some(s) => s,
        None => StandbyState {
            source: source.clone(),
            ..Default::default()
        },
    };
    // The first backup to apply gives the size of a new standby.
    let first = loop {
        match t.latest(&source).await? {
            Some(id) => break t.manifest(&keys, &source, &id).await?,
            None if a.once => bail!("backup target {} holds no backup of {source} yet", t.name()),
            None => tokio::time::sleep(a.every).await,
        }
    };
    let cfg = config(&a, first.header.size)?;
    let exists = exists_on(&cfg, &name).await;
    let fresh = st.at.is_none() && st.applying.is_none();
    if fresh && !exists.is_empty() && !a.overwrite {
        bail!(
            "volume {name} already exists on {}: a standby starts as a new volume; choose another name, or add --overwrite to start it over this one",
            exists.join(", ")
        );
    }
    let cfg = EngineConfig {
        size: exists.is_empty().then_some(first.header.size),
        ..cfg
    };
    let (v, lease) = open_standby(&cfg).await?;
    let r = follow_loop(&a, &t, &keys, &v, &mut st, &source).await;
    lease.abort();
    v.shutdown().await;
    r
}

async fn follow_loop(
    a: &StandbyArgs,
    t: &Target,
    keys: &Keys,
    v: &Arc<Volume>,
    st: &mut StandbyState,
    source: &str,
) -> Result<()> {
    let name = v.name().to_string();
    let concurrency = a.concurrency as usize;
    loop {
        if t.standby(&name).await?.is_some_and(|s| s.promoted) {
            println!("standby {name} was promoted; following stops");
            return Ok(());
        }
        let from = manifest_or_gone(t, keys, source, st.at.as_deref()).await?;
        // An apply that was cut off is finished first.
        let next = match &st.applying {
            Some(id) => manifest_or_gone(t, keys, source, Some(id)).await?,
            None => None,
        };
        let next = match next {
            Some(m) => Some(m),
            None => match t.latest(source).await? {
                Some(id) if Some(&id) != st.at.as_ref() => {
                    Some(t.manifest(keys, source, &id).await?)
                }
                _ => None,
            },
        };
        if let Some(m) = next {
            let started = Instant::now();
            st.applying = Some(m.header.id.clone());
            t.set_standby(&name, st).await?;
            // A removed `at` leaves the standby's contents unknown: all of it is
            // written again.
            let written = apply(t, keys, v, from.as_ref(), &m, concurrency)
                .await
                .map_err(|e| {
                    anyhow!("{e}\nstandby {name}: applying backup {source}/{} stopped; it holds a mix until `follow` finishes it or `promote` undoes it", m.header.id)
                })?;
            st.at = Some(m.header.id.clone());
            st.applying = None;
            t.set_standby(&name, st).await?;
            let lag = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
                .saturating_sub(m.header.created);
            println!(
                "standby {name} holds backup {source}/{} ({} chunks applied in {:.1} s; the backup's snapshot is {lag} s old)",
                m.header.id,
                written,
                started.elapsed().as_secs_f64()
            );
            tracing::info!(volume = %name, backup = %m.header.id, chunks = written, "standby applied a backup");
            continue;
        }
        if a.once {
            return Ok(());
        }
        tokio::time::sleep(a.every).await;
    }
}

/// `tether backup promote --volume STANDBY --replica …`.
pub(crate) async fn promote(a: StandbyArgs) -> Result<()> {
    let started = Instant::now();
    let (t, _, keys) = open(&a.target).await?;
    let name = a.volume.clone();
    let Some(mut st) = t.standby(&name).await? else {
        bail!("backup target {} knows no standby named {name}", t.name());
    };
    if st.promoted {
        println!("standby {name} is already a normal volume");
        return Ok(());
    }
    let Some(at) = manifest_or_gone(&t, &keys, &st.source, st.at.as_deref()).await? else {
        bail!(
            "standby {name} holds no complete backup yet (or the one it holds, {}/{}, was removed): run `tether backup follow` until it does, or restore a backup into a new volume",
            st.source,
            st.at.as_deref().unwrap_or("none")
        );
    };
    // Opening it fences a follower still running elsewhere.
    let cfg = EngineConfig {
        size: None,
        ..config(&a, at.header.size)?
    };
    let (v, lease) = open_standby(&cfg).await?;
    let r = async {
        if let Some(id) = st.applying.clone() {
            // Undo the cut-off apply: every chunk it may have changed goes back.
            let cut = manifest_or_gone(&t, &keys, &st.source, Some(&id)).await?;
            apply(&t, &keys, &v, cut.as_ref(), &at, a.concurrency as usize).await?;
            if v.size() > at.header.size {
                v.trim(at.header.size, v.size() - at.header.size)
                    .await
                    .with_context(|| format!("standby {name}: zeroing past the backup's end"))?;
            }
            println!(
                "standby {name}: the apply of backup {}/{id} was cut off; undone",
                st.source
            );
        }
        st.applying = None;
        st.promoted = true;
        t.set_standby(&name, &st).await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    lease.abort();
    v.shutdown().await;
    r?;
    println!(
        "standby {name} promoted in {:.1} s: it holds backup {}/{} (snapshot of {}); serve it: tether engine --volume {name} {}",
        started.elapsed().as_secs_f64(),
        st.source,
        at.header.id,
        at.header.time(),
        a.replicas
            .iter()
            .map(|r| format!("--replica {r}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}
