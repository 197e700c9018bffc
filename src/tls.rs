//! `tether tls init`: a local CA and certificates for replicas, engines and NBD.

use std::path::Path;

use anyhow::Result;

use crate::pki;

/// Writes a CA and certificates under `dir` and says which flags use them.
pub(crate) fn init(dir: &Path, hosts: &[String]) -> Result<()> {
    pki::init(dir, hosts)?;
    println!(
        "wrote a CA and certificates to {}:\n  replicas:  tether replica --tls-cert {d}/server-cert.pem --tls-key {d}/server-key.pem --tls-ca {d}/ca-cert.pem ...\n  engine:    tether engine --tls-cert {d}/client-cert.pem --tls-key {d}/client-key.pem --tls-ca {d}/ca-cert.pem ...\n  NBD TLS:   --nbd-tls-cert {d}/server-cert.pem --nbd-tls-key {d}/server-key.pem; clients: nbds://HOST:PORT/VOLUME?tls-certificates={d}",
        dir.display(),
        d = dir.display()
    );
    Ok(())
}
