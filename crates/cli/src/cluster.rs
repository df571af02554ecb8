//! The control plane's processes from the command line: `controller`, `agent`, `switch` and
//! `up` (all of them on one box). The client commands are in `client.rs`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ha::{Kept, Kind};
use anyhow::{anyhow, bail, Context, Result};
use vmatrix_core::api::MachineRole;

use crate::client::{connect, required_token};

/// Options of `vmatrix agent`.
pub struct AgentArgs {
    pub controller: String,
    pub listen: SocketAddr,
    pub name: Option<String>,
    pub role: String,
    pub vcpus: u32,
    pub memory: u32,
    pub repo: Option<String>,
    pub cache_size: u64,
    pub keep_vms: bool,
    pub qemu_user: String,
    /// Each QEMU in a control group limited to its spec, where the host allows.
    pub cgroups: bool,
    pub net: crate::network::AgentNet,
    /// The authority of an https controller (`--ca`).
    pub ca: Option<PathBuf>,
}

pub async fn agent(args: AgentArgs, data: &Path, accel: vmatrix_vmm::AccelChoice) -> Result<()> {
    let name = args
        .name
        .unwrap_or_else(|| format!("rm-{}", args.listen.ip()).replace(['.', ':'], "-"));
    let role = match args.role.as_str() {
        "dedicated" => MachineRole::Dedicated,
        "shared" => MachineRole::Shared,
        other => bail!("--role {other:?}: use dedicated or shared"),
    };
    let join_token = join_token(data)?;
    let authority = crate::trust::authority(args.ca.as_deref(), data, &args.controller)?;
    let link = vmatrix_agent::ControllerLink::new(&args.controller, authority)?;
    let guest = data.join("guest/reference.img.parts");
    let accel = vmatrix_vmm::accel::resolve(
        accel,
        Some(&vmatrix_vmm::ProbeBoot {
            kernel: guest.join("vmlinuz"),
            initrd: guest.join("initrd.gz"),
        }),
    )
    .await;
    let repo = crate::image::repo_url(args.repo, data)?;
    vmatrix_core::MachineName::new(name.as_str()).map_err(|e| anyhow!("--name: {e}"))?;
    let machine_data = data.join("agents").join(&name);
    // One agent per machine: a second one with this name and data would adopt and stop the
    // first one's VMs.
    let _only = lock_machine_data(&machine_data, &name)?;
    let config = vmatrix_agent::AgentConfig {
        name,
        listen: args.listen,
        role,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        data: machine_data,
        repo,
        accel,
        cache_bytes: args.cache_size,
        net: args.net.config()?,
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let qemu = if unsafe { libc::geteuid() } == 0 {
        let qemu = vmatrix_agent::Qemu::confined(&args.qemu_user)?;
        if !args.cgroups {
            qemu
        } else if vmatrix_vmm::cgroup::available() {
            qemu.in_cgroups(&machine_cgroup(&config.name, &config.data))?
        } else {
            tracing::warn!(
                "this host mounts no cpu and memory control groups: QEMU's CPU and memory are \
                 not limited"
            );
            qemu
        }
    } else {
        tracing::info!("not root: QEMU runs as this user, under its sandbox");
        vmatrix_agent::Qemu::unconfined()
    };
    let fence_files = vmatrix_agent::lease::FenceFiles::new(&config.data);
    let agent = vmatrix_agent::Agent::new(config, std::sync::Arc::new(qemu))?;
    // Before any VM is adopted or started: from now on they run only while the lease holds.
    let holder = vmatrix_agent::lease::LeaseHolder::attach(fence_files, Box::new(start_watchdog))
        .context("starting the fencing watchdog")?;
    agent.hold_lease(holder);
    tokio::select! {
        r = vmatrix_agent::serve(agent.clone(), link, join_token) => r.context("agent")?,
        _ = crate::shutdown_signal() => {
            if args.keep_vms {
                tracing::info!("agent stopping; its VMs keep running for the next agent (--on-exit keep)");
            } else {
                tracing::info!("agent stopping; its VMs stop with it");
                agent.stop_all().await;
                agent.release_lease();
                agent.remove_network();
            }
        }
    }
    Ok(())
}

/// Starts `vmatrix fence` for a machine: a process of its own, so that it acts when the agent
/// itself is stuck. Reaped by a thread when it ends.
fn start_watchdog(files: &vmatrix_agent::lease::FenceFiles) -> std::io::Result<()> {
    let dir = files
        .fifo()
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("fence")
        .arg("--machine-dir")
        .arg(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// A token from the environment variable `var`, or else from `file`.
fn scoped_token(var: &str, file: &Path) -> Option<String> {
    std::env::var(var)
        .ok()
        .or_else(|| std::fs::read_to_string(file).ok())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// The token this machine joins with: `VMATRIX_JOIN_TOKEN`, or the controller's
/// `DATA/controller/join-token` on its own machine, or the operator's token (which may join
/// machines too).
fn join_token(data: &Path) -> Result<String> {
    if let Ok(t) = std::env::var("VMATRIX_JOIN_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_owned());
        }
    }
    if let Ok(t) = std::fs::read_to_string(data.join("controller/join-token")) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_owned());
        }
    }
    required_token(data).map_err(|_| {
        anyhow!(
            "no join token: set VMATRIX_JOIN_TOKEN to the controller's join token (in its \
             DATA/controller/join-token)"
        )
    })
}

/// Takes the lock of a machine's data directory for as long as the agent runs (a second agent
/// with the same name and data directory is refused with the first one's pid).
fn lock_machine_data(dir: &Path, name: &str) -> Result<std::fs::File> {
    use std::io::{Read, Seek};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("agent.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if f.try_lock().is_err() {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        bail!(
            "another agent runs as machine {name} with this data directory ({}; pid {}): stop \
             it first, or give this one another --name",
            dir.display(),
            pid.trim()
        );
    }
    f.set_len(0)?;
    f.rewind()?;
    std::io::Write::write_all(&mut f, std::process::id().to_string().as_bytes())?;
    Ok(f)
}

/// Options of `vmatrix controller`.
pub struct ControllerArgs<'a> {
    pub api_tls: crate::trust::ApiTls,
    pub listen: SocketAddr,
    pub state: Option<String>,
    pub policy: &'a str,
    pub policy_file: Option<&'a Path>,
    pub policy_flags: &'a crate::policy_file::PolicyFlags,
    pub maintenance_idle: Option<Duration>,
    pub net: crate::network::ControllerNet,
    pub auto_approve: bool,
}

pub async fn controller(args: ControllerArgs<'_>, data: &Path) -> Result<()> {
    let ControllerArgs {
        api_tls,
        listen,
        state,
        policy,
        policy_file,
        policy_flags,
        maintenance_idle,
        net,
        auto_approve,
    } = args;
    let network = net.config()?;
    let settings = crate::policy_file::load(policy_file, policy_flags)?;
    let policy = match policy {
        "switching" => true,
        "min" => false,
        other => bail!(
            "--policy {other:?}: use min (keep each service's min) or switching (load-driven)"
        ),
    };
    let dir = data.join("controller");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let state = match state {
        Some(s) => vmatrix_controller::StateStore::parse(&s).map_err(|e| anyhow!(e))?,
        None => vmatrix_controller::StateStore::Sqlite(dir.join("state.db")),
    };
    let (mut token, mut new) =
        vmatrix_controller::load_or_create_token(&dir).context("creating the API token")?;
    let (mut join_token, mut new_join) =
        vmatrix_controller::load_or_create_join_token(&dir).context("creating the join token")?;
    let (mut read_token, _) =
        vmatrix_controller::load_or_create_read_token(&dir).context("creating the read token")?;
    let (mut switch_token, _) = vmatrix_controller::load_or_create_switch_token(&dir)
        .context("creating the switch's token")?;
    if let vmatrix_controller::StateStore::Etcd(url) = &state {
        // Controllers that share their state share their tokens: the first one's, kept on
        // etcd, replace the ones made here.
        let etcd = vmatrix_controller::etcd::Etcd::from_url(url)?;
        let shared = |name: &str, mine: &str| -> Result<String> {
            let file = dir.join(name);
            let etcd = &etcd;
            let got = vmatrix_controller::share_secret(etcd, name, mine, &file)
                .with_context(|| format!("sharing the {name} through {url}"))?;
            Ok(got)
        };
        let t = tokio::task::block_in_place(|| -> Result<_> {
            Ok((
                shared("token", &token)?,
                shared("join-token", &join_token)?,
                shared("read-token", &read_token)?,
                shared("switch-token", &switch_token)?,
            ))
        })?;
        new &= t.0 == token;
        new_join &= t.1 == join_token;
        (token, join_token, read_token, switch_token) = t;
    }
    if new_join {
        let _ = writeln!(
            std::io::stdout(),
            "join token for agents (VMATRIX_JOIN_TOKEN; stored with mode 0600 in {})",
            dir.join("join-token").display()
        );
    }
    if new {
        // Not println!: a controller must not die because nobody reads its stdout.
        let _ = writeln!(
            std::io::stdout(),
            "API token (stored with mode 0600 in {}): {token}",
            dir.join("token").display()
        );
    }
    let me = format!("{}://{listen}", api_tls.scheme());
    let apis = match &state {
        // Controllers that stand by for each other: the file lists them all.
        vmatrix_controller::StateStore::Etcd(_) => {
            let now = std::fs::read_to_string(dir.join("api")).unwrap_or_default();
            let mut list: Vec<&str> = now.trim().split(',').filter(|a| !a.is_empty()).collect();
            if !list.contains(&me.as_str()) {
                list.push(&me);
            }
            list.join(",")
        }
        vmatrix_controller::StateStore::Sqlite(_) => me.clone(),
    };
    std::fs::write(dir.join("api"), format!("{apis}\n"))?;
    let config = vmatrix_controller::ControllerConfig {
        listen,
        state,
        token,
        read_token,
        switch_token,
        join_token,
        auto_approve,
        policy,
        settings,
        maintenance_idle,
        also_listen: net.also_listen.clone(),
        network,
        limits: vmatrix_controller::ApiLimits::default(),
        tls: api_tls.config(data),
    };
    tokio::select! {
        r = vmatrix_controller::serve(config) => r.map_err(|e| anyhow!("{e}"))?,
        _ = crate::shutdown_signal() => tracing::info!("controller stopping"),
    }
    Ok(())
}

/// A child process of `up`, killed when `up` ends.
pub(crate) struct Child(pub(crate) tokio::process::Child);

/// The network namespace a child of `up` runs in.
#[derive(Clone, Copy)]
pub(crate) enum Netns {
    /// `up`'s own.
    Host,
    /// A new one of its own (a machine of the bridged model: it and its VMs are the
    /// namespace's only users, so it vanishes with them unless `up` holds it open).
    New,
    /// The one this descriptor (of `/proc/PID/ns/net`) names.
    Join(std::os::fd::RawFd),
}

/// Starts `program ARGS…` as a child of `up` in `netns`; it dies with `up`, even on kill -9.
pub(crate) fn spawn_child(program: &Path, args: &[String], netns: Netns) -> Result<Child> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true);
    // SAFETY: prctl, unshare and setns are async-signal-safe; the child is in its namespace
    // before it runs anything of its own.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            let rc = match netns {
                Netns::Host => 0,
                Netns::New => libc::unshare(libc::CLONE_NEWNET),
                Netns::Join(fd) => libc::setns(fd, libc::CLONE_NEWNET),
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(Child(cmd.spawn().with_context(|| {
        format!("starting {}", program.display())
    })?))
}

/// Starts `vmatrix ARGS…` as a child of `up`; with `own_net`, in a new network namespace.
pub(crate) fn spawn_self_in(args: &[String], own_net: bool) -> Result<Child> {
    let exe = std::env::current_exe().context("finding the vmatrix binary")?;
    spawn_child(&exe, args, if own_net { Netns::New } else { Netns::Host })
}

/// Options of `vmatrix up`.
pub struct UpArgs {
    pub policy: String,
    pub policy_file: Option<PathBuf>,
    pub policy_flags: crate::policy_file::PolicyFlags,
    pub machines: u32,
    pub listen: SocketAddr,
    pub vcpus: u32,
    pub memory: u32,
    pub switch_listen: SocketAddr,
    pub shared: u32,
    pub maintenance_idle: Option<Duration>,
    pub net: crate::network::UpNet,
    pub tls: crate::network::TlsFlags,
    /// How the controller serves its API.
    pub api_tls: crate::trust::ApiTls,
    /// Two controllers sharing their state on three etcd members, supervised.
    pub ha: bool,
    /// Where `--ha`'s ports start (default: the API port + 100).
    pub ha_ports: Option<u16>,
    /// Start again a child that dies.
    pub restart: bool,
}

/// Options of `vmatrix switch`.
pub struct SwitchArgs<'a> {
    /// The controller's URL (default: the one in the data directory).
    pub controller: Option<String>,
    pub listen: SocketAddr,
    /// Seconds a request may wait for a dormant service.
    pub hold: u64,
    pub max_held: usize,
    /// HTTPS for clients.
    pub tls: Option<vmatrix_switch::TlsConfig>,
    pub limits: vmatrix_switch::Limits,
    /// The authority of an https controller (`--ca`).
    pub ca: Option<&'a Path>,
}

pub async fn switch(args: SwitchArgs<'_>, data: &Path) -> Result<()> {
    let SwitchArgs {
        controller,
        listen,
        hold,
        max_held,
        tls,
        limits,
        ca,
    } = args;
    let controller = match controller {
        Some(c) => c,
        None => std::fs::read_to_string(data.join("controller/api"))
            .map(|s| s.trim().to_owned())
            .map_err(|_| anyhow!("no controller URL: pass --controller URL"))?,
    };
    // Its own token where it has one (it may do nothing but read routes and report load),
    // else the operator's.
    let token = match scoped_token(
        "VMATRIX_SWITCH_TOKEN",
        &data.join("controller/switch-token"),
    ) {
        Some(t) => t,
        None => required_token(data)?,
    };
    let read_token =
        scoped_token("VMATRIX_READ_TOKEN", &data.join("controller/read-token")).unwrap_or_default();
    let controller_authority = crate::trust::authority(ca, data, &controller)?;
    let config = vmatrix_switch::SwitchConfig {
        listen,
        controller,
        controller_authority,
        token,
        read_token,
        hold_timeout: Duration::from_secs(hold),
        max_held,
        retry_window: Duration::from_secs(10),
        tls,
        limits,
    };
    tokio::select! {
        r = vmatrix_switch::serve(config) => r.context("switch")?,
        _ = crate::shutdown_signal() => tracing::info!("switch stopping"),
    }
    Ok(())
}

pub async fn up(args: UpArgs, data: &Path, accel: vmatrix_vmm::AccelChoice) -> Result<()> {
    // From here on Ctrl-C and SIGTERM stop the matrix cleanly, also while it starts (one that
    // came before `up` listened for it killed it half-started: its bridge stayed behind).
    let mut stop = crate::Stop::install()?;
    let started = tokio::select! {
        r = start(&args, data, accel) => r?,
        () = stop.recv() => {
            tracing::info!("stopped while starting; what had started is removed");
            return Ok(());
        }
    };
    let ready = tokio::select! {
        r = started.wait_machines() => r,
        () = stop.recv() => {
            tracing::info!("stopped while the machines joined");
            started.shutdown().await;
            return Ok(());
        }
    };
    if let Err(e) = ready {
        started.shutdown().await;
        return Err(e);
    }
    // `up` runs until Ctrl-C whatever happens to its stdout: a closed pipe must not end the
    // matrix (println! would panic on it), so the status lines ignore write errors.
    let mut out = std::io::stdout();
    let _ = out.write_all(started.banner.as_bytes());
    let _ = out.flush();
    stop.recv().await;
    started.shutdown().await;
    Ok(())
}

/// What `up` started, stopped in order by [`Started::shutdown`].
struct Started {
    supervisor: crate::ha::Supervisor,
    topology: Option<crate::network::Topology>,
    machines: Vec<(String, u32, &'static str)>,
    client: vmatrix_client::ControllerClient,
    data: std::path::PathBuf,
    /// What `up` prints once every machine has joined.
    banner: String,
}

impl Started {
    /// Waits (60 s at most) until every machine has joined.
    async fn wait_machines(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let up = self.client.machines().await.map_or(0, |r| {
                r.machines
                    .iter()
                    .filter(|m| m.machine.state == vmatrix_core::api::MachineState::Up)
                    .count()
            });
            if up >= self.machines.len() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "only {up} of {} machines registered within 60 s",
                    self.machines.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the switch, the agents and the controller, then removes what is left of them.
    async fn shutdown(self) {
        let Started {
            supervisor,
            topology,
            machines,
            data,
            ..
        } = self;
        tracing::info!("stopping the switch, the agents and the controller");
        // One kind at a time, the last started first, all of a kind at once: SIGTERM, SIGKILL
        // after 15 s.
        supervisor.stop().await;
        // An agent that crashed (or was killed) before leaves its VMs running for the next one;
        // `up` is ending, so there is no next one.
        for (name, _, _) in &machines {
            let vms = data.join("agents").join(name).join("vms");
            let n = vmatrix_agent::sweep(&vms, &[]);
            if n > 0 {
                tracing::info!("stopped {n} VM(s) that {name}'s agent had left");
            }
        }
        // Their control groups once the kernel has reaped them, and `vmatrix` if nothing else
        // runs under it.
        let groups: Vec<String> = machines
            .iter()
            .map(|(name, _, _)| machine_cgroup(name, &data.join("agents").join(name)))
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while groups
            .iter()
            .map(|g| vmatrix_vmm::cgroup::sweep(g, Duration::ZERO).left)
            .sum::<usize>()
            > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        vmatrix_vmm::cgroup::remove_root();
        // The machines' namespaces went with their agents and VMs; this host's part goes now.
        drop(topology);
    }
}

/// Starts everything `up` runs: the reference guest in the repository, the network, the
/// controller(s), an agent per machine and the switch, under a supervisor.
async fn start(args: &UpArgs, data: &Path, accel: vmatrix_vmm::AccelChoice) -> Result<Started> {
    if args.shared > 250 || args.machines + args.shared > 250 {
        bail!(
            "--machines {} --shared {}: at most 250 machines in all (127.0.0.2…)",
            args.machines,
            args.shared
        );
    }
    if args.machines == 0 || args.machines > 250 {
        bail!("--machines {}: use 1 to 250", args.machines);
    }
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    if std::net::TcpListener::bind(args.listen).is_err() {
        bail!(
            "{} is in use: another `vmatrix up`? pass --listen ADDR:PORT",
            args.listen
        );
    }
    let guest = vmatrix_guest::build(&vmatrix_guest::BuildOptions::new(
        data.join("guest/reference.img"),
    ))
    .context("building the reference guest")?;
    let repo_url = crate::image::repo_url(None, data)?;
    let image = vmatrix_core::ImageRef::parse("guest:v1")?;
    let report = tokio::task::spawn_blocking({
        let (repo_url, disk, scratch, image) = (
            repo_url.clone(),
            guest.disk.clone(),
            data.join("tmp"),
            image.clone(),
        );
        move || -> Result<vmatrix_store::ImportReport> {
            let repo = vmatrix_store::Repository::open_or_init(&repo_url)?;
            Ok(repo.import(&disk, &image, &scratch, &|_| {})?)
        }
    })
    .await??;
    tracing::info!(
        "reference guest in the repository as guest:v1 ({})",
        if report.published {
            "imported"
        } else {
            "unchanged"
        }
    );
    let accel = crate::resolve_accel(accel, &guest).await;
    let data_s = data.display().to_string();
    // Bad settings fail here, before anything starts.
    crate::policy_file::load(args.policy_file.as_deref(), &args.policy_flags)?;
    args.tls.config()?;
    let machine_count = (args.machines + args.shared) as usize;
    let mut topology = if args.net.bridged()? {
        Some(crate::network::Topology::create(
            args.listen.port(),
            &args.net,
            machine_count,
        )?)
    } else {
        None
    };
    let mut controller_args: Vec<String> = vec![
        "controller".into(),
        "--data".into(),
        data_s.clone(),
        "--policy".into(),
        args.policy.clone(),
        // One box: every machine is `up`'s own.
        "--auto-approve".into(),
    ];
    controller_args.extend(args.policy_flags.to_args());
    controller_args.extend(args.api_tls.to_args());
    let scheme = args.api_tls.scheme();
    if let Some(idle) = args.maintenance_idle {
        controller_args.extend([
            "--maintenance-idle".into(),
            format!("{}s", idle.as_secs_f64()),
        ]);
    }
    if let Some(f) = &args.policy_file {
        controller_args.extend(["--policy-file".into(), f.display().to_string()]);
    }
    // With --ha, a second controller standing by.
    let ha_ports = crate::ha::Ports::new(args.ha_ports, args.listen)?;
    let listens: Vec<SocketAddr> = if args.ha {
        ha_ports.check_free(args.listen.ip())?;
        vec![
            args.listen,
            SocketAddr::new(args.listen.ip(), ha_ports.standby()),
        ]
    } else {
        vec![args.listen]
    };
    // Bridged: the agents reach the controller over the underlay.
    let mut agents_apis = Vec::new();
    let mut per_controller = Vec::new();
    for l in &listens {
        let mut a = controller_args.clone();
        a.extend(["--listen".into(), l.to_string()]);
        match &topology {
            Some(t) => {
                let also = SocketAddr::new(t.host_address().into(), l.port());
                a.extend([
                    "--also-listen".into(),
                    also.to_string(),
                    "--service-net".into(),
                    t.net.to_string(),
                    "--vni".into(),
                    t.vni().to_string(),
                    "--front-vtep".into(),
                    t.host_address().to_string(),
                ]);
                agents_apis.push(format!("{scheme}://{also}"));
            }
            None => agents_apis.push(format!("{scheme}://{l}")),
        }
        per_controller.push(a);
    }
    let agents_api = agents_apis.join(",");
    let api = listens
        .iter()
        .map(|l| format!("{scheme}://{l}"))
        .collect::<Vec<_>>()
        .join(",");
    // Every child, in the order it started: supervised once all have, stopped in reverse.
    let mut kept: Vec<(Kept, Child)> = Vec::new();
    let start = |k: Kept, kept: &mut Vec<(Kept, Child)>| -> Result<u32> {
        let c = k.start()?;
        let pid =
            c.0.id()
                .ok_or_else(|| anyhow!("{} ended at once", k.what))?;
        kept.push((k, c));
        Ok(pid)
    };
    if args.ha {
        let state = crate::ha::state_url(ha_ports);
        for m in crate::ha::members(ha_ports, args.listen, data)? {
            start(m, &mut kept)?;
        }
        crate::ha::wait_etcd(&state, Duration::from_secs(30)).await?;
        for (i, mut a) in per_controller.into_iter().enumerate() {
            a.extend(["--state".into(), state.clone()]);
            start(
                Kept::this(Kind::Controller, format!("controller {}", i + 1), a)?,
                &mut kept,
            )?;
            // One at a time: the first makes the tokens the others take from etcd.
            wait_healthy(&format!("{scheme}://{}", listens[i]), data, i == 0).await?;
        }
        std::fs::write(data.join("controller/api"), format!("{api}\n"))?;
    } else {
        for a in per_controller {
            start(
                Kept::this(Kind::Controller, "the controller", a)?,
                &mut kept,
            )?;
        }
        wait_healthy(&api, data, true).await?;
    }
    // Health needs no token; everything else does, and a fresh controller has just written it.
    let client = connect(Some(api.clone()), None, data)?;
    // Dedicated machines rm1… on 127.0.0.2…, then shared ones sm1… after them.
    let machines: Vec<(String, u32, &str)> = (1..=args.machines)
        .map(|i| (format!("rm{i}"), i + 1, "dedicated"))
        .chain((1..=args.shared).map(|i| (format!("sm{i}"), args.machines + i + 1, "shared")))
        .collect();
    for (i, (name, host, role)) in machines.iter().enumerate() {
        let listen = match &topology {
            Some(t) => format!("{}:{}", t.machine_address(i), args.listen.port() + 1),
            None => format!("127.0.0.{host}:{}", args.listen.port() + 1),
        };
        let mut agent_args: Vec<String> = vec![
            "agent".into(),
            "--name".into(),
            name.clone(),
            "--role".into(),
            (*role).into(),
            "--listen".into(),
            listen,
            "--controller".into(),
            agents_api.clone(),
            "--data".into(),
            data_s.clone(),
            "--vcpus".into(),
            args.vcpus.to_string(),
            "--memory".into(),
            args.memory.to_string(),
            "--accel".into(),
            accel.as_str().into(),
        ];
        let what = format!("machine {name}'s agent");
        match topology.as_mut() {
            None => {
                start(Kept::this(Kind::Agent, what, agent_args)?, &mut kept)?;
            }
            Some(t) => {
                agent_args.extend([
                    "--service-net".into(),
                    t.net.to_string(),
                    "--vtep".into(),
                    t.machine_address(i).to_string(),
                    "--vni".into(),
                    t.vni().to_string(),
                ]);
                // The machine's own namespace; the agent waits until its address is there.
                let mut k = Kept::this(Kind::Agent, what, agent_args)?;
                let child = spawn_self_in(&k.args, true)?;
                let pid = child
                    .0
                    .id()
                    .ok_or_else(|| anyhow!("{} ended at once", k.what))?;
                // Held open: an agent started again joins it.
                k.keep_netns_of(pid)?;
                kept.push((k, child));
                t.attach(i, pid)
                    .with_context(|| format!("joining machine {name} to the underlay"))?;
            }
        }
    }
    let mut switch_args: Vec<String> = vec![
        "switch".into(),
        "--listen".into(),
        args.switch_listen.to_string(),
        "--controller".into(),
        api.clone(),
        "--data".into(),
        data_s.clone(),
    ];
    switch_args.extend(args.tls.to_args());
    start(
        Kept::this(Kind::Switch, "the switch", switch_args)?,
        &mut kept,
    )?;
    let supervisor = crate::ha::Supervisor::start(kept, args.restart);
    let mut banner = format!(
        "networking: {}\n",
        match &topology {
            Some(t) => format!(
                "bridged; service network {} over VXLAN {}, each machine a network namespace on \
                 underlay {}",
                t.net,
                t.vni(),
                args.net.underlay
            ),
            None => "user-mode NAT (forwarded ports on 127.0.0.x)".into(),
        }
    );
    banner.push_str(&format!(
        "vMatrix is up: API {api}, switch http://{}, {} machines (rm1..rm{}{}), accelerator {}, data {}\n",
        args.switch_listen,
        args.machines,
        args.machines,
        if args.shared > 0 {
            format!("; shared sm1..sm{} for maintenance", args.shared)
        } else {
            String::new()
        },
        accel.as_str(),
        data.display()
    ));
    banner.push_str(&format!(
        "try: vmatrix apply -f examples/services.toml && curl http://{}/s/sports/   (Ctrl-C stops everything)\n",
        args.switch_listen
    ));
    Ok(Started {
        supervisor,
        topology,
        machines,
        client,
        data: data.to_owned(),
        banner,
    })
}

/// The control group of machine `name`'s VMs (`vmatrix/NAME-KEY`): unique on this host, as
/// several matrices (tests) name their machines alike — the key comes from its data directory.
fn machine_cgroup(name: &str, machine_data: &Path) -> String {
    let at = std::fs::canonicalize(machine_data).unwrap_or_else(|_| machine_data.to_owned());
    let key = blake3::hash(at.as_os_str().as_encoded_bytes()).to_hex();
    format!("{name}-{}", &key[..8])
}

/// Waits (30 s at most) until the controller at `api` answers; a leader's health, or a
/// standby's refusal when `leader` is false.
async fn wait_healthy(api: &str, data: &Path, leader: bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Over HTTPS the controller writes its authority's certificate as it starts: until
        // then there is nothing to trust it with.
        let up = match connect(Some(api.to_owned()), None, data) {
            Ok(client) if leader => client.healthy().await,
            Ok(client) => client.answers().await,
            Err(_) => false,
        };
        if up {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the controller did not come up on {api}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
