//! A point-in-time copy of a running VM's disk overlay, for committing its changes as a new
//! version. The vCPUs stop for the copy only: QEMU's `stop` drains and flushes the disk, so the
//! qcow2 file is consistent while it is copied; the guest runs again at once. What the guest
//! still holds in its own page cache is not on the disk: run `sync` in it first (or freeze its
//! filesystems with a guest agent).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{io_err, Result};
use crate::vm::Vm;

impl Vm {
    /// Copies the disk overlay to `to` (a qcow2 over the same base) as it is at one instant;
    /// returns how long the vCPUs were stopped. The guest runs afterwards if it ran before,
    /// whether or not the copy worked.
    pub async fn copy_overlay(&mut self, to: &Path) -> Result<Duration> {
        let running = self.status().await?.running;
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
        copied?;
        resumed?;
        Ok(took)
    }
}
