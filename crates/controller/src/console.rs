//! Console sessions for operators: the controller authenticates the operator, connects to the
//! instance's agent (`/agent/v1/console/{id}`, the agents' token) and relays the WebSocket
//! frames both ways until either side closes. The controller never interprets the bytes; it
//! records the attachment as an event and counts the use of a maintenance instance.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message as Up, WebSocket};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as DownClose;
use tokio_tungstenite::tungstenite::Message as Down;
use vmatrix_core::api::Purpose;
use vmatrix_core::{InstanceId, InstanceState};

use crate::control::{ControlError, Controller, Result};

/// An open session with the agent, ready to be relayed.
pub(crate) type AgentSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Controller {
    /// Connects to the console of `id` on its agent (the operator's request is answered with
    /// this call's error if that fails).
    pub(crate) async fn open_console(&self, id: &InstanceId, write: bool) -> Result<AgentSocket> {
        let row = self.row(id)?;
        if !matches!(
            row.info.state,
            InstanceState::Running | InstanceState::Paused | InstanceState::Activating
        ) {
            return Err(ControlError::Conflict(format!(
                "instance {id} is {}: only a VM that runs has a console",
                row.info.state.as_str()
            )));
        }
        let machine = self.machine(&row.info.machine)?;
        let (url, _) = self.agent_url(
            &machine,
            "ws",
            &format!("/agent/v1/console/{id}?write={write}"),
        )?;
        let mut request = url
            .into_client_request()
            .map_err(|e| ControlError::Conflict(format!("console of {id}: {e}")))?;
        let bearer = format!("Bearer {}", self.agent_bearer(&machine.name))
            .parse()
            .map_err(|_| {
                ControlError::Conflict("the agents' token is not a header value".into())
            })?;
        request.headers_mut().insert("authorization", bearer);
        let connector = match self.secured.get() {
            Some(s) => Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
                s.agent_tls(&machine.name)?,
            ))),
            None => None,
        };
        let connect =
            tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector);
        let (socket, _) = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
            .await
            .map_err(|_| ControlError::Unreachable {
                machine: machine.name.clone(),
                message: "no console answer within 10 s".into(),
            })?
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(r) => {
                    let message = r
                        .body()
                        .as_deref()
                        .map(|b| {
                            serde_json::from_slice::<vmatrix_core::api::ErrorBody>(b)
                                .map(|e| e.error)
                                .unwrap_or_else(|_| String::from_utf8_lossy(b).into_owned())
                        })
                        .unwrap_or_else(|| r.status().to_string());
                    // The agent's refusal keeps its kind (not there, not possible now).
                    match r.status().as_u16() {
                        404 => ControlError::NotFound(message),
                        409 => ControlError::Conflict(message),
                        _ => ControlError::Agent {
                            machine: machine.name.clone(),
                            message,
                        },
                    }
                }
                other => ControlError::Unreachable {
                    machine: machine.name.clone(),
                    message: other.to_string(),
                },
            })?;
        if row.info.purpose == Purpose::Maintenance {
            self.touch_maintenance(id);
        }
        self.event(
            "api",
            &format!("console {id} on {}", machine.name),
            "operator request",
            if write {
                "attached"
            } else {
                "attached read-only"
            },
        );
        Ok(socket)
    }

    /// Relays the operator's socket and the agent's until either side ends.
    pub(crate) async fn relay_console(
        self: Arc<Self>,
        id: InstanceId,
        operator: WebSocket,
        agent: AgentSocket,
    ) {
        let maintenance = self
            .row(&id)
            .is_ok_and(|r| r.info.purpose == Purpose::Maintenance);
        let (mut op_tx, mut op_rx) = operator.split();
        let (mut ag_tx, mut ag_rx) = agent.split();
        let up = async {
            while let Some(Ok(m)) = op_rx.next().await {
                let m = match m {
                    Up::Text(t) => Down::Text(t),
                    Up::Binary(b) => Down::Binary(b),
                    Up::Ping(p) => Down::Ping(p),
                    Up::Pong(p) => Down::Pong(p),
                    Up::Close(_) => break,
                };
                if maintenance {
                    self.touch_maintenance(&id);
                }
                if ag_tx.send(m).await.is_err() {
                    break;
                }
            }
            let _ = ag_tx.close().await;
        };
        let down = async {
            while let Some(Ok(m)) = ag_rx.next().await {
                let m = match m {
                    Down::Text(t) => Up::Text(t),
                    Down::Binary(b) => Up::Binary(b),
                    Down::Ping(p) => Up::Ping(p),
                    Down::Pong(p) => Up::Pong(p),
                    Down::Close(f) => Up::Close(f.map(|f: DownClose<'_>| CloseFrame {
                        code: f.code.into(),
                        reason: f.reason.into_owned().into(),
                    })),
                    Down::Frame(_) => continue,
                };
                let close = matches!(m, Up::Close(_));
                if op_tx.send(m).await.is_err() || close {
                    break;
                }
            }
            let _ = op_tx.close().await;
        };
        // Either side ending ends the session.
        tokio::select! {
            () = up => {}
            () = down => {}
        }
    }
}
