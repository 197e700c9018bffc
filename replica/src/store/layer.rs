//! One layer of the copy-on-write tree: two data slots and the block records
//! (`docs/format.md`, "Files"), and which blocks it holds.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{Named, StoreError};
use super::records::Records;
use crate::disk::{Disk, DiskFile};
use crate::extents::ExtentMap;

/// A layer's open files and the blocks it holds.
pub(super) struct Layer {
    pub(super) files: Files,
    /// Blocks this layer holds (data or zero).
    pub(super) present: ExtentMap<()>,
    /// The files' paths, for error messages.
    pub(super) data_path: PathBuf,
    pub(super) alt_path: PathBuf,
    pub(super) rec_path: PathBuf,
}

/// A layer's open files, held without the volume's lock.
#[derive(Clone)]
pub(super) struct Files {
    pub(super) data: Arc<dyn DiskFile>,
    pub(super) alt: Arc<dyn DiskFile>,
    pub(super) rec: Arc<Records>,
}

impl Files {
    /// The file of slot `slot` (0 `.data`, 1 `.alt`).
    pub(super) fn slot(&self, slot: u8) -> &dyn DiskFile {
        if slot == 1 {
            &*self.alt
        } else {
            &*self.data
        }
    }
}

/// A layer's files: slot 0, slot 1, block records, packed block records.
pub(super) fn paths(dir: &Path, id: u64) -> [PathBuf; 4] {
    let l = dir.join("layers");
    [
        l.join(format!("{id}.data")),
        l.join(format!("{id}.alt")),
        l.join(format!("{id}.rec")),
        l.join(format!("{id}.pack")),
    ]
}

impl Layer {
    /// Creates the (empty) files of layer `id` under `dir`.
    pub(super) fn create(
        disk: &dyn Disk,
        dir: &Path,
        id: u64,
        entry: usize,
        vol: &Named,
    ) -> Result<Layer, StoreError> {
        let [dp, ap, rp, pp] = paths(dir, id);
        let create = |p: &Path| disk.open(p, true).map_err(vol.io("creating a layer", p));
        let rec =
            Records::create(disk, &rp, &pp, entry).map_err(vol.io("creating a layer", &pp))?;
        Ok(Layer {
            files: Files {
                data: create(&dp)?,
                alt: create(&ap)?,
                rec: Arc::new(rec),
            },
            present: ExtentMap::new(),
            data_path: dp,
            alt_path: ap,
            rec_path: rp,
        })
    }

    /// Opens layer `id` of a volume of `blocks` blocks and `entry`-byte block records,
    /// reading which blocks it holds.
    pub(super) fn open(
        disk: &dyn Disk,
        dir: &Path,
        id: u64,
        blocks: u64,
        entry: usize,
        vol: &Named,
    ) -> Result<Layer, StoreError> {
        let [dp, ap, rp, pp] = paths(dir, id);
        let data = disk
            .open(&dp, false)
            .map_err(vol.io("opening a layer", &dp))?;
        // Volumes of the one-slot formats have no second slot yet.
        let alt = disk
            .open(&ap, true)
            .map_err(vol.io("opening a layer", &ap))?;
        let (rec, present) = Records::open(disk, &rp, &pp, blocks, entry)
            .map_err(vol.io("reading block records", &rp))?;
        Ok(Layer {
            files: Files {
                data,
                alt,
                rec: Arc::new(rec),
            },
            present,
            data_path: dp,
            alt_path: ap,
            rec_path: rp,
        })
    }

    /// Bytes the layer's files occupy on disk.
    pub(super) fn allocated(&self) -> u64 {
        let f = &self.files;
        [&f.data, &f.alt]
            .iter()
            .map(|x| x.allocated().unwrap_or(0))
            .sum::<u64>()
            + f.rec.allocated().unwrap_or(0)
    }

    /// A handle on the files, to use without the volume's lock.
    pub(super) fn files(&self) -> Files {
        self.files.clone()
    }

    /// The file of slot `slot` (0 `.data`, 1 `.alt`) and its path.
    pub(super) fn slot(&self, slot: u8) -> (&dyn DiskFile, &Path) {
        let path = if slot == 1 {
            &self.alt_path
        } else {
            &self.data_path
        };
        (self.files.slot(slot), path)
    }

    /// Applies changes to the blocks held: (start, end, present).
    pub(super) fn apply(&mut self, changes: &[(u64, u64, bool)]) {
        for &(s, e, here) in changes {
            if here {
                self.present.insert(s, e, ());
            } else {
                self.present.remove(s, e);
            }
        }
    }
}

/// Which slot a direct write to a block goes to: the one not holding its last durable
/// version. `stable` is that version's slot.
pub(super) fn other(stable: u8) -> u8 {
    1 - (stable & 1)
}
