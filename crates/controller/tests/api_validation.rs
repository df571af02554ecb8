//! The server validates: `POST /api/v1/services` refuses an invalid spec with a 400 that names
//! the service and the field, and stores nothing — the same rules as `vmatrix apply -f`.

use serde_json::{json, Value};
use vmatrix_controller::{router, Controller, Db};

const TOKEN: &str = "test-token";

/// A controller on an empty state, its API served on 127.0.0.1 (no reconcile loop: nothing
/// here needs an agent).
async fn serve(dir: &std::path::Path) -> String {
    let db = Db::open(&dir.join("state.db")).expect("state opens");
    let controller = Controller::new(db, TOKEN.into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router(controller, TOKEN.to_owned()))
            .await
            .expect("API serves");
    });
    format!("http://{addr}/api/v1/services")
}

fn spec(name: &str) -> Value {
    json!({
        "name": name, "image": "guest:v1", "priority": 1, "min": 1, "max": 2,
        "capacity_rps": 50.0, "vcpus": 1, "memory_mib": 256, "port": 80, "health": "/health",
    })
}

fn with(name: &str, field: &str, value: Value) -> Value {
    let mut s = spec(name);
    s[field] = value;
    s
}

async fn post(client: &reqwest::Client, url: &str, body: String) -> (u16, Value) {
    let resp = client
        .post(url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("API answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

async fn stored(client: &reqwest::Client, url: &str) -> Value {
    let body: Value = client
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("API answers")
        .json()
        .await
        .expect("a JSON body");
    body["services"].clone()
}

#[tokio::test]
async fn invalid_specs_are_refused_with_400_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let url = serve(dir.path()).await;
    let client = reqwest::Client::new();

    // One good apply succeeds and is what is stored from then on.
    let good = json!({ "services": [spec("db"), spec("web")] });
    let (status, body) = post(&client, &url, good.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let before = stored(&client, &url).await;
    assert_eq!(before.as_array().map(Vec::len), Some(2), "{before}");
    assert_eq!(before[0]["name"], "db");
    assert_eq!(before[1]["name"], "web");

    let mut min_above_max = spec("web");
    min_above_max["min"] = json!(3);
    min_above_max["max"] = json!(2);
    let cases: Vec<(&str, Vec<Value>, &str)> = vec![
        (
            "min > max",
            vec![spec("db"), min_above_max],
            "service web: min (3) is above max (2)",
        ),
        (
            "0 vCPUs",
            vec![spec("db"), with("web", "vcpus", json!(0))],
            "service web: vcpus must be 1-64 (got 0)",
        ),
        (
            "0 memory",
            vec![spec("db"), with("web", "memory_mib", json!(0))],
            "service web: memory_mib must be 64-1048576 (got 0)",
        ),
        (
            "u32::MAX memory",
            vec![
                spec("db"),
                with("web", "memory_mib", json!(4_294_967_295u32)),
            ],
            "service web: memory_mib must be 64-1048576 (got 4294967295)",
        ),
        (
            "port 0",
            vec![spec("db"), with("web", "port", json!(0))],
            "service web: port must be 1-65535 (got 0)",
        ),
        (
            "CRLF in health",
            vec![spec("db"), with("web", "health", json!("/h\r\nX: y"))],
            "service web: health must be",
        ),
        (
            "duplicate name",
            vec![spec("db"), spec("web"), spec("web")],
            "service web: name must be unique",
        ),
    ];
    for (what, services, expected) in cases {
        let (status, body) = post(&client, &url, json!({ "services": services }).to_string()).await;
        assert_eq!(status, 400, "{what}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{what}: {error}");
        assert_eq!(
            stored(&client, &url).await,
            before,
            "{what} stored something"
        );
    }

    // A body that does not deserialize is a 400 too.
    for (what, body) in [
        ("not JSON", "{".to_owned()),
        (
            "unknown field",
            json!({ "services": [with("web", "vcpu", json!(1))] }).to_string(),
        ),
        (
            "memory beyond u32",
            json!({ "services": [with("web", "memory_mib", json!(4_294_967_296u64))] }).to_string(),
        ),
        ("bad name", json!({ "services": [spec("Web")] }).to_string()),
    ] {
        let (status, body) = post(&client, &url, body).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .starts_with("bad request body"),
            "{what}: {body}"
        );
        assert_eq!(
            stored(&client, &url).await,
            before,
            "{what} stored something"
        );
    }

    // And a good apply still replaces the set.
    let (status, body) = post(
        &client,
        &url,
        json!({ "services": [spec("web")] }).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let after = stored(&client, &url).await;
    assert_eq!(after.as_array().map(Vec::len), Some(1), "{after}");
    assert_eq!(after[0]["name"], "web");
}
