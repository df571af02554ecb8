//! `vmatrix up --ha`: the controller in high availability on one box — three etcd members
//! (Debian's `etcd-server`) and two controllers sharing their state there, one leading, the
//! other standing by — and the supervision that restarts any of them that dies.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use crate::cluster::{spawn_child, Child, Netns};

/// How many etcd members `up --ha` starts (a majority survives one lost member).
pub const MEMBERS: u16 = 3;

/// What a kept process is. `up` stops one kind at a time, in the reverse of their order, and
/// every process of a kind at once (machines stop their VMs side by side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Etcd,
    Controller,
    Agent,
    Switch,
}

/// One process `up` keeps running: what it is and how to start it again.
pub(crate) struct Kept {
    pub kind: Kind,
    pub what: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The network namespace it runs in, when not `up`'s: a machine's, held open here so that
    /// it outlives its agent (the agent's VMs serve on in it, and the agent started again
    /// joins it and takes them back).
    pub netns: Option<OwnedFd>,
}

impl Kept {
    /// `vmatrix ARGS…` (this binary).
    pub fn this(kind: Kind, what: impl Into<String>, args: Vec<String>) -> Result<Self> {
        Ok(Self {
            kind,
            what: what.into(),
            program: std::env::current_exe().context("finding the vmatrix binary")?,
            args,
            netns: None,
        })
    }

    /// Its network namespace from now on: the one process `pid` (its first start) runs in.
    pub fn keep_netns_of(&mut self, pid: u32) -> Result<()> {
        let path = format!("/proc/{pid}/ns/net");
        let f = std::fs::File::open(&path)
            .with_context(|| format!("keeping {}'s network namespace ({path})", self.what))?;
        self.netns = Some(f.into());
        Ok(())
    }

    pub fn start(&self) -> Result<Child> {
        let netns = match &self.netns {
            Some(fd) => Netns::Join(fd.as_raw_fd()),
            None => Netns::Host,
        };
        spawn_child(&self.program, &self.args, netns).with_context(|| self.what.clone())
    }
}

/// The ports `up --ha` uses from `first` on: the standby controller's, then each etcd member's
/// client port, then each member's peer port.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    first: u16,
}

impl Ports {
    /// From `first` (default: the API port + 100).
    pub fn new(first: Option<u16>, listen: SocketAddr) -> Result<Self> {
        let first = match first {
            Some(p) => p,
            None => listen.port().checked_add(100).ok_or_else(|| {
                anyhow::anyhow!("--listen {listen}: pass --ha-ports PORT (7 free ports from PORT)")
            })?,
        };
        if first.checked_add(2 * MEMBERS).is_none() {
            bail!("--ha-ports {first}: the 7 ports from it must be below 65536");
        }
        Ok(Self { first })
    }

    /// Fails unless every port is free on `ip` (a member that cannot bind would restart
    /// forever while the other two hide the lost redundancy).
    pub fn check_free(&self, ip: std::net::IpAddr) -> Result<()> {
        for p in self.first..=self.first + 2 * MEMBERS {
            if std::net::TcpListener::bind((ip, p)).is_err()
                || std::net::TcpListener::bind(("127.0.0.1", p)).is_err()
            {
                bail!(
                    "port {p} is in use: --ha needs the 7 ports from {} free; pass --ha-ports \
                     PORT",
                    self.first
                );
            }
        }
        Ok(())
    }

    /// The second controller's port.
    pub fn standby(&self) -> u16 {
        self.first
    }

    fn members(&self) -> Vec<(u16, u16)> {
        (1..=MEMBERS)
            .map(|i| (self.first + i, self.first + MEMBERS + i))
            .collect()
    }
}

/// The `--state` of controllers on the members `up --ha` starts.
pub fn state_url(ports: Ports) -> String {
    let hosts: Vec<String> = ports
        .members()
        .iter()
        .map(|(c, _)| format!("127.0.0.1:{c}"))
        .collect();
    format!("etcd://{}", hosts.join(","))
}

/// The etcd members of a matrix (`listen`: its API), their data under `data/etcd`.
pub fn members(ports: Ports, listen: SocketAddr, data: &Path) -> Result<Vec<Kept>> {
    let etcd = which("etcd").context(
        "--ha keeps the state on etcd: install Debian's etcd-server (scripts/install-deps.sh does)",
    )?;
    let ports = ports.members();
    let cluster: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("m{}=http://127.0.0.1:{p}", i + 1))
        .collect();
    let mut out = Vec::new();
    for (i, (c, p)) in ports.iter().enumerate() {
        let name = format!("m{}", i + 1);
        let dir = data.join("etcd").join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        out.push(Kept {
            kind: Kind::Etcd,
            what: format!("etcd member {name}"),
            program: etcd.clone(),
            netns: None,
            args: vec![
                format!("--name={name}"),
                format!("--data-dir={}", dir.display()),
                format!("--listen-client-urls=http://127.0.0.1:{c}"),
                format!("--advertise-client-urls=http://127.0.0.1:{c}"),
                format!("--listen-peer-urls=http://127.0.0.1:{p}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{p}"),
                format!("--initial-cluster={}", cluster.join(",")),
                format!("--initial-cluster-token=vmatrix-{}", listen.port()),
                "--initial-cluster-state=new".into(),
                "--logger=zap".into(),
                "--log-level=error".into(),
            ],
        });
    }
    Ok(out)
}

fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/bin".into(), "/usr/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("{program} not found"))
}

/// Waits until etcd at `url` answers a write through its majority.
pub async fn wait_etcd(url: &str, within: Duration) -> Result<()> {
    let etcd = std::sync::Arc::new(vmatrix_controller::etcd::Etcd::from_url(url)?);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let e = etcd.clone();
        let r = tokio::task::spawn_blocking(move || {
            e.put_if_absent(&format!("{}/created", e.prefix()), b"vmatrix")
        })
        .await?;
        match r {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > deadline => {
                bail!("etcd did not come up within {within:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Processes kept running: each one that ends is started again (after a pause that grows
/// while it keeps dying, up to 5 s; with `restart` false, only logged), until
/// [`Supervisor::stop`], which stops them kind by kind in the reverse of their order.
pub(crate) struct Supervisor {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervisor {
    pub fn start(kept: Vec<(Kept, Child)>, restart: bool) -> Self {
        let (stop, mut stopping) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut kept: Vec<(Kept, Option<Child>, Duration)> = kept
                .into_iter()
                .map(|(k, c)| (k, Some(c), Duration::from_millis(200)))
                .collect();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stopping.changed() => break,
                }
                for (k, child, pause) in kept.iter_mut() {
                    let ended = match child.as_mut().map(|c| c.0.try_wait()) {
                        Some(Ok(Some(status))) => Some(status.to_string()),
                        Some(Err(e)) => Some(e.to_string()),
                        Some(Ok(None)) => None,
                        None => Some("not running".into()),
                    };
                    let Some(how) = ended else {
                        *pause = Duration::from_millis(200);
                        continue;
                    };
                    if !restart {
                        if let Some(mut c) = child.take() {
                            let _ = c.0.wait().await;
                            tracing::warn!(
                                "{} ended ({how}); not started again (--no-restart)",
                                k.what
                            );
                        }
                        continue;
                    }
                    tracing::warn!("{} ended ({how}); starting it again in {pause:?}", k.what);
                    tokio::time::sleep(*pause).await;
                    *pause = (*pause * 2).min(Duration::from_secs(5));
                    *child = match k.start() {
                        Ok(c) => Some(c),
                        Err(e) => {
                            tracing::error!("{e:#}");
                            None
                        }
                    };
                }
            }
            // Stopping: the last started kind first (controllers before their etcd), every
            // process of a kind at once.
            let mut left: Vec<(Kind, Child)> = kept
                .into_iter()
                .filter_map(|(k, child, _)| child.map(|c| (k.kind, c)))
                .collect();
            while let Some(kind) = left.last().map(|(k, _)| *k) {
                let at = left
                    .iter()
                    .rposition(|(k, _)| *k != kind)
                    .map_or(0, |i| i + 1);
                let group: Vec<Child> = left.drain(at..).map(|(_, c)| c).collect();
                futures::future::join_all(group.into_iter().map(stop_child)).await;
            }
        });
        Self { stop, task }
    }

    /// Stops every kept process (SIGTERM, then SIGKILL after 15 s) and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// SIGTERM, then SIGKILL if it has not ended 15 s later; waits for it.
async fn stop_child(mut c: Child) {
    if let Some(pid) = c.0.id() {
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(15), c.0.wait())
        .await
        .is_err()
    {
        let _ = c.0.start_kill();
        let _ = c.0.wait().await;
    }
}
