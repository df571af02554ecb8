//! Component tests of the control plane: a real controller and real agents over the fake
//! hypervisor (crates/agent/src/fake.rs), in plain `cargo test`, in seconds — slow operations,
//! hang-ups, crashes and restarts of the controller and of agents, hung machines, fencing,
//! pinned versions and the repository's saved states. The same features have real-QEMU
//! end-to-end tests in crates/cli/tests/e2e/durable.rs.

mod support;

use std::time::{Duration, Instant};

use support::{wait_for, Matrix, TOKEN};
use vmatrix_agent::fake::FakeKnobs;
use vmatrix_core::api::{MachineRole, Operation};
use vmatrix_core::{InstanceId, InstanceState, ServiceName};

const WEB: &str = r#"
[[service]]
name = "web"
image = "guest:v1"
min = MIN
max = 4
"#;

/// A services file declaring each (name, image) with the defaults.
fn services(list: &[(&str, &str)]) -> String {
    list.iter()
        .map(|(name, image)| format!("[[service]]\nname = \"{name}\"\nimage = \"{image}\"\n"))
        .collect()
}

fn web(min: u32) -> String {
    WEB.replace("MIN", &min.to_string())
}

/// Machine rm1 and service `web` (at least `min` instances), web-1 running there.
async fn web_on_rm1(m: &mut Matrix, min: u32) -> vmatrix_core::api::InstanceInfo {
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.apply(&web(min)).await;
    m.wait_state("web-1", "running", Some("rm1"), Duration::from_secs(20))
        .await
}

fn id(s: &str) -> InstanceId {
    InstanceId::new(s).expect("instance id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_suspend_keeps_heartbeats_and_the_neighbours_running() {
    let mut m = Matrix::new().await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.apply(&web(2)).await;
    m.wait_state("web-1", "running", Some("rm1"), Duration::from_secs(20))
        .await;
    m.wait_state("web-2", "running", Some("rm1"), Duration::from_secs(20))
        .await;
    m.fake.set(FakeKnobs {
        save_delay: Duration::from_secs(20),
        ..FakeKnobs::default()
    });
    let (status, reply) = m
        .operate(
            Operation::Suspend {
                instance: id("web-1"),
            },
            0,
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    let op = reply["operation"].as_u64().expect("an operation id");
    let status_url = format!("http://{}/agent/v1/status", m.agent("rm1").config.listen);
    // Every report (a heartbeat, or one of the status calls below) takes a sequence number.
    let seq_before = m.agent("rm1").current_seq();
    let started = Instant::now();
    let mut samples = 0;
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(19) {
        // The agent answers at once, however long the suspend takes…
        let t = Instant::now();
        let r = m
            .http
            .get(&status_url)
            .bearer_auth(m.credential("rm1"))
            .send()
            .await
            .expect("status");
        assert!(r.status().is_success());
        slowest = slowest.max(t.elapsed());
        // …its machine stays up, and its other instance keeps running.
        let machines = m.machines().await;
        let rm1 = machines.iter().find(|x| x["name"] == "rm1").expect("rm1");
        assert_eq!(rm1["state"], "up", "after {:?}", started.elapsed());
        let web2 = m.instance("web-2").await.expect("web-2");
        assert_eq!(
            web2.state.as_str(),
            "running",
            "after {:?}",
            started.elapsed()
        );
        let web1 = m.instance("web-1").await.expect("web-1");
        assert_eq!(
            web1.state.as_str(),
            "suspending",
            "after {:?}",
            started.elapsed()
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(samples > 40, "{samples} samples");
    assert!(
        slowest < Duration::from_millis(500),
        "a status took {slowest:?}"
    );
    // Heartbeats kept their period (one a second) whatever was in flight: the reports taken
    // meanwhile, less the status calls made here.
    let heartbeats = m.agent("rm1").current_seq() - seq_before - samples;
    assert!(heartbeats >= 17, "{heartbeats} heartbeats in 19 s");
    let r = m
        .http
        .get(m.url(&format!("/api/v1/operations/{op}?wait=30")))
        .send()
        .await
        .expect("operation");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["state"], "done", "{v}");
    m.wait_state("web-1", "suspended", None, Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_does_not_stop_its_migration() {
    let mut m = Matrix::new().await;
    let before = web_on_rm1(&mut m, 1).await;
    m.put_kv(&before.endpoint, "k", "kept").await;
    m.start_agent("rm2", 3, MachineRole::Dedicated).await;
    m.fake.set(FakeKnobs {
        migrate_delay: Duration::from_secs(2),
        ..FakeKnobs::default()
    });
    // The client gives up 0.2 s in, as Ctrl-C on `vmatrix migrate` would.
    let hung_up = m
        .http
        .post(m.url("/api/v1/operations?wait=60"))
        .bearer_auth(TOKEN)
        .json(&Operation::Migrate {
            instance: id("web-1"),
            to: "rm2".into(),
        })
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(hung_up.is_err(), "the client was meant to hang up");
    let after = m
        .wait_state("web-1", "running", Some("rm2"), Duration::from_secs(20))
        .await;
    assert_eq!(after.generation, before.generation + 1);
    assert_eq!(after.version, before.version, "the same pinned version");
    assert_eq!(
        m.get_kv(&after.endpoint, "k").await.as_deref(),
        Some("kept")
    );
    assert_eq!(m.fake.pids().len(), 1, "one copy: {:?}", m.fake.pids());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_ends_once_the_instance_answers_at_its_new_place() {
    let mut m = Matrix::new().await;
    web_on_rm1(&mut m, 1).await;
    m.start_agent("rm2", 3, MachineRole::Dedicated).await;
    let body = m
        .done(Operation::Migrate {
            instance: id("web-1"),
            to: "rm2".into(),
        })
        .await;
    // The destination's agent probed the instance's health check before it said finished.
    let result = body["result"].as_str().unwrap_or_default();
    let ms: u64 = result
        .split("serving ")
        .nth(1)
        .and_then(|r| r.split(" ms after").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'serving N ms after' in {result:?}"));
    assert!(ms < 2000, "{result}");
    // Running where it moved the moment the operation is done, and answering there.
    let now = m.instance("web-1").await.expect("web-1");
    assert_eq!(
        (now.machine.as_str(), now.state),
        ("rm2", InstanceState::Running)
    );
    m.put_kv(&now.endpoint, "k", "v").await;
    // The metrics count what happened, on the controller and on both machines.
    // (What each instance uses comes with its machine's next heartbeat.)
    let usage =
        "vmatrix_instance_cpu_seconds_total{instance=\"web-1\",service=\"web\",machine=\"rm2\"}";
    let text = wait_for(
        "web-1's use on rm2 in the metrics",
        Duration::from_secs(10),
        async || {
            let r = m.http.get(m.url("/metrics")).send().await.ok()?;
            let kind = r.headers()["content-type"]
                .to_str()
                .unwrap_or_default()
                .to_owned();
            assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
            let text = r.text().await.ok()?;
            text.contains(usage).then_some(text)
        },
    )
    .await;
    for series in [
        "vmatrix_operation_seconds_count{operation=\"migrate\",outcome=\"ok\"} 1\n",
        "vmatrix_instance_ready_seconds_count{how=\"activate\"} 1\n",
        "vmatrix_migration_downtime_seconds_count 1\n",
        "vmatrix_machine_instances{machine=\"rm1\"} 0\n",
        "vmatrix_machine_instances{machine=\"rm2\"} 1\n",
        "vmatrix_instances{service=\"web\",state=\"running\"} 1\n",
        "vmatrix_instance_cpu_seconds_total{instance=\"web-1\",service=\"web\",machine=\"rm2\"}",
        "vmatrix_services_dropped{priority=",
        "# EOF",
    ] {
        assert!(text.contains(series), "{series:?} missing:\n{text}");
    }
    let source = m.agent("rm1").metrics_text();
    for series in [
        "vmatrix_agent_command_seconds_count{command=\"migrate-out\",outcome=\"ok\"} 1\n",
        "vmatrix_agent_migration_downtime_seconds_count 1\n",
        "vmatrix_agent_vcpus 8\n",
    ] {
        assert!(source.contains(series), "{series:?} missing:\n{source}");
    }
    let dest = m.agent("rm2").metrics_text();
    for series in [
        "vmatrix_agent_command_seconds_count{command=\"finish-incoming\",outcome=\"ok\"} 1\n",
        "vmatrix_agent_instances{state=\"running\"} 1\n",
        "vmatrix_agent_instance_memory_bytes{instance=\"web-1\",service=\"web\"}",
    ] {
        assert!(dest.contains(series), "{series:?} missing:\n{dest}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_migration_and_mid_suspend_settles_each_instance_once() {
    let mut m = Matrix::new().await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.start_agent("rm2", 3, MachineRole::Dedicated).await;
    m.apply(&services(&[("a", "guest:v1"), ("b", "guest:v1")]))
        .await;
    let a = m.running("a-1").await;
    let b = m.running("b-1").await;
    m.put_kv(&a.endpoint, "k", "a-data").await;
    m.put_kv(&b.endpoint, "k", "b-data").await;
    let to = if a.machine == "rm1" { "rm2" } else { "rm1" };
    m.fake.set(FakeKnobs {
        migrate_delay: Duration::from_secs(3),
        save_delay: Duration::from_secs(3),
        ..FakeKnobs::default()
    });
    let (s1, _) = m
        .operate(
            Operation::Migrate {
                instance: id("a-1"),
                to: to.into(),
            },
            0,
        )
        .await;
    let (s2, _) = m
        .operate(
            Operation::Suspend {
                instance: id("b-1"),
            },
            0,
        )
        .await;
    assert_eq!((s1, s2), (202, 202));
    tokio::time::sleep(Duration::from_millis(500)).await;
    m.kill_controller();
    // The agents finish what they were told while no controller runs.
    tokio::time::sleep(Duration::from_secs(4)).await;
    m.start_controller().await;
    let a2 = m
        .wait_state("a-1", "running", Some(to), Duration::from_secs(20))
        .await;
    assert_eq!(a2.generation, a.generation + 1);
    let b2 = m
        .wait_state("b-1", "suspended", None, Duration::from_secs(20))
        .await;
    assert_eq!(b2.machine, "");
    assert_eq!(m.get_kv(&a2.endpoint, "k").await.as_deref(), Some("a-data"));
    // Exactly one copy of a-1, on its destination; nothing left of b-1 on any machine.
    wait_for(
        "the machines to agree",
        Duration::from_secs(10),
        async || {
            let a_on: Vec<String> = ["rm1", "rm2"]
                .iter()
                .filter(|n| {
                    m.agent(n)
                        .report()
                        .instances
                        .iter()
                        .any(|i| i.id.as_str() == "a-1")
                })
                .map(|n| n.to_string())
                .collect();
            let b_on = ["rm1", "rm2"]
                .iter()
                .filter(|n| {
                    m.agent(n)
                        .report()
                        .instances
                        .iter()
                        .any(|i| i.id.as_str() == "b-1")
                })
                .count();
            (a_on == vec![to.to_string()] && b_on == 0).then_some(())
        },
    )
    .await;
    // Both operations are settled as interrupted, none left running.
    let events = m.events().await;
    let interrupted = events
        .iter()
        .filter(|e| {
            e["what"]
                .as_str()
                .is_some_and(|w| w.ends_with("interrupted"))
        })
        .count();
    assert_eq!(interrupted, 2, "{events:#?}");
    // b-1 resumes with its memory.
    m.fake.set(FakeKnobs::default());
    m.done(Operation::Resume {
        instance: id("b-1"),
        on: None,
    })
    .await;
    let b3 = m.running("b-1").await;
    assert_eq!(m.get_kv(&b3.endpoint, "k").await.as_deref(), Some("b-data"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_its_vms_and_the_controller_never_fails_them() {
    let mut m = Matrix::new().await;
    let one = web_on_rm1(&mut m, 2).await;
    m.wait_state("web-2", "running", Some("rm1"), Duration::from_secs(20))
        .await;
    m.put_kv(&one.endpoint, "k", "still here").await;
    let pids = m.fake.pids();
    assert_eq!(pids.len(), 2);
    m.kill_agent("rm1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The guests serve on while no agent runs.
    assert_eq!(
        m.get_kv(&one.endpoint, "k").await.as_deref(),
        Some("still here")
    );
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    wait_for(
        "the new agent to report both",
        Duration::from_secs(10),
        async || {
            let r = m.agent("rm1").report();
            (r.instances.len() == 2 && r.instances.iter().all(|i| i.state.as_str() == "running"))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        m.fake.pids(),
        pids,
        "the same processes; events: {:#?}",
        m.events().await
    );
    // Three heartbeats of the new agent later, nothing was failed, lost or replaced.
    let seq = m.agent("rm1").current_seq();
    wait_for("three heartbeats", Duration::from_secs(10), async || {
        (m.agent("rm1").current_seq() >= seq + 3).then_some(())
    })
    .await;
    let list = m.instances().await;
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(list
        .iter()
        .all(|i| i.state.as_str() == "running" && i.generation == 1));
    let events = m.events().await;
    assert!(
        events.iter().any(|e| e["what"] == "register"),
        "the event log is read: {events:#?}"
    );
    assert!(
        !events.iter().any(|e| {
            let o = e["outcome"].as_str().unwrap_or("");
            o == "lost" || o.starts_with("failed")
        }),
        "{events:#?}"
    );
    assert_eq!(
        m.get_kv(&one.endpoint, "k").await.as_deref(),
        Some("still here")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_machine_does_not_delay_a_replacement_elsewhere() {
    let mut m = Matrix::new().await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.apply(&format!(
        "{}\n[[service]]\nname = \"other\"\nimage = \"guest:v1\"\nmin = 0\n",
        web(1)
    ))
    .await;
    let web1 = m
        .wait_state("web-1", "running", Some("rm1"), Duration::from_secs(20))
        .await;
    // rm3 accepts connections and never answers, as a SIGSTOPped agent does; its heartbeats
    // (sent here) claim an instance the controller does not want, so it is told to discard it.
    let hung = std::net::TcpListener::bind("127.0.0.4:0").expect("bind");
    let hung_addr = hung.local_addr().expect("addr");
    let report = serde_json::json!({
        "name": "rm3", "address": hung_addr.to_string(), "role": "shared",
        "vcpus": 8, "memory_mib": 4096,
        "instances": [{"id": "ghost-1", "generation": 1, "state": "running",
                       "endpoint": "127.0.0.4:1", "cpu_seconds": 0.0, "error": null}],
    });
    // It joined as any machine does, and reports with its credential.
    let joined: serde_json::Value = m
        .http
        .post(m.url("/api/v1/agents/join"))
        .bearer_auth(support::JOIN_TOKEN)
        .json(&report)
        .send()
        .await
        .expect("join")
        .json()
        .await
        .expect("a credential");
    let credential = joined["credential"]
        .as_str()
        .expect("credential")
        .to_owned();
    let (http, api) = (m.http.clone(), m.url("/api/v1/agents/heartbeat"));
    let beats = tokio::spawn(async move {
        loop {
            let _ = http
                .post(&api)
                .bearer_auth(&credential)
                .json(&report)
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    wait_for("rm3's heartbeats", Duration::from_secs(10), async || {
        m.machines().await.into_iter().find(|x| x["name"] == "rm3")
    })
    .await;
    // And an operator's activation there hangs too.
    let (s, _) = m
        .operate(
            Operation::Activate {
                service: ServiceName::new("other").expect("name"),
                on: Some("rm3".into()),
            },
            0,
        )
        .await;
    assert_eq!(s, 202);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // web-1's VM crashes: it is replaced on rm1 within seconds all the same.
    let pid = m.fake.pids()[0];
    m.fake.crash(pid);
    let crashed = Instant::now();
    let replacement = wait_for(
        "a replacement of web-1",
        Duration::from_secs(15),
        async || {
            m.instances().await.into_iter().find(|i| {
                i.service.as_str() == "web" && i.id != web1.id && i.state.as_str() == "running"
            })
        },
    )
    .await;
    assert_eq!(replacement.machine, "rm1");
    assert!(
        crashed.elapsed() < Duration::from_secs(10),
        "{:?}",
        crashed.elapsed()
    );
    beats.abort();
    drop(hung);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_suspend_resume_cycles_leave_at_most_two_saved_states() {
    let mut m = Matrix::new().await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.apply(&web(0).replace("max = 4", "max = 1")).await;
    m.done(Operation::Activate {
        service: ServiceName::new("web").expect("name"),
        on: None,
    })
    .await;
    let first = m.running("web-1").await;
    m.put_kv(&first.endpoint, "n", "0").await;
    for cycle in 1..=30 {
        m.done(Operation::Suspend {
            instance: id("web-1"),
        })
        .await;
        let tags = m.tags("web-1");
        assert!(tags.len() <= 2 * 2, "cycle {cycle}: {tags:?}");
        m.done(Operation::Resume {
            instance: id("web-1"),
            on: None,
        })
        .await;
        let now = m.running("web-1").await;
        assert_eq!(now.version, first.version, "pinned");
        assert_eq!(m.get_kv(&now.endpoint, "n").await.as_deref(), Some("0"));
    }
    // A resumed instance's state is superseded (removed in the background); one suspended
    // state at most is ever kept per instance.
    wait_for(
        "the superseded states to go",
        Duration::from_secs(10),
        async || {
            let tags = m.tags("web-1");
            (tags.len() <= 2).then_some(())
        },
    )
    .await;
    let gc = m.repo.gc(Duration::ZERO).expect("gc");
    assert!(
        gc.removed_manifests >= 29,
        "the superseded versions are collected: {gc:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retagged_image_never_moves_a_running_instance_and_similar_names_never_collide() {
    let mut m = Matrix::new().await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.start_agent("rm2", 3, MachineRole::Dedicated).await;
    let v1 = m
        .repo
        .resolve(&"guest:v1".parse().expect("ref"))
        .expect("resolve")
        .0;
    let prod_a = m.import("web-prod:v1", b"web-prod v1");
    let prod_b = m.import("web:prod-v1", b"web prod-v1");
    assert_ne!(prod_a, prod_b);
    m.apply(&services(&[
        ("app", "guest:v1"),
        ("p1", "web-prod:v1"),
        ("p2", "web:prod-v1"),
    ]))
    .await;
    let app = m.running("app-1").await;
    assert_eq!(app.version, v1);
    assert_eq!(app.image, "guest:v1");
    let p1 = m.running("p1-1").await;
    let p2 = m.running("p2-1").await;
    assert_eq!(
        (p1.version.as_str(), p2.version.as_str()),
        (prod_a.as_str(), prod_b.as_str())
    );
    // guest:v1 now names other bytes.
    let v2 = m.import("guest:v1", b"version two");
    assert_ne!(v1, v2);
    let to = if app.machine == "rm1" { "rm2" } else { "rm1" };
    m.done(Operation::Migrate {
        instance: id("app-1"),
        to: to.into(),
    })
    .await;
    assert_eq!(m.instance("app-1").await.expect("app-1").version, v1);
    m.done(Operation::Suspend {
        instance: id("app-1"),
    })
    .await;
    m.done(Operation::Resume {
        instance: id("app-1"),
        on: None,
    })
    .await;
    let app = m.running("app-1").await;
    assert_eq!(app.version, v1, "it keeps its original version");
    // The agents export versions by id, exactly those their instances run (the new guest:v1
    // only where a new instance runs it).
    wait_for(
        "exports that match the instances",
        Duration::from_secs(20),
        async || {
            let list = m.instances().await;
            let ok = ["rm1", "rm2"].iter().all(|n| {
                let mut exported = m.agent(n).exported_versions();
                exported.sort();
                let mut used: Vec<String> = list
                    .iter()
                    .filter(|i| i.machine == *n && !i.version.is_empty())
                    .map(|i| i.version.clone())
                    .collect();
                used.sort();
                used.dedup();
                exported == used
            });
            ok.then_some(())
        },
    )
    .await;
    let host = m.instance("app-1").await.expect("app-1").machine;
    assert!(m.agent(&host).exported_versions().contains(&v1));
    // The version in use has no tag any more, but GC keeps it: its agent pins it.
    wait_for("the pins to name v1", Duration::from_secs(10), async || {
        let pins = m.repo.pins().expect("pins");
        pins.iter().any(|p| p.versions.contains(&v1)).then_some(())
    })
    .await;
    let gc = m.repo.gc(Duration::ZERO).expect("gc");
    assert!(gc.pinned_manifests >= 1, "{gc:?}");
    m.repo
        .manifest(&v1)
        .expect("a running instance's version survives gc");
    // Once nothing runs on it, it goes.
    m.done(Operation::Discard {
        instance: id("app-1"),
    })
    .await;
    wait_for("v1 unpinned", Duration::from_secs(10), async || {
        let pins = m.repo.pins().expect("pins");
        (!pins.iter().any(|p| p.versions.contains(&v1))).then_some(())
    })
    .await;
    // Seen from a few seconds on (time is an input): the saved overlays that named v1 were
    // removed, and untagged manifests younger than GC's cutoff would still count.
    m.repo
        .gc_at(
            std::time::SystemTime::now() + Duration::from_secs(5),
            Duration::ZERO,
        )
        .expect("gc");
    assert!(
        m.repo.manifest(&v1).is_err(),
        "an unused, untagged version is collected"
    );
    // A new instance takes the new version.
    m.done(Operation::Activate {
        service: ServiceName::new("app").expect("name"),
        on: None,
    })
    .await;
    let app2 = m.running("app-2").await;
    assert_eq!(app2.version, v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_suspend_leaves_the_instance_running_where_it_was() {
    let mut m = Matrix::new().await;
    let before = web_on_rm1(&mut m, 1).await;
    m.put_kv(&before.endpoint, "k", "v").await;
    m.fake.set(FakeKnobs {
        fail_save: true,
        ..FakeKnobs::default()
    });
    let (s, v) = m
        .operate(
            Operation::Suspend {
                instance: id("web-1"),
            },
            30,
        )
        .await;
    assert_eq!(s, 502, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("fake save failed"),
        "{v}"
    );
    let after = m
        .wait_state("web-1", "running", Some("rm1"), Duration::from_secs(5))
        .await;
    assert_eq!(
        (after.generation, &after.endpoint),
        (before.generation, &before.endpoint)
    );
    assert_eq!(m.get_kv(&after.endpoint, "k").await.as_deref(), Some("v"));
    assert!(m.tags("web-1").is_empty(), "{:?}", m.tags("web-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activations_that_keep_failing_back_off_instead_of_looping() {
    let mut m = Matrix::new().await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    // No such image: every activation fails at the agent.
    m.apply(&web(1).replace("guest:v1", "missing:v1")).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    let events = m.events().await;
    let attempts = events
        .iter()
        .filter(|e| {
            e["what"]
                .as_str()
                .is_some_and(|w| w.starts_with("activate web-"))
                && e["outcome"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("failed"))
        })
        .count();
    // Without a back-off: one a second (9). With it: at 0, 1, 3 and 7 s.
    assert!(
        (2..=5).contains(&attempts),
        "{attempts} attempts: {events:#?}"
    );
    assert!(
        events.iter().any(|e| e["what"] == "back off web"),
        "{events:#?}"
    );
    // An operator's activation is not held back, and says why it fails.
    let (s, v) = m
        .operate(
            Operation::Activate {
                service: ServiceName::new("web").expect("name"),
                on: None,
            },
            30,
        )
        .await;
    assert_eq!(s, 502, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("missing:v1"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_instance_keeps_its_base_through_a_retag_and_gc_and_a_discard_frees_its_state()
{
    let mut m = Matrix::new().await;
    let web1 = web_on_rm1(&mut m, 1).await;
    m.put_kv(&web1.endpoint, "k", "v").await;
    m.done(Operation::Suspend {
        instance: id("web-1"),
    })
    .await;
    // The tag moves; nothing runs on the old version; gc runs with no grace.
    let v2 = m.import("guest:v1", b"another version");
    assert_ne!(v2, web1.version);
    wait_for(
        "no pins on the old version",
        Duration::from_secs(10),
        async || {
            let pins = m.repo.pins().expect("pins");
            (!pins.iter().any(|p| p.versions.contains(&web1.version))).then_some(())
        },
    )
    .await;
    m.repo.gc(Duration::ZERO).expect("gc");
    m.repo
        .manifest(&web1.version)
        .expect("the suspended instance's base survives: its saved overlay names it");
    m.done(Operation::Resume {
        instance: id("web-1"),
        on: None,
    })
    .await;
    let back = m.running("web-1").await;
    assert_eq!(back.version, web1.version);
    assert_eq!(m.get_kv(&back.endpoint, "k").await.as_deref(), Some("v"));
    // Suspended again and thrown away: its saved state leaves the repository.
    m.done(Operation::Suspend {
        instance: id("web-1"),
    })
    .await;
    assert_eq!(m.tags("web-1").len(), 2, "{:?}", m.tags("web-1"));
    m.done(Operation::Discard {
        instance: id("web-1"),
    })
    .await;
    assert!(m.tags("web-1").is_empty(), "{:?}", m.tags("web-1"));
}
