//! Chunks: the unit of storage and deduplication.
//!
//! A chunk is addressed by the BLAKE3 hash of its *uncompressed* bytes, so the address doubles
//! as its checksum. On disk a chunk is a small header and its payload:
//!
//! ```text
//! offset 0  "VMXC"            magic
//!        4  1                 format version
//!        5  0 | 1             payload encoding: 0 stored, 1 zstd
//!        6  u32 little-endian uncompressed length
//!       10  payload
//! ```
//!
//! Incompressible data is stored as is rather than growing under zstd.

use std::fmt;

use crate::error::{Result, StoreError};

/// Fixed chunk size for disk images. Disks keep data at fixed offsets, so fixed, block-aligned
/// chunks dedup versions of a disk far better than content-defined chunking (see
/// docs/architecture.md for the measurements); 64 KiB is also QEMU's qcow2 cluster size.
pub const CHUNK_SIZE: usize = 64 * 1024;
/// Largest uncompressed chunk we accept when reading (a bound before validation).
pub const MAX_CHUNK: usize = 16 * 1024 * 1024;
const MAGIC: &[u8; 4] = b"VMXC";
const FORMAT: u8 = 1;
const HEADER: usize = 10;
/// zstd level: fast enough that compression on all cores keeps up with the disk.
const ZSTD_LEVEL: i32 = 1;

/// A chunk's address: the BLAKE3 hash of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The address of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s).ok().map(|h| Self(*h.as_bytes()))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Whether every byte is zero (such chunks are not stored at all).
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

thread_local! {
    /// One compression context per thread: making one per chunk cost ~8% of an import.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());
}

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
}

/// Encodes `data` into its stored form (header + payload).
pub fn encode(data: &[u8]) -> Vec<u8> {
    let compressed = COMPRESSOR.with(|c| match c.borrow_mut().as_mut() {
        Some(c) => c.compress(data).ok(),
        None => zstd::bulk::compress(data, ZSTD_LEVEL).ok(),
    });
    let (encoding, payload) = match compressed {
        Some(c) if c.len() < data.len() => (1u8, c),
        _ => (0u8, data.to_vec()),
    };
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.push(encoding);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a stored chunk and checks it against its address.
pub fn decode(id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>> {
    let corrupt = |reason: String| StoreError::Corrupt {
        what: format!("chunk {id}"),
        reason,
    };
    if stored.len() < HEADER || &stored[..4] != MAGIC {
        return Err(corrupt("no chunk header".into()));
    }
    if stored[4] != FORMAT {
        return Err(corrupt(format!("unknown chunk format {}", stored[4])));
    }
    let len = u32::from_le_bytes(stored[6..10].try_into().expect("4 bytes")) as usize;
    if len > MAX_CHUNK {
        return Err(corrupt(format!("claims {len} bytes")));
    }
    let payload = &stored[HEADER..];
    let data = match stored[5] {
        0 => payload.to_vec(),
        1 => DECOMPRESSOR
            .with(|d| match d.borrow_mut().as_mut() {
                Some(d) => d.decompress(payload, len),
                None => zstd::bulk::decompress(payload, len),
            })
            .map_err(|e| corrupt(format!("zstd: {e}")))?,
        e => return Err(corrupt(format!("unknown encoding {e}"))),
    };
    if data.len() != len {
        return Err(corrupt(format!("{} bytes, header says {len}", data.len())));
    }
    if ChunkId::of(&data) != *id {
        return Err(corrupt("content does not match its hash".into()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_compressible_and_random_data() {
        let text = b"hello hello hello hello hello hello".repeat(100);
        let mut random = vec![0u8; 4096];
        blake3::Hasher::new().finalize_xof().fill(&mut random);
        for data in [&text[..], &random[..]] {
            let id = ChunkId::of(data);
            let stored = encode(data);
            assert_eq!(decode(&id, &stored).unwrap(), data);
        }
        assert!(encode(&text).len() < text.len(), "text compresses");
        assert_eq!(encode(&random)[5], 0, "random data is stored as is");
    }

    #[test]
    fn detects_damage() {
        let data = b"some chunk data".repeat(50);
        let id = ChunkId::of(&data);
        let mut stored = encode(&data);
        let last = stored.len() - 1;
        stored[last] ^= 0xff;
        assert!(decode(&id, &stored).is_err());
        assert!(decode(&id, b"VMXC").is_err());
        let other = ChunkId::of(b"other");
        assert!(decode(&other, &encode(&data)).is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 65536]));
        assert!(is_zero(&[0u8; 13]));
        let mut d = vec![0u8; 65536];
        d[65535] = 1;
        assert!(!is_zero(&d));
        d[65535] = 0;
        d[3] = 1;
        assert!(!is_zero(&d));
    }
}
