//! The agent's `/metrics`: what its machine holds and uses, per instance, and how long its
//! commands take (a live migration's downtime among them).

use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use vmatrix_core::api::{AgentCommand, AgentReply};
use vmatrix_core::metrics::{self, Histograms, Sampled};

use crate::machine::{lock, Agent};

/// What the agent observes as its commands end.
#[derive(Debug)]
pub(crate) struct AgentMetrics {
    /// `vmatrix_agent_command_seconds{command, outcome}`.
    commands: Histograms,
    /// A live migration out of this machine: the guest's pause, and the whole copy.
    downtime: Histogram,
    migration: Histogram,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            commands: metrics::operation_histograms(),
            downtime: metrics::downtime_histogram(),
            migration: metrics::operation_histogram(),
        }
    }
}

/// What a command is called in the metrics (an activation from a saved state is a resume).
pub(crate) fn command_name(c: &AgentCommand) -> &'static str {
    match c {
        AgentCommand::Activate { state: Some(_), .. } => "resume",
        AgentCommand::Activate { .. } => "activate",
        AgentCommand::Suspend { .. } => "suspend",
        AgentCommand::PrepareIncoming { .. } => "prepare-incoming",
        AgentCommand::MigrateOut { .. } => "migrate-out",
        AgentCommand::FinishIncoming { .. } => "finish-incoming",
        AgentCommand::Discard { .. } => "discard",
        AgentCommand::Commit { .. } => "commit",
        AgentCommand::Pause { .. } => "pause",
        AgentCommand::Unpause { .. } => "unpause",
        AgentCommand::RemoveSaved { .. } => "remove-saved",
        AgentCommand::SetVolume { .. } => "set-volume",
    }
}

impl AgentMetrics {
    /// A command ended after `took`.
    pub(crate) fn command_ended<E>(
        &self,
        command: &'static str,
        took: Duration,
        result: &Result<AgentReply, E>,
    ) {
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.commands
            .get_or_create(&vec![
                ("command", command.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .observe(took.as_secs_f64());
        if let Ok(AgentReply::MigratedOut {
            total_ms,
            downtime_ms,
        }) = result
        {
            self.downtime.observe(*downtime_ms as f64 / 1000.0);
            self.migration.observe(*total_ms as f64 / 1000.0);
        }
    }
}

impl Agent {
    /// The agent's metrics in the OpenMetrics text format.
    pub fn metrics_text(&self) -> String {
        let mut sampled = Sampled::default();
        let report = self.report();
        let services: std::collections::HashMap<_, _> = lock(&self.slots)
            .values()
            .map(|s| (s.plan.id.clone(), s.plan.service.to_string()))
            .collect();
        let label = |id: &vmatrix_core::InstanceId| {
            vec![
                ("instance", id.to_string()),
                ("service", services.get(id).cloned().unwrap_or_default()),
            ]
        };
        let mut by_state = std::collections::BTreeMap::new();
        for i in &report.instances {
            *by_state.entry(i.state.as_str()).or_insert(0u64) += 1;
        }
        let rss: u64 = report.instances.iter().map(|i| i.memory_bytes).sum();
        sampled
            .gauge(
                "vmatrix_agent_vcpus",
                "vCPUs this machine offers.",
                [(vec![], u64::from(report.vcpus))],
            )
            .gauge(
                "vmatrix_agent_memory_bytes",
                "Memory this machine offers to instances.",
                [(vec![], u64::from(report.memory_mib) << 20)],
            )
            .gauge(
                "vmatrix_agent_memory_used_bytes",
                "Resident memory of this machine's QEMU processes.",
                [(vec![], rss)],
            )
            .gauge(
                "vmatrix_agent_instances",
                "Instances on this machine, by state.",
                by_state
                    .into_iter()
                    .map(|(state, n)| (vec![("state", state.to_owned())], n)),
            )
            .counter(
                "vmatrix_agent_instance_cpu_seconds",
                "CPU seconds each instance's QEMU has used.",
                report
                    .instances
                    .iter()
                    .map(|i| (label(&i.id), i.cpu_seconds)),
            )
            .gauge(
                "vmatrix_agent_instance_memory_bytes",
                "Resident memory of each instance's QEMU.",
                report
                    .instances
                    .iter()
                    .map(|i| (label(&i.id), i.memory_bytes)),
            );
        let mut registry = metrics::registry();
        registry.register(
            "vmatrix_agent_command_seconds",
            "How long the agent's commands took, by command and outcome",
            self.metrics.commands.clone(),
        );
        registry.register(
            "vmatrix_agent_migration_downtime_seconds",
            "Live migrations out of this machine: how long the guest was paused",
            self.metrics.downtime.clone(),
        );
        registry.register(
            "vmatrix_agent_migration_seconds",
            "Live migrations out of this machine: QEMU's whole copy",
            self.metrics.migration.clone(),
        );
        registry.register_collector(Box::new(sampled));
        metrics::render(&registry)
    }
}
