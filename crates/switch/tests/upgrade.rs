//! The switch passes WebSocket upgrades through: a client's WebSocket to `/s/NAME/` reaches
//! the instance's WebSocket server and messages flow both ways. A stand-in controller serves one
//! route; the backend is a real WebSocket server (tokio-tungstenite).

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// A stand-in controller: one fixed route table; load reports accepted.
async fn controller(backend: SocketAddr) -> SocketAddr {
    let table = serde_json::json!({
        "version": "v1",
        "services": [{
            "service": "ws",
            "priority": 0,
            "backends": [["ws-1", backend.to_string()]],
            "dropped": false
        }]
    })
    .to_string();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let table = table.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let table = table.clone();
                        async move {
                            if req.uri().path() == "/api/v1/routes"
                                && req.uri().query().is_some_and(|q| q.contains("version=v1"))
                            {
                                // A long poll that never changes: hold it a while.
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            }
                            let body = if req.uri().path() == "/api/v1/routes" {
                                table
                            } else {
                                "{}".into()
                            };
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body)),
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

/// A WebSocket server that answers each text message with "echo: " and the message.
async fn backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(Message::Text(t))) = ws.next().await {
                    if ws.send(Message::Text(format!("echo: {t}"))).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    let backend = backend().await;
    let controller = controller(backend).await;
    let listen: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    tokio::spawn(vmatrix_switch::serve(vmatrix_switch::SwitchConfig {
        listen,
        controller: format!("http://{controller}"),
        token: "test".into(),
        hold_timeout: Duration::from_secs(5),
        max_held: 10,
        retry_window: Duration::from_secs(5),
        tls: None,
    }));
    // Until the switch has its routes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut ws = loop {
        match tokio_tungstenite::connect_async(format!("ws://{listen}/s/ws/chat")).await {
            Ok((ws, resp)) => {
                assert_eq!(resp.status(), 101);
                break ws;
            }
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no WebSocket through the switch: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for i in 0..3 {
        ws.send(Message::Text(format!("hello {i}"))).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an answer within 5 s");
        match got {
            Some(Ok(Message::Text(t))) => assert_eq!(t, format!("echo: hello {i}")),
            other => panic!("expected an echo, got {other:?}"),
        }
    }
}
