//! Prometheus metrics over plain HTTP (`--metrics-listen`): the text exposition
//! format, written by hand because the set is small and fixed.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::phase::EngineState;
use crate::volume::Volume;

/// Renders the engine's metrics in the Prometheus text format: whether it serves, and
/// the volume's metrics once it does.
pub fn render(state: &EngineState) -> String {
    let (serving, waiting_for, mut out) = match state.serving() {
        Ok((v, _)) => (1, 0, render_volume(&v)),
        Err(w) => (0, w.waiting_for.len() as u64, String::new()),
    };
    let phase: [(&str, &str, u64); 2] = [
        (
            "tether_volume_serving",
            "1 once the engine serves; 0 while the membership rule does not let it yet.",
            serving,
        ),
        (
            "tether_volume_waiting_replicas",
            "Replicas a waiting engine needs an answer from before it may serve.",
            waiting_for,
        ),
    ];
    for (metric, help, value) in phase {
        let _ = writeln!(
            out,
            "# HELP {metric} {help}\n# TYPE {metric} gauge\n{metric}{{volume=\"{}\"}} {value}",
            state.volume
        );
    }
    out
}

/// Renders the served volume's metrics.
fn render_volume(v: &Volume) -> String {
    let healthy = v.healthy_count() as u64;
    let desired = v.desired() as u64;
    let c = &v.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let metrics: [(&str, &str, &str, u64); 17] = [
        (
            "tether_volume_io_held",
            "gauge",
            "1 while I/O waits for a membership change to count (it fails with EIO after --quorum-wait).",
            u64::from(v.io_held().is_some()),
        ),
        (
            "tether_volume_generation",
            "gauge",
            "The membership generation the engine serves under.",
            v.generation().map_or(0, |g| g.number),
        ),
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
        (
            "tether_volume_cache_requests_total",
            "counter",
            "Prefetch hints (NBD_CMD_CACHE) passed to a replica.",
            get(&c.cache_requests),
        ),
        (
            "tether_volume_cache_blocks_total",
            "counter",
            "Blocks replicas held and read ahead for prefetch hints.",
            get(&c.cache_blocks),
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
pub async fn serve(listener: tokio::net::TcpListener, v: Arc<EngineState>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_engine_says_it_does_not_serve_and_how_many_replicas_it_waits_for() {
        let state = EngineState::new("v", &["r1".into(), "r2".into(), "r3".into()]);
        state.wait("not enough".into(), vec!["r2".into(), "r3".into()]);
        let text = render(&state);
        assert!(
            text.contains("tether_volume_serving{volume=\"v\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tether_volume_waiting_replicas{volume=\"v\"} 2"),
            "{text}"
        );
        assert!(!text.contains("tether_volume_writes_total"), "{text}");
    }
}
