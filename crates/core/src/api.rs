//! The bodies that cross process boundaries: the controller's REST API and the agent protocol.

use serde::{Deserialize, Serialize};

use crate::{ImageRef, InstanceId, InstanceState, ServiceName, ServiceSpec};

/// Whether a machine takes live load or only maintenance work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineRole {
    /// Runs live instances.
    Dedicated,
    /// Runs instances under maintenance, never live load.
    Shared,
}

/// A real machine as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    /// `rm1`, `rm2`, …
    pub name: String,
    /// The agent's API address (`host:port`).
    pub address: String,
    /// Dedicated or shared.
    pub role: MachineRole,
    /// vCPUs it offers.
    pub vcpus: u32,
    /// Memory it offers, MiB.
    pub memory_mib: u32,
    /// Up, down (no heartbeat) or draining.
    pub state: MachineState,
}

/// Whether a machine takes work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineState {
    /// Heard from recently; takes new instances.
    Up,
    /// No heartbeat (and no answer to a direct probe): its instances are replaced elsewhere.
    Down,
    /// Up, but takes no new instances: its instances move off.
    Draining,
}

impl MachineState {
    /// The lower-case name used in the API and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Draining => "draining",
        }
    }
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An instance as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Instance id.
    pub id: InstanceId,
    /// Its service.
    pub service: ServiceName,
    /// The image it was activated from, `NAME:TAG` as the service named it then.
    #[serde(default)]
    pub image: String,
    /// The image version it runs: the version id the tag resolved to at activation, pinned
    /// for the instance's whole life (empty until its agent has resolved it).
    pub version: String,
    /// The machine it is on (empty when suspended).
    pub machine: String,
    /// Its state.
    pub state: InstanceState,
    /// `host:port` where it serves (empty when not running).
    pub endpoint: String,
    /// Fencing generation: bumped on every placement change.
    pub generation: u64,
    /// Until when (Unix ms) an operator's explicit placement holds it where it is: the policy
    /// does not move it before then (0: not pinned). Kept apart from the instance's row.
    #[serde(default)]
    pub pinned_until_ms: u64,
    /// What it is for: live traffic, or an admin's maintenance.
    #[serde(default)]
    pub purpose: Purpose,
    /// Its own address on the service network (bridged networking; `None` with user-mode
    /// networking). It belongs to the instance for its whole life and moves with it.
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
    /// Its slot in its service (1, 2, …) when the service has volumes: the volumes it runs
    /// with are the slot's (0: no volumes).
    #[serde(default)]
    pub slot: u32,
}

/// What an instance is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    /// Serves the service's live traffic; the policy places, moves, scales and drops it.
    #[default]
    Live,
    /// An admin's copy on a shared machine (`vmatrix maintain`): never routed by the switch,
    /// never moved, scaled or dropped by the policy; ended by `vmatrix discard` or an idle limit.
    Maintenance,
}

impl Purpose {
    /// The name used in the state database and in `ps`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Maintenance => "maintenance",
        }
    }

    /// Parses [`Purpose::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "live" => Some(Self::Live),
            "maintenance" => Some(Self::Maintenance),
            _ => None,
        }
    }
}

/// Who dropped a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DropOwner {
    /// The policy, short of capacity: only the excess is refused, and it undrops by itself.
    Policy,
    /// An operator: everything is refused until an operator undrops it.
    Operator,
}

/// `GET /api/v1/services`: the specs as applied, and which services are dropped by whom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServicesReply {
    /// The declared services.
    pub services: Vec<ServiceSpec>,
    /// Service name → who dropped it (absent: not dropped).
    pub dropped: std::collections::BTreeMap<String, DropOwner>,
}

/// One machine in `GET /api/v1/machines`: what it is and how it is used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineView {
    /// The machine.
    #[serde(flatten)]
    pub machine: MachineInfo,
    /// Instances placed on it (activating, running, migrating or suspending).
    pub instances: usize,
    /// Up, dedicated and running nothing: it can be powered down.
    pub free: bool,
    /// Busy fraction of its vCPUs, measured from its heartbeats.
    pub cpu_load: f64,
}

/// `GET /api/v1/machines`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachinesReply {
    /// Every machine.
    pub machines: Vec<MachineView>,
    /// Machines that asked to join and wait for an operator's approval.
    #[serde(default)]
    pub pending: Vec<PendingMachine>,
}

/// A machine that asked to join a controller that wants each new name approved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingMachine {
    /// The name it asked for.
    pub name: String,
    /// Its agent's address.
    pub address: String,
    /// When it last asked (ms since the epoch).
    pub asked_ms: u64,
}

/// `GET /api/v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsReply {
    /// Oldest first.
    pub events: Vec<Event>,
}

/// `GET /api/v1/instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstancesReply {
    /// Every instance that is not discarded.
    pub instances: Vec<InstanceInfo>,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number.
    pub id: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// Who acted (`controller`, `cli`, an agent).
    pub who: String,
    /// What was done.
    pub what: String,
    /// Why.
    pub why: String,
    /// `ok`, `failed: …`, `started`.
    pub outcome: String,
}

/// `POST /api/v1/services` reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApplyReply {
    /// Always true (a refused set answers with an error).
    pub applied: bool,
    /// Services whose image changed and that run instances: a rollout to the new image started
    /// for each (`vmatrix rollout --status NAME`).
    #[serde(default)]
    pub rollouts: Vec<ServiceName>,
}

/// `POST /api/v1/services` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// The full desired set: services not listed are removed.
    pub services: Vec<ServiceSpec>,
}

/// A manual operation on an instance or service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Operation {
    /// Start one more instance of a service.
    Activate {
        /// The service.
        service: ServiceName,
        /// A machine to put it on.
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
        /// A machine to resume it on.
        on: Option<String>,
    },
    /// Live-migrate an instance.
    Migrate {
        /// The instance.
        instance: InstanceId,
        /// The destination machine.
        to: String,
    },
    /// Throw an instance away.
    Discard {
        /// The instance.
        instance: InstanceId,
    },
    /// Move every instance off a machine and stop placing new ones there.
    Drain {
        /// The machine.
        machine: String,
    },
    /// Store an instance's disk as a new version (`NAME:TAG`) of its image; it keeps running.
    Commit {
        /// The instance.
        instance: InstanceId,
        /// The tag to publish.
        tag: ImageRef,
        /// Why (kept in the version's history).
        message: Option<String>,
        /// Who (default: who the controller knows asked).
        author: Option<String>,
    },
    /// Replace a service's live instances by a new version, batch by batch, with no failed
    /// request; stops and reverts by itself when a new instance fails its health check.
    Rollout {
        /// The service.
        service: ServiceName,
        /// The version to run (`NAME:TAG`).
        to: ImageRef,
        /// Instances replaced at once (default 1).
        batch: Option<u32>,
        /// Seconds to wait between batches (default 0).
        pause_s: Option<f64>,
        /// Seconds a new instance may take to pass its health check (default 180).
        health_timeout_s: Option<f64>,
        /// Who asks (for the event log and the status).
        #[serde(default)]
        author: Option<String>,
    },
    /// Return a service to the version it ran before its last rollout, the same way.
    Rollback {
        /// The service.
        service: ServiceName,
        /// Instances replaced at once (default 1).
        batch: Option<u32>,
        /// Seconds to wait between batches (default 0).
        pause_s: Option<f64>,
        /// Who asks.
        #[serde(default)]
        author: Option<String>,
    },
    /// Give a drained machine back to the policy.
    Undrain {
        /// The machine.
        machine: String,
    },
    /// Start a maintenance instance of a service on a shared machine: never routed, never
    /// moved, scaled or dropped by the policy.
    Maintain {
        /// The service.
        service: ServiceName,
        /// A tag of the service's image to run instead of the service's own (`v2` or
        /// `NAME:v2`).
        version: Option<String>,
        /// A shared machine to put it on.
        on: Option<String>,
    },
    /// Bring a dormant service back (resume a suspended instance, or start one).
    Wake {
        /// The service.
        service: ServiceName,
    },
    /// Mark a service dropped: the switch refuses its requests at once.
    Drop {
        /// The service.
        service: ServiceName,
    },
    /// Clear the dropped mark.
    Undrop {
        /// The service.
        service: ServiceName,
    },
    /// Let the policy move an instance an operator placed (`migrate --to`, `activate --on`,
    /// `resume --on` pin it there for the policy's `pin_s`).
    Unpin {
        /// The instance.
        instance: InstanceId,
    },
    /// Make a volume's snapshot its current contents (`latest`): refused while an instance
    /// holds the volume's slot.
    RestoreVolume {
        /// The volume (`vol-SERVICE-SLOT-NAME`).
        volume: crate::ImageName,
        /// The snapshot's tag.
        snapshot: String,
    },
    /// Remove a volume and its snapshots (the data goes at the next gc): refused while an
    /// instance holds the volume's slot.
    RemoveVolume {
        /// The volume (`vol-SERVICE-SLOT-NAME`).
        volume: crate::ImageName,
    },
}

/// Where a durable operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperationState {
    /// Recorded; its task runs in the controller, whoever waits for it.
    Running,
    /// It ended well.
    Done,
    /// It failed; the instance was left as it was.
    Failed,
    /// The controller stopped while it ran; the instance was settled from what its machines
    /// reported afterwards.
    Interrupted,
}

/// `POST /api/v1/operations` and `GET /api/v1/operations/{id}`: an operation and, once
/// settled, its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationReply {
    /// Its id: `GET /api/v1/operations/{id}?wait=SECONDS` follows it.
    pub operation: u64,
    /// Where it is.
    pub state: OperationState,
    /// What it did (done) or why it failed (failed, interrupted); empty while running.
    pub result: String,
}

/// An agent's self-description when it registers and on every heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentReport {
    /// Machine name.
    pub name: String,
    /// The agent's API address.
    pub address: String,
    /// Role.
    pub role: MachineRole,
    /// vCPUs offered.
    pub vcpus: u32,
    /// Memory offered, MiB.
    pub memory_mib: u32,
    /// What runs there now.
    pub instances: Vec<AgentInstance>,
    /// Its VXLAN tunnel endpoint when it carries the service network (bridged networking).
    #[serde(default)]
    pub vtep: Option<std::net::Ipv4Addr>,
    /// Increases with every report, also across agent restarts: a command's reply carries the
    /// sequence number from which its effect shows in the reports ([`CommandReply::seq`]), so
    /// the controller never judges an instance by a report taken before it changed.
    #[serde(default)]
    pub seq: u64,
}

/// Most vCPUs, memory and instances one agent may report (far beyond any real machine: what
/// the controller refuses is nonsense, not big hosts).
pub const MAX_REPORTED_VCPUS: u32 = 4096;
/// See [`MAX_REPORTED_VCPUS`]: 64 TiB.
pub const MAX_REPORTED_MEMORY_MIB: u32 = 64 << 20;
/// See [`MAX_REPORTED_VCPUS`].
pub const MAX_REPORTED_INSTANCES: usize = 4096;

impl AgentReport {
    /// Checks what the controller takes in: a valid machine name, an `ip:port` address, and
    /// vCPUs, memory and instances within bounds. The error says which field and why.
    pub fn validate(&self) -> Result<(), String> {
        crate::MachineName::new(self.name.as_str()).map_err(|e| e.to_string())?;
        if self.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "machine {}: address {:?} is not an ip:port address",
                self.name, self.address
            ));
        }
        if !(1..=MAX_REPORTED_VCPUS).contains(&self.vcpus) {
            return Err(format!(
                "machine {}: {} vCPUs; an agent offers 1 to {MAX_REPORTED_VCPUS}",
                self.name, self.vcpus
            ));
        }
        if !(1..=MAX_REPORTED_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(format!(
                "machine {}: {} MiB of memory; an agent offers 1 MiB to 64 TiB",
                self.name, self.memory_mib
            ));
        }
        if self.instances.len() > MAX_REPORTED_INSTANCES {
            return Err(format!(
                "machine {}: {} instances reported; at most {MAX_REPORTED_INSTANCES}",
                self.name,
                self.instances.len()
            ));
        }
        Ok(())
    }
}

/// `POST /api/v1/agents/join`'s answer: the machine's own credential. The agent keeps it
/// (mode 0600) and proves with it that it is that machine: its heartbeats carry it, and the
/// controller's commands to it do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinReply {
    /// The credential, bound to the machine's name.
    pub credential: String,
}

/// A machine asks the matrix's authority for its certificate (with its own credential): a
/// PKCS#10 request, PEM, for a key the machine made and keeps. Whatever names it holds, the
/// certificate names the machine the credential belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// The certificate signing request, PEM.
    pub csr: String,
}

/// The machine's certificate and the authority's, both PEM: what its QEMUs prove themselves
/// with, and trust, on the live-migration data path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateReply {
    /// The machine's certificate (`CN` and a DNS name: its name).
    pub certificate: String,
    /// The matrix's authority certificate.
    pub authority: String,
}

/// The body of an agent's answer to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandReply {
    /// Reports with this sequence number or higher show the command's effect.
    pub seq: u64,
    /// What the command did.
    #[serde(flatten)]
    pub reply: AgentReply,
}

impl AgentCommand {
    /// The instance the command is about (none for a volume's).
    pub fn instance(&self) -> Option<&InstanceId> {
        match self {
            Self::Activate { plan, .. } | Self::PrepareIncoming { plan, .. } => Some(&plan.id),
            Self::Suspend { id, .. }
            | Self::MigrateOut { id, .. }
            | Self::FinishIncoming { id, .. }
            | Self::Discard { id, .. }
            | Self::Pause { id, .. }
            | Self::Unpause { id, .. }
            | Self::Commit { id, .. }
            | Self::RemoveSaved { id, .. } => Some(id),
            Self::SetVolume { .. } => None,
        }
    }
}

/// One instance as its agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInstance {
    /// Instance id.
    pub id: InstanceId,
    /// The generation the agent last acted on.
    pub generation: u64,
    /// `activating`, `running`, `paused`, `failed`, `migrating`, `suspending`.
    pub state: InstanceState,
    /// `host:port`.
    pub endpoint: String,
    /// CPU seconds used by its QEMU so far.
    pub cpu_seconds: f64,
    /// Resident memory of its QEMU, bytes (0: not known; agents before it was reported).
    #[serde(default)]
    pub memory_bytes: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// The image version it runs (pinned).
    #[serde(default)]
    pub version: String,
    /// When it is `suspended`: where its state went (kept until the controller has it).
    #[serde(default)]
    pub saved: Option<SavedState>,
}

/// Everything an agent needs to run an instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstancePlan {
    /// Instance id.
    pub id: InstanceId,
    /// Fencing generation.
    pub generation: u64,
    /// Its service.
    pub service: ServiceName,
    /// The disk image.
    pub image: ImageRef,
    /// The version id `image` resolved to when the instance was first activated; `None` only
    /// for a first activation (the agent resolves the tag and answers with the id).
    #[serde(default)]
    pub version: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Guest port.
    pub port: u16,
    /// Its health check (plans written before checks were tables carry just the path).
    pub health: crate::health::HealthCheck,
    /// Its place on the service network (bridged networking), `None` for user-mode NAT.
    #[serde(default)]
    pub net: Option<NetAttach>,
    /// Its virtual hardware (plans written before it was a choice: the defaults).
    #[serde(default)]
    pub hardware: crate::Hardware,
    /// What its cloud-init seed carries besides its id, hostname and network.
    #[serde(default)]
    pub cloud_init: CloudInit,
    /// Its slot's persistent volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::VolumePlan>,
}

/// The service's part of an instance's cloud-init seed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudInit {
    /// SSH public keys for the image's default user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// The service's user-data (its content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

/// An instance's place on the service network: its address, the network's prefix length and
/// the gateway every host answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetAttach {
    /// The instance's address.
    pub address: std::net::Ipv4Addr,
    /// The service network's prefix length.
    pub prefix: u8,
    /// The gateway (the same address on every host).
    pub gateway: std::net::Ipv4Addr,
}

/// The controller's answer to a heartbeat: what the machine must know of the others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The service network as the machines share it (`None`: user-mode networking).
    #[serde(default)]
    pub network: Option<NetworkView>,
    /// The instances the controller places on this machine: after its lease lapsed, the
    /// machine lets these run on and no other (the controller discards the rest).
    #[serde(default)]
    pub placed: Vec<InstanceId>,
}

/// How long a machine's VMs may run after the controller last heard from it (a heartbeat's
/// sending, or its answer to a probe): past it, the machine stops them itself (fencing).
pub const LEASE_MS: u64 = 10_000;

/// How long after a silent machine's lease has lapsed the controller replaces its instances:
/// room for the machine's watchdog to have stopped them.
pub const LEASE_MARGIN_MS: u64 = 3_000;

/// The shared service network: which hosts carry it (VXLAN tunnel endpoints) — every machine
/// and the switch's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    /// The service network, `A.B.C.D/N`.
    pub service_net: String,
    /// The VXLAN network identifier.
    pub vni: u32,
    /// Every tunnel endpoint (the receiving machine's own among them).
    pub vteps: Vec<std::net::Ipv4Addr>,
    /// Every address of a host (machines in any state, the controller, the fronts): never
    /// reachable from an instance.
    #[serde(default)]
    pub hosts: Vec<std::net::Ipv4Addr>,
    /// Who may reach whom: every service with the addresses its instances hold.
    #[serde(default)]
    pub services: Vec<ServiceAccess>,
}

/// One service on the service network: its instances' addresses, the services allowed to
/// open connections to them, and whether they may reach outside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccess {
    /// The service.
    pub name: ServiceName,
    /// Its instances' addresses.
    pub members: Vec<std::net::Ipv4Addr>,
    /// Services whose instances may connect to these.
    #[serde(default)]
    pub allow_from: Vec<ServiceName>,
    /// Outbound traffic beyond the service network allowed.
    #[serde(default)]
    pub egress: bool,
}

/// A command from the controller to an agent. Every command carries the instance's generation;
/// an agent refuses one older than what it has seen (fencing).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum AgentCommand {
    /// Boot from the repository image (or resume the saved state `state` if given).
    Activate {
        /// What to run.
        plan: InstancePlan,
        /// Saved state and overlay in the repository, to resume instead of booting.
        state: Option<SavedState>,
    },
    /// Suspend into the repository.
    Suspend {
        /// Instance.
        id: InstanceId,
        /// Generation.
        generation: u64,
    },
    /// Start a paused destination for an incoming migration.
    PrepareIncoming {
        /// What will arrive.
        plan: InstancePlan,
        /// The machine it comes from: the only one the data path admits (over TLS).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    /// Send a running instance to a destination prepared with `PrepareIncoming`.
    MigrateOut {
        /// Instance.
        id: InstanceId,
        /// Generation.
        generation: u64,
        /// Where to.
        target: MigrationTargetBody,
    },
    /// Let a migrated instance run on the destination.
    FinishIncoming {
        /// Instance.
        id: InstanceId,
        /// Generation.
        generation: u64,
    },
    /// Pause a running instance in memory (a warm standby, or server drop).
    Pause {
        /// Instance.
        id: InstanceId,
        /// Generation.
        generation: u64,
    },
    /// Let a paused instance run again.
    Unpause {
        /// Instance.
        id: InstanceId,
        /// Generation.
        generation: u64,
    },
    /// Stop and throw the instance away.
    Discard {
        /// Instance.
        id: InstanceId,
        /// Generation.
        generation: u64,
    },
    /// Store the instance's disk (its changes over its base) as a new version `image`; the
    /// instance keeps running (its vCPUs stop only while its overlay is copied).
    Commit {
        /// Instance.
        id: InstanceId,
        /// Generation.
        generation: u64,
        /// The tag to publish (`NAME:TAG`).
        image: ImageRef,
        /// Who commits.
        author: String,
        /// Why.
        message: Option<String>,
    },
    /// Remove the saved state of a suspended instance that is thrown away (any machine can:
    /// it is in the shared repository).
    RemoveSaved {
        /// Instance.
        id: InstanceId,
        /// Its generation when it was suspended.
        generation: u64,
        /// What to remove.
        saved: SavedState,
    },
    /// Point a volume's `latest` at its snapshot `snapshot`, or with none remove every tag of
    /// the volume (any machine can: it is in the shared repository). The controller has
    /// checked that no instance holds the volume's slot.
    SetVolume {
        /// The volume.
        volume: crate::ImageName,
        /// The snapshot to restore; `None`: remove the volume.
        snapshot: Option<String>,
    },
}

/// The two repository objects that hold a suspended instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    /// The memory and device state.
    pub state: ImageRef,
    /// The disk overlay.
    pub overlay: ImageRef,
}

/// Where a migrating instance goes (the destination agent's answer to `PrepareIncoming`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationTargetBody {
    /// NBD server `host:port`.
    pub nbd: String,
    /// NBD export name.
    pub export: String,
    /// Migration listener `host:port`.
    pub migration: String,
    /// Over TLS: the name the destination's certificate carries (absent: in the clear).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_name: Option<String>,
    /// The endpoint the instance will serve on there.
    pub endpoint: String,
}

/// An agent's answer to a command: one variant per command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum AgentReply {
    /// `activate`: it started (its health check decides when it runs).
    Activated {
        /// Where it serves.
        endpoint: String,
        /// The version id it runs (pinned from now on).
        version: String,
    },
    /// `suspend`: its state and overlay are durable in the repository.
    Suspended {
        /// Where they are.
        saved: SavedState,
    },
    /// `prepare-incoming`: a paused destination waits.
    Prepared {
        /// Where the source sends it (and where it will serve).
        target: MigrationTargetBody,
        /// The version id it runs.
        version: String,
    },
    /// `migrate-out`: the move finished and the source ended.
    MigratedOut {
        /// QEMU's total migration time, ms.
        total_ms: u64,
        /// Time the guest was stopped, ms.
        downtime_ms: u64,
    },
    /// `finish-incoming`: it runs on the destination.
    Finished {
        /// Where it serves.
        endpoint: String,
        /// How long after the switch-over it first answered its health check there (`None`:
        /// it did not within the agent's wait, or the command was a repeat).
        #[serde(default)]
        answered_ms: Option<u64>,
    },
    /// `discard`: nothing of it is left on the machine.
    Discarded,
    /// `pause`: its vCPUs are stopped; it holds its memory.
    Paused,
    /// `unpause`: it runs again, where it served before.
    Unpaused,
    /// `commit`: the new version.
    Committed(CommitReport),
    /// `set-volume`: the tags it changed (`NAME:TAG -> version`, or removed).
    VolumeSet {
        /// What changed, one line each.
        changed: Vec<String>,
    },
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitReport {
    /// The tag published.
    pub image: String,
    /// Its version id.
    pub version: String,
    /// The version the instance ran (the new one's parent).
    pub parent: String,
    /// False when nothing changed (the tag already pointed at identical content).
    pub published: bool,
    /// The disk's size.
    pub logical_bytes: u64,
    /// Chunks new to the repository, and what they took there.
    pub new_chunks: u64,
    /// Stored (compressed) bytes of the new chunks.
    pub new_stored_bytes: u64,
    /// How long the guest's vCPUs were stopped (its overlay copied).
    pub paused_ms: u64,
    /// File systems the guest agent froze for the copy (`None`: the guest has no agent).
    #[serde(default)]
    pub frozen: Option<u64>,
    /// The whole commit.
    pub seconds: f64,
}

impl AgentReply {
    /// The variant's name, for "expected X, got Y" errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Activated { .. } => "activated",
            Self::Suspended { .. } => "suspended",
            Self::Prepared { .. } => "prepared",
            Self::MigratedOut { .. } => "migrated-out",
            Self::Finished { .. } => "finished",
            Self::Discarded => "discarded",
            Self::Paused => "paused",
            Self::Unpaused => "unpaused",
            Self::Committed(_) => "committed",
            Self::VolumeSet { .. } => "volume-set",
        }
    }
}

/// How long a save or a move of `memory_mib` of guest RAM may take before it is given up:
/// derived from the work at a pessimistic 8 MiB/s (TCG on a busy host does ~500 MiB/s), plus a
/// minute for the disk and QEMU's own steps. Agent and controller use the same figure.
pub fn work_limit(memory_mib: u32) -> std::time::Duration {
    std::time::Duration::from_secs(60)
        + std::time::Duration::from_millis(u64::from(memory_mib) * 125)
}

/// The header a standby controller sets on its refusals (503): the client tries the next
/// controller it knows.
pub const STANDBY_HEADER: &str = "x-vmatrix-standby";

/// The name the controller's certificate carries (besides its addresses) and the only caller
/// an agent's API takes over TLS. No machine can bear it: machine names have no dots.
pub const CONTROLLER_TLS_NAME: &str = "controller.vmatrix";

/// An error body: what failed and what to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The message.
    pub error: String,
}

/// Where a service's traffic goes now: the switch's route table, versioned.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Changes whenever any route changes.
    pub version: String,
    /// One entry per declared service.
    pub services: Vec<ServiceRoute>,
}

/// One service's routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRoute {
    /// The service.
    pub service: ServiceName,
    /// Priority (for dropped-request accounting).
    pub priority: i32,
    /// Running instances: `(instance id, host:port)`.
    pub backends: Vec<(InstanceId, String)>,
    /// Those of `backends` in a live migration: they serve on, but get a new request only when
    /// no other backend can take it (a request would wait out the switch-over's pause).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moving: Vec<String>,
    /// Its `tcp` ports, each with the instances' `address:port` to send connections to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRoute>,
    /// Dropped: refuse its requests at once with 503 — those above `admit_rps`.
    pub dropped: bool,
    /// When dropped, the requests per second still let through to the running instances
    /// (their capacity, when the policy dropped it for want of room; 0 when an operator did).
    #[serde(default)]
    pub admit_rps: f64,
}

/// A service's `tcp` port as the switch carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRoute {
    /// The port's name.
    pub name: String,
    /// The switch's port for it.
    pub listen: u16,
    /// The running instances' `address:port` (bridged instances only).
    pub backends: Vec<String>,
}

/// One service's measured load, as the switch reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceLoad {
    /// Requests per second over the last window (5 s: what the policy's tick sizes from).
    pub rps: f64,
    /// Requests in the last whole second (what the fast path reacts to).
    #[serde(default)]
    pub rps_now: f64,
    /// Requests in flight now.
    pub concurrency: u64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Requests since start.
    pub requests: u64,
    /// Failed requests (5xx from the switch, backend errors) since start.
    pub errors: u64,
    /// Requests held while the service woke up, since start.
    pub held: u64,
    /// Requests refused because the service is dropped or its queue is full, since start.
    pub dropped: u64,
}

/// The switch's load report: per service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Service name → load.
    pub services: std::collections::BTreeMap<String, ServiceLoad>,
}

/// The first message of a console session (a WebSocket text frame, JSON). After it: the
/// scroll-back and then the live output as binary frames; input goes the other way as binary
/// frames (the writer's only). The session ends with a close frame saying why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleHello {
    /// The instance.
    pub instance: InstanceId,
    /// Its machine.
    pub machine: String,
    /// Whether this session writes (one at a time; the others read).
    pub writer: bool,
    /// Bytes of recent output sent first.
    pub scrollback_bytes: u64,
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    /// Replacing batch after batch.
    Running,
    /// A new instance failed: putting back the old version.
    Reverting,
    /// Every live instance runs the new version.
    Done,
    /// It stopped and the service runs the old version again (`message` says why).
    Reverted,
    /// It stopped and could not put everything back (`message` says what is left).
    Failed,
}

impl RolloutState {
    /// Still at work (a controller restart resumes it).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Reverting)
    }
}

/// A service's rollout (or rollback): `GET /api/v1/rollouts`, `vmatrix rollout --status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The service.
    pub service: ServiceName,
    /// `rollout` or `rollback`.
    pub kind: String,
    /// Where it is.
    pub state: RolloutState,
    /// The image (`NAME:TAG`) and version the service ran before.
    pub from_image: String,
    /// The version id it ran before (empty if unknown: no live instance).
    pub from_version: String,
    /// The image it goes to.
    pub to_image: String,
    /// The version id it goes to (empty until the first new instance has resolved it).
    pub to_version: String,
    /// Instances replaced at once.
    pub batch: u32,
    /// Seconds between batches.
    pub pause_s: f64,
    /// Seconds a new instance may take to pass its health check.
    pub health_timeout_s: f64,
    /// Live instances of the old version still to replace.
    pub old: Vec<InstanceId>,
    /// Replaced so far: (old, new).
    pub replaced: Vec<(InstanceId, InstanceId)>,
    /// New instances of the batch under way, not yet running.
    #[serde(default)]
    pub starting: Vec<InstanceId>,
    /// Live instances that already ran the new version when it started (not replacements: a
    /// resumed rollout takes over any other instance of the new version it finds).
    #[serde(default)]
    pub kept: Vec<InstanceId>,
    /// Instances to replace in all.
    pub total: u32,
    /// Unix ms.
    pub started_ms: u64,
    /// Unix ms of the last step.
    pub updated_ms: u64,
    /// The last step, or why it stopped.
    pub message: String,
    /// Who asked for it (`apply` for one an apply started).
    #[serde(default)]
    pub requested_by: String,
}

/// `GET /api/v1/rollouts`: each service's last rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutsReply {
    /// By service name.
    pub rollouts: Vec<RolloutStatus>,
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_route_table_reads_back_exactly_what_was_written() {
        // A number with more digits than a double holds: read correctly rounded, written as
        // the shortest form of that double, read back the same (found by fuzzing: it moved by
        // one unit in the last place without serde_json's float_roundtrip).
        let text = r#"{"version":"v","services":[{"service":"web","priority":5,"backends":[],
            "dropped":true,"admit_rps":93.5444444444444444444444444444444444444444444444}]}"#;
        let t: RouteTable = serde_json::from_str(text).unwrap();
        let again: RouteTable = serde_json::from_slice(&serde_json::to_vec(&t).unwrap()).unwrap();
        assert_eq!(again, t);
    }

    use super::*;

    fn report() -> AgentReport {
        AgentReport {
            name: "rm1".into(),
            address: "127.0.0.1:7071".into(),
            role: MachineRole::Dedicated,
            vcpus: 4,
            memory_mib: 4096,
            instances: Vec::new(),
            vtep: None,
            seq: 1,
        }
    }

    #[test]
    fn an_agent_report_is_checked_field_by_field() {
        assert_eq!(report().validate(), Ok(()));
        type Spoil = fn(&mut AgentReport);
        let cases: [(Spoil, &str); 6] = [
            (
                |r| r.name = "../../evil\nname".into(),
                "invalid machine name",
            ),
            (|r| r.name = "RM1".into(), "invalid machine name"),
            (|r| r.address = "somewhere".into(), "not an ip:port"),
            (|r| r.vcpus = u32::MAX, "vCPUs"),
            (|r| r.vcpus = 0, "vCPUs"),
            (|r| r.memory_mib = 0, "memory"),
        ];
        for (spoil, why) in cases {
            let mut r = report();
            spoil(&mut r);
            let e = r.validate().expect_err(why);
            assert!(e.contains(why), "{e:?} should say {why:?}");
        }
    }
}

/// One message of `GET /api/v1/stream` (server-sent events, one a second): the matrix as the
/// dashboard draws it. The first carries the last events; each later one only those since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DashboardSnapshot {
    /// When it was taken (Unix ms).
    pub at_ms: u64,
    /// Machines and how they are used.
    pub machines: MachinesReply,
    /// Every instance that is not discarded.
    pub instances: Vec<InstanceInfo>,
    /// The services as applied, and which are dropped.
    pub services: ServicesReply,
    /// The switch's latest load report.
    pub load: LoadReport,
    /// Events since the previous message (oldest first).
    pub events: Vec<Event>,
    /// What each instance uses, as its machine last reported (the figures `/metrics` gives).
    #[serde(default)]
    pub usage: std::collections::BTreeMap<InstanceId, InstanceUse>,
}

/// What an instance uses, as its machine last reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceUse {
    /// The machine that reported it.
    pub machine: String,
    /// CPU seconds its QEMU has used.
    pub cpu_seconds: f64,
    /// Resident memory of its QEMU, bytes.
    pub memory_bytes: u64,
}
