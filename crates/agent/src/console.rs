//! Console sessions on this machine's VMs, over WebSocket (for the controller, which relays
//! them to operators): a [`ConsoleHello`], the scroll-back, then the live output; input from
//! the session that writes. The VM's console itself (one QEMU client, many sessions) is
//! [`vmatrix_vmm::console`].

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use tokio::sync::broadcast::error::RecvError;
use vmatrix_core::api::ConsoleHello;
use vmatrix_core::InstanceId;
use vmatrix_vmm::{Attached, ConsoleError};

use crate::machine::{lock, Agent};

/// Why a console cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleRefusal {
    /// The instance is not here.
    #[error("instance {0} is not on this machine")]
    Unknown(InstanceId),
    /// It has no running VM (suspended, or starting on a machine without one yet).
    #[error("instance {0} has no console now (no VM runs for it on this machine)")]
    NoConsole(InstanceId),
}

impl Agent {
    /// Attaches a session to the console of `id`.
    pub fn attach_console(
        &self,
        id: &InstanceId,
        write: bool,
    ) -> Result<(Attached, ConsoleHello), ConsoleRefusal> {
        let console = {
            let slots = lock(&self.slots);
            let slot = slots
                .get(id)
                .ok_or_else(|| ConsoleRefusal::Unknown(id.clone()))?;
            slot.console.clone()
        };
        let console = console
            .filter(|c| c.is_open())
            .ok_or_else(|| ConsoleRefusal::NoConsole(id.clone()))?;
        let attached = console.attach(write);
        let hello = ConsoleHello {
            instance: id.clone(),
            machine: self.config.name.clone(),
            writer: attached.writer,
            scrollback_bytes: attached.scrollback.len() as u64,
        };
        Ok((attached, hello))
    }
}

/// Runs one session on `ws` until either side ends it.
pub(crate) async fn session(mut ws: WebSocket, attached: Attached, hello: ConsoleHello) {
    let Attached {
        scrollback,
        mut output,
        input,
        ..
    } = attached;
    let Ok(text) = serde_json::to_string(&hello) else {
        return;
    };
    if ws.send(Message::Text(text)).await.is_err() {
        return;
    }
    if !scrollback.is_empty() && ws.send(Message::Binary(scrollback)).await.is_err() {
        return;
    }
    let mut told_read_only = false;
    let why = loop {
        tokio::select! {
            out = output.recv() => match out {
                Ok(bytes) => {
                    if ws.send(Message::Binary(bytes.to_vec())).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    let note = format!(
                        "\r\n[vmatrix: {n} chunk(s) of output skipped: this reader was too slow]\r\n"
                    );
                    if ws.send(Message::Binary(note.into_bytes())).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Closed) => break ConsoleError::Closed.to_string(),
            },
            msg = ws.recv() => {
                let bytes = match msg {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(t))) => t.into_bytes(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                };
                match input.send(bytes).await {
                    Ok(()) => {}
                    Err(ConsoleError::Closed) => break ConsoleError::Closed.to_string(),
                    Err(e) => {
                        // Said once: a read-only session's keys go nowhere.
                        if !told_read_only {
                            told_read_only = true;
                            let note = format!("\r\n[vmatrix: {e}]\r\n");
                            if ws.send(Message::Binary(note.into_bytes())).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    };
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::AWAY,
            reason: why.into(),
        })))
        .await;
}
