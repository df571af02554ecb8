//! The control plane over mutual TLS: the controller's API serves HTTPS with a certificate from
//! the matrix's authority, the agents' APIs serve HTTPS with their machines' certificates and
//! take only the controller's, and the controller checks that the agent it reaches proves the
//! machine it meant. Real controller and agents (over the fake hypervisor) in this process.

mod support;

use std::time::Duration;

use support::{names_in, Matrix, TOKEN};
use vmatrix_core::api::{MachineRole, Operation};
use vmatrix_core::InstanceId;

const WEB: &str = "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\nmin = 1\nmax = 1\n";

/// Migrates web-1 from `from` to the other of rm1 and rm2 and checks it runs there.
async fn migrate_away(m: &Matrix, from: &str) {
    let to = if from == "rm1" { "rm2" } else { "rm1" };
    m.done(Operation::Migrate {
        instance: InstanceId::new("web-1").unwrap(),
        to: to.into(),
    })
    .await;
    assert_eq!(m.running("web-1").await.machine, to);
}

/// `GET https://ADDR/agent/v1/status` with machine `machine`'s credential, trusting the
/// matrix's authority, expecting the agent to prove `machine`, presenting `identity`.
async fn agent_status(
    m: &Matrix,
    machine: &str,
    identity: Option<(&str, &str)>,
) -> Result<u16, String> {
    let authority = m.authority().expect("the authority");
    let tls = vmatrix_serve::tls::client_config(&authority, Some(machine), identity)
        .expect("a TLS configuration");
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .expect("a client");
    let addr = m.agent(machine).config.listen;
    client
        .get(format!("https://{addr}/agent/v1/status"))
        .bearer_auth(m.credential(machine))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_runs_over_mutual_tls() {
    let mut m = Matrix::with_tls(true).await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.start_agent("rm2", 3, MachineRole::Dedicated).await;

    // Commands reach the agents over TLS: an instance starts and migrates between them.
    m.apply(WEB).await;
    let web = m
        .wait_state("web-1", "running", None, Duration::from_secs(20))
        .await;
    migrate_away(&m, &web.machine).await;

    // The controller's certificate: from the authority, for its names and its address.
    let dir = m.tls_dir();
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect(f);
    let (cn, names) = names_in(&read("controller-cert.pem"));
    assert_eq!(cn, "vMatrix controller");
    for n in ["controller.vmatrix", "localhost", "127.0.0.1"] {
        assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
    }
    // Every agent holds the same authority as the controller.
    for name in ["rm1", "rm2"] {
        let agent_ca = m
            .dir
            .path()
            .join("agents")
            .join(name)
            .join("tls/ca-cert.pem");
        assert_eq!(
            std::fs::read_to_string(agent_ca).unwrap(),
            read("ca-cert.pem")
        );
    }
    // The key files are the controller's alone.
    use std::os::unix::fs::PermissionsExt;
    for f in ["ca-key.pem", "controller-key.pem"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    // The API: no plain HTTP, and no client that does not trust the authority.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/api/v1/health", m.api))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    let stranger = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    };
    let e = Matrix::client_trusting(Some(&stranger))
        .get(m.url("/api/v1/instances"))
        .send()
        .await
        .expect_err("a client trusting another authority");
    assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");
    // The typed client says what to do.
    let untrusting = vmatrix_client::ControllerClient::new(&m.url(""), Some(TOKEN.into()));
    let e = untrusting
        .instances()
        .await
        .expect_err("no authority")
        .to_string();
    assert!(e.contains("VMATRIX_CA"), "{e}");
    let trusting = vmatrix_client::ControllerClient::trusting(
        &m.url(""),
        Some(TOKEN.into()),
        Some(&read("ca-cert.pem")),
    )
    .unwrap();
    assert_eq!(trusting.instances().await.expect("instances").len(), 1);

    // An agent's API takes the controller's certificate only: not none, not another
    // machine's from the same authority, not plain HTTP.
    let controller = (read("controller-cert.pem"), read("controller-key.pem"));
    let rm2_dir = m.dir.path().join("agents/rm2/tls");
    let rm2 = (
        std::fs::read_to_string(rm2_dir.join("client-cert.pem")).unwrap(),
        std::fs::read_to_string(rm2_dir.join("client-key.pem")).unwrap(),
    );
    assert_eq!(
        agent_status(&m, "rm1", Some((&controller.0, &controller.1))).await,
        Ok(200)
    );
    let none = agent_status(&m, "rm1", None).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    let other = agent_status(&m, "rm1", Some((&rm2.0, &rm2.1))).await;
    assert!(other.is_err(), "rm2's certificate: {other:?}");
    let addr = m.agent("rm1").config.listen;
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/agent/v1/status"))
        .bearer_auth(m.credential("rm1"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP to an agent answered: {plain:?}");
    // And rm2's agent at rm1's address would not pass for rm1: the controller expects the
    // name, not the address.
    let rm2_addr = m.agent("rm2").config.listen;
    let authority = m.authority().unwrap();
    let tls = vmatrix_serve::tls::client_config(
        &authority,
        Some("rm1"),
        Some((&controller.0, &controller.1)),
    )
    .unwrap();
    let e = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap()
        .get(format!("https://{rm2_addr}/agent/v1/status"))
        .send()
        .await
        .expect_err("rm2 taken for rm1");
    assert!(format!("{e:?}").contains("NotValidForName"), "{e:?}");
}

/// Over TLS a heartbeat needs the machine's certificate besides its credential: a stolen
/// credential alone, or with another machine's certificate, is refused (and changes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_comes_with_its_machines_certificate() {
    let mut m = Matrix::with_tls(true).await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.start_agent("rm2", 3, MachineRole::Dedicated).await;
    let authority = m.authority().unwrap();
    let files = |name: &str| {
        let dir = m.dir.path().join("agents").join(name).join("tls");
        (
            std::fs::read_to_string(dir.join("client-cert.pem")).unwrap(),
            std::fs::read_to_string(dir.join("client-key.pem")).unwrap(),
        )
    };
    let (rm1, rm2) = (files("rm1"), files("rm2"));
    let report = m.agent("rm1").report();
    let beat = async |identity: Option<(&str, &str)>| {
        let tls = vmatrix_serve::tls::client_config(&authority, None, identity).unwrap();
        let r = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .unwrap()
            .post(m.url("/api/v1/agents/heartbeat"))
            .bearer_auth(m.credential("rm1"))
            .json(&report)
            .send()
            .await
            .expect("an answer");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    };
    let (status, body) = beat(None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("certificate"), "{body}");
    let (status, body) = beat(Some((&rm2.0, &rm2.1))).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not machine rm1's"), "{body}");
    let (status, body) = beat(Some((&rm1.0, &rm1.1))).await;
    assert_eq!(status, 200, "{body}");
    // The agents' own heartbeats go on being taken in.
    let machines = m.machines().await;
    assert!(machines.iter().all(|x| x["state"] == "up"), "{machines:?}");
}

/// A controller started again keeps its authority (the agents' certificates stay valid), and
/// agents started again go on over TLS: a migration between them succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_outlives_restarts() {
    let mut m = Matrix::with_tls(true).await;
    m.start_agent("rm1", 2, MachineRole::Dedicated).await;
    m.start_agent("rm2", 3, MachineRole::Dedicated).await;
    let before = m.authority().unwrap();
    m.apply(WEB).await;
    let web = m
        .wait_state("web-1", "running", None, Duration::from_secs(20))
        .await;
    m.kill_controller();
    m.start_controller().await;
    assert_eq!(m.authority().unwrap(), before);
    for (name, host) in [("rm1", 2), ("rm2", 3)] {
        m.kill_agent(name);
        m.start_agent(name, host, MachineRole::Dedicated).await;
    }
    migrate_away(&m, &web.machine).await;
}
