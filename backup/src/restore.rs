//! Restoring and verifying a backup: chunks download in parallel, each is opened and
//! checked against its keyed name, and only then written. A chunk that fails its
//! check fails the restore, naming the chunk and the backup; it is never written.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::chunk::{self, ChunkRef};
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
    /// Reads back `len` bytes at `offset`, so a resumed restore can skip chunks that
    /// already hold the right content; `None` when this sink cannot be read.
    fn read(&self, _offset: u64, _len: u64) -> BoxFuture<'_, Result<Option<Vec<u8>>, BackupError>> {
        Box::pin(async { Ok(None) })
    }
}

/// How a restore or apply writes.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    /// The sink reads as zeroes everywhere: zero chunks need no write.
    pub sink_is_empty: bool,
    /// Read each chunk back first and skip it when its name already matches: an
    /// interrupted restore resumes without downloading again what it wrote.
    pub resume: bool,
    /// Chunks downloaded and written at once.
    pub concurrency: usize,
}

/// Fetches chunk `index` of `m`: its checked content and the object's size.
async fn fetch(
    target: &Target,
    keys: &Keys,
    m: &Manifest,
    index: u64,
    r: ChunkRef,
) -> Result<(Vec<u8>, u64), BackupError> {
    let h = &m.header;
    let name = r.name;
    let what = format!("backup {}/{}: chunk {index} ({r})", h.volume, h.id);
    let object = match target.get_chunk(&r).await {
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
    let opts = ApplyOptions {
        sink_is_empty,
        resume: false,
        concurrency,
    };
    apply(target, keys, None, m, sink, opts, progress).await
}

/// Brings `sink` from backup `from` to backup `to`: only the chunks whose names
/// differ are downloaded and written, and only chunks `from` held are zeroed. With
/// `from` unknown (`None`), every chunk is written and every zero chunk zeroed unless
/// `sink_is_empty`. The sink must hold exactly `from` (a chunk already at `to`'s
/// content is fine: it is written again).
pub async fn apply(
    target: &Target,
    keys: &Keys,
    from: Option<&Manifest>,
    to: &Manifest,
    sink: &dyn Sink,
    opts: ApplyOptions,
    progress: Arc<Progress>,
) -> Result<(), BackupError> {
    let ApplyOptions {
        sink_is_empty,
        resume,
        concurrency,
    } = opts;
    let h = &to.header;
    let from = from.filter(|f| f.header.chunk_size == h.chunk_size);
    let before = from.map(Manifest::map);
    let map = to.map();
    // Runs of chunks that must end up zero, zeroed in one request each.
    let mut zero_runs: Vec<(u64, u64)> = Vec::new();
    for i in 0..h.chunk_count() {
        let zero = !map.contains_key(&i)
            && match &before {
                Some(b) => b.contains_key(&i),
                None => !sink_is_empty,
            };
        if !zero {
            continue;
        }
        match zero_runs.last_mut() {
            Some(r) if r.1 == i => r.1 = i + 1,
            _ => zero_runs.push((i, i + 1)),
        }
    }
    // Same name, same content: a chunk stored twice need not be written again.
    let writes: Vec<(u64, ChunkRef)> = to
        .chunks
        .iter()
        .copied()
        .filter(|(i, r)| {
            before
                .as_ref()
                .is_none_or(|b| b.get(i).map(|x| x.name) != Some(r.name))
        })
        .collect();
    let zero_bytes: u64 = zero_runs
        .iter()
        .map(|&(s, e)| (e * h.chunk_size).min(h.size) - s * h.chunk_size)
        .sum();
    let total = match &before {
        None => h.size,
        Some(_) => zero_bytes + writes.iter().map(|(i, _)| h.chunk_len(*i)).sum::<u64>(),
    };
    progress
        .total
        .store(total, std::sync::atomic::Ordering::Relaxed);
    if before.is_none() {
        // What is zero already and not rewritten still counts as restored.
        let skipped =
            h.size - zero_bytes - to.chunks.iter().map(|(i, _)| h.chunk_len(*i)).sum::<u64>();
        progress.add(skipped);
    }
    for (s, e) in zero_runs {
        let (off, end) = (s * h.chunk_size, (e * h.chunk_size).min(h.size));
        sink.zero(off, end - off).await?;
        progress.add(end - off);
    }
    let progress = &progress;
    let count = writes.len();
    let skipped = std::sync::atomic::AtomicU64::new(0);
    let skipped = &skipped;
    futures::stream::iter(writes)
        .map(|(index, name)| async move {
            if resume {
                let len = h.chunk_len(index);
                if let Some(have) = sink.read(index * h.chunk_size, len).await? {
                    let k = keys.clone();
                    if blocking(move || chunk::name_of(&k, &have)).await? == name.name {
                        progress.add(len);
                        skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Ok(());
                    }
                }
            }
            let (data, stored) = fetch(target, keys, to, index, name).await?;
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
    tracing::info!(backup = %format!("{}/{}", h.volume, h.id),
        from = from.map(|f| f.header.id.as_str()).unwrap_or("nothing"), chunks = count,
        already_there = skipped.load(std::sync::atomic::Ordering::Relaxed), "restore complete");
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
