//! Lazy activation: a read-only NBD server that exports one image version from the machine's
//! chunk cache, fetching chunks from the repository only when the guest reads them (plus a few
//! chunks of read-ahead). QEMU boots a qcow2 overlay whose backing file is this export, so a VM
//! starts before its image has been copied — only the blocks it touches ever travel.
//!
//! Protocol: the NBD "fixed newstyle" handshake with `NBD_OPT_GO`/`NBD_OPT_INFO` (and the old
//! `NBD_OPT_EXPORT_NAME`), simple replies only (structured replies are declined, which every
//! client handles), requests served concurrently and answered as they complete.
//!
//! ```text
//!  QEMU (qcow2 overlay → backing nbd+unix:///NAME?socket=S)      this server
//!  ──────────────────────────────────────────────────────────   ─────────────────────────
//!                              ◀── NBDMAGIC IHAVEOPT flags
//!  client flags, OPT_STRUCTURED_REPLY ──▶                        ◀── REP_ERR_UNSUP
//!  OPT_GO(NAME) ──▶                                              ◀── REP_INFO(size, flags), REP_ACK
//!  READ(handle, offset, len) ──▶   cache hit? else fetch chunk ◀── reply(handle) + data
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::net::UnixListener;
use tokio::sync::Mutex;

use crate::cache::ChunkCache;
use crate::chunk::ChunkId;
use crate::error::{io_err, Result};
use crate::manifest::Manifest;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TX_HAS_FLAGS: u16 = 1;
const TX_READ_ONLY: u16 = 2;
const TX_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// Largest read we serve in one request (QEMU asks for at most 32 MiB).
const MAX_READ: u32 = 32 * 1024 * 1024;
/// Longest option payload we accept before validating it.
const MAX_OPTION: u32 = 64 * 1024;
/// Chunks fetched ahead of a read that missed the cache (2 MiB: stored back to back in a
/// pack, one ranged read).
const READ_AHEAD: usize = 32;

/// One image version exported over NBD.
#[derive(Debug)]
pub struct Export {
    /// The NBD export name.
    pub name: String,
    /// The version's manifest.
    pub manifest: Manifest,
    /// The machine's chunk cache.
    pub cache: Arc<ChunkCache>,
    /// Bytes served to clients.
    pub served_bytes: AtomicU64,
}

impl Export {
    /// Exports `manifest` as `name` through `cache`.
    pub fn new(name: impl Into<String>, manifest: Manifest, cache: Arc<ChunkCache>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            manifest,
            cache,
            served_bytes: AtomicU64::new(0),
        })
    }

    /// Reads `len` bytes at `offset` of the virtual disk.
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let m = &self.manifest;
        if !m.fixed_chunks() {
            return Err(crate::StoreError::BadName(format!(
                "{} is a saved state, not a disk: it cannot be served over NBD",
                self.name
            )));
        }
        let cs = u64::from(m.chunk_size);
        let mut out = vec![0u8; len];
        let mut pos = offset;
        let end = offset + len as u64;
        let mut missed = None;
        while pos < end {
            let index = (pos / cs) as usize;
            let in_chunk = (pos % cs) as usize;
            let take = ((cs - pos % cs).min(end - pos)) as usize;
            let dst = (pos - offset) as usize;
            if let Some(Some(id)) = m.chunks.get(index) {
                if !self.cache.contains(id) {
                    missed = Some(index);
                }
                let data = self.cache.get(id)?;
                let avail = data.len().saturating_sub(in_chunk).min(take);
                out[dst..dst + avail].copy_from_slice(&data[in_chunk..in_chunk + avail]);
            }
            pos += take as u64;
        }
        self.served_bytes.fetch_add(len as u64, Ordering::Relaxed);
        if let Some(index) = missed {
            self.read_ahead(index + 1);
        }
        Ok(out)
    }

    /// Fetches the next few chunks in the background: guests read sequentially at boot.
    fn read_ahead(&self, from: usize) {
        let ids: Vec<ChunkId> = self
            .manifest
            .chunks
            .iter()
            .skip(from)
            .take(READ_AHEAD)
            .flatten()
            .filter(|id| !self.cache.contains(id))
            .copied()
            .collect();
        if ids.is_empty() {
            return;
        }
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || cache.prefetch(&ids));
    }
}

/// A running NBD server; dropping it stops accepting connections.
#[derive(Debug)]
pub struct NbdServer {
    /// The socket file (`None`: an abstract socket, which has none).
    socket: Option<PathBuf>,
    task: tokio::task::JoinHandle<()>,
}

impl NbdServer {
    /// Serves `export` on the unix socket `socket` (replaced if it exists).
    pub fn start(export: Arc<Export>, socket: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(io_err("listen on", socket))?;
        Ok(Self {
            socket: Some(socket.to_owned()),
            task: Self::serve(listener, export, None),
        })
    }

    /// Serves `export` on the abstract unix socket `name` (Linux: no file, nothing to clean up
    /// or to give permissions to; it goes with this process) to clients running as one of
    /// `uids` — checked by the kernel's peer credentials, as anyone may connect to an
    /// abstract socket. QEMU reaches it as `{"type": "unix", "path": NAME, "abstract": true}`.
    pub fn start_abstract(export: Arc<Export>, name: &str, uids: Vec<u32>) -> Result<Self> {
        use std::os::linux::net::SocketAddrExt;
        let shown = Path::new(name);
        let bound = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| std::os::unix::net::UnixListener::bind_addr(&a))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(UnixListener::from_std)
            .map_err(io_err("listen on abstract socket", shown))?;
        Ok(Self {
            socket: None,
            task: Self::serve(bound, export, Some(uids)),
        })
    }

    fn serve(
        listener: UnixListener,
        export: Arc<Export>,
        uids: Option<Vec<u32>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                if let Some(uids) = &uids {
                    let peer = stream.peer_cred().map(|c| c.uid());
                    if !peer.as_ref().is_ok_and(|uid| uids.contains(uid)) {
                        tracing::warn!(?peer, "NBD: refused a client that is not a VM of ours");
                        continue;
                    }
                }
                let export = export.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(stream, export).await {
                        tracing::debug!("NBD connection ended: {e}");
                    }
                });
            }
        })
    }

    /// The URL QEMU uses as a backing file (a server on a socket file).
    pub fn url(&self, export: &str) -> String {
        let socket = self.socket.as_deref().unwrap_or(Path::new(""));
        format!("nbd+unix:///{export}?socket={}", socket.display())
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

type Io<T> = std::io::Result<T>;

async fn option_reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    kind: u32,
    data: &[u8],
) -> Io<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await
}

fn protocol(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Serves one client of `export` on any byte stream (a socket's connection; a test's or a
/// fuzzer's in-memory pipe) until it disconnects or breaks the protocol.
pub async fn serve_stream<S>(s: S, export: Arc<Export>) -> Io<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_connection(s, export).await
}

async fn serve_connection<S>(mut s: S, export: Arc<Export>) -> Io<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    let client_flags = s.read_u32().await?;
    let size = export.manifest.virtual_size;
    let tx_flags = TX_HAS_FLAGS | TX_READ_ONLY | TX_CAN_MULTI_CONN;

    // Option haggling.
    loop {
        if s.read_u64().await? != IHAVEOPT {
            return Err(protocol("bad option magic"));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION {
            return Err(protocol(format!("option of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                if String::from_utf8_lossy(&data) != export.name && !data.is_empty() {
                    return Err(protocol("unknown export"));
                }
                let mut b = Vec::new();
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&tx_flags.to_be_bytes());
                if client_flags & CLIENT_NO_ZEROES == 0 {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b).await?;
                break;
            }
            OPT_ABORT => {
                option_reply(&mut s, option, REP_ACK, &[]).await?;
                return Ok(());
            }
            OPT_LIST => {
                let mut d = (export.name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(export.name.as_bytes());
                option_reply(&mut s, option, REP_SERVER, &d).await?;
                option_reply(&mut s, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                if data.len() < 6 {
                    option_reply(&mut s, option, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                let name_len = u32::from_be_bytes(data[..4].try_into().expect("4 bytes")) as usize;
                let Some(name) = data.get(4..4 + name_len) else {
                    option_reply(&mut s, option, REP_ERR_INVALID, &[]).await?;
                    continue;
                };
                if !name.is_empty() && name != export.name.as_bytes() {
                    option_reply(&mut s, option, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tx_flags.to_be_bytes());
                option_reply(&mut s, option, REP_INFO, &info).await?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&MAX_READ.to_be_bytes());
                option_reply(&mut s, option, REP_INFO, &bs).await?;
                option_reply(&mut s, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    break;
                }
            }
            _ => option_reply(&mut s, option, REP_ERR_UNSUP, &[]).await?,
        }
    }

    // Transmission: requests are read here and answered by tasks as their data is ready.
    let (mut reader, writer) = tokio::io::split(s);
    let writer = Arc::new(Mutex::new(writer));
    loop {
        let mut head = [0u8; 28];
        reader.read_exact(&mut head).await?;
        let magic = u32::from_be_bytes(head[0..4].try_into().expect("4"));
        if magic != REQUEST_MAGIC {
            return Err(protocol("bad request magic"));
        }
        let kind = u16::from_be_bytes(head[6..8].try_into().expect("2"));
        let handle = u64::from_be_bytes(head[8..16].try_into().expect("8"));
        let offset = u64::from_be_bytes(head[16..24].try_into().expect("8"));
        let len = u32::from_be_bytes(head[24..28].try_into().expect("4"));
        match kind {
            CMD_READ => {
                let export = export.clone();
                let writer = writer.clone();
                tokio::spawn(async move {
                    let valid = len <= MAX_READ
                        && offset
                            .checked_add(u64::from(len))
                            .is_some_and(|e| e <= size);
                    let result = if valid {
                        let export = export.clone();
                        tokio::task::spawn_blocking(move || export.read_at(offset, len as usize))
                            .await
                            .map_err(|_| EIO)
                            .and_then(|r| {
                                r.map_err(|e| {
                                    tracing::warn!("NBD read at {offset}+{len} failed: {e}");
                                    EIO
                                })
                            })
                    } else {
                        Err(EINVAL)
                    };
                    let mut w = writer.lock().await;
                    let (err, data) = match result {
                        Ok(d) => (0, d),
                        Err(e) => (e, Vec::new()),
                    };
                    let _ = simple_reply(&mut w, handle, err, &data).await;
                });
            }
            CMD_WRITE => {
                // Read-only export: swallow the payload, then refuse.
                let mut left = u64::from(len);
                let mut sink = vec![0u8; 64 * 1024];
                while left > 0 {
                    let n = left.min(sink.len() as u64) as usize;
                    reader.read_exact(&mut sink[..n]).await?;
                    left -= n as u64;
                }
                let mut w = writer.lock().await;
                simple_reply(&mut w, handle, EPERM, &[]).await?;
            }
            CMD_FLUSH => {
                let mut w = writer.lock().await;
                simple_reply(&mut w, handle, 0, &[]).await?;
            }
            CMD_DISC => return Ok(()),
            _ => {
                let mut w = writer.lock().await;
                simple_reply(&mut w, handle, EINVAL, &[]).await?;
            }
        }
    }
}

async fn simple_reply<S: AsyncWrite>(
    w: &mut WriteHalf<S>,
    handle: u64,
    error: u32,
    data: &[u8],
) -> Io<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await
}
