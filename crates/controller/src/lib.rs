//! The controller: the matrix's brain. It holds what should run (services) and what does run
//! (instances on machines, from agent heartbeats), reconciles the two in a level-triggered loop,
//! carries out manual operations, logs every action with its reason, and serves the REST API.
//! State lives in an embedded SQLite database, so a restarted controller rebuilds its view from
//! it and from the agents' heartbeats — or on etcd, where several controllers share it: one
//! leads, the others stand by (`leader.rs`).
//!
//! The controller must never talk to QEMU or guests directly — only to agents — and never make a
//! placement decision outside the reconcile loop or an operator's explicit request.

mod actions;
mod agents;
mod api;
mod authority;
mod console;
mod control;
mod cpu;
mod dashboard;
mod db;
pub mod etcd;
mod identity;
mod inputs;
pub mod leader;
mod maintenance;
mod metrics;
mod mirror;
mod operate;
mod ops;
mod reconcile;
mod rollout;
mod settle;
mod volumes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use api::{router, Tokens};
pub use authority::ControllerTls;
pub use control::{ControlError, Controller, NetConfig};
pub use db::{Db, DbError, InstanceRow, OpState};
pub use mirror::Guard;
pub use ops::OpView;
pub use vmatrix_serve::ApiLimits;

/// How the controller is set up.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// API address.
    pub listen: SocketAddr,
    /// Where the state lives.
    pub state: StateStore,
    /// The operator's bearer token.
    pub token: String,
    /// A token that may only read (GET; not the console): dashboards, monitoring, scripts.
    /// Empty: none.
    pub read_token: String,
    /// The switch's token: it may read the route table and report load, nothing else.
    /// Empty: none (the switch then needs the operator's token).
    pub switch_token: String,
    /// The token new machines join with (empty: only the operator's token joins one).
    pub join_token: String,
    /// New machine names join without an operator's approval (`vmatrix machine approve`).
    pub auto_approve: bool,
    /// Run the load-driven policy (else the loop only keeps each service's `min`).
    pub policy: bool,
    /// The policy's settings (the same `vmatrix sim` runs by default).
    pub settings: vmatrix_policy::Settings,
    /// Maintenance instances unused (no console, no commit) for this long are discarded
    /// (none: they stay until discarded).
    pub maintenance_idle: Option<Duration>,
    /// More addresses the API also listens on (e.g. the underlay bridge the agents reach).
    pub also_listen: Vec<SocketAddr>,
    /// Bridged networking: the service network the instances get addresses on.
    pub network: Option<control::NetConfig>,
    /// What the API's clients may hold (connections, time to send a request head).
    pub limits: vmatrix_serve::ApiLimits,
    /// HTTPS: the API, and the agents' APIs it calls, over TLS with the matrix's authority
    /// kept in this directory (none: plain HTTP, for a network that is trusted anyway).
    pub tls: Option<ControllerTls>,
}

/// Reads the token in `dir/token`, or creates one (mode 0600). Returns it and whether it is new.
/// Where the controller keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateStore {
    /// An embedded SQLite database file (one controller).
    Sqlite(PathBuf),
    /// etcd, `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`: several controllers, one leads.
    Etcd(String),
}

impl StateStore {
    /// `sqlite:PATH` or `etcd://…`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("etcd://") {
            etcd::Etcd::from_url(s).map_err(|e| e.to_string())?;
            return Ok(Self::Etcd(s.to_owned()));
        }
        match s.strip_prefix("sqlite:") {
            Some(p) if !p.is_empty() => Ok(Self::Sqlite(PathBuf::from(p))),
            _ => Err(format!(
                "--state {s:?}: use sqlite:PATH or etcd://HOST:PORT[,HOST:PORT…][/PREFIX]"
            )),
        }
    }
}

impl std::fmt::Display for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            Self::Etcd(u) => f.write_str(u),
        }
    }
}

/// A secret that every controller sharing `etcd` uses: the one stored there, or `mine`
/// stored there if none is; written to `file` (0600) either way, for the local CLI.
pub fn share_secret(
    etcd: &etcd::Etcd,
    name: &str,
    mine: &str,
    file: &Path,
) -> std::io::Result<String> {
    let key = format!("{}/secrets/{name}", etcd.prefix());
    let value = etcd
        .put_if_absent(&key, mine.as_bytes())
        .map_err(std::io::Error::other)?;
    let value = String::from_utf8(value).map_err(std::io::Error::other)?;
    if std::fs::read_to_string(file)
        .map(|t| t.trim().to_owned())
        .ok()
        .as_deref()
        != Some(value.as_str())
    {
        write_secret(file, &value)?;
    }
    Ok(value)
}

pub fn load_or_create_token(dir: &Path) -> std::io::Result<(String, bool)> {
    load_or_create_secret(&dir.join("token"))
}

/// Reads the join token in `dir/join-token` (what new machines join with: it grants nothing
/// else), or creates one (mode 0600). Returns it and whether it is new.
pub fn load_or_create_join_token(dir: &Path) -> std::io::Result<(String, bool)> {
    load_or_create_secret(&dir.join("join-token"))
}

/// Reads the read-only token in `dir/read-token`, or creates one (mode 0600).
pub fn load_or_create_read_token(dir: &Path) -> std::io::Result<(String, bool)> {
    load_or_create_secret(&dir.join("read-token"))
}

/// Reads the switch's token in `dir/switch-token`, or creates one (mode 0600).
pub fn load_or_create_switch_token(dir: &Path) -> std::io::Result<(String, bool)> {
    load_or_create_secret(&dir.join("switch-token"))
}

fn load_or_create_secret(path: &Path) -> std::io::Result<(String, bool)> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_owned();
        if !t.is_empty() {
            return Ok((t, false));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let token = identity::random_secret()?;
    write_secret(path, &token)?;
    Ok((token, true))
}

pub(crate) fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()
}

/// Opens the state, starts the reconcile loop and serves the API until the process ends.
pub async fn serve(
    config: ControllerConfig,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // The address first: a controller that cannot serve must not start a second loop.
    let mut listener = Some(tokio::net::TcpListener::bind(config.listen).await?);
    let secured = match &config.tls {
        Some(t) => {
            let listens: Vec<SocketAddr> = std::iter::once(config.listen)
                .chain(config.also_listen.iter().copied())
                .collect();
            Some(std::sync::Arc::new(authority::Secured::prepare(
                t, &listens,
            )?))
        }
        None => None,
    };
    let tls = secured.as_ref().map(|s| s.server.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    // On etcd, the API's address answers from the start: a standby's refusals until this
    // controller leads, then the API, on the same server — a client's kept-alive connection
    // to the standby reaches the leader it became.
    let active: ActiveApi = Default::default();
    let mut front = None;
    let (db, lead) = match &config.state {
        StateStore::Sqlite(path) => (Db::open(path)?, None),
        StateStore::Etcd(url) => {
            let etcd = std::sync::Arc::new(etcd::Etcd::from_url(url)?);
            let me = format!("{scheme}://{}", config.listen);
            let app = switchable(
                leader::standby_router(etcd.clone(), me.clone()),
                active.clone(),
            );
            let Some(l) = listener.take() else {
                return Err("the API's address is not bound".into());
            };
            let mut serving =
                tokio::spawn(vmatrix_serve::serve_api(l, app, config.limits, tls.clone()));
            let lead = tokio::select! {
                l = leader::campaign(etcd.clone(), &me) => l?,
                r = &mut serving => return Err(format!("the API on {me} ended: {r:?}").into()),
            };
            let guard = lead.guard();
            let db = match tokio::task::spawn_blocking(move || Db::open_etcd(etcd, guard)).await {
                Ok(Ok(db)) => db,
                Ok(Err(e)) => {
                    lead.resign();
                    return Err(e.into());
                }
                Err(e) => {
                    lead.resign();
                    return Err(e.to_string().into());
                }
            };
            front = Some(serving);
            (db, Some(lead))
        }
    };
    let mut more = Vec::new();
    for a in &config.also_listen {
        more.push(tokio::net::TcpListener::bind(a).await?);
    }
    let controller = Controller::new(db, config.token.clone());
    controller.set_lead(lead.clone());
    if let Some(s) = secured {
        let _ = controller.secured.set(s);
    }
    controller.set_join_token(config.join_token.clone());
    controller.set_auto_approve(config.auto_approve);
    controller.load_credentials()?;
    controller.set_policy(config.policy);
    controller.set_settings(config.settings.clone());
    *controller
        .maintenance_idle
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = config.maintenance_idle;
    let network = config.network.clone().map(|mut n| {
        // The controller's own addresses are hosts no instance may reach.
        for a in std::iter::once(config.listen).chain(config.also_listen.iter().copied()) {
            if let std::net::IpAddr::V4(ip) = a.ip() {
                if !ip.is_loopback() {
                    n.hosts.push(ip);
                }
            }
        }
        n
    });
    *controller.network.lock().unwrap_or_else(|e| e.into_inner()) = network;
    let interrupted = controller.interrupt_left_ops()?;
    if interrupted > 0 {
        tracing::info!("{interrupted} operation(s) were interrupted by the last stop; settling their instances from the machines' reports");
    }
    controller.event(
        "controller",
        "start",
        &format!("state {}", config.state),
        "ok",
    );
    tokio::spawn(controller.clone().run_loop(Duration::from_secs(1)));
    tokio::spawn(controller.clone().prune_loop());
    tokio::spawn(controller.clone().fast_loop());
    tokio::spawn(controller.clone().resume_rollouts());
    tracing::info!("controller API on {scheme}://{}", config.listen);
    let app = router(
        controller,
        api::Tokens {
            operator: config.token.clone(),
            read: config.read_token.clone(),
            switch: config.switch_token.clone(),
        },
    );
    let config_limits = config.limits;
    for (l, a) in more.into_iter().zip(config.also_listen.clone()) {
        tracing::info!("controller API also on {scheme}://{a}");
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(e) = vmatrix_serve::serve_api(l, app, config_limits, tls).await {
                tracing::error!("the API on {a} ended: {e}");
            }
        });
    }
    let (Some(lead), Some(serving)) = (lead, front) else {
        let Some(l) = listener else {
            return Err("the API's address is not bound".into());
        };
        vmatrix_serve::serve_api(l, app, config.limits, tls).await?;
        return Ok(());
    };
    *active.write().unwrap_or_else(|e| e.into_inner()) = Some(app);
    // Leading on etcd: until the lead is lost; then this process stops (it must not act on
    // state it may no longer write) and its supervisor starts it again, as a standby.
    let resign = ResignOnDrop(lead.clone());
    tokio::select! {
        r = serving => r.map_err(|e| e.to_string())??,
        why = lead.lost() => return Err(format!("lost the lead: {why}").into()),
    }
    drop(resign);
    Ok(())
}

/// The API once this controller leads (`None`: it stands by).
type ActiveApi = std::sync::Arc<std::sync::RwLock<Option<axum::Router>>>;

/// A router that passes every request to the active API, or to `standby` while there is none.
fn switchable(standby: axum::Router, active: ActiveApi) -> axum::Router {
    axum::Router::new().fallback(move |req: axum::extract::Request| {
        let app = active.read().unwrap_or_else(|e| e.into_inner()).clone();
        let standby = standby.clone();
        async move {
            use tower::ServiceExt;
            let to = app.unwrap_or(standby);
            match to.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        }
    })
}

/// Hands the lead over when the serving future ends or is dropped (a clean stop).
struct ResignOnDrop(std::sync::Arc<leader::Lead>);

impl Drop for ResignOnDrop {
    fn drop(&mut self) {
        if self.0.valid() {
            let lead = self.0.clone();
            // Revoking is a blocking call; a drop may run inside the runtime.
            let _ = std::thread::spawn(move || lead.resign()).join();
        }
    }
}
