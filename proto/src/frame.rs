//! The data connection: the ordered I/O stream of `Replica.Io` without HTTP/2.
//!
//! gRPC stays for control; a volume's I/O stream may instead run on a TCP (or TLS)
//! connection of its own, where each message is one frame: a fixed little-endian
//! prefix, a small header (the protobuf message with its block payloads taken out,
//! and their lengths), then the payloads themselves. The sender hands the payloads to
//! the kernel as they are (one vectored write, no copy into an encode buffer); the
//! receiver reads them into one buffer and hands out slices of it.
//!
//! Data connections arrive on the replica's gRPC port, told apart by [`HELLO`] (or,
//! over TLS, by [`ALPN`]). A connection opens with [`HELLO`]. The client's frames are [`IoBatch`]es (the first
//! names the volume and epoch, as on gRPC), the server's [`IoReplyBatch`]es. Either
//! side ends with [`Frame::End`]; the server may end with [`Frame::Error`] (a status,
//! typed code included) instead. A connection that stops without `End` is broken,
//! never a clean close: a killed engine must not look like one that closed its volume.

use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::{Code, Status};

use crate::replica::io_request::Op;
use crate::replica::{ErrorCode, IoBatch, IoReplyBatch};
use crate::wire::MAX_MESSAGE;

/// The ALPN protocol name of a data connection over TLS (gRPC's is `h2`).
pub const ALPN: &[u8] = b"tether-io/1";

/// What a client sends first: magic and protocol version.
pub const HELLO: [u8; 12] = *b"TETHERIO\x01\0\0\0";

const KIND_MESSAGE: u32 = 1;
const KIND_ERROR: u32 = 2;
const KIND_END: u32 = 3;
/// kind u32, header length u32, payload length u64.
const PREFIX: usize = 16;
/// Headers carry ids, offsets and lengths only; anything larger is not ours.
const MAX_HEADER: usize = 4 << 20;

/// One frame received.
#[derive(Debug)]
pub enum Frame<T> {
    /// A message, payloads back in place.
    Message(T),
    /// The peer's final error.
    Error(Status),
    /// The peer ended the stream on purpose.
    End,
}

/// A message whose byte fields travel beside its protobuf header.
pub trait Payloads: Message + Default + Sized {
    /// Moves the payload fields out, in a fixed order, leaving them empty.
    fn take_payloads(&mut self) -> Vec<Bytes>;
    /// How many payloads the header (as decoded) expects back.
    fn payload_slots(&self) -> usize;
    /// Puts payloads back in the order `take_payloads` took them.
    fn put_payloads(&mut self, payloads: &mut dyn Iterator<Item = Bytes>);
}

impl Payloads for IoBatch {
    fn take_payloads(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        for r in &mut self.requests {
            if let Some(Op::Write(w)) = &mut r.op {
                out.push(std::mem::take(&mut w.data));
                out.push(std::mem::take(&mut w.tags));
            }
        }
        out
    }

    fn payload_slots(&self) -> usize {
        2 * self
            .requests
            .iter()
            .filter(|r| matches!(r.op, Some(Op::Write(_))))
            .count()
    }

    fn put_payloads(&mut self, payloads: &mut dyn Iterator<Item = Bytes>) {
        for r in &mut self.requests {
            if let Some(Op::Write(w)) = &mut r.op {
                w.data = payloads.next().unwrap_or_default();
                w.tags = payloads.next().unwrap_or_default();
            }
        }
    }
}

impl Payloads for IoReplyBatch {
    fn take_payloads(&mut self) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(2 * self.replies.len());
        for r in &mut self.replies {
            out.push(std::mem::take(&mut r.data));
            out.push(std::mem::take(&mut r.tags));
        }
        out
    }

    fn payload_slots(&self) -> usize {
        2 * self.replies.len()
    }

    fn put_payloads(&mut self, payloads: &mut dyn Iterator<Item = Bytes>) {
        for r in &mut self.replies {
            r.data = payloads.next().unwrap_or_default();
            r.tags = payloads.next().unwrap_or_default();
        }
    }
}

fn invalid(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

fn prefix(kind: u32, header: usize, payload: u64) -> [u8; PREFIX] {
    let mut p = [0u8; PREFIX];
    p[..4].copy_from_slice(&kind.to_le_bytes());
    p[4..8].copy_from_slice(&(header as u32).to_le_bytes());
    p[8..].copy_from_slice(&payload.to_le_bytes());
    p
}

/// Encodes `msg` as a frame: the prefix and header in one buffer, then the payloads.
pub fn encode<T: Payloads>(mut msg: T) -> Vec<Bytes> {
    let payloads = msg.take_payloads();
    let total: u64 = payloads.iter().map(|p| p.len() as u64).sum();
    let header = 4 + 4 * payloads.len() + msg.encoded_len();
    let mut head = BytesMut::with_capacity(PREFIX + header);
    head.put_slice(&prefix(KIND_MESSAGE, header, total));
    head.put_u32_le(payloads.len() as u32);
    for p in &payloads {
        head.put_u32_le(p.len() as u32);
    }
    // Cannot fail: the buffer was sized for it.
    let _ = msg.encode(&mut head);
    let mut out = Vec::with_capacity(1 + payloads.len());
    out.push(head.freeze());
    out.extend(payloads.into_iter().filter(|p| !p.is_empty()));
    out
}

/// Encodes a final error frame.
pub fn encode_error(s: &Status) -> Vec<Bytes> {
    let typed = crate::wire::code_of(s).map_or(-1, |c| c as i32);
    let msg = s.message().as_bytes();
    let mut head = BytesMut::with_capacity(PREFIX + 8 + msg.len());
    head.put_slice(&prefix(KIND_ERROR, 8 + msg.len(), 0));
    head.put_i32_le(s.code() as i32);
    head.put_i32_le(typed);
    head.put_slice(msg);
    vec![head.freeze()]
}

/// Encodes the end-of-stream frame.
pub fn encode_end() -> Vec<Bytes> {
    vec![Bytes::copy_from_slice(&prefix(KIND_END, 0, 0))]
}

/// Writes one encoded frame with vectored writes, then flushes (TLS seals it).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut chunks: Vec<Bytes>,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < chunks.len() {
        let n = {
            let slices: Vec<IoSlice<'_>> = chunks[first..]
                .iter()
                .take(64)
                .map(|c| IoSlice::new(c))
                .collect();
            w.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 && first < chunks.len() {
            let len = chunks[first].len();
            if left >= len {
                left -= len;
                first += 1;
            } else {
                chunks[first].advance(left);
                left = 0;
            }
        }
    }
    w.flush().await
}

/// Reads one frame; `Ok(None)` when the connection ended between frames (without
/// `End`: the caller treats that as broken).
pub async fn read_frame<T: Payloads, R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<Frame<T>>> {
    let mut p = [0u8; PREFIX];
    match r.read_exact(&mut p[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut p[1..]).await?;
    let (kind, header, payload) = parse_prefix(&p)?;
    let mut head = vec![0u8; header];
    r.read_exact(&mut head).await?;
    let mut body = BytesMut::with_capacity(payload);
    while body.len() < payload {
        let want = payload - body.len();
        if r.read_buf(&mut (&mut body).limit(want)).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    decode(kind, &head, body.freeze()).map(Some)
}

fn parse_prefix(p: &[u8; PREFIX]) -> std::io::Result<(u32, usize, usize)> {
    let kind = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    let header = u32::from_le_bytes([p[4], p[5], p[6], p[7]]) as usize;
    let payload = u64::from_le_bytes([p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]]);
    if header > MAX_HEADER {
        return Err(invalid(format!(
            "frame header of {header} bytes (at most {MAX_HEADER})"
        )));
    }
    if payload > MAX_MESSAGE as u64 {
        return Err(invalid(format!(
            "frame payload of {payload} bytes (at most {MAX_MESSAGE})"
        )));
    }
    Ok((kind, header, payload as usize))
}

/// Decodes a frame from its parts (the prefix already checked).
pub fn decode<T: Payloads>(kind: u32, head: &[u8], mut body: Bytes) -> std::io::Result<Frame<T>> {
    match kind {
        KIND_END if head.is_empty() && body.is_empty() => Ok(Frame::End),
        KIND_ERROR if head.len() >= 8 && body.is_empty() => {
            let code = i32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            let typed = i32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            let msg = String::from_utf8_lossy(&head[8..]).into_owned();
            Ok(Frame::Error(match ErrorCode::try_from(typed) {
                Ok(c) if typed >= 0 => crate::wire::status(c, msg),
                _ => Status::new(Code::from(code), msg),
            }))
        }
        KIND_MESSAGE => {
            let mut h = head;
            if h.len() < 4 {
                return Err(invalid("frame header shorter than its count"));
            }
            let n = h.get_u32_le() as usize;
            if n > h.len() / 4 {
                return Err(invalid(format!(
                    "frame names {n} payloads in a short header"
                )));
            }
            let mut lens = Vec::with_capacity(n);
            let mut sum = 0usize;
            for _ in 0..n {
                let l = h.get_u32_le() as usize;
                sum = sum.saturating_add(l);
                lens.push(l);
            }
            if sum != body.len() {
                return Err(invalid(format!(
                    "frame payloads add up to {sum} bytes, {} sent",
                    body.len()
                )));
            }
            let mut msg =
                T::decode(h).map_err(|e| invalid(format!("frame header does not decode: {e}")))?;
            if msg.payload_slots() != n {
                return Err(invalid(format!(
                    "frame carries {n} payloads, its message has room for {}",
                    msg.payload_slots()
                )));
            }
            let mut parts = lens.into_iter().map(|l| body.split_to(l));
            msg.put_payloads(&mut parts);
            Ok(Frame::Message(msg))
        }
        _ => Err(invalid(format!("unknown frame (kind {kind})"))),
    }
}

/// The frames `r` brings, as the stream a gRPC call would yield: messages, then the
/// end (End), or the peer's error, or `unavailable` naming `peer` when the connection
/// stops or breaks (never an end: a killed peer must not look like one that finished).
pub fn stream<T, R>(
    r: R,
    peer: String,
) -> impl futures::Stream<Item = Result<T, Status>> + Send + 'static
where
    T: Payloads + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    futures::stream::unfold(Some((r, peer)), |state| async move {
        let (mut r, peer) = state?;
        match read_frame::<T, _>(&mut r).await {
            Ok(Some(Frame::Message(m))) => Some((Ok(m), Some((r, peer)))),
            Ok(Some(Frame::End)) => None,
            Ok(Some(Frame::Error(s))) => Some((Err(s), None)),
            Ok(None) => Some((
                Err(Status::unavailable(format!(
                    "{peer}: the connection ended without ending the stream"
                ))),
                None,
            )),
            Err(e) => Some((Err(Status::unavailable(format!("{peer}: {e}"))), None)),
        }
    })
}

/// Reads and checks the client's [`HELLO`].
pub async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<()> {
    let mut h = [0u8; HELLO.len()];
    r.read_exact(&mut h).await?;
    if h[..8] != HELLO[..8] {
        return Err(invalid("not a tether data connection"));
    }
    if h != HELLO {
        return Err(invalid(format!(
            "data protocol version {} (this replica speaks {})",
            u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
            HELLO[8]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::{io_request, IoReply, IoRequest, Read, Write};

    fn write(id: u64, block: u64, data: Vec<u8>, tags: Vec<u8>) -> IoRequest {
        IoRequest {
            id,
            op: Some(io_request::Op::Write(Write {
                seq: id + 2,
                block,
                data: Bytes::from(data),
                tags: Bytes::from(tags),
            })),
        }
    }

    fn batch() -> IoBatch {
        let read = IoRequest {
            id: 2,
            op: Some(io_request::Op::Read(Read {
                block: 1,
                count: 2,
                snapshot: String::new(),
                authenticated: true,
            })),
        };
        IoBatch {
            volume: "v".into(),
            epoch: 7,
            boot: 11,
            requests: vec![
                write(1, 9, vec![5u8; 8192], vec![6u8; 64]),
                read,
                write(3, 0, vec![7u8; 4096], Vec::new()),
            ],
        }
    }

    async fn roundtrip<T: Payloads>(chunks: Vec<Bytes>) -> std::io::Result<Option<Frame<T>>> {
        let wire: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        read_frame::<T, _>(&mut &wire[..]).await
    }

    #[tokio::test]
    async fn messages_errors_and_end_survive_the_wire() {
        let b = batch();
        match roundtrip::<IoBatch>(encode(b.clone())).await.unwrap() {
            Some(Frame::Message(got)) => assert_eq!(got, b),
            other => panic!("{other:?}"),
        }
        let r = IoReplyBatch {
            replies: vec![IoReply {
                id: 4,
                data: Bytes::from(vec![1u8; 4096]),
                tags: Bytes::from(vec![2u8; 32]),
                ..Default::default()
            }],
        };
        match roundtrip::<IoReplyBatch>(encode(r.clone())).await.unwrap() {
            Some(Frame::Message(got)) => assert_eq!(got, r),
            other => panic!("{other:?}"),
        }
        let s = crate::wire::status(ErrorCode::Fenced, "newer engine");
        match roundtrip::<IoReplyBatch>(encode_error(&s)).await.unwrap() {
            Some(Frame::Error(got)) => {
                assert_eq!(crate::wire::code_of(&got), Some(ErrorCode::Fenced));
                assert_eq!(got.message(), "newer engine");
            }
            other => panic!("{other:?}"),
        }
        let s = Status::unavailable("gone");
        match roundtrip::<IoReplyBatch>(encode_error(&s)).await.unwrap() {
            Some(Frame::Error(got)) => {
                assert_eq!(got.code(), Code::Unavailable);
                assert_eq!(crate::wire::code_of(&got), None);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            roundtrip::<IoBatch>(encode_end()).await.unwrap(),
            Some(Frame::End)
        ));
        // Nothing at all: the connection ended between frames.
        assert!(roundtrip::<IoBatch>(Vec::new()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_cut_frame_is_an_error_not_an_end() {
        let wire: Vec<u8> = encode(batch()).iter().flat_map(|c| c.to_vec()).collect();
        for cut in 1..wire.len() {
            assert!(read_frame::<IoBatch, _>(&mut &wire[..cut]).await.is_err());
        }
    }

    #[tokio::test]
    async fn payload_counts_must_match_the_message() {
        // A reply frame read as a batch: two payloads, no writes to hold them.
        let r = IoReplyBatch {
            replies: vec![IoReply::default()],
        };
        let wire: Vec<u8> = encode(r).iter().flat_map(|c| c.to_vec()).collect();
        assert!(read_frame::<IoBatch, _>(&mut &wire[..]).await.is_err());
    }

    proptest::proptest! {
        #[test]
        fn untrusted_frames_never_panic(kind in 0u32..5, head: Vec<u8>, body: Vec<u8>) {
            let _ = decode::<IoBatch>(kind, &head, Bytes::from(body.clone()));
            let _ = decode::<IoReplyBatch>(kind, &head, Bytes::from(body));
        }

        #[test]
        fn untrusted_streams_never_panic(wire: Vec<u8>) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let _ = read_frame::<IoBatch, _>(&mut &wire[..]).await;
                let _ = read_hello(&mut &wire[..]).await;
            });
        }
    }
}
