//! The engine's end of a replica daemon's data connection: the volume's ordered I/O
//! stream in the framing of `tether_proto::frame`, over TCP or mutual TLS, instead of
//! a gRPC stream. Payload bytes go from the request's buffer to the kernel in one
//! vectored write. It goes to the replica's gRPC address (the replica tells the two
//! apart), when its `Open` reply says it takes them.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tether_proto::frame::{self, Frame};
use tether_proto::replica::{IoBatch, IoReplyBatch};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_rustls::rustls;
use tonic::Status;

use super::link::{Inbound, Outbound};

/// Forces the gRPC stream even where a replica offers a data port (comparisons,
/// and a way around a middlebox that only passes the gRPC port).
pub const GRPC_IO_ENV: &str = "TETHER_GRPC_IO";

/// Where and how to reach one replica's data connections.
#[derive(Clone)]
pub struct DataTarget {
    /// The replica's host, as in its address.
    pub host: String,
    /// The replica's port, as in its address.
    pub port: u16,
    /// The engine's TLS client configuration (ALPN [`frame::ALPN`]), for mutual TLS.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// How long connecting (and the TLS handshake) may take.
    pub timeout: Duration,
}

impl DataTarget {
    /// Opens the I/O stream: resolves once the replica accepted its first message
    /// (volume and epoch), or with the status it refused it with.
    pub async fn open(&self, outbound: Outbound) -> Result<Inbound, Status> {
        let port = self.port;
        let addr = format!("{}:{port}", self.host);
        let tcp = tokio::time::timeout(
            self.timeout,
            tokio::net::TcpStream::connect((self.host.as_str(), port)),
        )
        .await
        .map_err(|_| {
            Status::unavailable(format!(
                "data connection to {addr}: no connection within {:?}",
                self.timeout
            ))
        })?
        .map_err(|e| {
            Status::unavailable(format!("data connection to {addr}: cannot connect: {e}"))
        })?;
        let _ = tcp.set_nodelay(true);
        tether_proto::wire::tune_local_tcp(&tcp);
        match &self.tls {
            None => open_over(tcp, outbound, &addr, self.timeout).await,
            Some(cfg) => {
                let name =
                    rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
                        Status::invalid_argument(format!(
                            "data connection to {addr}: bad host name: {e}"
                        ))
                    })?;
                let tls = tokio::time::timeout(
                    self.timeout,
                    tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp),
                )
                .await
                .map_err(|_| Status::unavailable(format!("data connection to {addr}: TLS handshake timed out")))?
                .map_err(|e| {
                    Status::unavailable(format!(
                        "data connection to {addr}: TLS handshake failed: {e} (check that the replica's certificate is from the engine's CA and names this host)"
                    ))
                })?;
                open_over(tls, outbound, &addr, self.timeout).await
            }
        }
    }
}

/// Aborts the writer when the replies are no longer read: a replica dropped from the
/// set (or cut off) must not keep a task blocked on its full socket.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens the I/O stream over `conn`, any byte stream to a replica's data connection
/// (`addr` names it in errors): the hello, the first batch, and the replica's answer
/// within `timeout`.
pub async fn open_over<S>(
    conn: S,
    mut outbound: Outbound,
    addr: &str,
    timeout: Duration,
) -> Result<Inbound, Status>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (r, mut w) = tokio::io::split(conn);
    let mut r = BufReader::with_capacity(64 << 10, r);
    let lost = |e: std::io::Error| Status::unavailable(format!("data connection to {addr}: {e}"));
    let first = outbound
        .next()
        .await
        .ok_or_else(|| Status::cancelled("the I/O stream ended before it began"))?;
    w.write_all(&frame::HELLO).await.map_err(lost)?;
    frame::write_frame(&mut w, frame::encode::<IoBatch>(first))
        .await
        .map_err(lost)?;
    // The replica answers an accepted stream with an empty batch, a refused one with
    // its status: as a gRPC call resolves on its response headers.
    let answer = tokio::time::timeout(timeout, frame::read_frame::<IoReplyBatch, _>(&mut r))
        .await
        .map_err(|_| {
            Status::unavailable(format!(
                "data connection to {addr}: no answer to the stream's start within {timeout:?}"
            ))
        })?;
    match answer.map_err(lost)? {
        Some(Frame::Message(_)) => {}
        Some(Frame::Error(s)) => return Err(s),
        Some(Frame::End) | None => {
            return Err(Status::unavailable(format!(
                "data connection to {addr}: the replica closed the connection at its start"
            )))
        }
    }
    let writer = tokio::spawn(async move {
        while let Some(batch) = outbound.next().await {
            if frame::write_frame(&mut w, frame::encode::<IoBatch>(batch))
                .await
                .is_err()
            {
                // The reader sees the same failure and reports it.
                return;
            }
        }
        // Ended on purpose: the replica records a clean close.
        if frame::write_frame(&mut w, frame::encode_end())
            .await
            .is_ok()
        {
            let _ = w.shutdown().await;
        }
    });
    let guard = AbortOnDrop(writer.abort_handle());
    let inbound = frame::stream::<IoReplyBatch, _>(r, format!("data connection to {addr}"))
        // The writer lives as long as the replies are read.
        .inspect(move |_| {
            let _writer = &guard;
        });
    Ok(Box::pin(inbound))
}

/// The host and port of a replica address (`host:port`, `[v6]:port`, or a URI), as
/// a connection and a TLS server name take them.
pub fn host_port(addr: &str) -> Option<(String, u16)> {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, p) = v6.split_once(']')?;
            (h, p.strip_prefix(':')?)
        }
        None => authority.rsplit_once(':')?,
    };
    let port = port.parse().ok()?;
    (!host.is_empty()).then(|| (host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn hosts_and_ports_of_addresses() {
        let hp = |a: &str| host_port(a).map(|(h, p)| format!("{h} {p}"));
        assert_eq!(hp("127.0.0.1:7100").as_deref(), Some("127.0.0.1 7100"));
        assert_eq!(hp("https://node-a:7100").as_deref(), Some("node-a 7100"));
        assert_eq!(hp("http://[::1]:7100/").as_deref(), Some("::1 7100"));
        assert_eq!(hp("[fe80::1]:1").as_deref(), Some("fe80::1 1"));
        assert_eq!(hp(":7100"), None);
        assert_eq!(hp("node-a"), None);
        assert_eq!(hp("node-a:http"), None);
    }
}
