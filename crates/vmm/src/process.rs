//! A QEMU process that never outlives its owner.
//!
//! Three layers make sure of it: the guard kills the whole process group on drop (which also
//! runs when a test panics and unwinds); QEMU runs in its own process group so that kill reaches
//! anything it forks (the `exec:` migration helper); and the kernel sends SIGKILL to QEMU when
//! the thread that spawned it dies (`PR_SET_PDEATHSIG`), which covers an owner killed outright.
//! The last one is per *thread*: spawn from a thread that lives as long as the VM should (an
//! async runtime's worker or the test's own thread, not a short-lived blocking-pool thread).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::error::{io_err, Result, VmmError};

/// A running QEMU, killed with its process group when dropped.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl QemuProcess {
    /// Starts `program` with `args`; its stdout and stderr go to `log`.
    pub fn spawn(program: &str, args: &[String], log: &Path) -> Result<Self> {
        let log_file = std::fs::File::create(log).map_err(io_err("create", log))?;
        let log_err = log_file.try_clone().map_err(io_err("open", log))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: getpid is async-signal-safe; captured before the fork.
        let owner = unsafe { libc::getpid() };
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, getppid), allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
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
        let child = cmd.spawn().map_err(|source| VmmError::Spawn {
            program: program.to_owned(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        tracing::debug!(pid, program, "started QEMU");
        Ok(Self {
            child,
            pid,
            log: log.to_owned(),
        })
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
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    /// Waits for the process to exit until `deadline`; true if it did.
    pub async fn wait_exit(&mut self, deadline: Instant) -> bool {
        tokio::time::timeout_at(deadline, self.child.wait())
            .await
            .is_ok()
    }

    /// Kills the process group and reaps QEMU.
    pub async fn kill(&mut self) {
        self.signal_group();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }

    fn signal_group(&mut self) {
        if self.pid > 0 && self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: plain syscall on a process group we created; a stale id is harmless
            // because the group leader is our unreaped child, so the id cannot be reused.
            unsafe {
                libc::killpg(self.pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.signal_group();
    }
}

/// The last `lines` lines of a text file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
