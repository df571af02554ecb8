//! Helpers shared by the end-to-end tests.

use std::path::Path;

use tokio::process::Command;

/// The host, shared: every test holds a share of it while it runs ([`share_host`]); a test whose
/// figures mean something only on a quiet host has it alone ([`host_alone`]): the live
/// migration's latency bound (issue 11: max under 250 ms at 50 req/s). On these two cores one
/// other test beside it (a guest booting: one busy core) pushed that max to 245 ms and two busy
/// cores to 1,063 ms, where alone it measures 31–38 ms. Taken before [`UNDER_LOAD`], never
/// twice by one test (a second share behind a waiting `host_alone` would wait for ever).
pub static HOST: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A share of the host, for as long as the test runs.
pub async fn share_host() -> tokio::sync::RwLockReadGuard<'static, ()> {
    HOST.read().await
}

/// The whole host: no other test runs until this one ends.
pub async fn host_alone() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    HOST.write().await
}

/// A share of the host and [`UNDER_LOAD`], in that order; says on release how long the test
/// waited for them and held them (the suite's time is the sum of the holds: the tests to
/// shorten are the ones that hold longest).
pub async fn under_load() -> Serial {
    let asked = std::time::Instant::now();
    let host = share_host().await;
    let lock = UNDER_LOAD.lock().await;
    Serial {
        _host: host,
        _lock: lock,
        asked,
        got: std::time::Instant::now(),
    }
}

/// [`UNDER_LOAD`] held by one test.
pub struct Serial {
    _host: tokio::sync::RwLockReadGuard<'static, ()>,
    _lock: tokio::sync::MutexGuard<'static, ()>,
    asked: std::time::Instant,
    got: std::time::Instant,
}

impl Drop for Serial {
    fn drop(&mut self) {
        eprintln!(
            "[under_load] {}: waited {:.1} s, held {:.1} s",
            std::thread::current().name().unwrap_or("?"),
            (self.got - self.asked).as_secs_f64(),
            self.got.elapsed().as_secs_f64()
        );
    }
}

/// Held by the tests whose assertions depend on guests keeping up with a steady load (a live
/// migration without a failed request, a policy reacting to measured demand, a failover
/// without a failed request): on two cores, two of them at once starve each other's TCG
/// guests. Held too by the tests that write hundreds of MiB through the repository (an import,
/// a gc): their `syncfs` and writeback stalled a guest's request past 10 s and a controller's
/// load report by seconds in a CI run beside them. The other tests run beside them.
pub static UNDER_LOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The `vmatrix` binary under test, killed if the test drops it.
pub fn vmatrix() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmatrix"));
    cmd.kill_on_drop(true);
    cmd.env_remove("RUST_BACKTRACE");
    cmd
}

/// A scratch directory with a short path (unix sockets are limited to 107 bytes).
pub fn data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmx-e2e-")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// Every file under `dir` with its size and modification time, to prove nothing changed.
pub fn snapshot(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((
                    e.path().display().to_string(),
                    m.len(),
                    m.modified().expect("mtime"),
                ));
            }
        }
    }
    out.sort();
    out
}

/// GET `url` from the controller whose data directory is `data`, or its switch's `/metrics`,
/// with the controller's read-only token (every controller route but health needs a token, and
/// a read needs no more than that one).
pub async fn api_get(data: &Path, url: &str) -> reqwest::Result<reqwest::Response> {
    let token = std::fs::read_to_string(data.join("controller/read-token")).unwrap_or_default();
    client(data).get(url).bearer_auth(token.trim()).send().await
}

/// A client that trusts the authority of the controller of `data` (it serves HTTPS), and
/// nothing before the controller has written it.
pub fn client(data: &Path) -> reqwest::Client {
    let mut b = reqwest::Client::builder().tls_built_in_root_certs(false);
    if let Ok(pem) = std::fs::read_to_string(data.join("controller/tls/ca-cert.pem")) {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("PEM"));
    }
    b.build().expect("a client")
}

/// GET `url` (https) from the agent of machine `machine` (of the matrix in `data`) as the
/// controller does: with the controller's certificate, expecting the machine's, and with the
/// machine's credential (the only bearer an agent's API takes).
pub async fn agent_get(
    data: &Path,
    machine: &str,
    url: &str,
) -> reqwest::Result<reqwest::Response> {
    let credential = std::fs::read_to_string(data.join("agents").join(machine).join("credential"))
        .unwrap_or_default();
    let tls = data.join("controller/tls");
    let read = |f: &str| std::fs::read_to_string(tls.join(f)).expect(f);
    let config = vmatrix_serve::tls::client_config(
        &read("ca-cert.pem"),
        Some(machine),
        Some((&read("controller-cert.pem"), &read("controller-key.pem"))),
    )
    .expect("the controller's TLS");
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .build()
        .expect("a client")
        .get(url)
        .bearer_auth(credential.trim())
        .send()
        .await
}

/// Every file and directory under `dir` is its owner's alone (no group or other bits), as
/// vMatrix writes them.
pub fn assert_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_owned()];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let m = e.metadata().expect("metadata");
            let mode = m.permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", e.path().display());
            seen += 1;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    assert!(seen > 0, "nothing under {}", dir.display());
}

/// Every QEMU of the matrix in `data` runs under its seccomp sandbox and as the agents'
/// unprivileged user (vmatrix-qemu, which scripts/install-deps.sh creates), never as root;
/// returns how many there are (at least one).
pub fn assert_qemus_confined(data: &Path) -> usize {
    let mine = format!("{}/", data.display());
    let qemus = processes(|c| c.contains("qemu-system") && c.contains(&mine));
    assert!(!qemus.is_empty(), "no QEMU of {} runs", data.display());
    let uid = String::from_utf8(
        std::process::Command::new("id")
            .args(["-u", "vmatrix-qemu"])
            .output()
            .expect("run id")
            .stdout,
    )
    .expect("utf-8");
    for (pid, cmd) in &qemus {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(field("Seccomp:"), ["2"], "QEMU {pid} has no sandbox: {cmd}");
        assert_eq!(
            field("Uid:"),
            vec![uid.trim().to_owned(); 4],
            "QEMU {pid} is not vmatrix-qemu: {cmd}"
        );
        assert!(cmd.contains("spawn=deny"), "{cmd}");
        // The machine's certificate, for the migration data path (its agent got it at join).
        assert!(
            cmd.contains("tls-creds-x509,id=vmatrix-tls-server,endpoint=server,verify-peer=on")
                && cmd.contains(&format!("dir={mine}")),
            "QEMU {pid} has no TLS credentials for migrations: {cmd}"
        );
    }
    qemus.len()
}

/// A running `vmatrix up`. Dropped (a test that ends, or fails), it is stopped as an operator
/// would stop it — SIGINT, so that it removes its VMs and its network — and whatever a killed
/// one left in this network namespace (its interfaces and nftables table, named after its API
/// port) is removed.
pub struct Up {
    child: tokio::process::Child,
    port: u16,
}

impl std::ops::Deref for Up {
    type Target = tokio::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.child
    }
}

impl std::ops::DerefMut for Up {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.child
    }
}

impl Up {
    /// The API port, which also names what `up` creates on the host (`vmxr{port}n{i}`: the host
    /// end of machine `i`'s link to the underlay, rm1 being 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Ctrl-C, as a terminal sends it; waits (60 s at most) until `up` has stopped everything.
    pub async fn interrupt(&mut self) {
        let pid = self.child.id().expect("vmatrix up runs").to_string();
        assert!(std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill")
            .success());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(60), self.child.wait()).await;
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let (Ok(None), Some(pid)) = (self.child.try_wait(), self.child.id()) {
            // SAFETY: plain kill(2) of our own child.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGINT);
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = self.child.start_kill();
        }
        let tag = self.port.to_string();
        if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("vmx") && name.ends_with(&tag)
                    || name.starts_with(&format!("vmxr{tag}n"))
                {
                    let _ = std::process::Command::new("ip")
                        .args(["link", "del", &name])
                        .stderr(std::process::Stdio::null())
                        .status();
                }
            }
        }
        for family in ["inet", "bridge"] {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", family, &format!("vmatrix{tag}")])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Starts `vmatrix --data DIR up ARGS…` and waits (up to 120 s) until it says it is up.
pub async fn start_up(data: &Path, args: &[&str]) -> Up {
    let port = listen_port(args).unwrap_or(7070);
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut up = vmatrix()
        .arg("--data")
        .arg(data)
        .arg("up")
        .args(args)
        .args(net_args(args))
        .stdout(std::process::Stdio::piped())
        .stderr(
            std::fs::File::create(data.join("up.log"))
                .map_or_else(|_| std::process::Stdio::null(), std::process::Stdio::from),
        )
        .spawn()
        .expect("start vmatrix up");
    let stdout = up.stdout.take().expect("piped stdout");
    // Guarded from here: an `up` that never comes up (a panic below) is stopped and its
    // network removed like any other.
    let up = Up { child: up, port };
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = tokio::time::timeout(std::time::Duration::from_secs(120), lines.next_line())
            .await
            .expect("vmatrix up did not come up within 120 s")
            .expect("read stdout")
            .expect("vmatrix up exited before it was up");
        if line.contains("vMatrix is up") {
            // Keep reading what `up` prints afterwards: a closed pipe is not what a terminal does.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return up;
        }
    }
}

/// `vmatrix up` with `extra` on free ports; returns it and the switch's address.
pub async fn start_matrix(data: &Path, extra: &[&str]) -> (Up, String) {
    let api = format!("127.0.0.1:{}", free_port());
    let front = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--listen", api.as_str(), "--switch-listen", front.as_str()];
    args.extend(extra);
    (start_up(data, &args).await, front)
}

/// Starts `vmatrix --data DIR controller --listen ADDR` and waits until its API answers.
pub async fn start_controller(data: &Path, listen: &str) -> tokio::process::Child {
    let child = vmatrix()
        .arg("--data")
        .arg(data)
        // Manual mode: the tests that use a bare controller move instances themselves.
        .args(["controller", "--listen", listen, "--policy", "min"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the controller");
    wait_controller(child, data, listen)
        .await
        .unwrap_or_else(|| panic!("the controller did not answer on {listen}"))
}

/// Kills the controller of `data` (`up`'s, or one a test started again) with SIGKILL and
/// starts it again with the same command line (its network flags included), waiting until
/// its API answers on `listen`.
pub async fn kill9_and_restart_controller(data: &Path, listen: &str) -> tokio::process::Child {
    let marker = data.display().to_string();
    let is_it =
        |c: &str| c.contains("vmatrix") && c.contains(" controller ") && c.contains(&marker);
    let (_, cmdline) = processes(is_it).pop().expect("the controller runs");
    kill9_and_wait("the controller", is_it).await;
    let args: Vec<String> = cmdline
        .split_whitespace()
        .skip(1)
        .map(str::to_owned)
        .collect();
    // Its log kept, for a failure to show.
    let log = data.join("controller-again.log");
    let child = vmatrix()
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_or_else(|_| std::process::Stdio::null(), std::process::Stdio::from),
        )
        .spawn()
        .expect("start the controller again");
    let child = wait_controller(child, data, listen).await;
    if child.is_none() {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = said.lines().collect();
        panic!(
            "the controller started again did not answer on {listen} within 30 s; it logged:\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
    }
    child.expect("checked")
}

/// `child` once the controller answers on `listen`, or None after 30 s (`child` dropped: killed).
async fn wait_controller(
    mut child: tokio::process::Child,
    data: &Path,
    listen: &str,
) -> Option<tokio::process::Child> {
    let url = format!("https://{listen}/api/v1/health");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // The authority's certificate appears as the controller starts.
    let answers = async || {
        client(data)
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    };
    while !answers().await {
        if std::time::Instant::now() > deadline || child.try_wait().is_ok_and(|s| s.is_some()) {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Some(child)
}

/// Whatever happens to a test, no VM of its machines outlives it: an agent killed with SIGKILL
/// leaves its VMs running (for the next agent to adopt), so a test that kills agents holds one.
pub struct VmSweep<'a>(pub &'a Path);

impl Drop for VmSweep<'_> {
    fn drop(&mut self) {
        let Ok(machines) = std::fs::read_dir(self.0.join("agents")) else {
            return;
        };
        for m in machines.flatten() {
            vmatrix_agent::sweep(&m.path().join("vms"), &[]);
        }
    }
}

/// Kills with SIGKILL the one live process whose command line satisfies `pred` (`what` names
/// it in the failure message): a crash, as far as vMatrix can tell. Returns its pid.
pub fn kill9(what: &str, pred: impl Fn(&str) -> bool) -> u32 {
    let pid = processes(pred)
        .first()
        .map(|(p, _)| *p)
        .unwrap_or_else(|| panic!("no process for {what}"));
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -9 {pid} ({what})");
    pid
}

/// [`kill9`], then waits (10 s at most) until the process has exited: a process that gets
/// SIGKILL still holds its listening socket and its locks while the kernel tears it down
/// (longer on a loaded host), and one started again in its place before then finds its port in
/// use.
pub async fn kill9_and_wait(what: &str, pred: impl Fn(&str) -> bool) {
    let pid = kill9(what, &pred);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // `processes` leaves zombies out: an exited child not yet reaped has let go of everything.
    while processes(&pred).iter().any(|(p, _)| *p == pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} ({pid}) still runs 10 s after SIGKILL"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The QEMU process of instance `id` (its SMBIOS serial is the instance id) in the matrix whose
/// data directory is `data` (tests run in parallel, and instance ids repeat across them).
pub fn is_qemu_of<'a>(data: &'a Path, id: &'a str) -> impl Fn(&str) -> bool + 'a {
    move |c: &str| {
        c.contains("qemu-system")
            && c.contains(&format!("serial={id} "))
            && c.contains(&format!("{}/", data.display()))
    }
}

/// Live (not zombie) processes whose command line satisfies `pred`: (pid, command line).
pub fn processes(pred: impl Fn(&str) -> bool) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            if stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                == Some("Z")
            {
                return None;
            }
            let cmd = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?)
                .replace('\0', " ");
            pred(&cmd).then_some((pid, cmd))
        })
        .collect()
}

/// A port that is free on 127.0.0.1 … 127.0.0.5 and that no other test of this process gets.
/// The kernel's "port 0" answer can be handed to two tests running in parallel before either
/// binds it (and `vmatrix up` also uses the next port on 127.0.0.2…), so ports come from a
/// per-process range, in steps of two, checked free on every address a test might use.
pub fn free_port() -> u16 {
    free_ports(2)
}

/// The first of `count` consecutive ports that are free on 127.0.0.1–5 (this process's own
/// range: tests running at once never get the same ones). Below Linux's ephemeral range
/// (32768–60999): a port the test picks must not be taken meanwhile by some process's outgoing
/// connection (etcd members open dozens), which made a later bind fail.
pub fn free_ports(count: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 10_000 + (std::process::id() % 20) as u16 * 1_000;
    let step = count.max(2).next_multiple_of(2);
    loop {
        let n = NEXT.fetch_add(step, Ordering::Relaxed);
        assert!(n + step <= 1_000, "ran out of test ports");
        let port = base.wrapping_add(n);
        let free = (1..=5).all(|h| {
            (port..port + step).all(|p| {
                std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, 0, 0, h), p)).is_ok()
            })
        });
        if free {
            return port;
        }
    }
}

/// The API port in `up`'s arguments (`--listen ADDR:PORT`).
fn listen_port(args: &[&str]) -> Option<u16> {
    args.iter()
        .position(|a| *a == "--listen")
        .and_then(|i| args.get(i + 1))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse().ok())
}

/// Networks of its own for a `vmatrix up` whose `args` name none (tests run two at a time, and
/// two matrices must not route the same networks): derived from its `--listen` port.
pub fn net_args(args: &[&str]) -> Vec<String> {
    if args.contains(&"--service-net") {
        return Vec::new();
    }
    let port = listen_port(args).unwrap_or_else(free_port);
    let k = net_octet(port, 100 + (port / 2) % 120);
    vec![
        "--service-net".into(),
        format!("10.{k}.0.0/17"),
        "--underlay".into(),
        format!("10.{k}.200.0/24"),
    ]
}

/// The second octet `k` of the networks (10.k.0.0/16) of the matrix whose API listens on
/// `port`: the same for every call about that matrix; from `start` on, one that no other
/// matrix of this run took and this host does not route now — two matrices never share one
/// (`up` refuses a network that overlaps a route, and tests run two at a time, here and in
/// other processes).
fn net_octet(port: u16, start: u16) -> u16 {
    static TAKEN: std::sync::Mutex<Vec<(u16, u16)>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, k)) = taken.iter().find(|(p, _)| *p == port) {
        return *k;
    }
    let routes = std::process::Command::new("ip")
        .args(["-4", "route", "show", "table", "all"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let k = (0..120)
        .map(|i| 100 + (start - 100 + i) % 120)
        .find(|k| !taken.iter().any(|(_, t)| t == k) && !routes.contains(&format!("10.{k}.")))
        .unwrap_or(start);
    taken.push((port, k));
    k
}

/// The last lines of the serial console of every VM directory of `instance` under `data`
/// (source and destination of a move): what the guest said when something broke.
pub fn serial_logs(data: &Path, instance: &str) -> String {
    serial_tails(data, instance, 15)
}

/// The last `keep` lines of the serial console of every VM directory of `instance`.
pub fn serial_tails(data: &Path, instance: &str, keep: usize) -> String {
    fn walk(dir: &Path, instance: &str, keep: usize, out: &mut String, depth: usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if !p.is_dir() || depth > 6 {
                continue;
            }
            let log = p.join("serial.log");
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(instance))
                && log.is_file()
            {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!(
                    "--- {}\n{}\n",
                    log.display(),
                    lines[lines.len().saturating_sub(keep)..].join("\n")
                ));
            } else {
                walk(&p, instance, keep, out, depth + 1);
            }
        }
    }
    let mut out = String::new();
    walk(data, instance, keep, &mut out, 0);
    out
}

/// The last lines `vmatrix up` (and its children) logged, for failure messages.
pub fn up_log(data: &Path) -> String {
    let text = std::fs::read_to_string(data.join("up.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A process the test started that ends with SIGTERM (an agent then stops its VMs), also if
/// the test fails.
pub struct Terminated(pub std::process::Child);

impl Drop for Terminated {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts again an agent that was killed, from its command line `cmdline`, in the network
/// namespace of process `beside` (one of its VMs, which keep the namespace alive; bridged) —
/// on the same host either way — with its output in `log`.
pub fn start_agent_again(cmdline: &str, beside: u32, log: &Path) -> Terminated {
    let args: Vec<String> = cmdline
        .split_whitespace()
        .skip(1)
        .map(str::to_owned)
        .collect();
    let mut again = std::process::Command::new("nsenter");
    again
        .arg(format!("--net=/proc/{beside}/ns/net"))
        .arg(env!("CARGO_BIN_EXE_vmatrix"));
    let log = std::fs::File::create(log).expect("the restarted agent's log");
    Terminated(
        again
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent again"),
    )
}
