//! Prometheus metrics over plain HTTP (`--metrics-listen`): the text exposition
//! format, written by hand because the set is small and fixed.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::volume::Volume;

/// Renders the volume's metrics in the Prometheus text format.
pub fn render(v: &Volume) -> String {
    let healthy = v.healthy_count() as u64;
    let desired = v.desired() as u64;
    let c = &v.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let metrics: [(&str, &str, &str, u64); 13] = [
        (
            "tether_volume_replicas_healthy",
            "gauge",
            "Replicas serving reads and taking writes.",
            healthy,
        ),
        (
            "tether_volume_replicas_desired",
            "gauge",
            "Replicas the volume should have.",
            desired,
        ),
        (
            "tether_volume_degraded",
            "gauge",
            "1 when fewer replicas are healthy than desired.",
            u64::from(v.degraded()),
        ),
        (
            "tether_volume_rebuilds_running",
            "gauge",
            "Replica rebuilds under way.",
            v.rebuilds.lock().len() as u64,
        ),
        (
            "tether_volume_size_bytes",
            "gauge",
            "Volume size.",
            v.size(),
        ),
        (
            "tether_volume_clients_attached",
            "gauge",
            "NBD clients attached.",
            v.attached(),
        ),
        (
            "tether_volume_reads_total",
            "counter",
            "Read requests.",
            get(&c.reads),
        ),
        (
            "tether_volume_writes_total",
            "counter",
            "Write requests.",
            get(&c.writes),
        ),
        (
            "tether_volume_flushes_total",
            "counter",
            "Flush requests.",
            get(&c.flushes),
        ),
        (
            "tether_volume_errors_total",
            "counter",
            "Requests that failed.",
            get(&c.errors),
        ),
        (
            "tether_volume_read_bytes_total",
            "counter",
            "Bytes read by clients.",
            get(&c.bytes_read),
        ),
        (
            "tether_volume_written_bytes_total",
            "counter",
            "Bytes written by clients.",
            get(&c.bytes_written),
        ),
        (
            "tether_volume_checksum_errors_total",
            "counter",
            "Bad block copies found on replicas.",
            get(&c.checksum_errors),
        ),
    ];
    let mut out = String::new();
    for (metric, kind, help, value) in metrics {
        let _ = writeln!(
            out,
            "# HELP {metric} {help}\n# TYPE {metric} {kind}\n{metric}{{volume=\"{}\"}} {value}",
            v.name()
        );
    }
    out
}

/// Serves `GET /metrics` (any path, in fact) until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, v: Arc<Volume>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let v = v.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            // One request per connection; the request itself does not matter.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await;
            let body = render(&v);
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
