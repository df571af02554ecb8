//! A writer for the `newc` cpio format the kernel unpacks as an initramfs. Written here rather
//! than driving the `cpio` tool so that the archive can hold a `/dev/console` device node
//! without root or `mknod`, and so that the bytes are reproducible (fixed owners and times).

use std::io::{self, Write};

/// Appends entries to an in-memory newc archive.
pub(crate) struct CpioWriter {
    out: Vec<u8>,
    next_inode: u32,
}

const MTIME: u32 = 0;

impl CpioWriter {
    pub(crate) fn new() -> Self {
        Self {
            out: Vec::new(),
            next_inode: 1,
        }
    }

    pub(crate) fn dir(&mut self, path: &str) {
        self.entry(path, 0o040755, &[], (0, 0));
    }

    pub(crate) fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, 0o100000 | mode, data, (0, 0));
    }

    pub(crate) fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, 0o120777, target.as_bytes(), (0, 0));
    }

    pub(crate) fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.entry(path, 0o020000 | mode, &[], (major, minor));
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name_len = path.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.next_inode,
            mode,
            0,
            0,
            1,
            MTIME,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name_len,
            0
        );
        self.next_inode += 1;
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(path.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// Writes the trailer and returns the archive.
    pub(crate) fn finish(mut self, mut sink: impl Write) -> io::Result<()> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        sink.write_all(&self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_headed() {
        let mut w = CpioWriter::new();
        w.dir("bin");
        w.file("init", 0o755, b"#!/bin/sh\n");
        w.symlink("bin/sh", "busybox");
        let mut out = Vec::new();
        w.finish(&mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("070701").count(), 4);
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("#!/bin/sh\n"));
    }
}
