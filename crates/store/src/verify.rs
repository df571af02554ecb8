//! Verify: [`Repository::verify`] re-reads and re-hashes every chunk of one version, or of
//! every version in the repository (tagged and untagged), on all cores, and names the images
//! that need each missing or corrupt chunk in its [`VerifyReport`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use vmatrix_core::ImageRef;

use crate::chunk::{self, ChunkId};
use crate::error::Result;
use crate::index::Loc;
use crate::manifest::Manifest;
use crate::repo::{Progress, Repository};

/// What verify found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Manifests checked.
    pub manifests: usize,
    /// Distinct chunks checked.
    pub chunks: usize,
    /// Missing chunks, each with the images that need it.
    pub missing: Vec<(String, Vec<String>)>,
    /// Corrupt chunks with the reason and the images that need them.
    pub corrupt: Vec<(String, String, Vec<String>)>,
    /// Damaged manifests or tags.
    pub bad_manifests: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is missing or damaged.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty() && self.bad_manifests.is_empty()
    }
}

impl Repository {
    /// Re-reads and re-hashes every chunk of `image` (or of every version in the repository).
    pub fn verify(&self, image: Option<&ImageRef>, progress: Progress<'_>) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
        match image {
            Some(img) => {
                let (id, _) = self.resolve(img)?;
                versions.insert(id, vec![img.to_string()]);
            }
            None => {
                for (id, names) in self.tagged_versions()? {
                    versions.insert(id, names);
                }
                for (key, _) in self.backend.list("manifests/")? {
                    if let Some(id) = Manifest::id_of_key(&key) {
                        versions.entry(id.to_owned()).or_insert_with(|| {
                            vec![format!("untagged version {}", &id[..12.min(id.len())])]
                        });
                    }
                }
            }
        }
        let mut users: HashMap<ChunkId, Vec<String>> = HashMap::new();
        for (id, names) in &versions {
            match self.manifest(id) {
                Ok(m) => {
                    report.manifests += 1;
                    for c in m.chunks.iter().flatten() {
                        let u = users.entry(*c).or_default();
                        if u.len() < 3 && !u.contains(&names[0]) {
                            u.push(names[0].clone());
                        }
                    }
                }
                Err(e) => report
                    .bad_manifests
                    .push(format!("{} ({e})", names.join(", "))),
            }
        }
        report.chunks = users.len();
        // Pack by pack: one read each, chunks checked against their ids.
        let index = self.reload_index()?;
        let mut bad_found: Vec<(ChunkId, Option<String>)> = Vec::new();
        let mut by_pack: HashMap<u32, Vec<(ChunkId, Loc)>> = HashMap::new();
        for id in users.keys() {
            match index.first(id) {
                Some(loc) => by_pack.entry(loc.pack).or_default().push((*id, loc)),
                None => bad_found.push((*id, None)),
            }
        }
        let groups: Vec<(u32, Vec<(ChunkId, Loc)>)> = by_pack.into_iter().collect();
        let next = AtomicU64::new(0);
        let checked = AtomicU64::new(0);
        let bad = Mutex::new(bad_found);
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some((slot, chunks)) = groups.get(i) else {
                        return;
                    };
                    let pack = index.pack(*slot);
                    let read = self.backend.get(&pack.key());
                    for (id, loc) in chunks {
                        let problem = match &read {
                            Ok(Some(bytes)) => {
                                let at = loc.offset as usize;
                                match bytes.get(at..at + loc.len as usize) {
                                    Some(blob) => {
                                        chunk::decode(id, blob).err().map(|e| Some(e.to_string()))
                                    }
                                    None => Some(Some(format!("pack {pack} is cut short"))),
                                }
                            }
                            Ok(None) => Some(None),
                            Err(e) => Some(Some(e.to_string())),
                        };
                        // Another copy elsewhere may be whole.
                        let problem = problem.filter(|_| {
                            index.locations(id).len() < 2 || self.read_stored(id).is_err()
                        });
                        if let Some(p) = problem {
                            if let Ok(mut b) = bad.lock() {
                                b.push((*id, p));
                            }
                        }
                    }
                    let n = checked.fetch_add(chunks.len() as u64, Ordering::Relaxed)
                        + chunks.len() as u64;
                    progress(n);
                });
            }
        });
        progress(users.len() as u64);
        let mut bad = bad.into_inner().unwrap_or_default();
        bad.sort();
        for (id, problem) in bad {
            let who = users.remove(&id).unwrap_or_default();
            match problem {
                None => report.missing.push((id.to_hex(), who)),
                Some(reason) => report.corrupt.push((id.to_hex(), reason, who)),
            }
        }
        Ok(report)
    }
}
