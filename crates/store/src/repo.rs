//! The repository: import, export, tags, verify and garbage collection over a [`Backend`].
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
//! | operation | concurrent with import | with verify | with gc | with export/serve |
//! | --- | --- | --- | --- | --- |
//! | import | yes (same chunk written twice is harmless) | yes | yes (protocol above) | yes |
//! | gc | yes | verify may report a chunk of an *untagged* version gc just removed | one at a time (harmless but wasteful) | yes for tagged images |
//! | rm (untag) | yes | yes | yes | a running export keeps its manifest in memory; its chunks may go after gc |

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmatrix_core::ImageRef;

use crate::backend::Backend;
use crate::chunk::{self, ChunkId, CHUNK_SIZE};
use crate::error::{io_err, Result, StoreError};
use crate::manifest::{Boot, Manifest, ManifestKind, MANIFEST_FORMAT, MANIFEST_VERSION};

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
    backend: Backend,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The image reference.
    pub image: String,
    /// The version id published (or the unchanged existing one).
    pub version: String,
    /// False when the tag already pointed at identical content (nothing published).
    pub published: bool,
    /// Virtual disk size.
    pub logical_bytes: u64,
    /// Bytes in all-zero chunks (not stored).
    pub zero_bytes: u64,
    /// Chunks new to the repository and their raw and stored sizes.
    pub new_chunks: u64,
    /// Raw bytes of new chunks.
    pub new_raw_bytes: u64,
    /// Stored (compressed) bytes of new chunks: what the repository grew by.
    pub new_stored_bytes: u64,
    /// Chunks that were already there.
    pub reused_chunks: u64,
    /// Seconds.
    pub seconds: f64,
}

impl ImportReport {
    /// Non-zero bytes divided by raw bytes new to the repository.
    pub fn dedup_ratio(&self) -> f64 {
        let data = self.logical_bytes - self.zero_bytes;
        if self.new_raw_bytes == 0 {
            f64::INFINITY
        } else {
            data as f64 / self.new_raw_bytes as f64
        }
    }
    /// Raw bytes of new chunks divided by their stored bytes.
    pub fn compression_ratio(&self) -> f64 {
        if self.new_stored_bytes == 0 {
            1.0
        } else {
            self.new_raw_bytes as f64 / self.new_stored_bytes as f64
        }
    }
    /// Logical bytes per second.
    pub fn throughput(&self) -> f64 {
        self.logical_bytes as f64 / self.seconds.max(1e-9)
    }
}

/// What a push or pull did.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// The image.
    pub image: String,
    /// Its version id (the same in both repositories).
    pub version: String,
    /// Distinct stored chunks of the version.
    pub chunks: u64,
    /// Chunks that had to be copied.
    pub copied_chunks: u64,
    /// Stored bytes copied.
    pub copied_bytes: u64,
    /// Seconds.
    pub seconds: f64,
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

/// What GC did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Live versions (tagged or young).
    pub live_manifests: usize,
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
    /// Seconds.
    pub seconds: f64,
}

/// Export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// Raw bytes (sparse where chunks are zero).
    Raw,
    /// qcow2 via `qemu-img convert`.
    Qcow2,
}

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    started: u64,
    pid: u32,
    host: String,
    what: String,
}

/// Removes the lease when the writer ends, however it ends.
struct LeaseGuard<'a> {
    backend: &'a Backend,
    key: String,
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        let _ = self.backend.delete(&self.key);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// A disk image file as `qemu-img` sees it.
#[derive(Debug, Clone)]
pub struct SourceImage {
    /// `raw`, `qcow2`, `vmdk`, …
    pub format: String,
    /// Virtual disk size.
    pub virtual_size: u64,
}

/// Asks `qemu-img info` what `path` is; refuses files that are not disk images.
pub fn inspect(path: &Path) -> Result<SourceImage> {
    let meta = fs::metadata(path).map_err(io_err("open", path))?;
    if !meta.is_file() {
        return Err(StoreError::BadInput {
            path: path.to_owned(),
            reason: "not a regular file: give the path of a disk image".into(),
        });
    }
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .map_err(io_err("run qemu-img info on", path))?;
    if !out.status.success() {
        return Err(StoreError::BadInput {
            path: path.to_owned(),
            reason: format!(
                "not a disk image qemu-img can read: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| StoreError::BadInput {
            path: path.to_owned(),
            reason: format!("qemu-img info gave no JSON: {e}"),
        })?;
    let format = info["format"].as_str().unwrap_or("raw").to_owned();
    let virtual_size = info["virtual-size"].as_u64().unwrap_or(0);
    if virtual_size == 0 {
        return Err(StoreError::BadInput {
            path: path.to_owned(),
            reason: "the disk is empty".into(),
        });
    }
    // qemu-img rounds a raw file's size up to whole sectors: judge the file itself.
    if format == "raw" && !meta.len().is_multiple_of(512) {
        return Err(StoreError::BadInput {
            path: path.to_owned(),
            reason: format!(
                "not a disk image: its size ({} bytes) is not a multiple of 512; give a raw, qcow2, vmdk, vdi or vhdx disk",
                meta.len()
            ),
        });
    }
    Ok(SourceImage {
        format,
        virtual_size,
    })
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

    fn tag_key(image: &ImageRef) -> String {
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

    fn take_lease(&self, what: &str) -> Result<LeaseGuard<'_>> {
        let lease = Lease {
            started: unix_now(),
            pid: std::process::id(),
            host: host_name(),
            what: what.to_owned(),
        };
        let nonce = blake3::hash(
            format!("{}-{}-{:?}", lease.pid, lease.host, SystemTime::now()).as_bytes(),
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

    /// Imports the disk image at `path` as `image`. Formats other than raw are converted with
    /// `qemu-img` into `scratch` first. `progress` gets the bytes read so far.
    pub fn import(
        &self,
        path: &Path,
        image: &ImageRef,
        scratch: &Path,
        progress: Progress<'_>,
    ) -> Result<ImportReport> {
        let started = Instant::now();
        let source = inspect(path)?;
        let _converted;
        let raw_path = if source.format == "raw" {
            path.to_owned()
        } else {
            let tmp = tempfile_in(scratch, "import")?;
            convert(path, &tmp.0, "raw")?;
            _converted = tmp;
            _converted.0.clone()
        };
        self.import_raw(
            &raw_path,
            source.virtual_size,
            image,
            ManifestKind::Disk,
            &source.format,
            &format!("vmatrix image import {}", path.display()),
            started,
            progress,
        )
    }

    /// Stores a saved memory and device state (a suspend's output) as `image`, chunked and
    /// deduplicated like a disk, so a VM suspended on one machine resumes on any other.
    pub fn import_state(
        &self,
        path: &Path,
        image: &ImageRef,
        progress: Progress<'_>,
    ) -> Result<ImportReport> {
        let started = Instant::now();
        let size = fs::metadata(path).map_err(io_err("open", path))?.len();
        if size == 0 {
            return Err(StoreError::BadInput {
                path: path.to_owned(),
                reason: "the saved state is empty".into(),
            });
        }
        self.import_raw(
            path,
            size,
            image,
            ManifestKind::State,
            "qemu-migration-stream",
            &format!("saved state {}", path.display()),
            started,
            progress,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn import_raw(
        &self,
        raw_path: &Path,
        size: u64,
        image: &ImageRef,
        kind: ManifestKind,
        source_format: &str,
        what: &str,
        started: Instant,
        progress: Progress<'_>,
    ) -> Result<ImportReport> {
        let _lease = self.take_lease(&format!("import {image}"))?;
        let chunks = self.store_chunks(raw_path, size, progress)?;

        let previous = match self.resolve(image) {
            Ok((id, m)) => Some((id, m)),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let mut report = ImportReport {
            image: image.to_string(),
            version: String::new(),
            published: false,
            logical_bytes: size,
            zero_bytes: chunks.zero_bytes,
            new_chunks: chunks.new_chunks,
            new_raw_bytes: chunks.new_raw_bytes,
            new_stored_bytes: chunks.new_stored_bytes,
            reused_chunks: chunks.reused,
            seconds: 0.0,
        };
        if let Some((id, old)) = &previous {
            if old.chunks == chunks.ids && old.virtual_size == size && old.kind == kind {
                report.version = id.clone();
                report.seconds = started.elapsed().as_secs_f64();
                return Ok(report);
            }
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            format_version: MANIFEST_VERSION,
            kind,
            name: image.name.clone(),
            created: unix_now(),
            created_by: format!("{what} (pid {} on {})", std::process::id(), host_name()),
            parent: previous.map(|(id, _)| id),
            virtual_size: size,
            chunk_size: CHUNK_SIZE as u32,
            boot: Boot::Bios,
            source_format: source_format.to_owned(),
            chunks: chunks.ids,
        };
        report.version = self.publish(image, &manifest, raw_path, &chunks.touched)?;
        report.published = true;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Makes the chunks durable, makes sure the ones we only touched are still there (writing
    /// back from `raw` any that a concurrent GC took), then publishes the manifest and moves the
    /// tag.
    fn publish(
        &self,
        image: &ImageRef,
        manifest: &Manifest,
        raw: &Path,
        touched: &[(usize, ChunkId)],
    ) -> Result<String> {
        self.backend.sync()?;
        let mut pending: Vec<(usize, ChunkId)> = touched.to_vec();
        // Look twice: the second look, a moment later, also sees GC deletions that were
        // already in flight during the first.
        for round in 0..4 {
            let missing = self.missing_of(&pending)?;
            if missing.is_empty() {
                if round >= 1 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            tracing::info!(
                "{} reused chunk(s) vanished during the import (gc); writing them again",
                missing.len()
            );
            self.write_back(raw, manifest, &missing)?;
            self.backend.sync()?;
            pending = missing;
            if round == 3 {
                if let Some((_, id)) = self.missing_of(&pending)?.first() {
                    return Err(StoreError::ChunkVanished { chunk: id.to_hex() });
                }
            }
        }
        let (id, bytes) = manifest.to_bytes();
        self.backend.put_durable(&Manifest::key(&id), &bytes)?;
        self.backend
            .put_durable(&Self::tag_key(image), id.as_bytes())?;
        Ok(id)
    }

    fn missing_of(&self, chunks: &[(usize, ChunkId)]) -> Result<Vec<(usize, ChunkId)>> {
        let mut missing = Vec::new();
        for &(index, id) in chunks {
            match self.backend.head(&id.key())? {
                Some(m) if chunk::plausible_size(m.size) => {}
                _ => missing.push((index, id)),
            }
        }
        Ok(missing)
    }

    /// Re-reads chunks from the source and writes them again.
    fn write_back(
        &self,
        raw: &Path,
        manifest: &Manifest,
        chunks: &[(usize, ChunkId)],
    ) -> Result<()> {
        let mut f = fs::File::open(raw).map_err(io_err("open", raw))?;
        for &(index, id) in chunks {
            let mut data = vec![0u8; manifest.chunk_len(index)];
            f.seek(SeekFrom::Start(
                index as u64 * u64::from(manifest.chunk_size),
            ))
            .map_err(io_err("seek in", raw))?;
            f.read_exact(&mut data).map_err(io_err("read", raw))?;
            if ChunkId::of(&data) != id {
                return Err(StoreError::BadInput {
                    path: raw.to_owned(),
                    reason: "the file changed while it was being imported; import it again".into(),
                });
            }
            self.backend.put(&id.key(), &chunk::encode(&data))?;
        }
        Ok(())
    }

    /// Cuts `raw` into chunks on all cores: zero chunks are skipped, existing chunks touched,
    /// new ones compressed and written.
    fn store_chunks(&self, raw: &Path, size: u64, progress: Progress<'_>) -> Result<StoredChunks> {
        let count = size.div_ceil(CHUNK_SIZE as u64) as usize;
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (work_tx, work_rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(workers * 4);
        let work_rx = Mutex::new(work_rx);
        let (done_tx, done_rx) = mpsc::channel::<Result<(usize, ChunkOutcome)>>();
        let abort = AtomicBool::new(false);
        let read_bytes = AtomicU64::new(0);
        let mut file = fs::File::open(raw).map_err(io_err("open", raw))?;

        std::thread::scope(|scope| {
            let abort = &abort;
            let read_bytes = &read_bytes;
            let reader_done = done_tx.clone();
            scope.spawn(move || {
                for index in 0..count {
                    if abort.load(Ordering::Relaxed) {
                        return;
                    }
                    let len = (size - index as u64 * CHUNK_SIZE as u64).min(CHUNK_SIZE as u64);
                    let mut buf = vec![0u8; len as usize];
                    if let Err(e) = file.read_exact(&mut buf) {
                        let _ = reader_done.send(Err(io_err("read", raw)(e)));
                        return;
                    }
                    read_bytes.fetch_add(len, Ordering::Relaxed);
                    if work_tx.send((index, buf)).is_err() {
                        return;
                    }
                }
            });
            for _ in 0..workers {
                let done_tx = done_tx.clone();
                let work_rx = &work_rx;
                scope.spawn(move || loop {
                    let next = work_rx.lock().map(|rx| rx.recv());
                    let Ok(Ok((index, data))) = next else { return };
                    if abort.load(Ordering::Relaxed) {
                        return;
                    }
                    let outcome = self.store_one(&data).map(|o| (index, o));
                    if done_tx.send(outcome).is_err() {
                        return;
                    }
                });
            }
            drop(done_tx);

            let mut out = StoredChunks {
                ids: vec![None; count],
                ..Default::default()
            };
            let mut received: usize = 0;
            let mut failure = None;
            for result in done_rx.iter() {
                match result {
                    Ok((index, outcome)) => {
                        received += 1;
                        match outcome {
                            ChunkOutcome::Zero(len) => out.zero_bytes += len as u64,
                            ChunkOutcome::Reused(id) => {
                                out.reused += 1;
                                out.touched.push((index, id));
                                out.ids[index] = Some(id);
                            }
                            ChunkOutcome::New(id, raw_len, stored_len) => {
                                out.new_chunks += 1;
                                out.new_raw_bytes += raw_len as u64;
                                out.new_stored_bytes += stored_len as u64;
                                out.ids[index] = Some(id);
                            }
                        }
                        if received.is_multiple_of(64) || received == count {
                            progress(read_bytes.load(Ordering::Relaxed));
                        }
                    }
                    Err(e) => {
                        abort.store(true, Ordering::Relaxed);
                        failure.get_or_insert(e);
                    }
                }
            }
            match failure {
                Some(e) => Err(e),
                None if received != count => Err(StoreError::Io {
                    action: "read all chunks of",
                    path: raw.to_owned(),
                    source: std::io::Error::other(format!("{received} of {count} chunks")),
                }),
                None => Ok(out),
            }
        })
    }

    fn store_one(&self, data: &[u8]) -> Result<ChunkOutcome> {
        if chunk::is_zero(data) {
            return Ok(ChunkOutcome::Zero(data.len()));
        }
        let id = ChunkId::of(data);
        let key = id.key();
        if let Some(meta) = self.backend.head(&key)? {
            if chunk::plausible_size(meta.size) && self.backend.touch(&key)? {
                return Ok(ChunkOutcome::Reused(id));
            }
        }
        let stored = chunk::encode(data);
        self.backend.put(&key, &stored)?;
        Ok(ChunkOutcome::New(id, data.len(), stored.len()))
    }

    /// Copies `image` from `source` into this repository, transferring only the chunks this one
    /// lacks, then publishes the same version (same manifest bytes, same id) under the same tag.
    /// `progress` gets the number of chunks handled so far.
    pub fn copy_from(
        &self,
        source: &Repository,
        image: &ImageRef,
        progress: Progress<'_>,
    ) -> Result<CopyReport> {
        let started = Instant::now();
        let (id, manifest) = source.resolve(image)?;
        let _lease =
            self.take_lease(&format!("copy {image} from {}", source.backend.location()))?;
        let mut unique: Vec<ChunkId> = manifest.chunks.iter().flatten().copied().collect();
        unique.sort();
        unique.dedup();
        let next = AtomicU64::new(0);
        let copied = AtomicU64::new(0);
        let bytes = AtomicU64::new(0);
        let failure: Mutex<Option<StoreError>> = Mutex::new(None);
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(chunk) = unique.get(i) else { return };
                    if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let result = (|| -> Result<()> {
                        let key = chunk.key();
                        if let Some(m) = self.backend.head(&key)? {
                            if chunk::plausible_size(m.size) && self.backend.touch(&key)? {
                                return Ok(());
                            }
                        }
                        let stored =
                            source
                                .backend
                                .get(&key)?
                                .ok_or_else(|| StoreError::Corrupt {
                                    what: format!("chunk {chunk} in {}", source.backend.location()),
                                    reason: "it is missing".into(),
                                })?;
                        // Never spread damage: check before copying.
                        chunk::decode(chunk, &stored)?;
                        self.backend.put(&key, &stored)?;
                        copied.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(stored.len() as u64, Ordering::Relaxed);
                        Ok(())
                    })();
                    if let Err(e) = result {
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(e);
                        }
                        return;
                    }
                    progress(i as u64 + 1);
                });
            }
        });
        if let Some(e) = failure.into_inner().ok().flatten() {
            return Err(e);
        }
        self.backend.sync()?;
        // Everything is in place; a final look guards against a concurrent gc as in import.
        let all: Vec<(usize, ChunkId)> = unique.iter().map(|c| (0, *c)).collect();
        if let Some((_, missing)) = self.missing_of(&all)?.first() {
            return Err(StoreError::ChunkVanished {
                chunk: missing.to_hex(),
            });
        }
        let (new_id, bytes_m) = manifest.to_bytes();
        debug_assert_eq!(new_id, id);
        self.backend
            .put_durable(&Manifest::key(&new_id), &bytes_m)?;
        self.backend
            .put_durable(&Self::tag_key(image), new_id.as_bytes())?;
        Ok(CopyReport {
            image: image.to_string(),
            version: new_id,
            chunks: unique.len() as u64,
            copied_chunks: copied.load(Ordering::Relaxed),
            copied_bytes: bytes.load(Ordering::Relaxed),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Writes the exact bytes of `image` to `out` (raw, sparse; or qcow2), atomically.
    pub fn export(
        &self,
        image: &ImageRef,
        out: &Path,
        format: ExportFormat,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let (_, manifest) = self.resolve(image)?;
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let raw_tmp = tempfile_in(dir, "export")?;
        {
            let mut f = fs::File::create(&raw_tmp.0).map_err(io_err("create", &raw_tmp.0))?;
            f.set_len(manifest.virtual_size)
                .map_err(io_err("size", &raw_tmp.0))?;
            let mut done = 0u64;
            for (index, id) in manifest.chunks.iter().enumerate() {
                let len = manifest.chunk_len(index) as u64;
                if let Some(id) = id {
                    let data = self.read_chunk(id)?;
                    f.seek(SeekFrom::Start(
                        index as u64 * u64::from(manifest.chunk_size),
                    ))
                    .map_err(io_err("seek in", &raw_tmp.0))?;
                    f.write_all(&data).map_err(io_err("write", &raw_tmp.0))?;
                }
                done += len;
                if index.is_multiple_of(64) {
                    progress(done);
                }
            }
            f.sync_all().map_err(io_err("sync", &raw_tmp.0))?;
            progress(done);
        }
        match format {
            ExportFormat::Raw => {
                fs::rename(&raw_tmp.0, out).map_err(io_err("rename into place", out))?;
            }
            ExportFormat::Qcow2 => {
                let q = tempfile_in(dir, "export-qcow2")?;
                convert_to(&raw_tmp.0, "raw", &q.0, "qcow2")?;
                fs::rename(&q.0, out).map_err(io_err("rename into place", out))?;
            }
        }
        Ok(manifest.virtual_size)
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

    fn tagged_versions(&self) -> Result<BTreeMap<String, Vec<String>>> {
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
                    if let Some(id) = key
                        .strip_prefix("manifests/")
                        .and_then(|k| k.strip_suffix(".json"))
                    {
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
        let ids: Vec<ChunkId> = users.keys().copied().collect();
        let next = AtomicU64::new(0);
        let checked = AtomicU64::new(0);
        let bad = Mutex::new(Vec::<(ChunkId, Option<String>)>::new());
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(id) = ids.get(i) else { return };
                    let problem = match self.backend.get(&id.key()) {
                        Ok(None) => Some(None),
                        Ok(Some(stored)) => chunk::decode(id, &stored)
                            .err()
                            .map(|e| Some(e.to_string())),
                        Err(e) => Some(Some(e.to_string())),
                    };
                    if let Some(p) = problem {
                        if let Ok(mut b) = bad.lock() {
                            b.push((*id, p));
                        }
                    }
                    let n = checked.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_multiple_of(256) {
                        progress(n);
                    }
                });
            }
        });
        progress(ids.len() as u64);
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

    /// Removes untagged versions and unreferenced chunks older than the cutoff (see the module
    /// docs for the protocol that makes this safe while imports run).
    pub fn gc(&self, grace: Duration) -> Result<GcReport> {
        self.gc_at(SystemTime::now(), grace)
    }

    /// [`Repository::gc`] as if the time were `now` (time is an input, so tests and tools can
    /// look at the repository from the future instead of waiting).
    pub fn gc_at(&self, now: SystemTime, grace: Duration) -> Result<GcReport> {
        let started = Instant::now();
        let mut report = GcReport::default();
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
        let mut live: HashSet<ChunkId> = HashSet::new();
        let mut doomed_manifests = Vec::new();
        for (key, meta) in self.backend.list("manifests/")? {
            let Some(id) = key
                .strip_prefix("manifests/")
                .and_then(|k| k.strip_suffix(".json"))
            else {
                continue;
            };
            if tagged.contains_key(id) || meta.modified >= cutoff {
                report.live_manifests += 1;
                // A damaged live manifest must stop GC: its chunks cannot be marked.
                let m = self.manifest(id)?;
                live.extend(m.chunks.iter().flatten());
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

#[derive(Debug, Default)]
struct StoredChunks {
    ids: Vec<Option<ChunkId>>,
    /// Chunks that already existed and were only touched, with their index.
    touched: Vec<(usize, ChunkId)>,
    zero_bytes: u64,
    reused: u64,
    new_chunks: u64,
    new_raw_bytes: u64,
    new_stored_bytes: u64,
}

enum ChunkOutcome {
    Zero(usize),
    Reused(ChunkId),
    New(ChunkId, usize, usize),
}

/// A temporary file path that is removed on drop.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn tempfile_in(dir: &Path, what: &str) -> Result<TempPath> {
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let nonce =
        blake3::hash(format!("{:?}{}", SystemTime::now(), std::process::id()).as_bytes()).to_hex();
    Ok(TempPath(
        dir.join(format!(".vmatrix-{what}-{}", &nonce[..12])),
    ))
}

fn convert(src: &Path, dst: &Path, to: &str) -> Result<()> {
    run_qemu_img(&["convert", "-O", to], src, dst)
}

fn convert_to(src: &Path, from: &str, dst: &Path, to: &str) -> Result<()> {
    run_qemu_img(&["convert", "-f", from, "-O", to], src, dst)
}

fn run_qemu_img(args: &[&str], src: &Path, dst: &Path) -> Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .arg(src)
        .arg(dst)
        .output()
        .map_err(io_err("run qemu-img on", src))?;
    if !out.status.success() {
        return Err(StoreError::Tool {
            tool: "qemu-img",
            path: src.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
