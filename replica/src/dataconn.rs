//! The replica's data connections: each carries one engine's ordered I/O stream in
//! the framing of `tether_proto::frame` (no HTTP/2, payloads not copied into encode
//! buffers). They arrive on the gRPC port: [`route`] tells them apart by their first
//! bytes (plain TCP) or ALPN (TLS, which it terminates for gRPC too, with the same
//! certificates and client verification). The stream itself is served by
//! [`ReplicaService::io_stream`], as on gRPC.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use tether_proto::frame;
use tether_proto::replica::{IoBatch, IoReplyBatch};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::server::{ReplicaService, ServerTls};

/// The rustls server configuration for data connections: the replica's certificate,
/// and client certificates required from `ca` when given.
pub fn tls_config(t: &ServerTls) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = CertificateDer::pem_slice_iter(&t.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("replica certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&t.key).map_err(|e| format!("replica key: {e}"))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &t.ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                let c = c.map_err(|e| format!("client CA: {e}"))?;
                roots
                    .add(c)
                    .map_err(|e| format!("client CA refused: {e}"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("replica certificate refused: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), frame::ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// A connection for tonic: plain TCP, or TLS terminated here.
pub enum GrpcConn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS, handshake done.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for GrpcConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for GrpcConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            GrpcConn::Plain(c) => Pin::new(c).poll_read(cx, buf),
            GrpcConn::Tls(c) => Pin::new(c).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GrpcConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            GrpcConn::Plain(c) => Pin::new(c).poll_write(cx, buf),
            GrpcConn::Tls(c) => Pin::new(c).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            GrpcConn::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            GrpcConn::Tls(c) => Pin::new(c).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            GrpcConn::Plain(c) => c.is_write_vectored(),
            GrpcConn::Tls(c) => c.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            GrpcConn::Plain(c) => Pin::new(c).poll_flush(cx),
            GrpcConn::Tls(c) => Pin::new(c).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            GrpcConn::Plain(c) => Pin::new(c).poll_shutdown(cx),
            GrpcConn::Tls(c) => Pin::new(c).poll_shutdown(cx),
        }
    }
}

/// How long a new connection may take to show what it is (and finish TLS).
const SORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts on `listener`: data connections are served here, each on its own task; the
/// others come out of the returned stream for tonic. The future accepts until the
/// listener fails for good.
pub fn route(
    listener: tokio::net::TcpListener,
    svc: ReplicaService,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (
    impl futures::Stream<Item = std::io::Result<GrpcConn>>,
    impl std::future::Future<Output = ()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let accept = async move {
        loop {
            let (conn, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: keep serving those connected.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Without it, small replies wait for delayed ACKs (40 ms stalls).
            let _ = conn.set_nodelay(true);
            let (svc, acceptor, tx) = (svc.clone(), acceptor.clone(), tx.clone());
            // Sorted on a task of its own: a slow or silent client holds up nobody.
            tokio::spawn(async move {
                let r = match tokio::time::timeout(SORT_TIMEOUT, sort(conn, acceptor)).await {
                    Ok(Ok(Sorted::Grpc(c))) => {
                        let _ = tx.send(Ok(c)).await;
                        return;
                    }
                    Ok(Ok(Sorted::Data(c))) => connection(c, svc).await,
                    Ok(Ok(Sorted::DataTls(c))) => connection(c, svc).await,
                    Ok(Err(e)) => {
                        // Port probes and scanners: as quiet as tonic is about them.
                        tracing::debug!(%peer, error = %e, "connection dropped before it began");
                        return;
                    }
                    Err(_) => Err("no protocol within 10 s".to_string()),
                };
                // The stream itself already said why it ended, if it was not on purpose.
                if let Err(e) = r {
                    tracing::info!(%peer, error = %e, "data connection ended");
                }
            });
        }
    };
    (tokio_stream::wrappers::ReceiverStream::new(rx), accept)
}

enum Sorted {
    Grpc(GrpcConn),
    Data(TcpStream),
    DataTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

async fn sort(conn: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<Sorted, String> {
    tether_proto::wire::tune_local_tcp(&conn);
    match tls {
        Some(a) => {
            let c = a
                .accept(conn)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            if c.get_ref().1.alpn_protocol() == Some(frame::ALPN) {
                Ok(Sorted::DataTls(Box::new(c)))
            } else {
                Ok(Sorted::Grpc(GrpcConn::Tls(Box::new(c))))
            }
        }
        None => {
            // Peeked, not read: a gRPC connection reaches tonic whole.
            let mut head = [0u8; 8];
            loop {
                let n = conn
                    .peek(&mut head)
                    .await
                    .map_err(|e| format!("reading the first bytes: {e}"))?;
                if n == head.len() || n == 0 || head[..n] != frame::HELLO[..n] {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if head == frame::HELLO[..8] {
                Ok(Sorted::Data(conn))
            } else {
                Ok(Sorted::Grpc(GrpcConn::Plain(conn)))
            }
        }
    }
}

/// Serves one data connection over any byte stream: hello, then the I/O stream until
/// either side ends it. The daemon's listener and the simulation's in-memory wire
/// both come here.
pub async fn connection<S>(conn: S, svc: ReplicaService) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (r, mut w) = tokio::io::split(conn);
    let mut r = BufReader::with_capacity(64 << 10, r);
    frame::read_hello(&mut r)
        .await
        .map_err(|e| format!("bad hello: {e}"))?;
    // Ends only on the engine's End frame: a killed or cut-off engine breaks it.
    let inbound = frame::stream::<IoBatch, _>(r, "the engine's data connection".to_string());
    let replies = match svc.io_stream(Box::pin(inbound)).await {
        Ok(r) => r,
        Err(s) => {
            let _ = frame::write_frame(&mut w, frame::encode_error(&s)).await;
            return Ok(());
        }
    };
    // Accepted: the engine's open of the stream resolves on this.
    frame::write_frame(&mut w, frame::encode(IoReplyBatch::default()))
        .await
        .map_err(|e| format!("accepting the stream: {e}"))?;
    let mut replies = replies;
    while let Some(item) = replies.next().await {
        let chunks = match item {
            Ok(b) => frame::encode::<IoReplyBatch>(b),
            Err(s) => {
                let _ = frame::write_frame(&mut w, frame::encode_error(&s)).await;
                return Ok(());
            }
        };
        frame::write_frame(&mut w, chunks)
            .await
            .map_err(|e| format!("writing replies: {e}"))?;
    }
    frame::write_frame(&mut w, frame::encode_end())
        .await
        .map_err(|e| format!("ending the stream: {e}"))?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
    Ok(())
}
