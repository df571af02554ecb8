//! Fencing: a machine's VMs run only while its lease from the controller holds.
//!
//! Every time the controller hears from this machine — a heartbeat it answered, or a request of
//! its own that the agent took in — the lease is renewed until [`LEASE`] after that moment
//! (taken when the heartbeat was *sent*, so the agent never believes in more than the
//! controller granted). The controller replaces a silent machine's instances only once the
//! lease has lapsed by a margin (`vmatrix_core::api::LEASE_MS`), so two copies of one instance
//! never run: by then this machine has stopped its own.
//!
//! The stopping is done by a watchdog, a process of its own (`vmatrix fence`), because the agent
//! itself may be what is stuck (frozen with SIGSTOP, or wedged): the agent writes each renewal
//! into a FIFO in its data directory, and when none arrives before the lease lapses the
//! watchdog stops every QEMU of the machine with SIGSTOP — the guest is frozen whole, it neither
//! serves nor writes, and nothing of it is lost. The watchdog outlives an agent that dies (the
//! next one finds it by its pid file and talks to the same FIFO) and ends when the agent stops
//! its VMs and says so, or when it has nothing left to guard. After a lapse, the agent lets the
//! VMs the controller still places here run on (SIGCONT) once it hears from it again; the
//! others the controller discards.
//!
//! Times are `CLOCK_BOOTTIME` milliseconds: one clock for both processes, which keeps counting
//! through a suspended host.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a renewal holds.
pub const LEASE: Duration = Duration::from_millis(vmatrix_core::api::LEASE_MS);

/// Milliseconds of `CLOCK_BOOTTIME`.
pub fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// The files of a machine's watchdog in its data directory.
#[derive(Debug, Clone)]
pub struct FenceFiles {
    dir: PathBuf,
}

impl FenceFiles {
    /// The watchdog of the machine whose data directory is `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }
    /// The FIFO the agent writes renewals into.
    pub fn fifo(&self) -> PathBuf {
        self.dir.join("lease.fifo")
    }
    /// The watchdog's process id.
    pub fn pid(&self) -> PathBuf {
        self.dir.join("fence.pid")
    }
    /// The directory whose QEMUs it guards.
    pub fn vms(&self) -> PathBuf {
        self.dir.join("vms")
    }
}

/// Starts the watchdog process of a machine (it must run [`watchdog`]).
pub type StartWatchdog = Box<dyn Fn(&FenceFiles) -> std::io::Result<()> + Send + Sync>;

/// The agent's end: renewals to the watchdog.
pub struct LeaseHolder {
    files: FenceFiles,
    start: StartWatchdog,
    fifo: Mutex<Option<std::fs::File>>,
}

impl std::fmt::Debug for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseHolder")
            .field("files", &self.files)
            .finish()
    }
}

impl LeaseHolder {
    /// Finds the machine's watchdog, or starts one with `start`, and opens its FIFO.
    pub fn attach(files: FenceFiles, start: StartWatchdog) -> std::io::Result<Self> {
        let fifo = open_fifo(&files, &start)?;
        Ok(Self {
            files,
            start,
            fifo: Mutex::new(Some(fifo)),
        })
    }

    /// The controller heard from this machine at `at` (boot-time ms): VMs may run until
    /// [`LEASE`] after it.
    pub fn renew(&self, at: u64) {
        self.send(&format!("renew {at}\n"));
    }

    /// This machine's VMs are stopped for good: the watchdog can end.
    pub fn release(&self) {
        self.send("release\n");
    }

    fn send(&self, line: &str) {
        let mut fifo = self.fifo.lock().unwrap_or_else(|e| e.into_inner());
        if fifo.is_none() {
            // A watchdog that ended (it had nothing to guard): a new one.
            match open_fifo(&self.files, &self.start) {
                Ok(f) => *fifo = Some(f),
                Err(e) => {
                    tracing::warn!("fencing watchdog: {e}");
                    return;
                }
            }
        }
        let Some(f) = fifo.as_mut() else { return };
        // A full FIFO (a watchdog that stopped reading) drops the line, and the lease lapses:
        // the safe side. A FIFO without a reader is a watchdog gone: the next line starts one.
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!("renewing the lease: {e}");
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                *fifo = None;
            }
        }
    }
}

fn open_fifo(files: &FenceFiles, start: &StartWatchdog) -> std::io::Result<std::fs::File> {
    {
        if !watchdog_alive(files) {
            make_fifo(&files.fifo())?;
            start(files)?;
        }
        // The watchdog opens the FIFO for reading and writing, so once it runs an open for
        // writing never blocks; until then it fails (ENXIO) and is retried.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(files.fifo())
            {
                Ok(f) => return Ok(f),
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(std::io::Error::other(format!(
                        "the fencing watchdog did not open {} within 10 s: {e}",
                        files.fifo().display()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

fn make_fifo(path: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)
}

/// Whether the watchdog named in the pid file runs.
fn watchdog_alive(files: &FenceFiles) -> bool {
    let Some(pid) = std::fs::read_to_string(files.pid())
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return false;
    };
    // Its command line names the machine's directory (a reused pid would not).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline
        .split(|b| *b == 0)
        .any(|a| a == files.dir.as_os_str().as_encoded_bytes())
        && files.fifo().exists()
}

/// Lets the VMs the controller still places here run again after a lapse; returns how many.
pub fn unfence(pids: &[u32]) -> usize {
    pids.iter()
        .filter(|pid| vmatrix_vmm::process::stopped(**pid))
        .filter(|pid| kill(Pid::from_raw(**pid as i32), Signal::SIGCONT).is_ok())
        .count()
}

/// The watchdog (`vmatrix fence`): renewals come in through the FIFO; when the lease lapses
/// every QEMU under the machine's `vms/` is stopped with SIGSTOP, and so is any that appears
/// while it stays lapsed. Ends on `release`, or when no QEMU is left to guard and no agent has
/// renewed for a lease.
pub fn watchdog(files: &FenceFiles, lease: Duration) -> std::io::Result<()> {
    std::fs::write(files.pid(), format!("{}\n", std::process::id()))?;
    // Read and write: the FIFO never reports end-of-file when an agent dies, and an agent can
    // always open it for writing.
    let fifo = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(files.fifo())?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(fifo).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let lease_ms = lease.as_millis() as u64;
    // Started by an agent that has not been renewed yet: the lease runs from now (the
    // controller cannot have heard from it later than this).
    let mut renewed = boottime_ms();
    let mut fenced: Vec<u32> = Vec::new();
    let mut lapsed = false;
    let vms = files.vms();
    let result = loop {
        // Asleep until the lease would lapse (a renewal wakes it earlier); once lapsed, a look
        // every second for a QEMU that appeared since.
        let left = (renewed + lease_ms).saturating_sub(boottime_ms());
        let wait = if lapsed || left == 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(left)
        };
        match rx.recv_timeout(wait) {
            Ok(line) => {
                let mut words = line.split_whitespace();
                match (
                    words.next(),
                    words.next().and_then(|t| t.parse::<u64>().ok()),
                ) {
                    (Some("renew"), Some(at)) => {
                        renewed = renewed.max(at);
                        if lapsed && boottime_ms() < renewed + lease_ms {
                            tracing::info!("lease renewed: the agent decides which VMs go on");
                            lapsed = false;
                            fenced.clear();
                        }
                    }
                    (Some("release"), _) => break Ok(()),
                    _ => tracing::warn!("fence: unknown line {line:?}"),
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(std::io::Error::other("the lease FIFO closed"))
            }
        }
        let now = boottime_ms();
        if now >= renewed + lease_ms {
            let qemus: Vec<u32> = crate::record::qemus_under(&vms)
                .into_iter()
                .map(|(pid, _)| pid)
                .collect();
            if qemus.is_empty() {
                // Nothing to guard, and no agent that renews: done.
                break Ok(());
            }
            for pid in qemus {
                if !fenced.contains(&pid) {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
                    fenced.push(pid);
                    tracing::warn!(
                        pid,
                        "lease lapsed {} ms ago: QEMU stopped (fenced)",
                        now - renewed - lease_ms
                    );
                }
            }
            lapsed = true;
        }
    };
    let _ = std::fs::remove_file(files.pid());
    let _ = std::fs::remove_file(files.fifo());
    result
}

impl crate::machine::Agent {
    /// Fences this machine's VMs with `holder`'s watchdog from now on.
    pub fn hold_lease(&self, holder: LeaseHolder) {
        *crate::machine::lock(&self.lease) = Some(std::sync::Arc::new(holder));
    }

    /// The controller heard from this machine at `at` (boot-time ms).
    pub(crate) fn renew_lease(&self, at: u64) {
        let holder = crate::machine::lock(&self.lease).clone();
        if let Some(h) = holder {
            h.renew(at);
        }
    }

    /// The VMs are stopped for good (the agent stops with them): the watchdog ends.
    pub fn release_lease(&self) {
        let holder = crate::machine::lock(&self.lease).take();
        if let Some(h) = holder {
            h.release();
        }
    }

    /// After a lapse: the VMs of `placed` that the watchdog stopped run on.
    pub(crate) fn unfence_placed(&self, placed: &[vmatrix_core::InstanceId]) {
        let pids: Vec<(vmatrix_core::InstanceId, u32)> = {
            let slots = crate::machine::lock(&self.slots);
            placed
                .iter()
                .filter_map(|id| Some((id.clone(), slots.get(id)?.pid)))
                .filter(|(_, pid)| *pid > 0)
                .collect()
        };
        for (id, pid) in pids {
            if unfence(&[pid]) > 0 {
                tracing::warn!(instance = %id, "lease back: the controller still places it here, it runs on");
            }
        }
    }
}
