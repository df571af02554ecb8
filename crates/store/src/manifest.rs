//! Manifests: the immutable description of one version of an image.
//!
//! A manifest is JSON, stored compressed under `manifests/<id>.json.zst`, where `<id>` is the
//! BLAKE3 hash of the JSON: the name is its checksum, and a version can never change. Tags
//! (`tags/<name>/<tag>`) hold a version id and move.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vmatrix_core::ImageName;

use crate::chunk::ChunkId;
use crate::error::{Result, StoreError};

/// The `format` field of every manifest.
pub const MANIFEST_FORMAT: &str = "vmatrix-manifest";
/// The version of the manifest format this code writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Largest manifest we read (a 1 TiB image at 64 KiB chunks is ~1.1 GB of JSON; we stop well
/// before that and say so).
pub const MAX_MANIFEST: usize = 512 * 1024 * 1024;

/// What a manifest describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ManifestKind {
    /// A bootable disk image.
    Disk,
    /// A saved memory and device state (from a suspend).
    State,
}

/// How the image boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Boot {
    /// Through the disk's own boot loader.
    #[default]
    Bios,
}

/// One version of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Always [`MANIFEST_VERSION`] for this code.
    pub format_version: u32,
    /// Disk or state.
    pub kind: ManifestKind,
    /// The image name.
    pub name: ImageName,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Who or what made it (command, user, host).
    pub created_by: String,
    /// The version this one replaced under the same tag, if any.
    pub parent: Option<String>,
    /// Size of the virtual disk (or state) in bytes.
    pub virtual_size: u64,
    /// Chunk size in bytes: every chunk but the last has exactly this size — unless
    /// `lengths` is present, when it is the largest a chunk may be.
    pub chunk_size: u32,
    /// Boot settings.
    #[serde(default)]
    pub boot: Boot,
    /// The format of the imported file.
    pub source_format: String,
    /// One entry per chunk: its id, or null for an all-zero chunk (not stored).
    #[serde(serialize_with = "ser_chunks", deserialize_with = "de_chunks")]
    pub chunks: Vec<Option<ChunkId>>,
    /// For a suspended instance's disk overlay: the version its backing file reads (the
    /// instance's base image). GC keeps it as long as this version lives. Absent otherwise (and
    /// in manifests written before it existed, whose ids therefore do not change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Each chunk's length, for content-defined chunks (saved states); absent for fixed
    /// chunks (disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lengths: Option<Vec<u32>>,
    /// Who committed it (`vmatrix commit`); absent for imports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Why (`vmatrix commit --message`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn ser_chunks<S: Serializer>(chunks: &[Option<ChunkId>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(chunks.iter().map(|c| c.map(|id| id.to_hex())))
}

fn de_chunks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Option<ChunkId>>, D::Error> {
    let raw: Vec<Option<String>> = Vec::deserialize(d)?;
    raw.into_iter()
        .map(|c| match c {
            None => Ok(None),
            Some(h) => ChunkId::from_hex(&h)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("bad chunk id {h:?}"))),
        })
        .collect()
}

impl Manifest {
    /// Serialises the manifest and returns its version id with the bytes.
    pub fn to_bytes(&self) -> (String, Vec<u8>) {
        let bytes = serde_json::to_vec(self).expect("a manifest always serialises");
        (blake3::hash(&bytes).to_hex().to_string(), bytes)
    }

    /// Parses and checks a manifest's JSON.
    pub fn from_bytes(id: &str, bytes: &[u8]) -> Result<Self> {
        let corrupt = |reason: String| StoreError::Corrupt {
            what: format!("manifest {id}"),
            reason,
        };
        if bytes.len() > MAX_MANIFEST {
            return Err(corrupt(format!(
                "{} bytes is more than we read",
                bytes.len()
            )));
        }
        if blake3::hash(bytes).to_hex().as_str() != id {
            return Err(corrupt("content does not match its id".into()));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("bad JSON: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(corrupt(format!("format is {:?}", m.format)));
        }
        if m.format_version != MANIFEST_VERSION {
            return Err(corrupt(format!(
                "format version {} is not {MANIFEST_VERSION}: a newer vmatrix wrote it",
                m.format_version
            )));
        }
        if let Some(lengths) = &m.lengths {
            let total: u64 = lengths.iter().map(|&l| u64::from(l)).sum();
            if lengths.len() != m.chunks.len()
                || total != m.virtual_size
                || lengths.iter().any(|&l| l == 0 || l > m.chunk_size)
            {
                return Err(corrupt(format!(
                    "{} chunk lengths for {} chunks, {total} bytes of {}",
                    lengths.len(),
                    m.chunks.len(),
                    m.virtual_size
                )));
            }
            return Ok(m);
        }
        let expected = m.virtual_size.div_ceil(u64::from(m.chunk_size.max(1)));
        if m.chunk_size == 0 || m.chunks.len() as u64 != expected {
            return Err(corrupt(format!(
                "{} chunks for {} bytes of {}-byte chunks",
                m.chunks.len(),
                m.virtual_size,
                m.chunk_size
            )));
        }
        Ok(m)
    }

    /// The object key of a version: its JSON, compressed with zstd (a 4 GiB disk's manifest is
    /// 3.4 MB of JSON, half of it hex digits; 1.7 MB stored).
    pub fn key(id: &str) -> String {
        format!("manifests/{id}.json.zst")
    }

    /// The version id in a manifest's key, if it is one.
    pub fn id_of_key(key: &str) -> Option<&str> {
        key.strip_prefix("manifests/")?.strip_suffix(".json.zst")
    }

    /// The version id and the bytes to store under [`Manifest::key`].
    pub fn to_stored(&self) -> (String, Vec<u8>) {
        let (id, json) = self.to_bytes();
        let stored = zstd::bulk::compress(&json, 3).unwrap_or(json);
        (id, stored)
    }

    /// Parses and checks a manifest as stored under [`Manifest::key`].
    pub fn from_stored(id: &str, stored: &[u8]) -> Result<Self> {
        // zstd's frame magic; JSON starts with '{'.
        if stored.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let json =
                zstd::bulk::decompress(stored, MAX_MANIFEST).map_err(|e| StoreError::Corrupt {
                    what: format!("manifest {id}"),
                    reason: format!("zstd: {e}"),
                })?;
            return Self::from_bytes(id, &json);
        }
        Self::from_bytes(id, stored)
    }

    /// Where each chunk starts, and its length, in order.
    pub fn ranges(&self) -> Vec<(u64, usize)> {
        match &self.lengths {
            Some(lengths) => {
                let mut at = 0;
                lengths
                    .iter()
                    .map(|&l| {
                        let r = (at, l as usize);
                        at += u64::from(l);
                        r
                    })
                    .collect()
            }
            None => (0..self.chunks.len())
                .map(|i| self.chunk_range(i))
                .collect(),
        }
    }

    /// Whether chunk `index` of the image is found by division (fixed-size chunks: disks,
    /// which lazy activation serves).
    pub fn fixed_chunks(&self) -> bool {
        self.lengths.is_none()
    }

    /// Bytes of chunk `index` (the last chunk may be short).
    pub fn chunk_len(&self, index: usize) -> usize {
        self.chunk_range(index).1
    }

    /// Where chunk `index` starts in the image, and its length.
    pub fn chunk_range(&self, index: usize) -> (u64, usize) {
        if let Some(lengths) = &self.lengths {
            let start = lengths[..index.min(lengths.len())]
                .iter()
                .map(|&l| u64::from(l))
                .sum();
            return (start, lengths.get(index).copied().unwrap_or(0) as usize);
        }
        let start = index as u64 * u64::from(self.chunk_size);
        let len = self
            .virtual_size
            .saturating_sub(start)
            .min(u64::from(self.chunk_size));
        (start, len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            lengths: None,
            base: None,
            format: MANIFEST_FORMAT.into(),
            format_version: MANIFEST_VERSION,
            kind: ManifestKind::Disk,
            name: ImageName::new("web").unwrap(),
            created: 1,
            created_by: "test".into(),
            parent: None,
            virtual_size: 65536 + 512,
            chunk_size: 65536,
            boot: Boot::Bios,
            source_format: "raw".into(),
            chunks: vec![Some(ChunkId::of(b"a")), None],
            author: None,
            message: None,
        }
    }

    #[test]
    fn round_trip_and_checksum() {
        let m = sample();
        let (id, bytes) = m.to_bytes();
        assert_eq!(Manifest::from_bytes(&id, &bytes).unwrap(), m);
        let (same, stored) = m.to_stored();
        assert_eq!(same, id, "the id is the JSON's hash, however it is stored");
        assert_eq!(Manifest::from_stored(&id, &stored).unwrap(), m);
        assert_eq!(Manifest::id_of_key(&Manifest::key(&id)), Some(id.as_str()));
        assert_eq!(m.chunk_len(1), 512);
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        assert!(Manifest::from_bytes(&id, &bad).is_err());
    }

    #[test]
    fn refuses_inconsistent_chunk_counts() {
        let mut m = sample();
        m.chunks.pop();
        let (id, bytes) = m.to_bytes();
        let err = Manifest::from_bytes(&id, &bytes).unwrap_err().to_string();
        assert!(err.contains("chunks for"), "{err}");
    }
}
