//! A small typed QMP client: JSON lines over the VM's unix socket.
//!
//! Why our own and not the `qapi` crate: we use about fifteen commands, we want typed replies
//! for exactly those, events buffered while waiting, and errors that say which command failed —
//! in ~200 lines with serde, without a generated schema for all of QEMU. Every command is a type
//! implementing [`QmpCommand`]; no raw command strings leave this module.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::error::{Result, VmmError};

/// A QMP command: its wire name, its arguments (the implementing type) and its reply.
pub trait QmpCommand: Serialize {
    /// The command name on the wire.
    const NAME: &'static str;
    /// What QEMU returns on success.
    type Reply: DeserializeOwned;
}

/// An asynchronous event QEMU sent between replies.
#[derive(Debug, Clone, Deserialize)]
pub struct QmpEvent {
    /// Event name, e.g. `BLOCK_JOB_READY`.
    pub event: String,
    /// Event data.
    #[serde(default)]
    pub data: Value,
}

/// A connected QMP session (capabilities negotiated).
#[derive(Debug)]
pub struct Qmp {
    socket: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<QmpEvent>,
    next_id: u64,
}

/// Replies to commands that return nothing useful (`{}`).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Empty {}

impl Qmp {
    /// Connects to `socket`, retrying until `deadline` (QEMU creates it a moment after start),
    /// and negotiates capabilities.
    pub async fn connect(socket: &Path, deadline: Instant) -> Result<Self> {
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(VmmError::QmpConnection {
                        socket: socket.to_owned(),
                        detail: format!("could not connect before the deadline: {e}"),
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (read, writer) = stream.into_split();
        let mut qmp = Self {
            socket: socket.to_owned(),
            reader: BufReader::new(read),
            writer,
            events: VecDeque::new(),
            next_id: 1,
        };
        // A QEMU that accepted the connection but does not run (stopped with SIGSTOP: a fenced
        // VM) never greets: bounded by the same deadline. An event can come before the greeting:
        // a client that connects while QEMU starts may get the guest's first RESUME before
        // QEMU's main loop has handled the connection (seen under load); it is kept.
        loop {
            let message = match tokio::time::timeout_at(deadline, qmp.read_message()).await {
                Ok(m) => m?,
                Err(_) => {
                    return Err(VmmError::QmpConnection {
                        socket: socket.to_owned(),
                        detail: "QEMU did not greet before the deadline (is it stopped?)".into(),
                    })
                }
            };
            if message.get("QMP").is_some() {
                break;
            }
            if message.get("event").is_none() {
                return Err(VmmError::QmpConnection {
                    socket: socket.to_owned(),
                    detail: format!("expected a QMP greeting, got {message}"),
                });
            }
            if let Ok(ev) = serde_json::from_value(message) {
                qmp.events.push_back(ev);
            }
        }
        qmp.execute(&commands::QmpCapabilities {}).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| self.broken(e.to_string()))?;
        if n == 0 {
            return Err(self.broken("QEMU closed the socket".into()));
        }
        serde_json::from_str(&line).map_err(|e| self.broken(format!("bad JSON {line:?}: {e}")))
    }

    fn broken(&self, detail: String) -> VmmError {
        VmmError::QmpConnection {
            socket: self.socket.clone(),
            detail,
        }
    }

    /// Runs one command and returns its typed reply. Events that arrive meanwhile are kept for
    /// [`Qmp::wait_event`] and [`Qmp::take_events`].
    pub async fn execute<C: QmpCommand>(&mut self, cmd: &C) -> Result<C::Reply> {
        self.execute_passing(cmd, None).await
    }

    /// Hands QEMU descriptor `fd` under `name` (`getfd`, the descriptor riding along as
    /// SCM_RIGHTS), for a later `fd:NAME` URI. QEMU gets its own copy.
    pub async fn pass_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        self.execute_passing(
            &commands::GetFd {
                fdname: name.to_owned(),
            },
            Some(fd),
        )
        .await
        .map(drop)
    }

    async fn execute_passing<C: QmpCommand>(
        &mut self,
        cmd: &C,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<C::Reply> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = serde_json::json!({ "execute": C::NAME, "id": id });
        let args = serde_json::to_value(cmd).map_err(|e| VmmError::QmpProtocol {
            command: C::NAME,
            detail: e.to_string(),
        })?;
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            request["arguments"] = args;
        }
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        let sent = match fd {
            Some(fd) => self.send_with_fd(&bytes, fd).await,
            None => Ok(0),
        };
        let rest = sent.map(|n| bytes.get(n..).unwrap_or_default());
        let sent = match rest {
            Ok(rest) => self.writer.write_all(rest).await,
            Err(e) => Err(e),
        };
        sent.map_err(|e| self.broken(format!("sending {}: {e}", C::NAME)))?;
        loop {
            let msg = self.read_message().await?;
            if msg.get("event").is_some() {
                if let Ok(ev) = serde_json::from_value(msg) {
                    self.events.push_back(ev);
                }
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(err) = msg.get("error") {
                return Err(VmmError::QmpCommand {
                    command: C::NAME,
                    class: err["class"].as_str().unwrap_or("?").to_owned(),
                    desc: err["desc"].as_str().unwrap_or("?").to_owned(),
                });
            }
            let ret = msg.get("return").cloned().unwrap_or(Value::Null);
            return serde_json::from_value(ret.clone()).map_err(|e| VmmError::QmpProtocol {
                command: C::NAME,
                detail: format!("{e} in {ret}"),
            });
        }
    }

    /// Sends the start of `bytes` with `fd` attached; returns how many bytes went.
    async fn send_with_fd(
        &self,
        bytes: &[u8],
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> std::io::Result<usize> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let stream: &UnixStream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        loop {
            stream.writable().await?;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[std::io::IoSlice::new(bytes)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for an event named `name` (possibly already received), until `deadline`.
    pub async fn wait_event(&mut self, name: &str, deadline: Instant) -> Result<Option<QmpEvent>> {
        loop {
            if let Some(pos) = self.events.iter().position(|e| e.event == name) {
                return Ok(self.events.remove(pos));
            }
            match tokio::time::timeout_at(deadline, self.read_message()).await {
                Err(_) => return Ok(None),
                Ok(msg) => {
                    if let Ok(ev) = serde_json::from_value::<QmpEvent>(msg?) {
                        self.events.push_back(ev);
                    }
                }
            }
        }
    }

    /// Returns and forgets the events received so far.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }
}

/// The QMP commands vMatrix uses, each with its typed reply.
pub mod commands {
    use super::*;

    macro_rules! command {
        ($ty:ident, $name:literal, $reply:ty) => {
            impl QmpCommand for $ty {
                const NAME: &'static str = $name;
                type Reply = $reply;
            }
        };
    }

    /// Receives the descriptor sent along with it under a name (see [`Qmp::pass_fd`]).
    #[derive(Debug, Serialize)]
    pub struct GetFd {
        /// The name an `fd:NAME` URI uses.
        pub fdname: String,
    }
    command!(GetFd, "getfd", Empty);

    /// Forgets a descriptor passed with [`GetFd`] that nothing used.
    #[derive(Debug, Serialize)]
    pub struct CloseFd {
        /// Its name.
        pub fdname: String,
    }
    command!(CloseFd, "closefd", Empty);

    /// Leaves capability negotiation mode.
    #[derive(Debug, Serialize)]
    pub struct QmpCapabilities {}
    command!(QmpCapabilities, "qmp_capabilities", Empty);

    /// Asks for the run state.
    #[derive(Debug, Serialize)]
    pub struct QueryStatus {}
    command!(QueryStatus, "query-status", StatusInfo);

    /// The VM's run state.
    #[derive(Debug, Clone, Deserialize)]
    pub struct StatusInfo {
        /// e.g. `running`, `paused`, `inmigrate`, `postmigrate`.
        pub status: String,
        /// Whether the vCPUs run.
        pub running: bool,
    }

    /// Lists the character devices.
    #[derive(Debug, Serialize)]
    pub struct QueryChardev {}
    command!(QueryChardev, "query-chardev", Vec<ChardevInfo>);

    /// One character device.
    #[derive(Debug, Clone, Deserialize)]
    pub struct ChardevInfo {
        /// Its id (`-chardev …,id=LABEL`).
        pub label: String,
        /// Whether the guest side has it open (for a virtio-serial port: a program in the
        /// guest opened the port).
        #[serde(rename = "frontend-open", default)]
        pub frontend_open: bool,
    }

    /// Pauses the vCPUs.
    #[derive(Debug, Serialize)]
    pub struct Stop {}
    command!(Stop, "stop", Empty);

    /// Resumes the vCPUs.
    #[derive(Debug, Serialize)]
    pub struct Cont {}
    command!(Cont, "cont", Empty);

    /// Exits QEMU at once.
    #[derive(Debug, Serialize)]
    pub struct Quit {}
    command!(Quit, "quit", Empty);

    /// Presses the ACPI power button.
    #[derive(Debug, Serialize)]
    pub struct SystemPowerdown {}
    command!(SystemPowerdown, "system_powerdown", Empty);

    /// Starts an outgoing migration to `uri`.
    #[derive(Debug, Serialize)]
    pub struct Migrate {
        /// `tcp:HOST:PORT` or `fd:NAME` (a descriptor passed with [`GetFd`]).
        pub uri: String,
    }
    command!(Migrate, "migrate", Empty);

    /// Cancels the outgoing migration in progress (a suspend that failed or took too long).
    #[derive(Debug, Serialize)]
    pub struct MigrateCancel {}
    command!(MigrateCancel, "migrate_cancel", Empty);

    /// Starts listening for an incoming migration (QEMU started with `-incoming defer`).
    #[derive(Debug, Serialize)]
    pub struct MigrateIncoming {
        /// `tcp:HOST:PORT` or `fd:NAME` (a descriptor passed with [`GetFd`]).
        pub uri: String,
    }
    command!(MigrateIncoming, "migrate-incoming", Empty);

    /// Sets migration parameters.
    #[derive(Debug, Serialize, Default)]
    #[serde(rename_all = "kebab-case")]
    pub struct MigrateSetParameters {
        /// Bytes per second; QEMU's default throttles to 128 MiB/s.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_bandwidth: Option<u64>,
        /// Allowed downtime in milliseconds.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub downtime_limit: Option<u64>,
        /// The id of the TLS credentials object the stream goes through (`""`: none).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls_creds: Option<String>,
        /// The name the destination's certificate must carry (source side).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls_hostname: Option<String>,
        /// The id of the authorization object a client's certificate must pass (destination
        /// side; `""`: any certificate of the authority).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls_authz: Option<String>,
    }
    command!(MigrateSetParameters, "migrate-set-parameters", Empty);

    /// One migration capability switched on or off.
    #[derive(Debug, Serialize)]
    pub struct MigrationCapability {
        /// Capability name, e.g. `pause-before-switchover`.
        pub capability: &'static str,
        /// On or off.
        pub state: bool,
    }

    /// Sets migration capabilities.
    #[derive(Debug, Serialize)]
    pub struct MigrateSetCapabilities {
        /// The capabilities to set.
        pub capabilities: Vec<MigrationCapability>,
    }
    command!(MigrateSetCapabilities, "migrate-set-capabilities", Empty);

    /// Lets a migration paused at `pre-switchover` finish.
    #[derive(Debug, Serialize)]
    pub struct MigrateContinue {
        /// The state it is paused in: `pre-switchover`.
        pub state: &'static str,
    }
    command!(MigrateContinue, "migrate-continue", Empty);

    /// Asks for the migration state.
    #[derive(Debug, Serialize)]
    pub struct QueryMigrate {}
    command!(QueryMigrate, "query-migrate", MigrationInfo);

    /// Migration state and figures.
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct MigrationInfo {
        /// `setup`, `active`, `completed`, `failed`, …; absent before any migration.
        pub status: Option<String>,
        /// Milliseconds from start to completion.
        pub total_time: Option<u64>,
        /// Milliseconds the guest was stopped.
        pub downtime: Option<u64>,
        /// RAM figures.
        pub ram: Option<RamStats>,
        /// Why it failed.
        pub error_desc: Option<String>,
    }

    /// RAM transfer figures of a migration.
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct RamStats {
        /// Bytes sent.
        pub transferred: u64,
        /// Guest RAM size.
        pub total: u64,
    }

    /// A socket address in QMP's `SocketAddress` form.
    #[derive(Debug, Clone, Serialize)]
    #[serde(tag = "type", rename_all = "lowercase")]
    pub enum SocketAddress {
        /// TCP host and port.
        Inet {
            /// Host or IP address.
            host: String,
            /// Port as a string, as QMP wants it.
            port: String,
        },
        /// A unix socket path.
        Unix {
            /// Socket path.
            path: String,
        },
    }

    /// The older, nested socket address form (`{"type": …, "data": {…}}`) that
    /// `nbd-server-start` still takes.
    #[derive(Debug, Clone, Serialize)]
    #[serde(tag = "type", content = "data", rename_all = "lowercase")]
    pub enum SocketAddressLegacy {
        /// TCP host and port.
        Inet {
            /// Host or IP address.
            host: String,
            /// Port as a string.
            port: String,
        },
        /// A unix socket path.
        Unix {
            /// Socket path.
            path: String,
        },
    }

    /// Starts the built-in NBD server.
    #[derive(Debug, Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct NbdServerStart {
        /// Where to listen.
        pub addr: SocketAddressLegacy,
        /// The id of the TLS credentials object clients must handshake with.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls_creds: Option<String>,
        /// The id of the authorization object a client's certificate must pass.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls_authz: Option<String>,
    }
    command!(NbdServerStart, "nbd-server-start", Empty);

    /// Stops the NBD server and its exports.
    #[derive(Debug, Serialize)]
    pub struct NbdServerStop {}
    command!(NbdServerStop, "nbd-server-stop", Empty);

    /// Exports a block node over NBD.
    #[derive(Debug, Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct BlockExportAdd {
        /// Always `nbd` here.
        #[serde(rename = "type")]
        pub kind: &'static str,
        /// Export id.
        pub id: String,
        /// The node to export.
        pub node_name: String,
        /// Whether clients may write.
        pub writable: bool,
        /// The NBD export name.
        pub name: String,
    }
    command!(BlockExportAdd, "block-export-add", Empty);

    /// Adds a block node that is an NBD client.
    #[derive(Debug, Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct BlockdevAddNbd {
        /// Always `nbd`.
        pub driver: &'static str,
        /// Name of the new node.
        pub node_name: String,
        /// The NBD server.
        pub server: SocketAddress,
        /// The export to open.
        pub export: String,
        /// The id of the TLS credentials object to handshake with.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls_creds: Option<String>,
        /// The name the server's certificate must carry.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls_hostname: Option<String>,
    }
    command!(BlockdevAddNbd, "blockdev-add", Empty);

    /// Creates an `authz-simple` object: it admits one TLS peer, by its certificate's
    /// distinguished name.
    #[derive(Debug, Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct ObjectAddAuthz {
        /// Always `authz-simple`.
        pub qom_type: &'static str,
        /// Object id.
        pub id: String,
        /// The distinguished name admitted, e.g. `CN=rm1`.
        pub identity: String,
    }
    command!(ObjectAddAuthz, "object-add", Empty);

    /// Removes a block node.
    #[derive(Debug, Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct BlockdevDel {
        /// The node to remove.
        pub node_name: String,
    }
    command!(BlockdevDel, "blockdev-del", Empty);

    /// Mirrors a block node into another.
    #[derive(Debug, Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct BlockdevMirror {
        /// Job id.
        pub job_id: String,
        /// The source node.
        pub device: String,
        /// The target node.
        pub target: String,
        /// `top` copies only the overlay, when both sides share the base.
        pub sync: &'static str,
        /// `write-blocking` makes guest writes synchronous to the target once the job is ready,
        /// so the target never lags behind when the guest stops.
        pub copy_mode: &'static str,
    }
    command!(BlockdevMirror, "blockdev-mirror", Empty);

    /// Lists the named block nodes (with `flat`, children too).
    #[derive(Debug, Serialize)]
    pub struct QueryNamedBlockNodes {
        /// Every node, not only the top ones.
        pub flat: bool,
    }
    command!(
        QueryNamedBlockNodes,
        "query-named-block-nodes",
        Vec<BlockNodeInfo>
    );

    /// One block node.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct BlockNodeInfo {
        /// Its name.
        #[serde(default)]
        pub node_name: String,
    }

    /// Lists block jobs.
    #[derive(Debug, Serialize)]
    pub struct QueryBlockJobs {}
    command!(QueryBlockJobs, "query-block-jobs", Vec<BlockJobInfo>);

    /// One block job.
    #[derive(Debug, Clone, Deserialize)]
    pub struct BlockJobInfo {
        /// The job id.
        pub device: String,
        /// Bytes to copy so far known.
        pub len: u64,
        /// Bytes copied.
        pub offset: u64,
        /// Whether the job reached the synchronised phase.
        pub ready: bool,
        /// Job status.
        pub status: String,
    }

    /// Ends a block job; a ready mirror finishes its copy and detaches without pivoting.
    #[derive(Debug, Serialize)]
    pub struct BlockJobCancel {
        /// The job id.
        pub device: String,
    }
    command!(BlockJobCancel, "block-job-cancel", Empty);
}

#[cfg(test)]
mod tests {
    use super::commands::*;
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A scripted fake QEMU: sends `early` (events a real QEMU may send before its greeting),
    /// greets, answers each request line with the next scripted reply (events may precede it)
    /// and records what it was sent.
    async fn fake_qemu_with(
        path: PathBuf,
        early: Vec<Value>,
        script: Vec<Vec<Value>>,
    ) -> tokio::task::JoinHandle<Vec<Value>> {
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            for event in early {
                w.write_all(format!("{event}\n").as_bytes()).await.unwrap();
            }
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut seen = Vec::new();
            for replies in script {
                let Some(line) = lines.next_line().await.unwrap() else {
                    break;
                };
                let req: Value = serde_json::from_str(&line).unwrap();
                for mut reply in replies {
                    if reply.get("event").is_none() {
                        reply["id"] = req["id"].clone();
                    }
                    w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
                }
                seen.push(req);
            }
            seen
        })
    }

    async fn fake_qemu(
        path: PathBuf,
        script: Vec<Vec<Value>>,
    ) -> tokio::task::JoinHandle<Vec<Value>> {
        fake_qemu_with(path, Vec::new(), script).await
    }

    #[tokio::test]
    async fn an_event_before_the_greeting_is_kept_not_taken_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = fake_qemu_with(
            sock.clone(),
            vec![serde_json::json!({"event": "RESUME", "timestamp": {}})],
            vec![vec![serde_json::json!({"return": {}})]],
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut qmp = Qmp::connect(&sock, deadline).await.unwrap();
        let ev = qmp.wait_event("RESUME", deadline).await.unwrap();
        assert!(ev.is_some(), "the early event is kept");
        drop(qmp);
        let seen = server.await.unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
    }

    #[tokio::test]
    async fn a_reply_before_the_greeting_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let _server = fake_qemu_with(
            sock.clone(),
            vec![serde_json::json!({"return": {}})],
            Vec::new(),
        )
        .await;
        let Err(err) = Qmp::connect(&sock, Instant::now() + Duration::from_secs(5)).await else {
            panic!("a reply taken for a greeting");
        };
        assert!(err.to_string().contains("expected a QMP greeting"), "{err}");
    }

    #[tokio::test]
    async fn typed_replies_errors_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = fake_qemu(
            sock.clone(),
            vec![
                vec![serde_json::json!({"return": {}})],
                vec![
                    serde_json::json!({"event": "RESUME", "data": {}}),
                    serde_json::json!({"return": {"status": "running", "running": true}}),
                ],
                vec![serde_json::json!({"error": {"class": "GenericError", "desc": "no such job"}})],
                vec![serde_json::json!({"return": {"status": "completed", "total-time": 650, "downtime": 33, "ram": {"transferred": 1000, "total": 4000}}})],
            ],
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut qmp = Qmp::connect(&sock, deadline).await.unwrap();
        let status = qmp.execute(&QueryStatus {}).await.unwrap();
        assert!(status.running);
        assert_eq!(status.status, "running");
        let err = qmp
            .execute(&BlockJobCancel {
                device: "mirror".into(),
            })
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("block-job-cancel") && text.contains("no such job"),
            "{text}"
        );
        let info = qmp.execute(&QueryMigrate {}).await.unwrap();
        assert_eq!(info.downtime, Some(33));
        assert_eq!(info.ram.unwrap().transferred, 1000);
        let ev = qmp.wait_event("RESUME", deadline).await.unwrap();
        assert!(ev.is_some(), "the event sent before a reply is kept");
        drop(qmp);
        let seen = server.await.unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[2]["arguments"]["device"], "mirror");
        assert!(
            seen[1].get("arguments").is_none(),
            "no empty arguments object"
        );
    }

    #[tokio::test]
    async fn connect_gives_up_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("absent.sock");
        let err = Qmp::connect(&sock, Instant::now() + Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("absent.sock"), "{err}");
    }

    #[test]
    fn arguments_use_qmp_spelling() {
        let v = serde_json::to_value(BlockdevAddNbd {
            driver: "nbd",
            node_name: "target".into(),
            server: SocketAddress::Inet {
                host: "127.0.0.1".into(),
                port: "10809".into(),
            },
            export: "disk0".into(),
            tls_creds: Some("tls0".into()),
            tls_hostname: None,
        })
        .unwrap();
        assert_eq!(v["node-name"], "target");
        assert_eq!(v["tls-creds"], "tls0");
        assert!(v.get("tls-hostname").is_none(), "{v}");
        assert_eq!(v["server"]["type"], "inet");
        assert_eq!(v["server"]["port"], "10809");
        let legacy = serde_json::to_value(NbdServerStart {
            addr: SocketAddressLegacy::Inet {
                host: "127.0.0.1".into(),
                port: "10809".into(),
            },
            tls_creds: None,
            tls_authz: Some("peer".into()),
        })
        .unwrap();
        assert_eq!(legacy["tls-authz"], "peer");
        assert_eq!(legacy["addr"]["type"], "inet");
        assert_eq!(legacy["addr"]["data"]["port"], "10809");
    }
}
