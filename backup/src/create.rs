//! Making a backup: read the chunks that may have changed, name each by its content,
//! upload the ones the target does not hold yet, then write the manifest and move the
//! latest pointer. A crash at any point leaves no manifest naming a missing chunk,
//! because a manifest is written only after every chunk it names. A checkpoint of
//! the chunks done is written as it goes, so a backup run again resumes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::checkpoint::Checkpoint;
use crate::chunk::{self, ChunkName, ChunkRef};
use crate::error::BackupError;
use crate::keys::Keys;
use crate::lease::Lease;
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
    /// The backup it is made from, whose chunks the target holds. Its lease must
    /// have been taken before the parent was read.
    pub parent: Option<Manifest>,
    /// The lease, naming the parent (and the checkpoint when resuming).
    pub lease: Arc<Lease>,
    /// Chunks an interrupted run of this same backup already did, from its
    /// checkpoint: their names, or `None` for zeroes.
    pub resume: BTreeMap<u64, Option<ChunkRef>>,
    /// How often the checkpoint is written.
    pub checkpoint_every: Duration,
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
    let resumed: BTreeMap<u64, Option<ChunkRef>> = std::mem::take(&mut job.resume)
        .into_iter()
        .filter(|(i, _)| candidates.binary_search(i).is_ok())
        .collect();
    candidates.retain(|i| !resumed.contains_key(i));
    if !resumed.is_empty() {
        tracing::info!(volume = %h.volume, backup = %h.id, done = resumed.len(), left = candidates.len(),
            "resuming a backup from its checkpoint");
    }
    job.progress.total.store(
        candidates.iter().map(|&i| h.chunk_len(i)).sum(),
        std::sync::atomic::Ordering::Relaxed,
    );
    // The stored chunks this backup may name without uploading, by content name.
    let known: Mutex<HashMap<ChunkName, ChunkRef>> = Mutex::new(
        parent_map
            .values()
            .copied()
            .chain(resumed.values().flatten().copied())
            .map(|r| (r.name, r))
            .collect(),
    );
    let (target, keys, progress, lease) = (&job.target, &job.keys, &job.progress, &job.lease);
    let ck = Checkpointer {
        target,
        keys,
        lease,
        header: h,
        done: Mutex::new(resumed.clone()),
        stored: Mutex::new(
            known
                .lock()
                .map(|k| k.values().copied().collect())
                .unwrap_or_default(),
        ),
        every: job.checkpoint_every,
        last: tokio::sync::Mutex::new((target.clock().now(), resumed.len())),
    };
    let results: Vec<(u64, Option<ChunkRef>)> = futures::stream::iter(candidates.iter().copied())
        .map(|index| {
            let (known, ck) = (&known, &ck);
            async move {
                lease.keep().await?;
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
                    ck.record(index, None).await?;
                    return Ok((index, None));
                };
                // A new upload gets an object of its own, never one that exists.
                let (stored, fresh) = {
                    let mut k = known
                        .lock()
                        .map_err(|_| BackupError::Volume("a backup worker panicked".into()))?;
                    match k.get(&name) {
                        Some(r) => (*r, false),
                        None => {
                            let r = ChunkRef::fresh(name)?;
                            k.insert(name, r);
                            (r, true)
                        }
                    }
                };
                if fresh {
                    let k = keys.clone();
                    let (_, object) = blocking(move || chunk::seal(&k, &data)).await??;
                    let n = object.len() as u64;
                    target.put_chunk(&stored, object).await?;
                    progress.object(n);
                    ck.stored(stored);
                }
                ck.record(index, Some(stored)).await?;
                Ok((index, Some(stored)))
            }
        })
        .buffer_unordered(job.concurrency.max(1))
        .try_collect()
        .await?;
    let mut map: BTreeMap<u64, ChunkRef> = match job.scope {
        Scope::Changed(_) => parent_map.into_iter().filter(|(i, _)| *i < count).collect(),
        Scope::Allocated(_) => BTreeMap::new(),
    };
    let read = results.len() as u64;
    for (i, n) in resumed.into_iter().chain(results) {
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
    let (v, id) = (&m.header.volume, &m.header.id);
    job.lease
        .put_guarded(
            &job.target.manifest_path(v, id),
            m.seal(&job.keys)?,
            &format!("writing the manifest of backup {v}/{id}"),
        )
        .await?;
    job.target.set_latest(v, id).await?;
    // The manifest now protects every chunk it names; the checkpoint and the lease
    // are no longer needed. Failing to tidy them only keeps chunks a while longer.
    if let Err(e) = job.target.remove_checkpoint(v).await {
        tracing::warn!(volume = %v, backup = %id, error = %e, "cannot delete the backup's checkpoint");
    }
    if let Err(e) = job.lease.done().await {
        tracing::warn!(volume = %v, backup = %id, error = %e, "cannot mark the backup's lease done; it expires by itself");
    }
    tracing::info!(volume = %m.header.volume, backup = %m.header.id, method,
        chunks_read = read, chunks_uploaded = uploaded, bytes_uploaded, "backup complete");
    Ok(m)
}

/// Keeps the checkpoint: records each chunk done, and writes them all now and then.
struct Checkpointer<'a> {
    target: &'a Target,
    keys: &'a Keys,
    lease: &'a Lease,
    header: &'a Header,
    done: Mutex<BTreeMap<u64, Option<ChunkRef>>>,
    /// Objects the target certainly holds: the parent's, and uploads that came back.
    /// A chunk of the same content as one still uploading waits for it.
    stored: Mutex<HashSet<ChunkRef>>,
    every: Duration,
    /// When the last checkpoint was written, and how many chunks it held.
    last: tokio::sync::Mutex<(Duration, usize)>,
}

/// A checkpoint is written when this many chunks are done since the last one, or an
/// eighth of all done, whichever is more: what a kill loses stays small, and the
/// checkpoints' bytes stay a small part of what is uploaded.
const CHECKPOINT_CHUNKS: usize = 64;

impl Checkpointer<'_> {
    fn stored(&self, name: ChunkRef) {
        if let Ok(mut s) = self.stored.lock() {
            s.insert(name);
        }
    }

    async fn record(&self, index: u64, name: Option<ChunkRef>) -> Result<(), BackupError> {
        let count = match self.done.lock() {
            Ok(mut d) => {
                d.insert(index, name);
                d.len()
            }
            Err(_) => return Ok(()),
        };
        let clock = self.target.clock();
        let Ok(mut last) = self.last.try_lock() else {
            return Ok(());
        };
        let by_count = count.saturating_sub(last.1) >= CHECKPOINT_CHUNKS.max(count / 8);
        if clock.now().saturating_sub(last.0) < self.every && !by_count {
            return Ok(());
        }
        let done = match (self.done.lock(), self.stored.lock()) {
            (Ok(d), Ok(s)) => d
                .iter()
                .filter(|(_, n)| n.is_none_or(|n| s.contains(&n)))
                .map(|(i, n)| (*i, *n))
                .collect(),
            _ => return Ok(()),
        };
        let c = Checkpoint {
            header: self.header.clone(),
            done,
        };
        let k = self.keys.clone();
        let sealed = blocking(move || c.seal(&k)).await??;
        self.lease
            .put_guarded(
                &self.target.checkpoint_path(&self.header.volume),
                sealed,
                "writing a checkpoint",
            )
            .await?;
        *last = (clock.now(), count);
        Ok(())
    }
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
