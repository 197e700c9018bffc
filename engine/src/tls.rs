//! TLS material: the engine's client identity towards replicas (mutual TLS through
//! tonic) and the NBD server's certificate for `NBD_OPT_STARTTLS`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{what} {} holds no valid PEM {kind}: {detail}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

/// Makes ring the process-wide rustls provider; harmless when already done.
/// AES-128-GCM comes first: the links carry every replicated byte, AES-128 costs
/// about a quarter less CPU per byte than AES-256, and block contents are sealed
/// end to end with AES-256-GCM anyway.
pub fn install_provider() {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let _ = p.install_default();
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(what, path)?;
    let n = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            kind: "certificate",
            detail: e.to_string(),
        })?
        .len();
    if n == 0 {
        return Err(TlsError::Pem {
            what,
            path: path.to_path_buf(),
            kind: "certificate",
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(pem)
}

fn key(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what: "key",
        path: path.to_path_buf(),
        kind: "private key",
        detail: e.to_string(),
    })?;
    Ok(pem)
}

/// PEM material for one side of mutual TLS: own certificate and key, and the CA that
/// signs the peer.
#[derive(Clone)]
pub struct Identity {
    /// Certificate chain, PEM.
    pub cert: Vec<u8>,
    /// Private key, PEM.
    pub key: Vec<u8>,
    /// CA certificate(s) trusted for the peer, PEM.
    pub ca: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity(..)")
    }
}

impl Identity {
    /// Loads and checks `--tls-cert`, `--tls-key` and `--tls-ca`.
    pub fn load(cert: &Path, key_path: &Path, ca: &Path) -> Result<Identity, TlsError> {
        Ok(Identity {
            cert: certs("certificate", cert)?,
            key: key(key_path)?,
            ca: certs("CA certificate", ca)?,
        })
    }
}

impl Identity {
    /// A rustls client configuration presenting this identity and trusting only its
    /// CA, for replica data connections (tonic builds its own for gRPC).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        install_provider();
        let bad = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&self.ca) {
            roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| bad(&e))?;
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad(&e))?;
        // The replica serves gRPC (h2) and data connections on one port.
        cfg.alpn_protocols = vec![tether_proto::frame::ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// The NBD server's TLS acceptor.
#[derive(Clone)]
pub struct NbdTls(pub tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NbdTls(..)")
    }
}

/// A TLS acceptor for NBD clients from `--nbd-tls-cert` and `--nbd-tls-key`.
pub fn nbd_acceptor(cert: &Path, key_path: &Path) -> Result<NbdTls, TlsError> {
    install_provider();
    let pem = certs("NBD certificate", cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let key_pem = key(key_path)?;
    let k = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Config(e.to_string()))?;
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, k)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(NbdTls(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))))
}
