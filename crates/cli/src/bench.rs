//! `vmatrix bench vmm`: measures the hypervisor driver on this machine with real QEMU guests and
//! prints a table — guest build (cold and cached), boot to HTTP, suspend, resume, and live
//! migration (total, downtime, bytes). Figures, not pass/fail: speed targets live here, never
//! in timed tests.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use vmatrix_core::InstanceId;
use vmatrix_vmm::{AccelChoice, IncomingVm, Vm, VmSpec};

use crate::bench_stats::{tool_version, Runs};

pub(crate) fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One measure of `bench vmm`.
struct Series {
    name: &'static str,
    unit: &'static str,
    values: Runs,
}

impl Series {
    fn new(name: &'static str, unit: &'static str) -> Self {
        Self {
            name,
            unit,
            values: Runs::default(),
        }
    }
    fn row(&self) -> Vec<String> {
        let unit = self.unit;
        let f = |x: f64| {
            if unit == "MiB" {
                format!("{x:.1} MiB")
            } else {
                crate::bench_stats::secs(x)
            }
        };
        self.values.row(self.name, f)
    }
}

/// Runs the driver benchmark `runs` times in scratch directories under `work`.
pub async fn vmm(accel: AccelChoice, runs: usize, memory_mib: u32, work: &Path) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let scratch = tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in(work)
        .context("creating a scratch directory")?;
    let root = scratch.path();

    let mut build_cold = Series::new("guest build, cold", "s");
    let mut build_cached = Series::new("guest build, cached", "s");
    let mut image = None;
    for i in 0..runs {
        let opts = vmatrix_guest::BuildOptions::new(root.join(format!("guest-{i}/ref.img")));
        let cold = vmatrix_guest::build(&opts)?;
        build_cold.values.push(cold.elapsed.as_secs_f64());
        let cached = vmatrix_guest::build(&opts)?;
        if cached.built {
            return Err(anyhow!(
                "the second build of identical inputs was not cached"
            ));
        }
        build_cached.values.push(cached.elapsed.as_secs_f64());
        image = Some(cold);
    }
    let image = image.ok_or_else(|| anyhow!("--runs must be at least 1"))?;
    let accel = crate::resolve_accel(accel, &image).await;

    let mut boot = Series::new("boot to HTTP", "s");
    let mut suspend = Series::new("suspend to file", "s");
    let mut state = Series::new("saved state size", "MiB");
    let mut resume = Series::new("resume from file", "s");
    let mut resume_http = Series::new("resume to HTTP", "s");
    let mut mig_total = Series::new("migration total (QEMU)", "s");
    let mut mig_down = Series::new("migration downtime (QEMU)", "s");
    let mut mig_wall = Series::new("migration wall, disk mirror included", "s");
    let mut mig_ram = Series::new("migration RAM sent", "MiB");
    let mut mig_disk = Series::new("migration disk mirrored", "MiB");
    let mib = |b: u64| b as f64 / 1048576.0;

    for i in 0..runs {
        eprintln!("run {}/{runs} …", i + 1);
        let id = InstanceId::new(format!("bench-{i}"))?;
        let mut spec = VmSpec::new(id, &image.disk, free_addr()?, accel);
        spec.memory_mib = memory_mib;
        let run = root.join(format!("run-{i}"));
        let started = tokio::time::Instant::now();
        let mut vm = Vm::boot(spec.clone(), run.join("a")).await?;
        vm.wait_ready(Duration::from_secs(120)).await?;
        boot.values.push(started.elapsed().as_secs_f64());
        let _ = vmatrix_vmm::http::request(
            spec.forward,
            "PUT",
            "/disk/x",
            b"bench",
            Duration::from_secs(10),
        )
        .await?;

        let suspended = vm
            .suspend(
                &run.join("a/state.bin"),
                std::time::Duration::from_secs(120),
            )
            .await?;
        suspend.values.push(suspended.elapsed.as_secs_f64());
        state.values.push(mib(suspended.state_bytes));

        let b = spec.with_forward(free_addr()?);
        let started = tokio::time::Instant::now();
        let (mut vm, took) = Vm::resume(b.clone(), run.join("b"), &suspended).await?;
        resume.values.push(took.as_secs_f64());
        vm.wait_ready(Duration::from_secs(30)).await?;
        resume_http.values.push(started.elapsed().as_secs_f64());

        let c = spec.with_forward(free_addr()?);
        let incoming = IncomingVm::start(c, run.join("c"), "127.0.0.1".parse()?, None).await?;
        let report = vm
            .migrate_out(incoming.target())
            .await
            .map_err(|f| anyhow!("{f}"))?;
        let mut dest = incoming.finish(Duration::from_secs(60)).await?;
        dest.wait_ready(Duration::from_secs(30)).await?;
        mig_total.values.push(report.total_ms as f64 / 1000.0);
        mig_down.values.push(report.downtime_ms as f64 / 1000.0);
        mig_wall.values.push(report.wall.as_secs_f64());
        mig_ram.values.push(mib(report.ram_bytes));
        mig_disk.values.push(mib(report.disk_bytes));
        dest.kill().await;
    }

    let rows: Vec<Vec<String>> = [
        &build_cold,
        &build_cached,
        &boot,
        &suspend,
        &state,
        &resume,
        &resume_http,
        &mig_total,
        &mig_down,
        &mig_wall,
        &mig_ram,
        &mig_disk,
    ]
    .iter()
    .map(|s| s.row())
    .collect();
    println!(
        "{}",
        crate::bench_stats::section(
            "The hypervisor driver: boot, suspend, resume, live migration",
            &format!("vmatrix bench vmm --runs {runs} --memory {memory_mib}"),
            &format!(
                "the driver alone, in-process, timed from the call to the guest's first HTTP \
                 answer on its forwarded port; {runs} runs one after the other, each a fresh guest \
                 ({memory_mib} MiB, 1 vCPU, accelerator {}, QEMU {}); the reference guest's disk \
                 in the page cache (built just before). Median (min–max).",
                accel.as_str(),
                tool_version("qemu-system-x86_64", "--version", 3)
            )
        )
    );
    println!(
        "{}",
        crate::bench_stats::table(&["measure", "median (min–max)", "runs"], &rows)
    );
    println!(
        "- *Boot to HTTP*: from `Vm::boot` (overlay, QEMU start) to the first 200 from `/health`, \
         through SeaBIOS, the kernel and the initramfs.\n\
         - *Resume to HTTP*: a new QEMU process loading the saved state until `/health` answers.\n\
         - *Migration downtime* (QEMU's own figure) includes ending the disk mirror while the \
         guest is paused; *wall* is the whole move, disk mirror included. Only the overlay's \
         clusters travel: both ends share the base image.\n"
    );
    Ok(())
}

/// Makes `dst`: a copy of `src` with `fraction` of its 4 KiB blocks rewritten, in clustered runs
/// of 64 blocks (how files change on a real disk), deterministically.
fn changed_copy(src: &Path, dst: &Path, fraction: f64) -> Result<u64> {
    use std::io::{Seek, SeekFrom, Write};
    std::fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    let len = std::fs::metadata(dst)?.len();
    let blocks = len / 4096;
    let runs = ((blocks as f64 * fraction) / 64.0).ceil() as u64;
    let stride = (blocks / runs.max(1)).max(64);
    let mut f = std::fs::OpenOptions::new().write(true).open(dst)?;
    let mut buf = vec![0u8; 64 * 4096];
    let mut changed = 0;
    for r in 0..runs {
        let start = r * stride;
        if start + 64 > blocks {
            break;
        }
        blake3::Hasher::new()
            .update(&r.to_le_bytes())
            .finalize_xof()
            .fill(&mut buf);
        f.seek(SeekFrom::Start(start * 4096))?;
        f.write_all(&buf)?;
        changed += 64;
    }
    f.sync_all()?;
    Ok(changed)
}

/// `vmatrix bench store`: the repository against restic and borg (ingest, a changed version,
/// disk used), and the requests an import sends to S3.
pub async fn store(size: u64, work: &Path, opts: crate::bench_store::IngestOptions) -> Result<()> {
    let root = work.join("vmatrix-bench-store");
    std::fs::create_dir_all(&root)?;
    eprintln!("building guests (cached) …");
    let big = vmatrix_guest::build(&vmatrix_guest::BuildOptions {
        size,
        ..vmatrix_guest::BuildOptions::new(root.join("guest-big.img"))
    })?;
    let v2 = root.join("guest-big-v2.img");
    let changed = changed_copy(&big.disk, &v2, 0.03)?;
    eprintln!(
        "ingest {} MiB and a changed version: whole processes, {} rounds after a warm-up, {} s \
         apart …",
        size >> 20,
        opts.rounds,
        opts.pause.as_secs()
    );
    let (mut rows, sides) =
        crate::bench_store::ingest(&big.disk, &v2, size, changed * 4096, &root, opts)?;
    eprintln!("S3: requests per GiB imported …");
    let s3 =
        tokio::task::block_in_place(|| crate::bench_store::s3_requests(&big.disk, &v2, &root))?;
    let _ = std::fs::remove_file(&v2);
    let mut headers = vec!["measure"];
    headers.extend(sides.iter().map(|s| s.name()));
    headers.push("note");
    for row in s3 {
        let mut r = vec![row[0].clone(), row[1].clone()];
        r.extend(std::iter::repeat_n(String::new(), sides.len() - 1));
        r.push(row[3].clone());
        rows.push(r);
    }
    println!(
        "{}",
        crate::bench_stats::section(
            "The dormant repository against restic and borg",
            &format!(
                "vmatrix bench store --size {}M --rounds {} --pause {}",
                size >> 20,
                opts.rounds,
                opts.pause.as_secs()
            ),
            &format!(
                "whole processes, each as its user runs it (`vmatrix image import`, `restic \
                 backup` with its cache, `borg create`), timed from start to exit, durability \
                 included (each syncs before it ends); a fresh repository for each side in \
                 every round, on the same file system ({}); the sides alternated (each first in \
                 turn), {} s apart after a `sync`, {} counted rounds after a warm-up round; the \
                 source image read just before each run (in the page cache for every side alike: \
                 borg drops what it reads from the cache). The \
                 image: the reference guest padded with realistic data to {} MiB; the second \
                 version has {:.1}% of its blocks rewritten in clustered runs. Median (min–max). \
                 What differs, by design: {}.",
                work.display(),
                opts.pause.as_secs(),
                opts.rounds,
                size >> 20,
                changed as f64 * 4096.0 * 100.0 / size as f64,
                crate::bench_store::DIFFERENCES
            )
        )
    );
    println!("{}", crate::bench_stats::table(&headers, &rows));
    Ok(())
}

/// The policy at scale: a synthetic fleet made from the shipped demand traces, simulated with
/// the same `decide` the controller runs; prints the wall time and the time of each `decide`.
pub fn policy(p: &PolicyBench) -> Result<()> {
    use std::time::Instant;
    use vmatrix_sim::scale::{fleet, Fleet};
    use vmatrix_sim::{run_with, PolicyKind, Pool, Settings};

    let started = Instant::now();
    let mut shapes = Vec::new();
    for name in [
        "sports_worldcup98_0501-0624_per_min.csv",
        "web_nasa_1995-07-01_to_07-28_per_min.csv",
        "finance_profile_4weeks_per_min.csv",
    ] {
        let path = p.traces.join(name);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (the shipped traces: run from the repository or pass --traces DIR)",
                path.display()
            )
        })?;
        let trace = vmatrix_sim::parse_trace(&text, 60.0, None, None)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        shapes.push(trace.demand);
    }
    let steps = (p.days * 1440.0).round() as usize;
    let services = fleet(
        &shapes,
        &Fleet {
            services: p.services,
            instances: p.demand,
            steps,
            history: 7 * 1440,
            capacity_rps: 50.0,
            seed: 1,
        },
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let built = started.elapsed();
    let pool = Pool::new(p.machines, 16, 4096);
    let config: Settings = crate::policy_file::load(
        p.policy_file.as_deref(),
        &crate::policy_file::PolicyFlags::default(),
    )?;
    eprintln!(
        "fleet: {} machines (16 vCPU, 4 GiB), {} services (mean demand ≈ {} instances' worth), {} \
         steps of 1 min; built in {:.2}s",
        p.machines,
        p.services,
        p.demand,
        steps,
        built.as_secs_f64()
    );
    if p.runs == 0 {
        anyhow::bail!("--runs 0: give at least 1 (3 for a median and a range)");
    }
    let (mut wall, mut decide_all, mut first_tick) =
        (Runs::default(), Runs::default(), Runs::default());
    let (mut mean_tick, mut p50, mut p99, mut max_tick) = (
        Runs::default(),
        Runs::default(),
        Runs::default(),
        Runs::default(),
    );
    let mut outcome: Option<(usize, vmatrix_sim::Summary)> = None;
    for run in 0..p.runs {
        let bar = indicatif::ProgressBar::new(steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "run {}/{}: simulating {{bar:40}} {{pos}}/{{len}} ticks, {{eta}} left",
                run + 1,
                p.runs
            ))
            .expect("valid template"),
        );
        let mut ticks: Vec<f64> = Vec::with_capacity(steps);
        let mut actions = 0usize;
        let sim_started = Instant::now();
        let summary = run_with(
            PolicyKind::SwitchingDrop,
            &services,
            &pool,
            &config,
            &mut |snap, cfg| {
                let t = Instant::now();
                let plan = vmatrix_sim::decide(snap, cfg);
                ticks.push(t.elapsed().as_secs_f64());
                actions += plan.len();
                bar.inc(1);
                plan
            },
        );
        bar.finish_and_clear();
        let took = sim_started.elapsed().as_secs_f64();
        wall.push(took);
        decide_all.push(ticks.iter().sum());
        first_tick.push(ticks.first().copied().unwrap_or(0.0));
        let mut sorted: Vec<f64> = ticks.iter().skip(1).copied().collect();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        mean_tick.push(sorted.iter().sum::<f64>() / sorted.len().max(1) as f64);
        p50.push(q(0.5));
        p99.push(q(0.99));
        max_tick.push(q(1.0));
        eprintln!("run {}/{}: {took:.1} s", run + 1, p.runs);
        // The simulation is deterministic: every run must decide the same.
        if let Some((a, prev)) = &outcome {
            if *a != actions || prev.activations != summary.activations {
                anyhow::bail!(
                    "run {} decided differently from the first ({actions} vs {a} actions): the \
                     policy is not deterministic",
                    run + 1
                );
            }
        }
        outcome = Some((actions, summary));
    }
    let Some((actions, summary)) = outcome else {
        anyhow::bail!("no run");
    };
    let placed = &summary.instances_per_step;
    let mean_placed = placed.iter().sum::<usize>() as f64 / placed.len().max(1) as f64;
    let peak_placed = placed.iter().copied().max().unwrap_or(0);
    let (demand, served): (f64, f64) = summary
        .services
        .values()
        .fold((0.0, 0.0), |(d, s), x| (d + x.demand, s + x.served));
    let reference = Instant::now();
    let reactive = run_with(
        PolicyKind::Reactive,
        &services,
        &pool,
        &config,
        &mut |_, _| Vec::new(),
    );
    let reference = reference.elapsed().as_secs_f64();
    let (r_demand, r_served): (f64, f64) = reactive
        .services
        .values()
        .fold((0.0, 0.0), |(d, s), x| (d + x.demand, s + x.served));
    let ms = |x: f64| format!("{:.2} ms", x * 1000.0);
    let s1 = |x: f64| format!("{x:.1} s");
    let rows: Vec<Vec<String>> = [
        ("wall time, whole simulation", wall.spread(s1)),
        ("decide, all ticks", decide_all.spread(s1)),
        (
            "decide, first tick (places the whole fleet)",
            first_tick.spread(ms),
        ),
        ("decide per tick after it: mean", mean_tick.spread(ms)),
        ("decide per tick: p50", p50.spread(ms)),
        ("decide per tick: p99", p99.spread(ms)),
        ("decide per tick: max", max_tick.spread(ms)),
        (
            "instances placed: mean / peak",
            format!("{mean_placed:.0} / {peak_placed}"),
        ),
        (
            "actions (starts, suspends, moves, drops)",
            format!(
                "{actions} ({} starts, {} migrations)",
                summary.activations, summary.migrations
            ),
        ),
        (
            "machines in use: peak / machine-hours",
            format!("{} / {:.0}", summary.peak_machines, summary.machine_hours),
        ),
        (
            "demand served",
            format!("{:.2}%", served / demand.max(1e-9) * 100.0),
        ),
        (
            "reference: reactive (HPA rule, unlimited machines, free re-packing)",
            format!(
                "{} starts, {:.0} machine-hours, peak {} machines, {:.2}% served ({reference:.1} s, one run)",
                reactive.activations,
                reactive.machine_hours,
                reactive.peak_machines,
                r_served / r_demand.max(1e-9) * 100.0
            ),
        ),
    ]
    .into_iter()
    .map(|(k, v)| vec![k.to_string(), v])
    .collect();
    println!(
        "{}",
        crate::bench_stats::section(
            "The policy at scale",
            &format!(
                "vmatrix bench policy --machines {} --services {} --demand {} --days {} --runs {}",
                p.machines, p.services, p.demand, p.days, p.runs
            ),
            &format!(
                "the simulator in one process on one core, the policy's `decide` timed around \
                 each call; {} machines of 16 vCPU / 4 GiB, {} services (a quarter of them 2 vCPU \
                 / 512 MiB instances, priorities 1–10), each taking the World Cup, NASA or \
                 FINANCE-profile shape from its own day and time zone, sized to a mean demand of \
                 {} instances' worth; a week of history, then {} day(s) at 1-minute steps (a \
                 `decide` a second into each step on the demand seen), every action carried out \
                 by the simulator; the policy's settings {}. {} runs of the same input: timings \
                 median (min–max); the outcome is the same in every run (checked).",
                p.machines,
                p.services,
                p.demand,
                p.days,
                p.policy_file
                    .as_ref()
                    .map_or("the built-in defaults `vmatrix up` runs".to_string(), |f| {
                        format!("from {}", f.display())
                    }),
                p.runs
            )
        )
    );
    println!("{}", crate::bench_stats::table(&["figure", "value"], &rows));
    Ok(())
}

/// `vmatrix bench policy` options.
#[derive(clap::Args)]
pub struct PolicyBench {
    /// Machines in the pool.
    #[arg(long, default_value_t = 10_000)]
    pub machines: usize,
    /// Services.
    #[arg(long, default_value_t = 1_000)]
    pub services: usize,
    /// The fleet's mean demand, in instances' worth. The policy places about 1.6 times as
    /// many (headroom, the weekly forecast, one instance at least per service): the default
    /// gives about 100,000 instances.
    #[arg(long, default_value_t = 60_000)]
    pub demand: usize,
    /// Days simulated (after a week of history).
    #[arg(long, default_value_t = 7.0)]
    pub days: f64,
    /// Where the shipped demand traces are.
    #[arg(long, default_value = "examples/traces")]
    pub traces: std::path::PathBuf,
    /// The policy's settings (default: the built-in ones `vmatrix up` runs).
    #[arg(long)]
    pub policy_file: Option<std::path::PathBuf>,
    /// Runs of the same simulation (timings: median and range).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}
