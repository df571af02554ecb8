//! The fencing watchdog against a real process standing in for a QEMU: it is stopped when the
//! lease lapses, not before; a renewal lets the agent continue it; `release` ends the watchdog.

use std::time::{Duration, Instant};

use vmatrix_agent::lease::{boottime_ms, unfence, watchdog, FenceFiles, LeaseHolder};

fn state(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("")
        .to_owned()
}

fn wait_state(pid: u32, want: &str) -> Duration {
    let t = Instant::now();
    while state(pid) != want {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "process {pid} is {:?}, not {want:?}",
            state(pid)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

/// A process killed when the test ends, pass or fail.
struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_lapsed_lease_stops_the_vms_and_a_renewal_lets_them_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let files = FenceFiles::new(dir.path());
    std::fs::create_dir_all(files.vms().join("web-1-g1")).unwrap();
    // Looks like one of this machine's QEMUs to the watchdog: its command line names
    // qemu-system and a directory under vms/.
    let name = format!(
        "qemu-system-x86_64 {}/web-1-g1/qmp.sock",
        files.vms().display()
    );
    let vm = Killed(
        std::process::Command::new("bash")
            .args(["-c", &format!("exec -a '{name}' sleep 600")])
            .spawn()
            .unwrap(),
    );
    let pid = vm.0.id();
    let lease = Duration::from_millis(600);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let holder = LeaseHolder::attach(
        files.clone(),
        Box::new(move |f: &FenceFiles| {
            let (f, done) = (f.clone(), done_tx.clone());
            std::thread::spawn(move || done.send(watchdog(&f, lease).is_ok()));
            Ok(())
        }),
    )
    .unwrap();

    // Renewed every 100 ms for a second: it runs throughout.
    for _ in 0..10 {
        holder.renew(boottime_ms());
        std::thread::sleep(Duration::from_millis(100));
        assert_ne!(state(pid), "T", "stopped while the lease held");
    }
    // No renewal: stopped once the lease lapses, not before.
    let last = Instant::now();
    holder.renew(boottime_ms());
    wait_state(pid, "T");
    let after = last.elapsed();
    assert!(after >= lease, "stopped {after:?} after the last renewal");
    assert!(
        after < lease + Duration::from_secs(2),
        "stopped only after {after:?}"
    );

    // The controller is heard again: the agent continues the VM, and the watchdog leaves it.
    holder.renew(boottime_ms());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(unfence(&[pid]), 1);
    wait_state(pid, "S");
    for _ in 0..3 {
        holder.renew(boottime_ms());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(state(pid), "T");

    // Released: the watchdog ends cleanly and takes its files with it.
    holder.release();
    assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok(true));
    assert!(!files.fifo().exists() && !files.pid().exists());
}
