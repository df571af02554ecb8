//! `vmatrix bench activation`: how long a dormant server takes to answer, by how it is
//! activated — lazily (QEMU boots from the repository over NBD, fetching only the chunks it
//! reads) against copy-then-boot (the whole image written out, then booted), for a big image
//! and a 64 MiB one. Both sides in-process with the repository open, timed the same way (from
//! the start of the activation to the guest's first HTTP answer), the methods alternated in
//! every run, the page cache dropped before each (a dormant image is not in memory).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vmatrix_core::{ImageRef, InstanceId};
use vmatrix_store::{cache::ChunkCache, nbd, Repository};
use vmatrix_vmm::{AccelChoice, Vm, VmSpec};

use crate::bench::free_addr;
use crate::bench_stats::{drop_page_cache, secs, section, table, Runs};

/// Options of `vmatrix bench activation`.
#[derive(Debug, Clone, clap::Args)]
pub struct ActivationBench {
    /// Size of the big image.
    #[arg(long, default_value = "4G", value_parser = vmatrix_core::volume::parse_size)]
    pub size: u64,
    /// Runs of each method.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where to keep the images and the repository (the guests are cached there).
    #[arg(long, default_value = "/tmp")]
    pub work: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    LazySmall,
    LazyBig,
    CopyBig,
}

impl Method {
    const ALL: [Method; 3] = [Method::LazySmall, Method::LazyBig, Method::CopyBig];

    fn label(self, big_mib: u64) -> String {
        match self {
            Method::LazySmall => "lazy (NBD from the repository), 64 MiB image".into(),
            Method::LazyBig => format!("lazy (NBD from the repository), {big_mib} MiB image"),
            Method::CopyBig => format!("copy-then-boot, {big_mib} MiB image"),
        }
    }

    fn image(self) -> &'static str {
        match self {
            Method::LazySmall => "small:v1",
            Method::LazyBig | Method::CopyBig => "big:v1",
        }
    }
}

/// What one activation took.
#[derive(Default)]
struct Measured {
    to_http: Runs,
    copy: Runs,
    fetched_mib: Runs,
}

pub async fn activation(accel: AccelChoice, b: &ActivationBench) -> Result<()> {
    if b.runs == 0 {
        bail!("--runs 0: give at least 1 (3 for a median and a range)");
    }
    let root = b.work.join("vmatrix-bench-activation");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    eprintln!("building the guests (cached) …");
    let big = vmatrix_guest::build(&vmatrix_guest::BuildOptions {
        size: b.size,
        ..vmatrix_guest::BuildOptions::new(root.join("guest-big.img"))
    })?;
    let small = vmatrix_guest::build(&vmatrix_guest::BuildOptions::new(
        root.join("guest-64m.img"),
    ))?;
    for d in ["repo", "vms", "copy", "cache"] {
        let _ = std::fs::remove_dir_all(root.join(d));
    }
    let repo = Arc::new(Repository::open_or_init(&format!(
        "file://{}",
        root.join("repo").display()
    ))?);
    eprintln!("importing both …");
    let scratch = root.join("tmp");
    for (disk, image) in [(&big.disk, "big:v1"), (&small.disk, "small:v1")] {
        let image = ImageRef::parse(image)?;
        tokio::task::block_in_place(|| repo.import(disk, &image, &scratch, &|_| {}))?;
    }
    let accel = crate::resolve_accel(accel, &small).await;
    let mut results: Vec<(Method, Measured)> = Method::ALL
        .iter()
        .map(|m| (*m, Measured::default()))
        .collect();
    let mut cold = true;
    for run in 0..b.runs {
        // Each method first in turn.
        for k in 0..Method::ALL.len() {
            let method = Method::ALL[(run + k) % Method::ALL.len()];
            cold &= drop_page_cache();
            let (took, copy, fetched) = once(&repo, &root, method, run, accel)
                .await
                .with_context(|| format!("run {}: {}", run + 1, method.label(b.size >> 20)))?;
            eprintln!(
                "run {}/{}: {}: {} to HTTP",
                run + 1,
                b.runs,
                method.label(b.size >> 20),
                secs(took)
            );
            if let Some((_, m)) = results.iter_mut().find(|(x, _)| *x == method) {
                m.to_http.push(took);
                if let Some(c) = copy {
                    m.copy.push(c);
                }
                m.fetched_mib.push(fetched as f64 / 1048576.0);
            }
        }
    }
    for d in ["vms", "copy", "cache"] {
        let _ = std::fs::remove_dir_all(root.join(d));
    }
    let small_median = results[0].1.to_http.median();
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(method, m)| {
            vec![
                method.label(b.size >> 20),
                m.to_http.spread(secs),
                if m.copy.count() > 0 {
                    m.copy.spread(secs)
                } else {
                    "–".into()
                },
                m.fetched_mib.spread(|x| format!("{x:.0} MiB")),
                format!("{:.2}×", m.to_http.median() / small_median),
            ]
        })
        .collect();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{}",
        section(
            "Activation: lazy from the repository against copy-then-boot",
            &format!(
                "vmatrix bench activation --size {}M --runs {}",
                b.size >> 20,
                b.runs
            ),
            &format!(
                "both in-process with the repository open (a local file repository on {}), \
                 timed from the start of the activation to the guest's first HTTP answer; the \
                 three methods alternated, each first in turn, {} runs each; page cache {} \
                 before every run. Lazy: a fresh chunk cache, an NBD export, QEMU booting from \
                 it. Copy-then-boot: the image written out by `export_to_boot` (read, \
                 decompressed and written by {workers} threads, one per core, not synced: the \
                 boot does not need it on disk), then QEMU booting from the copy. Accelerator \
                 {}; the guest is the reference guest, its data partition padded with \
                 realistic data to the big size. Median (min–max).",
                b.work.display(),
                b.runs,
                if cold {
                    "dropped"
                } else {
                    "NOT dropped (not root: runs after the first are warm)"
                },
                accel.as_str()
            )
        )
    );
    println!(
        "{}",
        table(
            &[
                "activation",
                "start → first HTTP answer",
                "of which the copy",
                "brought from the repository (lazy: fetched; copy: written)",
                "÷ lazy 64 MiB",
            ],
            &rows
        )
    );
    println!(
        "- Lazy activation reads what the boot touches, so its time does not grow with the \
         image; copy-then-boot pays for every byte first.\n"
    );
    Ok(())
}

/// One activation by `method`: (seconds to the first HTTP answer, seconds of copying, bytes
/// read from the repository).
async fn once(
    repo: &Arc<Repository>,
    root: &Path,
    method: Method,
    run: usize,
    accel: vmatrix_vmm::Accelerator,
) -> Result<(f64, Option<f64>, u64)> {
    let image = ImageRef::parse(method.image())?;
    let vm_dir = root.join("vms").join(format!("{method:?}-{run}"));
    let id = InstanceId::new(format!(
        "bench-{}-{run}",
        format!("{method:?}").to_lowercase()
    ))?;
    let started = tokio::time::Instant::now();
    let result = match method {
        Method::LazySmall | Method::LazyBig => {
            let cache_dir = root.join("cache").join(format!("{method:?}-{run}"));
            let (_, manifest) = repo.resolve(&image)?;
            let cache = Arc::new(ChunkCache::new(repo.clone(), &cache_dir, 8 << 30)?);
            let export = nbd::Export::new("disk", manifest, cache.clone());
            let server = nbd::NbdServer::start(export, &cache_dir.join("nbd.sock"))?;
            let spec = VmSpec::new(
                id,
                vmatrix_vmm::BaseImage::Nbd {
                    url: server.url("disk"),
                },
                free_addr()?,
                accel,
            );
            let mut vm = Vm::boot(spec, vm_dir.clone()).await?;
            let ready = vm.wait_ready(Duration::from_secs(180)).await;
            let took = started.elapsed().as_secs_f64();
            vm.kill().await;
            drop(server);
            ready?;
            let fetched = cache
                .stats
                .fetched_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            let _ = std::fs::remove_dir_all(&cache_dir);
            (took, None, fetched)
        }
        Method::CopyBig => {
            let copy = root.join("copy").join(format!("big-{run}.raw"));
            std::fs::create_dir_all(root.join("copy"))?;
            let written =
                tokio::task::block_in_place(|| repo.export_to_boot(&image, &copy, &|_| {}))?;
            let copied = started.elapsed().as_secs_f64();
            let spec = VmSpec::new(id, &copy, free_addr()?, accel);
            let mut vm = Vm::boot(spec, vm_dir.clone()).await?;
            let ready = vm.wait_ready(Duration::from_secs(180)).await;
            let took = started.elapsed().as_secs_f64();
            vm.kill().await;
            ready?;
            let _ = std::fs::remove_file(&copy);
            (took, Some(copied), written)
        }
    };
    let _ = std::fs::remove_dir_all(&vm_dir);
    Ok(result)
}
