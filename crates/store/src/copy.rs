//! Copying a version between repositories (`vmatrix image push`/`pull`):
//! [`Repository::copy_from`] transfers only the chunks the destination lacks, under a lease in
//! the destination, and publishes the identical manifest (same bytes, same id) under the same
//! tag; [`CopyReport`] says what it moved.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use vmatrix_core::ImageRef;

use crate::chunk::ChunkId;
use crate::error::{Result, StoreError};
use crate::import::Relied;
use crate::index;
use crate::manifest::Manifest;
use crate::repo::{Progress, Repository, Touched};

/// Chunks a copy worker takes at a time (read from the source in runs).
const BATCH: usize = 64;

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

impl Repository {
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
        // Read the source in the order it stores them: long ranged reads.
        source.in_storage_order(&mut unique)?;
        let dest_index = self.reload_index()?;
        let writer = self.pack_writer();
        let touched = Touched::default();
        let relied: Mutex<Vec<Relied>> = Mutex::new(Vec::new());
        let done = AtomicU64::new(0);
        let copied = AtomicU64::new(0);
        let bytes = AtomicU64::new(0);
        let batches: Vec<&[ChunkId]> = unique.chunks(BATCH).collect();
        // Twice the cores: the threads mostly wait on the stores.
        crate::parallel::try_each(&batches, crate::parallel::workers(2), |batch| {
            let mut lacking = Vec::new();
            for chunk in *batch {
                if let Some(loc) = dest_index.first(chunk) {
                    let pack = dest_index.pack(loc.pack);
                    if self.rely_on(&touched, loc.pack, &pack)? {
                        if let Ok(mut r) = relied.lock() {
                            r.push(Relied {
                                index: 0,
                                chunk: *chunk,
                                pack,
                            });
                        }
                        continue;
                    }
                }
                lacking.push(*chunk);
            }
            // Checked against their ids as they are read: never spread damage.
            let stored = source.read_stored_many(&lacking)?;
            for (chunk, blob) in lacking.iter().zip(&stored) {
                writer.add(*chunk, blob)?;
                copied.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(blob.len() as u64, Ordering::Relaxed);
            }
            progress(done.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64);
            Ok(())
        })?;
        let packs = writer.finish()?;
        index::write(&self.backend, index::of(&packs))?;
        self.learn(&packs);
        // Everything is in place; a final look guards against a concurrent gc as in import.
        let relied = relied.into_inner().unwrap_or_default();
        if let Some(missing) = self.missing_of(&relied)?.first() {
            return Err(StoreError::ChunkVanished {
                chunk: missing.chunk.to_hex(),
            });
        }
        let (new_id, bytes_m) = manifest.to_stored();
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
}
