//! `vmatrix demo`: the idea in a few minutes. Two services on one small pool — `finance` (high
//! priority) and `sports` (lower) — replay a trading day and a World Cup match day through the
//! switch, time-compressed; the load-driven policy switches servers between them, drops sports
//! when both peak, recovers a killed instance, and an operator rollout runs along the way. At
//! the end a summary sets what the matrix used against what static provisioning and the lower
//! bound would have needed for the same load (the simulator, on the same demand).
//!
//! It drives a real `vmatrix up` (a child process) through the public API, as a user would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmatrix_client::ControllerClient;
use vmatrix_core::api::{Event, InstanceInfo, LoadReport, Operation};
use vmatrix_core::{ImageRef, InstanceState, ServiceName};

use crate::demo_trace::{Demand, DAY_START_MIN};
use crate::own_matrix::Up;

/// `vmatrix demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Trace seconds per real second (168: the 14 hours from 07:00 to 21:00 in 5 minutes).
    #[arg(long, default_value_t = 168.0)]
    pub speed: f64,
    /// How long the replay runs, in real minutes.
    #[arg(long, default_value_t = 5.0)]
    pub minutes: f64,
    /// Machines in the pool (2 vCPUs each: two one-vCPU instances per machine).
    #[arg(long, default_value_t = 2)]
    pub machines: u32,
    /// Requests/s at each trace's peak.
    #[arg(long, default_value_t = 30.0)]
    pub peak_rps: f64,
    /// The controller's API address (and the dashboard's).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// The switch's address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub switch_listen: SocketAddr,
    /// Where to write the summary (default: DATA/demo-summary.txt; the same in JSON beside it,
    /// .json). The demo's own matrix lives in DATA/demo, made afresh at every run.
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Leave the matrix running after the summary, for the dashboard (Ctrl-C stops it).
    #[arg(long)]
    pub keep: bool,
}

/// The two services, as the demo declares them.
const SERVICES: &str = r#"[[service]]
name = "finance"
image = "finance:v1"
priority = 10
min = 0
max = 3
capacity_rps = 10

[[service]]
name = "sports"
image = "sports:v1"
priority = 5
min = 1
max = 3
capacity_rps = 10
"#;

/// The policy's settings for a compressed day (the same file feeds the simulator): react
/// within seconds, forget a peak within half a minute, no daily forecast (one day of history
/// is none).
const POLICY: &str = "[policy]\nheadroom = 1.1\nscale_out_s = 4\nscale_in_s = 30\nseasons_s = []\n";

/// When, as a share of the replay, the demo breaks an instance and rolls a version out.
const ROLLOUT_AT: f64 = 0.18;
const MALFUNCTION_AT: f64 = 0.35;

/// What the demo counted from the controller's events.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Counts {
    pub activations: u64,
    pub resumes: u64,
    pub migrations: u64,
    pub suspends: u64,
    pub pauses: u64,
    pub drops: u64,
    pub discards: u64,
    pub rollouts: u64,
}

impl Counts {
    pub(crate) fn take(&mut self, e: &Event) {
        let ok = e.outcome.starts_with("ok");
        let verb = e.what.split_whitespace().next().unwrap_or_default();
        match verb {
            "activate" if e.outcome == "started" => self.activations += 1,
            "resume" if ok => self.resumes += 1,
            "migrate" if ok => self.migrations += 1,
            "suspend" if ok => self.suspends += 1,
            "pause" if ok => self.pauses += 1,
            "drop" if ok => self.drops += 1,
            "discard" if ok => self.discards += 1,
            _ => {}
        }
        if e.what.starts_with("rollout") && e.outcome.starts_with("done") {
            self.rollouts += 1;
        }
    }
}

/// Runs the demo.
pub async fn run(args: DemoArgs, home: &Path) -> Result<()> {
    if !(args.speed > 0.0 && args.speed.is_finite()) {
        bail!(
            "--speed {}: give trace seconds per real second, > 0",
            args.speed
        );
    }
    if !(args.minutes >= 1.0 && args.minutes <= 120.0) {
        bail!("--minutes {}: give 1 to 120", args.minutes);
    }
    if args.machines == 0 || args.machines > 16 {
        bail!("--machines {}: give 1 to 16", args.machines);
    }
    if !(args.peak_rps > 0.0 && args.peak_rps <= 500.0) {
        bail!("--peak-rps {}: give 0 to 500", args.peak_rps);
    }
    let seconds = (args.minutes * 60.0).round() as usize;
    let demand = Demand::new(args.speed, seconds, args.peak_rps);
    for addr in [args.listen, args.switch_listen] {
        if std::net::TcpListener::bind(addr).is_err() {
            bail!(
                "{addr} is in use: is a `vmatrix up` running? stop it, or pass --listen / \
                 --switch-listen"
            );
        }
    }
    // A matrix of its own, fresh every run, beside (never in) the data directory's own matrix:
    // a previous run's state would replay its instances and events.
    let owned = home.join("demo");
    let data = owned.as_path();
    if data.exists() {
        std::fs::remove_dir_all(data)
            .with_context(|| format!("removing the previous demo's {}", data.display()))?;
    }
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    println!(
        "vMatrix demo: {} machines of 2 vCPUs; finance (priority 10) and sports (priority 5), \
         {:.0} trace minutes per real minute, from {} for {} minutes",
        args.machines,
        args.speed,
        clock(DAY_START_MIN as f64 * 60.0),
        args.minutes
    );
    import_images(data).await?;
    let policy = data.join("demo-policy.toml");
    std::fs::write(&policy, POLICY).context("writing the demo's policy file")?;
    let mut up = start_up(&args, data, &policy)?;
    let client = up.wait_for_api().await?;
    let services =
        vmatrix_core::parse_services("demo services", SERVICES, &|_| Err("no includes".into()))
            .map_err(|e| anyhow::anyhow!("the demo's services: {e}"))?;
    client
        .apply(services)
        .await
        .context("applying the demo's services")?;
    let token = data.join("controller/token");
    println!(
        "dashboard: {}/  (token: {}; the matrix's authority: {})",
        client.base(),
        token.display(),
        data.join("controller/tls/ca-cert.pem").display()
    );
    wait_ready(&client).await?;
    let outcome = crate::demo_run::replay(&args, &client, &demand, data).await?;
    let settings = crate::policy_file::load(Some(&policy), &Default::default())?;
    let report = crate::demo_run::report(&args, &demand, &outcome, &settings);
    let text = crate::demo_run::text(&report);
    println!("\n{text}");
    let out = args
        .summary
        .clone()
        .unwrap_or_else(|| home.join("demo-summary.txt"));
    std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    let json = out.with_extension("json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!(
        "summary written to {} and {}",
        out.display(),
        json.display()
    );
    if args.keep {
        println!("the matrix keeps running for the dashboard; Ctrl-C stops it");
        tokio::signal::ctrl_c().await.ok();
    }
    drop(up);
    Ok(())
}

/// Builds the reference guest three times — finance v1, sports v1 and v2, each answering with
/// its service and version — and imports them.
async fn import_images(data: &Path) -> Result<()> {
    let repo_url = crate::image::repo_url(None, data)?;
    let started = Instant::now();
    let scratch = data.join("tmp");
    tokio::task::spawn_blocking(move || -> Result<()> {
        let repo = vmatrix_store::Repository::open_or_init(&repo_url)?;
        for (service, version) in [("finance", "1"), ("sports", "1"), ("sports", "2")] {
            let mut opts = vmatrix_guest::BuildOptions::new(
                scratch
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(format!("guest/demo-{service}-v{version}.img")),
            );
            opts.service = service.into();
            opts.version = version.into();
            let guest = vmatrix_guest::build(&opts)
                .with_context(|| format!("building the {service} v{version} guest"))?;
            let image = ImageRef::parse(&format!("{service}:v{version}"))?;
            repo.import(&guest.disk, &image, &scratch, &|_| {})
                .with_context(|| format!("importing {image}"))?;
        }
        Ok(())
    })
    .await??;
    println!(
        "images: finance:v1, sports:v1 and sports:v2 in the repository ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn start_up(args: &DemoArgs, data: &Path, policy: &Path) -> Result<Up> {
    let mut up: Vec<String> = [
        "--machines",
        &args.machines.to_string(),
        "--vcpus",
        "2",
        "--memory",
        "2048",
        "--policy",
        "switching",
        "--listen",
        &args.listen.to_string(),
        "--switch-listen",
        &args.switch_listen.to_string(),
        "--policy-file",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    up.push(policy.display().to_string());
    let child = Up::start(data, &up, &data.join("demo-up.log"))?;
    println!(
        "matrix: starting (`vmatrix up`, log in {})",
        data.join("demo-up.log").display()
    );
    Ok(child)
}

/// Waits until every machine has joined and sports runs (finance, min 0, waits for load).
async fn wait_ready(client: &ControllerClient) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let list = client.instances().await.unwrap_or_default();
        if running(&list, "sports") >= 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("sports did not start within 4 minutes: `vmatrix events` says why");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub(crate) fn running(list: &[InstanceInfo], service: &str) -> usize {
    list.iter()
        .filter(|i| i.service.as_str() == service && i.state == InstanceState::Running)
        .count()
}

/// `HH:MM` of a trace time (seconds from midnight).
pub(crate) fn clock(trace_s: f64) -> String {
    let m = (trace_s / 60.0) as u64 % (24 * 60);
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// The operator's rollout of sports to v2, as the demo asks for it.
pub(crate) fn rollout() -> Result<Operation> {
    Ok(Operation::Rollout {
        service: ServiceName::new("sports")?,
        to: ImageRef::parse("sports:v2")?,
        batch: None,
        pause_s: None,
        health_timeout_s: None,
        author: Some("demo".into()),
    })
}

/// Per service: (requests, errors, held, dropped) from a load report.
pub(crate) fn counters(l: &LoadReport) -> BTreeMap<String, [u64; 4]> {
    l.services
        .iter()
        .map(|(k, v)| (k.clone(), [v.requests, v.errors, v.held, v.dropped]))
        .collect()
}

/// The demo's moments: when each is due, as a share of the replay.
pub(crate) const MOMENTS: [(f64, &str); 2] =
    [(ROLLOUT_AT, "rollout"), (MALFUNCTION_AT, "malfunction")];
