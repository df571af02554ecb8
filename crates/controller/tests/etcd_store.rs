//! Both state stores pass one suite: the same calls on the embedded SQLite file and on etcd
//! (a real `etcd`, started here) leave the same rows, and what etcd holds loads back whole.
//! Then leadership: one controller leads, a deposed one cannot write, a standby takes over.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmatrix_controller::etcd::Etcd;
use vmatrix_controller::{leader, Db, DbError, Guard, InstanceRow, OpState};
use vmatrix_core::api::{
    InstanceInfo, MachineInfo, MachineRole, MachineState, Operation, Purpose, SavedState,
};
use vmatrix_core::{ImageRef, InstanceId, InstanceState, ServiceName};

/// A one-member etcd on free loopback ports, removed (process and data) when dropped.
struct EtcdServer {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl EtcdServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let child = Command::new("etcd")
            .args([
                "--name=t".to_owned(),
                format!("--data-dir={}", dir.path().join("data").display()),
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster=t=http://127.0.0.1:{peer}"),
                "--logger=zap".into(),
                "--log-level=error".into(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd runs (Debian's etcd-server; scripts/install-deps.sh installs it)");
        let server = Self {
            child,
            url: format!("etcd://127.0.0.1:{client}/test"),
            _dir: dir,
        };
        let etcd = server.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        while etcd.put_if_absent("/test/up", b"1").is_err() {
            assert!(Instant::now() < deadline, "etcd did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn client(&self) -> Etcd {
        Etcd::from_url(&self.url).expect("etcd URL")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Takes the leadership key by hand (as a campaign would) and returns its guard.
fn lead_by_hand(etcd: &Etcd, who: &str) -> Guard {
    let key = format!("{}/leader", etcd.prefix());
    let value = format!("{{\"id\":\"{who}\",\"api\":\"http://{who}\"}}").into_bytes();
    let (ok, _) = etcd
        .txn(
            &[vmatrix_controller::etcd::Compare::Absent(key.clone())],
            &[vmatrix_controller::etcd::Op::Put(
                key.clone(),
                value.clone(),
                0,
            )],
            &[],
        )
        .expect("txn");
    assert!(ok, "the key was free");
    Guard { key, value }
}

fn instance(n: u64, state: InstanceState) -> InstanceRow {
    InstanceRow {
        info: InstanceInfo {
            id: InstanceId::new(format!("web-{n}")).unwrap(),
            service: ServiceName::new("web").unwrap(),
            image: "guest:v1".into(),
            version: "abc".into(),
            machine: "rm1".into(),
            state,
            endpoint: format!("127.0.0.2:{}", 20000 + n),
            generation: n,
            pinned_until_ms: 0,
            purpose: Purpose::Live,
            address: Some(format!("10.77.0.{}", n + 1).parse().unwrap()),
            slot: 0,
        },
        saved: (state == InstanceState::Suspended).then(|| SavedState {
            state: ImageRef::parse("web-1-state:s1").unwrap(),
            overlay: ImageRef::parse("web-1-disk:s1").unwrap(),
        }),
        seq: n,
    }
}

/// The suite: the same calls, flushed one by one as the controller does.
fn exercise(db: &mut Db, services_file: &Path) -> Result<(), DbError> {
    let text = "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\nmin = 1\nmax = 3\n\n\
                [[service]]\nname = \"api\"\nimage = \"guest:v1\"\npriority = 2\n";
    let services =
        vmatrix_core::parse_services(&services_file.display().to_string(), text, &|_| {
            Err("no files".into())
        })
        .expect("services parse");
    let web = ServiceName::new("web").unwrap();
    // Three services, then two of them (one goes, one changes): rows replaced and removed.
    let mut more = services.clone();
    let mut extra = services[0].clone();
    extra.name = ServiceName::new("batch").unwrap();
    more.push(extra);
    db.set_services(&more)?;
    db.flush()?;
    db.set_services(&services)?;
    db.flush()?;
    assert_eq!(db.services()?.len(), 2);
    let m = |name: &str| MachineInfo {
        name: name.into(),
        address: format!("127.0.0.2:{}", name.len()),
        role: MachineRole::Dedicated,
        vcpus: 4,
        memory_mib: 2048,
        state: MachineState::Up,
    };
    for (i, name) in ["rm1", "rm2", "sm1"].iter().enumerate() {
        db.upsert_machine(&m(name), 1_000 + i as u64)?;
        db.add_credential(name, &format!("secret-{name}"), 1_000)?;
        db.flush()?;
    }
    db.upsert_machine(&m("rm1"), 5_000)?;
    db.set_draining("rm2", true)?;
    db.ask("rm9", "127.0.0.9:1", 2_000)?;
    db.ask("rm8", "127.0.0.8:1", 2_000)?;
    db.approve("rm8", 2_100)?;
    db.flush()?;
    for n in 1..=4 {
        db.put_instance(&instance(n, InstanceState::Running))?;
        db.flush()?;
    }
    db.put_instance(&instance(2, InstanceState::Suspended))?;
    db.put_instance(&instance(3, InstanceState::Discarded))?;
    db.pin(&InstanceId::new("web-1").unwrap(), u64::MAX / 4)?;
    db.set_dropped(&web, true, true)?;
    db.set_dropped(&web, true, false)?;
    db.flush()?;
    for i in 0..150 {
        db.event(3_000 + i, "test", &format!("event {i}"), "why", "ok")?;
    }
    db.flush()?;
    let op = db.add_op(
        &Operation::Suspend {
            instance: InstanceId::new("web-4").unwrap(),
        },
        4_000,
    )?;
    db.add_op(
        &Operation::Drain {
            machine: "rm2".into(),
        },
        4_001,
    )?;
    db.settle_op(op, OpState::Done, "suspended", 4_500)?;
    db.forget("sm1")?;
    db.flush()?;
    // Retention: old settled operations, discarded rows below the top seq, events beyond 20.
    db.prune(10_000, 20)?;
    db.flush()?;
    assert_eq!(db.next_seq(&web)?, 5);
    assert_eq!(db.events(0, 1000)?.len(), 20);
    assert_eq!(db.running_ops()?.len(), 1);
    Ok(())
}

#[test]
#[ignore = "runs a real etcd (Debian's etcd-server); run by scripts/test"]
fn both_stores_keep_the_same_rows_and_etcd_gives_them_back() {
    let server = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite = Db::open(&dir.path().join("state.db")).unwrap();
    exercise(&mut sqlite, dir.path()).unwrap();

    let etcd = Arc::new(server.client());
    let guard = lead_by_hand(&etcd, "a");
    let mut on_etcd = Db::open_etcd(etcd.clone(), guard.clone()).unwrap();
    exercise(&mut on_etcd, dir.path()).unwrap();
    let rows = on_etcd.dump().unwrap();
    assert!(rows.len() > 40, "{rows:?}");
    assert_eq!(
        rows,
        sqlite.dump().unwrap(),
        "the same calls, the same rows"
    );

    // A controller taking over loads exactly what the last one wrote.
    drop(on_etcd);
    let again = Db::open_etcd(etcd.clone(), guard).unwrap();
    assert_eq!(again.dump().unwrap(), rows);
    // One key per row, under the prefix.
    let keys = etcd.range_prefix("/test/rows/").unwrap();
    assert_eq!(keys.len(), rows.len());
    // And the embedded store reopens the same way.
    drop(sqlite);
    let sqlite = Db::open(&dir.path().join("state.db")).unwrap();
    assert_eq!(sqlite.dump().unwrap(), rows);
}

#[test]
#[ignore = "runs a real etcd (Debian's etcd-server); run by scripts/test"]
fn a_deposed_leader_writes_nothing_more() {
    let server = EtcdServer::start();
    let etcd = Arc::new(server.client());
    let guard = lead_by_hand(&etcd, "a");
    let mut db = Db::open_etcd(etcd.clone(), guard.clone()).unwrap();
    db.event(1, "test", "before", "", "ok").unwrap();
    db.flush().unwrap();
    // Another controller takes the key.
    etcd.txn(
        &[],
        &[vmatrix_controller::etcd::Op::Put(
            guard.key.clone(),
            b"{\"id\":\"b\",\"api\":\"http://b\"}".to_vec(),
            0,
        )],
        &[],
    )
    .unwrap();
    db.event(2, "test", "after", "", "ok").unwrap();
    let err = db.flush().expect_err("the write is refused");
    assert!(matches!(err, DbError::Lost(_)), "{err}");
    assert!(
        err.to_string().contains("another controller leads"),
        "{err}"
    );
    // Nothing more, ever: memory may be ahead of etcd.
    assert!(matches!(db.flush(), Err(DbError::Lost(_))));
    let events: Vec<String> = etcd
        .range_prefix("/test/rows/events/")
        .unwrap()
        .into_iter()
        .map(|kv| String::from_utf8(kv.value).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].contains("before"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs a real etcd (Debian's etcd-server); run by scripts/test"]
async fn a_standby_takes_the_lead_when_the_leader_goes() {
    let server = EtcdServer::start();
    let etcd = Arc::new(server.client());
    let a = leader::campaign(etcd.clone(), "http://a").await.unwrap();
    assert!(a.valid());
    assert_eq!(leader::leader(&etcd).unwrap().unwrap().api, "http://a");
    let b = tokio::spawn(leader::campaign(etcd.clone(), "http://b"));
    // It stands by while the leader renews, well past the lease.
    tokio::time::sleep(leader::LEAD_TTL * 2).await;
    assert!(!b.is_finished(), "a second leader while the first renews");
    assert!(a.valid());
    // The leader stops cleanly: the standby leads at once.
    let resigned = Instant::now();
    let e = a.clone();
    tokio::task::spawn_blocking(move || e.resign())
        .await
        .unwrap();
    assert!(!a.valid());
    let b = tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .expect("the standby takes over")
        .unwrap()
        .unwrap();
    eprintln!("took over {:?} after a clean stop", resigned.elapsed());
    assert!(resigned.elapsed() < Duration::from_secs(2));
    assert!(b.valid());
    assert_eq!(leader::leader(&etcd).unwrap().unwrap().api, "http://b");
    // The old leader's guard no longer writes.
    let e = etcd.clone();
    let guard = b.guard();
    tokio::task::spawn_blocking(move || {
        let mut new = Db::open_etcd(e.clone(), guard).unwrap();
        new.event(1, "test", "by the new leader", "", "ok").unwrap();
        new.flush().unwrap();
        let mut old = Db::open_etcd(e, a.guard()).expect("reading needs no lead");
        old.event(2, "test", "by the old leader", "", "ok").unwrap();
        assert!(matches!(old.flush(), Err(DbError::Lost(_))));
    })
    .await
    .unwrap();
}

#[test]
#[ignore = "runs a real etcd (Debian's etcd-server); run by scripts/test"]
fn ids_are_not_given_out_again_after_a_takeover() {
    let server = EtcdServer::start();
    let etcd = Arc::new(server.client());
    let guard = lead_by_hand(&etcd, "a");
    let mut db = Db::open_etcd(etcd.clone(), guard.clone()).unwrap();
    let drain = Operation::Drain {
        machine: "rm1".into(),
    };
    for i in 1..=3 {
        let id = db.add_op(&drain, 1_000).unwrap();
        assert_eq!(id, i);
        db.settle_op(id, OpState::Done, "", 1_000).unwrap();
        db.event(1_000, "test", "e", "", "ok").unwrap();
        db.flush().unwrap();
    }
    // Retention forgets every operation and event.
    db.prune(10_000, 0).unwrap();
    db.flush().unwrap();
    assert!(db.op(3).unwrap().is_none());
    drop(db);
    let mut again = Db::open_etcd(etcd, guard).unwrap();
    assert_eq!(
        again.add_op(&drain, 20_000).unwrap(),
        4,
        "operation ids go on"
    );
    assert_eq!(again.event(20_000, "test", "e", "", "ok").unwrap(), 4);
    again.flush().unwrap();
}
