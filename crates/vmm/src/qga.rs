//! The guest agent: qemu-guest-agent in the guest, reached over its virtio-serial port
//! (`org.qemu.guest_agent.0`, a socket in the VM directory). Used where the guest runs one —
//! QEMU says so: the port's chardev is `frontend-open` once a program in the guest opened it —
//! to freeze the guest's file systems around a disk snapshot, to ask for a clean shutdown and
//! to read the addresses the guest has. A guest without an agent costs one QMP query.
//!
//! The protocol is QMP's JSON lines with no greeting; `guest-sync-delimited` first discards
//! whatever an earlier, interrupted client left in the channel (the reply is preceded by 0xFF).

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{Result, VmmError};
use crate::qmp::commands::QueryChardev;
use crate::vm::Vm;

/// The chardev id of the agent's channel (see [`crate::args`]).
pub(crate) const CHARDEV: &str = "qga0";
/// How long one agent command may take (a freeze syncs every file system).
const COMMAND_LIMIT: Duration = Duration::from_secs(20);

/// One network interface as the guest reports it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct GuestInterface {
    /// Its name in the guest (`eth0`).
    pub name: String,
    /// Its MAC.
    #[serde(rename = "hardware-address", default)]
    pub mac: String,
    /// Its addresses.
    #[serde(rename = "ip-addresses", default)]
    pub addresses: Vec<GuestAddress>,
}

/// An address of a guest interface.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct GuestAddress {
    /// The address.
    #[serde(rename = "ip-address")]
    pub address: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
}

impl Vm {
    /// Whether a guest agent has its channel open now.
    pub async fn has_guest_agent(&mut self) -> bool {
        match self.qmp.execute(&QueryChardev {}).await {
            Ok(devs) => devs.iter().any(|d| d.label == CHARDEV && d.frontend_open),
            Err(_) => false,
        }
    }

    /// Runs one agent command; `None` when the guest has no agent.
    async fn agent(&mut self, command: &str, args: Value, reply: bool) -> Result<Option<Value>> {
        if !self.has_guest_agent().await {
            return Ok(None);
        }
        let path = self.dir.guest_agent();
        let fail = |detail: String| VmmError::GuestAgent {
            instance: self.spec.instance.to_string(),
            command: command.to_owned(),
            detail,
        };
        let exchange = async {
            let stream = UnixStream::connect(&path)
                .await
                .map_err(|e| format!("connect to {}: {e}", path.display()))?;
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let id = NEXT_SYNC.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let sync = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
            // A 0xFF byte first: the agent drops any partial command an earlier client left.
            let mut hello = vec![0xffu8];
            hello.extend(format!("{sync}\n").into_bytes());
            write
                .write_all(&hello)
                .await
                .map_err(|e| format!("write: {e}"))?;
            // Everything up to the 0xFF delimiter is stale; then the sync's reply.
            let mut junk = Vec::new();
            read.read_until(0xff, &mut junk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            let synced = read_json(&mut read).await?;
            if synced.get("return") != Some(&json!(id)) {
                return Err(format!("the sync answered {synced}"));
            }
            let cmd = json!({"execute": command, "arguments": args});
            write
                .write_all(format!("{cmd}\n").as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            if !reply {
                return Ok(Value::Null);
            }
            let answer = read_json(&mut read).await?;
            match (answer.get("return"), answer.get("error")) {
                (Some(r), _) => Ok(r.clone()),
                (None, Some(e)) => Err(format!(
                    "the guest agent refused: {}",
                    e.get("desc").and_then(Value::as_str).unwrap_or("no reason")
                )),
                (None, None) => Err(format!("unexpected answer {answer}")),
            }
        };
        match tokio::time::timeout(COMMAND_LIMIT, exchange).await {
            Ok(Ok(v)) => Ok(Some(v)),
            Ok(Err(detail)) => Err(fail(detail)),
            Err(_) => Err(fail(format!(
                "no answer within {}s",
                COMMAND_LIMIT.as_secs()
            ))),
        }
    }

    /// Freezes the guest's file systems (everything written is on the disk, nothing more is
    /// written until [`Vm::thaw`]); the number frozen, `None` without an agent.
    pub async fn freeze(&mut self) -> Result<Option<u64>> {
        Ok(self
            .agent("guest-fsfreeze-freeze", json!({}), true)
            .await?
            .and_then(|v| v.as_u64()))
    }

    /// Thaws what [`Vm::freeze`] froze; the number thawed, `None` without an agent.
    pub async fn thaw(&mut self) -> Result<Option<u64>> {
        Ok(self
            .agent("guest-fsfreeze-thaw", json!({}), true)
            .await?
            .and_then(|v| v.as_u64()))
    }

    /// Asks the guest's agent to power the guest off (an orderly shutdown, like the power
    /// button but independent of ACPI); false without an agent.
    pub async fn agent_shutdown(&mut self) -> Result<bool> {
        Ok(self
            .agent("guest-shutdown", json!({"mode": "powerdown"}), false)
            .await?
            .is_some())
    }

    /// The guest's interfaces and addresses as its agent reports them; `None` without one.
    pub async fn guest_interfaces(&mut self) -> Result<Option<Vec<GuestInterface>>> {
        match self
            .agent("guest-network-get-interfaces", json!({}), true)
            .await?
        {
            None => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| VmmError::GuestAgent {
                    instance: self.spec.instance.to_string(),
                    command: "guest-network-get-interfaces".into(),
                    detail: format!("unreadable answer: {e}"),
                }),
        }
    }
}

async fn read_json(
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> std::result::Result<Value, String> {
    loop {
        let mut line = String::new();
        let n = read
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the channel closed".into());
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        return serde_json::from_str(line).map_err(|e| format!("unreadable answer {line:?}: {e}"));
    }
}

/// Sync ids: each exchange's own, so a stale reply to an earlier, interrupted one is told apart.
static NEXT_SYNC: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_parse_as_the_agent_reports_them() {
        let v = json!([
            {"name": "lo", "hardware-address": "00:00:00:00:00:00",
             "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
            {"name": "eth0", "hardware-address": "52:54:00:12:34:56",
             "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.77.0.9", "prefix": 16}],
             "statistics": {"rx-bytes": 1}}
        ]);
        let ifs: Vec<GuestInterface> = serde_json::from_value(v).unwrap();
        assert_eq!(ifs[1].name, "eth0");
        assert_eq!(ifs[1].addresses[0].address.to_string(), "10.77.0.9");
        assert_eq!(ifs[1].addresses[0].prefix, 16);
    }
}
