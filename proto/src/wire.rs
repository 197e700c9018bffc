//! The facts both ends of the wire agree on, defined once: block size, seal size,
//! message and I/O limits, and typed error codes on unary calls.
//!
//! Stream replies carry an [`ErrorCode`] field; a unary call's failure is a gRPC
//! status, which alone cannot tell "fenced" from "poisoned". So every status the
//! replica sends names its code in metadata, and the engine acts on that code, never
//! on the message text.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::replica::ErrorCode;

/// Block size of every volume, in the engine and on the replicas, in bytes.
pub const BLOCK_SIZE: u64 = 4096;
/// Bytes of the engine's seal stored with each block of an encrypted volume (nonce
/// source and AEAD tag).
pub const SEAL_SIZE: usize = 32;
/// The largest single read or write, in bytes (also NBD's advertised maximum).
pub const MAX_IO_BYTES: u32 = 32 << 20;
/// The largest single read or write, in blocks.
pub const MAX_IO_BLOCKS: u64 = MAX_IO_BYTES as u64 / BLOCK_SIZE;
/// Largest gRPC message either side accepts: a batch of writes up to the largest
/// I/O each.
pub const MAX_MESSAGE: usize = 2 * MAX_IO_BYTES as usize;

/// The metadata key that holds the code's name (`FENCED`, `POISONED`, ...).
pub const ERROR_KEY: &str = "tether-error";

/// A gRPC status for `code` with `message`, tagged with the code.
pub fn status(code: ErrorCode, message: impl Into<String>) -> Status {
    let grpc = match code {
        ErrorCode::Ok | ErrorCode::Io | ErrorCode::Checksum => Code::Internal,
        ErrorCode::OutOfRange => Code::OutOfRange,
        ErrorCode::Invalid => Code::InvalidArgument,
        ErrorCode::NoSpace => Code::ResourceExhausted,
        ErrorCode::Fenced | ErrorCode::Poisoned | ErrorCode::Restarted => Code::FailedPrecondition,
        ErrorCode::NotFound => Code::NotFound,
    };
    let mut s = Status::new(grpc, message);
    s.metadata_mut()
        .insert(ERROR_KEY, MetadataValue::from_static(code.as_str_name()));
    s
}

/// The code a status was tagged with; `None` for statuses that did not come from a
/// tether service (transport failures, timeouts, a peer of another kind).
pub fn code_of(s: &Status) -> Option<ErrorCode> {
    let v = s.metadata().get(ERROR_KEY)?.to_str().ok()?;
    ErrorCode::from_str_name(v)
}

/// Tunes a TCP connection whose peer is on this host: a loss-based congestion control
/// (cubic, else reno) instead of a paced one. With BBR, a common system default, every
/// send over loopback goes through TCP's pacing timers for a link that never drops a
/// packet; 1 MiB NBD reads ran 30 % faster without it. Connections to other hosts keep
/// the system's choice. Best effort: a kernel that refuses keeps its default.
pub fn tune_local_tcp(s: &tokio::net::TcpStream) {
    if !s.peer_addr().is_ok_and(|a| a.ip().is_loopback()) {
        return;
    }
    if rustix::net::sockopt::set_tcp_congestion(s, "cubic").is_err() {
        let _ = rustix::net::sockopt::set_tcp_congestion(s, "reno");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_survives_a_status() {
        for c in [
            ErrorCode::Io,
            ErrorCode::OutOfRange,
            ErrorCode::Invalid,
            ErrorCode::NoSpace,
            ErrorCode::Fenced,
            ErrorCode::Checksum,
            ErrorCode::Poisoned,
            ErrorCode::NotFound,
            ErrorCode::Restarted,
        ] {
            assert_eq!(code_of(&status(c, "x")), Some(c));
        }
        assert_eq!(code_of(&Status::unavailable("transport")), None);
    }

    #[tokio::test]
    async fn a_loopback_connection_gets_a_loss_based_congestion_control() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        for conn in [&c, &s] {
            rustix::net::sockopt::set_tcp_congestion(conn, "bbr").ok();
            tune_local_tcp(conn);
            let cc = rustix::net::sockopt::tcp_congestion(conn).unwrap();
            assert!(cc == "cubic" || cc == "reno", "{cc}");
        }
    }
}
