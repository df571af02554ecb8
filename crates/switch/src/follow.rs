//! The switch's two links to the controller: it follows the route table (a long-poll watch)
//! and reports the load it sees twice a second.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vmatrix_client::ControllerClient;
use vmatrix_core::api::RouteTable;

use crate::proxy::Table;
use crate::stats::Stats;

fn to_table(t: RouteTable) -> Table {
    Table {
        version: t.version,
        services: t
            .services
            .into_iter()
            .map(|s| (s.service.to_string(), s))
            .collect(),
    }
}

/// Keeps the route table current with a long-poll watch; keeps serving the last table while
/// the controller is away.
pub(crate) async fn watch_routes(client: ControllerClient, tx: watch::Sender<Arc<Table>>) {
    let mut warned = false;
    loop {
        let version = tx.borrow().version.clone();
        match client.routes(&version, Duration::from_secs(25)).await {
            Ok(t) => {
                warned = false;
                if t.version != version {
                    tracing::debug!(version = t.version, "new routes");
                    let _ = tx.send(Arc::new(to_table(t)));
                }
                continue;
            }
            Err(e) if !warned => {
                tracing::warn!("route watch: {e}; serving the last routes");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reports the load twice a second (the controller's fast path reacts to each report); a
/// failed report is logged (the controller counts the demand as unknown meanwhile).
pub(crate) async fn report_load(client: ControllerClient, stats: Arc<Stats>) {
    let mut failing = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match client.report_load(&stats.report()).await {
            Ok(()) => {
                if failing > 0 {
                    tracing::info!(
                        "load reports reach the controller again after {failing} failure(s)"
                    );
                }
                failing = 0;
            }
            Err(e) => {
                failing += 1;
                if failing == 1 || failing.is_power_of_two() {
                    tracing::warn!(
                        "load report to the controller failed ({failing} in a row): {e}"
                    );
                }
            }
        }
    }
}
