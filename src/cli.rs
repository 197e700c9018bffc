//! The command line: every subcommand, flag and argument, and the parsing they share.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tether_engine::control;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Replicated block storage served over NBD"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Run a replica daemon holding the replicas of many volumes.
    #[command(args_conflicts_with_subcommands = true)]
    Replica {
        #[command(subcommand)]
        cmd: Option<ReplicaCmd>,
        /// Address to serve gRPC on, e.g. 0.0.0.0:7001.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Directory for the volumes' data (created if missing).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Put the write-ahead logs on this directory (e.g. a faster disk).
        #[arg(long)]
        wal_dir: Option<PathBuf>,
        /// Size of each new volume's write-ahead log (preallocated).
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        wal_size: u64,
        /// Distinct data written straight into a volume's layer (large writes, and
        /// small ones while no flush comes) before it is checkpointed; recovery after
        /// a crash reads up to twice this much from disk to check it.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        direct_limit: u64,
        /// Threads serving I/O (default: half the CPUs, at least 1). Each volume's
        /// writes apply in order on one task; more threads serve more volumes at once,
        /// at the price of cross-CPU hand-offs that cost every request.
        #[arg(long)]
        io_threads: Option<usize>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Make TLS material: a local CA and certificates for replicas, engines and NBD.
    Tls {
        #[command(subcommand)]
        cmd: TlsCmd,
    },
    /// Run the engine of one volume: NBD frontend and synchronous replication.
    Engine(EngineArgs),
    /// Start three local replicas and an engine for a demo volume, on loopback.
    Up(UpOptions),
    /// Inspect and manage volumes.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Manage snapshots; a snapshot is served read-only as NBD export VOLUME@NAME.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Back volumes up to a directory or S3 bucket, encrypted, and restore them.
    Backup {
        #[command(subcommand)]
        cmd: BackupCmd,
    },
}

/// Where the backups are and what opens them. Credentials and passphrases come from
/// the environment or files, never from the command line.
#[derive(clap::Args, Clone)]
pub(crate) struct BackupTarget {
    /// The target: an absolute directory, file:///DIR, or s3://BUCKET[/PREFIX].
    #[arg(long = "target", env = "TETHER_BACKUP_TARGET")]
    pub(crate) url: String,
    /// S3 endpoint, e.g. http://127.0.0.1:9000 (default: AWS).
    #[arg(long, env = "TETHER_S3_ENDPOINT")]
    pub(crate) s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub(crate) s3_region: String,
    /// Path-style S3 requests (ENDPOINT/BUCKET/KEY), as most servers besides AWS want.
    #[arg(long, env = "TETHER_S3_PATH_STYLE")]
    pub(crate) s3_path_style: bool,
    /// File with `access_key_id = …` and `secret_access_key = …` lines (else
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
    #[arg(long)]
    pub(crate) s3_credentials: Option<PathBuf>,
    /// File holding the backup passphrase (else TETHER_BACKUP_PASSPHRASE).
    #[arg(long)]
    pub(crate) passphrase_file: Option<PathBuf>,
    /// File of at least 32 random bytes that wraps the master key instead of a passphrase.
    #[arg(long)]
    pub(crate) backup_key_file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum BackupCmd {
    /// Create, check or re-key a backup target.
    Target {
        #[command(subcommand)]
        cmd: BackupTargetCmd,
    },
    /// Back a volume up (its engine does it); shows bytes, rate and ETA.
    Create {
        #[command(flatten)]
        engine: Target,
        #[command(flatten)]
        target: BackupTarget,
        /// Back up this existing snapshot instead of taking one.
        #[arg(long)]
        snapshot: Option<String>,
        /// A label KEY=VALUE for the manifest (repeat).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Chunks read and uploaded at once.
        #[arg(long, default_value_t = 8)]
        concurrency: u32,
    },
    /// List the backups in the target (of one volume, if named).
    Ls {
        #[command(flatten)]
        target: BackupTarget,
        /// Only this volume's backups.
        volume: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a backup's manifest: snapshot, parent, sizes and what it uploaded.
    Inspect {
        #[command(flatten)]
        target: BackupTarget,
        /// VOLUME (its latest backup) or VOLUME/ID.
        backup: String,
        /// The newest backup of VOLUME at or before this time (RFC 3339, e.g. 2026-12-04T18:00:00Z).
        #[arg(long)]
        at: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete one backup: its manifest only, at once; the chunks it shares with
    /// others stay (garbage collection is separate).
    Rm {
        #[command(flatten)]
        target: BackupTarget,
        /// VOLUME/ID (named in full: there is no "latest" here).
        backup: String,
    },
    /// Keep a standby volume at a second site at the newest backup of SOURCE: each
    /// new backup is applied over the last as it appears (only changed chunks).
    Follow(StandbyArgs),
    /// Make a standby a normal volume: an interrupted apply is undone, and nothing
    /// applies backups to it any more. Then serve it with `tether engine`.
    Promote(StandbyArgs),
    /// Delete the chunks no backup needs (mark, then sweep); backups keep running.
    Gc {
        #[command(flatten)]
        target: BackupTarget,
        /// Keep unreferenced chunks younger than this (room for a many-node
        /// server's clocks that disagree).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// Delete a checkpoint nobody resumed for this long.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        checkpoint_keep: std::time::Duration,
        /// Report what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download every chunk of a backup and check it against its name.
    Verify {
        #[command(flatten)]
        target: BackupTarget,
        /// VOLUME (its latest backup) or VOLUME/ID.
        backup: String,
        /// The newest backup of VOLUME at or before this time.
        #[arg(long)]
        at: Option<String>,
        /// Chunks downloaded at once.
        #[arg(long, default_value_t = 8)]
        concurrency: u32,
    },
    /// Restore a backup into a volume on the given replicas (through an engine this
    /// command runs, or the volume's running engine), or into a plain image file.
    Restore {
        #[command(flatten)]
        target: BackupTarget,
        /// VOLUME (its latest backup) or VOLUME/ID.
        backup: String,
        /// The newest backup of VOLUME at or before this time.
        #[arg(long)]
        at: Option<String>,
        /// The volume to restore into (created on the replicas if it does not exist).
        #[arg(long, required_unless_present = "to_file", conflicts_with = "to_file")]
        volume: Option<String>,
        /// Replica daemon addresses for the volume (repeat).
        #[arg(long = "replica")]
        replicas: Vec<String>,
        /// Write a raw image file here instead (no cluster needed).
        #[arg(long)]
        to_file: Option<PathBuf>,
        /// The new volume's key (32 bytes, 64 hex digits or a passphrase; else
        /// TETHER_ENCRYPTION_KEY): the restored data is sealed under it.
        #[arg(long)]
        encryption_key_file: Option<PathBuf>,
        /// The running engine's control socket, if the volume has one elsewhere.
        #[arg(long)]
        control_socket: Option<PathBuf>,
        /// With no engine running for it, restore over a volume that already exists on
        /// the replicas (stop its engine first: this one fences it). A snapshot
        /// `pre-restore-ID` keeps what it held.
        #[arg(long)]
        overwrite: bool,
        /// Finish a restore of this same backup that was cut off: chunks already in
        /// place are read back and checked, and only the others downloaded.
        #[arg(long)]
        resume: bool,
        /// Chunks downloaded and written at once.
        #[arg(long, default_value_t = 8)]
        concurrency: u32,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

/// A standby volume and the backups it follows.
#[derive(clap::Args)]
pub(crate) struct StandbyArgs {
    #[command(flatten)]
    pub(crate) target: BackupTarget,
    /// The volume whose backups it follows (for promote: the standby's name is enough).
    pub(crate) source: Option<String>,
    /// The standby volume (created on the replicas by the first apply).
    #[arg(long)]
    pub(crate) volume: String,
    /// Replica daemon addresses of the standby (repeat).
    #[arg(long = "replica", required = true)]
    pub(crate) replicas: Vec<String>,
    /// The standby's key (32 bytes, 64 hex digits or a passphrase; else
    /// TETHER_ENCRYPTION_KEY).
    #[arg(long)]
    pub(crate) encryption_key_file: Option<PathBuf>,
    /// How often to look for a new backup.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) every: std::time::Duration,
    /// Apply what is there, then stop.
    #[arg(long)]
    pub(crate) once: bool,
    /// Start the standby over a volume that exists on the replicas already.
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// Chunks downloaded and written at once.
    #[arg(long, default_value_t = 8)]
    pub(crate) concurrency: u32,
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
}

#[derive(Subcommand)]
pub(crate) enum BackupTargetCmd {
    /// Make a new target: a random master key, wrapped by the passphrase or key file.
    Init {
        #[command(flatten)]
        target: BackupTarget,
        /// Bytes per chunk, fixed for the target: a power of two from 256K to 16M.
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        chunk_size: u64,
        /// How long a running backup's lease lives unrenewed; gc keeps what a live
        /// lease relies on. Backups renew it every quarter of this.
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        lease_time: std::time::Duration,
    },
    /// Check a target: reachable, writable, and opened by the passphrase or key file.
    Show {
        #[command(flatten)]
        target: BackupTarget,
    },
    /// Wrap the master key under a new passphrase (TETHER_BACKUP_NEW_PASSPHRASE or
    /// --new-passphrase-file) or a new key file; backups stay as they are.
    Rekey {
        #[command(flatten)]
        target: BackupTarget,
        /// File holding the new passphrase.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
        /// New key file (at least 32 random bytes).
        #[arg(long)]
        new_backup_key_file: Option<PathBuf>,
    },
}

/// Parses `KEY=VALUE`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(clap::Args)]
pub(crate) struct EngineArgs {
    /// Volume name; also the NBD export name.
    #[arg(long)]
    pub(crate) volume: String,
    /// Size when the volume is created (1G, 512M, bytes); may be omitted afterwards.
    #[arg(long, value_parser = parse_size)]
    pub(crate) size: Option<u64>,
    /// Replica daemon address (host:port); repeat for each replica. `dir:PATH` serves a
    /// replica in this process from the data directory PATH (one on this node).
    #[arg(long = "replica", required = true)]
    pub(crate) replicas: Vec<String>,
    /// TCP address for NBD clients.
    #[arg(long)]
    pub(crate) nbd_listen: Option<SocketAddr>,
    /// Unix socket for NBD clients.
    #[arg(long)]
    pub(crate) nbd_socket: Option<PathBuf>,
    /// Control socket (default /run/tether/VOLUME.sock).
    #[arg(long)]
    pub(crate) control_socket: Option<PathBuf>,
    /// Seconds a replica may take to answer before it is dropped.
    #[arg(long, default_value_t = 8.0)]
    pub(crate) timeout: f64,
    /// Seconds I/O waits for a change of the in-sync replicas to be recorded on a
    /// majority before it fails with EIO.
    #[arg(long, default_value_t = 30.0)]
    pub(crate) quorum_wait: f64,
    /// MiB per second a rebuild may copy, so it does not starve client I/O (0: as fast
    /// as the disks and the network go).
    #[arg(long, default_value_t = 0)]
    pub(crate) rebuild_rate: u64,
    /// With fewer healthy replicas, writes fail with EIO instead of running on too few copies.
    #[arg(long, default_value_t = 1)]
    pub(crate) min_replicas: usize,
    /// Replicas wanted (default: as many as --replica); fewer healthy is shown as degraded.
    #[arg(long = "replicas")]
    pub(crate) desired_replicas: Option<usize>,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long)]
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// The volume key: 32 bytes, 64 hex digits or a passphrase (else TETHER_ENCRYPTION_KEY).
    /// A new volume is created encrypted when a key is given; the mode is fixed then.
    #[arg(long)]
    pub(crate) encryption_key_file: Option<PathBuf>,
    /// Threads serving the volume's I/O. One handles a volume's whole request
    /// pipeline (NBD, sealing, replica streams) without cross-CPU hand-offs, which
    /// cost more per request than it gains from a second core on small writes.
    #[arg(long, default_value_t = 1)]
    pub(crate) io_threads: usize,
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
    /// Certificate for NBD clients over TLS (NBD_OPT_STARTTLS); plaintext is then refused on TCP.
    #[arg(long, requires = "nbd_tls_key")]
    pub(crate) nbd_tls_cert: Option<PathBuf>,
    /// Private key for --nbd-tls-cert.
    #[arg(long, requires = "nbd_tls_cert")]
    pub(crate) nbd_tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) schedule: ScheduleArgs,
}

/// What an engine runs by itself: snapshots, backups and gc on a schedule.
#[derive(clap::Args)]
pub(crate) struct ScheduleArgs {
    /// Take a snapshot `sched-TIME` this often.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) snapshot_every: Option<std::time::Duration>,
    /// Scheduled snapshots kept; older ones are deleted.
    #[arg(long, default_value_t = 24)]
    pub(crate) snapshot_keep: usize,
    /// Back the volume up this often (needs --backup-target).
    #[arg(long, value_parser = humantime::parse_duration, requires = "backup_target")]
    pub(crate) backup_every: Option<std::time::Duration>,
    /// Scheduled backups kept; older ones are removed (never the latest).
    #[arg(long, default_value_t = 7)]
    pub(crate) backup_keep: usize,
    /// Collect the target's garbage this often (needs --backup-target).
    #[arg(long, value_parser = humantime::parse_duration, requires = "backup_target")]
    pub(crate) gc_every: Option<std::time::Duration>,
    /// The backup target of scheduled backups and gc (its passphrase from
    /// TETHER_BACKUP_PASSPHRASE or --backup-passphrase-file).
    #[arg(long)]
    pub(crate) backup_target: Option<String>,
    /// S3 endpoint of the backup target.
    #[arg(long)]
    pub(crate) backup_s3_endpoint: Option<String>,
    /// Path-style S3 requests to the backup target.
    #[arg(long)]
    pub(crate) backup_s3_path_style: bool,
    /// S3 credentials file of the backup target.
    #[arg(long)]
    pub(crate) backup_s3_credentials: Option<PathBuf>,
    /// File holding the backup target's passphrase.
    #[arg(long)]
    pub(crate) backup_passphrase_file: Option<PathBuf>,
    /// Key file wrapping the backup target's master key.
    #[arg(long)]
    pub(crate) backup_key_file: Option<PathBuf>,
}

/// Mutual TLS between engines and replicas.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct TlsArgs {
    /// This side's certificate (PEM).
    #[arg(long, requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// CA that signs the other side's certificate: a replica refuses clients without one.
    #[arg(long)]
    pub(crate) tls_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum TlsCmd {
    /// Create a CA, a server certificate (replicas, NBD) and a client certificate (engines).
    Init {
        /// Directory for the PEM files.
        dir: PathBuf,
        /// Extra host names or IPs the server certificate is valid for (repeat).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum VolumeCmd {
    /// Show a volume's size, space, replicas and counters (asks its engine).
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume online; clients see the new size when they reconnect.
    Expand {
        #[command(flatten)]
        target: Target,
        /// New size (1G, 512M, bytes); shrinking is refused.
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Read every block on every replica, check checksums and compare the replicas.
    Verify {
        #[command(flatten)]
        target: Target,
    },
    /// Accept the data of some replicas knowingly, when the ones holding newer writes
    /// are gone for good: a waiting engine then serves from them. Recorded for good.
    Salvage {
        /// Volume name.
        volume: String,
        /// Serve from these replicas (their data is accepted as it is).
        #[arg(long = "from", required = true)]
        from: Vec<String>,
        /// Every replica of the volume still reachable, `--from` ones included.
        #[arg(long = "replica", required = true)]
        replicas: Vec<String>,
        /// Confirms that writes only the other replicas hold may be lost.
        #[arg(long)]
        accept_data_loss: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

#[derive(clap::Args)]
pub(crate) struct Target {
    /// Volume name.
    pub(crate) volume: String,
    /// The engine's control socket, if not the default.
    #[arg(long)]
    pub(crate) control_socket: Option<PathBuf>,
}

impl Target {
    /// Maps an engine's error for `what` to a message naming the volume.
    pub(crate) fn failed<'a>(
        &'a self,
        what: &'a str,
    ) -> impl Fn(tonic::Status) -> anyhow::Error + Copy + 'a {
        move |e| anyhow::anyhow!("volume {}: {what} failed: {}", self.volume, e.message())
    }
}

#[derive(Subcommand)]
pub(crate) enum ReplicaCmd {
    /// Add a replica to a running volume: it rebuilds online, then serves.
    Add {
        #[command(flatten)]
        target: Target,
        /// The replica daemon's address.
        address: String,
    },
    /// Remove a replica from a volume (refused below --min-replicas).
    Rm {
        #[command(flatten)]
        target: Target,
        /// The replica daemon's address.
        address: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum SnapshotCmd {
    /// Take a snapshot: the same cut on every replica, in well under a second.
    Create {
        #[command(flatten)]
        target: Target,
        /// Snapshot name.
        name: String,
    },
    /// List snapshots with the space each holds.
    Ls {
        #[command(flatten)]
        target: Target,
    },
    /// Delete a snapshot (its blocks merge into the next layer; I/O continues).
    Rm {
        #[command(flatten)]
        target: Target,
        /// Snapshot name.
        name: String,
    },
    /// Make the volume's contents the snapshot's (no client may be attached).
    Revert {
        #[command(flatten)]
        target: Target,
        /// Snapshot name.
        name: String,
    },
}

/// Parses `1G`, `512M`, `64k`, `1GiB` or plain bytes (powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; use e.g. 1G, 512M or a byte count"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?}; use K, M, G or T"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// What `tether up` runs.
#[derive(clap::Args)]
pub(crate) struct UpOptions {
    /// Directory for all data.
    #[arg(long, default_value = "./tether-data")]
    pub(crate) data: PathBuf,
    /// Volume name.
    #[arg(long, default_value = "demo")]
    pub(crate) volume: String,
    /// Volume size when first created (1G, 512M, bytes).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub(crate) size: u64,
    /// NBD address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub(crate) nbd_listen: SocketAddr,
    /// First of three consecutive ports for the replicas.
    #[arg(long, default_value_t = 17001)]
    pub(crate) replica_port: u16,
    /// Control socket (default: /run/tether/VOLUME.sock, or DATA/VOLUME.sock if /run is not writable).
    #[arg(long)]
    pub(crate) control_socket: Option<PathBuf>,
    /// No encryption and no TLS between engine and replicas (for comparisons).
    #[arg(long)]
    pub(crate) plain: bool,
}

pub(crate) async fn engine(
    t: &Target,
) -> Result<tether_proto::engine::engine_client::EngineClient<tonic::transport::Channel>> {
    let socket = t
        .control_socket
        .clone()
        .unwrap_or_else(|| control::default_socket(&t.volume));
    control::connect(&socket)
        .await
        .map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
