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
        let mut p = CertificateParams::new(vec![name.to_owned()])
            .map_err(|e| ControlError::BadRequest(format!("machine name {name:?}: {e}")))?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut p);
        let cert = p
            .signed_by(&request.public_key, &self.issuer, &self.key)
            .map_err(|e| internal("signing a machine's certificate", e))?;
        Ok(cert.pem())
    }
}

impl Controller {
    /// The authority, made and stored on first use.
    fn authority(&self) -> Result<std::sync::Arc<Authority>> {
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
