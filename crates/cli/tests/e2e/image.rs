//! `vmatrix image`: one-line errors that leave the repository untouched, and a repository that
//! verifies clean after an import is killed with SIGKILL.

use std::path::Path;
use std::time::Duration;

use crate::support::{data_dir, snapshot, vmatrix};

async fn run(args: &[&str], repo: &Path) -> (bool, String, String) {
    let out = vmatrix()
        .args(["image", "--repo"])
        .arg(repo)
        .args(args)
        .output()
        .await
        .expect("run vmatrix");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_disk(path: &Path, mib: usize, seed: u8) {
    let mut data = vec![0u8; mib * 1024 * 1024];
    let mut h = blake3::Hasher::new();
    h.update(&[seed]);
    // Half random (incompressible), half zeros: a small but honest disk.
    h.finalize_xof().fill(&mut data[..mib * 512 * 1024]);
    std::fs::write(path, data).expect("write disk");
}

#[tokio::test]
#[ignore = "needs qemu-img (real tier)"]
async fn bad_input_gets_one_line_and_leaves_the_repository_alone() {
    let _host = crate::support::share_host().await;
    let dir = data_dir();
    let repo = dir.path().join("repo");
    let disk = dir.path().join("disk.raw");
    write_disk(&disk, 4, 1);
    let (ok, _, err) = run(&["import", "good:v1", disk.to_str().unwrap()], &repo).await;
    assert!(ok, "{err}");
    let before = snapshot(&repo);

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a disk\n").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["import", "x:v1", text.to_str().unwrap()],
            "not a disk image",
        ),
        (
            vec!["import", "../x:v1", disk.to_str().unwrap()],
            "invalid image name",
        ),
        (
            vec!["import", "x", disk.to_str().unwrap()],
            "write NAME:TAG",
        ),
        (
            vec!["import", "x:v1", "/nonexistent/disk.img"],
            "No such file",
        ),
        (vec!["show", "good:v9"], "not found"),
        (
            vec!["export", "good:v9", "/tmp/never-written.raw"],
            "not found",
        ),
        (vec!["tag", "good:v9", "good:v10"], "not found"),
        (vec!["rm", "nothing:here"], "not found"),
    ];
    for (args, expect) in cases {
        let (ok, _, err) = run(&args, &repo).await;
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
        assert!(err.starts_with("error: "), "{err}");
        assert_eq!(snapshot(&repo), before, "{args:?} changed the repository");
    }
    let elsewhere = dir.path().join("no-repo-here");
    let (ok, _, err) = run(&["ls"], &elsewhere).await;
    assert!(!ok);
    assert!(
        err.contains("no vMatrix repository") && err.contains("--repo"),
        "{err}"
    );
    assert!(!elsewhere.exists(), "ls created a repository");
    let (ok, _, err) = vmatrix()
        .args(["image", "--repo", "ftp://host/x", "ls"])
        .output()
        .await
        .map(|o| {
            (
                o.status.success(),
                (),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(!ok);
    assert!(err.contains("file:///absolute/path or s3://"), "{err}");

    // An S3 repository nobody answers for: a prompt one-line error, nothing written locally.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = std::time::Instant::now();
    let out = vmatrix()
        .args(["image", "--repo", "s3://images/repo", "import", "x:v1"])
        .arg(&disk)
        .env("AWS_ENDPOINT_URL", format!("http://{closed}"))
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("s3://images/repo") && err.contains("reachable"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(snapshot(&repo), before);
}

/// The chunk files under `repo` (they sit in `chunks/xx/`).
fn chunk_files(repo: &Path) -> usize {
    std::fs::read_dir(repo.join("chunks"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_dir(e.path()).ok())
                .map(|d| d.count())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
#[ignore = "needs qemu-img (real tier)"]
async fn an_import_killed_midway_leaves_a_clean_repository() {
    let _host = crate::support::share_host().await;
    use std::os::unix::process::ExitStatusExt;

    let dir = data_dir();
    let repo = dir.path().join("repo");
    let disk = dir.path().join("big.raw");
    write_disk(&disk, 384, 2);
    let stderr = dir.path().join("import.err");
    let mut child = vmatrix()
        .args(["image", "--repo"])
        .arg(&repo)
        .args(["import", "big:v1"])
        .arg(&disk)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    // Kill it once it has written some chunks, while it still runs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while chunk_files(&repo) < 20 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the import ended ({status}) before it could be killed, with {} chunk(s) \
                 written: {}",
                chunk_files(&repo),
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the import wrote {} chunk(s) in 60 s",
            chunk_files(&repo)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the import was not ended by the SIGKILL: {status}"
    );
    let written = chunk_files(&repo);
    eprintln!("import killed ({status}) after writing {written} chunk(s)");
    // Interrupted: it published nothing.
    let (ok, out, err) = run(&["show", "big:v1"], &repo).await;
    assert!(
        !ok && err.contains("not found"),
        "big:v1 exists after the killed import: {out}{err}"
    );

    let (ok, out, err) = run(&["verify"], &repo).await;
    assert!(ok, "verify after kill -9: {out}{err}");
    let (ok, out, err) = run(&["gc", "--grace-seconds", "0"], &repo).await;
    assert!(ok, "gc after kill -9: {out}{err}");
    eprintln!("{out}");
    let (ok, out, err) = run(&["ls"], &repo).await;
    assert!(ok && !out.contains("big"), "ls after the kill: {out}{err}");
    let (ok, out, err) = run(&["import", "big:v1", disk.to_str().unwrap()], &repo).await;
    assert!(ok, "re-import: {err}");
    eprintln!("re-import after the kill: {out}");
    // Chunks hold whole disks (and saved guest RAM): nobody but their owner reads them.
    crate::support::assert_private(&repo);
    let whole = chunk_files(&repo);
    assert!(
        written < whole,
        "the killed import had already written all {whole} chunk(s)"
    );
    let (ok, out, err) = run(&["verify", "big:v1"], &repo).await;
    assert!(ok, "{out}{err}");
    let back = dir.path().join("back.raw");
    let (ok, _, err) = run(&["export", "big:v1", back.to_str().unwrap()], &repo).await;
    assert!(ok, "{err}");
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&disk).unwrap());
}
