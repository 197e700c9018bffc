//! tether backups: a volume's snapshot cut into fixed, aligned chunks, each named by
//! a keyed hash of its content, compressed and sealed with a key of the target's own,
//! and stored in a local directory or an S3 bucket with one manifest per backup.
//! `docs/backup.md` has the whole design.

pub mod checkpoint;
pub mod chunk;
pub mod clock;
pub mod create;
pub mod error;
pub mod gc;
pub mod keys;
pub mod lease;
pub mod manifest;
pub mod progress;
pub mod restore;
pub mod standby;
pub mod target;

pub use checkpoint::Checkpoint;
pub use chunk::{ChunkName, ChunkRef};
pub use clock::{Clock, SystemClock};
pub use create::{create, Job, Scope, Source};
pub use error::BackupError;
pub use gc::{gc, GcOptions, GcProgress, GcReport};
pub use keys::{Keys, Secret};
pub use lease::{Lease, LeaseStart};
pub use manifest::{Header, Manifest};
pub use progress::Progress;
pub use restore::{apply, restore, verify, ApplyOptions, Sink};
pub use standby::StandbyState;
pub use target::{Target, TargetConfig, TargetSpec};
