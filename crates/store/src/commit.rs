//! Versions made from a running instance (`vmatrix commit`) and an image's history
//! (`vmatrix image log`). A commit stores the instance's whole disk as seen by its guest —
//! its overlay read through its base — so only the chunks the guest changed are new; the
//! manifest records the version it derives from, who committed it, why and when.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vmatrix_core::{ImageName, ImageRef};

use crate::error::{io_err, Result, StoreError};
use crate::import::{ImportReport, Provenance};
use crate::manifest::ManifestKind;
use crate::repo::{Progress, Repository};
use crate::scratch::{convert_to, tempfile_in};

/// One version in an image's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The version id.
    pub version: String,
    /// Tags (`NAME:TAG`) that point at it now.
    pub tags: Vec<String>,
    /// The version it derives from.
    pub parent: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Who committed it (none for an import).
    pub author: Option<String>,
    /// Why.
    pub message: Option<String>,
    /// What made it.
    pub created_by: String,
    /// Virtual size, bytes.
    pub virtual_size: u64,
}

/// What `commit` is told about the new version.
#[derive(Debug, Clone, Copy)]
pub struct CommitInfo<'a> {
    /// The version the instance ran: the new version's parent.
    pub parent: Option<&'a str>,
    /// Who commits.
    pub author: &'a str,
    /// Why.
    pub message: Option<&'a str>,
}

impl Repository {
    /// Publishes `disk` (`raw`, or a `qcow2` overlay read through its backing file) as
    /// `image`, a new version derived from `info.parent`. Only chunks not yet stored are
    /// written. `scratch` holds the raw conversion of a qcow2 overlay while it is read.
    pub fn commit(
        &self,
        disk: &Path,
        format: &str,
        image: &ImageRef,
        info: CommitInfo<'_>,
        scratch: &Path,
        progress: Progress<'_>,
    ) -> Result<ImportReport> {
        let started = Instant::now();
        let _converted;
        let raw = match format {
            "raw" => disk.to_owned(),
            "qcow2" => {
                let tmp = tempfile_in(scratch, "commit")?;
                convert_to(disk, "qcow2", &tmp.0, "raw")?;
                _converted = tmp;
                _converted.0.clone()
            }
            other => {
                return Err(StoreError::BadInput {
                    path: disk.to_owned(),
                    reason: format!("a commit reads raw or qcow2 disks, not {other}"),
                })
            }
        };
        let size = std::fs::metadata(&raw).map_err(io_err("open", &raw))?.len();
        let what = format!("vmatrix commit by {}", info.author);
        self.import_raw(
            &raw,
            size,
            image,
            Provenance {
                kind: ManifestKind::Disk,
                source_format: format,
                what: &what,
                parent: info.parent,
                author: Some(info.author),
                message: info.message,
                ..Provenance::default()
            },
            started,
            progress,
        )
    }

    /// The history of image `name`: every version a tag of it points at and their ancestors,
    /// newest first.
    pub fn log(&self, name: &ImageName) -> Result<Vec<LogEntry>> {
        let mut tags: Vec<(String, String)> = Vec::new();
        for entry in self.list()? {
            if let Ok(i) = ImageRef::parse(&entry.image) {
                if i.name == *name {
                    tags.push((entry.version.clone(), entry.image.clone()));
                }
            }
        }
        if tags.is_empty() {
            return Err(StoreError::NotFound {
                what: format!("image {name} (no tag of it; `vmatrix image ls` lists them)"),
            });
        }
        let mut out: Vec<LogEntry> = Vec::new();
        let mut todo: Vec<String> = tags.iter().map(|(v, _)| v.clone()).collect();
        while let Some(version) = todo.pop() {
            if out.iter().any(|e| e.version == version) {
                continue;
            }
            // A parent collected by gc ends the walk there.
            let Ok(m) = self.manifest(&version) else {
                continue;
            };
            if let Some(p) = &m.parent {
                todo.push(p.clone());
            }
            out.push(LogEntry {
                tags: tags
                    .iter()
                    .filter(|(v, _)| *v == version)
                    .map(|(_, t)| t.clone())
                    .collect(),
                version,
                parent: m.parent,
                created: m.created,
                author: m.author,
                message: m.message,
                created_by: m.created_by,
                virtual_size: m.virtual_size,
            });
        }
        out.sort_by(|a, b| b.created.cmp(&a.created).then(a.version.cmp(&b.version)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_stores_only_the_changed_chunks_and_the_log_follows_its_parents() {
        let dir = tempfile::tempdir().unwrap();
        let repo =
            Repository::open_or_init(&format!("file://{}", dir.path().join("repo").display()))
                .unwrap();
        let v1_disk = dir.path().join("v1.raw");
        let mut bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&v1_disk, &bytes).unwrap();
        let v1 = ImageRef::parse("web:v1").unwrap();
        let first = repo
            .commit(
                &v1_disk,
                "raw",
                &v1,
                CommitInfo {
                    parent: None,
                    author: "ann",
                    message: Some("first"),
                },
                dir.path(),
                &|_| {},
            )
            .unwrap();
        // One byte changes: one chunk is new.
        bytes[100_000] ^= 0xff;
        let v2_disk = dir.path().join("v2.raw");
        std::fs::write(&v2_disk, &bytes).unwrap();
        let v2 = ImageRef::parse("web:v2").unwrap();
        let second = repo
            .commit(
                &v2_disk,
                "raw",
                &v2,
                CommitInfo {
                    parent: Some(&first.version),
                    author: "bob",
                    message: Some("patch the page"),
                },
                dir.path(),
                &|_| {},
            )
            .unwrap();
        assert_eq!(second.new_chunks, 1, "{second:?}");
        let log = repo.log(&v1.name).unwrap();
        assert_eq!(log.len(), 2);
        let newest = log.iter().find(|e| e.version == second.version).unwrap();
        assert_eq!(newest.parent.as_deref(), Some(first.version.as_str()));
        assert_eq!(newest.author.as_deref(), Some("bob"));
        assert_eq!(newest.message.as_deref(), Some("patch the page"));
        assert_eq!(newest.tags, vec!["web:v2".to_owned()]);
        assert!(repo.log(&ImageName::new("nothing").unwrap()).is_err());
    }
}
