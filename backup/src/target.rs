//! A backup target: a local directory or an S3 bucket, through `object_store`, and
//! the layout of what tether keeps in it.
//!
//! ```text
//! PREFIX/target.json                 format, chunk size, the wrapped master key
//! PREFIX/chunks/ab/abcdef…           one object per chunk, named by its keyed hash
//! PREFIX/backups/VOLUME/ID           one sealed manifest per backup
//! PREFIX/latest/VOLUME               the id of the volume's newest complete backup
//! PREFIX/leases/VOLUME/ID/{start,renewed}  a running backup's lease (docs/backup.md)
//! PREFIX/checkpoints/VOLUME          a running or interrupted backup's progress
//! PREFIX/gc/lock                     held by the one gc running
//! ```
//!
//! Volume names and backup times are visible to whoever can list the bucket; chunk
//! contents, chunk maps, snapshot names and labels are not.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkRef, DEFAULT_CHUNK};
use crate::clock::{Clock, SystemClock};
use crate::error::BackupError;
use crate::keys::{Keys, Secret, WrappedKey};
use crate::manifest::{check_chunk_size, Manifest};

/// Where a target is and how to reach it; credentials ride along, never on a command line.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetSpec {
    /// `/path`, `file:///path` or `s3://bucket/prefix`.
    pub url: String,
    /// S3: the endpoint, e.g. `http://127.0.0.1:9000` (empty: AWS).
    #[serde(default)]
    pub endpoint: String,
    /// S3: the region (default us-east-1).
    #[serde(default)]
    pub region: String,
    /// S3: path-style requests (`endpoint/bucket/key`), as most non-AWS servers want.
    #[serde(default)]
    pub path_style: bool,
    /// S3: access key id.
    #[serde(default)]
    pub access_key: String,
    /// S3: secret access key.
    #[serde(default)]
    pub secret_key: String,
}

impl std::fmt::Debug for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TargetSpec({})", self.display())
    }
}

impl TargetSpec {
    /// The target as people name it (no credentials).
    pub fn display(&self) -> String {
        if self.endpoint.is_empty() {
            self.url.clone()
        } else {
            format!("{} at {}", self.url, self.endpoint)
        }
    }
}

/// What `target.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetConfig {
    /// Layout format.
    pub format: u32,
    /// Bytes per chunk, fixed when the target is made.
    pub chunk_size: u64,
    /// Seconds since the Unix epoch when the target was made.
    pub created: u64,
    /// The master key, wrapped.
    pub key: WrappedKey,
    /// Seconds a backup's lease lives without renewal; backups and gc must agree on
    /// it, so the target holds it.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
}

fn default_lease_secs() -> u64 {
    DEFAULT_LEASE.as_secs()
}

/// How long a lease lives unrenewed unless the target says otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15 * 60);

impl TargetConfig {
    /// The lease time.
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs.max(1))
    }
}

/// An object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its key's parts below the target's prefix.
    pub parts: Vec<String>,
    /// Its size in bytes.
    pub size: u64,
    /// When the server last wrote it, in milliseconds since the Unix epoch (the
    /// server's clock).
    pub modified: i64,
}

/// An open target.
#[derive(Clone)]
pub struct Target {
    store: Arc<dyn ObjectStore>,
    prefix: Vec<String>,
    name: String,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", self.name)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Target {
    /// Connects to the target `spec` names (no request is made yet).
    pub fn connect(spec: &TargetSpec) -> Result<Target, BackupError> {
        let name = spec.display();
        let bad = |why: String| BackupError::Invalid(format!("backup target {name}: {why}"));
        let (store, prefix): (Arc<dyn ObjectStore>, String) = if let Some(rest) =
            spec.url.strip_prefix("s3://")
        {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket: give s3://BUCKET[/PREFIX]".into()));
            }
            let mut b = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region(if spec.region.is_empty() {
                    "us-east-1"
                } else {
                    &spec.region
                })
                .with_retry(object_store::RetryConfig {
                    max_retries: 3,
                    retry_timeout: Duration::from_secs(30),
                    ..Default::default()
                });
            if !spec.endpoint.is_empty() {
                b = b
                    .with_endpoint(&spec.endpoint)
                    .with_allow_http(spec.endpoint.starts_with("http://"));
            }
            b = b.with_virtual_hosted_style_request(!spec.path_style);
            if spec.access_key.is_empty() || spec.secret_key.is_empty() {
                return Err(bad(
                        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give --s3-credentials FILE".into(),
                    ));
            }
            b = b
                .with_access_key_id(&spec.access_key)
                .with_secret_access_key(&spec.secret_key);
            let s = b.build().map_err(|e| bad(e.to_string()))?;
            (Arc::new(s), prefix.to_string())
        } else {
            let dir = PathBuf::from(spec.url.strip_prefix("file://").unwrap_or(&spec.url));
            if !dir.is_absolute() {
                return Err(bad(
                    "a directory target needs an absolute path, or s3://BUCKET/PREFIX".into(),
                ));
            }
            std::fs::create_dir_all(&dir)
                .map_err(|e| BackupError::Target(format!("backup target {name}: {e}")))?;
            let s = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| bad(e.to_string()))?;
            (Arc::new(s), String::new())
        };
        Ok(Target::from_store(
            store,
            &prefix,
            &name,
            Arc::new(SystemClock::default()),
        ))
    }

    /// A target on any object store, under `prefix`, with `clock` for its leases.
    pub fn from_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        name: &str,
        clock: Arc<dyn Clock>,
    ) -> Target {
        Target {
            store,
            prefix: prefix
                .split('/')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
            name: name.to_string(),
            clock,
        }
    }

    /// The clock leases measure with.
    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// The target's name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn path(&self, parts: &[&str]) -> Path {
        Path::from_iter(
            self.prefix
                .iter()
                .map(String::as_str)
                .chain(parts.iter().copied()),
        )
    }

    fn err(&self, what: &str, e: object_store::Error) -> BackupError {
        match e {
            object_store::Error::NotFound { .. } => {
                BackupError::NotFound(format!("backup target {}: {what}: not found", self.name))
            }
            e => BackupError::Target(format!("backup target {}: {what}: {e}", self.name)),
        }
    }

    pub(crate) async fn get(&self, path: &Path, what: &str) -> Result<Bytes, BackupError> {
        let r = self.store.get(path).await.map_err(|e| self.err(what, e))?;
        r.bytes().await.map_err(|e| self.err(what, e))
    }

    pub(crate) async fn put(
        &self,
        path: &Path,
        data: Vec<u8>,
        what: &str,
    ) -> Result<(), BackupError> {
        self.store
            .put(path, PutPayload::from(data))
            .await
            .map(drop)
            .map_err(|e| self.err(what, e))
    }

    /// Writes `path` only if nothing is there (`If-None-Match: *`); `Ok(false)` when
    /// something is. A store that cannot do that gets a read first, which narrows the
    /// race but does not close it.
    pub(crate) async fn put_new(
        &self,
        path: &Path,
        data: Vec<u8>,
        what: &str,
    ) -> Result<bool, BackupError> {
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(data.clone()), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented) => match self.store.head(path).await {
                Ok(_) => Ok(false),
                Err(object_store::Error::NotFound { .. }) => {
                    self.put(path, data, what).await?;
                    Ok(true)
                }
                Err(e) => Err(self.err(what, e)),
            },
            Err(e) => Err(self.err(what, e)),
        }
    }

    /// Deletes `path`; one already gone is fine.
    pub(crate) async fn delete(&self, path: &Path, what: &str) -> Result<(), BackupError> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(what, e)),
        }
    }

    /// When the server last wrote `path` (its clock, ms since the epoch).
    pub(crate) async fn modified(&self, path: &Path, what: &str) -> Result<i64, BackupError> {
        self.store
            .head(path)
            .await
            .map(|m| m.last_modified.timestamp_millis())
            .map_err(|e| self.err(what, e))
    }

    /// Streams every object under `parts`, in key order, with its size and time.
    pub(crate) fn list_under(
        &self,
        parts: &[&str],
        what: &str,
    ) -> BoxStream<'_, Result<Listed, BackupError>> {
        let skip = self.prefix.len();
        let what = what.to_string();
        self.store
            .list(Some(&self.path(parts)))
            .map(move |r| match r {
                Ok(ObjectMeta {
                    location,
                    size,
                    last_modified,
                    ..
                }) => Ok(Listed {
                    parts: location
                        .parts()
                        .skip(skip)
                        .map(|p| p.as_ref().to_string())
                        .collect(),
                    size,
                    modified: last_modified.timestamp_millis(),
                }),
                Err(e) => Err(self.err(&what, e)),
            })
            .boxed()
    }

    /// The path of chunk `name`, and the name a chunk path holds.
    pub(crate) fn chunk_of(parts: &[String]) -> Option<ChunkRef> {
        match parts {
            [c, dir, h] if c == "chunks" && h.get(..2) == Some(dir.as_str()) => {
                ChunkRef::parse_key(h)
            }
            _ => None,
        }
    }

    /// Creates the target: a new master key wrapped under `secret`. Refused when it
    /// already holds a target.json.
    pub async fn init(
        &self,
        chunk_size: u64,
        lease: Duration,
        secret: &Secret,
    ) -> Result<Keys, BackupError> {
        check_chunk_size(chunk_size)?;
        if lease < Duration::from_secs(1) || lease > Duration::from_secs(24 * 3600) {
            return Err(BackupError::Invalid(format!(
                "lease time {} must be from 1 s to 24 h",
                humantime::format_duration(lease)
            )));
        }
        match self.config().await {
            Ok(_) => {
                return Err(BackupError::Exists(format!(
                    "backup target {} is already initialised; use `tether backup target show` or `rekey`",
                    self.name
                )))
            }
            Err(BackupError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let keys = Keys::generate()?;
        let cfg = TargetConfig {
            format: 1,
            chunk_size,
            created: now_secs(),
            key: keys.wrap(secret)?,
            lease_secs: lease.as_secs(),
        };
        let json = serde_json::to_vec_pretty(&cfg)
            .map_err(|e| BackupError::Invalid(format!("encoding target.json: {e}")))?;
        // Create-only, so two inits racing cannot both win and lose one's key; stores
        // that cannot do that get the check above alone.
        if !self
            .put_new(&self.path(&["target.json"]), json, "writing target.json")
            .await?
        {
            return Err(BackupError::Exists(format!(
                "backup target {} was initialised by someone else just now; use `tether backup target show`",
                self.name
            )));
        }
        Ok(keys)
    }

    async fn write_config(&self, cfg: &TargetConfig) -> Result<(), BackupError> {
        let json = serde_json::to_vec_pretty(cfg)
            .map_err(|e| BackupError::Invalid(format!("encoding target.json: {e}")))?;
        self.put(&self.path(&["target.json"]), json, "writing target.json")
            .await
    }

    /// Reads `target.json`.
    pub async fn config(&self) -> Result<TargetConfig, BackupError> {
        let b = match self
            .get(&self.path(&["target.json"]), "reading target.json")
            .await
        {
            Err(BackupError::NotFound(_)) => {
                return Err(BackupError::NotFound(format!(
                "backup target {} holds no target.json: create it with `tether backup target init`",
                self.name
            )))
            }
            r => r?,
        };
        let cfg: TargetConfig = serde_json::from_slice(&b).map_err(|e| {
            BackupError::Corrupt(format!("backup target {}: target.json: {e}", self.name))
        })?;
        check_chunk_size(cfg.chunk_size)?;
        if cfg.format != 1 {
            return Err(BackupError::Invalid(format!(
                "backup target {}: format {} is newer than this tether; use a newer tether",
                self.name, cfg.format
            )));
        }
        Ok(cfg)
    }

    /// Reads the configuration and opens the master key with `secret`.
    pub async fn unlock(&self, secret: &Secret) -> Result<(TargetConfig, Keys), BackupError> {
        let cfg = self.config().await?;
        let keys = Keys::unwrap(&cfg.key, secret, &self.name)?;
        Ok((cfg, keys))
    }

    /// Wraps the master key under `new` instead of `old`; the chunks are untouched.
    pub async fn rekey(&self, old: &Secret, new: &Secret) -> Result<(), BackupError> {
        let (mut cfg, keys) = self.unlock(old).await?;
        cfg.key = keys.wrap(new)?;
        self.write_config(&cfg).await
    }

    /// Checks that the target can be written: puts and deletes a probe object.
    pub async fn check_writable(&self) -> Result<(), BackupError> {
        let r: [u8; 8] = crate::keys::random()?;
        let p = self.path(&["probe", &hex::encode(r)]);
        self.put(&p, b"tether probe".to_vec(), "writing a probe object")
            .await?;
        self.store
            .delete(&p)
            .await
            .map_err(|e| self.err("deleting a probe object", e))
    }

    fn chunk_path(&self, r: &ChunkRef) -> Path {
        let k = r.key();
        self.path(&["chunks", &k[..2], &k])
    }

    /// Stores a chunk's object (idempotent: the same name is the same content).
    pub async fn put_chunk(&self, r: &ChunkRef, object: Vec<u8>) -> Result<(), BackupError> {
        self.put(&self.chunk_path(r), object, &format!("writing chunk {r}"))
            .await
    }

    /// Deletes a chunk's object (gc only).
    pub(crate) async fn delete_chunk(&self, r: &ChunkRef) -> Result<(), BackupError> {
        self.delete(&self.chunk_path(r), &format!("deleting chunk {r}"))
            .await
    }

    /// Fetches a chunk's object.
    pub async fn get_chunk(&self, r: &ChunkRef) -> Result<Bytes, BackupError> {
        self.get(&self.chunk_path(r), &format!("reading chunk {r}"))
            .await
    }

    /// Where backup `volume/id`'s manifest lives.
    pub(crate) fn manifest_path(&self, volume: &str, id: &str) -> Path {
        self.path(&["backups", volume, id])
    }

    /// Moves `volume`'s latest pointer to backup `id`.
    pub async fn set_latest(&self, volume: &str, id: &str) -> Result<(), BackupError> {
        self.put(
            &self.path(&["latest", volume]),
            id.as_bytes().to_vec(),
            "writing the latest pointer",
        )
        .await
    }

    /// Reads and opens backup `id` of `volume`.
    pub async fn manifest(
        &self,
        keys: &Keys,
        volume: &str,
        id: &str,
    ) -> Result<Manifest, BackupError> {
        let b = match self
            .get(&self.manifest_path(volume, id), "reading a manifest")
            .await
        {
            Err(BackupError::NotFound(_)) => {
                return Err(BackupError::NotFound(format!(
                    "backup target {}: no backup {volume}/{id}; `tether backup ls` lists them",
                    self.name
                )))
            }
            r => r?,
        };
        Manifest::open(keys, volume, id, &b)
    }

    /// Where the checkpoint of `volume`'s running backup lives.
    pub(crate) fn checkpoint_path(&self, volume: &str) -> Path {
        self.path(&["checkpoints", volume])
    }

    /// The checkpoint of `volume`'s running or interrupted backup, if any.
    pub async fn checkpoint(
        &self,
        keys: &Keys,
        volume: &str,
    ) -> Result<Option<crate::checkpoint::Checkpoint>, BackupError> {
        match self
            .get(&self.checkpoint_path(volume), "reading a checkpoint")
            .await
        {
            Ok(b) => crate::checkpoint::Checkpoint::open(keys, volume, &b).map(Some),
            Err(BackupError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes the checkpoint of `volume`.
    pub async fn remove_checkpoint(&self, volume: &str) -> Result<(), BackupError> {
        self.delete(&self.checkpoint_path(volume), "deleting a checkpoint")
            .await
    }

    /// The id of the volume's newest complete backup, from its latest pointer.
    pub async fn latest(&self, volume: &str) -> Result<Option<String>, BackupError> {
        match self
            .get(
                &self.path(&["latest", volume]),
                "reading the latest pointer",
            )
            .await
        {
            Ok(b) => Ok(Some(String::from_utf8_lossy(&b).trim().to_string())),
            Err(BackupError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes backup `id` of `volume`: its manifest and nothing else (chunks it
    /// shares stay; garbage collection is separate). When it was the volume's latest,
    /// the pointer moves to the newest one left, or goes. Returns the new latest.
    pub async fn remove(&self, volume: &str, id: &str) -> Result<Option<String>, BackupError> {
        let path = self.manifest_path(volume, id);
        match self.store.head(&path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BackupError::NotFound(format!(
                    "backup target {}: no backup {volume}/{id}; `tether backup ls {volume}` lists them",
                    self.name
                )))
            }
            Err(e) => return Err(self.err("looking up a manifest", e)),
        }
        self.store
            .delete(&path)
            .await
            .map_err(|e| self.err(&format!("deleting backup {volume}/{id}"), e))?;
        let latest = self.latest(volume).await?;
        if latest.as_deref() != Some(id) {
            return Ok(latest);
        }
        let newest = self.list(Some(volume)).await?.pop().map(|(_, id)| id);
        let pointer = self.path(&["latest", volume]);
        match &newest {
            Some(n) => {
                self.put(
                    &pointer,
                    n.clone().into_bytes(),
                    "moving the latest pointer",
                )
                .await?
            }
            None => match self.store.delete(&pointer).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err("deleting the latest pointer", e)),
            },
        }
        Ok(newest)
    }

    /// Every backup in the target (or of `volume`), as (volume, id), oldest first per volume.
    pub async fn list(&self, volume: Option<&str>) -> Result<Vec<(String, String)>, BackupError> {
        let base = match volume {
            Some(v) => self.path(&["backups", v]),
            None => self.path(&["backups"]),
        };
        let skip = self.prefix.len() + 1;
        let mut out: Vec<(String, String)> = self
            .store
            .list(Some(&base))
            .map_ok(|m| {
                m.location
                    .parts()
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
            })
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| self.err("listing backups", e))?
            .into_iter()
            .filter_map(|p| match p.get(skip..) {
                Some([v, id]) => Some((v.clone(), id.clone())),
                _ => None,
            })
            .collect();
        out.sort();
        Ok(out)
    }
}

/// The default chunk size a new target gets.
pub const fn default_chunk_size() -> u64 {
    DEFAULT_CHUNK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn of_two_racing_inits_one_wins_and_its_key_stays() {
        let d = tempfile::tempdir().unwrap();
        let spec = TargetSpec {
            url: d.path().display().to_string(),
            endpoint: String::new(),
            region: String::new(),
            path_style: false,
            access_key: String::new(),
            secret_key: String::new(),
        };
        let (a, b) = (
            Target::connect(&spec).unwrap(),
            Target::connect(&spec).unwrap(),
        );
        let (sa, sb) = (Secret::KeyFile(vec![1; 32]), Secret::KeyFile(vec![2; 32]));
        let (ra, rb) = tokio::join!(
            a.init(1 << 20, DEFAULT_LEASE, &sa),
            b.init(1 << 20, DEFAULT_LEASE, &sb)
        );
        assert!(ra.is_ok() != rb.is_ok(), "{ra:?} {rb:?}");
        let (winner, secret) = match ra {
            Ok(k) => (k, sa),
            Err(_) => (rb.unwrap(), sb),
        };
        let (_, keys) = a.unlock(&secret).await.unwrap();
        assert_eq!(keys.master(), winner.master());
    }
}
