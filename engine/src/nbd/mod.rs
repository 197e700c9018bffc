//! The NBD frontend: fixed-newstyle negotiation and the transmission loop, over any
//! byte stream (TCP or Unix socket), serving a [`BlockDevice`].
//!
//! Requests are read in order and each runs as its own task, so a slow read does not
//! hold up a flush behind it; replies go out through one writer task in completion
//! order, matched by the client's handle.

pub mod export;
pub mod proto;

use std::future::Future;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use proto::*;

/// Why a device request failed, as NBD reports it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    /// The data could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The request is not valid for this device.
    #[error("{0}")]
    Invalid(String),
    /// No space is left on the backing store.
    #[error("{0}")]
    NoSpace(String),
    /// The device is shutting down.
    #[error("{0}")]
    Shutdown(String),
    /// The export does not take writes.
    #[error("{0}")]
    ReadOnly(String),
    /// A fast zero that could not be fast.
    #[error("{0}")]
    NotFast(String),
    /// More work than one request may ask for.
    #[error("{0}")]
    TooLarge(String),
}

impl DeviceError {
    /// The NBD error number for this error.
    pub fn errno(&self) -> u32 {
        match self {
            DeviceError::Io(_) => EIO,
            DeviceError::Invalid(_) => EINVAL,
            DeviceError::NoSpace(_) => ENOSPC,
            DeviceError::Shutdown(_) => ESHUTDOWN,
            DeviceError::ReadOnly(_) => EPERM,
            DeviceError::NotFast(_) => ENOTSUP,
            DeviceError::TooLarge(_) => EOVERFLOW,
        }
    }
}

/// A block device that NBD can serve. Offsets and lengths are in bytes and have been
/// checked against [`BlockDevice::size`] by the caller.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `len` bytes at `offset`, as one or more buffers in order.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<Bytes>, DeviceError>> + Send;
    /// Writes `data` at `offset`; with `fua`, durably.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Writes zeroes; `may_trim` lets the device deallocate instead.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Discards a range (advisory).
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Prefetches a range (advisory): no effect but on speed.
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), DeviceError>> + Send {
        let _ = (offset, len);
        async { Ok(()) }
    }
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Allocation of `[offset, offset+len)` as (length, NBD_STATE_* flags) runs.
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<(u32, u32)>, DeviceError>> + Send {
        let _ = offset;
        async move { Ok(vec![(len, 0)]) }
    }
    /// Called when a client enters transmission, for counters.
    fn connection_opened(&self) {}
    /// Called when that client leaves.
    fn connection_closed(&self) {}
}

/// One export offered to clients.
pub struct Export<D> {
    /// Name clients ask for.
    pub name: String,
    /// Human-readable description.
    pub description: String,
    /// The device behind it.
    pub device: Arc<D>,
    /// Writes are refused with EPERM.
    pub read_only: bool,
}

/// What a server offers, looked up by name when a client asks.
pub trait ExportTable: Send + Sync + 'static {
    /// The device type behind the exports.
    type Device: BlockDevice;
    /// The export called `name` (the empty name is the default export).
    fn find(&self, name: &str) -> Option<Export<Self::Device>>;
    /// Names listed by NBD_OPT_LIST.
    fn names(&self) -> Vec<String>;
}

/// Requests in flight per connection; bounds memory per client.
const MAX_IN_FLIGHT: usize = 128;

/// Bytes of client requests read ahead in one receive.
const READ_BUFFER: usize = 256 * 1024;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error or early hang-up.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Serves one client connection from handshake to disconnect. With `tls`, the client
/// must upgrade with `NBD_OPT_STARTTLS` before anything else (the spec's FORCEDTLS).
pub async fn serve_connection<S, T>(
    stream: S,
    exports: Arc<T>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: ExportTable,
{
    // A client that stalls before transmission must not hold a task forever.
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIME;
    let mut stream = stream;
    let no_zeroes = within(deadline, greet(&mut stream)).await?;
    let Some(acceptor) = tls else {
        let n = negotiate(&mut stream, &*exports, no_zeroes, TlsPhase::Off);
        return match within(deadline, n).await? {
            Negotiated::Go(export, mode) => serve_export(stream, export, mode).await,
            Negotiated::Abort | Negotiated::StartTls => Ok(()),
        };
    };
    let n = negotiate(&mut stream, &*exports, no_zeroes, TlsPhase::Required);
    match within(deadline, n).await? {
        Negotiated::StartTls => {}
        Negotiated::Abort | Negotiated::Go(..) => return Ok(()),
    }
    let accept = async {
        acceptor
            .accept(stream)
            .await
            .map_err(|e| ConnError::Protocol(format!("TLS handshake failed: {e}")))
    };
    let mut stream = within(deadline, accept).await?;
    let n = negotiate(&mut stream, &*exports, no_zeroes, TlsPhase::Active);
    match within(deadline, n).await? {
        Negotiated::Go(export, mode) => serve_export(stream, export, mode).await,
        Negotiated::Abort | Negotiated::StartTls => Ok(()),
    }
}

/// Runs one handshake step, failing once the handshake's deadline has passed.
async fn within<T>(
    deadline: tokio::time::Instant,
    step: impl Future<Output = Result<T, ConnError>>,
) -> Result<T, ConnError> {
    tokio::time::timeout_at(deadline, step)
        .await
        .map_err(|_| ConnError::Protocol(format!("handshake not done within {HANDSHAKE_TIME:?}")))?
}

/// How long a client may take from connecting to transmission.
const HANDSHAKE_TIME: std::time::Duration = std::time::Duration::from_secs(60);

async fn serve_export<S, D>(stream: S, export: Export<D>, mode: Mode) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    // Which client spoke which protocol: the only record of what was negotiated.
    tracing::info!(export = %export.name, structured_replies = mode.structured,
        extended_headers = mode.extended, block_status = mode.allocation,
        "NBD client entered transmission");
    export.device.connection_opened();
    let r = transmission(stream, export.device.clone(), mode, export.read_only).await;
    export.device.connection_closed();
    r
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsPhase {
    /// Not configured: STARTTLS is refused.
    Off,
    /// Configured, not started: only STARTTLS and ABORT are allowed.
    Required,
    /// Running.
    Active,
}

/// How option haggling ended.
enum Negotiated<D> {
    Go(Export<D>, Mode),
    Abort,
    StartTls,
}

async fn send(stream: &mut (impl AsyncWrite + Unpin), buf: &mut BytesMut) -> std::io::Result<()> {
    stream.write_all(buf).await?;
    stream.flush().await?;
    buf.clear();
    Ok(())
}

/// Reads and throws away `len` bytes.
async fn skip(stream: &mut (impl AsyncRead + Unpin), len: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut (&mut *stream).take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// What the client negotiated for transmission.
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    /// Structured replies, or extended headers (which include them).
    structured: bool,
    /// Extended headers: 32-byte requests and replies, 64-bit lengths.
    extended: bool,
    allocation: bool,
}

impl Mode {
    fn flags(&self, read_only: bool) -> u16 {
        transmission_flags(read_only, self.structured)
    }
}

/// Sends the greeting and reads the client's flags; returns whether it asked for no
/// zero padding.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<bool, ConnError> {
    let mut out = BytesMut::with_capacity(32);
    out.put_u64(NBDMAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    send(stream, &mut out).await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 || client_flags & 1 == 0 {
        return Err(ConnError::Protocol(format!(
            "client flags {client_flags:#x}: only fixed newstyle clients are served"
        )));
    }
    Ok(client_flags & u32::from(FLAG_NO_ZEROES) != 0)
}

async fn negotiate<S, T>(
    stream: &mut S,
    exports: &T,
    no_zeroes: bool,
    tls: TlsPhase,
) -> Result<Negotiated<T::Device>, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: ExportTable,
{
    let mut out = BytesMut::with_capacity(256);
    let mut mode = Mode::default();
    loop {
        let magic = stream.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(ConnError::Protocol(format!("option magic {magic:#x}")));
        }
        let option = stream.read_u32().await?;
        let len = stream.read_u32().await?;
        if len > MAX_OPTION_LEN {
            skip(stream, u64::from(len)).await?;
            let msg = format!("option data of {len} bytes is too big");
            put_option_reply(&mut out, option, REP_ERR_TOO_BIG, msg.as_bytes());
            send(stream, &mut out).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;
        if tls == TlsPhase::Required {
            match option {
                OPT_STARTTLS if data.is_empty() => {
                    put_option_reply(&mut out, option, REP_ACK, &[]);
                    send(stream, &mut out).await?;
                    return Ok(Negotiated::StartTls);
                }
                OPT_STARTTLS => {
                    put_option_reply(&mut out, option, REP_ERR_INVALID, b"STARTTLS takes no data")
                }
                OPT_ABORT => {
                    put_option_reply(&mut out, option, REP_ACK, &[]);
                    let _ = send(stream, &mut out).await;
                    return Ok(Negotiated::Abort);
                }
                // No error reply exists for the old option: hang up.
                OPT_EXPORT_NAME => {
                    return Err(ConnError::Protocol(
                        "NBD_OPT_EXPORT_NAME before TLS; this server requires TLS".into(),
                    ))
                }
                _ => put_option_reply(
                    &mut out,
                    option,
                    REP_ERR_TLS_REQD,
                    b"this server requires TLS: use NBD_OPT_STARTTLS (nbds:// URIs)",
                ),
            }
            send(stream, &mut out).await?;
            continue;
        }
        match option {
            // The old option has no error reply: the spec says to hang up.
            OPT_EXPORT_NAME if mode.extended => {
                return Err(ConnError::Protocol(
                    "NBD_OPT_EXPORT_NAME after extended headers; use NBD_OPT_GO".into(),
                ))
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(export) = exports.find(&name) else {
                    return Err(ConnError::Protocol(format!("unknown export {name:?}")));
                };
                out.put_u64(export.device.size());
                out.put_u16(mode.flags(export.read_only));
                if !no_zeroes {
                    out.put_slice(&[0u8; 124]);
                }
                send(stream, &mut out).await?;
                return Ok(Negotiated::Go(export, mode));
            }
            OPT_ABORT => {
                put_option_reply(&mut out, option, REP_ACK, &[]);
                // The client may already be gone; that is fine.
                let _ = send(stream, &mut out).await;
                return Ok(Negotiated::Abort);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    put_option_reply(&mut out, option, REP_ERR_INVALID, b"LIST takes no data");
                } else {
                    for name in exports.names() {
                        let mut d = Vec::with_capacity(4 + name.len());
                        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        put_option_reply(&mut out, option, REP_SERVER, &d);
                    }
                    put_option_reply(&mut out, option, REP_ACK, &[]);
                }
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => put_option_reply(
                &mut out,
                option,
                REP_ERR_INVALID,
                b"STRUCTURED_REPLY takes no data",
            ),
            OPT_STRUCTURED_REPLY if mode.extended => put_option_reply(
                &mut out,
                option,
                REP_ERR_EXT_HEADER_REQD,
                b"extended headers are on and take precedence",
            ),
            OPT_STRUCTURED_REPLY => {
                mode.structured = true;
                put_option_reply(&mut out, option, REP_ACK, &[]);
            }
            OPT_EXTENDED_HEADERS if !data.is_empty() => put_option_reply(
                &mut out,
                option,
                REP_ERR_INVALID,
                b"EXTENDED_HEADERS takes no data",
            ),
            OPT_EXTENDED_HEADERS => {
                mode.extended = true;
                mode.structured = true;
                put_option_reply(&mut out, option, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => {
                let Some(info) = parse_info_request(&data) else {
                    put_option_reply(&mut out, option, REP_ERR_INVALID, b"malformed INFO/GO");
                    send(stream, &mut out).await?;
                    continue;
                };
                let Some(export) = exports.find(&info.name) else {
                    let msg = format!("no export named {:?}", info.name);
                    put_option_reply(&mut out, option, REP_ERR_UNKNOWN, msg.as_bytes());
                    send(stream, &mut out).await?;
                    continue;
                };
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&export.device.size().to_be_bytes());
                d.extend_from_slice(&mode.flags(export.read_only).to_be_bytes());
                put_option_reply(&mut out, option, REP_INFO, &d);
                // Block sizes are always sent: clients that honour them avoid
                // read-modify-write on their side; min 1 because we do it here.
                let mut d = Vec::with_capacity(14);
                d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                d.extend_from_slice(&1u32.to_be_bytes());
                d.extend_from_slice(&4096u32.to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                put_option_reply(&mut out, option, REP_INFO, &d);
                for &req in &info.requests {
                    let text = match req {
                        INFO_NAME => &export.name,
                        INFO_DESCRIPTION => &export.description,
                        _ => continue,
                    };
                    let mut d = Vec::with_capacity(2 + text.len());
                    d.extend_from_slice(&req.to_be_bytes());
                    d.extend_from_slice(text.as_bytes());
                    put_option_reply(&mut out, option, REP_INFO, &d);
                }
                put_option_reply(&mut out, option, REP_ACK, &[]);
                if option == OPT_GO {
                    send(stream, &mut out).await?;
                    return Ok(Negotiated::Go(export, mode));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let req = parse_meta_request(&data);
                match req {
                    _ if !mode.structured => put_option_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    ),
                    None => put_option_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        b"malformed meta context request",
                    ),
                    Some(req) if exports.find(&req.name).is_none() => {
                        let msg = format!("no export named {:?}", req.name);
                        put_option_reply(&mut out, option, REP_ERR_UNKNOWN, msg.as_bytes());
                    }
                    Some(req) => {
                        let set = option == OPT_SET_META_CONTEXT;
                        let wanted = req.queries.iter().any(|q| {
                            q == META_BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()))
                        }) || (!set && req.queries.is_empty());
                        if set {
                            mode.allocation = wanted;
                        }
                        if wanted {
                            let mut d = META_ID_ALLOCATION.to_be_bytes().to_vec();
                            d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                            put_option_reply(&mut out, option, REP_META_CONTEXT, &d);
                        }
                        put_option_reply(&mut out, option, REP_ACK, &[]);
                    }
                }
            }
            OPT_STARTTLS if tls == TlsPhase::Active => {
                put_option_reply(&mut out, option, REP_ERR_INVALID, b"TLS is already active");
            }
            OPT_STARTTLS => {
                put_option_reply(&mut out, option, REP_ERR_POLICY, b"TLS is not configured");
            }
            _ => {
                let msg = format!("option {option} is not supported");
                put_option_reply(&mut out, option, REP_ERR_UNSUP, msg.as_bytes());
            }
        }
        send(stream, &mut out).await?;
    }
}

/// A finished request on its way to the writer task.
struct Reply {
    handle: u64,
    result: Result<ReplyData, DeviceError>,
    is_read: bool,
    offset: u64,
}

enum ReplyData {
    None,
    Data(Vec<Bytes>, u32),
    Status(Vec<(u32, u32)>),
}

async fn transmission<S, D>(
    stream: S,
    device: Arc<D>,
    mode: Mode,
    read_only: bool,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    let (rd, wr) = tokio::io::split(stream);
    // One receive takes every request the client has queued, not one header and
    // then one payload per syscall.
    let mut rd = tokio::io::BufReader::with_capacity(READ_BUFFER, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let writer = tokio::spawn(write_replies(wr, rx, mode, permits.clone()));
    let result = read_requests(&mut rd, &device, &tx, &permits, read_only, mode).await;
    // Let requests already running finish and be answered before closing.
    let _ = permits.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(tx);
    let _ = writer.await;
    result
}

async fn read_requests<R, D>(
    rd: &mut R,
    device: &Arc<D>,
    tx: &mpsc::UnboundedSender<Reply>,
    permits: &Arc<Semaphore>,
    read_only: bool,
    mode: Mode,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    D: BlockDevice,
{
    let checks = Checks {
        size: device.size(),
        read_only,
        allocation: mode.allocation,
        structured: mode.structured,
        extended: mode.extended,
    };
    loop {
        let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
        let len = if mode.extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        };
        match rd.read_exact(&mut hdr[..len]).await {
            Ok(_) => {}
            // A client that hangs up between requests just leaves.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        // A header of the other framing cannot be told from garbage: the stream is
        // out of sync, so the connection ends.
        let parsed = if mode.extended {
            parse_extended_request(&hdr)
        } else {
            let mut compact = [0u8; REQUEST_LEN];
            compact.copy_from_slice(&hdr[..REQUEST_LEN]);
            parse_request(&compact)
        };
        let req = parsed.map_err(|e| ConnError::Protocol(e.to_string()))?;
        let mut payload = Bytes::new();
        let payload_len = req.payload_len(mode.extended);
        if payload_len > 0 {
            if payload_len > u64::from(MAX_PAYLOAD) {
                return Err(ConnError::Protocol(format!(
                    "a payload of {payload_len} bytes exceeds the maximum {MAX_PAYLOAD}"
                )));
            }
            payload = read_payload(rd, payload_len as usize).await?;
        }
        let reply = move |result, is_read| Reply {
            handle: req.handle,
            result,
            is_read,
            offset: req.offset,
        };
        // Reads and block status must be answered with structured chunks.
        let chunked = req.answered_in_chunks();
        let cmd = match command(&req, &checks) {
            Ok(Command::Disconnect) => return Ok(()),
            Ok(cmd) => cmd,
            Err(e) => {
                let _ = tx.send(reply(Err(e.into()), chunked));
                continue;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return Ok(());
        };
        let device = device.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = match cmd {
                Command::Read { offset, length } => device
                    .read(offset, length)
                    .await
                    .map(|d| ReplyData::Data(d, length)),
                Command::Write { offset, fua, .. } => device
                    .write(offset, payload, fua)
                    .await
                    .map(|_| ReplyData::None),
                Command::Flush => device.flush().await.map(|_| ReplyData::None),
                Command::Trim {
                    offset,
                    length,
                    fua,
                } => match device.trim(offset, length).await {
                    Ok(()) if fua => device.flush().await.map(|_| ReplyData::None),
                    r => r.map(|_| ReplyData::None),
                },
                Command::Cache { offset, length } => {
                    device.cache(offset, length).await.map(|_| ReplyData::None)
                }
                Command::WriteZeroes {
                    offset,
                    length,
                    may_trim,
                    fua,
                } => device
                    .write_zeroes(offset, length, may_trim, fua)
                    .await
                    .map(|_| ReplyData::None),
                Command::BlockStatus {
                    offset,
                    length,
                    req_one,
                } => device.block_status(offset, length).await.map(|mut d| {
                    if req_one {
                        d.truncate(1);
                    }
                    ReplyData::Status(d)
                }),
                Command::Disconnect => Ok(ReplyData::None),
            };
            let _ = tx.send(reply(result, chunked));
            drop(permit);
        });
    }
}

/// Reads `len` payload bytes into a buffer that is never zeroed first (zeroing 1 MiB
/// per write showed in profiles).
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: usize) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        if (&mut *rd).take(want).read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

impl From<Refusal> for DeviceError {
    fn from(r: Refusal) -> DeviceError {
        match r {
            Refusal::Invalid(m) => DeviceError::Invalid(m),
            Refusal::NoSpace(m) => DeviceError::NoSpace(m),
            Refusal::ReadOnly(m) => DeviceError::ReadOnly(m),
            Refusal::NotFast(m) => DeviceError::NotFast(m),
            Refusal::TooLarge(m) => DeviceError::TooLarge(m),
        }
    }
}

/// Replies gathered into one send at most: a header and a data chunk each, within
/// the 64 slices `frame::write_frame` hands the kernel per send.
const MAX_REPLY_BATCH: usize = 32;

async fn write_replies<W>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    mode: Mode,
    permits: Arc<Semaphore>,
) where
    W: AsyncWrite + Unpin,
{
    let mut hdr = BytesMut::with_capacity(4096);
    while let Some(first) = rx.recv().await {
        if rx.is_empty() && permits.available_permits() < MAX_IN_FLIGHT {
            // Other requests are running: the runtime runs the task it woke last
            // first, so without this each reply would leave in a send of its own.
            // One turn lets requests answered by the same replica batch finish too.
            tokio::task::yield_now().await;
        }
        // Every reply ready leaves in one vectored send, headers and data in place:
        // a send per header and per payload made 4 KiB reads cost two syscalls each,
        // and a header in a packet of its own wakes the client for nothing.
        let mut parts: Vec<Bytes> = Vec::new();
        let mut next = Some(first);
        let mut n = 0;
        while let Some(r) = next {
            if mode.extended {
                encode_extended_reply(&mut hdr, &r);
            } else {
                encode_reply(&mut hdr, &r, mode.structured);
            }
            parts.push(hdr.split().freeze());
            if let Ok(ReplyData::Data(chunks, _)) = r.result {
                parts.extend(chunks);
            }
            n += 1;
            next = if n < MAX_REPLY_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if tether_proto::frame::write_frame(&mut wr, parts)
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// Every reply under extended headers is one extended chunk: data, block status,
/// an error, or NONE for a bare success (simple replies are not allowed).
fn encode_extended_reply(out: &mut BytesMut, r: &Reply) {
    let (h, at) = (r.handle, r.offset);
    match &r.result {
        Ok(ReplyData::Status(runs)) => {
            let len = 8 + 16 * runs.len() as u64;
            put_extended_header(
                out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                h,
                at,
                len,
            );
            out.put_u32(META_ID_ALLOCATION);
            out.put_u32(runs.len() as u32);
            for &(l, f) in runs {
                out.put_u64(u64::from(l));
                out.put_u64(u64::from(f));
            }
        }
        Ok(ReplyData::Data(_, len)) => {
            let n = 8 + u64::from(*len);
            put_extended_header(out, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, at, n);
            out.put_u64(at);
        }
        Ok(ReplyData::None) => put_extended_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, h, at, 0),
        Err(e) => put_extended_error(out, h, at, e.errno(), &e.to_string()),
    }
}

fn encode_reply(out: &mut BytesMut, r: &Reply, structured: bool) {
    match (&r.result, structured && r.is_read) {
        (Ok(ReplyData::Status(runs)), true) => {
            let len = 4 + 8 * runs.len() as u32;
            put_structured_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, r.handle, len);
            out.put_u32(META_ID_ALLOCATION);
            for &(l, f) in runs {
                out.put_u32(l);
                out.put_u32(f);
            }
        }
        (Ok(ReplyData::Data(_, len)), true) => {
            put_structured_header(
                out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                r.handle,
                8 + len,
            );
            out.put_u64(r.offset);
        }
        (Ok(_), _) => put_simple_reply(out, 0, r.handle),
        (Err(e), true) => put_structured_error(out, r.handle, e.errno(), &e.to_string()),
        (Err(e), false) => put_simple_reply(out, e.errno(), r.handle),
    }
}
