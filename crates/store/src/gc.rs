//! Garbage collection: [`Repository::gc`] (and [`Repository::gc_at`], the same at a given
//! time) removes untagged versions and unreferenced chunks older than a cutoff set by the grace
//! window and the oldest running writer's lease — GC's half of the protocol in [`crate::repo`]
//! — and reports what it kept and freed in a [`GcReport`].

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::backend::{Backend, ObjectMeta};
use crate::chunk::{self, ChunkId};
use crate::error::{Result, StoreError};
use crate::index::{self, Index};
use crate::manifest::Manifest;
use crate::pack::{self, PackId};
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
    /// Unreferenced chunks kept: in packs younger than the cutoff, or in packs full enough of
    /// live chunks to be left as they are.
    pub young_chunks: usize,
    /// Chunks removed.
    pub removed_chunks: usize,
    /// Pack files in the repository when gc looked.
    pub packs: usize,
    /// Packs rewritten because too little of them was live.
    pub repacked_packs: usize,
    /// Packs removed (rewritten ones included).
    pub removed_packs: usize,
    /// Live bytes copied into new packs.
    pub rewritten_bytes: u64,
    /// Stored bytes freed (removed packs less what was rewritten).
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
            aside_put_back: self.put_back_aside()?,
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
                let id = Manifest::id_of_key(&key)?.to_owned();
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
        self.collect_packs(&live, cutoff, &mut report)?;
        report.temporaries_removed = self.backend.sweep_temporaries(cutoff)?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// A pack stays as it is while at least this share of its bytes is live; below it, gc rewrites
/// its live chunks into new packs (so no kept pack wastes more than 30%).
pub const REPACK_BELOW: f64 = 0.7;

/// What gc does with a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Younger than the cutoff: a running writer may rely on it.
    Young,
    /// Live enough to keep.
    Keep,
    /// Live chunks rewritten, then removed.
    Repack,
    /// Nothing live (or named by no index: a writer died before writing one): removed.
    Drop,
}

impl Repository {
    /// GC's pack phase: every pack is kept, rewritten or removed by how much of it `live`
    /// still needs, then the index files are folded into one. Order matters for readers and
    /// writers running meanwhile: the rewritten chunks' new packs are durable and indexed
    /// before any pack goes, and a pack a writer touched since `cutoff` stays (with its index
    /// entries).
    fn collect_packs(
        &self,
        live: &HashSet<ChunkId>,
        cutoff: SystemTime,
        report: &mut GcReport,
    ) -> Result<()> {
        // The index before the listing: a writer writes its packs before its index file, so a
        // pack the index names is listed unless it is gone.
        let index = Index::load(&self.backend)?;
        let by_pack = index.by_pack();
        let markers: HashMap<PackId, SystemTime> = match &self.backend {
            Backend::S3(_) => self
                .backend
                .list("touched/")?
                .into_iter()
                .filter_map(|(k, m)| {
                    Some((PackId::from_hex(k.strip_prefix("touched/")?)?, m.modified))
                })
                .collect(),
            Backend::File(_) => HashMap::new(),
        };
        let listed: Vec<(PackId, ObjectMeta)> = self
            .backend
            .list("packs/")?
            .into_iter()
            .filter_map(|(k, m)| Some((PackId::from_key(&k)?, m)))
            .collect();
        report.packs = listed.len();
        let no_entries = Vec::new();
        let mut fates: HashMap<PackId, Fate> = HashMap::new();
        for (pack, meta) in &listed {
            let entries = by_pack.get(pack).unwrap_or(&no_entries);
            let touched = markers.get(pack).copied().unwrap_or(meta.modified);
            let live_bytes: u64 = entries
                .iter()
                .filter(|e| live.contains(&e.chunk))
                .map(|e| u64::from(e.len))
                .sum();
            let all_bytes: u64 = entries.iter().map(|e| u64::from(e.len)).sum();
            let fate = if meta.modified.max(touched) >= cutoff {
                Fate::Young
            } else if live_bytes == 0 {
                Fate::Drop
            } else if (live_bytes as f64) < REPACK_BELOW * all_bytes as f64 {
                Fate::Repack
            } else {
                Fate::Keep
            };
            fates.insert(*pack, fate);
        }
        // Chunks that stay where they are need no copy.
        let mut placed: HashSet<ChunkId> = HashSet::new();
        for (pack, fate) in &fates {
            if matches!(fate, Fate::Young | Fate::Keep) {
                placed.extend(by_pack.get(pack).into_iter().flatten().map(|e| e.chunk));
            }
        }
        for chunk in live {
            if placed.contains(chunk) {
                report.live_chunks += 1;
            }
        }
        let writer = self.pack_writer();
        for (pack, _) in &listed {
            if fates.get(pack) != Some(&Fate::Repack) {
                continue;
            }
            report.repacked_packs += 1;
            let bytes = self
                .backend
                .get(&pack.key())?
                .ok_or_else(|| StoreError::Corrupt {
                    what: format!("pack {pack}"),
                    reason: "it vanished while gc rewrote it (is another gc running?)".into(),
                })?;
            for e in by_pack.get(pack).into_iter().flatten() {
                if !live.contains(&e.chunk) || !placed.insert(e.chunk) {
                    continue;
                }
                let blob = bytes
                    .get(e.offset as usize..e.offset as usize + e.len as usize)
                    .ok_or_else(|| StoreError::Corrupt {
                        what: format!("pack {pack}"),
                        reason: "shorter than its index says".into(),
                    })?;
                // Never spread damage: a live chunk that does not check out stops gc here,
                // with its old pack untouched.
                chunk::decode(&e.chunk, blob)?;
                writer.add(e.chunk, blob)?;
                report.live_chunks += 1;
                report.rewritten_bytes += blob.len() as u64;
            }
        }
        let written = writer.finish()?;
        // One index for everything still there, rewritten packs included until they go.
        let mut entries: Vec<(PackId, Vec<pack::Entry>)> = listed
            .iter()
            .filter_map(|(p, _)| Some((*p, by_pack.get(p)?.clone())))
            .collect();
        entries.extend(written.iter().map(|w| (w.id, w.entries.clone())));
        let folded = index::write(&self.backend, entries.iter().map(|(p, e)| (*p, &e[..])))?;
        for key in &index.files {
            self.backend.delete(key)?;
        }
        let mut removed: HashSet<PackId> = HashSet::new();
        let mut deleted_bytes = 0;
        for (pack, _) in &listed {
            let fate = fates.get(pack).copied().unwrap_or(Fate::Young);
            let dead = by_pack
                .get(pack)
                .into_iter()
                .flatten()
                .filter(|e| !live.contains(&e.chunk))
                .count();
            if matches!(fate, Fate::Young | Fate::Keep) {
                report.young_chunks += dead;
                continue;
            }
            match self.delete_pack_if_older(pack, cutoff)? {
                Some(size) => {
                    removed.insert(*pack);
                    report.removed_packs += 1;
                    report.removed_chunks += dead;
                    deleted_bytes += size;
                }
                // A writer touched it since gc looked: it stays, indexed.
                None => report.young_chunks += dead,
            }
        }
        report.freed_bytes = deleted_bytes.saturating_sub(report.rewritten_bytes);
        if !removed.is_empty() {
            entries.retain(|(p, _)| !removed.contains(p));
            index::write(&self.backend, entries.iter().map(|(p, e)| (*p, &e[..])))?;
            if let Some(key) = folded {
                self.backend.delete(&key)?;
            }
        }
        // Touch markers of packs that are gone.
        for (pack, when) in &markers {
            if *when < cutoff && !fates.contains_key(pack) {
                self.backend.delete(&crate::repo::touch_key(pack))?;
            }
        }
        Ok(())
    }
}
