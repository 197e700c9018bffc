//! Generated gRPC types for tether's replica data path and engine control API, and
//! the wire facts both sides share.

/// Replica daemon service: volume lifecycle and the ordered I/O stream.
pub mod replica {
    tonic::include_proto!("tether.replica.v1");
}

/// Engine control service, served on the engine's Unix socket.
pub mod engine {
    tonic::include_proto!("tether.engine.v1");
}

pub mod frame;
pub mod wire;
