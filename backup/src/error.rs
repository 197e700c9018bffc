//! What can go wrong with a backup target, in kinds a caller can act on.

/// A backup operation's failure. Each message names the target, backup or chunk.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The target could not be reached, read or written (network, permissions, disk).
    #[error("{0}")]
    Target(String),
    /// Something asked for does not exist (target not initialised, no such backup).
    #[error("{0}")]
    NotFound(String),
    /// The passphrase or key file does not open the target's master key.
    #[error("{0}")]
    Key(String),
    /// An object failed its check: tampered, damaged, or not what its name says.
    #[error("{0}")]
    Corrupt(String),
    /// The request cannot work as given (bad target address, chunk size, name).
    #[error("{0}")]
    Invalid(String),
    /// The target already exists, or the operation is already running.
    #[error("{0}")]
    Exists(String),
    /// Reading the volume or writing the restored data failed.
    #[error("{0}")]
    Volume(String),
    /// A backup's lease lapsed, so gc may have counted it gone; it stopped before
    /// writing anything that relies on it, and resumes when run again.
    #[error("{0}")]
    Lapsed(String),
}

impl BackupError {
    /// A short name of the kind, for typed codes on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            BackupError::Target(_) => "target",
            BackupError::NotFound(_) => "not_found",
            BackupError::Key(_) => "key",
            BackupError::Corrupt(_) => "corrupt",
            BackupError::Invalid(_) => "invalid",
            BackupError::Exists(_) => "exists",
            BackupError::Volume(_) => "volume",
            BackupError::Lapsed(_) => "lapsed",
        }
    }
}
