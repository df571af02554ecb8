//! The machine's local chunk cache: decoded chunks on local disk, filled on demand from the
//! repository, bounded in size with least-recently-used eviction. One cache serves every VM
//! (every export) on the machine, so images that share chunks share cache space too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::chunk::ChunkId;
use crate::error::{io_err, Result};
use crate::repo::Repository;

/// Counters for what the cache did.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Reads served from the cache.
    pub hits: AtomicU64,
    /// Chunks fetched from the repository.
    pub fetches: AtomicU64,
    /// Stored bytes fetched from the repository backend.
    pub fetched_bytes: AtomicU64,
    /// Chunks evicted.
    pub evictions: AtomicU64,
}

#[derive(Debug, Default)]
struct Lru {
    /// Chunk → (size, last use tick).
    entries: HashMap<ChunkId, (u64, u64)>,
    bytes: u64,
    tick: u64,
}

/// A bounded on-disk chunk cache in front of a repository.
#[derive(Debug)]
pub struct ChunkCache {
    repo: Arc<Repository>,
    dir: PathBuf,
    limit: u64,
    lru: Mutex<Lru>,
    /// Makes temporary names unique: a read and a read-ahead may fetch one chunk at once.
    tmp_counter: AtomicU64,
    /// What the cache did so far.
    pub stats: CacheStats,
}

impl ChunkCache {
    /// A cache in `dir` holding at most `limit` bytes of decoded chunks. What an earlier run left
    /// in `dir` is reused.
    pub fn new(repo: Arc<Repository>, dir: &Path, limit: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let mut lru = Lru::default();
        for entry in std::fs::read_dir(dir)
            .map_err(io_err("list", dir))?
            .flatten()
        {
            let name = entry.file_name();
            let Some(id) = ChunkId::from_hex(&name.to_string_lossy()) else {
                let _ = std::fs::remove_file(entry.path());
                continue;
            };
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            lru.tick += 1;
            lru.entries.insert(id, (size, lru.tick));
            lru.bytes += size;
        }
        Ok(Self {
            repo,
            dir: dir.to_owned(),
            limit,
            lru: Mutex::new(lru),
            tmp_counter: AtomicU64::new(0),
            stats: CacheStats::default(),
        })
    }

    /// The repository behind the cache.
    pub fn repo(&self) -> &Arc<Repository> {
        &self.repo
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// Whether the chunk is cached (no I/O beyond a lock).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lru
            .lock()
            .map(|l| l.entries.contains_key(id))
            .unwrap_or(false)
    }

    /// The chunk's bytes, from the cache or fetched (and verified) from the repository.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let path = self.path(id);
        if self.contains(id) {
            if let Ok(data) = std::fs::read(&path) {
                // Cached bytes were verified when fetched; a torn file would fail this cheap check.
                if ChunkId::of(&data) == *id {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    self.touch(id);
                    return Ok(data);
                }
            }
            self.forget(id);
        }
        let stored = self.repo.read_stored(id)?;
        let fetched = stored.len() as u64;
        let data = crate::chunk::decode(id, &stored)?;
        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .fetched_bytes
            .fetch_add(fetched, Ordering::Relaxed);
        self.insert(id, &data)?;
        Ok(data)
    }

    /// Fetches the chunks of `ids` not cached yet, with one ranged read per run of them that
    /// lies back to back in a pack (a guest reading ahead). Best effort: a chunk that cannot
    /// be read now is left for [`ChunkCache::get`], which says why.
    pub fn prefetch(&self, ids: &[ChunkId]) {
        let mut want: Vec<ChunkId> = ids
            .iter()
            .filter(|id| !self.contains(id))
            .copied()
            .collect();
        want.dedup();
        if want.is_empty() {
            return;
        }
        let Ok(stored) = self.repo.read_stored_many(&want) else {
            return;
        };
        for (id, blob) in want.iter().zip(&stored) {
            let Ok(data) = crate::chunk::decode(id, blob) else {
                continue;
            };
            self.stats.fetches.fetch_add(1, Ordering::Relaxed);
            self.stats
                .fetched_bytes
                .fetch_add(blob.len() as u64, Ordering::Relaxed);
            let _ = self.insert(id, &data);
        }
    }

    fn touch(&self, id: &ChunkId) {
        if let Ok(mut l) = self.lru.lock() {
            l.tick += 1;
            let tick = l.tick;
            if let Some(e) = l.entries.get_mut(id) {
                e.1 = tick;
            }
        }
    }

    fn forget(&self, id: &ChunkId) {
        if let Ok(mut l) = self.lru.lock() {
            if let Some((size, _)) = l.entries.remove(id) {
                l.bytes -= size;
            }
        }
        let _ = std::fs::remove_file(self.path(id));
    }

    fn insert(&self, id: &ChunkId, data: &[u8]) -> Result<()> {
        let path = self.path(id);
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}-{n}", id.to_hex(), std::process::id()));
        std::fs::write(&tmp, data).map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        let mut victims = Vec::new();
        if let Ok(mut l) = self.lru.lock() {
            l.tick += 1;
            let tick = l.tick;
            if l.entries.insert(*id, (data.len() as u64, tick)).is_none() {
                l.bytes += data.len() as u64;
            }
            while l.bytes > self.limit && l.entries.len() > 1 {
                let Some((&oldest, _)) = l
                    .entries
                    .iter()
                    .filter(|(k, _)| *k != id)
                    .min_by_key(|(_, v)| v.1)
                else {
                    break;
                };
                if let Some((size, _)) = l.entries.remove(&oldest) {
                    l.bytes -= size;
                    victims.push(oldest);
                }
            }
        }
        for v in victims {
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            let _ = std::fs::remove_file(self.path(&v));
        }
        Ok(())
    }

    /// Bytes currently cached.
    pub fn cached_bytes(&self) -> u64 {
        self.lru.lock().map(|l| l.bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmatrix_core::ImageRef;

    #[test]
    fn fills_on_demand_and_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Arc::new(
            Repository::open_or_init(&format!("file://{}", dir.path().join("repo").display()))
                .unwrap(),
        );
        // Four distinct, incompressible 64 KiB chunks.
        let mut disk = vec![0u8; 4 * 65536];
        blake3::Hasher::new().finalize_xof().fill(&mut disk);
        let raw = dir.path().join("d.raw");
        std::fs::write(&raw, &disk).unwrap();
        let image = ImageRef::parse("d:v1").unwrap();
        // Stored as a raw disk, without asking qemu-img what it is.
        repo.import_raw(
            &raw,
            disk.len() as u64,
            &image,
            crate::import::Provenance::default(),
            std::time::Instant::now(),
            &|_| {},
        )
        .unwrap();
        let (_, m) = repo.resolve(&image).unwrap();
        let ids: Vec<ChunkId> = m.chunks.iter().flatten().copied().collect();

        let cache = ChunkCache::new(repo.clone(), &dir.path().join("cache"), 3 * 65536).unwrap();
        for id in &ids[..3] {
            assert_eq!(ChunkId::of(&cache.get(id).unwrap()), *id);
        }
        assert_eq!(cache.stats.fetches.load(Ordering::Relaxed), 3);
        cache.get(&ids[0]).unwrap(); // 0 is now the most recently used
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 1);
        cache.get(&ids[3]).unwrap(); // over the bound: 1 is the least recently used
        assert!(cache.cached_bytes() <= 3 * 65536);
        assert!(
            !cache.contains(&ids[1]),
            "the least recently used chunk stays"
        );
        assert!(cache.contains(&ids[0]) && cache.contains(&ids[3]));
        assert_eq!(cache.stats.evictions.load(Ordering::Relaxed), 1);

        // A new cache over the same directory reuses what is there.
        let again = ChunkCache::new(repo, &dir.path().join("cache"), 3 * 65536).unwrap();
        again.get(&ids[3]).unwrap();
        assert_eq!(again.stats.fetches.load(Ordering::Relaxed), 0);
    }
}
