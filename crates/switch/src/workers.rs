//! The switch's workers: one single-threaded runtime per core, each with its own connections to
//! instances, and one acceptor that gives every new client connection to the worker serving the
//! fewest.
//!
//! A request and its instance connection stay on one thread, as in nginx's workers (a
//! work-stealing runtime bounced them between threads, costing wake-ups). Workers that each
//! accepted on the shared socket themselves split keep-alive clients unevenly — one core served
//! most connections while the other idled, and throughput varied by a third between runs — so
//! one acceptor places them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;

use crate::pool::Pool;
use crate::proxy::Switch;

/// A client connection handed to a worker; TLS ones come with their acceptor.
struct Accepted {
    stream: std::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Its place among the connections the limits allow, given back when it closes.
    place: crate::limits::Connection,
}

struct Worker {
    tx: mpsc::UnboundedSender<Accepted>,
    /// Client connections it serves now.
    open: Arc<AtomicUsize>,
}

/// Starts one worker per core and accepts on `listener` (and the TLS listener) until an accept
/// loop error that cannot be survived.
pub(crate) async fn run(
    switch: Arc<Switch>,
    listener: std::net::TcpListener,
    tls: Option<(std::net::TcpListener, tokio_rustls::TlsAcceptor)>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let tls = match tls {
        Some((l, a)) => Some((tokio::net::TcpListener::from_std(l)?, a)),
        None => None,
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut workers = Vec::with_capacity(cores);
    for n in 0..cores {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let open = Arc::new(AtomicUsize::new(0));
        let (sw, count) = (switch.clone(), open.clone());
        std::thread::Builder::new()
            .name(format!("switch-{n}"))
            .spawn(move || runtime.block_on(serve(sw, rx, count)))?;
        workers.push(Worker { tx, open });
    }
    loop {
        let secure = async {
            match &tls {
                Some((l, a)) => (l.accept().await, Some(a.clone())),
                None => std::future::pending().await,
            }
        };
        let (accepted, acceptor) = tokio::select! {
            r = listener.accept() => (r, None),
            r = secure => r,
        };
        let stream = match accepted.and_then(|(s, peer)| {
            let _ = s.set_nodelay(true);
            Ok((s.into_std()?, peer))
        }) {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, say: the process goes on and accepts again soon.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (stream, peer) = stream;
        let place = match switch.connections.admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                // Closed at once. Said now and then, not for each one of a flood.
                let n = switch.connections.refused.load(Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!("closing a connection from {peer}: {why} ({n} closed so far)");
                }
                continue;
            }
        };
        let Some(w) = workers
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
        else {
            return Ok(());
        };
        w.open.fetch_add(1, Ordering::Relaxed);
        let accepted = Accepted {
            stream,
            tls: acceptor,
            place,
        };
        if w.tx.send(accepted).is_err() {
            // Its thread ended (a panic): the client's connection closes; the others go on.
            tracing::error!("a switch worker stopped; closing a client connection");
        }
    }
}

/// One worker: serves the connections it is given, with its own pool of instance connections.
async fn serve(
    switch: Arc<Switch>,
    mut rx: mpsc::UnboundedReceiver<Accepted>,
    open: Arc<AtomicUsize>,
) {
    let pool = Arc::new(Pool::default());
    let sweeper = pool.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(crate::pool::IDLE / 3);
        loop {
            every.tick().await;
            sweeper.sweep();
        }
    });
    while let Some(Accepted { stream, tls, place }) = rx.recv().await {
        let (sw, pool, open) = (switch.clone(), pool.clone(), open.clone());
        tokio::spawn(async move {
            let _done = (Closed(open), place);
            let stream = match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => s,
                Err(e) => return tracing::warn!("taking a client connection: {e}"),
            };
            // A client that connects and sends nothing, or never finishes its TLS handshake,
            // does not hold a socket for longer than a request head may take.
            let limit = sw.config.limits.header_timeout;
            match tls {
                None => match tokio::time::timeout(limit, stream.readable()).await {
                    Ok(Ok(())) => serve_client(sw, pool, TokioIo::new(stream)).await,
                    Ok(Err(e)) => tracing::debug!("client connection: {e}"),
                    Err(_) => tracing::debug!("client sent nothing within {limit:?}: closed"),
                },
                Some(acceptor) => {
                    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_client(sw, pool, TokioIo::new(s)).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake: {e}"),
                        Err(_) => {
                            tracing::debug!("TLS handshake not done within {limit:?}: closed")
                        }
                    }
                }
            }
        });
    }
}

/// Counts a client connection as served until dropped.
struct Closed(Arc<AtomicUsize>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one client connection: HTTP/1.1 (with upgrades) or HTTP/2, whichever it speaks.
async fn serve_client<I>(switch: Arc<Switch>, pool: Arc<Pool>, io: I)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let header_timeout = switch.config.limits.header_timeout;
    let svc = hyper::service::service_fn(move |req| switch.clone().handle(pool.clone(), req));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let _ = builder.serve_connection_with_upgrades(io, svc).await;
}
