//! What the switch's component tests share: a stand-in controller with one fixed route, and a
//! switch started in this process.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

/// A stand-in controller: one fixed route table (service `service` on `backend`); load reports
/// accepted.
pub async fn controller(service: &str, backend: SocketAddr) -> SocketAddr {
    let table = serde_json::json!({
        "version": "v1",
        "services": [{
            "service": service,
            "priority": 0,
            "backends": [[format!("{service}-1"), backend.to_string()]],
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

/// The token the switches of these tests hold.
pub const TOKEN: &str = "test";

/// GET the switch's `/metrics` with its token.
pub async fn metrics_request(switch: SocketAddr) -> reqwest::Result<reqwest::Response> {
    reqwest::Client::new()
        .get(format!("http://{switch}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
}

/// Starts a switch with `limits` in front of `service` on `backend` and returns its address
/// once it routes the service.
pub async fn switch(
    service: &str,
    backend: SocketAddr,
    limits: vmatrix_switch::Limits,
) -> SocketAddr {
    let controller = controller(service, backend).await;
    let listen: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    tokio::spawn(vmatrix_switch::serve(vmatrix_switch::SwitchConfig {
        listen,
        controller: format!("http://{controller}"),
        controller_authority: None,
        token: TOKEN.into(),
        read_token: String::new(),
        hold_timeout: Duration::from_secs(5),
        max_held: 10,
        retry_window: Duration::from_secs(5),
        tls: None,
        limits,
    }));
    // Until it knows the service (an unknown one is a 404 naming the known ones).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = metrics_request(listen).await {
            let text = r.text().await.unwrap_or_default();
            if text.contains("vmatrix_switch_client_connections") {
                if let Ok(r) = reqwest::get(format!("http://{listen}/s/{service}/nothing")).await {
                    if r.status() != 404
                        || !r.text().await.unwrap_or_default().contains("no service")
                    {
                        return listen;
                    }
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the switch did not route {service} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
