//! HTTPS at the switch: rustls with an operator's certificate chain and key (PEM), ALPN `h2`
//! then `http/1.1`. Instances behind it speak plain HTTP on the service network.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where and with what the switch serves HTTPS.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// The HTTPS address.
    pub listen: SocketAddr,
    /// The certificate chain, PEM (leaf first).
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

fn bad(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what)
}

/// The acceptor for `config`, or a clear error naming the file that is wrong.
pub(crate) fn acceptor(config: &TlsConfig) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert)
        .map_err(|e| bad(format!("--tls-cert {}: {e}", config.cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("--tls-cert {}: {e}", config.cert.display())))?;
    if certs.is_empty() {
        return Err(bad(format!(
            "--tls-cert {}: no certificate in it (PEM, leaf first)",
            config.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .map_err(|e| bad(format!("--tls-key {}: {e}", config.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            bad(format!(
                "--tls-cert {} with --tls-key {}: {e}",
                config.cert.display(),
                config.key.display()
            ))
        })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}
