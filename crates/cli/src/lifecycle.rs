//! `vmatrix rollout` and `vmatrix rollback`: the operation runs on the controller; this follows
//! it, printing each step of the rollout as it happens, and `--status` shows where a rollout is.

use std::time::Duration;

use anyhow::{bail, Result};
use vmatrix_client::ControllerClient;
use vmatrix_core::api::{Operation, OperationState, RolloutStatus};
use vmatrix_core::ServiceName;

/// Submits `op` (a rollout or rollback of `service`) and follows it to its end.
pub async fn run(client: &ControllerClient, service: &ServiceName, op: Operation) -> Result<()> {
    let mut reply = client.submit(&op, Duration::from_secs(1)).await?;
    let mut last = String::new();
    while reply.state == OperationState::Running {
        if let Some(st) = status_of(client, service).await {
            let line = format!(
                "{} {}: {} → {}: {}/{} replaced: {}",
                st.kind,
                st.service,
                st.from_image,
                st.to_image,
                st.replaced.len(),
                st.total,
                st.message
            );
            if line != last {
                eprintln!("{line}");
                last = line;
            }
        }
        reply = client
            .operation(reply.operation, Duration::from_secs(1))
            .await?;
    }
    match reply.state {
        OperationState::Done => {
            println!("{}", reply.result);
            Ok(())
        }
        OperationState::Interrupted => {
            println!(
                "the controller restarted while it ran; it resumes the rollout: \
                 `vmatrix rollout --status {service}`"
            );
            Ok(())
        }
        OperationState::Failed | OperationState::Running => bail!("{}", reply.result),
    }
}

async fn status_of(client: &ControllerClient, service: &ServiceName) -> Option<RolloutStatus> {
    client
        .rollouts()
        .await
        .ok()?
        .into_iter()
        .find(|r| r.service == *service)
}

/// `vmatrix rollout --status SERVICE`.
pub async fn status(client: &ControllerClient, service: &ServiceName, json: bool) -> Result<()> {
    let Some(st) = status_of(client, service).await else {
        bail!("{service} has had no rollout");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    let short = |v: &str| v.get(..12).unwrap_or(v).to_owned();
    println!(
        "{} of {}: {:?} (asked by {})",
        st.kind, st.service, st.state, st.requested_by
    );
    println!("from    {} ({})", st.from_image, short(&st.from_version));
    println!("to      {} ({})", st.to_image, short(&st.to_version));
    println!(
        "batch   {} at a time, {} s apart; health check within {} s",
        st.batch, st.pause_s, st.health_timeout_s
    );
    println!("done    {} of {}", st.replaced.len(), st.total);
    for (old, new) in &st.replaced {
        println!("        {old} → {new}");
    }
    if !st.old.is_empty() {
        let left: Vec<&str> = st.old.iter().map(|i| i.as_str()).collect();
        println!("left    {}", left.join(", "));
    }
    println!("last    {}", st.message);
    Ok(())
}
