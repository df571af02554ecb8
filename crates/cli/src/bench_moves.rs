//! `vmatrix bench moves`: what a client sees while the matrix moves a server, measured through a
//! real `vmatrix up` (two machines, the reference guest) with the load generator sending
//! through the switch, as a user's clients would: a live migration's client-visible stall (the
//! slowest request of a window with a move, against a window without one, alternated), and
//! how long the first request to a dormant service waits (a cold activation from the repository,
//! then the resume of a suspended instance).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmatrix_client::ControllerClient;
use vmatrix_core::api::{InstanceInfo, Operation};
use vmatrix_core::{InstanceId, InstanceState};
use vmatrix_switch::{run_load, LoadOptions, LoadResult};

use crate::bench_stats::{secs, section, table, Runs};
use crate::own_matrix::Up;

/// Options of `vmatrix bench moves`.
#[derive(Debug, Clone, clap::Args)]
pub struct MovesBench {
    /// Migrations (and as many windows without one), suspends and resumes.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Requests/s the load generator sends through the switch (the one instance forks a shell
    /// per request: at 50/s a slow TCG host runs it near its capacity, and the stall then
    /// measures how long a backlog takes to drain rather than the move).
    #[arg(long, default_value_t = 20.0)]
    pub rps: f64,
    /// Seconds of each load window (a migration starts 2 s into its window).
    #[arg(long, default_value_t = 8)]
    pub window: u64,
}

const SERVICE: &str = "web";

pub async fn moves(b: &MovesBench) -> Result<()> {
    if b.runs == 0 || b.window < 4 || !(b.rps > 0.0 && b.rps <= 500.0) {
        bail!("give --runs ≥ 1, --window ≥ 4 (seconds) and --rps in (0, 500]");
    }
    let dir = tempfile::Builder::new()
        .prefix("vmx-bench-moves-")
        .tempdir_in("/tmp")
        .context("creating a data directory")?;
    let data = dir.path();
    let api = crate::bench::free_addr()?;
    let front = crate::bench::free_addr()?;
    let args: Vec<String> = [
        "--machines",
        "2",
        "--policy",
        "min",
        "--listen",
        &api.to_string(),
        "--switch-listen",
        &front.to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    eprintln!("starting a matrix of two machines (`vmatrix up`) …");
    let log = data.join("up.log");
    let mut up = Up::start(data, &args, &log)?;
    let client = up.wait_for_api().await?;
    let result = measure(b, &client, &front.to_string()).await;
    drop(up);
    result.with_context(|| format!("the matrix's log was {}", log.display()))
}

async fn measure(b: &MovesBench, client: &ControllerClient, front: &str) -> Result<()> {
    let services = vmatrix_core::parse_services(
        "bench services",
        &format!(
            "[[service]]\nname = \"{SERVICE}\"\nimage = \"guest:v1\"\nmin = 0\nmax = 1\n\
             capacity_rps = 100\n"
        ),
        &|_| Err("no includes".into()),
    )
    .map_err(|e| anyhow::anyhow!("the bench's service: {e}"))?;
    client.apply(services).await?;
    wait_machines(client, 2).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(180))
        .build()?;
    let url = format!("http://{front}/s/{SERVICE}/health");

    // The first request to a service that never ran: held while it activates (lazily, from
    // the repository) and boots.
    eprintln!("first request to a dormant service (cold activation) …");
    let cold = first_request(&http, &url).await?;
    running(client).await?;

    let (mut stall, mut still, mut p99_move, mut p99_still) = (
        Runs::default(),
        Runs::default(),
        Runs::default(),
        Runs::default(),
    );
    let (mut downtime, mut op_wall) = (Runs::default(), Runs::default());
    let (mut sent, mut failed) = (0u64, 0u64);
    let (mut resume, mut suspend) = (Runs::default(), Runs::default());
    for run in 0..b.runs {
        // Alternated: a window without a move first in even runs, after the move in odd ones.
        let mut windows = [false, true];
        if run % 2 == 1 {
            windows.reverse();
        }
        for with_move in windows {
            let load = tokio::spawn(run_load_owned(LoadOptions::constant(
                url.clone(),
                b.rps,
                Duration::from_secs(b.window),
            )));
            if with_move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let here = running(client).await?;
                let to = if here.machine == "rm1" { "rm2" } else { "rm1" };
                let started = Instant::now();
                let text = crate::client::operate(
                    client,
                    Operation::Migrate {
                        instance: here.id.clone(),
                        to: to.into(),
                    },
                )
                .await?;
                op_wall.push(started.elapsed().as_secs_f64());
                if let Some(ms) = downtime_ms(&text) {
                    downtime.push(ms / 1000.0);
                }
                eprintln!("run {}/{}: {text}", run + 1, b.runs);
            }
            let r: LoadResult = load.await.context("the load generator")?;
            sent += r.sent;
            if with_move {
                failed += r.failed();
                stall.push(r.max_ms / 1000.0);
                p99_move.push(r.p99_ms / 1000.0);
            } else {
                still.push(r.max_ms / 1000.0);
                p99_still.push(r.p99_ms / 1000.0);
            }
        }
        // Suspended into the repository, then woken by a request.
        let here = running(client).await?;
        let started = Instant::now();
        crate::client::operate(
            client,
            Operation::Suspend {
                instance: here.id.clone(),
            },
        )
        .await?;
        suspend.push(started.elapsed().as_secs_f64());
        wait_state(client, &here.id, InstanceState::Suspended).await?;
        let took = first_request(&http, &url).await?;
        eprintln!(
            "run {}/{}: suspended, then the first request answered in {}",
            run + 1,
            b.runs,
            secs(took)
        );
        resume.push(took);
    }
    let rows = vec![
        vec![
            "first request to a service that never ran (activation from the repository, boot)"
                .into(),
            secs(cold),
            "1".into(),
        ],
        suspend.row(
            "suspend into the repository (the operation, end to end)",
            secs,
        ),
        resume.row(
            "first request to a suspended service (held while it resumes)",
            secs,
        ),
        op_wall.row("live migration: the operation, end to end", secs),
        downtime.row("live migration: QEMU's downtime (guest paused)", secs),
        stall.row(
            format!(
                "client-visible stall: slowest request of a {} s window with a migration",
                b.window
            ),
            secs,
        ),
        still.row("… the same, window without a migration", secs),
        vec![
            "p99 latency, window with a migration / without".into(),
            format!("{} / {}", p99_move.spread(secs), p99_still.spread(secs)),
            p99_move.count().to_string(),
        ],
        vec![
            "requests failed while migrating".into(),
            format!("{failed} of {sent} sent in all windows"),
            String::new(),
        ],
    ];
    println!(
        "{}",
        section(
            "Moves as a client sees them: live migration, suspend, resume",
            &format!(
                "vmatrix bench moves --runs {} --rps {} --window {}",
                b.runs, b.rps, b.window
            ),
            &format!(
                "a real `vmatrix up` of two machines (its default network: bridged where it runs as \
                 root; the reference guest, \
                 256 MiB, 1 vCPU; one instance, so every request goes to the moving guest), the \
                 load generator sending {} requests/s to the service through the switch, as \
                 clients would (the guest forks a shell per request, ~30 ms of emulated CPU: well \
                 within its capacity, so a pause's backlog drains at once — at 50 requests/s it \
                 did not on this host, and the stall reached seconds); every figure timed from the client's or \
                 the operator's side (the operation submitted to the API until it reports done; \
                 a request sent until its answer). Windows of {} s with a migration (started 2 s \
                 in) and without one, alternated, {} of each; then a suspend and one request \
                 that wakes the service. The repository and the guest's image are in the page \
                 cache (they were just written). Median (min–max).",
                b.rps, b.window, b.runs
            )
        )
    );
    println!("{}", table(&["measure", "median (min–max)", "runs"], &rows));
    println!(
        "- The stall is the longest any request waited: one that reaches the guest as it pauses \
         for the switch-over waits out the downtime and the moved guest's first answers on a QEMU \
         that has translated none of its code yet (TCG; the operation's \"serving … after\"). \
         With a second instance the switch sends new requests to it meanwhile: see the network \
         test in measurements.md.\n"
    );
    Ok(())
}

async fn run_load_owned(o: LoadOptions) -> LoadResult {
    run_load(&o).await
}

/// The downtime in an operation's result ("… downtime 85 ms …").
fn downtime_ms(text: &str) -> Option<f64> {
    let rest = &text[text.find("downtime ")? + "downtime ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Sends one request and waits for its answer: seconds. A 404 (the switch has not had the
/// service's route yet: it answers at once and wakes nothing) is sent again, for up to a minute.
async fn first_request(http: &reqwest::Client, url: &str) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = Instant::now();
        let r = http
            .get(url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let took = started.elapsed().as_secs_f64();
        if r.status() == reqwest::StatusCode::NOT_FOUND && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if !r.status().is_success() {
            bail!("GET {url}: {}", r.status());
        }
        return Ok(took);
    }
}

/// Polls `look` every 100 ms until it gives a value; after `secs`, says that `what` did not
/// happen.
async fn poll<T>(
    what: &str,
    secs: u64,
    mut look: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = look().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what} after {secs} s: `vmatrix events` says why");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn running(client: &ControllerClient) -> Result<InstanceInfo> {
    poll(
        &format!("{SERVICE} has no running instance"),
        60,
        async || {
            Ok(client
                .instances()
                .await?
                .into_iter()
                .find(|i| i.service.as_str() == SERVICE && i.state == InstanceState::Running))
        },
    )
    .await
}

async fn wait_state(
    client: &ControllerClient,
    id: &InstanceId,
    state: InstanceState,
) -> Result<()> {
    poll(&format!("{id} not {state:?}"), 60, async || {
        Ok(client
            .instances()
            .await?
            .iter()
            .any(|i| i.id == *id && i.state == state)
            .then_some(()))
    })
    .await
}

async fn wait_machines(client: &ControllerClient, n: usize) -> Result<()> {
    poll(&format!("{n} machines have not joined"), 120, async || {
        Ok((client.machines().await?.machines.len() >= n).then_some(()))
    })
    .await
}
