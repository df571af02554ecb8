//! Who may read an export on an abstract socket: only clients running as the users it names
//! (an abstract socket has no file permissions; the kernel's peer credentials decide).

use std::io::Read;
use std::os::linux::net::SocketAddrExt;
use std::sync::Arc;

use vmatrix_core::ImageRef;
use vmatrix_store::cache::ChunkCache;
use vmatrix_store::nbd::{Export, NbdServer};
use vmatrix_store::Repository;

/// The first bytes the server sends a client it accepts, or none (it closed the connection).
fn greeting(name: &str) -> Vec<u8> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let mut s = std::os::unix::net::UnixStream::connect_addr(&addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut got = vec![0u8; 8];
    let mut n = 0;
    while n < got.len() {
        match s.read(&mut got[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    got.truncate(n);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abstract_export_serves_only_the_users_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(
        Repository::open_or_init(&format!("file://{}", dir.path().join("repo").display())).unwrap(),
    );
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let image = ImageRef::parse("disk:v1").unwrap();
    tokio::task::block_in_place(|| repo.import(&raw, &image, dir.path(), &|_| {})).unwrap();
    let (_, manifest) = repo.resolve(&image).unwrap();
    let cache = Arc::new(ChunkCache::new(repo, &dir.path().join("cache"), 4 << 20).unwrap());
    let export = Export::new("disk", manifest, cache);
    let me = unsafe { libc::geteuid() };
    let name = format!("vmatrix-test/{}/allowed", std::process::id());
    let allowed = NbdServer::start_abstract(export.clone(), &name, vec![me]).unwrap();
    let other = format!("vmatrix-test/{}/others", std::process::id());
    let refused = NbdServer::start_abstract(export, &other, vec![me.wrapping_add(4242)]).unwrap();

    let (ok, no) = tokio::task::spawn_blocking(move || (greeting(&name), greeting(&other)))
        .await
        .unwrap();
    assert_eq!(
        ok, b"NBDMAGIC",
        "a client of the named user gets the handshake"
    );
    assert!(no.is_empty(), "another user's client got {no:?}");
    drop((allowed, refused));
}
