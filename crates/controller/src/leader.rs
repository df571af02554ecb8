//! Leadership among controllers that keep their state on etcd: one leads, the others stand by.
//!
//! The leader holds `PREFIX/leader`, attached to an etcd lease of [`LEAD_TTL`] that it renews
//! every third of it; the standbys try to create the key every [`CAMPAIGN_EVERY`] and take the
//! lead when it is gone — revoked by a leader that stops, or expired with one that died, froze
//! or lost etcd. Every state write is guarded by the key's value (`mirror.rs`), and the leader
//! counts itself leader only until its last renewal's lease would run out ([`Lead::valid`]),
//! measured from when the renewal was sent: a leader frozen past its lease acts on nothing
//! when it wakes, and stops.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::etcd::{Compare, Etcd, EtcdError, Op};
use crate::mirror::Guard;

/// The leader's lease. Shorter than an agent's lease (10 s) with room to spare: agents reach
/// the new leader, and renew their own leases, before their VMs would be fenced.
pub const LEAD_TTL: Duration = Duration::from_secs(3);
/// How often a standby tries to take the lead.
pub const CAMPAIGN_EVERY: Duration = Duration::from_millis(300);

/// What the leadership key holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LeaderValue {
    /// A random id of this campaign (two runs of one controller differ).
    pub id: String,
    /// Where its API answers.
    pub api: String,
}

/// This controller's lead, while it lasts.
#[derive(Debug)]
pub struct Lead {
    etcd: Arc<Etcd>,
    key: String,
    value: Vec<u8>,
    lease: i64,
    valid_until: Mutex<Instant>,
    lost: watch::Sender<Option<String>>,
}

impl Lead {
    /// Whether this controller still leads: its lease has not run out since its last renewal
    /// was sent, and nothing told it otherwise.
    pub fn valid(&self) -> bool {
        self.lost.borrow().is_none()
            && Instant::now() < *self.valid_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the lead up for `why` (the process stops; another controller takes over).
    pub fn lose(&self, why: &str) {
        self.lost.send_if_modified(|w| {
            if w.is_some() {
                return false;
            }
            tracing::error!("this controller no longer leads: {why}");
            *w = Some(why.to_owned());
            true
        });
    }

    /// Waits until the lead is lost; why.
    pub async fn lost(&self) -> String {
        let mut rx = self.lost.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                return "the lead ended".into();
            }
        }
    }

    /// What guards this leader's writes.
    pub fn guard(&self) -> Guard {
        Guard {
            key: self.key.clone(),
            value: self.value.clone(),
        }
    }

    /// Hands the lead over at once (on a clean stop): a standby need not wait for the lease
    /// to expire.
    pub fn resign(&self) {
        self.lose("it stopped");
        if let Err(e) = self.etcd.revoke(self.lease) {
            tracing::warn!("handing over the lead: {e}; the others take it within {LEAD_TTL:?}");
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EtcdError> + Send + 'static,
) -> Result<T, EtcdError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EtcdError::Bad {
            what: "a call to etcd".into(),
            message: e.to_string(),
        })?
}

/// The current leader, if any.
pub fn leader(etcd: &Etcd) -> Result<Option<LeaderValue>, EtcdError> {
    Ok(etcd
        .get(&leader_key(etcd))?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
}

fn leader_key(etcd: &Etcd) -> String {
    format!("{}/leader", etcd.prefix())
}

/// Stands by until this controller (answering at `api`) takes the lead, then keeps it
/// renewed in the background.
pub async fn campaign(etcd: Arc<Etcd>, api: &str) -> Result<Arc<Lead>, EtcdError> {
    let key = leader_key(&etcd);
    let value = serde_json::to_vec(&LeaderValue {
        id: crate::identity::random_secret().map_err(|e| EtcdError::Bad {
            what: "a campaign id".into(),
            message: e.to_string(),
        })?,
        api: api.to_owned(),
    })
    .unwrap_or_default();
    let e = etcd.clone();
    // When the lease was last granted or renewed, as sent: it runs out LEAD_TTL after that.
    let mut renewed = Instant::now();
    let mut lease = blocking(move || e.grant(LEAD_TTL)).await?;
    let mut shown: Option<String> = None;
    loop {
        let (e, k, v) = (etcd.clone(), key.clone(), value.clone());
        let attempt = blocking(move || {
            e.txn(
                &[Compare::Absent(k.clone())],
                &[Op::Put(k.clone(), v, lease)],
                &[Op::Get(k)],
            )
        })
        .await;
        match attempt {
            Ok((true, _)) => break,
            // Our own value: an earlier attempt took the key and its answer was lost (the
            // client tries the next member when one does not answer).
            Ok((false, read)) if read.first().is_some_and(|kv| kv.value == value) => break,
            Ok((false, read)) => {
                let now: Option<String> = read
                    .first()
                    .and_then(|kv| serde_json::from_slice::<LeaderValue>(&kv.value).ok())
                    .map(|l| l.api);
                if now != shown {
                    tracing::info!(
                        "standing by: the leader is {}",
                        now.as_deref().unwrap_or("(changing)")
                    );
                    shown = now;
                }
            }
            Err(err) => tracing::warn!("standing by: {err}"),
        }
        // Our own lease must live until we use it.
        let e = etcd.clone();
        let sent = Instant::now();
        match blocking(move || e.keep_alive(lease)).await {
            Ok(ttl) if ttl > 0 => renewed = sent,
            _ => {
                let e = etcd.clone();
                if let Ok(l) = blocking(move || e.grant(LEAD_TTL)).await {
                    lease = l;
                    renewed = sent;
                }
            }
        }
        tokio::time::sleep(CAMPAIGN_EVERY).await;
    }
    let (lost, _) = watch::channel(None);
    let lead = Arc::new(Lead {
        etcd,
        key,
        value,
        lease,
        valid_until: Mutex::new(renewed + LEAD_TTL),
        lost,
    });
    tracing::info!("this controller ({api}) leads");
    tokio::spawn(renew(lead.clone()));
    Ok(lead)
}

/// Renews the lease every third of it until the lead is lost.
async fn renew(lead: Arc<Lead>) {
    let mut tick = tokio::time::interval(LEAD_TTL / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if lead.lost.borrow().is_some() {
            return;
        }
        if !lead.valid() {
            lead.lose("its lease ran out before it was renewed (was this process frozen?)");
            return;
        }
        let sent = Instant::now();
        let (e, id) = (lead.etcd.clone(), lead.lease);
        match blocking(move || e.keep_alive(id)).await {
            Ok(ttl) if ttl > 0 => {
                *lead.valid_until.lock().unwrap_or_else(|e| e.into_inner()) =
                    sent + Duration::from_secs(ttl as u64);
            }
            Ok(_) => {
                lead.lose("its lease expired on etcd");
                return;
            }
            Err(err) => tracing::warn!("renewing the lead: {err}"),
        }
    }
}

/// What a standby answers to every request: 503, naming the leader, with
/// [`vmatrix_core::api::STANDBY_HEADER`] so that clients try their next controller.
pub fn standby_router(etcd: Arc<Etcd>, me: String) -> axum::Router {
    use axum::http::{HeaderName, HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    axum::Router::new().fallback(move || {
        let (etcd, me) = (etcd.clone(), me.clone());
        async move {
            let leader = tokio::task::spawn_blocking(move || leader(&etcd))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
                .map_or_else(|| "being chosen".to_owned(), |l| format!("at {}", l.api));
            let body = vmatrix_core::api::ErrorBody {
                error: format!(
                    "this controller ({me}) stands by; the leader is {leader}: ask it, or give \
                     every controller's address (--controller A,B)"
                ),
            };
            let mut resp = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
            resp.headers_mut().insert(
                HeaderName::from_static(vmatrix_core::api::STANDBY_HEADER),
                HeaderValue::from_static("1"),
            );
            resp
        }
    })
}
