//! The demo's replay — load generators following the traces through the switch, the live view,
//! the malfunction and the rollout it injects — and its summary against the simulator.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use vmatrix_client::ControllerClient;
use vmatrix_core::api::{InstanceInfo, RolloutState};
use vmatrix_core::InstanceState;
use vmatrix_switch::{run_load, LoadOptions, LoadResult};

use crate::demo::{clock, counters, running, Counts, DemoArgs, MOMENTS};
use crate::demo_trace::Demand;

/// What the replay measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Real seconds the replay ran.
    pub real_s: f64,
    /// Machines in use (running anything) integrated over the replay, machine-seconds.
    pub machine_s: f64,
    /// Most machines in use at once.
    pub peak_machines: usize,
    /// Per service: the load generator's results.
    pub load: BTreeMap<String, LoadResult>,
    /// Per service: the switch's requests, errors, held and dropped over the replay.
    pub switch: BTreeMap<String, [u64; 4]>,
    /// Operations, from the controller's events.
    pub counts: Counts,
    /// Real seconds each service spent dropped.
    pub dropped_s: BTreeMap<String, f64>,
    /// The rollout, as it went.
    pub rollout: Option<String>,
    /// Failed requests of sports while its rollout ran (the switch's error counter).
    pub rollout_failed: Option<u64>,
    /// The malfunction and the recovery.
    pub recovery: Option<String>,
    /// Whether the killed instance's service served as before again.
    pub recovered: bool,
}

/// A QEMU of this data directory running instance `id`: its process id.
fn qemu_of(data: &Path, id: &str) -> Option<i32> {
    let marker = format!("{}/", data.display());
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains("qemu-system")
            && cmd.contains(&format!("serial={id} "))
            && cmd.contains(&marker)
        {
            return Some(pid);
        }
    }
    None
}

/// The live view: one status line, rewritten in place on a terminal; events printed above it.
struct View {
    tty: bool,
    last_line: Instant,
}

impl View {
    fn event(&mut self, text: &str) {
        if self.tty {
            print!("\r\x1b[2K");
        }
        println!("{text}");
    }

    fn status(&mut self, text: &str) {
        if self.tty {
            print!("\r\x1b[2K{text}");
            let _ = std::io::stdout().flush();
        } else if self.last_line.elapsed() >= Duration::from_secs(15) {
            println!("{text}");
            self.last_line = Instant::now();
        }
    }
}

/// Whether an event is worth a line in the live view (the rest is in `vmatrix events`).
fn notable(what: &str, who: &str) -> bool {
    let verb = what.split_whitespace().next().unwrap_or_default();
    matches!(
        verb,
        "activate"
            | "resume"
            | "migrate"
            | "suspend"
            | "pause"
            | "unpause"
            | "drop"
            | "undrop"
            | "discard"
    ) || what.starts_with("rollout")
        || (who != "controller" && who != "api" && what.ends_with(" failed"))
}

/// Replays the demand through the switch and watches the matrix.
pub async fn replay(
    args: &DemoArgs,
    client: &ControllerClient,
    demand: &Demand,
    data: &Path,
) -> Result<Outcome> {
    let seconds = demand.finance.len();
    let mut out = Outcome::default();
    let before = counters(&client.load().await.unwrap_or_default());
    let mut last_event = client
        .events(0)
        .await
        .unwrap_or_default()
        .last()
        .map_or(0, |e| e.id);
    let generators: Vec<(String, tokio::task::JoinHandle<LoadResult>)> =
        [("finance", &demand.finance), ("sports", &demand.sports)]
            .into_iter()
            .map(|(name, v)| {
                let opts = LoadOptions {
                    target: format!("http://{}/s/{name}/", args.switch_listen),
                    schedule: Demand::schedule(v),
                    duration: Duration::from_secs(v.len() as u64),
                    timeout: Duration::from_secs(10),
                };
                (
                    name.to_owned(),
                    tokio::spawn(async move { run_load(&opts).await }),
                )
            })
            .collect();
    let mut view = View {
        tty: std::io::stdout().is_terminal(),
        last_line: Instant::now() - Duration::from_secs(60),
    };
    let started = Instant::now();
    let mut last_tick = started;
    let mut done_moments = 0;
    let mut rollout_errors_before: Option<u64> = None;
    let mut killed: Option<(String, String, usize, Instant)> = None;
    let mut detected: Option<Duration> = None;
    let mut list: Vec<InstanceInfo> = Vec::new();
    while started.elapsed().as_secs_f64() < seconds as f64 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = Instant::now();
        let dt = now.duration_since(last_tick).as_secs_f64();
        last_tick = now;
        let k = started.elapsed().as_secs_f64();
        let trace = clock(demand.trace_s(k));
        if let Ok(l) = client.instances().await {
            list = l;
        }
        let machines = client
            .machines()
            .await
            .map(|m| m.machines)
            .unwrap_or_default();
        let in_use = machines.iter().filter(|m| m.instances > 0).count();
        out.machine_s += in_use as f64 * dt;
        out.peak_machines = out.peak_machines.max(in_use);
        let dropped: Vec<String> = client
            .services()
            .await
            .map(|s| s.dropped.into_keys().collect())
            .unwrap_or_default();
        for d in &dropped {
            *out.dropped_s.entry(d.clone()).or_default() += dt;
        }
        for e in client.events(last_event).await.unwrap_or_default() {
            last_event = e.id;
            out.counts.take(&e);
            if let Some((id, .., at)) = &killed {
                if detected.is_none() && e.what == format!("{id} failed") {
                    detected = Some(at.elapsed());
                }
            }
            if notable(&e.what, &e.who) {
                let why = if e.why.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", e.why)
                };
                view.event(&format!(
                    "  {trace}  {}: {}{why} ({})",
                    e.who, e.what, e.outcome
                ));
            }
        }
        // The demo's own moments.
        if let Some((at, what)) = MOMENTS.get(done_moments) {
            if k >= at * seconds as f64 {
                done_moments += 1;
                match *what {
                    "rollout" => {
                        let load = client.load().await.unwrap_or_default();
                        rollout_errors_before = load.services.get("sports").map(|s| s.errors);
                        view.event(&format!(
                            "▶ {trace}  the operator rolls sports out to v2 (`vmatrix rollout sports --to sports:v2`)"
                        ));
                        if let Err(e) = client
                            .submit(&crate::demo::rollout()?, Duration::ZERO)
                            .await
                        {
                            view.event(&format!("  the rollout was refused: {e:#}"));
                        }
                    }
                    _ => {
                        let victim = list
                            .iter()
                            .filter(|i| i.state == InstanceState::Running)
                            .find(|i| i.service.as_str() == "finance")
                            .or_else(|| list.iter().find(|i| i.state == InstanceState::Running));
                        if let Some(v) = victim {
                            if let Some(pid) = qemu_of(data, v.id.as_str()) {
                                let _ = nix::sys::signal::kill(
                                    nix::unistd::Pid::from_raw(pid),
                                    nix::sys::signal::Signal::SIGKILL,
                                );
                                view.event(&format!(
                                    "▶ {trace}  malfunction: the QEMU of {} ({}) is killed",
                                    v.id, v.service
                                ));
                                killed = Some((
                                    v.id.to_string(),
                                    v.service.to_string(),
                                    running(&list, v.service.as_str()),
                                    Instant::now(),
                                ));
                            }
                        }
                    }
                }
            }
        }
        if let Some(before) = rollout_errors_before {
            if out.rollout.is_none() {
                let r = client.rollouts().await.unwrap_or_default();
                if let Some(s) = r
                    .iter()
                    .find(|r| r.service.as_str() == "sports" && !r.state.is_active())
                {
                    let load = client.load().await.unwrap_or_default();
                    let after = load.services.get("sports").map_or(before, |s| s.errors);
                    out.rollout_failed = Some(after.saturating_sub(before));
                    let took = s.updated_ms.saturating_sub(s.started_ms) as f64 / 1000.0;
                    out.rollout = Some(format!(
                        "sports to v2: {} in {took:.1} s ({})",
                        match s.state {
                            RolloutState::Done => "done",
                            _ => "not done",
                        },
                        s.message
                    ));
                }
            }
        }
        if let Some((id, service, had, at)) = &killed {
            if !out.recovered {
                let gone = !list
                    .iter()
                    .any(|i| i.id.as_str() == id && i.state == InstanceState::Running);
                // Back to what it ran (or, when its demand fell meanwhile, serving at all half
                // a minute on).
                let back = running(&list, service) >= *had
                    || (running(&list, service) >= 1 && at.elapsed() > Duration::from_secs(30));
                if gone && detected.is_some() && back {
                    out.recovered = true;
                    out.recovery = Some(format!(
                        "{id}'s QEMU killed; its machine reported it failed {:.1} s later, and \
                         {service} ran {} instance(s) again {:.1} s after the kill",
                        detected.unwrap_or_default().as_secs_f64(),
                        running(&list, service),
                        at.elapsed().as_secs_f64()
                    ));
                }
            }
        }
        // The status line.
        let per = |name: &str, v: &[f64]| {
            let n = running(&list, name);
            let rps = v.get(k as usize).copied().unwrap_or(0.0);
            let mark = if dropped.iter().any(|d| d == name) {
                " DROPPED"
            } else {
                ""
            };
            format!("{name} {n} inst {rps:>4.1} rps{mark}")
        };
        view.status(&format!(
            "[{:>3.0}%] {trace} │ machines in use {in_use}/{} │ {} │ {} │ drops {}",
            100.0 * k / seconds as f64,
            machines.len(),
            per("finance", &demand.finance),
            per("sports", &demand.sports),
            out.counts.drops
        ));
    }
    if view.tty {
        println!();
    }
    out.real_s = started.elapsed().as_secs_f64();
    for (name, task) in generators {
        if let Ok(r) = task.await {
            out.load.insert(name, r);
        }
    }
    let after = counters(&client.load().await.unwrap_or_default());
    for (name, a) in after {
        let b = before.get(&name).copied().unwrap_or_default();
        out.switch
            .insert(name, std::array::from_fn(|i| a[i].saturating_sub(b[i])));
    }
    if out.recovery.is_none() {
        if let Some((id, ..)) = killed {
            out.recovery = Some(format!("{id}'s QEMU killed; not replaced before the end"));
        }
    }
    Ok(out)
}

/// One service's requests over the replay.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Requests {
    /// Sent by the load generator.
    pub sent: u64,
    /// Answered.
    pub served: u64,
    /// Held by the switch while the service woke.
    pub held: u64,
    /// Refused at once (503: the service dropped).
    pub dropped: u64,
    /// Failed otherwise (time-outs, errors).
    pub failed: u64,
}

/// Machine-minutes (real minutes) and the peak, for one way of serving the load.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Usage {
    /// Machine-minutes.
    pub machine_minutes: f64,
    /// Most machines at once.
    pub peak_machines: usize,
}

/// The demo's summary (`DATA/demo-summary.json`; the text is made from it).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Machines in the pool.
    pub machines: u32,
    /// Real minutes replayed.
    pub real_minutes: f64,
    /// Trace seconds per real second.
    pub speed: f64,
    /// The trace span replayed, `HH:MM`.
    pub from: String,
    /// …to.
    pub to: String,
    /// Per service.
    pub requests: BTreeMap<String, Requests>,
    /// Operations, from the controller's events.
    pub operations: Counts,
    /// Seconds each service spent dropped.
    pub dropped_s: BTreeMap<String, f64>,
    /// The malfunction and how the matrix recovered.
    pub recovery: Option<String>,
    /// Whether it recovered.
    pub recovered: bool,
    /// The rollout, as it went (`None`: not finished within the replay).
    pub rollout: Option<String>,
    /// Failed requests of sports while its rollout ran.
    pub rollout_failed: Option<u64>,
    /// The matrix, measured.
    pub measured: Usage,
    /// The simulator on the same demand: static provisioning (each service owns machines for
    /// its own peak), vMatrix's policy, and the lower bound.
    pub static_provisioning: Usage,
    pub simulated: Usage,
    pub lower_bound: Usage,
}

/// The summary: what happened, and the machine-minutes against static provisioning and the
/// lower bound (the simulator, on the same demand, per real second).
pub fn report(
    args: &DemoArgs,
    demand: &Demand,
    out: &Outcome,
    settings: &vmatrix_policy::Settings,
) -> Report {
    let requests = out
        .load
        .iter()
        .map(|(name, r)| {
            let sw = out.switch.get(name).copied().unwrap_or_default();
            let dropped = r.errors.get("503").copied().unwrap_or(0);
            let failed = r
                .errors
                .iter()
                .filter(|(k, _)| k.as_str() != "503")
                .map(|(_, v)| v)
                .sum();
            let req = Requests {
                sent: r.sent,
                served: r.ok,
                held: sw[2],
                dropped,
                failed,
            };
            (name.clone(), req)
        })
        .collect();
    // The same demand through the simulator.
    let svc = |name: &str, priority: i32, min: u32, demand: &[f64]| vmatrix_sim::SimService {
        name: name.into(),
        priority,
        capacity_rps: 10.0,
        min,
        max: 3,
        vcpus: 1,
        memory_mib: 256,
        demand: demand.to_vec(),
        spread: false,
        ..Default::default()
    };
    let services = vec![
        svc("finance", 10, 0, &demand.finance),
        svc("sports", 5, 1, &demand.sports),
    ];
    let mut pool = vmatrix_sim::Pool::new(args.machines as usize, 2, 2048);
    pool.step_s = 1.0;
    let usage = |r: &vmatrix_sim::Summary| Usage {
        machine_minutes: r.machine_hours * 60.0,
        peak_machines: r.peak_machines,
    };
    Report {
        machines: args.machines,
        real_minutes: out.real_s / 60.0,
        speed: demand.speed,
        from: clock(demand.trace_s(0.0)),
        to: clock(demand.trace_s(out.real_s)),
        requests,
        operations: out.counts.clone(),
        dropped_s: out.dropped_s.clone(),
        recovery: out.recovery.clone(),
        recovered: out.recovered,
        rollout: out.rollout.clone(),
        rollout_failed: out.rollout_failed,
        measured: Usage {
            machine_minutes: out.machine_s / 60.0,
            peak_machines: out.peak_machines,
        },
        static_provisioning: usage(&vmatrix_sim::run(
            vmatrix_sim::PolicyKind::Static,
            &services,
            &pool,
            settings,
        )),
        simulated: usage(&vmatrix_sim::run(
            vmatrix_sim::PolicyKind::SwitchingDrop,
            &services,
            &pool,
            settings,
        )),
        lower_bound: usage(&vmatrix_sim::lower_bound(&services, &pool)),
    }
}

/// The report as the terminal and `DATA/demo-summary.txt` show it.
pub fn text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "vMatrix demo: {} machines of 2 vCPUs, {:.1} real minutes replaying {}–{} (×{:.0})",
        r.machines, r.real_minutes, r.from, r.to, r.speed
    );
    let _ = writeln!(s, "\nrequests     sent   served   held  dropped  failed");
    for (name, q) in &r.requests {
        let _ = writeln!(
            s,
            "{name:<9} {:>7}  {:>7}  {:>5}  {:>7}  {:>6}",
            q.sent, q.served, q.held, q.dropped, q.failed
        );
    }
    let c = &r.operations;
    let _ = writeln!(
        s,
        "\noperations: {} activations, {} resumes, {} migrations, {} suspends, {} pauses, \
         {} drops, {} discards, {} rollout(s)",
        c.activations,
        c.resumes,
        c.migrations,
        c.suspends,
        c.pauses,
        c.drops,
        c.discards,
        c.rollouts
    );
    for (name, secs) in &r.dropped_s {
        let _ = writeln!(s, "dropped: {name} for {secs:.0} s");
    }
    if let Some(x) = &r.recovery {
        let _ = writeln!(s, "recovery: {x}");
    }
    match (&r.rollout, r.rollout_failed) {
        (Some(x), Some(n)) => {
            let _ = writeln!(s, "rollout: {x}; {n} failed request(s) while it ran");
        }
        _ => {
            let _ = writeln!(s, "rollout: did not finish within the replay");
        }
    }
    let _ = writeln!(s, "\nmachine-minutes for the same load (real minutes):");
    for (what, u) in [
        ("vMatrix, measured            ", &r.measured),
        ("static, each service its peak", &r.static_provisioning),
        ("vMatrix's policy, simulated  ", &r.simulated),
        ("lower bound                  ", &r.lower_bound),
    ] {
        let _ = writeln!(
            s,
            "  {what} {:>6.1}  (peak {} machine(s))",
            u.machine_minutes, u.peak_machines
        );
    }
    s
}
