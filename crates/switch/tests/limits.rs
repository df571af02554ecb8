//! No client can exhaust the switch: half-sent requests are closed after the header timeout,
//! connections beyond the limits are closed at once, a large upload streams to the instance
//! instead of being held, small bodies held whole count against a memory budget, and an
//! instance that never answers gets a 504. A stand-in controller serves one route; the
//! instance is a real HTTP server in this process.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vmatrix_switch::Limits;

/// An instance: `/slow` answers after 5 s; anything else reads the whole body (counting the
/// bytes in `seen` as they come) and answers with its length.
async fn instance(seen: Arc<AtomicU64>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            if req.uri().path() == "/slow" {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            }
                            let mut body = req.into_body();
                            let mut n = 0u64;
                            while let Some(Ok(frame)) = body.frame().await {
                                if let Some(d) = frame.data_ref() {
                                    n += d.len() as u64;
                                    seen.fetch_add(d.len() as u64, Ordering::SeqCst);
                                }
                            }
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(Bytes::from(n.to_string())),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Whether the switch has closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // An answer (a 408, say) before the close.
            Ok(Ok(_)) => continue,
        }
    }
}

/// A switch with `limits` in front of a fresh [`instance`], and that instance's byte count.
async fn switch_with(limits: Limits) -> (SocketAddr, Arc<AtomicU64>) {
    let seen = Arc::new(AtomicU64::new(0));
    let switch = support::switch("web", instance(seen.clone()).await, limits).await;
    (switch, seen)
}

/// Sends a whole GET on `s` and says whether a 200 came back.
async fn served(s: &mut TcpStream) -> bool {
    if s.write_all(b"GET /s/web/ HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(s.read(&mut buf).await, Ok(n) if String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"))
}

/// The switch's metrics, read with its token.
async fn metrics_text(switch: SocketAddr) -> String {
    support::metrics_request(switch)
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn half_sent_requests_and_silent_clients_are_closed_after_the_header_timeout() {
    let (switch, _) = switch_with(Limits {
        header_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let started = Instant::now();
    let mut held = Vec::new();
    for i in 0..60 {
        let mut s = TcpStream::connect(switch).await.unwrap();
        if i % 2 == 0 {
            // A request head that never ends.
            s.write_all(b"GET /s/web/ HTTP/1.1\r\nHost: web\r\nX-Slow: ")
                .await
                .unwrap();
        }
        held.push(s);
    }
    // A whole request is still served meanwhile.
    let r = reqwest::get(format!("http://{switch}/s/web/"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // All of them by 4 s after the first was opened (the timeout is 1 s).
    let deadline = started + Duration::from_secs(4);
    let mut closed = 0;
    for s in &mut held {
        if closed_within(s, deadline.saturating_duration_since(Instant::now())).await {
            closed += 1;
        }
    }
    let took = started.elapsed();
    eprintln!("{closed} of 60 held connections closed after {took:?}");
    assert_eq!(closed, 60, "every half-sent or silent connection is closed");
    assert!(
        took >= Duration::from_millis(900),
        "closed too early: {took:?}"
    );
}

#[tokio::test]
async fn connections_beyond_the_per_client_limit_are_closed_at_once() {
    let (switch, _) = switch_with(Limits {
        max_connections_per_client: 5,
        ..Limits::default()
    })
    .await;
    // The readiness probes' connections close soon; wait until none is counted.
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(u64::MAX)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics_text(switch).await;
        // This request's own connection only.
        if metric(&text, "vmatrix_switch_client_connections") <= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut open = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(switch).await.unwrap();
        assert!(served(&mut s).await, "one of the first five was not served");
        open.push(s);
    }
    // The sixth from this address: closed without an answer.
    let mut sixth = TcpStream::connect(switch).await.unwrap();
    let _ = sixth
        .write_all(b"GET /s/web/ HTTP/1.1\r\nHost: web\r\n\r\n")
        .await;
    assert!(
        closed_within(&mut sixth, Duration::from_secs(2)).await,
        "a sixth connection was served"
    );
    // One closes: there is room again.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(switch).await.unwrap();
        if served(&mut s).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no room after a connection closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(open);
    let text = metrics_text(switch).await;
    let refused = metric(&text, "vmatrix_switch_connections_refused_total");
    assert!((1..u64::MAX).contains(&refused), "{text}");
    // They name every instance endpoint: not for clients without the token.
    let r = reqwest::get(format!("http://{switch}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_large_upload_streams_to_the_instance_and_holds_no_memory() {
    let (switch, seen) = switch_with(Limits::default()).await;
    const TOTAL: usize = 32 << 20;
    let mut s = TcpStream::connect(switch).await.unwrap();
    s.write_all(
        format!("POST /s/web/upload HTTP/1.1\r\nHost: web\r\nContent-Length: {TOTAL}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let chunk = vec![7u8; 1 << 20];
    s.write_all(&chunk).await.unwrap();
    // The instance reads the body before the client has sent most of it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the instance saw no byte of the upload while it was sent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = metrics_text(switch).await;
    assert!(
        metrics.contains("vmatrix_switch_request_body_bytes 0\n"),
        "{metrics}"
    );
    for _ in 1..TOTAL / chunk.len() {
        s.write_all(&chunk).await.unwrap();
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).ends_with(&TOTAL.to_string()) {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert_eq!(seen.load(Ordering::SeqCst), TOTAL as u64);
}

#[tokio::test]
async fn small_bodies_held_whole_count_against_the_memory_budget() {
    let (switch, _) = switch_with(Limits {
        body_memory: 64 * 1024,
        ..Limits::default()
    })
    .await;
    // A 40 KiB body, half sent: the switch holds its place in the budget while it waits.
    let mut first = TcpStream::connect(switch).await.unwrap();
    first
        .write_all(b"PUT /s/web/a HTTP/1.1\r\nHost: web\r\nContent-Length: 40960\r\n\r\n")
        .await
        .unwrap();
    first.write_all(&[1u8; 20480]).await.unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let r = client
            .put(format!("http://{switch}/s/web/b"))
            .body(vec![2u8; 40960])
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            break r.text().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "a second 40 KiB body was held too"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(refused.contains("--body-memory"), "{refused}");
    // The first completes and is answered; then the budget is free again.
    first.write_all(&[1u8; 20480]).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let r = client
        .put(format!("http://{switch}/s/web/c"))
        .body(vec![3u8; 40960])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "40960");
}

#[tokio::test]
async fn an_instance_that_does_not_answer_gets_a_504() {
    let (switch, _) = switch_with(Limits {
        backend_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let t = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("http://{switch}/s/web/slow"))
        .body("x")
        .send()
        .await
        .unwrap();
    let took = t.elapsed();
    assert_eq!(r.status(), 504);
    assert!(r.text().await.unwrap().contains("--backend-timeout"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
}
