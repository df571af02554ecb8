//! The switch passes WebSocket upgrades through: a client's WebSocket to `/s/NAME/` reaches
//! the instance's WebSocket server and messages flow both ways. A stand-in controller serves one
//! route; the backend is a real WebSocket server (tokio-tungstenite).

use std::net::SocketAddr;
use std::time::Duration;

mod support;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

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
    let listen = support::switch("ws", backend, vmatrix_switch::Limits::default()).await;
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
