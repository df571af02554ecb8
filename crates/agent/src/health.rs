//! The health watcher: one task per instance generation. It waits for a freshly activated
//! instance to serve and marks it running, then keeps probing it: a QEMU that exited, or a
//! guest that stops answering, marks the instance failed so the controller can replace it.
//! It holds no lock while it probes, and skips a round while an operation holds the VM.

use std::sync::Arc;
use std::time::Duration;

use vmatrix_core::{InstanceId, InstanceState, Transition};

use crate::machine::Agent;

/// Health probes in a row that may fail before a running instance counts as failed.
const UNHEALTHY_AFTER: u32 = 5;

/// How long a booting instance may take to answer its health check.
const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// Watches instance `id` at `generation` until it leaves this machine or fails.
pub(crate) async fn watch(agent: Arc<Agent>, id: InstanceId, generation: u64) {
    let started = tokio::time::Instant::now();
    let mut misses = 0;
    loop {
        let target = match agent.probe_target(&id, generation) {
            None => return,
            Some(t) => t,
        };
        let Some((endpoint, health, state, pid)) = target else {
            // An operation holds the VM: whoever holds it watches it now; look again later.
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if !matches!(state, InstanceState::Activating | InstanceState::Running) {
            if matches!(state, InstanceState::Failed | InstanceState::Suspended) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let probe =
            vmatrix_vmm::http::request(endpoint, "GET", &health, &[], Duration::from_secs(2)).await;
        let healthy = matches!(probe, Ok(ref r) if r.status == 200);
        let why = match &probe {
            Ok(r) => format!("status {}", r.status),
            Err(e) => e.to_string(),
        };
        if !healthy
            && state == InstanceState::Running
            && (misses == 0 || misses + 1 == UNHEALTHY_AFTER)
        {
            let net = agent.network_diagnosis(&id, generation).unwrap_or_default();
            tracing::warn!(instance = %id, "{health} did not answer ({why}). {net}");
        }
        let alive = pid > 0 && agent.hv().alive(pid);
        let mut done = false;
        agent.observe(&id, generation, state, |s| {
            if !alive {
                s.fail(format!("its QEMU (pid {pid}) exited"));
                done = true;
                return;
            }
            match (state, healthy) {
                (InstanceState::Activating, true) => s.step(Transition::Ready),
                (InstanceState::Activating, false) if started.elapsed() > BOOT_LIMIT => {
                    s.fail(format!(
                        "no answer on {health} within {} s",
                        BOOT_LIMIT.as_secs()
                    ));
                    done = true;
                }
                (InstanceState::Running, true) => misses = 0,
                (InstanceState::Running, false) => {
                    misses += 1;
                    if misses >= UNHEALTHY_AFTER {
                        s.fail(format!(
                            "{health} failed {misses} times in a row (last: {why})"
                        ));
                        done = true;
                    }
                }
                _ => {}
            }
        });
        if done {
            return;
        }
        let pause = if state == InstanceState::Activating {
            200
        } else {
            2000
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}
