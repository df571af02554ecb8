//! Lazy activation with real QEMU: the reference guest, padded to look like a real server disk,
//! boots through the NBD export of its repository image and serves HTTP, while only the blocks
//! it touches are fetched from the repository.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmatrix_core::{ImageRef, InstanceId};
use vmatrix_store::cache::ChunkCache;
use vmatrix_store::nbd::{Export, NbdServer};
use vmatrix_store::Repository;
use vmatrix_vmm::{AccelChoice, BaseImage, ProbeBoot, Vm, VmSpec};

const MIB: u64 = 1024 * 1024;

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn the_guest_boots_through_the_lazy_export_fetching_only_what_it_reads() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest/padded-512m.img");
    let guest = vmatrix_guest::build(&vmatrix_guest::BuildOptions {
        size: 512 * MIB,
        ..vmatrix_guest::BuildOptions::new(out)
    })
    .expect("build the padded guest");
    let dir = tempfile::Builder::new()
        .prefix("vmx-lazy-")
        .tempdir_in("/tmp")
        .unwrap();
    let repo = Arc::new(
        Repository::open_or_init(&format!("file://{}", dir.path().join("repo").display())).unwrap(),
    );
    let image = ImageRef::parse("web:v1").unwrap();
    let import = repo
        .import(&guest.disk, &image, dir.path(), &|_| {})
        .unwrap();
    let (_, manifest) = repo.resolve(&image).unwrap();
    let data_bytes = import.logical_bytes - import.zero_bytes;

    let cache =
        Arc::new(ChunkCache::new(repo.clone(), &dir.path().join("cache"), 256 * MIB).unwrap());
    let export = Export::new("web", manifest, cache.clone());
    let server = NbdServer::start(export.clone(), &dir.path().join("nbd.sock")).unwrap();

    let accel = vmatrix_vmm::accel::resolve(
        AccelChoice::from_env().unwrap(),
        Some(&ProbeBoot {
            kernel: guest.kernel.clone(),
            initrd: guest.initrd.clone(),
        }),
    )
    .await;
    let forward = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let spec = VmSpec::new(
        InstanceId::new("lazy-1").unwrap(),
        BaseImage::Nbd {
            url: server.url("web"),
        },
        forward,
        accel,
    );
    let started = Instant::now();
    let mut vm = Vm::boot(spec, dir.path().join("vm")).await.expect("boot");
    vm.wait_ready(Duration::from_secs(90))
        .await
        .expect("serves HTTP");
    let to_http = started.elapsed();
    let r = vmatrix_vmm::http::request(
        forward,
        "PUT",
        "/disk/k",
        b"written",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "writes go to the overlay");
    let r = vmatrix_vmm::http::request(forward, "GET", "/disk/k", &[], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.body, b"written");

    let fetched = cache.stats.fetched_bytes.load(Ordering::Relaxed);
    let chunks = cache.stats.fetches.load(Ordering::Relaxed);
    eprintln!(
        "lazy boot: HTTP after {:.2}s; fetched {} chunks = {:.1} MiB stored from the repository for an image of {} MiB ({:.1} MiB of non-zero data, {:.1} MiB stored); served {:.1} MiB to QEMU",
        to_http.as_secs_f64(),
        chunks,
        fetched as f64 / MIB as f64,
        import.logical_bytes / MIB,
        data_bytes as f64 / MIB as f64,
        import.new_stored_bytes as f64 / MIB as f64,
        export.served_bytes.load(Ordering::Relaxed) as f64 / MIB as f64,
    );
    assert!(
        chunks > 0,
        "nothing was fetched: the guest did not read its disk through the export"
    );
    assert!(
        fetched * 4 < data_bytes,
        "fetched {fetched} bytes of {data_bytes}: that is not lazy"
    );
    vm.kill().await;
    drop(server);
}
