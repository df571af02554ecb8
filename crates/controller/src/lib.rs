//! The controller: the matrix's brain. It holds what should run (services) and what does run
//! (instances on machines, from agent heartbeats), reconciles the two in a level-triggered loop,
//! carries out manual operations, logs every action with its reason, and serves the REST API.
//! State lives in an embedded SQLite database, so a restarted controller rebuilds its view from
//! it and from the agents' heartbeats.
//!
//! The controller must never talk to QEMU or guests directly — only to agents — and never make a
//! placement decision outside the reconcile loop or an operator's explicit request.

mod actions;
mod agents;
mod api;
mod console;
mod control;
mod cpu;
mod db;
mod identity;
mod inputs;
mod maintenance;
mod operate;
mod ops;
mod reconcile;
mod rollout;
mod settle;
mod volumes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use api::router;
pub use control::{ControlError, Controller, NetConfig};
pub use db::{Db, DbError, OpState};
pub use ops::OpView;
pub use vmatrix_serve::ApiLimits;

/// How the controller is set up.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// API address.
    pub listen: SocketAddr,
    /// The SQLite database file.
    pub state: PathBuf,
    /// The operator's bearer token.
    pub token: String,
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
}

/// Reads the token in `dir/token`, or creates one (mode 0600). Returns it and whether it is new.
pub fn load_or_create_token(dir: &Path) -> std::io::Result<(String, bool)> {
    load_or_create_secret(&dir.join("token"))
}

/// Reads the join token in `dir/join-token` (what new machines join with: it grants nothing
/// else), or creates one (mode 0600). Returns it and whether it is new.
pub fn load_or_create_join_token(dir: &Path) -> std::io::Result<(String, bool)> {
    load_or_create_secret(&dir.join("join-token"))
}

fn load_or_create_secret(path: &Path) -> std::io::Result<(String, bool)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
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
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    Ok((token, true))
}

/// Opens the state, starts the reconcile loop and serves the API until the process ends.
pub async fn serve(
    config: ControllerConfig,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // The address first: a controller that cannot serve must not start a second loop.
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let mut more = Vec::new();
    for a in &config.also_listen {
        more.push(tokio::net::TcpListener::bind(a).await?);
    }
    let db = Db::open(&config.state)?;
    let controller = Controller::new(db, config.token.clone());
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
        &format!("state {}", config.state.display()),
        "ok",
    );
    tokio::spawn(controller.clone().run_loop(Duration::from_secs(1)));
    tokio::spawn(controller.clone().prune_loop());
    tokio::spawn(controller.clone().fast_loop());
    tokio::spawn(controller.clone().resume_rollouts());
    tracing::info!("controller API on http://{}", config.listen);
    let app = router(controller, config.token);
    let config_limits = config.limits;
    for (l, a) in more.into_iter().zip(config.also_listen.clone()) {
        tracing::info!("controller API also on http://{a}");
        let app = app.clone();
        tokio::spawn(async move {
            if let Err(e) = vmatrix_serve::serve_api(l, app, config_limits).await {
                tracing::error!("the API on {a} ended: {e}");
            }
        });
    }
    vmatrix_serve::serve_api(listener, app, config.limits).await?;
    Ok(())
}
