//! The control plane from the command line: `controller`, `agent`, `up`, and the client
//! commands (`apply`, `services`, `machines`, `ps`, `events`, `activate`, `suspend`, `resume`,
//! `migrate`, `discard`, `drain`) that talk to the controller's API.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use vmatrix_core::api::{ApplyRequest, MachineRole, Operation};

/// The API token: `VMATRIX_TOKEN`, or the one the controller keeps in `DATA/controller/token`.
fn token(data: &Path) -> Option<String> {
    std::env::var("VMATRIX_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| {
            std::fs::read_to_string(data.join("controller/token"))
                .ok()
                .map(|t| t.trim().to_owned())
        })
}

fn required_token(data: &Path) -> Result<String> {
    token(data).ok_or_else(|| {
        anyhow!(
            "no token: set VMATRIX_TOKEN to the controller's token (in its DATA/controller/token)"
        )
    })
}

/// Where the CLI finds the controller: `--api`, or the URL the controller wrote in DATA.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(api: Option<String>, data: &Path) -> Result<Self> {
        let base = match api {
            Some(a) => a,
            None => std::fs::read_to_string(data.join("controller/api"))
                .map(|s| s.trim().to_owned())
                .map_err(|_| {
                    anyhow!(
                        "no controller found in {}: start one with `vmatrix up`, or pass --api URL",
                        data.display()
                    )
                })?,
        };
        let token = token(data);
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(600))
                .build()?,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            anyhow!(
                "cannot reach the controller at {}: {e}; is `vmatrix up` running?",
                self.base
            )
        })?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "{}",
                value["error"]
                    .as_str()
                    .map_or_else(|| status.to_string(), str::to_owned)
            );
        }
        Ok(value)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// Submits an operation and follows it to its end. The controller runs it as its own
    /// task: Ctrl-C here stops only the following, never the operation.
    pub async fn operate(&self, op: Operation) -> Result<String> {
        let v = self
            .post("/api/v1/operations?wait=5", serde_json::to_value(op)?)
            .await?;
        let reply: vmatrix_core::api::OperationReply =
            serde_json::from_value(v).context("the controller's reply to an operation")?;
        if reply.state == vmatrix_core::api::OperationState::Running {
            eprintln!(
                "operation {id} runs on the controller; Ctrl-C stops only this wait (`vmatrix operation {id}` follows it again)",
                id = reply.operation
            );
        }
        self.follow(reply).await
    }

    /// Waits for operation `reply.operation` to settle and says how it ended.
    pub async fn follow(&self, mut reply: vmatrix_core::api::OperationReply) -> Result<String> {
        use vmatrix_core::api::OperationState as S;
        while reply.state == S::Running {
            let v = self
                .get(&format!("/api/v1/operations/{}?wait=30", reply.operation))
                .await?;
            reply = serde_json::from_value(v).context("the controller's reply to an operation")?;
        }
        match reply.state {
            S::Done => Ok(reply.result),
            S::Interrupted => Ok(format!(
                "operation {} was interrupted: {}",
                reply.operation, reply.result
            )),
            S::Failed | S::Running => {
                bail!("operation {} failed: {}", reply.operation, reply.result)
            }
        }
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!(
        "{}",
        line(headers.iter().map(|h| h.to_string()).collect()).trim_end()
    );
    for r in rows {
        println!("{}", line(r).trim_end());
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub async fn apply(client: &Client, services: Vec<vmatrix_core::ServiceSpec>) -> Result<()> {
    let n = services.len();
    client
        .post(
            "/api/v1/services",
            serde_json::to_value(ApplyRequest { services })?,
        )
        .await?;
    println!("applied {n} service(s); `vmatrix ps` shows the instances as they come up");
    Ok(())
}

pub async fn services(client: &Client, json: bool) -> Result<()> {
    let v = client.get("/api/v1/services").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows = v["services"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|x| {
            [
                "name",
                "image",
                "priority",
                "min",
                "max",
                "capacity_rps",
                "vcpus",
                "memory_mib",
                "dropped",
            ]
            .iter()
            .map(|k| match *k {
                "dropped" => v["dropped"][s(&x["name"])]
                    .as_str()
                    .unwrap_or("-")
                    .to_owned(),
                _ => s(&x[k]),
            })
            .collect()
        })
        .collect();
    table(
        &[
            "NAME", "IMAGE", "PRIORITY", "MIN", "MAX", "RPS/INST", "VCPUS", "MEMORY", "DROPPED",
        ],
        rows,
    );
    Ok(())
}

pub async fn machines(client: &Client, json: bool) -> Result<()> {
    let v = client.get("/api/v1/machines").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows = v["machines"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|x| {
            let mut row: Vec<String> = [
                "name",
                "address",
                "role",
                "vcpus",
                "memory_mib",
                "state",
                "instances",
            ]
            .iter()
            .map(|k| s(&x[k]))
            .collect();
            row.push(format!(
                "{:.0}%",
                x["cpu_load"].as_f64().unwrap_or(0.0) * 100.0
            ));
            row.push(if x["free"] == true {
                "free: can power down".into()
            } else {
                String::new()
            });
            row
        })
        .collect();
    table(
        &[
            "NAME",
            "ADDRESS",
            "ROLE",
            "VCPUS",
            "MEMORY",
            "STATE",
            "INSTANCES",
            "CPU",
            "",
        ],
        rows,
    );
    Ok(())
}

pub async fn ps(client: &Client, json: bool) -> Result<()> {
    let v = client.get("/api/v1/instances").await?;
    let list: vmatrix_core::api::InstancesReply =
        serde_json::from_value(v).context("the controller's instance list")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let dash = |c: String| if c.is_empty() { "-".to_owned() } else { c };
    let rows = list
        .instances
        .into_iter()
        .map(|i| {
            vec![
                i.id.to_string(),
                i.service.to_string(),
                dash(i.image),
                dash(i.version.chars().take(12).collect()),
                dash(i.machine),
                i.state.as_str().to_owned(),
                dash(i.endpoint),
                i.generation.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "INSTANCE", "SERVICE", "IMAGE", "VERSION", "MACHINE", "STATE", "ENDPOINT", "GEN",
        ],
        rows,
    );
    Ok(())
}

fn print_event(e: &Value) {
    let at = e["at_ms"].as_u64().unwrap_or(0);
    let secs = at / 1000;
    println!(
        "{:02}:{:02}:{:02}.{:03}  {:<12} {:<40} {:<36} {}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        at % 1000,
        s(&e["who"]),
        s(&e["what"]),
        s(&e["why"]),
        s(&e["outcome"])
    );
}

pub async fn events(client: &Client, follow: bool, json: bool) -> Result<()> {
    let mut after = 0u64;
    loop {
        let v = client.get(&format!("/api/v1/events?after={after}")).await?;
        let list = v["events"].as_array().cloned().unwrap_or_default();
        for e in &list {
            if json {
                println!("{e}");
            } else {
                print_event(e);
            }
            after = after.max(e["id"].as_u64().unwrap_or(0));
        }
        if !follow {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = crate::shutdown_signal() => return Ok(()),
        }
    }
}

/// Options of `vmatrix agent`.
pub struct AgentArgs {
    pub controller: String,
    pub listen: SocketAddr,
    pub name: Option<String>,
    pub role: String,
    pub vcpus: u32,
    pub memory: u32,
    pub repo: Option<String>,
    pub cache_size: u64,
    pub keep_vms: bool,
}

pub async fn agent(args: AgentArgs, data: &Path, accel: vmatrix_vmm::AccelChoice) -> Result<()> {
    let name = args
        .name
        .unwrap_or_else(|| format!("rm-{}", args.listen.ip()).replace(['.', ':'], "-"));
    let role = match args.role.as_str() {
        "dedicated" => MachineRole::Dedicated,
        "shared" => MachineRole::Shared,
        other => bail!("--role {other:?}: use dedicated or shared"),
    };
    let token = required_token(data)?;
    let guest = data.join("guest/reference.img.parts");
    let accel = vmatrix_vmm::accel::resolve(
        accel,
        Some(&vmatrix_vmm::ProbeBoot {
            kernel: guest.join("vmlinuz"),
            initrd: guest.join("initrd.gz"),
        }),
    )
    .await;
    let repo = crate::image::repo_url(args.repo, data)?;
    let machine_data = data.join("agents").join(&name);
    let config = vmatrix_agent::AgentConfig {
        name,
        listen: args.listen,
        role,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        data: machine_data,
        repo,
        accel,
        cache_bytes: args.cache_size,
    };
    let agent = vmatrix_agent::Agent::new(config, std::sync::Arc::new(vmatrix_agent::Qemu))?;
    tokio::select! {
        r = vmatrix_agent::serve(agent.clone(), args.controller, token) => r.context("agent API")?,
        _ = crate::shutdown_signal() => {
            if args.keep_vms {
                tracing::info!("agent stopping; its VMs keep running for the next agent (--on-exit keep)");
            } else {
                tracing::info!("agent stopping; its VMs stop with it");
                agent.stop_all().await;
            }
        }
    }
    Ok(())
}

pub async fn controller(
    listen: SocketAddr,
    state: Option<String>,
    policy: &str,
    season: &str,
    data: &Path,
) -> Result<()> {
    let season = match season {
        "off" | "0" => Duration::ZERO,
        s => Duration::from_secs_f64(
            crate::sim::seconds(s)
                .with_context(|| format!("--season {s}: use e.g. 7d, 1d or off"))?
                .max(0.0),
        ),
    };
    let policy = match policy {
        "switching" => true,
        "min" => false,
        other => bail!(
            "--policy {other:?}: use min (keep each service's min) or switching (load-driven)"
        ),
    };
    let dir = data.join("controller");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let state = match state {
        Some(s) => PathBuf::from(
            s.strip_prefix("sqlite:")
                .ok_or_else(|| anyhow!("--state {s:?}: use sqlite:PATH"))?,
        ),
        None => dir.join("state.db"),
    };
    let (token, new) =
        vmatrix_controller::load_or_create_token(&dir).context("creating the API token")?;
    if new {
        // Not println!: a controller must not die because nobody reads its stdout.
        let _ = writeln!(
            std::io::stdout(),
            "API token (stored with mode 0600 in {}): {token}",
            dir.join("token").display()
        );
    }
    std::fs::write(dir.join("api"), format!("http://{listen}\n"))?;
    let config = vmatrix_controller::ControllerConfig {
        listen,
        state,
        token,
        policy,
        season,
    };
    tokio::select! {
        r = vmatrix_controller::serve(config) => r.map_err(|e| anyhow!("{e}"))?,
        _ = crate::shutdown_signal() => tracing::info!("controller stopping"),
    }
    Ok(())
}

/// A child process of `up`, killed when `up` ends.
struct Child(tokio::process::Child);

fn spawn_self(args: &[String]) -> Result<Child> {
    let exe = std::env::current_exe().context("finding the vmatrix binary")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args).kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; the child dies with this process even on kill -9.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    Ok(Child(
        cmd.spawn().context("starting a vmatrix child process")?,
    ))
}

/// Options of `vmatrix up`.
pub struct UpArgs {
    pub policy: String,
    pub season: String,
    pub machines: u32,
    pub listen: SocketAddr,
    pub vcpus: u32,
    pub memory: u32,
    pub switch_listen: SocketAddr,
}

pub async fn switch(
    controller: Option<String>,
    listen: SocketAddr,
    hold: u64,
    max_held: usize,
    data: &Path,
) -> Result<()> {
    let controller = match controller {
        Some(c) => c,
        None => std::fs::read_to_string(data.join("controller/api"))
            .map(|s| s.trim().to_owned())
            .map_err(|_| anyhow!("no controller URL: pass --controller URL"))?,
    };
    let token = required_token(data)?;
    let config = vmatrix_switch::SwitchConfig {
        listen,
        controller,
        token,
        hold_timeout: Duration::from_secs(hold),
        max_held,
        retry_window: Duration::from_secs(10),
    };
    tokio::select! {
        r = vmatrix_switch::serve(config) => r.context("switch")?,
        _ = crate::shutdown_signal() => tracing::info!("switch stopping"),
    }
    Ok(())
}

pub async fn up(args: UpArgs, data: &Path, accel: vmatrix_vmm::AccelChoice) -> Result<()> {
    if args.machines == 0 || args.machines > 250 {
        bail!("--machines {}: use 1 to 250", args.machines);
    }
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    if std::net::TcpListener::bind(args.listen).is_err() {
        bail!(
            "{} is in use: another `vmatrix up`? pass --listen ADDR:PORT",
            args.listen
        );
    }
    let guest = vmatrix_guest::build(&vmatrix_guest::BuildOptions::new(
        data.join("guest/reference.img"),
    ))
    .context("building the reference guest")?;
    let repo_url = crate::image::repo_url(None, data)?;
    let image = vmatrix_core::ImageRef::parse("guest:v1")?;
    let report = tokio::task::spawn_blocking({
        let (repo_url, disk, scratch, image) = (
            repo_url.clone(),
            guest.disk.clone(),
            data.join("tmp"),
            image.clone(),
        );
        move || -> Result<vmatrix_store::ImportReport> {
            let repo = vmatrix_store::Repository::open_or_init(&repo_url)?;
            Ok(repo.import(&disk, &image, &scratch, &|_| {})?)
        }
    })
    .await??;
    tracing::info!(
        "reference guest in the repository as guest:v1 ({})",
        if report.published {
            "imported"
        } else {
            "unchanged"
        }
    );
    let accel = vmatrix_vmm::accel::resolve(
        accel,
        Some(&vmatrix_vmm::ProbeBoot {
            kernel: guest.kernel.clone(),
            initrd: guest.initrd.clone(),
        }),
    )
    .await;
    let data_s = data.display().to_string();
    let mut children = vec![spawn_self(&[
        "controller".into(),
        "--listen".into(),
        args.listen.to_string(),
        "--data".into(),
        data_s.clone(),
        "--policy".into(),
        args.policy.clone(),
        "--season".into(),
        args.season.clone(),
    ])?];
    let api = format!("http://{}", args.listen);
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("{api}/api/v1/health"))
        .send()
        .await
        .is_err()
    {
        if tokio::time::Instant::now() > deadline {
            bail!("the controller did not come up on {api}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 1..=args.machines {
        let listen = format!("127.0.0.{}:{}", i + 1, args.listen.port() + 1);
        children.push(spawn_self(&[
            "agent".into(),
            "--name".into(),
            format!("rm{i}"),
            "--listen".into(),
            listen,
            "--controller".into(),
            api.clone(),
            "--data".into(),
            data_s.clone(),
            "--vcpus".into(),
            args.vcpus.to_string(),
            "--memory".into(),
            args.memory.to_string(),
            "--accel".into(),
            accel.as_str().into(),
        ])?);
    }
    children.push(spawn_self(&[
        "switch".into(),
        "--listen".into(),
        args.switch_listen.to_string(),
        "--controller".into(),
        api.clone(),
        "--data".into(),
        data_s.clone(),
    ])?);
    let client = Client::new(Some(api.clone()), data)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = client.get("/api/v1/machines").await.unwrap_or(Value::Null);
        let up = v["machines"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["state"] == "up").count());
        if up as u32 >= args.machines {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "only {up} of {} machines registered within 60 s",
                args.machines
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // `up` runs until Ctrl-C whatever happens to its stdout: a closed pipe must not end the
    // matrix (println! would panic on it), so the status lines ignore write errors.
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "vMatrix is up: API {api}, switch http://{}, {} machines (rm1..rm{}), accelerator {}, data {}",
        args.switch_listen,
        args.machines,
        args.machines,
        accel.as_str(),
        data.display()
    );
    let _ = writeln!(
        out,
        "try: vmatrix apply -f examples/services.toml && curl http://{}/s/sports/   (Ctrl-C stops everything)",
        args.switch_listen
    );
    let _ = out.flush();
    crate::shutdown_signal().await;
    tracing::info!("stopping the agents and the controller");
    for child in children.iter_mut().rev() {
        if let Some(pid) = child.0.id() {
            // SAFETY: plain kill(2) on our own child.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for mut child in children.into_iter().rev() {
        if tokio::time::timeout(Duration::from_secs(15), child.0.wait())
            .await
            .is_err()
        {
            let _ = child.0.start_kill();
        }
    }
    // An agent that crashed (or was killed) before leaves its VMs running for the next one;
    // `up` is ending, so there is no next one.
    for i in 1..=args.machines {
        let vms = data.join("agents").join(format!("rm{i}")).join("vms");
        let n = vmatrix_agent::sweep(&vms, &[]);
        if n > 0 {
            tracing::info!("stopped {n} VM(s) that rm{i}'s agent had left");
        }
    }
    Ok(())
}
