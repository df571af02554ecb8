//! Shared helpers for the repository tests: a repository on either backend, with a real
//! S3-compatible server (s3s-fs) started on loopback for the S3 one and stopped when the test
//! ends, pass or fail.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmatrix_store::backend::Backend;
use vmatrix_store::s3::{S3Backend, S3Settings};
use vmatrix_store::Repository;

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    S3,
}

/// The s3s-fs binary: `$VMATRIX_S3S_FS`, or where scripts/install-test-tools.sh puts it.
pub fn s3s_fs() -> PathBuf {
    if let Ok(p) = std::env::var("VMATRIX_S3S_FS") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/vmatrix/tools/bin/s3s-fs")
}

pub const ACCESS_KEY: &str = "vmatrix-test";
pub const SECRET_KEY: &str = "vmatrix-test-secret";

/// A real S3-compatible server on a free loopback port, killed on drop.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub root: PathBuf,
}

impl S3Server {
    pub fn start(root: &Path) -> Self {
        let bin = s3s_fs();
        assert!(
            bin.is_file(),
            "{} is missing: run scripts/install-test-tools.sh (scripts/test does)",
            bin.display()
        );
        std::fs::create_dir_all(root).unwrap();
        let addr: SocketAddr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let server = Self {
            child,
            endpoint: format!("http://{addr}"),
            root: root.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Creates a bucket (s3s-fs keeps one directory per bucket).
    pub fn bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root.join(name)).unwrap();
    }

    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tests' repositories close packs at 1 MiB, so that a few MiB of test data make several
/// packs, as gigabytes do at the default size.
pub const PACK_SIZE: usize = 1024 * 1024;

/// A repository on `kind`, with scratch space.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub repo: Repository,
    pub kind: Kind,
    _server: Option<S3Server>,
}

impl Fixture {
    pub fn new(kind: Kind) -> Self {
        Self::with_pack_size(kind, PACK_SIZE)
    }

    /// A repository whose packs close at `pack_size` bytes.
    pub fn with_pack_size(kind: Kind, pack_size: usize) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmx-store-")
            .tempdir_in("/tmp")
            .unwrap();
        let (repo, server) = match kind {
            Kind::File => (
                Repository::open_or_init_with(
                    Backend::open(&format!("file://{}", dir.path().join("repo").display()))
                        .unwrap(),
                    pack_size,
                )
                .unwrap(),
                None,
            ),
            Kind::S3 => {
                let server = S3Server::start(&dir.path().join("s3"));
                server.bucket("images");
                let backend = Backend::S3(
                    S3Backend::with_settings("images", "repo", server.settings()).unwrap(),
                );
                (
                    Repository::open_or_init_with(backend, pack_size).unwrap(),
                    Some(server),
                )
            }
        };
        Self {
            dir,
            repo,
            kind,
            _server: server,
        }
    }

    /// A second handle on the same repository (another process, as far as the repository
    /// can tell: its own index, read when it first needs it).
    pub fn reopen(&self) -> Repository {
        let backend = match &self._server {
            None => Backend::open(&format!(
                "file://{}",
                self.dir.path().join("repo").display()
            ))
            .unwrap(),
            Some(server) => {
                Backend::S3(S3Backend::with_settings("images", "repo", server.settings()).unwrap())
            }
        };
        Repository::open_backend(backend).unwrap()
    }

    /// Bytes in packs.
    pub fn pack_bytes(&self) -> u64 {
        self.repo
            .backend()
            .list("packs/")
            .unwrap()
            .iter()
            .map(|(_, m)| m.size)
            .sum()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Every pack's key.
    pub fn pack_keys(&self) -> Vec<String> {
        self.repo
            .backend()
            .list("packs/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }
}
