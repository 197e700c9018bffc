//! `tether`: the one binary with every role as a subcommand. This file only parses
//! the command line, sizes the runtime and dispatches; each command family lives in
//! its own module.

use anyhow::{Context, Result};
use clap::Parser;

mod backup;
mod cli;
mod daemon;
mod pki;
mod render;
mod replica;
mod snapshot;
mod standby;
mod tls;
mod up;
mod volume;

use cli::{Cli, Cmd, TlsCmd};

/// Runs the command; an error is printed as its chain of causes, for people, without
/// a backtrace (those are for bugs, and an error here is an answer).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Keeps buffers of up to 32 MiB on the heap and freed memory in the process. By
/// default glibc maps each buffer of 128 KiB or more afresh and unmaps it when freed
/// (until its dynamic threshold has grown), and trims the heap at 128 KiB: a 1 MiB
/// write then cost a fresh mapping, 256 page faults and zeroing of every page, about a
/// fifth of the engine's time on 1 MiB writes (`perf`, issue 19).
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

fn run() -> Result<()> {
    tune_allocator();
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
        // A restore runs an engine and opens chunks on this runtime.
        Cmd::Backup { .. } => 2,
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
            Cmd::Replica { cmd: Some(cmd), .. } => replica::replica_cmd(cmd).await,
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
                let opts = tether_replica::StoreOptions {
                    wal_dir,
                    wal_size,
                    direct_limit,
                    ..Default::default()
                };
                daemon::run_replica(listen, data, opts, &tls).await
            }
            Cmd::Engine(args) => daemon::run_engine(args).await,
            Cmd::Up(opts) => up::up(opts).await,
            Cmd::Tls {
                cmd: TlsCmd::Init { dir, hosts },
            } => tls::init(&dir, &hosts),
            Cmd::Volume { cmd } => volume::volume_cmd(cmd).await,
            Cmd::Snapshot { cmd } => snapshot::snapshot_cmd(cmd).await,
            Cmd::Backup { cmd } => backup::backup_cmd(cmd).await,
        }
    })
}
