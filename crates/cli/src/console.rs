//! `vmatrix console INSTANCE`: the terminal attached to an instance's serial console through
//! the controller (WebSocket). In a terminal, keys go to the guest as typed (raw mode) and
//! Ctrl-] detaches; with piped input, the input is sent, the output followed until it has been
//! quiet for a second, and the session ends.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use vmatrix_client::ControllerClient;
use vmatrix_core::api::ConsoleHello;
use vmatrix_core::InstanceId;

/// Ctrl-]: detach (as telnet and `virsh console`).
const DETACH: u8 = 0x1d;

/// Restores the terminal when the session ends, however it ends.
struct RawMode;

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

pub async fn console(client: &ControllerClient, id: &InstanceId, read_only: bool) -> Result<()> {
    let url = format!(
        "{}/api/v1/instances/{id}/console?write={}",
        client.base().replacen("http", "ws", 1),
        !read_only
    );
    let mut request = url.as_str().into_client_request()?;
    if let Some(t) = client.token() {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {t}").parse()?);
    }
    let connector = match client.authority() {
        Some(a) => Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
            vmatrix_serve::tls::client_config(a, None, None)?,
        ))),
        None => None,
    };
    let (socket, _) =
        tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(r) => {
                    let why = r
                        .body()
                        .as_deref()
                        .and_then(|b| {
                            serde_json::from_slice::<vmatrix_core::api::ErrorBody>(b).ok()
                        })
                        .map_or_else(|| r.status().to_string(), |b| b.error);
                    anyhow!("console of {id}: {why}")
                }
                other => anyhow!(
                    "console of {id}: {other} (is the controller at {} up?)",
                    client.base()
                ),
            })?;
    let (mut tx, mut rx) = socket.split();
    let hello: ConsoleHello = match rx.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t).context("the console's greeting")?,
        other => bail!("console of {id}: no greeting ({other:?})"),
    };
    let tty = std::io::stdin().is_terminal();
    eprintln!(
        "vmatrix: attached to {}'s console on {} ({}){}",
        hello.instance,
        hello.machine,
        if hello.writer {
            "you write"
        } else if read_only {
            "read-only"
        } else {
            "read-only: another session writes"
        },
        if tty { "; detach with Ctrl-]" } else { "" }
    );
    // Keys from a thread of their own: reading stdin blocks.
    let (keys_tx, mut keys) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if keys_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let _raw = if tty {
        crossterm::terminal::enable_raw_mode().context("putting the terminal in raw mode")?;
        Some(RawMode)
    } else {
        None
    };
    let mut out = std::io::stdout();
    let mut input_done = false;
    let ended = loop {
        // With piped input: once it is all sent, a second without output ends the session.
        let quiet = async {
            if input_done {
                tokio::time::sleep(Duration::from_secs(1)).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    out.write_all(&b)?;
                    out.flush()?;
                }
                Some(Ok(Message::Close(f))) => {
                    break f.map(|f| f.reason.into_owned()).unwrap_or_default();
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break e.to_string(),
                None => break "the connection closed".into(),
            },
            k = keys.recv(), if !input_done => match k {
                Some(bytes) => {
                    let (send, detach) = match bytes.iter().position(|&b| tty && b == DETACH) {
                        Some(at) => (bytes[..at].to_vec(), true),
                        None => (bytes, false),
                    };
                    if !send.is_empty() {
                        tx.send(Message::Binary(send)).await?;
                    }
                    if detach {
                        break "detached".into();
                    }
                }
                None => {
                    if tty {
                        break "input closed".into();
                    }
                    input_done = true;
                }
            },
            () = quiet => break "input sent, output quiet".into(),
        }
    };
    let _ = tx.send(Message::Close(None)).await;
    drop(_raw);
    eprintln!("\r\nvmatrix: console of {id} ended: {ended}");
    Ok(())
}
