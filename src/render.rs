//! Everything the CLI prints about a volume: tables for people, JSON for scripts.

use tether_proto::engine::{Snapshot, StatusReply};

/// A byte count for people: B, KiB, MiB or GiB.
pub(crate) fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// `done` of `total` in percent; `if_empty` when there is nothing to do.
pub(crate) fn percent(done: u64, total: u64, if_empty: f64) -> f64 {
    if total == 0 {
        if_empty
    } else {
        done as f64 * 100.0 / total as f64
    }
}

/// Prints a volume's snapshots, with the export each is served at.
pub(crate) fn snapshots(volume: &str, list: &[Snapshot]) {
    println!(
        "{:<24} {:>12} {:>12}  export",
        "name", "write seq", "allocated"
    );
    for s in list {
        println!(
            "{:<24} {:>12} {:>12}  {}@{}",
            s.name,
            s.seq,
            human(s.allocated),
            volume,
            s.name
        );
    }
}

/// Prints a volume's status as a table, or as JSON with `json`.
pub(crate) fn status(s: &StatusReply, json: bool) {
    let c = s.counters.unwrap_or_default();
    if json {
        let replicas: Vec<String> = s
            .replicas
            .iter()
            .map(|r| {
                format!(
                    "{{\"address\":{:?},\"state\":{:?},\"reason\":{:?},\"rebuild_done\":{},\"rebuild_total\":{},\"rebuild_copied\":{},\"retry_in_seconds\":{},\"failed_attempts\":{}}}",
                    r.address, r.state, r.reason, r.rebuild_done_blocks, r.rebuild_total_blocks, r.rebuild_copied_bytes, r.retry_in_seconds, r.failed_attempts
                )
            })
            .collect();
        println!(
            "{{\"volume\":{:?},\"size\":{},\"block_size\":{},\"epoch\":{},\"nbd\":{:?},\"head_allocated\":{},\"wal_allocated\":{},\"attached\":{},\"degraded\":{},\"encryption\":{:?},\"replica_tls\":{},\"snapshots\":[{}],\"replicas\":[{}],\
             \"counters\":{{\"reads\":{},\"writes\":{},\"flushes\":{},\"trims\":{},\"errors\":{},\"bytes_read\":{},\"bytes_written\":{},\"nbd_connections\":{},\"checksum_errors\":{}}}}}",
            s.volume, s.size, s.block_size, s.epoch, s.nbd_address, s.head_allocated, s.wal_allocated, s.attached_clients, s.degraded, s.encryption, s.replica_tls,
            s.snapshots.iter().map(|x| format!("{{\"name\":{:?},\"seq\":{},\"allocated\":{}}}", x.name, x.seq, x.allocated)).collect::<Vec<_>>().join(","),
            replicas.join(","),
            c.reads, c.writes, c.flushes, c.trims, c.errors, c.bytes_read, c.bytes_written, c.nbd_connections, c.checksum_errors
        );
        return;
    }
    let healthy = s.replicas.iter().filter(|r| r.state == "healthy").count();
    println!("volume    {}", s.volume);
    println!(
        "size      {} bytes ({} MiB), block size {}",
        s.size,
        s.size >> 20,
        s.block_size
    );
    println!("nbd       {}", s.nbd_address);
    println!("epoch     {}", s.epoch);
    println!(
        "security  encryption {}, replicas over {}",
        s.encryption,
        if s.replica_tls {
            "mutual TLS"
        } else {
            "plaintext gRPC"
        }
    );
    println!(
        "space     head {}, log {}, {} snapshot(s) {}  (on one replica)",
        human(s.head_allocated),
        human(s.wal_allocated),
        s.snapshots.len(),
        human(s.snapshots.iter().map(|x| x.allocated).sum())
    );
    for x in &s.snapshots {
        println!("  snapshot {:<20} {}", x.name, human(x.allocated));
    }
    println!("clients   {} attached", s.attached_clients);
    println!(
        "replicas  {healthy} of {} healthy (want {}, writes need {}){}",
        s.replicas.len(),
        s.desired_replicas,
        s.min_replicas,
        if s.degraded { "  DEGRADED" } else { "" }
    );
    for r in &s.replicas {
        if r.state == "rebuilding" {
            let pct = percent(r.rebuild_done_blocks, r.rebuild_total_blocks, 0.0);
            println!(
                "  {:<24} rebuilding {:.1}% ({}), copied {}, {}/s, ETA {} s",
                r.address,
                pct,
                r.rebuild_phase,
                human(r.rebuild_copied_bytes),
                human(r.rebuild_rate_bytes),
                r.rebuild_eta_seconds
            );
        } else if r.reason.is_empty() {
            println!("  {:<24} {}", r.address, r.state);
        } else if r.failed_attempts > 0 {
            println!(
                "  {:<24} {}  ({}); {} attempt(s) to bring it back failed, next in {} s",
                r.address, r.state, r.reason, r.failed_attempts, r.retry_in_seconds
            );
        } else {
            println!("  {:<24} {}  ({})", r.address, r.state, r.reason);
        }
    }
    println!(
        "counters  reads {}  writes {}  flushes {}  trims {}  errors {}",
        c.reads, c.writes, c.flushes, c.trims, c.errors
    );
    println!(
        "          read {} bytes, written {} bytes, {} NBD connections, {} bad block copies seen",
        c.bytes_read, c.bytes_written, c.nbd_connections, c.checksum_errors
    );
}
