//! The engine's connection to one replica: the volume's ordered I/O stream, with
//! requests batched onto it and replies matched back to their callers by id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tether_proto::replica::replica_client::ReplicaClient;
use tether_proto::replica::{
    io_request::Op, ErrorCode, IoBatch, IoReplyBatch, IoRequest, OpenReply, OpenRequest,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Streaming;

/// Largest gRPC message either side accepts.
pub const MAX_MESSAGE: usize = 64 << 20;
/// A batch stops growing past this many payload bytes.
const BATCH_BYTES: usize = 4 << 20;
/// A batch stops growing past this many requests.
const BATCH_REQUESTS: usize = 512;

/// Why a request to a replica failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaError {
    /// The replica answered with an error.
    #[error("{0}")]
    Replica(String),
    /// The replica's disk is full.
    #[error("{0}")]
    NoSpace(String),
    /// A newer engine owns the volume.
    #[error("{0}")]
    Fenced(String),
    /// A block failed its checksum there; other blocks are fine.
    #[error("{0}")]
    Checksum(String),
    /// The connection failed or the replica was dropped.
    #[error("{0}")]
    Gone(String),
}

/// What a replica returns for a request: block data and, on encrypted volumes, the
/// blocks' seals.
#[derive(Debug, Clone, Default)]
pub struct Payload {
    /// Whole blocks (ciphertext on encrypted volumes).
    pub data: Bytes,
    /// `crypt::SEAL` bytes per block on encrypted volumes, else empty.
    pub tags: Bytes,
}

type Pending = oneshot::Sender<Result<Payload, ReplicaError>>;

/// One replica of the volume, as the engine sees it.
pub struct ReplicaConn {
    /// Address as given on the command line.
    pub addr: String,
    volume: String,
    client: ReplicaClient<Channel>,
    tx: mpsc::UnboundedSender<IoRequest>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<IoRequest>>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    healthy: AtomicBool,
    rebuilding: AtomicBool,
    reason: Mutex<String>,
    close: Arc<Notify>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Connects a gRPC channel to a replica daemon; with `tls`, over mutual TLS (the
/// replica must present a certificate from the CA, for the address's host name or IP).
pub async fn connect(
    addr: &str,
    timeout: Duration,
    tls: Option<&crate::tls::Identity>,
) -> Result<ReplicaClient<Channel>, String> {
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
    Ok(ReplicaClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

impl ReplicaConn {
    /// A connection to `addr` for `volume`; the stream opens with [`ReplicaConn::start`].
    pub fn new(addr: &str, volume: &str, client: ReplicaClient<Channel>) -> Arc<ReplicaConn> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(ReplicaConn {
            addr: addr.to_string(),
            volume: volume.to_string(),
            client,
            tx,
            rx: Mutex::new(Some(rx)),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            healthy: AtomicBool::new(true),
            rebuilding: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
            close: Arc::new(Notify::new()),
            reader: Mutex::new(None),
        })
    }

    /// A connection that is failed from the start (unreachable, stale, fenced).
    pub fn failed(
        addr: &str,
        volume: &str,
        client: Option<ReplicaClient<Channel>>,
        reason: String,
    ) -> Arc<ReplicaConn> {
        let client = client.unwrap_or_else(|| {
            ReplicaClient::new(Endpoint::from_static("http://0.0.0.0:1").connect_lazy())
        });
        let c = ReplicaConn::new(addr, volume, client);
        c.mark_failed(reason);
        c
    }

    /// A handle for unary calls to the replica daemon.
    pub fn client(&self) -> ReplicaClient<Channel> {
        self.client.clone()
    }

    /// Opens (and with `create`, creates) the volume on this replica.
    pub async fn open(&self, req: OpenRequest) -> Result<OpenReply, tonic::Status> {
        self.client.clone().open(req).await.map(|r| r.into_inner())
    }

    /// Opens the ordered I/O stream with `epoch`.
    pub async fn start(self: &Arc<Self>, epoch: u64) -> Result<(), String> {
        let Some(rx) = self.rx.lock().take() else {
            return Err(format!("replica {}: stream already started", self.addr));
        };
        let hello = IoBatch {
            volume: self.volume.clone(),
            epoch,
            requests: Vec::new(),
        };
        let close = self.close.clone();
        let outbound = futures::stream::unfold(
            (Some(hello), rx, close),
            |(hello, mut rx, close)| async move {
                if let Some(h) = hello {
                    return Some((h, (None, rx, close)));
                }
                let first = tokio::select! {
                    r = rx.recv() => r?,
                    _ = close.notified() => return None,
                };
                // Everything already queued rides in the same message: under load
                // this turns many small requests into one HTTP/2 frame.
                let mut bytes = payload_len(&first);
                let mut requests = vec![first];
                while requests.len() < BATCH_REQUESTS && bytes < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(r) => {
                            bytes += payload_len(&r);
                            requests.push(r);
                        }
                        Err(_) => break,
                    }
                }
                let batch = IoBatch {
                    volume: String::new(),
                    epoch: 0,
                    requests,
                };
                Some((batch, (None, rx, close)))
            },
        );
        let inbound = self
            .client
            .clone()
            .io(outbound)
            .await
            .map_err(|s| {
                format!(
                    "replica {}: cannot open the I/O stream: {}",
                    self.addr,
                    s.message()
                )
            })?
            .into_inner();
        let me = self.clone();
        *self.reader.lock() = Some(tokio::spawn(async move { me.read_replies(inbound).await }));
        Ok(())
    }

    async fn read_replies(&self, mut inbound: Streaming<IoReplyBatch>) {
        let why = loop {
            match inbound.message().await {
                Ok(Some(batch)) => {
                    for r in batch.replies {
                        let result = match ErrorCode::try_from(r.error) {
                            Ok(ErrorCode::Ok) => Ok(Payload {
                                data: r.data,
                                tags: r.tags,
                            }),
                            Ok(ErrorCode::NoSpace) => Err(ReplicaError::NoSpace(r.message)),
                            Ok(ErrorCode::Fenced) => Err(ReplicaError::Fenced(r.message)),
                            Ok(ErrorCode::Checksum) => Err(ReplicaError::Checksum(r.message)),
                            _ => Err(ReplicaError::Replica(r.message)),
                        };
                        if let Some(p) = self.pending.lock().remove(&r.id) {
                            let _ = p.send(result);
                        }
                    }
                }
                Ok(None) => break "the replica closed the I/O stream".to_string(),
                Err(s) => break format!("I/O stream failed: {}", s.message()),
            }
        };
        if self.is_writable() {
            self.mark_failed(why);
        }
    }

    /// Queues `op`; the receiver resolves with the replica's answer.
    pub fn submit(&self, op: Op) -> oneshot::Receiver<Result<Payload, ReplicaError>> {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().insert(id, tx);
        // Checked after inserting: mark_failed drains after clearing `healthy`, so
        // either it sees this entry or this sees the flag.
        if !self.healthy.load(Ordering::SeqCst)
            || self.tx.send(IoRequest { id, op: Some(op) }).is_err()
        {
            if let Some(p) = self.pending.lock().remove(&id) {
                let _ = p.send(Err(ReplicaError::Gone(self.reason())));
            }
        }
        rx
    }

    /// Whether the replica is in the read-write set.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst) && !self.rebuilding.load(Ordering::SeqCst)
    }

    /// Whether the replica takes writes (healthy, or rebuilding write-only).
    pub fn is_writable(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Marks the replica as a write-only rebuild target, or done rebuilding.
    pub fn set_rebuilding(&self, on: bool) {
        self.rebuilding.store(on, Ordering::SeqCst);
    }

    /// "healthy", "rebuilding" or "failed".
    pub fn state(&self) -> &'static str {
        if !self.healthy.load(Ordering::SeqCst) {
            "failed"
        } else if self.rebuilding.load(Ordering::SeqCst) {
            "rebuilding"
        } else {
            "healthy"
        }
    }

    /// Why the replica was dropped (empty while healthy).
    pub fn reason(&self) -> String {
        self.reason.lock().clone()
    }

    /// Takes the replica out of service with `reason`; false if it already was out.
    fn retire(&self, reason: &str) -> bool {
        let mut r = self.reason.lock();
        if !self.healthy.swap(false, Ordering::SeqCst) {
            return false;
        }
        *r = reason.to_string();
        true
    }

    /// Drops the replica from service; returns false if it already was.
    pub fn mark_failed(&self, reason: String) -> bool {
        if !self.retire(&reason) {
            return false;
        }
        tracing::warn!(volume = %self.volume, replica = %self.addr, %reason, "replica dropped from the volume");
        let drained: Vec<_> = self.pending.lock().drain().collect();
        for (_, p) in drained {
            let _ = p.send(Err(ReplicaError::Gone(reason.clone())));
        }
        self.close.notify_one();
        if let Some(h) = self.reader.lock().take() {
            h.abort();
        }
        true
    }

    /// Ends the stream cleanly so the replica records a clean close.
    pub async fn close(&self, timeout: Duration) {
        if !self.retire("engine stopped") {
            return;
        }
        self.close.notify_one();
        let reader = self.reader.lock().take();
        if let Some(h) = reader {
            let _ = tokio::time::timeout(timeout, h).await;
        }
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

fn payload_len(r: &IoRequest) -> usize {
    match &r.op {
        Some(Op::Write(w)) => w.data.len() + w.tags.len(),
        _ => 64,
    }
}
