//! `vmatrix image …`: the dormant repository from the command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use vmatrix_core::ImageRef;
use vmatrix_store::{ExportFormat, Repository};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Import a disk image (raw, qcow2, vmdk, vdi, vhdx) as NAME:TAG.
    Import {
        /// NAME:TAG to publish.
        image: String,
        /// The disk image file.
        file: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Pack file size of a repository this import creates (64K to 1G; an existing
        /// repository keeps its own). Larger packs mean fewer objects (S3 requests), smaller
        /// ones less rewriting when gc repacks.
        #[arg(long, default_value = "16M", value_parser = vmatrix_core::volume::parse_size)]
        pack_size: u64,
    },
    /// Write the exact bytes of NAME:TAG to FILE.
    Export {
        /// NAME:TAG.
        image: String,
        /// Output file.
        file: PathBuf,
        /// raw or qcow2.
        #[arg(long, default_value = "raw")]
        format: String,
    },
    /// List tagged images.
    Ls {
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// The history of an image: its tagged versions and what they derive from (commits), with
    /// who made each, when and why; newest first.
    Log {
        /// The image name.
        name: String,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show one image version.
    Show {
        /// NAME:TAG.
        image: String,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Point TARGET (NAME:TAG) at the version SOURCE points at.
    Tag {
        /// Existing NAME:TAG.
        source: String,
        /// New or moved NAME:TAG.
        target: String,
    },
    /// Remove a tag (the data goes at the next gc if nothing else uses it).
    Rm {
        /// NAME:TAG.
        image: String,
    },
    /// Re-read and re-hash every chunk (of one image, or of all); exit 1 if anything is wrong.
    Verify {
        /// NAME:TAG; all images when omitted.
        image: Option<String>,
    },
    /// Copy NAME:TAG to another repository, sending only the chunks it lacks.
    Push {
        /// NAME:TAG.
        image: String,
        /// Destination repository URL (file:///path, a path, or s3://bucket/prefix).
        #[arg(long)]
        to: String,
    },
    /// Copy NAME:TAG from another repository, fetching only the chunks this one lacks.
    Pull {
        /// NAME:TAG.
        image: String,
        /// Source repository URL.
        #[arg(long)]
        from: String,
    },
    /// Export NAME:TAG read-only over NBD, fetching chunks on demand (lazy activation).
    Serve {
        /// NAME:TAG.
        image: String,
        /// Where to listen: unix:/path/to.sock.
        #[arg(long)]
        nbd: String,
        /// Chunk cache directory (default DATA/cache).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Cache size bound, e.g. 2G.
        #[arg(long, default_value = "2G", value_parser = vmatrix_core::volume::parse_size)]
        cache_size: u64,
    },
    /// Remove unreferenced versions and chunks (safe while imports run).
    Gc {
        /// Keep unreferenced objects younger than this many seconds.
        #[arg(long, default_value_t = 3600)]
        grace_seconds: u64,
    },
}

/// `$VMATRIX_REPO`, `--repo`, or `DATA/repo`; a plain path becomes `file://`.
pub fn repo_url(repo: Option<String>, data: &Path) -> Result<String> {
    let raw = match repo {
        Some(r) => r,
        None => return Ok(format!("file://{}", data.join("repo").display())),
    };
    if raw.contains("://") {
        return Ok(raw);
    }
    let path = PathBuf::from(&raw);
    let abs = if path.is_absolute() {
        path
    } else {
        std::env::current_dir()
            .context("reading the current directory")?
            .join(path)
    };
    Ok(format!("file://{}", abs.display()))
}

fn parse_ref(s: &str) -> Result<ImageRef> {
    Ok(ImageRef::parse(s)?)
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn copy(source: &Repository, dest: &Repository, image: &ImageRef) -> Result<()> {
    let (_, m) = source.resolve(image)?;
    let mut unique: Vec<_> = m.chunks.iter().flatten().collect();
    unique.sort();
    unique.dedup();
    let bar = ProgressBar::new(unique.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} chunks eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!(
        "{image}: {} → {}",
        source.backend().location(),
        dest.backend().location()
    ));
    let r = dest.copy_from(source, image, &|n| bar.set_position(n))?;
    bar.finish_and_clear();
    println!(
        "copied {} (version {}): {} of {} chunks sent ({}), the rest already there; {:.2}s",
        r.image,
        &r.version[..16],
        r.copied_chunks,
        r.chunks,
        human(r.copied_bytes),
        r.seconds
    );
    Ok(())
}

pub fn run(cmd: ImageCommand, url: &str, data: &Path) -> Result<()> {
    match cmd {
        ImageCommand::Import {
            image,
            file,
            json,
            pack_size,
        } => {
            let image = parse_ref(&image)?;
            let size = vmatrix_store::repo::inspect(&file)?.virtual_size;
            if !(64 << 10..=1 << 30).contains(&pack_size) {
                anyhow::bail!("--pack-size {pack_size} is out of range: give 64K to 1G");
            }
            let repo = Repository::open_or_init_with(
                vmatrix_store::Backend::open(url)?,
                pack_size as usize,
            )?;
            let bar = bar(size, &format!("importing {image}"));
            let report = repo.import(&file, &image, &data.join("tmp"), &|done| {
                bar.set_position(done)
            })?;
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            if report.published {
                println!(
                    "imported {} as version {}",
                    report.image,
                    &report.version[..16]
                );
            } else {
                println!(
                    "{} is unchanged (version {}); nothing published",
                    report.image,
                    &report.version[..16]
                );
            }
            println!(
                "  logical {}  zero {}  new {} in {} chunks (stored {} in {} pack(s))  reused {} chunks",
                human(report.logical_bytes),
                human(report.zero_bytes),
                human(report.new_raw_bytes),
                report.new_chunks,
                human(report.new_stored_bytes),
                report.new_packs,
                report.reused_chunks
            );
            println!(
                "  dedup {:.2}x  compression {:.2}x  {:.2}s  {}/s",
                report.dedup_ratio(),
                report.compression_ratio(),
                report.seconds,
                human(report.throughput() as u64)
            );
        }
        ImageCommand::Export {
            image,
            file,
            format,
        } => {
            let image = parse_ref(&image)?;
            let format = match format.as_str() {
                "raw" => ExportFormat::Raw,
                "qcow2" => ExportFormat::Qcow2,
                other => bail!("unknown export format {other:?}: use raw or qcow2"),
            };
            let repo = Repository::open(url)?;
            let (_, m) = repo.resolve(&image)?;
            let bar = bar(m.virtual_size, &format!("exporting {image}"));
            let n = repo.export(&image, &file, format, &|done| bar.set_position(done))?;
            bar.finish_and_clear();
            println!("exported {image} to {} ({})", file.display(), human(n));
        }
        ImageCommand::Ls { json } => {
            let repo = Repository::open(url)?;
            let list = repo.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            println!(
                "{:<32} {:<16} {:>10} {:>8}",
                "IMAGE", "VERSION", "SIZE", "CHUNKS"
            );
            for e in list {
                println!(
                    "{:<32} {:<16} {:>10} {:>8}",
                    e.image,
                    &e.version[..16],
                    human(e.virtual_size),
                    e.chunks
                );
            }
        }
        ImageCommand::Log { name, json } => {
            let name = vmatrix_core::ImageName::new(name.as_str())
                .map_err(|e| anyhow::anyhow!("image name {name:?}: {e}"))?;
            let repo = Repository::open(url)?;
            let log = repo.log(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&log)?);
                return Ok(());
            }
            for e in log {
                let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.created);
                let tags = if e.tags.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", e.tags.join(", "))
                };
                println!("version {}{tags}", e.version);
                if let Some(p) = &e.parent {
                    println!("parent  {p}");
                }
                println!("author  {}", e.author.as_deref().unwrap_or("(import)"));
                println!("date    {}", humantime::format_rfc3339_seconds(when));
                println!("made by {}", e.created_by);
                if let Some(m) = &e.message {
                    println!("\n    {m}");
                }
                println!();
            }
        }
        ImageCommand::Show { image, json } => {
            let image = parse_ref(&image)?;
            let repo = Repository::open(url)?;
            let (id, m) = repo.resolve(&image)?;
            if json {
                let mut v = serde_json::to_value(&m)?;
                v["version"] = serde_json::Value::String(id);
                if let Some(o) = v.as_object_mut() {
                    o.remove("chunks");
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let stored = m.chunks.iter().filter(|c| c.is_some()).count();
            println!("image:        {image}");
            println!("version:      {id}");
            println!("kind:         {:?}", m.kind);
            println!(
                "virtual size: {} ({} bytes)",
                human(m.virtual_size),
                m.virtual_size
            );
            if m.fixed_chunks() {
                println!(
                    "chunks:       {} of {} KiB ({} all-zero, not stored)",
                    m.chunks.len(),
                    m.chunk_size / 1024,
                    m.chunks.len() - stored
                );
            } else {
                println!(
                    "chunks:       {} cut by content, {} on average ({} all-zero, not stored)",
                    m.chunks.len(),
                    human(m.virtual_size / m.chunks.len().max(1) as u64),
                    m.chunks.len() - stored
                );
            }
            println!("created:      {} (unix) by {}", m.created, m.created_by);
            println!("parent:       {}", m.parent.as_deref().unwrap_or("-"));
            println!("source:       {}", m.source_format);
        }
        ImageCommand::Tag { source, target } => {
            let (from, to) = (parse_ref(&source)?, parse_ref(&target)?);
            let id = Repository::open(url)?.tag(&from, &to)?;
            println!("{to} -> {}", &id[..16]);
        }
        ImageCommand::Rm { image } => {
            let image = parse_ref(&image)?;
            let id = Repository::open(url)?.remove(&image)?;
            println!(
                "removed tag {image} (version {}; `vmatrix image gc` frees unused data)",
                &id[..16]
            );
        }
        ImageCommand::Verify { image } => {
            let image = image.as_deref().map(parse_ref).transpose()?;
            let repo = Repository::open(url)?;
            let spinner = ProgressBar::new_spinner();
            spinner.set_message("verifying chunks");
            let report = repo.verify(image.as_ref(), &|n| spinner.set_position(n))?;
            spinner.finish_and_clear();
            for (chunk, who) in &report.missing {
                println!("MISSING chunk {chunk} (needed by {})", who.join(", "));
            }
            for (chunk, why, who) in &report.corrupt {
                println!(
                    "CORRUPT chunk {chunk}: {why} (needed by {})",
                    who.join(", ")
                );
            }
            for m in &report.bad_manifests {
                println!("BAD manifest: {m}");
            }
            println!(
                "checked {} version(s), {} chunk(s): {} missing, {} corrupt, {} bad manifest(s)",
                report.manifests,
                report.chunks,
                report.missing.len(),
                report.corrupt.len(),
                report.bad_manifests.len()
            );
            if !report.is_clean() {
                bail!("the repository {url} is damaged; re-import or pull the affected images");
            }
        }
        ImageCommand::Push { image, to } => {
            let image = parse_ref(&image)?;
            let source = Repository::open(url)?;
            let dest = Repository::open_or_init(&repo_url(Some(to), data)?)?;
            copy(&source, &dest, &image)?;
        }
        ImageCommand::Pull { image, from } => {
            let image = parse_ref(&image)?;
            let source = Repository::open(&repo_url(Some(from), data)?)?;
            let dest = Repository::open_or_init(url)?;
            copy(&source, &dest, &image)?;
        }
        ImageCommand::Serve {
            image,
            nbd,
            cache,
            cache_size,
        } => {
            let image = parse_ref(&image)?;
            let Some(socket) = nbd.strip_prefix("unix:") else {
                bail!("--nbd {nbd:?}: use unix:/path/to.sock");
            };
            let repo = std::sync::Arc::new(Repository::open(url)?);
            let (id, manifest) = repo.resolve(&image)?;
            let cache_dir = cache.unwrap_or_else(|| data.join("cache"));
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async {
                let cache = std::sync::Arc::new(vmatrix_store::cache::ChunkCache::new(
                    repo.clone(),
                    &cache_dir,
                    cache_size,
                )?);
                let export = vmatrix_store::nbd::Export::new(
                    image.name.as_str(),
                    manifest,
                    cache.clone(),
                );
                let server = vmatrix_store::nbd::NbdServer::start(export.clone(), Path::new(socket))?;
                println!(
                    "serving {image} (version {}) at {} ; Ctrl-C stops",
                    &id[..16],
                    server.url(image.name.as_str())
                );
                crate::shutdown_signal().await;
                let st = &cache.stats;
                use std::sync::atomic::Ordering::Relaxed;
                println!(
                    "served {} to clients; fetched {} chunks ({}) from the repository; {} cache hits",
                    human(export.served_bytes.load(Relaxed)),
                    st.fetches.load(Relaxed),
                    human(st.fetched_bytes.load(Relaxed)),
                    st.hits.load(Relaxed)
                );
                anyhow::Ok(())
            })?;
        }
        ImageCommand::Gc { grace_seconds } => {
            let repo = Repository::open(url)?;
            let r = repo.gc(Duration::from_secs(grace_seconds))?;
            println!(
                "gc: removed {} version(s) and {} chunk(s), freed {}; {} of {} pack(s) removed, {} of them rewritten ({} of live chunks moved); kept {} version(s) only because running instances use them, {} live and {} young chunk(s); {} writer(s) running; cleaned {} temporary file(s), {} pack(s) a killed GC left aside and {} stale lease(s); {:.2}s",
                r.removed_manifests,
                r.removed_chunks,
                human(r.freed_bytes),
                r.removed_packs,
                r.packs,
                r.repacked_packs,
                human(r.rewritten_bytes),
                r.pinned_manifests,
                r.live_chunks,
                r.young_chunks,
                r.active_leases,
                r.temporaries_removed,
                r.aside_put_back,
                r.stale_leases_removed,
                r.seconds
            );
        }
    }
    Ok(())
}
