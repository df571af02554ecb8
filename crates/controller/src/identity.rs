//! Who a machine is. A machine joins once, with the join token (or the operator's), and gets a
//! credential of its own, bound to its name; from then on its heartbeats must carry that
//! credential, and the controller's commands to its agent carry it too. A heartbeat for a
//! name from anyone else — a forged report, or a second agent started with the same name — is
//! refused, and so is a second join of a name that has a credential. A new name joins only once
//! an operator has approved it (`vmatrix machine approve NAME`; until then it is listed as
//! pending), unless the controller approves every name (`--auto-approve`, as `vmatrix up` runs
//! it). `vmatrix machine forget NAME` takes a machine's credential and approval back: its agent
//! must join — and be approved — again.

use vmatrix_core::api::{AgentReport, JoinReply};

use crate::control::{ControlError, Controller, Result};

/// 40 hex digits from the kernel's random source: tokens and machine credentials.
pub(crate) fn random_secret() -> std::io::Result<String> {
    let mut seed = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
    Ok(blake3::hash(&seed).to_hex()[..40].to_string())
}

impl Controller {
    /// Sets the token new machines join with (empty: only the operator's token joins one).
    pub fn set_join_token(&self, token: String) {
        *self.join_token.lock().unwrap_or_else(|p| p.into_inner()) = token;
    }

    /// Lets every new machine name join without an operator's approval.
    pub fn set_auto_approve(&self, on: bool) {
        self.auto_approve
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The operator approves machine name `name` to join.
    pub fn approve(&self, name: &str) -> Result<()> {
        vmatrix_core::MachineName::new(name)
            .map_err(|e| ControlError::BadRequest(e.to_string()))?;
        self.db(|d| d.approve(name, crate::control::now_ms()))?;
        self.event(
            "operator",
            &format!("approve {name}"),
            "an operator's decision",
            "ok",
        );
        Ok(())
    }

    /// The operator takes machine `name`'s credential and approval back.
    pub fn forget(&self, name: &str) -> Result<()> {
        if !self.db(|d| d.forget(name))? {
            return Err(ControlError::NotFound(format!(
                "machine {name} has no credential, approval or request to join"
            )));
        }
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.event(
            "operator",
            &format!("forget {name}"),
            "an operator's decision",
            "ok: its agent must join again",
        );
        Ok(())
    }

    /// Names that asked to join and wait for an operator.
    pub fn pending(&self) -> Result<Vec<vmatrix_core::api::PendingMachine>> {
        Ok(self
            .db(|d| d.pending())?
            .into_iter()
            .map(
                |(name, address, asked_ms)| vmatrix_core::api::PendingMachine {
                    name,
                    address,
                    asked_ms,
                },
            )
            .collect())
    }

    /// Loads the machines' credentials from the database (at start).
    pub(crate) fn load_credentials(&self) -> Result<()> {
        let all = self.db(|d| d.credentials())?;
        *self.credentials.lock().unwrap_or_else(|p| p.into_inner()) = all.into_iter().collect();
        Ok(())
    }

    /// Whether `authorization` carries the join token (or the operator's): checked before a
    /// joining machine's report is read.
    pub(crate) fn may_join(&self, authorization: Option<&str>) -> Result<()> {
        let join = self
            .join_token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let allowed = vmatrix_core::auth::bearer_matches(authorization, &join)
            || vmatrix_core::auth::bearer_matches(authorization, &self.token);
        if !allowed {
            return Err(ControlError::Unauthorized(
                "joining needs the join token (DATA/controller/join-token on the controller's \
                 machine) as the bearer token"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `POST /api/v1/agents/join`: a machine's first report, with the join token or the
    /// operator's as `authorization`. A name that has a credential already is refused.
    pub fn join(&self, report: &AgentReport, authorization: Option<&str>) -> Result<JoinReply> {
        self.may_join(authorization)?;
        report.validate().map_err(ControlError::BadRequest)?;
        let secret = random_secret().map_err(|e| {
            ControlError::Conflict(format!("making a credential for {}: {e}", report.name))
        })?;
        let name = report.name.clone();
        let taken = || {
            ControlError::Conflict(format!(
                "machine {name} has joined already and has its own credential: another agent \
                 with this name is refused. Its agent keeps the credential in its data \
                 directory (agents/{name}/credential); start that agent, or give this one \
                 another --name (or `vmatrix machine forget {name}` if that machine is gone)"
            ))
        };
        let has_credential = self
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&name);
        if has_credential {
            return Err(taken());
        }
        let auto = self.auto_approve.load(std::sync::atomic::Ordering::Relaxed);
        if !auto && !self.db(|d| d.is_approved(&name))? {
            let asked_before = self.db(|d| d.pending())?.iter().any(|(n, _, _)| *n == name);
            self.db(|d| d.ask(&name, &report.address, crate::control::now_ms()))?;
            if !asked_before {
                self.event(
                    &name,
                    "join",
                    &format!("agent at {}", report.address),
                    "pending: an operator approves it",
                );
            }
            return Err(ControlError::Forbidden(format!(
                "machine {name} waits for an operator's approval: `vmatrix machine approve \
                 {name}` on the controller's machine (or run the controller with \
                 --auto-approve)"
            )));
        }
        if !self.db(|d| d.add_credential(&name, &secret, crate::control::now_ms()))? {
            return Err(taken());
        }
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), secret.clone());
        self.event(&name, "join", &format!("agent at {}", report.address), "ok");
        Ok(JoinReply { credential: secret })
    }

    /// The machine whose credential `authorization` carries (every credential is compared, each
    /// in constant time); none: the caller is no machine that joined.
    pub(crate) fn machine_with(&self, authorization: Option<&str>) -> Result<String> {
        let all = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for (name, secret) in all.iter() {
            if vmatrix_core::auth::bearer_matches(authorization, secret) {
                found = Some(name.clone());
            }
        }
        found.ok_or_else(|| {
            ControlError::Unauthorized(
                "heartbeats carry the machine's own credential, which its agent got when it \
                 joined; this one is no machine's (an agent whose controller lost its state \
                 joins again)"
                    .into(),
            )
        })
    }

    /// Whether machine `caller` (from its credential) may report as `name`.
    pub(crate) fn check_machine(&self, caller: &str, name: &str) -> Result<()> {
        if caller == name {
            Ok(())
        } else {
            Err(ControlError::Forbidden(format!(
                "a report for machine {name} with the credential of machine {caller}: refused \
                 (only the agent that joined as {name} reports for it)"
            )))
        }
    }

    /// The bearer the controller shows machine `name`'s agent: its credential (empty if it
    /// has none: the agent then refuses, and its next heartbeat makes it join).
    pub(crate) fn agent_bearer(&self, name: &str) -> String {
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Over TLS, whether the connection of `machine`'s call came with that machine's
    /// certificate (the authority checked it at the handshake).
    pub(crate) fn check_certificate(
        &self,
        machine: &str,
        peer: Option<&vmatrix_serve::PeerCertificate>,
    ) -> Result<()> {
        if self.secured.get().is_none() {
            return Ok(());
        }
        match peer {
            Some(p) if p.names(machine) => Ok(()),
            Some(_) => Err(ControlError::Forbidden(format!(
                "the client certificate is not machine {machine}'s: a machine's calls come with \
                 its own certificate"
            ))),
            // 403, not 401: a 401 makes an agent join again, which changes nothing here.
            None => Err(ControlError::Forbidden(format!(
                "over TLS machine {machine}'s heartbeats come with its certificate (the agent \
                 keeps it in its data directory, tls/): none was presented"
            ))),
        }
    }

    /// The URL of `path` on `machine`'s agent (`https` where the API serves HTTPS: the agents
    /// then serve it too) and the client to call it with (over TLS, one that takes only
    /// that machine's certificate).
    pub(crate) fn agent_url(
        &self,
        machine: &vmatrix_core::api::MachineInfo,
        scheme: &str,
        path: &str,
    ) -> Result<(String, reqwest::Client)> {
        match self.secured.get() {
            Some(s) => Ok((
                format!("{scheme}s://{}{path}", machine.address),
                s.agent_client(&machine.name)?,
            )),
            None => Ok((
                format!("{scheme}://{}{path}", machine.address),
                self.http.clone(),
            )),
        }
    }
}
