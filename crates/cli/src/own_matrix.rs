//! A `vmatrix up` of one's own, as a child process in a data directory of its own: what `vmatrix
//! demo` and `vmatrix bench moves` drive through the public API, as a user would. Stopped (its
//! children with it) when dropped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmatrix_client::ControllerClient;

/// The `vmatrix up` child: stopped (SIGTERM, then waited for) when dropped.
pub struct Up {
    child: Option<std::process::Child>,
    data: PathBuf,
    log: PathBuf,
}

impl Up {
    /// Starts `vmatrix --data DATA up ARGS…`, its output in `log`.
    pub fn start(data: &Path, args: &[String], log: &Path) -> Result<Up> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let exe = std::env::current_exe().context("finding the vmatrix binary")?;
        let child = std::process::Command::new(exe)
            .arg("--data")
            .arg(data)
            .arg("up")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting vmatrix up")?;
        Ok(Up {
            child: Some(child),
            data: data.to_owned(),
            log: log.to_owned(),
        })
    }

    /// Waits until its controller answers (with every machine it reports), or says why not.
    pub async fn wait_for_api(&mut self) -> Result<ControllerClient> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!(
                    "`vmatrix up` ended ({status}) before its controller answered; the end of \
                     its log ({}):\n{}",
                    self.log.display(),
                    self.log_tail(15)
                );
            }
            if let Ok(c) = crate::client::connect(None, None, &self.data) {
                if c.healthy().await && c.machines().await.is_ok() {
                    return Ok(c);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the controller did not answer within 3 minutes; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Up {
    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `up` stops every process it started on SIGTERM.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
