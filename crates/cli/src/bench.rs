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

fn free_addr() -> Result<SocketAddr> {
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

        let suspended = vm.suspend(&run.join("a/state.bin")).await?;
        suspend.values.push(suspended.elapsed.as_secs_f64());
        state.values.push(mib(suspended.state_bytes));

        let b = spec.with_forward(free_addr()?);
        let started = tokio::time::Instant::now();
        let (mut vm, took) = Vm::resume(b.clone(), run.join("b"), &suspended).await?;
        resume.values.push(took.as_secs_f64());
        vm.wait_ready(Duration::from_secs(30)).await?;
        resume_http.values.push(started.elapsed().as_secs_f64());

        let c = spec.with_forward(free_addr()?);
        let incoming = IncomingVm::start(c, run.join("c"), "127.0.0.1".parse()?).await?;
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
        qemu_version()
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

fn qemu_version() -> String {
    std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(3)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}
