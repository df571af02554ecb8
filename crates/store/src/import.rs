//! Import: a disk image (any format `qemu-img` reads, converted to raw first) or a saved VM
//! state is cut into chunks on all cores, new chunks are compressed and written, chunks already
//! in the repository are touched, and the version is published under its tag once every chunk
//! is durable. Holds [`Repository::import`], [`Repository::import_state`] and the shared
//! `import_raw` path with its publish/write-back steps (the writer's half of the protocol in
//! [`crate::repo`]), [`ImportReport`], and [`inspect`], which says what a source file is.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmatrix_core::ImageRef;

use crate::chunk::{self, ChunkId, CHUNK_SIZE};
use crate::error::{io_err, Result, StoreError};
use crate::manifest::{Boot, Manifest, ManifestKind, MANIFEST_FORMAT, MANIFEST_VERSION};
use crate::repo::{host_name, unix_now, Progress, Repository};
use crate::scratch::{convert, tempfile_in};

/// Where a stored version comes from: recorded in its manifest.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Provenance<'a> {
    pub(crate) kind: ManifestKind,
    pub(crate) source_format: &'a str,
    /// What made it (`created_by`).
    pub(crate) what: &'a str,
    /// A saved overlay's base version.
    pub(crate) base: Option<&'a str>,
    /// The version it derives from (default: the one the tag pointed at).
    pub(crate) parent: Option<&'a str>,
    /// Who made it.
    pub(crate) author: Option<&'a str>,
    /// Why.
    pub(crate) message: Option<&'a str>,
}

impl Default for Provenance<'_> {
    fn default() -> Self {
        Self {
            kind: ManifestKind::Disk,
            source_format: "raw",
            what: "",
            base: None,
            parent: None,
            author: None,
            message: None,
        }
    }
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
            Provenance {
                kind: ManifestKind::Disk,
                source_format: &source.format,
                what: &format!("vmatrix image import {}", path.display()),
                ..Provenance::default()
            },
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
        self.import_state_over(path, image, None, progress)
    }

    /// [`Repository::import_state`] for a suspended instance's disk overlay whose backing file
    /// reads version `base`: the manifest names it, and GC keeps `base` as long as this lives.
    pub fn import_state_over(
        &self,
        path: &Path,
        image: &ImageRef,
        base: Option<&str>,
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
            Provenance {
                kind: ManifestKind::State,
                source_format: "qemu-migration-stream",
                what: &format!("saved state {}", path.display()),
                base,
                ..Provenance::default()
            },
            started,
            progress,
        )
    }

    pub(crate) fn import_raw(
        &self,
        raw_path: &Path,
        size: u64,
        image: &ImageRef,
        from: Provenance<'_>,
        started: Instant,
        progress: Progress<'_>,
    ) -> Result<ImportReport> {
        let Provenance {
            kind,
            source_format,
            what,
            base,
            parent,
            author,
            message,
        } = from;
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
            if old.chunks == chunks.ids
                && old.virtual_size == size
                && old.kind == kind
                && old.base.as_deref() == base
            {
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
            parent: match parent {
                Some(p) => Some(p.to_owned()),
                None => previous.map(|(id, _)| id),
            },
            author: author.map(str::to_owned),
            message: message.map(str::to_owned),
            virtual_size: size,
            chunk_size: CHUNK_SIZE as u32,
            boot: Boot::Bios,
            source_format: source_format.to_owned(),
            chunks: chunks.ids,
            base: base.map(str::to_owned),
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

    pub(crate) fn missing_of(&self, chunks: &[(usize, ChunkId)]) -> Result<Vec<(usize, ChunkId)>> {
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
