//! `tether snapshot create|ls|rm|revert`.

use anyhow::Result;

use crate::cli::{engine, SnapshotCmd};
use crate::render;

/// Runs one `tether snapshot` subcommand against the volume's engine.
pub(crate) async fn snapshot_cmd(cmd: SnapshotCmd) -> Result<()> {
    use tether_proto::engine::SnapshotRequest;
    match cmd {
        SnapshotCmd::Create { target, name } => {
            let t = std::time::Instant::now();
            engine(&target)
                .await?
                .create_snapshot(SnapshotRequest { name: name.clone() })
                .await
                .map_err(target.failed("snapshot create"))?;
            println!(
                "snapshot {name} of {} taken in {} ms; read it at export {}@{name}",
                target.volume,
                t.elapsed().as_millis(),
                target.volume
            );
        }
        SnapshotCmd::Ls { target } => {
            let list = engine(&target)
                .await?
                .list_snapshots(SnapshotRequest {
                    name: String::new(),
                })
                .await
                .map_err(target.failed("snapshot ls"))?
                .into_inner();
            render::snapshots(&target.volume, &list.snapshots);
        }
        SnapshotCmd::Rm { target, name } => {
            engine(&target)
                .await?
                .delete_snapshot(SnapshotRequest { name: name.clone() })
                .await
                .map_err(target.failed("snapshot rm"))?;
            println!("snapshot {name} of {} deleted", target.volume);
        }
        SnapshotCmd::Revert { target, name } => {
            engine(&target)
                .await?
                .revert_snapshot(SnapshotRequest { name: name.clone() })
                .await
                .map_err(target.failed("snapshot revert"))?;
            println!(
                "volume {} now holds snapshot {name}'s contents",
                target.volume
            );
        }
    }
    Ok(())
}
