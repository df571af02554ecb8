//! The REST API under `/api/v1/`, `/openapi.json` and `/metrics`. Transports only parse: each
//! handler turns the request into a call on the [`Controller`]. Every route needs a bearer
//! token — reads too: the instance list names every endpoint, which would let a client go
//! around the switch's drop and admission — but `/api/v1/health` (liveness) and
//! `/openapi.json` (the API's description). Tokens have scopes ([`Tokens`]): the operator's may
//! do everything, the read-only token only read, the switch's only what a switch does.

// Handlers' helpers return `Result<_, Response>`: a response is the natural error of a handler,
// and boxing it would only add noise to every call site.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use vmatrix_core::api::{
    AgentReport, ApplyRequest, DropOwner, ErrorBody, EventsReply, MachineView, MachinesReply,
    Operation, ServicesReply,
};

use crate::control::{ControlError, Controller};
use crate::ops::OpView;

#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) c: Arc<Controller>,
    tokens: Arc<Tokens>,
}

/// The API's bearer tokens, one per scope; an empty one is none.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// Everything.
    pub operator: String,
    /// Reads only (GET), not the console: dashboards, monitoring, scripts.
    pub read: String,
    /// A switch's: the route table and load reports.
    pub switch: String,
}

impl From<String> for Tokens {
    /// The operator's token alone.
    fn from(operator: String) -> Self {
        Self {
            operator,
            ..Self::default()
        }
    }
}

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Operator,
    Read,
    Switch,
}

impl Tokens {
    /// The scope of the bearer in `authorization`, if it is one of these tokens (each compared
    /// in constant time).
    fn scope(&self, authorization: Option<&str>) -> Option<Scope> {
        let matches = |t: &str| vmatrix_core::auth::bearer_matches(authorization, t);
        // All three compared, whichever matches: the time taken says nothing about which.
        let (o, r, s) = (
            matches(&self.operator),
            matches(&self.read),
            matches(&self.switch),
        );
        if o {
            Some(Scope::Operator)
        } else if r {
            Some(Scope::Read)
        } else if s {
            Some(Scope::Switch)
        } else {
            None
        }
    }
}

impl Scope {
    /// Whether this scope may call `method` on `path`; the reason if not.
    fn allows(self, method: &axum::http::Method, path: &str) -> Result<(), &'static str> {
        use axum::http::Method;
        match self {
            Scope::Operator => Ok(()),
            // The console types into a guest: not a read.
            Scope::Read if *method == Method::GET && !path.ends_with("/console") => Ok(()),
            Scope::Read => Err(
                "the read-only token may only read (GET, not the console); use the operator's \
                 token (DATA/controller/token)",
            ),
            // Operations: a wake only (checked on the operation itself).
            Scope::Switch
                if (*method == Method::GET && path == "/api/v1/routes")
                    || (*method == Method::POST && path == "/api/v1/load")
                    || (*method == Method::POST && path == "/api/v1/operations") =>
            {
                Ok(())
            }
            Scope::Switch => Err(
                "the switch's token may only read the route table, report load and wake a \
                 service; use the operator's token (DATA/controller/token)",
            ),
        }
    }
}

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: msg.into() })).into_response()
}

/// Lets a request through to its route only with a bearer token whose scope allows it.
async fn require_token(
    State(x): State<Ctx>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let Some(scope) = x.tokens.scope(authorization) else {
        return err(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: pass --api/VMATRIX_TOKEN, or run the CLI on the controller's machine (it reads DATA/controller/token)",
        );
    };
    match scope.allows(req.method(), req.uri().path()) {
        Ok(()) => {
            let mut req = req;
            req.extensions_mut().insert(scope);
            next.run(req).await
        }
        Err(why) => err(StatusCode::FORBIDDEN, why),
    }
}

fn fail(e: ControlError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    err(status, e.to_string())
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body)
        .map_err(|e| err(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

/// The services as applied, and beside them which are dropped and by whom.
pub(crate) fn services_reply(c: &Controller) -> Result<ServicesReply, ControlError> {
    let (services, dropped) = (c.services()?, c.dropped()?);
    Ok(ServicesReply {
        services,
        dropped: dropped
            .into_iter()
            .map(|(name, by_policy)| {
                let who = if by_policy {
                    DropOwner::Policy
                } else {
                    DropOwner::Operator
                };
                (name, who)
            })
            .collect(),
    })
}

async fn services(State(x): State<Ctx>) -> Response {
    match services_reply(&x.c) {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => fail(e),
    }
}

async fn apply(State(x): State<Ctx>, body: axum::body::Bytes) -> Response {
    let req: ApplyRequest = match parse(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    // The same rules as the CLI's: an invalid set is refused whole, before anything is stored.
    if let Err(e) = vmatrix_core::validate_services(&req.services) {
        return err(StatusCode::BAD_REQUEST, e.to_string());
    }
    match x.c.apply_and_roll(req.services) {
        Ok(rollouts) => Json(vmatrix_core::api::ApplyReply {
            applied: true,
            rollouts,
        })
        .into_response(),
        Err(e) => fail(e),
    }
}

/// Every machine with how it is used, and the machines waiting for approval.
pub(crate) fn machines_reply(c: &Controller) -> Result<MachinesReply, ControlError> {
    let (list, pending) = (c.machine_use()?, c.pending()?);
    Ok(MachinesReply {
        pending,
        machines: list
            .into_iter()
            .map(|(machine, instances)| MachineView {
                free: is_free(&machine, instances),
                cpu_load: c.cpu_load(&machine.name),
                machine,
                instances,
            })
            .collect(),
    })
}

async fn machines(State(x): State<Ctx>) -> Response {
    match machines_reply(&x.c) {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => fail(e),
    }
}

/// `POST /api/v1/machines/{name}/approve`: the operator lets that name join.
async fn approve(
    State(x): State<Ctx>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    match x.c.approve(&name) {
        Ok(()) => Json(serde_json::json!({ "approved": name })).into_response(),
        Err(e) => fail(e),
    }
}

/// `POST /api/v1/machines/{name}/forget`: the operator takes its credential and approval back.
async fn forget(
    State(x): State<Ctx>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    match x.c.forget(&name) {
        Ok(()) => Json(serde_json::json!({ "forgotten": name })).into_response(),
        Err(e) => fail(e),
    }
}

/// Up, dedicated and running nothing: the policy emptied it, it can be powered down.
fn is_free(m: &vmatrix_core::api::MachineInfo, instances: usize) -> bool {
    m.state == vmatrix_core::api::MachineState::Up
        && m.role == vmatrix_core::api::MachineRole::Dedicated
        && instances == 0
}

async fn instances(State(x): State<Ctx>) -> Response {
    match x.c.instances() {
        Ok(instances) => Json(vmatrix_core::api::InstancesReply { instances }).into_response(),
        Err(e) => fail(e),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    after: Option<u64>,
    limit: Option<u32>,
}

async fn events(State(x): State<Ctx>, Query(q): Query<EventsQuery>) -> Response {
    match x
        .c
        .events(q.after.unwrap_or(0), q.limit.unwrap_or(1000).min(10_000))
    {
        Ok(events) => Json(EventsReply { events }).into_response(),
        Err(e) => fail(e),
    }
}

async fn operate(
    State(x): State<Ctx>,
    axum::Extension(scope): axum::Extension<Scope>,
    Query(q): Query<WaitQuery>,
    body: axum::body::Bytes,
) -> Response {
    let op: Operation = match parse(&body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    // A switch wakes a dormant service for a request it holds; it may do nothing else.
    if scope == Scope::Switch && !matches!(op, Operation::Wake { .. }) {
        return err(
            StatusCode::FORBIDDEN,
            "the switch's token may only wake a service; use the operator's token \
             (DATA/controller/token)",
        );
    }
    // Recorded first, then run by the controller's own task: hanging up changes nothing.
    let id = match x.c.submit(op) {
        Ok(id) => id,
        Err(e) => return fail(e),
    };
    op_reply(&x, id, q.wait).await
}

#[derive(Deserialize)]
struct WaitQuery {
    /// Seconds to wait for the operation to settle (at most 600; default 0).
    wait: Option<u64>,
}

async fn op_reply(x: &Ctx, id: u64, wait: Option<u64>) -> Response {
    let wait = std::time::Duration::from_secs(wait.unwrap_or(0).min(600));
    match x.c.wait_op(id, wait).await {
        Ok(OpView::Reply(reply)) => {
            let status = if reply.state == vmatrix_core::api::OperationState::Running {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            (status, Json(reply)).into_response()
        }
        Ok(OpView::Failed {
            operation,
            status,
            message,
        }) => err(
            StatusCode::from_u16(status).unwrap_or(StatusCode::CONFLICT),
            format!("{message} (operation {operation})"),
        ),
        Err(e) => fail(e),
    }
}

async fn get_operation(
    State(x): State<Ctx>,
    axum::extract::Path(id): axum::extract::Path<u64>,
    Query(q): Query<WaitQuery>,
) -> Response {
    op_reply(&x, id, q.wait).await
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers.get("authorization").and_then(|v| v.to_str().ok())
}

/// A machine's first report, with the join token: its credential.
async fn join(State(x): State<Ctx>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    // Who asks first: no body is read for a caller without the join token.
    if let Err(e) = x.c.may_join(authorization(&headers)) {
        return fail(e);
    }
    let report: AgentReport = match parse(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match x.c.join(&report, authorization(&headers)) {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => fail(e),
    }
}

/// A machine's report, with its own credential: who sends it is known before the body is read.
/// Over TLS it also comes with the machine's certificate: a credential alone, stolen, is not
/// enough.
async fn heartbeat(
    State(x): State<Ctx>,
    peer: Option<axum::Extension<vmatrix_serve::PeerCertificate>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let caller = match x.c.machine_with(authorization(&headers)) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    if let Err(e) = x.c.check_certificate(&caller, peer.as_ref().map(|p| &p.0)) {
        return fail(e);
    }
    let report: AgentReport = match parse(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Err(e) = report.validate() {
        return err(StatusCode::BAD_REQUEST, e);
    }
    if let Err(e) = x.c.check_machine(&caller, &report.name) {
        return fail(e);
    }
    match x.c.heartbeat(report).await {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => fail(e),
    }
}

/// A machine's certificate, for a key it made (with its own credential).
async fn certificate(
    State(x): State<Ctx>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let caller = match x.c.machine_with(authorization(&headers)) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let request: vmatrix_core::api::CertificateRequest = match parse(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match x.c.certificate(&caller, &request.csr) {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => fail(e),
    }
}

#[derive(Deserialize)]
struct RoutesQuery {
    version: Option<String>,
    wait: Option<u64>,
}

/// The route table; with `version`, waits (up to `wait` seconds) until it differs — a
/// long-poll watch.
async fn routes(State(x): State<Ctx>, Query(q): Query<RoutesQuery>) -> Response {
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_secs(q.wait.unwrap_or(0).min(60));
    loop {
        let table = match x.c.routes() {
            Ok(t) => t,
            Err(e) => return fail(e),
        };
        if q.version.as_deref() != Some(table.version.as_str())
            || tokio::time::Instant::now() >= deadline
        {
            return Json(table).into_response();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn post_load(State(x): State<Ctx>, body: axum::body::Bytes) -> Response {
    match parse(&body) {
        Ok(report) => {
            x.c.set_load(report);
            Json(serde_json::json!({ "ok": true })).into_response()
        }
        Err(r) => r,
    }
}

async fn get_load(State(x): State<Ctx>) -> Response {
    Json(x.c.load()).into_response()
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    write: bool,
}

/// `GET /api/v1/instances/{id}/console?write=true`: the instance's serial console over
/// WebSocket, relayed from its agent.
async fn console(
    State(x): State<Ctx>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<ConsoleQuery>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let Ok(id) = vmatrix_core::InstanceId::new(id) else {
        return err(StatusCode::BAD_REQUEST, "not an instance id");
    };
    match x.c.open_console(&id, q.write).await {
        Ok(agent) => {
            let c = x.c.clone();
            ws.on_upgrade(move |socket| c.relay_console(id, socket, agent))
        }
        Err(e) => fail(e),
    }
}

async fn rollouts(State(x): State<Ctx>) -> Response {
    match x.c.rollouts() {
        Ok(rollouts) => Json(vmatrix_core::api::RolloutsReply { rollouts }).into_response(),
        Err(e) => fail(e),
    }
}

async fn policy(State(x): State<Ctx>) -> Response {
    Json(x.c.settings()).into_response()
}

async fn metrics(State(x): State<Ctx>) -> Response {
    (
        [("content-type", vmatrix_core::metrics::CONTENT_TYPE)],
        x.c.metrics_text(),
    )
        .into_response()
}

async fn openapi() -> Response {
    Json(serde_json::from_str::<serde_json::Value>(OPENAPI).unwrap_or_default()).into_response()
}

const OPENAPI: &str = include_str!("openapi.json");

/// The controller's router.
pub fn router(c: Arc<Controller>, tokens: impl Into<Tokens>) -> Router {
    let ctx = Ctx {
        c,
        tokens: Arc::new(tokens.into()),
    };
    // Open, or with credentials of their own: machines join with the join token and report
    // with their own credential (never the operator's token).
    let open = Router::new()
        .route("/api/v1/health", get(|| async { "ok" }))
        .route("/openapi.json", get(openapi))
        .route("/api/v1/agents/join", post(join))
        .route("/api/v1/agents/heartbeat", post(heartbeat))
        .route("/api/v1/agents/certificate", post(certificate))
        // The dashboard's page and assets hold no data: everything it shows comes from the
        // API with the operator's token.
        .merge(crate::dashboard::assets());
    Router::new()
        .route("/api/v1/services", get(services).post(apply))
        .route("/api/v1/machines", get(machines))
        .route("/api/v1/machines/:name/approve", post(approve))
        .route("/api/v1/machines/:name/forget", post(forget))
        .route("/api/v1/instances", get(instances))
        .route("/api/v1/instances/:id/console", get(console))
        .route("/api/v1/events", get(events))
        .route("/api/v1/operations", post(operate))
        .route("/api/v1/operations/:id", get(get_operation))
        .route("/api/v1/routes", get(routes))
        .route("/api/v1/load", get(get_load).post(post_load))
        .route("/api/v1/policy", get(policy))
        .route("/api/v1/rollouts", get(rollouts))
        .route("/metrics", get(metrics))
        .route("/api/v1/stream", get(crate::dashboard::stream))
        .route_layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            require_token,
        ))
        .merge(open)
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(ctx)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_openapi_document_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).expect("valid JSON");
        let source = include_str!("api.rs");
        let routes: Vec<String> = source
            .split(".route(\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .filter(|p| *p != "/openapi.json")
            .map(|p| p.replace(":id", "{id}").replace(":name", "{name}"))
            .collect();
        assert!(routes.len() >= 10, "{routes:?}");
        for path in routes {
            assert!(
                doc["paths"].get(&path).is_some(),
                "{path} is served but not in openapi.json"
            );
        }
    }
}
