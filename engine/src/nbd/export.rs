//! The volume as NBD exports: the live volume and its snapshots (read-only), and
//! the mapping of the core's errors to NBD's at this edge.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::VolumeError;
use crate::nbd::{BlockDevice, DeviceError, Export, ExportTable};
use crate::volume::Volume;

impl From<VolumeError> for DeviceError {
    fn from(e: VolumeError) -> DeviceError {
        match e {
            VolumeError::Invalid(m) => DeviceError::Invalid(m),
            VolumeError::NoSpace(m) => DeviceError::NoSpace(m),
            VolumeError::Io(m) | VolumeError::Fenced(m) => DeviceError::Io(m),
        }
    }
}

/// What an NBD export shows: the live volume or one of its snapshots (read-only).
pub enum View {
    /// The volume itself.
    Head(Arc<Volume>),
    /// A snapshot, read-only.
    Snapshot(Arc<Volume>, String),
}

impl View {
    /// The volume, if this view may change it (snapshots are read-only).
    fn writable(&self) -> Result<&Arc<Volume>, DeviceError> {
        match self {
            View::Head(v) if v.is_restoring() => Err(restoring(v)),
            View::Head(v) => Ok(v),
            View::Snapshot(..) => Err(DeviceError::ReadOnly("snapshots are read-only".into())),
        }
    }
}

/// A client that attached as a restore began gets errors, not a volume changing
/// under it.
fn restoring(v: &Volume) -> DeviceError {
    DeviceError::Io(format!(
        "volume {}: a restore is writing the volume; reconnect when it ends",
        v.name()
    ))
}

impl BlockDevice for View {
    fn size(&self) -> u64 {
        match self {
            View::Head(v) | View::Snapshot(v, _) => v.size(),
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<Bytes>, DeviceError> {
        match self {
            View::Head(v) if v.is_restoring() => Err(restoring(v)),
            View::Head(v) => Ok(v.read(offset, len).await?),
            View::Snapshot(v, name) => Ok(v.read_range(name, offset, len).await?),
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        Ok(self.writable()?.write(offset, data, fua).await?)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        Ok(self
            .writable()?
            .write_zeroes(offset, len, may_trim, fua)
            .await?)
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        Ok(self.writable()?.trim(offset, len).await?)
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match self {
            // A snapshot's blocks are the head's layers below it: the same hint.
            View::Head(v) | View::Snapshot(v, _) => Ok(v.cache(offset, len).await?),
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        match self {
            View::Head(v) => Ok(v.flush().await?),
            View::Snapshot(..) => Ok(()),
        }
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<(u32, u32)>, DeviceError> {
        match self {
            View::Head(v) => {
                let runs = v.block_status(offset, len).await?;
                let hole = crate::nbd::proto::STATE_HOLE | crate::nbd::proto::STATE_ZERO;
                Ok(runs
                    .into_iter()
                    .map(|(n, allocated)| (n, if allocated { 0 } else { hole }))
                    .collect())
            }
            // Snapshot maps are not tracked separately yet: report all as data.
            View::Snapshot(..) => Ok(vec![(len, 0)]),
        }
    }

    fn connection_opened(&self) {
        if let View::Head(v) = self {
            v.connection_opened();
        }
    }

    fn connection_closed(&self) {
        if let View::Head(v) = self {
            v.connection_closed();
        }
    }
}

/// The exports of one engine: `VOLUME` (or the empty name) and `VOLUME@SNAPSHOT`.
pub struct VolumeExports(pub Arc<Volume>);

impl ExportTable for VolumeExports {
    type Device = View;

    fn find(&self, name: &str) -> Option<Export<View>> {
        let v = &self.0;
        if name.is_empty() || name == v.name() {
            if v.is_restoring() {
                tracing::warn!(volume = %v.name(), "NBD client refused: a restore is writing the volume");
                return None;
            }
            return Some(Export {
                name: v.name().to_string(),
                description: format!("tether volume {}", v.name()),
                device: Arc::new(View::Head(v.clone())),
                read_only: false,
            });
        }
        let snap = name.strip_prefix(v.name())?.strip_prefix('@')?;
        v.has_snapshot(snap).then(|| Export {
            name: name.to_string(),
            description: format!("snapshot {snap} of tether volume {} (read-only)", v.name()),
            device: Arc::new(View::Snapshot(v.clone(), snap.to_string())),
            read_only: true,
        })
    }

    fn names(&self) -> Vec<String> {
        let v = &self.0;
        std::iter::once(v.name().to_string())
            .chain(
                v.snapshot_names()
                    .into_iter()
                    .map(|s| format!("{}@{s}", v.name())),
            )
            .collect()
    }
}
