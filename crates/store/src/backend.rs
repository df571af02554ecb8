//! Where repository objects live. Objects are immutable byte strings under `/`-separated keys;
//! a put is atomic (readers see the old object, or none, or the whole new one).
//!
//! `file://` is a local directory or a shared mount (NFS: the paper's SAN). Puts write a
//! temporary file and rename it; chunk puts skip the per-file fsync and [`Backend::sync`]
//! makes them durable in one `syncfs` before anything refers to them; manifests and tags are
//! fsynced with their directory (`put_durable`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::time::SystemTime;

use crate::error::{Result, StoreError};

/// Temporary file names, unique within the process.
pub(crate) static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Size and modification time of a stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Bytes.
    pub size: u64,
    /// Last write or touch.
    pub modified: SystemTime,
}

/// A repository backend.
#[derive(Debug)]
pub enum Backend {
    /// A local or mounted directory.
    File(FileBackend),
    /// An S3-compatible object store.
    S3(crate::s3::S3Backend),
}

impl Backend {
    /// Opens the backend named by `url` (`file:///absolute/path` or `s3://bucket/prefix`; for
    /// S3 the endpoint, region and credentials come from the usual `AWS_*` variables).
    pub fn open(url: &str) -> Result<Self> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::BadUrl { url: url.into() });
            }
            return Ok(Self::S3(crate::s3::S3Backend::new(
                bucket,
                prefix.trim_matches('/'),
            )?));
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(StoreError::BadUrl { url: url.into() });
            }
            return Ok(Self::File(FileBackend::new(PathBuf::from(path))));
        }
        Err(StoreError::BadUrl { url: url.into() })
    }

    /// The URL, for messages.
    pub fn location(&self) -> String {
        match self {
            Self::File(f) => format!("file://{}", f.root.display()),
            Self::S3(b) => b.location(),
        }
    }

    /// Reads an object; `None` if it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Self::File(f) => f.get(key),
            Self::S3(b) => b.get(key),
        }
    }

    /// Reads `len` bytes at `offset` of an object (a `pread` here, a ranged GET on S3); `None`
    /// if the object does not exist. A range past the object's end is an error.
    pub fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
        match self {
            Self::File(f) => f.get_range(key, offset, len),
            Self::S3(b) => b.get_range(key, offset, len),
        }
    }

    /// Requests sent to the store so far by this handle (S3 only; 0 for a directory).
    pub fn requests(&self) -> u64 {
        match self {
            Self::File(_) => 0,
            Self::S3(b) => b.requests(),
        }
    }

    /// Writes an object atomically (durable only after [`Backend::sync`]).
    pub fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        match self {
            Self::File(f) => f.put(key, data, false),
            Self::S3(b) => b.put(key, data),
        }
    }

    /// Writes an object atomically and starts making it durable without waiting;
    /// [`Backend::make_durable`] waits. (A PUT on S3 is durable when it returns.)
    pub fn put_soon(&self, key: &str, data: &[u8]) -> Result<()> {
        match self {
            Self::File(f) => f.put_soon(key, data),
            Self::S3(b) => b.put(key, data),
        }
    }

    /// Makes objects written with [`Backend::put_soon`] durable: each file and its directory
    /// synced.
    pub fn make_durable(&self, keys: &[String]) -> Result<()> {
        match self {
            Self::File(f) => f.make_durable(keys),
            Self::S3(_) => Ok(()),
        }
    }

    /// Writes an object atomically and durably.
    pub fn put_durable(&self, key: &str, data: &[u8]) -> Result<()> {
        match self {
            Self::File(f) => f.put(key, data, true),
            Self::S3(b) => b.put(key, data),
        }
    }

    /// Size and time of an object; `None` if it does not exist.
    pub fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        match self {
            Self::File(f) => f.head(key),
            Self::S3(b) => b.head(key),
        }
    }

    /// Every object under `prefix` (a directory-like prefix ending in `/`), with its metadata.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, ObjectMeta)>> {
        match self {
            Self::File(f) => f.list(prefix),
            Self::S3(b) => b.list(prefix),
        }
    }

    /// Deletes an object; deleting a missing object is not an error.
    pub fn delete(&self, key: &str) -> Result<()> {
        match self {
            Self::File(f) => f.delete(key),
            Self::S3(b) => b.delete(key),
        }
    }

    /// Deletes an object only if it was last modified before `cutoff`, deciding on its time
    /// *after* taking it out of reach, so a concurrent [`Backend::touch`] either fails (and the
    /// writer writes the object again) or wins (and the object stays). Returns the size freed.
    pub fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<Option<u64>> {
        match self {
            Self::File(f) => f.delete_if_older(key, cutoff),
            Self::S3(b) => b.delete_if_older(key, cutoff),
        }
    }

    /// Removes temporary files that writers killed mid-write left behind, if older than
    /// `cutoff`; returns how many. (S3 puts leave none.)
    pub fn sweep_temporaries(&self, cutoff: SystemTime) -> Result<u64> {
        match self {
            Self::File(f) => f.sweep_temporaries(cutoff),
            Self::S3(_) => Ok(0),
        }
    }

    /// Puts back the objects that a GC killed mid-delete had moved aside (see
    /// [`FileBackend::put_back_aside`]); returns how many. (S3 deletes move nothing aside.)
    pub fn put_back_aside(&self) -> Result<u64> {
        match self {
            Self::File(f) => f.put_back_aside(),
            Self::S3(_) => Ok(0),
        }
    }

    /// Marks an object as just used (its modification time becomes now); false if missing.
    pub fn touch(&self, key: &str) -> Result<bool> {
        match self {
            Self::File(f) => f.touch(key),
            Self::S3(b) => b.touch(key),
        }
    }

    /// Makes every earlier put durable.
    pub fn sync(&self) -> Result<()> {
        match self {
            Self::File(f) => f.sync(),
            // A successful S3 PUT is durable.
            Self::S3(_) => Ok(()),
        }
    }
}

/// A directory holding one object per file.
#[derive(Debug)]
pub struct FileBackend {
    root: PathBuf,
}

impl FileBackend {
    fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(self.err("use", key, std::io::Error::other("invalid object key")));
        }
        Ok(self.root.join(key))
    }

    fn err(&self, action: &'static str, key: &str, source: std::io::Error) -> StoreError {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return StoreError::Full {
                location: format!("file://{}", self.root.display()),
                action,
                key: key.to_owned(),
            };
        }
        StoreError::Backend {
            location: format!("file://{}", self.root.display()),
            action,
            key: key.to_owned(),
            source,
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(key)?) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("read", key, e)),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let f = match fs::File::open(self.path(key)?) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err("open", key, e)),
        };
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| self.err("read a range of", key, e))?;
        Ok(Some(buf))
    }

    fn put(&self, key: &str, data: &[u8], durable: bool) -> Result<()> {
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        fs::create_dir_all(&dir).map_err(|e| self.err("create directory for", key, e))?;
        // One counter per process: several handles on one repository (agents in one process)
        // must never share a temporary name.
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            if durable {
                f.sync_all()?;
            }
            drop(f);
            fs::rename(&tmp, &path)?;
            if durable {
                fs::File::open(&dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.err("write", key, e)
        })
    }

    /// Writes `data` under `key` (a temporary file renamed into place): with `O_DIRECT` when
    /// `data` is page-aligned whole pages (the data is on the disk when this returns), else
    /// asking the kernel to start writing it out now; either way a later
    /// [`FileBackend::make_durable`] finds little left to wait for.
    fn put_soon(&self, key: &str, data: &[u8]) -> Result<()> {
        use std::os::fd::AsRawFd;
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        fs::create_dir_all(&dir).map_err(|e| self.err("create directory for", key, e))?;
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let direct = || -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(&tmp)?;
            f.write_all(data)
        };
        let write = || -> std::io::Result<()> {
            // Page-aligned, whole pages (a pack): straight to the disk, no copy into the page
            // cache. A file system that refuses O_DIRECT (tmpfs) gets an ordinary write.
            let aligned =
                (data.as_ptr() as usize).is_multiple_of(4096) && data.len().is_multiple_of(4096);
            if !(aligned && direct().is_ok()) {
                let mut f = fs::File::create(&tmp)?;
                f.write_all(data)?;
                // SAFETY: a valid descriptor for the whole call; the range is the whole file.
                // Only a hint: a failure (a file system without it) means no head start.
                unsafe {
                    libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
                }
            }
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.err("write", key, e)
        })
    }

    fn make_durable(&self, keys: &[String]) -> Result<()> {
        let mut dirs = std::collections::BTreeSet::new();
        for key in keys {
            let path = self.path(key)?;
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| self.err("sync", key, e))?;
            dirs.insert(path.parent().unwrap_or(&self.root).to_owned());
        }
        for dir in dirs {
            fs::File::open(&dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| self.err("sync directory of", &dir.display().to_string(), e))?;
        }
        Ok(())
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        match fs::metadata(self.path(key)?) {
            Ok(m) => Ok(Some(meta(&m))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("stat", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, ObjectMeta)>> {
        let mut out = Vec::new();
        let start = self.root.join(prefix.trim_end_matches('/'));
        if !start.exists() {
            return Ok(out);
        }
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = fs::read_dir(&dir).map_err(|e| self.err("list", prefix, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| self.err("list", prefix, e))?;
                let name = entry.file_name();
                if name.to_string_lossy().starts_with(".tmp-") {
                    continue;
                }
                let path = entry.path();
                let m = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(self.err("list", prefix, e)),
                };
                if m.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&self.root) {
                    out.push((rel.to_string_lossy().into_owned(), meta(&m)));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        match fs::remove_file(self.path(key)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<Option<u64>> {
        let path = self.path(key)?;
        let mut aside = path.clone().into_os_string();
        aside.push(format!(".gc-{}", std::process::id()));
        let aside = PathBuf::from(aside);
        match fs::rename(&path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err("move aside", key, e)),
        }
        let m = fs::metadata(&aside).map_err(|e| self.err("stat", key, e))?;
        if meta(&m).modified >= cutoff {
            // Touched since it was listed: a writer relies on it. Put it back (if the writer
            // already wrote it anew, the content is identical).
            fs::rename(&aside, &path).map_err(|e| self.err("restore", key, e))?;
            return Ok(None);
        }
        fs::remove_file(&aside).map_err(|e| self.err("delete", key, e))?;
        Ok(Some(m.len()))
    }

    fn sweep_temporaries(&self, cutoff: SystemTime) -> Result<u64> {
        let mut removed = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() {
                    stack.push(e.path());
                } else if e.file_name().to_string_lossy().starts_with(".tmp-")
                    && meta(&m).modified < cutoff
                    && fs::remove_file(e.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// A GC deletes a pack by moving it aside (`KEY.gc-PID`), checking its time there and
    /// removing it — or putting it back when a writer touched it meanwhile. A GC killed between
    /// those steps leaves the file aside: garbage nothing would ever remove, or worse, a pack
    /// a writer had just come to rely on, missing from its place. Each one whose GC no longer
    /// runs (its pid is gone from this host, or it was moved a minute ago or more — a GC holds
    /// one aside for microseconds) is put back, or removed if its place holds the pack again. What is put back is an ordinary pack
    /// again, removed by this GC if nothing refers to it.
    fn put_back_aside(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut put_back = 0;
        let Ok(dirs) = fs::read_dir(self.root.join("packs")) else {
            return Ok(0);
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for dir in dirs.flatten() {
            let Ok(entries) = fs::read_dir(dir.path()) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some((chunk, pid)) = name.rsplit_once(".gc-") else {
                    continue;
                };
                let alive = pid.parse::<u32>().is_ok_and(|pid| {
                    pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()
                });
                // The time it was moved aside: a rename changes the inode's ctime only.
                let moved_long_ago = e
                    .metadata()
                    .is_ok_and(|m| now.saturating_sub(m.ctime().max(0) as u64) >= 60);
                if alive && !moved_long_ago {
                    continue;
                }
                let place = dir.path().join(chunk);
                let done = if place.exists() {
                    fs::remove_file(e.path())
                } else {
                    fs::rename(e.path(), &place)
                };
                match done {
                    Ok(()) => put_back += 1,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => {
                        return Err(self.err("put back", &format!("packs/{name}"), err));
                    }
                }
            }
        }
        Ok(put_back)
    }

    fn touch(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        match fs::File::options().write(true).open(&path) {
            Ok(f) => {
                f.set_modified(SystemTime::now())
                    .map_err(|e| self.err("touch", key, e))?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err("touch", key, e)),
        }
    }

    fn sync(&self) -> Result<()> {
        let f = fs::File::open(&self.root).map_err(|e| self.err("sync", "", e))?;
        sync_filesystem(&f).map_err(|e| self.err("sync", "", e))
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn meta(m: &fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        size: m.len(),
        modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

fn sync_filesystem(f: &fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs takes a valid open descriptor, which `f` holds for the whole call.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> (tempfile::TempDir, Backend) {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(&format!("file://{}", dir.path().display())).unwrap();
        (dir, b)
    }

    #[test]
    fn put_get_list_delete() {
        let (_d, b) = backend();
        b.put("chunks/ab/abc", b"one").unwrap();
        assert_eq!(b.get_range("chunks/ab/abc", 1, 2).unwrap().unwrap(), b"ne");
        assert!(b.get_range("chunks/ab/abc", 2, 2).is_err(), "past the end");
        assert_eq!(b.get_range("chunks/ab/none", 0, 1).unwrap(), None);
        b.put_durable("tags/web/v1", b"two").unwrap();
        assert_eq!(b.get("chunks/ab/abc").unwrap().unwrap(), b"one");
        assert_eq!(b.get("chunks/ab/none").unwrap(), None);
        let keys: Vec<String> = b
            .list("chunks/")
            .unwrap()
            .into_iter()
            .map(|k| k.0)
            .collect();
        assert_eq!(keys, vec!["chunks/ab/abc".to_string()]);
        assert!(b.touch("chunks/ab/abc").unwrap());
        assert!(!b.touch("chunks/ab/none").unwrap());
        b.delete("chunks/ab/abc").unwrap();
        b.delete("chunks/ab/abc").unwrap();
        assert_eq!(b.head("chunks/ab/abc").unwrap(), None);
        b.sync().unwrap();
    }

    #[test]
    fn refuses_escaping_keys_and_odd_urls() {
        let (_d, b) = backend();
        assert!(b.put("../x", b"").is_err());
        assert!(b.get("a//b").is_err());
        assert!(Backend::open("file://relative").is_err());
        assert!(Backend::open("ftp://x").is_err());
    }
}
