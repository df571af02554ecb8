//! Machine identity through the real controller and agents over the fake hypervisor: a machine
//! joins once with the join token and reports with its own credential; a forged heartbeat (for
//! another machine, or with the operator's token), a second join of a name, and a report of
//! nonsense are refused and change nothing; the agent's API takes only its credential.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{names_in, wait_for, Matrix, JOIN_TOKEN, TOKEN};
use vmatrix_core::api::{AgentReport, MachineRole};

const WEB: &str = "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\nmin = 1\nmax = 1\n";

/// A report for `name` that says it runs nothing.
fn empty_report(name: &str, vcpus: u32) -> AgentReport {
    AgentReport {
        name: name.into(),
        address: "127.0.0.1:9".into(),
        role: MachineRole::Dedicated,
        vcpus,
        memory_mib: 4096,
        instances: Vec::new(),
        vtep: None,
        seq: u64::MAX / 2,
    }
}

async fn post(m: &Matrix, path: &str, bearer: Option<&str>, report: &AgentReport) -> (u16, String) {
    let mut req = m.http.post(m.url(path)).json(report);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let r = req.send().await.expect("post");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_are_who_their_credentials_say() {
    let mut m = Matrix::new().await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.start_agent("rm2", 3, MachineRole::Dedicated).await;
    m.apply(WEB).await;
    let web = m
        .wait_state("web-1", "running", None, Duration::from_secs(20))
        .await;
    let (victim, other) = if web.machine == "rm1" {
        ("rm1", "rm2")
    } else {
        ("rm2", "rm1")
    };
    let (victim_cred, other_cred) = (m.credential(victim), m.credential(other));
    assert_eq!(victim_cred.len(), 40, "a credential of its own");
    assert_ne!(victim_cred, other_cred);

    // A forged heartbeat that says the victim runs nothing: with the operator's token, with
    // the other machine's credential, with the join token, with none.
    let forged = empty_report(victim, 8);
    for (bearer, status, why) in [
        (Some(TOKEN), 401, "no machine's"),
        (Some(JOIN_TOKEN), 401, "no machine's"),
        (None, 401, "no machine's"),
        (
            Some(other_cred.as_str()),
            403,
            "with the credential of machine",
        ),
    ] {
        let (got, body) = post(&m, "/api/v1/agents/heartbeat", bearer, &forged).await;
        assert_eq!(got, status, "{bearer:?}: {body}");
        assert!(body.contains(why), "{body}");
    }
    // A second agent with the victim's name cannot join, whatever token it has.
    for bearer in [JOIN_TOKEN, TOKEN] {
        let (got, body) = post(&m, "/api/v1/agents/join", Some(bearer), &forged).await;
        assert_eq!(got, 409, "{body}");
        assert!(body.contains("has joined already"), "{body}");
    }
    // A new name needs the join token (or the operator's), and a report that makes sense.
    let (got, _) = post(
        &m,
        "/api/v1/agents/join",
        Some("guess"),
        &empty_report("rm9", 8),
    )
    .await;
    assert_eq!(got, 401);
    let evil = empty_report("../../evil\nname", u32::MAX);
    let (got, body) = post(&m, "/api/v1/agents/join", Some(JOIN_TOKEN), &evil).await;
    assert_eq!(got, 400, "{body}");
    assert!(body.contains("invalid machine name"), "{body}");
    let (got, body) = post(
        &m,
        "/api/v1/agents/join",
        Some(JOIN_TOKEN),
        &empty_report("rm9", u32::MAX),
    )
    .await;
    assert_eq!(got, 400, "{body}");
    assert!(body.contains("vCPUs"), "{body}");
    // Nonsense from a machine that joined is refused too.
    let (got, body) = post(&m, "/api/v1/agents/heartbeat", Some(&other_cred), &evil).await;
    assert_eq!(got, 400, "{body}");
    // A machine that never joined cannot report either.
    let (got, body) = post(
        &m,
        "/api/v1/agents/heartbeat",
        Some(TOKEN),
        &empty_report("rm9", 8),
    )
    .await;
    assert_eq!(got, 401, "{body}");

    // Nothing of it took: only the two real machines, the instance still running where it
    // was after more of its agent's heartbeats, and no machine was declared lost.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let machines: Vec<String> = m
        .machines()
        .await
        .iter()
        .filter_map(|x| x["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(machines, ["rm1", "rm2"]);
    let now = m.instance("web-1").await.expect("web-1");
    assert_eq!(
        (now.machine.as_str(), now.state.as_str(), now.generation),
        (victim, "running", web.generation)
    );
    let events = m.events().await;
    assert!(
        !events
            .iter()
            .any(|e| e["outcome"].as_str().is_some_and(|o| o.contains("lost"))),
        "{events:?}"
    );
    let joins = events.iter().filter(|e| e["what"] == "join").count();
    assert_eq!(joins, 2, "{events:?}");

    // The agent's API takes its machine's credential only.
    let status = format!("http://{}/agent/v1/status", m.agent(victim).config.listen);
    for (bearer, want) in [
        (TOKEN, 401),
        (other_cred.as_str(), 401),
        (victim_cred.as_str(), 200),
    ] {
        let r = m
            .http
            .get(&status)
            .bearer_auth(bearer)
            .send()
            .await
            .expect("status");
        assert_eq!(r.status().as_u16(), want, "{bearer}");
    }

    // A restarted agent reports with the credential it kept: same machine, no new join.
    m.kill_agent(victim);
    m.start_agent(
        victim,
        if victim == "rm1" { 2 } else { 3 },
        MachineRole::Dedicated,
    )
    .await;
    assert_eq!(m.credential(victim), victim_cred);
    wait_for(
        "web-1 running after the restart",
        Duration::from_secs(15),
        async || {
            let i = m.instance("web-1").await?;
            (i.state.as_str() == "running" && i.machine == victim).then_some(())
        },
    )
    .await;
    let joins: Vec<Value> = m
        .events()
        .await
        .into_iter()
        .filter(|e| e["what"] == "join")
        .collect();
    assert_eq!(joins.len(), 2, "{joins:?}");
}

/// The controller's API closes a client that sends half a request head, or nothing, once its
/// head timeout has passed (the agents' API is served the same way, `vmatrix_serve`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_within_the_head_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = Matrix::new().await;
    let started = std::time::Instant::now();
    let mut half = tokio::net::TcpStream::connect(m.api)
        .await
        .expect("connect");
    half.write_all(b"POST /api/v1/agents/heartbeat HTTP/1.1\r\nhost: x\r\ncontent-")
        .await
        .expect("write");
    let mut silent = tokio::net::TcpStream::connect(m.api)
        .await
        .expect("connect");
    let mut buf = [0u8; 256];
    for (what, s) in [("half a head", &mut half), ("nothing", &mut silent)] {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: still open after 10 s"))
            .unwrap_or(0);
        assert_eq!(n, 0, "{what}: closed without an answer");
    }
    let waited = started.elapsed();
    assert!(
        waited >= support::API_HEADER_TIMEOUT - Duration::from_millis(100)
            && waited < support::API_HEADER_TIMEOUT + Duration::from_secs(3),
        "closed after {waited:?}"
    );
    // The API still answers whole requests.
    assert!(m.machines().await.is_empty());
}

/// Without --auto-approve a new name waits (listed as pending) until an operator approves it;
/// forgetting a machine takes its credential back, and it must be approved again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_machine_joins_once_an_operator_approves_it() {
    let mut m = Matrix::new().await;
    m.auto_approve = false;
    m.kill_controller();
    m.start_controller().await;
    let asks = empty_report("rm7", 8);
    let (got, body) = post(&m, "/api/v1/agents/join", Some(JOIN_TOKEN), &asks).await;
    assert_eq!(got, 403, "{body}");
    assert!(body.contains("waits for an operator's approval"), "{body}");
    let listed: Value = m
        .http
        .get(m.url("/api/v1/machines"))
        .send()
        .await
        .expect("machines")
        .json()
        .await
        .expect("json");
    assert_eq!(listed["pending"][0]["name"], "rm7", "{listed}");
    assert_eq!(listed["pending"][0]["address"], "127.0.0.1:9", "{listed}");

    // Approving is the operator's: not with the join token, nor without a token.
    let approve = m.url("/api/v1/machines/rm7/approve");
    let r = reqwest::Client::new()
        .post(&approve)
        .bearer_auth(JOIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = m
        .http
        .post(&approve)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = m
        .http
        .post(m.url("/api/v1/machines/..%2Fx/approve"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let (got, body) = post(&m, "/api/v1/agents/join", Some(JOIN_TOKEN), &asks).await;
    assert_eq!(got, 200, "{body}");
    let credential = serde_json::from_str::<Value>(&body).unwrap()["credential"]
        .as_str()
        .unwrap()
        .to_owned();
    let (got, body) = post(&m, "/api/v1/agents/heartbeat", Some(&credential), &asks).await;
    assert_eq!(got, 200, "{body}");

    // Forgotten: its credential is refused, and joining again needs a new approval.
    let r = m
        .http
        .post(m.url("/api/v1/machines/rm7/forget"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (got, _) = post(&m, "/api/v1/agents/heartbeat", Some(&credential), &asks).await;
    assert_eq!(got, 401);
    let (got, _) = post(&m, "/api/v1/agents/join", Some(JOIN_TOKEN), &asks).await;
    assert_eq!(got, 403);

    // A real agent whose name was approved beforehand joins at once.
    let r = m
        .http
        .post(m.url("/api/v1/machines/rm1/approve"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    let events = m.events().await;
    for what in ["approve rm7", "forget rm7", "approve rm1"] {
        assert!(
            events.iter().any(|e| e["what"] == what),
            "{what}: {events:?}"
        );
    }
}

/// Each token does what its scope allows and no more: the read-only token reads (not the
/// console) and changes nothing, the switch's reads the route table and reports load, the join
/// token and a made-up one do nothing; the operator's does everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_does_what_its_scope_allows() {
    use support::{READ_TOKEN, SWITCH_TOKEN};
    let mut m = Matrix::new().await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.apply(WEB).await;
    m.wait_state("web-1", "running", None, Duration::from_secs(20))
        .await;
    // A client of its own: the matrix's carries the operator's token.
    let http = reqwest::Client::new();
    let call = async |method: &str, path: &str, bearer: Option<&str>, body: &str| -> u16 {
        let url = m.url(path);
        let mut req = match method {
            "GET" => http.get(url),
            _ => http
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_owned()),
        };
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        req.send().await.expect("call").status().as_u16()
    };
    let stop_web = r#"{"op":"suspend","instance":"web-1"}"#;
    let load = r#"{"services":{}}"#;
    let cases: Vec<(&str, &str, Option<&str>, &str, u16)> = vec![
        ("GET", "/api/v1/instances", Some(READ_TOKEN), "", 200),
        ("GET", "/api/v1/events", Some(READ_TOKEN), "", 200),
        ("GET", "/metrics", Some(READ_TOKEN), "", 200),
        ("GET", "/api/v1/routes", Some(READ_TOKEN), "", 200),
        (
            "GET",
            "/api/v1/instances/web-1/console",
            Some(READ_TOKEN),
            "",
            403,
        ),
        (
            "POST",
            "/api/v1/operations",
            Some(READ_TOKEN),
            stop_web,
            403,
        ),
        (
            "POST",
            "/api/v1/services",
            Some(READ_TOKEN),
            r#"{"services":[]}"#,
            403,
        ),
        ("GET", "/api/v1/routes", Some(SWITCH_TOKEN), "", 200),
        ("GET", "/api/v1/instances", Some(SWITCH_TOKEN), "", 403),
        (
            "POST",
            "/api/v1/operations",
            Some(SWITCH_TOKEN),
            stop_web,
            403,
        ),
        ("GET", "/api/v1/instances", Some(JOIN_TOKEN), "", 401),
        ("GET", "/api/v1/instances", Some("made-up"), "", 401),
        ("GET", "/api/v1/instances", None, "", 401),
        ("GET", "/api/v1/instances", Some(TOKEN), "", 200),
    ];
    for (method, path, bearer, body, want) in cases {
        let got = call(method, path, bearer, body).await;
        assert_eq!(got, want, "{method} {path} with {bearer:?}");
    }
    // The switch reports load with its token.
    assert_eq!(
        call("POST", "/api/v1/load", Some(SWITCH_TOKEN), load).await,
        200
    );
    // Nothing the refused calls asked for happened.
    let web = m
        .wait_state("web-1", "running", None, Duration::from_secs(5))
        .await;
    assert_eq!(web.id.as_str(), "web-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machines_certificate_names_the_machine_its_credential_belongs_to() {
    let mut m = Matrix::new().await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.start_agent("rm2", 2, MachineRole::Dedicated).await;
    // Each agent asked for its certificate when it joined, and keeps it with the authority's,
    // under the names QEMU reads; the key never left the machine.
    let mut authority = None;
    for name in ["rm1", "rm2"] {
        let dir = m.dir.path().join("agents").join(name).join("tls");
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{name}: {f}: {e}"))
        };
        assert_eq!(
            names_in(&read("server-cert.pem")),
            (name.into(), vec![name.into()])
        );
        assert_eq!(read("server-cert.pem"), read("client-cert.pem"));
        assert!(read("server-key.pem").contains("PRIVATE KEY"));
        let ca = read("ca-cert.pem");
        assert_eq!(*authority.get_or_insert(ca.clone()), ca, "one authority");
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |p: std::path::PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.clone()), 0o700);
        assert_eq!(mode(dir.join("server-key.pem")), 0o600);
    }

    // rm2's credential with a request that names rm1: the certificate names rm2.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["rm1".to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, "rm1");
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let ask = |bearer: Option<String>, csr: String| {
        let mut req = m
            .http
            .post(m.url("/api/v1/agents/certificate"))
            .json(&serde_json::json!({ "csr": csr }));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        async move {
            let r = req.send().await.expect("post");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    let (status, body) = ask(Some(m.credential("rm2")), csr.clone()).await;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        names_in(reply["certificate"].as_str().unwrap()),
        ("rm2".into(), vec!["rm2".into()])
    );
    // No machine's credential (none, the operator's token, the join token): refused.
    for bearer in [None, Some(TOKEN.to_string()), Some(JOIN_TOKEN.to_string())] {
        let (status, body) = ask(bearer.clone(), csr.clone()).await;
        assert_eq!(status, 401, "{bearer:?}: {body}");
    }
    // A join without the join token is refused before its body is read (401, not 400).
    let r = reqwest::Client::new()
        .post(m.url("/api/v1/agents/join"))
        .body("not a report")
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    assert_eq!(status, 401, "{}", r.text().await.unwrap_or_default());
    // Not a signed request.
    let (status, body) = ask(
        Some(m.credential("rm1")),
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("PKCS#10"), "{body}");
}
