//! How vMatrix's own servers take connections: at most so many in all and so many from one
//! address ([`Connections`]: a connection beyond a limit is closed at once), and a client must
//! send its first byte and a whole request head within a time limit or be closed. The switch
//! takes its client connections through [`Connections`]; the controller's and the agents' APIs
//! are served by [`serve_api`], which adds the head timeout to axum's router (`axum::serve` has
//! none: 300 half-sent requests held 300 sockets for as long as their clients liked), over TLS
//! where given ([`tls`]: the handshake within the same limit as the head).
//!
//! This crate must never read a request's content or decide anything about it: it only bounds
//! what a client may hold.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod tls;
pub use tls::{Callers, PeerCertificate, TlsError};

/// Connections open now, in all and per address, against their limits.
pub struct Connections {
    max_total: usize,
    max_per_client: usize,
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// Connections closed at once because a limit was reached.
    pub refused: AtomicU64,
}

/// Why a connection was not taken: the connections open (in all, or from its address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total(usize),
    PerClient(usize),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Total(n) => write!(f, "{n} client connections open (--max-connections)"),
            Refused::PerClient(n) => write!(
                f,
                "{n} connections open from this address (--max-connections-per-client)"
            ),
        }
    }
}

impl Connections {
    /// At most `max_total` connections at once, `max_per_client` from one address.
    pub fn new(max_total: usize, max_per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_client,
            total: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
        })
    }

    /// Takes a place for a connection from `ip`, given back when the guard is dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Connection, Refused> {
        let mut per = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let total = self.total.load(Ordering::Relaxed);
        let mine = per.get(&ip).copied().unwrap_or(0);
        let refusal = if total >= self.max_total {
            Some(Refused::Total(total))
        } else if mine >= self.max_per_client {
            Some(Refused::PerClient(mine))
        } else {
            None
        };
        if let Some(r) = refusal {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(r);
        }
        *per.entry(ip).or_default() += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(Connection {
            all: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

/// One connection's place, given back when dropped.
pub struct Connection {
    all: Arc<Connections>,
    ip: IpAddr,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut per = self
            .all
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
        self.all.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What an API's clients may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// A client sends its first byte, and then a whole request head, within this.
    pub header_timeout: Duration,
    /// Connections open at once, in all.
    pub max_connections: usize,
    /// Connections open at once from one address.
    pub max_connections_per_client: usize,
}

impl Default for ApiLimits {
    /// 10 s for a head; 4,096 connections, 1,024 from one address (the controller's clients
    /// are agents, switches and CLIs: a few each, and long polls).
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_client: 1024,
        }
    }
}

/// Serves `app` on `listener` (HTTP/1.1, with upgrades: WebSockets) within `limits`, over
/// TLS with `tls` where given, until accepting fails for good.
pub async fn serve_api(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: ApiLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let connections = Connections::new(limits.max_connections, limits.max_connections_per_client);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, say: accept again a moment later.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let place = match connections.admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!("connection from {peer} closed at once: {why}");
                continue;
            }
        };
        let app = app.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _place = place;
            // The first byte within the limit too: hyper's head timer starts with the head.
            match tokio::time::timeout(limits.header_timeout, stream.readable()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            let Some(acceptor) = acceptor else {
                return serve_connection(stream, app, limits, peer).await;
            };
            // The handshake within the same limit: a client that stops halfway is closed.
            match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    // A client's verified certificate goes with each of its requests.
                    let presented = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| PeerCertificate(c.as_ref().into()));
                    let app = match presented {
                        Some(p) => app.layer(axum::Extension(p)),
                        None => app,
                    };
                    serve_connection(tls, app, limits, peer).await
                }
                Ok(Err(e)) => tracing::debug!("TLS handshake with {peer}: {e}"),
                Err(_) => tracing::debug!("TLS handshake with {peer}: not done within the limit"),
            }
        });
    }
}

/// One connection's requests, each head within the limit.
async fn serve_connection<I>(
    io: I,
    app: axum::Router,
    limits: ApiLimits,
    peer: std::net::SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!("connection from {peer}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn connections_are_counted_in_all_and_per_address() {
        let c = Connections::new(3, 2);
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let one = c.admit(a).unwrap();
        let _two = c.admit(a).unwrap();
        assert_eq!(c.admit(a).err(), Some(Refused::PerClient(2)));
        let _three = c.admit(b).unwrap();
        assert_eq!(c.admit(b).err(), Some(Refused::Total(3)));
        drop(one);
        assert_eq!(c.open(), 2);
        assert!(c.admit(a).is_ok());
        assert_eq!(c.refused.load(Ordering::Relaxed), 2);
    }

    /// A client that sends half a request head is closed once the head timeout has passed; a
    /// whole request is answered; connections beyond the per-client limit are closed at once.
    #[tokio::test]
    async fn half_sent_heads_are_closed_and_extra_connections_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let limits = ApiLimits {
            header_timeout: Duration::from_millis(300),
            max_connections: 100,
            max_connections_per_client: 3,
        };
        tokio::spawn(serve_api(listener, app, limits, None));

        let mut whole = tokio::net::TcpStream::connect(addr).await.unwrap();
        whole
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        whole.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

        let started = std::time::Instant::now();
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nhost: ").await.unwrap();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The limit is 3 from this address: a fourth is closed at once.
        let _third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), fourth.read(&mut buf))
            .await
            .expect("the fourth is closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
        for (what, s) in [("half a head", &mut half), ("nothing", &mut silent)] {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{what}: still open after 5 s"))
                .unwrap_or(0);
            assert_eq!(n, 0, "{what}: closed without an answer");
        }
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "closed after {waited:?}"
        );
    }
}
