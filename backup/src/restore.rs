//! Restoring and verifying a backup: chunks download in parallel, each is opened and
//! checked against its keyed name, and only then written. A chunk that fails its
//! check fails the restore, naming the chunk and the backup; it is never written.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::chunk::{self, ChunkName};
use crate::create::blocking;
use crate::error::BackupError;
use crate::keys::Keys;
use crate::manifest::Manifest;
use crate::progress::Progress;
use crate::target::Target;

/// Where a restore writes: a volume through its engine, or a file.
pub trait Sink: Send + Sync {
    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), BackupError>>;
    /// Makes `[offset, offset+len)` read as zeroes.
    fn zero(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackupError>>;
    /// Makes everything written durable.
    fn finish(&self) -> BoxFuture<'_, Result<(), BackupError>>;
}

/// Fetches chunk `index` of `m`: its checked content and the object's size.
async fn fetch(
    target: &Target,
    keys: &Keys,
    m: &Manifest,
    index: u64,
    name: ChunkName,
) -> Result<(Vec<u8>, u64), BackupError> {
    let h = &m.header;
    let what = format!("backup {}/{}: chunk {index} ({name})", h.volume, h.id);
    let object = match target.get_chunk(&name).await {
        Err(BackupError::NotFound(_)) => {
            return Err(BackupError::Corrupt(format!(
                "{what} is missing from target {}",
                target.name()
            )))
        }
        r => r?,
    };
    let len = h.chunk_len(index) as usize;
    let k = keys.clone();
    let stored = object.len() as u64;
    let content = blocking(move || chunk::open(&k, &name, &object, len, &what)).await??;
    Ok((content, stored))
}

/// Restores `m` into `sink`. With `sink_is_empty`, all-zero chunks are not written.
pub async fn restore(
    target: &Target,
    keys: &Keys,
    m: &Manifest,
    sink: &dyn Sink,
    sink_is_empty: bool,
    concurrency: usize,
    progress: Arc<Progress>,
) -> Result<(), BackupError> {
    let h = &m.header;
    progress
        .total
        .store(h.size, std::sync::atomic::Ordering::Relaxed);
    let map = m.map();
    // Runs of all-zero chunks, zeroed in one request each.
    let mut zero_runs: Vec<(u64, u64)> = Vec::new();
    for i in 0..h.chunk_count() {
        if map.contains_key(&i) {
            continue;
        }
        match zero_runs.last_mut() {
            Some(r) if r.1 == i => r.1 = i + 1,
            _ => zero_runs.push((i, i + 1)),
        }
    }
    for (s, e) in zero_runs {
        let (off, end) = (s * h.chunk_size, (e * h.chunk_size).min(h.size));
        if !sink_is_empty {
            sink.zero(off, end - off).await?;
        }
        progress.add(end - off);
    }
    let progress = &progress;
    futures::stream::iter(m.chunks.iter().copied())
        .map(|(index, name)| async move {
            let (data, stored) = fetch(target, keys, m, index, name).await?;
            let n = data.len() as u64;
            progress.object(stored);
            sink.write(index * h.chunk_size, data).await?;
            progress.add(n);
            Ok::<(), BackupError>(())
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<()>()
        .await?;
    sink.finish().await?;
    tracing::info!(backup = %format!("{}/{}", h.volume, h.id), chunks = m.chunks.len(), "restore complete");
    Ok(())
}

/// Downloads every chunk of `m` and checks it against its name; returns the
/// problems found (each naming the chunk and the backup). Fails only when the target
/// cannot be read.
pub async fn verify(
    target: &Target,
    keys: &Keys,
    m: &Manifest,
    concurrency: usize,
    progress: Arc<Progress>,
) -> Result<Vec<String>, BackupError> {
    let h = &m.header;
    progress.total.store(
        m.chunks.iter().map(|(i, _)| h.chunk_len(*i)).sum(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let progress = &progress;
    let results: Vec<Option<String>> = futures::stream::iter(m.chunks.iter().copied())
        .map(|(index, name)| async move {
            let r = fetch(target, keys, m, index, name).await;
            progress.add(h.chunk_len(index));
            match r {
                Ok((_, stored)) => {
                    progress.object(stored);
                    Ok(None)
                }
                Err(BackupError::Corrupt(msg)) => Ok(Some(msg)),
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    Ok(results.into_iter().flatten().collect())
}
