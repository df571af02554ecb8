//! `vmatrix bench vmm`: measures the hypervisor driver on this machine with real QEMU guests and
//! prints a table — guest build (cold and cached), boot to HTTP, suspend, resume, and live
//! migration (total, downtime, bytes). Figures, not pass/fail: speed targets live here, never
//! in timed tests.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use vmatrix_core::InstanceId;
use vmatrix_vmm::{AccelChoice, IncomingVm, ProbeBoot, Vm, VmSpec};

pub(crate) fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

#[derive(Default)]
struct Series {
    name: &'static str,
    unit: &'static str,
    values: Vec<f64>,
}

impl Series {
    fn new(name: &'static str, unit: &'static str) -> Self {
        Self {
            name,
            unit,
            values: Vec::new(),
        }
    }
    fn row(&self) -> String {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        let median = if v.is_empty() {
            f64::NAN
        } else {
            v[v.len() / 2]
        };
        let fmt = |x: f64| {
            if self.unit == "MiB" {
                format!("{x:.1}")
            } else {
                format!("{x:.3}")
            }
        };
        format!(
            "| {} | {} | {} | {} | {} | {} |",
            self.name,
            self.unit,
            fmt(median),
            fmt(v.first().copied().unwrap_or(f64::NAN)),
            fmt(v.last().copied().unwrap_or(f64::NAN)),
            v.len()
        )
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
    let accel = vmatrix_vmm::accel::resolve(
        accel,
        Some(&ProbeBoot {
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
        }),
    )
    .await;

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

    println!(
        "\nvmm benchmark: {runs} run(s), {memory_mib} MiB guest, accelerator {}, QEMU {}\n",
        accel.as_str(),
        tool_version("qemu-system-x86_64", "--version", 3)
    );
    println!("| measure | unit | median | min | max | runs |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for s in [
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
    ] {
        println!("{}", s.row());
    }
    Ok(())
}

/// Word `nth` of what `program arg` prints (its version), or "?".
fn tool_version(program: &str, arg: &str, nth: usize) -> String {
    std::process::Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(nth)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
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

/// `vmatrix bench store`: the repository against restic, and lazy activation against a small
/// image and against copy-then-boot.
pub async fn store(
    accel: AccelChoice,
    size: u64,
    work: &Path,
    opts: crate::bench_store::IngestOptions,
) -> Result<()> {
    use std::sync::Arc;
    use vmatrix_core::ImageRef;
    use vmatrix_store::{cache::ChunkCache, nbd, ExportFormat, Repository};

    let root = work.join("vmatrix-bench-store");
    std::fs::create_dir_all(&root)?;
    eprintln!("building guests (cached) …");
    let big = vmatrix_guest::build(&vmatrix_guest::BuildOptions {
        size,
        ..vmatrix_guest::BuildOptions::new(root.join("guest-big.img"))
    })?;
    let small = vmatrix_guest::build(&vmatrix_guest::BuildOptions::new(
        root.join("guest-64m.img"),
    ))?;
    let v2 = root.join("guest-big-v2.img");
    let changed = changed_copy(&big.disk, &v2, 0.03)?;

    for d in ["repo", "cache-small", "cache-big", "vms", "copy"] {
        let _ = std::fs::remove_dir_all(root.join(d));
    }
    let repo = Arc::new(Repository::open_or_init(&format!(
        "file://{}",
        root.join("repo").display()
    ))?);
    let r = |s: &str| ImageRef::parse(s).expect("valid ref");
    let mib = |b: u64| b as f64 / 1048576.0;

    eprintln!(
        "(a, b) ingest {} MiB and a changed version: whole processes, {} rounds after a \
         warm-up, {} s apart …",
        size >> 20,
        opts.rounds,
        opts.pause.as_secs()
    );
    let mut rows = crate::bench_store::ingest(&big.disk, &v2, size, changed * 4096, &root, opts)?;
    let scratch = root.join("tmp");
    eprintln!("(a) S3: requests per GiB imported …");
    rows.extend(tokio::task::block_in_place(|| {
        crate::bench_store::s3_requests(&big.disk, &v2, &root)
    })?);

    eprintln!("(c) activation to first HTTP answer …");
    tokio::task::block_in_place(|| repo.import(&big.disk, &r("big:v1"), &scratch, &|_| {}))?;
    tokio::task::block_in_place(|| repo.import(&small.disk, &r("small:v1"), &scratch, &|_| {}))?;
    let accel = vmatrix_vmm::accel::resolve(
        accel,
        Some(&ProbeBoot {
            kernel: small.kernel.clone(),
            initrd: small.initrd.clone(),
        }),
    )
    .await;
    let mut activation = Vec::new();
    for (label, image, cache_dir) in [
        ("lazy NBD, 64 MiB image", "small:v1", "cache-small"),
        ("lazy NBD, big image", "big:v1", "cache-big"),
    ] {
        let (_, manifest) = repo.resolve(&r(image))?;
        let cache = Arc::new(ChunkCache::new(
            repo.clone(),
            &root.join(cache_dir),
            4 << 30,
        )?);
        let export = nbd::Export::new("disk", manifest, cache.clone());
        let server = nbd::NbdServer::start(export, &root.join(format!("{cache_dir}.sock")))?;
        let spec = VmSpec::new(
            InstanceId::new(format!("bench-{cache_dir}"))?,
            vmatrix_vmm::BaseImage::Nbd {
                url: server.url("disk"),
            },
            free_addr()?,
            accel,
        );
        let started = tokio::time::Instant::now();
        let mut vm = Vm::boot(spec, root.join("vms").join(cache_dir)).await?;
        vm.wait_ready(Duration::from_secs(120)).await?;
        let took = started.elapsed().as_secs_f64();
        let fetched = cache
            .stats
            .fetched_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        vm.kill().await;
        drop(server);
        activation.push((label, took, fetched));
    }
    let started = tokio::time::Instant::now();
    let copy = root.join("copy/big.raw");
    std::fs::create_dir_all(root.join("copy"))?;
    tokio::task::block_in_place(|| repo.export(&r("big:v1"), &copy, ExportFormat::Raw, &|_| {}))?;
    let copied_in = started.elapsed().as_secs_f64();
    let spec = VmSpec::new(InstanceId::new("bench-copy")?, &copy, free_addr()?, accel);
    let mut vm = Vm::boot(spec, root.join("vms/copy")).await?;
    vm.wait_ready(Duration::from_secs(120)).await?;
    let copy_boot = started.elapsed().as_secs_f64();
    vm.kill().await;
    let small_t = activation[0].1;
    for (label, took, fetched) in &activation {
        rows.push([
            format!("(c) activate → HTTP, {label}"),
            format!("{took:.2} s ({:.1} MiB fetched)", mib(*fetched)),
            String::new(),
            format!("{:.2}x the 64 MiB image", took / small_t),
        ]);
    }
    rows.push([
        "(c) activate → HTTP, copy-then-boot big image".into(),
        format!("{copy_boot:.2} s (copy {copied_in:.2} s)"),
        String::new(),
        format!("{:.2}x the 64 MiB image", copy_boot / small_t),
    ]);
    let _ = std::fs::remove_file(&copy);

    println!(
        "\nstore benchmark: image {} MiB, accelerator {}, restic {}; ingest: whole processes \
         (`vmatrix image import` and `restic backup` with its cache), a fresh repository each \
         round on the file system of {}, page cache warm for both, runs alternated {} s apart, \
         {} rounds after a warm-up\n",
        size >> 20,
        accel.as_str(),
        tool_version("restic", "version", 1),
        work.display(),
        opts.pause.as_secs(),
        opts.rounds
    );
    println!("| measure | vmatrix | restic | note |");
    println!("| --- | --- | --- | --- |");
    for row in rows {
        println!("| {} | {} | {} | {} |", row[0], row[1], row[2], row[3]);
    }
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
    println!(
        "fleet: {} machines (16 vCPU, 4 GiB), {} services (mean demand ≈ {} instances' worth), {} steps of 1 min; built in {:.2}s",
        p.machines,
        p.services,
        p.demand,
        steps,
        built.as_secs_f64()
    );
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "simulating {bar:40} {pos}/{len} ticks, {eta} left",
        )
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
    let wall = sim_started.elapsed().as_secs_f64();
    let decide_total: f64 = ticks.iter().sum();
    let first = ticks.first().copied().unwrap_or(0.0);
    let mut sorted: Vec<f64> = ticks.iter().skip(1).copied().collect();
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
            * 1000.0
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
    println!("| figure | value |\n| --- | --- |");
    let rows = [
        ("wall time, whole simulation", format!("{wall:.1} s")),
        (
            "decide, all ticks",
            format!("{decide_total:.1} s ({:.0}% of the wall)", decide_total / wall * 100.0),
        ),
        (
            "decide, first tick (places the whole fleet)",
            format!("{:.0} ms", first * 1000.0),
        ),
        (
            "decide per tick after it: mean / p50 / p99 / max",
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2} ms",
                sorted.iter().sum::<f64>() / sorted.len().max(1) as f64 * 1000.0,
                q(0.5),
                q(0.99),
                q(1.0)
            ),
        ),
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
                "{} starts, {:.0} machine-hours, peak {} machines, {:.2}% served ({reference:.1} s)",
                reactive.activations,
                reactive.machine_hours,
                reactive.peak_machines,
                r_served / r_demand.max(1e-9) * 100.0
            ),
        ),
    ];
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
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
}
