//! The controller's client of the agents: one command, one HTTP call, with a timeout derived
//! from the work and a typed error that says whether the agent answered (it then left the VM as
//! it was) or not (the command may still run there).

use vmatrix_core::api::{AgentCommand, AgentReply, CommandReply, ErrorBody, MachineInfo};

use crate::control::{ControlError, Controller, Result};

/// An agent's reply of another kind than the command expects.
pub(crate) fn unexpected(machine: &MachineInfo, wanted: &str, got: &AgentReply) -> ControlError {
    ControlError::Agent {
        machine: machine.name.clone(),
        message: format!(
            "answered `{}` to a command that expects `{wanted}`",
            got.kind()
        ),
    }
}

impl Controller {
    /// Sends `cmd` to `machine`'s agent and waits for its end, at most as long as the work
    /// may take (the agent's task goes on if this gives up: heartbeats then settle it).
    pub(crate) async fn send(
        &self,
        machine: &MachineInfo,
        cmd: &AgentCommand,
        memory_mib: u32,
    ) -> Result<AgentReply> {
        // The agent gives up on its own after `work_limit`; twice that covers a boot too.
        self.send_within(machine, cmd, vmatrix_core::api::work_limit(memory_mib) * 2)
            .await
    }

    /// [`Controller::send`] with its own timeout (for commands that take milliseconds).
    pub(crate) async fn send_within(
        &self,
        machine: &MachineInfo,
        cmd: &AgentCommand,
        timeout: std::time::Duration,
    ) -> Result<AgentReply> {
        // A controller that no longer leads commands nothing.
        self.check_lead()?;
        let (url, http) = self.agent_url(machine, "http", "/agent/v1/command")?;
        let fail = |message: String| ControlError::Agent {
            machine: machine.name.clone(),
            message,
        };
        let resp = http
            .post(&url)
            .bearer_auth(self.agent_bearer(&machine.name))
            .timeout(timeout)
            .json(cmd)
            .send()
            .await
            .map_err(|e| ControlError::Unreachable {
                machine: machine.name.clone(),
                message: vmatrix_core::with_causes(&e),
            })?;
        let status = resp.status();
        if status.is_success() {
            let body: CommandReply = resp.json().await.map_err(|e| ControlError::Unreachable {
                machine: machine.name.clone(),
                message: format!("bad or cut reply: {e}"),
            })?;
            // Reports from this machine older than this say nothing about the instance now.
            if let Some(id) = cmd.instance() {
                self.fresh_after
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((machine.name.clone(), id.clone()), body.seq);
            }
            Ok(body.reply)
        } else {
            let body: Option<ErrorBody> = resp.json().await.ok();
            Err(fail(format!(
                "{status}: {}",
                body.map_or_else(|| "no details".into(), |b| b.error)
            )))
        }
    }
}
