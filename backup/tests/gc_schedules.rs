//! gc and backups interleaved, step by step, under seeded schedules.
//!
//! Every request to the object store is a step. A scheduler lets one actor take one
//! step at a time, in an order a seed picks, and drives a clock the store stamps
//! LastModified with and the leases measure with. The actors: a backup of each of
//! three volumes (backups get killed halfway, stall past their lease, and resume),
//! someone who removes backups (parents of running backups included), and two gcs
//! with no grace period. Chunk contents come from a small pool, so backups share
//! chunks and upload ones gc is about to delete.
//!
//! At the end every manifest in the store must restore to exactly the data its
//! backup read, and a last gc must leave exactly the chunks that the manifests and
//! checkpoints left name.
//!
//! `TETHER_GC_SEEDS=N` runs N schedules (default 600), from `TETHER_GC_FROM`;
//! `TETHER_GC_SEED=S` replays one with its trace.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt as _;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use tether_backup::{
    BackupError, Checkpoint, ChunkRef, Clock, GcOptions, GcProgress, Header, Job, Keys, Lease,
    LeaseStart, Manifest, Progress, Scope, Secret, Sink, Source, Target, TargetConfig,
};
use tokio::sync::oneshot;

const CHUNK: u64 = 256 << 10;
const CHUNKS: u64 = 6;
const TTL_MS: i64 = 10_000;

/// splitmix64: small, seeded, the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

tokio::task_local! {
    static ACTOR: usize;
}

#[derive(Default)]
struct State {
    now: i64,
    waiting: BTreeMap<usize, (oneshot::Sender<()>, String)>,
    running: BTreeSet<usize>,
    trace: Vec<String>,
}

/// Lets one actor's request through at a time and keeps the clock.
#[derive(Default)]
struct Sched {
    st: Mutex<State>,
    changed: tokio::sync::Notify,
}

impl Sched {
    fn now(&self) -> i64 {
        self.st.lock().unwrap().now
    }

    async fn gate(&self, what: String) {
        let Ok(actor) = ACTOR.try_with(|a| *a) else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.st.lock().unwrap();
            st.running.remove(&actor);
            st.waiting.insert(actor, (tx, what));
        }
        self.changed.notify_one();
        // A killed actor's sender is dropped with it; it never returns from here.
        if rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn started(&self, actor: usize) {
        self.st.lock().unwrap().running.insert(actor);
    }

    fn ended(&self, actor: usize) {
        self.st.lock().unwrap().running.remove(&actor);
        self.changed.notify_one();
    }

    async fn idle(&self) {
        loop {
            if self.st.lock().unwrap().running.is_empty() {
                return;
            }
            self.changed.notified().await;
        }
    }
}

#[derive(Debug)]
struct SimClock(Arc<Sched>);

impl Clock for SimClock {
    fn now(&self) -> Duration {
        Duration::from_millis(self.0.now().max(0) as u64)
    }
}

/// An object store in memory whose every request is a scheduler step, whose
/// LastModified is the scheduler's clock, and whose listings page one key at a time
/// from the live state, as a listing of a busy bucket does.
#[derive(Debug)]
struct SimStore {
    sched: Arc<Sched>,
    objects: Arc<Mutex<BTreeMap<String, (Bytes, i64)>>>,
}

impl std::fmt::Debug for Sched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sched")
    }
}

impl std::fmt::Display for SimStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimStore")
    }
}

fn meta(key: &str, b: &Bytes, t: i64) -> ObjectMeta {
    ObjectMeta {
        location: Path::from(key),
        last_modified: chrono::DateTime::from_timestamp_millis(t).unwrap_or_default(),
        size: b.len() as u64,
        e_tag: None,
        version: None,
    }
}

fn under(key: &str, prefix: Option<&Path>) -> bool {
    match prefix {
        None => true,
        Some(p) if p.as_ref().is_empty() => true,
        Some(p) => key.starts_with(&format!("{}/", p.as_ref())),
    }
}

#[async_trait]
impl ObjectStore for SimStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.sched.gate(format!("put {location}")).await;
        let mut o = self.objects.lock().unwrap();
        let key = location.to_string();
        if matches!(opts.mode, PutMode::Create) && o.contains_key(&key) {
            return Err(object_store::Error::AlreadyExists {
                path: key,
                source: "exists".into(),
            });
        }
        let now = self.sched.now();
        o.insert(key, (Bytes::from(payload), now));
        Ok(PutResult {
            e_tag: None,
            version: None,
        })
    }

    async fn put_multipart_opts(
        &self,
        _: &Path,
        _: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(object_store::Error::NotImplemented)
    }

    async fn get_opts(&self, location: &Path, _: GetOptions) -> object_store::Result<GetResult> {
        self.sched.gate(format!("get {location}")).await;
        let key = location.to_string();
        let Some((b, t)) = self.objects.lock().unwrap().get(&key).cloned() else {
            return Err(object_store::Error::NotFound {
                path: key,
                source: "missing".into(),
            });
        };
        let len = b.len() as u64;
        Ok(GetResult {
            meta: meta(&key, &b, t),
            payload: GetResultPayload::Stream(futures::stream::once(async move { Ok(b) }).boxed()),
            range: 0..len,
            attributes: Default::default(),
        })
    }

    async fn get_ranges(&self, _: &Path, _: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        Err(object_store::Error::NotImplemented)
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.sched.gate(format!("delete {location}")).await;
        self.objects.lock().unwrap().remove(location.as_ref());
        Ok(())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let (sched, objects) = (self.sched.clone(), self.objects.clone());
        let prefix = prefix.cloned();
        futures::stream::unfold(Some(String::new()), move |after| {
            let (sched, objects, prefix) = (sched.clone(), objects.clone(), prefix.clone());
            async move {
                let after = after?;
                sched.gate(format!("list {prefix:?} after {after}")).await;
                let o = objects.lock().unwrap();
                let next = o
                    .range::<String, _>((
                        std::ops::Bound::Excluded(&after),
                        std::ops::Bound::Unbounded,
                    ))
                    .find(|(k, _)| under(k, prefix.as_ref()))
                    .map(|(k, (b, t))| meta(k, b, *t));
                next.map(|m| {
                    let k = m.location.to_string();
                    (Ok(m), Some(k))
                })
            }
        })
        .boxed()
    }

    async fn list_with_delimiter(&self, _: Option<&Path>) -> object_store::Result<ListResult> {
        Err(object_store::Error::NotImplemented)
    }

    async fn copy(&self, _: &Path, _: &Path) -> object_store::Result<()> {
        Err(object_store::Error::NotImplemented)
    }

    async fn copy_if_not_exists(&self, _: &Path, _: &Path) -> object_store::Result<()> {
        Err(object_store::Error::NotImplemented)
    }
}

struct MemSource(Arc<Vec<u8>>);

impl Source for MemSource {
    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<u8>, BackupError>> {
        let r = self.0[offset as usize..(offset + len) as usize].to_vec();
        Box::pin(async move { Ok(r) })
    }
}

struct MemSink(Mutex<Vec<u8>>);

impl Sink for MemSink {
    fn write(&self, offset: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), BackupError>> {
        let mut v = self.0.lock().unwrap();
        v[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Box::pin(async { Ok(()) })
    }
    fn zero(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackupError>> {
        let mut v = self.0.lock().unwrap();
        v[offset as usize..(offset + len) as usize].fill(0);
        Box::pin(async { Ok(()) })
    }
    fn finish(&self) -> BoxFuture<'_, Result<(), BackupError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The pool chunk contents come from: zeroes, or one of four patterns.
fn chunk_content(k: u64) -> Vec<u8> {
    if k == 0 {
        return vec![0; CHUNK as usize];
    }
    (0..CHUNK)
        .map(|i| ((i * 7 + k * 31) % 251) as u8 ^ (k as u8))
        .collect()
}

/// A volume's bytes as one backup read them.
type Volume = Arc<Vec<u8>>;

struct World {
    target: Target,
    keys: Keys,
    cfg: TargetConfig,
    /// What each backup attempted read, by (volume, id).
    read: Mutex<BTreeMap<(String, String), Volume>>,
    completed: Mutex<Vec<(String, String)>>,
    log: Mutex<Vec<String>>,
}

impl World {
    fn note(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }
}

/// One attempt at backup `id` of `volume` reading `data`, as the engine makes it.
async fn attempt(
    w: Arc<World>,
    volume: String,
    id: String,
    data: Arc<Vec<u8>>,
    checkpoint_every: Duration,
) -> Result<(), BackupError> {
    let t = &w.target;
    let latest = t.latest(&volume).await?;
    let ck = t.checkpoint(&w.keys, &volume).await?;
    let resume = ck.filter(|c| c.header.id == id);
    if resume.is_none() {
        t.remove_checkpoint(&volume).await?;
    }
    let parent_id = match &resume {
        Some(c) => c.header.parent.clone(),
        None => latest,
    };
    let start = LeaseStart {
        parent: parent_id.clone(),
        resume: resume.is_some(),
    };
    let mut lease = Lease::take(t, w.cfg.lease(), &volume, &id, &start).await?;
    let mut resume = resume;
    let parent = match &parent_id {
        Some(p) => match t.manifest(&w.keys, &volume, p).await {
            Ok(m) => Some(m),
            Err(BackupError::NotFound(_)) => {
                // The parent was removed: a full backup, relying on nothing.
                resume = None;
                lease = Lease::take(t, w.cfg.lease(), &volume, &id, &LeaseStart::default()).await?;
                None
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    let header = Header {
        format: tether_backup::manifest::FORMAT,
        id: id.clone(),
        volume: volume.clone(),
        size: CHUNK * CHUNKS,
        chunk_size: CHUNK,
        snapshot: format!("backup-{id}"),
        snapshot_seq: 1,
        parent: parent.as_ref().map(|p| p.header.id.clone()),
        created: 0,
        labels: Default::default(),
        stats: Default::default(),
    };
    tether_backup::create(
        Job {
            target: t.clone(),
            keys: w.keys.clone(),
            header,
            parent,
            scope: Scope::Allocated((0..CHUNKS).collect()),
            concurrency: 1,
            progress: Arc::new(Progress::default()),
            lease: Arc::new(lease),
            resume: resume.map(|c| c.done).unwrap_or_default(),
            checkpoint_every,
        },
        &MemSource(data),
    )
    .await
    .map(drop)
}

async fn restore_check(w: &World, volume: &str, id: &str) -> Result<(), String> {
    let m = w
        .target
        .manifest(&w.keys, volume, id)
        .await
        .map_err(|e| e.to_string())?;
    let sink = MemSink(Mutex::new(vec![0xEE; (CHUNK * CHUNKS) as usize]));
    tether_backup::restore(
        &w.target,
        &w.keys,
        &m,
        &sink,
        false,
        2,
        Arc::new(Progress::default()),
    )
    .await
    .map_err(|e| format!("backup {volume}/{id} does not restore: {e}"))?;
    let want = w
        .read
        .lock()
        .unwrap()
        .get(&(volume.to_string(), id.to_string()))
        .cloned();
    let Some(want) = want else {
        return Err(format!("backup {volume}/{id} was never attempted"));
    };
    if *sink.0.lock().unwrap() != *want {
        return Err(format!(
            "backup {volume}/{id} restores other bytes than it read"
        ));
    }
    Ok(())
}

enum Kind {
    Backup(String),
    Remover,
    Gc,
}

/// Writes target.json for a fixed master key, so chunk names, and with them the
/// order of every listing, are the same in every run of a seed.
fn fixed_keys(store: &SimStore) -> Keys {
    let keys = Keys::from_master([3; 32]);
    let cfg = TargetConfig {
        format: 1,
        chunk_size: CHUNK,
        created: 0,
        key: keys.wrap(&Secret::KeyFile(vec![9; 32])).unwrap(),
        lease_secs: (TTL_MS / 1000) as u64,
    };
    store.objects.lock().unwrap().insert(
        "target.json".into(),
        (Bytes::from(serde_json::to_vec(&cfg).unwrap()), 0),
    );
    keys
}

/// Runs one schedule; `Err` says what broke.
async fn run(seed: u64, verbose: bool) -> Result<(), String> {
    let sched = Arc::new(Sched::default());
    sched.st.lock().unwrap().now = 1_000_000_000_000;
    let store = Arc::new(SimStore {
        sched: sched.clone(),
        objects: Arc::new(Mutex::new(BTreeMap::new())),
    });
    let target = Target::from_store(store.clone(), "", "sim", Arc::new(SimClock(sched.clone())));
    let keys = fixed_keys(&store);
    let cfg = target.config().await.map_err(|e| e.to_string())?;
    assert_eq!(cfg.lease(), Duration::from_secs(10));
    let w = Arc::new(World {
        target,
        keys,
        cfg,
        read: Mutex::new(BTreeMap::new()),
        completed: Mutex::new(Vec::new()),
        log: Mutex::new(Vec::new()),
    });
    let mut rng = Rng(seed);
    // A small pool of contents makes backups share chunks; a large one makes most
    // uploads new.
    let pool = if rng.chance(2) { 5 } else { 16 };
    let kinds = [
        Kind::Backup("a".into()),
        Kind::Backup("b".into()),
        Kind::Backup("c".into()),
        Kind::Remover,
        Kind::Gc,
        Kind::Gc,
    ];
    // Attempt tasks, by actor, so the scheduler can kill one.
    let attempts: Arc<Mutex<BTreeMap<usize, tokio::task::AbortHandle>>> = Default::default();
    let mut drivers = Vec::new();
    for (actor, kind) in kinds.into_iter().enumerate() {
        let w = w.clone();
        let sched2 = sched.clone();
        let attempts = attempts.clone();
        let mut r = Rng(seed ^ (actor as u64 + 1).wrapping_mul(0x1234_5678_9abc));
        sched.started(actor);
        drivers.push(tokio::spawn(async move {
            match kind {
                Kind::Backup(v) => {
                    let mut data = vec![0u8; (CHUNK * CHUNKS) as usize];
                    for n in 0..4 {
                        for c in 0..CHUNKS {
                            if n == 0 || r.chance(3) {
                                let k = r.below(pool);
                                data[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize]
                                    .copy_from_slice(&chunk_content(k));
                            }
                        }
                        let snap = Arc::new(data.clone());
                        let id = format!("2026120{n}T000000.000Z-{v}{n}");
                        w.read
                            .lock()
                            .unwrap()
                            .insert((v.clone(), id.clone()), snap.clone());
                        for _try in 0..12 {
                            let task = tokio::spawn(ACTOR.scope(
                                actor,
                                attempt(
                                    w.clone(),
                                    v.clone(),
                                    id.clone(),
                                    snap.clone(),
                                    Duration::from_millis(if r.chance(2) { 200 } else { 100_000 }),
                                ),
                            ));
                            attempts.lock().unwrap().insert(actor, task.abort_handle());
                            let r = task.await;
                            attempts.lock().unwrap().remove(&actor);
                            match r {
                                Ok(Ok(())) => {
                                    w.completed.lock().unwrap().push((v.clone(), id.clone()));
                                    w.note(format!("backup {v}/{id} completed"));
                                    break;
                                }
                                Ok(Err(e)) => w.note(format!("backup {v}/{id} failed: {e}")),
                                Err(_) => w.note(format!("backup {v}/{id} killed")),
                            }
                        }
                    }
                }
                Kind::Remover => {
                    ACTOR
                        .scope(actor, async {
                            for _ in 0..12 {
                                let Ok(all) = w.target.list(None).await else {
                                    continue;
                                };
                                if all.is_empty() || r.chance(3) {
                                    let _ = w.target.latest("a").await;
                                    continue;
                                }
                                // Often the newest backup of a volume: the parent the
                                // volume's running backup builds on.
                                let mut pick = all[r.below(all.len() as u64) as usize].clone();
                                if r.chance(2) {
                                    if let Some(l) = all.iter().rfind(|(v, _)| *v == pick.0) {
                                        pick = l.clone();
                                    }
                                }
                                let (v, id) = &pick;
                                match w.target.remove(v, id).await {
                                    Ok(_) => w.note(format!("removed {v}/{id}")),
                                    Err(e) => w.note(format!("remove {v}/{id}: {e}")),
                                }
                            }
                        })
                        .await
                }
                Kind::Gc => {
                    ACTOR
                        .scope(actor, async {
                            for _ in 0..10 {
                                let opts = GcOptions {
                                    grace: Duration::ZERO,
                                    dry_run: false,
                                    checkpoint_keep: Duration::from_millis(if r.chance(2) {
                                        2_000
                                    } else {
                                        3_600_000
                                    }),
                                    concurrency: 1,
                                };
                                match tether_backup::gc(
                                    &w.target,
                                    &w.keys,
                                    &w.cfg,
                                    &opts,
                                    &GcProgress::default(),
                                )
                                .await
                                {
                                    Ok(rep) => w.note(format!(
                                        "gc: deleted {} kept young {} referenced {} skipped {:?}",
                                        rep.deleted, rep.kept_young, rep.referenced, rep.skipped
                                    )),
                                    Err(e) => w.note(format!("gc failed: {e}")),
                                }
                            }
                        })
                        .await
                }
            }
            sched2.ended(actor);
        }));
    }

    // The schedule. Each actor gets a speed, so that in some schedules a gc runs
    // whole while a backup takes a few steps, and in others the other way round.
    let speed: Vec<u64> = (0..6).map(|_| 1 + rng.below(12)).collect();
    let mut paused: BTreeMap<usize, i64> = BTreeMap::new();
    let mut steps = 0u64;
    loop {
        sched.idle().await;
        let mut st = sched.st.lock().unwrap();
        if st.waiting.is_empty() {
            break;
        }
        steps += 1;
        if steps > 200_000 {
            let keep = st.trace.len().saturating_sub(30);
            let st_trace = st.trace.split_off(keep);
            return Err(format!(
                "the schedule did not end; its last steps:\n{}",
                st_trace.join("\n")
            ));
        }
        st.now += rng.below(60) as i64;
        let now = st.now;
        paused.retain(|_, u| *u > now);
        let ready: Vec<usize> = st
            .waiting
            .keys()
            .copied()
            .filter(|a| paused.get(a).is_none_or(|&u| u <= now))
            .collect();
        if ready.is_empty() {
            // Everyone left is stalled: time passes.
            st.now = paused.values().copied().min().unwrap_or(now).max(now);
            continue;
        }
        let total: u64 = ready.iter().map(|&a| speed[a]).sum();
        let mut pick = rng.below(total);
        let mut actor = ready[0];
        for &a in &ready {
            if pick < speed[a] {
                actor = a;
                break;
            }
            pick -= speed[a];
        }
        // Now and then an actor stalls past a lease, or a backup is killed.
        if rng.chance(400) {
            paused.insert(actor, now + TTL_MS + rng.below(TTL_MS as u64) as i64);
            st.trace.push(format!("{now} stall {actor}"));
            continue;
        }
        if actor < 3 && rng.chance(150) {
            if let Some(h) = attempts.lock().unwrap().get(&actor) {
                h.abort();
                st.waiting.remove(&actor);
                st.running.insert(actor);
                st.trace.push(format!("{now} kill {actor}"));
                continue;
            }
        }
        let (tx, what) = st.waiting.remove(&actor).expect("picked from waiting");
        st.running.insert(actor);
        st.trace.push(format!("{now} {actor} {what}"));
        let _ = tx.send(());
    }
    for d in drivers {
        d.await.map_err(|e| format!("an actor panicked: {e}"))?;
    }
    if verbose {
        for l in &sched.st.lock().unwrap().trace {
            eprintln!("{l}");
        }
        for l in w.log.lock().unwrap().iter() {
            eprintln!("{l}");
        }
    }

    // Every backup in the store restores to what it read.
    let all = w.target.list(None).await.map_err(|e| e.to_string())?;
    for (v, id) in &all {
        restore_check(&w, v, id).await?;
    }
    let completed = w.completed.lock().unwrap().clone();
    if completed.len() < 3 {
        return Err(format!("only {} backups completed", completed.len()));
    }

    // With every lease long expired, gc leaves exactly what the manifests and
    // checkpoints name.
    sched.st.lock().unwrap().now += 3 * TTL_MS;
    let opts = GcOptions {
        grace: Duration::ZERO,
        dry_run: false,
        checkpoint_keep: Duration::from_secs(3600),
        concurrency: 4,
    };
    let rep = tether_backup::gc(&w.target, &w.keys, &w.cfg, &opts, &GcProgress::default())
        .await
        .map_err(|e| e.to_string())?;
    if rep.skipped.is_some() {
        return Err(format!("the last gc skipped its sweep: {:?}", rep.skipped));
    }
    let mut want: HashSet<ChunkRef> = HashSet::new();
    for (v, id) in &all {
        let m: Manifest = w
            .target
            .manifest(&w.keys, v, id)
            .await
            .map_err(|e| e.to_string())?;
        want.extend(m.chunks.iter().map(|(_, n)| *n));
    }
    for v in ["a", "b", "c"] {
        if let Some(c) = w
            .target
            .checkpoint(&w.keys, v)
            .await
            .map_err(|e| e.to_string())?
        {
            let c: Checkpoint = c;
            want.extend(c.done.values().flatten().copied());
        }
    }
    let have: HashSet<ChunkRef> = store
        .objects
        .lock()
        .unwrap()
        .keys()
        .filter_map(|k| k.strip_prefix("chunks/"))
        .filter_map(|k| k.split('/').nth(1))
        .filter_map(ChunkRef::parse_key)
        .collect();
    if have != want {
        return Err(format!(
            "after the last gc the store holds {} chunks, the backups name {} ({} extra, {} missing)",
            have.len(),
            want.len(),
            have.difference(&want).count(),
            want.difference(&have).count()
        ));
    }
    for (v, id) in &all {
        restore_check(&w, v, id).await?;
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

#[test]
fn gc_and_backups_interleaved() {
    if let Ok(s) = std::env::var("TETHER_GC_SEED") {
        let seed: u64 = s.parse().expect("TETHER_GC_SEED is a number");
        if let Err(e) = runtime().block_on(run(seed, true)) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let n: u64 = std::env::var("TETHER_GC_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let from: u64 = std::env::var("TETHER_GC_FROM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for seed in from..from + n {
        if let Err(e) = runtime().block_on(run(seed, false)) {
            panic!(
                "seed {seed}: {e}\nreplay: TETHER_GC_SEED={seed} cargo test --release -p tether-backup --test gc_schedules -- --nocapture"
            );
        }
    }
}

/// A source that runs `hook` (once) before reading chunk `at`: a gc in the middle
/// of a backup, at a point the test picks.
struct HookedSource {
    data: Arc<Vec<u8>>,
    at: u64,
    hook: Mutex<Option<BoxFuture<'static, ()>>>,
}

impl Source for HookedSource {
    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<u8>, BackupError>> {
        Box::pin(async move {
            if offset / CHUNK == self.at {
                let hook = self.hook.lock().unwrap().take();
                if let Some(h) = hook {
                    h.await;
                }
            }
            Ok(self.data[offset as usize..(offset + len) as usize].to_vec())
        })
    }
}

/// A world with no scheduler: every request goes straight through, and the test
/// moves the clock.
async fn scenario_world() -> (Arc<World>, Arc<Sched>, Arc<SimStore>) {
    let sched = Arc::new(Sched::default());
    sched.st.lock().unwrap().now = 1_000_000_000_000;
    let store = Arc::new(SimStore {
        sched: sched.clone(),
        objects: Arc::new(Mutex::new(BTreeMap::new())),
    });
    let target = Target::from_store(store.clone(), "", "sim", Arc::new(SimClock(sched.clone())));
    let keys = fixed_keys(&store);
    let cfg = target.config().await.unwrap();
    let w = Arc::new(World {
        target,
        keys,
        cfg,
        read: Mutex::new(BTreeMap::new()),
        completed: Mutex::new(Vec::new()),
        log: Mutex::new(Vec::new()),
    });
    (w, sched, store)
}

fn volume_of(contents: &[u64]) -> Arc<Vec<u8>> {
    Arc::new(contents.iter().flat_map(|&k| chunk_content(k)).collect())
}

fn tick(sched: &Sched, ms: i64) {
    sched.st.lock().unwrap().now += ms;
}

fn zero_grace() -> GcOptions {
    GcOptions {
        grace: Duration::ZERO,
        dry_run: false,
        checkpoint_keep: Duration::from_secs(3600),
        concurrency: 2,
    }
}

/// Backup `id` of volume `a` from `src`, on `parent`, as the engine makes it.
async fn backup_with(
    w: &Arc<World>,
    id: &str,
    parent: Option<&str>,
    src: &dyn Source,
    data: &Arc<Vec<u8>>,
) -> Result<(), BackupError> {
    w.read
        .lock()
        .unwrap()
        .insert(("a".into(), id.into()), data.clone());
    let lease = Lease::take(
        &w.target,
        w.cfg.lease(),
        "a",
        id,
        &LeaseStart {
            parent: parent.map(str::to_string),
            resume: false,
        },
    )
    .await?;
    let parent = match parent {
        Some(p) => Some(w.target.manifest(&w.keys, "a", p).await?),
        None => None,
    };
    let header = Header {
        format: tether_backup::manifest::FORMAT,
        id: id.into(),
        volume: "a".into(),
        size: CHUNK * CHUNKS,
        chunk_size: CHUNK,
        snapshot: format!("backup-{id}"),
        snapshot_seq: 1,
        parent: parent.as_ref().map(|p| p.header.id.clone()),
        created: 0,
        labels: Default::default(),
        stats: Default::default(),
    };
    tether_backup::create(
        Job {
            target: w.target.clone(),
            keys: w.keys.clone(),
            header,
            parent,
            scope: Scope::Allocated((0..CHUNKS).collect()),
            concurrency: 1,
            progress: Arc::new(Progress::default()),
            lease: Arc::new(lease),
            resume: Default::default(),
            checkpoint_every: Duration::from_secs(3600),
        },
        src,
    )
    .await
    .map(drop)
}

#[test]
fn a_gc_in_the_middle_of_a_backup_keeps_what_it_uploaded() {
    runtime().block_on(async {
        let (w, sched, _) = scenario_world().await;
        let data = volume_of(&[1, 2, 3, 4, 5, 6]);
        let (w2, s2) = (w.clone(), sched.clone());
        let src = HookedSource {
            data: data.clone(),
            at: 3,
            hook: Mutex::new(Some(Box::pin(async move {
                // Chunks 0-2 are uploaded, named by no manifest and no checkpoint,
                // and older than the gc's start.
                tick(&s2, 1000);
                let rep = tether_backup::gc(
                    &w2.target,
                    &w2.keys,
                    &w2.cfg,
                    &zero_grace(),
                    &GcProgress::default(),
                )
                .await
                .unwrap();
                assert_eq!(
                    (rep.deleted, rep.kept_young, rep.leases_running),
                    (0, 3, 1),
                    "{rep:?}"
                );
            }))),
        };
        backup_with(&w, "20261201T000000.000Z-b", None, &src, &data)
            .await
            .unwrap();
        restore_check(&w, "a", "20261201T000000.000Z-b")
            .await
            .unwrap();
    });
}

#[test]
fn removing_the_parent_of_a_running_backup_stops_the_sweep() {
    runtime().block_on(async {
        let (w, sched, _) = scenario_world().await;
        let p = "20261201T000000.000Z-p";
        let first = volume_of(&[1, 2, 3, 4, 5, 6]);
        backup_with(&w, p, None, &MemSource(first.clone()), &first)
            .await
            .unwrap();
        tick(&sched, 3 * TTL_MS);
        // The next backup changes one chunk: the other five it names are the
        // parent's, and only the parent names them.
        let second = volume_of(&[1, 2, 3, 4, 5, 7]);
        let (w2, s2) = (w.clone(), sched.clone());
        let src = HookedSource {
            data: second.clone(),
            at: 2,
            hook: Mutex::new(Some(Box::pin(async move {
                w2.target.remove("a", p).await.unwrap();
                tick(&s2, 1000);
                let rep = tether_backup::gc(
                    &w2.target,
                    &w2.keys,
                    &w2.cfg,
                    &zero_grace(),
                    &GcProgress::default(),
                )
                .await
                .unwrap();
                assert_eq!(rep.deleted, 0, "{rep:?}");
                let why = rep.skipped.unwrap_or_default();
                assert!(why.contains("builds on"), "{why}");
            }))),
        };
        backup_with(&w, "20261202T000000.000Z-q", Some(p), &src, &second)
            .await
            .unwrap();
        restore_check(&w, "a", "20261202T000000.000Z-q")
            .await
            .unwrap();
        // Once that backup is done, its manifest protects what it names, and the
        // removed parent's own chunk goes.
        tick(&sched, 1000);
        let rep = tether_backup::gc(
            &w.target,
            &w.keys,
            &w.cfg,
            &zero_grace(),
            &GcProgress::default(),
        )
        .await
        .unwrap();
        assert_eq!((rep.deleted, rep.skipped.is_none()), (1, true), "{rep:?}");
        restore_check(&w, "a", "20261202T000000.000Z-q")
            .await
            .unwrap();
    });
}
