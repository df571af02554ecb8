//! The one typed client of the controller's REST API: the CLI, the switch and the agents all
//! talk to the controller through [`ControllerClient`], with the request and reply types of
//! `vmatrix_core::api` — nobody reads the controller's JSON by string keys.
//!
//! It must never hold state of its own beyond the connection pool and which controller answered
//! last, and never retry on its own: callers decide (an agent's heartbeat simply beats again, the
//! CLI reports the error). With several controllers (high availability), a call goes to the
//! next one only where the last could not have done it: it refused the connection, or it
//! stands by.
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use vmatrix_core::api::{
    AgentReport, ApplyRequest, ErrorBody, Event, EventsReply, HeartbeatReply, InstanceInfo,
    InstancesReply, LoadReport, MachinesReply, Operation, OperationReply, RouteTable,
    ServicesReply, STANDBY_HEADER,
};
use vmatrix_core::ServiceSpec;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The controller could not be reached or did not answer in time.
    #[error("cannot reach the controller at {base}: {detail}; {hint}")]
    Unreachable {
        /// The controller's URL.
        base: String,
        /// What the transport said, causes included (a TLS refusal says why).
        detail: String,
        /// What to check.
        hint: &'static str,
    },
    /// The TLS configuration could not be made (the authority's certificate is not one).
    #[error(transparent)]
    Tls(#[from] vmatrix_serve::TlsError),
    /// The controller answered with an error.
    #[error("{message}")]
    Refused {
        /// Its HTTP status.
        status: u16,
        /// Its message (what failed and what to do).
        message: String,
    },
    /// The reply did not parse as the expected type.
    #[error("the controller's reply to {what} does not parse: {source}")]
    BadReply {
        /// The request.
        what: String,
        /// The parse error.
        #[source]
        source: reqwest::Error,
    },
}

/// A result of a call to the controller.
pub type Result<T> = std::result::Result<T, ClientError>;

/// A client of the matrix's controller (one of several, where they stand by for each other).
#[derive(Debug, Clone)]
pub struct ControllerClient {
    bases: Vec<String>,
    /// Which of `bases` answered last.
    at: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    token: Option<String>,
    /// The authority an https controller's certificate must come from (PEM).
    authority: Option<std::sync::Arc<str>>,
    http: reqwest::Client,
}

impl ControllerClient {
    /// A client of the controller at `base` (`http://host:port`, or several separated by
    /// commas: controllers in high availability), with its bearer token if known.
    /// Connecting gives up after 2 s; each call sets its own limit. An `https://` controller
    /// needs [`ControllerClient::trusting`] its authority.
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self::with_http(
            base,
            token,
            None,
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("a plain HTTP client builds"),
        )
    }

    /// [`ControllerClient::new`] over TLS where the URL says `https://`: the controller's
    /// certificate must come from `authority` (PEM: the controller's
    /// `DATA/controller/tls/ca-cert.pem`) and name the URL's host. `None`: plain HTTP only.
    pub fn trusting(base: &str, token: Option<String>, authority: Option<&str>) -> Result<Self> {
        Self::trusting_as(base, token, authority, None)
    }

    /// [`ControllerClient::trusting`], presenting `identity` (certificate and key, PEM: a
    /// machine's, which its heartbeats must come with over TLS).
    pub fn trusting_as(
        base: &str,
        token: Option<String>,
        authority: Option<&str>,
        identity: Option<(&str, &str)>,
    ) -> Result<Self> {
        let Some(authority) = authority else {
            return Ok(Self::new(base, token));
        };
        let tls = vmatrix_serve::tls::client_config(authority, None, identity)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| vmatrix_serve::TlsError(format!("an HTTPS client: {e}")))?;
        Ok(Self::with_http(base, token, Some(authority.into()), http))
    }

    fn with_http(
        base: &str,
        token: Option<String>,
        authority: Option<std::sync::Arc<str>>,
        http: reqwest::Client,
    ) -> Self {
        let bases: Vec<String> = base
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_owned())
            .filter(|b| !b.is_empty())
            .collect();
        Self {
            bases: if bases.is_empty() {
                vec![base.to_owned()]
            } else {
                bases
            },
            at: Default::default(),
            token,
            authority,
            http,
        }
    }

    /// The URL of the controller that answered last (the first given, before any call).
    pub fn base(&self) -> &str {
        let n = self.bases.len();
        &self.bases[self.at.load(std::sync::atomic::Ordering::Relaxed) % n]
    }

    /// The authority an https controller's certificate must come from (PEM), if given.
    pub fn authority(&self) -> Option<&str> {
        self.authority.as_deref()
    }

    /// The bearer token, if known.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// One call; `repeatable`: sending it twice does no harm (a read, a heartbeat, a load
    /// report), so one that times out — a frozen controller accepts connections and never
    /// answers — may go to the next controller too.
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        limit: Duration,
        repeatable: bool,
    ) -> Result<T> {
        let n = self.bases.len();
        let first = self.at.load(std::sync::atomic::Ordering::Relaxed) % n;
        let mut tried = 0;
        let resp = loop {
            let at = (first + tried) % n;
            tried += 1;
            let base = &self.bases[at];
            let mut req = self
                .http
                .request(method.clone(), format!("{base}{path}"))
                .timeout(limit);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                // Nothing reached it: the next controller may lead (and the next call starts
                // there, not with another wait on this one).
                Err(source)
                    if (source.is_connect() || (repeatable && source.is_timeout()))
                        && tried < n =>
                {
                    self.at
                        .store((at + 1) % n, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                Err(source) => {
                    return Err(ClientError::Unreachable {
                        base: base.clone(),
                        detail: vmatrix_core::with_causes(&source),
                        hint: if base.starts_with("https://") && self.authority.is_none() {
                            "an https controller needs its authority: set VMATRIX_CA (or --ca) \
                             to its DATA/controller/tls/ca-cert.pem"
                        } else if base.starts_with("https://") {
                            "is it up, and does its certificate come from the authority given \
                             (VMATRIX_CA or --ca) and name this URL's host (--tls-name)?"
                        } else {
                            "is `vmatrix up` running?"
                        },
                    })
                }
                Ok(r) if r.headers().contains_key(STANDBY_HEADER) && tried < n => continue,
                Ok(r) => {
                    self.at.store(at, std::sync::atomic::Ordering::Relaxed);
                    break r;
                }
            }
        };
        let status = resp.status();
        if !status.is_success() {
            let message = match resp.json::<ErrorBody>().await {
                Ok(b) => b.error,
                Err(_) => status.to_string(),
            };
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        resp.json().await.map_err(|source| ClientError::BadReply {
            what: path.to_owned(),
            source,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str, limit: Duration) -> Result<T> {
        self.call(reqwest::Method::GET, path, None::<&()>, limit, true)
            .await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
        limit: Duration,
    ) -> Result<T> {
        self.call(reqwest::Method::POST, path, Some(body), limit, false)
            .await
    }

    /// Whether the first controller answers at all (a standby's refusal counts).
    pub async fn answers(&self) -> bool {
        self.http
            .get(format!("{}/api/v1/health", self.bases[0]))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok()
    }

    /// Whether a controller answers (the leader, where several stand by for each other).
    pub async fn healthy(&self) -> bool {
        for (i, base) in self.bases.iter().enumerate() {
            let ok = self
                .http
                .get(format!("{base}/api/v1/health"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                self.at.store(i, std::sync::atomic::Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// The declared services and their drop marks.
    pub async fn services(&self) -> Result<ServicesReply> {
        self.get("/api/v1/services", SHORT).await
    }

    /// Replaces the declared services.
    pub async fn apply(&self, services: Vec<ServiceSpec>) -> Result<vmatrix_core::api::ApplyReply> {
        self.post("/api/v1/services", &ApplyRequest { services }, SHORT)
            .await
    }

    /// The machines, with what runs on each.
    pub async fn machines(&self) -> Result<MachinesReply> {
        self.get("/api/v1/machines", SHORT).await
    }

    /// The operator approves machine name `name` to join.
    pub async fn approve_machine(&self, name: &str) -> Result<serde_json::Value> {
        self.post(
            &format!("/api/v1/machines/{name}/approve"),
            &serde_json::json!({}),
            SHORT,
        )
        .await
    }

    /// The operator takes machine `name`'s credential and approval back.
    pub async fn forget_machine(&self, name: &str) -> Result<serde_json::Value> {
        self.post(
            &format!("/api/v1/machines/{name}/forget"),
            &serde_json::json!({}),
            SHORT,
        )
        .await
    }

    /// The instances that are not discarded.
    pub async fn instances(&self) -> Result<Vec<InstanceInfo>> {
        self.get::<InstancesReply>("/api/v1/instances", SHORT)
            .await
            .map(|r| r.instances)
    }

    /// Each service's last rollout.
    pub async fn rollouts(&self) -> Result<Vec<vmatrix_core::api::RolloutStatus>> {
        self.get::<vmatrix_core::api::RolloutsReply>("/api/v1/rollouts", SHORT)
            .await
            .map(|r| r.rollouts)
    }

    /// Events after `after`, oldest first.
    pub async fn events(&self, after: u64) -> Result<Vec<Event>> {
        self.get::<EventsReply>(&format!("/api/v1/events?after={after}"), SHORT)
            .await
            .map(|r| r.events)
    }

    /// Records an operation (it runs as the controller's own task) and waits up to `wait` for
    /// it to settle. A failed operation is [`ClientError::Refused`].
    pub async fn submit(&self, op: &Operation, wait: Duration) -> Result<OperationReply> {
        self.post(
            &format!("/api/v1/operations?wait={}", wait.as_secs()),
            op,
            wait + SHORT,
        )
        .await
    }

    /// Operation `id`, waiting up to `wait` for it to settle.
    pub async fn operation(&self, id: u64, wait: Duration) -> Result<OperationReply> {
        self.get(
            &format!("/api/v1/operations/{id}?wait={}", wait.as_secs()),
            wait + SHORT,
        )
        .await
    }

    /// A machine joins (this client's token is the join token): its own credential.
    pub async fn join(&self, report: &AgentReport) -> Result<vmatrix_core::api::JoinReply> {
        self.post("/api/v1/agents/join", report, SHORT).await
    }

    /// A machine's certificate for the key behind `csr` (this client's token is the machine's
    /// credential).
    pub async fn certificate(
        &self,
        csr: &vmatrix_core::api::CertificateRequest,
    ) -> Result<vmatrix_core::api::CertificateReply> {
        self.post("/api/v1/agents/certificate", csr, SHORT).await
    }

    /// An agent's heartbeat (this client's token is the machine's credential); the answer says
    /// what the machine must know of the others.
    pub async fn heartbeat(&self, report: &AgentReport) -> Result<HeartbeatReply> {
        // Short: the machine's lease (10 s) must be renewed through another controller when
        // this one hangs.
        self.call(
            reqwest::Method::POST,
            "/api/v1/agents/heartbeat",
            Some(report),
            HEARTBEAT,
            true,
        )
        .await
    }

    /// The switch's route table; with `version`, a long poll of up to `wait` until it differs.
    pub async fn routes(&self, version: &str, wait: Duration) -> Result<RouteTable> {
        self.get(
            &format!("/api/v1/routes?version={version}&wait={}", wait.as_secs()),
            wait + SHORT,
        )
        .await
    }

    /// The switch's latest load report, as the controller has it.
    pub async fn load(&self) -> Result<LoadReport> {
        self.get("/api/v1/load", SHORT).await
    }

    /// The switch's load report.
    pub async fn report_load(&self, report: &LoadReport) -> Result<()> {
        let _: serde_json::Value = self
            .call(
                reqwest::Method::POST,
                "/api/v1/load",
                Some(report),
                SHORT,
                true,
            )
            .await?;
        Ok(())
    }
}

/// The limit of a call that does no waiting of its own.
const SHORT: Duration = Duration::from_secs(15);
/// The limit of a heartbeat: well inside a machine's lease, with room for a failover.
const HEARTBEAT: Duration = Duration::from_secs(4);
