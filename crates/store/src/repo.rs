//! The repository: the [`Repository`] type, opening and creating one, tags and how they resolve
//! to versions, manifests and chunks, the writers' leases, and list/tag/remove. The operations
//! live beside it, each in an `impl Repository` block of its own file: import (`import.rs`),
//! copy between repositories (`copy.rs`), export (`export.rs`), verify (`verify.rs`) and
//! garbage collection (`gc.rs`); their public types are re-exported here.
//!
//! ## Concurrency protocol (writers and GC)
//!
//! Writers (import) and GC never lock each other out; they agree through object times:
//!
//! 1. A writer first publishes a **lease** `leases/<id>.json` holding its start time, and
//!    deletes it when done (a lease older than [`LEASE_MAX_AGE`] is a crashed writer's and is
//!    ignored).
//! 2. For every chunk it needs, a writer either writes it (new, so its time is now) or
//!    **touches** the existing one (its time becomes now). Either way, every chunk a running
//!    writer relies on is younger than that writer's start.
//! 3. Before publishing its manifest the writer syncs, then checks (twice, 0.2 s apart) that
//!    every chunk it touched still exists; one that GC removed in the instant between GC's look
//!    and the touch is read again from the source and written back.
//! 4. The manifest is published (durably), then the tag.
//!
//! GC computes `cutoff = min(its own start, oldest live lease's start) − grace`, marks every
//! chunk referenced by a tagged manifest or by any manifest younger than the cutoff, then deletes
//! unmarked chunks and untagged manifests **older than the cutoff**. A chunk a writer relies on
//! is never older than the cutoff, so GC cannot take it. Because the listing GC works from is a
//! little stale, each candidate is first moved aside and its time read *after* the move
//! ([`Backend::delete_if_older`]): a writer's touch that lands before the move makes GC put the
//! chunk back; one that lands after it fails, and the writer writes the chunk again.
//!
//! Which operations may run at the same time as which is tabled in the
//! [crate docs](crate#concurrent-operations).

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmatrix_core::ImageRef;

use crate::backend::Backend;
use crate::chunk::{self, ChunkId, CHUNK_SIZE};
use crate::error::{Result, StoreError};
use crate::manifest::Manifest;

pub use crate::copy::CopyReport;
pub use crate::export::ExportFormat;
pub use crate::gc::GcReport;
pub use crate::import::{inspect, ImportReport, SourceImage};
pub use crate::verify::VerifyReport;

/// A lease older than this belongs to a writer that died; GC ignores it.
pub const LEASE_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const CONFIG_KEY: &str = "config.json";

/// Progress callback: bytes done so far.
pub type Progress<'a> = &'a (dyn Fn(u64) + Sync);

/// The repository's own settings, stored in `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RepoConfig {
    format: String,
    format_version: u32,
    chunk_size: u32,
}

/// A dormant-image repository.
#[derive(Debug)]
pub struct Repository {
    pub(crate) backend: Backend,
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
        let repo = Self { backend };
        repo.check_config()?;
        Ok(repo)
    }

    /// Opens the repository on `backend`, creating it if there is none.
    pub fn open_or_init_backend(backend: Backend) -> Result<Self> {
        let repo = Self { backend };
        match repo.backend.get(CONFIG_KEY)? {
            Some(_) => repo.check_config()?,
            None => {
                let config = RepoConfig {
                    format: "vmatrix-repository".into(),
                    format_version: 1,
                    chunk_size: CHUNK_SIZE as u32,
                };
                let bytes = serde_json::to_vec_pretty(&config).expect("config serialises");
                repo.backend.put_durable(CONFIG_KEY, &bytes)?;
            }
        }
        Ok(repo)
    }

    fn check_config(&self) -> Result<()> {
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
        if config.format != "vmatrix-repository" || config.format_version != 1 {
            return Err(StoreError::NotARepository {
                location,
                detail: format!(
                    "format {} version {} is not one this vmatrix reads",
                    config.format, config.format_version
                ),
            });
        }
        Ok(())
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
        Manifest::from_bytes(id, &bytes)
    }

    /// Reads one chunk and checks it against its id.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let stored = self
            .backend
            .get(&id.key())?
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("chunk {id}"),
                reason: "it is missing".into(),
            })?;
        chunk::decode(id, &stored)
    }

    pub(crate) fn take_lease(&self, what: &str) -> Result<LeaseGuard<'_>> {
        let lease = Lease {
            started: unix_now(),
            pid: std::process::id(),
            host: host_name(),
            what: what.to_owned(),
        };
        let nonce = blake3::hash(
            format!(
                "{}-{}-{:?}-{}",
                lease.pid,
                lease.host,
                SystemTime::now(),
                // Two leases taken at once in one process (several agents in one) differ.
                crate::backend::TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )
            .as_bytes(),
        )
        .to_hex();
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
