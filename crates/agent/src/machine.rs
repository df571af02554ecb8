//! The machine's instances and what the agent does to them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use vmatrix_core::api::{
    AgentCommand, AgentInstance, AgentReply, AgentReport, InstancePlan, MachineRole,
    MigrationTargetBody, SavedState,
};
use vmatrix_core::{ImageRef, InstanceId, InstanceState};
use vmatrix_store::cache::ChunkCache;
use vmatrix_store::nbd::{Export, NbdServer};
use vmatrix_store::{ExportFormat, Repository};
use vmatrix_vmm::{Accelerator, BaseImage, IncomingVm, MigrationTarget, SuspendedVm, Vm, VmSpec};

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Machine name (`rm1`).
    pub name: String,
    /// Where the agent's API listens; its IP is also where guests are forwarded.
    pub listen: SocketAddr,
    /// Dedicated or shared.
    pub role: MachineRole,
    /// vCPUs offered.
    pub vcpus: u32,
    /// Memory offered, MiB.
    pub memory_mib: u32,
    /// This machine's data directory (VM directories, chunk cache, NBD sockets).
    pub data: PathBuf,
    /// The repository URL.
    pub repo: String,
    /// The accelerator for every VM.
    pub accel: Accelerator,
    /// Chunk cache bound, bytes.
    pub cache_bytes: u64,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The command's generation is older than one already seen.
    #[error("instance {id}: generation {got} is stale (this machine has seen {seen}); refusing")]
    Stale { id: InstanceId, got: u64, seen: u64 },
    /// The instance is not here.
    #[error("instance {0} is not on this machine")]
    Unknown(InstanceId),
    /// The instance is not in a state that allows the command.
    #[error("instance {id} is {state:?}: {what} is not possible now")]
    Busy {
        id: InstanceId,
        state: InstanceState,
        what: &'static str,
    },
    /// The repository failed.
    #[error(transparent)]
    Store(#[from] vmatrix_store::StoreError),
    /// QEMU failed.
    #[error(transparent)]
    Vmm(#[from] vmatrix_vmm::VmmError),
    /// Something else.
    #[error("{0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, AgentError>;

struct Slot {
    plan: InstancePlan,
    state: InstanceState,
    endpoint: SocketAddr,
    vm: Option<Vm>,
    incoming: Option<IncomingVm>,
    error: Option<String>,
}

/// The agent's state: one per machine.
pub struct Agent {
    /// Its configuration.
    pub config: AgentConfig,
    repo: Arc<Repository>,
    cache: Arc<ChunkCache>,
    exports: Mutex<HashMap<ImageRef, (NbdServer, String)>>,
    slots: Mutex<HashMap<InstanceId, Arc<Mutex<Slot>>>>,
    /// Newest generation seen per instance, kept after the instance leaves (fencing).
    generations: std::sync::Mutex<HashMap<InstanceId, u64>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Agent({})", self.config.name)
    }
}

fn free_port(ip: IpAddr) -> Result<u16> {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| AgentError::Other(format!("no free port on {ip}: {e}")))
}

impl Agent {
    /// Opens the repository and the chunk cache; clears VM directories a previous run left
    /// (their QEMU processes died with it).
    pub fn new(config: AgentConfig) -> Result<Arc<Self>> {
        let repo = Arc::new(Repository::open(&config.repo)?);
        let cache = Arc::new(ChunkCache::new(
            repo.clone(),
            &config.data.join("cache"),
            config.cache_bytes,
        )?);
        let _ = std::fs::remove_dir_all(config.data.join("vms"));
        std::fs::create_dir_all(config.data.join("nbd"))
            .map_err(|e| AgentError::Other(format!("creating {}: {e}", config.data.display())))?;
        Ok(Arc::new(Self {
            config,
            repo,
            cache,
            exports: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            generations: std::sync::Mutex::new(HashMap::new()),
        }))
    }

    fn fence(&self, id: &InstanceId, generation: u64) -> Result<()> {
        let mut g = self
            .generations
            .lock()
            .map_err(|_| AgentError::Other("generation table poisoned".into()))?;
        let seen = g.get(id).copied().unwrap_or(0);
        if generation < seen {
            return Err(AgentError::Stale {
                id: id.clone(),
                got: generation,
                seen,
            });
        }
        g.insert(id.clone(), generation);
        Ok(())
    }

    /// The NBD URL of `image`'s lazy export on this machine, started on first use.
    async fn export(&self, image: &ImageRef) -> Result<String> {
        let mut exports = self.exports.lock().await;
        if let Some((_, url)) = exports.get(image) {
            return Ok(url.clone());
        }
        let repo = self.repo.clone();
        let img = image.clone();
        let (_, manifest) = tokio::task::spawn_blocking(move || repo.resolve(&img))
            .await
            .map_err(|e| AgentError::Other(e.to_string()))??;
        let name = format!("{}-{}", image.name, image.tag);
        let export = Export::new(name.clone(), manifest, self.cache.clone());
        let socket = self.config.data.join("nbd").join(format!("{name}.sock"));
        let server = NbdServer::start(export, &socket)?;
        let url = server.url(&name);
        exports.insert(image.clone(), (server, url.clone()));
        Ok(url)
    }

    fn vm_dir(&self, id: &InstanceId, generation: u64) -> PathBuf {
        self.config
            .data
            .join("vms")
            .join(format!("{id}-g{generation}"))
    }

    async fn spec(&self, plan: &InstancePlan) -> Result<(VmSpec, SocketAddr)> {
        let url = self.export(&plan.image).await?;
        let ip = self.config.listen.ip();
        let forward = SocketAddr::new(ip, free_port(ip)?);
        let mut spec = VmSpec::new(
            plan.id.clone(),
            BaseImage::Nbd { url },
            forward,
            self.config.accel,
        );
        spec.memory_mib = plan.memory_mib;
        spec.vcpus = plan.vcpus;
        spec.guest_port = plan.port;
        Ok((spec, forward))
    }

    async fn slot(&self, id: &InstanceId) -> Result<Arc<Mutex<Slot>>> {
        self.slots
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::Unknown(id.clone()))
    }

    /// Carries out one command from the controller.
    pub async fn handle(self: &Arc<Self>, command: AgentCommand) -> Result<AgentReply> {
        let mut reply = AgentReply {
            endpoint: None,
            target: None,
            saved: None,
            migration_ms: None,
        };
        match command {
            AgentCommand::Activate { plan, state } => {
                self.fence(&plan.id, plan.generation)?;
                if let Ok(existing) = self.slot(&plan.id).await {
                    // Idempotent: the same activation again answers with what is there.
                    let s = existing.lock().await;
                    reply.endpoint = Some(s.endpoint.to_string());
                    return Ok(reply);
                }
                let (spec, endpoint) = self.spec(&plan).await?;
                let dir = self.vm_dir(&plan.id, plan.generation);
                let vm = match state {
                    None => Vm::boot(spec, &dir).await?,
                    Some(saved) => self.resume_from(&saved, spec, &dir).await?,
                };
                let slot = Arc::new(Mutex::new(Slot {
                    plan: plan.clone(),
                    state: InstanceState::Activating,
                    endpoint,
                    vm: Some(vm),
                    incoming: None,
                    error: None,
                }));
                self.slots
                    .lock()
                    .await
                    .insert(plan.id.clone(), slot.clone());
                tokio::spawn(wait_ready(slot));
                reply.endpoint = Some(endpoint.to_string());
            }
            AgentCommand::Suspend { id, generation } => {
                self.fence(&id, generation)?;
                let slot = self.slot(&id).await?;
                let mut s = slot.lock().await;
                let Some(vm) = s.vm.take() else {
                    return Err(AgentError::Busy {
                        id,
                        state: s.state,
                        what: "suspend",
                    });
                };
                s.state = InstanceState::Suspending;
                let dir = vm.dir().root().to_owned();
                let suspended = match vm.suspend(&dir.join("state.bin")).await {
                    Ok(x) => x,
                    Err(e) => {
                        s.state = InstanceState::Failed;
                        s.error = Some(e.to_string());
                        return Err(e.into());
                    }
                };
                let saved = SavedState {
                    state: ImageRef::parse(&format!("{id}:state-g{generation}"))
                        .map_err(|e| AgentError::Other(e.to_string()))?,
                    overlay: ImageRef::parse(&format!("{id}:overlay-g{generation}"))
                        .map_err(|e| AgentError::Other(e.to_string()))?,
                };
                let repo = self.repo.clone();
                let (st, ov, files) = (
                    saved.state.clone(),
                    saved.overlay.clone(),
                    suspended.clone(),
                );
                tokio::task::spawn_blocking(move || -> vmatrix_store::Result<()> {
                    repo.import_state(&files.state_file, &st, &|_| {})?;
                    repo.import_state(&files.disk, &ov, &|_| {})?;
                    Ok(())
                })
                .await
                .map_err(|e| AgentError::Other(e.to_string()))??;
                drop(s);
                self.slots.lock().await.remove(&id);
                let _ = std::fs::remove_dir_all(&dir);
                reply.saved = Some(saved);
            }
            AgentCommand::PrepareIncoming { plan } => {
                self.fence(&plan.id, plan.generation)?;
                let (spec, endpoint) = self.spec(&plan).await?;
                let dir = self.vm_dir(&plan.id, plan.generation);
                let incoming = IncomingVm::start(spec, &dir, self.config.listen.ip()).await?;
                let t = incoming.target().clone();
                reply.target = Some(MigrationTargetBody {
                    nbd: t.nbd.to_string(),
                    export: t.export,
                    migration: t.migration.to_string(),
                    endpoint: endpoint.to_string(),
                });
                reply.endpoint = Some(endpoint.to_string());
                let slot = Arc::new(Mutex::new(Slot {
                    plan: plan.clone(),
                    state: InstanceState::Migrating,
                    endpoint,
                    vm: None,
                    incoming: Some(incoming),
                    error: None,
                }));
                self.slots.lock().await.insert(plan.id.clone(), slot);
            }
            AgentCommand::MigrateOut {
                id,
                generation,
                target,
            } => {
                // The source keeps the generation it runs under; the destination has the new one.
                let slot = self.slot(&id).await?;
                let mut s = slot.lock().await;
                if generation < s.plan.generation {
                    return Err(AgentError::Stale {
                        id,
                        got: generation,
                        seen: s.plan.generation,
                    });
                }
                let Some(vm) = s.vm.take() else {
                    return Err(AgentError::Busy {
                        id,
                        state: s.state,
                        what: "migrate",
                    });
                };
                let parse = |a: &str| -> Result<SocketAddr> {
                    a.parse()
                        .map_err(|e| AgentError::Other(format!("bad address {a:?}: {e}")))
                };
                let t = MigrationTarget {
                    nbd: parse(&target.nbd)?,
                    export: target.export.clone(),
                    migration: parse(&target.migration)?,
                };
                s.state = InstanceState::Migrating;
                let dir = vm.dir().root().to_owned();
                match vm.migrate_out(&t).await {
                    Ok(report) => {
                        reply.migration_ms = Some((report.total_ms, report.downtime_ms));
                        drop(s);
                        self.slots.lock().await.remove(&id);
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                    Err(failure) => {
                        s.vm = Some(*failure.source);
                        s.state = InstanceState::Running;
                        tokio::spawn(wait_ready(slot.clone()));
                        return Err(AgentError::Vmm(failure.error));
                    }
                }
            }
            AgentCommand::FinishIncoming { id, generation } => {
                self.fence(&id, generation)?;
                let slot = self.slot(&id).await?;
                let mut s = slot.lock().await;
                let Some(incoming) = s.incoming.take() else {
                    return Err(AgentError::Busy {
                        id,
                        state: s.state,
                        what: "finish a migration",
                    });
                };
                let vm = incoming.finish(Duration::from_secs(120)).await?;
                s.vm = Some(vm);
                s.state = InstanceState::Running;
                reply.endpoint = Some(s.endpoint.to_string());
                tokio::spawn(wait_ready(slot.clone()));
            }
            AgentCommand::Discard { id, generation } => {
                self.fence(&id, generation)?;
                let slot = self.slots.lock().await.remove(&id);
                if let Some(slot) = slot {
                    let mut s = slot.lock().await;
                    if let Some(vm) = s.vm.take() {
                        let dir = vm.dir().root().to_owned();
                        vm.kill().await;
                        let _ = std::fs::remove_dir_all(dir);
                    }
                    if let Some(incoming) = s.incoming.take() {
                        incoming.abort().await;
                    }
                    s.state = InstanceState::Discarded;
                }
            }
        }
        Ok(reply)
    }

    async fn resume_from(
        &self,
        saved: &SavedState,
        spec: VmSpec,
        dir: &std::path::Path,
    ) -> Result<Vm> {
        let incoming = dir.with_extension("in");
        std::fs::create_dir_all(&incoming)
            .map_err(|e| AgentError::Other(format!("creating {}: {e}", incoming.display())))?;
        let repo = self.repo.clone();
        let (st, ov, inc) = (saved.state.clone(), saved.overlay.clone(), incoming.clone());
        tokio::task::spawn_blocking(move || -> vmatrix_store::Result<()> {
            repo.export(&st, &inc.join("state.bin"), ExportFormat::Raw, &|_| {})?;
            repo.export(&ov, &inc.join("disk.qcow2"), ExportFormat::Raw, &|_| {})?;
            Ok(())
        })
        .await
        .map_err(|e| AgentError::Other(e.to_string()))??;
        // The overlay still names the old machine's export as its backing file: point it at
        // this machine's export of the same image (same bytes, so no data changes).
        if let BaseImage::Nbd { url } = &spec.base {
            let out = tokio::process::Command::new("qemu-img")
                .args(["rebase", "-u", "-F", "raw", "-b", url, "-f", "qcow2"])
                .arg(incoming.join("disk.qcow2"))
                .output()
                .await
                .map_err(|e| AgentError::Other(format!("qemu-img rebase: {e}")))?;
            if !out.status.success() {
                return Err(AgentError::Other(format!(
                    "qemu-img rebase: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        let files = SuspendedVm {
            state_file: incoming.join("state.bin"),
            disk: incoming.join("disk.qcow2"),
            state_bytes: 0,
            elapsed: Duration::ZERO,
        };
        let (vm, _) = Vm::resume(spec, dir, &files).await?;
        let _ = std::fs::remove_dir_all(&incoming);
        Ok(vm)
    }

    /// What runs here now.
    pub async fn report(&self) -> AgentReport {
        let slots: Vec<Arc<Mutex<Slot>>> = self.slots.lock().await.values().cloned().collect();
        let mut instances = Vec::new();
        for slot in slots {
            let s = slot.lock().await;
            let cpu = s.vm.as_ref().map_or(0.0, |vm| cpu_seconds(vm.pid()));
            instances.push(AgentInstance {
                id: s.plan.id.clone(),
                generation: s.plan.generation,
                state: s.state,
                endpoint: s.endpoint.to_string(),
                cpu_seconds: cpu,
                error: s.error.clone(),
            });
        }
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        AgentReport {
            name: self.config.name.clone(),
            address: self.config.listen.to_string(),
            role: self.config.role,
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            instances,
        }
    }
}

/// Health probes in a row that may fail before a running instance counts as failed.
const UNHEALTHY_AFTER: u32 = 5;

/// Waits for a freshly activated instance to serve and marks it running, then keeps probing its
/// health: a QEMU that exited, or a guest that stops answering, marks the instance failed so
/// the controller can replace it.
async fn wait_ready(slot: Arc<Mutex<Slot>>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut misses = 0;
    loop {
        let probe_at = {
            let s = slot.lock().await;
            if !matches!(s.state, InstanceState::Activating | InstanceState::Running)
                || s.vm.is_none()
            {
                // Moving, suspending or gone: whoever changed it watches it now.
                return;
            }
            (s.endpoint, s.plan.health.clone(), s.state)
        };
        let (endpoint, health, state) = probe_at;
        let probe =
            vmatrix_vmm::http::request(endpoint, "GET", &health, &[], Duration::from_secs(2)).await;
        let healthy = matches!(probe, Ok(ref r) if r.status == 200);
        let mut s = slot.lock().await;
        if s.state != state {
            continue;
        }
        let exited = match s.vm.as_mut() {
            Some(vm) => vm.exit_status(),
            None => return,
        };
        if let Some(status) = exited {
            s.state = InstanceState::Failed;
            s.error = Some(format!("QEMU exited ({status})"));
            return;
        }
        match (state, healthy) {
            (InstanceState::Activating, true) => s.state = InstanceState::Running,
            (InstanceState::Activating, false) if tokio::time::Instant::now() > deadline => {
                s.state = InstanceState::Failed;
                s.error = Some(format!("no answer on {health} within 180 s"));
                return;
            }
            (InstanceState::Running, true) => misses = 0,
            (InstanceState::Running, false) => {
                misses += 1;
                if misses >= UNHEALTHY_AFTER {
                    s.state = InstanceState::Failed;
                    s.error = Some(format!("{health} failed {misses} times in a row"));
                    return;
                }
            }
            _ => {}
        }
        drop(s);
        let pause = if state == InstanceState::Activating {
            200
        } else {
            2000
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}
