//! A matrix in one test process: a real controller (its own runtime, so a test can kill it as
//! `kill -9` would and start another on the same state), real agents over the fake hypervisor
//! (each on its own runtime and loopback address), a real `file://` repository, and a client.
//! Nothing here needs QEMU.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmatrix_agent::fake::FakeHypervisor;
use vmatrix_agent::{Agent, AgentConfig};
use vmatrix_controller::ControllerConfig;
use vmatrix_core::api::{InstanceInfo, InstancesReply, MachineRole, Operation};
use vmatrix_core::ImageRef;
use vmatrix_store::Repository;

pub const TOKEN: &str = "component-token";
/// How long the test controller waits for a request head.
pub const API_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// What the test machines join with.
pub const JOIN_TOKEN: &str = "component-join-token";
/// The read-only token.
pub const READ_TOKEN: &str = "component-read-token";
/// The switch's token.
pub const SWITCH_TOKEN: &str = "component-switch-token";

/// A runtime of its own: dropping it in the background is a crash of what runs on it.
pub struct Process {
    rt: Option<tokio::runtime::Runtime>,
}

impl Process {
    fn start<F: std::future::Future + Send + 'static>(f: impl FnOnce() -> F) -> Self
    where
        F::Output: Send,
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        rt.spawn(f());
        Self { rt: Some(rt) }
    }

    /// Kills it: every task stops where it is, nothing runs after, and what the tasks held (a
    /// listening socket) is gone when this returns — `shutdown_background` alone drops them
    /// later, and an agent started again at once could find its address still taken, fail to
    /// bind and retry while a test's command was refused. (The runtime ends on a thread of its
    /// own: a runtime cannot be shut down waiting from inside another.)
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            std::thread::spawn(move || rt.shutdown_timeout(Duration::from_secs(10)))
                .join()
                .expect("the runtime shuts down");
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Matrix {
    pub dir: tempfile::TempDir,
    pub repo: Arc<Repository>,
    pub repo_url: String,
    pub fake: FakeHypervisor,
    pub api: SocketAddr,
    pub controller: Option<Process>,
    pub agents: HashMap<String, (Process, Arc<Agent>)>,
    pub http: reqwest::Client,
    /// The policy the controller runs (none: it keeps each service's `min`).
    pub policy: Option<vmatrix_policy::Settings>,
    /// New machine names join without an operator's approval (the default here).
    pub auto_approve: bool,
    /// The controller's idle limit for maintenance instances.
    pub maintenance_idle: Option<Duration>,
    /// The control plane over TLS (the API over HTTPS, the agents' APIs too).
    pub tls: bool,
}

/// A loopback port free right now on `ip`.
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub async fn wait_for<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Matrix {
    /// A repository with `guest:v1`, and a controller in manual mode (keep `min`).
    pub async fn new() -> Self {
        Self::with_tls(false).await
    }

    /// [`Matrix::new`], the control plane over TLS where `tls`.
    pub async fn with_tls(tls: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmx-comp-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let repo_url = format!("file://{}", dir.path().join("repo").display());
        let repo = Arc::new(Repository::open_or_init(&repo_url).expect("repository"));
        let mut m = Self {
            api: SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1"))),
            dir,
            repo,
            repo_url,
            fake: FakeHypervisor::new(),
            controller: None,
            agents: HashMap::new(),
            // Every route but health needs the token.
            http: Self::client_trusting(None),
            policy: None,
            auto_approve: true,
            maintenance_idle: None,
            tls,
        };
        m.import("guest:v1", b"version one");
        m.start_controller().await;
        m
    }

    /// Stores `bytes` (a stand-in disk) as `image`; returns its version id.
    pub fn import(&self, image: &str, bytes: &[u8]) -> String {
        let file = self.dir.path().join("disk.raw");
        let mut data = bytes.to_vec();
        data.resize(1 << 20, 0);
        std::fs::write(&file, &data).expect("write the disk");
        let image = ImageRef::parse(image).expect("image name");
        self.repo
            .import_state(&file, &image, &|_| {})
            .expect("import");
        self.repo.resolve(&image).expect("resolve").0
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.api)
    }

    /// Where the controller keeps its authority and certificate over TLS.
    pub fn tls_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("controller-tls")
    }

    /// The authority's certificate (PEM), once the controller has made it.
    pub fn authority(&self) -> Option<String> {
        std::fs::read_to_string(self.tls_dir().join("ca-cert.pem")).ok()
    }

    /// A client with the operator's token that trusts `authority` only.
    pub fn client_trusting(authority: Option<&str>) -> reqwest::Client {
        let mut b = reqwest::Client::builder().default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {TOKEN}").parse().expect("header"),
            )]
            .into_iter()
            .collect(),
        );
        if let Some(a) = authority {
            b = b
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(a.as_bytes()).expect("PEM"));
        }
        b.build().expect("HTTP client")
    }

    /// Starts a controller on the state (again, after a kill) and waits for its API.
    pub async fn start_controller(&mut self) {
        let config = ControllerConfig {
            listen: self.api,
            state: vmatrix_controller::StateStore::Sqlite(self.dir.path().join("state.db")),
            token: TOKEN.into(),
            read_token: READ_TOKEN.into(),
            switch_token: SWITCH_TOKEN.into(),
            join_token: JOIN_TOKEN.into(),
            auto_approve: self.auto_approve,
            policy: self.policy.is_some(),
            settings: self.policy.clone().unwrap_or_default(),
            maintenance_idle: self.maintenance_idle,
            also_listen: Vec::new(),
            network: None,
            // A short head timeout, so that a test can see it close a half-sent request.
            limits: vmatrix_controller::ApiLimits {
                header_timeout: API_HEADER_TIMEOUT,
                ..vmatrix_controller::ApiLimits::default()
            },
            tls: self.tls.then(|| vmatrix_controller::ControllerTls {
                dir: self.tls_dir(),
                names: Vec::new(),
            }),
        };
        self.controller = Some(Process::start(move || async move {
            // The port of a killed controller may take a moment to be free again.
            for _ in 0..100 {
                if let Err(e) = vmatrix_controller::serve(config.clone()).await {
                    tracing::debug!("controller: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
        if self.tls {
            let dir = self.tls_dir();
            let authority = wait_for("the authority", Duration::from_secs(15), async || {
                std::fs::read_to_string(dir.join("ca-cert.pem")).ok()
            })
            .await;
            self.http = Self::client_trusting(Some(&authority));
        }
        let url = self.url("/api/v1/health");
        let http = self.http.clone();
        wait_for(
            "the controller's API",
            Duration::from_secs(15),
            async || {
                http.get(&url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            },
        )
        .await;
    }

    /// Restarts the controller running the policy with `settings`.
    pub async fn run_policy(&mut self, settings: vmatrix_policy::Settings) {
        self.policy = Some(settings);
        self.kill_controller();
        self.start_controller().await;
    }

    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            c.kill();
        }
    }

    /// Starts (or restarts) the agent of machine `name` on 127.0.0.`host`.
    pub async fn start_agent(&mut self, name: &str, host: u8, role: MachineRole) {
        let ip = format!("127.0.0.{host}");
        let previous = self.agents.get(name).map(|(_, a)| a.config.listen);
        let listen =
            previous.unwrap_or_else(|| format!("{ip}:{}", free_port(&ip)).parse().expect("addr"));
        let config = AgentConfig {
            name: name.into(),
            listen,
            role,
            vcpus: 8,
            memory_mib: 4096,
            data: self.dir.path().join("agents").join(name),
            repo: self.repo_url.clone(),
            accel: vmatrix_vmm::Accelerator::Tcg,
            cache_bytes: 64 << 20,
            net: None,
        };
        let agent = Agent::new(config, Arc::new(self.fake.clone())).expect("agent");
        let link = vmatrix_agent::ControllerLink::new(&self.url(""), self.authority())
            .expect("the controller's link");
        let a = agent.clone();
        let process = Process::start(move || async move {
            for _ in 0..100 {
                if let Err(e) =
                    vmatrix_agent::serve(a.clone(), link.clone(), JOIN_TOKEN.into()).await
                {
                    tracing::debug!("agent: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        self.agents.insert(name.into(), (process, agent));
        // A machine started again is "up" at once (its last heartbeat is recent): wait for
        // its API to take connections too.
        wait_for("the agent's API", Duration::from_secs(15), async || {
            tokio::net::TcpStream::connect(listen).await.ok()
        })
        .await;
        let name = name.to_owned();
        wait_for(
            "the agent to register",
            Duration::from_secs(15),
            async || {
                self.machines()
                    .await
                    .into_iter()
                    .find(|m| m["name"] == name.as_str() && m["state"] == "up")
            },
        )
        .await;
    }

    pub fn kill_agent(&mut self, name: &str) -> Arc<Agent> {
        let (mut p, a) = self.agents.remove(name).expect("that agent");
        p.kill();
        // Keep the config for a restart.
        self.agents
            .insert(name.into(), (Process { rt: None }, a.clone()));
        a
    }

    /// Machine `name`'s credential, as its agent keeps it.
    pub fn credential(&self, name: &str) -> String {
        let path = self.dir.path().join("agents").join(name).join("credential");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_owned()
    }

    pub fn agent(&self, name: &str) -> &Arc<Agent> {
        &self.agents[name].1
    }

    pub async fn apply(&self, services: &str) {
        let specs = vmatrix_core::parse_services("test.toml", services, &|name: &str| {
            Err(format!("no file {name} in tests"))
        })
        .expect("valid services");
        let r = self
            .http
            .post(self.url("/api/v1/services"))
            .bearer_auth(TOKEN)
            .json(&json!({ "services": specs }))
            .send()
            .await
            .expect("apply");
        assert!(
            r.status().is_success(),
            "apply: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// Submits an operation, waiting up to `wait` seconds: (HTTP status, body).
    pub async fn operate(&self, op: Operation, wait: u64) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(&format!("/api/v1/operations?wait={wait}")))
            .bearer_auth(TOKEN)
            .json(&op)
            .send()
            .await
            .expect("operation");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Runs an operation to its end (30 s at most) and asserts that it succeeded.
    pub async fn done(&self, op: Operation) -> Value {
        let what = format!("{op:?}");
        let (status, body) = self.operate(op, 30).await;
        assert_eq!(status, 200, "{what}: {body}");
        body
    }

    pub async fn instances(&self) -> Vec<InstanceInfo> {
        let Ok(r) = self.http.get(self.url("/api/v1/instances")).send().await else {
            return Vec::new();
        };
        r.json::<InstancesReply>()
            .await
            .map(|r| r.instances)
            .unwrap_or_default()
    }

    pub async fn instance(&self, id: &str) -> Option<InstanceInfo> {
        self.instances()
            .await
            .into_iter()
            .find(|i| i.id.as_str() == id)
    }

    pub async fn machines(&self) -> Vec<Value> {
        let Ok(r) = self.http.get(self.url("/api/v1/machines")).send().await else {
            return Vec::new();
        };
        let v: Value = r.json().await.unwrap_or(Value::Null);
        v["machines"].as_array().cloned().unwrap_or_default()
    }

    pub async fn events(&self) -> Vec<Value> {
        let Ok(r) = self
            .http
            .get(self.url("/api/v1/events?limit=10000"))
            .send()
            .await
        else {
            return Vec::new();
        };
        let v: Value = r.json().await.unwrap_or(Value::Null);
        v["events"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until instance `id` is in `state` (on `machine`, if given).
    pub async fn wait_state(
        &self,
        id: &str,
        state: &str,
        machine: Option<&str>,
        limit: Duration,
    ) -> InstanceInfo {
        wait_for(&format!("{id} {state} on {machine:?}"), limit, async || {
            self.instance(id)
                .await
                .filter(|i| i.state.as_str() == state && machine.is_none_or(|m| i.machine == m))
        })
        .await
    }

    /// Waits (20 s at most) until instance `id` runs, wherever.
    pub async fn running(&self, id: &str) -> InstanceInfo {
        self.wait_state(id, "running", None, Duration::from_secs(20))
            .await
    }

    /// PUT then GET of `/kv/KEY` on an instance's endpoint.
    pub async fn put_kv(&self, endpoint: &str, key: &str, value: &str) {
        let r = self
            .http
            .put(format!("http://{endpoint}/kv/{key}"))
            .body(value.to_owned())
            .send()
            .await
            .expect("the guest answers");
        assert!(r.status().is_success());
    }

    pub async fn get_kv(&self, endpoint: &str, key: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("http://{endpoint}/kv/{key}"))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.text().await.ok()
    }

    /// The tags of the repository whose name is `name`.
    pub fn tags(&self, name: &str) -> Vec<String> {
        self.repo
            .list()
            .expect("list")
            .into_iter()
            .map(|e| e.image)
            .filter(|i| i.starts_with(&format!("{name}:")))
            .collect()
    }
}

impl Drop for Matrix {
    fn drop(&mut self) {
        for (_, (p, _)) in self.agents.iter_mut() {
            p.kill();
        }
        self.kill_controller();
        for pid in self.fake.pids() {
            self.fake.crash(pid);
        }
    }
}

/// The subject's common name and the names (DNS or IP) of a PEM certificate.
pub fn names_in(pem: &str) -> (String, Vec<String>) {
    let p = rcgen::CertificateParams::from_ca_cert_pem(pem).expect("a certificate");
    let cn = match p.distinguished_name.get(&rcgen::DnType::CommonName) {
        Some(rcgen::DnValue::Utf8String(s)) => s.clone(),
        other => panic!("common name: {other:?}"),
    };
    let names = p
        .subject_alt_names
        .iter()
        .map(|s| match s {
            rcgen::SanType::DnsName(n) => n.to_string(),
            rcgen::SanType::IpAddress(ip) => ip.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    (cn, names)
}
