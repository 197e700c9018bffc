//! `tether volume status|expand|verify|salvage`.

use anyhow::{bail, Result};

use crate::cli::{engine, Target, VolumeCmd};
use crate::render;

/// Runs one `tether volume` subcommand against the volume's engine.
pub(crate) async fn volume_cmd(cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Status { target, json } => status(&target, json).await,
        VolumeCmd::Expand { target, size } => {
            let r = engine(&target)
                .await?
                .expand(tether_proto::engine::ExpandRequest { size })
                .await
                .map_err(target.failed("expand"))?
                .into_inner();
            println!(
                "volume {} is now {} bytes; NBD clients see the new size when they reconnect",
                target.volume, r.size
            );
            Ok(())
        }
        VolumeCmd::Verify { target } => verify(&target).await,
        VolumeCmd::Salvage {
            volume,
            from,
            replicas,
            accept_data_loss,
            tls,
        } => {
            if !accept_data_loss {
                bail!(
                    "volume {volume}: a salvage serves {} as they are and gives up every write only the other replicas hold; if those are gone for good, run again with --accept-data-loss",
                    from.join(", ")
                );
            }
            let connector = tether_engine::replica::GrpcConnector {
                timeout: std::time::Duration::from_secs(5),
                tls: crate::daemon::engine_tls(&tls)?,
            };
            let g = tether_engine::open::salvage(
                &volume,
                &replicas,
                &from,
                &connector,
                std::time::Duration::from_secs(30),
            )
            .await?;
            println!(
                "volume {volume}: salvage recorded as generation {}: serving from {} once an engine opens it; replicas {}",
                g.number,
                g.in_sync.iter().cloned().collect::<Vec<_>>().join(", "),
                g.replicas.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
    }
}

async fn verify(target: &Target) -> Result<()> {
    let fail = target.failed("verify");
    let mut stream = engine(target)
        .await?
        .verify(tether_proto::engine::VerifyRequest {})
        .await
        .map_err(fail)?
        .into_inner();
    let mut problems = 0;
    let started = std::time::Instant::now();
    while let Some(p) = stream.message().await.map_err(fail)? {
        for x in &p.problems {
            problems += 1;
            println!("block {}: replica {}: {}", x.block, x.replica, x.what);
        }
        let pct = render::percent(p.blocks_done, p.blocks_total, 100.0);
        eprint!(
            "\rverify {}: {:5.1}%  {} of {} blocks, {} problems, {:.0} s",
            target.volume,
            pct,
            p.blocks_done,
            p.blocks_total,
            problems,
            started.elapsed().as_secs_f64()
        );
        if p.done {
            eprintln!();
            break;
        }
    }
    if problems > 0 {
        bail!(
            "volume {}: verify found {problems} problem(s); see the blocks above",
            target.volume
        );
    }
    println!(
        "volume {}: all replicas agree and every checksum holds",
        target.volume
    );
    Ok(())
}

async fn status(target: &Target, json: bool) -> Result<()> {
    let mut client = engine(target).await?;
    let s = client
        .status(tether_proto::engine::StatusRequest {})
        .await
        .map_err(target.failed("status"))?
        .into_inner();
    render::status(&s, json);
    Ok(())
}
