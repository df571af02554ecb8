//! Export: [`Repository::export`] writes the exact bytes of a version to a local file, raw
//! (sparse where chunks are zero) or qcow2 through `qemu-img`, via a temporary file renamed
//! into place at the end; [`ExportFormat`] chooses which.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

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
            let f = fs::File::create(&raw_tmp.0).map_err(io_err("create", &raw_tmp.0))?;
            f.set_len(manifest.virtual_size)
                .map_err(io_err("size", &raw_tmp.0))?;
            let mut done = 0u64;
            // A batch at a time: runs of chunks stored back to back come in one read.
            let stored: Vec<(usize, ChunkId)> = manifest
                .chunks
                .iter()
                .enumerate()
                .filter_map(|(i, c)| Some((i, (*c)?)))
                .collect();
            let ranges = manifest.ranges();
            for batch in stored.chunks(EXPORT_BATCH) {
                let ids: Vec<ChunkId> = batch.iter().map(|(_, id)| *id).collect();
                let data = self.read_chunks(&ids)?;
                for ((index, _), data) in batch.iter().zip(&data) {
                    let (offset, _) = ranges[*index];
                    f.write_all_at(data, offset)
                        .map_err(io_err("write", &raw_tmp.0))?;
                    done += data.len() as u64;
                }
                progress(done);
            }
            done = manifest.virtual_size;
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
}
