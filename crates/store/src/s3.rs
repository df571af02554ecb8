//! The `s3://bucket/prefix` backend, through the `object_store` crate: any S3-compatible store.
//! The endpoint, region and credentials come from the usual variables (`AWS_ENDPOINT_URL` or
//! `AWS_ENDPOINT`, `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`); an `http://` endpoint is allowed for local stores.
//!
//! The repository's code is synchronous (it runs on worker threads), so this backend drives
//! `object_store` on a small runtime of its own. S3 has no rename and no "touch": a touch
//! re-writes the object with its own bytes (a PUT is atomic and refreshes `Last-Modified`), and
//! a GC deletion re-reads the object's time just before deleting; the import's final check
//! catches the remaining instant (see [`crate::repo`]).

use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};

use crate::backend::ObjectMeta;
use crate::error::{Result, StoreError};

/// An S3 bucket (and key prefix) holding a repository.
pub struct S3Backend {
    store: AmazonS3,
    bucket: String,
    prefix: String,
    runtime: tokio::runtime::Runtime,
    requests: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Backend({})", self.location())
    }
}

fn env(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

/// Explicit S3 settings (instead of the `AWS_*` environment).
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    /// e.g. `http://127.0.0.1:8014`.
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
}

impl S3Settings {
    /// Reads the usual `AWS_*` variables.
    pub fn from_env() -> Self {
        Self {
            endpoint: env(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]),
            region: env(&["AWS_REGION", "AWS_DEFAULT_REGION"]),
            access_key_id: env(&["AWS_ACCESS_KEY_ID"]),
            secret_access_key: env(&["AWS_SECRET_ACCESS_KEY"]),
        }
    }
}

impl S3Backend {
    /// Connects lazily to `bucket` with settings from the environment; keys live under
    /// `prefix`.
    pub fn new(bucket: &str, prefix: &str) -> Result<Self> {
        Self::with_settings(bucket, prefix, S3Settings::from_env())
    }

    /// Connects lazily to `bucket` with explicit settings.
    pub fn with_settings(bucket: &str, prefix: &str, settings: S3Settings) -> Result<Self> {
        let location = format!("s3://{bucket}/{prefix}");
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 2,
                retry_timeout: Duration::from_secs(10),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(Duration::from_secs(60)),
            );
        if let Some(endpoint) = settings.endpoint {
            if endpoint.starts_with("http://") {
                builder = builder.with_allow_http(true);
            }
            builder = builder.with_endpoint(endpoint);
        }
        builder = builder.with_region(settings.region.unwrap_or_else(|| "us-east-1".into()));
        if let Some(k) = settings.access_key_id {
            builder = builder.with_access_key_id(k);
        }
        if let Some(k) = settings.secret_access_key {
            builder = builder.with_secret_access_key(k);
        }
        let store = builder.build().map_err(|e| StoreError::NotARepository {
            location: location.clone(),
            detail: format!("cannot configure S3 ({}); set AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", one_line(&e)),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmatrix-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::NotARepository {
                location,
                detail: format!("cannot start the S3 client runtime: {e}"),
            })?;
        Ok(Self {
            store,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            runtime,
            requests: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// `s3://bucket/prefix`.
    pub fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn err(&self, action: &'static str, key: &str, e: object_store::Error) -> StoreError {
        StoreError::Backend {
            location: self.location(),
            action,
            key: key.to_owned(),
            source: std::io::Error::other(one_line(&e)),
        }
    }

    /// Runs one request.
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.runtime.block_on(f)
    }

    /// Requests sent so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        let got = self.block_on(self.store.get_range(&path, offset..offset + len as u64));
        match got {
            Ok(b) if b.len() == len => Ok(Some(b.to_vec())),
            Ok(b) => Err(StoreError::Backend {
                location: self.location(),
                action: "read a range of",
                key: key.to_owned(),
                source: std::io::Error::other(format!("{} bytes of {len}", b.len())),
            }),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("read a range of", key, e)),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        self.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .map_err(|e| self.err("read", key, e))
    }

    pub(crate) fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key);
        let payload = PutPayload::from(data.to_vec());
        self.block_on(self.store.put(&path, payload))
            .map(drop)
            .map_err(|e| self.err("write", key, e))
    }

    pub(crate) fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key);
        match self.block_on(self.store.head(&path)) {
            Ok(m) => Ok(Some(meta(&m))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("stat", key, e)),
        }
    }

    pub(crate) fn list(&self, prefix: &str) -> Result<Vec<(String, ObjectMeta)>> {
        let path = self.path(prefix.trim_end_matches('/'));
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let metas: Vec<object_store::ObjectMeta> = self
            .block_on(self.store.list(Some(&path)).try_collect())
            .map_err(|e| self.err("list", prefix, e))?;
        let mut out: Vec<(String, ObjectMeta)> = metas
            .iter()
            .filter_map(|m| {
                let full = m.location.to_string();
                full.strip_prefix(&strip).map(|k| (k.to_owned(), meta(m)))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    pub(crate) fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match self.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    /// Copies an object inside the store (no bytes through us); false if `from` is missing.
    pub(crate) fn copy(&self, from: &str, to: &str) -> Result<bool> {
        match self.block_on(self.store.copy(&self.path(from), &self.path(to))) {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("copy", from, e)),
        }
    }

    pub(crate) fn touch(&self, key: &str) -> Result<bool> {
        match self.get(key)? {
            Some(bytes) => self.put(key, &bytes).map(|()| true),
            None => Ok(false),
        }
    }

    pub(crate) fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<Option<u64>> {
        match self.head(key)? {
            Some(m) if m.modified < cutoff => {
                self.delete(key)?;
                Ok(Some(m.size))
            }
            _ => Ok(None),
        }
    }
}

fn meta(m: &object_store::ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        size: m.size,
        modified: SystemTime::from(m.last_modified),
    }
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
