//! Export: [`Repository::export`] writes the exact bytes of a version to a local file, raw
//! (sparse where chunks are zero) or qcow2 through `qemu-img`, via a temporary file renamed
//! into place at the end; [`ExportFormat`] chooses which. Batches are read, decompressed and
//! written by a thread per core.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use vmatrix_core::ImageRef;

use crate::chunk::ChunkId;
use crate::error::{io_err, Result};
use crate::repo::{Progress, Repository};
use crate::scratch::{convert_to, tempfile_in};

/// Chunks read per batch (4 MiB of image at most).
const EXPORT_BATCH: usize = 64;

/// Export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// Raw bytes (sparse where chunks are zero).
    Raw,
    /// qcow2 via `qemu-img convert`.
    Qcow2,
}

impl Repository {
    /// Writes the exact bytes of `image` to `out` (raw, sparse; or qcow2), atomically and
    /// durably (synced before it is renamed into place).
    pub fn export(
        &self,
        image: &ImageRef,
        out: &Path,
        format: ExportFormat,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let raw_tmp = tempfile_in(dir, "export")?;
        let size = self.write_raw(image, &raw_tmp.0, true, progress)?;
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
        Ok(size)
    }

    /// Writes the exact bytes of `image` to the raw file `out` as fast as it can, not synced:
    /// a copy to boot from at once, not to keep (what copy-then-boot activation does; the
    /// benchmark's baseline).
    pub fn export_to_boot(
        &self,
        image: &ImageRef,
        out: &Path,
        progress: Progress<'_>,
    ) -> Result<u64> {
        self.write_raw(image, out, false, progress)
    }

    /// `image`'s bytes into the raw file `path` (created or truncated), sparse where chunks are
    /// zero, batches read and written by a thread per core; synced if `sync`.
    fn write_raw(
        &self,
        image: &ImageRef,
        path: &Path,
        sync: bool,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let (_, manifest) = self.resolve(image)?;
        let f = fs::File::create(path).map_err(io_err("create", path))?;
        f.set_len(manifest.virtual_size)
            .map_err(io_err("size", path))?;
        // A batch at a time: runs of chunks stored back to back come in one read.
        let stored: Vec<(usize, ChunkId)> = manifest
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, (*c)?)))
            .collect();
        let ranges = manifest.ranges();
        let batches: Vec<&[(usize, ChunkId)]> = stored.chunks(EXPORT_BATCH).collect();
        let done = AtomicU64::new(0);
        crate::parallel::try_each(&batches, crate::parallel::workers(1), |batch| {
            let ids: Vec<ChunkId> = batch.iter().map(|(_, id)| *id).collect();
            let data = self.read_chunks(&ids)?;
            for ((index, _), data) in batch.iter().zip(&data) {
                let (offset, _) = ranges[*index];
                f.write_all_at(data, offset)
                    .map_err(io_err("write", path))?;
                let total =
                    done.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
                progress(total);
            }
            Ok(())
        })?;
        if sync {
            f.sync_all().map_err(io_err("sync", path))?;
        }
        progress(manifest.virtual_size);
        Ok(manifest.virtual_size)
    }
}
