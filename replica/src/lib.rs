//! The replica daemon: holds the replicas of many volumes on local disk and serves
//! them to engines over gRPC.

pub mod dataconn;
pub mod disk;
pub mod extents;
pub mod server;
#[cfg(feature = "sim")]
pub mod sim;
pub mod store;

pub use server::{serve, serve_with, ReplicaService, ServerTls};
pub use store::{Execution, Job, StoreError, StoreOptions, Volume, VolumeSet, BLOCK_SIZE};
