//! The machine's lazy exports of image versions: one NBD server per version its instances run
//! (named by the version id, never by a tag), reference-counted by (instance, generation) and
//! stopped with its last user; and the pins that tell the repository's GC which versions this
//! machine's instances use.

use std::collections::HashSet;

use vmatrix_core::api::InstancePlan;
use vmatrix_core::InstanceId;
use vmatrix_store::nbd::{Export, NbdServer};

use crate::machine::{lock, Agent, AgentError, ExportEntry, Result};

impl Agent {
    /// The version id a plan runs: pinned in the plan, or the tag resolved now (first
    /// activation only).
    pub(crate) async fn version_of(&self, plan: &InstancePlan) -> Result<String> {
        if let Some(v) = &plan.version {
            return Ok(v.clone());
        }
        let repo = self.repo.clone();
        let image = plan.image.clone();
        let (id, _) = tokio::task::spawn_blocking(move || repo.resolve(&image))
            .await
            .map_err(|e| AgentError::Other(e.to_string()))??;
        Ok(id)
    }

    /// The NBD backing of `version` on this machine, started on first use and stopped when its
    /// last user leaves. Named by the version id, never by a tag.
    pub(crate) async fn acquire_export(
        &self,
        version: &str,
        user: (InstanceId, u64),
    ) -> Result<String> {
        if let Some(e) = lock(&self.exports).get_mut(version) {
            e.users.insert(user);
            return Ok(e.url.clone());
        }
        let repo = self.repo.clone();
        let v = version.to_owned();
        let manifest = tokio::task::spawn_blocking(move || repo.manifest(&v))
            .await
            .map_err(|e| AgentError::Other(e.to_string()))??;
        let (url, write) = {
            let mut exports = lock(&self.exports);
            // Another task may have started it meanwhile.
            if let Some(e) = exports.get_mut(version) {
                e.users.insert(user);
                return Ok(e.url.clone());
            }
            let name = short(version);
            let export = Export::new(name.clone(), manifest, self.cache.clone());
            // An abstract socket: a confined QEMU, which reconnects as its own user after an
            // agent restart, needs no path into our data; the peer's uid is checked instead.
            let socket = self.export_socket(&name);
            let mut uids = vec![0, self.own_uid()];
            uids.extend(self.hv.vm_uid());
            let server = NbdServer::start_abstract(export, &socket, uids)?;
            // Reads wait (up to a minute) for the export to come back instead of failing, so
            // a restarting agent does not hurt its guests.
            let url = format!(
                "json:{}",
                // The protocol node only: the format (raw) is the overlay's backing format.
                serde_json::json!({ "file": {
                    "driver": "nbd",
                    "server": {"type": "unix", "path": socket, "abstract": true},
                    "export": name,
                    "reconnect-delay": 60,
                }})
            );
            exports.insert(
                version.to_owned(),
                ExportEntry {
                    _server: server,
                    url: url.clone(),
                    users: HashSet::from([user]),
                },
            );
            // The set and its sequence number are taken under the lock (newest set written
            // last).
            (url, self.pins_writer(exports.keys().cloned().collect()))
        };
        // The pin is durable before the first VM reads the version.
        if let Err(e) = tokio::task::spawn_blocking(write).await {
            tracing::warn!("recording the versions in use: {e}");
        }
        Ok(url)
    }

    /// The abstract socket of export `name`: the same for every agent process on this data
    /// directory (a restarted agent serves its VMs on the name they know), another for any
    /// other data directory (other machines of a test on one host).
    fn export_socket(&self, name: &str) -> String {
        let place = blake3::hash(self.config.data.as_os_str().as_encoded_bytes()).to_hex();
        format!("vmatrix/{}/{name}", &place[..16])
    }

    fn own_uid(&self) -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    /// Ends `user`'s use of every export (its system disk's version and its volumes'); an
    /// export no one uses any more stops.
    pub(crate) fn release_exports(&self, user: &(InstanceId, u64)) {
        let mut exports = lock(&self.exports);
        let before = exports.len();
        for e in exports.values_mut() {
            e.users.remove(user);
        }
        exports.retain(|_, e| !e.users.is_empty());
        if exports.len() != before {
            let write = self.pins_writer(exports.keys().cloned().collect());
            drop(exports);
            Self::in_background(write);
        }
    }

    /// Records in the repository which versions this machine's instances use (GC keeps them
    /// whatever happens to their tags). Written in the background, newest set last.
    fn in_background(write: impl FnOnce() + Send + 'static) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    /// The write of one set of pins, skipped if a newer set was written first.
    pub(crate) fn pins_writer(&self, mut versions: Vec<String>) -> impl FnOnce() + Send + 'static {
        versions.sort();
        let seq = self
            .pin_seq
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let (repo, written) = (self.repo.clone(), self.pin_written.clone());
        let holder = format!("agent-{}", self.config.name);
        move || {
            let mut last = lock(&written);
            if *last > seq {
                return; // a newer set is written already
            }
            match repo.set_pins(&holder, &versions) {
                Ok(()) => *last = seq,
                Err(e) => tracing::warn!("recording the versions in use ({holder}): {e}"),
            }
        }
    }

    /// Versions exported now (for tests and the status route).
    pub fn exported_versions(&self) -> Vec<String> {
        lock(&self.exports).keys().cloned().collect()
    }
}

/// The first 24 hex digits of a version id: short enough for a unix socket path, long enough
/// never to collide.
fn short(version: &str) -> String {
    version.chars().take(24).collect()
}
