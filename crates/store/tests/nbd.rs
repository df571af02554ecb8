//! The NBD export against QEMU's own NBD client (`qemu-img`): the exact bytes of the image,
//! under many concurrent requests, through a small cache that must evict as it goes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmatrix_core::ImageRef;
use vmatrix_store::cache::ChunkCache;
use vmatrix_store::nbd::{Export, NbdServer};
use vmatrix_store::Repository;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs qemu-img and qemu-io (real tier)"]
async fn qemu_reads_exactly_the_image_through_the_export() {
    let dir = tempfile::Builder::new()
        .prefix("vmx-nbd-")
        .tempdir_in("/tmp")
        .unwrap();
    let repo = Arc::new(
        Repository::open_or_init(&format!("file://{}", dir.path().join("repo").display())).unwrap(),
    );
    // 16 MiB: random, text and zero regions, and an odd tail.
    let mut disk = vec![0u8; 16 * 1024 * 1024 + 4096];
    for (i, part) in disk.chunks_mut(1 << 20).enumerate() {
        match i % 3 {
            0 => blake3::Hasher::new()
                .update(&[i as u8])
                .finalize_xof()
                .fill(part),
            1 => part
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"vmatrix "[j % 8]),
            _ => {}
        }
    }
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, &disk).unwrap();
    let image = ImageRef::parse("disk:v1").unwrap();
    tokio::task::block_in_place(|| repo.import(&raw, &image, dir.path(), &|_| {})).unwrap();
    let (_, manifest) = repo.resolve(&image).unwrap();

    // A cache of 2 MiB for a 16 MiB image: eviction happens while QEMU reads.
    let cache =
        Arc::new(ChunkCache::new(repo.clone(), &dir.path().join("cache"), 2 << 20).unwrap());
    let export = Export::new("disk", manifest, cache.clone());
    let server = NbdServer::start(export.clone(), &dir.path().join("nbd.sock")).unwrap();
    let url = server.url("disk");

    let out = dir.path().join("copy.raw");
    let convert = tokio::process::Command::new("qemu-img")
        .args(["convert", "-m", "16", "-W", "-f", "raw", "-O", "raw", &url])
        .arg(&out)
        .output()
        .await
        .unwrap();
    assert!(
        convert.status.success(),
        "{}",
        String::from_utf8_lossy(&convert.stderr)
    );
    assert!(
        std::fs::read(&out).unwrap() == disk,
        "qemu-img read different bytes"
    );
    let cmp = tokio::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &url])
        .arg(&raw)
        .output()
        .await
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    // Read-only: QEMU's own client reads through the export (the third MiB is zeros) and is
    // refused a write. qemu-io comes with qemu-img in qemu-utils, which scripts/install-deps.sh
    // installs and checks: without it this test fails, it does not skip.
    let qemu_io = async |args: &[&str]| {
        let out = tokio::process::Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(args)
            .arg(&url)
            .output()
            .await
            .unwrap_or_else(|e| {
                panic!("cannot run qemu-io ({e}): install qemu-utils (scripts/install-deps.sh)")
            });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("qemu-io {args:?}: {}; {}", out.status, text.trim());
        (out.status.success(), text)
    };
    let (ok, read) = qemu_io(&["-r", "-c", "read -P 0 2097152 4096"]).await;
    assert!(
        ok && read.contains("read 4096/4096 bytes"),
        "qemu-io could not read through the export, so a refused write would prove nothing: \
         {read}"
    );
    let (ok, write) = qemu_io(&["-c", "write 0 4096"]).await;
    assert!(
        !ok && !write.contains("wrote") && write.contains("Permission denied"),
        "a write to the read-only export was not refused as such: {write}"
    );
    assert!(cache.stats.evictions.load(Ordering::Relaxed) > 0);
    assert!(cache.cached_bytes() <= 2 << 20);
    eprintln!(
        "served {} bytes; {} chunk fetches, {} hits, {} evictions",
        export.served_bytes.load(Ordering::Relaxed),
        cache.stats.fetches.load(Ordering::Relaxed),
        cache.stats.hits.load(Ordering::Relaxed),
        cache.stats.evictions.load(Ordering::Relaxed)
    );
}
