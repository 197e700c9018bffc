//! Everything the CLI prints about a volume: tables for people, JSON for scripts.

use tether_proto::engine::{BackupProgress, Snapshot, StatusReply};

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
        println!("{}", status_json(s));
        return;
    }
    if s.state == "waiting" {
        waiting(s);
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
        "members   generation {}, in sync: {}",
        s.generation,
        s.in_sync.join(", ")
    );
    for x in &s.salvages {
        println!("  SALVAGED {x}");
    }
    if !s.io_held.is_empty() {
        println!(
            "I/O HELD  {}  (fails with EIO after --quorum-wait)",
            s.io_held
        );
    }
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
    if let Some(b) = &s.backup {
        println!("{}", job_line(b));
    }
    for j in &s.schedules {
        let last = match j.last_seconds_ago {
            -1 => "not run yet".to_string(),
            ago => format!("last {ago} s ago: {}", j.last_outcome),
        };
        let keep = if j.keep > 0 {
            format!(", keep {}", j.keep)
        } else {
            String::new()
        };
        println!(
            "schedule  {} every {}{keep}; {last}; next in {} s",
            j.job,
            humantime::format_duration(std::time::Duration::from_secs(j.every_seconds)),
            j.next_in_seconds
        );
    }
    if !s.schedules.is_empty() {
        match s.newest_backup_age_seconds {
            -1 => println!("backups   none yet"),
            age => println!("backups   the newest was taken {age} s ago"),
        }
    }
}

/// One line about a backup or restore, running or ended.
fn job_line(b: &BackupProgress) -> String {
    match b.state.as_str() {
        "running" => format!(
            "{:<9} {} {:.1}% ({} of {}), {}/s, ETA {} s, uploaded {} in {} objects, to {}",
            b.operation,
            b.backup,
            percent(b.done_bytes, b.total_bytes, 0.0),
            human(b.done_bytes),
            human(b.total_bytes),
            human(b.rate_bytes),
            b.eta_seconds,
            human(b.object_bytes),
            b.objects,
            b.target
        ),
        "failed" => format!(
            "{:<9} {} FAILED {} s ago: {}",
            b.operation, b.backup, b.ended_seconds_ago, b.error
        ),
        _ => format!(
            "{:<9} {} done {} s ago ({}; {} read, {} in {} objects), {}",
            b.operation,
            b.backup,
            b.ended_seconds_ago,
            b.method,
            human(b.done_bytes),
            human(b.object_bytes),
            b.objects,
            b.target
        ),
    }
}

/// Prints the backups of a target, oldest first per volume.
pub(crate) fn backups(list: &[tether_backup::Manifest], json: bool) {
    if json {
        let rows: Vec<serde_json::Value> = list.iter().map(backup_json).collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    println!(
        "{:<16} {:<24} {:<21} {:>10} {:>8} {:>10}  method",
        "volume", "backup", "time", "size", "chunks", "uploaded"
    );
    for m in list {
        let h = &m.header;
        println!(
            "{:<16} {:<24} {:<21} {:>10} {:>8} {:>10}  {}",
            h.volume,
            h.id,
            h.time(),
            human(h.size),
            m.chunks.len(),
            human(h.stats.bytes_uploaded),
            h.stats.method
        );
    }
}

fn backup_json(m: &tether_backup::Manifest) -> serde_json::Value {
    let h = &m.header;
    serde_json::json!({
        "volume": h.volume, "id": h.id, "time": h.time(), "created": h.created,
        "size": h.size, "chunk_size": h.chunk_size, "snapshot": h.snapshot,
        "snapshot_seq": h.snapshot_seq, "parent": h.parent, "labels": h.labels,
        "chunks": m.chunks.len(), "distinct_chunks": m.chunks.iter().map(|c| c.1).collect::<std::collections::HashSet<_>>().len(),
        "stats": {
            "method": h.stats.method, "chunks_read": h.stats.chunks_read,
            "chunks_uploaded": h.stats.chunks_uploaded, "bytes_read": h.stats.bytes_read,
            "bytes_uploaded": h.stats.bytes_uploaded, "millis": h.stats.millis,
        },
    })
}

/// Prints one backup's manifest.
pub(crate) fn backup(m: &tether_backup::Manifest, json: bool) {
    if json {
        println!("{}", backup_json(m));
        return;
    }
    let h = &m.header;
    let st = &h.stats;
    println!("backup    {}/{}", h.volume, h.id);
    println!("time      {}", h.time());
    println!(
        "size      {} ({} bytes), chunks of {}",
        human(h.size),
        h.size,
        human(h.chunk_size)
    );
    println!("snapshot  {} (write seq {})", h.snapshot, h.snapshot_seq);
    println!(
        "parent    {}",
        h.parent.as_deref().unwrap_or("none (a full backup)")
    );
    println!(
        "chunks    {} holding data of {} ({} all-zero, not stored)",
        m.chunks.len(),
        h.chunk_count(),
        h.chunk_count() - m.chunks.len() as u64
    );
    println!(
        "made by   {}: read {} chunks ({}), uploaded {} ({}) in {:.1} s",
        st.method,
        st.chunks_read,
        human(st.bytes_read),
        st.chunks_uploaded,
        human(st.bytes_uploaded),
        st.millis as f64 / 1000.0
    );
    for (k, v) in &h.labels {
        println!("label     {k}={v}");
    }
}

/// Prints the status of an engine that does not serve yet.
fn waiting(s: &StatusReply) {
    println!("volume    {}", s.volume);
    println!(
        "state     WAITING for {} s, {} attempt(s) to open: {}",
        s.waiting_seconds, s.open_attempts, s.waiting_reason
    );
    if s.open_attempts == 0 {
        // The first open is under way: nothing to wait for yet.
    } else if s.waiting_for.is_empty() {
        println!("waits for an operator: no replica's answer would let it serve (see `tether volume salvage`)");
    } else {
        println!("waits for {}", s.waiting_for.join(", "));
    }
    for r in &s.replicas {
        println!("  {:<24} {}", r.address, r.state);
    }
}

/// A volume's status as JSON, for scripts.
fn status_json(s: &StatusReply) -> serde_json::Value {
    let c = s.counters.unwrap_or_default();
    let replicas: Vec<serde_json::Value> = s
        .replicas
        .iter()
        .map(|r| {
            serde_json::json!({
                "address": r.address, "state": r.state, "reason": r.reason,
                "rebuild_done": r.rebuild_done_blocks, "rebuild_total": r.rebuild_total_blocks,
                "rebuild_copied": r.rebuild_copied_bytes, "retry_in_seconds": r.retry_in_seconds,
                "failed_attempts": r.failed_attempts,
            })
        })
        .collect();
    let snapshots: Vec<serde_json::Value> = s
        .snapshots
        .iter()
        .map(|x| serde_json::json!({"name": x.name, "seq": x.seq, "allocated": x.allocated}))
        .collect();
    serde_json::json!({
        "volume": s.volume, "state": s.state, "size": s.size, "block_size": s.block_size,
        "epoch": s.epoch, "nbd": s.nbd_address, "head_allocated": s.head_allocated,
        "wal_allocated": s.wal_allocated, "attached": s.attached_clients, "degraded": s.degraded,
        "encryption": s.encryption, "replica_tls": s.replica_tls,
        "generation": s.generation, "in_sync": s.in_sync, "salvages": s.salvages,
        "io_held": s.io_held, "waiting_reason": s.waiting_reason, "waiting_for": s.waiting_for,
        "waiting_seconds": s.waiting_seconds, "open_attempts": s.open_attempts,
        "snapshots": snapshots, "replicas": replicas,
        "backup": s.backup.as_ref().map(|b| serde_json::json!({
            "operation": b.operation, "backup": b.backup, "state": b.state,
            "total_bytes": b.total_bytes, "done_bytes": b.done_bytes, "objects": b.objects,
            "object_bytes": b.object_bytes, "rate_bytes": b.rate_bytes, "eta_seconds": b.eta_seconds,
            "error": b.error, "error_kind": b.error_kind, "method": b.method, "target": b.target,
        })),
        "schedules": s.schedules.iter().map(|j| serde_json::json!({
            "job": j.job, "every_seconds": j.every_seconds, "keep": j.keep,
            "last_seconds_ago": j.last_seconds_ago, "last_outcome": j.last_outcome,
            "next_in_seconds": j.next_in_seconds,
        })).collect::<Vec<_>>(),
        "newest_backup_age_seconds": s.newest_backup_age_seconds,
        "counters": {
            "reads": c.reads, "writes": c.writes, "flushes": c.flushes, "trims": c.trims,
            "errors": c.errors, "bytes_read": c.bytes_read, "bytes_written": c.bytes_written,
            "nbd_connections": c.nbd_connections, "checksum_errors": c.checksum_errors,
            "cache_requests": c.cache_requests, "cache_blocks": c.cache_blocks,
        },
    })
}
