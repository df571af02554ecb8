//! The dormant repository: server VM images stored once, shared between images and versions,
//! checked end to end. Disks are cut into fixed 64 KiB chunks addressed by BLAKE3, all-zero
//! chunks cost nothing, the rest is compressed with zstd on all cores. A version is an immutable
//! manifest named by its own hash; tags move.
//!
//! Guarantees: a manifest is published only after every chunk it names is durable, so a crash at
//! any moment leaves a repository that verifies clean; GC never removes what a tagged version or a
//! running import needs (protocol in [`repo`]). This crate must never modify a published object,
//! and never decide which image runs where.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod cache;
pub mod chunk;
pub mod error;
pub mod manifest;
pub mod nbd;
pub mod repo;
pub mod s3;

pub use backend::Backend;
pub use error::{Result, StoreError};
pub use repo::{
    CopyReport, ExportFormat, GcReport, ImageEntry, ImportReport, Repository, VerifyReport,
};
