//! Garbage collection: [`Repository::gc`] (and [`Repository::gc_at`], the same at a given
//! time) removes untagged versions and unreferenced chunks older than a cutoff set by the grace
//! window and the oldest running writer's lease — GC's half of the protocol in [`crate::repo`]
//! — and reports what it kept and freed in a [`GcReport`].

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::chunk::ChunkId;
use crate::error::Result;
use crate::repo::{Lease, Repository, LEASE_MAX_AGE};

/// What GC did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Live versions (tagged, pinned or young).
    pub live_manifests: usize,
    /// Versions kept only because a holder pins them (an instance runs on them).
    pub pinned_manifests: usize,
    /// Untagged versions removed.
    pub removed_manifests: usize,
    /// Chunks kept because something references them.
    pub live_chunks: usize,
    /// Unreferenced chunks kept because they are younger than the cutoff.
    pub young_chunks: usize,
    /// Chunks removed.
    pub removed_chunks: usize,
    /// Stored bytes freed.
    pub freed_bytes: u64,
    /// Writers running when GC started.
    pub active_leases: usize,
    /// Leases of writers that died more than a day ago, removed.
    pub stale_leases_removed: usize,
    /// Temporary files of killed writers, removed.
    pub temporaries_removed: u64,
    /// Chunks a killed GC had moved aside, put back (then removed with the rest if unused).
    pub aside_put_back: u64,
    /// Seconds.
    pub seconds: f64,
}

impl Repository {
    /// Removes untagged versions and unreferenced chunks older than the cutoff (see the
    /// [`crate::repo`] module docs for the protocol that makes this safe while imports run).
    pub fn gc(&self, grace: Duration) -> Result<GcReport> {
        self.gc_at(SystemTime::now(), grace)
    }

    /// [`Repository::gc`] as if the time were `now` (time is an input, so tests and tools can
    /// look at the repository from the future instead of waiting).
    pub fn gc_at(&self, now: SystemTime, grace: Duration) -> Result<GcReport> {
        let started = Instant::now();
        // First, what a GC killed mid-delete left aside: a chunk again, judged like the rest.
        let mut report = GcReport {
            aside_put_back: self.backend.put_back_aside()?,
            ..GcReport::default()
        };
        let mut oldest = now;
        for (key, meta) in self.backend.list("leases/")? {
            let started_at = self
                .backend
                .get(&key)?
                .and_then(|b| serde_json::from_slice::<Lease>(&b).ok())
                .map(|l| UNIX_EPOCH + Duration::from_secs(l.started))
                .unwrap_or(meta.modified);
            if now.duration_since(started_at).unwrap_or_default() > LEASE_MAX_AGE {
                // A writer that died long ago (kill -9, power loss).
                self.backend.delete(&key)?;
                report.stale_leases_removed += 1;
                continue;
            }
            report.active_leases += 1;
            oldest = oldest.min(started_at).min(meta.modified);
        }
        // Whole seconds: object stores keep modification times to the second, and a touch must
        // never look older than the cutoff of a writer that started in the same second.
        let oldest_secs = oldest.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let cutoff = (UNIX_EPOCH + Duration::from_secs(oldest_secs))
            .checked_sub(grace)
            .unwrap_or(UNIX_EPOCH);

        let tagged = self.tagged_versions()?;
        // Versions in use by running instances (their agents' pins) are roots too.
        let pinned: HashSet<String> = self.pins()?.into_iter().flat_map(|p| p.versions).collect();
        // Live versions: tagged, pinned (in use by instances), young — and the bases that live
        // saved overlays read (a suspended instance's image), followed to the end.
        let listed: Vec<(String, String, bool)> = self
            .backend
            .list("manifests/")?
            .into_iter()
            .filter_map(|(key, meta)| {
                let id = key
                    .strip_prefix("manifests/")?
                    .strip_suffix(".json")?
                    .to_owned();
                let rooted =
                    tagged.contains_key(&id) || pinned.contains(&id) || meta.modified >= cutoff;
                Some((key, id, rooted))
            })
            .collect();
        let listed_ids: HashSet<String> = listed.iter().map(|(_, id, _)| id.clone()).collect();
        let mut live_ids: HashSet<String> = HashSet::new();
        let mut todo: Vec<String> = listed
            .iter()
            .filter(|(_, _, rooted)| *rooted)
            .map(|(_, id, _)| id.clone())
            .collect();
        let mut live: HashSet<ChunkId> = HashSet::new();
        while let Some(id) = todo.pop() {
            if !live_ids.insert(id.clone()) {
                continue;
            }
            // A damaged live manifest must stop GC: its chunks cannot be marked. A base that is
            // gone already is nothing to keep.
            let m = match self.manifest(&id) {
                Ok(m) => m,
                Err(crate::StoreError::NotFound { .. }) if !listed_ids.contains(&id) => continue,
                Err(e) => return Err(e),
            };
            live.extend(m.chunks.iter().flatten());
            if let Some(base) = m.base {
                todo.push(base);
            }
        }
        let mut doomed_manifests = Vec::new();
        for (key, id, _) in listed {
            if live_ids.contains(&id) {
                report.live_manifests += 1;
                report.pinned_manifests +=
                    usize::from(pinned.contains(&id) && !tagged.contains_key(&id));
            } else {
                doomed_manifests.push(key);
            }
        }
        for key in doomed_manifests {
            self.backend.delete(&key)?;
            report.removed_manifests += 1;
        }
        for (key, meta) in self.backend.list("chunks/")? {
            let Some(id) = key.rsplit('/').next().and_then(ChunkId::from_hex) else {
                continue;
            };
            if live.contains(&id) {
                report.live_chunks += 1;
            } else if meta.modified >= cutoff {
                report.young_chunks += 1;
            } else if let Some(size) = self.backend.delete_if_older(&key, cutoff)? {
                report.removed_chunks += 1;
                report.freed_bytes += size;
            } else {
                report.young_chunks += 1;
            }
        }
        report.temporaries_removed = self.backend.sweep_temporaries(cutoff)?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}
