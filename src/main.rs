//! `tether`: the one binary with every role as a subcommand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tether_engine::{control, crypt, tls, EngineConfig};

mod pki;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Replicated block storage served over NBD"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
}

#[derive(clap::Args)]
struct EngineArgs {
    /// Volume name; also the NBD export name.
    #[arg(long)]
    volume: String,
    /// Size when the volume is created (1G, 512M, bytes); may be omitted afterwards.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Replica daemon address; repeat for each replica.
    #[arg(long = "replica", required = true)]
    replicas: Vec<String>,
    /// TCP address for NBD clients.
    #[arg(long)]
    nbd_listen: Option<SocketAddr>,
    /// Unix socket for NBD clients.
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// Control socket (default /run/tether/VOLUME.sock).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Seconds a replica may take to answer before it is dropped.
    #[arg(long, default_value_t = 8.0)]
    timeout: f64,
    /// With fewer healthy replicas, writes fail with EIO instead of running on too few copies.
    #[arg(long, default_value_t = 1)]
    min_replicas: usize,
    /// Replicas wanted (default: as many as --replica); fewer healthy is shown as degraded.
    #[arg(long = "replicas")]
    desired_replicas: Option<usize>,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// The volume key: 32 bytes, 64 hex digits or a passphrase (else TETHER_ENCRYPTION_KEY).
    /// A new volume is created encrypted when a key is given; the mode is fixed then.
    #[arg(long)]
    encryption_key_file: Option<PathBuf>,
    /// Threads serving the volume's I/O. One handles a volume's whole request
    /// pipeline (NBD, sealing, replica streams) without cross-CPU hand-offs, which
    /// cost more per request than it gains from a second core on small writes.
    #[arg(long, default_value_t = 1)]
    io_threads: usize,
    #[command(flatten)]
    tls: TlsArgs,
    /// Certificate for NBD clients over TLS (NBD_OPT_STARTTLS); plaintext is then refused on TCP.
    #[arg(long, requires = "nbd_tls_key")]
    nbd_tls_cert: Option<PathBuf>,
    /// Private key for --nbd-tls-cert.
    #[arg(long, requires = "nbd_tls_cert")]
    nbd_tls_key: Option<PathBuf>,
}

/// Mutual TLS between engines and replicas.
#[derive(clap::Args, Clone, Default)]
struct TlsArgs {
    /// This side's certificate (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA that signs the other side's certificate: a replica refuses clients without one.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TlsCmd {
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
enum VolumeCmd {
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
}

#[derive(clap::Args)]
struct Target {
    /// Volume name.
    volume: String,
    /// The engine's control socket, if not the default.
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

impl Target {
    /// Maps an engine's error for `what` to a message naming the volume.
    fn failed<'a>(&'a self, what: &'a str) -> impl Fn(tonic::Status) -> anyhow::Error + Copy + 'a {
        move |e| anyhow::anyhow!("volume {}: {what} failed: {}", self.volume, e.message())
    }
}

#[derive(Subcommand)]
enum ReplicaCmd {
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
enum SnapshotCmd {
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
fn parse_size(s: &str) -> Result<u64, String> {
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

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let threads = match &cli.cmd {
        Cmd::Replica {
            cmd: None,
            io_threads,
            ..
        } => io_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() / 2)),
        Cmd::Engine(a) => a.io_threads,
        // Clients and `up` (which starts the daemons as processes) do little I/O.
        _ => 1,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Replica { cmd: Some(cmd), .. } => replica_cmd(cmd).await,
            Cmd::Replica {
                cmd: None,
                listen,
                data,
                wal_dir,
                wal_size,
                direct_limit,
                tls,
                ..
            } => {
                let (Some(listen), Some(data)) = (listen, data) else {
                    bail!("a replica daemon needs --listen ADDR and --data DIR (or use `tether replica add|rm`)");
                };
                if wal_size < 1 << 20 {
                    bail!("--wal-size must be at least 1M");
                }
                let opts = tether_replica::StoreOptions {
                    wal_dir,
                    wal_size,
                    direct_limit,
                    ..Default::default()
                };
                let tls = replica_tls(&tls)?;
                tether_replica::serve(listen, &data, opts, tls, shutdown_signal())
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))
            }
            Cmd::Engine(args) => run_engine(args).await,
            Cmd::Up(opts) => up(opts).await,
            Cmd::Tls {
                cmd: TlsCmd::Init { dir, hosts },
            } => {
                pki::init(&dir, &hosts)?;
                println!(
                    "wrote a CA and certificates to {}:\n  replicas:  tether replica --tls-cert {d}/server-cert.pem --tls-key {d}/server-key.pem --tls-ca {d}/ca-cert.pem ...\n  engine:    tether engine --tls-cert {d}/client-cert.pem --tls-key {d}/client-key.pem --tls-ca {d}/ca-cert.pem ...\n  NBD TLS:   --nbd-tls-cert {d}/server-cert.pem --nbd-tls-key {d}/server-key.pem; clients: nbds://HOST:PORT/VOLUME?tls-certificates={d}",
                    dir.display(),
                    d = dir.display()
                );
                Ok(())
            }
            Cmd::Volume { cmd } => volume_cmd(cmd).await,
            Cmd::Snapshot { cmd } => snapshot_cmd(cmd).await,
        }
    })
}

async fn run_engine(a: EngineArgs) -> Result<()> {
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let control_socket = a
        .control_socket
        .unwrap_or_else(|| control::default_socket(&a.volume));
    let encryption_key = crypt::load_key(a.encryption_key_file.as_deref())
        .with_context(|| format!("volume {}: loading the encryption key", a.volume))?;
    let replica_tls = engine_tls(&a.tls)?;
    let nbd_tls = match (&a.nbd_tls_cert, &a.nbd_tls_key) {
        (Some(c), Some(k)) => Some(tls::nbd_acceptor(c, k)?),
        _ => None,
    };
    let cfg = EngineConfig {
        volume: a.volume,
        size: a.size,
        replicas: a.replicas,
        nbd_listen: a.nbd_listen,
        nbd_socket: a.nbd_socket,
        control_socket,
        timeout: Duration::from_secs_f64(a.timeout),
        min_replicas: a.min_replicas,
        desired_replicas: a.desired_replicas.unwrap_or(0),
        metrics_listen: a.metrics_listen,
        encryption_key,
        replica_tls,
        nbd_tls,
    };
    tether_engine::run(cfg, shutdown_signal()).await?;
    Ok(())
}

async fn wait_for_port(addr: SocketAddr, child: &mut tokio::process::Child) -> Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("replica on {addr} exited with {status} before serving; see its log above");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("replica on {addr} did not start listening within 10 s")
}

fn terminate(child: &tokio::process::Child) {
    if let Some(pid) = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// The replica side of `TlsArgs`.
fn replica_tls(a: &TlsArgs) -> Result<Option<tether_replica::ServerTls>> {
    tls::install_provider();
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
        if a.tls_ca.is_some() {
            bail!("--tls-ca needs --tls-cert and --tls-key: the replica must present a certificate too");
        }
        return Ok(None);
    };
    let id = tls::Identity::load(cert, key, a.tls_ca.as_deref().unwrap_or(cert))?;
    Ok(Some(tether_replica::ServerTls {
        cert: id.cert,
        key: id.key,
        ca: a.tls_ca.as_ref().map(|_| id.ca),
    }))
}

/// The engine side of `TlsArgs`: all three are needed.
fn engine_tls(a: &TlsArgs) -> Result<Option<tls::Identity>> {
    tls::install_provider();
    match (&a.tls_cert, &a.tls_key, &a.tls_ca) {
        (None, None, None) => Ok(None),
        (Some(c), Some(k), Some(ca)) => Ok(Some(tls::Identity::load(c, k, ca)?)),
        _ => bail!("TLS towards replicas needs all of --tls-cert, --tls-key and --tls-ca"),
    }
}

/// What `tether up` runs.
#[derive(clap::Args)]
struct UpOptions {
    /// Directory for all data.
    #[arg(long, default_value = "./tether-data")]
    data: PathBuf,
    /// Volume name.
    #[arg(long, default_value = "demo")]
    volume: String,
    /// Volume size when first created (1G, 512M, bytes).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// NBD address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: SocketAddr,
    /// First of three consecutive ports for the replicas.
    #[arg(long, default_value_t = 17001)]
    replica_port: u16,
    /// Control socket (default: /run/tether/VOLUME.sock, or DATA/VOLUME.sock if /run is not writable).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// No encryption and no TLS between engine and replicas (for comparisons).
    #[arg(long)]
    plain: bool,
}

/// A random 32-byte key, hex, readable only by its owner.
fn make_key_file(path: &Path) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut k))
        .context("reading /dev/urandom for a volume key")?;
    let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the key file {}", path.display()))?;
    f.write_all(format!("{hex}\n").as_bytes())
        .with_context(|| format!("writing the key file {}", path.display()))
}

async fn up(o: UpOptions) -> Result<()> {
    let UpOptions {
        data,
        volume,
        size,
        nbd_listen,
        replica_port,
        control_socket,
        plain,
    } = o;
    std::fs::create_dir_all(&data)
        .with_context(|| format!("creating the data directory {}", data.display()))?;
    let exists = data
        .join("replica-1/volumes")
        .join(&volume)
        .join("meta")
        .exists();
    // Secure by default: a throwaway local CA for mutual TLS, and a volume key.
    let tls_dir = data.join("tls");
    let tls_args = if plain {
        TlsArgs::default()
    } else {
        if !tls_dir.join("ca-cert.pem").exists() {
            pki::init(&tls_dir, &[])?;
        }
        TlsArgs {
            tls_cert: Some(tls_dir.join("client-cert.pem")),
            tls_key: Some(tls_dir.join("client-key.pem")),
            tls_ca: Some(tls_dir.join("ca-cert.pem")),
        }
    };
    let key_path = data.join("keys").join(format!("{volume}.key"));
    if !plain && !exists && !key_path.exists() {
        make_key_file(&key_path)?;
    }
    let encryption_key = if key_path.exists() && (exists || !plain) {
        crypt::load_key(Some(&key_path))?
    } else {
        None
    };
    let exe = std::env::current_exe().context("finding the tether binary")?;
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3u16 {
        let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], replica_port + i));
        let dir = data.join(format!("replica-{}", i + 1));
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("replica")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data")
            .arg(&dir);
        if !plain {
            cmd.arg("--tls-cert")
                .arg(tls_dir.join("server-cert.pem"))
                .arg("--tls-key")
                .arg(tls_dir.join("server-key.pem"))
                .arg("--tls-ca")
                .arg(tls_dir.join("ca-cert.pem"));
        }
        let child = cmd
            .kill_on_drop(true)
            // Their own process group: Ctrl-C reaches only `up`, which stops the
            // engine first (final flush, clean close) and then the replicas.
            .process_group(0)
            .spawn()
            .context("starting a replica process")?;
        children.push(child);
        addrs.push(addr);
    }
    for (addr, child) in addrs.iter().zip(children.iter_mut()) {
        wait_for_port(*addr, child).await?;
    }
    let control_socket = control_socket.unwrap_or_else(|| {
        let default = control::default_socket(&volume);
        let usable = default
            .parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok() && writable(d));
        if usable {
            default
        } else {
            data.join(format!("{volume}.sock"))
        }
    });
    let cfg = EngineConfig {
        volume: volume.clone(),
        size: if exists { None } else { Some(size) },
        replicas: addrs.iter().map(|a| a.to_string()).collect(),
        nbd_listen: Some(nbd_listen),
        nbd_socket: None,
        control_socket: control_socket.clone(),
        timeout: Duration::from_secs(8),
        min_replicas: 1,
        desired_replicas: 3,
        metrics_listen: None,
        replica_tls: engine_tls(&tls_args)?,
        encryption_key,
        nbd_tls: None,
    };
    let security = match (&cfg.encryption_key, &cfg.replica_tls) {
        (Some(_), Some(_)) => format!(
            "Blocks are encrypted (AES-256-GCM, key in {}; keep a copy elsewhere: without it the data is gone).\nEngine and replicas talk mutual TLS (local CA in {}). NBD on loopback is plaintext.\n",
            key_path.display(),
            tls_dir.display()
        ),
        (None, Some(_)) => format!(
            "Engine and replicas talk mutual TLS (local CA in {}). This volume was created unencrypted.\n",
            tls_dir.display()
        ),
        (Some(_), None) => format!(
            "Blocks are encrypted (key in {}); --plain: no TLS between engine and replicas.\n",
            key_path.display()
        ),
        (None, None) => "--plain: no encryption, no TLS.\n".to_string(),
    };
    let port = nbd_listen.port();
    let host = nbd_listen.ip();
    let cs = control_socket.display();
    eprintln!(
        "\ntether is up: volume {volume} on 3 replicas ({}) under {}\n\
         \n  NBD URI:  nbd://{nbd_listen}/{volume}\n\
         \n  attach on Linux:  modprobe nbd && nbd-client {host} {port} /dev/nbd0 -N {volume}\
         \n  inspect:          nbdinfo nbd://{nbd_listen}/{volume}\
         \n  qemu:             qemu-img info nbd://{nbd_listen}/{volume}\
         \n  fio:              fio --name=t --ioengine=nbd --uri=nbd://{nbd_listen}/{volume} --rw=randwrite --bs=4k --size=256m\
         \n  status:           tether volume status {volume} --control-socket {cs}\
         \n\n{security}\
         \nCtrl-C stops everything; running `tether up` again serves the same data.\n",
        addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        data.display(),
        security = security
    );
    let result = tether_engine::run(cfg, shutdown_signal()).await;
    for c in &children {
        terminate(c);
    }
    for c in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
    }
    result?;
    Ok(())
}

fn writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".tether-probe-{}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

async fn engine(
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

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

async fn replica_cmd(cmd: ReplicaCmd) -> Result<()> {
    use tether_proto::engine::ReplicaRequest;
    match cmd {
        ReplicaCmd::Add { target, address } => {
            engine(&target)
                .await?
                .add_replica(ReplicaRequest {
                    address: address.clone(),
                })
                .await
                .map_err(target.failed("replica add"))?;
            println!(
                "replica {address} joins volume {} and rebuilds online; follow it with `tether volume status {}`",
                target.volume, target.volume
            );
        }
        ReplicaCmd::Rm { target, address } => {
            engine(&target)
                .await?
                .remove_replica(ReplicaRequest {
                    address: address.clone(),
                })
                .await
                .map_err(target.failed("replica rm"))?;
            println!("replica {address} removed from volume {}", target.volume);
        }
    }
    Ok(())
}

async fn snapshot_cmd(cmd: SnapshotCmd) -> Result<()> {
    use tether_proto::engine::SnapshotRequest;
    match cmd {
        SnapshotCmd::Create { target, name } => {
            let t = std::time::Instant::now();
            engine(&target)
                .await?
                .create_snapshot(SnapshotRequest { name: name.clone() })
                .await
                .map_err(target.failed("snapshot create"))?;
            println!(
                "snapshot {name} of {} taken in {} ms; read it at export {}@{name}",
                target.volume,
                t.elapsed().as_millis(),
                target.volume
            );
        }
        SnapshotCmd::Ls { target } => {
            let list = engine(&target)
                .await?
                .list_snapshots(SnapshotRequest {
                    name: String::new(),
                })
                .await
                .map_err(target.failed("snapshot ls"))?
                .into_inner();
            println!(
                "{:<24} {:>12} {:>12}  export",
                "name", "write seq", "allocated"
            );
            for s in list.snapshots {
                println!(
                    "{:<24} {:>12} {:>12}  {}@{}",
                    s.name,
                    s.seq,
                    human(s.allocated),
                    target.volume,
                    s.name
                );
            }
        }
        SnapshotCmd::Rm { target, name } => {
            engine(&target)
                .await?
                .delete_snapshot(SnapshotRequest { name: name.clone() })
                .await
                .map_err(target.failed("snapshot rm"))?;
            println!("snapshot {name} of {} deleted", target.volume);
        }
        SnapshotCmd::Revert { target, name } => {
            engine(&target)
                .await?
                .revert_snapshot(SnapshotRequest { name: name.clone() })
                .await
                .map_err(target.failed("snapshot revert"))?;
            println!(
                "volume {} now holds snapshot {name}'s contents",
                target.volume
            );
        }
    }
    Ok(())
}

async fn volume_cmd(cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Status { target, json } => status(&target, json).await,
        VolumeCmd::Expand { target, size } => {
            let r = engine(&target)
                .await?
                .expand(tether_proto::engine::ExpandRequest { size })
                .await
                .map_err(target.failed("expand"))?
                .into_inner();
            println!(
                "volume {} is now {} bytes; NBD clients see the new size when they reconnect",
                target.volume, r.size
            );
            Ok(())
        }
        VolumeCmd::Verify { target } => verify(&target).await,
    }
}

async fn verify(target: &Target) -> Result<()> {
    let fail = target.failed("verify");
    let mut stream = engine(target)
        .await?
        .verify(tether_proto::engine::VerifyRequest {})
        .await
        .map_err(fail)?
        .into_inner();
    let mut problems = 0;
    let started = std::time::Instant::now();
    while let Some(p) = stream.message().await.map_err(fail)? {
        for x in &p.problems {
            problems += 1;
            println!("block {}: replica {}: {}", x.block, x.replica, x.what);
        }
        let pct = if p.blocks_total == 0 {
            100.0
        } else {
            p.blocks_done as f64 * 100.0 / p.blocks_total as f64
        };
        eprint!(
            "\rverify {}: {:5.1}%  {} of {} blocks, {} problems, {:.0} s",
            target.volume,
            pct,
            p.blocks_done,
            p.blocks_total,
            problems,
            started.elapsed().as_secs_f64()
        );
        if p.done {
            eprintln!();
            break;
        }
    }
    if problems > 0 {
        bail!(
            "volume {}: verify found {problems} problem(s); see the blocks above",
            target.volume
        );
    }
    println!(
        "volume {}: all replicas agree and every checksum holds",
        target.volume
    );
    Ok(())
}

async fn status(target: &Target, json: bool) -> Result<()> {
    let mut client = engine(target).await?;
    let s = client
        .status(tether_proto::engine::StatusRequest {})
        .await
        .map_err(target.failed("status"))?
        .into_inner();
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
        return Ok(());
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
            let pct = if r.rebuild_total_blocks == 0 {
                0.0
            } else {
                r.rebuild_done_blocks as f64 * 100.0 / r.rebuild_total_blocks as f64
            };
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
    Ok(())
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
