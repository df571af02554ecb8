//! The TLS side of vMatrix's own APIs: a server's certificate and key (PEM), and, where only
//! one peer may call (an agent's API: the controller), the authority that must have signed the
//! client's certificate and the name it must carry. rustls with *ring*, TLS 1.2 and 1.3.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Why a TLS configuration could not be made; the message names the part that is wrong.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

/// The certificates in `pem` (leaf first), at least one.
pub fn certificates(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{what}: no certificate in it (PEM)")));
    }
    Ok(certs)
}

/// The private key in `pem` (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError(format!("{what}: {e}")))
}

/// The roots of trust made of the authority's certificate(s) in `pem`.
pub fn roots(what: &str, pem: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for c in certificates(what, pem)? {
        store
            .add(c)
            .map_err(|e| TlsError(format!("{what}: not an authority's certificate: {e}")))?;
    }
    Ok(store)
}

/// The crypto provider every vMatrix TLS end uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Who may call a server.
#[derive(Debug, Clone)]
pub enum Callers {
    /// Anyone (callers prove themselves with bearer tokens).
    Anyone,
    /// Anyone; a client certificate, where one is presented, must come from the authority in
    /// `authority` (PEM), and the handlers see it ([`PeerCertificate`]): the controller's API,
    /// where the agents present their machines' certificates and the CLI none.
    Optional { authority: String },
    /// Only a client whose certificate the authority in `authority` (PEM) signed and that is
    /// valid for DNS name `name`: an agent's API takes only the controller.
    Named { authority: String, name: String },
}

/// A server's TLS configuration: its certificate chain and key (PEM) and who may call it.
/// HTTP/1.1 only (WebSocket upgrades ride on it).
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    callers: &Callers,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = certificates("the server's certificate", cert_pem)?;
    let key = private_key("the server's key", key_pem)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("protocol versions: {e}")))?;
    let builder = match callers {
        Callers::Anyone => builder.with_no_client_auth(),
        Callers::Optional { authority } => {
            let roots = roots("the callers' authority", authority)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError(format!("the callers' authority: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        Callers::Named { authority, name } => {
            let roots = roots("the callers' authority", authority)?;
            let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError(format!("the callers' authority: {e}")))?;
            let name = ServerName::try_from(name.clone())
                .map_err(|e| TlsError(format!("caller name {name:?}: {e}")))?;
            builder.with_client_cert_verifier(Arc::new(NamedClient { inner, name }))
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(format!("the server's certificate with its key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificate (DER) a client presented and the authority verified, as a request
/// extension of every request on that connection.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Arc<[u8]>);

impl PeerCertificate {
    /// Whether the certificate is valid for DNS name `name` (a machine's).
    pub fn names(&self, name: &str) -> bool {
        let Ok(name) = ServerName::try_from(name.to_owned()) else {
            return false;
        };
        let der = CertificateDer::from(&self.0[..]);
        webpki::EndEntityCert::try_from(&der)
            .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
    }
}

/// A client verifier that also requires the certificate to be valid for one name: every
/// machine's certificate comes from the same authority, so the authority alone would let one
/// agent call another's API.
#[derive(Debug)]
struct NamedClient {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl ClientCertVerifier for NamedClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        cert.verify_is_valid_for_subject_name(&self.name)
            .map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
            })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client's TLS configuration: it trusts the authority in `authority` (PEM) only; the
/// server's certificate must be valid for `expect` where given (a machine's name: the
/// controller reaches an agent at an address, and the address proves nothing), else for the
/// host of the URL; it presents `identity` (certificate and key, PEM) where given.
pub fn client_config(
    authority: &str,
    expect: Option<&str>,
    identity: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = Arc::new(roots("the authority's certificate", authority)?);
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("protocol versions: {e}")))?;
    let builder = match expect {
        None => builder.with_root_certificates(roots),
        Some(name) => {
            let inner =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsError(format!("the authority's certificate: {e}")))?;
            let name = ServerName::try_from(name.to_owned())
                .map_err(|e| TlsError(format!("server name {name:?}: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ByName { inner, name }))
        }
    };
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certificates("the client's certificate", cert)?,
                private_key("the client's key", key)?,
            )
            .map_err(|e| TlsError(format!("the client's certificate with its key: {e}")))?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A server verifier that checks the certificate against one name, not the URL's host.
#[derive(Debug)]
struct ByName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for ByName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _reached_as: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An authority and certificates it signs (each for one DNS name), PEM.
    struct Authority {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    impl Authority {
        fn new(cn: &str) -> Self {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let cert = p.self_signed(&key).unwrap();
            Self { cert, key }
        }

        /// (certificate, key) for `name`.
        fn sign(&self, name: &str) -> (String, String) {
            let key = rcgen::KeyPair::generate().unwrap();
            let p = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
            let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    /// Serves "ok" over TLS as `server_name`, taking only callers named `caller`.
    async fn server(ca: &Authority, server_name: &str, caller: &str) -> std::net::SocketAddr {
        let (cert, key) = ca.sign(server_name);
        let callers = Callers::Named {
            authority: ca.cert.pem(),
            name: caller.to_owned(),
        };
        let tls = server_config(&cert, &key, &callers).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(crate::serve_api(
            listener,
            app,
            crate::ApiLimits::default(),
            Some(tls),
        ));
        addr
    }

    /// One GET over TLS with `config`: the reply's status line, or the error.
    async fn get(
        addr: std::net::SocketAddr,
        config: rustls::ClientConfig,
    ) -> Result<String, String> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Reached by address: only a verifier by name can accept the server.
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(5), tls.read_to_string(&mut reply))
            .await
            .map_err(|_| "no reply within 5 s".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok(reply.lines().next().unwrap_or_default().to_owned())
    }

    /// An agent's API (served as `rm1`, callers named `controller.vmatrix`) answers the
    /// controller's certificate; it refuses a client with none, another machine's certificate
    /// of the same authority, and a certificate with the right name from another authority. The
    /// client refuses a server whose certificate names another machine.
    #[tokio::test]
    async fn only_the_named_caller_of_the_authority_is_served() {
        let ca = Authority::new("test authority");
        let other_ca = Authority::new("another authority");
        let addr = server(&ca, "rm1", "controller.vmatrix").await;
        let (cc, ck) = ca.sign("controller.vmatrix");
        let (mc, mk) = ca.sign("rm2");
        let (fc, fk) = other_ca.sign("controller.vmatrix");
        let authority = ca.cert.pem();

        let ok = client_config(&authority, Some("rm1"), Some((&cc, &ck))).unwrap();
        assert_eq!(get(addr, ok).await.unwrap(), "HTTP/1.1 200 OK");

        let cases = [
            (
                "no certificate",
                client_config(&authority, Some("rm1"), None),
            ),
            (
                "another machine's",
                client_config(&authority, Some("rm1"), Some((&mc, &mk))),
            ),
            (
                "another authority's",
                client_config(&authority, Some("rm1"), Some((&fc, &fk))),
            ),
        ];
        for (what, config) in cases {
            let r = get(addr, config.unwrap()).await;
            assert!(r.is_err(), "{what}: served: {r:?}");
        }

        // The server is rm1: a client expecting rm3 hangs up on it.
        let wrong = client_config(&authority, Some("rm3"), Some((&cc, &ck))).unwrap();
        let e = get(addr, wrong).await.unwrap_err();
        assert!(
            e.contains("NotValidForName") || e.contains("not valid"),
            "{e}"
        );
        // And a client trusting another authority too.
        let stranger = client_config(&other_ca.cert.pem(), Some("rm1"), Some((&cc, &ck))).unwrap();
        assert!(get(addr, stranger).await.is_err());
    }

    #[test]
    fn bad_pem_is_named() {
        let e = server_config("no pem here", "", &Callers::Anyone).unwrap_err();
        assert!(e.to_string().contains("the server's certificate"), "{e}");
        let e = client_config("", None, None).unwrap_err();
        assert!(e.to_string().contains("authority"), "{e}");
    }
}
