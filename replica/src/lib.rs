//! The replica daemon: holds the replicas of many volumes on local disk and serves
//! them to engines over gRPC.

pub mod server;
pub mod store;

pub use server::{serve, ReplicaService};
pub use store::{StoreError, Volume, VolumeSet, BLOCK_SIZE};
