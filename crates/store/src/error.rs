//! What can go wrong in the repository, named after the operation that failed.

use std::path::PathBuf;

/// Errors of the repository.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The repository URL is not one we understand.
    #[error(
        "repository URL {url:?} is not supported: use file:///absolute/path or s3://bucket/prefix"
    )]
    BadUrl { url: String },
    /// No repository at this location.
    #[error("no vMatrix repository at {location}: {detail}")]
    NotARepository { location: String, detail: String },
    /// The backend could not be reached or an object operation failed.
    #[error("repository {location}: {action} {key} failed (is it reachable? check --repo and, for s3://, AWS_ENDPOINT_URL and the credentials)")]
    Backend {
        location: String,
        action: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    /// The repository's disk is full (nothing that failed was published).
    #[error("repository {location}: {action} {key} failed: no space left on its disk; free some, or run `vmatrix image gc` a second or more after the failure (it removes what a failed import wrote)")]
    Full {
        location: String,
        action: &'static str,
        key: String,
    },
    /// An input file is not usable.
    #[error("{path}: {reason}")]
    BadInput { path: PathBuf, reason: String },
    /// An image or tag does not exist.
    #[error("{what} not found in the repository; `vmatrix image ls` lists what is there")]
    NotFound { what: String },
    /// A stored object is damaged.
    #[error("{what} is corrupt: {reason}; `vmatrix image verify` names every damaged object")]
    Corrupt { what: String, reason: String },
    /// A tool (qemu-img) failed.
    #[error("{tool} failed on {path}: {stderr}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        stderr: String,
    },
    /// A local file operation failed.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A name the repository refuses (a pin holder, …).
    #[error("{0}")]
    BadName(String),
    /// A chunk an import relied on vanished before its manifest was published (a concurrent
    /// `gc` removed it); nothing was published.
    #[error("chunk {chunk} disappeared during the import (a concurrent gc?); nothing was published: run the import again")]
    ChunkVanished { chunk: String },
}

/// Shorthand for results of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}
