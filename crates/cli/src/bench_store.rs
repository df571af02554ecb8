//! `vmatrix bench store`'s ingest comparison, measured as a user sees it: whole processes
//! (`vmatrix image import` against `restic backup` and `borg create`, each as its user runs it,
//! durability included), each into a fresh repository on the same file system, the sides
//! alternated with a pause between runs, over several rounds after a warm-up round that is not counted (it also
//! leaves the file system with deletes behind it); medians and ranges; the blocks really used
//! (`du`) beside the logical bytes, and the files written (on S3, one request each).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench_stats::Runs;

/// How the comparison runs.
#[derive(Debug, Clone, Copy)]
pub struct IngestOptions {
    /// Rounds counted (after one warm-up round).
    pub rounds: usize,
    /// Pause before each run (the disk settles: write-back of the last run ends).
    pub pause: Duration,
}

/// Blocks really used, logical bytes and files under `dir`.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    du: u64,
    logical: u64,
    files: u64,
}

fn usage(dir: &Path) -> Usage {
    use std::os::unix::fs::MetadataExt;
    let mut u = Usage::default();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => {
                    u.du += m.blocks() * 512;
                    u.logical += m.len();
                    u.files += 1;
                }
                Err(_) => {}
            }
        }
    }
    u
}

/// One side of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Vmatrix,
    Restic,
    Borg,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Vmatrix => "vmatrix",
            Side::Restic => "restic",
            Side::Borg => "borg",
        }
    }

    /// Installed (restic and borg are Debian packages; a side that is missing is left out).
    fn available(self) -> bool {
        match self {
            Side::Vmatrix => true,
            Side::Restic => crate::bench_stats::tool_version("restic", "version", 1) != "?",
            Side::Borg => crate::bench_stats::tool_version("borg", "--version", 1) != "?",
        }
    }
}

/// What the sides do differently by design, named under the table.
pub const DIFFERENCES: &str = "restic encrypts and authenticates everything (AES-256 and \
    Poly1305) and compresses with zstd in its default `auto` mode, on all cores; borg 1.2 runs \
    unencrypted (`--encryption none`) with `--compression zstd,1`, on one thread (borg 1.x does \
    not compress or hash in parallel); vmatrix does not encrypt (chunks are addressed and checked \
    by their BLAKE3 hash) and compresses with zstd level 1, on all cores. Chunking: vmatrix \
    fixed 64 KiB chunks for disks, restic content-defined (~1 MiB), borg content-defined (~2 MiB)";

/// What one side did in one round: the first version, then the changed one.
#[derive(Debug, Clone, Copy)]
struct Round {
    v1_seconds: f64,
    v2_seconds: f64,
    after_v1: Usage,
    after_v2: Usage,
}

/// Runs `cmd` to its end; its wall time, or its error output.
fn timed(what: &str, cmd: &mut Command) -> Result<f64> {
    let started = Instant::now();
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    let took = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

struct Setup {
    exe: PathBuf,
    root: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
}

impl Setup {
    fn repo(&self, side: Side) -> PathBuf {
        self.root.join(format!("ingest-{}", side.name()))
    }

    fn cache(&self, side: Side) -> PathBuf {
        self.root.join(format!("ingest-{}-cache", side.name()))
    }

    /// A fresh repository for `side` (restic's and borg's made by their `init`, not timed: a
    /// user makes it once), with a fresh cache.
    fn fresh(&self, side: Side) -> Result<()> {
        for d in [self.repo(side), self.cache(side)] {
            if d.exists() {
                std::fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))?;
            }
        }
        match side {
            Side::Vmatrix => {}
            Side::Restic => {
                timed(
                    "restic init",
                    self.restic().args(["init", "--repository-version", "2"]),
                )?;
            }
            Side::Borg => {
                timed(
                    "borg init",
                    self.borg()
                        .args(["init", "--encryption", "none"])
                        .arg(self.repo(side)),
                )?;
            }
        }
        Ok(())
    }

    fn restic(&self) -> Command {
        let mut c = Command::new("restic");
        c.arg("--repo")
            .arg(self.repo(Side::Restic))
            // Its cache on, as a user has it, in the same file system, fresh each round.
            .arg("--cache-dir")
            .arg(self.cache(Side::Restic))
            .arg("--quiet")
            .env("RESTIC_PASSWORD", "vmatrix-bench");
        c
    }

    fn borg(&self) -> Command {
        let mut c = Command::new("borg");
        // Its cache and keys in the same file system, fresh each round; no questions.
        c.env("BORG_BASE_DIR", self.cache(Side::Borg))
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
        c
    }

    /// Stores `image` as version `tag` with `side`, as a whole process: its wall time.
    fn store(&self, side: Side, image: &Path, tag: &str) -> Result<f64> {
        match side {
            Side::Vmatrix => timed(
                "vmatrix image import",
                Command::new(&self.exe)
                    .args(["image", "--repo"])
                    .arg(format!("file://{}", self.repo(side).display()))
                    .args(["import", &format!("big:{tag}")])
                    .arg(image)
                    .env("VMATRIX_LOG", "warn"),
            ),
            Side::Restic => timed("restic backup", self.restic().arg("backup").arg(image)),
            Side::Borg => timed(
                "borg create",
                self.borg()
                    .args(["create", "--compression", "zstd,1"])
                    .arg(format!("{}::{tag}", self.repo(side).display()))
                    .arg(image),
            ),
        }
    }

    fn round(&self, side: Side, pause: Duration) -> Result<Round> {
        self.fresh(side)?;
        // The source in the page cache before every run: borg drops from the cache what it has
        // read (POSIX_FADV_DONTNEED), which left the next side reading from disk.
        warm(&self.v1)?;
        settle(pause);
        let v1_seconds = self.store(side, &self.v1, "v1")?;
        let after_v1 = usage(&self.repo(side));
        warm(&self.v2)?;
        settle(pause);
        let v2_seconds = self.store(side, &self.v2, "v2")?;
        let after_v2 = usage(&self.repo(side));
        Ok(Round {
            v1_seconds,
            v2_seconds,
            after_v1,
            after_v2,
        })
    }
}

/// Writes back what is dirty, then waits `pause`.
fn settle(pause: Duration) {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::thread::sleep(pause);
}

/// Reads `file` once (its pages in the cache for every run alike).
fn warm(file: &Path) -> Result<()> {
    let mut f = std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// The ingest comparison of `v1` (`size` bytes) and `v2` (its changed copy, `changed` bytes
/// differ) under `root`: table rows (measure, one column per side, note) and the sides measured.
pub fn ingest(
    v1: &Path,
    v2: &Path,
    size: u64,
    changed: u64,
    root: &Path,
    opts: IngestOptions,
) -> Result<(Vec<Vec<String>>, Vec<Side>)> {
    let setup = Setup {
        exe: std::env::current_exe().context("finding the vmatrix binary")?,
        root: root.to_owned(),
        v1: v1.to_owned(),
        v2: v2.to_owned(),
    };
    let sides: Vec<Side> = [Side::Vmatrix, Side::Restic, Side::Borg]
        .into_iter()
        .filter(|s| {
            let there = s.available();
            if !there {
                eprintln!("  {} is not installed: left out", s.name());
            }
            there
        })
        .collect();
    let mut results: Vec<(Side, Round)> = Vec::new();
    for round in 0..=opts.rounds {
        // Alternated: each side goes first in turn.
        for k in 0..sides.len() {
            let side = sides[(round + k) % sides.len()];
            eprintln!(
                "  round {round}{}: {} …",
                if round == 0 { " (warm-up)" } else { "" },
                side.name()
            );
            let r = setup.round(side, opts.pause)?;
            eprintln!(
                "    v1 {:.2} s, v2 {:.2} s, du {:.0} MiB",
                r.v1_seconds,
                r.v2_seconds,
                r.after_v1.du as f64 / 1048576.0
            );
            if round > 0 {
                results.push((side, r));
            }
        }
    }
    for side in &sides {
        let _ = std::fs::remove_dir_all(setup.repo(*side));
        let _ = std::fs::remove_dir_all(setup.cache(*side));
    }

    let mib = |b: f64| b / 1048576.0;
    let of = |side: Side, f: &dyn Fn(&Round) -> f64| -> Runs {
        Runs(
            results
                .iter()
                .filter(|(s, _)| *s == side)
                .map(|(_, r)| f(r))
                .collect(),
        )
    };
    let row = |what: String, f: &dyn Fn(&Round) -> f64, fmt: &dyn Fn(f64) -> String, note: &str| {
        let mut r = vec![what];
        r.extend(sides.iter().map(|s| of(*s, f).spread(fmt)));
        r.push(note.to_owned());
        r
    };
    let gib = size as f64 / (1u64 << 30) as f64;
    let tput = |bytes_per_s: f64| format!("{:.0} MiB/s", mib(bytes_per_s));
    let mibs = |b: f64| format!("{:.0} MiB", mib(b));
    let wall = of(Side::Vmatrix, &|r| r.v1_seconds).median();
    let ratios: Vec<String> = sides
        .iter()
        .skip(1)
        .map(|s| {
            format!(
                "{:.2}× {}'s",
                of(*s, &|r| r.v1_seconds).median() / wall,
                s.name()
            )
        })
        .collect();
    let rows = vec![
        row(
            format!("ingest {:.0} MiB: wall time", mib(size as f64)),
            &|r| r.v1_seconds,
            &|s| format!("{s:.2} s"),
            &format!(
                "vmatrix's speed: {}; each ends once its data is on disk",
                ratios.join(", ")
            ),
        ),
        row(
            "ingest: throughput".into(),
            &|r| size as f64 / r.v1_seconds,
            &tput,
            "",
        ),
        row(
            "ingest: disk used (du)".into(),
            &|r| r.after_v1.du as f64,
            &mibs,
            "blocks really used",
        ),
        row(
            "ingest: logical bytes".into(),
            &|r| r.after_v1.logical as f64,
            &mibs,
            "",
        ),
        row(
            "ingest: files written per GiB".into(),
            &|r| r.after_v1.files as f64 / gib,
            &|n| format!("{n:.0}"),
            "each a file create, or an S3 PUT",
        ),
        row(
            format!(
                "v2 with {:.1}% of blocks changed: disk added (du)",
                changed as f64 * 100.0 / size as f64
            ),
            &|r| r.after_v2.du.saturating_sub(r.after_v1.du) as f64,
            &mibs,
            "",
        ),
        row(
            "v2: wall time".into(),
            &|r| r.v2_seconds,
            &|s| format!("{s:.2} s"),
            "",
        ),
    ];
    Ok((rows, sides))
}

/// The s3s-fs binary the tests use: `$VMATRIX_S3S_FS`, or where
/// scripts/install-test-tools.sh puts it.
fn s3s_fs() -> PathBuf {
    if let Ok(p) = std::env::var("VMATRIX_S3S_FS") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/vmatrix/tools/bin/s3s-fs")
}

/// An S3-compatible server on loopback, stopped on drop.
struct S3Server(std::process::Child);

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Requests an import into an S3 repository sends, per GiB imported: `v1` into an empty
/// repository, then `v2`. Counted by the repository's client (every GET, PUT, HEAD, LIST and
/// DELETE), against a real S3-compatible server (s3s-fs) on loopback.
pub fn s3_requests(v1: &Path, v2: &Path, root: &Path) -> Result<Vec<[String; 4]>> {
    use vmatrix_store::backend::Backend;
    use vmatrix_store::s3::{S3Backend, S3Settings};
    let bin = s3s_fs();
    if !bin.is_file() {
        return Ok(vec![[
            "S3: requests per GiB imported".into(),
            "not measured".into(),
            String::new(),
            format!(
                "{} is missing: scripts/install-test-tools.sh installs it",
                bin.display()
            ),
        ]]);
    }
    let dir = root.join("s3");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("images"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (key, secret) = ("vmatrix-bench", "vmatrix-bench-secret");
    let _server = S3Server(
        Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", key, "--secret-key", secret])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("s3s-fs did not listen on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let settings = S3Settings {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".into()),
        access_key_id: Some(key.into()),
        secret_access_key: Some(secret.into()),
    };
    let repo = vmatrix_store::Repository::open_or_init_backend(Backend::S3(
        S3Backend::with_settings("images", "repo", settings)?,
    ))?;
    let mut rows = Vec::new();
    for (file, image, what) in [
        (v1, "big:v1", "S3: requests per GiB, first import"),
        (v2, "big:v2", "S3: requests per GiB, the changed version"),
    ] {
        let r = repo.import(
            file,
            &vmatrix_core::ImageRef::parse(image)?,
            &root.join("tmp"),
            &|_| {},
        )?;
        let gib = r.logical_bytes as f64 / (1u64 << 30) as f64;
        rows.push([
            what.into(),
            format!("{:.0} ({} requests)", r.requests as f64 / gib, r.requests),
            String::new(),
            format!(
                "{} packs written; one object per chunk would have been {} PUTs",
                r.new_packs, r.new_chunks
            ),
        ]);
    }
    drop(repo);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}
