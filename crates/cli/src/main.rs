//! The `vmatrix` command: the one binary of vMatrix. It parses arguments, sets up logging and
//! hands each subcommand to the library crates; it holds no logic of its own beyond printing.

mod bench;
mod bench_activation;
mod bench_moves;
mod bench_stats;
mod bench_store;
mod client;
mod cluster;
mod console;
mod demo;
mod demo_run;
mod demo_trace;
mod ha;
mod image;
mod lifecycle;
mod network;
mod own_matrix;
mod policy_file;
mod sim;
mod suite;
mod switch_bench;
mod trust;
mod volume;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vmatrix_core::api::Operation;
use vmatrix_core::{InstanceId, ServiceName};
use vmatrix_vmm::AccelChoice;

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
    /// Data directory (default $XDG_DATA_HOME/vmatrix or ~/.local/share/vmatrix).
    #[arg(long, global = true, env = "VMATRIX_DATA")]
    data: Option<PathBuf>,
    /// The controller's API URL (default: the one `vmatrix up` wrote in the data directory).
    #[arg(long, global = true, env = "VMATRIX_API")]
    api: Option<String>,
    /// The authority an https controller's certificate must come from (PEM; default: the
    /// controller's DATA/controller/tls/ca-cert.pem).
    #[arg(long, global = true, env = "VMATRIX_CA")]
    ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole matrix on this machine: a controller and N agents on 127.0.0.2…, with the
    /// reference guest imported as guest:v1. Ctrl-C stops everything.
    Up {
        /// How many real machines (agents) to simulate.
        #[arg(long, default_value_t = 3)]
        machines: u32,
        /// The API address.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// vCPUs each machine offers.
        #[arg(long, default_value_t = 4)]
        vcpus: u32,
        /// Memory each machine offers, MiB.
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        /// The switch's address (the front door of every service).
        #[arg(long, default_value = "127.0.0.1:8080")]
        switch_listen: SocketAddr,
        /// switching: the load-driven policy (scale from demand, server drop, consolidation);
        /// min: manual mode (keep each service's min instances; moves are the operator's).
        #[arg(long, default_value = "switching")]
        policy: String,
        /// The policy's settings: a TOML file with a `[policy]` table (docs/operations.md);
        /// default: the built-in settings, which `vmatrix sim` runs too.
        #[arg(long)]
        policy_file: Option<PathBuf>,
        #[command(flatten)]
        policy_flags: policy_file::PolicyFlags,
        /// Shared machines (sm1…) besides the dedicated ones: where maintenance instances run
        /// (`vmatrix maintain`), never live traffic.
        #[arg(long, default_value_t = 0)]
        shared: u32,
        /// Discard maintenance instances unused (no console, no commit) for this long, e.g. 2h
        /// (default: never).
        #[arg(long, value_parser = parse_duration)]
        maintenance_idle: Option<std::time::Duration>,
        #[command(flatten)]
        net: network::UpNet,
        #[command(flatten)]
        tls: network::TlsFlags,
        #[command(flatten)]
        api_tls: trust::ApiTls,
        /// High availability: three etcd members (Debian's etcd-server) and two controllers
        /// sharing their state there (one leads, the other stands by), restarted by `up` when
        /// they die.
        #[arg(long)]
        ha: bool,
        /// With --ha, the first of 7 ports it uses: the second controller's, then the etcd
        /// members' client and peer ports (default: the API port + 100).
        #[arg(long)]
        ha_ports: Option<u16>,
        /// Leave a child that dies (the controller, an agent, the switch) ended. By default
        /// `up` starts it again (an agent inside its machine's network namespace, where it takes
        /// its VMs back); for tests that kill and restart processes themselves.
        #[arg(long)]
        no_restart: bool,
    },
    /// Run the switch: the front door that follows VMs.
    Switch {
        /// The controller's URL (default: the one in the data directory).
        #[arg(long)]
        controller: Option<String>,
        /// Where clients connect.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Seconds a request may wait for a dormant service to wake.
        #[arg(long, default_value_t = 60)]
        hold_timeout: u64,
        /// Most requests held per waking service.
        #[arg(long, default_value_t = 1000)]
        max_held: usize,
        #[command(flatten)]
        tls: network::TlsFlags,
        #[command(flatten)]
        limits: network::SwitchLimitFlags,
    },
    /// Send load: a constant rate or a trace (CSV t_seconds,value), and report what came back.
    Load {
        /// URL to request, e.g. http://127.0.0.1:8080/s/sports/
        #[arg(long)]
        target: String,
        /// Requests per second (constant).
        #[arg(long, conflicts_with = "trace")]
        rate: Option<f64>,
        /// Seconds to run at --rate.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// A trace: CSV t_seconds,value.
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Trace seconds per real second.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Requests per second per trace unit.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Mark a service dropped: the switch refuses its requests at once (503).
    Drop {
        /// The service.
        service: ServiceName,
    },
    /// Clear a service's dropped mark.
    Undrop {
        /// The service.
        service: ServiceName,
    },
    /// Let the policy move an instance again: `migrate --to`, `activate --on` and `resume --on`
    /// pin it where they put it (for the policy's `pin_s`, 30 minutes by default).
    Unpin {
        /// The instance.
        instance: InstanceId,
    },
    /// Bring a dormant service back.
    Wake {
        /// The service.
        service: ServiceName,
    },
    /// Follow an operation (its id is printed when it runs longer than a few seconds) to its end.
    Operation {
        /// The operation's id.
        id: u64,
    },
    /// Run the controller (desired state, reconcile loop, API).
    Controller {
        /// The API address.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// Where the state lives: sqlite:PATH (default DATA/controller/state.db), or
        /// etcd://HOST:PORT[,HOST:PORT…][/PREFIX] for controllers in high availability (one
        /// leads, the others stand by; see docs/operations.md).
        #[arg(long)]
        state: Option<String>,
        /// switching: the load-driven policy (scale from demand, server drop, consolidation);
        /// min: manual mode (keep each service's min instances; moves are the operator's).
        #[arg(long, default_value = "switching")]
        policy: String,
        /// The policy's settings: a TOML file with a `[policy]` table (docs/operations.md);
        /// default: the built-in settings, which `vmatrix sim` runs too.
        #[arg(long)]
        policy_file: Option<PathBuf>,
        #[command(flatten)]
        policy_flags: policy_file::PolicyFlags,
        /// Discard maintenance instances unused (no console, no commit) for this long, e.g. 2h
        /// (default: never).
        #[arg(long, value_parser = parse_duration)]
        maintenance_idle: Option<std::time::Duration>,
        #[command(flatten)]
        net: network::ControllerNet,
        /// Let every new machine name join without an operator's approval (`vmatrix machine
        /// approve NAME`); `vmatrix up` runs its controller so.
        #[arg(long)]
        auto_approve: bool,
        #[command(flatten)]
        api_tls: trust::ApiTls,
    },
    /// Run an agent for one real machine.
    Agent {
        /// The controller's URL.
        #[arg(long)]
        controller: String,
        /// Where the agent listens; its IP is also where guests are forwarded.
        #[arg(long)]
        listen: SocketAddr,
        /// Machine name (default from the address).
        #[arg(long)]
        name: Option<String>,
        /// dedicated (live load) or shared (maintenance only).
        #[arg(long, default_value = "dedicated")]
        role: String,
        /// vCPUs offered.
        #[arg(long, default_value_t = 4)]
        vcpus: u32,
        /// Memory offered, MiB.
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        /// Repository URL (default file://DATA/repo).
        #[arg(long)]
        repo: Option<String>,
        /// Chunk cache bound.
        #[arg(long, default_value = "2G", value_parser = vmatrix_core::volume::parse_size)]
        cache_size: u64,
        /// What happens to this machine's VMs when the agent is stopped (SIGTERM, Ctrl-C):
        /// stop (the machine leaves the matrix) or keep (an upgrade: the next agent adopts
        /// them). A crashed or killed agent always leaves them running for the next one.
        #[arg(long, default_value = "stop", value_parser = ["stop", "keep"])]
        on_exit: String,
        /// The unprivileged user every QEMU becomes once it has opened its files, when the
        /// agent runs as root (scripts/install-deps.sh creates vmatrix-qemu). QEMU always runs
        /// under its seccomp sandbox.
        #[arg(long, default_value = "vmatrix-qemu")]
        qemu_user: String,
        /// Run QEMU without a control group of its own. By default, as root on a host that
        /// mounts the cpu and memory controllers, each QEMU is limited to its vCPUs plus one
        /// and its RAM plus a quarter and 384 MiB.
        #[arg(long, env = "VMATRIX_NO_CGROUPS")]
        no_cgroups: bool,
        #[command(flatten)]
        net: network::AgentNet,
    },
    /// The fencing watchdog of one machine (started by its agent): stops the machine's VMs
    /// when the agent's lease from the controller lapses.
    #[command(hide = true)]
    Fence {
        /// The machine's data directory (DATA/agents/NAME).
        #[arg(long)]
        machine_dir: PathBuf,
    },
    /// Declare the services (replaces the previous set).
    Apply {
        /// The services file (TOML, see examples/services.toml).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List the declared services.
    Services {
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the real machines (and the names that wait for an operator's approval to join).
    Machines {
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Decide about a machine's identity: approve a new name, or forget one.
    Machine {
        #[command(subcommand)]
        action: MachineAction,
    },
    /// The matrix: one row per instance.
    Ps {
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// The event log.
    Events {
        /// Keep printing new events.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Start one more instance of a service.
    Activate {
        /// The service.
        service: ServiceName,
        /// The machine to use.
        #[arg(long)]
        on: Option<String>,
    },
    /// Suspend an instance into the repository.
    Suspend {
        /// The instance.
        instance: InstanceId,
    },
    /// Resume a suspended instance.
    Resume {
        /// The instance.
        instance: InstanceId,
        /// The machine to resume on.
        #[arg(long)]
        on: Option<String>,
    },
    /// Live-migrate an instance to another machine.
    Migrate {
        /// The instance.
        instance: InstanceId,
        /// The destination machine.
        #[arg(long)]
        to: String,
    },
    /// Throw an instance away.
    Discard {
        /// The instance.
        instance: InstanceId,
    },
    /// Move every instance off a machine (host maintenance); `undrain` gives it back.
    Drain {
        /// The machine.
        machine: String,
    },
    /// Attach the terminal to an instance's serial console (any instance that runs). Several
    /// sessions may read; one writes. Ctrl-] detaches.
    Console {
        /// The instance.
        instance: InstanceId,
        /// Only watch (never take the writer's place).
        #[arg(long)]
        read_only: bool,
    },
    /// Store an instance's disk as a new version of its image (only the chunks it changed are
    /// new); the instance keeps running. Run `sync` in the guest first: what it has not
    /// written to its disk is not committed.
    Commit {
        /// The instance (a maintenance instance, usually).
        instance: InstanceId,
        /// The tag to publish, NAME:TAG.
        #[arg(long)]
        tag: vmatrix_core::ImageRef,
        /// Why: kept in the history (`vmatrix image log NAME`).
        #[arg(long, short = 'm')]
        message: Option<String>,
        /// Who (default: $USER@host).
        #[arg(long)]
        author: Option<String>,
    },
    /// Replace a service's live instances by another version, batch by batch, with no failed
    /// request: each new instance must pass its health check before an old one leaves; one
    /// that fails stops the rollout and puts the old version back. `--status` shows progress.
    Rollout {
        /// The service.
        service: ServiceName,
        /// The version to run, NAME:TAG.
        #[arg(long, required_unless_present = "status")]
        to: Option<vmatrix_core::ImageRef>,
        /// Instances replaced at once.
        #[arg(long, default_value_t = 1)]
        batch: u32,
        /// Time between batches, e.g. 30s.
        #[arg(long, value_parser = parse_duration_or_zero, default_value = "0s")]
        pause: std::time::Duration,
        /// How long a new instance may take to pass its health check.
        #[arg(long, value_parser = parse_duration, default_value = "180s")]
        health_timeout: std::time::Duration,
        /// Show where the service's last rollout is, instead.
        #[arg(long)]
        status: bool,
        /// With --status: JSON for scripts.
        #[arg(long, requires = "status")]
        json: bool,
    },
    /// Return a service to the version it ran before its last rollout, the same way.
    Rollback {
        /// The service.
        service: ServiceName,
        /// Instances replaced at once.
        #[arg(long, default_value_t = 1)]
        batch: u32,
        /// Time between batches, e.g. 30s.
        #[arg(long, value_parser = parse_duration_or_zero, default_value = "0s")]
        pause: std::time::Duration,
    },
    /// Give a drained machine back to the policy.
    Undrain {
        /// The machine.
        machine: String,
    },
    /// Start a maintenance instance of a service on a shared machine: it gets no live traffic
    /// and the policy never moves, scales or drops it. Patch it (`vmatrix console`), commit it
    /// as a new version (`vmatrix commit`), end it with `vmatrix discard`.
    Maintain {
        /// The service.
        service: ServiceName,
        /// Another version to run: a tag of the service's image (`v2`) or `NAME:TAG`.
        #[arg(long)]
        version: Option<String>,
        /// The shared machine to use (default: the one with the most free memory).
        #[arg(long)]
        on: Option<String>,
    },
    /// Simulate policies over demand traces and compare them (machine-hours, drops, moves).
    Sim(Box<sim::SimArgs>),
    /// The idea in a few minutes: finance and sports replay a trading day and a match day
    /// through the switch on a small pool, with a malfunction and a rollout along the way; a
    /// live view, then a summary against static provisioning and the lower bound.
    Demo(demo::DemoArgs),
    /// Measure parts of vMatrix on this machine and print the figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Build and inspect the reference guest.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// The dormant repository: import, export, tags, verify, gc.
    Image {
        /// Repository: file:///path (or a plain path) or s3://bucket/prefix. Default: DATA/repo.
        #[arg(long, env = "VMATRIX_REPO", global = true)]
        repo: Option<String>,
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Persistent volumes: list, snapshot, restore, remove.
    Volume {
        /// Repository: file:///path (or a plain path) or s3://bucket/prefix. Default: DATA/repo.
        #[arg(long, env = "VMATRIX_REPO", global = true)]
        repo: Option<String>,
        #[command(subcommand)]
        command: volume::VolumeCommand,
    },
}

/// `vmatrix machine …`.
#[derive(Subcommand, Debug)]
pub enum MachineAction {
    /// Let machine name NAME join (a controller without --auto-approve lists new names as
    /// waiting in `vmatrix machines`); its agent joins within seconds.
    Approve {
        /// The machine's name.
        name: String,
    },
    /// Take machine NAME's credential and approval back: its agent must join, and be
    /// approved, again (a machine that lost its credential, or one that is gone).
    Forget {
        /// The machine's name.
        name: String,
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
    /// The switch against nginx proxy_pass in front of the same backend (needs nginx and wrk).
    Switch(switch_bench::SwitchBench),
    /// The bridged backend of `bench switch` (run by it in a namespace of its own).
    #[command(hide = true)]
    Backend(switch_bench::BackendArgs),
    /// The policy at scale: 10,000 machines, 1,000 services, 100,000 instances, a week of
    /// 1-minute ticks through the simulator; prints the wall time and `decide` per tick.
    Policy(bench::PolicyBench),
    /// Lazy activation from the repository against copy-then-boot, for a big image and a
    /// 64 MiB one, with real guests.
    Activation(bench_activation::ActivationBench),
    /// Live migration, suspend and resume through a real `vmatrix up` as a client sees them:
    /// the client-visible stall of a move and the first request to a dormant service.
    Moves(bench_moves::MovesBench),
    /// The repository against restic and borg: ingest, a changed version, disk used, and the
    /// requests an import sends to S3.
    Store {
        /// Size of the big image.
        #[arg(long, default_value = "4G", value_parser = vmatrix_core::volume::parse_size)]
        size: u64,
        /// Where to keep the images and repositories (reused between runs).
        #[arg(long, default_value = "/tmp")]
        work: PathBuf,
        /// Rounds of the ingest comparison counted (after a warm-up round).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds between runs (write-back of the last one settles).
        #[arg(long, default_value_t = 15)]
        pause: u64,
    },
}

#[derive(Subcommand)]
enum GuestCommand {
    /// Build a reference guest disk (cached: seconds when nothing changed).
    Build {
        /// Where to write the raw disk image.
        #[arg(long, default_value = "vmatrix-guest.img")]
        out: PathBuf,
        /// The operating system: busybox (boots in seconds) or debian (Debian 12 with systemd,
        /// cloud-init, openssh-server and qemu-guest-agent, built by mmdebstrap as root).
        #[arg(long, default_value = "busybox")]
        os: vmatrix_guest::Os,
        /// Disk size, e.g. 64M or 4G (default: 64M for busybox, 2G for debian); a busybox disk
        /// above 64M has its data partition padded with realistic data.
        #[arg(long, value_parser = vmatrix_core::volume::parse_size)]
        size: Option<u64>,
        /// Debian packages to add to the Debian guest, comma-separated (e.g. nginx-light,postgresql).
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
        /// The Debian mirror to build from (default deb.debian.org, with security updates).
        #[arg(long)]
        mirror: Option<String>,
        /// Service name baked into the image.
        #[arg(long, default_value = "reference")]
        service: String,
        /// Version baked into the image.
        #[arg(long, default_value = "1")]
        version: String,
    },
}

/// Reads a file a services file names, relative to the services file.
pub(crate) fn beside(file: &Path) -> impl Fn(&str) -> std::result::Result<String, String> + '_ {
    move |name| {
        let path = file.parent().unwrap_or(Path::new(".")).join(name);
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))
    }
}

/// `$USER@host` (or the account of this uid), for the history of what an operator did.
fn whoami() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            std::fs::read_to_string("/etc/passwd")
                .ok()
                .and_then(|p| {
                    p.lines().find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.get(2) == Some(&uid.to_string().as_str())).then(|| f[0].to_owned())
                    })
                })
                .unwrap_or_else(|| format!("uid{uid}"))
        });
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

fn parse_duration_or_zero(s: &str) -> std::result::Result<std::time::Duration, String> {
    duration(s, true)
}

pub(crate) fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    duration(s, false)
}

/// A duration flag (`90s`, `30m`, `2h`), 0 allowed or not.
fn duration(s: &str, zero: bool) -> std::result::Result<std::time::Duration, String> {
    let x = sim::seconds(s).map_err(|e| e.to_string())?;
    if !(x.is_finite() && (x > 0.0 || (zero && x == 0.0))) {
        return Err(format!(
            "{s:?}: use a duration {}, e.g. 90s, 30m or 2h",
            if zero { "of 0 or more" } else { "above 0" }
        ));
    }
    Ok(std::time::Duration::from_secs_f64(x))
}

/// mimalloc instead of glibc's allocator: the switch allocates a few small buffers per request
/// on every core, where glibc's malloc and free were a tenth of its CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Whatever vMatrix writes — state, tokens, the repository (saved guest RAM among it), VM
    // disks, logs — is its owner's alone: files 0600, directories 0700.
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain once, on one line; no backtrace for users.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
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
    let data = match cli.data {
        Some(d) => d,
        None => default_data_dir()?,
    };
    let ca = cli.ca.clone();
    let client = || client::connect(cli.api.clone(), ca.as_deref(), &data);
    let op = |o: Operation| -> Result<()> {
        let c = client()?;
        let msg = runtime()?.block_on(client::operate(&c, o))?;
        println!("{msg}");
        Ok(())
    };
    match cli.command {
        Command::Up {
            machines,
            listen,
            vcpus,
            memory,
            switch_listen,
            policy,
            policy_file,
            policy_flags,
            shared,
            maintenance_idle,
            net,
            tls,
            api_tls,
            ha,
            ha_ports,
            no_restart,
        } => runtime()?.block_on(cluster::up(
            cluster::UpArgs {
                api_tls,
                ha,
                ha_ports,
                restart: !no_restart,
                tls,
                policy,
                policy_file,
                policy_flags,
                shared,
                maintenance_idle,
                net,
                machines,
                listen,
                vcpus,
                memory,
                switch_listen,
            },
            &data,
            accel,
        ))?,
        Command::Switch {
            controller,
            listen,
            hold_timeout,
            max_held,
            tls,
            limits,
        } => runtime()?.block_on(cluster::switch(
            cluster::SwitchArgs {
                controller,
                listen,
                hold: hold_timeout,
                max_held,
                tls: tls.config()?,
                limits: limits.limits()?,
                ca: cli.ca.as_deref(),
            },
            &data,
        ))?,
        Command::Load {
            target,
            rate,
            duration,
            trace,
            speed,
            scale,
            json,
        } => {
            let opts = match (rate, trace) {
                (Some(r), None) => vmatrix_switch::LoadOptions::constant(
                    target,
                    r,
                    std::time::Duration::from_secs_f64(duration),
                ),
                (None, Some(f)) => {
                    vmatrix_switch::LoadOptions::from_trace(target, &f, speed, scale)
                        .map_err(anyhow::Error::msg)?
                }
                _ => anyhow::bail!("give --rate R or --trace FILE"),
            };
            let r = runtime()?.block_on(vmatrix_switch::run_load(&opts));
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "sent {} in {:.1}s: {} ok, {} failed {:?}; achieved {:.1} req/s; latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                    r.sent, r.seconds, r.ok, r.failed(), r.errors, r.achieved_rps, r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms
                );
                if r.max_ms > 1000.0 {
                    let s: Vec<String> = r
                        .slowest
                        .iter()
                        .map(|(at, ms)| format!("{ms:.0} ms at +{at:.2}s"))
                        .collect();
                    println!("slowest: {}", s.join(", "));
                }
            }
        }
        Command::Sim(args) => sim::run(*args)?,
        Command::Demo(args) => runtime()?.block_on(demo::run(args, &data))?,
        Command::Drop { service } => op(Operation::Drop { service })?,
        Command::Undrop { service } => op(Operation::Undrop { service })?,
        Command::Unpin { instance } => op(Operation::Unpin { instance })?,
        Command::Wake { service } => op(Operation::Wake { service })?,
        Command::Operation { id } => {
            let c = client()?;
            let msg = runtime()?.block_on(client::follow(
                &c,
                vmatrix_core::api::OperationReply {
                    operation: id,
                    state: vmatrix_core::api::OperationState::Running,
                    result: String::new(),
                },
            ))?;
            println!("{msg}");
        }
        Command::Controller {
            listen,
            state,
            policy,
            policy_file,
            policy_flags,
            maintenance_idle,
            net,
            auto_approve,
            api_tls,
        } => runtime()?.block_on(cluster::controller(
            cluster::ControllerArgs {
                api_tls,
                listen,
                state,
                policy: &policy,
                policy_file: policy_file.as_deref(),
                policy_flags: &policy_flags,
                maintenance_idle,
                net,
                auto_approve,
            },
            &data,
        ))?,
        Command::Fence { machine_dir } => vmatrix_agent::lease::watchdog(
            &vmatrix_agent::lease::FenceFiles::new(&machine_dir),
            vmatrix_agent::lease::LEASE,
        )
        .with_context(|| format!("fencing watchdog of {}", machine_dir.display()))?,
        Command::Agent {
            controller,
            listen,
            name,
            role,
            vcpus,
            memory,
            repo,
            cache_size,
            on_exit,
            qemu_user,
            no_cgroups,
            net,
        } => runtime()?.block_on(cluster::agent(
            cluster::AgentArgs {
                net,
                controller,
                listen,
                name,
                role,
                vcpus,
                memory,
                repo,
                cache_size,
                keep_vms: on_exit == "keep",
                qemu_user,
                cgroups: !no_cgroups,
                ca: cli.ca.clone(),
            },
            &data,
            accel,
        ))?,
        Command::Apply { file } => {
            // Validate before looking for a controller: a bad file is reported either way.
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let services =
                vmatrix_core::parse_services(&file.display().to_string(), &text, &beside(&file))?;
            let c = client()?;
            runtime()?.block_on(client::apply(&c, services))?
        }
        Command::Services { json } => runtime()?.block_on(client::services(&client()?, json))?,
        Command::Machines { json } => runtime()?.block_on(client::machines(&client()?, json))?,
        Command::Machine { action } => runtime()?.block_on(client::machine(&client()?, action))?,
        Command::Ps { json } => runtime()?.block_on(client::ps(&client()?, json))?,
        Command::Events { follow, json } => {
            runtime()?.block_on(client::events(&client()?, follow, json))?
        }
        Command::Activate { service, on } => op(Operation::Activate { service, on })?,
        Command::Suspend { instance } => op(Operation::Suspend { instance })?,
        Command::Resume { instance, on } => op(Operation::Resume { instance, on })?,
        Command::Migrate { instance, to } => op(Operation::Migrate { instance, to })?,
        Command::Discard { instance } => op(Operation::Discard { instance })?,
        Command::Drain { machine } => op(Operation::Drain { machine })?,
        Command::Undrain { machine } => op(Operation::Undrain { machine })?,
        Command::Rollout {
            service,
            status: true,
            json,
            ..
        } => runtime()?.block_on(lifecycle::status(&client()?, &service, json))?,
        Command::Rollout {
            service,
            to,
            batch,
            pause,
            health_timeout,
            ..
        } => {
            let to = to.ok_or_else(|| anyhow::anyhow!("give --to NAME:TAG (or --status)"))?;
            let rollout = Operation::Rollout {
                service: service.clone(),
                to,
                batch: Some(batch),
                pause_s: Some(pause.as_secs_f64()),
                health_timeout_s: Some(health_timeout.as_secs_f64()),
                author: Some(whoami()),
            };
            runtime()?.block_on(lifecycle::run(&client()?, &service, rollout))?
        }
        Command::Rollback {
            service,
            batch,
            pause,
        } => {
            let rollback = Operation::Rollback {
                service: service.clone(),
                batch: Some(batch),
                pause_s: Some(pause.as_secs_f64()),
                author: Some(whoami()),
            };
            runtime()?.block_on(lifecycle::run(&client()?, &service, rollback))?
        }
        Command::Commit {
            instance,
            tag,
            message,
            author,
        } => op(Operation::Commit {
            instance,
            tag,
            message,
            author: Some(author.unwrap_or_else(whoami)),
        })?,
        Command::Console {
            instance,
            read_only,
        } => runtime()?.block_on(console::console(&client()?, &instance, read_only))?,
        Command::Maintain {
            service,
            version,
            on,
        } => op(Operation::Maintain {
            service,
            version,
            on,
        })?,
        Command::Image { repo, command } => {
            let url = image::repo_url(repo, &data)?;
            image::run(command, &url, &data)?;
        }
        Command::Volume { repo, command } => match command.operation()? {
            Some(o) => op(o)?,
            None => volume::run(command, &image::repo_url(repo, &data)?)?,
        },
        Command::Bench(BenchCommand::Vmm { runs, memory, work }) => {
            runtime()?.block_on(bench::vmm(accel, runs, memory, &work))?
        }
        Command::Bench(BenchCommand::Switch(b)) => runtime()?.block_on(switch_bench::switch(&b))?,
        Command::Bench(BenchCommand::Backend(a)) => {
            runtime()?.block_on(switch_bench::backend(a))?
        }
        Command::Bench(BenchCommand::Policy(p)) => bench::policy(&p)?,
        Command::Bench(BenchCommand::Moves(m)) => runtime()?.block_on(bench_moves::moves(&m))?,
        Command::Bench(BenchCommand::Activation(a)) => {
            runtime()?.block_on(bench_activation::activation(accel, &a))?
        }
        Command::Bench(BenchCommand::Store {
            size,
            work,
            rounds,
            pause,
        }) => runtime()?.block_on(bench::store(
            size,
            &work,
            bench_store::IngestOptions {
                rounds: rounds.max(1),
                pause: std::time::Duration::from_secs(pause),
            },
        ))?,
        Command::Guest(GuestCommand::Build {
            out,
            os,
            size,
            packages,
            mirror,
            service,
            version,
        }) => {
            if os == vmatrix_guest::Os::Busybox && (!packages.is_empty() || mirror.is_some()) {
                anyhow::bail!("--packages and --mirror are for --os debian; the busybox guest has no packages");
            }
            let opts = vmatrix_guest::BuildOptions {
                out,
                size: size.unwrap_or(os.default_size()),
                service,
                version,
                os,
                packages,
                mirror,
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

/// Ctrl-C and SIGTERM, listened for from the moment it is made: from then on neither kills
/// the process; [`Stop::recv`] says when one came.
pub(crate) struct Stop {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Stop {
    pub(crate) fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("listening for Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    /// Waits for Ctrl-C or SIGTERM (one that came since [`Stop::install`] counts).
    pub(crate) async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// The accelerator `choice` comes to on this host, probed (for `auto`) by booting `guest`.
pub(crate) async fn resolve_accel(
    choice: vmatrix_vmm::AccelChoice,
    guest: &vmatrix_guest::GuestImage,
) -> vmatrix_vmm::Accelerator {
    vmatrix_vmm::accel::resolve(
        choice,
        Some(&vmatrix_vmm::ProbeBoot {
            kernel: guest.kernel.clone(),
            initrd: guest.initrd.clone(),
        }),
    )
    .await
}
