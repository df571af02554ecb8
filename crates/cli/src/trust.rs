//! TLS on the control plane, as the commands see it: how the controller serves its API
//! (`--plain-http`, `--tls-name`), and which authority a client of an `https` controller
//! trusts (`--ca` / `VMATRIX_CA`, else the one the controller keeps in its data directory).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

/// How the controller serves its API.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ApiTls {
    /// Serve the API (and call the agents) over plain HTTP: tokens, credentials and commands
    /// then travel in the clear. Only for a network protected by other means.
    #[arg(long)]
    pub plain_http: bool,
    /// A name (host name or address) clients reach the controller by, put in its certificate
    /// besides its listen addresses and `localhost`; repeat for more.
    #[arg(long = "tls-name", value_name = "NAME")]
    pub tls_names: Vec<String>,
}

impl ApiTls {
    /// The URL scheme of the API.
    pub fn scheme(&self) -> &'static str {
        if self.plain_http {
            "http"
        } else {
            "https"
        }
    }

    /// The controller's TLS settings, its files in `data`'s `controller/tls`.
    pub fn config(&self, data: &Path) -> Option<vmatrix_controller::ControllerTls> {
        (!self.plain_http).then(|| vmatrix_controller::ControllerTls {
            dir: authority_dir(data),
            names: self.tls_names.clone(),
        })
    }

    /// The flags that give a child controller these settings.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.plain_http {
            a.push("--plain-http".to_owned());
        }
        for n in &self.tls_names {
            a.extend(["--tls-name".to_owned(), n.clone()]);
        }
        a
    }
}

/// Where the controller of `data` keeps its authority and certificate.
pub fn authority_dir(data: &Path) -> PathBuf {
    data.join("controller/tls")
}

/// The authority's certificate file of the controller of `data`.
pub fn authority_file(data: &Path) -> PathBuf {
    authority_dir(data).join("ca-cert.pem")
}

/// The authority (PEM) a client of the controller at `base` trusts: the file `ca` where given,
/// else, for an `https` controller, the one its controller keeps in `data`; none for `http`.
pub fn authority(ca: Option<&Path>, data: &Path, base: &str) -> Result<Option<String>> {
    if let Some(f) = ca {
        return std::fs::read_to_string(f)
            .map(Some)
            .with_context(|| format!("--ca {}: reading the authority's certificate", f.display()));
    }
    if !base.split(',').any(|b| b.trim().starts_with("https://")) {
        return Ok(None);
    }
    let f = authority_file(data);
    std::fs::read_to_string(&f).map(Some).map_err(|e| {
        anyhow!(
            "the controller at {base} serves HTTPS and its authority's certificate is not in {} \
             ({e}): give it with --ca FILE or VMATRIX_CA (the controller's \
             DATA/controller/tls/ca-cert.pem)",
            f.display()
        )
    })
}
