//! A point-in-time copy of a running VM's disk overlay, for committing its changes as a new
//! version. The vCPUs stop for the copy only: QEMU's `stop` drains and flushes the disk, so the
//! qcow2 file is consistent while it is copied; the guest runs again at once. Where the guest
//! runs qemu-guest-agent, its file systems are frozen first (everything in its page cache
//! written, nothing more until the thaw), so the copy is what a clean unmount would leave;
//! without an agent, what the guest still holds in its page cache is not on the disk (run
//! `sync` in it first).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{io_err, Result};
use crate::vm::Vm;

/// How a copy of the overlay went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OverlayCopy {
    /// How long the vCPUs were stopped.
    pub paused: Duration,
    /// How many file systems the guest agent froze for the copy (`None`: no agent).
    pub frozen: Option<u64>,
}

impl Vm {
    /// Copies the disk overlay to `to` (a qcow2 over the same base) as it is at one instant.
    /// The guest runs afterwards if it ran before, whether or not the copy worked.
    pub async fn copy_overlay(&mut self, to: &Path) -> Result<OverlayCopy> {
        let running = self.status().await?.running;
        let frozen = if running {
            match self.freeze().await {
                Ok(n) => n,
                Err(e) => {
                    // Half-frozen is worse than not frozen: thaw whatever was, copy as is.
                    tracing::warn!(instance = %self.spec.instance, "{e}; copying unfrozen");
                    let _ = self.thaw().await;
                    None
                }
            }
        } else {
            None
        };
        if let Some(n) = frozen {
            tracing::info!(instance = %self.spec.instance, "froze {n} file system(s) for the copy");
        }
        let stopped = Instant::now();
        if running {
            self.pause().await?;
        }
        let copied = tokio::fs::copy(self.dir.disk(), to)
            .await
            .map_err(io_err("copy the overlay of", &self.dir.disk()));
        // A `cont` that fails is tried again: a guest left stopped would fail its health check.
        let mut resumed = Ok(());
        if running {
            for _ in 0..3 {
                resumed = self.cont().await;
                if resumed.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let took = stopped.elapsed();
        if frozen.is_some() {
            // A guest left frozen blocks every write: try hard.
            let mut thawed = self.thaw().await;
            for _ in 0..5 {
                if thawed.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                thawed = self.thaw().await;
            }
            if let Err(e) = thawed {
                tracing::error!(instance = %self.spec.instance, "{e}: its file systems may still be frozen");
            }
        }
        copied?;
        resumed?;
        Ok(OverlayCopy {
            paused: took,
            frozen,
        })
    }
}
