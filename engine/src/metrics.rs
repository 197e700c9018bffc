//! Prometheus metrics over plain HTTP (`--metrics-listen`): the text exposition
//! format, written by hand because the set is small and fixed.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::nbd::BlockDevice;
use crate::volume::Volume;

/// Renders the volume's metrics in the Prometheus text format.
pub fn render(v: &Volume) -> String {
    let mut out = String::new();
    let name = v.name();
    let healthy = v.healthy_count();
    let desired = v.desired();
    let c = &v.counters;
    let mut gauge = |metric: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {metric} {help}\n# TYPE {metric} gauge\n{metric}{{volume=\"{name}\"}} {value}"
        );
    };
    gauge(
        "tether_volume_replicas_healthy",
        "Replicas serving reads and taking writes.",
        healthy as u64,
    );
    gauge(
        "tether_volume_replicas_desired",
        "Replicas the volume should have.",
        desired as u64,
    );
    gauge(
        "tether_volume_degraded",
        "1 when fewer replicas are healthy than desired.",
        u64::from(healthy < desired),
    );
    gauge(
        "tether_volume_rebuilds_running",
        "Replica rebuilds under way.",
        v.rebuilds.lock().len() as u64,
    );
    gauge("tether_volume_size_bytes", "Volume size.", v.size());
    gauge(
        "tether_volume_clients_attached",
        "NBD clients attached.",
        v.attached(),
    );
    let mut counter = |metric: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter\n{metric}{{volume=\"{name}\"}} {value}");
    };
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    counter("tether_volume_reads_total", "Read requests.", get(&c.reads));
    counter(
        "tether_volume_writes_total",
        "Write requests.",
        get(&c.writes),
    );
    counter(
        "tether_volume_flushes_total",
        "Flush requests.",
        get(&c.flushes),
    );
    counter(
        "tether_volume_errors_total",
        "Requests that failed.",
        get(&c.errors),
    );
    counter(
        "tether_volume_read_bytes_total",
        "Bytes read by clients.",
        get(&c.bytes_read),
    );
    counter(
        "tether_volume_written_bytes_total",
        "Bytes written by clients.",
        get(&c.bytes_written),
    );
    counter(
        "tether_volume_checksum_errors_total",
        "Bad block copies found on replicas.",
        get(&c.checksum_errors),
    );
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
