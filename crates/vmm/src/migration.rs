//! Live migration of RAM *and* disk between two QEMU processes (two machines).
//!
//! The source's overlay is mirrored into the destination's over NBD before the RAM switch-over;
//! both overlays sit on the same base image, so only the overlay's own clusters travel
//! (`sync: top`). The mirror runs in `write-blocking` mode, so once it is ready every guest
//! write reaches the destination before it completes, and the migration pauses before the
//! switch-over so the mirror is ended while the guest is stopped — the flow libvirt uses.
//!
//! ```text
//!  source (running)                          destination (-S -incoming defer)
//!  ----------------                          --------------------------------
//!                                            nbd-server-start HOST:NBD_PORT
//!                                            block-export-add disk0 (writable)
//!                                            migrate-incoming tcp:HOST:MIG_PORT
//!  blockdev-add nbd://HOST:NBD_PORT/disk0 ─────────▶ (NBD client connects)
//!  blockdev-mirror disk0 → target (top, write-blocking)
//!  … wait until the job is ready …
//!  migrate-set-capabilities pause-before-switchover
//!  migrate tcp:HOST:MIG_PORT ══════ RAM ═══════▶ (loads RAM)
//!  … status pre-switchover (guest stopped) …
//!  block-job-cancel (ready mirror: final sync, detach)
//!  migrate-continue ═══ last pages + devices ══▶ status paused
//!  quit                                      nbd-server-stop
//!                                            cont  → the guest runs here
//! ```
//!
//! Persistent volumes go the same way, each its own mirror job to its own export (named after
//! its node), all ready before the RAM moves and all ended at the switch-over.
//!
//! If anything fails before the switch-over, the mirror is cancelled and its target removed;
//! the source keeps running and is handed back to the caller.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Result, VmmError};
use crate::process::{set_nice, Threads, MIGRATING_NICE};
use crate::qmp::commands::*;
use crate::vm::{
    create_overlay, prepare_dir, StartMode, Vm, VmDir, VmSpec, DISK_NODE, UNTHROTTLED,
};

/// The id of the TLS credentials a destination listens with.
pub(crate) const TLS_SERVER: &str = "vmatrix-tls-server";
/// The id of the TLS credentials a source connects with.
pub(crate) const TLS_CLIENT: &str = "vmatrix-tls-client";
const TLS_AUTHZ: &str = "vmatrix-tls-peer";

/// A machine's credentials for the migration data path: both the NBD export of the disk and the
/// migration stream go through TLS with certificates from the matrix's authority, checked both
/// ways — the source checks that the destination's certificate names the machine it meant, the
/// destination admits only the source's certificate (by its distinguished name, `CN=NAME`).
/// Nothing else that reaches the ports — another process on the host, another machine, a
/// guest — can write the disk or feed the VM a state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationTls {
    /// A directory with QEMU's file names: `ca-cert.pem`, `server-cert.pem`,
    /// `server-key.pem`, `client-cert.pem`, `client-key.pem` (readable by the caller; QEMU
    /// reads them before it drops to its own user).
    pub dir: PathBuf,
    /// The machine's name, which its certificate carries (`CN` and a DNS name).
    pub name: String,
}

const MIRROR_JOB: &str = "vmatrix-mirror";
const MIRROR_TARGET: &str = "vmatrix-mirror-target";
const EXPORT_ID: &str = "vmatrix-export";

/// Where a source sends a migrating VM: the destination's NBD export and migration listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationTarget {
    /// The destination's NBD server.
    pub nbd: SocketAddr,
    /// The NBD export name of the destination's disk.
    pub export: String,
    /// The destination's migration listener.
    pub migration: SocketAddr,
    /// Over TLS: the name the destination's certificate carries (`None`: in the clear).
    pub tls_name: Option<String>,
}

/// QEMU's figures for a finished live migration.
#[derive(Debug, Clone, Default)]
pub struct MigrationReport {
    /// QEMU's total migration time (RAM phase), milliseconds.
    pub total_ms: u64,
    /// Time the guest was stopped, milliseconds.
    pub downtime_ms: u64,
    /// RAM bytes sent.
    pub ram_bytes: u64,
    /// Disk bytes mirrored.
    pub disk_bytes: u64,
    /// Wall time of the whole move, disk mirror included.
    pub wall: Duration,
}

/// A failed migration: the error and the source VM, still running.
#[derive(Debug)]
pub struct MigrationFailure {
    /// What failed.
    pub error: VmmError,
    /// The source, back in the caller's hands.
    pub source: Box<Vm>,
}

impl std::fmt::Display for MigrationFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "migration failed; the source still runs: {}", self.error)
    }
}

impl std::error::Error for MigrationFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// A destination QEMU waiting, paused, for an incoming migration.
#[derive(Debug)]
pub struct IncomingVm {
    vm: Vm,
    target: MigrationTarget,
}

impl IncomingVm {
    /// Starts the destination in `dir` with a fresh overlay on the same base, exports its disk
    /// over NBD and listens for the migration stream, both on `listen`. With the spec's TLS
    /// credentials both take only a TLS client whose certificate names machine `peer` (any
    /// certificate of the authority if `None`); without, anyone who reaches them.
    pub async fn start(
        spec: VmSpec,
        dir: impl Into<PathBuf>,
        listen: IpAddr,
        peer: Option<&str>,
    ) -> Result<Self> {
        let dir = VmDir::new(dir);
        prepare_dir(&dir)?;
        create_overlay(&spec, &dir.disk()).await?;
        crate::volume::create_volumes(&spec, &dir).await?;
        let volumes: Vec<String> = spec.volumes.iter().map(|v| v.node()).collect();
        let tls_name = spec.tls.as_ref().map(|t| t.name.clone());
        // Started at MIGRATING_NICE: loading a guest yields to the guests that serve (its own
        // vCPUs wait anyway).
        let mut vm = Vm::start(spec, dir, StartMode::Incoming, MIGRATING_NICE).await?;
        let listening = async {
            let nbd = SocketAddr::new(listen, free_port(listen)?);
            let migration = SocketAddr::new(listen, free_port(listen)?);
            let (creds, authz) = match (&tls_name, peer) {
                (None, _) => (None, None),
                (Some(_), None) => (Some(TLS_SERVER.to_string()), None),
                (Some(_), Some(peer)) => {
                    vm.qmp
                        .execute(&ObjectAddAuthz {
                            qom_type: "authz-simple",
                            id: TLS_AUTHZ.into(),
                            identity: format!("CN={peer}"),
                        })
                        .await?;
                    (Some(TLS_SERVER.to_string()), Some(TLS_AUTHZ.to_string()))
                }
            };
            vm.qmp
                .execute(&NbdServerStart {
                    addr: SocketAddressLegacy::Inet {
                        host: nbd.ip().to_string(),
                        port: nbd.port().to_string(),
                    },
                    tls_creds: creds.clone(),
                    tls_authz: authz.clone(),
                })
                .await?;
            if creds.is_some() {
                vm.qmp
                    .execute(&MigrateSetParameters {
                        tls_creds: creds,
                        tls_authz: Some(authz.unwrap_or_default()),
                        ..Default::default()
                    })
                    .await?;
            }
            vm.qmp
                .execute(&BlockExportAdd {
                    kind: "nbd",
                    id: EXPORT_ID.into(),
                    node_name: DISK_NODE.into(),
                    writable: true,
                    name: DISK_NODE.into(),
                })
                .await?;
            // Each volume too, under its node's name.
            for node in &volumes {
                vm.qmp
                    .execute(&BlockExportAdd {
                        kind: "nbd",
                        id: format!("{EXPORT_ID}-{node}"),
                        node_name: node.clone(),
                        writable: true,
                        name: node.clone(),
                    })
                    .await?;
            }
            vm.qmp
                .execute(&MigrateIncoming {
                    uri: format!("tcp:{migration}"),
                })
                .await?;
            Ok::<_, VmmError>(MigrationTarget {
                nbd,
                export: DISK_NODE.into(),
                migration,
                tls_name,
            })
        }
        .await;
        match listening {
            Ok(target) => Ok(Self { vm, target }),
            Err(e) => {
                // Never left behind, whatever its lifetime.
                vm.kill().await;
                Err(e)
            }
        }
    }

    /// Takes over a destination a previous agent process left (`vm`, adopted): if the incoming
    /// state has been loaded completely (QEMU is no longer `inmigrate`), the destination is
    /// the instance now — the source has ended — and it is returned to be finished; otherwise
    /// the migration never completed, the source still has the guest, and it is killed.
    pub async fn adopt(mut vm: Vm) -> Option<Self> {
        match vm.status().await {
            Ok(s) if s.status != "inmigrate" => Some(Self {
                target: MigrationTarget {
                    // Unused after the hand-over: the source has sent everything.
                    nbd: SocketAddr::from(([127, 0, 0, 1], 0)),
                    export: DISK_NODE.into(),
                    migration: SocketAddr::from(([127, 0, 0, 1], 0)),
                    tls_name: None,
                },
                vm,
            }),
            _ => {
                vm.kill().await;
                None
            }
        }
    }

    /// The destination QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Where the source should send the VM.
    pub fn target(&self) -> &MigrationTarget {
        &self.target
    }

    /// After the source reported success: waits for the state to be loaded, ends the NBD
    /// export and lets the guest run here.
    pub async fn finish(mut self, limit: Duration) -> Result<Vm> {
        let done = async {
            self.vm.wait_incoming(limit).await?;
            self.vm.serve_at_full_priority();
            // The guest first (it is stopped until then), the export it no longer needs after.
            self.vm.cont().await?;
            tracing::debug!(instance = %self.vm.spec.instance, "the migrated guest runs here");
            // An adopted destination may have stopped its NBD server already.
            let _ = self.vm.qmp.execute(&NbdServerStop {}).await;
            // Its next move or suspend sets its own (a file takes none).
            self.vm.no_migration_tls().await;
            Ok(())
        }
        .await;
        match done {
            Ok(()) => Ok(self.vm),
            Err(e) => {
                self.vm.kill().await;
                Err(e)
            }
        }
    }

    /// Gives up on the migration: the destination QEMU is killed.
    pub async fn abort(self) {
        self.vm.kill().await;
    }
}

impl Vm {
    /// Moves this VM, RAM and disk, to the destination behind `target`, then stops this QEMU
    /// (in the background: it is gone moments after this returns).
    /// On failure the source keeps running and is returned inside the error.
    pub async fn migrate_out(
        self,
        target: &MigrationTarget,
    ) -> std::result::Result<MigrationReport, MigrationFailure> {
        self.migrate_out_within(target, Duration::from_secs(300))
            .await
    }

    /// [`Vm::migrate_out`], giving up (and running on here) after `limit` for each phase.
    pub async fn migrate_out_within(
        mut self,
        target: &MigrationTarget,
        limit: Duration,
    ) -> std::result::Result<MigrationReport, MigrationFailure> {
        let started = Instant::now();
        match self.migrate_steps(target, started, limit).await {
            Ok(report) => {
                // The guest is the destination's now and waits, stopped, until the caller
                // lets it run there: this QEMU ends in the background rather than in that
                // pause (a quit takes a few hundred milliseconds on a busy host).
                tokio::spawn(async move { self.quit().await });
                Ok(report)
            }
            Err(error) => {
                set_nice(self.pid(), 0, Threads::All);
                self.clean_up_failed_migration(target).await;
                Err(MigrationFailure {
                    error,
                    source: Box::new(self),
                })
            }
        }
    }

    async fn migrate_steps(
        &mut self,
        target: &MigrationTarget,
        started: Instant,
        limit: Duration,
    ) -> Result<MigrationReport> {
        let tls_creds = match (&target.tls_name, &self.spec.tls) {
            (None, _) => None,
            (Some(_), Some(_)) => Some(TLS_CLIENT.to_string()),
            (Some(name), None) => {
                return Err(VmmError::Migration {
                    instance: self.spec.instance.clone(),
                    operation: "live migration",
                    detail: format!(
                        "the destination ({name}) takes it only over TLS, and this QEMU was \
                         started without the machine's certificate: suspend and resume it \
                         to move it"
                    ),
                })
            }
        };
        for m in self.mirrors(target) {
            self.qmp
                .execute(&BlockdevAddNbd {
                    driver: "nbd",
                    node_name: m.target_node.clone(),
                    server: SocketAddress::Inet {
                        host: target.nbd.ip().to_string(),
                        port: target.nbd.port().to_string(),
                    },
                    export: m.export.clone(),
                    tls_creds: tls_creds.clone(),
                    tls_hostname: target.tls_name.clone(),
                })
                .await?;
            self.qmp
                .execute(&BlockdevMirror {
                    job_id: m.job.clone(),
                    device: m.node.clone(),
                    target: m.target_node.clone(),
                    sync: "top",
                    copy_mode: "write-blocking",
                })
                .await?;
        }
        let deadline = Instant::now() + limit;
        let jobs_wanted: Vec<String> = self.mirrors(target).into_iter().map(|m| m.job).collect();
        loop {
            let jobs = self.qmp.execute(&QueryBlockJobs {}).await?;
            let mut all_ready = true;
            for want in &jobs_wanted {
                match jobs.iter().find(|j| j.device == *want) {
                    Some(j) if j.ready => {}
                    Some(_) => all_ready = false,
                    None => {
                        return Err(VmmError::Migration {
                            instance: self.spec.instance.clone(),
                            operation: "disk mirror",
                            detail: format!("the mirror job {want} ended before it was ready"),
                        })
                    }
                }
            }
            if all_ready {
                break;
            }
            if Instant::now() >= deadline {
                return Err(self.timeout("the disk mirror becoming ready", limit));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.qmp
            .execute(&MigrateSetCapabilities {
                capabilities: vec![MigrationCapability {
                    capability: "pause-before-switchover",
                    state: true,
                }],
            })
            .await?;
        self.qmp
            .execute(&MigrateSetParameters {
                max_bandwidth: Some(UNTHROTTLED),
                downtime_limit: Some(DOWNTIME_STEPS[0].1),
                tls_creds: Some(tls_creds.unwrap_or_default()),
                tls_hostname: Some(target.tls_name.clone().unwrap_or_default()),
                ..Default::default()
            })
            .await?;
        self.qmp
            .execute(&Migrate {
                uri: format!("tcp:{}", target.migration),
            })
            .await?;
        // Sending RAM yields to the guests that serve (this one's I/O included). QEMU starts
        // its migration thread once the stream's connection is up, moments after `migrate`.
        let niced = Instant::now();
        while set_nice(self.pid(), MIGRATING_NICE, Threads::Migration) == 0
            && niced.elapsed() < Duration::from_millis(200)
            && crate::process::running_as_root()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Until the switch-over: the downtime allowed grows while a busy guest keeps the
        // migration from converging.
        let migrating = Instant::now();
        let mut step = 0;
        loop {
            if let Some(&(after, ms)) = DOWNTIME_STEPS.get(step + 1) {
                if migrating.elapsed() >= after {
                    step += 1;
                    tracing::debug!(instance = %self.spec.instance, "allowing {ms} ms of downtime");
                    self.qmp
                        .execute(&MigrateSetParameters {
                            downtime_limit: Some(ms),
                            ..Default::default()
                        })
                        .await?;
                }
            }
            let left = limit.saturating_sub(migrating.elapsed());
            let wait = Duration::from_secs(1).min(left.max(Duration::from_millis(1)));
            match self
                .wait_migration_status("live migration", wait, &["pre-switchover"])
                .await
            {
                Ok(_) => break,
                Err(VmmError::Timeout { .. }) if migrating.elapsed() < limit => {}
                Err(VmmError::Timeout { .. }) => {
                    return Err(self.timeout("the live migration converging", limit))
                }
                Err(e) => return Err(e),
            }
        }
        let stopped = Instant::now();
        tracing::debug!(instance = %self.spec.instance, "switch-over: the guest is stopped");
        // The guest is stopped now: end the mirrors (a final sync), then switch over.
        let jobs = self.qmp.execute(&QueryBlockJobs {}).await?;
        let disk_bytes = jobs
            .iter()
            .filter(|j| jobs_wanted.contains(&j.device))
            .map(|j| j.offset)
            .sum();
        for job in &jobs_wanted {
            self.qmp
                .execute(&BlockJobCancel {
                    device: job.clone(),
                })
                .await?;
        }
        for job in &jobs_wanted {
            self.wait_job_gone(job, Duration::from_secs(60)).await?;
        }
        self.qmp
            .execute(&MigrateContinue {
                state: "pre-switchover",
            })
            .await?;
        let info = self.wait_migration("live migration", limit).await?;
        tracing::debug!(
            instance = %self.spec.instance,
            "switch-over: completed {} ms after the guest stopped",
            stopped.elapsed().as_millis()
        );
        Ok(MigrationReport {
            total_ms: info.total_time.unwrap_or(0),
            downtime_ms: info.downtime.unwrap_or(0),
            ram_bytes: info.ram.map_or(0, |r| r.transferred),
            disk_bytes,
            wall: started.elapsed(),
        })
    }

    async fn wait_job_gone(&mut self, job: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self
            .qmp
            .execute(&QueryBlockJobs {})
            .await?
            .iter()
            .any(|j| j.device == job)
        {
            if Instant::now() >= deadline {
                return Err(self.timeout("the disk mirror finishing", limit));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Clears what an outgoing migration leaves in QEMU when its driver died mid-way (an agent
    /// killed during a move): the migration is cancelled, its disk mirror jobs and their NBD
    /// nodes removed, and the pause before the switch-over turned off — else the next outgoing
    /// migration (a suspend) stops at that pause or meets the old jobs. Harmless on a VM that
    /// never migrated.
    pub(crate) async fn clear_outgoing_migration(&mut self) {
        let _ = self.qmp.execute(&MigrateCancel {}).await;
        if let Ok(jobs) = self.qmp.execute(&QueryBlockJobs {}).await {
            for j in jobs.iter().filter(|j| j.device.starts_with(MIRROR_JOB)) {
                let job = j.device.clone();
                let _ = self
                    .qmp
                    .execute(&BlockJobCancel {
                        device: job.clone(),
                    })
                    .await;
                let _ = self.wait_job_gone(&job, Duration::from_secs(10)).await;
            }
        }
        // The mirrors' NBD client nodes, whether or not their jobs are still listed (a job that
        // failed when the destination went away is dismissed by QEMU; its target stays, and a
        // later save fails flushing it: "failed", no reason given).
        if let Ok(nodes) = self.qmp.execute(&QueryNamedBlockNodes { flat: true }).await {
            for n in nodes
                .iter()
                .filter(|n| n.node_name.starts_with(MIRROR_TARGET))
            {
                let _ = self
                    .qmp
                    .execute(&BlockdevDel {
                        node_name: n.node_name.clone(),
                    })
                    .await;
            }
        }
        self.no_pause_before_switchover().await;
    }

    /// Turns off the pause before the switch-over that a live migration asks for.
    /// Clears the migration's TLS parameters (best effort): a saved state goes to a file.
    pub(crate) async fn no_migration_tls(&mut self) {
        let _ = self
            .qmp
            .execute(&MigrateSetParameters {
                tls_creds: Some(String::new()),
                tls_hostname: Some(String::new()),
                tls_authz: Some(String::new()),
                ..Default::default()
            })
            .await;
    }

    pub(crate) async fn no_pause_before_switchover(&mut self) {
        let _ = self
            .qmp
            .execute(&MigrateSetCapabilities {
                capabilities: vec![MigrationCapability {
                    capability: "pause-before-switchover",
                    state: false,
                }],
            })
            .await;
    }

    async fn clean_up_failed_migration(&mut self, target: &MigrationTarget) {
        for m in self.mirrors(target) {
            let _ = self
                .qmp
                .execute(&BlockJobCancel {
                    device: m.job.clone(),
                })
                .await;
            let _ = self.wait_job_gone(&m.job, Duration::from_secs(10)).await;
            let _ = self
                .qmp
                .execute(&BlockdevDel {
                    node_name: m.target_node,
                })
                .await;
        }
        self.no_pause_before_switchover().await;
        self.no_migration_tls().await;
        // A migration that failed after the guest stopped leaves it paused.
        if let Ok(s) = self.status().await {
            if !s.running {
                let _ = self.cont().await;
            }
        }
    }
}

/// One disk a migration mirrors: its node here, the destination's export it goes to, the
/// mirror job and the node of the NBD client.
struct Mirror {
    node: String,
    export: String,
    job: String,
    target_node: String,
}

impl Vm {
    /// The disks to mirror: the system disk, then each volume (exported under its node's name).
    fn mirrors(&self, target: &MigrationTarget) -> Vec<Mirror> {
        let mut out = vec![Mirror {
            node: DISK_NODE.into(),
            export: target.export.clone(),
            job: MIRROR_JOB.into(),
            target_node: MIRROR_TARGET.into(),
        }];
        for v in &self.spec.volumes {
            let node = v.node();
            out.push(Mirror {
                export: node.clone(),
                job: format!("{MIRROR_JOB}-{node}"),
                target_node: format!("{MIRROR_TARGET}-{node}"),
                node,
            });
        }
        out
    }
}

/// The downtime QEMU may take at the switch-over (ms), from the given time into the migration:
/// short at first (a guest mostly idle converges at once), longer while a busy guest keeps the
/// migration from converging.
const DOWNTIME_STEPS: [(Duration, u64); 3] = [
    (Duration::ZERO, 50),
    (Duration::from_secs(5), 300),
    (Duration::from_secs(15), 2000),
];

/// A port that is free on `ip` right now (the kernel picks it).
fn free_port(ip: IpAddr) -> Result<u16> {
    let listener = TcpListener::bind((ip, 0)).map_err(|e| {
        VmmError::Invalid(format!(
            "cannot listen on {ip}: {e}; is this the machine's own address?"
        ))
    })?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| VmmError::Invalid(format!("no local address on {ip}: {e}")))
}
