//! The lazy export's NBD server, fed any bytes as a client: it answers, refuses or hangs up,
//! never panics and never reads outside the image. A 256 KiB image (data and zero chunks) is
//! imported once into a repository in a temporary directory.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmatrix_store::cache::ChunkCache;
use vmatrix_store::nbd::{serve_stream, Export};
use vmatrix_store::Repository;

struct World {
    runtime: tokio::runtime::Runtime,
    export: Arc<Export>,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("file://{}", dir.path().join("repo").display());
        let repo = Arc::new(Repository::open_or_init(&url).expect("a repository"));
        let mut disk = vec![0u8; 256 * 1024];
        for (i, b) in disk[..96 * 1024].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, &disk).expect("the image");
        let image = vmatrix_core::ImageRef::parse("disk:v1").expect("a name");
        repo.import(&raw, &image, dir.path(), &|_| {})
            .expect("the import");
        let (_, manifest) = repo.resolve(&image).expect("the version");
        let cache = Arc::new(
            ChunkCache::new(repo, &dir.path().join("cache"), 1 << 20).expect("a cache"),
        );
        World {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            export: Export::new("disk", manifest, cache),
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let serving = tokio::spawn(serve_stream(server, w.export.clone()));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        // Everything it answers, until it hangs up (or the input ran out mid-request).
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out)).await;
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
    });
});
