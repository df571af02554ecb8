//! Keep-alive HTTP/1.1 connections to instances, one pool per worker thread.
//!
//! hyper's general-purpose pooled client (hyper-util's `legacy::Client`) parses an absolute URI
//! per request, keys its pool by scheme and authority, and hands every request through a
//! checkout future and a second task; on this hot path that was a third of the switch's user
//! time. This pool keeps, per instance address, the connections it opened (hyper's
//! `client::conn::http1`), sends on one that is idle, and opens another (with the switch's own
//! connect retries, [`crate::connect`]) when none is. A request that a just-closed idle
//! connection did not send is sent on a fresh one, as the general client does. Connections
//! unused for [`IDLE`] are closed by [`Pool::sweep`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// How long an unused connection is kept.
pub(crate) const IDLE: Duration = Duration::from_secs(30);

/// What the switch sends an instance: a body read whole (small: it can be sent again on a
/// retry), or the client's own, streamed through.
pub(crate) type ProxyBody = http_body_util::Either<Full<Bytes>, Incoming>;

type Sender = SendRequest<ProxyBody>;

struct Conn {
    send: Sender,
    used: Instant,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be made: nothing was sent, always safe to try elsewhere.
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// The request may have reached the instance (safe to repeat only if idempotent).
    #[error("{0}")]
    Request(#[from] hyper::Error),
}

impl SendError {
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

/// Connections of one worker, by instance address (`ip:port`).
#[derive(Default)]
pub(crate) struct Pool {
    conns: Mutex<HashMap<String, Vec<Conn>>>,
}

impl Pool {
    /// An idle connection to `addr`, if one is open (closed ones are forgotten on the way).
    fn checkout(&self, addr: &str) -> Option<Sender> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(addr)?;
        list.retain(|c| !c.send.is_closed());
        let i = list.iter().position(|c| c.send.is_ready())?;
        Some(list.swap_remove(i).send)
    }

    /// Keeps `send` for later requests to `addr` (busy until its response is done; a later
    /// checkout takes it once it is idle).
    fn keep(&self, addr: &str, send: Sender) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.entry(addr.to_owned()).or_default().push(Conn {
            send,
            used: Instant::now(),
        });
    }

    async fn open(addr: &str) -> Result<Sender, SendError> {
        let connect_error = |source| SendError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let sock: SocketAddr = addr.parse().map_err(|_| {
            connect_error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{addr:?} is not an ip:port address"),
            ))
        })?;
        let stream = crate::connect::connect(sock).await.map_err(connect_error)?;
        let (send, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("connection to an instance: {e}");
            }
        });
        Ok(send)
    }

    /// Sends `req` to `addr` on an idle connection or a new one.
    #[cfg(test)]
    pub(crate) async fn send(
        &self,
        addr: &str,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        self.send_or_return(addr, req).await.map_err(|(e, _)| e)
    }

    /// Sends `req` to `addr` on an idle connection or a new one; when no connection could be
    /// made, the request comes back unsent with the error (its body, if streamed, unread).
    pub(crate) async fn send_or_return(
        &self,
        addr: &str,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, (SendError, Option<Request<ProxyBody>>)> {
        // Idle connections first; one that turns out closed gives the request back unsent.
        while let Some(mut send) = self.checkout(addr) {
            let pending = send.try_send_request(req);
            self.keep(addr, send);
            match pending.await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err((SendError::Request(e.into_error()), None)),
                },
            }
        }
        let mut send = match Self::open(addr).await {
            Ok(s) => s,
            Err(e) => return Err((e, Some(req))),
        };
        let pending = send.send_request(req);
        self.keep(addr, send);
        pending.await.map_err(|e| (SendError::Request(e), None))
    }

    /// Closes connections unused for [`IDLE`] and forgets closed ones.
    pub(crate) fn sweep(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for list in conns.values_mut() {
            let idle_too_long = |c: &Conn| c.send.is_ready() && c.used.elapsed() > IDLE;
            list.retain(|c| !(c.send.is_closed() || idle_too_long(c)));
        }
        conns.retain(|_, list| !list.is_empty());
    }

    /// Open connections to `addr`: (all, idle).
    #[cfg(test)]
    fn open_to(&self, addr: &str) -> (usize, usize) {
        let conns = self.conns.lock().unwrap();
        let list = conns.get(addr).map_or(&[][..], Vec::as_slice);
        (
            list.len(),
            list.iter().filter(|c| c.send.is_ready()).count(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A keep-alive backend that answers every request with its connection's number, after
    /// 50 ms.
    async fn backend() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut n = 0u32;
            while let Ok((s, _)) = l.accept().await {
                n += 1;
                let me = n;
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            me.to_string(),
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn get() -> Request<ProxyBody> {
        Request::builder()
            .uri("/")
            .header("host", "x")
            .body(http_body_util::Either::Left(Full::new(Bytes::new())))
            .unwrap()
    }

    async fn body(r: Response<Incoming>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn reuses_an_idle_connection_and_opens_one_per_concurrent_request() {
        let addr = backend().await.to_string();
        let pool = Pool::default();
        let first = body(pool.send(&addr, get()).await.unwrap()).await;
        // Let the connection task see the response done (it then wants the next request).
        for _ in 0..100 {
            if pool.open_to(&addr) == (1, 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let again = body(pool.send(&addr, get()).await.unwrap()).await;
        assert_eq!(first, again, "the idle connection was reused");
        // Two requests at once: two connections.
        let (a, b) = tokio::join!(pool.send(&addr, get()), pool.send(&addr, get()));
        assert_ne!(body(a.unwrap()).await, body(b.unwrap()).await);
        assert_eq!(pool.open_to(&addr).0, 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let err = Pool::default().send(&addr, get()).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
        let err = Pool::default().send("nonsense", get()).await.unwrap_err();
        assert!(err.is_connect() && err.to_string().contains("nonsense"));
    }

    #[tokio::test]
    async fn a_connection_the_instance_closed_is_not_reused() {
        // A backend that closes each connection after one answer (Connection: close).
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                        r.headers_mut()
                            .insert("connection", "close".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(r)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let pool = Pool::default();
        for _ in 0..5 {
            assert_eq!(body(pool.send(&addr, get()).await.unwrap()).await, "ok");
        }
        pool.sweep();
        assert!(pool.open_to(&addr).0 <= 1);
    }
}
