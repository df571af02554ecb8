//! The index: which pack holds each chunk, and where in it. Deduplication consults it, reads
//! go through it.
//!
//! Each writer (an import, a copy, a gc) adds one index file `index/<random id>` naming the
//! packs it wrote, after those packs are durable and before any manifest refers to their
//! chunks. GC folds all index files into one. The in-memory [`Index`] is the union of every
//! index file; a chunk may have several locations (two imports that wrote it at once, or a gc
//! that moved it while a reader still knew the old place), and readers fall back from one to
//! the next. An index file is the packs' own trailers gathered, so it can be rebuilt from them.
//!
//! ```text
//! "VMXI", format 1, three zero bytes, then zstd of:
//!   u32 number of packs, then per pack its 32-byte id
//!   per blob: chunk id (32), pack number u32, offset u32, length u32
//! ```

use std::collections::HashMap;

use crate::backend::Backend;
use crate::chunk::ChunkId;
use crate::error::{Result, StoreError};
use crate::pack::{Entry, PackId, WrittenPack};

const MAGIC: &[u8; 4] = b"VMXI";
const FORMAT: u8 = 1;
const ENTRY: usize = 44;
/// The largest index file we read (uncompressed): ~24 million chunks, 1.5 TiB of stored data.
const MAX_INDEX: usize = 1 << 30;

/// Where one copy of a chunk lives: a pack (by its number in the index) and a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// Index into [`Index::pack`].
    pub pack: u32,
    /// Offset of the stored chunk in the pack.
    pub offset: u32,
    /// Length of the stored chunk.
    pub len: u32,
}

/// Every index file of a repository, merged.
#[derive(Debug, Default, Clone)]
pub struct Index {
    packs: Vec<PackId>,
    slots: HashMap<PackId, u32>,
    primary: HashMap<ChunkId, Loc>,
    /// Further copies of chunks (rare).
    extra: HashMap<ChunkId, Vec<Loc>>,
    /// The index files this was read from.
    pub(crate) files: Vec<String>,
}

/// The index file key for a new file.
fn new_key() -> String {
    format!("index/{}", &PackId::random().to_hex()[..32])
}

/// Encodes an index file for `packs`.
pub(crate) fn encode<'a>(packs: impl IntoIterator<Item = (PackId, &'a [Entry])>) -> Vec<u8> {
    let packs: Vec<(PackId, &[Entry])> = packs.into_iter().collect();
    let blobs: usize = packs.iter().map(|(_, e)| e.len()).sum();
    let mut raw = Vec::with_capacity(4 + packs.len() * 32 + blobs * ENTRY);
    raw.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for (id, _) in &packs {
        raw.extend_from_slice(&id.0);
    }
    for (n, (_, entries)) in packs.iter().enumerate() {
        for e in *entries {
            raw.extend_from_slice(&e.chunk.0);
            raw.extend_from_slice(&(n as u32).to_le_bytes());
            raw.extend_from_slice(&e.offset.to_le_bytes());
            raw.extend_from_slice(&e.len.to_le_bytes());
        }
    }
    let mut out = Vec::with_capacity(raw.len() / 2 + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[FORMAT, 0, 0, 0]);
    out.extend_from_slice(&zstd::bulk::compress(&raw, 3).unwrap_or_default());
    out
}

/// Writes an index file naming `packs` (durably); its key. Nothing is written for no packs.
pub(crate) fn write<'a>(
    backend: &Backend,
    packs: impl IntoIterator<Item = (PackId, &'a [Entry])>,
) -> Result<Option<String>> {
    let packs: Vec<(PackId, &[Entry])> = packs.into_iter().collect();
    if packs.is_empty() {
        return Ok(None);
    }
    let key = new_key();
    backend.put_durable(&key, &encode(packs))?;
    Ok(Some(key))
}

/// An index file's entries for `written` packs.
pub(crate) fn of(written: &[WrittenPack]) -> impl Iterator<Item = (PackId, &[Entry])> {
    written.iter().map(|p| (p.id, &p.entries[..]))
}

fn decode(key: &str, bytes: &[u8]) -> Result<Vec<(PackId, Vec<Entry>)>> {
    let corrupt = |reason: String| StoreError::Corrupt {
        what: format!("index file {key}"),
        reason,
    };
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(corrupt("no index header".into()));
    }
    if bytes[4] != FORMAT {
        return Err(corrupt(format!("unknown index format {}", bytes[4])));
    }
    let raw = zstd::bulk::decompress(&bytes[8..], MAX_INDEX).map_err(|e| corrupt(e.to_string()))?;
    if raw.len() < 4 {
        return Err(corrupt("too short".into()));
    }
    let n = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes")) as usize;
    let ids_end = 4 + n * 32;
    if raw.len() < ids_end || !(raw.len() - ids_end).is_multiple_of(ENTRY) {
        return Err(corrupt("odd length".into()));
    }
    let mut packs: Vec<(PackId, Vec<Entry>)> = raw[4..ids_end]
        .chunks_exact(32)
        .map(|b| (PackId(b.try_into().expect("32 bytes")), Vec::new()))
        .collect();
    for e in raw[ids_end..].chunks_exact(ENTRY) {
        let pack = u32::from_le_bytes(e[32..36].try_into().expect("4 bytes")) as usize;
        let entry = Entry {
            chunk: ChunkId(e[..32].try_into().expect("32 bytes")),
            offset: u32::from_le_bytes(e[36..40].try_into().expect("4 bytes")),
            len: u32::from_le_bytes(e[40..44].try_into().expect("4 bytes")),
        };
        packs
            .get_mut(pack)
            .ok_or_else(|| corrupt(format!("pack number {pack} of {n}")))?
            .1
            .push(entry);
    }
    Ok(packs)
}

impl Index {
    /// Reads every index file of the repository. A file removed between the listing and the
    /// read (a gc folding files) is skipped: gc writes the file that replaces it first.
    pub fn load(backend: &Backend) -> Result<Self> {
        let mut index = Self::default();
        for (key, _) in backend.list("index/")? {
            let Some(bytes) = backend.get(&key)? else {
                continue;
            };
            for (pack, entries) in decode(&key, &bytes)? {
                index.add(pack, &entries);
            }
            index.files.push(key);
        }
        Ok(index)
    }

    /// Adds a pack's blobs.
    pub fn add(&mut self, pack: PackId, entries: &[Entry]) {
        let slot = match self.slots.get(&pack) {
            Some(&s) => s,
            None => {
                let s = self.packs.len() as u32;
                self.packs.push(pack);
                self.slots.insert(pack, s);
                s
            }
        };
        for e in entries {
            let loc = Loc {
                pack: slot,
                offset: e.offset,
                len: e.len,
            };
            match self.primary.get(&e.chunk) {
                None => {
                    self.primary.insert(e.chunk, loc);
                }
                Some(&p) if p == loc => {}
                Some(_) => {
                    let more = self.extra.entry(e.chunk).or_default();
                    if !more.contains(&loc) {
                        more.push(loc);
                    }
                }
            }
        }
    }

    /// The pack numbered `slot`.
    pub fn pack(&self, slot: u32) -> PackId {
        self.packs[slot as usize]
    }

    /// The first known location of `chunk`.
    pub fn first(&self, chunk: &ChunkId) -> Option<Loc> {
        self.primary.get(chunk).copied()
    }

    /// Every known location of `chunk`, the first first.
    pub fn locations(&self, chunk: &ChunkId) -> Vec<Loc> {
        let mut out: Vec<Loc> = self.primary.get(chunk).copied().into_iter().collect();
        if let Some(more) = self.extra.get(chunk) {
            out.extend(more);
        }
        out
    }

    /// Whether the index knows `chunk`.
    pub fn contains(&self, chunk: &ChunkId) -> bool {
        self.primary.contains_key(chunk)
    }

    /// Distinct chunks known.
    pub fn chunks(&self) -> usize {
        self.primary.len()
    }

    /// Every pack the index names, with its blobs.
    pub fn by_pack(&self) -> HashMap<PackId, Vec<Entry>> {
        let mut out: HashMap<PackId, Vec<Entry>> = HashMap::new();
        let all = self.primary.iter().map(|(c, l)| (c, *l)).chain(
            self.extra
                .iter()
                .flat_map(|(c, ls)| ls.iter().map(move |l| (c, *l))),
        );
        for (chunk, loc) in all {
            out.entry(self.pack(loc.pack)).or_default().push(Entry {
                chunk: *chunk,
                offset: loc.offset,
                len: loc.len,
            });
        }
        for entries in out.values_mut() {
            entries.sort_by_key(|e| e.offset);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_files_round_trip_and_merge_copies() {
        let (a, b) = (PackId::random(), PackId::random());
        let x = ChunkId::of(b"x");
        let y = ChunkId::of(b"y");
        let ea = vec![
            Entry {
                chunk: x,
                offset: 8,
                len: 10,
            },
            Entry {
                chunk: y,
                offset: 18,
                len: 5,
            },
        ];
        let eb = vec![Entry {
            chunk: x,
            offset: 8,
            len: 10,
        }];
        let bytes = encode([(a, &ea[..]), (b, &eb[..])]);
        let decoded = decode("index/t", &bytes).unwrap();
        assert_eq!(decoded, vec![(a, ea.clone()), (b, eb.clone())]);
        let mut index = Index::default();
        for (p, e) in &decoded {
            index.add(*p, e);
        }
        assert_eq!(index.chunks(), 2);
        let places: Vec<PackId> = index
            .locations(&x)
            .iter()
            .map(|l| index.pack(l.pack))
            .collect();
        assert_eq!(places, vec![a, b], "both copies of x are known");
        assert_eq!(index.by_pack()[&a], ea);
        assert!(decode("index/t", &bytes[..bytes.len() - 1]).is_err());
    }
}
