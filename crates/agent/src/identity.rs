//! The machine's credential: asked of the controller once (a join, with the join token), kept
//! in the agent's data directory (`credential`, mode 0600), carried by every heartbeat, and the
//! only bearer the agent's API accepts (the controller shows it with each command). A restarted
//! agent uses the one it kept; a controller that no longer knows it (its state was lost) says
//! so, and the agent joins again.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

use vmatrix_client::{ClientError, ControllerClient};
use vmatrix_core::api::AgentReport;

/// What the agent proves itself with, and how it gets it.
pub(crate) struct Identity {
    path: PathBuf,
    current: RwLock<String>,
    joiner: ControllerClient,
}

impl Identity {
    /// The credential kept in `data`, if any; `join_token` asks for a new one.
    pub(crate) fn load(
        data: &std::path::Path,
        link: &crate::http::ControllerLink,
        join_token: String,
    ) -> Self {
        let path = data.join("credential");
        let kept = std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Self {
            path,
            current: RwLock::new(kept),
            joiner: link.client(join_token),
        }
    }

    /// The credential (empty before the first join).
    pub(crate) fn current(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether an `Authorization` header carries the credential.
    pub(crate) fn matches(&self, authorization: Option<&str>) -> bool {
        vmatrix_core::auth::bearer_matches(authorization, &self.current())
    }

    /// Joins as `report`'s machine and keeps the credential. A refusal (a name that has
    /// joined already, a bad report, a wrong join token) is returned as it is.
    pub(crate) async fn join(&self, report: &AgentReport) -> Result<(), ClientError> {
        let reply = self.joiner.join(report).await?;
        if let Err(e) = write_private(&self.path, &reply.credential) {
            // Kept in memory all the same: this process can go on; a restart will join again
            // and be refused, which says what to fix.
            tracing::error!(
                "keeping the machine's credential in {}: {e}",
                self.path.display()
            );
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = reply.credential;
        Ok(())
    }

    /// Joins unless a credential was kept, retrying while the controller cannot be reached
    /// (it may be starting) or the name waits for an operator's approval; any other refusal
    /// ends the agent with the controller's reason.
    pub(crate) async fn ensure(&self, report: impl Fn() -> AgentReport) -> std::io::Result<()> {
        let mut warned = false;
        let mut waiting = false;
        while self.current().is_empty() {
            match self.join(&report()).await {
                Ok(()) => tracing::info!("joined the controller as {}", report().name),
                // A new name waits for an operator's approval: ask again until it comes.
                Err(e @ ClientError::Refused { status: 403, .. }) => {
                    if !waiting {
                        tracing::warn!("{e}");
                        waiting = true;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e @ ClientError::Refused { .. }) => {
                    return Err(std::io::Error::other(format!(
                        "joining as machine {}: {e}",
                        report().name
                    )))
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!("joining: {e}; trying again every second");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        Ok(())
    }
}

/// Writes `text` to `path` with mode 0600, durably (a temporary file renamed over it).
pub(crate) fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
