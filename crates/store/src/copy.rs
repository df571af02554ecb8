//! Copying a version between repositories (`vmatrix image push`/`pull`):
//! [`Repository::copy_from`] transfers only the chunks the destination lacks, under a lease in
//! the destination, and publishes the identical manifest (same bytes, same id) under the same
//! tag; [`CopyReport`] says what it moved.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use vmatrix_core::ImageRef;

use crate::chunk::{self, ChunkId};
use crate::error::{Result, StoreError};
use crate::manifest::Manifest;
use crate::repo::{Progress, Repository};

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
}
