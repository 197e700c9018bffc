//! `tether tls init`: a small local CA and the certificates tether needs, so TLS is
//! one command (and `tether up` uses it by default).
//!
//! ```text
//! DIR/ca-cert.pem                       the CA (libnbd looks for this name)
//! DIR/ca-key.pem                        its key (sign more certificates with it)
//! DIR/server-cert.pem, server-key.pem   for replicas and the NBD server
//! DIR/client-cert.pem, client-key.pem   for engines (and libnbd clients)
//! ```

use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

fn write(path: &Path, body: &str, secret: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(body.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn san(name: &str) -> Result<SanType> {
    Ok(match name.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(
            name.to_string()
                .try_into()
                .with_context(|| format!("{name:?} is not a valid DNS name"))?,
        ),
    })
}

/// Creates a CA and server and client certificates in `dir`; the server certificate
/// is valid for localhost, 127.0.0.1, ::1 and `hosts`.
pub fn init(dir: &Path, hosts: &[String]) -> Result<()> {
    let names_of = [
        "ca-cert.pem",
        "ca-key.pem",
        "server-cert.pem",
        "server-key.pem",
        "client-cert.pem",
        "client-key.pem",
    ];
    if let Some(f) = names_of.iter().find(|f| dir.join(f).exists()) {
        anyhow::bail!(
            "{} already holds {f}: replacing a CA would break every certificate it signed; use another directory or remove it first",
            dir.display()
        );
    }
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "tether local CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    // Everything is made in memory first: a bad host name leaves no half-made directory.
    let mut files = vec![
        ("ca-cert.pem".to_string(), ca_cert.pem(), false),
        ("ca-key.pem".to_string(), ca_key.serialize_pem(), true),
    ];
    let issuer = Issuer::new(ca, ca_key);
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.extend(hosts.iter().cloned());
    let server = (
        names,
        ExtendedKeyUsagePurpose::ServerAuth,
        "server",
        "tether server",
    );
    let client = (
        vec!["tether-engine".to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
        "client",
        "tether engine",
    );
    for (sans, usage, base, cn) in [server, client] {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = sans.iter().map(|n| san(n)).collect::<Result<_>>()?;
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let k = KeyPair::generate()?;
        let cert = p.signed_by(&k, &issuer)?;
        files.push((format!("{base}-cert.pem"), cert.pem(), false));
        files.push((format!("{base}-key.pem"), k.serialize_pem(), true));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The CA goes last, so an interrupted run is not mistaken for a finished one.
    for (name, body, secret) in files.iter().rev() {
        write(&dir.join(name), body, *secret)?;
    }
    Ok(())
}
