//! Making a backup: read the chunks that may have changed, name each by its content,
//! upload the ones the target does not hold yet, then write the manifest and move the
//! latest pointer. A crash at any point leaves no manifest naming a missing chunk,
//! because a manifest is written only after every chunk it names.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::chunk::{self, ChunkName};
use crate::error::BackupError;
use crate::keys::Keys;
use crate::manifest::{Header, Manifest};
use crate::progress::Progress;
use crate::target::Target;

/// The volume as the backup reads it: plaintext of one snapshot.
pub trait Source: Send + Sync {
    /// Reads `len` bytes at `offset` of the snapshot being backed up.
    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<u8>, BackupError>>;
}

/// Which chunks to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Only these chunks changed since the parent's snapshot (from the layer index);
    /// every other chunk is as in the parent.
    Changed(Vec<u64>),
    /// Only these chunks may hold data; each is read and named, and only those whose
    /// name the parent does not hold are uploaded. The others are zero.
    Allocated(Vec<u64>),
}

/// One backup to make.
pub struct Job {
    /// Where it goes.
    pub target: Target,
    /// The target's keys.
    pub keys: Keys,
    /// The new backup's header (stats are filled in here).
    pub header: Header,
    /// The backup it is made from, whose chunks the target holds.
    pub parent: Option<Manifest>,
    /// Which chunks to read.
    pub scope: Scope,
    /// Chunks read and uploaded at once.
    pub concurrency: usize,
    /// Progress, for status and the CLI.
    pub progress: Arc<Progress>,
}

/// Makes the backup `job` describes from `source`; returns its manifest.
pub async fn create(mut job: Job, source: &dyn Source) -> Result<Manifest, BackupError> {
    let h = &job.header;
    let count = h.chunk_count();
    let parent_map = job.parent.as_ref().map(Manifest::map).unwrap_or_default();
    let method;
    let mut candidates = match &job.scope {
        Scope::Changed(c) => {
            let Some(p) = &job.parent else {
                return Err(BackupError::Invalid(
                    "an incremental backup needs its parent's manifest".into(),
                ));
            };
            if p.header.chunk_size != h.chunk_size {
                return Err(BackupError::Invalid(format!(
                    "backup {}/{}: the parent's chunk size {} is not the target's {}",
                    h.volume, p.header.id, p.header.chunk_size, h.chunk_size
                )));
            }
            method = "layer index";
            let mut c = c.clone();
            // A grown volume's old last chunk now holds more bytes: read it again.
            if p.header.size != h.size && p.header.chunk_count() > 0 {
                c.push(p.header.chunk_count() - 1);
            }
            c
        }
        Scope::Allocated(c) => {
            method = if job.parent.is_some() {
                "compare"
            } else {
                "full"
            };
            c.clone()
        }
    };
    candidates.sort_unstable();
    candidates.dedup();
    candidates.retain(|&i| i < count);
    job.progress.total.store(
        candidates.iter().map(|&i| h.chunk_len(i)).sum(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let known: Mutex<HashSet<ChunkName>> = Mutex::new(parent_map.values().copied().collect());
    let (target, keys, progress) = (&job.target, &job.keys, &job.progress);
    let results: Vec<(u64, Option<ChunkName>)> = futures::stream::iter(candidates.iter().copied())
        .map(|index| {
            let known = &known;
            async move {
                let len = h.chunk_len(index);
                let data = source.read(index * h.chunk_size, len).await?;
                if data.len() as u64 != len {
                    return Err(BackupError::Volume(format!(
                        "volume {}: reading chunk {index} gave {} bytes, not {len}",
                        h.volume,
                        data.len()
                    )));
                }
                let k = keys.clone();
                let (data, named) = blocking(move || {
                    let named = (!chunk::is_zero(&data)).then(|| chunk::name_of(&k, &data));
                    (data, named)
                })
                .await?;
                progress.add(len);
                let Some(name) = named else {
                    return Ok((index, None));
                };
                let fresh = known.lock().map(|mut k| k.insert(name)).unwrap_or(true);
                if fresh {
                    let k = keys.clone();
                    let (_, object) = blocking(move || chunk::seal(&k, &data)).await??;
                    let n = object.len() as u64;
                    target.put_chunk(&name, object).await?;
                    progress.object(n);
                }
                Ok((index, Some(name)))
            }
        })
        .buffer_unordered(job.concurrency.max(1))
        .try_collect()
        .await?;
    let mut map: BTreeMap<u64, ChunkName> = match job.scope {
        Scope::Changed(_) => parent_map.into_iter().filter(|(i, _)| *i < count).collect(),
        Scope::Allocated(_) => BTreeMap::new(),
    };
    let read = results.len() as u64;
    for (i, n) in results {
        match n {
            Some(n) => map.insert(i, n),
            None => map.remove(&i),
        };
    }
    // What the backup did is what its progress counted.
    let p = progress.read();
    let (uploaded, bytes_uploaded) = (p.objects, p.object_bytes);
    job.header.stats = crate::manifest::Stats {
        chunks_read: read,
        chunks_uploaded: uploaded,
        bytes_read: p.done,
        bytes_uploaded,
        method: method.to_string(),
        millis: p.millis,
    };
    let m = Manifest {
        header: job.header,
        chunks: map.into_iter().collect(),
    };
    job.target.put_manifest(&job.keys, &m, true).await?;
    tracing::info!(volume = %m.header.volume, backup = %m.header.id, method,
        chunks_read = read, chunks_uploaded = uploaded, bytes_uploaded, "backup complete");
    Ok(m)
}

/// Runs CPU-heavy work (hashing, compression, sealing) off the async workers, which
/// keep serving the volume's I/O meanwhile.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackupError::Volume(format!("a backup worker stopped: {e}")))
}
