//! The dormant repository: server VM images stored once, shared between images and versions,
//! checked end to end. Disks are cut into fixed 64 KiB chunks addressed by BLAKE3 (saved states
//! by content), all-zero chunks cost nothing, the rest is compressed with zstd on all cores and
//! appended to pack files ([`pack`]) that an [`index`] maps. A version is an immutable manifest
//! named by its own hash; tags move.
//!
//! Guarantees: a manifest is published only after every chunk it names is durable and indexed,
//! so a crash at any moment leaves a repository that verifies clean; GC never removes what a
//! tagged version or a running import needs, and moves what it repacks before the old pack goes
//! (protocol in [`repo`]). This crate must never modify a published object, and never decide
//! which image runs where.
//!
//! ## Concurrent operations
//!
//! Nothing in the repository takes a lock: operations on one repository (from any number of
//! processes and machines) agree only through leases, object times and the tags gc reads. What
//! that gives, pair by pair ("copy" is [`Repository::copy_from`] as seen from the repository it
//! writes into; the table is symmetric):
//!
//! | | import | copy | export | verify | gc | tag / remove |
//! | --- | --- | --- | --- | --- | --- | --- |
//! | **import** | yes (a) | yes (a) | yes (d) | yes | yes (b) | yes (a) |
//! | **copy** | | yes (a) | yes (d) | yes | yes (c) | yes (a) |
//! | **export** | | | yes | yes | yes (d) | yes (d) |
//! | **verify** | | | | yes | may report false damage (e) | yes (d) |
//! | **gc** | | | | | one at a time (f) | yes (d) |
//! | **tag / remove** | | | | | | yes (a) |
//!
//! - (a) Nothing locks a tag: when import, copy, tag or remove act on one tag at once, the last
//!   tag write wins, and a version that loses its tag is left for gc as in (d). A chunk written
//!   twice (two writers at once) is harmless: two copies in two packs, gc drops the spare.
//! - (b) Import holds a lease for its whole run and touches every pack it reuses a chunk from;
//!   gc's cutoff is at most `min(gc's start, the oldest live lease's start) − grace`, so a pack a
//!   running import relies on is never older than the cutoff, whatever the grace (zero
//!   included). Before it publishes, import looks once for reused packs gc removed in the last
//!   instant and writes their chunks back from its source. A lease older than
//!   [`repo::LEASE_MAX_AGE`] (24 h) counts as a dead writer's and no longer holds the cutoff
//!   back.
//! - (c) Copy holds a lease in the repository it writes into and touches reused packs as import
//!   does, and looks once, without write-back: a pack missing at that look makes it fail with
//!   [`StoreError::ChunkVanished`] (run it again).
//! - (d) Readers hold no lease and touch nothing: export, an NBD export serving chunks its
//!   [`cache::ChunkCache`] does not hold yet, copy reading its source repository, and verify. gc
//!   keeps a version whose tag it lists (a tag removed after that only counts at the next gc) or
//!   whose manifest is younger than the cutoff: published less than `grace` before gc started
//!   (or before the oldest running writer started) — the clock starts at publication, not when
//!   the tag goes. So a reader is safe while its version stays tagged: a chunk gc moved to a new
//!   pack is found there (the reader reads the index again when a pack is gone). Once the version is
//!   untagged (remove, or tag, import or copy moving its tag), a gc may remove its chunks
//!   mid-read: export fails and leaves its output file untouched, copy fails and publishes
//!   nothing, an NBD read fails, verify reports the chunks missing. A reader never gets wrong
//!   bytes: every chunk is checked against its hash.
//! - (e) Verify of the whole repository also checks untagged versions, so one that gc removes
//!   while verify runs is reported as a damaged manifest or missing chunks, as is a version
//!   untagged and collected as in (d); versions that stay tagged are reported truthfully.
//! - (f) Two gc runs lose nothing a single one would keep (deleting a missing object is not an
//!   error), but one with a later cutoff (later start or shorter grace) can remove an untagged
//!   version the other still counts as live; the other then stops with "version … not found"
//!   before it removes any version or chunk.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod cache;
pub mod chunk;
mod commit;
mod copy;
pub mod error;
mod export;
mod gc;
mod import;
pub mod index;
pub mod manifest;
pub mod nbd;
pub mod pack;
mod parallel;
mod pins;
pub mod repo;
pub mod s3;
mod scratch;
mod verify;

pub use backend::Backend;
pub use commit::{CommitInfo, LogEntry};
pub use error::{Result, StoreError};
pub use pins::Pins;
pub use repo::{
    CopyReport, ExportFormat, GcReport, ImageEntry, ImportReport, Repository, VerifyReport,
};
