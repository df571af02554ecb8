//! Warm standbys through the real controller and agents over the fake hypervisor, with guests
//! that take seconds to boot (as real ones do): a standby on its way is a standby, so the policy
//! prepares exactly the standbys it wants; a step of load unpauses them on the fast path. The
//! same feature with real VMs: crates/cli/tests/e2e/standby.rs.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{wait_for, Matrix};
use vmatrix_agent::fake::FakeKnobs;
use vmatrix_core::api::{LoadReport, MachineRole, ServiceLoad};
use vmatrix_core::InstanceState;

const SHOP: &str = r#"
[[service]]
name = "shop"
image = "guest:v1"
priority = 10
min = 1
max = 6
capacity_rps = 20
standby_max = 2
"#;

/// Reports `rps` (changed through the handle) for `shop` every 500 ms, as the switch does.
fn report(m: &Matrix, rps: &Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    let (http, url, rps) = (m.http.clone(), m.url("/api/v1/load"), rps.clone());
    tokio::spawn(async move {
        loop {
            let now = f64::from_bits(rps.load(Ordering::Relaxed));
            let body = LoadReport {
                services: [(
                    "shop".to_owned(),
                    ServiceLoad {
                        rps: now,
                        rps_now: now,
                        ..ServiceLoad::default()
                    },
                )]
                .into(),
            };
            let _ = http
                .post(&url)
                .bearer_auth(support::TOKEN)
                .json(&body)
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

fn count(events: &[Value], what: &str, why: &str) -> usize {
    events
        .iter()
        .filter(|e| {
            e["what"].as_str().is_some_and(|w| w.starts_with(what))
                && e["why"].as_str().is_some_and(|w| w.contains(why))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn booting_standbys_count_as_standbys_and_a_step_unpauses_them_at_once() {
    let mut m = Matrix::new().await;
    // Every guest takes 3 s to answer: a booting standby is seen by several ticks.
    m.fake.set(FakeKnobs {
        boot_delay: Duration::from_secs(3),
        ..FakeKnobs::default()
    });
    m.run_policy(vmatrix_policy::Settings {
        scale_out_s: 2.0,
        scale_in_s: 6.0,
        seasons_s: Vec::new(),
        bucket_s: 1.0,
        ..vmatrix_policy::Settings::default()
    })
    .await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.start_agent("rm2", 3, MachineRole::Dedicated).await;
    m.apply(SHOP).await;
    m.wait_state("shop-1", "running", None, Duration::from_secs(20))
        .await;

    // 5 req/s, a rise to 45 (three instances' worth), 5 again: the spike history asks for two
    // standbys (standby_max).
    let rps = Arc::new(AtomicU64::new(5f64.to_bits()));
    let reporter = report(&m, &rps);
    tokio::time::sleep(Duration::from_secs(3)).await;
    rps.store(45f64.to_bits(), Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(4)).await;
    rps.store(5f64.to_bits(), Ordering::Relaxed);
    let of = |l: &[vmatrix_core::api::InstanceInfo], state: InstanceState| {
        l.iter().filter(|i| i.state == state).count()
    };
    wait_for(
        "shop: 1 running, 2 paused",
        Duration::from_secs(60),
        async || {
            let l = m.instances().await;
            (of(&l, InstanceState::Running) == 1 && of(&l, InstanceState::Paused) == 2)
                .then_some(())
        },
    )
    .await;
    // A few more ticks: nothing more is prepared, nothing suspended as a surplus.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let events = m.events().await;
    let prepared = count(&events, "activate shop-", "warm standby");
    let surplus = count(&events, "suspend shop-", "standby surplus");
    // (Consolidation may discard a standby to empty a machine; another is then prepared on a
    // machine in use.)
    let consolidated = count(&events, "discard shop-", "consolidate");
    assert!(
        prepared <= 2 + consolidated && surplus == 0,
        "{prepared} standbys prepared, {consolidated} discarded by consolidation, {surplus} \
         suspended as a surplus: {events:#?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["outcome"].as_str().is_some_and(|o| o.contains("failed"))),
        "{events:#?}"
    );

    // A step to 40 req/s: the fast path unpauses a standby within the second.
    let stepped = Instant::now();
    rps.store(40f64.to_bits(), Ordering::Relaxed);
    let took = wait_for("a standby serving", Duration::from_secs(10), async || {
        let l = m.instances().await;
        (of(&l, InstanceState::Running) >= 2).then(|| stepped.elapsed())
    })
    .await;
    let events = m.events().await;
    assert!(
        count(&events, "unpause shop-", "unpause a warm standby") >= 1,
        "{events:#?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "a standby ran {took:?} after the step"
    );
    reporter.abort();
}
