//! The simulated network: each engine incarnation reaches the replicas through its own
//! in-memory links, so a link can be cut between one engine and one replica while
//! others still talk; and every message waits a delay the seed chooses, so replies
//! from different replicas arrive in any order. Every other engine incarnation runs
//! its I/O streams as real data connections (frames, both ends' connection code) over
//! in-memory wires, which a cut drops wherever the bytes stood.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use parking_lot::Mutex;
use tether_engine::replica::link::{Connector, Inbound, Outbound, ReplicaLink};
use tether_engine::replica::local::LocalConnector;
use tether_proto::replica::{
    DeleteSnapshotReply, DeleteSnapshotRequest, HashesReply, HashesRequest, MapReply, MapRequest,
    OpenReply, OpenRequest, RecordGenerationReply, RecordGenerationRequest, SnapshotsReply,
    SnapshotsRequest,
};
use tether_replica::ReplicaService;
use tonic::Status;

use crate::rng::Rng;

/// Message delays, drawn from the simulation's generator.
pub struct Delays {
    rng: Mutex<Rng>,
    /// Percent of messages delayed at all, and the longest delay.
    percent: u64,
    max: Duration,
}

impl Delays {
    /// Delays `percent` of messages by up to `max`, as `rng` chooses.
    pub fn new(rng: Rng, percent: u64, max: Duration) -> Arc<Delays> {
        Arc::new(Delays {
            rng: Mutex::new(rng),
            percent,
            max,
        })
    }

    fn next(&self) -> Duration {
        let mut rng = self.rng.lock();
        if !rng.chance(self.percent) {
            return Duration::ZERO;
        }
        Duration::from_micros(rng.below(self.max.as_micros() as u64 + 1))
    }

    async fn wait(&self) {
        let d = self.next();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

/// One engine incarnation's view of the network.
struct EngineNet {
    links: Arc<LocalConnector>,
    alive: bool,
}

/// Which replicas are up, which links are cut, and each engine's links.
pub struct Net {
    replicas: Vec<String>,
    services: Mutex<Vec<Option<ReplicaService>>>,
    engines: Mutex<Vec<EngineNet>>,
    /// (engine incarnation, replica) pairs cut apart.
    cut: Mutex<BTreeSet<(usize, String)>>,
    delays: Arc<Delays>,
}

impl Net {
    /// A network over `replicas` (all down until started).
    pub fn new(replicas: &[String], delays: Arc<Delays>) -> Arc<Net> {
        Arc::new(Net {
            replicas: replicas.to_vec(),
            services: Mutex::new(vec![None; replicas.len()]),
            engines: Mutex::new(Vec::new()),
            cut: Mutex::new(BTreeSet::new()),
            delays,
        })
    }

    fn index(&self, addr: &str) -> Option<usize> {
        self.replicas.iter().position(|a| a == addr)
    }

    /// Sets each of engine `e`'s links to what the network allows now.
    fn apply(&self, e: usize) {
        let engines = self.engines.lock();
        let Some(en) = engines.get(e) else { return };
        let services = self.services.lock();
        let cut = self.cut.lock();
        for (i, addr) in self.replicas.iter().enumerate() {
            let up = services[i].is_some();
            en.links
                .cut(addr, !en.alive || !up || cut.contains(&(e, addr.clone())));
        }
    }

    fn apply_all(&self) {
        // Not `for e in 0..self.engines.lock().len()`: that guard would live through
        // the loop.
        let n = self.engines.lock().len();
        for e in 0..n {
            self.apply(e);
        }
    }

    /// A new engine incarnation; returns its number and its connector.
    pub fn engine(self: &Arc<Net>) -> (usize, Arc<dyn Connector>) {
        let links = Arc::new(if Net::framed(self.engines.lock().len()) {
            LocalConnector::framed()
        } else {
            LocalConnector::default()
        });
        for (i, s) in self.services.lock().iter().enumerate() {
            if let Some(s) = s {
                links.add(&self.replicas[i], s.clone());
            }
        }
        let e = {
            let mut engines = self.engines.lock();
            engines.push(EngineNet {
                links: links.clone(),
                alive: true,
            });
            engines.len() - 1
        };
        self.apply(e);
        let connector = SimConnector {
            links,
            delays: self.delays.clone(),
        };
        (e, Arc::new(connector))
    }

    /// Whether engine incarnation `e` reaches the replicas by data connections over
    /// in-memory wires (the odd ones) or by handing its I/O streams over whole, so
    /// every run explores both.
    pub fn framed(e: usize) -> bool {
        e % 2 == 1
    }

    /// Engine incarnation `e` died: nothing of it reaches any replica any more.
    pub fn kill_engine(&self, e: usize) {
        if let Some(en) = self.engines.lock().get_mut(e) {
            en.alive = false;
        }
        self.apply(e);
    }

    /// Replica `addr` goes down: every link to it breaks.
    pub fn replica_down(&self, addr: &str) {
        let Some(i) = self.index(addr) else { return };
        self.services.lock()[i] = None;
        self.apply_all();
    }

    /// Replica `addr` runs `service` from now on: engines reach it anew (old streams
    /// stay broken, as after a restart).
    pub fn replica_up(&self, addr: &str, service: ReplicaService) {
        let Some(i) = self.index(addr) else { return };
        self.services.lock()[i] = Some(service.clone());
        let n = self.engines.lock().len();
        for e in 0..n {
            let links = self.engines.lock()[e].links.clone();
            links.add(addr, service.clone());
            self.apply(e);
        }
    }

    /// Cuts (or heals) the link between engine incarnation `e` and replica `addr`.
    pub fn set_cut(&self, e: usize, addr: &str, cut: bool) {
        {
            let mut c = self.cut.lock();
            if cut {
                c.insert((e, addr.to_string()));
            } else {
                c.remove(&(e, addr.to_string()));
            }
        }
        self.apply(e);
    }

    /// Heals every cut.
    pub fn heal_all(&self) {
        self.cut.lock().clear();
        self.apply_all();
    }

    /// Whether replica `addr` runs.
    pub fn is_up(&self, addr: &str) -> bool {
        self.index(addr)
            .is_some_and(|i| self.services.lock()[i].is_some())
    }
}

/// An engine's connector: its in-memory links, with delays.
struct SimConnector {
    links: Arc<LocalConnector>,
    delays: Arc<Delays>,
}

#[tonic::async_trait]
impl Connector for SimConnector {
    async fn connect(&self, addr: &str) -> Result<Arc<dyn ReplicaLink>, String> {
        self.delays.wait().await;
        let inner = self.links.connect(addr).await?;
        Ok(Arc::new(DelayLink {
            inner,
            delays: self.delays.clone(),
        }))
    }
}

/// A link whose every message, each way, waits a delay first.
struct DelayLink {
    inner: Arc<dyn ReplicaLink>,
    delays: Arc<Delays>,
}

impl DelayLink {
    /// The request waits, is answered, and the answer waits.
    async fn call<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.delays.wait().await;
        let r = f.await;
        self.delays.wait().await;
        r
    }
}

#[tonic::async_trait]
impl ReplicaLink for DelayLink {
    async fn open(&self, req: OpenRequest) -> Result<OpenReply, Status> {
        self.call(self.inner.open(req)).await
    }

    async fn record_generation(
        &self,
        req: RecordGenerationRequest,
    ) -> Result<RecordGenerationReply, Status> {
        self.call(self.inner.record_generation(req)).await
    }

    fn io(&self, outbound: Outbound) -> BoxFuture<'static, Result<Inbound, Status>> {
        let (d_out, d_in) = (self.delays.clone(), self.delays.clone());
        // Each direction keeps its order, as a TCP stream does.
        let delayed = outbound.then(move |batch| {
            let d = d_out.clone();
            async move {
                d.wait().await;
                batch
            }
        });
        let opened = self.inner.io(Outbound(Box::pin(delayed)));
        Box::pin(async move {
            let inbound = opened.await?;
            let delayed: Inbound = Box::pin(inbound.then(move |reply| {
                let d = d_in.clone();
                async move {
                    d.wait().await;
                    reply
                }
            }));
            Ok(delayed)
        })
    }

    async fn snapshots(&self, req: SnapshotsRequest) -> Result<SnapshotsReply, Status> {
        self.call(self.inner.snapshots(req)).await
    }

    async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotReply, Status> {
        self.call(self.inner.delete_snapshot(req)).await
    }

    async fn map(&self, req: MapRequest) -> Result<MapReply, Status> {
        self.call(self.inner.map(req)).await
    }

    async fn hashes(&self, req: HashesRequest) -> Result<HashesReply, Status> {
        self.call(self.inner.hashes(req)).await
    }
}
