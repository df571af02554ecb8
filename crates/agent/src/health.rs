//! The health watcher: one task per instance generation. It waits for a freshly activated
//! instance to serve and marks it running, then keeps probing it: a QEMU that exited, or a
//! guest that stops answering, marks the instance failed so the controller can replace it.
//! It holds no lock while it probes, and skips a round while an operation holds the VM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use vmatrix_core::{HealthCheck, InstanceId, InstanceState, Probe, Transition};

use crate::machine::Agent;

/// What one round probes.
pub(crate) struct Target {
    /// The instance's HTTP endpoint.
    pub endpoint: SocketAddr,
    pub check: HealthCheck,
    /// Where a TCP check connects (`None`: the port cannot be reached from here).
    pub tcp: Option<SocketAddr>,
    pub state: InstanceState,
    pub pid: u32,
}

/// How often a booting instance is probed (its first success makes it running at once).
const BOOTING_EVERY: Duration = Duration::from_millis(200);

/// Probes once: `Ok` if healthy, else why not.
async fn probe(t: &Target) -> Result<(), String> {
    let limit = t
        .check
        .interval
        .clamp(Duration::from_millis(500), Duration::from_secs(2));
    match &t.check.probe {
        Probe::Http(path) => {
            match vmatrix_vmm::http::request(t.endpoint, "GET", path, &[], limit).await {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(format!("{path} answered {}", r.status)),
                Err(e) => Err(e.to_string()),
            }
        }
        Probe::Tcp(port) => {
            let Some(addr) = t.tcp else {
                return Err(format!(
                    "tcp port {port} is reachable only with bridged networking (user-mode NAT forwards the HTTP port alone)"
                ));
            };
            match tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("tcp {addr}: {e}")),
                Err(_) => Err(format!("tcp {addr}: no answer within {limit:?}")),
            }
        }
    }
}

/// How long a moved instance is given to answer at its new place before its migration is
/// reported finished anyway (the watcher then judges it like any running instance).
pub(crate) const FIRST_ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// Right after a migration's switch-over: probes instance `id` at its new place with its own
/// health check until it answers (within `limit`), and says how long that took. The agent
/// reports the move finished only then, so the switch keeps the instance marked as moving
/// (new requests go to its peers) until it serves: under TCG the new QEMU has translated none
/// of the guest's code yet, and its first request costs about ten times a warm one (measured:
/// 185–212 ms against 9–11 ms); under KVM it still proves the instance answers where it now is.
pub(crate) async fn first_answer(
    agent: &Agent,
    id: &InstanceId,
    generation: u64,
    limit: Duration,
) -> Result<Duration, String> {
    let started = tokio::time::Instant::now();
    loop {
        let Some(Some(t)) = agent.probe_target(id, generation) else {
            return Err(format!("instance {id} is no longer held here"));
        };
        let why = match probe(&t).await {
            Ok(()) => return Ok(started.elapsed()),
            Err(why) => why,
        };
        if started.elapsed() >= limit {
            return Err(format!(
                "no healthy answer within {limit:?} of the switch-over ({}; last: {why})",
                t.check
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Watches instance `id` at `generation` until it leaves this machine or fails: a booting one
/// must answer within the check's `grace`; a running one fails after `failures` misses in a
/// row, probed every `interval`.
pub(crate) async fn watch(agent: Arc<Agent>, id: InstanceId, generation: u64) {
    let started = tokio::time::Instant::now();
    let mut misses = 0;
    loop {
        let target = match agent.probe_target(&id, generation) {
            None => return,
            Some(t) => t,
        };
        let Some(t) = target else {
            // An operation holds the VM: whoever holds it watches it now; look again later.
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let state = t.state;
        if !matches!(state, InstanceState::Activating | InstanceState::Running) {
            if matches!(state, InstanceState::Failed | InstanceState::Suspended) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let outcome = probe(&t).await;
        let healthy = outcome.is_ok();
        let why = outcome.err().unwrap_or_default();
        let (check, pid) = (&t.check, t.pid);
        if !healthy
            && state == InstanceState::Running
            && (misses == 0 || misses + 1 == check.failures)
        {
            // `ip` and `bridge` run as processes: not on the runtime's threads.
            let (a, i) = (agent.clone(), id.clone());
            let net = tokio::task::spawn_blocking(move || a.network_diagnosis(&i, generation))
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            tracing::warn!(instance = %id, "health {check}: {why}. {net}");
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
                (InstanceState::Activating, false) if started.elapsed() > check.grace => {
                    s.fail(format!(
                        "no healthy answer within its grace of {} ({check}; last: {why})",
                        humantime::format_duration(check.grace)
                    ));
                    done = true;
                }
                (InstanceState::Running, true) => misses = 0,
                (InstanceState::Running, false) => {
                    misses += 1;
                    if misses >= check.failures {
                        s.fail(format!(
                            "health failed {misses} times in a row ({check}; last: {why})"
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
            BOOTING_EVERY
        } else {
            check.interval
        };
        tokio::time::sleep(pause).await;
    }
}
