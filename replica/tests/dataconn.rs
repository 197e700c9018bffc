//! The replica's data connections: the I/O stream in `tether_proto::frame` framing. A stream
//! ended with its End frame is a clean close; a connection that just stops (a killed
//! engine) never is. A stale epoch is refused with its typed code, and bytes that are
//! not the protocol end that connection only. A stream meant for an earlier start of the
//! replica is refused.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bytes::Bytes;
use tether_proto::frame::{self, Frame};
use tether_proto::replica::replica_client::ReplicaClient;
use tether_proto::replica::{
    io_request, ErrorCode, IoBatch, IoReplyBatch, IoRequest, OpenReply, OpenRequest, Read, Write,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const B: usize = 4096;

async fn open(addr: &str, epoch: u64, engine: u64) -> OpenReply {
    let mut c = ReplicaClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.open(OpenRequest {
        volume: "v".into(),
        size: 64 * B as u64,
        create: true,
        epoch,
        engine_id: engine,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

fn write(id: u64, seq: u64, block: u64, byte: u8) -> IoRequest {
    IoRequest {
        id,
        op: Some(io_request::Op::Write(Write {
            seq,
            block,
            data: Bytes::from(vec![byte; B]),
            tags: Bytes::new(),
        })),
    }
}

fn read(id: u64, block: u64) -> IoRequest {
    IoRequest {
        id,
        op: Some(io_request::Op::Read(Read {
            block,
            count: 1,
            snapshot: String::new(),
            authenticated: false,
        })),
    }
}

/// Connects, says hello and sends the first batch; returns the connection and the
/// replica's first frame (an empty batch when it accepted the stream).
async fn start(
    port: u16,
    epoch: u64,
    boot: u64,
    first: Vec<IoRequest>,
) -> (TcpStream, Frame<IoReplyBatch>) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(&frame::HELLO).await.unwrap();
    let batch = IoBatch {
        volume: "v".into(),
        epoch,
        requests: first,
        boot,
    };
    frame::write_frame(&mut c, frame::encode(batch))
        .await
        .unwrap();
    let f = frame::read_frame::<IoReplyBatch, _>(&mut c)
        .await
        .unwrap()
        .expect("a first frame");
    (c, f)
}

async fn replies(c: &mut TcpStream) -> IoReplyBatch {
    match frame::read_frame::<IoReplyBatch, _>(c).await.unwrap() {
        Some(Frame::Message(b)) => b,
        other => panic!("expected replies, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_ended_stream_is_a_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let svc = tether_replica::ReplicaService::new(dir.path(), Default::default()).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(tether_replica::serve_with(
        l,
        svc,
        None,
        std::future::pending(),
    ));
    let first = open(&addr, 1, 1).await;
    assert!(first.framed_io, "the replica takes data connections");
    // On the same port as gRPC.
    let port = addr.rsplit_once(':').unwrap().1.parse::<u16>().unwrap();

    // An engine writes, then its connection just stops: not clean.
    let (mut c, f) = start(port, 1, 0, vec![write(1, 1, 0, 7)]).await;
    assert!(
        matches!(f, Frame::Message(ref b) if b.replies.is_empty()),
        "{f:?}"
    );
    let r = replies(&mut c).await;
    assert_eq!((r.replies[0].id, r.replies[0].error), (1, 0));
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !open(&addr, 0, 0).await.clean,
        "a dropped connection counted as a clean close"
    );

    // The next engine reads what was acknowledged, and ends its stream: clean.
    let took = open(&addr, 2, 2).await;
    assert!(!took.clean);
    let (mut c, _) = start(port, 2, took.boot, vec![read(1, 0), write(2, 2, 1, 9)]).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(replies(&mut c).await.replies);
    }
    assert_eq!(got[0].error, 0);
    assert_eq!(&got[0].data[..], &[7u8; B][..]);
    assert_eq!((got[1].id, got[1].error), (2, 0));
    frame::write_frame(&mut c, frame::encode_end())
        .await
        .unwrap();
    assert!(matches!(
        frame::read_frame::<IoReplyBatch, _>(&mut c).await.unwrap(),
        Some(Frame::End)
    ));
    assert!(
        open(&addr, 0, 0).await.clean,
        "an ended stream is a clean close"
    );

    // The older engine comes back: refused with the typed code, nothing applied.
    let (_c, f) = start(port, 1, 0, vec![write(1, 3, 1, 3)]).await;
    match f {
        Frame::Error(s) => assert_eq!(tether_proto::wire::code_of(&s), Some(ErrorCode::Fenced)),
        other => panic!("a stale epoch was accepted: {other:?}"),
    }
    // A stream for another start of this replica (it restarted after the engine read
    // its state): refused with the typed code, nothing applied.
    assert_ne!(took.boot, 0);
    let (_c, f) = start(port, 2, took.boot ^ 1, vec![write(1, 3, 1, 3)]).await;
    match f {
        Frame::Error(s) => assert_eq!(tether_proto::wire::code_of(&s), Some(ErrorCode::Restarted)),
        other => panic!("a stream for another process was accepted: {other:?}"),
    }

    // Not the protocol (another version; neither it nor gRPC): that connection
    // ends, everyone else is served.
    for junk in [&b"TETHERIO\x09\0\0\0rest"[..], b"GET / HTTP/1.1\r\n\r\n"] {
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(junk).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .expect("the replica hangs up on garbage");
    }
    let (mut c, _) = start(port, 2, took.boot, vec![read(1, 1)]).await;
    let r = replies(&mut c).await;
    assert_eq!(&r.replies[0].data[..], &[9u8; B][..]);
}
