//! A VM's serial console, shared. QEMU serves the guest's first serial port on a UNIX socket
//! (`DIR/console.sock`, one client at a time, output dropped while none is connected); one pump
//! per VM is that client from the VM's start: it appends everything the guest prints to
//! `DIR/serial.log` (what boot failures quote), keeps the last [`SCROLLBACK`] bytes for whoever
//! attaches next, and fans the output out to every attached session. Any number of sessions
//! read; one at a time writes (the first that asks; the next once it detaches).
//!
//! The pump ends when QEMU closes the socket (the VM ended) or when the last handle on the
//! console is dropped.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};

/// Bytes of recent output a session gets when it attaches.
pub const SCROLLBACK: usize = 64 * 1024;

/// One chunk of console output.
pub type Output = Arc<[u8]>;

/// Why console input was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleError {
    /// This session reads only: another session writes.
    #[error("this console session is read-only (another session writes); detach it first")]
    ReadOnly,
    /// The VM's console is gone (the VM ended or moved).
    #[error("the console is closed (the VM ended or moved to another machine)")]
    Closed,
}

/// A VM's shared console (cheap to clone; the pump stops with the last clone).
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Console({})", self.inner.socket.display())
    }
}

struct Inner {
    socket: PathBuf,
    /// The pump's sender; taken when the pump ends, which closes every session's output.
    out: Arc<Mutex<Option<broadcast::Sender<Output>>>>,
    ring: Arc<Mutex<VecDeque<u8>>>,
    input: mpsc::Sender<Vec<u8>>,
    writer: Mutex<Option<u64>>,
    sessions: AtomicU64,
    pump: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Console {
    /// Starts the pump on QEMU's console socket `socket` (retrying while QEMU creates it),
    /// appending to `log`. Needs a Tokio runtime.
    pub fn open(socket: &Path, log: &Path) -> Self {
        let out = Arc::new(Mutex::new(Some(broadcast::channel(256).0)));
        let ring = Arc::new(Mutex::new(VecDeque::with_capacity(SCROLLBACK)));
        let (input, rx) = mpsc::channel(64);
        let pump = tokio::spawn(pump(
            socket.to_owned(),
            log.to_owned(),
            ring.clone(),
            out.clone(),
            rx,
        ));
        Self {
            inner: Arc::new(Inner {
                socket: socket.to_owned(),
                out,
                ring,
                input,
                writer: Mutex::new(None),
                sessions: AtomicU64::new(1),
                pump: pump.abort_handle(),
            }),
        }
    }

    /// Attaches a session: the recent output, then everything from now on; the writer if
    /// `write` is asked and nobody else writes.
    pub fn attach(&self, write: bool) -> Attached {
        let id = self.inner.sessions.fetch_add(1, Ordering::Relaxed);
        let writer = write && {
            let mut w = lock(&self.inner.writer);
            if w.is_none() {
                *w = Some(id);
                true
            } else {
                false
            }
        };
        // The ring and the subscription under one lock: no byte lost or repeated between them.
        let (scrollback, output) = {
            let ring = lock(&self.inner.ring);
            let output = match lock(&self.inner.out).as_ref() {
                Some(tx) => tx.subscribe(),
                // The pump ended: a receiver that is closed at once.
                None => broadcast::channel(1).1,
            };
            (ring.iter().copied().collect(), output)
        };
        Attached {
            writer,
            scrollback,
            output,
            input: Input {
                id,
                writer,
                console: self.clone(),
            },
        }
    }

    /// Whether the pump still runs (QEMU's socket is open).
    pub fn is_open(&self) -> bool {
        !self.inner.input.is_closed()
    }
}

/// One attached session.
pub struct Attached {
    /// Whether this session writes.
    pub writer: bool,
    /// The recent output, oldest first.
    pub scrollback: Vec<u8>,
    /// Output from the moment of attaching; closed when the console closes.
    pub output: broadcast::Receiver<Output>,
    /// Where this session's input goes (the writer role is released when it is dropped).
    pub input: Input,
}

/// A session's input side.
pub struct Input {
    id: u64,
    writer: bool,
    console: Console,
}

impl Input {
    /// Sends input to the guest (the writer only).
    pub async fn send(&self, bytes: Vec<u8>) -> Result<(), ConsoleError> {
        if !self.writer {
            return Err(ConsoleError::ReadOnly);
        }
        self.console
            .inner
            .input
            .send(bytes)
            .await
            .map_err(|_| ConsoleError::Closed)
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        if self.writer {
            let mut w = lock(&self.console.inner.writer);
            if *w == Some(self.id) {
                *w = None;
            }
        }
    }
}

async fn pump(
    socket: PathBuf,
    log: PathBuf,
    ring: Arc<Mutex<VecDeque<u8>>>,
    out: Arc<Mutex<Option<broadcast::Sender<Output>>>>,
    input: mpsc::Receiver<Vec<u8>>,
) {
    pump_until_closed(&socket, &log, &ring, &out, input).await;
    // Dropping the only sender closes every session's output.
    lock(&out).take();
}

/// Sends the writer's input to the guest, in a task of its own: a guest that does not read its
/// console stalls only the input, never the output.
async fn write_input(mut wr: tokio::net::unix::OwnedWriteHalf, mut input: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = input.recv().await {
        if wr.write_all(&bytes).await.is_err() {
            break;
        }
    }
}

async fn pump_until_closed(
    socket: &Path,
    log: &Path,
    ring: &Mutex<VecDeque<u8>>,
    out: &Mutex<Option<broadcast::Sender<Output>>>,
    input: mpsc::Receiver<Vec<u8>>,
) {
    let started = tokio::time::Instant::now();
    let stream = loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(s) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                tracing::warn!("console {}: {e}; no console for this VM", socket.display());
                return;
            }
        }
    };
    let mut file = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .await
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("console log {}: {e}", log.display());
            None
        }
    };
    let (mut rd, wr) = stream.into_split();
    // Ends with the input channel, or is aborted below when the socket closes (which drops the
    // receiver: input is refused as closed from then on).
    let writer = tokio::spawn(write_input(wr, input));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if let Some(f) = file.as_mut() {
            // tokio's file writes in the background until flushed: flushed, the log holds the
            // output before anyone sees it.
            if f.write_all(chunk).await.is_err() || f.flush().await.is_err() {
                file = None;
            }
        }
        let mut r = lock(ring);
        let keep = &chunk[n.saturating_sub(SCROLLBACK)..];
        let over = (r.len() + keep.len()).saturating_sub(SCROLLBACK);
        r.drain(..over);
        r.extend(keep);
        // No receiver is fine: nobody is attached.
        if let Some(tx) = lock(out).as_ref() {
            let _ = tx.send(Arc::from(chunk));
        }
    }
    writer.abort();
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for QEMU's console socket: echoes what it is sent, after a banner.
    async fn echo_socket(path: &Path) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"login banner\n").await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        })
    }

    /// A console over an echoing socket in a fresh directory.
    async fn over_echo() -> (tempfile::TempDir, Console, tokio::task::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("console.sock");
        let console = Console::open(&sock, &dir.path().join("serial.log"));
        let qemu = echo_socket(&sock).await;
        (dir, console, qemu)
    }

    async fn read_until(a: &mut Attached, want: &str) -> String {
        let mut got = String::from_utf8_lossy(&a.scrollback).into_owned();
        while !got.contains(want) {
            let chunk = tokio::time::timeout(Duration::from_secs(5), a.output.recv())
                .await
                .expect("output in time")
                .expect("console open");
            got.push_str(&String::from_utf8_lossy(&chunk));
        }
        got
    }

    #[tokio::test]
    async fn readers_share_the_output_one_writer_at_a_time_and_a_late_reader_gets_the_scrollback() {
        let (dir, console, _qemu) = over_echo().await;
        let log = dir.path().join("serial.log");
        let mut first = console.attach(true);
        let mut second = console.attach(true);
        assert!(first.writer && !second.writer, "one writer");
        assert_eq!(
            second.input.send(b"x".to_vec()).await,
            Err(ConsoleError::ReadOnly)
        );
        first.input.send(b"hello\n".to_vec()).await.unwrap();
        assert!(read_until(&mut first, "hello").await.contains("hello"));
        assert!(read_until(&mut second, "hello").await.contains("hello"));
        // Attached later: the banner and the echo come from the scrollback.
        let late = console.attach(false);
        let back = String::from_utf8_lossy(&late.scrollback).into_owned();
        assert!(
            back.contains("login banner") && back.contains("hello"),
            "{back}"
        );
        // The writer leaves: the next that asks writes.
        drop(first);
        let third = console.attach(true);
        assert!(third.writer);
        // Everything went to the log too.
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains("login banner") && logged.contains("hello"));
    }

    #[tokio::test]
    async fn a_guest_that_never_reads_its_console_still_gets_its_output_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("console.sock");
        let console = Console::open(&sock, &dir.path().join("serial.log"));
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        // Prints a tick every 50 ms and never reads.
        let _guest = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for i in 0.. {
                if s.write_all(format!("tick {i}\n").as_bytes()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut w = console.attach(true);
        // Far more than the socket buffers: the input side blocks.
        for _ in 0..64 {
            let _ = tokio::time::timeout(
                Duration::from_millis(20),
                w.input.send(vec![b'x'; 64 * 1024]),
            )
            .await;
        }
        read_until(&mut w, "tick 30").await;
    }

    #[tokio::test]
    async fn the_scrollback_keeps_only_the_newest_bytes() {
        let (_dir, console, _qemu) = over_echo().await;
        let mut w = console.attach(true);
        let big = vec![b'a'; SCROLLBACK + 10];
        w.input.send(big).await.unwrap();
        w.input.send(b"END".to_vec()).await.unwrap();
        read_until(&mut w, "END").await;
        let late = console.attach(false);
        assert_eq!(late.scrollback.len(), SCROLLBACK);
        assert!(late.scrollback.ends_with(b"END"));
    }
}
