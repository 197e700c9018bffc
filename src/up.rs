//! `tether up`: three local replicas and an engine on loopback, secure by default.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tether_engine::{control, crypt, EngineConfig};

use crate::cli::{TlsArgs, UpOptions};
use crate::daemon::{engine_tls, shutdown_signal};
use crate::pki;

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

/// Runs `tether up` until Ctrl-C.
pub(crate) async fn up(o: UpOptions) -> Result<()> {
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
        quorum_wait: Duration::from_secs(30),
        rebuild_rate: 0,
        schedule: None,
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
