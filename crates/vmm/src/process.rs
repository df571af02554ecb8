//! A QEMU process that never outlives its owner.
//!
//! Three layers make sure of it: the guard kills the whole process group on drop (which also
//! runs when a test panics and unwinds); QEMU runs in its own process group so that kill reaches
//! anything it could fork (its sandbox lets it fork nothing, see [`crate::confine`]); and the kernel sends SIGKILL to QEMU when
//! the thread that spawned it dies (`PR_SET_PDEATHSIG`), which covers an owner killed outright.
//! The last one is per *thread*: spawn from a thread that lives as long as the VM should (an
//! async runtime's worker or the test's own thread, not a short-lived blocking-pool thread).
//!
//! An agent wants the opposite for the VMs it runs ([`Lifetime::Machine`]): a restart or a crash
//! of the agent is not a VM restart (libvirt's rule). Such a QEMU gets none of the three layers;
//! only an explicit [`QemuProcess::kill`] ends it, and a new agent finds it again by its pid
//! ([`QemuProcess::adopt`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::cgroup::Cgroup;
use crate::error::{io_err, Result, VmmError};

/// How long a QEMU process lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lifetime {
    /// It dies with its owner (dropped, panicked or killed): tests, benchmarks, tools.
    #[default]
    Owner,
    /// It lives until it is killed explicitly, whatever happens to the process that started it:
    /// an agent's VMs, which a restarted agent adopts.
    Machine,
}

/// A running QEMU: with [`Lifetime::Owner`], killed with its process group when dropped.
#[derive(Debug)]
pub struct QemuProcess {
    /// Our child, or `None` for a process adopted from an earlier owner.
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
    lifetime: Lifetime,
    /// For an adopted process: the argument that identifies it (checked again before any
    /// signal, so that a pid reused by another process is never signalled).
    marker: Option<String>,
    /// Its control group, removed once it has exited.
    cgroup: Option<Cgroup>,
}

impl QemuProcess {
    /// Starts `program` with `args`; its stdout and stderr go to `log`.
    pub fn spawn(program: &str, args: &[String], log: &Path, lifetime: Lifetime) -> Result<Self> {
        Self::spawn_niced(program, args, log, lifetime, 0, &[], None)
    }

    /// [`QemuProcess::spawn`] at nice value `nice` from its first instruction (a QEMU that
    /// loads an incoming guest yields from its start-up on; only root may raise it back),
    /// inheriting the descriptors `inherit` under their numbers (e.g. its TAP's), in `cgroup`
    /// from before its first instruction.
    pub fn spawn_niced(
        program: &str,
        args: &[String],
        log: &Path,
        lifetime: Lifetime,
        nice: i32,
        inherit: &[i32],
        cgroup: Option<Cgroup>,
    ) -> Result<Self> {
        let log_file = std::fs::File::create(log).map_err(io_err("create", log))?;
        let log_err = log_file.try_clone().map_err(io_err("open", log))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .kill_on_drop(lifetime == Lifetime::Owner);
        // SAFETY: getpid is async-signal-safe; captured before the fork.
        let owner = unsafe { libc::getpid() };
        let nice = if running_as_root() { nice } else { 0 };
        let owned = lifetime == Lifetime::Owner;
        let inherit: Vec<i32> = inherit.to_vec();
        // Open here, written by the child (our copies close when this returns).
        let join = match &cgroup {
            Some(g) => g.join_files()?,
            None => Vec::new(),
        };
        let join_fds = crate::cgroup::raw(&join);
        if owned || nice != 0 || !inherit.is_empty() || !join_fds.is_empty() {
            // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
            // functions (write, fcntl, prctl, getppid, setpriority), allocating nothing.
            unsafe {
                cmd.pre_exec(move || {
                    crate::cgroup::join_self(&join_fds)?;
                    // Our descriptors are close-on-exec; the child's copies of these are not
                    // (this changes only the child's descriptor table).
                    for fd in &inherit {
                        if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if nice != 0 {
                        libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                    }
                    if !owned {
                        return Ok(());
                    }
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The owner may have died between fork and prctl: then nobody would kill us.
                    if libc::getppid() != owner {
                        return Err(std::io::Error::other("owner exited before QEMU started"));
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|source| {
            if let Some(g) = &cgroup {
                g.remove();
            }
            VmmError::Spawn {
                program: program.to_owned(),
                source,
            }
        })?;
        drop(join);
        let pid = child.id().unwrap_or(0);
        tracing::debug!(pid, program, "started QEMU");
        Ok(Self {
            child: Some(child),
            pid,
            log: log.to_owned(),
            lifetime,
            marker: None,
            cgroup,
        })
    }

    /// Takes over a QEMU that an earlier owner started with [`Lifetime::Machine`], if `pid` is
    /// alive and its command line carries `marker` (so a reused pid is never mistaken for it).
    pub fn adopt(pid: u32, marker: &str, log: &Path) -> Option<Self> {
        (has_arg(pid, marker) && alive(pid)).then(|| Self {
            child: None,
            pid,
            log: log.to_owned(),
            lifetime: Lifetime::Machine,
            marker: Some(marker.to_owned()),
            cgroup: None,
        })
    }

    /// The control group an adopted process runs in (removed once it has exited).
    pub fn set_cgroup(&mut self, cgroup: Option<Cgroup>) {
        self.cgroup = cgroup;
    }

    /// Its control group, if it has one.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// The process id (also the process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The file holding QEMU's own output.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<String> {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("unknown ({e})")),
            },
            None => (!alive(self.pid)).then(|| "exited (adopted: status unknown)".to_owned()),
        }
    }

    /// Waits for the process to exit until `deadline`; true if it did (its control group is
    /// gone then too).
    pub async fn wait_exit(&mut self, deadline: Instant) -> bool {
        let exited = self.wait_exit_only(deadline).await;
        if exited {
            if let Some(g) = self.cgroup.take() {
                g.remove();
            }
        }
        exited
    }

    async fn wait_exit_only(&mut self, deadline: Instant) -> bool {
        match &mut self.child {
            Some(child) => tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_ok(),
            None => loop {
                if !alive(self.pid) {
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            },
        }
    }

    /// Kills the process group and reaps QEMU.
    pub async fn kill(&mut self) {
        self.signal_group();
        let _ = self
            .wait_exit(Instant::now() + Duration::from_secs(5))
            .await;
    }

    fn signal_group(&mut self) {
        let running = match &mut self.child {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => alive(self.pid) && self.marker.as_deref().is_some_and(|m| has_arg(self.pid, m)),
        };
        if self.pid > 0 && running {
            // SAFETY: plain syscall on a process group QEMU leads. For our own child the id
            // cannot be reused while it is unreaped; an adopted one was checked by its command
            // line when adopted and is alive now.
            unsafe {
                libc::killpg(self.pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::Owner {
            self.signal_group();
        }
    }
}

/// Whether process `pid`'s command line has the argument `arg`.
fn has_arg(pid: u32, arg: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
}

/// Whether process `pid` exists and is not a zombie waiting to be reaped.
pub fn alive(pid: u32) -> bool {
    state(pid).is_some_and(|s| s != "Z" && s != "X")
}

/// Whether process `pid` is stopped by a signal (SIGSTOP: a fenced VM, see the agent's lease).
pub fn stopped(pid: u32) -> bool {
    state(pid).is_some_and(|s| s == "T")
}

/// The state letter of process `pid` (`R`, `S`, `T`, `Z`, …).
fn state(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
}

/// The last `lines` lines of a text file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The nice value of the threads that move a guest, on both ends: on the source the migration
/// thread (QEMU's "live_migration"), on the destination the whole QEMU until its guest runs
/// there (loading RAM; its vCPUs wait anyway). The move yields the CPU to the guests that serve
/// and to the switch: on a busy host it made the other guests stall for hundreds of
/// milliseconds. The source's main thread keeps its priority: it carries the moving guest's
/// own network and disk I/O, which serves requests until the switch-over.
pub const MIGRATING_NICE: i32 = 10;

/// Which threads of a QEMU [`set_nice`] changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Every thread.
    All,
    /// The migration thread only ("live_migration"; QEMU names its threads with
    /// `-name …,debug-threads=on`).
    Migration,
}

impl Threads {
    fn wants(self, comm: &str) -> bool {
        match self {
            Threads::All => true,
            Threads::Migration => comm.starts_with("live_migration"),
        }
    }
}

/// Whether this process runs as root (only root may give a thread its priority back).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sets the nice value of the `which` threads of `pid` (threads started later inherit it from
/// the thread that starts them). Best effort, and only as root: an unprivileged process could
/// not give the priority back afterwards. Returns how many threads it changed.
pub fn set_nice(pid: u32, nice: i32, which: Threads) -> usize {
    if !running_as_root() || pid == 0 {
        return 0;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut changed = 0;
    for t in tasks.flatten() {
        if which != Threads::All
            && !std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| which.wants(&c))
        {
            continue;
        }
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
            // SAFETY: setpriority on a thread id; a thread that just ended only makes it fail.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } == 0 {
                changed += 1;
            }
        }
    }
    changed
}

#[cfg(test)]
mod nice_tests {
    use super::*;

    #[test]
    fn set_nice_changes_every_thread_and_gives_it_back() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let nice_of = |pid: u32| -> i64 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            // Field 19 (nice), counted after the command's closing parenthesis.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            rest.split_whitespace().nth(16).unwrap().parse().unwrap()
        };
        set_nice(pid, MIGRATING_NICE, Threads::Migration);
        assert_eq!(nice_of(pid), 0, "sleep has no migration thread");
        set_nice(pid, MIGRATING_NICE, Threads::All);
        assert_eq!(nice_of(pid), i64::from(MIGRATING_NICE));
        set_nice(pid, 0, Threads::All);
        assert_eq!(nice_of(pid), 0);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
