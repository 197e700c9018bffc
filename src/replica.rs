//! `tether replica add|rm`: changing a running volume's replica set.

use anyhow::Result;

use crate::cli::{engine, ReplicaCmd};

/// Runs one `tether replica` subcommand against the volume's engine.
pub(crate) async fn replica_cmd(cmd: ReplicaCmd) -> Result<()> {
    use tether_proto::engine::ReplicaRequest;
    match cmd {
        ReplicaCmd::Add { target, address } => {
            engine(&target)
                .await?
                .add_replica(ReplicaRequest {
                    address: address.clone(),
                })
                .await
                .map_err(target.failed("replica add"))?;
            println!(
                "replica {address} joins volume {} and rebuilds online; follow it with `tether volume status {}`",
                target.volume, target.volume
            );
        }
        ReplicaCmd::Rm { target, address } => {
            engine(&target)
                .await?
                .remove_replica(ReplicaRequest {
                    address: address.clone(),
                })
                .await
                .map_err(target.failed("replica rm"))?;
            println!("replica {address} removed from volume {}", target.volume);
        }
    }
    Ok(())
}
