//! Maintenance instances through the real controller and agents over the fake hypervisor: on a
//! shared machine only, never routed, never touched by the policy, ended by discard or by the
//! idle limit; clear refusals; drain and undrain. The real-QEMU lifecycle test is
//! crates/cli/tests/e2e/lifecycle.rs.

mod support;

use std::time::Duration;

use support::{wait_for, Matrix, TOKEN};
use vmatrix_core::api::{MachineRole, Operation, Purpose, RouteTable};
use vmatrix_core::{InstanceId, ServiceName};

const WEB: &str = r#"
[[service]]
name = "web"
image = "guest:v1"
min = 1
max = 4
"#;

fn web() -> ServiceName {
    ServiceName::new("web").expect("name")
}

fn maintain(version: Option<&str>, on: Option<&str>) -> Operation {
    Operation::Maintain {
        service: web(),
        version: version.map(str::to_owned),
        on: on.map(str::to_owned),
    }
}

async fn routes(m: &Matrix) -> RouteTable {
    m.http
        .get(m.url("/api/v1/routes"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("routes")
        .json()
        .await
        .expect("route table")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintenance_instance_is_never_routed_nor_touched_by_the_policy() {
    let mut m = Matrix::new().await;
    m.run_policy(vmatrix_policy::Settings {
        scale_in_s: 2.0,
        seasons_s: Vec::new(),
        ..vmatrix_policy::Settings::default()
    })
    .await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.apply(WEB).await;
    m.wait_state("web-1", "running", Some("rm1"), Duration::from_secs(20))
        .await;

    // No shared machine yet: a clear refusal, nothing started.
    let (status, body) = m.operate(maintain(None, None), 30).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("no shared machine")),
        "{body}"
    );
    // A dedicated machine is refused by name too; a bad version is the request's fault.
    let (status, body) = m.operate(maintain(None, Some("rm1")), 30).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = m.operate(maintain(Some("bad tag!"), None), 30).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(m.instances().await.len(), 1);

    m.start_agent("sm1", 3, MachineRole::Shared).await;
    m.done(maintain(None, None)).await;
    let admin = m
        .wait_state("web-2", "running", Some("sm1"), Duration::from_secs(20))
        .await;
    assert_eq!(admin.purpose, Purpose::Maintenance);
    assert_eq!(
        m.instance("web-1").await.expect("web-1").purpose,
        Purpose::Live
    );
    // Its own endpoint answers the admin; the switch's routes never name it.
    let answer = m
        .http
        .get(format!("http://{}/", admin.endpoint))
        .send()
        .await
        .expect("the maintenance instance answers");
    assert!(answer.status().is_success());
    let table = routes(&m).await;
    let web_routes = &table.services[0].backends;
    assert_eq!(web_routes.len(), 1, "{table:?}");
    assert_eq!(web_routes[0].0.as_str(), "web-1");

    // The policy runs (no load: scale-in after 2 s) for several ticks: the maintenance
    // instance stays where it is, running; the live one is kept at min.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let web2 = m.instance("web-2").await.expect("web-2");
    assert_eq!(
        (web2.state.as_str(), web2.machine.as_str()),
        ("running", "sm1")
    );
    assert_eq!(web2.generation, admin.generation, "never moved");
    let events = m.events().await;
    assert!(
        !events.iter().any(|e| e["who"] == "controller"
            && e["why"] != "operator request"
            && e["what"].as_str().is_some_and(|w| w.contains("web-2"))),
        "the policy acted on the maintenance instance: {events:#?}"
    );
    // Not suspended (that would lose the admin's session); not moved to a dedicated machine.
    let (status, body) = m
        .operate(
            Operation::Suspend {
                instance: InstanceId::new("web-2").expect("id"),
            },
            30,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = m
        .operate(
            Operation::Migrate {
                instance: InstanceId::new("web-2").expect("id"),
                to: "rm1".into(),
            },
            30,
        )
        .await;
    assert_eq!(status, 409, "{body}");

    // Draining the shared machine leaves it there (no other shared machine) and says so;
    // undrain gives the machine back.
    let body = m
        .done(Operation::Drain {
            machine: "sm1".into(),
        })
        .await;
    assert!(
        body["result"].as_str().is_some_and(|r| r.contains("web-2")),
        "{body}"
    );
    let body = m
        .done(Operation::Undrain {
            machine: "sm1".into(),
        })
        .await;
    assert!(
        body["result"].as_str().is_some_and(|r| r.contains("back")),
        "{body}"
    );
    let sm1 = m
        .machines()
        .await
        .into_iter()
        .find(|x| x["name"] == "sm1")
        .expect("sm1");
    assert_eq!(sm1["state"], "up", "{sm1}");

    // Discard ends it; the live instance never noticed.
    m.done(Operation::Discard {
        instance: InstanceId::new("web-2").expect("id"),
    })
    .await;
    assert!(m.instance("web-2").await.is_none());
    assert_eq!(
        m.instance("web-1").await.expect("web-1").state.as_str(),
        "running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_maintenance_instance_is_discarded_after_the_idle_limit() {
    let mut m = Matrix::new().await;
    m.maintenance_idle = Some(Duration::from_secs(3));
    m.kill_controller();
    m.start_controller().await;
    m.start_agent("sm1", 3, MachineRole::Shared).await;
    m.apply(&WEB.replace("min = 1", "min = 0")).await;
    m.done(maintain(None, None)).await;
    m.wait_state("web-1", "running", Some("sm1"), Duration::from_secs(20))
        .await;
    wait_for(
        "the idle maintenance instance discarded",
        Duration::from_secs(20),
        async || m.instance("web-1").await.is_none().then_some(()),
    )
    .await;
    let events = m.events().await;
    assert!(
        events.iter().any(|e| e["what"] == "discard web-1"
            && e["why"].as_str().is_some_and(|w| w.contains("idle limit"))),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_publishes_a_new_version_with_its_history_and_the_instance_runs_on() {
    let mut m = Matrix::new().await;
    m.start_agent("sm1", 3, MachineRole::Shared).await;
    m.apply(&WEB.replace("min = 1", "min = 0")).await;
    m.done(maintain(None, None)).await;
    let admin = m
        .wait_state("web-1", "running", Some("sm1"), Duration::from_secs(20))
        .await;
    // The fake guest's "disk" is its memory: a patch.
    m.put_kv(&admin.endpoint, "page", "patched").await;
    let commit = |tag: &str, author: &str| Operation::Commit {
        instance: InstanceId::new("web-1").expect("id"),
        tag: vmatrix_core::ImageRef::parse(tag).expect("tag"),
        message: Some("patch the page".into()),
        author: Some(author.into()),
    };
    // Bad input is refused before anything is stored.
    let (status, body) = m.operate(commit("guest:v2", "bad\nname"), 30).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(m.tags("guest"), vec!["guest:v1".to_owned()]);

    let body = m.done(commit("guest:v2", "ann@ops")).await;
    let result = body["result"].as_str().unwrap_or_default();
    assert!(result.contains("guest:v2 is version"), "{body}");
    let (v2, manifest) = m
        .repo
        .resolve(&vmatrix_core::ImageRef::parse("guest:v2").expect("ref"))
        .expect("guest:v2 published");
    assert_eq!(manifest.parent.as_deref(), Some(admin.version.as_str()));
    assert_eq!(manifest.author.as_deref(), Some("ann@ops"));
    assert_eq!(manifest.message.as_deref(), Some("patch the page"));
    let log = m
        .repo
        .log(&vmatrix_core::ImageName::new("guest").expect("name"))
        .expect("log");
    assert_eq!(
        log.iter().map(|e| e.version.as_str()).collect::<Vec<_>>(),
        vec![v2.as_str(), admin.version.as_str()],
        "{log:?}"
    );
    // The instance ran on, untouched; committing again without a change publishes nothing.
    let after = m.instance("web-1").await.expect("web-1");
    assert_eq!(
        (after.state.as_str(), after.generation),
        ("running", admin.generation)
    );
    assert_eq!(
        m.get_kv(&admin.endpoint, "page").await.as_deref(),
        Some("patched")
    );
    let body = m.done(commit("guest:v2", "ann@ops")).await;
    assert!(
        body["result"]
            .as_str()
            .is_some_and(|r| r.contains("nothing changed")),
        "{body}"
    );
    let events = m.events().await;
    assert!(
        events
            .iter()
            .any(|e| e["who"] == "ann@ops" && e["what"] == "commit web-1 as guest:v2"),
        "{events:#?}"
    );
}
