//! `tether up`: three replicas and an engine from one command; Ctrl-C stops them
//! cleanly and the next run serves the same data.

// Test code: a failed step stops the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::process::{Command, Stdio};

fn up(dir: &std::path::Path, nbd: u16, replica_port: u16) -> std::process::Child {
    let mut child = Command::new(BIN)
        .args(["up", "--size", "64M", "--data"])
        .arg(dir.join("data"))
        .args(["--nbd-listen", &format!("127.0.0.1:{nbd}")])
        .args(["--replica-port", &replica_port.to_string()])
        .arg("--control-socket")
        .arg(dir.join("demo.sock"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("up-{nbd}.log"))).unwrap())
        .spawn()
        .unwrap();
    wait_port(
        format!("127.0.0.1:{nbd}").parse().unwrap(),
        &mut child,
        "tether up",
    );
    child
}

#[test]
fn up_serves_stops_on_ctrl_c_and_keeps_data() {
    let dir = tempfile::Builder::new()
        .prefix("tether-up")
        .tempdir_in(test_root())
        .unwrap();
    // Three consecutive free ports for the replicas: probe a few bases.
    let base = (0..50)
        .map(|_| free_port())
        .find(|&p| {
            p < 65000 && (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok())
        })
        .unwrap();
    let nbd = free_port();
    let mut child = up(dir.path(), nbd, base);
    let addr = format!("127.0.0.1:{nbd}").parse().unwrap();
    let mut c = NbdClient::connect(addr, "demo").unwrap();
    assert_eq!(c.size, 64 << 20);
    assert_eq!(c.write(8192, &[0x5a; 12288]).unwrap(), 0);
    drop(c);
    let st = run(Command::new(BIN)
        .args(["volume", "status", "demo", "--control-socket"])
        .arg(dir.path().join("demo.sock")));
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(text.contains("3 of 3 healthy"), "{text}");
    assert!(
        text.contains("encryption aes-256-gcm (32-byte key), replicas over mutual TLS"),
        "{text}"
    );

    run(Command::new("kill").args(["-INT", &child.id().to_string()]));
    let status = child.wait().unwrap();
    assert!(status.success(), "tether up exited with {status}");
    let log = std::fs::read_to_string(dir.path().join(format!("up-{nbd}.log"))).unwrap();
    assert_eq!(
        log.matches("engine closed the volume cleanly").count(),
        3,
        "{log}"
    );
    assert!(!log.contains("WARN"), "{log}");
    // Secure by default: mutual TLS with a local CA, and an encrypted volume.
    let data = dir.path().join("data");
    assert!(data.join("tls/ca-cert.pem").exists() && data.join("keys/demo.key").exists());
    assert!(
        log.contains("replica requires TLS with client certificates"),
        "{log}"
    );
    assert!(log.contains("creating an encrypted volume"), "{log}");
    let plain = vec![0x5a; 4096];
    for i in 1..=3 {
        let vol = data.join(format!("replica-{i}/volumes/demo"));
        for f in ["wal", "layers/1.data"] {
            let bytes = std::fs::read(vol.join(f)).unwrap();
            assert!(
                !bytes.windows(4096).any(|w| w == plain.as_slice()),
                "plaintext in replica-{i}/{f}"
            );
        }
    }

    let mut child = up(dir.path(), nbd, base);
    let mut c = NbdClient::connect(addr, "demo").unwrap();
    assert_eq!(c.read(8192, 12288).unwrap().unwrap(), vec![0x5a; 12288]);
    drop(c);
    run(Command::new("kill").args(["-INT", &child.id().to_string()]));
    assert!(child.wait().unwrap().success());
}
