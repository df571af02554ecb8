//! The `vmatrix` command: the one binary of vMatrix. It parses arguments, sets up logging and
//! hands each subcommand to the library crates; it holds no logic of its own beyond printing.

mod bench;
mod image;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use vmatrix_core::InstanceId;
use vmatrix_vmm::{AccelChoice, ProbeBoot, Vm, VmSpec};

#[derive(Parser)]
#[command(
    name = "vmatrix",
    version,
    about = "Run Internet services as VMs over a shared pool of machines"
)]
struct Cli {
    /// Accelerator: auto (KVM only where a guest really boots on it), kvm or tcg.
    #[arg(long, global = true, env = "VMATRIX_ACCEL", default_value = "auto")]
    accel: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the matrix on this machine. For now: boot the reference guest (or --image) and
    /// serve it on --forward until Ctrl-C.
    Up {
        /// Data directory (guest image cache, VM directories).
        #[arg(long, env = "VMATRIX_DATA")]
        data: Option<PathBuf>,
        /// Host address and port forwarded to the guest's HTTP port.
        #[arg(long, default_value = "127.0.0.1:8080")]
        forward: SocketAddr,
        /// Boot this disk image (raw) instead of the reference guest.
        #[arg(long)]
        image: Option<PathBuf>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Guest vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
    },
    /// Measure parts of vMatrix on this machine and print the figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Build and inspect the reference guest.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// The dormant repository: import, export, tags, verify, gc.
    Image {
        /// Repository: file:///path (or a plain path). Default: DATA/repo.
        #[arg(long, env = "VMATRIX_REPO", global = true)]
        repo: Option<String>,
        /// Data directory (default repository and scratch space).
        #[arg(long, env = "VMATRIX_DATA", global = true)]
        data: Option<PathBuf>,
        #[command(subcommand)]
        command: image::ImageCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Boot, suspend, resume and live-migrate real guests; print a table of timings.
    Vmm {
        /// How many times to repeat each measurement.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Where to put scratch files (removed afterwards).
        #[arg(long, default_value = "/tmp")]
        work: PathBuf,
    },
    /// The repository against restic (ingest, second version) and lazy activation against a
    /// 64 MiB image and copy-then-boot.
    Store {
        /// Size of the big image.
        #[arg(long, default_value = "4G", value_parser = parse_size)]
        size: u64,
        /// Where to keep the images and repositories (reused between runs).
        #[arg(long, default_value = "/tmp")]
        work: PathBuf,
    },
}

#[derive(Subcommand)]
enum GuestCommand {
    /// Build the reference guest disk (cached: seconds when nothing changed).
    Build {
        /// Where to write the raw disk image.
        #[arg(long, default_value = "vmatrix-guest.img")]
        out: PathBuf,
        /// Disk size, e.g. 64M or 4G; above 64M the data partition is padded with realistic data.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        size: u64,
        /// Service name baked into the image.
        #[arg(long, default_value = "reference")]
        service: String,
        /// Version baked into the image.
        #[arg(long, default_value = "1")]
        version: String,
    },
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown unit {c:?} in {s:?}: use K, M, G or T")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("{s:?} is not a size: use a whole number with K, M, G or T (e.g. 4G)")
    })?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain once, on one line; no backtrace for users.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMATRIX_LOG")
                .unwrap_or_else(|_| "info,object_store=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let accel: AccelChoice = cli.accel.parse()?;
    match cli.command {
        Command::Up {
            data,
            forward,
            image,
            memory,
            vcpus,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(up(accel, data, forward, image, memory, vcpus))?;
        }
        Command::Image {
            repo,
            data,
            command,
        } => {
            let data = match data {
                Some(d) => d,
                None => default_data_dir()?,
            };
            let url = image::repo_url(repo, &data)?;
            image::run(command, &url, &data)?;
        }
        Command::Bench(BenchCommand::Vmm { runs, memory, work }) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(bench::vmm(accel, runs, memory, &work))?;
        }
        Command::Bench(BenchCommand::Store { size, work }) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(bench::store(accel, size, &work))?;
        }
        Command::Guest(GuestCommand::Build {
            out,
            size,
            service,
            version,
        }) => {
            let opts = vmatrix_guest::BuildOptions {
                out,
                size,
                service,
                version,
            };
            let image = vmatrix_guest::build(&opts).with_context(|| {
                format!("building the reference guest at {}", opts.out.display())
            })?;
            println!(
                "{} {} in {:.2}s ({} bytes)",
                if image.built { "built" } else { "up to date:" },
                image.disk.display(),
                image.elapsed.as_secs_f64(),
                std::fs::metadata(&image.disk).map(|m| m.len()).unwrap_or(0)
            );
        }
    }
    Ok(())
}

/// `$XDG_DATA_HOME/vmatrix`, else `~/.local/share/vmatrix`.
fn default_data_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("vmatrix"));
    }
    let home = std::env::var_os("HOME")
        .context("neither XDG_DATA_HOME nor HOME is set: pass --data DIR")?;
    Ok(PathBuf::from(home).join(".local/share/vmatrix"))
}

async fn up(
    accel: AccelChoice,
    data: Option<PathBuf>,
    forward: SocketAddr,
    image: Option<PathBuf>,
    memory: u32,
    vcpus: u32,
) -> Result<()> {
    let data = match data {
        Some(d) => d,
        None => default_data_dir()?,
    };
    std::fs::create_dir_all(&data)
        .with_context(|| format!("creating the data directory {}", data.display()))?;
    let guest = vmatrix_guest::build(&vmatrix_guest::BuildOptions::new(
        data.join("guest/reference.img"),
    ))
    .context("building the reference guest")?;
    tracing::info!(
        image = %guest.disk.display(),
        "reference guest {} in {:.2}s",
        if guest.built { "built" } else { "up to date" },
        guest.elapsed.as_secs_f64()
    );
    let disk = match image {
        Some(path) => {
            if !path.is_file() {
                bail!("--image {} is not a file", path.display());
            }
            path
        }
        None => guest.disk.clone(),
    };
    let accel = vmatrix_vmm::accel::resolve(
        accel,
        Some(&ProbeBoot {
            kernel: guest.kernel.clone(),
            initrd: guest.initrd.clone(),
        }),
    )
    .await;
    if std::net::TcpListener::bind(forward).is_err() {
        bail!(
            "{forward} is in use or not a local address: pass --forward ADDR:PORT with a free port"
        );
    }
    let mut spec = VmSpec::new(InstanceId::new("reference-1")?, &disk, forward, accel);
    spec.memory_mib = memory;
    spec.vcpus = vcpus;
    let dir = data.join("vms").join(spec.instance.as_str());
    tracing::info!(accel = accel.as_str(), dir = %dir.display(), "booting {}", spec.instance);
    let mut vm = Vm::boot(spec, &dir).await?;
    let waited = tokio::select! {
        r = vm.wait_ready(Duration::from_secs(120)) => r?,
        _ = shutdown_signal() => {
            tracing::info!("interrupted while booting; stopping");
            vm.kill().await;
            return Ok(());
        }
    };
    println!(
        "reference guest serving at {} (booted in {:.1}s); Ctrl-C stops it",
        vm.url(),
        waited.as_secs_f64()
    );
    shutdown_signal().await;
    tracing::info!("stopping {}", vm.spec().instance);
    let outcome = vm.stop(Duration::from_secs(10)).await?;
    tracing::info!("stopped ({outcome:?})");
    let _ = std::fs::remove_file(dir.join("qmp.sock"));
    Ok(())
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
