//! The matrix's certificate authority. Made by the first controller that needs it and kept in
//! the state store (so every controller of an HA group signs with the same one), it signs one
//! certificate per machine: the agent makes its key and sends a request with its machine
//! credential; the certificate names the machine that credential belongs to (`CN=NAME` and a
//! DNS name), whatever the request asked. QEMU uses these certificates on the live-migration
//! data path ([`vmatrix_vmm::MigrationTls`]): a destination admits only the source it was
//! told, a source checks it reached the destination it meant.
//!
//! Forgetting a machine (`vmatrix machine forget`) takes its credential back; the certificate
//! it had still proves the name until the authority is replaced — there is no revocation list
//! (QEMU reads none).

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use vmatrix_core::api::CertificateReply;

use crate::control::{ControlError, Controller, Result};

/// How long a machine's certificate, and the authority's, hold (QEMU reads a machine's when
/// it starts and keeps it: a VM may run for years).
const VALID_DAYS: i64 = 3650;

/// The authority, loaded.
pub(crate) struct Authority {
    pem: String,
    key: KeyPair,
    issuer: rcgen::Certificate,
}

fn validity(p: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back: hosts whose clocks differ a little still agree that it is valid.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(VALID_DAYS);
}

fn internal(what: &str, e: rcgen::Error) -> ControlError {
    ControlError::Conflict(format!("the matrix's certificate authority: {what}: {e}"))
}

impl Authority {
    /// A new authority: (certificate, key), PEM.
    fn create() -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(|e| internal("making its key", e))?;
        let mut p = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| internal("its parameters", e))?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, "vMatrix machine authority");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut p);
        let cert = p.self_signed(&key).map_err(|e| internal("signing it", e))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn load(pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| internal("reading its key", e))?;
        // rcgen signs with parameters: those of the stored certificate, with its key.
        let issuer = CertificateParams::from_ca_cert_pem(pem)
            .map_err(|e| internal("reading its certificate", e))?
            .self_signed(&key)
            .map_err(|e| internal("loading it", e))?;
        Ok(Self {
            pem: pem.to_owned(),
            key,
            issuer,
        })
    }

    /// Machine `name`'s certificate for the key behind `csr` (PEM; its signature proves the
    /// caller holds the key).
    fn sign(&self, name: &str, csr: &str) -> Result<String> {
        let request = CertificateSigningRequestParams::from_pem(csr).map_err(|e| {
            ControlError::BadRequest(format!(
                "the certificate request is not a PKCS#10 request in PEM signed by its key: {e}"
            ))
        })?;
        let p = CertificateParams::new(vec![name.to_owned()])
            .map_err(|e| ControlError::BadRequest(format!("machine name {name:?}: {e}")))?;
        self.finish(p, name, &request.public_key)
    }

    /// A certificate (PEM) for `key`, named `cn` and valid for `names` (DNS names, or IP
    /// addresses where they parse as one), for servers and clients alike.
    fn issue(&self, cn: &str, names: &[String], key: &impl rcgen::PublicKeyData) -> Result<String> {
        let p = CertificateParams::new(names.to_vec())
            .map_err(|e| internal(&format!("a certificate for {names:?}"), e))?;
        self.finish(p, cn, key)
    }

    /// Signs `p` for `key`, named `cn`, for servers and clients alike.
    fn finish(
        &self,
        mut p: CertificateParams,
        cn: &str,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<String> {
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut p);
        let cert = p
            .signed_by(key, &self.issuer, &self.key)
            .map_err(|e| internal("signing a certificate", e))?;
        Ok(cert.pem())
    }
}

/// Where the controller keeps its authority and its own certificate when it serves HTTPS
/// (`DATA/controller/tls`), and the names its certificate carries besides
/// [`CONTROLLER_TLS_NAME`], `localhost` and its listen addresses.
#[derive(Debug, Clone)]
pub struct ControllerTls {
    /// The directory (0700): `ca-cert.pem` and `ca-key.pem` (the authority: made here when
    /// neither is there, or the operator's own), `controller-cert.pem` and
    /// `controller-key.pem` (made at every start).
    pub dir: std::path::PathBuf,
    /// More names clients reach the controller by (host names, addresses).
    pub names: Vec<String>,
}

/// The controller's TLS, made at start: the authority (from the directory), the server side
/// of its API and the client side of its calls to agents.
pub(crate) struct Secured {
    pub(crate) authority: std::sync::Arc<Authority>,
    pub(crate) server: std::sync::Arc<rustls::ServerConfig>,
    cert: String,
    key: String,
    /// One client per machine: each checks that the agent it reaches proves that machine's
    /// name (whatever the address).
    agents: std::sync::Mutex<std::collections::HashMap<String, reqwest::Client>>,
}

fn file_error(path: &std::path::Path, e: impl std::fmt::Display) -> ControlError {
    ControlError::Conflict(format!("{}: {e}", path.display()))
}

impl Secured {
    /// Loads the authority in `tls.dir` (making one where there is none) and issues the
    /// controller's certificate for its names and `listens`.
    pub(crate) fn prepare(tls: &ControllerTls, listens: &[std::net::SocketAddr]) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = &tls.dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| file_error(dir, e))?;
        let (cert_file, key_file) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        let (pem, key_pem) = match (cert_file.exists(), key_file.exists()) {
            (true, true) => (
                std::fs::read_to_string(&cert_file).map_err(|e| file_error(&cert_file, e))?,
                std::fs::read_to_string(&key_file).map_err(|e| file_error(&key_file, e))?,
            ),
            (false, false) => {
                let (pem, key) = Authority::create()?;
                // The key first: a certificate without its key is not an authority.
                crate::write_secret(&key_file, &key).map_err(|e| file_error(&key_file, e))?;
                crate::write_secret(&cert_file, &pem).map_err(|e| file_error(&cert_file, e))?;
                tracing::info!(
                    "made the matrix's certificate authority in {}",
                    dir.display()
                );
                (pem, key)
            }
            (has_cert, _) => {
                return Err(ControlError::Conflict(format!(
                    "{} has {} but not {}: put both (an authority of your own) or neither \
                     (the controller makes one)",
                    dir.display(),
                    if has_cert {
                        "ca-cert.pem"
                    } else {
                        "ca-key.pem"
                    },
                    if has_cert {
                        "ca-key.pem"
                    } else {
                        "ca-cert.pem"
                    },
                )))
            }
        };
        let authority = std::sync::Arc::new(Authority::load(&pem, &key_pem)?);
        let mut names = vec![
            vmatrix_core::api::CONTROLLER_TLS_NAME.to_owned(),
            "localhost".to_owned(),
        ];
        for a in listens {
            let ip = a.ip();
            if ip.is_unspecified() {
                names.push("127.0.0.1".into());
            } else {
                names.push(ip.to_string());
            }
        }
        names.extend(tls.names.iter().cloned());
        names.dedup();
        let key = KeyPair::generate().map_err(|e| internal("making the controller's key", e))?;
        let cert = authority.issue("vMatrix controller", &names, &key)?;
        let key = key.serialize_pem();
        for (file, text) in [("controller-key.pem", &key), ("controller-cert.pem", &cert)] {
            let path = dir.join(file);
            crate::write_secret(&path, text).map_err(|e| file_error(&path, e))?;
        }
        let server =
            // Agents present their machines' certificates (a heartbeat must), the CLI none.
            vmatrix_serve::tls::server_config(
                &cert,
                &key,
                &vmatrix_serve::Callers::Optional {
                    authority: pem.clone(),
                },
            )
                .map_err(|e| ControlError::Conflict(e.to_string()))?;
        tracing::info!("the API serves HTTPS as {}", names.join(", "));
        Ok(Self {
            authority,
            server,
            cert,
            key,
            agents: Default::default(),
        })
    }

    /// The client that calls machine `name`'s agent: it trusts only the authority, takes only
    /// a certificate naming `name`, and proves the controller with its own.
    pub(crate) fn agent_client(&self, name: &str) -> Result<reqwest::Client> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = agents.get(name) {
            return Ok(c.clone());
        }
        let config = self.agent_tls(name)?;
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(2))
            .use_preconfigured_tls(config)
            .build()
            .map_err(|e| ControlError::Conflict(format!("a client of agent {name}: {e}")))?;
        agents.insert(name.to_owned(), client.clone());
        Ok(client)
    }

    /// The TLS configuration of a connection to machine `name`'s agent.
    pub(crate) fn agent_tls(&self, name: &str) -> Result<rustls::ClientConfig> {
        vmatrix_serve::tls::client_config(
            &self.authority.pem,
            Some(name),
            Some((&self.cert, &self.key)),
        )
        .map_err(|e| ControlError::Conflict(format!("reaching agent {name}: {e}")))
    }
}

impl Controller {
    /// The authority: the one in the TLS directory where the API serves HTTPS, else the
    /// state store's, made and stored on first use.
    fn authority(&self) -> Result<std::sync::Arc<Authority>> {
        if let Some(s) = self.secured.get() {
            return Ok(s.authority.clone());
        }
        let mut cached = self.authority.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = cached.as_ref() {
            return Ok(a.clone());
        }
        let (pem, key) = match self.db(|d| d.authority())? {
            Some(kept) => kept,
            None => {
                let (pem, key) = Authority::create()?;
                // Another controller may have stored one meanwhile: the stored one wins.
                self.db(|d| d.add_authority(&pem, &key))?;
                self.db(|d| d.authority())?.ok_or_else(|| {
                    ControlError::Conflict("the certificate authority was not stored".into())
                })?
            }
        };
        let a = std::sync::Arc::new(Authority::load(&pem, &key)?);
        *cached = Some(a.clone());
        Ok(a)
    }

    /// Signs a certificate for machine `machine` (known from its credential).
    pub(crate) fn certificate(&self, machine: &str, csr: &str) -> Result<CertificateReply> {
        let authority = self.authority()?;
        let certificate = authority.sign(machine, csr)?;
        self.event(
            machine,
            "certificate",
            "for the live-migration data path",
            "ok",
        );
        Ok(CertificateReply {
            certificate,
            authority: authority.pem.clone(),
        })
    }
}
