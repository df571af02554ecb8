//! The driver against real QEMU guests: boot from the guest's own disk, every HTTP route,
//! suspend/resume into another directory, live migration under load, and no QEMU left behind
//! by an owner that panics or is killed. Run by `scripts/test` (`--include-ignored`).

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use vmatrix_vmm::{http, IncomingVm, StopOutcome, Vm};

const READY: Duration = Duration::from_secs(90);

fn file_hash(p: &std::path::Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(p).expect("read base image"))
}

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn boots_from_its_own_disk_and_serves_every_route() {
    let dir = scratch();
    let spec = spec("route-test").await;
    let base_before = file_hash(&guest().disk);
    let started = Instant::now();
    let mut vm = Vm::boot(spec.clone(), dir.path()).await.expect("boot");
    vm.wait_ready(READY).await.expect("guest serves /health");
    eprintln!(
        "boot to HTTP: {:.2}s ({:?})",
        started.elapsed().as_secs_f64(),
        spec.accel
    );
    let addr = spec.forward;

    let root = get(addr, "/").await;
    assert_eq!(root.status, 200);
    let info: serde_json::Value = serde_json::from_slice(&root.body)
        .unwrap_or_else(|e| panic!("JSON from /: {e}: {:?}", root.text()));
    assert_eq!(info["instance"], "route-test", "{info}");
    assert_eq!(info["service"], "reference");
    assert_eq!(info["version"], "1");
    assert!(info["uptime_ms"].as_u64().is_some(), "{info}");

    assert_eq!(get(addr, "/health").await.status, 200);
    let work = get(addr, "/work?ms=150").await;
    let worked: serde_json::Value = serde_json::from_slice(&work.body).expect("JSON from /work");
    assert!(worked["worked_ms"].as_u64().unwrap_or(0) >= 150, "{worked}");
    assert_eq!(get(addr, "/work?ms=x").await.status, 400);

    for space in ["kv", "disk"] {
        assert_eq!(
            get(addr, &format!("/{space}/never-written")).await.status,
            404
        );
        assert_eq!(
            put(addr, &format!("/{space}/k1"), b"value \x00\xff")
                .await
                .status,
            200
        );
        let back = get(addr, &format!("/{space}/k1")).await;
        assert_eq!(
            (back.status, back.body.as_slice()),
            (200, &b"value \x00\xff"[..])
        );
        assert_eq!(
            put(addr, &format!("/{space}/.hidden"), b"x").await.status,
            400
        );
    }
    assert_eq!(get(addr, "/nope").await.status, 404);

    // Paused, the guest does not answer; continued, it does again.
    vm.pause().await.expect("pause");
    assert!(!vm.status().await.expect("status").running);
    let paused = http::request(addr, "GET", "/health", &[], Duration::from_millis(700)).await;
    assert!(paused.is_err(), "a paused guest answered: {paused:?}");
    vm.cont().await.expect("continue");
    assert_eq!(get(addr, "/health").await.status, 200);

    let pid = vm.pid();
    let outcome = vm.stop(Duration::from_secs(5)).await.expect("stop");
    eprintln!("stop: {outcome:?}");
    assert_eq!(
        outcome,
        StopOutcome::Graceful,
        "the guest ignored the power button"
    );
    assert!(!alive(pid), "QEMU {pid} still runs after stop");
    assert_eq!(
        base_before,
        file_hash(&guest().disk),
        "the base image was written"
    );
}

/// QEMU `pid` runs under its seccomp filter and, where we are root, not as root.
fn assert_confined(pid: u32, as_root: bool) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(
        field("Seccomp:"),
        ["2"],
        "QEMU {pid} runs without its sandbox"
    );
    if as_root {
        assert!(
            field("Uid:").iter().all(|u| *u != "0"),
            "QEMU {pid} still has root's uid: {:?}",
            field("Uid:")
        );
    }
}

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn suspend_then_resume_elsewhere_keeps_identity_ram_and_disk() {
    let machine_a = scratch();
    let machine_b = scratch();
    let mut spec = spec("suspend-test").await;
    // Confined as an agent confines it: QEMU becomes an unprivileged user once it has opened
    // its files, so the state goes out and comes back through descriptors we pass it.
    let as_root = unsafe { libc::geteuid() } == 0;
    if as_root {
        spec.run_as = Some("nobody".into());
    }
    let mut vm = Vm::boot(spec.clone(), machine_a.path())
        .await
        .expect("boot");
    vm.wait_ready(READY).await.expect("ready");
    assert_confined(vm.pid(), as_root);
    let a = spec.forward;
    assert_eq!(put(a, "/kv/memo", b"in RAM").await.status, 200);
    assert_eq!(put(a, "/disk/memo", b"on disk").await.status, 200);
    let uptime_before: serde_json::Value = serde_json::from_slice(&get(a, "/").await.body).unwrap();

    let old_pid = vm.pid();
    let suspended = vm
        .suspend(
            &machine_a.path().join("state.bin"),
            std::time::Duration::from_secs(120),
        )
        .await
        .expect("suspend");
    assert!(!alive(old_pid), "the suspended QEMU still runs");
    eprintln!(
        "suspend: {:.3}s, state {} bytes",
        suspended.elapsed.as_secs_f64(),
        suspended.state_bytes
    );

    let moved = spec.with_forward(free_addr());
    let (mut resumed, took) = Vm::resume(moved.clone(), machine_b.path(), &suspended)
        .await
        .expect("resume");
    eprintln!("resume: {:.3}s", took.as_secs_f64());
    resumed
        .wait_ready(Duration::from_secs(20))
        .await
        .expect("resumed guest serves");
    assert!(resumed.dir().disk().starts_with(machine_b.path()));
    assert_confined(resumed.pid(), as_root);
    let b = moved.forward;
    let info: serde_json::Value = serde_json::from_slice(&get(b, "/").await.body).unwrap();
    assert_eq!(info["instance"], "suspend-test");
    assert!(
        info["uptime_ms"].as_u64() >= uptime_before["uptime_ms"].as_u64(),
        "uptime went back: the guest rebooted? {info} vs {uptime_before}"
    );
    assert_eq!(get(b, "/kv/memo").await.body, b"in RAM");
    assert_eq!(get(b, "/disk/memo").await.body, b"on disk");
    resumed.kill().await;
}

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn live_migration_under_load_keeps_ram_and_disk() {
    let machine_a = scratch();
    let machine_b = scratch();
    let mut spec = spec("migrate-test").await;
    // Both ends confined: the destination takes over its files with the descriptors it opened.
    let as_root = unsafe { libc::geteuid() } == 0;
    if as_root {
        spec.run_as = Some("nobody".into());
    }
    let mut source = Vm::boot(spec.clone(), machine_a.path())
        .await
        .expect("boot");
    source.wait_ready(READY).await.expect("ready");
    assert_confined(source.pid(), as_root);
    let a = spec.forward;
    assert_eq!(
        put(a, "/disk/before", b"written before the move")
            .await
            .status,
        200
    );
    assert_eq!(put(a, "/kv/before", b"kept in RAM").await.status, 200);

    let moved = spec.with_forward(free_addr());
    let b = moved.forward;
    let incoming = IncomingVm::start(moved, machine_b.path(), "127.0.0.1".parse().unwrap(), None)
        .await
        .expect("destination waits");

    // A client increments /kv/counter and mirrors it to /disk/counter in a loop, following the
    // VM from the old port to the new one.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut errors = 0u64;
            let mut n = 0u64;
            let mut target = a;
            while !stop.load(Ordering::Relaxed) {
                let next = (n + 1).to_string();
                let t = Duration::from_secs(3);
                let ok = match http::request(target, "PUT", "/kv/counter", next.as_bytes(), t).await
                {
                    Ok(r) if r.status == 200 => {
                        matches!(http::request(target, "PUT", "/disk/counter", next.as_bytes(), t).await, Ok(r) if r.status == 200)
                    }
                    _ => false,
                };
                if ok {
                    n += 1;
                    acked.store(n, Ordering::SeqCst);
                } else {
                    errors += 1;
                    target = if target == a { b } else { a };
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            errors
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || acked.load(Ordering::SeqCst)
            >= 3)
        .await,
        "the client made no progress before the move"
    );

    let source_pid = source.pid();
    let report = match source.migrate_out(incoming.target()).await {
        Ok(r) => r,
        Err(failure) => panic!("{failure}"),
    };
    let mut dest = incoming
        .finish(Duration::from_secs(60))
        .await
        .expect("destination runs");
    assert_confined(dest.pid(), as_root);
    eprintln!(
        "live migration (256 MiB guest): total {} ms, downtime {} ms, RAM {} bytes, disk {} bytes, wall {:.3}s",
        report.total_ms,
        report.downtime_ms,
        report.ram_bytes,
        report.disk_bytes,
        report.wall.as_secs_f64()
    );
    assert!(report.ram_bytes > 0, "QEMU reported no RAM sent");
    assert!(
        wait_until(Duration::from_secs(5), || !alive(source_pid)).await,
        "the source QEMU still runs 5 s after the move"
    );

    let at_move = acked.load(Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(30), || acked.load(Ordering::SeqCst)
            >= at_move + 3)
        .await,
        "the client made no progress on the destination"
    );
    stop.store(true, Ordering::Relaxed);
    let errors = client.await.expect("client task");
    let last = acked.load(Ordering::SeqCst);
    eprintln!("client: {last} increments acknowledged, {errors} failed attempts around the move");

    dest.wait_ready(Duration::from_secs(10))
        .await
        .expect("destination serves");
    for space in ["kv", "disk"] {
        let value: u64 = get(b, &format!("/{space}/counter"))
            .await
            .text()
            .trim()
            .parse()
            .expect("a number");
        // The last PUT may have landed with its answer lost: one more than acknowledged is fine.
        assert!(
            value == last || value == last + 1,
            "/{space}/counter is {value}, {last} acknowledged"
        );
    }
    assert_eq!(
        get(b, "/disk/before").await.body,
        b"written before the move"
    );
    assert_eq!(get(b, "/kv/before").await.body, b"kept in RAM");
    let info: serde_json::Value = serde_json::from_slice(&get(b, "/").await.body).unwrap();
    assert_eq!(info["instance"], "migrate-test");
    dest.kill().await;
}

const CHILD_ENV: &str = "VMATRIX_TEST_CHILD";

/// Not a test on its own: the body of the child process that `no_qemu_outlives_its_owner`
/// starts. It boots a VM, writes the QEMU pid, then panics or waits to be killed.
#[tokio::test]
#[ignore = "helper process for no_qemu_outlives_its_owner"]
async fn child_owner_of_a_vm() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let pid_file = std::env::var("VMATRIX_TEST_PID_FILE").expect("pid file");
    // The VM's directory is inside the parent's scratch directory: a child killed with SIGKILL
    // removes nothing, the parent's directory goes with the parent's test.
    let dir = std::path::Path::new(&pid_file).with_file_name("vm");
    std::fs::create_dir_all(&dir).expect("the VM's directory");
    let vm = Vm::boot(spec("orphan-test").await, &dir)
        .await
        .expect("boot");
    // Written whole, then renamed: the parent never reads half a number.
    let tmp = format!("{pid_file}.tmp");
    std::fs::write(&tmp, vm.pid().to_string()).expect("write pid");
    std::fs::rename(&tmp, &pid_file).expect("publish pid");
    if mode == "panic" {
        panic!("deliberate panic while owning QEMU {}", vm.pid());
    }
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn no_qemu_outlives_its_owner() {
    guest();
    for mode in ["panic", "sigkill"] {
        let dir = scratch();
        let pid_file = dir.path().join("qemu.pid");
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_owner_of_a_vm",
                "--include-ignored",
                "--nocapture",
            ])
            .env(CHILD_ENV, mode)
            .env("VMATRIX_TEST_PID_FILE", &pid_file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the child test process");
        let read_pid = || {
            std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
        };
        assert!(
            wait_until(Duration::from_secs(60), || read_pid().is_some()).await,
            "{mode}: the child never started QEMU"
        );
        let pid = read_pid().expect("pid written");
        if mode == "sigkill" {
            assert!(alive(pid), "QEMU {pid} died before its owner");
            child.start_kill().expect("SIGKILL the owner");
        }
        let status = child.wait().await.expect("child exit");
        assert!(
            !status.success(),
            "{mode}: the child should fail or be killed"
        );
        assert!(
            wait_until(Duration::from_secs(10), || !alive(pid)).await,
            "{mode}: QEMU {pid} outlived its owner"
        );
        eprintln!("{mode}: QEMU {pid} gone after its owner died");
    }
}

/// A test authority: QEMU's credential directories for machines it names.
struct TestAuthority {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl TestAuthority {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = p.self_signed(&key).expect("self-signed");
        Self { key, cert }
    }

    /// `dir` with QEMU's five files for machine `name`.
    fn issue(&self, dir: &std::path::Path, name: &str) -> vmatrix_vmm::migration::MigrationTls {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("sign");
        std::fs::create_dir_all(dir).expect("mkdir");
        for (file, text) in [
            ("ca-cert.pem", self.cert.pem()),
            ("server-cert.pem", cert.pem()),
            ("client-cert.pem", cert.pem()),
            ("server-key.pem", key.serialize_pem()),
            ("client-key.pem", key.serialize_pem()),
        ] {
            std::fs::write(dir.join(file), text).expect("write");
        }
        vmatrix_vmm::migration::MigrationTls {
            dir: dir.to_owned(),
            name: name.into(),
        }
    }
}

/// `qemu-img info` of the destination's disk export as an NBD client, with `tls`'s
/// certificate (or none): whether it was let in, and what qemu-img said.
fn nbd_client(
    target: &vmatrix_vmm::MigrationTarget,
    tls: Option<&vmatrix_vmm::migration::MigrationTls>,
) -> (bool, String) {
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.arg("info");
    let mut opts = format!(
        "driver=nbd,server.type=inet,server.host={},server.port={},export={}",
        target.nbd.ip(),
        target.nbd.port(),
        target.export
    );
    if let Some(t) = tls {
        cmd.arg("--object").arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            t.dir.display()
        ));
        opts.push_str(&format!(
            ",tls-creds=tls0,tls-hostname={}",
            target.tls_name.as_deref().unwrap_or("")
        ));
    }
    let out = cmd
        .arg("--image-opts")
        .arg(opts)
        .output()
        .expect("run qemu-img");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn the_migration_data_path_admits_only_the_source() {
    let pki = scratch();
    let authority = TestAuthority::new("the matrix's authority");
    let rm1 = authority.issue(&pki.path().join("rm1"), "rm1");
    let rm2 = authority.issue(&pki.path().join("rm2"), "rm2");
    let rm3 = authority.issue(&pki.path().join("rm3"), "rm3");
    // A certificate naming the source, from another authority. The forger trusts both (the
    // matrix's authority certificate is public): the destination is the one to refuse it.
    let other = TestAuthority::new("another authority");
    let forged = other.issue(&pki.path().join("forged"), "rm1");
    std::fs::write(
        forged.dir.join("ca-cert.pem"),
        authority.cert.pem() + &other.cert.pem(),
    )
    .expect("write");

    let (machine_a, machine_b) = (scratch(), scratch());
    let mut spec = spec("tls-test").await;
    let as_root = unsafe { libc::geteuid() } == 0;
    if as_root {
        // The keys are the caller's: QEMU reads them before it becomes this user.
        spec.run_as = Some("nobody".into());
    }
    spec.tls = Some(rm1.clone());
    let mut source = Vm::boot(spec.clone(), machine_a.path())
        .await
        .expect("boot");
    source.wait_ready(READY).await.expect("ready");
    let a = spec.forward;
    assert_eq!(put(a, "/kv/memo", b"kept in RAM").await.status, 200);

    let mut moved = spec.with_forward(free_addr());
    moved.tls = Some(rm2.clone());
    let b = moved.forward;
    let incoming = IncomingVm::start(
        moved,
        machine_b.path(),
        "127.0.0.1".parse().unwrap(),
        Some("rm1"),
    )
    .await
    .expect("destination waits");
    let target = incoming.target().clone();
    assert_eq!(target.tls_name.as_deref(), Some("rm2"));

    // The writable disk export: refused in the clear, to another machine of the matrix, and to
    // a certificate naming the source from another authority; open to the source.
    for (who, tls) in [
        ("no certificate", None),
        ("rm3, of the matrix", Some(&rm3)),
        ("rm1, of another authority", Some(&forged)),
    ] {
        let (let_in, said) = nbd_client(&target, tls);
        assert!(!let_in, "the disk export let in a client with {who}");
        eprintln!("NBD client with {who}: refused: {said}");
    }
    // The source, trusting both authorities as the forger does: so the refusal above was the
    // destination's.
    let source_trusting_both = authority.issue(&pki.path().join("rm1-both"), "rm1");
    std::fs::write(
        source_trusting_both.dir.join("ca-cert.pem"),
        authority.cert.pem() + &other.cert.pem(),
    )
    .expect("write");
    for tls in [&rm1, &source_trusting_both] {
        let (let_in, said) = nbd_client(&target, Some(tls));
        assert!(let_in, "the source's certificate was refused: {said}");
    }

    // The migration listener: a stream in the clear (QEMU's own magic and version) is dropped
    // at the TLS handshake and the destination still waits for the source.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(target.migration)
            .await
            .expect("connect to the migration port");
        let _ = s.write_all(b"QEVM\x00\x00\x00\x03").await;
        let _ = s.shutdown().await;
    }

    let report = match source.migrate_out(&target).await {
        Ok(r) => r,
        Err(failure) => panic!("{failure}"),
    };
    let mut dest = incoming
        .finish(Duration::from_secs(60))
        .await
        .expect("destination runs");
    eprintln!(
        "live migration over TLS (256 MiB guest): total {} ms, downtime {} ms, RAM {} bytes, \
         disk {} bytes, wall {:.3}s",
        report.total_ms,
        report.downtime_ms,
        report.ram_bytes,
        report.disk_bytes,
        report.wall.as_secs_f64()
    );
    dest.wait_ready(Duration::from_secs(10))
        .await
        .expect("destination serves");
    assert_eq!(get(b, "/kv/memo").await.body, b"kept in RAM");

    // Its next stop is a file: saved without TLS (the move had set it).
    let saved = dest
        .save_state(&machine_b.path().join("state"), Duration::from_secs(60))
        .await
        .expect("a migrated VM suspends to a file");
    assert!(saved.state_bytes > 0);
}

/// A tmpfs this test mounts, unmounted when it ends (pass or fail).
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
#[ignore = "boots real QEMU and mounts a tmpfs (root); run by scripts/test"]
async fn a_suspend_onto_a_full_disk_fails_and_the_guest_runs_on() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small filesystem needs root");
        return;
    }
    let dir = scratch();
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"])
        .arg(&small)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount a tmpfs at {}", small.display());
    let _small = Mounted(small.clone());

    let spec = spec("full-disk-test").await;
    let mut vm = Vm::boot(spec.clone(), dir.path().join("vm"))
        .await
        .expect("boot");
    vm.wait_ready(READY).await.expect("ready");
    let a = spec.forward;
    assert_eq!(put(a, "/kv/memo", b"kept in RAM").await.status, 200);

    // 256 MiB of guest RAM onto 16 MiB: the save fails, the guest runs on as it was, and no
    // partial state is left to be taken for a saved one.
    let started = Instant::now();
    let err = vm
        .save_state(&small.join("state"), Duration::from_secs(60))
        .await
        .expect_err("a save onto a full disk");
    eprintln!(
        "suspend onto a full 16 MiB disk: failed after {:.2}s: {err}",
        started.elapsed().as_secs_f64()
    );
    assert!(!small.join("state").exists(), "a partial state was left");
    assert!(
        vm.status().await.expect("status").running,
        "the guest was left stopped"
    );
    assert_eq!(get(a, "/kv/memo").await.body, b"kept in RAM");

    // With room, the same VM suspends.
    let saved = vm
        .save_state(&dir.path().join("state"), Duration::from_secs(60))
        .await
        .expect("a save with room");
    assert!(saved.state_bytes > 0);
    eprintln!(
        "then onto a disk with room: {} bytes in {:.2}s",
        saved.state_bytes,
        saved.elapsed.as_secs_f64()
    );
    vm.kill().await;
}
