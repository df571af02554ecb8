//! The policy's view of the world, and its answer.

use serde::{Deserialize, Serialize};

/// A real machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Name.
    pub name: String,
    /// Takes live load (false: a shared machine, maintenance only).
    pub dedicated: bool,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Heard from recently.
    pub healthy: bool,
    /// Measured CPU busy fraction (0..=1, 0 when unknown): above `Config::hot_above` the
    /// machine is relieved by migrating an instance away.
    #[serde(default)]
    pub cpu_load: f64,
}

/// A service and its measured demand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Higher wins when the pool is short.
    pub priority: i32,
    /// Requests per second one instance serves well.
    pub capacity_rps: f64,
    /// Instances kept whatever the load.
    pub min: u32,
    /// Most instances.
    pub max: u32,
    /// vCPUs per instance.
    pub vcpus: u32,
    /// Memory per instance, MiB.
    pub memory_mib: u32,
    /// Measured demand, requests/s, one sample per tick, oldest first (the last is now). `NaN`
    /// where the demand is unknown (the switch's report did not arrive): an unknown sample never
    /// lets a scale-in through.
    pub demand: Vec<f64>,
    /// The forecast of the demand over the next few minutes, requests/s (0: none): provisioned
    /// for like recent demand. Controller and simulator both take it from a [`crate::Memory`]
    /// (the demand one season ago, a little ahead of now).
    #[serde(default)]
    pub forecast_rps: f64,
    /// Currently refused by the switch (dropped).
    pub dropped: bool,
    /// Most warm standbys (instances kept paused in memory, ready in milliseconds) the policy
    /// may keep for this service; 0: none.
    #[serde(default)]
    pub standby_max: u32,
    /// The largest rise of demand above what the policy had provisioned, over the caller's
    /// spike window, requests/s ([`crate::Memory::spike`]): standbys are sized to cover it.
    #[serde(default)]
    pub spike_rps: f64,
    /// Put the instances on different machines (so that one machine failure never takes the
    /// service down) where the pool allows.
    #[serde(default = "yes")]
    pub spread: bool,
}

fn yes() -> bool {
    true
}

/// Where an instance is in its life, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Booting, resuming or moving: occupies its machine, serves soon.
    Starting,
    /// Serving.
    Running,
    /// A warm standby: booted, then paused in memory. Holds its memory, uses no CPU; serves
    /// again milliseconds after it is unpaused.
    Paused,
    /// Dormant in the repository, state kept.
    Suspended,
    /// Broken.
    Failed,
}

/// One instance. Services and machines are referred to by their index in the snapshot (a
/// snapshot of a large pool holds 100,000 instances: no string keys on the hot path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Id (for the caller; `decide` never looks at it).
    pub id: String,
    /// Its service: an index into [`Snapshot::services`].
    pub service: usize,
    /// Its machine, an index into [`Snapshot::machines`] (none when suspended).
    pub machine: Option<usize>,
    /// State.
    pub state: InstanceState,
    /// Placed there by an operator: the policy never migrates it (until the pin is removed or
    /// expires), except off a machine that failed or left the pool.
    #[serde(default)]
    pub pinned: bool,
}

/// Everything `decide` looks at. Time is an input.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Seconds since some epoch (only differences matter).
    pub now_s: f64,
    /// Machines.
    pub machines: Vec<Machine>,
    /// Services.
    pub services: Vec<Service>,
    /// Instances.
    pub instances: Vec<Instance>,
}

/// Tuning, in ticks of the caller (made from [`crate::Settings`] for the caller's tick length).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Capacity kept above the smoothed demand (1.2 = 20% headroom).
    pub headroom: f64,
    /// Samples whose maximum sizes a scale-out (short: react fast).
    pub scale_out_window: usize,
    /// Samples whose maximum must also allow a scale-in (long: do not flap).
    pub scale_in_window: usize,
    /// A scale-in must shed more than this fraction of the instances (hysteresis: 0.1 keeps a
    /// service of 100 instances from giving back 3 for a noisy minute). 0 scales in exactly.
    pub scale_in_tolerance: f64,
    /// Suspended instances a service keeps, per instance it runs (or wants): more are
    /// discarded. Resuming beats a cold boot, but every dormant state costs repository space.
    pub dormant_ratio: f64,
    /// Most migrations per tick (consolidation).
    pub max_moves: usize,
    /// Consolidate only while the pool's memory use is below this fraction.
    pub consolidate_below: f64,
    /// How the pool is shared when it cannot hold every service's wish.
    pub sharing: Sharing,
    /// A machine whose measured CPU load is above this fraction is relieved by one migration.
    pub hot_above: f64,
}

/// How a pool too small for every wish is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Sharing {
    /// Higher priorities get all they want first; lower ones get what is left.
    #[default]
    StrictPriority,
    /// Every service gets a share of the pool in proportion to its priority (priorities below
    /// 1 count as 1), never more than it wants; what one does not need goes to the others.
    WeightedFair,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            headroom: 1.2,
            scale_out_window: 3,
            scale_in_window: 10,
            scale_in_tolerance: 0.1,
            dormant_ratio: 1.0,
            max_moves: 2,
            consolidate_below: 0.7,
            sharing: Sharing::StrictPriority,
            hot_above: 0.9,
        }
    }
}

/// Why an action is taken, for the event log: shared, since a tick gives one reason to many
/// actions (a scale-out of 40 instances) and a large pool's tick has thousands.
pub type Reason = std::sync::Arc<str>;

/// One step of a plan, with its reason. Objects are indices into the snapshot the plan was made
/// from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Start a new instance of `service` on `machine` as a warm standby: boot it, then pause it.
    Prepare {
        /// Service (index).
        service: usize,
        /// Machine (index).
        machine: usize,
        /// Why.
        reason: Reason,
    },
    /// Pause a running instance in memory (a standby, or server drop that frees CPU in the same
    /// second).
    Pause {
        /// Instance (index).
        instance: usize,
        /// Why.
        reason: Reason,
    },
    /// Let a paused instance run again (milliseconds).
    Unpause {
        /// Instance (index).
        instance: usize,
        /// Why.
        reason: Reason,
    },
    /// Start a new instance of `service` on `machine`.
    Activate {
        /// Service (index).
        service: usize,
        /// Machine (index).
        machine: usize,
        /// Why.
        reason: Reason,
    },
    /// Resume a suspended instance on `machine`.
    Resume {
        /// Instance (index).
        instance: usize,
        /// Machine (index).
        machine: usize,
        /// Why.
        reason: Reason,
    },
    /// Suspend an instance (state kept in the repository).
    Suspend {
        /// Instance (index).
        instance: usize,
        /// Why.
        reason: Reason,
    },
    /// Live-migrate an instance.
    Migrate {
        /// Instance (index).
        instance: usize,
        /// Destination machine (index).
        to: usize,
        /// Why.
        reason: Reason,
    },
    /// Throw an instance away.
    Discard {
        /// Instance (index).
        instance: usize,
        /// Why.
        reason: Reason,
    },
    /// Have the switch refuse a service's excess load.
    Drop {
        /// Service (index).
        service: usize,
        /// Why.
        reason: Reason,
    },
    /// Stop refusing a service's load.
    Undrop {
        /// Service (index).
        service: usize,
        /// Why.
        reason: Reason,
    },
}

impl Action {
    /// The reason, for the event log.
    pub fn reason(&self) -> &str {
        match self {
            Self::Activate { reason, .. }
            | Self::Prepare { reason, .. }
            | Self::Pause { reason, .. }
            | Self::Unpause { reason, .. }
            | Self::Resume { reason, .. }
            | Self::Suspend { reason, .. }
            | Self::Migrate { reason, .. }
            | Self::Discard { reason, .. }
            | Self::Drop { reason, .. }
            | Self::Undrop { reason, .. } => reason,
        }
    }

    /// The service it acts on (an index into `s.services`), as `s` names it.
    pub fn service(&self, s: &Snapshot) -> Option<usize> {
        match self {
            Self::Activate { service, .. }
            | Self::Prepare { service, .. }
            | Self::Drop { service, .. }
            | Self::Undrop { service, .. } => Some(*service),
            Self::Pause { instance, .. }
            | Self::Unpause { instance, .. }
            | Self::Resume { instance, .. }
            | Self::Suspend { instance, .. }
            | Self::Migrate { instance, .. }
            | Self::Discard { instance, .. } => s.instances.get(*instance).map(|i| i.service),
        }
    }
}
