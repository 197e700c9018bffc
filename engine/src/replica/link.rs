//! The seam between the volume core and a replica daemon: every call the engine makes
//! to a replica goes through [`ReplicaLink`], and every new replica is reached through
//! a [`Connector`]. gRPC over the network is one implementation; the in-memory one
//! over the real store (`local`, feature `sim`) is another, for tests and simulation.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::Stream;
use tether_proto::replica::replica_client::ReplicaClient;
use tether_proto::replica::{
    DeleteSnapshotReply, DeleteSnapshotRequest, HashesReply, HashesRequest, IoBatch, IoReplyBatch,
    MapReply, MapRequest, OpenReply, OpenRequest, RecordGenerationReply, RecordGenerationRequest,
    SnapshotsReply, SnapshotsRequest,
};
use tether_proto::wire::MAX_MESSAGE;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Status;

/// Requests the engine sends on a volume's ordered I/O stream; the first names the
/// volume and the epoch. (A struct, not a boxed stream alone: tonic's streaming call
/// over a bare trait object trips a compiler limit on proving it `Send`.)
pub struct Outbound(pub Pin<Box<dyn Stream<Item = IoBatch> + Send + Sync>>);

impl Stream for Outbound {
    type Item = IoBatch;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<IoBatch>> {
        self.0.as_mut().poll_next(cx)
    }
}
/// The replica's replies on that stream, in order.
pub type Inbound = Pin<Box<dyn Stream<Item = Result<IoReplyBatch, Status>> + Send>>;

/// The calls a replica daemon answers for one engine. Errors are statuses carrying a
/// typed code (`tether_proto::wire::code_of`).
#[tonic::async_trait]
pub trait ReplicaLink: Send + Sync + 'static {
    /// Opens (and creates, or takes an epoch on) a volume.
    async fn open(&self, req: OpenRequest) -> Result<OpenReply, Status>;
    /// Stores a membership generation if it is newer than the one held.
    async fn record_generation(
        &self,
        req: RecordGenerationRequest,
    ) -> Result<RecordGenerationReply, Status>;
    /// Opens the ordered I/O stream (a future of its own, owning what it needs).
    fn io(&self, outbound: Outbound) -> BoxFuture<'static, Result<Inbound, Status>>;
    /// Lists a volume's snapshots and space.
    async fn snapshots(&self, req: SnapshotsRequest) -> Result<SnapshotsReply, Status>;
    /// Deletes a snapshot.
    async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotReply, Status>;
    /// Which blocks hold data.
    async fn map(&self, req: MapRequest) -> Result<MapReply, Status>;
    /// Hashes of blocks, for rebuilds.
    async fn hashes(&self, req: HashesRequest) -> Result<HashesReply, Status>;

    /// Whether the replica lives in this process, on the engine's own node: reads
    /// prefer it, as they cost no network hop.
    fn is_local(&self) -> bool {
        false
    }
}

/// Reaches the replica daemon at an address.
#[tonic::async_trait]
pub trait Connector: Send + Sync + 'static {
    /// A link to the daemon at `addr`, or why there is none.
    async fn connect(&self, addr: &str) -> Result<Arc<dyn ReplicaLink>, String>;

    /// Whether links are mutually authenticated and encrypted (shown in status).
    fn tls(&self) -> bool {
        false
    }
}

/// A link that never reaches anything: the stand-in for a replica that was out
/// before the engine started.
pub struct NoLink(pub String);

#[tonic::async_trait]
impl ReplicaLink for NoLink {
    async fn open(&self, _: OpenRequest) -> Result<OpenReply, Status> {
        Err(Status::unavailable(self.0.clone()))
    }
    async fn record_generation(
        &self,
        _: RecordGenerationRequest,
    ) -> Result<RecordGenerationReply, Status> {
        Err(Status::unavailable(self.0.clone()))
    }
    fn io(&self, _: Outbound) -> BoxFuture<'static, Result<Inbound, Status>> {
        let why = self.0.clone();
        Box::pin(async move { Err(Status::unavailable(why)) })
    }
    async fn snapshots(&self, _: SnapshotsRequest) -> Result<SnapshotsReply, Status> {
        Err(Status::unavailable(self.0.clone()))
    }
    async fn delete_snapshot(
        &self,
        _: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotReply, Status> {
        Err(Status::unavailable(self.0.clone()))
    }
    async fn map(&self, _: MapRequest) -> Result<MapReply, Status> {
        Err(Status::unavailable(self.0.clone()))
    }
    async fn hashes(&self, _: HashesRequest) -> Result<HashesReply, Status> {
        Err(Status::unavailable(self.0.clone()))
    }
}

/// A replica daemon over gRPC, its I/O stream on the daemon's data port when it
/// offers one.
#[derive(Clone)]
pub struct GrpcLink {
    client: ReplicaClient<Channel>,
    /// The replica's address, for logs.
    addr: String,
    /// How to reach data connections; None: the I/O stream stays on gRPC.
    data: Option<super::dataconn::DataTarget>,
    /// Whether the last `Open` reply said the replica takes data connections.
    framed_io: Arc<std::sync::atomic::AtomicBool>,
}

#[tonic::async_trait]
impl ReplicaLink for GrpcLink {
    async fn open(&self, req: OpenRequest) -> Result<OpenReply, Status> {
        let reply = self.client.clone().open(req).await?.into_inner();
        self.framed_io
            .store(reply.framed_io, std::sync::atomic::Ordering::Relaxed);
        Ok(reply)
    }
    async fn record_generation(
        &self,
        req: RecordGenerationRequest,
    ) -> Result<RecordGenerationReply, Status> {
        Ok(self
            .client
            .clone()
            .record_generation(req)
            .await?
            .into_inner())
    }
    fn io(&self, outbound: Outbound) -> BoxFuture<'static, Result<Inbound, Status>> {
        let framed = self.framed_io.load(std::sync::atomic::Ordering::Relaxed);
        if let (Some(data), true) = (self.data.clone(), framed) {
            tracing::info!(replica = %self.addr, "I/O stream on a data connection");
            return Box::pin(async move { data.open(outbound).await });
        }
        tracing::info!(replica = %self.addr, "I/O stream on gRPC");
        let mut client = self.client.clone();
        Box::pin(async move {
            let reply = client.io(outbound).await?;
            let inbound: Inbound = Box::pin(reply.into_inner());
            Ok(inbound)
        })
    }
    async fn snapshots(&self, req: SnapshotsRequest) -> Result<SnapshotsReply, Status> {
        Ok(self.client.clone().snapshots(req).await?.into_inner())
    }
    async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotReply, Status> {
        Ok(self.client.clone().delete_snapshot(req).await?.into_inner())
    }
    async fn map(&self, req: MapRequest) -> Result<MapReply, Status> {
        Ok(self.client.clone().map(req).await?.into_inner())
    }
    async fn hashes(&self, req: HashesRequest) -> Result<HashesReply, Status> {
        Ok(self.client.clone().hashes(req).await?.into_inner())
    }
}

/// Connects to replica daemons over gRPC; with `tls`, over mutual TLS (the replica
/// must present a certificate from the CA, for the address's host name or IP). A
/// `dir:PATH` address is a replica served in this process from that data directory.
#[derive(Clone)]
pub struct GrpcConnector {
    /// How long a connection may take.
    pub timeout: Duration,
    /// The engine's certificate, key and CA, for mutual TLS.
    pub tls: Option<crate::tls::Identity>,
}

#[tonic::async_trait]
impl Connector for GrpcConnector {
    async fn connect(&self, addr: &str) -> Result<Arc<dyn ReplicaLink>, String> {
        if super::local::dir_of(addr).is_some() {
            return super::local::connect_dir(addr);
        }
        Ok(Arc::new(self.grpc(addr).await?))
    }

    fn tls(&self) -> bool {
        self.tls.is_some()
    }
}

impl GrpcConnector {
    /// A gRPC link to `addr`.
    pub async fn grpc(&self, addr: &str) -> Result<GrpcLink, String> {
        let (timeout, tls) = (self.timeout, self.tls.as_ref());
        let uri = match (addr.contains("://"), tls) {
            (true, _) => addr.to_string(),
            (false, Some(_)) => format!("https://{addr}"),
            (false, None) => format!("http://{addr}"),
        };
        if tls.is_some() && uri.starts_with("http://") {
            return Err(format!(
                "replica {addr}: an http:// address cannot use TLS; give host:port or https://"
            ));
        }
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| format!("bad replica address {addr:?}: {e}"))?
            .tcp_nodelay(true)
            .connect_timeout(timeout)
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(timeout);
        if let Some(id) = tls {
            crate::tls::install_provider();
            endpoint = endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&id.ca))
                        .identity(Identity::from_pem(&id.cert, &id.key))
                        .timeout(timeout),
                )
                .map_err(|e| format!("replica {addr}: TLS configuration refused: {e}"))?;
        }
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| format!("replica {addr}: no connection within {timeout:?}"))?
            .map_err(|e| {
                let hint = if tls.is_some() {
                    "check that the replica serves TLS, trusts this engine's CA, and has a certificate for this address"
                } else {
                    "if the replica requires TLS, give the engine --tls-cert, --tls-key and --tls-ca"
                };
                format!("replica {addr}: cannot connect: {} ({hint})", error_chain(&e))
            })?;
        let data = match (
            super::dataconn::host_port(addr),
            std::env::var_os(super::dataconn::GRPC_IO_ENV).is_some(),
        ) {
            (Some((host, port)), false) => Some(super::dataconn::DataTarget {
                host,
                port,
                tls: match tls {
                    Some(id) => Some(
                        id.client_config()
                            .map_err(|e| format!("replica {addr}: {e}"))?,
                    ),
                    None => None,
                },
                timeout,
            }),
            _ => None,
        };
        Ok(GrpcLink {
            client: ReplicaClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            addr: addr.to_string(),
            data,
            framed_io: Arc::default(),
        })
    }
}

/// An error with its causes, so a TLS failure says why (unknown CA, bad name...).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
