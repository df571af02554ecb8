//! The agent's HTTP surface (for the controller only) and its heartbeat to the controller.
//! Transports only parse: bytes become an [`AgentCommand`] here and nothing else.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use vmatrix_core::api::{AgentCommand, ErrorBody};

use vmatrix_client::{ClientError, ControllerClient};

use crate::identity::Identity;
use crate::machine::{Agent, FailureKind};

#[derive(Clone)]
struct Ctx {
    agent: Arc<Agent>,
    identity: Arc<Identity>,
}

/// Whether a call carries the machine's credential (only the controller has it).
fn authorized(headers: &HeaderMap, identity: &Identity) -> bool {
    identity.matches(headers.get("authorization").and_then(|v| v.to_str().ok()))
}

const UNAUTHORIZED: &str =
    "missing or wrong bearer token: the agent's API takes only its machine's credential";

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(ErrorBody { error: msg })).into_response()
}

async fn command(State(ctx): State<Ctx>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if !authorized(&headers, &ctx.identity) {
        return error(StatusCode::UNAUTHORIZED, UNAUTHORIZED.into());
    }
    let cmd: AgentCommand = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("not an agent command: {e}"),
            )
        }
    };
    tracing::info!(machine = %ctx.agent.config.name, ?cmd, "command");
    // The command runs as the agent's own task: if the controller hangs up, it goes on.
    match ctx.agent.handle(cmd).await {
        Ok(reply) => Json(vmatrix_core::api::CommandReply {
            seq: ctx.agent.current_seq(),
            reply,
        })
        .into_response(),
        Err(e) => {
            let status = match e.kind {
                FailureKind::Stale | FailureKind::Busy => StatusCode::CONFLICT,
                FailureKind::Unknown => StatusCode::NOT_FOUND,
                FailureKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            };
            tracing::warn!(machine = %ctx.agent.config.name, "command failed: {e}");
            error(status, e.message)
        }
    }
}

#[derive(serde::Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    write: bool,
}

/// `GET /agent/v1/console/{id}?write=true`: a console session over WebSocket.
async fn console(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    if !authorized(&headers, &ctx.identity) {
        return error(StatusCode::UNAUTHORIZED, UNAUTHORIZED.into());
    }
    let Ok(id) = vmatrix_core::InstanceId::new(id) else {
        return error(StatusCode::BAD_REQUEST, "not an instance id".into());
    };
    match ctx.agent.attach_console(&id, q.write) {
        Ok((attached, hello)) => {
            tracing::info!(machine = %ctx.agent.config.name, instance = %id, writer = hello.writer, "console attached");
            ws.on_upgrade(move |socket| crate::console::session(socket, attached, hello))
        }
        Err(e @ crate::console::ConsoleRefusal::Unknown(_)) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

async fn status(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &ctx.identity) {
        return error(StatusCode::UNAUTHORIZED, UNAUTHORIZED.into());
    }
    // The controller probes a machine whose heartbeats stopped and counts it heard once it
    // answers: the lease runs from now (before the answer it records).
    ctx.agent.renew_lease(crate::lease::boottime_ms());
    Json(ctx.agent.report()).into_response()
}

/// `GET /metrics`: the machine's use, per instance, and its commands' durations (with the
/// machine's credential, as every call to the agent).
async fn metrics(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &ctx.identity) {
        return error(StatusCode::UNAUTHORIZED, UNAUTHORIZED.into());
    }
    (
        [("content-type", vmatrix_core::metrics::CONTENT_TYPE)],
        ctx.agent.metrics_text(),
    )
        .into_response()
}

/// How the agent reaches the controller: its URL (several, comma-separated, for controllers
/// in high availability) and, for `https://`, the authority whose certificate the
/// controller's must come from (the controller's `DATA/controller/tls/ca-cert.pem`). Over
/// HTTPS the agent's own API serves HTTPS too, with the machine's certificate, to the
/// controller alone.
#[derive(Debug, Clone)]
pub struct ControllerLink {
    url: String,
    authority: Option<String>,
}

impl ControllerLink {
    /// Checks that an `https` URL comes with an authority, and that the authority is one.
    pub fn new(url: &str, authority: Option<String>) -> std::io::Result<Self> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        let https = url.split(',').any(|u| u.trim().starts_with("https://"));
        match &authority {
            None if https => {
                return Err(bad(format!(
                    "the controller is at {url}: give its authority's certificate with --ca \
                     FILE (its DATA/controller/tls/ca-cert.pem)"
                )))
            }
            Some(_) if url.split(',').any(|u| u.trim().starts_with("http://")) => {
                return Err(bad(format!(
                    "--ca is given but the controller is at {url}: use its https:// URL"
                )))
            }
            Some(a) => {
                ControllerClient::trusting(url, None, Some(a))
                    .map_err(|e| bad(format!("--ca: {e}")))?;
            }
            None => {}
        }
        Ok(Self {
            url: url.to_owned(),
            authority,
        })
    }

    /// The controller's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the control plane runs over TLS.
    pub fn secure(&self) -> bool {
        self.authority.is_some()
    }

    /// A client of the controller carrying `token`.
    pub(crate) fn client(&self, token: String) -> ControllerClient {
        self.client_as(token, None)
    }

    /// A client of the controller carrying `token`, presenting the machine's certificate
    /// (kept in `data`, where there is one) over TLS.
    pub(crate) fn machine_client(&self, token: String, data: &std::path::Path) -> ControllerClient {
        let dir = data.join("tls");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        match (read("client-cert.pem"), read("client-key.pem")) {
            (Some(c), Some(k)) if self.secure() => self.client_as(token, Some((&c, &k))),
            _ => self.client(token),
        }
    }

    fn client_as(&self, token: String, identity: Option<(&str, &str)>) -> ControllerClient {
        match ControllerClient::trusting_as(
            &self.url,
            Some(token.clone()),
            self.authority.as_deref(),
            identity,
        ) {
            Ok(c) => c,
            // Checked in `new`: not reached.
            Err(e) => {
                tracing::error!("a client of the controller: {e}");
                ControllerClient::new(&self.url, Some(token))
            }
        }
    }
}

/// Asks the controller for the machine's certificate (for its QEMUs' migration data path and,
/// over HTTPS, its API). Without one, this machine's migrations travel in the clear and a
/// destination that has one refuses them: said, not fatal — unless the control plane runs over
/// TLS and no certificate is kept either (the agent's API cannot serve then).
async fn certify(agent: &Agent, link: &ControllerLink, identity: &Identity) -> std::io::Result<()> {
    let client = link.client(identity.current());
    let name = agent.config.name.as_str();
    match crate::certificate::obtain(&client, &agent.config.data).await {
        Ok(()) => {
            tracing::info!(
                "machine {name} has its certificate: live migrations to and from it go over TLS"
            );
            Ok(())
        }
        Err(e) if link.secure() && crate::certificate::kept(&agent.config.data, name).is_none() => {
            Err(std::io::Error::other(format!(
                "{e}: the agent's API serves HTTPS with the machine's certificate and there is none"
            )))
        }
        Err(e) => {
            tracing::warn!(
                "{e}; live migrations to and from machine {name} go in the clear (or with the \
                 certificate kept) until the agent starts again"
            );
            Ok(())
        }
    }
}

/// Joins the controller (once: the credential is kept in the data directory), adopts the VMs
/// a previous agent process left, then serves the agent API on its listen address and sends
/// heartbeats to `controller` until the process ends. `join_token` is used only to join.
pub async fn serve(
    agent: Arc<Agent>,
    link: ControllerLink,
    join_token: String,
) -> std::io::Result<()> {
    // The address first: an agent that cannot serve must not touch the VMs it would adopt.
    let listener = bind_when_there(agent.config.listen).await?;
    let identity = Arc::new(Identity::load(&agent.config.data, &link, join_token));
    // A name that has joined already (another agent runs with it) ends this one here.
    let joins = identity.current().is_empty();
    identity.ensure(|| agent.report()).await?;
    // Over TLS at every start: the certificate also serves the API, and the authority may
    // have been replaced.
    let name = agent.config.name.as_str();
    if joins || link.secure() || crate::certificate::kept(&agent.config.data, name).is_none() {
        certify(&agent, &link, &identity).await?;
    }
    let tls = match crate::certificate::kept(&agent.config.data, name) {
        Some(kept) if link.secure() => {
            Some(crate::certificate::api_server(&kept).map_err(std::io::Error::other)?)
        }
        _ => None,
    };
    let ctx = Ctx {
        agent: agent.clone(),
        identity: identity.clone(),
    };
    let app = Router::new()
        .route("/agent/v1/command", post(command))
        .route("/agent/v1/status", get(status))
        .route("/agent/v1/console/:id", get(console))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(ctx);
    tracing::info!(machine = %agent.config.name, "agent listening on {}", agent.config.listen);
    // It answers at once (a controller probing a machine whose heartbeats paused sees it is
    // alive); commands wait until the VMs a previous process left are adopted, and heartbeats
    // start only then (a report without them would make the controller think them lost).
    let limits = vmatrix_serve::ApiLimits::default();
    let server = tokio::spawn(vmatrix_serve::serve_api(listener, app, limits, tls));
    let adopted = crate::record::adopt_left(&agent).await;
    if adopted > 0 {
        tracing::info!(machine = %agent.config.name, "adopted {adopted} VM(s)");
    }
    tokio::spawn(heartbeat(agent, link, identity));
    server
        .await
        .map_err(|e| std::io::Error::other(format!("the agent API task ended: {e}")))?
}

/// Binds `addr`, waiting up to 30 s for the address to appear (a machine whose network is
/// being set up as its agent starts, as `vmatrix up` does with each machine's namespace).
async fn bind_when_there(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrNotAvailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

async fn heartbeat(agent: Arc<Agent>, link: ControllerLink, identity: Arc<Identity>) {
    let controller = link.url().to_owned();
    let data = agent.config.data.clone();
    let mut client = link.machine_client(identity.current(), &data);
    let mut warned = false;
    let mut beats = 0u64;
    loop {
        let beat = tokio::time::Instant::now();
        beats += 1;
        if beats.is_multiple_of(30) {
            // Groups of VMs that ended unseen (a QEMU that died while its agent was down).
            agent.hv.sweep_groups(Duration::from_secs(30));
        }
        // The controller records the heartbeat when it arrives, later than this.
        let sent_at = crate::lease::boottime_ms();
        let report = agent.report();
        match client.heartbeat(&report).await {
            Ok(reply) => {
                warned = false;
                agent.renew_lease(sent_at);
                agent.unfence_placed(&reply.placed);
                if let Some(view) = reply.network {
                    let agent = agent.clone();
                    // A few `bridge` calls when the hosts change; never on the beat's clock.
                    tokio::task::spawn_blocking(move || agent.apply_network(&view));
                }
            }
            // The controller does not know this machine (its state was lost): join again.
            Err(ClientError::Refused { status: 401, .. }) => match identity.join(&report).await {
                Ok(()) => {
                    tracing::info!("joined the controller again as {}", report.name);
                    if let Err(e) = certify(&agent, &link, &identity).await {
                        tracing::warn!("{e}");
                    }
                    client = link.machine_client(identity.current(), &data);
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!("joining {controller} again: {e}");
                        warned = true;
                    }
                }
            },
            // Said once until it works again (rate-limited by its own state).
            Err(e) if !warned => {
                tracing::warn!("heartbeat to {controller}: {e}");
                warned = true;
            }
            Err(_) => {}
        }
        // A fixed period from the start of each beat, whatever the controller's latency.
        tokio::time::sleep_until(beat + Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::ControllerLink;

    fn authority() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn an_https_controller_needs_an_authority_and_only_it_does() {
        let e = ControllerLink::new("https://10.0.0.1:7070", None).unwrap_err();
        assert!(e.to_string().contains("--ca"), "{e}");
        let e = ControllerLink::new("http://10.0.0.1:7070", Some(authority())).unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        let e = ControllerLink::new("https://10.0.0.1:7070", Some("not PEM".into())).unwrap_err();
        assert!(e.to_string().contains("--ca"), "{e}");
        let link = ControllerLink::new("https://a:1,https://b:1", Some(authority())).unwrap();
        assert!(link.secure());
        assert!(!ControllerLink::new("http://a:1", None).unwrap().secure());
    }
}
