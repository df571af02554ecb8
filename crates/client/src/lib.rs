//! The one typed client of the controller's REST API: the CLI, the switch and the agents all
//! talk to the controller through [`ControllerClient`], with the request and reply types of
//! `vmatrix_core::api` — nobody reads the controller's JSON by string keys.
//!
//! It must never hold state of its own beyond the connection pool, and never retry on its own:
//! callers decide (an agent's heartbeat simply beats again, the CLI reports the error).
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use vmatrix_core::api::{
    AgentReport, ApplyRequest, ErrorBody, Event, EventsReply, HeartbeatReply, InstanceInfo,
    InstancesReply, LoadReport, MachinesReply, Operation, OperationReply, RouteTable,
    ServicesReply,
};
use vmatrix_core::ServiceSpec;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The controller could not be reached or did not answer in time.
    #[error("cannot reach the controller at {base}: {source}; is `vmatrix up` running?")]
    Unreachable {
        /// The controller's URL.
        base: String,
        /// What the transport said.
        #[source]
        source: reqwest::Error,
    },
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

/// A client of one controller.
#[derive(Debug, Clone)]
pub struct ControllerClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ControllerClient {
    /// A client of the controller at `base` (`http://host:port`), with its bearer token if
    /// known (reads need none). Connecting gives up after 2 s; each call sets its own limit.
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("a plain HTTP client builds"),
        }
    }

    /// The controller's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The bearer token, if known.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        limit: Duration,
    ) -> Result<T> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(limit);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                base: self.base.clone(),
                source,
            })?;
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
        self.call(reqwest::Method::GET, path, None::<&()>, limit)
            .await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
        limit: Duration,
    ) -> Result<T> {
        self.call(reqwest::Method::POST, path, Some(body), limit)
            .await
    }

    /// Whether the controller answers.
    pub async fn healthy(&self) -> bool {
        self.http
            .get(format!("{}/api/v1/health", self.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
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

    /// An agent's heartbeat (this client's token is the machine's credential); the answer says
    /// what the machine must know of the others.
    pub async fn heartbeat(&self, report: &AgentReport) -> Result<HeartbeatReply> {
        self.post("/api/v1/agents/heartbeat", report, SHORT).await
    }

    /// The switch's route table; with `version`, a long poll of up to `wait` until it differs.
    pub async fn routes(&self, version: &str, wait: Duration) -> Result<RouteTable> {
        self.get(
            &format!("/api/v1/routes?version={version}&wait={}", wait.as_secs()),
            wait + SHORT,
        )
        .await
    }

    /// The switch's load report.
    pub async fn report_load(&self, report: &LoadReport) -> Result<()> {
        let _: serde_json::Value = self.post("/api/v1/load", report, SHORT).await?;
        Ok(())
    }
}

/// The limit of a call that does no waiting of its own.
const SHORT: Duration = Duration::from_secs(15);
