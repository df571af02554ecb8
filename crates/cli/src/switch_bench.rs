//! `vmatrix bench switch`: the switch against nginx `proxy_pass`, in front of the same backend,
//! measured the same way: both are whole processes with one worker per core (nginx
//! `worker_processes auto`, the switch's runtime per core), driven by the same wrk, in alternating
//! rounds; the median of each side is reported. By default the backend sits where an instance
//! does — in a network namespace of its own, behind a bridge and a VXLAN tunnel over an underlay
//! (`--backend bridged`, the topology `vmatrix up` builds) — or on loopback (`--backend loopback`,
//! without root).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use vmatrix_core::InstanceId;

use crate::bench::free_addr;
use crate::bench_stats::{section, table, Runs};
use crate::network::{Topology, UpNet};

/// Options of `vmatrix bench switch`.
#[derive(Debug, Clone, clap::Args)]
pub struct SwitchBench {
    /// wrk connections.
    #[arg(long, default_value_t = 50)]
    pub connections: u32,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    /// Alternating rounds (each side's median is reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Where the backend runs: bridged (a namespace of its own behind a bridge and VXLAN, as an
    /// instance; needs root), loopback (127.0.0.1), auto (bridged where possible).
    #[arg(long, default_value = "auto", value_parser = ["auto", "bridged", "loopback"])]
    pub backend: String,
    /// The service network of the bridged backend (must not be routed here already).
    #[arg(long, default_value = "10.179.0.0/24")]
    pub service_net: String,
    /// The underlay of the bridged backend.
    #[arg(long, default_value = "10.178.0.0/29")]
    pub underlay: String,
}

/// The hidden `vmatrix bench backend`: the bridged backend, run by `bench switch` in a network
/// namespace of its own.
#[derive(Debug, Clone, clap::Args)]
pub struct BackendArgs {
    /// Its address on the service network and port.
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub service_net: String,
    /// Its underlay address (the parent adds it to the namespace).
    #[arg(long)]
    pub vtep: Ipv4Addr,
    /// The switch host's tunnel endpoint.
    #[arg(long)]
    pub peer: Ipv4Addr,
    #[arg(long)]
    pub vni: u32,
}

/// Runs the bridged backend: waits for its underlay address, joins the service network as a
/// machine does (bridge and VXLAN), and serves until killed.
pub async fn backend(a: BackendArgs) -> Result<()> {
    let std::net::IpAddr::V4(address) = a.listen.ip() else {
        bail!(
            "--listen {}: an IPv4 address of the service network",
            a.listen
        );
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let wanted = format!("inet {}/", a.vtep);
    while !vmatrix_net::run("ip", &["-4", "-o", "addr", "show"])?.contains(&wanted) {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the underlay address {} never arrived in this namespace",
                a.vtep
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let net = vmatrix_net::ServiceNet::parse(&a.service_net)?;
    let host = vmatrix_net::HostNet::setup(vmatrix_net::HostNetConfig {
        bridge: "vmx0".into(),
        vxlan: "vmx0-vx".into(),
        net,
        address,
        vtep: Some(a.vtep),
        vni: a.vni,
        table: "vmatrixbench".into(),
    })?;
    host.set_peers(&[a.peer])?;
    bench_backend(a.listen).await?;
    std::future::pending::<()>().await;
    Ok(())
}

/// The backend of the bench and what keeps it alive (the bridged one's namespace and process).
struct Backend {
    addr: SocketAddr,
    where_: &'static str,
    _process: Option<crate::cluster::Child>,
    _topology: Option<Topology>,
}

async fn start_backend(b: &SwitchBench) -> Result<Backend> {
    let net = UpNet {
        network: match b.backend.as_str() {
            "bridged" => "bridge",
            "loopback" => "user",
            _ => "auto",
        }
        .into(),
        service_net: b.service_net.clone(),
        underlay: b.underlay.clone(),
    };
    if !net.bridged()? {
        return Ok(Backend {
            addr: bench_backend(SocketAddr::from(([127, 0, 0, 1], 0))).await?,
            where_: "on loopback",
            _process: None,
            _topology: None,
        });
    }
    // Named after a free port, as `up` names its topology after its API port.
    let tag = free_addr()?.port();
    let mut topo = Topology::create(tag, &net, 1).context("building the bench's network")?;
    let ip = topo
        .net
        .instance_addresses()
        .next()
        .ok_or_else(|| anyhow!("--service-net {} has no instance address", b.service_net))?;
    let addr = SocketAddr::from((ip, 8080));
    let args: Vec<String> = vec![
        "bench".into(),
        "backend".into(),
        "--listen".into(),
        addr.to_string(),
        "--service-net".into(),
        b.service_net.clone(),
        "--vtep".into(),
        topo.machine_address(0).to_string(),
        "--peer".into(),
        topo.host_address().to_string(),
        "--vni".into(),
        topo.vni().to_string(),
    ];
    let child = crate::cluster::spawn_self_in(&args, true)?;
    let pid = child
        .0
        .id()
        .ok_or_else(|| anyhow!("the bench backend ended at once"))?;
    topo.attach(0, pid)
        .context("joining the bench backend to the underlay")?;
    Ok(Backend {
        addr,
        where_: "in a namespace of its own, over a bridge and VXLAN",
        _process: Some(child),
        _topology: Some(topo),
    })
}

type BenchResponse = hyper::Response<http_body_util::Full<bytes::Bytes>>;

/// Serves `handler` over keep-alive HTTP/1.1 on `at` (port 0: a free one), in the background.
async fn serve_http<F, Fut>(at: SocketAddr, handler: F) -> Result<SocketAddr>
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = BenchResponse> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .with_context(|| format!("listening on {at}"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The common backend of the switch benchmark: a short body for every request.
async fn bench_backend(at: SocketAddr) -> Result<SocketAddr> {
    serve_http(at, |_req| async {
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
            b"hello from the backend\n",
        )))
    })
    .await
}

/// A stand-in controller that serves one fixed route table (long-polling like the real one).
async fn bench_routes(backend: SocketAddr) -> Result<SocketAddr> {
    use vmatrix_core::api::{RouteTable, ServiceRoute};
    let table = RouteTable {
        version: "bench".into(),
        services: vec![ServiceRoute {
            service: vmatrix_core::ServiceName::new("bench")?,
            priority: 0,
            backends: vec![(InstanceId::new("bench-1")?, backend.to_string())],
            moving: Vec::new(),
            tcp: Vec::new(),
            dropped: false,
            admit_rps: 0.0,
        }],
    };
    let body = bytes::Bytes::from(serde_json::to_vec(&table)?);
    serve_http(SocketAddr::from(([127, 0, 0, 1], 0)), move |req| {
        let body = body.clone();
        async move {
            if req
                .uri()
                .query()
                .is_some_and(|q| q.contains("version=bench"))
            {
                tokio::time::sleep(Duration::from_secs(25)).await;
            }
            hyper::Response::new(http_body_util::Full::new(body))
        }
    })
    .await
}

/// Runs wrk and returns (requests/s, p99 ms).
fn wrk(url: &str, connections: u32, seconds: u32) -> Result<(f64, f64)> {
    let out = std::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            url,
        ])
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("Requests/sec:")
                .map(|v| v.trim().parse::<f64>().unwrap_or(0.0))
        })
        .ok_or_else(|| anyhow!("wrk printed no Requests/sec: {text}"))?;
    let p99 = text
        .lines()
        .find_map(|l| {
            let l = l.trim();
            let v = l.strip_prefix("99%")?.trim();
            let (num, unit) = v.split_at(v.find(|c: char| c.is_alphabetic())?);
            let n: f64 = num.parse().ok()?;
            Some(match unit {
                "us" => n / 1000.0,
                "ms" => n,
                "s" => n * 1000.0,
                _ => n,
            })
        })
        .ok_or_else(|| anyhow!("wrk printed no 99% latency: {text}"))?;
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        eprintln!("wrk reported errors:\n{text}");
    }
    Ok((rps, p99))
}

/// `vmatrix bench switch`: requests/s and p99 of nginx `proxy_pass` (keep-alive upstream) and of
/// the switch, in front of the same backend, alternating; medians per side. Ctrl-C stops it
/// and removes what it built.
pub async fn switch(b: &SwitchBench) -> Result<()> {
    tokio::select! {
        r = measure(b) => r,
        _ = crate::shutdown_signal() => bail!("interrupted; the bench's network and processes are removed"),
    }
}

async fn measure(b: &SwitchBench) -> Result<()> {
    let (connections, seconds, rounds) = (b.connections, b.seconds, b.rounds.max(1));
    let backend = start_backend(b).await?;
    let routes = bench_routes(backend.addr).await?;
    // The switch runs as its own process, as nginx does, so that neither shares the bench's
    // runtime.
    let switch_addr = free_addr()?;
    let exe = std::env::current_exe().context("finding the vmatrix binary")?;
    let mut switch = tokio::process::Command::new(exe)
        .args([
            "switch",
            "--controller",
            &format!("http://{routes}"),
            "--listen",
            &switch_addr.to_string(),
        ])
        .env("VMATRIX_TOKEN", "bench")
        .env("VMATRIX_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .context("starting the switch")?;
    let dir = tempfile::Builder::new().prefix("vmx-nginx-").tempdir()?;
    let nginx_addr = free_addr()?;
    // One worker per core, as the switch has one runtime per core.
    let conf = format!(
        "worker_processes auto;\nerror_log stderr warn;\npid {pid};\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         upstream backend {{ server {backend}; keepalive 64; }}\n\
         server {{ listen {nginx_addr}; location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n",
        pid = dir.path().join("nginx.pid").display(),
        d = dir.path().display(),
        backend = backend.addr,
    );
    std::fs::write(dir.path().join("nginx.conf"), conf)?;
    let mut nginx = tokio::process::Command::new("nginx")
        .args(["-g", "daemon off;", "-p"])
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .kill_on_drop(true)
        .spawn()
        .context("starting nginx (apt-get install nginx)")?;
    let sides = [
        ("nginx proxy_pass", format!("http://{nginx_addr}/")),
        ("vmatrix switch", format!("http://{switch_addr}/s/bench/")),
    ];
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for (name, url) in &sides {
        loop {
            if client
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{name} at {url} did not answer through to the backend within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A short warm-up of each (connections opened, workers and caches warm), not counted.
    for (_, url) in &sides {
        tokio::task::block_in_place(|| wrk(url, connections, 2))?;
    }
    let mut rows = Vec::new();
    for round in 1..=rounds {
        // Each first in turn.
        for k in 0..sides.len() {
            let (name, url) = &sides[(round as usize + k) % sides.len()];
            let (rps, p99) = tokio::task::block_in_place(|| wrk(url, connections, seconds))?;
            eprintln!("round {round}: {name}: {rps:.0} req/s, p99 {p99:.2} ms");
            rows.push((*name, round, rps, p99));
        }
    }
    // Stop nginx gracefully so its master takes its workers along (SIGKILL would orphan them).
    if let Some(pid) = nginx.id() {
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGQUIT);
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), nginx.wait())
        .await
        .is_err()
    {
        let _ = nginx.start_kill();
    }
    let _ = switch.start_kill();
    let _ = switch.wait().await;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "{}",
        section(
            "The switch against nginx",
            &format!(
                "vmatrix bench switch --connections {connections} --seconds {seconds} --rounds {rounds}"
            ),
            &format!(
                "both whole processes in front of the same backend ({}), each with one worker \
                 per core (nginx `worker_processes auto` with a keep-alive upstream, the switch's \
                 runtime per core), driven by the same `wrk -t2 -c{connections} -d{seconds}s \
                 --latency`; the {cores} cores shared by \
                 wrk, the proxy under test and the backend; the two alternated, {rounds} rounds. \
                 Median (min–max) of wrk's requests/s and 99th-percentile latency. What differs: \
                 the switch also counts every request per service and instance, and looks the \
                 service up in its route table (`/s/NAME/`); nginx forwards to one upstream.",
                backend.where_
            )
        )
    );
    let mut table_rows = Vec::new();
    let mut medians = Vec::new();
    for (name, _) in &sides {
        let mine: Vec<_> = rows.iter().filter(|r| r.0 == *name).collect();
        let rps = Runs(mine.iter().map(|r| r.2).collect());
        let p99 = Runs(mine.iter().map(|r| r.3).collect());
        table_rows.push(vec![
            name.to_string(),
            rps.spread(|x| format!("{x:.0}")),
            p99.spread(|x| format!("{x:.2} ms")),
            rps.count().to_string(),
        ]);
        medians.push((rps.median(), p99.median()));
    }
    println!(
        "{}",
        table(
            &["proxy", "requests/s", "p99 latency", "rounds"],
            &table_rows
        )
    );
    if let [(n_rps, n_p99), (s_rps, s_p99)] = medians[..] {
        println!(
            "- switch ÷ nginx: requests/s {:.2}, p99 {:.2} (target: requests/s ≥ 1, p99 ≤ 1).\n",
            s_rps / n_rps,
            s_p99 / n_p99
        );
    }
    Ok(())
}
