//! Import: a disk image (any format `qemu-img` reads, converted to raw first) or a saved VM
//! state is cut into chunks on all cores, new chunks are compressed and written, chunks already
//! in the repository are touched, and the version is published under its tag once every chunk
//! is durable. Holds [`Repository::import`], [`Repository::import_state`] and the shared
//! `import_raw` path with its publish/write-back steps (the writer's half of the protocol in
//! [`crate::repo`]), [`ImportReport`], and [`inspect`], which says what a source file is.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use serde::Serialize;
use vmatrix_core::ImageRef;

use crate::chunk::{self, ChunkId, CHUNK_SIZE};
use crate::error::{io_err, Result, StoreError};
use crate::index::{self, Index};
use crate::manifest::{Boot, Manifest, ManifestKind, MANIFEST_FORMAT, MANIFEST_VERSION};
use crate::pack::{PackId, PackWriter};
use crate::repo::{host_name, unix_now, Progress, Repository, Touched};
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
    /// Pack files written.
    pub new_packs: u64,
    /// Requests sent to the repository's store (S3; 0 for a directory).
    pub requests: u64,
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
        let requests_before = self.backend.requests();
        let _lease = self.take_lease(&format!("import {image}"))?;
        // Saved states are cut by content (see `Cutting`); disks, and the disk overlays of
        // suspended instances (whose clusters stay in place), at fixed offsets.
        let cutting = if kind == ManifestKind::State && base.is_none() {
            Cutting::ContentDefined
        } else {
            Cutting::Fixed
        };
        let chunks = self.store_chunks(raw_path, size, cutting, progress)?;

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
            new_packs: chunks.new_packs,
            requests: 0,
            seconds: 0.0,
        };
        if let Some((id, old)) = &previous {
            if old.chunks == chunks.ids
                && old.lengths.is_some() == (cutting == Cutting::ContentDefined)
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
            chunk_size: match cutting {
                Cutting::Fixed => CHUNK_SIZE as u32,
                Cutting::ContentDefined => CDC_MAX,
            },
            boot: Boot::Bios,
            source_format: source_format.to_owned(),
            chunks: chunks.ids,
            lengths: (cutting == Cutting::ContentDefined).then_some(chunks.lengths),
            base: base.map(str::to_owned),
        };
        report.version = self.publish(image, &manifest, raw_path, &chunks.touched)?;
        report.published = true;
        report.requests = self.backend.requests() - requests_before;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Makes sure the packs holding the chunks we reused are still there (writing back from
    /// `raw` the chunks of any that a concurrent GC took), then publishes the manifest and
    /// moves the tag. The packs this import wrote are durable already.
    fn publish(
        &self,
        image: &ImageRef,
        manifest: &Manifest,
        raw: &Path,
        touched: &[Relied],
    ) -> Result<String> {
        // One look suffices: gc takes a pack out of reach before it judges its time, so a
        // pack seen here after our touch is one gc will leave (or put back).
        let mut pending: Vec<Relied> = touched.to_vec();
        for round in 0..3 {
            let missing = self.missing_of(&pending)?;
            if missing.is_empty() {
                break;
            }
            if round == 2 {
                return Err(StoreError::ChunkVanished {
                    chunk: missing[0].chunk.to_hex(),
                });
            }
            tracing::info!(
                "{} reused chunk(s) vanished during the import (gc); writing them again",
                missing.len()
            );
            pending = self.write_back(raw, manifest, &missing)?;
        }
        let (id, bytes) = manifest.to_stored();
        self.backend.put_durable(&Manifest::key(&id), &bytes)?;
        self.backend
            .put_durable(&Self::tag_key(image), id.as_bytes())?;
        Ok(id)
    }

    /// The chunks of `relied` whose pack is gone.
    pub(crate) fn missing_of(&self, relied: &[Relied]) -> Result<Vec<Relied>> {
        let mut gone: HashMap<PackId, bool> = HashMap::new();
        let mut missing = Vec::new();
        for r in relied {
            let is_gone = match gone.get(&r.pack) {
                Some(&g) => g,
                None => {
                    let g = self.backend.head(&r.pack.key())?.is_none();
                    gone.insert(r.pack, g);
                    g
                }
            };
            if is_gone {
                missing.push(*r);
            }
        }
        Ok(missing)
    }

    /// Re-reads chunks from the source and writes them again, into new packs; where they are
    /// now.
    fn write_back(
        &self,
        raw: &Path,
        manifest: &Manifest,
        chunks: &[Relied],
    ) -> Result<Vec<Relied>> {
        let f = fs::File::open(raw).map_err(io_err("open", raw))?;
        let writer = self.pack_writer();
        for r in chunks {
            let (offset, len) = manifest.chunk_range(r.index);
            let mut data = vec![0u8; len];
            f.read_exact_at(&mut data, offset)
                .map_err(io_err("read", raw))?;
            if ChunkId::of(&data) != r.chunk {
                return Err(StoreError::BadInput {
                    path: raw.to_owned(),
                    reason: "the file changed while it was being imported; import it again".into(),
                });
            }
            writer.add(r.chunk, &chunk::encode(&data))?;
        }
        let packs = writer.finish()?;
        index::write(&self.backend, index::of(&packs))?;
        self.learn(&packs);
        let mut now_in: HashMap<ChunkId, PackId> = HashMap::new();
        for p in &packs {
            for e in &p.entries {
                now_in.insert(e.chunk, p.id);
            }
        }
        Ok(chunks
            .iter()
            .filter_map(|r| {
                Some(Relied {
                    pack: *now_in.get(&r.chunk)?,
                    ..*r
                })
            })
            .collect())
    }

    /// Cuts `raw` into chunks on all cores: zero chunks are skipped, chunks the index knows
    /// are reused (their pack touched), new ones compressed and appended to packs, each pack
    /// written durably as it fills; then one index file names the new packs.
    fn store_chunks(
        &self,
        raw: &Path,
        size: u64,
        cutting: Cutting,
        progress: Progress<'_>,
    ) -> Result<StoredChunks> {
        // Hashing and compression keep every core busy; one more thread covers the time a
        // worker spends writing a full pack.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
        let (work_tx, work_rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(workers * 4);
        let work_rx = Mutex::new(work_rx);
        let (done_tx, done_rx) = mpsc::channel::<Result<(usize, usize, ChunkOutcome)>>();
        let abort = AtomicBool::new(false);
        let read_bytes = AtomicU64::new(0);
        // Chunks cut, once the reader is through (usize::MAX until then).
        let cut = AtomicUsize::new(usize::MAX);
        let file = fs::File::open(raw).map_err(io_err("open", raw))?;
        // What other writers stored up to now.
        let index = self.reload_index()?;
        let sink = Sink {
            index: &index,
            writer: self.pack_writer(),
            written: Mutex::new(HashSet::new()),
            touched: Touched::default(),
        };

        let stored = std::thread::scope(|scope| {
            let abort = &abort;
            let read_bytes = &read_bytes;
            let cut = &cut;
            let sink = &sink;
            let reader_done = done_tx.clone();
            scope.spawn(move || {
                let sent = cut_chunks(file, size, cutting, |index, buf| {
                    if abort.load(Ordering::Relaxed) {
                        return false;
                    }
                    read_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    work_tx.send((index, buf)).is_ok()
                });
                match sent {
                    Ok(n) => cut.store(n, Ordering::SeqCst),
                    Err(e) => {
                        let _ = reader_done.send(Err(io_err("read", raw)(e)));
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
                    let outcome = self.store_one(&data, sink).map(|o| (index, data.len(), o));
                    if done_tx.send(outcome).is_err() {
                        return;
                    }
                });
            }
            drop(done_tx);

            let mut out = StoredChunks::default();
            let mut received: usize = 0;
            let mut failure = None;
            for result in done_rx.iter() {
                match result {
                    Ok((index, len, outcome)) => {
                        received += 1;
                        if out.ids.len() <= index {
                            out.ids.resize(index + 1, None);
                            out.lengths.resize(index + 1, 0);
                        }
                        out.lengths[index] = len as u32;
                        match outcome {
                            ChunkOutcome::Zero => out.zero_bytes += len as u64,
                            ChunkOutcome::Reused(chunk, pack) => {
                                out.reused += 1;
                                out.touched.push(Relied { index, chunk, pack });
                                out.ids[index] = Some(chunk);
                            }
                            ChunkOutcome::Again(chunk) => {
                                out.reused += 1;
                                out.ids[index] = Some(chunk);
                            }
                            ChunkOutcome::New(id, stored_len) => {
                                out.new_chunks += 1;
                                out.new_raw_bytes += len as u64;
                                out.new_stored_bytes += stored_len as u64;
                                out.ids[index] = Some(id);
                            }
                        }
                        if received.is_multiple_of(64) {
                            progress(read_bytes.load(Ordering::Relaxed));
                        }
                    }
                    Err(e) => {
                        abort.store(true, Ordering::Relaxed);
                        failure.get_or_insert(e);
                    }
                }
            }
            progress(read_bytes.load(Ordering::Relaxed));
            let count = cut.load(Ordering::SeqCst);
            match failure {
                Some(e) => Err(e),
                None if received != count || out.ids.len() != count => Err(StoreError::Io {
                    action: "read all chunks of",
                    path: raw.to_owned(),
                    source: std::io::Error::other(format!("{received} of {count} chunks")),
                }),
                None => Ok(out),
            }
        });
        // On failure the packs written so far stay unreferenced: gc removes them.
        let mut stored = stored?;
        let packs = sink.writer.finish()?;
        index::write(&self.backend, index::of(&packs))?;
        self.learn(&packs);
        stored.new_packs = packs.len() as u64;
        Ok(stored)
    }

    fn store_one(&self, data: &[u8], sink: &Sink<'_>) -> Result<ChunkOutcome> {
        if chunk::is_zero(data) {
            return Ok(ChunkOutcome::Zero);
        }
        let id = ChunkId::of(data);
        if let Some(loc) = sink.index.first(&id) {
            let pack = sink.index.pack(loc.pack);
            if self.rely_on(&sink.touched, loc.pack, &pack)? {
                return Ok(ChunkOutcome::Reused(id, pack));
            }
        }
        if !sink
            .written
            .lock()
            .map(|mut w| w.insert(id))
            .unwrap_or(true)
        {
            return Ok(ChunkOutcome::Again(id));
        }
        let stored = chunk::encode(data);
        sink.writer.add(id, &stored)?;
        Ok(ChunkOutcome::New(id, stored.len()))
    }
}

/// A chunk an import relies on without writing it: where it is in the image, and the pack
/// that holds it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Relied {
    pub(crate) index: usize,
    pub(crate) chunk: ChunkId,
    pub(crate) pack: PackId,
}

/// Where one import's chunks go.
struct Sink<'a> {
    index: &'a Index,
    writer: PackWriter<'a>,
    /// Chunks this import wrote (a chunk met twice is written once).
    written: Mutex<HashSet<ChunkId>>,
    /// Packs touched.
    touched: Touched,
}

#[derive(Debug, Default)]
struct StoredChunks {
    ids: Vec<Option<ChunkId>>,
    /// Each chunk's length.
    lengths: Vec<u32>,
    /// Chunks that already existed, with the packs that hold them.
    touched: Vec<Relied>,
    new_packs: u64,
    zero_bytes: u64,
    reused: u64,
    new_chunks: u64,
    new_raw_bytes: u64,
    new_stored_bytes: u64,
}

enum ChunkOutcome {
    Zero,
    /// Already stored, in this pack.
    Reused(ChunkId, PackId),
    /// Met earlier in this import.
    Again(ChunkId),
    /// Written, and its stored size.
    New(ChunkId, usize),
}

/// How an import cuts its source into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cutting {
    /// [`CHUNK_SIZE`] pieces at fixed offsets: disks keep data in place, and lazy activation
    /// finds a disk offset's chunk by division.
    Fixed,
    /// Content-defined (FastCDC), for saved states: a QEMU migration stream writes each page
    /// behind a header and skips zero pages, so one page turning non-zero shifts everything
    /// after it; content-defined cuts find the same chunks again after the shift.
    ContentDefined,
}

/// Content-defined chunk sizes: at least, on average, at most. Chosen by measurement
/// (docs/architecture.md): small enough that a page dirtied here and there costs little,
/// large enough that a state is a few thousand chunks.
pub(crate) const CDC_MIN: u32 = 4 * 1024;
pub(crate) const CDC_AVG: u32 = 16 * 1024;
pub(crate) const CDC_MAX: u32 = 64 * 1024;

/// Reads `file` (`size` bytes) cut as `cutting` says, handing each chunk with its number to
/// `each` until it says stop; the number of chunks cut.
fn cut_chunks(
    mut file: fs::File,
    size: u64,
    cutting: Cutting,
    mut each: impl FnMut(usize, Vec<u8>) -> bool,
) -> std::io::Result<usize> {
    match cutting {
        Cutting::Fixed => {
            let count = size.div_ceil(CHUNK_SIZE as u64) as usize;
            for index in 0..count {
                let len = (size - index as u64 * CHUNK_SIZE as u64).min(CHUNK_SIZE as u64);
                let mut buf = vec![0u8; len as usize];
                file.read_exact(&mut buf)?;
                if !each(index, buf) {
                    return Ok(index);
                }
            }
            Ok(count)
        }
        Cutting::ContentDefined => {
            let mut index = 0;
            let mut total = 0u64;
            for c in fastcdc::v2020::StreamCDC::new(file, CDC_MIN, CDC_AVG, CDC_MAX) {
                let c = c.map_err(|e| std::io::Error::other(e.to_string()))?;
                total += c.length as u64;
                if !each(index, c.data) {
                    return Ok(index);
                }
                index += 1;
            }
            if total != size {
                return Err(std::io::Error::other(format!(
                    "read {total} bytes, expected {size}: the file changed while it was imported"
                )));
            }
            Ok(index)
        }
    }
}
