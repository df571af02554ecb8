//! The repository: the [`Repository`] type, opening and creating one, tags and how they resolve
//! to versions, manifests and chunks, the writers' leases, and list/tag/remove. The operations
//! live beside it, each in an `impl Repository` block of its own file: import (`import.rs`),
//! copy between repositories (`copy.rs`), export (`export.rs`), verify (`verify.rs`) and
//! garbage collection (`gc.rs`); their public types are re-exported here.
//!
//! ## Concurrency protocol (writers and GC)
//!
//! Writers (import, copy) and GC never lock each other out; they agree through object times:
//!
//! 1. A writer first publishes a **lease** `leases/<id>.json` holding its start time, and
//!    deletes it when done (a lease older than [`LEASE_MAX_AGE`] is a crashed writer's and is
//!    ignored).
//! 2. For every chunk it needs, a writer either writes it into a new pack (so its time is now)
//!    or **touches** the pack that holds it, the first time it relies on that pack (its time
//!    becomes now; on S3 a marker `touched/<pack>` is written instead). Either way, every pack a
//!    running writer relies on is younger than that writer's start.
//! 3. Its packs are durable as they are written; then one index file names them.
//! 4. Before publishing its manifest the writer checks once that every pack it touched still
//!    exists; the chunks of one that GC removed in the instant between GC's look and the touch
//!    are read again from the source and written back.
//! 5. The manifest is published (durably), then the tag.
//!
//! GC computes `cutoff = min(its own start, oldest live lease's start) − grace`, marks every
//! chunk referenced by a tagged or pinned manifest or by any manifest younger than the cutoff,
//! deletes untagged manifests older than the cutoff, then judges only **packs older than the
//! cutoff** (by the later of their time and their touch marker's): one with nothing live goes,
//! one under 70% live has its live chunks copied into new packs first.
//! A pack a writer relies on is never older than the cutoff, so GC cannot take it. Because the
//! listing GC works from is a little stale, each candidate is first taken out of reach — moved
//! aside ([`Backend::delete_if_older`]), or on S3 copied aside and deleted — and its time read
//! *after* that: a writer's touch that lands before makes GC put the pack back; one that lands
//! after it finds the pack gone (the final look of step 4), and the writer writes the chunks
//! again. New packs and an index naming them are durable before any old pack goes, so readers
//! holding an older index find moved chunks by reading the index again.
//!
//! Which operations may run at the same time as which is tabled in the
//! [crate docs](crate#concurrent-operations).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmatrix_core::ImageRef;

use crate::backend::Backend;
use crate::chunk::{self, ChunkId, CHUNK_SIZE};
use crate::error::{Result, StoreError};
use crate::index::Index;
use crate::manifest::Manifest;
use crate::pack::{PackId, PackWriter, WrittenPack, MAX_PACK_SIZE, PACK_TARGET};

pub use crate::copy::CopyReport;
pub use crate::export::ExportFormat;
pub use crate::gc::GcReport;
pub use crate::import::{inspect, ImportReport, SourceImage};
pub use crate::verify::VerifyReport;

/// A lease older than this belongs to a writer that died; GC ignores it.
pub const LEASE_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const CONFIG_KEY: &str = "config.json";
/// The most bytes one ranged read of [`Repository::read_chunks`] asks for.
const READ_RUN_MAX: u64 = 4 * 1024 * 1024;

/// What a pack copied aside by an S3 gc is called after (its key, then this).
const S3_ASIDE: &str = ".gc-aside";

/// Packs a writer has touched (by their number in its index), and whether each was there.
#[derive(Debug, Default)]
pub(crate) struct Touched(Mutex<HashMap<u32, bool>>);

fn poisoned(what: &str) -> StoreError {
    StoreError::Io {
        action: "keep track of packs (a thread panicked)",
        path: what.into(),
        source: std::io::Error::other("poisoned lock"),
    }
}

/// The key of a pack's touch marker (S3).
pub(crate) fn touch_key(pack: &PackId) -> String {
    format!("touched/{}", pack.to_hex())
}

/// Progress callback: bytes done so far.
pub type Progress<'a> = &'a (dyn Fn(u64) + Sync);

/// The repository's own settings, stored in `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RepoConfig {
    format: String,
    format_version: u32,
    chunk_size: u32,
    /// Packs are closed once they reach this many bytes.
    pack_size: u32,
}

/// The repository format this code writes and reads: 2 stores chunks in pack files (1 kept
/// one file per chunk).
const FORMAT_VERSION: u32 = 2;

/// A dormant-image repository.
#[derive(Debug)]
pub struct Repository {
    pub(crate) backend: Backend,
    /// The index as last read (readers reload it when a chunk is not where it said).
    index: Mutex<Option<Arc<Index>>>,
    /// Packs are closed at this size.
    pack_size: usize,
}

/// One tagged image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageEntry {
    /// `NAME:TAG`.
    pub image: String,
    /// Version id.
    pub version: String,
    /// Virtual size.
    pub virtual_size: u64,
    /// Creation time (Unix seconds).
    pub created: u64,
    /// Stored chunks (non-zero).
    pub chunks: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Lease {
    pub(crate) started: u64,
    pid: u32,
    host: String,
    what: String,
}

/// Removes the lease when the writer ends, however it ends.
pub(crate) struct LeaseGuard<'a> {
    backend: &'a Backend,
    key: String,
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        let _ = self.backend.delete(&self.key);
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A string no other call, process or host produces.
pub(crate) fn nonce() -> String {
    format!(
        "{}-{}-{:?}-{}",
        std::process::id(),
        host_name(),
        SystemTime::now(),
        crate::backend::TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

pub(crate) fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

impl Repository {
    /// Opens an existing repository.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_backend(Backend::open(url)?)
    }

    /// Opens the repository at `url`, creating it if there is none.
    pub fn open_or_init(url: &str) -> Result<Self> {
        Self::open_or_init_backend(Backend::open(url)?)
    }

    /// Opens an existing repository on `backend`.
    pub fn open_backend(backend: Backend) -> Result<Self> {
        let mut repo = Self::new(backend);
        repo.pack_size = repo.check_config()?;
        Ok(repo)
    }

    /// Opens the repository on `backend`, creating it if there is none.
    pub fn open_or_init_backend(backend: Backend) -> Result<Self> {
        Self::open_or_init_with(backend, PACK_TARGET)
    }

    /// [`Repository::open_or_init_backend`], a new repository closing its packs at
    /// `pack_size` bytes (restic's `--pack-size`; at least 64 KiB). An existing repository
    /// keeps its own.
    pub fn open_or_init_with(backend: Backend, pack_size: usize) -> Result<Self> {
        let mut repo = Self::new(backend);
        match repo.backend.get(CONFIG_KEY)? {
            Some(_) => repo.pack_size = repo.check_config()?,
            None => {
                let pack_size = pack_size.clamp(CHUNK_SIZE, MAX_PACK_SIZE);
                let config = RepoConfig {
                    format: "vmatrix-repository".into(),
                    format_version: FORMAT_VERSION,
                    chunk_size: CHUNK_SIZE as u32,
                    pack_size: pack_size as u32,
                };
                let bytes = serde_json::to_vec_pretty(&config).expect("config serialises");
                repo.backend.put_durable(CONFIG_KEY, &bytes)?;
                repo.pack_size = pack_size;
            }
        }
        Ok(repo)
    }

    /// A writer of packs into this repository.
    pub(crate) fn pack_writer(&self) -> PackWriter<'_> {
        PackWriter::new(&self.backend, self.pack_size)
    }

    /// Checks `config.json`; the pack size it sets.
    fn check_config(&self) -> Result<usize> {
        let location = self.backend.location();
        let bytes = self
            .backend
            .get(CONFIG_KEY)?
            .ok_or_else(|| StoreError::NotARepository {
                location: location.clone(),
                detail: "config.json is missing (an import creates a repository; check --repo)"
                    .into(),
            })?;
        let config: RepoConfig =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::NotARepository {
                location: location.clone(),
                detail: format!("config.json is not valid: {e}"),
            })?;
        if config.format == "vmatrix-repository" && config.format_version == 1 {
            return Err(StoreError::NotARepository {
                location,
                detail: "it is in format 1 (one file per chunk), which this vmatrix no longer \
                         reads: export its images with the vmatrix that made it and import them \
                         into a new repository"
                    .into(),
            });
        }
        if config.format != "vmatrix-repository" || config.format_version != FORMAT_VERSION {
            return Err(StoreError::NotARepository {
                location,
                detail: format!(
                    "format {} version {} is not one this vmatrix reads",
                    config.format, config.format_version
                ),
            });
        }
        Ok((config.pack_size as usize).clamp(CHUNK_SIZE, MAX_PACK_SIZE))
    }

    fn new(backend: Backend) -> Self {
        Self {
            backend,
            index: Mutex::new(None),
            pack_size: PACK_TARGET,
        }
    }

    /// The index as last read (read now if it never was).
    pub(crate) fn index(&self) -> Result<Arc<Index>> {
        if let Some(i) = self.index.lock().ok().and_then(|g| g.clone()) {
            return Ok(i);
        }
        self.reload_index()
    }

    /// Reads the index again (other writers add to it; gc moves chunks).
    pub(crate) fn reload_index(&self) -> Result<Arc<Index>> {
        let fresh = Arc::new(Index::load(&self.backend)?);
        if let Ok(mut g) = self.index.lock() {
            *g = Some(fresh.clone());
        }
        Ok(fresh)
    }

    /// Adds packs this handle wrote to its index.
    pub(crate) fn learn(&self, packs: &[WrittenPack]) {
        if let Ok(mut g) = self.index.lock() {
            if let Some(i) = g.as_mut() {
                let i = Arc::make_mut(i);
                for p in packs {
                    i.add(p.id, &p.entries);
                }
            }
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub(crate) fn tag_key(image: &ImageRef) -> String {
        format!("tags/{}/{}", image.name, image.tag)
    }

    /// The version a tag points at, with its manifest.
    pub fn resolve(&self, image: &ImageRef) -> Result<(String, Manifest)> {
        let bytes =
            self.backend
                .get(&Self::tag_key(image))?
                .ok_or_else(|| StoreError::NotFound {
                    what: format!("image {image}"),
                })?;
        let id = String::from_utf8_lossy(&bytes).trim().to_owned();
        let manifest = self.manifest(&id)?;
        Ok((id, manifest))
    }

    /// Reads and checks one manifest.
    pub fn manifest(&self, id: &str) -> Result<Manifest> {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::Corrupt {
                what: "a tag".into(),
                reason: format!("{id:?} is not a version id"),
            });
        }
        let bytes = self
            .backend
            .get(&Manifest::key(id))?
            .ok_or_else(|| StoreError::NotFound {
                what: format!("version {id}"),
            })?;
        Manifest::from_stored(id, &bytes)
    }

    /// Reads one chunk and checks it against its id.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let stored = self.read_stored(id)?;
        chunk::decode(id, &stored)
    }

    /// A chunk's stored bytes (checked against its id), from wherever the index says it is:
    /// when no known place holds it, the index is read again once (a gc may have moved it).
    pub(crate) fn read_stored(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let mut damage = None;
        for attempt in 0..2 {
            let index = if attempt == 0 {
                self.index()?
            } else {
                self.reload_index()?
            };
            for loc in index.locations(id) {
                let pack = index.pack(loc.pack);
                match self
                    .backend
                    .get_range(&pack.key(), u64::from(loc.offset), loc.len as usize)
                {
                    Ok(Some(stored)) => match chunk::decode(id, &stored) {
                        Ok(_) => return Ok(stored),
                        Err(e) => damage = Some(e),
                    },
                    Ok(None) => {}
                    Err(e) => damage = Some(e),
                }
            }
        }
        Err(damage.unwrap_or_else(|| StoreError::Corrupt {
            what: format!("chunk {id}"),
            reason: "it is missing (no pack holds it)".into(),
        }))
    }

    /// Reads several chunks, one ranged read for each run of them that lies back to back in a
    /// pack (what a guest reading its disk in order, or an export, asks for). A run that fails
    /// is read chunk by chunk, with [`Repository::read_chunk`]'s fallbacks.
    pub fn read_chunks(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>> {
        self.read_many(ids, false)
    }

    /// [`Repository::read_chunks`], giving the stored (compressed) bytes, each checked.
    pub(crate) fn read_stored_many(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>> {
        self.read_many(ids, true)
    }

    fn read_many(&self, ids: &[ChunkId], stored: bool) -> Result<Vec<Vec<u8>>> {
        let index = self.index()?;
        let one = |id: &ChunkId| -> Result<Vec<u8>> {
            if stored {
                self.read_stored(id)
            } else {
                self.read_chunk(id)
            }
        };
        let mut out = Vec::with_capacity(ids.len());
        let mut i = 0;
        while i < ids.len() {
            let Some(first) = index.first(&ids[i]) else {
                out.push(one(&ids[i])?);
                i += 1;
                continue;
            };
            let mut end = i + 1;
            let mut run_len = u64::from(first.len);
            while end < ids.len() && run_len < READ_RUN_MAX {
                match index.first(&ids[end]) {
                    Some(l)
                        if l.pack == first.pack
                            && u64::from(l.offset) == u64::from(first.offset) + run_len =>
                    {
                        run_len += u64::from(l.len);
                        end += 1;
                    }
                    _ => break,
                }
            }
            let pack = index.pack(first.pack);
            let bytes = self
                .backend
                .get_range(&pack.key(), u64::from(first.offset), run_len as usize)
                .ok()
                .flatten();
            let mut at = 0usize;
            for id in &ids[i..end] {
                let len = index.first(id).map_or(0, |l| l.len as usize);
                let blob = bytes.as_ref().and_then(|b| b.get(at..at + len));
                at += len;
                let checked = blob.and_then(|b| {
                    let data = chunk::decode(id, b).ok()?;
                    Some(if stored { b.to_vec() } else { data })
                });
                match checked {
                    Some(d) => out.push(d),
                    None => out.push(one(id)?),
                }
            }
            i = end;
        }
        Ok(out)
    }

    /// Sorts chunks by where they are stored, so that [`Repository::read_chunks`] reads them
    /// in long runs.
    pub(crate) fn in_storage_order(&self, ids: &mut [ChunkId]) -> Result<()> {
        let index = self.index()?;
        ids.sort_by_key(|id| {
            index
                .first(id)
                .map_or((u32::MAX, 0), |l| (l.pack, l.offset))
        });
        Ok(())
    }

    /// Whether a writer may rely on a chunk stored in `pack` (number `slot` in its index):
    /// the first time a writer relies on a pack it touches it, so gc leaves it alone; a pack
    /// found gone means writing the chunk anew. The writer's final look
    /// ([`Repository::missing_of`]) checks every pack it relied on.
    pub(crate) fn rely_on(&self, touched: &Touched, slot: u32, pack: &PackId) -> Result<bool> {
        {
            let mut seen = touched.0.lock().map_err(|_| poisoned("touch"))?;
            if let Some(&there) = seen.get(&slot) {
                return Ok(there);
            }
            // Others go ahead meanwhile: the final look catches a pack found gone.
            seen.insert(slot, true);
        }
        let there = self.touch_pack(pack)?;
        if !there {
            touched
                .0
                .lock()
                .map_err(|_| poisoned("touch"))?
                .insert(slot, false);
        }
        Ok(there)
    }

    /// Marks a pack as relied on by a running writer (see the protocol above); false if it is
    /// gone. A directory sets the file's time; S3, which cannot touch an object without
    /// rewriting it, gets an empty marker `touched/<pack>` (gc takes the later of the two
    /// times) — one request; whether the pack is still there is left to the final look.
    fn touch_pack(&self, pack: &PackId) -> Result<bool> {
        match &self.backend {
            Backend::File(_) => self.backend.touch(&pack.key()),
            Backend::S3(_) => {
                self.backend.put(&touch_key(pack), b"")?;
                Ok(true)
            }
        }
    }

    /// Deletes a pack unless a writer touched it since `cutoff`; the bytes freed, or `None`
    /// when a writer touched it (or it is gone). The pack is taken out of reach *before* its
    /// time is judged — moved aside in a directory, copied aside and deleted on S3 — and put
    /// back if a writer touched it: a touch that lands before the judgement keeps the pack,
    /// one after it finds the pack gone (and the writer writes its chunks anew).
    pub(crate) fn delete_pack_if_older(
        &self,
        pack: &PackId,
        cutoff: SystemTime,
    ) -> Result<Option<u64>> {
        let key = pack.key();
        match &self.backend {
            Backend::File(_) => self.backend.delete_if_older(&key, cutoff),
            Backend::S3(s3) => {
                let aside = format!("{key}{S3_ASIDE}");
                if !s3.copy(&key, &aside)? {
                    return Ok(None);
                }
                let size = self.backend.head(&aside)?.map_or(0, |m| m.size);
                self.backend.delete(&key)?;
                let touched = self
                    .backend
                    .head(&touch_key(pack))?
                    .is_some_and(|m| m.modified >= cutoff);
                if touched {
                    s3.copy(&aside, &key)?;
                    self.backend.delete(&aside)?;
                    return Ok(None);
                }
                self.backend.delete(&aside)?;
                self.backend.delete(&touch_key(pack))?;
                Ok(Some(size))
            }
        }
    }

    /// Puts back the packs a gc killed mid-delete left aside (see
    /// [`Backend::put_back_aside`]); on S3, copies aside a minute old or more (a gc holds one
    /// for milliseconds). How many.
    pub(crate) fn put_back_aside(&self) -> Result<u64> {
        let Backend::S3(s3) = &self.backend else {
            return self.backend.put_back_aside();
        };
        let now = SystemTime::now();
        let mut put_back = 0;
        for (aside, meta) in self.backend.list("packs/")? {
            let Some(key) = aside.strip_suffix(S3_ASIDE) else {
                continue;
            };
            if now.duration_since(meta.modified).unwrap_or_default() < Duration::from_secs(60) {
                continue;
            }
            if self.backend.head(key)?.is_none() {
                s3.copy(&aside, key)?;
            }
            self.backend.delete(&aside)?;
            put_back += 1;
        }
        Ok(put_back)
    }

    pub(crate) fn take_lease(&self, what: &str) -> Result<LeaseGuard<'_>> {
        let lease = Lease {
            started: unix_now(),
            pid: std::process::id(),
            host: host_name(),
            what: what.to_owned(),
        };
        // Two leases taken at once in one process (several agents in one) differ.
        let nonce = blake3::hash(nonce().as_bytes()).to_hex();
        let key = format!("leases/{}.json", &nonce[..16]);
        self.backend
            .put_durable(&key, &serde_json::to_vec(&lease).expect("lease serialises"))?;
        Ok(LeaseGuard {
            backend: &self.backend,
            key,
        })
    }

    /// Every tagged image, sorted.
    pub fn list(&self) -> Result<Vec<ImageEntry>> {
        let mut out = Vec::new();
        for (key, _) in self.backend.list("tags/")? {
            let Some(rest) = key.strip_prefix("tags/") else {
                continue;
            };
            let Some((name, tag)) = rest.split_once('/') else {
                continue;
            };
            let Ok(image) = ImageRef::parse(&format!("{name}:{tag}")) else {
                continue;
            };
            let (version, m) = self.resolve(&image)?;
            out.push(ImageEntry {
                image: image.to_string(),
                version,
                virtual_size: m.virtual_size,
                created: m.created,
                chunks: m.chunks.iter().filter(|c| c.is_some()).count(),
            });
        }
        Ok(out)
    }

    /// Points `to` at the version `from` points at.
    pub fn tag(&self, from: &ImageRef, to: &ImageRef) -> Result<String> {
        let (id, m) = self.resolve(from)?;
        if m.name != to.name {
            return Err(StoreError::BadInput {
                path: PathBuf::from(to.to_string()),
                reason: format!(
                    "a tag stays within its image: {from} is image {}, not {}",
                    m.name, to.name
                ),
            });
        }
        self.backend
            .put_durable(&Self::tag_key(to), id.as_bytes())?;
        Ok(id)
    }

    /// Removes a tag; the version's data goes at the next `gc` if nothing else uses it.
    pub fn remove(&self, image: &ImageRef) -> Result<String> {
        let (id, _) = self.resolve(image)?;
        self.backend.delete(&Self::tag_key(image))?;
        Ok(id)
    }

    pub(crate) fn tagged_versions(&self) -> Result<BTreeMap<String, Vec<String>>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, _) in self.backend.list("tags/")? {
            let Some(rest) = key.strip_prefix("tags/") else {
                continue;
            };
            let Some(bytes) = self.backend.get(&key)? else {
                continue;
            };
            let id = String::from_utf8_lossy(&bytes).trim().to_owned();
            out.entry(id).or_default().push(rest.replacen('/', ":", 1));
        }
        Ok(out)
    }
}
