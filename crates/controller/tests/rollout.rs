//! Rollouts through the real controller and agents over the fake hypervisor: batch by batch
//! with never fewer running instances than before, a rollback to the version before, a new
//! version that never passes its health check stops and reverts, and a controller restarted
//! mid-rollout resumes it. With real VMs and load: crates/cli/tests/e2e/lifecycle.rs.

mod support;

use std::time::Duration;

use support::{wait_for, Matrix, TOKEN};
use vmatrix_agent::fake::FakeKnobs;
use vmatrix_core::api::{MachineRole, Operation, RolloutState, RolloutsReply};
use vmatrix_core::{ImageRef, ServiceName};

const WEB: &str = r#"
[[service]]
name = "web"
image = "guest:v1"
min = 2
max = 2
"#;

fn web() -> ServiceName {
    ServiceName::new("web").expect("name")
}

fn rollout(to: &str, health_timeout_s: Option<f64>) -> Operation {
    Operation::Rollout {
        service: web(),
        to: ImageRef::parse(to).expect("ref"),
        batch: Some(1),
        pause_s: None,
        health_timeout_s,
        author: Some("ann@ops".into()),
    }
}

async fn status(m: &Matrix) -> vmatrix_core::api::RolloutStatus {
    let r: RolloutsReply = m
        .http
        .get(m.url("/api/v1/rollouts"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("rollouts")
        .json()
        .await
        .expect("rollouts reply");
    r.rollouts
        .into_iter()
        .find(|r| r.service == web())
        .expect("web's rollout")
}

/// The versions the running instances of web run, sorted.
async fn versions(m: &Matrix) -> Vec<String> {
    let mut v: Vec<String> = m
        .instances()
        .await
        .into_iter()
        .filter(|i| i.state.as_str() == "running")
        .map(|i| i.version)
        .collect();
    v.sort();
    v
}

/// The image web's stored spec names.
async fn spec_image(m: &Matrix) -> String {
    let reply: vmatrix_core::api::ServicesReply = m
        .http
        .get(m.url("/api/v1/services"))
        .send()
        .await
        .expect("services")
        .json()
        .await
        .expect("services reply");
    reply.services[0].image.to_string()
}

async fn two_on_v1(m: &mut Matrix) -> String {
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.start_agent("rm2", 3, MachineRole::Dedicated).await;
    m.apply(WEB).await;
    wait_for("two running", Duration::from_secs(30), async || {
        (versions(m).await.len() == 2).then_some(())
    })
    .await;
    versions(m).await[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_replaces_batch_by_batch_and_a_rollback_returns() {
    let mut m = Matrix::new().await;
    let v1 = two_on_v1(&mut m).await;
    let v2 = m.import("guest:v2", b"version two");
    // Never fewer than two running while it rolls.
    let watcher = {
        let (http, url) = (m.http.clone(), m.url("/api/v1/instances"));
        tokio::spawn(async move {
            let mut least = usize::MAX;
            for _ in 0..400 {
                if let Ok(r) = http.get(&url).send().await {
                    if let Ok(v) = r.json::<vmatrix_core::api::InstancesReply>().await {
                        let running = v
                            .instances
                            .iter()
                            .filter(|i| i.state.as_str() == "running")
                            .count();
                        least = least.min(running);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            least
        })
    };
    let body = m.done(rollout("guest:v2", None)).await;
    assert!(
        body["result"].as_str().is_some_and(|r| r.contains("done")),
        "{body}"
    );
    assert_eq!(versions(&m).await, vec![v2.clone(), v2.clone()]);
    let st = status(&m).await;
    assert_eq!(st.state, RolloutState::Done);
    assert_eq!((st.replaced.len(), st.total), (2, 2));
    assert_eq!(
        (st.from_version.as_str(), st.to_version.as_str()),
        (v1.as_str(), v2.as_str())
    );
    assert!(st.old.is_empty());
    assert_eq!(st.requested_by, "ann@ops");
    let least = watcher.await.expect("watcher");
    assert!(least >= 2, "only {least} running at one moment");
    // The spec names the new version now.
    assert_eq!(spec_image(&m).await, "guest:v2");

    // Back to v1 the same way, even though the tag guest:v1 moved meanwhile.
    let v1b = m.import("guest:v1", b"a retagged v1");
    assert_ne!(v1b, v1);
    let body = m
        .done(Operation::Rollback {
            service: web(),
            batch: Some(2),
            pause_s: None,
            author: None,
        })
        .await;
    assert!(
        body["result"].as_str().is_some_and(|r| r.contains("done")),
        "{body}"
    );
    assert_eq!(versions(&m).await, vec![v1.clone(), v1.clone()]);
    assert_eq!(status(&m).await.kind, "rollback");
    // The service is pinned to the version it returned to: one more instance runs v1, not
    // what the tag guest:v1 points at now.
    let body = m
        .done(Operation::Activate {
            service: web(),
            on: None,
        })
        .await;
    let id = body["result"]
        .as_str()
        .and_then(|r| r.split(' ').next())
        .expect("the new id")
        .to_owned();
    let third = m
        .wait_state(&id, "running", None, Duration::from_secs(20))
        .await;
    assert_eq!(third.version, v1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_fails_its_health_check_stops_the_rollout_and_reverts() {
    let mut m = Matrix::new().await;
    let v1 = two_on_v1(&mut m).await;
    m.import("guest:bad", b"never answers");
    // New guests take longer than the rollout allows to answer their health check.
    m.fake.set(FakeKnobs {
        boot_delay: Duration::from_secs(30),
        ..FakeKnobs::default()
    });
    let (status_code, body) = m.operate(rollout("guest:bad", Some(5.0)), 60).await;
    assert_eq!(status_code, 409, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("stopped and reverted") && error.contains("health check"),
        "{body}"
    );
    let st = status(&m).await;
    assert_eq!(st.state, RolloutState::Reverted, "{st:?}");
    assert!(
        st.replaced.is_empty(),
        "it stopped in its first batch: {st:?}"
    );
    assert_eq!(versions(&m).await, vec![v1.clone(), v1.clone()]);
    // Nothing of the bad version is left.
    assert_eq!(m.instances().await.len(), 2);
    assert_eq!(spec_image(&m).await, "guest:v1");
    // Bad requests are refused up front.
    let (code, body) = m
        .operate(
            Operation::Rollout {
                service: web(),
                to: ImageRef::parse("guest:v1").expect("ref"),
                batch: Some(0),
                pause_s: None,
                health_timeout_s: None,
                author: None,
            },
            5,
        )
        .await;
    assert_eq!(code, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restarted_mid_rollout_resumes_it() {
    let mut m = Matrix::new().await;
    two_on_v1(&mut m).await;
    let v2 = m.import("guest:v2", b"version two");
    m.fake.set(FakeKnobs {
        boot_delay: Duration::from_secs(2),
        ..FakeKnobs::default()
    });
    let (code, body) = m.operate(rollout("guest:v2", None), 0).await;
    assert_eq!(code, 202, "{body}");
    wait_for(
        "the first batch under way",
        Duration::from_secs(20),
        async || (m.instances().await.len() == 3).then_some(()),
    )
    .await;
    m.kill_controller();
    m.start_controller().await;
    wait_for(
        "the rollout resumed and done",
        Duration::from_secs(60),
        async || (status(&m).await.state == RolloutState::Done).then_some(()),
    )
    .await;
    assert_eq!(versions(&m).await, vec![v2.clone(), v2.clone()]);
    let events = m.events().await;
    assert!(
        events.iter().any(|e| e["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("resumed"))),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_a_new_image_rolls_the_service_out_to_it() {
    let mut m = Matrix::new().await;
    two_on_v1(&mut m).await;
    let v2 = m.import("guest:v2", b"version two");
    m.apply(&WEB.replace("guest:v1", "guest:v2")).await;
    wait_for(
        "web rolled out to v2",
        Duration::from_secs(60),
        async || (versions(&m).await == vec![v2.clone(), v2.clone()]).then_some(()),
    )
    .await;
    let st = status(&m).await;
    assert_eq!(st.state, RolloutState::Done, "{st:?}");
    assert_eq!(
        (st.from_image.as_str(), st.to_image.as_str()),
        ("guest:v1", "guest:v2")
    );
    assert_eq!(m.instances().await.len(), 2, "the old ones are gone");
}
