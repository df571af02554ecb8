//! Durable operations. A request only records intent: the operation is a row in the state
//! store before any work starts, its work runs as a task the controller owns (a client that
//! hangs up changes nothing), and it is settled exactly once — by its task, or, when the
//! controller died while it ran, as `interrupted` at the next start, after which the instance
//! itself is settled from what its machines report (see `Controller::settle`).
//!
//! ```text
//! client ── POST /operations ──▶ row (running) ──▶ task ──▶ agents
//!    ◀── { operation: 7, running } (or its outcome, if it ends within ?wait)
//! client ── GET /operations/7?wait=30 ──▶ … ◀── { done | failed, result }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vmatrix_core::api::{Operation, OperationReply, OperationState};

use crate::control::{now_ms, ControlError, Controller};
use crate::db::OpState;

/// A settled operation's outcome as its waiters see it: the result, or the HTTP status and
/// message of its error.
pub(crate) type OpOutcome = std::result::Result<String, (u16, String)>;

/// Follows one operation's task in this process.
pub(crate) type OpWatch = watch::Receiver<Option<OpOutcome>>;

/// What `wait_op` found.
#[derive(Debug)]
pub enum OpView {
    /// Still running (or settled well): the reply to send.
    Reply(OperationReply),
    /// It failed with this HTTP status and message.
    Failed {
        /// The operation.
        operation: u64,
        /// HTTP status of the error.
        status: u16,
        /// What failed and what to do.
        message: String,
    },
}

impl Controller {
    /// Records `op` and starts its task; returns its id at once.
    pub fn submit(self: &Arc<Self>, op: Operation) -> Result<u64, ControlError> {
        let id = self.db(|d| d.add_op(&op, now_ms()))?;
        let (tx, rx) = watch::channel(None);
        self.ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, rx);
        let me = self.clone();
        tokio::spawn(async move {
            // The work in a task of its own: even a panic in it settles the operation.
            let work = tokio::spawn({
                let me = me.clone();
                async move { me.operate(op).await }
            });
            let result = work.await.unwrap_or_else(|e| {
                Err(ControlError::Conflict(format!(
                    "operation {id} ended abnormally ({e}); `vmatrix ps` shows where its instance is"
                )))
            });
            let (state, text) = match &result {
                Ok(m) => (OpState::Done, m.clone()),
                Err(e) => (OpState::Failed, e.to_string()),
            };
            // Settled once; a busy or failing database gets a few more tries.
            for attempt in 1..=5u32 {
                match me.db(|d| d.settle_op(id, state, &text, now_ms())) {
                    Ok(_) => break,
                    Err(e) if attempt < 5 => {
                        tracing::warn!("settling operation {id} (try {attempt}): {e}");
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    }
                    Err(e) => tracing::error!("operation {id} ended but is not recorded: {e}"),
                }
            }
            let _ = tx.send(Some(result.map_err(|e| (e.status(), e.to_string()))));
            // Waiters that come later read the row.
            tokio::time::sleep(Duration::from_secs(60)).await;
            me.ops.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
        Ok(id)
    }

    /// Operation `id`, waiting up to `wait` for it to settle.
    pub async fn wait_op(&self, id: u64, wait: Duration) -> Result<OpView, ControlError> {
        let rx = self
            .ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        if let Some(mut rx) = rx {
            let _ = tokio::time::timeout(wait, rx.wait_for(|v| v.is_some())).await;
            let outcome = rx.borrow().clone();
            return Ok(match outcome {
                None => OpView::Reply(OperationReply {
                    operation: id,
                    state: OperationState::Running,
                    result: String::new(),
                }),
                Some(Ok(result)) => OpView::Reply(OperationReply {
                    operation: id,
                    state: OperationState::Done,
                    result,
                }),
                Some(Err((status, message))) => OpView::Failed {
                    operation: id,
                    status,
                    message,
                },
            });
        }
        let row = self.db(|d| d.op(id))?.ok_or_else(|| {
            ControlError::NotFound(format!(
                "no operation {id} (settled ones are kept for a day)"
            ))
        })?;
        Ok(match row.state {
            OpState::Failed => OpView::Failed {
                operation: id,
                status: 409,
                message: row.result,
            },
            s => OpView::Reply(OperationReply {
                operation: id,
                state: match s {
                    OpState::Running => OperationState::Running,
                    OpState::Done => OperationState::Done,
                    OpState::Failed => OperationState::Failed,
                    OpState::Interrupted => OperationState::Interrupted,
                },
                result: row.result,
            }),
        })
    }

    /// At start: every operation an earlier process left running is settled as interrupted;
    /// the instances it touched are settled from their machines' next reports.
    pub fn interrupt_left_ops(&self) -> Result<usize, ControlError> {
        let left = self.db(|d| d.running_ops())?;
        for op in &left {
            self.db(|d| {
                d.settle_op(
                    op.id,
                    OpState::Interrupted,
                    "the controller stopped while it ran; its instance is settled from what its machines report",
                    now_ms(),
                )
            })?;
            self.event(
                "controller",
                &format!("operation {} interrupted", op.id),
                &format!("{:?}", op.op),
                "settled from the machines' reports",
            );
        }
        Ok(left.len())
    }
}
