//! The machine's certificate for the live-migration data path: the agent makes a key, asks
//! the matrix's authority (the controller, with the machine's credential) to sign it, and keeps
//! both in `DATA/tls` (0700; files 0600, root's: QEMU reads them before it drops to its own
//! user) under the names QEMU's TLS credentials look for. Asked again after every join: a
//! controller that lost its state has a new authority.

use std::path::{Path, PathBuf};

use vmatrix_client::ControllerClient;
use vmatrix_core::api::CertificateRequest;
use vmatrix_vmm::MigrationTls;

/// The directory, under the agent's data directory.
fn dir(data: &Path) -> PathBuf {
    data.join("tls")
}

/// The machine's credentials, if it has them.
pub(crate) fn kept(data: &Path, name: &str) -> Option<MigrationTls> {
    let dir = dir(data);
    // The authority's file is written last: with it, the others are there.
    dir.join("ca-cert.pem").exists().then(|| MigrationTls {
        dir,
        name: name.to_owned(),
    })
}

/// Makes a key, has it signed through `client` (carrying the machine's credential: the
/// certificate names that machine) and keeps both in `data`.
pub(crate) async fn obtain(client: &ControllerClient, data: &Path) -> std::io::Result<()> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::other(format!("the machine's certificate: {what}: {e}"))
    };
    let key = rcgen::KeyPair::generate().map_err(|e| fail("making a key", &e))?;
    // The request only proves the key: the controller names the certificate after the
    // machine whose credential asks, whatever a request says.
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| fail("its request", &e))?;
    let reply = client
        .certificate(&CertificateRequest { csr })
        .await
        .map_err(|e| fail("asking the controller", &e))?;
    let dir = dir(data);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
    }
    // The authority's file goes last, and first away: without it the rest is not used.
    let _ = std::fs::remove_file(dir.join("ca-cert.pem"));
    let key_pem = key.serialize_pem();
    for (file, text) in [
        ("server-key.pem", key_pem.as_str()),
        ("client-key.pem", key_pem.as_str()),
        ("server-cert.pem", reply.certificate.as_str()),
        ("client-cert.pem", reply.certificate.as_str()),
        ("ca-cert.pem", reply.authority.as_str()),
    ] {
        crate::identity::write_private(&dir.join(file), text)?;
    }
    Ok(())
}

/// The agent's API over TLS with the machine's kept certificate (`kept`), to the controller
/// alone: a client certificate from the same authority that names the controller.
pub(crate) fn api_server(
    kept: &MigrationTls,
) -> Result<std::sync::Arc<rustls::ServerConfig>, vmatrix_serve::TlsError> {
    let read = |file: &str| {
        let path = kept.dir.join(file);
        std::fs::read_to_string(&path)
            .map_err(|e| vmatrix_serve::TlsError(format!("{}: {e}", path.display())))
    };
    vmatrix_serve::tls::server_config(
        &read("server-cert.pem")?,
        &read("server-key.pem")?,
        &vmatrix_serve::Callers::Named {
            authority: read("ca-cert.pem")?,
            name: vmatrix_core::api::CONTROLLER_TLS_NAME.to_owned(),
        },
    )
}
