//! The reverse proxy: service selection, least-outstanding balancing, retries across moves,
//! wake-on-request, drop, and the route watch.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{Entry, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use vmatrix_client::ControllerClient;
use vmatrix_core::api::ServiceRoute;

use crate::body::RequestBody;
use crate::stats::Stats;

/// How the switch is set up.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// The controller's URL.
    pub controller: String,
    /// The authority the controller's certificate must come from (PEM), for an `https`
    /// controller.
    pub controller_authority: Option<String>,
    /// The controller's bearer token (the switch's own, or the operator's); its `/metrics`
    /// take it too.
    pub token: String,
    /// A read-only token its `/metrics` also take (monitoring); empty: none.
    pub read_token: String,
    /// How long a request may wait for a dormant service to wake.
    pub hold_timeout: Duration,
    /// Most requests held per service; more are refused with 503.
    pub max_held: usize,
    /// How long an idempotent request keeps retrying while its service moves.
    pub retry_window: Duration,
    /// HTTPS (HTTP/1.1 and HTTP/2 by ALPN) with this certificate, if set.
    pub tls: Option<crate::tls::TlsConfig>,
    /// What clients may take (connections, header time, bodies in memory, answer time).
    pub limits: crate::limits::Limits,
}

pub(crate) struct Table {
    pub(crate) version: String,
    pub(crate) services: HashMap<String, ServiceRoute>,
}

pub(crate) struct Switch {
    pub(crate) config: SwitchConfig,
    pub(crate) routes: watch::Receiver<Arc<Table>>,
    pub(crate) stats: Arc<Stats>,
    backends: std::sync::RwLock<HashMap<String, Arc<BackendState>>>,
    held: Mutex<HashMap<String, usize>>,
    waking: Mutex<HashSet<String>>,
    controller: ControllerClient,
    /// Token buckets of dropped services that still admit what their instances can serve.
    admitted: Mutex<HashMap<String, Bucket>>,
    /// Client connections open, against the limits.
    pub(crate) connections: Arc<crate::limits::Connections>,
    /// Request bodies held in memory, against the budget.
    bodies: Arc<crate::limits::BodyBudget>,
}

/// A token bucket: `rate` requests per second, bursts of up to one second's worth.
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + rate * dt).min(rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Per backend address: requests in flight, and when the switch first sent it one.
pub(crate) struct BackendState {
    pub(crate) outstanding: AtomicUsize,
    first_seen: Instant,
    /// Requests sent to it (attempts, retries included).
    pub(crate) sent: std::sync::atomic::AtomicU64,
}

/// A backend that appeared this recently (a migration destination) gets a short per-attempt
/// timeout for idempotent requests: right after a move, the host side of QEMU's user networking
/// can pick a port pair the guest still holds for a connection that died with the source, and
/// such a connection stalls; a retry on a fresh connection does not.
const FRESH_BACKEND: Duration = Duration::from_secs(5);
const FRESH_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);

/// How many requests in flight an instance in a live migration counts as beyond its own: new
/// requests go elsewhere unless the others are that much busier (a request that reaches it at
/// the switch-over waits out the pause and the moved guest's cold start; sending all load
/// elsewhere could overload the rest). At 2, a peer holding one long stream and two requests
/// already tied with it: the moving instance got 41–46 of ~110 requests in a 2 s move at
/// 50 req/s on a slow host; at 8, 4–29.
const MOVING_PENALTY: usize = 8;
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A response to a client: the switch's own (whole), or an instance's streamed through as it
/// comes.
type Resp = Response<BoxBody<Bytes, hyper::Error>>;

fn whole(body: impl Into<Bytes>) -> BoxBody<Bytes, hyper::Error> {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn reply(status: StatusCode, body: impl Into<String>) -> Resp {
    let json = serde_json::json!({ "error": body.into() }).to_string();
    let mut r = Response::new(whole(json));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

impl Switch {
    /// Whether a request's bearer may read the metrics: they name every instance endpoint (a
    /// way around drop and admission), so only the switch's token or the read-only one.
    fn may_read_metrics(&self, headers: &hyper::HeaderMap) -> bool {
        let given = headers.get("authorization").and_then(|v| v.to_str().ok());
        let own = vmatrix_core::auth::bearer_matches(given, &self.config.token);
        let read = vmatrix_core::auth::bearer_matches(given, &self.config.read_token);
        own || read
    }

    pub(crate) fn backend(&self, addr: &str) -> Arc<BackendState> {
        if let Some(b) = self
            .backends
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
        {
            return b.clone();
        }
        let mut m = self.backends.write().unwrap_or_else(|p| p.into_inner());
        m.entry(addr.to_owned())
            .or_insert_with(|| {
                Arc::new(BackendState {
                    outstanding: AtomicUsize::new(0),
                    first_seen: Instant::now(),
                    sent: std::sync::atomic::AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Requests sent to each backend address (every instance the switch ever routed to), with
    /// the instance and service that hold the address now (empty: none does).
    fn sample_backends(&self, table: &Table, out: &mut vmatrix_core::metrics::Sampled) {
        let mut holder: HashMap<&str, (&str, &str)> = HashMap::new();
        for (service, route) in &table.services {
            for (id, addr) in &route.backends {
                holder.insert(addr.as_str(), (id.as_str(), service.as_str()));
            }
        }
        let map = self.backends.read().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<(vmatrix_core::metrics::Labels, u64)> = map
            .iter()
            .map(|(addr, b)| {
                let (id, service) = holder.get(addr.as_str()).copied().unwrap_or_default();
                (
                    vec![
                        ("backend", addr.clone()),
                        ("instance", id.to_owned()),
                        ("service", service.to_owned()),
                    ],
                    b.sent.load(Ordering::Relaxed),
                )
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        out.counter(
            "vmatrix_switch_backend_requests",
            "Requests sent to each instance endpoint (retries included).",
            rows,
        );
    }

    /// Least outstanding requests among the backends not to avoid; one in a live migration
    /// counts [`MOVING_PENALTY`] more (it gets new requests only when the others are busier).
    fn pick(&self, route: &ServiceRoute, avoid: &HashSet<String>) -> Option<String> {
        if let [(_, only)] = route.backends.as_slice() {
            return (!avoid.contains(only)).then(|| only.clone());
        }
        route
            .backends
            .iter()
            .map(|(_, a)| a)
            .filter(|a| !avoid.contains(*a))
            .min_by_key(|a| {
                let penalty = if route.moving.contains(a) {
                    MOVING_PENALTY
                } else {
                    0
                };
                self.backend(a).outstanding.load(Ordering::Relaxed) + penalty
            })
            .cloned()
    }

    /// Whether a request of a dropped service gets through: only what its running instances
    /// can serve (`admit_rps`), the excess is refused.
    pub(crate) fn admit_dropped(&self, route: &vmatrix_core::api::ServiceRoute) -> bool {
        if route.admit_rps <= 0.0 || route.backends.is_empty() {
            return false;
        }
        let now = Instant::now();
        let Ok(mut buckets) = self.admitted.lock() else {
            return false;
        };
        if !buckets.contains_key(route.service.as_str()) {
            // A new one: forget the buckets of services that are gone.
            let table = self.routes.borrow().clone();
            buckets.retain(|name, _| table.services.contains_key(name));
        }
        buckets
            .entry(route.service.to_string())
            .or_insert(Bucket {
                tokens: route.admit_rps,
                last: now,
            })
            .take(route.admit_rps, now)
    }

    /// The request's body as it goes on: small ones of known length read whole (within the
    /// header timeout, against the body budget), the others streamed; or the refusal to send.
    async fn request_body(&self, body: Incoming) -> Result<RequestBody, Resp> {
        use hyper::body::Body as _;
        if body.is_end_stream() {
            return Ok(RequestBody::empty());
        }
        let n = match body.size_hint().exact() {
            Some(n) if n <= crate::limits::BUFFERED_BODY => n as usize,
            _ => return Ok(RequestBody::Stream(Some(body))),
        };
        let Some(held) = self.bodies.reserve(n) else {
            let mut r = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the switch holds {} bytes of request bodies, its limit (--body-memory); retry later",
                    self.bodies.used()
                ),
            );
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            return Err(r);
        };
        let limit = self.config.limits.header_timeout;
        match tokio::time::timeout(limit, Limited::new(body, n).collect()).await {
            Ok(Ok(b)) => Ok(RequestBody::Whole {
                bytes: b.to_bytes(),
                _held: Some(held),
            }),
            Ok(Err(e)) => Err(reply(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
            )),
            Err(_) => Err(reply(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body ({n} bytes) did not arrive within {} s",
                    limit.as_secs_f64()
                ),
            )),
        }
    }

    /// Refuses a request at once: 503 with `Retry-After`, counted as dropped.
    fn refuse(&self, service: &str, why: &str, retry_after: &'static str) -> Resp {
        self.stats.dropped(service);
        let mut r = reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("service {service} {why}; retry later"),
        );
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static(retry_after));
        r
    }

    /// Takes a place in `service`'s hold queue (a request or connection waiting for it to
    /// wake); false when the queue is full.
    pub(crate) fn hold(&self, service: &str) -> bool {
        self.held
            .lock()
            .map(|mut h| {
                let n = h.entry(service.to_owned()).or_default();
                if *n >= self.config.max_held {
                    false
                } else {
                    *n += 1;
                    true
                }
            })
            .unwrap_or(false)
    }

    /// Gives back a place in the hold queue taken at `since`.
    pub(crate) fn unhold(&self, service: &str, since: Instant) {
        if let Ok(mut h) = self.held.lock() {
            if let Some(n) = h.get_mut(service) {
                *n = n.saturating_sub(1);
            }
        }
        self.stats
            .held(service, since.elapsed().as_secs_f64() * 1000.0);
    }

    pub(crate) fn wake(self: &Arc<Self>, service: &str) {
        let fresh = self
            .waking
            .lock()
            .map(|mut w| w.insert(service.to_owned()))
            .unwrap_or(false);
        if !fresh {
            return;
        }
        let me = self.clone();
        let service = service.to_owned();
        tokio::spawn(async move {
            match vmatrix_core::ServiceName::new(service.clone()) {
                Ok(name) => {
                    let wake = vmatrix_core::api::Operation::Wake { service: name };
                    match me.controller.submit(&wake, Duration::ZERO).await {
                        Ok(_) => tracing::info!(service, "asked the controller to wake it"),
                        Err(e) => tracing::warn!(service, "wake: {e}"),
                    }
                }
                Err(e) => tracing::warn!(service, "wake: {e}"),
            }
            // Allow another wake request a little later if this one did not help.
            tokio::time::sleep(Duration::from_secs(5)).await;
            if let Ok(mut w) = me.waking.lock() {
                w.remove(&service);
            }
        });
    }

    pub(crate) async fn handle(
        self: Arc<Self>,
        client: Arc<crate::pool::Pool>,
        req: Request<Incoming>,
    ) -> Result<Resp, Infallible> {
        let path = req.uri().path().to_owned();
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let (service, forward_path) = if let Some(rest) = path.strip_prefix("/s/") {
            let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
            (Some(name.to_owned()), format!("/{tail}{query}"))
        } else {
            // HTTP/1.1's Host header, or HTTP/2's :authority (in the URI).
            let host = req
                .headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().host())
                .unwrap_or("")
                .split(':')
                .next()
                .unwrap_or("")
                .split('.')
                .next()
                .unwrap_or("")
                .to_owned();
            (Some(host), format!("{path}{query}"))
        };
        let table = self.routes.borrow().clone();
        let route = service.as_deref().and_then(|s| table.services.get(s));
        let Some(route) = route else {
            return Ok(match path.as_str() {
                // They name every instance endpoint: a way around drop and admission, so
                // only for the token's holders.
                "/metrics" if !self.may_read_metrics(req.headers()) => reply(
                    StatusCode::UNAUTHORIZED,
                    "the switch's metrics need its token or the controller's read-only token \
                     (authorization: Bearer TOKEN)",
                ),
                "/metrics" => {
                    let mut sampled = vmatrix_core::metrics::Sampled::default();
                    self.stats.sample(&mut sampled);
                    self.sample_backends(&table, &mut sampled);
                    crate::limits::sample(&self.connections, &self.bodies, &mut sampled);
                    let mut registry = vmatrix_core::metrics::registry();
                    registry.register_collector(Box::new(sampled));
                    let mut r = Response::new(whole(vmatrix_core::metrics::render(&registry)));
                    r.headers_mut().insert(
                        "content-type",
                        HeaderValue::from_static(vmatrix_core::metrics::CONTENT_TYPE),
                    );
                    r
                }
                "/health" => Response::new(whole(Bytes::from_static(b"ok\n"))),
                _ => {
                    let known: Vec<&String> = table.services.keys().collect();
                    reply(
                        StatusCode::NOT_FOUND,
                        format!(
                            "no service {:?}: use Host: NAME or the path /s/NAME/…; services: {known:?}",
                            service.unwrap_or_default()
                        ),
                    )
                }
            });
        };
        let name = route.service.to_string();
        if route.dropped && !self.admit_dropped(route) {
            self.stats.set_priority(&name, route.priority);
            return Ok(self.refuse(&name, "is dropped: the pool is short", "5"));
        }
        let (mut parts, body) = req.into_parts();
        // An upgrade (WebSocket): the client's side of it, joined to the instance's if the
        // instance switches protocols.
        let upgrade = is_upgrade(&parts.headers)
            .then(|| parts.extensions.remove::<hyper::upgrade::OnUpgrade>())
            .flatten();
        let body = match self.request_body(body).await {
            Ok(b) => b,
            Err(refusal) => {
                self.stats.set_priority(&name, route.priority);
                return Ok(refusal);
            }
        };
        self.stats.begin(&name);
        let started = Instant::now();
        let resp = self
            .forward(&client, &name, &parts, forward_path, body, upgrade)
            .await;
        let ok = !(resp.status().is_server_error());
        self.stats
            .end(&name, started.elapsed().as_secs_f64() * 1000.0, ok);
        Ok(resp)
    }

    async fn forward(
        self: &Arc<Self>,
        client: &crate::pool::Pool,
        service: &str,
        parts: &hyper::http::request::Parts,
        path: String,
        mut body: RequestBody,
        mut upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Resp {
        let idempotent = is_idempotent(&parts.method);
        let started = Instant::now();
        let mut held_since: Option<Instant> = None;
        let mut avoid: HashSet<String> = HashSet::new();
        let mut routes = self.routes.clone();
        // What goes to the instance: the path in origin form and the end-to-end headers (an
        // upgrade keeps its own two); HTTP/2's :authority becomes the Host header.
        let Ok(uri) = path.parse::<hyper::Uri>() else {
            return reply(StatusCode::BAD_REQUEST, "request cannot be forwarded");
        };
        let upgrading = upgrade.is_some();
        let headers_for = |addr: &str| {
            let mut headers = parts.headers.clone();
            for h in HOP_BY_HOP {
                headers.remove(h);
            }
            if upgrading {
                for h in [hyper::header::CONNECTION, hyper::header::UPGRADE] {
                    if let Some(v) = parts.headers.get(&h) {
                        headers.insert(h, v.clone());
                    }
                }
            }
            if let Entry::Vacant(host) = headers.entry(hyper::header::HOST) {
                let authority = parts.uri.authority().map_or(addr, |a| a.as_str());
                if let Ok(v) = HeaderValue::from_str(authority) {
                    host.insert(v);
                }
            }
            headers
        };
        let result = loop {
            let table = routes.borrow_and_update().clone();
            let Some(route) = table.services.get(service) else {
                break reply(
                    StatusCode::NOT_FOUND,
                    format!("service {service} was removed"),
                );
            };
            // Admitted once already (dropped after that: it still goes to a backend).
            if route.dropped && route.backends.is_empty() {
                break self.refuse(service, "is dropped: the pool is short", "5");
            }
            let Some(addr) = self.pick(route, &avoid) else {
                if route.backends.is_empty() {
                    // Dormant: wake it and hold the request (bounded).
                    if held_since.is_none() {
                        if !self.hold(service) {
                            return self.refuse(service, "is waking and its queue is full", "2");
                        }
                        held_since = Some(Instant::now());
                    }
                    self.wake(service);
                    if held_since.is_some_and(|t| t.elapsed() > self.config.hold_timeout) {
                        break reply(
                            StatusCode::GATEWAY_TIMEOUT,
                            format!(
                                "service {service} did not wake within {:?}",
                                self.config.hold_timeout
                            ),
                        );
                    }
                } else if started.elapsed() > self.config.retry_window {
                    break reply(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "no instance of {service} answered within {:?}",
                            self.config.retry_window
                        ),
                    );
                } else {
                    // Every backend failed just now: let the routes catch up with a move.
                    avoid.clear();
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), routes.changed()).await;
                continue;
            };
            let Some(sending) = body.for_attempt() else {
                break reply(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "the request's body was streamed to an instance of {service} that \
                         failed; a streamed body is not sent twice"
                    ),
                );
            };
            let resendable = body.resendable();
            let mut req = Request::new(sending);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = headers_for(&addr);
            let state = self.backend(&addr);
            let fresh = state.first_seen.elapsed() < FRESH_BACKEND;
            state.outstanding.fetch_add(1, Ordering::Relaxed);
            // Counts the request in flight until its response has been streamed out (or it
            // failed): least-connections sees a long response or a stream as the load it is.
            let in_flight = InFlight(state.clone());
            state.sent.fetch_add(1, Ordering::Relaxed);
            let (limit, on_timeout) = if fresh && idempotent && resendable {
                (FRESH_ATTEMPT_TIMEOUT, AttemptError::Stalled)
            } else {
                let t = self.config.limits.backend_timeout;
                (t, AttemptError::TimedOut(t))
            };
            let outcome = match tokio::time::timeout(limit, client.send_or_return(&addr, req)).await
            {
                Ok(Ok(r)) => Ok(r),
                Ok(Err((e, unsent))) => {
                    // Not sent (no connection): a streamed body is still whole.
                    if let Some(req) = unsent {
                        body.put_back(req.into_body());
                    }
                    Err(AttemptError::Client(e))
                }
                Err(_) => Err(on_timeout),
            };
            match outcome {
                Ok(mut resp) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        if let (Some(client_side), Some(backend_side)) = (
                            upgrade.take(),
                            resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>(),
                        ) {
                            tokio::spawn(join_upgrades(client_side, backend_side, in_flight));
                            let (p, _) = resp.into_parts();
                            break Response::from_parts(p, whole(Bytes::new()));
                        }
                    }
                    // The body is streamed through as the instance sends it (a long response
                    // or a stream is never held here); once its head is out, a failure can only
                    // break the client's connection, as with any proxy.
                    let (p, b) = resp.into_parts();
                    let body = Counted {
                        body: b,
                        _in_flight: in_flight,
                    };
                    let mut r = Response::from_parts(p, body.boxed());
                    for h in HOP_BY_HOP {
                        r.headers_mut().remove(HeaderName::from_static(h));
                    }
                    break r;
                }
                // No response byte came back: a connect failure is always safe to retry; any
                // other failure only for an idempotent request.
                Err(e @ AttemptError::TimedOut(_)) => {
                    break reply(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("instance {addr} of {service}: {e}"),
                    )
                }
                Err(e)
                    if (e.is_connect() || idempotent)
                        && started.elapsed() < self.config.retry_window =>
                {
                    tracing::debug!(service, addr, "retrying after: {e}");
                    avoid.insert(addr);
                }
                Err(e) => {
                    break reply(
                        StatusCode::BAD_GATEWAY,
                        format!("instance {addr} failed: {e}"),
                    )
                }
            }
        };
        if let Some(t) = held_since {
            self.unhold(service, t);
        }
        result
    }
}

/// One request counted in a backend's `outstanding` until dropped.
pub(crate) struct InFlight(pub(crate) Arc<BackendState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted until it is done (or dropped).
struct Counted {
    body: Incoming,
    _in_flight: InFlight,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether a request asks to switch protocols (`Connection: upgrade` and `Upgrade`).
fn is_upgrade(h: &hyper::HeaderMap) -> bool {
    h.contains_key(hyper::header::UPGRADE)
        && h.get_all(hyper::header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Once both sides have switched protocols, copies bytes both ways until either ends; the
/// backend counts the connection as in flight meanwhile.
async fn join_upgrades(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    _in_flight: InFlight,
) {
    match tokio::try_join!(client, backend) {
        Ok((c, b)) => {
            let mut c = TokioIo::new(c);
            let mut b = TokioIo::new(b);
            let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
        }
        Err(e) => tracing::debug!("upgrade: {e}"),
    }
}

/// Why one attempt to a backend produced no response.
#[derive(Debug)]
enum AttemptError {
    Client(crate::pool::SendError),
    Stalled,
    /// No response head within the backend timeout.
    TimedOut(Duration),
}

impl AttemptError {
    fn is_connect(&self) -> bool {
        matches!(self, Self::Client(e) if e.is_connect())
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(e) => write!(f, "{e}"),
            Self::Stalled => write!(
                f,
                "no answer within {FRESH_ATTEMPT_TIMEOUT:?} from a just-moved instance"
            ),
            Self::TimedOut(t) => write!(
                f,
                "no response within {} s (the switch's --backend-timeout)",
                t.as_secs_f64()
            ),
        }
    }
}

/// Serves the switch until the process ends.
pub async fn serve(config: SwitchConfig) -> std::io::Result<()> {
    if let Some(problem) = config.limits.problem() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("switch limits: {problem}"),
        ));
    }
    let (tx, rx) = watch::channel(Arc::new(Table {
        version: String::new(),
        services: HashMap::new(),
    }));
    let stats = Arc::new(Stats::default());
    let controller = config.controller.trim_end_matches('/').to_owned();
    let client = ControllerClient::trusting(
        &controller,
        Some(config.token.clone()),
        config.controller_authority.as_deref(),
    )
    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("--ca: {e}")))?;
    tokio::spawn(crate::follow::watch_routes(client.clone(), tx));
    tokio::spawn(crate::follow::report_load(client.clone(), stats.clone()));
    let switch = Arc::new(Switch {
        config: SwitchConfig {
            controller,
            ..config.clone()
        },
        routes: rx,
        stats,
        backends: std::sync::RwLock::new(HashMap::new()),
        held: Mutex::new(HashMap::new()),
        waking: Mutex::new(HashSet::new()),
        admitted: Mutex::new(HashMap::new()),
        controller: client,
        connections: crate::limits::Connections::new(
            config.limits.max_connections,
            config.limits.max_connections_per_client,
        ),
        bodies: crate::limits::BodyBudget::new(config.limits.body_memory),
    });
    let listener = std::net::TcpListener::bind(config.listen)?;
    listener.set_nonblocking(true)?;
    tracing::info!(
        "switch listening on http://{} (HTTP/1.1, h2c)",
        config.listen
    );
    let tls = match &config.tls {
        None => None,
        Some(t) => {
            let acceptor = crate::tls::acceptor(t)?;
            let l = std::net::TcpListener::bind(t.listen)?;
            l.set_nonblocking(true)?;
            tracing::info!(
                "switch listening on https://{} (HTTP/1.1, HTTP/2)",
                t.listen
            );
            Some((l, acceptor))
        }
    };
    tokio::spawn(crate::tcp::run(switch.clone()));
    crate::workers::run(switch, listener, tls).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_rate_and_refuses_the_excess() {
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 10.0,
            last: t0,
        };
        // A burst of 30 at once: one second's worth (10) gets through.
        let burst = (0..30).filter(|_| b.take(10.0, t0)).count();
        assert_eq!(burst, 10);
        // Then 100 requests spread over 2 s (50/s offered): about 10/s gets through.
        let admitted = (1..=100)
            .filter(|k| b.take(10.0, t0 + Duration::from_millis(20 * k)))
            .count();
        assert!((19..=21).contains(&admitted), "{admitted}");
    }
}
