//! The agent's HTTP surface (for the controller only) and its heartbeat to the controller.
//! Transports only parse: bytes become an [`AgentCommand`] here and nothing else.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use vmatrix_core::api::{AgentCommand, ErrorBody};

use crate::machine::{Agent, AgentError};

#[derive(Clone)]
struct Ctx {
    agent: Arc<Agent>,
    token: Arc<String>,
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t == token)
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(ErrorBody { error: msg })).into_response()
}

async fn command(State(ctx): State<Ctx>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if !authorized(&headers, &ctx.token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        );
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
    match ctx.agent.handle(cmd).await {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => {
            let status = match e {
                AgentError::Stale { .. } | AgentError::Busy { .. } => StatusCode::CONFLICT,
                AgentError::Unknown(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            tracing::warn!(machine = %ctx.agent.config.name, "command failed: {e}");
            error(status, e.to_string())
        }
    }
}

async fn status(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &ctx.token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        );
    }
    Json(ctx.agent.report().await).into_response()
}

/// Serves the agent API on its listen address and sends heartbeats to `controller` until the
/// process ends.
pub async fn serve(agent: Arc<Agent>, controller: String, token: String) -> std::io::Result<()> {
    let ctx = Ctx {
        agent: agent.clone(),
        token: Arc::new(token.clone()),
    };
    let app = Router::new()
        .route("/agent/v1/command", post(command))
        .route("/agent/v1/status", get(status))
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(ctx);
    let listener = tokio::net::TcpListener::bind(agent.config.listen).await?;
    tracing::info!(machine = %agent.config.name, "agent listening on {}", agent.config.listen);
    tokio::spawn(heartbeat(agent, controller, token));
    axum::serve(listener, app).await
}

async fn heartbeat(agent: Arc<Agent>, controller: String, token: String) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("a plain HTTP client builds");
    let url = format!(
        "{}/api/v1/agents/heartbeat",
        controller.trim_end_matches('/')
    );
    let mut warned = false;
    loop {
        let report = agent.report().await;
        match client
            .post(&url)
            .bearer_auth(&token)
            .json(&report)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => warned = false,
            Ok(r) if !warned => {
                tracing::warn!("controller refused the heartbeat: {}", r.status());
                warned = true;
            }
            Err(e) if !warned => {
                tracing::warn!("controller {controller} unreachable: {e}");
                warned = true;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
