//! An in-process fake of the hypervisor for component tests of the agent and the controller.
//!
//! A fake guest is a small HTTP server on the VM's forwarded address that answers `/health`,
//! `/` (its instance id) and `GET/PUT /kv/KEY` from memory; a live migration really sends that
//! memory over TCP to the destination's fake; a suspend writes it to the state file. Knobs make
//! a save slow or fail, so tests can hold an operation in flight. Pids are made up and tracked
//! here, so `alive` answers for fake processes only.
//!
//! Fake guests run on a runtime of their own (as QEMU runs in processes of its own): an agent
//! whose runtime is dropped — a crash, as far as the fake can tell — leaves them serving, for
//! the next agent to adopt.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vmatrix_vmm::{MigrationTarget, OverlayCopy, SuspendedVm, VmSpec, VmmError};

use crate::hypervisor::{Guest, Hypervisor, Incoming};

type Memory = Arc<Mutex<HashMap<String, String>>>;

/// What the fake should do; change it at any time.
#[derive(Debug, Clone, Default)]
pub struct FakeKnobs {
    /// How long a save of state takes.
    pub save_delay: Duration,
    /// Whether a save of state fails (after the delay).
    pub fail_save: bool,
    /// How long a live migration takes before its stream is sent.
    pub migrate_delay: Duration,
    /// How long a booted guest takes before it answers HTTP (a real one: seconds).
    pub boot_delay: Duration,
}

/// One fake QEMU process.
#[derive(Debug)]
struct FakeProc {
    /// Its guest's memory.
    memory: Memory,
    /// Its guest's HTTP server, if it runs one.
    server: Option<tokio::task::AbortHandle>,
    /// Its console socket's server, if it has one.
    console: Option<tokio::task::AbortHandle>,
}

/// The fake hypervisor. Clones share their processes and knobs.
#[derive(Debug, Clone, Default)]
pub struct FakeHypervisor {
    knobs: Arc<Mutex<FakeKnobs>>,
    /// Live fake processes by pid.
    procs: Arc<Mutex<HashMap<u32, FakeProc>>>,
}

static NEXT_PID: AtomicU32 = AtomicU32::new(4_000_000);

/// The runtime the fake guests run on: one thread for the life of the test process.
fn guests() -> &'static tokio::runtime::Handle {
    static RT: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the fake guests' runtime builds");
            let _ = tx.send(rt.handle().clone());
            rt.block_on(std::future::pending::<()>());
        });
        rx.recv().expect("the fake guests' runtime starts")
    })
}

fn invalid(msg: String) -> VmmError {
    VmmError::Invalid(msg)
}

impl FakeHypervisor {
    /// A fake with default knobs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Changes the knobs.
    pub fn set(&self, knobs: FakeKnobs) {
        *self.knobs.lock().unwrap_or_else(|p| p.into_inner()) = knobs;
    }

    fn knobs(&self) -> FakeKnobs {
        self.knobs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Pids of the fake processes alive now.
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// Kills a fake process as a crash would.
    pub fn crash(&self, pid: u32) {
        let proc = self
            .procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
        for task in proc
            .into_iter()
            .flat_map(|p| [p.server, p.console])
            .flatten()
        {
            task.abort();
        }
    }

    async fn start(
        &self,
        spec: &VmSpec,
        memory: Memory,
        boot_delay: Duration,
        dir: Option<&Path>,
    ) -> Result<FakeGuest, VmmError> {
        let listener = std::net::TcpListener::bind(spec.forward)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| invalid(format!("fake guest cannot listen on {}: {e}", spec.forward)))?;
        let id = spec.instance.to_string();
        let mem = memory.clone();
        let task = guests().spawn(async move {
            tokio::time::sleep(boot_delay).await;
            let Ok(listener) = TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, id.clone(), mem.clone()));
            }
        });
        // A console like QEMU's: a socket the guest's "shell" answers on.
        let (console, console_task) = match dir {
            Some(dir) => {
                let dir = vmatrix_vmm::VmDir::new(dir);
                let _ = std::fs::remove_file(dir.console());
                let listener = tokio::net::UnixListener::bind(dir.console()).map_err(|e| {
                    invalid(format!("fake console {}: {e}", dir.console().display()))
                })?;
                let task = guests().spawn(fake_shell(listener, spec.instance.to_string()));
                (
                    Some(vmatrix_vmm::Console::open(&dir.console(), &dir.serial())),
                    Some(task.abort_handle()),
                )
            }
            None => (None, None),
        };
        let pid = NEXT_PID.fetch_add(1, Ordering::Relaxed);
        self.procs.lock().unwrap_or_else(|p| p.into_inner()).insert(
            pid,
            FakeProc {
                memory: memory.clone(),
                server: Some(task.abort_handle()),
                console: console_task,
            },
        );
        Ok(FakeGuest {
            hv: self.clone(),
            pid,
            memory,
            paused: false,
            console,
        })
    }
}

/// The fake guest's console: a banner with the instance id, then every byte echoed (as a
/// terminal does) and a prompt after each line. One client at a time, as QEMU's.
async fn fake_shell(listener: tokio::net::UnixListener, id: String) {
    while let Ok((mut s, _)) = listener.accept().await {
        if s.write_all(format!("{id} login: root\r\nfake$ ").as_bytes())
            .await
            .is_err()
        {
            continue;
        }
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let mut echo = Vec::with_capacity(n + 8);
            for &b in &buf[..n] {
                echo.push(b);
                if b == b'\n' {
                    echo.extend_from_slice(b"fake$ ");
                }
            }
            if s.write_all(&echo).await.is_err() {
                break;
            }
        }
    }
}

async fn serve(mut stream: TcpStream, id: String, memory: Memory) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, content_length) = loop {
        let Ok(n) = stream.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, len);
        }
    };
    while buf.len() < head_end + content_length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let body = String::from_utf8_lossy(&buf[head_end..head_end + content_length]).to_string();
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, reply) = match (method, path.strip_prefix("/kv/")) {
        ("GET", Some(key)) => match memory.lock().map(|m| m.get(key).cloned()) {
            Ok(Some(v)) => (200, v),
            _ => (404, "no such key".to_owned()),
        },
        ("PUT", Some(key)) => {
            if let Ok(mut m) = memory.lock() {
                m.insert(key.to_owned(), body);
            }
            (200, "ok".to_owned())
        }
        ("GET", None) if path == "/health" => (200, "ok".to_owned()),
        ("GET", None) => (200, format!("{{\"instance\":\"{id}\"}}")),
        _ => (405, "no".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
        reply.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    async fn boot(&self, spec: VmSpec, dir: &Path) -> Result<Box<dyn Guest>, VmmError> {
        let delay = self.knobs().boot_delay;
        Ok(Box::new(
            self.start(&spec, Memory::default(), delay, Some(dir))
                .await?,
        ))
    }

    async fn resume(
        &self,
        spec: VmSpec,
        _dir: &Path,
        files: &SuspendedVm,
    ) -> Result<Box<dyn Guest>, VmmError> {
        let bytes =
            std::fs::read(&files.state_file).map_err(|e| invalid(format!("fake resume: {e}")))?;
        let memory: HashMap<String, String> =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("fake state: {e}")))?;
        Ok(Box::new(
            self.start(&spec, Arc::new(Mutex::new(memory)), Duration::ZERO, None)
                .await?,
        ))
    }

    async fn incoming(
        &self,
        spec: VmSpec,
        _dir: &Path,
        listen: IpAddr,
        _peer: Option<&str>,
    ) -> Result<Box<dyn Incoming>, VmmError> {
        let listener = TcpListener::bind((listen, 0))
            .await
            .map_err(|e| invalid(format!("fake incoming: {e}")))?;
        let migration = listener
            .local_addr()
            .map_err(|e| invalid(format!("fake incoming: {e}")))?;
        let received = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.ok()?;
            let mut bytes = Vec::new();
            s.read_to_end(&mut bytes).await.ok()?;
            serde_json::from_slice::<HashMap<String, String>>(&bytes).ok()
        });
        let pid = NEXT_PID.fetch_add(1, Ordering::Relaxed);
        self.procs.lock().unwrap_or_else(|p| p.into_inner()).insert(
            pid,
            FakeProc {
                memory: Memory::default(),
                server: None,
                console: None,
            },
        );
        Ok(Box::new(FakeIncoming {
            hv: self.clone(),
            spec,
            pid,
            migration,
            received,
        }))
    }

    async fn adopt(&self, spec: VmSpec, _dir: &Path, pid: u32) -> Result<Box<dyn Guest>, VmmError> {
        let memory = self
            .procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pid)
            .map(|p| p.memory.clone())
            .ok_or_else(|| invalid(format!("no fake process {pid} for {}", spec.instance)))?;
        Ok(Box::new(FakeGuest {
            hv: self.clone(),
            pid,
            memory,
            paused: false,
            console: None,
        }))
    }

    async fn adopt_incoming(
        &self,
        _spec: VmSpec,
        _dir: &Path,
        pid: u32,
    ) -> Result<Option<Box<dyn Incoming>>, VmmError> {
        // A fake destination's stream lives in its agent's runtime: it died with the agent.
        self.crash(pid);
        Ok(None)
    }

    fn alive(&self, pid: u32) -> bool {
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&pid)
    }

    fn cpu_seconds(&self, _pid: u32) -> f64 {
        0.0
    }
}

struct FakeGuest {
    hv: FakeHypervisor,
    pid: u32,
    memory: Memory,
    paused: bool,
    console: Option<vmatrix_vmm::Console>,
}

#[async_trait]
impl Guest for FakeGuest {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn console(&self) -> Option<vmatrix_vmm::Console> {
        self.console.clone()
    }

    async fn save_state(&mut self, file: &Path, limit: Duration) -> Result<SuspendedVm, VmmError> {
        let knobs = self.hv.knobs();
        if knobs.save_delay > limit {
            tokio::time::sleep(limit).await;
            return Err(invalid(format!("fake save took longer than {limit:?}")));
        }
        tokio::time::sleep(knobs.save_delay).await;
        if knobs.fail_save {
            return Err(invalid("fake save failed (as told)".into()));
        }
        let bytes = serde_json::to_vec(&*self.memory.lock().unwrap_or_else(|p| p.into_inner()))
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(parent) = file.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        std::fs::write(file, &bytes).map_err(|e| invalid(format!("fake save: {e}")))?;
        // The "disk": a copy of the state, so the overlay is a real file to store.
        let disk = file.with_file_name("disk.qcow2");
        std::fs::write(&disk, &bytes).map_err(|e| invalid(format!("fake save: {e}")))?;
        self.paused = true;
        Ok(SuspendedVm {
            state_file: file.to_owned(),
            disk,
            state_bytes: bytes.len() as u64,
            elapsed: knobs.save_delay,
        })
    }

    async fn cont(&mut self) -> Result<(), VmmError> {
        self.paused = false;
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), VmmError> {
        self.paused = true;
        Ok(())
    }

    /// The fake's "disk": its memory as JSON at the start of 1 MiB (as `Matrix::import` makes
    /// images), raw.
    async fn copy_disk(&mut self, to: &Path) -> Result<(&'static str, OverlayCopy), VmmError> {
        let mut bytes = serde_json::to_vec(&*self.memory.lock().unwrap_or_else(|p| p.into_inner()))
            .map_err(|e| invalid(e.to_string()))?;
        bytes.resize(1 << 20, 0);
        std::fs::write(to, &bytes).map_err(|e| invalid(format!("fake disk copy: {e}")))?;
        Ok(("raw", OverlayCopy::default()))
    }

    async fn end(self: Box<Self>) {
        self.hv.crash(self.pid);
    }

    async fn kill(self: Box<Self>) {
        self.hv.crash(self.pid);
    }

    async fn migrate_out(
        self: Box<Self>,
        target: &MigrationTarget,
        _limit: Duration,
    ) -> Result<(u64, u64), (Box<dyn Guest>, VmmError)> {
        tokio::time::sleep(self.hv.knobs().migrate_delay).await;
        let bytes = serde_json::to_vec(&*self.memory.lock().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or_default();
        let sent = async {
            let mut s = TcpStream::connect(target.migration).await?;
            s.write_all(&bytes).await?;
            s.shutdown().await
        }
        .await;
        match sent {
            Ok(()) => {
                self.hv.crash(self.pid);
                Ok((1, 1))
            }
            Err(e) => Err((
                self as Box<dyn Guest>,
                invalid(format!("fake migration: {e}")),
            )),
        }
    }
}

struct FakeIncoming {
    hv: FakeHypervisor,
    spec: VmSpec,
    pid: u32,
    migration: SocketAddr,
    received: tokio::task::JoinHandle<Option<HashMap<String, String>>>,
}

#[async_trait]
impl Incoming for FakeIncoming {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn target(&self) -> MigrationTarget {
        MigrationTarget {
            nbd: self.migration,
            export: "fake".into(),
            migration: self.migration,
            tls_name: None,
        }
    }

    async fn finish(self: Box<Self>, limit: Duration) -> Result<Box<dyn Guest>, VmmError> {
        let this = *self;
        this.hv.crash(this.pid);
        let memory = tokio::time::timeout(limit, this.received)
            .await
            .map_err(|_| invalid("fake incoming: nothing arrived".into()))?
            .ok()
            .flatten()
            .ok_or_else(|| invalid("fake incoming: the stream broke".into()))?;
        Ok(Box::new(
            this.hv
                .start(
                    &this.spec,
                    Arc::new(Mutex::new(memory)),
                    Duration::ZERO,
                    None,
                )
                .await?,
        ))
    }

    async fn abort(self: Box<Self>) {
        self.received.abort();
        self.hv.crash(self.pid);
    }
}
