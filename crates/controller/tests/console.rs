//! Console sessions through the real controller and agent over the fake hypervisor (whose
//! guests answer on a console socket like QEMU's): the token is needed, several readers see the
//! same output, one writes, a late session gets the scroll-back, and a session ends with a
//! reason when its VM goes. With a real guest: crates/cli/tests/e2e/lifecycle.rs.

mod support;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use support::{Matrix, TOKEN};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use vmatrix_core::api::{ConsoleHello, MachineRole, Operation};
use vmatrix_core::InstanceId;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(m: &Matrix, id: &str, write: bool, token: Option<&str>) -> Result<Socket, u16> {
    let url = m
        .url(&format!("/api/v1/instances/{id}/console?write={write}"))
        .replacen("http", "ws", 1);
    let mut req = url.into_client_request().expect("request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((s, _)) => Ok(s),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("console: {e}"),
    }
}

async fn hello(s: &mut Socket) -> ConsoleHello {
    match s.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t).expect("hello"),
        other => panic!("no hello: {other:?}"),
    }
}

/// Reads output until it contains `want` (5 s at most); returns all of it.
async fn read_until(s: &mut Socket, want: &str) -> String {
    let mut got = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !got.contains(want) {
        match tokio::time::timeout_at(deadline, s.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => got.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("waiting for {want:?} after {got:?}: {other:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_share_a_console_one_writes_and_a_late_one_gets_the_scrollback() {
    let mut m = Matrix::new().await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.apply("[[service]]\nname = \"web\"\nimage = \"guest:v1\"\nmin = 1\n")
        .await;
    m.wait_state("web-1", "running", Some("rm1"), Duration::from_secs(20))
        .await;

    assert_eq!(open(&m, "web-1", true, None).await.err(), Some(401));
    assert_eq!(
        open(&m, "web-1", true, Some("wrong")).await.err(),
        Some(401)
    );
    assert_eq!(open(&m, "web-9", true, Some(TOKEN)).await.err(), Some(404));

    let mut a = open(&m, "web-1", true, Some(TOKEN)).await.expect("a");
    let ha = hello(&mut a).await;
    assert!(ha.writer, "{ha:?}");
    assert_eq!(ha.machine, "rm1");
    read_until(&mut a, "web-1 login").await;
    let mut b = open(&m, "web-1", true, Some(TOKEN)).await.expect("b");
    assert!(!hello(&mut b).await.writer, "one writer at a time");

    a.send(Message::Binary(b"echo one\n".to_vec()))
        .await
        .expect("send");
    read_until(&mut a, "echo one").await;
    read_until(&mut b, "echo one").await;
    // The reader's keys go nowhere, and it is told so.
    b.send(Message::Binary(b"rm -rf /\n".to_vec()))
        .await
        .expect("send");
    read_until(&mut b, "read-only").await;
    a.send(Message::Binary(b"echo two\n".to_vec()))
        .await
        .expect("send");
    let seen = read_until(&mut a, "echo two").await;
    assert!(!seen.contains("rm -rf"), "{seen}");

    // The writer leaves; a new session writes and gets what was printed before it came.
    a.close(None).await.expect("close");
    drop(a);
    let mut c = loop {
        let mut c = open(&m, "web-1", true, Some(TOKEN)).await.expect("c");
        if hello(&mut c).await.writer {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let back = read_until(&mut c, "echo two").await;
    assert!(
        back.contains("web-1 login") && back.contains("echo one"),
        "{back}"
    );

    // The VM goes: its sessions end with a reason.
    m.done(Operation::Discard {
        instance: InstanceId::new("web-1").expect("id"),
    })
    .await;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match c.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| f.reason.into_owned()),
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    })
    .await
    .expect("the session ends");
    assert!(
        end.as_deref().is_some_and(|r| r.contains("closed")),
        "{end:?}"
    );
    let events = m.events().await;
    assert!(
        events
            .iter()
            .any(|e| e["what"] == "console web-1 on rm1" && e["outcome"] == "attached"),
        "{events:#?}"
    );
}
