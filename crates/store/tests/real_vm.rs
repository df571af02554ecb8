//! The repository with real QEMU: lazy activation (the reference guest, padded to look like a
//! real server disk, boots through the NBD export of its repository image while only the blocks
//! it touches are fetched) and saved states that travel through the repository.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmatrix_core::{ImageRef, InstanceId};
use vmatrix_store::cache::ChunkCache;
use vmatrix_store::nbd::{Export, NbdServer};
use vmatrix_store::{ExportFormat, Repository};
use vmatrix_vmm::{AccelChoice, BaseImage, ProbeBoot, Vm, VmSpec};

const MIB: u64 = 1024 * 1024;

/// The reference guest, a scratch directory (named `prefix…`) with a file repository in it,
/// and the accelerator it boots on here.
async fn reference_setup(
    prefix: &str,
) -> (
    vmatrix_guest::GuestImage,
    tempfile::TempDir,
    Repository,
    vmatrix_vmm::Accelerator,
) {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest/reference.img");
    let guest = vmatrix_guest::build(&vmatrix_guest::BuildOptions::new(out)).expect("guest");
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    let repo =
        Repository::open_or_init(&format!("file://{}", dir.path().join("repo").display())).unwrap();
    let accel = vmatrix_vmm::accel::resolve(
        AccelChoice::from_env().unwrap(),
        Some(&ProbeBoot {
            kernel: guest.kernel.clone(),
            initrd: guest.initrd.clone(),
        }),
    )
    .await;
    (guest, dir, repo, accel)
}

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn the_guest_boots_through_the_lazy_export_fetching_only_what_it_reads() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest/padded-512m.img");
    let guest = vmatrix_guest::build(&vmatrix_guest::BuildOptions {
        size: 512 * MIB,
        ..vmatrix_guest::BuildOptions::new(out)
    })
    .expect("build the padded guest");
    let dir = tempfile::Builder::new()
        .prefix("vmx-lazy-")
        .tempdir_in("/tmp")
        .unwrap();
    let repo = Arc::new(
        Repository::open_or_init(&format!("file://{}", dir.path().join("repo").display())).unwrap(),
    );
    let image = ImageRef::parse("web:v1").unwrap();
    let import = repo
        .import(&guest.disk, &image, dir.path(), &|_| {})
        .unwrap();
    let (_, manifest) = repo.resolve(&image).unwrap();
    let data_bytes = import.logical_bytes - import.zero_bytes;

    let cache =
        Arc::new(ChunkCache::new(repo.clone(), &dir.path().join("cache"), 256 * MIB).unwrap());
    let export = Export::new("web", manifest, cache.clone());
    let server = NbdServer::start(export.clone(), &dir.path().join("nbd.sock")).unwrap();

    let accel = vmatrix_vmm::accel::resolve(
        AccelChoice::from_env().unwrap(),
        Some(&ProbeBoot {
            kernel: guest.kernel.clone(),
            initrd: guest.initrd.clone(),
        }),
    )
    .await;
    let forward = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let spec = VmSpec::new(
        InstanceId::new("lazy-1").unwrap(),
        BaseImage::Nbd {
            url: server.url("web"),
        },
        forward,
        accel,
    );
    let started = Instant::now();
    let mut vm = Vm::boot(spec, dir.path().join("vm")).await.expect("boot");
    vm.wait_ready(Duration::from_secs(90))
        .await
        .expect("serves HTTP");
    let to_http = started.elapsed();
    let r = vmatrix_vmm::http::request(
        forward,
        "PUT",
        "/disk/k",
        b"written",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "writes go to the overlay");
    let r = vmatrix_vmm::http::request(forward, "GET", "/disk/k", &[], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.body, b"written");

    let fetched = cache.stats.fetched_bytes.load(Ordering::Relaxed);
    let chunks = cache.stats.fetches.load(Ordering::Relaxed);
    eprintln!(
        "lazy boot: HTTP after {:.2}s; fetched {} chunks = {:.1} MiB stored from the repository for an image of {} MiB ({:.1} MiB of non-zero data, {:.1} MiB stored); served {:.1} MiB to QEMU",
        to_http.as_secs_f64(),
        chunks,
        fetched as f64 / MIB as f64,
        import.logical_bytes / MIB,
        data_bytes as f64 / MIB as f64,
        import.new_stored_bytes as f64 / MIB as f64,
        export.served_bytes.load(Ordering::Relaxed) as f64 / MIB as f64,
    );
    assert!(
        chunks > 0,
        "nothing was fetched: the guest did not read its disk through the export"
    );
    assert!(
        fetched * 4 < data_bytes,
        "fetched {fetched} bytes of {data_bytes}: that is not lazy"
    );
    vm.kill().await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn a_state_suspended_into_the_repository_resumes_on_another_machine() {
    let (guest, dir, repo, accel) = reference_setup("vmx-state-").await;
    let free = || {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let spec = VmSpec::new(
        InstanceId::new("state-1").unwrap(),
        &guest.disk,
        free(),
        accel,
    );
    let mut vm = Vm::boot(spec.clone(), dir.path().join("a"))
        .await
        .expect("boot");
    vm.wait_ready(Duration::from_secs(90)).await.expect("ready");
    let put = vmatrix_vmm::http::request(
        spec.forward,
        "PUT",
        "/kv/session",
        b"42 items in cart",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(put.status, 200);

    // Suspend, store state and overlay in the repository, and forget the local files.
    let suspended = vm
        .suspend(
            &dir.path().join("a/state.bin"),
            std::time::Duration::from_secs(120),
        )
        .await
        .expect("suspend");
    let state_ref = ImageRef::parse("state-1:suspend-1").unwrap();
    let overlay_ref = ImageRef::parse("state-1:overlay-1").unwrap();
    let stored = tokio::task::block_in_place(|| {
        let s = repo
            .import_state(&suspended.state_file, &state_ref, &|_| {})
            .unwrap();
        repo.import_state(&suspended.disk, &overlay_ref, &|_| {})
            .unwrap();
        s
    });
    eprintln!(
        "saved state: {:.1} MiB, {:.1} MiB of it zero, stored as {:.1} MiB",
        stored.logical_bytes as f64 / MIB as f64,
        stored.zero_bytes as f64 / MIB as f64,
        stored.new_stored_bytes as f64 / MIB as f64
    );
    std::fs::remove_dir_all(dir.path().join("a")).unwrap();

    // "Machine B" gets both back from the repository and resumes.
    let b = dir.path().join("b-in");
    std::fs::create_dir_all(&b).unwrap();
    tokio::task::block_in_place(|| {
        repo.export(&state_ref, &b.join("state.bin"), ExportFormat::Raw, &|_| {})
            .unwrap();
        repo.export(
            &overlay_ref,
            &b.join("disk.qcow2"),
            ExportFormat::Raw,
            &|_| {},
        )
        .unwrap();
    });
    let moved = spec.with_forward(free());
    let from_repo = vmatrix_vmm::SuspendedVm {
        state_file: b.join("state.bin"),
        disk: b.join("disk.qcow2"),
        state_bytes: stored.logical_bytes,
        elapsed: Duration::ZERO,
    };
    let (resumed, took) = Vm::resume(moved.clone(), dir.path().join("b"), &from_repo)
        .await
        .expect("resume from the repository's copy");
    eprintln!(
        "resumed from the repository's copy in {:.3}s",
        took.as_secs_f64()
    );
    let got = vmatrix_vmm::http::request(
        moved.forward,
        "GET",
        "/kv/session",
        &[],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(got.body, b"42 items in cart");
    resumed.kill().await;
}

/// A way to cut bytes into pieces: (offset, length) of each.
type Cut = dyn Fn(&[u8]) -> Vec<(usize, usize)>;

/// What `cutting` would store of `second` that `first` does not already hold: new non-zero
/// bytes (before compression), as the repository would count them.
fn new_bytes_under(first: &[u8], second: &[u8], cut: &Cut) -> u64 {
    let seen: std::collections::HashSet<[u8; 32]> = cut(first)
        .into_iter()
        .map(|(at, len)| *blake3::hash(&first[at..at + len]).as_bytes())
        .collect();
    let mut new = std::collections::HashSet::new();
    let mut bytes = 0;
    for (at, len) in cut(second) {
        let piece = &second[at..at + len];
        if piece.iter().all(|&b| b == 0) {
            continue;
        }
        let h = *blake3::hash(piece).as_bytes();
        if !seen.contains(&h) && new.insert(h) {
            bytes += len as u64;
        }
    }
    bytes
}

fn fixed(size: usize) -> impl Fn(&[u8]) -> Vec<(usize, usize)> {
    move |d: &[u8]| {
        (0..d.len())
            .step_by(size)
            .map(|at| (at, size.min(d.len() - at)))
            .collect()
    }
}

fn content_defined(avg: u32) -> impl Fn(&[u8]) -> Vec<(usize, usize)> {
    move |d: &[u8]| {
        fastcdc::v2020::FastCDC::new(d, avg / 4, avg, avg * 4)
            .map(|c| (c.offset, c.length))
            .collect()
    }
}

/// Two saved states of one idle 256 MiB guest, a few seconds apart: the second adds under 10%
/// of the guest's RAM to the repository. Also prints what fixed and other content-defined
/// chunk sizes would have added, the measurement behind the choice of cutting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn the_second_saved_state_of_an_idle_guest_adds_little() {
    let (guest, dir, repo, accel) = reference_setup("vmx-states-").await;
    let forward = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let spec = VmSpec::new(
        InstanceId::new("idle-1").unwrap(),
        &guest.disk,
        forward,
        accel,
    );
    let ram = u64::from(spec.memory_mib) * MIB;
    let mut vm = Vm::boot(spec.clone(), dir.path().join("vm"))
        .await
        .expect("boot");
    vm.wait_ready(Duration::from_secs(90)).await.expect("ready");

    let mut states = Vec::new();
    let mut reports = Vec::new();
    for n in 1..=2 {
        let file = dir.path().join(format!("state-{n}.bin"));
        vm.save_state(&file, Duration::from_secs(120))
            .await
            .expect("save the state");
        let image = ImageRef::parse(&format!("idle-1:suspend-{n}")).unwrap();
        let report =
            tokio::task::block_in_place(|| repo.import_state(&file, &image, &|_| {})).unwrap();
        eprintln!(
            "state {n}: {:.1} MiB, {:.1} MiB zero, {} chunks new ({:.1} MiB, {:.1} MiB stored), {} reused",
            report.logical_bytes as f64 / MIB as f64,
            report.zero_bytes as f64 / MIB as f64,
            report.new_chunks,
            report.new_raw_bytes as f64 / MIB as f64,
            report.new_stored_bytes as f64 / MIB as f64,
            report.reused_chunks
        );
        states.push(std::fs::read(&file).unwrap());
        reports.push(report);
        // Idle, serving: it answers, then is left alone a few seconds.
        vm.cont().await.expect("continue");
        let got = vmatrix_vmm::http::request(forward, "GET", "/", &[], Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(got.status, 200);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    vm.kill().await;

    let (a, b) = (&states[0], &states[1]);
    for (label, bytes) in [
        ("fixed 4 KiB", new_bytes_under(a, b, &fixed(4096))),
        ("fixed 64 KiB", new_bytes_under(a, b, &fixed(65536))),
        (
            "content-defined, 8 KiB average",
            new_bytes_under(a, b, &content_defined(8192)),
        ),
        (
            "content-defined, 16 KiB average",
            new_bytes_under(a, b, &content_defined(16384)),
        ),
        (
            "content-defined, 64 KiB average",
            new_bytes_under(a, b, &content_defined(65536)),
        ),
    ] {
        eprintln!(
            "second state, {label}: {:.1} MiB new before compression ({:.1}% of RAM)",
            bytes as f64 / MIB as f64,
            bytes as f64 * 100.0 / ram as f64
        );
    }
    let added = reports[1].new_stored_bytes;
    assert!(
        added * 10 < ram,
        "the second state added {:.1} MiB, not under 10% of {} MiB of RAM",
        added as f64 / MIB as f64,
        ram / MIB
    );
    let back = dir.path().join("back.bin");
    tokio::task::block_in_place(|| {
        repo.export(
            &ImageRef::parse("idle-1:suspend-2").unwrap(),
            &back,
            ExportFormat::Raw,
            &|_| {},
        )
    })
    .unwrap();
    assert!(
        std::fs::read(&back).unwrap() == *b,
        "the state comes back byte for byte"
    );
}
