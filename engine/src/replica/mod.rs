//! The engine's side of its replicas: each replica's state and ordered stream
//! (`conn`), over the seam that reaches a daemon (`link`: gRPC, or in
//! process: `local`).

mod conn;
pub mod dataconn;
pub mod link;
pub mod local;

pub use conn::{Down, Fence, Payload, ReplicaConn, ReplicaError, ReplicaState};
pub use link::{Connector, GrpcConnector, ReplicaLink};
