//! The agent's command handling over the fake hypervisor: fencing by generation, the same
//! command twice, a discard while an operation holds the VM, and records for adoption.

use std::sync::Arc;
use std::time::Duration;

use vmatrix_agent::fake::{FakeHypervisor, FakeKnobs};
use vmatrix_agent::{Agent, AgentConfig, FailureKind};
use vmatrix_core::api::{AgentCommand, AgentReply, InstancePlan, MachineRole};
use vmatrix_core::{ImageRef, InstanceId, ServiceName};

fn setup() -> (tempfile::TempDir, Arc<Agent>, FakeHypervisor) {
    let dir = tempfile::Builder::new()
        .prefix("vmx-agent-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let repo_url = format!("file://{}", dir.path().join("repo").display());
    let repo = vmatrix_store::Repository::open_or_init(&repo_url).expect("repo");
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![7u8; 1 << 20]).expect("disk");
    repo.import_state(&disk, &ImageRef::parse("guest:v1").expect("ref"), &|_| {})
        .expect("import");
    let fake = FakeHypervisor::new();
    let ip = "127.0.0.5";
    let port = std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let agent = Agent::new(
        AgentConfig {
            name: "rm1".into(),
            listen: format!("{ip}:{port}").parse().expect("addr"),
            role: MachineRole::Dedicated,
            vcpus: 4,
            memory_mib: 2048,
            data: dir.path().join("rm1"),
            repo: repo_url,
            accel: vmatrix_vmm::Accelerator::Tcg,
            cache_bytes: 1 << 24,
            net: None,
        },
        Arc::new(fake.clone()),
    )
    .expect("agent");
    (dir, agent, fake)
}

/// Waits (5 s at most) until the agent's one instance answers its health check.
async fn wait_running(agent: &Agent) {
    for _ in 0..100 {
        if agent.report().instances[0].state.as_str() == "running" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not running within 5 s: {:?}", agent.report());
}

/// Discards web-1 at `generation` and waits for its VM to be gone: a test ends with no VM of
/// its agent at work (one still running could write into the temporary directory as it is
/// removed, and leave part of it behind).
async fn discard_web1(agent: &Arc<Agent>, fake: &FakeHypervisor, generation: u64) {
    agent
        .handle(AgentCommand::Discard {
            id: InstanceId::new("web-1").expect("id"),
            generation,
        })
        .await
        .expect("discard");
    assert!(fake.pids().is_empty(), "no VM left: {:?}", fake.pids());
}

fn plan(generation: u64) -> InstancePlan {
    InstancePlan {
        id: InstanceId::new("web-1").expect("id"),
        generation,
        service: ServiceName::new("web").expect("name"),
        image: ImageRef::parse("guest:v1").expect("ref"),
        version: None,
        vcpus: 1,
        memory_mib: 256,
        port: 80,
        health: vmatrix_core::HealthCheck::default(),
        net: None,
        hardware: Default::default(),
        cloud_init: Default::default(),
        volumes: Vec::new(),
    }
}

#[tokio::test]
async fn the_same_activation_twice_is_one_vm_and_stale_generations_are_refused() {
    let (_dir, agent, fake) = setup();
    // As at a start: nothing to adopt, then commands run.
    assert_eq!(vmatrix_agent::adopt_left(&agent).await, 0);
    let cmd = AgentCommand::Activate {
        plan: plan(2),
        state: None,
    };
    let (a, b) = tokio::join!(agent.handle(cmd.clone()), agent.handle(cmd.clone()));
    let (a, b) = (a.expect("activate"), b.expect("again"));
    assert_eq!(a, b, "the same answer");
    let AgentReply::Activated { version, .. } = a else {
        panic!("not an activation: {a:?}");
    };
    assert_eq!(version.len(), 64, "a pinned version id");
    assert_eq!(fake.pids().len(), 1, "one VM");
    let stale = agent
        .handle(AgentCommand::Discard {
            id: InstanceId::new("web-1").expect("id"),
            generation: 1,
        })
        .await
        .expect_err("a stale discard");
    assert_eq!(stale.kind, FailureKind::Stale, "{stale}");
    assert_eq!(fake.pids().len(), 1, "still running");
    // The record a restarted agent would adopt is on disk.
    let dir = agent.config.data.join("vms/web-1-g2");
    let record = vmatrix_agent::record::VmRecord::read(&dir)
        .expect("a readable record")
        .expect("a record");
    assert_eq!(record.pid, fake.pids()[0]);
    assert_eq!(record.phase, vmatrix_agent::record::Phase::Running);
    discard_web1(&agent, &fake, 2).await;
}

#[tokio::test]
async fn a_discard_during_a_suspend_wins_and_leaves_nothing_behind() {
    let (_dir, agent, fake) = setup();
    // As at a start: nothing to adopt, then commands run.
    assert_eq!(vmatrix_agent::adopt_left(&agent).await, 0);
    agent
        .handle(AgentCommand::Activate {
            plan: plan(1),
            state: None,
        })
        .await
        .expect("activate");
    wait_running(&agent).await;
    fake.set(FakeKnobs {
        save_delay: Duration::from_millis(500),
        ..FakeKnobs::default()
    });
    let id = InstanceId::new("web-1").expect("id");
    let suspend = {
        let (agent, id) = (agent.clone(), id.clone());
        tokio::spawn(async move {
            agent
                .handle(AgentCommand::Suspend { id, generation: 1 })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The heartbeat's snapshot answers at once and shows the suspend in flight.
    let report = agent.report();
    assert_eq!(report.instances[0].state.as_str(), "suspending");
    agent
        .handle(AgentCommand::Discard {
            id: id.clone(),
            generation: 1,
        })
        .await
        .expect("discard");
    let _ = suspend.await.expect("the suspend task ends");
    // Whatever the suspend did, the discarded VM does not outlive it.
    for _ in 0..50 {
        if fake.pids().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fake.pids().is_empty(), "{:?}", fake.pids());
    assert!(agent.report().instances.is_empty());
    assert!(!agent.config.data.join("vms/web-1-g1").exists());
    assert!(
        agent.exported_versions().is_empty(),
        "the export stopped with its last user"
    );
}

#[tokio::test]
async fn an_unreadable_record_is_left_alone_and_a_superseded_one_goes() {
    let (_dir, agent, fake) = setup();
    // A record this agent cannot read (a newer format, a damaged disk): never destroyed.
    let odd = agent.config.data.join("vms/other-1-g3");
    std::fs::create_dir_all(&odd).expect("dir");
    std::fs::write(odd.join("vm.json"), b"{ not json").expect("record");
    std::fs::write(odd.join("disk.qcow2"), b"precious").expect("disk");
    assert_eq!(vmatrix_agent::adopt_left(&agent).await, 0);
    assert!(odd.join("disk.qcow2").exists(), "left alone");
    // web-1 suspended at generation 1, then resumed here at generation 2: the old record goes.
    agent
        .handle(AgentCommand::Activate {
            plan: plan(1),
            state: None,
        })
        .await
        .expect("activate");
    wait_running(&agent).await;
    let id = InstanceId::new("web-1").expect("id");
    let AgentReply::Suspended { saved } = agent
        .handle(AgentCommand::Suspend {
            id: id.clone(),
            generation: 1,
        })
        .await
        .expect("suspend")
    else {
        panic!("not a suspend reply");
    };
    assert!(agent.config.data.join("vms/web-1-g1/vm.json").exists());
    let mut resumed = plan(2);
    resumed.version = agent.report().instances[0].version.clone().into();
    agent
        .handle(AgentCommand::Activate {
            plan: resumed,
            state: Some(saved),
        })
        .await
        .expect("resume");
    assert!(
        !agent.config.data.join("vms/web-1-g1").exists(),
        "the superseded suspended record is gone"
    );
    assert!(agent.config.data.join("vms/web-1-g2/vm.json").exists());
    assert_eq!(fake.pids().len(), 1);
    discard_web1(&agent, &fake, 2).await;
}
