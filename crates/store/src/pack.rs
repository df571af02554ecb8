//! Pack files: chunks are stored appended to packs of about [`PACK_TARGET`] bytes rather than
//! one object each, as restic, borg and kopia do — a 4 GiB image is ~100 objects instead of
//! ~50,000 (each a file create, rename and directory entry, or an S3 PUT).
//!
//! A pack is immutable once written and names itself (a random id); the index
//! ([`crate::index`]) says where each chunk lives. A pack also carries its own table of contents
//! at its end, so the index can always be rebuilt from the packs:
//!
//! ```text
//! offset 0   "VMXP"  magic, then format 1 and three zero bytes
//!        8   blob, blob, …          each a stored chunk (crate::chunk's encoding)
//!            trailer                zstd of n × (chunk id 32 bytes, offset u32, length u32)
//!   end − 8  u32 little-endian      trailer length
//!   end − 4  "VMXT"
//! ```
//!
//! [`PackWriter`] collects blobs from any number of threads and writes each full pack on the
//! thread that filled it, so writing overlaps with the other threads' hashing and compression;
//! the kernel starts putting each pack on disk at once, and [`PackWriter::finish`] waits until
//! all are durable (files and directories synced; an S3 PUT is durable when it returns).

use std::fmt;
use std::sync::Mutex;

use crate::backend::Backend;
use crate::chunk::ChunkId;
use crate::error::{Result, StoreError};

/// Packs are closed once they reach this size (restic's default; large enough that a 4 GiB
/// image is ~100 objects, small enough that gc rewrites little at a time).
pub const PACK_TARGET: usize = 16 * 1024 * 1024;
/// The largest pack size a repository may set (offsets in a pack are 32-bit).
pub const MAX_PACK_SIZE: usize = 1 << 30;
const MAGIC: &[u8; 4] = b"VMXP";
const TRAILER_MAGIC: &[u8; 4] = b"VMXT";
const FORMAT: u8 = 1;
/// Bytes before the first blob.
pub const HEADER: usize = 8;
const ENTRY: usize = 40;

/// A pack's name: 32 random bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 32]);

impl PackId {
    /// A fresh, unique id.
    pub fn random() -> Self {
        Self(*blake3::hash(crate::repo::nonce().as_bytes()).as_bytes())
    }
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s).ok().map(|h| Self(*h.as_bytes()))
    }
    /// The object key: `packs/<first 2 hex digits>/<id>`.
    pub fn key(&self) -> String {
        let hex = self.to_hex();
        format!("packs/{}/{}", &hex[..2], hex)
    }
    /// The id in a pack's key, if it is one.
    pub fn from_key(key: &str) -> Option<Self> {
        key.strip_prefix("packs/")?
            .rsplit('/')
            .next()
            .and_then(Self::from_hex)
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One blob of a pack: the chunk, and where its stored bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The chunk.
    pub chunk: ChunkId,
    /// Offset of its stored bytes in the pack.
    pub offset: u32,
    /// Length of its stored bytes.
    pub len: u32,
}

/// A pack's bytes in memory: page-aligned, and (once finished) a whole number of pages long,
/// so a directory backend can write it with `O_DIRECT`, straight from this buffer to the disk.
pub type PackBytes = aligned_vec::AVec<u8, aligned_vec::ConstAlign<PAGE>>;
const PAGE: usize = 4096;

/// A pack being filled in memory.
#[derive(Debug)]
pub struct PackBuilder {
    buf: PackBytes,
    entries: Vec<Entry>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PackBuilder {
    /// An empty pack.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty pack with room for `bytes` (a full pack's worth: no copying as it grows).
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = PackBytes::with_capacity(PAGE, bytes);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&[FORMAT, 0, 0, 0]);
        Self {
            buf,
            entries: Vec::new(),
        }
    }

    /// Appends a stored chunk.
    pub fn add(&mut self, chunk: ChunkId, stored: &[u8]) {
        self.entries.push(Entry {
            chunk,
            offset: self.buf.len() as u32,
            len: stored.len() as u32,
        });
        self.buf.extend_from_slice(stored);
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pack's bytes (with its trailer, padded before it to a whole number of pages) and
    /// its entries.
    pub fn finish(mut self) -> (PackBytes, Vec<Entry>) {
        let mut toc = Vec::with_capacity(self.entries.len() * ENTRY);
        for e in &self.entries {
            toc.extend_from_slice(&e.chunk.0);
            toc.extend_from_slice(&e.offset.to_le_bytes());
            toc.extend_from_slice(&e.len.to_le_bytes());
        }
        let trailer = zstd::bulk::compress(&toc, 3).unwrap_or(toc);
        let end = self.buf.len() + trailer.len() + 8;
        self.buf
            .resize(self.buf.len() + (PAGE - end % PAGE) % PAGE, 0);
        self.buf.extend_from_slice(&trailer);
        self.buf
            .extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(TRAILER_MAGIC);
        (self.buf, self.entries)
    }
}

/// The entries a pack's trailer lists, read from the pack's last bytes (`tail` holds at least
/// the trailer and the footer; `size` is the pack's size).
pub fn parse_trailer(pack: &PackId, tail: &[u8], size: u64) -> Result<Vec<Entry>> {
    let corrupt = |reason: String| StoreError::Corrupt {
        what: format!("pack {pack}"),
        reason,
    };
    if tail.len() < 8 || &tail[tail.len() - 4..] != TRAILER_MAGIC {
        return Err(corrupt("no pack trailer (cut short?)".into()));
    }
    let n = tail.len();
    let trailer_len = u32::from_le_bytes(tail[n - 8..n - 4].try_into().expect("4 bytes")) as usize;
    if trailer_len + 8 > n {
        return Err(corrupt(format!(
            "trailer of {trailer_len} bytes does not fit"
        )));
    }
    let compressed = &tail[n - 8 - trailer_len..n - 8];
    let toc = zstd::bulk::decompress(compressed, 64 * 1024 * 1024)
        .map_err(|e| corrupt(format!("trailer: {e}")))?;
    if !toc.len().is_multiple_of(ENTRY) {
        return Err(corrupt("trailer of odd length".into()));
    }
    let data_end = size.saturating_sub(8 + trailer_len as u64);
    let mut out = Vec::with_capacity(toc.len() / ENTRY);
    for e in toc.chunks_exact(ENTRY) {
        let entry = Entry {
            chunk: ChunkId(e[..32].try_into().expect("32 bytes")),
            offset: u32::from_le_bytes(e[32..36].try_into().expect("4 bytes")),
            len: u32::from_le_bytes(e[36..40].try_into().expect("4 bytes")),
        };
        if (entry.offset as u64) < HEADER as u64
            || u64::from(entry.offset) + u64::from(entry.len) > data_end
        {
            return Err(corrupt("an entry points outside the pack".into()));
        }
        out.push(entry);
    }
    Ok(out)
}

/// Reads a pack's table of contents from its end (two ranged reads).
pub fn read_trailer(backend: &Backend, pack: &PackId, size: u64) -> Result<Vec<Entry>> {
    let key = pack.key();
    let missing = || StoreError::Corrupt {
        what: format!("pack {pack}"),
        reason: "it vanished while being read".into(),
    };
    if size < (HEADER + 8) as u64 {
        return Err(StoreError::Corrupt {
            what: format!("pack {pack}"),
            reason: format!("{size} bytes is too short"),
        });
    }
    let footer = backend.get_range(&key, size - 8, 8)?.ok_or_else(missing)?;
    let trailer_len = u32::from_le_bytes(footer[..4].try_into().expect("4 bytes")) as u64;
    let want = (trailer_len + 8).min(size - HEADER as u64);
    let tail = backend
        .get_range(&key, size - want, want as usize)?
        .ok_or_else(missing)?;
    parse_trailer(pack, &tail, size)
}

/// Room beyond a pack's target size: its last chunk and its trailer.
const ROOM: usize = 256 * 1024;

/// A pack written, with what it holds.
#[derive(Debug, Clone)]
pub struct WrittenPack {
    /// Its id.
    pub id: PackId,
    /// Its blobs.
    pub entries: Vec<Entry>,
    /// Its size in bytes.
    pub size: u64,
}

/// Collects stored chunks from many threads into packs, writing each full pack on the thread
/// that filled it; durable once [`PackWriter::finish`] returns.
#[derive(Debug)]
pub struct PackWriter<'a> {
    backend: &'a Backend,
    target: usize,
    current: Mutex<PackBuilder>,
    written: Mutex<Vec<WrittenPack>>,
}

impl<'a> PackWriter<'a> {
    /// A writer into `backend` closing packs at `target` bytes.
    pub fn new(backend: &'a Backend, target: usize) -> Self {
        Self {
            backend,
            target,
            current: Mutex::new(PackBuilder::with_capacity(target + ROOM)),
            written: Mutex::new(Vec::new()),
        }
    }

    /// Adds a stored chunk; writes the pack if this fills it.
    pub fn add(&self, chunk: ChunkId, stored: &[u8]) -> Result<()> {
        let full = {
            let mut cur = self.current.lock().map_err(|_| poisoned())?;
            cur.add(chunk, stored);
            if cur.len() >= self.target {
                Some(std::mem::replace(
                    &mut *cur,
                    PackBuilder::with_capacity(self.target + ROOM),
                ))
            } else {
                None
            }
        };
        match full {
            Some(pack) => self.write(pack),
            None => Ok(()),
        }
    }

    fn write(&self, pack: PackBuilder) -> Result<()> {
        if pack.is_empty() {
            return Ok(());
        }
        let id = PackId::random();
        let (bytes, entries) = pack.finish();
        // Written now, its way to the disk started; `finish` waits for all of them at once, so
        // no thread waits on the disk while there is hashing and compressing to do.
        self.backend.put_soon(&id.key(), &bytes)?;
        self.written
            .lock()
            .map_err(|_| poisoned())?
            .push(WrittenPack {
                id,
                entries,
                size: bytes.len() as u64,
            });
        Ok(())
    }

    /// Writes the last, partial pack and waits until every pack is durable; the packs.
    pub fn finish(self) -> Result<Vec<WrittenPack>> {
        let last = std::mem::take(&mut *self.current.lock().map_err(|_| poisoned())?);
        self.write(last)?;
        let written = self.written.into_inner().map_err(|_| poisoned())?;
        let keys: Vec<String> = written.iter().map(|p| p.id.key()).collect();
        self.backend.make_durable(&keys)?;
        Ok(written)
    }
}

fn poisoned() -> StoreError {
    StoreError::Io {
        action: "write a pack (a writer thread panicked)",
        path: "packs".into(),
        source: std::io::Error::other("poisoned lock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk;

    #[test]
    fn a_pack_lists_its_blobs_at_its_end() {
        let mut b = PackBuilder::new();
        let blobs: Vec<Vec<u8>> = (0..5u8)
            .map(|i| chunk::encode(&vec![i; 1000 + i as usize]))
            .collect();
        for (i, blob) in blobs.iter().enumerate() {
            b.add(ChunkId::of(&[i as u8]), blob);
        }
        let (bytes, entries) = b.finish();
        let id = PackId::random();
        let parsed = parse_trailer(&id, &bytes, bytes.len() as u64).unwrap();
        assert_eq!(parsed, entries);
        for (e, blob) in parsed.iter().zip(&blobs) {
            let at = e.offset as usize;
            assert_eq!(&bytes[at..at + e.len as usize], &blob[..]);
        }
        assert_eq!(bytes.len() % 4096, 0, "whole pages");
        assert_eq!(bytes.as_ptr() as usize % 4096, 0, "page-aligned");
        let mut cut = bytes.to_vec();
        cut.truncate(bytes.len() - 3);
        assert!(parse_trailer(&id, &cut, cut.len() as u64).is_err());
        assert_eq!(PackId::from_key(&id.key()), Some(id));
        assert_ne!(PackId::random(), PackId::random());
    }
}
