//! The volume core's errors: a kind the caller acts on, and a message that names the
//! volume and says what to do. Frontends map them to their own errors at their edge
//! (NBD: `nbd::export`), the control API to gRPC statuses.

/// What went wrong in the volume core.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VolumeError {
    /// The data could not be read or written (no replica, too few, a replica failed).
    #[error("{0}")]
    Io(String),
    /// The request cannot be done as asked (a bad name, a shrink, clients attached).
    #[error("{0}")]
    Invalid(String),
    /// Every replica's disk is full.
    #[error("{0}")]
    NoSpace(String),
    /// A newer engine owns the volume: this one acknowledges nothing more.
    #[error("{0}")]
    Fenced(String),
}
