//! The in-process replica link: the engine talks to the real replica service and store
//! in its own process, with no network between.
//!
//! Two uses: a replica on the engine's own node (`dir:PATH` addresses, Mayastor's
//! "local child": no TCP, no second process, and reads prefer it), and tests and the
//! simulation, where a link can be cut to stand for a replica that died or fell off
//! the network.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use parking_lot::Mutex;
use tether_proto::replica::replica_server::Replica;
use tether_proto::replica::{
    DeleteSnapshotReply, DeleteSnapshotRequest, HashesReply, HashesRequest, MapReply, MapRequest,
    OpenReply, OpenRequest, RecordGenerationReply, RecordGenerationRequest, SnapshotsReply,
    SnapshotsRequest,
};
use tether_replica::store::StoreOptions;
use tether_replica::ReplicaService;
use tokio::sync::watch;
use tonic::{Request, Status};

use super::link::{Connector, Inbound, Outbound, ReplicaLink};

/// What every call over a cut link gets.
fn cut_off() -> Status {
    Status::unavailable("the link to this replica is cut")
}

/// A replica daemon's service, reached without a network.
#[derive(Clone)]
pub struct LocalLink {
    service: ReplicaService,
    /// True while the link is cut: every call fails as if the daemon were gone.
    cut: Arc<watch::Sender<bool>>,
    /// The replica lives on the engine's own node (reads prefer it); false for the
    /// stand-ins of remote daemons in tests.
    local: bool,
    /// I/O streams run as data connections (the real framing, both ends' real code)
    /// over an in-memory wire, as to a daemon; else the stream is handed over whole.
    framed: bool,
}

/// The prefix of an in-process replica's address: `dir:` and its data directory.
pub const DIR_PREFIX: &str = "dir:";

/// The data directory of an in-process replica's address, if it is one.
pub fn dir_of(addr: &str) -> Option<&Path> {
    addr.strip_prefix(DIR_PREFIX).map(Path::new)
}

/// The in-process replica services of this process, by data directory: each directory
/// is opened once (its lock allows one holder) and shared by every volume using it.
fn in_process() -> &'static Mutex<HashMap<PathBuf, ReplicaService>> {
    static SERVICES: OnceLock<Mutex<HashMap<PathBuf, ReplicaService>>> = OnceLock::new();
    SERVICES.get_or_init(Default::default)
}

/// A link to the in-process replica whose data directory `addr` names (`dir:PATH`),
/// opening the directory the first time.
pub fn connect_dir(addr: &str) -> Result<Arc<dyn ReplicaLink>, String> {
    let Some(dir) = dir_of(addr) else {
        return Err(format!("replica {addr}: not a dir:PATH address"));
    };
    if dir.as_os_str().is_empty() {
        return Err(format!(
            "replica {addr}: give the data directory after dir:, e.g. dir:/var/lib/tether/replica"
        ));
    }
    let mut services = in_process().lock();
    let service = match services.get(dir) {
        Some(s) => s.clone(),
        None => {
            let s = ReplicaService::new(dir, StoreOptions::default()).map_err(|e| {
                format!(
                    "replica {addr}: cannot serve data directory {} in process: {e}",
                    dir.display()
                )
            })?;
            tracing::info!(replica = %addr, "replica served in process");
            services.insert(dir.to_path_buf(), s.clone());
            s
        }
    };
    Ok(Arc::new(LocalLink {
        service,
        cut: Arc::new(watch::Sender::new(false)),
        local: true,
        framed: false,
    }))
}

impl LocalLink {
    fn check(&self) -> Result<(), Status> {
        if *self.cut.borrow() {
            return Err(cut_off());
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ReplicaLink for LocalLink {
    async fn open(&self, req: OpenRequest) -> Result<OpenReply, Status> {
        self.check()?;
        Ok(self.service.open(Request::new(req)).await?.into_inner())
    }

    async fn record_generation(
        &self,
        req: RecordGenerationRequest,
    ) -> Result<RecordGenerationReply, Status> {
        self.check()?;
        Ok(self
            .service
            .record_generation(Request::new(req))
            .await?
            .into_inner())
    }

    fn io(&self, outbound: Outbound) -> BoxFuture<'static, Result<Inbound, Status>> {
        let (service, cut) = (self.service.clone(), self.cut.clone());
        let framed = self.framed;
        Box::pin(async move {
            if *cut.borrow() {
                return Err(cut_off());
            }
            if framed {
                return framed_io(service, cut.subscribe(), outbound).await;
            }
            // A cut breaks the stream both ways, as a dropped connection would: the
            // replica sees an error (not a clean close), the engine an end.
            let (c1, c2) = (cut.clone(), cut);
            let requests = outbound.map(move |batch| {
                if *c1.borrow() {
                    Err(cut_off())
                } else {
                    Ok(batch)
                }
            });
            let replies = service.io_stream(Box::pin(requests)).await?;
            let inbound: Inbound = Box::pin(replies.take_while(move |_| {
                let open = !*c2.borrow();
                async move { open }
            }));
            Ok(inbound)
        })
    }

    async fn snapshots(&self, req: SnapshotsRequest) -> Result<SnapshotsReply, Status> {
        self.check()?;
        Ok(self
            .service
            .snapshots(Request::new(req))
            .await?
            .into_inner())
    }

    async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotReply, Status> {
        self.check()?;
        Ok(self
            .service
            .delete_snapshot(Request::new(req))
            .await?
            .into_inner())
    }

    async fn map(&self, req: MapRequest) -> Result<MapReply, Status> {
        self.check()?;
        Ok(self.service.map(Request::new(req)).await?.into_inner())
    }

    async fn hashes(&self, req: HashesRequest) -> Result<HashesReply, Status> {
        self.check()?;
        Ok(self.service.hashes(Request::new(req)).await?.into_inner())
    }

    fn is_local(&self) -> bool {
        self.local
    }
}

/// Bytes a pipe end holds before its writer waits: small, so frames cross the wire
/// in pieces and every partial read is exercised.
const WIRE_BUFFER: usize = 4096;

/// How long the replica may take to accept a stream on the in-memory wire.
const WIRE_TIMEOUT: Duration = Duration::from_secs(60);

/// An I/O stream as a data connection over an in-memory wire: the engine's and the
/// replica's real connection code at each end, and a wire between that a cut drops,
/// so both ends see the connection break wherever it stood (mid-frame included).
async fn framed_io(
    service: ReplicaService,
    mut cut: watch::Receiver<bool>,
    outbound: Outbound,
) -> Result<Inbound, Status> {
    let (engine_end, mut wire_e) = tokio::io::duplex(WIRE_BUFFER);
    let (replica_end, mut wire_r) = tokio::io::duplex(WIRE_BUFFER);
    tokio::spawn(async move {
        tokio::select! {
            _ = cut.wait_for(|c| *c) => {}
            _ = tokio::io::copy_bidirectional(&mut wire_e, &mut wire_r) => {}
        }
        // Dropping both wire ends: each side reads an end of file mid-stream, and its
        // writes fail.
    });
    tokio::spawn(async move {
        if let Err(e) = tether_replica::dataconn::connection(replica_end, service).await {
            tracing::debug!(error = %e, "in-memory data connection ended");
        }
    });
    super::dataconn::open_over(engine_end, outbound, "in-memory replica", WIRE_TIMEOUT).await
}

/// Replica services by address, reached in memory.
#[derive(Default)]
pub struct LocalConnector {
    links: Arc<Mutex<HashMap<String, LocalLink>>>,
    /// Every link runs its I/O streams as data connections.
    framed: bool,
}

/// A connection to an address, as a gRPC channel is: each call reaches the service
/// running there now (a restarted replica is reached again), while an I/O stream
/// stays with the service it was opened to and ends when that one goes.
struct Routed {
    links: Arc<Mutex<HashMap<String, LocalLink>>>,
    addr: String,
}

impl Routed {
    fn current(&self) -> Result<LocalLink, Status> {
        self.links
            .lock()
            .get(&self.addr)
            .cloned()
            .ok_or_else(cut_off)
    }
}

#[tonic::async_trait]
impl ReplicaLink for Routed {
    async fn open(&self, req: OpenRequest) -> Result<OpenReply, Status> {
        self.current()?.open(req).await
    }

    async fn record_generation(
        &self,
        req: RecordGenerationRequest,
    ) -> Result<RecordGenerationReply, Status> {
        self.current()?.record_generation(req).await
    }

    fn io(&self, outbound: Outbound) -> BoxFuture<'static, Result<Inbound, Status>> {
        match self.current() {
            Ok(l) => l.io(outbound),
            Err(s) => Box::pin(async move { Err(s) }),
        }
    }

    async fn snapshots(&self, req: SnapshotsRequest) -> Result<SnapshotsReply, Status> {
        self.current()?.snapshots(req).await
    }

    async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotReply, Status> {
        self.current()?.delete_snapshot(req).await
    }

    async fn map(&self, req: MapRequest) -> Result<MapReply, Status> {
        self.current()?.map(req).await
    }

    async fn hashes(&self, req: HashesRequest) -> Result<HashesReply, Status> {
        self.current()?.hashes(req).await
    }
}

impl LocalConnector {
    /// Makes `service` reachable at `addr`.
    pub fn add(&self, addr: &str, service: ReplicaService) {
        let link = LocalLink {
            service,
            cut: Arc::new(watch::Sender::new(false)),
            local: false,
            framed: self.framed,
        };
        self.links.lock().insert(addr.to_string(), link);
    }

    /// A connector whose links carry their I/O streams as data connections over an
    /// in-memory wire (the framing and both ends' connection code), as to a daemon,
    /// instead of handing the stream over whole.
    pub fn framed() -> LocalConnector {
        LocalConnector {
            framed: true,
            ..LocalConnector::default()
        }
    }

    /// Cuts (or mends) the link to `addr`: while cut, calls fail and open streams end.
    pub fn cut(&self, addr: &str, cut: bool) {
        if let Some(l) = self.links.lock().get(addr) {
            l.cut.send_replace(cut);
        }
    }
}

#[tonic::async_trait]
impl Connector for LocalConnector {
    async fn connect(&self, addr: &str) -> Result<Arc<dyn ReplicaLink>, String> {
        let link = self.links.lock().get(addr).cloned();
        match link {
            Some(l) => {
                l.check()
                    .map_err(|s| format!("replica {addr}: {}", s.message()))?;
                Ok(Arc::new(Routed {
                    links: self.links.clone(),
                    addr: addr.to_string(),
                }))
            }
            None => Err(format!("replica {addr}: no such replica in memory")),
        }
    }
}
