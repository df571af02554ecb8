//! The client commands (`apply`, `services`, `machines`, `ps`, `events`, and the operations
//! `activate`, `suspend`, `resume`, `migrate`, `discard`, `drain`, `wake`, `drop`, `undrop`,
//! `operation`): the typed [`ControllerClient`] and the tables they print.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use vmatrix_client::ControllerClient;
use vmatrix_core::api::{Event, Operation, OperationReply, OperationState};

/// The API token: `VMATRIX_TOKEN`, or the one the controller keeps in `DATA/controller/token`.
pub fn token(data: &Path) -> Option<String> {
    std::env::var("VMATRIX_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| {
            std::fs::read_to_string(data.join("controller/token"))
                .ok()
                .map(|t| t.trim().to_owned())
        })
}

/// The token, or an error that says where to find it.
pub fn required_token(data: &Path) -> Result<String> {
    token(data).ok_or_else(|| {
        anyhow!(
            "no token: set VMATRIX_TOKEN to the controller's token (in its DATA/controller/token)"
        )
    })
}

/// A client of the controller at `--api`, or at the URL the controller wrote in DATA; over
/// HTTPS trusting `ca` (else the authority the controller keeps in DATA).
pub fn connect(api: Option<String>, ca: Option<&Path>, data: &Path) -> Result<ControllerClient> {
    let base = match api {
        Some(a) => a,
        None => std::fs::read_to_string(data.join("controller/api"))
            .map(|s| s.trim().to_owned())
            .map_err(|_| {
                anyhow!(
                    "no controller found in {}: start one with `vmatrix up`, or pass --api URL",
                    data.display()
                )
            })?,
    };
    let authority = crate::trust::authority(ca, data, &base)?;
    Ok(ControllerClient::trusting(
        &base,
        token(data),
        authority.as_deref(),
    )?)
}

/// Submits an operation and follows it to its end. The controller runs it as its own task:
/// Ctrl-C here stops only the following, never the operation.
pub async fn operate(client: &ControllerClient, op: Operation) -> Result<String> {
    let reply = client.submit(&op, Duration::from_secs(5)).await?;
    if reply.state == OperationState::Running {
        eprintln!(
            "operation {id} runs on the controller; Ctrl-C stops only this wait (`vmatrix operation {id}` follows it again)",
            id = reply.operation
        );
    }
    follow(client, reply).await
}

/// Waits for operation `reply.operation` to settle and says how it ended.
pub async fn follow(client: &ControllerClient, mut reply: OperationReply) -> Result<String> {
    while reply.state == OperationState::Running {
        reply = client
            .operation(reply.operation, Duration::from_secs(30))
            .await?;
    }
    match reply.state {
        OperationState::Done => Ok(reply.result),
        OperationState::Interrupted => Ok(format!(
            "operation {} was interrupted: {}",
            reply.operation, reply.result
        )),
        OperationState::Failed | OperationState::Running => {
            bail!("operation {} failed: {}", reply.operation, reply.result)
        }
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!(
        "{}",
        line(headers.iter().map(|h| h.to_string()).collect()).trim_end()
    );
    for r in rows {
        println!("{}", line(r).trim_end());
    }
}

/// The API's name of an enum value (`dedicated`, `policy`, …).
fn name_of(v: &impl serde::Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn dash(c: String) -> String {
    if c.is_empty() {
        "-".to_owned()
    } else {
        c
    }
}

/// `vmatrix apply`.
pub async fn apply(
    client: &ControllerClient,
    services: Vec<vmatrix_core::ServiceSpec>,
) -> Result<()> {
    let n = services.len();
    let reply = client.apply(services).await?;
    println!("applied {n} service(s); `vmatrix ps` shows the instances as they come up");
    for s in reply.rollouts {
        println!(
            "{s}: its image changed: rolling out its instances one at a time \
             (`vmatrix rollout --status {s}`)"
        );
    }
    Ok(())
}

/// `vmatrix services`.
pub async fn services(client: &ControllerClient, json: bool) -> Result<()> {
    let reply = client.services().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    let rows = reply
        .services
        .iter()
        .map(|s| {
            vec![
                s.name.to_string(),
                s.image.to_string(),
                s.priority.to_string(),
                s.min.to_string(),
                s.max.to_string(),
                s.capacity_rps.to_string(),
                s.vcpus.to_string(),
                s.memory_mib.to_string(),
                reply
                    .dropped
                    .get(s.name.as_str())
                    .map_or("-".to_owned(), name_of),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "IMAGE", "PRIORITY", "MIN", "MAX", "RPS/INST", "VCPUS", "MEMORY", "DROPPED",
        ],
        rows,
    );
    Ok(())
}

/// `vmatrix machines`.
pub async fn machines(client: &ControllerClient, json: bool) -> Result<()> {
    let reply = client.machines().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    let rows = reply
        .machines
        .into_iter()
        .map(|v| {
            let m = v.machine;
            vec![
                m.name,
                m.address,
                name_of(&m.role),
                m.vcpus.to_string(),
                m.memory_mib.to_string(),
                m.state.to_string(),
                v.instances.to_string(),
                format!("{:.0}%", v.cpu_load * 100.0),
                if v.free {
                    "free: can power down".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ADDRESS",
            "ROLE",
            "VCPUS",
            "MEMORY",
            "STATE",
            "INSTANCES",
            "CPU",
            "",
        ],
        rows,
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for p in &reply.pending {
        println!(
            "waiting to join: {} (agent at {}, asked {}s ago) — `vmatrix machine approve {}`",
            p.name,
            p.address,
            now_ms.saturating_sub(p.asked_ms) / 1000,
            p.name
        );
    }
    Ok(())
}

/// `vmatrix machine approve|forget NAME`.
pub async fn machine(client: &ControllerClient, action: crate::MachineAction) -> Result<()> {
    let (name, approve) = match &action {
        crate::MachineAction::Approve { name } => (name, true),
        crate::MachineAction::Forget { name } => (name, false),
    };
    // Checked here too: the name goes into the URL's path.
    vmatrix_core::MachineName::new(name.as_str())?;
    if approve {
        client.approve_machine(name).await?;
        println!("approved: machine {name} joins when its agent asks next (within seconds)");
    } else {
        client.forget_machine(name).await?;
        println!("forgotten: machine {name}'s agent must join (and be approved) again");
    }
    Ok(())
}

/// `vmatrix ps`.
pub async fn ps(client: &ControllerClient, json: bool) -> Result<()> {
    let instances = client.instances().await?;
    if json {
        let reply = vmatrix_core::api::InstancesReply { instances };
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let rows = instances
        .into_iter()
        .map(|i| {
            // Minutes left of an operator's pin.
            let pin = if i.pinned_until_ms > now_ms {
                format!("{}m", (i.pinned_until_ms - now_ms).div_ceil(60_000))
            } else {
                "-".into()
            };
            vec![
                i.id.to_string(),
                i.service.to_string(),
                dash(i.image),
                dash(i.version.chars().take(12).collect()),
                dash(i.machine),
                i.state.as_str().to_owned(),
                dash(i.endpoint),
                i.generation.to_string(),
                pin,
                i.purpose.as_str().to_owned(),
            ]
        })
        .collect();
    table(
        &[
            "INSTANCE", "SERVICE", "IMAGE", "VERSION", "MACHINE", "STATE", "ENDPOINT", "GEN",
            "PINNED", "PURPOSE",
        ],
        rows,
    );
    Ok(())
}

fn print_event(e: &Event) {
    let secs = e.at_ms / 1000;
    println!(
        "{:02}:{:02}:{:02}.{:03}  {:<12} {:<40} {:<36} {}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        e.at_ms % 1000,
        e.who,
        e.what,
        e.why,
        e.outcome
    );
}

/// `vmatrix events [--follow]`.
pub async fn events(client: &ControllerClient, follow: bool, json: bool) -> Result<()> {
    let mut after = 0u64;
    loop {
        for e in client.events(after).await? {
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                print_event(&e);
            }
            after = after.max(e.id);
        }
        if !follow {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = crate::shutdown_signal() => return Ok(()),
        }
    }
}
